//! The attention core of a Wan-style DiT block on the CPU ops, end to end: q and k normalised by
//! RMSNorm over the full width C (T = B·N rows), split into H heads, rotated by RoPE with a grid per
//! batch entry, then attention over the keys of a sequence padded per entry (`seq_lens` as
//! `key_lens`). The JVP of the whole chain (tangents on q, k, v and the norm weights) against
//! central differences in f64, and the chained backward against it through the adjoint identity:
//! the ops' layouts and conventions compose.

mod common;

use common::*;
use flashjvp::ops::{self, RopePairs};
use flashjvp::{Dual, Tensor};

const B: usize = 2;
const N: usize = 9;
const H: usize = 3;
const D: usize = 8;
const C: usize = H * D;
const LENS: [usize; 2] = [9, 5];
const EPS: f64 = 1e-6;

/// [B, N, H, d] → [B, H, N, d] (or back with `back`).
fn swap_nh(t: &Tensor, back: bool) -> Tensor {
    let (n, h) = if back { (H, N) } else { (N, H) };
    let x = t.to_f64_vec();
    let mut y = vec![0.0; x.len()];
    for b in 0..B {
        for i in 0..n {
            for j in 0..h {
                let src = ((b * n + i) * h + j) * D;
                let dst = ((b * h + j) * n + i) * D;
                y[dst..dst + D].copy_from_slice(&x[src..src + D]);
            }
        }
    }
    let shape = if back { [B, N, H, D] } else { [B, H, N, D] };
    Tensor::from_vec(y, &shape).unwrap()
}

fn reshape(t: &Tensor, shape: &[usize]) -> Tensor {
    Tensor::from_vec(t.to_f64_vec(), shape).unwrap()
}

fn dual_map(d: &Dual, f: impl Fn(&Tensor) -> Tensor) -> Dual {
    Dual {
        primal: f(&d.primal),
        tangent: d.tangent.as_ref().map(f),
    }
}

struct Inputs {
    q: Dual,
    k: Dual,
    v: Dual,
    wq: Dual,
    wk: Dual,
    cos: Tensor,
    sin: Tensor,
}

fn inputs() -> Inputs {
    let mut r = rng(2026);
    let mut d = |shape: &[usize]| Dual::new(randn(shape, &mut r), randn(shape, &mut r)).unwrap();
    let (q, k, v, wq, wk) = (
        d(&[B * N, C]),
        d(&[B * N, C]),
        d(&[B, H, N, D]),
        d(&[C]),
        d(&[C]),
    );
    // Per-entry angles, as Wan's per-sample (frame, height, width) grid gives them.
    let theta = randn(&[B, N, D / 2], &mut r).to_f64_vec();
    let table = |f: fn(f64) -> f64| {
        Tensor::from_vec(theta.iter().map(|&t| f(2.0 * t)).collect(), &[B, N, D / 2]).unwrap()
    };
    Inputs {
        q,
        k,
        v,
        wq,
        wk,
        cos: table(f64::cos),
        sin: table(f64::sin),
    }
}

/// q or k [B·N, C] → normalised, rotated, head-major [B, H, N, d] (primal and tangent).
fn qk_path(x: &Dual, w: &Dual, p: &Inputs) -> Dual {
    let y = ops::rms_norm_jvp(x, w, EPS).unwrap();
    let y = dual_map(&y, |t| reshape(t, &[B, N, H, D]));
    let y = ops::rope_jvp(&y, &p.cos, &p.sin, RopePairs::Interleaved).unwrap();
    dual_map(&y, |t| swap_nh(t, false))
}

fn chain(p: &Inputs) -> Dual {
    let (q, k) = (qk_path(&p.q, &p.wq, p), qk_path(&p.k, &p.wk, p));
    ops::attention_jvp_with_key_lens(&q, &k, &p.v, None, &LENS)
        .unwrap()
        .o
}

#[test]
fn the_chain_s_jvp_matches_finite_differences() {
    let p = inputs();
    let o = chain(&p);
    let fd = central_difference(
        |e| {
            let moved = |d: &Dual| Dual::constant(axpy(&d.primal, e, d.tangent.as_ref().unwrap()));
            let m = Inputs {
                q: moved(&p.q),
                k: moved(&p.k),
                v: moved(&p.v),
                wq: moved(&p.wq),
                wk: moved(&p.wk),
                cos: p.cos.clone(),
                sin: p.sin.clone(),
            };
            vec![chain(&m).primal]
        },
        1e-5,
    );
    assert_close(
        "wan attention tangent",
        &o.tangent.unwrap().to_f64_vec(),
        &fd[0],
        1e-6,
    );
}

#[test]
fn the_chained_backward_satisfies_the_adjoint_identity() {
    let p = inputs();
    let o = chain(&p);
    let go = randn(o.primal.shape(), &mut rng(7));
    // Forward values the backward needs, then the ops' backwards in reverse order.
    let primal = |d: &Dual| Dual::constant(d.primal.clone());
    let c = Inputs {
        q: primal(&p.q),
        k: primal(&p.k),
        v: primal(&p.v),
        wq: primal(&p.wq),
        wk: primal(&p.wk),
        cos: p.cos.clone(),
        sin: p.sin.clone(),
    };
    let (q, k) = (
        qk_path(&c.q, &c.wq, &c).primal,
        qk_path(&c.k, &c.wk, &c).primal,
    );
    let v = &p.v.primal;
    let f = ops::attention_forward_with_key_lens(&q, &k, v, None, &LENS).unwrap();
    let g =
        ops::attention_backward_with_key_lens(&q, &k, v, &f.o, &f.lse, &go, None, &LENS).unwrap();
    let qk_back = |g: &Tensor, x: &Tensor, w: &Tensor| {
        let g =
            ops::rope_backward(&swap_nh(g, true), &p.cos, &p.sin, RopePairs::Interleaved).unwrap();
        ops::rms_norm_backward(x, w, EPS, &reshape(&g, &[B * N, C])).unwrap()
    };
    let gq = qk_back(&g.dq, &p.q.primal, &p.wq.primal);
    let gk = qk_back(&g.dk, &p.k.primal, &p.wk.primal);
    let t = |d: &Dual| d.tangent.clone().unwrap();
    let rhs = dot(&gq.dx, &t(&p.q))
        + dot(&gq.dweight, &t(&p.wq))
        + dot(&gk.dx, &t(&p.k))
        + dot(&gk.dweight, &t(&p.wk))
        + dot(&g.dv, &t(&p.v));
    assert_adjoint("wan attention", dot(&go, &o.tangent.unwrap()), rhs, 1e-10);
}
