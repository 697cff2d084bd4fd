//! CPU cost of each op's forward, JVP and backward at realistic sizes (f32), beside the
//! finite-difference JVP a user would otherwise write (two forwards at inputs moved along the
//! tangent; the moved inputs are prepared outside the timing, so this is its lower bound).
//!
//!     cargo bench --bench cpu_ops
//!
//! At the end it prints the attention JVP's effective GFLOP/s (12·B·H·Nq·Nk·d flops) beside the
//! GEMM crate's own f32 GFLOP/s at 1024³, measured in the same run: the JVP is GEMM-bound, so
//! their ratio says how much of the machine it uses (target: at least 40%).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use flashjvp::cpu::gemm::{gemm_par, Mat};
use flashjvp::ops::{self, Mlp};
use flashjvp::{DType, Dual, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

const DT: DType = DType::F32;
/// The finite-difference step (f32 inputs).
const H: f64 = 1e-3;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, DT, &mut StdRng::seed_from_u64(seed))
}

/// x + s·t in the tensors' dtype: the inputs of a finite-difference forward.
fn moved(x: &Tensor, s: f64, t: &Tensor) -> Tensor {
    let data = x
        .to_f64_vec()
        .iter()
        .zip(t.to_f64_vec())
        .map(|(a, b)| a + s * b)
        .collect();
    Tensor::from_f64_vec(data, x.shape(), x.dtype()).unwrap()
}

fn dual(x: &Tensor, t: &Tensor) -> Dual {
    Dual::new(x.clone(), t.clone()).unwrap()
}

fn layernorm_mod(c: &mut Criterion) {
    let (t, ch) = (4096, 1024);
    let (x, tx) = (randn(&[t, ch], 1), randn(&[t, ch], 2));
    let (scale, tscale) = (randn(&[ch], 3), randn(&[ch], 4));
    let (shift, tshift) = (randn(&[ch], 5), randn(&[ch], 6));
    let gy = randn(&[t, ch], 7);
    let eps = ops::DEFAULT_EPS;
    let (xp, sp, hp) = (
        moved(&x, H, &tx),
        moved(&scale, H, &tscale),
        moved(&shift, H, &tshift),
    );
    let (xm, sm, hm) = (
        moved(&x, -H, &tx),
        moved(&scale, -H, &tscale),
        moved(&shift, -H, &tshift),
    );
    let bytes = (t * ch * 4) as u64;

    let mut g = c.benchmark_group("layernorm_mod T4096 C1024");
    g.throughput(Throughput::Bytes(2 * bytes)); // x in, y out
    g.bench_function("forward", |b| {
        b.iter(|| ops::layernorm_mod_forward(black_box(&x), &scale, &shift, eps).unwrap())
    });
    g.throughput(Throughput::Bytes(4 * bytes)); // x, tx in; y, ty out
    let (dx, ds, dh) = (dual(&x, &tx), dual(&scale, &tscale), dual(&shift, &tshift));
    g.bench_function("jvp", |b| {
        b.iter(|| ops::layernorm_mod_jvp(black_box(&dx), &ds, &dh, eps).unwrap())
    });
    g.bench_function("finite_difference_jvp", |b| {
        b.iter(|| {
            let p = ops::layernorm_mod_forward(black_box(&xp), &sp, &hp, eps).unwrap();
            let m = ops::layernorm_mod_forward(black_box(&xm), &sm, &hm, eps).unwrap();
            (p, m)
        })
    });
    g.throughput(Throughput::Bytes(3 * bytes)); // x, gy in; dx out
    g.bench_function("backward", |b| {
        b.iter(|| ops::layernorm_mod_backward(black_box(&x), &scale, &shift, eps, &gy).unwrap())
    });
    g.finish();
}

fn rms_norm_and_rope(c: &mut Criterion) {
    // Wan 14B's q norm on 4096 tokens (C 5120), then its rotary embedding (40 heads of 128).
    let (t, ch) = (4096, 5120);
    let (x, tx, gy) = (
        randn(&[t, ch], 21),
        randn(&[t, ch], 22),
        randn(&[t, ch], 23),
    );
    let (w, tw) = (randn(&[ch], 24), randn(&[ch], 25));
    let eps = ops::DEFAULT_EPS;
    let bytes = (t * ch * 4) as u64;
    let mut g = c.benchmark_group("rms_norm T4096 C5120");
    g.throughput(Throughput::Bytes(2 * bytes));
    g.bench_function("forward", |b| {
        b.iter(|| ops::rms_norm_forward(black_box(&x), &w, eps).unwrap())
    });
    g.throughput(Throughput::Bytes(4 * bytes));
    let (dx, dw) = (dual(&x, &tx), dual(&w, &tw));
    g.bench_function("jvp", |b| {
        b.iter(|| ops::rms_norm_jvp(black_box(&dx), &dw, eps).unwrap())
    });
    g.throughput(Throughput::Bytes(3 * bytes));
    g.bench_function("backward", |b| {
        b.iter(|| ops::rms_norm_backward(black_box(&x), &w, eps, &gy).unwrap())
    });
    g.finish();

    let heads = [1, t, 40, 128];
    let (x, tx) = (randn(&heads, 26), randn(&heads, 27));
    let (cos, sin) = (randn(&[t, 64], 28), randn(&[t, 64], 29));
    let pairs = ops::RopePairs::Interleaved;
    let mut g = c.benchmark_group("rope B1 N4096 H40 d128");
    g.throughput(Throughput::Bytes(2 * bytes));
    g.bench_function("forward", |b| {
        b.iter(|| ops::rope_forward(black_box(&x), &cos, &sin, pairs).unwrap())
    });
    g.throughput(Throughput::Bytes(4 * bytes));
    let dx = dual(&x, &tx);
    g.bench_function("jvp", |b| {
        b.iter(|| ops::rope_jvp(black_box(&dx), &cos, &sin, pairs).unwrap())
    });
    g.finish();
}

fn gelu(c: &mut Criterion) {
    let n = 4 << 20;
    let (x, tx, gy) = (randn(&[n], 11), randn(&[n], 12), randn(&[n], 13));
    let (xp, xm) = (moved(&x, H, &tx), moved(&x, -H, &tx));
    let dx = dual(&x, &tx);
    let mut g = c.benchmark_group("gelu 4M");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("forward", |b| {
        b.iter(|| ops::gelu_forward(black_box(&x)).unwrap())
    });
    g.bench_function("jvp", |b| b.iter(|| ops::gelu_jvp(black_box(&dx)).unwrap()));
    g.bench_function("finite_difference_jvp", |b| {
        b.iter(|| {
            (
                ops::gelu_forward(black_box(&xp)).unwrap(),
                ops::gelu_forward(black_box(&xm)).unwrap(),
            )
        })
    });
    g.bench_function("backward", |b| {
        b.iter(|| ops::gelu_backward(black_box(&x), &gy).unwrap())
    });
    g.finish();
}

fn mlp(c: &mut Criterion) {
    let (t, ch, hd) = (1024, 512, 2048);
    let (x, tx, gy) = (
        randn(&[t, ch], 21),
        randn(&[t, ch], 22),
        randn(&[t, ch], 23),
    );
    let (w1, b1) = (randn(&[hd, ch], 24), randn(&[hd], 25));
    let (w2, b2) = (randn(&[ch, hd], 26), randn(&[ch], 27));
    let p = Mlp {
        w1: &w1,
        b1: &b1,
        w2: &w2,
        b2: &b2,
    };
    let (xp, xm) = (moved(&x, H, &tx), moved(&x, -H, &tx));
    let dx = dual(&x, &tx);
    // Two GEMMs of T·C·Hd multiply-adds each.
    let fwd_flops = (2 * 2 * t * ch * hd) as u64;
    let mut g = c.benchmark_group("mlp T1024 C512 Hd2048");
    g.measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(fwd_flops));
    g.bench_function("forward (flops)", |b| {
        b.iter(|| ops::mlp_forward(black_box(&x), &p).unwrap())
    });
    g.throughput(Throughput::Elements(2 * fwd_flops));
    g.bench_function("jvp (flops)", |b| {
        b.iter(|| ops::mlp_jvp(black_box(&dx), &p).unwrap())
    });
    g.bench_function("finite_difference_jvp (flops)", |b| {
        b.iter(|| {
            (
                ops::mlp_forward(black_box(&xp), &p).unwrap(),
                ops::mlp_forward(black_box(&xm), &p).unwrap(),
            )
        })
    });
    g.throughput(Throughput::Elements(3 * fwd_flops));
    g.bench_function("backward (flops)", |b| {
        b.iter(|| ops::mlp_backward(black_box(&x), &p, &gy).unwrap())
    });
    g.finish();
}

struct AttnInputs {
    q: Dual,
    k: Dual,
    v: Dual,
}

const ATTN: [usize; 4] = [1, 4, 1024, 64];

fn attn_inputs() -> AttnInputs {
    let s = ATTN;
    AttnInputs {
        q: dual(&randn(&s, 31), &randn(&s, 32)),
        k: dual(&randn(&s, 33), &randn(&s, 34)),
        v: dual(&randn(&s, 35), &randn(&s, 36)),
    }
}

/// 4·B·H·Nq·Nk·d: the forward's two matrix products.
fn attention_forward_flops() -> u64 {
    let [b, h, n, d] = ATTN;
    (4 * b * h * n * n * d) as u64
}

fn attention(c: &mut Criterion) {
    let a = attn_inputs();
    let (q, k, v) = (&a.q.primal, &a.k.primal, &a.v.primal);
    let tangent = |d: &Dual| d.tangent.clone().unwrap();
    let (tq, tk, tv) = (tangent(&a.q), tangent(&a.k), tangent(&a.v));
    let (qp, kp, vp) = (moved(q, H, &tq), moved(k, H, &tk), moved(v, H, &tv));
    let (qm, km, vm) = (moved(q, -H, &tq), moved(k, -H, &tk), moved(v, -H, &tv));
    let fwd = ops::attention_forward(q, k, v, None).unwrap();
    let go = randn(fwd.o.shape(), 37);
    let flops = attention_forward_flops();

    let mut g = c.benchmark_group("attention B1 H4 N1024 d64");
    g.measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(flops));
    g.bench_function("forward (flops)", |b| {
        b.iter(|| ops::attention_forward(black_box(q), k, v, None).unwrap())
    });
    // The JVP counts 3× the forward's flops (DESIGN.md section 7).
    g.throughput(Throughput::Elements(3 * flops));
    g.bench_function("jvp (effective flops)", |b| {
        b.iter(|| ops::attention_jvp(black_box(&a.q), &a.k, &a.v, None).unwrap())
    });
    let (kc, vc) = (Dual::constant(k.clone()), Dual::constant(v.clone()));
    g.bench_function("jvp, constant K and V (effective flops)", |b| {
        b.iter(|| ops::attention_jvp(black_box(&a.q), &kc, &vc, None).unwrap())
    });
    g.throughput(Throughput::Elements(2 * flops));
    g.bench_function("finite_difference_jvp (flops)", |b| {
        b.iter(|| {
            (
                ops::attention_forward(black_box(&qp), &kp, &vp, None).unwrap(),
                ops::attention_forward(black_box(&qm), &km, &vm, None).unwrap(),
            )
        })
    });
    g.throughput(Throughput::Elements(flops * 5 / 2));
    g.bench_function("backward (flops)", |b| {
        b.iter(|| ops::attention_backward(black_box(q), k, v, &fwd.o, &fwd.lse, &go, None).unwrap())
    });
    g.finish();
}

const GEMM_N: usize = 1024;

fn gemm_operands() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = GEMM_N;
    let a = randn(&[n, n], 41).as_slice::<f32>().unwrap().to_vec();
    let b = randn(&[n, n], 42).as_slice::<f32>().unwrap().to_vec();
    (a, b, vec![0.0; n * n])
}

fn sgemm(a: &[f32], b: &[f32], c: &mut [f32]) {
    let n = GEMM_N;
    gemm_par(1.0, Mat::rows(a, n, n), Mat::rows(b, n, n), 0.0, c);
}

fn gemm(c: &mut Criterion) {
    let (a, b, mut out) = gemm_operands();
    let mut g = c.benchmark_group("sgemm 1024^3 (matrixmultiply via gemm_par)");
    g.throughput(Throughput::Elements(2 * (GEMM_N as u64).pow(3)));
    g.bench_function("gemm (flops)", |bch| {
        bch.iter(|| sgemm(black_box(&a), &b, &mut out))
    });
    g.finish();
}

/// The median wall time of `reps` calls after one warm-up call.
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[reps / 2]
}

/// The attention JVP's effective GFLOP/s against the GEMM's, timed back to back in this run.
fn attention_vs_gemm(_c: &mut Criterion) {
    // `cargo test --benches` runs each benchmark once as a smoke test; the summary is for
    // `cargo bench` only.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let a = attn_inputs();
    let jvp = median_secs(7, || {
        black_box(ops::attention_jvp(&a.q, &a.k, &a.v, None).unwrap());
    });
    let (ga, gb, mut gc) = gemm_operands();
    let gemm = median_secs(7, || sgemm(&ga, &gb, &mut gc));
    let jvp_gflops = 3.0 * attention_forward_flops() as f64 / jvp / 1e9;
    let gemm_gflops = 2.0 * (GEMM_N as f64).powi(3) / gemm / 1e9;
    let [b, h, n, d] = ATTN;
    println!();
    println!("attention JVP B{b} H{h} N{n} d{d} f32: {:.1} ms, {jvp_gflops:.1} effective GFLOP/s (12*B*H*Nq*Nk*d flops)", jvp * 1e3);
    println!(
        "sgemm {GEMM_N}^3 (matrixmultiply through gemm_par, {} rayon threads): {:.1} ms, {gemm_gflops:.1} GFLOP/s",
        rayon::current_num_threads(),
        gemm * 1e3
    );
    println!(
        "ratio: {:.0}% of the GEMM's rate (target >= 40%)",
        100.0 * jvp_gflops / gemm_gflops
    );
}

criterion_group! {
    name = benches;
    // Modest: the whole run takes a few minutes on two cores.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = layernorm_mod, rms_norm_and_rope, gelu, mlp, attention, gemm, attention_vs_gemm
}
criterion_main!(benches);
