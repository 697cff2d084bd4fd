//! Gated residual out = x + gate ⊙ y (adaLN-zero), x and y [T, C], gate [C] or [G, C].
//! Tangent: ẋ + ġ⊙y + g⊙ẏ.

use crate::dual::Dual;
use crate::error::Result;
use crate::tensor::Tensor;

const OP: &str = "gated_residual";

#[derive(Clone, Debug)]
pub struct GatedResidualGrads {
    pub dx: Tensor,
    /// Same shape as `gate`.
    pub dgate: Tensor,
    pub dy: Tensor,
}

pub fn gated_residual_forward(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    let _ = (x, gate, y);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

pub fn gated_residual_jvp(x: &Dual, gate: &Dual, y: &Dual) -> Result<Dual> {
    let _ = (x, gate, y);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

/// Gradients given the output cotangent gout [T, C].
pub fn gated_residual_backward(
    gate: &Tensor,
    y: &Tensor,
    gout: &Tensor,
) -> Result<GatedResidualGrads> {
    let _ = (gate, y, gout);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}
