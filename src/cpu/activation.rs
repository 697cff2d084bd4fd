//! CPU reference of the elementwise activations (see crate::ops::activation for the math):
//! scalar functions and their derivatives, and slice versions split in blocks across rayon.

use rayon::prelude::*;

use super::Real;

/// Elements per rayon task.
const BLOCK: usize = 1 << 14;

/// The cubic coefficient of the tanh form of GELU.
const GELU_CUBIC: f64 = 0.044715;

/// σ(v) = 1/(1 + e^(−v)): accurate in both tails (it never subtracts from 1).
fn sigmoid<T: Real>(v: T) -> T {
    T::one() / (T::one() + (-v).exp())
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
    df: impl Fn(T) -> T + Sync,
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
                y[i] = f(x[i]);
                y_dot[i] = df(x[i]) * x_dot[i];
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
