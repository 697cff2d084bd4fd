//! Elementwise activations, any shape. GELU in its tanh form
//! g(u) = ½u(1 + tanh(a(u + 0.044715u³))), a = √(2/π); SiLU s(u) = u·σ(u). ġ = g'(u)·u̇.

use crate::cpu::activation::{gelu, gelu_grad, gelu_with_grad, silu, silu_grad, silu_with_grad};
use crate::cpu::{self, Real};
use crate::dual::Dual;
use crate::error::Result;
use crate::ops::{data, expect_dtype, expect_dual, expect_shape, tangent_data, with_real};
use crate::tensor::Tensor;

const OP: &str = "activation";

/// An activation and its derivative, as types so that each op compiles to its own inlined loop.
trait Activation {
    fn f<T: Real>(u: T) -> T;
    fn df<T: Real>(u: T) -> T;
    fn f_and_df<T: Real>(u: T) -> (T, T);
}

struct Gelu;
struct Silu;

impl Activation for Gelu {
    fn f<T: Real>(u: T) -> T {
        gelu(u)
    }
    fn df<T: Real>(u: T) -> T {
        gelu_grad(u)
    }
    fn f_and_df<T: Real>(u: T) -> (T, T) {
        gelu_with_grad(u)
    }
}

impl Activation for Silu {
    fn f<T: Real>(u: T) -> T {
        silu(u)
    }
    fn df<T: Real>(u: T) -> T {
        silu_grad(u)
    }
    fn f_and_df<T: Real>(u: T) -> (T, T) {
        silu_with_grad(u)
    }
}

fn forward<A: Activation>(x: &Tensor) -> Result<Tensor> {
    with_real!(OP, "x", x.dtype(), T => {
        Tensor::from_vec(cpu::activation::forward(A::f::<T>, data::<T>(x)), x.shape())
    })
}

fn jvp<A: Activation>(x: &Dual) -> Result<Dual> {
    expect_dual(OP, "x", x, x.dtype())?;
    with_real!(OP, "x", x.dtype(), T => {
        let (y, y_dot) =
            cpu::activation::jvp(A::f::<T>, A::f_and_df::<T>, data::<T>(&x.primal), tangent_data(x));
        Ok(Dual {
            primal: Tensor::from_vec(y, x.shape())?,
            tangent: y_dot.map(|t| Tensor::from_vec(t, x.shape())).transpose()?,
        })
    })
}

fn backward<A: Activation>(x: &Tensor, gy: &Tensor) -> Result<Tensor> {
    expect_dtype(OP, "gy", gy, x.dtype())?;
    expect_shape(OP, "gy", gy, x.shape())?;
    with_real!(OP, "x", x.dtype(), T => {
        Tensor::from_vec(cpu::activation::backward(A::df::<T>, data::<T>(x), data(gy)), x.shape())
    })
}

/// GELU (tanh form) of every element, same shape and dtype (f32 or f64).
pub fn gelu_forward(x: &Tensor) -> Result<Tensor> {
    forward::<Gelu>(x)
}

/// GELU of x and its tangent g'(x)·ẋ (absent when x has none).
pub fn gelu_jvp(x: &Dual) -> Result<Dual> {
    jvp::<Gelu>(x)
}

/// dx = g'(x)·gy, gy of x's shape and dtype.
pub fn gelu_backward(x: &Tensor, gy: &Tensor) -> Result<Tensor> {
    backward::<Gelu>(x, gy)
}

/// SiLU x·σ(x) of every element, same shape and dtype (f32 or f64).
pub fn silu_forward(x: &Tensor) -> Result<Tensor> {
    forward::<Silu>(x)
}

/// SiLU of x and its tangent s'(x)·ẋ (absent when x has none).
pub fn silu_jvp(x: &Dual) -> Result<Dual> {
    jvp::<Silu>(x)
}

/// dx = s'(x)·gy, gy of x's shape and dtype.
pub fn silu_backward(x: &Tensor, gy: &Tensor) -> Result<Tensor> {
    backward::<Silu>(x, gy)
}
