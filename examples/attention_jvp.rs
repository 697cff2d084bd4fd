//! The attention JVP in a few lines, checked against what a user would otherwise write: central
//! finite differences, i.e. two forward passes at inputs moved along the tangent.
//!
//!     cargo run --release --example attention_jvp
//!
//! Exits non-zero when the relative error of ȯ or of the lse tangent exceeds 1e-6.

use std::process::ExitCode;
use std::time::Instant;

use flashjvp::ops::{attention_forward, attention_jvp};
use flashjvp::{DType, Dual, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

const TOLERANCE: f64 = 1e-6;

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> flashjvp::Result<bool> {
    let (b, h, n, d) = (1, 2, 64, 32);
    let mut rng = StdRng::seed_from_u64(0);
    let mut randn = |shape: &[usize]| Tensor::randn(shape, DType::F64, &mut rng);
    let (q, k, v) = (
        randn(&[b, h, n, d]),
        randn(&[b, h, n, d]),
        randn(&[b, h, n, d]),
    );
    let (tq, tk, tv) = (
        randn(&[b, h, n, d]),
        randn(&[b, h, n, d]),
        randn(&[b, h, n, d]),
    );

    // One call: o, lse and their tangents along (tq, tk, tv).
    let start = Instant::now();
    let jvp = attention_jvp(
        &Dual::new(q.clone(), tq.clone())?,
        &Dual::new(k.clone(), tk.clone())?,
        &Dual::new(v.clone(), tv.clone())?,
        None,
    )?;
    let jvp_time = start.elapsed();

    // The reference: (f(x + εt) − f(x − εt)) / 2ε.
    let eps = 1e-5;
    let start = Instant::now();
    let plus = attention_forward(
        &axpy(&q, eps, &tq),
        &axpy(&k, eps, &tk),
        &axpy(&v, eps, &tv),
        None,
    )?;
    let minus = attention_forward(
        &axpy(&q, -eps, &tq),
        &axpy(&k, -eps, &tk),
        &axpy(&v, -eps, &tv),
        None,
    )?;
    let fd_time = start.elapsed();
    let fd = |p: &Tensor, m: &Tensor| -> Vec<f64> {
        p.to_f64_vec()
            .iter()
            .zip(m.to_f64_vec())
            .map(|(a, b)| (a - b) / (2.0 * eps))
            .collect()
    };
    let err_o = rel_err(
        &jvp.o.tangent_or_zeros().to_f64_vec(),
        &fd(&plus.o, &minus.o),
    );
    let err_lse = rel_err(
        &jvp.lse.tangent_or_zeros().to_f64_vec(),
        &fd(&plus.lse, &minus.lse),
    );

    println!(
        "attention JVP, B={b} H={h} N={n} d={d}, f64, against central differences (eps {eps:e}):"
    );
    println!("  o_dot   relative error {err_o:.2e}");
    println!("  lse_dot relative error {err_lse:.2e}");
    println!(
        "  time: JVP {:.2} ms, finite differences (two forwards) {:.2} ms",
        jvp_time.as_secs_f64() * 1e3,
        fd_time.as_secs_f64() * 1e3
    );
    let ok = err_o <= TOLERANCE && err_lse <= TOLERANCE;
    if ok {
        println!("ok: both within {TOLERANCE:e}");
    } else {
        eprintln!("error: relative error above {TOLERANCE:e}");
    }
    Ok(ok)
}

/// t + s·dir, in f64.
fn axpy(t: &Tensor, s: f64, dir: &Tensor) -> Tensor {
    let data = t
        .to_f64_vec()
        .iter()
        .zip(dir.to_f64_vec())
        .map(|(a, b)| a + s * b)
        .collect();
    Tensor::from_vec::<f64>(data, t.shape()).expect("same shape")
}

/// ‖got − want‖ / ‖want‖; NaN (a failure) when either holds a NaN or the lengths differ.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::NAN;
    }
    let norm = |x: &mut dyn Iterator<Item = f64>| x.map(|v| v * v).sum::<f64>().sqrt();
    let diff = norm(&mut got.iter().zip(want).map(|(a, b)| a - b));
    diff / norm(&mut want.iter().copied()).max(f64::MIN_POSITIVE)
}
