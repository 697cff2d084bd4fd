//! Launchers of cuda/rope.cu: rotary position embeddings on token-major heads x [B, N, H, d], one
//! warp per head row (the math is [`crate::ops::rope`]'s). The JVP is the same rotation applied to
//! the tangent, the backward the inverse rotation; the angle tables are f32 on the GPU.

use super::launch::{dtype_suffix, int_arg, pointwise_steps, require_ptrs, Arg, Step};
use super::tensor::{expect_tangent, DeviceTensor};
use crate::error::{Error, Result};
use crate::ops::rope::{rope_dims, RopeDims, RopePairs};
use crate::tensor::DType;

const OP: &str = "rope";
const FILE: &str = "rope.cu";

/// y = R(sign·θ) x pairwise (sign +1: the rotation; −1: its transpose, for the backward). `x` and
/// `y` [B, N, H, d] in `dtype` (y may be x: in place); `cos`, `sin` f32 [N, d/2] or [B, N, d/2]
/// as `dims.per_batch` says.
#[allow(clippy::too_many_arguments)]
pub fn plan_rope(
    dtype: DType,
    dims: RopeDims,
    pairs: RopePairs,
    x: u64,
    y: u64,
    cos: u64,
    sin: u64,
    sign: f32,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(OP, &[("x", x), ("y", y), ("cos", cos), ("sin", sin)])?;
    let RopeDims {
        b,
        n,
        h,
        d,
        per_batch,
    } = dims;
    if [b, n, h, d].contains(&0) || d % 2 != 0 {
        return Err(Error::invalid(
            OP,
            format!("x [{b}, {n}, {h}, {d}]: every dimension at least 1 and d even"),
        ));
    }
    // One warp (32 threads) per head row; the elements (rows · d) must fit too.
    let too_large = || Error::Unsupported(format!("{OP}: x [{b}, {n}, {h}, {d}] is too large"));
    let rows = b
        .checked_mul(n)
        .and_then(|v| v.checked_mul(h))
        .ok_or_else(too_large)?;
    rows.checked_mul(d).ok_or_else(too_large)?;
    let threads = rows.checked_mul(32).ok_or_else(too_large)?;
    pointwise_steps(
        OP,
        FILE,
        format!("rope_{dt}"),
        threads,
        vec![
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::Ptr(cos),
            Arg::Ptr(sin),
            int_arg(OP, "B", b)?,
            int_arg(OP, "N", n)?,
            int_arg(OP, "H", h)?,
            int_arg(OP, "d/2", d / 2)?,
            Arg::I32(per_batch as i32),
            Arg::I32((pairs == RopePairs::Halves) as i32),
            Arg::F32(sign),
        ],
    )
}

/// The tables as the kernel takes them: f32 (converted on the GPU if needed).
fn as_f32(t: &DeviceTensor) -> Result<DeviceTensor> {
    if t.dtype() == DType::F32 {
        Ok(t.clone())
    } else {
        t.to_dtype(DType::F32)
    }
}

fn run(
    x: &DeviceTensor,
    cos: &DeviceTensor,
    sin: &DeviceTensor,
    pairs: RopePairs,
    sign: f32,
) -> Result<DeviceTensor> {
    let dims = rope_dims(x.shape(), cos.shape(), sin.shape())?;
    let (c, s) = (as_f32(cos)?, as_f32(sin)?);
    let gpu = x.gpu();
    let y = gpu.alloc_out(x.shape(), x.dtype())?;
    gpu.run(&plan_rope(
        x.dtype(),
        dims,
        pairs,
        x.ptr(),
        y.ptr(),
        c.ptr(),
        s.ptr(),
        sign,
    )?)?;
    Ok(y)
}

/// x [B, N, H, d] with every pair rotated by its token's angle (cos, sin [N, d/2] or [B, N, d/2],
/// any float dtype, used in f32).
pub fn forward(
    x: &DeviceTensor,
    cos: &DeviceTensor,
    sin: &DeviceTensor,
    pairs: RopePairs,
) -> Result<DeviceTensor> {
    run(x, cos, sin, pairs, 1.0)
}

/// The rotation of x and of its tangent tx (x's shape and dtype).
pub fn jvp(
    x: &DeviceTensor,
    tx: &DeviceTensor,
    cos: &DeviceTensor,
    sin: &DeviceTensor,
    pairs: RopePairs,
) -> Result<(DeviceTensor, DeviceTensor)> {
    expect_tangent(OP, "x", tx, x)?;
    Ok((
        run(x, cos, sin, pairs, 1.0)?,
        run(tx, cos, sin, pairs, 1.0)?,
    ))
}

/// dx = the transpose of the rotation applied to dy [B, N, H, d].
pub fn backward(
    dy: &DeviceTensor,
    cos: &DeviceTensor,
    sin: &DeviceTensor,
    pairs: RopePairs,
) -> Result<DeviceTensor> {
    run(dy, cos, sin, pairs, -1.0)
}
