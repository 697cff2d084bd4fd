//! The DiT on the GPU: the same three passes as the CPU reference (`pass.rs`) — the forward, the
//! dual forward with tangents on x and t, and the backward through the primal — on device-resident
//! f32 tensors, built from the CUDA op families (cuBLASLt GEMMs with bias and GELU epilogues,
//! layernorm + modulation forward/JVP/backward, attention forward/JVP/backward, SiLU, gated
//! residual, timestep embedding) and the movement kernels of cuda/dit.cu. The block's attention
//! forward/JVP goes through the same arch dispatch as the attention op (sm_90a kernels on a Hopper
//! where they apply).
//!
//! Every pass is a launch plan built by pure functions from device addresses and sizes
//! ([`plan_block_forward`], [`plan_block_backward`] and the stem/head steps inside [`GpuDit`]), so
//! tests/gpu_plans.rs checks every launch against the kernels' PTX signatures without a GPU, and
//! the benchmark (src/cuda/bench_dit.rs) replays the block plans.
//!
//! Parameters live on the device in one f32 allocation ([`ParamLayout`]) uploaded once per
//! parameter generation (see `Dit::generation`): the host optimizer (AdamW, EMA in src/rcm) keeps
//! the master copy, and a changed network is uploaded again, once, on its next GPU pass. The layout
//! puts every adaLN weight (all blocks' and the final layer's) into one contiguous [M, C] matrix, and
//! their biases into one \[M\] vector, M = (6·depth + 2)·C: all modulation vectors depend on c alone, so
//! one GEMM gives every block's modulation, and in the backward one GEMM gives dW, one db and one
//! dc summed over the blocks (no accumulation across blocks).
//!
//! Modulation vectors live chunk-major, f32 [K, B, C] with K = 6·depth + 2 chunks (block i's shift1,
//! scale1, gate1, shift2, scale2, gate2 at 6i..6i+6, the final shift and scale at 6·depth and
//! 6·depth+1), the [G, C] layout the layernorm and residual kernels take with G = B.
//!
//! Storage dtype: the whole DiT runs in f32 (its conditioning path, time embedding and modulation are
//! f32 by design, DESIGN.md section 4). The block plans are generic over bf16/f16/f32 activations and
//! weights with f32 modulation (the benchmark times them in bf16); a bf16 DiT would need bf16 copies
//! of the block weights and a cast of the stacked modulation, not done.
//!
//! STATUS: compiled, plans checked against the PTX; ran on an NVIDIA H200 (2026-11-27,
//! scripts/gpu/check.sh, docs/gpu-runs.md), where tests/gpu_dit.rs passes: it compares all three
//! passes with the f64 CPU DiT (on a GPU or on the kernel emulator, `FLASHJVP_EMULATE=1`, where
//! they pass in CI), the bf16 block plans with the f32 ones, and runs the toy rCM pipeline on cuda.

use super::layout::*;
use super::pass::{check_inputs, EPS};
use super::{Dit, DitConfig};
use crate::cuda::attention::{self as attn, AttnDims, Variant};
use crate::cuda::attention_sm90 as sm90;
use crate::cuda::dit as kd;
use crate::cuda::elementwise::{self as ew, Activation, ResDims, ResJvpPtrs};
use crate::cuda::launch::{Gemm, GemmAct, Step};
use crate::cuda::layernorm::{self as ln, LnDims};
use crate::cuda::mlp::{self, MlpDims, ParamPtrs};
use crate::cuda::tensor::one_bits;
use crate::cuda::{DeviceTensor, Gpu};
use crate::dual::Dual;
use crate::error::{Error, Result};
use crate::ops::DEFAULT_MAX_PERIOD;
use crate::tensor::{DType, Tensor};

const OP: &str = "dit_gpu";
const F32: DType = DType::F32;

// ---------------------------------------------------------------------------------------------
// Sizes and small step builders.

/// Sizes of one DiT block pass: batch B, tokens per image N, width C, heads, MLP width Hd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDims {
    /// Batch B (images).
    pub b: usize,
    /// Tokens per image N = (S/p)².
    pub n: usize,
    /// Token width C (hidden).
    pub c: usize,
    /// Attention heads; C must be a multiple.
    pub heads: usize,
    /// MLP hidden width Hd = mlp_ratio · C.
    pub hd: usize,
}

impl BlockDims {
    /// Token rows T = B·N.
    pub fn t(&self) -> usize {
        self.b * self.n
    }

    /// Head dim dh = C / heads.
    pub fn dh(&self) -> usize {
        self.c / self.heads
    }

    /// Errors unless the kernels take these sizes (head dim, int ranges, grid limits).
    pub fn check(&self) -> Result<AttnDims> {
        if self.heads == 0 || self.c % self.heads != 0 || self.b == 0 || self.n == 0 {
            return Err(Error::invalid(OP, format!("bad block sizes {self:?}")));
        }
        let q = [self.b, self.heads, self.n, self.dh()];
        let a = attn::check_shapes(&q, &q, &q)?;
        let t = self.t();
        mlp::check_shapes(
            &[t, self.c],
            &[self.hd, self.c],
            &[self.hd],
            &[self.c, self.hd],
            &[self.c],
        )?;
        ln::check_x(&[t, 3 * self.c])?;
        Ok(a)
    }

    fn ln(&self) -> LnDims {
        LnDims {
            t: self.t(),
            c: self.c,
            g: self.b,
        }
    }

    fn res(&self) -> ResDims {
        ResDims {
            t: self.t(),
            c: self.c,
            g: self.b,
        }
    }

    fn mlp(&self) -> MlpDims {
        MlpDims {
            t: self.t(),
            c: self.c,
            hd: self.hd,
        }
    }
}

/// Errors unless the device tensor `name` has shape `shape` and dtype `dtype`.
fn expect_device(name: &str, t: &DeviceTensor, shape: &[usize], dtype: DType) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::Shape {
            op: OP,
            tensor: name.into(),
            expected: format!("{shape:?}"),
            actual: t.shape().to_vec(),
        });
    }
    if t.dtype() != dtype {
        return Err(Error::DType {
            op: OP,
            tensor: name.into(),
            expected: dtype.to_string(),
            actual: t.dtype(),
        });
    }
    Ok(())
}

/// A linear layer y = x Wᵀ (+ b): W [out, inp] at `w`, b [out] at `b`.
#[derive(Clone, Copy, Debug)]
struct Lin {
    w: u64,
    b: u64,
    inp: usize,
    out: usize,
}

impl Lin {
    fn fwd(&self, dtype: DType, rows: usize, x: u64, y: u64, bias: bool) -> Step {
        self.fwd_act(dtype, rows, x, y, bias, GemmAct::None)
    }

    /// [`Lin::fwd`] with a GELU epilogue.
    fn fwd_act(&self, dtype: DType, rows: usize, x: u64, y: u64, bias: bool, act: GemmAct) -> Step {
        Gemm::step_act(
            dtype,
            (rows, self.out, self.inp),
            (x, false),
            (self.w, true),
            y,
            bias.then_some(self.b),
            act,
        )
    }

    /// dW = dyᵀ x into `g.w`, db = 1ᵀ dy into `g.b` (ones: `rows` ones), dx = dy W (when dx ≠ 0).
    #[allow(clippy::too_many_arguments)]
    fn bwd(
        &self,
        dtype: DType,
        rows: usize,
        x: u64,
        dy: u64,
        ones: u64,
        g: Lin,
        dx: u64,
    ) -> Vec<Step> {
        self.bwd_act(dtype, rows, x, dy, ones, g, dx, GemmAct::None)
    }

    /// [`Lin::bwd`] with an epilogue on dx (DGELU: the gradient through a GELU before the layer).
    #[allow(clippy::too_many_arguments)]
    fn bwd_act(
        &self,
        dtype: DType,
        rows: usize,
        x: u64,
        dy: u64,
        ones: u64,
        g: Lin,
        dx: u64,
        dx_act: GemmAct,
    ) -> Vec<Step> {
        let mut s = vec![
            Gemm::step(
                dtype,
                (self.out, self.inp, rows),
                (dy, true),
                (x, false),
                g.w,
                None,
            ),
            Gemm::step(
                dtype,
                (1, self.out, rows),
                (ones, false),
                (dy, false),
                g.b,
                None,
            ),
        ];
        if dx != 0 {
            s.push(Gemm::step_act(
                dtype,
                (rows, self.inp, self.out),
                (dy, false),
                (self.w, false),
                dx,
                None,
                dx_act,
            ));
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Layout changes as permutations (cuda/dit.cu's dit_permute): output axes and their input strides.

/// Output axes and input strides of each movement (pure; tested against the CPU shuffles).
pub mod moves {
    /// Image [B, Cin, S, S] → patches [B·g·g, Cin·p·p], g = S/p.
    pub fn patchify(b: usize, cin: usize, s: usize, p: usize) -> (Vec<usize>, Vec<usize>) {
        let g = s / p;
        (
            vec![b, g, g, cin, p, p],
            vec![cin * s * s, p * s, p, s * s, s, 1],
        )
    }

    /// Patches [B·g·g, Cin·p·p] → image [B, Cin, S, S].
    pub fn unpatchify(b: usize, cin: usize, s: usize, p: usize) -> (Vec<usize>, Vec<usize>) {
        let g = s / p;
        let pd = cin * p * p;
        (
            vec![b, cin, g, p, g, p],
            vec![g * g * pd, p * p, g * pd, p, pd, 1],
        )
    }

    /// Fused rows [B·N, 3C] (q | k | v, heads inside) → [3, B, H, N, dh]. The block no longer moves
    /// data this way (attention reads the rows in place: `Layout::packed_qkv`); the tests use it as
    /// the reference of that layout.
    pub fn split_qkv(b: usize, n: usize, h: usize, dh: usize) -> (Vec<usize>, Vec<usize>) {
        let c = h * dh;
        (vec![3, b, h, n, dh], vec![c, n * 3 * c, dh, 3 * c, 1])
    }

    /// Heads [B, H, N, dh] → rows [B·N, C] (as [`split_qkv`], the reference of the token-major o).
    pub fn merge_heads(b: usize, n: usize, h: usize, dh: usize) -> (Vec<usize>, Vec<usize>) {
        let _ = b;
        (vec![b, n, h, dh], vec![h * n * dh, dh, n * dh, 1])
    }

    /// Modulation rows [B, K·C] → chunk-major [K, B, C].
    pub fn to_chunks(b: usize, k: usize, c: usize) -> (Vec<usize>, Vec<usize>) {
        (vec![k, b, c], vec![c, k * c, 1])
    }

    /// Chunk-major [K, B, C] → rows [B, K·C].
    pub fn from_chunks(b: usize, k: usize, c: usize) -> (Vec<usize>, Vec<usize>) {
        (vec![b, k, c], vec![c, b * c, 1])
    }

    /// What dit_permute computes, on the host (for tests).
    pub fn apply(x: &[f64], dims: &[usize], strides: &[usize]) -> Vec<f64> {
        let n: usize = dims.iter().product();
        (0..n)
            .map(|i| {
                let mut r = i;
                let mut off = 0;
                for (d, s) in dims.iter().zip(strides).rev() {
                    off += (r % d) * s;
                    r /= d;
                }
                x[off]
            })
            .collect()
    }
}

fn permute(dtype: DType, x: u64, y: u64, m: (Vec<usize>, Vec<usize>)) -> Result<Vec<Step>> {
    kd::plan_permute(dtype, x, y, &m.0, &m.1)
}

// ---------------------------------------------------------------------------------------------
// One block.

/// Device addresses of one block's weights (all in the activations' dtype).
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockParams {
    /// Fused q | k | v projection weight [3C, C].
    pub qkv_w: u64,
    /// Its bias \[3C\].
    pub qkv_b: u64,
    /// Attention output projection weight [C, C].
    pub proj_w: u64,
    /// Its bias \[C\].
    pub proj_b: u64,
    /// First MLP layer weight [Hd, C].
    pub fc1_w: u64,
    /// Its bias \[Hd\].
    pub fc1_b: u64,
    /// Second MLP layer weight [C, Hd].
    pub fc2_w: u64,
    /// Its bias \[C\].
    pub fc2_b: u64,
}

impl BlockParams {
    /// The shapes of one block's parameters, in the canonical order [`BlockParams::of`] takes:
    /// qkv [3C, C], \[3C\]; proj [C, C], \[C\]; fc1 [Hd, C], \[Hd\]; fc2 [C, Hd], \[C\].
    pub fn shapes(c: usize, hd: usize) -> [Vec<usize>; 8] {
        [
            vec![3 * c, c],
            vec![3 * c],
            vec![c, c],
            vec![c],
            vec![hd, c],
            vec![hd],
            vec![c, hd],
            vec![c],
        ]
    }

    /// The addresses of eight tensors in the order of [`BlockParams::shapes`] (parameters or
    /// their gradients), all of one dtype. Errors unless there are eight whose shapes are
    /// `shapes(C, Hd)` for some C and Hd (read from the two biases \[C\] and \[Hd\]); whether these
    /// are the sizes of the plan they go to is the caller's to keep.
    pub fn of(t: &[DeviceTensor]) -> Result<BlockParams> {
        const NAMES: [&str; 8] = [
            "qkv_w", "qkv_b", "proj_w", "proj_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b",
        ];
        if t.len() != NAMES.len() {
            return Err(Error::invalid(
                OP,
                format!(
                    "block parameters: {} tensors given, expected 8 ({})",
                    t.len(),
                    NAMES.join(", ")
                ),
            ));
        }
        // Device tensors exist in memory, so 3·C cannot overflow.
        let (c, hd) = (t[3].numel(), t[5].numel());
        for ((name, p), shape) in NAMES.iter().zip(t).zip(Self::shapes(c, hd)) {
            expect_device(name, p, &shape, t[0].dtype())?;
        }
        Ok(BlockParams {
            qkv_w: t[0].ptr(),
            qkv_b: t[1].ptr(),
            proj_w: t[2].ptr(),
            proj_b: t[3].ptr(),
            fc1_w: t[4].ptr(),
            fc1_b: t[5].ptr(),
            fc2_w: t[6].ptr(),
            fc2_b: t[7].ptr(),
        })
    }
}

/// Addresses of one block's six modulation vectors, each f32 [B, C]; 0 means zero (tangents).
#[derive(Clone, Copy, Debug, Default)]
pub struct Mods {
    /// Shift of the layernorm before attention: h1 = x̂·(1 + scale1) + shift1.
    pub shift1: u64,
    /// Scale of the layernorm before attention.
    pub scale1: u64,
    /// Gate of the attention residual: x1 = x + gate1 ⊙ attn_out.
    pub gate1: u64,
    /// Shift of the layernorm before the MLP.
    pub shift2: u64,
    /// Scale of the layernorm before the MLP.
    pub scale2: u64,
    /// Gate of the MLP residual: out = x1 + gate2 ⊙ mlp_out.
    pub gate2: u64,
}

impl Mods {
    /// Chunks `first..first + 6` of a chunk-major f32 [K, B, C] buffer at `base`.
    pub fn chunks(base: u64, first: usize, b: usize, c: usize) -> Mods {
        let at = |j: usize| base + ((first + j) * b * c * 4) as u64;
        Mods {
            shift1: at(0),
            scale1: at(1),
            gate1: at(2),
            shift2: at(3),
            scale2: at(4),
            gate2: at(5),
        }
    }
}

/// The primal buffers of one block (what its backward reads). In a dual forward `h1` and `h2` are
/// [2T, C] and `pre` is [2T, Hd] (tangent rows after the primal rows); otherwise [T, C] / [T, Hd].
/// mean/rstd f32 \[T\], lse f32 [B, H, N]; qkv [T, 3C] = [B, N, 3, H, dh] and o_rows [T, C] =
/// [B, N, H, dh] are also attention's q, k, v and o.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockBufs {
    /// The block's input [T, C] (read).
    pub x: u64,
    /// Mean of each row of x, f32 \[T\].
    pub mean1: u64,
    /// Reciprocal standard deviation of each row of x, f32 \[T\].
    pub rstd1: u64,
    /// Modulated layernorm of x, the qkv input [T, C] ([2T, C] in a dual forward).
    pub h1: u64,
    /// q | k | v rows [T, 3C].
    pub qkv: u64,
    /// Attention's log-sum-exp per query, f32 [B, H, N].
    pub lse: u64,
    /// Attention output o [T, C], the projection's input.
    pub o_rows: u64,
    /// Projection output [T, C].
    pub attn_out: u64,
    /// x + gate1 ⊙ attn_out [T, C].
    pub x1: u64,
    /// Mean of each row of x1, f32 \[T\].
    pub mean2: u64,
    /// Reciprocal standard deviation of each row of x1, f32 \[T\].
    pub rstd2: u64,
    /// Modulated layernorm of x1, the MLP input [T, C] ([2T, C] in a dual forward).
    pub h2: u64,
    /// First MLP layer pre-activation (bias added) [T, Hd], kept for the GELU's gradient; in a
    /// dual forward [2T, Hd] with the hidden activation's tangent in rows T..2T.
    pub pre: u64,
    /// GELU(pre) [T, Hd], the second MLP layer's input.
    pub g: u64,
    /// Second MLP layer output [T, C].
    pub mlp_out: u64,
    /// The block's output x1 + gate2 ⊙ mlp_out [T, C].
    pub out: u64,
}

/// The tangent buffers of a dual forward (`x` = 0: the input carries no tangent). The tangents of
/// h1, h2 and the MLP hidden layer live in the stacked primal buffers.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockTangents {
    /// Tangent of the input x [T, C] (read; 0: none).
    pub x: u64,
    /// Tangent of the qkv rows [T, 3C].
    pub qkv: u64,
    /// Tangent of the lse, f32 [B, H, N].
    pub lse: u64,
    /// Tangent of o [T, C].
    pub o_rows: u64,
    /// Tangent of the projection output [T, C].
    pub attn_out: u64,
    /// Tangent of x1 [T, C].
    pub x1: u64,
    /// Tangent of the MLP output [T, C].
    pub mlp_out: u64,
    /// Tangent of the block's output [T, C].
    pub out: u64,
}

/// q, k and v inside packed qkv rows [B·N, 3C] = [B, N, 3, H, dh] at `qkv`: the attention kernels
/// read them in place ([`attn::Layout::packed_qkv`]), so no permutation surrounds attention.
fn qkv_ptrs(dtype: DType, d: BlockDims, qkv: u64) -> (u64, u64, u64) {
    let part = (d.c * dtype.size_in_bytes()) as u64;
    (qkv, qkv + part, qkv + 2 * part)
}

impl BlockParams {
    fn qkv(&self, c: usize) -> Lin {
        Lin {
            w: self.qkv_w,
            b: self.qkv_b,
            inp: c,
            out: 3 * c,
        }
    }
    fn proj(&self, c: usize) -> Lin {
        Lin {
            w: self.proj_w,
            b: self.proj_b,
            inp: c,
            out: c,
        }
    }
    fn fc1(&self, c: usize, hd: usize) -> Lin {
        Lin {
            w: self.fc1_w,
            b: self.fc1_b,
            inp: c,
            out: hd,
        }
    }
    fn fc2(&self, c: usize, hd: usize) -> Lin {
        Lin {
            w: self.fc2_w,
            b: self.fc2_b,
            inp: hd,
            out: c,
        }
    }
}

/// One block's forward (t = None) or dual forward: x2 = x1 + gate2 ⊙ mlp(ln(x1)),
/// x1 = x + gate1 ⊙ proj(attention(qkv(ln(x)))). `tm` are the modulation tangents (None: zero).
/// `arch` (the device's NVRTC arch) picks the attention kernels: sm_90a's where they apply.
/// The attention JVP's value products follow `FLASHJVP_ATTENTION_VALUES`
/// ([`attn::ValueProducts::from_env`]); [`plan_block_forward_with`] takes the choice explicitly.
#[allow(clippy::too_many_arguments)]
pub fn plan_block_forward(
    arch: &str,
    dtype: DType,
    d: BlockDims,
    p: &BlockParams,
    m: &Mods,
    tm: Option<&Mods>,
    a: &BlockBufs,
    t: Option<&BlockTangents>,
) -> Result<Vec<Step>> {
    let values = attn::ValueProducts::from_env();
    plan_block_forward_with(values, arch, dtype, d, p, m, tm, a, t)
}

/// [`plan_block_forward`] with the attention JVP's value products chosen by `values`. With
/// [`attn::ValueProducts::F16`] (bf16, on either attention path) the f16 copies of v and its tangent go
/// into `a.pre`, which nothing reads before the MLP's first layer writes it.
#[allow(clippy::too_many_arguments)]
pub fn plan_block_forward_with(
    values: attn::ValueProducts,
    arch: &str,
    dtype: DType,
    d: BlockDims,
    p: &BlockParams,
    m: &Mods,
    tm: Option<&Mods>,
    a: &BlockBufs,
    t: Option<&BlockTangents>,
) -> Result<Vec<Step>> {
    let adims = d.check()?;
    let (tn, c, hd) = (d.t(), d.c, d.hd);
    let sz = dtype.size_in_bytes() as u64;
    let scale = attn::resolve_scale(None, adims.d)?;
    let (q, k, v) = qkv_ptrs(dtype, d, a.qkv);
    // Attention reads q, k, v from the qkv rows and writes o as rows [B·N, C] ([B, N, H, dh]).
    let layout = attn::Layout::packed_qkv(adims);
    let (qkv, proj, fc1, fc2) = (p.qkv(c), p.proj(c), p.fc1(c, hd), p.fc2(c, hd));
    let mut s = Vec::new();
    let Some(t) = t else {
        s.extend(ln::plan_forward(
            dtype,
            d.ln(),
            a.x,
            m.scale1,
            m.shift1,
            a.h1,
            a.mean1,
            a.rstd1,
            EPS,
        )?);
        s.push(qkv.fwd(dtype, tn, a.h1, a.qkv, true));
        let jp = attn::JvpPtrs {
            q,
            k,
            v,
            tq: 0,
            tk: 0,
            tv: 0,
            o: a.o_rows,
            to: 0,
            lse: a.lse,
            tlse: 0,
        };
        s.extend(sm90::plan_for(
            arch,
            Variant::Fwd,
            dtype,
            adims,
            layout,
            jp,
            scale,
        )?);
        s.push(proj.fwd(dtype, tn, a.o_rows, a.attn_out, true));
        // x1 = x + gate1 ⊙ attn_out and h2 = modulated layernorm(x1) in one pass.
        s.extend(ln::plan_residual_forward(
            dtype,
            d.ln(),
            a.x,
            ln::ResPtrs {
                y: a.attn_out,
                gate: m.gate1,
                x1: a.x1,
                ..Default::default()
            },
            m.scale2,
            m.shift2,
            a.h2,
            a.mean2,
            a.rstd2,
            EPS,
        )?);
        // g = gelu(pre), pre = h2 W1ᵀ + b1 kept for the backward (one GEMM with its epilogue).
        s.push(fc1.fwd_act(dtype, tn, a.h2, a.g, true, GemmAct::GeluAux { aux: a.pre }));
        s.push(fc2.fwd(dtype, tn, a.g, a.mlp_out, true));
        s.extend(ew::plan_residual_fwd(
            dtype,
            d.res(),
            a.x1,
            a.mlp_out,
            m.gate2,
            a.out,
        )?);
        return Ok(s);
    };
    let tm = tm.copied().unwrap_or_default();
    let th1 = a.h1 + tn as u64 * c as u64 * sz;
    let th2 = a.h2 + tn as u64 * c as u64 * sz;
    s.extend(ln::plan_jvp(
        dtype,
        d.ln(),
        ln::JvpPtrs {
            x: a.x,
            tx: t.x,
            scale: m.scale1,
            shift: m.shift1,
            tscale: tm.scale1,
            tshift: tm.shift1,
            y: a.h1,
            ty: th1,
            mean: a.mean1,
            rstd: a.rstd1,
        },
        EPS,
    )?);
    s.push(qkv.fwd(dtype, tn, a.h1, a.qkv, true));
    s.push(qkv.fwd(dtype, tn, th1, t.qkv, false));
    let (tq, tk, tv) = qkv_ptrs(dtype, d, t.qkv);
    let jp = attn::JvpPtrs {
        q,
        k,
        v,
        tq,
        tk,
        tv,
        o: a.o_rows,
        to: t.o_rows,
        lse: a.lse,
        tlse: t.lse,
    };
    if values.applies(Variant::Jvp, dtype, adims) {
        let need = attn::f16_values_workspace_bytes(Variant::Jvp, adims);
        let have = 2 * tn * hd * sz as usize;
        if need > have {
            return Err(Error::Unsupported(format!(
                "DiT block: the f16 value copies need {need} bytes, more than the MLP's \
                 pre-activation buffer [{}, {hd}] holds ({have} bytes)",
                2 * tn
            )));
        }
        s.extend(sm90::plan_f16_values_for(
            arch,
            Variant::Jvp,
            adims,
            layout,
            jp,
            scale,
            a.pre,
        )?);
    } else {
        s.extend(sm90::plan_for(
            arch,
            Variant::Jvp,
            dtype,
            adims,
            layout,
            jp,
            scale,
        )?);
    }
    s.push(proj.fwd(dtype, tn, a.o_rows, a.attn_out, true));
    s.push(proj.fwd(dtype, tn, t.o_rows, t.attn_out, false));
    // x1 = x + gate1 ⊙ attn_out and h2 = modulated layernorm(x1), with tangents, in one pass.
    s.extend(ln::plan_residual_jvp(
        dtype,
        d.ln(),
        ln::JvpPtrs {
            x: a.x,
            tx: t.x,
            scale: m.scale2,
            shift: m.shift2,
            tscale: tm.scale2,
            tshift: tm.shift2,
            y: a.h2,
            ty: th2,
            mean: a.mean2,
            rstd: a.rstd2,
        },
        ln::ResPtrs {
            y: a.attn_out,
            ty: t.attn_out,
            gate: m.gate1,
            tgate: tm.gate1,
            x1: a.x1,
            tx1: t.x1,
        },
        EPS,
    )?);
    // The first MLP layer as two GEMMs, primal then tangent: the primal's epilogue saves the
    // pre-activation (bias added) in rows 0..T of `pre` ([2T, Hd]), where the tangent's DGELU reads it
    // and the backward finds it; the hidden tangent goes to rows T..2T, the activation to `g`.
    let pp = ParamPtrs {
        w1: p.fc1_w,
        b1: p.fc1_b,
        w2: p.fc2_w,
        b2: p.fc2_b,
    };
    s.extend(mlp::plan_jvp(
        dtype,
        d.mlp(),
        a.h2,
        th2,
        pp,
        a.pre,
        a.g,
        a.mlp_out,
        t.mlp_out,
    )?);
    s.extend(ew::plan_residual_jvp(
        dtype,
        d.res(),
        ResJvpPtrs {
            x: a.x1,
            tx: t.x1,
            y: a.mlp_out,
            ty: t.mlp_out,
            gate: m.gate2,
            tgate: tm.gate2,
            out: a.out,
            tout: t.out,
        },
    )?);
    Ok(s)
}

/// Scratch and outputs of one block's backward. `dx` holds the cotangent of the block's output on
/// entry and that of its input on exit. `dmods` receive the six modulation gradients (f32 [B, C],
/// written), `dp` the weight gradients, `ones` at least T ones.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlockGrads {
    /// The running cotangent [T, C] (read and written in place).
    pub dx: u64,
    /// [T, C] scratch: the cotangent of the MLP's, then of the attention projection's, output.
    pub dy: u64,
    /// [T, C] scratch: the cotangent of h2, then of h1.
    pub dh: u64,
    /// [T, Hd] scratch.
    pub dg: u64,
    /// [T, C] scratch: dO as rows [B, N, H, dh].
    pub do_rows: u64,
    /// [T, 3C] scratch: dq, dk, dv packed as the qkv rows.
    pub dqkv: u64,
    /// f32 [B, H, N] scratch of the attention backward (rowsum(dO ⊙ O)).
    pub delta: u64,
    /// At least T ones (the bias gradients' GEMMs), read.
    pub ones: u64,
    /// Where the six modulation gradients go, each f32 [B, C].
    pub dmods: Mods,
    /// Where the weight gradients go (written, not accumulated), shaped as [`BlockParams::shapes`].
    pub dp: BlockParams,
}

/// One block's backward through its primal (the buffers a forward or a dual forward filled), on a
/// device of arch `arch` (the attention backward's path: [`sm90::bwd_path_for`]).
pub fn plan_block_backward(
    arch: &str,
    dtype: DType,
    d: BlockDims,
    p: &BlockParams,
    m: &Mods,
    a: &BlockBufs,
    g: &BlockGrads,
) -> Result<Vec<Step>> {
    let adims = d.check()?;
    let (tn, c, hd) = (d.t(), d.c, d.hd);
    let scale = attn::resolve_scale(None, adims.d)?;
    let (qkv, proj, fc1, fc2) = (p.qkv(c), p.proj(c), p.fc1(c, hd), p.fc2(c, hd));
    let dp = &g.dp;
    let mut s = Vec::new();
    // x2 = x1 + gate2 ⊙ mlp(h2); dx (the cotangent of x2) also flows on to x1 unchanged.
    s.extend(ew::plan_residual_bwd(
        dtype,
        d.res(),
        g.dx,
        m.gate2,
        a.mlp_out,
        0,
        g.dy,
        g.dmods.gate2,
    )?);
    // The MLP from its saved pre-activation and activation.
    // dpre = gelu'(pre) ⊙ (dy W2), the activation's gradient in the GEMM's epilogue.
    s.extend(fc2.bwd_act(
        dtype,
        tn,
        a.g,
        g.dy,
        g.ones,
        dp.fc2(c, hd),
        g.dg,
        GemmAct::DGelu { aux: a.pre },
    ));
    s.extend(fc1.bwd(dtype, tn, a.h2, g.dg, g.ones, dp.fc1(c, hd), g.dh));
    s.extend(ln::plan_backward(
        dtype,
        d.ln(),
        ln::BwdPtrs {
            dy: g.dh,
            x: a.x1,
            scale: m.scale2,
            mean: a.mean2,
            rstd: a.rstd2,
            // The residual stream's cotangent plus the layernorm's, in place.
            dres: g.dx,
            dx: g.dx,
            dscale: g.dmods.scale2,
            dshift: g.dmods.shift2,
        },
    )?);
    // x1 = x + gate1 ⊙ proj(attention(split(qkv(h1)))).
    s.extend(ew::plan_residual_bwd(
        dtype,
        d.res(),
        g.dx,
        m.gate1,
        a.attn_out,
        0,
        g.dy,
        g.dmods.gate1,
    )?);
    s.extend(proj.bwd(dtype, tn, a.o_rows, g.dy, g.ones, dp.proj(c), g.do_rows));
    // dq, dk, dv straight into the packed rows dqkv [B·N, 3C], from q, k, v in the qkv rows and o,
    // dO as rows (no permutation).
    let (q, k, v) = qkv_ptrs(dtype, d, a.qkv);
    let (dq, dk, dv) = qkv_ptrs(dtype, d, g.dqkv);
    s.extend(sm90::plan_backward_for(
        arch,
        dtype,
        adims,
        attn::Layout::packed_qkv(adims),
        attn::BwdPtrs {
            q,
            k,
            v,
            o: a.o_rows,
            lse: a.lse,
            dout: g.do_rows,
            delta: g.delta,
            dq,
            dk,
            dv,
        },
        scale,
    )?);
    s.extend(qkv.bwd(dtype, tn, a.h1, g.dqkv, g.ones, dp.qkv(c), g.dh));
    s.extend(ln::plan_backward(
        dtype,
        d.ln(),
        ln::BwdPtrs {
            dy: g.dh,
            x: a.x,
            scale: m.scale1,
            mean: a.mean1,
            rstd: a.rstd1,
            // The residual stream's cotangent plus the layernorm's, in place.
            dres: g.dx,
            dx: g.dx,
            dscale: g.dmods.scale1,
            dshift: g.dmods.shift1,
        },
    )?);
    Ok(s)
}

/// One block's buffers, allocated (NaN-poisoned while poisoning is on). The allocations stay alive
/// as long as this value (or a clone of one of its tensors) does.
pub struct BlockAlloc {
    /// The primal buffers' addresses; `bufs.x` is the given input.
    pub bufs: BlockBufs,
    /// The tangent buffers' addresses with `dual` (`x`: the given tangent or 0), else None.
    pub tangents: Option<BlockTangents>,
    /// The output x2 (and its tangent): the next block's input.
    pub out: DeviceTensor,
    /// The output's tangent [T, C] with `dual`, else None.
    pub tout: Option<DeviceTensor>,
    keep: Vec<DeviceTensor>,
    /// Tangent scratch (not needed by the backward).
    tkeep: Vec<DeviceTensor>,
}

impl BlockAlloc {
    /// Buffers for a block reading `x` (and `tx`) in `dtype`; with `dual`, tangent buffers too.
    /// Errors unless the kernels take `d` ([`BlockDims::check`]) and `x` (and `tx`) are [T, C]
    /// in `dtype`; a tangent needs `dual`.
    pub fn new(
        gpu: &Gpu,
        dtype: DType,
        d: BlockDims,
        x: &DeviceTensor,
        tx: Option<&DeviceTensor>,
        dual: bool,
    ) -> Result<BlockAlloc> {
        // The checks bound T, C, Hd and B·heads·N (32-bit ints), so no size below overflows.
        d.check()?;
        let (tn, c, hd) = (d.t(), d.c, d.hd);
        expect_device("x", x, &[tn, c], dtype)?;
        if let Some(tx) = tx {
            if !dual {
                return Err(Error::invalid(
                    OP,
                    "a tangent of x was given for a block without tangent buffers (dual false)",
                ));
            }
            expect_device("tangent of x", tx, &[tn, c], dtype)?;
        }
        let rows = if dual { 2 * tn } else { tn };
        let main = gpu.alloc_stacked(
            &[
                &[rows, c],
                &[tn, 3 * c],
                &[tn, c],
                &[tn, c],
                &[tn, c],
                &[rows, c],
                &[rows, hd],
                &[tn, hd],
                &[tn, c],
                &[tn, c],
            ],
            dtype,
        )?;
        let lse = [d.b * d.heads * d.n];
        let stats = gpu.alloc_stacked(&[&[tn], &[tn], &[tn], &[tn], &lse], F32)?;
        let bufs = BlockBufs {
            x: x.ptr(),
            mean1: stats[0].ptr(),
            rstd1: stats[1].ptr(),
            h1: main[0].ptr(),
            qkv: main[1].ptr(),
            lse: stats[4].ptr(),
            o_rows: main[2].ptr(),
            attn_out: main[3].ptr(),
            x1: main[4].ptr(),
            mean2: stats[2].ptr(),
            rstd2: stats[3].ptr(),
            h2: main[5].ptr(),
            pre: main[6].ptr(),
            g: main[7].ptr(),
            mlp_out: main[8].ptr(),
            out: main[9].ptr(),
        };
        let out = main[9].clone();
        let mut keep = main;
        keep.extend(stats);
        keep.push(x.clone());
        if !dual {
            return Ok(BlockAlloc {
                bufs,
                tangents: None,
                out,
                tout: None,
                keep,
                tkeep: Vec::new(),
            });
        }
        // Tangent buffers are not needed by the backward: a separate allocation, dropped with
        // the block unless kept.
        let tb = gpu.alloc_stacked(
            &[&[tn, 3 * c], &[tn, c], &[tn, c], &[tn, c], &[tn, c]],
            dtype,
        )?;
        let tlse = gpu.alloc_out(&lse, F32)?;
        let tout = gpu.alloc_out(&[tn, c], dtype)?;
        let tangents = BlockTangents {
            x: tx.map_or(0, |t| t.ptr()),
            qkv: tb[0].ptr(),
            lse: tlse.ptr(),
            o_rows: tb[1].ptr(),
            attn_out: tb[2].ptr(),
            x1: tb[3].ptr(),
            mlp_out: tb[4].ptr(),
            out: tout.ptr(),
        };
        let mut tkeep = tb;
        tkeep.push(tlse);
        tkeep.extend(tx.cloned());
        Ok(BlockAlloc {
            bufs,
            tangents: Some(tangents),
            out,
            tout: Some(tout),
            keep,
            tkeep,
        })
    }

    /// Keeps only what the backward reads (the tangent buffers are freed, stream-ordered, after
    /// the kernels already queued).
    fn into_cache(self) -> BlockCacheDev {
        drop(self.tkeep);
        BlockCacheDev {
            bufs: self.bufs,
            _keep: self.keep,
        }
    }
}

/// Scratch for one block's backward (gradient outputs are given separately).
pub struct BlockGradAlloc {
    /// The scratch addresses with the given `dx` and `ones`; `dmods` and `dp` are zero, for the
    /// caller to set per block.
    pub grads: BlockGrads,
    _keep: Vec<DeviceTensor>,
}

impl BlockGradAlloc {
    /// Scratch in `dtype` for blocks of size `d`; `dx` is the running cotangent [T, C], `ones`
    /// at least T ones of `dtype` (filled by the caller). Errors unless the kernels take `d`
    /// ([`BlockDims::check`]) and both addresses are set.
    pub fn new(
        gpu: &Gpu,
        dtype: DType,
        d: BlockDims,
        dx: u64,
        ones: u64,
    ) -> Result<BlockGradAlloc> {
        // The checks bound T, C, Hd and B·heads·N (32-bit ints), so no size below overflows.
        d.check()?;
        crate::cuda::launch::require_ptrs(OP, &[("dx", dx), ("ones", ones)])?;
        let (tn, c, hd) = (d.t(), d.c, d.hd);
        let s = gpu.alloc_stacked(
            &[&[tn, c], &[tn, c], &[tn, hd], &[tn, c], &[tn, 3 * c]],
            dtype,
        )?;
        let delta = gpu.alloc_out(&[d.b * d.heads * d.n], F32)?;
        let grads = BlockGrads {
            dx,
            dy: s[0].ptr(),
            dh: s[1].ptr(),
            dg: s[2].ptr(),
            do_rows: s[3].ptr(),
            dqkv: s[4].ptr(),
            delta: delta.ptr(),
            ones,
            dmods: Mods::default(),
            dp: BlockParams::default(),
        };
        let mut keep = s;
        keep.push(delta);
        Ok(BlockGradAlloc { grads, _keep: keep })
    }
}

struct BlockCacheDev {
    bufs: BlockBufs,
    _keep: Vec<DeviceTensor>,
}

/// Errors unless the GPU passes take this network (head dim among the attention kernels', sizes
/// within the kernels' limits), checked at batch 1 (larger batches are checked per pass).
pub fn check_config(c: &DitConfig) -> Result<()> {
    Dit::validate_config(c)?;
    let g = c.image_size / c.patch;
    BlockDims {
        b: 1,
        n: g * g,
        c: c.hidden,
        heads: c.heads,
        hd: c.mlp_ratio * c.hidden,
    }
    .check()
    .map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// The parameter layout on the device.

/// f32 elements per 256 bytes: every parameter group starts 256-byte aligned (cuBLASLt).
const ALIGN: usize = 64;

/// Where each parameter (canonical order) lives in the device buffer, in f32 elements. All adaLN
/// weights (blocks in order, then the final layer) form one contiguous [M, C] matrix at
/// `ada_w`, their biases one \[M\] vector at `ada_b`.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamLayout {
    /// Offset of each parameter (canonical order), in f32 elements.
    pub offsets: Vec<usize>,
    /// Shape of each parameter (canonical order).
    pub shapes: Vec<Vec<usize>>,
    /// Buffer length in f32 elements (a multiple of 64, i.e. of 256 bytes).
    pub total: usize,
    /// Offset of the stacked adaLN weight [M, C] (0: it opens the buffer).
    pub ada_w: usize,
    /// Offset of the stacked adaLN bias \[M\] (256-byte aligned).
    pub ada_b: usize,
    /// M = (6·depth + 2)·hidden.
    pub ada_rows: usize,
}

impl ParamLayout {
    /// The layout of `c`'s parameters: the stacked adaLN weights, the stacked adaLN biases, then
    /// every other parameter in canonical order, each of these starting 256-byte aligned. Errors
    /// for a config [`Dit::validate_config`] refuses.
    pub fn new(c: &DitConfig) -> Result<ParamLayout> {
        let shapes: Vec<Vec<usize>> = Dit::param_layout(c)?.into_iter().map(|(_, s)| s).collect();
        let numel = |i: usize| shapes[i].iter().product::<usize>();
        let mut offsets = vec![usize::MAX; shapes.len()];
        let fb = final_base(c.depth);
        let ada: Vec<(usize, usize)> = (0..c.depth)
            .map(|i| (block_base(i) + ADA_W, block_base(i) + ADA_B))
            .chain(std::iter::once((fb + F_ADA_W, fb + F_ADA_B)))
            .collect();
        let mut at = 0;
        for &(w, _) in &ada {
            offsets[w] = at;
            at += numel(w);
        }
        let ada_b = at.next_multiple_of(ALIGN);
        at = ada_b;
        for &(_, b) in &ada {
            offsets[b] = at;
            at += numel(b);
        }
        for (i, off) in offsets.iter_mut().enumerate() {
            if *off == usize::MAX {
                at = at.next_multiple_of(ALIGN);
                *off = at;
                at += numel(i);
            }
        }
        Ok(ParamLayout {
            offsets,
            shapes,
            total: at.next_multiple_of(ALIGN),
            ada_w: 0,
            ada_b,
            ada_rows: (6 * c.depth + 2) * c.hidden,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The network.

/// A DiT's parameters on the GPU (f32), uploaded from a host [`Dit`] of one generation.
pub struct GpuDit {
    config: DitConfig,
    /// The host network's dtype: inputs are checked against it and outputs returned in it.
    host_dtype: DType,
    generation: u64,
    layout: ParamLayout,
    params: DeviceTensor,
    /// The position embedding f32 [N, C].
    pos: DeviceTensor,
    gpu: Gpu,
}

/// What the backward needs from a (dual) forward, on the device.
pub struct GpuDitCache {
    batch: usize,
    generation: u64,
    /// Class indices as i32 (stored in an f32 tensor's bits).
    idx: DeviceTensor,
    /// patches [T, P], temb [B, F], t_hidden, t_act, cond, sc [B, C], mods f32 [K, B, C].
    stem: Vec<DeviceTensor>,
    blocks: Vec<BlockCacheDev>,
    /// x_L [T, C], meanf, rstdf [T], hf [T, C] (rows 0..T of a stacked buffer in a dual forward).
    final_x: DeviceTensor,
    final_stats: Vec<DeviceTensor>,
    final_h: DeviceTensor,
}

impl GpuDitCache {
    /// The batch size of the forward that filled this cache.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

impl GpuDit {
    /// Uploads `dit`'s parameters (converted to f32) and position embedding. Errors, as every
    /// CPU pass does, when a parameter's shape or dtype differs from the layout (they can be
    /// replaced through [`Dit::params_mut`]).
    pub fn upload(dit: &Dit) -> Result<GpuDit> {
        // Before anything is copied: each parameter fills exactly its slot of the layout.
        dit.check_params()?;
        let layout = ParamLayout::new(dit.config())?;
        let gpu = Gpu::get()?;
        let mut host = vec![0f32; layout.total];
        for (i, p) in dit.params().iter().enumerate() {
            let dst = &mut host[layout.offsets[i]..][..p.numel()];
            match p.dtype() {
                F32 => dst.copy_from_slice(p.as_slice::<f32>()?),
                _ => {
                    for (d, v) in dst.iter_mut().zip(p.to_f64_vec()) {
                        *d = v as f32;
                        // A finite f64 beyond f32's range would reach the kernels as infinity.
                        if v.is_finite() && !d.is_finite() {
                            let names = Dit::param_layout(dit.config())?;
                            return Err(Error::invalid(
                                "GpuDit::upload",
                                format!(
                                    "parameter {} holds {v:e}, beyond f32's range (the GPU DiT \
                                     computes in f32)",
                                    names[i].0
                                ),
                            ));
                        }
                    }
                }
            }
        }
        let params = gpu.upload(&Tensor::from_vec(host, &[layout.total])?, F32)?;
        let pos = gpu.upload(dit.position_embedding(), F32)?;
        Ok(GpuDit {
            config: dit.config().clone(),
            host_dtype: dit.dtype(),
            generation: dit.generation(),
            layout,
            params,
            pos,
            gpu,
        })
    }

    /// The generation of the host parameters this copy holds.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The device holding the parameters; every pass runs on it.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Where each parameter lives in the device buffer; [`GpuDit::backward_device`]'s gradients
    /// share it.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn p(&self, i: usize) -> u64 {
        self.params.ptr() + (self.layout.offsets[i] * 4) as u64
    }

    /// The linear layer of parameters `w` and `b` in the buffer at `base`: the parameters
    /// themselves (`self.params`) or their gradients, which share the layout.
    fn lin_at(&self, base: u64, w: usize, b: usize, inp: usize, out: usize) -> Lin {
        let at = |i: usize| base + (self.layout.offsets[i] * 4) as u64;
        Lin {
            w: at(w),
            b: at(b),
            inp,
            out,
        }
    }

    fn block_params_at(&self, base_ptr: u64, i: usize) -> BlockParams {
        let at = |j: usize| base_ptr + (self.layout.offsets[block_base(i) + j] * 4) as u64;
        BlockParams {
            qkv_w: at(QKV_W),
            qkv_b: at(QKV_B),
            proj_w: at(PROJ_W),
            proj_b: at(PROJ_B),
            fc1_w: at(FC1_W),
            fc1_b: at(FC1_B),
            fc2_w: at(FC2_W),
            fc2_b: at(FC2_B),
        }
    }

    /// Block sizes for a batch of `b`.
    pub fn dims(&self, b: usize) -> BlockDims {
        let c = &self.config;
        let g = c.image_size / c.patch;
        BlockDims {
            b,
            n: g * g,
            c: c.hidden,
            heads: c.heads,
            hd: c.mlp_ratio * c.hidden,
        }
    }

    fn chunks(&self) -> usize {
        6 * self.config.depth + 2
    }

    /// The (dual) forward on device tensors: x f32 [B, Cin, S, S], t f32 \[B\], tangents optional.
    /// Returns the output, its tangent (when any input carried one) and the cache.
    pub fn run_device(
        &self,
        x: &DeviceTensor,
        tx: Option<&DeviceTensor>,
        t: &DeviceTensor,
        tt: Option<&DeviceTensor>,
        class: &[usize],
    ) -> Result<(DeviceTensor, Option<DeviceTensor>, GpuDitCache)> {
        self.run_device_with(x, tx, t, tt, class, true)
    }

    /// [`GpuDit::run_device`] for inference when `keep_blocks` is false: each block's buffers are
    /// released (stream-ordered) once the next block has read its output, so activation memory
    /// holds about two blocks instead of all of them; the returned cache then serves no backward.
    pub fn run_device_with(
        &self,
        x: &DeviceTensor,
        tx: Option<&DeviceTensor>,
        t: &DeviceTensor,
        tt: Option<&DeviceTensor>,
        class: &[usize],
        keep_blocks: bool,
    ) -> Result<(DeviceTensor, Option<DeviceTensor>, GpuDitCache)> {
        let c = &self.config;
        let b = class.len();
        let (cin, sz) = (c.in_channels, c.image_size);
        for (name, dt, shape, want) in [
            ("x", x.dtype(), x.shape(), vec![b, cin, sz, sz]),
            ("t", t.dtype(), t.shape(), vec![b]),
        ] {
            if dt != F32 || shape != want.as_slice() {
                return Err(Error::Shape {
                    op: OP,
                    tensor: name.into(),
                    expected: format!("{want:?} in f32"),
                    actual: shape.to_vec(),
                });
            }
        }
        for (name, tan, primal) in [("x", tx, x), ("t", tt, t)] {
            if let Some(tan) = tan {
                if tan.shape() != primal.shape() || tan.dtype() != F32 {
                    return Err(Error::TangentMismatch {
                        op: OP,
                        tensor: name.into(),
                        primal_shape: primal.shape().to_vec(),
                        primal_dtype: F32,
                        tangent_shape: tan.shape().to_vec(),
                        tangent_dtype: tan.dtype(),
                    });
                }
            }
        }
        if let Some((i, &k)) = class.iter().enumerate().find(|(_, &k)| k > c.num_classes) {
            return Err(Error::invalid(
                OP,
                format!(
                    "class[{i}] = {k} is out of range (null class {})",
                    c.num_classes
                ),
            ));
        }
        let d = self.dims(b);
        d.check()?;
        let gpu = &self.gpu;
        let (tn, hid, fd) = (d.t(), c.hidden, c.freq_dim);
        let pd = cin * c.patch * c.patch;
        let k = self.chunks();
        let m = k * hid;
        let dual = tx.is_some() || tt.is_some();
        let idx = upload_indices(gpu, class)?;

        // Stem: patches, time path, conditioning, every modulation vector.
        let stem_shapes: [&[usize]; 9] = [
            &[tn, pd],
            &[b],
            &[b, fd],
            &[b, hid],
            &[b, hid],
            &[b, hid],
            &[b, hid],
            &[b, m],
            &[k, b, hid],
        ];
        let st = gpu.alloc_stacked(&stem_shapes, F32)?;
        let [patches, cn, temb, t_hidden, t_act, cond, sc, modrows, mods] = &st[..] else {
            unreachable!("nine stem buffers")
        };
        let tst = if dual {
            Some(gpu.alloc_stacked(&stem_shapes, F32)?)
        } else {
            None
        };
        let tp = |i: usize| tst.as_ref().map_or(0, |v| v[i].ptr());
        let x0 = gpu.alloc_out(&[tn, hid], F32)?;
        let tx0 = match tx {
            Some(_) => Some(gpu.alloc_out(&[tn, hid], F32)?),
            None => None,
        };
        let xemb = self.lin_at(self.params.ptr(), X_W, X_B, pd, hid);
        let mut s = permute(
            F32,
            x.ptr(),
            patches.ptr(),
            moves::patchify(b, cin, sz, c.patch),
        )?;
        s.push(xemb.fwd(F32, tn, patches.ptr(), x0.ptr(), true));
        s.extend(kd::plan_add_rows(
            F32,
            x0.ptr(),
            self.pos.ptr(),
            tn * hid,
            d.n * hid,
        )?);
        if let (Some(tx), Some(tx0)) = (tx, &tx0) {
            s.extend(permute(
                F32,
                tx.ptr(),
                tp(0),
                moves::patchify(b, cin, sz, c.patch),
            )?);
            s.push(xemb.fwd(F32, tn, tp(0), tx0.ptr(), false));
        }
        // With a tangent on t the whole conditioning path carries one; else none (zero).
        let tc = tt.is_some();
        s.extend(kd::plan_scale_f32(t.ptr(), cn.ptr(), c.time_scale, b)?);
        if let Some(tt) = tt {
            s.extend(kd::plan_scale_f32(tt.ptr(), tp(1), c.time_scale, b)?);
        }
        s.extend(ew::plan_timestep(
            b,
            fd,
            DEFAULT_MAX_PERIOD,
            cn.ptr(),
            if tc { tp(1) } else { 0 },
            temb.ptr(),
            if tc { tp(2) } else { 0 },
        )?);
        let t1 = self.lin_at(self.params.ptr(), T1_W, T1_B, fd, hid);
        let t2 = self.lin_at(self.params.ptr(), T2_W, T2_B, hid, hid);
        let ada = Lin {
            w: self.params.ptr() + (self.layout.ada_w * 4) as u64,
            b: self.params.ptr() + (self.layout.ada_b * 4) as u64,
            inp: hid,
            out: m,
        };
        let silu = |u: u64, tu: u64, y: u64, ty: u64| -> Result<Vec<Step>> {
            if tc {
                ew::plan_activation_jvp(Activation::Silu, F32, b * hid, u, tu, y, ty)
            } else {
                ew::plan_activation_fwd(Activation::Silu, F32, b * hid, u, y)
            }
        };
        s.push(t1.fwd(F32, b, temb.ptr(), t_hidden.ptr(), true));
        if tc {
            s.push(t1.fwd(F32, b, tp(2), tp(3), false));
        }
        s.extend(silu(t_hidden.ptr(), tp(3), t_act.ptr(), tp(4))?);
        s.push(t2.fwd(F32, b, t_act.ptr(), cond.ptr(), true));
        if tc {
            s.push(t2.fwd(F32, b, tp(4), tp(5), false));
        }
        s.extend(kd::plan_add_class(
            F32,
            cond.ptr(),
            self.p(Y_TABLE),
            idx.ptr(),
            b,
            hid,
        )?);
        s.extend(silu(cond.ptr(), tp(5), sc.ptr(), tp(6))?);
        s.push(ada.fwd(F32, b, sc.ptr(), modrows.ptr(), true));
        s.extend(permute(
            F32,
            modrows.ptr(),
            mods.ptr(),
            moves::to_chunks(b, k, hid),
        )?);
        if tc {
            s.push(ada.fwd(F32, b, tp(6), tp(7), false));
            s.extend(permute(F32, tp(7), tp(8), moves::to_chunks(b, k, hid))?);
        }
        gpu.run(&s)?;

        // Blocks.
        let mut xcur = x0;
        let mut txcur = tx0;
        let mut blocks = Vec::with_capacity(c.depth);
        for i in 0..c.depth {
            let alloc = BlockAlloc::new(gpu, F32, d, &xcur, txcur.as_ref(), dual)?;
            let m_i = Mods::chunks(mods.ptr(), 6 * i, b, hid);
            let tm_i = tc.then(|| Mods::chunks(tp(8), 6 * i, b, hid));
            gpu.run(&plan_block_forward(
                gpu.arch(),
                F32,
                d,
                &self.block_params_at(self.params.ptr(), i),
                &m_i,
                tm_i.as_ref(),
                &alloc.bufs,
                alloc.tangents.as_ref(),
            )?)?;
            xcur = alloc.out.clone();
            txcur = alloc.tout.clone();
            if keep_blocks {
                blocks.push(alloc.into_cache());
            }
            // Otherwise `alloc` drops here: its buffers are freed after the queued kernels, except
            // the output, which `xcur` (and `txcur`) hold until the next block has read it.
        }

        // Final layer: modulated layernorm, linear, unpatchify.
        let fin = gpu.alloc_stacked(&[&[tn], &[tn]], F32)?;
        let hrows = if dual { 2 * tn } else { tn };
        let fo = gpu.alloc_stacked(&[&[hrows, hid], &[tn, pd], &[b, cin, sz, sz]], F32)?;
        let (hf, yf) = (&fo[0], &fo[1]);
        let out = fo[2].clone();
        let fm = |base: u64, j: usize| base + ((6 * c.depth + j) * b * hid * 4) as u64;
        let (shift_f, scale_f) = (fm(mods.ptr(), 0), fm(mods.ptr(), 1));
        let lin = Lin {
            w: self.p(final_base(c.depth) + F_LIN_W),
            b: self.p(final_base(c.depth) + F_LIN_B),
            inp: hid,
            out: pd,
        };
        let mut s = Vec::new();
        let mut tout = None;
        if dual {
            let tf = gpu.alloc_stacked(&[&[tn, pd], &[b, cin, sz, sz]], F32)?;
            let thf = hf.ptr() + (tn * hid * 4) as u64;
            s.extend(ln::plan_jvp(
                F32,
                d.ln(),
                ln::JvpPtrs {
                    x: xcur.ptr(),
                    tx: txcur.as_ref().map_or(0, |t| t.ptr()),
                    scale: scale_f,
                    shift: shift_f,
                    tscale: if tc { fm(tp(8), 1) } else { 0 },
                    tshift: if tc { fm(tp(8), 0) } else { 0 },
                    y: hf.ptr(),
                    ty: thf,
                    mean: fin[0].ptr(),
                    rstd: fin[1].ptr(),
                },
                EPS,
            )?);
            s.push(lin.fwd(F32, tn, hf.ptr(), yf.ptr(), true));
            s.push(lin.fwd(F32, tn, thf, tf[0].ptr(), false));
            let un = moves::unpatchify(b, cin, sz, c.patch);
            s.extend(permute(F32, yf.ptr(), out.ptr(), un.clone())?);
            s.extend(permute(F32, tf[0].ptr(), tf[1].ptr(), un)?);
            tout = Some(tf[1].clone());
        } else {
            s.extend(ln::plan_forward(
                F32,
                d.ln(),
                xcur.ptr(),
                scale_f,
                shift_f,
                hf.ptr(),
                fin[0].ptr(),
                fin[1].ptr(),
                EPS,
            )?);
            s.push(lin.fwd(F32, tn, hf.ptr(), yf.ptr(), true));
            s.extend(permute(
                F32,
                yf.ptr(),
                out.ptr(),
                moves::unpatchify(b, cin, sz, c.patch),
            )?);
        }
        gpu.run(&s)?;
        let cache = GpuDitCache {
            batch: b,
            generation: self.generation,
            idx,
            stem: st,
            blocks,
            final_x: xcur,
            final_stats: fin,
            final_h: hf.view(0, &[tn, hid])?,
        };
        Ok((out, tout, cache))
    }

    /// Parameter gradients, f32 in the device layout ([`ParamLayout`]: \[total\] elements), given
    /// the output cotangent f32 [B, Cin, S, S].
    pub fn backward_device(
        &self,
        cache: &GpuDitCache,
        gout: &DeviceTensor,
    ) -> Result<DeviceTensor> {
        let c = &self.config;
        let b = cache.batch;
        let (cin, sz) = (c.in_channels, c.image_size);
        if cache.generation != self.generation {
            return Err(Error::invalid(
                OP,
                "the cache comes from a forward with other parameters (another generation)",
            ));
        }
        if cache.blocks.len() != c.depth {
            return Err(Error::invalid(
                OP,
                "the cache comes from an inference pass (forward or jvp), which keeps no block \
                 activations: run forward_train or forward_dual for a backward",
            ));
        }
        let want = [b, cin, sz, sz];
        if gout.shape() != want || gout.dtype() != F32 {
            return Err(Error::Shape {
                op: OP,
                tensor: "gout".into(),
                expected: format!("{want:?} in f32"),
                actual: gout.shape().to_vec(),
            });
        }
        let d = self.dims(b);
        let gpu = &self.gpu;
        let (tn, hid, fd) = (d.t(), c.hidden, c.freq_dim);
        let pd = cin * c.patch * c.patch;
        let k = self.chunks();
        let m = k * hid;
        let grads = gpu.alloc_out(&[self.layout.total], F32)?;
        let gp = |i: usize| grads.ptr() + (self.layout.offsets[i] * 4) as u64;
        let sc = gpu.alloc_stacked(
            &[
                &[tn, pd],
                &[tn, hid],
                &[tn],
                &[k, b, hid],
                &[b, m],
                &[b, hid],
                &[b, hid],
                &[b, hid],
                &[b, hid],
            ],
            F32,
        )?;
        let [gy, dx, ones, dmods, dmodrows, dsc, dc, dt_act, dt_hidden] = &sc[..] else {
            unreachable!("nine scratch buffers")
        };
        let blk = BlockGradAlloc::new(gpu, F32, d, dx.ptr(), ones.ptr())?;
        let [patches, temb, t_hidden, t_act, cond, scv, _modrows, mods] = [
            &cache.stem[0],
            &cache.stem[2],
            &cache.stem[3],
            &cache.stem[4],
            &cache.stem[5],
            &cache.stem[6],
            &cache.stem[7],
            &cache.stem[8],
        ];
        let (width, bits) = one_bits(F32);
        let mut s = vec![Step::Fill {
            ptr: ones.ptr(),
            width,
            count: tn,
            bits,
        }];
        // Final layer.
        let fb = final_base(c.depth);
        let lin = self.lin_at(self.params.ptr(), fb + F_LIN_W, fb + F_LIN_B, hid, pd);
        let glin = self.lin_at(grads.ptr(), fb + F_LIN_W, fb + F_LIN_B, hid, pd);
        s.extend(permute(
            F32,
            gout.ptr(),
            gy.ptr(),
            moves::patchify(b, cin, sz, c.patch),
        )?);
        // dh of the final layernorm reuses the block scratch `dh`.
        let dhf = blk.grads.dh;
        s.extend(lin.bwd(
            F32,
            tn,
            cache.final_h.ptr(),
            gy.ptr(),
            ones.ptr(),
            glin,
            dhf,
        ));
        let fm = |base: u64, j: usize| base + ((6 * c.depth + j) * b * hid * 4) as u64;
        s.extend(ln::plan_backward(
            F32,
            d.ln(),
            ln::BwdPtrs {
                dy: dhf,
                x: cache.final_x.ptr(),
                scale: fm(mods.ptr(), 1),
                mean: cache.final_stats[0].ptr(),
                rstd: cache.final_stats[1].ptr(),
                dres: 0,
                dx: dx.ptr(),
                dscale: fm(dmods.ptr(), 1),
                dshift: fm(dmods.ptr(), 0),
            },
        )?);
        gpu.run(&s)?;
        // Blocks, last first.
        for i in (0..c.depth).rev() {
            let mut g = blk.grads;
            g.dmods = Mods::chunks(dmods.ptr(), 6 * i, b, hid);
            g.dp = self.block_params_at(grads.ptr(), i);
            gpu.run(&plan_block_backward(
                gpu.arch(),
                F32,
                d,
                &self.block_params_at(self.params.ptr(), i),
                &Mods::chunks(mods.ptr(), 6 * i, b, hid),
                &cache.blocks[i].bufs,
                &g,
            )?)?;
        }
        // Patch embedding (its input cotangent is not needed).
        let xemb = self.lin_at(self.params.ptr(), X_W, X_B, pd, hid);
        let gxemb = self.lin_at(grads.ptr(), X_W, X_B, pd, hid);
        let mut s = xemb.bwd(F32, tn, patches.ptr(), dx.ptr(), ones.ptr(), gxemb, 0);
        // Every modulation linear at once: dmods (chunk-major) back to rows [B, M].
        s.extend(permute(
            F32,
            dmods.ptr(),
            dmodrows.ptr(),
            moves::from_chunks(b, k, hid),
        )?);
        let ada = Lin {
            w: self.params.ptr() + (self.layout.ada_w * 4) as u64,
            b: 0,
            inp: hid,
            out: m,
        };
        let gada = Lin {
            w: grads.ptr() + (self.layout.ada_w * 4) as u64,
            b: grads.ptr() + (self.layout.ada_b * 4) as u64,
            inp: hid,
            out: m,
        };
        s.extend(ada.bwd(
            F32,
            b,
            scv.ptr(),
            dmodrows.ptr(),
            ones.ptr(),
            gada,
            dsc.ptr(),
        ));
        // Conditioning c = t_mlp + table[class], sc = silu(c).
        s.extend(ew::plan_activation_bwd(
            Activation::Silu,
            F32,
            b * hid,
            cond.ptr(),
            dsc.ptr(),
            dc.ptr(),
        )?);
        s.extend(kd::plan_class_grad(
            F32,
            dc.ptr(),
            cache.idx.ptr(),
            gp(Y_TABLE),
            b,
            c.num_classes + 1,
            hid,
        )?);
        let t2 = self.lin_at(self.params.ptr(), T2_W, T2_B, hid, hid);
        let gt2 = self.lin_at(grads.ptr(), T2_W, T2_B, hid, hid);
        s.extend(t2.bwd(F32, b, t_act.ptr(), dc.ptr(), ones.ptr(), gt2, dt_act.ptr()));
        s.extend(ew::plan_activation_bwd(
            Activation::Silu,
            F32,
            b * hid,
            t_hidden.ptr(),
            dt_act.ptr(),
            dt_hidden.ptr(),
        )?);
        let t1 = self.lin_at(self.params.ptr(), T1_W, T1_B, fd, hid);
        let gt1 = self.lin_at(grads.ptr(), T1_W, T1_B, fd, hid);
        s.extend(t1.bwd(F32, b, temb.ptr(), dt_hidden.ptr(), ones.ptr(), gt1, 0));
        gpu.run(&s)?;
        Ok(grads)
    }

    /// Gradients in the device layout (f32 \[total\], as [`GpuDit::backward_device`] returns
    /// them) → host tensors in canonical order, in the host dtype.
    pub fn grads_to_host(&self, grads: &DeviceTensor) -> Result<Vec<Tensor>> {
        expect_device("grads", grads, &[self.layout.total], F32)?;
        let all = grads.download()?;
        let v = all.as_slice::<f32>()?;
        self.layout
            .offsets
            .iter()
            .zip(&self.layout.shapes)
            .map(|(&off, shape)| {
                let n: usize = shape.iter().product();
                let t = Tensor::from_vec(v[off..off + n].to_vec(), shape)?;
                Ok(if self.host_dtype == F32 {
                    t
                } else {
                    t.to_dtype(self.host_dtype)
                })
            })
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // Host-level entry points, mirroring `Dit`'s (inputs and outputs in the host network's dtype).

    /// The dual forward from host tensors: tangents on x and t (either may be absent); the cache
    /// serves [`GpuDit::backward`].
    pub fn forward_dual(&self, x: &Dual, t: &Dual, class: &[usize]) -> Result<(Dual, GpuDitCache)> {
        self.dual_pass(x, t, class, true)
    }

    /// The output and its tangent without a backward to serve (the JVP a distillation target
    /// needs, sampling): block activations are freed as the pass goes.
    pub fn jvp(&self, x: &Dual, t: &Dual, class: &[usize]) -> Result<Dual> {
        self.dual_pass(x, t, class, false).map(|(y, _)| y)
    }

    fn dual_pass(
        &self,
        x: &Dual,
        t: &Dual,
        class: &[usize],
        keep_blocks: bool,
    ) -> Result<(Dual, GpuDitCache)> {
        // The device computes c_noise in f32 whatever the host dtype.
        check_inputs(&self.config, self.host_dtype, F32, x, t, class)?;
        let gpu = &self.gpu;
        let up = |v: &Tensor| gpu.upload(v, F32);
        let xd = up(&x.primal)?;
        let td = up(&t.primal)?;
        let txd = x.tangent.as_ref().map(up).transpose()?;
        let ttd = t.tangent.as_ref().map(up).transpose()?;
        let (y, ty, cache) =
            self.run_device_with(&xd, txd.as_ref(), &td, ttd.as_ref(), class, keep_blocks)?;
        let host = |d: &DeviceTensor| -> Result<Tensor> {
            let v = d.download()?;
            Ok(if self.host_dtype == F32 {
                v
            } else {
                v.to_dtype(self.host_dtype)
            })
        };
        let primal = host(&y)?;
        let tangent = ty.as_ref().map(host).transpose()?;
        Ok((Dual { primal, tangent }, cache))
    }

    /// The forward keeping what the backward needs.
    pub fn forward_train(
        &self,
        x: &Tensor,
        t: &Tensor,
        class: &[usize],
    ) -> Result<(Tensor, GpuDitCache)> {
        let (y, cache) = self.forward_dual(
            &Dual::constant(x.clone()),
            &Dual::constant(t.clone()),
            class,
        )?;
        Ok((y.primal, cache))
    }

    /// The velocity F(x, t, class), keeping no activations for a backward (inference).
    pub fn forward(&self, x: &Tensor, t: &Tensor, class: &[usize]) -> Result<Tensor> {
        self.jvp(
            &Dual::constant(x.clone()),
            &Dual::constant(t.clone()),
            class,
        )
        .map(|y| y.primal)
    }

    /// Parameter gradients (canonical order, host dtype) for the output cotangent `gout`.
    pub fn backward(&self, cache: &GpuDitCache, gout: &Tensor) -> Result<Vec<Tensor>> {
        let c = &self.config;
        crate::ops::expect_dtype("dit_backward", "gout", gout, self.host_dtype)?;
        crate::ops::expect_shape(
            "dit_backward",
            "gout",
            gout,
            &[cache.batch, c.in_channels, c.image_size, c.image_size],
        )?;
        let g = self.gpu.upload(gout, F32)?;
        let grads = self.backward_device(cache, &g)?;
        self.grads_to_host(&grads)
    }
}

/// Class indices as an i32 device vector (carried in an f32 tensor's bit patterns, which uploads
/// copy verbatim).
fn upload_indices(gpu: &Gpu, class: &[usize]) -> Result<DeviceTensor> {
    let bits: Vec<f32> = class
        .iter()
        .map(|&k| {
            i32::try_from(k)
                .map(|v| f32::from_bits(v as u32))
                .map_err(|_| Error::invalid(OP, format!("class index {k} does not fit an i32")))
        })
        .collect::<Result<_>>()?;
    gpu.upload(&Tensor::from_vec(bits, &[class.len()])?, F32)
}

#[cfg(test)]
mod tests {
    use super::super::shuffle;
    use super::*;

    fn arange(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|i| i as f64 * 0.5 + 1.0).collect(), shape).unwrap()
    }

    fn apply(x: &Tensor, m: (Vec<usize>, Vec<usize>)) -> Vec<f64> {
        moves::apply(&x.to_f64_vec(), &m.0, &m.1)
    }

    #[test]
    fn permutations_match_the_cpu_shuffles() {
        // Patches of a [2, 3, 6, 6] image, patch 2, and back.
        let x = arange(&[2, 3, 6, 6]);
        let p = shuffle::patchify(&x, 3, 6, 2).unwrap();
        assert_eq!(apply(&x, moves::patchify(2, 3, 6, 2)), p.to_f64_vec());
        assert_eq!(apply(&p, moves::unpatchify(2, 3, 6, 2)), x.to_f64_vec());
        // Fused qkv rows [B·N, 3C] with B 2, N 5, heads 3, dh 4.
        let (b, n, h, dh) = (2, 5, 3, 4);
        let qkv = arange(&[b * n, 3 * h * dh]);
        let heads = apply(&qkv, moves::split_qkv(b, n, h, dh));
        let part = b * h * n * dh;
        for (j, off) in [0, h * dh, 2 * h * dh].into_iter().enumerate() {
            let want = shuffle::gather_heads(&qkv, b, n, h, dh, 3 * h * dh, off).unwrap();
            assert_eq!(
                &heads[j * part..(j + 1) * part],
                want.to_f64_vec().as_slice()
            );
        }
        // The packed layout the attention kernels read is that permutation: element [b, h, n, e] of
        // q (k, v) sits at offset j·C + b·sb + h·sh + n·sn + e of the rows.
        let dims = attn::AttnDims {
            b,
            h,
            nq: n,
            nk: n,
            d: dh,
            dv: dh,
        };
        let l = attn::Layout::packed_qkv(dims);
        let q = qkv.to_f64_vec();
        for (j, st) in [l.q, l.k, l.v].into_iter().enumerate() {
            for (i, want) in heads[j * part..(j + 1) * part].iter().enumerate() {
                let (bi, hi, ni, e) = (i / (h * n * dh), i / (n * dh) % h, i / dh % n, i % dh);
                let off = j * h * dh + bi * st.b + hi * st.h + ni * st.n + e;
                assert_eq!(q[off], *want, "operand {j} element {i}");
            }
        }
        // One tensor of heads to rows, and the token-major o layout is that permutation too.
        let o = arange(&[b, h, n, dh]);
        let rows = shuffle::merge_heads(&[&o], b, n, h, dh).unwrap();
        assert_eq!(
            apply(&o, moves::merge_heads(b, n, h, dh)),
            rows.to_f64_vec()
        );
        let r = rows.to_f64_vec();
        for (i, want) in o.to_f64_vec().iter().enumerate() {
            let (bi, hi, ni, e) = (i / (h * n * dh), i / (n * dh) % h, i / dh % n, i % dh);
            assert_eq!(r[bi * l.o.b + hi * l.o.h + ni * l.o.n + e], *want);
        }
        // Modulation rows [B, K·C] to chunks [K, B, C] and back.
        let mrows = arange(&[3, 4 * 5]);
        let chunks = shuffle::split_cols(&mrows, 4).unwrap();
        let flat: Vec<f64> = chunks.iter().flat_map(|t| t.to_f64_vec()).collect();
        assert_eq!(apply(&mrows, moves::to_chunks(3, 4, 5)), flat);
        let ft = Tensor::from_vec(flat, &[4, 3, 5]).unwrap();
        assert_eq!(apply(&ft, moves::from_chunks(3, 4, 5)), mrows.to_f64_vec());
    }

    #[test]
    fn the_layout_keeps_every_modulation_weight_together() {
        let c = DitConfig {
            image_size: 8,
            in_channels: 1,
            patch: 2,
            hidden: 12,
            depth: 3,
            heads: 2,
            mlp_ratio: 2,
            num_classes: 4,
            freq_dim: 6,
            time_scale: 1.0,
        };
        let l = ParamLayout::new(&c).unwrap();
        let h = c.hidden;
        assert_eq!(l.ada_rows, 20 * h);
        for i in 0..c.depth {
            assert_eq!(l.offsets[block_base(i) + ADA_W], i * 6 * h * h);
            assert_eq!(l.offsets[block_base(i) + ADA_B], l.ada_b + i * 6 * h);
        }
        let fb = final_base(c.depth);
        assert_eq!(l.offsets[fb + F_ADA_W], 18 * h * h);
        assert_eq!(l.offsets[fb + F_ADA_B], l.ada_b + 18 * h);
        assert!(l.ada_b >= l.ada_rows * h && l.ada_b % ALIGN == 0);
        // Disjoint ranges inside the buffer; the other parameters 256-byte aligned.
        let mut ranges: Vec<(usize, usize)> = l
            .offsets
            .iter()
            .zip(&l.shapes)
            .map(|(&o, s)| (o, o + s.iter().product::<usize>()))
            .collect();
        ranges.sort();
        assert!(ranges.windows(2).all(|w| w[0].1 <= w[1].0));
        assert!(ranges.last().unwrap().1 <= l.total);
        for i in [X_W, X_B, T1_W, Y_TABLE, block_base(1) + QKV_W, fb + F_LIN_B] {
            assert_eq!(l.offsets[i] % ALIGN, 0, "parameter {i}");
        }
    }
}
