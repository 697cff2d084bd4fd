//! The GPU DiT (f32 on the device) against the CPU DiT in f64, on a small network with patch 2:
//! the forward, the dual forward (primal and tangent, with tangents on x and t, on x only, on t
//! only) and the backward (every parameter gradient, from a plain forward's cache and from a dual
//! forward's). Every parameter is randomised (adaLN-zero would zero most paths), inputs are fresh
//! random values, and device outputs are NaN-poisoned before the kernels write them. Relative
//! errors ‖gpu − cpu‖ / ‖cpu‖ are printed as `ERR` lines (past the harness's capture).
//!
//! Tolerances: the network output and its tangent 1e-4, each parameter gradient 1e-3 (a whole
//! network of f32 ops, each within 1e-5 of f64 on its own; small gradients such as biases deep in
//! the network carry the accumulated rounding of the whole backward).
//!
//! Also the rCM pipeline at toy size on the GPU. Without a GPU every test prints "skipped: no CUDA
//! device" and passes; with FLASHJVP_REQUIRE_GPU=1 it fails.
#![cfg(feature = "cuda")]

mod common;

use std::io::Write;

use common::{randn, rel_err, rng};
use flashjvp::cuda::require_gpu_or_skip;
use flashjvp::dit::gpu::GpuDit;
use flashjvp::dit::{Dit, DitConfig};
use flashjvp::rcm::{self, Method, Preset, RcmConfig, RcmOptions};
use flashjvp::{DType, DeviceRequest, Dual, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

const TOL_OUT: f64 = 1e-4;
const TOL_GRAD: f64 = 1e-3;

/// 8×8 images of 2 channels, patch 2 (16 tokens), width 64 in 2 heads of 32, depth 2.
fn config() -> DitConfig {
    DitConfig {
        image_size: 8,
        in_channels: 2,
        patch: 2,
        hidden: 64,
        depth: 2,
        heads: 2,
        mlp_ratio: 2,
        num_classes: 5,
        freq_dim: 16,
        time_scale: 3.0,
    }
}

fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let g = got.to_f64_vec();
    let w = want.to_f64_vec();
    let bad = g.iter().filter(|v| !v.is_finite()).count();
    assert!(
        bad == 0,
        "{what}: {bad} of {} elements not finite (unwritten?)",
        g.len()
    );
    let err = rel_err(&g, &w);
    report(&format!(
        "ERR dit {what}: rel {err:.3e} (tol {tol:.0e}){}",
        if err <= tol { "" } else { "  FAIL" }
    ));
    common::assert_close(what, &g, &w, tol);
}

fn setup(seed: u64, b: usize) -> (Dit, GpuDit, Tensor, Tensor, Vec<usize>, StdRng) {
    let mut r = rng(seed);
    let c = config();
    let mut dit = Dit::new(c.clone(), DType::F64, &mut r).unwrap();
    dit.randomize_for_tests(&mut r, 1.0).unwrap();
    let gpu = GpuDit::upload(&dit).unwrap();
    let x = randn(&[b, c.in_channels, c.image_size, c.image_size], &mut r);
    let t: Vec<f64> = (0..b).map(|_| r.random_range(0.2..1.4)).collect();
    let t = Tensor::from_vec(t, &[b]).unwrap();
    let class = (0..b).map(|i| (i * 2) % (c.num_classes + 1)).collect();
    (dit, gpu, x, t, class, r)
}

#[test]
fn forward_matches_the_cpu() {
    if require_gpu_or_skip().is_none() {
        return;
    }
    let (dit, gpu, x, t, class, _) = setup(1, 3);
    let want = dit.forward(&x, &t, &class).unwrap();
    let got = gpu.forward(&x, &t, &class).unwrap();
    check("forward", &got, &want, TOL_OUT);
}

fn dual_case(name: &str, seed: u64, on_x: bool, on_t: bool) {
    if require_gpu_or_skip().is_none() {
        return;
    }
    let (dit, gpu, x, t, class, mut r) = setup(seed, 3);
    let xd = Dual {
        tangent: on_x.then(|| randn(x.shape(), &mut r)),
        primal: x,
    };
    let td = Dual {
        tangent: on_t.then(|| randn(t.shape(), &mut r)),
        primal: t,
    };
    let (want, _) = dit.forward_dual(&xd, &td, &class).unwrap();
    let (got, _) = gpu.forward_dual(&xd, &td, &class).unwrap();
    check(
        &format!("dual {name} primal"),
        &got.primal,
        &want.primal,
        TOL_OUT,
    );
    check(
        &format!("dual {name} tangent"),
        got.tangent
            .as_ref()
            .expect("a tangent flows in, so one flows out"),
        want.tangent.as_ref().unwrap(),
        TOL_OUT,
    );
}

#[test]
fn dual_forward_matches_the_cpu_x_and_t() {
    dual_case("x,t", 2, true, true);
}

#[test]
fn dual_forward_matches_the_cpu_x_only() {
    dual_case("x", 3, true, false);
}

#[test]
fn dual_forward_matches_the_cpu_t_only() {
    dual_case("t", 4, false, true);
}

fn backward_case(dual: bool, seed: u64) {
    if require_gpu_or_skip().is_none() {
        return;
    }
    let (dit, gpu, x, t, class, mut r) = setup(seed, 4);
    let gout = randn(x.shape(), &mut r);
    let (want, got) = if dual {
        let xd = Dual {
            tangent: Some(randn(x.shape(), &mut r)),
            primal: x,
        };
        let td = Dual {
            tangent: Some(randn(t.shape(), &mut r)),
            primal: t,
        };
        let (_, cc) = dit.forward_dual(&xd, &td, &class).unwrap();
        let (_, gc) = gpu.forward_dual(&xd, &td, &class).unwrap();
        (
            dit.backward(&cc, &gout).unwrap(),
            gpu.backward(&gc, &gout).unwrap(),
        )
    } else {
        let (_, cc) = dit.forward_train(&x, &t, &class).unwrap();
        let (_, gc) = gpu.forward_train(&x, &t, &class).unwrap();
        (
            dit.backward(&cc, &gout).unwrap(),
            gpu.backward(&gc, &gout).unwrap(),
        )
    };
    let names = Dit::param_layout(&config());
    assert_eq!(got.len(), names.len());
    let mut worst = (0.0f64, String::new());
    for ((name, _), (g, w)) in names.iter().zip(got.iter().zip(&want)) {
        assert_eq!(
            g.dtype(),
            DType::F64,
            "{name}: gradients in the network dtype"
        );
        let err = rel_err(&g.to_f64_vec(), &w.to_f64_vec());
        if err > worst.0 {
            worst = (err, name.clone());
        }
        check(
            &format!("grad{} {name}", if dual { " (dual cache)" } else { "" }),
            g,
            w,
            TOL_GRAD,
        );
    }
    report(&format!(
        "ERR dit backward{}: worst {:.3e} at {}",
        if dual { " (dual cache)" } else { "" },
        worst.0,
        worst.1
    ));
}

#[test]
fn backward_matches_the_cpu() {
    backward_case(false, 5);
}

#[test]
fn backward_from_the_dual_cache_matches_the_cpu() {
    backward_case(true, 6);
}

#[test]
fn a_cache_of_other_parameters_is_refused() {
    if require_gpu_or_skip().is_none() {
        return;
    }
    let (mut dit, gpu, x, t, class, mut r) = setup(7, 2);
    let (_, cache) = gpu.forward_train(&x, &t, &class).unwrap();
    dit.randomize_for_tests(&mut r, 1.0).unwrap();
    let newer = GpuDit::upload(&dit).unwrap();
    assert_ne!(newer.generation(), gpu.generation());
    let e = newer.backward(&cache, &x).unwrap_err();
    assert!(e.to_string().contains("generation"), "{e}");
    // A gout of the wrong shape names the tensor.
    let e = gpu.backward(&cache, &t).unwrap_err();
    assert!(e.to_string().contains("gout"), "{e}");
}

/// The pipeline on the GPU at toy size, with a DiT the kernels take (patch 2, head dim 32).
#[test]
fn toy_rcm_pipeline_runs_on_cuda() {
    if require_gpu_or_skip().is_none() {
        return;
    }
    let out = std::env::temp_dir().join(format!("flashjvp-rcm-cuda-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let mut config = RcmConfig::preset(Preset::Toy);
    config.dit = DitConfig {
        patch: 2,
        hidden: 64,
        heads: 2,
        ..config.dit
    };
    let opts = RcmOptions {
        config,
        methods: vec![Method::Rcm],
        device: DeviceRequest::Cuda,
        seed: 7,
        out: out.clone(),
        resume: false,
        progress: false,
        stop_after: None,
    };
    let report = rcm::run(&opts).expect("the toy pipeline runs on the GPU");
    assert!(report.complete);
    assert!(report.device.starts_with("cuda ("), "{}", report.device);
    // Teacher at 1, 2, 4 steps and its ODE solver; the rCM student at 1, 2, 4.
    assert_eq!(report.rows.len(), 7);
    for r in &report.rows {
        assert!(
            r.metrics.precision.is_finite() && r.ms_per_sample.is_finite(),
            "{r:?}"
        );
    }
    let text = std::fs::read_to_string(out.join("results.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["device"].as_str().unwrap().starts_with("cuda"));
    let _ = std::fs::remove_dir_all(&out);
}

/// Without a GPU, `--device cuda` is an error that says why; with one, a DiT whose head dim the
/// kernels lack is refused before any training.
#[test]
fn cuda_runs_refuse_what_they_cannot_do() {
    let out = std::env::temp_dir().join(format!("flashjvp-rcm-cuda-bad-{}", std::process::id()));
    let opts = RcmOptions {
        config: RcmConfig::preset(Preset::Toy),
        methods: vec![Method::Rcm],
        device: DeviceRequest::Cuda,
        seed: 7,
        out: out.clone(),
        resume: false,
        progress: false,
        stop_after: None,
    };
    let e = rcm::run(&opts).unwrap_err().to_string();
    assert!(e.contains("cuda"), "{e}");
    if flashjvp::cuda::gpu_available() {
        // The toy DiT has head dim 8.
        assert!(e.contains("head dim 8"), "{e}");
        assert!(!out.join("teacher.run.json").exists(), "nothing trained");
    }
    let _ = std::fs::remove_dir_all(&out);
}
