//! Attention over padded keys (`*_with_key_lens`: batch entry b attends to its first key_lens[b]
//! keys): against a naive masked softmax in f64, against central differences, through the adjoint
//! identity, with NaN in the padding (which no output may read), and on bad key counts.

mod common;

use common::*;
use flashjvp::ops::{
    attention_backward, attention_backward_with_key_lens, attention_forward_with_key_lens,
    attention_jvp, attention_jvp_with_key_lens, AttentionJvp,
};
use flashjvp::{Dual, Error, Tensor};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::Rng;

/// q, k, v and their tangents, [B, H, N, d] f64.
struct Case {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor,
    tk: Tensor,
    tv: Tensor,
    lens: Vec<usize>,
}

/// (B, H, Nq, Nk, d, dv)
type Shape = (usize, usize, usize, usize, usize, usize);

/// Random inputs whose key rows at and past `lens[b]` (the padding) hold `pad` when given.
fn case(shape: Shape, lens: &[usize], pad: Option<f64>, rng: &mut StdRng) -> Case {
    let (b, h, nq, nk, d, dv) = shape;
    let padded = |t: Tensor| match pad {
        None => t,
        Some(x) => {
            let w = t.shape()[3];
            let mut data = t.to_f64_vec();
            for (row, chunk) in data.chunks_mut(w).enumerate() {
                if row % nk >= lens[row / (nk * h)] {
                    chunk.fill(x);
                }
            }
            Tensor::from_vec(data, t.shape()).unwrap()
        }
    };
    Case {
        q: randn(&[b, h, nq, d], rng),
        k: padded(randn(&[b, h, nk, d], rng)),
        v: padded(randn(&[b, h, nk, dv], rng)),
        tq: randn(&[b, h, nq, d], rng),
        tk: padded(randn(&[b, h, nk, d], rng)),
        tv: padded(randn(&[b, h, nk, dv], rng)),
        lens: lens.to_vec(),
    }
}

fn jvp(c: &Case) -> AttentionJvp {
    attention_jvp_with_key_lens(
        &Dual::new(c.q.clone(), c.tq.clone()).unwrap(),
        &Dual::new(c.k.clone(), c.tk.clone()).unwrap(),
        &Dual::new(c.v.clone(), c.tv.clone()).unwrap(),
        None,
        &c.lens,
    )
    .unwrap()
}

fn outputs(j: &AttentionJvp) -> [Vec<f64>; 4] {
    [
        j.o.primal.to_f64_vec(),
        j.lse.primal.to_f64_vec(),
        j.o.tangent.as_ref().unwrap().to_f64_vec(),
        j.lse.tangent.as_ref().unwrap().to_f64_vec(),
    ]
}

/// The naive masked reference: per query row, scores and their tangents over keys 0..lens[b]
/// only (the rest never touched), softmax, o = Σ p v, ȯ = Σ p v̇ + p (ṡ − μ) v, lse, l̇se = μ.
fn naive(c: &Case) -> [Vec<f64>; 4] {
    let [b, h, nq, d] = c.q.shape().try_into().unwrap();
    let (nk, dv) = (c.k.shape()[2], c.v.shape()[3]);
    let scale = 1.0 / (d as f64).sqrt();
    let [q, k, v, tq, tk, tv] = [&c.q, &c.k, &c.v, &c.tq, &c.tk, &c.tv].map(|t| t.to_f64_vec());
    let mut out = [
        vec![0.0; b * h * nq * dv],
        vec![0.0; b * h * nq],
        vec![0.0; b * h * nq * dv],
        vec![0.0; b * h * nq],
    ];
    for bh in 0..b * h {
        let n = c.lens[bh / h];
        for i in 0..nq {
            let row = bh * nq + i;
            let qi = row * d;
            let (mut s, mut sd) = (vec![0.0; n], vec![0.0; n]);
            for j in 0..n {
                let kj = (bh * nk + j) * d;
                for x in 0..d {
                    s[j] += scale * q[qi + x] * k[kj + x];
                    sd[j] += scale * (tq[qi + x] * k[kj + x] + q[qi + x] * tk[kj + x]);
                }
            }
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let l: f64 = s.iter().map(|x| (x - m).exp()).sum();
            let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / l).collect();
            let mu: f64 = p.iter().zip(&sd).map(|(a, b)| a * b).sum();
            out[1][row] = m + l.ln();
            out[3][row] = mu;
            for j in 0..n {
                let vj = (bh * nk + j) * dv;
                for y in 0..dv {
                    out[0][row * dv + y] += p[j] * v[vj + y];
                    out[2][row * dv + y] += p[j] * (tv[vj + y] + (sd[j] - mu) * v[vj + y]);
                }
            }
        }
    }
    out
}

/// Shapes and key counts over the corners: one key, all keys, counts that end inside and at the
/// edge of the reference's 128-key blocks, several heads per batch entry, Nq ≠ Nk, dv ≠ d.
fn cases() -> Vec<(Shape, Vec<usize>)> {
    vec![
        ((1, 1, 3, 5, 4, 4), vec![1]),
        ((2, 3, 9, 7, 5, 3), vec![7, 2]),
        ((3, 2, 130, 300, 16, 8), vec![129, 300, 128]),
        ((2, 1, 70, 260, 72, 24), vec![257, 1]),
    ]
}

#[test]
fn key_lens_match_a_naive_masked_reference_with_nan_padding() {
    let mut rng = rng(71);
    for (shape, lens) in cases() {
        // NaN in every padding row of k, v and their tangents: an output that read one is NaN.
        let c = case(shape, &lens, Some(f64::NAN), &mut rng);
        let got = outputs(&jvp(&c));
        let want = naive(&c);
        for ((name, g), w) in ["o", "lse", "o tangent", "lse tangent"]
            .iter()
            .zip(&got)
            .zip(&want)
        {
            assert!(
                g.iter().all(|x| x.is_finite()),
                "{shape:?}: {name} read padding"
            );
            assert_close(&format!("{shape:?} {lens:?}: {name}"), g, w, 1e-12);
        }
        let fwd = attention_forward_with_key_lens(&c.q, &c.k, &c.v, None, &lens).unwrap();
        assert_eq!(fwd.o.to_f64_vec(), got[0], "{shape:?}: forward o vs jvp o");
        assert_eq!(
            fwd.lse.to_f64_vec(),
            got[1],
            "{shape:?}: forward lse vs jvp lse"
        );
    }
}

#[test]
fn full_key_lens_are_plain_attention_bit_for_bit() {
    let mut rng = rng(72);
    let shape = (2, 2, 40, 150, 8, 8);
    let c = case(shape, &[150, 150], None, &mut rng);
    let plain = attention_jvp(
        &Dual::new(c.q.clone(), c.tq.clone()).unwrap(),
        &Dual::new(c.k.clone(), c.tk.clone()).unwrap(),
        &Dual::new(c.v.clone(), c.tv.clone()).unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(outputs(&jvp(&c)), outputs(&plain));
}

#[test]
fn key_lens_jvp_matches_central_differences() {
    let mut rng = rng(73);
    for (shape, lens) in cases() {
        let c = case(shape, &lens, None, &mut rng);
        let fd = central_difference(
            |eps| {
                let out = attention_forward_with_key_lens(
                    &axpy(&c.q, eps, &c.tq),
                    &axpy(&c.k, eps, &c.tk),
                    &axpy(&c.v, eps, &c.tv),
                    None,
                    &lens,
                )
                .unwrap();
                vec![out.o, out.lse]
            },
            1e-5,
        );
        let j = outputs(&jvp(&c));
        assert_close(&format!("{shape:?}: o tangent vs fd"), &j[2], &fd[0], 1e-6);
        assert_close(
            &format!("{shape:?}: lse tangent vs fd"),
            &j[3],
            &fd[1],
            1e-6,
        );
    }
}

#[test]
fn key_lens_backward_satisfies_the_adjoint_identity_and_zeroes_the_padding() {
    let mut rng = rng(74);
    for (shape, lens) in cases() {
        let (b, h, nq, nk, d, dv) = shape;
        let c = case(shape, &lens, None, &mut rng);
        let j = jvp(&c);
        let go = randn(&[b, h, nq, dv], &mut rng);
        let g = attention_backward_with_key_lens(
            &c.q,
            &c.k,
            &c.v,
            &j.o.primal,
            &j.lse.primal,
            &go,
            None,
            &lens,
        )
        .unwrap();
        let lhs = dot(&go, j.o.tangent.as_ref().unwrap());
        let rhs = dot(&g.dq, &c.tq) + dot(&g.dk, &c.tk) + dot(&g.dv, &c.tv);
        assert_adjoint(&format!("{shape:?} {lens:?}"), lhs, rhs, 1e-10);
        for (name, grad, w) in [("dk", &g.dk, d), ("dv", &g.dv, dv)] {
            let data = grad.to_f64_vec();
            for (row, chunk) in data.chunks(w).enumerate() {
                let (key, batch) = (row % nk, row / (nk * h));
                let any = chunk.iter().any(|&x| x != 0.0);
                if key >= lens[batch] {
                    assert!(
                        !any,
                        "{shape:?}: {name} of padding key {key} (batch {batch}) not 0"
                    );
                } else if name == "dv" || lens[batch] > 1 {
                    // (With one key p = 1 whatever the scores, so that key's dk is 0.)
                    assert!(
                        any,
                        "{shape:?}: {name} of key {key} (batch {batch}) is all 0"
                    );
                }
            }
        }
    }
}

#[test]
fn key_lens_backward_never_reads_the_padding() {
    // NaN padding in k and v: dq and the unpadded rows of dk, dv stay as with zero padding.
    let mut rng = rng(75);
    let shape = (2, 2, 33, 90, 8, 16);
    let lens = [61, 90];
    let c = case(shape, &lens, Some(f64::NAN), &mut rng);
    let zero_pad = |t: &Tensor| {
        let data: Vec<f64> = t
            .to_f64_vec()
            .iter()
            .map(|x| if x.is_nan() { 0.0 } else { *x })
            .collect();
        Tensor::from_vec(data, t.shape()).unwrap()
    };
    let j = jvp(&c);
    let go = randn(&[2, 2, 33, 16], &mut rng);
    let grads = |k: &Tensor, v: &Tensor| {
        attention_backward_with_key_lens(&c.q, k, v, &j.o.primal, &j.lse.primal, &go, None, &lens)
            .unwrap()
    };
    let nan = grads(&c.k, &c.v);
    let zero = grads(&zero_pad(&c.k), &zero_pad(&c.v));
    assert_eq!(nan.dq, zero.dq);
    assert_eq!(nan.dk, zero.dk);
    assert_eq!(nan.dv, zero.dv);
    // And with every key counted, the keyed backward is the plain one.
    let full = case(shape, &[90, 90], None, &mut rng);
    let jf = jvp(&full);
    let keyed = attention_backward_with_key_lens(
        &full.q,
        &full.k,
        &full.v,
        &jf.o.primal,
        &jf.lse.primal,
        &go,
        None,
        &[90, 90],
    )
    .unwrap();
    let plain = attention_backward(
        &full.q,
        &full.k,
        &full.v,
        &jf.o.primal,
        &jf.lse.primal,
        &go,
        None,
    )
    .unwrap();
    assert_eq!(
        (keyed.dq, keyed.dk, keyed.dv),
        (plain.dq, plain.dk, plain.dv)
    );
}

#[test]
fn bad_key_lens_are_errors_that_name_them() {
    let mut rng = rng(76);
    let c = case((2, 1, 4, 6, 8, 8), &[6, 6], None, &mut rng);
    for (lens, needle) in [
        (vec![6], "[2]"),
        (vec![6, 6, 6], "[2]"),
        (vec![0, 6], "key_lens[0] = 0"),
        (vec![6, 7], "key_lens[1] = 7"),
        (vec![rng.random_range(7..1000), 1], "outside 1..=6"),
    ] {
        let e: Error = attention_forward_with_key_lens(&c.q, &c.k, &c.v, None, &lens).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("key_lens") && msg.contains(needle),
            "{lens:?}: {msg}"
        );
        let e = attention_jvp_with_key_lens(
            &Dual::new(c.q.clone(), c.tq.clone()).unwrap(),
            &Dual::constant(c.k.clone()),
            &Dual::constant(c.v.clone()),
            None,
            &lens,
        )
        .unwrap_err();
        assert!(e.to_string().contains("key_lens"), "{lens:?}: {e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Random shapes and counts (across the reference's 128-key blocks), NaN padding, against the
    /// naive masked reference; the backward through the adjoint identity.
    #[test]
    fn key_lens_match_naive_on_random_shapes(
        b in 1usize..4, h in 1usize..3, nq in 1usize..70, nk in 1usize..300,
        d in 1usize..20, dv in 1usize..20, seed in any::<u64>(), fractions in prop::collection::vec(0.0f64..=1.0, 3),
    ) {
        let mut rng = rng(seed);
        let lens: Vec<usize> = fractions[..b].iter().map(|f| 1 + (f * (nk - 1) as f64) as usize).collect();
        let shape = (b, h, nq, nk, d, dv);
        let c = case(shape, &lens, Some(f64::NAN), &mut rng);
        let got = outputs(&jvp(&c));
        for (g, w) in got.iter().zip(&naive(&c)) {
            prop_assert!(g.iter().all(|x| x.is_finite()));
            let err = rel_err(g, w);
            prop_assert!(err <= 1e-11, "{:?} {:?}: relative error {:.3e}", shape, lens, err);
        }
        // The adjoint identity needs finite padding in the tangents: zero it (it changes nothing).
        let finite = |t: &Tensor| {
            let x: Vec<f64> = t.to_f64_vec().iter().map(|v| if v.is_nan() { 0.0 } else { *v }).collect();
            Tensor::from_vec(x, t.shape()).unwrap()
        };
        let j = jvp(&c);
        let go = randn(&[b, h, nq, dv], &mut rng);
        let g = attention_backward_with_key_lens(
            &c.q, &c.k, &c.v, &j.o.primal, &j.lse.primal, &go, None, &lens,
        ).unwrap();
        let lhs = dot(&go, j.o.tangent.as_ref().unwrap());
        let rhs = dot(&g.dq, &c.tq) + dot(&g.dk, &finite(&c.tk)) + dot(&g.dv, &finite(&c.tv));
        let scale = lhs.abs().max(rhs.abs()).max(1e-300);
        prop_assert!((lhs - rhs).abs() / scale <= 1e-9, "{:?} {:?}: {} vs {}", shape, lens, lhs, rhs);
    }
}
