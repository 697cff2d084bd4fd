//! Attention O = softmax(c·Q Kᵀ) V per (batch, head), non-causal, Nq may differ from Nk, dv may
//! differ from d. q [B,H,Nq,d], k [B,H,Nk,d], v [B,H,Nk,dv]; c defaults to 1/√d.
//! The JVP streams over key blocks with the online softmax of DESIGN.md section 3 (memory O(N·d),
//! never an Nq×Nk buffer) and returns o, lse and their tangents. The backward recomputes P from lse.

use crate::dual::Dual;
use crate::error::Result;
use crate::tensor::Tensor;

const OP: &str = "attention";

#[derive(Clone, Debug)]
pub struct AttentionOutput {
    /// [B, H, Nq, dv]
    pub o: Tensor,
    /// Log-sum-exp of the scaled scores per query row, [B, H, Nq].
    pub lse: Tensor,
}

#[derive(Clone, Debug)]
pub struct AttentionJvp {
    /// o and ȯ, [B, H, Nq, dv]; the tangent is absent only when no input had one.
    pub o: Dual,
    /// lse and its tangent μ = Σ p ṡ, [B, H, Nq].
    pub lse: Dual,
}

#[derive(Clone, Debug)]
pub struct AttentionGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
) -> Result<AttentionOutput> {
    let _ = (q, k, v, scale);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

pub fn attention_jvp(q: &Dual, k: &Dual, v: &Dual, scale: Option<f64>) -> Result<AttentionJvp> {
    let _ = (q, k, v, scale);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}

/// dq, dk, dv given the forward's o and lse and the output cotangent go [B,H,Nq,dv].
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    go: &Tensor,
    scale: Option<f64>,
) -> Result<AttentionGrads> {
    let _ = (q, k, v, o, lse, go, scale);
    Err(crate::error::Error::Unsupported(format!(
        "{OP}: not implemented yet"
    )))
}
