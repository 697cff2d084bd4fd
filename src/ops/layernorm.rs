//! LayerNorm without affine, with adaLN modulation: y = x̂·(1 + scale) + shift, x̂ = (x − μ)/σ,
//! σ = √(var + eps). Tangents on x, scale and shift (DESIGN.md section 3):
//! x̂̇ = (ẋ − mean(ẋ) − x̂·mean(x̂⊙ẋ))/σ ; ẏ = x̂̇(1+s) + x̂ṡ + ḣ.
//! scale and shift are \[C\] or [G, C] with G dividing the rows (see `expect_groups`).

use crate::cpu;
use crate::cpu::rows::Groups;
use crate::dual::Dual;
use crate::error::Result;
use crate::ops::{
    check_eps, data, expect_dtype, expect_dual, expect_groups, expect_rank, expect_shape,
    tangent_data, with_real,
};
use crate::tensor::Tensor;

const OP: &str = "layernorm_mod";

/// The default eps of the CLI contract.
pub const DEFAULT_EPS: f64 = 1e-6;

/// Gradients of layernorm with modulation.
#[derive(Clone, Debug)]
pub struct LayerNormModGrads {
    /// [T, C]
    pub dx: Tensor,
    /// Same shape as `scale`.
    pub dscale: Tensor,
    /// Same shape as `shift`.
    pub dshift: Tensor,
}

/// Checks x [T, C], scale and shift ([C] or [G, C], dtype of x) and eps; returns (T, C, G of
/// scale, G of shift).
fn check(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<(usize, usize, usize, usize)> {
    expect_rank(OP, "x", x, 2)?;
    let (rows, c) = (x.shape()[0], x.shape()[1]);
    expect_dtype(OP, "scale", scale, x.dtype())?;
    let gs = expect_groups(OP, "scale", scale, rows, c)?;
    expect_dtype(OP, "shift", shift, x.dtype())?;
    let gh = expect_groups(OP, "shift", shift, rows, c)?;
    check_eps(OP, x.dtype(), eps)?;
    Ok((rows, c, gs, gh))
}

/// y [T, C] from x [T, C], scale and shift (\[C\] or [G, C]).
pub fn layernorm_mod_forward(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (rows, c, gs, gh) = check(x, scale, shift, eps)?;
    with_real!(OP, "x", x.dtype(), T => {
        let y = cpu::layernorm::forward::<T>(
            data(x),
            Groups::new(data(scale), gs, rows, c),
            Groups::new(data(shift), gh, rows, c),
            eps,
        );
        Tensor::from_vec(y, &[rows, c])
    })
}

/// Primal and tangent in one call; any input may lack a tangent.
pub fn layernorm_mod_jvp(x: &Dual, scale: &Dual, shift: &Dual, eps: f64) -> Result<Dual> {
    let (rows, c, gs, gh) = check(&x.primal, &scale.primal, &shift.primal, eps)?;
    expect_dual(OP, "x", x, x.dtype())?;
    expect_dual(OP, "scale", scale, x.dtype())?;
    expect_dual(OP, "shift", shift, x.dtype())?;
    with_real!(OP, "x", x.dtype(), T => {
        let (y, y_dot) = cpu::layernorm::jvp::<T>(
            data(&x.primal),
            tangent_data(x),
            Groups::new(data(&scale.primal), gs, rows, c),
            tangent_data(scale),
            Groups::new(data(&shift.primal), gh, rows, c),
            tangent_data(shift),
            eps,
        );
        Ok(Dual {
            primal: Tensor::from_vec(y, &[rows, c])?,
            tangent: y_dot.map(|t| Tensor::from_vec(t, &[rows, c])).transpose()?,
        })
    })
}

/// Gradients given the output cotangent gy [T, C].
pub fn layernorm_mod_backward(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
    gy: &Tensor,
) -> Result<LayerNormModGrads> {
    let (rows, c, gs, gh) = check(x, scale, shift, eps)?;
    expect_dtype(OP, "gy", gy, x.dtype())?;
    expect_shape(OP, "gy", gy, &[rows, c])?;
    with_real!(OP, "x", x.dtype(), T => {
        let g = cpu::layernorm::backward::<T>(
            data(x),
            Groups::new(data(scale), gs, rows, c),
            Groups::new(data(shift), gh, rows, c),
            eps,
            data(gy),
        );
        Ok(LayerNormModGrads {
            dx: Tensor::from_vec(g.dx, &[rows, c])?,
            dscale: Tensor::from_vec(g.dscale, scale.shape())?,
            dshift: Tensor::from_vec(g.dshift, shift.shape())?,
        })
    })
}
