//! The TrigFlow wrapper (σ_d = 1) in f64: x_t = cos t·x₀ + sin t·z, the network F predicts the
//! velocity dx_t/dt = cos t·z − sin t·x₀, the denoiser is f = cos t·x_t − sin t·F. With σ_d = 1,
//! tan t is the EDM noise level σ, so t = arctan σ.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

/// The largest step count the schedules build ([`few_step_times`], [`edm_sigmas`]) and the
/// samplers take: far above any useful sampler, small enough that the schedules, their
/// evaluation counts and their allocations cannot overflow.
pub const MAX_STEPS: usize = 1_000_000;

/// Per-sample scalars broadcast over `dim` values: out[i·dim + k] = a\[i\]·x[i·dim + k] + b\[i\]·y[..].
/// [`Error::Invalid`] unless `dim > 0`, `x` and `y` hold `a.len()·dim` values and `b` as many
/// scalars as `a`.
pub fn combine(a: &[f64], x: &[f64], b: &[f64], y: &[f64], dim: usize) -> Result<Vec<f64>> {
    let want = a.len().checked_mul(dim);
    if dim == 0 || b.len() != a.len() || want != Some(x.len()) || y.len() != x.len() {
        return Err(Error::invalid(
            "trigflow",
            format!(
                "combine: {} and {} scalars over {} and {} values of dim {dim}; expected equal \
                 scalar counts, dim > 0 and scalars·dim values in each",
                a.len(),
                b.len(),
                x.len(),
                y.len()
            ),
        ));
    }
    Ok(x.chunks_exact(dim)
        .zip(y.chunks_exact(dim))
        .enumerate()
        .flat_map(|(i, (xs, ys))| {
            let (ai, bi) = (a[i], b[i]);
            xs.iter().zip(ys).map(move |(p, q)| ai * p + bi * q)
        })
        .collect())
}

/// x_t = cos t·x₀ + sin t·z ([`Error::Invalid`] on mismatched lengths, as [`combine`]).
pub fn noisy(x0: &[f64], z: &[f64], t: &[f64], dim: usize) -> Result<Vec<f64>> {
    let (c, s) = cos_sin(t);
    combine(&c, x0, &s, z, dim)
}

/// The flow-matching target v = cos t·z − sin t·x₀ ([`Error::Invalid`] on mismatched lengths).
pub fn velocity_target(x0: &[f64], z: &[f64], t: &[f64], dim: usize) -> Result<Vec<f64>> {
    let (c, s) = cos_sin(t);
    let ms: Vec<f64> = s.iter().map(|v| -v).collect();
    combine(&c, z, &ms, x0, dim)
}

/// The denoiser f = cos t·x_t − sin t·F ([`Error::Invalid`] on mismatched lengths).
pub fn denoise(x: &[f64], f: &[f64], t: &[f64], dim: usize) -> Result<Vec<f64>> {
    let (c, s) = cos_sin(t);
    let ms: Vec<f64> = s.iter().map(|v| -v).collect();
    combine(&c, x, &ms, f, dim)
}

/// (cos t, sin t) per time.
pub fn cos_sin(t: &[f64]) -> (Vec<f64>, Vec<f64>) {
    (
        t.iter().map(|v| v.cos()).collect(),
        t.iter().map(|v| v.sin()).collect(),
    )
}

/// Classifier-free guidance F_u + w·(F_c − F_u) (w = 1: the conditional model alone);
/// [`Error::Invalid`] when the two branches differ in length.
pub fn guide(cond: &[f64], uncond: &[f64], w: f64) -> Result<Vec<f64>> {
    if cond.len() != uncond.len() {
        return Err(Error::invalid(
            "trigflow",
            format!(
                "guide: {} conditional and {} unconditional values",
                cond.len(),
                uncond.len()
            ),
        ));
    }
    Ok(cond
        .iter()
        .zip(uncond)
        .map(|(c, u)| u + w * (c - u))
        .collect())
}

/// Training times with log tan t ~ N(p_mean, p_std²), i.e. log σ normal as in EDM.
pub fn sample_t_lognormal(n: usize, p_mean: f64, p_std: f64, rng: &mut impl Rng) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let e: f64 = StandardNormal.sample(rng);
            (p_mean + p_std * e).exp().atan()
        })
        .collect()
}

/// DMD re-noising times (the rectified-flow time s ∈ (0, 1) shifted towards noise by `shift`,
/// then t = arctan(s/(1 − s)) because s/(1−s) is the EDM σ of rectified-flow time s).
pub fn sample_t_shifted(n: usize, shift: f64, rng: &mut impl Rng) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let u: f64 = rng.random_range(1e-4..1.0 - 1e-4);
            let s = shift * u / (1.0 + (shift - 1.0) * u);
            (s / (1.0 - s)).atan()
        })
        .collect()
}

/// `n` standard normal values.
pub fn randn(n: usize, rng: &mut impl Rng) -> Vec<f64> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

/// Times of the few-step sampler: t₁ = arctan σ_max, then `mid` (exactly one fewer than the
/// steps). [`Error::Invalid`] unless 1 ≤ `steps` ≤ [`MAX_STEPS`], σ_max is finite and positive,
/// `mid` holds `steps − 1` times, and the times decrease strictly from t₁ and stay above 0 (the
/// sampler re-noises to each in turn, so each must lie below the one before).
pub fn few_step_times(steps: usize, sigma_max: f64, mid: &[f64]) -> Result<Vec<f64>> {
    let bad = |m: String| Err(Error::invalid("few-step times", m));
    if steps == 0 || steps > MAX_STEPS {
        return bad(format!("{steps} steps; expected 1 to {MAX_STEPS}"));
    }
    if !(sigma_max.is_finite() && sigma_max > 0.0) {
        return bad(format!("sigma_max {sigma_max} must be finite and positive"));
    }
    if mid.len() != steps - 1 {
        return bad(format!(
            "{steps} steps need {} intermediate times, {} given ({mid:?})",
            steps - 1,
            mid.len()
        ));
    }
    let mut t = Vec::with_capacity(steps);
    t.push(sigma_max.atan());
    for &m in mid {
        let prev = t[t.len() - 1];
        // `!(..)` so that NaN fails too.
        if !(m > 0.0 && m < prev) {
            return bad(format!(
                "intermediate time {m} must lie in (0, {prev}): the times {mid:?} must decrease \
                 from arctan(sigma_max) = {} and stay above 0",
                sigma_max.atan()
            ));
        }
        t.push(m);
    }
    Ok(t)
}

/// EDM's noise levels σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N, then 0.
/// [`Error::Invalid`] unless 1 ≤ `steps` ≤ [`MAX_STEPS`], 0 < σ_min < σ_max (finite) and ρ is
/// finite and positive.
pub fn edm_sigmas(steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Result<Vec<f64>> {
    let bad = |m: String| Err(Error::invalid("edm sigmas", m));
    if steps == 0 || steps > MAX_STEPS {
        return bad(format!("{steps} steps; expected 1 to {MAX_STEPS}"));
    }
    if !(sigma_min > 0.0 && sigma_min < sigma_max && sigma_max.is_finite()) {
        return bad(format!(
            "sigma_min {sigma_min} and sigma_max {sigma_max} must satisfy 0 < sigma_min < \
             sigma_max < inf"
        ));
    }
    if !(rho.is_finite() && rho > 0.0) {
        return bad(format!("rho {rho} must be finite and positive"));
    }
    let (a, b) = (sigma_max.powf(1.0 / rho), sigma_min.powf(1.0 / rho));
    let mut s: Vec<f64> = (0..steps)
        .map(|i| {
            let f = if steps > 1 {
                i as f64 / (steps - 1) as f64
            } else {
                0.0
            };
            (a + f * (b - a)).powf(rho)
        })
        .collect();
    s.push(0.0);
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denoiser_recovers_x0_from_the_exact_velocity() {
        let x0 = [0.3, -0.8, 0.8, 0.1];
        let z = [1.2, -0.4, 0.05, 2.0];
        let t = [0.2, 1.3];
        let xt = noisy(&x0, &z, &t, 2).unwrap();
        let v = velocity_target(&x0, &z, &t, 2).unwrap();
        let f = denoise(&xt, &v, &t, 2).unwrap();
        for (a, b) in f.iter().zip(&x0) {
            assert!((a - b).abs() < 1e-12);
        }
        // v is the time derivative of x_t.
        let h = 1e-6;
        let tp: Vec<f64> = t.iter().map(|v| v + h).collect();
        let tm: Vec<f64> = t.iter().map(|v| v - h).collect();
        let (p, m) = (
            noisy(&x0, &z, &tp, 2).unwrap(),
            noisy(&x0, &z, &tm, 2).unwrap(),
        );
        for i in 0..4 {
            assert!(((p[i] - m[i]) / (2.0 * h) - v[i]).abs() < 1e-8);
        }
    }

    #[test]
    fn schedules_are_ordered() {
        let s = edm_sigmas(5, 0.002, 80.0, 7.0).unwrap();
        assert!((s[0] - 80.0).abs() < 1e-9 && (s[4] - 0.002).abs() < 1e-12 && s[5] == 0.0);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
        let t = few_step_times(4, 80.0, &[1.3, 1.0, 0.6]).unwrap();
        assert_eq!(t.len(), 4);
        assert!(t.windows(2).all(|w| w[0] > w[1]));
        assert_eq!(few_step_times(1, 80.0, &[]).unwrap(), vec![80f64.atan()]);
    }

    #[test]
    fn bad_schedules_are_errors() {
        // Zero steps used to underflow `steps - 1`; too few times used to panic on the slice.
        let e = few_step_times(0, 80.0, &[]).unwrap_err().to_string();
        assert!(e.contains("0 steps"), "{e}");
        let e = few_step_times(3, 80.0, &[1.0]).unwrap_err().to_string();
        assert!(e.contains("2 intermediate times, 1 given"), "{e}");
        assert!(few_step_times(2, 80.0, &[1.0, 0.5]).is_err());
        // Times beyond π/2, equal, rising, zero or NaN, and a σ_max that is not a noise level.
        for mid in [
            [5.0, 5.0, 5.0],
            [1.0, 1.0, 0.5],
            [0.5, 1.0, 0.2],
            [1.0, 0.5, 0.0],
        ] {
            let e = few_step_times(4, 80.0, &mid).unwrap_err().to_string();
            assert!(e.contains("must decrease"), "{mid:?}: {e}");
        }
        assert!(few_step_times(2, 80.0, &[f64::NAN]).is_err());
        // arctan(0.5) ≈ 0.46: a later time of 1.0 would re-noise above the start.
        assert!(few_step_times(2, 0.5, &[1.0]).is_err());
        for s in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(few_step_times(1, s, &[]).is_err(), "sigma_max {s}");
        }
        // An ODE step count that used to overflow the schedule's allocation.
        let e = edm_sigmas(usize::MAX, 0.002, 80.0, 7.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&usize::MAX.to_string()), "{e}");
        assert!(edm_sigmas(0, 0.002, 80.0, 7.0).is_err());
        assert!(edm_sigmas(4, 0.002, 0.0, 7.0).is_err());
        assert!(edm_sigmas(4, 80.0, 80.0, 7.0).is_err());
        assert!(edm_sigmas(4, 0.002, 80.0, 0.0).is_err());
        assert!(edm_sigmas(4, f64::NAN, 80.0, 7.0).is_err());
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(
            combine(&[1.0, 2.0], &x, &[0.0, 1.0], &x, 2).unwrap(),
            vec![1.0, 2.0, 9.0, 12.0]
        );
        // Three values for two samples of dim 2, one scalar short, and dim 0 (which used to
        // panic in chunks_exact).
        assert!(combine(&[1.0, 2.0], &x[..3], &[0.0, 1.0], &x[..3], 2).is_err());
        assert!(combine(&[1.0, 2.0], &x, &[0.0], &x, 2).is_err());
        assert!(combine(&[1.0, 2.0], &x, &[0.0, 1.0], &x[..2], 2).is_err());
        assert!(combine(&[], &[], &[], &[], 0).is_err());
        assert!(noisy(&x, &x, &[0.1], 2).is_err());
        assert!(guide(&x, &x[..3], 2.0).is_err());
    }
}
