//! Attention: the streaming forward, JVP and backward against a naive softmax reference that
//! materialises the scores, against central finite differences, through the adjoint identity, in
//! f32 against f64, over random shapes (proptest), and on bad inputs.

mod common;

use common::*;
use flashjvp::ops::{attention_backward, attention_forward, attention_jvp};
use flashjvp::{DType, Dual, Error, Tensor};
use proptest::prelude::*;
use rand::rngs::StdRng;

/// (B, H, Nq, Nk, d, dv)
type Shape = (usize, usize, usize, usize, usize, usize);

/// Shapes over the corners: N = 1, d = 1, Nq ≠ Nk, dv ≠ d, sizes that are not multiples of the
/// 64-wide blocks, head dims 24, 72 and 128, several batches and heads.
const SHAPES: &[Shape] = &[
    (1, 1, 1, 1, 1, 1),
    (1, 1, 1, 5, 3, 2),
    (1, 1, 7, 1, 4, 4),
    (2, 3, 5, 9, 1, 3),
    (1, 2, 130, 130, 8, 8),
    (1, 1, 64, 130, 72, 24),
    (2, 1, 65, 63, 24, 72),
    (1, 1, 3, 200, 128, 5),
    (2, 2, 129, 70, 16, 1),
    (1, 1, 128, 128, 64, 64),
];

struct Case {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Option<Tensor>,
    tk: Option<Tensor>,
    tv: Option<Tensor>,
}

/// Which inputs carry a tangent.
#[derive(Clone, Copy, Debug)]
struct Which {
    q: bool,
    k: bool,
    v: bool,
}

const ALL: Which = Which {
    q: true,
    k: true,
    v: true,
};
const CONST_KV: Which = Which {
    q: true,
    k: false,
    v: false,
};
const ONLY_V: Which = Which {
    q: false,
    k: false,
    v: true,
};
const ONLY_K: Which = Which {
    q: false,
    k: true,
    v: false,
};

fn scaled(t: Tensor, s: f64) -> Tensor {
    let data: Vec<f64> = t.to_f64_vec().iter().map(|x| x * s).collect();
    Tensor::from_vec(data, t.shape()).unwrap()
}

fn case(shape: Shape, which: Which, amplitude: f64, rng: &mut StdRng) -> Case {
    let (b, h, nq, nk, d, dv) = shape;
    let qs = [b, h, nq, d];
    let ks = [b, h, nk, d];
    let vs = [b, h, nk, dv];
    Case {
        q: scaled(randn(&qs, rng), amplitude),
        k: scaled(randn(&ks, rng), amplitude),
        v: randn(&vs, rng),
        tq: which.q.then(|| randn(&qs, rng)),
        tk: which.k.then(|| randn(&ks, rng)),
        tv: which.v.then(|| randn(&vs, rng)),
    }
}

fn dual(p: &Tensor, t: &Option<Tensor>, dtype: DType) -> Dual {
    Dual {
        primal: p.to_dtype(dtype),
        tangent: t.as_ref().map(|t| t.to_dtype(dtype)),
    }
}

fn run_jvp(c: &Case, dtype: DType, scale: Option<f64>) -> flashjvp::ops::AttentionJvp {
    attention_jvp(
        &dual(&c.q, &c.tq, dtype),
        &dual(&c.k, &c.tk, dtype),
        &dual(&c.v, &c.tv, dtype),
        scale,
    )
    .unwrap()
}

/// The naive reference in f64: S = c·Q Kᵀ materialised, softmax, O = P V, lse = log Σ exp S; its
/// JVP by the analytic formula ṡ = c(q̇ kᵀ + q k̇ᵀ), μ = Σ p ṡ, ȯ = P V̇ + (P⊙(Ṡ − μ)) V, l̇se = μ.
/// Returns (o, lse, ȯ, l̇se), absent tangents taken as zero.
fn naive(c: &Case, scale: Option<f64>) -> [Vec<f64>; 4] {
    let [b, h, nq, d] = c.q.shape().try_into().unwrap();
    let nk = c.k.shape()[2];
    let dv = c.v.shape()[3];
    let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
    let (q, k, v) = (c.q.to_f64_vec(), c.k.to_f64_vec(), c.v.to_f64_vec());
    let tan = |t: &Option<Tensor>, n: usize| t.as_ref().map_or(vec![0.0; n], |t| t.to_f64_vec());
    let (tq, tk, tv) = (
        tan(&c.tq, q.len()),
        tan(&c.tk, k.len()),
        tan(&c.tv, v.len()),
    );
    let mut o = vec![0.0; b * h * nq * dv];
    let mut to = vec![0.0; b * h * nq * dv];
    let mut lse = vec![0.0; b * h * nq];
    let mut tlse = vec![0.0; b * h * nq];
    for bh in 0..b * h {
        for i in 0..nq {
            let qi = (bh * nq + i) * d;
            let mut s = vec![0.0; nk];
            let mut sdot = vec![0.0; nk];
            for j in 0..nk {
                let kj = (bh * nk + j) * d;
                for x in 0..d {
                    s[j] += scale * q[qi + x] * k[kj + x];
                    sdot[j] += scale * (tq[qi + x] * k[kj + x] + q[qi + x] * tk[kj + x]);
                }
            }
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let l: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|x| x / l).collect();
            let mu: f64 = p.iter().zip(&sdot).map(|(a, b)| a * b).sum();
            let row = bh * nq + i;
            lse[row] = m + l.ln();
            tlse[row] = mu;
            for j in 0..nk {
                let vj = (bh * nk + j) * dv;
                for y in 0..dv {
                    o[row * dv + y] += p[j] * v[vj + y];
                    to[row * dv + y] += p[j] * tv[vj + y] + p[j] * (sdot[j] - mu) * v[vj + y];
                }
            }
        }
    }
    [o, lse, to, tlse]
}

/// The four outputs of the streaming JVP as f64 vectors.
fn jvp_outputs(j: &flashjvp::ops::AttentionJvp) -> [Vec<f64>; 4] {
    [
        j.o.primal.to_f64_vec(),
        j.lse.primal.to_f64_vec(),
        j.o.tangent.as_ref().unwrap().to_f64_vec(),
        j.lse.tangent.as_ref().unwrap().to_f64_vec(),
    ]
}

const NAMES: [&str; 4] = ["o", "lse", "o tangent", "lse tangent"];

fn assert_matches_naive(what: &str, c: &Case, scale: Option<f64>, tol: f64) {
    let got = jvp_outputs(&run_jvp(c, DType::F64, scale));
    let want = naive(c, scale);
    for ((name, g), w) in NAMES.iter().zip(&got).zip(&want) {
        if w.iter().all(|x| *x == 0.0) {
            // A tangent that is zero by construction (l̇se with only v̇) must come out exactly 0.
            assert!(g.iter().all(|x| *x == 0.0), "{what}: {name} should be 0");
        } else {
            assert_close(&format!("{what}: {name}"), g, w, tol);
        }
    }
}

/// Central differences of the forward (o and lse) along the case's tangent direction.
fn finite_differences(c: &Case, scale: Option<f64>) -> Vec<Vec<f64>> {
    let step = |t: &Tensor, dt: &Option<Tensor>, eps: f64| match dt {
        Some(dt) => axpy(t, eps, dt),
        None => t.clone(),
    };
    central_difference(
        |eps| {
            let out = attention_forward(
                &step(&c.q, &c.tq, eps),
                &step(&c.k, &c.tk, eps),
                &step(&c.v, &c.tv, eps),
                scale,
            )
            .unwrap();
            vec![out.o, out.lse]
        },
        1e-5,
    )
}

#[test]
fn forward_and_jvp_match_naive_reference_over_shapes() {
    let mut rng = rng(1);
    for &shape in SHAPES {
        for which in [ALL, CONST_KV, ONLY_V, ONLY_K] {
            let c = case(shape, which, 1.0, &mut rng);
            assert_matches_naive(&format!("{shape:?} {which:?}"), &c, None, 1e-12);
            // The plain forward agrees with the JVP's primal bit for bit.
            let f = attention_forward(&c.q, &c.k, &c.v, None).unwrap();
            let j = run_jvp(&c, DType::F64, None);
            assert_eq!(f.o, j.o.primal, "{shape:?}: forward o differs from jvp o");
            assert_eq!(
                f.lse, j.lse.primal,
                "{shape:?}: forward lse differs from jvp lse"
            );
        }
    }
}

#[test]
fn explicit_scale_and_large_scores_match_naive_reference() {
    let mut rng = rng(2);
    // Scores of several hundred: the online softmax must rescale without overflow.
    let c = case((1, 2, 70, 150, 16, 8), ALL, 6.0, &mut rng);
    assert_matches_naive("amplitude 6", &c, None, 1e-11);
    assert_matches_naive("scale 0.3", &c, Some(0.3), 1e-11);
    assert_matches_naive("scale 0", &c, Some(0.0), 1e-12);
    assert_matches_naive("scale -1.7", &c, Some(-1.7), 1e-11);
}

#[test]
fn jvp_matches_central_differences() {
    let mut rng = rng(3);
    let shapes: &[Shape] = &[
        (1, 1, 1, 1, 1, 1),
        (2, 2, 5, 9, 3, 4),
        (1, 1, 70, 130, 8, 5),
        (1, 2, 33, 65, 72, 24),
    ];
    for &shape in shapes {
        for which in [ALL, CONST_KV, ONLY_V, ONLY_K] {
            let what = format!("{shape:?} {which:?}");
            let c = case(shape, which, 1.0, &mut rng);
            let fd = finite_differences(&c, None);
            let j = jvp_outputs(&run_jvp(&c, DType::F64, None));
            assert_close(&format!("{what}: o tangent vs fd"), &j[2], &fd[0], 1e-6);
            if which.q || which.k {
                assert_close(&format!("{what}: lse tangent vs fd"), &j[3], &fd[1], 1e-6);
            } else {
                // lse does not depend on v.
                assert!(fd[1].iter().all(|x| x.abs() < 1e-9), "{what}: fd of lse");
                assert!(j[3].iter().all(|x| *x == 0.0), "{what}: lse tangent");
            }
            // The test's own analytic reference agrees with the differences too.
            let n = naive(&c, None);
            assert_close(
                &format!("{what}: naive o tangent vs fd"),
                &n[2],
                &fd[0],
                1e-6,
            );
        }
    }
    // A non-default scale enters the tangent.
    let c = case((1, 1, 20, 30, 6, 6), ALL, 1.0, &mut rng);
    let fd = finite_differences(&c, Some(0.8));
    let j = jvp_outputs(&run_jvp(&c, DType::F64, Some(0.8)));
    assert_close("scale 0.8: o tangent vs fd", &j[2], &fd[0], 1e-6);
    assert_close("scale 0.8: lse tangent vs fd", &j[3], &fd[1], 1e-6);
}

#[test]
fn tangents_are_none_only_without_input_tangents() {
    let mut rng = rng(4);
    let c = case(
        (1, 2, 9, 11, 4, 3),
        Which {
            q: false,
            k: false,
            v: false,
        },
        1.0,
        &mut rng,
    );
    let j = run_jvp(&c, DType::F64, None);
    assert!(j.o.tangent.is_none() && j.lse.tangent.is_none());
    let f = attention_forward(&c.q, &c.k, &c.v, None).unwrap();
    assert_eq!(f.o, j.o.primal);
    for which in [ALL, CONST_KV, ONLY_V, ONLY_K] {
        let c = case((1, 2, 9, 11, 4, 3), which, 1.0, &mut rng);
        let j = run_jvp(&c, DType::F32, None);
        let (to, tl) = (j.o.tangent.unwrap(), j.lse.tangent.unwrap());
        assert_eq!(to.shape(), &[1, 2, 9, 3]);
        assert_eq!(tl.shape(), &[1, 2, 9]);
        assert_eq!((to.dtype(), tl.dtype()), (DType::F32, DType::F32));
        assert_eq!(j.lse.primal.dtype(), DType::F32);
    }
}

#[test]
fn backward_satisfies_adjoint_identity_with_jvp() {
    let mut rng = rng(5);
    for &shape in SHAPES {
        for scale in [None, Some(0.45)] {
            let c = case(shape, ALL, 1.0, &mut rng);
            let j = run_jvp(&c, DType::F64, scale);
            let (b, h, nq, _, _, dv) = shape;
            let go = randn(&[b, h, nq, dv], &mut rng);
            let g = attention_backward(&c.q, &c.k, &c.v, &j.o.primal, &j.lse.primal, &go, scale)
                .unwrap();
            let lhs = dot(&go, j.o.tangent.as_ref().unwrap());
            let rhs = dot(&g.dq, c.tq.as_ref().unwrap())
                + dot(&g.dk, c.tk.as_ref().unwrap())
                + dot(&g.dv, c.tv.as_ref().unwrap());
            assert_adjoint(&format!("{shape:?} scale {scale:?}"), lhs, rhs, 1e-10);
        }
    }
}

#[test]
fn backward_pieces_pair_with_their_own_tangents() {
    // Each gradient alone against the JVP with only that input's tangent, so that an error in one
    // of dq, dk, dv cannot hide behind the others.
    let mut rng = rng(6);
    let shape = (2, 1, 150, 290, 12, 7);
    let (b, h, nq, _, _, dv) = shape;
    let go = randn(&[b, h, nq, dv], &mut rng);
    let only_q = Which {
        q: true,
        k: false,
        v: false,
    };
    for (name, which) in [("q", only_q), ("k", ONLY_K), ("v", ONLY_V)] {
        let c = case(shape, which, 1.5, &mut rng);
        let j = run_jvp(&c, DType::F64, None);
        let g =
            attention_backward(&c.q, &c.k, &c.v, &j.o.primal, &j.lse.primal, &go, None).unwrap();
        let lhs = dot(&go, j.o.tangent.as_ref().unwrap());
        let rhs = match name {
            "q" => dot(&g.dq, c.tq.as_ref().unwrap()),
            "k" => dot(&g.dk, c.tk.as_ref().unwrap()),
            _ => dot(&g.dv, c.tv.as_ref().unwrap()),
        };
        assert_adjoint(&format!("d{name}"), lhs, rhs, 1e-10);
    }
}

#[test]
fn f32_agrees_with_f64() {
    let mut rng = rng(7);
    for &shape in SHAPES {
        let c = case(shape, ALL, 1.0, &mut rng);
        let j64 = jvp_outputs(&run_jvp(&c, DType::F64, None));
        let j32 = jvp_outputs(&run_jvp(&c, DType::F32, None));
        for ((name, a), b) in NAMES.iter().zip(&j32).zip(&j64) {
            assert_close(&format!("{shape:?} f32 {name}"), a, b, 1e-4);
        }
        let (b, h, nq, _, _, dv) = shape;
        let go = randn(&[b, h, nq, dv], &mut rng);
        let g64 = attention_backward(
            &c.q,
            &c.k,
            &c.v,
            &to64(&j64[0], &[b, h, nq, dv]),
            &to64(&j64[1], &[b, h, nq]),
            &go,
            None,
        )
        .unwrap();
        let f32t = |t: &Tensor| t.to_dtype(DType::F32);
        let f32o = run_jvp(&c, DType::F32, None);
        let g32 = attention_backward(
            &f32t(&c.q),
            &f32t(&c.k),
            &f32t(&c.v),
            &f32o.o.primal,
            &f32o.lse.primal,
            &f32t(&go),
            None,
        )
        .unwrap();
        for (name, a, b) in [
            ("dq", &g32.dq, &g64.dq),
            ("dk", &g32.dk, &g64.dk),
            ("dv", &g32.dv, &g64.dv),
        ] {
            assert_eq!(a.dtype(), DType::F32);
            if shape.3 == 1 && name != "dv" {
                // One key: p ≡ 1, so dq and dk are exactly 0 and f32 gives only rounding noise.
                assert!(
                    a.to_f64_vec().iter().all(|x| x.abs() < 1e-5),
                    "{shape:?} {name}"
                );
                continue;
            }
            assert_close(
                &format!("{shape:?} f32 {name}"),
                &a.to_f64_vec(),
                &b.to_f64_vec(),
                1e-4,
            );
        }
    }
}

fn to64(x: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(x.to_vec(), shape).unwrap()
}

fn check_against_naive(c: &Case) -> Result<(), TestCaseError> {
    let got = jvp_outputs(&run_jvp(c, DType::F64, None));
    let want = naive(c, None);
    for ((name, g), w) in NAMES.iter().zip(&got).zip(&want) {
        prop_assert!(g.iter().all(|x| x.is_finite()), "{} not finite", name);
        if w.iter().all(|x| *x == 0.0) {
            prop_assert!(g.iter().all(|x| *x == 0.0), "{} should be 0", name);
        } else {
            let err = rel_err(g, w);
            prop_assert!(err <= 1e-11, "{}: relative error {:.3e}", name, err);
        }
    }
    let f32j = jvp_outputs(&run_jvp(c, DType::F32, None));
    for (name, g) in NAMES.iter().zip(&f32j) {
        prop_assert!(g.iter().all(|x| x.is_finite()), "f32 {} not finite", name);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn jvp_matches_naive_on_random_shapes(
        b in 1usize..3, h in 1usize..3, nq in 1usize..80, nk in 1usize..80,
        d in 1usize..40, dv in 1usize..40, amplitude in 0.01f64..4.0, seed in any::<u64>(),
        wq in any::<bool>(), wk in any::<bool>(),
    ) {
        let mut rng = rng(seed);
        let which = Which { q: wq, k: wk, v: true };
        check_against_naive(&case((b, h, nq, nk, d, dv), which, amplitude, &mut rng))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    /// Sizes beyond one 128-wide block, where the online rescaling and the block edges matter.
    #[test]
    fn jvp_matches_naive_across_several_blocks(
        nq in 1usize..300, nk in 100usize..400, d in 1usize..20, dv in 1usize..20,
        amplitude in 0.01f64..4.0, seed in any::<u64>(),
    ) {
        let mut rng = rng(seed);
        check_against_naive(&case((1, 2, nq, nk, d, dv), ALL, amplitude, &mut rng))?;
    }
}

// ---- bad inputs: each an Err naming the tensor, never a panic ----

fn t(shape: &[usize]) -> Tensor {
    Tensor::randn(shape, DType::F64, &mut rng(9))
}

fn expect_err(result: Result<impl std::fmt::Debug, Error>, names: &str) -> Error {
    let err = result.expect_err("expected an error");
    let msg = err.to_string();
    assert!(
        msg.starts_with("attention"),
        "message should name the op: {msg}"
    );
    assert!(msg.contains(names), "message should name `{names}`: {msg}");
    err
}

fn fwd(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<flashjvp::ops::AttentionOutput, Error> {
    attention_forward(q, k, v, None)
}

#[test]
fn shape_mismatches_are_errors() {
    let (q, k, v) = (t(&[2, 3, 5, 8]), t(&[2, 3, 7, 8]), t(&[2, 3, 7, 4]));
    assert!(fwd(&q, &k, &v).is_ok());
    let e = expect_err(fwd(&q, &t(&[2, 3, 7, 6]), &v), "`k`");
    assert!(matches!(e, Error::Shape { .. }), "{e:?}");
    let e = expect_err(fwd(&q, &k, &t(&[2, 3, 6, 4])), "`v`");
    assert!(matches!(e, Error::Shape { .. }), "{e:?}");
    let e = expect_err(fwd(&q, &t(&[1, 3, 7, 8]), &v), "`k`");
    assert!(matches!(e, Error::Shape { .. }), "{e:?}");
    let e = expect_err(fwd(&q, &k, &t(&[2, 2, 7, 4])), "`v`");
    assert!(matches!(e, Error::Shape { .. }), "{e:?}");
}

#[test]
fn wrong_rank_is_an_error() {
    let (q, k, v) = (t(&[2, 3, 5, 8]), t(&[2, 3, 7, 8]), t(&[2, 3, 7, 4]));
    for (name, r) in [
        ("`q`", fwd(&t(&[6, 5, 8]), &k, &v)),
        ("`k`", fwd(&q, &t(&[2, 3, 7, 8, 1]), &v)),
        ("`v`", fwd(&q, &k, &t(&[7, 4]))),
    ] {
        let e = expect_err(r, name);
        assert!(matches!(e, Error::Rank { .. }), "{e:?}");
    }
}

#[test]
fn dtype_mismatches_are_errors() {
    let (q, k, v) = (t(&[1, 2, 5, 8]), t(&[1, 2, 7, 8]), t(&[1, 2, 7, 4]));
    let f32 = |x: &Tensor| x.to_dtype(DType::F32);
    let bf16 = |x: &Tensor| x.to_dtype(DType::BF16);
    for (name, r) in [
        ("`k`", fwd(&f32(&q), &k, &f32(&v))),
        ("`v`", fwd(&q, &k, &f32(&v))),
        ("`q`", fwd(&bf16(&q), &bf16(&k), &bf16(&v))),
        ("`k`", fwd(&q, &bf16(&k), &v)),
    ] {
        let e = expect_err(r, name);
        assert!(matches!(e, Error::DType { .. }), "{e:?}");
    }
    let e = expect_err(
        attention_jvp(
            &Dual::constant(f32(&q)),
            &Dual::constant(k.clone()),
            &Dual::constant(f32(&v)),
            None,
        ),
        "`k`",
    );
    assert!(matches!(e, Error::DType { .. }), "{e:?}");
}

#[test]
fn primal_tangent_mismatches_are_errors() {
    let (q, k, v) = (t(&[1, 2, 5, 8]), t(&[1, 2, 7, 8]), t(&[1, 2, 7, 4]));
    let with = |p: &Tensor, tan: Tensor| Dual {
        primal: p.clone(),
        tangent: Some(tan),
    };
    let (cq, ck, cv) = (
        Dual::constant(q.clone()),
        Dual::constant(k.clone()),
        Dual::constant(v.clone()),
    );
    for (name, r) in [
        (
            "`q`",
            attention_jvp(&with(&q, t(&[1, 2, 5, 7])), &ck, &cv, None),
        ),
        (
            "`k`",
            attention_jvp(&cq, &with(&k, k.to_dtype(DType::F32)), &cv, None),
        ),
        (
            "`v`",
            attention_jvp(&cq, &ck, &with(&v, t(&[1, 2, 7, 4, 1])), None),
        ),
    ] {
        let e = expect_err(r, name);
        assert!(matches!(e, Error::TangentMismatch { .. }), "{e:?}");
    }
}

#[test]
fn bad_scale_and_empty_dims_are_invalid() {
    let (q, k, v) = (t(&[1, 2, 5, 8]), t(&[1, 2, 7, 8]), t(&[1, 2, 7, 4]));
    for s in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let e = expect_err(attention_forward(&q, &k, &v, Some(s)), "scale");
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
        let e = expect_err(
            attention_jvp(
                &Dual::new(q.clone(), q.clone()).unwrap(),
                &k.clone().into(),
                &v.clone().into(),
                Some(s),
            ),
            "scale",
        );
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
    }
    // Finite in f64 but not in f32.
    let f32 = |x: &Tensor| x.to_dtype(DType::F32);
    let e = expect_err(
        attention_forward(&f32(&q), &f32(&k), &f32(&v), Some(1e300)),
        "scale",
    );
    assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
    for (q, k, v) in [
        (t(&[1, 2, 5, 8]), t(&[1, 2, 0, 8]), t(&[1, 2, 0, 4])),
        (t(&[1, 2, 0, 8]), t(&[1, 2, 7, 8]), t(&[1, 2, 7, 4])),
        (t(&[1, 2, 5, 0]), t(&[1, 2, 7, 0]), t(&[1, 2, 7, 4])),
        (t(&[1, 2, 5, 8]), t(&[1, 2, 7, 8]), t(&[1, 2, 7, 0])),
        (t(&[0, 2, 5, 8]), t(&[0, 2, 7, 8]), t(&[0, 2, 7, 4])),
    ] {
        let e = expect_err(fwd(&q, &k, &v), "empty");
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
        let e = expect_err(
            attention_jvp(
                &Dual::new(q.clone(), q.clone()).unwrap(),
                &k.clone().into(),
                &v.clone().into(),
                None,
            ),
            "empty",
        );
        assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
    }
}

#[test]
fn backward_bad_inputs_are_errors() {
    let (q, k, v) = (t(&[1, 2, 5, 8]), t(&[1, 2, 7, 8]), t(&[1, 2, 7, 4]));
    let out = attention_forward(&q, &k, &v, None).unwrap();
    let go = t(&[1, 2, 5, 4]);
    let bwd = |o: &Tensor, lse: &Tensor, go: &Tensor, s: Option<f64>| {
        attention_backward(&q, &k, &v, o, lse, go, s)
    };
    assert!(bwd(&out.o, &out.lse, &go, None).is_ok());
    let e = expect_err(bwd(&out.o, &out.lse, &t(&[1, 2, 5, 3]), None), "`go`");
    assert!(matches!(e, Error::Shape { .. }), "{e:?}");
    let e = expect_err(bwd(&t(&[1, 2, 4, 4]), &out.lse, &go, None), "`o`");
    assert!(matches!(e, Error::Shape { .. }), "{e:?}");
    let e = expect_err(bwd(&out.o, &t(&[1, 2, 5, 1]), &go, None), "`lse`");
    assert!(matches!(e, Error::Rank { .. }), "{e:?}");
    let e = expect_err(
        bwd(&out.o, &out.lse, &go.to_dtype(DType::F32), None),
        "`go`",
    );
    assert!(matches!(e, Error::DType { .. }), "{e:?}");
    let e = expect_err(bwd(&out.o, &out.lse, &go, Some(f64::NAN)), "scale");
    assert!(matches!(e, Error::Invalid { .. }), "{e:?}");
    let e = expect_err(
        attention_backward(&q, &t(&[1, 2, 7, 9]), &v, &out.o, &out.lse, &go, None),
        "`k`",
    );
    assert!(matches!(e, Error::Shape { .. }), "{e:?}");
}
