// attention_jvp_sm90.cu: the attention JVP forward for Hopper (sm_90a): warpgroup MMA (wgmma), tiles
// brought in by the tensor-memory accelerator (TMA), a producer warp and two consumer warpgroups.
// Same outputs and math as attention_jvp.cu (DESIGN.md section 3); only compiled for sm_90a.
//
// WHAT IT COMPUTES (per batch*head, per query row i; non-causal, Nq may differ from Nk; c = scale):
//   s_j = c q_i.k_j, sdot_j = c (qdot_i.k_j + q_i.kdot_j), p_j = exp(s_j - m) with running max m,
//   l = sum p, O = sum p v, r = sum p sdot, T = sum p (vdot + sdot v);
//   o = O/l, mu = r/l, odot = T/l - mu o, lse = m + ln l, tlse = mu.
// Variants (the same as the sm_80 file): attention_jvp_sm90_* (tangents on q, k, v),
// attention_jvp_nokv_sm90_* (k, v constant: sdot = c qdot.k, T = sum p sdot v), attention_fwd_sm90_*
// (primal o and lse). bf16 and f16 storage, head dims 64, 72, 96 and 128, dv == d.
//
// FOLDED PRODUCTS. Per key tile the scores are two wgmma chains: S = Q K^T over d, and
// Sdot = [Qdot Q] [K Kdot]^T over 2d (one accumulator: Qdot K^T then Q Kdot^T, k-chunk by k-chunk).
// The value side is O += P V and T += [P  P.Sdot] [Vdot; V] over twice the tile width (again one
// accumulator chain: P Vdot then (P.Sdot) V). P and P.Sdot are rounded to the 16-bit storage type and
// fed to wgmma from registers (the f32 accumulator layout of a score tile is, two 8-column blocks at a
// time, the register layout of a wgmma A operand), V and Vdot are read from shared memory as the
// transposed ("MN-major") B operand. Six products per tile as on sm_80, four for nokv, two for fwd.
//
// CENTRED T (full JVP and nokv), as in attention_jvp.cuh: P.Sdot rounded to 16 bits would otherwise cancel
// against mu o in odot = T/l - mu o, badly when one key dominates a row (Nk = 1: bf16 tangent error
// 5.0e-3 under the CPU emulator). T is kept centred on the running mu: the softmax of tile j reduces
// the row sums of p and p.sdot over the quad, moves T (tiles < j, complete after the turn's
// wgmma.wait_group) from the old centre with T = alpha T + (mu_old - mu_new) alpha O, and feeds
// P.(Sdot - mu_new) to the next turn; then odot = T/l. Unlike sm_80 (register budget), nokv is centred
// too: it fits the consumers' 240 registers without spills.
//
// SOFTMAX ARITHMETIC (what a warpgroup must finish before its next turn; at d64 as long as the batch it
// overlaps, cuda/README.md): one FFMA and one MUFU.EX2 per score (fj_exp2 is .ftz); the tangent scores
// stay unscaled (r in raw units, the scale applied once per row to mu and inside the centring FFMA);
// O and T's factor alpha are applied only when a row of the warp has a new running max (warp-uniform
// vote; alpha is exactly 1 otherwise), while T's move to the new centre happens every tile.
//
// F16 VALUE PRODUCTS (opt-in, bf16 storage, full JVP and nokv: attention_jvp{,_nokv}_sm90_bf16_vf16_d{D}):
// the value products in f16 on f16 copies of V and Vdot scaled by 2^-k, O and T stored times 2^k
// (common.cuh, F16 VALUE PRODUCTS).
//
// BLOCK: 384 threads = 3 warpgroups; 128 query rows per block. Warpgroup 0 is the producer (one thread
// issues every TMA copy; its registers are cut to 24 with setmaxnreg), warpgroups 1 and 2 are consumers
// (registers raised to 240), each owning 64 query rows (the M of wgmma.m64nNk16).
//
// SHARED MEMORY (all tiles stored as slabs [rows][SCOL] of SWZ-byte rows in the TMA/wgmma SWZ-byte
// swizzle, SCOL = SWZ/2 columns; every slab starts on a multiple of the swizzle's 8-row repeat):
//   SWZ = 128 (64-column slabs) at d 64 and 128, 64 (32 columns) at d 96, 32 (16 columns) at d 72,
//   whose fifth slab holds columns 64..79: TMA fills 72..79 with zeros (past the map's d), so the
//   score products run over DP = 80 columns and the value products have N = 80, of which the store
//   writes 72. (The swizzle must divide the head dim: wgmma's MN-major operand spans whole swizzle
//   atoms, so V at d 96 cannot use the 128-byte swizzle.)
//   Q (and Qdot): [128 rows] x d, loaded once.
//   a ring of STAGES K stages (K and Kdot of BC keys) and a ring of STAGES V stages (V and Vdot), each
//   with a "full" mbarrier (TMA completes bytes on it) and an "empty" mbarrier (8 consumer warps arrive
//   when the wgmmas reading the stage are done). K and V have separate rings because a K tile is free
//   as soon as its scores are done, a V tile only after the next turn.
//   BC = 64 keys, 48 at d = 128 with a tangent (registers: O, T, S, Sdot and the previous tile's P
//   fragments within 240), 96 at d = 64 and 80 at d = 72 with a tangent, 128 for the forward (the
//   softmax's fixed cost per tile spread over more keys, and fewer shared-memory bytes per FLOP in the
//   score products; 64 with FLASHJVP_SM90_KEYS=64); STAGES = 3 for the full JVP when a stage holds 24 KiB
//   or more (d = 64: 177 KiB, 72: 191 KiB, 96: 193 KiB, 128: 214 KiB) and for the forward at d = 128
//   (32 KiB a stage: 225 KiB), 4 otherwise.
//
// SCHEDULE (per consumer warpgroup, key tile j; FA3's inter-warpgroup ping-pong): a "turn" issues,
// as one wgmma batch, the score products of tile j and the value products of tile j-1 (whose P and
// P.Sdot the warpgroup holds in registers), then hands the tensor cores to the other warpgroup (named
// barriers 1 and 2, bar.sync/bar.arrive over 256 threads) and waits for its batch; its softmax of
// tile j then overlaps the other warpgroup's batch. One more turn after the last tile issues the last
// value products. Online softmax as on sm_80's tensor-core kernels: p = 2^(s c log2e - m c log2e), one
// FFMA and an ex2 per score, the running max m in raw score units, lse = m c + ln l.
//
// LAYOUT: any strided layout of q, k, v (each viewed as [B, H, N, d] with the head dim contiguous, e.g.
// read in place from a packed qkv projection [B, N, 3, H, d]); the tensor maps carry the strides. o and
// to are written with o's strides (e.g. token-major [B, N, H, d]); lse and tlse are contiguous.
//
// TAILS: the tensor maps are 4-D (d, N, H, B), so TMA zero-fills rows past Nq or Nk of a head (and
// still counts the full box in the transaction bytes). Scores of keys >= Nk are set to -inf and their
// sdot to 0; query rows >= Nq are computed on zeros and never stored.
//
// LAUNCH: grid (ceil(Nq/128), B*H, 1), block (384,1,1), dynamic shared memory
//   1024 (alignment slack) + NQ*128*DP*2 + 2*STAGES*NKT*BC*DP*2 + 8*(1 + 4*STAGES) bytes
//   (NQ = 2 with a tangent else 1; NKT = 2 for the full JVP else 1): README.md lists them.
// PARAMETERS (tensor maps encoded on the host with cuTensorMapEncodeTiled: 4-D {d, N, H, B} over the
// operand viewed as [B, H, N, d] with element strides (sb, sh, sn), byte strides {sn, sh, sb} * 2, box
// {SCOL, 128 (q, tq) or BC (k, v, tk, tv), 1, 1}, SWZ-byte swizzle, zero fill; passed by value; a
// tangent's map has its primal's strides):
//   attention_jvp_sm90_{dt}_d{D}      (map q, map k, map v, map tq, map tk, map tv, o, to, lse, tlse, Nq, Nk, scale,
//                                      H, o_sb, o_sh, o_sn)
//   attention_jvp_nokv_sm90_{dt}_d{D} (map q, map k, map v, map tq, o, to, lse, tlse, Nq, Nk, scale, H, o_sb, o_sh,
//                                      o_sn)
//   attention_fwd_sm90_{dt}_d{D}      (map q, map k, map v, o, lse, Nq, Nk, scale, H, o_sb, o_sh, o_sn)
//   o/to [B,H,Nq,d] storage dtype at element offset b*o_sb + h*o_sh + row*o_sn (long long strides, multiples
//   of 8), lse/tlse contiguous [B,H,Nq] f32; blockIdx.y = b*H + h (int H); maps' addresses and o, to 16-byte
//   aligned.
//
// STATUS: compiled for sm_90a with NVRTC 13.0 (no spills, see README.md); its indexing (descriptors,
// swizzle, fragments) replayed in f64 by attention_sm90_emulate.py; the kernel itself runs on the CPU
// emulator (cuda/emu/sm90.h: mbarriers, TMA, named barriers, wgmma, with ordering checks), where
// tests/gpu_attention_sm90.rs passes (FLASHJVP_EMULATE=sm_90a). Ran on an NVIDIA H200 (2026-11-27,
// scripts/gpu/check.sh, docs/gpu-runs.md): the layout probe matched at every swizzle (0 differing elements
// in the TMA image, S and O rel ~1e-7), tests/gpu_attention_sm90.rs passes (largest bf16 tangent error
// 2.39e-3, bound 3e-3) and so do the other GPU tests, and compute-sanitizer memcheck/racecheck are clean.
// The f16 value products (and their copy kernels) were written after that run: emulator only so far
// (largest bf16 tangent error 1.69e-3 there, against 2.31e-3 for the bf16 value products). So were the
// changes of SOFTMAX ARITHMETIC (same emulator errors as before them).
#include "common.cuh"
#include "hopper.cuh"

// The long key tiles (Cfg::BC: 96 and 80 keys at d = 64 and 72 with a tangent, 128 for the forward at
// every head dim) are the default; with FLASHJVP_SM90_KEYS=64 on the host (FJ_SM90_KEYS64, a separate cache
// entry, like the split schedule) all take the 64-key tile the H200 timed, to time the two side by side.
#ifndef FJ_SM90_KEYS64
#define FJ_SM90_KEYS64 0
#endif
static_assert(FJ_SM90_KEYS64 == 0 || FJ_SM90_KEYS64 == 1, "FJ_SM90_KEYS64: 0 or 1");

namespace fj_h {

enum { FULL = 0, NOKV = 1, FWD = 2 };

template <int D, int MODE> struct Cfg {
    enum {
        TAN = MODE != FWD,
        KVT = MODE == FULL,
        NQ = TAN ? 2 : 1,               // Q, Qdot
        NKT = KVT ? 2 : 1,              // tensors per K stage (K, Kdot) and per V stage (V, Vdot)
        // Swizzle (bytes per slab row) and slab width: the widest whose slab divides the head dim
        // (128 B = 64 columns at d 64/128, 64 B = 32 at d 96); d 72 takes 32-byte slabs of 16
        // columns, the last half filled with zeros by TMA (columns past d are out of bounds).
        SWZ = D % 64 == 0 ? 128 : D % 32 == 0 ? 64 : 32,
        SCOL = SWZ / 2,
        SLABS = (D + SCOL - 1) / SCOL,
        DP = SLABS * SCOL,              // the head dim the products see (80 at d 72)
        CPS = SCOL / 16,                // 16-column k-chunks per slab
        // Keys per tile: 48 at d = 128 with a tangent (O, T, S, Sdot and the P fragments of the
        // previous tile must fit 240 registers); 96 at d = 64 and 80 at d = 72 with a tangent, and 128
        // for the forward (at d 64 and 72 the softmax is nearly as long as the products it overlaps, or
        // longer: a longer tile spreads the per-tile reductions, barriers and descriptors over more keys;
        // and m64n128 score products read 96 bytes of shared memory per tensor cycle where m64n64 read
        // 128, all there is, with the value products' and TMA's traffic on top; d 72 at 96 and d 96 at
        // 80 spilled with a tangent), 64 with FJ_SM90_KEYS64; else 64.
        BC = (D == 128 && TAN)                      ? 48
             : (D == 64 && TAN && !FJ_SM90_KEYS64)  ? 96
             : (D == 72 && TAN && !FJ_SM90_KEYS64)  ? 80
             : (!TAN && !FJ_SM90_KEYS64)             ? 128
                                                    : 64,
        SLAB_Q = BR * SWZ,              // bytes of one slab of the Q tile
        SLAB_K = BC * SWZ,              // bytes of one slab of a K/V tile
        // 3 when a stage holds 24 KiB or more with a tangent, or more than 24 KiB without (the forward
        // at d 128: 4 stages of 128 keys would need 289 KiB)
        STAGES = (MODE == FULL && DP * BC >= 96 * 64) || (MODE == FWD && DP * BC > 96 * 128) ? 3 : 4,
        Q_BYTES = NQ * SLABS * SLAB_Q,
        KST_BYTES = NKT * SLABS * SLAB_K,  // one K stage (same for a V stage)
        BAR_OFF = Q_BYTES + 2 * STAGES * KST_BYTES,
        SMEM = 1024 + BAR_OFF + 8 * (1 + 4 * STAGES),
    };
    // Whole 16-key chunks, and every slab on a multiple of its swizzle's 8-row repeat (the descriptors'
    // base offset is 0): 80 keys at d 72 are 2560 bytes, ten 256-byte repeats of the 32-byte swizzle.
    static_assert(BC % 16 == 0 && SLAB_K % (8 * SWZ) == 0 && SLAB_Q % (8 * SWZ) == 0, "key tile");
};

// F16_VALUES (bf16 storage only): V and Vdot are the f16 copies made by attention_values_to_f16_bf16
// (scaled by 2^-k, k from the max bits at vamax), and the value products run in f16 (see F16 VALUE
// PRODUCTS above).
template <class ST, int D, int MODE, bool F16_VALUES = false>
__device__ __forceinline__ void attn_sm90(const FjTensorMap* mq, const FjTensorMap* mk, const FjTensorMap* mv,
                                          const FjTensorMap* mtq, const FjTensorMap* mtk, const FjTensorMap* mtv,
                                          fj_u16* __restrict__ o, fj_u16* __restrict__ to, float* __restrict__ lse,
                                          float* __restrict__ tlse, int Nq, int Nk, float scale, int H,
                                          fj_i64 o_sb, fj_i64 o_sh, fj_i64 o_sn, const fj_u32* vamax = nullptr) {
    typedef Cfg<D, MODE> C;
    constexpr bool F16 = ST::IS_F16;
    static_assert(!F16_VALUES || (!F16 && MODE != FWD), "f16 value products: bf16 storage, with a tangent");
    constexpr bool VF16 = F16 || F16_VALUES;  // the type of the value products (P, P.Sdot, V, Vdot)
    constexpr bool TAN = C::TAN, KVT = C::KVT;
    constexpr int SLABS = C::SLABS, STAGES = C::STAGES;
    constexpr int KST = C::KST_BYTES;
    constexpr int BC = C::BC, SLAB_Q = C::SLAB_Q, SLAB_K = C::SLAB_K;
    constexpr int SWZ = C::SWZ, SCOL = C::SCOL, CPS = C::CPS, DP = C::DP;

    FJ_SM90_SMEM(fj_smem);
    // The swizzles repeat every 8 rows (at most 1024 bytes) and the descriptors assume base offset 0:
    // align.
    const fj_u32 base = (fj_smem_addr(fj_smem) + 1023u) & ~1023u;
    const fj_u32 sQ = base;                         // tensor t (Q, Qdot), slab s: sQ + (t*SLABS + s)*SLAB_Q
    const fj_u32 sK = base + C::Q_BYTES;            // stage st, tensor t (K, Kdot), slab s: sK + st*KST + (t*SLABS + s)*SLAB_K
    const fj_u32 sV = sK + STAGES * KST;            // likewise (V, Vdot)
    const fj_u32 bars = base + C::BAR_OFF;
    const fj_u32 qfull = bars;
    auto kfull = [&](int st) { return bars + 8u * (1 + st); };
    auto kempty = [&](int st) { return bars + 8u * (1 + STAGES + st); };
    auto vfull = [&](int st) { return bars + 8u * (1 + 2 * STAGES + st); };
    auto vempty = [&](int st) { return bars + 8u * (1 + 3 * STAGES + st); };

    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int bh = blockIdx.y;  // b*H + h
    const int q0 = blockIdx.x * BR;
    const int ntiles = (Nk + BC - 1) / BC;

    // The host's figure (attention_sm90.rs: shared_bytes) must cover this layout: a mismatch traps
    // (a launch error) instead of writing past the allocation.
    require_dynamic_smem(C::SMEM);

    if (tid == 0) {
        mbar_init(qfull, 1);
#pragma unroll
        for (int st = 0; st < STAGES; ++st) {
            mbar_init(kfull(st), 1);
            mbar_init(kempty(st), 4 * NCONS);  // one arrival per consumer warp
            mbar_init(vfull(st), 1);
            mbar_init(vempty(st), 4 * NCONS);
        }
        mbar_fence_init();
    }
    __syncthreads();

    if (wg == 0) {
        // ---------------- producer: one thread issues every copy ----------------
        producer_regs();
        if (tid == 0) {
            const int bb = bh / H, hh = bh - bb * H;  // TMA coordinates of this head: (col, row, hh, bb)
            tma_prefetch_map(mq);
            tma_prefetch_map(mk);
            tma_prefetch_map(mv);
            if (TAN) tma_prefetch_map(mtq);
            if (KVT) {
                tma_prefetch_map(mtk);
                tma_prefetch_map(mtv);
            }
            mbar_expect_tx(qfull, C::Q_BYTES);
#pragma unroll
            for (int s = 0; s < SLABS; ++s) {
                tma_load4(sQ + s * SLAB_Q, mq, qfull, SCOL * s, q0, hh, bb);
                if (TAN) tma_load4(sQ + (SLABS + s) * SLAB_Q, mtq, qfull, SCOL * s, q0, hh, bb);
            }
            for (int j = 0; j < ntiles; ++j) {
                const int st = j % STAGES;
                const fj_u32 use = j / STAGES;  // how many times this stage was filled before
                const int k0 = j * BC;
                if (use > 0) mbar_wait(kempty(st), (use - 1) & 1);
                mbar_expect_tx(kfull(st), KST);
                const fj_u32 kd = sK + st * KST;
#pragma unroll
                for (int s = 0; s < SLABS; ++s) {
                    tma_load4(kd + s * SLAB_K, mk, kfull(st), SCOL * s, k0, hh, bb);
                    if (KVT) tma_load4(kd + (SLABS + s) * SLAB_K, mtk, kfull(st), SCOL * s, k0, hh, bb);
                }
                if (use > 0) mbar_wait(vempty(st), (use - 1) & 1);
                mbar_expect_tx(vfull(st), KST);
                const fj_u32 vd = sV + st * KST;
#pragma unroll
                for (int s = 0; s < SLABS; ++s) {
                    tma_load4(vd + s * SLAB_K, mv, vfull(st), SCOL * s, k0, hh, bb);
                    if (KVT) tma_load4(vd + (SLABS + s) * SLAB_K, mtv, vfull(st), SCOL * s, k0, hh, bb);
                }
            }
        }
    } else {
        // ---------------- consumers: 64 query rows per warpgroup ----------------
        consumer_regs();
        const int cw = wg - 1;
        const int warp = (tid >> 5) & 3, lane = tid & 31;
        const int g = lane >> 2, t4 = lane & 3;
        const int my_bar = 1 + cw, other_bar = 2 - cw;
        if (cw == 1) named_arrive(1);  // consumer 0 takes the first turn

        constexpr int NO = DP / 2, NS = BC / 2, KC = DP / 16, KC2 = BC / 16;
        float acc_o[NO], acc_t[TAN ? NO : 1], s[NS], sd[TAN ? NS : 1];
        fj_u32 pa[KC2][4], psa[TAN ? KC2 : 1][4];
#pragma unroll
        for (int i = 0; i < NO; ++i) {
            acc_o[i] = 0.f;
            if (TAN) acc_t[TAN ? i : 0] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < NS; ++i) {
            s[i] = 0.f;
            if (TAN) sd[TAN ? i : 0] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < KC2; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                pa[i][e] = 0u;
                if (TAN) psa[TAN ? i : 0][e] = 0u;
            }
        // Rows g and g+8 of this warp's 16 (accumulator elements with (i >> 1) & 1 = 0 and 1).
        // With a tangent, l_run and r_run are whole-row sums of p and p.sdot, reduced over the quad every
        // tile, and mu_run = r_run / l_run is the centre of T. The primal forward keeps this thread's
        // partial sum of p in l_run and reduces it over the quad at the end.
        float m_run[2] = {-FJ_INF, -FJ_INF}, l_run[2] = {0.f, 0.f}, r_run[2] = {0.f, 0.f};
        float mu_run[2] = {0.f, 0.f};
        const float sl2 = scale * FJ_LOG2E;
        const fj_u32 qa = sQ + cw * 64 * SWZ;  // this warpgroup's 64 rows of every Q slab

        // One turn: the wgmma batch of the score products of tile j (SC) and the value products of
        // tile j-1 (VA), issued while this warpgroup holds the tensor cores. Peeled into three
        // straight-line forms (first, steady, last) so that no wgmma sits on a divergent path.
        auto turn = [&](int j, auto SC, auto VA) {
            constexpr bool scores = decltype(SC)::value, values = decltype(VA)::value;
            const int st = j % STAGES, pst = (j + STAGES - 1) % STAGES;
            if (scores) mbar_wait(kfull(st), (j / STAGES) & 1);
            named_sync(my_bar);
            fence_regs(acc_o);
            if constexpr (TAN) fence_regs(acc_t);
            fence_regs(pa);
            if constexpr (TAN) fence_regs(psa);
            wgmma_fence();
            if constexpr (scores) {
                // Descriptors as a base plus an offset (in 16-byte units) added right at the use: the
                // base is made opaque per turn so that the compiler cannot hoist one 64-bit descriptor
                // per k-chunk out of the loop (that would cost 2 registers each).
                const fj_u64 dq = opaque64(desc_kmajor<SWZ>(qa));
                const fj_u64 dk = opaque64(desc_kmajor<SWZ>(sK + st * KST));
                // Column chunk kc of a K-major tile: slab kc/CPS, 32 bytes per chunk inside the slab.
                auto qo = [&](int t, int kc) { return (fj_u64)(((t * SLABS + kc / CPS) * SLAB_Q + (kc % CPS) * 32) >> 4); };
                auto ko = [&](int t, int kc) { return (fj_u64)(((t * SLABS + kc / CPS) * SLAB_K + (kc % CPS) * 32) >> 4); };
#pragma unroll
                for (int kc = 0; kc < KC; ++kc)  // S = Q K^T
                    wgmma_ss<BC, F16>(s, dq + qo(0, kc), dk + ko(0, kc), kc > 0);
                if constexpr (TAN) {
#pragma unroll
                    for (int kc = 0; kc < KC; ++kc)  // Sdot = Qdot K^T ...
                        wgmma_ss<BC, F16>(sd, dq + qo(1, kc), dk + ko(0, kc), kc > 0);
                }
                if constexpr (KVT) {
#pragma unroll
                    for (int kc = 0; kc < KC; ++kc)  // ... + Q Kdot^T
                        wgmma_ss<BC, F16>(sd, dq + qo(0, kc), dk + ko(1, kc), 1);
                }
            }
            if constexpr (SPLIT_WAIT && scores && values) wgmma_commit();  // the scores: a group of their own
            if constexpr (values) {
                const fj_u64 dv = opaque64(desc_mnmajor<SWZ>(sV + pst * KST, SLAB_K));
                // Key chunk kc2 of an MN-major V tile: 16 rows of SWZ bytes each.
                auto vo = [&](int t, int kc2) { return (fj_u64)((t * SLABS * SLAB_K + kc2 * 16 * SWZ) >> 4); };
#pragma unroll
                for (int kc2 = 0; kc2 < KC2; ++kc2) {  // O += P V ; T += (P.Sdot) V
                    wgmma_rs<DP, VF16>(acc_o, pa[kc2], dv + vo(0, kc2));
                    if constexpr (TAN) wgmma_rs<DP, VF16>(acc_t, psa[kc2], dv + vo(0, kc2));
                }
                if constexpr (KVT) {
#pragma unroll
                    for (int kc2 = 0; kc2 < KC2; ++kc2)  // T += P Vdot
                        wgmma_rs<DP, VF16>(acc_t, pa[kc2], dv + vo(1, kc2));
                }
            }
            wgmma_commit();
            // The other warpgroup's turn (consumer 1 skips its last hand-over: nobody waits for it).
            if (!(cw == 1 && !scores)) named_arrive(other_bar);
            if constexpr (SPLIT_WAIT && scores && values) {
                wgmma_wait1();  // the scores are done; the value products finish in finish_values
                fence_regs(s);
                if constexpr (TAN) fence_regs(sd);
                if (lane == 0) mbar_arrive(kempty(st));  // this warp's reads of the K stage are done
                return;
            }
            wgmma_wait0();
            fence_regs(s);
            if constexpr (TAN) fence_regs(sd);
            fence_regs(acc_o);
            if constexpr (TAN) fence_regs(acc_t);
            fence_regs(pa);
            if constexpr (TAN) fence_regs(psa);
            if (lane == 0) {  // this warp's reads of the stages are done
                if (scores) mbar_arrive(kempty(st));
                if (values) mbar_arrive(vempty(pst));
            }
        };
        // With SPLIT_WAIT, the rest of a steady turn: its value products of tile j-1 (before the softmax of
        // tile j touches O, T or the P fragments they read).
        auto finish_values = [&](int j) {
            wgmma_wait0();
            fence_regs(acc_o);
            if constexpr (TAN) fence_regs(acc_t);
            fence_regs(pa);
            if constexpr (TAN) fence_regs(psa);
            if (lane == 0) mbar_arrive(vempty((j + STAGES - 1) % STAGES));
        };

        // Softmax of tile j (overlaps the other warpgroup's turn), then P and P.Sdot as A fragments.
        // PENDING: this tile's turn also issued value products still in flight (SPLIT_WAIT, steady turns).
        auto softmax = [&](int j, auto PENDING) {
            constexpr bool pending = decltype(PENDING)::value;
            (void)pending;  // read by the split schedule only
            const int kv0 = j * BC;
            // sd holds the tangent scores without the factor scale: r_run sums p.sd in those raw units, and
            // the centring below applies the scale in the same FFMA that subtracts mu (no separate pass).
            if (kv0 + BC > Nk) {  // key tail (last tile only)
#pragma unroll
                for (int i = 0; i < NS; ++i)
                    if (kv0 + 8 * (i >> 2) + 2 * t4 + (i & 1) >= Nk) {
                        s[i] = -FJ_INF;
                        if constexpr (TAN) sd[i] = 0.f;
                    }
            }
            float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
            for (int i = 0; i < NS; ++i) mx[(i >> 1) & 1] = fmaxf(mx[(i >> 1) & 1], s[i]);
            float m_off[2], alpha[2];
            bool grew = false;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
                mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
                grew |= mx[h] > m_run[h];
                const float m_new = (mx[h] == -FJ_INF) ? 0.f : mx[h];
                alpha[h] = fj_exp2((m_run[h] - m_new) * sl2);
                m_off[h] = -m_new * sl2;  // the exponent's offset: p = exp2(s*sl2 + m_off)
                m_run[h] = mx[h];
                if constexpr (!TAN) l_run[h] *= alpha[h];
            }
            // RESCALE ONLY WHEN A MAX GREW: if no row of this warp has a new running max, alpha is exactly 1
            // for all of them and O (and T's alpha) need no multiply. The test is warp-uniform, so the
            // skipped loop is a branch, not a predicate; over long key ranges most tiles skip it (a row's
            // max grows in tile j with probability about 1/j for exchangeable scores).
            const bool rescale = __any_sync(0xffffffffu, grew);
            if constexpr (TAN) {  // T centred on the running mu (see the header)
                // This tile's p; the whole-row sums of p and p.sdot (over the quad that shares the row)
                // give the new centre mu, then T (tiles < j) moves from the old centre:
                // T = alpha T + (mu_old - mu_new) alpha O. Tile j's products come centred on mu_new.
                float lt[2] = {0.f, 0.f}, rt[2] = {0.f, 0.f};
#pragma unroll
                for (int i = 0; i < NS; ++i) {
                    const float p = fj_exp2(fmaf(s[i], sl2, m_off[(i >> 1) & 1]));
                    s[i] = p;
                    lt[(i >> 1) & 1] += p;
                    rt[(i >> 1) & 1] += p * sd[TAN ? i : 0];
                }
                float dmu[2];
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    lt[h] += __shfl_xor_sync(0xffffffffu, lt[h], 1);
                    lt[h] += __shfl_xor_sync(0xffffffffu, lt[h], 2);
                    rt[h] += __shfl_xor_sync(0xffffffffu, rt[h], 1);
                    rt[h] += __shfl_xor_sync(0xffffffffu, rt[h], 2);
                    l_run[h] = l_run[h] * alpha[h] + lt[h];
                    r_run[h] = r_run[h] * alpha[h] + rt[h];  // raw units (sd without scale)
                    // (approximate division, 2 ulp: an IEEE one costs a range check and a slow-path call)
                    const float mu_new = l_run[h] > 0.f ? __fdividef(scale * r_run[h], l_run[h]) : 0.f;
                    dmu[h] = mu_run[h] - mu_new;
                    mu_run[h] = mu_new;
                }
                auto move_t = [&] {  // O and T rescaled, T moved to the new centre
                    if (rescale) {
#pragma unroll
                        for (int i = 0; i < NO; ++i) {
                            acc_o[i] *= alpha[(i >> 1) & 1];
                            acc_t[TAN ? i : 0] = fmaf(acc_t[TAN ? i : 0], alpha[(i >> 1) & 1], dmu[(i >> 1) & 1] * acc_o[i]);
                        }
                    } else {  // alpha == 1: only the move of the centre
#pragma unroll
                        for (int i = 0; i < NO; ++i) acc_t[TAN ? i : 0] = fmaf(dmu[(i >> 1) & 1], acc_o[i], acc_t[TAN ? i : 0]);
                    }
                };
                auto centre_sd = [&] {  // P.(scale sd - mu): needs the scores only
#pragma unroll
                    for (int i = 0; i < NS; ++i)
                        sd[TAN ? i : 0] = s[i] * fmaf(sd[TAN ? i : 0], scale, -mu_run[(i >> 1) & 1]);
                };
                if constexpr (SPLIT_WAIT) {
                    centre_sd();
                    if constexpr (pending) finish_values(j);  // O and T complete from here on
                    move_t();
                } else {  // the order the measured build was compiled in
                    move_t();
                    centre_sd();
                }
            } else {  // primal forward
                auto rescale_o = [&] {
                    if (!rescale) return;  // alpha == 1
#pragma unroll
                    for (int i = 0; i < NO; ++i) acc_o[i] *= alpha[(i >> 1) & 1];
                };
                if constexpr (!SPLIT_WAIT) rescale_o();
#pragma unroll
                for (int i = 0; i < NS; ++i) {
                    const float p = fj_exp2(fmaf(s[i], sl2, m_off[(i >> 1) & 1]));
                    s[i] = p;
                    l_run[(i >> 1) & 1] += p;
                }
                if constexpr (SPLIT_WAIT) {
                    if constexpr (pending) finish_values(j);
                    rescale_o();
                }
            }
            pack_a<VF16>(s, pa);
            if constexpr (TAN) pack_a<VF16>(sd, psa);
            mbar_wait(vfull(j % STAGES), (j / STAGES) & 1);  // V of tile j, for the next turn
        };

        mbar_wait(qfull, 0);
        turn(0, FjBool<true>(), FjBool<false>());
        softmax(0, FjBool<false>());
        for (int j = 1; j < ntiles; ++j) {
            turn(j, FjBool<true>(), FjBool<true>());
            softmax(j, FjBool<true>());
        }
        turn(ntiles, FjBool<false>(), FjBool<true>());

        // ---- finish: quad-reduce l for the primal forward (with a tangent l and r are whole-row sums
        // already), normalise, store ----
#pragma unroll
        for (int h = 0; h < 2 && !TAN; ++h) {
            l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
            l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
        }
        const int bb = bh / H, hh = bh - bb * H;
        // O and T in the units of the scaled f16 copies of V and Vdot: back by 2^k.
        float vunit = 1.f;
        if constexpr (F16_VALUES) vunit = fj_values_unit(*vamax);
        const fj_i64 ooff = (fj_i64)bb * o_sb + (fj_i64)hh * o_sh;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = q0 + cw * 64 + warp * 16 + g + 8 * h;
            if (row >= Nq) continue;
            const float inv_l = l_run[h] > 0.f ? 1.f / l_run[h] : 0.f;
            const float mu = TAN ? scale * r_run[h] * inv_l : 0.f;  // r_run in raw units (sd without scale)
            const float out_l = inv_l * vunit;  // o = O/l, odot = T/l (times 2^k with F16_VALUES)
            const fj_i64 roff = ooff + (fj_i64)row * o_sn;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const int col = n * 8 + 2 * t4;
                const float o0 = acc_o[4 * n + 2 * h] * out_l, o1 = acc_o[4 * n + 2 * h + 1] * out_l;
                *reinterpret_cast<fj_u32*>(o + roff + col) = (fj_u32)ST::store(o0) | ((fj_u32)ST::store(o1) << 16);
                if (TAN) {
                    // Centred, T/l is odot itself: no cancellation against mu o.
                    const float a0 = acc_t[TAN ? 4 * n + 2 * h : 0] * out_l;
                    const float a1 = acc_t[TAN ? 4 * n + 2 * h + 1 : 0] * out_l;
                    *reinterpret_cast<fj_u32*>(to + roff + col) = (fj_u32)ST::store(a0) | ((fj_u32)ST::store(a1) << 16);
                }
            }
            if (t4 == 0) {
                const fj_i64 li = (fj_i64)bh * Nq + row;
                lse[li] = l_run[h] > 0.f ? m_run[h] * scale + logf(l_run[h]) : -FJ_INF;  // m_run: raw units
                if (TAN) tlse[li] = mu;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// LAYOUT PROBE (sm90_layout_probe_bf16_d{D}_bc{BC}): one warpgroup runs this file's own primitives once
// on one tile, so that a wrong reading of the hardware (TMA's swizzle and zero fill, the descriptor
// fields, the accumulator and A-fragment layouts) shows up on a GPU as a mismatch of one named stage
// rather than as a wrong attention output (tests/gpu_attention_sm90.rs runs it first):
//   1. TMA: Q [128 rows x d] -> shared memory as the kernel stores it (SLABS slabs of SWZ-byte rows, zero
//      fill past d); the raw shared bytes go to q_smem (u16 [SLABS * 128 * SCOL]).
//   2. S = Q K^T over DP (wgmma_ss, K-major descriptors), written as f32 [128, BC] through the
//      accumulator layout the kernel's softmax and masking assume; rows 64..127 through a Q descriptor
//      64 rows in, as the kernel's second consumer warpgroup reads them.
//   3. O = bf16(S) V (wgmma_rs: S's accumulators packed into A fragments as the kernel packs P; MN-major
//      V descriptor), written as f32 [128, DP] the way the kernel's finish reads it.
// q, k, v: contiguous bf16 [128, d], [BC, d], [BC, d] behind 4-D maps of the kernel's kind ({d, rows, 1,
// 1}, boxes of one slab x all rows). Launch: grid (1,1,1), block (128,1,1), dynamic shared memory
// 1024 + SLABS*SWZ*(128 + 2*BC) + 8 bytes.
template <int D, int BC>
__device__ __forceinline__ void layout_probe(const FjTensorMap* mq, const FjTensorMap* mk, const FjTensorMap* mv,
                                             fj_u16* __restrict__ q_smem, float* __restrict__ s_out,
                                             float* __restrict__ o_out) {
    typedef Cfg<D, FWD> C;
    constexpr int SWZ = C::SWZ, SCOL = C::SCOL, SLABS = C::SLABS, DP = C::DP, CPS = C::CPS;
    constexpr int SLAB_Q = BR * SWZ, SLAB_K = BC * SWZ;
    constexpr int Q_BYTES = SLABS * SLAB_Q, K_BYTES = SLABS * SLAB_K;
    FJ_SM90_SMEM(fj_smem);
    const fj_u32 base = (fj_smem_addr(fj_smem) + 1023u) & ~1023u;
    const fj_u32 sQ = base, sK = base + Q_BYTES, sV = sK + K_BYTES, bar = sV + K_BYTES;
    const int tid = threadIdx.x;
    if (tid == 0) {
        mbar_init(bar, 1);
        mbar_fence_init();
    }
    __syncthreads();
    if (tid == 0) {
        mbar_expect_tx(bar, Q_BYTES + 2 * K_BYTES);
#pragma unroll
        for (int s = 0; s < SLABS; ++s) {
            tma_load4(sQ + s * SLAB_Q, mq, bar, SCOL * s, 0, 0, 0);
            tma_load4(sK + s * SLAB_K, mk, bar, SCOL * s, 0, 0, 0);
            tma_load4(sV + s * SLAB_K, mv, bar, SCOL * s, 0, 0, 0);
        }
    }
    mbar_wait(bar, 0);

    // 1. Q's shared bytes as TMA left them.
    const fj_u16* q_sh = reinterpret_cast<const fj_u16*>(fj_smem + (sQ - fj_smem_addr(fj_smem)));
    for (int i = tid; i < Q_BYTES / 2; i += 128) q_smem[i] = q_sh[i];

    const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
    // Accumulator element i of this thread: row warp*16 + g + 8*((i>>1)&1), column 8*(i>>2) + 2*t4 + (i&1).
    auto row_of = [&](int i) { return warp * 16 + g + 8 * ((i >> 1) & 1); };
    auto col_of = [&](int i) { return 8 * (i >> 2) + 2 * t4 + (i & 1); };

#pragma unroll 1
    for (int half = 0; half < BR / 64; ++half) {
        // 2. S = Q K^T (this half's 64 rows).
        float s[BC / 2];
#pragma unroll
        for (int i = 0; i < BC / 2; ++i) s[i] = 0.f;
        const fj_u64 dq = desc_kmajor<SWZ>(sQ + half * 64 * SWZ), dk = desc_kmajor<SWZ>(sK);
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < DP / 16; ++kc)
            wgmma_ss<BC, false>(s, dq + (fj_u64)(((kc / CPS) * SLAB_Q + (kc % CPS) * 32) >> 4),
                                dk + (fj_u64)(((kc / CPS) * SLAB_K + (kc % CPS) * 32) >> 4), kc > 0);
        wgmma_commit();
        wgmma_wait0();
        fence_regs(s);
#pragma unroll
        for (int i = 0; i < BC / 2; ++i) s_out[(half * 64 + row_of(i)) * BC + col_of(i)] = s[i];

        // 3. O = bf16(S) V.
        fj_u32 pa[BC / 16][4];
        pack_a<false>(s, pa);
        float o[DP / 2];
#pragma unroll
        for (int i = 0; i < DP / 2; ++i) o[i] = 0.f;
        const fj_u64 dv = desc_mnmajor<SWZ>(sV, SLAB_K);
        wgmma_fence();
#pragma unroll
        for (int kc2 = 0; kc2 < BC / 16; ++kc2) wgmma_rs<DP, false>(o, pa[kc2], dv + (fj_u64)((kc2 * 16 * SWZ) >> 4));
        wgmma_commit();
        wgmma_wait0();
        fence_regs(o);
#pragma unroll
        for (int i = 0; i < DP / 2; ++i) o_out[(half * 64 + row_of(i)) * DP + col_of(i)] = o[i];
    }
}

}  // namespace fj_h

// ---------------------------------------------------------------------------------------------
// Entry points: one per (variant, dtype, head dim). Tensor maps by value (__grid_constant__).
#define FJ_TM const __grid_constant__ FjTensorMap
// After scale: the number of heads H (blockIdx.y = b*H + h) and the [B, H, Nq, d] element strides of o
// (and to); q, k, v and their tangents are addressed through their tensor maps.
#define FJ_SM90_LAYOUT int H, fj_i64 o_sb, fj_i64 o_sh, fj_i64 o_sn
#define FJ_SM90_LAYOUT_ARGS H, o_sb, o_sh, o_sn
#define FJ_SM90(DT, ST, D)                                                                                         \
    extern "C" __global__ void __launch_bounds__(fj_h::NTHREADS, 1) attention_jvp_sm90_##DT##_d##D(                \
        FJ_TM mq, FJ_TM mk, FJ_TM mv, FJ_TM mtq, FJ_TM mtk, FJ_TM mtv, fj_u16* o, fj_u16* to, float* lse,          \
        float* tlse, int Nq, int Nk, float scale, FJ_SM90_LAYOUT) {                                                \
        fj_h::attn_sm90<ST, D, fj_h::FULL>(&mq, &mk, &mv, &mtq, &mtk, &mtv, o, to, lse, tlse, Nq, Nk, scale,       \
                                           FJ_SM90_LAYOUT_ARGS);                                                   \
    }                                                                                                              \
    FJ_REGISTER(attention_jvp_sm90_##DT##_d##D)                                                                    \
    extern "C" __global__ void __launch_bounds__(fj_h::NTHREADS, 1) attention_jvp_nokv_sm90_##DT##_d##D(           \
        FJ_TM mq, FJ_TM mk, FJ_TM mv, FJ_TM mtq, fj_u16* o, fj_u16* to, float* lse, float* tlse, int Nq, int Nk,   \
        float scale, FJ_SM90_LAYOUT) {                                                                             \
        fj_h::attn_sm90<ST, D, fj_h::NOKV>(&mq, &mk, &mv, &mtq, nullptr, nullptr, o, to, lse, tlse, Nq, Nk,       \
                                           scale, FJ_SM90_LAYOUT_ARGS);                                            \
    }                                                                                                              \
    FJ_REGISTER(attention_jvp_nokv_sm90_##DT##_d##D)                                                               \
    extern "C" __global__ void __launch_bounds__(fj_h::NTHREADS, 1) attention_fwd_sm90_##DT##_d##D(                \
        FJ_TM mq, FJ_TM mk, FJ_TM mv, fj_u16* o, float* lse, int Nq, int Nk, float scale, FJ_SM90_LAYOUT) {        \
        fj_h::attn_sm90<ST, D, fj_h::FWD>(&mq, &mk, &mv, nullptr, nullptr, nullptr, o, nullptr, lse, nullptr, Nq,  \
                                          Nk, scale, FJ_SM90_LAYOUT_ARGS);                                         \
    }                                                                                                              \
    FJ_REGISTER(attention_fwd_sm90_##DT##_d##D)

FJ_SM90(bf16, FjBF16, 64)
FJ_SM90(bf16, FjBF16, 72)
FJ_SM90(bf16, FjBF16, 96)
FJ_SM90(bf16, FjBF16, 128)
FJ_SM90(f16, FjF16, 64)
FJ_SM90(f16, FjF16, 72)
FJ_SM90(f16, FjF16, 96)
FJ_SM90(f16, FjF16, 128)

// The f16 value products (bf16 storage): the JVP kernels with V and Vdot read from the f16 copies
// (made by attention_jvp.cu's attention_values_* kernels).
#define FJ_SM90_VF16(D)                                                                                            \
    extern "C" __global__ void __launch_bounds__(fj_h::NTHREADS, 1) attention_jvp_sm90_bf16_vf16_d##D(            \
        FJ_TM mq, FJ_TM mk, FJ_TM mv, FJ_TM mtq, FJ_TM mtk, FJ_TM mtv, fj_u16* o, fj_u16* to, float* lse,          \
        float* tlse, int Nq, int Nk, float scale, FJ_SM90_LAYOUT, const fj_u32* vamax) {                           \
        fj_h::attn_sm90<FjBF16, D, fj_h::FULL, true>(&mq, &mk, &mv, &mtq, &mtk, &mtv, o, to, lse, tlse, Nq, Nk,    \
                                                     scale, FJ_SM90_LAYOUT_ARGS, vamax);                           \
    }                                                                                                              \
    FJ_REGISTER(attention_jvp_sm90_bf16_vf16_d##D)                                                                 \
    extern "C" __global__ void __launch_bounds__(fj_h::NTHREADS, 1) attention_jvp_nokv_sm90_bf16_vf16_d##D(       \
        FJ_TM mq, FJ_TM mk, FJ_TM mv, FJ_TM mtq, fj_u16* o, fj_u16* to, float* lse, float* tlse, int Nq, int Nk,   \
        float scale, FJ_SM90_LAYOUT, const fj_u32* vamax) {                                                        \
        fj_h::attn_sm90<FjBF16, D, fj_h::NOKV, true>(&mq, &mk, &mv, &mtq, nullptr, nullptr, o, to, lse, tlse, Nq,  \
                                                     Nk, scale, FJ_SM90_LAYOUT_ARGS, vamax);                       \
    }                                                                                                              \
    FJ_REGISTER(attention_jvp_nokv_sm90_bf16_vf16_d##D)

FJ_SM90_VF16(64)
FJ_SM90_VF16(72)
FJ_SM90_VF16(96)
FJ_SM90_VF16(128)

// The layout probes: every swizzle (128 B at d 64/128, 32 B with zero fill at d 72, 64 B at d 96) and
// every key tile: 64, 96 and 128 at d 64, 64, 80 and 128 at d 72, 64 and 128 at d 96, 48, 64 and 128 at
// d 128.
#define FJ_SM90_PROBE(D, BC)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128, 1) sm90_layout_probe_bf16_d##D##_bc##BC(                     \
        FJ_TM mq, FJ_TM mk, FJ_TM mv, fj_u16* q_smem, float* s_out, float* o_out) {                                \
        fj_h::layout_probe<D, BC>(&mq, &mk, &mv, q_smem, s_out, o_out);                                            \
    }                                                                                                              \
    FJ_REGISTER(sm90_layout_probe_bf16_d##D##_bc##BC)

FJ_SM90_PROBE(64, 64)
FJ_SM90_PROBE(64, 96)
FJ_SM90_PROBE(64, 128)
FJ_SM90_PROBE(72, 64)
FJ_SM90_PROBE(72, 80)
FJ_SM90_PROBE(72, 128)
FJ_SM90_PROBE(96, 64)
FJ_SM90_PROBE(96, 128)
FJ_SM90_PROBE(128, 48)
FJ_SM90_PROBE(128, 64)
FJ_SM90_PROBE(128, 128)
