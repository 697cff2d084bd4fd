// attention_bwd.cuh: backward of the primal attention O = softmax(c Q K^T) V (FlashAttention-2 style,
// P recomputed from the saved log-sum-exp, never stored whole): the kernel templates, instantiated by
// attention_bwd.cu (dv == d) and attention_bwd_dv.cu (dv != d). Include common.cuh before this header.
//
// MATH (per batch*head; c = scale; lse_i saved by the forward, dO the cotangent of O):
//   D_i   = sum_c dO_ic O_ic                       (preprocess kernel)
//   P_ij  = exp(c q_i.k_j - lse_i)
//   dP_ij = dO_i . v_j
//   dS_ij = P_ij (dP_ij - D_i)
//   dQ_i  = c sum_j dS_ij k_j      dK_j = c sum_i dS_ij q_i      dV_j = sum_i P_ij dO_i
// (The softmax Jacobian: dS = P.(dP - rowsum(P.dP)), and rowsum(P.dP) = rowsum(dO.O) = D.)
//
// STRUCTURE: the f32 kernels below (plain f32 FMA, correctness first), deterministic (no atomics); the
// bf16/f16 kernels are the tensor-core templates of attention_bwd_tc.cuh (same names, parameters, math
// and launch order; 64-row blocks, their own tiles and shared memory, described there):
//   1. attention_bwd_preprocess_{dt}: D, one warp per query row.
//   2. attention_bwd_dkdv_{dt}{HD}: a block owns 32 keys (K, V in shared memory, dK and dV in
//      registers) and loops over all query tiles of 32 rows, recomputing P and dS for the 32x32 tile.
//   3. attention_bwd_dq_{dt}{HD}: a block owns 32 queries (Q, dO in shared memory, dQ in registers)
//      and loops over all key tiles, recomputing P and dS. Two passes cost two extra tile products
//      (S and dP are recomputed) but need no f32 atomics, no zeroed buffer and no convert kernel.
// Everything is computed in f32 from the storage values; outputs are rounded once to the storage type.
// Tails: rows >= Nq and keys >= Nk load as 0 and get P = dS = 0; they are never stored.
//
// LAUNCH (block = (128,1,1) everywhere; grids and shared memory of dkdv/dq as given for f32, bf16/f16
// in attention_bwd_tc.cuh; STR = the element strides of q, k, v, o as long long: q_sb, q_sh, q_sn,
// k_sb, ..., o_sn):
//   attention_bwd_preprocess_{dt}(o, dout, delta, rows, dv, Nq, H, o_sb, o_sh, o_sn)
//       grid = (ceil(rows / 4), 1, 1), no dynamic shared memory; rows = B*H*Nq.
//   attention_bwd_dkdv_{dt}{HD}(q, k, v, dout, lse, delta, dk, dv, Nq, Nk, scale, H, STR)
//       grid = (ceil(Nk / 32), B*H, 1)
//   attention_bwd_dq_{dt}{HD}(q, k, v, dout, lse, delta, dq, Nq, Nk, scale, H, STR)
//       grid = (ceil(Nq / 32), B*H, 1)
//   dynamic shared memory for dkdv and dq: 4 * (2 * 32 * (D + 1) + 2 * 32 * (DV + 1) + 2 * 32 * 33 + 64)
//       bytes (dv == d: d32 25600, d64 41984, d72 46080, d96 58368, d128 74752, at most 74752 for any
//       pair; above 48 KiB set cudaFuncAttributeMaxDynamicSharedMemorySize).
// STRIDES: q, k, v, o are each read as [B, H, N, d] views, element (b, h, n, c) at b*sb + h*sh + n*sn + c;
//   block y = b*H + h; dq, dk, dv, dout share the strides of q, k, v, o; lse, delta are contiguous.
// PARAMETERS: (viewed as) q, dq [B,H,Nq,d]; k, dk [B,H,Nk,d]; v, dv [B,H,Nk,dv]; o, dout [B,H,Nq,dv] (storage
//   dtype); lse, delta [B,H,Nq] f32; dt in {bf16, f16, f32}; HD = _d{D} when dv == d, _d{D}_dv{DV}
//   otherwise; D, DV in {32, 64, 72, 96, 128} (every pair).
//
// STATUS: compiled for sm_80 and sm_90a with NVRTC 13.0 (see README.md); ran on an NVIDIA H200
// (2026-11-27, scripts/gpu/check.sh, docs/gpu-runs.md): the GPU tests against the f64 CPU reference and
// compute-sanitizer memcheck/racecheck pass. Not yet run on an sm_80 (A100) card.

namespace fj_attn_bwd {

constexpr int NTHREADS = 128;
constexpr int TB = 32;  // rows per query tile and per key tile

// Preprocess: delta[row] = sum_c dout[row,c] * o[row,c], one warp per row.
// Row `row` of [B,H,Nq] is (bh = row / Nq, i = row % Nq); o and dout are read through o's strides.
template <class ST>
__device__ __forceinline__ void preprocess(const typename ST::T* __restrict__ o, const typename ST::T* __restrict__ dout,
                                           float* __restrict__ delta, int rows, int d, int Nq, int H, fj_i64 o_sb,
                                           fj_i64 o_sh, fj_i64 o_sn) {
    const int row = blockIdx.x * (NTHREADS / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const int bh = row / Nq, i = row - bh * Nq;
    const fj_i64 off = (fj_i64)(bh / H) * o_sb + (fj_i64)(bh % H) * o_sh + (fj_i64)i * o_sn;
    float acc = 0.f;
    for (int c = lane; c < d; c += 32) acc = fmaf(ST::load(dout[off + c]), ST::load(o[off + c]), acc);
    acc = fj_warp_sum(acc);
    if (lane == 0) delta[row] = acc;
}

// Shared-memory layout (f32): A0 (Q) [TB][D+1], A1 (dO) [TB][DV+1], B0 (K) [TB][D+1], B1 (V)
// [TB][DV+1], P, dS [TB][TB+1], lse, delta [TB].
// dkdv: A = (Q, dO) streamed, B = (K, V) resident. dq: A resident, B streamed.
template <int D, int DV>
struct Smem {
    static constexpr int RS = D + 1;    // odd strides: lane-indexed rows are conflict-free
    static constexpr int RSV = DV + 1;
    float* a0; float* a1; float* b0; float* b1; float* p; float* ds; float* lse; float* delta;
    __device__ Smem(float* base) {
        a0 = base; a1 = a0 + TB * RS; b0 = a1 + TB * RSV; b1 = b0 + TB * RS;
        p = b1 + TB * RSV; ds = p + TB * (TB + 1); lse = ds + TB * (TB + 1); delta = lse + TB;
    }
};

// Load rows [r0, r0+TB) of an [n, D] storage matrix with row stride `rs` into a [TB][D+1] f32 tile;
// rows >= n are 0.
template <class ST, int D>
__device__ __forceinline__ void load_tile(float* dst, const typename ST::T* __restrict__ src, int r0, int n, fj_i64 rs) {
    for (int c = threadIdx.x; c < TB * D; c += NTHREADS) {
        const int r = c / D, col = c % D;
        dst[r * (D + 1) + col] = (r0 + r < n) ? ST::load(src[(fj_i64)(r0 + r) * rs + col]) : 0.f;
    }
}

// Element strides of q, k, v and o (each viewed as [B, H, N, d]) and the base offsets of block
// (b, h) = (blockIdx.y / H, blockIdx.y % H); gradients share their primal's strides.
struct Strides {
    fj_i64 q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn;
};
struct Bases {
    fj_i64 q, k, v, o, l;
    __device__ Bases(const Strides& st, int H, int Nq) {
        const int bh = blockIdx.y, b = bh / H, h = bh - b * H;
        q = (fj_i64)b * st.q_sb + (fj_i64)h * st.q_sh;
        k = (fj_i64)b * st.k_sb + (fj_i64)h * st.k_sh;
        v = (fj_i64)b * st.v_sb + (fj_i64)h * st.v_sh;
        o = (fj_i64)b * st.o_sb + (fj_i64)h * st.o_sh;
        l = (fj_i64)bh * Nq;
    }
};

// P and dS of the tile (queries q0.., keys k0..): thread (warp w, lane) does rows w, w+4, ..., key lane.
template <int D, int DV>
__device__ __forceinline__ void tile_p_ds(const Smem<D, DV>& s, int q0, int k0, int Nq, int Nk, float scale) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    constexpr int RS = D + 1, RSV = DV + 1;
#pragma unroll 2
    for (int i = warp; i < TB; i += NTHREADS / 32) {
        const float* qr = s.a0 + i * RS;
        const float* dor = s.a1 + i * RSV;
        const float* kr = s.b0 + lane * RS;
        const float* vr = s.b1 + lane * RSV;
        float sc = 0.f, dp = 0.f;
        if (D == DV) {
#pragma unroll 8
            for (int d = 0; d < D; ++d) {
                sc = fmaf(qr[d], kr[d], sc);
                dp = fmaf(dor[d], vr[d], dp);
            }
        } else {
#pragma unroll 8
            for (int d = 0; d < D; ++d) sc = fmaf(qr[d], kr[d], sc);
#pragma unroll 8
            for (int d = 0; d < DV; ++d) dp = fmaf(dor[d], vr[d], dp);
        }
        float p = 0.f, ds = 0.f;
        if (q0 + i < Nq && k0 + lane < Nk) {
            p = expf(sc * scale - s.lse[i]);
            ds = p * (dp - s.delta[i]);
        }
        s.p[i * (TB + 1) + lane] = p;
        s.ds[i * (TB + 1) + lane] = ds;
    }
}

template <class ST, int D, int DV>
__device__ __forceinline__ void dkdv(const typename ST::T* __restrict__ q, const typename ST::T* __restrict__ k,
                                     const typename ST::T* __restrict__ v, const typename ST::T* __restrict__ dout,
                                     const float* __restrict__ lse, const float* __restrict__ delta,
                                     typename ST::T* __restrict__ dk, typename ST::T* __restrict__ dv, int Nq, int Nk,
                                     float scale, int H, const Strides& st) {
    FJ_DYN_SMEM(fj_smem);
    const Smem<D, DV> s(reinterpret_cast<float*>(fj_smem));
    constexpr int RS = D + 1, RSV = DV + 1;
    constexpr int CPT = D / 4, CPTV = DV / 4;  // columns per thread: warp, warp+4, ...
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int k0 = blockIdx.x * TB;
    const Bases base(st, H, Nq);
    const fj_i64 qoff = base.q, koff = base.k, loff = base.l, ooff = base.o, voff = base.v;

    load_tile<ST, D>(s.b0, k + koff, k0, Nk, st.k_sn);
    load_tile<ST, DV>(s.b1, v + voff, k0, Nk, st.v_sn);
    float acc_k[CPT], acc_v[CPTV];
#pragma unroll
    for (int c = 0; c < CPT; ++c) acc_k[c] = 0.f;
#pragma unroll
    for (int c = 0; c < CPTV; ++c) acc_v[c] = 0.f;

    for (int q0 = 0; q0 < Nq; q0 += TB) {
        __syncthreads();  // previous tile consumed
        load_tile<ST, D>(s.a0, q + qoff, q0, Nq, st.q_sn);
        load_tile<ST, DV>(s.a1, dout + ooff, q0, Nq, st.o_sn);
        if (threadIdx.x < TB) {
            const int r = q0 + threadIdx.x;
            s.lse[threadIdx.x] = r < Nq ? lse[loff + r] : 0.f;
            s.delta[threadIdx.x] = r < Nq ? delta[loff + r] : 0.f;
        }
        __syncthreads();
        tile_p_ds<D, DV>(s, q0, k0, Nq, Nk, scale);
        __syncthreads();
        // dV[lane][c] += sum_i P[i][lane] dO[i][c] ; dK[lane][c] += sum_i dS[i][lane] Q[i][c]
#pragma unroll 2
        for (int i = 0; i < TB; ++i) {
            const float p = s.p[i * (TB + 1) + lane], ds = s.ds[i * (TB + 1) + lane];
#pragma unroll
            for (int c = 0; c < CPTV; ++c) acc_v[c] = fmaf(p, s.a1[i * RSV + warp + 4 * c], acc_v[c]);
#pragma unroll
            for (int c = 0; c < CPT; ++c) acc_k[c] = fmaf(ds, s.a0[i * RS + warp + 4 * c], acc_k[c]);
        }
    }
    const int key = k0 + lane;
    if (key < Nk) {
        const fj_i64 off = koff + (fj_i64)key * st.k_sn, offv = voff + (fj_i64)key * st.v_sn;
#pragma unroll
        for (int c = 0; c < CPT; ++c) dk[off + warp + 4 * c] = ST::store(acc_k[c] * scale);
#pragma unroll
        for (int c = 0; c < CPTV; ++c) dv[offv + warp + 4 * c] = ST::store(acc_v[c]);
    }
}

template <class ST, int D, int DV>
__device__ __forceinline__ void dq(const typename ST::T* __restrict__ q, const typename ST::T* __restrict__ k,
                                   const typename ST::T* __restrict__ v, const typename ST::T* __restrict__ dout,
                                   const float* __restrict__ lse, const float* __restrict__ delta,
                                   typename ST::T* __restrict__ dq_out, int Nq, int Nk, float scale, int H,
                                   const Strides& st) {
    FJ_DYN_SMEM(fj_smem);
    const Smem<D, DV> s(reinterpret_cast<float*>(fj_smem));
    constexpr int RS = D + 1;
    constexpr int CPT = D / 4;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q0 = blockIdx.x * TB;
    const Bases base(st, H, Nq);
    const fj_i64 qoff = base.q, koff = base.k, loff = base.l, ooff = base.o, voff = base.v;

    load_tile<ST, D>(s.a0, q + qoff, q0, Nq, st.q_sn);
    load_tile<ST, DV>(s.a1, dout + ooff, q0, Nq, st.o_sn);
    if (threadIdx.x < TB) {
        const int r = q0 + threadIdx.x;
        s.lse[threadIdx.x] = r < Nq ? lse[loff + r] : 0.f;
        s.delta[threadIdx.x] = r < Nq ? delta[loff + r] : 0.f;
    }
    float acc[CPT];
#pragma unroll
    for (int c = 0; c < CPT; ++c) acc[c] = 0.f;

    for (int k0 = 0; k0 < Nk; k0 += TB) {
        __syncthreads();
        load_tile<ST, D>(s.b0, k + koff, k0, Nk, st.k_sn);
        load_tile<ST, DV>(s.b1, v + voff, k0, Nk, st.v_sn);
        __syncthreads();
        tile_p_ds<D, DV>(s, q0, k0, Nq, Nk, scale);
        __syncthreads();
        // dQ[lane][c] += sum_j dS[lane][j] K[j][c]
#pragma unroll 2
        for (int j = 0; j < TB; ++j) {
            const float ds = s.ds[lane * (TB + 1) + j];
#pragma unroll
            for (int c = 0; c < CPT; ++c) acc[c] = fmaf(ds, s.b0[j * RS + warp + 4 * c], acc[c]);
        }
    }
    const int row = q0 + lane;
    if (row < Nq) {
        const fj_i64 off = qoff + (fj_i64)row * st.q_sn;
#pragma unroll
        for (int c = 0; c < CPT; ++c) dq_out[off + warp + 4 * c] = ST::store(acc[c] * scale);
    }
}

}  // namespace fj_attn_bwd

#define FJ_ATTN_BWD_STRIDES                                                                                   \
    long long q_sb, long long q_sh, long long q_sn, long long k_sb, long long k_sh, long long k_sn,           \
        long long v_sb, long long v_sh, long long v_sn, long long o_sb, long long o_sh, long long o_sn
#define FJ_ATTN_BWD_ST {q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn}

#define FJ_ATTN_BWD_PRE(DT, ST)                                                                               \
    extern "C" __global__ void __launch_bounds__(128)                                                         \
        attention_bwd_preprocess_##DT(const ST::T* o, const ST::T* dout, float* delta, int rows, int d, int Nq, \
                                      int H, long long o_sb, long long o_sh, long long o_sn) {                \
        fj_attn_bwd::preprocess<ST>(o, dout, delta, rows, d, Nq, H, o_sb, o_sh, o_sn);                        \
    }                                                                                                         \
    FJ_REGISTER(attention_bwd_preprocess_##DT)

// dK/dV and dQ of one (dtype, d, dv); SUF is the name's head-dim part (_d64, _d64_dv128); NS the
// implementation: fj_attn_bwd (f32 FMA, here) or fj_attn_bwd_tc (tensor cores, attention_bwd_tc.cuh).
#define FJ_ATTN_BWD(DT, ST, D, DV, SUF, NS)                                                                       \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                      \
        attention_bwd_dkdv_##DT##SUF(const ST::T* q, const ST::T* k, const ST::T* v, const ST::T* dout,       \
                                     const float* lse, const float* delta, ST::T* dk, ST::T* dv, int Nq,      \
                                     int Nk, float scale, int H, FJ_ATTN_BWD_STRIDES) {                       \
        const fj_attn_bwd::Strides st = FJ_ATTN_BWD_ST;                                                       \
        NS::dkdv<ST, D, DV>(q, k, v, dout, lse, delta, dk, dv, Nq, Nk, scale, H, st);                                         \
    }                                                                                                         \
    FJ_REGISTER(attention_bwd_dkdv_##DT##SUF)                                                                 \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                      \
        attention_bwd_dq_##DT##SUF(const ST::T* q, const ST::T* k, const ST::T* v, const ST::T* dout,         \
                                   const float* lse, const float* delta, ST::T* dq, int Nq, int Nk,           \
                                   float scale, int H, FJ_ATTN_BWD_STRIDES) {                                 \
        const fj_attn_bwd::Strides st = FJ_ATTN_BWD_ST;                                                       \
        NS::dq<ST, D, DV>(q, k, v, dout, lse, delta, dq, Nq, Nk, scale, H, st);                                                     \
    }                                                                                                         \
    FJ_REGISTER(attention_bwd_dq_##DT##SUF)
#define FJ_ATTN_BWD_ALL(D, DV, SUF)                                                                          \
    FJ_ATTN_BWD(bf16, FjBF16, D, DV, SUF, fj_attn_bwd_tc) FJ_ATTN_BWD(f16, FjF16, D, DV, SUF, fj_attn_bwd_tc) \
    FJ_ATTN_BWD(f32, FjF32, D, DV, SUF, fj_attn_bwd)
#define FJ_ATTN_BWD_SAME(D) FJ_ATTN_BWD_ALL(D, D, _d##D)
#define FJ_ATTN_BWD_PAIR(D, DV) FJ_ATTN_BWD_ALL(D, DV, _d##D##_dv##DV)
