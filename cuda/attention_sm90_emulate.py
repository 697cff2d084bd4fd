#!/usr/bin/env python3
"""Emulation of the Hopper attention kernel (fj_h::attn_sm90 in attention_jvp_sm90.cu), in f64.

No GPU needed (numpy only). It replays, for every block of a problem, what the kernel asks of the
hardware, each piece written from the PTX ISA's description rather than from the kernel:
  - the TMA copies: 3-D boxes {SCOL columns, rows, 1} of a [B*H, N, d] tensor, zero fill past N and
    past d, written into slabs of SWZ-byte rows with the SWZ-byte swizzle (SWZ = 128 at d64/d128, 64 at
    d96, 32 at d72; SCOL = SWZ/2; the 16-byte chunk bits [4, 4+b) of an address XORed with bits
    [7, 7+b), b = 3, 2, 1, the pattern repeating every 8 rows), at the kernel's shared-memory offsets
    (Cfg: Q slabs, K and V rings of STAGES stages, stage = tile % STAGES);
  - the wgmma matrix descriptors exactly as the kernel builds them (smem_desc, desc_kmajor,
    desc_mnmajor, plus the per-chunk offsets added in 16-byte units), decoded back into start address,
    LBO, SBO and swizzle mode, and the operands gathered through the PTX canonical layouts
      K-major, swizzled:  ((8,m),(T,2)):((gT,SBO),(1,T))
      MN-major, swizzled: ((T,g,m),(8,k)):((1,T,LBO),(gT,SBO))      (T = 8 elements, g = SWZ/16)
    followed by the swizzle of the resulting byte address;
  - the register layouts of wgmma.m64nNk16: accumulator element i of thread (warp w, lane 4g+t) is
    D[16w + g + 8((i>>1)&1), 8(i>>2) + 2t + (i&1)]; the A operand from registers is the per-warp
    mma.m16n8k16 A layout (a0a1: row g, k 2t..; a2a3: row g+8; a4a5: row g, k 2t+8..; a6a7: row g+8);
  - centred T with a tangent (the kernel's CENTER: full JVP and nokv): whole-row sums of p and p.sdot
    every tile, T moved to the new mu (T = alpha T + (mu_old - mu_new) alpha O), P.(Sdot - mu) fed to
    the value products, odot = T/l; the softmax as the kernel writes it: the running max m in raw
    score units, p = 2^(s c log2e - m c log2e), lse = m c + ln l;
  - the kernel's schedule: per consumer warpgroup (64 rows each) a first turn (scores of tile 0), steady
    turns (scores of tile j, value products of tile j-1 with the P fragments packed in the previous
    softmax), a last turn; the producer fills ring stages as far ahead as the released stages allow
    (a stage read after being refilled would show up as a wrong result); key-tail masking, online
    softmax, finish.
Never-written shared memory is NaN. The output is compared with a direct f64 reference of o, lse, odot
and tlse; errors about 1e-13 are expected. It checks indexing and algebra, not the hardware: timing,
barriers, register allocation and 16-bit rounding are not modelled (P is kept in f64).
It mirrors the CUDA code by hand: keep the two in step when either changes.

Usage: python3 cuda/attention_sm90_emulate.py
"""
import numpy as np

rng = np.random.default_rng(1)
FULL, NOKV, FWD = 0, 1, 2
BR, NCONS = 128, 2


def cfg(d, mode):
    tan, kvt = mode != FWD, mode == FULL
    swzb = 128 if d % 64 == 0 else 64 if d % 32 == 0 else 32
    scol = swzb // 2
    slabs = -(-d // scol)
    dp = slabs * scol
    bc = (48 if (d == 128 and tan) else 96 if (d == 64 and tan) else 80 if (d == 72 and tan)
          else 128 if not tan else 64)
    stages = 3 if (mode == FULL and dp * bc >= 96 * 64) or (mode == FWD and dp * bc > 96 * 128) else 4
    nq, nkt = (2 if tan else 1), (2 if kvt else 1)
    slab_q, slab_k = BR * swzb, bc * swzb
    q_bytes = nq * slabs * slab_q
    kst = nkt * slabs * slab_k
    return dict(tan=tan, kvt=kvt, swz=swzb, scol=scol, slabs=slabs, dp=dp, cps=scol // 16, bc=bc,
                stages=stages, slab_q=slab_q, slab_k=slab_k, q_bytes=q_bytes, kst=kst,
                bar_off=q_bytes + 2 * stages * kst)


def swz(addr, w):
    """The w-byte swizzle of a byte address (Swizzle<b,4,3>, b = log2(w/16)): bits [4, 4+b) ^= [7, 7+b)."""
    b = {128: 3, 64: 2, 32: 1}[w]
    return addr ^ (((addr >> 7) & ((1 << b) - 1)) << 4)


class Smem:
    def __init__(self, nbytes):
        self.e = np.full(nbytes // 2, np.nan)  # one f64 per 16-bit element

    def tma_box(self, dst, x, c0, r0, rows, w):
        """TMA box {w/2, rows, 1} of x [N, d] at (c0, r0) into the slab at dst (aligned to 8 rows)."""
        assert dst % (8 * w) == 0
        n, d = x.shape
        for r in range(rows):
            for c in range(w // 2):
                inside = r0 + r < n and c0 + c < d
                v = x[r0 + r, c0 + c] if inside else 0.0  # zero fill out of bounds
                self.e[swz(dst + r * w + c * 2, w) // 2] = v


MODES = {128: 1, 64: 2, 32: 3}


def smem_desc(addr, lbo, sbo, w):
    return (((addr & 0x3FFFF) >> 4) | (((lbo & 0x3FFFF) >> 4) << 16) | (((sbo & 0x3FFFF) >> 4) << 32)
            | (MODES[w] << 62))


def desc_kmajor(addr, w):
    return smem_desc(addr, 16, 8 * w, w)


def desc_mnmajor(addr, slab, w):
    return smem_desc(addr, slab, 8 * w, w)


def decode(desc):
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    w = {v: k for k, v in MODES.items()}[desc >> 62]
    assert (desc >> 49) & 7 == 0, "base offset 0 expected"
    return start, lbo, sbo, w


def gather_kmajor(sm, desc, rows):
    """rows x 16 operand, K-major, swizzled: ((8,m),(T,2)):((gT,SBO),(1,T)), T = 8 elements, gT = w bytes."""
    start, _, sbo, w = decode(desc)
    m = np.arange(rows)[:, None]
    k = np.arange(16)[None, :]
    addr = start + (m % 8) * w + (m // 8) * sbo + (k % 8) * 2 + (k // 8) * 16
    return sm.e[swz(addr, w) // 2]


def gather_mnmajor(sm, desc, n):
    """16 x n operand (k rows, n columns), MN-major, swizzled: ((T,g,m),(8,k)):((1,T,LBO),(gT,SBO))."""
    start, lbo, sbo, w = decode(desc)
    g = w // 16
    assert n % (8 * g) == 0, "N must span whole swizzle atoms"
    k = np.arange(16)[:, None]
    c = np.arange(n)[None, :]
    addr = start + (c % 8) * 2 + ((c // 8) % g) * 16 + (c // (8 * g)) * lbo + (k % 8) * w + (k // 8) * sbo
    return sm.e[swz(addr, w) // 2]


# Register layouts of one warpgroup (128 threads).
TID = np.arange(128)
W, LANE = TID // 32, TID % 32
G, T4 = LANE // 4, LANE % 4


def acc_index(n):
    i = np.arange(n // 2)[None, :]
    rows = 16 * W[:, None] + G[:, None] + 8 * ((i >> 1) & 1)
    cols = 8 * (i >> 2) + 2 * T4[:, None] + (i & 1)
    return rows, cols


def to_acc(D):
    r, c = acc_index(D.shape[1])
    return D[r, c]


def from_acc(acc, n):
    D = np.full((64, n), np.nan)
    r, c = acc_index(n)
    D[r, c] = acc
    return D


def a_from_regs(frag):
    """frag: 4 registers x (128 threads, 2 values) -> the 64 x 16 A operand."""
    A = np.full((64, 16), np.nan)
    row = 16 * W + G
    for e, (dr, dk) in enumerate([(0, 0), (8, 0), (0, 8), (8, 8)]):
        A[row + dr, 2 * T4 + dk] = frag[e][:, 0]
        A[row + dr, 2 * T4 + dk + 1] = frag[e][:, 1]
    assert not np.isnan(A).any(), "A fragment layout does not cover the tile"
    return A


def wgmma_ss(acc, da, db, n, scale_d, sm):
    A = gather_kmajor(sm, da, 64)
    B = gather_kmajor(sm, db, n)  # n x 16, K-major B: D += A B^T
    D = A @ B.T
    if scale_d:
        D = D + from_acc(acc, n)
    return to_acc(D)


def wgmma_rs(acc, frag, db, n, sm):
    A = a_from_regs(frag)
    B = gather_mnmajor(sm, db, n)
    return to_acc(A @ B + from_acc(acc, n))


def run(d, mode, nq, nk, bh=2, scale=0.37):
    c = cfg(d, mode)
    tan, kvt, slabs, bc, stages = c["tan"], c["kvt"], c["slabs"], c["bc"], c["stages"]
    slab_q, slab_k, kst, w, scol, dp, cps = c["slab_q"], c["slab_k"], c["kst"], c["swz"], c["scol"], c["dp"], c["cps"]
    q, tq = rng.standard_normal((bh, nq, d)), rng.standard_normal((bh, nq, d))
    k, v, tk, tv = [rng.standard_normal((bh, nk, d)) for _ in range(4)]
    if not tan:
        tq[:] = 0
    if not kvt:
        tk[:] = 0
        tv[:] = 0
    out = dict(o=np.full((bh, nq, d), np.nan), to=np.full((bh, nq, d), np.nan),
               lse=np.full((bh, nq), np.nan), tlse=np.full((bh, nq), np.nan))
    ntiles = (nk + bc - 1) // bc
    sl2 = scale * np.log2(np.e)
    for b in range(bh):
        for bx in range((nq + BR - 1) // BR):
            q0 = bx * BR
            sm = Smem(c["bar_off"])
            sQ, sK = 0, c["q_bytes"]
            sV = sK + stages * kst
            for s in range(slabs):
                sm.tma_box(sQ + s * slab_q, q[b], scol * s, q0, BR, w)
                if tan:
                    sm.tma_box(sQ + (slabs + s) * slab_q, tq[b], scol * s, q0, BR, w)
            loaded = {"k": 0, "v": 0}
            released = {"k": 0, "v": 0}  # tiles released by both consumers

            def produce():
                for ring, base, x, xt in (("k", sK, k, tk), ("v", sV, v, tv)):
                    while loaded[ring] < ntiles and loaded[ring] < released[ring] + stages:
                        j = loaded[ring]
                        dst = base + (j % stages) * kst
                        for s in range(slabs):
                            sm.tma_box(dst + s * slab_k, x[b], scol * s, j * bc, bc, w)
                            if kvt:
                                sm.tma_box(dst + (slabs + s) * slab_k, xt[b], scol * s, j * bc, bc, w)
                        loaded[ring] += 1

            st8 = [dict(acc_o=np.zeros((128, dp // 2)), acc_t=np.zeros((128, dp // 2)),
                        s=np.zeros((128, bc // 2)), sd=np.zeros((128, bc // 2)),
                        pa=None, psa=None, m=np.full((128, 2), -np.inf), l=np.zeros((128, 2)),
                        r=np.zeros((128, 2)), mu=np.zeros((128, 2))) for _ in range(NCONS)]
            KC, KC2 = dp // 16, bc // 16

            def turn(cw, j, scores, values):
                S = st8[cw]
                qa = sQ + cw * 64 * w
                if scores:
                    assert loaded["k"] > j
                    dq = desc_kmajor(qa, w)
                    dk = desc_kmajor(sK + (j % stages) * kst, w)
                    qo = lambda t, kc: ((t * slabs + kc // cps) * slab_q + (kc % cps) * 32) >> 4
                    ko = lambda t, kc: ((t * slabs + kc // cps) * slab_k + (kc % cps) * 32) >> 4
                    for kc in range(KC):
                        S["s"] = wgmma_ss(S["s"], dq + qo(0, kc), dk + ko(0, kc), bc, kc > 0, sm)
                    if tan:
                        for kc in range(KC):
                            S["sd"] = wgmma_ss(S["sd"], dq + qo(1, kc), dk + ko(0, kc), bc, kc > 0, sm)
                    if kvt:
                        for kc in range(KC):
                            S["sd"] = wgmma_ss(S["sd"], dq + qo(0, kc), dk + ko(1, kc), bc, 1, sm)
                if values:
                    assert loaded["v"] > j - 1
                    dv = desc_mnmajor(sV + ((j - 1) % stages) * kst, slab_k, w)
                    vo = lambda t, kc2: (t * slabs * slab_k + kc2 * 16 * w) >> 4
                    for kc2 in range(KC2):
                        S["acc_o"] = wgmma_rs(S["acc_o"], S["pa"][kc2], dv + vo(0, kc2), dp, sm)
                        if tan:
                            S["acc_t"] = wgmma_rs(S["acc_t"], S["psa"][kc2], dv + vo(0, kc2), dp, sm)
                    if kvt:
                        for kc2 in range(KC2):
                            S["acc_t"] = wgmma_rs(S["acc_t"], S["pa"][kc2], dv + vo(1, kc2), dp, sm)

            def softmax(cw, j):
                S = st8[cw]
                kv0 = j * bc
                s = S["s"]  # raw units: the kernel scales inside the exponent
                sd = S["sd"] * scale if tan else S["sd"]
                i = np.arange(bc // 2)[None, :]
                col = kv0 + 8 * (i >> 2) + 2 * T4[:, None] + (i & 1)
                half = (i >> 1) & 1
                masked = np.broadcast_to(col >= nk, s.shape)
                s = np.where(masked, -np.inf, s)
                sd = np.where(masked, 0.0, sd)
                mx = S["m"].copy()
                for h in range(2):
                    mx[:, h] = np.maximum(mx[:, h], np.max(np.where(half == h, s, -np.inf), axis=1))
                # quad reduction (lanes 4g..4g+3 share rows)
                mx = mx.reshape(4, 8, 4, 2).max(axis=2, keepdims=True).repeat(4, axis=2).reshape(128, 2)
                m_new = np.where(mx == -np.inf, 0.0, mx)
                alpha = np.exp2((S["m"] - m_new) * sl2)
                m_off = -m_new * sl2
                S["m"] = mx
                cols_half = (np.arange(dp // 2) >> 1) & 1
                a_half = alpha[:, cols_half]
                p = np.exp2(s * sl2 + m_off[np.arange(128)[:, None], np.broadcast_to(half, s.shape)])
                if tan:
                    # Centred T (the kernel's CENTER): whole-row sums every tile, T moved to the new mu.
                    lt, rt = np.zeros((128, 2)), np.zeros((128, 2))
                    for h in range(2):
                        lt[:, h] = np.sum(np.where(half == h, p, 0.0), axis=1)
                        rt[:, h] = np.sum(np.where(half == h, p * sd, 0.0), axis=1)
                    quad = lambda x: x.reshape(4, 8, 4, 2).sum(axis=2, keepdims=True).repeat(4, axis=2).reshape(128, 2)
                    S["l"] = S["l"] * alpha + quad(lt)
                    S["r"] = S["r"] * alpha + quad(rt)
                    mu_new = np.where(S["l"] > 0, S["r"] / np.where(S["l"] > 0, S["l"], 1.0), 0.0)
                    dmu = S["mu"] - mu_new
                    S["mu"] = mu_new
                    S["acc_o"] = S["acc_o"] * a_half
                    S["acc_t"] = S["acc_t"] * a_half + dmu[:, cols_half] * S["acc_o"]
                    ps = p * (sd - mu_new[np.arange(128)[:, None], np.broadcast_to(half, s.shape)])
                else:
                    S["l"] *= alpha
                    S["r"] *= alpha
                    S["acc_o"] = S["acc_o"] * a_half
                    S["acc_t"] = S["acc_t"] * a_half
                    ps = p * sd
                    for h in range(2):
                        S["l"][:, h] += np.sum(np.where(half == h, p, 0.0), axis=1)
                        S["r"][:, h] += np.sum(np.where(half == h, ps, 0.0), axis=1)
                S["pa"] = [[np.stack([p[:, 8 * cc + 2 * e], p[:, 8 * cc + 2 * e + 1]], 1) for e in range(4)]
                           for cc in range(KC2)]
                S["psa"] = [[np.stack([ps[:, 8 * cc + 2 * e], ps[:, 8 * cc + 2 * e + 1]], 1) for e in range(4)]
                            for cc in range(KC2)]

            def release(j, scores, values):
                if scores:
                    released["k"] = max(released["k"], j + 1)
                if values:
                    released["v"] = max(released["v"], j)

            produce()
            for j in range(ntiles + 1):
                scores, values = j < ntiles, j > 0
                for cw in range(NCONS):  # ping-pong: consumer 0's turn, then consumer 1's
                    turn(cw, j, scores, values)
                release(j, scores, values)
                produce()
                if scores:
                    for cw in range(NCONS):
                        softmax(cw, j)

            for cw in range(NCONS):
                S = st8[cw]
                if tan:  # centred: already whole-row sums
                    l, r = S["l"], S["r"]
                else:
                    l = S["l"].reshape(4, 8, 4, 2).sum(axis=2, keepdims=True).repeat(4, axis=2).reshape(128, 2)
                    r = S["r"].reshape(4, 8, 4, 2).sum(axis=2, keepdims=True).repeat(4, axis=2).reshape(128, 2)
                O = from_acc(S["acc_o"], dp)
                T = from_acc(S["acc_t"], dp)
                # Columns past d (d72: 72..79) saw only TMA's zero fill: the products leave them 0.
                assert not O[:, d:].any() and not T[:, d:].any(), "padded columns not zero"
                O, T = O[:, :d], T[:, :d]
                # rows of the warpgroup: 16w + g (+8); l per row
                lrow = np.zeros(64)
                rrow = np.zeros(64)
                mrow = np.zeros(64)
                for h in range(2):
                    rows = 16 * W + G + 8 * h
                    lrow[rows] = l[:, h]
                    rrow[rows] = r[:, h]
                    mrow[rows] = S["m"][:, h]
                for rr in range(64):
                    row = q0 + cw * 64 + rr
                    if row >= nq:
                        continue
                    inv = 1.0 / lrow[rr]
                    mu = rrow[rr] * inv
                    o = O[rr] * inv
                    out["o"][b, row] = o
                    out["to"][b, row] = T[rr] * inv - (0.0 if tan else mu) * o
                    out["lse"][b, row] = mrow[rr] * scale + np.log(lrow[rr])
                    out["tlse"][b, row] = mu

    # direct reference
    s = scale * np.einsum("bqd,bkd->bqk", q, k)
    sdot = scale * (np.einsum("bqd,bkd->bqk", tq, k) + np.einsum("bqd,bkd->bqk", q, tk))
    mx = s.max(-1, keepdims=True)
    p = np.exp(s - mx)
    l = p.sum(-1, keepdims=True)
    P = p / l
    o = P @ v
    mu = (P * sdot).sum(-1, keepdims=True)
    to = P @ tv + (P * sdot) @ v - mu * o
    ref = dict(o=o, to=to, lse=(mx + np.log(l))[..., 0], tlse=mu[..., 0])
    errs = {}
    for key in (["o", "lse"] + (["to", "tlse"] if tan else [])):
        g = out[key]
        assert not np.isnan(g).any(), f"{key}: NaN (unwritten output or a read of unwritten shared memory)"
        errs[key] = np.max(np.abs(g - ref[key])) / max(1.0, np.max(np.abs(ref[key])))
    return errs


if __name__ == "__main__":
    worst = 0.0
    names = {FULL: "jvp", NOKV: "jvp_nokv", FWD: "fwd"}
    for d in (64, 72, 96, 128):
        for mode in (FULL, NOKV, FWD):
            for nq, nk in [(200, 77), (128, 300), (5, 1), (130, 129)]:
                e = run(d, mode, nq, nk)
                worst = max(worst, max(e.values()))
                cf = cfg(d, mode)
                print(f"d{d:3} {names[mode]:8} Nq {nq:3} Nk {nk:3} (swizzle {cf['swz']}, BC {cf['bc']}, stages "
                      f"{cf['stages']}): " + "  ".join(f"{k} {v:.1e}" for k, v in e.items()))
    print(f"worst error {worst:.2e}")
    assert worst < 1e-10, "emulated kernel disagrees with the reference"
