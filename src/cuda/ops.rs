//! Host-level entry points of the CUDA ops: host tensors (any dtype) in, converted to the
//! computation dtype `dtype` (bf16, f16 or f32) and uploaded, run, downloaded. They mirror the
//! public ops of [`crate::ops`] with one more argument, the dtype, and return the same types.
//!
//! Shapes are checked before the GPU is touched, so a bad input is the same kind of error (naming
//! the tensor) with or without a GPU. Outputs come back in `dtype`, except what the kernels keep
//! in f32 (DESIGN.md section 4): lse and its tangent, the modulation and gate gradients, the
//! timestep embedding. Device outputs are NaN-poisoned before the kernels run (see
//! [`super::context::set_poison_outputs`]), so a missed element comes back as NaN.

use super::attention as attn;
use super::elementwise::{self as ew, Activation};
use super::launch::dtype_suffix;
use super::layernorm as ln;
use super::mlp;
use super::{rmsnorm as rms, rope, Gpu};
use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::ops::{
    AttentionGrads, AttentionJvp, AttentionOutput, GatedResidualGrads, LayerNormModGrads, Mlp,
    MlpGrads, RmsNormGrads, RopePairs,
};
use crate::tensor::{DType, Tensor};

fn gpu_for(dtype: DType) -> Result<Gpu> {
    dtype_suffix(dtype)?;
    Gpu::get()
}

fn dual_of(primal: Tensor, tangent: Option<Tensor>) -> Result<Dual> {
    match tangent {
        Some(t) => Dual::new(primal, t),
        None => Ok(Dual::constant(primal)),
    }
}

// ---------------------------------------------------------------------------------------------
// Attention.

/// Shapes of the primals and the computation dtype (no copies of the host tensors).
fn check_attention_primal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dtype: DType,
) -> Result<attn::AttnDims> {
    dtype_suffix(dtype)?;
    attn::check_shapes(q.shape(), k.shape(), v.shape())
}

fn check_attention(q: &Dual, k: &Dual, v: &Dual, dtype: DType) -> Result<attn::AttnDims> {
    let dims = check_attention_primal(&q.primal, &k.primal, &v.primal, dtype)?;
    q.check("attention", "q")?;
    k.check("attention", "k")?;
    v.check("attention", "v")?;
    Ok(dims)
}

/// o and lse (f32) of the primal attention on the GPU; with `key_lens`, batch entry b attends to its
/// first key_lens\[b\] keys only ([`crate::ops::attention_forward_with_key_lens`]).
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
    dtype: DType,
) -> Result<AttentionOutput> {
    let dims = check_attention_primal(q, k, v, dtype)?;
    attn::resolve_scale(scale, dims.d)?;
    let gpu = gpu_for(dtype)?;
    let [q, k, v] = upload3(&gpu, [q, k, v], dtype)?;
    let (o, lse) = match key_lens {
        None => attn::forward(&q, &k, &v, scale)?,
        Some(lens) => attn::forward_with_key_lens(&q, &k, &v, scale, lens)?,
    };
    Ok(AttentionOutput {
        o: o.download()?,
        lse: lse.download()?,
    })
}

fn upload3(gpu: &Gpu, ts: [&Tensor; 3], dtype: DType) -> Result<[super::DeviceTensor; 3]> {
    Ok([
        gpu.upload(ts[0], dtype)?,
        gpu.upload(ts[1], dtype)?,
        gpu.upload(ts[2], dtype)?,
    ])
}

/// o, lse and their tangents on the GPU. Without tangents on k and v the faster kernel for
/// constant K and V runs; without any tangent the outputs' tangents are `None`. `key_lens` as in
/// [`attention_forward`].
pub fn attention_jvp(
    q: &Dual,
    k: &Dual,
    v: &Dual,
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
    dtype: DType,
) -> Result<AttentionJvp> {
    let dims = check_attention(q, k, v, dtype)?;
    attn::resolve_scale(scale, dims.d)?;
    let gpu = gpu_for(dtype)?;
    let [qd, kd, vd] = upload3(&gpu, [&q.primal, &k.primal, &v.primal], dtype)?;
    let up = |t: &Option<Tensor>| t.as_ref().map(|t| gpu.upload(t, dtype)).transpose();
    let (tq, tk, tv) = (up(&q.tangent)?, up(&k.tangent)?, up(&v.tangent)?);
    let (tq, tk, tv) = (tq.as_ref(), tk.as_ref(), tv.as_ref());
    let r = match key_lens {
        None => attn::jvp(&qd, &kd, &vd, tq, tk, tv, scale)?,
        Some(lens) => attn::jvp_with_key_lens(&qd, &kd, &vd, tq, tk, tv, scale, lens)?,
    };
    let down = |t: &Option<super::DeviceTensor>| t.as_ref().map(|t| t.download()).transpose();
    Ok(AttentionJvp {
        o: dual_of(r.o.download()?, down(&r.to)?)?,
        lse: dual_of(r.lse.download()?, down(&r.tlse)?)?,
    })
}

/// dq, dk, dv on the GPU given the forward's o and lse and the cotangent go; `key_lens` as in
/// [`attention_forward`] (the padding keys' dk and dv are 0).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    go: &Tensor,
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
    dtype: DType,
) -> Result<AttentionGrads> {
    let dims = check_attention_primal(q, k, v, dtype)?;
    let o_shape = dims.o_shape();
    for (name, t, shape) in [
        ("o", o, &o_shape[..]),
        ("lse", lse, &o_shape[..3]),
        ("go", go, &o_shape[..]),
    ] {
        crate::ops::expect_shape("attention", name, t, shape)?;
    }
    attn::resolve_scale(scale, dims.d)?;
    let gpu = gpu_for(dtype)?;
    let [qd, kd, vd] = upload3(&gpu, [q, k, v], dtype)?;
    let od = gpu.upload(o, dtype)?;
    let gd = gpu.upload(go, dtype)?;
    let lsed = gpu.upload(lse, DType::F32)?;
    let (dq, dk, dv) = match key_lens {
        None => attn::backward(&qd, &kd, &vd, &od, &lsed, &gd, scale)?,
        Some(lens) => attn::backward_with_key_lens(&qd, &kd, &vd, &od, &lsed, &gd, scale, lens)?,
    };
    Ok(AttentionGrads {
        dq: dq.download()?,
        dk: dk.download()?,
        dv: dv.download()?,
    })
}

// ---------------------------------------------------------------------------------------------
// LayerNorm with modulation.

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A modulation tensor [C] or [g, C] as f32 [big_g, C] (big_g a multiple of g): each group's row
/// repeated over the big_g / g groups it covers.
fn expand_groups(t: &Tensor, g: usize, big_g: usize, c: usize) -> Result<Tensor> {
    let v = t.to_f64_vec();
    let per = big_g / g;
    let mut out = Vec::with_capacity(big_g * c);
    for j in 0..big_g {
        let src = j / per;
        out.extend_from_slice(&v[src * c..(src + 1) * c]);
    }
    Tensor::from_vec(out, &[big_g, c]).map(|t| t.to_dtype(DType::F32))
}

/// The sum over each run of big_g / g consecutive groups of an f32 [big_g, C] gradient, shaped
/// like the original modulation tensor.
fn reduce_groups(t: &Tensor, g: usize, big_g: usize, c: usize, shape: &[usize]) -> Result<Tensor> {
    let v = t.to_f64_vec();
    let per = big_g / g;
    let mut out = vec![0.0f64; g * c];
    for j in 0..big_g {
        for i in 0..c {
            out[(j / per) * c + i] += v[j * c + i];
        }
    }
    Tensor::from_vec(out, shape).map(|t| t.to_dtype(DType::F32))
}

struct LnCheck {
    t: usize,
    c: usize,
    gs: usize,
    gh: usize,
    big_g: usize,
}

fn check_layernorm(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
    dtype: DType,
) -> Result<LnCheck> {
    dtype_suffix(dtype)?;
    let (t, c) = ln::check_x(x.shape())?;
    let gs = ln::groups_of("layernorm_mod", "scale", scale.shape(), t, c)?;
    let gh = ln::groups_of("layernorm_mod", "shift", shift.shape(), t, c)?;
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::invalid(
            "layernorm_mod",
            format!("eps must be finite and >= 0, got {eps}"),
        ));
    }
    // Both group counts divide T, so their least common multiple does too.
    let big_g = gs / gcd(gs, gh) * gh;
    Ok(LnCheck {
        t,
        c,
        gs,
        gh,
        big_g,
    })
}

/// y on the GPU; scale and shift (\[C\] or [G, C]) are converted to f32.
pub fn layernorm_mod_forward(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
    dtype: DType,
) -> Result<Tensor> {
    let k = check_layernorm(x, scale, shift, eps, dtype)?;
    let gpu = gpu_for(dtype)?;
    let xd = gpu.upload(x, dtype)?;
    let s = gpu.upload(&expand_groups(scale, k.gs, k.big_g, k.c)?, DType::F32)?;
    let h = gpu.upload(&expand_groups(shift, k.gh, k.big_g, k.c)?, DType::F32)?;
    ln::forward(&xd, Some(&s), Some(&h), eps)?.download()
}

/// y and its tangent on the GPU; any input may lack a tangent (no tangent at all: `None`).
pub fn layernorm_mod_jvp(
    x: &Dual,
    scale: &Dual,
    shift: &Dual,
    eps: f64,
    dtype: DType,
) -> Result<Dual> {
    let k = check_layernorm(&x.primal, &scale.primal, &shift.primal, eps, dtype)?;
    x.check("layernorm_mod", "x")?;
    scale.check("layernorm_mod", "scale")?;
    shift.check("layernorm_mod", "shift")?;
    let gpu = gpu_for(dtype)?;
    let xd = gpu.upload(&x.primal, dtype)?;
    let modf = |t: &Tensor, g: usize| -> Result<super::DeviceTensor> {
        gpu.upload(&expand_groups(t, g, k.big_g, k.c)?, DType::F32)
    };
    let s = modf(&scale.primal, k.gs)?;
    let h = modf(&shift.primal, k.gh)?;
    if !(x.has_tangent() || scale.has_tangent() || shift.has_tangent()) {
        let y = ln::forward(&xd, Some(&s), Some(&h), eps)?;
        return Ok(Dual::constant(y.download()?));
    }
    let tx = x
        .tangent
        .as_ref()
        .map(|t| gpu.upload(t, dtype))
        .transpose()?;
    let ts = scale.tangent.as_ref().map(|t| modf(t, k.gs)).transpose()?;
    let th = shift.tangent.as_ref().map(|t| modf(t, k.gh)).transpose()?;
    let m = ln::Modulation {
        scale: Some(&s),
        shift: Some(&h),
        tscale: ts.as_ref(),
        tshift: th.as_ref(),
    };
    let (y, ty) = ln::jvp(&xd, tx.as_ref(), m, eps)?;
    Dual::new(y.download()?, ty.download()?)
}

/// dx (dtype), dscale and dshift (f32, shaped like scale and shift) on the GPU.
pub fn layernorm_mod_backward(
    x: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    eps: f64,
    gy: &Tensor,
    dtype: DType,
) -> Result<LayerNormModGrads> {
    let k = check_layernorm(x, scale, shift, eps, dtype)?;
    crate::ops::expect_shape("layernorm_mod", "gy", gy, &[k.t, k.c])?;
    let gpu = gpu_for(dtype)?;
    let xd = gpu.upload(x, dtype)?;
    let gyd = gpu.upload(gy, dtype)?;
    let s = gpu.upload(&expand_groups(scale, k.gs, k.big_g, k.c)?, DType::F32)?;
    let h = gpu.upload(&expand_groups(shift, k.gh, k.big_g, k.c)?, DType::F32)?;
    let (dx, ds, dh) = ln::backward(&xd, Some(&s), Some(&h), eps, &gyd)?;
    Ok(LayerNormModGrads {
        dx: dx.download()?,
        dscale: reduce_groups(&ds.download()?, k.gs, k.big_g, k.c, scale.shape())?,
        dshift: reduce_groups(&dh.download()?, k.gh, k.big_g, k.c, shift.shape())?,
    })
}

// ---------------------------------------------------------------------------------------------
// Activations.

fn act_forward(act: Activation, x: &Tensor, dtype: DType) -> Result<Tensor> {
    let gpu = gpu_for(dtype)?;
    ew::activation_forward(act, &gpu.upload(x, dtype)?)?.download()
}

fn act_jvp(act: Activation, x: &Dual, dtype: DType) -> Result<Dual> {
    dtype_suffix(dtype)?;
    x.check("activation", "x")?;
    let gpu = gpu_for(dtype)?;
    let u = gpu.upload(&x.primal, dtype)?;
    match &x.tangent {
        None => Ok(Dual::constant(ew::activation_forward(act, &u)?.download()?)),
        Some(t) => {
            let (y, ty) = ew::activation_jvp(act, &u, &gpu.upload(t, dtype)?)?;
            Dual::new(y.download()?, ty.download()?)
        }
    }
}

fn act_backward(act: Activation, x: &Tensor, gy: &Tensor, dtype: DType) -> Result<Tensor> {
    dtype_suffix(dtype)?;
    crate::ops::expect_shape("activation", "gy", gy, x.shape())?;
    let gpu = gpu_for(dtype)?;
    ew::activation_backward(act, &gpu.upload(x, dtype)?, &gpu.upload(gy, dtype)?)?.download()
}

/// gelu(x) (tanh form) elementwise on the GPU, any shape, as [`crate::ops::gelu_forward`].
pub fn gelu_forward(x: &Tensor, dtype: DType) -> Result<Tensor> {
    act_forward(Activation::Gelu, x, dtype)
}
/// gelu(x) and gelu'(x) ẋ on the GPU; without a tangent only the forward runs and the tangent is
/// `None`.
pub fn gelu_jvp(x: &Dual, dtype: DType) -> Result<Dual> {
    act_jvp(Activation::Gelu, x, dtype)
}
/// dx = gelu'(x) ⊙ gy on the GPU; gy must have x's shape.
pub fn gelu_backward(x: &Tensor, gy: &Tensor, dtype: DType) -> Result<Tensor> {
    act_backward(Activation::Gelu, x, gy, dtype)
}
/// silu(x) = x sigmoid(x) elementwise on the GPU, any shape, as [`crate::ops::silu_forward`].
pub fn silu_forward(x: &Tensor, dtype: DType) -> Result<Tensor> {
    act_forward(Activation::Silu, x, dtype)
}
/// silu(x) and silu'(x) ẋ on the GPU; without a tangent only the forward runs and the tangent is
/// `None`.
pub fn silu_jvp(x: &Dual, dtype: DType) -> Result<Dual> {
    act_jvp(Activation::Silu, x, dtype)
}
/// dx = silu'(x) ⊙ gy on the GPU; gy must have x's shape.
pub fn silu_backward(x: &Tensor, gy: &Tensor, dtype: DType) -> Result<Tensor> {
    act_backward(Activation::Silu, x, gy, dtype)
}

// ---------------------------------------------------------------------------------------------
// Gated residual.

/// x + gate ⊙ y on the GPU (gate \[C\] or [G, C], converted to f32).
pub fn gated_residual_forward(
    x: &Tensor,
    gate: &Tensor,
    y: &Tensor,
    dtype: DType,
) -> Result<Tensor> {
    dtype_suffix(dtype)?;
    ew::residual_dims(x.shape(), gate.shape(), y.shape(), "x")?;
    let gpu = gpu_for(dtype)?;
    ew::residual_forward(
        &gpu.upload(x, dtype)?,
        &gpu.upload(gate, DType::F32)?,
        &gpu.upload(y, dtype)?,
    )?
    .download()
}

/// x + gate ⊙ y and its tangent tx + tgate ⊙ y + gate ⊙ ty on the GPU (gate and its tangent
/// converted to f32); absent tangents are zero, and with none at all the tangent is `None`.
pub fn gated_residual_jvp(x: &Dual, gate: &Dual, y: &Dual, dtype: DType) -> Result<Dual> {
    dtype_suffix(dtype)?;
    ew::residual_dims(x.shape(), gate.shape(), y.shape(), "x")?;
    x.check("gated_residual", "x")?;
    gate.check("gated_residual", "gate")?;
    y.check("gated_residual", "y")?;
    let gpu = gpu_for(dtype)?;
    let xd = gpu.upload(&x.primal, dtype)?;
    let gd = gpu.upload(&gate.primal, DType::F32)?;
    let yd = gpu.upload(&y.primal, dtype)?;
    if !(x.has_tangent() || gate.has_tangent() || y.has_tangent()) {
        return Ok(Dual::constant(
            ew::residual_forward(&xd, &gd, &yd)?.download()?,
        ));
    }
    let up = |t: &Option<Tensor>, dt| t.as_ref().map(|t| gpu.upload(t, dt)).transpose();
    let tx = up(&x.tangent, dtype)?;
    let tg = up(&gate.tangent, DType::F32)?;
    let ty = up(&y.tangent, dtype)?;
    let (out, tout) = ew::residual_jvp(&xd, tx.as_ref(), &gd, tg.as_ref(), &yd, ty.as_ref())?;
    Dual::new(out.download()?, tout.download()?)
}

/// dx, dgate (f32, shaped like gate) and dy on the GPU.
pub fn gated_residual_backward(
    gate: &Tensor,
    y: &Tensor,
    gout: &Tensor,
    dtype: DType,
) -> Result<GatedResidualGrads> {
    dtype_suffix(dtype)?;
    let d = ew::residual_dims(y.shape(), gate.shape(), y.shape(), "y")?;
    crate::ops::expect_shape("gated_residual", "gout", gout, &[d.t, d.c])?;
    let gpu = gpu_for(dtype)?;
    let (dx, dgate, dy) = ew::residual_backward(
        &gpu.upload(gate, DType::F32)?,
        &gpu.upload(y, dtype)?,
        &gpu.upload(gout, dtype)?,
    )?;
    Ok(GatedResidualGrads {
        dx: dx.download()?,
        dgate: dgate.download()?.reshape(gate.shape())?,
        dy: dy.download()?,
    })
}

// ---------------------------------------------------------------------------------------------
// Timestep embedding (f32: the time path).

/// The sinusoidal embedding e [N, dim] (f32) of t \[N\] (converted to f32) on the GPU, as
/// [`crate::ops::timestep_embedding_forward`]; max_period must also be finite in f32.
pub fn timestep_embedding_forward(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    ew::timestep_check(t.shape(), dim, max_period)?;
    let gpu = Gpu::get()?;
    let (e, _) = ew::timestep_embedding(&gpu.upload(t, DType::F32)?, None, dim, max_period)?;
    e.download()
}

/// e [N, dim] and, when t has a tangent, ė = [−ω sin(ωt), ω cos(ωt)] ṫ (both f32) on the GPU.
pub fn timestep_embedding_jvp(t: &Dual, dim: usize, max_period: f64) -> Result<Dual> {
    ew::timestep_check(t.shape(), dim, max_period)?;
    t.check("timestep_embedding", "t")?;
    let gpu = Gpu::get()?;
    let td = gpu.upload(&t.primal, DType::F32)?;
    let tt = t
        .tangent
        .as_ref()
        .map(|x| gpu.upload(x, DType::F32))
        .transpose()?;
    let (e, te) = ew::timestep_embedding(&td, tt.as_ref(), dim, max_period)?;
    dual_of(e.download()?, te.map(|t| t.download()).transpose()?)
}

// ---------------------------------------------------------------------------------------------
// MLP.

fn check_mlp(x: &Tensor, p: &Mlp, dtype: DType) -> Result<mlp::MlpDims> {
    dtype_suffix(dtype)?;
    mlp::check_shapes(
        x.shape(),
        p.w1.shape(),
        p.b1.shape(),
        p.w2.shape(),
        p.b2.shape(),
    )
}

fn upload_params(gpu: &Gpu, p: &Mlp, dtype: DType) -> Result<Vec<super::DeviceTensor>> {
    gpu.upload_packed(&[p.w1, p.b1, p.w2, p.b2], dtype, 256)
}

/// The MLP on the GPU.
pub fn mlp_forward(x: &Tensor, p: &Mlp, dtype: DType) -> Result<Tensor> {
    check_mlp(x, p, dtype)?;
    let gpu = gpu_for(dtype)?;
    let w = upload_params(&gpu, p, dtype)?;
    let dp = mlp::DeviceMlp {
        w1: &w[0],
        b1: &w[1],
        w2: &w[2],
        b2: &w[3],
    };
    mlp::forward(&gpu.upload(x, dtype)?, &dp)?.download()
}

/// y and its tangent on the GPU.
pub fn mlp_jvp(x: &Dual, p: &Mlp, dtype: DType) -> Result<Dual> {
    check_mlp(&x.primal, p, dtype)?;
    x.check("mlp", "x")?;
    let gpu = gpu_for(dtype)?;
    let w = upload_params(&gpu, p, dtype)?;
    let dp = mlp::DeviceMlp {
        w1: &w[0],
        b1: &w[1],
        w2: &w[2],
        b2: &w[3],
    };
    let xs = match &x.tangent {
        Some(t) => gpu.upload_stacked(&[&x.primal, t], dtype)?,
        None => vec![gpu.upload(&x.primal, dtype)?],
    };
    let (y, ty) = mlp::jvp(&xs[0], xs.get(1), &dp)?;
    dual_of(y.download()?, ty.map(|t| t.download()).transpose()?)
}

/// Gradients on the GPU, in `dtype`.
pub fn mlp_backward(x: &Tensor, p: &Mlp, gy: &Tensor, dtype: DType) -> Result<MlpGrads> {
    let d = check_mlp(x, p, dtype)?;
    crate::ops::expect_shape("mlp", "gy", gy, &[d.t, d.c])?;
    let gpu = gpu_for(dtype)?;
    let w = upload_params(&gpu, p, dtype)?;
    let dp = mlp::DeviceMlp {
        w1: &w[0],
        b1: &w[1],
        w2: &w[2],
        b2: &w[3],
    };
    let g = mlp::backward(&gpu.upload(x, dtype)?, &dp, &gpu.upload(gy, dtype)?)?;
    Ok(MlpGrads {
        dx: g.dx.download()?,
        dw1: g.dw1.download()?,
        db1: g.db1.download()?,
        dw2: g.dw2.download()?,
        db2: g.db2.download()?,
    })
}

// ---------------------------------------------------------------------------------------------
// RMSNorm and rotary embeddings.

/// Checks x [T, C], weight \[C\] and eps as [`crate::ops::rms_norm_forward`] does (any host
/// dtype: the inputs are converted to `dtype`).
fn check_rms_norm(x: &Tensor, w: &Tensor, eps: f64, dtype: DType) -> Result<()> {
    dtype_suffix(dtype)?;
    crate::ops::expect_rank("rms_norm", "x", x, 2)?;
    crate::ops::expect_shape("rms_norm", "weight", w, &[x.shape()[1]])?;
    crate::ops::check_eps("rms_norm", DType::F32, eps)
}

/// RMSNorm(x)·weight on the GPU, as [`crate::ops::rms_norm_forward`].
pub fn rms_norm_forward(x: &Tensor, w: &Tensor, eps: f64, dtype: DType) -> Result<Tensor> {
    check_rms_norm(x, w, eps, dtype)?;
    let gpu = gpu_for(dtype)?;
    rms::forward(&gpu.upload(x, dtype)?, &gpu.upload(w, dtype)?, eps)?.download()
}

/// RMSNorm and its tangent on the GPU, as [`crate::ops::rms_norm_jvp`]; without any tangent only
/// the forward runs and the tangent is `None`.
pub fn rms_norm_jvp(x: &Dual, w: &Dual, eps: f64, dtype: DType) -> Result<Dual> {
    check_rms_norm(&x.primal, &w.primal, eps, dtype)?;
    x.check("rms_norm", "x")?;
    w.check("rms_norm", "weight")?;
    let gpu = gpu_for(dtype)?;
    let (xd, wd) = (gpu.upload(&x.primal, dtype)?, gpu.upload(&w.primal, dtype)?);
    if !(x.has_tangent() || w.has_tangent()) {
        return Ok(Dual::constant(rms::forward(&xd, &wd, eps)?.download()?));
    }
    let up = |t: &Option<Tensor>| t.as_ref().map(|t| gpu.upload(t, dtype)).transpose();
    let (tx, tw) = (up(&x.tangent)?, up(&w.tangent)?);
    let (y, ty) = rms::jvp(&xd, tx.as_ref(), &wd, tw.as_ref(), eps)?;
    Dual::new(y.download()?, ty.download()?)
}

/// dx (`dtype`) and dweight (f32) on the GPU, as [`crate::ops::rms_norm_backward`].
pub fn rms_norm_backward(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
    gy: &Tensor,
    dtype: DType,
) -> Result<RmsNormGrads> {
    check_rms_norm(x, w, eps, dtype)?;
    crate::ops::expect_shape("rms_norm", "gy", gy, x.shape())?;
    let gpu = gpu_for(dtype)?;
    let (dx, dw) = rms::backward(
        &gpu.upload(x, dtype)?,
        &gpu.upload(w, dtype)?,
        eps,
        &gpu.upload(gy, dtype)?,
    )?;
    Ok(RmsNormGrads {
        dx: dx.download()?,
        dweight: dw.download()?,
    })
}

/// Rope's tables uploaded in f32 (the caller checked the shapes first, as
/// [`crate::ops::rope_forward`] does, before touching the GPU).
fn rope_tables(gpu: &Gpu, cos: &Tensor, sin: &Tensor) -> Result<[super::DeviceTensor; 2]> {
    Ok([gpu.upload(cos, DType::F32)?, gpu.upload(sin, DType::F32)?])
}

/// Rotary embeddings of x [B, N, H, d] on the GPU (tables in f32), as [`crate::ops::rope_forward`].
pub fn rope_forward(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    pairs: RopePairs,
    dtype: DType,
) -> Result<Tensor> {
    crate::ops::rope::rope_dims(x.shape(), cos.shape(), sin.shape())?;
    let gpu = gpu_for(dtype)?;
    let [c, s] = rope_tables(&gpu, cos, sin)?;
    rope::forward(&gpu.upload(x, dtype)?, &c, &s, pairs)?.download()
}

/// The rotation of x and of its tangent on the GPU, as [`crate::ops::rope_jvp`].
pub fn rope_jvp(
    x: &Dual,
    cos: &Tensor,
    sin: &Tensor,
    pairs: RopePairs,
    dtype: DType,
) -> Result<Dual> {
    crate::ops::rope::rope_dims(x.primal.shape(), cos.shape(), sin.shape())?;
    x.check("rope", "x")?;
    let gpu = gpu_for(dtype)?;
    let [c, s] = rope_tables(&gpu, cos, sin)?;
    let xd = gpu.upload(&x.primal, dtype)?;
    match &x.tangent {
        None => Ok(Dual::constant(
            rope::forward(&xd, &c, &s, pairs)?.download()?,
        )),
        Some(t) => {
            let (y, ty) = rope::jvp(&xd, &gpu.upload(t, dtype)?, &c, &s, pairs)?;
            Dual::new(y.download()?, ty.download()?)
        }
    }
}

/// The inverse rotation of gy on the GPU, as [`crate::ops::rope_backward`].
pub fn rope_backward(
    gy: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    pairs: RopePairs,
    dtype: DType,
) -> Result<Tensor> {
    crate::ops::rope::rope_dims(gy.shape(), cos.shape(), sin.shape())?;
    let gpu = gpu_for(dtype)?;
    let [c, s] = rope_tables(&gpu, cos, sin)?;
    rope::backward(&gpu.upload(gy, dtype)?, &c, &s, pairs)?.download()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_expand_and_reduce_back() {
        let t = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
        let e = expand_groups(&t, 2, 6, 2).unwrap();
        assert_eq!(
            e.to_f64_vec(),
            vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0, 3.0, 4.0]
        );
        let r = reduce_groups(&e, 2, 6, 2, &[2, 2]).unwrap();
        assert_eq!(r.to_f64_vec(), vec![3.0, 6.0, 9.0, 12.0]);
        let one = Tensor::from_vec(vec![5.0f64, 6.0], &[2]).unwrap();
        let r = reduce_groups(&expand_groups(&one, 1, 3, 2).unwrap(), 1, 3, 2, &[2]).unwrap();
        assert_eq!(r.shape(), &[2]);
        assert_eq!(r.to_f64_vec(), vec![15.0, 18.0]);
    }
}
