//! Sinusoidal timestep embedding of t [B] into [B, dim] (dim even):
//! e = [cos(ω_i τ), sin(ω_i τ)], ω_i = max_period^(−i/half), i < half = dim/2.
//! Tangent with respect to t: ė = [−ω sin(ωτ), ω cos(ωτ)]·τ̇.

use crate::dual::Dual;
use crate::error::Result;
use crate::tensor::Tensor;

const OP: &str = "timestep_embedding";

/// The usual max period of DiT's embedding.
pub const DEFAULT_MAX_PERIOD: f64 = 10000.0;

pub fn timestep_embedding_forward(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    let _ = (t, dim, max_period);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

pub fn timestep_embedding_jvp(t: &Dual, dim: usize, max_period: f64) -> Result<Dual> {
    let _ = (t, dim, max_period);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

/// dt [B] given the cotangent ge [B, dim].
pub fn timestep_embedding_backward(
    t: &Tensor,
    dim: usize,
    max_period: f64,
    ge: &Tensor,
) -> Result<Tensor> {
    let _ = (t, dim, max_period, ge);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}
