//! The `flashjvp` binary end to end: outputs equal the library calls bit for bit (same code
//! path), and every failure is one `error:` line on stderr with a non-zero exit, never a panic.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use flashjvp::io::{load_safetensors, save_safetensors, TensorMap};
use flashjvp::ops::{self, Mlp, DEFAULT_EPS};
use flashjvp::{DType, Dual, Tensor};

const BIN: &str = env!("CARGO_BIN_EXE_flashjvp");

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("flashjvp-cli-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn save(path: &Path, tensors: &[(&str, &Tensor)]) {
    save_safetensors(path, tensors.iter().map(|(n, t)| (*n, *t))).unwrap();
}

/// Runs `flashjvp MODE OP` on `inputs` (plus `extra` arguments) and returns the output file.
fn run_ok(mode: &str, op: &str, inputs: &[(&str, &Tensor)], extra: &[&str]) -> TensorMap {
    let dir = TempDir::new(op);
    let (inp, out) = (dir.path("in.safetensors"), dir.path("out.safetensors"));
    save(&inp, inputs);
    let mut args = vec![
        mode,
        op,
        "--input",
        inp.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    cpu_unless_given(&mut args);
    let o = run(&args);
    assert!(
        o.status.success(),
        "flashjvp {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    load_safetensors(&out).unwrap()
}

/// These tests compare with the CPU library, so they ask for the CPU unless a test names a device
/// (`--device auto`, the default, would take a GPU where there is one).
fn cpu_unless_given(args: &mut Vec<&str>) {
    if !args.contains(&"--device") {
        args.extend(["--device", "cpu"]);
    }
}

/// Asserts a failure: the exit code, exactly one stderr line starting with `error:` that contains
/// every needle, and no panic.
fn assert_error(o: &Output, code: i32, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing from: {stderr}");
    }
}

/// Runs `flashjvp MODE OP` on `inputs` and asserts it fails with exit 1 naming `needles`.
#[test]
fn attention_key_lens_match_library() {
    // Batch 2: entry 0 attends to its first 3 keys of 7, entry 1 to all 7.
    let q = randn(&[2, 2, 5, 4], 41);
    let (k, v) = (randn(&[2, 2, 7, 4], 42), randn(&[2, 2, 7, 3], 43));
    let (tq, tk, tv) = (
        randn(&[2, 2, 5, 4], 44),
        randn(&[2, 2, 7, 4], 45),
        randn(&[2, 2, 7, 3], 46),
    );
    let go = randn(&[2, 2, 5, 3], 47);
    let lens = Tensor::from_vec(vec![3.0f32, 7.0], &[2]).unwrap();
    let mut inputs = vec![
        ("q", &q),
        ("k", &k),
        ("v", &v),
        ("tq", &tq),
        ("tk", &tk),
        ("tv", &tv),
        ("go", &go),
        ("key_lens", &lens),
    ];
    let got = run_ok("jvp", "attention", &inputs, &[]);
    let r = ops::attention_jvp_with_key_lens(
        &dual(&q, &tq),
        &dual(&k, &tk),
        &dual(&v, &tv),
        None,
        &[3, 7],
    )
    .unwrap();
    let (to, tlse) = (r.o.tangent_or_zeros(), r.lse.tangent_or_zeros());
    let want = [
        ("o", &r.o.primal),
        ("to", &to),
        ("lse", &r.lse.primal),
        ("tlse", &tlse),
    ];
    assert_outputs(&got, &want);
    // Not plain attention: the key counts were used.
    let plain = ops::attention_forward(&q, &k, &v, None).unwrap();
    assert!(plain.o != r.o.primal);
    let got = run_ok("vjp", "attention", &inputs, &[]);
    let f = ops::attention_forward_with_key_lens(&q, &k, &v, None, &[3, 7]).unwrap();
    let g = ops::attention_backward_with_key_lens(&q, &k, &v, &f.o, &f.lse, &go, None, &[3, 7])
        .unwrap();
    assert_outputs(&got, &[("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)]);
    // Bad counts: out of range, not whole, the wrong number, not a vector.
    let bad = [
        (
            Tensor::from_vec(vec![3.0f32, 8.0], &[2]).unwrap(),
            "key_lens[1] = 8",
        ),
        (
            Tensor::from_vec(vec![0.0f32, 7.0], &[2]).unwrap(),
            "key_lens[0] = 0",
        ),
        (
            Tensor::from_vec(vec![2.5f32, 7.0], &[2]).unwrap(),
            "not a count",
        ),
        (
            Tensor::from_vec(vec![-1.0f32, 7.0], &[2]).unwrap(),
            "not a count",
        ),
        (Tensor::from_vec(vec![3.0f32], &[1]).unwrap(), "[2]"),
        (Tensor::from_vec(vec![3.0f32, 7.0], &[1, 2]).unwrap(), "[B]"),
    ];
    for (t, needle) in &bad {
        inputs[7] = ("key_lens", t);
        run_err("jvp", "attention", &inputs, &[], &["key_lens", needle]);
        run_err("vjp", "attention", &inputs, &[], &["key_lens", needle]);
    }
}

fn run_err(mode: &str, op: &str, inputs: &[(&str, &Tensor)], extra: &[&str], needles: &[&str]) {
    let dir = TempDir::new("err");
    let (inp, out) = (dir.path("in.safetensors"), dir.path("out.safetensors"));
    save(&inp, inputs);
    let mut args = vec![
        mode,
        op,
        "-i",
        inp.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    cpu_unless_given(&mut args);
    assert_error(&run(&args), 1, needles);
    assert!(!out.exists(), "a failed run must not write its output");
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    common::randn(shape, &mut common::rng(seed))
}

fn scalar(x: f64, shape: &[usize]) -> Tensor {
    Tensor::from_vec(vec![x], shape).unwrap()
}

/// Attention inputs: q [1,2,5,4], k [1,2,7,4], v [1,2,7,3], tangents, go, a 0-d scale and an
/// unused tensor (which must be ignored).
struct Attn {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor,
    tk: Tensor,
    tv: Tensor,
    go: Tensor,
    scale: Tensor,
    junk: Tensor,
}

fn attn() -> Attn {
    Attn {
        q: randn(&[1, 2, 5, 4], 1),
        k: randn(&[1, 2, 7, 4], 2),
        v: randn(&[1, 2, 7, 3], 3),
        tq: randn(&[1, 2, 5, 4], 4),
        tk: randn(&[1, 2, 7, 4], 5),
        tv: randn(&[1, 2, 7, 3], 6),
        go: randn(&[1, 2, 5, 3], 7),
        scale: scalar(0.4, &[]),
        junk: randn(&[3], 8),
    }
}

impl Attn {
    fn all(&self) -> Vec<(&str, &Tensor)> {
        vec![
            ("q", &self.q),
            ("k", &self.k),
            ("v", &self.v),
            ("tq", &self.tq),
            ("tk", &self.tk),
            ("tv", &self.tv),
            ("go", &self.go),
            ("scale", &self.scale),
            ("junk", &self.junk),
        ]
    }
}

fn dual(p: &Tensor, t: &Tensor) -> Dual {
    Dual::new(p.clone(), t.clone()).unwrap()
}

fn assert_outputs(got: &TensorMap, want: &[(&str, &Tensor)]) {
    let mut names: Vec<&str> = want.iter().map(|(n, _)| *n).collect();
    names.sort();
    assert_eq!(got.keys().map(String::as_str).collect::<Vec<_>>(), names);
    for (name, w) in want {
        let g = &got[*name];
        assert_eq!(g.shape(), w.shape(), "{name} shape");
        assert_eq!(g.dtype(), w.dtype(), "{name} dtype");
        assert!(g == *w, "{name} differs from the library call");
    }
}

#[test]
fn jvp_attention_matches_library() {
    let a = attn();
    let got = run_ok("jvp", "attention", &a.all(), &[]);
    let r = ops::attention_jvp(
        &dual(&a.q, &a.tq),
        &dual(&a.k, &a.tk),
        &dual(&a.v, &a.tv),
        Some(0.4),
    )
    .unwrap();
    assert_eq!(got["o"].shape(), &[1, 2, 5, 3]);
    assert_eq!(got["lse"].shape(), &[1, 2, 5]);
    let (to, tlse) = (r.o.tangent_or_zeros(), r.lse.tangent_or_zeros());
    assert_outputs(
        &got,
        &[
            ("o", &r.o.primal),
            ("to", &to),
            ("lse", &r.lse.primal),
            ("tlse", &tlse),
        ],
    );
}

#[test]
fn jvp_attention_without_kv_tangents_treats_them_as_zero() {
    let a = attn();
    let inputs = [("q", &a.q), ("k", &a.k), ("v", &a.v), ("tq", &a.tq)];
    let got = run_ok("jvp", "attention", &inputs, &[]);
    let r = ops::attention_jvp(
        &dual(&a.q, &a.tq),
        &Dual::constant(a.k.clone()),
        &Dual::constant(a.v.clone()),
        None,
    )
    .unwrap();
    let (to, tlse) = (r.o.tangent_or_zeros(), r.lse.tangent_or_zeros());
    assert_outputs(
        &got,
        &[
            ("o", &r.o.primal),
            ("to", &to),
            ("lse", &r.lse.primal),
            ("tlse", &tlse),
        ],
    );
}

#[test]
fn vjp_attention_matches_library() {
    let a = attn();
    let got = run_ok("vjp", "attention", &a.all(), &[]);
    let f = ops::attention_forward(&a.q, &a.k, &a.v, Some(0.4)).unwrap();
    let g = ops::attention_backward(&a.q, &a.k, &a.v, &f.o, &f.lse, &a.go, Some(0.4)).unwrap();
    assert_outputs(&got, &[("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)]);
}

/// LayerNorm inputs: x [6,8], a per-row scale [6,8] and a shared shift [8], tangents, gy, and
/// eps as a 1-element tensor.
fn ln() -> Vec<(&'static str, Tensor)> {
    vec![
        ("x", randn(&[6, 8], 11)),
        ("scale", randn(&[6, 8], 12)),
        ("shift", randn(&[8], 13)),
        ("tx", randn(&[6, 8], 14)),
        ("tscale", randn(&[6, 8], 15)),
        ("tshift", randn(&[8], 16)),
        ("gy", randn(&[6, 8], 17)),
        ("eps", scalar(1e-3, &[1])),
    ]
}

fn named<'a>(v: &'a [(&'static str, Tensor)]) -> Vec<(&'static str, &'a Tensor)> {
    v.iter().map(|(n, t)| (*n, t)).collect()
}

fn get<'a>(v: &'a [(&'static str, Tensor)], name: &str) -> &'a Tensor {
    &v.iter().find(|(n, _)| *n == name).unwrap().1
}

#[test]
fn jvp_layernorm_mod_matches_library() {
    let t = ln();
    let got = run_ok("jvp", "layernorm_mod", &named(&t), &[]);
    let d = |p: &str, tp: &str| dual(get(&t, p), get(&t, tp));
    let y = ops::layernorm_mod_jvp(
        &d("x", "tx"),
        &d("scale", "tscale"),
        &d("shift", "tshift"),
        1e-3,
    )
    .unwrap();
    let ty = y.tangent_or_zeros();
    assert_outputs(&got, &[("y", &y.primal), ("ty", &ty)]);
}

#[test]
fn vjp_layernorm_mod_matches_library() {
    let t = ln();
    let got = run_ok("vjp", "layernorm_mod", &named(&t), &[]);
    let g = ops::layernorm_mod_backward(
        get(&t, "x"),
        get(&t, "scale"),
        get(&t, "shift"),
        1e-3,
        get(&t, "gy"),
    )
    .unwrap();
    assert_eq!(got["dscale"].shape(), &[6, 8]);
    assert_eq!(got["dshift"].shape(), &[8]);
    assert_outputs(
        &got,
        &[("dx", &g.dx), ("dscale", &g.dscale), ("dshift", &g.dshift)],
    );
}

/// RMSNorm inputs: x [5, 12], w [12] and their tangents, gy, eps as a 0-d tensor.
fn rms() -> Vec<(&'static str, Tensor)> {
    vec![
        ("x", randn(&[5, 12], 70)),
        ("w", randn(&[12], 71)),
        ("tx", randn(&[5, 12], 72)),
        ("tw", randn(&[12], 73)),
        ("gy", randn(&[5, 12], 74)),
        ("eps", scalar(1e-4, &[])),
    ]
}

#[test]
fn rms_norm_jvp_and_vjp_match_library() {
    let t = rms();
    let got = run_ok("jvp", "rms_norm", &named(&t), &[]);
    let y = ops::rms_norm_jvp(
        &dual(get(&t, "x"), get(&t, "tx")),
        &dual(get(&t, "w"), get(&t, "tw")),
        1e-4,
    )
    .unwrap();
    assert_outputs(&got, &[("y", &y.primal), ("ty", &y.tangent_or_zeros())]);
    let got = run_ok("vjp", "rms_norm", &named(&t), &[]);
    let g = ops::rms_norm_backward(get(&t, "x"), get(&t, "w"), 1e-4, get(&t, "gy")).unwrap();
    assert_outputs(&got, &[("dx", &g.dx), ("dw", &g.dweight)]);
    // A weight of the wrong width is named.
    let bad = randn(&[11], 75);
    let mut inputs = named(&t);
    inputs[1] = ("w", &bad);
    run_err("jvp", "rms_norm", &inputs, &[], &["`w`", "[12]"]);
}

/// Rope inputs: x [2, 3, 2, 8] and its tangent, per-batch tables [2, 3, 4] of real angles, gy.
fn rope_inputs() -> Vec<(&'static str, Tensor)> {
    let theta = randn(&[2, 3, 4], 80).to_f64_vec();
    let table = |f: fn(f64) -> f64| {
        Tensor::from_vec(theta.iter().map(|&t| f(t)).collect(), &[2, 3, 4]).unwrap()
    };
    vec![
        ("x", randn(&[2, 3, 2, 8], 81)),
        ("tx", randn(&[2, 3, 2, 8], 82)),
        ("cos", table(f64::cos)),
        ("sin", table(f64::sin)),
        ("gy", randn(&[2, 3, 2, 8], 83)),
    ]
}

#[test]
fn rope_jvp_and_vjp_match_library() {
    let t = rope_inputs();
    let (cos, sin) = (get(&t, "cos"), get(&t, "sin"));
    for (halves, pairs) in [
        (None, ops::RopePairs::Interleaved),
        (Some(0.0), ops::RopePairs::Interleaved),
        (Some(1.0), ops::RopePairs::Halves),
    ] {
        let flag = halves.map(|h| scalar(h, &[1]));
        let mut inputs = named(&t);
        if let Some(f) = &flag {
            inputs.push(("halves", f));
        }
        let got = run_ok("jvp", "rope", &inputs, &[]);
        let y = ops::rope_jvp(&dual(get(&t, "x"), get(&t, "tx")), cos, sin, pairs).unwrap();
        assert_outputs(&got, &[("y", &y.primal), ("ty", &y.tangent_or_zeros())]);
        // The backward reads gy (x may be absent).
        inputs.retain(|(n, _)| *n != "x" && *n != "tx");
        let got = run_ok("vjp", "rope", &inputs, &[]);
        let dx = ops::rope_backward(get(&t, "gy"), cos, sin, pairs).unwrap();
        assert_outputs(&got, &[("dx", &dx)]);
    }
    let two = scalar(2.0, &[1]);
    let mut inputs = named(&t);
    inputs.push(("halves", &two));
    run_err("jvp", "rope", &inputs, &[], &["halves = 2"]);
    let mut inputs = named(&t);
    inputs.retain(|(n, _)| *n != "sin");
    run_err(
        "jvp",
        "rope",
        &inputs,
        &[],
        &["`sin`", "[N, d/2] or [B, N, d/2]"],
    );
}

#[test]
fn absent_tangents_give_a_zero_tangent_and_default_eps() {
    let t = ln();
    let inputs: Vec<(&str, &Tensor)> = named(&t)
        .into_iter()
        .filter(|(n, _)| matches!(*n, "x" | "scale" | "shift"))
        .collect();
    let got = run_ok("jvp", "layernorm_mod", &inputs, &[]);
    let y = ops::layernorm_mod_forward(
        get(&t, "x"),
        get(&t, "scale"),
        get(&t, "shift"),
        DEFAULT_EPS,
    )
    .unwrap();
    let zeros = Tensor::zeros(&[6, 8], DType::F64);
    assert_outputs(&got, &[("y", &y), ("ty", &zeros)]);
}

fn mlp_inputs() -> Vec<(&'static str, Tensor)> {
    vec![
        ("x", randn(&[5, 6], 21)),
        ("tx", randn(&[5, 6], 22)),
        ("w1", randn(&[10, 6], 23)),
        ("b1", randn(&[10], 24)),
        ("w2", randn(&[6, 10], 25)),
        ("b2", randn(&[6], 26)),
        ("gy", randn(&[5, 6], 27)),
    ]
}

fn mlp_params<'a>(t: &'a [(&'static str, Tensor)]) -> Mlp<'a> {
    Mlp {
        w1: get(t, "w1"),
        b1: get(t, "b1"),
        w2: get(t, "w2"),
        b2: get(t, "b2"),
    }
}

#[test]
fn jvp_mlp_matches_library() {
    let t = mlp_inputs();
    let got = run_ok("jvp", "mlp", &named(&t), &[]);
    let y = ops::mlp_jvp(&dual(get(&t, "x"), get(&t, "tx")), &mlp_params(&t)).unwrap();
    let ty = y.tangent_or_zeros();
    assert_outputs(&got, &[("y", &y.primal), ("ty", &ty)]);
}

#[test]
fn vjp_mlp_matches_library() {
    let t = mlp_inputs();
    let got = run_ok("vjp", "mlp", &named(&t), &[]);
    let g = ops::mlp_backward(get(&t, "x"), &mlp_params(&t), get(&t, "gy")).unwrap();
    assert_outputs(
        &got,
        &[
            ("dx", &g.dx),
            ("dw1", &g.dw1),
            ("db1", &g.db1),
            ("dw2", &g.dw2),
            ("db2", &g.db2),
        ],
    );
}

/// The computation dtype: the first input's by default (f32 for bf16/f16 inputs on the CPU),
/// else `--dtype`; outputs come back in it.
#[test]
fn dtypes_follow_the_first_input_or_the_flag() {
    let t = mlp_inputs();
    let f32s: Vec<(&'static str, Tensor)> = t
        .iter()
        .map(|(n, x)| (*n, x.to_dtype(DType::F32)))
        .collect();
    let want = ops::mlp_jvp(&dual(get(&f32s, "x"), get(&f32s, "tx")), &mlp_params(&f32s)).unwrap();
    let ty = want.tangent_or_zeros();

    let got = run_ok("jvp", "mlp", &named(&f32s), &[]);
    assert_outputs(&got, &[("y", &want.primal), ("ty", &ty)]);

    // f64 inputs computed in f32 on request: the same numbers.
    let got = run_ok("jvp", "mlp", &named(&t), &["--dtype", "f32"]);
    assert_outputs(&got, &[("y", &want.primal), ("ty", &ty)]);

    // bf16 and f16 inputs compute in f32.
    for half in [DType::BF16, DType::F16] {
        let halves: Vec<(&'static str, Tensor)> =
            t.iter().map(|(n, x)| (*n, x.to_dtype(half))).collect();
        let widened: Vec<(&'static str, Tensor)> = halves
            .iter()
            .map(|(n, x)| (*n, x.to_dtype(DType::F32)))
            .collect();
        let want = ops::mlp_jvp(
            &dual(get(&widened, "x"), get(&widened, "tx")),
            &mlp_params(&widened),
        )
        .unwrap();
        let got = run_ok("jvp", "mlp", &named(&halves), &[]);
        assert_outputs(
            &got,
            &[("y", &want.primal), ("ty", &want.tangent_or_zeros())],
        );
    }

    // f32 inputs computed in f64 on request.
    let f64s: Vec<(&'static str, Tensor)> = f32s
        .iter()
        .map(|(n, x)| (*n, x.to_dtype(DType::F64)))
        .collect();
    let want = ops::mlp_jvp(&dual(get(&f64s, "x"), get(&f64s, "tx")), &mlp_params(&f64s)).unwrap();
    let got = run_ok("jvp", "mlp", &named(&f32s), &["--dtype", "f64"]);
    assert_outputs(
        &got,
        &[("y", &want.primal), ("ty", &want.tangent_or_zeros())],
    );
}

// ---- failures: one line, names the culprit, exit 1 (2 for usage errors) ----

#[test]
fn missing_tensor_is_named() {
    let a = attn();
    let inputs: Vec<(&str, &Tensor)> = a.all().into_iter().filter(|(n, _)| *n != "k").collect();
    run_err("jvp", "attention", &inputs, &[], &["`k`", "attention"]);
    let inputs: Vec<(&str, &Tensor)> = a.all().into_iter().filter(|(n, _)| *n != "go").collect();
    run_err("vjp", "attention", &inputs, &[], &["`go`"]);
    let t = mlp_inputs();
    let inputs: Vec<(&str, &Tensor)> = named(&t).into_iter().filter(|(n, _)| *n != "b1").collect();
    run_err("jvp", "mlp", &inputs, &[], &["`b1`"]);
}

#[test]
fn misshaped_tensor_is_named() {
    let a = attn();
    let bad_k = randn(&[1, 2, 7, 5], 40); // d = 5, q has d = 4
    let mut inputs = a.all();
    inputs[1] = ("k", &bad_k);
    run_err("jvp", "attention", &inputs, &[], &["`k`"]);
    run_err("vjp", "attention", &inputs, &[], &["`k`"]);

    let t = ln();
    let bad_shift = randn(&[7], 41);
    let mut inputs = named(&t);
    inputs[2] = ("shift", &bad_shift);
    run_err("jvp", "layernorm_mod", &inputs, &[], &["`shift`"]);

    let t = mlp_inputs();
    let bad_w2 = randn(&[6, 9], 42);
    let mut inputs = named(&t);
    inputs[4] = ("w2", &bad_w2);
    run_err("vjp", "mlp", &inputs, &[], &["`w2`"]);
}

#[test]
fn misshaped_tangent_is_named() {
    let a = attn();
    let bad = randn(&[1, 2, 5, 3], 43);
    let mut inputs = a.all();
    inputs[3] = ("tq", &bad);
    run_err("jvp", "attention", &inputs, &[], &["`tq`", "[1, 2, 5, 4]"]);
}

#[test]
fn non_scalar_scale_or_eps_is_named() {
    let a = attn();
    let two = randn(&[2], 44);
    let mut inputs = a.all();
    inputs[7] = ("scale", &two);
    run_err("jvp", "attention", &inputs, &[], &["`scale`", "scalar"]);
    let t = ln();
    let mut inputs = named(&t);
    inputs[7] = ("eps", &two);
    run_err("vjp", "layernorm_mod", &inputs, &[], &["`eps`", "scalar"]);
}

#[test]
fn unreadable_input_file_is_named() {
    let dir = TempDir::new("missing");
    let inp = dir.path("does-not-exist.safetensors");
    let out = dir.path("out.safetensors");
    let o = run(&[
        "jvp",
        "mlp",
        "-i",
        inp.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_error(&o, 1, &["does-not-exist.safetensors", "cannot read"]);
}

#[test]
fn unwritable_output_file_is_named() {
    let t = mlp_inputs();
    let dir = TempDir::new("unwritable");
    let inp = dir.path("in.safetensors");
    save(&inp, &named(&t));
    let out = dir.path("no-such-dir/out.safetensors");
    let o = run(&[
        "jvp",
        "mlp",
        "-i",
        inp.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_error(&o, 1, &["no-such-dir/out.safetensors", "cannot write"]);
}

/// Writes `bytes` as the input file and runs `jvp mlp` on it.
fn run_on_bytes(bytes: &[u8]) -> (Output, TempDir) {
    let dir = TempDir::new("malformed");
    let inp = dir.path("bad.safetensors");
    std::fs::write(&inp, bytes).unwrap();
    let out = dir.path("out.safetensors");
    let o = run(&[
        "jvp",
        "mlp",
        "-i",
        inp.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    (o, dir)
}

fn with_header(json: &[u8], data: &[u8]) -> Vec<u8> {
    let mut b = (json.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(json);
    b.extend_from_slice(data);
    b
}

#[test]
fn header_longer_than_the_file_is_an_error() {
    let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    let (o, _d) = run_on_bytes(&bytes);
    assert_error(&o, 1, &["bad.safetensors"]);
}

#[test]
fn bad_json_header_is_an_error() {
    let (o, _d) = run_on_bytes(&with_header(b"{\"x\": [oops", &[]));
    assert_error(&o, 1, &["bad.safetensors"]);
}

#[test]
fn truncated_file_is_an_error() {
    let (o, _d) = run_on_bytes(&[7, 0, 0]);
    assert_error(&o, 1, &["bad.safetensors"]);
}

#[test]
fn data_shorter_than_the_shape_is_an_error() {
    let json = br#"{"x":{"dtype":"F32","shape":[4,4],"data_offsets":[0,64]}}"#;
    let (o, _d) = run_on_bytes(&with_header(json, &[0; 16]));
    assert_error(&o, 1, &["bad.safetensors"]);
}

#[test]
fn integer_dtype_is_an_error_naming_the_tensor() {
    let json = br#"{"x":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#;
    let (o, _d) = run_on_bytes(&with_header(json, &[0; 4]));
    assert_error(&o, 1, &["bad.safetensors", "`x`", "I32"]);
}

#[test]
fn unknown_op_is_a_usage_error() {
    let o = run(&["jvp", "convolution", "-i", "a", "-o", "b"]);
    assert_error(&o, 2, &["convolution", "attention"]);
    let o = run(&["hessian", "mlp", "-i", "a", "-o", "b"]);
    assert_error(&o, 2, &["hessian"]);
}

#[test]
fn bad_dtype_or_device_flag_is_a_usage_error() {
    let o = run(&["jvp", "mlp", "-i", "a", "-o", "b", "--dtype", "int8"]);
    assert_error(&o, 2, &["int8", "f32"]);
    let o = run(&["jvp", "mlp", "-i", "a", "-o", "b", "--device", "tpu"]);
    assert_error(&o, 2, &["tpu", "cpu"]);
    let o = run(&["jvp", "mlp", "-i", "a"]);
    assert_error(&o, 2, &["--output"]);
    let o = run(&[]);
    assert_error(&o, 2, &["jvp"]);
}

#[test]
fn bf16_on_the_cpu_is_an_error() {
    let t = mlp_inputs();
    run_err("jvp", "mlp", &named(&t), &["--dtype", "bf16"], &["f32/f64"]);
    run_err(
        "vjp",
        "mlp",
        &named(&t),
        &["--dtype", "bf16", "--device", "cpu"],
        &["f32/f64"],
    );
}

#[test]
fn cuda_device_without_a_gpu_is_a_one_line_error() {
    if flashjvp::device::cuda_usable().is_ok() {
        println!("skipped: a GPU is usable here");
        return;
    }
    let t = mlp_inputs();
    run_err(
        "jvp",
        "mlp",
        &named(&t),
        &["--device", "cuda"],
        &["--device cuda"],
    );
    let a = attn();
    run_err(
        "vjp",
        "attention",
        &a.all(),
        &["--device", "cuda", "--dtype", "bf16"],
        &["--device cuda"],
    );
}

#[test]
fn auto_device_says_which_it_chose() {
    let t = mlp_inputs();
    let dir = TempDir::new("auto");
    let (inp, out) = (dir.path("in.safetensors"), dir.path("out.safetensors"));
    save(&inp, &named(&t));
    let o = run(&[
        "jvp",
        "mlp",
        "-i",
        inp.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let want = if flashjvp::device::cuda_usable().is_ok() {
        "--device auto: running on cuda"
    } else {
        "--device auto: running on cpu"
    };
    assert!(stderr.contains(want), "`{want}` missing from: {stderr}");
}

#[test]
fn cuda_dtype_f64_is_refused() {
    if flashjvp::device::cuda_usable().is_err() {
        println!("skipped: no CUDA device");
        return;
    }
    let t = mlp_inputs();
    run_err(
        "jvp",
        "mlp",
        &named(&t),
        &["--device", "cuda", "--dtype", "f64"],
        &["f64"],
    );
}

/// `flashjvp kernels --json` compiles every kernel with NVRTC (no GPU needed) and lists each with
/// its resources. Without NVRTC: "skipped: no NVRTC" (a failure with FLASHJVP_REQUIRE_NVRTC=1).
#[cfg(feature = "cuda")]
#[test]
fn kernels_json_lists_every_kernel_with_its_resources() {
    if !flashjvp::cuda::nvrtc_or_skip() {
        return;
    }
    let o = run(&["kernels", "--arch", "sm_80", "--json"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("a JSON document");
    let rows = v.as_array().expect("a JSON array");
    assert!(rows.len() > 100, "only {} kernels", rows.len());
    for r in rows {
        for key in [
            "kernel",
            "arch",
            "ok",
            "registers",
            "spill_bytes",
            "shared_bytes",
        ] {
            assert!(r.get(key).is_some(), "`{key}` missing from {r}");
        }
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["arch"], "sm_80");
        assert!(r["registers"].as_u64().unwrap() > 0, "{r}");
    }
    let jvp = rows
        .iter()
        .find(|r| r["kernel"] == "attention_jvp_bf16_d128")
        .expect("the headline kernel");
    assert_eq!(jvp["spill_bytes"], 0, "{jvp}");
}

#[cfg(feature = "cuda")]
#[test]
fn kernels_without_gpu_or_arch_is_an_error() {
    if flashjvp::device::cuda_usable().is_ok() {
        println!("skipped: a GPU is usable here");
        return;
    }
    assert_error(&run(&["kernels"]), 1, &["--arch"]);
    assert_error(&run(&["kernels", "--arch", "bogus"]), 1, &["bogus"]);
}

#[cfg(feature = "cuda")]
#[test]
fn bench_without_gpu_is_a_one_line_error() {
    if flashjvp::device::cuda_usable().is_ok() {
        println!("skipped: a GPU is usable here");
        return;
    }
    assert_error(&run(&["bench", "attention", "--json"]), 1, &[]);
    assert_error(&run(&["bench", "conv"]), 1, &["conv"]);
}

#[test]
fn info_reports_version_threads_and_cuda_libraries() {
    let o = run(&["info"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for needle in [
        concat!("flashjvp ", env!("CARGO_PKG_VERSION")),
        "rayon threads: ",
        "CUDA driver: ",
        "NVRTC: ",
        "GPU: ",
    ] {
        assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
    }
    // With a GPU (or the emulator), which attention kernels it takes.
    if out.contains("GPU arch: ") {
        assert!(out.contains("attention kernels: "), "{out}");
    }
    assert!(o.stderr.is_empty());
}

/// FLASHJVP_DEVICE picks the process's GPU: a value that is no ordinal, or (under the emulator, one
/// device) an ordinal past the last device, leaves no usable GPU, said in one line by `info` and as
/// the error of `--device cuda`, never a panic.
#[test]
fn the_device_variable_is_checked() {
    let with = |value: &str, args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("FLASHJVP_DEVICE", value)
            .output()
            .unwrap()
    };
    let o = with("gpu1", &["info"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("GPU: none usable (FLASHJVP_DEVICE=`gpu1`"),
        "{out}"
    );

    let dir = TempDir::new("device_var");
    let (inp, outp) = (dir.path("in.safetensors"), dir.path("out.safetensors"));
    let x = randn(&[4, 8], 61);
    save(&inp, &[("x", &x), ("tx", &x)]);
    let args = [
        "jvp",
        "layernorm_mod",
        "-i",
        inp.to_str().unwrap(),
        "-o",
        outp.to_str().unwrap(),
        "--device",
        "cuda",
    ];
    assert_error(&with("gpu1", &args), 1, &["FLASHJVP_DEVICE=`gpu1`"]);
    if std::env::var("FLASHJVP_EMULATE").is_ok_and(|v| !v.is_empty() && v != "0") {
        assert_error(&with("1", &args), 1, &["emulator", "device 1"]);
        let o = with("0", &["info"]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains("GPU: device 0 of 1: "), "{out}");
    }
    assert!(!outp.exists());
}

#[test]
fn help_documents_the_tensor_contract() {
    let o = run(&["jvp", "--help"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "absent tangent is zero",
        "tq, tk, tv",
        "tscale",
        "layernorm_mod",
        "rms_norm",
        "halves",
    ] {
        assert!(out.contains(needle), "`{needle}` missing from:\n{out}");
    }
}

#[test]
fn empty_dimension_is_named() {
    // x [2^40, 0] holds no data, yet an MLP over it would allocate 2^40 hidden rows.
    let x = Tensor::zeros(&[1 << 40, 0], DType::F32);
    let (w1, b1) = (Tensor::zeros(&[4, 0], DType::F32), randn(&[4], 50));
    let (w2, b2) = (
        Tensor::zeros(&[0, 4], DType::F32),
        Tensor::zeros(&[0], DType::F32),
    );
    let inputs = [
        ("x", &x),
        ("w1", &w1),
        ("b1", &b1),
        ("w2", &w2),
        ("b2", &b2),
    ];
    run_err("jvp", "mlp", &inputs, &[], &["`x`", "at least 1"]);
    let t = ln();
    let empty = Tensor::zeros(&[6, 0], DType::F64);
    let mut inputs = named(&t);
    inputs[1] = ("scale", &empty);
    run_err(
        "vjp",
        "layernorm_mod",
        &inputs,
        &[],
        &["`scale`", "at least 1"],
    );
}

/// `flashjvp bench OP --json` end to end at small shapes: one JSON row per pass with the issue's
/// keys and sane order statistics. On the kernel emulator (CI) the timings are the CPU's, but
/// every plan, allocation and timing path of the benchmark runs.
#[cfg(feature = "cuda")]
#[test]
fn bench_prints_one_json_row_per_pass() {
    if flashjvp::cuda::require_gpu_or_skip().is_none() {
        return;
    }
    for (op, shape, rate, passes) in [
        (
            "attention",
            "1,2,80,80,64",
            "tflops",
            &["fwd", "jvp", "jvp_nokv", "fwd_packed", "jvp_packed", "bwd"][..],
        ),
        ("layernorm_mod", "64,96", "gbps", &["fwd", "jvp", "bwd"][..]),
        ("rms_norm", "64,96", "gbps", &["fwd", "jvp", "bwd"][..]),
        ("rope", "2,9,3,16", "gbps", &["fwd", "jvp", "bwd"][..]),
        ("mlp", "64,96,384", "tflops", &["fwd", "jvp", "bwd"][..]),
        (
            "dit_block",
            "1,64,128,2",
            "tflops",
            &["fwd", "jvp", "bwd", "fwd+bwd", "jvp+bwd"][..],
        ),
    ] {
        let out = run(&["bench", op, "--shape", shape, "--dtype", "bf16", "--json"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{op}: {stderr}");
        let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{op}: {l}: {e}")))
            .collect();
        let want_shape: Vec<u64> = shape.split(',').map(|v| v.parse().unwrap()).collect();
        let mut seen = Vec::new();
        for r in &rows {
            assert_eq!(r["op"], op, "{r}");
            assert_eq!(r["dtype"], "bf16", "{r}");
            let got_shape: Vec<u64> = r["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect();
            assert_eq!(got_shape, want_shape, "{r}");
            let f = |k: &str| {
                r[k].as_f64()
                    .unwrap_or_else(|| panic!("{op}: no {k} in {r}"))
            };
            let (ms, p10, p90) = (f("ms"), f("ms_p10"), f("ms_p90"));
            assert!(ms.is_finite() && ms > 0.0 && p10 <= ms && ms <= p90, "{r}");
            assert!(f(rate).is_finite() && f(rate) > 0.0, "{r}");
            assert!(r["runs"].as_u64().unwrap() >= 5, "{r}");
            seen.push(r["pass"].as_str().unwrap().to_string());
        }
        for p in passes {
            assert!(seen.iter().any(|s| s == p), "{op}: no {p} row in {seen:?}");
        }
    }
}

/// `FLASHJVP_BENCH_STEPS=1`: after the MLP's passes, one row per step of its forward and JVP
/// (`fwd.0`, `jvp.3`, ...), each labelled with the step it timed alone.
#[cfg(feature = "cuda")]
#[test]
fn bench_steps_time_each_step_of_a_pass() {
    if flashjvp::cuda::require_gpu_or_skip().is_none() {
        return;
    }
    let out = Command::new(BIN)
        .args([
            "bench",
            "mlp",
            "--shape",
            "64,32,128",
            "--dtype",
            "bf16",
            "--json",
        ])
        .env("FLASHJVP_BENCH_STEPS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let label = |pass: &str| -> String {
        let r = rows
            .iter()
            .find(|r| r["pass"] == pass)
            .unwrap_or_else(|| panic!("no {pass} row in {rows:?}"));
        assert!(r["ms"].as_f64().unwrap() > 0.0, "{r}");
        r["path"].as_str().unwrap().to_string()
    };
    // The forward: two GEMMs (the GELU in the first one's epilogue, or after it); the JVP: four.
    assert!(
        label("fwd.0").starts_with("gemm 64x128x32+bias"),
        "{}",
        label("fwd.0")
    );
    assert!(
        label("fwd.1").starts_with("gemm 64x32x128+bias"),
        "{}",
        label("fwd.1")
    );
    assert!(
        label("jvp.3").starts_with("gemm 64x32x128 "),
        "{}",
        label("jvp.3")
    );
    assert!(
        !rows
            .iter()
            .any(|r| r["pass"] == "fwd.2" || r["pass"] == "jvp.4"),
        "{rows:?}"
    );
}
