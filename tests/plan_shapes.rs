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
