//! The public ops: shape checks once, at this boundary (each error names the tensor), then dispatch
//! to the backend. Each op has `forward`, `jvp` (primal and tangent in one call) and `backward`
//! (the gradient of the primal, for training).

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod layernorm;
pub mod linear;
pub mod mlp;
pub mod residual;
pub mod rmsnorm;
pub mod rope;

pub use activation::{
    gelu_backward, gelu_forward, gelu_jvp, silu_backward, silu_forward, silu_jvp,
};
pub use attention::{
    attention_backward, attention_backward_with_key_lens, attention_forward,
    attention_forward_with_key_lens, attention_jvp, attention_jvp_with_key_lens, AttentionGrads,
    AttentionJvp, AttentionOutput,
};
pub use embedding::{
    timestep_embedding_backward, timestep_embedding_forward, timestep_embedding_jvp,
    DEFAULT_MAX_PERIOD,
};
pub use layernorm::{
    layernorm_mod_backward, layernorm_mod_forward, layernorm_mod_jvp, LayerNormModGrads,
    DEFAULT_EPS,
};
pub use linear::{linear_backward, linear_forward, linear_jvp, LinearGrads};
pub use mlp::{mlp_backward, mlp_forward, mlp_jvp, Mlp, MlpGrads};
pub use residual::{
    gated_residual_backward, gated_residual_forward, gated_residual_jvp, GatedResidualGrads,
};
pub use rmsnorm::{rms_norm_backward, rms_norm_forward, rms_norm_jvp, RmsNormGrads};
pub use rope::{rope_backward, rope_forward, rope_jvp, RopePairs};

use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::tensor::{checked_numel, DType, Element, Tensor};

/// Run `$body` with `$T` bound to the CPU compute type of `$dtype` (f32 or f64), else a dtype error
/// naming `$name`.
macro_rules! with_real {
    ($op:expr, $name:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::tensor::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::tensor::DType::F64 => {
                type $T = f64;
                $body
            }
            other => Err($crate::error::Error::DType {
                op: $op,
                tensor: ($name).to_string(),
                expected: "f32 or f64 (the CPU reference computes in these; convert with to_dtype)"
                    .into(),
                actual: other,
            }),
        }
    };
}
pub(crate) use with_real;

/// Errors unless `eps` is 0 or a normal number of the compute type of `dtype` (f64 for f64, else
/// f32): a positive eps below the smallest normal would make 1/√(var + eps) overflow on a constant
/// (or zero) row in that type, NaN where the f64 math is finite.
pub(crate) fn check_eps(op: &'static str, dtype: DType, eps: f64) -> Result<()> {
    let (smallest, largest, name) = if dtype == DType::F64 {
        (f64::MIN_POSITIVE, f64::MAX, "f64")
    } else {
        (f32::MIN_POSITIVE as f64, f32::MAX as f64, "f32")
    };
    if eps == 0.0 || (smallest..=largest).contains(&eps) {
        Ok(())
    } else {
        Err(Error::invalid(
            op,
            format!(
                "eps must be 0 or between {smallest:e} and {largest:e} (the normal range of \
                 {name}), got {eps}"
            ),
        ))
    }
}

/// Checks the rank, and that no dimension is empty: an op refuses empty tensors rather than
/// allocate outputs sized by the other dimensions (x [2^40, 0] through a linear layer would ask
/// for a [2^40, Cout] result).
pub(crate) fn expect_rank(op: &'static str, name: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        return Err(Error::Rank {
            op,
            tensor: name.to_string(),
            expected: rank,
            actual: t.shape().to_vec(),
        });
    }
    if t.shape().contains(&0) {
        return Err(Error::invalid(
            op,
            format!(
                "tensor `{name}` has an empty dimension (shape {:?}); every dimension must be at least 1",
                t.shape()
            ),
        ));
    }
    Ok(())
}

/// Errors unless `count` tensors of `shape` in `dtype` can be allocated: the byte count does not
/// overflow and, above 1 GiB, the allocator grants it (asked and released at once). An output or
/// intermediate far larger than the op's inputs (attention's o from a long q and a wide v, the
/// MLP's hidden layer from a wide w1) is then an error naming it, instead of an allocation failure
/// that aborts the process.
pub(crate) fn expect_allocatable(
    op: &'static str,
    what: &str,
    shape: &[usize],
    dtype: DType,
    count: usize,
) -> Result<()> {
    let bytes = checked_numel(op, shape, dtype.size_in_bytes())
        .ok()
        .and_then(|n| n.checked_mul(dtype.size_in_bytes() * count.max(1)))
        .filter(|&b| b <= isize::MAX as usize);
    // Below 1 GiB an allocation failure is plain memory pressure, and the ops run often (the
    // DiT's passes): only a larger request is asked of the allocator ahead of time.
    let granted =
        bytes.is_some_and(|b| b < 1 << 30 || Vec::<u8>::new().try_reserve_exact(b).is_ok());
    if granted {
        return Ok(());
    }
    Err(Error::invalid(
        op,
        format!(
            "{what} of shape {shape:?} ({dtype}{}) needs {}, more memory than this machine can \
             allocate",
            if count > 1 {
                format!(", {count} of them")
            } else {
                String::new()
            },
            match bytes {
                Some(b) => format!("{b} bytes"),
                None => "more bytes than memory can address".into(),
            }
        ),
    ))
}

pub(crate) fn expect_shape(
    op: &'static str,
    name: &str,
    t: &Tensor,
    expected: &[usize],
) -> Result<()> {
    if t.rank() != expected.len() {
        return Err(Error::Rank {
            op,
            tensor: name.to_string(),
            expected: expected.len(),
            actual: t.shape().to_vec(),
        });
    }
    if t.shape() != expected {
        return Err(Error::Shape {
            op,
            tensor: name.to_string(),
            expected: format!("{expected:?}"),
            actual: t.shape().to_vec(),
        });
    }
    Ok(())
}

pub(crate) fn expect_dtype(op: &'static str, name: &str, t: &Tensor, dtype: DType) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::DType {
            op,
            tensor: name.to_string(),
            expected: format!("{dtype} (the dtype of the op's first input)"),
            actual: t.dtype(),
        });
    }
    Ok(())
}

/// Checks a dual input: tangent consistent with the primal, dtype equal to the op's dtype.
pub(crate) fn expect_dual(op: &'static str, name: &str, d: &Dual, dtype: DType) -> Result<()> {
    expect_dtype(op, name, &d.primal, dtype)?;
    d.check(op, name)
}

/// A per-row modulation tensor (adaLN scale/shift, residual gate) for `rows × c` activations:
/// shape [c] (one vector for all rows) or [g, c] with g dividing `rows`, row r using vector
/// r / (rows / g) — so [B, C] modulates B samples of N tokens each, and [T, C] every row.
/// Returns g.
pub(crate) fn expect_groups(
    op: &'static str,
    name: &str,
    t: &Tensor,
    rows: usize,
    c: usize,
) -> Result<usize> {
    groups_of(op, name, t.shape(), rows, c)
}

/// `expect_groups` on a bare shape, for backends whose tensors are not host `Tensor`s.
pub(crate) fn groups_of(
    op: &'static str,
    name: &str,
    shape: &[usize],
    rows: usize,
    c: usize,
) -> Result<usize> {
    let bad = || Error::Shape {
        op,
        tensor: name.to_string(),
        expected: format!("[{c}] or [G, {c}] with G dividing the {rows} rows"),
        actual: shape.to_vec(),
    };
    match shape {
        [cc] if *cc == c => Ok(1),
        [g, cc] if *cc == c && *g > 0 && rows % *g == 0 => Ok(*g),
        [_] | [_, _] => Err(bad()),
        _ => Err(Error::Rank {
            op,
            tensor: name.to_string(),
            expected: 2,
            actual: shape.to_vec(),
        }),
    }
}

/// The elements of a tensor already checked to hold `T`.
pub(crate) fn data<T: Element>(t: &Tensor) -> &[T] {
    t.as_slice::<T>()
        .expect("dtype was checked at the op boundary")
}

/// The tangent's elements, if there is a tangent.
pub(crate) fn tangent_data<T: Element>(d: &Dual) -> Option<&[T]> {
    d.tangent.as_ref().map(|t| data::<T>(t))
}
