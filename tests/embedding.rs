//! timestep_embedding: JVP against central differences, backward against the JVP (adjoint
//! identity), known values, f32 against f64, property tests and bad input.

mod common;
mod ops_common;

use common::*;
use flashjvp::ops::{
    timestep_embedding_backward, timestep_embedding_forward, timestep_embedding_jvp,
    DEFAULT_MAX_PERIOD,
};
use flashjvp::{DType, Dual, Tensor};
use ops_common::*;
use proptest::prelude::*;

const P: f64 = DEFAULT_MAX_PERIOD;

/// Times spread like a diffusion model's: a few small, a few in the hundreds.
fn times(b: usize, seed: u64) -> Tensor {
    let mut r = rng(seed);
    let t: Vec<f64> = randn(&[b], &mut r)
        .to_f64_vec()
        .iter()
        .enumerate()
        .map(|(i, v)| if i % 2 == 0 { 2.0 * v } else { 300.0 * v })
        .collect();
    Tensor::from_vec(t, &[b]).unwrap()
}

#[test]
fn jvp_matches_finite_differences() {
    for &(b, dim, period) in &[(6, 16, P), (5, 2, P), (3, 64, 100.0), (300, 256, P)] {
        let (t, td) = (times(b, dim as u64), randn(&[b], &mut rng(1)));
        let out = timestep_embedding_jvp(&dual(&t, &td), dim, period).unwrap();
        let fd = central_difference(
            |h| vec![timestep_embedding_forward(&axpy(&t, h, &td), dim, period).unwrap()],
            1e-6,
        );
        let what = format!("embedding tangent B {b} dim {dim}");
        assert_close(&what, &out.tangent.unwrap().to_f64_vec(), &fd[0], 1e-6);
        assert_eq!(
            out.primal,
            timestep_embedding_forward(&t, dim, period).unwrap()
        );
        let plain = timestep_embedding_jvp(&Dual::constant(t.clone()), dim, period).unwrap();
        assert!(plain.tangent.is_none());
        assert_eq!(plain.primal, out.primal);
    }
}

#[test]
fn backward_satisfies_adjoint_identity() {
    for &(b, dim, period) in &[(6, 16, P), (1, 2, 1.0), (300, 256, P)] {
        let (t, td) = (times(b, 10 + dim as u64), randn(&[b], &mut rng(2)));
        let ge = randn(&[b, dim], &mut rng(3));
        let ed = timestep_embedding_jvp(&dual(&t, &td), dim, period)
            .unwrap()
            .tangent
            .unwrap();
        let dt = timestep_embedding_backward(&t, dim, period, &ge).unwrap();
        assert_eq!(dt.shape(), &[b]);
        assert_adjoint("embedding", dot(&ge, &ed), dot(&dt, &td), 1e-10);
    }
}

#[test]
fn known_values() {
    // t = 0: cos = 1, sin = 0; the tangent is [0…0, ω_i·ṫ].
    let (dim, half) = (8, 4);
    let t = Tensor::from_vec(vec![0.0f64, 0.0], &[2]).unwrap();
    let td = Tensor::from_vec(vec![1.0f64, 2.0], &[2]).unwrap();
    let out = timestep_embedding_jvp(&dual(&t, &td), dim, 10000.0).unwrap();
    let e = out.primal.to_f64_vec();
    assert_eq!(e, [[1.0; 4], [0.0; 4], [1.0; 4], [0.0; 4]].concat());
    let w: Vec<f64> = (0..half)
        .map(|i| 10000f64.powf(-(i as f64) / half as f64))
        .collect();
    let ed = out.tangent.unwrap().to_f64_vec();
    for b in 0..2 {
        for i in 0..half {
            let want = w[i] * td.to_f64_vec()[b];
            assert!(ed[b * dim + i] == 0.0, "-ω sin(0) at {b},{i}");
            assert!(
                (ed[b * dim + half + i] - want).abs() < 1e-15,
                "ω cos(0) at {b},{i}"
            );
        }
    }
    // Cos first, sin second; frequency 1 for i = 0 and 1/100 for i = 2.
    let t = Tensor::from_vec(vec![0.7f64], &[1]).unwrap();
    let e = timestep_embedding_forward(&t, dim, 10000.0)
        .unwrap()
        .to_f64_vec();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-15;
    assert!(
        close(e[0], 0.7f64.cos()) && close(e[half], 0.7f64.sin()),
        "{e:?}"
    );
    assert!(
        close(e[2], 0.007f64.cos()) && close(e[half + 2], 0.007f64.sin()),
        "{e:?}"
    );
}

#[test]
fn f32_agrees_with_f64() {
    let (t, td) = (times(7, 20), randn(&[7], &mut rng(21)));
    let ge = randn(&[7, 32], &mut rng(22));
    // Times in f32: compare against f64 run on the same (rounded) times.
    let t = f32(&t).to_dtype(DType::F64);
    let j64 = timestep_embedding_jvp(&dual(&t, &td), 32, P).unwrap();
    let j32 = timestep_embedding_jvp(&dual(&f32(&t), &f32(&td)), 32, P).unwrap();
    assert_eq!(j32.primal.dtype(), DType::F32);
    assert_close(
        "e f32",
        &j32.primal.to_f64_vec(),
        &j64.primal.to_f64_vec(),
        1e-6,
    );
    let (t32, t64) = (j32.tangent.unwrap(), j64.tangent.unwrap());
    assert_close("ė f32", &t32.to_f64_vec(), &t64.to_f64_vec(), 1e-6);
    let d64 = timestep_embedding_backward(&t, 32, P, &ge).unwrap();
    let d32 = timestep_embedding_backward(&f32(&t), 32, P, &f32(&ge)).unwrap();
    assert_close("dt f32", &d32.to_f64_vec(), &d64.to_f64_vec(), 1e-6);
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor() {
    let t = times(4, 30);
    let ge = randn(&[4, 8], &mut rng(31));
    let mut r = rng(32);
    // Shape mismatch of the cotangent, wrong rank of t.
    let bwd = timestep_embedding_backward(&t, 8, P, &randn(&[4, 6], &mut r));
    assert_err(bwd, is_shape, "ge");
    let bwd = timestep_embedding_backward(&t, 8, P, &randn(&[32], &mut r));
    assert_err(bwd, is_rank, "ge");
    assert_err(
        timestep_embedding_forward(&randn(&[4, 1], &mut r), 8, P),
        is_rank,
        "t",
    );
    assert_err(
        timestep_embedding_forward(&randn(&[], &mut r), 8, P),
        is_rank,
        "t",
    );
    // Primal/tangent mismatch.
    let bad = bad_dual(&t, randn(&[5], &mut r));
    assert_err(timestep_embedding_jvp(&bad, 8, P), is_tangent, "t");
    assert_err(
        timestep_embedding_jvp(&bad_dual(&t, f32(&t)), 8, P),
        is_tangent,
        "t",
    );
    // Dtype mismatch and bf16.
    let bwd = timestep_embedding_backward(&t, 8, P, &f32(&ge));
    assert_err(bwd, is_dtype, "ge");
    assert_bf16_refused(timestep_embedding_forward(&bf16(&t), 8, P), "t");
    // Bad scalars, in every entry point.
    for dim in [0, 7] {
        assert_err(timestep_embedding_forward(&t, dim, P), is_invalid, "dim");
        let j = timestep_embedding_jvp(&Dual::constant(t.clone()), dim, P);
        assert_err(j, is_invalid, "dim");
        assert_err(
            timestep_embedding_backward(&t, dim, P, &ge),
            is_invalid,
            "dim",
        );
    }
    for period in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert_err(
            timestep_embedding_forward(&t, 8, period),
            is_invalid,
            "max_period",
        );
        let j = timestep_embedding_jvp(&Dual::constant(t.clone()), 8, period);
        assert_err(j, is_invalid, "max_period");
        let b = timestep_embedding_backward(&t, 8, period, &ge);
        assert_err(b, is_invalid, "max_period");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any batch, width, period and times: each (cos, sin) pair lies on the unit circle, its
    /// tangent is orthogonal to it with length ω·|ṫ|, the primal is the forward, and the backward
    /// is the adjoint of the JVP.
    #[test]
    fn prop_circle_and_adjoint(
        (b, half, period, v) in (1usize..7, 1usize..9, 1.0f64..1e4).prop_flat_map(|(b, half, p)| {
            (Just(b), Just(half), Just(p), prop::collection::vec(-500.0f64..500.0, 2 * b + 2 * b * half))
        })
    ) {
        let dim = 2 * half;
        let mut cut = Cut::new(v);
        let (t, td, ge) = (cut.take(&[b]), cut.take(&[b]), cut.take(&[b, dim]));
        let out = timestep_embedding_jvp(&dual(&t, &td), dim, period).unwrap();
        prop_assert_eq!(&out.primal, &timestep_embedding_forward(&t, dim, period).unwrap());
        let (e, ed) = (out.primal.to_f64_vec(), out.tangent.unwrap().to_f64_vec());
        let tdv = td.to_f64_vec();
        for bi in 0..b {
            for i in 0..half {
                let w = period.powf(-(i as f64) / half as f64);
                let (c, s) = (e[bi * dim + i], e[bi * dim + half + i]);
                let (cd, sd) = (ed[bi * dim + i], ed[bi * dim + half + i]);
                prop_assert!((c * c + s * s - 1.0).abs() < 1e-14);
                prop_assert!((c * cd + s * sd).abs() <= 1e-12 * (w * tdv[bi].abs()).max(1e-300));
                let len = (cd * cd + sd * sd).sqrt();
                prop_assert!((len - w * tdv[bi].abs()).abs() <= 1e-12 * w * tdv[bi].abs() + 1e-300);
            }
        }
        let dt = timestep_embedding_backward(&t, dim, period, &ge).unwrap();
        let scale = norm(&ge.to_f64_vec()) * norm(&tdv) * (half as f64).sqrt();
        adjoint_within(dot(&ge, &Tensor::from_vec(ed, &[b, dim]).unwrap()), dot(&dt, &td), scale, 1e-13)?;
    }

    /// Any shapes and scalars: never a panic, Ok exactly when they are valid.
    #[test]
    fn prop_inputs_never_panic(
        ts in prop::collection::vec(0usize..5, 0..3),
        gs in prop::collection::vec(0usize..9, 0..3),
        dim in 0usize..9,
        period in prop::sample::select(vec![-1.0, 0.0, 0.5, 1.0, 1e4, f64::NAN, f64::INFINITY]),
    ) {
        let z = |s: &[usize]| Tensor::zeros(s, DType::F64);
        let valid = ts.len() == 1 && ts[0] > 0 && dim > 0 && dim % 2 == 0 && period.is_finite() && period > 0.0;
        prop_assert_eq!(timestep_embedding_forward(&z(&ts), dim, period).is_ok(), valid);
        prop_assert_eq!(timestep_embedding_jvp(&dual(&z(&ts), &z(&ts)), dim, period).is_ok(), valid);
        let valid = valid && gs == [ts[0], dim];
        prop_assert_eq!(timestep_embedding_backward(&z(&ts), dim, period, &z(&gs)).is_ok(), valid);
    }
}
