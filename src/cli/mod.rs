//! The logic of the `flashjvp` command (DESIGN.md section 8), kept in the library so that the
//! fuzz target drives the very dispatch the CLI uses on parsed bytes, without files: choose the
//! computation dtype, gather the op's tensors from a [`TensorMap`] by name, run the JVP or the
//! VJP, and name the outputs.
//!
//! Tangent tensors (`tq`, `tk`, `tv`; `tx`, `tscale`, `tshift`; `tx`) are optional and absent
//! means zero; attention with no `tk` and `tv` takes the op's fast path for constant K and V, and
//! with a `key_lens` vector attends, per batch entry b, to its first key_lens\[b\] keys only.
//! Tensors an op does not use are ignored, so one file can feed both `jvp` and `vjp`.

use crate::device::Device;
use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::io::TensorMap;
use crate::ops;
use crate::tensor::{DType, Tensor};

/// Forward mode (primal and tangent outputs) or reverse mode (gradients of the inputs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The outputs and their tangents.
    Jvp,
    /// The gradients of the inputs from the outputs' cotangents.
    Vjp,
}

impl Mode {
    /// Both modes, in the order the CLI lists them.
    pub const ALL: [Mode; 2] = [Mode::Jvp, Mode::Vjp];

    /// The mode's name on the command line (`jvp`, `vjp`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Jvp => "jvp",
            Mode::Vjp => "vjp",
        }
    }
}

/// The ops the command line exposes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OpKind {
    /// Softmax attention: q, k, v [B, H, N, d] (tangents tq, tk, tv).
    Attention,
    /// Layernorm with adaLN modulation: x [T, C], scale and shift \[C\] or [G, C] (G groups of rows).
    #[value(name = "layernorm_mod")]
    LayerNormMod,
    /// The GELU MLP: x [T, C], w1 [Hd, C], b1 \[Hd\], w2 [C, Hd], b2 \[C\].
    Mlp,
    /// RMSNorm with a weight: x [T, C], w \[C\].
    #[value(name = "rms_norm")]
    RmsNorm,
    /// Rotary position embeddings: x [B, N, H, d], cos and sin [N, d/2] or [B, N, d/2].
    Rope,
}

impl OpKind {
    /// Every op, in the order the CLI lists them.
    pub const ALL: [OpKind; 5] = [
        OpKind::Attention,
        OpKind::LayerNormMod,
        OpKind::Mlp,
        OpKind::RmsNorm,
        OpKind::Rope,
    ];

    /// The op's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Attention => "attention",
            OpKind::LayerNormMod => "layernorm_mod",
            OpKind::Mlp => "mlp",
            OpKind::RmsNorm => "rms_norm",
            OpKind::Rope => "rope",
        }
    }

    /// The op named `s` (as [`OpKind::name`] spells it); an unknown name is an error listing them.
    pub fn parse(s: &str) -> Result<Self> {
        OpKind::ALL
            .into_iter()
            .find(|op| op.name() == s)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "unknown op `{s}`: expected attention, layernorm_mod, mlp, rms_norm or rope"
                ))
            })
    }

    /// The input whose dtype is the default computation dtype (rope's backward does not read x).
    pub fn first_input(self, mode: Mode) -> &'static str {
        match (self, mode) {
            (OpKind::Attention, _) => "q",
            (OpKind::Rope, Mode::Vjp) => "gy",
            _ => "x",
        }
    }

    /// The names of the output tensors, in the order the contract lists them.
    pub fn outputs(self, mode: Mode) -> &'static [&'static str] {
        match (self, mode) {
            (OpKind::Attention, Mode::Jvp) => &["o", "to", "lse", "tlse"],
            (OpKind::Attention, Mode::Vjp) => &["dq", "dk", "dv"],
            (OpKind::LayerNormMod, Mode::Jvp) | (OpKind::Mlp, Mode::Jvp) => &["y", "ty"],
            (OpKind::LayerNormMod, Mode::Vjp) => &["dx", "dscale", "dshift"],
            (OpKind::Mlp, Mode::Vjp) => &["dx", "dw1", "db1", "dw2", "db2"],
            (OpKind::RmsNorm | OpKind::Rope, Mode::Jvp) => &["y", "ty"],
            (OpKind::RmsNorm, Mode::Vjp) => &["dx", "dw"],
            (OpKind::Rope, Mode::Vjp) => &["dx"],
        }
    }
}

/// The dtype the op computes in: `requested` if given, else the dtype of the op's first input.
/// The CPU reference computes in f32 or f64, so bf16 and f16 inputs compute in f32 there, and
/// asking the CPU for bf16 is an error. The GPU computes in bf16, f16 or f32: f64 inputs compute
/// in f32 there, and asking the GPU for f64 is an error.
pub fn computation_dtype(requested: Option<DType>, first: DType, device: Device) -> Result<DType> {
    match (device, requested) {
        (Device::Cpu, Some(d @ (DType::BF16 | DType::F16))) => Err(Error::Unsupported(format!(
            "--dtype {d}: the CPU computes in f32/f64; use --dtype f32 or f64 (bf16 and f16 \
             inputs are converted)"
        ))),
        (Device::Cpu, Some(d)) => Ok(d),
        (Device::Cpu, None) => Ok(match first {
            DType::F64 => DType::F64,
            DType::F32 | DType::BF16 | DType::F16 => DType::F32,
        }),
        (Device::Cuda, Some(DType::F64)) => Err(Error::Unsupported(
            "--dtype f64: the GPU computes in bf16, f16 or f32 (use --device cpu for f64)".into(),
        )),
        (Device::Cuda, Some(d)) => Ok(d),
        (Device::Cuda, None) => Ok(match first {
            DType::F64 | DType::F32 => DType::F32,
            d @ (DType::BF16 | DType::F16) => d,
        }),
    }
}

/// The CUDA ops, or in a build without the `cuda` feature stand-ins that say so.
#[cfg(feature = "cuda")]
use crate::cuda::ops as gpu;

#[cfg(not(feature = "cuda"))]
mod gpu {
    use crate::device::cuda_not_built;
    use crate::dual::Dual;
    use crate::error::Result;
    use crate::ops::{
        AttentionGrads, AttentionJvp, AttentionOutput, LayerNormModGrads, Mlp, MlpGrads,
        RmsNormGrads, RopePairs,
    };
    use crate::tensor::{DType, Tensor};

    pub fn attention_jvp(
        _: &Dual,
        _: &Dual,
        _: &Dual,
        _: Option<f64>,
        _: Option<&[usize]>,
        _: DType,
    ) -> Result<AttentionJvp> {
        Err(cuda_not_built())
    }
    pub fn attention_forward(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: Option<f64>,
        _: Option<&[usize]>,
        _: DType,
    ) -> Result<AttentionOutput> {
        Err(cuda_not_built())
    }
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: Option<f64>,
        _: Option<&[usize]>,
        _: DType,
    ) -> Result<AttentionGrads> {
        Err(cuda_not_built())
    }
    pub fn layernorm_mod_jvp(_: &Dual, _: &Dual, _: &Dual, _: f64, _: DType) -> Result<Dual> {
        Err(cuda_not_built())
    }
    pub fn layernorm_mod_backward(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: f64,
        _: &Tensor,
        _: DType,
    ) -> Result<LayerNormModGrads> {
        Err(cuda_not_built())
    }
    pub fn mlp_jvp(_: &Dual, _: &Mlp, _: DType) -> Result<Dual> {
        Err(cuda_not_built())
    }
    pub fn mlp_backward(_: &Tensor, _: &Mlp, _: &Tensor, _: DType) -> Result<MlpGrads> {
        Err(cuda_not_built())
    }
    pub fn rms_norm_jvp(_: &Dual, _: &Dual, _: f64, _: DType) -> Result<Dual> {
        Err(cuda_not_built())
    }
    pub fn rms_norm_backward(
        _: &Tensor,
        _: &Tensor,
        _: f64,
        _: &Tensor,
        _: DType,
    ) -> Result<RmsNormGrads> {
        Err(cuda_not_built())
    }
    pub fn rope_jvp(_: &Dual, _: &Tensor, _: &Tensor, _: RopePairs, _: DType) -> Result<Dual> {
        Err(cuda_not_built())
    }
    pub fn rope_backward(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: RopePairs,
        _: DType,
    ) -> Result<Tensor> {
        Err(cuda_not_built())
    }
}

/// Runs `mode` of `op` on the named tensors of `inputs` and returns the named outputs, all in the
/// computation dtype (see [`computation_dtype`]). Every missing or mis-shaped tensor is an error
/// naming it.
pub fn run(
    mode: Mode,
    op: OpKind,
    inputs: &TensorMap,
    dtype: Option<DType>,
    device: Device,
) -> Result<TensorMap> {
    let first = op.first_input(mode);
    let first_dtype = lookup(op.name(), inputs, first)?.dtype();
    let dtype = computation_dtype(dtype, first_dtype, device)?;
    let inp = Inputs {
        op: op.name(),
        map: inputs,
        dtype,
    };
    let cuda = device == Device::Cuda;
    let out: Vec<(&str, Tensor)> = match (op, mode) {
        (OpKind::Attention, Mode::Jvp) => {
            let q = inp.dual("q", "tq")?;
            let k = inp.dual("k", "tk")?;
            let v = inp.dual("v", "tv")?;
            let scale = inp.scalar("scale")?;
            let lens = inp.counts("key_lens")?;
            let r = match (cuda, &lens) {
                (true, lens) => gpu::attention_jvp(&q, &k, &v, scale, lens.as_deref(), dtype)?,
                (false, None) => ops::attention_jvp(&q, &k, &v, scale)?,
                (false, Some(l)) => ops::attention_jvp_with_key_lens(&q, &k, &v, scale, l)?,
            };
            vec![
                ("to", r.o.tangent_or_zeros()),
                ("o", r.o.primal),
                ("tlse", r.lse.tangent_or_zeros()),
                ("lse", r.lse.primal),
            ]
        }
        (OpKind::Attention, Mode::Vjp) => {
            let q = inp.tensor("q")?;
            let k = inp.tensor("k")?;
            let v = inp.tensor("v")?;
            let go = inp.tensor("go")?;
            let scale = inp.scalar("scale")?;
            let lens = inp.counts("key_lens")?;
            let g = match (cuda, lens.as_deref()) {
                (true, l) => {
                    let fwd = gpu::attention_forward(&q, &k, &v, scale, l, dtype)?;
                    gpu::attention_backward(&q, &k, &v, &fwd.o, &fwd.lse, &go, scale, l, dtype)?
                }
                (false, None) => {
                    let fwd = ops::attention_forward(&q, &k, &v, scale)?;
                    ops::attention_backward(&q, &k, &v, &fwd.o, &fwd.lse, &go, scale)?
                }
                (false, Some(l)) => {
                    let fwd = ops::attention_forward_with_key_lens(&q, &k, &v, scale, l)?;
                    let (o, lse) = (&fwd.o, &fwd.lse);
                    ops::attention_backward_with_key_lens(&q, &k, &v, o, lse, &go, scale, l)?
                }
            };
            vec![("dq", g.dq), ("dk", g.dk), ("dv", g.dv)]
        }
        (OpKind::LayerNormMod, Mode::Jvp) => {
            let x = inp.dual("x", "tx")?;
            let scale = inp.dual("scale", "tscale")?;
            let shift = inp.dual("shift", "tshift")?;
            let eps = inp.scalar("eps")?.unwrap_or(ops::DEFAULT_EPS);
            let y = if cuda {
                gpu::layernorm_mod_jvp(&x, &scale, &shift, eps, dtype)?
            } else {
                ops::layernorm_mod_jvp(&x, &scale, &shift, eps)?
            };
            vec![("ty", y.tangent_or_zeros()), ("y", y.primal)]
        }
        (OpKind::LayerNormMod, Mode::Vjp) => {
            let x = inp.tensor("x")?;
            let scale = inp.tensor("scale")?;
            let shift = inp.tensor("shift")?;
            let gy = inp.tensor("gy")?;
            let eps = inp.scalar("eps")?.unwrap_or(ops::DEFAULT_EPS);
            let g = if cuda {
                gpu::layernorm_mod_backward(&x, &scale, &shift, eps, &gy, dtype)?
            } else {
                ops::layernorm_mod_backward(&x, &scale, &shift, eps, &gy)?
            };
            vec![("dx", g.dx), ("dscale", g.dscale), ("dshift", g.dshift)]
        }
        (OpKind::Mlp, Mode::Jvp) => {
            let x = inp.dual("x", "tx")?;
            let (w1, b1, w2, b2) = inp.mlp_params()?;
            let p = ops::Mlp {
                w1: &w1,
                b1: &b1,
                w2: &w2,
                b2: &b2,
            };
            let y = if cuda {
                gpu::mlp_jvp(&x, &p, dtype)?
            } else {
                ops::mlp_jvp(&x, &p)?
            };
            vec![("ty", y.tangent_or_zeros()), ("y", y.primal)]
        }
        (OpKind::Mlp, Mode::Vjp) => {
            let x = inp.tensor("x")?;
            let gy = inp.tensor("gy")?;
            let (w1, b1, w2, b2) = inp.mlp_params()?;
            let p = ops::Mlp {
                w1: &w1,
                b1: &b1,
                w2: &w2,
                b2: &b2,
            };
            let g = if cuda {
                gpu::mlp_backward(&x, &p, &gy, dtype)?
            } else {
                ops::mlp_backward(&x, &p, &gy)?
            };
            vec![
                ("dx", g.dx),
                ("dw1", g.dw1),
                ("db1", g.db1),
                ("dw2", g.dw2),
                ("db2", g.db2),
            ]
        }
        (OpKind::RmsNorm, Mode::Jvp) => {
            let x = inp.dual("x", "tx")?;
            let w = inp.dual("w", "tw")?;
            let eps = inp.scalar("eps")?.unwrap_or(ops::DEFAULT_EPS);
            let y = if cuda {
                gpu::rms_norm_jvp(&x, &w, eps, dtype)?
            } else {
                ops::rms_norm_jvp(&x, &w, eps)?
            };
            vec![("ty", y.tangent_or_zeros()), ("y", y.primal)]
        }
        (OpKind::RmsNorm, Mode::Vjp) => {
            let x = inp.tensor("x")?;
            let w = inp.tensor("w")?;
            let gy = inp.tensor("gy")?;
            let eps = inp.scalar("eps")?.unwrap_or(ops::DEFAULT_EPS);
            let g = if cuda {
                gpu::rms_norm_backward(&x, &w, eps, &gy, dtype)?
            } else {
                ops::rms_norm_backward(&x, &w, eps, &gy)?
            };
            vec![("dx", g.dx), ("dw", g.dweight)]
        }
        (OpKind::Rope, Mode::Jvp) => {
            let x = inp.dual("x", "tx")?;
            let (cos, sin, pairs) = (inp.tensor("cos")?, inp.tensor("sin")?, inp.pairs()?);
            let y = if cuda {
                gpu::rope_jvp(&x, &cos, &sin, pairs, dtype)?
            } else {
                ops::rope_jvp(&x, &cos, &sin, pairs)?
            };
            vec![("ty", y.tangent_or_zeros()), ("y", y.primal)]
        }
        (OpKind::Rope, Mode::Vjp) => {
            let gy = inp.tensor("gy")?;
            let (cos, sin, pairs) = (inp.tensor("cos")?, inp.tensor("sin")?, inp.pairs()?);
            let dx = if cuda {
                gpu::rope_backward(&gy, &cos, &sin, pairs, dtype)?
            } else {
                ops::rope_backward(&gy, &cos, &sin, pairs)?
            };
            vec![("dx", dx)]
        }
    };
    Ok(out
        .into_iter()
        .map(|(name, t)| {
            let t = if t.dtype() == dtype {
                t
            } else {
                t.to_dtype(dtype)
            };
            (name.to_string(), t)
        })
        .collect())
}

/// The input tensors of one op, converted to the computation dtype on the way out.
struct Inputs<'a> {
    op: &'static str,
    map: &'a TensorMap,
    dtype: DType,
}

/// `t` converted to the computation dtype; a finite value that overflows it (an f64 above
/// f32's range, say) is an error naming the tensor, not a silent infinity.
fn narrow(op: &'static str, name: &str, t: &Tensor, dtype: DType) -> Result<Tensor> {
    let c = t.to_dtype(dtype);
    if c.dtype() != t.dtype() {
        let (from, to) = (t.to_f64_vec(), c.to_f64_vec());
        if let Some(i) = (0..from.len()).find(|&i| from[i].is_finite() && !to[i].is_finite()) {
            return Err(Error::invalid(
                op,
                format!(
                    "tensor `{name}` holds {} (element {i}), beyond the range of {dtype}, the \
                     computation dtype",
                    from[i]
                ),
            ));
        }
    }
    Ok(c)
}

impl Inputs<'_> {
    /// A tensor the op uses, converted. An empty dimension is refused here: an empty input can
    /// still ask for a huge output ([2^40, 0] rows through an MLP), which no file should be able to.
    fn tensor(&self, name: &str) -> Result<Tensor> {
        let t = lookup(self.op, self.map, name)?;
        if t.shape().contains(&0) {
            return Err(Error::Shape {
                op: self.op,
                tensor: name.to_string(),
                expected: format!(
                    "{} with every dimension at least 1",
                    expected_shape(self.op, name)
                ),
                actual: t.shape().to_vec(),
            });
        }
        narrow(self.op, name, t, self.dtype)
    }

    /// A primal with its optional tangent; a tangent of another shape is an error naming it.
    fn dual(&self, name: &str, tangent: &str) -> Result<Dual> {
        let primal = self.tensor(name)?;
        let tangent = match self.map.get(tangent) {
            None => None,
            Some(t) if t.shape() != primal.shape() => {
                return Err(Error::Shape {
                    op: self.op,
                    tensor: tangent.to_string(),
                    expected: format!("{:?} (the shape of `{name}`)", primal.shape()),
                    actual: t.shape().to_vec(),
                })
            }
            Some(t) => Some(narrow(self.op, tangent, t, self.dtype)?),
        };
        Ok(Dual { primal, tangent })
    }

    /// An optional scalar: a tensor holding exactly one element (shape [] or [1]), read in f64.
    fn scalar(&self, name: &str) -> Result<Option<f64>> {
        match self.map.get(name) {
            None => Ok(None),
            Some(t) if t.numel() == 1 => Ok(Some(t.to_f64_vec()[0])),
            Some(t) => Err(Error::Shape {
                op: self.op,
                tensor: name.to_string(),
                expected: "a scalar (shape [] or [1])".into(),
                actual: t.shape().to_vec(),
            }),
        }
    }

    /// An optional 1-D tensor of counts (whole numbers ≥ 0 in any dtype), e.g. attention's
    /// `key_lens`; the op checks their range.
    fn counts(&self, name: &str) -> Result<Option<Vec<usize>>> {
        let Some(t) = self.map.get(name) else {
            return Ok(None);
        };
        if t.shape().len() != 1 {
            return Err(Error::Shape {
                op: self.op,
                tensor: name.to_string(),
                expected: "a vector [B] of counts".into(),
                actual: t.shape().to_vec(),
            });
        }
        t.to_f64_vec()
            .into_iter()
            .enumerate()
            .map(|(i, x)| {
                if x >= 0.0 && x.fract() == 0.0 && x <= u32::MAX as f64 {
                    Ok(x as usize)
                } else {
                    Err(Error::invalid(
                        self.op,
                        format!("{name}[{i}] = {x} is not a count (a whole number >= 0)"),
                    ))
                }
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Rope's pairing from the optional scalar `halves`: absent or 0 for (x[2i], x[2i+1]), 1 for
    /// (x[i], x[i + d/2]); any other value is an error naming it.
    fn pairs(&self) -> Result<ops::RopePairs> {
        match self.scalar("halves")? {
            None => Ok(ops::RopePairs::Interleaved),
            Some(0.0) => Ok(ops::RopePairs::Interleaved),
            Some(1.0) => Ok(ops::RopePairs::Halves),
            Some(v) => Err(Error::invalid(
                self.op,
                format!(
                    "halves = {v}: expected 0 (interleaved pairs x[2i], x[2i+1]) or 1 (halves x[i], x[i + d/2])"
                ),
            )),
        }
    }

    fn mlp_params(&self) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        Ok((
            self.tensor("w1")?,
            self.tensor("b1")?,
            self.tensor("w2")?,
            self.tensor("b2")?,
        ))
    }
}

fn lookup<'m>(op: &'static str, map: &'m TensorMap, name: &str) -> Result<&'m Tensor> {
    map.get(name).ok_or_else(|| {
        Error::invalid(
            op,
            format!(
                "the input has no tensor `{name}` (expected {})",
                expected_shape(op, name)
            ),
        )
    })
}

/// The shape the contract gives each input of `op`, for "missing tensor" messages.
fn expected_shape(op: &str, name: &str) -> &'static str {
    match (op, name) {
        ("rope", "x" | "gy") => return "[B, N, H, d]",
        ("rope", "cos" | "sin") => return "[N, d/2] or [B, N, d/2]",
        ("rms_norm", "w") => return "[C]",
        _ => {}
    }
    match name {
        "q" => "[B, H, Nq, d]",
        "k" => "[B, H, Nk, d]",
        "v" => "[B, H, Nk, dv]",
        "go" => "[B, H, Nq, dv]",
        "x" | "gy" => "[T, C]",
        "scale" | "shift" => "[C] or [T, C]",
        "w1" => "[Hd, C]",
        "b1" => "[Hd]",
        "w2" => "[C, Hd]",
        "b2" => "[C]",
        _ => "a tensor",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrowing_that_overflows_is_an_error_naming_the_tensor() {
        let t = Tensor::from_vec(vec![1.0f64, 1e39, f64::INFINITY], &[3]).unwrap();
        let e = narrow("attention", "q", &t, DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`q`") && e.contains("element 1") && e.contains("f32"),
            "{e}"
        );
        // An infinity that was already there is the caller's value, not an overflow.
        let t = Tensor::from_vec(vec![1.0f64, f64::INFINITY, -3e38], &[3]).unwrap();
        let c = narrow("attention", "q", &t, DType::F32).unwrap();
        assert_eq!(c.dtype(), DType::F32);
        assert!(narrow("attention", "q", &t, DType::F64).is_ok());
    }
}
