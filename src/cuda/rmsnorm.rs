//! Launchers of cuda/rmsnorm.cu: RMSNorm with a weight over the last axis (forward, JVP, backward),
//! one warp per row, 8 rows per block; the weight gradient a column reduction in f32 with atomics.
//! The math is [`crate::ops::rmsnorm`]'s; the launch contract is the kernel file's header.

use super::launch::{dtype_suffix, int_arg, require_ptrs, Arg, Launch, Step};
use super::tensor::{expect_tangent, expect_tensor, DeviceTensor};
use crate::error::{Error, Result};
use crate::tensor::DType;

const OP: &str = "rms_norm";
const FILE: &str = "rmsnorm.cu";
/// Rows per block of the row kernels (one warp each).
const ROWS_PER_BLOCK: usize = 8;

/// Rows T and width C of x [T, C].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RmsDims {
    /// Rows.
    pub t: usize,
    /// Width (the normalised axis).
    pub c: usize,
}

fn dims_args(d: RmsDims) -> Result<[Arg; 2]> {
    if d.t == 0 || d.c == 0 {
        return Err(Error::invalid(
            OP,
            format!("x is [{}, {}]: T and C must be at least 1", d.t, d.c),
        ));
    }
    Ok([int_arg(OP, "T", d.t)?, int_arg(OP, "C", d.c)?])
}

/// eps as the kernels take it: 0 or a normal f32 (see [`crate::ops::check_eps`]).
fn eps_arg(eps: f64) -> Result<Arg> {
    crate::ops::check_eps(OP, DType::F32, eps)?;
    Ok(Arg::F32(eps as f32))
}

fn row_launch(kernel: String, d: RmsDims, args: Vec<Arg>) -> Result<Step> {
    Ok(Step::Kernel(Launch::new(
        OP,
        FILE,
        kernel,
        (d.t.div_ceil(ROWS_PER_BLOCK) as u64, 1, 1),
        (32 * ROWS_PER_BLOCK as u32, 1, 1),
        0,
        args,
    )?))
}

/// Device pointers of the JVP (0: a zero tangent, or an output not written).
#[derive(Clone, Copy, Debug, Default)]
pub struct JvpPtrs {
    /// x [T, C].
    pub x: u64,
    /// The tangent of x (0: zero).
    pub tx: u64,
    /// weight \[C\], x's dtype.
    pub w: u64,
    /// The tangent of weight (0: zero).
    pub tw: u64,
    /// y [T, C] (0: not written).
    pub y: u64,
    /// The tangent of y [T, C].
    pub ty: u64,
    /// 1/rms of each row, f32 \[T\] (0: not written; the backward needs it).
    pub rrms: u64,
}

/// y = x·r·w (and, when `rrms` is non-null, r f32 \[T\]).
pub fn plan_forward(
    dtype: DType,
    d: RmsDims,
    x: u64,
    w: u64,
    y: u64,
    rrms: u64,
    eps: f64,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(OP, &[("x", x), ("weight", w)])?;
    if y == 0 && rrms == 0 {
        return Err(Error::invalid(OP, "the forward writes neither y nor rrms"));
    }
    let [t, c] = dims_args(d)?;
    Ok(vec![row_launch(
        format!("rms_norm_fwd_{dt}"),
        d,
        vec![
            Arg::Ptr(x),
            Arg::Ptr(w),
            Arg::Ptr(y),
            Arg::Ptr(rrms),
            t,
            c,
            eps_arg(eps)?,
        ],
    )?])
}

/// y (when non-null), ty and r (when non-null) in one pass; null tangents are zero.
pub fn plan_jvp(dtype: DType, d: RmsDims, p: JvpPtrs, eps: f64) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(OP, &[("x", p.x), ("weight", p.w), ("ty", p.ty)])?;
    let [t, c] = dims_args(d)?;
    Ok(vec![row_launch(
        format!("rms_norm_jvp_{dt}"),
        d,
        vec![
            Arg::Ptr(p.x),
            Arg::Ptr(p.tx),
            Arg::Ptr(p.w),
            Arg::Ptr(p.tw),
            Arg::Ptr(p.y),
            Arg::Ptr(p.ty),
            Arg::Ptr(p.rrms),
            t,
            c,
            eps_arg(eps)?,
        ],
    )?])
}

/// Device pointers of the backward.
#[derive(Clone, Copy, Debug, Default)]
pub struct BwdPtrs {
    /// The output cotangent dy [T, C].
    pub dy: u64,
    /// The forward's input x [T, C].
    pub x: u64,
    /// weight \[C\].
    pub w: u64,
    /// The forward's 1/rms per row, f32 \[T\].
    pub rrms: u64,
    /// Output gradient of x [T, C].
    pub dx: u64,
    /// Output gradient of weight, f32 \[C\] (0: not computed).
    pub dw: u64,
}

/// Slices of the rows in the weight reduction: ceil(T / 256), at most 65535.
pub fn weight_slices(d: RmsDims) -> usize {
    d.t.div_ceil(256).clamp(1, 65535)
}

/// dx (`rms_norm_bwd`), then, when `dw` is non-null, dw zeroed and summed over the rows
/// (`rms_norm_bwd_weight`, [`weight_slices`] slices adding their partials atomically).
pub fn plan_backward(dtype: DType, d: RmsDims, p: BwdPtrs) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(
        OP,
        &[
            ("dy", p.dy),
            ("x", p.x),
            ("weight", p.w),
            ("rrms", p.rrms),
            ("dx", p.dx),
        ],
    )?;
    let [t, c] = dims_args(d)?;
    let mut steps = vec![row_launch(
        format!("rms_norm_bwd_{dt}"),
        d,
        vec![
            Arg::Ptr(p.dy),
            Arg::Ptr(p.x),
            Arg::Ptr(p.w),
            Arg::Ptr(p.rrms),
            Arg::Ptr(p.dx),
            t,
            c,
        ],
    )?];
    if p.dw != 0 {
        steps.push(Step::zero(p.dw, d.c * 4));
        steps.push(Step::Kernel(Launch::new(
            OP,
            FILE,
            format!("rms_norm_bwd_weight_{dt}"),
            (d.c.div_ceil(32) as u64, weight_slices(d) as u64, 1),
            (32, 8, 1),
            0,
            vec![
                Arg::Ptr(p.dy),
                Arg::Ptr(p.x),
                Arg::Ptr(p.rrms),
                Arg::Ptr(p.dw),
                t,
                c,
            ],
        )?));
    }
    Ok(steps)
}

/// Checks x [T, C] and weight \[C\] (x's dtype) on the device; returns the dims.
fn check_device(x: &DeviceTensor, w: &DeviceTensor) -> Result<RmsDims> {
    let &[t, c] = x.shape() else {
        return Err(Error::Rank {
            op: OP,
            tensor: "x".into(),
            expected: 2,
            actual: x.shape().to_vec(),
        });
    };
    expect_tensor(OP, "weight", w, &[c], x.dtype())?;
    Ok(RmsDims { t, c })
}

/// y = RMSNorm(x)·weight on device tensors (x [T, C], weight \[C\], one dtype).
pub fn forward(x: &DeviceTensor, w: &DeviceTensor, eps: f64) -> Result<DeviceTensor> {
    let d = check_device(x, w)?;
    let gpu = x.gpu();
    let y = gpu.alloc_out(x.shape(), x.dtype())?;
    gpu.run(&plan_forward(
        x.dtype(),
        d,
        x.ptr(),
        w.ptr(),
        y.ptr(),
        0,
        eps,
    )?)?;
    Ok(y)
}

/// y and its tangent (tangents on x and weight, either may be absent = zero, not both).
pub fn jvp(
    x: &DeviceTensor,
    tx: Option<&DeviceTensor>,
    w: &DeviceTensor,
    tw: Option<&DeviceTensor>,
    eps: f64,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let d = check_device(x, w)?;
    for (name, t, primal) in [("x", tx, x), ("weight", tw, w)] {
        t.map_or(Ok(()), |t| expect_tangent(OP, name, t, primal))?;
    }
    if tx.is_none() && tw.is_none() {
        return Err(Error::invalid(
            OP,
            "the JVP needs a tangent on x or weight (use forward otherwise)",
        ));
    }
    let gpu = x.gpu();
    let y = gpu.alloc_out(x.shape(), x.dtype())?;
    let ty = gpu.alloc_out(x.shape(), x.dtype())?;
    let p = JvpPtrs {
        x: x.ptr(),
        tx: tx.map_or(0, |t| t.ptr()),
        w: w.ptr(),
        tw: tw.map_or(0, |t| t.ptr()),
        y: y.ptr(),
        ty: ty.ptr(),
        rrms: 0,
    };
    gpu.run(&plan_jvp(x.dtype(), d, p, eps)?)?;
    Ok((y, ty))
}

/// dx (x's dtype) and dweight (f32 \[C\]) given the output cotangent dy [T, C]; the rows' 1/rms
/// are recomputed from x first (one read of x).
pub fn backward(
    x: &DeviceTensor,
    w: &DeviceTensor,
    eps: f64,
    dy: &DeviceTensor,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let d = check_device(x, w)?;
    expect_tensor(OP, "dy", dy, x.shape(), x.dtype())?;
    let gpu = x.gpu();
    let rrms = gpu.alloc_out(&[d.t], DType::F32)?;
    let dx = gpu.alloc_out(x.shape(), x.dtype())?;
    let dw = gpu.alloc_out(&[d.c], DType::F32)?;
    let mut plan = plan_forward(x.dtype(), d, x.ptr(), w.ptr(), 0, rrms.ptr(), eps)?;
    let p = BwdPtrs {
        dy: dy.ptr(),
        x: x.ptr(),
        w: w.ptr(),
        rrms: rrms.ptr(),
        dx: dx.ptr(),
        dw: dw.ptr(),
    };
    plan.extend(plan_backward(x.dtype(), d, p)?);
    gpu.run(&plan)?;
    Ok((dx, dw))
}
