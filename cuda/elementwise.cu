// elementwise.cu: pointwise ops with their JVPs and backwards: SiLU, GELU (tanh form) and the MLP
// epilogues, the gated residual, the sinusoidal timestep embedding, and dtype casts.
//
// MATH
//   SiLU   y = u sig(u),  sig(u) = 1/(1+exp(-u));  y' = sig(u) (1 + u (1 - sig(u)))
//   GELU   y = u/2 (1 + th), th = tanh(z), z = a (u + 0.044715 u^3), a = sqrt(2/pi)
//          y' = (1 + th)/2 + u/2 (1 - th^2) a (1 + 3 * 0.044715 u^2)
//   JVP: y_dot = y'(u) u_dot.  Backward: du = y'(u) dy.
//   gelu_tangent: y_dot = gelu'(pre) u_dot (what the tangent GEMM's DGELU epilogue computes; run after
//          a plain GEMM where cuBLASLt has no algorithm with that epilogue).
//   Gated residual out = x + g y, gate g f32 [G, C], row t of [T, C] uses group t / (T / G):
//          out_dot = x_dot + g_dot y + g y_dot;  backward dx = dout, dy = g dout,
//          dgate[grp, c] = sum over the group's rows of dout y.
//   Timestep embedding (f32, the time path): half = dim / 2, w_i = exp(-ln(max_period) i / half),
//          e[n, i] = cos(w_i t_n), e[n, half + i] = sin(w_i t_n) for i < half (a last odd column is 0);
//          JVP: e_dot[n, i] = -w_i sin(w_i t_n) t_dot_n, e_dot[n, half + i] = w_i cos(w_i t_n) t_dot_n.
//   Casts: f32 -> bf16/f16 round to nearest even; bf16/f16 -> f32 exact.
//
// LAUNCH: all pointwise kernels are grid-stride loops over their elements, the activations' and the
// gated residual's (except gated_residual_bwd_gate) over 16-byte chunks of V = 16 / element size values
// (n = ceil(count / V) for the grid; of rows for the residual: n = T * ceil(C / V)):
// block = (256, 1, 1), grid = (min(ceil(n / 256), 65535 * 16), 1, 1) or any smaller grid; no shared memory. Counts n are 64-bit
// (long long); rows/cols/T/C/G int. Pointers of pointwise kernels may alias element for element
// (in place is fine). Optional pointers (may be null = zero / not written) are marked "opt".
//   silu_fwd_{dt}(u, y, n)                       silu_jvp_{dt}(u, tu, y opt, ty, n)
//   silu_bwd_{dt}(u, dy, du, n)
//   gelu_fwd_{dt}(u, y, n)                       gelu_jvp_{dt}(u, tu, y opt, ty, n)
//   gelu_bwd_{dt}(u, dy, du, n)                  gelu_tangent_{dt}(pre, tu, ty, n)
//   gated_residual_fwd_{dt}(x, y, gate, out, T, C, G)
//   gated_residual_jvp_{dt}(x, tx opt, y, ty opt, gate, tgate opt, out opt, tout, T, C, G)
//   gated_residual_bwd_{dt}(dout, gate, dx opt, dy, T, C, G)
//   gated_residual_bwd_gate_{dt}(dout, y, dgate, T, C, G)
//       grid = (ceil(C / 32), G, S), block = (32, 8, 1): a block sums a slice (S slices per group) of the
//       group's rows for 32 columns in f32 and atomicAdds into dgate (f32 [G, C], zeroed by the caller;
//       S = 1 is deterministic).
//   timestep_embedding_f32(t, e, N, dim, max_period)                 t [N], e [N, dim]
//   timestep_embedding_jvp_f32(t, tt, e opt, te, N, dim, max_period) (n = N * dim for the grid)
//   cast_f32_bf16(x, y, n)  cast_bf16_f32(x, y, n)  cast_f32_f16(x, y, n)  cast_f16_f32(x, y, n)
//   dt in {bf16, f16, f32}: u, y, h, pre, x, out, dout, dx, dy and bias have the storage dtype;
//   gate, tgate, dgate, t, tt, e, te are f32.
//
// STATUS: compiled for sm_80 and sm_90a with NVRTC 13.0 (see README.md); ran on an NVIDIA H200
// (2026-11-27, scripts/gpu/check.sh, docs/gpu-runs.md): the GPU tests against the f64 CPU reference and
// compute-sanitizer memcheck/racecheck pass. Not yet run on an sm_80 (A100) card.
#include "common.cuh"

#define FJ_GRID_STRIDE(i, n) \
    for (fj_i64 i = (fj_i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (fj_i64)gridDim.x * blockDim.x)

namespace fj_ew {

__device__ __forceinline__ float sigmoid(float u) { return 1.f / (1.f + expf(-u)); }
__device__ __forceinline__ float silu(float u) { return u * sigmoid(u); }
__device__ __forceinline__ float silu_grad(float u) {
    const float s = sigmoid(u);
    return s * (1.f + u * (1.f - s));
}

constexpr float GELU_A = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float GELU_B = 0.044715f;
__device__ __forceinline__ float gelu(float u) {
    return 0.5f * u * (1.f + tanhf(GELU_A * (u + GELU_B * u * u * u)));
}
__device__ __forceinline__ float gelu_grad(float u) {
    const float th = tanhf(GELU_A * (u + GELU_B * u * u * u));
    return 0.5f * (1.f + th) + 0.5f * u * (1.f - th * th) * GELU_A * (1.f + 3.f * GELU_B * u * u);
}
// Both at once (the tanh is shared).
__device__ __forceinline__ void gelu_and_grad(float u, float& y, float& dy) {
    const float th = tanhf(GELU_A * (u + GELU_B * u * u * u));
    y = 0.5f * u * (1.f + th);
    dy = 0.5f * (1.f + th) + 0.5f * u * (1.f - th * th) * GELU_A * (1.f + 3.f * GELU_B * u * u);
}

// Row-grouped gate index: element i of a [T, C] tensor -> offset into the [G, C] gate.
__device__ __forceinline__ fj_i64 gate_index(fj_i64 i, int T, int C, int G) {
    const fj_i64 row = i / C;
    const int col = (int)(i - row * C);
    const int grp = (int)(row / (T / G));
    return (fj_i64)grp * C + col;
}

// The activations walk their n elements in 16-byte chunks (V = 8 values in 16 bits, 4 in f32): one
// vector access per tensor per chunk when n % V == 0 and every pointer is 16-byte aligned, else element
// by element with the tail masked; f(i0, m, vec) handles elements [i0, i0 + m), m = min(V, n - i0).
template <class ST, class F>
__device__ __forceinline__ void for_each_chunk(fj_i64 n, bool vec, F f) {
    FJ_GRID_STRIDE(k, (n + ST::V - 1) / ST::V) {
        const fj_i64 i0 = k * ST::V;
        const fj_i64 left = n - i0;
        f(i0, left < ST::V ? (int)left : ST::V, vec);
    }
}

// y = act(u) (ACT 0: SiLU, 1: GELU).
template <class ST, int ACT>
__device__ __forceinline__ float act_fwd(float u) {
    return ACT == 0 ? silu(u) : gelu(u);
}
template <class ST, int ACT>
__device__ __forceinline__ float act_grad(float u) {
    return ACT == 0 ? silu_grad(u) : gelu_grad(u);
}

template <class ST, int ACT>
__device__ __forceinline__ void activation_fwd(const typename ST::T* u, typename ST::T* y, fj_i64 n) {
    constexpr int V = ST::V;
    const bool vec = n % V == 0 && fj_aligned16(u) && fj_aligned16(y);
    for_each_chunk<ST>(n, vec, [&](fj_i64 i0, int m, bool v) {
        float a[V];
        fj_load_chunk<ST>(u + i0, 0, m, v, a);
#pragma unroll
        for (int e = 0; e < V; ++e) a[e] = act_fwd<ST, ACT>(a[e]);
        fj_store_chunk<ST>(y + i0, 0, m, v, a);
    });
}

// y (if non-null) and ty = act'(u) tu.
template <class ST, int ACT>
__device__ __forceinline__ void activation_jvp(const typename ST::T* u, const typename ST::T* tu, typename ST::T* y,
                                               typename ST::T* ty, fj_i64 n) {
    constexpr int V = ST::V;
    const bool vec = n % V == 0 && fj_aligned16(u) && fj_aligned16(tu) && fj_aligned16(y) && fj_aligned16(ty);
    for_each_chunk<ST>(n, vec, [&](fj_i64 i0, int m, bool v) {
        float a[V], t[V], o[V];
        fj_load_chunk<ST>(u + i0, 0, m, v, a);
        fj_load_chunk<ST>(tu + i0, 0, m, v, t);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            if (ACT == 1) {
                float g, dg;
                gelu_and_grad(a[e], g, dg);
                o[e] = g;
                t[e] = dg * t[e];
            } else {
                o[e] = silu(a[e]);
                t[e] = silu_grad(a[e]) * t[e];
            }
        }
        if (y) fj_store_chunk<ST>(y + i0, 0, m, v, o);
        fj_store_chunk<ST>(ty + i0, 0, m, v, t);
    });
}

// du = act'(u) dy (also gelu_tangent: ty = gelu'(pre) tu, the same contract).
template <class ST, int ACT>
__device__ __forceinline__ void activation_bwd(const typename ST::T* u, const typename ST::T* dy, typename ST::T* du,
                                               fj_i64 n) {
    constexpr int V = ST::V;
    const bool vec = n % V == 0 && fj_aligned16(u) && fj_aligned16(dy) && fj_aligned16(du);
    for_each_chunk<ST>(n, vec, [&](fj_i64 i0, int m, bool v) {
        float a[V], d[V];
        fj_load_chunk<ST>(u + i0, 0, m, v, a);
        fj_load_chunk<ST>(dy + i0, 0, m, v, d);
#pragma unroll
        for (int e = 0; e < V; ++e) d[e] = act_grad<ST, ACT>(a[e]) * d[e];
        fj_store_chunk<ST>(du + i0, 0, m, v, d);
    });
}

// The gated residual's kernels walk their [T, C] tensors in 16-byte chunks of a row (V = 8 values in
// 16 bits, 4 in f32): one vector access per tensor per chunk when C % V == 0 and every base is 16-byte
// aligned (so is every row), else element by element with the row's tail masked. One 64-bit division per
// chunk finds the row (one element per thread with two divisions each ran at 0.57 TB/s on an H200). The
// arithmetic per element is the element-wise kernels' it replaced, so the results are the same.
template <class ST, class F>
__device__ __forceinline__ void for_each_row_chunk(int T, int C, F f) {
    const fj_i64 cpr = (C + ST::V - 1) / ST::V;  // chunks per row
    FJ_GRID_STRIDE(k, (fj_i64)T * cpr) {
        const fj_i64 row = k / cpr;
        f(row, (int)(k - row * cpr) * ST::V);
    }
}

template <class ST>
__device__ __forceinline__ void residual_fwd(const typename ST::T* __restrict__ x, const typename ST::T* __restrict__ y,
                                             const float* __restrict__ gate, typename ST::T* out, int T, int C,
                                             int G) {
    constexpr int V = ST::V;
    const bool vec = C % V == 0 && fj_aligned16(x) && fj_aligned16(y) && fj_aligned16(gate) && fj_aligned16(out);
    for_each_row_chunk<ST>(T, C, [&](fj_i64 row, int c0) {
        const fj_i64 off = row * C, goff = (fj_i64)(row / (T / G)) * C;
        float a[V], b[V], g[V], o[V];
        fj_load_chunk<ST>(x + off, c0, C, vec, a);
        fj_load_chunk<ST>(y + off, c0, C, vec, b);
        fj_load_chunk_f32<V>(gate + goff, c0, C, vec, g);
#pragma unroll
        for (int e = 0; e < V; ++e) o[e] = a[e] + g[e] * b[e];
        fj_store_chunk<ST>(out + off, c0, C, vec, o);
    });
}

template <class ST>
__device__ __forceinline__ void residual_jvp(const typename ST::T* x, const typename ST::T* tx, const typename ST::T* y,
                                             const typename ST::T* ty, const float* gate, const float* tgate,
                                             typename ST::T* out, typename ST::T* tout, int T, int C, int G) {
    constexpr int V = ST::V;
    const bool vec = C % V == 0 && fj_aligned16(x) && fj_aligned16(tx) && fj_aligned16(y) && fj_aligned16(ty) &&
                     fj_aligned16(gate) && fj_aligned16(tgate) && fj_aligned16(out) && fj_aligned16(tout);
    for_each_row_chunk<ST>(T, C, [&](fj_i64 row, int c0) {
        const fj_i64 off = row * C, goff = (fj_i64)(row / (T / G)) * C;
        float g[V], b[V], t[V], u[V];
        fj_load_chunk_f32<V>(gate + goff, c0, C, vec, g);
        fj_load_chunk<ST>(y + off, c0, C, vec, b);
        if (out) {
            float a[V];
            fj_load_chunk<ST>(x + off, c0, C, vec, a);
#pragma unroll
            for (int e = 0; e < V; ++e) a[e] = a[e] + g[e] * b[e];
            fj_store_chunk<ST>(out + off, c0, C, vec, a);
        }
        if (tx) fj_load_chunk<ST>(tx + off, c0, C, vec, t);
        else {
#pragma unroll
            for (int e = 0; e < V; ++e) t[e] = 0.f;
        }
        if (tgate) {
            fj_load_chunk_f32<V>(tgate + goff, c0, C, vec, u);
#pragma unroll
            for (int e = 0; e < V; ++e) t[e] = fmaf(u[e], b[e], t[e]);
        }
        if (ty) {
            fj_load_chunk<ST>(ty + off, c0, C, vec, u);
#pragma unroll
            for (int e = 0; e < V; ++e) t[e] = fmaf(g[e], u[e], t[e]);
        }
        fj_store_chunk<ST>(tout + off, c0, C, vec, t);
    });
}

template <class ST>
__device__ __forceinline__ void residual_bwd(const typename ST::T* dout, const float* gate, typename ST::T* dx,
                                             typename ST::T* dy, int T, int C, int G) {
    constexpr int V = ST::V;
    const bool vec = C % V == 0 && fj_aligned16(dout) && fj_aligned16(gate) && fj_aligned16(dx) && fj_aligned16(dy);
    for_each_row_chunk<ST>(T, C, [&](fj_i64 row, int c0) {
        const fj_i64 off = row * C, goff = (fj_i64)(row / (T / G)) * C;
        if (dx) {  // the bits of dout, unconverted
            if (vec) *reinterpret_cast<uint4*>(dx + off + c0) = *reinterpret_cast<const uint4*>(dout + off + c0);
            else
                for (int e = 0; e < V && c0 + e < C; ++e) dx[off + c0 + e] = dout[off + c0 + e];
        }
        float d[V], g[V];
        fj_load_chunk<ST>(dout + off, c0, C, vec, d);
        fj_load_chunk_f32<V>(gate + goff, c0, C, vec, g);
#pragma unroll
        for (int e = 0; e < V; ++e) d[e] = g[e] * d[e];
        fj_store_chunk<ST>(dy + off, c0, C, vec, d);
    });
}

}  // namespace fj_ew

#define FJ_EW(DT, ST)                                                                                          \
    extern "C" __global__ void silu_fwd_##DT(const ST::T* u, ST::T* y, fj_i64 n) {                             \
        fj_ew::activation_fwd<ST, 0>(u, y, n);                                                                 \
    }                                                                                                          \
    FJ_REGISTER(silu_fwd_##DT)                                                                                 \
    extern "C" __global__ void silu_jvp_##DT(const ST::T* u, const ST::T* tu, ST::T* y, ST::T* ty, fj_i64 n) { \
        fj_ew::activation_jvp<ST, 0>(u, tu, y, ty, n);                                                         \
    }                                                                                                          \
    FJ_REGISTER(silu_jvp_##DT)                                                                                 \
    extern "C" __global__ void silu_bwd_##DT(const ST::T* u, const ST::T* dy, ST::T* du, fj_i64 n) {           \
        fj_ew::activation_bwd<ST, 0>(u, dy, du, n);                                                            \
    }                                                                                                          \
    FJ_REGISTER(silu_bwd_##DT)                                                                                 \
    extern "C" __global__ void gelu_fwd_##DT(const ST::T* u, ST::T* y, fj_i64 n) {                             \
        fj_ew::activation_fwd<ST, 1>(u, y, n);                                                                 \
    }                                                                                                          \
    FJ_REGISTER(gelu_fwd_##DT)                                                                                 \
    extern "C" __global__ void gelu_jvp_##DT(const ST::T* u, const ST::T* tu, ST::T* y, ST::T* ty, fj_i64 n) { \
        fj_ew::activation_jvp<ST, 1>(u, tu, y, ty, n);                                                         \
    }                                                                                                          \
    FJ_REGISTER(gelu_jvp_##DT)                                                                                 \
    extern "C" __global__ void gelu_bwd_##DT(const ST::T* u, const ST::T* dy, ST::T* du, fj_i64 n) {           \
        fj_ew::activation_bwd<ST, 1>(u, dy, du, n);                                                            \
    }                                                                                                          \
    FJ_REGISTER(gelu_bwd_##DT)                                                                                 \
    extern "C" __global__ void gelu_tangent_##DT(const ST::T* pre, const ST::T* tu, ST::T* ty, fj_i64 n) {     \
        fj_ew::activation_bwd<ST, 1>(pre, tu, ty, n);                                                          \
    }                                                                                                          \
    FJ_REGISTER(gelu_tangent_##DT)                                                                             \
    extern "C" __global__ void gated_residual_fwd_##DT(const ST::T* x, const ST::T* y, const float* gate,      \
                                                       ST::T* out, int T, int C, int G) {                      \
        fj_ew::residual_fwd<ST>(x, y, gate, out, T, C, G);                                                     \
    }                                                                                                          \
    FJ_REGISTER(gated_residual_fwd_##DT)                                                                       \
    extern "C" __global__ void gated_residual_jvp_##DT(const ST::T* x, const ST::T* tx, const ST::T* y,        \
                                                       const ST::T* ty, const float* gate, const float* tgate, \
                                                       ST::T* out, ST::T* tout, int T, int C, int G) {         \
        fj_ew::residual_jvp<ST>(x, tx, y, ty, gate, tgate, out, tout, T, C, G);                                \
    }                                                                                                          \
    FJ_REGISTER(gated_residual_jvp_##DT)                                                                       \
    extern "C" __global__ void gated_residual_bwd_##DT(const ST::T* dout, const float* gate, ST::T* dx,        \
                                                       ST::T* dy, int T, int C, int G) {                       \
        fj_ew::residual_bwd<ST>(dout, gate, dx, dy, T, C, G);                                                  \
    }                                                                                                          \
    FJ_REGISTER(gated_residual_bwd_##DT)                                                                       \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        gated_residual_bwd_gate_##DT(const ST::T* dout, const ST::T* y, float* dgate, int T, int C, int G) {   \
        __shared__ float red[8][33];                                                                           \
        const int tx = threadIdx.x, tyy = threadIdx.y;                                                         \
        const int col = blockIdx.x * 32 + tx, grp = blockIdx.y;                                                \
        const int R = T / G, chunk = (R + gridDim.z - 1) / gridDim.z;                                          \
        const int r_begin = grp * R + blockIdx.z * chunk, r_end = min(r_begin + chunk, (grp + 1) * R);         \
        float acc = 0.f;                                                                                       \
        if (col < C)                                                                                           \
            for (int r = r_begin + tyy; r < r_end; r += 8) {                                                   \
                const fj_i64 i = (fj_i64)r * C + col;                                                          \
                acc = fmaf(ST::load(dout[i]), ST::load(y[i]), acc);                                            \
            }                                                                                                  \
        red[tyy][tx] = acc;                                                                                    \
        __syncthreads();                                                                                       \
        if (tyy == 0 && col < C) {                                                                             \
            for (int k = 1; k < 8; ++k) acc += red[k][tx];                                                     \
            atomicAdd(dgate + (fj_i64)grp * C + col, acc);                                                     \
        }                                                                                                      \
    }                                                                                                          \
    FJ_REGISTER(gated_residual_bwd_gate_##DT)
FJ_FOR_EACH_DTYPE(FJ_EW)

// ---------------------------------------------------------------------------------------------
// Timestep embedding (f32 only: the time path stays in f32).
namespace fj_ew {
template <bool JVP>
__device__ __forceinline__ void timestep(const float* __restrict__ t, const float* __restrict__ tt,
                                         float* __restrict__ e, float* __restrict__ te, int N, int dim,
                                         float max_period) {
    const int half = dim / 2;
    const float neg_log_mp = -logf(max_period);
    FJ_GRID_STRIDE(idx, (fj_i64)N * dim) {
        const int n = (int)(idx / dim);
        const int col = (int)(idx - (fj_i64)n * dim);
        float val = 0.f, tan_val = 0.f;
        if (col < 2 * half) {
            const int i = col < half ? col : col - half;
            const float w = expf(neg_log_mp * (float)i / (float)half);
            const float arg = w * t[n];
            float sn, cs;
            sincosf(arg, &sn, &cs);
            if (col < half) {
                val = cs;
                if (JVP) tan_val = -w * sn * tt[n];
            } else {
                val = sn;
                if (JVP) tan_val = w * cs * tt[n];
            }
        }
        if (e) e[idx] = val;
        if (JVP) te[idx] = tan_val;
    }
}
}  // namespace fj_ew

extern "C" __global__ void timestep_embedding_f32(const float* t, float* e, int N, int dim, float max_period) {
    fj_ew::timestep<false>(t, nullptr, e, nullptr, N, dim, max_period);
}
FJ_REGISTER(timestep_embedding_f32)
extern "C" __global__ void timestep_embedding_jvp_f32(const float* t, const float* tt, float* e, float* te, int N,
                                                      int dim, float max_period) {
    fj_ew::timestep<true>(t, tt, e, te, N, dim, max_period);
}
FJ_REGISTER(timestep_embedding_jvp_f32)

// ---------------------------------------------------------------------------------------------
// Casts.
extern "C" __global__ void cast_f32_bf16(const float* x, fj_u16* y, fj_i64 n) {
    FJ_GRID_STRIDE(i, n) y[i] = fj_f32_to_bf16(x[i]);
}
FJ_REGISTER(cast_f32_bf16)
extern "C" __global__ void cast_bf16_f32(const fj_u16* x, float* y, fj_i64 n) {
    FJ_GRID_STRIDE(i, n) y[i] = fj_bf16_to_f32(x[i]);
}
FJ_REGISTER(cast_bf16_f32)
extern "C" __global__ void cast_f32_f16(const float* x, fj_u16* y, fj_i64 n) {
    FJ_GRID_STRIDE(i, n) y[i] = fj_f32_to_f16(x[i]);
}
FJ_REGISTER(cast_f32_f16)
extern "C" __global__ void cast_f16_f32(const fj_u16* x, float* y, fj_i64 n) {
    FJ_GRID_STRIDE(i, n) y[i] = fj_f16_to_f32(x[i]);
}
FJ_REGISTER(cast_f16_f32)
