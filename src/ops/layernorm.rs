//! LayerNorm without affine, with adaLN modulation: y = x̂·(1 + scale) + shift, x̂ = (x − μ)/σ,
//! σ = √(var + eps). Tangents on x, scale and shift (DESIGN.md section 3):
//! x̂̇ = (ẋ − mean(ẋ) − x̂·mean(x̂⊙ẋ))/σ ; ẏ = x̂̇(1+s) + x̂ṡ + ḣ.
//! scale and shift are [C] or [G, C] with G dividing the rows (see `expect_groups`).

use crate::dual::Dual;
use crate::error::Result;
use crate::tensor::Tensor;

const OP: &str = "layernorm_mod";

/// The default eps of the CLI contract.
pub const DEFAULT_EPS: f64 = 1e-6;

#[derive(Clone, Debug)]
pub struct LayerNormModGrads {
    pub dx: Tensor,
    /// Same shape as `scale`.
    pub dscale: Tensor,
    /// Same shape as `shift`.
    pub dshift: Tensor,
}

/// y [T, C] from x [T, C], scale and shift ([C] or [G, C]).
pub fn layernorm_mod_forward(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let _ = (x, scale, shift, eps);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

/// Primal and tangent in one call; any input may lack a tangent.
pub fn layernorm_mod_jvp(x: &Dual, scale: &Dual, shift: &Dual, eps: f64) -> Result<Dual> {
    let _ = (x, scale, shift, eps);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

/// Gradients given the output cotangent gy [T, C].
pub fn layernorm_mod_backward(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
    gy: &Tensor,
) -> Result<LayerNormModGrads> {
    let _ = (x, scale, shift, eps, gy);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}
