// attention_bwd_tc.cuh: tensor-core backward of the primal attention for bf16/f16 storage (the f32
// kernels keep attention_bwd.cuh's FMA templates). Same math, same launch order and the same kernel
// names and parameter lists as attention_bwd.cuh (which documents the math and the strides); only the
// tiles, hence grids and shared memory, differ. Include common.cuh and attention_bwd.cuh before it.
//
// STRUCTURE (FlashAttention-2 style, sm_80 mma.sync m16n8k16 with f32 accumulation, ldmatrix,
// cp.async double buffering; deterministic, no atomics):
//   dkdv: a block of 4 warps owns BK = 64 keys, 16 per warp; K and V sit in shared memory for the whole
//     kernel (A operands, re-read with ldmatrix each tile); query tiles of BM rows of Q and dO stream
//     through shared memory (cp.async, double buffered) with their lse*log2(e) and delta (f32, plain
//     loads into a double-buffered shared array). Per tile and warp, in registers:
//       S^T  = K Q^T  (16 x BM),  dP^T = V dO^T (16 x BM)
//       P^T  = 2^(S^T c log2e - lse log2e),  dS^T = P^T (dP^T - delta)
//       dV  += P^T dO,  dK += dS^T Q   (P^T, dS^T rounded to the storage type and used as A fragments
//                                       straight from the accumulators; dO, Q as B via ldmatrix.trans)
//     dK is scaled by c once at the end. BM = 64, or 32 when DP + DVP > 192 (register budget).
//   dq: a block of 4 warps owns BQ = 64 queries, 16 per warp (Q, dO in shared memory, lse, delta in
//     registers); key tiles of BN rows of K and V stream through shared memory (cp.async, double
//     buffered): S = Q K^T, dP = dO V^T, P, dS as above, dQ += dS K (K as B via ldmatrix.trans), c dQ
//     stored. BN = 64, or 32 when d or dv is 128.
// HEAD DIM PADDING as attention_jvp.cuh: d, dv padded to multiples of 16 (DP, DVP) with zero columns in
// every shared tile (written once, never touched by cp.async); padded output columns are not stored.
// TAILS: rows past Nq / Nk are zero-filled by cp.async; a query row past Nq gets lse = +inf (P = 0,
// hence dS = 0), a key past Nk gets P = 0 in dq (masked on the last tile); neither is stored.
//
// LAUNCH (block = (128,1,1)); parameters as attention_bwd.cuh:
//   attention_bwd_dkdv_{bf16,f16}{HD}: grid = (ceil(Nk / 64), B*H, 1),
//       dynamic shared memory 2 * (64 + 2 * BM) * (DP + 8 + DVP + 8) + 16 * BM bytes
//   attention_bwd_dq_{bf16,f16}{HD}:   grid = (ceil(Nq / 64), B*H, 1),
//       dynamic shared memory 2 * (64 + 2 * BN) * (DP + 8 + DVP + 8) bytes
//   (README.md lists the byte counts; all above 48 KiB need cudaFuncAttributeMaxDynamicSharedMemorySize.)
//
// STATUS: compiled for sm_80 and sm_90a with NVRTC 13.0 and run under the CPU emulator (cuda/emu); ran
// on an NVIDIA H200 (2026-11-27, scripts/gpu/check.sh, docs/gpu-runs.md): the GPU tests against the f64
// CPU reference and compute-sanitizer memcheck/racecheck pass. Not yet run on an sm_80 (A100) card.

namespace fj_attn_bwd_tc {

using fj_attn_bwd::Bases;
using fj_attn_bwd::Strides;

constexpr int NTHREADS = 128;
constexpr int BK = 64;  // keys per dkdv block
constexpr int BQ = 64;  // queries per dq block

template <int D, int DV>
struct Cfg {
    enum {
        DP = (D + 15) / 16 * 16,
        DVP = (DV + 15) / 16 * 16,
        SS = DP + 8,   // shared row stride of Q and K tiles (16-byte padding: conflict-free ldmatrix)
        SV = DVP + 8,  // of dO and V tiles
        BM = (DP + DVP > 192) ? 32 : 64,          // query tile of dkdv
        BN = (D == 128 || DV == 128) ? 32 : 64,   // key tile of dq
    };
};

// cp.async rows [r0, r0 + R) of a strided [n, C] matrix (row stride rs elements) into a shared tile at
// `dst` (shared address, row stride SR elements); rows >= n are zero-filled. Thread tid moves chunk
// tid % (C/8) of rows tid / (C/8), + RP, + 2 RP, ...; the last 128 - RP*(C/8) threads idle.
template <int C, int R, int SR>
__device__ __forceinline__ void cp_rows(fj_u32 dst, const fj_u16* src, fj_i64 rs, int r0, int n) {
    constexpr int CH = C / 8, RP = NTHREADS / CH;
    const int tid = threadIdx.x;
    if (tid >= RP * CH) return;
    const int r = tid / CH, col = (tid % CH) * 8;
    const fj_u16* p = src + (fj_i64)(r0 + r) * rs + col;
    const fj_i64 step = (fj_i64)RP * rs;
    const fj_u32 d0 = dst + (r * SR + col) * 2;
#pragma unroll
    for (int i = 0; i < (R + RP - 1) / RP; ++i) {
        const int rr = r + i * RP;
        if (rr < R) {
            const bool ok = r0 + rr < n;
            fj_cp_async16(d0 + i * RP * SR * 2, ok ? p : src, ok ? 16 : 0);
        }
        p += step;
    }
}

// Zero columns [C, CP) of `rows` shared rows of stride SR starting at `base`.
template <int C, int CP, int SR>
__device__ __forceinline__ void zero_pad(fj_u16* base, int rows) {
    if (CP > C)
        for (int r = threadIdx.x; r < rows; r += NTHREADS)
#pragma unroll
            for (int c = C; c < CP; ++c) base[r * SR + c] = 0;
}

// ldmatrix lane offsets (elements) inside a row-major tile of row stride S:
//   A operand (rows as m, columns as k), 16 rows from row 0: a0 (r0-7,c0-7), a1 (r8-15,c0-7),
//     a2 (r0-7,c8-15), a3 (r8-15,c8-15); then + kc*16 per k-chunk.
//   B operand, rows as n, columns as k (no transpose): b0,b1 of rows 0-7 then of rows 8-15;
//     + n2*16*S + kc*16.
//   B operand, rows as k, columns as n (.trans): b0,b1 of columns 0-7 then of columns 8-15;
//     + kc*16*S + n2*16.
__device__ __forceinline__ int off_a(int S, int lane) { return ((lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8; }
__device__ __forceinline__ int off_bn(int S, int lane) { return ((lane & 7) + (lane >> 4) * 8) * S + ((lane >> 3) & 1) * 8; }
__device__ __forceinline__ int off_bt(int S, int lane) { return ((lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8; }

// acc[NT][4] (m 16 x n 8*NT) += A(16 x 16*KC, from shared via ldmatrix at a_addr) * B^T where B
// (n rows x k columns) is read without transpose at b_addr (row stride S elements).
template <bool F16, int KC, int NT, int S>
__device__ __forceinline__ void mma_abt(float (&acc)[NT][4], fj_u32 a_addr, fj_u32 b_addr) {
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
        fj_u32 a[4];
        fj_ldmatrix_x4(a, a_addr + kc * 32);
#pragma unroll
        for (int n2 = 0; n2 < NT / 2; ++n2) {
            fj_u32 b[4];
            fj_ldmatrix_x4(b, b_addr + (n2 * 16 * S + kc * 16) * 2);
            fj_mma16816<F16>(acc[2 * n2], a, b[0], b[1]);
            fj_mma16816<F16>(acc[2 * n2 + 1], a, b[2], b[3]);
        }
    }
}

// acc[NT][4] (m 16 x n 8*NT) += X (16 x 16*KC, f32 accumulator tiles rounded to 16 bits as A
// fragments) * B (k rows x n columns, read with ldmatrix.trans at b_addr, row stride S elements).
template <bool F16, int KC, int NT, int S>
__device__ __forceinline__ void mma_xb(float (&acc)[NT][4], const float (&x)[2 * KC][4], fj_u32 b_addr) {
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
        fj_u32 a[4];
        a[0] = fj_pack2<F16>(x[2 * kc][0], x[2 * kc][1]);
        a[1] = fj_pack2<F16>(x[2 * kc][2], x[2 * kc][3]);
        a[2] = fj_pack2<F16>(x[2 * kc + 1][0], x[2 * kc + 1][1]);
        a[3] = fj_pack2<F16>(x[2 * kc + 1][2], x[2 * kc + 1][3]);
#pragma unroll
        for (int n2 = 0; n2 < NT / 2; ++n2) {
            fj_u32 b[4];
            fj_ldmatrix_x4_trans(b, b_addr + (kc * 16 * S + n2 * 16) * 2);
            fj_mma16816<F16>(acc[2 * n2], a, b[0], b[1]);
            fj_mma16816<F16>(acc[2 * n2 + 1], a, b[2], b[3]);
        }
    }
}

// Store a 16 x (8*NT) accumulator (rows row0 + g, row0 + g + 8) times `mul` into a strided [n, C]
// matrix, columns < C only, rows < n only.
template <class ST, int C, int NT>
__device__ __forceinline__ void store_acc(fj_u16* dst, fj_i64 rs, int row0, int n, const float (&acc)[NT][4],
                                          float mul) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = row0 + g + 8 * i;
        if (row >= n) continue;
        fj_u16* p = dst + (fj_i64)row * rs;
#pragma unroll
        for (int t = 0; t < C / 8; ++t) {
            const int col = t * 8 + 2 * t4;
            *reinterpret_cast<fj_u32*>(p + col) =
                (fj_u32)ST::store(acc[t][2 * i] * mul) | ((fj_u32)ST::store(acc[t][2 * i + 1] * mul) << 16);
        }
    }
}

template <class ST, int D, int DV>
__device__ __forceinline__ void dkdv(const fj_u16* __restrict__ q, const fj_u16* __restrict__ k,
                                     const fj_u16* __restrict__ v, const fj_u16* __restrict__ dout,
                                     const float* __restrict__ lse, const float* __restrict__ delta,
                                     fj_u16* __restrict__ dk, fj_u16* __restrict__ dv, int Nq, int Nk, float scale,
                                     int H, const Strides& st) {
    typedef Cfg<D, DV> C;
    constexpr bool F16 = ST::IS_F16;
    constexpr int DP = C::DP, DVP = C::DVP, SS = C::SS, SV = C::SV, BM = C::BM;
    constexpr int QT = BM * SS, OT = BM * SV;  // elements of one Q / dO tile

    FJ_DYN_SMEM(fj_smem);
    fj_u16* sK = reinterpret_cast<fj_u16*>(fj_smem);  // [BK][SS]
    fj_u16* sV = sK + BK * SS;                         // [BK][SV]
    fj_u16* sQ = sV + BK * SV;                         // [2][BM][SS]
    fj_u16* sO = sQ + 2 * QT;                          // [2][BM][SV]
    float* sL = reinterpret_cast<float*>(sO + 2 * OT);  // [2][BM] lse * log2(e) (+inf past Nq)
    float* sD = sL + 2 * BM;                            // [2][BM] delta

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, t4 = lane & 3;
    const int k0 = blockIdx.x * BK;
    const Bases base(st, H, Nq);
    const fj_u16* qb = q + base.q;
    const fj_u16* ob = dout + base.o;
    const float* lb = lse + base.l;
    const float* db = delta + base.l;

    zero_pad<D, DP, SS>(sK, BK);
    zero_pad<D, DP, SS>(sQ, 2 * BM);
    zero_pad<DV, DVP, SV>(sV, BK);
    zero_pad<DV, DVP, SV>(sO, 2 * BM);

    auto load_q = [&](int tile, int stage) {
        const int q0 = tile * BM;
        cp_rows<D, BM, SS>(fj_smem_addr(sQ + stage * QT), qb, st.q_sn, q0, Nq);
        cp_rows<DV, BM, SV>(fj_smem_addr(sO + stage * OT), ob, st.o_sn, q0, Nq);
        if (tid < BM) {
            const int r = q0 + tid;
            sL[stage * BM + tid] = r < Nq ? lb[r] * FJ_LOG2E : FJ_INF;
            sD[stage * BM + tid] = r < Nq ? db[r] : 0.f;
        }
    };
    cp_rows<D, BK, SS>(fj_smem_addr(sK), k + base.k, st.k_sn, k0, Nk);
    cp_rows<DV, BK, SV>(fj_smem_addr(sV), v + base.v, st.v_sn, k0, Nk);
    load_q(0, 0);
    fj_cp_async_commit();

    float acc_k[DP / 8][4], acc_v[DVP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_k[n][e] = 0.f;
#pragma unroll
    for (int n = 0; n < DVP / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_v[n][e] = 0.f;

    const float sl2 = scale * FJ_LOG2E;
    const fj_u32 aK = fj_smem_addr(sK + warp * 16 * SS + off_a(SS, lane));
    const fj_u32 aV = fj_smem_addr(sV + warp * 16 * SV + off_a(SV, lane));
    const fj_u32 bQn = fj_smem_addr(sQ + off_bn(SS, lane)), bQt = fj_smem_addr(sQ + off_bt(SS, lane));
    const fj_u32 bOn = fj_smem_addr(sO + off_bn(SV, lane)), bOt = fj_smem_addr(sO + off_bt(SV, lane));

    const int ntiles = (Nq + BM - 1) / BM;
    for (int j = 0; j < ntiles; ++j) {
        if (j + 1 < ntiles) load_q(j + 1, (j + 1) & 1);
        fj_cp_async_commit();
        fj_cp_async_wait<1>();
        __syncthreads();
        const int stage = j & 1;
        const fj_u32 qo = stage * QT * 2, oo = stage * OT * 2;

        float s[BM / 8][4], dp[BM / 8][4];
#pragma unroll
        for (int n = 0; n < BM / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
        mma_abt<F16, DP / 16, BM / 8, SS>(s, aK, bQn + qo);    // S^T = K Q^T
        mma_abt<F16, DVP / 16, BM / 8, SV>(dp, aV, bOn + oo);  // dP^T = V dO^T

        const float* lt = sL + stage * BM;
        const float* dt = sD + stage * BM;
#pragma unroll
        for (int n = 0; n < BM / 8; ++n) {
            const int col = n * 8 + 2 * t4;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float p = fj_exp2(fmaf(s[n][e], sl2, -lt[col + (e & 1)]));
                dp[n][e] = p * (dp[n][e] - dt[col + (e & 1)]);
                s[n][e] = p;
            }
        }
        mma_xb<F16, BM / 16, DVP / 8, SV>(acc_v, s, bOt + oo);  // dV += P^T dO
        mma_xb<F16, BM / 16, DP / 8, SS>(acc_k, dp, bQt + qo);  // dK += dS^T Q
        __syncthreads();  // stage j & 1 is refilled by the next iteration's prefetch
    }
    fj_cp_async_wait<0>();

    const int row0 = k0 + warp * 16;
    store_acc<ST, D, DP / 8>(dk + base.k, st.k_sn, row0, Nk, acc_k, scale);
    store_acc<ST, DV, DVP / 8>(dv + base.v, st.v_sn, row0, Nk, acc_v, 1.f);
}

template <class ST, int D, int DV>
__device__ __forceinline__ void dq(const fj_u16* __restrict__ q, const fj_u16* __restrict__ k,
                                   const fj_u16* __restrict__ v, const fj_u16* __restrict__ dout,
                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                   fj_u16* __restrict__ dq_out, int Nq, int Nk, float scale, int H,
                                   const Strides& st) {
    typedef Cfg<D, DV> C;
    constexpr bool F16 = ST::IS_F16;
    constexpr int DP = C::DP, DVP = C::DVP, SS = C::SS, SV = C::SV, BN = C::BN;
    constexpr int KT = BN * SS, STAGE = BN * (SS + SV);  // one K tile; one K and V tile pair

    FJ_DYN_SMEM(fj_smem);
    fj_u16* sQ = reinterpret_cast<fj_u16*>(fj_smem);  // [BQ][SS]
    fj_u16* sO = sQ + BQ * SS;                         // [BQ][SV]
    fj_u16* sKV = sO + BQ * SV;                        // [2] x (K [BN][SS], V [BN][SV])

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    const int q0 = blockIdx.x * BQ;
    const Bases base(st, H, Nq);
    const fj_u16* kb = k + base.k;
    const fj_u16* vb = v + base.v;

    zero_pad<D, DP, SS>(sQ, BQ);
    zero_pad<DV, DVP, SV>(sO, BQ);
    zero_pad<D, DP, SS>(sKV, BN);
    zero_pad<D, DP, SS>(sKV + STAGE, BN);
    zero_pad<DV, DVP, SV>(sKV + KT, BN);
    zero_pad<DV, DVP, SV>(sKV + STAGE + KT, BN);

    auto load_kv = [&](int tile, int stage) {
        const int kv0 = tile * BN;
        cp_rows<D, BN, SS>(fj_smem_addr(sKV + stage * STAGE), kb, st.k_sn, kv0, Nk);
        cp_rows<DV, BN, SV>(fj_smem_addr(sKV + stage * STAGE + KT), vb, st.v_sn, kv0, Nk);
    };
    cp_rows<D, BQ, SS>(fj_smem_addr(sQ), q + base.q, st.q_sn, q0, Nq);
    cp_rows<DV, BQ, SV>(fj_smem_addr(sO), dout + base.o, st.o_sn, q0, Nq);
    load_kv(0, 0);
    fj_cp_async_commit();

    // Rows g and g + 8 of this warp's 16: lse * log2(e) (+inf past Nq) and delta.
    float l2[2], dl[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int r = q0 + warp * 16 + g + 8 * i;
        l2[i] = r < Nq ? lse[base.l + r] * FJ_LOG2E : FJ_INF;
        dl[i] = r < Nq ? delta[base.l + r] : 0.f;
    }
    float acc[DP / 8][4];
#pragma unroll
    for (int n = 0; n < DP / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;

    const float sl2 = scale * FJ_LOG2E;
    const fj_u32 aQ = fj_smem_addr(sQ + warp * 16 * SS + off_a(SS, lane));
    const fj_u32 aO = fj_smem_addr(sO + warp * 16 * SV + off_a(SV, lane));
    const fj_u32 bKn = fj_smem_addr(sKV + off_bn(SS, lane)), bKt = fj_smem_addr(sKV + off_bt(SS, lane));
    const fj_u32 bVn = fj_smem_addr(sKV + KT + off_bn(SV, lane));

    const int ntiles = (Nk + BN - 1) / BN;
    for (int j = 0; j < ntiles; ++j) {
        if (j + 1 < ntiles) load_kv(j + 1, (j + 1) & 1);
        fj_cp_async_commit();
        fj_cp_async_wait<1>();
        __syncthreads();
        const fj_u32 so = (j & 1) * STAGE * 2;

        float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.f;
        mma_abt<F16, DP / 16, BN / 8, SS>(s, aQ, bKn + so);    // S = Q K^T
        mma_abt<F16, DVP / 16, BN / 8, SV>(dp, aO, bVn + so);  // dP = dO V^T

        const int kv0 = j * BN;
        const bool tail = kv0 + BN > Nk;
#pragma unroll
        for (int n = 0; n < BN / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float p = fj_exp2(fmaf(s[n][e], sl2, -l2[e >> 1]));
                if (tail && kv0 + n * 8 + 2 * t4 + (e & 1) >= Nk) p = 0.f;
                dp[n][e] = p * (dp[n][e] - dl[e >> 1]);
            }
        mma_xb<F16, BN / 16, DP / 8, SS>(acc, dp, bKt + so);  // dQ += dS K
        __syncthreads();
    }
    fj_cp_async_wait<0>();
    store_acc<ST, D, DP / 8>(dq_out + base.q, st.q_sn, q0 + warp * 16, Nq, acc, scale);
}

}  // namespace fj_attn_bwd_tc
