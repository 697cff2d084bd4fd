// rmsnorm.cu: RMSNorm with a weight over the last axis (the q/k norm of Wan, Flux and SD3), its JVP and
// backward.
//
// MATH (row x of C values, sums in f32):
//   r = 1/sqrt(mean(x^2) + eps),  y = x r w
//   JVP:  y_dot = w (x_dot r - x r^3 mean(x x_dot)) + x r w_dot
//   Backward (cotangent dy):  g = dy w,  dx = g r - x r^3 mean(x g),  dw[c] = sum over rows of dy x r
//
// TILING: one warp per row, 8 rows per block (256 threads). Each lane walks the row in chunks of 16 bytes
// (8 bf16/f16 values, 4 f32), one vector access when C is a multiple of the chunk and every pointer is
// 16-byte aligned, else element by element with the tail masked; the row is read twice (sums, outputs),
// the second time mostly from L1/L2. The weight gradient is a column reduction: a block of 32 columns x 8
// row-lanes sums a slice of the rows in f32 and adds its partial with one f32 atomicAdd per column.
//
// LAUNCH:
//   rms_norm_fwd_{dt}(x, w, y, rrms opt, T, C, eps)
//   rms_norm_jvp_{dt}(x, tx opt, w, tw opt, y opt, ty, rrms opt, T, C, eps)
//   rms_norm_bwd_{dt}(dy, x, w, rrms, dx, T, C)
//       grid = (ceil(T / 8), 1, 1), block = (256, 1, 1), no shared memory.
//   rms_norm_bwd_weight_{dt}(dy, x, rrms, dw, T, C)
//       grid = (ceil(C / 32), S, 1), block = (32, 8, 1): S >= 1 slices of the rows; dw (f32 [C]) must be
//       zeroed before the launch (with S = 1 the result is deterministic).
//   x, tx, y, ty, dy, dx: [T, C] in the storage dtype; w, tw: [C] in the storage dtype; rrms: [T] f32 (the
//   backward needs the forward's); T, C int, eps f32. dt in {bf16, f16, f32}. Optional pointers ("opt")
//   may be null: a zero tangent, or an output not written.
//
// STATUS: written 2026-11-28; compiled for sm_80 and sm_90a with NVRTC 13.0 and run on the CPU emulator
// (cuda/emu) against the f64 CPU reference; not yet run on a GPU.
#include "common.cuh"

namespace fj_rms {

__device__ __forceinline__ bool aligned_or_null(const void* p) { return p == nullptr || fj_aligned16(p); }

template <class ST, bool JVP>
__device__ __forceinline__ void fwd(const typename ST::T* __restrict__ x, const typename ST::T* __restrict__ tx,
                                    const typename ST::T* __restrict__ w, const typename ST::T* __restrict__ tw,
                                    typename ST::T* __restrict__ y, typename ST::T* __restrict__ ty,
                                    float* __restrict__ rrms, int T, int C, float eps) {
    constexpr int V = ST::V;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= T) return;  // warp-uniform
    const bool vec = C % V == 0 && fj_aligned16(x) && fj_aligned16(w) && aligned_or_null(tx) &&
                     aligned_or_null(tw) && aligned_or_null(y) && aligned_or_null(ty);
    const fj_i64 off = (fj_i64)row * C;
    const float inv_c = 1.f / (float)C;
    float ss = 0.f, sxt = 0.f;
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], b[V];
        fj_load_chunk<ST>(x + off, i, C, vec, a);
        if (JVP && tx) fj_load_chunk<ST>(tx + off, i, C, vec, b);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            ss = fmaf(a[e], a[e], ss);
            if (JVP && tx) sxt = fmaf(a[e], b[e], sxt);
        }
    }
    const float r = rsqrtf(fj_warp_sum(ss) * inv_c + eps);
    // r^3 mean(x x_dot): the part of x_dot along x that the normalisation removes.
    const float k = (JVP && tx) ? fj_warp_sum(sxt) * inv_c * r * r * r : 0.f;
    if (lane == 0 && rrms) rrms[row] = r;
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], wv[V], out[V];
        fj_load_chunk<ST>(x + off, i, C, vec, a);
        fj_load_chunk<ST>(w, i, C, vec, wv);
#pragma unroll
        for (int e = 0; e < V; ++e) out[e] = a[e] * r * wv[e];
        if (y) fj_store_chunk<ST>(y + off, i, C, vec, out);
        if (JVP) {
            float t[V];
#pragma unroll
            for (int e = 0; e < V; ++e) t[e] = 0.f;
            if (tx) {
                float b[V];
                fj_load_chunk<ST>(tx + off, i, C, vec, b);
#pragma unroll
                for (int e = 0; e < V; ++e) t[e] = wv[e] * (b[e] * r - a[e] * k);
            }
            if (tw) {
                float c[V];
                fj_load_chunk<ST>(tw, i, C, vec, c);
#pragma unroll
                for (int e = 0; e < V; ++e) t[e] = fmaf(a[e] * r, c[e], t[e]);
            }
            fj_store_chunk<ST>(ty + off, i, C, vec, t);
        }
    }
}

template <class ST>
__device__ __forceinline__ void bwd(const typename ST::T* __restrict__ dy, const typename ST::T* __restrict__ x,
                                    const typename ST::T* __restrict__ w, const float* __restrict__ rrms,
                                    typename ST::T* __restrict__ dx, int T, int C) {
    constexpr int V = ST::V;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= T) return;  // warp-uniform
    const bool vec = C % V == 0 && fj_aligned16(dy) && fj_aligned16(x) && fj_aligned16(w) && fj_aligned16(dx);
    const fj_i64 off = (fj_i64)row * C;
    float sgx = 0.f;
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], g[V], wv[V];
        fj_load_chunk<ST>(x + off, i, C, vec, a);
        fj_load_chunk<ST>(dy + off, i, C, vec, g);
        fj_load_chunk<ST>(w, i, C, vec, wv);
#pragma unroll
        for (int e = 0; e < V; ++e) sgx = fmaf(a[e], g[e] * wv[e], sgx);
    }
    const float r = rrms[row];
    const float k = fj_warp_sum(sgx) / (float)C * r * r * r;
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], g[V], wv[V], out[V];
        fj_load_chunk<ST>(x + off, i, C, vec, a);
        fj_load_chunk<ST>(dy + off, i, C, vec, g);
        fj_load_chunk<ST>(w, i, C, vec, wv);
#pragma unroll
        for (int e = 0; e < V; ++e) out[e] = g[e] * wv[e] * r - a[e] * k;
        fj_store_chunk<ST>(dx + off, i, C, vec, out);
    }
}

// dw[c] += sum of dy x r over this block's slice of the rows.
template <class ST>
__device__ __forceinline__ void bwd_weight(const typename ST::T* __restrict__ dy, const typename ST::T* __restrict__ x,
                                           const float* __restrict__ rrms, float* __restrict__ dw, int T, int C) {
    __shared__ float red[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * 32 + tx;
    const int slices = gridDim.y;
    const int chunk = (T + slices - 1) / slices;
    const int r_begin = blockIdx.y * chunk;
    const int r_end = min(r_begin + chunk, T);
    float acc = 0.f;
    if (col < C) {
        for (int r = r_begin + ty; r < r_end; r += 8) {
            const fj_i64 i = (fj_i64)r * C + col;
            acc = fmaf(ST::load(dy[i]), ST::load(x[i]) * rrms[r], acc);
        }
    }
    red[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && col < C) {
#pragma unroll
        for (int k = 1; k < 8; ++k) acc += red[k][tx];
        atomicAdd(dw + col, acc);
    }
}

}  // namespace fj_rms

#define FJ_RMS(DT, ST)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        rms_norm_fwd_##DT(const ST::T* x, const ST::T* w, ST::T* y, float* rrms, int T, int C, float eps) {    \
        fj_rms::fwd<ST, false>(x, nullptr, w, nullptr, y, nullptr, rrms, T, C, eps);                          \
    }                                                                                                          \
    FJ_REGISTER(rms_norm_fwd_##DT)                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        rms_norm_jvp_##DT(const ST::T* x, const ST::T* tx, const ST::T* w, const ST::T* tw, ST::T* y,          \
                          ST::T* ty, float* rrms, int T, int C, float eps) {                                   \
        fj_rms::fwd<ST, true>(x, tx, w, tw, y, ty, rrms, T, C, eps);                                           \
    }                                                                                                          \
    FJ_REGISTER(rms_norm_jvp_##DT)                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        rms_norm_bwd_##DT(const ST::T* dy, const ST::T* x, const ST::T* w, const float* rrms, ST::T* dx,       \
                          int T, int C) {                                                                      \
        fj_rms::bwd<ST>(dy, x, w, rrms, dx, T, C);                                                             \
    }                                                                                                          \
    FJ_REGISTER(rms_norm_bwd_##DT)                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        rms_norm_bwd_weight_##DT(const ST::T* dy, const ST::T* x, const float* rrms, float* dw, int T,         \
                                 int C) {                                                                      \
        fj_rms::bwd_weight<ST>(dy, x, rrms, dw, T, C);                                                         \
    }                                                                                                          \
    FJ_REGISTER(rms_norm_bwd_weight_##DT)

FJ_FOR_EACH_DTYPE(FJ_RMS)
