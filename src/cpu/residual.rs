//! CPU reference of the gated residual out = x + gate·y (see crate::ops::residual for the math).

use rayon::prelude::*;

use super::rows::{group_row_sums, rows_per_task, Groups};
use super::Real;

/// out = x + gate ⊙ y, x and y [gate.rows, gate.c].
pub fn forward<T: Real>(x: &[T], gate: Groups<T>, y: &[T]) -> Vec<T> {
    let c = gate.c;
    let mut out = x.to_vec();
    if c == 0 {
        return out;
    }
    out.par_chunks_mut(c)
        .enumerate()
        .with_min_len(rows_per_task(c))
        .for_each(|(r, o)| {
            let (g, yr) = (gate.row(r), &y[r * c..(r + 1) * c]);
            for j in 0..c {
                o[j] += g[j] * yr[j];
            }
        });
    out
}

/// out̂ = ẋ + ġ·y + g·ẏ, each term only when its tangent is present (ġ has the groups of g);
/// the tangent is absent only when all three are.
pub fn jvp<T: Real>(
    x: &[T],
    x_dot: Option<&[T]>,
    gate: Groups<T>,
    gate_dot: Option<&[T]>,
    y: &[T],
    y_dot: Option<&[T]>,
) -> (Vec<T>, Option<Vec<T>>) {
    let out = forward(x, gate, y);
    if x_dot.is_none() && gate_dot.is_none() && y_dot.is_none() {
        return (out, None);
    }
    let c = gate.c;
    let gate_dot = gate_dot.map(|d| Groups { data: d, ..gate });
    let mut out_dot = x_dot.map_or_else(|| vec![T::zero(); x.len()], <[T]>::to_vec);
    if c > 0 {
        out_dot
            .par_chunks_mut(c)
            .enumerate()
            .with_min_len(rows_per_task(c))
            .for_each(|(r, o)| {
                let span = r * c..(r + 1) * c;
                if let Some(gd) = gate_dot {
                    let (gd, yr) = (gd.row(r), &y[span.clone()]);
                    (0..c).for_each(|j| o[j] += gd[j] * yr[j]);
                }
                if let Some(y_dot) = y_dot {
                    let (g, ydr) = (gate.row(r), &y_dot[span]);
                    (0..c).for_each(|j| o[j] += g[j] * ydr[j]);
                }
            });
    }
    (out, Some(out_dot))
}

/// Gradients of the gated residual.
pub struct Grads<T> {
    /// [rows, c] (the output's cotangent).
    pub dx: Vec<T>,
    /// [G, c], as the gate.
    pub dgate: Vec<T>,
    /// [rows, c]
    pub dy: Vec<T>,
}

/// dx = gout, dgate = Σ_group gout·y, dy = gout·gate.
pub fn backward<T: Real>(gate: Groups<T>, y: &[T], gout: &[T]) -> Grads<T> {
    let (rows, c) = (gate.rows, gate.c);
    let dgate = group_row_sums(rows, c, gate.groups, |r, acc: &mut [T]| {
        let span = r * c..(r + 1) * c;
        let (gr, yr) = (&gout[span.clone()], &y[span]);
        (0..c).for_each(|j| acc[j] += gr[j] * yr[j]);
    });
    let mut dy = vec![T::zero(); rows * c];
    if c > 0 {
        dy.par_chunks_mut(c)
            .enumerate()
            .with_min_len(rows_per_task(c))
            .for_each(|(r, d)| {
                let (g, gr) = (gate.row(r), &gout[r * c..(r + 1) * c]);
                (0..c).for_each(|j| d[j] = gr[j] * g[j]);
            });
    }
    Grads {
        dx: gout.to_vec(),
        dgate,
        dy,
    }
}
