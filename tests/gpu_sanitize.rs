//! A small workload at odd sizes through every CUDA kernel, for compute-sanitizer (memcheck,
//! racecheck) on the GPU machine: attention B1 H2 N300 d72 (tensor-core path with the padded head
//! dim and Q re-read from shared memory), N77 d64 (Q held in registers; on Hopper in bf16 the
//! sm_90a kernels: TMA, wgmma, mbarriers) and N130 d128 (the sm_90a kernels at d128 with 48-key
//! tiles and a ring of three stages on Hopper), forward, JVP, JVP with
//! constant K and V, backward; layernorm, activations, gated residual, timestep embedding and the
//! MLP (its own test, so that racecheck can skip cuBLAS with `--skip mlp`). Each output must be
//! finite (outputs are NaN-poisoned first); correctness against the reference is gpu_ops' job.
#![cfg(feature = "cuda")]

mod common;

use common::{randn, rng};
use flashjvp::cuda::{ops as gops, require_gpu_or_skip};
use flashjvp::ops::Mlp;
use flashjvp::{DType, Dual, Tensor};

const DTYPES: [DType; 2] = [DType::BF16, DType::F32];

fn finite(what: &str, t: &Tensor) {
    let bad = t.to_f64_vec().iter().filter(|v| !v.is_finite()).count();
    assert_eq!(bad, 0, "{what}: {bad} non-finite elements");
}

fn dual(shape: &[usize], seed: u64) -> Dual {
    let mut r = rng(seed);
    Dual::new(randn(shape, &mut r), randn(shape, &mut r)).unwrap()
}

#[test]
fn sanitize_attention() {
    if require_gpu_or_skip().is_none() {
        return;
    }
    for dtype in DTYPES {
        for (n, d) in [(300, 72), (77, 64), (130, 128)] {
            let s = [1, 2, n, d];
            let (q, k, v) = (dual(&s, 1), dual(&s, 2), dual(&s, 3));
            let r = gops::attention_jvp(&q, &k, &v, None, dtype).unwrap();
            finite("o", &r.o.primal);
            finite("to", r.o.tangent.as_ref().unwrap());
            finite("tlse", r.lse.tangent.as_ref().unwrap());
            let kc = Dual::constant(k.primal.clone());
            let vc = Dual::constant(v.primal.clone());
            let r = gops::attention_jvp(&q, &kc, &vc, None, dtype).unwrap();
            finite("to (constant K, V)", r.o.tangent.as_ref().unwrap());
            let f = gops::attention_forward(&q.primal, &k.primal, &v.primal, None, dtype).unwrap();
            finite("o (forward)", &f.o);
            finite("lse (forward)", &f.lse);
            let go = dual(&s, 4).primal;
            let g = gops::attention_backward(
                &q.primal, &k.primal, &v.primal, &f.o, &f.lse, &go, None, dtype,
            )
            .unwrap();
            finite("dq", &g.dq);
            finite("dk", &g.dk);
            finite("dv", &g.dv);
        }
    }
}

#[test]
fn sanitize_layernorm_and_elementwise() {
    if require_gpu_or_skip().is_none() {
        return;
    }
    for dtype in DTYPES {
        let (t, c, g) = (77, 300, 7);
        let x = dual(&[t, c], 5);
        let sc = dual(&[g, c], 6);
        let sh = dual(&[c], 7);
        let y = gops::layernorm_mod_jvp(&x, &sc, &sh, 1e-6, dtype).unwrap();
        finite("layernorm ty", y.tangent.as_ref().unwrap());
        let gy = dual(&[t, c], 8).primal;
        let gr = gops::layernorm_mod_backward(&x.primal, &sc.primal, &sh.primal, 1e-6, &gy, dtype)
            .unwrap();
        finite("layernorm dx", &gr.dx);
        finite("layernorm dscale", &gr.dscale);
        let u = dual(&[13, 77], 9);
        finite(
            "gelu",
            gops::gelu_jvp(&u, dtype).unwrap().tangent.as_ref().unwrap(),
        );
        finite(
            "silu",
            gops::silu_jvp(&u, dtype).unwrap().tangent.as_ref().unwrap(),
        );
        finite(
            "gelu bwd",
            &gops::gelu_backward(&u.primal, &u.primal, dtype).unwrap(),
        );
        finite(
            "silu bwd",
            &gops::silu_backward(&u.primal, &u.primal, dtype).unwrap(),
        );
        let gate = dual(&[g, c], 10);
        let out = gops::gated_residual_jvp(&x, &gate, &dual(&[t, c], 11), dtype).unwrap();
        finite("residual tout", out.tangent.as_ref().unwrap());
        let rg = gops::gated_residual_backward(&gate.primal, &x.primal, &gy, dtype).unwrap();
        finite("residual dgate", &rg.dgate);
    }
    let e = gops::timestep_embedding_jvp(&dual(&[5], 12), 64, 10000.0).unwrap();
    finite("timestep te", e.tangent.as_ref().unwrap());
}

#[test]
fn sanitize_mlp() {
    if require_gpu_or_skip().is_none() {
        return;
    }
    for dtype in DTYPES {
        for (t, c, hd) in [(13, 75, 130), (32, 64, 128)] {
            let mut r = rng(13);
            let (w1, b1) = (randn(&[hd, c], &mut r), randn(&[hd], &mut r));
            let (w2, b2) = (randn(&[c, hd], &mut r), randn(&[c], &mut r));
            let p = Mlp {
                w1: &w1,
                b1: &b1,
                w2: &w2,
                b2: &b2,
            };
            let x = dual(&[t, c], 14);
            let y = gops::mlp_jvp(&x, &p, dtype).unwrap();
            finite("mlp ty", y.tangent.as_ref().unwrap());
            let g = gops::mlp_backward(&x.primal, &p, &x.primal, dtype).unwrap();
            finite("mlp dw1", &g.dw1);
            finite("mlp db2", &g.db2);
        }
    }
}
