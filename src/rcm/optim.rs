//! AdamW and an exponential moving average of the parameters, over the DiT's parameter tensors.
//! Optimizer moments are kept in the parameters' dtype (f32 on the CPU) so that they round-trip
//! through safetensors checkpoints unchanged.

use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Tensor};

/// AdamW's hyperparameters and learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Decay of the first moment (0: no momentum).
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to √v̂ in the denominator.
    pub eps: f64,
    /// Decoupled weight decay: each step subtracts lr·weight_decay·p.
    pub weight_decay: f64,
    /// Linear learning-rate warmup over this many steps (0: none).
    pub warmup: usize,
    /// Cosine decay of the learning rate to `final_lr_ratio`·lr over this many steps (0: constant).
    pub decay_steps: usize,
    /// The learning rate at the end of the decay, as a fraction of `lr`.
    pub final_lr_ratio: f64,
}

impl AdamWConfig {
    /// [`Error::Invalid`] naming `name` (how the caller knows this optimizer, e.g.
    /// `teacher.adam`) and the value, unless: lr, eps, weight_decay and final_lr_ratio are finite,
    /// lr, weight_decay and final_lr_ratio ≥ 0, eps > 0, and both betas in [0, 1) (a beta of 1
    /// makes the bias correction 1 − β^n zero, so every step NaN).
    pub fn validate(&self, name: &str) -> Result<()> {
        let bad = |field: &str, v: f64, want: &str| {
            Err(Error::invalid(
                "adamw",
                format!("{name}.{field} is {v}; it must be {want}"),
            ))
        };
        // Written as `!(in range)` so that NaN fails each test.
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", self.lr, "finite and ≥ 0");
        }
        if !(0.0..1.0).contains(&self.beta1) {
            return bad("beta1", self.beta1, "in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.beta2) {
            return bad("beta2", self.beta2, "in [0, 1)");
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", self.eps, "finite and > 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay, "finite and ≥ 0");
        }
        if !(self.final_lr_ratio.is_finite() && self.final_lr_ratio >= 0.0) {
            return bad("final_lr_ratio", self.final_lr_ratio, "finite and ≥ 0");
        }
        Ok(())
    }

    /// The learning rate of step `step` (counted from 1).
    pub fn lr_at(&self, step: usize) -> f64 {
        let warm = if self.warmup > 0 {
            (step as f64 / self.warmup as f64).min(1.0)
        } else {
            1.0
        };
        let decay = if self.decay_steps > 0 {
            let p = (step as f64 / self.decay_steps as f64).min(1.0);
            let cos = 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
            self.final_lr_ratio + (1.0 - self.final_lr_ratio) * cos
        } else {
            1.0
        };
        self.lr * warm * decay
    }
}

/// AdamW over a list of parameter tensors, with its moments (checkpointed as they are).
pub struct AdamW {
    /// Hyperparameters and schedule.
    pub config: AdamWConfig,
    /// Steps taken so far (bias correction and warmup use it).
    pub step: usize,
    /// First moments, one per parameter (same shape and dtype).
    pub m: Vec<Tensor>,
    /// Second moments, one per parameter (same shape and dtype).
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Zero moments shaped like `params`, step 0.
    pub fn new(config: AdamWConfig, params: &[Tensor]) -> Self {
        let zeros = || {
            params
                .iter()
                .map(|p| Tensor::zeros(p.shape(), p.dtype()))
                .collect()
        };
        AdamW {
            config,
            step: 0,
            m: zeros(),
            v: zeros(),
        }
    }

    /// One update of `params` by `grads` (same order, shapes and dtype). [`Error::Invalid`] when
    /// the counts or a gradient's or moment's shape or dtype differ, the config fails
    /// [`AdamWConfig::validate`] or the step count is at `usize::MAX`, [`Error::Unsupported`] for
    /// parameters other than f32 or f64; after an error nothing has changed (step count included).
    pub fn update(&mut self, params: &mut [Tensor], grads: &[Tensor]) -> Result<()> {
        self.config.validate("adamw")?;
        let step = self.step.checked_add(1).ok_or_else(|| {
            Error::invalid("adamw", format!("step count {} cannot grow", self.step))
        })?;
        let n = params.len();
        if grads.len() != n || self.m.len() != n || self.v.len() != n {
            return Err(Error::invalid(
                "adamw",
                format!(
                    "{n} parameters, {} gradients, {} first and {} second moments",
                    grads.len(),
                    self.m.len(),
                    self.v.len()
                ),
            ));
        }
        // Everything is checked before anything moves: an error leaves the parameters, the
        // moments and the step count as they were.
        for (i, p) in params.iter().enumerate() {
            check_like(
                "adamw",
                p,
                i,
                &[
                    ("gradient", &grads[i]),
                    ("first moment", &self.m[i]),
                    ("second moment", &self.v[i]),
                ],
            )?;
        }
        self.step = step;
        let c = self.config;
        let k = Coeffs {
            lr: c.lr_at(step),
            b1: c.beta1,
            b2: c.beta2,
            eps: c.eps,
            wd: c.weight_decay,
            bc1: 1.0 - power(c.beta1, step),
            bc2: 1.0 - power(c.beta2, step),
        };
        for (i, p) in params.iter_mut().enumerate() {
            let (g, m, v) = (&grads[i], &mut self.m[i], &mut self.v[i]);
            match p.dtype() {
                DType::F32 => step_one::<f32>(p, g, m, v, &k)?,
                _ => step_one::<f64>(p, g, m, v, &k)?,
            }
        }
        Ok(())
    }
}

/// β^n for any step count n ≥ 1: `powi` where n fits an i32 (a plain `as i32` wrapped 2^32 − 1
/// to −1 and 2^32 to 0, making the bias correction 0 and every parameter NaN), else `powf`. For
/// β in [0, 1) the result lies in [0, 1), so 1 − β^n > 0.
fn power(beta: f64, n: usize) -> f64 {
    match i32::try_from(n) {
        Ok(n) => beta.powi(n),
        Err(_) => beta.powf(n as f64),
    }
}

/// Parameter `i` is f32 or f64 and each tensor of `others` has its shape and dtype.
fn check_like(op: &'static str, p: &Tensor, i: usize, others: &[(&str, &Tensor)]) -> Result<()> {
    if !matches!(p.dtype(), DType::F32 | DType::F64) {
        return Err(Error::Unsupported(format!(
            "{op}: parameter {i} is {}; train in f32 or f64",
            p.dtype()
        )));
    }
    for (what, t) in others {
        if t.shape() != p.shape() || t.dtype() != p.dtype() {
            return Err(Error::invalid(
                op,
                format!(
                    "{what} {i} is {:?} {} but its parameter is {:?} {}",
                    t.shape(),
                    t.dtype(),
                    p.shape(),
                    p.dtype()
                ),
            ));
        }
    }
    Ok(())
}

struct Coeffs {
    lr: f64,
    b1: f64,
    b2: f64,
    eps: f64,
    wd: f64,
    bc1: f64,
    bc2: f64,
}

fn step_one<T: Element>(
    p: &mut Tensor,
    g: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    k: &Coeffs,
) -> Result<()> {
    let g = g.as_slice::<T>()?;
    let m = m.as_mut_slice::<T>()?;
    let v = v.as_mut_slice::<T>()?;
    for (j, p) in p.as_mut_slice::<T>()?.iter_mut().enumerate() {
        let gj = g[j].to_f64();
        let mj = k.b1 * m[j].to_f64() + (1.0 - k.b1) * gj;
        let vj = k.b2 * v[j].to_f64() + (1.0 - k.b2) * gj * gj;
        m[j] = T::from_f64(mj);
        v[j] = T::from_f64(vj);
        let pj = p.to_f64();
        let upd = (mj / k.bc1) / ((vj / k.bc2).sqrt() + k.eps);
        *p = T::from_f64(pj - k.lr * (upd + k.wd * pj));
    }
    Ok(())
}

/// An exponential moving average with the usual warmup: β_n = min(decay, (1 + n)/(10 + n)), so the
/// average of a short run is not dominated by its initial weights.
pub struct Ema {
    /// The largest β (the decay once the warmup is over).
    pub decay: f64,
    /// Updates so far (the n of β_n).
    pub updates: usize,
    /// The averaged parameters (same order, shapes and dtypes as the tracked ones).
    pub params: Vec<Tensor>,
}

impl Ema {
    /// An average that starts at a copy of `params`.
    pub fn new(decay: f64, params: &[Tensor]) -> Self {
        Ema {
            decay,
            updates: 0,
            params: params.to_vec(),
        }
    }

    /// Moves the average towards `params`: e ← β_n·e + (1 − β_n)·p. [`Error::Invalid`] when the
    /// count, a shape or a dtype differs from the average's, the decay is not in [0, 1) or the
    /// update count is at `usize::MAX`, [`Error::Unsupported`] for parameters other than f32 or
    /// f64; after an error nothing has changed.
    pub fn update(&mut self, params: &[Tensor]) -> Result<()> {
        if !(0.0..1.0).contains(&self.decay) {
            return Err(Error::invalid(
                "ema",
                format!("decay {} is not in [0, 1)", self.decay),
            ));
        }
        let updates = self.updates.checked_add(1).ok_or_else(|| {
            Error::invalid("ema", format!("update count {} cannot grow", self.updates))
        })?;
        if params.len() != self.params.len() {
            return Err(Error::invalid(
                "ema",
                format!(
                    "{} parameters for an average of {}",
                    params.len(),
                    self.params.len()
                ),
            ));
        }
        for (i, p) in params.iter().enumerate() {
            check_like("ema", p, i, &[("average", &self.params[i])])?;
        }
        let n = self.updates as f64;
        let beta = self.decay.min((1.0 + n) / (10.0 + n));
        self.updates = updates;
        for (e, p) in self.params.iter_mut().zip(params) {
            match p.dtype() {
                DType::F32 => ema_one::<f32>(e, p, beta)?,
                _ => ema_one::<f64>(e, p, beta)?,
            }
        }
        Ok(())
    }
}

fn ema_one<T: Element>(e: &mut Tensor, p: &Tensor, beta: f64) -> Result<()> {
    let p = p.as_slice::<T>()?;
    for (e, &p) in e.as_mut_slice::<T>()?.iter_mut().zip(p) {
        *e = T::from_f64(beta * e.to_f64() + (1.0 - beta) * p.to_f64());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adam with the usual betas, no weight decay and a constant learning rate.
    fn plain(lr: f64) -> AdamWConfig {
        AdamWConfig {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            warmup: 0,
            decay_steps: 0,
            final_lr_ratio: 1.0,
        }
    }

    #[test]
    fn mismatched_updates_are_errors_that_change_nothing() {
        let p0 = vec![
            Tensor::from_vec(vec![1.0f32, 2.0], &[2]).unwrap(),
            Tensor::from_vec(vec![3.0f32; 3], &[3]).unwrap(),
        ];
        let mut opt = AdamW::new(plain(0.1), &p0);
        let mut p = p0.clone();
        // The second gradient has the wrong shape: the first parameter must not move either.
        let bad = vec![
            Tensor::from_vec(vec![0.5f32, 0.5], &[2]).unwrap(),
            Tensor::from_vec(vec![0.5f32; 2], &[2]).unwrap(),
        ];
        let e = opt.update(&mut p, &bad).unwrap_err();
        assert!(e.to_string().contains("gradient 1"), "{e}");
        assert_eq!((p.as_slice(), opt.step), (p0.as_slice(), 0));
        // Moments that do not match (as from another network's checkpoint) are named too.
        opt.v.pop();
        let e = opt.update(&mut p, &p0).unwrap_err();
        assert!(e.to_string().contains("1 second moments"), "{e}");
        let mut ema = Ema::new(0.99, &p0);
        assert!(ema.update(&p0[..1]).is_err());
        assert!(ema.update(&[p0[1].clone(), p0[0].clone()]).is_err());
        assert_eq!((ema.params.as_slice(), ema.updates), (p0.as_slice(), 0));
        let f64s: Vec<Tensor> = p0.iter().map(|t| t.to_dtype(DType::F64)).collect();
        assert!(ema.update(&f64s).is_err());
    }

    #[test]
    fn adamw_minimises_a_quadratic() {
        let mut p = vec![Tensor::from_vec(vec![3.0f32, -2.0], &[2]).unwrap()];
        let mut opt = AdamW::new(plain(0.05), &p);
        for _ in 0..500 {
            let g: Vec<f32> = p[0].as_slice::<f32>().unwrap().to_vec();
            let g = Tensor::from_vec(g, &[2]).unwrap();
            opt.update(&mut p, &[g]).unwrap();
        }
        assert!(p[0].to_f64_vec().iter().all(|x| x.abs() < 0.05), "{p:?}");
    }

    #[test]
    fn any_step_count_gives_finite_updates() {
        // 2^32 − 1 and 2^32 used to become −1 and 0 under `as i32`: a bias correction of 0 (or
        // below) and NaN parameters, here as from a checkpoint's counters.
        for step in [
            i32::MAX as usize - 1,
            i32::MAX as usize,
            u32::MAX as usize - 1,
            u32::MAX as usize,
        ] {
            let mut p = vec![Tensor::from_vec(vec![1.0f32, -1.0], &[2]).unwrap()];
            let mut opt = AdamW::new(plain(0.01), &p);
            opt.step = step;
            let g = vec![Tensor::from_vec(vec![0.5f32, 0.5], &[2]).unwrap()];
            opt.update(&mut p, &g).unwrap();
            assert!(
                p[0].to_f64_vec().iter().all(|x| x.is_finite()),
                "step {step}: {p:?}"
            );
            assert_eq!(opt.step, step + 1);
        }
        // The last count cannot grow: an error, nothing moved.
        let p0 = vec![Tensor::from_vec(vec![1.0f32], &[1]).unwrap()];
        let mut p = p0.clone();
        let mut opt = AdamW::new(plain(0.01), &p);
        opt.step = usize::MAX;
        assert!(opt.update(&mut p, &p0).is_err());
        assert_eq!((p.as_slice(), opt.step), (p0.as_slice(), usize::MAX));
        let mut ema = Ema::new(0.9, &p0);
        ema.updates = usize::MAX;
        assert!(ema.update(&p0).is_err());
        assert_eq!(ema.updates, usize::MAX);
    }

    #[test]
    fn bad_hyperparameters_are_errors() {
        assert!(plain(1e-3).validate("teacher.adam").is_ok());
        type Edit = fn(&mut AdamWConfig);
        let cases: [(&str, Edit); 8] = [
            ("lr", |c| c.lr = f64::NAN),
            ("lr", |c| c.lr = -1.0),
            ("beta1", |c| c.beta1 = 1.0),
            ("beta2", |c| c.beta2 = f64::NAN),
            ("eps", |c| c.eps = 0.0),
            ("weight_decay", |c| c.weight_decay = f64::INFINITY),
            ("final_lr_ratio", |c| c.final_lr_ratio = -0.5),
            ("beta1", |c| c.beta1 = -0.1),
        ];
        for (field, f) in cases {
            let mut c = plain(1e-3);
            f(&mut c);
            let e = c.validate("student.adam").unwrap_err().to_string();
            assert!(e.contains(&format!("student.adam.{field}")), "{e}");
            // The optimizer refuses to step with it, leaving everything as it was.
            let p0 = vec![Tensor::from_vec(vec![1.0f32], &[1]).unwrap()];
            let mut p = p0.clone();
            let mut opt = AdamW::new(c, &p);
            assert!(opt.update(&mut p, &p0).is_err());
            assert_eq!((p.as_slice(), opt.step), (p0.as_slice(), 0));
        }
        let p0 = vec![Tensor::from_vec(vec![1.0f32], &[1]).unwrap()];
        for decay in [1.0, -0.5, f64::NAN] {
            let mut ema = Ema::new(decay, &p0);
            assert!(ema.update(&p0).is_err(), "decay {decay}");
        }
    }

    #[test]
    fn ema_follows_with_warmup() {
        let p = vec![Tensor::from_vec(vec![0.0f64], &[1]).unwrap()];
        let mut e = Ema::new(0.99, &p);
        let one = vec![Tensor::from_vec(vec![1.0f64], &[1]).unwrap()];
        e.update(&one).unwrap();
        // β_0 = 0.1: the first update moves 90 % of the way.
        assert!((e.params[0].to_f64_vec()[0] - 0.9).abs() < 1e-12);
    }
}
