//! Launchers of cuda/layernorm_mod.cu: layernorm (no affine) with adaLN modulation, its JVP, its
//! backward and the reduction of the modulation gradients.
//!
//! The kernels take the modulation vectors (scale, shift, their tangents and gradients) in f32
//! [G, C] with one G for all of them, G dividing T (row t uses group t / (T/G)); device tensors of
//! another dtype are converted to f32 here, and the host-level entry points (see [`super::ops`])
//! also bring \[C\] and [G, C] of different G to a common G.

use super::context::Gpu;
use super::launch::{check_groups, dtype_suffix, int_arg, require_ptrs, Arg, Launch, Step};
use super::tensor::{check_disjoint, expect_tensor, ranges_overlap, DeviceTensor};
use crate::error::{Error, Result};
use crate::tensor::DType;

const OP: &str = "layernorm_mod";
const FILE: &str = "layernorm_mod.cu";

/// Rows T, columns C and modulation groups G.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LnDims {
    /// Rows T of x [T, C].
    pub t: usize,
    /// Columns C: the normalised width.
    pub c: usize,
    /// Modulation groups G, dividing T (row t uses group t / (T/G)).
    pub g: usize,
}

/// The G of a modulation tensor ([C] or [G, C]), with the CPU op's errors.
pub(crate) use crate::ops::groups_of;

/// Checks x [T, C] and the kernels' int and grid limits.
pub fn check_x(shape: &[usize]) -> Result<(usize, usize)> {
    if shape.len() != 2 {
        return Err(Error::Rank {
            op: OP,
            tensor: "x".into(),
            expected: 2,
            actual: shape.to_vec(),
        });
    }
    let (t, c) = (shape[0], shape[1]);
    if t == 0 || c == 0 {
        return Err(Error::invalid(OP, format!("empty x {shape:?}")));
    }
    int_arg(OP, "T", t)?;
    int_arg(OP, "C", c)?;
    Ok((t, c))
}

/// eps as the kernels take it: finite and >= 0 in f32 too (an eps of 3.5e38 or more becomes inf
/// in f32, and every rstd 0).
fn eps_arg(eps: f64) -> Result<Arg> {
    if !(eps.is_finite() && eps >= 0.0 && (eps as f32).is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("eps must be finite in f32 and >= 0, got {eps}"),
        ));
    }
    Ok(Arg::F32(eps as f32))
}

/// The kernels' (T, C, G) arguments; errors unless T, C, G >= 1 and G divides T (row t reads group
/// t / (T / G): any other G would read past the modulation vectors).
fn dims_args(d: LnDims) -> Result<[Arg; 3]> {
    check_groups(OP, d.t, d.c, d.g)?;
    Ok([
        int_arg(OP, "T", d.t)?,
        int_arg(OP, "C", d.c)?,
        int_arg(OP, "G", d.g)?,
    ])
}

/// Rows (warps) per block of the row kernels: 4, unless `FLASHJVP_LN_ROWS_PER_BLOCK` (1..=8, read
/// once per process; other values are ignored) says otherwise. The registers allow 16 warps per SM
/// either way; blocks of 4 retire sooner. On an H200 (bf16, docs/gpu-runs.md) 4 rows per block took
/// 2-4 % less time than 8 in the forward, JVP and backward.
pub fn rows_per_block() -> usize {
    static R: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *R.get_or_init(|| {
        std::env::var("FLASHJVP_LN_ROWS_PER_BLOCK")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|r| (1..=8).contains(r))
            .unwrap_or(4)
    })
}

fn row_launch(kernel: String, d: LnDims, args: Vec<Arg>) -> Result<Step> {
    let r = rows_per_block();
    Ok(Step::Kernel(Launch::new(
        OP,
        FILE,
        kernel,
        (d.t.div_ceil(r) as u64, 1, 1),
        (32 * r as u32, 1, 1),
        0,
        args,
    )?))
}

/// y (and, when the pointers are non-null, mean and rstd f32 \[T\]). Null scale/shift mean zero.
#[allow(clippy::too_many_arguments)]
pub fn plan_forward(
    dtype: DType,
    d: LnDims,
    x: u64,
    scale: u64,
    shift: u64,
    y: u64,
    mean: u64,
    rstd: u64,
    eps: f64,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(OP, &[("x", x), ("y", y)])?;
    let [t, c, g] = dims_args(d)?;
    let args = vec![
        Arg::Ptr(x),
        Arg::Ptr(scale),
        Arg::Ptr(shift),
        Arg::Ptr(y),
        Arg::Ptr(mean),
        Arg::Ptr(rstd),
        t,
        c,
        g,
        eps_arg(eps)?,
    ];
    Ok(vec![row_launch(
        format!("layernorm_mod_fwd_{dt}"),
        d,
        args,
    )?])
}

/// Pointers of the JVP; 0 means zero (inputs) or not written (mean, rstd).
#[derive(Clone, Copy, Debug, Default)]
pub struct JvpPtrs {
    /// x [T, C] in the plan's dtype (required).
    pub x: u64,
    /// Tangent of x, [T, C] (0: zero).
    pub tx: u64,
    /// scale, f32 [G, C] (0: zero).
    pub scale: u64,
    /// shift, f32 [G, C] (0: zero).
    pub shift: u64,
    /// Tangent of scale, f32 [G, C] (0: zero).
    pub tscale: u64,
    /// Tangent of shift, f32 [G, C] (0: zero).
    pub tshift: u64,
    /// Output y [T, C] (required).
    pub y: u64,
    /// Output tangent of y, [T, C] (required).
    pub ty: u64,
    /// Output row means of the normalised rows, f32 \[T\] (0: not written).
    pub mean: u64,
    /// Output 1/sqrt(var + eps) of the normalised rows, f32 \[T\] (0: not written).
    pub rstd: u64,
}

/// Which register-resident JVP kernel rows of width C take (cuda/layernorm_mod.cu, `Chunks`): the
/// narrow one (6 chunks of 16 bytes per lane: C <= 1536 in 16 bits, 768 in f32; 128 registers, two
/// blocks per SM) or the wide one (8 chunks: C <= 2048 / 1024; one block per SM), which takes only
/// the widths between the two limits. Longer rows stream in either (the narrow one runs them).
/// The plain narrow JVP kernel reads its rows with cache hints (cuda/layernorm_mod.cu, `load16`): on
/// an H200 (bf16, 4 rows per block) 2374 and 2573 GB/s against 2189 and 2305 without
/// (docs/gpu-runs.md). `FLASHJVP_LN_JVP_ROWS=narrow|wide|pipe` forces one, so that a GPU run can time
/// them on the same rows; `pipe` is only taken when forced (not yet timed on a GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JvpRows {
    /// `layernorm_mod_jvp_{dt}` (6 chunks, two blocks per SM); also the kernel of streamed rows.
    Narrow,
    /// `layernorm_mod_jvp_wide_{dt}` (8 chunks, one block per SM).
    Wide,
    /// `layernorm_mod_jvp_pipe_{dt}`: the narrow kernel's registers, two rows per warp whose loads
    /// go through shared memory (cp.async) ahead of the reductions ([`pipe_shared_bytes`]).
    Pipe,
}

/// Rows per warp of the pipelined JVP kernel (cuda/layernorm_mod.cu, `PIPE_ROWS`).
pub const PIPE_ROWS: usize = 2;

/// Dynamic shared memory of the pipelined JVP kernel with `warps` warps per block: per warp
/// [`PIPE_ROWS`] rows of x and ẋ, 6 chunks of 16 bytes per lane each (the narrow kernel's registers),
/// whatever the width: 12 KiB a warp.
pub fn pipe_shared_bytes(warps: usize) -> usize {
    warps * PIPE_ROWS * 2 * 6 * 32 * 16
}

impl JvpRows {
    /// `FLASHJVP_LN_JVP_ROWS`, read once per process (other values are ignored).
    fn forced() -> Option<JvpRows> {
        static FORCED: std::sync::OnceLock<Option<JvpRows>> = std::sync::OnceLock::new();
        *FORCED.get_or_init(|| match std::env::var("FLASHJVP_LN_JVP_ROWS").as_deref() {
            Ok("narrow") => Some(JvpRows::Narrow),
            Ok("wide") => Some(JvpRows::Wide),
            Ok("pipe") => Some(JvpRows::Pipe),
            _ => None,
        })
    }

    /// The kernel for rows of width `c` in `dtype`: [`JvpRows::by_width`], unless
    /// `FLASHJVP_LN_JVP_ROWS` forces one.
    pub fn for_width(dtype: DType, c: usize) -> JvpRows {
        Self::forced().unwrap_or_else(|| Self::by_width(dtype, c))
    }

    /// The register geometry by width alone (no override): the narrow kernel up to 6 chunks per
    /// lane, the wide one up to 8, the narrow one (streaming) beyond.
    pub fn by_width(dtype: DType, c: usize) -> JvpRows {
        let per_chunk = 16 / dtype.size_in_bytes(); // elements per 16-byte chunk
        if c > 32 * per_chunk * 6 && c <= 32 * per_chunk * 8 {
            JvpRows::Wide
        } else {
            JvpRows::Narrow
        }
    }

    fn infix(self) -> &'static str {
        match self {
            JvpRows::Narrow => "",
            JvpRows::Wide => "_wide",
            JvpRows::Pipe => "_pipe",
        }
    }
}

/// The JVP: y = layernorm(x)·(1 + scale) + shift and its tangent ty, by the kernel
/// [`JvpRows::for_width`] picks. Errors unless T, C, G >= 1 with G dividing T and eps is finite
/// and >= 0.
pub fn plan_jvp(dtype: DType, d: LnDims, p: JvpPtrs, eps: f64) -> Result<Vec<Step>> {
    plan_jvp_on(JvpRows::for_width(dtype, d.c), dtype, d, p, eps)
}

/// [`plan_jvp`] on the kernel `rows` names, whatever the width (every kernel takes every width: rows
/// that do not fit its registers are streamed).
pub fn plan_jvp_on(
    rows: JvpRows,
    dtype: DType,
    d: LnDims,
    p: JvpPtrs,
    eps: f64,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(OP, &[("x", p.x), ("y", p.y), ("ty", p.ty)])?;
    let [t, c, g] = dims_args(d)?;
    // The kernel reads x and ẋ through the non-coherent cache (ld.global.nc), which asks that they
    // stay unwritten while it runs: no in-place JVP.
    let bytes =
        d.t.saturating_mul(d.c)
            .saturating_mul(dtype.size_in_bytes());
    for (input, i) in [("x", p.x), ("tx", p.tx)] {
        for (output, o) in [("y", p.y), ("ty", p.ty)] {
            if i != 0 && ranges_overlap((i, bytes), (o, bytes)) {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "output `{output}` at {o:#x} overlaps input `{input}` at {i:#x} \
                         ({bytes} bytes each): the JVP does not run in place"
                    ),
                ));
            }
        }
    }
    let args = vec![
        Arg::Ptr(p.x),
        Arg::Ptr(p.tx),
        Arg::Ptr(p.scale),
        Arg::Ptr(p.shift),
        Arg::Ptr(p.tscale),
        Arg::Ptr(p.tshift),
        Arg::Ptr(p.y),
        Arg::Ptr(p.ty),
        Arg::Ptr(p.mean),
        Arg::Ptr(p.rstd),
        t,
        c,
        g,
        eps_arg(eps)?,
    ];
    let kernel = format!("layernorm_mod_jvp{}_{dt}", rows.infix());
    if rows != JvpRows::Pipe {
        return Ok(vec![row_launch(kernel, d, args)?]);
    }
    let warps = rows_per_block();
    Ok(vec![Step::Kernel(Launch::new(
        OP,
        FILE,
        kernel,
        (d.t.div_ceil(warps * PIPE_ROWS) as u64, 1, 1),
        (32 * warps as u32, 1, 1),
        pipe_shared_bytes(warps),
        args,
    )?)])
}

/// The gated residual fused in front of the forward or JVP (residual_layernorm_mod_*): the row that
/// is normalised is x1 = x + gate ⊙ y (gate f32 [G, C] with the modulation's G), with tangent
/// ẋ1 = ẋ + ġate ⊙ y + gate ⊙ ẏ, written to `x1` (`tx1`) as gated_residual_{fwd,jvp} would write it;
/// the fusion saves reading x1 (and ẋ1) back. `ty` and `tgate` may be 0 (zero); `y`, `gate`, `x1`
/// and, for the JVP, `tx1` are required.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResPtrs {
    /// The residual branch's output y [T, C] in the plan's dtype (required).
    pub y: u64,
    /// Tangent of y, [T, C] (0: zero).
    pub ty: u64,
    /// gate, f32 [G, C] (required).
    pub gate: u64,
    /// Tangent of gate, f32 [G, C] (0: zero).
    pub tgate: u64,
    /// Output x1 [T, C] (required).
    pub x1: u64,
    /// Output ẋ1 [T, C] (required by the JVP; ignored by the forward).
    pub tx1: u64,
}

/// x1 = x + gate ⊙ r.y (written to r.x1), then the argument `y` = layernorm(x1) modulated by
/// scale and shift (0: zero); mean and rstd of x1 when non-null.
#[allow(clippy::too_many_arguments)]
pub fn plan_residual_forward(
    dtype: DType,
    d: LnDims,
    x: u64,
    r: ResPtrs,
    scale: u64,
    shift: u64,
    y: u64,
    mean: u64,
    rstd: u64,
    eps: f64,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(
        OP,
        &[
            ("x", x),
            ("y", r.y),
            ("gate", r.gate),
            ("x1", r.x1),
            ("out", y),
        ],
    )?;
    let [t, c, g] = dims_args(d)?;
    let args = vec![
        Arg::Ptr(x),
        Arg::Ptr(r.y),
        Arg::Ptr(r.gate),
        Arg::Ptr(r.x1),
        Arg::Ptr(scale),
        Arg::Ptr(shift),
        Arg::Ptr(y),
        Arg::Ptr(mean),
        Arg::Ptr(rstd),
        t,
        c,
        g,
        eps_arg(eps)?,
    ];
    Ok(vec![row_launch(
        format!("residual_layernorm_mod_fwd_{dt}"),
        d,
        args,
    )?])
}

/// The JVP of [`plan_residual_forward`]: `p.x`/`p.tx` are the residual's x and ẋ, `p.y`/`p.ty` the
/// normalised outputs; x1 and ẋ1 are written through `r`.
pub fn plan_residual_jvp(
    dtype: DType,
    d: LnDims,
    p: JvpPtrs,
    r: ResPtrs,
    eps: f64,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(
        OP,
        &[
            ("x", p.x),
            ("y", r.y),
            ("gate", r.gate),
            ("x1", r.x1),
            ("tx1", r.tx1),
            ("out", p.y),
            ("tout", p.ty),
        ],
    )?;
    let [t, c, g] = dims_args(d)?;
    let args = vec![
        Arg::Ptr(p.x),
        Arg::Ptr(p.tx),
        Arg::Ptr(r.y),
        Arg::Ptr(r.ty),
        Arg::Ptr(r.gate),
        Arg::Ptr(r.tgate),
        Arg::Ptr(r.x1),
        Arg::Ptr(r.tx1),
        Arg::Ptr(p.scale),
        Arg::Ptr(p.shift),
        Arg::Ptr(p.tscale),
        Arg::Ptr(p.tshift),
        Arg::Ptr(p.y),
        Arg::Ptr(p.ty),
        Arg::Ptr(p.mean),
        Arg::Ptr(p.rstd),
        t,
        c,
        g,
        eps_arg(eps)?,
    ];
    // No pipelined kernel with the residual in front: `pipe` takes the narrow one here.
    let infix = match JvpRows::for_width(dtype, d.c) {
        JvpRows::Pipe => JvpRows::Narrow.infix(),
        rows => rows.infix(),
    };
    Ok(vec![row_launch(
        format!("residual_layernorm_mod_jvp{infix}_{dt}"),
        d,
        args,
    )?])
}

/// Pointers of the backward: mean and rstd from the forward; dscale and dshift (f32 [G, C], 0 =
/// not wanted) are zeroed and accumulated into.
#[derive(Clone, Copy, Debug, Default)]
pub struct BwdPtrs {
    /// Cotangent of y, [T, C] in the plan's dtype.
    pub dy: u64,
    /// The forward's input x [T, C].
    pub x: u64,
    /// scale, f32 [G, C] (0: zero).
    pub scale: u64,
    /// The forward's row means, f32 \[T\].
    pub mean: u64,
    /// The forward's 1/sqrt(var + eps), f32 \[T\].
    pub rstd: u64,
    /// Added to the input cotangent (0: nothing); may be `dx` itself, accumulating in place (the
    /// residual stream's gradient in a block's backward).
    pub dres: u64,
    /// Output gradient of x, [T, C] (plus `dres`).
    pub dx: u64,
    /// Output gradient of scale, f32 [G, C] (0: not computed).
    pub dscale: u64,
    /// Output gradient of shift, f32 [G, C] (0: not computed).
    pub dshift: u64,
}

/// Slices per group of the parameter reduction (cuda/README.md: ceil((T/G)/256)).
pub fn param_slices(d: LnDims) -> usize {
    (d.t / d.g.max(1)).div_ceil(256).clamp(1, 65535)
}

/// dx from dy (`layernorm_mod_bwd`), then, when `dscale` or `dshift` is non-null, those zeroed
/// and summed over each group's rows (`layernorm_mod_bwd_params`: [`param_slices`] slices per
/// group, each adding its partial atomically). Errors unless T, C, G >= 1 and G divides T (and,
/// for the reduction, G <= 65535).
pub fn plan_backward(dtype: DType, d: LnDims, p: BwdPtrs) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(
        OP,
        &[
            ("dy", p.dy),
            ("x", p.x),
            ("mean", p.mean),
            ("rstd", p.rstd),
            ("dx", p.dx),
        ],
    )?;
    let [t, c, g] = dims_args(d)?;
    let mut steps = vec![row_launch(
        format!("layernorm_mod_bwd_{dt}"),
        d,
        vec![
            Arg::Ptr(p.dy),
            Arg::Ptr(p.x),
            Arg::Ptr(p.scale),
            Arg::Ptr(p.mean),
            Arg::Ptr(p.rstd),
            Arg::Ptr(p.dres),
            Arg::Ptr(p.dx),
            t,
            c,
            g,
        ],
    )?];
    if p.dscale == 0 && p.dshift == 0 {
        return Ok(steps);
    }
    for ptr in [p.dscale, p.dshift] {
        if ptr != 0 {
            steps.push(Step::zero(ptr, d.g * d.c * 4));
        }
    }
    steps.push(Step::Kernel(Launch::new(
        OP,
        FILE,
        format!("layernorm_mod_bwd_params_{dt}"),
        (d.c.div_ceil(32) as u64, d.g as u64, param_slices(d) as u64),
        (32, 8, 1),
        0,
        vec![
            Arg::Ptr(p.dy),
            Arg::Ptr(p.x),
            Arg::Ptr(p.mean),
            Arg::Ptr(p.rstd),
            Arg::Ptr(p.dscale),
            Arg::Ptr(p.dshift),
            t,
            c,
            g,
        ],
    )?));
    Ok(steps)
}

/// A modulation input as the kernels take it: f32 (converted on the GPU if needed).
fn as_f32(t: &DeviceTensor) -> Result<DeviceTensor> {
    if t.dtype() == DType::F32 {
        Ok(t.clone())
    } else {
        t.to_dtype(DType::F32)
    }
}

/// Checks x and the optional modulation tensors (all of one G); returns the dims and the f32
/// modulation tensors in the order given.
fn check_device(
    x: &DeviceTensor,
    mods: &[(&str, Option<&DeviceTensor>)],
) -> Result<(LnDims, Vec<Option<DeviceTensor>>)> {
    let (t, c) = check_x(x.shape())?;
    let mut g = None;
    let mut out = Vec::new();
    for (name, m) in mods {
        match m {
            None => out.push(None),
            Some(m) => {
                let gm = groups_of(OP, name, m.shape(), t, c)?;
                if *g.get_or_insert(gm) != gm {
                    return Err(Error::Unsupported(format!(
                        "layernorm_mod on the GPU: `{name}` has {gm} groups but another modulation \
                         input has {}; the kernels take one G (the host-level op expands them)",
                        g.unwrap_or(1)
                    )));
                }
                out.push(Some(as_f32(m)?));
            }
        }
    }
    let g = g.unwrap_or(1);
    if g > 65535 {
        return Err(Error::Unsupported(format!(
            "layernorm_mod on the GPU: {g} modulation groups exceed 65535"
        )));
    }
    Ok((LnDims { t, c, g }, out))
}

fn ptr(t: &Option<DeviceTensor>) -> u64 {
    t.as_ref().map_or(0, |t| t.ptr())
}

fn check_tangent(name: &str, t: &DeviceTensor, primal: &DeviceTensor) -> Result<()> {
    if t.shape() != primal.shape() {
        return Err(Error::TangentMismatch {
            op: OP,
            tensor: name.into(),
            primal_shape: primal.shape().to_vec(),
            primal_dtype: primal.dtype(),
            tangent_shape: t.shape().to_vec(),
            tangent_dtype: t.dtype(),
        });
    }
    Ok(())
}

/// y = layernorm(x)·(1 + scale) + shift on device tensors; None modulation is zero.
pub fn forward(
    x: &DeviceTensor,
    scale: Option<&DeviceTensor>,
    shift: Option<&DeviceTensor>,
    eps: f64,
) -> Result<DeviceTensor> {
    let (d, m) = check_device(x, &[("scale", scale), ("shift", shift)])?;
    let gpu = x.gpu();
    let y = gpu.alloc_out(x.shape(), x.dtype())?;
    gpu.run(&plan_forward(
        x.dtype(),
        d,
        x.ptr(),
        ptr(&m[0]),
        ptr(&m[1]),
        y.ptr(),
        0,
        0,
        eps,
    )?)?;
    Ok(y)
}

/// The modulation inputs of the JVP (any may be absent = zero).
#[derive(Clone, Copy, Default)]
pub struct Modulation<'a> {
    /// scale, \[C\] or [G, C] in any dtype (converted to f32); every input given has the same G.
    pub scale: Option<&'a DeviceTensor>,
    /// shift, \[C\] or [G, C].
    pub shift: Option<&'a DeviceTensor>,
    /// Tangent of scale, scale's shape.
    pub tscale: Option<&'a DeviceTensor>,
    /// Tangent of shift, shift's shape.
    pub tshift: Option<&'a DeviceTensor>,
}

/// y and its tangent ty on device tensors.
pub fn jvp(
    x: &DeviceTensor,
    tx: Option<&DeviceTensor>,
    m: Modulation,
    eps: f64,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let gpu = x.gpu();
    let y = gpu.alloc_out(x.shape(), x.dtype())?;
    let ty = gpu.alloc_out(x.shape(), x.dtype())?;
    jvp_into(gpu, x, tx, m, eps, &y, &ty)?;
    Ok((y, ty))
}

/// The JVP into existing outputs.
pub fn jvp_into(
    gpu: &Gpu,
    x: &DeviceTensor,
    tx: Option<&DeviceTensor>,
    m: Modulation,
    eps: f64,
    y: &DeviceTensor,
    ty: &DeviceTensor,
) -> Result<()> {
    let (d, mods) = check_device(
        x,
        &[
            ("scale", m.scale),
            ("shift", m.shift),
            ("tscale", m.tscale),
            ("tshift", m.tshift),
        ],
    )?;
    if let Some(tx) = tx {
        check_tangent("x", tx, x)?;
        if tx.dtype() != x.dtype() {
            return Err(Error::DType {
                op: OP,
                tensor: "tx".into(),
                expected: x.dtype().to_string(),
                actual: tx.dtype(),
            });
        }
    }
    for (name, t, p) in [("scale", m.tscale, m.scale), ("shift", m.tshift, m.shift)] {
        if let (Some(t), Some(p)) = (t, p) {
            check_tangent(name, t, p)?;
        }
    }
    for (name, o) in [("y", y), ("ty", ty)] {
        if o.shape() != x.shape() || o.dtype() != x.dtype() {
            return Err(Error::invalid(
                OP,
                format!("output `{name}` {o:?} for x {x:?}"),
            ));
        }
    }
    let inputs: Vec<(&str, &DeviceTensor)> = [
        ("x", Some(x)),
        ("tx", tx),
        ("scale", m.scale),
        ("shift", m.shift),
        ("tscale", m.tscale),
        ("tshift", m.tshift),
    ]
    .into_iter()
    .filter_map(|(name, t)| Some((name, t?)))
    .collect();
    check_disjoint(OP, &[("y", y), ("ty", ty)], &inputs)?;
    let p = JvpPtrs {
        x: x.ptr(),
        tx: tx.map_or(0, |t| t.ptr()),
        scale: ptr(&mods[0]),
        shift: ptr(&mods[1]),
        tscale: ptr(&mods[2]),
        tshift: ptr(&mods[3]),
        y: y.ptr(),
        ty: ty.ptr(),
        mean: 0,
        rstd: 0,
    };
    gpu.run(&plan_jvp(x.dtype(), d, p, eps)?)
}

/// Gradients on device tensors: dx [T, C] (dtype of x) and dscale, dshift f32 [G, C] with the G of
/// the modulation (1 when both are absent). The statistics are recomputed by a forward pass.
pub fn backward(
    x: &DeviceTensor,
    scale: Option<&DeviceTensor>,
    shift: Option<&DeviceTensor>,
    eps: f64,
    dy: &DeviceTensor,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
    let (d, m) = check_device(x, &[("scale", scale), ("shift", shift)])?;
    expect_tensor(OP, "dy", dy, x.shape(), x.dtype())?;
    let gpu = x.gpu();
    let y = gpu.alloc_out(x.shape(), x.dtype())?;
    let stats = gpu.alloc_stacked(&[&[d.t], &[d.t]], DType::F32)?;
    let (mean, rstd) = (&stats[0], &stats[1]);
    let dx = gpu.alloc_out(x.shape(), x.dtype())?;
    let grads = gpu.alloc_stacked(&[&[d.g, d.c], &[d.g, d.c]], DType::F32)?;
    let mut steps = plan_forward(
        x.dtype(),
        d,
        x.ptr(),
        ptr(&m[0]),
        ptr(&m[1]),
        y.ptr(),
        mean.ptr(),
        rstd.ptr(),
        eps,
    )?;
    steps.extend(plan_backward(
        x.dtype(),
        d,
        BwdPtrs {
            dy: dy.ptr(),
            x: x.ptr(),
            scale: ptr(&m[0]),
            mean: mean.ptr(),
            rstd: rstd.ptr(),
            dres: 0,
            dx: dx.ptr(),
            dscale: grads[0].ptr(),
            dshift: grads[1].ptr(),
        },
    )?);
    gpu.run(&steps)?;
    let mut grads = grads.into_iter();
    let dscale = grads.next().expect("two");
    let dshift = grads.next().expect("two");
    Ok((dx, dscale, dshift))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jvp_rows_by_width() {
        use JvpRows::*;
        for (dtype, narrow) in [(DType::BF16, 1536), (DType::F16, 1536), (DType::F32, 768)] {
            let wide = narrow / 6 * 8;
            assert_eq!(JvpRows::by_width(dtype, 72), Narrow);
            assert_eq!(JvpRows::by_width(dtype, narrow), Narrow);
            assert_eq!(JvpRows::by_width(dtype, narrow + 1), Wide);
            assert_eq!(JvpRows::by_width(dtype, wide), Wide);
            assert_eq!(JvpRows::by_width(dtype, wide + 1), Narrow);
        }
    }

    /// The JVP's required pointers only (x, y, ty).
    fn x_y_ty() -> JvpPtrs {
        JvpPtrs {
            x: 1 << 20,
            y: 2 << 20,
            ty: 3 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn row_kernels_run_four_rows_per_block() {
        if std::env::var_os("FLASHJVP_LN_JVP_ROWS").is_some()
            || std::env::var_os("FLASHJVP_LN_ROWS_PER_BLOCK").is_some()
        {
            return; // a GPU run timing the variants
        }
        let d = LnDims {
            t: 10,
            c: 1536,
            g: 2,
        };
        let Step::Kernel(l) = &plan_jvp(DType::BF16, d, x_y_ty(), 1e-6).unwrap()[0] else {
            panic!()
        };
        assert_eq!(l.kernel, "layernorm_mod_jvp_bf16");
        assert_eq!((l.grid, l.block), ((3, 1, 1), (128, 1, 1)));
    }

    #[test]
    fn the_pipelined_jvp_takes_two_rows_a_warp_through_shared_memory() {
        let d = LnDims {
            t: 17,
            c: 1152,
            g: 1,
        };
        let Step::Kernel(l) =
            &plan_jvp_on(JvpRows::Pipe, DType::BF16, d, x_y_ty(), 1e-6).unwrap()[0]
        else {
            panic!()
        };
        let r = rows_per_block();
        assert_eq!(l.kernel, "layernorm_mod_jvp_pipe_bf16");
        assert_eq!(l.grid, (17usize.div_ceil(2 * r) as u32, 1, 1));
        assert_eq!(l.block, (32 * r as u32, 1, 1));
        assert_eq!(l.shared_bytes as usize, r * 12 * 1024);
        assert_eq!(pipe_shared_bytes(4), 48 * 1024);
    }

    #[test]
    fn the_jvp_refuses_to_run_in_place() {
        let d = LnDims { t: 10, c: 64, g: 1 };
        let bytes = 10 * 64 * 2;
        let ok = JvpPtrs {
            x: 1 << 20,
            tx: 2 << 20,
            y: 3 << 20,
            ty: 4 << 20,
            ..Default::default()
        };
        plan_jvp(DType::BF16, d, ok, 1e-6).unwrap();
        for bad in [
            JvpPtrs { y: ok.x, ..ok },
            JvpPtrs {
                ty: ok.tx + bytes as u64 - 2,
                ..ok
            },
        ] {
            let e = plan_jvp(DType::BF16, d, bad, 1e-6).unwrap_err().to_string();
            assert!(e.contains("in place"), "{e}");
        }
        // Adjacent, not overlapping.
        plan_jvp(
            DType::BF16,
            d,
            JvpPtrs {
                y: ok.x + bytes as u64,
                ..ok
            },
            1e-6,
        )
        .unwrap();
    }

    #[test]
    fn groups_follow_the_cpu_rules() {
        assert_eq!(groups_of(OP, "scale", &[8], 6, 8).unwrap(), 1);
        assert_eq!(groups_of(OP, "scale", &[3, 8], 6, 8).unwrap(), 3);
        let e = groups_of(OP, "shift", &[4, 8], 6, 8).unwrap_err();
        assert!(e.to_string().contains("`shift`"), "{e}");
        let e = groups_of(OP, "shift", &[1, 4, 8], 6, 8).unwrap_err();
        assert!(matches!(e, Error::Rank { .. }), "{e}");
    }

    #[test]
    fn eps_must_be_finite_in_f32() {
        let d = LnDims { t: 4, c: 8, g: 1 };
        let plan = |eps: f64| plan_forward(DType::F32, d, 16, 0, 0, 32, 0, 0, eps);
        for eps in [0.0, 1e-6, 1e-50, 3.0e38] {
            plan(eps).unwrap();
        }
        // 3.5e38 is finite in f64 but inf in f32 (every rstd would be 0).
        for eps in [3.5e38, 1e300, f64::INFINITY, f64::NAN, -1e-6] {
            let e = plan(eps).unwrap_err();
            assert!(e.to_string().contains("eps"), "{eps}: {e}");
        }
    }

    #[test]
    fn backward_plan_zeroes_then_reduces() {
        let d = LnDims {
            t: 1000,
            c: 77,
            g: 2,
        };
        let s = plan_backward(
            DType::BF16,
            d,
            BwdPtrs {
                dy: 16,
                x: 32,
                scale: 0,
                mean: 48,
                rstd: 64,
                dres: 0,
                dx: 80,
                dscale: 96,
                dshift: 0,
            },
        )
        .unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[1], Step::zero(96, 2 * 77 * 4));
        let Step::Kernel(l) = &s[2] else { panic!() };
        assert_eq!(l.grid, (3, 2, 2));
        assert_eq!(l.block, (32, 8, 1));
    }
}
