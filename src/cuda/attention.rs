//! Launchers of cuda/attention_jvp.cu (forward, JVP, JVP with constant K and V) and
//! cuda/attention_bwd.cu (preprocess, dK/dV, dQ), and of their dv ≠ d instantiations in
//! cuda/attention_jvp_dv.cu and cuda/attention_bwd_dv.cu; the launch contract is cuda/README.md's.
//!
//! Limits checked here (errors, never a launch): head dims d (q, k) and dv (v) each 32, 64, 72, 96
//! or 128, any pair; 16-bit tensors 16-byte aligned (cp.async); B·H ≤ 65535 (grid y); Nq, Nk and
//! B·H·Nq fit an `int`; dynamic shared memory within the device's opt-in limit (checked at launch).
//!
//! Every kernel reads q, k, v and writes o (and their tangents / gradients) in any [`Layout`] of
//! per-operand [B, H, N, d] strides; the plan functions take one. [`forward_packed`],
//! [`jvp_packed`] and [`backward_packed`] run on a packed projection qkv [B, N, 3, H, d] in place,
//! with o token-major [B, N, H, d] (the DiT's layout: no permutation around attention).
//!
//! Keys padded per batch entry (`key_lens`, Wan's `k_lens` and `seq_lens`): [`forward_with_key_lens`],
//! [`jvp_with_key_lens`], [`backward_with_key_lens`], their packed forms
//! ([`jvp_packed_with_key_lens`] ...) and, on memory another library owns, [`plan_for_key_lens`]
//! and [`plan_backward_for_key_lens`] (any layout) run the same kernels once per batch entry with
//! Nk = key_lens\[b\] and that entry's pointers ([`plan_per_key_len`]): the padding is never read
//! and costs no work, at one launch per entry. The backward zeroes the padding rows of dk and dv
//! first, with a plain fill or a 2D memset per padded entry.
//!
//! On device tensors (no host round trip; every failure, a missing driver or GPU included, is an
//! error value):
//!
//! ```no_run
//! use flashjvp::cuda::{attention, Gpu};
//! use flashjvp::{DType, Tensor};
//! use rand::{rngs::StdRng, SeedableRng};
//!
//! fn main() -> flashjvp::Result<()> {
//!     let gpu = Gpu::get()?;
//!     let mut rng = StdRng::seed_from_u64(0);
//!     let shape = [1, 12, 4096, 128]; // [B, H, N, d]
//!     let mut randn = || gpu.upload(&Tensor::randn(&shape, DType::F32, &mut rng), DType::BF16);
//!     let (q, k, v, tq) = (randn()?, randn()?, randn()?, randn()?);
//!     // Tangent on q only (k and v constant): the four-product kernel; on Hopper the sm_90a one.
//!     let r = attention::jvp(&q, &k, &v, Some(&tq), None, None, None)?;
//!     let o_dot = r.to.expect("q carries a tangent").download()?; // bf16 [1, 12, 4096, 128]
//!     let lse_dot = r.tlse.expect("q carries a tangent").download()?; // f32 [1, 12, 4096]
//!     println!("{:?} {:?}", o_dot.shape(), lse_dot.shape());
//!     Ok(())
//! }
//! ```
//!
//! On memory another library owns (a framework's tensors, by device address): a plan is a list of
//! launches built from addresses and sizes, checked like the tensor entry points, and
//! [`Gpu::run`] queues it on the legacy default stream of the process's device's primary context
//! (device 0, or the one `FLASHJVP_DEVICE` or [`Gpu::select`] names), which is
//! ordered with the other blocking streams of the process (PyTorch's default stream among them);
//! for work on a non-blocking stream of your own, [`Gpu::run_on_stream`] queues the plan on it
//! instead.
//!
//! ```no_run
//! use flashjvp::cuda::{attention as attn, attention_sm90, Gpu};
//! use flashjvp::DType;
//!
//! /// o, ȯ (bf16, [B, H, N, d] contiguous) and lse, its tangent (f32 [B, H, N]) at addresses the
//! /// caller owns, from q, k, v and their tangents there.
//! fn attention_jvp_in_place(shape: [usize; 4], ptrs: attn::JvpPtrs) -> flashjvp::Result<()> {
//!     let gpu = Gpu::get()?;
//!     let dims = attn::check_shapes(&shape, &shape, &shape)?;
//!     let scale = 1.0 / (shape[3] as f32).sqrt();
//!     // The sm_90a kernels on Hopper where they apply, the sm_80 ones elsewhere (on the shorter
//!     // key tiles of a 99 KiB device there): the plan is made for this device's arch.
//!     let plan = attention_sm90::plan_for(
//!         gpu.arch(),
//!         attn::Variant::Jvp,
//!         DType::BF16,
//!         dims,
//!         attn::Layout::contiguous(dims),
//!         ptrs,
//!         scale,
//!     )?;
//!     gpu.run(&plan)?; // asynchronous: a kernel's failure surfaces at the next synchronisation
//!     gpu.synchronize()
//! }
//! ```

use super::context::Gpu;
use super::launch::{dtype_suffix, int_arg, require_ptrs, Arg, Launch, Step};
use super::tensor::{check_disjoint, expect_tensor, DeviceTensor};
use crate::error::{Error, Result};
use crate::tensor::DType;

const OP: &str = "attention";

/// The head dims the kernels are instantiated for, for d (q, k) and dv (v) alike: every pair.
pub const HEAD_DIMS: [usize; 5] = [32, 64, 72, 96, 128];

/// The head-dim part of a kernel name: `_d{d}` when dv == d, `_d{d}_dv{dv}` otherwise.
fn head_suffix(d: usize, dv: usize) -> String {
    if d == dv {
        format!("_d{d}")
    } else {
        format!("_d{d}_dv{dv}")
    }
}

/// Which kernel of attention_jvp.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// `attention_jvp_*`: tangents on q, k and v.
    Jvp,
    /// `attention_jvp_nokv_*`: k and v carry no tangent.
    JvpNoKv,
    /// `attention_fwd_*`: primal only.
    Fwd,
}

impl Variant {
    fn prefix(self) -> &'static str {
        match self {
            Variant::Jvp => "attention_jvp",
            Variant::JvpNoKv => "attention_jvp_nokv",
            Variant::Fwd => "attention_fwd",
        }
    }
}

/// Sizes of one attention problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    /// Batch size B.
    pub b: usize,
    /// Heads H.
    pub h: usize,
    /// Query rows Nq (of q and o).
    pub nq: usize,
    /// Key rows Nk (of k and v).
    pub nk: usize,
    /// Head dim of q and k.
    pub d: usize,
    /// Head dim of v (and of o).
    pub dv: usize,
}

impl AttnDims {
    /// The shape of q, its tangent and its gradient: [B, H, Nq, d].
    pub fn q_shape(&self) -> [usize; 4] {
        [self.b, self.h, self.nq, self.d]
    }
    /// The shape of k, its tangent and its gradient: [B, H, Nk, d].
    pub fn k_shape(&self) -> [usize; 4] {
        [self.b, self.h, self.nk, self.d]
    }
    /// The shape of v, its tangent and its gradient: [B, H, Nk, dv].
    pub fn v_shape(&self) -> [usize; 4] {
        [self.b, self.h, self.nk, self.dv]
    }
    /// The shape of o, its tangent and its cotangent: [B, H, Nq, dv].
    pub fn o_shape(&self) -> [usize; 4] {
        [self.b, self.h, self.nq, self.dv]
    }
    /// The shape of lse, its tangent and the backward's delta (f32): [B, H, Nq].
    pub fn lse_shape(&self) -> [usize; 3] {
        [self.b, self.h, self.nq]
    }
}

/// Checks q \[B,H,Nq,d\], k \[B,H,Nk,d\], v \[B,H,Nk,dv\] (naming the tensor in errors, as the CPU op
/// does) and what the kernels support (head dims, grid and int limits).
pub fn check_shapes(q: &[usize], k: &[usize], v: &[usize]) -> Result<AttnDims> {
    let rank4 = |name: &str, s: &[usize]| -> Result<()> {
        if s.len() != 4 {
            return Err(Error::Rank {
                op: OP,
                tensor: name.into(),
                expected: 4,
                actual: s.to_vec(),
            });
        }
        Ok(())
    };
    rank4("q", q)?;
    rank4("k", k)?;
    rank4("v", v)?;
    let (b, h, nq, d) = (q[0], q[1], q[2], q[3]);
    let (nk, dv) = (k[2], v[3]);
    let shape = |name: &str, s: &[usize], want: [usize; 4]| -> Result<()> {
        if s != want {
            return Err(Error::Shape {
                op: OP,
                tensor: name.into(),
                expected: format!("{want:?}"),
                actual: s.to_vec(),
            });
        }
        Ok(())
    };
    shape("k", k, [b, h, nk, d])?;
    shape("v", v, [b, h, nk, dv])?;
    let dims = AttnDims {
        b,
        h,
        nq,
        nk,
        d,
        dv,
    };
    dims.check()?;
    Ok(dims)
}

impl AttnDims {
    /// Errors unless the kernels take these sizes: every dim at least 1, head dims among
    /// [`HEAD_DIMS`], B·H within the grid's y dimension, Nq, Nk and B·H·Nq within the kernels'
    /// 32-bit ints. [`check_shapes`] runs it; so does every plan, for dims built by hand.
    pub fn check(&self) -> Result<()> {
        let AttnDims {
            b,
            h,
            nq,
            nk,
            d,
            dv,
        } = *self;
        let (q, v) = (self.q_shape(), [b, h, nk, dv]);
        if [b, h, nq, nk, d, dv].contains(&0) {
            return Err(Error::invalid(
                OP,
                format!(
                    "empty dimension: q {q:?}, k {:?}, v {v:?} (B, H, Nq, Nk, d and dv must all be \
                     at least 1)",
                    self.k_shape()
                ),
            ));
        }
        if !HEAD_DIMS.contains(&d) || !HEAD_DIMS.contains(&dv) {
            let bad = match (HEAD_DIMS.contains(&d), HEAD_DIMS.contains(&dv)) {
                (false, false) if d == dv => format!("head dim {d} of q, k and v is"),
                (false, false) => format!("head dims {d} of q and {dv} of v are"),
                (false, true) => format!("head dim {d} of q (and k) is"),
                _ => format!("head dim {dv} of v is"),
            };
            return Err(Error::Unsupported(format!(
                "attention on the GPU: q {q:?}, v {v:?}: {bad} not supported; the kernels take d \
                 (q, k) and dv (v) in {HEAD_DIMS:?}, any pair"
            )));
        }
        // Saturating: dims from outside may be anything, and a wrapped product would pass.
        let bh = b.saturating_mul(h);
        if bh > 65535 {
            return Err(Error::Unsupported(format!(
                "attention on the GPU: B*H = {b}*{h} exceeds 65535 (the grid's y dimension)"
            )));
        }
        for (name, n) in [("Nq", nq), ("Nk", nk), ("B*H*Nq", bh.saturating_mul(nq))] {
            int_arg("attention on the GPU", name, n)?;
        }
        Ok(())
    }
}

/// Element strides of one attention operand viewed as [B, H, N, d] (its last axis contiguous): a
/// contiguous tensor has `b = H·N·d, h = N·d, n = d`; the rows of a packed qkv projection
/// [B, N, 3, H, d] have `b = N·3·H·d, h = d, n = 3·H·d` (with k and v at offsets H·d and 2·H·d).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Strides {
    /// Elements from one batch entry to the next.
    pub b: usize,
    /// Elements from one head to the next.
    pub h: usize,
    /// Elements from one row (token) to the next.
    pub n: usize,
}

impl Strides {
    /// A contiguous [B, H, N, d] tensor.
    pub fn contiguous(h: usize, n: usize, d: usize) -> Self {
        // Saturating, so that any dims make a layout (which the plans then refuse, with the dims).
        Strides {
            b: h.saturating_mul(n).saturating_mul(d),
            h: n.saturating_mul(d),
            n: d,
        }
    }

    /// Heads of a token-major [B, N, H, d] tensor that sits `group` heads wide per token (a packed
    /// [B, N, 3, H, d] projection has `group = 3·H`; a merged [B, N, H, d] output `group = H`).
    pub fn token_major(n: usize, group: usize, d: usize) -> Self {
        Strides {
            b: n.saturating_mul(group).saturating_mul(d),
            h: d,
            n: group.saturating_mul(d),
        }
    }

    /// One past the largest element offset the [b, h, n, d] view touches: 0 when any extent is 0
    /// (the view touches nothing), `None` when it does not fit a `usize`.
    pub fn span(&self, b: usize, h: usize, n: usize, d: usize) -> Option<usize> {
        if [b, h, n, d].contains(&0) {
            return Some(0);
        }
        [(b, self.b), (h, self.h), (n, self.n)]
            .into_iter()
            .try_fold(d, |acc, (extent, stride)| {
                acc.checked_add((extent - 1).checked_mul(stride)?)
            })
    }

    /// Errors unless the [b, h, n, d] elements (the last axis contiguous) of this layout are
    /// distinct, so that a kernel writing them without atomics writes each once: its axes sorted
    /// by stride, each must step past everything the smaller ones span. The error names the
    /// tensor (`name`), the strides, the axes (`axes`, e.g. "[B, H, Nq, dv]") and the shape.
    fn check_distinct(&self, name: &str, axes: &str, shape: [usize; 4]) -> Result<()> {
        let [b, h, n, d] = shape;
        let mut sorted = [(self.n, n), (self.h, h), (self.b, b)];
        sorted.sort();
        let mut covered = d;
        for (stride, extent) in sorted {
            if extent > 1 {
                if stride < covered {
                    return Err(Error::invalid(
                        OP,
                        format!(
                            "layout of `{name}` {self:?} overlaps itself for {axes} = {shape:?}"
                        ),
                    ));
                }
                // Within the span (checked by Layout::check), but checked all the same: a wrapped
                // sum would pass the next comparison.
                covered = stride
                    .checked_mul(extent - 1)
                    .and_then(|x| covered.checked_add(x))
                    .ok_or_else(|| {
                        Error::invalid(
                            OP,
                            format!(
                                "layout of `{name}` {self:?} spans more elements than a usize \
                                 holds for {axes} = {shape:?}"
                            ),
                        )
                    })?;
            }
        }
        Ok(())
    }

    /// The kernels' arguments: batch, head and row strides as `long long`.
    pub fn args(&self) -> [Arg; 3] {
        [
            Arg::I64(self.b as i64),
            Arg::I64(self.h as i64),
            Arg::I64(self.n as i64),
        ]
    }
}

/// Memory layouts of q, k, v and o. Each tangent and each gradient has the layout of its primal
/// (tq, dq: q's; tk, dk: k's; tv, dv: v's; to, dout: o's); lse, its tangent and the backward's
/// delta are always contiguous f32 [B, H, Nq].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Strides of q [B, H, Nq, d] (and of tq, dq).
    pub q: Strides,
    /// Strides of k [B, H, Nk, d] (and of tk, dk).
    pub k: Strides,
    /// Strides of v [B, H, Nk, dv] (and of tv, dv).
    pub v: Strides,
    /// Strides of o [B, H, Nq, dv] (and of to, dout).
    pub o: Strides,
}

impl Layout {
    /// Every operand contiguous [B, H, N, d].
    pub fn contiguous(dims: AttnDims) -> Self {
        Layout {
            q: Strides::contiguous(dims.h, dims.nq, dims.d),
            k: Strides::contiguous(dims.h, dims.nk, dims.d),
            v: Strides::contiguous(dims.h, dims.nk, dims.dv),
            o: Strides::contiguous(dims.h, dims.nq, dims.dv),
        }
    }

    /// q, k and v read in place from a packed [B, N, 3, H, d] projection (Nq = Nk = N, dv = d), o
    /// written token-major [B, N, H, d]: the DiT's layout, with no permutation around attention.
    pub fn packed_qkv(dims: AttnDims) -> Self {
        let qkv = Strides::token_major(dims.nq, dims.h.saturating_mul(3), dims.d);
        Layout {
            q: qkv,
            k: qkv,
            v: qkv,
            o: Strides::token_major(dims.nq, dims.h, dims.dv),
        }
    }

    /// Errors unless the kernels can take this layout: 16-bit rows start 16-byte aligned (every
    /// stride a multiple of 8 elements: cp.async and TMA move 16-byte chunks), strides fit an i64,
    /// each operand's elements lie within isize::MAX bytes of its start (the kernels' 64-bit
    /// offsets never wrap), and o's [B, H, Nq, dv] elements are distinct (two rows of o in one
    /// place would race). The backward writes dq, dk and dv with q's, k's and v's layouts too, so
    /// [`plan_backward`] asks the same of them ([`Layout::check_gradients`]).
    pub fn check(&self, dtype: DType, dims: AttnDims) -> Result<()> {
        let named = [
            ("q", self.q, dims.q_shape()),
            ("k", self.k, dims.k_shape()),
            ("v", self.v, dims.v_shape()),
            ("o", self.o, dims.o_shape()),
        ];
        for (name, s, shape) in named {
            let [_, _, n, d] = shape;
            if [s.b, s.h, s.n].iter().any(|&x| i64::try_from(x).is_err()) {
                return Err(Error::invalid(
                    OP,
                    format!("strides of `{name}` {s:?} do not fit an i64"),
                ));
            }
            let bytes = s
                .span(shape[0], shape[1], n, d)
                .and_then(|e| e.checked_mul(dtype.size_in_bytes()));
            if bytes.is_none_or(|b| b > isize::MAX as usize) {
                return Err(Error::invalid(
                    OP,
                    format!(
                        "layout of `{name}` {s:?} spans more than isize::MAX bytes of {dtype} for \
                         {shape:?}"
                    ),
                ));
            }
            if dtype != DType::F32 && [s.b, s.h, s.n].iter().any(|x| x % 8 != 0) {
                return Err(Error::Unsupported(format!(
                    "attention on the GPU: strides of `{name}` {s:?} (elements) are not multiples \
                     of 8, so its {dtype} rows are not 16-byte aligned (they are copied in \
                     16-byte chunks)"
                )));
            }
            if s.n < d && n > 1 {
                return Err(Error::invalid(
                    OP,
                    format!("row stride {} of `{name}` is below its head dim {d}", s.n),
                ));
            }
        }
        self.o.check_distinct("o", "[B, H, Nq, dv]", dims.o_shape())
    }

    /// Errors unless q's, k's and v's elements are distinct in their layouts, as o's must be: the
    /// backward writes dq, dk and dv with them, each element once and without atomics, so a
    /// layout that maps two heads (or rows) to one place, legal for the forward, which only reads
    /// q, k and v, would keep the last writer's gradient instead of the sum.
    pub fn check_gradients(&self, dims: AttnDims) -> Result<()> {
        for (name, grad, s, axes, shape) in [
            ("q", "dq", self.q, "[B, H, Nq, d]", dims.q_shape()),
            ("k", "dk", self.k, "[B, H, Nk, d]", dims.k_shape()),
            ("v", "dv", self.v, "[B, H, Nk, dv]", dims.v_shape()),
        ] {
            s.check_distinct(name, axes, shape).map_err(|e| match e {
                Error::Invalid { op, message } => Error::invalid(
                    op,
                    format!(
                        "{message}: the backward writes its gradient `{grad}` with this layout, \
                         so its elements must be distinct (a layout shared across heads or rows \
                         suits the forward only)"
                    ),
                ),
                other => other,
            })?;
        }
        Ok(())
    }
}

/// The score scale as the kernels take it: c (default 1/√d), checked by [`check_scale`].
pub fn resolve_scale(scale: Option<f64>, d: usize) -> Result<f32> {
    let c = scale.unwrap_or(1.0 / (d as f64).sqrt());
    if !c.is_finite() || !(c as f32).is_finite() {
        return Err(Error::invalid(
            OP,
            format!("scale {c} is not finite in f32"),
        ));
    }
    check_scale(c as f32)?;
    Ok(c as f32)
}

/// Errors unless `scale` is a positive normal f32 whose product with log2(e) is one too. The
/// kernels mask the keys past Nk with −∞ scores, keep the running maximum of the unscaled scores
/// and exponentiate `scale·log2(e)·(s − m)`: a scale of 0 made the masked scores NaN (−∞·0), a
/// negative one made them +∞ and the maximum a minimum. (The CPU reference takes any finite
/// scale.)
pub fn check_scale(scale: f32) -> Result<()> {
    let sl2 = scale * std::f32::consts::LOG2_E;
    if scale > 0.0 && scale.is_normal() && sl2.is_normal() {
        return Ok(());
    }
    Err(Error::invalid(
        OP,
        format!(
            "scale {scale:e}: the CUDA kernels take a positive scale, at least {:e} and at most \
             {:e} (f32's normal range over log2(e))",
            f32::MIN_POSITIVE,
            f32::MAX / std::f32::consts::LOG2_E
        ),
    ))
}

/// Query rows per block: 64 on tensor cores (bf16, f16), 16 for f32.
pub fn block_rows(dtype: DType) -> usize {
    if dtype == DType::F32 {
        16
    } else {
        64
    }
}

/// Shared memory a block may take on the devices of [`small_shared_memory`]: 99 KiB.
pub const SMALL_SHARED_BYTES: usize = 99 * 1024;

/// Whether a block on a device of arch `arch` (NVRTC's name: `sm_89`, `sm_90a`, ...) may take
/// only [`SMALL_SHARED_BYTES`] of shared memory: sm_86, sm_89 and sm_12x (GeForce and workstation
/// Ampere, Ada and Blackwell: RTX 3090/4090/5090, A6000, L40S, L4), where the tensor-core JVP
/// kernels take shorter key tiles ([`key_tile`]); sm_80, sm_87, sm_90 and sm_100 allow 163 KiB or
/// more. The kernels decide the same from `__CUDA_ARCH__` (attention_jvp.cuh, SMALL SHARED MEMORY).
pub fn small_shared_memory(arch: &str) -> bool {
    let digits: String = arch
        .trim_start_matches("sm_")
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    match digits.parse::<u32>() {
        Ok(86 | 89) => true,
        Ok(n) => n >= 120,
        Err(_) => false,
    }
}

/// Dynamic shared memory of a tensor-core forward/JVP kernel over padded head dims `dp`, `dvp`
/// with a key tile of `bc` keys.
fn tc_shared_bytes(variant: Variant, dp: usize, dvp: usize, bc: usize) -> usize {
    let nq = if variant == Variant::Fwd { 1 } else { 2 };
    // K and V tile pairs per stage: (K, V) or (K, V, Kdot, Vdot).
    let pairs = if variant == Variant::Jvp { 2 } else { 1 };
    2 * (nq * 64 * (dp + 8) + 2 * pairs * bc * (dp + 8 + dvp + 8))
}

/// Keys per tile of a tensor-core (bf16/f16) forward/JVP kernel, attention_jvp.cuh's `Cfg::BC`: 32
/// at head dim 128 and for the constant-K/V JVP at dv 96 (register room for its centred tangent),
/// else 64; on a device with `small` shared memory ([`small_shared_memory`]) halved until the tiles
/// fit [`SMALL_SHARED_BYTES`] (the full JVP at d >= 72: 32 keys, 16 at d = dv = 128).
pub fn key_tile(variant: Variant, d: usize, dv: usize, small: bool) -> usize {
    let large = if d == 128 || dv == 128 || (variant == Variant::JvpNoKv && dv == 96) {
        32
    } else {
        64
    };
    let (dp, dvp) = (d.next_multiple_of(16), dv.next_multiple_of(16));
    let fits = |bc| tc_shared_bytes(variant, dp, dvp, bc) <= SMALL_SHARED_BYTES;
    if !small || fits(large) {
        large
    } else if large == 64 && fits(32) {
        32
    } else {
        16
    }
}

/// Dynamic shared memory of an attention_jvp.cuh kernel for head dims d (q, k) and dv (v) on a
/// device of arch `arch` (cuda/README.md's formulas; [`key_tile`]).
pub fn jvp_shared_bytes(arch: &str, variant: Variant, dtype: DType, d: usize, dv: usize) -> usize {
    if dtype == DType::F32 {
        let nq = if variant == Variant::Fwd { 1 } else { 2 };
        let nk = if variant == Variant::Jvp { 2 } else { 1 };
        let vs = 32 * dv.div_ceil(32);
        4 * (nq * 16 * d + nk * 32 * (d + 1) + nk * 32 * vs)
    } else {
        let bc = key_tile(variant, d, dv, small_shared_memory(arch));
        tc_shared_bytes(variant, d.next_multiple_of(16), dv.next_multiple_of(16), bc)
    }
}

/// Rows per block of the backward kernels, `[keys of dkdv, queries of dq]`: 64 on tensor cores
/// (bf16, f16: attention_bwd_tc.cuh), 32 for f32 (FMA).
pub fn bwd_block_rows(dtype: DType) -> [usize; 2] {
    if dtype == DType::F32 {
        [32, 32]
    } else {
        [64, 64]
    }
}

/// Dynamic shared memory of `[attention_bwd_dkdv, attention_bwd_dq]` for head dims d and dv
/// (cuda/README.md's formulas).
pub fn bwd_shared_bytes(dtype: DType, d: usize, dv: usize) -> [usize; 2] {
    if dtype == DType::F32 {
        let b = 4 * (2 * 32 * (d + 1) + 2 * 32 * (dv + 1) + 2 * 32 * 33 + 64);
        return [b, b];
    }
    let (dp, dvp) = (d.next_multiple_of(16), dv.next_multiple_of(16));
    let rows = dp + 8 + dvp + 8;
    // dkdv: 64 keys resident, query tiles of bm double buffered, lse and delta per query.
    let bm = if dp + dvp > 192 { 32 } else { 64 };
    // dq: 64 queries resident, key tiles of bn double buffered.
    let bn = if d == 128 || dv == 128 { 32 } else { 64 };
    [2 * (64 + 2 * bm) * rows + 16 * bm, 2 * (64 + 2 * bn) * rows]
}

/// Errors unless the 16-bit tensors are 16-byte aligned (cp.async moves 16-byte chunks).
fn check_aligned(dtype: DType, ptrs: &[(&str, u64)]) -> Result<()> {
    if dtype == DType::F32 {
        return Ok(());
    }
    for (name, p) in ptrs {
        if p % 16 != 0 {
            return Err(Error::Unsupported(format!(
                "attention on the GPU: `{name}` at {p:#x} is not 16-byte aligned ({dtype} tensors \
                 are copied in 16-byte chunks)"
            )));
        }
    }
    Ok(())
}

/// Pointers of a forward/JVP launch. Tangent pointers are used by the JVP variants only.
#[derive(Clone, Copy, Debug)]
pub struct JvpPtrs {
    /// q [B, H, Nq, d] in the plan's dtype.
    pub q: u64,
    /// k [B, H, Nk, d].
    pub k: u64,
    /// v [B, H, Nk, dv].
    pub v: u64,
    /// Tangent of q (q's layout); read by [`Variant::Jvp`] and [`Variant::JvpNoKv`].
    pub tq: u64,
    /// Tangent of k (k's layout); read by [`Variant::Jvp`] only.
    pub tk: u64,
    /// Tangent of v (v's layout); read by [`Variant::Jvp`] only.
    pub tv: u64,
    /// Output o [B, H, Nq, dv] in the plan's dtype.
    pub o: u64,
    /// Output tangent of o (o's layout); written by the JVP variants.
    pub to: u64,
    /// Output lse, f32 [B, H, Nq] contiguous: the natural log-sum-exp of each row's scaled scores.
    pub lse: u64,
    /// Output tangent of lse, f32 [B, H, Nq] contiguous; written by the JVP variants.
    pub tlse: u64,
}

/// The launch of one attention_jvp.cu kernel over q, k, v and o in `layout` (tangents in their
/// primal's layout, lse and tlse contiguous), with the tiles of sm_80 and sm_90 (163 KiB or more of
/// shared memory per block); [`plan_jvp_on`] fits them to a device's arch.
pub fn plan_jvp(
    variant: Variant,
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    scale: f32,
) -> Result<Vec<Step>> {
    plan_jvp_on("sm_80", variant, dtype, dims, layout, p, scale)
}

/// [`plan_jvp`] on a device of arch `arch`: on the archs of [`small_shared_memory`] the kernels
/// take shorter key tiles ([`key_tile`]) and the launch asks for their shared memory.
pub fn plan_jvp_on(
    arch: &str,
    variant: Variant,
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    scale: f32,
) -> Result<Vec<Step>> {
    plan_jvp_kernel(arch, variant, dtype, dims, layout, p, scale, None)
}

/// How the attention JVP rounds the operands of its value products (P V, (P⊙Ṡ) V, P V̇).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueProducts {
    /// In the storage dtype (the default; bf16 tangent error about 2.3e-3 relative).
    Storage,
    /// In f16 for bf16 storage: P and P⊙(Ṡ − μ) keep 11 significant bits instead of 8, V and V̇
    /// are read from f16 copies scaled by a power of two (cuda/common.cuh, F16 VALUE PRODUCTS). The
    /// tangent's error comes down to about its output rounding (1.65e-3, PyTorch's math backend),
    /// for two passes over V and V̇ and [`f16_values_workspace_bytes`] of workspace. Applies to
    /// bf16 JVPs with dv == d on both paths ([`ValueProducts::applies`]); |P⊙(Ṡ − μ)| must stay
    /// below f16's 65504 (beyond, the output is not finite).
    F16,
}

impl ValueProducts {
    /// `FLASHJVP_ATTENTION_VALUES=f16` selects [`ValueProducts::F16`] for the entry points that
    /// allocate their own workspace ([`jvp`], [`jvp_into`], [`jvp_packed`], [`jvp_packed_into`];
    /// [`jvp_into_with`] and [`jvp_packed_into_with`] take the choice explicitly) and the DiT
    /// block's dual forward; unset (or any other value) keeps [`ValueProducts::Storage`].
    pub fn from_env() -> Self {
        if std::env::var("FLASHJVP_ATTENTION_VALUES").is_ok_and(|v| v == "f16") {
            ValueProducts::F16
        } else {
            ValueProducts::Storage
        }
    }

    /// Whether this choice changes the plan of `variant` in `dtype` over `dims`: only
    /// [`ValueProducts::F16`] for a bf16 JVP (with or without K/V tangents) with dv == d. f16
    /// storage has f16 value products already; the primal forward keeps its own.
    pub fn applies(self, variant: Variant, dtype: DType, dims: AttnDims) -> bool {
        self == ValueProducts::F16
            && variant != Variant::Fwd
            && dtype == DType::BF16
            && dims.d == dims.dv
    }
}

/// Bytes of the f16 copies' header (the max bits, padded so the copies start 256-byte aligned).
const VALUES_HEADER: usize = 256;

/// Workspace of the f16 value products ([`plan_jvp_f16_values`],
/// [`super::attention_sm90::plan_f16_values`]): the max bits, then f16 copies of V (and of V̇ for
/// the full JVP), each [B, H, Nk, dv].
/// Saturates at `usize::MAX` for dims no device holds (the plans refuse those).
pub fn f16_values_workspace_bytes(variant: Variant, dims: AttnDims) -> usize {
    let copies = if variant == Variant::Jvp { 2 } else { 1 };
    copy_bytes(dims)
        .and_then(|c| c.checked_mul(copies))
        .and_then(|c| c.checked_add(VALUES_HEADER))
        .unwrap_or(usize::MAX)
}

/// Bytes of one f16 copy [B, H, Nk, dv], padded to 256; `None` past a usize.
fn copy_bytes(dims: AttnDims) -> Option<usize> {
    [dims.h, dims.nk, dims.dv, 2]
        .into_iter()
        .try_fold(dims.b, |acc, x| acc.checked_mul(x))?
        .checked_next_multiple_of(256)
}

/// A bf16 JVP with f16 value products over `layout`: the steps that make the f16 copies of V (and
/// V̇ for the full JVP) in `workspace` (a 256-byte aligned device address,
/// [`f16_values_workspace_bytes`] long): zero the max, `attention_values_amax_bf16`,
/// `attention_values_to_f16_bf16`; then `kernel`'s launch, given the layout and pointers with v and
/// tv on the (contiguous) copies and the address of the copies' max bits (the kernels' `vamax`).
pub(crate) fn plan_with_value_copies(
    variant: Variant,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    workspace: u64,
    kernel: impl FnOnce(Layout, JvpPtrs, u64) -> Result<Vec<Step>>,
) -> Result<Vec<Step>> {
    if variant == Variant::Fwd {
        return Err(Error::invalid(
            OP,
            "f16 value products are for the JVP (the primal forward keeps bf16 ones)",
        ));
    }
    dims.check()?;
    if dims.dv != dims.d {
        return Err(Error::Unsupported(format!(
            "attention: f16 value products need dv == d (got d {} / dv {})",
            dims.d, dims.dv
        )));
    }
    if workspace == 0 || workspace % 256 != 0 {
        return Err(Error::invalid(
            OP,
            format!(
                "the f16 values' workspace must be a 256-byte aligned device address, got \
                 {workspace:#x}"
            ),
        ));
    }
    layout.check(DType::BF16, dims)?;
    let full = variant == Variant::Jvp;
    let tv = if full { p.tv } else { 0 };
    let mut read = vec![("v", p.v)];
    if full {
        read.push(("tv", tv));
    }
    check_aligned(DType::BF16, &read)?;
    require_ptrs(OP, &read)?;
    let copy = copy_bytes(dims)
        .filter(|&c| c <= isize::MAX as usize / 2)
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "attention: f16 copies of v {:?} would not fit in memory",
                dims.v_shape()
            ))
        })? as u64;
    let amax = workspace;
    let v16 = workspace + VALUES_HEADER as u64;
    let tv16 = if full { v16 + copy } else { 0 };
    // Vectors of 8 elements (dv is a multiple of 8; the product cannot wrap: `copy` fit).
    let vecs = (dims.b * dims.h * dims.nk * dims.dv / 8) as i64;
    let shape = [
        int_arg(OP, "Nk", dims.nk)?,
        int_arg(OP, "H", dims.h)?,
        int_arg(OP, "dv", dims.dv)?,
    ];
    let mut args = vec![Arg::Ptr(p.v), Arg::Ptr(tv), Arg::Ptr(amax)];
    args.extend(shape);
    args.extend(layout.v.args());
    args.push(Arg::I64(vecs));
    // One atomicMax per block: at most 1024 blocks, grid-stride beyond.
    let grid = ((vecs as u64).div_ceil(256).clamp(1, 1024), 1, 1);
    let mut steps = vec![Step::zero(amax, 4)];
    steps.push(Step::Kernel(Launch::new(
        OP,
        JVP_FILE,
        "attention_values_amax_bf16",
        grid,
        (256, 1, 1),
        0,
        args,
    )?));
    let mut args = vec![
        Arg::Ptr(p.v),
        Arg::Ptr(tv),
        Arg::Ptr(amax),
        Arg::Ptr(v16),
        Arg::Ptr(tv16),
    ];
    args.extend(shape);
    args.extend(layout.v.args());
    args.push(Arg::I64(vecs));
    steps.push(Step::Kernel(Launch::new(
        OP,
        JVP_FILE,
        "attention_values_to_f16_bf16",
        (super::launch::pointwise_grid(vecs as usize).0, 1, 1),
        (256, 1, 1),
        0,
        args,
    )?));
    let copies = Layout {
        v: Strides::contiguous(dims.h, dims.nk, dims.dv),
        ..layout
    };
    steps.extend(kernel(
        copies,
        JvpPtrs {
            v: v16,
            tv: tv16,
            ..p
        },
        amax,
    )?);
    Ok(steps)
}

/// The plan of a bf16 JVP with f16 value products ([`ValueProducts::F16`]) on the sm_80 kernels
/// over q, k, v, o in `layout` on a device of arch `arch` (its tiles as [`plan_jvp_on`]'s): the f16
/// copies of V and V̇ into `workspace` (256-byte aligned, [`f16_values_workspace_bytes`] long), then
/// `attention_jvp{,_nokv}_bf16_vf16_d{d}` reading them.
pub fn plan_jvp_f16_values(
    arch: &str,
    variant: Variant,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    scale: f32,
    workspace: u64,
) -> Result<Vec<Step>> {
    plan_with_value_copies(variant, dims, layout, p, workspace, |l, copies, amax| {
        plan_jvp_kernel(
            arch,
            variant,
            DType::BF16,
            dims,
            l,
            copies,
            scale,
            Some(amax),
        )
    })
}

/// The kernel file of the sm_80 forward/JVP with dv == d (and of the f16 value copies).
const JVP_FILE: &str = "attention_jvp.cu";

/// [`plan_jvp_on`], or with `vamax` (the f16 copies' max bits) the f16-values kernel, whose v and
/// tv are the contiguous f16 copies.
#[allow(clippy::too_many_arguments)]
fn plan_jvp_kernel(
    arch: &str,
    variant: Variant,
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    scale: f32,
    vamax: Option<u64>,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    dims.check()?;
    check_scale(scale)?;
    layout.check(dtype, dims)?;
    let mut named = vec![("q", p.q), ("k", p.k), ("v", p.v), ("o", p.o)];
    if variant != Variant::Fwd {
        named.extend([("tq", p.tq), ("to", p.to)]);
    }
    if variant == Variant::Jvp {
        named.extend([("tk", p.tk), ("tv", p.tv)]);
    }
    check_aligned(dtype, &named)?;
    named.push(("lse", p.lse));
    if variant != Variant::Fwd {
        named.push(("tlse", p.tlse));
    }
    require_ptrs(OP, &named)?;
    let (nq, nk) = (int_arg(OP, "Nq", dims.nq)?, int_arg(OP, "Nk", dims.nk)?);
    let mut args = match variant {
        Variant::Jvp => vec![
            Arg::Ptr(p.q),
            Arg::Ptr(p.k),
            Arg::Ptr(p.v),
            Arg::Ptr(p.tq),
            Arg::Ptr(p.tk),
            Arg::Ptr(p.tv),
            Arg::Ptr(p.o),
            Arg::Ptr(p.to),
            Arg::Ptr(p.lse),
            Arg::Ptr(p.tlse),
            nq,
            nk,
            Arg::F32(scale),
        ],
        Variant::JvpNoKv => vec![
            Arg::Ptr(p.q),
            Arg::Ptr(p.k),
            Arg::Ptr(p.v),
            Arg::Ptr(p.tq),
            Arg::Ptr(p.o),
            Arg::Ptr(p.to),
            Arg::Ptr(p.lse),
            Arg::Ptr(p.tlse),
            nq,
            nk,
            Arg::F32(scale),
        ],
        Variant::Fwd => vec![
            Arg::Ptr(p.q),
            Arg::Ptr(p.k),
            Arg::Ptr(p.v),
            Arg::Ptr(p.o),
            Arg::Ptr(p.lse),
            nq,
            nk,
            Arg::F32(scale),
        ],
    };
    args.push(int_arg(OP, "H", dims.h)?);
    for s in [layout.q, layout.k, layout.v, layout.o] {
        args.extend(s.args());
    }
    let values = match vamax {
        Some(amax) => {
            args.push(Arg::Ptr(amax));
            "_vf16"
        }
        None => "",
    };
    let grid = (
        dims.nq.div_ceil(block_rows(dtype)) as u64,
        (dims.b * dims.h) as u64,
        1,
    );
    let file = if dims.d == dims.dv {
        JVP_FILE
    } else {
        "attention_jvp_dv.cu"
    };
    Ok(vec![Step::Kernel(
        Launch::new(
            OP,
            file,
            format!(
                "{}_{dt}{values}{}",
                variant.prefix(),
                head_suffix(dims.d, dims.dv)
            ),
            grid,
            (128, 1, 1),
            jvp_shared_bytes(arch, variant, dtype, dims.d, dims.dv),
            args,
        )?
        .planned_for_small_shared(small_shared_memory(arch)),
    )])
}

/// Pointers of the backward. `delta` is an f32 \[B,H,Nq\] scratch buffer.
#[derive(Clone, Copy, Debug)]
pub struct BwdPtrs {
    /// q [B, H, Nq, d] in the plan's dtype.
    pub q: u64,
    /// k [B, H, Nk, d].
    pub k: u64,
    /// v [B, H, Nk, dv].
    pub v: u64,
    /// The forward's output o [B, H, Nq, dv].
    pub o: u64,
    /// The forward's lse, f32 [B, H, Nq] contiguous.
    pub lse: u64,
    /// Cotangent of o (o's layout).
    pub dout: u64,
    /// Scratch f32 [B, H, Nq] contiguous, written by the preprocess and read by dK/dV and dQ.
    pub delta: u64,
    /// Output gradient of q (q's layout), overwritten.
    pub dq: u64,
    /// Output gradient of k (k's layout), overwritten.
    pub dk: u64,
    /// Output gradient of v (v's layout), overwritten.
    pub dv: u64,
}

/// The backward's preprocess (attention_bwd.cu, every path): delta = rowsum(dO ⊙ O) into the f32
/// \[B, H, Nq\] buffer at `delta`, o and dout read with o's strides `o_layout`.
pub fn plan_bwd_preprocess(
    dtype: DType,
    dims: AttnDims,
    o_layout: Strides,
    o: u64,
    dout: u64,
    delta: u64,
) -> Result<Launch> {
    let dt = dtype_suffix(dtype)?;
    let rows = dims.b * dims.h * dims.nq;
    Launch::new(
        OP,
        "attention_bwd.cu",
        format!("attention_bwd_preprocess_{dt}"),
        (rows.div_ceil(4) as u64, 1, 1),
        (128, 1, 1),
        0,
        vec![
            Arg::Ptr(o),
            Arg::Ptr(dout),
            Arg::Ptr(delta),
            int_arg(OP, "B*H*Nq", rows)?,
            int_arg(OP, "dv", dims.dv)?,
            int_arg(OP, "Nq", dims.nq)?,
            int_arg(OP, "H", dims.h)?,
        ]
        .into_iter()
        .chain(o_layout.args())
        .collect(),
    )
}

impl BwdPtrs {
    /// The storage-dtype tensors by name (lse and delta, f32, apart).
    pub fn named(&self) -> [(&'static str, u64); 8] {
        [
            ("q", self.q),
            ("k", self.k),
            ("v", self.v),
            ("o", self.o),
            ("dout", self.dout),
            ("dq", self.dq),
            ("dk", self.dk),
            ("dv", self.dv),
        ]
    }
}

/// Preprocess (delta = rowsum(dO ⊙ O)), then dK/dV and dQ. Each gradient has its primal's layout
/// (dq: q's, dk: k's, dv: v's, dout: o's); lse and delta are contiguous f32 [B, H, Nq].
pub fn plan_backward(
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: BwdPtrs,
    scale: f32,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    dims.check()?;
    check_scale(scale)?;
    layout.check(dtype, dims)?;
    layout.check_gradients(dims)?;
    let named = p.named();
    check_aligned(dtype, &named)?;
    require_ptrs(OP, &named)?;
    require_ptrs(OP, &[("lse", p.lse), ("delta", p.delta)])?;
    let h = int_arg(OP, "H", dims.h)?;
    let strides: Vec<Arg> = [layout.q, layout.k, layout.v, layout.o]
        .iter()
        .flat_map(|s| s.args())
        .collect();
    let (nq, nk) = (int_arg(OP, "Nq", dims.nq)?, int_arg(OP, "Nk", dims.nk)?);
    let bh = (dims.b * dims.h) as u64;
    let [smem_kv, smem_q] = bwd_shared_bytes(dtype, dims.d, dims.dv);
    let [rows_kv, rows_q] = bwd_block_rows(dtype);
    let file = if dims.d == dims.dv {
        "attention_bwd.cu"
    } else {
        "attention_bwd_dv.cu"
    };
    let hd = head_suffix(dims.d, dims.dv);
    let pre = plan_bwd_preprocess(dtype, dims, layout.o, p.o, p.dout, p.delta)?;
    let dkdv = Launch::new(
        OP,
        file,
        format!("attention_bwd_dkdv_{dt}{hd}"),
        (dims.nk.div_ceil(rows_kv) as u64, bh, 1),
        (128, 1, 1),
        smem_kv,
        vec![
            Arg::Ptr(p.q),
            Arg::Ptr(p.k),
            Arg::Ptr(p.v),
            Arg::Ptr(p.dout),
            Arg::Ptr(p.lse),
            Arg::Ptr(p.delta),
            Arg::Ptr(p.dk),
            Arg::Ptr(p.dv),
            nq,
            nk,
            Arg::F32(scale),
            h,
        ]
        .into_iter()
        .chain(strides.iter().copied())
        .collect(),
    )?;
    let dq = Launch::new(
        OP,
        file,
        format!("attention_bwd_dq_{dt}{hd}"),
        (dims.nq.div_ceil(rows_q) as u64, bh, 1),
        (128, 1, 1),
        smem_q,
        vec![
            Arg::Ptr(p.q),
            Arg::Ptr(p.k),
            Arg::Ptr(p.v),
            Arg::Ptr(p.dout),
            Arg::Ptr(p.lse),
            Arg::Ptr(p.delta),
            Arg::Ptr(p.dq),
            nq,
            nk,
            Arg::F32(scale),
            h,
        ]
        .into_iter()
        .chain(strides)
        .collect(),
    )?;
    Ok(vec![
        Step::Kernel(pre),
        Step::Kernel(dkdv),
        Step::Kernel(dq),
    ])
}

/// Byte offsets of batch entry b: in q, k, v and o (and the tensors sharing their layouts) and in
/// the f32 row vectors (lse, its tangent, delta).
struct EntryOffsets {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    rows: u64,
}

impl EntryOffsets {
    fn new(b: usize, dims: AttnDims, layout: &Layout, dtype: DType) -> Self {
        let bytes = |elems: usize, size: usize| (b * elems * size) as u64;
        let size = dtype.size_in_bytes();
        EntryOffsets {
            q: bytes(layout.q.b, size),
            k: bytes(layout.k.b, size),
            v: bytes(layout.v.b, size),
            o: bytes(layout.o.b, size),
            rows: bytes(dims.h * dims.nq, 4),
        }
    }
}

/// `ptr` advanced by `offset` bytes; a null pointer (an absent tensor) stays null.
fn advance(ptr: u64, offset: u64) -> u64 {
    if ptr == 0 {
        0
    } else {
        ptr + offset
    }
}

impl JvpPtrs {
    /// The pointers of batch entry `b` alone (its rows of every operand in `layout`, of lse and of
    /// its tangent), for a plan over dims with B = 1.
    pub fn batch_entry(&self, b: usize, dims: AttnDims, layout: &Layout, dtype: DType) -> JvpPtrs {
        let e = EntryOffsets::new(b, dims, layout, dtype);
        JvpPtrs {
            q: advance(self.q, e.q),
            k: advance(self.k, e.k),
            v: advance(self.v, e.v),
            tq: advance(self.tq, e.q),
            tk: advance(self.tk, e.k),
            tv: advance(self.tv, e.v),
            o: advance(self.o, e.o),
            to: advance(self.to, e.o),
            lse: advance(self.lse, e.rows),
            tlse: advance(self.tlse, e.rows),
        }
    }
}

impl BwdPtrs {
    /// The pointers of batch entry `b` alone (as [`JvpPtrs::batch_entry`]; delta like lse).
    pub fn batch_entry(&self, b: usize, dims: AttnDims, layout: &Layout, dtype: DType) -> BwdPtrs {
        let e = EntryOffsets::new(b, dims, layout, dtype);
        BwdPtrs {
            q: advance(self.q, e.q),
            k: advance(self.k, e.k),
            v: advance(self.v, e.v),
            o: advance(self.o, e.o),
            lse: advance(self.lse, e.rows),
            dout: advance(self.dout, e.o),
            delta: advance(self.delta, e.rows),
            dq: advance(self.dq, e.q),
            dk: advance(self.dk, e.k),
            dv: advance(self.dv, e.v),
        }
    }
}

/// Attention over padded keys: `plan(b, dims_b)` once per batch entry b, with dims_b = dims but
/// B = 1 and Nk = key_lens\[b\] (checked: B counts, each in 1..=Nk). The plan addresses entry b
/// (e.g. with [`JvpPtrs::batch_entry`]) and keeps the full tensors' strides, so the kernels,
/// unchanged, stream over that entry's first key_lens\[b\] keys and never read its padding: no
/// work is spent on padding, at the price of one launch per entry (each H·Nq/64 blocks wide).
pub fn plan_per_key_len(
    dims: AttnDims,
    key_lens: &[usize],
    mut plan: impl FnMut(usize, AttnDims) -> Result<Vec<Step>>,
) -> Result<Vec<Step>> {
    dims.check()?;
    crate::ops::attention::check_key_lens(OP, key_lens, dims.b, dims.h, dims.nk)?;
    let mut steps = Vec::new();
    for (b, &nk) in key_lens.iter().enumerate() {
        steps.extend(plan(b, AttnDims { b: 1, nk, ..dims })?);
    }
    Ok(steps)
}

/// The forward/JVP plan of [`super::attention_sm90::plan_for`] over padded keys: batch entry b
/// attends to its first `key_lens[b]` keys ([`plan_per_key_len`]).
#[allow(clippy::too_many_arguments)]
pub fn plan_for_key_lens(
    arch: &str,
    variant: Variant,
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    scale: f32,
    key_lens: &[usize],
) -> Result<Vec<Step>> {
    plan_per_key_len(dims, key_lens, |b, dims_b| {
        let pb = p.batch_entry(b, dims, &layout, dtype);
        super::attention_sm90::plan_for(arch, variant, dtype, dims_b, layout, pb, scale)
    })
}

/// The backward plan of [`super::attention_sm90::plan_backward_for`] over padded keys: the padding
/// rows of dk and dv zeroed first (their gradient is 0, and no kernel writes them), then each
/// batch entry's backward over its first `key_lens[b]` keys writes the rest. Any layout the
/// backward takes: one fill for contiguous dk and dv, a fill or a 2D memset per padded entry for
/// token-major (flash-attn's [B, Nk, H, ·]) or packed ([B, Nk, 3, H, ·]) ones.
pub fn plan_backward_for_key_lens(
    arch: &str,
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: BwdPtrs,
    scale: f32,
    key_lens: &[usize],
) -> Result<Vec<Step>> {
    dims.check()?;
    crate::ops::attention::check_key_lens(OP, key_lens, dims.b, dims.h, dims.nk)?;
    require_ptrs(OP, &[("dk", p.dk), ("dv", p.dv)])?;
    layout.check(dtype, dims)?;
    layout.check_gradients(dims)?;
    let mut steps = padding_fills(p.dk, layout.k, dims, dims.d, dtype, key_lens);
    steps.extend(padding_fills(
        p.dv, layout.v, dims, dims.dv, dtype, key_lens,
    ));
    steps.extend(plan_per_key_len(dims, key_lens, |b, dims_b| {
        let pb = p.batch_entry(b, dims, &layout, dtype);
        super::attention_sm90::plan_backward_for(arch, dtype, dims_b, layout, pb, scale)
    })?);
    Ok(steps)
}

/// Steps that zero rows key_lens\[b\].. of every head of entry b in a gradient at `ptr` laid out
/// as `strides` over [B, H, Nk, `width`], each a plain fill
/// or a 2D memset ([`Step::zero_rows`]):
/// - contiguous [B, H, Nk, width]: one fill of the whole tensor (the kernels then write the
///   counted rows);
/// - each token's heads side by side (`strides.h == width`: token-major [B, Nk, H, width], or a
///   packed projection [B, Nk, 3, H, width]): per padded entry, its padding tokens, H·width
///   elements each (one fill when the tokens touch);
/// - each head's rows side by side (`strides.n == width`): per padded entry, one run of
///   (Nk − len)·width elements per head;
/// - any other layout: per padded entry and head, its padding rows.
///
/// The layout is checked first (`check` and `check_gradients`): the runs then lie inside the
/// gradient and are distinct. `key_lens` checked.
fn padding_fills(
    ptr: u64,
    strides: Strides,
    dims: AttnDims,
    width: usize,
    dtype: DType,
    key_lens: &[usize],
) -> Vec<Step> {
    let (h, nk, size) = (dims.h, dims.nk, dtype.size_in_bytes());
    if strides == Strides::contiguous(h, nk, width) {
        return vec![Step::zero(ptr, dims.b * h * nk * width * size)];
    }
    let mut steps = Vec::new();
    for (b, &len) in key_lens.iter().enumerate().filter(|&(_, &len)| len < nk) {
        let first = ptr + ((b * strides.b + len * strides.n) * size) as u64;
        let pad = nk - len;
        if strides.h == width {
            steps.extend(Step::zero_rows(
                first,
                strides.n * size,
                h * width * size,
                pad,
            ));
        } else if strides.n == width {
            steps.extend(Step::zero_rows(
                first,
                strides.h * size,
                pad * width * size,
                h,
            ));
        } else {
            for head in 0..h {
                steps.extend(Step::zero_rows(
                    first + (head * strides.h * size) as u64,
                    strides.n * size,
                    width * size,
                    pad,
                ));
            }
        }
    }
    steps
}

/// Outputs of the device-resident JVP: o \[B,H,Nq,dv\] and its tangent in the inputs' dtype, lse and
/// its tangent f32 \[B,H,Nq\]. The tangents are `None` when no input carried one.
pub struct DeviceAttentionJvp {
    /// o [B, H, Nq, dv] (token-major [B, N, H, d] from the packed entry points).
    pub o: DeviceTensor,
    /// The tangent of o, o's shape and dtype.
    pub to: Option<DeviceTensor>,
    /// lse, f32 [B, H, Nq].
    pub lse: DeviceTensor,
    /// The tangent of lse, f32 [B, H, Nq].
    pub tlse: Option<DeviceTensor>,
}

fn check_device(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    tangents: [(&str, Option<&DeviceTensor>, &DeviceTensor); 3],
) -> Result<AttnDims> {
    let dims = check_shapes(q.shape(), k.shape(), v.shape())?;
    let dtype = q.dtype();
    for (name, t) in [("k", k), ("v", v)] {
        if t.dtype() != dtype {
            return Err(Error::DType {
                op: OP,
                tensor: name.into(),
                expected: format!("{dtype} (the dtype of q)"),
                actual: t.dtype(),
            });
        }
    }
    for (name, t, primal) in tangents {
        if let Some(t) = t {
            if t.shape() != primal.shape() || t.dtype() != dtype {
                return Err(Error::TangentMismatch {
                    op: OP,
                    tensor: name.into(),
                    primal_shape: primal.shape().to_vec(),
                    primal_dtype: dtype,
                    tangent_shape: t.shape().to_vec(),
                    tangent_dtype: t.dtype(),
                });
            }
        }
    }
    Ok(dims)
}

/// o and lse of the primal attention, on device tensors (bf16, f16 or f32).
pub fn forward(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    scale: Option<f64>,
) -> Result<(DeviceTensor, DeviceTensor)> {
    forward_keys(q, k, v, scale, None)
}

/// [`forward`] where batch entry b attends to its first `key_lens[b]` keys only (1 ≤ key_lens\[b\]
/// ≤ Nk; the padding rows of k and v are never read): Wan's `k_lens`, see
/// [`crate::ops::attention_forward_with_key_lens`].
pub fn forward_with_key_lens(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    scale: Option<f64>,
    key_lens: &[usize],
) -> Result<(DeviceTensor, DeviceTensor)> {
    forward_keys(q, k, v, scale, Some(key_lens))
}

fn forward_keys(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let dims = check_device(q, k, v, [("q", None, q), ("k", None, k), ("v", None, v)])?;
    let scale = resolve_scale(scale, dims.d)?;
    let gpu = q.gpu();
    let o = gpu.alloc_out(&dims.o_shape(), q.dtype())?;
    let lse = gpu.alloc_out(&dims.lse_shape(), DType::F32)?;
    forward_into_keys(gpu, q, k, v, &o, &lse, scale, key_lens)?;
    Ok((o, lse))
}

/// The forward into existing outputs (the benchmark's form; shapes as [`forward`]).
pub fn forward_into(
    gpu: &Gpu,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    scale: f32,
) -> Result<()> {
    forward_into_keys(gpu, q, k, v, o, lse, scale, None)
}

#[allow(clippy::too_many_arguments)]
fn forward_into_keys(
    gpu: &Gpu,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    scale: f32,
    key_lens: Option<&[usize]>,
) -> Result<()> {
    let dims = check_device(q, k, v, [("q", None, q), ("k", None, k), ("v", None, v)])?;
    check_out("o", o, &dims.o_shape(), q.dtype())?;
    check_out("lse", lse, &dims.lse_shape(), DType::F32)?;
    check_disjoint(
        OP,
        &[("o", o), ("lse", lse)],
        &[("q", q), ("k", k), ("v", v)],
    )?;
    let p = JvpPtrs {
        q: q.ptr(),
        k: k.ptr(),
        v: v.ptr(),
        tq: 0,
        tk: 0,
        tv: 0,
        o: o.ptr(),
        to: 0,
        lse: lse.ptr(),
        tlse: 0,
    };
    let (arch, dtype, layout) = (gpu.arch(), q.dtype(), Layout::contiguous(dims));
    gpu.run(&match key_lens {
        None => super::attention_sm90::plan_for(arch, Variant::Fwd, dtype, dims, layout, p, scale)?,
        Some(lens) => plan_for_key_lens(arch, Variant::Fwd, dtype, dims, layout, p, scale, lens)?,
    })
}

fn check_out(name: &str, t: &DeviceTensor, shape: &[usize], dtype: DType) -> Result<()> {
    expect_tensor(OP, name, t, shape, dtype)
}

/// o, lse and their tangents on device tensors. K and V without tangents take the four-product
/// kernel (`attention_jvp_nokv`); a missing tangent among several is zero.
pub fn jvp(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    tq: Option<&DeviceTensor>,
    tk: Option<&DeviceTensor>,
    tv: Option<&DeviceTensor>,
    scale: Option<f64>,
) -> Result<DeviceAttentionJvp> {
    jvp_keys(q, k, v, [tq, tk, tv], scale, None)
}

/// [`jvp`] where batch entry b attends to its first `key_lens[b]` keys only (1 ≤ key_lens\[b\] ≤
/// Nk; the padding rows of k, v and their tangents are never read), see
/// [`crate::ops::attention_jvp_with_key_lens`].
#[allow(clippy::too_many_arguments)]
pub fn jvp_with_key_lens(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    tq: Option<&DeviceTensor>,
    tk: Option<&DeviceTensor>,
    tv: Option<&DeviceTensor>,
    scale: Option<f64>,
    key_lens: &[usize],
) -> Result<DeviceAttentionJvp> {
    jvp_keys(q, k, v, [tq, tk, tv], scale, Some(key_lens))
}

fn jvp_keys(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    [tq, tk, tv]: [Option<&DeviceTensor>; 3],
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
) -> Result<DeviceAttentionJvp> {
    let dims = check_device(q, k, v, [("q", tq, q), ("k", tk, k), ("v", tv, v)])?;
    let c = resolve_scale(scale, dims.d)?;
    let gpu = q.gpu();
    let dtype = q.dtype();
    let o = gpu.alloc_out(&dims.o_shape(), dtype)?;
    let lse = gpu.alloc_out(&dims.lse_shape(), DType::F32)?;
    if tq.is_none() && tk.is_none() && tv.is_none() {
        forward_into_keys(gpu, q, k, v, &o, &lse, c, key_lens)?;
        return Ok(DeviceAttentionJvp {
            o,
            to: None,
            lse,
            tlse: None,
        });
    }
    let to = gpu.alloc_out(&dims.o_shape(), dtype)?;
    let tlse = gpu.alloc_out(&dims.lse_shape(), DType::F32)?;
    let out = DeviceAttentionJvp {
        o,
        to: Some(to),
        lse,
        tlse: Some(tlse),
    };
    let values = ValueProducts::from_env();
    jvp_into_keys(gpu, q, k, v, [tq, tk, tv], &out, c, values, key_lens)?;
    Ok(out)
}

/// The JVP into existing outputs (`out.to` and `out.tlse` must be present); value products as
/// `FLASHJVP_ATTENTION_VALUES` says ([`ValueProducts::from_env`]).
#[allow(clippy::too_many_arguments)]
pub fn jvp_into(
    gpu: &Gpu,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    tq: Option<&DeviceTensor>,
    tk: Option<&DeviceTensor>,
    tv: Option<&DeviceTensor>,
    out: &DeviceAttentionJvp,
    scale: f32,
) -> Result<()> {
    let values = ValueProducts::from_env();
    jvp_into_with(gpu, q, k, v, tq, tk, tv, out, scale, values)
}

/// [`jvp_into`] with the value products chosen by `values` (the f16 ones' workspace is allocated
/// here).
#[allow(clippy::too_many_arguments)]
pub fn jvp_into_with(
    gpu: &Gpu,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    tq: Option<&DeviceTensor>,
    tk: Option<&DeviceTensor>,
    tv: Option<&DeviceTensor>,
    out: &DeviceAttentionJvp,
    scale: f32,
    values: ValueProducts,
) -> Result<()> {
    jvp_into_keys(gpu, q, k, v, [tq, tk, tv], out, scale, values, None)
}

#[allow(clippy::too_many_arguments)]
fn jvp_into_keys(
    gpu: &Gpu,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    [tq, tk, tv]: [Option<&DeviceTensor>; 3],
    out: &DeviceAttentionJvp,
    scale: f32,
    values: ValueProducts,
    key_lens: Option<&[usize]>,
) -> Result<()> {
    let dims = check_device(q, k, v, [("q", tq, q), ("k", tk, k), ("v", tv, v)])?;
    let dtype = q.dtype();
    let (Some(to), Some(tlse)) = (&out.to, &out.tlse) else {
        return Err(Error::invalid(OP, "jvp_into needs tangent outputs"));
    };
    check_out("o", &out.o, &dims.o_shape(), dtype)?;
    check_out("to", to, &dims.o_shape(), dtype)?;
    check_out("lse", &out.lse, &dims.lse_shape(), DType::F32)?;
    check_out("tlse", tlse, &dims.lse_shape(), DType::F32)?;
    let inputs: Vec<(&str, &DeviceTensor)> = [
        ("q", Some(q)),
        ("k", Some(k)),
        ("v", Some(v)),
        ("tq", tq),
        ("tk", tk),
        ("tv", tv),
    ]
    .into_iter()
    .filter_map(|(name, t)| Some((name, t?)))
    .collect();
    check_disjoint(
        OP,
        &[("o", &out.o), ("to", to), ("lse", &out.lse), ("tlse", tlse)],
        &inputs,
    )?;
    let variant = if tk.is_none() && tv.is_none() {
        Variant::JvpNoKv
    } else {
        Variant::Jvp
    };
    // The kernels read every tangent they take; absent ones are zeros.
    let zero_q;
    let tq = match tq {
        Some(t) => t,
        None => {
            zero_q = gpu.zeros(q.shape(), dtype)?;
            &zero_q
        }
    };
    let (mut tk_ptr, mut tv_ptr) = (0, 0);
    let (zero_k, zero_v);
    if variant == Variant::Jvp {
        zero_k = match tk {
            Some(_) => None,
            None => Some(gpu.zeros(k.shape(), dtype)?),
        };
        zero_v = match tv {
            Some(_) => None,
            None => Some(gpu.zeros(v.shape(), dtype)?),
        };
        tk_ptr = tk.or(zero_k.as_ref()).expect("zeros made above").ptr();
        tv_ptr = tv.or(zero_v.as_ref()).expect("zeros made above").ptr();
    }
    let p = JvpPtrs {
        q: q.ptr(),
        k: k.ptr(),
        v: v.ptr(),
        tq: tq.ptr(),
        tk: tk_ptr,
        tv: tv_ptr,
        o: out.o.ptr(),
        to: to.ptr(),
        lse: out.lse.ptr(),
        tlse: tlse.ptr(),
    };
    let layout = Layout::contiguous(dims);
    run_jvp(
        gpu, variant, dtype, dims, layout, p, scale, values, key_lens,
    )
}

/// Runs the JVP plan of [`super::attention_sm90::plan_for`], or where `values` applies
/// ([`ValueProducts::applies`]) [`super::attention_sm90::plan_f16_values_for`] over a workspace
/// allocated here; with `key_lens`, once per batch entry over its keys ([`plan_per_key_len`]; the
/// entries' plans run one after another, so they share the workspace).
#[allow(clippy::too_many_arguments)]
fn run_jvp(
    gpu: &Gpu,
    variant: Variant,
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    scale: f32,
    values: ValueProducts,
    key_lens: Option<&[usize]>,
) -> Result<()> {
    use super::attention_sm90 as sm90;
    let arch = gpu.arch();
    if values.applies(variant, dtype, dims) {
        // Sized for the whole batch, which bounds every entry's share.
        let bytes = f16_values_workspace_bytes(variant, dims);
        let ws = gpu.alloc(&[bytes.div_ceil(4)], DType::F32)?;
        let plan =
            |dims, p| sm90::plan_f16_values_for(arch, variant, dims, layout, p, scale, ws.ptr());
        return gpu.run(&match key_lens {
            None => plan(dims, p)?,
            Some(lens) => plan_per_key_len(dims, lens, |b, dims_b| {
                plan(dims_b, p.batch_entry(b, dims, &layout, dtype))
            })?,
        });
    }
    gpu.run(&match key_lens {
        None => sm90::plan_for(arch, variant, dtype, dims, layout, p, scale)?,
        Some(lens) => plan_for_key_lens(arch, variant, dtype, dims, layout, p, scale, lens)?,
    })
}

/// Checks a packed projection `qkv` [B, N, 3, H, d] (q, k, v interleaved per token, the DiT's
/// layout) and its tangent, and returns the attention's dims (Nq = Nk = N, dv = d).
pub fn check_packed(qkv: &DeviceTensor, tqkv: Option<&DeviceTensor>) -> Result<AttnDims> {
    let s = qkv.shape();
    if s.len() != 5 {
        return Err(Error::Rank {
            op: OP,
            tensor: "qkv".into(),
            expected: 5,
            actual: s.to_vec(),
        });
    }
    if s[2] != 3 {
        return Err(Error::Shape {
            op: OP,
            tensor: "qkv".into(),
            expected: format!(
                "[B, N, 3, H, d] = [{}, {}, 3, {}, {}]",
                s[0], s[1], s[3], s[4]
            ),
            actual: s.to_vec(),
        });
    }
    if let Some(t) = tqkv {
        if t.shape() != s || t.dtype() != qkv.dtype() {
            return Err(Error::TangentMismatch {
                op: OP,
                tensor: "qkv".into(),
                primal_shape: s.to_vec(),
                primal_dtype: qkv.dtype(),
                tangent_shape: t.shape().to_vec(),
                tangent_dtype: t.dtype(),
            });
        }
    }
    let one = [s[0], s[3], s[1], s[4]];
    let dims = check_shapes(&one, &one, &one).map_err(|e| {
        Error::invalid(
            OP,
            format!("packed `qkv` {s:?} (q, k, v each [B, H, N, d] = {one:?}): {e}"),
        )
    })?;
    Layout::packed_qkv(dims).check(qkv.dtype(), dims)?;
    Ok(dims)
}

/// The shape of a token-major output o (or its tangent) of a packed attention: [B, N, H, dv].
pub fn packed_o_shape(dims: AttnDims) -> [usize; 4] {
    [dims.b, dims.nq, dims.h, dims.dv]
}

/// Addresses of q, k, v inside a packed [B, N, 3, H, d] projection at `base`.
fn packed_ptrs(base: u64, dtype: DType, dims: AttnDims) -> [u64; 3] {
    let step = (dims.h * dims.d * dtype.size_in_bytes()) as u64;
    [base, base + step, base + 2 * step]
}

/// o [B, N, H, d] (token-major) and lse [B, H, N] of the attention of a packed projection `qkv`
/// [B, N, 3, H, d], read in place (no permutation kernels).
pub fn forward_packed(
    qkv: &DeviceTensor,
    scale: Option<f64>,
) -> Result<(DeviceTensor, DeviceTensor)> {
    forward_packed_keys(qkv, scale, None)
}

/// [`forward_packed`] where batch entry b attends to its first `key_lens[b]` tokens' keys only (a
/// sequence padded per entry, Wan's `seq_lens`; every query row is still computed), see
/// [`forward_with_key_lens`].
pub fn forward_packed_with_key_lens(
    qkv: &DeviceTensor,
    scale: Option<f64>,
    key_lens: &[usize],
) -> Result<(DeviceTensor, DeviceTensor)> {
    forward_packed_keys(qkv, scale, Some(key_lens))
}

fn forward_packed_keys(
    qkv: &DeviceTensor,
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
) -> Result<(DeviceTensor, DeviceTensor)> {
    let dims = check_packed(qkv, None)?;
    let scale = resolve_scale(scale, dims.d)?;
    let gpu = qkv.gpu();
    let o = gpu.alloc_out(&packed_o_shape(dims), qkv.dtype())?;
    let lse = gpu.alloc_out(&dims.lse_shape(), DType::F32)?;
    forward_packed_into_keys(gpu, qkv, &o, &lse, scale, key_lens)?;
    Ok((o, lse))
}

/// [`forward_packed`] into existing outputs o [B, N, H, d] and lse f32 [B, H, N].
pub fn forward_packed_into(
    gpu: &Gpu,
    qkv: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    scale: f32,
) -> Result<()> {
    forward_packed_into_keys(gpu, qkv, o, lse, scale, None)
}

fn forward_packed_into_keys(
    gpu: &Gpu,
    qkv: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    scale: f32,
    key_lens: Option<&[usize]>,
) -> Result<()> {
    let dims = check_packed(qkv, None)?;
    let dtype = qkv.dtype();
    check_out("o", o, &packed_o_shape(dims), dtype)?;
    check_out("lse", lse, &dims.lse_shape(), DType::F32)?;
    check_disjoint(OP, &[("o", o), ("lse", lse)], &[("qkv", qkv)])?;
    let [q, k, v] = packed_ptrs(qkv.ptr(), dtype, dims);
    let p = JvpPtrs {
        q,
        k,
        v,
        tq: 0,
        tk: 0,
        tv: 0,
        o: o.ptr(),
        to: 0,
        lse: lse.ptr(),
        tlse: 0,
    };
    let (arch, layout) = (gpu.arch(), Layout::packed_qkv(dims));
    gpu.run(&match key_lens {
        None => super::attention_sm90::plan_for(arch, Variant::Fwd, dtype, dims, layout, p, scale)?,
        Some(lens) => plan_for_key_lens(arch, Variant::Fwd, dtype, dims, layout, p, scale, lens)?,
    })
}

/// The JVP of the attention of a packed projection `qkv` [B, N, 3, H, d] with tangent `tqkv` (the
/// same shape; q, k and v all carry theirs): o and its tangent token-major [B, N, H, d], lse and its
/// tangent f32 [B, H, N]. Without a tangent, the forward alone (`to`, `tlse` are `None`).
pub fn jvp_packed(
    qkv: &DeviceTensor,
    tqkv: Option<&DeviceTensor>,
    scale: Option<f64>,
) -> Result<DeviceAttentionJvp> {
    jvp_packed_keys(qkv, tqkv, scale, None)
}

/// [`jvp_packed`] where batch entry b attends to its first `key_lens[b]` tokens' keys only (see
/// [`forward_packed_with_key_lens`]); the padding tokens of qkv and tqkv are never read as keys.
pub fn jvp_packed_with_key_lens(
    qkv: &DeviceTensor,
    tqkv: Option<&DeviceTensor>,
    scale: Option<f64>,
    key_lens: &[usize],
) -> Result<DeviceAttentionJvp> {
    jvp_packed_keys(qkv, tqkv, scale, Some(key_lens))
}

fn jvp_packed_keys(
    qkv: &DeviceTensor,
    tqkv: Option<&DeviceTensor>,
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
) -> Result<DeviceAttentionJvp> {
    let dims = check_packed(qkv, tqkv)?;
    let c = resolve_scale(scale, dims.d)?;
    let gpu = qkv.gpu();
    let dtype = qkv.dtype();
    let o = gpu.alloc_out(&packed_o_shape(dims), dtype)?;
    let lse = gpu.alloc_out(&dims.lse_shape(), DType::F32)?;
    let Some(tqkv) = tqkv else {
        forward_packed_into_keys(gpu, qkv, &o, &lse, c, key_lens)?;
        return Ok(DeviceAttentionJvp {
            o,
            to: None,
            lse,
            tlse: None,
        });
    };
    let out = DeviceAttentionJvp {
        o,
        to: Some(gpu.alloc_out(&packed_o_shape(dims), dtype)?),
        lse,
        tlse: Some(gpu.alloc_out(&dims.lse_shape(), DType::F32)?),
    };
    let values = ValueProducts::from_env();
    jvp_packed_into_keys(gpu, qkv, tqkv, &out, c, values, key_lens)?;
    Ok(out)
}

/// [`jvp_packed`] into existing outputs (`out.to` and `out.tlse` must be present); value products
/// as `FLASHJVP_ATTENTION_VALUES` says ([`ValueProducts::from_env`]).
pub fn jvp_packed_into(
    gpu: &Gpu,
    qkv: &DeviceTensor,
    tqkv: &DeviceTensor,
    out: &DeviceAttentionJvp,
    scale: f32,
) -> Result<()> {
    let values = ValueProducts::from_env();
    jvp_packed_into_with(gpu, qkv, tqkv, out, scale, values)
}

/// [`jvp_packed_into`] with the value products chosen by `values`.
pub fn jvp_packed_into_with(
    gpu: &Gpu,
    qkv: &DeviceTensor,
    tqkv: &DeviceTensor,
    out: &DeviceAttentionJvp,
    scale: f32,
    values: ValueProducts,
) -> Result<()> {
    jvp_packed_into_keys(gpu, qkv, tqkv, out, scale, values, None)
}

fn jvp_packed_into_keys(
    gpu: &Gpu,
    qkv: &DeviceTensor,
    tqkv: &DeviceTensor,
    out: &DeviceAttentionJvp,
    scale: f32,
    values: ValueProducts,
    key_lens: Option<&[usize]>,
) -> Result<()> {
    let dims = check_packed(qkv, Some(tqkv))?;
    let dtype = qkv.dtype();
    let (Some(to), Some(tlse)) = (&out.to, &out.tlse) else {
        return Err(Error::invalid(OP, "jvp_packed_into needs tangent outputs"));
    };
    let o_shape = packed_o_shape(dims);
    check_out("o", &out.o, &o_shape, dtype)?;
    check_out("to", to, &o_shape, dtype)?;
    check_out("lse", &out.lse, &dims.lse_shape(), DType::F32)?;
    check_out("tlse", tlse, &dims.lse_shape(), DType::F32)?;
    check_disjoint(
        OP,
        &[("o", &out.o), ("to", to), ("lse", &out.lse), ("tlse", tlse)],
        &[("qkv", qkv), ("tqkv", tqkv)],
    )?;
    let [q, k, v] = packed_ptrs(qkv.ptr(), dtype, dims);
    let [tq, tk, tv] = packed_ptrs(tqkv.ptr(), dtype, dims);
    let p = JvpPtrs {
        q,
        k,
        v,
        tq,
        tk,
        tv,
        o: out.o.ptr(),
        to: to.ptr(),
        lse: out.lse.ptr(),
        tlse: tlse.ptr(),
    };
    let layout = Layout::packed_qkv(dims);
    run_jvp(
        gpu,
        Variant::Jvp,
        dtype,
        dims,
        layout,
        p,
        scale,
        values,
        key_lens,
    )
}

/// dq, dk, dv given the forward's o \[B,H,Nq,dv\] and lse (f32) and the output cotangent dout
/// \[B,H,Nq,dv\].
pub fn backward(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    dout: &DeviceTensor,
    scale: Option<f64>,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
    backward_keys(q, k, v, [o, lse, dout], scale, None)
}

/// [`backward`] of [`forward_with_key_lens`] (o and lse from it): the padding rows of dk and dv
/// (key_lens\[b\].. of entry b) are 0, see [`crate::ops::attention_backward_with_key_lens`].
#[allow(clippy::too_many_arguments)]
pub fn backward_with_key_lens(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    dout: &DeviceTensor,
    scale: Option<f64>,
    key_lens: &[usize],
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
    backward_keys(q, k, v, [o, lse, dout], scale, Some(key_lens))
}

fn backward_keys(
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    [o, lse, dout]: [&DeviceTensor; 3],
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
) -> Result<(DeviceTensor, DeviceTensor, DeviceTensor)> {
    let dims = check_device(q, k, v, [("q", None, q), ("k", None, k), ("v", None, v)])?;
    let c = resolve_scale(scale, dims.d)?;
    let gpu = q.gpu();
    let dtype = q.dtype();
    let dq = gpu.alloc_out(&dims.q_shape(), dtype)?;
    let dk = gpu.alloc_out(&dims.k_shape(), dtype)?;
    let dv = gpu.alloc_out(&dims.v_shape(), dtype)?;
    let delta = gpu.alloc_out(&dims.lse_shape(), DType::F32)?;
    backward_into_keys(
        gpu,
        q,
        k,
        v,
        [o, lse, dout],
        &delta,
        [&dq, &dk, &dv],
        c,
        key_lens,
    )?;
    Ok((dq, dk, dv))
}

/// The backward into existing outputs; `delta` is an f32 \[B,H,Nq\] scratch buffer.
#[allow(clippy::too_many_arguments)]
pub fn backward_into(
    gpu: &Gpu,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    dout: &DeviceTensor,
    delta: &DeviceTensor,
    grads: [&DeviceTensor; 3],
    scale: f32,
) -> Result<()> {
    backward_into_keys(gpu, q, k, v, [o, lse, dout], delta, grads, scale, None)
}

#[allow(clippy::too_many_arguments)]
fn backward_into_keys(
    gpu: &Gpu,
    q: &DeviceTensor,
    k: &DeviceTensor,
    v: &DeviceTensor,
    [o, lse, dout]: [&DeviceTensor; 3],
    delta: &DeviceTensor,
    grads: [&DeviceTensor; 3],
    scale: f32,
    key_lens: Option<&[usize]>,
) -> Result<()> {
    let dims = check_device(q, k, v, [("q", None, q), ("k", None, k), ("v", None, v)])?;
    let dtype = q.dtype();
    check_out("o", o, &dims.o_shape(), dtype)?;
    check_out("go", dout, &dims.o_shape(), dtype)?;
    check_out("lse", lse, &dims.lse_shape(), DType::F32)?;
    check_out("delta", delta, &dims.lse_shape(), DType::F32)?;
    check_out("dq", grads[0], &dims.q_shape(), dtype)?;
    check_out("dk", grads[1], &dims.k_shape(), dtype)?;
    check_out("dv", grads[2], &dims.v_shape(), dtype)?;
    // delta is written by the preprocess and read by the other two kernels: an output too.
    check_disjoint(
        OP,
        &[
            ("delta", delta),
            ("dq", grads[0]),
            ("dk", grads[1]),
            ("dv", grads[2]),
        ],
        &[
            ("q", q),
            ("k", k),
            ("v", v),
            ("o", o),
            ("lse", lse),
            ("go", dout),
        ],
    )?;
    let p = BwdPtrs {
        q: q.ptr(),
        k: k.ptr(),
        v: v.ptr(),
        o: o.ptr(),
        lse: lse.ptr(),
        dout: dout.ptr(),
        delta: delta.ptr(),
        dq: grads[0].ptr(),
        dk: grads[1].ptr(),
        dv: grads[2].ptr(),
    };
    let (arch, layout) = (gpu.arch(), Layout::contiguous(dims));
    gpu.run(&match key_lens {
        None => super::attention_sm90::plan_backward_for(arch, dtype, dims, layout, p, scale)?,
        Some(lens) => plan_backward_for_key_lens(arch, dtype, dims, layout, p, scale, lens)?,
    })
}

/// The backward of attention read in place from a packed projection: qkv [B, N, 3, H, d] (q, k, v
/// of token n, head h at [b, n, 0|1|2, h, :]), the forward's o [B, N, H, d] and lse f32 [B, H, N],
/// and the cotangent dout [B, N, H, d]; returns dqkv [B, N, 3, H, d] in qkv's layout (the DiT's,
/// with no permutation around attention).
pub fn backward_packed(
    qkv: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    dout: &DeviceTensor,
    scale: Option<f64>,
) -> Result<DeviceTensor> {
    backward_packed_keys(qkv, [o, lse, dout], scale, None)
}

/// [`backward_packed`] of [`forward_packed_with_key_lens`] (o and lse from it): dqkv's k and v
/// parts are 0 at each entry's padding tokens (key_lens\[b\].., zeroed by a 2D memset per padded
/// entry), its q part is the gradient of every query row.
pub fn backward_packed_with_key_lens(
    qkv: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
    dout: &DeviceTensor,
    scale: Option<f64>,
    key_lens: &[usize],
) -> Result<DeviceTensor> {
    backward_packed_keys(qkv, [o, lse, dout], scale, Some(key_lens))
}

fn backward_packed_keys(
    qkv: &DeviceTensor,
    [o, lse, dout]: [&DeviceTensor; 3],
    scale: Option<f64>,
    key_lens: Option<&[usize]>,
) -> Result<DeviceTensor> {
    let dims = check_packed(qkv, None)?;
    let dtype = qkv.dtype();
    let o_shape = packed_o_shape(dims);
    check_out("o", o, &o_shape, dtype)?;
    check_out("dout", dout, &o_shape, dtype)?;
    check_out("lse", lse, &dims.lse_shape(), DType::F32)?;
    let c = resolve_scale(scale, dims.d)?;
    let gpu = qkv.gpu();
    let dqkv = gpu.alloc_out(qkv.shape(), dtype)?;
    let delta = gpu.alloc_out(&dims.lse_shape(), DType::F32)?;
    let [q, k, v] = packed_ptrs(qkv.ptr(), dtype, dims);
    let [dq, dk, dv] = packed_ptrs(dqkv.ptr(), dtype, dims);
    let p = BwdPtrs {
        q,
        k,
        v,
        o: o.ptr(),
        lse: lse.ptr(),
        dout: dout.ptr(),
        delta: delta.ptr(),
        dq,
        dk,
        dv,
    };
    let (arch, layout) = (gpu.arch(), Layout::packed_qkv(dims));
    gpu.run(&match key_lens {
        None => super::attention_sm90::plan_backward_for(arch, dtype, dims, layout, p, c)?,
        Some(lens) => plan_backward_for_key_lens(arch, dtype, dims, layout, p, c, lens)?,
    })?;
    Ok(dqkv)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct, aligned, non-null addresses for plans that are built but never run.
    const FAKE_PTRS: JvpPtrs = JvpPtrs {
        q: 0x1000,
        k: 0x2000,
        v: 0x3000,
        tq: 0x4000,
        tk: 0x5000,
        tv: 0x6000,
        o: 0x7000,
        to: 0x8000,
        lse: 0x9000,
        tlse: 0xa000,
    };

    /// The backward's counterpart of [`FAKE_PTRS`].
    const FAKE_BWD_PTRS: BwdPtrs = BwdPtrs {
        q: 0x1000,
        k: 0x2000,
        v: 0x3000,
        o: 0x4000,
        lse: 0x5000,
        dout: 0x6000,
        delta: 0x7000,
        dq: 0x8000,
        dk: 0x9000,
        dv: 0xa000,
    };

    #[test]
    fn key_len_plans_launch_each_batch_entry_on_its_own_keys() {
        let dims = AttnDims {
            b: 3,
            h: 2,
            nq: 77,
            nk: 300,
            d: 64,
            dv: 64,
        };
        let lay = Layout::contiguous(dims);
        let lens = [300, 1, 131];
        let kernels = |steps: &[Step]| -> Vec<Launch> {
            steps
                .iter()
                .filter_map(|s| match s {
                    Step::Kernel(l) => Some(l.clone()),
                    _ => None,
                })
                .collect()
        };
        for arch in ["sm_80", "sm_90a"] {
            let steps = plan_for_key_lens(
                arch,
                Variant::Jvp,
                DType::BF16,
                dims,
                lay,
                FAKE_PTRS,
                0.125,
                &lens,
            )
            .unwrap();
            let launches = kernels(&steps);
            assert_eq!(launches.len(), 3, "{arch}: one launch per batch entry");
            for (b, l) in launches.iter().enumerate() {
                // One entry's heads; Nk = its key count; lse of entry b at its first row.
                assert_eq!(l.grid.1, 2, "{arch}: grid y = H");
                let ints: Vec<i32> = l
                    .args
                    .iter()
                    .filter_map(|a| match a {
                        Arg::I32(x) => Some(*x),
                        _ => None,
                    })
                    .collect();
                assert_eq!(
                    &ints[..2],
                    &[77, lens[b] as i32],
                    "{arch}: Nq, Nk of entry {b}"
                );
                let lse = FAKE_PTRS.lse + (b * 2 * 77 * 4) as u64;
                assert!(l.args.contains(&Arg::Ptr(lse)), "{arch}: lse of entry {b}");
                let o = FAKE_PTRS.o + (b * 2 * 77 * 64 * 2) as u64;
                assert!(l.args.contains(&Arg::Ptr(o)), "{arch}: o of entry {b}");
            }
            // Every key counted: the same kernels as the plain plan, one launch per entry.
            let full = plan_for_key_lens(
                arch,
                Variant::Fwd,
                DType::F32,
                dims,
                lay,
                FAKE_PTRS,
                0.125,
                &[300; 3],
            )
            .unwrap();
            let plain = super::super::attention_sm90::plan_for(
                arch,
                Variant::Fwd,
                DType::F32,
                dims,
                lay,
                FAKE_PTRS,
                0.125,
            )
            .unwrap();
            assert_eq!(kernels(&full)[0].kernel, kernels(&plain)[0].kernel);
        }
        let bp = FAKE_BWD_PTRS;
        let steps =
            plan_backward_for_key_lens("sm_80", DType::F16, dims, lay, bp, 0.125, &lens).unwrap();
        // dk and dv zeroed whole first (the padding rows' gradient), then 3 kernels per entry.
        let bytes = 3 * 2 * 300 * 64 * 2;
        assert_eq!(steps[0], Step::zero(bp.dk, bytes));
        assert_eq!(steps[1], Step::zero(bp.dv, bytes));
        assert_eq!(kernels(&steps).len(), 9);
        // Token-major k and v (flash-attn's [B, Nk, H, d]): one fill per padded entry, starting at
        // its first padding row and running to the end of the entry.
        let mut tokens = lay;
        tokens.k = Strides::token_major(300, 2, 64);
        tokens.v = tokens.k;
        let steps = plan_backward_for_key_lens("sm_80", DType::F16, dims, tokens, bp, 0.125, &lens)
            .unwrap();
        let entry = 300 * 2 * 64;
        let fill = |ptr: u64, b: usize, len: usize| {
            Step::zero(
                ptr + ((b * entry + len * 2 * 64) * 2) as u64,
                (300 - len) * 2 * 64 * 2,
            )
        };
        assert_eq!(
            steps[..4],
            [
                fill(bp.dk, 1, 1),
                fill(bp.dk, 2, 131),
                fill(bp.dv, 1, 1),
                fill(bp.dv, 2, 131)
            ]
        );
        assert_eq!(kernels(&steps).len(), 9);
        // A packed projection [B, Nk, 3, H, d]: an entry's padding tokens are one 2D memset, its
        // runs H·d elements wide, 3·H·d apart.
        let mut packed = lay;
        packed.k = Layout::packed_qkv(AttnDims { nq: 300, ..dims }).k;
        packed.v = packed.k;
        let steps = plan_backward_for_key_lens("sm_80", DType::F16, dims, packed, bp, 0.125, &lens)
            .unwrap();
        let token = 3 * 2 * 64;
        let runs = |ptr: u64, b: usize, len: usize| Step::ZeroRows {
            ptr: ptr + ((b * 300 * token + len * token) * 2) as u64,
            pitch: token * 2,
            row_bytes: 2 * 64 * 2,
            rows: 300 - len,
        };
        assert_eq!(
            steps[..4],
            [
                runs(bp.dk, 1, 1),
                runs(bp.dk, 2, 131),
                runs(bp.dv, 1, 1),
                runs(bp.dv, 2, 131)
            ]
        );
        assert_eq!(kernels(&steps).len(), 9);
        // k's rows padded to d + 8 (a memset per entry and head, over its padding rows); v stored
        // head-outermost [H, B, Nk, d] (each head's padding rows touch: a memset per entry, one
        // run per head).
        let mut strided = lay;
        strided.k = Strides {
            b: 2 * 300 * 72,
            h: 300 * 72,
            n: 72,
        };
        strided.v = Strides {
            b: 300 * 64,
            h: 3 * 300 * 64,
            n: 64,
        };
        let steps =
            plan_backward_for_key_lens("sm_80", DType::F16, dims, strided, bp, 0.125, &lens)
                .unwrap();
        let k_runs = |b: usize, head: usize, len: usize| Step::ZeroRows {
            ptr: bp.dk + ((b * 2 * 300 * 72 + head * 300 * 72 + len * 72) * 2) as u64,
            pitch: 72 * 2,
            row_bytes: 64 * 2,
            rows: 300 - len,
        };
        let v_runs = |b: usize, len: usize| Step::ZeroRows {
            ptr: bp.dv + ((b * 300 * 64 + len * 64) * 2) as u64,
            pitch: 3 * 300 * 64 * 2,
            row_bytes: (300 - len) * 64 * 2,
            rows: 2,
        };
        assert_eq!(
            steps[..6],
            [
                k_runs(1, 0, 1),
                k_runs(1, 1, 1),
                k_runs(2, 0, 131),
                k_runs(2, 1, 131),
                v_runs(1, 1),
                v_runs(2, 131)
            ]
        );
        assert_eq!(kernels(&steps).len(), 9);
        // A layout whose gradient rows would overlap is refused before any fill is planned.
        let mut shared = lay;
        shared.k.h = 0;
        let e = plan_backward_for_key_lens("sm_80", DType::F16, dims, shared, bp, 0.125, &lens)
            .unwrap_err();
        assert!(e.to_string().contains("dk"), "{e}");
        // Bad counts name key_lens.
        for bad in [&[300, 1][..], &[300, 0, 1], &[301, 1, 1]] {
            let e = plan_for_key_lens(
                "sm_80",
                Variant::Fwd,
                DType::F32,
                dims,
                lay,
                FAKE_PTRS,
                0.125,
                bad,
            )
            .unwrap_err();
            assert!(e.to_string().contains("key_lens"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn layouts_are_checked() {
        let dims = AttnDims {
            b: 2,
            h: 3,
            nq: 5,
            nk: 5,
            d: 64,
            dv: 64,
        };
        let c = Layout::contiguous(dims);
        assert_eq!(c.q.span(2, 3, 5, 64), Some(2 * 3 * 5 * 64));
        c.check(DType::BF16, dims).unwrap();
        let p = Layout::packed_qkv(dims);
        assert_eq!(
            p.q,
            Strides {
                b: 5 * 3 * 3 * 64,
                h: 64,
                n: 3 * 3 * 64
            }
        );
        assert_eq!(p.o.span(2, 3, 5, 64), Some(2 * 5 * 3 * 64));
        p.check(DType::BF16, dims).unwrap();
        // Rows of o on top of each other, a misaligned 16-bit stride, a row shorter than d.
        let mut bad = p;
        bad.o.n = 64;
        assert!(bad
            .check(DType::F32, dims)
            .unwrap_err()
            .to_string()
            .contains("overlaps"));
        let mut bad = p;
        bad.k.n = 3 * 3 * 64 + 4;
        assert!(bad.check(DType::BF16, dims).is_err());
        bad.check(DType::F32, dims).unwrap();
        let mut bad = c;
        bad.v.n = 32;
        assert!(bad.check(DType::F32, dims).is_err());
    }

    #[test]
    fn spans_and_overlap_checks_never_wrap() {
        let s = Strides {
            b: 64,
            h: 64,
            n: 1 << 62,
        };
        // An empty view touches nothing; one past usize is None, not a wrapped count.
        assert_eq!(s.span(0, 3, 5, 64), Some(0));
        assert_eq!(s.span(2, 3, 0, 64), Some(0));
        assert_eq!(s.span(1, 1, 5, 64), None);
        assert_eq!(s.span(1, 1, 2, 64), Some((1 << 62) + 64));
        let dims = AttnDims {
            b: 2,
            h: 3,
            nq: 5,
            nk: 5,
            d: 64,
            dv: 64,
        };
        // o's rows 2^62 elements apart: its span passes usize (the overlap sum used to wrap and
        // pass the check in release, and panic in debug).
        let mut bad = Layout::contiguous(dims);
        bad.o = s;
        let e = bad.check(DType::F32, dims).unwrap_err().to_string();
        assert!(e.contains("`o`") && e.contains("isize::MAX"), "{e}");
        // Within usize but past isize::MAX bytes: the kernels' 64-bit offsets would wrap.
        bad.o = Strides {
            b: 1 << 61,
            h: 64,
            n: 192,
        };
        let e = bad.check(DType::F32, dims).unwrap_err().to_string();
        assert!(e.contains("`o`") && e.contains("isize::MAX"), "{e}");
        bad.o
            .check_distinct("o", "[B, H, Nq, dv]", [2, 3, 5, 64])
            .unwrap();
        let e = Strides {
            b: usize::MAX / 2,
            h: 64,
            n: 192,
        }
        .check_distinct("o", "[B, H, Nq, dv]", [4, 3, 5, 64])
        .unwrap_err()
        .to_string();
        assert!(e.contains("usize"), "{e}");
    }

    /// The backward writes dq, dk, dv with q's, k's, v's layouts, without atomics: a layout that
    /// shares k and v across heads, which the forward takes, is refused there.
    #[test]
    fn backward_refuses_gradient_layouts_that_overlap() {
        let dims = check_shapes(&[2, 4, 16, 64], &[2, 4, 16, 64], &[2, 4, 16, 64]).unwrap();
        let mut shared = Layout::contiguous(dims);
        let kv = Strides {
            b: 16 * 64,
            h: 0,
            n: 64,
        };
        shared.k = kv;
        shared.v = kv;
        let p = FAKE_PTRS;
        plan_jvp(Variant::Fwd, DType::BF16, dims, shared, p, 0.1).unwrap();
        let bp = FAKE_BWD_PTRS;
        let e = plan_backward(DType::BF16, dims, shared, bp, 0.1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`k`") && e.contains("`dk`") && e.contains("overlaps"),
            "{e}"
        );
        let mut q_heads = Layout::contiguous(dims);
        q_heads.q.h = 0;
        let e = plan_backward(DType::F32, dims, q_heads, bp, 0.1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`dq`"), "{e}");
        plan_backward(DType::BF16, dims, Layout::contiguous(dims), bp, 0.1).unwrap();
        plan_backward(DType::BF16, dims, Layout::packed_qkv(dims), bp, 0.1).unwrap();
    }

    #[test]
    fn shared_memory_matches_the_readme_table() {
        let bf = DType::BF16;
        let want_jvp = [51200, 92160, 112640, 133120, 104448];
        let want_nokv = [30720, 55296, 67584, 53248, 69632];
        let want_fwd = [25600, 46080, 56320, 66560, 52224];
        let want_f32 = [20736, 41216, 52480, 61696, 82176];
        let want_f32_nokv = [12416, 24704, 30848, 36992, 49280];
        let want_f32_fwd = [10368, 20608, 26240, 30848, 41088];
        let want_bwd = [25600, 41984, 46080, 58368, 74752];
        let want_bwd16 = [
            [31744, 30720],
            [56320, 55296],
            [68608, 67584],
            [80896, 79872],
            [70144, 69632],
        ];
        for (i, d) in HEAD_DIMS.into_iter().enumerate() {
            assert_eq!(
                jvp_shared_bytes("sm_80", Variant::Jvp, bf, d, d),
                want_jvp[i]
            );
            assert_eq!(
                jvp_shared_bytes("sm_80", Variant::JvpNoKv, DType::F16, d, d),
                want_nokv[i]
            );
            assert_eq!(
                jvp_shared_bytes("sm_80", Variant::Fwd, bf, d, d),
                want_fwd[i]
            );
            assert_eq!(
                jvp_shared_bytes("sm_80", Variant::Jvp, DType::F32, d, d),
                want_f32[i]
            );
            assert_eq!(
                jvp_shared_bytes("sm_80", Variant::JvpNoKv, DType::F32, d, d),
                want_f32_nokv[i]
            );
            assert_eq!(
                jvp_shared_bytes("sm_80", Variant::Fwd, DType::F32, d, d),
                want_f32_fwd[i]
            );
            assert_eq!(bwd_shared_bytes(DType::F32, d, d), [want_bwd[i]; 2]);
            assert_eq!(bwd_shared_bytes(bf, d, d), want_bwd16[i], "d{d}");
        }
        // dv != d: README's rows for the full JVP (the largest variant) and the backward.
        let want_pairs = [
            ((32, 128), 55296, 45312, 50176),
            ((128, 32), 79872, 57600, 50176),
            ((72, 96), 120832, 52480, 52224),
            ((96, 72), 124928, 61696, 52224),
            ((64, 128), 71680, 57600, 58368),
        ];
        for ((d, dv), jvp16, jvp32, bwd) in want_pairs {
            assert_eq!(
                jvp_shared_bytes("sm_80", Variant::Jvp, bf, d, dv),
                jvp16,
                "d{d} dv{dv}"
            );
            assert_eq!(
                jvp_shared_bytes("sm_80", Variant::Jvp, DType::F32, d, dv),
                jvp32,
                "d{d} dv{dv}"
            );
            assert_eq!(bwd_shared_bytes(DType::F32, d, dv), [bwd; 2], "d{d} dv{dv}");
        }
        // Every instantiated pair fits an A100's and an H100's opt-in limit (163 KiB, 227 KiB).
        for d in HEAD_DIMS {
            for dv in HEAD_DIMS {
                for v in [Variant::Jvp, Variant::JvpNoKv, Variant::Fwd] {
                    for dt in [bf, DType::F32] {
                        assert!(jvp_shared_bytes("sm_80", v, dt, d, dv) <= 163 * 1024);
                    }
                }
                for dt in [bf, DType::F32] {
                    assert!(bwd_shared_bytes(dt, d, dv).iter().all(|&b| b <= 163 * 1024));
                }
            }
        }
    }

    #[test]
    fn small_shared_memory_devices_get_shorter_key_tiles_that_fit() {
        for (arch, small) in [
            ("sm_80", false),
            ("sm_86", true),
            ("sm_87", false),
            ("sm_89", true),
            ("sm_90a", false),
            ("sm_100", false),
            ("sm_120", true),
            ("sm_121", true),
            ("bogus", false),
        ] {
            assert_eq!(small_shared_memory(arch), small, "{arch}");
        }
        // On a 99 KiB device every kernel fits: the full JVP at d >= 72 on 32 keys, at
        // d = dv = 128 on 16; the rest (and every kernel of a large device) keep their tiles.
        let bf = DType::BF16;
        for d in HEAD_DIMS {
            for dv in HEAD_DIMS {
                for v in [Variant::Jvp, Variant::JvpNoKv, Variant::Fwd] {
                    let large = key_tile(v, d, dv, false);
                    let small = key_tile(v, d, dv, true);
                    let (big, fit) = (
                        jvp_shared_bytes("sm_80", v, bf, d, dv),
                        jvp_shared_bytes("sm_89", v, bf, d, dv),
                    );
                    assert!(fit <= SMALL_SHARED_BYTES, "{v:?} d{d} dv{dv}: {fit}");
                    if big <= SMALL_SHARED_BYTES {
                        assert_eq!((small, fit), (large, big), "{v:?} d{d} dv{dv}");
                    } else {
                        assert!(small < large, "{v:?} d{d} dv{dv}");
                        // The longest tile that fits: twice as many keys would not.
                        let (dp, dvp) = (d.next_multiple_of(16), dv.next_multiple_of(16));
                        assert!(tc_shared_bytes(v, dp, dvp, 2 * small) > SMALL_SHARED_BYTES);
                    }
                    for dt in [DType::F16, DType::F32] {
                        assert!(jvp_shared_bytes("sm_89", v, dt, d, dv) <= SMALL_SHARED_BYTES);
                    }
                }
                for dt in [bf, DType::F32] {
                    let b = bwd_shared_bytes(dt, d, dv);
                    assert!(
                        b.iter().all(|&b| b <= SMALL_SHARED_BYTES),
                        "bwd d{d} dv{dv}"
                    );
                }
            }
        }
        assert_eq!(key_tile(Variant::Jvp, 72, 72, true), 32);
        assert_eq!(key_tile(Variant::Jvp, 96, 96, true), 32);
        assert_eq!(key_tile(Variant::Jvp, 128, 128, true), 16);
        assert_eq!(key_tile(Variant::Jvp, 64, 64, true), 64);
        assert_eq!(jvp_shared_bytes("sm_89", Variant::Jvp, bf, 128, 128), 69632);
        // The plan asks for what the kernel takes on that arch, and is refused on the other kind
        // of device (whose build of the kernel takes other tiles).
        let dims = check_shapes(&[1, 2, 100, 96], &[1, 2, 70, 96], &[1, 2, 70, 96]).unwrap();
        let c = Layout::contiguous(dims);
        for (arch, want, other) in [("sm_80", 133120, "sm_89"), ("sm_89", 79872, "sm_80")] {
            let steps = plan_jvp_on(arch, Variant::Jvp, bf, dims, c, FAKE_PTRS, 0.1).unwrap();
            let Step::Kernel(l) = &steps[0] else { panic!() };
            assert_eq!(
                (l.kernel(), l.shared_bytes()),
                ("attention_jvp_bf16_d96", want)
            );
            l.check_arch(arch).unwrap();
            let e = l.check_arch(other).unwrap_err().to_string();
            assert!(
                e.contains("attention_jvp_bf16_d96") && e.contains(other),
                "{e}"
            );
        }
        let steps = plan_jvp(Variant::Fwd, bf, dims, c, FAKE_PTRS, 0.1).unwrap();
        let Step::Kernel(l) = &steps[0] else { panic!() };
        for arch in ["sm_80", "sm_87", "sm_90a", "sm_100"] {
            l.check_arch(arch).unwrap();
        }
        assert!(l.check_arch("sm_120").is_err());
    }

    #[test]
    fn kernel_names_carry_dv_only_when_it_differs() {
        let dims = check_shapes(&[1, 2, 8, 64], &[1, 2, 9, 64], &[1, 2, 9, 128]).unwrap();
        assert_eq!((dims.d, dims.dv), (64, 128));
        assert_eq!(dims.o_shape(), [1, 2, 8, 128]);
        assert_eq!(dims.v_shape(), [1, 2, 9, 128]);
        let p = FAKE_PTRS;
        let name = |steps: Vec<Step>| -> Vec<(String, &'static str)> {
            steps
                .into_iter()
                .filter_map(|s| match s {
                    Step::Kernel(l) => Some((l.kernel, l.file)),
                    _ => None,
                })
                .collect()
        };
        let got = name(
            plan_jvp(
                Variant::JvpNoKv,
                DType::F16,
                dims,
                Layout::contiguous(dims),
                p,
                0.1,
            )
            .unwrap(),
        );
        assert_eq!(
            got,
            [(
                "attention_jvp_nokv_f16_d64_dv128".to_string(),
                "attention_jvp_dv.cu"
            )]
        );
        let bp = BwdPtrs {
            q: 1,
            k: 2,
            v: 3,
            o: 4,
            lse: 5,
            dout: 6,
            delta: 7,
            dq: 8,
            dk: 9,
            dv: 10,
        };
        let got = name(plan_backward(DType::F32, dims, Layout::contiguous(dims), bp, 0.1).unwrap());
        assert_eq!(
            got,
            [
                (
                    "attention_bwd_preprocess_f32".to_string(),
                    "attention_bwd.cu"
                ),
                (
                    "attention_bwd_dkdv_f32_d64_dv128".to_string(),
                    "attention_bwd_dv.cu"
                ),
                (
                    "attention_bwd_dq_f32_d64_dv128".to_string(),
                    "attention_bwd_dv.cu"
                ),
            ]
        );
        let same = check_shapes(&[1, 2, 8, 72], &[1, 2, 9, 72], &[1, 2, 9, 72]).unwrap();
        let got = name(
            plan_jvp(
                Variant::Fwd,
                DType::BF16,
                same,
                Layout::contiguous(same),
                p,
                0.1,
            )
            .unwrap(),
        );
        assert_eq!(
            got,
            [("attention_fwd_bf16_d72".to_string(), "attention_jvp.cu")]
        );
    }

    #[test]
    fn unsupported_shapes_are_errors() {
        let e = check_shapes(&[1, 1, 8, 48], &[1, 1, 8, 48], &[1, 1, 8, 48]).unwrap_err();
        assert!(e.to_string().contains("head dim 48"), "{e}");
        // An unsupported dv names q, v and their shapes.
        let e = check_shapes(&[1, 1, 8, 64], &[1, 1, 8, 64], &[1, 1, 8, 40]).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(
            m.contains("q [1, 1, 8, 64]") && m.contains("v [1, 1, 8, 40]") && m.contains("dim 40"),
            "{m}"
        );
        let e = check_shapes(&[1, 1, 8, 48], &[1, 1, 8, 48], &[1, 1, 8, 256]).unwrap_err();
        assert!(
            e.to_string().contains("head dims 48 of q and 256 of v"),
            "{e}"
        );
        // Every pair of supported head dims is accepted.
        for d in HEAD_DIMS {
            for dv in HEAD_DIMS {
                let dims = check_shapes(&[1, 1, 8, d], &[1, 1, 8, d], &[1, 1, 8, dv]).unwrap();
                assert_eq!((dims.d, dims.dv), (d, dv));
            }
        }
        let e =
            check_shapes(&[300, 300, 8, 64], &[300, 300, 8, 64], &[300, 300, 8, 64]).unwrap_err();
        assert!(e.to_string().contains("65535"), "{e}");
        let e = check_shapes(&[1, 1, 8, 64], &[1, 2, 8, 64], &[1, 1, 8, 64]).unwrap_err();
        assert!(e.to_string().contains("`k`"), "{e}");
        let e = check_shapes(&[1, 8, 64], &[1, 1, 8, 64], &[1, 1, 8, 64]).unwrap_err();
        assert!(e.to_string().contains("`q`"), "{e}");
    }

    #[test]
    fn misaligned_16_bit_tensors_are_refused() {
        let dims = check_shapes(&[1, 1, 8, 64], &[1, 1, 8, 64], &[1, 1, 8, 64]).unwrap();
        let c = Layout::contiguous(dims);
        let mut p = FAKE_PTRS;
        assert!(plan_jvp(Variant::Jvp, DType::BF16, dims, c, p, 0.1).is_ok());
        p.tv = 0x6008;
        let e = plan_jvp(Variant::Jvp, DType::BF16, dims, c, p, 0.1).unwrap_err();
        assert!(e.to_string().contains("`tv`"), "{e}");
        // The nokv kernel does not read tv; f32 has no alignment requirement.
        assert!(plan_jvp(Variant::JvpNoKv, DType::BF16, dims, c, p, 0.1).is_ok());
        assert!(plan_jvp(Variant::Jvp, DType::F32, dims, c, p, 0.1).is_ok());
    }

    #[test]
    fn plans_end_with_heads_and_strides() {
        let dims = check_shapes(&[2, 3, 40, 72], &[2, 3, 40, 72], &[2, 3, 40, 72]).unwrap();
        let p = FAKE_PTRS;
        let packed = Layout::packed_qkv(dims);
        for (v, nptr) in [(Variant::Jvp, 10), (Variant::JvpNoKv, 8), (Variant::Fwd, 5)] {
            let steps = plan_jvp(v, DType::BF16, dims, packed, p, 0.1).unwrap();
            let Step::Kernel(l) = &steps[0] else { panic!() };
            assert_eq!(l.grid, (1, 6, 1));
            assert_eq!(l.args.len(), nptr + 3 + 1 + 12, "{v:?}");
            assert_eq!(l.args[nptr + 3], Arg::I32(3));
            let tail: Vec<Arg> = [packed.q, packed.k, packed.v, packed.o]
                .iter()
                .flat_map(|s| s.args())
                .collect();
            assert_eq!(&l.args[nptr + 4..], &tail[..]);
            assert_eq!(tail[0], Arg::I64(40 * 9 * 72));
            assert_eq!(tail[1], Arg::I64(72));
            assert_eq!(tail[2], Arg::I64(9 * 72));
            assert_eq!(tail[11], Arg::I64(3 * 72));
        }
        // A layout the kernels cannot take is an error of the plan.
        let mut bad = packed;
        bad.q.n = 9 * 72 + 4;
        let e = plan_jvp(Variant::Fwd, DType::F16, dims, bad, p, 0.1).unwrap_err();
        assert!(e.to_string().contains("`q`"), "{e}");
    }
}
