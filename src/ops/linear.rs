//! Linear y = x Wᵀ + b. JVP: ẏ = ẋ Wᵀ (parameters carry no tangent).
//! Backward: dx = dy W, dW = dyᵀ x, db = Σ_rows dy.

use crate::cpu;
use crate::dual::Dual;
use crate::error::Result;
use crate::ops::{
    data, expect_allocatable, expect_dtype, expect_dual, expect_rank, expect_shape, tangent_data,
    with_real,
};
use crate::tensor::Tensor;

const OP: &str = "linear";

/// Gradients of a linear layer; `db` is present when the layer has a bias.
#[derive(Clone, Debug)]
pub struct LinearGrads {
    /// [T, Cin]
    pub dx: Tensor,
    /// [Cout, Cin]
    pub dw: Tensor,
    /// \[Cout\]
    pub db: Option<Tensor>,
}

/// Checks x [T, Cin], w [Cout, Cin], b [Cout] (dtype of x); returns (T, Cin, Cout).
fn check(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<(usize, usize, usize)> {
    expect_rank(OP, "x", x, 2)?;
    let (rows, cin) = (x.shape()[0], x.shape()[1]);
    expect_dtype(OP, "w", w, x.dtype())?;
    expect_rank(OP, "w", w, 2)?;
    let cout = w.shape()[0];
    expect_shape(OP, "w", w, &[cout, cin])?;
    if let Some(b) = b {
        expect_dtype(OP, "b", b, x.dtype())?;
        expect_shape(OP, "b", b, &[cout])?;
    }
    // y and its tangent, [T, Cout]: as large as x's rows times w's.
    expect_allocatable(OP, "the output y", &[rows, cout], x.dtype(), 2)?;
    Ok((rows, cin, cout))
}

/// y [T, Cout] = x [T, Cin] · wᵀ ([Cout, Cin]) + b \[Cout\].
pub fn linear_forward(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (rows, cin, cout) = check(x, w, b)?;
    with_real!(OP, "x", x.dtype(), T => {
        let y = cpu::linear::forward::<T>(data(x), data(w), b.map(data), rows, cin, cout);
        Tensor::from_vec(y, &[rows, cout])
    })
}

/// Primal and tangent of the linear layer in one call.
pub fn linear_jvp(x: &Dual, w: &Tensor, b: Option<&Tensor>) -> Result<Dual> {
    let (rows, cin, cout) = check(&x.primal, w, b)?;
    expect_dual(OP, "x", x, x.dtype())?;
    with_real!(OP, "x", x.dtype(), T => {
        let (y, y_dot) = cpu::linear::jvp::<T>(
            data(&x.primal),
            tangent_data(x),
            data(w),
            b.map(data),
            rows,
            cin,
            cout,
        );
        Ok(Dual {
            primal: Tensor::from_vec(y, &[rows, cout])?,
            tangent: y_dot.map(|t| Tensor::from_vec(t, &[rows, cout])).transpose()?,
        })
    })
}

/// Gradients given the output cotangent gy [T, Cout].
pub fn linear_backward(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    gy: &Tensor,
) -> Result<LinearGrads> {
    let (rows, cin, cout) = check(x, w, b)?;
    expect_dtype(OP, "gy", gy, x.dtype())?;
    expect_shape(OP, "gy", gy, &[rows, cout])?;
    with_real!(OP, "x", x.dtype(), T => {
        let g = cpu::linear::backward::<T>(data(x), data(w), data(gy), rows, cin, cout);
        Ok(LinearGrads {
            dx: Tensor::from_vec(g.dx, &[rows, cin])?,
            dw: Tensor::from_vec(g.dw, &[cout, cin])?,
            db: b.map(|_| Tensor::from_vec(g.db, &[cout])).transpose()?,
        })
    })
}
