//! Arbitrary small shapes, ranks, dtypes and values (NaN and infinities included), mostly fitting
//! the op and sometimes not, into the forward, JVP and backward of every public op: each must
//! return Ok or Err, never panic. When an op succeeds its outputs must have the shapes its
//! documentation promises.
#![no_main]

use flashjvp::ops;
use flashjvp::{DType, Dual, Tensor};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

/// Elements per tensor, so that every input runs in well under a millisecond.
const MAX_NUMEL: usize = 512;

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = fuzz_one(&mut u);
});

fn fuzz_one(u: &mut Unstructured) -> Result<()> {
    let dtype = if u.ratio(7, 8)? {
        *u.choose(&[DType::F32, DType::F64])?
    } else {
        *u.choose(&[DType::BF16, DType::F16])?
    };
    let mut g = Gen { u, dtype };
    match g.u.int_in_range(0..=8)? {
        0 => attention(&mut g),
        1 => layernorm_mod(&mut g),
        2 => mlp(&mut g),
        3 => activations(&mut g),
        4 => linear(&mut g),
        5 => embedding(&mut g),
        6 => rms_norm(&mut g),
        7 => rope(&mut g),
        _ => residual(&mut g),
    }
}

struct Gen<'a, 'b> {
    u: &'a mut Unstructured<'b>,
    dtype: DType,
}

impl Gen<'_, '_> {
    fn dim(&mut self) -> Result<usize> {
        // Mostly small; sometimes empty.
        Ok(*self.u.choose(&[1, 1, 2, 3, 4, 5, 8, 0])?)
    }

    fn dims(&mut self, n: usize) -> Result<Vec<usize>> {
        (0..n).map(|_| self.dim()).collect()
    }

    /// `shape` most of the time; else another rank or another size, or a huge dimension beside an
    /// empty one (zero elements, but sizes that must not be allocated from).
    fn shape(&mut self, shape: &[usize]) -> Result<Vec<usize>> {
        let mut s = shape.to_vec();
        match self.u.int_in_range(0..=15)? {
            0 => {
                let rank = self.u.int_in_range(0..=5)?;
                s = self.dims(rank)?;
            }
            1 if !s.is_empty() => {
                let i = self.u.choose_index(s.len())?;
                s[i] = self.dim()?;
            }
            2 if s.len() >= 2 => {
                let i = self.u.choose_index(s.len())?;
                s[i] = 0;
                let j = (i + 1) % s.len();
                s[j] = 1 << 40;
            }
            _ => {}
        }
        Ok(s)
    }

    fn value(&mut self) -> Result<f64> {
        Ok(match self.u.int_in_range(0..=31)? {
            0 => f64::NAN,
            1 => f64::INFINITY,
            2 => f64::NEG_INFINITY,
            3 => 1e30,
            4 => -1e30,
            5 => 0.0,
            6 => f64::from_bits(self.u.arbitrary()?),
            _ => self.u.arbitrary::<i8>()? as f64 / 16.0,
        })
    }

    fn tensor(&mut self, shape: &[usize]) -> Result<Tensor> {
        let shape = self.shape(shape)?;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX);
        let dtype = if self.u.ratio(1, 16)? {
            *self
                .u
                .choose(&[DType::F32, DType::F64, DType::BF16, DType::F16])?
        } else {
            self.dtype
        };
        if numel > MAX_NUMEL {
            return Ok(Tensor::zeros(&[0], dtype));
        }
        let data = (0..numel)
            .map(|_| self.value())
            .collect::<Result<Vec<f64>>>()?;
        Ok(Tensor::from_f64_vec(data, &shape, dtype).expect("numel matches"))
    }

    /// A primal with no tangent, a fitting tangent, or one that may not fit.
    fn dual(&mut self, shape: &[usize]) -> Result<Dual> {
        let primal = self.tensor(shape)?;
        let tangent = match self.u.int_in_range(0..=3)? {
            0 => None,
            _ => Some(self.tensor(primal.shape())?),
        };
        Ok(Dual { primal, tangent })
    }

    fn scalar(&mut self) -> Result<f64> {
        Ok(match self.u.int_in_range(0..=3)? {
            0 => self.value()?,
            1 => -self.value()?.abs(),
            _ => (self.u.arbitrary::<u8>()? as f64 + 1.0) / 64.0,
        })
    }
}

fn attention(g: &mut Gen) -> Result<()> {
    let [b, h, nq, nk, d, dv] = <[usize; 6]>::try_from(g.dims(6)?).unwrap();
    let q = g.dual(&[b, h, nq, d])?;
    let k = g.dual(&[b, h, nk, d])?;
    let v = g.dual(&[b, h, nk, dv])?;
    let scale = if g.u.arbitrary()? {
        Some(g.scalar()?)
    } else {
        None
    };
    // Padded keys half the time: one count per batch entry, mostly in 1..=Nk, sometimes 0 or past
    // Nk, sometimes one count too few or too many.
    let key_lens: Option<Vec<usize>> = if g.u.arbitrary()? {
        let n = if g.u.ratio(7, 8)? { b } else { g.dim()? };
        let lens = (0..n).map(|_| g.u.int_in_range(0..=nk + 1));
        Some(lens.collect::<Result<_>>()?)
    } else {
        None
    };
    let lens = key_lens.as_deref();
    let o_shape = |q: &Tensor, v: &Tensor| {
        let (qs, vs) = (q.shape(), v.shape());
        vec![qs[0], qs[1], qs[2], vs[3]]
    };
    let fwd = match lens {
        None => ops::attention_forward(&q.primal, &k.primal, &v.primal, scale),
        Some(l) => ops::attention_forward_with_key_lens(&q.primal, &k.primal, &v.primal, scale, l),
    };
    if let Ok(f) = &fwd {
        assert_eq!(f.o.shape(), o_shape(&q.primal, &v.primal));
        assert_eq!(f.lse.shape(), &q.primal.shape()[..3]);
    }
    let jvp = match lens {
        None => ops::attention_jvp(&q, &k, &v, scale),
        Some(l) => ops::attention_jvp_with_key_lens(&q, &k, &v, scale, l),
    };
    if let Ok(j) = jvp {
        assert_eq!(j.o.shape(), o_shape(&q.primal, &v.primal));
        assert_eq!(j.lse.shape(), &q.primal.shape()[..3]);
        j.o.check("fuzz", "o").unwrap();
        j.lse.check("fuzz", "lse").unwrap();
    }
    let go = g.tensor(&[b, h, nq, dv])?;
    // The forward's own o and lse reach the backward's arithmetic; arbitrary ones its checks.
    let (o, lse) = match fwd {
        Ok(f) if g.u.ratio(3, 4)? => (f.o, f.lse),
        _ => (g.tensor(&[b, h, nq, dv])?, g.tensor(&[b, h, nq])?),
    };
    let (qp, kp, vp) = (&q.primal, &k.primal, &v.primal);
    let grads = match lens {
        None => ops::attention_backward(qp, kp, vp, &o, &lse, &go, scale),
        Some(l) => ops::attention_backward_with_key_lens(qp, kp, vp, &o, &lse, &go, scale, l),
    };
    if let Ok(gr) = grads {
        assert_eq!(gr.dq.shape(), q.primal.shape());
        assert_eq!(gr.dk.shape(), k.primal.shape());
        assert_eq!(gr.dv.shape(), v.primal.shape());
    }
    Ok(())
}

/// [C] or [T, C] (or [G, C]) modulation shapes.
fn modulation_shape(g: &mut Gen, t: usize, c: usize) -> Result<Vec<usize>> {
    Ok(match g.u.int_in_range(0..=2)? {
        0 => vec![c],
        1 => vec![t, c],
        _ => vec![g.dim()?, c],
    })
}

fn layernorm_mod(g: &mut Gen) -> Result<()> {
    let (t, c) = (g.dim()?, g.dim()?);
    let x = g.dual(&[t, c])?;
    let s_shape = modulation_shape(g, t, c)?;
    let h_shape = modulation_shape(g, t, c)?;
    let scale = g.dual(&s_shape)?;
    let shift = g.dual(&h_shape)?;
    let eps = if g.u.arbitrary()? {
        ops::DEFAULT_EPS
    } else {
        g.scalar()?
    };
    if let Ok(y) = ops::layernorm_mod_forward(&x.primal, &scale.primal, &shift.primal, eps) {
        assert_eq!(y.shape(), x.primal.shape());
    }
    if let Ok(y) = ops::layernorm_mod_jvp(&x, &scale, &shift, eps) {
        assert_eq!(y.shape(), x.primal.shape());
        y.check("fuzz", "y").unwrap();
    }
    let gy = g.tensor(&[t, c])?;
    if let Ok(gr) = ops::layernorm_mod_backward(&x.primal, &scale.primal, &shift.primal, eps, &gy) {
        assert_eq!(gr.dx.shape(), x.primal.shape());
        assert_eq!(gr.dscale.shape(), scale.primal.shape());
        assert_eq!(gr.dshift.shape(), shift.primal.shape());
    }
    Ok(())
}

fn mlp(g: &mut Gen) -> Result<()> {
    let (t, c, hd) = (g.dim()?, g.dim()?, g.dim()?);
    let x = g.dual(&[t, c])?;
    let (w1, b1) = (g.tensor(&[hd, c])?, g.tensor(&[hd])?);
    let (w2, b2) = (g.tensor(&[c, hd])?, g.tensor(&[c])?);
    let p = ops::Mlp {
        w1: &w1,
        b1: &b1,
        w2: &w2,
        b2: &b2,
    };
    let y_shape = |x: &Tensor| vec![x.shape()[0], w2.shape()[0]];
    if let Ok(y) = ops::mlp_forward(&x.primal, &p) {
        assert_eq!(y.shape(), y_shape(&x.primal));
    }
    if let Ok(y) = ops::mlp_jvp(&x, &p) {
        assert_eq!(y.shape(), y_shape(&x.primal));
        y.check("fuzz", "y").unwrap();
    }
    let gy = g.tensor(&[t, c])?;
    if let Ok(gr) = ops::mlp_backward(&x.primal, &p, &gy) {
        assert_eq!(gr.dx.shape(), x.primal.shape());
        assert_eq!(gr.dw1.shape(), w1.shape());
        assert_eq!(gr.db1.shape(), b1.shape());
        assert_eq!(gr.dw2.shape(), w2.shape());
        assert_eq!(gr.db2.shape(), b2.shape());
    }
    Ok(())
}

fn activations(g: &mut Gen) -> Result<()> {
    let rank = g.u.int_in_range(0..=4)?;
    let shape = g.dims(rank)?;
    let x = g.dual(&shape)?;
    let gy = g.tensor(&shape)?;
    if let Ok(y) = ops::gelu_forward(&x.primal) {
        assert_eq!(y.shape(), x.primal.shape());
    }
    if let Ok(y) = ops::silu_forward(&x.primal) {
        assert_eq!(y.shape(), x.primal.shape());
    }
    if let Ok(y) = ops::gelu_jvp(&x) {
        y.check("fuzz", "gelu").unwrap();
    }
    if let Ok(y) = ops::silu_jvp(&x) {
        y.check("fuzz", "silu").unwrap();
    }
    if let Ok(dx) = ops::gelu_backward(&x.primal, &gy) {
        assert_eq!(dx.shape(), x.primal.shape());
    }
    if let Ok(dx) = ops::silu_backward(&x.primal, &gy) {
        assert_eq!(dx.shape(), x.primal.shape());
    }
    Ok(())
}

fn linear(g: &mut Gen) -> Result<()> {
    let (t, cin, cout) = (g.dim()?, g.dim()?, g.dim()?);
    let x = g.dual(&[t, cin])?;
    let w = g.tensor(&[cout, cin])?;
    let b = if g.u.arbitrary()? {
        Some(g.tensor(&[cout])?)
    } else {
        None
    };
    let _ = ops::linear_forward(&x.primal, &w, b.as_ref());
    if let Ok(y) = ops::linear_jvp(&x, &w, b.as_ref()) {
        y.check("fuzz", "y").unwrap();
    }
    let gy = g.tensor(&[t, cout])?;
    if let Ok(gr) = ops::linear_backward(&x.primal, &w, b.as_ref(), &gy) {
        assert_eq!(gr.dx.shape(), x.primal.shape());
        assert_eq!(gr.dw.shape(), w.shape());
        assert_eq!(gr.db.is_some(), b.is_some());
    }
    Ok(())
}

fn embedding(g: &mut Gen) -> Result<()> {
    let b = g.dim()?;
    let t = g.dual(&[b])?;
    let dim = g.u.int_in_range(0..=33)?;
    let max_period = if g.u.arbitrary()? {
        ops::DEFAULT_MAX_PERIOD
    } else {
        g.scalar()?
    };
    if let Ok(e) = ops::timestep_embedding_forward(&t.primal, dim, max_period) {
        assert_eq!(t.primal.rank(), 1);
        assert_eq!(e.shape(), &[t.primal.shape()[0], dim]);
    }
    if let Ok(e) = ops::timestep_embedding_jvp(&t, dim, max_period) {
        e.check("fuzz", "e").unwrap();
    }
    let ge = g.tensor(&[b, dim])?;
    if let Ok(dt) = ops::timestep_embedding_backward(&t.primal, dim, max_period, &ge) {
        assert_eq!(dt.shape(), t.primal.shape());
    }
    Ok(())
}

fn residual(g: &mut Gen) -> Result<()> {
    let (t, c) = (g.dim()?, g.dim()?);
    let x = g.dual(&[t, c])?;
    let gate_shape = modulation_shape(g, t, c)?;
    let gate = g.dual(&gate_shape)?;
    let y = g.dual(&[t, c])?;
    if let Ok(out) = ops::gated_residual_forward(&x.primal, &gate.primal, &y.primal) {
        assert_eq!(out.shape(), x.primal.shape());
    }
    if let Ok(out) = ops::gated_residual_jvp(&x, &gate, &y) {
        out.check("fuzz", "out").unwrap();
    }
    let gout = g.tensor(&[t, c])?;
    if let Ok(gr) = ops::gated_residual_backward(&gate.primal, &y.primal, &gout) {
        assert_eq!(gr.dgate.shape(), gate.primal.shape());
        assert_eq!(gr.dy.shape(), y.primal.shape());
    }
    Ok(())
}

fn rms_norm(g: &mut Gen) -> Result<()> {
    let (t, c) = (g.dim()?, g.dim()?);
    let x = g.dual(&[t, c])?;
    let w = g.dual(&[c])?;
    let eps = if g.u.arbitrary()? {
        ops::DEFAULT_EPS
    } else {
        g.scalar()?
    };
    if let Ok(y) = ops::rms_norm_forward(&x.primal, &w.primal, eps) {
        assert_eq!(y.shape(), x.primal.shape());
    }
    if let Ok(y) = ops::rms_norm_jvp(&x, &w, eps) {
        assert_eq!(y.shape(), x.primal.shape());
        y.check("fuzz", "y").unwrap();
    }
    let gy = g.tensor(&[t, c])?;
    if let Ok(gr) = ops::rms_norm_backward(&x.primal, &w.primal, eps, &gy) {
        assert_eq!(gr.dx.shape(), x.primal.shape());
        assert_eq!(gr.dweight.shape(), w.primal.shape());
    }
    Ok(())
}

fn rope(g: &mut Gen) -> Result<()> {
    let s = g.dims(4)?;
    let half = s[3] / 2;
    let table = if g.u.arbitrary()? {
        vec![s[0], s[1], half]
    } else {
        vec![s[1], half]
    };
    let x = g.dual(&s)?;
    let cos = g.tensor(&table)?;
    let sin = g.tensor(&table)?;
    let pairs = if g.u.arbitrary()? {
        ops::RopePairs::Interleaved
    } else {
        ops::RopePairs::Halves
    };
    if let Ok(y) = ops::rope_forward(&x.primal, &cos, &sin, pairs) {
        assert_eq!(y.shape(), x.primal.shape());
    }
    if let Ok(y) = ops::rope_jvp(&x, &cos, &sin, pairs) {
        y.check("fuzz", "y").unwrap();
        assert_eq!(y.shape(), x.primal.shape());
    }
    if let Ok(dx) = ops::rope_backward(&x.primal, &cos, &sin, pairs) {
        assert_eq!(dx.shape(), x.primal.shape());
    }
    Ok(())
}
