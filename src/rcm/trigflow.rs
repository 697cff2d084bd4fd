//! The TrigFlow wrapper (σ_d = 1) in f64: x_t = cos t·x₀ + sin t·z, the network F predicts the
//! velocity dx_t/dt = cos t·z − sin t·x₀, the denoiser is f = cos t·x_t − sin t·F. With σ_d = 1,
//! tan t is the EDM noise level σ, so t = arctan σ.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// Per-sample scalars broadcast over `dim` values: out[i·dim + k] = a\[i\]·x[i·dim + k] + b\[i\]·y[..].
pub fn combine(a: &[f64], x: &[f64], b: &[f64], y: &[f64], dim: usize) -> Vec<f64> {
    debug_assert_eq!(x.len(), a.len() * dim);
    debug_assert_eq!(y.len(), x.len());
    x.chunks_exact(dim)
        .zip(y.chunks_exact(dim))
        .enumerate()
        .flat_map(|(i, (xs, ys))| {
            let (ai, bi) = (a[i], b[i]);
            xs.iter().zip(ys).map(move |(p, q)| ai * p + bi * q)
        })
        .collect()
}

/// x_t = cos t·x₀ + sin t·z.
pub fn noisy(x0: &[f64], z: &[f64], t: &[f64], dim: usize) -> Vec<f64> {
    let (c, s) = cos_sin(t);
    combine(&c, x0, &s, z, dim)
}

/// The flow-matching target v = cos t·z − sin t·x₀.
pub fn velocity_target(x0: &[f64], z: &[f64], t: &[f64], dim: usize) -> Vec<f64> {
    let (c, s) = cos_sin(t);
    let ms: Vec<f64> = s.iter().map(|v| -v).collect();
    combine(&c, z, &ms, x0, dim)
}

/// The denoiser f = cos t·x_t − sin t·F.
pub fn denoise(x: &[f64], f: &[f64], t: &[f64], dim: usize) -> Vec<f64> {
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

/// Classifier-free guidance F_u + w·(F_c − F_u) (w = 1: the conditional model alone).
pub fn guide(cond: &[f64], uncond: &[f64], w: f64) -> Vec<f64> {
    cond.iter()
        .zip(uncond)
        .map(|(c, u)| u + w * (c - u))
        .collect()
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

/// Times of the few-step sampler: t₁ = arctan σ_max, then `mid` (one fewer than the steps).
pub fn few_step_times(steps: usize, sigma_max: f64, mid: &[f64]) -> Vec<f64> {
    let mut t = vec![sigma_max.atan()];
    t.extend_from_slice(&mid[..steps - 1]);
    t
}

/// EDM's noise levels σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i < N, then 0.
pub fn edm_sigmas(steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
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
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denoiser_recovers_x0_from_the_exact_velocity() {
        let x0 = [0.3, -0.8, 0.8, 0.1];
        let z = [1.2, -0.4, 0.05, 2.0];
        let t = [0.2, 1.3];
        let xt = noisy(&x0, &z, &t, 2);
        let v = velocity_target(&x0, &z, &t, 2);
        let f = denoise(&xt, &v, &t, 2);
        for (a, b) in f.iter().zip(&x0) {
            assert!((a - b).abs() < 1e-12);
        }
        // v is the time derivative of x_t.
        let h = 1e-6;
        let tp: Vec<f64> = t.iter().map(|v| v + h).collect();
        let tm: Vec<f64> = t.iter().map(|v| v - h).collect();
        let (p, m) = (noisy(&x0, &z, &tp, 2), noisy(&x0, &z, &tm, 2));
        for i in 0..4 {
            assert!(((p[i] - m[i]) / (2.0 * h) - v[i]).abs() < 1e-8);
        }
    }

    #[test]
    fn schedules_are_ordered() {
        let s = edm_sigmas(5, 0.002, 80.0, 7.0);
        assert!((s[0] - 80.0).abs() < 1e-9 && (s[4] - 0.002).abs() < 1e-12 && s[5] == 0.0);
        assert!(s.windows(2).all(|w| w[0] > w[1]));
        let t = few_step_times(4, 80.0, &[1.3, 1.0, 0.6]);
        assert_eq!(t.len(), 4);
        assert!(t.windows(2).all(|w| w[0] > w[1]));
    }
}
