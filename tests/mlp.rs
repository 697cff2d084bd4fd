//! mlp: JVP against central differences, the forward and JVP against the composition of the
//! public linear and GELU ops, the backward (all five gradients) against the full JVP through the
//! adjoint identity, f32 against f64, property tests and bad input.

mod common;
mod ops_common;

use common::*;
use flashjvp::ops::{
    gelu_forward, gelu_jvp, linear_forward, linear_jvp, mlp_backward, mlp_forward, mlp_jvp, Mlp,
};
use flashjvp::{DType, Dual, Tensor};
use ops_common::*;
use proptest::prelude::*;

/// The input and the parameters of one MLP (or a direction in that space).
#[derive(Clone)]
struct Case {
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
}

impl Case {
    fn random(t: usize, c: usize, hd: usize, r: &mut rand::rngs::StdRng) -> Case {
        Case {
            x: randn(&[t, c], r),
            w1: randn(&[hd, c], r),
            b1: randn(&[hd], r),
            w2: randn(&[c, hd], r),
            b2: randn(&[c], r),
        }
    }

    fn mlp(&self) -> Mlp<'_> {
        Mlp {
            w1: &self.w1,
            b1: &self.b1,
            w2: &self.w2,
            b2: &self.b2,
        }
    }

    /// Every tensor passed through f (to f32, to bf16).
    fn map(&self, f: impl Fn(&Tensor) -> Tensor) -> Case {
        Case {
            x: f(&self.x),
            w1: f(&self.w1),
            b1: f(&self.b1),
            w2: f(&self.w2),
            b2: f(&self.b2),
        }
    }

    /// A copy with the tensor called `name` replaced by t.
    fn with(&self, name: &str, t: &Tensor) -> Case {
        let mut q = self.clone();
        *match name {
            "x" => &mut q.x,
            "w1" => &mut q.w1,
            "b1" => &mut q.b1,
            "w2" => &mut q.w2,
            _ => &mut q.b2,
        } = t.clone();
        q
    }

    fn tensors(&self) -> [&Tensor; 5] {
        [&self.x, &self.w1, &self.b1, &self.w2, &self.b2]
    }

    /// self + h·dir, every tensor.
    fn moved(&self, h: f64, dir: &Case) -> Case {
        let m = |a: &Tensor, b: &Tensor| axpy(a, h, b);
        Case {
            x: m(&self.x, &dir.x),
            w1: m(&self.w1, &dir.w1),
            b1: m(&self.b1, &dir.b1),
            w2: m(&self.w2, &dir.w2),
            b2: m(&self.b2, &dir.b2),
        }
    }
}

/// The tangent of y along every input and parameter, composed from the public linear and GELU
/// JVPs (each checked against finite differences in its own tests): ḣ = ẋW1ᵀ + x·Ẇ1ᵀ + ḃ1,
/// ȧ = gelu'(h)·ḣ, ẏ = ȧW2ᵀ + a·Ẇ2ᵀ + ḃ2. Linear in (w, b), so `linear_forward(x, ẇ, ḃ)` is
/// exactly the parameter part.
fn full_tangent(p: &Case, d: &Case) -> Tensor {
    let h = linear_jvp(&dual(&p.x, &d.x), &p.w1, Some(&p.b1)).unwrap();
    let h_dot = axpy(
        &h.tangent.unwrap(),
        1.0,
        &linear_forward(&p.x, &d.w1, Some(&d.b1)).unwrap(),
    );
    let a = gelu_jvp(&dual(&h.primal, &h_dot)).unwrap();
    let y = linear_jvp(&a, &p.w2, Some(&p.b2)).unwrap();
    axpy(
        &y.tangent.unwrap(),
        1.0,
        &linear_forward(&a.primal, &d.w2, Some(&d.b2)).unwrap(),
    )
}

/// Shapes (T, C, Hd); the last makes both stacked GEMMs large enough to run on several threads.
const SHAPES: [(usize, usize, usize); 4] = [(5, 6, 8), (1, 1, 1), (7, 3, 12), (160, 48, 96)];

#[test]
fn jvp_matches_finite_differences() {
    let mut r = rng(1);
    for &(t, c, hd) in &SHAPES {
        let p = Case::random(t, c, hd, &mut r);
        let xd = randn(&[t, c], &mut r);
        let out = mlp_jvp(&dual(&p.x, &xd), &p.mlp()).unwrap();
        let fd = central_difference(
            |h| vec![mlp_forward(&axpy(&p.x, h, &xd), &p.mlp()).unwrap()],
            1e-5,
        );
        let what = format!("mlp ẏ {t}×{c}×{hd}");
        assert_close(&what, &out.tangent.unwrap().to_f64_vec(), &fd[0], 1e-6);
        assert_eq!(out.primal, mlp_forward(&p.x, &p.mlp()).unwrap(), "{what}");
        let plain = mlp_jvp(&Dual::constant(p.x.clone()), &p.mlp()).unwrap();
        assert!(plain.tangent.is_none());
        assert_eq!(plain.primal, out.primal);
    }
}

#[test]
fn matches_the_composition_of_linear_and_gelu() {
    let mut r = rng(2);
    for &(t, c, hd) in &SHAPES {
        let p = Case::random(t, c, hd, &mut r);
        let mut d = Case::random(t, c, hd, &mut r);
        let y = mlp_forward(&p.x, &p.mlp()).unwrap();
        let h = linear_forward(&p.x, &p.w1, Some(&p.b1)).unwrap();
        let a = gelu_forward(&h).unwrap();
        let composed = linear_forward(&a, &p.w2, Some(&p.b2)).unwrap();
        assert_close("mlp y", &y.to_f64_vec(), &composed.to_f64_vec(), 1e-13);
        // With tangents on x only, the composed full tangent is the MLP's JVP.
        for w in [&mut d.w1, &mut d.b1, &mut d.w2, &mut d.b2] {
            *w = Tensor::zeros(w.shape(), DType::F64);
        }
        let yd = mlp_jvp(&dual(&p.x, &d.x), &p.mlp())
            .unwrap()
            .tangent
            .unwrap();
        assert_close(
            "mlp ẏ",
            &yd.to_f64_vec(),
            &full_tangent(&p, &d).to_f64_vec(),
            1e-13,
        );
    }
}

#[test]
fn full_tangent_matches_finite_differences() {
    let mut r = rng(3);
    let (p, d) = (Case::random(6, 5, 7, &mut r), Case::random(6, 5, 7, &mut r));
    let fd = central_difference(
        |h| {
            let q = p.moved(h, &d);
            vec![mlp_forward(&q.x, &q.mlp()).unwrap()]
        },
        1e-5,
    );
    assert_close(
        "mlp full ẏ",
        &full_tangent(&p, &d).to_f64_vec(),
        &fd[0],
        1e-6,
    );
}

#[test]
fn backward_satisfies_adjoint_identity() {
    let mut r = rng(4);
    for &(t, c, hd) in &SHAPES {
        let (p, d) = (
            Case::random(t, c, hd, &mut r),
            Case::random(t, c, hd, &mut r),
        );
        let gy = randn(&[t, c], &mut r);
        let g = mlp_backward(&p.x, &p.mlp(), &gy).unwrap();
        let grads = [&g.dx, &g.dw1, &g.db1, &g.dw2, &g.db2];
        for (gr, t) in grads.iter().zip(p.tensors()) {
            assert_eq!(gr.shape(), t.shape());
        }
        let rhs: f64 = grads.iter().zip(d.tensors()).map(|(g, v)| dot(g, v)).sum();
        let lhs = dot(&gy, &full_tangent(&p, &d));
        assert_adjoint(&format!("mlp {t}×{c}×{hd}"), lhs, rhs, 1e-10);
    }
}

#[test]
fn f32_agrees_with_f64() {
    let mut r = rng(5);
    let p = Case::random(9, 16, 40, &mut r);
    let (xd, gy) = (randn(&[9, 16], &mut r), randn(&[9, 16], &mut r));
    let q = p.map(f32);
    let j64 = mlp_jvp(&dual(&p.x, &xd), &p.mlp()).unwrap();
    let j32 = mlp_jvp(&dual(&q.x, &f32(&xd)), &q.mlp()).unwrap();
    assert_eq!(j32.primal.dtype(), DType::F32);
    assert_close(
        "y f32",
        &j32.primal.to_f64_vec(),
        &j64.primal.to_f64_vec(),
        1e-5,
    );
    let (t32, t64) = (j32.tangent.unwrap(), j64.tangent.unwrap());
    assert_close("ẏ f32", &t32.to_f64_vec(), &t64.to_f64_vec(), 1e-5);
    let g64 = mlp_backward(&p.x, &p.mlp(), &gy).unwrap();
    let g32 = mlp_backward(&q.x, &q.mlp(), &f32(&gy)).unwrap();
    let pairs = [
        ("dx", &g32.dx, &g64.dx),
        ("dw1", &g32.dw1, &g64.dw1),
        ("db1", &g32.db1, &g64.db1),
        ("dw2", &g32.dw2, &g64.dw2),
        ("db2", &g32.db2, &g64.db2),
    ];
    for (name, a, b) in pairs {
        assert_close(name, &a.to_f64_vec(), &b.to_f64_vec(), 1e-5);
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor() {
    let mut r = rng(6);
    let p = Case::random(4, 3, 5, &mut r);
    let gy = randn(&[4, 3], &mut r);
    let fwd = |q: &Case| mlp_forward(&q.x, &q.mlp());
    // Shape mismatch of each parameter and of the cotangent.
    for (name, shape) in [("w1", [5, 4]), ("w2", [3, 4]), ("w2", [5, 3])] {
        assert_err(fwd(&p.with(name, &randn(&shape, &mut r))), is_shape, name);
    }
    assert_err(fwd(&p.with("b1", &randn(&[4], &mut r))), is_shape, "b1");
    assert_err(fwd(&p.with("b2", &randn(&[5], &mut r))), is_shape, "b2");
    let bwd = mlp_backward(&p.x, &p.mlp(), &randn(&[4, 5], &mut r));
    assert_err(bwd, is_shape, "gy");
    // Wrong rank.
    assert_err(fwd(&p.with("x", &randn(&[12], &mut r))), is_rank, "x");
    assert_err(fwd(&p.with("w1", &randn(&[15], &mut r))), is_rank, "w1");
    assert_err(fwd(&p.with("b1", &randn(&[1, 5], &mut r))), is_rank, "b1");
    assert_err(
        fwd(&p.with("w2", &randn(&[3, 5, 1], &mut r))),
        is_rank,
        "w2",
    );
    // Primal/tangent mismatch.
    let bad = bad_dual(&p.x, randn(&[3, 4], &mut r));
    assert_err(mlp_jvp(&bad, &p.mlp()), is_tangent, "x");
    assert_err(
        mlp_jvp(&bad_dual(&p.x, f32(&p.x)), &p.mlp()),
        is_tangent,
        "x",
    );
    // Dtype mismatch of each parameter with x, of the cotangent, and bf16.
    for (name, t) in [("w1", &p.w1), ("b1", &p.b1), ("w2", &p.w2), ("b2", &p.b2)] {
        assert_err(fwd(&p.with(name, &f32(t))), is_dtype, name);
    }
    assert_err(mlp_backward(&p.x, &p.mlp(), &f32(&gy)), is_dtype, "gy");
    let q = p.map(bf16);
    assert_bf16_refused(fwd(&q), "x");
    assert_bf16_refused(mlp_jvp(&dual(&q.x, &q.x), &q.mlp()), "x");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any shape and values: the primal is the forward, the JVP matches central differences, and
    /// the backward is the adjoint of the full tangent map.
    #[test]
    fn prop_jvp_and_adjoint(
        (t, c, hd, v) in (1usize..6, 1usize..7, 1usize..9).prop_flat_map(|(t, c, hd)| {
            let n = 3 * t * c + 2 * (2 * hd * c + hd + c);
            (Just(t), Just(c), Just(hd), values(n))
        })
    ) {
        let mut cut = Cut::new(v);
        let mut take = |t: usize, c: usize, hd: usize| Case {
            x: cut.take(&[t, c]),
            w1: cut.take(&[hd, c]),
            b1: cut.take(&[hd]),
            w2: cut.take(&[c, hd]),
            b2: cut.take(&[c]),
        };
        let (p, d) = (take(t, c, hd), take(t, c, hd));
        let gy = cut.take(&[t, c]);
        let out = mlp_jvp(&dual(&p.x, &d.x), &p.mlp()).unwrap();
        prop_assert_eq!(&out.primal, &mlp_forward(&p.x, &p.mlp()).unwrap());
        let fd = central_difference(|h| vec![mlp_forward(&axpy(&p.x, h, &d.x), &p.mlp()).unwrap()], 1e-5);
        let yd = out.tangent.unwrap().to_f64_vec();
        // Relative, plus the rounding of y itself that the difference quotient amplifies (1/h).
        let diff: Vec<f64> = yd.iter().zip(&fd[0]).map(|(a, b)| a - b).collect();
        let tol = 1e-6 * (norm(&fd[0]) + 1e-4 * norm(&out.primal.to_f64_vec()));
        prop_assert!(norm(&diff) <= tol, "tangent off by {} (tolerance {})", norm(&diff), tol);
        let g = mlp_backward(&p.x, &p.mlp(), &gy).unwrap();
        let grads = [&g.dx, &g.dw1, &g.db1, &g.dw2, &g.db2];
        let rhs: f64 = grads.iter().zip(d.tensors()).map(|(g, v)| dot(g, v)).sum();
        let scale: f64 = grads.iter().zip(d.tensors())
            .map(|(g, v)| norm(&g.to_f64_vec()) * norm(&v.to_f64_vec())).sum::<f64>();
        let full = full_tangent(&p, &d);
        adjoint_within(dot(&gy, &full), rhs, scale + norm(&gy.to_f64_vec()) * norm(&full.to_f64_vec()), 1e-12)?;
    }

    /// Any shapes: never a panic, Ok exactly when they fit.
    #[test]
    fn prop_shapes_never_panic(
        shapes in prop::collection::vec(prop::collection::vec(0usize..4, 0..4), 5),
    ) {
        let z = |s: &[usize]| Tensor::zeros(s, DType::F64);
        let (x, w1, b1, w2, b2) = (z(&shapes[0]), z(&shapes[1]), z(&shapes[2]), z(&shapes[3]), z(&shapes[4]));
        let p = Mlp { w1: &w1, b1: &b1, w2: &w2, b2: &b2 };
        let s = &shapes;
        let valid = s[0].len() == 2 && s[1].len() == 2 && s[1][1] == s[0][1]
            && s[2] == [s[1][0]] && s[3] == [s[0][1], s[1][0]] && s[4] == [s[0][1]]
            // Empty dimensions are refused like any other bad shape.
            && s.iter().all(|t| t.iter().all(|&d| d > 0));
        prop_assert_eq!(mlp_forward(&x, &p).is_ok(), valid);
        prop_assert_eq!(mlp_jvp(&dual(&x, &x), &p).is_ok(), valid);
        prop_assert_eq!(mlp_backward(&x, &p, &x).is_ok(), valid);
    }
}
