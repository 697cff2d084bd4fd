//! Elementwise activations, any shape. GELU in its tanh form
//! g(u) = ½u(1 + tanh(a(u + 0.044715u³))), a = √(2/π); SiLU s(u) = u·σ(u). ġ = g'(u)·u̇.

use crate::dual::Dual;
use crate::error::Result;
use crate::tensor::Tensor;

const OP: &str = "activation";

pub fn gelu_forward(x: &Tensor) -> Result<Tensor> {
    let _ = x;
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

pub fn gelu_jvp(x: &Dual) -> Result<Dual> {
    let _ = x;
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

/// dx = g'(x)·gy.
pub fn gelu_backward(x: &Tensor, gy: &Tensor) -> Result<Tensor> {
    let _ = (x, gy);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

pub fn silu_forward(x: &Tensor) -> Result<Tensor> {
    let _ = x;
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

pub fn silu_jvp(x: &Dual) -> Result<Dual> {
    let _ = x;
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

pub fn silu_backward(x: &Tensor, gy: &Tensor) -> Result<Tensor> {
    let _ = (x, gy);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}
