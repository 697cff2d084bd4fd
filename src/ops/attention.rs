//! Attention O = softmax(c·Q Kᵀ) V per (batch, head), non-causal, Nq may differ from Nk, dv may
//! differ from d. q \[B,H,Nq,d\], k \[B,H,Nk,d\], v \[B,H,Nk,dv\]; c defaults to 1/√d.
//! The JVP streams over key blocks with the online softmax of DESIGN.md section 3 (memory O(N·d),
//! never an Nq×Nk buffer) and returns o, lse and their tangents. The backward recomputes P from lse.
//!
//! Padded keys: the `*_with_key_lens` forms take one key count per batch entry (`key_lens[b]`,
//! 1 ≤ key_lens\[b\] ≤ Nk, the `k_lens` of Wan's cross-attention to a padded text context): entry b
//! attends to its first key_lens\[b\] keys only, so the padding rows of k and v (and of their
//! tangents) change no output, and their gradients are 0.

use super::{
    data, expect_allocatable, expect_dtype, expect_dual, expect_rank, expect_shape, tangent_data,
    with_real,
};
use crate::cpu::attention::{self as cpu, Dims, KeyCounts, Tangents};
use crate::cpu::Real;
use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};
use num_traits::Zero;

const OP: &str = "attention";

/// The primal outputs of attention (the backward takes both).
#[derive(Clone, Debug)]
pub struct AttentionOutput {
    /// [B, H, Nq, dv]
    pub o: Tensor,
    /// Log-sum-exp of the scaled scores per query row, [B, H, Nq].
    pub lse: Tensor,
}

/// The outputs of attention with their tangents.
#[derive(Clone, Debug)]
pub struct AttentionJvp {
    /// o and ȯ, [B, H, Nq, dv]; the tangent is absent only when no input had one.
    pub o: Dual,
    /// lse and its tangent μ = Σ p ṡ, [B, H, Nq].
    pub lse: Dual,
}

/// Gradients of q, k and v, each of its input's shape and dtype.
#[derive(Clone, Debug)]
pub struct AttentionGrads {
    /// [B, H, Nq, d]
    pub dq: Tensor,
    /// [B, H, Nk, d]
    pub dk: Tensor,
    /// [B, H, Nk, dv]
    pub dv: Tensor,
}

/// o \[B,H,Nq,dv\] and lse \[B,H,Nq\] in the inputs' dtype (f32 or f64).
pub fn attention_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
) -> Result<AttentionOutput> {
    forward_impl(q, k, v, scale, None)
}

/// [`attention_forward`] where batch entry b attends to its first `key_lens[b]` keys only (see the
/// module docs).
pub fn attention_forward_with_key_lens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
    key_lens: &[usize],
) -> Result<AttentionOutput> {
    forward_impl(q, k, v, scale, Some(key_lens))
}

fn forward_impl(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
) -> Result<AttentionOutput> {
    let (b, h, dims) = check_qkv(q, k, v)?;
    let counts = key_lens
        .map(|l| check_key_lens(OP, l, b, h, dims.nk))
        .transpose()?;
    let keys: KeyCounts = counts.as_deref();
    with_real!(OP, "q", q.dtype(), T => {
        let c = resolve_scale::<T>(scale, dims.d)?;
        let mut o = vec![T::zero(); dims.bh * dims.nq * dims.dv];
        let mut lse = vec![T::zero(); dims.bh * dims.nq];
        cpu::forward(dims, keys, data(q), data(k), data(v), c, &mut o, &mut lse);
        Ok(AttentionOutput {
            o: Tensor::from_vec(o, &[b, h, dims.nq, dims.dv])?,
            lse: Tensor::from_vec(lse, &[b, h, dims.nq])?,
        })
    })
}

/// o, lse and their tangents in one streaming pass (memory O(N·d)). Absent tangents are zero and
/// their work is skipped: with only q̇ (cross-attention to a constant context) four of the six tile
/// products remain. When no input has a tangent the outputs' tangents are `None`, otherwise both
/// are present.
pub fn attention_jvp(q: &Dual, k: &Dual, v: &Dual, scale: Option<f64>) -> Result<AttentionJvp> {
    jvp_impl(q, k, v, scale, None)
}

/// [`attention_jvp`] where batch entry b attends to its first `key_lens[b]` keys only (see the
/// module docs): the tangents of the padding keys change nothing either.
pub fn attention_jvp_with_key_lens(
    q: &Dual,
    k: &Dual,
    v: &Dual,
    scale: Option<f64>,
    key_lens: &[usize],
) -> Result<AttentionJvp> {
    jvp_impl(q, k, v, scale, Some(key_lens))
}

fn jvp_impl(
    q: &Dual,
    k: &Dual,
    v: &Dual,
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
) -> Result<AttentionJvp> {
    let (b, h, dims) = check_qkv(&q.primal, &k.primal, &v.primal)?;
    let dtype = q.dtype();
    expect_dual(OP, "q", q, dtype)?;
    expect_dual(OP, "k", k, dtype)?;
    expect_dual(OP, "v", v, dtype)?;
    let counts = key_lens
        .map(|l| check_key_lens(OP, l, b, h, dims.nk))
        .transpose()?;
    if !(q.has_tangent() || k.has_tangent() || v.has_tangent()) {
        let out = forward_impl(&q.primal, &k.primal, &v.primal, scale, key_lens)?;
        return Ok(AttentionJvp {
            o: Dual::constant(out.o),
            lse: Dual::constant(out.lse),
        });
    }
    with_real!(OP, "q", dtype, T => {
        let c = resolve_scale::<T>(scale, dims.d)?;
        let tangents = Tangents {
            q: tangent_data::<T>(q),
            k: tangent_data::<T>(k),
            v: tangent_data::<T>(v),
        };
        let (no, nl) = (dims.bh * dims.nq * dims.dv, dims.bh * dims.nq);
        let (mut o, mut lse) = (vec![T::zero(); no], vec![T::zero(); nl]);
        let (mut to, mut tlse) = (vec![T::zero(); no], vec![T::zero(); nl]);
        cpu::jvp(
            dims,
            counts.as_deref(),
            data(&q.primal),
            data(&k.primal),
            data(&v.primal),
            tangents,
            c,
            &mut o,
            &mut lse,
            &mut to,
            &mut tlse,
        );
        let o_shape = [b, h, dims.nq, dims.dv];
        let lse_shape = [b, h, dims.nq];
        Ok(AttentionJvp {
            o: Dual::new(Tensor::from_vec(o, &o_shape)?, Tensor::from_vec(to, &o_shape)?)?,
            lse: Dual::new(
                Tensor::from_vec(lse, &lse_shape)?,
                Tensor::from_vec(tlse, &lse_shape)?,
            )?,
        })
    })
}

/// dq, dk, dv given the forward's o and lse and the output cotangent go \[B,H,Nq,dv\].
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    go: &Tensor,
    scale: Option<f64>,
) -> Result<AttentionGrads> {
    backward_impl(q, k, v, o, lse, go, scale, None)
}

/// [`attention_backward`] of [`attention_forward_with_key_lens`] (o and lse from it): the
/// gradients of the padding keys (rows key_lens\[b\].. of dk and dv) are 0.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_with_key_lens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    go: &Tensor,
    scale: Option<f64>,
    key_lens: &[usize],
) -> Result<AttentionGrads> {
    backward_impl(q, k, v, o, lse, go, scale, Some(key_lens))
}

#[allow(clippy::too_many_arguments)]
fn backward_impl(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    go: &Tensor,
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
) -> Result<AttentionGrads> {
    let (b, h, dims) = check_qkv(q, k, v)?;
    let counts = key_lens
        .map(|l| check_key_lens(OP, l, b, h, dims.nk))
        .transpose()?;
    let o_shape = [b, h, dims.nq, dims.dv];
    let dtype = q.dtype();
    for (name, t, shape) in [
        ("o", o, &o_shape[..]),
        ("lse", lse, &o_shape[..3]),
        ("go", go, &o_shape[..]),
    ] {
        expect_shape(OP, name, t, shape)?;
        expect_dtype(OP, name, t, dtype)?;
    }
    with_real!(OP, "q", dtype, T => {
        let c = resolve_scale::<T>(scale, dims.d)?;
        let mut dq = vec![T::zero(); q.numel()];
        let mut dk = vec![T::zero(); k.numel()];
        let mut dv = vec![T::zero(); v.numel()];
        cpu::backward(
            dims,
            counts.as_deref(),
            data(q),
            data(k),
            data(v),
            data(o),
            data(lse),
            data(go),
            c,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        Ok(AttentionGrads {
            dq: Tensor::from_vec(dq, q.shape())?,
            dk: Tensor::from_vec(dk, k.shape())?,
            dv: Tensor::from_vec(dv, v.shape())?,
        })
    })
}

/// Ranks, dtypes and shapes of q [B,H,Nq,d], k [B,H,Nk,d], v [B,H,Nk,dv]; no dimension may be 0.
fn check_qkv(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(usize, usize, Dims)> {
    expect_rank(OP, "q", q, 4)?;
    expect_rank(OP, "k", k, 4)?;
    expect_rank(OP, "v", v, 4)?;
    let dtype = q.dtype();
    if !matches!(dtype, DType::F32 | DType::F64) {
        return Err(Error::DType {
            op: OP,
            tensor: "q".into(),
            expected: "f32 or f64 (the CPU reference computes in these; convert with to_dtype)"
                .into(),
            actual: dtype,
        });
    }
    expect_dtype(OP, "k", k, dtype)?;
    expect_dtype(OP, "v", v, dtype)?;
    let (b, h, nq, d) = (q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]);
    let nk = k.shape()[2];
    let dv = v.shape()[3];
    expect_shape(OP, "k", k, &[b, h, nk, d])?;
    expect_shape(OP, "v", v, &[b, h, nk, dv])?;
    if [b, h, nq, d, nk, dv].contains(&0) {
        return Err(Error::invalid(
            OP,
            format!(
                "empty dimension: q {:?}, k {:?}, v {:?} (B, H, Nq, Nk, d and dv must all be at least 1)",
                q.shape(),
                k.shape(),
                v.shape()
            ),
        ));
    }
    // o and its tangent: [B, H, Nq, dv] is not bounded by any one input.
    expect_allocatable(OP, "the output o", &[b, h, nq, dv], dtype, 2)?;
    Ok((
        b,
        h,
        Dims {
            bh: b * h,
            nq,
            nk,
            d,
            dv,
        },
    ))
}

/// Checks one key count per batch entry (`key_lens`, B of them, each in 1..=Nk) and returns one
/// per (batch, head) problem, the form the reference and the GPU plans take. `op` names the op in
/// errors.
pub fn check_key_lens(
    op: &'static str,
    key_lens: &[usize],
    b: usize,
    h: usize,
    nk: usize,
) -> Result<Vec<usize>> {
    if key_lens.len() != b {
        return Err(Error::Shape {
            op,
            tensor: "key_lens".into(),
            expected: format!("[{b}] (one key count per batch entry of q)"),
            actual: vec![key_lens.len()],
        });
    }
    if let Some((i, &n)) = key_lens
        .iter()
        .enumerate()
        .find(|&(_, &n)| n == 0 || n > nk)
    {
        return Err(Error::invalid(
            op,
            format!(
                "key_lens[{i}] = {n} is outside 1..={nk} (k and v have Nk = {nk} keys; every \
                 batch entry must attend to at least one)"
            ),
        ));
    }
    Ok(key_lens
        .iter()
        .flat_map(|&n| std::iter::repeat_n(n, h))
        .collect())
}

/// The score scale c (default 1/√d), finite in the compute type.
fn resolve_scale<T: Real>(scale: Option<f64>, d: usize) -> Result<T> {
    let c = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let ct = T::c(c);
    if !c.is_finite() || !ct.is_finite() {
        return Err(Error::invalid(
            OP,
            format!("scale {c} is not finite in {}", T::DTYPE),
        ));
    }
    Ok(ct)
}
