//! Samplers: the few-step consistency sampler every model is evaluated with at 1, 2 and 4 steps,
//! and the teacher's many-step probability-flow ODE solver (EDM's Heun in σ = tan t), the quality
//! reference.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::data::glyph::{self, Metrics, PIXELS};
use crate::dit::Dit;
use crate::error::{Error, Result};

use super::{net, trigflow};

/// The largest sample count [`evaluate`] and [`evaluate_with`] take (2^20: 2 GiB of f64 images).
pub const MAX_SAMPLES: usize = 1 << 20;

/// How a model is sampled.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampler {
    /// x̂₀ = f(x, t_n), then x = cos t_{n+1}·x̂₀ + sin t_{n+1}·ε with fresh noise; `times` starts at
    /// arctan σ_max.
    FewStep {
        /// The times t_n in sampling order, one network evaluation each.
        times: Vec<f64>,
    },
    /// Heun steps on the PF-ODE between σ_max and σ_min (ρ = 7 spacing), then a last step to 0:
    /// 2·steps − 1 network evaluations.
    Heun {
        /// Steps, one from each of `steps` noise levels σ_max … σ_min to the next (the last
        /// to 0).
        steps: usize,
        /// The smallest nonzero noise level.
        sigma_min: f64,
        /// The starting noise level.
        sigma_max: f64,
    },
}

impl Sampler {
    /// Network evaluations per sample (each doubled in batch when guided): 2·steps − 1 for Heun
    /// (the last step is an Euler step), 0 for zero steps (a sampler [`Sampler::check`] refuses).
    pub fn evaluations(&self) -> usize {
        match self {
            Sampler::FewStep { times } => times.len(),
            Sampler::Heun { steps, .. } => steps.saturating_mul(2).saturating_sub(1),
        }
    }

    /// [`Error::Invalid`] for a sampler that would not sample: no few-step times (or more than
    /// [`trigflow::MAX_STEPS`]), a time outside [0, π/2] or not finite; Heun with 0 steps (or more
    /// than [`trigflow::MAX_STEPS`]), or noise levels other than 0 < σ_min < σ_max < ∞. Without
    /// it, zero steps would return the starting noise as if it were a sample.
    pub fn check(&self) -> Result<()> {
        match self {
            Sampler::FewStep { times } => {
                if times.is_empty() || times.len() > trigflow::MAX_STEPS {
                    return Err(Error::invalid(
                        "sampler",
                        format!(
                            "the few-step sampler has {} times; expected 1 to {}",
                            times.len(),
                            trigflow::MAX_STEPS
                        ),
                    ));
                }
                if let Some(t) = times
                    .iter()
                    .find(|t| !(0.0..=std::f64::consts::FRAC_PI_2).contains(*t))
                {
                    return Err(Error::invalid(
                        "sampler",
                        format!("few-step time {t} is not in [0, π/2] (times {times:?})"),
                    ));
                }
                Ok(())
            }
            Sampler::Heun {
                steps,
                sigma_min,
                sigma_max,
            } => trigflow::edm_sigmas(*steps, *sigma_min, *sigma_max, 7.0)
                .map(|_| ())
                .map_err(|e| Error::invalid("sampler", format!("Heun: {e}"))),
        }
    }
}

/// [`Error::Invalid`] unless the denoiser gave one value per input value.
fn expect_len(x0: &[f64], want: usize) -> Result<()> {
    if x0.len() == want {
        Ok(())
    } else {
        Err(Error::invalid(
            "sampler",
            format!(
                "the denoiser returned {} values for {want} inputs",
                x0.len()
            ),
        ))
    }
}

/// A denoiser x̂₀(x_t, t, class) over a batch.
pub type Denoiser<'a> = dyn Fn(&[f64], &[f64], &[usize]) -> Result<Vec<f64>> + Sync + 'a;

/// Samples of `classes` from `model` guided with `w`, starting from noise drawn from `rng`.
pub fn sample(
    model: &Dit,
    w: f64,
    sampler: &Sampler,
    classes: &[usize],
    rng: &mut StdRng,
) -> Result<Vec<f64>> {
    sample_with(
        &|x, t, c| net::denoised(model, x, t, c, w),
        sampler,
        classes,
        rng,
    )
}

/// Samples from any denoiser (a network, or the mixture's exact posterior mean).
/// [`Error::Invalid`] for a sampler [`Sampler::check`] refuses, or a denoiser that returns
/// other than one value per input value.
pub fn sample_with(
    denoise: &Denoiser,
    sampler: &Sampler,
    classes: &[usize],
    rng: &mut StdRng,
) -> Result<Vec<f64>> {
    sampler.check()?;
    let n = classes.len();
    let len = n.checked_mul(PIXELS).ok_or_else(|| {
        Error::invalid(
            "sampler",
            format!("{n} samples of {PIXELS} pixels overflow"),
        )
    })?;
    match sampler {
        Sampler::FewStep { times } => {
            let mut x = trigflow::randn(len, rng);
            for (i, &ti) in times.iter().enumerate() {
                let t = vec![ti; n];
                let x0 = denoise(&x, &t, classes)?;
                expect_len(&x0, len)?;
                match times.get(i + 1) {
                    Some(&tn) => {
                        let eps = trigflow::randn(len, rng);
                        let (c, s) = (vec![tn.cos(); n], vec![tn.sin(); n]);
                        x = trigflow::combine(&c, &x0, &s, &eps, PIXELS)?;
                    }
                    None => x = x0,
                }
            }
            Ok(x)
        }
        Sampler::Heun {
            steps,
            sigma_min,
            sigma_max,
        } => {
            let sigmas = trigflow::edm_sigmas(*steps, *sigma_min, *sigma_max, 7.0)?;
            // EDM variables: x_σ = x_t / cos t with σ = tan t, dx_σ/dσ = (x_σ − D)/σ.
            let t0 = sigma_max.atan();
            let mut x: Vec<f64> = trigflow::randn(len, rng)
                .into_iter()
                .map(|z| z / t0.cos())
                .collect();
            let d_of = |x: &[f64], sigma: f64| -> Result<Vec<f64>> {
                let t = sigma.atan();
                let xt: Vec<f64> = x.iter().map(|v| v * t.cos()).collect();
                let d = denoise(&xt, &vec![t; n], classes)?;
                expect_len(&d, len)?;
                Ok(d)
            };
            for i in 0..*steps {
                let (s, sn) = (sigmas[i], sigmas[i + 1]);
                let d0 = d_of(&x, s)?;
                let slope: Vec<f64> = x.iter().zip(&d0).map(|(a, b)| (a - b) / s).collect();
                let euler: Vec<f64> = x
                    .iter()
                    .zip(&slope)
                    .map(|(a, k)| a + (sn - s) * k)
                    .collect();
                if sn == 0.0 {
                    x = euler;
                    break;
                }
                let d1 = d_of(&euler, sn)?;
                x = x
                    .iter()
                    .zip(&slope)
                    .zip(euler.iter().zip(&d1))
                    .map(|((a, k0), (e, d))| a + (sn - s) * 0.5 * (k0 + (e - d) / sn))
                    .collect();
            }
            Ok(x)
        }
    }
}

/// One evaluated model at one sampler setting.
pub struct Evaluation {
    /// The samples [n, 16, 16], row-major.
    pub images: Vec<f64>,
    /// The requested class of each sample (i mod 10).
    pub classes: Vec<usize>,
    /// The glyph metrics of the samples against their requested classes.
    pub metrics: Metrics,
    /// Wall-clock sampling time (all cores together) per sample, in ms; the metrics excluded.
    pub ms_per_sample: f64,
}

/// `n` samples with requested classes i mod 10 (so every panel of the sample grid reads 0–9),
/// drawn in chunks on all cores, each chunk seeded from `seed` and its index, then measured.
/// [`Error::Invalid`] unless 1 ≤ `n` ≤ [`MAX_SAMPLES`] and [`Sampler::check`] passes.
pub fn evaluate(model: &Dit, w: f64, sampler: &Sampler, n: usize, seed: u64) -> Result<Evaluation> {
    evaluate_with(
        &|x, t, c| net::denoised(model, x, t, c, w),
        sampler,
        n,
        seed,
    )
}

/// `evaluate` for any denoiser (the same errors).
pub fn evaluate_with(
    denoise: &Denoiser,
    sampler: &Sampler,
    n: usize,
    seed: u64,
) -> Result<Evaluation> {
    const CHUNK: usize = 128;
    if n == 0 || n > MAX_SAMPLES {
        return Err(Error::invalid(
            "evaluate",
            format!("{n} samples; expected 1 to {MAX_SAMPLES}"),
        ));
    }
    sampler.check()?;
    let classes: Vec<usize> = (0..n).map(|i| i % glyph::NUM_CLASSES).collect();
    let start = std::time::Instant::now();
    let parts: Vec<Result<Vec<f64>>> = classes
        .par_chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| {
            let mut rng = StdRng::seed_from_u64(super::mix_seed(seed, 0xE7A1, i as u64));
            sample_with(denoise, sampler, c, &mut rng)
        })
        .collect();
    let mut images = Vec::with_capacity(n * PIXELS);
    for p in parts {
        images.extend(p?);
    }
    let ms_per_sample = start.elapsed().as_secs_f64() * 1e3 / n as f64;
    let metrics = glyph::evaluate(&images, Some(&classes))?;
    Ok(Evaluation {
        images,
        classes,
        metrics,
        ms_per_sample,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A denoiser that returns its input: enough to drive the samplers.
    fn identity(x: &[f64], _: &[f64], _: &[usize]) -> Result<Vec<f64>> {
        Ok(x.to_vec())
    }

    #[test]
    fn samplers_that_would_not_sample_are_errors() {
        let mut rng = StdRng::seed_from_u64(0);
        let classes = [0, 1];
        // Both used to return the starting noise as if it were a sample.
        for s in [
            Sampler::FewStep { times: vec![] },
            Sampler::Heun {
                steps: 0,
                sigma_min: 0.002,
                sigma_max: 80.0,
            },
            // A σ_max of 0 divided by zero in the Heun step.
            Sampler::Heun {
                steps: 4,
                sigma_min: 0.002,
                sigma_max: 0.0,
            },
            Sampler::Heun {
                steps: usize::MAX,
                sigma_min: 0.002,
                sigma_max: 80.0,
            },
            Sampler::FewStep {
                times: vec![1.0, f64::NAN],
            },
            Sampler::FewStep { times: vec![5.0] },
        ] {
            assert!(s.check().is_err(), "{s:?}");
            assert!(
                sample_with(&identity, &s, &classes, &mut rng).is_err(),
                "{s:?}"
            );
            assert!(evaluate_with(&identity, &s, 4, 0).is_err(), "{s:?}");
        }
        let heun = Sampler::Heun {
            steps: usize::MAX,
            sigma_min: 0.002,
            sigma_max: 80.0,
        };
        assert_eq!(heun.evaluations(), usize::MAX - 1);
        let ok = Sampler::FewStep { times: vec![1.5] };
        assert_eq!(
            sample_with(&identity, &ok, &classes, &mut rng)
                .unwrap()
                .len(),
            2 * PIXELS
        );
        // Sample counts of 0 (a NaN time per sample) and beyond the cap.
        for n in [0, MAX_SAMPLES + 1, 1 << 61] {
            let e = match evaluate_with(&identity, &ok, n, 0) {
                Ok(_) => panic!("{n} samples were taken"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(&format!("{n} samples")), "{e}");
        }
        // A denoiser that returns the wrong number of values.
        let short = |x: &[f64], _: &[f64], _: &[usize]| -> Result<Vec<f64>> { Ok(x[1..].to_vec()) };
        for s in [
            ok,
            Sampler::Heun {
                steps: 2,
                sigma_min: 0.002,
                sigma_max: 80.0,
            },
        ] {
            let e = sample_with(&short, &s, &classes, &mut rng).unwrap_err();
            assert!(e.to_string().contains("returned"), "{e}");
        }
    }
}
