// selftest.cpp: standalone checks of the host CUDA emulator (build.sh --selftest OUT_DIR builds and runs
// it, linked against OUT_DIR/libfjemu.so). Each check prints one line; the exit status is the number of
// failed checks (0: all passed).
//
//  1. primitives, with small kernels defined here: mma.m16n8k16 bf16/f16 against a naive product of the
//     fragments assembled per the PTX ISA formulas; ldmatrix .x4 / .x4.trans; shuffles; __syncthreads
//     ordering (and a missing barrier showing as poison); cp.async deferral and zero fill; atomicAdd
//     across OS threads; cvt packing order and rounding;
//  2. errors, not hangs: divergent barriers, a collective waiting for an exited lane, a barrier/collective
//     deadlock, divergent collectives, cp.async outside the shared window, SIGSEGV reporting (in a child);
//  3. real kernels of the library against naive f64 references, with launch timings: layernorm_mod,
//     attention forward and JVP (bf16 d64, bf16 d72 at B1 H2 N300, f32 d72, f16 d128/dv64);
//  4. concurrent launches from two OS threads, the error string being per thread.
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "emu/fj_emu.h"
#include "common.cuh"

extern "C" {
int fj_emu_launch(const char* kernel, const unsigned grid[3], const unsigned block[3], unsigned dynamic_shared_bytes,
                  void** params, unsigned long long seed, int workers);
const char* fj_emu_error(void);
int fj_emu_kernel_count(void);
const char* fj_emu_kernel_name(int i);
}

// ---------------------------------------------------------------------------------------------
// Test kernels.

// One warp: D = A B + C through fj_mma16816, fragments gathered per the PTX ISA formulas for
// mma.m16n8k16 .f16/.bf16 (groupID = lane >> 2, threadID_in_group = lane % 4):
//   A: row = groupID for a_i with 0 <= i < 2 || 4 <= i < 6, else groupID + 8;
//      col = threadID_in_group * 2 + (i & 1) (+ 8 for i >= 4)
//   B: row = threadID_in_group * 2 + (i & 1) (+ 8 for i >= 2); col = groupID
//   C: row = groupID for c_i with i < 2, else groupID + 8; col = threadID_in_group * 2 + (i & 1)
// Element i of a fragment is half (i & 1) of register i / 2, the lower index in the lower half.
extern "C" __global__ void selftest_mma(const fj_u16* A, const fj_u16* B, const float* C, float* D, int f16) {
    const int lane = threadIdx.x, gid = lane >> 2, tig = lane % 4;
    fj_u32 a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
    for (int i = 0; i < 8; ++i) {
        const int row = (i < 2 || (4 <= i && i < 6)) ? gid : gid + 8;
        const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        a[i / 2] |= (fj_u32)A[row * 16 + col] << (16 * (i & 1));
    }
    for (int i = 0; i < 4; ++i) {
        const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
        b[i / 2] |= (fj_u32)B[row * 8 + gid] << (16 * (i & 1));
    }
    float d[4];
    for (int i = 0; i < 4; ++i) d[i] = C[(i < 2 ? gid : gid + 8) * 8 + tig * 2 + (i & 1)];
    if (f16) fj_mma16816<true>(d, a, b[0], b[1]);
    else fj_mma16816<false>(d, a, b[0], b[1]);
    for (int i = 0; i < 4; ++i) D[(i < 2 ? gid : gid + 8) * 8 + tig * 2 + (i & 1)] = d[i];
}
FJ_REGISTER(selftest_mma)

// One warp: four 8x8 matrices in shared memory, rows 24 elements apart (padding), matrix j row r at row
// 8j + r; element (j, r, c) = 1 + 64 j + 8 r + c. out[lane][0..3] plain, out[lane][4..7] transposed.
extern "C" __global__ void selftest_ldmatrix(fj_u32* out) {
    FJ_DYN_SMEM(fj_smem);
    fj_u16* s = reinterpret_cast<fj_u16*>(fj_smem);
    const int lane = threadIdx.x;
    for (int e = lane; e < 32 * 24; e += 32) {
        const int row = e / 24, c = e % 24;
        s[e] = c < 8 ? (fj_u16)(1 + 64 * (row / 8) + 8 * (row % 8) + c) : (fj_u16)0;
    }
    __syncthreads();
    fj_u32 r[4], t[4];
    const fj_u32 addr = fj_smem_addr(s + lane * 24);  // lane l: row l % 8 of matrix l / 8
    fj_ldmatrix_x4(r, addr);
    fj_ldmatrix_x4_trans(t, addr);
    for (int j = 0; j < 4; ++j) {
        out[lane * 8 + j] = r[j];
        out[lane * 8 + 4 + j] = t[j];
    }
}
FJ_REGISTER(selftest_ldmatrix)

// 64 threads (two warps): shuffles of v = 1000 * warp + lane.
extern "C" __global__ void selftest_shfl(int* out) {
    const int tid = threadIdx.x, lane = tid & 31;
    const int v = 1000 * (tid >> 5) + lane;
    int k = 0;
    int* o = out + tid * 8;
    o[k++] = __shfl_xor_sync(0xffffffffu, v, 1);
    o[k++] = __shfl_xor_sync(0xffffffffu, v, 16);
    o[k++] = __shfl_sync(0xffffffffu, v, (lane + 5) & 31);
    o[k++] = __shfl_sync(0xffffffffu, v, 3, 8);       // lane (lane / 8) * 8 + 3
    o[k++] = __shfl_xor_sync(0xffffffffu, v, 12, 8);  // lane ^ 12 when inside the 8-group, else own
    const float f = __shfl_xor_sync(0xffffffffu, (float)v + 0.5f, 7);
    o[k++] = (int)(f * 2.f);
    o[k++] = (int)fj_warp_sum((float)lane);
    // vote.any: one lane true (lane 5 of warp 0, 25 of warp 1) gives 1, none gives 0.
    const int any = __any_sync(0xffffffffu, lane == 5 + 20 * (tid >> 5)) + 10 * __any_sync(0xffffffffu, 0);
    o[k++] = (int)fj_warp_max((float)((lane * 7) % 32)) + 100 * any;
}
FJ_REGISTER(selftest_shfl)

// Barrier ordering: s[tid] = tid; barrier; read the neighbour. Without the barrier (bar = 0) the read
// may see the 0xff poison of an unwritten slot.
extern "C" __global__ void selftest_sync(float* out, int bar) {
    FJ_DYN_SMEM(fj_smem);
    float* s = reinterpret_cast<float*>(fj_smem);
    const int n = blockDim.x, tid = threadIdx.x;
    s[tid] = (float)tid;
    if (bar) __syncthreads();
    out[blockIdx.x * n + tid] = s[(tid + 1) % n];
    if (bar) __syncthreads();
    s[tid] = -1.f;  // a second phase: the reads above must all be done
    if (bar) __syncthreads();
    out[gridDim.x * n + blockIdx.x * n + tid] = s[(tid + 7) % n];
}
FJ_REGISTER(selftest_sync)

// cp.async: 32 threads, each copies 16 bytes of src into its own 16-byte slot. out[tid][k]:
//   0: own slot before the wait (poison); 1: after wait_group 0; 2: the neighbour's slot after a
//   barrier but before the neighbour's wait (poison); 3: with src_bytes 8, float 2 after the wait
//   (zero fill); 4: with src_bytes 0, float 0 (zero); 5, 6: two groups, wait_group 1 retires the
//   older only: the older slot's value, then the newer slot (still poison).
extern "C" __global__ void selftest_cpasync(const float* src, float* out) {
    FJ_DYN_SMEM(fj_smem);
    float* s = reinterpret_cast<float*>(fj_smem);
    const int tid = threadIdx.x;
    float* o = out + tid * 8;
    const fj_u32 slot = fj_smem_addr(s + 4 * tid);
    fj_cp_async16(slot, src + 4 * tid, 16);
    fj_cp_async_commit();
    o[0] = s[4 * tid];
    __syncthreads();
    o[2] = s[4 * ((tid + 1) % 32)];
    __syncthreads();
    fj_cp_async_wait<0>();
    o[1] = s[4 * tid];
    __syncthreads();
    fj_cp_async16(slot, src + 4 * tid, 8);
    fj_cp_async_commit();
    fj_cp_async_wait<0>();
    o[3] = s[4 * tid + 2];
    fj_cp_async16(slot, src, 0);
    fj_cp_async_commit();
    fj_cp_async_wait<0>();
    o[4] = s[4 * tid];
    const fj_u32 slot2 = fj_smem_addr(s + 128 + 4 * tid);
    fj_cp_async16(slot, src + 4 * tid, 16);
    fj_cp_async_commit();
    fj_cp_async16(slot2, src + 4 * tid, 16);
    fj_cp_async_commit();
    fj_cp_async_wait<1>();
    o[5] = s[4 * tid];
    o[6] = s[128 + 4 * tid];
    fj_cp_async_wait<0>();
    o[7] = s[128 + 4 * tid];
}
FJ_REGISTER(selftest_cpasync)

extern "C" __global__ void selftest_atomic(float* acc) { atomicAdd(acc + (threadIdx.x & 1), 1.0f); }
FJ_REGISTER(selftest_atomic)

// Error cases (each must make fj_emu_launch return non-zero, promptly).
extern "C" __global__ void selftest_divergent_bar(int) {
    if (threadIdx.x < 64) __syncthreads();
    else __syncthreads();
}
FJ_REGISTER(selftest_divergent_bar)
extern "C" __global__ void selftest_exited_lane(float* out) {
    if ((threadIdx.x & 31) == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}
FJ_REGISTER(selftest_exited_lane)
extern "C" __global__ void selftest_bar_vs_warp(float* out) {
    if ((threadIdx.x & 31) == 0) __syncthreads();
    else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}
FJ_REGISTER(selftest_bar_vs_warp)
extern "C" __global__ void selftest_divergent_shfl(float* out) {
    float v = 1.f;
    if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else v = __shfl_xor_sync(0xffffffffu, v, 2);
    out[threadIdx.x] = v;
}
FJ_REGISTER(selftest_divergent_shfl)
extern "C" __global__ void selftest_ldmatrix_partial(fj_u32* out) {
    FJ_DYN_SMEM(fj_smem);
    fj_u32 r[4];
    if (threadIdx.x < 31) fj_ldmatrix_x4(r, fj_smem_addr(fj_smem));  // lane 31 skips: never completes
    out[threadIdx.x] = 0;
}
FJ_REGISTER(selftest_ldmatrix_partial)
extern "C" __global__ void selftest_poison_ldmatrix(fj_u32* out) {
    FJ_DYN_SMEM(fj_smem);  // never written: ldmatrix must report the poison
    fj_u32 r[4];
    fj_ldmatrix_x4(r, fj_smem_addr(fj_smem + (threadIdx.x & 31) * 16));
    out[threadIdx.x] = r[0];
}
FJ_REGISTER(selftest_poison_ldmatrix)

// A 16-byte vector load from an address that is not 16-byte aligned (a misaligned-address error on
// the GPU; a general-protection fault here).
extern "C" __global__ void selftest_misaligned(const unsigned char* p, uint4* out) {
    out[threadIdx.x] = *reinterpret_cast<const uint4*>(p + 4 * threadIdx.x);
}
FJ_REGISTER(selftest_misaligned)

// ---------------------------------------------------------------------------------------------
// Host helpers.
static int g_failures = 0;
static void check(bool ok, const char* what, const std::string& detail = "") {
    printf("%s  %s%s%s\n", ok ? "ok  " : "FAIL", what, detail.empty() ? "" : ": ", detail.c_str());
    fflush(stdout);
    if (!ok) ++g_failures;
}
static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
static int launch(const char* k, unsigned gx, unsigned gy, unsigned bx, unsigned by, unsigned smem,
                  std::vector<void*> params, unsigned long long seed = 0, int workers = 1) {
    const unsigned grid[3] = {gx, gy, 1}, block[3] = {bx, by, 1};
    return fj_emu_launch(k, grid, block, smem, params.data(), seed, workers);
}
static float bf16f(fj_u16 h) { return fj_bf16_to_f32(h); }
static fj_u16 f2bf(float f) { return fj_f32_to_bf16(f); }
static bool is_poison(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u == 0xffffffffu;
}

// ---------------------------------------------------------------------------------------------
// 1. Primitives.
static void test_mma() {
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (int f16 = 0; f16 < 2; ++f16) {
        for (int rep = 0; rep < 3; ++rep) {
            std::vector<fj_u16> A(256), B(128);
            std::vector<float> C(128), D(128, -7.f);
            for (auto& x : A) x = f16 ? fj_f32_to_f16(nd(rng)) : f2bf(nd(rng));
            for (auto& x : B) x = f16 ? fj_f32_to_f16(nd(rng)) : f2bf(nd(rng));
            for (auto& x : C) x = nd(rng);
            const fj_u16* pa = A.data();
            const fj_u16* pb = B.data();
            const float* pc = C.data();
            float* pd = D.data();
            int flag = f16;
            int rc = launch("selftest_mma", 1, 1, 32, 1, 0, {&pa, &pb, &pc, &pd, &flag}, rep);
            double maxerr = 0;
            for (int i = 0; i < 16; ++i)
                for (int j = 0; j < 8; ++j) {
                    double s = C[i * 8 + j];
                    for (int k = 0; k < 16; ++k) {
                        const double a = f16 ? fj_f16_to_f32(A[i * 16 + k]) : bf16f(A[i * 16 + k]);
                        const double b = f16 ? fj_f16_to_f32(B[k * 8 + j]) : bf16f(B[k * 8 + j]);
                        s += a * b;
                    }
                    maxerr = std::max(maxerr, std::fabs(s - (double)D[i * 8 + j]) / std::max(1.0, std::fabs(s)));
                }
            if (rep == 2 || rc != 0 || maxerr > 1e-6) {
                char buf[160];
                snprintf(buf, sizeof buf, "rc %d, max rel err %.2e vs f64 (3 random 16x16x8 products) %s", rc, maxerr,
                         rc ? fj_emu_error() : "");
                check(rc == 0 && maxerr <= 1e-6, f16 ? "mma.m16n8k16 f16 vs naive matmul of ISA fragments"
                                                     : "mma.m16n8k16 bf16 vs naive matmul of ISA fragments",
                      buf);
                if (rc != 0 || maxerr > 1e-6) break;
            }
        }
    }
}

static void test_ldmatrix() {
    std::vector<fj_u32> out(32 * 8, 0);
    fj_u32* po = out.data();
    int rc = launch("selftest_ldmatrix", 1, 1, 32, 1, 32 * 24 * 2, {&po});
    int bad_plain = 0, bad_trans = 0;
    auto val = [](int j, int r, int c) { return (fj_u32)(1 + 64 * j + 8 * r + c); };
    for (int l = 0; l < 32; ++l)
        for (int j = 0; j < 4; ++j) {
            // Figure 104 of the PTX ISA: thread l holds row l/4, elements 2(l%4), 2(l%4)+1.
            const int r = l / 4, c = 2 * (l % 4);
            const fj_u32 plain = val(j, r, c) | (val(j, r, c + 1) << 16);
            const fj_u32 trans = val(j, c, r) | (val(j, c + 1, r) << 16);  // the same of the transpose
            bad_plain += out[l * 8 + j] != plain;
            bad_trans += out[l * 8 + 4 + j] != trans;
        }
    check(rc == 0 && bad_plain == 0, "ldmatrix.x4 fragment layout",
          rc ? fj_emu_error() : std::to_string(bad_plain) + " wrong registers of 128");
    check(rc == 0 && bad_trans == 0, "ldmatrix.x4.trans fragment layout",
          rc ? fj_emu_error() : std::to_string(bad_trans) + " wrong registers of 128");
}

static void test_shfl() {
    std::vector<int> out(64 * 8, -1);
    int* po = out.data();
    int bad = 0, rc = 0;
    for (unsigned long long seed : {0ull, 17ull}) {
        rc |= launch("selftest_shfl", 1, 1, 64, 1, 0, {&po}, seed);
        for (int tid = 0; tid < 64; ++tid) {
            const int w = tid >> 5, l = tid & 31;
            auto v = [&](int lane) { return 1000 * w + lane; };
            const int* o = &out[tid * 8];
            const int xo = ((l ^ 12) >= (l / 8 + 1) * 8) ? l : (l ^ 12);
            const int want[8] = {v(l ^ 1), v(l ^ 16), v((l + 5) & 31), v((l / 8) * 8 + 3), v(xo),
                                 (int)((v(l ^ 7) + 0.5f) * 2.f), 496, 131};
            for (int k = 0; k < 8; ++k) bad += o[k] != want[k];
        }
    }
    check(rc == 0 && bad == 0, "__shfl_xor_sync / __shfl_sync (widths 32 and 8) / fj_warp_sum / fj_warp_max / __any_sync",
          rc ? fj_emu_error() : std::to_string(bad) + " wrong of 1024 (seeds 0 and 17)");
}

static void test_sync() {
    const int n = 128, blocks = 3;
    std::vector<float> out(2 * blocks * n);
    float* po = out.data();
    int bad = 0, rc = 0;
    for (unsigned long long seed : {0ull, 1ull, 2ull, 3ull}) {
        std::fill(out.begin(), out.end(), 0.f);
        int bar = 1;
        rc |= launch("selftest_sync", blocks, 1, n, 1, n * 4, {&po, &bar}, seed, 2);
        for (int b = 0; b < blocks; ++b)
            for (int t = 0; t < n; ++t) {
                bad += out[b * n + t] != (float)((t + 1) % n);
                bad += out[blocks * n + b * n + t] != -1.f;
            }
    }
    check(rc == 0 && bad == 0, "__syncthreads ordering (3 blocks x 128, seeds 0-3, 2 workers)",
          rc ? fj_emu_error() : std::to_string(bad) + " wrong");
    // Without the barrier, seed 0 runs thread 0 to its end first: it reads thread 1's unwritten slot.
    std::fill(out.begin(), out.end(), 0.f);
    int bar = 0;
    rc = launch("selftest_sync", blocks, 1, n, 1, n * 4, {&po, &bar}, 0, 1);
    int poisoned = 0;
    for (int t = 0; t < n; ++t) poisoned += is_poison(out[t]);
    check(rc == 0 && poisoned == n - 1, "a missing __syncthreads reads poison (seed 0)",
          std::to_string(poisoned) + " of " + std::to_string(n) + " reads saw the 0xff poison");
    int poisoned_rand = 0;
    rc = launch("selftest_sync", blocks, 1, n, 1, n * 4, {&po, &bar}, 99, 1);
    for (int t = 0; t < blocks * n; ++t) poisoned_rand += is_poison(out[t]);
    check(rc == 0 && poisoned_rand > 0 && poisoned_rand < blocks * n, "a missing __syncthreads, random order (seed 99)",
          std::to_string(poisoned_rand) + " of " + std::to_string(blocks * n) + " reads saw poison");
}

static void test_cpasync() {
    std::vector<float> src(128), out(32 * 8, 0.f);
    for (int i = 0; i < 128; ++i) src[i] = 1.f + i;
    const float* ps = src.data();
    float* po = out.data();
    int rc = launch("selftest_cpasync", 1, 1, 32, 1, 1024, {&ps, &po});
    int bad[8] = {0};
    for (int t = 0; t < 32; ++t) {
        const float* o = &out[t * 8];
        bad[0] += !is_poison(o[0]);
        bad[1] += o[1] != src[4 * t];
        bad[2] += !is_poison(o[2]);
        bad[3] += o[3] != 0.f;
        bad[4] += o[4] != 0.f;
        bad[5] += o[5] != src[4 * t];
        bad[6] += !is_poison(o[6]);
        bad[7] += o[7] != src[4 * t];
    }
    std::string d = rc ? fj_emu_error() : "";
    check(rc == 0 && !bad[0] && !bad[1], "cp.async: read before wait_group sees poison, after sees the data", d);
    check(rc == 0 && !bad[2], "cp.async: another thread's slot before its wait (+ barrier) is poison", d);
    check(rc == 0 && !bad[3] && !bad[4], "cp.async: src-size 8 and 0 zero-fill the rest", d);
    check(rc == 0 && !bad[5] && !bad[6] && !bad[7], "cp.async: wait_group 1 retires all but the newest group", d);
}

static void test_atomic() {
    float acc[2] = {0.f, 0.f};
    float* pa = acc;
    double t0 = now();
    int rc = launch("selftest_atomic", 64, 1, 256, 1, 0, {&pa}, 0, 2);
    double t1 = now();
    char buf[96];
    snprintf(buf, sizeof buf, "%.0f + %.0f of 16384 (64 blocks x 256, 2 workers, %.3f s)", acc[0], acc[1], t1 - t0);
    check(rc == 0 && acc[0] == 8192.f && acc[1] == 8192.f, "atomicAdd(float) across OS threads", buf);
}

static void test_cvt() {
    int bad = 0;
    bad += fj_pack2<false>(1.f, 2.f) != 0x40003f80u;               // lo in the low half
    bad += fj_pack2<true>(1.f, 2.f) != 0x40003c00u;
    bad += fj_pack2<false>(1.00390625f, 1.01171875f) != 0x3f823f80u;  // bf16 ties to even both ways
    bad += fj_pack2<true>(1.f + 1.f / 2048, 1.f + 3.f / 2048) != 0x3c023c00u;  // f16 ties to even
    bad += fj_f32_to_f16(65520.f) != 0x7c00u;                       // rounds to inf
    bad += fj_f32_to_f16(65519.f) != 0x7bffu;                       // 65504
    bad += fj_f16_to_f32(0x0001) != std::ldexp(1.f, -24);           // subnormal, exact
    bad += !std::isnan(fj_f16_to_f32(fj_f32_to_f16(NAN)));
    bad += (fj_pack2<false>(NAN, 0.f) & 0xffffu) != 0x7fffu;
    bad += fj_exp2(-INFINITY) != 0.f || fj_exp2(3.f) != 8.f;
    bad += fj_exp2(-130.f) != 0.f || fj_exp2(-126.f) != FLT_MIN;  // .ftz: subnormal results flushed
    // prmt as __byte_perm (CUDA's example values; the bf16 unpacking of attention_jvp.cuh's half_of).
    bad += __byte_perm(0x33221100u, 0x77665544u, 0x5410u) != 0x55441100u;
    bad += __byte_perm(0x33221100u, 0x77665544u, 0x1044u) != 0x11004444u;
    bad += __byte_perm(0x3f803f82u, 0u, 0x1044u) != 0x3f820000u || __byte_perm(0x3f803f82u, 0u, 0x3244u) != 0x3f800000u;
    check(bad == 0, "cvt.rn.{bf16x2,f16x2} operand order and rounding, cvt f16<->f32, ex2, prmt",
          std::to_string(bad) + " wrong of 14");
}

// ---------------------------------------------------------------------------------------------
// 2. Errors, not hangs.
static void expect_error(const char* kernel, unsigned threads, unsigned smem, std::vector<void*> params,
                         const char* needle, const char* what) {
    double t0 = now();
    int rc = launch(kernel, 1, 1, threads, 1, smem, params);
    double t1 = now();
    std::string err = fj_emu_error();
    char buf[64];
    snprintf(buf, sizeof buf, " [%.3f s]", t1 - t0);
    check(rc != 0 && err.find(needle) != std::string::npos && err.find(kernel) != std::string::npos, what,
          (rc ? err : std::string("launch succeeded")) + buf);
}
static void test_errors() {
    std::vector<float> out(256);
    float* po = out.data();
    int dummy = 0;
    expect_error("selftest_divergent_bar", 128, 0, {&dummy}, "divergent __syncthreads", "divergent barriers -> error");
    expect_error("selftest_exited_lane", 64, 0, {&po}, "exited", "shuffle waiting for an exited lane -> error");
    expect_error("selftest_bar_vs_warp", 64, 0, {&po}, "deadlock", "barrier vs. collective deadlock -> error");
    expect_error("selftest_divergent_shfl", 32, 0, {&po}, "divergent warp collectives",
                 "divergent collectives -> error");
    expect_error("selftest_ldmatrix_partial", 32, 512, {&po}, "exited", "ldmatrix missing a lane -> error");
    expect_error("selftest_poison_ldmatrix", 32, 512, {&po}, "poison", "ldmatrix of never-written shared memory -> error");
    // A kernel given less dynamic shared memory than its layout: cp.async outside the window.
    std::vector<fj_u16> q(256 * 64, f2bf(0.5f)), ob(256 * 64);
    std::vector<float> lse(256);
    const fj_u16* pq = q.data();
    fj_u16* o = ob.data();
    float* pl = lse.data();
    int N = 256;  // four key tiles: the second pipeline stage lies past 40000 bytes
    float sc = 0.125f;
    int H1 = 1;
    long long sb = 256 * 64, sh = 256 * 64, sn = 64;
    expect_error("attention_fwd_bf16_d64", 128, 40000,
                 {&pq, &pq, &pq, &o, &pl, &N, &N, &sc, &H1, &sb, &sh, &sn, &sb, &sh, &sn, &sb, &sh, &sn, &sb, &sh, &sn},
                 "out of range",
                 "attention_fwd with too little dynamic shared memory -> cp.async out of the window");
    int rc = launch("no_such_kernel", 1, 1, 32, 1, 0, {});
    check(rc != 0 && std::string(fj_emu_error()).find("no registered kernel") != std::string::npos,
          "unknown kernel name -> error", fj_emu_error());
    const unsigned grid[3] = {1, 70000, 1}, block[3] = {128, 1, 1};
    rc = fj_emu_launch("selftest_atomic", grid, block, 0, nullptr, 0, 1);
    check(rc != 0, "grid.y > 65535 -> error", fj_emu_error());
}

// Faults: in a child process (it dies); the parent checks the child's stderr and its signal.
template <class F> static void in_child(F body, const char* what, const char* needle, const char* needle2) {
    int fds[2];
    if (pipe(fds) != 0) {
        check(false, what, "pipe failed");
        return;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        dup2(fds[1], 2);
        close(fds[0]);
        body();
        _exit(0);  // not reached
    }
    close(fds[1]);
    std::string text;
    char buf[512];
    ssize_t k;
    while ((k = read(fds[0], buf, sizeof buf)) > 0) text.append(buf, (size_t)k);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    const bool died = WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV;
    while (!text.empty() && text.back() == '\n') text.pop_back();
    check(died && text.find(needle) != std::string::npos && text.find(needle2) != std::string::npos, what, text);
}
static void test_segv() {
    in_child(
        [] {
            void* page = mmap(nullptr, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            std::vector<fj_u16> y(4096);
            const float* x = static_cast<const float*>(page);  // thread 0 of block 0 reads it first
            fj_u16* py = y.data();
            long long n = 4096;
            const unsigned grid[3] = {4, 1, 1}, block[3] = {256, 1, 1};
            void* params[] = {&x, &py, &n};
            fj_emu_launch("cast_f32_bf16", grid, block, 0, params, 0, 1);
        },
        "SIGSEGV in a kernel: kernel/block/thread on stderr, then the signal", "SIGSEGV",
        "cast_f32_bf16 block (0,0,0) thread (0,0,0)");
    in_child(
        [] {
            std::vector<uint4> buf(64), out(64);
            const unsigned char* p = reinterpret_cast<const unsigned char*>(buf.data());
            uint4* po = out.data();
            launch("selftest_misaligned", 1, 1, 32, 1, 0, {&p, &po});
        },
        "misaligned 16-byte load: reported as a general-protection SIGSEGV", "general-protection",
        "selftest_misaligned block (0,0,0) thread (1,0,0)");
}

// ---------------------------------------------------------------------------------------------
// 3. Real kernels vs naive references.
static void test_layernorm() {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (int C : {198, 256}) {
        const int T = 64, G = 2;
        std::vector<float> x(T * C), sc(G * C), sh(G * C), mean(T), rstd(T);
        for (auto& v : x) v = bf16f(f2bf(nd(rng) * 2.f + 0.5f));
        for (auto& v : sc) v = 0.3f * nd(rng);
        for (auto& v : sh) v = 0.3f * nd(rng);
        std::vector<fj_u16> xb(T * C), yb(T * C, 0xffff);
        for (int i = 0; i < T * C; ++i) xb[i] = f2bf(x[i]);
        std::vector<float> yf(T * C, NAN);
        const float eps = 1e-5f;
        double t0 = now();
        const fj_u16* px = xb.data();
        const float *ps = sc.data(), *ph = sh.data();
        fj_u16* py = yb.data();
        float *pm = mean.data(), *pr = rstd.data();
        int rc = launch("layernorm_mod_fwd_bf16", (T + 7) / 8, 1, 256, 1, 0,
                        {&px, &ps, &ph, &py, &pm, &pr, (void*)&T, (void*)&C, (void*)&G, (void*)&eps});
        double t1 = now();
        const float* pxf = x.data();
        float* pyf = yf.data();
        int rc2 = launch("layernorm_mod_fwd_f32", (T + 7) / 8, 1, 256, 1, 0,
                         {&pxf, &ps, &ph, &pyf, &pm, &pr, (void*)&T, (void*)&C, (void*)&G, (void*)&eps});
        double eb = 0, ef = 0;
        for (int t = 0; t < T; ++t) {
            double mu = 0, var = 0;
            for (int c = 0; c < C; ++c) mu += x[t * C + c];
            mu /= C;
            for (int c = 0; c < C; ++c) var += (x[t * C + c] - mu) * (x[t * C + c] - mu);
            var /= C;
            const double rs = 1.0 / std::sqrt(var + eps);
            const int g = t / (T / G);
            for (int c = 0; c < C; ++c) {
                const double y = (x[t * C + c] - mu) * rs * (1.0 + sc[g * C + c]) + sh[g * C + c];
                eb = std::max(eb, std::fabs(y - bf16f(yb[t * C + c])) / std::max(1.0, std::fabs(y)));
                ef = std::max(ef, std::fabs(y - yf[t * C + c]) / std::max(1.0, std::fabs(y)));
            }
        }
        char buf[200];
        snprintf(buf, sizeof buf, "T %d C %d G %d: max rel err bf16 %.2e (bound 8e-3), f32 %.2e (bound 1e-5); %.4f s %s",
                 T, C, G, eb, ef, t1 - t0, rc || rc2 ? fj_emu_error() : "");
        check(rc == 0 && rc2 == 0 && eb < 8e-3 && ef < 1e-5,
              C % 4 ? "layernorm_mod_fwd bf16/f32 (element path) vs f64" : "layernorm_mod_fwd bf16/f32 (vector path) vs f64",
              buf);
    }
}

// Attention JVP reference in f64 (non-causal): o, lse, odot, tlse per (bh, query).
struct AttnRef {
    std::vector<double> o, to, lse, tlse;
};
static AttnRef attn_ref(int BH, int Nq, int Nk, int D, int DV, const std::vector<double>& q, const std::vector<double>& k,
                        const std::vector<double>& v, const std::vector<double>& tq, const std::vector<double>& tk,
                        const std::vector<double>& tv, double c, int mode /*0 full, 1 nokv, 2 fwd*/) {
    AttnRef r;
    r.o.assign((size_t)BH * Nq * DV, 0);
    r.to.assign((size_t)BH * Nq * DV, 0);
    r.lse.assign((size_t)BH * Nq, 0);
    r.tlse.assign((size_t)BH * Nq, 0);
    std::vector<double> s(Nk), sd(Nk);
    for (int bh = 0; bh < BH; ++bh)
        for (int i = 0; i < Nq; ++i) {
            const double* qi = &q[((size_t)bh * Nq + i) * D];
            const double* tqi = &tq[((size_t)bh * Nq + i) * D];
            double m = -INFINITY;
            for (int j = 0; j < Nk; ++j) {
                const double* kj = &k[((size_t)bh * Nk + j) * D];
                const double* tkj = &tk[((size_t)bh * Nk + j) * D];
                double a = 0, b = 0;
                for (int e = 0; e < D; ++e) {
                    a += qi[e] * kj[e];
                    if (mode != 2) b += tqi[e] * kj[e];
                    if (mode == 0) b += qi[e] * tkj[e];
                }
                s[j] = c * a;
                sd[j] = c * b;
                m = std::max(m, s[j]);
            }
            double l = 0, mu = 0;
            for (int j = 0; j < Nk; ++j) {
                s[j] = std::exp(s[j] - m);
                l += s[j];
            }
            for (int j = 0; j < Nk; ++j) mu += s[j] / l * sd[j];
            const size_t oo = ((size_t)bh * Nq + i) * DV;
            for (int e = 0; e < DV; ++e) {
                double o = 0, t = 0;
                for (int j = 0; j < Nk; ++j) {
                    const double p = s[j] / l;
                    const double vj = v[((size_t)bh * Nk + j) * DV + e];
                    o += p * vj;
                    t += p * sd[j] * vj;
                    if (mode == 0) t += p * tv[((size_t)bh * Nk + j) * DV + e];
                }
                r.o[oo + e] = o;
                r.to[oo + e] = t - mu * o;
            }
            r.lse[(size_t)bh * Nq + i] = m + std::log(l);
            r.tlse[(size_t)bh * Nq + i] = mu;
        }
    return r;
}

// dt: 0 bf16, 1 f16, 2 f32. mode: 0 attention_jvp, 1 attention_jvp_nokv, 2 attention_fwd. With
// `kernel`, that kernel (of the same signature and launch contract) runs instead of the library's:
// the mutants of section 5. Returns whether the launch succeeded and matched the reference.
struct AttnOutcome {
    int rc = 0;
    std::string err;
    double eo = 0, et = 0, el = 0, etl = 0;
    bool ok = false;
};
static AttnOutcome test_attention(int dt, int mode, int B, int H, int Nq, int Nk, int D, int DV, double tol,
                                  bool timing_runs, const char* kernel = nullptr, bool report = true) {
    const int BH = B * H;
    std::mt19937 rng(100 + D + DV + mode);
    std::normal_distribution<double> nd(0.0, 1.0);
    auto fill = [&](size_t n, std::vector<double>& vd) {
        vd.resize(n);
        for (auto& x : vd) {
            const float f = (float)nd(rng);
            x = dt == 0 ? bf16f(f2bf(f)) : dt == 1 ? fj_f16_to_f32(fj_f32_to_f16(f)) : f;
        }
    };
    std::vector<double> q, k, v, tq, tk, tv;
    fill((size_t)BH * Nq * D, q);
    fill((size_t)BH * Nk * D, k);
    fill((size_t)BH * Nk * DV, v);
    fill((size_t)BH * Nq * D, tq);
    fill((size_t)BH * Nk * D, tk);
    fill((size_t)BH * Nk * DV, tv);
    const double c = 1.0 / std::sqrt((double)D);
    AttnRef ref = attn_ref(BH, Nq, Nk, D, DV, q, k, v, tq, tk, tv, c, mode);

    const char* dts[3] = {"bf16", "f16", "f32"};
    const char* modes[3] = {"attention_jvp_", "attention_jvp_nokv_", "attention_fwd_"};
    char name[96];
    if (D == DV) snprintf(name, sizeof name, "%s%s_d%d", modes[mode], dts[dt], D);
    else snprintf(name, sizeof name, "%s%s_d%d_dv%d", modes[mode], dts[dt], D, DV);

    // Storage buffers (16-bit as raw bits, f32 as float), outputs poisoned.
    const size_t no = (size_t)BH * Nq * DV, nl = (size_t)BH * Nq;
    std::vector<fj_u16> h16[6];
    std::vector<float> h32[6];
    const std::vector<double>* srcs[6] = {&q, &k, &v, &tq, &tk, &tv};
    for (int i = 0; i < 6; ++i) {
        if (dt == 2) h32[i].assign(srcs[i]->begin(), srcs[i]->end());
        else {
            h16[i].resize(srcs[i]->size());
            for (size_t e = 0; e < h16[i].size(); ++e)
                h16[i][e] = dt == 0 ? f2bf((float)(*srcs[i])[e]) : fj_f32_to_f16((float)(*srcs[i])[e]);
        }
    }
    std::vector<fj_u16> o16(no, 0xffff), to16(no, 0xffff);
    std::vector<float> o32(no, NAN), to32(no, NAN), lse(nl, NAN), tlse(nl, NAN);
    void* ptr[6];
    for (int i = 0; i < 6; ++i) ptr[i] = dt == 2 ? (void*)h32[i].data() : (void*)h16[i].data();
    void* po = dt == 2 ? (void*)o32.data() : (void*)o16.data();
    void* pto = dt == 2 ? (void*)to32.data() : (void*)to16.data();
    float* pl = lse.data();
    float* ptl = tlse.data();
    float scale = (float)c;
    std::vector<void*> params;
    if (mode == 0) params = {&ptr[0], &ptr[1], &ptr[2], &ptr[3], &ptr[4], &ptr[5], &po, &pto, &pl, &ptl};
    else if (mode == 1) params = {&ptr[0], &ptr[1], &ptr[2], &ptr[3], &po, &pto, &pl, &ptl};
    else params = {&ptr[0], &ptr[1], &ptr[2], &po, &pl};
    params.push_back(&Nq);
    params.push_back(&Nk);
    params.push_back(&scale);
    // Layout parameters: H, then contiguous [B, H, N, d] strides of q, k, v, o.
    int Hp = H;
    long long st[12] = {(long long)H * Nq * D, (long long)Nq * D, D,  (long long)H * Nk * D,   (long long)Nk * D,   D,
                        (long long)H * Nk * DV, (long long)Nk * DV, DV, (long long)H * Nq * DV, (long long)Nq * DV, DV};
    params.push_back(&Hp);
    for (auto& x : st) params.push_back(&x);

    // Launch shape and shared memory per attention_jvp.cuh.
    const int DP = (D + 15) / 16 * 16, DVP = (DV + 15) / 16 * 16;
    const int BC = (D == 128 || DV == 128) ? 32 : 64;
    const int NQ = mode == 2 ? 1 : 2, NKV = mode == 0 ? 4 : 2, NK = mode == 0 ? 2 : 1;
    const int VS = 32 * ((DV + 31) / 32);
    const unsigned smem = dt == 2 ? 4 * (NQ * 16 * D + NK * 32 * (D + 1) + NK * 32 * VS)
                                  : 2 * (NQ * 64 * (DP + 8) + 2 * (NKV / 2) * BC * (DP + 8 + DVP + 8));
    const unsigned BR = dt == 2 ? 16 : 64;
    const unsigned gx = (Nq + BR - 1) / BR;

    if (kernel) snprintf(name, sizeof name, "%s", kernel);
    double t0 = now();
    int rc = launch(name, gx, BH, 128, 1, smem, params, 0, 1);
    double t1 = now();
    double eo = 0, et = 0, el = 0, etl = 0;
    auto getv = [&](const std::vector<fj_u16>& a16, const std::vector<float>& a32, size_t i) -> double {
        return dt == 2 ? a32[i] : dt == 0 ? bf16f(a16[i]) : fj_f16_to_f32(a16[i]);
    };
    for (size_t i = 0; i < no; ++i) {
        eo = std::max(eo, std::fabs(getv(o16, o32, i) - ref.o[i]));
        if (mode != 2) et = std::max(et, std::fabs(getv(to16, to32, i) - ref.to[i]));
    }
    for (size_t i = 0; i < nl; ++i) {
        el = std::max(el, std::fabs(lse[i] - ref.lse[i]));
        if (mode != 2) etl = std::max(etl, std::fabs(tlse[i] - ref.tlse[i]));
    }
    if (std::isnan(eo + et + el + etl)) eo = INFINITY;
    // lse and tlse come from f32 statistics (l, r summed from the f32 p): tight bounds whatever the dtype.
    const double tol_stat = dt == 2 ? 1e-5 : 1e-4;
    const bool ok = rc == 0 && eo < tol && et < 2 * tol && el < tol_stat && etl < tol_stat;
    char buf[400];
    snprintf(buf, sizeof buf,
             "B%d H%d Nq%d Nk%d (grid %ux%d, %u B smem): max abs err o %.1e, odot %.1e, lse %.1e, tlse %.1e "
             "(bounds %.0e/%.0e/%.0e); seed 0, 1 worker: %.3f s %s",
             B, H, Nq, Nk, gx, BH, smem, eo, et, el, etl, tol, 2 * tol, tol_stat, t1 - t0, rc ? fj_emu_error() : "");
    AttnOutcome out;
    out.rc = rc;
    out.err = rc ? fj_emu_error() : "";
    out.eo = eo;
    out.et = et;
    out.el = el;
    out.etl = etl;
    out.ok = ok;
    if (!report) return out;
    check(ok, name, buf);
    if (timing_runs && rc == 0) {
        double t2 = now();
        int rc2 = launch(name, gx, BH, 128, 1, smem, params, 0, 2);
        double t3 = now();
        std::vector<float> o_seed0(no);
        for (size_t i = 0; i < no; ++i) o_seed0[i] = (float)getv(o16, o32, i);
        int rc3 = launch(name, gx, BH, 128, 1, smem, params, 0x5eed, 2);
        double t4 = now();
        size_t differ = 0;
        for (size_t i = 0; i < no; ++i) differ += (float)getv(o16, o32, i) != o_seed0[i];
        snprintf(buf, sizeof buf, "seed 0, 2 workers: %.3f s; random seed, 2 workers: %.3f s, %zu outputs differ from seed 0",
                 t3 - t2, t4 - t3, differ);
        check(rc2 == 0 && rc3 == 0 && differ == 0, (std::string(name) + " timings / schedule independence").c_str(), buf);
    }
    return out;
}

// Every attention_{jvp,jvp_nokv,fwd} kernel (3 dtypes x 25 (d, dv) pairs x 3 variants) at a small shape
// with query and key tails for every tile size: one line per dtype.
static void sweep_attention() {
    const int dims[5] = {32, 64, 72, 96, 128};
    const char* dts[3] = {"bf16", "f16", "f32"};
    for (int dt = 0; dt < 3; ++dt) {
        int n = 0, bad = 0;
        double worst_o = 0, worst_stat = 0;
        std::string fails;
        const double t0 = now();
        for (int D : dims)
            for (int DV : dims)
                for (int mode = 0; mode < 3; ++mode) {
                    AttnOutcome o =
                        test_attention(dt, mode, 1, 2, 70, 77, D, DV, dt == 2 ? 1e-4 : 2e-2, false, nullptr, false);
                    ++n;
                    worst_o = std::max(worst_o, std::max(o.eo, o.et));
                    worst_stat = std::max(worst_stat, std::max(o.el, o.etl));
                    if (!o.ok) {
                        ++bad;
                        char buf[300];
                        snprintf(buf, sizeof buf, " [mode %d d%d dv%d: rc %d %s err o %.1e odot %.1e lse %.1e tlse %.1e]", mode,
                                 D, DV, o.rc, o.err.c_str(), o.eo, o.et, o.el, o.etl);
                        fails += buf;
                    }
                }
        char buf[200];
        snprintf(buf, sizeof buf, "%d of %d kernels match (Nq 70, Nk 77, BH 2); worst o/odot %.1e, lse/tlse %.1e; %.2f s",
                 n - bad, n, worst_o, worst_stat, now() - t0);
        check(bad == 0, (std::string("sweep: every attention_{jvp,jvp_nokv,fwd}_") + dts[dt] + " kernel vs f64").c_str(),
              buf + fails);
    }
}

// Backward: attention_bwd_preprocess, dkdv and dq of one (dtype, d, dv) against f64 (the inputs o and
// lse are the exact forward's, o rounded to the storage type). Errors are relative to the largest
// |reference| of each output.
static bool test_attention_bwd(int dt, int D, int DV, int BH, int Nq, int Nk, std::string& detail, double& worst) {
    std::mt19937 rng(7 + D * 3 + DV + dt);
    std::normal_distribution<double> nd(0.0, 1.0);
    auto rnd = [&](size_t n) {
        std::vector<double> v(n);
        for (auto& x : v) {
            const float f = (float)nd(rng);
            x = dt == 0 ? bf16f(f2bf(f)) : dt == 1 ? fj_f16_to_f32(fj_f32_to_f16(f)) : f;
        }
        return v;
    };
    auto q = rnd((size_t)BH * Nq * D), k = rnd((size_t)BH * Nk * D), v = rnd((size_t)BH * Nk * DV),
         dout = rnd((size_t)BH * Nq * DV);
    const double c = 1.0 / std::sqrt((double)D);
    // Forward (f64), then o rounded to the storage type as a forward kernel would have written it.
    std::vector<double> P((size_t)BH * Nq * Nk), o((size_t)BH * Nq * DV), lse((size_t)BH * Nq);
    for (int bh = 0; bh < BH; ++bh)
        for (int i = 0; i < Nq; ++i) {
            double m = -INFINITY;
            double* p = &P[((size_t)bh * Nq + i) * Nk];
            for (int j = 0; j < Nk; ++j) {
                double a = 0;
                for (int e = 0; e < D; ++e) a += q[((size_t)bh * Nq + i) * D + e] * k[((size_t)bh * Nk + j) * D + e];
                p[j] = c * a;
                m = std::max(m, p[j]);
            }
            double l = 0;
            for (int j = 0; j < Nk; ++j) l += (p[j] = std::exp(p[j] - m));
            for (int j = 0; j < Nk; ++j) p[j] /= l;
            lse[(size_t)bh * Nq + i] = m + std::log(l);
            for (int e = 0; e < DV; ++e) {
                double a = 0;
                for (int j = 0; j < Nk; ++j) a += p[j] * v[((size_t)bh * Nk + j) * DV + e];
                o[((size_t)bh * Nq + i) * DV + e] = dt == 0 ? bf16f(f2bf((float)a))
                                                   : dt == 1 ? fj_f16_to_f32(fj_f32_to_f16((float)a))
                                                             : (double)(float)a;
            }
        }
    std::vector<double> delta((size_t)BH * Nq), dq((size_t)BH * Nq * D, 0), dk((size_t)BH * Nk * D, 0),
        dv((size_t)BH * Nk * DV, 0);
    for (size_t r = 0; r < delta.size(); ++r) {
        double a = 0;
        for (int e = 0; e < DV; ++e) a += dout[r * DV + e] * o[r * DV + e];
        delta[r] = a;
    }
    for (int bh = 0; bh < BH; ++bh)
        for (int i = 0; i < Nq; ++i)
            for (int j = 0; j < Nk; ++j) {
                const double p = P[((size_t)bh * Nq + i) * Nk + j];
                double dp = 0;
                for (int e = 0; e < DV; ++e) dp += dout[((size_t)bh * Nq + i) * DV + e] * v[((size_t)bh * Nk + j) * DV + e];
                const double ds = p * (dp - delta[(size_t)bh * Nq + i]);
                for (int e = 0; e < D; ++e) {
                    dq[((size_t)bh * Nq + i) * D + e] += c * ds * k[((size_t)bh * Nk + j) * D + e];
                    dk[((size_t)bh * Nk + j) * D + e] += c * ds * q[((size_t)bh * Nq + i) * D + e];
                }
                for (int e = 0; e < DV; ++e) dv[((size_t)bh * Nk + j) * DV + e] += p * dout[((size_t)bh * Nq + i) * DV + e];
            }
    // Device buffers in the storage type; outputs poisoned.
    auto store = [&](const std::vector<double>& x) {
        std::vector<unsigned char> b(x.size() * (dt == 2 ? 4 : 2));
        for (size_t i = 0; i < x.size(); ++i) {
            if (dt == 2) {
                const float f = (float)x[i];
                memcpy(&b[4 * i], &f, 4);
            } else {
                const fj_u16 h = dt == 0 ? f2bf((float)x[i]) : fj_f32_to_f16((float)x[i]);
                memcpy(&b[2 * i], &h, 2);
            }
        }
        return b;
    };
    auto load = [&](const std::vector<unsigned char>& b, size_t i) -> double {
        if (dt == 2) {
            float f;
            memcpy(&f, &b[4 * i], 4);
            return f;
        }
        fj_u16 h;
        memcpy(&h, &b[2 * i], 2);
        return dt == 0 ? bf16f(h) : fj_f16_to_f32(h);
    };
    auto bq = store(q), bk = store(k), bv = store(v), bo = store(o), bdo = store(dout);
    std::vector<unsigned char> bdq(bq.size(), 0xff), bdk(bk.size(), 0xff), bdv(bv.size(), 0xff);
    std::vector<float> flse(lse.begin(), lse.end()), fdelta(delta.size(), NAN);
    const char* dts[3] = {"bf16", "f16", "f32"};
    char pre[64], hd[32];
    snprintf(pre, sizeof pre, "attention_bwd_preprocess_%s", dts[dt]);
    if (D == DV) snprintf(hd, sizeof hd, "_d%d", D);
    else snprintf(hd, sizeof hd, "_d%d_dv%d", D, DV);
    const std::string kdkdv = std::string("attention_bwd_dkdv_") + dts[dt] + hd;
    const std::string kdq = std::string("attention_bwd_dq_") + dts[dt] + hd;
    void *pq = bq.data(), *pk = bk.data(), *pv = bv.data(), *po = bo.data(), *pdo = bdo.data(), *pdq = bdq.data(),
         *pdk = bdk.data(), *pdv = bdv.data();
    float *pl = flse.data(), *pd = fdelta.data();
    int rows = BH * Nq;
    float scale = (float)c;
    // Launch shapes and shared memory per attention_bwd.cuh (f32) and attention_bwd_tc.cuh (bf16/f16,
    // src/cuda/attention.rs: bwd_block_rows, bwd_shared_bytes); B = 1, H = BH, contiguous strides.
    unsigned smem_kv, smem_q, rows_kv, rows_q;
    if (dt == 2) {
        smem_kv = smem_q = 4 * (2 * 32 * (D + 1) + 2 * 32 * (DV + 1) + 2 * 32 * 33 + 64);
        rows_kv = rows_q = 32;
    } else {
        const unsigned dp = (D + 15) / 16 * 16, dvp = (DV + 15) / 16 * 16, srow = dp + 8 + dvp + 8;
        const unsigned bm = dp + dvp > 192 ? 32 : 64, bn = (D == 128 || DV == 128) ? 32 : 64;
        smem_kv = 2 * (64 + 2 * bm) * srow + 16 * bm;
        smem_q = 2 * (64 + 2 * bn) * srow;
        rows_kv = rows_q = 64;
    }
    int H = BH;
    long long st[12] = {(long long)Nq * D, (long long)Nq * D, D,  (long long)Nk * D,   (long long)Nk * D,   D,
                        (long long)Nk * DV, (long long)Nk * DV, DV, (long long)Nq * DV, (long long)Nq * DV, DV};
    std::vector<void*> pp = {&po, &pdo, &pd, &rows, &DV, &Nq, &H, &st[9], &st[10], &st[11]};
    std::vector<void*> pkv = {&pq, &pk, &pv, &pdo, &pl, &pd, &pdk, &pdv, &Nq, &Nk, &scale, &H};
    std::vector<void*> pqq = {&pq, &pk, &pv, &pdo, &pl, &pd, &pdq, &Nq, &Nk, &scale, &H};
    for (auto& x : st) {
        pkv.push_back(&x);
        pqq.push_back(&x);
    }
    int rc = launch(pre, (rows + 3) / 4, 1, 128, 1, 0, pp);
    if (!rc) rc = launch(kdkdv.c_str(), (Nk + rows_kv - 1) / rows_kv, BH, 128, 1, smem_kv, pkv);
    if (!rc) rc = launch(kdq.c_str(), (Nq + rows_q - 1) / rows_q, BH, 128, 1, smem_q, pqq);
    if (rc) {
        detail += std::string(" [") + fj_emu_error() + "]";
        return false;
    }
    auto rel = [&](const std::vector<double>& ref, const std::vector<unsigned char>& got) {
        double mx = 0, e = 0;
        for (double x : ref) mx = std::max(mx, std::fabs(x));
        for (size_t i = 0; i < ref.size(); ++i) e = std::max(e, std::fabs(load(got, i) - ref[i]));
        return std::isnan(e) ? INFINITY : e / std::max(mx, 1e-30);
    };
    double ed = 0;
    for (size_t i = 0; i < delta.size(); ++i) ed = std::max(ed, std::fabs(fdelta[i] - delta[i]));
    const double eq = rel(dq, bdq), ek = rel(dk, bdk), ev = rel(dv, bdv);
    const double tol = dt == 2 ? 1e-5 : 1e-2;
    worst = std::max(worst, std::max(eq, std::max(ek, ev)));
    if (!(eq < tol && ek < tol && ev < tol && ed < (dt == 2 ? 1e-4 : 1e-2))) {
        char buf[200];
        snprintf(buf, sizeof buf, " [d%d dv%d: rel err dq %.1e dk %.1e dv %.1e, delta abs %.1e]", D, DV, eq, ek, ev, ed);
        detail += buf;
        return false;
    }
    return true;
}
static void sweep_attention_bwd() {
    const int dims[5] = {32, 64, 72, 96, 128};
    const char* dts[3] = {"bf16", "f16", "f32"};
    for (int dt = 0; dt < 3; ++dt) {
        int n = 0, bad = 0;
        double worst = 0;
        std::string fails;
        const double t0 = now();
        for (int D : dims)
            for (int DV : dims) {
                ++n;
                if (!test_attention_bwd(dt, D, DV, 2, 70, 77, fails, worst)) ++bad;
            }
        char buf[200];
        snprintf(buf, sizeof buf, "%d of %d (d, dv) pairs match (Nq 70, Nk 77, BH 2); worst rel err %.1e; %.2f s", n - bad,
                 n, worst, now() - t0);
        check(bad == 0,
              (std::string("sweep: attention_bwd_{preprocess,dkdv,dq}_") + dts[dt] + " vs f64 (every d, dv)").c_str(),
              buf + fails);
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Mutants: copies of attention_jvp.cuh with one bug each (made by build.sh --selftest, compiled from
// selftest_mutant.cpp as selftest_mut<N>, the bf16 (or f32) d72 JVP). Each must be caught at seed 0, by
// an error of the emulator or by a mismatch with the reference (the problem has a key tail: Nk = 300).
static void test_mutants() {
    struct Mutant {
        const char* kernel;
        int dt;
        const char* bug;
    };
    const Mutant ms[] = {
        {"selftest_mut1", 0, "no __syncthreads after cp.async.wait_group (other threads' copies unseen)"},
        {"selftest_mut2", 0, "cp.async.wait_group 2 instead of 1 (the current tile not retired)"},
        {"selftest_mut3", 0, "no __syncthreads at the end of a tile (the prefetch overwrites a stage still read)"},
        {"selftest_mut4", 0, "mma B fragment registers swapped in Q K^T"},
        {"selftest_mut5", 0, "key-tail mask off by one (> Nk instead of >= Nk)"},
        {"selftest_mut6", 0, "ldmatrix lane addressing of K: the two 8x8 halves swapped"},
        {"selftest_mut7", 2, "f32 path: no __syncthreads before refilling the K/V tile"},
    };
    int found = 0;
    for (int i = 0; i < fj_emu_kernel_count(); ++i) found += strncmp(fj_emu_kernel_name(i), "selftest_mut", 12) == 0;
    if (found != 7) {
        check(false, "mutants", "expected 7 selftest_mut kernels, found " + std::to_string(found));
        return;
    }
    for (const Mutant& m : ms) {
        AttnOutcome o = test_attention(m.dt, 0, 1, 2, 300, 300, 72, 72, m.dt == 2 ? 1e-4 : 2e-2, false, m.kernel, false);
        char buf[200];
        snprintf(buf, sizeof buf, "mismatch: max abs err o %.1e, odot %.1e, lse %.1e, tlse %.1e", o.eo, o.et, o.el, o.etl);
        const bool caught = !o.ok;
        check(caught, (std::string(m.kernel) + ": " + m.bug + " -> caught").c_str(),
              !caught ? "NOT caught: the launch succeeded and matched the reference" : o.rc ? "error: " + o.err : buf);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Concurrent launches from two OS threads, errors thread-local.
static void test_concurrency() {
    std::atomic<int> bad{0};
    std::thread a([&] {
        for (int rep = 0; rep < 3; ++rep) {
            float acc[2] = {0, 0};
            float* pa = acc;
            if (launch("selftest_atomic", 16, 1, 256, 1, 0, {&pa}, rep, 2) != 0 || acc[0] != 2048.f ||
                fj_emu_error()[0] != '\0')
                bad++;
        }
    });
    std::thread b([&] {
        std::vector<float> out(256);
        float* po = out.data();
        for (int rep = 0; rep < 3; ++rep) {
            if (launch("selftest_bar_vs_warp", 1, 1, 64, 1, 0, {&po}) == 0) bad++;
            if (std::string(fj_emu_error()).find("deadlock") == std::string::npos) bad++;
        }
    });
    a.join();
    b.join();
    check(bad == 0, "concurrent launches from two OS threads, fj_emu_error per thread",
          std::to_string(bad.load()) + " wrong");
}

int main(int argc, char** argv) {
    (void)argc;
    (void)argv;
    alarm(600);  // a hang is a failure, not a stuck CI job
    int lib = 0;
    for (int i = 0; i < fj_emu_kernel_count(); ++i)
        if (strncmp(fj_emu_kernel_name(i), "selftest_", 9) != 0) ++lib;
    printf("fj_emu selftest: %d library kernels registered (%d with the selftest's)\n", lib, fj_emu_kernel_count());
    // The Rust side compares the whole registry with the PTX entries; here a sample of every file.
    const char* sample[] = {"attention_jvp_bf16_d72",        "attention_jvp_nokv_f16_d128_dv64", "attention_fwd_f32_d32",
                            "attention_bwd_preprocess_bf16", "attention_bwd_dkdv_f16_d96_dv32",  "attention_bwd_dq_f32_d64",
                            "gelu_jvp_f16",                  "gated_residual_bwd_gate_bf16",     "timestep_embedding_jvp_f32",
                            "cast_f16_f32",                  "layernorm_mod_bwd_params_f32",     "dit_permute_bf16",
                            "dit_scale_f32"};
    std::string missing;
    for (const char* k : sample) {
        bool found = false;
        for (int i = 0; i < fj_emu_kernel_count() && !found; ++i) found = strcmp(fj_emu_kernel_name(i), k) == 0;
        if (!found) missing += std::string(" ") + k;
    }
    check(missing.empty(), "registry: a sample of kernels of each of the 7 emulated files",
          missing.empty() ? std::to_string(lib) + " library kernels" : "missing:" + missing);

    test_cvt();
    test_mma();
    test_ldmatrix();
    test_shfl();
    test_sync();
    test_cpasync();
    test_atomic();
    test_errors();
    test_segv();
    test_layernorm();
    test_attention(0, 2, 1, 2, 300, 300, 64, 64, 2e-2, false);
    test_attention(0, 0, 1, 2, 300, 300, 72, 72, 2e-2, true);
    test_attention(0, 1, 1, 1, 100, 77, 72, 72, 2e-2, false);
    test_attention(1, 0, 1, 2, 130, 95, 128, 64, 2e-2, false);
    test_attention(1, 2, 1, 1, 70, 200, 32, 96, 2e-2, false);
    test_attention(2, 0, 1, 2, 300, 300, 72, 72, 1e-4, true);
    sweep_attention();
    sweep_attention_bwd();
    test_concurrency();
    test_mutants();
    printf("fj_emu selftest: %d failure%s\n", g_failures, g_failures == 1 ? "" : "s");
    return g_failures;
}
