// rope.cu: rotary position embeddings on token-major heads x [B, N, H, d] (d = 2 half), and the inverse
// rotation for the backward. The op is linear in x with constant angles, so its JVP is the same kernel on
// the tangent.
//
// MATH: pair i of head h of token (b, n) is (x[2i], x[2i+1]) ("interleaved": Wan, Flux) or (x[i],
// x[half + i]) ("halves": rotate-half, GPT-NeoX/LLaMA), with the angle's tables c = cos[t, i], s = sin[t, i],
// t = b N + n for per-batch tables [B, N, half], t = n for shared ones [N, half]; with s' = sign s:
//   (a, b) -> (a c - b s', a s' + b c)
// sign = +1 is the rotation (forward, JVP), sign = -1 its transpose (backward).
//
// LAUNCH: rope_{dt}(x, y, cos, sin, B, N, H, half, per_batch, halves, sign)
//   one warp per head row, a grid-stride loop over the R = B N H rows (64-bit count; the lanes walk the
//   row's pairs): block = (256, 1, 1), grid = (min(ceil(32 R / 256), 65535 * 16), 1, 1) or any smaller grid;
//   no shared memory. x, y [B, N, H, d] in
//   the storage dtype (y may equal x: in place); cos, sin f32; B, N, H, half, per_batch (0/1), halves
//   (0/1) int; sign f32. dt in {bf16, f16, f32}.
//
// STATUS: written 2026-11-28; compiled for sm_80 and sm_90a with NVRTC 13.0 and run on the CPU emulator
// (cuda/emu) against the f64 CPU reference; not yet run on a GPU.
#include "common.cuh"

namespace fj_rope {

// One warp per head row (token, head): the row's token and its table row take two 64-bit divisions,
// once per row rather than per pair; the lanes then walk the row's pairs (consecutive lanes read
// consecutive pairs: coalesced for both pairings).
template <class ST>
__device__ __forceinline__ void rotate(const typename ST::T* x, typename ST::T* y, const float* __restrict__ cosv,
                                       const float* __restrict__ sinv, int B, int N, int H, int half, int per_batch,
                                       int halves, float sign) {
    const fj_i64 rows = (fj_i64)B * N * H;
    const int lane = threadIdx.x & 31;
    const fj_i64 warps = (fj_i64)gridDim.x * (blockDim.x >> 5);
    for (fj_i64 row = (fj_i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows; row += warps) {
        const fj_i64 tok = row / H;  // b N + n
        const fj_i64 t = per_batch ? tok : tok % N;
        const typename ST::T* xr = x + row * (2 * (fj_i64)half);
        typename ST::T* yr = y + row * (2 * (fj_i64)half);
        const float* cr = cosv + t * half;
        const float* sr = sinv + t * half;
        for (int i = lane; i < half; i += 32) {
            const int i0 = halves ? i : 2 * i;
            const int i1 = halves ? half + i : 2 * i + 1;
            const float c = cr[i], s = sign * sr[i];
            const float a = ST::load(xr[i0]), b = ST::load(xr[i1]);
            yr[i0] = ST::store(a * c - b * s);
            yr[i1] = ST::store(a * s + b * c);
        }
    }
}

}  // namespace fj_rope

#define FJ_ROPE(DT, ST)                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        rope_##DT(const ST::T* x, ST::T* y, const float* cosv, const float* sinv, int B, int N, int H,         \
                  int half, int per_batch, int halves, float sign) {                                           \
        fj_rope::rotate<ST>(x, y, cosv, sinv, B, N, H, half, per_batch, halves, sign);                         \
    }                                                                                                          \
    FJ_REGISTER(rope_##DT)

FJ_FOR_EACH_DTYPE(FJ_ROPE)
