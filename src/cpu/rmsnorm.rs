//! CPU reference of RMSNorm with a weight (see crate::ops::rmsnorm for the math): one rayon task
//! per block of rows, each row's sums in f64 (the statistics of a row of C values in T would lose
//! about log2(C) bits), the outputs in T from the row's 1/rms rounded to T once.

use rayon::prelude::*;

use super::rows::rows_per_task;
use super::Real;
use crate::tensor::Element;

fn wide<T: Real>(v: T) -> f64 {
    <T as Element>::to_f64(v)
}

/// 1/√(mean(x²) + eps) of one row, in f64.
fn rrms<T: Real>(x: &[T], eps: f64) -> f64 {
    let ss: f64 = x.iter().map(|&v| wide(v) * wide(v)).sum();
    1.0 / (ss / x.len() as f64 + eps).sqrt()
}

/// y = x·r·w row by row, r = 1/√(mean(x²) + eps), for x rows × c (c = w.len()).
pub fn forward<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let c = w.len();
    let mut y = vec![T::zero(); x.len()];
    let rows = rows_per_task(c);
    y.par_chunks_mut(rows * c)
        .zip(x.par_chunks(rows * c))
        .for_each(|(y, x)| {
            for (yr, xr) in y.chunks_mut(c).zip(x.chunks(c)) {
                let r = T::c(rrms(xr, eps));
                for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
                    *y = x * r * w;
                }
            }
        });
    y
}

/// (y, ẏ): ẏ = w·(ẋ·r − x·r³·mean(x⊙ẋ)) + x·r·ẇ; the tangent only when ẋ or ẇ is present.
pub fn jvp<T: Real>(
    x: &[T],
    x_dot: Option<&[T]>,
    w: &[T],
    w_dot: Option<&[T]>,
    eps: f64,
) -> (Vec<T>, Option<Vec<T>>) {
    if x_dot.is_none() && w_dot.is_none() {
        return (forward(x, w, eps), None);
    }
    let c = w.len();
    let mut y = vec![T::zero(); x.len()];
    let mut y_dot = vec![T::zero(); x.len()];
    let rows = rows_per_task(c);
    y.par_chunks_mut(rows * c)
        .zip(y_dot.par_chunks_mut(rows * c))
        .enumerate()
        .for_each(|(task, (y, yd))| {
            let first = task * rows * c;
            for (i, (yr, ydr)) in y.chunks_mut(c).zip(yd.chunks_mut(c)).enumerate() {
                let at = first + i * c;
                let xr = &x[at..at + c];
                let r = rrms(xr, eps);
                // mean(x⊙ẋ)·r³: the part of ẋ along x that the normalisation removes.
                let k = x_dot.map_or(0.0, |xd| {
                    let xd = &xd[at..at + c];
                    let m: f64 = xr.iter().zip(xd).map(|(&a, &b)| wide(a) * wide(b)).sum();
                    m / c as f64 * r * r * r
                });
                let (rt, kt) = (T::c(r), T::c(k));
                for ((y, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
                    *y = xv * rt * wv;
                }
                // One loop per tangent pattern: no per-element branch, so each vectorises.
                let xdr = x_dot.map(|xd| &xd[at..at + c]);
                match (xdr, w_dot) {
                    (Some(xd), Some(wd)) => {
                        for (j, t) in ydr.iter_mut().enumerate() {
                            *t = w[j] * (xd[j] * rt - xr[j] * kt) + xr[j] * rt * wd[j];
                        }
                    }
                    (Some(xd), None) => {
                        for (j, t) in ydr.iter_mut().enumerate() {
                            *t = w[j] * (xd[j] * rt - xr[j] * kt);
                        }
                    }
                    (None, Some(wd)) => {
                        for (j, t) in ydr.iter_mut().enumerate() {
                            *t = xr[j] * rt * wd[j];
                        }
                    }
                    (None, None) => {} // returned above, with the forward alone
                }
            }
        });
    (y, Some(y_dot))
}

/// dx = r·g − x·r³·mean(x⊙g) with g = gy⊙w; dw = Σ over rows of gy⊙x·r.
pub fn backward<T: Real>(x: &[T], w: &[T], eps: f64, gy: &[T]) -> (Vec<T>, Vec<T>) {
    let c = w.len();
    let mut dx = vec![T::zero(); x.len()];
    let rows = rows_per_task(c);
    let partials: Vec<Vec<f64>> = dx
        .par_chunks_mut(rows * c)
        .enumerate()
        .map(|(task, dx)| {
            let first = task * rows * c;
            let mut dw = vec![0.0f64; c];
            for (i, dxr) in dx.chunks_mut(c).enumerate() {
                let at = first + i * c;
                let (xr, gr) = (&x[at..at + c], &gy[at..at + c]);
                let r = rrms(xr, eps);
                let m: f64 = (0..c).map(|j| wide(xr[j]) * wide(gr[j]) * wide(w[j])).sum();
                let (rt, kt) = (T::c(r), T::c(m / c as f64 * r * r * r));
                for j in 0..c {
                    dxr[j] = gr[j] * w[j] * rt - xr[j] * kt;
                    dw[j] += wide(gr[j]) * wide(xr[j]) * r;
                }
            }
            dw
        })
        .collect();
    let dw = (0..c)
        .map(|j| T::c(partials.iter().map(|p| p[j]).sum()))
        .collect();
    (dx, dw)
}
