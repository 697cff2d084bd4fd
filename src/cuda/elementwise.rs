//! Launchers of cuda/elementwise.cu: SiLU and GELU (forward, JVP, backward), the MLP epilogues
//! (bias + GELU, GELU tangent), the gated residual and the sinusoidal timestep embedding (f32).
//! Pointwise kernels are grid-stride loops (block 256, any grid); counts are `long long`,
//! row/column counts `int`. Gates and the time path are f32.

use super::launch::{
    check_groups, dtype_suffix, int_arg, pointwise_steps, require_ptrs, Arg, Launch, Step,
};
use super::layernorm::groups_of;
use super::tensor::{expect_tensor, DeviceTensor};
use crate::error::{Error, Result};
use crate::tensor::DType;

const FILE: &str = "elementwise.cu";

/// SiLU or GELU (tanh form).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// u sigmoid(u) (kernels `silu_*`).
    Silu,
    /// 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u³))) (kernels `gelu_*`).
    Gelu,
}

impl Activation {
    fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::Gelu => "gelu",
        }
    }
}

fn pointwise(op: &str, kernel: String, n: usize, args: Vec<Arg>) -> Result<Vec<Step>> {
    pointwise_steps(op, FILE, kernel, n, args)
}

/// The work items of the activation kernels: 16-byte chunks, ceil(n / V) with V = 16 / element
/// size (cuda/elementwise.cu); the grid is sized by them, the kernels take the count n.
fn chunks(dtype: DType, n: usize) -> usize {
    n.div_ceil(16 / dtype.size_in_bytes())
}

fn count(n: usize) -> Arg {
    Arg::I64(n as i64)
}

/// y = f(u) over n elements.
pub fn plan_activation_fwd(
    act: Activation,
    dtype: DType,
    n: usize,
    u: u64,
    y: u64,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(act.name(), &[("u", u), ("y", y)])?;
    let k = format!("{}_fwd_{dt}", act.name());
    pointwise(
        act.name(),
        k,
        chunks(dtype, n),
        vec![Arg::Ptr(u), Arg::Ptr(y), count(n)],
    )
}

/// y = f(u) (when y is non-null) and ty = f'(u) tu.
pub fn plan_activation_jvp(
    act: Activation,
    dtype: DType,
    n: usize,
    u: u64,
    tu: u64,
    y: u64,
    ty: u64,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(act.name(), &[("u", u), ("tu", tu), ("ty", ty)])?;
    let k = format!("{}_jvp_{dt}", act.name());
    pointwise(
        act.name(),
        k,
        chunks(dtype, n),
        vec![
            Arg::Ptr(u),
            Arg::Ptr(tu),
            Arg::Ptr(y),
            Arg::Ptr(ty),
            count(n),
        ],
    )
}

/// du = f'(u) dy.
pub fn plan_activation_bwd(
    act: Activation,
    dtype: DType,
    n: usize,
    u: u64,
    dy: u64,
    du: u64,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(act.name(), &[("u", u), ("dy", dy), ("du", du)])?;
    let k = format!("{}_bwd_{dt}", act.name());
    pointwise(
        act.name(),
        k,
        chunks(dtype, n),
        vec![Arg::Ptr(u), Arg::Ptr(dy), Arg::Ptr(du), count(n)],
    )
}

/// ty = gelu'(pre) tu (the tangent GEMM's epilogue; ty may alias tu).
pub fn plan_gelu_tangent(dtype: DType, n: usize, pre: u64, tu: u64, ty: u64) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs("mlp", &[("pre", pre), ("tu", tu), ("ty", ty)])?;
    pointwise(
        "mlp",
        format!("gelu_tangent_{dt}"),
        chunks(dtype, n),
        vec![Arg::Ptr(pre), Arg::Ptr(tu), Arg::Ptr(ty), count(n)],
    )
}

/// Rows T, columns C, gate groups G of a gated residual.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResDims {
    /// Rows T of x, y and out.
    pub t: usize,
    /// Columns C.
    pub c: usize,
    /// Gate groups G: row t uses gate row t / (T / G); G divides T, at most 65535.
    pub g: usize,
}

fn res_args(d: ResDims) -> Result<[Arg; 3]> {
    const OP: &str = "gated_residual";
    check_groups(OP, d.t, d.c, d.g)?;
    if d.g > 65535 {
        return Err(Error::Unsupported(format!(
            "gated_residual on the GPU: {} gate groups exceed 65535",
            d.g
        )));
    }
    Ok([
        int_arg(OP, "T", d.t)?,
        int_arg(OP, "C", d.c)?,
        int_arg(OP, "G", d.g)?,
    ])
}

/// The work items of the gated residual's fwd, jvp and bwd kernels: 16-byte chunks of rows,
/// T * ceil(C / V) with V = 16 / element size (cuda/elementwise.cu).
fn res_chunks(dtype: DType, d: ResDims) -> usize {
    d.t * chunks(dtype, d.c)
}

/// out = x + gate ⊙ y (gate f32 [G, C]).
pub fn plan_residual_fwd(
    dtype: DType,
    d: ResDims,
    x: u64,
    y: u64,
    gate: u64,
    out: u64,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    let [t, c, g] = res_args(d)?;
    require_ptrs(
        "gated_residual",
        &[("x", x), ("y", y), ("gate", gate), ("out", out)],
    )?;
    pointwise(
        "gated_residual",
        format!("gated_residual_fwd_{dt}"),
        res_chunks(dtype, d),
        vec![
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::Ptr(gate),
            Arg::Ptr(out),
            t,
            c,
            g,
        ],
    )
}

/// Pointers of the residual JVP; 0 means a zero tangent, or `out` not written.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResJvpPtrs {
    /// [T, C], storage dtype.
    pub x: u64,
    /// [T, C] tangent of x; 0: zero.
    pub tx: u64,
    /// [T, C], storage dtype.
    pub y: u64,
    /// [T, C] tangent of y; 0: zero.
    pub ty: u64,
    /// f32 [G, C].
    pub gate: u64,
    /// f32 [G, C] tangent of the gate; 0: zero.
    pub tgate: u64,
    /// [T, C] output x + gate ⊙ y; 0: not written.
    pub out: u64,
    /// [T, C] output tangent tx + tgate ⊙ y + gate ⊙ ty (always written).
    pub tout: u64,
}

/// out = x + gate ⊙ y (when `out` is non-null) and tout = tx + tgate ⊙ y + gate ⊙ ty, one
/// launch over the rows' 16-byte chunks.
pub fn plan_residual_jvp(dtype: DType, d: ResDims, p: ResJvpPtrs) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    let [t, c, g] = res_args(d)?;
    require_ptrs(
        "gated_residual",
        &[("y", p.y), ("gate", p.gate), ("tout", p.tout)],
    )?;
    if p.out != 0 {
        require_ptrs("gated_residual", &[("x", p.x)])?;
    }
    pointwise(
        "gated_residual",
        format!("gated_residual_jvp_{dt}"),
        res_chunks(dtype, d),
        vec![
            Arg::Ptr(p.x),
            Arg::Ptr(p.tx),
            Arg::Ptr(p.y),
            Arg::Ptr(p.ty),
            Arg::Ptr(p.gate),
            Arg::Ptr(p.tgate),
            Arg::Ptr(p.out),
            Arg::Ptr(p.tout),
            t,
            c,
            g,
        ],
    )
}

/// dx = dout (when dx is non-null), dy = gate ⊙ dout, and dgate (f32 [G, C], zeroed here) = the
/// per-group column sums of dout ⊙ y.
#[allow(clippy::too_many_arguments)]
pub fn plan_residual_bwd(
    dtype: DType,
    d: ResDims,
    dout: u64,
    gate: u64,
    y: u64,
    dx: u64,
    dy: u64,
    dgate: u64,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    let [t, c, g] = res_args(d)?;
    require_ptrs(
        "gated_residual",
        &[
            ("dout", dout),
            ("gate", gate),
            ("y", y),
            ("dy", dy),
            ("dgate", dgate),
        ],
    )?;
    let mut steps = pointwise(
        "gated_residual",
        format!("gated_residual_bwd_{dt}"),
        res_chunks(dtype, d),
        vec![
            Arg::Ptr(dout),
            Arg::Ptr(gate),
            Arg::Ptr(dx),
            Arg::Ptr(dy),
            t,
            c,
            g,
        ],
    )?;
    steps.push(Step::zero(dgate, d.g * d.c * 4));
    let slices = (d.t / d.g).div_ceil(256).clamp(1, 65535);
    steps.push(Step::Kernel(Launch::new(
        "gated_residual",
        FILE,
        format!("gated_residual_bwd_gate_{dt}"),
        (d.c.div_ceil(32) as u64, d.g as u64, slices as u64),
        (32, 8, 1),
        0,
        vec![Arg::Ptr(dout), Arg::Ptr(y), Arg::Ptr(dgate), t, c, g],
    )?));
    Ok(steps)
}

/// e = [cos(ωt), sin(ωt)] (f32 [N, dim]) and, with a tangent, its tangent along tt.
pub fn plan_timestep(
    n: usize,
    dim: usize,
    max_period: f64,
    t: u64,
    tt: u64,
    e: u64,
    te: u64,
) -> Result<Vec<Step>> {
    const OP: &str = "timestep_embedding";
    // With a tangent, e is optional (the JVP kernel writes it when non-null).
    let out = if tt == 0 { ("e", e) } else { ("te", te) };
    require_ptrs(OP, &[("t", t), out])?;
    let mp = Arg::F32(max_period_f32(max_period)?);
    let (ni, di) = (int_arg(OP, "N", n)?, int_arg(OP, "dim", dim)?);
    if tt == 0 {
        pointwise(
            OP,
            "timestep_embedding_f32".into(),
            n * dim,
            vec![Arg::Ptr(t), Arg::Ptr(e), ni, di, mp],
        )
    } else {
        pointwise(
            OP,
            "timestep_embedding_jvp_f32".into(),
            n * dim,
            vec![
                Arg::Ptr(t),
                Arg::Ptr(tt),
                Arg::Ptr(e),
                Arg::Ptr(te),
                ni,
                di,
                mp,
            ],
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Device-resident entry points.

fn same(op: &'static str, name: &str, t: &DeviceTensor, like: &DeviceTensor) -> Result<()> {
    expect_tensor(op, name, t, like.shape(), like.dtype())
}

/// f(u) on the GPU.
pub fn activation_forward(act: Activation, u: &DeviceTensor) -> Result<DeviceTensor> {
    let y = u.gpu().alloc_out(u.shape(), u.dtype())?;
    u.gpu().run(&plan_activation_fwd(
        act,
        u.dtype(),
        u.numel(),
        u.ptr(),
        y.ptr(),
    )?)?;
    Ok(y)
}

/// f(u) and f'(u) tu on the GPU.
pub fn activation_jvp(
    act: Activation,
    u: &DeviceTensor,
    tu: &DeviceTensor,
) -> Result<(DeviceTensor, DeviceTensor)> {
    same("activation", "tx", tu, u)?;
    let y = u.gpu().alloc_out(u.shape(), u.dtype())?;
    let ty = u.gpu().alloc_out(u.shape(), u.dtype())?;
    u.gpu().run(&plan_activation_jvp(
        act,
        u.dtype(),
        u.numel(),
        u.ptr(),
        tu.ptr(),
        y.ptr(),
        ty.ptr(),
    )?)?;
    Ok((y, ty))
}

/// f'(u) dy on the GPU.
pub fn activation_backward(
    act: Activation,
    u: &DeviceTensor,
    dy: &DeviceTensor,
) -> Result<DeviceTensor> {
    same("activation", "gy", dy, u)?;
    let du = u.gpu().alloc_out(u.shape(), u.dtype())?;
    u.gpu().run(&plan_activation_bwd(
        act,
        u.dtype(),
        u.numel(),
        u.ptr(),
        dy.ptr(),
        du.ptr(),
    )?)?;
    Ok(du)
}

/// Checks x [T, C], y and the gate (\[C\] or [G, C]); returns the dims.
pub fn residual_dims(x: &[usize], gate: &[usize], y: &[usize], lead: &str) -> Result<ResDims> {
    const OP: &str = "gated_residual";
    if x.len() != 2 {
        return Err(Error::Rank {
            op: OP,
            tensor: lead.into(),
            expected: 2,
            actual: x.to_vec(),
        });
    }
    let (t, c) = (x[0], x[1]);
    let g = groups_of(OP, "gate", gate, t, c)?;
    if y != [t, c] {
        return Err(Error::Shape {
            op: OP,
            tensor: "y".into(),
            expected: format!("{:?}", [t, c]),
            actual: y.to_vec(),
        });
    }
    Ok(ResDims { t, c, g })
}

fn gate_f32(g: &DeviceTensor) -> Result<DeviceTensor> {
    if g.dtype() == DType::F32 {
        Ok(g.clone())
    } else {
        g.to_dtype(DType::F32)
    }
}

/// x + gate ⊙ y on the GPU (gate converted to f32 if needed).
pub fn residual_forward(
    x: &DeviceTensor,
    gate: &DeviceTensor,
    y: &DeviceTensor,
) -> Result<DeviceTensor> {
    let d = residual_dims(x.shape(), gate.shape(), y.shape(), "x")?;
    same("gated_residual", "y", y, x)?;
    let gate = gate_f32(gate)?;
    let out = x.gpu().alloc_out(x.shape(), x.dtype())?;
    x.gpu().run(&plan_residual_fwd(
        x.dtype(),
        d,
        x.ptr(),
        y.ptr(),
        gate.ptr(),
        out.ptr(),
    )?)?;
    Ok(out)
}

/// The residual and its tangent on the GPU; absent tangents are zero.
pub fn residual_jvp(
    x: &DeviceTensor,
    tx: Option<&DeviceTensor>,
    gate: &DeviceTensor,
    tgate: Option<&DeviceTensor>,
    y: &DeviceTensor,
    ty: Option<&DeviceTensor>,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let d = residual_dims(x.shape(), gate.shape(), y.shape(), "x")?;
    same("gated_residual", "y", y, x)?;
    if let Some(t) = tx {
        same("gated_residual", "tx", t, x)?;
    }
    if let Some(t) = ty {
        same("gated_residual", "ty", t, x)?;
    }
    if let Some(t) = tgate {
        if t.shape() != gate.shape() {
            return Err(Error::Shape {
                op: "gated_residual",
                tensor: "tgate".into(),
                expected: format!("{:?}", gate.shape()),
                actual: t.shape().to_vec(),
            });
        }
    }
    let gate = gate_f32(gate)?;
    let tgate = tgate.map(gate_f32).transpose()?;
    let gpu = x.gpu();
    let out = gpu.alloc_out(x.shape(), x.dtype())?;
    let tout = gpu.alloc_out(x.shape(), x.dtype())?;
    let p = ResJvpPtrs {
        x: x.ptr(),
        tx: tx.map_or(0, |t| t.ptr()),
        y: y.ptr(),
        ty: ty.map_or(0, |t| t.ptr()),
        gate: gate.ptr(),
        tgate: tgate.as_ref().map_or(0, |t| t.ptr()),
        out: out.ptr(),
        tout: tout.ptr(),
    };
    gpu.run(&plan_residual_jvp(x.dtype(), d, p)?)?;
    Ok((out, tout))
}

/// dx, dgate (f32, the gate's groups) and dy on the GPU.
pub fn residual_backward(
    gate: &DeviceTensor,
    y: &DeviceTensor,
    gout: &DeviceTensor,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
    let d = residual_dims(y.shape(), gate.shape(), y.shape(), "y")?;
    same("gated_residual", "gout", gout, y)?;
    let gate = gate_f32(gate)?;
    let gpu = y.gpu();
    let dx = gpu.alloc_out(y.shape(), y.dtype())?;
    let dy = gpu.alloc_out(y.shape(), y.dtype())?;
    let dgate = gpu.alloc_out(&[d.g, d.c], DType::F32)?;
    gpu.run(&plan_residual_bwd(
        y.dtype(),
        d,
        gout.ptr(),
        gate.ptr(),
        y.ptr(),
        dx.ptr(),
        dy.ptr(),
        dgate.ptr(),
    )?)?;
    Ok((dx, dgate, dy))
}

/// Checks t \[N\] and the scalars as the CPU op does.
pub fn timestep_check(t: &[usize], dim: usize, max_period: f64) -> Result<usize> {
    const OP: &str = "timestep_embedding";
    if t.len() != 1 {
        return Err(Error::Rank {
            op: OP,
            tensor: "t".into(),
            expected: 1,
            actual: t.to_vec(),
        });
    }
    if dim == 0 || dim % 2 != 0 {
        return Err(Error::invalid(
            OP,
            format!("dim must be even and > 0, got {dim}"),
        ));
    }
    max_period_f32(max_period)?;
    Ok(t[0])
}

/// max_period as the kernels take it: finite and > 0 in f32 too (beyond f32's range it becomes
/// inf, below its smallest value 0, and the frequencies NaN or inf).
fn max_period_f32(max_period: f64) -> Result<f32> {
    let mp = max_period as f32;
    if !(max_period.is_finite() && max_period > 0.0 && mp.is_finite() && mp > 0.0) {
        return Err(Error::invalid(
            "timestep_embedding",
            format!("max_period must be finite and > 0 in f32, got {max_period}"),
        ));
    }
    Ok(mp)
}

/// The embedding (f32 [N, dim]) and, with tt, its tangent, on the GPU.
pub fn timestep_embedding(
    t: &DeviceTensor,
    tt: Option<&DeviceTensor>,
    dim: usize,
    max_period: f64,
) -> Result<(DeviceTensor, Option<DeviceTensor>)> {
    let n = timestep_check(t.shape(), dim, max_period)?;
    if let Some(tt) = tt {
        if tt.shape() != t.shape() {
            return Err(Error::TangentMismatch {
                op: "timestep_embedding",
                tensor: "t".into(),
                primal_shape: t.shape().to_vec(),
                primal_dtype: t.dtype(),
                tangent_shape: tt.shape().to_vec(),
                tangent_dtype: tt.dtype(),
            });
        }
    }
    let t = gate_f32(t)?;
    let tt = tt.map(gate_f32).transpose()?;
    let gpu = t.gpu();
    let e = gpu.alloc_out(&[n, dim], DType::F32)?;
    let te = tt
        .as_ref()
        .map(|_| gpu.alloc_out(&[n, dim], DType::F32))
        .transpose()?;
    gpu.run(&plan_timestep(
        n,
        dim,
        max_period,
        t.ptr(),
        tt.as_ref().map_or(0, |t| t.ptr()),
        e.ptr(),
        te.as_ref().map_or(0, |t| t.ptr()),
    )?)?;
    Ok((e, te))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_period_must_be_finite_and_positive_in_f32() {
        for mp in [10000.0, 1.0, 1e-30, 3.0e38] {
            plan_timestep(4, 8, mp, 16, 0, 32, 0).unwrap();
            plan_timestep(4, 8, mp, 16, 48, 0, 32).unwrap();
            timestep_check(&[4], 8, mp).unwrap();
        }
        // Out of f32's range (inf), below its smallest value (0), or not a positive number.
        for mp in [3.5e38, 1e-50, 0.0, -1.0, f64::NAN, f64::INFINITY] {
            for e in [
                plan_timestep(4, 8, mp, 16, 0, 32, 0).unwrap_err(),
                plan_timestep(4, 8, mp, 16, 48, 0, 32).unwrap_err(),
                timestep_check(&[4], 8, mp).unwrap_err(),
            ] {
                assert!(e.to_string().contains("max_period"), "{mp}: {e}");
            }
        }
    }
}
