//! `flashjvp bench dit_block`: one DiT block (adaLN-zero: modulated layernorm, fused qkv, attention,
//! projection, gated residual, modulated layernorm, GELU MLP of width 4C, gated residual) timed
//! with CUDA events in its three passes — forward, JVP (the dual forward with tangents on x and on
//! every modulation vector, as the rCM student's dual forward carries them) and the backward through
//! the primal — and in the two training steps they make: forward + backward (a plain
//! flow-matching or DMD step) against dual forward + backward (the sCM/rCM step, whose dual forward
//! replaces the reference's JVP pass and second forward, DESIGN.md section 5).
//!
//! The block is the one `crate::dit::gpu` runs (same plan builders), in the storage dtype asked
//! for (bf16 by default; modulation vectors f32). The modulation linear itself is outside the
//! block (one GEMM for all blocks in the DiT) and is not timed. The backward's plan starts with a
//! device copy of the output cotangent into its running buffer (it is updated in place), which is
//! included in the timing (one read and one write of [T, C]).
//!
//! Rates count the GEMMs (2·T·C·(4C + 2·Hd) for the forward, twice that for the JVP and the
//! backward) and attention as the attention benchmark does (4·B·N²·C forward, 12· JVP, 10·
//! backward); movement kernels (head split/merge) and layernorms are not counted.

use super::attention_sm90 as sm90;
use super::bench::{row, step_rows, steps_wanted, time_plans, BenchOp, BenchRow, Pool, BUDGET_MS};
use super::context::Gpu;
use super::launch::Step;
use super::tensor::one_bits;
use crate::dit::gpu::{
    plan_block_backward, plan_block_forward, BlockAlloc, BlockDims, BlockGradAlloc, BlockParams,
    Mods,
};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The shapes of the issue: DiT-XL-like widths at two token counts.
pub fn default_shapes() -> Vec<Vec<usize>> {
    vec![vec![2, 4096, 1536, 12], vec![8, 1024, 1152, 16]]
}

/// The block of a benchmark shape B,N,C,heads (MLP width 4C), checked as the block's kernels
/// take it.
fn block_dims(shape: &[usize]) -> Result<BlockDims> {
    let [b, n, c, heads] = *shape else {
        return Err(Error::Unsupported(format!(
            "dit_block benchmark shape {shape:?}: expected B,N,C,heads"
        )));
    };
    let hd = c.checked_mul(4).ok_or_else(|| {
        Error::invalid(
            "bench",
            format!("dit_block benchmark shape {shape:?}: the MLP width 4C = 4*{c} overflows"),
        )
    })?;
    let d = BlockDims { b, n, c, heads, hd };
    d.check()?;
    Ok(d)
}

/// The bytes [`bench_block`] allocates at `shape` (checked first; `None` if they do not fit a
/// `usize`): weights and their gradients, the modulation vectors, the primal and the dual
/// forward's buffers, the backward's scratch.
pub(crate) fn working_set(shape: &[usize], dtype: DType) -> Result<Option<usize>> {
    let d = block_dims(shape)?;
    let (b, c, hd, t) = (d.b, d.c, d.hd, d.t());
    let s = dtype.size_in_bytes();
    // Within the block's checks: 3C and 2T fit an int, B·heads·N the attention's grid.
    let (c3, t2, rows) = (3 * c, 2 * t, d.b * d.heads * d.n);
    let params = BlockParams::shapes(c, hd);
    let mut all: Vec<(&[usize], usize)> = params.iter().map(|p| (&p[..], 2 * s)).collect();
    let (tc, t3c, thd, t2c, t2hd) = ([t, c], [t, c3], [t, hd], [t2, c], [t2, hd]);
    let (mods, tn, lse) = ([6, b, c], [t], [rows]);
    all.extend([
        (&mods[..], 3 * 4),
        // x, tx, dout, dx; the forward's [T, C] buffers, the dual one's, its tangents', the
        // backward's.
        (&tc[..], (4 + 7 + 5 + 5 + 3) * s),
        (&t3c[..], 4 * s),
        (&thd[..], 4 * s),
        (&t2c[..], 2 * s),
        (&t2hd[..], s),
        // Statistics (f32) and the ones row.
        (&tn[..], 8 * 4 + s),
        (&lse[..], 4 * 4),
    ]);
    Ok(super::bench::bytes_of(&all))
}

/// Times one block at `shape` = B,N,C,heads (MLP width 4C) in `dtype`.
pub(crate) fn bench_block(
    gpu: &Gpu,
    pool: &mut Pool,
    shape: &[usize],
    dtype: DType,
) -> Result<Vec<BenchRow>> {
    let d = block_dims(shape)?;
    let (b, n, c) = (d.b, d.n, d.c);
    let (t, hd) = (d.t(), d.hd);
    // Weights at 1/sqrt(fan-in), biases at 0.1.
    let shapes = BlockParams::shapes(c, hd);
    let w = shapes
        .iter()
        .map(|s| {
            let scale = if s.len() == 2 {
                1.0 / (s[1] as f32).sqrt()
            } else {
                0.1
            };
            pool.tensor(gpu, s, dtype, scale)
        })
        .collect::<Result<Vec<_>>>()?;
    let p = BlockParams::of(&w)?;
    let mods = pool.tensor(gpu, &[6, b, c], DType::F32, 0.3)?;
    let tmods = pool.tensor(gpu, &[6, b, c], DType::F32, 0.3)?;
    let m = Mods::chunks(mods.ptr(), 0, b, c);
    let tm = Mods::chunks(tmods.ptr(), 0, b, c);
    let x = pool.tensor(gpu, &[t, c], dtype, 1.0)?;
    let tx = pool.tensor(gpu, &[t, c], dtype, 1.0)?;
    let dout = pool.tensor(gpu, &[t, c], dtype, 1.0)?;

    let fa = BlockAlloc::new(gpu, dtype, d, &x, None, false)?;
    let ja = BlockAlloc::new(gpu, dtype, d, &x, Some(&tx), true)?;
    let fwd = plan_block_forward(gpu.arch(), dtype, d, &p, &m, None, &fa.bufs, None)?;
    let jvp = plan_block_forward(
        gpu.arch(),
        dtype,
        d,
        &p,
        &m,
        Some(&tm),
        &ja.bufs,
        ja.tangents.as_ref(),
    )?;
    // Fill the saved buffers once, so the backward reads a forward's values.
    gpu.run(&fwd)?;
    gpu.run(&jvp)?;

    // The parameter gradients, then dx [T, C] and T ones.
    let (dx_shape, ones_shape) = ([t, c], [t]);
    let mut grad_shapes: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
    grad_shapes.extend([&dx_shape[..], &ones_shape[..]]);
    let grads = gpu.alloc_stacked(&grad_shapes, dtype)?;
    let dmods = gpu.alloc_out(&[6, b, c], DType::F32)?;
    let (dx, ones) = (&grads[8], &grads[9]);
    let (width, bits) = one_bits(dtype);
    gpu.run(&[Step::Fill {
        ptr: ones.ptr(),
        width,
        count: t,
        bits,
    }])?;
    let scratch = BlockGradAlloc::new(gpu, dtype, d, dx.ptr(), ones.ptr())?;
    let mut g = scratch.grads;
    g.dmods = Mods::chunks(dmods.ptr(), 0, b, c);
    g.dp = BlockParams::of(&grads[..8])?;
    let bwd_of = |a: &BlockAlloc| -> Result<Vec<Step>> {
        let mut s = vec![Step::Copy {
            src: dout.ptr(),
            dst: dx.ptr(),
            bytes: dx.bytes(),
        }];
        s.extend(plan_block_backward(
            gpu.arch(),
            dtype,
            d,
            &p,
            &m,
            &a.bufs,
            &g,
        )?);
        Ok(s)
    };
    let bwd = bwd_of(&fa)?;
    let fwd_bwd: Vec<Step> = fwd.iter().cloned().chain(bwd_of(&fa)?).collect();
    let jvp_bwd: Vec<Step> = jvp.iter().cloned().chain(bwd_of(&ja)?).collect();

    let adims = d.check()?;
    let fwd_path = sm90::path_for(gpu.arch(), dtype, adims).name();
    let bwd_path = sm90::bwd_path_for(gpu.arch(), dtype, adims).name();
    let gemm = 2.0 * t as f64 * c as f64 * (4 * c + 2 * hd) as f64;
    let att = b as f64 * (n as f64).powi(2) * c as f64;
    let mut rows = Vec::new();
    for (pass, plan, flops) in [
        ("fwd", &fwd, gemm + 4.0 * att),
        ("jvp", &jvp, 2.0 * gemm + 12.0 * att),
        ("bwd", &bwd, 2.0 * gemm + 10.0 * att),
        ("fwd+bwd", &fwd_bwd, 3.0 * gemm + 14.0 * att),
        ("jvp+bwd", &jvp_bwd, 4.0 * gemm + 22.0 * att),
    ] {
        let tm = time_plans(gpu, std::slice::from_ref(plan), BUDGET_MS)?;
        let mut r = row(BenchOp::DitBlock, pass, shape, dtype, tm);
        r.tflops = Some(flops / (tm.0 * 1e-3) / 1e12);
        // The attention kernels' paths: forward/JVP, and the backward's after a "+".
        r.path = Some(match pass {
            "fwd" | "jvp" => fwd_path.into(),
            "bwd" => bwd_path.into(),
            _ => format!("{fwd_path}+{bwd_path}"),
        });
        rows.push(r);
    }
    if steps_wanted() {
        for (pass, plan) in [("fwd", &fwd), ("jvp", &jvp), ("bwd", &bwd)] {
            let plans = std::slice::from_ref(plan);
            rows.extend(step_rows(
                gpu,
                BenchOp::DitBlock,
                shape,
                dtype,
                pass,
                plans,
            )?);
        }
    }
    drop((fa, ja, scratch, w));
    Ok(rows)
}
