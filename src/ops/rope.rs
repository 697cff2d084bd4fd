//! Rotary position embeddings on token-major heads x [B, N, H, d] (Wan's and Flux's q and k before
//! attention): pair i of every head of token n is rotated by the angle θ\[n, i\], given as its tables
//! cos, sin [N, d/2] (shared by the batch) or [B, N, d/2] (per entry, e.g. Wan's per-sample 3-D
//! grids). The pairs are (x\[2i\], x\[2i+1\]) ([`RopePairs::Interleaved`]) or (x\[i\], x\[i + d/2\])
//! ([`RopePairs::Halves`]):  (a, b) → (a·cos θ − b·sin θ, a·sin θ + b·cos θ).
//! The op is linear in x and the angles are constants (positions do not move along the ODE), so
//! the tangent is the rotation of ẋ and the backward is the inverse rotation of gy.

use crate::cpu;
pub use crate::cpu::rope::RopeDims;
pub use crate::cpu::rope::RopePairs;
use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::ops::{data, expect_dtype, expect_dual, with_real};
use crate::tensor::{Element, Tensor};

const OP: &str = "rope";

/// The dims of a rope from the shapes of x [B, N, H, d] (d even), cos and sin (both [N, d/2] or
/// both [B, N, d/2]): errors name the tensor and the expected shape.
pub fn rope_dims(x: &[usize], cos: &[usize], sin: &[usize]) -> Result<RopeDims> {
    let &[b, n, h, d] = x else {
        return Err(Error::Rank {
            op: OP,
            tensor: "x".into(),
            expected: 4,
            actual: x.to_vec(),
        });
    };
    if x.contains(&0) {
        return Err(Error::invalid(
            OP,
            format!("tensor `x` has an empty dimension (shape {x:?}); every dimension must be at least 1"),
        ));
    }
    if d % 2 != 0 {
        return Err(Error::Shape {
            op: OP,
            tensor: "x".into(),
            expected: format!("[B, N, H, d] with d even (pairs rotate together), d = {d}"),
            actual: x.to_vec(),
        });
    }
    let half = d / 2;
    let (shared, batched) = ([n, half], [b, n, half]);
    for (name, t) in [("cos", cos), ("sin", sin)] {
        if t != shared && t != batched {
            return Err(Error::Shape {
                op: OP,
                tensor: name.into(),
                expected: format!("[N, d/2] = {shared:?} or [B, N, d/2] = {batched:?}"),
                actual: t.to_vec(),
            });
        }
    }
    if sin != cos {
        return Err(Error::Shape {
            op: OP,
            tensor: "sin".into(),
            expected: format!("cos's shape {cos:?}"),
            actual: sin.to_vec(),
        });
    }
    Ok(RopeDims {
        b,
        n,
        h,
        d,
        per_batch: cos.len() == 3,
    })
}

/// [`rope_dims`], and cos and sin in x's dtype.
fn check(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<RopeDims> {
    let dims = rope_dims(x.shape(), cos.shape(), sin.shape())?;
    expect_dtype(OP, "cos", cos, x.dtype())?;
    expect_dtype(OP, "sin", sin, x.dtype())?;
    Ok(dims)
}

fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, pairs: RopePairs, sign: f64) -> Result<Tensor> {
    let dims = check(x, cos, sin)?;
    with_real!(OP, "x", x.dtype(), T => {
        let y = cpu::rope::rotate::<T>(data(x), data(cos), data(sin), dims, pairs, T::from_f64(sign));
        Tensor::from_vec(y, x.shape())
    })
}

/// x [B, N, H, d] with every pair rotated by its token's angle (f32 or f64).
pub fn rope_forward(x: &Tensor, cos: &Tensor, sin: &Tensor, pairs: RopePairs) -> Result<Tensor> {
    rotate(x, cos, sin, pairs, 1.0)
}

/// The rotation of x and of its tangent (absent when x has none).
pub fn rope_jvp(x: &Dual, cos: &Tensor, sin: &Tensor, pairs: RopePairs) -> Result<Dual> {
    expect_dual(OP, "x", x, x.dtype())?;
    Ok(Dual {
        primal: rotate(&x.primal, cos, sin, pairs, 1.0)?,
        tangent: x
            .tangent
            .as_ref()
            .map(|t| rotate(t, cos, sin, pairs, 1.0))
            .transpose()?,
    })
}

/// dx = the inverse rotation of gy [B, N, H, d] (the rotation is orthogonal for tables with
/// cos² + sin² = 1; in general its transpose, which is what this computes).
pub fn rope_backward(gy: &Tensor, cos: &Tensor, sin: &Tensor, pairs: RopePairs) -> Result<Tensor> {
    rotate(gy, cos, sin, pairs, -1.0)
}
