//! The GPU backend's shape checks take any dims, however large, and answer Ok or a clear error:
//! never a panic or an arithmetic overflow (pure functions: no GPU or NVRTC needed).
#![cfg(feature = "cuda")]

use flashjvp::cuda::{attention as attn, layernorm as ln, mlp};
use flashjvp::dit::gpu::{check_config, BlockDims};
use flashjvp::dit::DitConfig;
use proptest::prelude::*;

/// Distinct fake device addresses: the plans only check and record them, never dereference them.
const fn fake(i: u64) -> u64 {
    0x1000_0000 * (i + 1)
}

/// Every pointer of an attention forward/JVP plan, each set.
const JVP_PTRS: attn::JvpPtrs = attn::JvpPtrs {
    q: fake(0),
    k: fake(1),
    v: fake(2),
    tq: fake(3),
    tk: fake(4),
    tv: fake(5),
    o: fake(6),
    to: fake(7),
    lse: fake(8),
    tlse: fake(9),
};

/// Every pointer of an attention backward plan, each set.
const BWD_PTRS: attn::BwdPtrs = attn::BwdPtrs {
    q: fake(0),
    k: fake(1),
    v: fake(2),
    o: fake(3),
    lse: fake(4),
    dout: fake(5),
    delta: fake(6),
    dq: fake(7),
    dk: fake(8),
    dv: fake(9),
};

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
        let ptrs = JVP_PTRS;
        let valid = attn::check_shapes(&dims.q_shape(), &dims.k_shape(), &[b, h, nk, dv]).is_ok();
        let arch = if arch90 { "sm_90a" } else { "sm_80" };
        for variant in [attn::Variant::Jvp, attn::Variant::JvpNoKv, attn::Variant::Fwd] {
            let planned = flashjvp::cuda::attention_sm90::plan_for(
                arch, variant, flashjvp::DType::BF16, dims, layout, ptrs, 0.1,
            );
            prop_assert!(valid || planned.is_err(), "planned {dims:?}");
        }
        let bwd = BWD_PTRS;
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
        let p = fake;
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
        let p = fake;
        let _ = ew::plan_activation_fwd(act, dt, n, p(0), p(1));
        let _ = ew::plan_activation_jvp(act, dt, n, p(0), p(1), p(2), p(3));
        let _ = ew::plan_activation_bwd(act, dt, n, p(0), p(1), p(2));
        let _ = ew::plan_gelu_tangent(dt, n, p(0), p(1), p(2));
        let _ = ew::plan_timestep(n, dim2, 10000.0, p(0), 0, p(1), 0);
        let _ = ew::plan_timestep(n, dim2, 10000.0, p(0), p(2), p(1), p(3));
        let _ = flashjvp::cuda::tensor::plan_cast(dt, flashjvp::DType::F32, n, p(0), p(1));
    }

    /// The DiT's movement plans over any sizes and strides: a plan or an error, never a panic
    /// (an overflowing element count or stride is an error, not a wrapped launch).
    #[test]
    fn dit_plans_take_any_sizes(a in dim(), b in dim(), c in dim(), s0 in dim(), s1 in dim(),
                                s2 in dim()) {
        use flashjvp::cuda::dit as kd;
        let dt = flashjvp::DType::BF16;
        let p = fake;
        if let Ok(steps) = kd::plan_permute(dt, p(0), p(1), &[a, b, c], &[s0, s1, s2]) {
            prop_assert!(a.checked_mul(b).and_then(|x| x.checked_mul(c)).is_some(), "{a} {b} {c}");
            prop_assert!(steps.len() <= 1);
        }
        let _ = kd::plan_add_rows(dt, p(0), p(1), a, b);
        let _ = kd::plan_add_class(dt, p(0), p(1), p(2), a, b);
        let _ = kd::plan_class_grad(dt, p(0), p(1), p(2), a, b, c);
        let _ = kd::plan_scale_f32(p(0), p(1), 0.5, a);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// MLP plans from hand-built dims: a plan only for dims check_shapes takes; never a panic.
    #[test]
    fn mlp_plans_take_any_dims(t in dim(), c in dim(), hd in dim()) {
        let d = mlp::MlpDims { t, c, hd };
        let valid = mlp::check_shapes(&[t, c], &[hd, c], &[hd], &[c, hd], &[c]).is_ok();
        let p = fake;
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

/// The plans refuse a scale the kernels cannot take, whatever the arch and variant.
#[test]
fn a_scale_the_kernels_cannot_take_is_refused() {
    use flashjvp::DType::BF16;
    let dims = attn::check_shapes(&[1, 2, 100, 64], &[1, 2, 80, 64], &[1, 2, 80, 64]).unwrap();
    let layout = attn::Layout::contiguous(dims);
    let ptrs = JVP_PTRS;
    let bwd = BWD_PTRS;
    // 0 made the masked tail's scores NaN in the kernels, a negative scale +inf; a subnormal one
    // flushes to 0, and one beyond f32::MAX / log2(e) overflows with the factor.
    for scale in [
        0.0,
        -0.0,
        -0.125,
        1e-40,
        f32::MAX / 1.2,
        f32::NAN,
        f32::INFINITY,
    ] {
        for arch in ["sm_80", "sm_90a"] {
            for variant in [
                attn::Variant::Jvp,
                attn::Variant::JvpNoKv,
                attn::Variant::Fwd,
            ] {
                let planned = flashjvp::cuda::attention_sm90::plan_for(
                    arch, variant, BF16, dims, layout, ptrs, scale,
                );
                let e = planned.expect_err(&format!("{arch} {variant:?} with scale {scale}"));
                assert!(e.to_string().contains("scale"), "{e}");
            }
        }
        let e = attn::plan_backward(BF16, dims, layout, bwd, scale).unwrap_err();
        assert!(e.to_string().contains("scale"), "{e}");
    }
    for scale in [f32::MIN_POSITIVE, 1e-3, 0.125, 1e30] {
        assert!(attn::check_scale(scale).is_ok(), "{scale}");
        assert!(attn::plan_backward(BF16, dims, layout, bwd, scale).is_ok());
    }
    assert!(attn::resolve_scale(Some(-1.0), 64).is_err());
    assert!(attn::resolve_scale(Some(0.0), 64).is_err());
    assert_eq!(attn::resolve_scale(None, 64).unwrap(), 0.125);
}

/// The plans built from raw addresses refuse a null pointer their kernels dereference, naming it,
/// and take 0 where it means "absent" (a zero tangent, an output not wanted).
#[test]
fn null_required_pointers_are_errors_naming_them() {
    use flashjvp::DType::BF16;
    let p = fake;
    let refused =
        |what: &str, name: &str, r: flashjvp::Result<Vec<flashjvp::cuda::launch::Step>>| {
            let e = r.expect_err(&format!("{what} planned with a null `{name}`"));
            assert!(e.to_string().contains(&format!("`{name}`")), "{what}: {e}");
        };

    // Attention (sm_80 kernels; the Hopper plan has its own check): every pointer of each variant.
    let dims = attn::check_shapes(&[1, 2, 100, 64], &[1, 2, 80, 64], &[1, 2, 80, 64]).unwrap();
    let layout = attn::Layout::contiguous(dims);
    let all = JVP_PTRS;
    let jvp = |v: attn::Variant, ptrs: attn::JvpPtrs| {
        flashjvp::cuda::attention_sm90::plan_for("sm_80", v, BF16, dims, layout, ptrs, 0.125)
    };
    type Knock = fn(&mut attn::JvpPtrs);
    let knocks: [(&str, Knock); 10] = [
        ("q", |x| x.q = 0),
        ("k", |x| x.k = 0),
        ("v", |x| x.v = 0),
        ("tq", |x| x.tq = 0),
        ("tk", |x| x.tk = 0),
        ("tv", |x| x.tv = 0),
        ("o", |x| x.o = 0),
        ("to", |x| x.to = 0),
        ("lse", |x| x.lse = 0),
        ("tlse", |x| x.tlse = 0),
    ];
    for (variant, reads) in [
        (
            attn::Variant::Jvp,
            &["q", "k", "v", "tq", "tk", "tv", "o", "to", "lse", "tlse"][..],
        ),
        (
            attn::Variant::JvpNoKv,
            &["q", "k", "v", "tq", "o", "to", "lse", "tlse"][..],
        ),
        (attn::Variant::Fwd, &["q", "k", "v", "o", "lse"][..]),
    ] {
        assert!(jvp(variant, all).is_ok(), "{variant:?}");
        for (name, knock) in knocks {
            let mut ptrs = all;
            knock(&mut ptrs);
            let r = jvp(variant, ptrs);
            if reads.contains(&name) {
                refused(&format!("attention {variant:?}"), name, r);
            } else {
                assert!(
                    r.is_ok(),
                    "attention {variant:?} without `{name}`, which it never reads"
                );
            }
        }
    }
    let bwd = BWD_PTRS;
    assert!(attn::plan_backward(BF16, dims, layout, bwd, 0.125).is_ok());
    refused(
        "attention backward",
        "delta",
        attn::plan_backward(BF16, dims, layout, attn::BwdPtrs { delta: 0, ..bwd }, 0.125),
    );
    refused(
        "attention backward",
        "lse",
        attn::plan_backward(BF16, dims, layout, attn::BwdPtrs { lse: 0, ..bwd }, 0.125),
    );
    refused(
        "attention backward",
        "dq",
        attn::plan_backward(BF16, dims, layout, attn::BwdPtrs { dq: 0, ..bwd }, 0.125),
    );

    // Layernorm: x, y (and ty) required; modulation, tangents and statistics optional.
    let d = ln::LnDims { t: 64, c: 96, g: 2 };
    assert!(ln::plan_forward(BF16, d, p(0), 0, 0, p(1), 0, 0, 1e-6).is_ok());
    refused(
        "layernorm forward",
        "x",
        ln::plan_forward(BF16, d, 0, 0, 0, p(1), 0, 0, 1e-6),
    );
    refused(
        "layernorm forward",
        "y",
        ln::plan_forward(BF16, d, p(0), 0, 0, 0, 0, 0, 1e-6),
    );
    let lj = ln::JvpPtrs {
        x: p(0),
        y: p(1),
        ty: p(2),
        ..Default::default()
    };
    assert!(ln::plan_jvp(BF16, d, lj, 1e-6).is_ok());
    refused(
        "layernorm jvp",
        "ty",
        ln::plan_jvp(BF16, d, ln::JvpPtrs { ty: 0, ..lj }, 1e-6),
    );
    let lb = ln::BwdPtrs {
        dy: p(0),
        x: p(1),
        scale: 0,
        mean: p(2),
        rstd: p(3),
        dres: 0,
        dx: p(4),
        dscale: 0,
        dshift: 0,
    };
    assert!(ln::plan_backward(BF16, d, lb).is_ok());
    refused(
        "layernorm backward",
        "rstd",
        ln::plan_backward(BF16, d, ln::BwdPtrs { rstd: 0, ..lb }),
    );
    refused(
        "layernorm backward",
        "dx",
        ln::plan_backward(BF16, d, ln::BwdPtrs { dx: 0, ..lb }),
    );

    // MLP: everything is required.
    let md = mlp::MlpDims {
        t: 64,
        c: 96,
        hd: 384,
    };
    let w = mlp::ParamPtrs {
        w1: p(0),
        b1: p(1),
        w2: p(2),
        b2: p(3),
    };
    assert!(mlp::plan_forward(BF16, md, p(4), w, p(5), p(6)).is_ok());
    refused(
        "mlp forward",
        "b2",
        mlp::plan_forward(BF16, md, p(4), mlp::ParamPtrs { b2: 0, ..w }, p(5), p(6)),
    );
    refused(
        "mlp jvp",
        "tx",
        mlp::plan_jvp(BF16, md, p(4), 0, w, p(6), p(7), p(8), p(9)),
    );
    let mb = mlp::BwdPtrs {
        pre: p(6),
        g: p(7),
        dg: p(8),
        ones: p(9),
        dx: p(10),
        dw1: p(11),
        db1: p(12),
        dw2: p(13),
        db2: p(14),
    };
    assert!(mlp::plan_backward(BF16, md, p(4), w, p(5), mb).is_ok());

    // Elementwise and DiT movement: outputs and primal inputs required, absent tangents allowed.
    use flashjvp::cuda::{dit as kd, elementwise as ew};
    let r = ew::ResDims { t: 64, c: 96, g: 2 };
    let rj = ew::ResJvpPtrs {
        y: p(0),
        gate: p(1),
        tout: p(2),
        ..Default::default()
    };
    assert!(
        ew::plan_residual_jvp(BF16, r, rj).is_ok(),
        "tangent only: x and out unused"
    );
    refused(
        "residual jvp",
        "x",
        ew::plan_residual_jvp(BF16, r, ew::ResJvpPtrs { out: p(3), ..rj }),
    );
    refused(
        "residual jvp",
        "tout",
        ew::plan_residual_jvp(BF16, r, ew::ResJvpPtrs { tout: 0, ..rj }),
    );
    let gelu = ew::Activation::Gelu;
    assert!(ew::plan_activation_jvp(gelu, BF16, 100, p(0), p(1), 0, p(2)).is_ok());
    refused(
        "gelu jvp",
        "tu",
        ew::plan_activation_jvp(gelu, BF16, 100, p(0), 0, p(1), p(2)),
    );
    assert!(ew::plan_timestep(8, 64, 1e4, p(0), p(1), 0, p(2)).is_ok());
    refused(
        "timestep jvp",
        "te",
        ew::plan_timestep(8, 64, 1e4, p(0), p(1), p(2), 0),
    );
    refused(
        "timestep",
        "e",
        ew::plan_timestep(8, 64, 1e4, p(0), 0, 0, 0),
    );
    refused(
        "permute",
        "y",
        kd::plan_permute(BF16, p(0), 0, &[2, 3], &[1, 2]),
    );
    refused(
        "mlp backward",
        "ones",
        mlp::plan_backward(BF16, md, p(4), w, p(5), mlp::BwdPtrs { ones: 0, ..mb }),
    );
}

/// Element offsets of a [b, h, n, d] view in `s`, all distinct?
fn distinct(s: attn::Strides, [b, h, n, d]: [usize; 4]) -> bool {
    let mut seen = std::collections::HashSet::new();
    for i in 0..b {
        for j in 0..h {
            for r in 0..n {
                for c in 0..d {
                    if !seen.insert(i * s.b + j * s.h + r * s.n + c) {
                        return false;
                    }
                }
            }
        }
    }
    true
}

/// Small strides, often 0 (an operand shared across heads or batches), often a multiple of 32.
fn small_stride() -> impl Strategy<Value = usize> {
    prop_oneof![
        1 => Just(0usize),
        3 => prop::sample::select(vec![32usize, 64, 96, 128, 192, 256, 512, 1024, 2048]),
        1 => 0usize..600,
    ]
}

/// Any strides, from small ones to ones whose spans pass usize::MAX.
fn any_stride() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => small_stride(),
        1 => prop::sample::select(vec![
            1usize << 31,
            1 << 40,
            1 << 61,
            1 << 62,
            (1 << 63) - 8,
            usize::MAX / 2,
            usize::MAX,
        ]),
    ]
}

fn strides<S: Strategy<Value = usize>>(s: fn() -> S) -> impl Strategy<Value = attn::Strides> {
    (s(), s(), s()).prop_map(|(b, h, n)| attn::Strides { b, h, n })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// With any strides, a plan comes only for layouts whose writes cannot collide: the forward
    /// and JVP write o (and its tangent) with o's layout, the backward dq, dk and dv with q's,
    /// k's and v's, each element once and without atomics. Brute force over small dims.
    #[test]
    fn plans_only_for_layouts_whose_outputs_are_distinct(
        b in 1usize..4, h in 1usize..4, nq in 1usize..5, nk in 1usize..5,
        dv in prop::sample::select(vec![32usize, 64]),
        q in strides(small_stride), k in strides(small_stride), v in strides(small_stride),
        o in strides(small_stride), f32 in any::<bool>(),
    ) {
        let dims = attn::AttnDims { b, h, nq, nk, d: 32, dv };
        let layout = attn::Layout { q, k, v, o };
        let dt = if f32 { flashjvp::DType::F32 } else { flashjvp::DType::BF16 };
        let ptrs = JVP_PTRS;
        let bwd = BWD_PTRS;
        if attn::plan_jvp(attn::Variant::Jvp, dt, dims, layout, ptrs, 0.1).is_ok() {
            prop_assert!(distinct(o, dims.o_shape()), "o {o:?} {dims:?}");
        }
        if attn::plan_backward(dt, dims, layout, bwd, 0.1).is_ok() {
            prop_assert!(distinct(o, dims.o_shape()), "o {o:?} {dims:?}");
            prop_assert!(distinct(q, dims.q_shape()), "dq {q:?} {dims:?}");
            prop_assert!(distinct(k, dims.k_shape()), "dk {k:?} {dims:?}");
            prop_assert!(distinct(v, dims.v_shape()), "dv {v:?} {dims:?}");
        }
    }

    /// Layout checks take any strides: an error, or a layout whose every operand lies within
    /// isize::MAX bytes of its start (no span, nor the overlap check's running sum, wraps).
    #[test]
    fn layout_checks_take_any_strides(
        b in dim(), h in dim(), nq in dim(), nk in dim(),
        q in strides(any_stride), k in strides(any_stride), v in strides(any_stride),
        o in strides(any_stride),
    ) {
        let Ok(dims) = attn::check_shapes(&[b, h, nq, 64], &[b, h, nk, 64], &[b, h, nk, 64]) else {
            return Ok(());
        };
        let layout = attn::Layout { q, k, v, o };
        let dt = flashjvp::DType::BF16;
        if layout.check(dt, dims).is_ok() {
            for (s, shape) in [(q, dims.q_shape()), (k, dims.k_shape()), (v, dims.v_shape()),
                               (o, dims.o_shape())] {
                let span = s.span(shape[0], shape[1], shape[2], shape[3]);
                prop_assert!(span.is_some_and(|e| e <= isize::MAX as usize / 2), "{s:?} {dims:?}");
            }
        }
        let _ = layout.check_gradients(dims);
    }
}
