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
// LAUNCH: all pointwise kernels are grid-stride loops over their elements: block = (256, 1, 1),
// grid = (min(ceil(n / 256), 65535 * 16), 1, 1) or any smaller grid; no shared memory. Counts n are 64-bit
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

}  // namespace fj_ew

#define FJ_EW(DT, ST)                                                                                          \
    extern "C" __global__ void silu_fwd_##DT(const ST::T* u, ST::T* y, fj_i64 n) {                             \
        FJ_GRID_STRIDE(i, n) y[i] = ST::store(fj_ew::silu(ST::load(u[i])));                                    \
    }                                                                                                          \
    FJ_REGISTER(silu_fwd_##DT)                                                                                 \
    extern "C" __global__ void silu_jvp_##DT(const ST::T* u, const ST::T* tu, ST::T* y, ST::T* ty, fj_i64 n) { \
        FJ_GRID_STRIDE(i, n) {                                                                                 \
            const float a = ST::load(u[i]), t = ST::load(tu[i]);                                               \
            if (y) y[i] = ST::store(fj_ew::silu(a));                                                           \
            ty[i] = ST::store(fj_ew::silu_grad(a) * t);                                                        \
        }                                                                                                      \
    }                                                                                                          \
    FJ_REGISTER(silu_jvp_##DT)                                                                                 \
    extern "C" __global__ void silu_bwd_##DT(const ST::T* u, const ST::T* dy, ST::T* du, fj_i64 n) {           \
        FJ_GRID_STRIDE(i, n) du[i] = ST::store(fj_ew::silu_grad(ST::load(u[i])) * ST::load(dy[i]));            \
    }                                                                                                          \
    FJ_REGISTER(silu_bwd_##DT)                                                                                 \
    extern "C" __global__ void gelu_fwd_##DT(const ST::T* u, ST::T* y, fj_i64 n) {                             \
        FJ_GRID_STRIDE(i, n) y[i] = ST::store(fj_ew::gelu(ST::load(u[i])));                                    \
    }                                                                                                          \
    FJ_REGISTER(gelu_fwd_##DT)                                                                                 \
    extern "C" __global__ void gelu_jvp_##DT(const ST::T* u, const ST::T* tu, ST::T* y, ST::T* ty, fj_i64 n) { \
        FJ_GRID_STRIDE(i, n) {                                                                                 \
            float g, dg;                                                                                       \
            fj_ew::gelu_and_grad(ST::load(u[i]), g, dg);                                                       \
            const float t = ST::load(tu[i]);                                                                   \
            if (y) y[i] = ST::store(g);                                                                        \
            ty[i] = ST::store(dg * t);                                                                         \
        }                                                                                                      \
    }                                                                                                          \
    FJ_REGISTER(gelu_jvp_##DT)                                                                                 \
    extern "C" __global__ void gelu_bwd_##DT(const ST::T* u, const ST::T* dy, ST::T* du, fj_i64 n) {           \
        FJ_GRID_STRIDE(i, n) du[i] = ST::store(fj_ew::gelu_grad(ST::load(u[i])) * ST::load(dy[i]));            \
    }                                                                                                          \
    FJ_REGISTER(gelu_bwd_##DT)                                                                                 \
    extern "C" __global__ void gelu_tangent_##DT(const ST::T* pre, const ST::T* tu, ST::T* ty, fj_i64 n) {     \
        FJ_GRID_STRIDE(i, n) ty[i] = ST::store(fj_ew::gelu_grad(ST::load(pre[i])) * ST::load(tu[i]));         \
    }                                                                                                          \
    FJ_REGISTER(gelu_tangent_##DT)                                                                             \
    extern "C" __global__ void gated_residual_fwd_##DT(const ST::T* x, const ST::T* y, const float* gate,      \
                                                       ST::T* out, int T, int C, int G) {                      \
        FJ_GRID_STRIDE(i, (fj_i64)T * C) {                                                                     \
            const float g = gate[fj_ew::gate_index(i, T, C, G)];                                               \
            out[i] = ST::store(ST::load(x[i]) + g * ST::load(y[i]));                                           \
        }                                                                                                      \
    }                                                                                                          \
    FJ_REGISTER(gated_residual_fwd_##DT)                                                                       \
    extern "C" __global__ void gated_residual_jvp_##DT(const ST::T* x, const ST::T* tx, const ST::T* y,        \
                                                       const ST::T* ty, const float* gate, const float* tgate, \
                                                       ST::T* out, ST::T* tout, int T, int C, int G) {         \
        FJ_GRID_STRIDE(i, (fj_i64)T * C) {                                                                     \
            const fj_i64 gi = fj_ew::gate_index(i, T, C, G);                                                   \
            const float g = gate[gi], yy = ST::load(y[i]);                                                     \
            if (out) out[i] = ST::store(ST::load(x[i]) + g * yy);                                              \
            float t = tx ? ST::load(tx[i]) : 0.f;                                                              \
            if (tgate) t = fmaf(tgate[gi], yy, t);                                                             \
            if (ty) t = fmaf(g, ST::load(ty[i]), t);                                                           \
            tout[i] = ST::store(t);                                                                            \
        }                                                                                                      \
    }                                                                                                          \
    FJ_REGISTER(gated_residual_jvp_##DT)                                                                       \
    extern "C" __global__ void gated_residual_bwd_##DT(const ST::T* dout, const float* gate, ST::T* dx,        \
                                                       ST::T* dy, int T, int C, int G) {                       \
        FJ_GRID_STRIDE(i, (fj_i64)T * C) {                                                                     \
            const float d = ST::load(dout[i]);                                                                 \
            if (dx) dx[i] = dout[i];                                                                           \
            dy[i] = ST::store(gate[fj_ew::gate_index(i, T, C, G)] * d);                                        \
        }                                                                                                      \
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
