// attention_jvp.cu: the fused attention JVP, its constant-K/V variant and the primal forward for
// v of the head dim of q and k (dv == d), d in {32, 64, 72, 96, 128}: 45 kernels, 10 more with f16 value
// products (bf16) and the 2 that make their f16 copies of v and tv. The kernels, their
// tiling, launch shapes, shared memory and limits are described in attention_jvp.cuh; dv != d is
// instantiated in attention_jvp_dv.cu (a separate file so that the common case compiles alone).
#include "common.cuh"
#include "attention_jvp.cuh"

FJ_ATTN_SAME(32)
FJ_ATTN_SAME(64)
FJ_ATTN_SAME(72)
FJ_ATTN_SAME(96)
FJ_ATTN_SAME(128)

// The f16 value products (bf16 storage, d == dv): the JVP kernels reading v and tv from the f16 copies.
FJ_ATTN_VF16(32)
FJ_ATTN_VF16(64)
FJ_ATTN_VF16(72)
FJ_ATTN_VF16(96)
FJ_ATTN_VF16(128)

namespace fj_vals {
// ---------------------------------------------------------------------------------------------
// THE F16 VALUE COPIES of both attention paths (common.cuh, F16 VALUE PRODUCTS). v and tv (tv may be
// null: nokv) are bf16 [B, H, N, D] at element offset b*sb + h*sh + n*sn + col (strides and D multiples
// of 8, 16-byte aligned bases, as both paths' plans require anyway); `vecs` = B*H*N*D/8 vectors of 8
// elements. Both kernels are grid-stride, block 256, any grid.
//   attention_values_amax_bf16 (v, tv, amax, N, H, D, sb, sh, sn, vecs): *amax = max(*amax, bits of max |x|)
//     over v and tv (the caller zeroes *amax first; NaN bits order above inf's, so a NaN gives k = 0).
//   attention_values_to_f16_bf16 (v, tv, amax, v16, tv16, N, H, D, sb, sh, sn, vecs): v16 = f16(v * 2^-k),
//     likewise tv16, both contiguous [B, H, N, D]; k = fj_values_exp(*amax).
__device__ __forceinline__ fj_i64 values_src(fj_i64 i, int N, int H, int D, fj_i64 sb, fj_i64 sh, fj_i64 sn) {
    const int cols = D / 8;
    const fj_i64 r = i / cols;
    const int c = (int)(i - r * cols);
    const fj_i64 bh = r / N;
    const int n = (int)(r - bh * N);
    const fj_i64 b = bh / H;
    const int h = (int)(bh - b * H);
    return b * sb + h * sh + (fj_i64)n * sn + 8 * c;
}

__device__ __forceinline__ fj_u32 values_amax8(const fj_u16* x) {
    const uint4 u = *reinterpret_cast<const uint4*>(x);
    const fj_u32 w[4] = {u.x, u.y, u.z, u.w};
    fj_u32 m = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {  // |bf16| as the bits of an f32: drop the sign, shift into place
        m = max(m, (w[e] & 0x7fffu) << 16);
        m = max(m, (w[e] >> 16 & 0x7fffu) << 16);
    }
    return m;
}

__device__ __forceinline__ void values_amax(const fj_u16* __restrict__ v, const fj_u16* __restrict__ tv,
                                            fj_u32* __restrict__ amax, int N, int H, int D, fj_i64 sb,
                                            fj_i64 sh, fj_i64 sn, fj_i64 vecs) {
    __shared__ fj_u32 part[8];
    fj_u32 m = 0;
    for (fj_i64 i = (fj_i64)blockIdx.x * blockDim.x + threadIdx.x; i < vecs; i += (fj_i64)gridDim.x * blockDim.x) {
        const fj_i64 off = values_src(i, N, H, D, sb, sh, sn);
        m = max(m, values_amax8(v + off));
        if (tv) m = max(m, values_amax8(tv + off));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) part[warp] = m;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) m = max(m, part[w]);
        atomicMax(amax, m);  // one per block
    }
}

__device__ __forceinline__ void values_convert8(const fj_u16* x, fj_u16* y, float down) {
    const uint4 u = *reinterpret_cast<const uint4*>(x);
    const fj_u32 w[4] = {u.x, u.y, u.z, u.w};
    fj_u32 r[4];
#pragma unroll
    for (int e = 0; e < 4; ++e)
        r[e] = fj_pack2<true>(fj_bf16_to_f32((fj_u16)(w[e] & 0xffffu)) * down, fj_bf16_to_f32((fj_u16)(w[e] >> 16)) * down);
    *reinterpret_cast<uint4*>(y) = make_uint4(r[0], r[1], r[2], r[3]);
}

__device__ __forceinline__ void values_to_f16(const fj_u16* __restrict__ v, const fj_u16* __restrict__ tv,
                                              const fj_u32* __restrict__ amax, fj_u16* __restrict__ v16,
                                              fj_u16* __restrict__ tv16, int N, int H, int D, fj_i64 sb,
                                              fj_i64 sh, fj_i64 sn, fj_i64 vecs) {
    const float down = __int_as_float((127 - fj_values_exp(*amax)) << 23);  // 2^-k
    for (fj_i64 i = (fj_i64)blockIdx.x * blockDim.x + threadIdx.x; i < vecs; i += (fj_i64)gridDim.x * blockDim.x) {
        const fj_i64 off = values_src(i, N, H, D, sb, sh, sn);
        values_convert8(v + off, v16 + 8 * i, down);
        if (tv) values_convert8(tv + off, tv16 + 8 * i, down);
    }
}

}  // namespace fj_vals

extern "C" __global__ void __launch_bounds__(256) attention_values_amax_bf16(const fj_u16* v, const fj_u16* tv, fj_u32* amax,
                                                                        int N, int H, int D, fj_i64 sb, fj_i64 sh,
                                                                        fj_i64 sn, fj_i64 vecs) {
    fj_vals::values_amax(v, tv, amax, N, H, D, sb, sh, sn, vecs);
}
FJ_REGISTER(attention_values_amax_bf16)
extern "C" __global__ void __launch_bounds__(256)
    attention_values_to_f16_bf16(const fj_u16* v, const fj_u16* tv, const fj_u32* amax, fj_u16* v16, fj_u16* tv16, int N,
                            int H, int D, fj_i64 sb, fj_i64 sh, fj_i64 sn, fj_i64 vecs) {
    fj_vals::values_to_f16(v, tv, amax, v16, tv16, N, H, D, sb, sh, sn, vecs);
}
FJ_REGISTER(attention_values_to_f16_bf16)
