//! Every CUDA op against the CPU reference computed in f64, for bf16, f16 and f32 storage.
//!
//! The reference runs on the inputs as the GPU sees them (rounded to the storage dtype; modulation
//! vectors, gates and the time path rounded to f32, which the kernels keep), so the measured error
//! is the GPU's arithmetic and output rounding alone. Outputs are NaN-poisoned before the kernels
//! run (the backend's default), so an element a kernel misses fails the comparison. Every measured
//! relative error ‖gpu − ref‖ / ‖ref‖ is printed (past the test harness's capture) as a line
//! starting with `ERR`, for the GPU session's notes.
//!
//! Tolerances: f32 storage 1e-5; bf16 1e-2; f16 5e-3; the attention tangent (ȯ) in bf16/f16 3e-3.
//! Without a GPU each test prints "skipped: no CUDA device" and passes; with FLASHJVP_REQUIRE_GPU=1
//! it fails. The bad-input tests at the end need no GPU: shapes are checked before the GPU is used.
#![cfg(feature = "cuda")]

mod common;

use std::io::Write;

use common::{randn, rel_err, rng};
use flashjvp::cuda::{self, ops as gops, require_gpu_or_skip};
use flashjvp::ops::{self, Mlp};
use flashjvp::{DType, Dual, Error, Tensor};
use rand::rngs::StdRng;

/// Runs the body once per storage dtype, as three tests (`NAME::bf16`, `NAME::f16`, `NAME::f32`),
/// each skipped (or failed, with FLASHJVP_REQUIRE_GPU=1) without a GPU.
macro_rules! gpu_test {
    ($name:ident, |$dtype:ident| $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn body($dtype: DType) $body
            #[test]
            fn bf16() {
                if require_gpu_or_skip().is_some() {
                    body(DType::BF16)
                }
            }
            #[test]
            fn f16() {
                if require_gpu_or_skip().is_some() {
                    body(DType::F16)
                }
            }
            #[test]
            fn f32() {
                if require_gpu_or_skip().is_some() {
                    body(DType::F32)
                }
            }
        }
    };
}

/// The tolerance of an output stored in `dtype`.
fn tol(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 1e-2,
        DType::F16 => 5e-3,
        _ => 1e-5,
    }
}

/// The tolerance of the attention tangent.
fn tol_tangent(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 3e-3,
    }
}

/// A line past the harness's output capture (visible in the GPU session's logs).
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Compares a GPU output with the f64 reference: no NaN or infinity (a poisoned element left
/// unwritten), then relative error within `tol`. Prints the error; on failure also the first
/// mismatches and the largest difference.
fn check(what: &str, dtype: DType, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what} ({dtype}): shape");
    let g = got.to_f64_vec();
    let w = want.to_f64_vec();
    let bad: Vec<usize> = g
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_finite())
        .map(|(i, _)| i)
        .collect();
    if !bad.is_empty() {
        report(&format!(
            "ERR {what} {dtype}: {} non-finite elements",
            bad.len()
        ));
        panic!(
            "{what} ({dtype}): {} of {} elements are not finite (unwritten, poisoned with NaN?), \
             first at {:?}",
            bad.len(),
            g.len(),
            &bad[..bad.len().min(8)]
        );
    }
    let err = rel_err(&g, &w);
    report(&format!(
        "ERR {what} {dtype}: rel {err:.3e} (tol {tol:.0e}){}",
        if err <= tol { "" } else { "  FAIL" }
    ));
    common::assert_close(&format!("{what} ({dtype})"), &g, &w, tol);
}

/// For an output that is exactly zero in exact arithmetic (the o tangent and dq, dk with a single
/// key): its norm relative to the norm of a related output of the same scale, within `tol`.
fn check_small(what: &str, dtype: DType, got: &Tensor, scale: &Tensor, tol: f64) {
    let g = got.to_f64_vec();
    assert!(
        g.iter().all(|v| v.is_finite()),
        "{what} ({dtype}): not finite"
    );
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let err = norm(&g) / norm(&scale.to_f64_vec()).max(1e-300);
    report(&format!(
        "ERR {what} {dtype}: rel {err:.3e} (tol {tol:.0e}){}",
        if err <= tol { "" } else { "  FAIL" }
    ));
    assert!(
        err <= tol,
        "{what} ({dtype}): |got| / |scale| = {err:.3e} > {tol:.1e}"
    );
}

/// `t` as the GPU sees it in `dtype`, back in f64.
fn rd(t: &Tensor, dtype: DType) -> Tensor {
    t.to_dtype(dtype).to_dtype(DType::F64)
}

fn rdd(d: &Dual, dtype: DType) -> Dual {
    Dual {
        primal: rd(&d.primal, dtype),
        tangent: d.tangent.as_ref().map(|t| rd(t, dtype)),
    }
}

fn dual(r: &mut StdRng, shape: &[usize], tangent: bool) -> Dual {
    let p = randn(shape, r);
    if tangent {
        Dual::new(p, randn(shape, r)).unwrap()
    } else {
        Dual::constant(p)
    }
}

// ---------------------------------------------------------------------------------------------
// Attention.

/// (B, H, Nq, Nk, d, dv): every head dim, tails (77, 300, 130, 17), Nq ≠ Nk both ways, B·H > 1, a
/// single query and key; v's head dim dv ≠ d both ways, with and without 128 on either side (the
/// 32-key tiles), with the padded 72 on either side, and with one key.
const ATTN: &[(usize, usize, usize, usize, usize, usize)] = &[
    (1, 1, 64, 64, 32, 32),
    (2, 3, 77, 300, 72, 72),
    (1, 2, 300, 77, 64, 64),
    (2, 2, 130, 200, 96, 96),
    (1, 3, 129, 65, 128, 128),
    (2, 1, 17, 33, 128, 128),
    (1, 1, 1, 1, 64, 64),
    (1, 2, 200, 1000, 32, 32),
    (1, 2, 77, 130, 64, 128),
    (2, 1, 65, 33, 128, 64),
    (1, 1, 100, 70, 72, 96),
    (2, 2, 50, 90, 32, 72),
    (1, 3, 129, 200, 96, 32),
    (1, 1, 1, 1, 128, 32),
];

/// Shapes of q, k and v.
fn attn_shape(s: (usize, usize, usize, usize, usize, usize)) -> [[usize; 4]; 3] {
    [
        [s.0, s.1, s.2, s.4],
        [s.0, s.1, s.3, s.4],
        [s.0, s.1, s.3, s.5],
    ]
}

fn name(s: (usize, usize, usize, usize, usize, usize)) -> String {
    format!("B{} H{} Nq{} Nk{} d{} dv{}", s.0, s.1, s.2, s.3, s.4, s.5)
}

/// The JVP with tangents on (q, k, v) as given, against the reference.
fn attention_jvp_case(dtype: DType, which: (bool, bool, bool), label: &str) {
    for (i, &s) in ATTN.iter().enumerate() {
        let mut r = rng(100 + i as u64);
        let [qs, ks, vs] = attn_shape(s);
        let q = dual(&mut r, &qs, which.0);
        let k = dual(&mut r, &ks, which.1);
        let v = dual(&mut r, &vs, which.2);
        let got = gops::attention_jvp(&q, &k, &v, None, None, dtype).unwrap();
        let want =
            ops::attention_jvp(&rdd(&q, dtype), &rdd(&k, dtype), &rdd(&v, dtype), None).unwrap();
        let n = name(s);
        check(
            &format!("attention {label} o [{n}]"),
            dtype,
            &got.o.primal,
            &want.o.primal,
            tol(dtype),
        );
        check(
            &format!("attention {label} lse [{n}]"),
            dtype,
            &got.lse.primal,
            &want.lse.primal,
            tol(dtype),
        );
        let to = got.o.tangent.as_ref().expect("a tangent");
        if s.3 == 1 && !which.2 {
            // One key and a constant v: ȯ = ṡ v − ṡ v = 0 exactly; only rounding remains.
            check_small(
                &format!("attention {label} tangent o (zero) [{n}]"),
                dtype,
                to,
                &want.o.primal,
                tol_tangent(dtype),
            );
        } else {
            check(
                &format!("attention {label} tangent o [{n}]"),
                dtype,
                to,
                want.o.tangent.as_ref().unwrap(),
                tol_tangent(dtype),
            );
        }
        check(
            &format!("attention {label} tangent lse [{n}]"),
            dtype,
            got.lse.tangent.as_ref().expect("a tangent"),
            want.lse.tangent.as_ref().unwrap(),
            tol_tangent(dtype),
        );
    }
}

/// o, to, lse, tlse of a bf16 JVP with f16 value products (`plan_f16_values_for`: the Hopper kernels
/// on sm_90a where they apply, else the sm_80 ones), outputs and workspace NaN-poisoned first.
fn f16_values_jvp(gpu: &cuda::Gpu, q: &Dual, k: &Dual, v: &Dual) -> [Tensor; 4] {
    use cuda::attention::{self as attn, Variant};
    let dtype = DType::BF16;
    let up = |t: &Tensor| gpu.upload(t, dtype).unwrap();
    let (qd, kd, vd) = (up(&q.primal), up(&k.primal), up(&v.primal));
    let dims = attn::check_shapes(qd.shape(), kd.shape(), vd.shape()).unwrap();
    let variant = if k.tangent.is_some() {
        Variant::Jvp
    } else {
        Variant::JvpNoKv
    };
    let tan = |d: &Dual| d.tangent.as_ref().map(up);
    let (tq, tk, tv) = (tan(q).unwrap(), tan(k), tan(v));
    let out = |shape: &[usize], dt| gpu.poisoned(shape, dt).unwrap();
    let (o, to) = (out(&dims.o_shape(), dtype), out(&dims.o_shape(), dtype));
    let (lse, tlse) = (
        out(&dims.lse_shape(), DType::F32),
        out(&dims.lse_shape(), DType::F32),
    );
    let ws_bytes = attn::f16_values_workspace_bytes(variant, dims);
    let ws = out(&[ws_bytes.div_ceil(4)], DType::F32);
    let p = attn::JvpPtrs {
        q: qd.ptr(),
        k: kd.ptr(),
        v: vd.ptr(),
        tq: tq.ptr(),
        tk: tk.as_ref().map_or(0, |t| t.ptr()),
        tv: tv.as_ref().map_or(0, |t| t.ptr()),
        o: o.ptr(),
        to: to.ptr(),
        lse: lse.ptr(),
        tlse: tlse.ptr(),
    };
    let scale = attn::resolve_scale(None, dims.d).unwrap();
    let lay = attn::Layout::contiguous(dims);
    let plan = cuda::attention_sm90::plan_f16_values_for(
        gpu.arch(),
        variant,
        dims,
        lay,
        p,
        scale,
        ws.ptr(),
    )
    .unwrap();
    gpu.run(&plan).unwrap();
    [o, to, lse, tlse].map(|t| t.download().unwrap())
}

/// The f16 value products (`FLASHJVP_ATTENTION_VALUES=f16`) at every bf16 shape with dv == d,
/// tangents on q, k, v and on q only: o and lse within the bf16 tolerance, and the o tangent within
/// 5 % of the error that rounding the exact tangent to bf16 costs alone (about 1.65e-3; the bf16
/// value products' error is about 1.4 times it). On the emulator's sm_80 the sm_80 kernels, on its
/// sm_90a the Hopper ones (d 32: sm_80's).
#[test]
fn attention_jvp_f16_values() {
    let Some(gpu) = require_gpu_or_skip() else {
        return;
    };
    let dtype = DType::BF16;
    let (mut worst, mut worst_ratio) = (0.0f64, 0.0f64);
    for (i, &s) in ATTN.iter().enumerate().filter(|(_, s)| s.4 == s.5) {
        for kv in [true, false] {
            let mut r = rng(700 + i as u64);
            let [qs, ks, vs] = attn_shape(s);
            let (q, k, v) = (
                dual(&mut r, &qs, true),
                dual(&mut r, &ks, kv),
                dual(&mut r, &vs, kv),
            );
            let [o, to, lse, tlse] = f16_values_jvp(&gpu, &q, &k, &v);
            let want = ops::attention_jvp(&rdd(&q, dtype), &rdd(&k, dtype), &rdd(&v, dtype), None)
                .unwrap();
            let n = format!("{} [{}]", if kv { "jvp" } else { "nokv" }, name(s));
            check(
                &format!("f16 values o {n}"),
                dtype,
                &o,
                &want.o.primal,
                tol(dtype),
            );
            check(
                &format!("f16 values lse {n}"),
                dtype,
                &lse,
                &want.lse.primal,
                tol(dtype),
            );
            let wt = want.o.tangent.as_ref().unwrap();
            if s.3 == 1 && !kv {
                check_small(
                    &format!("f16 values to (zero) {n}"),
                    dtype,
                    &to,
                    &want.o.primal,
                    1e-3,
                );
                continue;
            }
            // The floor: the exact tangent rounded to bf16.
            let floor = rel_err(&rd(wt, dtype).to_f64_vec(), &wt.to_f64_vec());
            let bound = if floor > 0.0 { 1.05 * floor } else { 1e-6 };
            check(&format!("f16 values to {n}"), dtype, &to, wt, bound);
            let err = rel_err(&to.to_f64_vec(), &wt.to_f64_vec());
            worst = worst.max(err);
            if floor > 0.0 {
                worst_ratio = worst_ratio.max(err / floor);
            }
            check(
                &format!("f16 values tlse {n}"),
                dtype,
                &tlse,
                want.lse.tangent.as_ref().unwrap(),
                1e-3,
            );
        }
    }
    report(&format!(
        "MAX f16 values ({}): largest tangent error {worst:.3e}, at most {worst_ratio:.3}x the bf16 \
         rounding of the exact tangent (aim 1.7e-3)",
        gpu.arch()
    ));
    // Past f16's range: V and its tangent 2^20 times larger give exactly 2^20 times o and its
    // tangent (the copies are scaled by a power of two), lse and its tangent unchanged.
    let s = ATTN[1];
    let mut r = rng(799);
    let [qs, ks, vs] = attn_shape(s);
    let (q, k, v) = (
        dual(&mut r, &qs, true),
        dual(&mut r, &ks, true),
        dual(&mut r, &vs, true),
    );
    let f = 2f64.powi(20);
    let times = |t: &Tensor| {
        Tensor::from_vec(
            t.to_f64_vec().iter().map(|x| x * f).collect::<Vec<_>>(),
            t.shape(),
        )
        .unwrap()
    };
    let big = Dual::new(times(&v.primal), times(v.tangent.as_ref().unwrap())).unwrap();
    let base = f16_values_jvp(&gpu, &q, &k, &v);
    let got = f16_values_jvp(&gpu, &q, &k, &big);
    for (i, (what, m)) in [("o", f), ("to", f), ("lse", 1.0), ("tlse", 1.0)]
        .into_iter()
        .enumerate()
    {
        let (a, b) = (got[i].to_f64_vec(), base[i].to_f64_vec());
        let diff = a.iter().zip(&b).filter(|(x, y)| **x != **y * m).count();
        assert_eq!(
            diff, 0,
            "{what} with V x 2^20: {diff} elements are not 2^20 x unscaled"
        );
    }
    // The explicit entry point (`jvp_into_with`) runs the same plan: the same bits.
    use cuda::attention as attn;
    let up = |t: &Tensor| gpu.upload(t, dtype).unwrap();
    let tan = |d: &Dual| up(d.tangent.as_ref().unwrap());
    let (qd, kd, vd) = (up(&q.primal), up(&k.primal), up(&v.primal));
    let (tq, tk, tv) = (tan(&q), tan(&k), tan(&v));
    let dims = attn::check_shapes(qd.shape(), kd.shape(), vd.shape()).unwrap();
    let out = attn::DeviceAttentionJvp {
        o: gpu.poisoned(&dims.o_shape(), dtype).unwrap(),
        to: Some(gpu.poisoned(&dims.o_shape(), dtype).unwrap()),
        lse: gpu.poisoned(&dims.lse_shape(), DType::F32).unwrap(),
        tlse: Some(gpu.poisoned(&dims.lse_shape(), DType::F32).unwrap()),
    };
    let scale = attn::resolve_scale(None, dims.d).unwrap();
    let f16v = attn::ValueProducts::F16;
    attn::jvp_into_with(
        &gpu,
        &qd,
        &kd,
        &vd,
        Some(&tq),
        Some(&tk),
        Some(&tv),
        &out,
        scale,
        f16v,
    )
    .unwrap();
    let got = [
        &out.o,
        out.to.as_ref().unwrap(),
        &out.lse,
        out.tlse.as_ref().unwrap(),
    ];
    for (i, what) in ["o", "to", "lse", "tlse"].into_iter().enumerate() {
        let (a, b) = (
            got[i].download().unwrap().to_f64_vec(),
            base[i].to_f64_vec(),
        );
        assert!(a == b, "jvp_into_with(F16): {what} differs from the plan's");
    }
}

gpu_test!(attention_jvp_all_tangents, |dtype| {
    attention_jvp_case(dtype, (true, true, true), "jvp");
});

// K and V without tangent: the four-product kernel (cross-attention to a constant context).
gpu_test!(attention_jvp_constant_kv, |dtype| {
    attention_jvp_case(dtype, (true, false, false), "jvp nokv");
});

// Tangent on k only: the full kernel with zero q̇ and v̇.
gpu_test!(attention_jvp_tangent_on_k_only, |dtype| {
    attention_jvp_case(dtype, (false, true, false), "jvp k-only");
});

// Peaked attention (scale 1 instead of 1/√d: scores of spread √d, so a few keys carry each row, as in
// trained models): the regime where ȯ = T/l − μ·o would cancel the 16-bit rounding of P·Ṡ against
// μ·o. Both JVP variants keep T centred on the running μ and must hold the usual tangent tolerance here.
gpu_test!(attention_jvp_peaked_softmax, |dtype| {
    for (i, &s) in [
        (1, 2, 70, 200, 64, 64),
        (1, 1, 33, 300, 128, 128),
        (2, 1, 40, 90, 72, 72),
    ]
    .iter()
    .enumerate()
    {
        let mut r = rng(300 + i as u64);
        let [qs, ks, vs] = attn_shape(s);
        let (q, k, v) = (
            dual(&mut r, &qs, true),
            dual(&mut r, &ks, true),
            dual(&mut r, &vs, true),
        );
        let got = gops::attention_jvp(&q, &k, &v, Some(1.0), None, dtype).unwrap();
        let want = ops::attention_jvp(&rdd(&q, dtype), &rdd(&k, dtype), &rdd(&v, dtype), Some(1.0))
            .unwrap();
        let n = name(s);
        check(
            &format!("attention peaked o [{n}]"),
            dtype,
            &got.o.primal,
            &want.o.primal,
            tol(dtype),
        );
        check(
            &format!("attention peaked tangent o [{n}]"),
            dtype,
            got.o.tangent.as_ref().unwrap(),
            want.o.tangent.as_ref().unwrap(),
            tol_tangent(dtype),
        );
        // The nokv kernels (sm_80 and Hopper) centre T too and must hold the same bound.
        let dims = cuda::attention::check_shapes(&qs, &ks, &vs).unwrap();
        let hopper = cuda::Gpu::get().is_ok_and(|g| {
            cuda::attention_sm90::path_for(g.arch(), dtype, dims)
                == cuda::attention_sm90::Path::Sm90a
        });
        let (kc, vc) = (
            Dual::constant(k.primal.clone()),
            Dual::constant(v.primal.clone()),
        );
        let got = gops::attention_jvp(&q, &kc, &vc, Some(1.0), None, dtype).unwrap();
        let want = ops::attention_jvp(
            &rdd(&q, dtype),
            &rdd(&kc, dtype),
            &rdd(&vc, dtype),
            Some(1.0),
        )
        .unwrap();
        check(
            &format!(
                "attention peaked nokv tangent o [{n}] ({})",
                if hopper { "sm90a" } else { "sm80" }
            ),
            dtype,
            got.o.tangent.as_ref().unwrap(),
            want.o.tangent.as_ref().unwrap(),
            tol_tangent(dtype),
        );
    }
});

gpu_test!(attention_forward, |dtype| {
    for (i, &s) in ATTN.iter().enumerate() {
        let mut r = rng(200 + i as u64);
        let [qs, ks, vs] = attn_shape(s);
        let (q, k, v) = (randn(&qs, &mut r), randn(&ks, &mut r), randn(&vs, &mut r));
        let scale = Some(0.3);
        let got = gops::attention_forward(&q, &k, &v, scale, None, dtype).unwrap();
        let want =
            ops::attention_forward(&rd(&q, dtype), &rd(&k, dtype), &rd(&v, dtype), scale).unwrap();
        check(
            &format!("attention fwd o [{}]", name(s)),
            dtype,
            &got.o,
            &want.o,
            tol(dtype),
        );
        check(
            &format!("attention fwd lse [{}]", name(s)),
            dtype,
            &got.lse,
            &want.lse,
            tol(dtype),
        );
    }
});

gpu_test!(attention_without_tangents_is_constant, |dtype| {
    let mut r = rng(7);
    let q = dual(&mut r, &[1, 2, 40, 64], false);
    let k = dual(&mut r, &[1, 2, 50, 64], false);
    let v = dual(&mut r, &[1, 2, 50, 64], false);
    let got = gops::attention_jvp(&q, &k, &v, None, None, dtype).unwrap();
    assert!(got.o.tangent.is_none() && got.lse.tangent.is_none());
    let want = ops::attention_forward(
        &rd(&q.primal, dtype),
        &rd(&k.primal, dtype),
        &rd(&v.primal, dtype),
        None,
    )
    .unwrap();
    check(
        "attention no-tangent o",
        dtype,
        &got.o.primal,
        &want.o,
        tol(dtype),
    );
});

gpu_test!(attention_backward, |dtype| {
    for (i, &s) in ATTN.iter().enumerate() {
        let mut r = rng(300 + i as u64);
        let [qs, ks, vs] = attn_shape(s);
        let (q, k, v) = (randn(&qs, &mut r), randn(&ks, &mut r), randn(&vs, &mut r));
        let go = randn(&[s.0, s.1, s.2, s.5], &mut r);
        let (q, k, v, go) = (rd(&q, dtype), rd(&k, dtype), rd(&v, dtype), rd(&go, dtype));
        // o and lse as a forward would hand them over: o in the storage dtype, lse in f32.
        let fwd = ops::attention_forward(&q, &k, &v, None).unwrap();
        let (o, lse) = (rd(&fwd.o, dtype), rd(&fwd.lse, DType::F32));
        let got = gops::attention_backward(&q, &k, &v, &o, &lse, &go, None, None, dtype).unwrap();
        let want = ops::attention_backward(&q, &k, &v, &o, &lse, &go, None).unwrap();
        let n = name(s);
        if s.3 == 1 {
            // One key: dS = P (dP − D) = 0, so dq = dk = 0 exactly.
            let dv = &want.dv;
            check_small(
                &format!("attention bwd dq (zero) [{n}]"),
                dtype,
                &got.dq,
                dv,
                tol(dtype),
            );
            check_small(
                &format!("attention bwd dk (zero) [{n}]"),
                dtype,
                &got.dk,
                dv,
                tol(dtype),
            );
        } else {
            check(
                &format!("attention bwd dq [{n}]"),
                dtype,
                &got.dq,
                &want.dq,
                tol(dtype),
            );
            check(
                &format!("attention bwd dk [{n}]"),
                dtype,
                &got.dk,
                &want.dk,
                tol(dtype),
            );
        }
        check(
            &format!("attention bwd dv [{n}]"),
            dtype,
            &got.dv,
            &want.dv,
            tol(dtype),
        );
    }
});

/// The backward of one shape at `scale` against the reference (dq, dk, dv all checked: Nk > 1).
fn backward_case(
    dtype: DType,
    s: (usize, usize, usize, usize, usize, usize),
    scale: Option<f64>,
    seed: u64,
    label: &str,
) {
    let mut r = rng(seed);
    let [qs, ks, vs] = attn_shape(s);
    let (q, k, v) = (randn(&qs, &mut r), randn(&ks, &mut r), randn(&vs, &mut r));
    let go = randn(&[s.0, s.1, s.2, s.5], &mut r);
    let (q, k, v, go) = (rd(&q, dtype), rd(&k, dtype), rd(&v, dtype), rd(&go, dtype));
    let fwd = ops::attention_forward(&q, &k, &v, scale).unwrap();
    let (o, lse) = (rd(&fwd.o, dtype), rd(&fwd.lse, DType::F32));
    let got = gops::attention_backward(&q, &k, &v, &o, &lse, &go, scale, None, dtype).unwrap();
    let want = ops::attention_backward(&q, &k, &v, &o, &lse, &go, scale).unwrap();
    let n = name(s);
    for (gname, g, w) in [
        ("dq", &got.dq, &want.dq),
        ("dk", &got.dk, &want.dk),
        ("dv", &got.dv, &want.dv),
    ] {
        check(
            &format!("attention bwd {label} {gname} [{n}]"),
            dtype,
            g,
            w,
            tol(dtype),
        );
    }
}

// Every (d, dv) pair of the instantiated head dims (each its own kernel pair), with query and key
// tails past the 64/32-row tiles of both kernels and Nq ≠ Nk either way.
gpu_test!(attention_backward_every_head_dim_pair, |dtype| {
    let mut i = 0;
    for d in cuda::attention::HEAD_DIMS {
        for dv in cuda::attention::HEAD_DIMS {
            let s = if i % 2 == 0 {
                (1, 2, 70, 97, d, dv)
            } else {
                (2, 1, 129, 33, d, dv)
            };
            backward_case(dtype, s, None, 900 + i, "pairs");
            i += 1;
        }
    }
});

// Peaked softmax (scale 1: a few keys carry each row) and odd shapes: one query against many keys,
// many queries against two keys, tiles exactly full (64, 128) and one past.
gpu_test!(attention_backward_peaked_and_odd, |dtype| {
    for (i, &s) in [
        (1, 2, 70, 200, 64, 64),
        (1, 1, 33, 300, 128, 128),
        (2, 1, 40, 90, 72, 72),
        (1, 1, 65, 129, 96, 32),
    ]
    .iter()
    .enumerate()
    {
        backward_case(dtype, s, Some(1.0), 950 + i as u64, "peaked");
    }
    for (i, &s) in [
        (1, 1, 1, 300, 64, 64),
        (1, 2, 300, 2, 72, 128),
        (2, 2, 64, 128, 128, 72),
        (1, 1, 129, 65, 32, 96),
        (3, 1, 5, 7, 96, 96),
    ]
    .iter()
    .enumerate()
    {
        backward_case(dtype, s, None, 970 + i as u64, "odd");
    }
});

/// Attention over padded keys: (B, H, Nq, Nk, d, dv) and one key count per batch entry: a single
/// key, all keys, counts inside and at the edge of the key tiles, every head dim, dv ≠ d (the sm_80
/// kernels on Hopper too).
type AttnShape = (usize, usize, usize, usize, usize, usize);
const KEY_LENS: &[(AttnShape, &[usize])] = &[
    ((3, 2, 77, 300, 72, 72), &[300, 1, 131]),
    ((2, 2, 130, 200, 64, 64), &[129, 64]),
    ((2, 1, 65, 90, 128, 128), &[33, 90]),
    ((2, 3, 40, 70, 96, 96), &[70, 17]),
    ((2, 1, 50, 90, 32, 96), &[7, 90]),
];

/// `t` [B, H, N, w] with NaN in the rows at and past `lens[b]` of batch entry b: a kernel that read
/// one would put NaN in its outputs.
fn nan_padded(t: &Tensor, lens: &[usize]) -> Tensor {
    let [_, h, n, w] = t.shape().try_into().unwrap();
    let mut x = t.to_f64_vec();
    for (row, chunk) in x.chunks_mut(w).enumerate() {
        if row % n >= lens[row / (h * n)] {
            chunk.fill(f64::NAN);
        }
    }
    Tensor::from_vec(x, t.shape()).unwrap()
}

// The JVP (tangents on q, k, v and on q only), the forward and the backward with key_lens against
// the CPU reference, the padding rows of k, v and their tangents NaN.
gpu_test!(attention_key_lens, |dtype| {
    for (i, &(s, lens)) in KEY_LENS.iter().enumerate() {
        let mut r = rng(1300 + i as u64);
        let [qs, ks, vs] = attn_shape(s);
        let q = dual(&mut r, &qs, true);
        let pad = |d: Dual| Dual {
            primal: nan_padded(&d.primal, lens),
            tangent: d.tangent.map(|t| nan_padded(&t, lens)),
        };
        let (k, v) = (pad(dual(&mut r, &ks, true)), pad(dual(&mut r, &vs, true)));
        let n = format!("{} lens {lens:?}", name(s));
        for (label, k, v) in [
            ("jvp", k.clone(), v.clone()),
            (
                "jvp const kv",
                Dual::constant(k.primal.clone()),
                Dual::constant(v.primal.clone()),
            ),
        ] {
            let got = gops::attention_jvp(&q, &k, &v, None, Some(lens), dtype).unwrap();
            let (rq, rk, rv) = (rdd(&q, dtype), rdd(&k, dtype), rdd(&v, dtype));
            let want = ops::attention_jvp_with_key_lens(&rq, &rk, &rv, None, lens).unwrap();
            let pairs = [
                ("o", &got.o.primal, &want.o.primal, tol(dtype)),
                ("lse", &got.lse.primal, &want.lse.primal, tol(dtype)),
                (
                    "tangent o",
                    got.o.tangent.as_ref().unwrap(),
                    want.o.tangent.as_ref().unwrap(),
                    tol_tangent(dtype),
                ),
                (
                    "tangent lse",
                    got.lse.tangent.as_ref().unwrap(),
                    want.lse.tangent.as_ref().unwrap(),
                    tol_tangent(dtype),
                ),
            ];
            for (out, g, w, tol) in pairs {
                check(
                    &format!("attention key_lens {label} {out} [{n}]"),
                    dtype,
                    g,
                    w,
                    tol,
                );
            }
        }
        let (rq, rk, rv) = (
            rd(&q.primal, dtype),
            rd(&k.primal, dtype),
            rd(&v.primal, dtype),
        );
        let got = gops::attention_forward(&q.primal, &k.primal, &v.primal, None, Some(lens), dtype)
            .unwrap();
        let want = ops::attention_forward_with_key_lens(&rq, &rk, &rv, None, lens).unwrap();
        check(
            &format!("attention key_lens fwd o [{n}]"),
            dtype,
            &got.o,
            &want.o,
            tol(dtype),
        );
        check(
            &format!("attention key_lens fwd lse [{n}]"),
            dtype,
            &got.lse,
            &want.lse,
            tol(dtype),
        );
        let go = rd(&randn(&[s.0, s.1, s.2, s.5], &mut r), dtype);
        let (o, lse) = (rd(&want.o, dtype), rd(&want.lse, DType::F32));
        let got = gops::attention_backward(&rq, &rk, &rv, &o, &lse, &go, None, Some(lens), dtype)
            .unwrap();
        let want = ops::attention_backward_with_key_lens(&rq, &rk, &rv, &o, &lse, &go, None, lens)
            .unwrap();
        for (gname, g, w) in [
            ("dq", &got.dq, &want.dq),
            ("dk", &got.dk, &want.dk),
            ("dv", &got.dv, &want.dv),
        ] {
            check(
                &format!("attention key_lens bwd {gname} [{n}]"),
                dtype,
                g,
                w,
                tol(dtype),
            );
        }
        // The padding rows' gradients are exactly 0 (zero-filled, never written by a kernel).
        for (gname, g) in [("dk", &got.dk), ("dv", &got.dv)] {
            let [_, h, nk, w] = g.shape().try_into().unwrap();
            let x = g.to_f64_vec();
            for (row, chunk) in x.chunks(w).enumerate() {
                if row % nk >= lens[row / (h * nk)] {
                    assert!(
                        chunk.iter().all(|&e| e == 0.0),
                        "{gname} padding row {row} [{n}]"
                    );
                }
            }
        }
    }
    // Bad key counts are errors naming them, before anything runs.
    let (q, k) = (t(&[2, 1, 8, 64]), t(&[2, 1, 9, 64]));
    for lens in [&[9usize][..], &[9, 10], &[0, 9]] {
        let e = gops::attention_forward(&q, &k, &k, None, Some(lens), dtype).unwrap_err();
        assert!(e.to_string().contains("key_lens"), "{lens:?}: {e}");
    }
});

/// (B, N, H, d) of the packed backward: tails, d72, B·H > 1, every head dim.
const PACKED: &[(usize, usize, usize, usize)] = &[
    (2, 77, 3, 72),
    (1, 130, 2, 64),
    (2, 33, 2, 128),
    (1, 200, 4, 32),
    (2, 65, 1, 96),
];

/// [B, N, G, H, d] (G = 3 for qkv, 1 for o) → G tensors [B, H, N, d].
fn unpack_heads(t: &Tensor, s: (usize, usize, usize, usize), g: usize) -> Vec<Tensor> {
    let (b, n, h, d) = s;
    let x = t.to_f64_vec();
    (0..g)
        .map(|gi| {
            let mut out = vec![0.0; b * h * n * d];
            for bi in 0..b {
                for ni in 0..n {
                    for hi in 0..h {
                        let src = (((bi * n + ni) * g + gi) * h + hi) * d;
                        let dst = ((bi * h + hi) * n + ni) * d;
                        out[dst..dst + d].copy_from_slice(&x[src..src + d]);
                    }
                }
            }
            Tensor::from_vec(out, &[b, h, n, d]).unwrap()
        })
        .collect()
}

/// [B, H, N, d] → [B, N, H, d].
fn merge_heads(t: &Tensor) -> Tensor {
    let sh = t.shape();
    let (b, h, n, d) = (sh[0], sh[1], sh[2], sh[3]);
    let x = t.to_f64_vec();
    let mut out = vec![0.0; x.len()];
    for bi in 0..b {
        for hi in 0..h {
            for ni in 0..n {
                let src = ((bi * h + hi) * n + ni) * d;
                let dst = ((bi * n + ni) * h + hi) * d;
                out[dst..dst + d].copy_from_slice(&x[src..src + d]);
            }
        }
    }
    Tensor::from_vec(out, &[b, n, h, d]).unwrap()
}

// The backward read in place from a packed qkv [B, N, 3, H, d] with o and dout [B, N, H, d]
// (strided kernels), against the reference on the permuted tensors.
gpu_test!(attention_backward_packed, |dtype| {
    let gpu = cuda::Gpu::get().unwrap();
    for (i, &s) in PACKED.iter().enumerate() {
        let (b, n, h, d) = s;
        let mut r = rng(700 + i as u64);
        let qkv = rd(&randn(&[b, n, 3, h, d], &mut r), dtype);
        let dout = rd(&randn(&[b, n, h, d], &mut r), dtype);
        let heads = unpack_heads(&qkv, s, 3);
        let (q, k, v) = (&heads[0], &heads[1], &heads[2]);
        let fwd = ops::attention_forward(q, k, v, None).unwrap();
        let (o, lse) = (rd(&fwd.o, dtype), rd(&fwd.lse, DType::F32));
        let go = unpack_heads(&dout, s, 1).remove(0);
        let want = ops::attention_backward(q, k, v, &o, &lse, &go, None).unwrap();
        let dqkv = cuda::attention::backward_packed(
            &gpu.upload(&qkv, dtype).unwrap(),
            &gpu.upload(&merge_heads(&o), dtype).unwrap(),
            &gpu.upload(&lse, DType::F32).unwrap(),
            &gpu.upload(&dout, dtype).unwrap(),
            None,
        )
        .unwrap()
        .download()
        .unwrap();
        assert_eq!(dqkv.shape(), &[b, n, 3, h, d]);
        let got = unpack_heads(&dqkv, s, 3);
        let label = format!("B{b} N{n} H{h} d{d}");
        for (g, (gname, w)) in
            got.iter()
                .zip([("dq", &want.dq), ("dk", &want.dk), ("dv", &want.dv)])
        {
            check(
                &format!("attention bwd packed {gname} [{label}]"),
                dtype,
                g,
                w,
                tol(dtype),
            );
        }
    }
});

// The packed backward's bad inputs are errors naming the tensor (checked before any launch).
gpu_test!(attention_backward_packed_refuses_bad_shapes, |dtype| {
    let gpu = cuda::Gpu::get().unwrap();
    let mut r = rng(17);
    let (b, n, h, d) = (1, 9, 2, 64);
    let up = |shape: &[usize], dt: DType, r: &mut StdRng| gpu.upload(&randn(shape, r), dt).unwrap();
    let qkv = up(&[b, n, 3, h, d], dtype, &mut r);
    let o = up(&[b, n, h, d], dtype, &mut r);
    let lse = up(&[b, h, n], DType::F32, &mut r);
    let bad_o = up(&[b, h, n, d], dtype, &mut r);
    let bad_qkv = up(&[b, n, h, 3, d], dtype, &mut r);
    let bad_d = up(&[b, n, 3, h, 48], dtype, &mut r);
    let e = cuda::attention::backward_packed(&qkv, &bad_o, &lse, &o, None).unwrap_err();
    assert!(e.to_string().contains("`o`"), "{e}");
    let e = cuda::attention::backward_packed(&qkv, &o, &lse, &bad_o, None).unwrap_err();
    assert!(e.to_string().contains("`dout`"), "{e}");
    let e = cuda::attention::backward_packed(&bad_qkv, &o, &lse, &o, None).unwrap_err();
    assert!(e.to_string().contains("`qkv`"), "{e}");
    let e = cuda::attention::backward_packed(&bad_d, &o, &lse, &o, None).unwrap_err();
    assert!(e.to_string().contains("head dim 48"), "{e}");
    let e = cuda::attention::backward_packed(&qkv, &o, &o, &o, None).unwrap_err();
    assert!(e.to_string().contains("`lse`"), "{e}");
});

// Device-level API: outputs poisoned explicitly, written by the `_into` entry point, all finite
// (v and o with head dim 96, q and k 72).
gpu_test!(attention_device_outputs_are_fully_written, |dtype| {
    let gpu = cuda::Gpu::get().unwrap();
    let mut r = rng(11);
    let (qs, ks, vs, os) = (
        [2, 2, 77, 72],
        [2, 2, 150, 72],
        [2, 2, 150, 96],
        [2, 2, 77, 96],
    );
    let (q, k, v) = (randn(&qs, &mut r), randn(&ks, &mut r), randn(&vs, &mut r));
    let (qd, kd, vd) = (
        gpu.upload(&q, dtype).unwrap(),
        gpu.upload(&k, dtype).unwrap(),
        gpu.upload(&v, dtype).unwrap(),
    );
    let o = gpu.alloc(&os, dtype).unwrap();
    let lse = gpu.alloc(&[2, 2, 77], DType::F32).unwrap();
    o.poison().unwrap();
    lse.poison().unwrap();
    let before = o.download().unwrap().to_f64_vec();
    assert!(before.iter().all(|x| x.is_nan()), "poison fills with NaN");
    let c = cuda::attention::resolve_scale(None, 72).unwrap();
    cuda::attention::forward_into(&gpu, &qd, &kd, &vd, &o, &lse, c).unwrap();
    let want =
        ops::attention_forward(&rd(&q, dtype), &rd(&k, dtype), &rd(&v, dtype), None).unwrap();
    check(
        "attention forward_into o",
        dtype,
        &o.download().unwrap(),
        &want.o,
        tol(dtype),
    );
    check(
        "attention forward_into lse",
        dtype,
        &lse.download().unwrap(),
        &want.lse,
        tol(dtype),
    );
});

// ---------------------------------------------------------------------------------------------
// Strided layouts: q, k, v read in place from a packed projection [B, N, 3, H, d], o written
// token-major [B, N, H, d] (the DiT's layout), and a mix of other strides through the plan
// functions. The host scatters the inputs into the strided buffers and gathers the outputs back
// to [B, H, N, d] for the reference.

/// (B, H, N, d) of the packed cases: tails (77, 130, 65, 200), d72 (padded head dim), B·H > 1, a
/// single token.
const PACKED_JVP: &[(usize, usize, usize, usize)] = &[
    (2, 3, 77, 72),
    (1, 2, 130, 64),
    (2, 2, 65, 128),
    (1, 1, 1, 32),
    (2, 1, 200, 96),
];

fn strides(s: cuda::attention::Strides) -> [usize; 3] {
    [s.b, s.h, s.n]
}

/// q, k, v ([B, H, N, d] each) packed into [B, N, 3, H, d].
fn pack_qkv(dims: cuda::attention::AttnDims, ts: [&Tensor; 3]) -> Tensor {
    let lay = cuda::attention::Layout::packed_qkv(dims);
    let mut buf = vec![f64::NAN; dims.b * dims.nq * 3 * dims.h * dims.d];
    for (j, t) in ts.into_iter().enumerate() {
        common::scatter_bhnd(t, &mut buf, j * dims.h * dims.d, strides(lay.q));
    }
    assert!(buf.iter().all(|x| x.is_finite()), "q, k, v cover qkv");
    Tensor::from_f64_vec(buf, &[dims.b, dims.nq, 3, dims.h, dims.d], DType::F64).unwrap()
}

/// A token-major [B, N, H, d] output as [B, H, N, d].
fn unpack_o(dims: cuda::attention::AttnDims, o: &Tensor) -> Tensor {
    assert_eq!(o.shape(), cuda::attention::packed_o_shape(dims));
    let lay = cuda::attention::Layout::packed_qkv(dims);
    common::gather_bhnd(&o.to_f64_vec(), 0, strides(lay.o), dims.o_shape())
}

// The full JVP and the forward on a packed projection (`jvp_packed`, `forward_packed`).
gpu_test!(attention_packed_qkv, |dtype| {
    for (i, &(b, h, n, d)) in PACKED_JVP.iter().enumerate() {
        let mut r = rng(700 + i as u64);
        let shape = [b, h, n, d];
        let (q, k, v) = (
            dual(&mut r, &shape, true),
            dual(&mut r, &shape, true),
            dual(&mut r, &shape, true),
        );
        let dims = cuda::attention::check_shapes(&shape, &shape, &shape).unwrap();
        fn tan(x: &Dual) -> &Tensor {
            x.tangent.as_ref().unwrap()
        }
        let qkv = pack_qkv(dims, [&q.primal, &k.primal, &v.primal]);
        let tqkv = pack_qkv(dims, [tan(&q), tan(&k), tan(&v)]);
        let gpu = cuda::Gpu::get().unwrap();
        let (qkv_d, tqkv_d) = (
            gpu.upload(&qkv, dtype).unwrap(),
            gpu.upload(&tqkv, dtype).unwrap(),
        );
        let got = cuda::attention::jvp_packed(&qkv_d, Some(&tqkv_d), None).unwrap();
        let want =
            ops::attention_jvp(&rdd(&q, dtype), &rdd(&k, dtype), &rdd(&v, dtype), None).unwrap();
        let label = format!("[B{b} H{h} N{n} d{d}]");
        let o = got.o.download().unwrap();
        let to = got.to.as_ref().unwrap().download().unwrap();
        check(
            &format!("attention packed o {label}"),
            dtype,
            &unpack_o(dims, &o),
            &want.o.primal,
            tol(dtype),
        );
        check(
            &format!("attention packed tangent o {label}"),
            dtype,
            &unpack_o(dims, &to),
            want.o.tangent.as_ref().unwrap(),
            tol_tangent(dtype),
        );
        check(
            &format!("attention packed lse {label}"),
            dtype,
            &got.lse.download().unwrap(),
            &want.lse.primal,
            tol(dtype),
        );
        check(
            &format!("attention packed tangent lse {label}"),
            dtype,
            &got.tlse.as_ref().unwrap().download().unwrap(),
            want.lse.tangent.as_ref().unwrap(),
            tol_tangent(dtype),
        );
        let (fo, flse) = cuda::attention::forward_packed(&qkv_d, None).unwrap();
        check(
            &format!("attention packed fwd o {label}"),
            dtype,
            &unpack_o(dims, &fo.download().unwrap()),
            &want.o.primal,
            tol(dtype),
        );
        check(
            &format!("attention packed fwd lse {label}"),
            dtype,
            &flse.download().unwrap(),
            &want.lse.primal,
            tol(dtype),
        );
    }
});

/// (B, H, Nq, Nk, d, dv) of the mixed-stride plan cases: dv ≠ d both ways, d72, tails, and the
/// head dims the Hopper kernels take (64, 72, 96, 128 with dv == d).
const STRIDED: &[(usize, usize, usize, usize, usize, usize)] = &[
    (2, 3, 77, 130, 72, 96),
    (2, 2, 130, 65, 64, 64),
    (1, 2, 65, 200, 128, 128),
    (2, 1, 33, 17, 128, 32),
    (1, 2, 65, 77, 96, 96),
];

/// A layout of every kind at once: q token-major [B, Nq, H, d]; k [B, H, Nk, d] with rows padded
/// to d + 8; v head-outermost [H, B, Nk, dv]; o token-major [B, Nq, H, dv].
fn mixed_layout(dims: cuda::attention::AttnDims) -> cuda::attention::Layout {
    use cuda::attention::Strides;
    let (b, h, nq, nk, d, dv) = (dims.b, dims.h, dims.nq, dims.nk, dims.d, dims.dv);
    cuda::attention::Layout {
        q: Strides::token_major(nq, h, d),
        k: Strides {
            b: h * nk * (d + 8),
            h: nk * (d + 8),
            n: d + 8,
        },
        v: Strides {
            b: nk * dv,
            h: b * nk * dv,
            n: dv,
        },
        o: Strides::token_major(nq, h, dv),
    }
}

/// (B, H, N, d) of the packed key-lens cases and one key count per batch entry: a single key, all
/// keys, counts inside and at the edge of the key tiles, every head dim.
type PackedShape = (usize, usize, usize, usize);
const PACKED_KEY_LENS: &[(PackedShape, &[usize])] = &[
    ((3, 2, 77, 72), &[77, 1, 40]),
    ((2, 2, 130, 64), &[129, 64]),
    ((2, 1, 200, 128), &[33, 200]),
    ((2, 3, 70, 96), &[70, 17]),
    ((2, 1, 90, 32), &[7, 90]),
];

/// A packed qkv [B, N, 3, H, d] with NaN in the k and v parts of the tokens at and past
/// `lens[b]` of batch entry b (the padding keys; their queries stay finite, as they are computed).
fn nan_padded_kv(qkv: &Tensor, lens: &[usize]) -> Tensor {
    let [_, n, _, h, d] = qkv.shape().try_into().unwrap();
    let mut x = qkv.to_f64_vec();
    for (token, chunk) in x.chunks_mut(3 * h * d).enumerate() {
        if token % n >= lens[token / n] {
            chunk[h * d..].fill(f64::NAN);
        }
    }
    Tensor::from_vec(x, qkv.shape()).unwrap()
}

// Padded keys on a packed projection (`{jvp, forward, backward}_packed_with_key_lens`: a sequence
// padded per entry, Wan's `seq_lens`): k and v of the padding tokens NaN in qkv and tqkv, outputs
// poisoned; dqkv's k and v parts must be 0 at the padding tokens (a 2D memset per padded entry).
gpu_test!(attention_packed_key_lens, |dtype| {
    use cuda::attention as attn;
    let gpu = cuda::Gpu::get().unwrap();
    for (i, &((b, h, n, d), lens)) in PACKED_KEY_LENS.iter().enumerate() {
        let mut r = rng(1500 + i as u64);
        let shape = [b, h, n, d];
        let (q, k, v) = (
            dual(&mut r, &shape, true),
            dual(&mut r, &shape, true),
            dual(&mut r, &shape, true),
        );
        let dims = attn::check_shapes(&shape, &shape, &shape).unwrap();
        fn tan(x: &Dual) -> &Tensor {
            x.tangent.as_ref().unwrap()
        }
        let qkv = nan_padded_kv(&pack_qkv(dims, [&q.primal, &k.primal, &v.primal]), lens);
        let tqkv = nan_padded_kv(&pack_qkv(dims, [tan(&q), tan(&k), tan(&v)]), lens);
        let (qkv_d, tqkv_d) = (
            gpu.upload(&qkv, dtype).unwrap(),
            gpu.upload(&tqkv, dtype).unwrap(),
        );
        let (rq, rk, rv) = (rdd(&q, dtype), rdd(&k, dtype), rdd(&v, dtype));
        let want = ops::attention_jvp_with_key_lens(&rq, &rk, &rv, None, lens).unwrap();
        let label = format!("[B{b} H{h} N{n} d{d} lens {lens:?}]");
        let got = attn::jvp_packed_with_key_lens(&qkv_d, Some(&tqkv_d), None, lens).unwrap();
        let to = got.to.as_ref().unwrap().download().unwrap();
        let tlse = got.tlse.as_ref().unwrap().download().unwrap();
        for (what, g, w, tolerance) in [
            (
                "o",
                unpack_o(dims, &got.o.download().unwrap()),
                &want.o.primal,
                tol(dtype),
            ),
            (
                "tangent o",
                unpack_o(dims, &to),
                want.o.tangent.as_ref().unwrap(),
                tol_tangent(dtype),
            ),
            (
                "lse",
                got.lse.download().unwrap(),
                &want.lse.primal,
                tol(dtype),
            ),
            (
                "tangent lse",
                tlse,
                want.lse.tangent.as_ref().unwrap(),
                tol_tangent(dtype),
            ),
        ] {
            let name = format!("attention packed key_lens {what} {label}");
            check(&name, dtype, &g, w, tolerance);
        }
        let (fo, flse) = attn::forward_packed_with_key_lens(&qkv_d, None, lens).unwrap();
        let fo = unpack_o(dims, &fo.download().unwrap());
        check(
            &format!("attention packed key_lens fwd o {label}"),
            dtype,
            &fo,
            &want.o.primal,
            tol(dtype),
        );
        check(
            &format!("attention packed key_lens fwd lse {label}"),
            dtype,
            &flse.download().unwrap(),
            &want.lse.primal,
            tol(dtype),
        );
        // The backward from the reference's o and lse, as the kernels would store them.
        let (rq, rk, rv) = (&rq.primal, &rk.primal, &rv.primal);
        let fwd = ops::attention_forward_with_key_lens(rq, rk, rv, None, lens).unwrap();
        let (o, lse) = (rd(&fwd.o, dtype), rd(&fwd.lse, DType::F32));
        let go = rd(&randn(&shape, &mut r), dtype);
        let want =
            ops::attention_backward_with_key_lens(rq, rk, rv, &o, &lse, &go, None, lens).unwrap();
        let dqkv = attn::backward_packed_with_key_lens(
            &qkv_d,
            &gpu.upload(&merge_heads(&o), dtype).unwrap(),
            &gpu.upload(&lse, DType::F32).unwrap(),
            &gpu.upload(&merge_heads(&go), dtype).unwrap(),
            None,
            lens,
        )
        .unwrap()
        .download()
        .unwrap();
        let got = unpack_heads(&dqkv, (b, n, h, d), 3);
        for (g, (gname, w)) in
            got.iter()
                .zip([("dq", &want.dq), ("dk", &want.dk), ("dv", &want.dv)])
        {
            // check() also finds a padding row of dk or dv left poisoned by a missing memset.
            check(
                &format!("attention packed key_lens bwd {gname} {label}"),
                dtype,
                g,
                w,
                tol(dtype),
            );
        }
    }
});

// Padded keys on strided memory through the plan functions: flash-attn's [B, N, H, d] (token-major
// q, k, v, o), k and v packed in one [B, Nk, 2, H, ·] projection, and `mixed_layout` (k's rows
// padded, v head-outermost). The JVP's three variants and the backward, the padding rows of k, v
// and their tangents NaN, every output and gradient poisoned first: the backward's fills (a plain
// fill or a 2D memset per padded entry, or per entry and head) must zero dk's and dv's padding rows
// and nothing the kernels write.
gpu_test!(attention_key_lens_strided_plans, |dtype| {
    use cuda::attention::{self as attn, BwdPtrs, JvpPtrs, Strides, Variant};
    let gpu = cuda::Gpu::get().unwrap();
    for (i, &(s, lens)) in KEY_LENS.iter().enumerate() {
        let [qs, ks, vs] = attn_shape(s);
        let dims = attn::check_shapes(&qs, &ks, &vs).unwrap();
        let (h, nq, nk, d, dv) = (dims.h, dims.nq, dims.nk, dims.d, dims.dv);
        let token_major = attn::Layout {
            q: Strides::token_major(nq, h, d),
            k: Strides::token_major(nk, h, d),
            v: Strides::token_major(nk, h, dv),
            o: Strides::token_major(nq, h, dv),
        };
        let kv_row = h * (d + dv);
        let packed_kv = attn::Layout {
            k: Strides {
                b: nk * kv_row,
                h: d,
                n: kv_row,
            },
            v: Strides {
                b: nk * kv_row,
                h: dv,
                n: kv_row,
            },
            ..token_major
        };
        for (lname, lay) in [
            ("token-major", token_major),
            ("packed kv", packed_kv),
            ("mixed", mixed_layout(dims)),
        ] {
            let put = |t: &Tensor, st: Strides| {
                let sh = t.shape();
                let mut buf = vec![0.0; st.span(sh[0], sh[1], sh[2], sh[3]).unwrap()];
                common::scatter_bhnd(t, &mut buf, 0, strides(st));
                let len = buf.len();
                gpu.upload(
                    &Tensor::from_f64_vec(buf, &[len], DType::F64).unwrap(),
                    dtype,
                )
                .unwrap()
            };
            let take = |t: &cuda::DeviceTensor, st: Strides, shape: [usize; 4]| {
                common::gather_bhnd(&t.download().unwrap().to_f64_vec(), 0, strides(st), shape)
            };
            let mut r = rng(1400 + i as u64);
            let q = dual(&mut r, &qs, true);
            let pad = |d: Dual| Dual {
                primal: nan_padded(&d.primal, lens),
                tangent: d.tangent.map(|t| nan_padded(&t, lens)),
            };
            let (k, v) = (pad(dual(&mut r, &ks, true)), pad(dual(&mut r, &vs, true)));
            let tan = |x: &Dual| x.tangent.clone().unwrap();
            let (qd, kd, vd) = (
                put(&q.primal, lay.q),
                put(&k.primal, lay.k),
                put(&v.primal, lay.v),
            );
            let (tqd, tkd, tvd) = (
                put(&tan(&q), lay.q),
                put(&tan(&k), lay.k),
                put(&tan(&v), lay.v),
            );
            let o_len = lay.o.span(dims.b, h, nq, dv).unwrap();
            let scale = attn::resolve_scale(None, d).unwrap();
            let n = format!("{} lens {lens:?}, {lname}", name(s));
            let (rq, rk, rv) = (rdd(&q, dtype), rdd(&k, dtype), rdd(&v, dtype));
            for variant in [Variant::Jvp, Variant::JvpNoKv, Variant::Fwd] {
                let o = gpu.poisoned(&[o_len], dtype).unwrap();
                let to = gpu.poisoned(&[o_len], dtype).unwrap();
                let lse = gpu.poisoned(&dims.lse_shape(), DType::F32).unwrap();
                let tlse = gpu.poisoned(&dims.lse_shape(), DType::F32).unwrap();
                let p = JvpPtrs {
                    q: qd.ptr(),
                    k: kd.ptr(),
                    v: vd.ptr(),
                    tq: tqd.ptr(),
                    tk: tkd.ptr(),
                    tv: tvd.ptr(),
                    o: o.ptr(),
                    to: to.ptr(),
                    lse: lse.ptr(),
                    tlse: tlse.ptr(),
                };
                let plan =
                    attn::plan_for_key_lens(gpu.arch(), variant, dtype, dims, lay, p, scale, lens)
                        .unwrap();
                gpu.run(&plan).unwrap();
                let (kk, vv) = match variant {
                    Variant::Jvp => (rk.clone(), rv.clone()),
                    _ => (
                        Dual::constant(rk.primal.clone()),
                        Dual::constant(rv.primal.clone()),
                    ),
                };
                let want = ops::attention_jvp_with_key_lens(&rq, &kk, &vv, None, lens).unwrap();
                let label = format!("{variant:?} [{n}]");
                let o_shape = dims.o_shape();
                check(
                    &format!("attention key_lens strided o {label}"),
                    dtype,
                    &take(&o, lay.o, o_shape),
                    &want.o.primal,
                    tol(dtype),
                );
                check(
                    &format!("attention key_lens strided lse {label}"),
                    dtype,
                    &lse.download().unwrap(),
                    &want.lse.primal,
                    tol(dtype),
                );
                if variant != Variant::Fwd {
                    check(
                        &format!("attention key_lens strided tangent o {label}"),
                        dtype,
                        &take(&to, lay.o, o_shape),
                        want.o.tangent.as_ref().unwrap(),
                        tol_tangent(dtype),
                    );
                }
            }
            // The backward from the reference's o and lse, as the kernels would store them.
            let want = ops::attention_forward_with_key_lens(
                &rq.primal, &rk.primal, &rv.primal, None, lens,
            )
            .unwrap();
            let (o, lse) = (rd(&want.o, dtype), rd(&want.lse, DType::F32));
            let go = rd(&randn(&[s.0, s.1, s.2, s.5], &mut r), dtype);
            let (od, god) = (put(&o, lay.o), put(&go, lay.o));
            let lsed = gpu.upload(&lse, DType::F32).unwrap();
            let delta = gpu.poisoned(&dims.lse_shape(), DType::F32).unwrap();
            let q_len = lay.q.span(dims.b, h, nq, d).unwrap();
            let (k_len, v_len) = (
                lay.k.span(dims.b, h, nk, d).unwrap(),
                lay.v.span(dims.b, h, nk, dv).unwrap(),
            );
            let dq = gpu.poisoned(&[q_len], dtype).unwrap();
            let dk = gpu.poisoned(&[k_len], dtype).unwrap();
            let dvd = gpu.poisoned(&[v_len], dtype).unwrap();
            let p = BwdPtrs {
                q: qd.ptr(),
                k: kd.ptr(),
                v: vd.ptr(),
                o: od.ptr(),
                lse: lsed.ptr(),
                dout: god.ptr(),
                delta: delta.ptr(),
                dq: dq.ptr(),
                dk: dk.ptr(),
                dv: dvd.ptr(),
            };
            let plan =
                attn::plan_backward_for_key_lens(gpu.arch(), dtype, dims, lay, p, scale, lens)
                    .unwrap();
            gpu.run(&plan).unwrap();
            let (rq, rk, rv) = (&rq.primal, &rk.primal, &rv.primal);
            let want = ops::attention_backward_with_key_lens(rq, rk, rv, &o, &lse, &go, None, lens)
                .unwrap();
            for (gname, got, st, shape, w) in [
                ("dq", &dq, lay.q, dims.q_shape(), &want.dq),
                ("dk", &dk, lay.k, dims.k_shape(), &want.dk),
                ("dv", &dvd, lay.v, dims.v_shape(), &want.dv),
            ] {
                // check() also finds any padding row left poisoned (NaN) by a missing fill.
                check(
                    &format!("attention key_lens strided bwd {gname} [{n}]"),
                    dtype,
                    &take(got, st, shape),
                    w,
                    tol(dtype),
                );
            }
        }
    }
});

// All three variants (the nokv one included) through the plan functions with `mixed_layout`:
// every operand strided differently, tangents in their primal's layout, outputs poisoned.
gpu_test!(attention_strided_plans, |dtype| {
    use cuda::attention::{self as attn, JvpPtrs, Variant};
    let gpu = cuda::Gpu::get().unwrap();
    for (i, &s) in STRIDED.iter().enumerate() {
        let [qs, ks, vs] = attn_shape(s);
        let dims = attn::check_shapes(&qs, &ks, &vs).unwrap();
        let lay = mixed_layout(dims);
        lay.check(dtype, dims).unwrap();
        // One strided buffer per operand; elements the layout skips hold NaN (never read).
        let put = |t: &Tensor, st: attn::Strides, shape: [usize; 4]| {
            let len = st.span(shape[0], shape[1], shape[2], shape[3]).unwrap();
            let mut buf = vec![f64::NAN; len];
            common::scatter_bhnd(t, &mut buf, 0, strides(st));
            let nan = Tensor::from_f64_vec(buf, &[len], DType::F64).unwrap();
            gpu.upload(&nan, dtype).unwrap()
        };
        let take = |t: &cuda::DeviceTensor, st: attn::Strides, shape: [usize; 4]| {
            common::gather_bhnd(&t.download().unwrap().to_f64_vec(), 0, strides(st), shape)
        };
        let o_len = lay.o.span(dims.b, dims.h, dims.nq, dims.dv).unwrap();
        for (variant, kv_tangent) in [
            (Variant::JvpNoKv, false),
            (Variant::Jvp, true),
            (Variant::Fwd, false),
        ] {
            let mut r = rng(800 + i as u64);
            let q = dual(&mut r, &qs, variant != Variant::Fwd);
            let k = dual(&mut r, &ks, kv_tangent);
            let v = dual(&mut r, &vs, kv_tangent);
            let zero = |x: &Dual| {
                x.tangent
                    .clone()
                    .unwrap_or_else(|| Tensor::zeros(x.primal.shape(), DType::F64))
            };
            let sh = |t: &[usize]| [t[0], t[1], t[2], t[3]];
            let (qd, kd, vd) = (
                put(&q.primal, lay.q, qs),
                put(&k.primal, lay.k, ks),
                put(&v.primal, lay.v, vs),
            );
            let (tqd, tkd, tvd) = (
                put(&zero(&q), lay.q, qs),
                put(&zero(&k), lay.k, ks),
                put(&zero(&v), lay.v, vs),
            );
            let o = gpu.poisoned(&[o_len], dtype).unwrap();
            let to = gpu.poisoned(&[o_len], dtype).unwrap();
            let lse = gpu.poisoned(&dims.lse_shape(), DType::F32).unwrap();
            let tlse = gpu.poisoned(&dims.lse_shape(), DType::F32).unwrap();
            let p = JvpPtrs {
                q: qd.ptr(),
                k: kd.ptr(),
                v: vd.ptr(),
                tq: tqd.ptr(),
                tk: tkd.ptr(),
                tv: tvd.ptr(),
                o: o.ptr(),
                to: to.ptr(),
                lse: lse.ptr(),
                tlse: tlse.ptr(),
            };
            let scale = attn::resolve_scale(None, dims.d).unwrap();
            let plan =
                cuda::attention_sm90::plan_for(gpu.arch(), variant, dtype, dims, lay, p, scale)
                    .unwrap();
            gpu.run(&plan).unwrap();
            let want = ops::attention_jvp(&rdd(&q, dtype), &rdd(&k, dtype), &rdd(&v, dtype), None)
                .unwrap();
            let path = cuda::attention_sm90::path_for(gpu.arch(), dtype, dims).name();
            let label = format!("{variant:?} {path} [{}]", name(s));
            check(
                &format!("attention strided o {label}"),
                dtype,
                &take(&o, lay.o, sh(&dims.o_shape())),
                &want.o.primal,
                tol(dtype),
            );
            check(
                &format!("attention strided lse {label}"),
                dtype,
                &lse.download().unwrap(),
                &want.lse.primal,
                tol(dtype),
            );
            if variant != Variant::Fwd {
                check(
                    &format!("attention strided tangent o {label}"),
                    dtype,
                    &take(&to, lay.o, sh(&dims.o_shape())),
                    want.o.tangent.as_ref().unwrap(),
                    tol_tangent(dtype),
                );
                check(
                    &format!("attention strided tangent lse {label}"),
                    dtype,
                    &tlse.download().unwrap(),
                    want.lse.tangent.as_ref().unwrap(),
                    tol_tangent(dtype),
                );
            }
        }
    }
});

// Bad packed inputs are errors naming `qkv` and the shapes.
#[test]
fn packed_qkv_errors_name_the_tensor() {
    let Some(gpu) = require_gpu_or_skip() else {
        return;
    };
    let mut r = rng(12);
    let bad = gpu
        .upload(&randn(&[2, 5, 4, 1, 64], &mut r), DType::BF16)
        .unwrap();
    let e = cuda::attention::forward_packed(&bad, None).unwrap_err();
    assert!(
        e.to_string().contains("`qkv`") && e.to_string().contains("[2, 5, 4, 1, 64]"),
        "{e}"
    );
    let q4 = gpu
        .upload(&randn(&[2, 5, 3, 64], &mut r), DType::BF16)
        .unwrap();
    let e = cuda::attention::forward_packed(&q4, None).unwrap_err();
    assert!(e.to_string().contains("`qkv`"), "{e}");
    let qkv = gpu
        .upload(&randn(&[1, 5, 3, 2, 48], &mut r), DType::BF16)
        .unwrap();
    let e = cuda::attention::forward_packed(&qkv, None).unwrap_err();
    assert!(
        e.to_string().contains("`qkv`") && e.to_string().contains("48"),
        "{e}"
    );
    let qkv = gpu
        .upload(&randn(&[1, 5, 3, 2, 64], &mut r), DType::BF16)
        .unwrap();
    let t = gpu
        .upload(&randn(&[1, 5, 3, 2, 64], &mut r), DType::F16)
        .unwrap();
    let Err(e) = cuda::attention::jvp_packed(&qkv, Some(&t), None) else {
        panic!("a tangent of another dtype is an error");
    };
    assert!(e.to_string().contains("qkv"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// LayerNorm with modulation.

/// (T, C, G of scale, G of shift); G = 0 means the plain [C]. Vector and scalar paths (C a
/// multiple of 8 or not), G = 1, B and T, and scale and shift with different G.
const LN: &[(usize, usize, usize, usize)] = &[
    (64, 256, 0, 0),
    (77, 300, 77, 77),
    (78, 300, 3, 3),
    (33, 1000, 1, 1),
    (16, 1152, 16, 0),
    (12, 72, 3, 4),
    (5, 7, 0, 5),
    // The register-resident limits of layernorm_mod.cu (C <= 1536 for the 16-bit JVP's narrow kernel,
    // 2048 for its wide one, 3072 for the forward and backward; half in f32): at the narrow limit, on
    // the wide kernel, and past every limit (the streaming path with vector access).
    (4, 1536, 2, 2),
    (3, 2048, 1, 0),
    (9, 2560, 3, 3),
    (6, 3200, 2, 0),
];

fn mod_shape(g: usize, c: usize) -> Vec<usize> {
    if g == 0 {
        vec![c]
    } else {
        vec![g, c]
    }
}

const EPS: f64 = 1e-6;

fn ln_name(s: (usize, usize, usize, usize)) -> String {
    format!("T{} C{} Gs{} Gh{}", s.0, s.1, s.2, s.3)
}

gpu_test!(layernorm_forward, |dtype| {
    for (i, &s) in LN.iter().enumerate() {
        let mut r = rng(400 + i as u64);
        let x = randn(&[s.0, s.1], &mut r);
        let sc = rd(&randn(&mod_shape(s.2, s.1), &mut r), DType::F32);
        let sh = rd(&randn(&mod_shape(s.3, s.1), &mut r), DType::F32);
        let got = gops::layernorm_mod_forward(&x, &sc, &sh, EPS, dtype).unwrap();
        let want = ops::layernorm_mod_forward(&rd(&x, dtype), &sc, &sh, EPS).unwrap();
        check(
            &format!("layernorm fwd y [{}]", ln_name(s)),
            dtype,
            &got,
            &want,
            tol(dtype),
        );
    }
});

gpu_test!(layernorm_jvp, |dtype| {
    for (i, &s) in LN.iter().enumerate() {
        // All tangents, then only x, then only the modulation.
        for (j, which) in [
            (true, true, true),
            (true, false, false),
            (false, true, true),
        ]
        .into_iter()
        .enumerate()
        {
            let mut r = rng(500 + 10 * i as u64 + j as u64);
            let x = dual(&mut r, &[s.0, s.1], which.0);
            let f32d = |d: Dual| rdd(&d, DType::F32);
            let sc = f32d(dual(&mut r, &mod_shape(s.2, s.1), which.1));
            let sh = f32d(dual(&mut r, &mod_shape(s.3, s.1), which.2));
            let got = gops::layernorm_mod_jvp(&x, &sc, &sh, EPS, dtype).unwrap();
            let want = ops::layernorm_mod_jvp(&rdd(&x, dtype), &sc, &sh, EPS).unwrap();
            let n = format!("{} tangents {which:?}", ln_name(s));
            check(
                &format!("layernorm jvp y [{n}]"),
                dtype,
                &got.primal,
                &want.primal,
                tol(dtype),
            );
            check(
                &format!("layernorm jvp ty [{n}]"),
                dtype,
                got.tangent.as_ref().expect("a tangent"),
                want.tangent.as_ref().unwrap(),
                tol(dtype),
            );
        }
    }
});

// The backward accumulating into the residual stream's cotangent in place (dres = dx, as the DiT
// block's backward runs it): dx = r + the layernorm's input cotangent.
gpu_test!(layernorm_backward_accumulates_in_place, |dtype| {
    use flashjvp::cuda::layernorm::{self as lnk, BwdPtrs, LnDims};
    let gpu = cuda::Gpu::get().unwrap();
    for (i, &(t, c, g)) in [(8, 256, 2), (9, 300, 3), (6, 3200, 2)].iter().enumerate() {
        let mut r = rng(490 + i as u64);
        let x = rd(&randn(&[t, c], &mut r), dtype);
        let sc = rd(&randn(&[g, c], &mut r), DType::F32);
        let sh = rd(&randn(&[g, c], &mut r), DType::F32);
        let gy = rd(&randn(&[t, c], &mut r), dtype);
        let res = rd(&randn(&[t, c], &mut r), dtype);
        let want = ops::layernorm_mod_backward(&x, &sc, &sh, EPS, &gy).unwrap();
        let want_dx = Tensor::from_vec(
            want.dx
                .to_f64_vec()
                .iter()
                .zip(res.to_f64_vec())
                .map(|(a, b)| a + b)
                .collect(),
            &[t, c],
        )
        .unwrap();
        let (xd, gyd, dxd) = (
            gpu.upload(&x, dtype).unwrap(),
            gpu.upload(&gy, dtype).unwrap(),
            gpu.upload(&res, dtype).unwrap(),
        );
        let scd = gpu.upload(&sc, DType::F32).unwrap();
        let (mean, rstd) = (
            gpu.alloc_out(&[t], DType::F32).unwrap(),
            gpu.alloc_out(&[t], DType::F32).unwrap(),
        );
        let d = LnDims { t, c, g };
        // mean and rstd from the forward, then the backward into dx = res in place.
        let y = gpu.alloc_out(&[t, c], dtype).unwrap();
        let mut steps = lnk::plan_forward(
            dtype,
            d,
            xd.ptr(),
            scd.ptr(),
            0,
            y.ptr(),
            mean.ptr(),
            rstd.ptr(),
            EPS,
        )
        .unwrap();
        steps.extend(
            lnk::plan_backward(
                dtype,
                d,
                BwdPtrs {
                    dy: gyd.ptr(),
                    x: xd.ptr(),
                    scale: scd.ptr(),
                    mean: mean.ptr(),
                    rstd: rstd.ptr(),
                    dres: dxd.ptr(),
                    dx: dxd.ptr(),
                    dscale: 0,
                    dshift: 0,
                },
            )
            .unwrap(),
        );
        gpu.run(&steps).unwrap();
        check(
            &format!("layernorm bwd dx += [T{t} C{c} G{g}]"),
            dtype,
            &dxd.download().unwrap(),
            &want_dx,
            tol(dtype),
        );
    }
});

// The gated residual fused in front of the layernorm (residual_layernorm_mod_*, the DiT block's
// x1 = x + gate1 ⊙ attn followed by its second layernorm): x1 and the normalised output, with
// tangents, against the CPU ops composed (x1 rounded to the dtype before it is normalised, as the
// kernels store and normalise it). Rows in registers (C256, C1152; C2000 in 16 bits on the wide
// kernel), element-wise (C300, C7) and streamed (C3200: past the register limits; C2000 in f32).
gpu_test!(residual_layernorm_fused, |dtype| {
    use flashjvp::cuda::layernorm::{self as lnk, JvpPtrs, LnDims, ResPtrs};
    let gpu = cuda::Gpu::get().unwrap();
    for (i, &(t, c, g)) in [
        (8, 256, 2),
        (9, 300, 3),
        (16, 1152, 4),
        (4, 2000, 2),
        (6, 3200, 2),
        (5, 7, 5),
    ]
    .iter()
    .enumerate()
    {
        let mut r = rng(470 + i as u64);
        let f32d = |d: Dual| rdd(&d, DType::F32);
        let x = rdd(&dual(&mut r, &[t, c], true), dtype);
        let y = rdd(&dual(&mut r, &[t, c], true), dtype);
        let gate = f32d(dual(&mut r, &[g, c], true));
        let sc = f32d(dual(&mut r, &[g, c], true));
        let sh = f32d(dual(&mut r, &[g, c], true));
        let x1 = rdd(&ops::gated_residual_jvp(&x, &gate, &y).unwrap(), dtype);
        let want = ops::layernorm_mod_jvp(&x1, &sc, &sh, EPS).unwrap();

        let up = |t: &Tensor, dt: DType| gpu.upload(t, dt).unwrap();
        let tang = |d: &Dual| d.tangent.clone().unwrap();
        let (xd, txd, yd, tyd) = (
            up(&x.primal, dtype),
            up(&tang(&x), dtype),
            up(&y.primal, dtype),
            up(&tang(&y), dtype),
        );
        let f = DType::F32;
        let (gd, tgd, sd, tsd, hd, thd) = (
            up(&gate.primal, f),
            up(&tang(&gate), f),
            up(&sc.primal, f),
            up(&tang(&sc), f),
            up(&sh.primal, f),
            up(&tang(&sh), f),
        );
        let out = || gpu.alloc_out(&[t, c], dtype).unwrap();
        let (x1d, tx1d, od, tod) = (out(), out(), out(), out());
        let d = LnDims { t, c, g };
        let res = ResPtrs {
            y: yd.ptr(),
            ty: tyd.ptr(),
            gate: gd.ptr(),
            tgate: tgd.ptr(),
            x1: x1d.ptr(),
            tx1: tx1d.ptr(),
        };
        let p = JvpPtrs {
            x: xd.ptr(),
            tx: txd.ptr(),
            scale: sd.ptr(),
            shift: hd.ptr(),
            tscale: tsd.ptr(),
            tshift: thd.ptr(),
            y: od.ptr(),
            ty: tod.ptr(),
            mean: 0,
            rstd: 0,
        };
        gpu.run(&lnk::plan_residual_jvp(dtype, d, p, res, EPS).unwrap())
            .unwrap();
        let n = format!("T{t} C{c} G{g}");
        let dl = |t: &cuda::DeviceTensor| t.download().unwrap();
        check(
            &format!("residual+layernorm jvp x1 [{n}]"),
            dtype,
            &dl(&x1d),
            &x1.primal,
            tol(dtype),
        );
        check(
            &format!("residual+layernorm jvp tx1 [{n}]"),
            dtype,
            &dl(&tx1d),
            &tang(&x1),
            tol(dtype),
        );
        check(
            &format!("residual+layernorm jvp y [{n}]"),
            dtype,
            &dl(&od),
            &want.primal,
            tol(dtype),
        );
        check(
            &format!("residual+layernorm jvp ty [{n}]"),
            dtype,
            &dl(&tod),
            &tang(&want),
            tol(dtype),
        );

        // The forward alone (fresh outputs), and its mean and rstd.
        let (x1d, od) = (out(), out());
        let (mean, rstd) = (
            gpu.alloc_out(&[t], f).unwrap(),
            gpu.alloc_out(&[t], f).unwrap(),
        );
        let res = ResPtrs {
            x1: x1d.ptr(),
            ty: 0,
            tgate: 0,
            tx1: 0,
            ..res
        };
        let steps = lnk::plan_residual_forward(
            dtype,
            d,
            xd.ptr(),
            res,
            sd.ptr(),
            hd.ptr(),
            od.ptr(),
            mean.ptr(),
            rstd.ptr(),
            EPS,
        )
        .unwrap();
        gpu.run(&steps).unwrap();
        check(
            &format!("residual+layernorm fwd x1 [{n}]"),
            dtype,
            &dl(&x1d),
            &x1.primal,
            tol(dtype),
        );
        check(
            &format!("residual+layernorm fwd y [{n}]"),
            dtype,
            &dl(&od),
            &want.primal,
            tol(dtype),
        );
        let xs = x1.primal.to_f64_vec();
        let (m, rs) = (dl(&mean).to_f64_vec(), dl(&rstd).to_f64_vec());
        for row in 0..t {
            let v = &xs[row * c..(row + 1) * c];
            let mu = v.iter().sum::<f64>() / c as f64;
            let var = v.iter().map(|a| (a - mu) * (a - mu)).sum::<f64>() / c as f64;
            assert!(
                (m[row] - mu).abs() <= 1e-5 * (1.0 + mu.abs()),
                "mean row {row} [{n}]"
            );
            let want_rs = 1.0 / (var + EPS).sqrt();
            assert!(
                (rs[row] - want_rs).abs() <= 1e-5 * want_rs,
                "rstd row {row} [{n}]"
            );
        }
    }
});

gpu_test!(layernorm_backward, |dtype| {
    for (i, &s) in LN.iter().enumerate() {
        let mut r = rng(600 + i as u64);
        let x = rd(&randn(&[s.0, s.1], &mut r), dtype);
        let gy = rd(&randn(&[s.0, s.1], &mut r), dtype);
        let sc = rd(&randn(&mod_shape(s.2, s.1), &mut r), DType::F32);
        let sh = rd(&randn(&mod_shape(s.3, s.1), &mut r), DType::F32);
        let got = gops::layernorm_mod_backward(&x, &sc, &sh, EPS, &gy, dtype).unwrap();
        let want = ops::layernorm_mod_backward(&x, &sc, &sh, EPS, &gy).unwrap();
        let n = ln_name(s);
        check(
            &format!("layernorm bwd dx [{n}]"),
            dtype,
            &got.dx,
            &want.dx,
            tol(dtype),
        );
        check(
            &format!("layernorm bwd dscale [{n}]"),
            dtype,
            &got.dscale,
            &want.dscale,
            tol(dtype),
        );
        check(
            &format!("layernorm bwd dshift [{n}]"),
            dtype,
            &got.dshift,
            &want.dshift,
            tol(dtype),
        );
    }
});

// ---------------------------------------------------------------------------------------------
// RMSNorm (q/k norm) and rotary embeddings.

/// (T, C) of the RMSNorm cases: the vector path (C a multiple of 8), the scalar path with a tail,
/// a tiny row, a per-head norm (C = d = 128) and Wan 14B's full-width q/k norm (C = 5120).
const RMS: &[(usize, usize)] = &[(64, 256), (77, 300), (5, 7), (130, 128), (3, 5120)];

gpu_test!(rms_norm, |dtype| {
    for (i, &(t, c)) in RMS.iter().enumerate() {
        let n = format!("T{t} C{c}");
        let mut r = rng(1600 + i as u64);
        // Weights around 1, as trained ones are.
        let w0 = randn(&[c], &mut r).to_f64_vec();
        let w = Tensor::from_vec(w0.iter().map(|v| 1.0 + 0.3 * v).collect(), &[c]).unwrap();
        let x = randn(&[t, c], &mut r);
        let got = gops::rms_norm_forward(&x, &w, EPS, dtype).unwrap();
        let want = ops::rms_norm_forward(&rd(&x, dtype), &rd(&w, dtype), EPS).unwrap();
        check(
            &format!("rms_norm fwd [{n}]"),
            dtype,
            &got,
            &want,
            tol(dtype),
        );
        // All tangents, then x's only, then the weight's only.
        for which in [(true, true), (true, false), (false, true)] {
            let x = rdd(&dual(&mut r, &[t, c], which.0), dtype);
            let tw = which.1.then(|| rd(&randn(&[c], &mut r), dtype));
            let wd = Dual {
                primal: rd(&w, dtype),
                tangent: tw,
            };
            let got = gops::rms_norm_jvp(&x, &wd, EPS, dtype).unwrap();
            let want = ops::rms_norm_jvp(&x, &wd, EPS).unwrap();
            let what = format!("rms_norm jvp [{n} tangents {which:?}]");
            check(
                &format!("{what} y"),
                dtype,
                &got.primal,
                &want.primal,
                tol(dtype),
            );
            let (g, w) = (
                got.tangent.as_ref().unwrap(),
                want.tangent.as_ref().unwrap(),
            );
            check(&format!("{what} ty"), dtype, g, w, tol(dtype));
        }
        let x = rd(&randn(&[t, c], &mut r), dtype);
        let gy = rd(&randn(&[t, c], &mut r), dtype);
        let got = gops::rms_norm_backward(&x, &rd(&w, dtype), EPS, &gy, dtype).unwrap();
        let want = ops::rms_norm_backward(&x, &rd(&w, dtype), EPS, &gy).unwrap();
        check(
            &format!("rms_norm bwd dx [{n}]"),
            dtype,
            &got.dx,
            &want.dx,
            tol(dtype),
        );
        check(
            &format!("rms_norm bwd dweight [{n}]"),
            dtype,
            &got.dweight,
            &want.dweight,
            tol(dtype),
        );
    }
});

// Bad inputs of the RMSNorm and rope entry points are errors naming the tensor, before any launch.
gpu_test!(rms_norm_and_rope_refuse_bad_inputs, |dtype| {
    use flashjvp::cuda::{rmsnorm, rope};
    use flashjvp::ops::RopePairs;
    let gpu = cuda::Gpu::get().unwrap();
    let mut r = rng(1800);
    let (x, w) = (randn(&[4, 8], &mut r), randn(&[8], &mut r));
    let e = gops::rms_norm_forward(&x, &randn(&[7], &mut r), EPS, dtype).unwrap_err();
    assert!(e.to_string().contains("`weight`"), "{e}");
    let e = gops::rms_norm_forward(&randn(&[32], &mut r), &w, EPS, dtype).unwrap_err();
    assert!(e.to_string().contains("`x`"), "{e}");
    let (xd, wd) = (
        gpu.upload(&x, dtype).unwrap(),
        gpu.upload(&w, dtype).unwrap(),
    );
    let e = rmsnorm::jvp(&xd, None, &wd, None, EPS).unwrap_err();
    assert!(e.to_string().contains("tangent"), "{e}");
    let bad = gpu.upload(&randn(&[8, 4], &mut r), dtype).unwrap();
    let e = rmsnorm::jvp(&xd, Some(&bad), &wd, None, EPS).unwrap_err();
    assert!(matches!(e, Error::TangentMismatch { .. }), "{e}");
    let e = rmsnorm::backward(&xd, &wd, EPS, &bad).unwrap_err();
    assert!(e.to_string().contains("`dy`"), "{e}");
    let heads = randn(&[2, 3, 2, 8], &mut r);
    let table = randn(&[3, 4], &mut r);
    let p = RopePairs::Interleaved;
    let e = gops::rope_forward(&heads, &randn(&[3, 3], &mut r), &table, p, dtype).unwrap_err();
    assert!(e.to_string().contains("`cos`"), "{e}");
    let e = gops::rope_forward(&randn(&[2, 3, 2, 7], &mut r), &table, &table, p, dtype);
    assert!(e.unwrap_err().to_string().contains("`x`"));
    let (hd, td) = (
        gpu.upload(&heads, dtype).unwrap(),
        gpu.upload(&table, DType::F32).unwrap(),
    );
    let e = rope::jvp(&hd, &bad, &td, &td, p).unwrap_err();
    assert!(matches!(e, Error::TangentMismatch { .. }), "{e}");
});

/// x [B, N, H, d] of the rope cases: d 64 and 128 (the attention head dims), 72 (Wan's is 128; 72
/// has pairs past a 16-byte chunk), a single pair per head, B > 1.
const ROPE: &[[usize; 4]] = &[
    [2, 77, 3, 64],
    [1, 5, 2, 72],
    [2, 9, 1, 2],
    [1, 130, 4, 128],
];

gpu_test!(rope, |dtype| {
    use flashjvp::ops::RopePairs;
    for (i, &s) in ROPE.iter().enumerate() {
        for per_batch in [false, true] {
            let mut r = rng(1700 + 2 * i as u64 + per_batch as u64);
            let [b, n, _, d] = s;
            let table = if per_batch {
                vec![b, n, d / 2]
            } else {
                vec![n, d / 2]
            };
            let theta = randn(&table, &mut r).to_f64_vec();
            let trig = |f: fn(f64) -> f64| {
                let v = theta.iter().map(|&t| f(3.0 * t)).collect();
                rd(&Tensor::from_vec(v, &table).unwrap(), DType::F32)
            };
            let (cos, sin) = (trig(f64::cos), trig(f64::sin));
            let x = rdd(&dual(&mut r, &s, true), dtype);
            let gy = rd(&randn(&s, &mut r), dtype);
            for pairs in [RopePairs::Interleaved, RopePairs::Halves] {
                let what = format!("rope {s:?} per_batch {per_batch} {pairs:?}");
                let got = gops::rope_jvp(&x, &cos, &sin, pairs, dtype).unwrap();
                let want = ops::rope_jvp(&x, &cos, &sin, pairs).unwrap();
                check(
                    &format!("{what} y"),
                    dtype,
                    &got.primal,
                    &want.primal,
                    tol(dtype),
                );
                let (g, w) = (
                    got.tangent.as_ref().unwrap(),
                    want.tangent.as_ref().unwrap(),
                );
                check(&format!("{what} ty"), dtype, g, w, tol(dtype));
                let got = gops::rope_forward(&x.primal, &cos, &sin, pairs, dtype).unwrap();
                check(
                    &format!("{what} fwd"),
                    dtype,
                    &got,
                    &want.primal,
                    tol(dtype),
                );
                let got = gops::rope_backward(&gy, &cos, &sin, pairs, dtype).unwrap();
                let want = ops::rope_backward(&gy, &cos, &sin, pairs).unwrap();
                check(&format!("{what} bwd"), dtype, &got, &want, tol(dtype));
            }
        }
    }
});

// ---------------------------------------------------------------------------------------------
// Activations, gated residual, timestep embedding.

const EW_SHAPES: &[&[usize]] = &[&[77, 33], &[4096], &[3, 5, 7]];

gpu_test!(activations, |dtype| {
    type Fwd = fn(&Tensor) -> flashjvp::Result<Tensor>;
    type GFwd = fn(&Tensor, DType) -> flashjvp::Result<Tensor>;
    type Jvp = fn(&Dual) -> flashjvp::Result<Dual>;
    type GJvp = fn(&Dual, DType) -> flashjvp::Result<Dual>;
    type Bwd = fn(&Tensor, &Tensor) -> flashjvp::Result<Tensor>;
    type GBwd = fn(&Tensor, &Tensor, DType) -> flashjvp::Result<Tensor>;
    let acts: [(&str, Fwd, GFwd, Jvp, GJvp, Bwd, GBwd); 2] = [
        (
            "gelu",
            ops::gelu_forward,
            gops::gelu_forward,
            ops::gelu_jvp,
            gops::gelu_jvp,
            ops::gelu_backward,
            gops::gelu_backward,
        ),
        (
            "silu",
            ops::silu_forward,
            gops::silu_forward,
            ops::silu_jvp,
            gops::silu_jvp,
            ops::silu_backward,
            gops::silu_backward,
        ),
    ];
    for (a, (act, f, gf, j, gj, b, gb)) in acts.into_iter().enumerate() {
        for (i, shape) in EW_SHAPES.iter().enumerate() {
            let mut r = rng(700 + 10 * a as u64 + i as u64);
            let x = dual(&mut r, shape, true);
            let gy = randn(shape, &mut r);
            let n = format!("{shape:?}");
            let xr = rdd(&x, dtype);
            check(
                &format!("{act} fwd [{n}]"),
                dtype,
                &gf(&x.primal, dtype).unwrap(),
                &f(&xr.primal).unwrap(),
                tol(dtype),
            );
            let got = gj(&x, dtype).unwrap();
            let want = j(&xr).unwrap();
            check(
                &format!("{act} jvp y [{n}]"),
                dtype,
                &got.primal,
                &want.primal,
                tol(dtype),
            );
            check(
                &format!("{act} jvp ty [{n}]"),
                dtype,
                got.tangent.as_ref().unwrap(),
                want.tangent.as_ref().unwrap(),
                tol(dtype),
            );
            check(
                &format!("{act} bwd [{n}]"),
                dtype,
                &gb(&x.primal, &gy, dtype).unwrap(),
                &b(&xr.primal, &rd(&gy, dtype)).unwrap(),
                tol(dtype),
            );
        }
    }
});

/// (T, C, G of the gate; 0 = [C]).
const RES: &[(usize, usize, usize)] = &[(77, 33, 0), (78, 64, 3), (20, 130, 20), (4, 1000, 1)];

gpu_test!(gated_residual, |dtype| {
    for (i, &(t, c, g)) in RES.iter().enumerate() {
        let mut r = rng(800 + i as u64);
        let n = format!("T{t} C{c} G{g}");
        let x = dual(&mut r, &[t, c], true);
        let gate = rdd(&dual(&mut r, &mod_shape(g, c), true), DType::F32);
        let y = dual(&mut r, &[t, c], true);
        let got = gops::gated_residual_forward(&x.primal, &gate.primal, &y.primal, dtype).unwrap();
        let (xr, yr) = (rdd(&x, dtype), rdd(&y, dtype));
        let want = ops::gated_residual_forward(&xr.primal, &gate.primal, &yr.primal).unwrap();
        check(
            &format!("gated_residual fwd [{n}]"),
            dtype,
            &got,
            &want,
            tol(dtype),
        );
        // All tangents, and the gate's alone.
        for (label, xx, gg, yy) in [
            ("all", x.clone(), gate.clone(), y.clone()),
            (
                "gate only",
                Dual::constant(x.primal.clone()),
                gate.clone(),
                Dual::constant(y.primal.clone()),
            ),
        ] {
            let got = gops::gated_residual_jvp(&xx, &gg, &yy, dtype).unwrap();
            let want = ops::gated_residual_jvp(&rdd(&xx, dtype), &gg, &rdd(&yy, dtype)).unwrap();
            check(
                &format!("gated_residual jvp {label} out [{n}]"),
                dtype,
                &got.primal,
                &want.primal,
                tol(dtype),
            );
            check(
                &format!("gated_residual jvp {label} tout [{n}]"),
                dtype,
                got.tangent.as_ref().unwrap(),
                want.tangent.as_ref().unwrap(),
                tol(dtype),
            );
        }
        let gout = rd(&randn(&[t, c], &mut r), dtype);
        let got = gops::gated_residual_backward(&gate.primal, &y.primal, &gout, dtype).unwrap();
        let want = ops::gated_residual_backward(&gate.primal, &yr.primal, &gout).unwrap();
        check(
            &format!("gated_residual bwd dx [{n}]"),
            dtype,
            &got.dx,
            &want.dx,
            tol(dtype),
        );
        check(
            &format!("gated_residual bwd dy [{n}]"),
            dtype,
            &got.dy,
            &want.dy,
            tol(dtype),
        );
        check(
            &format!("gated_residual bwd dgate [{n}]"),
            dtype,
            &got.dgate,
            &want.dgate,
            tol(dtype),
        );
    }
});

// The time path is f32 whatever the storage dtype: one run suffices, under the f32 name.
gpu_test!(timestep_embedding, |dtype| {
    if dtype != DType::F32 {
        return;
    }
    for (i, &(n, dim)) in [(7usize, 256usize), (33, 64), (1, 2)].iter().enumerate() {
        let mut r = rng(900 + i as u64);
        let t = dual(&mut r, &[n], true);
        let t = rdd(&t, DType::F32);
        let got = gops::timestep_embedding_jvp(&t, dim, ops::DEFAULT_MAX_PERIOD).unwrap();
        let want = ops::timestep_embedding_jvp(&t, dim, ops::DEFAULT_MAX_PERIOD).unwrap();
        let label = format!("N{n} dim{dim}");
        check(
            &format!("timestep e [{label}]"),
            dtype,
            &got.primal,
            &want.primal,
            1e-5,
        );
        check(
            &format!("timestep te [{label}]"),
            dtype,
            got.tangent.as_ref().unwrap(),
            want.tangent.as_ref().unwrap(),
            1e-5,
        );
        let e = gops::timestep_embedding_forward(&t.primal, dim, ops::DEFAULT_MAX_PERIOD).unwrap();
        check(
            &format!("timestep fwd e [{label}]"),
            dtype,
            &e,
            &want.primal,
            1e-5,
        );
    }
});

// ---------------------------------------------------------------------------------------------
// MLP.

/// (T, C, Hd): aligned, odd widths (ld not a multiple of 8: cuBLASLt may fall back to cuBLAS).
const MLP: &[(usize, usize, usize)] =
    &[(77, 64, 256), (33, 72, 200), (13, 75, 130), (256, 128, 512)];

struct MlpCase {
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl MlpCase {
    fn new(r: &mut StdRng, c: usize, hd: usize, dtype: DType) -> MlpCase {
        let scaled = |t: Tensor, s: f64| {
            let v: Vec<f64> = t.to_f64_vec().iter().map(|x| x * s).collect();
            rd(&Tensor::from_vec(v, t.shape()).unwrap(), dtype)
        };
        MlpCase {
            w1: scaled(randn(&[hd, c], r), 1.0 / (c as f64).sqrt()),
            b1: scaled(randn(&[hd], r), 0.5),
            w2: scaled(randn(&[c, hd], r), 1.0 / (hd as f64).sqrt()),
            b2: scaled(randn(&[c], r), 0.5),
        }
    }
    fn p(&self) -> Mlp<'_> {
        Mlp {
            w1: &self.w1,
            b1: &self.b1,
            w2: &self.w2,
            b2: &self.b2,
        }
    }
}

gpu_test!(mlp_forward_and_jvp, |dtype| {
    for (i, &(t, c, hd)) in MLP.iter().enumerate() {
        let mut r = rng(1000 + i as u64);
        let m = MlpCase::new(&mut r, c, hd, dtype);
        let x = rdd(&dual(&mut r, &[t, c], true), dtype);
        let n = format!("T{t} C{c} Hd{hd}");
        let got = gops::mlp_forward(&x.primal, &m.p(), dtype).unwrap();
        let want = ops::mlp_jvp(&x, &m.p()).unwrap();
        check(
            &format!("mlp fwd y [{n}]"),
            dtype,
            &got,
            &want.primal,
            tol(dtype),
        );
        let got = gops::mlp_jvp(&x, &m.p(), dtype).unwrap();
        check(
            &format!("mlp jvp y [{n}]"),
            dtype,
            &got.primal,
            &want.primal,
            tol(dtype),
        );
        check(
            &format!("mlp jvp ty [{n}]"),
            dtype,
            got.tangent.as_ref().unwrap(),
            want.tangent.as_ref().unwrap(),
            tol(dtype),
        );
    }
});

// x and ẋ in separate allocations: the first layer as two GEMMs instead of one stacked GEMM.
gpu_test!(mlp_jvp_unstacked_tangent, |dtype| {
    let gpu = cuda::Gpu::get().unwrap();
    let (t, c, hd) = (40, 64, 192);
    let mut r = rng(1100);
    let m = MlpCase::new(&mut r, c, hd, dtype);
    let x = rdd(&dual(&mut r, &[t, c], true), dtype);
    let w: Vec<_> = [&m.w1, &m.b1, &m.w2, &m.b2]
        .iter()
        .map(|t| gpu.upload(t, dtype).unwrap())
        .collect();
    let p = cuda::mlp::DeviceMlp {
        w1: &w[0],
        b1: &w[1],
        w2: &w[2],
        b2: &w[3],
    };
    let xd = gpu.upload(&x.primal, dtype).unwrap();
    let txd = gpu.upload(x.tangent.as_ref().unwrap(), dtype).unwrap();
    let (y, ty) = cuda::mlp::jvp(&xd, Some(&txd), &p).unwrap();
    let want = ops::mlp_jvp(&x, &m.p()).unwrap();
    check(
        "mlp jvp unstacked y",
        dtype,
        &y.download().unwrap(),
        &want.primal,
        tol(dtype),
    );
    check(
        "mlp jvp unstacked ty",
        dtype,
        &ty.unwrap().download().unwrap(),
        want.tangent.as_ref().unwrap(),
        tol(dtype),
    );
});

// A plan queued on a stream another library owns (`Gpu::run_on_stream`) comes after flashjvp's
// earlier work and before its later work. On a GPU the stream is a non-blocking one (no implicit
// order with flashjvp's stream), the input x only becomes valid by a copy queued on flashjvp's stream
// behind a busy kernel of some milliseconds, and the outputs are downloaded on flashjvp's stream:
// without the wait before, the products read NaN; without the wait after, the download does. The
// MLP's JVP takes cuBLASLt products (their workspace) and, where an epilogue has no algorithm, the
// elementwise kernels, all on that stream.
gpu_test!(mlp_jvp_on_a_stream_of_another_library, |dtype| {
    use cuda::launch::Step;
    use cuda::mlp::{MlpDims, ParamPtrs};
    let gpu = cuda::Gpu::get().unwrap();
    let (t, c, hd) = (40, 64, 192);
    let mut r = rng(1150);
    let m = MlpCase::new(&mut r, c, hd, dtype);
    let x = rdd(&dual(&mut r, &[t, c], true), dtype);
    let up = |t: &Tensor| gpu.upload(t, dtype).unwrap();
    let (w1, b1, w2, b2) = (up(&m.w1), up(&m.b1), up(&m.w2), up(&m.b2));
    let (x_src, txd) = (up(&x.primal), up(x.tangent.as_ref().unwrap()));
    let nan = |shape: &[usize]| gpu.poisoned(shape, dtype).unwrap();
    let (xd, h2, g, y, ty) = (
        nan(&[t, c]),
        nan(&[2 * t, hd]),
        nan(&[t, hd]),
        nan(&[t, c]),
        nan(&[t, c]),
    );
    let sink = gpu.poisoned(&[1], DType::F32).unwrap();
    let iters = if gpu.is_emulated() { 1000 } else { 2_000_000 };
    let mut before = cuda::bench::plan_busy(iters, sink.ptr()).unwrap();
    before.push(Step::Copy {
        src: x_src.ptr(),
        dst: xd.ptr(),
        bytes: t * c * dtype.size_in_bytes(),
    });
    gpu.run(&before).unwrap();
    let plan = cuda::mlp::plan_jvp(
        dtype,
        MlpDims { t, c, hd },
        xd.ptr(),
        txd.ptr(),
        ParamPtrs {
            w1: w1.ptr(),
            b1: b1.ptr(),
            w2: w2.ptr(),
            b2: b2.ptr(),
        },
        h2.ptr(),
        g.ptr(),
        y.ptr(),
        ty.ptr(),
    )
    .unwrap();
    // The emulator has no streams (no context either): there the handle is 0, and ignored.
    let theirs = gpu.context().ok().map(|ctx| ctx.new_stream().unwrap());
    let handle = theirs.as_ref().map_or(0, |s| s.cu_stream() as u64);
    // SAFETY: a live stream of the Gpu's context, kept until the call returns (or 0).
    unsafe { gpu.run_on_stream(&plan, handle) }.unwrap();
    let want = ops::mlp_jvp(&x, &m.p()).unwrap();
    check(
        "mlp jvp on another stream y",
        dtype,
        &y.download().unwrap(),
        &want.primal,
        tol(dtype),
    );
    check(
        "mlp jvp on another stream ty",
        dtype,
        &ty.download().unwrap(),
        want.tangent.as_ref().unwrap(),
        tol(dtype),
    );
});

gpu_test!(mlp_backward, |dtype| {
    for (i, &(t, c, hd)) in MLP.iter().enumerate() {
        let mut r = rng(1200 + i as u64);
        let m = MlpCase::new(&mut r, c, hd, dtype);
        let x = rd(&randn(&[t, c], &mut r), dtype);
        let gy = rd(&randn(&[t, c], &mut r), dtype);
        let got = gops::mlp_backward(&x, &m.p(), &gy, dtype).unwrap();
        let want = ops::mlp_backward(&x, &m.p(), &gy).unwrap();
        let n = format!("T{t} C{c} Hd{hd}");
        for (what, g, w) in [
            ("dx", &got.dx, &want.dx),
            ("dw1", &got.dw1, &want.dw1),
            ("db1", &got.db1, &want.db1),
            ("dw2", &got.dw2, &want.dw2),
            ("db2", &got.db2, &want.db2),
        ] {
            check(&format!("mlp bwd {what} [{n}]"), dtype, g, w, tol(dtype));
        }
    }
});

// ---------------------------------------------------------------------------------------------
// Bad inputs: errors naming the tensor or the limit, with or without a GPU.

fn t(shape: &[usize]) -> Tensor {
    let mut r = rng(1);
    randn(shape, &mut r)
}

#[test]
fn unsupported_head_dim_is_an_error() {
    let q = Dual::constant(t(&[1, 1, 8, 48]));
    let e = gops::attention_jvp(&q, &q, &q, None, None, DType::BF16).unwrap_err();
    assert!(
        matches!(e, Error::Unsupported(_)) && e.to_string().contains("head dim 48"),
        "{e}"
    );
    // An unsupported v head dim: the error names q, v and their shapes.
    let v = Dual::constant(t(&[1, 1, 8, 48]));
    let q = Dual::constant(t(&[1, 1, 8, 64]));
    let e = gops::attention_jvp(&q, &q, &v, None, None, DType::BF16).unwrap_err();
    let m = e.to_string();
    assert!(
        matches!(e, Error::Unsupported(_))
            && m.contains("q [1, 1, 8, 64]")
            && m.contains("v [1, 1, 8, 48]"),
        "{m}"
    );
    let e = gops::attention_backward(
        &q.primal,
        &q.primal,
        &v.primal,
        &v.primal,
        &t(&[1, 1, 8]),
        &v.primal,
        None,
        None,
        DType::F32,
    )
    .unwrap_err();
    assert!(e.to_string().contains("v [1, 1, 8, 48]"), "{e}");
}

#[test]
fn mismatched_shapes_name_the_tensor() {
    let q = Dual::constant(t(&[1, 2, 8, 64]));
    let k = Dual::constant(t(&[1, 1, 8, 64]));
    let e = gops::attention_jvp(&q, &k, &q, None, None, DType::F32).unwrap_err();
    assert!(
        matches!(e, Error::Shape { .. }) && e.to_string().contains("`k`"),
        "{e}"
    );
    let bad_tangent = Dual {
        primal: t(&[1, 2, 8, 64]),
        tangent: Some(t(&[1, 2, 8, 32])),
    };
    let e = gops::attention_jvp(&bad_tangent, &q, &q, None, None, DType::F32).unwrap_err();
    assert!(matches!(e, Error::TangentMismatch { .. }), "{e}");
    let lse = t(&[1, 2, 7]);
    let e = gops::attention_backward(
        &q.primal,
        &q.primal,
        &q.primal,
        &q.primal,
        &lse,
        &q.primal,
        None,
        None,
        DType::F32,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`lse`"), "{e}");
    // dv != d: the cotangent of o is [B,H,Nq,dv], not q-shaped.
    let v = t(&[1, 2, 8, 32]);
    let o = t(&[1, 2, 8, 32]);
    let e = gops::attention_backward(
        &q.primal,
        &q.primal,
        &v,
        &o,
        &t(&[1, 2, 8]),
        &q.primal,
        None,
        None,
        DType::F32,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`go`"), "{e}");
    let x = t(&[6, 8]);
    let e = gops::layernorm_mod_forward(&x, &t(&[4, 8]), &t(&[8]), EPS, DType::BF16).unwrap_err();
    assert!(e.to_string().contains("`scale`"), "{e}");
    let e = gops::mlp_forward(
        &x,
        &Mlp {
            w1: &t(&[16, 8]),
            b1: &t(&[15]),
            w2: &t(&[8, 16]),
            b2: &t(&[8]),
        },
        DType::F32,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`b1`"), "{e}");
    let e = gops::gated_residual_forward(&x, &t(&[8]), &t(&[6, 7]), DType::F32).unwrap_err();
    assert!(e.to_string().contains("`y`"), "{e}");
}

#[test]
fn f64_is_refused_on_the_gpu() {
    let x = t(&[4, 8]);
    let e = gops::gelu_forward(&x, DType::F64).unwrap_err();
    assert!(e.to_string().contains("f64"), "{e}");
}

#[test]
fn without_a_gpu_ops_are_errors_not_panics() {
    if cuda::gpu_available() {
        return;
    }
    let x = t(&[4, 8]);
    let e = gops::gelu_forward(&x, DType::F32).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("no CUDA driver found") || m.contains("NVRTC") || m.contains("CUDA"),
        "{m}"
    );
}

#[test]
fn require_gpu_env_turns_a_skip_into_a_failure() {
    if cuda::gpu_available() {
        return;
    }
    // In a child process so that the environment of this one is untouched.
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", "attention_forward::f32", "--test-threads=1"])
        .env("FLASHJVP_REQUIRE_GPU", "1")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a required GPU that is missing must fail the test"
    );
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "attention_forward::f32", "--test-threads=1"])
        .env_remove("FLASHJVP_REQUIRE_GPU")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped: no CUDA device"));
}

#[test]
fn impossible_allocations_are_errors() {
    let Some(gpu) = require_gpu_or_skip() else {
        return;
    };
    // A shape whose element count overflows: refused before any allocation.
    let e = gpu.alloc(&[1 << 40, 1 << 40], DType::F32).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    let e = gpu
        .alloc_stacked(&[&[4], &[1 << 62, 4]], DType::F32)
        .unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    // Each slot within isize::MAX bytes, the total 2^64 - 256: refused (it used to reach the
    // emulator's page rounding, which wrapped in release builds and overflowed in debug ones).
    let n = 1usize << 60;
    let e = gpu
        .alloc_stacked(&[&[n], &[n], &[n], &[n - 64]], DType::F32)
        .unwrap_err();
    assert!(
        matches!(e, Error::Invalid { .. }) && e.to_string().contains("alloc_stacked"),
        "{e}"
    );
    let e = gpu.alloc_stacked(&[&[n], &[n]], DType::F32).unwrap_err();
    assert!(matches!(e, Error::Invalid { .. }), "{e}");
    // upload_packed's alignment: a power of two of at most a page (1 << 62 used to size a
    // host buffer of 2^62 bytes, and abort).
    let x = t(&[3, 5]).to_dtype(DType::F32);
    for align in [0, 3, 8192, 1 << 62] {
        let e = gpu.upload_packed(&[&x, &x], DType::F32, align).unwrap_err();
        assert!(e.to_string().contains(&format!("align {align}")), "{e}");
    }
    let packed = gpu.upload_packed(&[&x, &x], DType::F32, 4096).unwrap();
    assert_eq!(packed[1].ptr() - packed[0].ptr(), 4096);
    assert_eq!(packed[1].download().unwrap(), x);
    // 2^60 bytes: a valid size no GPU (nor the emulator's host) has, so the allocation itself
    // fails, as an error naming the size.
    let e = gpu.alloc(&[1 << 30, 1 << 29], DType::BF16).unwrap_err();
    assert!(e.to_string().contains("allocating"), "{e}");
    // The GPU still works afterwards.
    let x = gpu.upload(&t(&[3, 5]), DType::F32).unwrap();
    assert_eq!(x.download().unwrap().shape(), &[3, 5]);
    // A view past the end, even by overflow, is an error.
    assert!(x.view(usize::MAX, &[2]).is_err());
    assert!(x.reshape(&[usize::MAX, 2]).is_err());
}

/// The `*_into` entry points refuse outputs whose memory overlaps an input or another output
/// (naming both): a kernel would read what it, or an earlier step, writes (the backward's
/// preprocess overwrites `delta` before dK/dV reads `lse`), or two outputs would land in one place.
#[test]
fn outputs_sharing_memory_with_inputs_or_outputs_are_errors() {
    let Some(gpu) = require_gpu_or_skip() else {
        return;
    };
    use cuda::attention::{self as attn, DeviceAttentionJvp};
    use cuda::layernorm as ln;
    let dt = DType::F32;
    let s = [1, 2, 8, 32];
    let ls = [1, 2, 8];
    let up = |x: &Tensor| gpu.upload(x, dt).unwrap();
    let out = |shape: &[usize]| gpu.alloc_out(shape, dt).unwrap();
    let (q, k, v, tq) = (up(&t(&s)), up(&t(&s)), up(&t(&s)), up(&t(&s)));
    let (o, lse, to, tlse) = (out(&s), out(&ls), out(&s), out(&ls));
    let c = attn::resolve_scale(None, 32).unwrap();
    let refused = |r: flashjvp::Result<()>, a: &str, b: &str| {
        let m = r.expect_err("aliased output").to_string();
        assert!(
            m.contains(&format!("`{a}`"))
                && m.contains(&format!("`{b}`"))
                && m.contains("overlaps"),
            "{a}/{b}: {m}"
        );
    };
    // Forward: o over q; lse in o's first bytes.
    refused(attn::forward_into(&gpu, &q, &k, &v, &q, &lse, c), "o", "q");
    let lse_in_o = o.view(0, &ls).unwrap();
    refused(
        attn::forward_into(&gpu, &q, &k, &v, &o, &lse_in_o, c),
        "o",
        "lse",
    );
    attn::forward_into(&gpu, &q, &k, &v, &o, &lse, c).unwrap();
    // JVP: o and its tangent in one place; the tangent over tq.
    let jvp_out = |o: &cuda::DeviceTensor, to: &cuda::DeviceTensor| DeviceAttentionJvp {
        o: o.clone(),
        to: Some(to.clone()),
        lse: lse.clone(),
        tlse: Some(tlse.clone()),
    };
    let jvp =
        |r: &DeviceAttentionJvp| attn::jvp_into(&gpu, &q, &k, &v, Some(&tq), None, None, r, c);
    refused(jvp(&jvp_out(&o, &o)), "o", "to");
    refused(jvp(&jvp_out(&o, &tq)), "to", "tq");
    jvp(&jvp_out(&o, &to)).unwrap();
    // Backward: delta (scratch the preprocess writes) on lse; two gradients in one place; a
    // gradient over its primal.
    let (fo, flse) = attn::forward(&q, &k, &v, None).unwrap();
    let (dout, delta) = (up(&t(&s)), out(&ls));
    let (dq, dk, dv) = (out(&s), out(&s), out(&s));
    let bwd = |delta: &cuda::DeviceTensor, g: [&cuda::DeviceTensor; 3]| {
        attn::backward_into(&gpu, &q, &k, &v, &fo, &flse, &dout, delta, g, c)
    };
    refused(bwd(&flse, [&dq, &dk, &dv]), "delta", "lse");
    refused(bwd(&delta, [&dq, &dk, &dk]), "dk", "dv");
    refused(bwd(&delta, [&q, &dk, &dv]), "dq", "q");
    refused(bwd(&delta, [&dq, &dk, &dout]), "dv", "go");
    bwd(&delta, [&dq, &dk, &dv]).unwrap();
    // Packed: o written into the projection it reads; its tangent over the tangent's.
    let (qkv, tqkv) = (up(&t(&[1, 8, 3, 2, 32])), up(&t(&[1, 8, 3, 2, 32])));
    let po_shape = [1, 8, 2, 32];
    let (po, pto) = (out(&po_shape), out(&po_shape));
    let o_in_qkv = qkv.view(64, &po_shape).unwrap();
    refused(
        attn::forward_packed_into(&gpu, &qkv, &o_in_qkv, &lse, c),
        "o",
        "qkv",
    );
    attn::forward_packed_into(&gpu, &qkv, &po, &lse, c).unwrap();
    let to_in_tqkv = tqkv.view(0, &po_shape).unwrap();
    refused(
        attn::jvp_packed_into(&gpu, &qkv, &tqkv, &jvp_out(&po, &to_in_tqkv), c),
        "to",
        "tqkv",
    );
    attn::jvp_packed_into(&gpu, &qkv, &tqkv, &jvp_out(&po, &pto), c).unwrap();
    // Layernorm: y over x; y and its tangent in one place; ty over the tangent of scale.
    let x = up(&t(&[6, 64]));
    let (y, ty) = (out(&[6, 64]), out(&[6, 64]));
    let none = ln::Modulation::default();
    refused(ln::jvp_into(&gpu, &x, None, none, EPS, &x, &ty), "y", "x");
    refused(ln::jvp_into(&gpu, &x, None, none, EPS, &y, &y), "y", "ty");
    let (scale, tscale) = (up(&t(&[64])), up(&t(&[64])));
    let m = ln::Modulation {
        scale: Some(&scale),
        tscale: Some(&tscale),
        ..none
    };
    ln::jvp_into(&gpu, &x, None, m, EPS, &y, &ty).unwrap();
    let tscale_in_ty = ty.view(64, &[64]).unwrap();
    let m = ln::Modulation {
        tscale: Some(&tscale_in_ty),
        ..m
    };
    refused(
        ln::jvp_into(&gpu, &x, None, m, EPS, &y, &ty),
        "ty",
        "tscale",
    );
}

/// `flashjvp bench` checks the shape before anything else (a 13-dim shape is an error, not an
/// overflowing seed), and refuses a working set larger than the GPU's memory before building any
/// tensor (the MLP's 4 TB input used to be built on the host first, and abort).
#[test]
fn bench_refuses_shapes_before_building_anything() {
    use cuda::bench::{bench, BenchOp};
    for op in [
        BenchOp::Attention,
        BenchOp::Mlp,
        BenchOp::DitBlock,
        BenchOp::LayerNorm,
    ] {
        let e = bench(op, &[usize::MAX; 13], DType::BF16).unwrap_err();
        assert!(e.to_string().contains("expected"), "{e}");
    }
    if require_gpu_or_skip().is_none() {
        return;
    }
    let e = bench(BenchOp::Mlp, &[1_000_000, 1_000_000, 1], DType::BF16).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("[1000000, 1000000, 1]") && m.contains("GiB of GPU memory"),
        "{m}"
    );
    let e = bench(BenchOp::LayerNorm, &[1 << 30, 1 << 20], DType::F32).unwrap_err();
    assert!(e.to_string().contains("GiB of GPU memory"), "{e}");
}

#[test]
fn the_benchmark_busy_kernel_runs_without_touching_its_sink() {
    let Some(gpu) = require_gpu_or_skip() else {
        return;
    };
    // The kernel time_plans queues in front of its timed runs: it must run and write nothing.
    let sink = gpu
        .upload(&Tensor::from_vec(vec![7.5f32], &[1]).unwrap(), DType::F32)
        .unwrap();
    gpu.run(&cuda::bench::plan_busy(5000, sink.ptr()).unwrap())
        .unwrap();
    gpu.synchronize().unwrap();
    assert_eq!(sink.download().unwrap().to_f64_vec(), vec![7.5]);
    let e = cuda::bench::plan_busy(1, 0).unwrap_err();
    assert!(e.to_string().contains("sink"), "{e}");
    assert!(cuda::bench::plan_busy(u64::MAX, sink.ptr()).is_err());
}
