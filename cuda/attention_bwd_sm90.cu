// attention_bwd_sm90.cu: the backward of the primal attention for Hopper (sm_90a): warpgroup MMA (wgmma),
// tiles brought in by TMA, a producer warpgroup and two consumer warpgroups in ping-pong, as the JVP's
// attention_jvp_sm90.cu (whose primitives, hopper.cuh, it shares). Same math, outputs and two-kernel
// split as attention_bwd.cuh (preprocess there, then dK/dV and dQ here; no atomics); only compiled for
// sm_90a.
//
// MATH (per batch*head; c = scale; lse from the forward, D = rowsum(dO.O) from the preprocess):
//   P = exp(c Q K^T - lse), dP = dO V^T, dS = P.(dP - D);  dV = P^T dO, dK = c dS^T Q, dQ = c dS K.
//
// TWO KERNELS, one template (KIND):
//   dK/dV: a block owns 128 keys (K and V resident in shared memory, 64 keys per consumer warpgroup, dK
//     and dV accumulated in registers) and streams the query tiles (Q, dO and the tile's lse, D). Per
//     tile, on the transposed problem (keys are the M of wgmma):
//       S^T = K Q^T, dP^T = V dO^T                 (shared x shared, K-major operands)
//       dV += P^T dO, dK += dS^T Q                 (P^T, dS^T from registers, dO and Q MN-major)
//     so every operand is read as it lies: the streamed Q and dO tiles serve both as the K-major B of the
//     scores and as the MN-major B of the gradient products.
//   dQ: a block owns 128 queries (Q and dO resident) and streams the key tiles (K, V):
//       S = Q K^T, dP = dO V^T,  dQ += dS K        (K MN-major)
//   Two passes recompute S and dP (seven tile products against five) but need no f32 atomics, no zeroed
//   buffer and no convert kernel; the result is deterministic.
//
// SCHEDULE (per consumer warpgroup; the JVP's): a turn issues, as one wgmma batch, the score products
// of streamed tile j and the gradient products of tile j-1 (whose P and dS the warpgroup holds as A
// fragments), hands the tensor cores to the other warpgroup (named barriers 1 and 2), waits for its
// batch; the elementwise step of tile j (P from lse, dS) then overlaps the other warpgroup's batch.
// A stage of the ring is released after the turn that issued tile j's gradient products
// (FLASHJVP_SM90_SCHEDULE=split: after the elementwise step that waits for them, hopper.cuh SCHEDULE).
//
// SHARED MEMORY (tiles as slabs [rows][SCOL] of SWZ-byte rows in the TMA/wgmma swizzle, SWZ as the
// JVP's: 128 bytes at d 64 and 128, 64 at d 96, 32 at d 72 whose fifth slab TMA half fills with zeros;
// the products run over DP = 80 columns there and the stores write 72):
//   the resident pair (dK/dV: K, V; dQ: Q, dO), 128 rows each, loaded once;
//   a ring of STAGES stages of the streamed pair (dK/dV: Q, dO; dQ: K, V) of BT rows, each with a
//   "full" mbarrier (TMA bytes; for dK/dV also 32 arrivals of the producer's second warp, which writes
//   the tile's lse*log2(e) and D into the stage's vector slot with ordinary stores) and an "empty"
//   mbarrier (the 8 consumer warps);
//   dK/dV only: the vector slots, STAGES x [lse*log2(e) | D] of BT floats.
//   BT = 48 at d 128 for dK/dV (dK, dV, S^T, dP^T and the previous tile's fragments within 240
//   registers), 64 otherwise; STAGES = 4.
//
// TAILS: TMA zero-fills rows past Nq or Nk. Queries past Nq get lse = +inf (P = 0) and D = 0, so their
// dS is 0; keys past Nk get P = 0 in dQ (their scores set to -inf); rows past the end are never stored.
//
// LAUNCH: block (384,1,1) (a producer warpgroup, two consumer warpgroups); dynamic shared memory
//   1024 + 2*SLABS*128*SWZ + STAGES*2*SLABS*BT*SWZ + (dK/dV: STAGES*2*BT*4) + 8*(1 + 2*STAGES) bytes
//   (attention_sm90.rs: bwd_shared_bytes; README.md lists them);
//   attention_bwd_dkdv_sm90_{dt}_d{D}(map q, map k, map v, map dout, lse, delta, dk, dv, Nq, Nk, scale, H,
//       k_sb, k_sh, k_sn, v_sb, v_sh, v_sn)       grid (ceil(Nk/128), B*H, 1)
//   attention_bwd_dq_sm90_{dt}_d{D}(map q, map k, map v, map dout, lse, delta, dq, Nq, Nk, scale, H,
//       q_sb, q_sh, q_sn)                         grid (ceil(Nq/128), B*H, 1)
//   Tensor maps as the JVP's (4-D {d, N, H, B}, boxes of one slab x rows), rows 128 for the resident
//   pair and BT for the streamed one (dK/dV: q and dout in boxes of BT rows, k and v of 128; dQ: the
//   reverse, BT = 64); dout has o's strides. dk, dv, dq are written with the given element strides
//   (their primal's layout; long long, multiples of 8); lse, delta contiguous f32 [B,H,Nq]. bf16 and f16,
//   head dims 64, 72, 96, 128 with dv == d.
//
// STATUS: compiled for sm_90a with NVRTC 13.0 (no spills, README.md); runs on the CPU emulator
// (FLASHJVP_EMULATE=sm_90a: tests/gpu_attention_sm90.rs against the f64 reference). Never run on a GPU:
// the dispatcher takes it only with FLASHJVP_ATTENTION_BWD_PATH=sm90a until a GPU run has measured it.
#include "common.cuh"
#include "hopper.cuh"

namespace fj_hb {
using namespace fj_h;

enum { DKDV = 0, DQ = 1 };

template <int D, int KIND> struct BwdCfg {
    enum {
        SWZ = D % 64 == 0 ? 128 : D % 32 == 0 ? 64 : 32,
        SCOL = SWZ / 2,
        SLABS = (D + SCOL - 1) / SCOL,
        DP = SLABS * SCOL,                 // the head dim the products see (80 at d 72)
        CPS = SCOL / 16,                   // 16-column k-chunks per slab
        BT = (KIND == DKDV && D == 128) ? 48 : 64,  // streamed rows per tile
        STAGES = 4,
        SLAB_R = BR * SWZ,                 // one slab of a resident tile (128 rows)
        SLAB_T = BT * SWZ,                 // one slab of a streamed tile
        RES_BYTES = 2 * SLABS * SLAB_R,    // the resident pair
        ST_BYTES = 2 * SLABS * SLAB_T,     // one stage: the streamed pair
        VEC_OFF = RES_BYTES + STAGES * ST_BYTES,
        VEC_BYTES = KIND == DKDV ? STAGES * 2 * BT * 4 : 0,
        BAR_OFF = VEC_OFF + VEC_BYTES,
        SMEM = 1024 + BAR_OFF + 8 * (1 + 2 * STAGES),
    };
};

// Resident maps mr0, mr1 (dK/dV: K, V; dQ: Q, dO), streamed maps mt0, mt1 (dK/dV: Q, dO; dQ: K, V);
// outputs g0 (dK; dQ) and g1 (dV; unused) with their element strides.
template <class ST, int D, int KIND>
__device__ __forceinline__ void attn_bwd_sm90(const FjTensorMap* mr0, const FjTensorMap* mr1, const FjTensorMap* mt0,
                                              const FjTensorMap* mt1, const float* __restrict__ lse,
                                              const float* __restrict__ delta, fj_u16* __restrict__ g0,
                                              fj_u16* __restrict__ g1, int Nq, int Nk, float scale, int H,
                                              fj_i64 g0_sb, fj_i64 g0_sh, fj_i64 g0_sn, fj_i64 g1_sb, fj_i64 g1_sh,
                                              fj_i64 g1_sn) {
    typedef BwdCfg<D, KIND> C;
    constexpr bool F16 = ST::IS_F16;
    constexpr bool KV = KIND == DKDV;
    constexpr int SLABS = C::SLABS, STAGES = C::STAGES, BT = C::BT;
    constexpr int SWZ = C::SWZ, SCOL = C::SCOL, CPS = C::CPS, DP = C::DP;
    constexpr int SLAB_R = C::SLAB_R, SLAB_T = C::SLAB_T, STB = C::ST_BYTES;

    FJ_SM90_SMEM(fj_smem);
    const fj_u32 smem0 = fj_smem_addr(fj_smem);
    const fj_u32 base = (smem0 + 1023u) & ~1023u;  // the swizzles repeat every 1024 bytes
    const fj_u32 sR = base;                         // tensor t, slab s: sR + (t*SLABS + s)*SLAB_R
    const fj_u32 sT = base + C::RES_BYTES;          // stage st, tensor t, slab s: sT + st*STB + (t*SLABS + s)*SLAB_T
    const fj_u32 sVec = base + C::VEC_OFF;          // dK/dV: stage st's [lse*log2e | D] at sVec + st*2*BT*4
    const fj_u32 bars = base + C::BAR_OFF;
    const fj_u32 rfull = bars;
    auto full = [&](int st) { return bars + 8u * (1 + st); };
    auto empty = [&](int st) { return bars + 8u * (1 + STAGES + st); };
    // The vector slot of a stage as a generic pointer (written by the producer's second warp).
    auto vec = [&](int st) { return reinterpret_cast<float*>(fj_smem + (sVec - smem0) + st * 2 * BT * 4); };

    const int tid = threadIdx.x;
    const int wg = tid >> 7;
    const int bh = blockIdx.y;  // b*H + h
    const int r0 = blockIdx.x * BR;
    const int nstream = KV ? Nq : Nk;
    const int ntiles = (nstream + BT - 1) / BT;

    require_dynamic_smem(C::SMEM);

    if (tid == 0) {
        mbar_init(rfull, 1);
#pragma unroll
        for (int st = 0; st < STAGES; ++st) {
            mbar_init(full(st), KV ? 1 + 32 : 1);  // TMA's expect_tx (+ the vector warp's 32 lanes)
            mbar_init(empty(st), 4 * NCONS);       // one arrival per consumer warp
        }
        mbar_fence_init();
    }
    __syncthreads();

    if (wg == 0) {
        // ---------------- producer: thread 0 issues every copy; warp 1 writes lse and D (dK/dV) ----------------
        producer_regs();
        const int bb = bh / H, hh = bh - bb * H;  // TMA coordinates of this head: (col, row, hh, bb)
        if (tid == 0) {
            tma_prefetch_map(mr0);
            tma_prefetch_map(mr1);
            tma_prefetch_map(mt0);
            tma_prefetch_map(mt1);
            mbar_expect_tx(rfull, C::RES_BYTES);
#pragma unroll
            for (int s = 0; s < SLABS; ++s) {
                tma_load4(sR + s * SLAB_R, mr0, rfull, SCOL * s, r0, hh, bb);
                tma_load4(sR + (SLABS + s) * SLAB_R, mr1, rfull, SCOL * s, r0, hh, bb);
            }
            for (int j = 0; j < ntiles; ++j) {
                const int st = j % STAGES;
                const fj_u32 use = j / STAGES;  // how many times this stage was filled before
                if (use > 0) mbar_wait(empty(st), (use - 1) & 1);
                mbar_expect_tx(full(st), STB);
                const fj_u32 td = sT + st * STB;
#pragma unroll
                for (int s = 0; s < SLABS; ++s) {
                    tma_load4(td + s * SLAB_T, mt0, full(st), SCOL * s, j * BT, hh, bb);
                    tma_load4(td + (SLABS + s) * SLAB_T, mt1, full(st), SCOL * s, j * BT, hh, bb);
                }
            }
        } else if (KV && (tid >> 5) == 1) {
            const int lane = tid & 31;
            for (int j = 0; j < ntiles; ++j) {
                const int st = j % STAGES;
                const fj_u32 use = j / STAGES;
                if (use > 0) mbar_wait(empty(st), (use - 1) & 1);
                float* v = vec(st);
                for (int c = lane; c < BT; c += 32) {
                    const int row = j * BT + c;
                    const bool in = row < Nq;
                    const fj_i64 li = (fj_i64)bh * Nq + row;
                    v[c] = in ? lse[li] * FJ_LOG2E : FJ_INF;  // P = 0 for queries past Nq
                    v[BT + c] = in ? delta[li] : 0.f;
                }
                mbar_arrive(full(st));  // release: the stores above are visible to the waiting consumers
            }
        }
    } else {
        // ---------------- consumers: 64 resident rows per warpgroup ----------------
        consumer_regs();
        const int cw = wg - 1;
        const int warp = (tid >> 5) & 3, lane = tid & 31;
        const int g = lane >> 2, t4 = lane & 3;
        const int my_bar = 1 + cw, other_bar = 2 - cw;
        if (cw == 1) named_arrive(1);  // consumer 0 takes the first turn

        constexpr int NA = DP / 2, NS = BT / 2, KC = DP / 16, KC2 = BT / 16;
        // acc0: dK (dK/dV) or dQ; acc1: dV. s, dp: the score tiles S (or S^T) and dP (or dP^T) of the
        // current tile; pa, dsa: P^T and dS (or dS^T) of the previous tile as A fragments.
        float acc0[NA], acc1[KV ? NA : 1], s[NS], dp[NS];
        fj_u32 pa[KV ? KC2 : 1][4], dsa[KC2][4];
#pragma unroll
        for (int i = 0; i < NA; ++i) {
            acc0[i] = 0.f;
            if (KV) acc1[KV ? i : 0] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < NS; ++i) s[i] = dp[i] = 0.f;
#pragma unroll
        for (int i = 0; i < KC2; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                dsa[i][e] = 0u;
                if (KV) pa[KV ? i : 0][e] = 0u;
            }
        const float sl2 = scale * FJ_LOG2E;
        // dQ: lse*log2e and D of this thread's rows g and g+8 (rows past Nq: P = 0).
        float row_lse[2] = {FJ_INF, FJ_INF}, row_d[2] = {0.f, 0.f};
        if (!KV) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = r0 + cw * 64 + warp * 16 + g + 8 * h;
                if (row < Nq) {
                    row_lse[h] = lse[(fj_i64)bh * Nq + row] * FJ_LOG2E;
                    row_d[h] = delta[(fj_i64)bh * Nq + row];
                }
            }
        }
        const fj_u32 ra = sR + cw * 64 * SWZ;  // this warpgroup's 64 rows of every resident slab

        // One turn: the score products of tile j (SC) and the gradient products of tile j-1 (GR) as one
        // wgmma batch, peeled into straight-line forms so that no wgmma sits on a divergent path.
        auto turn = [&](int j, auto SC, auto GR) {
            constexpr bool scores = decltype(SC)::value, grads = decltype(GR)::value;
            const int st = j % STAGES, pst = (j + STAGES - 1) % STAGES;
            if (scores) mbar_wait(full(st), (j / STAGES) & 1);
            named_sync(my_bar);
            fence_regs(acc0);
            if constexpr (KV) fence_regs(acc1);
            if constexpr (KV) fence_regs(pa);
            fence_regs(dsa);
            wgmma_fence();
            if constexpr (scores) {
                // Descriptor bases made opaque per turn (the JVP's register saving), offsets in 16 bytes.
                const fj_u64 dr = opaque64(desc_kmajor<SWZ>(ra));
                const fj_u64 dt = opaque64(desc_kmajor<SWZ>(sT + st * STB));
                auto ro = [&](int t, int kc) { return (fj_u64)(((t * SLABS + kc / CPS) * SLAB_R + (kc % CPS) * 32) >> 4); };
                auto to = [&](int t, int kc) { return (fj_u64)(((t * SLABS + kc / CPS) * SLAB_T + (kc % CPS) * 32) >> 4); };
#pragma unroll
                for (int kc = 0; kc < KC; ++kc)  // S^T = K Q^T (dK/dV); S = Q K^T (dQ)
                    wgmma_ss<BT, F16>(s, dr + ro(0, kc), dt + to(0, kc), kc > 0);
#pragma unroll
                for (int kc = 0; kc < KC; ++kc)  // dP^T = V dO^T (dK/dV); dP = dO V^T (dQ)
                    wgmma_ss<BT, F16>(dp, dr + ro(1, kc), dt + to(1, kc), kc > 0);
            }
            if constexpr (SPLIT_WAIT && scores && grads) wgmma_commit();  // the scores: a group of their own
            if constexpr (grads) {
                const fj_u64 dm = opaque64(desc_mnmajor<SWZ>(sT + pst * STB, SLAB_T));
                // Row chunk kc2 (16 streamed rows) of tensor t of a stage, read MN-major.
                auto mo = [&](int t, int kc2) { return (fj_u64)((t * SLABS * SLAB_T + kc2 * 16 * SWZ) >> 4); };
#pragma unroll
                for (int kc2 = 0; kc2 < KC2; ++kc2) {
                    if constexpr (KV) {
                        wgmma_rs<DP, F16>(acc1, pa[kc2], dm + mo(1, kc2));   // dV += P^T dO
                        wgmma_rs<DP, F16>(acc0, dsa[kc2], dm + mo(0, kc2));  // dK += dS^T Q
                    } else {
                        wgmma_rs<DP, F16>(acc0, dsa[kc2], dm + mo(0, kc2));  // dQ += dS K
                    }
                }
            }
            wgmma_commit();
            // The other warpgroup's turn (consumer 1 skips its last hand-over: nobody waits for it).
            if (!(cw == 1 && !scores)) named_arrive(other_bar);
            if constexpr (SPLIT_WAIT && scores && grads) {
                wgmma_wait1();  // the scores are done; the gradient products finish in finish_grads
                fence_regs(s);
                fence_regs(dp);
                return;
            }
            wgmma_wait0();
            fence_regs(s);
            fence_regs(dp);
            fence_regs(acc0);
            if constexpr (KV) fence_regs(acc1);
            if constexpr (KV) fence_regs(pa);
            fence_regs(dsa);
            if (grads && lane == 0) mbar_arrive(empty(pst));  // this warp's reads of tile j-1 are done
        };
        // With SPLIT_WAIT, the rest of a steady turn: its gradient products of tile j-1 (before the
        // elementwise step of tile j overwrites the A fragments they read).
        auto finish_grads = [&](int j) {
            wgmma_wait0();
            fence_regs(acc0);
            if constexpr (KV) fence_regs(acc1);
            if constexpr (KV) fence_regs(pa);
            fence_regs(dsa);
            if (lane == 0) mbar_arrive(empty((j + STAGES - 1) % STAGES));
        };

        // P and dS of tile j from its score tiles (overlaps the other warpgroup's turn), as A fragments.
        // Accumulator element i: row warp*16 + g + 8*((i>>1)&1), column 8*(i>>2) + 2*t4 + (i&1).
        // PENDING: this tile's turn also issued gradient products still in flight (SPLIT_WAIT, steady turns).
        auto elementwise = [&](int j, auto PENDING) {
            constexpr bool pending = decltype(PENDING)::value;
            if constexpr (KV) {  // columns are queries: their lse and D from the stage's vector slot
                const float* v = vec(j % STAGES);
#pragma unroll
                for (int i = 0; i < NS; i += 2) {  // elements i, i+1: columns c, c+1 (one 8-byte load each)
                    const int c = 8 * (i >> 2) + 2 * t4;
                    const float2 l2 = *reinterpret_cast<const float2*>(v + c);
                    const float2 dd = *reinterpret_cast<const float2*>(v + BT + c);
                    const float p0 = fj_exp2(fmaf(s[i], sl2, -l2.x)), p1 = fj_exp2(fmaf(s[i + 1], sl2, -l2.y));
                    s[i] = p0;
                    s[i + 1] = p1;
                    dp[i] = p0 * (dp[i] - dd.x);
                    dp[i + 1] = p1 * (dp[i + 1] - dd.y);
                }
                if constexpr (SPLIT_WAIT && pending) finish_grads(j);
                pack_a<F16>(s, pa);
            } else {  // columns are keys: those past Nk get P = 0
                const int kv0 = j * BT;
                if (kv0 + BT > Nk) {
#pragma unroll
                    for (int i = 0; i < NS; ++i)
                        if (kv0 + 8 * (i >> 2) + 2 * t4 + (i & 1) >= Nk) s[i] = -FJ_INF;
                }
#pragma unroll
                for (int i = 0; i < NS; ++i) {
                    const int h = (i >> 1) & 1;
                    const float p = fj_exp2(fmaf(s[i], sl2, -row_lse[h]));
                    dp[i] = p * (dp[i] - row_d[h]);
                }
                if constexpr (SPLIT_WAIT && pending) finish_grads(j);
            }
            pack_a<F16>(dp, dsa);
        };

        mbar_wait(rfull, 0);
        turn(0, FjBool<true>(), FjBool<false>());
        elementwise(0, FjBool<false>());
        for (int j = 1; j < ntiles; ++j) {
            turn(j, FjBool<true>(), FjBool<true>());
            elementwise(j, FjBool<true>());
        }
        turn(ntiles, FjBool<false>(), FjBool<true>());

        // ---- finish: scale dK (dQ) by c, store the rows of this warpgroup that exist ----
        const int nres = KV ? Nk : Nq;
        const int bb = bh / H, hh = bh - bb * H;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = r0 + cw * 64 + warp * 16 + g + 8 * h;
            if (row >= nres) continue;
            const fj_i64 off0 = (fj_i64)bb * g0_sb + (fj_i64)hh * g0_sh + (fj_i64)row * g0_sn;
            const fj_i64 off1 = (fj_i64)bb * g1_sb + (fj_i64)hh * g1_sh + (fj_i64)row * g1_sn;
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const int col = n * 8 + 2 * t4;
                const float a0 = acc0[4 * n + 2 * h] * scale, a1 = acc0[4 * n + 2 * h + 1] * scale;
                *reinterpret_cast<fj_u32*>(g0 + off0 + col) = (fj_u32)ST::store(a0) | ((fj_u32)ST::store(a1) << 16);
                if (KV) {
                    const float b0 = acc1[KV ? 4 * n + 2 * h : 0], b1 = acc1[KV ? 4 * n + 2 * h + 1 : 0];
                    *reinterpret_cast<fj_u32*>(g1 + off1 + col) = (fj_u32)ST::store(b0) | ((fj_u32)ST::store(b1) << 16);
                }
            }
        }
    }
}

}  // namespace fj_hb

// ---------------------------------------------------------------------------------------------
// Entry points: one per (kernel, dtype, head dim). Tensor maps by value (__grid_constant__).
#define FJ_TM const __grid_constant__ FjTensorMap
#define FJ_BWD_SM90(DT, ST, D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(fj_h::NTHREADS, 1) attention_bwd_dkdv_sm90_##DT##_d##D(           \
        FJ_TM mq, FJ_TM mk, FJ_TM mv, FJ_TM mdo, const float* lse, const float* delta, fj_u16* dk, fj_u16* dv,    \
        int Nq, int Nk, float scale, int H, fj_i64 k_sb, fj_i64 k_sh, fj_i64 k_sn, fj_i64 v_sb, fj_i64 v_sh,       \
        fj_i64 v_sn) {                                                                                             \
        fj_hb::attn_bwd_sm90<ST, D, fj_hb::DKDV>(&mk, &mv, &mq, &mdo, lse, delta, dk, dv, Nq, Nk, scale, H, k_sb, \
                                                 k_sh, k_sn, v_sb, v_sh, v_sn);                                    \
    }                                                                                                              \
    FJ_REGISTER(attention_bwd_dkdv_sm90_##DT##_d##D)                                                               \
    extern "C" __global__ void __launch_bounds__(fj_h::NTHREADS, 1) attention_bwd_dq_sm90_##DT##_d##D(             \
        FJ_TM mq, FJ_TM mk, FJ_TM mv, FJ_TM mdo, const float* lse, const float* delta, fj_u16* dq, int Nq, int Nk, \
        float scale, int H, fj_i64 q_sb, fj_i64 q_sh, fj_i64 q_sn) {                                               \
        fj_hb::attn_bwd_sm90<ST, D, fj_hb::DQ>(&mq, &mdo, &mk, &mv, lse, delta, dq, nullptr, Nq, Nk, scale, H,    \
                                               q_sb, q_sh, q_sn, 0, 0, 0);                                         \
    }                                                                                                              \
    FJ_REGISTER(attention_bwd_dq_sm90_##DT##_d##D)

FJ_BWD_SM90(bf16, FjBF16, 64)
FJ_BWD_SM90(bf16, FjBF16, 72)
FJ_BWD_SM90(bf16, FjBF16, 96)
FJ_BWD_SM90(bf16, FjBF16, 128)
FJ_BWD_SM90(f16, FjF16, 64)
FJ_BWD_SM90(f16, FjF16, 72)
FJ_BWD_SM90(f16, FjF16, 96)
FJ_BWD_SM90(f16, FjF16, 128)
