//! Outputs and intermediates sized by several inputs together (attention's o from q's rows and v's
//! width, the MLP's hidden layer, a linear layer's output, the timestep embedding's width) can be
//! far larger than any input: a few MiB of input asking for petabytes must be an error naming the
//! output, not an allocation failure that aborts the process. The shapes ask for more than 2^47
//! bytes, beyond any x86-64 address space, so the error comes whatever the machine's overcommit
//! policy.

use flashjvp::ops::{self, Mlp};
use flashjvp::{Dual, Error, Tensor};

fn filled(shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(vec![0.5f32; n], shape).unwrap()
}

fn assert_too_large<T: std::fmt::Debug>(r: flashjvp::Result<T>, what: &str) {
    match r {
        Err(e @ Error::Invalid { .. }) => {
            let m = e.to_string();
            assert!(m.contains(what) && m.contains("more memory than"), "{m}");
        }
        other => panic!("expected an error naming {what}, got {other:?}"),
    }
}

#[test]
fn attention_output_larger_than_memory_is_an_error() {
    let (q, k, v) = (
        filled(&[1, 1, 1 << 22, 1]),
        filled(&[1, 1, 1, 1]),
        filled(&[1, 1, 1, 1 << 23]),
    );
    assert_too_large(ops::attention_forward(&q, &k, &v, None), "the output o");
    let dq = Dual::new(q.clone(), q.clone()).unwrap();
    let (dk, dv) = (Dual::constant(k), Dual::constant(v));
    assert_too_large(ops::attention_jvp(&dq, &dk, &dv, None), "the output o");
}

#[test]
fn mlp_hidden_layer_larger_than_memory_is_an_error() {
    let h = 1 << 22;
    let (x, w1, b1, w2, b2) = (
        filled(&[h, 1]),
        filled(&[h, 1]),
        filled(&[h]),
        filled(&[1, h]),
        filled(&[1]),
    );
    let p = Mlp {
        w1: &w1,
        b1: &b1,
        w2: &w2,
        b2: &b2,
    };
    assert_too_large(ops::mlp_forward(&x, &p), "the hidden layer");
    assert_too_large(ops::mlp_jvp(&Dual::constant(x), &p), "the hidden layer");
}

#[test]
fn linear_output_larger_than_memory_is_an_error() {
    let (x, w) = (filled(&[1 << 22, 1]), filled(&[1 << 23, 1]));
    assert_too_large(ops::linear_forward(&x, &w, None), "the output y");
}

#[test]
fn timestep_embedding_wider_than_memory_is_an_error() {
    let t = filled(&[4]);
    assert_too_large(
        ops::timestep_embedding_forward(&t, 1 << 46, 1e4),
        "the embedding",
    );
    // Beyond what usize can count: the same error, not a capacity-overflow panic.
    assert_too_large(
        ops::timestep_embedding_forward(&t, 1 << 62, 1e4),
        "the embedding",
    );
}

#[test]
fn ordinary_sizes_are_untouched() {
    let x = filled(&[3, 4]);
    let w = filled(&[5, 4]);
    assert_eq!(ops::linear_forward(&x, &w, None).unwrap().shape(), &[3, 5]);
}
