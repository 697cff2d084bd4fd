//! The parameter layout: names, shapes and canonical order, the one place that knows them.
//! Names follow the reference DiT (facebookresearch/DiT) so checkpoints read alike; the patch
//! embedding is stored as the [hidden, C·p·p] matrix of its convolution.

use super::DitConfig;
use crate::error::{Error, Result};

/// Parameters before the first block.
pub(super) const X_W: usize = 0;
pub(super) const X_B: usize = 1;
pub(super) const T1_W: usize = 2;
pub(super) const T1_B: usize = 3;
pub(super) const T2_W: usize = 4;
pub(super) const T2_B: usize = 5;
pub(super) const Y_TABLE: usize = 6;
const STEM: usize = 7;

/// Offsets inside one block.
pub(super) const ADA_W: usize = 0;
pub(super) const ADA_B: usize = 1;
pub(super) const QKV_W: usize = 2;
pub(super) const QKV_B: usize = 3;
pub(super) const PROJ_W: usize = 4;
pub(super) const PROJ_B: usize = 5;
pub(super) const FC1_W: usize = 6;
pub(super) const FC1_B: usize = 7;
pub(super) const FC2_W: usize = 8;
pub(super) const FC2_B: usize = 9;
pub(super) const PER_BLOCK: usize = 10;

/// Offsets inside the final layer.
pub(super) const F_ADA_W: usize = 0;
pub(super) const F_ADA_B: usize = 1;
pub(super) const F_LIN_W: usize = 2;
pub(super) const F_LIN_B: usize = 3;
const FINAL: usize = 4;

pub(super) fn block_base(i: usize) -> usize {
    STEM + PER_BLOCK * i
}

pub(super) fn final_base(depth: usize) -> usize {
    STEM + PER_BLOCK * depth
}

pub(super) fn param_count(depth: usize) -> usize {
    final_base(depth) + FINAL
}

/// How a parameter starts (adaLN-zero, as in DiT's `initialize_weights`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Init {
    Zero,
    XavierUniform,
    Normal(f64),
}

pub(super) fn layout(c: &DitConfig) -> Vec<(String, Vec<usize>, Init)> {
    let h = c.hidden;
    let patch_dim = c.in_channels * c.patch * c.patch;
    let mlp = c.mlp_ratio * h;
    let mut v = Vec::with_capacity(param_count(c.depth));
    let mut push = |name: String, shape: Vec<usize>, init: Init| v.push((name, shape, init));
    push(
        "x_embedder.proj.weight".into(),
        vec![h, patch_dim],
        Init::XavierUniform,
    );
    push("x_embedder.proj.bias".into(), vec![h], Init::Zero);
    push(
        "t_embedder.mlp.0.weight".into(),
        vec![h, c.freq_dim],
        Init::Normal(0.02),
    );
    push("t_embedder.mlp.0.bias".into(), vec![h], Init::Zero);
    push(
        "t_embedder.mlp.2.weight".into(),
        vec![h, h],
        Init::Normal(0.02),
    );
    push("t_embedder.mlp.2.bias".into(), vec![h], Init::Zero);
    push(
        "y_embedder.embedding_table.weight".into(),
        vec![c.num_classes + 1, h],
        Init::Normal(0.02),
    );
    for i in 0..c.depth {
        let b = format!("blocks.{i}.");
        push(
            format!("{b}adaLN_modulation.1.weight"),
            vec![6 * h, h],
            Init::Zero,
        );
        push(
            format!("{b}adaLN_modulation.1.bias"),
            vec![6 * h],
            Init::Zero,
        );
        push(
            format!("{b}attn.qkv.weight"),
            vec![3 * h, h],
            Init::XavierUniform,
        );
        push(format!("{b}attn.qkv.bias"), vec![3 * h], Init::Zero);
        push(
            format!("{b}attn.proj.weight"),
            vec![h, h],
            Init::XavierUniform,
        );
        push(format!("{b}attn.proj.bias"), vec![h], Init::Zero);
        push(
            format!("{b}mlp.fc1.weight"),
            vec![mlp, h],
            Init::XavierUniform,
        );
        push(format!("{b}mlp.fc1.bias"), vec![mlp], Init::Zero);
        push(
            format!("{b}mlp.fc2.weight"),
            vec![h, mlp],
            Init::XavierUniform,
        );
        push(format!("{b}mlp.fc2.bias"), vec![h], Init::Zero);
    }
    push(
        "final_layer.adaLN_modulation.1.weight".into(),
        vec![2 * h, h],
        Init::Zero,
    );
    push(
        "final_layer.adaLN_modulation.1.bias".into(),
        vec![2 * h],
        Init::Zero,
    );
    push(
        "final_layer.linear.weight".into(),
        vec![patch_dim, h],
        Init::Zero,
    );
    push(
        "final_layer.linear.bias".into(),
        vec![patch_dim],
        Init::Zero,
    );
    v
}

/// The largest |time_scale| a config may hold: c_noise = time_scale·t then stays below 1.6e6 for
/// t in [0, π/2], finite in f32 with a margin of 30 orders of magnitude.
pub(super) const MAX_TIME_SCALE: f64 = 1e6;

/// Errors unless the config describes a network this module can build.
pub(super) fn validate(c: &DitConfig) -> Result<()> {
    let bad = |m: String| Err(Error::invalid("dit", format!("bad config: {m}")));
    if c.image_size == 0 || c.patch == 0 || c.in_channels == 0 {
        return bad(format!(
            "image_size ({}), patch ({}) and in_channels ({}) must be positive",
            c.image_size, c.patch, c.in_channels
        ));
    }
    if c.image_size % c.patch != 0 {
        return bad(format!(
            "image_size {} is not divisible by patch {}",
            c.image_size, c.patch
        ));
    }
    if c.heads == 0 || c.hidden == 0 || c.hidden % c.heads != 0 {
        return bad(format!(
            "hidden {} must be a positive multiple of heads {} (heads > 0)",
            c.hidden, c.heads
        ));
    }
    // The 2-D sin-cos position embedding gives each axis hidden/2 dims, as sin and cos halves.
    if c.hidden % 4 != 0 {
        return bad(format!(
            "hidden {} must be divisible by 4 (2-D sin-cos position embedding)",
            c.hidden
        ));
    }
    if c.mlp_ratio == 0 {
        return bad("mlp_ratio must be positive".into());
    }
    if c.freq_dim == 0 || c.freq_dim % 2 != 0 {
        return bad(format!(
            "freq_dim {} must be positive and even (cos and sin halves)",
            c.freq_dim
        ));
    }
    // c_noise = time_scale·t is computed in the network dtype (f32 on the GPU and for f32
    // networks): bounded so that it stays finite, far from overflow, for every t of the
    // TrigFlow range [0, π/2] (and well beyond).
    if !(c.time_scale.is_finite() && c.time_scale.abs() <= MAX_TIME_SCALE) {
        return bad(format!(
            "time_scale {} must be finite with |time_scale| <= {MAX_TIME_SCALE:e} (c_noise = \
             time_scale·t is computed in f32 on the GPU and for f32 networks)",
            c.time_scale
        ));
    }
    // Bounds far above any DiT, so that every parameter shape, the token count and the parameter
    // total are products that cannot overflow (a config from outside gets an error, not a panic).
    for (name, v, max) in [
        ("image_size", c.image_size, 1 << 16),
        ("in_channels", c.in_channels, 1 << 12),
        ("patch", c.patch, 1 << 10),
        ("hidden", c.hidden, 1 << 16),
        ("depth", c.depth, 1 << 12),
        ("mlp_ratio", c.mlp_ratio, 64),
        ("num_classes", c.num_classes, 1 << 24),
        ("freq_dim", c.freq_dim, 1 << 16),
    ] {
        if v > max {
            return bad(format!("{name} {v} exceeds {max}"));
        }
    }
    Ok(())
}

/// The fixed 2-D sin-cos position embedding [N, hidden] (DiT's `get_2d_sincos_pos_embed`): the
/// first half encodes the token's column, the second its row, each as [sin, cos] of pos·ω_i with
/// ω_i = 10000^(−i/(hidden/4)).
pub(super) fn pos_embed(c: &DitConfig) -> Vec<f64> {
    let g = c.image_size / c.patch;
    let h = c.hidden;
    let q = h / 4;
    let mut out = vec![0.0; g * g * h];
    for gy in 0..g {
        for gx in 0..g {
            let row = &mut out[(gy * g + gx) * h..][..h];
            for (axis, pos) in [(0, gx), (1, gy)] {
                let half = &mut row[axis * 2 * q..][..2 * q];
                for i in 0..q {
                    let omega = 10000f64.powf(-(i as f64) / q as f64);
                    let a = pos as f64 * omega;
                    half[i] = a.sin();
                    half[q + i] = a.cos();
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> DitConfig {
        DitConfig {
            image_size: 8,
            in_channels: 1,
            patch: 2,
            hidden: 16,
            depth: 2,
            heads: 2,
            mlp_ratio: 4,
            num_classes: 10,
            freq_dim: 32,
            time_scale: 1.0,
        }
    }

    #[test]
    fn position_embedding_encodes_column_then_row() {
        let c = config();
        let pe = pos_embed(&c);
        let (h, q, g) = (16, 4, 4);
        assert_eq!(pe.len(), g * g * h);
        // Token (gy 0, gx 0): sin 0 = 0, cos 0 = 1 in both halves.
        let t0 = &pe[..h];
        assert!(t0[..q].iter().chain(&t0[2 * q..3 * q]).all(|&v| v == 0.0));
        assert!(t0[q..2 * q].iter().chain(&t0[3 * q..]).all(|&v| v == 1.0));
        // Token (gy 2, gx 3): first half from the column 3, second from the row 2, ω_1 = 10^-1.
        let t = &pe[(2 * g + 3) * h..][..h];
        assert!((t[1] - (3.0 * 0.1f64).sin()).abs() < 1e-15);
        assert!((t[2 * q + 1] - (2.0 * 0.1f64).sin()).abs() < 1e-15);
        assert!((t[3 * q + 1] - (2.0 * 0.1f64).cos()).abs() < 1e-15);
    }

    #[test]
    fn layout_counts_and_indices_agree() {
        let c = config();
        let l = layout(&c);
        assert_eq!(l.len(), param_count(c.depth));
        assert_eq!(l[Y_TABLE].0, "y_embedder.embedding_table.weight");
        assert_eq!(l[block_base(1) + FC2_B].0, "blocks.1.mlp.fc2.bias");
        assert_eq!(l[final_base(c.depth) + F_LIN_W].1, vec![4, 16]);
        let names: std::collections::BTreeSet<_> = l.iter().map(|e| &e.0).collect();
        assert_eq!(names.len(), l.len(), "names are unique");
    }
}
