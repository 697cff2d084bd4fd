//! The DiT: its dual forward against central finite differences (tangents on x and t), its backward
//! against parameter finite differences through the adjoint identity, the dual forward's cache
//! serving the backward exactly as the plain forward's, save/load, and bad inputs.
//! Every parameter is randomised first: adaLN-zero init would zero most paths.

mod common;

use common::*;
use flashjvp::dit::{Dit, DitConfig};
use flashjvp::{DType, Dual, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

fn tiny() -> DitConfig {
    DitConfig {
        image_size: 4,
        in_channels: 2,
        patch: 2,
        hidden: 8,
        depth: 2,
        heads: 2,
        mlp_ratio: 2,
        num_classes: 3,
        freq_dim: 8,
        time_scale: 2.0,
    }
}

fn random_dit(config: DitConfig, rng: &mut StdRng) -> Dit {
    let mut dit = Dit::new(config, DType::F64, rng).unwrap();
    dit.randomize_for_tests(rng, 1.0).unwrap();
    dit
}

/// x [B, C, S, S], t [B] in (0.2, 1.4), classes including the null class.
fn inputs(c: &DitConfig, b: usize, rng: &mut StdRng) -> (Tensor, Tensor, Vec<usize>) {
    let x = randn(&[b, c.in_channels, c.image_size, c.image_size], rng);
    let t: Vec<f64> = (0..b).map(|_| rng.random_range(0.2..1.4)).collect();
    let class = (0..b).map(|i| i % (c.num_classes + 1)).collect();
    (x, Tensor::from_vec(t, &[b]).unwrap(), class)
}

/// Checks forward_dual's tangent against central differences, moving x and t along the given
/// directions (None: that input stays put and carries no tangent).
fn check_dual(tx: Option<Tensor>, tt: Option<Tensor>, seed: u64) {
    let mut rng = rng(seed);
    let c = tiny();
    let dit = random_dit(c.clone(), &mut rng);
    let (x, t, class) = inputs(&c, 3, &mut rng);
    let dx = Dual {
        primal: x.clone(),
        tangent: tx.clone(),
    };
    let dt = Dual {
        primal: t.clone(),
        tangent: tt.clone(),
    };
    let (y, _) = dit.forward_dual(&dx, &dt, &class).unwrap();
    let got = y.tangent.expect("a tangent flows in, so one flows out");
    let zx = Tensor::zeros(x.shape(), DType::F64);
    let zt = Tensor::zeros(t.shape(), DType::F64);
    let fd = central_difference(
        |h| {
            let xs = axpy(&x, h, tx.as_ref().unwrap_or(&zx));
            let ts = axpy(&t, h, tt.as_ref().unwrap_or(&zt));
            vec![dit.forward(&xs, &ts, &class).unwrap()]
        },
        1e-5,
    );
    assert_close("dit tangent", &got.to_f64_vec(), &fd[0], 1e-6);
}

#[test]
fn dual_tangent_matches_finite_differences_x_and_t() {
    let mut r = rng(1);
    let c = tiny();
    let tx = randn(&[3, c.in_channels, c.image_size, c.image_size], &mut r);
    let tt = randn(&[3], &mut r);
    check_dual(Some(tx), Some(tt), 11);
}

#[test]
fn dual_tangent_matches_finite_differences_t_only() {
    let mut r = rng(2);
    check_dual(None, Some(randn(&[3], &mut r)), 12);
}

#[test]
fn dual_tangent_matches_finite_differences_x_only() {
    let mut r = rng(3);
    let c = tiny();
    let tx = randn(&[3, c.in_channels, c.image_size, c.image_size], &mut r);
    check_dual(Some(tx), None, 13);
}

#[test]
fn no_tangent_in_means_no_tangent_out() {
    let mut rng = rng(4);
    let c = tiny();
    let dit = random_dit(c.clone(), &mut rng);
    let (x, t, class) = inputs(&c, 2, &mut rng);
    let (y, _) = dit
        .forward_dual(
            &Dual::constant(x.clone()),
            &Dual::constant(t.clone()),
            &class,
        )
        .unwrap();
    assert!(y.tangent.is_none());
    assert_eq!(y.primal, dit.forward(&x, &t, &class).unwrap());
}

#[test]
fn dual_primal_equals_forward_and_its_cache_gives_the_same_gradients() {
    let mut rng = rng(5);
    let c = tiny();
    let dit = random_dit(c.clone(), &mut rng);
    let (x, t, class) = inputs(&c, 3, &mut rng);
    let tx = randn(x.shape(), &mut rng);
    let tt = randn(t.shape(), &mut rng);
    let (y_dual, cache_dual) = dit
        .forward_dual(
            &Dual::new(x.clone(), tx).unwrap(),
            &Dual::new(t.clone(), tt).unwrap(),
            &class,
        )
        .unwrap();
    let (y, cache) = dit.forward_train(&x, &t, &class).unwrap();
    assert_eq!(y_dual.primal, y, "the dual forward's primal is the forward");
    let gout = randn(y.shape(), &mut rng);
    let g_dual = dit.backward(&cache_dual, &gout).unwrap();
    let g = dit.backward(&cache, &gout).unwrap();
    assert_eq!(g.len(), Dit::param_layout(&c).unwrap().len());
    let layout = Dit::param_layout(&c).unwrap();
    for ((a, b), (name, shape)) in g_dual.iter().zip(&g).zip(&layout) {
        assert_eq!(a.shape(), shape.as_slice(), "{name}");
        assert_eq!(a, b, "gradient of {name} differs between the two caches");
    }
}

/// For each parameter tensor alone: ⟨gout, (F(θ+hV) − F(θ−hV))/2h⟩ = ⟨∂L/∂θ, V⟩.
#[test]
fn backward_matches_parameter_finite_differences() {
    let mut rng = rng(6);
    let c = tiny();
    let dit = random_dit(c.clone(), &mut rng);
    let (x, t, class) = inputs(&c, 3, &mut rng);
    let (y, cache) = dit.forward_train(&x, &t, &class).unwrap();
    let gout = randn(y.shape(), &mut rng);
    let grads = dit.backward(&cache, &gout).unwrap();
    for (i, (name, shape)) in Dit::param_layout(&c).unwrap().iter().enumerate() {
        let v = randn(shape, &mut rng);
        let fd = central_difference(
            |h| {
                let mut moved = dit.clone();
                moved.params_mut()[i] = axpy(&dit.params()[i], h, &v);
                vec![moved.forward(&x, &t, &class).unwrap()]
            },
            1e-5,
        );
        let lhs: f64 = gout
            .to_f64_vec()
            .iter()
            .zip(&fd[0])
            .map(|(a, b)| a * b)
            .sum();
        let rhs = dot(&grads[i], &v);
        assert_adjoint(&format!("d/d {name}"), lhs, rhs, 1e-6);
    }
}

#[test]
fn fresh_network_is_adaln_zero() {
    let mut rng = rng(7);
    let c = tiny();
    let dit = Dit::new(c.clone(), DType::F64, &mut rng).unwrap();
    let (x, t, class) = inputs(&c, 2, &mut rng);
    let (y, cache) = dit.forward_train(&x, &t, &class).unwrap();
    assert!(y.to_f64_vec().iter().all(|&v| v == 0.0));
    // Only the final linear (and, through its zero weights, nothing upstream) gets a gradient.
    let grads = dit.backward(&cache, &randn(y.shape(), &mut rng)).unwrap();
    for ((name, _), g) in Dit::param_layout(&c).unwrap().iter().zip(&grads) {
        let nonzero = g.to_f64_vec().iter().any(|&v| v != 0.0);
        let expect = name.starts_with("final_layer.linear");
        assert_eq!(nonzero, expect, "{name}");
    }
    // Xavier-initialised weights are random, not zero.
    let layout = Dit::param_layout(&c).unwrap();
    let qkv = layout
        .iter()
        .position(|(n, _)| n == "blocks.0.attn.qkv.weight")
        .unwrap();
    assert!(dit.params()[qkv].to_f64_vec().iter().all(|&v| v != 0.0));
}

#[test]
fn f32_forward_agrees_with_f64() {
    let mut rng = rng(8);
    let c = tiny();
    let dit = random_dit(c.clone(), &mut rng);
    let params32: Vec<Tensor> = dit
        .params()
        .iter()
        .map(|p| p.to_dtype(DType::F32))
        .collect();
    let dit32 = Dit::from_params(c.clone(), params32).unwrap();
    assert_eq!(dit32.dtype(), DType::F32);
    let (x, t, class) = inputs(&c, 3, &mut rng);
    let y = dit.forward(&x, &t, &class).unwrap();
    let y32 = dit32
        .forward(&x.to_dtype(DType::F32), &t.to_dtype(DType::F32), &class)
        .unwrap();
    assert_eq!(y32.dtype(), DType::F32);
    assert_close("f32 forward", &y32.to_f64_vec(), &y.to_f64_vec(), 1e-4);
}

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "flashjvp-dit-{}-{name}.safetensors",
        std::process::id()
    ))
}

#[test]
fn save_load_round_trip() {
    let mut rng = rng(9);
    let c = tiny();
    let dit = random_dit(c.clone(), &mut rng);
    let path = temp_path("round-trip");
    dit.save(&path).unwrap();
    let back = Dit::load(c.clone(), &path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(back.params(), dit.params());
    let (x, t, class) = inputs(&c, 2, &mut rng);
    assert_eq!(
        back.forward(&x, &t, &class).unwrap(),
        dit.forward(&x, &t, &class).unwrap()
    );
}

#[test]
fn load_errors_name_the_tensor() {
    let mut rng = rng(10);
    let c = tiny();
    let dit = random_dit(c.clone(), &mut rng);
    let layout = Dit::param_layout(&c).unwrap();
    let write = |path: &std::path::Path, tensors: Vec<(String, Tensor)>| {
        flashjvp::io::save_safetensors(path, tensors.iter().map(|(n, t)| (n.as_str(), t))).unwrap();
    };
    let named = || -> Vec<(String, Tensor)> {
        layout
            .iter()
            .map(|(n, _)| n.clone())
            .zip(dit.params().iter().cloned())
            .collect()
    };

    // A wrong shape.
    let mut tensors = named();
    let i = layout
        .iter()
        .position(|(n, _)| n == "blocks.1.attn.proj.weight")
        .unwrap();
    tensors[i].1 = randn(&[8, 4], &mut rng);
    let path = temp_path("bad-shape");
    write(&path, tensors);
    let err = Dit::load(c.clone(), &path).unwrap_err().to_string();
    assert!(
        err.contains("blocks.1.attn.proj.weight") && err.contains("[8, 4]"),
        "{err}"
    );

    // A missing tensor.
    let mut tensors = named();
    tensors.retain(|(n, _)| n != "final_layer.linear.bias");
    write(&path, tensors);
    let err = Dit::load(c.clone(), &path).unwrap_err().to_string();
    assert!(err.contains("final_layer.linear.bias"), "{err}");

    // A config with more blocks than the file.
    let deeper = DitConfig {
        depth: 3,
        ..c.clone()
    };
    dit.save(&path).unwrap();
    let err = Dit::load(deeper, &path).unwrap_err().to_string();
    assert!(err.contains("blocks.2."), "{err}");

    // A file from a deeper network: its extra tensors are named.
    let shallower = DitConfig {
        depth: 1,
        ..c.clone()
    };
    let err = Dit::load(shallower, &path).unwrap_err().to_string();
    assert!(err.contains("blocks.1."), "{err}");

    // Mixed dtypes.
    let mut tensors = named();
    tensors[0].1 = tensors[0].1.to_dtype(DType::F32);
    write(&path, tensors);
    let err = Dit::load(c.clone(), &path).unwrap_err().to_string();
    assert!(err.contains("dtype"), "{err}");

    std::fs::remove_file(&path).unwrap();
    let err = Dit::load(c, &path).unwrap_err().to_string();
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn bad_configs_are_errors() {
    let mut rng = rng(11);
    let bad = [
        DitConfig {
            hidden: 12,
            heads: 5,
            ..tiny()
        },
        DitConfig {
            image_size: 5,
            ..tiny()
        },
        DitConfig {
            hidden: 6,
            heads: 2,
            ..tiny()
        },
        DitConfig {
            freq_dim: 7,
            ..tiny()
        },
        DitConfig { patch: 0, ..tiny() },
        DitConfig { heads: 0, ..tiny() },
        DitConfig {
            time_scale: f64::NAN,
            ..tiny()
        },
    ];
    for c in bad {
        let err = Dit::new(c.clone(), DType::F64, &mut rng);
        assert!(err.is_err(), "{c:?} was accepted");
        assert!(Dit::validate_config(&c).is_err());
    }
    let err = Dit::new(tiny(), DType::BF16, &mut rng)
        .unwrap_err()
        .to_string();
    assert!(err.contains("bf16"), "{err}");
}

#[test]
fn bad_inputs_are_errors() {
    let mut rng = rng(12);
    let c = tiny();
    let dit = random_dit(c.clone(), &mut rng);
    let (x, t, class) = inputs(&c, 3, &mut rng);
    let msg = |r: flashjvp::Result<Tensor>| r.unwrap_err().to_string();

    let x_bad = randn(&[3, c.in_channels, 4, 2], &mut rng);
    assert!(msg(dit.forward(&x_bad, &t, &class)).contains("`x`"));
    let x_rank = randn(&[3, 32], &mut rng);
    assert!(msg(dit.forward(&x_rank, &t, &class)).contains("`x`"));
    let x_empty = Tensor::zeros(&[0, c.in_channels, 4, 4], DType::F64);
    assert!(msg(dit.forward(&x_empty, &t, &class)).contains("`x`"));
    let t_bad = randn(&[2], &mut rng);
    assert!(msg(dit.forward(&x, &t_bad, &class)).contains("`t`"));
    let e = msg(dit.forward(&x, &t, &[0, 1, 4]));
    assert!(e.contains("class[2] = 4"), "{e}");
    let e = msg(dit.forward(&x, &t, &[0, 1]));
    assert!(e.contains("2 class indices"), "{e}");
    let e = msg(dit.forward(&x.to_dtype(DType::F32), &t, &class));
    assert!(e.contains("`x`") && e.contains("f32"), "{e}");
    let e = msg(dit.forward(&x, &t.to_dtype(DType::F32), &class));
    assert!(e.contains("`t`") && e.contains("f32"), "{e}");

    // A tangent that does not match its primal.
    let tx = Dual {
        primal: x.clone(),
        tangent: Some(randn(&[3, c.in_channels, 4, 5], &mut rng)),
    };
    let e = dit
        .forward_dual(&tx, &Dual::constant(t.clone()), &class)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tangent of `x`"), "{e}");

    // A gradient of the wrong shape or dtype.
    let (y, cache) = dit.forward_train(&x, &t, &class).unwrap();
    let e = dit
        .backward(&cache, &randn(&[2, c.in_channels, 4, 4], &mut rng))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`gout`"), "{e}");
    let e = dit
        .backward(&cache, &y.to_dtype(DType::F32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`gout`"), "{e}");

    // A cache from a network of another depth.
    let other = random_dit(DitConfig { depth: 1, ..c }, &mut rng);
    let e = other.backward(&cache, &y).unwrap_err().to_string();
    assert!(e.contains("another network"), "{e}");

    // A parameter replaced with a wrong shape through params_mut.
    let mut broken = dit.clone();
    broken.params_mut()[3] = randn(&[5], &mut rng);
    let e = msg(broken.forward(&x, &t, &class));
    assert!(e.contains("t_embedder.mlp.0.bias"), "{e}");
}

#[test]
fn a_cache_of_another_network_or_generation_is_refused() {
    let mut rng = rng(13);
    // Net A with 20 classes, net B with 10: A's cache holds class indices B's table lacks (this
    // panicked in the class-table gradient).
    let a = random_dit(
        DitConfig {
            num_classes: 20,
            ..tiny()
        },
        &mut rng,
    );
    let b = random_dit(
        DitConfig {
            num_classes: 10,
            ..tiny()
        },
        &mut rng,
    );
    let c = a.config().clone();
    let (x, t, _) = inputs(&c, 2, &mut rng);
    let (y, cache) = a.forward_train(&x, &t, &[19, 20]).unwrap();
    let e = b.backward(&cache, &y).unwrap_err().to_string();
    assert!(e.contains("another network"), "{e}");

    // The same config, other weights: the gradient would mix A's activations with B's weights.
    let b = random_dit(c.clone(), &mut rng);
    let e = b.backward(&cache, &y).unwrap_err().to_string();
    assert!(e.contains("generation"), "{e}");

    // A clone holds the same values: its backward takes the cache and agrees.
    let a2 = a.clone();
    assert_eq!(a2.generation(), cache.generation());
    assert_eq!(
        a2.backward(&cache, &y).unwrap(),
        a.backward(&cache, &y).unwrap()
    );

    // Parameters changed since the forward (params_mut hands them out): refused.
    let mut a3 = a.clone();
    let _ = a3.params_mut();
    let e = a3.backward(&cache, &y).unwrap_err().to_string();
    assert!(e.contains("generation"), "{e}");
    let (_, fresh) = a3.forward_train(&x, &t, &[0, 1]).unwrap();
    assert!(a3.backward(&fresh, &y).is_ok());
}

#[test]
fn configs_out_of_bounds_are_errors_everywhere() {
    let mut rng = rng(14);
    // Sizes whose shapes would overflow (or whose layout would not fit in memory): the public
    // layout refuses them as `new` does, instead of overflowing or aborting.
    for c in [
        DitConfig {
            depth: usize::MAX / 4,
            ..tiny()
        },
        DitConfig {
            hidden: usize::MAX / 2 + 1,
            heads: 1,
            ..tiny()
        },
        DitConfig {
            patch: 1 << 40,
            image_size: 1 << 40,
            ..tiny()
        },
        DitConfig {
            in_channels: usize::MAX / 3,
            ..tiny()
        },
        DitConfig {
            mlp_ratio: usize::MAX / 7,
            ..tiny()
        },
        DitConfig { heads: 0, ..tiny() },
    ] {
        let e = Dit::param_layout(&c).unwrap_err().to_string();
        assert!(e.contains("bad config"), "{c:?}: {e}");
    }

    // Within the bounds but far beyond memory: an error, not an abort of the process.
    let huge = DitConfig {
        hidden: 1 << 16,
        depth: 1 << 12,
        ..tiny()
    };
    assert!(Dit::validate_config(&huge).is_ok());
    let e = Dit::new(huge, DType::F32, &mut rng)
        .unwrap_err()
        .to_string();
    assert!(e.contains("parameters") && e.contains("memory"), "{e}");
    let huge = DitConfig {
        image_size: 1 << 16,
        patch: 1,
        hidden: 1 << 16,
        ..tiny()
    };
    let e = Dit::from_params(huge, Vec::new()).unwrap_err().to_string();
    assert!(
        e.contains("position embedding") && e.contains("memory"),
        "{e}"
    );

    // time_scale finite in f64 but not in f32 gave c_noise = inf and NaN outputs in f32.
    for ts in [1e39, -1e39, 1e7, f64::INFINITY] {
        let c = DitConfig {
            time_scale: ts,
            ..tiny()
        };
        let e = Dit::validate_config(&c).unwrap_err().to_string();
        assert!(e.contains("time_scale"), "{ts}: {e}");
        assert!(Dit::new(c.clone(), DType::F32, &mut rng).is_err());
        assert!(Dit::param_layout(&c).is_err());
    }
    assert!(Dit::validate_config(&DitConfig {
        time_scale: -1e6,
        ..tiny()
    })
    .is_ok());

    // A t whose c_noise overflows the network dtype is refused, naming it.
    let c = DitConfig {
        time_scale: 1e3,
        ..tiny()
    };
    let mut dit = Dit::new(c.clone(), DType::F32, &mut rng).unwrap();
    dit.randomize_for_tests(&mut rng, 1.0).unwrap();
    let (x, _, class) = inputs(&c, 2, &mut rng);
    let x = x.to_dtype(DType::F32);
    let t = Tensor::from_vec(vec![0.5f32, 1e37], &[2]).unwrap();
    let e = dit.forward(&x, &t, &class).unwrap_err().to_string();
    assert!(e.contains("t[1]") && e.contains("c_noise"), "{e}");
    let tt = Tensor::from_vec(vec![1e37f32, 0.0], &[2]).unwrap();
    let t = Tensor::from_vec(vec![0.5f32, 0.7], &[2]).unwrap();
    let e = dit
        .forward_dual(
            &Dual::constant(x.clone()),
            &Dual::new(t.clone(), tt).unwrap(),
            &class,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("tangent of t[0]"), "{e}");
    let y = dit.forward(&x, &t, &class).unwrap();
    assert!(y.to_f64_vec().iter().all(|v| v.is_finite()));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// Over shapes: the output has the input's shape, the dual primal is the forward, and the
        /// backward returns one gradient per layout entry with its shape.
        #[test]
        fn shapes_and_dual_primal(
            b in 1usize..4, grid in 1usize..4, patch in 1usize..3, ch in 1usize..3,
            heads in 1usize..3, width in 1usize..3, depth in 0usize..3, seed in 0u64..1000,
        ) {
            let c = DitConfig {
                image_size: grid * patch,
                in_channels: ch,
                patch,
                hidden: 4 * heads * width,
                depth,
                heads,
                mlp_ratio: 2,
                num_classes: 2,
                freq_dim: 6,
                time_scale: 1.0,
            };
            let mut rng = rng(seed);
            let dit = random_dit(c.clone(), &mut rng);
            let (x, t, class) = inputs(&c, b, &mut rng);
            let tx = randn(x.shape(), &mut rng);
            let (yd, _) = dit
                .forward_dual(&Dual::new(x.clone(), tx).unwrap(), &Dual::constant(t.clone()), &class)
                .unwrap();
            let (y, cache) = dit.forward_train(&x, &t, &class).unwrap();
            prop_assert_eq!(y.shape(), x.shape());
            prop_assert_eq!(&yd.primal, &y);
            let grads = dit.backward(&cache, &randn(y.shape(), &mut rng)).unwrap();
            let layout = Dit::param_layout(&c).unwrap();
            prop_assert_eq!(grads.len(), layout.len());
            for (g, (_, shape)) in grads.iter().zip(&layout) {
                prop_assert_eq!(g.shape(), shape.as_slice());
            }
        }
    }
}

/// Timing at the rCM example's scale (f32):
/// `cargo test --release --test dit -- --ignored --nocapture timing`.
#[test]
#[ignore]
fn timing_f32() {
    let c = DitConfig {
        image_size: 16,
        in_channels: 1,
        patch: 2,
        hidden: 96,
        depth: 3,
        heads: 4,
        mlp_ratio: 4,
        num_classes: 10,
        freq_dim: 64,
        time_scale: 1.0,
    };
    let mut rng = rng(13);
    let mut dit = Dit::new(c.clone(), DType::F32, &mut rng).unwrap();
    dit.randomize_for_tests(&mut rng, 1.0).unwrap();
    let b = 128;
    let x = Tensor::randn(&[b, 1, 16, 16], DType::F32, &mut rng);
    let tx = Tensor::randn(&[b, 1, 16, 16], DType::F32, &mut rng);
    let t = Tensor::from_f64_vec(vec![0.7; b], &[b], DType::F32).unwrap();
    let tt = Tensor::from_f64_vec(vec![0.3; b], &[b], DType::F32).unwrap();
    let class: Vec<usize> = (0..b).map(|i| i % 11).collect();
    let time = |f: &mut dyn FnMut()| {
        f();
        let reps = 5;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            f();
        }
        start.elapsed().as_secs_f64() * 1e3 / reps as f64
    };
    let fwd = time(&mut || {
        dit.forward(&x, &t, &class).unwrap();
    });
    let xd = Dual::new(x.clone(), tx).unwrap();
    let td = Dual::new(t.clone(), tt).unwrap();
    let dual = time(&mut || {
        dit.forward_dual(&xd, &td, &class).unwrap();
    });
    let (y, cache) = dit.forward_dual(&xd, &td, &class).unwrap();
    let bwd = time(&mut || {
        dit.backward(&cache, &y.primal).unwrap();
    });
    println!(
        "DiT f32 B={b} 16x16 p2 hidden 96 depth 3 heads 4 mlp 4 ({} params, {} threads): \
         forward {fwd:.1} ms, forward_dual {dual:.1} ms, backward {bwd:.1} ms",
        dit.num_params(),
        rayon::current_num_threads()
    );
}
