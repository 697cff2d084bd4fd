//! CPU reference of the linear layer y = x·wᵀ + b (see crate::ops::linear for the math).
//! x is rows × cin, w is cout × cin, y is rows × cout, all row-major.

use super::gemm::{gemm_par, Mat};
use super::rows::sum_rows;
use super::Real;

/// y ← x·wᵀ, plus b on the first `bias_rows` rows of y. x is any view (rows × cin), w a
/// cout × cin view, y row-major x.rows × w.rows. The JVP stacks [x; ẋ] and biases only the
/// primal rows, so both share one GEMM (w is read once).
pub fn affine<T: Real>(x: Mat<T>, w: Mat<T>, b: Option<&[T]>, bias_rows: usize, y: &mut [T]) {
    let n = w.rows;
    if y.is_empty() {
        return;
    }
    let beta = match b {
        Some(b) => {
            y[..bias_rows * n]
                .chunks_mut(n)
                .for_each(|row| row.copy_from_slice(b));
            y[bias_rows * n..].fill(T::zero());
            T::one()
        }
        None => T::zero(),
    };
    gemm_par(T::one(), x, w.t(), beta, y);
}

/// [a; b]: the rows of b below those of a (the primal and tangent rows of one GEMM).
pub fn stack<T: Real>(a: &[T], b: &[T]) -> Vec<T> {
    let mut s = Vec::with_capacity(a.len() + b.len());
    s.extend_from_slice(a);
    s.extend_from_slice(b);
    s
}

/// y [rows, cout] = x·Wᵀ + b for x [rows, cin], w [cout, cin], b \[cout\] (optional).
pub fn forward<T: Real>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    rows: usize,
    cin: usize,
    cout: usize,
) -> Vec<T> {
    let mut y = vec![T::zero(); rows * cout];
    affine(
        Mat::rows(x, rows, cin),
        Mat::rows(w, cout, cin),
        b,
        rows,
        &mut y,
    );
    y
}

/// (y, ẏ) with ẏ = ẋ·wᵀ, present only when ẋ is.
pub fn jvp<T: Real>(
    x: &[T],
    x_dot: Option<&[T]>,
    w: &[T],
    b: Option<&[T]>,
    rows: usize,
    cin: usize,
    cout: usize,
) -> (Vec<T>, Option<Vec<T>>) {
    let Some(x_dot) = x_dot else {
        return (forward(x, w, b, rows, cin, cout), None);
    };
    let xs = stack(x, x_dot);
    let mut ys = vec![T::zero(); 2 * rows * cout];
    affine(
        Mat::rows(&xs, 2 * rows, cin),
        Mat::rows(w, cout, cin),
        b,
        rows,
        &mut ys,
    );
    let y_dot = ys.split_off(rows * cout);
    (ys, Some(y_dot))
}

/// Gradients of the linear layer.
pub struct Grads<T> {
    /// [rows, cin]
    pub dx: Vec<T>,
    /// [cout, cin]
    pub dw: Vec<T>,
    /// Σ_rows gy, the bias gradient (cheap next to the GEMMs; dropped when there is no bias).
    pub db: Vec<T>,
}

/// dx = gy·w, dw = gyᵀ·x, db = Σ_rows gy.
pub fn backward<T: Real>(
    x: &[T],
    w: &[T],
    gy: &[T],
    rows: usize,
    cin: usize,
    cout: usize,
) -> Grads<T> {
    let g = Mat::rows(gy, rows, cout);
    let mut dx = vec![T::zero(); rows * cin];
    gemm_par(T::one(), g, Mat::rows(w, cout, cin), T::zero(), &mut dx);
    let mut dw = vec![T::zero(); cout * cin];
    gemm_par(T::one(), g.t(), Mat::rows(x, rows, cin), T::zero(), &mut dw);
    let db = sum_rows(gy, rows, cout);
    Grads { dx, dw, db }
}
