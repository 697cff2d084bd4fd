//! layernorm_mod: JVP against central differences (tangents on x, scale and shift, some absent),
//! backward against the JVP (adjoint identity) for modulation groups G = 1, 3 and T, known values,
//! f32 against f64, property tests and bad input.

mod common;
mod ops_common;

use common::*;
use flashjvp::ops::{layernorm_mod_backward, layernorm_mod_forward, layernorm_mod_jvp};
use flashjvp::{DType, Dual, Tensor};
use ops_common::*;
use proptest::prelude::*;

const EPS: f64 = 1e-6;

/// The shape of a modulation tensor with `g` groups of width c (g = 0 means the plain [c]).
fn mod_shape(g: usize, c: usize) -> Vec<usize> {
    if g == 0 {
        vec![c]
    } else {
        vec![g, c]
    }
}

struct Case {
    x: Tensor,
    xd: Tensor,
    s: Tensor,
    sd: Tensor,
    h: Tensor,
    hd: Tensor,
}

/// Random inputs: T rows of width C, scale with `gs` groups and shift with `gh` (0 = [C]).
fn case(t: usize, c: usize, gs: usize, gh: usize, seed: u64) -> Case {
    let mut r = rng(seed);
    let (ss, hs) = (mod_shape(gs, c), mod_shape(gh, c));
    Case {
        x: randn(&[t, c], &mut r),
        xd: randn(&[t, c], &mut r),
        s: randn(&ss, &mut r),
        sd: randn(&ss, &mut r),
        h: randn(&hs, &mut r),
        hd: randn(&hs, &mut r),
    }
}

/// Modulation layouts for T = 12 rows: [C], G = 1, G = 3 (samples of 4 tokens), G = T, and
/// scale and shift with different G.
const GROUPS: [(usize, usize); 6] = [(0, 0), (1, 1), (3, 3), (12, 12), (3, 0), (12, 4)];

#[test]
fn jvp_matches_finite_differences() {
    for (k, &(gs, gh)) in GROUPS.iter().enumerate() {
        let p = case(12, 10, gs, gh, k as u64);
        // All tangents, then each subset with some absent.
        for mask in 1..8u32 {
            let on = |bit: u32| mask & (1 << bit) != 0;
            let pick = |bit: u32, p: &Tensor, t: &Tensor| {
                if on(bit) {
                    dual(p, t)
                } else {
                    Dual::constant(p.clone())
                }
            };
            let out = layernorm_mod_jvp(
                &pick(0, &p.x, &p.xd),
                &pick(1, &p.s, &p.sd),
                &pick(2, &p.h, &p.hd),
                EPS,
            )
            .unwrap();
            let zero = |t: &Tensor| Tensor::zeros(t.shape(), DType::F64);
            let dir = |bit: u32, t: &Tensor| if on(bit) { t.clone() } else { zero(t) };
            let (xd, sd, hd) = (dir(0, &p.xd), dir(1, &p.sd), dir(2, &p.hd));
            let fd = central_difference(
                |e| {
                    vec![layernorm_mod_forward(
                        &axpy(&p.x, e, &xd),
                        &axpy(&p.s, e, &sd),
                        &axpy(&p.h, e, &hd),
                        EPS,
                    )
                    .unwrap()]
                },
                1e-5,
            );
            let what = format!("layernorm ẏ groups {gs}/{gh} mask {mask:03b}");
            assert_close(&what, &out.tangent.unwrap().to_f64_vec(), &fd[0], 1e-6);
            let y = layernorm_mod_forward(&p.x, &p.s, &p.h, EPS).unwrap();
            assert_eq!(out.primal, y, "{what}");
        }
        let none = layernorm_mod_jvp(
            &Dual::constant(p.x.clone()),
            &Dual::constant(p.s.clone()),
            &Dual::constant(p.h.clone()),
            EPS,
        )
        .unwrap();
        assert!(none.tangent.is_none());
    }
}

#[test]
fn backward_satisfies_adjoint_identity() {
    for (k, &(gs, gh)) in GROUPS.iter().enumerate() {
        let p = case(12, 10, gs, gh, 100 + k as u64);
        let gy = randn(&[12, 10], &mut rng(200 + k as u64));
        let yd = layernorm_mod_jvp(
            &dual(&p.x, &p.xd),
            &dual(&p.s, &p.sd),
            &dual(&p.h, &p.hd),
            EPS,
        )
        .unwrap()
        .tangent
        .unwrap();
        let g = layernorm_mod_backward(&p.x, &p.s, &p.h, EPS, &gy).unwrap();
        assert_eq!(g.dscale.shape(), p.s.shape());
        assert_eq!(g.dshift.shape(), p.h.shape());
        let rhs = dot(&g.dx, &p.xd) + dot(&g.dscale, &p.sd) + dot(&g.dshift, &p.hd);
        assert_adjoint(&format!("layernorm {gs}/{gh}"), dot(&gy, &yd), rhs, 1e-10);
    }
}

#[test]
fn large_rows_run_in_parallel_and_stay_correct() {
    // 512 rows of 256: the row loops and the group sums split across threads (G = 1 and G = 2).
    let p = case(512, 256, 1, 2, 300);
    let gy = randn(&[512, 256], &mut rng(301));
    let out = layernorm_mod_jvp(
        &dual(&p.x, &p.xd),
        &dual(&p.s, &p.sd),
        &dual(&p.h, &p.hd),
        EPS,
    )
    .unwrap();
    let fd = central_difference(
        |e| {
            vec![layernorm_mod_forward(
                &axpy(&p.x, e, &p.xd),
                &axpy(&p.s, e, &p.sd),
                &axpy(&p.h, e, &p.hd),
                EPS,
            )
            .unwrap()]
        },
        1e-5,
    );
    let yd = out.tangent.unwrap();
    assert_close("layernorm ẏ large", &yd.to_f64_vec(), &fd[0], 1e-6);
    let g = layernorm_mod_backward(&p.x, &p.s, &p.h, EPS, &gy).unwrap();
    let rhs = dot(&g.dx, &p.xd) + dot(&g.dscale, &p.sd) + dot(&g.dshift, &p.hd);
    assert_adjoint("layernorm large", dot(&gy, &yd), rhs, 1e-10);
}

/// Mean and biased variance of each row of a [T, C] tensor.
fn row_moments(y: &Tensor) -> Vec<(f64, f64)> {
    let c = y.shape()[1];
    y.to_f64_vec()
        .chunks(c)
        .map(|r| {
            let m = r.iter().sum::<f64>() / c as f64;
            (m, r.iter().map(|v| (v - m).powi(2)).sum::<f64>() / c as f64)
        })
        .collect()
}

#[test]
fn known_values() {
    // Without modulation every row has mean 0 and variance var/(var + eps), 1 when eps = 0.
    let mut r = rng(400);
    let x = Tensor::from_vec(
        randn(&[6, 33], &mut r)
            .to_f64_vec()
            .iter()
            .map(|v| 5.0 + 3.0 * v)
            .collect(),
        &[6, 33],
    )
    .unwrap();
    let zero = Tensor::zeros(&[33], DType::F64);
    for ((m, v), (_, vx)) in row_moments(&layernorm_mod_forward(&x, &zero, &zero, 0.0).unwrap())
        .into_iter()
        .zip(row_moments(&x))
    {
        assert!(
            m.abs() < 1e-14 && (v - 1.0).abs() < 1e-13,
            "mean {m}, var {v} (x var {vx})"
        );
    }
    let y = layernorm_mod_forward(&x, &zero, &zero, 0.5).unwrap();
    for ((m, v), (_, vx)) in row_moments(&y).into_iter().zip(row_moments(&x)) {
        assert!(
            m.abs() < 1e-14 && (v - vx / (vx + 0.5)).abs() < 1e-13,
            "eps 0.5: var {v}"
        );
    }
    // Per-group modulation: row r of [2 samples × 3 tokens] gets 1 + scale[r / 3] and shift[r / 3].
    let x = Tensor::from_vec([1.0f64, 3.0].repeat(6), &[6, 2]).unwrap();
    let s = Tensor::from_vec(vec![0.0f64, 1.0, 2.0, 3.0], &[2, 2]).unwrap();
    let h = Tensor::from_vec(vec![10.0f64, 20.0, 30.0, 40.0], &[2, 2]).unwrap();
    let y = layernorm_mod_forward(&x, &s, &h, 0.0).unwrap().to_f64_vec();
    let want = [
        [9.0, 22.0],
        [9.0, 22.0],
        [9.0, 22.0],
        [27.0, 44.0],
        [27.0, 44.0],
        [27.0, 44.0],
    ];
    assert_close("layernorm groups", &y, &want.concat(), 1e-15);
}

#[test]
fn f32_agrees_with_f64() {
    // An offset mean makes naive f32 statistics lose digits; the reference keeps them.
    let p = case(12, 48, 3, 0, 500);
    let x = Tensor::from_vec(
        p.x.to_f64_vec().iter().map(|v| 100.0 + v).collect(),
        &[12, 48],
    )
    .unwrap();
    let gy = randn(&[12, 48], &mut rng(501));
    let j64 = layernorm_mod_jvp(
        &dual(&x, &p.xd),
        &dual(&p.s, &p.sd),
        &dual(&p.h, &p.hd),
        EPS,
    )
    .unwrap();
    let j32 = layernorm_mod_jvp(
        &dual(&f32(&x), &f32(&p.xd)),
        &dual(&f32(&p.s), &f32(&p.sd)),
        &dual(&f32(&p.h), &f32(&p.hd)),
        EPS,
    )
    .unwrap();
    assert_eq!(j32.primal.dtype(), DType::F32);
    assert_close(
        "y f32",
        &j32.primal.to_f64_vec(),
        &j64.primal.to_f64_vec(),
        1e-5,
    );
    let (t32, t64) = (j32.tangent.unwrap(), j64.tangent.unwrap());
    assert_close("ẏ f32", &t32.to_f64_vec(), &t64.to_f64_vec(), 1e-5);
    let g64 = layernorm_mod_backward(&x, &p.s, &p.h, EPS, &gy).unwrap();
    let g32 = layernorm_mod_backward(&f32(&x), &f32(&p.s), &f32(&p.h), EPS, &f32(&gy)).unwrap();
    assert_close("dx f32", &g32.dx.to_f64_vec(), &g64.dx.to_f64_vec(), 1e-5);
    let ds = (g32.dscale.to_f64_vec(), g64.dscale.to_f64_vec());
    assert_close("dscale f32", &ds.0, &ds.1, 1e-5);
    let dh = (g32.dshift.to_f64_vec(), g64.dshift.to_f64_vec());
    assert_close("dshift f32", &dh.0, &dh.1, 1e-5);
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor() {
    let p = case(6, 4, 0, 0, 600);
    let gy = randn(&[6, 4], &mut rng(601));
    let fwd = |x: &Tensor, s: &Tensor, h: &Tensor| layernorm_mod_forward(x, s, h, EPS);
    let mut r = rng(602);
    // Shape mismatch: width, and a group count that does not divide the rows.
    assert_err(fwd(&p.x, &randn(&[5], &mut r), &p.h), is_shape, "scale");
    assert_err(fwd(&p.x, &p.s, &randn(&[4, 4], &mut r)), is_shape, "shift");
    assert_err(fwd(&p.x, &randn(&[0, 4], &mut r), &p.h), is_shape, "scale");
    let bwd = layernorm_mod_backward(&p.x, &p.s, &p.h, EPS, &randn(&[6, 5], &mut r));
    assert_err(bwd, is_shape, "gy");
    // Wrong rank.
    assert_err(fwd(&randn(&[24], &mut r), &p.s, &p.h), is_rank, "x");
    assert_err(
        fwd(&p.x, &randn(&[1, 6, 4], &mut r), &p.h),
        is_rank,
        "scale",
    );
    assert_err(fwd(&p.x, &p.s, &randn(&[], &mut r)), is_rank, "shift");
    // Primal/tangent mismatch on each input, in shape and in dtype.
    let c = |t: &Tensor| Dual::constant(t.clone());
    let bad = bad_dual(&p.x, randn(&[6, 5], &mut r));
    assert_err(
        layernorm_mod_jvp(&bad, &c(&p.s), &c(&p.h), EPS),
        is_tangent,
        "x",
    );
    let bad = bad_dual(&p.s, randn(&[1, 4], &mut r));
    assert_err(
        layernorm_mod_jvp(&c(&p.x), &bad, &c(&p.h), EPS),
        is_tangent,
        "scale",
    );
    let bad = bad_dual(&p.h, f32(&p.h));
    assert_err(
        layernorm_mod_jvp(&c(&p.x), &c(&p.s), &bad, EPS),
        is_tangent,
        "shift",
    );
    // Dtype mismatch with x, and bf16.
    assert_err(fwd(&p.x, &f32(&p.s), &p.h), is_dtype, "scale");
    assert_err(fwd(&p.x, &p.s, &f32(&p.h)), is_dtype, "shift");
    let bwd = layernorm_mod_backward(&p.x, &p.s, &p.h, EPS, &f32(&gy));
    assert_err(bwd, is_dtype, "gy");
    assert_bf16_refused(fwd(&bf16(&p.x), &bf16(&p.s), &bf16(&p.h)), "x");
    // Bad eps, in every entry point.
    for eps in [-1e-6, f64::NAN, f64::INFINITY] {
        assert_err(
            layernorm_mod_forward(&p.x, &p.s, &p.h, eps),
            is_invalid,
            "eps",
        );
        let j = layernorm_mod_jvp(&c(&p.x), &c(&p.s), &c(&p.h), eps);
        assert_err(j, is_invalid, "eps");
        let b = layernorm_mod_backward(&p.x, &p.s, &p.h, eps, &gy);
        assert_err(b, is_invalid, "eps");
    }
    // Outside the compute type's normal range: 1/sqrt(var + eps) of a constant row would
    // overflow f32 (NaN where the f64 math is finite), or eps itself would not be an f32.
    let x32 = f32(&p.x);
    for eps in [1e-80, 1e-39, 1e39] {
        assert_err(
            layernorm_mod_forward(&x32, &f32(&p.s), &f32(&p.h), eps),
            is_invalid,
            "eps",
        );
    }
    assert!(
        layernorm_mod_forward(&p.x, &p.s, &p.h, 1e-80).is_ok(),
        "f64 takes it"
    );
    let constant = Tensor::from_vec(vec![3.0f32; 8], &[2, 4]).unwrap();
    let zero = Tensor::from_vec(vec![0.0f32; 4], &[4]).unwrap();
    let y = layernorm_mod_forward(&constant, &zero, &zero, f32::MIN_POSITIVE as f64).unwrap();
    assert!(y.to_f64_vec().iter().all(|v| *v == 0.0), "{y:?}");
}

/// Row counts with their divisors, for modulation groups in property tests.
fn rows_and_groups() -> impl Strategy<Value = (usize, usize, usize)> {
    (1usize..9).prop_flat_map(|t| {
        let divisors: Vec<usize> = (0..=t).filter(|&g| g == 0 || t % g == 0).collect();
        (
            Just(t),
            prop::sample::select(divisors.clone()),
            prop::sample::select(divisors),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any shape, grouping and values: the primal is the forward, the backward is the adjoint of
    /// the JVP, and the normalisation is blind to moving x along itself or along a constant
    /// (when eps = 0): those tangents give ẏ = 0.
    #[test]
    fn prop_adjoint_and_invariances(
        ((t, gs, gh), c, v) in (rows_and_groups(), 2usize..12).prop_flat_map(|(tg, c)| {
            let (t, gs, gh) = tg;
            let n = 3 * t * c + 2 * gs.max(1) * c + 2 * gh.max(1) * c;
            (Just(tg), Just(c), values(n))
        })
    ) {
        let mut cut = Cut::new(v);
        let (x, xd, gy) = (cut.take(&[t, c]), cut.take(&[t, c]), cut.take(&[t, c]));
        let (s, sd) = (cut.take(&mod_shape(gs, c)), cut.take(&mod_shape(gs, c)));
        let (h, hd) = (cut.take(&mod_shape(gh, c)), cut.take(&mod_shape(gh, c)));
        // Rows nearly constant are ill-conditioned without eps; keep them out.
        prop_assume!(row_moments(&x).iter().all(|&(_, var)| var > 1e-2));
        for eps in [0.0, 0.1] {
            let out = layernorm_mod_jvp(&dual(&x, &xd), &dual(&s, &sd), &dual(&h, &hd), eps).unwrap();
            prop_assert_eq!(&out.primal, &layernorm_mod_forward(&x, &s, &h, eps).unwrap());
            let yd = out.tangent.unwrap();
            let g = layernorm_mod_backward(&x, &s, &h, eps, &gy).unwrap();
            let rhs = dot(&g.dx, &xd) + dot(&g.dscale, &sd) + dot(&g.dshift, &hd);
            let terms = [&g.dx, &g.dscale, &g.dshift].iter().zip([&xd, &sd, &hd])
                .map(|(a, b)| norm(&a.to_f64_vec()) * norm(&b.to_f64_vec())).sum::<f64>();
            adjoint_within(dot(&gy, &yd), rhs, terms + norm(&gy.to_f64_vec()) * norm(&yd.to_f64_vec()), 1e-12)?;
        }
        let ones = Tensor::from_vec(vec![1.0; t * c], &[t, c]).unwrap();
        for dir in [&x, &ones] {
            let c_s = Dual::constant(s.clone());
            let c_h = Dual::constant(h.clone());
            let yd = layernorm_mod_jvp(&dual(&x, dir), &c_s, &c_h, 0.0).unwrap().tangent.unwrap();
            prop_assert!(norm(&yd.to_f64_vec()) <= 1e-11 * norm(&dir.to_f64_vec()).max(1.0));
        }
    }

    /// Any shapes of x, scale and shift: never a panic, Ok exactly when they fit.
    #[test]
    fn prop_shapes_never_panic(
        xs in prop::collection::vec(0usize..5, 0..4),
        ss in prop::collection::vec(0usize..5, 0..4),
        hs in prop::collection::vec(0usize..5, 0..4),
    ) {
        let z = |s: &[usize]| Tensor::zeros(s, DType::F64);
        // Empty dimensions are refused like any other bad shape.
        let fits = |m: &[usize]| xs.len() == 2 && xs.iter().all(|&d| d > 0) && match *m {
            [c] => c == xs[1],
            [g, c] => c == xs[1] && g > 0 && xs[0] % g == 0,
            _ => false,
        };
        let valid = fits(&ss) && fits(&hs);
        let r = layernorm_mod_forward(&z(&xs), &z(&ss), &z(&hs), EPS);
        prop_assert_eq!(r.is_ok(), valid);
        let r = layernorm_mod_jvp(&dual(&z(&xs), &z(&xs)), &dual(&z(&ss), &z(&ss)), &dual(&z(&hs), &z(&hs)), EPS);
        prop_assert_eq!(r.is_ok(), valid);
        if valid {
            let g = layernorm_mod_backward(&z(&xs), &z(&ss), &z(&hs), EPS, &z(&xs)).unwrap();
            prop_assert_eq!(g.dscale.shape(), &ss[..]);
            prop_assert_eq!(g.dshift.shape(), &hs[..]);
        }
    }
}
