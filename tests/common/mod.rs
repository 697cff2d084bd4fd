//! Helpers shared by the test binaries: random tensors, central finite differences, the adjoint
//! identity, and comparisons that print the first mismatches and the largest difference.
#![allow(dead_code)]

use flashjvp::{DType, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A seeded generator; tests draw fresh random inputs from it (never zeros).
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn randn(shape: &[usize], rng: &mut StdRng) -> Tensor {
    Tensor::randn(shape, DType::F64, rng)
}

/// t + h·v (f64).
pub fn axpy(t: &Tensor, h: f64, v: &Tensor) -> Tensor {
    assert_eq!(t.shape(), v.shape());
    let data: Vec<f64> = t
        .to_f64_vec()
        .iter()
        .zip(v.to_f64_vec())
        .map(|(a, b)| a + h * b)
        .collect();
    Tensor::from_vec(data, t.shape()).unwrap()
}

/// Central difference (f(+h) − f(−h)) / 2h of every output of `f`, where `f(eps)` evaluates the
/// op at inputs moved by eps along the tangent direction.
pub fn central_difference(f: impl Fn(f64) -> Vec<Tensor>, h: f64) -> Vec<Vec<f64>> {
    let plus = f(h);
    let minus = f(-h);
    plus.iter()
        .zip(&minus)
        .map(|(p, m)| {
            p.to_f64_vec()
                .iter()
                .zip(m.to_f64_vec())
                .map(|(a, b)| (a - b) / (2.0 * h))
                .collect()
        })
        .collect()
}

pub fn dot(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape(), "dot of tensors with different shapes");
    a.to_f64_vec()
        .iter()
        .zip(b.to_f64_vec())
        .map(|(x, y)| x * y)
        .sum()
}

pub fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// ‖got − want‖ / ‖want‖ (absolute when ‖want‖ is tiny).
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let diff: Vec<f64> = got.iter().zip(want).map(|(a, b)| a - b).collect();
    norm(&diff) / norm(want).max(1e-300)
}

/// Asserts rel_err(got, want) ≤ tol; on failure prints the first mismatching values and the
/// largest absolute difference.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let err = rel_err(got, want);
    if err.is_nan() || err > tol {
        let mut msg = format!("{what}: relative error {err:.3e} > {tol:.1e}\n");
        let (mut imax, mut dmax) = (0, 0.0f64);
        let mut shown = 0;
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let d = (a - b).abs();
            if d > dmax || d.is_nan() {
                imax = i;
                dmax = d;
            }
            if shown < 5 && (d > tol * b.abs().max(1e-8) || d.is_nan()) {
                msg += &format!("  [{i}] got {a:.10e} want {b:.10e}\n");
                shown += 1;
            }
        }
        msg += &format!("  largest difference {dmax:.3e} at [{imax}]");
        panic!("{msg}");
    }
}

/// Checks ⟨w, J v⟩ = ⟨Jᵀ w, v⟩ summed over several (input, output) pairs, relative to the
/// magnitude of either side.
pub fn assert_adjoint(what: &str, lhs: f64, rhs: f64, tol: f64) {
    let rel = (lhs - rhs).abs() / lhs.abs().max(rhs.abs()).max(1e-300);
    assert!(
        rel <= tol,
        "{what}: adjoint identity off: <w, Jv> = {lhs:.15e}, <J^T w, v> = {rhs:.15e}, relative {rel:.3e} > {tol:.1e}"
    );
}

/// Writes `t` (a [B, H, N, d] tensor) into `buf` the way a strided attention operand holds it:
/// element (b, h, n, j) at `base + b·s[0] + h·s[1] + n·s[2] + j`.
pub fn scatter_bhnd(t: &Tensor, buf: &mut [f64], base: usize, s: [usize; 3]) {
    let sh = t.shape();
    assert_eq!(sh.len(), 4, "scatter_bhnd: [B, H, N, d], got {sh:?}");
    let v = t.to_f64_vec();
    let mut i = 0;
    for b in 0..sh[0] {
        for h in 0..sh[1] {
            for n in 0..sh[2] {
                let at = base + b * s[0] + h * s[1] + n * s[2];
                buf[at..at + sh[3]].copy_from_slice(&v[i..i + sh[3]]);
                i += sh[3];
            }
        }
    }
}

/// The [B, H, N, d] tensor `shape` that `buf` holds at `base` with strides `s` (the inverse of
/// [`scatter_bhnd`]), in f64.
pub fn gather_bhnd(buf: &[f64], base: usize, s: [usize; 3], shape: [usize; 4]) -> Tensor {
    let mut v = Vec::with_capacity(shape.iter().product());
    for b in 0..shape[0] {
        for h in 0..shape[1] {
            for n in 0..shape[2] {
                let at = base + b * s[0] + h * s[1] + n * s[2];
                v.extend_from_slice(&buf[at..at + shape[3]]);
            }
        }
    }
    Tensor::from_f64_vec(v, &shape, DType::F64).expect("shape matches the data")
}
