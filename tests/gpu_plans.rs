//! The CUDA launch plans against the kernels themselves, without a GPU: every kernel any plan
//! launches exists in its file, every argument list matches the kernel's PTX parameter list (count
//! and ABI class: pointer/long long, int, float), every block fits the kernel's `.maxntid`, and
//! every kernel of every file is launched by some plan. A mismatch here would be silent memory
//! corruption on the GPU. The Hopper file (attention_jvp_sm90.cu) is compiled for compute_90a, the
//! others for compute_80; its tensor-map parameters must meet `Arg::TensorMap` arguments. Needs NVRTC (PTX only); without it the test says "skipped: no NVRTC",
//! and with FLASHJVP_REQUIRE_NVRTC=1 it fails instead.
#![cfg(feature = "cuda")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use flashjvp::cuda::attention::{self as attn, Variant, HEAD_DIMS};
use flashjvp::cuda::attention_sm90 as sm90;
use flashjvp::cuda::elementwise::{self as ew, Activation, ResDims, ResJvpPtrs};
use flashjvp::cuda::launch::{kernel_ptx, ptx_max_threads, ptx_signatures, ArgKind, Launch, Step};
use flashjvp::cuda::layernorm::{self as ln, LnDims};
use flashjvp::cuda::mlp::{self, MlpDims, ParamPtrs};
use flashjvp::cuda::nvrtc::kernel_files;
use flashjvp::cuda::tensor::plan_cast;
use flashjvp::cuda::{rmsnorm as rms, rope};
use flashjvp::dit::gpu::{
    plan_block_backward, plan_block_forward, plan_block_forward_with, BlockBufs, BlockDims,
    BlockGrads, BlockParams, BlockTangents, Mods,
};
use flashjvp::DType;

const DTYPES: [DType; 3] = [DType::BF16, DType::F16, DType::F32];

/// Distinct, 256-byte aligned fake device addresses.
fn p(i: u64) -> u64 {
    0x7f00_0000_0000 + i * 0x10_0000
}

/// Every plan the backend can build, over all dtypes, head-dim pairs (d, dv) and optional-pointer
/// cases.
fn all_plans() -> Vec<Step> {
    let mut s = Vec::new();
    for dtype in DTYPES {
        for (d, dv) in HEAD_DIMS
            .into_iter()
            .flat_map(|d| HEAD_DIMS.map(|dv| (d, dv)))
        {
            let dims =
                attn::check_shapes(&[2, 3, 77, d], &[2, 3, 300, d], &[2, 3, 300, dv]).unwrap();
            let jp = attn::JvpPtrs {
                q: p(1),
                k: p(2),
                v: p(3),
                tq: p(4),
                tk: p(5),
                tv: p(6),
                o: p(7),
                to: p(8),
                lse: p(9),
                tlse: p(10),
            };
            let lay = attn::Layout::contiguous(dims);
            for v in [Variant::Jvp, Variant::JvpNoKv, Variant::Fwd] {
                s.extend(attn::plan_jvp(v, dtype, dims, lay, jp, 0.125).unwrap());
                // The sm_80 kernels with f16 value products: bf16 JVPs with dv == d only.
                let f16_values = attn::plan_jvp_f16_values("sm_80", v, dims, lay, jp, 0.125, p(11));
                if attn::ValueProducts::F16.applies(v, dtype, dims) {
                    s.extend(f16_values.unwrap());
                } else if dtype == DType::BF16 {
                    assert!(f16_values.is_err());
                }
            }
            if d == dv {
                // q, k, v in place in a packed [B, N, 3, H, d] projection, o token-major.
                let pd =
                    attn::check_shapes(&[2, 3, 77, d], &[2, 3, 77, d], &[2, 3, 77, d]).unwrap();
                let packed = attn::Layout::packed_qkv(pd);
                for v in [Variant::Jvp, Variant::JvpNoKv, Variant::Fwd] {
                    s.extend(sm90::plan_for("sm_90a", v, dtype, pd, packed, jp, 0.125).unwrap());
                }
            }
            let bp = attn::BwdPtrs {
                q: p(1),
                k: p(2),
                v: p(3),
                o: p(4),
                lse: p(5),
                dout: p(6),
                delta: p(7),
                dq: p(8),
                dk: p(9),
                dv: p(10),
            };
            s.extend(
                attn::plan_backward(dtype, dims, attn::Layout::contiguous(dims), bp, 0.125)
                    .unwrap(),
            );
            // Padded keys (key_lens): per batch entry, on both paths.
            let lens = [300, 131];
            for arch in ["sm_80", "sm_90a"] {
                for v in [Variant::Jvp, Variant::JvpNoKv, Variant::Fwd] {
                    s.extend(
                        attn::plan_for_key_lens(arch, v, dtype, dims, lay, jp, 0.125, &lens)
                            .unwrap(),
                    );
                }
                s.extend(
                    attn::plan_backward_for_key_lens(arch, dtype, dims, lay, bp, 0.125, &lens)
                        .unwrap(),
                );
            }
            if d == dv {
                // The packed-qkv layout (the DiT's): Nq = Nk, strided q, k, v, o.
                let pd =
                    attn::check_shapes(&[2, 3, 77, d], &[2, 3, 77, d], &[2, 3, 77, d]).unwrap();
                let lay = attn::Layout::packed_qkv(pd);
                s.extend(attn::plan_backward(dtype, pd, lay, bp, 0.125).unwrap());
            }
            if dtype != DType::F32 && sm90::HEAD_DIMS.contains(&d) && dims.dv != d {
                // The Hopper kernels take dv == d only: the plan refuses, the dispatcher falls
                // back to attention_jvp_dv.cu's kernel.
                for v in [Variant::Jvp, Variant::JvpNoKv, Variant::Fwd] {
                    assert!(sm90::plan(v, dtype, dims, lay, jp, 0.125).is_err());
                    assert_eq!(
                        sm90::plan_for("sm_90a", v, dtype, dims, lay, jp, 0.125).unwrap(),
                        attn::plan_jvp(v, dtype, dims, lay, jp, 0.125).unwrap()
                    );
                }
            }
            if dtype != DType::F32 && sm90::HEAD_DIMS.contains(&d) {
                // The Hopper backward: dv == d only; contiguous and packed layouts.
                let pd =
                    attn::check_shapes(&[2, 3, 77, d], &[2, 3, 77, d], &[2, 3, 77, d]).unwrap();
                if dims.dv == d {
                    s.extend(sm90::plan_backward(dtype, dims, lay, bp, 0.125).unwrap());
                    let packed = attn::Layout::packed_qkv(pd);
                    s.extend(sm90::plan_backward(dtype, pd, packed, bp, 0.125).unwrap());
                } else {
                    assert!(sm90::plan_backward(dtype, dims, lay, bp, 0.125).is_err());
                }
            }
            if dtype != DType::F32 && sm90::HEAD_DIMS.contains(&d) && dims.dv == d {
                for v in [Variant::Jvp, Variant::JvpNoKv, Variant::Fwd] {
                    s.extend(sm90::plan(v, dtype, dims, lay, jp, 0.125).unwrap());
                    // The dispatcher on Hopper picks the same plan.
                    assert_eq!(
                        sm90::plan_for("sm_90a", v, dtype, dims, lay, jp, 0.125).unwrap(),
                        sm90::plan(v, dtype, dims, lay, jp, 0.125).unwrap()
                    );
                    // f16 value products (bf16 JVPs): contiguous and packed; the forward refused.
                    if dtype == DType::BF16 && v != Variant::Fwd {
                        let pd = attn::check_shapes(&[2, 3, 77, d], &[2, 3, 77, d], &[2, 3, 77, d])
                            .unwrap();
                        let packed = attn::Layout::packed_qkv(pd);
                        for (dm, l) in [(dims, lay), (pd, packed)] {
                            s.extend(sm90::plan_f16_values(v, dm, l, jp, 0.125, p(11)).unwrap());
                        }
                    } else if v == Variant::Fwd {
                        assert!(sm90::plan_f16_values(v, dims, lay, jp, 0.125, p(11)).is_err());
                    }
                }
            }
        }
        let d = LnDims {
            t: 78,
            c: 300,
            g: 3,
        };
        s.extend(ln::plan_forward(dtype, d, p(1), p(2), p(3), p(4), p(5), p(6), 1e-6).unwrap());
        s.extend(ln::plan_forward(dtype, d, p(1), 0, 0, p(4), 0, 0, 1e-6).unwrap());
        let jp = ln::JvpPtrs {
            x: p(1),
            tx: p(2),
            scale: p(3),
            shift: p(4),
            tscale: p(5),
            tshift: p(6),
            y: p(7),
            ty: p(8),
            mean: 0,
            rstd: 0,
        };
        s.extend(ln::plan_jvp(dtype, d, jp, 1e-6).unwrap());
        // Rows between the narrow and the wide register limits take the *_jvp_wide kernels.
        let wide = LnDims {
            t: 6,
            c: if dtype == DType::F32 { 1000 } else { 2000 },
            g: 2,
        };
        assert_eq!(ln::JvpRows::by_width(dtype, wide.c), ln::JvpRows::Wide);
        s.extend(ln::plan_jvp(dtype, wide, jp, 1e-6).unwrap());
        // The pipelined JVP kernel (opt-in: FLASHJVP_LN_JVP_ROWS=pipe).
        s.extend(ln::plan_jvp_on(ln::JvpRows::Pipe, dtype, d, jp, 1e-6).unwrap());
        let rp = ln::ResPtrs {
            y: p(10),
            ty: p(11),
            gate: p(12),
            tgate: p(13),
            x1: p(14),
            tx1: p(15),
        };
        s.extend(ln::plan_residual_jvp(dtype, wide, jp, rp, 1e-6).unwrap());
        let bp = ln::BwdPtrs {
            dy: p(1),
            x: p(2),
            scale: p(3),
            mean: p(4),
            rstd: p(5),
            dres: p(9),
            dx: p(6),
            dscale: p(7),
            dshift: p(8),
        };
        s.extend(ln::plan_backward(dtype, d, bp).unwrap());
        let rms_d = rms::RmsDims { t: 77, c: 300 };
        s.extend(rms::plan_forward(dtype, rms_d, p(1), p(2), p(3), p(4), 1e-6).unwrap());
        let rms_j = rms::JvpPtrs {
            x: p(1),
            tx: p(2),
            w: p(3),
            tw: p(4),
            y: p(5),
            ty: p(6),
            rrms: p(7),
        };
        s.extend(rms::plan_jvp(dtype, rms_d, rms_j, 1e-6).unwrap());
        let rms_b = rms::BwdPtrs {
            dy: p(1),
            x: p(2),
            w: p(3),
            rrms: p(4),
            dx: p(5),
            dw: p(6),
        };
        s.extend(rms::plan_backward(dtype, rms_d, rms_b).unwrap());
        let rope_d = flashjvp::ops::rope::RopeDims {
            b: 2,
            n: 77,
            h: 3,
            d: 64,
            per_batch: true,
        };
        let pairs = flashjvp::ops::RopePairs::Halves;
        s.extend(rope::plan_rope(dtype, rope_d, pairs, p(1), p(2), p(3), p(4), -1.0).unwrap());
        for act in [Activation::Silu, Activation::Gelu] {
            s.extend(ew::plan_activation_fwd(act, dtype, 1000, p(1), p(2)).unwrap());
            s.extend(ew::plan_activation_jvp(act, dtype, 1000, p(1), p(2), p(3), p(4)).unwrap());
            s.extend(ew::plan_activation_bwd(act, dtype, 1000, p(1), p(2), p(3)).unwrap());
        }
        s.extend(ew::plan_gelu_tangent(dtype, 1000, p(1), p(2), p(2)).unwrap());
        let rd = ResDims { t: 78, c: 33, g: 3 };
        s.extend(ew::plan_residual_fwd(dtype, rd, p(1), p(2), p(3), p(4)).unwrap());
        let rp = ResJvpPtrs {
            x: p(1),
            tx: p(2),
            y: p(3),
            ty: p(4),
            gate: p(5),
            tgate: p(6),
            out: p(7),
            tout: p(8),
        };
        s.extend(ew::plan_residual_jvp(dtype, rd, rp).unwrap());
        s.extend(ew::plan_residual_bwd(dtype, rd, p(1), p(2), p(3), p(4), p(5), p(6)).unwrap());
        let md = MlpDims {
            t: 33,
            c: 72,
            hd: 200,
        };
        let pp = ParamPtrs {
            w1: p(1),
            b1: p(2),
            w2: p(3),
            b2: p(4),
        };
        s.extend(mlp::plan_forward(dtype, md, p(5), pp, p(6), p(7)).unwrap());
        s.extend(mlp::plan_jvp(dtype, md, p(5), p(8), pp, p(6), p(9), p(7), p(10)).unwrap());
        let mb = mlp::BwdPtrs {
            pre: p(11),
            g: p(12),
            dg: p(13),
            ones: p(14),
            dx: p(15),
            dw1: p(16),
            db1: p(17),
            dw2: p(18),
            db2: p(19),
        };
        s.extend(mlp::plan_backward(dtype, md, p(5), pp, p(20), mb).unwrap());
        s.extend(dit_plans(dtype));
        if dtype != DType::F32 {
            s.extend(plan_cast(DType::F32, dtype, 1000, p(1), p(2)).unwrap());
            s.extend(plan_cast(dtype, DType::F32, 1000, p(1), p(2)).unwrap());
        }
    }
    s.extend(ew::plan_timestep(7, 256, 10000.0, p(1), 0, p(2), 0).unwrap());
    s.extend(ew::plan_timestep(7, 256, 10000.0, p(1), p(3), p(2), p(4)).unwrap());
    s.extend(flashjvp::cuda::bench::plan_busy(1 << 20, p(1)).unwrap());
    for (d, bc) in sm90::PROBES {
        let pp = sm90::ProbePtrs {
            q: p(1),
            k: p(2),
            v: p(3),
            q_smem: p(4),
            s: p(5),
            o: p(6),
        };
        s.extend(sm90::plan_layout_probe(d, bc, pp).unwrap());
    }
    s
}

/// The DiT's block plans (forward, dual forward with and without tangents on x and on the
/// modulation, backward) and the movement kernels of cuda/dit.cu the stem and head use.
fn dit_plans(dtype: DType) -> Vec<Step> {
    use flashjvp::cuda::dit as kd;
    let mut s = Vec::new();
    // B 2, N 40 tokens, C 144 = 2 heads of 72 (MLP 576) as an Ampere plans them, and C 128 = 2 heads
    // of 64 as a Hopper does (its sm_90a attention kernels in bf16/f16).
    for (arch, c) in [("sm_80", 144), ("sm_90a", 128)] {
        s.extend(dit_block_plans(arch, dtype, c));
    }
    s.extend(kd::plan_permute(dtype, p(1), p(2), &[2, 3, 4, 5, 6, 7], &[1; 6]).unwrap());
    s.extend(kd::plan_add_rows(dtype, p(1), p(2), 1000, 100).unwrap());
    s.extend(kd::plan_add_class(dtype, p(1), p(2), p(3), 7, 33).unwrap());
    s.extend(kd::plan_class_grad(dtype, p(1), p(2), p(3), 7, 11, 33).unwrap());
    if dtype == DType::F32 {
        s.extend(kd::plan_scale_f32(p(1), p(2), 10.0, 7).unwrap());
    }
    s
}

/// One block's plans (forward, dual forward with and without tangents on x and the modulation,
/// backward) at B 2, N 40, width `c` in 2 heads, MLP 4c, on a device of arch `arch`.
fn dit_block_plans(arch: &str, dtype: DType, c: usize) -> Vec<Step> {
    let mut s = Vec::new();
    let d = BlockDims {
        b: 2,
        n: 40,
        c,
        heads: 2,
        hd: 4 * c,
    };
    let bp = BlockParams {
        qkv_w: p(1),
        qkv_b: p(2),
        proj_w: p(3),
        proj_b: p(4),
        fc1_w: p(5),
        fc1_b: p(6),
        fc2_w: p(7),
        fc2_b: p(8),
    };
    let m = Mods::chunks(p(9), 0, d.b, d.c);
    let tm = Mods::chunks(p(10), 0, d.b, d.c);
    let a = BlockBufs {
        x: p(11),
        mean1: p(12),
        rstd1: p(13),
        h1: p(14),
        qkv: p(15),
        lse: p(18),
        o_rows: p(19),
        attn_out: p(20),
        x1: p(21),
        mean2: p(22),
        rstd2: p(23),
        h2: p(24),
        pre: p(25),
        g: p(26),
        mlp_out: p(27),
        out: p(28),
    };
    let t = BlockTangents {
        x: p(30),
        qkv: p(31),
        lse: p(34),
        o_rows: p(35),
        attn_out: p(36),
        x1: p(37),
        mlp_out: p(38),
        out: p(39),
    };
    let t0 = BlockTangents { x: 0, ..t };
    s.extend(plan_block_forward(arch, dtype, d, &bp, &m, None, &a, None).unwrap());
    s.extend(plan_block_forward(arch, dtype, d, &bp, &m, Some(&tm), &a, Some(&t)).unwrap());
    s.extend(plan_block_forward(arch, dtype, d, &bp, &m, None, &a, Some(&t)).unwrap());
    s.extend(plan_block_forward(arch, dtype, d, &bp, &m, Some(&tm), &a, Some(&t0)).unwrap());
    // The attention JVP with f16 value products (its copies in `pre`) where it applies.
    let f16v = attn::ValueProducts::F16;
    s.extend(
        plan_block_forward_with(f16v, arch, dtype, d, &bp, &m, Some(&tm), &a, Some(&t)).unwrap(),
    );
    let g = BlockGrads {
        dx: p(40),
        dy: p(41),
        dh: p(42),
        dg: p(44),
        do_rows: p(45),
        dqkv: p(48),
        delta: p(49),
        ones: p(50),
        dmods: Mods::chunks(p(51), 0, d.b, d.c),
        dp: BlockParams { qkv_w: p(52), ..bp },
    };
    s.extend(plan_block_backward(arch, dtype, d, &bp, &m, &a, &g).unwrap());
    s
}

/// On a Hopper the DiT block's attention takes the sm_90a kernels where they apply (bf16/f16 at
/// head dim 64, 72, 96 or 128), the sm_80 ones elsewhere, and always the sm_80 ones on an Ampere.
#[test]
fn dit_block_attention_takes_the_hopper_kernels_on_sm90a() {
    let kernels = |arch: &str, dtype: DType, c: usize| -> Vec<String> {
        dit_block_plans(arch, dtype, c)
            .into_iter()
            .filter_map(|s| match s {
                Step::Kernel(l) if l.kernel().starts_with("attention_") => {
                    Some(l.kernel().to_string())
                }
                _ => None,
            })
            .collect()
    };
    let hopper = kernels("sm_90a", DType::BF16, 128);
    assert!(
        hopper.contains(&"attention_jvp_sm90_bf16_d64".to_string()),
        "{hopper:?}"
    );
    assert!(
        hopper.contains(&"attention_fwd_sm90_bf16_d64".to_string()),
        "{hopper:?}"
    );
    assert!(!hopper
        .iter()
        .any(|k| k.starts_with("attention_jvp_bf16") || k.starts_with("attention_fwd_bf16")));
    assert!(
        hopper.contains(&"attention_jvp_sm90_bf16_vf16_d64".to_string()),
        "{hopper:?}"
    );
    assert!(!kernels("sm_90a", DType::F16, 128)
        .iter()
        .any(|k| k.contains("vf16")));
    let ampere = kernels("sm_80", DType::BF16, 128);
    assert!(
        ampere.contains(&"attention_jvp_bf16_d64".to_string()),
        "{ampere:?}"
    );
    assert!(!ampere.iter().any(|k| k.contains("sm90")), "{ampere:?}");
    assert!(
        ampere.contains(&"attention_jvp_bf16_vf16_d64".to_string()),
        "{ampere:?}"
    );
    // Head dim 72 (DiT-XL's) has Hopper kernels; head dim 32 and f32 do not: sm_80's on a Hopper too.
    assert!(
        kernels("sm_90a", DType::BF16, 144).contains(&"attention_jvp_sm90_bf16_d72".to_string())
    );
    assert!(!kernels("sm_90a", DType::BF16, 64)
        .iter()
        .any(|k| k.contains("sm90")));
    assert!(!kernels("sm_90a", DType::F32, 128)
        .iter()
        .any(|k| k.contains("sm90")));
}

#[test]
fn dit_plans_are_refused_for_unsupported_sizes() {
    let d = BlockDims {
        b: 2,
        n: 40,
        c: 96,
        heads: 2,
        hd: 384,
    };
    // Head dim 48 has no attention kernel: an error, not a launch.
    let e = plan_block_forward(
        "sm_80",
        DType::F32,
        d,
        &BlockParams::default(),
        &Mods::default(),
        None,
        &BlockBufs::default(),
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("head dim 48"), "{e}");
}

/// The virtual architecture a file's PTX is made for (the Hopper file needs compute_90a).
fn ptx_arch(file: &str) -> &'static str {
    if file.ends_with("_sm90.cu") {
        "compute_90a"
    } else {
        "compute_80"
    }
}

/// The Hopper kernels use what they claim: wgmma from registers and from shared memory, TMA copies
/// completing on mbarriers, register reallocation, and the 128-byte tensor-map parameters.
#[test]
fn hopper_kernels_use_wgmma_tma_and_setmaxnreg() {
    if !flashjvp::cuda::nvrtc_or_skip() {
        return;
    }
    let ptx = kernel_ptx(sm90::FILE, "compute_90a").unwrap();
    for needle in [
        "wgmma.mma_async.sync.aligned.m64n48k16.f32.bf16.bf16",
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16",
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16",
        "wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16",
        "wgmma.mma_async.sync.aligned.m64n96k16.f32.f16.f16",
        "wgmma.fence.sync.aligned",
        "wgmma.commit_group.sync.aligned",
        "wgmma.wait_group.sync.aligned",
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes",
        "mbarrier.try_wait.parity",
        "setmaxnreg.inc.sync.aligned.u32 240",
        "setmaxnreg.dec.sync.aligned.u32 24",
        ".b8 attention_jvp_sm90_bf16_d128_param_0[128]",
    ] {
        assert!(
            ptx.contains(needle),
            "`{needle}` not in the PTX of {}",
            sm90::FILE
        );
    }
    // The f16-values JVP (bf16 storage): bf16 score products, f16 value products; the default bf16
    // kernel has no f16 product at all.
    let body = |kernel: &str| {
        let at = ptx
            .find(&format!(".entry {kernel}("))
            .unwrap_or_else(|| panic!("{kernel} not in the PTX"));
        let rest = &ptx[at + 1..];
        &rest[..rest.find(".entry").unwrap_or(rest.len())]
    };
    let vf16 = body("attention_jvp_sm90_bf16_vf16_d128");
    assert!(vf16.contains("wgmma.mma_async.sync.aligned.m64n48k16.f32.bf16.bf16"));
    assert!(vf16.contains("wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16"));
    assert!(!vf16.contains("m64n128k16.f32.bf16.bf16"));
    assert!(!body("attention_jvp_sm90_bf16_d128").contains(".f32.f16.f16"));
    // Likewise the sm_80 kernel with f16 value products: bf16 score products (m16n8k16 mma.sync),
    // f16 value products.
    let ptx80 = kernel_ptx("attention_jvp.cu", "compute_80").unwrap();
    let at = ptx80
        .find(".entry attention_jvp_bf16_vf16_d64(")
        .expect("attention_jvp_bf16_vf16_d64 in the PTX");
    let rest = &ptx80[at + 1..];
    let vf16_80 = &rest[..rest.find(".entry").unwrap_or(rest.len())];
    assert!(vf16_80.contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"));
    assert!(vf16_80.contains("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"));
    let sigs = ptx_signatures(&ptx);
    // 24 attention kernels (3 variants x 2 dtypes x 4 head dims), 8 with f16 value products, the
    // probes.
    assert_eq!(
        sigs.len(),
        24 + 8 + sm90::PROBES.len(),
        "{:?}",
        sigs.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    // The backward: dK/dV and dQ per dtype and head dim, the same machinery.
    let ptx = kernel_ptx(sm90::BWD_FILE, "compute_90a").unwrap();
    for needle in [
        "wgmma.mma_async.sync.aligned.m64n48k16.f32.bf16.bf16",
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16",
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes",
        "setmaxnreg.inc.sync.aligned.u32 240",
        "setmaxnreg.dec.sync.aligned.u32 24",
        ".b8 attention_bwd_dkdv_sm90_bf16_d128_param_0[128]",
        ".b8 attention_bwd_dq_sm90_f16_d72_param_3[128]",
    ] {
        assert!(
            ptx.contains(needle),
            "`{needle}` not in the PTX of {}",
            sm90::BWD_FILE
        );
    }
    assert_eq!(ptx_signatures(&ptx).len(), 16);
}

/// The PTX of every kernel file, compiled once per process (in parallel: NVRTC takes a while per
/// file).
fn all_ptx() -> &'static BTreeMap<&'static str, String> {
    static PTX: OnceLock<BTreeMap<&'static str, String>> = OnceLock::new();
    PTX.get_or_init(|| {
        let files = kernel_files();
        std::thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .map(|f| (*f, s.spawn(move || kernel_ptx(f, ptx_arch(f)).unwrap())))
                .collect();
            handles
                .into_iter()
                .map(|(f, h)| (f, h.join().unwrap()))
                .collect()
        })
    })
}

/// The kernel emulator (cuda/emu) holds every kernel of every file, the Hopper file's included (its
/// wgmma / TMA / mbarrier PTX runs on cuda/emu/sm90.h): a kernel missing its FJ_REGISTER line would
/// make emulated runs fail.
#[test]
fn every_kernel_is_in_the_emulator() {
    if !flashjvp::cuda::nvrtc_or_skip() {
        return;
    }
    let Some(emu) = flashjvp::cuda::emulator::emulator_or_skip() else {
        return;
    };
    let have: BTreeSet<&str> = emu.kernels().iter().map(|s| s.as_str()).collect();
    let mut missing = Vec::new();
    let mut count = 0;
    for (file, text) in all_ptx() {
        for (name, _) in ptx_signatures(text) {
            count += 1;
            if !have.contains(name.as_str()) {
                missing.push(format!("{file}: {name}"));
            }
        }
    }
    println!("{count} kernels, {} in the emulator", have.len());
    assert!(count > 100, "only {count} kernels in the PTX");
    assert!(
        missing.is_empty(),
        "kernels the emulator lacks:\n{}",
        missing.join("\n")
    );
}

/// The softmax exponentials are one MUFU.EX2 each: `ex2.approx.ftz.f32` (common.cuh, fj_exp2). Without
/// `.ftz` ptxas wraps every ex2 in a range check and two predicated multiplies (four instructions
/// instead of one: about a seventh of the d64 Hopper JVP's steady loop).
#[test]
fn attention_exponentials_flush_subnormals() {
    if !flashjvp::cuda::nvrtc_or_skip() {
        return;
    }
    for (file, text) in all_ptx() {
        let plain = text.matches("ex2.approx.f32").count();
        assert_eq!(plain, 0, "{file}: {plain} ex2.approx.f32 without .ftz");
        if file.starts_with("attention_") {
            assert!(
                text.contains("ex2.approx.ftz.f32"),
                "{file}: no ex2.approx.ftz.f32 (the softmax's exponentials)"
            );
        }
    }
}

#[test]
fn every_launch_matches_its_kernel_signature() {
    if !flashjvp::cuda::nvrtc_or_skip() {
        return;
    }
    let ptx = all_ptx();
    let mut sigs: BTreeMap<(&str, String), Vec<ArgKind>> = BTreeMap::new();
    let mut maxntid: BTreeMap<String, u32> = BTreeMap::new();
    for (file, text) in ptx {
        for (name, params) in ptx_signatures(text) {
            sigs.insert((file, name), params);
        }
        maxntid.extend(ptx_max_threads(text));
    }
    assert!(
        sigs.len() > 100,
        "only {} kernels found in the PTX",
        sigs.len()
    );

    let launches: Vec<Launch> = all_plans()
        .into_iter()
        .filter_map(|s| match s {
            Step::Kernel(l) => Some(l),
            _ => None,
        })
        .collect();
    let mut failures = Vec::new();
    let mut used = BTreeSet::new();
    for l in &launches {
        let key = (l.file(), l.kernel().to_string());
        let Some(params) = sigs.get(&key) else {
            failures.push(format!("{}: no kernel {} in the PTX", l.file(), l.kernel()));
            continue;
        };
        used.insert(key.clone());
        let kinds: Vec<ArgKind> = l.args().iter().map(|a| a.kind()).collect();
        if &kinds != params {
            failures.push(format!(
                "{}: arguments {kinds:?} but the kernel takes {params:?}",
                l.kernel()
            ));
        }
        let threads = l.block().0 * l.block().1 * l.block().2;
        if let Some(max) = maxntid.get(l.kernel()) {
            if threads > *max {
                failures.push(format!(
                    "{}: block of {threads} threads, kernel bound {max}",
                    l.kernel()
                ));
            }
        }
        if threads > 1024 || l.shared_bytes() as usize > 227 * 1024 {
            failures.push(format!(
                "{}: {threads} threads, {} bytes of shared memory",
                l.kernel(),
                l.shared_bytes()
            ));
        }
    }
    let unused: Vec<String> = sigs
        .keys()
        .filter(|k| !used.contains(*k))
        .map(|(f, k)| format!("{f}: {k}"))
        .collect();
    println!(
        "{} launches checked over {} kernels; {} kernels without a launcher",
        launches.len(),
        used.len(),
        unused.len()
    );
    assert!(
        failures.is_empty(),
        "launch plan mismatches:\n{}",
        failures.join("\n")
    );
    assert!(
        unused.is_empty(),
        "kernels no plan launches:\n{}",
        unused.join("\n")
    );
}
