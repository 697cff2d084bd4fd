#!/usr/bin/env python3
"""Fragment-level emulation of the tensor-core attention kernel (fj_attn::attn_tc in attention_jvp.cuh).

No GPU needed (numpy only). It replays, for one block of 4 warps, the kernel's shared-memory layout,
its ldmatrix lane addresses (a_off, k_off, v_off), the PTX-specified register layouts of
ldmatrix.m8n8.x4(.trans) and mma.m16n8k16, the reuse of score accumulators as A fragments for P V, the
key-tail masking, the online softmax and the finish, in f64, and compares o, lse, odot and tlse with a
direct f64 reference, for head dims d (q, k) and dv (v, o), equal or not. Never-written shared memory is NaN, so a read of it shows up as NaN in the output.
It mirrors the CUDA code by hand: keep the two in step when either changes.

Usage: python3 cuda/attention_tc_emulate.py   (prints max abs errors; ~1e-14 expected)
"""
import numpy as np
rng = np.random.default_rng(0)

def ldm(smem, addrs, trans):
    # addrs: 32 element offsets (lane i gives row i%8 of matrix i//8)
    regs = np.zeros((4, 32, 2))
    for j in range(4):
        M = np.array([smem[addrs[8*j+r]: addrs[8*j+r]+8] for r in range(8)])
        for l in range(32):
            g, t = l // 4, l % 4
            if not trans: regs[j, l] = M[g, 2*t:2*t+2]
            else: regs[j, l] = [M[2*t, g], M[2*t+1, g]]
    return regs

def mma(d, a, b0, b1):
    # d: (32,4), a: list of 4 arrays (32,2), b0,b1: (32,2)
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for l in range(32):
        g, t = l // 4, l % 4
        A[g, 2*t:2*t+2] = a[0][l]; A[g+8, 2*t:2*t+2] = a[1][l]
        A[g, 2*t+8:2*t+10] = a[2][l]; A[g+8, 2*t+8:2*t+10] = a[3][l]
        B[2*t:2*t+2, g] = b0[l]; B[2*t+8:2*t+10, g] = b1[l]
        C[g, 2*t:2*t+2] = d[l, 0:2]; C[g+8, 2*t:2*t+2] = d[l, 2:4]
    Dm = A @ B + C
    for l in range(32):
        g, t = l // 4, l % 4
        d[l, 0:2] = Dm[g, 2*t:2*t+2]; d[l, 2:4] = Dm[g+8, 2*t:2*t+2]

def cfg(D, DV):
    # Cfg<D, DV> of attention_jvp.cuh: padded head dims, key tile (QREG changes no arithmetic).
    return -(-D // 16) * 16, -(-DV // 16) * 16, 32 if 128 in (D, DV) else 64

def run(D, DV, Nq, Nk, mode, bx=0):
    DP, DVP, BC = cfg(D, DV)
    BR = 64; SS = DP + 8; SV = DVP + 8; NT = DVP // 8; KC = DP // 16; NS = BC // 8
    TAN = mode != 'fwd'; KVT = mode == 'full'
    q, k, tq, tk = [rng.standard_normal((n, D)) for n in (Nq, Nk, Nq, Nk)]
    v, tv = [rng.standard_normal((Nk, DV)) for _ in range(2)]
    if not KVT: tk[:] = 0; tv[:] = 0
    scale = 0.3
    NQ = 2 if TAN else 1; NKV = 4 if KVT else 2
    KT = BC * SS; PAIR = BC * (SS + SV); STAGE = (NKV // 2) * PAIR
    smem = np.full(NQ*BR*SS + 2*STAGE, np.nan)  # NaN = never written
    sKV = NQ*BR*SS
    # padding columns zero: Q rows, then K (Kdot) and V (Vdot) rows of both stages
    for r in range(NQ*BR): smem[r*SS + D: r*SS + DP] = 0
    for r in range(2 * (NKV // 2) * BC):
        kb = sKV + (r // BC)*PAIR + (r % BC)*SS; smem[kb + D: kb + DP] = 0
        vb = sKV + (r // BC)*PAIR + KT + (r % BC)*SV; smem[vb + DV: vb + DVP] = 0
    q0 = bx * BR
    def put(base, src, r0, n, rows, stride):
        w = src.shape[1]
        for r in range(rows):
            smem[base + r*stride: base + r*stride + w] = src[r0 + r] if r0 + r < n else 0
    put(0, q, q0, Nq, BR, SS)
    if TAN: put(BR*SS, tq, q0, Nq, BR, SS)
    ntiles = (Nk + BC - 1) // BC
    out_o = np.zeros((Nq, DV)); out_t = np.zeros((Nq, DV)); out_lse = np.zeros(Nq); out_tl = np.zeros(Nq)
    for warp in range(4):
        lanes = np.arange(32)
        a_off = (warp*16 + (lanes & 7) + ((lanes >> 3) & 1)*8)*SS + (lanes >> 4)*8
        k_off = ((lanes & 7) + (lanes >> 4)*8)*SS + ((lanes >> 3) & 1)*8
        v_off = ((lanes & 7) + ((lanes >> 3) & 1)*8)*SV + (lanes >> 4)*8
        g = lanes >> 2; t4 = lanes & 3
        acc_o = np.zeros((NT, 32, 4)); acc_t = np.zeros((NT, 32, 4))
        m_run = np.full((32, 2), -np.inf); l_run = np.zeros((32, 2)); r_run = np.zeros((32, 2))
        sl2 = scale * np.log2(np.e)
        for j in range(ntiles):
            st = (j & 1)
            base = sKV + st*STAGE
            put(base, k, j*BC, Nk, BC, SS); put(base+KT, v, j*BC, Nk, BC, SV)
            if KVT: put(base+PAIR, tk, j*BC, Nk, BC, SS); put(base+PAIR+KT, tv, j*BC, Nk, BC, SV)
            s = np.zeros((NS, 32, 4)); sd = np.zeros((NS, 32, 4))
            for kc in range(KC):
                a = ldm(smem, a_off + kc*16, False)
                ad = ldm(smem, BR*SS + a_off + kc*16, False)
                for n2 in range(BC // 16):
                    b = ldm(smem, base + k_off + n2*16*SS + kc*16, False)
                    mma(s[2*n2], a, b[0], b[1]); mma(s[2*n2+1], a, b[2], b[3])
                    if TAN: mma(sd[2*n2], ad, b[0], b[1]); mma(sd[2*n2+1], ad, b[2], b[3])
                    if KVT:
                        bd = ldm(smem, base + PAIR + k_off + n2*16*SS + kc*16, False)
                        mma(sd[2*n2], a, bd[0], bd[1]); mma(sd[2*n2+1], a, bd[2], bd[3])
            kv0 = j*BC
            s *= sl2; sd *= scale
            for n in range(NS):
                for e in range(4):
                    key = kv0 + n*8 + 2*t4 + (e & 1)
                    msk = key >= Nk
                    s[n, msk, e] = -np.inf; sd[n, msk, e] = 0
            mx = m_run.copy()
            for n in range(NS):
                for e in range(4): mx[:, e >> 1] = np.maximum(mx[:, e >> 1], s[n, :, e])
            for i in range(2):
                x = mx[:, i]
                x = np.maximum(x, x[lanes ^ 1]); x = np.maximum(x, x[lanes ^ 2]); mx[:, i] = x
            m_use = np.where(mx == -np.inf, 0, mx)
            alpha = np.exp2(m_run - m_use); m_run = mx
            l_run *= alpha; r_run *= alpha
            for e in range(4): acc_o[:, :, e] *= alpha[:, e >> 1]; acc_t[:, :, e] *= alpha[:, e >> 1]
            for n in range(NS):
                for e in range(4):
                    p = np.exp2(s[n, :, e] - m_use[:, e >> 1]); s[n, :, e] = p; l_run[:, e >> 1] += p
                    ps = p * sd[n, :, e]; sd[n, :, e] = ps; r_run[:, e >> 1] += ps
            for kc2 in range(BC // 16):
                pa = [s[2*kc2][:, 0:2], s[2*kc2][:, 2:4], s[2*kc2+1][:, 0:2], s[2*kc2+1][:, 2:4]]
                psa = [sd[2*kc2][:, 0:2], sd[2*kc2][:, 2:4], sd[2*kc2+1][:, 0:2], sd[2*kc2+1][:, 2:4]]
                for n2 in range(DVP // 16):
                    b = ldm(smem, base + KT + v_off + kc2*16*SV + n2*16, True)
                    mma(acc_o[2*n2], pa, b[0], b[1]); mma(acc_o[2*n2+1], pa, b[2], b[3])
                    if TAN: mma(acc_t[2*n2], psa, b[0], b[1]); mma(acc_t[2*n2+1], psa, b[2], b[3])
                    if KVT:
                        bd = ldm(smem, base + PAIR + KT + v_off + kc2*16*SV + n2*16, True)
                        mma(acc_t[2*n2], pa, bd[0], bd[1]); mma(acc_t[2*n2+1], pa, bd[2], bd[3])
        for i in range(2):
            for arr in (l_run, r_run):
                x = arr[:, i]; x = x + x[lanes ^ 1]; x = x + x[lanes ^ 2]; arr[:, i] = x
        for l in range(32):
            for i in range(2):
                row = q0 + warp*16 + g[l] + 8*i
                if row >= Nq: continue
                inv_l = 1/l_run[l, i] if l_run[l, i] > 0 else 0
                mu = r_run[l, i]*inv_l
                for n in range(DV // 8):
                    col = n*8 + 2*t4[l]
                    o2 = acc_o[n, l, 2*i:2*i+2]*inv_l
                    out_o[row, col:col+2] = o2
                    out_t[row, col:col+2] = acc_t[n, l, 2*i:2*i+2]*inv_l - mu*o2
                if t4[l] == 0:
                    out_lse[row] = m_run[l, i]*np.log(2) + np.log(l_run[l, i]); out_tl[row] = mu
    # reference
    S = scale*q@k.T; Sd = scale*(tq@k.T + q@tk.T)
    if not TAN: Sd[:] = 0
    P = np.exp(S - S.max(1, keepdims=True)); P /= P.sum(1, keepdims=True)
    O = P@v; mu = (P*Sd).sum(1); Od = P@tv + (P*Sd)@v - mu[:, None]*O
    lse = np.log(np.exp(S).sum(1))
    rows = slice(q0, min(q0 + BR, Nq))
    errs = [np.abs(out_o[rows]-O[rows]).max(), np.abs(out_lse[rows]-lse[rows]).max()]
    if TAN: errs += [np.abs(out_t[rows]-Od[rows]).max(), np.abs(out_tl[rows]-mu[rows]).max()]
    assert not np.isnan(out_o[rows]).any()
    return errs

worst = 0.0
for (D, DV) in [(32, 32), (72, 72), (128, 128), (64, 128), (128, 64), (72, 96), (96, 72), (32, 72)]:
    for mode in ('full', 'nokv', 'fwd'):
        for (Nq, Nk, bx) in [(50, 70, 0), (130, 33, 2)]:
            e = run(D, DV, Nq, Nk, mode, bx)
            worst = max(worst, max(e))
            print(f"d{D} dv{DV}", mode, Nq, Nk, bx, ["%.1e" % x for x in e])
print("largest error %.1e" % worst)
assert worst < 1e-10, "emulated kernel disagrees with the reference"
