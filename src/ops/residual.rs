//! Gated residual out = x + gate ⊙ y (adaLN-zero), x and y [T, C], gate \[C\] or [G, C].
//! Tangent: ẋ + ġ⊙y + g⊙ẏ.

use crate::cpu;
use crate::cpu::rows::Groups;
use crate::dual::Dual;
use crate::error::Result;
use crate::ops::{
    data, expect_dtype, expect_dual, expect_groups, expect_rank, expect_shape, tangent_data,
    with_real,
};
use crate::tensor::Tensor;

const OP: &str = "gated_residual";

/// Gradients of the gated residual.
#[derive(Clone, Debug)]
pub struct GatedResidualGrads {
    /// [T, C] (equal to the output's cotangent).
    pub dx: Tensor,
    /// Same shape as `gate`.
    pub dgate: Tensor,
    /// [T, C]
    pub dy: Tensor,
}

/// Checks x [T, C] (when given), gate ([C] or [G, C]) and y [T, C] against the dtype of the first
/// input; returns (T, C, G).
fn check(x: Option<&Tensor>, gate: &Tensor, y: &Tensor) -> Result<(usize, usize, usize)> {
    let dtype = x.map_or(gate.dtype(), Tensor::dtype);
    // The rows come from x, or from y in the backward (which takes no x).
    let (name, lead) = match x {
        Some(x) => ("x", x),
        None => ("y", y),
    };
    expect_dtype(OP, name, lead, dtype)?;
    expect_rank(OP, name, lead, 2)?;
    let (rows, c) = (lead.shape()[0], lead.shape()[1]);
    expect_dtype(OP, "gate", gate, dtype)?;
    let groups = expect_groups(OP, "gate", gate, rows, c)?;
    expect_dtype(OP, "y", y, dtype)?;
    expect_shape(OP, "y", y, &[rows, c])?;
    Ok((rows, c, groups))
}

/// x + gate ⊙ y, [T, C], in x's dtype (f32 or f64).
pub fn gated_residual_forward(x: &Tensor, gate: &Tensor, y: &Tensor) -> Result<Tensor> {
    let (rows, c, groups) = check(Some(x), gate, y)?;
    with_real!(OP, "x", x.dtype(), T => {
        let out = cpu::residual::forward::<T>(data(x), Groups::new(data(gate), groups, rows, c), data(y));
        Tensor::from_vec(out, &[rows, c])
    })
}

/// The output and its tangent ẋ + ġ⊙y + g⊙ẏ; any input may lack a tangent.
pub fn gated_residual_jvp(x: &Dual, gate: &Dual, y: &Dual) -> Result<Dual> {
    let (rows, c, groups) = check(Some(&x.primal), &gate.primal, &y.primal)?;
    expect_dual(OP, "x", x, x.dtype())?;
    expect_dual(OP, "gate", gate, x.dtype())?;
    expect_dual(OP, "y", y, x.dtype())?;
    with_real!(OP, "x", x.dtype(), T => {
        let (out, out_dot) = cpu::residual::jvp::<T>(
            data(&x.primal),
            tangent_data(x),
            Groups::new(data(&gate.primal), groups, rows, c),
            tangent_data(gate),
            data(&y.primal),
            tangent_data(y),
        );
        Ok(Dual {
            primal: Tensor::from_vec(out, &[rows, c])?,
            tangent: out_dot.map(|t| Tensor::from_vec(t, &[rows, c])).transpose()?,
        })
    })
}

/// Gradients given the output cotangent gout [T, C].
pub fn gated_residual_backward(
    gate: &Tensor,
    y: &Tensor,
    gout: &Tensor,
) -> Result<GatedResidualGrads> {
    let (rows, c, groups) = check(None, gate, y)?;
    expect_dtype(OP, "gout", gout, gate.dtype())?;
    expect_shape(OP, "gout", gout, &[rows, c])?;
    with_real!(OP, "gate", gate.dtype(), T => {
        let g = cpu::residual::backward::<T>(Groups::new(data(gate), groups, rows, c), data(y), data(gout));
        Ok(GatedResidualGrads {
            dx: Tensor::from_vec(g.dx, &[rows, c])?,
            dgate: Tensor::from_vec(g.dgate, gate.shape())?,
            dy: Tensor::from_vec(g.dy, &[rows, c])?,
        })
    })
}
