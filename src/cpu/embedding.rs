//! CPU reference of the sinusoidal timestep embedding (see crate::ops::embedding for the math).
//! Computed in f64 and stored in T: the embedding is tiny, and the phases ω·t of times in the
//! hundreds would lose digits in f32.

use rayon::prelude::*;

use super::rows::rows_per_task;
use super::Real;
use crate::tensor::Element;

fn wide<T: Real>(v: T) -> f64 {
    <T as Element>::to_f64(v)
}

/// ω_i = max_period^(−i/half), i < half.
fn frequencies(half: usize, max_period: f64) -> Vec<f64> {
    (0..half)
        .map(|i| (-max_period.ln() * i as f64 / half as f64).exp())
        .collect()
}

/// e [B, 2·half] = [cos(ωt), sin(ωt)], and when ṫ is given ė = [−ω sin(ωt), ω cos(ωt)]·ṫ.
pub fn jvp<T: Real>(
    t: &[T],
    t_dot: Option<&[T]>,
    half: usize,
    max_period: f64,
) -> (Vec<T>, Option<Vec<T>>) {
    let w = frequencies(half, max_period);
    let dim = 2 * half;
    let row = |b: usize, e: &mut [T], e_dot: Option<&mut [T]>| {
        let tb = wide(t[b]);
        for (i, &wi) in w.iter().enumerate() {
            let (s, c) = (wi * tb).sin_cos();
            e[i] = T::c(c);
            e[half + i] = T::c(s);
        }
        if let (Some(e_dot), Some(t_dot)) = (e_dot, t_dot) {
            let td = wide(t_dot[b]);
            for (i, &wi) in w.iter().enumerate() {
                let (s, c) = (wi * tb).sin_cos();
                e_dot[i] = T::c(-wi * s * td);
                e_dot[half + i] = T::c(wi * c * td);
            }
        }
    };
    let mut e = vec![T::zero(); t.len() * dim];
    if dim == 0 {
        return (e, t_dot.map(|_| Vec::new()));
    }
    let min_len = rows_per_task(dim);
    match t_dot {
        Some(_) => {
            let mut e_dot = vec![T::zero(); t.len() * dim];
            e.par_chunks_mut(dim)
                .zip(e_dot.par_chunks_mut(dim))
                .enumerate()
                .with_min_len(min_len)
                .for_each(|(b, (e, ed))| row(b, e, Some(ed)));
            (e, Some(e_dot))
        }
        None => {
            e.par_chunks_mut(dim)
                .enumerate()
                .with_min_len(min_len)
                .for_each(|(b, e)| row(b, e, None));
            (e, None)
        }
    }
}

/// The embedding [t.len(), 2·half] of the times `t`.
pub fn forward<T: Real>(t: &[T], half: usize, max_period: f64) -> Vec<T> {
    jvp(t, None, half, max_period).0
}

/// dt_b = Σ_i ge[b, i]·(−ω_i sin(ω_i t_b)) + ge[b, half + i]·ω_i cos(ω_i t_b).
pub fn backward<T: Real>(t: &[T], half: usize, max_period: f64, ge: &[T]) -> Vec<T> {
    let w = frequencies(half, max_period);
    let dim = 2 * half;
    let mut dt = vec![T::zero(); t.len()];
    dt.par_iter_mut()
        .enumerate()
        .with_min_len(rows_per_task(dim))
        .for_each(|(b, d)| {
            let (tb, g) = (wide(t[b]), &ge[b * dim..(b + 1) * dim]);
            let sum: f64 = w
                .iter()
                .enumerate()
                .map(|(i, &wi)| {
                    let (s, c) = (wi * tb).sin_cos();
                    wi * (c * wide(g[half + i]) - s * wide(g[i]))
                })
                .sum();
            *d = T::c(sum);
        });
    dt
}
