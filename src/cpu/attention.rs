//! CPU reference attention: O = softmax(c·Q Kᵀ) V per (batch, head), its JVP and its backward.
//! See crate::ops::attention for the public API and DESIGN.md section 3 for the math.
//!
//! Tiling: one rayon task per (batch·head, block of `BLOCK_Q` query rows) streams over blocks of
//! `BLOCK_K` keys, so the largest temporary is a `BLOCK_Q × BLOCK_K` score tile (memory O(N·d),
//! never Nq×Nk). Every tile product goes through the single-threaded GEMM; the parallelism is over
//! tasks. The output blocks double as the O and T accumulators, so a task's scratch is two tiles
//! and four row vectors, reused across its key blocks.
//!
//! The GEMM packs an operand with plain copies only when A is column-major and B row-major; with
//! row-major Q, K the packing of S = Q Kᵀ gathers with stride d on both sides and cost about as much
//! as the arithmetic. So Q, K (and their tangents, V and dO in the backward) are first transposed
//! per head (O(N·d) copies), and the streaming tiles hold Sᵀ (keys × queries): every product then
//! packs by copies, and the per-query softmax updates run along contiguous rows.
//!
//! Measured (1 core of the shared AMD EPYC build machine, f32, B1 H4 N1024 d64, 12·N²d flops for
//! the JVP): JVP 130 GFLOP/s, the GEMM crate alone 200 GFLOP/s at 1024³; 64×64 blocks gave 115.
//!
//! Layouts (row-major, contiguous): q \[B,H,Nq,d\], k \[B,H,Nk,d\], v \[B,H,Nk,dv\], o \[B,H,Nq,dv\],
//! lse \[B,H,Nq\]. The functions trust their inputs: shapes were checked at the public boundary.

use std::any::TypeId;

use rayon::prelude::*;

use super::gemm::{gemm, Mat};
use super::Real;

/// Query rows per task. With `BLOCK_K` this sizes the tile GEMMs (128×128×d) so that packing and
/// call overhead stay small against the arithmetic, while B·H·Nq/128 tasks still feed the threads.
pub const BLOCK_Q: usize = 128;
/// Keys per streamed block.
pub const BLOCK_K: usize = 128;

/// The sizes of one attention problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Batch × heads: the independent problems.
    pub bh: usize,
    /// Query rows per problem.
    pub nq: usize,
    /// Key (and value) rows per problem.
    pub nk: usize,
    /// Head dim of q and k.
    pub d: usize,
    /// Head dim of v and o.
    pub dv: usize,
}

/// The tangents of q, k and v; `None` means zero and its work is skipped.
#[derive(Clone, Copy, Debug)]
pub struct Tangents<'a, T> {
    /// q̇, laid out as q.
    pub q: Option<&'a [T]>,
    /// k̇, laid out as k.
    pub k: Option<&'a [T]>,
    /// v̇, laid out as v.
    pub v: Option<&'a [T]>,
}

impl<T> Tangents<'_, T> {
    /// No tangent at all (the primal forward).
    pub fn none() -> Self {
        Tangents {
            q: None,
            k: None,
            v: None,
        }
    }
}

/// How many of the Nk keys each problem attends to: all of them, or per problem (batch·head) its
/// first `n` (1 ≤ n ≤ Nk; the rest are padding that no output depends on and whose gradients are 0).
pub type KeyCounts<'a> = Option<&'a [usize]>;

/// o and lse (each sized as its layout above), over the first `keys[bh]` keys of each problem bh
/// (all Nk when `keys` is `None`).
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Real>(
    dims: Dims,
    keys: KeyCounts,
    q: &[T],
    k: &[T],
    v: &[T],
    scale: T,
    o: &mut [T],
    lse: &mut [T],
) {
    stream(dims, keys, q, k, v, Tangents::none(), scale, o, lse, None);
}

/// o, lse and their tangents `to` (\[B,H,Nq,dv\]) and `tlse` (\[B,H,Nq\]) in one streaming pass:
/// running max m, sum l and accumulators O = Σ p v, T = Σ p (v̇ + ṡ v), r = Σ p ṡ per query row,
/// finished as o = O/l, μ = r/l, ȯ = T/l − μ·o, lse = m + ln l, l̇se = μ.
/// Over the first `keys[bh]` keys of each problem bh (all Nk when `keys` is `None`).
#[allow(clippy::too_many_arguments)]
pub fn jvp<T: Real>(
    dims: Dims,
    keys: KeyCounts,
    q: &[T],
    k: &[T],
    v: &[T],
    tangents: Tangents<T>,
    scale: T,
    o: &mut [T],
    lse: &mut [T],
    to: &mut [T],
    tlse: &mut [T],
) {
    stream(
        dims,
        keys,
        q,
        k,
        v,
        tangents,
        scale,
        o,
        lse,
        Some((to, tlse)),
    );
}

/// Splits a [BH, n, w] buffer into (bh, first row, rows) chunks of at most `block` rows.
fn row_blocks<T>(
    buf: &mut [T],
    n: usize,
    w: usize,
    block: usize,
) -> impl Iterator<Item = (usize, usize, &mut [T])> {
    buf.chunks_mut(n * w).enumerate().flat_map(move |(bh, x)| {
        x.chunks_mut(block * w)
            .enumerate()
            .map(move |(i, c)| (bh, i * block, c))
    })
}

/// [BH, n, w] → [BH, w, n]. The GEMM packs its operands fastest when A is column-major and B
/// row-major; the transposed copies (O(N·d) memory) give every tile product that layout.
fn transpose_heads<T: Real>(x: &[T], n: usize, w: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(n * w)
        .zip(x.par_chunks(n * w))
        .for_each(|(dst, src)| {
            // Blocks of 32 rows keep both sides in cache.
            for r0 in (0..n).step_by(32) {
                for c in 0..w {
                    for r in r0..(r0 + 32).min(n) {
                        dst[c * n + r] = src[r * w + c];
                    }
                }
            }
        });
    out
}

/// Rows r0..r0+rows of head bh of a [BH, n, w] tensor, as a rows × w view.
fn block<T>(x: &[T], bh: usize, n: usize, w: usize, r0: usize, rows: usize) -> Mat<'_, T> {
    Mat::rows(&x[(bh * n + r0) * w..], rows, w)
}

/// The same block read from the transposed copy ([BH, w, n]): a column-major rows × w view.
fn t_block<T>(xt: &[T], bh: usize, n: usize, w: usize, r0: usize, rows: usize) -> Mat<'_, T> {
    Mat {
        data: &xt[bh * w * n + r0..],
        rows,
        cols: w,
        rs: 1,
        cs: n,
    }
}

/// What every streaming task reads. The score tiles are kept transposed (keys × queries), so the
/// per-query softmax state updates run along contiguous rows and P is column-major for P·V.
struct StreamCtx<'a, T> {
    dims: Dims,
    keys: KeyCounts<'a>,
    scale: T,
    /// Qᵀ, Q̇ᵀ, Kᵀ, K̇ᵀ per head ([BH, d, N]).
    qt: &'a [T],
    tqt: Option<&'a [T]>,
    kt: &'a [T],
    tkt: Option<&'a [T]>,
    v: &'a [T],
    tv: Option<&'a [T]>,
}

/// Per-task scratch, reused across key blocks and across the tasks a worker runs.
struct StreamScratch<T> {
    /// Scores sᵀ, then probabilities pᵀ, of the current tile (keys × queries).
    st: Vec<T>,
    /// Score tangents ṡᵀ, then (p·ṡ)ᵀ.
    sdt: Vec<T>,
    m: Vec<T>,
    /// exp(m_old − m_new) per query.
    alpha: Vec<T>,
    l: Vec<T>,
    r: Vec<T>,
}

impl<T: Real> StreamScratch<T> {
    fn new(with_sdot: bool) -> Self {
        let tile = || vec![T::zero(); BLOCK_Q * BLOCK_K];
        let row = || vec![T::zero(); BLOCK_Q];
        StreamScratch {
            st: tile(),
            sdt: if with_sdot { tile() } else { Vec::new() },
            m: row(),
            alpha: row(),
            l: row(),
            r: row(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn stream<T: Real>(
    dims: Dims,
    keys: KeyCounts,
    q: &[T],
    k: &[T],
    v: &[T],
    tangents: Tangents<T>,
    scale: T,
    o: &mut [T],
    lse: &mut [T],
    tangent_out: Option<(&mut [T], &mut [T])>,
) {
    let Dims { nq, nk, d, dv, .. } = dims;
    let qt = transpose_heads(q, nq, d);
    let tqt = tangents.q.map(|t| transpose_heads(t, nq, d));
    let kt = transpose_heads(k, nk, d);
    let tkt = tangents.k.map(|t| transpose_heads(t, nk, d));
    let ctx = StreamCtx {
        dims,
        keys,
        scale,
        qt: &qt,
        tqt: tqt.as_deref(),
        kt: &kt,
        tkt: tkt.as_deref(),
        v,
        tv: tangents.v,
    };
    let with_sdot = tqt.is_some() || tkt.is_some();
    // Task list: (bh, first query, o block, lse block, optional (ȯ block, l̇se block)).
    type Task<'a, T> = (
        usize,
        usize,
        &'a mut [T],
        &'a mut [T],
        Option<(&'a mut [T], &'a mut [T])>,
    );
    let mut tasks: Vec<Task<T>> = row_blocks(o, nq, dv, BLOCK_Q)
        .zip(row_blocks(lse, nq, 1, BLOCK_Q))
        .map(|((bh, q0, ob), (_, _, lb))| (bh, q0, ob, lb, None))
        .collect();
    if let Some((to, tlse)) = tangent_out {
        for (t, ((_, _, tob), (_, _, tlb))) in tasks
            .iter_mut()
            .zip(row_blocks(to, nq, dv, BLOCK_Q).zip(row_blocks(tlse, nq, 1, BLOCK_Q)))
        {
            t.4 = Some((tob, tlb));
        }
    }
    tasks.into_par_iter().for_each_init(
        || StreamScratch::new(with_sdot),
        |scratch, (bh, q0, ob, lb, tangent_blocks)| {
            ctx.task(scratch, bh, q0, ob, lb, tangent_blocks);
        },
    );
}

impl<T: Real> StreamCtx<'_, T> {
    /// One task: the query rows q0.. of problem bh (as many as `lb` holds) against all its keys.
    fn task(
        &self,
        scratch: &mut StreamScratch<T>,
        bh: usize,
        q0: usize,
        ob: &mut [T],
        lb: &mut [T],
        mut tangent_blocks: Option<(&mut [T], &mut [T])>,
    ) {
        let Dims { nq, nk, d, dv, .. } = self.dims;
        let rows = lb.len();
        let with_sdot = self.tqt.is_some() || self.tkt.is_some();
        let (zero, one) = (T::zero(), T::one());
        let StreamScratch {
            st,
            sdt,
            m,
            alpha,
            l,
            r,
        } = scratch;
        let (m, alpha, l, r) = (
            &mut m[..rows],
            &mut alpha[..rows],
            &mut l[..rows],
            &mut r[..rows],
        );
        m.fill(T::neg_infinity());
        l.fill(zero);
        r.fill(zero);
        // The output blocks are the O and T accumulators.
        ob.fill(zero);
        if let Some((tob, _)) = tangent_blocks.as_mut() {
            tob.fill(zero);
        }
        // Qᵀ and Q̇ᵀ blocks: d × rows, row-major.
        let q_t = t_block(self.qt, bh, nq, d, q0, rows).t();
        let tq_t = self.tqt.map(|x| t_block(x, bh, nq, d, q0, rows).t());
        // Keys past this problem's count are padding: they are never read.
        let keys = self.keys.map_or(nk, |n| n[bh]);

        for k0 in (0..keys).step_by(BLOCK_K) {
            let cols = BLOCK_K.min(keys - k0);
            let kb = t_block(self.kt, bh, nk, d, k0, cols);
            let vb = block(self.v, bh, nk, dv, k0, cols);
            let st = &mut st[..cols * rows];
            // sᵀ = c·K Qᵀ ; ṡᵀ = c(K Q̇ᵀ + K̇ Qᵀ), skipping an absent term.
            gemm(self.scale, kb, q_t, zero, st, rows);
            if with_sdot {
                let sdt = &mut sdt[..cols * rows];
                let mut beta = zero;
                if let Some(tq_t) = tq_t {
                    gemm(self.scale, kb, tq_t, zero, sdt, rows);
                    beta = one;
                }
                if let Some(tkt) = self.tkt {
                    let tkb = t_block(tkt, bh, nk, d, k0, cols);
                    gemm(self.scale, tkb, q_t, beta, sdt, rows);
                }
            }

            // Online softmax: m_new = max(m, max_j s), p = exp(s − m_new), and the old state
            // rescaled by exp(m_old − m_new) (0 on the first block: m_old = −∞, empty state).
            alpha.copy_from_slice(m);
            for srow in st.chunks_exact(rows) {
                for (mi, &x) in m.iter_mut().zip(srow) {
                    *mi = mi.max(x);
                }
            }
            exp_sub(alpha, m);
            for i in 0..rows {
                let a = alpha[i];
                if a != one {
                    l[i] *= a;
                    r[i] *= a;
                    scale_row(&mut ob[i * dv..(i + 1) * dv], a);
                    if let Some((tob, _)) = tangent_blocks.as_mut() {
                        scale_row(&mut tob[i * dv..(i + 1) * dv], a);
                    }
                }
            }
            for srow in st.chunks_exact_mut(rows) {
                exp_sub(srow, m);
                add_to(l, srow);
            }
            if with_sdot {
                for (drow, prow) in sdt.chunks_exact_mut(rows).zip(st.chunks_exact(rows)) {
                    for ((x, &p), ri) in drow.iter_mut().zip(prow).zip(r.iter_mut()) {
                        *x *= p;
                        *ri += *x;
                    }
                }
            }

            // P (rows × cols) is the column-major view of pᵀ.
            let p = Mat {
                data: &st[..],
                rows,
                cols,
                rs: 1,
                cs: rows,
            };
            gemm(one, p, vb, one, ob, dv);
            if let Some((tob, _)) = tangent_blocks.as_mut() {
                if let Some(tv) = self.tv {
                    gemm(one, p, block(tv, bh, nk, dv, k0, cols), one, tob, dv);
                }
                if with_sdot {
                    let ps = Mat {
                        data: &sdt[..cols * rows],
                        ..p
                    };
                    gemm(one, ps, vb, one, tob, dv);
                }
            }
        }

        for i in 0..rows {
            let inv = one / l[i];
            let orow = &mut ob[i * dv..(i + 1) * dv];
            scale_row(orow, inv);
            lb[i] = m[i] + l[i].ln();
            if let Some((tob, tlb)) = tangent_blocks.as_mut() {
                let mu = r[i] * inv;
                for (t, &x) in tob[i * dv..(i + 1) * dv].iter_mut().zip(orow.iter()) {
                    *t = *t * inv - mu * x;
                }
                tlb[i] = mu;
            }
        }
    }
}

fn scale_row<T: Real>(row: &mut [T], a: T) {
    for x in row {
        *x *= a;
    }
}

fn add_to<T: Real>(acc: &mut [T], x: &[T]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// Views a slice of `T` as f32 when T is f32.
fn as_f32_mut<T: Real>(x: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: T is f32 (checked by TypeId), so the layouts agree.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut f32, x.len()) })
}

fn as_f32<T: Real>(x: &[T]) -> Option<&[f32]> {
    // SAFETY: as above.
    (TypeId::of::<T>() == TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()) })
}

/// x ← exp(x − shift), elementwise. f32 takes a vectorised polynomial exp (the exponentials are
/// the largest non-GEMM cost of attention); f64 keeps the libm exp, so that the f64 reference is
/// accurate to the last bits.
fn exp_sub<T: Real>(x: &mut [T], shift: &[T]) {
    if let (Some(x32), Some(s32)) = (as_f32_mut(&mut *x), as_f32(shift)) {
        return exp_sub_f32(x32, s32);
    }
    for (a, &b) in x.iter_mut().zip(shift) {
        *a = (*a - b).exp();
    }
}

/// x ← exp(x − shift) for one shift.
fn exp_sub_scalar<T: Real>(x: &mut [T], shift: T) {
    if let (Some(x32), Some(s32)) = (as_f32_mut(&mut *x), as_f32(std::slice::from_ref(&shift))) {
        return exp_sub_scalar_f32(x32, s32[0]);
    }
    for a in x.iter_mut() {
        *a = (*a - shift).exp();
    }
}

/// The f32 loops, compiled for AVX2 where the CPU has it (8 lanes instead of SSE2's 4; no FMA
/// contraction, so both builds round alike).
macro_rules! avx2_dispatch {
    ($name:ident, $avx2:ident, ($($arg:ident: $ty:ty),*), $body:expr) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
                    return unsafe { $avx2($($arg),*) };
                }
            }
            $body
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $avx2($($arg: $ty),*) {
            $body
        }
    };
}

avx2_dispatch!(exp_sub_f32, exp_sub_f32_avx2, (x: &mut [f32], shift: &[f32]), {
    for (a, &b) in x.iter_mut().zip(shift) {
        *a = exp_f32(*a - b);
    }
});

avx2_dispatch!(exp_sub_scalar_f32, exp_sub_scalar_f32_avx2, (x: &mut [f32], shift: f32), {
    for a in x.iter_mut() {
        *a = exp_f32(*a - shift);
    }
});

/// exp(y) in f32 within about 1 ulp for y ≤ 88, branch-free so that it vectorises (the Cephes expf
/// scheme): exp(y) = 2ⁿ·exp(f) with n = round(y·log₂e), f = y − n·ln2 in two parts, exp(f) by a
/// polynomial on |f| ≤ ln2/2. Below −87 it gives 0; above 88 (only for an lse that is not the
/// rows' own) it saturates at exp(88). NaN propagates.
#[inline(always)]
fn exp_f32(y: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let yc = y.clamp(-87.0, 88.0);
    let t = yc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let f = yc - n * C1 - n * C2;
    let poly = ((((1.987_569_1e-4 * f + 1.398_199_9e-3) * f + 8.333_452e-3) * f + 4.166_579_6e-2)
        * f
        + 1.666_666_5e-1)
        * f
        + 0.5;
    let e = poly * f * f + f + 1.0;
    // 2ⁿ from the exponent bits: the low bits of t hold n, |n| ≤ 127 after the clamp.
    let nbits = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits((nbits.wrapping_add(127) as u32) << 23);
    if y < -87.0 {
        0.0
    } else {
        e * scale
    }
}

/// Gradients of the primal, FlashAttention-2 style, recomputing p = exp(s − lse) tile by tile:
/// D = rowsum(dO⊙O), dP = dO Vᵀ, dS = P⊙(dP − D), dQ = c·dS K, dK = c·dSᵀ Q, dV = Pᵀ dO.
/// Two parallel passes without any shared accumulation: one task per (bh, key block) for dK and
/// dV, one per (bh, query block) for dQ (the second recomputes S and dP: 14 instead of 10
/// N²d flops, in exchange for no reduction across tasks).
/// Over the first `keys[bh]` keys of each problem bh (all Nk when `keys` is `None`); the gradients
/// of the other keys (padding) are 0.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    dims: Dims,
    keys: KeyCounts,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    go: &[T],
    scale: T,
    dq: &mut [T],
    dk: &mut [T],
    dv_out: &mut [T],
) {
    let Dims { nq, nk, d, dv, .. } = dims;
    // D_i = Σ_j dO_ij O_ij, one per query row.
    let dsum: Vec<T> = go
        .par_chunks(dv)
        .zip(o.par_chunks(dv))
        .map(|(g, x)| g.iter().zip(x).map(|(&a, &b)| a * b).sum())
        .collect();
    let qt = transpose_heads(q, nq, d);
    let kt = transpose_heads(k, nk, d);
    let vt = transpose_heads(v, nk, dv);
    let got = transpose_heads(go, nq, dv);
    let ctx = BackwardCtx {
        dims,
        keys,
        q,
        k,
        go,
        qt: &qt,
        kt: &kt,
        vt: &vt,
        got: &got,
        lse,
        dsum: &dsum,
        scale,
    };
    let tiles = || {
        (
            vec![T::zero(); BLOCK_Q * BLOCK_K],
            vec![T::zero(); BLOCK_Q * BLOCK_K],
        )
    };

    let kv_tasks: Vec<_> = row_blocks(dk, nk, d, BLOCK_K)
        .zip(row_blocks(dv_out, nk, dv, BLOCK_K))
        .map(|((bh, k0, dkb), (_, _, dvb))| (bh, k0, dkb, dvb))
        .collect();
    kv_tasks
        .into_par_iter()
        .for_each_init(tiles, |(p, ds), (bh, k0, dkb, dvb)| {
            ctx.key_task(p, ds, bh, k0, dkb, dvb)
        });

    let q_tasks: Vec<_> = row_blocks(dq, nq, d, BLOCK_Q).collect();
    q_tasks
        .into_par_iter()
        .for_each_init(tiles, |(pt, dst), (bh, q0, dqb)| {
            ctx.query_task(pt, dst, bh, q0, dqb)
        });
}

/// What every backward task reads; the transposed copies ([BH, w, N]) serve the GEMM's preferred
/// operand layouts.
struct BackwardCtx<'a, T> {
    dims: Dims,
    keys: KeyCounts<'a>,
    q: &'a [T],
    k: &'a [T],
    go: &'a [T],
    qt: &'a [T],
    kt: &'a [T],
    vt: &'a [T],
    got: &'a [T],
    lse: &'a [T],
    dsum: &'a [T],
    scale: T,
}

impl<T: Real> BackwardCtx<'_, T> {
    /// dK and dV of the keys k0.. of problem bh (as many as `dvb` holds), over all queries. The
    /// tiles are row-major queries × keys, so that Pᵀ and dSᵀ are column-major GEMM operands.
    fn key_task(
        &self,
        p: &mut [T],
        ds: &mut [T],
        bh: usize,
        k0: usize,
        dkb: &mut [T],
        dvb: &mut [T],
    ) {
        let Dims { nq, nk, d, dv, .. } = self.dims;
        let (zero, one) = (T::zero(), T::one());
        dkb.fill(zero);
        dvb.fill(zero);
        // Only the keys below this problem's count have gradients; padding keeps its zeros.
        let keys = self.keys.map_or(nk, |n| n[bh]);
        let cols = (dvb.len() / dv).min(keys.saturating_sub(k0));
        if cols == 0 {
            return;
        }
        let (dkb, dvb) = (&mut dkb[..cols * d], &mut dvb[..cols * dv]);
        let k_t = t_block(self.kt, bh, nk, d, k0, cols).t();
        let v_t = t_block(self.vt, bh, nk, dv, k0, cols).t();
        for q0 in (0..nq).step_by(BLOCK_Q) {
            let rows = BLOCK_Q.min(nq - q0);
            let (p, ds) = (&mut p[..rows * cols], &mut ds[..rows * cols]);
            // S = c·Q Kᵀ, dP = dO Vᵀ
            gemm(
                self.scale,
                t_block(self.qt, bh, nq, d, q0, rows),
                k_t,
                zero,
                p,
                cols,
            );
            gemm(
                one,
                t_block(self.got, bh, nq, dv, q0, rows),
                v_t,
                zero,
                ds,
                cols,
            );
            let row0 = bh * nq + q0;
            for ((prow, dsrow), (&lse, &di)) in p
                .chunks_exact_mut(cols)
                .zip(ds.chunks_exact_mut(cols))
                .zip(self.lse[row0..row0 + rows].iter().zip(&self.dsum[row0..]))
            {
                exp_sub_scalar(prow, lse);
                for (x, &pv) in dsrow.iter_mut().zip(prow.iter()) {
                    *x = pv * (*x - di);
                }
            }
            // dV += Pᵀ dO ; dK += c·dSᵀ Q
            let pt = Mat {
                data: &p[..],
                rows: cols,
                cols: rows,
                rs: 1,
                cs: cols,
            };
            let dst = Mat {
                data: &ds[..],
                ..pt
            };
            gemm(one, pt, block(self.go, bh, nq, dv, q0, rows), one, dvb, dv);
            gemm(
                self.scale,
                dst,
                block(self.q, bh, nq, d, q0, rows),
                one,
                dkb,
                d,
            );
        }
    }

    /// dQ of the queries q0.. of problem bh (as many as `dqb` holds), over all keys. The tiles are
    /// row-major keys × queries, so that dS is a column-major GEMM operand.
    fn query_task(&self, pt: &mut [T], dst: &mut [T], bh: usize, q0: usize, dqb: &mut [T]) {
        let Dims { nq, nk, d, dv, .. } = self.dims;
        let rows = dqb.len() / d;
        let (zero, one) = (T::zero(), T::one());
        dqb.fill(zero);
        let q_t = t_block(self.qt, bh, nq, d, q0, rows).t();
        let go_t = t_block(self.got, bh, nq, dv, q0, rows).t();
        let row0 = bh * nq + q0;
        let lse = &self.lse[row0..row0 + rows];
        let dsum = &self.dsum[row0..row0 + rows];
        let keys = self.keys.map_or(nk, |n| n[bh]);
        for k0 in (0..keys).step_by(BLOCK_K) {
            let cols = BLOCK_K.min(keys - k0);
            let (pt, dst) = (&mut pt[..rows * cols], &mut dst[..rows * cols]);
            // Sᵀ = c·K Qᵀ, dPᵀ = V dOᵀ
            gemm(
                self.scale,
                t_block(self.kt, bh, nk, d, k0, cols),
                q_t,
                zero,
                pt,
                rows,
            );
            gemm(
                one,
                t_block(self.vt, bh, nk, dv, k0, cols),
                go_t,
                zero,
                dst,
                rows,
            );
            for (prow, dsrow) in pt.chunks_exact_mut(rows).zip(dst.chunks_exact_mut(rows)) {
                exp_sub(prow, lse);
                for ((x, &pv), &di) in dsrow.iter_mut().zip(prow.iter()).zip(dsum) {
                    *x = pv * (*x - di);
                }
            }
            // dQ += c·dS K
            let ds = Mat {
                data: &dst[..],
                rows,
                cols,
                rs: 1,
                cs: rows,
            };
            gemm(
                self.scale,
                ds,
                block(self.k, bh, nk, d, k0, cols),
                one,
                dqb,
                d,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate_and_handles_the_edges() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let y = -87.0 + 175.0 * i as f64 / 200_000.0;
            let got = exp_f32(y as f32) as f64;
            let want = (y as f32 as f64).exp();
            worst = worst.max(((got - want) / want).abs());
        }
        // f32 has 2⁻²⁴ ≈ 6e-8 relative rounding: stay within a few ulp.
        assert!(worst < 2.5e-7, "exp_f32 relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-100.0), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        let mut row = [0.5f32, -3.0, -90.0, 2.0];
        exp_sub(&mut row, &[0.5, 0.0, 0.0, 2.0]);
        assert_eq!(row[0], 1.0);
        assert!((row[1] as f64 - (-3.0f64).exp()).abs() < 1e-7);
        assert_eq!(row[2], 0.0);
    }
}
