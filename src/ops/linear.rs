//! Linear y = x Wᵀ + b. JVP: ẏ = ẋ Wᵀ (parameters carry no tangent).
//! Backward: dx = dy W, dW = dyᵀ x, db = Σ_rows dy.

use crate::dual::Dual;
use crate::error::Result;
use crate::tensor::Tensor;

const OP: &str = "linear";

/// Gradients of a linear layer; `db` is present when the layer has a bias.
#[derive(Clone, Debug)]
pub struct LinearGrads {
    pub dx: Tensor,
    pub dw: Tensor,
    pub db: Option<Tensor>,
}

/// y [T, Cout] = x [T, Cin] · wᵀ ([Cout, Cin]) + b [Cout].
pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let _ = (x, w, b);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

/// Primal and tangent of the linear layer in one call.
pub fn linear_jvp(x: &Dual, w: &Tensor, b: Option<&Tensor>) -> Result<Dual> {
    let _ = (x, w, b);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

/// Gradients given the output cotangent gy [T, Cout].
pub fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    gy: &Tensor,
) -> Result<LinearGrads> {
    let _ = (x, w, b, gy);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}
