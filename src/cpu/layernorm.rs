//! CPU reference of layernorm with adaLN modulation (see crate::ops::layernorm for the math).
//!
//! Two passes per row. The first gathers the row's sums (mean, biased variance, and for a tangent
//! ẋ its mean and its moment against x) in independent lanes, so that the compiler vectorises the
//! reduction: in T over blocks of 64 elements, the block sums in f64. The values are shifted by the
//! row's first element, which keeps the one-pass variance free of cancellation. The second pass
//! writes y (and ẏ) in T with the row's statistics rounded to T once: the mean as two terms
//! (hi + lo), so that x − mean keeps its accuracy for rows whose mean is large against their
//! spread. f64 inputs compute in f64 throughout; f32 results stay within about 1e-7 (relative) of
//! the f64 ones.

use rayon::prelude::*;

use super::rows::{group_row_sums, rows_per_task, Groups};
use super::Real;
use crate::tensor::Element;

fn wide<T: Real>(v: T) -> f64 {
    <T as Element>::to_f64(v)
}

/// Independent accumulators per reduction: a sequential float sum cannot be reordered, and hence
/// not vectorised; LANES partial sums can.
const LANES: usize = 8;
/// Chunks of LANES elements summed in T before the partial sums are added to the f64 totals: in
/// f32 a block's rounding error stays near 2^-24 · BLOCK, and the arithmetic stays in T (packed f32,
/// no per-element conversion).
const BLOCK: usize = 8;

/// `N` sums over the elements j of three rows `a`, `b`, `c` of equal length (a row not needed is
/// passed twice): `term(a[j], b[j], c[j])` gives element j's N terms in T, summed lane-wise in T
/// over blocks of LANES · BLOCK elements, then in f64.
#[inline(always)]
fn lane_sums<T: Real, const N: usize>(
    a: &[T],
    b: &[T],
    c: &[T],
    term: impl Fn(T, T, T) -> [T; N],
) -> [f64; N] {
    let mut total = [[0.0f64; LANES]; N];
    let n = a.len();
    let (a, b, c) = (a, &b[..n], &c[..n]);
    let full = n / (LANES * BLOCK) * (LANES * BLOCK);
    let flush = |total: &mut [[f64; LANES]; N], acc: &[[T; LANES]; N]| {
        for k in 0..N {
            for l in 0..LANES {
                total[k][l] += wide(acc[k][l]);
            }
        }
    };
    for j0 in (0..full).step_by(LANES * BLOCK) {
        let mut acc = [[T::zero(); LANES]; N];
        let blk = j0..j0 + LANES * BLOCK;
        let (ba, bb, bc) = (&a[blk.clone()], &b[blk.clone()], &c[blk]);
        for ((xa, xb), xc) in ba
            .chunks_exact(LANES)
            .zip(bb.chunks_exact(LANES))
            .zip(bc.chunks_exact(LANES))
        {
            for l in 0..LANES {
                let t = term(xa[l], xb[l], xc[l]);
                for k in 0..N {
                    acc[k][l] += t[k];
                }
            }
        }
        flush(&mut total, &acc);
    }
    let mut acc = [[T::zero(); LANES]; N];
    for j in full..n {
        let t = term(a[j], b[j], c[j]);
        for k in 0..N {
            acc[k][j % LANES] += t[k];
        }
    }
    flush(&mut total, &acc);
    total.map(|t| t.iter().sum())
}

/// One row's statistics: mean (as f64 and as hi + lo in T), 1/σ = 1/√(var + eps) (biased variance).
#[derive(Clone, Copy, Debug)]
struct Stats<T> {
    mean: f64,
    rstd: f64,
    mean_hi: T,
    mean_lo: T,
    rstd_t: T,
}

impl<T: Real> Stats<T> {
    /// From Σ(x−K) and Σ(x−K)² over n elements, K = `shift`.
    fn new(shift: f64, s1: f64, s2: f64, n: usize, eps: f64) -> Self {
        let d1 = s1 / n as f64;
        let mean = shift + d1;
        let var = (s2 / n as f64 - d1 * d1).max(0.0);
        let rstd = 1.0 / (var + eps).sqrt();
        let mean_hi = T::c(mean);
        Stats {
            mean,
            rstd,
            mean_hi,
            mean_lo: T::c(mean - wide(mean_hi)),
            rstd_t: T::c(rstd),
        }
    }

    /// x̂ = (x − mean)/σ in T.
    #[inline(always)]
    fn xhat(&self, x: T) -> T {
        (x - self.mean_hi - self.mean_lo) * self.rstd_t
    }
}

/// Statistics of row `xr` and, with `TAN`, the sums Σẋ and Σ(x−mean)ẋ of the tangent row `xdr`
/// (read only with `TAN`), all from one pass.
#[inline(always)]
fn row_stats<T: Real, const TAN: bool>(xr: &[T], xdr: &[T], eps: f64) -> (Stats<T>, f64, f64) {
    let n = xr.len();
    let k = xr[0];
    let (s1, s2, p, q) = if TAN {
        let [s1, s2, p, q] = lane_sums::<T, 4>(xr, xdr, xr, |x, xd, _| {
            let d = x - k;
            [d, d * d, xd, d * xd]
        });
        (s1, s2, p, q)
    } else {
        let [s1, s2] = lane_sums::<T, 2>(xr, xr, xr, |x, _, _| {
            let d = x - k;
            [d, d * d]
        });
        (s1, s2, 0.0, 0.0)
    };
    let k = wide(k);
    let st = Stats::new(k, s1, s2, n, eps);
    // Σ(x − mean)ẋ = Σ(x − K)ẋ − (mean − K) Σẋ.
    (st, p, q - (st.mean - k) * p)
}

/// y = x̂·(1 + scale) + shift for x rows × c (shape from `scale`).
pub fn forward<T: Real>(x: &[T], scale: Groups<T>, shift: Groups<T>, eps: f64) -> Vec<T> {
    jvp(x, None, scale, None, shift, None, eps).0
}

/// (y, ẏ) with ẏ = x̂̇(1+s) + x̂ṡ + ḣ, x̂̇ = (ẋ − mean(ẋ) − x̂·mean(x̂ẋ))/σ; each tangent term only
/// when its tangent is present, ẏ only when one is. The tangents of scale and shift have the
/// groups of their primals.
pub fn jvp<T: Real>(
    x: &[T],
    x_dot: Option<&[T]>,
    scale: Groups<T>,
    scale_dot: Option<&[T]>,
    shift: Groups<T>,
    shift_dot: Option<&[T]>,
    eps: f64,
) -> (Vec<T>, Option<Vec<T>>) {
    let (rows, c) = (scale.rows, scale.c);
    let inp = JvpIn {
        x,
        x_dot,
        scale,
        scale_dot: scale_dot.map(|d| Groups { data: d, ..scale }),
        shift,
        shift_dot: shift_dot.map(|d| Groups { data: d, ..shift }),
        eps,
    };
    let has_tangent = x_dot.is_some() || scale_dot.is_some() || shift_dot.is_some();
    let mut y = vec![T::zero(); rows * c];
    let mut y_dot = vec![T::zero(); if has_tangent { rows * c } else { 0 }];
    if c > 0 && has_tangent {
        y.par_chunks_mut(c)
            .zip(y_dot.par_chunks_mut(c))
            .enumerate()
            .with_min_len(rows_per_task(c))
            .for_each(|(r, (yr, ydr))| jvp_row(&inp, r, yr, Some(ydr)));
    } else if c > 0 {
        y.par_chunks_mut(c)
            .enumerate()
            .with_min_len(rows_per_task(c))
            .for_each(|(r, yr)| jvp_row(&inp, r, yr, None));
    }
    (y, has_tangent.then_some(y_dot))
}

/// The inputs of [`jvp`].
struct JvpIn<'a, T> {
    x: &'a [T],
    x_dot: Option<&'a [T]>,
    scale: Groups<'a, T>,
    scale_dot: Option<Groups<'a, T>>,
    shift: Groups<'a, T>,
    shift_dot: Option<Groups<'a, T>>,
    eps: f64,
}

/// Row r of [`jvp`], compiled for AVX2 where the CPU has it (8 f32 lanes instead of SSE2's 4; no
/// FMA contraction, so both builds round alike and the forward equals the JVP's primal on any CPU).
fn jvp_row<T: Real>(inp: &JvpIn<T>, r: usize, yr: &mut [T], ydr: Option<&mut [T]>) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { jvp_row_avx2(inp, r, yr, ydr) };
        }
    }
    inp.row(r, yr, ydr)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn jvp_row_avx2<T: Real>(inp: &JvpIn<T>, r: usize, yr: &mut [T], ydr: Option<&mut [T]>) {
    inp.row(r, yr, ydr)
}

impl<T: Real> JvpIn<'_, T> {
    /// y (and ẏ when `ydr` is given) of row r.
    #[inline(always)]
    fn row(&self, r: usize, yr: &mut [T], ydr: Option<&mut [T]>) {
        let c = yr.len();
        let xr = &self.x[r * c..(r + 1) * c];
        let (s, h) = (self.scale.row(r), self.shift.row(r));
        let xdr = self.x_dot.map(|d| &d[r * c..(r + 1) * c]);
        let Some(ydr) = ydr else {
            let (st, _, _) = row_stats::<T, false>(xr, xr, self.eps);
            write_y(yr, xr, s, h, &st);
            return;
        };
        let (st, sum_xd, sum_cxd) = match xdr {
            Some(xdr) => row_stats::<T, true>(xr, xdr, self.eps),
            None => row_stats::<T, false>(xr, xr, self.eps),
        };
        // x̂̇ = a ẋ − b − m x̂ with a = 1/σ, b = mean(ẋ)/σ, m = mean(x̂ẋ)/σ = Σ(x − mean)ẋ/(nσ²).
        let n = c as f64;
        let coef = Coef {
            a: st.rstd_t,
            b: T::c(st.rstd * sum_xd / n),
            m: T::c(st.rstd * st.rstd * sum_cxd / n),
        };
        let sdr = self.scale_dot.map(|d| d.row(r));
        let hdr = self.shift_dot.map(|d| d.row(r));
        let w = RowIn { xr, s, h, st };
        // One loop per combination of present tangents, so that no test runs per element.
        match (xdr, sdr, hdr) {
            (Some(a), Some(b), Some(h)) => w.write::<true, true, true>(yr, ydr, coef, a, b, h),
            (Some(a), Some(b), None) => w.write::<true, true, false>(yr, ydr, coef, a, b, b),
            (Some(a), None, Some(h)) => w.write::<true, false, true>(yr, ydr, coef, a, a, h),
            (Some(a), None, None) => w.write::<true, false, false>(yr, ydr, coef, a, a, a),
            (None, Some(b), Some(h)) => w.write::<false, true, true>(yr, ydr, coef, b, b, h),
            (None, Some(b), None) => w.write::<false, true, false>(yr, ydr, coef, b, b, b),
            (None, None, Some(h)) => w.write::<false, false, true>(yr, ydr, coef, h, h, h),
            (None, None, None) => {
                unreachable!("a tangent row is written only when a tangent exists")
            }
        }
    }
}

/// y = x̂(1 + s) + h of one row.
#[inline(always)]
fn write_y<T: Real>(yr: &mut [T], xr: &[T], s: &[T], h: &[T], st: &Stats<T>) {
    let n = yr.len();
    let (xr, s, h) = (&xr[..n], &s[..n], &h[..n]);
    for j in 0..n {
        yr[j] = st.xhat(xr[j]) * (T::one() + s[j]) + h[j];
    }
}

/// The coefficients of x̂̇ = a ẋ − b − m x̂ in T.
#[derive(Clone, Copy)]
struct Coef<T> {
    a: T,
    b: T,
    m: T,
}

/// One row's primal inputs and statistics.
struct RowIn<'a, T> {
    xr: &'a [T],
    s: &'a [T],
    h: &'a [T],
    st: Stats<T>,
}

impl<T: Real> RowIn<'_, T> {
    /// y and ẏ = x̂̇(1+s) + x̂ṡ + ḣ with each tangent term present when its flag is; the slices of
    /// absent tangents are placeholders that are never read.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn write<const X: bool, const S: bool, const H: bool>(
        &self,
        yr: &mut [T],
        ydr: &mut [T],
        k: Coef<T>,
        xdr: &[T],
        sdr: &[T],
        hdr: &[T],
    ) {
        let n = yr.len();
        let (ydr, xr, s, h) = (&mut ydr[..n], &self.xr[..n], &self.s[..n], &self.h[..n]);
        let xdr = &xdr[..if X { n } else { 0 }];
        let sdr = &sdr[..if S { n } else { 0 }];
        let hdr = &hdr[..if H { n } else { 0 }];
        for j in 0..n {
            let xh = self.st.xhat(xr[j]);
            let one_s = T::one() + s[j];
            yr[j] = xh * one_s + h[j];
            let mut t = T::zero();
            if X {
                t = (k.a * xdr[j] - k.b - k.m * xh) * one_s;
            }
            if S {
                t += xh * sdr[j];
            }
            if H {
                t += hdr[j];
            }
            ydr[j] = t;
        }
    }
}

/// Gradients of layernorm_mod; dscale and dshift have the shapes of scale and shift.
pub struct Grads<T> {
    /// [rows, c]
    pub dx: Vec<T>,
    /// [G, c] of scale.
    pub dscale: Vec<T>,
    /// [G, c] of shift.
    pub dshift: Vec<T>,
}

/// With g = gy·(1+s): dx = (g − mean(g) − x̂·mean(g x̂))/σ, dscale = Σ_group gy·x̂,
/// dshift = Σ_group gy. Per row one pass for the statistics and the two means of g, one to write
/// dx; x̂ is recomputed in T for dscale.
pub fn backward<T: Real>(
    x: &[T],
    scale: Groups<T>,
    shift: Groups<T>,
    eps: f64,
    gy: &[T],
) -> Grads<T> {
    let (rows, c) = (scale.rows, scale.c);
    let mut dx = vec![T::zero(); rows * c];
    let row_stats: Vec<Stats<T>> = if c == 0 {
        Vec::new()
    } else {
        dx.par_chunks_mut(c)
            .enumerate()
            .with_min_len(rows_per_task(c))
            .map(|(r, dxr)| {
                let row = BwdRow {
                    xr: &x[r * c..(r + 1) * c],
                    gr: &gy[r * c..(r + 1) * c],
                    s: scale.row(r),
                };
                bwd_dx_row(&row, dxr, eps)
            })
            .collect()
    };
    let dscale = group_row_sums(rows, c, scale.groups, |r, acc: &mut [T]| {
        let row = BwdRow {
            xr: &x[r * c..(r + 1) * c],
            gr: &gy[r * c..(r + 1) * c],
            s: &[],
        };
        bwd_dscale_row(&row, &row_stats[r], acc)
    });
    let dshift = group_row_sums(rows, c, shift.groups, |r, acc: &mut [T]| {
        acc.iter_mut()
            .zip(&gy[r * c..(r + 1) * c])
            .for_each(|(a, &g)| *a += g)
    });
    Grads { dx, dscale, dshift }
}

/// One row of x and gy (and the scale it reads) in the backward.
struct BwdRow<'a, T> {
    xr: &'a [T],
    gr: &'a [T],
    s: &'a [T],
}

impl<T: Real> BwdRow<'_, T> {
    /// Writes dx = a g − b − m x̂ of the row (g = gy (1 + s); a = 1/σ, b = mean(g)/σ,
    /// m = mean(g x̂)/σ) and returns the row's statistics: one pass for the statistics and the
    /// two means, one to write.
    #[inline(always)]
    fn dx(&self, dxr: &mut [T], eps: f64) -> Stats<T> {
        let c = dxr.len();
        let (xr, gr, s) = (&self.xr[..c], &self.gr[..c], &self.s[..c]);
        let k = xr[0];
        let [s1, s2, sg, sgx] = lane_sums::<T, 4>(xr, gr, s, |x, gy, s| {
            let (d, g) = (x - k, gy * (T::one() + s));
            [d, d * d, g, g * d]
        });
        let k = wide(k);
        let st = Stats::<T>::new(k, s1, s2, c, eps);
        let n = c as f64;
        // Σ g (x − mean) = Σ g (x − K) − (mean − K) Σ g.
        let (a, b) = (st.rstd_t, T::c(st.rstd * sg / n));
        let m = T::c(st.rstd * st.rstd * (sgx - (st.mean - k) * sg) / n);
        for j in 0..c {
            let g = gr[j] * (T::one() + s[j]);
            dxr[j] = a * g - b - m * st.xhat(xr[j]);
        }
        st
    }

    /// acc += gy x̂ (the row's term of dscale).
    #[inline(always)]
    fn dscale(&self, st: &Stats<T>, acc: &mut [T]) {
        let c = acc.len();
        let (xr, gr) = (&self.xr[..c], &self.gr[..c]);
        for j in 0..c {
            acc[j] += gr[j] * st.xhat(xr[j]);
        }
    }
}

/// [`BwdRow::dx`], compiled for AVX2 where the CPU has it (as [`jvp_row`]).
fn bwd_dx_row<T: Real>(row: &BwdRow<T>, dxr: &mut [T], eps: f64) -> Stats<T> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { bwd_dx_row_avx2(row, dxr, eps) };
        }
    }
    row.dx(dxr, eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bwd_dx_row_avx2<T: Real>(row: &BwdRow<T>, dxr: &mut [T], eps: f64) -> Stats<T> {
    row.dx(dxr, eps)
}

/// [`BwdRow::dscale`], compiled for AVX2 where the CPU has it (as [`jvp_row`]).
fn bwd_dscale_row<T: Real>(row: &BwdRow<T>, st: &Stats<T>, acc: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { bwd_dscale_row_avx2(row, st, acc) };
        }
    }
    row.dscale(st, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bwd_dscale_row_avx2<T: Real>(row: &BwdRow<T>, st: &Stats<T>, acc: &mut [T]) {
    row.dscale(st, acc)
}
