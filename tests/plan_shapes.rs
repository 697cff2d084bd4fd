//! The GPU backend's shape checks take any dims, however large, and answer Ok or a clear error:
//! never a panic or an arithmetic overflow (pure functions: no GPU or NVRTC needed).
#![cfg(feature = "cuda")]

use flashjvp::cuda::{attention as attn, layernorm as ln, mlp};
use flashjvp::dit::gpu::{check_config, BlockDims};
use flashjvp::dit::DitConfig;
use proptest::prelude::*;

/// Mostly sizes the kernels take, sometimes 0, sometimes near the int and usize limits.
fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 1usize..300,
        1 => Just(0usize),
        1 => prop::sample::select(vec![64usize, 72, 96, 128, 32]),
        1 => prop::sample::select(vec![
            1usize << 31,
            (1 << 31) - 1,
            1 << 32,
            1 << 40,
            usize::MAX / 2 + 1,
            usize::MAX,
        ]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn attention_shape_checks_never_panic(b in dim(), h in dim(), nq in dim(), nk in dim(),
                                          d in dim(), dv in dim()) {
        // Accepted dims fit the grid and the kernels' ints without wrapping (what a release
        // build, with no overflow checks, would otherwise accept silently).
        if let Ok(dims) = attn::check_shapes(&[b, h, nq, d], &[b, h, nk, d], &[b, h, nk, dv]) {
            let bh = b.checked_mul(h);
            prop_assert!(bh.is_some_and(|x| x <= 65535));
            prop_assert!(bh.and_then(|x| x.checked_mul(nq)).is_some_and(|x| x <= i32::MAX as usize));
            for layout in [attn::Layout::contiguous(dims), attn::Layout::packed_qkv(dims)] {
                let _ = layout.check(flashjvp::DType::BF16, dims);
            }
        }
    }

    #[test]
    fn mlp_shape_checks_never_panic(t in dim(), c in dim(), hd in dim()) {
        if mlp::check_shapes(&[t, c], &[hd, c], &[hd], &[c, hd], &[c]).is_ok() {
            prop_assert!(t.checked_mul(2).is_some_and(|x| x <= i32::MAX as usize));
        }
    }

    #[test]
    fn layernorm_shape_checks_never_panic(t in dim(), c in dim()) {
        let _ = ln::check_x(&[t, c]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn dit_block_and_config_checks_never_panic(b in dim(), n in dim(), c in dim(), heads in dim(),
                                               hd in dim(), image in dim(), patch in dim(),
                                               ratio in dim(), depth in dim(), classes in dim(),
                                               freq in dim(), cin in dim()) {
        let _ = BlockDims { b, n, c, heads, hd }.check();
        let cfg = DitConfig {
            image_size: image,
            in_channels: cin,
            patch,
            hidden: c,
            depth,
            heads,
            mlp_ratio: ratio,
            num_classes: classes,
            freq_dim: freq,
            time_scale: 1.0,
        };
        let _ = check_config(&cfg);
    }
}

#[test]
fn an_absurd_dit_config_is_an_error_naming_the_field() {
    let cfg = DitConfig {
        image_size: 16,
        in_channels: 1,
        patch: 2,
        hidden: 1 << 20,
        depth: 2,
        heads: 4,
        mlp_ratio: 4,
        num_classes: 10,
        freq_dim: 64,
        time_scale: 1.0,
    };
    let e = flashjvp::dit::Dit::validate_config(&cfg).unwrap_err();
    assert!(e.to_string().contains("hidden 1048576 exceeds"), "{e}");
    assert!(flashjvp::dit::Dit::validate_config(&DitConfig { hidden: 64, ..cfg }).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// The plans take AttnDims built by hand too (its fields are public), not only from
    /// check_shapes: any dims give a plan or an error, and a plan only for dims check_shapes takes.
    #[test]
    fn attention_plans_take_any_dims(b in dim(), h in dim(), nq in dim(), nk in dim(), d in dim(),
                                     dv in dim(), packed in any::<bool>(), arch90 in any::<bool>()) {
        let dims = attn::AttnDims { b, h, nq, nk, d, dv };
        let layout = if packed {
            attn::Layout::packed_qkv(dims)
        } else {
            attn::Layout::contiguous(dims)
        };
        let p = |i: u64| 0x1000_0000 * (i + 1);
        let ptrs = attn::JvpPtrs {
            q: p(0), k: p(1), v: p(2), tq: p(3), tk: p(4), tv: p(5), o: p(6), to: p(7), lse: p(8),
            tlse: p(9),
        };
        let valid = attn::check_shapes(&dims.q_shape(), &dims.k_shape(), &[b, h, nk, dv]).is_ok();
        let arch = if arch90 { "sm_90a" } else { "sm_80" };
        for variant in [attn::Variant::Jvp, attn::Variant::JvpNoKv, attn::Variant::Fwd] {
            let planned = flashjvp::cuda::attention_sm90::plan_for(
                arch, variant, flashjvp::DType::BF16, dims, layout, ptrs, 0.1,
            );
            prop_assert!(valid || planned.is_err(), "planned {dims:?}");
        }
        let bwd = attn::BwdPtrs {
            q: p(0), k: p(1), v: p(2), o: p(3), lse: p(4), dout: p(5), delta: p(6), dq: p(7),
            dk: p(8), dv: p(9),
        };
        let planned = attn::plan_backward(flashjvp::DType::BF16, dims, layout, bwd, 0.1);
        prop_assert!(valid || planned.is_err(), "planned backward {dims:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// Layernorm and gated-residual plans from hand-built dims: a plan only when T, C, G >= 1, G
    /// divides T and the sizes fit the kernels' ints (any other G makes rows read past the
    /// modulation vectors); never a panic.
    #[test]
    fn row_plans_take_any_dims(t in dim(), c in dim(), g in dim()) {
        use flashjvp::cuda::elementwise as ew;
        let p = |i: u64| 0x1000_0000 * (i + 1);
        let valid = t >= 1 && c >= 1 && g >= 1 && t % g == 0 && t <= i32::MAX as usize
            && c <= i32::MAX as usize;
        let d = ln::LnDims { t, c, g };
        let dt = flashjvp::DType::BF16;
        let planned = [
            ln::plan_forward(dt, d, p(0), p(1), p(2), p(3), p(4), p(5), 1e-6).is_ok(),
            ln::plan_jvp(dt, d, ln::JvpPtrs {
                x: p(0), tx: p(1), scale: p(2), shift: p(3), tscale: p(4), tshift: p(5), y: p(6),
                ty: p(7), mean: p(8), rstd: p(9),
            }, 1e-6).is_ok(),
            ln::plan_backward(dt, d, ln::BwdPtrs {
                dy: p(0), x: p(1), scale: p(2), mean: p(3), rstd: p(4), dres: 0, dx: p(5),
                dscale: p(6), dshift: p(7),
            }).is_ok(),
        ];
        prop_assert!(valid || !planned.iter().any(|&ok| ok), "planned {d:?}");
        let _ = ln::param_slices(d);
        let r = ew::ResDims { t, c, g };
        let planned = ew::plan_residual_jvp(dt, r, ew::ResJvpPtrs {
            x: p(0), tx: p(1), y: p(2), ty: p(3), gate: p(4), tgate: p(5), out: p(6), tout: p(7),
        });
        prop_assert!(valid || planned.is_err(), "planned {r:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Elementwise plans over any element count (and the timestep embedding over any N x dim):
    /// a plan or an error, never a panic.
    #[test]
    fn elementwise_plans_take_any_sizes(n in dim(), dim2 in dim(), gelu in any::<bool>()) {
        use flashjvp::cuda::elementwise as ew;
        let act = if gelu { ew::Activation::Gelu } else { ew::Activation::Silu };
        let dt = flashjvp::DType::BF16;
        let p = |i: u64| 0x1000_0000 * (i + 1);
        let _ = ew::plan_activation_fwd(act, dt, n, p(0), p(1));
        let _ = ew::plan_activation_jvp(act, dt, n, p(0), p(1), p(2), p(3));
        let _ = ew::plan_activation_bwd(act, dt, n, p(0), p(1), p(2));
        let _ = ew::plan_gelu_tangent(dt, n, p(0), p(1), p(2));
        let _ = ew::plan_timestep(n, dim2, 10000.0, p(0), 0, p(1), 0);
        let _ = ew::plan_timestep(n, dim2, 10000.0, p(0), p(2), p(1), p(3));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// MLP plans from hand-built dims: a plan only for dims check_shapes takes; never a panic.
    #[test]
    fn mlp_plans_take_any_dims(t in dim(), c in dim(), hd in dim()) {
        let d = mlp::MlpDims { t, c, hd };
        let valid = mlp::check_shapes(&[t, c], &[hd, c], &[hd], &[c, hd], &[c]).is_ok();
        let p = |i: u64| 0x1000_0000 * (i + 1);
        let w = mlp::ParamPtrs { w1: p(0), b1: p(1), w2: p(2), b2: p(3) };
        let dt = flashjvp::DType::BF16;
        let planned = [
            mlp::plan_forward(dt, d, p(4), w, p(5), p(6)).is_ok(),
            mlp::plan_jvp(dt, d, p(4), p(5), w, p(6), p(7), p(8), p(9)).is_ok(),
            mlp::plan_backward(dt, d, p(4), w, p(5), mlp::BwdPtrs {
                pre: p(6), g: p(7), dg: p(8), ones: p(9), dx: p(10), dw1: p(11), db1: p(12),
                dw2: p(13), db2: p(14),
            }).is_ok(),
        ];
        prop_assert!(valid || !planned.iter().any(|&ok| ok), "planned {d:?}");
    }
}
