//! The transformer MLP: y = W2·gelu(W1·x + b1) + b2 (GELU tanh form), rows of x [T, C].
//! JVP: ẏ = W2·(gelu'(h) ⊙ W1·ẋ) with h = W1·x + b1.

use crate::dual::Dual;
use crate::error::Result;
use crate::tensor::Tensor;

const OP: &str = "mlp";

/// The MLP's parameters: w1 [Hd, C], b1 [Hd], w2 [C, Hd], b2 [C].
#[derive(Clone, Copy, Debug)]
pub struct Mlp<'a> {
    pub w1: &'a Tensor,
    pub b1: &'a Tensor,
    pub w2: &'a Tensor,
    pub b2: &'a Tensor,
}

#[derive(Clone, Debug)]
pub struct MlpGrads {
    pub dx: Tensor,
    pub dw1: Tensor,
    pub db1: Tensor,
    pub dw2: Tensor,
    pub db2: Tensor,
}

pub fn mlp_forward(x: &Tensor, p: &Mlp) -> Result<Tensor> {
    let _ = (x, p);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

pub fn mlp_jvp(x: &Dual, p: &Mlp) -> Result<Dual> {
    let _ = (x, p);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

/// Gradients given the output cotangent gy [T, C].
pub fn mlp_backward(x: &Tensor, p: &Mlp, gy: &Tensor) -> Result<MlpGrads> {
    let _ = (x, p, gy);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}
