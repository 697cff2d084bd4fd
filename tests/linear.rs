//! linear: JVP against central differences, backward against the JVP (adjoint identity), f32
//! against f64, property tests over shapes and values, and every kind of bad input.

mod common;
mod ops_common;

use common::*;
use flashjvp::ops::{linear_backward, linear_forward, linear_jvp};
use flashjvp::{DType, Dual, Tensor};
use ops_common::*;
use proptest::prelude::*;

/// The full tangent of y along (ẋ, ẇ, ḃ): ẋWᵀ from the JVP plus x·ẇᵀ + ḃ, which is exactly
/// `linear_forward(x, ẇ, ḃ)` because y is linear in (w, b).
fn full_tangent(x: &Tensor, xd: &Tensor, w: &Tensor, wd: &Tensor, bd: &Tensor) -> Tensor {
    let yd = linear_jvp(&dual(x, xd), w, None).unwrap().tangent.unwrap();
    let param_part = linear_forward(x, wd, Some(bd)).unwrap();
    axpy(&yd, 1.0, &param_part)
}

#[test]
fn jvp_matches_finite_differences() {
    let mut r = rng(1);
    // The second shape is large enough that the stacked GEMM runs on several threads.
    for &(t, cin, cout) in &[(5, 7, 3), (160, 48, 40)] {
        let (x, xd) = (randn(&[t, cin], &mut r), randn(&[t, cin], &mut r));
        let (w, b) = (randn(&[cout, cin], &mut r), randn(&[cout], &mut r));
        for bias in [Some(&b), None] {
            let out = linear_jvp(&dual(&x, &xd), &w, bias).unwrap();
            let fd = central_difference(
                |h| vec![linear_forward(&axpy(&x, h, &xd), &w, bias).unwrap()],
                1e-5,
            );
            assert_close("linear ẏ", &out.tangent.unwrap().to_f64_vec(), &fd[0], 1e-6);
            let y = linear_forward(&x, &w, bias).unwrap();
            assert_close("linear y", &out.primal.to_f64_vec(), &y.to_f64_vec(), 1e-14);
        }
    }
}

#[test]
fn jvp_without_tangent_is_the_forward() {
    let mut r = rng(2);
    let (x, w, b) = (
        randn(&[4, 6], &mut r),
        randn(&[3, 6], &mut r),
        randn(&[3], &mut r),
    );
    let out = linear_jvp(&Dual::constant(x.clone()), &w, Some(&b)).unwrap();
    assert!(out.tangent.is_none());
    assert_eq!(out.primal, linear_forward(&x, &w, Some(&b)).unwrap());
}

#[test]
fn full_tangent_matches_finite_differences() {
    let mut r = rng(3);
    let (x, xd) = (randn(&[6, 5], &mut r), randn(&[6, 5], &mut r));
    let (w, wd) = (randn(&[4, 5], &mut r), randn(&[4, 5], &mut r));
    let (b, bd) = (randn(&[4], &mut r), randn(&[4], &mut r));
    let fd = central_difference(
        |h| {
            vec![linear_forward(
                &axpy(&x, h, &xd),
                &axpy(&w, h, &wd),
                Some(&axpy(&b, h, &bd)),
            )
            .unwrap()]
        },
        1e-5,
    );
    let got = full_tangent(&x, &xd, &w, &wd, &bd);
    assert_close("linear full ẏ", &got.to_f64_vec(), &fd[0], 1e-6);
}

#[test]
fn backward_satisfies_adjoint_identity() {
    let mut r = rng(4);
    // The last shape runs all three GEMMs (dx, and dw through a transposed view) on several threads.
    for &(t, cin, cout) in &[(5, 7, 3), (1, 1, 1), (200, 64, 144)] {
        let (x, xd) = (randn(&[t, cin], &mut r), randn(&[t, cin], &mut r));
        let (w, wd) = (randn(&[cout, cin], &mut r), randn(&[cout, cin], &mut r));
        let (b, bd) = (randn(&[cout], &mut r), randn(&[cout], &mut r));
        let gy = randn(&[t, cout], &mut r);
        let lhs = dot(&gy, &full_tangent(&x, &xd, &w, &wd, &bd));
        let g = linear_backward(&x, &w, Some(&b), &gy).unwrap();
        let db = g.db.unwrap();
        let rhs = dot(&g.dx, &xd) + dot(&g.dw, &wd) + dot(&db, &bd);
        assert_adjoint("linear", lhs, rhs, 1e-10);
        let no_bias = linear_backward(&x, &w, None, &gy).unwrap();
        assert!(no_bias.db.is_none());
        assert_eq!(no_bias.dx, g.dx);
    }
}

#[test]
fn known_values() {
    // y = [1 2; 3 4]·[1 0; 1 1]ᵀ + [10, 20] = [[11, 23], [13, 27]].
    let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
    let w = Tensor::from_vec(vec![1.0f64, 0.0, 1.0, 1.0], &[2, 2]).unwrap();
    let b = Tensor::from_vec(vec![10.0f64, 20.0], &[2]).unwrap();
    let y = linear_forward(&x, &w, Some(&b)).unwrap();
    assert_eq!(y.to_f64_vec(), vec![11.0, 23.0, 13.0, 27.0]);
}

#[test]
fn f32_agrees_with_f64() {
    let mut r = rng(5);
    let (x, xd) = (randn(&[9, 17], &mut r), randn(&[9, 17], &mut r));
    let (w, b, gy) = (
        randn(&[11, 17], &mut r),
        randn(&[11], &mut r),
        randn(&[9, 11], &mut r),
    );
    let j64 = linear_jvp(&dual(&x, &xd), &w, Some(&b)).unwrap();
    let j32 = linear_jvp(&dual(&f32(&x), &f32(&xd)), &f32(&w), Some(&f32(&b))).unwrap();
    assert_eq!(j32.primal.dtype(), DType::F32);
    assert_close(
        "y f32",
        &j32.primal.to_f64_vec(),
        &j64.primal.to_f64_vec(),
        1e-5,
    );
    let (t32, t64) = (j32.tangent.unwrap(), j64.tangent.unwrap());
    assert_close("ẏ f32", &t32.to_f64_vec(), &t64.to_f64_vec(), 1e-5);
    let g64 = linear_backward(&x, &w, Some(&b), &gy).unwrap();
    let g32 = linear_backward(&f32(&x), &f32(&w), Some(&f32(&b)), &f32(&gy)).unwrap();
    assert_close("dx f32", &g32.dx.to_f64_vec(), &g64.dx.to_f64_vec(), 1e-5);
    assert_close("dw f32", &g32.dw.to_f64_vec(), &g64.dw.to_f64_vec(), 1e-5);
    let (db32, db64) = (g32.db.unwrap(), g64.db.unwrap());
    assert_close("db f32", &db32.to_f64_vec(), &db64.to_f64_vec(), 1e-5);
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor() {
    let mut r = rng(6);
    let (x, w, b, gy) = (
        randn(&[4, 3], &mut r),
        randn(&[5, 3], &mut r),
        randn(&[5], &mut r),
        randn(&[4, 5], &mut r),
    );
    // Shape mismatch.
    assert_err(
        linear_forward(&x, &randn(&[5, 4], &mut r), Some(&b)),
        is_shape,
        "w",
    );
    assert_err(
        linear_forward(&x, &w, Some(&randn(&[4], &mut r))),
        is_shape,
        "b",
    );
    assert_err(
        linear_backward(&x, &w, Some(&b), &randn(&[4, 4], &mut r)),
        is_shape,
        "gy",
    );
    // Wrong rank.
    assert_err(
        linear_forward(&randn(&[12], &mut r), &w, None),
        is_rank,
        "x",
    );
    assert_err(
        linear_forward(&x, &randn(&[5, 3, 1], &mut r), None),
        is_rank,
        "w",
    );
    assert_err(
        linear_forward(&x, &w, Some(&randn(&[1, 5], &mut r))),
        is_rank,
        "b",
    );
    // Primal/tangent mismatch, in shape and in dtype.
    let bad = bad_dual(&x, randn(&[3, 4], &mut r));
    assert_err(linear_jvp(&bad, &w, None), is_tangent, "x");
    assert_err(
        linear_jvp(&bad_dual(&x, f32(&x)), &w, None),
        is_tangent,
        "x",
    );
    // Dtype mismatch with the first input, and a dtype the CPU does not compute in.
    assert_err(linear_forward(&x, &f32(&w), None), is_dtype, "w");
    assert_err(linear_forward(&x, &w, Some(&f32(&b))), is_dtype, "b");
    assert_err(linear_backward(&x, &w, None, &f32(&gy)), is_dtype, "gy");
    assert_bf16_refused(linear_forward(&bf16(&x), &bf16(&w), None), "x");
    let xb = bf16(&x);
    assert_bf16_refused(linear_jvp(&dual(&xb, &xb), &bf16(&w), None), "x");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// For any shape and values, the primal of the JVP is the forward and the backward is the
    /// adjoint of the full tangent map.
    #[test]
    fn prop_adjoint_and_primal(
        (t, cin, cout, v) in (1usize..9, 1usize..9, 1usize..9).prop_flat_map(|(t, cin, cout)| {
            let n = 2 * t * cin + 2 * cout * cin + 2 * cout + t * cout;
            (Just(t), Just(cin), Just(cout), values(n))
        })
    ) {
        let mut cut = Cut::new(v);
        let mut take = |shape: &[usize]| cut.take(shape);
        let (x, xd, w, wd) = (take(&[t, cin]), take(&[t, cin]), take(&[cout, cin]), take(&[cout, cin]));
        let (b, bd, gy) = (take(&[cout]), take(&[cout]), take(&[t, cout]));
        let out = linear_jvp(&dual(&x, &xd), &w, Some(&b)).unwrap();
        prop_assert_eq!(out.primal, linear_forward(&x, &w, Some(&b)).unwrap());
        let lhs = dot(&gy, &full_tangent(&x, &xd, &w, &wd, &bd));
        let g = linear_backward(&x, &w, Some(&b), &gy).unwrap();
        let rhs = dot(&g.dx, &xd) + dot(&g.dw, &wd) + dot(&g.db.unwrap(), &bd);
                let scale = norm(&gy.to_f64_vec()) * (norm(&xd.to_f64_vec()) * norm(&w.to_f64_vec())
            + norm(&x.to_f64_vec()) * norm(&wd.to_f64_vec()) + (t as f64).sqrt() * norm(&bd.to_f64_vec()));
        adjoint_within(lhs, rhs, scale, 1e-12)?;
    }

    /// Any shapes: never a panic, and Ok exactly when they fit together.
    #[test]
    fn prop_shapes_never_panic(
        xs in prop::collection::vec(0usize..4, 0..4),
        ws in prop::collection::vec(0usize..4, 0..4),
        bs in prop::collection::vec(0usize..4, 0..3),
    ) {
        let z = |s: &[usize]| Tensor::zeros(s, DType::F64);
        // Empty dimensions are refused like any other bad shape.
        let nonempty = |s: &[usize]| s.iter().all(|&d| d > 0);
        let valid = xs.len() == 2 && ws.len() == 2 && ws[1] == xs[1] && bs == [ws[0]]
            && nonempty(&xs) && nonempty(&ws);
        let r = linear_forward(&z(&xs), &z(&ws), Some(&z(&bs)));
        prop_assert_eq!(r.is_ok(), valid);
        let r = linear_jvp(&dual(&z(&xs), &z(&xs)), &z(&ws), Some(&z(&bs)));
        prop_assert_eq!(r.is_ok(), valid);
        if valid {
            let gy = z(&[xs[0], ws[0]]);
            let g = linear_backward(&z(&xs), &z(&ws), Some(&z(&bs)), &gy).unwrap();
            prop_assert_eq!(g.dw.shape(), &ws[..]);
        }
    }
}
