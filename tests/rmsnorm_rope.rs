//! rms_norm and rope: JVPs against central differences in f64 (tangents on each input, some
//! absent), backwards against the JVP (adjoint identity), known values against a naive reference,
//! f32 against f64, property tests and bad input.

mod common;
mod ops_common;

use common::*;
use flashjvp::ops::{
    rms_norm_backward, rms_norm_forward, rms_norm_jvp, rope_backward, rope_forward, rope_jvp,
    RopePairs,
};
use flashjvp::{DType, Dual, Tensor};
use ops_common::*;
use proptest::prelude::*;

const EPS: f64 = 1e-6;

// ------------------------------------------------------------------------------------------------
// rms_norm

/// x [T, C] with rows of different scales (one near zero), weight [C] around 1, and tangents.
fn norm_case(t: usize, c: usize, seed: u64) -> [Tensor; 4] {
    let mut r = rng(seed);
    let x = randn(&[t, c], &mut r).to_f64_vec();
    let x: Vec<f64> = x
        .iter()
        .enumerate()
        .map(|(i, v)| v * [1.0, 30.0, 0.1, 3.0][(i / c) % 4])
        .collect();
    let w: Vec<f64> = randn(&[c], &mut r)
        .to_f64_vec()
        .iter()
        .map(|v| 1.0 + 0.5 * v)
        .collect();
    [
        Tensor::from_vec(x, &[t, c]).unwrap(),
        randn(&[t, c], &mut r),
        Tensor::from_vec(w, &[c]).unwrap(),
        randn(&[c], &mut r),
    ]
}

/// The definition, row by row in f64.
fn naive_rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let c = w.len();
    x.chunks(c)
        .flat_map(|row| {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / c as f64;
            let r = 1.0 / (ms + eps).sqrt();
            row.iter().zip(w).map(move |(v, w)| v * r * w)
        })
        .collect()
}

#[test]
fn rms_norm_matches_the_definition() {
    for (t, c) in [(5, 7), (4, 1), (300, 130)] {
        let [x, _, w, _] = norm_case(t, c, 10 + c as u64);
        let y = rms_norm_forward(&x, &w, EPS).unwrap();
        let want = naive_rms_norm(&x.to_f64_vec(), &w.to_f64_vec(), EPS);
        assert_close(
            &format!("rms_norm [{t}, {c}]"),
            &y.to_f64_vec(),
            &want,
            1e-14,
        );
    }
    // A row of zeros with eps > 0 gives zeros, not NaN.
    let x = Tensor::zeros(&[2, 3], DType::F64);
    let w = Tensor::from_vec(vec![1.0f64, 2.0, 3.0], &[3]).unwrap();
    let y = rms_norm_forward(&x, &w, EPS).unwrap();
    assert_eq!(y.to_f64_vec(), vec![0.0; 6]);
}

#[test]
fn rms_norm_jvp_matches_finite_differences() {
    for (k, &(t, c)) in [(6, 9), (4, 1), (3, 64)].iter().enumerate() {
        let [x, xd, w, wd] = norm_case(t, c, 20 + k as u64);
        for mask in 1..4u32 {
            let on = |bit: u32| mask & (1 << bit) != 0;
            let pick = |bit: u32, p: &Tensor, d: &Tensor| {
                if on(bit) {
                    dual(p, d)
                } else {
                    Dual::constant(p.clone())
                }
            };
            let dir = |bit: u32, d: &Tensor| {
                if on(bit) {
                    d.clone()
                } else {
                    Tensor::zeros(d.shape(), DType::F64)
                }
            };
            let out = rms_norm_jvp(&pick(0, &x, &xd), &pick(1, &w, &wd), EPS).unwrap();
            let (xdir, wdir) = (dir(0, &xd), dir(1, &wd));
            let fd = central_difference(
                |e| vec![rms_norm_forward(&axpy(&x, e, &xdir), &axpy(&w, e, &wdir), EPS).unwrap()],
                1e-5,
            );
            let what = format!("rms_norm tangent [{t}, {c}] mask {mask:02b}");
            assert_close(&what, &out.tangent.unwrap().to_f64_vec(), &fd[0], 1e-6);
            assert_eq!(out.primal, rms_norm_forward(&x, &w, EPS).unwrap(), "{what}");
        }
        let none = rms_norm_jvp(&Dual::constant(x.clone()), &Dual::constant(w.clone()), EPS);
        assert!(none.unwrap().tangent.is_none());
    }
}

#[test]
fn rms_norm_backward_satisfies_adjoint_identity() {
    // The last case splits its rows (and the weight gradient's sum) across rayon tasks.
    for (k, &(t, c)) in [(6, 9), (4, 1), (3, 64), (2000, 96)].iter().enumerate() {
        let [x, xd, w, wd] = norm_case(t, c, 30 + k as u64);
        let gy = randn(&[t, c], &mut rng(40 + k as u64));
        let yd = rms_norm_jvp(&dual(&x, &xd), &dual(&w, &wd), EPS)
            .unwrap()
            .tangent
            .unwrap();
        let g = rms_norm_backward(&x, &w, EPS, &gy).unwrap();
        assert_eq!(g.dweight.shape(), &[c]);
        let rhs = dot(&g.dx, &xd) + dot(&g.dweight, &wd);
        assert_adjoint(&format!("rms_norm [{t}, {c}]"), dot(&gy, &yd), rhs, 1e-10);
    }
}

#[test]
fn rms_norm_f32_agrees_with_f64() {
    let [x, xd, w, wd] = norm_case(40, 300, 50);
    let gy = randn(&[40, 300], &mut rng(51));
    let j64 = rms_norm_jvp(&dual(&x, &xd), &dual(&w, &wd), EPS).unwrap();
    let j32 = rms_norm_jvp(&dual(&f32(&x), &f32(&xd)), &dual(&f32(&w), &f32(&wd)), EPS).unwrap();
    assert_eq!(j32.primal.dtype(), DType::F32);
    let v = |t: &Tensor| t.to_f64_vec();
    assert_close("rms_norm y f32", &v(&j32.primal), &v(&j64.primal), 1e-6);
    let (t32, t64) = (j32.tangent.unwrap(), j64.tangent.unwrap());
    assert_close("rms_norm tangent f32", &v(&t32), &v(&t64), 1e-6);
    let g64 = rms_norm_backward(&x, &w, EPS, &gy).unwrap();
    let g32 = rms_norm_backward(&f32(&x), &f32(&w), EPS, &f32(&gy)).unwrap();
    assert_close("rms_norm dx f32", &v(&g32.dx), &v(&g64.dx), 1e-6);
    assert_close("rms_norm dw f32", &v(&g32.dweight), &v(&g64.dweight), 1e-6);
}

#[test]
fn rms_norm_bad_inputs_are_errors_naming_the_tensor() {
    let [x, _, w, _] = norm_case(6, 4, 60);
    let gy = randn(&[6, 4], &mut rng(61));
    let mut r = rng(62);
    assert_err(
        rms_norm_forward(&randn(&[24], &mut r), &w, EPS),
        is_rank,
        "x",
    );
    assert_err(
        rms_norm_forward(&x, &randn(&[5], &mut r), EPS),
        is_shape,
        "weight",
    );
    assert_err(
        rms_norm_forward(&x, &randn(&[1, 4], &mut r), EPS),
        is_rank,
        "weight",
    );
    assert_err(rms_norm_forward(&x, &f32(&w), EPS), is_dtype, "weight");
    assert_err(
        rms_norm_backward(&x, &w, EPS, &randn(&[6, 5], &mut r)),
        is_shape,
        "gy",
    );
    assert_err(rms_norm_backward(&x, &w, EPS, &f32(&gy)), is_dtype, "gy");
    for eps in [-1.0, f64::NAN, f64::INFINITY, 1e-40] {
        assert_err(rms_norm_forward(&f32(&x), &f32(&w), eps), is_invalid, "eps");
    }
    let bad = bad_dual(&x, randn(&[4, 6], &mut r));
    assert_err(
        rms_norm_jvp(&bad, &Dual::constant(w.clone()), EPS),
        is_tangent,
        "x",
    );
    let bad = bad_dual(&w, randn(&[3], &mut r));
    assert_err(
        rms_norm_jvp(&Dual::constant(x.clone()), &bad, EPS),
        is_tangent,
        "weight",
    );
    assert_bf16_refused(rms_norm_forward(&bf16(&x), &bf16(&w), EPS), "x");
    let empty = Tensor::zeros(&[0, 4], DType::F64);
    assert_err(rms_norm_forward(&empty, &w, EPS), is_invalid, "x");
}

// ------------------------------------------------------------------------------------------------
// rope

/// x [B, N, H, d] and its tangent, and cos/sin tables of real angles: [N, d/2], or [B, N, d/2]
/// with `per_batch`.
fn rope_case(s: [usize; 4], per_batch: bool, seed: u64) -> [Tensor; 4] {
    let [b, n, _, d] = s;
    let mut r = rng(seed);
    let table: Vec<usize> = if per_batch {
        vec![b, n, d / 2]
    } else {
        vec![n, d / 2]
    };
    let theta = randn(&table, &mut r).to_f64_vec();
    let theta: Vec<f64> = theta.iter().map(|t| 3.0 * t).collect();
    let cos = theta.iter().map(|t| t.cos()).collect();
    let sin = theta.iter().map(|t| t.sin()).collect();
    [
        randn(&s, &mut r),
        randn(&s, &mut r),
        Tensor::from_vec(cos, &table).unwrap(),
        Tensor::from_vec(sin, &table).unwrap(),
    ]
}

/// The definition, element by element: pair i of head h of token (b, n), by index arithmetic
/// independent of the reference's loops.
fn naive_rope(x: &Tensor, cos: &Tensor, sin: &Tensor, pairs: RopePairs) -> Vec<f64> {
    let [b, n, h, d]: [usize; 4] = x.shape().try_into().unwrap();
    let (xv, cv, sv) = (x.to_f64_vec(), cos.to_f64_vec(), sin.to_f64_vec());
    let mut y = vec![f64::NAN; xv.len()];
    for bi in 0..b {
        for ni in 0..n {
            for hi in 0..h {
                for i in 0..d / 2 {
                    let base = ((bi * n + ni) * h + hi) * d;
                    let (p, q) = match pairs {
                        RopePairs::Interleaved => (base + 2 * i, base + 2 * i + 1),
                        RopePairs::Halves => (base + i, base + d / 2 + i),
                    };
                    let t = if cos.rank() == 3 { bi * n + ni } else { ni } * (d / 2) + i;
                    y[p] = xv[p] * cv[t] - xv[q] * sv[t];
                    y[q] = xv[p] * sv[t] + xv[q] * cv[t];
                }
            }
        }
    }
    y
}

const ROPE_SHAPES: [[usize; 4]; 3] = [[2, 5, 3, 8], [1, 1, 1, 2], [3, 7, 2, 64]];
const PAIRS: [RopePairs; 2] = [RopePairs::Interleaved, RopePairs::Halves];

#[test]
fn rope_matches_the_definition() {
    for (k, s) in ROPE_SHAPES.into_iter().enumerate() {
        for per_batch in [false, true] {
            let [x, _, cos, sin] = rope_case(s, per_batch, 70 + k as u64);
            for pairs in PAIRS {
                let y = rope_forward(&x, &cos, &sin, pairs).unwrap();
                let want = naive_rope(&x, &cos, &sin, pairs);
                let what = format!("rope {s:?} per_batch {per_batch} {pairs:?}");
                assert_close(&what, &y.to_f64_vec(), &want, 1e-15);
                // A rotation keeps every pair's length, hence the norm.
                assert!(
                    (norm(&y.to_f64_vec()) - norm(&x.to_f64_vec())).abs() < 1e-12,
                    "{what}"
                );
            }
        }
    }
    // The two pairings differ (a test that confused them would pass on one alone).
    let [x, _, cos, sin] = rope_case([1, 3, 1, 8], false, 79);
    let a = rope_forward(&x, &cos, &sin, RopePairs::Interleaved).unwrap();
    let b = rope_forward(&x, &cos, &sin, RopePairs::Halves).unwrap();
    assert_ne!(a, b);
}

#[test]
fn rope_jvp_and_backward() {
    for (k, s) in ROPE_SHAPES.into_iter().enumerate() {
        for per_batch in [false, true] {
            let [x, xd, cos, sin] = rope_case(s, per_batch, 80 + k as u64);
            for pairs in PAIRS {
                let what = format!("rope {s:?} per_batch {per_batch} {pairs:?}");
                let out = rope_jvp(&dual(&x, &xd), &cos, &sin, pairs).unwrap();
                let fd = central_difference(
                    |e| vec![rope_forward(&axpy(&x, e, &xd), &cos, &sin, pairs).unwrap()],
                    1e-5,
                );
                let yd = out.tangent.unwrap();
                assert_close(&what, &yd.to_f64_vec(), &fd[0], 1e-8);
                assert_eq!(out.primal, rope_forward(&x, &cos, &sin, pairs).unwrap());
                let gy = randn(&s, &mut rng(90 + k as u64));
                let gx = rope_backward(&gy, &cos, &sin, pairs).unwrap();
                assert_adjoint(&what, dot(&gy, &yd), dot(&gx, &xd), 1e-12);
                // The backward undoes the rotation (cos² + sin² = 1).
                let back = rope_backward(&out.primal, &cos, &sin, pairs).unwrap();
                assert_close(&what, &back.to_f64_vec(), &x.to_f64_vec(), 1e-13);
            }
        }
    }
    let [x, _, cos, sin] = rope_case([1, 2, 1, 4], false, 99);
    let none = rope_jvp(&Dual::constant(x), &cos, &sin, RopePairs::Halves).unwrap();
    assert!(none.tangent.is_none());
}

#[test]
fn rope_f32_agrees_with_f64() {
    let [x, xd, cos, sin] = rope_case([2, 9, 3, 72], true, 100);
    for pairs in PAIRS {
        let j64 = rope_jvp(&dual(&x, &xd), &cos, &sin, pairs).unwrap();
        let j32 = rope_jvp(&dual(&f32(&x), &f32(&xd)), &f32(&cos), &f32(&sin), pairs).unwrap();
        assert_eq!(j32.primal.dtype(), DType::F32);
        let v = |t: &Tensor| t.to_f64_vec();
        assert_close("rope y f32", &v(&j32.primal), &v(&j64.primal), 1e-6);
        let (t32, t64) = (j32.tangent.unwrap(), j64.tangent.unwrap());
        assert_close("rope tangent f32", &v(&t32), &v(&t64), 1e-6);
    }
}

#[test]
fn rope_bad_inputs_are_errors_naming_the_tensor() {
    let [x, _, cos, sin] = rope_case([2, 5, 3, 8], false, 110);
    let mut r = rng(111);
    let p = RopePairs::Interleaved;
    assert_err(
        rope_forward(&randn(&[5, 3, 8], &mut r), &cos, &sin, p),
        is_rank,
        "x",
    );
    assert_err(
        rope_forward(&randn(&[2, 5, 3, 7], &mut r), &cos, &sin, p),
        is_shape,
        "x",
    );
    assert_err(
        rope_forward(&x, &randn(&[5, 3], &mut r), &sin, p),
        is_shape,
        "cos",
    );
    assert_err(
        rope_forward(&x, &cos, &randn(&[4, 4], &mut r), p),
        is_shape,
        "sin",
    );
    assert_err(
        rope_forward(&x, &randn(&[1, 5, 4], &mut r), &sin, p),
        is_shape,
        "cos",
    );
    assert_err(
        rope_forward(&x, &randn(&[2, 5, 4], &mut r), &sin, p),
        is_shape,
        "sin",
    );
    assert_err(rope_forward(&x, &f32(&cos), &sin, p), is_dtype, "cos");
    assert_err(rope_backward(&x, &cos, &f32(&sin), p), is_dtype, "sin");
    let bad = bad_dual(&x, randn(&[2, 5, 3, 4], &mut r));
    assert_err(rope_jvp(&bad, &cos, &sin, p), is_tangent, "x");
    assert_bf16_refused(rope_forward(&bf16(&x), &bf16(&cos), &bf16(&sin), p), "x");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    // Random shapes: the JVP's tangent against differences, the backward against the JVP.
    #[test]
    fn rms_norm_random_shapes(t in 1usize..9, c in 2usize..40, seed in 0u64..1000) {
        let [x, xd, w, wd] = norm_case(t, c, seed);
        let out = rms_norm_jvp(&dual(&x, &xd), &dual(&w, &wd), EPS).unwrap();
        let fd = central_difference(
            |e| vec![rms_norm_forward(&axpy(&x, e, &xd), &axpy(&w, e, &wd), EPS).unwrap()],
            1e-5,
        );
        let yd = out.tangent.unwrap();
        assert_close("rms_norm tangent", &yd.to_f64_vec(), &fd[0], 1e-6);
        let gy = randn(&[t, c], &mut rng(seed + 1));
        let g = rms_norm_backward(&x, &w, EPS, &gy).unwrap();
        let rhs = dot(&g.dx, &xd) + dot(&g.dweight, &wd);
        assert_adjoint("rms_norm", dot(&gy, &yd), rhs, 1e-10);
    }

    #[test]
    fn rope_random_shapes(
        b in 1usize..3, n in 1usize..6, h in 1usize..4, half in 1usize..9,
        per_batch: bool, halves: bool, seed in 0u64..1000,
    ) {
        let s = [b, n, h, 2 * half];
        let [x, xd, cos, sin] = rope_case(s, per_batch, seed);
        let pairs = if halves { RopePairs::Halves } else { RopePairs::Interleaved };
        let y = rope_forward(&x, &cos, &sin, pairs).unwrap();
        assert_close("rope", &y.to_f64_vec(), &naive_rope(&x, &cos, &sin, pairs), 1e-15);
        let gx = rope_backward(&xd, &cos, &sin, pairs).unwrap();
        let yd = rope_forward(&xd, &cos, &sin, pairs).unwrap();
        assert_adjoint("rope", dot(&xd, &yd), dot(&gx, &xd), 1e-12);
    }
}
