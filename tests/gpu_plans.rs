//! The CUDA launch plans against the kernels themselves, without a GPU: every kernel any plan
//! launches exists in its file, every argument list matches the kernel's PTX parameter list (count
//! and ABI class: pointer/long long, int, float), every block fits the kernel's `.maxntid`, and
//! every kernel of every file is launched by some plan. A mismatch here would be silent memory
//! corruption on the GPU. Needs NVRTC (PTX only); without it the test says "skipped: no NVRTC",
//! and with FLASHJVP_REQUIRE_NVRTC=1 it fails instead.
#![cfg(feature = "cuda")]

use std::collections::{BTreeMap, BTreeSet};

use flashjvp::cuda::attention::{self as attn, Variant, HEAD_DIMS};
use flashjvp::cuda::elementwise::{self as ew, Activation, ResDims, ResJvpPtrs};
use flashjvp::cuda::launch::{kernel_ptx, ptx_max_threads, ptx_signatures, ArgKind, Launch, Step};
use flashjvp::cuda::layernorm::{self as ln, LnDims};
use flashjvp::cuda::mlp::{self, MlpDims, ParamPtrs};
use flashjvp::cuda::nvrtc::kernel_files;
use flashjvp::cuda::tensor::plan_cast;
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
            for v in [Variant::Jvp, Variant::JvpNoKv, Variant::Fwd] {
                s.extend(attn::plan_jvp(v, dtype, dims, jp, 0.125).unwrap());
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
            s.extend(attn::plan_backward(dtype, dims, bp, 0.125).unwrap());
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
        let bp = ln::BwdPtrs {
            dy: p(1),
            x: p(2),
            scale: p(3),
            mean: p(4),
            rstd: p(5),
            dx: p(6),
            dscale: p(7),
            dshift: p(8),
        };
        s.extend(ln::plan_backward(dtype, d, bp).unwrap());
        for act in [Activation::Silu, Activation::Gelu] {
            s.extend(ew::plan_activation_fwd(act, dtype, 1000, p(1), p(2)).unwrap());
            s.extend(ew::plan_activation_jvp(act, dtype, 1000, p(1), p(2), p(3), p(4)).unwrap());
            s.extend(ew::plan_activation_bwd(act, dtype, 1000, p(1), p(2), p(3)).unwrap());
        }
        s.extend(ew::plan_gelu_tangent(dtype, 1000, p(1), p(2), p(2)).unwrap());
        s.extend(ew::plan_bias_gelu(dtype, 10, 100, p(1), p(2), p(1), p(3)).unwrap());
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
        if dtype != DType::F32 {
            s.extend(plan_cast(DType::F32, dtype, 1000, p(1), p(2)).unwrap());
            s.extend(plan_cast(dtype, DType::F32, 1000, p(1), p(2)).unwrap());
        }
    }
    s.extend(ew::plan_timestep(7, 256, 10000.0, p(1), 0, p(2), 0).unwrap());
    s.extend(ew::plan_timestep(7, 256, 10000.0, p(1), p(3), p(2), p(4)).unwrap());
    s
}

#[test]
fn every_launch_matches_its_kernel_signature() {
    if !flashjvp::cuda::nvrtc_present() {
        assert!(
            std::env::var("FLASHJVP_REQUIRE_NVRTC").is_err(),
            "FLASHJVP_REQUIRE_NVRTC is set but NVRTC cannot be loaded"
        );
        println!("skipped: no NVRTC");
        return;
    }
    // Compile each file to PTX once (in parallel: NVRTC takes a while per file).
    let files = kernel_files();
    let ptx: BTreeMap<&str, String> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .map(|f| (*f, s.spawn(move || kernel_ptx(f, "compute_80").unwrap())))
            .collect();
        handles
            .into_iter()
            .map(|(f, h)| (f, h.join().unwrap()))
            .collect()
    });
    let mut sigs: BTreeMap<(&str, String), Vec<ArgKind>> = BTreeMap::new();
    let mut maxntid: BTreeMap<String, u32> = BTreeMap::new();
    for (file, text) in &ptx {
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
        let key = (l.file, l.kernel.clone());
        let Some(params) = sigs.get(&key) else {
            failures.push(format!("{}: no kernel {} in the PTX", l.file, l.kernel));
            continue;
        };
        used.insert(key.clone());
        let kinds: Vec<ArgKind> = l.args.iter().map(|a| a.kind()).collect();
        if &kinds != params {
            failures.push(format!(
                "{}: arguments {kinds:?} but the kernel takes {params:?}",
                l.kernel
            ));
        }
        let threads = l.block.0 * l.block.1 * l.block.2;
        if let Some(max) = maxntid.get(&l.kernel) {
            if threads > *max {
                failures.push(format!(
                    "{}: block of {threads} threads, kernel bound {max}",
                    l.kernel
                ));
            }
        }
        if threads > 1024 || l.shared_bytes as usize > 227 * 1024 {
            failures.push(format!(
                "{}: {threads} threads, {} bytes of shared memory",
                l.kernel, l.shared_bytes
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
