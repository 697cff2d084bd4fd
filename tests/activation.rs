//! GELU (tanh form) and SiLU: JVP against central differences, backward against the JVP
//! (adjoint identity), known values, f32 against f64, property tests and bad input.

mod common;
mod ops_common;

use common::*;
use flashjvp::ops::{gelu_backward, gelu_forward, gelu_jvp, silu_backward, silu_forward, silu_jvp};
use flashjvp::{DType, Dual, Result, Tensor};
use ops_common::*;
use proptest::prelude::*;

/// The three entry points of one activation, so each check runs on both.
struct Act {
    name: &'static str,
    forward: fn(&Tensor) -> Result<Tensor>,
    jvp: fn(&Dual) -> Result<Dual>,
    backward: fn(&Tensor, &Tensor) -> Result<Tensor>,
}

const ACTS: [Act; 2] = [
    Act {
        name: "gelu",
        forward: gelu_forward,
        jvp: gelu_jvp,
        backward: gelu_backward,
    },
    Act {
        name: "silu",
        forward: silu_forward,
        jvp: silu_jvp,
        backward: silu_backward,
    },
];

/// Random values spread over the interesting range (both tails and the bend near 0).
fn inputs(shape: &[usize], seed: u64) -> Tensor {
    let mut r = rng(seed);
    let x = randn(shape, &mut r);
    Tensor::from_vec(x.to_f64_vec().iter().map(|v| 3.0 * v).collect(), shape).unwrap()
}

#[test]
fn jvp_matches_finite_differences() {
    // Any shape: a scalar, a vector, a 3-d tensor, and one large enough to split across threads.
    for (k, shape) in [vec![], vec![7], vec![3, 5, 7], vec![64, 1024]]
        .iter()
        .enumerate()
    {
        let x = inputs(shape, 10 + k as u64);
        let xd = inputs(shape, 20 + k as u64);
        for act in &ACTS {
            let out = (act.jvp)(&dual(&x, &xd)).unwrap();
            let fd = central_difference(|h| vec![(act.forward)(&axpy(&x, h, &xd)).unwrap()], 1e-5);
            assert_eq!(out.primal, (act.forward)(&x).unwrap(), "{}", act.name);
            let what = format!("{} tangent {shape:?}", act.name);
            assert_close(&what, &out.tangent.unwrap().to_f64_vec(), &fd[0], 1e-6);
            let plain = (act.jvp)(&Dual::constant(x.clone())).unwrap();
            assert!(plain.tangent.is_none(), "{}", act.name);
            assert_eq!(plain.primal, out.primal, "{}", act.name);
        }
    }
}

#[test]
fn backward_satisfies_adjoint_identity() {
    for (k, shape) in [vec![5], vec![4, 6, 3], vec![64, 1024]].iter().enumerate() {
        let (x, xd, gy) = (
            inputs(shape, 30 + k as u64),
            inputs(shape, 40),
            inputs(shape, 50),
        );
        for act in &ACTS {
            let yd = (act.jvp)(&dual(&x, &xd)).unwrap().tangent.unwrap();
            let dx = (act.backward)(&x, &gy).unwrap();
            assert_adjoint(act.name, dot(&gy, &yd), dot(&dx, &xd), 1e-10);
        }
    }
}

#[test]
fn known_values() {
    let x = Tensor::from_vec(vec![1.0f64, 0.0, -1.0, 30.0, -30.0], &[5]).unwrap();
    let g = gelu_forward(&x).unwrap().to_f64_vec();
    let s = silu_forward(&x).unwrap().to_f64_vec();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
    assert!(close(g[0], 0.841_191_990_607_766), "gelu(1) = {}", g[0]);
    assert!(
        close(g[1], 0.0) && close(g[2], -0.158_808_009_392_234),
        "gelu(0), gelu(-1): {g:?}"
    );
    assert!(close(g[3], 30.0) && g[4].abs() < 1e-12, "gelu tails: {g:?}");
    assert!(close(s[0], 0.731_058_578_630_004_9), "silu(1) = {}", s[0]);
    assert!(
        close(s[1], 0.0) && close(s[2], -0.268_941_421_369_995),
        "silu(0), silu(-1): {s:?}"
    );
    assert!(close(s[3], 30.0) && s[4].abs() < 1e-11, "silu tails: {s:?}");
    // g(u) − g(−u) = u for both (tanh and 2σ − 1 are odd), also far in the tails where a
    // careless 1 + tanh would cancel.
    for u in [0.3f64, 1.7, 4.0, 9.0, 25.0] {
        let x = Tensor::from_vec(vec![u, -u], &[2]).unwrap();
        for act in &ACTS {
            let y = (act.forward)(&x).unwrap().to_f64_vec();
            assert!(
                close(y[0] - y[1], u),
                "{}({u}) − {}(−{u}) = {}",
                act.name,
                act.name,
                y[0] - y[1]
            );
            assert!(y[1] <= 0.0 && y[1] > -u, "{}(−{u}) = {}", act.name, y[1]);
        }
    }
    // Derivatives at 0: both are ½.
    let zero = Tensor::from_vec(vec![0.0f64], &[1]).unwrap();
    let one = Tensor::from_vec(vec![1.0f64], &[1]).unwrap();
    for act in &ACTS {
        let d = (act.backward)(&zero, &one).unwrap().to_f64_vec()[0];
        assert!(close(d, 0.5), "{}'(0) = {d}", act.name);
    }
}

#[test]
fn f32_agrees_with_f64() {
    let (x, xd, gy) = (
        inputs(&[13, 29], 60),
        inputs(&[13, 29], 61),
        inputs(&[13, 29], 62),
    );
    for act in &ACTS {
        let j64 = (act.jvp)(&dual(&x, &xd)).unwrap();
        let j32 = (act.jvp)(&dual(&f32(&x), &f32(&xd))).unwrap();
        assert_eq!(j32.primal.dtype(), DType::F32);
        let what = |s: &str| format!("{} {s} f32", act.name);
        assert_close(
            &what("y"),
            &j32.primal.to_f64_vec(),
            &j64.primal.to_f64_vec(),
            1e-6,
        );
        let (t32, t64) = (j32.tangent.unwrap(), j64.tangent.unwrap());
        assert_close(&what("ẏ"), &t32.to_f64_vec(), &t64.to_f64_vec(), 1e-6);
        let d64 = (act.backward)(&x, &gy).unwrap();
        let d32 = (act.backward)(&f32(&x), &f32(&gy)).unwrap();
        assert_close(&what("dx"), &d32.to_f64_vec(), &d64.to_f64_vec(), 1e-6);
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor() {
    let (x, gy) = (inputs(&[4, 3], 70), inputs(&[4, 3], 71));
    for act in &ACTS {
        // Shape mismatch (also a rank mismatch) of the cotangent.
        assert_err((act.backward)(&x, &inputs(&[3, 4], 72)), is_shape, "gy");
        assert_err((act.backward)(&x, &inputs(&[12], 72)), is_rank, "gy");
        // Primal/tangent mismatch, in shape and in dtype.
        assert_err(
            (act.jvp)(&bad_dual(&x, inputs(&[4, 4], 73))),
            is_tangent,
            "x",
        );
        assert_err((act.jvp)(&bad_dual(&x, f32(&x))), is_tangent, "x");
        // Dtype mismatch, and bf16 which the CPU does not compute in.
        assert_err((act.backward)(&x, &f32(&gy)), is_dtype, "gy");
        assert_bf16_refused((act.forward)(&bf16(&x)), "x");
        assert_bf16_refused((act.jvp)(&dual(&bf16(&x), &bf16(&x))), "x");
        assert_bf16_refused((act.backward)(&bf16(&x), &bf16(&gy)), "x");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any shape (rank 0 to 3) and values: the JVP's primal is the forward, its tangent matches
    /// central differences, and the backward is its adjoint.
    #[test]
    fn prop_jvp_and_adjoint(
        (shape, v) in prop::collection::vec(1usize..6, 0..4).prop_flat_map(|shape| {
            let n: usize = shape.iter().product();
            (Just(shape), values(3 * n))
        })
    ) {
        let mut cut = Cut::new(v);
        let (x, xd, gy) = (cut.take(&shape), cut.take(&shape), cut.take(&shape));
        for act in &ACTS {
            let out = (act.jvp)(&dual(&x, &xd)).unwrap();
            prop_assert_eq!(&out.primal, &(act.forward)(&x).unwrap());
            let yd = out.tangent.unwrap();
            let fd = central_difference(|h| vec![(act.forward)(&axpy(&x, h, &xd)).unwrap()], 1e-5);
            let err = rel_err(&yd.to_f64_vec(), &fd[0]);
            prop_assert!(err <= 1e-6 || norm(&fd[0]) < 1e-9, "{} tangent off by {}", act.name, err);
            let dx = (act.backward)(&x, &gy).unwrap();
            let scale = norm(&gy.to_f64_vec()) * norm(&xd.to_f64_vec()) * 1.2;
            adjoint_within(dot(&gy, &yd), dot(&dx, &xd), scale, 1e-13)?;
        }
    }

    /// Any pair of shapes: never a panic, and Ok exactly when they agree.
    #[test]
    fn prop_shapes_never_panic(
        xs in prop::collection::vec(0usize..4, 0..4),
        gs in prop::collection::vec(0usize..4, 0..4),
    ) {
        let z = |s: &[usize]| Tensor::zeros(s, DType::F64);
        for act in &ACTS {
            prop_assert!((act.forward)(&z(&xs)).is_ok());
            prop_assert_eq!((act.backward)(&z(&xs), &z(&gs)).is_ok(), xs == gs);
            prop_assert_eq!((act.jvp)(&bad_dual(&z(&xs), z(&gs))).is_ok(), xs == gs);
        }
    }
}
