// dit.cu: the data movement and small reductions of the DiT that no op family covers: a general
// permutation of up to six axes (patchify / unpatchify, splitting fused qkv rows into heads and back,
// the modulation chunks), a periodic add (position embedding, gradient accumulation), the class
// embedding (gather-add) and its gradient (a deterministic scatter-add), and a scale of the time path.
//
// MATH:
//   dit_permute:     y[i0..i5] = x[i0 s0 + i1 s1 + ... + i5 s5]; y is row-major of shape (d0..d5), s_k is
//                    the input stride of output axis k. Unused leading axes have size 1 (stride anything).
//   dit_add_rows:    y[i] += x[i mod period]                   (i < n; period divides n or not, any)
//   dit_add_class:   y[r, c] += table[idx[r], c]               (y [rows, w], table [R, w])
//   dit_class_grad:  dtable[k, c] = sum over r with idx[r] == k of dy[r, c]   (written, not accumulated)
//   dit_scale_f32:   y[i] = a x[i]
//
// LAUNCH (grid-stride loops: block 256, grid min(ceil(n/256), 1048560), any grid is correct):
//   dit_permute_{dt}(const T* x, T* y, i64 n, int d0, int d1, int d2, int d3, int d4, int d5,
//                    i64 s0, i64 s1, i64 s2, i64 s3, i64 s4, i64 s5)          n = d0 d1 d2 d3 d4 d5
//   dit_add_rows_{dt}(T* y, const T* x, i64 n, i64 period)
//   dit_add_class_{dt}(T* y, const T* table, const int* idx, int rows, int w)             n = rows w
//   dit_class_grad_{dt}(const T* dy, const int* idx, T* dtable, int rows, int table_rows, int w)
//                                                                                    n = table_rows w
//   dit_scale_f32(const float* x, float* y, float a, i64 n)
//   dt in {bf16, f16, f32}; arithmetic in f32; idx holds values in [0, R) (checked on the host).
//   y must not alias x in dit_permute (a permutation is not in place); dit_add_rows may not alias
//   either (x is read while y is written).
//
// Memory-bound and simple on purpose: the permutations cost one read and one write of a tensor, small
// beside the GEMMs and attention of a DiT block (see src/cuda/bench_dit.rs for the share measured).
//
// STATUS: compiled for sm_80 and sm_90a with NVRTC 13.0; ran on an NVIDIA H200 (2026-11-27,
// scripts/gpu/check.sh, docs/gpu-runs.md), where tests/gpu_dit.rs, which checks every use against the
// CPU DiT, passes. Not run under compute-sanitizer (gpu_sanitize does not run the DiT); not yet run on
// an sm_80 (A100) card.
#include "common.cuh"

#define FJ_DIT_GRID_STRIDE(i, n) \
    for (fj_i64 i = (fj_i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (fj_i64)gridDim.x * blockDim.x)

#define FJ_DIT(DT, ST)                                                                                      \
    extern "C" __global__ void dit_permute_##DT(const ST::T* __restrict__ x, ST::T* __restrict__ y,         \
                                                fj_i64 n, int d0, int d1, int d2, int d3, int d4, int d5,   \
                                                fj_i64 s0, fj_i64 s1, fj_i64 s2, fj_i64 s3, fj_i64 s4,      \
                                                fj_i64 s5) {                                                \
        FJ_DIT_GRID_STRIDE(i, n) {                                                                          \
            fj_i64 r = i;                                                                                   \
            const fj_i64 i5 = r % d5; r /= d5;                                                              \
            const fj_i64 i4 = r % d4; r /= d4;                                                              \
            const fj_i64 i3 = r % d3; r /= d3;                                                              \
            const fj_i64 i2 = r % d2; r /= d2;                                                              \
            const fj_i64 i1 = r % d1; r /= d1;                                                              \
            const fj_i64 i0 = r;                                                                            \
            (void)d0;                                                                                       \
            y[i] = x[i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3 + i4 * s4 + i5 * s5];                            \
        }                                                                                                   \
    }                                                                                                       \
    FJ_REGISTER(dit_permute_##DT)                                                                           \
    extern "C" __global__ void dit_add_rows_##DT(ST::T* __restrict__ y, const ST::T* __restrict__ x,        \
                                                 fj_i64 n, fj_i64 period) {                                 \
        FJ_DIT_GRID_STRIDE(i, n) y[i] = ST::store(ST::load(y[i]) + ST::load(x[i % period]));                \
    }                                                                                                       \
    FJ_REGISTER(dit_add_rows_##DT)                                                                          \
    extern "C" __global__ void dit_add_class_##DT(ST::T* __restrict__ y, const ST::T* __restrict__ table,   \
                                                  const int* __restrict__ idx, int rows, int w) {           \
        FJ_DIT_GRID_STRIDE(i, (fj_i64)rows * w) {                                                           \
            const fj_i64 r = i / w;                                                                         \
            const fj_i64 c = i - r * w;                                                                     \
            y[i] = ST::store(ST::load(y[i]) + ST::load(table[(fj_i64)idx[r] * w + c]));                     \
        }                                                                                                   \
    }                                                                                                       \
    FJ_REGISTER(dit_add_class_##DT)                                                                         \
    extern "C" __global__ void dit_class_grad_##DT(const ST::T* __restrict__ dy, const int* __restrict__ idx, \
                                                   ST::T* __restrict__ dtable, int rows, int table_rows,    \
                                                   int w) {                                                 \
        FJ_DIT_GRID_STRIDE(i, (fj_i64)table_rows * w) {                                                     \
            const int k = (int)(i / w);                                                                     \
            const fj_i64 c = i - (fj_i64)k * w;                                                             \
            float acc = 0.f;                                                                                \
            for (int r = 0; r < rows; ++r)                                                                  \
                if (idx[r] == k) acc += ST::load(dy[(fj_i64)r * w + c]);                                    \
            dtable[i] = ST::store(acc);                                                                     \
        }                                                                                                   \
    }                                                                                                       \
    FJ_REGISTER(dit_class_grad_##DT)
FJ_FOR_EACH_DTYPE(FJ_DIT)

extern "C" __global__ void dit_scale_f32(const float* __restrict__ x, float* __restrict__ y, float a, fj_i64 n) {
    FJ_DIT_GRID_STRIDE(i, n) y[i] = a * x[i];
}
FJ_REGISTER(dit_scale_f32)
