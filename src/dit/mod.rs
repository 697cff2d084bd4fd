//! A minimal diffusion transformer (DiT) with three passes: forward, a dual forward that carries
//! tangents on the image and on t (through c_noise, the time embedding and every modulation vector),
//! and a backward through the primal for the parameter gradients. Built on `crate::ops`.
//!
//! Architecture: patchify (conv as a linear over patches) + fixed 2-D sin-cos position embedding;
//! conditioning c = MLP(SiLU)(timestep_embedding(c_noise(t))) + class embedding (index num_classes is
//! the null class for classifier-free guidance); `depth` adaLN-zero blocks (layernorm+modulation,
//! attention, gated residual, layernorm+modulation, GELU MLP, gated residual, the six modulation
//! vectors from Linear(SiLU(c))); a final modulated layernorm + linear; unpatchify.

#[cfg(feature = "cuda")]
pub mod gpu;
mod layout;
mod pass;
mod shuffle;

pub use pass::DitCache;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};

use rand_distr::{Distribution, StandardNormal};

use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::io::{load_safetensors, save_safetensors};
use crate::tensor::{DType, Tensor};
use layout::Init;

/// The architecture of a [`Dit`]; [`Dit::validate_config`] says which configs are accepted.
#[derive(Clone, Debug, PartialEq)]
pub struct DitConfig {
    /// Square image side, e.g. 16.
    pub image_size: usize,
    /// Image channels C of x [B, C, H, W].
    pub in_channels: usize,
    /// Patch side, e.g. 2 (so 16×16 → 64 tokens).
    pub patch: usize,
    /// Width of the token stream.
    pub hidden: usize,
    /// Number of adaLN-zero blocks (0 allowed: stem and final layer only).
    pub depth: usize,
    /// Attention heads; head dim = hidden / heads.
    pub heads: usize,
    /// MLP hidden width = mlp_ratio · hidden.
    pub mlp_ratio: usize,
    /// Real classes; index `num_classes` is the null class.
    pub num_classes: usize,
    /// Width of the sinusoidal time embedding before its MLP.
    pub freq_dim: usize,
    /// c_noise(t) = time_scale · t; finite with |time_scale| ≤ 1e6.
    pub time_scale: f64,
}

/// The network and its parameters, in the canonical order of `Dit::param_layout`.
#[derive(Clone, Debug)]
pub struct Dit {
    /// The architecture the parameters follow; private, since the position embedding and the
    /// device copy are built from it once (see [`Dit::config`]).
    config: DitConfig,
    params: Vec<Tensor>,
    /// The network dtype (f32 or f64): every parameter and input holds it.
    dtype: DType,
    /// The fixed 2-D sin-cos position embedding [N, hidden], not a parameter.
    pos: Tensor,
    /// Names the current parameter values: fresh on creation and whenever `params_mut` or
    /// `randomize_for_tests` hands them out for change; a clone keeps it (same values). A device
    /// copy of the parameters (see `gpu`) is current while its generation matches.
    generation: u64,
}

/// A process-wide source of parameter generations (never 0).
fn next_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn expect_real(what: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 => Ok(()),
        other => Err(Error::DType {
            op: "dit",
            tensor: what.to_string(),
            expected: "f32 or f64 (the CPU reference computes in these)".into(),
            actual: other,
        }),
    }
}

impl Dit {
    /// The architecture the parameters follow. Read-only: the position embedding is computed from
    /// it at construction, so another configuration means another network.
    pub fn config(&self) -> &DitConfig {
        &self.config
    }

    /// Names and shapes of every parameter, in canonical order: the one place that knows the layout.
    /// Errors as [`Dit::validate_config`] does for a config no network can have (whose shapes
    /// could overflow).
    pub fn param_layout(config: &DitConfig) -> Result<Vec<(String, Vec<usize>)>> {
        layout::validate(config)?;
        Ok(layout::layout(config)
            .into_iter()
            .map(|(name, shape, _)| (name, shape))
            .collect())
    }

    /// Errors unless the config describes a network this module can build (positive sizes within
    /// bounds, image divisible by patch, hidden divisible by heads and by 4, even freq_dim, finite
    /// time_scale with |time_scale| <= 1e6).
    pub fn validate_config(config: &DitConfig) -> Result<()> {
        layout::validate(config)
    }

    /// Fresh parameters (adaLN-zero: modulation and final layers start at zero; other weights
    /// xavier-uniform, biases zero, time-MLP weights and the class table N(0, 0.02²)).
    pub fn new(config: DitConfig, dtype: DType, rng: &mut impl rand::Rng) -> Result<Self> {
        layout::validate(&config)?;
        expect_real("parameters", dtype)?;
        // The bounds of `validate` keep every count finite but not every network allocatable: a
        // config within them can ask for petabytes, an error here rather than an abort. The peak:
        // every parameter in `dtype` plus the largest one as drawn, in f64.
        let layout = layout::layout(&config);
        let sizes: Vec<usize> = layout.iter().map(|(_, s, _)| s.iter().product()).collect();
        let total: usize = sizes.iter().sum();
        let largest = sizes.iter().copied().max().unwrap_or(0);
        let peak_bytes = total
            .saturating_mul(dtype.size_in_bytes())
            .saturating_add(largest.saturating_mul(8));
        let peak = [peak_bytes.div_ceil(8)]; // in f64 elements
        crate::ops::expect_allocatable("dit", "the parameters", &peak, DType::F64, 1)?;
        let params = layout
            .into_iter()
            .map(|(_, shape, init)| {
                let n: usize = shape.iter().product();
                let data: Vec<f64> = match init {
                    Init::Zero => vec![0.0; n],
                    Init::Normal(std) => (0..n)
                        .map(|_| {
                            std * <StandardNormal as Distribution<f64>>::sample(
                                &StandardNormal,
                                rng,
                            )
                        })
                        .collect(),
                    Init::XavierUniform => {
                        let bound = (6.0 / (shape[0] + shape[1]) as f64).sqrt();
                        (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                    }
                };
                Tensor::from_f64_vec(data, &shape, dtype)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::from_params(config, params)
    }

    /// A network over given parameters (canonical order); every shape and dtype must match the
    /// layout, all in one dtype, f32 or f64.
    pub fn from_params(config: DitConfig, params: Vec<Tensor>) -> Result<Self> {
        layout::validate(&config)?;
        let dtype = params.first().map_or(DType::F32, |p| p.dtype());
        expect_real("parameters", dtype)?;
        let tokens = (config.image_size / config.patch).pow(2);
        crate::ops::expect_allocatable(
            "dit",
            "the position embedding",
            &[tokens, config.hidden],
            DType::F64,
            2,
        )?;
        let pos = Tensor::from_f64_vec(
            layout::pos_embed(&config),
            &[(config.image_size / config.patch).pow(2), config.hidden],
            dtype,
        )?;
        let dit = Dit {
            config,
            params,
            dtype,
            pos,
            generation: next_generation(),
        };
        dit.check_params()?;
        Ok(dit)
    }

    /// Errors naming the first parameter whose shape or dtype differs from the layout.
    fn check_params(&self) -> Result<()> {
        let layout = Self::param_layout(&self.config)?;
        if layout.len() != self.params.len() {
            return Err(Error::invalid(
                "dit",
                format!(
                    "{} parameter tensors given, the layout has {}",
                    self.params.len(),
                    layout.len()
                ),
            ));
        }
        for ((name, shape), p) in layout.iter().zip(&self.params) {
            crate::ops::expect_shape("dit", name, p, shape)?;
            crate::ops::expect_dtype("dit", name, p, self.dtype)?;
        }
        Ok(())
    }

    /// Replaces every parameter, zero-initialised ones included, with random values:
    /// matrices N(0, std²/fan_in), vectors N(0, (std/2)²). adaLN-zero makes a fresh network's
    /// output independent of most paths; tests call this so every path is exercised.
    pub fn randomize_for_tests(&mut self, rng: &mut impl rand::Rng, std: f64) -> Result<()> {
        self.generation = next_generation();
        for p in &mut self.params {
            let s = match p.shape() {
                [_, fan_in] => std / (*fan_in as f64).sqrt(),
                _ => std / 2.0,
            };
            let shape = p.shape().to_vec();
            let data: Vec<f64> = (0..p.numel())
                .map(|_| s * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, rng))
                .collect();
            *p = Tensor::from_f64_vec(data, &shape, self.dtype)?;
        }
        Ok(())
    }

    /// The parameters in canonical order (see [`Dit::param_layout`]).
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The parameters to update in place; keep their shapes and dtype (every pass checks them).
    pub fn params_mut(&mut self) -> &mut [Tensor] {
        self.generation = next_generation();
        &mut self.params
    }

    /// The generation of the current parameter values: equal generations mean equal values
    /// (see the field's comment); device copies are keyed by it.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The fixed position embedding [N, hidden] in the network dtype.
    pub fn position_embedding(&self) -> &Tensor {
        &self.pos
    }

    /// The network dtype (of every parameter, input and output).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(Tensor::numel).sum()
    }

    /// The velocity F(x, t, class): x [B, C, H, W], t \[B\], class indices (≤ num_classes) → [B, C, H, W].
    pub fn forward(&self, x: &Tensor, t: &Tensor, class: &[usize]) -> Result<Tensor> {
        self.forward_train(x, t, class).map(|(y, _)| y)
    }

    /// The forward, keeping what the backward needs.
    pub fn forward_train(
        &self,
        x: &Tensor,
        t: &Tensor,
        class: &[usize],
    ) -> Result<(Tensor, DitCache)> {
        // Dual::constant moves; the clones are O(B·C·H·W + B), tiny beside the network.
        let (y, cache) = self.run(
            &Dual::constant(x.clone()),
            &Dual::constant(t.clone()),
            class,
        )?;
        Ok((y.primal, cache))
    }

    /// The dual forward: tangents on x and t (either may be absent). Its primal is the forward's
    /// output, and its cache serves `backward` exactly as `forward_train`'s does.
    pub fn forward_dual(&self, x: &Dual, t: &Dual, class: &[usize]) -> Result<(Dual, DitCache)> {
        self.run(x, t, class)
    }

    /// Parameter gradients (canonical order) given the output cotangent. The cache must come from
    /// a forward of this network at its current [`Dit::generation`] (a clone's forward serves, as
    /// it holds the same values); one of another network, or of parameters changed since through
    /// [`Dit::params_mut`], is an error.
    pub fn backward(&self, cache: &DitCache, gout: &Tensor) -> Result<Vec<Tensor>> {
        self.backward_impl(cache, gout)
    }

    /// Writes the parameters as safetensors (a temporary file, then a rename).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let layout = Self::param_layout(&self.config)?;
        save_safetensors(
            path,
            layout
                .iter()
                .zip(&self.params)
                .map(|((name, _), t)| (name.as_str(), t)),
        )
    }

    /// Loads parameters saved by `save`; names, shapes and the config must match.
    pub fn load(config: DitConfig, path: &std::path::Path) -> Result<Self> {
        let layout = Self::param_layout(&config)?;
        let mut tensors = load_safetensors(path)?;
        let file = path.display().to_string();
        let known: BTreeSet<&str> = layout.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(extra) = tensors.keys().find(|k| !known.contains(k.as_str())) {
            return Err(Error::Format {
                path: file,
                message: format!(
                    "tensor `{extra}` is not a parameter of this DiT config (depth {})",
                    config.depth
                ),
            });
        }
        let mut params = Vec::with_capacity(layout.len());
        let mut dtype = None;
        for (name, shape) in &layout {
            let t = tensors.remove(name).ok_or_else(|| Error::Format {
                path: file.clone(),
                message: format!("missing tensor `{name}` (shape {shape:?})"),
            })?;
            if t.shape() != shape.as_slice() {
                return Err(Error::Format {
                    path: file,
                    message: format!(
                        "tensor `{name}` has shape {:?}, this config expects {shape:?}",
                        t.shape()
                    ),
                });
            }
            let want = *dtype.get_or_insert(t.dtype());
            if t.dtype() != want || expect_real(name, want).is_err() {
                return Err(Error::Format {
                    path: file,
                    message: format!(
                        "tensor `{name}` has dtype {}, expected {} (f32 or f64, one dtype for all)",
                        t.dtype(),
                        want
                    ),
                });
            }
            params.push(t);
        }
        Self::from_params(config, params)
    }
}
