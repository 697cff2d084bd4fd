//! A minimal diffusion transformer (DiT) with three passes: forward, a dual forward that carries
//! tangents on the image and on t (through c_noise, the time embedding and every modulation vector),
//! and a backward through the primal for the parameter gradients. Built on `crate::ops`.
//!
//! Architecture: patchify (conv as a linear over patches) + fixed 2-D sin-cos position embedding;
//! conditioning c = MLP(SiLU)(timestep_embedding(c_noise(t))) + class embedding (index num_classes is
//! the null class for classifier-free guidance); `depth` adaLN-zero blocks (layernorm+modulation,
//! attention, gated residual, layernorm+modulation, GELU MLP, gated residual, the six modulation
//! vectors from Linear(SiLU(c))); a final modulated layernorm + linear; unpatchify.

use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

#[derive(Clone, Debug, PartialEq)]
pub struct DitConfig {
    /// Square image side, e.g. 16.
    pub image_size: usize,
    pub in_channels: usize,
    /// Patch side, e.g. 2 (so 16×16 → 64 tokens).
    pub patch: usize,
    /// Width of the token stream.
    pub hidden: usize,
    pub depth: usize,
    pub heads: usize,
    /// MLP hidden width = mlp_ratio · hidden.
    pub mlp_ratio: usize,
    /// Real classes; index `num_classes` is the null class.
    pub num_classes: usize,
    /// Width of the sinusoidal time embedding before its MLP.
    pub freq_dim: usize,
    /// c_noise(t) = time_scale · t.
    pub time_scale: f64,
}

/// Everything the backward needs from a forward (or the primal of a dual forward).
pub struct DitCache {
    _private: (),
}

/// The network and its parameters, in the canonical order of `Dit::param_layout`.
pub struct Dit {
    pub config: DitConfig,
    params: Vec<Tensor>,
}

fn not_yet() -> Error {
    Error::Unsupported("the DiT is not implemented yet".into())
}

impl Dit {
    /// Names and shapes of every parameter, in canonical order: the one place that knows the layout.
    pub fn param_layout(config: &DitConfig) -> Vec<(String, Vec<usize>)> {
        let _ = config;
        Vec::new()
    }

    /// Fresh parameters (adaLN-zero: modulation and final layers start at zero).
    pub fn new(config: DitConfig, dtype: DType, rng: &mut impl rand::Rng) -> Result<Self> {
        let _ = (dtype, rng);
        Ok(Dit {
            config,
            params: Vec::new(),
        })
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    pub fn params_mut(&mut self) -> &mut [Tensor] {
        &mut self.params
    }

    /// The velocity F(x, t, class): x [B, C, H, W], t [B], class indices (≤ num_classes) → [B, C, H, W].
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
        let _ = (x, t, class);
        Err(not_yet())
    }

    /// The dual forward: tangents on x and t (either may be absent). Its primal is the forward's
    /// output, and its cache serves `backward` exactly as `forward_train`'s does.
    pub fn forward_dual(&self, x: &Dual, t: &Dual, class: &[usize]) -> Result<(Dual, DitCache)> {
        let _ = (x, t, class);
        Err(not_yet())
    }

    /// Parameter gradients (canonical order) given the output cotangent.
    pub fn backward(&self, cache: &DitCache, gout: &Tensor) -> Result<Vec<Tensor>> {
        let _ = (cache, gout);
        Err(not_yet())
    }

    /// Writes the parameters as safetensors (a temporary file, then a rename).
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let _ = path;
        Err(not_yet())
    }

    /// Loads parameters saved by `save`; names, shapes and the config must match.
    pub fn load(config: DitConfig, path: &std::path::Path) -> Result<Self> {
        let _ = (config, path);
        Err(not_yet())
    }
}
