// sm90_selftest.cpp: stand-alone tests of sm90.h (the Hopper PTX emulation), independent of the
// emulator's runtime: the pure layer (swizzle, descriptors against the kernel's formulas, TMA box with
// zero fill, wgmma products from K-major and MN-major descriptors and from register fragments against a
// naive product) and the stateful layer on a small fiber scheduler of its own (a producer thread and a
// consumer warpgroup through mbarriers, TMA and wgmma, then the errors the emulator must report:
// wrong-parity waits, a missing "empty" wait, a missing "full" wait, a bad tensor map, accumulators
// touched in flight, divergent or unfenced wgmma, named-barrier misuse, transaction-byte mismatches).
//
//   g++ -std=c++17 -O1 -I cuda cuda/emu/sm90_selftest.cpp -o /tmp/sm90_selftest && /tmp/sm90_selftest
#define FJ_SM90_IMPL
#include "emu/sm90.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <ucontext.h>
#include <vector>

using fj_sm90::u32;
using fj_sm90::u64;

// ---------------------------------------------------------------------------------------------
// A minimal block runner: one fiber per thread, round-robin, deadlock = no runnable thread.
namespace mini {
struct Fiber {
    ucontext_t uc;
    std::vector<char> stack;
    bool runnable = true, exited = false;
};
struct Block {
    std::vector<Fiber> f;
    ucontext_t sched;
    unsigned cur = 0;
    std::vector<unsigned char> smem;
    bool failed = false;
    std::string err;
    std::function<void(unsigned)> body;
    unsigned bar_arrived = 0;
    unsigned long long bar_gen = 0;
};
Block* g = nullptr;

void entry() {
    const unsigned t = g->cur;
    g->body(t);
    g->f[t].exited = true;
    g->f[t].runnable = false;
    swapcontext(&g->f[t].uc, &g->sched);
}

void syncthreads() {
    unsigned live = 0;
    for (auto& f : g->f) live += !f.exited;
    const unsigned long long gen = g->bar_gen;
    if (++g->bar_arrived == live) {
        g->bar_arrived = 0;
        g->bar_gen++;
        for (auto& f : g->f)
            if (!f.exited) f.runnable = true;
        return;
    }
    while (g->bar_gen == gen) {
        g->f[g->cur].runnable = false;
        swapcontext(&g->f[g->cur].uc, &g->sched);
    }
}

// A scheduling point with no ordering meaning (lets the other threads run).
void yield() { swapcontext(&g->f[g->cur].uc, &g->sched); }

// Runs `body` on n threads with `smem_bytes` of 0xFF-poisoned shared memory; "" or the error.
std::string run(unsigned n, unsigned smem_bytes, std::function<void(unsigned)> body) {
    Block B;
    B.f.resize(n);
    B.smem.assign(smem_bytes, 0xff);
    B.body = std::move(body);
    g = &B;
    fj_sm90::block_begin();
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = B.f[i];
        f.stack.resize(256 * 1024);
        getcontext(&f.uc);
        f.uc.uc_stack.ss_sp = f.stack.data();
        f.uc.uc_stack.ss_size = f.stack.size();
        f.uc.uc_link = nullptr;
        makecontext(&f.uc, entry, 0);
    }
    for (;;) {
        bool any = false, live = false;
        for (unsigned i = 0; i < n && !B.failed; ++i) {
            if (!B.f[i].exited) live = true;
            if (!B.f[i].runnable) continue;
            any = true;
            B.cur = i;
            swapcontext(&B.sched, &B.f[i].uc);
        }
        if (B.failed) break;
        if (!live) break;
        if (!any) {
            B.failed = true;
            B.err = "deadlock:" + fj_sm90::describe();
            break;
        }
    }
    std::string end = fj_sm90::block_end();
    g = nullptr;
    if (B.failed) return B.err;
    return end;
}
}  // namespace mini

namespace fj_sm90 {
namespace plat {
unsigned tid() { return mini::g->cur; }
unsigned nthreads() { return (unsigned)mini::g->f.size(); }
unsigned char* smem() { return mini::g->smem.data(); }
unsigned smem_bytes() { return (unsigned)mini::g->smem.size(); }
void block(const char*, int) {
    mini::g->f[mini::g->cur].runnable = false;
    swapcontext(&mini::g->f[mini::g->cur].uc, &mini::g->sched);
}
void wake(unsigned t) { mini::g->f[t].runnable = true; }
void fail(const std::string& msg) {
    if (!mini::g->failed) {
        mini::g->failed = true;
        mini::g->err = "thread " + std::to_string(mini::g->cur) + ": " + msg;
    }
    swapcontext(&mini::g->f[mini::g->cur].uc, &mini::g->sched);
    abort();  // never resumed
}
}  // namespace plat
}  // namespace fj_sm90

// ---------------------------------------------------------------------------------------------
int failures = 0;
#define CHECK(cond, ...)                                         \
    do {                                                         \
        if (!(cond)) {                                           \
            failures++;                                          \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);          \
            printf(__VA_ARGS__);                                 \
            printf("\n");                                        \
        }                                                        \
    } while (0)

uint16_t f32_to_bf16(float f) {
    u32 u;
    std::memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
uint16_t f32_to_f16(float f) {
    _Float16 h = (_Float16)f;
    uint16_t b;
    std::memcpy(&b, &h, 2);
    return b;
}

// The kernel's descriptor helpers (attention_jvp_sm90.cu), verbatim in effect.
u64 k_smem_desc(u32 addr, u32 lbo, u32 sbo) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)((lbo & 0x3FFFF) >> 4) << 16) | ((u64)((sbo & 0x3FFFF) >> 4) << 32) |
           (1ull << 62);
}
u64 k_desc_kmajor(u32 addr) { return k_smem_desc(addr, 16, 1024); }
u64 k_desc_mnmajor(u32 addr, u32 slab) { return k_smem_desc(addr, slab, 1024); }

// A 3-D tensor [z][y][x] of 16-bit values in host memory, and its emulator tensor map.
struct Tensor3 {
    u32 X, Y, Z;
    std::vector<uint16_t> v;
    std::vector<float> f;  // the values
};
Tensor3 make_tensor(u32 X, u32 Y, u32 Z, bool f16, std::mt19937& rng) {
    Tensor3 t{X, Y, Z, {}, {}};
    std::normal_distribution<float> nd;
    t.v.resize((size_t)X * Y * Z);
    t.f.resize(t.v.size());
    for (size_t i = 0; i < t.v.size(); ++i) {
        t.v[i] = f16 ? f32_to_f16(nd(rng)) : f32_to_bf16(nd(rng));
        t.f[i] = fj_sm90::half_to_f32(t.v[i], f16);
    }
    return t;
}
void make_map(const Tensor3& t, u32 box1, u64 (&w)[16]) {
    std::memset(w, 0, sizeof w);
    w[0] = fj_sm90::kTensorMapMagic;
    w[1] = (u64)(uintptr_t)t.v.data();
    w[2] = 3 | (u64)2 << 32;  // rank 3, 2-byte elements
    w[3] = 128;
    w[4] = t.X;
    w[5] = t.Y;
    w[6] = t.Z;
    w[9] = (u64)t.X * 2;
    w[10] = (u64)t.X * t.Y * 2;
    w[13] = 64 | (u64)box1 << 32;
    w[14] = 1;
}

// ---------------------------------------------------------------------------------------------
void test_swizzle() {
    for (u32 r = 0; r < 16; ++r)
        for (u32 c = 0; c < 8; ++c) {
            const u32 a = 2048 + r * 128 + c * 16 + 6;
            CHECK(fj_sm90::swizzle_addr(a, 128) == 2048 + r * 128 + ((c ^ (r % 8)) * 16) + 6, "128B swizzle r %u c %u", r, c);
            CHECK(fj_sm90::swizzle_addr(a, 0) == a, "no swizzle");
        }
    // 64-byte swizzle: chunk bits 4-5 ^= bits 7-8.
    CHECK(fj_sm90::swizzle_addr(3 * 128 + 16, 64) == 3 * 128 + ((1 ^ 3) * 16), "64B swizzle");
}

void test_descriptors() {
    // Field round trip of the kernel's formula.
    const fj_sm90::SmemDesc s = fj_sm90::decode_desc(k_smem_desc(0x12340, 6144, 1024));
    CHECK(s.start == 0x12340 && s.lbo == 6144 && s.sbo == 1024 && s.swizzle == 128 && s.base_offset == 0,
          "decode: start %#x lbo %u sbo %u swizzle %d", s.start, s.lbo, s.sbo, s.swizzle);
    // K-major: chunk kc of a [rows][64] slab written by TMA at base (1024-aligned).
    const u32 base = 4096;
    for (u32 kc = 0; kc < 4; ++kc) {
        const fj_sm90::SmemDesc d = fj_sm90::decode_desc(k_desc_kmajor(base) + ((kc * 32) >> 4));
        for (u32 r = 0; r < 128; ++r)
            for (u32 k = 0; k < 16; ++k)
                CHECK(fj_sm90::operand_addr(d, false, r, k) == fj_sm90::swizzle_addr(base + r * 128 + (16 * kc + k) * 2, 128),
                      "K-major kc %u r %u k %u", kc, r, k);
    }
    // MN-major: key chunk kc2 of two V slabs [keys][64], slab bytes apart.
    const u32 slab = 48 * 128;
    for (u32 kc2 = 0; kc2 < 3; ++kc2) {
        const fj_sm90::SmemDesc d = fj_sm90::decode_desc(k_desc_mnmajor(base, slab) + ((kc2 * 16 * 128) >> 4));
        for (u32 k = 0; k < 16; ++k)
            for (u32 n = 0; n < 128; ++n)
                CHECK(fj_sm90::operand_addr(d, true, n, k) ==
                          fj_sm90::swizzle_addr(base + (n / 64) * slab + (16 * kc2 + k) * 128 + (n % 64) * 2, 128),
                      "MN-major kc2 %u k %u n %u", kc2, k, n);
    }
    // The ISA's examples (bf16): MN-major 64B swizzle ((8,4,2),(8,2)):((1,8,256),(32,512)), LBO 512 B, SBO 1024 B.
    const fj_sm90::SmemDesc m64 = fj_sm90::decode_desc(fj_sm90::encode_desc(0, 512, 1024, 64));
    for (u32 n = 0; n < 64; ++n)
        for (u32 k = 0; k < 16; ++k) {
            const u32 el = (n % 8) + 8 * ((n / 8) % 4) + 256 * (n / 32) + 32 * (k % 8) + 512 * (k / 8);
            CHECK(fj_sm90::operand_offset(m64, true, n, k) == el * 2, "ISA MN 64B example n %u k %u", n, k);
        }
    // K-major, no swizzle, tf32 example scaled to 16-bit: ((8,m),(T,2k)):((1T,SBO),(1,LBO)).
    const fj_sm90::SmemDesc kn = fj_sm90::decode_desc(fj_sm90::encode_desc(0, 256, 128, 0));
    for (u32 r = 0; r < 16; ++r)
        for (u32 k = 0; k < 16; ++k)
            CHECK(fj_sm90::operand_offset(kn, false, r, k) == (r % 8) * 16 + (r / 8) * 128 + (k % 8) * 2 + (k / 8) * 256,
                  "K no-swizzle r %u k %u", r, k);
    // A nonzero base offset is refused.
    std::vector<unsigned char> sm(8192, 0);
    fj_sm90::Product p;
    const std::string e = fj_sm90::wgmma_product(sm.data(), 8192, 8, false, k_desc_kmajor(0) | (1ull << 49), nullptr,
                                                 k_desc_kmajor(0), 1, 1, 0, 0, p);
    CHECK(e.find("base offset") != std::string::npos, "base offset accepted: %s", e.c_str());
}

void test_tma_box() {
    std::mt19937 rng(3);
    Tensor3 t = make_tensor(64, 70, 2, false, rng);
    u64 w[16];
    make_map(t, 48, w);
    fj_sm90::TensorMap m;
    CHECK(fj_sm90::decode_tensor_map(w, m).empty(), "decode");
    CHECK(fj_sm90::tma_box_bytes(m) == 48 * 128, "box bytes");
    const u32 dst = 3072;
    std::vector<unsigned char> st;
    const int c[3] = {0, 48, 1};
    fj_sm90::tma_box_read(m, c, dst, st);
    for (u32 r = 0; r < 48; ++r)
        for (u32 col = 0; col < 64; ++col) {
            uint16_t h;
            std::memcpy(&h, &st[fj_sm90::swizzle_addr(dst + r * 128 + col * 2, 128) - dst], 2);
            const uint16_t want = (48 + r < 70) ? t.v[(size_t)(1 * 70 + 48 + r) * 64 + col] : 0;
            CHECK(h == want, "box r %u col %u: %#x want %#x", r, col, h, want);
        }
    // Negative start coordinates are out of bounds too.
    const int c2[3] = {0, -5, 0};
    fj_sm90::tma_box_read(m, c2, dst, st);
    uint16_t h0;
    std::memcpy(&h0, &st[fj_sm90::swizzle_addr(dst + 4 * 128, 128) - dst], 2);
    uint16_t h5;
    std::memcpy(&h5, &st[fj_sm90::swizzle_addr(dst + 5 * 128, 128) - dst], 2);
    CHECK(h0 == 0 && h5 == t.v[0], "negative rows: %#x %#x", h0, h5);
    w[0] ^= 1;
    CHECK(fj_sm90::decode_tensor_map(w, m).find("magic") != std::string::npos, "bad magic accepted");
    w[0] ^= 1;
    w[10] += 8;  // a stride that is not a multiple of 16 bytes
    CHECK(fj_sm90::decode_tensor_map(w, m).find("stride") != std::string::npos, "bad stride accepted");
}

// A 4-D map in the attention kernel's form over a packed qkv projection [B][N][3][H][d] (d = 64): the
// k operand's dims {d, N, H, B}, byte strides {3Hd, d, N 3Hd} * 2 (the head stride below the row
// stride), at k's offset H d; rows past N zero-filled per head.
void test_tma_box_4d() {
    std::mt19937 rng(4);
    const u32 B = 2, N = 37, H = 3, d = 64;
    Tensor3 t = make_tensor(d, 3 * H, N * B, false, rng);  // [B*N][3H][d]: the same bytes
    u64 w[16];
    std::memset(w, 0, sizeof w);
    w[0] = fj_sm90::kTensorMapMagic;
    w[1] = (u64)(uintptr_t)(t.v.data() + H * d);
    w[2] = 4 | (u64)2 << 32;
    w[3] = 128;
    w[4] = d;
    w[5] = N;
    w[6] = H;
    w[7] = B;
    w[9] = (u64)3 * H * d * 2;
    w[10] = (u64)d * 2;
    w[11] = (u64)N * 3 * H * d * 2;
    w[13] = 64 | (u64)32 << 32;
    w[14] = 1 | (u64)1 << 32;
    fj_sm90::TensorMap m;
    const std::string e = fj_sm90::decode_tensor_map(w, m);
    CHECK(e.empty() && m.rank == 4, "decode 4-D: %s", e.c_str());
    CHECK(fj_sm90::tma_box_bytes(m) == 32 * 128, "4-D box bytes");
    const u32 dst = 2048;
    std::vector<unsigned char> st;
    for (u32 b = 0; b < B; ++b)
        for (u32 h = 0; h < H; ++h) {
            const int c[4] = {0, 16, (int)h, (int)b};  // rows 16..47: 37.. past N
            fj_sm90::tma_box_read(m, c, dst, st);
            for (u32 r = 0; r < 32; ++r)
                for (u32 col = 0; col < 64; ++col) {
                    uint16_t got;
                    std::memcpy(&got, &st[fj_sm90::swizzle_addr(dst + r * 128 + col * 2, 128) - dst], 2);
                    const u32 n = 16 + r;
                    const uint16_t want = n < N ? t.v[(((size_t)b * N + n) * 3 * H + H + h) * d + col] : 0;
                    CHECK(got == want, "4-D box b %u h %u r %u col %u: %#x want %#x", b, h, r, col, got, want);
                }
        }
    // A rank-4 map read by a .3d copy is an error of the copy (tested through the decoder's rank here).
    w[2] = 6 | (u64)2 << 32;
    CHECK(fj_sm90::decode_tensor_map(w, m).find("rank") != std::string::npos, "rank 6 accepted");
}

// Puts a [rows][64] slab of t (rows r0.., z, columns c0..) into smem at dst as TMA would.
void put_slab(std::vector<unsigned char>& sm, u32 dst, const Tensor3& t, u32 c0, int r0, u32 z, u32 rows) {
    u64 w[16];
    make_map(t, rows, w);
    fj_sm90::TensorMap m;
    fj_sm90::decode_tensor_map(w, m);
    std::vector<unsigned char> st;
    const int c[3] = {(int)c0, r0, (int)z};
    fj_sm90::tma_box_read(m, c, dst, st);
    std::memcpy(&sm[dst], st.data(), st.size());
}

void test_wgmma_products() {
    std::mt19937 rng(5);
    for (bool f16 : {false, true})
        for (int n : {48, 64, 128}) {
            // A: 64 x 128 (m, k), B K-major: n x 128 (n, k), B MN-major: 128 x n stored [k][n] in 64-col slabs.
            Tensor3 A = make_tensor(128, 64, 1, f16, rng), Bk = make_tensor(128, n, 1, f16, rng);
            Tensor3 Bm = make_tensor(n, 16, 1, f16, rng);  // [k][n]
            std::vector<unsigned char> sm(65536, 0xff);
            const u32 sA = 0, sB = 16384, sV = 49152;
            for (u32 s = 0; s < 2; ++s) {
                put_slab(sm, sA + s * 64 * 128, A, 64 * s, 0, 0, 64);
                put_slab(sm, sB + s * n * 128, Bk, 64 * s, 0, 0, n);
            }
            const u32 vslab = 16 * 128;
            for (u32 s = 0; s < (u32)(n + 63) / 64; ++s) {
                Tensor3 part{64, 16, 1, {}, {}};
                part.v.assign(64 * 16, 0);
                for (u32 k = 0; k < 16; ++k)
                    for (u32 c = 0; c < 64; ++c)
                        if (64 * s + c < (u32)n) part.v[k * 64 + c] = Bm.v[k * n + 64 * s + c];
                put_slab(sm, sV + s * vslab, part, 0, 0, 0, 16);
            }
            for (u32 kc = 0; kc < 8; ++kc) {
                const u64 da = k_desc_kmajor(sA) + (((kc >> 2) * 64 * 128 + (kc & 3) * 32) >> 4);
                const u64 db = k_desc_kmajor(sB) + (((kc >> 2) * n * 128 + (kc & 3) * 32) >> 4);
                fj_sm90::Product p;
                std::string e = fj_sm90::wgmma_product(sm.data(), 65536, n, f16, da, nullptr, db, 1, -1, 0, 0, p);
                CHECK(e.empty(), "%s", e.c_str());
                double worst = 0;
                for (int m = 0; m < 64; ++m)
                    for (int c = 0; c < n; ++c) {
                        double ref = 0;
                        for (int k = 0; k < 16; ++k)
                            ref += (double)A.f[m * 128 + 16 * kc + k] * Bk.f[c * 128 + 16 * kc + k];
                        worst = std::max(worst, std::fabs(p.p[(size_t)m * n + c] + ref));
                    }
                CHECK(worst < 1e-9, "SS K-major n %d f16 %d kc %u: error %g", n, f16, kc, worst);
            }
            // A from "registers" (given) times MN-major B.
            std::vector<float> ag(64 * 16);
            for (int i = 0; i < 64 * 16; ++i) ag[i] = A.f[(i / 16) * 128 + i % 16];
            fj_sm90::Product p;
            std::string e = fj_sm90::wgmma_product(sm.data(), 65536, n, f16, 0, ag.data(), k_desc_mnmajor(sV, vslab), 1,
                                                   1, 0, 1, p);
            CHECK(e.empty(), "%s", e.c_str());
            double worst = 0;
            for (int m = 0; m < 64; ++m)
                for (int c = 0; c < n; ++c) {
                    double ref = 0;
                    for (int k = 0; k < 16; ++k) ref += (double)ag[m * 16 + k] * Bm.f[k * n + c];
                    worst = std::max(worst, std::fabs(p.p[(size_t)m * n + c] - ref));
                }
            CHECK(worst < 1e-9, "RS MN-major n %d f16 %d: error %g", n, f16, worst);
        }
    // Fragment maps cover the tiles exactly once.
    std::vector<int> seen(64 * 64, 0), seen_a(64 * 16, 0);
    for (int t = 0; t < 128; ++t) {
        for (int i = 0; i < 32; ++i) {
            int r, c;
            fj_sm90::acc_coord(t, i, r, c);
            seen[r * 64 + c]++;
        }
        for (int j = 0; j < 8; ++j) {
            int r, k;
            fj_sm90::afrag_coord(t, j, r, k);
            seen_a[r * 16 + k]++;
        }
    }
    CHECK(std::all_of(seen.begin(), seen.end(), [](int v) { return v == 1; }), "accumulator map");
    CHECK(std::all_of(seen_a.begin(), seen_a.end(), [](int v) { return v == 1; }), "A fragment map");
}

// ---------------------------------------------------------------------------------------------
// The stateful layer: a pipeline like the kernel's, on 256 threads (warpgroup 0: thread 0 produces;
// warpgroup 1 consumes). For each of `tiles` tiles of 64 keys: S = Q K_j^T (SS, K-major, k = 64 in 4
// chunks), then O += P V_j with P = bf16(S) from registers (RS, V MN-major). K and V share a 2-stage
// ring. Output: O (64 x 64) per thread fragment, compared with a naive product.
struct Faults {
    bool skip_empty_wait = false, skip_full_wait = false, wrong_parity = false, bad_magic = false;
    bool touch_acc = false, divergent = false, no_fence = false, nbar_count = false, tx_short = false;
    bool tx_long = false, never_produce = false, no_wait_group = false, early_release = false;
    bool release_before_read = false;
};

std::string pipeline(const Faults& F, double* err_out) {
    const bool f16 = false;
    const int tiles = 5, STAGES = 2;
    std::mt19937 rng(11);
    Tensor3 Q = make_tensor(64, 64, 1, f16, rng), K = make_tensor(64, 64 * tiles, 1, f16, rng);
    Tensor3 V = make_tensor(64, 64 * tiles, 1, f16, rng);
    u64 mq[16], mk[16], mv[16];
    make_map(Q, 64, mq);
    make_map(K, 64, mk);
    make_map(V, 64, mv);
    if (F.bad_magic) mk[0] = 0x1234;
    const u32 sQ = 0, sK = 8192, sV = sK + STAGES * 8192, bars = sV + STAGES * 8192;
    auto full = [&](int st) { return bars + 8u * (1 + st); };
    auto empty = [&](int st) { return bars + 8u * (1 + STAGES + st); };
    std::vector<float> O(64 * 64, NAN);
    const u32 smem = bars + 8 * (1 + 2 * STAGES);
    std::string e = mini::run(256, smem, [&](unsigned tid) {
        if (tid == 0) {
            fj_sm90::mbar_init(bars, 1, __FILE__, __LINE__);
            for (int st = 0; st < STAGES; ++st) {
                fj_sm90::mbar_init(full(st), 1, __FILE__, __LINE__);
                fj_sm90::mbar_init(empty(st), 4, __FILE__, __LINE__);
            }
        }
        mini::syncthreads();
        if (tid < 128) {
            if (tid != 0) return;
            if (F.never_produce) return;
            fj_sm90::prefetch_tensormap(mk, __FILE__, __LINE__);
            fj_sm90::mbar_arrive_expect_tx(bars, 8192, __FILE__, __LINE__);
            fj_sm90::tma_load_3d(sQ, mq, bars, 0, 0, 0, __FILE__, __LINE__);
            for (int j = 0; j < tiles; ++j) {
                const int st = j % STAGES, use = j / STAGES;
                if (use > 0 && !F.skip_empty_wait) fj_sm90::mbar_wait_parity(empty(st), (use - 1) & 1, __FILE__, __LINE__);
                if (use > 0 && F.release_before_read)  // the readers finish meanwhile, but unordered
                    for (int y = 0; y < 200; ++y) mini::yield();
                u32 bytes = 16384;
                if (F.tx_short) bytes -= 128;
                if (F.tx_long) bytes += 128;
                fj_sm90::mbar_arrive_expect_tx(full(st), bytes, __FILE__, __LINE__);
                fj_sm90::tma_load_3d(sK + st * 8192, mk, full(st), 0, 64 * j, 0, __FILE__, __LINE__);
                fj_sm90::tma_load_3d(sV + st * 8192, mv, full(st), 0, 64 * j, 0, __FILE__, __LINE__);
            }
            return;
        }
        const unsigned lt = tid - 128;
        float s[32], o[32];
        u32 pa[4][4];
        for (int i = 0; i < 32; ++i) o[i] = 0.f;
        if (F.nbar_count) fj_sm90::bar_arrive(1, lt < 64 ? 128 : 96, __FILE__, __LINE__);
        fj_sm90::mbar_wait_parity(bars, 0, __FILE__, __LINE__);
        for (int j = 0; j < tiles; ++j) {
            const int st = j % STAGES;
            u32 parity = (j / STAGES) & 1;
            if (F.wrong_parity && j == 2) parity ^= 1;
            if (!(F.skip_full_wait && j == 3)) fj_sm90::mbar_wait_parity(full(st), parity, __FILE__, __LINE__);
            if (F.release_before_read && lt % 32 == 0) fj_sm90::mbar_arrive(empty(st), __FILE__, __LINE__);
            if (!(F.no_fence && j == 1)) fj_sm90::wgmma_fence(__FILE__, __LINE__);
            for (u32 kc = 0; kc < 4; ++kc) {
                u64 db = k_desc_kmajor(sK + st * 8192) + ((kc * 32) >> 4);
                if (F.divergent && lt == 77 && kc == 2) db += 2;
                fj_sm90::wgmma_ss(s, 64, f16, k_desc_kmajor(sQ) + ((kc * 32) >> 4), db, kc > 0, 1, 1, 0, 0, __FILE__,
                                  __LINE__);
            }
            fj_sm90::wgmma_commit(__FILE__, __LINE__);
            if (F.touch_acc && j == 1 && lt == 5) s[3] = 1.f;
            if (!(F.no_wait_group && j == tiles - 1)) fj_sm90::wgmma_wait(0, __FILE__, __LINE__);
            if (F.no_wait_group && j == tiles - 1) return;
            for (int c = 0; c < 4; ++c)
                for (int r = 0; r < 4; ++r) {
                    const float lo = s[8 * c + 2 * r], hi = s[8 * c + 2 * r + 1];
                    pa[c][r] = (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
                }
            if (F.early_release && lt % 32 == 0) fj_sm90::mbar_arrive(empty(st), __FILE__, __LINE__);
            fj_sm90::wgmma_fence(__FILE__, __LINE__);
            for (u32 kc2 = 0; kc2 < 4; ++kc2)
                fj_sm90::wgmma_rs(o, 64, f16, pa[kc2], k_desc_mnmajor(sV + st * 8192, 8192) + ((kc2 * 16 * 128) >> 4), 1,
                                  1, 1, 1, __FILE__, __LINE__);
            fj_sm90::wgmma_commit(__FILE__, __LINE__);
            fj_sm90::wgmma_wait(0, __FILE__, __LINE__);
            if (!F.early_release && !F.release_before_read && lt % 32 == 0)
                fj_sm90::mbar_arrive(empty(st), __FILE__, __LINE__);
        }
        for (int i = 0; i < 32; ++i) {
            int r, c;
            fj_sm90::acc_coord((int)lt, i, r, c);
            O[r * 64 + c] = o[i];
        }
    });
    if (!e.empty()) return e;
    double worst = 0;
    for (int m = 0; m < 64; ++m)
        for (int c = 0; c < 64; ++c) {
            double ref = 0;
            for (int j = 0; j < tiles; ++j)
                for (int key = 0; key < 64; ++key) {
                    float sv = 0;
                    double sd = 0;
                    for (int k = 0; k < 64; ++k) sd += (double)Q.f[m * 64 + k] * K.f[(64 * j + key) * 64 + k];
                    sv = (float)sd;
                    const float p = fj_sm90::half_to_f32(f32_to_bf16(sv), false);
                    ref += (double)p * V.f[(64 * j + key) * 64 + c];
                }
            worst = std::max(worst, std::fabs(O[m * 64 + c] - ref) / (1.0 + std::fabs(ref)));
        }
    *err_out = worst;
    return "";
}

// An error containing `needle` or (when given) `needle2`; prints the first 400 characters.
void expect_error(const char* name, const Faults& F, const char* needle, const char* needle2 = nullptr) {
    double err = 0;
    const std::string e = pipeline(F, &err);
    const bool ok = e.find(needle) != std::string::npos || (needle2 && e.find(needle2) != std::string::npos);
    CHECK(ok, "%s: expected an error containing \"%s\", got \"%s\"", name, needle, e.c_str());
    printf("  %-16s -> %s\n", name, e.empty() ? "(no error)" : e.substr(0, 400).c_str());
}

int main() {
    test_swizzle();
    test_descriptors();
    test_tma_box();
    test_tma_box_4d();
    test_wgmma_products();
    printf("pure layer: %s\n", failures ? "FAILED" : "ok");
    {
        double err = -1;
        const std::string e = pipeline(Faults(), &err);
        CHECK(e.empty(), "clean pipeline: %s", e.c_str());
        CHECK(err >= 0 && err < 2e-3, "clean pipeline error %g", err);  // bf16 P, f32 accumulation
        printf("pipeline (producer + warpgroup, TMA ring, SS + RS wgmma): max rel error %.2e%s\n", err,
               e.empty() ? "" : (" ERROR " + e).c_str());
    }
    printf("expected errors:\n");
    Faults f;
    f = Faults(); f.never_produce = true; expect_error("never produced", f, "deadlock");
    f = Faults(); f.wrong_parity = true; expect_error("wrong parity", f, "wrong-parity wait on the \"full\"", "for parity 0 of the mbarrier");
    f = Faults(); f.skip_full_wait = true; expect_error("no full wait", f, "\"full\" barrier");
    f = Faults(); f.skip_empty_wait = true; expect_error("no empty wait", f, "\"empty\"");
    f = Faults(); f.early_release = true; expect_error("early release", f, "released to this thread", "still reads");
    f = Faults(); f.release_before_read = true; expect_error("release first", f, "released to this thread");
    f = Faults(); f.bad_magic = true; expect_error("bad magic", f, "magic");
    f = Faults(); f.touch_acc = true; expect_error("acc in flight", f, "written while the operation was in flight");
    f = Faults(); f.divergent = true; expect_error("divergent", f, "divergent wgmma");
    f = Faults(); f.no_fence = true; expect_error("no fence", f, "without a wgmma.fence");
    f = Faults(); f.nbar_count = true; expect_error("nbar count", f, "with count");
    f = Faults(); f.tx_short = true; expect_error("tx short", f, "-128 transaction bytes outstanding");
    f = Faults(); f.tx_long = true; expect_error("tx long", f, " 128 transaction bytes outstanding");
    f = Faults(); f.no_wait_group = true; expect_error("no wait_group", f, "in flight");
    printf("%s (%d failures)\n", failures ? "SM90 SELFTEST FAILED" : "sm90 selftest ok", failures);
    return failures ? 1 : 0;
}
