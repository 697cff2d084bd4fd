// layernorm_mod.cu: layernorm without affine, followed by adaLN modulation, with its JVP and backward.
//
// MATH (row x of C values, statistics in f32, eps added to the variance):
//   mu = mean(x), var = mean((x - mu)^2), rstd = 1/sqrt(var + eps), xhat = (x - mu) rstd
//   y = xhat (1 + scale) + shift
//   JVP:  xhat_dot = (x_dot - mean(x_dot) - xhat mean(xhat x_dot)) rstd
//         y_dot = xhat_dot (1 + scale) + xhat scale_dot + shift_dot
//   Backward (cotangent dy):  g = dy (1 + scale)
//         dx = (g - mean(g) - xhat mean(g xhat)) rstd      (the Jacobian of xhat is symmetric)
//         dscale[grp, c] = sum over the rows of the group of dy xhat ;  dshift[grp, c] = sum of dy
// Variance is taken two-pass (mean first, then squared deviations), not as E[x^2] - mu^2.
//
// GROUPS: scale, shift and their tangents are f32 [G, C] (the time path is f32, DESIGN.md section 4);
// G divides T and row t uses group t / (T / G): G = 1 is one vector for all rows, G = T one per row,
// G = batch for [B, N, C] activations. Any of scale, shift, x_dot, scale_dot, shift_dot may be null,
// meaning zero; mean and rstd outputs may be null (not written).
//
// TILING: one warp per row, blockDim.x / 32 rows per block (8: 256 threads, unless the host is told
// otherwise: layernorm.rs, FLASHJVP_LN_ROWS_PER_BLOCK). Each lane walks the row in chunks of 16
// bytes (8 bf16/f16 values, 4 f32); when C is a multiple of the chunk and every row pointer is 16-byte
// aligned the chunk is one vector access, otherwise element by element with the tail masked. When the
// row is vector-accessible and fits (C <= 1536 for the bf16/f16 JVP, 3072 for the forward and backward;
// half that in f32) each lane keeps its chunks in registers and every input is read from memory once;
// otherwise the row is streamed three times (sum, squared deviations, output; the backward twice), the
// later reads mostly from L1/L2. Both give the same results (same sums in the same order).
// The parameter gradients are a column reduction: a block of 32 columns x 8 row-lanes sums a slice of the
// rows of one group in f32, then adds its partial with one f32 atomicAdd per column.
//
// LAUNCH:
//   layernorm_mod_fwd_{dt}(x, scale, shift, y, mean, rstd, T, C, G, eps)
//   layernorm_mod_jvp_{dt}(x, tx, scale, shift, tscale, tshift, y, ty, mean, rstd, T, C, G, eps)
//   residual_layernorm_mod_fwd_{dt}(x, y, gate, x1, scale, shift, h, mean, rstd, T, C, G, eps)
//   residual_layernorm_mod_jvp_{dt}(x, tx, y, ty, gate, tgate, x1, tx1, scale, shift, tscale, tshift, h, th,
//                                   mean, rstd, T, C, G, eps): the gated residual x1 = x + gate y fused in
//       front (gate, tgate f32 [G, C]; ty, tgate may be null), x1 (tx1) written, h = layernorm(x1).
//   layernorm_mod_jvp_wide_{dt}, residual_layernorm_mod_jvp_wide_{dt}: the same parameters, 8 register
//       chunks per lane instead of 6 (see Chunks), for rows between the two register limits.
//   layernorm_mod_bwd_{dt}(dy, x, scale, mean, rstd, dres, dx, T, C, G): dx = dres + the layernorm's
//       input cotangent (dres may be null, or equal to dx: accumulated in place).
//       grid = (ceil(T / R), 1, 1), block = (32 R, 1, 1) with R rows per block (8 by default; 1..8), no
//       shared memory (all the row kernels).
//   layernorm_mod_bwd_params_{dt}(dy, x, mean, rstd, dscale, dshift, T, C, G)
//       grid = (ceil(C / 32), G, S), block = (32, 8, 1), no dynamic shared memory.
//       S >= 1 splits the T/G rows of each group into S slices (S = ceil((T/G) / 256) keeps every SM
//       busy); dscale and dshift (f32 [G, C], either may be null) must be zeroed before the launch, each
//       block adds its partial sums with atomicAdd (with S = 1 the result is deterministic).
//   x, y, tx, ty, dy, dx: [T, C] in the storage dtype; mean, rstd: [T] f32 (the backward needs the
//   forward's); T, C, G int, eps f32. dt in {bf16, f16, f32}.
//
// STATUS: compiled for sm_80 and sm_90a with NVRTC 13.0 (see README.md); ran on an NVIDIA H200 (2026-11-27):
// the GPU tests against the CPU reference and compute-sanitizer memcheck/racecheck pass
// (scripts/gpu/check.sh). Speed there (bf16, docs/gpu-runs.md): the JVP at 0.59 and 0.64 of a device
// copy's bandwidth (cache hints, 4 rows per block; the issue's 0.60 met at [32768, 1152], not at
// [8192, 1536]), the forward at 0.48-0.51, the backward at 0.29-0.36. The hints and 4-row blocks passed
// the GPU tests there (as layernorm_mod_jvp_hints, since folded into layernorm_mod_jvp), not yet the
// sanitizers.
#include "common.cuh"

namespace fj_ln {


template <class ST>
__device__ __forceinline__ bool vec_ok(int C, const void* a, const void* b, const void* c, const void* d,
                                       const void* e, const void* f, const void* g, const void* h) {
    // f32 modulation rows need 16-byte alignment too: C % 8 == 0 (16-bit) or C % 4 == 0 (f32) keeps
    // every row start aligned when the base is.
    return (C % ST::V) == 0 && fj_aligned16(a) && fj_aligned16(b) && fj_aligned16(c) && fj_aligned16(d) &&
           fj_aligned16(e) && fj_aligned16(f) && fj_aligned16(g) && fj_aligned16(h);
}

template <int V>
__device__ __forceinline__ void load_mod(const float* row, int i, int C, bool vec, float (&out)[V]) {
    if (row) fj_load_chunk_f32<V>(row, i, C, vec, out);
    else {
#pragma unroll
        for (int e = 0; e < V; ++e) out[e] = 0.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Register-resident rows: lane `lane` holds the 16-byte chunks ch*32 + lane (ch < NCH) of the row, so
// each input is read from memory once. Taken when the row fits (C <= 32 * V * NCH) and every row is
// vector-accessible; the same sums in the same order as the streaming path, so the same results.
// Chunks per lane N: 12 for the forward and backward (C <= 3072 in bf16/f16, 1536 in f32), 6 for the
// JVP, which holds two rows (C <= 1536 / 768: DiT-XL's 1152 and the 1536 of the block benchmark). With 8
// chunks the JVP kernels take 180-190 registers on sm_90a, one block (8 warps) per SM, so a block's
// reductions and stores cannot overlap another's loads; with 6 and __launch_bounds__(256, 2) they fit
// 128 (bf16: 4-24 bytes of spill on one arch each, in L1), two blocks per SM. The *_jvp_wide kernels keep
// 8 chunks (C <= 2048 / 1024, one block per SM) for rows between the two limits; the host picks by C
// (layernorm.rs: JvpRows), and FLASHJVP_LN_JVP_ROWS=wide|narrow forces one, so that a GPU run can time
// both on the same rows. Timed on the H200 (bf16 JVP, [8192, 1536] and [32768, 1152] rows, GB/s, the
// device copy 4019): narrow 2153 and 2277 (8 rows per block), 2189 and 2305 (4 rows), with cache hints
// (load16 below) 2309 and 2427 (8 rows), 2374 and 2573 (4 rows: what layernorm_mod_jvp_{dt} does since);
// wide 1650 and 1599. A block per row (a thread per 16-byte chunk, two block-wide reductions, the
// modulation loaded with the row or after the sums) was slower still: 1476-1710 GB/s for the JVP,
// 1362-1447 for the forward (warp kernel 1896-2035), so it is not kept. ncu on the narrow kernel: DRAM
// at 38 % of peak, issue slots 47 % busy, 16 warps per SM (the register limit): latency-bound.
template <bool JVP>
struct Chunks {
    enum { N = JVP ? 6 : 12, JVP_WIDE = 8 };
};

template <class ST, int N>
__device__ __forceinline__ bool fits_regs(int C, bool vec) {
    return vec && C <= 32 * ST::V * N;
}

template <class ST>
__device__ __forceinline__ void unpack(const uint4& u, float (&out)[ST::V]) {
    union { uint4 u; typename ST::T e[ST::V]; } c;
    c.u = u;
#pragma unroll
    for (int e = 0; e < ST::V; ++e) out[e] = ST::load(c.e[e]);
}

// Cache hints (HINTS: layernorm_mod_jvp_{dt}'s register path; 3-10 % faster on an H200): the row's x
// and x_dot read through the non-coherent path without allocating in L1, which leaves L1 to the
// modulation rows every warp of the block reads again, and y, y_dot stored evict-first (.cs). The .nc
// path asks that x and x_dot stay unwritten while the kernel runs: y, y_dot must not overlap them
// (layernorm.rs refuses an in-place JVP). The residual-fused and wide kernels do without (not timed
// with them).
template <bool HINTS>
__device__ __forceinline__ uint4 load16(const void* p) {
#ifndef FJ_HOST_EMU
    if (HINTS) {
        uint4 r;
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
            : "l"(p));
        return r;
    }
#endif
    return *reinterpret_cast<const uint4*>(p);
}

template <class ST, bool HINTS>
__device__ __forceinline__ void store_chunk(typename ST::T* row, int i, int n, bool vec, const float (&in)[ST::V]) {
#ifndef FJ_HOST_EMU
    if (HINTS && vec) {
        union { uint4 u; typename ST::T e[ST::V]; } c;
#pragma unroll
        for (int e = 0; e < ST::V; ++e) c.e[e] = ST::store(in[e]);
        asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(row + i), "r"(c.u.x), "r"(c.u.y),
                     "r"(c.u.z), "r"(c.u.w)
                     : "memory");
        return;
    }
#endif
    fj_store_chunk<ST>(row, i, n, vec, in);
}

// Loads this lane's chunks of a row (chunks past the row end are left as zeros).
template <class ST, int N, bool HINTS = false>
__device__ __forceinline__ void load_row(const typename ST::T* row, int C, int lane, uint4 (&r)[N]) {
#pragma unroll
    for (int ch = 0; ch < N; ++ch) {
        const int i = (ch * 32 + lane) * ST::V;
        r[ch] = i < C ? load16<HINTS>(row + i) : make_uint4(0u, 0u, 0u, 0u);
    }
}

// The row statistics the outputs need: mean, 1/std, and with a tangent mean(x_dot) and mean(xhat x_dot).
struct RowStats {
    float mu, rstd, mu_t, mean_xhat_t;
};

// Chunk i of y (and, with JVP, of y_dot) from the chunk's x values `a` and x_dot values `b` (zeros when
// x carries no tangent); the register and streaming paths both end here.
template <class ST, bool JVP, bool HINTS = false>
__device__ __forceinline__ void out_chunk(const float (&a)[ST::V], const float (&b)[ST::V], const RowStats& r,
                                          const float* sr, const float* hr, const float* tsr, const float* thr,
                                          typename ST::T* yr, typename ST::T* tyr, int i, int C, bool vec) {
    constexpr int V = ST::V;
    float s[V], h[V], o[V];
    load_mod<V>(sr, i, C, vec, s);
    load_mod<V>(hr, i, C, vec, h);
#pragma unroll
    for (int e = 0; e < V; ++e) o[e] = (a[e] - r.mu) * r.rstd * (1.f + s[e]) + h[e];
    store_chunk<ST, HINTS>(yr, i, C, vec, o);
    if (JVP) {
        float ts[V], th[V];
        load_mod<V>(tsr, i, C, vec, ts);
        load_mod<V>(thr, i, C, vec, th);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const float xh = (a[e] - r.mu) * r.rstd;
            const float xh_t = (b[e] - r.mu_t - xh * r.mean_xhat_t) * r.rstd;
            o[e] = xh_t * (1.f + s[e]) + xh * ts[e] + th[e];
        }
        store_chunk<ST, HINTS>(tyr, i, C, vec, o);
    }
}

// Chunk i of dx = dres + (g - mean(g) - xhat mean(g xhat)) rstd, g = dy (1 + scale), from the chunk's dy
// values `a` and x values `b` (both paths of the backward end here).
template <class ST>
__device__ __forceinline__ void bwd_out_chunk(const float (&a)[ST::V], const float (&b)[ST::V], const float* sr,
                                              float mu, float rs, float mean_g, float mean_gx,
                                              const typename ST::T* drr, typename ST::T* dxr, int i, int C,
                                              bool vec) {
    constexpr int V = ST::V;
    float s[V], o[V];
    load_mod<V>(sr, i, C, vec, s);
#pragma unroll
    for (int e = 0; e < V; ++e) o[e] = (a[e] * (1.f + s[e]) - mean_g - (b[e] - mu) * rs * mean_gx) * rs;
    if (drr) {
        float r[V];
        fj_load_chunk<ST>(drr, i, C, vec, r);
#pragma unroll
        for (int e = 0; e < V; ++e) o[e] += r[e];
    }
    fj_store_chunk<ST>(dxr, i, C, vec, o);
}

// The gated residual in front of the fused kernels, one row of each (pointers already offset to the
// row; gate and tgate to the row's group): x1 = x + gate y, x1_dot = x_dot + gate_dot y + gate y_dot,
// computed in f32 and rounded to the storage type, exactly as gated_residual_{fwd,jvp} do.
template <class ST>
struct ResRow {
    const typename ST::T* y;
    const typename ST::T* ty;
    const float* gate;
    const float* tgate;
    typename ST::T* x1;
    typename ST::T* tx1;
};

// Chunk i of the residual's output (and tangent), stored to x1 (tx1) and returned as storage values.
template <class ST, bool JVP>
__device__ __forceinline__ void residual_chunk(const typename ST::T* xr, const typename ST::T* txr, const ResRow<ST>& r,
                                               int i, int C, bool vec, uint4& out, uint4& tout) {
    constexpr int V = ST::V;
    float a[V], b[V], g[V], o[V];
    fj_load_chunk<ST>(xr, i, C, vec, a);
    fj_load_chunk<ST>(r.y, i, C, vec, b);
    fj_load_chunk_f32<V>(r.gate, i, C, vec, g);
    union { uint4 u; typename ST::T e[V]; } c;
#pragma unroll
    for (int e = 0; e < V; ++e) {
        o[e] = a[e] + g[e] * b[e];
        c.e[e] = ST::store(o[e]);
    }
    fj_store_chunk<ST>(r.x1, i, C, vec, o);
    out = c.u;
    if (JVP) {
        float t[V], tg[V], ty[V];
        if (txr) fj_load_chunk<ST>(txr, i, C, vec, t);
        else {
#pragma unroll
            for (int e = 0; e < V; ++e) t[e] = 0.f;
        }
        load_mod<V>(r.tgate, i, C, vec, tg);
        if (r.ty) fj_load_chunk<ST>(r.ty, i, C, vec, ty);
        else {
#pragma unroll
            for (int e = 0; e < V; ++e) ty[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < V; ++e) {
            o[e] = fmaf(g[e], ty[e], fmaf(tg[e], b[e], t[e]));
            c.e[e] = ST::store(o[e]);
        }
        fj_store_chunk<ST>(r.tx1, i, C, vec, o);
        tout = c.u;
    }
}

// The statistics and outputs of a row whose chunks this lane holds (xa, and with a tangent ta; chunks
// past the row end hold zeros): what the register-resident kernels do once the row is loaded.
template <class ST, bool JVP, int NCH, bool HINTS = false>
__device__ __forceinline__ void row_from_regs(const uint4 (&xa)[NCH], const uint4 (&ta)[NCH], bool tan,
                                              const float* __restrict__ sr, const float* __restrict__ hr,
                                              const float* __restrict__ tsr, const float* __restrict__ thr,
                                              typename ST::T* __restrict__ yr, typename ST::T* __restrict__ tyr,
                                              float* __restrict__ mean_out, float* __restrict__ rstd_out, int row,
                                              int lane, int C, float eps) {
    constexpr int V = ST::V;
    // sums of x and x_dot (chunks past the row end hold zeros)
    float sx = 0.f, stx = 0.f;
#pragma unroll
    for (int ch = 0; ch < NCH; ++ch) {
        float a[V];
        unpack<ST>(xa[ch], a);
#pragma unroll
        for (int e = 0; e < V; ++e) sx += a[e];
        if (JVP && tan) {
            unpack<ST>(ta[ch], a);
#pragma unroll
            for (int e = 0; e < V; ++e) stx += a[e];
        }
    }
    const float inv_c = 1.f / (float)C;
    const float mu = fj_warp_sum(sx) * inv_c;
    const float mu_t = JVP ? fj_warp_sum(stx) * inv_c : 0.f;

    // squared deviations, and deviations times x_dot
    float sv = 0.f, sxt = 0.f;
#pragma unroll
    for (int ch = 0; ch < NCH; ++ch) {
        if ((ch * 32 + lane) * V >= C) continue;
        float a[V], b[V];
        unpack<ST>(xa[ch], a);
        if (JVP && tan) unpack<ST>(ta[ch], b);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const float dev = a[e] - mu;
            sv = fmaf(dev, dev, sv);
            if (JVP && tan) sxt = fmaf(dev, b[e], sxt);
        }
    }
    const float rstd = rsqrtf(fj_warp_sum(sv) * inv_c + eps);
    const float mean_xhat_t = JVP ? fj_warp_sum(sxt) * inv_c * rstd : 0.f;
    if (lane == 0) {
        if (mean_out) mean_out[row] = mu;
        if (rstd_out) rstd_out[row] = rstd;
    }

    // outputs
    const RowStats st{mu, rstd, mu_t, mean_xhat_t};
#pragma unroll
    for (int ch = 0; ch < NCH; ++ch) {
        const int i = (ch * 32 + lane) * V;
        if (i >= C) continue;
        float a[V], b[V];
        unpack<ST>(xa[ch], a);
#pragma unroll
        for (int e = 0; e < V; ++e) b[e] = 0.f;
        if (JVP && tan) unpack<ST>(ta[ch], b);
        out_chunk<ST, JVP, HINTS>(a, b, st, sr, hr, tsr, thr, yr, tyr, i, C, true);
    }
}

template <class ST, bool JVP, bool RES, int NCH, bool HINTS = false>
__device__ __forceinline__ void fwd_regs(const typename ST::T* __restrict__ xr, const typename ST::T* __restrict__ txr,
                                         const ResRow<ST>& res, const float* __restrict__ sr,
                                         const float* __restrict__ hr, const float* __restrict__ tsr,
                                         const float* __restrict__ thr, typename ST::T* __restrict__ yr,
                                         typename ST::T* __restrict__ tyr, float* __restrict__ mean_out,
                                         float* __restrict__ rstd_out, int row, int lane, int C, float eps) {
    constexpr int V = ST::V;
    uint4 xa[NCH], ta[NCH];  // ta unused (and eliminated) without JVP
    if (RES) {
        // The row to normalise is the residual's output, made here (and stored) chunk by chunk.
#pragma unroll
        for (int ch = 0; ch < NCH; ++ch) {
            const int i = (ch * 32 + lane) * V;
            xa[ch] = ta[ch] = make_uint4(0u, 0u, 0u, 0u);
            if (i < C) residual_chunk<ST, JVP>(xr, txr, res, i, C, true, xa[ch], ta[ch]);
        }
        if (JVP) txr = res.tx1;  // the normalised row has a tangent from here on
    } else {
        load_row<ST, NCH, HINTS>(xr, C, lane, xa);
        if (JVP && txr) load_row<ST, NCH, HINTS>(txr, C, lane, ta);
    }
    row_from_regs<ST, JVP, NCH, HINTS>(xa, ta, JVP && txr, sr, hr, tsr, thr, yr, tyr, mean_out, rstd_out, row, lane,
                                       C, eps);
}

template <class ST, int NCH>
__device__ __forceinline__ void bwd_regs(const typename ST::T* __restrict__ dyr, const typename ST::T* __restrict__ xr,
                                         const float* __restrict__ sr, float mu, float rs,
                                         const typename ST::T* drr, typename ST::T* dxr, int lane, int C) {
    constexpr int V = ST::V;
    uint4 ga[NCH], xa[NCH];
    load_row<ST, NCH>(dyr, C, lane, ga);
    load_row<ST, NCH>(xr, C, lane, xa);
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int ch = 0; ch < NCH; ++ch) {
        const int i = (ch * 32 + lane) * V;
        if (i >= C) continue;
        float a[V], b[V], s[V];
        unpack<ST>(ga[ch], a);
        unpack<ST>(xa[ch], b);
        load_mod<V>(sr, i, C, true, s);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const float gg = a[e] * (1.f + s[e]);
            sg += gg;
            sgx = fmaf(gg, (b[e] - mu) * rs, sgx);
        }
    }
    const float inv_c = 1.f / (float)C;
    const float mean_g = fj_warp_sum(sg) * inv_c;
    const float mean_gx = fj_warp_sum(sgx) * inv_c;
#pragma unroll
    for (int ch = 0; ch < NCH; ++ch) {
        const int i = (ch * 32 + lane) * V;
        if (i >= C) continue;
        float a[V], b[V];
        unpack<ST>(ga[ch], a);
        unpack<ST>(xa[ch], b);
        bwd_out_chunk<ST>(a, b, sr, mu, rs, mean_g, mean_gx, drr, dxr, i, C, true);
    }
}

// ---------------------------------------------------------------------------------------------
// Forward and JVP in one body (JVP = true also computes the tangent): the row in registers when it
// fits, else streamed three times.
// RES: the row is first made by the gated residual `res` (whole tensors here, null members absent as in
// gated_residual_jvp; x1 and, with JVP, tx1 required) from x (and tx), stored to x1 (tx1), and x1 is
// normalised: the fused kernels below, which save reading x1 (and tx1) back.
// fwd_row is one row (the warp's) of `fwd` below, and the pipelined JVP's fallback.
template <class ST, bool JVP, bool RES, int NCH, bool HINTS>
__device__ __forceinline__ void fwd_row(int row, int lane, const typename ST::T* __restrict__ x,
                                        const typename ST::T* __restrict__ tx, const float* __restrict__ scale,
                                        const float* __restrict__ shift, const float* __restrict__ tscale,
                                        const float* __restrict__ tshift, typename ST::T* __restrict__ y,
                                        typename ST::T* __restrict__ ty, float* __restrict__ mean_out,
                                        float* __restrict__ rstd_out, int T, int C, int G, float eps, ResRow<ST> res) {
    constexpr int V = ST::V;
    if (row >= T) return;
    const int grp = row / (T / G);
    const fj_i64 off = (fj_i64)row * C, goff = (fj_i64)grp * C;
    const typename ST::T* xr = x + off;
    const typename ST::T* txr = (JVP && tx) ? tx + off : nullptr;
    const float* sr = scale ? scale + goff : nullptr;
    const float* hr = shift ? shift + goff : nullptr;
    const float* tsr = (JVP && tscale) ? tscale + goff : nullptr;
    const float* thr = (JVP && tshift) ? tshift + goff : nullptr;
    typename ST::T* yr = y + off;
    typename ST::T* tyr = JVP ? ty + off : nullptr;
    bool vec = vec_ok<ST>(C, xr, txr, sr, hr, tsr, thr, yr, tyr);
    if (RES) {
        res.y += off;
        if (res.ty) res.ty += off;
        res.gate += goff;
        if (res.tgate) res.tgate += goff;
        res.x1 += off;
        if (JVP) res.tx1 += off;
        vec = vec && vec_ok<ST>(C, res.y, res.ty, res.gate, res.tgate, res.x1, JVP ? res.tx1 : nullptr, nullptr,
                                nullptr);
    }
    if (fits_regs<ST, NCH>(C, vec)) {
        fwd_regs<ST, JVP, RES, NCH, HINTS>(xr, txr, res, sr, hr, tsr, thr, yr, tyr, mean_out, rstd_out, row, lane,
                                           C, eps);
        return;
    }
    if (RES) {
        // Too long for registers: the residual's row first (each lane writes the chunks it reads back
        // below, so no barrier is needed), then the streaming passes over it.
        for (int i = lane * V; i < C; i += 32 * V) {
            uint4 u, tu;
            residual_chunk<ST, JVP>(xr, txr, res, i, C, vec, u, tu);
        }
        xr = res.x1;
        if (JVP) txr = res.tx1;
    }

    // pass 1: sums of x and x_dot
    float sx = 0.f, stx = 0.f;
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V];
        fj_load_chunk<ST>(xr, i, C, vec, a);
#pragma unroll
        for (int e = 0; e < V; ++e) sx += a[e];  // masked elements load as 0
        if (JVP && txr) {
            fj_load_chunk<ST>(txr, i, C, vec, a);
#pragma unroll
            for (int e = 0; e < V; ++e) stx += a[e];
        }
    }
    const float inv_c = 1.f / (float)C;
    const float mu = fj_warp_sum(sx) * inv_c;
    const float mu_t = JVP ? fj_warp_sum(stx) * inv_c : 0.f;

    // pass 2: squared deviations, and deviations times x_dot
    float sv = 0.f, sxt = 0.f;
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], b[V];
        fj_load_chunk<ST>(xr, i, C, vec, a);
        if (JVP && txr) fj_load_chunk<ST>(txr, i, C, vec, b);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const float dev = (i + e < C) ? a[e] - mu : 0.f;
            sv = fmaf(dev, dev, sv);
            if (JVP && txr) sxt = fmaf(dev, b[e], sxt);
        }
    }
    const float rstd = rsqrtf(fj_warp_sum(sv) * inv_c + eps);
    const float mean_xhat_t = JVP ? fj_warp_sum(sxt) * inv_c * rstd : 0.f;  // mean(xhat x_dot)
    if (lane == 0) {
        if (mean_out) mean_out[row] = mu;
        if (rstd_out) rstd_out[row] = rstd;
    }

    // pass 3: outputs
    const RowStats st{mu, rstd, mu_t, mean_xhat_t};
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], b[V];
        fj_load_chunk<ST>(xr, i, C, vec, a);
#pragma unroll
        for (int e = 0; e < V; ++e) b[e] = 0.f;
        if (JVP && txr) fj_load_chunk<ST>(txr, i, C, vec, b);
        out_chunk<ST, JVP>(a, b, st, sr, hr, tsr, thr, yr, tyr, i, C, vec);
    }
}

// A warp per row: the row is the warp's index in the grid.
template <class ST, bool JVP, bool RES = false, int NCH = Chunks<JVP>::N, bool HINTS = false>
__device__ __forceinline__ void fwd(const typename ST::T* __restrict__ x, const typename ST::T* __restrict__ tx,
                                    const float* __restrict__ scale, const float* __restrict__ shift,
                                    const float* __restrict__ tscale, const float* __restrict__ tshift,
                                    typename ST::T* __restrict__ y, typename ST::T* __restrict__ ty,
                                    float* __restrict__ mean_out, float* __restrict__ rstd_out, int T, int C, int G,
                                    float eps, ResRow<ST> res = ResRow<ST>{}) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // a warp per row
    fwd_row<ST, JVP, RES, NCH, HINTS>(row, threadIdx.x & 31, x, tx, scale, shift, tscale, tshift, y, ty, mean_out,
                                      rstd_out, T, C, G, eps, res);
}

// dres (may be null, may equal dx: each element is read before the same thread writes it, hence no
// __restrict__ on either) is added to the input cotangent: dx = dres + (the layernorm's), the residual
// stream's gradient accumulated in one pass.
template <class ST>
__device__ __forceinline__ void bwd(const typename ST::T* __restrict__ dy, const typename ST::T* __restrict__ x,
                                    const float* __restrict__ scale, const float* __restrict__ mean,
                                    const float* __restrict__ rstd, const typename ST::T* dres, typename ST::T* dx,
                                    int T, int C, int G) {
    constexpr int V = ST::V;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // a warp per row
    const int lane = threadIdx.x & 31;
    if (row >= T) return;
    const int grp = row / (T / G);
    const fj_i64 off = (fj_i64)row * C;
    const typename ST::T* dyr = dy + off;
    const typename ST::T* xr = x + off;
    const float* sr = scale ? scale + (fj_i64)grp * C : nullptr;
    typename ST::T* dxr = dx + off;
    const typename ST::T* drr = dres ? dres + off : nullptr;
    const bool vec = vec_ok<ST>(C, dyr, xr, sr, dxr, drr, nullptr, nullptr, nullptr);
    const float mu = mean[row], rs = rstd[row];
    if (fits_regs<ST, Chunks<false>::N>(C, vec)) {
        bwd_regs<ST, Chunks<false>::N>(dyr, xr, sr, mu, rs, drr, dxr, lane, C);
        return;
    }

    // pass 1: sums of g = dy (1 + scale) and of g xhat (masked elements: dy loads as 0, so g = 0)
    float sg = 0.f, sgx = 0.f;
    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], b[V], s[V];
        fj_load_chunk<ST>(dyr, i, C, vec, a);
        fj_load_chunk<ST>(xr, i, C, vec, b);
        load_mod<V>(sr, i, C, vec, s);
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const float gg = a[e] * (1.f + s[e]);
            sg += gg;
            sgx = fmaf(gg, (b[e] - mu) * rs, sgx);
        }
    }
    const float inv_c = 1.f / (float)C;
    const float mean_g = fj_warp_sum(sg) * inv_c;
    const float mean_gx = fj_warp_sum(sgx) * inv_c;

    for (int i = lane * V; i < C; i += 32 * V) {
        float a[V], b[V];
        fj_load_chunk<ST>(dyr, i, C, vec, a);
        fj_load_chunk<ST>(xr, i, C, vec, b);
        bwd_out_chunk<ST>(a, b, sr, mu, rs, mean_g, mean_gx, drr, dxr, i, C, vec);
    }
}

// dscale[grp, c] += sum dy xhat, dshift[grp, c] += sum dy over this block's slice of the group's rows.
template <class ST>
__device__ __forceinline__ void bwd_params(const typename ST::T* __restrict__ dy, const typename ST::T* __restrict__ x,
                                           const float* __restrict__ mean, const float* __restrict__ rstd,
                                           float* __restrict__ dscale, float* __restrict__ dshift, int T, int C,
                                           int G) {
    __shared__ float red_s[8][33], red_h[8][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int col = blockIdx.x * 32 + tx;
    const int grp = blockIdx.y;
    const int R = T / G;
    const int slices = gridDim.z;
    const int chunk = (R + slices - 1) / slices;
    const int r_begin = grp * R + blockIdx.z * chunk;
    const int r_end = min(r_begin + chunk, (grp + 1) * R);
    float as = 0.f, ah = 0.f;
    if (col < C) {
        for (int r = r_begin + ty; r < r_end; r += 8) {
            const fj_i64 i = (fj_i64)r * C + col;
            const float g = ST::load(dy[i]);
            as = fmaf(g, (ST::load(x[i]) - mean[r]) * rstd[r], as);
            ah += g;
        }
    }
    red_s[ty][tx] = as;
    red_h[ty][tx] = ah;
    __syncthreads();
    if (ty == 0 && col < C) {
#pragma unroll
        for (int k = 1; k < 8; ++k) {
            as += red_s[k][tx];
            ah += red_h[k][tx];
        }
        if (dscale) atomicAdd(dscale + (fj_i64)grp * C + col, as);
        if (dshift) atomicAdd(dshift + (fj_i64)grp * C + col, ah);
    }
}

// ---------------------------------------------------------------------------------------------
// PIPELINED ROWS (layernorm_mod_jvp_pipe_{dt}: opt-in, FLASHJVP_LN_JVP_ROWS=pipe on the host; written
// 2026-11-28, runs on the CPU emulator, not yet timed on a GPU). The register-resident JVP is
// latency-bound (ncu on the H200: DRAM 38 % of peak, issue slots 47 %, 16 warps per SM at its 128
// registers): each warp has one row pair in flight, and none while it reduces and stores. Here a warp
// takes PIPE_ROWS consecutive rows and starts the copies of all of them (x and x_dot, cp.async into its
// own slice of shared memory, one commit group per row) before it touches the first; each later row's
// loads then run under the earlier rows' reductions and stores: twice the bytes in flight per warp at
// the same registers. A lane copies exactly the 16-byte chunks it reads back, so its own
// cp.async.wait_group is all the ordering needed (no barrier). The statistics and outputs are
// row_from_regs, as in the register kernel (same sums in the same order, same results). When the rows
// are not vector-accessible or do not fit NCH chunks per lane, each row takes fwd_row (streaming).
// Shared memory: R warps x PIPE_ROWS rows x (x, x_dot) x NCH chunks x 32 lanes x 16 bytes whatever C
// (compile-time offsets; layernorm.rs: pipe_shared_bytes): 12 KiB a warp, 48 KiB with R = 4, so the
// registers (128, 16 warps per SM) stay the limit on sm_90 (4 blocks: 192 KiB); 3 blocks on sm_80.
// Launch: grid (ceil(T / (PIPE_ROWS R)), 1, 1), block (32 R, 1, 1), R <= 8.
enum { PIPE_ROWS = 2 };

template <class ST, int NCH>
__device__ __forceinline__ void jvp_pipe(const typename ST::T* __restrict__ x, const typename ST::T* __restrict__ tx,
                                         const float* __restrict__ scale, const float* __restrict__ shift,
                                         const float* __restrict__ tscale, const float* __restrict__ tshift,
                                         typename ST::T* __restrict__ y, typename ST::T* __restrict__ ty,
                                         float* __restrict__ mean_out, float* __restrict__ rstd_out, int T, int C,
                                         int G, float eps) {
    constexpr int V = ST::V;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * (blockDim.x >> 5) + warp) * PIPE_ROWS;
    // Row offsets are multiples of C elements, so the base pointers decide every row's alignment.
    const bool vec = vec_ok<ST>(C, x, tx, scale, shift, tscale, tshift, y, ty);
    if (!fits_regs<ST, NCH>(C, vec)) {
#pragma unroll
        for (int k = 0; k < PIPE_ROWS; ++k)
            fwd_row<ST, true, false, 1, false>(row0 + k, lane, x, tx, scale, shift, tscale, tshift, y, ty,
                                               mean_out, rstd_out, T, C, G, eps, ResRow<ST>{});
        return;
    }
    FJ_DYN_SMEM(fj_smem);
    // This warp's slice: [row k][x, x_dot][chunk][lane] of 16 bytes (compile-time offsets).
    uint4* slice = reinterpret_cast<uint4*>(fj_smem) + warp * (PIPE_ROWS * 2 * NCH * 32) + lane;
    auto at = [&](int k, int t, int ch) { return slice + ((k * 2 + t) * NCH + ch) * 32; };
#pragma unroll
    for (int k = 0; k < PIPE_ROWS; ++k) {
        const int row = row0 + k;
        if (row < T) {
            const fj_i64 off = (fj_i64)row * C;
#pragma unroll
            for (int ch = 0; ch < NCH; ++ch) {
                const int i = (ch * 32 + lane) * V;
                if (i < C) {
                    fj_cp_async16(fj_smem_addr(at(k, 0, ch)), x + off + i, 16);
                    if (tx) fj_cp_async16(fj_smem_addr(at(k, 1, ch)), tx + off + i, 16);
                }
            }
        }
        fj_cp_async_commit();  // one group per row, empty ones included, so the waits below count rows
    }
#pragma unroll 1
    for (int k = 0; k < PIPE_ROWS; ++k) {  // not unrolled: one row's registers at a time
        const int row = row0 + k;
        if (row >= T) return;
        if (k == 0) fj_cp_async_wait<PIPE_ROWS - 1>();
        else fj_cp_async_wait<0>();
        static_assert(PIPE_ROWS == 2, "the waits above assume two rows");
        uint4 xa[NCH], ta[NCH];
#pragma unroll
        for (int ch = 0; ch < NCH; ++ch) {
            const bool in = (ch * 32 + lane) * V < C;
            xa[ch] = in ? *at(k, 0, ch) : make_uint4(0u, 0u, 0u, 0u);
            ta[ch] = (in && tx) ? *at(k, 1, ch) : make_uint4(0u, 0u, 0u, 0u);
        }
        const int grp = row / (T / G);
        const fj_i64 off = (fj_i64)row * C, goff = (fj_i64)grp * C;
        row_from_regs<ST, true, NCH, true>(xa, ta, tx != nullptr, scale ? scale + goff : nullptr,
                                           shift ? shift + goff : nullptr, tscale ? tscale + goff : nullptr,
                                           tshift ? tshift + goff : nullptr, y + off, ty + off, mean_out, rstd_out,
                                           row, lane, C, eps);
    }
}

}  // namespace fj_ln

#define FJ_LN(DT, ST)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        layernorm_mod_fwd_##DT(const ST::T* x, const float* scale, const float* shift, ST::T* y, float* mean,  \
                               float* rstd, int T, int C, int G, float eps) {                                  \
        fj_ln::fwd<ST, false>(x, nullptr, scale, shift, nullptr, nullptr, y, nullptr, mean, rstd, T, C, G,     \
                              eps);                                                                            \
    }                                                                                                          \
    FJ_REGISTER(layernorm_mod_fwd_##DT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                       \
        layernorm_mod_jvp_##DT(const ST::T* x, const ST::T* tx, const float* scale, const float* shift,        \
                               const float* tscale, const float* tshift, ST::T* y, ST::T* ty, float* mean,     \
                               float* rstd, int T, int C, int G, float eps) {                                  \
        fj_ln::fwd<ST, true, false, fj_ln::Chunks<true>::N, true>(x, tx, scale, shift, tscale, tshift, y, ty,   \
                                                                  mean, rstd, T, C, G, eps);                   \
    }                                                                                                          \
    FJ_REGISTER(layernorm_mod_jvp_##DT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256, 1)                                                       \
        layernorm_mod_jvp_wide_##DT(const ST::T* x, const ST::T* tx, const float* scale, const float* shift,   \
                                    const float* tscale, const float* tshift, ST::T* y, ST::T* ty, float* mean, \
                                    float* rstd, int T, int C, int G, float eps) {                             \
        fj_ln::fwd<ST, true, false, fj_ln::Chunks<true>::JVP_WIDE>(x, tx, scale, shift, tscale, tshift, y, ty,  \
                                                                   mean, rstd, T, C, G, eps);                  \
    }                                                                                                          \
    FJ_REGISTER(layernorm_mod_jvp_wide_##DT)                                                                   \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                       \
        layernorm_mod_jvp_pipe_##DT(const ST::T* x, const ST::T* tx, const float* scale, const float* shift,   \
                                    const float* tscale, const float* tshift, ST::T* y, ST::T* ty, float* mean, \
                                    float* rstd, int T, int C, int G, float eps) {                             \
        fj_ln::jvp_pipe<ST, fj_ln::Chunks<true>::N>(x, tx, scale, shift, tscale, tshift, y, ty, mean, rstd, T, C, \
                                                    G, eps);                                                   \
    }                                                                                                          \
    FJ_REGISTER(layernorm_mod_jvp_pipe_##DT)                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        residual_layernorm_mod_fwd_##DT(const ST::T* x, const ST::T* y, const float* gate, ST::T* x1,           \
                                        const float* scale, const float* shift, ST::T* h, float* mean,           \
                                        float* rstd, int T, int C, int G, float eps) {                           \
        fj_ln::fwd<ST, false, true>(x, nullptr, scale, shift, nullptr, nullptr, h, nullptr, mean, rstd, T, C, G,  \
                                    eps, fj_ln::ResRow<ST>{y, nullptr, gate, nullptr, x1, nullptr});             \
    }                                                                                                          \
    FJ_REGISTER(residual_layernorm_mod_fwd_##DT)                                                               \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                       \
        residual_layernorm_mod_jvp_##DT(const ST::T* x, const ST::T* tx, const ST::T* y, const ST::T* ty,       \
                                        const float* gate, const float* tgate, ST::T* x1, ST::T* tx1,            \
                                        const float* scale, const float* shift, const float* tscale,             \
                                        const float* tshift, ST::T* h, ST::T* th, float* mean, float* rstd,      \
                                        int T, int C, int G, float eps) {                                        \
        fj_ln::fwd<ST, true, true>(x, tx, scale, shift, tscale, tshift, h, th, mean, rstd, T, C, G, eps,         \
                                   fj_ln::ResRow<ST>{y, ty, gate, tgate, x1, tx1});                             \
    }                                                                                                          \
    FJ_REGISTER(residual_layernorm_mod_jvp_##DT)                                                               \
    extern "C" __global__ void __launch_bounds__(256, 1)                                                       \
        residual_layernorm_mod_jvp_wide_##DT(                                                                   \
            const ST::T* x, const ST::T* tx, const ST::T* y, const ST::T* ty, const float* gate,               \
            const float* tgate, ST::T* x1, ST::T* tx1, const float* scale, const float* shift,                 \
            const float* tscale, const float* tshift, ST::T* h, ST::T* th, float* mean, float* rstd, int T,    \
            int C, int G, float eps) {                                                                         \
        fj_ln::fwd<ST, true, true, fj_ln::Chunks<true>::JVP_WIDE>(                                             \
            x, tx, scale, shift, tscale, tshift, h, th, mean, rstd, T, C, G, eps,                              \
            fj_ln::ResRow<ST>{y, ty, gate, tgate, x1, tx1});                                                   \
    }                                                                                                          \
    FJ_REGISTER(residual_layernorm_mod_jvp_wide_##DT)                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        layernorm_mod_bwd_##DT(const ST::T* dy, const ST::T* x, const float* scale, const float* mean,         \
                               const float* rstd, const ST::T* dres, ST::T* dx, int T, int C, int G) {         \
        fj_ln::bwd<ST>(dy, x, scale, mean, rstd, dres, dx, T, C, G);                                           \
    }                                                                                                          \
    FJ_REGISTER(layernorm_mod_bwd_##DT)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                          \
        layernorm_mod_bwd_params_##DT(const ST::T* dy, const ST::T* x, const float* mean, const float* rstd,   \
                                      float* dscale, float* dshift, int T, int C, int G) {                     \
        fj_ln::bwd_params<ST>(dy, x, mean, rstd, dscale, dshift, T, C, G);                                     \
    }                                                                                                          \
    FJ_REGISTER(layernorm_mod_bwd_params_##DT)
FJ_FOR_EACH_DTYPE(FJ_LN)
