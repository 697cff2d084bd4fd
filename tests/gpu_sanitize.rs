//! A small workload at odd sizes through every CUDA kernel, for compute-sanitizer (memcheck,
//! racecheck) on the GPU machine: attention B1 H2 N300 d72 (tensor-core path with the padded head
//! dim and Q re-read from shared memory; on Hopper in bf16 the sm_90a kernels with 32-byte swizzled
//! slabs, the last half past d), N77 d64 (Q held in registers; on Hopper in bf16 the sm_90a kernels:
//! TMA, wgmma, mbarriers), N129 d96 (64-byte swizzle on Hopper) and N130 d128 (the sm_90a kernels at
//! d128 with 48-key tiles and a ring of three stages on Hopper), forward, JVP, JVP with
//! constant K and V, backward; layernorm, activations, gated residual, timestep embedding and the
//! MLP (its own test, so that racecheck can skip cuBLAS with `--skip mlp`); the layernorm JVP with
//! rows in registers (C 1152; C 2000 on the wide kernel in 16 bits), alone and with the gated
//! residual fused in front; attention on a packed qkv projection (strided copies, 4-D tensor maps);
//! attention over padded keys (per-entry launches; 2D memsets of a packed dqkv's padding tokens);
//! RMSNorm and rotary embeddings (in the layernorm test).
//! Each output must be finite (outputs are NaN-poisoned first); correctness is gpu_ops' job.
#![cfg(feature = "cuda")]

mod common;

use common::{randn, rng};
use flashjvp::cuda::{attention, layernorm, ops as gops, require_gpu_or_skip, Gpu};
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
        for (n, d) in [(300, 72), (77, 64), (129, 96), (130, 128)] {
            let s = [1, 2, n, d];
            let (q, k, v) = (dual(&s, 1), dual(&s, 2), dual(&s, 3));
            let r = gops::attention_jvp(&q, &k, &v, None, None, dtype).unwrap();
            finite("o", &r.o.primal);
            finite("to", r.o.tangent.as_ref().unwrap());
            finite("tlse", r.lse.tangent.as_ref().unwrap());
            let kc = Dual::constant(k.primal.clone());
            let vc = Dual::constant(v.primal.clone());
            let r = gops::attention_jvp(&q, &kc, &vc, None, None, dtype).unwrap();
            finite("to (constant K, V)", r.o.tangent.as_ref().unwrap());
            let f = gops::attention_forward(&q.primal, &k.primal, &v.primal, None, None, dtype)
                .unwrap();
            finite("o (forward)", &f.o);
            finite("lse (forward)", &f.lse);
            let go = dual(&s, 4).primal;
            let g = gops::attention_backward(
                &q.primal, &k.primal, &v.primal, &f.o, &f.lse, &go, None, None, dtype,
            )
            .unwrap();
            finite("dq", &g.dq);
            finite("dk", &g.dk);
            finite("dv", &g.dv);
        }
    }
}

// Attention over padded keys (one launch per batch entry, each reading only its first key_lens[b]
// keys): the padding rows hold NaN, so an output that read one would not be finite.
#[test]
fn sanitize_attention_key_lens() {
    if require_gpu_or_skip().is_none() {
        return;
    }
    let lens = [300, 1, 131];
    let nan_padding = |t: &Tensor| {
        let [_, h, n, d] = t.shape().try_into().unwrap();
        let mut x = t.to_f64_vec();
        for (row, chunk) in x.chunks_mut(d).enumerate() {
            if row % n >= lens[row / (h * n)] {
                chunk.fill(f64::NAN);
            }
        }
        Tensor::from_vec(x, t.shape()).unwrap()
    };
    for dtype in DTYPES {
        let d = 72;
        let (qs, ks) = ([3, 2, 77, d], [3, 2, 300, d]);
        let q = dual(&qs, 31);
        let pad = |x: Dual| {
            Dual::new(
                nan_padding(&x.primal),
                nan_padding(x.tangent.as_ref().unwrap()),
            )
            .unwrap()
        };
        let (k, v) = (pad(dual(&ks, 32)), pad(dual(&ks, 33)));
        let r = gops::attention_jvp(&q, &k, &v, None, Some(&lens), dtype).unwrap();
        finite("o (key_lens)", &r.o.primal);
        finite("to (key_lens)", r.o.tangent.as_ref().unwrap());
        finite("tlse (key_lens)", r.lse.tangent.as_ref().unwrap());
        let kc = Dual::constant(k.primal.clone());
        let vc = Dual::constant(v.primal.clone());
        let r = gops::attention_jvp(&q, &kc, &vc, None, Some(&lens), dtype).unwrap();
        finite(
            "to (key_lens, constant K, V)",
            r.o.tangent.as_ref().unwrap(),
        );
        let f = gops::attention_forward(&q.primal, &k.primal, &v.primal, None, Some(&lens), dtype)
            .unwrap();
        finite("o (key_lens forward)", &f.o);
        let go = dual(&qs, 34).primal;
        let g = gops::attention_backward(
            &q.primal,
            &k.primal,
            &v.primal,
            &f.o,
            &f.lse,
            &go,
            None,
            Some(&lens),
            dtype,
        )
        .unwrap();
        finite("dq (key_lens)", &g.dq);
        finite("dk (key_lens)", &g.dk);
        finite("dv (key_lens)", &g.dv);
        // The same on a packed projection [B, N, 3, H, d]: k and v of the padding tokens NaN, and
        // dqkv's padding tokens zeroed by a 2D memset per padded entry (runs of H·d elements,
        // 3·H·d apart).
        let gpu = Gpu::get().unwrap();
        let s = [3, 300, 3, 2, d];
        let nan_kv = |t: &Tensor| {
            let mut x = t.to_f64_vec();
            for (token, chunk) in x.chunks_mut(3 * 2 * d).enumerate() {
                if token % 300 >= lens[token / 300] {
                    chunk[2 * d..].fill(f64::NAN);
                }
            }
            gpu.upload(&Tensor::from_vec(x, &s).unwrap(), dtype)
                .unwrap()
        };
        let qkv = dual(&s, 35);
        let (x, tx) = (nan_kv(&qkv.primal), nan_kv(qkv.tangent.as_ref().unwrap()));
        let r = attention::jvp_packed_with_key_lens(&x, Some(&tx), None, &lens).unwrap();
        finite("packed o (key_lens)", &r.o.download().unwrap());
        let to = r.to.as_ref().unwrap().download().unwrap();
        finite("packed to (key_lens)", &to);
        let (o, lse) = attention::forward_packed_with_key_lens(&x, None, &lens).unwrap();
        let go = gpu.upload(&dual(o.shape(), 36).primal, dtype).unwrap();
        let g = attention::backward_packed_with_key_lens(&x, &o, &lse, &go, None, &lens).unwrap();
        finite("packed dqkv (key_lens)", &g.download().unwrap());
    }
}

// Attention on a packed [B, N, 3, H, d] projection with o token-major (the DiT's layout): strided
// cp.async copies on sm_80, 4-D tensor maps on Hopper; forward, JVP and backward.
#[test]
fn sanitize_packed_attention() {
    if require_gpu_or_skip().is_none() {
        return;
    }
    let gpu = Gpu::get().unwrap();
    for dtype in DTYPES {
        for (n, d) in [(300, 72), (77, 64), (130, 128)] {
            let s = [1, n, 3, 2, d];
            let qkv = dual(&s, 21);
            let (x, tx) = (
                gpu.upload(&qkv.primal, dtype).unwrap(),
                gpu.upload(qkv.tangent.as_ref().unwrap(), dtype).unwrap(),
            );
            let r = attention::jvp_packed(&x, Some(&tx), None).unwrap();
            finite("packed o", &r.o.download().unwrap());
            finite("packed to", &r.to.as_ref().unwrap().download().unwrap());
            let (o, lse) = attention::forward_packed(&x, None).unwrap();
            finite("packed o (forward)", &o.download().unwrap());
            let go = gpu.upload(&dual(o.shape(), 22).primal, dtype).unwrap();
            let g = attention::backward_packed(&x, &o, &lse, &go, None).unwrap();
            finite("packed dqkv", &g.download().unwrap());
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
        // Rows held in registers: the narrow JVP kernel (C 1152) and, in 16 bits, the wide one (C 2000;
        // streamed in f32). C 300 above is the element-wise path.
        for (c, seed) in [(1152, 20), (2000, 21)] {
            let x = dual(&[9, c], seed);
            let m = dual(&[3, c], seed + 10);
            let y = gops::layernorm_mod_jvp(&x, &m, &m, 1e-6, dtype).unwrap();
            finite("layernorm ty (register rows)", y.tangent.as_ref().unwrap());
        }
        // RMSNorm at the odd width (scalar path) and at a vector width; rotary embeddings with
        // per-batch tables, both pairings.
        for (c, seed) in [(300, 40), (1152, 41)] {
            let x = dual(&[t, c], seed);
            let w = dual(&[c], seed + 10);
            let y = gops::rms_norm_jvp(&x, &w, 1e-6, dtype).unwrap();
            finite("rms_norm ty", y.tangent.as_ref().unwrap());
            let g = gops::rms_norm_backward(&x.primal, &w.primal, 1e-6, &y.primal, dtype).unwrap();
            finite("rms_norm dx", &g.dx);
            finite("rms_norm dweight", &g.dweight);
        }
        let heads = dual(&[2, 77, 3, 72], 42);
        let table = dual(&[2, 77, 36], 43);
        for pairs in [
            flashjvp::ops::RopePairs::Interleaved,
            flashjvp::ops::RopePairs::Halves,
        ] {
            let (cos, sin) = (&table.primal, table.tangent.as_ref().unwrap());
            let y = gops::rope_jvp(&heads, cos, sin, pairs, dtype).unwrap();
            finite("rope ty", y.tangent.as_ref().unwrap());
            finite(
                "rope dx",
                &gops::rope_backward(&y.primal, cos, sin, pairs, dtype).unwrap(),
            );
        }
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
        // The gated residual fused in front of the layernorm (the DiT block's x1 and h2): element-wise
        // rows (C 300), rows in registers (C 1152) and, in 16 bits, on the wide kernel (C 2000).
        for (t, c, g, seed) in [(t, c, g, 30), (9, 1152, 3, 31), (9, 2000, 3, 32)] {
            residual_layernorm(dtype, t, c, g, seed);
        }
    }
    let e = gops::timestep_embedding_jvp(&dual(&[5], 12), 64, 10000.0).unwrap();
    finite("timestep te", e.tangent.as_ref().unwrap());
}

/// The fused residual + layernorm JVP (residual_layernorm_mod_jvp*) on [t, c] rows, g groups.
fn residual_layernorm(dtype: DType, t: usize, c: usize, g: usize, seed: u64) {
    let gpu = Gpu::get().unwrap();
    let up = |t: &Tensor, dt: DType| gpu.upload(t, dt).unwrap();
    let f = DType::F32;
    let (x, yv) = (dual(&[t, c], seed), dual(&[t, c], seed + 100));
    let (gate, sc) = (dual(&[g, c], seed + 200), dual(&[g, c], seed + 300));
    let (xd, txd, yd, tyd) = (
        up(&x.primal, dtype),
        up(x.tangent.as_ref().unwrap(), dtype),
        up(&yv.primal, dtype),
        up(yv.tangent.as_ref().unwrap(), dtype),
    );
    let (gd, tgd, sd, tsd) = (
        up(&gate.primal, f),
        up(gate.tangent.as_ref().unwrap(), f),
        up(&sc.primal, f),
        up(sc.tangent.as_ref().unwrap(), f),
    );
    let out = || gpu.alloc_out(&[t, c], dtype).unwrap();
    let (x1, tx1, h, th) = (out(), out(), out(), out());
    let p = layernorm::JvpPtrs {
        x: xd.ptr(),
        tx: txd.ptr(),
        scale: sd.ptr(),
        tscale: tsd.ptr(),
        y: h.ptr(),
        ty: th.ptr(),
        ..Default::default()
    };
    let rp = layernorm::ResPtrs {
        y: yd.ptr(),
        ty: tyd.ptr(),
        gate: gd.ptr(),
        tgate: tgd.ptr(),
        x1: x1.ptr(),
        tx1: tx1.ptr(),
    };
    let dims = layernorm::LnDims { t, c, g };
    gpu.run(&layernorm::plan_residual_jvp(dtype, dims, p, rp, 1e-6).unwrap())
        .unwrap();
    for (what, t) in [("x1", &x1), ("tx1", &tx1), ("h", &h), ("th", &th)] {
        finite(
            &format!("residual+layernorm {what} [C{c}]"),
            &t.download().unwrap(),
        );
    }
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
