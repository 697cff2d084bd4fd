//! gated_residual: JVP against central differences (tangents on x, gate and y, some absent),
//! backward against the JVP (adjoint identity) for gate groups G = 1, 3 and T, known values,
//! f32 against f64, property tests and bad input.

mod common;
mod ops_common;

use common::*;
use flashjvp::ops::{gated_residual_backward, gated_residual_forward, gated_residual_jvp};
use flashjvp::{DType, Dual, Tensor};
use ops_common::*;
use proptest::prelude::*;

/// The shape of a gate with `g` groups of width c (g = 0 means the plain [c]).
fn gate_shape(g: usize, c: usize) -> Vec<usize> {
    if g == 0 {
        vec![c]
    } else {
        vec![g, c]
    }
}

struct Case {
    x: Tensor,
    xd: Tensor,
    g: Tensor,
    gd: Tensor,
    y: Tensor,
    yd: Tensor,
}

fn case(t: usize, c: usize, groups: usize, seed: u64) -> Case {
    let mut r = rng(seed);
    let gs = gate_shape(groups, c);
    Case {
        x: randn(&[t, c], &mut r),
        xd: randn(&[t, c], &mut r),
        g: randn(&gs, &mut r),
        gd: randn(&gs, &mut r),
        y: randn(&[t, c], &mut r),
        yd: randn(&[t, c], &mut r),
    }
}

/// Gate layouts for T = 12 rows: [C], G = 1, G = 3 (samples of 4 tokens), G = T.
const GROUPS: [usize; 4] = [0, 1, 3, 12];

#[test]
fn jvp_matches_finite_differences() {
    for (k, &groups) in GROUPS.iter().enumerate() {
        let p = case(12, 9, groups, k as u64);
        for mask in 1..8u32 {
            let on = |bit: u32| mask & (1 << bit) != 0;
            let pick = |bit: u32, p: &Tensor, t: &Tensor| {
                if on(bit) {
                    dual(p, t)
                } else {
                    Dual::constant(p.clone())
                }
            };
            let out = gated_residual_jvp(
                &pick(0, &p.x, &p.xd),
                &pick(1, &p.g, &p.gd),
                &pick(2, &p.y, &p.yd),
            )
            .unwrap();
            let dir = |bit: u32, t: &Tensor| {
                if on(bit) {
                    t.clone()
                } else {
                    Tensor::zeros(t.shape(), DType::F64)
                }
            };
            let (xd, gd, yd) = (dir(0, &p.xd), dir(1, &p.gd), dir(2, &p.yd));
            let fd = central_difference(
                |e| {
                    let (x, g, y) = (axpy(&p.x, e, &xd), axpy(&p.g, e, &gd), axpy(&p.y, e, &yd));
                    vec![gated_residual_forward(&x, &g, &y).unwrap()]
                },
                1e-5,
            );
            let what = format!("residual tangent G {groups} mask {mask:03b}");
            assert_close(&what, &out.tangent.unwrap().to_f64_vec(), &fd[0], 1e-6);
            let primal = gated_residual_forward(&p.x, &p.g, &p.y).unwrap();
            assert_eq!(out.primal, primal, "{what}");
        }
        let c = |t: &Tensor| Dual::constant(t.clone());
        let none = gated_residual_jvp(&c(&p.x), &c(&p.g), &c(&p.y)).unwrap();
        assert!(none.tangent.is_none());
    }
}

#[test]
fn backward_satisfies_adjoint_identity() {
    // The last case is large enough for the row loops and group sums to split across threads.
    let cases = [
        (12, 9, 0),
        (12, 9, 1),
        (12, 9, 3),
        (12, 9, 12),
        (600, 128, 2),
    ];
    for (k, &(t, c, groups)) in cases.iter().enumerate() {
        let p = case(t, c, groups, 100 + k as u64);
        let gout = randn(&[t, c], &mut rng(200 + k as u64));
        let od = gated_residual_jvp(&dual(&p.x, &p.xd), &dual(&p.g, &p.gd), &dual(&p.y, &p.yd))
            .unwrap()
            .tangent
            .unwrap();
        let g = gated_residual_backward(&p.g, &p.y, &gout).unwrap();
        assert_eq!(g.dgate.shape(), p.g.shape());
        let rhs = dot(&g.dx, &p.xd) + dot(&g.dgate, &p.gd) + dot(&g.dy, &p.yd);
        assert_adjoint(&format!("residual G {groups}"), dot(&gout, &od), rhs, 1e-10);
    }
}

#[test]
fn known_values() {
    // Row r of [2 samples × 2 tokens] uses gate[r / 2]: out = x + gate·y.
    let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[4, 2]).unwrap();
    let y = Tensor::from_vec(vec![10.0f64; 8], &[4, 2]).unwrap();
    let gate = Tensor::from_vec(vec![0.0f64, 1.0, 2.0, -1.0], &[2, 2]).unwrap();
    let out = gated_residual_forward(&x, &gate, &y).unwrap().to_f64_vec();
    assert_eq!(out, vec![1.0, 12.0, 3.0, 14.0, 25.0, -4.0, 27.0, -2.0]);
    // dgate sums gout·y over the rows of each sample.
    let gout = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[4, 2]).unwrap();
    let g = gated_residual_backward(&gate, &y, &gout).unwrap();
    assert_eq!(g.dgate.to_f64_vec(), vec![40.0, 60.0, 120.0, 140.0]);
    assert_eq!(g.dx, gout);
}

#[test]
fn f32_agrees_with_f64() {
    let p = case(12, 40, 3, 500);
    let gout = randn(&[12, 40], &mut rng(501));
    let j64 =
        gated_residual_jvp(&dual(&p.x, &p.xd), &dual(&p.g, &p.gd), &dual(&p.y, &p.yd)).unwrap();
    let j32 = gated_residual_jvp(
        &dual(&f32(&p.x), &f32(&p.xd)),
        &dual(&f32(&p.g), &f32(&p.gd)),
        &dual(&f32(&p.y), &f32(&p.yd)),
    )
    .unwrap();
    assert_eq!(j32.primal.dtype(), DType::F32);
    assert_close(
        "out f32",
        &j32.primal.to_f64_vec(),
        &j64.primal.to_f64_vec(),
        1e-6,
    );
    let (t32, t64) = (j32.tangent.unwrap(), j64.tangent.unwrap());
    assert_close("tangent f32", &t32.to_f64_vec(), &t64.to_f64_vec(), 1e-6);
    let g64 = gated_residual_backward(&p.g, &p.y, &gout).unwrap();
    let g32 = gated_residual_backward(&f32(&p.g), &f32(&p.y), &f32(&gout)).unwrap();
    let dg = (g32.dgate.to_f64_vec(), g64.dgate.to_f64_vec());
    assert_close("dgate f32", &dg.0, &dg.1, 1e-6);
    assert_close("dy f32", &g32.dy.to_f64_vec(), &g64.dy.to_f64_vec(), 1e-6);
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor() {
    let p = case(6, 4, 0, 600);
    let gout = randn(&[6, 4], &mut rng(601));
    let mut r = rng(602);
    let fwd = gated_residual_forward;
    // Shape mismatch.
    assert_err(fwd(&p.x, &randn(&[5], &mut r), &p.y), is_shape, "gate");
    assert_err(fwd(&p.x, &randn(&[4, 4], &mut r), &p.y), is_shape, "gate");
    assert_err(fwd(&p.x, &p.g, &randn(&[6, 5], &mut r)), is_shape, "y");
    let bwd = gated_residual_backward(&p.g, &p.y, &randn(&[5, 4], &mut r));
    assert_err(bwd, is_shape, "gout");
    // Wrong rank.
    assert_err(fwd(&randn(&[24], &mut r), &p.g, &p.y), is_rank, "x");
    assert_err(fwd(&p.x, &randn(&[1, 1, 4], &mut r), &p.y), is_rank, "gate");
    assert_err(fwd(&p.x, &p.g, &randn(&[24], &mut r)), is_rank, "y");
    let bwd = gated_residual_backward(&p.g, &randn(&[24], &mut r), &gout);
    assert_err(bwd, is_rank, "y");
    // Primal/tangent mismatch on each input.
    let c = |t: &Tensor| Dual::constant(t.clone());
    let bad = bad_dual(&p.x, randn(&[4, 6], &mut r));
    assert_err(
        gated_residual_jvp(&bad, &c(&p.g), &c(&p.y)),
        is_tangent,
        "x",
    );
    let bad = bad_dual(&p.g, randn(&[1, 4], &mut r));
    assert_err(
        gated_residual_jvp(&c(&p.x), &bad, &c(&p.y)),
        is_tangent,
        "gate",
    );
    let bad = bad_dual(&p.y, f32(&p.y));
    assert_err(
        gated_residual_jvp(&c(&p.x), &c(&p.g), &bad),
        is_tangent,
        "y",
    );
    // Dtype mismatch with the first input, and bf16.
    assert_err(fwd(&p.x, &f32(&p.g), &p.y), is_dtype, "gate");
    assert_err(fwd(&p.x, &p.g, &f32(&p.y)), is_dtype, "y");
    assert_err(
        gated_residual_backward(&p.g, &f32(&p.y), &gout),
        is_dtype,
        "y",
    );
    assert_err(
        gated_residual_backward(&p.g, &p.y, &f32(&gout)),
        is_dtype,
        "gout",
    );
    assert_bf16_refused(fwd(&bf16(&p.x), &bf16(&p.g), &bf16(&p.y)), "x");
    let bwd = gated_residual_backward(&bf16(&p.g), &bf16(&p.y), &bf16(&gout));
    assert_bf16_refused(bwd, "gate");
}

/// Row counts with a divisor (0 = the plain [C] gate).
fn rows_and_groups() -> impl Strategy<Value = (usize, usize)> {
    (1usize..10).prop_flat_map(|t| {
        let divisors: Vec<usize> = (0..=t).filter(|&g| g == 0 || t % g == 0).collect();
        (Just(t), prop::sample::select(divisors))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any shape, grouping and values: the primal is the forward, the tangent is exactly
    /// ẋ + ġ·y + g·ẏ (it is bilinear, so central differences with step 1 are exact up to
    /// rounding), and the backward is the adjoint of the JVP.
    #[test]
    fn prop_jvp_and_adjoint(
        ((t, groups), c, v) in (rows_and_groups(), 1usize..10).prop_flat_map(|(tg, c)| {
            let n = 5 * tg.0 * c + 2 * tg.1.max(1) * c;
            (Just(tg), Just(c), values(n))
        })
    ) {
        let mut cut = Cut::new(v);
        let (x, xd, y, yd, gout) = (cut.take(&[t, c]), cut.take(&[t, c]), cut.take(&[t, c]),
            cut.take(&[t, c]), cut.take(&[t, c]));
        let (g, gd) = (cut.take(&gate_shape(groups, c)), cut.take(&gate_shape(groups, c)));
        let out = gated_residual_jvp(&dual(&x, &xd), &dual(&g, &gd), &dual(&y, &yd)).unwrap();
        prop_assert_eq!(&out.primal, &gated_residual_forward(&x, &g, &y).unwrap());
        let od = out.tangent.unwrap();
        let fd = central_difference(|e| vec![gated_residual_forward(
            &axpy(&x, e, &xd), &axpy(&g, e, &gd), &axpy(&y, e, &yd)).unwrap()], 1.0);
        let err = rel_err(&od.to_f64_vec(), &fd[0]);
        prop_assert!(err <= 1e-12 || norm(&fd[0]) < 1e-12, "tangent off by {}", err);
        let gr = gated_residual_backward(&g, &y, &gout).unwrap();
        let rhs = dot(&gr.dx, &xd) + dot(&gr.dgate, &gd) + dot(&gr.dy, &yd);
        let scale = norm(&gout.to_f64_vec()) * (norm(&xd.to_f64_vec())
            + 3.0 * (t as f64).sqrt() * (norm(&gd.to_f64_vec()) + norm(&yd.to_f64_vec())));
        adjoint_within(dot(&gout, &od), rhs, scale, 1e-12)?;
    }

    /// Any shapes: never a panic, Ok exactly when they fit.
    #[test]
    fn prop_shapes_never_panic(
        xs in prop::collection::vec(0usize..5, 0..4),
        gs in prop::collection::vec(0usize..5, 0..4),
        ys in prop::collection::vec(0usize..5, 0..4),
    ) {
        let z = |s: &[usize]| Tensor::zeros(s, DType::F64);
        let gate_fits = |rows: usize, c: usize| match gs[..] {
            [cc] => cc == c,
            [g, cc] => cc == c && g > 0 && rows % g == 0,
            _ => false,
        };
        // Empty dimensions are refused like any other bad shape.
        let nonempty = |s: &[usize]| s.iter().all(|&d| d > 0);
        let valid = xs.len() == 2 && ys == xs && gate_fits(xs[0], xs[1]) && nonempty(&xs);
        prop_assert_eq!(gated_residual_forward(&z(&xs), &z(&gs), &z(&ys)).is_ok(), valid);
        let r = gated_residual_jvp(&dual(&z(&xs), &z(&xs)), &dual(&z(&gs), &z(&gs)), &dual(&z(&ys), &z(&ys)));
        prop_assert_eq!(r.is_ok(), valid);
        let valid = ys.len() == 2 && gate_fits(ys[0], ys[1]) && xs == ys && nonempty(&ys);
        prop_assert_eq!(gated_residual_backward(&z(&gs), &z(&ys), &z(&xs)).is_ok(), valid);
    }
}
