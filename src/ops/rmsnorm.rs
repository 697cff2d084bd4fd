//! RMSNorm with a weight, over the last axis (the q/k norm of Wan, Flux and SD3's attention):
//! y = x·r·w, r = 1/√(mean(x²) + eps). Tangents on x and w:
//! ẏ = w⊙(ẋ·r − x·r³·mean(x⊙ẋ)) + x·r⊙ẇ. Backward, g = gy⊙w: dx = g·r − x·r³·mean(x⊙g),
//! dw = Σ over rows of gy⊙x·r.

use crate::cpu;
use crate::dual::Dual;
use crate::error::Result;
use crate::ops::{
    check_eps, data, expect_dtype, expect_dual, expect_rank, expect_shape, tangent_data, with_real,
};
use crate::tensor::Tensor;

const OP: &str = "rms_norm";

/// Gradients of RMSNorm.
#[derive(Clone, Debug)]
pub struct RmsNormGrads {
    /// [T, C]
    pub dx: Tensor,
    /// \[C\]
    pub dweight: Tensor,
}

/// Checks x [T, C], weight \[C\] (x's dtype) and eps; returns (T, C).
pub(crate) fn check(x: &Tensor, weight: &Tensor, eps: f64) -> Result<(usize, usize)> {
    expect_rank(OP, "x", x, 2)?;
    let (rows, c) = (x.shape()[0], x.shape()[1]);
    expect_dtype(OP, "weight", weight, x.dtype())?;
    expect_shape(OP, "weight", weight, &[c])?;
    check_eps(OP, x.dtype(), eps)?;
    Ok((rows, c))
}

/// y [T, C] from x [T, C] and weight \[C\] (f32 or f64).
pub fn rms_norm_forward(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let (rows, c) = check(x, weight, eps)?;
    with_real!(OP, "x", x.dtype(), T => {
        Tensor::from_vec(cpu::rmsnorm::forward::<T>(data(x), data(weight), eps), &[rows, c])
    })
}

/// Primal and tangent in one call; x and weight may each lack a tangent.
pub fn rms_norm_jvp(x: &Dual, weight: &Dual, eps: f64) -> Result<Dual> {
    let (rows, c) = check(&x.primal, &weight.primal, eps)?;
    expect_dual(OP, "x", x, x.dtype())?;
    expect_dual(OP, "weight", weight, x.dtype())?;
    with_real!(OP, "x", x.dtype(), T => {
        let (y, y_dot) = cpu::rmsnorm::jvp::<T>(
            data(&x.primal),
            tangent_data(x),
            data(&weight.primal),
            tangent_data(weight),
            eps,
        );
        Ok(Dual {
            primal: Tensor::from_vec(y, &[rows, c])?,
            tangent: y_dot.map(|t| Tensor::from_vec(t, &[rows, c])).transpose()?,
        })
    })
}

/// Gradients given the output cotangent gy [T, C].
pub fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    gy: &Tensor,
) -> Result<RmsNormGrads> {
    let (rows, c) = check(x, weight, eps)?;
    expect_dtype(OP, "gy", gy, x.dtype())?;
    expect_shape(OP, "gy", gy, &[rows, c])?;
    with_real!(OP, "x", x.dtype(), T => {
        let (dx, dw) = cpu::rmsnorm::backward::<T>(data(x), data(weight), eps, data(gy));
        Ok(RmsNormGrads {
            dx: Tensor::from_vec(dx, &[rows, c])?,
            dweight: Tensor::from_vec(dw, &[c])?,
        })
    })
}
