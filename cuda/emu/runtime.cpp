// runtime.cpp: the execution model of flashjvp's host CUDA emulator (see README.md in this folder).
//
// A launch runs its blocks on `workers` OS threads; each block runs entirely on one OS thread, whose
// CUDA threads are fibers switched cooperatively at scheduling points: __syncthreads, warp collectives
// (shuffles, __syncwarp, ldmatrix, mma.sync) and thread exit. Between two scheduling points a CUDA
// thread runs alone. At every scheduling point the scheduler runs the runnable thread of lowest index
// (seed 0) or a runnable thread drawn from the seed; no runnable thread while some are live is a
// deadlock, reported as an error.
//
// Global mutable state: only the kernel registry (filled by static initialisers at load time) and the
// one-time installation of the SIGSEGV/SIGBUS reporter. Everything else is per launch or thread_local.

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__) || defined(FJ_EMU_UCONTEXT)
#define FJ_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#else
#define FJ_EMU_USE_UCONTEXT 0
#endif

#include "fj_emu.h"
#include "sm90.h"  // Hopper PTX: declarations (the implementation is included at the end)

#define FJ_EMU_C extern "C" __attribute__((visibility("default")))

namespace fj_emu {
namespace {

// ---------------------------------------------------------------------------------------------
// Configuration, read once at load time.
size_t env_size(const char* name, size_t dflt) {
    const char* s = getenv(name);
    if (!s || !*s) return dflt;
    char* end = nullptr;
    unsigned long long v = strtoull(s, &end, 10);
    return (end && *end == '\0' && v > 0) ? (size_t)v : dflt;
}
const size_t kStackBytes = env_size("FJ_EMU_STACK_KB", 256) * 1024;  // per CUDA thread
const bool kPoisonCheck = [] {
    const char* s = getenv("FJ_EMU_POISON_CHECK");
    return !(s && s[0] == '0');
}();
const size_t kPage = (size_t)sysconf(_SC_PAGESIZE);
constexpr unsigned kMaxDynSmem = 232448;  // 227 KiB, the largest opt-in dynamic shared memory (sm_90)

size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

// ---------------------------------------------------------------------------------------------
// Registry.
struct Kernel {
    std::string name;
    void* fn;
    Invoker inv;
    int nparams;
    std::string sig;
};
struct Registry {
    std::vector<Kernel> kernels;
    std::unordered_map<std::string, size_t> index;
    std::vector<std::string> duplicates;
};
Registry& registry() {
    static Registry r;
    return r;
}

// ---------------------------------------------------------------------------------------------
// Execution state.
enum State : unsigned char { RUNNABLE, AT_BARRIER, AT_WARP, EXITED };
enum Coll : unsigned char { C_NONE, C_SHFL, C_SHFL_XOR, C_SYNCWARP, C_LDM, C_LDM_T, C_MMA_BF16, C_MMA_F16 };
const char* coll_name(Coll k) {
    switch (k) {
    case C_SHFL: return "__shfl_sync";
    case C_SHFL_XOR: return "__shfl_xor_sync";
    case C_SYNCWARP: return "__syncwarp";
    case C_LDM: return "ldmatrix.x4";
    case C_LDM_T: return "ldmatrix.x4.trans";
    case C_MMA_BF16: return "mma.m16n8k16.bf16";
    case C_MMA_F16: return "mma.m16n8k16.f16";
    default: return "(none)";
    }
}

struct PendingCopy {
    fj_u32 dst;
    int group;
    unsigned char data[16];
};

struct Block;
struct Launch;

struct Ctx {
#if FJ_EMU_USE_UCONTEXT
    ucontext_t uc;
#else
    void* sp = nullptr;
#endif
};

struct Fiber {
    Ctx ctx;
    unsigned char* stack_map = nullptr;  // guard page at the low end, then the stack
    size_t stack_map_len = 0;
    Builtins b;
    Block* blk = nullptr;
    unsigned linear = 0, warp = 0, lane = 0;
    State st = RUNNABLE;
    const char* site_file = nullptr;  // where it waits (barrier or collective)
    int site_line = 0;
    int commits = 0;  // cp.async groups committed
    std::vector<PendingCopy> copies;
};

struct WarpSlot {
    Coll kind = C_NONE;
    unsigned mask = 0, arrived = 0, exited = 0, present = 0;
    const char* file = nullptr;
    int line = 0;
    unsigned v[32];
    int arg[32], width[32];
    fj_u32 addr[32];
    fj_u32 a[32][4], bb[32][2];
    float c[32][4];
    void* out[32];
};

struct Launch {
    const Kernel* k;
    uint3 grid, block;
    unsigned dyn;
    void** params;
    unsigned long long seed;
    unsigned long long nblocks;
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::string err;
};

struct Block {
    Launch* L = nullptr;
    uint3 bid{};
    unsigned n = 0, nwarps = 0, live = 0, bar_count = 0;
    Fiber* f = nullptr;
    WarpSlot* w = nullptr;
    unsigned long long runnable[16];  // bit i: thread i is RUNNABLE (blocks have at most 1024 threads)
    unsigned char* smem = nullptr;
    unsigned smem_bytes = 0;
    bool failed = false;
    std::string err;
    Ctx sched;
    unsigned long long rng = 0;
};

// Per OS thread: fiber stacks, fibers, warp slots and the shared-memory window, reused across blocks
// and launches.
struct Worker {
    std::vector<Fiber> fibers;
    std::vector<WarpSlot> warps;
    unsigned char* smem_map = nullptr;
    size_t smem_map_len = 0;
    ~Worker() {
        for (Fiber& f : fibers)
            if (f.stack_map) munmap(f.stack_map, f.stack_map_len);
        if (smem_map) munmap(smem_map, smem_map_len);
    }
};

thread_local Worker tls_worker;
thread_local Fiber* tls_fiber = nullptr;  // the running CUDA thread (null in the scheduler)
thread_local Block* tls_block = nullptr;  // the block this OS thread runs
thread_local std::string tls_error;       // the last error of a launch called from this OS thread

// ---------------------------------------------------------------------------------------------
// Context switching. x86-64: a minimal switch of the callee-saved registers (the kernels never change
// MXCSR or the x87 control word); elsewhere, or with -DFJ_EMU_UCONTEXT, ucontext.
void fiber_main(Fiber* f);

#if FJ_EMU_USE_UCONTEXT
void uc_entry(unsigned hi, unsigned lo) {
    fiber_main(reinterpret_cast<Fiber*>(((uintptr_t)hi << 32) | (uintptr_t)lo));
}
bool ctx_init(Ctx& c, unsigned char* stack, size_t size, Fiber* f) {
    if (getcontext(&c.uc) != 0) return false;
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    uintptr_t p = (uintptr_t)f;
    makecontext(&c.uc, (void (*)())uc_entry, 2, (unsigned)(p >> 32), (unsigned)(p & 0xffffffffu));
    return true;
}
inline void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
#else
}  // namespace
}  // namespace fj_emu
extern "C" void fj_emu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void fj_emu_ctx_entry();
asm(R"(
    .text
    .p2align 4
    .hidden fj_emu_ctx_switch
    .globl fj_emu_ctx_switch
    .type fj_emu_ctx_switch, @function
fj_emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fj_emu_ctx_switch, .-fj_emu_ctx_switch

    .p2align 4
    .hidden fj_emu_ctx_entry
    .globl fj_emu_ctx_entry
    .type fj_emu_ctx_entry, @function
fj_emu_ctx_entry:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size fj_emu_ctx_entry, .-fj_emu_ctx_entry
)");
namespace fj_emu {
namespace {
bool ctx_init(Ctx& c, unsigned char* stack, size_t size, Fiber* f) {
    // Entered through `ret` into fj_emu_ctx_entry with %rsp 16-byte aligned, so that its `call` gives
    // fiber_main the ABI's entry alignment. Slots below the return address: rbp, rbx, r12 (the fiber),
    // r13 (fiber_main), r14, r15.
    uintptr_t top = ((uintptr_t)(stack + size)) & ~(uintptr_t)15;
    void** ret = reinterpret_cast<void**>(top - 8);
    ret[0] = reinterpret_cast<void*>(&fj_emu_ctx_entry);
    ret[-1] = nullptr;
    ret[-2] = nullptr;
    ret[-3] = f;
    ret[-4] = reinterpret_cast<void*>(&fiber_main);
    ret[-5] = nullptr;
    ret[-6] = nullptr;
    c.sp = &ret[-6];
    return true;
}
inline void ctx_switch(Ctx& from, Ctx& to) { fj_emu_ctx_switch(&from.sp, to.sp); }
#endif

// ---------------------------------------------------------------------------------------------
// Messages.
std::string fmt3(const uint3& v) {
    char buf[64];
    snprintf(buf, sizeof buf, "(%u,%u,%u)", v.x, v.y, v.z);
    return buf;
}
std::string site(const char* file, int line) {
    if (!file) return "?";
    const char* base = strrchr(file, '/');
    return std::string(base ? base + 1 : file) + ":" + std::to_string(line);
}
bool same_site(const char* f1, int l1, const char* f2, int l2) {
    return l1 == l2 && (f1 == f2 || (f1 && f2 && strcmp(f1, f2) == 0));
}
std::string who(const Fiber& f) {
    const Block& B = *f.blk;
    return "kernel " + B.L->k->name + " block " + fmt3(B.bid) + " thread " + fmt3(f.b.tid) + " (warp " +
           std::to_string(f.warp) + " lane " + std::to_string(f.lane) + ")";
}
std::string lane_list(unsigned m) {
    std::string s;
    for (int i = 0; i < 32;) {
        if (!(m >> i & 1)) { ++i; continue; }
        int j = i;
        while (j + 1 < 32 && (m >> (j + 1) & 1)) ++j;
        if (!s.empty()) s += ",";
        s += std::to_string(i);
        if (j > i) s += "-" + std::to_string(j);
        i = j + 1;
    }
    return "{" + s + "}";
}

// Records an error blamed on the CUDA thread `blame` (the first error of a block wins) and abandons
// the current fiber: the scheduler never resumes it. Its stack holds no object with a destructor at
// that point (the kernels' locals are plain values; the message is built and destroyed before the
// switch), so nothing leaks.
[[noreturn]] void abandon(Fiber* cur) {
    ctx_switch(cur->ctx, cur->blk->sched);
    __builtin_trap();  // never resumed
}
#define FJ_FAIL(cur, blame, expr)                                   \
    do {                                                            \
        {                                                           \
            Block& fj_b_ = *(cur)->blk;                             \
            if (!fj_b_.failed) {                                    \
                fj_b_.failed = true;                                \
                fj_b_.err = who(*(blame)) + ": " + (expr);          \
            }                                                       \
        }                                                           \
        abandon(cur);                                               \
    } while (0)

Fiber* current(const char* what) {
    Fiber* f = tls_fiber;
    if (!f) {
        fprintf(stderr, "fj_emu: %s called outside an emulated kernel\n", what);
        abort();
    }
    return f;
}

inline void yield(Fiber* f) { ctx_switch(f->ctx, f->blk->sched); }

inline void set_state(Block& B, unsigned i, State st) {
    B.f[i].st = st;
    if (st == RUNNABLE) B.runnable[i >> 6] |= 1ull << (i & 63);
    else B.runnable[i >> 6] &= ~(1ull << (i & 63));
}

// ---------------------------------------------------------------------------------------------
// Barrier.
void release_barrier(Block& B, Fiber* cur) {
    const Fiber* first = nullptr;
    for (unsigned i = 0; i < B.n; ++i) {
        Fiber& f = B.f[i];
        if (f.st != AT_BARRIER) continue;
        if (!first) first = &f;
        else if (!same_site(first->site_file, first->site_line, f.site_file, f.site_line))
            FJ_FAIL(cur, &f, "divergent __syncthreads: this thread waits at " + site(f.site_file, f.site_line) +
                                 ", thread " + fmt3(first->b.tid) + " at " +
                                 site(first->site_file, first->site_line) +
                                 " (every thread of the block must reach the same barrier)");
    }
    for (unsigned i = 0; i < B.n; ++i)
        if (B.f[i].st == AT_BARRIER) set_state(B, i, RUNNABLE);
    B.bar_count = 0;
}

// ---------------------------------------------------------------------------------------------
// Warp collectives: every lane named by the mask deposits its operands; the last to arrive computes
// the results for all and makes them runnable. Every arriving lane then yields (a scheduling point).
void ldmatrix_compute(Fiber* cur, Block& B, WarpSlot& w, bool trans);
void mma_compute(WarpSlot& w, bool f16);

void compute(Fiber* cur, Block& B, WarpSlot& w) {
    switch (w.kind) {
    case C_SHFL:
    case C_SHFL_XOR: {
        unsigned res[32];
        for (int l = 0; l < 32; ++l) {
            if (!(w.mask >> l & 1)) continue;
            const int width = w.width[l];
            int s;
            if (w.kind == C_SHFL_XOR) {
                s = l ^ w.arg[l];
                if (s >= (l / width + 1) * width) s = l;  // later groups read their own value
            } else {
                s = (l / width) * width + (w.arg[l] & (width - 1));
            }
            if (s < 0 || s > 31 || !(w.mask >> s & 1)) {
                Fiber* blame = &B.f[cur->warp * 32 + l];
                FJ_FAIL(cur, blame,
                        std::string(coll_name(w.kind)) + " at " + site(w.file, w.line) + " reads lane " +
                            std::to_string(s) + ", which is not in the mask " + lane_list(w.mask));
            }
            res[l] = w.v[s];
        }
        for (int l = 0; l < 32; ++l)
            if (w.mask >> l & 1) *static_cast<unsigned*>(w.out[l]) = res[l];
        break;
    }
    case C_SYNCWARP: break;
    case C_LDM: ldmatrix_compute(cur, B, w, false); break;
    case C_LDM_T: ldmatrix_compute(cur, B, w, true); break;
    case C_MMA_BF16: mma_compute(w, false); break;
    case C_MMA_F16: mma_compute(w, true); break;
    default: break;
    }
}

// Arrival bookkeeping; returns the slot with this lane's bit set (operands to be stored by the caller
// before finish()).
WarpSlot& arrive(Fiber* f, Coll kind, unsigned mask, const char* file, int line) {
    Block& B = *f->blk;
    WarpSlot& w = B.w[f->warp];
    const unsigned bit = 1u << f->lane;
    if (!(mask & bit))
        FJ_FAIL(f, f, std::string(coll_name(kind)) + " at " + site(file, line) + ": the mask " + lane_list(mask) +
                          " does not name the calling lane");
    if (mask & ~w.present)
        FJ_FAIL(f, f, std::string(coll_name(kind)) + " at " + site(file, line) + ": the mask names lanes " +
                          lane_list(mask & ~w.present) + " that this block does not have (partial warp)");
    if (w.arrived == 0) {
        w.kind = kind;
        w.mask = mask;
        w.file = file;
        w.line = line;
    } else if (w.kind != kind || w.mask != mask || !same_site(w.file, w.line, file, line)) {
        FJ_FAIL(f, f, std::string("divergent warp collectives: this lane is at ") + coll_name(kind) + " " +
                          site(file, line) + " mask " + lane_list(mask) + " while lanes " + lane_list(w.arrived) +
                          " wait at " + coll_name(w.kind) + " " + site(w.file, w.line) + " mask " +
                          lane_list(w.mask));
    }
    if (mask & w.exited)
        FJ_FAIL(f, f, std::string(coll_name(kind)) + " at " + site(file, line) + " waits for lanes " +
                          lane_list(mask & w.exited) + ", which have exited (a collective that can never complete)");
    w.arrived |= bit;
    f->site_file = file;
    f->site_line = line;
    return w;
}
void finish(Fiber* f, WarpSlot& w) {
    Block& B = *f->blk;
    set_state(B, f->linear, AT_WARP);
    if (w.arrived == w.mask) {
        compute(f, B, w);
        for (int l = 0; l < 32; ++l)
            if (w.mask >> l & 1) set_state(B, f->warp * 32 + l, RUNNABLE);
        w.arrived = 0;
        w.kind = C_NONE;
    }
    yield(f);
}

// ldmatrix .m8n8.x4 .b16: lane 8j+r gives the address of row r of matrix j (16 bytes, 16-byte
// aligned). Lane l receives in register j elements (row l/4, columns 2(l%4), 2(l%4)+1) of matrix j,
// the lower column in the lower half; with .trans, of the transpose: elements (rows 2(l%4), 2(l%4)+1,
// column l/4).
void ldmatrix_compute(Fiber* cur, Block& B, WarpSlot& w, bool trans) {
    fj_u16 M[4][8][8];
    for (int j = 0; j < 4; ++j)
        for (int r = 0; r < 8; ++r) {
            const int l = 8 * j + r;
            const fj_u32 off = w.addr[l];
            if ((off & 15u) != 0 || (unsigned long long)off + 16 > B.smem_bytes) {
                Fiber* blame = &B.f[cur->warp * 32 + l];
                char buf[160];
                snprintf(buf, sizeof buf, "shared offset %u (%s; the dynamic shared window is %u bytes)", off,
                         (off & 15u) ? "not 16-byte aligned" : "out of range", B.smem_bytes);
                FJ_FAIL(cur, blame,
                        std::string(coll_name(w.kind)) + " at " + site(w.file, w.line) + ": this lane gives row " +
                            std::to_string(r) + " of matrix " + std::to_string(j) + " at " + buf);
            }
            std::memcpy(M[j][r], B.smem + off, 16);
            if (kPoisonCheck)
                for (int c = 0; c < 8; ++c)
                    if (M[j][r][c] == 0xffffu) {
                        Fiber* blame = &B.f[cur->warp * 32 + l];
                        FJ_FAIL(cur, blame,
                                std::string(coll_name(w.kind)) + " at " + site(w.file, w.line) +
                                    " reads poison (0xffff) at shared offset " + std::to_string(off + 2 * c) +
                                    " (row " + std::to_string(r) + " of matrix " + std::to_string(j) +
                                    ", address given by this lane): shared memory never written, or written by a "
                                    "cp.async not yet retired by cp.async.wait_group + a barrier "
                                    "(FJ_EMU_POISON_CHECK=0 lets such NaNs through)");
                    }
        }
    for (int l = 0; l < 32; ++l) {
        fj_u32* out = static_cast<fj_u32*>(w.out[l]);
        const int r = l >> 2, c = 2 * (l & 3);
        for (int j = 0; j < 4; ++j) {
            fj_u16 lo, hi;
            if (trans) {
                lo = M[j][c][r];
                hi = M[j][c + 1][r];
            } else {
                lo = M[j][r][c];
                hi = M[j][r][c + 1];
            }
            out[j] = (fj_u32)lo | ((fj_u32)hi << 16);
        }
    }
}

inline float bf16_f32(fj_u16 h) {
    fj_u32 u = (fj_u32)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float f16_f32(fj_u16 h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, fragments per the PTX ISA
// (g = lane/4, t = lane%4; the lower-indexed element in the lower half of a register):
//   A (16x16): a0,a1 (row g, k 2t,2t+1), a2,a3 (row g+8, k 2t..), a4,a5 (row g, k 2t+8..), a6,a7 (row g+8,
//              k 2t+8..); register i holds a(2i), a(2i+1).
//   B (16x8):  b0,b1 (k 2t,2t+1, col g), b2,b3 (k 2t+8,2t+9, col g).
//   C/D (16x8): c0,c1 (row g, cols 2t,2t+1), c2,c3 (row g+8, cols 2t,2t+1).
// Products are exact in f64; each D element is C + the 16 products summed in f64, rounded once to f32.
void mma_compute(WarpSlot& w, bool f16) {
    double A[16][16], Bm[16][8], D[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        auto cv = [f16](fj_u16 h) { return (double)(f16 ? f16_f32(h) : bf16_f32(h)); };
        const fj_u32* a = w.a[l];
        const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
        for (int i = 0; i < 4; ++i) {
            A[rows[i]][cols[i]] = cv((fj_u16)(a[i] & 0xffffu));
            A[rows[i]][cols[i] + 1] = cv((fj_u16)(a[i] >> 16));
        }
        Bm[2 * t][g] = cv((fj_u16)(w.bb[l][0] & 0xffffu));
        Bm[2 * t + 1][g] = cv((fj_u16)(w.bb[l][0] >> 16));
        Bm[2 * t + 8][g] = cv((fj_u16)(w.bb[l][1] & 0xffffu));
        Bm[2 * t + 9][g] = cv((fj_u16)(w.bb[l][1] >> 16));
        D[g][2 * t] = w.c[l][0];
        D[g][2 * t + 1] = w.c[l][1];
        D[g + 8][2 * t] = w.c[l][2];
        D[g + 8][2 * t + 1] = w.c[l][3];
    }
    for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 8; ++j) {
            double s = D[i][j];
            for (int k = 0; k < 16; ++k) s += A[i][k] * Bm[k][j];
            D[i][j] = s;
        }
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        float* d = static_cast<float*>(w.out[l]);
        d[0] = (float)D[g][2 * t];
        d[1] = (float)D[g][2 * t + 1];
        d[2] = (float)D[g + 8][2 * t];
        d[3] = (float)D[g + 8][2 * t + 1];
    }
}

// ---------------------------------------------------------------------------------------------
// Fibers and blocks.
void thread_exit(Fiber* f) {
    Block& B = *f->blk;
    WarpSlot& w = B.w[f->warp];
    const unsigned bit = 1u << f->lane;
    set_state(B, f->linear, EXITED);
    f->copies.clear();  // cp.async never retired: the destination keeps its poison
    w.exited |= bit;
    B.live--;
    if (w.arrived && (w.mask & bit) && !(w.arrived & bit))
        FJ_FAIL(f, f, std::string("this thread exited while lanes ") + lane_list(w.arrived) + " of its warp wait for it at " +
                          coll_name(w.kind) + " " + site(w.file, w.line) + " (a collective that can never complete)");
    if (B.bar_count > 0 && B.bar_count == B.live) release_barrier(B, f);
    ctx_switch(f->ctx, B.sched);
    __builtin_trap();
}

void fiber_main(Fiber* f) {
    const Launch& L = *f->blk->L;
    L.k->inv(L.k->fn, L.params);
    thread_exit(f);
}

unsigned long long splitmix(unsigned long long& s) {
    unsigned long long z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

std::string describe_deadlock(Block& B) {
    std::string s = "deadlock: " + std::to_string(B.live) + " live threads, none can proceed.";
    // Threads at barriers, grouped by site.
    std::vector<std::pair<std::string, unsigned>> bars;
    for (unsigned i = 0; i < B.n; ++i) {
        const Fiber& f = B.f[i];
        if (f.st != AT_BARRIER) continue;
        std::string st = site(f.site_file, f.site_line);
        bool found = false;
        for (auto& p : bars)
            if (p.first == st) { p.second++; found = true; }
        if (!found) bars.push_back({st, 1});
    }
    for (auto& p : bars) s += " " + std::to_string(p.second) + " at __syncthreads " + p.first + ";";
    for (unsigned wi = 0; wi < B.nwarps; ++wi) {
        const WarpSlot& w = B.w[wi];
        if (!w.arrived) continue;
        s += " warp " + std::to_string(wi) + ": lanes " + lane_list(w.arrived) + " wait at " + coll_name(w.kind) + " " +
             site(w.file, w.line) + " for lanes " + lane_list(w.mask & ~w.arrived);
        unsigned at_bar = 0;
        for (int l = 0; l < 32; ++l)
            if ((w.mask & ~w.arrived) >> l & 1 && B.f[wi * 32 + l].st == AT_BARRIER) at_bar |= 1u << l;
        if (at_bar) s += " (lanes " + lane_list(at_bar) + " of them wait at __syncthreads)";
        s += ";";
    }
    s += fj_sm90::describe();
    return s;
}

// Runs one block to completion on this OS thread; false with B.err on error.
bool run_block(Worker& W, Launch& L, Block& B) {
    const unsigned n = L.block.x * L.block.y * L.block.z;
    const unsigned nwarps = (n + 31) / 32;
    // Fibers and their stacks (allocated once per OS thread, reused).
    if (W.fibers.size() < n) W.fibers.resize(n);
    if (W.warps.size() < nwarps) W.warps.resize(nwarps);
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = W.fibers[i];
        const size_t want = kStackBytes + kPage;
        if (!f.stack_map || f.stack_map_len != want) {
            if (f.stack_map) munmap(f.stack_map, f.stack_map_len);
            void* p = mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED) {
                f.stack_map = nullptr;
                B.err = "kernel " + L.k->name + ": cannot map a fiber stack: " + strerror(errno);
                return false;
            }
            mprotect(p, kPage, PROT_NONE);  // guard against stack overflow
            f.stack_map = static_cast<unsigned char*>(p);
            f.stack_map_len = want;
            f.copies.reserve(64);
        }
    }
    // The dynamic shared window: its end abuts a PROT_NONE page.
    const size_t sm = round_up(L.dyn, 128);
    const size_t want_map = round_up(sm, kPage) + kPage;
    if (!W.smem_map || W.smem_map_len < want_map) {
        if (W.smem_map) munmap(W.smem_map, W.smem_map_len);
        void* p = mmap(nullptr, want_map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            W.smem_map = nullptr;
            B.err = "kernel " + L.k->name + ": cannot map shared memory: " + strerror(errno);
            return false;
        }
        W.smem_map = static_cast<unsigned char*>(p);
        W.smem_map_len = want_map;
        mprotect(W.smem_map + want_map - kPage, kPage, PROT_NONE);
    }
    B.L = &L;
    B.n = n;
    B.nwarps = nwarps;
    B.live = n;
    B.bar_count = 0;
    B.f = W.fibers.data();
    B.w = W.warps.data();
    B.smem = W.smem_map + W.smem_map_len - kPage - sm;
    B.smem_bytes = L.dyn;
    B.failed = false;
    B.err.clear();
    unsigned long long linear_bid =
        B.bid.x + (unsigned long long)L.grid.x * (B.bid.y + (unsigned long long)L.grid.y * B.bid.z);
    B.rng = L.seed ^ (linear_bid * 0xd1342543de82ef95ull);
    std::memset(B.smem, 0xff, sm);
    for (unsigned wi = 0; wi < nwarps; ++wi) {
        WarpSlot& w = B.w[wi];
        w.kind = C_NONE;
        w.mask = w.arrived = w.exited = 0;
        const unsigned lanes = (wi + 1) * 32 <= n ? 32 : n - wi * 32;
        w.present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    }
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = B.f[i];
        f.blk = &B;
        f.linear = i;
        f.warp = i / 32;
        f.lane = i % 32;
        f.st = RUNNABLE;
        f.site_file = nullptr;
        f.site_line = 0;
        f.commits = 0;
        f.copies.clear();
        f.b.tid = uint3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
        f.b.bid = B.bid;
        f.b.bdim = L.block;
        f.b.gdim = L.grid;
        // Stack tops staggered by a cache colour: 128 fibers whose stacks all began at the same offset
        // in a page would contend for the same L1 sets at every switch.
        const size_t colour = (size_t)((i * 5u) % 64u) * 64u;
        ctx_init(f.ctx, f.stack_map + kPage, f.stack_map_len - kPage - colour, &f);
    }
    for (unsigned k = 0; k < 16; ++k) {
        const unsigned lo = k * 64;
        B.runnable[k] = lo >= n ? 0ull : (n - lo >= 64 ? ~0ull : ((1ull << (n - lo)) - 1));
    }
    Fiber** cur_slot = &tls_fiber;
    fj_sm90::block_begin();
    tls_block = &B;
    while (B.live > 0 && !B.failed) {
        // The next thread: the lowest runnable index (seed 0), or a runnable one drawn from the seed.
        int next = -1;
        if (L.seed == 0) {
            for (unsigned k = 0; k < 16; ++k)
                if (B.runnable[k]) {
                    next = (int)(k * 64 + (unsigned)__builtin_ctzll(B.runnable[k]));
                    break;
                }
        } else {
            unsigned total = 0;
            for (unsigned k = 0; k < 16; ++k) total += (unsigned)__builtin_popcountll(B.runnable[k]);
            if (total) {
                unsigned r = (unsigned)(splitmix(B.rng) % total);
                for (unsigned k = 0; k < 16 && next < 0; ++k) {
                    unsigned long long m = B.runnable[k];
                    const unsigned c = (unsigned)__builtin_popcountll(m);
                    if (r >= c) {
                        r -= c;
                        continue;
                    }
                    while (r--) m &= m - 1;  // drop the lowest r set bits
                    next = (int)(k * 64 + (unsigned)__builtin_ctzll(m));
                }
            }
        }
        if (next < 0) {
            B.failed = true;
            B.err = "kernel " + L.k->name + " block " + fmt3(B.bid) + ": " + describe_deadlock(B);
            break;
        }
        Fiber& f = B.f[next];
        *cur_slot = &f;
        ctx_switch(B.sched, f.ctx);
        *cur_slot = nullptr;
    }
    const std::string sm90_err = fj_sm90::block_end();  // leftover Hopper PTX state is an error
    if (!B.failed && !sm90_err.empty()) {
        B.failed = true;
        B.err = "kernel " + L.k->name + " block " + fmt3(B.bid) + ": " + sm90_err;
    }
    tls_block = nullptr;
    return !B.failed;
}

// ---------------------------------------------------------------------------------------------
// SIGSEGV / SIGBUS reporter: names the kernel, block and thread of the fault, then hands the signal
// to the previous disposition (async-signal-safe: write(2) of a hand-formatted line).
struct sigaction g_old_segv, g_old_bus;
std::once_flag g_sig_once;

struct Buf {
    char s[512];
    size_t n = 0;
    void str(const char* t) {
        while (*t && n < sizeof s - 1) s[n++] = *t++;
    }
    void num(unsigned long long v, int base = 10) {
        char tmp[24];
        int k = 0;
        do {
            tmp[k++] = "0123456789abcdef"[v % base];
            v /= base;
        } while (v && k < 24);
        if (base == 16) str("0x");
        while (k && n < sizeof s - 1) s[n++] = tmp[--k];
    }
    void u3(const uint3& v) {
        str("(");
        num(v.x);
        str(",");
        num(v.y);
        str(",");
        num(v.z);
        str(")");
    }
};

void on_fault(int sig, siginfo_t* info, void* uctx) {
    Fiber* f = tls_fiber;
    Block* B = tls_block;
    if (B && B->L) {
        Buf b;
        b.str("fj_emu: ");
        b.str(sig == SIGSEGV ? "SIGSEGV" : "SIGBUS");
        b.str(" at address ");
        b.num((unsigned long long)(uintptr_t)info->si_addr, 16);
        b.str(" in kernel ");
        b.str(B->L->k->name.c_str());
        b.str(" block ");
        b.u3(B->bid);
        if (f) {
            b.str(" thread ");
            b.u3(f->b.tid);
            const uintptr_t a = (uintptr_t)info->si_addr, lo = (uintptr_t)f->stack_map;
            if (a >= lo && a < lo + kPage) b.str(" (overflow of the emulated thread's stack: FJ_EMU_STACK_KB raises it)");
#ifdef SI_KERNEL
            if (sig == SIGSEGV && info->si_code == SI_KERNEL)
                b.str(" (a general-protection fault: typically a misaligned 16-byte vector access, the GPU's "
                      "misaligned-address error, or a non-canonical pointer)");
#endif
        } else {
            b.str(" (in the emulator's scheduler)");
        }
        b.str("\n");
        ssize_t r = write(2, b.s, b.n);
        (void)r;
    }
    // Hand over to the previous disposition: re-executing the faulting access raises it again.
    struct sigaction* old = sig == SIGSEGV ? &g_old_segv : &g_old_bus;
    sigaction(sig, old, nullptr);
    if (info->si_code <= 0) raise(sig);  // sent by kill(), not a fault
    (void)uctx;
}
void install_fault_reporter() {
    std::call_once(g_sig_once, [] {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &g_old_segv);
        sigaction(SIGBUS, &sa, &g_old_bus);
    });
}
// An alternate signal stack for OS threads that have none (the fault may be a fiber stack overflow).
struct AltStack {
    void* mem = nullptr;
    AltStack() {
        stack_t cur;
        if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE)) return;
        const size_t sz = 64 * 1024;
        mem = malloc(sz);
        if (!mem) return;
        stack_t ss;
        ss.ss_sp = mem;
        ss.ss_size = sz;
        ss.ss_flags = 0;
        if (sigaltstack(&ss, nullptr) != 0) {
            free(mem);
            mem = nullptr;
        }
    }
    ~AltStack() {
        if (!mem) return;
        stack_t ss;
        std::memset(&ss, 0, sizeof ss);
        ss.ss_flags = SS_DISABLE;
        sigaltstack(&ss, nullptr);
        free(mem);
    }
};
thread_local AltStack* tls_alt = nullptr;
struct AltHolder {
    AltStack* p = nullptr;
    ~AltHolder() { delete p; }
};
thread_local AltHolder tls_alt_holder;
void ensure_altstack() {
    if (!tls_alt) {
        tls_alt = new AltStack();
        tls_alt_holder.p = tls_alt;
    }
}

void worker_main(Launch* L) {
    ensure_altstack();
    Worker& W = tls_worker;
    Block B;
    while (!L->failed.load(std::memory_order_relaxed)) {
        const unsigned long long b = L->next.fetch_add(1);
        if (b >= L->nblocks) break;
        B.bid = uint3{(unsigned)(b % L->grid.x), (unsigned)((b / L->grid.x) % L->grid.y),
                      (unsigned)(b / ((unsigned long long)L->grid.x * L->grid.y))};
        if (!run_block(W, *L, B)) {
            std::lock_guard<std::mutex> g(L->mu);
            if (!L->failed.load()) {
                L->err = B.err;
                L->failed.store(true);
            }
            break;
        }
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The entry points fj_emu.h declares.
const Builtins* builtins() { return &current("threadIdx/blockIdx/blockDim/gridDim")->b; }

unsigned char* dyn_smem() { return current("dynamic shared memory")->blk->smem; }

void syncthreads(const char* file, int line) {
    Fiber* f = current("__syncthreads");
    Block& B = *f->blk;
    set_state(B, f->linear, AT_BARRIER);
    f->site_file = file;
    f->site_line = line;
    B.bar_count++;
    if (B.bar_count == B.live) release_barrier(B, f);
    yield(f);
}

void syncwarp(unsigned mask, const char* file, int line) {
    Fiber* f = current("__syncwarp");
    WarpSlot& w = arrive(f, C_SYNCWARP, mask, file, line);
    finish(f, w);
}

unsigned shfl32(unsigned mask, unsigned v, int arg, int width, bool xor_mode, const char* file, int line) {
    Fiber* f = current("__shfl_sync");
    if (width < 1 || width > 32 || (width & (width - 1)))
        FJ_FAIL(f, f, "shuffle width " + std::to_string(width) + " is not a power of two in [1, 32]");
    WarpSlot& w = arrive(f, xor_mode ? C_SHFL_XOR : C_SHFL, mask, file, line);
    unsigned result = 0;
    w.v[f->lane] = v;
    w.arg[f->lane] = arg;
    w.width[f->lane] = width;
    w.out[f->lane] = &result;
    finish(f, w);
    return result;
}

fj_u32 smem_addr(const void* p) {
    Fiber* f = current("fj_smem_addr");
    return (fj_u32)((uintptr_t)p - (uintptr_t)f->blk->smem);
}

void cp_async16(fj_u32 dst, const void* src, int src_bytes, const char* file, int line) {
    Fiber* f = current("cp.async");
    Block& B = *f->blk;
    if ((dst & 15u) != 0 || (unsigned long long)dst + 16 > B.smem_bytes) {
        char buf[160];
        snprintf(buf, sizeof buf, "shared offset %u (%s; the dynamic shared window is %u bytes)", dst,
                 (dst & 15u) ? "not 16-byte aligned" : "out of range", B.smem_bytes);
        FJ_FAIL(f, f, "cp.async at " + site(file, line) + ": destination " + buf);
    }
    if (src_bytes < 0 || src_bytes > 16)
        FJ_FAIL(f, f, "cp.async at " + site(file, line) + ": src-size " + std::to_string(src_bytes) + " not in [0, 16]");
    if (((uintptr_t)src & 15u) != 0)
        FJ_FAIL(f, f, "cp.async at " + site(file, line) + ": source address not 16-byte aligned");
    PendingCopy c;
    c.dst = dst;
    c.group = f->commits;
    if (src_bytes) std::memcpy(c.data, src, (size_t)src_bytes);  // the source is read at issue
    std::memset(c.data + src_bytes, 0, 16 - (size_t)src_bytes);
    std::memset(B.smem + dst, 0xff, 16);  // poison until the group is retired
    f->copies.push_back(c);
}

void cp_async_commit() { current("cp.async.commit_group")->commits++; }

void cp_async_wait(int n) {
    Fiber* f = current("cp.async.wait_group");
    const int limit = f->commits - n;  // groups < limit are retired
    size_t k = 0;
    for (size_t i = 0; i < f->copies.size(); ++i) {
        const PendingCopy& c = f->copies[i];
        if (c.group < limit) std::memcpy(f->blk->smem + c.dst, c.data, 16);
        else f->copies[k++] = c;
    }
    f->copies.resize(k);
}

void ldmatrix_x4(fj_u32 (&r)[4], fj_u32 addr, bool trans, const char* file, int line) {
    Fiber* f = current("ldmatrix");
    WarpSlot& w = arrive(f, trans ? C_LDM_T : C_LDM, 0xffffffffu, file, line);
    w.addr[f->lane] = addr;
    w.out[f->lane] = r;
    finish(f, w);
}

void mma16816(float (&d)[4], const fj_u32 (&a)[4], fj_u32 b0, fj_u32 b1, bool f16, const char* file, int line) {
    Fiber* f = current("mma.sync");
    WarpSlot& w = arrive(f, f16 ? C_MMA_F16 : C_MMA_BF16, 0xffffffffu, file, line);
    const unsigned l = f->lane;
    for (int i = 0; i < 4; ++i) {
        w.a[l][i] = a[i];
        w.c[l][i] = d[i];
    }
    w.bb[l][0] = b0;
    w.bb[l][1] = b1;
    w.out[l] = d;
    finish(f, w);
}

float atomic_add_f32(float* p, float v) {
    Fiber* f = current("atomicAdd");
    if (((uintptr_t)p & 3u) != 0) FJ_FAIL(f, f, "atomicAdd(float*) on an address that is not 4-byte aligned");
    unsigned* u = reinterpret_cast<unsigned*>(p);
    unsigned old = __atomic_load_n(u, __ATOMIC_RELAXED);
    for (;;) {
        float o;
        std::memcpy(&o, &old, 4);
        const float nv = o + v;
        unsigned nu;
        std::memcpy(&nu, &nv, 4);
        if (__atomic_compare_exchange_n(u, &old, nu, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) return o;
    }
}

void trap(const char* what, const char* file, int line) {
    Fiber* f = current("__trap");
    FJ_FAIL(f, f, std::string(what) + " at " + site(file, line));
}

void register_kernel(const char* name, void* fn, Invoker inv, int nparams, const char* sig) {
    Registry& r = registry();
    if (r.index.count(name)) {
        r.duplicates.push_back(name);
        return;
    }
    r.index.emplace(name, r.kernels.size());
    r.kernels.push_back(Kernel{name, fn, inv, nparams, sig});
}

}  // namespace fj_emu

// ---------------------------------------------------------------------------------------------
// C ABI.
using namespace fj_emu;

FJ_EMU_C int fj_emu_launch(const char* kernel, const unsigned grid[3], const unsigned block[3],
                           unsigned dynamic_shared_bytes, void** params, unsigned long long seed, int workers) {
    tls_error.clear();
    try {
        if (!kernel || !grid || !block) {
            tls_error = "fj_emu_launch: null kernel name, grid or block";
            return 1;
        }
        Registry& reg = registry();
        auto it = reg.index.find(kernel);
        if (it == reg.index.end()) {
            tls_error = std::string("fj_emu_launch: no registered kernel `") + kernel + "`";
            return 1;
        }
        const Kernel& k = reg.kernels[it->second];
        std::string pre = std::string("kernel ") + kernel + ": ";
        if (grid[0] < 1 || grid[0] > 2147483647u || grid[1] < 1 || grid[1] > 65535 || grid[2] < 1 || grid[2] > 65535) {
            tls_error = pre + "grid (" + std::to_string(grid[0]) + "," + std::to_string(grid[1]) + "," +
                        std::to_string(grid[2]) + ") outside CUDA's limits (x < 2^31, y, z <= 65535, all >= 1)";
            return 1;
        }
        const unsigned long long nthr = (unsigned long long)block[0] * block[1] * block[2];
        if (block[0] < 1 || block[1] < 1 || block[2] < 1 || block[0] > 1024 || block[1] > 1024 || block[2] > 64 ||
            nthr > 1024) {
            tls_error = pre + "block (" + std::to_string(block[0]) + "," + std::to_string(block[1]) + "," +
                        std::to_string(block[2]) + ") outside CUDA's limits (x, y <= 1024, z <= 64, product <= 1024)";
            return 1;
        }
        if (dynamic_shared_bytes > kMaxDynSmem) {
            tls_error = pre + std::to_string(dynamic_shared_bytes) +
                        " bytes of dynamic shared memory exceed the 227 KiB any GPU allows";
            return 1;
        }
        if (k.nparams > 0 && !params) {
            tls_error = pre + "null params for a kernel of " + std::to_string(k.nparams) + " parameters";
            return 1;
        }
        if (workers < 1) {
            tls_error = pre + "workers must be >= 1";
            return 1;
        }
        install_fault_reporter();
        Launch L;
        L.k = &k;
        L.grid = uint3{grid[0], grid[1], grid[2]};
        L.block = uint3{block[0], block[1], block[2]};
        L.dyn = dynamic_shared_bytes;
        L.params = params;
        L.seed = seed;
        L.nblocks = (unsigned long long)grid[0] * grid[1] * grid[2];
        const unsigned long long nw = std::min<unsigned long long>((unsigned long long)workers, L.nblocks);
        std::vector<std::thread> threads;
        for (unsigned long long i = 1; i < nw; ++i) {
            try {
                threads.emplace_back(worker_main, &L);
            } catch (...) {
                break;  // fewer workers
            }
        }
        worker_main(&L);
        for (auto& t : threads) t.join();
        if (L.failed.load()) {
            tls_error = L.err;
            return 1;
        }
        return 0;
    } catch (const std::exception& e) {
        tls_error = std::string("fj_emu_launch: ") + e.what();
        return 1;
    } catch (...) {
        tls_error = "fj_emu_launch: unknown exception";
        return 1;
    }
}

FJ_EMU_C const char* fj_emu_error(void) { return tls_error.c_str(); }

FJ_EMU_C int fj_emu_kernel_count(void) { return (int)registry().kernels.size(); }

FJ_EMU_C const char* fj_emu_kernel_name(int i) {
    const Registry& r = registry();
    return (i >= 0 && (size_t)i < r.kernels.size()) ? r.kernels[i].name.c_str() : nullptr;
}

// Extra (not needed by the fixed ABI): the parameter classes of kernel i, one character each: 'p'
// pointer, 'i' int, 'u' unsigned, 'l' long long, 'f' float.
FJ_EMU_C const char* fj_emu_kernel_signature(int i) {
    const Registry& r = registry();
    return (i >= 0 && (size_t)i < r.kernels.size()) ? r.kernels[i].sig.c_str() : nullptr;
}

// Hopper PTX (cuda/emu/sm90.h): its implementation, on this file's fibers.
#define FJ_SM90_RUNTIME
#include "sm90.h"
