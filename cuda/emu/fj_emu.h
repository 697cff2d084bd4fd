// fj_emu.h: the host side of flashjvp's CUDA emulator. Force-included (g++ -include) before every kernel
// file compiled as host C++ with -DFJ_HOST_EMU (see build.sh and README.md in this folder). It supplies
// what NVRTC's device compilation supplies implicitly: the CUDA keywords, the built-in variables
// (threadIdx, blockIdx, blockDim, gridDim), uint4/float4, warp shuffles, __syncthreads, atomicAdd, the
// device math functions; and host versions of the inline-PTX helpers of common.cuh (cp.async, ldmatrix,
// mma.sync, cvt, ex2), which common.cuh leaves out under FJ_HOST_EMU. The runtime behind them is
// runtime.cpp: every CUDA thread is a fiber, the threads of a block run cooperatively on one OS thread.
#pragma once

#ifndef FJ_HOST_EMU
#error "fj_emu.h is the host emulator's header: compile with -DFJ_HOST_EMU"
#endif

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <utility>

#define FJ_EMU_API __attribute__((visibility("default")))

// ---------------------------------------------------------------------------------------------
// CUDA keywords.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared arrays: one instance per OS thread, and an OS thread runs one block at a time, so one
// instance per block. NOT poisoned between blocks (README.md, limitations).
#define __shared__ static thread_local
// __restrict__ is a g++ keyword already.

// The dynamic shared memory of the current block (128-byte aligned, dynamic_shared_bytes long, 0xFF at
// block start, a PROT_NONE page right after its last 128-byte granule).
#define FJ_DYN_SMEM(name) unsigned char* const name = ::fj_emu::dyn_smem()
// Registers a typed invoker of the extern "C" kernel `name` under its name (after the definition).
#define FJ_REGISTER(name) static const ::fj_emu::Registrar fj_emu_registrar_##name(#name, &name);

// The typedefs of common.cuh (an identical typedef may be repeated), needed by the helpers below.
typedef unsigned short fj_u16;
typedef unsigned int fj_u32;
typedef unsigned long long fj_u64;
typedef long long fj_i64;

// ---------------------------------------------------------------------------------------------
// Vector types (the subset the kernels use), with CUDA's alignment.
struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
struct __attribute__((aligned(8), may_alias)) uint2 { unsigned int x, y; };
struct __attribute__((aligned(8), may_alias)) float2 { float x, y; };
struct __attribute__((aligned(16), may_alias)) uint4 { unsigned int x, y, z, w; };
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }
struct __attribute__((aligned(16), may_alias)) int4 { int x, y, z, w; };
struct __attribute__((aligned(16), may_alias)) float4 { float x, y, z, w; };

namespace fj_emu {

// ---------------------------------------------------------------------------------------------
// Runtime entry points (runtime.cpp). Every call that can block (barrier, warp collective) is a
// scheduling point of the block's fibers; file/line name the call site in error messages and tell
// divergent barriers / collectives apart.
struct Builtins {
    uint3 tid, bid, bdim, gdim;  // threadIdx, blockIdx, blockDim, gridDim
};
FJ_EMU_API const Builtins* builtins();  // of the running CUDA thread (fiber)
FJ_EMU_API unsigned char* dyn_smem();
FJ_EMU_API void syncthreads(const char* file, int line);
FJ_EMU_API void syncwarp(unsigned mask, const char* file, int line);
// 32-bit shuffles; `xor_mode`: source lane = lane ^ arg, else source lane = arg (both within `width`).
FJ_EMU_API unsigned shfl32(unsigned mask, unsigned v, int arg, int width, bool xor_mode, const char* file, int line);
FJ_EMU_API fj_u32 smem_addr(const void* p);
FJ_EMU_API void cp_async16(fj_u32 dst, const void* src, int src_bytes, const char* file, int line);
FJ_EMU_API void cp_async_commit();
FJ_EMU_API void cp_async_wait(int n);
FJ_EMU_API void ldmatrix_x4(fj_u32 (&r)[4], fj_u32 addr, bool trans, const char* file, int line);
FJ_EMU_API void mma16816(float (&d)[4], const fj_u32 (&a)[4], fj_u32 b0, fj_u32 b1, bool f16, const char* file,
                         int line);
FJ_EMU_API float atomic_add_f32(float* p, float v);
FJ_EMU_API void trap(const char* what, const char* file, int line);

// Registration: an invoker per kernel, typed on the kernel's parameters; each parameter is memcpy'd
// from params[i] (cuLaunchKernel's convention: params[i] points at the value).
typedef void (*Invoker)(void* fn, void** params);
FJ_EMU_API void register_kernel(const char* name, void* fn, Invoker inv, int nparams, const char* sig);

template <class T> inline T param(void* p) {
    T v;
    std::memcpy(&v, p, sizeof(T));
    return v;
}
template <class T> struct SigChar { static constexpr char c = '?'; };
template <class T> struct SigChar<T*> { static constexpr char c = 'p'; };
template <> struct SigChar<int> { static constexpr char c = 'i'; };
template <> struct SigChar<unsigned> { static constexpr char c = 'u'; };
template <> struct SigChar<long long> { static constexpr char c = 'l'; };
template <> struct SigChar<float> { static constexpr char c = 'f'; };

template <class... A> struct Invoke {
    template <size_t... I> static void call(void (*f)(A...), void** params, std::index_sequence<I...>) {
        f(param<A>(params[I])...);
    }
    static void run(void* fn, void** params) {
        call(reinterpret_cast<void (*)(A...)>(fn), params, std::index_sequence_for<A...>{});
    }
};
struct Registrar {
    template <class... A> Registrar(const char* name, void (*f)(A...)) {
        static const char sig[] = {SigChar<A>::c..., '\0'};
        register_kernel(name, reinterpret_cast<void*>(f), &Invoke<A...>::run, (int)sizeof...(A), sig);
    }
};

}  // namespace fj_emu

// ---------------------------------------------------------------------------------------------
// Built-in variables.
#define threadIdx (::fj_emu::builtins()->tid)
#define blockIdx (::fj_emu::builtins()->bid)
#define blockDim (::fj_emu::builtins()->bdim)
#define gridDim (::fj_emu::builtins()->gdim)
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Synchronisation and warp collectives.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::fj_emu::syncthreads(file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::fj_emu::syncwarp(mask, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    unsigned u;
    std::memcpy(&u, &v, 4);
    u = ::fj_emu::shfl32(mask, u, lane_mask, width, true, file, line);
    std::memcpy(&v, &u, 4);
    return v;
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    unsigned u;
    std::memcpy(&u, &v, 4);
    u = ::fj_emu::shfl32(mask, u, src_lane, width, false, file, line);
    std::memcpy(&v, &u, 4);
    return v;
}
// vote.any over the full warp, as an OR of xor shuffles (the shuffle collective checks that every lane
// of the mask takes part at the same call site).
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    unsigned v = pred ? 1u : 0u;
    for (int o = 1; o < 32; o <<= 1) v |= ::fj_emu::shfl32(mask, v, o, 32, true, file, line);
    return v != 0u;
}
inline float atomicAdd(float* p, float v) { return ::fj_emu::atomic_add_f32(p, v); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
    unsigned old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
inline void __trap(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::fj_emu::trap("__trap()", file, line);
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------------
// Device math (host equivalents; the device versions of expf, logf, tanhf, sincosf, rsqrtf differ by
// an ulp or two, README.md).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
// CUDA's __byte_perm: byte n of the result is byte ((s >> 4n) & 7) of the 8 bytes y:x (x the low four).
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long in = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int n = 0; n < 4; ++n) r |= (unsigned)((in >> (8 * ((s >> (4 * n)) & 7))) & 0xffu) << (8 * n);
    return r;
}
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : (x == x ? x : 0.f)); }

// ---------------------------------------------------------------------------------------------
// Host versions of common.cuh's inline-PTX helpers (common.cuh compiles its PTX versions only without
// FJ_HOST_EMU). Same names and signatures.

// cvt.f32.f16 (exact) and cvt.rn.f16.f32 (round to nearest even, overflow to inf, NaN stays NaN).
inline float fj_f16_to_f32(fj_u16 h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}
inline fj_u16 fj_f32_to_f16(float f) {
    _Float16 x = (_Float16)f;
    fj_u16 h;
    std::memcpy(&h, &x, 2);
    return h;
}
// cvt.rn.bf16.f32: round to nearest even; NaN -> canonical NaN 0x7fff (as the PTX conversion gives).
inline fj_u16 fj_emu_f32_to_bf16_rn(float f) {
    fj_u32 u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (fj_u16)0x7fffu;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (fj_u16)(u >> 16);
}

inline fj_u32 fj_smem_addr(const void* p) { return ::fj_emu::smem_addr(p); }
inline void fj_cp_async16(fj_u32 dst, const void* src, int src_bytes, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
    ::fj_emu::cp_async16(dst, src, src_bytes, file, line);
}
inline void fj_cp_async_commit() { ::fj_emu::cp_async_commit(); }
template <int N> inline void fj_cp_async_wait() { ::fj_emu::cp_async_wait(N); }
inline void fj_ldmatrix_x4(fj_u32 (&r)[4], fj_u32 addr, const char* file = __builtin_FILE(),
                           int line = __builtin_LINE()) {
    ::fj_emu::ldmatrix_x4(r, addr, false, file, line);
}
inline void fj_ldmatrix_x4_trans(fj_u32 (&r)[4], fj_u32 addr, const char* file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
    ::fj_emu::ldmatrix_x4(r, addr, true, file, line);
}
template <bool F16>
inline void fj_mma16816(float (&d)[4], const fj_u32 (&a)[4], fj_u32 b0, fj_u32 b1,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    ::fj_emu::mma16816(d, a, b0, b1, F16, file, line);
}
// cvt.rn.{f16x2,bf16x2}.f32 d, hi, lo: the first source goes to the upper half.
template <bool F16> inline fj_u32 fj_pack2(float lo, float hi) {
    if (F16) return (fj_u32)fj_f32_to_f16(lo) | ((fj_u32)fj_f32_to_f16(hi) << 16);
    return (fj_u32)fj_emu_f32_to_bf16_rn(lo) | ((fj_u32)fj_emu_f32_to_bf16_rn(hi) << 16);
}
// ex2.approx.ftz.f32 (2^-inf = +0, 2^+inf = +inf, NaN -> NaN; results below 2^-126 flushed to +0).
inline float fj_exp2(float x) {
    const float y = exp2f(x);
    return y < FLT_MIN ? 0.f : y;
}
