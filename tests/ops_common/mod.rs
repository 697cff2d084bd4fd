//! Helpers shared by the tests of the row-wise ops (linear, layernorm, activation, mlp,
//! embedding, residual): dual construction, bad-input assertions, and proptest value strategies.
#![allow(dead_code)]

use flashjvp::{DType, Dual, Error, Tensor};
use proptest::prelude::*;

pub fn dual(p: &Tensor, t: &Tensor) -> Dual {
    Dual::new(p.clone(), t.clone()).unwrap()
}

/// A dual whose tangent disagrees with its primal (bypassing `Dual::new`, which would refuse it).
pub fn bad_dual(p: &Tensor, t: Tensor) -> Dual {
    Dual {
        primal: p.clone(),
        tangent: Some(t),
    }
}

pub fn f32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32)
}

pub fn bf16(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
}

pub fn is_shape(e: &Error) -> bool {
    matches!(e, Error::Shape { .. })
}
pub fn is_rank(e: &Error) -> bool {
    matches!(e, Error::Rank { .. })
}
pub fn is_dtype(e: &Error) -> bool {
    matches!(e, Error::DType { .. })
}
pub fn is_tangent(e: &Error) -> bool {
    matches!(e, Error::TangentMismatch { .. })
}
pub fn is_invalid(e: &Error) -> bool {
    matches!(e, Error::Invalid { .. })
}

/// Asserts an error of the expected kind whose message names `name` (a tensor in backticks, or a
/// scalar argument by its name).
pub fn assert_err<T: std::fmt::Debug>(
    r: flashjvp::Result<T>,
    kind: fn(&Error) -> bool,
    name: &str,
) {
    let e = r.expect_err("bad input must be an error");
    assert!(kind(&e), "wrong kind of error: {e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("`{name}`")) || (is_invalid(&e) && msg.contains(name)),
        "error does not name `{name}`: {msg}"
    );
}

/// The dtype error for bf16 inputs names the first input and says to convert.
pub fn assert_bf16_refused<T: std::fmt::Debug>(r: flashjvp::Result<T>, name: &str) {
    let e = r.expect_err("bf16 must be refused by the CPU reference");
    let msg = e.to_string();
    assert!(
        is_dtype(&e) && msg.contains(&format!("`{name}`")) && msg.contains("to_dtype"),
        "{msg}"
    );
}

/// n values in [−3, 3) for property tests.
pub fn values(n: usize) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(-3.0f64..3.0, n)
}

/// Cuts tensors of given shapes, in order, out of one vector of values.
pub struct Cut(std::vec::IntoIter<f64>);

impl Cut {
    pub fn new(v: Vec<f64>) -> Self {
        Cut(v.into_iter())
    }

    pub fn take(&mut self, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        let data: Vec<f64> = self.0.by_ref().take(n).collect();
        assert_eq!(data.len(), n, "not enough values drawn");
        Tensor::from_vec(data, shape).unwrap()
    }
}

/// Checks the adjoint identity lhs = rhs relative to `scale`, a bound on the size of the terms
/// (random values may make the sums themselves cancel).
pub fn adjoint_within(lhs: f64, rhs: f64, scale: f64, tol: f64) -> Result<(), TestCaseError> {
    if (lhs - rhs).abs() <= tol * scale.max(1e-300) {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!(
            "adjoint identity off: {lhs:.15e} vs {rhs:.15e} (scale {scale:.3e})"
        )))
    }
}
