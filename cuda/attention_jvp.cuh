// attention_jvp.cuh: fused attention with its tangent in one pass (FlashAttention-2 structure): the
// kernel templates, instantiated by attention_jvp.cu (dv == d) and attention_jvp_dv.cu (dv != d).
// Include common.cuh before this header (it does not include it itself: the PTX check in
// src/cuda/launch.rs inlines headers textually, once each).
//
// WHAT IT COMPUTES (per batch*head, per query row i; non-causal, Nq may differ from Nk; c = scale;
// q, k have head dim d, v has head dim dv, which may differ):
//   s_j   = c q_i.k_j                       sdot_j = c (qdot_i.k_j + q_i.kdot_j)
//   p_j   = exp(s_j - m)                    streamed over key tiles with running max m (old state is
//                                           rescaled by alpha = exp(m_old - m_new) whenever m grows)
//   l     = sum_j p_j                       O = sum_j p_j v_j
//   r     = sum_j p_j sdot_j                T = sum_j p_j (vdot_j + sdot_j v_j)
//   finish: o = O/l, mu = r/l, odot = T/l - mu o, lse = m + ln l, tlse (the tangent of lse) = mu.
// CENTRED T (full JVP and nokv, 16-bit storage): P.Sdot is rounded to bf16/f16 for the tensor cores,
// and odot = T/l - mu o cancels those rounding errors against mu o, badly when one key dominates a row
// (Nk = 1 gave a bf16 tangent error of 3.9e-3 under the emulator; the nokv kernels, uncentred until
// 2026-11, 7.7e-3 at scale 1). T is therefore kept centred on the running mu:
// T = sum_j p_j (vdot_j + (sdot_j - mu) v_j) with the tile's products fed P.(Sdot - mu_new), and when a
// tile moves mu from mu_old to mu_new, T gains (mu_old - mu_new) O first; then odot = T/l. mu needs
// whole-row sums of p and p.sdot every tile (two quad shuffles each).
// SOFTMAX ARITHMETIC (tensor-core kernels but nokv, as attention_jvp_sm90.cu): sdot stays unscaled (r in
// raw units; c applied once per row to mu and inside the centring FFMA), and O and T's alpha are applied
// only when a row of the warp has a new running max (warp-uniform vote; alpha is exactly 1 otherwise).
// The nokv kernels (P_EARLY, registers) keep the plain form.
// NOKV REGISTERS: ptxas schedules the nokv kernels more greedily than the full ones, and centring them
// as the full JVP does spilled at many (d, dv). They fit 255 registers because (P_EARLY) P is packed to
// 16 bits as soon as it is known, so the f32 tile dies before the shuffles; l, r, mu and P.(Sdot - mu)
// then take the rounded p~ that the products see, which keeps the centring exact for those weights
// (sum p~ (sdot - mu) = 0; mixing f32 sums with p~ products gave 3.3e-3 at d72 against 2.7e-3), while
// the per-thread sums of p - p~ and (p - p~) sdot restore lse and tlse of the f32 p. Also: 32-key tiles
// at dv = 96, and the score loop over head-dim chunks unrolled 2 at a time (1 at dv = 128) when Q is
// re-read from shared memory. Those last two were found with the resource report (NVRTC 13.0); the CI's
// spill check catches a compiler that disagrees.
// Six matrix products per tile: Q K^T, Qdot K^T, Q Kdot^T, P V, P Vdot, (P.Sdot) V; T holds both P Vdot
// and (P.Sdot) V. Variants:
//   attention_jvp_*      the full JVP above (tangents on q, k and v).
//   attention_jvp_nokv_* K and V carry no tangent: sdot = c qdot.k, T = sum p sdot v (four products).
//   attention_fwd_*      primal only: o and lse (two products).
// Exponentials are taken as 2^x: p = 2^(s*c*log2(e) - m*c*log2(e)), one FFMA and an ex2 per score
// on tensor cores, where the running max m stays in raw score units and lse = m c + ln l; the f32
// kernels fold c*log2(e) into the scores, keep m in that log2 domain and take lse = m ln2 + ln l.
//
// TILING (bf16/f16, tensor cores): a block of 4 warps owns BR = 64 query rows, 16 per warp; each warp
// runs mma.sync m16n8k16 (16-bit in, f32 accumulate). Key tiles of BC rows (64; 32 when d or dv is 128,
// and in nokv at dv = 96) of K, V (and Kdot, Vdot) stream through shared memory with cp.async, double
// buffered. Q and Qdot are
// staged in shared memory once; when d <= 64 and dv <= 64 they are then held as mma operand fragments
// in registers, otherwise re-read with ldmatrix every tile (register budget, DESIGN.md section 3: with
// dv = 96 and Q in registers the d = 32 JVP spills on sm_90a). The score tiles S and Sdot stay in registers; P and P.Sdot are rounded to the storage
// 16-bit type to feed the second pair of products (as FlashAttention does); l and r are summed from the
// f32 values. Per thread: O and T take DVP/2 f32 registers each, S and Sdot BC/2 each. Shared-memory
// rows are padded by 8 elements (16 bytes) so that ldmatrix reads are free of bank conflicts.
//
// HEAD DIM PADDING: a head dim that is not a multiple of 16 (the mma k- and n-granule; 72 here) is
// padded to the next multiple (DP for d, DVP for dv) in shared memory with zero columns (written once,
// never overwritten by the copies), and output columns >= dv are not stored.
//
// TAILS: query rows >= Nq and key rows >= Nk are zero-filled by cp.async (src-size 0); scores of keys
// >= Nk are set to -inf before the row max and their sdot to 0; query rows >= Nq are never stored. A row
// whose running max is still -inf uses 0 as the reference so that exp(-inf - -inf) never yields NaN;
// a row with l = 0 (only possible when Nk = 0) writes o = odot = 0, lse = -inf, tlse = 0.
//
// f32 STORAGE (plain FMA, for the f32 path and as a second reference): a block of 4 warps owns 16 query
// rows (4 per warp, one at a time); key tiles of 32 rows (lane = key for the scores, lane = output
// column for the accumulators), f32 in shared memory, single buffered. Same math, same tail rules.
//
// LAUNCH (all kernels):
//   grid  = (ceil(Nq / BR), B*H, 1), block = (128, 1, 1); B*H <= 65535.
//   BR = 64 for bf16/f16, 16 for f32.
//   dynamic shared memory bytes (set cudaFuncAttributeMaxDynamicSharedMemorySize when > 48 KiB):
//     bf16/f16: 2 * (NQ * 64 * (DP + 8) + 2 * (NKV / 2) * BC * (DP + 8 + DVP + 8))
//               NQ = 2 (jvp, jvp_nokv) or 1 (fwd); NKV = 4 (jvp) or 2 (jvp_nokv, fwd);
//               DP, DVP = d, dv rounded up to a multiple of 16; BC = 32 if d or dv is 128 or (nokv) dv is 96, else 64
//     f32:      4 * (NQ * 16 * d + NK * 32 * (d + 1) + NK * 32 * VS),  VS = 32 * ceil(dv / 32),
//               NQ = 2 (jvp, jvp_nokv) or 1 (fwd); NK = 2 (jvp) or 1 (jvp_nokv, fwd)
//   README.md lists the resulting byte counts.
//
// PARAMETERS (q/tq [B,H,Nq,d], k/tk [B,H,Nk,d], v/tv [B,H,Nk,dv], o/to [B,H,Nq,dv] in the storage
// dtype, each STRIDED: element (b, h, n, j) of q at q[b*q_sb + h*q_sh + n*q_sn + j], likewise k, v, o,
// the head dim contiguous, a tangent with its primal's strides; lse/tlse [B,H,Nq] f32 contiguous):
//   attention_jvp_{dt}{HD}      (q, k, v, tq, tk, tv, o, to, lse, tlse, Nq, Nk, scale, LAYOUT)
//   attention_jvp_nokv_{dt}{HD} (q, k, v, tq,         o, to, lse, tlse, Nq, Nk, scale, LAYOUT)
//   attention_fwd_{dt}{HD}      (q, k, v,             o,     lse,       Nq, Nk, scale, LAYOUT)
//   LAYOUT = (int H, long long q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, o_sb, o_sh, o_sn);
//   blockIdx.y = b*H + h. dt in {bf16, f16, f32}; HD = _d{D} when dv == d, _d{D}_dv{DV} otherwise; D, DV
//   in {32, 64, 72, 96, 128} (every pair). Nq, Nk >= 1 (int), scale f32. 16-bit operands: base pointers
//   16-byte aligned and every stride a multiple of 8 elements (cp.async copies 16-byte row chunks). E.g.
//   q, k, v read in place from a packed projection [B,N,3,H,d] (sb = N*3Hd, sh = d, sn = 3Hd; k, v at
//   +Hd, +2Hd) and o written token-major [B,N,H,dv] (sb = N*H*dv, sh = dv, sn = H*dv).
//   attention_jvp{,_nokv}_bf16_vf16_d{D} (the jvp/nokv parameters, then const unsigned* vamax): the f16
//   value products (attn_tc's F16_VALUES; common.cuh, F16 VALUE PRODUCTS): v and tv are contiguous f16
//   copies scaled by 2^-k (v's LAYOUT strides describe the copies), vamax the max bits k comes from.
//
// LIMITS: head dims other than the five above are not instantiated. f16: P.Sdot is rounded to f16, so
// |p * sdot| must stay below 65504.
//
// STATUS: compiled for sm_80 and sm_90a with NVRTC 13.0 (no spills, see README.md); ran on an NVIDIA H200
// (2026-11-27, scripts/gpu/check.sh, docs/gpu-runs.md), where the dispatcher takes these kernels for f32,
// d32 and dv != d, and for bf16/f16 with FLASHJVP_ATTENTION_PATH=sm80 (the tests' fallback checks, the
// benchmark's sm80 columns): the GPU tests against the f64 CPU reference and compute-sanitizer memcheck
// pass; racecheck passes on the f32 kernels and on the bf16 ones (sm80 forced; f16 is not in the
// sanitizers' workload). Not yet run on an sm_80 (A100) card. The softmax changes of SOFTMAX ARITHMETIC
// came after that run: emulator only so far.

namespace fj_attn {

enum { FULL = 0, NOKV = 1, FWD = 2 };

// Element strides of one operand viewed as [B, H, N, d] (the head dim contiguous).
struct Str {
    fj_i64 b, h, n;
};
// Where head (b, h) of an operand starts: blockIdx.y = b*H + h.
__device__ __forceinline__ fj_i64 head_offset(const Str& s, int bh, int H) {
    const int b = bh / H, h = bh - b * H;
    return (fj_i64)b * s.b + (fj_i64)h * s.h;
}

constexpr int NTHREADS = 128;
constexpr int BR = 64;  // query rows per block, tensor-core path

// SMALL SHARED MEMORY: a block may take 99 KiB of shared memory on sm_86, sm_89 and sm_12x (GeForce and
// workstation Ampere, Ada and Blackwell: RTX 3090/4090/5090, A6000, L40S, L4), 163 KiB or more on sm_80,
// sm_87, sm_90 and sm_100. There (FJ_SMEM_SMALL = 1: from __CUDA_ARCH__ under NVRTC, -DFJ_SMEM_SMALL=1
// for the emulator's sm_89) a kernel whose tiles would need more than FJ_SMEM_SMALL_BYTES halves its key
// tile until they fit (the full JVP at d >= 72: 64 -> 32 keys, 32 -> 16 at d = dv = 128); the host
// (attention.rs: key_tile) makes the same choice from the device's arch name.
#ifndef FJ_SMEM_SMALL
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 890 || __CUDA_ARCH__ >= 1200)
#define FJ_SMEM_SMALL 1
#else
#define FJ_SMEM_SMALL 0
#endif
#endif
constexpr int FJ_SMEM_SMALL_BYTES = 99 * 1024;

// Bytes of dynamic shared memory of a tensor-core kernel (the LAUNCH formula above) with nq Q tiles,
// nkv K/V tiles per stage, padded head dims dp, dvp and a key tile of bc keys.
constexpr int attn_smem_bytes(int nq, int nkv, int dp, int dvp, int bc) {
    return 2 * (nq * 64 * (dp + 8) + 2 * (nkv / 2) * bc * (dp + 8 + dvp + 8));
}

// Per (d, dv): padded head dims, key tile, whether Q/Qdot fragments live in registers.
template <int D, int DV, int MODE> struct Cfg {
    enum {
        DP = (D + 15) / 16 * 16,
        DVP = (DV + 15) / 16 * 16,
        NQ = MODE == FWD ? 1 : 2,    // Q (and Qdot) tiles
        NKV = MODE == FULL ? 4 : 2,  // K, V (and Kdot, Vdot) tiles per stage
        BC_LARGE = (D == 128 || DV == 128 || (MODE == NOKV && DV == 96)) ? 32 : 64,
        BC = !FJ_SMEM_SMALL || attn_smem_bytes(NQ, NKV, DP, DVP, BC_LARGE) <= FJ_SMEM_SMALL_BYTES ? BC_LARGE
             : BC_LARGE == 64 && attn_smem_bytes(NQ, NKV, DP, DVP, 32) <= FJ_SMEM_SMALL_BYTES   ? 32
                                                                                             : 16,
        SMEM = attn_smem_bytes(NQ, NKV, DP, DVP, BC),
        QREG = (D <= 64 && DV <= 64) ? 1 : 0,
    };
    static_assert(!FJ_SMEM_SMALL || SMEM <= FJ_SMEM_SMALL_BYTES, "small shared memory: the tiles do not fit");
};

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 / f16 storage).
// F16_VALUES (bf16 storage, with a tangent; attention_jvp{,_nokv}_bf16_vf16_d{D}): v and tv are the
// contiguous f16 copies written by attention_values_to_f16_bf16 (scaled by 2^-k, k = fj_values_exp of
// the max bits at vamax), and the value products (P V, (P.Sdot) V, P Vdot) run in f16, their P operands
// rounded to f16: the bf16 tangent's error falls to about its output rounding (common.cuh, F16 VALUE
// PRODUCTS). O and T come out in units of 2^-k and are stored times 2^k.
template <class ST, int D, int DV, int MODE, bool F16_VALUES = false>
__device__ __forceinline__ void attn_tc(const fj_u16* __restrict__ q, const fj_u16* __restrict__ k,
                                        const fj_u16* __restrict__ v, const fj_u16* __restrict__ tq,
                                        const fj_u16* __restrict__ tk, const fj_u16* __restrict__ tv,
                                        fj_u16* __restrict__ o, fj_u16* __restrict__ to, float* __restrict__ lse,
                                        float* __restrict__ tlse, int Nq, int Nk, float scale, int H, Str qs,
                                        Str ks, Str vs, Str os, const fj_u32* __restrict__ vamax = nullptr) {
    constexpr bool F16 = ST::IS_F16;
    static_assert(!F16_VALUES || (!F16 && MODE != FWD), "f16 value products: bf16 storage, with a tangent");
    constexpr bool VF16 = F16 || F16_VALUES;  // the type of the value products' operands
    constexpr bool TAN = MODE != FWD;   // a tangent is carried (qdot at least)
    constexpr bool KVT = MODE == FULL;  // k and v carry tangents
    constexpr bool P_EARLY = MODE == NOKV;  // P packed to 16 bits early (header: NOKV REGISTERS)
    typedef Cfg<D, DV, MODE> C;
    constexpr int DP = C::DP, DVP = C::DVP, BC = C::BC;
    constexpr bool QREG = C::QREG;
    constexpr int SS = DP + 8;       // shared row stride of Q, K tiles (16-byte padding against bank conflicts)
    constexpr int SV = DVP + 8;      // shared row stride of V tiles
    constexpr int NT = DVP / 8;      // 8-column n-tiles of the output accumulators
    constexpr int KC = DP / 16;      // 16-wide k-chunks of the head dim
    // The score loop over head-dim chunks is unrolled fully, except in nokv with Q re-read from shared
    // memory: 2 chunks at a time (1 at dv = 128 past d = 32) keep ptxas from hoisting every chunk's
    // loads, which spilled on sm_90a (header: NOKV REGISTERS).
    constexpr int KC_UNROLL = (QREG || MODE != NOKV) ? KC : (DV == 128 && KC > 2) ? 1 : 2;
    constexpr int NS = BC / 8;       // 8-key n-tiles of the score tile
    constexpr int NQ = TAN ? 2 : 1;  // Q (and Qdot) tiles
    constexpr int NKV = KVT ? 4 : 2; // K, V (and Kdot, Vdot) tiles per stage
    constexpr int KT = BC * SS;      // elements of one K tile
    constexpr int PAIR = BC * (SS + SV);        // one K tile and one V tile
    constexpr int STAGE = (NKV / 2) * PAIR;     // elements of one pipeline stage

    FJ_DYN_SMEM(fj_smem);
    fj_u16* sQ = reinterpret_cast<fj_u16*>(fj_smem);
    fj_u16* sQd = sQ + BR * SS;
    // Stage s holds K, V (, Kdot, Vdot) at sKV + s*STAGE + {0, KT, PAIR, PAIR + KT}.
    fj_u16* sKV = sQ + NQ * BR * SS;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int bh = blockIdx.y;
    const int q0 = blockIdx.x * BR;
    const fj_i64 koff = head_offset(ks, bh, H);
    const fj_i64 voff = head_offset(vs, bh, H);

    // Padding columns D..DP-1 (DV..DVP-1) of every shared tile are zero for the whole kernel (cp.async
    // never writes them), so the padded k-chunk contributes nothing and padded output columns come out 0.
    if (DP > D) {
        for (int r = tid; r < NQ * BR; r += NTHREADS)
#pragma unroll
            for (int c = D; c < DP; ++c) sQ[r * SS + c] = 0;
        for (int r = tid; r < 2 * (NKV / 2) * BC; r += NTHREADS) {
            fj_u16* row = sKV + (r / BC) * PAIR + (r % BC) * SS;
#pragma unroll
            for (int c = D; c < DP; ++c) row[c] = 0;
        }
    }
    if (DVP > DV) {
        for (int r = tid; r < 2 * (NKV / 2) * BC; r += NTHREADS) {
            fj_u16* row = sKV + (r / BC) * PAIR + KT + (r % BC) * SV;
#pragma unroll
            for (int c = DV; c < DVP; ++c) row[c] = 0;
        }
    }

    // Copy mapping of rows of CH 16-byte chunks: thread tid moves the chunk (tid % CH) of row tid / CH,
    // then the same chunk RP, 2 RP, ... rows further; the last 128 - RP*CH threads idle. Per thread only
    // one 64-bit offset is live, advanced by RP rows (RP times the operand's row stride) per pass. Q and
    // K rows have d/8 chunks, V rows dv/8 (the same mapping when dv == d).
    constexpr int CH = D / 8, CHV = DV / 8;
    constexpr int RP = NTHREADS / CH, RPV = NTHREADS / CHV;
    const bool cp_active = tid < RP * CH;
    const int cp_r0 = tid / CH;
    const int cp_col = (tid % CH) * 8;
    const fj_u32 cp_dst0 = fj_smem_addr(sQ + cp_r0 * SS + cp_col);
    const bool cpv_active = tid < RPV * CHV;
    const int cpv_r0 = tid / CHV;
    const int cpv_col = (tid % CHV) * 8;
    const fj_u32 cpv_dst0 = fj_smem_addr(sQ + cpv_r0 * SV + cpv_col);

    // Q (and Qdot) tile: rows >= Nq are zero-filled.
    if (cp_active) {
        fj_i64 off = head_offset(qs, bh, H) + (fj_i64)(q0 + cp_r0) * qs.n + cp_col;
#pragma unroll
        for (int i = 0; i < (BR + RP - 1) / RP; ++i, off += RP * qs.n) {
            const int r = cp_r0 + i * RP;
            if (r < BR) {
                const bool ok = q0 + r < Nq;
                fj_cp_async16(cp_dst0 + i * RP * SS * 2, ok ? q + off : q, ok ? 16 : 0);
                if (TAN) fj_cp_async16(cp_dst0 + (BR * SS + i * RP * SS) * 2, ok ? tq + off : tq, ok ? 16 : 0);
            }
        }
    }
    fj_cp_async_commit();

    // K, V (and Kdot, Vdot) tile `tile` into stage `stage`: rows >= Nk are zero-filled.
    auto load_kv = [&](int tile, int stage) {
        const int kv0 = tile * BC;
        if (cp_active) {
            fj_i64 off = koff + (fj_i64)(kv0 + cp_r0) * ks.n + cp_col;
            const fj_u32 dst0 = cp_dst0 + (NQ * BR * SS + stage * STAGE) * 2;
#pragma unroll
            for (int i = 0; i < (BC + RP - 1) / RP; ++i, off += RP * ks.n) {
                const int r = cp_r0 + i * RP;
                if (r < BC) {
                    const bool ok = kv0 + r < Nk;
                    const int n = ok ? 16 : 0;
                    const fj_u32 dst = dst0 + i * RP * SS * 2;
                    fj_cp_async16(dst, ok ? k + off : k, n);
                    if (KVT) fj_cp_async16(dst + PAIR * 2, ok ? tk + off : tk, n);
                }
            }
        }
        if (cpv_active) {
            fj_i64 off = voff + (fj_i64)(kv0 + cpv_r0) * vs.n + cpv_col;
            const fj_u32 dst0 = cpv_dst0 + (NQ * BR * SS + stage * STAGE + KT) * 2;
#pragma unroll
            for (int i = 0; i < (BC + RPV - 1) / RPV; ++i, off += RPV * vs.n) {
                const int r = cpv_r0 + i * RPV;
                if (r < BC) {
                    const bool ok = kv0 + r < Nk;
                    const int n = ok ? 16 : 0;
                    const fj_u32 dst = dst0 + i * RPV * SV * 2;
                    fj_cp_async16(dst, ok ? v + off : v, n);
                    if (KVT) fj_cp_async16(dst + PAIR * 2, ok ? tv + off : tv, n);
                }
            }
        }
    };

    const int ntiles = (Nk + BC - 1) / BC;
    if (ntiles > 0) load_kv(0, 0);
    fj_cp_async_commit();

    float acc_o[NT][4], acc_t[TAN ? NT : 1][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            acc_o[n][e] = 0.f;
            if (TAN) acc_t[n][e] = 0.f;
        }
    // Two query rows per thread: row g (fragment elements 0,1) and row g+8 (elements 2,3).
    // With a tangent, l_run and r_run are whole-row sums of p and p.sdot, reduced over the quad every
    // tile, and mu_run = r_run / l_run is the centre of T. The primal forward keeps this thread's
    // partial sum of p in l_run and reduces it over the quad at the end.
    float m_run[2] = {-FJ_INF, -FJ_INF}, l_run[2] = {0.f, 0.f}, r_run[2] = {0.f, 0.f};
    float mu_run[2] = {0.f, 0.f};
    // P_EARLY: this thread's partial sums of (p - p~) and (p - p~) sdot, p~ the rounded p.
    float dl[2] = {0.f, 0.f}, dr[2] = {0.f, 0.f};
    const float sl2 = scale * FJ_LOG2E;
    // Element h (0: low half) of a packed pair of storage values, as f32.
    auto half_of = [](fj_u32 w, int h) {
        if (VF16) return fj_f16_to_f32(h ? (fj_u16)(w >> 16) : (fj_u16)(w & 0xffffu));
        return __uint_as_float(__byte_perm(w, 0u, h ? 0x3244u : 0x1044u));  // bf16: an f32's top half
    };

    fj_u32 qf[QREG ? KC : 1][4], qdf[(QREG && TAN) ? KC : 1][4];

    // ldmatrix lane addressing (element offsets inside a tile):
    //   A operand (Q rows, head-dim columns): matrices (rows 0-7|8-15) x (cols 0-7|8-15), order
    //     a0 (r0-7,c0-7), a1 (r8-15,c0-7), a2 (r0-7,c8-15), a3 (r8-15,c8-15)
    //   B operand from K (keys as n, head dim as k), no transpose: b0,b1 of keys 0-7 then of keys 8-15
    //   B operand from V (keys as k, head dim as n), transposed: b0,b1 of cols 0-7 then of cols 8-15
    const int a_off = (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * SS + (lane >> 4) * 8;
    const int k_off = ((lane & 7) + (lane >> 4) * 8) * SS + ((lane >> 3) & 1) * 8;
    const int v_off = ((lane & 7) + ((lane >> 3) & 1) * 8) * SV + (lane >> 4) * 8;
    const fj_u32 sQ_a = fj_smem_addr(sQ + a_off);
    const fj_u32 sQd_a = fj_smem_addr(sQd + a_off);

    for (int j = 0; j < ntiles; ++j) {
        if (j + 1 < ntiles) load_kv(j + 1, (j + 1) & 1);
        fj_cp_async_commit();
        fj_cp_async_wait<1>();  // everything but the prefetch just issued: Q and tile j are in
        __syncthreads();

        if (QREG && j == 0) {
#pragma unroll
            for (int kc = 0; kc < KC; ++kc) {
                fj_ldmatrix_x4(qf[kc], sQ_a + kc * 32);
                if (TAN) fj_ldmatrix_x4(qdf[kc], sQd_a + kc * 32);
            }
        }

        const fj_u16* sK = sKV + (j & 1) * STAGE;
        const fj_u32 sK_k = fj_smem_addr(sK + k_off);
        const fj_u32 sKd_k = sK_k + PAIR * 2;
        const fj_u32 sV_v = fj_smem_addr(sK + KT + v_off);
        const fj_u32 sVd_v = sV_v + PAIR * 2;
        // ---- scores: S = Q K^T, Sdot = Qdot K^T (+ Q Kdot^T) ----
        float s[NS][4], sd[TAN ? NS : 1][4];
        // With a tangent, P and P.(Sdot - mu) are packed to 16-bit mma operands during the softmax.
        fj_u32 pk[TAN ? BC / 16 : 1][4], psk[TAN ? BC / 16 : 1][4];
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = 0.f;
                if (TAN) sd[n][e] = 0.f;
            }
#pragma unroll KC_UNROLL
        for (int kc = 0; kc < KC; ++kc) {
            fj_u32 a[4], ad[4];
            if (QREG) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    a[e] = qf[QREG ? kc : 0][e];
                    if (TAN) ad[e] = qdf[(QREG && TAN) ? kc : 0][e];
                }
            } else {
                fj_ldmatrix_x4(a, sQ_a + kc * 32);
                if (TAN) fj_ldmatrix_x4(ad, sQd_a + kc * 32);
            }
#pragma unroll
            for (int n2 = 0; n2 < BC / 16; ++n2) {
                fj_u32 b[4];
                fj_ldmatrix_x4(b, sK_k + (n2 * 16 * SS + kc * 16) * 2);
                fj_mma16816<F16>(s[2 * n2], a, b[0], b[1]);
                fj_mma16816<F16>(s[2 * n2 + 1], a, b[2], b[3]);
                if (TAN) {
                    fj_mma16816<F16>(sd[2 * n2], ad, b[0], b[1]);
                    fj_mma16816<F16>(sd[2 * n2 + 1], ad, b[2], b[3]);
                }
                if (KVT) {
                    fj_u32 bd[4];
                    fj_ldmatrix_x4(bd, sKd_k + (n2 * 16 * SS + kc * 16) * 2);
                    fj_mma16816<F16>(sd[2 * n2], a, bd[0], bd[1]);
                    fj_mma16816<F16>(sd[2 * n2 + 1], a, bd[2], bd[3]);
                }
            }
        }

        // ---- mask key tail, online softmax ----
        // The running max stays in raw score units; p = exp2(s*c*log2e - m*c*log2e) is one FFMA
        // and an ex2 per element (the scores are never scaled on their own). Likewise sd holds the
        // tangent scores without the factor c: r_run (and dr) sum p.sd in those raw units, and the
        // centring applies c in the FFMA that subtracts mu.
        const int kv0 = j * BC;
        // LEAN (SOFTMAX ARITHMETIC in the header) everywhere but the P_EARLY (nokv) kernels: there it spilled
        // 8-24 bytes at dv = 128 (ptxas, NVRTC 13.0), so they keep the scaled sd, the IEEE division and the
        // rescale of every tile.
        constexpr bool LEAN = !P_EARLY;
#pragma unroll
        for (int n = 0; n < NS && TAN && !LEAN; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) sd[TAN ? n : 0][e] *= scale;
        if (kv0 + BC > Nk) {  // key tail (last tile only)
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (kv0 + n * 8 + 2 * t4 + (e & 1) >= Nk) {
                        s[n][e] = -FJ_INF;
                        if (TAN) sd[n][e] = 0.f;
                    }
        }
        float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
        for (int n = 0; n < NS; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
        float m_off[2], alpha[2];
        bool grew = false;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            grew |= mx[i] > m_run[i];
            const float m_new = (mx[i] == -FJ_INF) ? 0.f : mx[i];
            alpha[i] = fj_exp2((m_run[i] - m_new) * sl2);
            m_off[i] = -m_new * sl2;  // the exponent's offset: p = exp2(s*sl2 + m_off)
            m_run[i] = mx[i];
            if (!TAN) l_run[i] *= alpha[i];
        }
        // Rescale only when a max grew: if no row of this warp has a new running max, alpha is exactly 1
        // and O (and T's alpha) need no multiply; the test is warp-uniform, so the skip is a branch.
        const bool rescale = !LEAN || __any_sync(0xffffffffu, grew);
        if (TAN) {
            // This tile's p; the whole-row sums of p and p.sdot (over the quad that shares the row)
            // give the new centre mu, then T moves from the old centre: T += (mu_old - mu_new) O.
            // P_EARLY (nokv, for registers; see the header): P is packed at once and the f32 tile dies;
            // the sums and P.(Sdot - mu) then take the rounded p~ the products see. Else the f32 p.
            float lt[2] = {0.f, 0.f}, rt[2] = {0.f, 0.f};
#pragma unroll
            for (int i = 0; i < 2 && P_EARLY; ++i) {
                dl[i] *= alpha[i];
                dr[i] *= alpha[i];
            }
#pragma unroll
            for (int n = 0; n < NS; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[n][e] = fj_exp2(fmaf(s[n][e], sl2, m_off[e >> 1]));
                if (P_EARLY) {
                    pk[TAN ? n >> 1 : 0][(n & 1) * 2] = fj_pack2<VF16>(s[n][0], s[n][1]);
                    pk[TAN ? n >> 1 : 0][(n & 1) * 2 + 1] = fj_pack2<VF16>(s[n][2], s[n][3]);
                }
            }
#pragma unroll
            for (int n = 0; n < NS; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = P_EARLY ? half_of(pk[TAN ? n >> 1 : 0][(n & 1) * 2 + (e >> 1)], e & 1) : s[n][e];
                    lt[e >> 1] += p;
                    rt[e >> 1] += p * sd[TAN ? n : 0][e];
                    if (P_EARLY) {  // what rounding took from p, for lse and tlse
                        const float dp = s[n][e] - p;
                        dl[e >> 1] += dp;
                        dr[e >> 1] += dp * sd[TAN ? n : 0][e];
                    }
                }
            }
            float dmu[2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                lt[i] += __shfl_xor_sync(0xffffffffu, lt[i], 1);
                lt[i] += __shfl_xor_sync(0xffffffffu, lt[i], 2);
                rt[i] += __shfl_xor_sync(0xffffffffu, rt[i], 1);
                rt[i] += __shfl_xor_sync(0xffffffffu, rt[i], 2);
                l_run[i] = l_run[i] * alpha[i] + lt[i];
                r_run[i] = r_run[i] * alpha[i] + rt[i];
                // LEAN: r in raw units, and an approximate division (2 ulp: an IEEE one costs a range check
                // and a slow-path call).
                const float mu_new =
                    l_run[i] > 0.f ? (LEAN ? __fdividef(scale * r_run[i], l_run[i]) : r_run[i] / l_run[i]) : 0.f;
                dmu[i] = mu_run[i] - mu_new;
                mu_run[i] = mu_new;
            }
            if (rescale) {
#pragma unroll
                for (int n = 0; n < NT; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        acc_o[n][e] *= alpha[e >> 1];
                        acc_t[TAN ? n : 0][e] = fmaf(acc_t[TAN ? n : 0][e], alpha[e >> 1], dmu[e >> 1] * acc_o[n][e]);
                    }
            } else {  // alpha == 1: only the move of the centre
#pragma unroll
                for (int n = 0; n < NT; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        acc_t[TAN ? n : 0][e] = fmaf(dmu[e >> 1], acc_o[n][e], acc_t[TAN ? n : 0][e]);
            }
#pragma unroll
            for (int n = 0; n < NS; ++n) {
                float ps[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = P_EARLY ? half_of(pk[TAN ? n >> 1 : 0][(n & 1) * 2 + (e >> 1)], e & 1) : s[n][e];
                    ps[e] = p * (LEAN ? fmaf(sd[TAN ? n : 0][e], scale, -mu_run[e >> 1]) : sd[TAN ? n : 0][e] - mu_run[e >> 1]);
                }
                if (!P_EARLY) {
                    pk[TAN ? n >> 1 : 0][(n & 1) * 2] = fj_pack2<VF16>(s[n][0], s[n][1]);
                    pk[TAN ? n >> 1 : 0][(n & 1) * 2 + 1] = fj_pack2<VF16>(s[n][2], s[n][3]);
                }
                psk[TAN ? n >> 1 : 0][(n & 1) * 2] = fj_pack2<VF16>(ps[0], ps[1]);
                psk[TAN ? n >> 1 : 0][(n & 1) * 2 + 1] = fj_pack2<VF16>(ps[2], ps[3]);
            }
        } else {  // primal forward
#pragma unroll
            for (int n = 0; n < NT && rescale; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_o[n][e] *= alpha[e >> 1];
#pragma unroll
            for (int n = 0; n < NS; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = fj_exp2(fmaf(s[n][e], sl2, m_off[e >> 1]));
                    s[n][e] = p;
                    l_run[e >> 1] += p;
                }
        }

        // ---- O += P V ; T += P Vdot + (P.Sdot) V ----
#pragma unroll
        for (int kc2 = 0; kc2 < BC / 16; ++kc2) {
            fj_u32 pa[4], psa[4];
            if (TAN) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    pa[e] = pk[TAN ? kc2 : 0][e];
                    psa[e] = psk[TAN ? kc2 : 0][e];
                }
            } else {
                pa[0] = fj_pack2<VF16>(s[2 * kc2][0], s[2 * kc2][1]);
                pa[1] = fj_pack2<VF16>(s[2 * kc2][2], s[2 * kc2][3]);
                pa[2] = fj_pack2<VF16>(s[2 * kc2 + 1][0], s[2 * kc2 + 1][1]);
                pa[3] = fj_pack2<VF16>(s[2 * kc2 + 1][2], s[2 * kc2 + 1][3]);
            }
#pragma unroll
            for (int n2 = 0; n2 < DVP / 16; ++n2) {
                fj_u32 b[4];
                fj_ldmatrix_x4_trans(b, sV_v + (kc2 * 16 * SV + n2 * 16) * 2);
                fj_mma16816<VF16>(acc_o[2 * n2], pa, b[0], b[1]);
                fj_mma16816<VF16>(acc_o[2 * n2 + 1], pa, b[2], b[3]);
                if (TAN) {
                    fj_mma16816<VF16>(acc_t[TAN ? 2 * n2 : 0], psa, b[0], b[1]);
                    fj_mma16816<VF16>(acc_t[TAN ? 2 * n2 + 1 : 0], psa, b[2], b[3]);
                }
                if (KVT) {
                    fj_u32 bd[4];
                    fj_ldmatrix_x4_trans(bd, sVd_v + (kc2 * 16 * SV + n2 * 16) * 2);
                    fj_mma16816<VF16>(acc_t[TAN ? 2 * n2 : 0], pa, bd[0], bd[1]);
                    fj_mma16816<VF16>(acc_t[TAN ? 2 * n2 + 1 : 0], pa, bd[2], bd[3]);
                }
            }
        }
        __syncthreads();  // stage j&1 is refilled by the next iteration's prefetch
    }
    fj_cp_async_wait<0>();

    // ---- finish: quad-reduce l for the primal forward (each thread summed its own columns), normalise,
    // store ----
    float vunit = 1.f;  // the unit of O and T: 2^k on the f16 copies, else 1
    if constexpr (F16_VALUES) vunit = fj_values_unit(*vamax);
#pragma unroll
    for (int i = 0; i < 2 && !TAN; ++i) {
        l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 1);
        l_run[i] += __shfl_xor_sync(0xffffffffu, l_run[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2 && P_EARLY; ++i) {
        dl[i] += __shfl_xor_sync(0xffffffffu, dl[i], 1);
        dl[i] += __shfl_xor_sync(0xffffffffu, dl[i], 2);
        dr[i] += __shfl_xor_sync(0xffffffffu, dr[i], 1);
        dr[i] += __shfl_xor_sync(0xffffffffu, dr[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = q0 + warp * 16 + g + 8 * i;
        if (row >= Nq) continue;
        const float inv_l = (l_run[i] > 0.f ? 1.f / l_run[i] : 0.f) * vunit;  // * 2^k: F16_VALUES
        const fj_i64 roff = head_offset(os, bh, H) + (fj_i64)row * os.n;
#pragma unroll
        for (int n = 0; n < DV / 8; ++n) {  // n-tiles at or past dv (padding) are not stored
            const int col = n * 8 + 2 * t4;
            const float o0 = acc_o[n][2 * i] * inv_l, o1 = acc_o[n][2 * i + 1] * inv_l;
            *reinterpret_cast<fj_u32*>(o + roff + col) = (fj_u32)ST::store(o0) | ((fj_u32)ST::store(o1) << 16);
            if (TAN) {
                // Centred, T/l is odot itself: no cancellation against mu o.
                const float t0 = acc_t[TAN ? n : 0][2 * i] * inv_l;
                const float t1 = acc_t[TAN ? n : 0][2 * i + 1] * inv_l;
                *reinterpret_cast<fj_u32*>(to + roff + col) = (fj_u32)ST::store(t0) | ((fj_u32)ST::store(t1) << 16);
            }
        }
        if (t4 == 0) {
            // lse and tlse of the f32 p (P_EARLY: l and r summed the rounded p; add back the rest).
            const float lf = l_run[i] + dl[i], rf = r_run[i] + dr[i];
            const fj_i64 li = (fj_i64)bh * Nq + row;
            lse[li] = lf > 0.f ? m_run[i] * scale + logf(lf) : -FJ_INF;  // m_run in raw score units
            // LEAN: r in raw units (sd without c); the P_EARLY kernels scaled sd.
            if (TAN) tlse[li] = lf > 0.f ? (P_EARLY ? rf / lf : scale * rf / lf) : 0.f;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// f32 storage: plain FMA, simple and exact in f32.
constexpr int F_BR = 16;  // query rows per block (4 warps x 4 rows)
constexpr int F_RW = 4;   // query rows per warp
constexpr int F_BC = 32;  // keys per tile (one per lane)

template <int D, int DV, int MODE>
__device__ __forceinline__ void attn_f32(const float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v, const float* __restrict__ tq,
                                         const float* __restrict__ tk, const float* __restrict__ tv,
                                         float* __restrict__ o, float* __restrict__ to, float* __restrict__ lse,
                                         float* __restrict__ tlse, int Nq, int Nk, float scale, int H, Str qs,
                                         Str ks, Str vs, Str os) {
    constexpr bool TAN = MODE != FWD;
    constexpr bool KVT = MODE == FULL;
    constexpr int CPL = (DV + 31) / 32;  // output columns per lane
    constexpr int VS = CPL * 32;         // V row stride (columns >= dv zero)
    constexpr int KS = D + 1;           // K row stride (odd: lane = key reads are conflict-free)
    constexpr int NQ = TAN ? 2 : 1;

    FJ_DYN_SMEM(fj_smem);
    float* sQ = reinterpret_cast<float*>(fj_smem);  // [F_BR][D]
    float* sQd = sQ + F_BR * D;                     // [F_BR][D]
    float* sK = sQ + NQ * F_BR * D;                 // [F_BC][KS]
    float* sKd = sK + F_BC * KS;                    // [F_BC][KS] (full only)
    float* sV = sK + (KVT ? 2 : 1) * F_BC * KS;     // [F_BC][VS]
    float* sVd = sV + F_BC * VS;                    // [F_BC][VS] (full only)

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int bh = blockIdx.y;
    const int q0 = blockIdx.x * F_BR;
    const fj_i64 qoff = head_offset(qs, bh, H);
    const fj_i64 koff = head_offset(ks, bh, H);
    const fj_i64 voff = head_offset(vs, bh, H);

    for (int c = tid; c < F_BR * D; c += NTHREADS) {
        const int r = c / D, col = c % D, gr = q0 + r;
        const bool ok = gr < Nq;
        sQ[c] = ok ? q[qoff + (fj_i64)gr * qs.n + col] : 0.f;
        if (TAN) sQd[c] = ok ? tq[qoff + (fj_i64)gr * qs.n + col] : 0.f;
    }

    float acc_o[F_RW][CPL], acc_t[F_RW][CPL];
    float m_run[F_RW], l_run[F_RW], r_run[F_RW];
#pragma unroll
    for (int i = 0; i < F_RW; ++i) {
        m_run[i] = -FJ_INF;
        l_run[i] = 0.f;
        r_run[i] = 0.f;
#pragma unroll
        for (int c = 0; c < CPL; ++c) acc_o[i][c] = acc_t[i][c] = 0.f;
    }
    const float sl2 = scale * FJ_LOG2E;

    for (int kv0 = 0; kv0 < Nk; kv0 += F_BC) {
        __syncthreads();  // previous tile fully consumed (and, the first time, Q stored)
        for (int c = tid; c < F_BC * D; c += NTHREADS) {
            const int r = c / D, col = c % D, gr = kv0 + r;
            const bool ok = gr < Nk;
            const fj_i64 off = koff + (fj_i64)gr * ks.n + col;
            sK[r * KS + col] = ok ? k[off] : 0.f;
            if (KVT) sKd[r * KS + col] = ok ? tk[off] : 0.f;
        }
        for (int c = tid; c < F_BC * VS; c += NTHREADS) {
            const int r = c / VS, col = c % VS, gr = kv0 + r;
            const bool ok = gr < Nk && col < DV;
            const fj_i64 off = voff + (fj_i64)gr * vs.n + col;
            sV[c] = ok ? v[off] : 0.f;
            if (KVT) sVd[c] = ok ? tv[off] : 0.f;
        }
        __syncthreads();
        const bool key_ok = kv0 + lane < Nk;
#pragma unroll
        for (int i = 0; i < F_RW; ++i) {
            const float* qr = sQ + (warp * F_RW + i) * D;
            const float* qdr = sQd + (warp * F_RW + i) * D;
            const float* kr = sK + lane * KS;
            const float* kdr = sKd + lane * KS;
            float s = 0.f, sd = 0.f;
#pragma unroll 8
            for (int d = 0; d < D; ++d) {
                s = fmaf(qr[d], kr[d], s);
                if (TAN) sd = fmaf(qdr[d], kr[d], sd);
                if (KVT) sd = fmaf(qr[d], kdr[d], sd);
            }
            s = key_ok ? s * sl2 : -FJ_INF;
            sd = key_ok ? sd * scale : 0.f;
            const float mx = fmaxf(m_run[i], fj_warp_max(s));
            const float m_use = (mx == -FJ_INF) ? 0.f : mx;
            const float alpha = fj_exp2(m_run[i] - m_use);
            m_run[i] = mx;
            const float p = fj_exp2(s - m_use);
            const float ps = p * sd;
            l_run[i] = l_run[i] * alpha + fj_warp_sum(p);
            if (TAN) r_run[i] = r_run[i] * alpha + fj_warp_sum(ps);
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                acc_o[i][c] *= alpha;
                acc_t[i][c] *= alpha;
            }
#pragma unroll 4
            for (int jj = 0; jj < F_BC; ++jj) {
                const float pj = __shfl_sync(0xffffffffu, p, jj);
                const float psj = TAN ? __shfl_sync(0xffffffffu, ps, jj) : 0.f;
#pragma unroll
                for (int c = 0; c < CPL; ++c) {
                    const float vv = sV[jj * VS + c * 32 + lane];
                    acc_o[i][c] = fmaf(pj, vv, acc_o[i][c]);
                    if (TAN) acc_t[i][c] = fmaf(psj, vv, acc_t[i][c]);
                    if (KVT) acc_t[i][c] = fmaf(pj, sVd[jj * VS + c * 32 + lane], acc_t[i][c]);
                }
            }
        }
    }

#pragma unroll
    for (int i = 0; i < F_RW; ++i) {
        const int row = q0 + warp * F_RW + i;
        if (row >= Nq) continue;
        const float inv_l = l_run[i] > 0.f ? 1.f / l_run[i] : 0.f;
        const float mu = r_run[i] * inv_l;
        const fj_i64 roff = head_offset(os, bh, H) + (fj_i64)row * os.n;
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            const int col = c * 32 + lane;
            if (col < DV) {
                const float oo = acc_o[i][c] * inv_l;
                o[roff + col] = oo;
                if (TAN) to[roff + col] = acc_t[i][c] * inv_l - mu * oo;
            }
        }
        if (lane == 0) {
            const fj_i64 li = (fj_i64)bh * Nq + row;
            lse[li] = l_run[i] > 0.f ? m_run[i] * FJ_LN2 + logf(l_run[i]) : -FJ_INF;
            if (TAN) tlse[li] = mu;
        }
    }
}

}  // namespace fj_attn

// ---------------------------------------------------------------------------------------------
// The layout parameters every entry point ends with (H, then the [B, H, N, d] element strides of q, k,
// v, o; tangents share their primal's), and how they reach the templates.
#define FJ_ATTN_LAYOUT                                                                                          \
    int H, fj_i64 q_sb, fj_i64 q_sh, fj_i64 q_sn, fj_i64 k_sb, fj_i64 k_sh, fj_i64 k_sn, fj_i64 v_sb, fj_i64 v_sh, \
        fj_i64 v_sn, fj_i64 o_sb, fj_i64 o_sh, fj_i64 o_sn
#define FJ_ATTN_LAYOUT_ARGS                                                                                     \
    H, fj_attn::Str{q_sb, q_sh, q_sn}, fj_attn::Str{k_sb, k_sh, k_sn}, fj_attn::Str{v_sb, v_sh, v_sn},          \
        fj_attn::Str{o_sb, o_sh, o_sn}

// ---------------------------------------------------------------------------------------------
// Entry points: one per (variant, dtype, d, dv); SUF is the name's head-dim part (_d64, _d64_dv128).
#define FJ_ATTN_TC(DT, ST, D, DV, SUF)                                                                              \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                            \
        attention_jvp_##DT##SUF(const fj_u16* q, const fj_u16* k, const fj_u16* v, const fj_u16* tq,                \
                                const fj_u16* tk, const fj_u16* tv, fj_u16* o, fj_u16* to, float* lse,              \
                                float* tlse, int Nq, int Nk, float scale, FJ_ATTN_LAYOUT) {                         \
        fj_attn::attn_tc<ST, D, DV, fj_attn::FULL>(q, k, v, tq, tk, tv, o, to, lse, tlse, Nq, Nk, scale,            \
                                                    FJ_ATTN_LAYOUT_ARGS);                                           \
    }                                                                                                               \
    FJ_REGISTER(attention_jvp_##DT##SUF)                                                                            \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                            \
        attention_jvp_nokv_##DT##SUF(const fj_u16* q, const fj_u16* k, const fj_u16* v, const fj_u16* tq,           \
                                     fj_u16* o, fj_u16* to, float* lse, float* tlse, int Nq, int Nk,                \
                                     float scale, FJ_ATTN_LAYOUT) {                                                 \
        fj_attn::attn_tc<ST, D, DV, fj_attn::NOKV>(q, k, v, tq, nullptr, nullptr, o, to, lse, tlse, Nq, Nk,         \
                                                    scale, FJ_ATTN_LAYOUT_ARGS);                                    \
    }                                                                                                               \
    FJ_REGISTER(attention_jvp_nokv_##DT##SUF)                                                                       \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                            \
        attention_fwd_##DT##SUF(const fj_u16* q, const fj_u16* k, const fj_u16* v, fj_u16* o, float* lse, int Nq,   \
                                int Nk, float scale, FJ_ATTN_LAYOUT) {                                              \
        fj_attn::attn_tc<ST, D, DV, fj_attn::FWD>(q, k, v, nullptr, nullptr, nullptr, o, nullptr, lse, nullptr,     \
                                                   Nq, Nk, scale, FJ_ATTN_LAYOUT_ARGS);                             \
    }                                                                                                               \
    FJ_REGISTER(attention_fwd_##DT##SUF)

#define FJ_ATTN_F32(D, DV, SUF)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                            \
        attention_jvp_f32##SUF(const float* q, const float* k, const float* v, const float* tq, const float* tk,    \
                               const float* tv, float* o, float* to, float* lse, float* tlse, int Nq, int Nk,       \
                               float scale, FJ_ATTN_LAYOUT) {                                                       \
        fj_attn::attn_f32<D, DV, fj_attn::FULL>(q, k, v, tq, tk, tv, o, to, lse, tlse, Nq, Nk, scale,               \
                                                FJ_ATTN_LAYOUT_ARGS);                                               \
    }                                                                                                               \
    FJ_REGISTER(attention_jvp_f32##SUF)                                                                             \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                            \
        attention_jvp_nokv_f32##SUF(const float* q, const float* k, const float* v, const float* tq, float* o,      \
                                    float* to, float* lse, float* tlse, int Nq, int Nk, float scale,                \
                                    FJ_ATTN_LAYOUT) {                                                               \
        fj_attn::attn_f32<D, DV, fj_attn::NOKV>(q, k, v, tq, nullptr, nullptr, o, to, lse, tlse, Nq, Nk, scale,     \
                                                FJ_ATTN_LAYOUT_ARGS);                                               \
    }                                                                                                               \
    FJ_REGISTER(attention_jvp_nokv_f32##SUF)                                                                        \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                            \
        attention_fwd_f32##SUF(const float* q, const float* k, const float* v, float* o, float* lse, int Nq,        \
                               int Nk, float scale, FJ_ATTN_LAYOUT) {                                               \
        fj_attn::attn_f32<D, DV, fj_attn::FWD>(q, k, v, nullptr, nullptr, nullptr, o, nullptr, lse, nullptr, Nq,    \
                                               Nk, scale, FJ_ATTN_LAYOUT_ARGS);                                     \
    }                                                                                                               \
    FJ_REGISTER(attention_fwd_f32##SUF)

// All three dtypes of one (d, dv) pair.
// The f16-value-products JVPs (bf16, d == dv; attn_tc's F16_VALUES): the bf16 JVP signatures plus the
// address of the copies' max bits.
#define FJ_ATTN_VF16(D)                                                                                             \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                            \
        attention_jvp_bf16_vf16_d##D(const fj_u16* q, const fj_u16* k, const fj_u16* v, const fj_u16* tq,           \
                                     const fj_u16* tk, const fj_u16* tv, fj_u16* o, fj_u16* to, float* lse,         \
                                     float* tlse, int Nq, int Nk, float scale, FJ_ATTN_LAYOUT,                      \
                                     const fj_u32* vamax) {                                                         \
        fj_attn::attn_tc<FjBF16, D, D, fj_attn::FULL, true>(q, k, v, tq, tk, tv, o, to, lse, tlse, Nq, Nk, scale,   \
                                                            FJ_ATTN_LAYOUT_ARGS, vamax);                            \
    }                                                                                                               \
    FJ_REGISTER(attention_jvp_bf16_vf16_d##D)                                                                       \
    extern "C" __global__ void __launch_bounds__(128, 1)                                                            \
        attention_jvp_nokv_bf16_vf16_d##D(const fj_u16* q, const fj_u16* k, const fj_u16* v, const fj_u16* tq,      \
                                          fj_u16* o, fj_u16* to, float* lse, float* tlse, int Nq, int Nk,           \
                                          float scale, FJ_ATTN_LAYOUT, const fj_u32* vamax) {                       \
        fj_attn::attn_tc<FjBF16, D, D, fj_attn::NOKV, true>(q, k, v, tq, nullptr, nullptr, o, to, lse, tlse, Nq,    \
                                                            Nk, scale, FJ_ATTN_LAYOUT_ARGS, vamax);                 \
    }                                                                                                               \
    FJ_REGISTER(attention_jvp_nokv_bf16_vf16_d##D)

#define FJ_ATTN_ALL(D, DV, SUF) FJ_ATTN_TC(bf16, FjBF16, D, DV, SUF) FJ_ATTN_TC(f16, FjF16, D, DV, SUF) FJ_ATTN_F32(D, DV, SUF)
#define FJ_ATTN_SAME(D) FJ_ATTN_ALL(D, D, _d##D)
#define FJ_ATTN_PAIR(D, DV) FJ_ATTN_ALL(D, DV, _d##D##_dv##DV)
