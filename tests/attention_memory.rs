//! The attention JVP streams over key blocks and never allocates an Nq×Nk buffer: a counting global
//! allocator measures the peak heap growth during one call at Nq = Nk = 16384, d = 64 (one such f32
//! buffer would take 1 GiB) and requires it to stay below a tenth of that. Its own test binary, so
//! that no other test allocates concurrently.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use flashjvp::ops::attention_jvp;
use flashjvp::{DType, Dual, Tensor};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::SeqCst) + bytes;
    PEAK.fetch_max(now, Ordering::SeqCst);
}

// SAFETY: every call forwards to the system allocator unchanged; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::SeqCst);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn jvp_at_16k_tokens_allocates_far_less_than_one_score_matrix() {
    let (n, d) = (16384, 64);
    let shape = [1, 1, n, d];
    let mut rng = common::rng(11);
    let mut dual = || {
        let p = Tensor::randn(&shape, DType::F32, &mut rng);
        let t = Tensor::randn(&shape, DType::F32, &mut rng);
        Dual::new(p, t).unwrap()
    };
    let (q, k, v) = (dual(), dual(), dual());

    let before = CURRENT.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let start = Instant::now();
    let out = attention_jvp(&q, &k, &v, None).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let peak = PEAK.load(Ordering::SeqCst) - before;

    let score_matrix = n * n * 4;
    let flops = 12.0 * (n * n * d) as f64;
    println!(
        "attention jvp N={n} d={d} f32: peak heap growth {:.1} MB ({:.2}% of one {n}x{n} f32 buffer, {:.0} MB), {seconds:.2} s, {:.1} GFLOP/s",
        peak as f64 / 1e6,
        100.0 * peak as f64 / score_matrix as f64,
        score_matrix as f64 / 1e6,
        flops / seconds / 1e9
    );
    assert!(
        peak < score_matrix / 10,
        "peak heap growth {peak} bytes is not below a tenth of one score matrix ({score_matrix})"
    );

    // The result is still attention: a few query rows against a direct f64 evaluation.
    let f = |t: &Tensor| t.to_f64_vec();
    let (qp, kp, vp) = (f(&q.primal), f(&k.primal), f(&v.primal));
    let (tq, tk, tv) = (
        f(q.tangent.as_ref().unwrap()),
        f(k.tangent.as_ref().unwrap()),
        f(v.tangent.as_ref().unwrap()),
    );
    let (o, to) = (f(&out.o.primal), f(out.o.tangent.as_ref().unwrap()));
    let (lse, tlse) = (f(&out.lse.primal), f(out.lse.tangent.as_ref().unwrap()));
    let c = 1.0 / (d as f64).sqrt();
    for i in [0, 1, 4097, n - 1] {
        let dotk = |a: &[f64], b: &[f64], j: usize| -> f64 {
            (0..d).map(|x| a[i * d + x] * b[j * d + x]).sum()
        };
        let s: Vec<f64> = (0..n).map(|j| c * dotk(&qp, &kp, j)).collect();
        let sdot: Vec<f64> = (0..n)
            .map(|j| c * (dotk(&tq, &kp, j) + dotk(&qp, &tk, j)))
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
        let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / l).collect();
        let mu: f64 = p.iter().zip(&sdot).map(|(a, b)| a * b).sum();
        let mut want_o = vec![0.0; d];
        let mut want_to = vec![0.0; d];
        for j in 0..n {
            for y in 0..d {
                want_o[y] += p[j] * vp[j * d + y];
                want_to[y] += p[j] * (tv[j * d + y] + (sdot[j] - mu) * vp[j * d + y]);
            }
        }
        common::assert_close(&format!("row {i} o"), &o[i * d..(i + 1) * d], &want_o, 1e-4);
        common::assert_close(
            &format!("row {i} o tangent"),
            &to[i * d..(i + 1) * d],
            &want_to,
            1e-4,
        );
        assert!((lse[i] - (m + l.ln())).abs() < 1e-4, "row {i} lse");
        assert!(
            (tlse[i] - mu).abs() < 1e-4 * (1.0 + mu.abs()),
            "row {i} lse tangent"
        );
    }
}
