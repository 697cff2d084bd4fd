//! GPU timings of forward, JVP and backward per op, with CUDA events: plans are built once and
//! replayed (no allocation or poisoning inside the timed region), a few warm-up runs first (module
//! load and cuBLASLt's heuristics stay out), then the median of many runs. Inputs are random normal
//! values (never zeros: they can run faster than real data), cut from a random pool at random
//! offsets; when one input set fits in the L2 cache several sets are rotated so that the timings
//! are not the cache's.
//!
//! Under the kernel emulator (`FLASHJVP_EMULATE`) the same code runs with the host's clock in
//! place of events: the figures are the CPU's and mean nothing for a GPU, but every plan and
//! timing path of the benchmark is exercised without one (tests/cli.rs does, in CI).
//!
//! Effective rates: attention counts 4·B·H·Nq·Nk·d flops for the forward, 12· for the JVP (3x the
//! forward, DESIGN.md section 7), 8· for the JVP with constant K and V, 10· for the backward; the
//! MLP counts its GEMMs (4·T·C·Hd forward, 8· JVP, 10· backward); layernorm, rms_norm and rope
//! report GB/s of the bytes they must move (each input read once, each output written once).
//!
//! Attention rows say which kernels ran (`path`: sm80 or sm90a, as the dispatcher picks them on
//! this GPU); where the Hopper path runs, the sm_80 kernels are timed too (passes `fwd_sm80`,
//! `jvp_sm80`, `jvp_nokv_sm80`), so that one run shows both. With Nq = Nk the packed layout is timed too (passes
//! `fwd_packed`, `jvp_packed`: q, k, v read in place from a [B, N, 3, H, d] projection, o written
//! token-major [B, N, H, d], as the DiT runs it), on the dispatcher's path.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::attention::{self as attn, AttnDims, Variant};
use super::attention_sm90::{self as sm90, Path};
use super::context::Gpu;
use super::launch::{dtype_suffix, require_ptrs, Arg, Launch, Step};
use super::layernorm::{self as ln, LnDims};
use super::mlp::{self, MlpDims, ParamPtrs};
use super::rmsnorm::{self as rms, RmsDims};
use super::rope;
use super::tensor::DeviceTensor;
use crate::error::{Error, Result};
use crate::ops::rope::{RopeDims, RopePairs};
use crate::tensor::DType;

/// The ops the benchmark knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchOp {
    /// shape B,H,Nq,Nk,d (or B,H,N,d).
    Attention,
    /// shape T,C (or T,C,G with G modulation groups).
    LayerNorm,
    /// shape T,C,Hd.
    Mlp,
    /// shape B,N,C,heads: one DiT block (see [`super::bench_dit`]).
    DitBlock,
    /// shape T,C.
    RmsNorm,
    /// shape B,N,H,d (token-major heads, tables [N, d/2], interleaved pairs).
    Rope,
}

impl BenchOp {
    /// The op named on the command line: `attention`, `layernorm_mod` (or `layernorm`), `mlp`,
    /// `dit_block`; anything else is an `Error::Unsupported` listing them.
    pub fn parse(s: &str) -> Result<BenchOp> {
        match s {
            "attention" => Ok(BenchOp::Attention),
            "layernorm" | "layernorm_mod" => Ok(BenchOp::LayerNorm),
            "mlp" => Ok(BenchOp::Mlp),
            "dit_block" => Ok(BenchOp::DitBlock),
            "rms_norm" => Ok(BenchOp::RmsNorm),
            "rope" => Ok(BenchOp::Rope),
            other => Err(Error::Unsupported(format!(
                "unknown benchmark op `{other}`: expected attention, layernorm_mod, mlp, dit_block, \
                 rms_norm or rope"
            ))),
        }
    }

    /// The name in rows and ratio lines (what [`BenchOp::parse`] accepts; `layernorm_mod` for
    /// [`BenchOp::LayerNorm`]).
    pub fn name(self) -> &'static str {
        match self {
            BenchOp::Attention => "attention",
            BenchOp::LayerNorm => "layernorm_mod",
            BenchOp::Mlp => "mlp",
            BenchOp::DitBlock => "dit_block",
            BenchOp::RmsNorm => "rms_norm",
            BenchOp::Rope => "rope",
        }
    }

    /// The shapes timed when none is given: for attention every anchor of DESIGN.md section 7, then
    /// d72 and d96 variants of the (16,16,1024) and (1,12,4096) anchors (on Hopper the sm_90a kernels
    /// with narrower swizzles, the sm_80 ones timed beside them) and the DiT-like (2,16,4096,d72).
    pub fn default_shapes(self) -> Vec<Vec<usize>> {
        match self {
            BenchOp::Attention => vec![
                vec![16, 16, 1024, 1024, 64],
                vec![1, 12, 4096, 4096, 64],
                vec![1, 12, 16384, 16384, 64],
                vec![16, 16, 1024, 1024, 128],
                vec![1, 12, 4096, 4096, 128],
                vec![1, 12, 16384, 16384, 128],
                vec![1, 12, 32768, 32768, 128],
                vec![16, 16, 1024, 1024, 72],
                vec![1, 12, 4096, 4096, 72],
                vec![16, 16, 1024, 1024, 96],
                vec![1, 12, 4096, 4096, 96],
                vec![2, 16, 4096, 4096, 72],
            ],
            BenchOp::LayerNorm => vec![vec![8192, 1536, 2], vec![32768, 1152, 8]],
            BenchOp::Mlp => vec![vec![8192, 1536, 6144], vec![8192, 1152, 4608]],
            BenchOp::DitBlock => super::bench_dit::default_shapes(),
            // Wan 14B's full-width q/k norm (C 5120, 8192 tokens) and a per-head norm (Flux's,
            // d 128 over B·N·H rows).
            BenchOp::RmsNorm => vec![vec![8192, 5120], vec![98304, 128]],
            // Flux-like (B2, N4096, 24 heads of 128) and the attention anchor (1, 16384, 12, 64).
            BenchOp::Rope => vec![vec![2, 4096, 24, 128], vec![1, 16384, 12, 64]],
        }
    }
}

/// One timed pass.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    /// The op's name ([`BenchOp::name`]).
    pub op: String,
    /// What was timed: `fwd`, `jvp`, `bwd`, and per op `jvp_nokv`, `*_sm80`, `*_packed`,
    /// `fwd+bwd`, `jvp+bwd`.
    pub pass: String,
    /// The benchmark shape; attention's always as B,H,Nq,Nk,d (a B,H,N,d request expanded).
    pub shape: Vec<usize>,
    /// The storage dtype's name (`bf16`, `f16`, `f32`).
    pub dtype: String,
    /// Median milliseconds.
    pub ms: f64,
    /// Spread: the 10th and 90th percentile, milliseconds.
    pub ms_p10: f64,
    /// The 90th percentile, milliseconds.
    pub ms_p90: f64,
    /// Timed runs (5 to 200, sized to the time budget).
    pub runs: usize,
    /// Effective TFLOP/s at the median time, from the op's flop count (module docs); `None` for
    /// layernorm.
    pub tflops: Option<f64>,
    /// Effective GB/s at the median time (layernorm, rms_norm and rope; `None` elsewhere).
    pub gbps: Option<f64>,
    /// Attention: which kernels ran (`sm80` or `sm90a`).
    pub path: Option<String>,
}

impl BenchRow {
    /// The row as one line of JSON; `tflops`, `gbps` and `path` only when set.
    pub fn json(&self) -> String {
        let mut v = serde_json::json!({
            "op": self.op,
            "pass": self.pass,
            "shape": self.shape,
            "dtype": self.dtype,
            "ms": self.ms,
            "ms_p10": self.ms_p10,
            "ms_p90": self.ms_p90,
            "runs": self.runs,
        });
        if let Some(t) = self.tflops {
            v["tflops"] = serde_json::json!(t);
        }
        if let Some(g) = self.gbps {
            v["gbps"] = serde_json::json!(g);
        }
        if let Some(p) = &self.path {
            v["path"] = serde_json::json!(p);
        }
        v.to_string()
    }

    /// The row as one aligned text line: op, pass, path, shape, dtype, median and spread in ms,
    /// runs, then the rate (TFLOP/s, else GB/s) if any.
    pub fn line(&self) -> String {
        let rate = match (self.tflops, self.gbps) {
            (Some(t), _) => format!("{t:8.1} TFLOP/s"),
            (_, Some(g)) => format!("{g:8.1} GB/s"),
            _ => String::new(),
        };
        format!(
            "{:14} {:9} {:5} {:24} {:5} {:10.4} ms  [{:.4} .. {:.4}, {} runs]  {rate}",
            self.op,
            self.pass,
            self.path.as_deref().unwrap_or(""),
            format!("{:?}", self.shape),
            self.dtype,
            self.ms,
            self.ms_p10,
            self.ms_p90,
            self.runs
        )
    }
}

/// The ratios a shape's rows answer (printed after them in text mode): the JVP over its own forward
/// for every op, with the issues' ceilings where they set one (MLP 2.3x; DiT block 2.5x at B2 N4096
/// C1536 12 heads), and for the DiT block the rCM training step (dual forward + backward) over a
/// plain one (forward + backward). Only rows of one op and shape are expected.
pub fn ratio_lines(op: BenchOp, rows: &[BenchRow]) -> Vec<String> {
    let ms = |pass: &str| rows.iter().find(|r| r.pass == pass).map(|r| r.ms);
    let Some(shape) = rows.first().map(|r| &r.shape) else {
        return Vec::new();
    };
    let ceiling = match op {
        BenchOp::Mlp => Some(2.3),
        BenchOp::DitBlock if shape[..] == [2, 4096, 1536, 12] => Some(2.5),
        _ => None,
    };
    let mut out = Vec::new();
    let mut ratio = |label: &str, num: &str, den: &str, ceiling: Option<f64>| {
        if let (Some(a), Some(b)) = (ms(num), ms(den)) {
            let verdict = match ceiling {
                Some(c) if a / b <= c => format!("  (target <= {c}x: met)"),
                Some(c) => format!("  (target <= {c}x: MISSED)"),
                None => String::new(),
            };
            out.push(format!(
                "{:14} {label:>22} {shape:?}: {:.2}x{verdict}",
                op.name(),
                a / b
            ));
        }
    };
    ratio("jvp / fwd", "jvp", "fwd", ceiling);
    if op == BenchOp::DitBlock {
        ratio("(jvp+bwd) / (fwd+bwd)", "jvp+bwd", "fwd+bwd", None);
    }
    out
}

/// Random normal values to cut inputs from.
pub(crate) struct Pool {
    values: Vec<f32>,
    rng: StdRng,
}

impl Pool {
    pub(crate) fn new(seed: u64) -> Pool {
        let mut rng = StdRng::seed_from_u64(seed);
        let values = (0..1 << 22)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        Pool { values, rng }
    }

    /// A fresh random tensor (values times `scale`) on the GPU, copied a chunk at a time (the
    /// host never holds the whole tensor; its size is checked by [`Gpu::alloc`]).
    pub(crate) fn tensor(
        &mut self,
        gpu: &Gpu,
        shape: &[usize],
        dtype: DType,
        scale: f32,
    ) -> Result<DeviceTensor> {
        let start = self.rng.random_range(0..self.values.len());
        let vals = self.values.iter().cycle().skip(start).map(|v| v * scale);
        gpu.upload_values(shape, dtype, vals)
    }
}

/// The launch of cuda/bench.cu's `bench_busy`: one warp busy for about `iters` dependent FMAs,
/// with no memory traffic; `sink` (one f32) is never written in practice.
pub fn plan_busy(iters: u64, sink: u64) -> Result<Vec<Step>> {
    require_ptrs("bench", &[("sink", sink)])?;
    let iters = i64::try_from(iters)
        .map_err(|_| Error::invalid("bench", format!("{iters} busy iterations")))?;
    Ok(vec![Step::Kernel(Launch::new(
        "bench",
        "bench.cu",
        "bench_busy",
        (1, 1, 1),
        (32, 1, 1),
        0,
        vec![Arg::I64(iters), Arg::Ptr(sink)],
    )?)])
}

/// A point in the stream's work that time is measured from: a CUDA event on a GPU; under the
/// kernel emulator, which finishes each plan before `Gpu::run` returns, the host's clock when it
/// is recorded (its timings say nothing about a GPU, but the benchmark's code runs end to end).
enum Mark {
    Cuda(cudarc::driver::CudaEvent),
    Host(std::cell::Cell<Option<std::time::Instant>>),
}

impl Mark {
    fn new(gpu: &Gpu) -> Result<Mark> {
        Ok(if gpu.is_emulated() {
            Mark::Host(std::cell::Cell::new(None))
        } else {
            Mark::Cuda(gpu.event()?)
        })
    }

    fn record(&self, gpu: &Gpu) -> Result<()> {
        match self {
            Mark::Cuda(e) => e
                .record(gpu.stream()?)
                .map_err(super::context::cuda_err("event")),
            Mark::Host(t) => {
                t.set(Some(std::time::Instant::now()));
                Ok(())
            }
        }
    }

    /// Milliseconds from `self` to `end` (both recorded; a GPU event waits for its work).
    fn ms_to(&self, end: &Mark) -> Result<f64> {
        match (self, end) {
            (Mark::Cuda(a), Mark::Cuda(b)) => a
                .elapsed_ms(b)
                .map(|m| m as f64)
                .map_err(super::context::cuda_err("event timing")),
            (Mark::Host(a), Mark::Host(b)) => match (a.get(), b.get()) {
                (Some(a), Some(b)) => Ok(b.saturating_duration_since(a).as_secs_f64() * 1e3),
                _ => Err(Error::invalid(
                    "bench",
                    "a timing mark read before it was recorded",
                )),
            },
            _ => Err(Error::invalid("bench", "timing marks of two kinds")),
        }
    }
}

/// Times `plans[i % plans.len()]` (one plan per input set): warm-up, then the median of runs
/// sized to about `budget_ms` in all (at least 5, at most 200). On a GPU the timed runs are queued
/// behind a busy kernel that outlasts their queueing (measured after the warm-up), so that they
/// run back to back and each event pair times the GPU's work, not the host's launch overhead.
pub(crate) fn time_plans(
    gpu: &Gpu,
    plans: &[Vec<Step>],
    budget_ms: f64,
) -> Result<(f64, f64, f64, usize)> {
    let sink = gpu.alloc(&[1], DType::F32)?;
    gpu.run(&plan_busy(1, sink.ptr())?)?; // its module loaded outside any timing
    for p in plans.iter().cycle().take(plans.len().max(3)) {
        gpu.run(p)?;
    }
    gpu.synchronize()?;
    let (e0, e1) = (Mark::new(gpu)?, Mark::new(gpu)?);
    e0.record(gpu)?;
    let t0 = std::time::Instant::now();
    gpu.run(&plans[0])?;
    // The host's cost of queueing one run (warm: modules loaded, GEMM heuristics cached).
    let host_ms = t0.elapsed().as_secs_f64() * 1e3;
    e1.record(gpu)?;
    let once = e0.ms_to(&e1)?;
    let runs = ((budget_ms / once.max(1e-3)) as usize).clamp(5, 200);

    let marks: Vec<_> = (0..2 * runs)
        .map(|_| Mark::new(gpu))
        .collect::<Result<_>>()?;
    if !gpu.is_emulated() {
        // The busy kernel's speed, then enough of it to cover the queueing of every timed run
        // (with its two events) twice over, 1 to 500 ms. (The emulator runs each plan before
        // `run` returns: nothing to cover.)
        const PROBE: u64 = 1 << 16;
        let probe = plan_busy(PROBE, sink.ptr())?;
        e0.record(gpu)?;
        gpu.run(&probe)?;
        e1.record(gpu)?;
        let ms_per_iter = e0.ms_to(&e1)?.max(1e-6) / PROBE as f64;
        let cover_ms = (2.0 * runs as f64 * (host_ms + 0.02)).clamp(1.0, 500.0);
        let iters = (cover_ms / ms_per_iter).min(1e12) as u64;
        gpu.run(&plan_busy(iters, sink.ptr())?)?;
    }
    for i in 0..runs {
        marks[2 * i].record(gpu)?;
        gpu.run(&plans[i % plans.len()])?;
        marks[2 * i + 1].record(gpu)?;
    }
    gpu.synchronize()?;
    let mut ms: Vec<f64> = (0..runs)
        .map(|i| marks[2 * i].ms_to(&marks[2 * i + 1]))
        .collect::<Result<_>>()?;
    ms.sort_by(|a, b| a.total_cmp(b));
    let q = |f: f64| ms[((runs - 1) as f64 * f).round() as usize];
    Ok((q(0.5), q(0.1), q(0.9), runs))
}

/// Whether `FLASHJVP_BENCH_STEPS=1` asks for [`step_rows`] after the forward, JVP and backward
/// rows of the MLP and the DiT block.
pub(crate) fn steps_wanted() -> bool {
    std::env::var("FLASHJVP_BENCH_STEPS").as_deref() == Ok("1")
}

/// A step in a few words, for a row's `path` column.
fn step_label(step: &Step) -> String {
    match step {
        Step::Kernel(l) => l.kernel.clone(),
        Step::Gemm(g) => {
            let act = format!("{:?}", g.act); // the variant's name, without its aux address
            format!(
                "gemm {}x{}x{}{} {}",
                g.m,
                g.n,
                g.k,
                if g.bias.is_some() { "+bias" } else { "" },
                act.split(' ').next().unwrap_or_default()
            )
        }
        Step::Fill { count, .. } => format!("fill {count}"),
        Step::Copy { bytes, .. } => format!("copy {bytes} B"),
        Step::ZeroRows {
            rows, row_bytes, ..
        } => format!("zero {rows} x {row_bytes} B"),
    }
}

/// Each step of `pass`'s plans timed alone (the same step of every input set, rotated), one row
/// each: pass `"{pass}.{k}"`, the step's label as `path`: where a pass spends its time. A step run
/// alone finds other data in the L2 than after its predecessor, so the sum need not match the pass.
pub(crate) fn step_rows(
    gpu: &Gpu,
    op: BenchOp,
    shape: &[usize],
    dtype: DType,
    pass: &str,
    plans: &[Vec<Step>],
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let Some(first) = plans.first() else {
        return Ok(rows);
    };
    for (k, step) in first.iter().enumerate() {
        let alone: Vec<Vec<Step>> = plans
            .iter()
            .filter_map(|p| p.get(k).map(|s| vec![s.clone()]))
            .collect();
        let tm = time_plans(gpu, &alone, BUDGET_MS / 6.0)?;
        let mut r = row(op, &format!("{pass}.{k}"), shape, dtype, tm);
        r.path = Some(step_label(step));
        rows.push(r);
    }
    Ok(rows)
}

/// How many input sets to rotate: enough to exceed 4x the L2 cache when one set is smaller than
/// 2x L2, at most 8, and within a quarter of the GPU memory.
fn sets_for(gpu: &Gpu, set_bytes: usize) -> usize {
    let l2 = gpu.info().l2_bytes.max(1);
    if set_bytes >= 2 * l2 {
        return 1;
    }
    let want = (4 * l2).div_ceil(set_bytes.max(1)).clamp(1, 8);
    let fit = (gpu.info().total_mem_bytes / 4 / set_bytes.max(1)).max(1);
    want.min(fit)
}

/// Times forward, JVP and backward of `op` at `shape` in `dtype`. The shape is checked first
/// ([`working_set`]), then against the GPU's memory, before any kernel is compiled or any tensor
/// built.
pub fn bench(op: BenchOp, shape: &[usize], dtype: DType) -> Result<Vec<BenchRow>> {
    let need = working_set(op, shape, dtype)?;
    let gpu = Gpu::get()?;
    check_fits(op, shape, dtype, need, gpu.info().total_mem_bytes)?;
    gpu.preload()?;
    // Wrapping: any number of dims of any size makes a seed.
    let seed = shape
        .iter()
        .fold(17u64, |h, &s| h.wrapping_mul(31).wrapping_add(s as u64));
    let mut pool = Pool::new(0x5eed ^ seed);
    let rows = match op {
        BenchOp::Attention => bench_attention(&gpu, &mut pool, shape, dtype)?,
        BenchOp::LayerNorm => bench_layernorm(&gpu, &mut pool, shape, dtype)?,
        BenchOp::Mlp => bench_mlp(&gpu, &mut pool, shape, dtype)?,
        BenchOp::DitBlock => super::bench_dit::bench_block(&gpu, &mut pool, shape, dtype)?,
        BenchOp::RmsNorm => bench_rms_norm(&gpu, &mut pool, shape, dtype)?,
        BenchOp::Rope => bench_rope(&gpu, &mut pool, shape, dtype)?,
    };
    Ok(rows)
}

/// Bytes of tensors of these shapes and element sizes, each rounded up to 256 bytes (an
/// allocation's alignment); `None` if the sum does not fit a `usize`.
pub(crate) fn bytes_of(tensors: &[(&[usize], usize)]) -> Option<usize> {
    tensors.iter().try_fold(0usize, |acc, &(shape, size)| {
        let n = shape
            .iter()
            .try_fold(size, |n, &d| n.checked_mul(d))?
            .checked_next_multiple_of(256)?;
        acc.checked_add(n)
    })
}

/// The dims of an attention benchmark shape B,H,Nq,Nk,d (or B,H,N,d), checked as the kernels
/// take them.
fn attention_dims(shape: &[usize]) -> Result<AttnDims> {
    let (b, h, nq, nk, d) = match *shape {
        [b, h, nq, nk, d] => (b, h, nq, nk, d),
        [b, h, n, d] => (b, h, n, n, d),
        _ => {
            return Err(Error::Unsupported(format!(
                "attention benchmark shape {shape:?}: expected B,H,Nq,Nk,d or B,H,N,d"
            )))
        }
    };
    attn::check_shapes(&[b, h, nq, d], &[b, h, nk, d], &[b, h, nk, d])
}

/// The dims of a layernorm benchmark shape T,C (or T,C,G), checked as the kernels take them.
fn layernorm_dims(shape: &[usize]) -> Result<LnDims> {
    let (t, c, g) = match *shape {
        [t, c] => (t, c, 1),
        [t, c, g] => (t, c, g),
        _ => {
            return Err(Error::Unsupported(format!(
                "layernorm benchmark shape {shape:?}: expected T,C or T,C,G"
            )))
        }
    };
    ln::check_x(&[t, c])?;
    if g == 0 || t % g != 0 {
        return Err(Error::Unsupported(format!(
            "layernorm benchmark: G = {g} must divide T = {t}"
        )));
    }
    Ok(LnDims { t, c, g })
}

/// The dims of an RMSNorm benchmark shape T,C, checked as the kernels take them.
fn rms_norm_dims(shape: &[usize]) -> Result<RmsDims> {
    let [t, c] = *shape else {
        return Err(Error::Unsupported(format!(
            "rms_norm benchmark shape {shape:?}: expected T,C"
        )));
    };
    let d = RmsDims { t, c };
    // The plan's checks (T, C at least 1 and within an int), on fake pointers.
    rms::plan_forward(DType::F32, d, 256, 256, 256, 0, 1e-6)?;
    Ok(d)
}

/// The dims of a rope benchmark shape B,N,H,d, checked as the kernel takes them.
fn rope_dims(shape: &[usize]) -> Result<RopeDims> {
    let [b, n, h, d] = *shape else {
        return Err(Error::Unsupported(format!(
            "rope benchmark shape {shape:?}: expected B,N,H,d"
        )));
    };
    let dims = crate::ops::rope::rope_dims(&[b, n, h, d], &[n, d / 2], &[n, d / 2])?;
    rope::plan_rope(
        DType::F32,
        dims,
        RopePairs::Interleaved,
        256,
        256,
        256,
        256,
        1.0,
    )?;
    Ok(dims)
}

/// The dims of an MLP benchmark shape T,C,Hd, checked as the GEMMs take them.
fn mlp_dims(shape: &[usize]) -> Result<MlpDims> {
    let [t, c, hd] = *shape else {
        return Err(Error::Unsupported(format!(
            "mlp benchmark shape {shape:?}: expected T,C,Hd"
        )));
    };
    mlp::check_shapes(&[t, c], &[hd, c], &[hd], &[c, hd], &[c])
}

/// `(one input set, everything)`: the bytes of the input set the timing loop rotates (what the
/// L2-cache rule of [`sets_for`] weighs), and of every buffer the benchmark allocates with one
/// set, both in checked arithmetic over dims the op's checks accepted.
fn sizes(op: BenchOp, shape: &[usize], dtype: DType) -> Result<(usize, usize)> {
    let s = dtype.size_in_bytes();
    let sizes = match op {
        BenchOp::Attention => {
            let d = attention_dims(shape)?;
            let (q, k, l) = (d.q_shape(), d.k_shape(), d.lse_shape());
            let packed = [d.b, d.nq, 3, d.h, d.d];
            let mut all: Vec<(&[usize], usize)> = vec![(&q, s); 6];
            all.extend([(&k[..], s); 6]);
            all.extend([(&l[..], 4); 4]);
            if d.nq == d.nk {
                all.extend([(&packed[..], s); 2]);
            }
            let set = bytes_of(&[(&q, 3 * s), (&k, 3 * s)]);
            set.zip(bytes_of(&all))
        }
        BenchOp::LayerNorm => {
            let LnDims { t, c, g } = layernorm_dims(shape)?;
            let set = bytes_of(&[(&[t, c], 3 * s)]);
            let all = bytes_of(&[(&[t, c], 6 * s), (&[g, c], 6 * 4), (&[t], 2 * 4)]);
            set.zip(all)
        }
        BenchOp::Mlp => {
            let MlpDims { t, c, hd } = mlp_dims(shape)?;
            let set = bytes_of(&[(&[t, c], 3 * s)]);
            let all = bytes_of(&[
                // Parameters and their gradients.
                (&[hd, c], 4 * s),
                (&[hd], 2 * s),
                (&[c], 2 * s),
                // [x; tx], gy, y, ty, dx.
                (&[t, c], 6 * s),
                // Scratch: [2T, Hd], two [T, Hd], T ones.
                (&[t, hd], 4 * s),
                (&[t], s),
            ]);
            set.zip(all)
        }
        BenchOp::DitBlock => {
            let all = super::bench_dit::working_set(shape, dtype)?;
            all.map(|a| (0, a))
        }
        BenchOp::RmsNorm => {
            let RmsDims { t, c } = rms_norm_dims(shape)?;
            let set = bytes_of(&[(&[t, c], 3 * s)]);
            // Per set x, tx, dy, w, tw; y, ty, dx, rrms, dw.
            let all = bytes_of(&[(&[t, c], 6 * s), (&[c], 2 * s + 4), (&[t], 4)]);
            set.zip(all)
        }
        BenchOp::Rope => {
            let RopeDims { b, n, h, d, .. } = rope_dims(shape)?;
            let set = bytes_of(&[(&[b, n, h, d], 3 * s)]);
            let all = bytes_of(&[(&[b, n, h, d], 5 * s), (&[n, d / 2], 2 * 4)]);
            set.zip(all)
        }
    };
    sizes.ok_or_else(|| {
        Error::invalid(
            "bench",
            format!(
                "{} benchmark shape {shape:?} in {dtype} needs more bytes than a usize holds",
                op.name()
            ),
        )
    })
}

/// Checks `shape` for `op` as the op's kernels take it and returns the bytes of GPU memory the
/// benchmark allocates for it (its working set with one input set). [`bench()`] refuses a shape
/// whose working set exceeds the GPU's memory before building any tensor.
pub fn working_set(op: BenchOp, shape: &[usize], dtype: DType) -> Result<usize> {
    dtype_suffix(dtype)?;
    Ok(sizes(op, shape, dtype)?.1)
}

/// Errors unless a working set of `need` bytes (from [`working_set`]) fits in `mem` bytes of GPU
/// memory, naming the op, the shape and both sizes.
pub fn check_fits(
    op: BenchOp,
    shape: &[usize],
    dtype: DType,
    need: usize,
    mem: usize,
) -> Result<()> {
    if need > mem {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        return Err(Error::invalid(
            "bench",
            format!(
                "{} benchmark shape {shape:?} in {dtype} needs {:.1} GiB of GPU memory, more than \
                 the GPU's {:.1} GiB",
                op.name(),
                gib(need),
                gib(mem)
            ),
        ));
    }
    Ok(())
}

pub(crate) const BUDGET_MS: f64 = 300.0;

pub(crate) fn row(
    op: BenchOp,
    pass: &str,
    shape: &[usize],
    dtype: DType,
    t: (f64, f64, f64, usize),
) -> BenchRow {
    BenchRow {
        op: op.name().into(),
        pass: pass.into(),
        shape: shape.to_vec(),
        dtype: dtype.name().into(),
        ms: t.0,
        ms_p10: t.1,
        ms_p90: t.2,
        runs: t.3,
        tflops: None,
        gbps: None,
        path: None,
    }
}

fn bench_attention(
    gpu: &Gpu,
    pool: &mut Pool,
    shape: &[usize],
    dtype: DType,
) -> Result<Vec<BenchRow>> {
    let dims = attention_dims(shape)?;
    let AttnDims {
        b, h, nq, nk, d, ..
    } = dims;
    let (set_bytes, _) = sizes(BenchOp::Attention, shape, dtype)?;
    let shape = [b, h, nq, nk, d];
    let scale = attn::resolve_scale(None, d)?;
    let s = dtype.size_in_bytes();
    let sets = sets_for(gpu, set_bytes);
    struct Set {
        q: DeviceTensor,
        k: DeviceTensor,
        v: DeviceTensor,
        tq: DeviceTensor,
        tk: DeviceTensor,
        tv: DeviceTensor,
        dout: DeviceTensor,
    }
    let mut inputs = Vec::new();
    for _ in 0..sets {
        inputs.push(Set {
            q: pool.tensor(gpu, &dims.q_shape(), dtype, 1.0)?,
            k: pool.tensor(gpu, &dims.k_shape(), dtype, 1.0)?,
            v: pool.tensor(gpu, &dims.k_shape(), dtype, 1.0)?,
            tq: pool.tensor(gpu, &dims.q_shape(), dtype, 1.0)?,
            tk: pool.tensor(gpu, &dims.k_shape(), dtype, 1.0)?,
            tv: pool.tensor(gpu, &dims.k_shape(), dtype, 1.0)?,
            dout: pool.tensor(gpu, &dims.q_shape(), dtype, 1.0)?,
        });
    }
    let o = gpu.alloc(&dims.q_shape(), dtype)?;
    let to = gpu.alloc(&dims.q_shape(), dtype)?;
    let lse = gpu.alloc(&dims.lse_shape(), DType::F32)?;
    let tlse = gpu.alloc(&dims.lse_shape(), DType::F32)?;
    let ptrs = |x: &Set| attn::JvpPtrs {
        q: x.q.ptr(),
        k: x.k.ptr(),
        v: x.v.ptr(),
        tq: x.tq.ptr(),
        tk: x.tk.ptr(),
        tv: x.tv.ptr(),
        o: o.ptr(),
        to: to.ptr(),
        lse: lse.ptr(),
        tlse: tlse.ptr(),
    };
    let flops = |mult: f64| mult * (b * h) as f64 * nq as f64 * nk as f64 * d as f64;
    let mut rows = Vec::new();
    let path = sm90::path_for(gpu.arch(), dtype, dims);
    let layout = attn::Layout::contiguous(dims);
    let mut passes = vec![
        ("fwd", Variant::Fwd, 4.0, path),
        ("jvp", Variant::Jvp, 12.0, path),
        ("jvp_nokv", Variant::JvpNoKv, 8.0, path),
    ];
    if path == Path::Sm90a {
        // The fallback on the same GPU, for the speed-up.
        passes.push(("fwd_sm80", Variant::Fwd, 4.0, Path::Sm80));
        passes.push(("jvp_sm80", Variant::Jvp, 12.0, Path::Sm80));
        passes.push(("jvp_nokv_sm80", Variant::JvpNoKv, 8.0, Path::Sm80));
    }
    for (pass, variant, mult, path) in passes {
        let plans = inputs
            .iter()
            .map(|x| match path {
                Path::Sm90a => sm90::plan(variant, dtype, dims, layout, ptrs(x), scale),
                Path::Sm80 => {
                    attn::plan_jvp_on(gpu.arch(), variant, dtype, dims, layout, ptrs(x), scale)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let t = time_plans(gpu, &plans, BUDGET_MS)?;
        let mut r = row(BenchOp::Attention, pass, &shape, dtype, t);
        r.tflops = Some(flops(mult) / (t.0 * 1e-3) / 1e12);
        r.path = Some(path.name().into());
        rows.push(r);
    }
    if attn::ValueProducts::F16.applies(Variant::Jvp, dtype, dims) {
        // The f16 value products (attn::ValueProducts::F16): the copies of V and V̇ included.
        let ws = gpu.alloc(
            &[attn::f16_values_workspace_bytes(Variant::Jvp, dims).div_ceil(4)],
            DType::F32,
        )?;
        let plans = inputs
            .iter()
            .map(|x| {
                let p = ptrs(x);
                sm90::plan_f16_values_for(
                    gpu.arch(),
                    Variant::Jvp,
                    dims,
                    layout,
                    p,
                    scale,
                    ws.ptr(),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let t = time_plans(gpu, &plans, BUDGET_MS)?;
        let mut r = row(BenchOp::Attention, "jvp_vf16", &shape, dtype, t);
        r.tflops = Some(flops(12.0) / (t.0 * 1e-3) / 1e12);
        r.path = Some(path.name().into());
        rows.push(r);
    }
    if b > 1 {
        // The JVP through the padded-keys plan with every key counted: the same work as "jvp" in
        // one launch per batch entry, so the ratio is that plan's launch and tail overhead.
        let lens = vec![nk; b];
        let plans = inputs
            .iter()
            .map(|x| {
                let (arch, p) = (gpu.arch(), ptrs(x));
                attn::plan_for_key_lens(arch, Variant::Jvp, dtype, dims, layout, p, scale, &lens)
            })
            .collect::<Result<Vec<_>>>()?;
        let t = time_plans(gpu, &plans, BUDGET_MS)?;
        let mut r = row(BenchOp::Attention, "jvp_key_lens", &shape, dtype, t);
        r.tflops = Some(flops(12.0) / (t.0 * 1e-3) / 1e12);
        r.path = Some(path.name().into());
        rows.push(r);
    }
    if nq == nk {
        let packed = attn::Layout::packed_qkv(dims);
        let step = (h * d * s) as u64;
        let mut sets = Vec::new();
        for _ in 0..inputs.len() {
            sets.push((
                pool.tensor(gpu, &[b, nq, 3, h, d], dtype, 1.0)?,
                pool.tensor(gpu, &[b, nq, 3, h, d], dtype, 1.0)?,
            ));
        }
        let pptrs = |(x, t): &(DeviceTensor, DeviceTensor)| attn::JvpPtrs {
            q: x.ptr(),
            k: x.ptr() + step,
            v: x.ptr() + 2 * step,
            tq: t.ptr(),
            tk: t.ptr() + step,
            tv: t.ptr() + 2 * step,
            o: o.ptr(),
            to: to.ptr(),
            lse: lse.ptr(),
            tlse: tlse.ptr(),
        };
        for (pass, variant, mult) in [
            ("fwd_packed", Variant::Fwd, 4.0),
            ("jvp_packed", Variant::Jvp, 12.0),
        ] {
            let plans = sets
                .iter()
                .map(|x| sm90::plan_for(gpu.arch(), variant, dtype, dims, packed, pptrs(x), scale))
                .collect::<Result<Vec<_>>>()?;
            let t = time_plans(gpu, &plans, BUDGET_MS)?;
            let mut r = row(BenchOp::Attention, pass, &shape, dtype, t);
            r.tflops = Some(flops(mult) / (t.0 * 1e-3) / 1e12);
            r.path = Some(path.name().into());
            rows.push(r);
        }
    }
    // Backward: o and lse of each set from its own forward, kept per set.
    let mut saved = Vec::new();
    for x in &inputs {
        let (o, lse) = attn::forward(&x.q, &x.k, &x.v, None)?;
        saved.push((o, lse));
    }
    let dq = gpu.alloc(&dims.q_shape(), dtype)?;
    let dk = gpu.alloc(&dims.k_shape(), dtype)?;
    let dv = gpu.alloc(&dims.k_shape(), dtype)?;
    let delta = gpu.alloc(&dims.lse_shape(), DType::F32)?;
    // The dispatcher's path ("bwd"), and on a Hopper the other one beside it, for the comparison
    // (the Hopper backward is opt-in until measured: sm90::bwd_path_for).
    let bpath = sm90::bwd_path_for(gpu.arch(), dtype, dims);
    let mut bwd_passes = vec![("bwd", bpath)];
    if sm90::supported(gpu.arch(), dtype, dims) {
        bwd_passes.push(match bpath {
            Path::Sm90a => ("bwd_sm80", Path::Sm80),
            Path::Sm80 => ("bwd_sm90a", Path::Sm90a),
        });
    }
    for (pass, path) in bwd_passes {
        let plans = inputs
            .iter()
            .zip(&saved)
            .map(|(x, (o, lse))| {
                let p = attn::BwdPtrs {
                    q: x.q.ptr(),
                    k: x.k.ptr(),
                    v: x.v.ptr(),
                    o: o.ptr(),
                    lse: lse.ptr(),
                    dout: x.dout.ptr(),
                    delta: delta.ptr(),
                    dq: dq.ptr(),
                    dk: dk.ptr(),
                    dv: dv.ptr(),
                };
                match path {
                    Path::Sm90a => sm90::plan_backward(dtype, dims, layout, p, scale),
                    Path::Sm80 => attn::plan_backward(dtype, dims, layout, p, scale),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let t = time_plans(gpu, &plans, BUDGET_MS)?;
        let mut r = row(BenchOp::Attention, pass, &shape, dtype, t);
        r.tflops = Some(flops(10.0) / (t.0 * 1e-3) / 1e12);
        r.path = Some(path.name().into());
        rows.push(r);
    }
    Ok(rows)
}

fn bench_layernorm(
    gpu: &Gpu,
    pool: &mut Pool,
    shape: &[usize],
    dtype: DType,
) -> Result<Vec<BenchRow>> {
    let d = layernorm_dims(shape)?;
    let LnDims { t, c, g } = d;
    let (set_bytes, _) = sizes(BenchOp::LayerNorm, shape, dtype)?;
    let sets = sets_for(gpu, set_bytes);
    // Bytes moved, for the rates (f64: no overflow to check).
    let (tc, s) = ((t * c) as f64, dtype.size_in_bytes() as f64);
    let mod_bytes = |n: usize| (n * g * c * 4) as f64;
    struct Set {
        x: DeviceTensor,
        tx: DeviceTensor,
        dy: DeviceTensor,
        m: Vec<DeviceTensor>,
    }
    let mut inputs = Vec::new();
    for _ in 0..sets {
        let mut m = Vec::new();
        for _ in 0..4 {
            m.push(pool.tensor(gpu, &[g, c], DType::F32, 0.3)?);
        }
        inputs.push(Set {
            x: pool.tensor(gpu, &[t, c], dtype, 1.0)?,
            tx: pool.tensor(gpu, &[t, c], dtype, 1.0)?,
            dy: pool.tensor(gpu, &[t, c], dtype, 1.0)?,
            m,
        });
    }
    let y = gpu.alloc(&[t, c], dtype)?;
    let ty = gpu.alloc(&[t, c], dtype)?;
    let stats = gpu.alloc_stacked(&[&[t], &[t]], DType::F32)?;
    let grads = gpu.alloc_stacked(&[&[g, c], &[g, c]], DType::F32)?;
    let dx = gpu.alloc(&[t, c], dtype)?;
    let mut rows = Vec::new();
    // forward (also saving the statistics the backward reads)
    let fwd = inputs
        .iter()
        .map(|x| {
            ln::plan_forward(
                dtype,
                d,
                x.x.ptr(),
                x.m[0].ptr(),
                x.m[1].ptr(),
                y.ptr(),
                stats[0].ptr(),
                stats[1].ptr(),
                1e-6,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let tm = time_plans(gpu, &fwd, BUDGET_MS)?;
    let mut r = row(BenchOp::LayerNorm, "fwd", shape, dtype, tm);
    r.gbps = Some((2.0 * tc * s + mod_bytes(2) + 8.0 * t as f64) / (tm.0 * 1e-3) / 1e9);
    rows.push(r);
    let jvp = inputs
        .iter()
        .map(|x| {
            ln::plan_jvp(
                dtype,
                d,
                ln::JvpPtrs {
                    x: x.x.ptr(),
                    tx: x.tx.ptr(),
                    scale: x.m[0].ptr(),
                    shift: x.m[1].ptr(),
                    tscale: x.m[2].ptr(),
                    tshift: x.m[3].ptr(),
                    y: y.ptr(),
                    ty: ty.ptr(),
                    mean: 0,
                    rstd: 0,
                },
                1e-6,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let tm = time_plans(gpu, &jvp, BUDGET_MS)?;
    let mut r = row(BenchOp::LayerNorm, "jvp", shape, dtype, tm);
    r.gbps = Some((4.0 * tc * s + mod_bytes(4)) / (tm.0 * 1e-3) / 1e9);
    rows.push(r);
    // backward with the statistics of the last forward (the timing does not depend on them)
    let bwd = inputs
        .iter()
        .map(|x| {
            ln::plan_backward(
                dtype,
                d,
                ln::BwdPtrs {
                    dy: x.dy.ptr(),
                    x: x.x.ptr(),
                    scale: x.m[0].ptr(),
                    mean: stats[0].ptr(),
                    rstd: stats[1].ptr(),
                    dres: 0,
                    dx: dx.ptr(),
                    dscale: grads[0].ptr(),
                    dshift: grads[1].ptr(),
                },
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let tm = time_plans(gpu, &bwd, BUDGET_MS)?;
    let mut r = row(BenchOp::LayerNorm, "bwd", shape, dtype, tm);
    r.gbps = Some((3.0 * tc * s + mod_bytes(3) + 8.0 * t as f64) / (tm.0 * 1e-3) / 1e9);
    rows.push(r);
    Ok(rows)
}

/// One row of a memory-bound op: `bytes` moved by one run of the plans (each input read once, each
/// output written once).
fn rate_row(
    op: BenchOp,
    pass: &str,
    shape: &[usize],
    dtype: DType,
    tm: (f64, f64, f64, usize),
    bytes: f64,
) -> BenchRow {
    let mut r = row(op, pass, shape, dtype, tm);
    r.gbps = Some(bytes / (tm.0 * 1e-3) / 1e9);
    r
}

fn bench_rms_norm(
    gpu: &Gpu,
    pool: &mut Pool,
    shape: &[usize],
    dtype: DType,
) -> Result<Vec<BenchRow>> {
    let d = rms_norm_dims(shape)?;
    let RmsDims { t, c } = d;
    let (set_bytes, _) = sizes(BenchOp::RmsNorm, shape, dtype)?;
    let sets = sets_for(gpu, set_bytes);
    let (tc, s) = ((t * c) as f64, dtype.size_in_bytes() as f64);
    let (w, tw) = (
        pool.tensor(gpu, &[c], dtype, 0.3)?,
        pool.tensor(gpu, &[c], dtype, 0.3)?,
    );
    let mut inputs = Vec::new();
    for _ in 0..sets {
        inputs.push([
            pool.tensor(gpu, &[t, c], dtype, 1.0)?,
            pool.tensor(gpu, &[t, c], dtype, 1.0)?,
            pool.tensor(gpu, &[t, c], dtype, 1.0)?,
        ]);
    }
    let (y, ty, dx) = (
        gpu.alloc(&[t, c], dtype)?,
        gpu.alloc(&[t, c], dtype)?,
        gpu.alloc(&[t, c], dtype)?,
    );
    let (rrms, dw) = (gpu.alloc(&[t], DType::F32)?, gpu.alloc(&[c], DType::F32)?);
    let op = BenchOp::RmsNorm;
    let mut rows = Vec::new();
    let fwd = inputs
        .iter()
        .map(|[x, _, _]| rms::plan_forward(dtype, d, x.ptr(), w.ptr(), y.ptr(), rrms.ptr(), 1e-6))
        .collect::<Result<Vec<_>>>()?;
    let tm = time_plans(gpu, &fwd, BUDGET_MS)?;
    rows.push(rate_row(
        op,
        "fwd",
        shape,
        dtype,
        tm,
        2.0 * tc * s + 4.0 * t as f64,
    ));
    let jvp = inputs
        .iter()
        .map(|[x, tx, _]| {
            let p = rms::JvpPtrs {
                x: x.ptr(),
                tx: tx.ptr(),
                w: w.ptr(),
                tw: tw.ptr(),
                y: y.ptr(),
                ty: ty.ptr(),
                rrms: 0,
            };
            rms::plan_jvp(dtype, d, p, 1e-6)
        })
        .collect::<Result<Vec<_>>>()?;
    let tm = time_plans(gpu, &jvp, BUDGET_MS)?;
    rows.push(rate_row(op, "jvp", shape, dtype, tm, 4.0 * tc * s));
    // The backward from the last forward's rrms (the timing does not depend on it).
    let bwd = inputs
        .iter()
        .map(|[x, _, dy]| {
            let p = rms::BwdPtrs {
                dy: dy.ptr(),
                x: x.ptr(),
                w: w.ptr(),
                rrms: rrms.ptr(),
                dx: dx.ptr(),
                dw: dw.ptr(),
            };
            rms::plan_backward(dtype, d, p)
        })
        .collect::<Result<Vec<_>>>()?;
    let tm = time_plans(gpu, &bwd, BUDGET_MS)?;
    rows.push(rate_row(
        op,
        "bwd",
        shape,
        dtype,
        tm,
        3.0 * tc * s + 4.0 * t as f64,
    ));
    Ok(rows)
}

fn bench_rope(gpu: &Gpu, pool: &mut Pool, shape: &[usize], dtype: DType) -> Result<Vec<BenchRow>> {
    let dims = rope_dims(shape)?;
    let RopeDims { b, n, h, d, .. } = dims;
    let (set_bytes, _) = sizes(BenchOp::Rope, shape, dtype)?;
    let sets = sets_for(gpu, set_bytes);
    let (elems, s) = ((b * n * h * d) as f64, dtype.size_in_bytes() as f64);
    let table = (n * d / 2 * 4 * 2) as f64;
    let (cos, sin) = (
        pool.tensor(gpu, &[n, d / 2], DType::F32, 1.0)?,
        pool.tensor(gpu, &[n, d / 2], DType::F32, 1.0)?,
    );
    let mut inputs = Vec::new();
    for _ in 0..sets {
        inputs.push([
            pool.tensor(gpu, shape, dtype, 1.0)?,
            pool.tensor(gpu, shape, dtype, 1.0)?,
        ]);
    }
    let (y, ty) = (gpu.alloc(shape, dtype)?, gpu.alloc(shape, dtype)?);
    let plan = |x: u64, out: u64, sign: f32| {
        let pairs = RopePairs::Interleaved;
        rope::plan_rope(dtype, dims, pairs, x, out, cos.ptr(), sin.ptr(), sign)
    };
    let op = BenchOp::Rope;
    let mut rows = Vec::new();
    let fwd = inputs
        .iter()
        .map(|[x, _]| plan(x.ptr(), y.ptr(), 1.0))
        .collect::<Result<Vec<_>>>()?;
    let tm = time_plans(gpu, &fwd, BUDGET_MS)?;
    rows.push(rate_row(
        op,
        "fwd",
        shape,
        dtype,
        tm,
        2.0 * elems * s + table,
    ));
    let jvp = inputs
        .iter()
        .map(|[x, tx]| {
            let mut p = plan(x.ptr(), y.ptr(), 1.0)?;
            p.extend(plan(tx.ptr(), ty.ptr(), 1.0)?);
            Ok(p)
        })
        .collect::<Result<Vec<_>>>()?;
    let tm = time_plans(gpu, &jvp, BUDGET_MS)?;
    rows.push(rate_row(
        op,
        "jvp",
        shape,
        dtype,
        tm,
        4.0 * elems * s + table,
    ));
    let bwd = inputs
        .iter()
        .map(|[_, dy]| plan(dy.ptr(), y.ptr(), -1.0))
        .collect::<Result<Vec<_>>>()?;
    let tm = time_plans(gpu, &bwd, BUDGET_MS)?;
    rows.push(rate_row(
        op,
        "bwd",
        shape,
        dtype,
        tm,
        2.0 * elems * s + table,
    ));
    Ok(rows)
}

fn bench_mlp(gpu: &Gpu, pool: &mut Pool, shape: &[usize], dtype: DType) -> Result<Vec<BenchRow>> {
    let d = mlp_dims(shape)?;
    let MlpDims { t, c, hd } = d;
    let (set_bytes, _) = sizes(BenchOp::Mlp, shape, dtype)?;
    let wscale = 1.0 / (c as f32).sqrt();
    let w1 = pool.tensor(gpu, &[hd, c], dtype, wscale)?;
    let b1 = pool.tensor(gpu, &[hd], dtype, 0.1)?;
    let w2 = pool.tensor(gpu, &[c, hd], dtype, 1.0 / (hd as f32).sqrt())?;
    let b2 = pool.tensor(gpu, &[c], dtype, 0.1)?;
    let p = ParamPtrs {
        w1: w1.ptr(),
        b1: b1.ptr(),
        w2: w2.ptr(),
        b2: b2.ptr(),
    };
    let s = dtype.size_in_bytes();
    let sets = sets_for(gpu, set_bytes);
    let mut inputs = Vec::new();
    for _ in 0..sets {
        // x and its tangent in one buffer (as the DiT block stacks them), and a cotangent.
        let x = pool.tensor(gpu, &[2 * t, c], dtype, 1.0)?;
        let gy = pool.tensor(gpu, &[t, c], dtype, 1.0)?;
        inputs.push((x, gy));
    }
    let th = [t, hd];
    let scratch = gpu.alloc_stacked(&[&[2 * t, hd], &th, &th, &[t]], dtype)?;
    let y = gpu.alloc(&[t, c], dtype)?;
    let ty = gpu.alloc(&[t, c], dtype)?;
    let grads = gpu.alloc_stacked(&[&[t, c], &[hd, c], &[hd], &[c, hd], &[c]], dtype)?;
    let flops = |mult: f64| mult * t as f64 * c as f64 * hd as f64;
    let tx_of = |x: &DeviceTensor| x.ptr() + (t * c * s) as u64;
    let mut rows = Vec::new();
    let fwd = inputs
        .iter()
        .map(|(x, _)| mlp::plan_forward(dtype, d, x.ptr(), p, scratch[0].ptr(), y.ptr()))
        .collect::<Result<Vec<_>>>()?;
    let jvp = inputs
        .iter()
        .map(|(x, _)| {
            mlp::plan_jvp(
                dtype,
                d,
                x.ptr(),
                tx_of(x),
                p,
                scratch[0].ptr(),
                scratch[1].ptr(),
                y.ptr(),
                ty.ptr(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let bwd = inputs
        .iter()
        .map(|(x, gy)| {
            mlp::plan_backward(
                dtype,
                d,
                x.ptr(),
                p,
                gy.ptr(),
                mlp::BwdPtrs {
                    pre: scratch[0].ptr(),
                    g: scratch[1].ptr(),
                    dg: scratch[2].ptr(),
                    ones: scratch[3].ptr(),
                    dx: grads[0].ptr(),
                    dw1: grads[1].ptr(),
                    db1: grads[2].ptr(),
                    dw2: grads[3].ptr(),
                    db2: grads[4].ptr(),
                },
            )
        })
        .collect::<Result<Vec<_>>>()?;
    for (pass, plans, mult) in [("fwd", &fwd, 4.0), ("jvp", &jvp, 8.0), ("bwd", &bwd, 10.0)] {
        let tm = time_plans(gpu, plans, BUDGET_MS)?;
        let mut r = row(BenchOp::Mlp, pass, shape, dtype, tm);
        r.tflops = Some(flops(mult) / (tm.0 * 1e-3) / 1e12);
        rows.push(r);
    }
    if steps_wanted() {
        rows.extend(step_rows(gpu, BenchOp::Mlp, shape, dtype, "fwd", &fwd)?);
        rows.extend(step_rows(gpu, BenchOp::Mlp, shape, dtype, "jvp", &jvp)?);
        rows.extend(step_rows(gpu, BenchOp::Mlp, shape, dtype, "bwd", &bwd)?);
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_py_times_the_default_attention_shapes() {
        // scripts/gpu/compare.py runs one bench process per shape from its own copy of the list.
        let script = include_str!("../../scripts/gpu/compare.py");
        let start = script
            .find("DEFAULT_ATTENTION_SHAPES = [")
            .expect("the list in compare.py");
        let body = &script[start..];
        let body = &body[body.find('[').unwrap() + 1..body.find("]\n").unwrap()];
        let listed: Vec<Vec<usize>> = body
            .split('(')
            .skip(1)
            .map(|t| {
                t[..t.find(')').unwrap()]
                    .split(',')
                    .map(|v| v.trim().parse().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(listed, BenchOp::Attention.default_shapes());
    }

    #[test]
    fn ratio_lines_name_the_targets() {
        let row = |op: &str, pass: &str, shape: &[usize], ms: f64| BenchRow {
            op: op.into(),
            pass: pass.into(),
            shape: shape.to_vec(),
            dtype: "bf16".into(),
            ms,
            ms_p10: ms,
            ms_p90: ms,
            runs: 10,
            tflops: None,
            gbps: None,
            path: None,
        };
        let block = [2, 4096, 1536, 12];
        let rows: Vec<BenchRow> = [
            ("fwd", 1.0),
            ("jvp", 2.4),
            ("fwd+bwd", 3.0),
            ("jvp+bwd", 4.5),
        ]
        .iter()
        .map(|&(p, ms)| row("dit_block", p, &block, ms))
        .collect();
        let lines = ratio_lines(BenchOp::DitBlock, &rows);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].contains("2.40x") && lines[0].contains("met"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].contains("1.50x") && !lines[1].contains("target"),
            "{}",
            lines[1]
        );
        // Another block shape has no target; the MLP's ceiling is 2.3x.
        let other = [
            row("dit_block", "fwd", &[8, 1024, 1152, 16], 1.0),
            row("dit_block", "jvp", &[8, 1024, 1152, 16], 3.0),
        ];
        assert!(!ratio_lines(BenchOp::DitBlock, &other)[0].contains("target"));
        let mlp = [
            row("mlp", "fwd", &[8192, 1536, 6144], 1.0),
            row("mlp", "jvp", &[8192, 1536, 6144], 2.5),
        ];
        assert!(ratio_lines(BenchOp::Mlp, &mlp)[0].contains("MISSED"));
        assert!(ratio_lines(BenchOp::Mlp, &mlp[..1]).is_empty());
        assert!(ratio_lines(BenchOp::Mlp, &[]).is_empty());
    }

    /// Shapes are checked, and their working sets counted, in checked arithmetic: any number of
    /// dims of any size is a shape or an error naming it, never a panic or a wrapped size.
    #[test]
    fn bench_shapes_are_checked_without_overflow() {
        let big = i32::MAX as usize;
        let ops = [
            BenchOp::Attention,
            BenchOp::LayerNorm,
            BenchOp::Mlp,
            BenchOp::DitBlock,
        ];
        for op in ops {
            for shape in [
                vec![usize::MAX; 13],
                vec![big; 13],
                vec![usize::MAX; 4],
                vec![big; 3],
                vec![big, big],
                vec![1, 1, usize::MAX / 2, 1],
                vec![],
            ] {
                let e = working_set(op, &shape, DType::BF16);
                assert!(e.is_err(), "{op:?} {shape:?}: {e:?}");
            }
            for shape in op.default_shapes() {
                let need = working_set(op, &shape, DType::BF16).unwrap();
                assert!(need > 0 && need < 80 << 30, "{op:?} {shape:?}: {need}");
                check_fits(op, &shape, DType::BF16, need, 80 << 30).unwrap();
            }
        }
        // What the fold of the seed does with many dims: wrapping, not a panic.
        let seed = [usize::MAX; 13]
            .iter()
            .fold(17u64, |h, &s| h.wrapping_mul(31).wrapping_add(s as u64));
        assert_ne!(seed, 0);
        // The 4 TB MLP input of the audit: valid dims, refused for the memory it needs (naming
        // the shape) before any tensor is built.
        let shape = [1_000_000, 1_000_000, 1];
        let need = working_set(BenchOp::Mlp, &shape, DType::BF16).unwrap();
        assert!(need > 1 << 42, "{need}");
        let e = check_fits(BenchOp::Mlp, &shape, DType::BF16, need, 80 << 30).unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("[1000000, 1000000, 1]") && m.contains("GiB"),
            "{m}"
        );
        // A DiT block with C near usize::MAX: its MLP width 4C overflows, an error.
        let e = working_set(BenchOp::DitBlock, &[1, 1, usize::MAX / 2, 1], DType::BF16)
            .unwrap_err()
            .to_string();
        assert!(e.contains("4C"), "{e}");
        assert!(working_set(BenchOp::Mlp, &[4, 8, 16], DType::F64).is_err());
    }

    #[test]
    fn rows_print_as_json() {
        let r = BenchRow {
            op: "attention".into(),
            pass: "jvp".into(),
            shape: vec![1, 12, 4096, 4096, 64],
            dtype: "bf16".into(),
            ms: 0.5,
            ms_p10: 0.49,
            ms_p90: 0.52,
            runs: 100,
            tflops: Some(400.0),
            gbps: None,
            path: Some("sm90a".into()),
        };
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["op"], "attention");
        assert_eq!(v["pass"], "jvp");
        assert_eq!(v["shape"][2], 4096);
        assert_eq!(v["tflops"], 400.0);
        assert_eq!(v["path"], "sm90a");
        assert!(r.line().contains("sm90a"));
        assert!(v.get("gbps").is_none());
        assert!(r.line().contains("TFLOP/s"));
        assert_eq!(BenchOp::parse("layernorm_mod").unwrap(), BenchOp::LayerNorm);
        assert!(BenchOp::parse("conv").is_err());
        assert_eq!(
            BenchOp::Attention.default_shapes()[0],
            vec![16, 16, 1024, 1024, 64]
        );
    }
}
