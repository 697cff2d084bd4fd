//! The transformer MLP: y = W2·gelu(W1·x + b1) + b2 (GELU tanh form), rows of x [T, C].
//! JVP: ẏ = W2·(gelu'(h) ⊙ W1·ẋ) with h = W1·x + b1.

use crate::cpu;
use crate::cpu::mlp::Params;
use crate::dual::Dual;
use crate::error::Result;
use crate::ops::{
    data, expect_allocatable, expect_dtype, expect_dual, expect_rank, expect_shape, tangent_data,
    with_real,
};
use crate::tensor::{Element, Tensor};

const OP: &str = "mlp";

/// The MLP's parameters: w1 [Hd, C], b1 \[Hd\], w2 [C, Hd], b2 \[C\].
#[derive(Clone, Copy, Debug)]
pub struct Mlp<'a> {
    /// The first layer's weight [Hd, C].
    pub w1: &'a Tensor,
    /// Its bias \[Hd\].
    pub b1: &'a Tensor,
    /// The second layer's weight [C, Hd].
    pub w2: &'a Tensor,
    /// Its bias \[C\].
    pub b2: &'a Tensor,
}

/// Gradients of the MLP's input and parameters, each of its tensor's shape.
#[derive(Clone, Debug)]
pub struct MlpGrads {
    /// [T, C]
    pub dx: Tensor,
    /// [Hd, C]
    pub dw1: Tensor,
    /// \[Hd\]
    pub db1: Tensor,
    /// [C, Hd]
    pub dw2: Tensor,
    /// \[C\]
    pub db2: Tensor,
}

/// Checks x [T, C], w1 [Hd, C], b1 [Hd], w2 [C, Hd], b2 [C] (dtype of x); returns (T, C, Hd).
fn check(x: &Tensor, p: &Mlp) -> Result<(usize, usize, usize)> {
    expect_rank(OP, "x", x, 2)?;
    let (rows, c) = (x.shape()[0], x.shape()[1]);
    expect_dtype(OP, "w1", p.w1, x.dtype())?;
    expect_rank(OP, "w1", p.w1, 2)?;
    let hd = p.w1.shape()[0];
    expect_shape(OP, "w1", p.w1, &[hd, c])?;
    expect_dtype(OP, "b1", p.b1, x.dtype())?;
    expect_shape(OP, "b1", p.b1, &[hd])?;
    expect_dtype(OP, "w2", p.w2, x.dtype())?;
    expect_shape(OP, "w2", p.w2, &[c, hd])?;
    expect_dtype(OP, "b2", p.b2, x.dtype())?;
    expect_shape(OP, "b2", p.b2, &[c])?;
    // The hidden layer [T, Hd]: the JVP holds pre-activations and tangents of both rows (4x).
    expect_allocatable(OP, "the hidden layer", &[rows, hd], x.dtype(), 4)?;
    Ok((rows, c, hd))
}

fn params<'a, T: Element>(p: &Mlp<'a>, c: usize, hd: usize) -> Params<'a, T> {
    Params {
        w1: data(p.w1),
        b1: data(p.b1),
        w2: data(p.w2),
        b2: data(p.b2),
        c,
        hd,
    }
}

/// y [T, C] from x [T, C] (f32 or f64; the parameters in x's dtype).
pub fn mlp_forward(x: &Tensor, p: &Mlp) -> Result<Tensor> {
    let (rows, c, hd) = check(x, p)?;
    with_real!(OP, "x", x.dtype(), T => {
        Tensor::from_vec(cpu::mlp::forward::<T>(data(x), &params(p, c, hd), rows), &[rows, c])
    })
}

/// y and its tangent from x's tangent; the parameters are constant along the direction.
pub fn mlp_jvp(x: &Dual, p: &Mlp) -> Result<Dual> {
    let (rows, c, hd) = check(&x.primal, p)?;
    expect_dual(OP, "x", x, x.dtype())?;
    with_real!(OP, "x", x.dtype(), T => {
        let (y, y_dot) = cpu::mlp::jvp::<T>(data(&x.primal), tangent_data(x), &params(p, c, hd), rows);
        Ok(Dual {
            primal: Tensor::from_vec(y, &[rows, c])?,
            tangent: y_dot.map(|t| Tensor::from_vec(t, &[rows, c])).transpose()?,
        })
    })
}

/// Gradients given the output cotangent gy [T, C].
pub fn mlp_backward(x: &Tensor, p: &Mlp, gy: &Tensor) -> Result<MlpGrads> {
    let (rows, c, hd) = check(x, p)?;
    expect_dtype(OP, "gy", gy, x.dtype())?;
    expect_shape(OP, "gy", gy, &[rows, c])?;
    with_real!(OP, "x", x.dtype(), T => {
        let g = cpu::mlp::backward::<T>(data(x), &params(p, c, hd), data(gy), rows);
        Ok(MlpGrads {
            dx: Tensor::from_vec(g.dx, &[rows, c])?,
            dw1: Tensor::from_vec(g.dw1, &[hd, c])?,
            db1: Tensor::from_vec(g.db1, &[hd])?,
            dw2: Tensor::from_vec(g.dw2, &[c, hd])?,
            db2: Tensor::from_vec(g.db2, &[c])?,
        })
    })
}
