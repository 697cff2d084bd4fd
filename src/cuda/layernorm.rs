//! Launchers of cuda/layernorm_mod.cu: layernorm (no affine) with adaLN modulation, its JVP, its
//! backward and the reduction of the modulation gradients.
//!
//! The kernels take the modulation vectors (scale, shift, their tangents and gradients) in f32
//! [G, C] with one G for all of them, G dividing T (row t uses group t / (T/G)); device tensors of
//! another dtype are converted to f32 here, and the host-level entry points (see [`super::ops`])
//! also bring \[C\] and [G, C] of different G to a common G.

use super::context::Gpu;
use super::launch::{check_groups, dtype_suffix, int_arg, Arg, Launch, Step};
use super::tensor::DeviceTensor;
use crate::error::{Error, Result};
use crate::tensor::DType;

const OP: &str = "layernorm_mod";
const FILE: &str = "layernorm_mod.cu";

/// Rows T, columns C and modulation groups G.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LnDims {
    pub t: usize,
    pub c: usize,
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

fn eps_arg(eps: f64) -> Result<Arg> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(
            OP,
            format!("eps must be finite and >= 0, got {eps}"),
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

fn row_launch(kernel: String, d: LnDims, args: Vec<Arg>) -> Result<Step> {
    Ok(Step::Kernel(Launch::new(
        OP,
        FILE,
        kernel,
        (d.t.div_ceil(8) as u64, 1, 1),
        (256, 1, 1),
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
    pub x: u64,
    pub tx: u64,
    pub scale: u64,
    pub shift: u64,
    pub tscale: u64,
    pub tshift: u64,
    pub y: u64,
    pub ty: u64,
    pub mean: u64,
    pub rstd: u64,
}

/// Which register-resident JVP kernel rows of width C take (cuda/layernorm_mod.cu, `Chunks`): the
/// narrow one (6 chunks of 16 bytes per lane: C <= 1536 in 16 bits, 768 in f32; 128 registers, two
/// blocks per SM) or the wide one (8 chunks: C <= 2048 / 1024; one block per SM), which takes only
/// the widths between the two limits. Longer rows stream in either (the narrow one runs them).
/// `FLASHJVP_LN_JVP_ROWS=narrow|wide` forces one, so that a GPU run can time both on the same rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JvpRows {
    Narrow,
    Wide,
}

impl JvpRows {
    pub fn for_width(dtype: DType, c: usize) -> JvpRows {
        static FORCED: std::sync::OnceLock<Option<JvpRows>> = std::sync::OnceLock::new();
        let forced =
            *FORCED.get_or_init(|| match std::env::var("FLASHJVP_LN_JVP_ROWS").as_deref() {
                Ok("narrow") => Some(JvpRows::Narrow),
                Ok("wide") => Some(JvpRows::Wide),
                _ => None,
            });
        forced.unwrap_or_else(|| Self::by_width(dtype, c))
    }

    /// The choice by width alone (no override).
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
        }
    }
}

pub fn plan_jvp(dtype: DType, d: LnDims, p: JvpPtrs, eps: f64) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    let [t, c, g] = dims_args(d)?;
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
    Ok(vec![row_launch(
        format!(
            "layernorm_mod_jvp{}_{dt}",
            JvpRows::for_width(dtype, d.c).infix()
        ),
        d,
        args,
    )?])
}

/// The gated residual fused in front of the forward or JVP (residual_layernorm_mod_*): the row that
/// is normalised is x1 = x + gate ⊙ y (gate f32 [G, C] with the modulation's G), with tangent
/// ẋ1 = ẋ + ġate ⊙ y + gate ⊙ ẏ, written to `x1` (`tx1`) as gated_residual_{fwd,jvp} would write it;
/// the fusion saves reading x1 (and ẋ1) back. `ty` and `tgate` may be 0 (zero); `y`, `gate`, `x1`
/// and, for the JVP, `tx1` are required.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResPtrs {
    pub y: u64,
    pub ty: u64,
    pub gate: u64,
    pub tgate: u64,
    pub x1: u64,
    pub tx1: u64,
}

fn require(ptrs: &[(&str, u64)]) -> Result<()> {
    for (name, p) in ptrs {
        if *p == 0 {
            return Err(Error::invalid(
                OP,
                format!("the fused residual needs `{name}` (a null pointer was given)"),
            ));
        }
    }
    Ok(())
}

/// x1 = x + gate ⊙ y, then y_out = layernorm(x1) modulated (the `y` of [`JvpPtrs`] is the output
/// here too); mean and rstd of x1 when non-null.
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
    require(&[
        ("x", x),
        ("y", r.y),
        ("gate", r.gate),
        ("x1", r.x1),
        ("out", y),
    ])?;
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
    require(&[
        ("x", p.x),
        ("y", r.y),
        ("gate", r.gate),
        ("x1", r.x1),
        ("tx1", r.tx1),
        ("out", p.y),
        ("tout", p.ty),
    ])?;
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
    Ok(vec![row_launch(
        format!(
            "residual_layernorm_mod_jvp{}_{dt}",
            JvpRows::for_width(dtype, d.c).infix()
        ),
        d,
        args,
    )?])
}

/// Pointers of the backward: mean and rstd from the forward; dscale and dshift (f32 [G, C], 0 =
/// not wanted) are zeroed and accumulated into.
#[derive(Clone, Copy, Debug, Default)]
pub struct BwdPtrs {
    pub dy: u64,
    pub x: u64,
    pub scale: u64,
    pub mean: u64,
    pub rstd: u64,
    /// Added to the input cotangent (0: nothing); may be `dx` itself, accumulating in place (the
    /// residual stream's gradient in a block's backward).
    pub dres: u64,
    pub dx: u64,
    pub dscale: u64,
    pub dshift: u64,
}

/// Slices per group of the parameter reduction (cuda/README.md: ceil((T/G)/256)).
pub fn param_slices(d: LnDims) -> usize {
    (d.t / d.g.max(1)).div_ceil(256).clamp(1, 65535)
}

pub fn plan_backward(dtype: DType, d: LnDims, p: BwdPtrs) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
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
    pub scale: Option<&'a DeviceTensor>,
    pub shift: Option<&'a DeviceTensor>,
    pub tscale: Option<&'a DeviceTensor>,
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
    if dy.shape() != x.shape() || dy.dtype() != x.dtype() {
        return Err(Error::Shape {
            op: OP,
            tensor: "gy".into(),
            expected: format!("{:?} in {}", x.shape(), x.dtype()),
            actual: dy.shape().to_vec(),
        });
    }
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
