//! CPU reference of layernorm with adaLN modulation (see crate::ops::layernorm for the math).
//! Each row is normalised in f64 (mean, biased variance, x̂, and the tangent's row means), so the
//! f32 path loses nothing to cancellation; results are stored in T.

use rayon::prelude::*;

use super::rows::{group_row_sums, rows_per_task, Groups};
use super::Real;
use crate::tensor::Element;

fn wide<T: Real>(v: T) -> f64 {
    <T as Element>::to_f64(v)
}

/// Mean and 1/σ = 1/√(var + eps) of one row (biased variance, two passes).
fn stats<T: Real>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| wide(v)).sum::<f64>() / n;
    let var = x.iter().map(|&v| (wide(v) - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
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
    let scale_dot = scale_dot.map(|d| Groups { data: d, ..scale });
    let shift_dot = shift_dot.map(|d| Groups { data: d, ..shift });
    let has_tangent = x_dot.is_some() || scale_dot.is_some() || shift_dot.is_some();
    let mut y = vec![T::zero(); rows * c];
    let mut y_dot = vec![T::zero(); if has_tangent { rows * c } else { 0 }];
    let row = |r: usize, yr: &mut [T], ydr: Option<&mut [T]>| {
        let xr = &x[r * c..(r + 1) * c];
        let (mean, rstd) = stats(xr, eps);
        let (s, h) = (scale.row(r), shift.row(r));
        let xhat = |j: usize| (wide(xr[j]) - mean) * rstd;
        for j in 0..c {
            yr[j] = T::c(xhat(j) * (1.0 + wide(s[j])) + wide(h[j]));
        }
        let Some(ydr) = ydr else { return };
        let xdr = x_dot.map(|d| &d[r * c..(r + 1) * c]);
        // mean(ẋ) and mean(x̂ẋ), the two projections x̂̇ removes.
        let (m1, m2) = xdr.map_or((0.0, 0.0), |xdr| {
            let m1: f64 = xdr.iter().map(|&v| wide(v)).sum();
            let m2: f64 = (0..c).map(|j| xhat(j) * wide(xdr[j])).sum();
            (m1 / c as f64, m2 / c as f64)
        });
        let (sdr, hdr) = (scale_dot.map(|d| d.row(r)), shift_dot.map(|d| d.row(r)));
        for j in 0..c {
            let xh = xhat(j);
            let mut t = 0.0;
            if let Some(xdr) = xdr {
                t += rstd * (wide(xdr[j]) - m1 - xh * m2) * (1.0 + wide(s[j]));
            }
            if let Some(sdr) = sdr {
                t += xh * wide(sdr[j]);
            }
            if let Some(hdr) = hdr {
                t += wide(hdr[j]);
            }
            ydr[j] = T::c(t);
        }
    };
    if c > 0 && has_tangent {
        y.par_chunks_mut(c)
            .zip(y_dot.par_chunks_mut(c))
            .enumerate()
            .with_min_len(rows_per_task(c))
            .for_each(|(r, (yr, ydr))| row(r, yr, Some(ydr)));
    } else if c > 0 {
        y.par_chunks_mut(c)
            .enumerate()
            .with_min_len(rows_per_task(c))
            .for_each(|(r, yr)| row(r, yr, None));
    }
    (y, has_tangent.then_some(y_dot))
}

/// Gradients of layernorm_mod; dscale and dshift have the shapes of scale and shift.
pub struct Grads<T> {
    pub dx: Vec<T>,
    pub dscale: Vec<T>,
    pub dshift: Vec<T>,
}

/// With g = gy·(1+s): dx = (g − mean(g) − x̂·mean(g x̂))/σ, dscale = Σ_group gy·x̂,
/// dshift = Σ_group gy.
pub fn backward<T: Real>(
    x: &[T],
    scale: Groups<T>,
    shift: Groups<T>,
    eps: f64,
    gy: &[T],
) -> Grads<T> {
    let (rows, c) = (scale.rows, scale.c);
    let row_stats: Vec<(f64, f64)> = if c == 0 {
        vec![(0.0, 0.0); rows]
    } else {
        x.par_chunks(c)
            .with_min_len(rows_per_task(c))
            .map(|xr| stats(xr, eps))
            .collect()
    };
    let mut dx = vec![T::zero(); rows * c];
    if c > 0 {
        dx.par_chunks_mut(c)
            .enumerate()
            .with_min_len(rows_per_task(c))
            .for_each(|(r, dxr)| {
                let (xr, gr, s) = (
                    &x[r * c..(r + 1) * c],
                    &gy[r * c..(r + 1) * c],
                    scale.row(r),
                );
                let (mean, rstd) = row_stats[r];
                let (mut mg, mut mgx) = (0.0, 0.0);
                for j in 0..c {
                    let g = wide(gr[j]) * (1.0 + wide(s[j]));
                    mg += g;
                    mgx += g * (wide(xr[j]) - mean) * rstd;
                }
                let (mg, mgx) = (mg / c as f64, mgx / c as f64);
                for j in 0..c {
                    let g = wide(gr[j]) * (1.0 + wide(s[j]));
                    let xh = (wide(xr[j]) - mean) * rstd;
                    dxr[j] = T::c(rstd * (g - mg - xh * mgx));
                }
            });
    }
    let dscale = group_row_sums(rows, c, scale.groups, |r, acc: &mut [T]| {
        let (mean, rstd) = row_stats[r];
        let (xr, gr) = (&x[r * c..(r + 1) * c], &gy[r * c..(r + 1) * c]);
        for j in 0..c {
            acc[j] += T::c(wide(gr[j]) * (wide(xr[j]) - mean) * rstd);
        }
    });
    let dshift = group_row_sums(rows, c, shift.groups, |r, acc: &mut [T]| {
        acc.iter_mut()
            .zip(&gy[r * c..(r + 1) * c])
            .for_each(|(a, &g)| *a += g)
    });
    Grads { dx, dscale, dshift }
}
