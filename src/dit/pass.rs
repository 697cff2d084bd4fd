//! The forward pass over dual tensors (one code path for `forward_train` and `forward_dual`) and
//! the backward through its primal.
//!
//! Each op call goes to the op's `*_jvp` when any input carries a tangent and to its `*_forward`
//! otherwise, so a forward without tangents costs a plain forward, and a dual forward with a tangent
//! on x only keeps the whole conditioning path (time MLP, modulation vectors) tangent-free.

use super::layout::*;
use super::shuffle::{self, dual_map};
use super::{Dit, DitConfig};
use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::ops::{self, Mlp};
use crate::tensor::{DType, Tensor};

pub(super) const EPS: f64 = 1e-6;

/// Everything the backward needs from a forward (or the primal of a dual forward).
pub struct DitCache {
    /// The generation of the network whose forward filled it (`Dit::generation`): the backward
    /// refuses a cache of another network, or of parameters changed since.
    pub(super) generation: u64,
    pub(super) batch: usize,
    pub(super) class: Vec<usize>,
    /// Input of the patch embedding [B·N, C·p·p].
    pub(super) patches: Tensor,
    /// Sinusoidal embedding of c_noise [B, freq_dim].
    pub(super) temb: Tensor,
    /// Time MLP pre-activation and activation [B, hidden].
    pub(super) t_hidden: Tensor,
    pub(super) t_act: Tensor,
    /// Conditioning c and SiLU(c) [B, hidden], the input of every modulation linear.
    pub(super) c: Tensor,
    pub(super) sc: Tensor,
    pub(super) blocks: Vec<BlockCache>,
    pub(super) final_x: Tensor,
    pub(super) final_shift: Tensor,
    pub(super) final_scale: Tensor,
    pub(super) final_h: Tensor,
}

impl DitCache {
    /// The batch size of the forward that filled this cache.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The parameter generation of the network that filled it (see [`Dit::generation`]); only a
    /// network of this generation takes it in [`Dit::backward`].
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

pub(super) struct BlockCache {
    x: Tensor,
    shift1: Tensor,
    scale1: Tensor,
    gate1: Tensor,
    shift2: Tensor,
    scale2: Tensor,
    gate2: Tensor,
    h1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    /// o with heads merged back into token rows: the input of the output projection.
    o_rows: Tensor,
    attn_out: Tensor,
    x1: Tensor,
    h2: Tensor,
    mlp_out: Tensor,
}

fn lin(x: &Dual, w: &Tensor, b: &Tensor) -> Result<Dual> {
    if x.has_tangent() {
        ops::linear_jvp(x, w, Some(b))
    } else {
        ops::linear_forward(&x.primal, w, Some(b)).map(Dual::constant)
    }
}

fn silu(x: &Dual) -> Result<Dual> {
    if x.has_tangent() {
        ops::silu_jvp(x)
    } else {
        ops::silu_forward(&x.primal).map(Dual::constant)
    }
}

fn layernorm_mod(x: &Dual, scale: &Dual, shift: &Dual) -> Result<Dual> {
    if x.has_tangent() || scale.has_tangent() || shift.has_tangent() {
        ops::layernorm_mod_jvp(x, scale, shift, EPS)
    } else {
        ops::layernorm_mod_forward(&x.primal, &scale.primal, &shift.primal, EPS).map(Dual::constant)
    }
}

fn gated_residual(x: &Dual, gate: &Dual, y: &Dual) -> Result<Dual> {
    if x.has_tangent() || gate.has_tangent() || y.has_tangent() {
        ops::gated_residual_jvp(x, gate, y)
    } else {
        ops::gated_residual_forward(&x.primal, &gate.primal, &y.primal).map(Dual::constant)
    }
}

fn mlp(x: &Dual, p: &Mlp) -> Result<Dual> {
    if x.has_tangent() {
        ops::mlp_jvp(x, p)
    } else {
        ops::mlp_forward(&x.primal, p).map(Dual::constant)
    }
}

/// o (dual) and the primal lse.
fn attention(q: &Dual, k: &Dual, v: &Dual) -> Result<(Dual, Tensor)> {
    if q.has_tangent() || k.has_tangent() || v.has_tangent() {
        let r = ops::attention_jvp(q, k, v, None)?;
        Ok((r.o, r.lse.primal))
    } else {
        let r = ops::attention_forward(&q.primal, &k.primal, &v.primal, None)?;
        Ok((Dual::constant(r.o), r.lse))
    }
}

fn timestep_embedding(t: &Dual, dim: usize) -> Result<Dual> {
    if t.has_tangent() {
        ops::timestep_embedding_jvp(t, dim, ops::DEFAULT_MAX_PERIOD)
    } else {
        ops::timestep_embedding_forward(&t.primal, dim, ops::DEFAULT_MAX_PERIOD).map(Dual::constant)
    }
}

/// Token geometry of a config: (tokens per image, head width).
fn geometry(c: &DitConfig) -> (usize, usize) {
    let g = c.image_size / c.patch;
    (g * g, c.hidden / c.heads)
}

/// Errors unless x [B, C, S, S], t [B] and `class` agree with each other and the network, and
/// c_noise = time_scale·t (and its tangent) stays finite for finite t when computed in `compute`
/// (the network dtype on the CPU, f32 on the GPU).
pub(super) fn check_inputs(
    c: &DitConfig,
    dtype: DType,
    compute: DType,
    x: &Dual,
    t: &Dual,
    class: &[usize],
) -> Result<usize> {
    const OP: &str = "dit";
    ops::expect_dual(OP, "x", x, dtype)?;
    ops::expect_dual(OP, "t", t, dtype)?;
    let b = match x.shape() {
        [b, ch, h, w]
            if *b > 0 && *ch == c.in_channels && *h == c.image_size && *w == c.image_size =>
        {
            *b
        }
        _ => {
            return Err(Error::Shape {
                op: OP,
                tensor: "x".into(),
                expected: format!(
                    "[B, {}, {}, {}] with B > 0",
                    c.in_channels, c.image_size, c.image_size
                ),
                actual: x.shape().to_vec(),
            })
        }
    };
    ops::expect_shape(OP, "t", &t.primal, &[b])?;
    if class.len() != b {
        return Err(Error::invalid(
            OP,
            format!("{} class indices for a batch of {b}", class.len()),
        ));
    }
    if let Some((i, &k)) = class.iter().enumerate().find(|(_, &k)| k > c.num_classes) {
        return Err(Error::invalid(
            OP,
            format!(
                "class[{i}] = {k} is out of range: {} classes, index {} is the null class",
                c.num_classes, c.num_classes
            ),
        ));
    }
    for (name, v) in [("t", Some(&t.primal)), ("tangent of t", t.tangent.as_ref())] {
        if let Some(v) = v {
            check_c_noise(c.time_scale, name, v, compute)?;
        }
    }
    Ok(b)
}

/// Errors naming the first finite entry of `t` whose c_noise = time_scale·t overflows `compute`.
fn check_c_noise(time_scale: f64, name: &str, t: &Tensor, compute: DType) -> Result<()> {
    for (i, v) in t.to_f64_vec().into_iter().enumerate() {
        let scaled_finite = match compute {
            DType::F64 => (v * time_scale).is_finite(),
            _ => ((v as f32) * (time_scale as f32)).is_finite(),
        };
        if v.is_finite() && !scaled_finite {
            return Err(Error::invalid(
                "dit",
                format!(
                    "{name}[{i}] = {v:e} gives a c_noise = time_scale·t (time_scale {time_scale}) \
                     that is not finite in {compute}"
                ),
            ));
        }
    }
    Ok(())
}

impl Dit {
    /// Errors unless x [B, C, S, S], t [B] and `class` agree with each other and the network.
    fn check_inputs(&self, x: &Dual, t: &Dual, class: &[usize]) -> Result<usize> {
        let b = check_inputs(&self.config, self.dtype, self.dtype, x, t, class)?;
        self.check_params()?;
        Ok(b)
    }

    /// The forward over dual inputs; tangent-free inputs give a plain forward.
    pub(super) fn run(&self, x: &Dual, t: &Dual, class: &[usize]) -> Result<(Dual, DitCache)> {
        let b = self.check_inputs(x, t, class)?;
        let c = &self.config;
        let p = &self.params;

        // Tokens: patch embedding plus the fixed position embedding (no tangent).
        let patches = dual_map(x, |v| {
            shuffle::patchify(v, c.in_channels, c.image_size, c.patch)
        })?;
        let mut tokens = lin(&patches, &p[X_W], &p[X_B])?;
        shuffle::add_assign_periodic(&mut tokens.primal, &self.pos)?;

        // Conditioning: c = MLP(embedding(time_scale·t)) + table[class].
        let c_noise = dual_map(t, |v| shuffle::scaled(v, c.time_scale))?;
        let temb = timestep_embedding(&c_noise, c.freq_dim)?;
        let t_hidden = lin(&temb, &p[T1_W], &p[T1_B])?;
        let t_act = silu(&t_hidden)?;
        let mut cond = lin(&t_act, &p[T2_W], &p[T2_B])?;
        let class_emb = shuffle::gather_rows(&p[Y_TABLE], class)?;
        shuffle::add_assign_periodic(&mut cond.primal, &class_emb)?;
        let sc = silu(&cond)?;

        let mut x = tokens;
        let mut blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let (next, cache) = self.block(i, x, &sc, b)?;
            x = next;
            blocks.push(cache);
        }

        let f = &p[final_base(c.depth)..];
        let modf = lin(&sc, &f[F_ADA_W], &f[F_ADA_B])?;
        let [shift, scale] = split::<2>(&modf)?;
        let h = layernorm_mod(&x, &scale, &shift)?;
        let y = lin(&h, &f[F_LIN_W], &f[F_LIN_B])?;
        let out = dual_map(&y, |v| {
            shuffle::unpatchify(v, c.in_channels, c.image_size, c.patch)
        })?;

        let cache = DitCache {
            generation: self.generation,
            batch: b,
            class: class.to_vec(),
            patches: patches.primal,
            temb: temb.primal,
            t_hidden: t_hidden.primal,
            t_act: t_act.primal,
            c: cond.primal,
            sc: sc.primal,
            blocks,
            final_x: x.primal,
            final_shift: shift.primal,
            final_scale: scale.primal,
            final_h: h.primal,
        };
        Ok((out, cache))
    }

    fn block(&self, i: usize, x: Dual, sc: &Dual, b: usize) -> Result<(Dual, BlockCache)> {
        let c = &self.config;
        let (n, dh) = geometry(c);
        let hd = c.hidden;
        let w = &self.params[block_base(i)..];

        let modulation = lin(sc, &w[ADA_W], &w[ADA_B])?;
        let [shift1, scale1, gate1, shift2, scale2, gate2] = split::<6>(&modulation)?;
        drop(modulation);

        let h1 = layernorm_mod(&x, &scale1, &shift1)?;
        let qkv = lin(&h1, &w[QKV_W], &w[QKV_B])?;
        let heads = |off: usize| {
            dual_map(&qkv, |v| {
                shuffle::gather_heads(v, b, n, c.heads, dh, 3 * hd, off)
            })
        };
        let (q, k, v) = (heads(0)?, heads(hd)?, heads(2 * hd)?);
        drop(qkv);
        let (o, lse) = attention(&q, &k, &v)?;
        let o_rows = dual_map(&o, |t| shuffle::merge_heads(&[t], b, n, c.heads, dh))?;
        let attn_out = lin(&o_rows, &w[PROJ_W], &w[PROJ_B])?;
        let x1 = gated_residual(&x, &gate1, &attn_out)?;

        let h2 = layernorm_mod(&x1, &scale2, &shift2)?;
        let mlp_p = Mlp {
            w1: &w[FC1_W],
            b1: &w[FC1_B],
            w2: &w[FC2_W],
            b2: &w[FC2_B],
        };
        let mlp_out = mlp(&h2, &mlp_p)?;
        let x2 = gated_residual(&x1, &gate2, &mlp_out)?;

        let cache = BlockCache {
            x: x.primal,
            shift1: shift1.primal,
            scale1: scale1.primal,
            gate1: gate1.primal,
            shift2: shift2.primal,
            scale2: scale2.primal,
            gate2: gate2.primal,
            h1: h1.primal,
            q: q.primal,
            k: k.primal,
            v: v.primal,
            o: o.primal,
            lse,
            o_rows: o_rows.primal,
            attn_out: attn_out.primal,
            x1: x1.primal,
            h2: h2.primal,
            mlp_out: mlp_out.primal,
        };
        Ok((x2, cache))
    }

    /// Parameter gradients in canonical order, given the output cotangent.
    pub(super) fn backward_impl(&self, cache: &DitCache, gout: &Tensor) -> Result<Vec<Tensor>> {
        const OP: &str = "dit_backward";
        let c = &self.config;
        let p = &self.params;
        self.check_params()?;
        if cache.generation != self.generation {
            return Err(Error::invalid(
                OP,
                format!(
                    "the cache comes from a forward of another network or of other parameter \
                     values (generation {}, this network's is {}): run the forward again",
                    cache.generation, self.generation
                ),
            ));
        }
        ops::expect_dtype(OP, "gout", gout, self.dtype)?;
        let b = cache.batch;
        ops::expect_shape(
            OP,
            "gout",
            gout,
            &[b, c.in_channels, c.image_size, c.image_size],
        )?;
        if cache.blocks.len() != c.depth {
            return Err(Error::invalid(
                OP,
                format!(
                    "the cache holds {} blocks but the network has depth {}",
                    cache.blocks.len(),
                    c.depth
                ),
            ));
        }
        let mut grads = Grads(vec![None; p.len()]);

        // Final layer.
        let fb = final_base(c.depth);
        let f = &p[fb..];
        let gy = shuffle::patchify(gout, c.in_channels, c.image_size, c.patch)?;
        let dh = grads.linear(
            fb + F_LIN_W,
            ops::linear_backward(&cache.final_h, &f[F_LIN_W], Some(&f[F_LIN_B]), &gy)?,
        );
        let ln = ops::layernorm_mod_backward(
            &cache.final_x,
            &cache.final_scale,
            &cache.final_shift,
            EPS,
            &dh,
        )?;
        let dmod = shuffle::concat_cols(&[&ln.dshift, &ln.dscale])?;
        let mut dsc = grads.linear(
            fb + F_ADA_W,
            ops::linear_backward(&cache.sc, &f[F_ADA_W], Some(&f[F_ADA_B]), &dmod)?,
        );
        let mut dx = ln.dx;

        for i in (0..c.depth).rev() {
            dx = self.block_backward(i, &cache.blocks[i], cache, dx, &mut dsc, &mut grads)?;
        }

        // Patch embedding (its input gradient is not needed, but the op computes it).
        grads.linear(
            X_W,
            ops::linear_backward(&cache.patches, &p[X_W], Some(&p[X_B]), &dx)?,
        );

        // Conditioning: c = t-MLP + table[class].
        let dc = ops::silu_backward(&cache.c, &dsc)?;
        let dtable = shuffle::scatter_add_rows(&dc, &cache.class, c.num_classes + 1)?;
        let dt_act = grads.linear(
            T2_W,
            ops::linear_backward(&cache.t_act, &p[T2_W], Some(&p[T2_B]), &dc)?,
        );
        let dt_hidden = ops::silu_backward(&cache.t_hidden, &dt_act)?;
        grads.linear(
            T1_W,
            ops::linear_backward(&cache.temb, &p[T1_W], Some(&p[T1_B]), &dt_hidden)?,
        );
        grads.0[Y_TABLE] = Some(dtable);

        grads
            .0
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                g.ok_or_else(|| {
                    Error::invalid(OP, format!("no gradient was produced for parameter {i}"))
                })
            })
            .collect()
    }

    fn block_backward(
        &self,
        i: usize,
        bc: &BlockCache,
        cache: &DitCache,
        dx_out: Tensor,
        dsc: &mut Tensor,
        grads: &mut Grads,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (n, dh) = geometry(c);
        let (hd, b) = (c.hidden, cache.batch);
        let base = block_base(i);
        let w = &self.params[base..];

        // x2 = x1 + gate2 ⊙ mlp(h2)
        let r2 = ops::gated_residual_backward(&bc.gate2, &bc.mlp_out, &dx_out)?;
        let mlp_p = Mlp {
            w1: &w[FC1_W],
            b1: &w[FC1_B],
            w2: &w[FC2_W],
            b2: &w[FC2_B],
        };
        let mg = ops::mlp_backward(&bc.h2, &mlp_p, &r2.dy)?;
        grads.0[base + FC1_W] = Some(mg.dw1);
        grads.0[base + FC1_B] = Some(mg.db1);
        grads.0[base + FC2_W] = Some(mg.dw2);
        grads.0[base + FC2_B] = Some(mg.db2);
        let ln2 = ops::layernorm_mod_backward(&bc.x1, &bc.scale2, &bc.shift2, EPS, &mg.dx)?;
        let mut dx1 = r2.dx;
        shuffle::add_assign_periodic(&mut dx1, &ln2.dx)?;

        // x1 = x + gate1 ⊙ proj(attention(qkv(h1)))
        let r1 = ops::gated_residual_backward(&bc.gate1, &bc.attn_out, &dx1)?;
        drop(dx1);
        let do_rows = grads.linear(
            base + PROJ_W,
            ops::linear_backward(&bc.o_rows, &w[PROJ_W], Some(&w[PROJ_B]), &r1.dy)?,
        );
        let go = shuffle::gather_heads(&do_rows, b, n, c.heads, dh, hd, 0)?;
        drop(do_rows);
        let ag = ops::attention_backward(&bc.q, &bc.k, &bc.v, &bc.o, &bc.lse, &go, None)?;
        let dqkv = shuffle::merge_heads(&[&ag.dq, &ag.dk, &ag.dv], b, n, c.heads, dh)?;
        drop(ag);
        let dh1 = grads.linear(
            base + QKV_W,
            ops::linear_backward(&bc.h1, &w[QKV_W], Some(&w[QKV_B]), &dqkv)?,
        );
        let ln1 = ops::layernorm_mod_backward(&bc.x, &bc.scale1, &bc.shift1, EPS, &dh1)?;
        let mut dx = r1.dx;
        shuffle::add_assign_periodic(&mut dx, &ln1.dx)?;

        let dmod = shuffle::concat_cols(&[
            &ln1.dshift,
            &ln1.dscale,
            &r1.dgate,
            &ln2.dshift,
            &ln2.dscale,
            &r2.dgate,
        ])?;
        let dsc_i = grads.linear(
            base + ADA_W,
            ops::linear_backward(&cache.sc, &w[ADA_W], Some(&w[ADA_B]), &dmod)?,
        );
        shuffle::add_assign_periodic(dsc, &dsc_i)?;
        Ok(dx)
    }
}

/// Gradients by canonical index, filled in as the backward reaches each parameter.
struct Grads(Vec<Option<Tensor>>);

impl Grads {
    /// Stores a linear layer's dw (at `wi`) and db (at `wi + 1`); returns its dx.
    fn linear(&mut self, wi: usize, g: ops::LinearGrads) -> Tensor {
        self.0[wi] = Some(g.dw);
        self.0[wi + 1] = g.db;
        g.dx
    }
}

/// Splits a dual [B, K·hidden] into K duals [B, hidden].
fn split<const K: usize>(m: &Dual) -> Result<[Dual; K]> {
    let primal = shuffle::split_cols(&m.primal, K)?;
    let tangent = match &m.tangent {
        Some(t) => shuffle::split_cols(t, K)?.into_iter().map(Some).collect(),
        None => vec![None; K],
    };
    let parts: Vec<Dual> = primal
        .into_iter()
        .zip(tangent)
        .map(|(primal, tangent)| Dual { primal, tangent })
        .collect();
    parts
        .try_into()
        .map_err(|_| Error::invalid("dit", "modulation split produced the wrong count"))
}
