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
    let names = Dit::param_layout(&config()).unwrap();
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

#[test]
fn bad_parameters_and_buffers_are_errors() {
    use flashjvp::dit::gpu::{BlockAlloc, BlockDims, BlockGradAlloc, BlockParams, ParamLayout};
    let Some(dev) = require_gpu_or_skip() else {
        return;
    };
    let (dit, gpu, x, t, class, mut r) = setup(9, 2);
    let names = Dit::param_layout(&config()).unwrap();
    let last = names.len() - 1;
    // Parameters swapped through params_mut for tensors of another size: a larger last one
    // panicked in the upload, a smaller one left zeros, a larger middle one overwrote its
    // neighbours. The upload refuses them as the CPU passes do, naming the parameter.
    for (i, shape) in [(last, vec![1000]), (3, vec![3]), (3, vec![65])] {
        let mut bad = dit.clone();
        bad.params_mut()[i] = randn(&shape, &mut r);
        let e = GpuDit::upload(&bad).err().unwrap().to_string();
        assert!(e.contains(&names[i].0), "{i}: {e}");
    }
    let mut bad = dit.clone();
    bad.params_mut()[0] = bad.params()[0].to_dtype(DType::F32);
    let e = GpuDit::upload(&bad).err().unwrap().to_string();
    assert!(e.contains(&names[0].0) && e.contains("f32"), "{e}");
    // An f64 value beyond f32's range would have reached the kernels as infinity.
    let mut bad = dit.clone();
    let mut w = bad.params()[3].to_f64_vec();
    w[1] = -3e300;
    bad.params_mut()[3] = Tensor::from_vec(w, bad.params()[3].shape()).unwrap();
    let e = GpuDit::upload(&bad).err().unwrap().to_string();
    assert!(e.contains(&names[3].0) && e.contains("range"), "{e}");

    // A config no network can have.
    let e = ParamLayout::new(&DitConfig {
        depth: usize::MAX / 4,
        ..config()
    })
    .unwrap_err();
    assert!(e.to_string().contains("depth"), "{e}");

    // Gradients in a buffer other than the layout's: refused, not read past.
    let up = |v: &Tensor| dev.upload(v, DType::F32).unwrap();
    let short = up(&randn(&[gpu.layout().total - 64], &mut r));
    let e = gpu.grads_to_host(&short).unwrap_err().to_string();
    assert!(e.contains("`grads`"), "{e}");
    let wrong_dtype = dev
        .upload(&randn(&[gpu.layout().total], &mut r), DType::BF16)
        .unwrap();
    let e = gpu.grads_to_host(&wrong_dtype).unwrap_err().to_string();
    assert!(e.contains("`grads`") && e.contains("bf16"), "{e}");
    let (_, cache) = gpu.forward_train(&x, &t, &class).unwrap();
    let grads = gpu
        .backward_device(&cache, &up(&randn(x.shape(), &mut r)))
        .unwrap();
    assert_eq!(gpu.grads_to_host(&grads).unwrap().len(), names.len());

    // Block buffers: dims the kernels refuse, an input of another shape or dtype, a tangent
    // without tangent buffers, a parameter list of the wrong count or shapes.
    let d = gpu.dims(2);
    let xt = up(&randn(&[d.t(), d.c], &mut r));
    assert!(BlockAlloc::new(&dev, DType::F32, d, &xt, Some(&xt), true).is_ok());
    let e = BlockAlloc::new(
        &dev,
        DType::F32,
        d,
        &up(&randn(&[d.t() - 1, d.c], &mut r)),
        None,
        false,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("`x`"), "{e}");
    let e = BlockAlloc::new(&dev, DType::BF16, d, &xt, None, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("`x`") && e.contains("bf16"), "{e}");
    let e = BlockAlloc::new(&dev, DType::F32, d, &xt, Some(&xt), false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("dual"), "{e}");
    let huge = BlockDims {
        b: usize::MAX / 2,
        ..d
    };
    assert!(BlockAlloc::new(&dev, DType::F32, huge, &xt, None, false).is_err());
    let odd = BlockDims { heads: 3, ..d };
    assert!(BlockAlloc::new(&dev, DType::F32, odd, &xt, None, false).is_err());
    assert!(BlockGradAlloc::new(&dev, DType::F32, huge, xt.ptr(), xt.ptr()).is_err());
    let e = BlockGradAlloc::new(&dev, DType::F32, d, xt.ptr(), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("ones"), "{e}");
    let w: Vec<_> = BlockParams::shapes(d.c, d.hd)
        .iter()
        .map(|s| dev.alloc_out(s, DType::F32).unwrap())
        .collect();
    assert!(BlockParams::of(&w).is_ok());
    let e = BlockParams::of(&w[..7]).unwrap_err().to_string();
    assert!(e.contains("7 tensors"), "{e}");
    let mut swapped = w.clone();
    swapped.swap(4, 6);
    let e = BlockParams::of(&swapped).unwrap_err().to_string();
    assert!(e.contains("fc1_w"), "{e}");
}

#[test]
fn inference_passes_match_the_training_ones_and_serve_no_backward() {
    // forward and jvp free each block's buffers as they go: the same kernels on the same inputs as
    // forward_train / forward_dual (the same bits on the emulator; on a GPU cuBLASLt may pick
    // another algorithm for other addresses, hence 1e-6); their cache cannot serve a backward.
    let Some(dev) = require_gpu_or_skip() else {
        return;
    };
    let (_, gpu, x, t, class, mut r) = setup(8, 2);
    let (want, _) = gpu.forward_train(&x, &t, &class).unwrap();
    let got = gpu.forward(&x, &t, &class).unwrap();
    let same = |what: &str, a: &Tensor, b: &Tensor| {
        let e = rel_err(&a.to_f64_vec(), &b.to_f64_vec());
        assert!(e <= 1e-6, "{what}: rel {e:.3e}");
    };
    same("forward", &got, &want);
    let xd = Dual::new(x.clone(), randn(x.shape(), &mut r)).unwrap();
    let td = Dual::new(t.clone(), randn(t.shape(), &mut r)).unwrap();
    let (want, _) = gpu.forward_dual(&xd, &td, &class).unwrap();
    let got = gpu.jvp(&xd, &td, &class).unwrap();
    same("jvp primal", &got.primal, &want.primal);
    same("jvp tangent", &got.tangent.unwrap(), &want.tangent.unwrap());
    let up = |v: &Tensor| dev.upload(v, DType::F32).unwrap();
    let (y, _, cache) = gpu
        .run_device_with(&up(&x), None, &up(&t), None, &class, false)
        .unwrap();
    let e = gpu.backward_device(&cache, &y).unwrap_err();
    assert!(e.to_string().contains("inference pass"), "{e}");
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
/// The block plans `flashjvp bench dit_block` times, in bf16, against the same plans in f32 on the
/// same (bf16-representable) inputs: the output and its tangent of the dual forward, then the
/// backward's input cotangent, modulation and weight gradients. Head dim 64, so on a Hopper (or
/// under `FLASHJVP_EMULATE=sm_90a`) the bf16 attention takes the sm_90a kernels.
#[test]
fn bf16_block_plans_agree_with_f32() {
    use flashjvp::cuda::launch::Step;
    use flashjvp::cuda::tensor::one_bits;
    use flashjvp::dit::gpu::{
        plan_block_backward, plan_block_forward, BlockAlloc, BlockDims, BlockGradAlloc,
        BlockParams, Mods,
    };
    let Some(gpu) = require_gpu_or_skip() else {
        return;
    };
    let (b, n, c, heads) = (2, 40, 128, 2);
    let d = BlockDims {
        b,
        n,
        c,
        heads,
        hd: 4 * c,
    };
    let (t, hd) = (d.t(), d.hd);
    let mut r = rng(21);
    // Inputs rounded to bf16 once, so that both runs see the same values.
    let mut input = |shape: &[usize], scale: f64| -> Tensor {
        let v: Vec<f64> = randn(shape, &mut r)
            .to_f64_vec()
            .iter()
            .map(|x| x * scale)
            .collect();
        Tensor::from_f64_vec(v, shape, DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
    };
    // Weights at 1/sqrt(fan-in), biases at 0.1.
    let shapes = BlockParams::shapes(c, hd);
    let weights: Vec<Tensor> = shapes
        .iter()
        .map(|s| {
            input(
                s,
                if s.len() == 2 {
                    1.0 / (s[1] as f64).sqrt()
                } else {
                    0.1
                },
            )
        })
        .collect();
    let mods = input(&[6, b, c], 0.3);
    let tmods = input(&[6, b, c], 0.3);
    let (x, tx, dout) = (
        input(&[t, c], 1.0),
        input(&[t, c], 1.0),
        input(&[t, c], 1.0),
    );

    // (output, its tangent, dx, dmods, weight gradients) of one dtype's plans.
    let run = |dtype: DType| -> Vec<Tensor> {
        let up = |h: &Tensor, dt: DType| gpu.upload(h, dt).unwrap();
        let w: Vec<_> = weights.iter().map(|h| up(h, dtype)).collect();
        let p = BlockParams::of(&w).unwrap();
        let (mods_d, tmods_d) = (up(&mods, DType::F32), up(&tmods, DType::F32));
        let m = Mods::chunks(mods_d.ptr(), 0, b, c);
        let tm = Mods::chunks(tmods_d.ptr(), 0, b, c);
        let (xd, txd, doutd) = (up(&x, dtype), up(&tx, dtype), up(&dout, dtype));
        let ja = BlockAlloc::new(&gpu, dtype, d, &xd, Some(&txd), true).unwrap();
        gpu.run(
            &plan_block_forward(
                gpu.arch(),
                dtype,
                d,
                &p,
                &m,
                Some(&tm),
                &ja.bufs,
                ja.tangents.as_ref(),
            )
            .unwrap(),
        )
        .unwrap();
        let (dx_shape, ones_shape) = ([t, c], [t]);
        let mut grad_shapes: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
        grad_shapes.extend([&dx_shape[..], &ones_shape[..]]);
        let grads = gpu.alloc_stacked(&grad_shapes, dtype).unwrap();
        let dmods = gpu.alloc_out(&[6, b, c], DType::F32).unwrap();
        let (dx, ones) = (&grads[8], &grads[9]);
        let (width, bits) = one_bits(dtype);
        let scratch = BlockGradAlloc::new(&gpu, dtype, d, dx.ptr(), ones.ptr()).unwrap();
        let mut g = scratch.grads;
        g.dmods = Mods::chunks(dmods.ptr(), 0, b, c);
        g.dp = BlockParams::of(&grads[..8]).unwrap();
        let mut steps = vec![
            Step::Fill {
                ptr: ones.ptr(),
                width,
                count: t,
                bits,
            },
            Step::Copy {
                src: doutd.ptr(),
                dst: dx.ptr(),
                bytes: dx.bytes(),
            },
        ];
        steps.extend(plan_block_backward(gpu.arch(), dtype, d, &p, &m, &ja.bufs, &g).unwrap());
        gpu.run(&steps).unwrap();
        let mut out = vec![
            ja.out.download().unwrap(),
            ja.tout.as_ref().unwrap().download().unwrap(),
            dx.download().unwrap(),
            dmods.download().unwrap(),
        ];
        out.extend(grads[..8].iter().map(|g| g.download().unwrap()));
        out
    };
    let want = run(DType::F32);
    let got = run(DType::BF16);
    let names = [
        "out", "tangent", "dx", "dmods", "dqkv_w", "dqkv_b", "dproj_w", "dproj_b", "dfc1_w",
        "dfc1_b", "dfc2_w", "dfc2_b",
    ];
    for ((name, g), w) in names.iter().zip(&got).zip(&want) {
        check(&format!("block bf16 vs f32 {name}"), g, w, 2e-2);
    }
}

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

// ---------------------------------------------------------------------------------------------
// Without a GPU: one block's f32 launch plans executed by a host emulator of the kernels (the
// contracts of cuda/README.md, in f64), against the CPU ops and against finite differences of
// the emulated forward. This checks the orchestration — addresses, strides of the head and
// modulation permutations, stacking of primal and tangent rows, GEMM transposes, which gradient
// goes where — not the kernels themselves (tests/gpu_ops.rs does that on a GPU).

#[allow(clippy::needless_range_loop)]
mod emulate {
    use std::collections::BTreeMap;

    use flashjvp::cuda::launch::{Arg, Gemm, GemmAct, Launch, Step};

    /// Device memory of f32 elements (held as f64), addressed in bytes.
    #[derive(Clone, Default)]
    pub struct Mem {
        allocs: BTreeMap<u64, Vec<f64>>,
        next: u64,
    }

    impl Mem {
        pub fn alloc(&mut self, n: usize) -> u64 {
            if self.next == 0 {
                self.next = 0x7000_0000;
            }
            let base = self.next;
            // NaN-poisoned, like the device outputs.
            self.allocs.insert(base, vec![f64::NAN; n.max(1)]);
            self.next = (base + 4 * n.max(1) as u64).next_multiple_of(256) + 256;
            base
        }
        pub fn put(&mut self, v: &[f64]) -> u64 {
            let a = self.alloc(v.len());
            self.allocs.get_mut(&a).unwrap()[..v.len()].copy_from_slice(v);
            a
        }
        fn loc(&self, addr: u64) -> (u64, usize) {
            let (&base, v) = self
                .allocs
                .range(..=addr)
                .next_back()
                .unwrap_or_else(|| panic!("address {addr:#x} below every allocation"));
            let i = ((addr - base) / 4) as usize;
            assert!((addr - base) % 4 == 0, "misaligned f32 address {addr:#x}");
            assert!(i < v.len(), "address {addr:#x} past its allocation");
            (base, i)
        }
        pub fn get(&self, addr: u64, i: usize) -> f64 {
            let (b, j) = self.loc(addr + 4 * i as u64);
            self.allocs[&b][j]
        }
        pub fn set(&mut self, addr: u64, i: usize, v: f64) {
            let (b, j) = self.loc(addr + 4 * i as u64);
            self.allocs.get_mut(&b).unwrap()[j] = v;
        }
        pub fn read(&self, addr: u64, n: usize) -> Vec<f64> {
            (0..n).map(|i| self.get(addr, i)).collect()
        }
        /// Zero-or-value of an optional pointer.
        fn opt(&self, addr: u64, i: usize) -> f64 {
            if addr == 0 {
                0.0
            } else {
                self.get(addr, i)
            }
        }

        pub fn run(&mut self, steps: &[Step]) {
            for s in steps {
                match s {
                    Step::Gemm(g) => self.gemm(g),
                    Step::Fill {
                        ptr,
                        width,
                        count,
                        bits,
                    } => {
                        let (n, v) = match width {
                            4 => (*count, f32::from_bits(*bits) as f64),
                            1 => {
                                assert_eq!(*bits, 0);
                                (*count / 4, 0.0)
                            }
                            w => panic!("fill width {w}"),
                        };
                        for i in 0..n {
                            self.set(*ptr, i, v);
                        }
                    }
                    Step::Copy { src, dst, bytes } => {
                        for i in 0..bytes / 4 {
                            let v = self.get(*src, i);
                            self.set(*dst, i, v);
                        }
                    }
                    Step::Kernel(l) => self.kernel(l),
                    Step::ZeroRows { .. } => panic!("the DiT's plans zero no strided rows"),
                }
            }
        }

        fn gemm(&mut self, g: &Gemm) {
            assert_eq!(g.dtype, flashjvp::DType::F32);
            let a = |r: usize, c: usize| {
                if g.trans_a {
                    self.get(g.a, c * g.m + r)
                } else {
                    self.get(g.a, r * g.k + c)
                }
            };
            let b = |r: usize, c: usize| {
                if g.trans_b {
                    self.get(g.b, c * g.k + r)
                } else {
                    self.get(g.b, r * g.n + c)
                }
            };
            let mut out = vec![0.0; g.m * g.n];
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut acc = g.bias.map_or(0.0, |p| self.get(p, j));
                    for l in 0..g.k {
                        acc += a(i, l) * b(l, j);
                    }
                    out[i * g.n + j] = acc;
                }
            }
            // The epilogue (cuBLASLt's GELU / GELU_AUX / DGELU on the product).
            use flashjvp::cpu::activation::{gelu, gelu_grad};
            for (i, v) in out.into_iter().enumerate() {
                let d = match g.act {
                    GemmAct::None => v,
                    GemmAct::Gelu => gelu(v),
                    GemmAct::GeluAux { aux } => {
                        self.set(aux, i, v);
                        gelu(v)
                    }
                    GemmAct::DGelu { aux } => gelu_grad(self.get(aux, i)) * v,
                };
                self.set(g.c, i, d);
            }
        }

        fn kernel(&mut self, l: &Launch) {
            let p = |i: usize| match l.args()[i] {
                Arg::Ptr(v) => v,
                ref a => panic!("{}: argument {i} is {a:?}, not a pointer", l.kernel()),
            };
            let int = |i: usize| match l.args()[i] {
                Arg::I32(v) => v as usize,
                Arg::I64(v) => v as usize,
                ref a => panic!("{}: argument {i} is {a:?}, not an integer", l.kernel()),
            };
            let fl = |i: usize| match l.args()[i] {
                Arg::F32(v) => v as f64,
                ref a => panic!("{}: argument {i} is {a:?}, not a float", l.kernel()),
            };
            let name = l.kernel();
            let gelu_d = |u: f64| {
                let th = (0.7978845608028654 * (u + 0.044715 * u * u * u)).tanh();
                0.5 * (1.0 + th)
                    + 0.5
                        * u
                        * (1.0 - th * th)
                        * 0.7978845608028654
                        * (1.0 + 3.0 * 0.044715 * u * u)
            };
            if name == "dit_permute_f32" {
                let n = int(2);
                let dims: Vec<usize> = (3..9).map(int).collect();
                let strides: Vec<usize> = (9..15).map(int).collect();
                let x = p(0);
                let vals: Vec<f64> = (0..n)
                    .map(|i| {
                        let (mut r, mut off) = (i, 0);
                        for (d, s) in dims.iter().zip(&strides).rev() {
                            off += (r % d) * s;
                            r /= d;
                        }
                        self.get(x, off)
                    })
                    .collect();
                for (i, v) in vals.into_iter().enumerate() {
                    self.set(p(1), i, v);
                }
            } else if name == "dit_add_rows_f32" {
                let (n, per) = (int(2), int(3));
                for i in 0..n {
                    let v = self.get(p(0), i) + self.get(p(1), i % per);
                    self.set(p(0), i, v);
                }
            } else if name.starts_with("layernorm_mod_") {
                self.layernorm(l, name, &p, &int, &fl);
            } else if name.starts_with("residual_layernorm_mod_") {
                // The gated residual into x1 (and tx1), then the layernorm contract on x1, with the
                // arguments the plain layernorm kernel takes at its positions.
                let jvp = name.contains("jvp");
                let n = l.args().len();
                let (t, c, g) = (int(n - 4), int(n - 3), int(n - 2));
                let gi = |i: usize| (i / c) / (t / g) * c + i % c;
                for i in 0..t * c {
                    if jvp {
                        let (gate, y) = (self.get(p(4), gi(i)), self.get(p(2), i));
                        let v = self.get(p(0), i) + gate * y;
                        self.set(p(6), i, v);
                        let tv = self.opt(p(1), i)
                            + self.opt(p(5), gi(i)) * y
                            + gate * self.opt(p(3), i);
                        self.set(p(7), i, tv);
                    } else {
                        let v = self.get(p(0), i) + self.get(p(2), gi(i)) * self.get(p(1), i);
                        self.set(p(3), i, v);
                    }
                }
                let (first, ln_name) = if jvp {
                    (6, "layernorm_mod_jvp_f32")
                } else {
                    (3, "layernorm_mod_fwd_f32")
                };
                let p2 = |i: usize| p(first + i);
                let int2 = |i: usize| int(first + i);
                let fl2 = |i: usize| fl(first + i);
                self.layernorm(l, ln_name, &p2, &int2, &fl2);
            } else if name.starts_with("attention_") {
                self.attention(l, name, &p, &int, &fl);
            } else if name.starts_with("gated_residual_") {
                let (t, c, g) = (
                    int(l.args().len() - 3),
                    int(l.args().len() - 2),
                    int(l.args().len() - 1),
                );
                let gi = |i: usize| (i / c) / (t / g) * c + i % c;
                match name {
                    "gated_residual_fwd_f32" => {
                        for i in 0..t * c {
                            let v = self.get(p(0), i) + self.get(p(2), gi(i)) * self.get(p(1), i);
                            self.set(p(3), i, v);
                        }
                    }
                    "gated_residual_jvp_f32" => {
                        for i in 0..t * c {
                            let (gate, y) = (self.get(p(4), gi(i)), self.get(p(2), i));
                            if p(6) != 0 {
                                let v = self.get(p(0), i) + gate * y;
                                self.set(p(6), i, v);
                            }
                            let tv = self.opt(p(1), i)
                                + self.opt(p(5), gi(i)) * y
                                + gate * self.opt(p(3), i);
                            self.set(p(7), i, tv);
                        }
                    }
                    "gated_residual_bwd_f32" => {
                        for i in 0..t * c {
                            let d = self.get(p(0), i);
                            if p(2) != 0 {
                                self.set(p(2), i, d);
                            }
                            let v = self.get(p(1), gi(i)) * d;
                            self.set(p(3), i, v);
                        }
                    }
                    "gated_residual_bwd_gate_f32" => {
                        for i in 0..t * c {
                            let v = self.get(p(2), gi(i)) + self.get(p(0), i) * self.get(p(1), i);
                            self.set(p(2), gi(i), v);
                        }
                    }
                    _ => panic!("no emulation of {name}"),
                }
            } else if name == "gelu_tangent_f32" || name == "gelu_bwd_f32" {
                for i in 0..int(3) {
                    let v = gelu_d(self.get(p(0), i)) * self.get(p(1), i);
                    self.set(p(2), i, v);
                }
            } else {
                panic!("no emulation of {name}");
            }
        }

        fn layernorm(
            &mut self,
            l: &Launch,
            name: &str,
            p: &dyn Fn(usize) -> u64,
            int: &dyn Fn(usize) -> usize,
            fl: &dyn Fn(usize) -> f64,
        ) {
            let _ = l;
            // The wide kernels (8 register chunks per lane) share the narrow ones' contract.
            let base = name.replace("_wide", "");
            let name = base.as_str();
            let stats = |m: &Mem, x: u64, r: usize, c: usize, eps: f64| {
                let row = m.read(x + (4 * r * c) as u64, c);
                let mu = row.iter().sum::<f64>() / c as f64;
                let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / c as f64;
                (row, mu, 1.0 / (var + eps).sqrt())
            };
            match name {
                "layernorm_mod_fwd_f32" | "layernorm_mod_jvp_f32" => {
                    let jvp = name.contains("jvp");
                    // Argument positions.
                    let (x, tx, sc, sh, tsc, tsh, y, ty, mean, rstd, t, c, g, eps) = if jvp {
                        (
                            p(0),
                            p(1),
                            p(2),
                            p(3),
                            p(4),
                            p(5),
                            p(6),
                            p(7),
                            p(8),
                            p(9),
                            int(10),
                            int(11),
                            int(12),
                            fl(13),
                        )
                    } else {
                        (
                            p(0),
                            0,
                            p(1),
                            p(2),
                            0,
                            0,
                            p(3),
                            0,
                            p(4),
                            p(5),
                            int(6),
                            int(7),
                            int(8),
                            fl(9),
                        )
                    };
                    for r in 0..t {
                        let grp = r / (t / g);
                        let (row, mu, rs) = stats(self, x, r, c, eps);
                        let xh: Vec<f64> = row.iter().map(|v| (v - mu) * rs).collect();
                        if mean != 0 {
                            self.set(mean, r, mu);
                        }
                        if rstd != 0 {
                            self.set(rstd, r, rs);
                        }
                        let (mut mt, mut mxt) = (0.0, 0.0);
                        if jvp && tx != 0 {
                            for (j, xhj) in xh.iter().enumerate() {
                                let v = self.get(tx, r * c + j);
                                mt += v / c as f64;
                                mxt += xhj * v / c as f64;
                            }
                        }
                        for j in 0..c {
                            let s = self.opt(sc, grp * c + j);
                            let out = xh[j] * (1.0 + s) + self.opt(sh, grp * c + j);
                            self.set(y, r * c + j, out);
                            if jvp {
                                let txv = self.opt(tx, r * c + j);
                                let xdot = (txv - mt - xh[j] * mxt) * rs;
                                let tv = xdot * (1.0 + s)
                                    + xh[j] * self.opt(tsc, grp * c + j)
                                    + self.opt(tsh, grp * c + j);
                                self.set(ty, r * c + j, tv);
                            }
                        }
                    }
                }
                "layernorm_mod_bwd_f32" => {
                    let (dy, x, sc, mean, rstd, dres, dx, t, c, g) = (
                        p(0),
                        p(1),
                        p(2),
                        p(3),
                        p(4),
                        p(5),
                        p(6),
                        int(7),
                        int(8),
                        int(9),
                    );
                    for r in 0..t {
                        let grp = r / (t / g);
                        let (mu, rs) = (self.get(mean, r), self.get(rstd, r));
                        let xh: Vec<f64> =
                            (0..c).map(|j| (self.get(x, r * c + j) - mu) * rs).collect();
                        let gv: Vec<f64> = (0..c)
                            .map(|j| self.get(dy, r * c + j) * (1.0 + self.opt(sc, grp * c + j)))
                            .collect();
                        let mg = gv.iter().sum::<f64>() / c as f64;
                        let mgx = gv.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / c as f64;
                        for j in 0..c {
                            let v = self.opt(dres, r * c + j) + (gv[j] - mg - xh[j] * mgx) * rs;
                            self.set(dx, r * c + j, v);
                        }
                    }
                }
                "layernorm_mod_bwd_params_f32" => {
                    let (dy, x, mean, rstd, ds, dh, t, c, g) =
                        (p(0), p(1), p(2), p(3), p(4), p(5), int(6), int(7), int(8));
                    for r in 0..t {
                        let grp = r / (t / g);
                        for j in 0..c {
                            let d = self.get(dy, r * c + j);
                            let xh =
                                (self.get(x, r * c + j) - self.get(mean, r)) * self.get(rstd, r);
                            if ds != 0 {
                                let v = self.get(ds, grp * c + j) + d * xh;
                                self.set(ds, grp * c + j, v);
                            }
                            if dh != 0 {
                                let v = self.get(dh, grp * c + j) + d;
                                self.set(dh, grp * c + j, v);
                            }
                        }
                    }
                }
                _ => panic!("no emulation of {name}"),
            }
        }

        fn attention(
            &mut self,
            l: &Launch,
            name: &str,
            p: &dyn Fn(usize) -> u64,
            int: &dyn Fn(usize) -> usize,
            fl: &dyn Fn(usize) -> f64,
        ) {
            let bh = l.grid().1 as usize;
            let d: usize = name.rsplit("_d").next().unwrap().parse().unwrap_or(0);
            if name == "attention_bwd_preprocess_f32" {
                // (o, dout, delta, rows, dv, Nq, H, o strides): row r = (b·H + h)·Nq + n.
                let (rows, dd, nq, heads) = (int(3), int(4), int(5), int(6));
                let (sb, sh, sn) = (int(7), int(8), int(9));
                for r in 0..rows {
                    let (bh, row) = (r / nq, r % nq);
                    let off = (bh / heads) * sb + (bh % heads) * sh + row * sn;
                    let v = (0..dd)
                        .map(|j| self.get(p(0), off + j) * self.get(p(1), off + j))
                        .sum();
                    self.set(p(2), r, v);
                }
                return;
            }
            let (jvp, fwd) = (
                name.starts_with("attention_jvp_f32"),
                name.starts_with("attention_fwd"),
            );
            let bwd = name.starts_with("attention_bwd");
            // Every attention kernel but the preprocess ends with Nq, Nk, scale, H and the [B, H, N, d]
            // strides of q, k, v, o (tangents and gradients in their primal's), honoured below.
            let n = l.args().len();
            let (nq, nk, c) = (int(n - 16), int(n - 15), fl(n - 14));
            let heads = int(n - 13);
            let stride = |t: usize| -> [usize; 3] {
                [
                    int(n - 12 + 3 * t),
                    int(n - 11 + 3 * t),
                    int(n - 10 + 3 * t),
                ]
            };
            let (qs, ks, vs, os) = (stride(0), stride(1), stride(2), stride(3));
            // Element offset of row `row` of head `bh` (= b*H + h) of an operand with strides `s`.
            let at = |s: [usize; 3], bh: usize, row: usize| {
                (bh / heads) * s[0] + (bh % heads) * s[1] + row * s[2]
            };
            let (q, k, v) = (p(0), p(1), p(2));
            for h in 0..bh {
                let dot = |m: &Mem, a: u64, ai: usize, b: u64, bi: usize| {
                    (0..d)
                        .map(|e| m.get(a, ai + e) * m.get(b, bi + e))
                        .sum::<f64>()
                };
                for i in 0..nq {
                    if bwd {
                        continue;
                    }
                    let s: Vec<f64> = (0..nk)
                        .map(|j| c * dot(self, q, at(qs, h, i), k, at(ks, h, j)))
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = e.iter().sum();
                    let pr: Vec<f64> = e.iter().map(|x| x / z).collect();
                    let o: Vec<f64> = (0..d)
                        .map(|a| (0..nk).map(|j| pr[j] * self.get(v, at(vs, h, j) + a)).sum())
                        .collect();
                    let (op, lp) = if fwd { (p(3), p(4)) } else { (p(6), p(8)) };
                    for (a, ov) in o.iter().enumerate() {
                        self.set(op, at(os, h, i) + a, *ov);
                    }
                    self.set(lp, h * nq + i, mx + z.ln());
                    if jvp {
                        let (tq, tk, tv, to, tl) = (p(3), p(4), p(5), p(7), p(9));
                        let sd: Vec<f64> = (0..nk)
                            .map(|j| {
                                c * (dot(self, tq, at(qs, h, i), k, at(ks, h, j))
                                    + dot(self, q, at(qs, h, i), tk, at(ks, h, j)))
                            })
                            .collect();
                        let mu: f64 = (0..nk).map(|j| pr[j] * sd[j]).sum();
                        for a in 0..d {
                            let t: f64 = (0..nk)
                                .map(|j| {
                                    pr[j]
                                        * (self.get(tv, at(vs, h, j) + a)
                                            + sd[j] * self.get(v, at(vs, h, j) + a))
                                })
                                .sum();
                            self.set(to, at(os, h, i) + a, t - mu * o[a]);
                        }
                        self.set(tl, h * nq + i, mu);
                    }
                }
                if bwd {
                    let (dout, lse, delta) = (p(3), p(4), p(5));
                    let pm = |m: &Mem, i: usize, j: usize| {
                        (c * dot(m, q, at(qs, h, i), k, at(ks, h, j)) - m.get(lse, h * nq + i))
                            .exp()
                    };
                    let ds = |m: &Mem, i: usize, j: usize| {
                        let dp = dot(m, dout, at(os, h, i), v, at(vs, h, j));
                        pm(m, i, j) * (dp - m.get(delta, h * nq + i))
                    };
                    if name.contains("dkdv") {
                        let (dk, dv) = (p(6), p(7));
                        for j in 0..nk {
                            for a in 0..d {
                                let kv: f64 = (0..nq)
                                    .map(|i| c * ds(self, i, j) * self.get(q, at(qs, h, i) + a))
                                    .sum();
                                let vv: f64 = (0..nq)
                                    .map(|i| pm(self, i, j) * self.get(dout, at(os, h, i) + a))
                                    .sum();
                                self.set(dk, at(ks, h, j) + a, kv);
                                self.set(dv, at(vs, h, j) + a, vv);
                            }
                        }
                    } else {
                        let dq = p(6);
                        for i in 0..nq {
                            for a in 0..d {
                                let qv: f64 = (0..nk)
                                    .map(|j| c * ds(self, i, j) * self.get(k, at(ks, h, j) + a))
                                    .sum();
                                self.set(dq, at(qs, h, i) + a, qv);
                            }
                        }
                    }
                }
            }
        }
    }
}

mod emulated_block {
    use super::common::{rel_err, rng};
    use super::emulate::Mem;
    use flashjvp::dit::gpu::{
        moves, plan_block_backward, plan_block_forward, BlockBufs, BlockDims, BlockGrads,
        BlockParams, BlockTangents, Mods,
    };
    use flashjvp::ops::{self, Mlp};
    use flashjvp::{DType, Tensor};
    use rand::rngs::StdRng;
    use rand_distr::{Distribution, StandardNormal};

    const D: BlockDims = BlockDims {
        b: 2,
        n: 5,
        c: 64,
        heads: 2,
        hd: 128,
    };

    fn randv(n: usize, s: f64, r: &mut StdRng) -> Vec<f64> {
        (0..n)
            .map(|_| s * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, r))
            .collect()
    }

    /// Inputs of a block: weights (8), modulation [6, B, C], x [T, C].
    #[derive(Clone)]
    struct Inputs {
        w: Vec<Vec<f64>>,
        mods: Vec<f64>,
        x: Vec<f64>,
    }

    fn shapes() -> Vec<Vec<usize>> {
        BlockParams::shapes(D.c, D.hd).to_vec()
    }

    /// Tangent buffers of one block, the input tangent at `x` (0: none).
    fn tangent_bufs(mem: &mut Mem, x: u64) -> BlockTangents {
        let (tn, c) = (D.t(), D.c);
        BlockTangents {
            x,
            qkv: mem.alloc(3 * tn * c),
            lse: mem.alloc(D.b * D.heads * D.n),
            o_rows: mem.alloc(tn * c),
            attn_out: mem.alloc(tn * c),
            x1: mem.alloc(tn * c),
            mlp_out: mem.alloc(tn * c),
            out: mem.alloc(tn * c),
        }
    }

    fn random_inputs(r: &mut StdRng) -> Inputs {
        let w = shapes()
            .iter()
            .map(|s| {
                let fan = if s.len() == 2 { s[1] } else { 4 };
                randv(s.iter().product(), 1.0 / (fan as f64).sqrt(), r)
            })
            .collect();
        Inputs {
            w,
            mods: randv(6 * D.b * D.c, 0.3, r),
            x: randv(D.t() * D.c, 1.0, r),
        }
    }

    fn axpy(a: &Inputs, h: f64, v: &Inputs) -> Inputs {
        let f = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(p, q)| p + h * q).collect();
        Inputs {
            w: a.w.iter().zip(&v.w).map(|(x, y)| f(x, y)).collect(),
            mods: f(&a.mods, &v.mods),
            x: f(&a.x, &v.x),
        }
    }

    struct Placed {
        p: BlockParams,
        m: Mods,
        a: BlockBufs,
    }

    /// Puts the inputs in memory and allocates the block's buffers (dual: stacked rows).
    fn place(mem: &mut Mem, inp: &Inputs, dual: bool) -> Placed {
        let w: Vec<u64> = inp.w.iter().map(|v| mem.put(v)).collect();
        let p = BlockParams {
            qkv_w: w[0],
            qkv_b: w[1],
            proj_w: w[2],
            proj_b: w[3],
            fc1_w: w[4],
            fc1_b: w[5],
            fc2_w: w[6],
            fc2_b: w[7],
        };
        let m = Mods::chunks(mem.put(&inp.mods), 0, D.b, D.c);
        let (t, c, hd) = (D.t(), D.c, D.hd);
        let k = if dual { 2 } else { 1 };
        let a = BlockBufs {
            x: mem.put(&inp.x),
            mean1: mem.alloc(t),
            rstd1: mem.alloc(t),
            h1: mem.alloc(k * t * c),
            qkv: mem.alloc(3 * t * c),
            lse: mem.alloc(D.b * D.heads * D.n),
            o_rows: mem.alloc(t * c),
            attn_out: mem.alloc(t * c),
            x1: mem.alloc(t * c),
            mean2: mem.alloc(t),
            rstd2: mem.alloc(t),
            h2: mem.alloc(k * t * c),
            pre: mem.alloc(k * t * hd),
            g: mem.alloc(t * hd),
            mlp_out: mem.alloc(t * c),
            out: mem.alloc(t * c),
        };
        Placed { p, m, a }
    }

    fn emulated_forward(inp: &Inputs) -> Vec<f64> {
        let mut mem = Mem::default();
        let pl = place(&mut mem, inp, false);
        mem.run(
            &plan_block_forward("sm_80", DType::F32, D, &pl.p, &pl.m, None, &pl.a, None).unwrap(),
        );
        mem.read(pl.a.out, D.t() * D.c)
    }

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape).unwrap()
    }

    /// The block from the CPU ops (f64), as pass.rs composes it.
    fn cpu_forward(inp: &Inputs) -> Vec<f64> {
        let (b, n, c, h) = (D.b, D.n, D.c, D.heads);
        let dh = c / h;
        let tc = [D.t(), c];
        let s = shapes();
        let w: Vec<Tensor> = inp.w.iter().zip(&s).map(|(v, sh)| t(v, sh)).collect();
        let md = |j: usize| t(&inp.mods[j * b * c..(j + 1) * b * c], &[b, c]);
        let x = t(&inp.x, &tc);
        let h1 = ops::layernorm_mod_forward(&x, &md(1), &md(0), 1e-6).unwrap();
        let qkv = ops::linear_forward(&h1, &w[0], Some(&w[1])).unwrap();
        let (dims, strides) = moves::split_qkv(b, n, h, dh);
        let heads = moves::apply(&qkv.to_f64_vec(), &dims, &strides);
        let part = b * h * n * dh;
        let hq = |j: usize| t(&heads[j * part..(j + 1) * part], &[b, h, n, dh]);
        let o = ops::attention_forward(&hq(0), &hq(1), &hq(2), None)
            .unwrap()
            .o;
        let (dims, strides) = moves::merge_heads(b, n, h, dh);
        let orows = t(&moves::apply(&o.to_f64_vec(), &dims, &strides), &tc);
        let attn = ops::linear_forward(&orows, &w[2], Some(&w[3])).unwrap();
        let x1 = ops::gated_residual_forward(&x, &md(2), &attn).unwrap();
        let h2 = ops::layernorm_mod_forward(&x1, &md(4), &md(3), 1e-6).unwrap();
        let mlp = Mlp {
            w1: &w[4],
            b1: &w[5],
            w2: &w[6],
            b2: &w[7],
        };
        let y = ops::mlp_forward(&h2, &mlp).unwrap();
        ops::gated_residual_forward(&x1, &md(5), &y)
            .unwrap()
            .to_f64_vec()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn block_forward_plan_computes_the_cpu_block() {
        let mut r = rng(21);
        let inp = random_inputs(&mut r);
        let got = emulated_forward(&inp);
        let want = cpu_forward(&inp);
        let err = rel_err(&got, &want);
        eprintln!("emulated block forward vs CPU ops: rel {err:.2e}");
        assert!(err < 1e-8, "{err}");
    }

    #[test]
    fn block_dual_plan_tangent_matches_finite_differences() {
        let mut r = rng(22);
        let inp = random_inputs(&mut r);
        for (on_x, on_mods) in [(true, true), (true, false), (false, true)] {
            let mut dir = random_inputs(&mut r);
            dir.w.iter_mut().for_each(|w| w.fill(0.0));
            if !on_x {
                dir.x.fill(0.0);
            }
            if !on_mods {
                dir.mods.fill(0.0);
            }
            let mut mem = Mem::default();
            let pl = place(&mut mem, &inp, true);
            let (tn, c) = (D.t(), D.c);
            let tmods = on_mods.then(|| Mods::chunks(mem.put(&dir.mods), 0, D.b, D.c));
            let tx = if on_x { mem.put(&dir.x) } else { 0 };
            let tb = tangent_bufs(&mut mem, tx);
            let plan = plan_block_forward(
                "sm_80",
                DType::F32,
                D,
                &pl.p,
                &pl.m,
                tmods.as_ref(),
                &pl.a,
                Some(&tb),
            )
            .unwrap();
            mem.run(&plan);
            let primal = mem.read(pl.a.out, tn * c);
            let tangent = mem.read(tb.out, tn * c);
            assert!(rel_err(&primal, &emulated_forward(&inp)) < 1e-13);
            let h = 1e-5;
            let fp = emulated_forward(&axpy(&inp, h, &dir));
            let fm = emulated_forward(&axpy(&inp, -h, &dir));
            let fd: Vec<f64> = fp
                .iter()
                .zip(&fm)
                .map(|(a, b)| (a - b) / (2.0 * h))
                .collect();
            let err = rel_err(&tangent, &fd);
            eprintln!(
                "emulated block tangent (x {on_x}, mods {on_mods}) vs differences: rel {err:.2e}"
            );
            assert!(err < 1e-7, "{err}");
        }
    }

    #[test]
    fn block_backward_plan_is_the_adjoint_of_the_forward() {
        let mut r = rng(23);
        let inp = random_inputs(&mut r);
        for from_dual in [false, true] {
            let mut mem = Mem::default();
            let pl = place(&mut mem, &inp, from_dual);
            let (tn, c, hd) = (D.t(), D.c, D.hd);
            if from_dual {
                // The dual forward's primal buffers serve the backward as a forward's do.
                let dir = random_inputs(&mut r);
                let tx = mem.put(&dir.x);
                let tb = tangent_bufs(&mut mem, tx);
                let tm = Mods::chunks(mem.put(&dir.mods), 0, D.b, D.c);
                mem.run(
                    &plan_block_forward(
                        "sm_80",
                        DType::F32,
                        D,
                        &pl.p,
                        &pl.m,
                        Some(&tm),
                        &pl.a,
                        Some(&tb),
                    )
                    .unwrap(),
                );
            } else {
                mem.run(
                    &plan_block_forward("sm_80", DType::F32, D, &pl.p, &pl.m, None, &pl.a, None)
                        .unwrap(),
                );
            }
            let gout = randv(tn * c, 1.0, &mut r);
            let gw: Vec<u64> = shapes()
                .iter()
                .map(|s| mem.alloc(s.iter().product()))
                .collect();
            let ones = mem.put(&vec![1.0; tn]);
            let g = BlockGrads {
                dx: mem.put(&gout),
                dy: mem.alloc(tn * c),
                dh: mem.alloc(tn * c),
                dg: mem.alloc(tn * hd),
                do_rows: mem.alloc(tn * c),
                dqkv: mem.alloc(3 * tn * c),
                delta: mem.alloc(D.b * D.heads * D.n),
                ones,
                dmods: Mods::chunks(mem.alloc(6 * D.b * c), 0, D.b, D.c),
                dp: BlockParams {
                    qkv_w: gw[0],
                    qkv_b: gw[1],
                    proj_w: gw[2],
                    proj_b: gw[3],
                    fc1_w: gw[4],
                    fc1_b: gw[5],
                    fc2_w: gw[6],
                    fc2_b: gw[7],
                },
            };
            mem.run(&plan_block_backward("sm_80", DType::F32, D, &pl.p, &pl.m, &pl.a, &g).unwrap());
            let dx = mem.read(g.dx, tn * c);
            let dmods = mem.read(g.dmods.shift1, 6 * D.b * c);
            let dw: Vec<Vec<f64>> = gw
                .iter()
                .zip(shapes())
                .map(|(&a, s)| mem.read(a, s.iter().product()))
                .collect();
            // ⟨gout, f(inp + h v) − f(inp − h v)⟩ / 2h against ⟨grads, v⟩, v over everything.
            let v = random_inputs(&mut r);
            let h = 1e-5;
            let fp = emulated_forward(&axpy(&inp, h, &v));
            let fm = emulated_forward(&axpy(&inp, -h, &v));
            let fd = (dot(&gout, &fp) - dot(&gout, &fm)) / (2.0 * h);
            let mut adj = dot(&dx, &v.x) + dot(&dmods, &v.mods);
            for (a, b) in dw.iter().zip(&v.w) {
                adj += dot(a, b);
            }
            let err = (adj - fd).abs() / fd.abs();
            eprintln!("emulated block backward (dual cache {from_dual}): <grads, v> {adj:.9e}, differences {fd:.9e}, rel {err:.2e}");
            assert!(err < 1e-7, "{err}");
            // Each gradient on its own, along its own direction (a swapped pair would cancel
            // nothing here).
            for (i, (a, b)) in dw.iter().zip(&v.w).enumerate() {
                let mut only = v.clone();
                only.x.fill(0.0);
                only.mods.fill(0.0);
                for (j, w) in only.w.iter_mut().enumerate() {
                    if j != i {
                        w.fill(0.0);
                    }
                }
                let fp = emulated_forward(&axpy(&inp, h, &only));
                let fm = emulated_forward(&axpy(&inp, -h, &only));
                let fd = (dot(&gout, &fp) - dot(&gout, &fm)) / (2.0 * h);
                let e = (dot(a, b) - fd).abs() / fd.abs().max(1e-12);
                assert!(e < 1e-6, "weight gradient {i}: rel {e:.2e}");
            }
            for j in 0..6 {
                let mut only = v.clone();
                only.x.fill(0.0);
                only.w.iter_mut().for_each(|w| w.fill(0.0));
                let n = D.b * c;
                for (k, m) in only.mods.iter_mut().enumerate() {
                    if k / n != j {
                        *m = 0.0;
                    }
                }
                let fp = emulated_forward(&axpy(&inp, h, &only));
                let fm = emulated_forward(&axpy(&inp, -h, &only));
                let fd = (dot(&gout, &fp) - dot(&gout, &fm)) / (2.0 * h);
                let e = (dot(&dmods[j * n..(j + 1) * n], &only.mods[j * n..(j + 1) * n]) - fd)
                    .abs()
                    / fd.abs().max(1e-12);
                assert!(e < 1e-6, "modulation gradient {j}: rel {e:.2e}");
            }
        }
    }
}
