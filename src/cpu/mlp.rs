//! CPU reference of the GELU MLP y = gelu(x·W1ᵀ + b1)·W2ᵀ + b2 (see crate::ops::mlp for the math).

use rayon::prelude::*;

use super::activation::{self, gelu, gelu_grad, gelu_with_grad};
use super::gemm::Mat;
use super::linear::{self, affine, stack};
use super::Real;

/// Elements per rayon task in the activation pass.
const BLOCK: usize = 1 << 14;

/// The MLP's parameters: w1 [hd, c], b1 \[hd\], w2 [c, hd], b2 \[c\].
#[derive(Clone, Copy)]
pub struct Params<'a, T> {
    /// [hd, c], row-major.
    pub w1: &'a [T],
    /// \[hd\]
    pub b1: &'a [T],
    /// [c, hd], row-major.
    pub w2: &'a [T],
    /// \[c\]
    pub b2: &'a [T],
    /// Model width (input and output features).
    pub c: usize,
    /// Hidden width.
    pub hd: usize,
}

/// h = x·W1ᵀ + b1 for x [rows, c].
fn hidden<T: Real>(x: &[T], p: &Params<T>, rows: usize) -> Vec<T> {
    let mut h = vec![T::zero(); rows * p.hd];
    affine(
        Mat::rows(x, rows, p.c),
        Mat::rows(p.w1, p.hd, p.c),
        Some(p.b1),
        rows,
        &mut h,
    );
    h
}

/// y = a·W2ᵀ + b2 for `rows` rows of a [·, hd], the bias on the first `bias_rows`.
fn output<T: Real>(a: &[T], p: &Params<T>, rows: usize, bias_rows: usize) -> Vec<T> {
    let mut y = vec![T::zero(); rows * p.c];
    affine(
        Mat::rows(a, rows, p.hd),
        Mat::rows(p.w2, p.c, p.hd),
        Some(p.b2),
        bias_rows,
        &mut y,
    );
    y
}

/// y [rows, c] = W2·gelu(W1·x + b1) + b2 for x [rows, c].
pub fn forward<T: Real>(x: &[T], p: &Params<T>, rows: usize) -> Vec<T> {
    let a = activation::forward(gelu, &hidden(x, p, rows));
    output(&a, p, rows, rows)
}

/// (y, ẏ) with ẏ = (gelu'(h) ⊙ ẋ·W1ᵀ)·W2ᵀ. The primal and tangent rows are stacked, [x; ẋ], so
/// each layer is one GEMM over 2·rows rows (the weights are read once); the bias goes on the
/// primal rows only, and gelu and its tangent are applied in place on the stacked hidden rows.
pub fn jvp<T: Real>(
    x: &[T],
    x_dot: Option<&[T]>,
    p: &Params<T>,
    rows: usize,
) -> (Vec<T>, Option<Vec<T>>) {
    let Some(x_dot) = x_dot else {
        return (forward(x, p, rows), None);
    };
    let xs = stack(x, x_dot);
    let mut hs = vec![T::zero(); 2 * rows * p.hd];
    affine(
        Mat::rows(&xs, 2 * rows, p.c),
        Mat::rows(p.w1, p.hd, p.c),
        Some(p.b1),
        rows,
        &mut hs,
    );
    drop(xs);
    let (h, h_dot) = hs.split_at_mut(rows * p.hd);
    h.par_chunks_mut(BLOCK)
        .zip(h_dot.par_chunks_mut(BLOCK))
        .for_each(|(h, h_dot)| {
            for (u, u_dot) in h.iter_mut().zip(h_dot) {
                let (g, dg) = gelu_with_grad(*u);
                *u_dot *= dg;
                *u = g;
            }
        });
    let mut ys = output(&hs, p, 2 * rows, rows);
    let y_dot = ys.split_off(rows * p.c);
    (ys, Some(y_dot))
}

/// Gradients of the MLP's input and parameters, each laid out as its tensor.
pub struct Grads<T> {
    /// [rows, c]
    pub dx: Vec<T>,
    /// [hd, c]
    pub dw1: Vec<T>,
    /// \[hd\]
    pub db1: Vec<T>,
    /// [c, hd]
    pub dw2: Vec<T>,
    /// \[c\]
    pub db2: Vec<T>,
}

/// All five gradients, recomputing h: the second layer's backward gives da, dW2, db2;
/// dh = gelu'(h)·da; the first layer's backward gives dx, dW1, db1.
pub fn backward<T: Real>(x: &[T], p: &Params<T>, gy: &[T], rows: usize) -> Grads<T> {
    let h = hidden(x, p, rows);
    let a = activation::forward(gelu, &h);
    let second = linear::backward(&a, p.w2, gy, rows, p.hd, p.c);
    drop(a);
    let dh = activation::backward(gelu_grad, &h, &second.dx);
    let first = linear::backward(x, p.w1, &dh, rows, p.c, p.hd);
    Grads {
        dx: first.dx,
        dw1: first.dw,
        db1: first.db,
        dw2: second.dw,
        db2: second.db,
    }
}
