// layernorm_mod.cu: layernorm without affine, followed by adaLN modulation, with its JVP and backward.
//
// MATH (row x of C values, statistics in f32, eps added to the variance):
//   mu = mean(x), var = mean((x - mu)^2), rstd = 1/sqrt(var + eps), xhat = (x - mu) rstd
//   y = xhat (1 + scale) + shift
//   JVP:  xhat_dot = (x_dot - mean(x_dot) - xhat mean(xhat x_dot)) rstd
//         y_dot = xhat_dot (1 + scale) + xhat scale_dot + shift_dot
//   Backward (cotangent dy):  g = dy (1 + scale)
//         dx = (g - mean(g) - xhat mean(g xhat)) rstd      (the Jacobian of xhat is symmetric)
//         dscale[grp, c] = sum over the rows of the group of dy xhat ;  dshift[grp, c] = sum of dy
// Variance is taken two-pass (mean first, then squared deviations), not as E[x^2] - mu^2.
//
// GROUPS: scale, shift and their tangents are f32 [G, C] (the time path is f32, DESIGN.md section 4);
// G divides T and row t uses group t / (T / G): G = 1 is one vector for all rows, G = T one per row,
// G = batch for [B, N, C] activations. Any of scale, shift, x_dot, scale_dot, shift_dot may be null,
// meaning zero; mean and rstd outputs may be null (not written).
//
// TILING: one warp per row, 8 rows per block of 256 threads. Each lane walks the row in chunks of 16
// bytes (8 bf16/f16 values, 4 f32); when C is a multiple of the chunk and every row pointer is 16-byte
// aligned the chunk is one vector access, otherwise element by element with the tail masked. The row is
// read three times (sum, squared deviations, output): the second and third reads mostly hit L1/L2.
// The parameter gradients are a column reduction: a block of 32 columns x 8 row-lanes sums a slice of the
// rows of one group in f32, then adds its partial with one f32 atomicAdd per column.
//
// LAUNCH:
//   layernorm_mod_fwd_{dt}(x, scale, shift, y, mean, rstd, T, C, G, eps)
//   layernorm_mod_jvp_{dt}(x, tx, scale, shift, tscale, tshift, y, ty, mean, rstd, T, C, G, eps)
//   layernorm_mod_bwd_{dt}(dy, x, scale, mean, rstd, dx, T, C, G)
//       grid = (ceil(T / 8), 1, 1), block = (256, 1, 1), no shared memory.
//   layernorm_mod_bwd_params_{dt}(dy, x, mean, rstd, dscale, dshift, T, C, G)
//       grid = (ceil(C / 32), G, S), block = (32, 8, 1), no dynamic shared memory.
//       S >= 1 splits the T/G rows of each group into S slices (S = ceil((T/G) / 256) keeps every SM
//       busy); dscale and dshift (f32 [G, C], either may be null) must be zeroed before the launch, each
//       block adds its partial sums with atomicAdd (with S = 1 the result is deterministic).
//   x, y, tx, ty, dy, dx: [T, C] in the storage dtype; mean, rstd: [T] f32 (the backward needs the
//   forward's); T, C, G int, eps f32. dt in {bf16, f16, f32}.
//
// STATUS: compiled for sm_80 and sm_90a with NVRTC 13.0 (see README.md); not yet run on a GPU, since none
// was available while writing it.
#include "common.cuh"

namespace fj_ln {

constexpr int ROWS_PER_BLOCK = 8;

template <class ST>
__device__ __forceinline__ bool vec_ok(int C, const void* a, const void* b, const void* c, const void* d,
                                       const void* e, const void* f, const void* g, const void* h) {
    // f32 modulation rows need 16-byte alignment too: C % 8 == 0 (16-bit) or C % 4 == 0 (f32) keeps
    // every row start aligned when the base is.
    return (C % ST::V) == 0 && fj_aligned16(a) && fj_aligned16(b) && fj_aligned16(c) && fj_aligned16(d) &&
           fj_aligned16(e) && fj_aligned16(f) && fj_aligned16(g) && fj_aligned16(h);
}

template <int V>
__device__ __forceinline__ void load_mod(const float* row, int i, int C, bool vec, float (&out)[V]) {
    if (row) fj_load_chunk_f32<V>(row, i, C, vec, out);
    else {
#pragma unroll
        for (int e = 0; e < V; ++e) out[e] = 0.f;
    }
}

// Forward and JVP in one body; JVP = true also computes the tangent.
template <class ST, bool JVP>
__device__ __forceinline__ void fwd(const typename ST::T* __restrict__ x, const typename ST::T* __restrict__ tx,
                                    const float* __restrict__ scale, const float* __restrict__ shift,
                                    const float* __restrict__ tscale, const float* __restrict__ tshift,
                                    typename ST::T* __restrict__ y, typename ST::T* __restrict__ ty,
                                    float* __restrict__ mean_out, float* __restrict__ rstd_out, int T, int C, int G,
                                    float eps) {
    constexpr int V = ST::V;
    const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= T) return;
    const int grp = row / (T / G);
    const fj_i64 off = (fj_i64)row * C, goff = (fj_i64)grp * C;
    const typename ST::T* xr = x + off;
    const typename ST::T* txr = (JVP && tx) ? tx + off : nullptr;
    const float* sr = scale ? scale + goff : nullptr;
    const float* hr = shift ? shift + goff : nullptr;
    const float* tsr = (JVP && tscale) ? tscale + goff : nullptr;
    const float* thr = (JVP && tshift) ? tshift + goff : nullptr;
    typename ST::T* yr = y + off;
    typename ST::T* tyr = JVP ? ty + off : nullptr;
    const bool vec = vec_ok<ST>(C, xr, txr, sr, hr, tsr, thr, yr, tyr);

    // pass 1: sums of x and x_dot
    float sx = 0.f, stx = 0.f;
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V];
        fj_load_chunk<ST>(xr, i, C, vec, a);
#pragma unroll
        for (int e = 0; e < V; ++e) sx += a[e];  // masked elements load as 0
        if (JVP && txr) {
            fj_load_chunk<ST>(txr, i, C, vec, a);
#pragma unroll
            for (int e = 0; e < V; ++e) stx += a[e];
        }
    }
    const float inv_c = 1.f / (float)C;
    const float mu = fj_warp_sum(sx) * inv_c;
    const float mu_t = JVP ? fj_warp_sum(stx) * inv_c : 0.f;

    // pass 2: squared deviations, and deviations times x_dot
    float sv = 0.f, sxt = 0.f;
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], b[V];
        fj_load_chunk<ST>(xr, i, C, vec, a);
        if (JVP && txr) fj_load_chunk<ST>(txr, i, C, vec, b);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const float dev = (i + e < C) ? a[e] - mu : 0.f;
            sv = fmaf(dev, dev, sv);
            if (JVP && txr) sxt = fmaf(dev, b[e], sxt);
        }
    }
    const float rstd = rsqrtf(fj_warp_sum(sv) * inv_c + eps);
    const float mean_xhat_t = JVP ? fj_warp_sum(sxt) * inv_c * rstd : 0.f;  // mean(xhat x_dot)
    if (lane == 0) {
        if (mean_out) mean_out[row] = mu;
        if (rstd_out) rstd_out[row] = rstd;
    }

    // pass 3: outputs
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], s[V], h[V], o[V];
        fj_load_chunk<ST>(xr, i, C, vec, a);
        load_mod<V>(sr, i, C, vec, s);
        load_mod<V>(hr, i, C, vec, h);
#pragma unroll
        for (int e = 0; e < V; ++e) o[e] = (a[e] - mu) * rstd * (1.f + s[e]) + h[e];
        fj_store_chunk<ST>(yr, i, C, vec, o);
        if (JVP) {
            float b[V], ts[V], th[V];
            if (txr) fj_load_chunk<ST>(txr, i, C, vec, b);
            else {
#pragma unroll
                for (int e = 0; e < V; ++e) b[e] = 0.f;
            }
            load_mod<V>(tsr, i, C, vec, ts);
            load_mod<V>(thr, i, C, vec, th);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const float xh = (a[e] - mu) * rstd;
                const float xh_t = (b[e] - mu_t - xh * mean_xhat_t) * rstd;
                o[e] = xh_t * (1.f + s[e]) + xh * ts[e] + th[e];
            }
            fj_store_chunk<ST>(tyr, i, C, vec, o);
        }
    }
}

template <class ST>
__device__ __forceinline__ void bwd(const typename ST::T* __restrict__ dy, const typename ST::T* __restrict__ x,
                                    const float* __restrict__ scale, const float* __restrict__ mean,
                                    const float* __restrict__ rstd, typename ST::T* __restrict__ dx, int T, int C,
                                    int G) {
    constexpr int V = ST::V;
    const int row = blockIdx.x * ROWS_PER_BLOCK + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= T) return;
    const int grp = row / (T / G);
    const fj_i64 off = (fj_i64)row * C;
    const typename ST::T* dyr = dy + off;
    const typename ST::T* xr = x + off;
    const float* sr = scale ? scale + (fj_i64)grp * C : nullptr;
    typename ST::T* dxr = dx + off;
    const bool vec = vec_ok<ST>(C, dyr, xr, sr, dxr, nullptr, nullptr, nullptr, nullptr);
    const float mu = mean[row], rs = rstd[row];

    // pass 1: sums of g = dy (1 + scale) and of g xhat (masked elements: dy loads as 0, so g = 0)
    float sg = 0.f, sgx = 0.f;
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], b[V], s[V];
        fj_load_chunk<ST>(dyr, i, C, vec, a);
        fj_load_chunk<ST>(xr, i, C, vec, b);
        load_mod<V>(sr, i, C, vec, s);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const float gg = a[e] * (1.f + s[e]);
            sg += gg;
            sgx = fmaf(gg, (b[e] - mu) * rs, sgx);
        }
    }
    const float inv_c = 1.f / (float)C;
    const float mean_g = fj_warp_sum(sg) * inv_c;
    const float mean_gx = fj_warp_sum(sgx) * inv_c;

    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], b[V], s[V], o[V];
        fj_load_chunk<ST>(dyr, i, C, vec, a);
        fj_load_chunk<ST>(xr, i, C, vec, b);
        load_mod<V>(sr, i, C, vec, s);
#pragma unroll
        for (int e = 0; e < V; ++e) o[e] = (a[e] * (1.f + s[e]) - mean_g - (b[e] - mu) * rs * mean_gx) * rs;
        fj_store_chunk<ST>(dxr, i, C, vec, o);
    }
}

// dscale[grp, c] += sum dy xhat, dshift[grp, c] += sum dy over this block's slice of the group's rows.
template <class ST>
__device__ __forceinline__ void bwd_params(const typename ST::T* __restrict__ dy, const typename ST::T* __restrict__ x,
                                           const float* __restrict__ mean, const float* __restrict__ rstd,
                                           float* __restrict__ dscale, float* __restrict__ dshift, int T, int C,
                                           int G) {
    __shared__ float red_s[8][33], red_h[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * 32 + tx;
    const int grp = blockIdx.y;
    const int R = T / G;
    const int slices = gridDim.z;
    const int chunk = (R + slices - 1) / slices;
    const int r_begin = grp * R + blockIdx.z * chunk;
    const int r_end = min(r_begin + chunk, (grp + 1) * R);
    float as = 0.f, ah = 0.f;
    if (col < C) {
        for (int r = r_begin + ty; r < r_end; r += 8) {
            const fj_i64 i = (fj_i64)r * C + col;
            const float g = ST::load(dy[i]);
            as = fmaf(g, (ST::load(x[i]) - mean[r]) * rstd[r], as);
            ah += g;
        }
    }
    red_s[ty][tx] = as;
    red_h[ty][tx] = ah;
    __syncthreads();
    if (ty == 0 && col < C) {
#pragma unroll
        for (int k = 1; k < 8; ++k) {
            as += red_s[k][tx];
            ah += red_h[k][tx];
        }
        if (dscale) atomicAdd(dscale + (fj_i64)grp * C + col, as);
        if (dshift) atomicAdd(dshift + (fj_i64)grp * C + col, ah);
    }
}

}  // namespace fj_ln

#define FJ_LN(DT, ST)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        layernorm_mod_fwd_##DT(const ST::T* x, const float* scale, const float* shift, ST::T* y, float* mean,  \
                               float* rstd, int T, int C, int G, float eps) {                                  \
        fj_ln::fwd<ST, false>(x, nullptr, scale, shift, nullptr, nullptr, y, nullptr, mean, rstd, T, C, G,     \
                              eps);                                                                            \
    }                                                                                                          \
    FJ_REGISTER(layernorm_mod_fwd_##DT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        layernorm_mod_jvp_##DT(const ST::T* x, const ST::T* tx, const float* scale, const float* shift,        \
                               const float* tscale, const float* tshift, ST::T* y, ST::T* ty, float* mean,     \
                               float* rstd, int T, int C, int G, float eps) {                                  \
        fj_ln::fwd<ST, true>(x, tx, scale, shift, tscale, tshift, y, ty, mean, rstd, T, C, G, eps);            \
    }                                                                                                          \
    FJ_REGISTER(layernorm_mod_jvp_##DT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        layernorm_mod_bwd_##DT(const ST::T* dy, const ST::T* x, const float* scale, const float* mean,         \
                               const float* rstd, ST::T* dx, int T, int C, int G) {                            \
        fj_ln::bwd<ST>(dy, x, scale, mean, rstd, dx, T, C, G);                                                 \
    }                                                                                                          \
    FJ_REGISTER(layernorm_mod_bwd_##DT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        layernorm_mod_bwd_params_##DT(const ST::T* dy, const ST::T* x, const float* mean, const float* rstd,   \
                                      float* dscale, float* dshift, int T, int C, int G) {                     \
        fj_ln::bwd_params<ST>(dy, x, mean, rstd, dscale, dshift, T, C, G);                                     \
    }                                                                                                          \
    FJ_REGISTER(layernorm_mod_bwd_params_##DT)
FJ_FOR_EACH_DTYPE(FJ_LN)
