//! Dual tensors: a primal and its tangent (the direction of the JVP).
//!
//! A missing tangent means zero: ops skip the work that would only multiply by it (attention with
//! no tangent on K and V, a parameter-free modulation, a constant input).

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// A tensor and its tangent along the JVP direction, same shape and dtype (checked by the
/// constructors and by every op).
#[derive(Clone, Debug, PartialEq)]
pub struct Dual {
    /// The value.
    pub primal: Tensor,
    /// Its tangent; `None` is a zero tangent (a constant along the direction).
    pub tangent: Option<Tensor>,
}

impl Dual {
    /// A primal with its tangent; they must agree in shape and dtype.
    pub fn new(primal: Tensor, tangent: Tensor) -> Result<Self> {
        let d = Dual {
            primal,
            tangent: Some(tangent),
        };
        d.check("dual", "tensor")?;
        Ok(d)
    }

    /// A primal whose tangent is zero (a constant along the JVP direction).
    pub fn constant(primal: Tensor) -> Self {
        Dual {
            primal,
            tangent: None,
        }
    }

    /// The primal's shape (the tangent's too).
    pub fn shape(&self) -> &[usize] {
        self.primal.shape()
    }

    /// The primal's dtype (the tangent's too).
    pub fn dtype(&self) -> DType {
        self.primal.dtype()
    }

    /// Whether a tangent is present (`false`: zero tangent).
    pub fn has_tangent(&self) -> bool {
        self.tangent.is_some()
    }

    /// The tangent, materialised as zeros when absent.
    pub fn tangent_or_zeros(&self) -> Tensor {
        match &self.tangent {
            Some(t) => t.clone(),
            None => Tensor::zeros(self.primal.shape(), self.primal.dtype()),
        }
    }

    /// Errors unless the tangent (if any) matches the primal in shape and dtype.
    pub fn check(&self, op: &'static str, name: &str) -> Result<()> {
        if let Some(t) = &self.tangent {
            if t.shape() != self.primal.shape() || t.dtype() != self.primal.dtype() {
                return Err(Error::TangentMismatch {
                    op,
                    tensor: name.to_string(),
                    primal_shape: self.primal.shape().to_vec(),
                    primal_dtype: self.primal.dtype(),
                    tangent_shape: t.shape().to_vec(),
                    tangent_dtype: t.dtype(),
                });
            }
        }
        Ok(())
    }
}

impl From<Tensor> for Dual {
    fn from(t: Tensor) -> Self {
        Dual::constant(t)
    }
}
