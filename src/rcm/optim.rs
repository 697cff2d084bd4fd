//! AdamW and an exponential moving average of the parameters, over the DiT's parameter tensors.
//! Optimizer moments are kept in the parameters' dtype (f32 on the CPU) so that they round-trip
//! through safetensors checkpoints unchanged.

use crate::error::{Error, Result};
use crate::tensor::{DType, Element, Tensor};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Linear learning-rate warmup over this many steps (0: none).
    pub warmup: usize,
    /// Cosine decay of the learning rate to `final_lr_ratio`·lr over this many steps (0: constant).
    pub decay_steps: usize,
    pub final_lr_ratio: f64,
}

impl AdamWConfig {
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

pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken so far (bias correction and warmup use it).
    pub step: usize,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
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

    /// One update of `params` by `grads` (same order, shapes and dtype).
    pub fn update(&mut self, params: &mut [Tensor], grads: &[Tensor]) -> Result<()> {
        if grads.len() != params.len() || self.m.len() != params.len() {
            return Err(Error::invalid(
                "adamw",
                format!(
                    "{} parameters, {} gradients, {} moments",
                    params.len(),
                    grads.len(),
                    self.m.len()
                ),
            ));
        }
        self.step += 1;
        let c = self.config;
        let k = Coeffs {
            lr: c.lr_at(self.step),
            b1: c.beta1,
            b2: c.beta2,
            eps: c.eps,
            wd: c.weight_decay,
            bc1: 1.0 - c.beta1.powi(self.step as i32),
            bc2: 1.0 - c.beta2.powi(self.step as i32),
        };
        for (i, p) in params.iter_mut().enumerate() {
            let g = &grads[i];
            if g.shape() != p.shape() || g.dtype() != p.dtype() {
                return Err(Error::invalid(
                    "adamw",
                    format!(
                        "gradient {i} is {:?} {} but its parameter is {:?} {}",
                        g.shape(),
                        g.dtype(),
                        p.shape(),
                        p.dtype()
                    ),
                ));
            }
            match p.dtype() {
                DType::F32 => step_one::<f32>(p, g, &mut self.m[i], &mut self.v[i], &k)?,
                DType::F64 => step_one::<f64>(p, g, &mut self.m[i], &mut self.v[i], &k)?,
                other => {
                    return Err(Error::Unsupported(format!(
                        "adamw: parameters in {other}; train in f32 or f64"
                    )))
                }
            }
        }
        Ok(())
    }
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
    pub decay: f64,
    pub updates: usize,
    pub params: Vec<Tensor>,
}

impl Ema {
    pub fn new(decay: f64, params: &[Tensor]) -> Self {
        Ema {
            decay,
            updates: 0,
            params: params.to_vec(),
        }
    }

    pub fn update(&mut self, params: &[Tensor]) -> Result<()> {
        let n = self.updates as f64;
        let beta = self.decay.min((1.0 + n) / (10.0 + n));
        self.updates += 1;
        for (e, p) in self.params.iter_mut().zip(params) {
            match p.dtype() {
                DType::F32 => ema_one::<f32>(e, p, beta)?,
                DType::F64 => ema_one::<f64>(e, p, beta)?,
                other => return Err(Error::Unsupported(format!("ema: parameters in {other}"))),
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

    #[test]
    fn adamw_minimises_a_quadratic() {
        let mut p = vec![Tensor::from_vec(vec![3.0f32, -2.0], &[2]).unwrap()];
        let mut opt = AdamW::new(
            AdamWConfig {
                lr: 0.05,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
                warmup: 0,
                decay_steps: 0,
                final_lr_ratio: 1.0,
            },
            &p,
        );
        for _ in 0..500 {
            let g: Vec<f32> = p[0].as_slice::<f32>().unwrap().to_vec();
            let g = Tensor::from_vec(g, &[2]).unwrap();
            opt.update(&mut p, &[g]).unwrap();
        }
        assert!(p[0].to_f64_vec().iter().all(|x| x.abs() < 0.05), "{p:?}");
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
