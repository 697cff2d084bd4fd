// sm90.h: host emulation of the Hopper (sm_90a) PTX of attention_jvp_sm90.cu for flashjvp's CPU
// emulator (README.md in this folder): mbarrier, TMA (cp.async.bulk.tensor.{3,4}d), named barriers, wgmma
// (warpgroup MMA from shared-memory descriptors and from registers), setmaxnreg, %dynamic_smem_size.
//
// Three layers:
//   1. Pure functions (no runtime): the swizzle, shared-memory matrix descriptors, the register
//      fragments of wgmma.m64nNk16, one wgmma product from a shared-memory image, the emulator's tensor
//      map (src/cuda/emulator.rs: encode_tensor_map) and one TMA box copy. Unit-tested stand-alone by
//      sm90_selftest.cpp.
//   2. The entry points the kernel file calls under FJ_HOST_EMU (namespace fj_sm90, declared here).
//   3. Their implementation (#ifdef FJ_SM90_IMPL, compiled once: by runtime.cpp, or by the self-test),
//      written against a small platform interface (fj_sm90::plat: the running CUDA thread, block / wake,
//      the block's shared memory, error reporting) plus per-block begin / end / describe hooks; with
//      FJ_SM90_RUNTIME (runtime.cpp includes this header a second time at its end) also that platform on
//      runtime.cpp's fibers.
//
// What the implementation checks, beyond computing the right values (each failure is an error of the
// launch naming the thread and the call site, never a hang):
//   - mbarrier: use before init, an overwritten barrier object, more arrivals than the count in one
//     phase; try_wait.parity blocks until the phase of that parity completes (arrivals AND transaction
//     bytes), so a wait on the wrong parity is a deadlock, reported with every waiter's barrier, parity
//     and phase; TMA bytes never accounted (tx != 0, copies never landed) at block end.
//   - TMA: a wrong tensor-map magic, box / swizzle / alignment rules; the copy reads global memory at
//     issue, poisons the destination (0xFF, NaN in bf16 and f16) and lands only when its mbarrier phase
//     completes; overlapping copies in flight; a copy into a barrier object.
//   - ordering of shared memory between the async proxies, by vector clocks per thread (release:
//     mbarrier arrive, bar.arrive / bar.sync; acquire: a successful try_wait, bar.sync):
//       * a wgmma reading shared memory that a TMA wrote requires every thread of the warpgroup to have
//         observed (waited for) the completion that landed it ("missing full-barrier wait"), and no TMA
//         may be in flight on it; a wgmma reading memory no TMA wrote is an error;
//       * a TMA overwriting shared memory that a wgmma read requires some thread of the reading
//         warpgroup to have completed the read (wgmma.wait_group) and then released to the issuing
//         thread, through any chain of barriers ("missing empty-barrier wait", or an arrive before the
//         wait_group), whatever the fiber schedule;
//       * the bytes a wgmma read must not change before its wgmma.wait_group.
//   - wgmma: all 128 threads of the warpgroup rendezvous with identical operands (divergence is an
//     error), the A fragment is assembled from every thread's registers per the ISA; wgmma.fence before
//     the first mma_async after a wait_group; the accumulator registers hold a NaN poison while the
//     operation is in flight (reads see NaN, writes are an error at the wait) and receive the result
//     at wgmma.wait_group; A-fragment registers must not change while in flight; operations still in
//     flight when the block ends are an error.
//   - named barriers: ids 1..15 (0 is __syncthreads), counts a multiple of 32, every arrival in one
//     phase with the same count, no thread arriving twice in one phase, none left half-arrived.
// Not modelled: clusters (shared::cluster is the CTA's own shared memory), multicast, L2 / timing, the
// tensor cores' internal rounding (a k16 step is summed in double and rounded once to f32),
// generic-proxy stores into TMA / wgmma memory (fence.proxy.async), __syncthreads as a release/acquire.
#ifndef FJ_SM90_H_API
#define FJ_SM90_H_API

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#ifndef __grid_constant__
#define __grid_constant__
#endif

#ifdef FJ_EMU_API
#define FJ_SM90_API FJ_EMU_API
#else
#define FJ_SM90_API __attribute__((visibility("default")))
#endif

namespace fj_sm90 {

typedef uint32_t u32;
typedef uint64_t u64;

// =============================================================================================
// 1. Pure functions.

// The swizzle of a shared-memory byte address (PTX ISA: Swizzle<B,4,3>; TMA CU_TENSOR_MAP_SWIZZLE_*):
// the 16-byte chunk bits [4, 4+B) are XORed with bits [7, 7+B); B = 3, 2, 1 for 128-, 64-, 32-byte
// swizzles. A function of the address, so the pattern repeats every 1024 bytes (128-byte swizzle).
inline u32 swizzle_addr(u32 addr, int swizzle_bytes) {
    const int b = swizzle_bytes == 128 ? 3 : swizzle_bytes == 64 ? 2 : swizzle_bytes == 32 ? 1 : 0;
    return addr ^ (((addr >> 7) & ((1u << b) - 1u)) << 4);
}

// A wgmma shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address bits
// 0-13, leading dimension byte offset 16-29, stride dimension byte offset 32-45 (each >> 4), matrix base
// offset 49-51, swizzle mode 62-63 (0 none, 1 128-byte, 2 64-byte, 3 32-byte).
struct SmemDesc {
    u32 start, lbo, sbo, base_offset;
    int swizzle;  // bytes: 0, 32, 64, 128
};
inline SmemDesc decode_desc(u64 d) {
    SmemDesc s;
    s.start = (u32)(d & 0x3FFF) << 4;
    s.lbo = (u32)((d >> 16) & 0x3FFF) << 4;
    s.sbo = (u32)((d >> 32) & 0x3FFF) << 4;
    s.base_offset = (u32)((d >> 49) & 7);
    const u32 mode = (u32)(d >> 62);
    s.swizzle = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;
    return s;
}
inline u64 encode_desc(u32 start, u32 lbo, u32 sbo, int swizzle) {
    const u64 mode = swizzle == 128 ? 1 : swizzle == 64 ? 2 : swizzle == 32 ? 3 : 0;
    return (u64)((start & 0x3FFFF) >> 4) | ((u64)((lbo & 0x3FFFF) >> 4) << 16) |
           ((u64)((sbo & 0x3FFFF) >> 4) << 32) | (mode << 62);
}

// Byte address (before the swizzle) of element (mn, k), k < 16, of a 16-bit operand of wgmma .k16 (A:
// mn = row m; B: mn = column n), from the PTX ISA's canonical layouts (T = 8 elements = 16 bytes, W the
// swizzle width in bytes, g = W / 16), strides of the layouts times the element size:
//   K-major,  no swizzle: ((8,m),(T,2k)):((1T,SBO),(1,LBO))
//   K-major,  swizzled:   ((8,m),(T,2k)):((gT,SBO),(1,T))         (LBO unused)
//   MN-major, no swizzle: ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))
//   MN-major, swizzled:   ((T,g,m),(8,k)):((1,T,LBO),(gT,SBO))
inline u32 operand_offset(const SmemDesc& s, bool mn_major, u32 mn, u32 k) {
    const u32 W = (u32)s.swizzle;
    if (!mn_major) {
        if (W == 0) return (mn % 8) * 16 + (mn / 8) * s.sbo + (k % 8) * 2 + (k / 8) * s.lbo;
        return (mn % 8) * W + (mn / 8) * s.sbo + (k % 8) * 2 + (k / 8) * 16;
    }
    if (W == 0) return (mn % 8) * 2 + (mn / 8) * s.sbo + (k % 8) * 16 + (k / 8) * s.lbo;
    const u32 g = W / 16;
    return (mn % 8) * 2 + ((mn / 8) % g) * 16 + (mn / (8 * g)) * s.lbo + (k % 8) * W + (k / 8) * s.sbo;
}
inline u32 operand_addr(const SmemDesc& s, bool mn_major, u32 mn, u32 k) {
    return swizzle_addr(s.start + operand_offset(s, mn_major, mn, k), s.swizzle);
}

// Register fragments of wgmma.m64nNk16 (PTX ISA figures "WGMMA .m64nNk16 register fragment layout";
// CUTLASS CLayout_64xN / ALayout_64x16), thread t of the warpgroup (warp w = t / 32, g = (t % 32) / 4,
// q = t % 4):
//   accumulator element i (i < N/2): row 16w + g + 8((i>>1)&1), column 8(i>>2) + 2q + (i&1);
//   A element j (j < 8; register j/2, low half for even j): row 16w + g + 8((j>>1)&1),
//   column k = 2q + (j&1) + 8(j>>2).
inline void acc_coord(int t, int i, int& row, int& col) {
    row = 16 * (t / 32) + (t % 32) / 4 + 8 * ((i >> 1) & 1);
    col = 8 * (i >> 2) + 2 * (t % 4) + (i & 1);
}
inline void afrag_coord(int t, int j, int& row, int& k) {
    row = 16 * (t / 32) + (t % 32) / 4 + 8 * ((j >> 1) & 1);
    k = 2 * (t % 4) + (j & 1) + 8 * (j >> 2);
}

inline float half_to_f32(uint16_t h, bool f16) {
    if (!f16) {
        const u32 u = (u32)h << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
    const u32 sign = (u32)(h >> 15) << 31, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    u32 u;
    if (e == 0x1f) u = sign | 0x7f800000u | (m << 13);
    else if (e != 0) u = sign | ((e + 112) << 23) | (m << 13);
    else if (m == 0) u = sign;
    else {  // subnormal: m * 2^-24
        float f = (float)m * 5.9604644775390625e-8f;
        std::memcpy(&u, &f, 4);
        u |= sign;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// One wgmma.mma_async.m64nNk16 (f16 / bf16 inputs): the product P = (sa A)(sb B), 64 x N in double,
// A 64 x 16 from a descriptor (K-major, or M-major with trans_a) or given (a_given, row-major 64 x 16),
// B 16 x N from a descriptor (K-major, or N-major with trans_b). `smem` is the block's shared memory,
// addresses are offsets into it. Also returns the 128-byte lines read and a hash of the bytes read.
// Returns an error message, empty on success.
struct Product {
    std::vector<double> p;    // 64 x N, row-major
    std::vector<u32> lines;   // distinct 128-byte lines read (address / 128)
    u64 hash = 0;
};
inline void hash_mix(u64& h, u64 v) { h = (h ^ v) * 0x100000001b3ull + 0x9e3779b97f4a7c15ull; }
inline std::string check_desc(const SmemDesc& s, const char* which) {
    if (s.base_offset != 0)
        return std::string(which) + " descriptor: matrix base offset " + std::to_string(s.base_offset) +
               " (not emulated: the kernels' swizzle patterns start on 1024-byte boundaries)";
    return "";
}
inline std::string gather_operand(const unsigned char* smem, u32 smem_bytes, u64 desc, bool mn_major, u32 mn_count,
                                  bool f16, std::vector<float>& out, std::vector<u32>& lines, u64& hash,
                                  const char* which) {
    const SmemDesc s = decode_desc(desc);
    std::string e = check_desc(s, which);
    if (!e.empty()) return e;
    out.assign((size_t)mn_count * 16, 0.f);
    for (u32 mn = 0; mn < mn_count; ++mn)
        for (u32 k = 0; k < 16; ++k) {
            const u32 a = operand_addr(s, mn_major, mn, k);
            if ((u64)a + 2 > smem_bytes)
                return std::string(which) + " operand element (" + std::to_string(mn) + ", " + std::to_string(k) +
                       ") at shared offset " + std::to_string(a) + " lies outside the " +
                       std::to_string(smem_bytes) + "-byte dynamic shared memory";
            uint16_t h;
            std::memcpy(&h, smem + a, 2);
            hash_mix(hash, ((u64)a << 16) | h);
            out[(size_t)mn * 16 + k] = half_to_f32(h, f16);
            const u32 line = a / 128;
            if (lines.empty() || lines.back() != line) lines.push_back(line);
        }
    return "";
}
inline std::string wgmma_product(const unsigned char* smem, u32 smem_bytes, int n, bool f16, u64 da,
                                 const float* a_given, u64 db, int scale_a, int scale_b, int trans_a, int trans_b,
                                 Product& out) {
    std::vector<float> A, B;  // A: 64 x 16 (m, k); B: n x 16 (n, k)
    out.lines.clear();
    out.hash = 0xcbf29ce484222325ull;
    std::string e;
    if (a_given) A.assign(a_given, a_given + 64 * 16);
    else {
        e = gather_operand(smem, smem_bytes, da, trans_a != 0, 64, f16, A, out.lines, out.hash, "A");
        if (!e.empty()) return e;
    }
    e = gather_operand(smem, smem_bytes, db, trans_b != 0, (u32)n, f16, B, out.lines, out.hash, "B");
    if (!e.empty()) return e;
    std::sort(out.lines.begin(), out.lines.end());
    out.lines.erase(std::unique(out.lines.begin(), out.lines.end()), out.lines.end());
    out.p.assign((size_t)64 * n, 0.0);
    const double sab = (double)scale_a * (double)scale_b;
    for (int m = 0; m < 64; ++m)
        for (int c = 0; c < n; ++c) {
            double acc = 0.0;
            for (int k = 0; k < 16; ++k) acc += (double)A[(size_t)m * 16 + k] * (double)B[(size_t)c * 16 + k];
            out.p[(size_t)m * n + c] = sab * acc;
        }
    return "";
}

// The emulator's tensor map (src/cuda/emulator.rs, encode_tensor_map): u64 words [magic, global
// address, rank | element bytes << 32, swizzle bytes, dims 0..4 (elements, innermost first; words
// 4..8), strides of dims 1..4 in bytes (words 9..12), box dims 0|1, 2|3, 4 (u32 pairs, words 13..15)].
// Dims and box dims at or past the rank are 1 in the decoded map.
constexpr u64 kTensorMapMagic = 0x000050414d544a46ull;  // "FJTMAP\0\0"
constexpr int kMaxRank = 5;
struct TensorMap {
    u64 addr;
    int rank;
    u64 dims[kMaxRank];
    u64 strides[kMaxRank - 1];  // of dims 1..4, bytes
    u32 box[kMaxRank];
    u32 elem;
    u32 swizzle;
};
inline std::string decode_tensor_map(const void* p, TensorMap& m) {
    u64 w[16];
    std::memcpy(w, p, sizeof w);
    if (w[0] != kTensorMapMagic) {
        char buf[160];
        snprintf(buf, sizeof buf,
                 "tensor map: first word %#llx is not the emulator's magic %#llx (a driver CUtensorMap, or "
                 "not a tensor map at all)",
                 (unsigned long long)w[0], (unsigned long long)kTensorMapMagic);
        return buf;
    }
    m.addr = w[1];
    m.rank = (int)(u32)w[2];
    m.elem = (u32)(w[2] >> 32);
    m.swizzle = (u32)w[3];
    if (m.rank < 1 || m.rank > kMaxRank) return "tensor map: rank " + std::to_string(m.rank) + " (1..5)";
    for (int i = 0; i < kMaxRank; ++i) {
        const bool in = i < m.rank;
        m.dims[i] = in ? w[4 + i] : 1;
        if (i > 0) m.strides[i - 1] = in ? w[8 + i] : 0;
        m.box[i] = in ? (u32)(w[13 + i / 2] >> (32 * (i % 2))) : 1;
    }
    if (m.elem != 1 && m.elem != 2 && m.elem != 4 && m.elem != 8) return "tensor map: element size " + std::to_string(m.elem);
    if (m.swizzle != 0 && m.swizzle != 32 && m.swizzle != 64 && m.swizzle != 128)
        return "tensor map: swizzle " + std::to_string(m.swizzle) + " bytes";
    for (int i = 0; i < m.rank; ++i) {
        if (m.dims[i] < 1 || m.dims[i] > (1ull << 32))
            return "tensor map: dimension " + std::to_string(i) + " is " + std::to_string(m.dims[i]) + " (1..2^32)";
        if (m.box[i] < 1 || m.box[i] > 256) return "tensor map: box dimension " + std::to_string(i) + " is " + std::to_string(m.box[i]) + " (1..256)";
    }
    if (m.swizzle != 0 && (u64)m.box[0] * m.elem != m.swizzle)
        return "tensor map: the inner box dimension is " + std::to_string(m.box[0] * m.elem) + " bytes, the swizzle " +
               std::to_string(m.swizzle) + " (the emulator supports inner box = swizzle span)";
    if (m.addr % 16) return "tensor map: address not a multiple of 16";
    for (int i = 1; i < m.rank; ++i)
        if (m.strides[i - 1] % 16 || m.strides[i - 1] >= (1ull << 40))
            return "tensor map: stride of dimension " + std::to_string(i) + " is " + std::to_string(m.strides[i - 1]) +
                   " bytes (a multiple of 16 below 2^40)";
    return "";
}
inline u32 tma_box_bytes(const TensorMap& m) {
    u32 n = m.elem;
    for (int i = 0; i < kMaxRank; ++i) n *= m.box[i];
    return n;
}

// One TMA tiled load of the box at element coordinates c[0..rank) (innermost first): element
// (x0, x1, ...) of the box is byte (((x4 * box3 + x3) * box2 + x2) * box1 + x1) * box0 + x0, times elem,
// of the box in shared memory, at the swizzled address; elements outside [0, dims) are zero. `staged`
// receives the box bytes indexed by shared address - dst (dst must be aligned to the swizzle's
// 1024/512/256-byte repeat so that this stays inside the box).
inline void tma_box_read(const TensorMap& m, const int* c, u32 dst, std::vector<unsigned char>& staged) {
    const u32 bytes = tma_box_bytes(m);
    staged.assign(bytes, 0);
    const u32 n = bytes / m.elem;
    for (u32 e = 0; e < n; ++e) {
        const u32 off = e * m.elem;
        const u32 at = swizzle_addr(dst + off, (int)m.swizzle) - dst;
        u32 rest = e;
        bool inside = true;
        u64 addr = m.addr;
        for (int i = 0; i < kMaxRank; ++i) {
            const long long x = (long long)(i < m.rank ? c[i] : 0) + (long long)(rest % m.box[i]);
            rest /= m.box[i];
            if (x < 0 || (u64)x >= m.dims[i]) inside = false;
            else addr += i == 0 ? (u64)x * m.elem : (u64)x * m.strides[i - 1];
        }
        if (!inside) continue;  // zero fill
        std::memcpy(&staged[at], reinterpret_cast<const unsigned char*>((uintptr_t)addr), m.elem);
    }
}

// =============================================================================================
// 2. Entry points for the kernel file (FJ_HOST_EMU). Addresses are shared-memory offsets (what
// fj_smem_addr returns); file / line name the call site in errors.
FJ_SM90_API void mbar_init(u32 bar, u32 count, const char* file, int line);
FJ_SM90_API void mbar_arrive(u32 bar, const char* file, int line);
FJ_SM90_API void mbar_arrive_expect_tx(u32 bar, u32 bytes, const char* file, int line);
// mbarrier.try_wait.parity in a loop until true: returns when the phase of parity `parity` completed.
FJ_SM90_API void mbar_wait_parity(u32 bar, u32 parity, const char* file, int line);
FJ_SM90_API void fence_mbarrier_init(const char* file, int line);
// cp.async.bulk.tensor.{rank}d: a tiled load of the box at coordinates c[0..rank) of a map of that rank.
FJ_SM90_API void tma_load(u32 dst, const void* map, u32 bar, int rank, const int* c, const char* file, int line);
inline void tma_load_3d(u32 dst, const void* map, u32 bar, int c0, int c1, int c2, const char* file, int line) {
    const int c[3] = {c0, c1, c2};
    tma_load(dst, map, bar, 3, c, file, line);
}
inline void tma_load_4d(u32 dst, const void* map, u32 bar, int c0, int c1, int c2, int c3, const char* file, int line) {
    const int c[4] = {c0, c1, c2, c3};
    tma_load(dst, map, bar, 4, c, file, line);
}
FJ_SM90_API void prefetch_tensormap(const void* map, const char* file, int line);
FJ_SM90_API void bar_sync(int id, int count, const char* file, int line);
FJ_SM90_API void bar_arrive(int id, int count, const char* file, int line);
FJ_SM90_API void wgmma_fence(const char* file, int line);
FJ_SM90_API void wgmma_commit(const char* file, int line);
FJ_SM90_API void wgmma_wait(int n, const char* file, int line);
// d: the thread's N/2 accumulator registers; a (rs): its 4 A-fragment registers. scale_d: the
// predicate (0: D = A B); scale_a / scale_b: the immediates (1 or -1); trans_*: the transpose immediates.
FJ_SM90_API void wgmma_ss(float* d, int n, bool f16, u64 da, u64 db, int scale_d, int scale_a, int scale_b,
                          int trans_a, int trans_b, const char* file, int line);
FJ_SM90_API void wgmma_rs(float* d, int n, bool f16, const u32* a, u64 db, int scale_d, int scale_a, int scale_b,
                          int trans_b, const char* file, int line);
FJ_SM90_API u32 dynamic_smem_size();
FJ_SM90_API void setmaxnreg(bool inc, u32 regs, const char* file, int line);

// Per-block hooks of the runtime: before a block's threads start (drops the previous block's state);
// when they have all exited (an error message, empty when none); what sleeping threads wait for (for a
// deadlock report; empty when the block used none of this).
void block_begin();
std::string block_end();
std::string describe();

}  // namespace fj_sm90
#endif  // FJ_SM90_H_API

// =============================================================================================
// 3. Implementation.
#if defined(FJ_SM90_RUNTIME) && !defined(FJ_SM90_IMPL)
#define FJ_SM90_IMPL
#endif
#if defined(FJ_SM90_IMPL) && !defined(FJ_SM90_H_IMPL)
#define FJ_SM90_H_IMPL
#include <deque>
#include <memory>

namespace fj_sm90 {

// The platform: provided by the runtime (runtime.cpp) or by the self-test.
namespace plat {
unsigned tid();        // linear index of the running CUDA thread in its block
unsigned nthreads();   // threads of the block
unsigned char* smem(); // the block's dynamic shared memory; shared address a is smem() + a
unsigned smem_bytes();
void block(const char* file, int line);   // the running thread sleeps until wake(its tid)
void wake(unsigned t);
[[noreturn]] void fail(const std::string& msg);  // an error of the launch blamed on the running thread
}  // namespace plat

namespace impl {

const u32 kNone = 0xffffffffu;
const u32 kAccPoison = 0x7fc0dead;  // a quiet NaN the accumulators hold while a wgmma is in flight

std::string at(const char* file, int line) {
    const char* s = file ? strrchr(file, '/') : nullptr;
    return std::string(s ? s + 1 : (file ? file : "?")) + ":" + std::to_string(line);
}
std::string hex(u64 v) {
    char b[32];
    snprintf(b, sizeof b, "%#llx", (unsigned long long)v);
    return b;
}

typedef std::vector<u32> Clock;  // one component per thread of the block
void join(Clock& a, const Clock& b) {
    for (size_t i = 0; i < a.size(); ++i) a[i] = std::max(a[i], b[i]);
}

struct Staged {
    u32 dst;
    std::vector<unsigned char> data;
};
struct MBar {
    u32 count = 0, pending = 0;
    long long tx = 0;
    u64 completed = 0;  // phases completed; the phase in progress has parity completed & 1
    Clock acc, done;    // releases so far; releases up to the last completion
    std::vector<Staged> staged;
    std::vector<unsigned> waiters;
    u64 marker = 0;  // what the 8 bytes of the barrier object hold
};
struct NBar {
    u32 count = 0, arrived = 0;
    u64 gen = 0;
    Clock acc, done;
    std::vector<unsigned> waiters;
    const char* file = nullptr;
    int line = 0;
};
// The reads of one wgmma: per thread of its warpgroup, that thread's clock when it completed the
// operation (wgmma.wait_group), 0 before.
struct ReadRec {
    unsigned t0 = 0;  // first thread of the warpgroup
    u32 epoch[128] = {};
    const char* file = nullptr;
    int line = 0;
};
struct Line {
    u32 wbar = kNone;  // barrier whose completion landed the last TMA write
    u64 wseq = 0;      // ... its completion number (1-based)
    bool pending = false;
    std::vector<std::shared_ptr<ReadRec>> readers;  // wgmma reads since that write
};
struct Op {
    int n = 0, wg = 0;
    Product prod;
    std::vector<float> result;  // [128][n/2]
    float* d[128];
    const u32* a[128];
    u32 a_snap[128][4];
    bool rs = false, write[128];
    unsigned threads_done = 0;
    std::shared_ptr<ReadRec> rec;
    bool verified = false;
    const unsigned char* smem = nullptr;
    u32 smem_bytes = 0;
    u64 da = 0, db = 0;
    bool f16 = false;
    int scale_a = 1, scale_b = 1, trans_a = 0, trans_b = 0;
    const char* file = nullptr;
    int line = 0;
};
struct Thread {
    bool fenced = false;
    std::vector<Op*> uncommitted;
    std::deque<std::vector<Op*>> groups;
    std::vector<std::pair<u32, u64>> observed;  // barrier -> completions observed
    std::vector<u64> nbar_gen;                  // per named barrier: generation this thread last arrived in
    u32 waiting_bar = kNone, waiting_parity = 0;  // for deadlock reports
    int waiting_nbar = -1;
    const char* wfile = nullptr;
    int wline = 0;
};
struct WgSlot {  // wgmma rendezvous of one warpgroup
    unsigned arrived = 0;
    u64 gen = 0;
    int n = 0, scale_d = 0, scale_a = 1, scale_b = 1, trans_a = 0, trans_b = 0;
    bool f16 = false, rs = false;
    u64 da = 0, db = 0;
    const char* file = nullptr;
    int line = 0;
    float* d[128];
    const u32* a[128];
    std::vector<unsigned> waiters;
};
struct Block {
    unsigned n = 0;
    unsigned char* smem = nullptr;
    u32 smem_bytes = 0;
    std::vector<Line> lines;
    std::vector<std::pair<u32, MBar>> bars;
    NBar nb[16];
    std::vector<Clock> clock;  // per thread: its view
    std::vector<Thread> th;
    std::vector<WgSlot> wg;
    std::vector<std::unique_ptr<Op>> ops;
};

thread_local Block* tls = nullptr;
thread_local Block tls_storage;

Block& blk() {
    if (!tls) {
        Block& B = tls_storage;
        B.n = plat::nthreads();
        B.smem = plat::smem();
        B.smem_bytes = plat::smem_bytes();
        B.lines.assign((B.smem_bytes + 127) / 128, Line());
        B.bars.clear();
        for (NBar& nb : B.nb) nb = NBar();
        for (NBar& nb : B.nb) nb.acc = nb.done = Clock(B.n, 0);
        B.clock.assign(B.n, Clock(B.n, 0));
        for (unsigned t = 0; t < B.n; ++t) B.clock[t][t] = 1;
        B.th.assign(B.n, Thread());
        for (Thread& t : B.th) t.nbar_gen.assign(16, ~0ull);
        B.wg.assign((B.n + 127) / 128, WgSlot());
        B.ops.clear();
        tls = &B;
    }
    return *tls;
}

[[noreturn]] void fail(const std::string& what, const char* file, int line) {
    plat::fail(file ? what + " at " + at(file, line) : what);
}

MBar& bar_of(Block& B, u32 bar, const char* op, const char* file, int line) {
    for (auto& p : B.bars)
        if (p.first == bar) {
            u64 v;
            std::memcpy(&v, B.smem + bar, 8);
            if (v != p.second.marker)
                fail(std::string(op) + ": the mbarrier object at shared offset " + hex(bar) +
                         " was overwritten since mbarrier.init (by a store or a copy)",
                     file, line);
            return p.second;
        }
    fail(std::string(op) + ": shared offset " + hex(bar) + " is not an initialised mbarrier", file, line);
}

void release(Block& B, Clock& into) {
    const unsigned t = plat::tid();
    join(into, B.clock[t]);
    B.clock[t][t]++;
}
void acquire(Block& B, const Clock& from) { join(B.clock[plat::tid()], from); }

u64& observed(Thread& t, u32 bar) {
    for (auto& p : t.observed)
        if (p.first == bar) return p.second;
    t.observed.push_back({bar, 0});
    return t.observed.back().second;
}

void complete_phase(Block& B, u32 bar, MBar& m) {
    m.completed++;
    m.done = m.acc;
    for (Staged& s : m.staged) {
        std::memcpy(B.smem + s.dst, s.data.data(), s.data.size());
        for (u32 l = s.dst / 128; l < (s.dst + (u32)s.data.size() + 127) / 128; ++l) {
            B.lines[l].pending = false;
            B.lines[l].wbar = bar;
            B.lines[l].wseq = m.completed;
        }
    }
    m.staged.clear();
    m.pending = m.count;
    for (unsigned t : m.waiters) plat::wake(t);
    m.waiters.clear();
}

void arrive_on(Block& B, u32 bar, MBar& m, const char* op, const char* file, int line) {
    if (m.pending == 0)
        fail(std::string(op) + " on the mbarrier at " + hex(bar) + ": more arrivals than its count " +
                 std::to_string(m.count) + " in one phase (phase " + std::to_string(m.completed) +
                 " still waits for " + std::to_string(m.tx) + " transaction bytes)",
             file, line);
    release(B, m.acc);
    m.pending--;
    if (m.pending == 0 && m.tx == 0) complete_phase(B, bar, m);
}

// ---- wgmma -----------------------------------------------------------------------------------
void complete_op_for(Block& B, Op& op, unsigned tid, const char* file, int line) {
    const unsigned lt = tid % 128;
    if (!op.verified) {  // the first wait on the operation: the bytes it read must still be there
        op.verified = true;
        Product again;
        std::string e;
        if (op.rs) {  // A came from registers: re-read B alone, hashed as at issue
            std::vector<float> tmp;
            again.hash = 0xcbf29ce484222325ull;
            e = gather_operand(op.smem, op.smem_bytes, op.db, op.trans_b != 0, (u32)op.n, op.f16, tmp, again.lines,
                               again.hash, "B");
        } else {
            e = wgmma_product(op.smem, op.smem_bytes, op.n, op.f16, op.da, nullptr, op.db, op.scale_a, op.scale_b,
                              op.trans_a, op.trans_b, again);
        }
        if (!e.empty() || again.hash != op.prod.hash)
            fail("wgmma.wait_group: shared memory read by the wgmma issued at " + at(op.file, op.line) +
                     " changed while it was in flight (a copy or store into an operand before the wait)",
                 file, line);
    }
    op.rec->epoch[lt] = B.clock[tid][tid];  // this thread's later releases order the reads
    if (op.write[lt]) {
        u32 bits[128];
        std::memcpy(bits, op.d[lt], sizeof(float) * (op.n / 2));
        for (int i = 0; i < op.n / 2; ++i)
            if (bits[i] != kAccPoison)
                fail("wgmma.wait_group: accumulator register " + std::to_string(i) +
                         " of the wgmma issued at " + at(op.file, op.line) +
                         " was written while the operation was in flight",
                     file, line);
        std::memcpy(op.d[lt], &op.result[(size_t)lt * (op.n / 2)], sizeof(float) * (op.n / 2));
    }
    if (op.rs && std::memcmp(op.a[lt], op.a_snap[lt], 16) != 0)
        fail("wgmma.wait_group: A-fragment registers of the wgmma issued at " + at(op.file, op.line) +
                 " changed while the operation was in flight",
             file, line);
    op.threads_done++;
}

void wgmma_issue(float* d, int n, bool f16, const u32* a, u64 da, u64 db, int scale_d, int scale_a, int scale_b,
                 int trans_a, int trans_b, bool rs, const char* file, int line) {
    Block& B = blk();
    const unsigned tid = plat::tid();
    if (B.n % 128 != 0 || tid / 128 >= B.wg.size())
        fail("wgmma.mma_async: the block (" + std::to_string(B.n) + " threads) is not whole warpgroups", file, line);
    if (n % 8 != 0 || n < 8 || n > 256) fail("wgmma.mma_async: N = " + std::to_string(n), file, line);
    Thread& T = B.th[tid];
    if (!T.fenced)
        fail("wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group (or the kernel start): the "
             "accumulator / A registers may be stale",
             file, line);
    WgSlot& S = B.wg[tid / 128];
    const unsigned lt = tid % 128;
    if (S.arrived == 0) {
        S.n = n;
        S.f16 = f16;
        S.rs = rs;
        S.da = da;
        S.db = db;
        S.scale_d = scale_d;
        S.scale_a = scale_a;
        S.scale_b = scale_b;
        S.trans_a = trans_a;
        S.trans_b = trans_b;
        S.file = file;
        S.line = line;
    } else if (S.n != n || S.f16 != f16 || S.rs != rs || S.db != db || (!rs && S.da != da) || S.scale_d != scale_d ||
               S.scale_a != scale_a || S.scale_b != scale_b || S.trans_a != trans_a || S.trans_b != trans_b ||
               S.line != line || strcmp(S.file ? S.file : "", file ? file : "") != 0) {
        fail("divergent wgmma.mma_async: this thread issues m64n" + std::to_string(n) + "k16 (descriptors " +
                 hex(da) + ", " + hex(db) + ", scale-d " + std::to_string(scale_d) + ") at " + at(file, line) +
                 " while " + std::to_string(S.arrived) + " threads of its warpgroup issue m64n" + std::to_string(S.n) +
                 "k16 (" + hex(S.da) + ", " + hex(S.db) + ", scale-d " + std::to_string(S.scale_d) + ") at " +
                 at(S.file, S.line) + " (all 128 threads must issue the same wgmma)",
             nullptr, 0);
    }
    S.d[lt] = d;
    S.a[lt] = a;
    S.arrived++;
    if (S.arrived < 128) {
        const u64 gen = S.gen;
        S.waiters.push_back(tid);
        T.wfile = file;
        T.wline = line;
        while (S.gen == gen) plat::block(file, line);
        T.wfile = nullptr;
        return;
    }
    // The last of the 128: compute for all.
    auto op = std::make_unique<Op>();
    op->n = n;
    op->wg = (int)(tid / 128);
    op->rs = rs;
    op->smem = B.smem;
    op->smem_bytes = B.smem_bytes;
    op->da = da;
    op->db = db;
    op->f16 = f16;
    op->scale_a = scale_a;
    op->scale_b = scale_b;
    op->trans_a = trans_a;
    op->trans_b = trans_b;
    op->file = file;
    op->line = line;
    std::vector<float> A;
    if (rs) {
        A.assign(64 * 16, 0.f);
        for (int t = 0; t < 128; ++t)
            for (int j = 0; j < 8; ++j) {
                int r, k;
                afrag_coord(t, j, r, k);
                const u32 reg = S.a[t][j >> 1];
                A[(size_t)r * 16 + k] = half_to_f32((uint16_t)((j & 1) ? reg >> 16 : reg & 0xffff), f16);
            }
        for (int t = 0; t < 128; ++t) {
            op->a[t] = S.a[t];
            std::memcpy(op->a_snap[t], S.a[t], 16);
        }
    }
    std::string e = wgmma_product(B.smem, B.smem_bytes, n, f16, da, rs ? A.data() : nullptr, db, scale_a, scale_b,
                                  trans_a, trans_b, op->prod);
    if (!e.empty()) fail("wgmma.mma_async: " + e, file, line);
    // Every line read: landed, written by a TMA whose completion every thread of the warpgroup observed.
    std::vector<std::pair<u32, u64>> need;
    const unsigned t0 = (tid / 128) * 128;
    for (u32 l : op->prod.lines) {
        const Line& L = B.lines[l];
        if (L.pending)
            fail("wgmma.mma_async reads shared memory [" + hex(l * 128) + ", +128) while a TMA copy into it is in "
                 "flight (no wait on its mbarrier)",
                 file, line);
        if (L.wbar == kNone)
            fail("wgmma.mma_async reads shared memory [" + hex(l * 128) +
                     ", +128) that no TMA copy wrote (uninitialised; generic-proxy stores are not tracked)",
                 file, line);
        bool have = false;
        for (auto& p : need)
            if (p.first == L.wbar) {
                p.second = std::max(p.second, L.wseq);
                have = true;
            }
        if (!have) need.push_back({L.wbar, L.wseq});
    }
    for (auto& p : need)
        for (unsigned t = t0; t < t0 + 128; ++t)
            if (observed(B.th[t], p.first) < p.second)
                fail("wgmma.mma_async reads shared memory that a TMA copy landed with completion " +
                         std::to_string(p.second) + " of the mbarrier at " + hex(p.first) + ", but thread " +
                         std::to_string(t) + " of the warpgroup has observed only " +
                         std::to_string(observed(B.th[t], p.first)) +
                         " completions of it (a missing or wrong-parity wait on the \"full\" barrier)",
                     file, line);
    op->rec = std::make_shared<ReadRec>();
    op->rec->t0 = t0;
    op->rec->file = file;
    op->rec->line = line;
    for (u32 l : op->prod.lines) B.lines[l].readers.push_back(op->rec);
    // Accumulators: the input is the pending result of the last in-flight wgmma on the same registers.
    const int nh = n / 2;
    op->result.assign((size_t)128 * nh, 0.f);
    for (int t = 0; t < 128; ++t) {
        Thread& Tt = B.th[t0 + t];
        float* in = nullptr;
        Op* prev = nullptr;
        auto scan = [&](std::vector<Op*>& v) {
            for (Op* o : v)
                if (o->d[t] == S.d[t]) prev = o;
        };
        for (auto& g : Tt.groups) scan(g);
        scan(Tt.uncommitted);
        if (prev) {
            if (prev->n != n)
                fail("wgmma.mma_async: thread " + std::to_string(t0 + t) +
                         "'s accumulator registers are in flight in a wgmma of another shape",
                     file, line);
            in = &prev->result[(size_t)t * nh];
            prev->write[t] = false;
        } else {
            in = S.d[t];
            u32 bits[128];
            std::memcpy(bits, in, sizeof(float) * nh);
            for (int i = 0; i < nh; ++i)
                if (bits[i] == kAccPoison)
                    fail("wgmma.mma_async: thread " + std::to_string(t0 + t) + "'s accumulator register " +
                             std::to_string(i) + " still holds the poison of an earlier wgmma never waited for",
                         file, line);
        }
        for (int i = 0; i < nh; ++i) {
            int r, c;
            acc_coord(t, i, r, c);
            const double base = scale_d ? (double)in[i] : 0.0;
            op->result[(size_t)t * nh + i] = (float)(base + op->prod.p[(size_t)r * n + c]);
        }
        op->d[t] = S.d[t];
        op->write[t] = true;
    }
    for (int t = 0; t < 128; ++t) {
        const u32 poison = kAccPoison;
        for (int i = 0; i < nh; ++i) std::memcpy(&S.d[t][i], &poison, 4);
        B.th[t0 + t].uncommitted.push_back(op.get());
    }
    B.ops.push_back(std::move(op));
    S.arrived = 0;
    S.gen++;
    for (unsigned t : S.waiters) plat::wake(t);
    S.waiters.clear();
}

}  // namespace impl

// ---- entry points ------------------------------------------------------------------------------
using namespace impl;

void mbar_init(u32 bar, u32 count, const char* file, int line) {
    Block& B = blk();
    if (bar % 8 != 0 || (u64)bar + 8 > B.smem_bytes)
        fail("mbarrier.init: shared offset " + hex(bar) + " is not an 8-byte aligned location in the " +
                 std::to_string(B.smem_bytes) + "-byte dynamic shared memory",
             file, line);
    if (count < 1 || count > (1u << 20) - 1) fail("mbarrier.init: count " + std::to_string(count), file, line);
    MBar* m = nullptr;
    for (auto& p : B.bars)
        if (p.first == bar) m = &p.second;
    if (m && !m->waiters.empty()) fail("mbarrier.init on a barrier that threads wait on", file, line);
    if (!m) {
        B.bars.push_back({bar, MBar()});
        m = &B.bars.back().second;
    }
    *m = MBar();
    m->count = m->pending = count;
    m->acc = m->done = Clock(B.n, 0);
    m->marker = 0x4d42415200000000ull | ((u64)bar << 8) | count;  // "MBAR"
    std::memcpy(B.smem + bar, &m->marker, 8);
    for (Thread& t : B.th) observed(t, bar) = 0;
}

void mbar_arrive(u32 bar, const char* file, int line) {
    Block& B = blk();
    arrive_on(B, bar, bar_of(B, bar, "mbarrier.arrive", file, line), "mbarrier.arrive", file, line);
}

void mbar_arrive_expect_tx(u32 bar, u32 bytes, const char* file, int line) {
    Block& B = blk();
    MBar& m = bar_of(B, bar, "mbarrier.arrive.expect_tx", file, line);
    m.tx += bytes;
    arrive_on(B, bar, m, "mbarrier.arrive.expect_tx", file, line);
}

void mbar_wait_parity(u32 bar, u32 parity, const char* file, int line) {
    Block& B = blk();
    const unsigned tid = plat::tid();
    Thread& T = B.th[tid];
    for (;;) {
        MBar& m = bar_of(B, bar, "mbarrier.try_wait.parity", file, line);
        if ((m.completed & 1) != (parity & 1)) {
            acquire(B, m.done);
            observed(T, bar) = m.completed;
            T.waiting_bar = kNone;
            return;
        }
        m.waiters.push_back(tid);
        T.waiting_bar = bar;
        T.waiting_parity = parity & 1;
        T.wfile = file;
        T.wline = line;
        plat::block(file, line);
    }
}

void fence_mbarrier_init(const char*, int) {}

void prefetch_tensormap(const void* map, const char* file, int line) {
    TensorMap m;
    const std::string e = decode_tensor_map(map, m);
    if (!e.empty()) fail("prefetch.tensormap: " + e, file, line);
}

void tma_load(u32 dst, const void* map, u32 bar, int rank, const int* c, const char* file, int line) {
    Block& B = blk();
    const std::string op = "cp.async.bulk.tensor." + std::to_string(rank) + "d";
    TensorMap m;
    std::string e = decode_tensor_map(map, m);
    if (!e.empty()) fail(op + ": " + e, file, line);
    if (m.rank != rank)
        fail(op + ": the tensor map has rank " + std::to_string(m.rank) + " (a ." + std::to_string(m.rank) +
                 "d copy reads it)",
             file, line);
    const u32 bytes = tma_box_bytes(m);
    const u32 align = m.swizzle == 128 ? 1024 : m.swizzle == 64 ? 512 : m.swizzle == 32 ? 256 : 128;
    if (dst % align != 0 || (u64)dst + bytes > B.smem_bytes)
        fail(std::string(op) + ": destination [" + hex(dst) + ", +" + std::to_string(bytes) + ") is not " +
                 std::to_string(align) + "-byte aligned (" + std::to_string(m.swizzle) +
                 "-byte swizzle) or not inside the " + std::to_string(B.smem_bytes) + "-byte dynamic shared memory",
             file, line);
    MBar& mb = bar_of(B, bar, op.c_str(), file, line);
    for (auto& p : B.bars)
        if (p.first + 8 > dst && p.first < dst + bytes)
            fail(std::string(op) + ": the destination [" + hex(dst) + ", +" + std::to_string(bytes) +
                     ") covers the mbarrier object at " + hex(p.first),
                 file, line);
    const Clock& mine = B.clock[plat::tid()];
    std::vector<const ReadRec*> ordered;  // read records already found ordered before this copy
    for (u32 l = dst / 128; l < (dst + bytes + 127) / 128; ++l) {
        const Line& L = B.lines[l];
        if (L.pending)
            fail(std::string(op) + ": shared memory [" + hex(l * 128) +
                     ", +128) already has a TMA copy in flight (overlapping copies before their barrier completed)",
                 file, line);
        if (L.wbar != kNone) {  // the data there now: did any thread wait for it?
            bool seen = false;
            for (Thread& t : B.th) seen = seen || observed(t, L.wbar) >= L.wseq;
            if (!seen)
                fail(std::string(op) + " overwrites shared memory [" + hex(l * 128) +
                         ", +128) that a TMA copy landed with completion " + std::to_string(L.wseq) +
                         " of the mbarrier at " + hex(L.wbar) +
                         ", which no thread has waited for yet (a refill before the consumers released the "
                         "stage: a missing or wrong-parity wait on the \"empty\" barrier)",
                     file, line);
        }
        for (const auto& rec : L.readers) {
            if (std::find(ordered.begin(), ordered.end(), rec.get()) != ordered.end()) continue;
            bool done = false, ok = false;
            for (unsigned lt = 0; lt < 128 && !ok; ++lt)
                if (rec->epoch[lt]) {
                    done = true;
                    ok = mine[rec->t0 + lt] >= rec->epoch[lt];
                }
            if (!done)
                fail(std::string(op) + " overwrites shared memory [" + hex(l * 128) + ", +128) that the wgmma issued at " +
                         at(rec->file, rec->line) + " by warpgroup " + std::to_string(rec->t0 / 128) +
                         " still reads (no thread has waited for it: wgmma.wait_group and an \"empty\" barrier "
                         "must come before the refill)",
                     file, line);
            if (!ok)
                fail(std::string(op) + " overwrites shared memory [" + hex(l * 128) + ", +128) that the wgmma issued at " +
                         at(rec->file, rec->line) + " by warpgroup " + std::to_string(rec->t0 / 128) +
                         " read, but no thread of that warpgroup released to this thread after completing the read "
                         "(an arrive on the \"empty\" barrier before wgmma.wait_group, or a missing or "
                         "wrong-parity wait on it: the refill races with the reader)",
                     file, line);
            ordered.push_back(rec.get());
        }
    }
    Staged s;
    s.dst = dst;
    tma_box_read(m, c, dst, s.data);
    std::memset(B.smem + dst, 0xff, bytes);  // poison until the copy lands
    for (u32 l = dst / 128; l < (dst + bytes + 127) / 128; ++l) {
        B.lines[l].pending = true;
        B.lines[l].readers.clear();
    }
    mb.staged.push_back(std::move(s));
    mb.tx -= bytes;  // complete_tx
    if (mb.pending == 0 && mb.tx == 0) complete_phase(B, bar, mb);
}

namespace {
void check_nbar(Block& B, int id, int count, const char* op, const char* file, int line) {
    if (id < 1 || id > 15)
        fail(std::string(op) + ": barrier id " + std::to_string(id) +
                 " (1..15; 0 is __syncthreads, which the emulator keeps apart)",
             file, line);
    if (count <= 0 || count % 32 != 0 || (unsigned)count > B.n)
        fail(std::string(op) + ": thread count " + std::to_string(count) +
                 " (a positive multiple of 32, at most the block's " + std::to_string(B.n) + ")",
             file, line);
}
// Returns the generation the arrival belongs to.
u64 nbar_arrive(Block& B, int id, int count, const char* op, const char* file, int line) {
    NBar& nb = B.nb[id];
    Thread& T = B.th[plat::tid()];
    if (nb.arrived == 0) {
        nb.count = (u32)count;
        nb.file = file;
        nb.line = line;
    } else if (nb.count != (u32)count)
        fail(std::string(op) + " " + std::to_string(id) + " with count " + std::to_string(count) + " while " +
                 std::to_string(nb.arrived) + " threads arrived with count " + std::to_string(nb.count) + " (at " +
                 at(nb.file, nb.line) + ")",
             file, line);
    if (T.nbar_gen[id] == nb.gen)
        fail(std::string(op) + " " + std::to_string(id) + ": this thread already arrived in this phase of the barrier",
             file, line);
    T.nbar_gen[id] = nb.gen;
    release(B, nb.acc);
    const u64 gen = nb.gen;
    if (++nb.arrived == nb.count) {
        nb.arrived = 0;
        nb.gen++;
        nb.done = nb.acc;
        for (unsigned t : nb.waiters) plat::wake(t);
        nb.waiters.clear();
    }
    return gen;
}
}  // namespace

void bar_sync(int id, int count, const char* file, int line) {
    Block& B = blk();
    check_nbar(B, id, count, "bar.sync", file, line);
    const u64 gen = nbar_arrive(B, id, count, "bar.sync", file, line);
    NBar& nb = B.nb[id];
    Thread& T = B.th[plat::tid()];
    while (nb.gen == gen) {
        nb.waiters.push_back(plat::tid());
        T.waiting_nbar = id;
        T.wfile = file;
        T.wline = line;
        plat::block(file, line);
    }
    T.waiting_nbar = -1;
    acquire(B, nb.done);
}

void bar_arrive(int id, int count, const char* file, int line) {
    Block& B = blk();
    check_nbar(B, id, count, "bar.arrive", file, line);
    nbar_arrive(B, id, count, "bar.arrive", file, line);
}

void wgmma_fence(const char*, int) { blk().th[plat::tid()].fenced = true; }

void wgmma_commit(const char*, int) {
    Thread& T = blk().th[plat::tid()];
    T.groups.push_back(std::move(T.uncommitted));
    T.uncommitted.clear();
}

void wgmma_wait(int n, const char* file, int line) {
    Block& B = blk();
    const unsigned tid = plat::tid();
    Thread& T = B.th[tid];
    if (n < 0 || n > 7) fail("wgmma.wait_group " + std::to_string(n) + " (0..7)", file, line);
    while (T.groups.size() > (size_t)n) {
        for (Op* op : T.groups.front()) complete_op_for(B, *op, tid, file, line);
        T.groups.pop_front();
    }
    T.fenced = false;
    // Free operations every thread has completed.
    B.ops.erase(std::remove_if(B.ops.begin(), B.ops.end(),
                               [](const std::unique_ptr<Op>& o) { return o->threads_done == 128; }),
                B.ops.end());
}

void wgmma_ss(float* d, int n, bool f16, u64 da, u64 db, int scale_d, int scale_a, int scale_b, int trans_a,
              int trans_b, const char* file, int line) {
    wgmma_issue(d, n, f16, nullptr, da, db, scale_d, scale_a, scale_b, trans_a, trans_b, false, file, line);
}

void wgmma_rs(float* d, int n, bool f16, const u32* a, u64 db, int scale_d, int scale_a, int scale_b, int trans_b,
              const char* file, int line) {
    wgmma_issue(d, n, f16, a, 0, db, scale_d, scale_a, scale_b, 0, trans_b, true, file, line);
}

u32 dynamic_smem_size() { return plat::smem_bytes(); }

void setmaxnreg(bool, u32 regs, const char* file, int line) {
    if (regs < 24 || regs > 256 || regs % 8 != 0)
        fail("setmaxnreg " + std::to_string(regs) + " (24..256, a multiple of 8)", file, line);
}

// ---- per-block hooks for the runtime -------------------------------------------------------------
void block_begin() { impl::tls = nullptr; }

std::string block_end() {
    impl::Block* B = impl::tls;
    impl::tls = nullptr;
    if (!B) return "";
    for (unsigned t = 0; t < B->n; ++t) {
        const impl::Thread& T = B->th[t];
        if (!T.uncommitted.empty() || !T.groups.empty())
            return "thread " + std::to_string(t) + " exited with wgmma operations in flight (no wgmma.wait_group "
                   "after " + at(T.uncommitted.empty() ? T.groups.back().back()->file : T.uncommitted.back()->file,
                                 T.uncommitted.empty() ? T.groups.back().back()->line : T.uncommitted.back()->line) +
                   ")";
    }
    for (auto& p : B->bars) {
        if (!p.second.staged.empty() || p.second.tx != 0)
            return "the mbarrier at " + hex(p.first) + " ends the block with " + std::to_string(p.second.staged.size()) +
                   " TMA copies that never landed and a transaction count of " + std::to_string(p.second.tx) +
                   " (expect_tx and the copies' bytes disagree)";
    }
    for (int id = 1; id < 16; ++id)
        if (B->nb[id].arrived)
            return "named barrier " + std::to_string(id) + " ends the block with " +
                   std::to_string(B->nb[id].arrived) + " of " + std::to_string(B->nb[id].count) +
                   " threads arrived (last arrival phase never completed; first arrival at " +
                   at(B->nb[id].file, B->nb[id].line) + ")";
    return "";
}

// Grouped by what the threads wait on.
std::string describe() {
    impl::Block* B = impl::tls;
    if (!B) return "";
    std::vector<std::pair<std::string, std::pair<unsigned, unsigned>>> groups;  // what -> (first thread, count)
    for (unsigned t = 0; t < B->n; ++t) {
        const impl::Thread& T = B->th[t];
        std::string what;
        if (T.waiting_bar != impl::kNone) {
            for (auto& p : B->bars)
                if (p.first == T.waiting_bar) {
                    const impl::MBar& m = p.second;
                    what = "at " + impl::at(T.wfile, T.wline) + " for parity " + std::to_string(T.waiting_parity) +
                           " of the mbarrier at " + impl::hex(p.first) + " (phase " + std::to_string(m.completed) +
                           " in progress, parity " + std::to_string(m.completed & 1) + ": " +
                           std::to_string(m.pending) + " of " + std::to_string(m.count) + " arrivals and " +
                           std::to_string(m.tx) + " transaction bytes outstanding)";
                }
        } else if (T.waiting_nbar >= 0) {
            const impl::NBar& nb = B->nb[T.waiting_nbar];
            what = "at " + impl::at(T.wfile, T.wline) + " on named barrier " + std::to_string(T.waiting_nbar) + " (" +
                   std::to_string(nb.arrived) + " of " + std::to_string(nb.count) + " arrived)";
        }
        if (what.empty()) continue;
        bool found = false;
        for (auto& g : groups)
            if (g.first == what) {
                g.second.second++;
                found = true;
            }
        if (!found) groups.push_back({what, {t, 1}});
    }
    std::string s;
    for (auto& g : groups)
        s += " " + std::to_string(g.second.second) + (g.second.second == 1 ? " thread (" : " threads (first ") +
             std::to_string(g.second.first) + (g.second.second == 1 ? ") waits " : ") wait ") + g.first + ";";
    for (size_t g = 0; g < B->wg.size(); ++g)
        if (B->wg[g].arrived)
            s += " warpgroup " + std::to_string(g) + ": " + std::to_string(B->wg[g].arrived) +
                 " of 128 threads wait in wgmma.mma_async at " + impl::at(B->wg[g].file, B->wg[g].line) + ";";
    return s;
}

}  // namespace fj_sm90
#endif  // FJ_SM90_IMPL

// =============================================================================================
// The platform on runtime.cpp's fibers (included at the end of runtime.cpp with FJ_SM90_RUNTIME, where
// its internals are visible). A sleeping thread is parked as AT_WARP without a warp-slot arrival: no
// barrier or warp collective wakes it, only wake(); a round with nothing runnable is the runtime's
// deadlock, whose report appends describe().
#if defined(FJ_SM90_RUNTIME) && !defined(FJ_SM90_H_RUNTIME)
#define FJ_SM90_H_RUNTIME
namespace fj_sm90 {
namespace plat {
unsigned tid() { return fj_emu::current("sm90")->linear; }
unsigned nthreads() { return fj_emu::current("sm90")->blk->n; }
unsigned char* smem() { return fj_emu::current("sm90")->blk->smem; }
unsigned smem_bytes() { return fj_emu::current("sm90")->blk->smem_bytes; }
void block(const char* file, int line) {
    fj_emu::Fiber* f = fj_emu::current("sm90");
    fj_emu::set_state(*f->blk, f->linear, fj_emu::AT_WARP);
    f->site_file = file;
    f->site_line = line;
    fj_emu::yield(f);
}
void wake(unsigned t) { fj_emu::set_state(*fj_emu::current("sm90")->blk, t, fj_emu::RUNNABLE); }
void fail(const std::string& msg) {  // FJ_FAIL(f, f, msg), spelled out with qualified names
    fj_emu::Fiber* f = fj_emu::current("sm90");
    fj_emu::Block& b = *f->blk;
    if (!b.failed) {
        b.failed = true;
        b.err = fj_emu::who(*f) + ": " + msg;
    }
    fj_emu::abandon(f);
}
}  // namespace plat
}  // namespace fj_sm90
#endif  // FJ_SM90_RUNTIME
