// common.cuh: the one shared header of flashjvp's hand-written kernels.
//
// Self-contained on purpose: no CUDA toolkit header is included (no cuda_bf16.h, cuda_fp16.h,
// <cstdint>), so NVRTC alone compiles every kernel, on a machine with no toolkit. 16-bit floats are
// raw `unsigned short` bit patterns; the tensor-core (mma.sync), matrix-load (ldmatrix) and
// async-copy (cp.async) instructions are written as inline PTX. Every .cu file includes this header
// as `#include "common.cuh"`; the Rust side hands it to nvrtcCreateProgram by that name.
//
// Needs sm_80 or newer (cp.async, bf16 mma, cvt.rn.bf16x2).
#pragma once

typedef unsigned short fj_u16;
typedef unsigned int fj_u32;
typedef unsigned long long fj_u64;
typedef long long fj_i64;

// The kernels' dynamic shared memory (`FJ_DYN_SMEM(fj_smem);` in a kernel body) and the registration of
// each extern "C" kernel after its definition (`FJ_REGISTER(name)`, no semicolon): on the device the
// usual `extern __shared__` array and nothing. The host emulator (cuda/emu, compiled with FJ_HOST_EMU)
// defines both in cuda/emu/fj_emu.h, together with host versions of the inline-PTX helpers below.
#ifndef FJ_HOST_EMU
#define FJ_DYN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define FJ_REGISTER(name)
#endif

#define FJ_INF __int_as_float(0x7f800000)
#define FJ_LOG2E 1.4426950408889634f
#define FJ_LN2 0.6931471805599453f

// ---------------------------------------------------------------------------------------------
// Scalar conversions.
// bf16 -> f32 is exact: the bf16 bits are the top half of the f32 bits.
__device__ __forceinline__ float fj_bf16_to_f32(fj_u16 h) { return __uint_as_float(((fj_u32)h) << 16); }

// f32 -> bf16, round to nearest, ties to even, by hand. NaN stays a (quiet) NaN; overflow rounds to inf
// as IEEE rounding does.
__device__ __forceinline__ fj_u16 fj_f32_to_bf16(float f) {
    fj_u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (fj_u16)((u >> 16) | 0x0040u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (fj_u16)(u >> 16);
}

#ifndef FJ_HOST_EMU
__device__ __forceinline__ float fj_f16_to_f32(fj_u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ fj_u16 fj_f32_to_f16(float f) {
    fj_u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif  // FJ_HOST_EMU

// ---------------------------------------------------------------------------------------------
// Storage types. A kernel is templated on one of these; `T` is what lives in device memory, `V` how
// many elements fill 16 bytes. All arithmetic is in f32.
struct FjBF16 {
    typedef fj_u16 T;
    enum { V = 8, IS_F16 = 0 };
    static __device__ __forceinline__ float load(T x) { return fj_bf16_to_f32(x); }
    static __device__ __forceinline__ T store(float f) { return fj_f32_to_bf16(f); }
};
struct FjF16 {
    typedef fj_u16 T;
    enum { V = 8, IS_F16 = 1 };
    static __device__ __forceinline__ float load(T x) { return fj_f16_to_f32(x); }
    static __device__ __forceinline__ T store(float f) { return fj_f32_to_f16(f); }
};
struct FjF32 {
    typedef float T;
    enum { V = 4, IS_F16 = 0 };
    static __device__ __forceinline__ float load(T x) { return x; }
    static __device__ __forceinline__ T store(float f) { return f; }
};

// Instantiate M(name_suffix, storage_struct) once per storage dtype.
#define FJ_FOR_EACH_DTYPE(M) M(bf16, FjBF16) M(f16, FjF16) M(f32, FjF32)

// ---------------------------------------------------------------------------------------------
// 16-byte chunks of a row: load/store elements [i, i+V) of a row of n elements as f32. With `vec`
// (the caller checked n % V == 0 and 16-byte alignment of the row) one 16-byte access; otherwise
// element by element, elements at or past n read as 0 and are not written.
template <class ST>
__device__ __forceinline__ void fj_load_chunk(const typename ST::T* row, int i, int n, bool vec, float (&out)[ST::V]) {
    typedef typename ST::T T;
    if (vec) {
        union { uint4 u; T e[ST::V]; } c;
        c.u = *reinterpret_cast<const uint4*>(row + i);
#pragma unroll
        for (int e = 0; e < ST::V; ++e) out[e] = ST::load(c.e[e]);
    } else {
#pragma unroll
        for (int e = 0; e < ST::V; ++e) out[e] = (i + e < n) ? ST::load(row[i + e]) : 0.0f;
    }
}
template <class ST>
__device__ __forceinline__ void fj_store_chunk(typename ST::T* row, int i, int n, bool vec, const float (&in)[ST::V]) {
    typedef typename ST::T T;
    if (vec) {
        union { uint4 u; T e[ST::V]; } c;
#pragma unroll
        for (int e = 0; e < ST::V; ++e) c.e[e] = ST::store(in[e]);
        *reinterpret_cast<uint4*>(row + i) = c.u;
    } else {
#pragma unroll
        for (int e = 0; e < ST::V; ++e)
            if (i + e < n) row[i + e] = ST::store(in[e]);
    }
}
// f32 rows (modulation vectors, gates) read in chunks of the storage width of another type.
template <int V>
__device__ __forceinline__ void fj_load_chunk_f32(const float* row, int i, int n, bool vec, float (&out)[V]) {
    if (vec) {
#pragma unroll
        for (int e = 0; e < V; e += 4) {
            float4 f = *reinterpret_cast<const float4*>(row + i + e);
            out[e] = f.x; out[e + 1] = f.y; out[e + 2] = f.z; out[e + 3] = f.w;
        }
    } else {
#pragma unroll
        for (int e = 0; e < V; ++e) out[e] = (i + e < n) ? row[i + e] : 0.0f;
    }
}
__device__ __forceinline__ bool fj_aligned16(const void* p) { return (((fj_u64)p) & 15ull) == 0ull; }

// ---------------------------------------------------------------------------------------------
// Warp reductions (all 32 lanes take part).
__device__ __forceinline__ float fj_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float fj_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---------------------------------------------------------------------------------------------
// Inline PTX: shared-memory addresses, async copies, matrix loads, tensor-core mma.
#ifndef FJ_HOST_EMU
__device__ __forceinline__ fj_u32 fj_smem_addr(const void* p) {
    fj_u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
// 16-byte global -> shared copy, bypassing L1. src_bytes == 0 writes 16 zero bytes (the source is not
// read, but must still be a valid address: pass the tensor's base pointer).
__device__ __forceinline__ void fj_cp_async16(fj_u32 dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void fj_cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void fj_cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Four 8x8 b16 matrices; lane i gives the address of row (i % 8) of matrix (i / 8). Result register j
// holds, in lane l, elements (row l/4, columns 2(l%4), 2(l%4)+1) of matrix j (of its transpose with .trans).
__device__ __forceinline__ void fj_ldmatrix_x4(fj_u32 (&r)[4], fj_u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void fj_ldmatrix_x4_trans(fj_u32 (&r)[4], fj_u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// D = A(16x16, row) * B(16x8, col) + D, f32 accumulate. Fragments (g = lane/4, t = lane%4):
//   A: a0 (row g, k 2t..2t+1), a1 (row g+8, k 2t..), a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..)
//   B: b0 (k 2t..2t+1, col g), b1 (k 2t+8.., col g)
//   C/D: c0,c1 (row g, cols 2t, 2t+1), c2,c3 (row g+8, cols 2t, 2t+1)
template <bool F16>
__device__ __forceinline__ void fj_mma16816(float (&d)[4], const fj_u32 (&a)[4], fj_u32 b0, fj_u32 b1) {
    if (F16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Pack two f32 into one register of two 16-bit floats, `lo` in the low half (the lower column index),
// rounding to nearest even.
template <bool F16>
__device__ __forceinline__ fj_u32 fj_pack2(float lo, float hi) {
    fj_u32 r;
    if (F16) asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 2^x (ex2.approx.ftz: relative error about 2^-22; 2^-inf = +0; a result below 2^-126 is flushed to +0).
// The flush is what makes it one MUFU.EX2: without .ftz ptxas wraps every ex2 in a range check and two
// predicated multiplies (FSETP, FMUL, MUFU, FMUL), a third of the softmax's issue slots in the d64
// attention JVP. Every caller takes 2^x of a non-positive exponent as a softmax weight beside one of
// weight >= 1 (or >= 1/Nk in the backward), so a weight below 2^-126 is zero to f32 accuracy anyway.
__device__ __forceinline__ float fj_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif  // FJ_HOST_EMU

// ---------------------------------------------------------------------------------------------
// F16 VALUE PRODUCTS (opt-in, bf16 storage, the attention JVP on both paths: the *_bf16_vf16 kernels of
// attention_jvp.cu and attention_jvp_sm90.cu). Rounding P and P.(Sdot - mu) to bf16 (8 significant bits)
// as value-product operands costs the bf16 tangent about as much error as rounding the output does:
// 2.3e-3 relative in all, against 1.62-1.70e-3 for the output's rounding alone (PyTorch's math backend:
// 1.65e-3). In f16 (11 bits) those operands add almost nothing. The value products then need V and Vdot
// in f16 too: attention_values_amax_bf16 (attention_jvp.cu) takes max |V|, |Vdot| (the bits of a
// non-negative f32 order as unsigned integers: one atomicMax per block), attention_values_to_f16_bf16
// writes contiguous f16 copies scaled by 2^-k, k = fj_values_exp(max): the largest value lands in
// [2^14, 2^15), below f16's 65504, and scaling by a power of two then bf16 -> f16 is exact down to
// 2^-24 2^k. The kernels multiply O and T back by 2^k. |P.(Sdot - mu)| must stay below 65504 (beyond it
// the f16 operand is inf and the output not finite: a visible failure, never a silently clamped one).
//
// k from the bits of max |V|, |Vdot| (an f32 >= 0), kept in [-126, 113] so that 2^k and 2^-k are
// normal f32; an all-zero (or subnormal) max takes k = -126, a non-finite one k = 0 (the copies then
// carry the inf/NaN).
__device__ __forceinline__ int fj_values_exp(fj_u32 amax_bits) {
    const int e = (int)((amax_bits >> 23) & 0xffu);
    if (e == 0xff) return 0;
    if (e == 0) return -126;
    const int k = e - 127 - 14;
    return k < -126 ? -126 : k;
}
// 2^k: the unit of the copies' values.
__device__ __forceinline__ float fj_values_unit(fj_u32 amax_bits) {
    return __int_as_float((fj_values_exp(amax_bits) + 127) << 23);
}
