//! CPU reference of the elementwise activations (see crate::ops::activation for the math):
//! scalar functions and their derivatives, and slice versions split in blocks across rayon.

use rayon::prelude::*;

use super::Real;

/// Elements per rayon task.
const BLOCK: usize = 1 << 14;

/// The cubic coefficient of the tanh form of GELU.
const GELU_CUBIC: f64 = 0.044715;

/// σ(v), accurate in both tails (it never subtracts from 1). The same arithmetic as
/// `sigmoid_pair`, so that a JVP's primal equals the forward to the bit.
fn sigmoid<T: Real>(v: T) -> T {
    sigmoid_pair(v).0
}

/// z = a(u + 0.044715u³), a = √(2/π): the argument of the tanh in GELU.
fn gelu_arg<T: Real>(u: T) -> T {
    let a = (T::c(2.0) / T::PI()).sqrt();
    a * (u + T::c(GELU_CUBIC) * u * u * u)
}

/// GELU, tanh form: ½u(1 + tanh z) with z = a(u + 0.044715u³), a = √(2/π). Evaluated as
/// u·σ(2z) (the same function, since 1 + tanh z = 2σ(2z)), which keeps full relative precision
/// in the negative tail where 1 + tanh z cancels.
pub fn gelu<T: Real>(u: T) -> T {
    u * sigmoid(T::c(2.0) * gelu_arg(u))
}

/// g'(u) = ½(1 + tanh z) + ½u(1 − tanh² z)·z', i.e. σ(2z) + 2u·σ(2z)σ(−2z)·a(1 + 3·0.044715u²).
pub fn gelu_grad<T: Real>(u: T) -> T {
    let a = (T::c(2.0) / T::PI()).sqrt();
    let z2 = T::c(2.0) * gelu_arg(u);
    let (s, s_neg) = (sigmoid(z2), sigmoid(-z2));
    let dz = a * (T::one() + T::c(3.0 * GELU_CUBIC) * u * u);
    s + T::c(2.0) * u * s * s_neg * dz
}

/// (g(u), g'(u)) from one exponential, for the JVP, which needs both (three exponentials if
/// `gelu` and `gelu_grad` were called apart).
pub fn gelu_with_grad<T: Real>(u: T) -> (T, T) {
    let a = (T::c(2.0) / T::PI()).sqrt();
    let (s, s_neg) = sigmoid_pair(T::c(2.0) * gelu_arg(u));
    let dz = a * (T::one() + T::c(3.0 * GELU_CUBIC) * u * u);
    (u * s, s + T::c(2.0) * u * s * s_neg * dz)
}

/// (σ(v), σ(−v)) from one exponential of −|v|, so that neither overflows nor cancels.
fn sigmoid_pair<T: Real>(v: T) -> (T, T) {
    let e = (-v.abs()).exp();
    let big = T::one() / (T::one() + e);
    let small = e * big;
    if v >= T::zero() {
        (big, small)
    } else {
        (small, big)
    }
}

/// (s(u), s'(u)) from one exponential.
pub fn silu_with_grad<T: Real>(u: T) -> (T, T) {
    let (s, s_neg) = sigmoid_pair(u);
    (u * s, s * (T::one() + u * s_neg))
}

/// SiLU u·σ(u).
pub fn silu<T: Real>(u: T) -> T {
    u * sigmoid(u)
}

/// s'(u) = σ(u)(1 + u(1 − σ(u))), with 1 − σ(u) = σ(−u).
pub fn silu_grad<T: Real>(u: T) -> T {
    sigmoid(u) * (T::one() + u * sigmoid(-u))
}

/// y = f(x) elementwise.
pub fn forward<T: Real>(f: impl Fn(T) -> T + Sync, x: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(BLOCK)
        .zip(x.par_chunks(BLOCK))
        .for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y = f(x)));
    y
}

/// (f(x), f'(x)·ẋ) in one pass; the tangent only when ẋ is present.
pub fn jvp<T: Real>(
    f: impl Fn(T) -> T + Sync,
    f_and_df: impl Fn(T) -> (T, T) + Sync,
    x: &[T],
    x_dot: Option<&[T]>,
) -> (Vec<T>, Option<Vec<T>>) {
    let Some(x_dot) = x_dot else {
        return (forward(f, x), None);
    };
    let mut y = vec![T::zero(); x.len()];
    let mut y_dot = vec![T::zero(); x.len()];
    y.par_chunks_mut(BLOCK)
        .zip(y_dot.par_chunks_mut(BLOCK))
        .zip(x.par_chunks(BLOCK).zip(x_dot.par_chunks(BLOCK)))
        .for_each(|((y, y_dot), (x, x_dot))| {
            for i in 0..x.len() {
                let (v, d) = f_and_df(x[i]);
                y[i] = v;
                y_dot[i] = d * x_dot[i];
            }
        });
    (y, Some(y_dot))
}

/// dx = f'(x)·gy.
pub fn backward<T: Real>(df: impl Fn(T) -> T + Sync, x: &[T], gy: &[T]) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(BLOCK)
        .zip(x.par_chunks(BLOCK).zip(gy.par_chunks(BLOCK)))
        .for_each(|(dx, (x, gy))| {
            for i in 0..x.len() {
                dx[i] = df(x[i]) * gy[i];
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Derivatives are compared on the scale of their O(1) terms: both forms cancel near zeros.
    #[test]
    fn fused_value_and_derivative_match_the_separate_ones() {
        let tails = [-1e6, -3000.0, -400.0, -60.0, 60.0, 400.0, 3000.0, 1e6];
        for u in (-400..=400).map(|i| i as f64 * 0.05).chain(tails) {
            let (g, dg) = gelu_with_grad(u);
            assert!(
                (g - gelu(u)).abs() <= 1e-15 * gelu(u).abs().max(1e-300),
                "gelu({u})"
            );
            assert!(
                (dg - gelu_grad(u)).abs() <= 1e-14 * gelu_grad(u).abs().max(1.0),
                "gelu'({u})"
            );
            let (s, ds) = silu_with_grad(u);
            assert!(
                (s - silu(u)).abs() <= 1e-15 * silu(u).abs().max(1e-300),
                "silu({u})"
            );
            assert!(
                (ds - silu_grad(u)).abs() <= 1e-14 * silu_grad(u).abs().max(1.0),
                "silu'({u})"
            );
        }
    }
}
