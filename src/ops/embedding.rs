//! Sinusoidal timestep embedding of t \[B\] into [B, dim] (dim even):
//! e = [cos(ω_i τ), sin(ω_i τ)], ω_i = max_period^(−i/half), i < half = dim/2.
//! Tangent with respect to t: ė = [−ω sin(ωτ), ω cos(ωτ)]·τ̇.

use crate::cpu;
use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::ops::{
    data, expect_allocatable, expect_dtype, expect_dual, expect_rank, expect_shape, tangent_data,
    with_real,
};
use crate::tensor::Tensor;

const OP: &str = "timestep_embedding";

/// The usual max period of DiT's embedding.
pub const DEFAULT_MAX_PERIOD: f64 = 10000.0;

/// Checks t [B] and the scalars; returns (B, half).
fn check(t: &Tensor, dim: usize, max_period: f64) -> Result<(usize, usize)> {
    expect_rank(OP, "t", t, 1)?;
    if dim == 0 || dim % 2 != 0 {
        return Err(Error::invalid(
            OP,
            format!("dim must be even and > 0, got {dim}"),
        ));
    }
    if !(max_period.is_finite() && max_period > 0.0) {
        return Err(Error::invalid(
            OP,
            format!("max_period must be finite and > 0, got {max_period}"),
        ));
    }
    // The embedding and its tangent, [B, dim]: dim comes from the caller, not from a tensor.
    expect_allocatable(OP, "the embedding", &[t.shape()[0], dim], t.dtype(), 2)?;
    Ok((t.shape()[0], dim / 2))
}

/// The embedding [B, dim] of t \[B\] (f32 or f64); dim even and > 0, max_period finite and > 0.
pub fn timestep_embedding_forward(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    let (b, half) = check(t, dim, max_period)?;
    with_real!(OP, "t", t.dtype(), T => {
        Tensor::from_vec(cpu::embedding::forward::<T>(data(t), half, max_period), &[b, dim])
    })
}

/// The embedding and its tangent with respect to t (absent when t has none).
pub fn timestep_embedding_jvp(t: &Dual, dim: usize, max_period: f64) -> Result<Dual> {
    let (b, half) = check(&t.primal, dim, max_period)?;
    expect_dual(OP, "t", t, t.dtype())?;
    with_real!(OP, "t", t.dtype(), T => {
        let (e, e_dot) = cpu::embedding::jvp::<T>(data(&t.primal), tangent_data(t), half, max_period);
        Ok(Dual {
            primal: Tensor::from_vec(e, &[b, dim])?,
            tangent: e_dot.map(|d| Tensor::from_vec(d, &[b, dim])).transpose()?,
        })
    })
}

/// dt \[B\] given the cotangent ge [B, dim].
pub fn timestep_embedding_backward(
    t: &Tensor,
    dim: usize,
    max_period: f64,
    ge: &Tensor,
) -> Result<Tensor> {
    let (b, half) = check(t, dim, max_period)?;
    expect_dtype(OP, "ge", ge, t.dtype())?;
    expect_shape(OP, "ge", ge, &[b, dim])?;
    with_real!(OP, "t", t.dtype(), T => {
        Tensor::from_vec(cpu::embedding::backward::<T>(data(t), half, max_period, data(ge)), &[b])
    })
}
