//! Host side of the Hopper attention kernels (cuda/attention_jvp_sm90.cu: forward and JVP;
//! cuda/attention_bwd_sm90.cu: backward): TMA tensor-map descriptions and their encoding
//! (cuTensorMapEncodeTiled through cudarc's driver bindings), the launch plans, and the dispatch
//! predicates that pick them over the sm_80 kernels of attention_jvp.cu and attention_bwd.cu.
//!
//! The sm_90a forward/JVP runs when the device is compute capability 9.0 (NVRTC arch `sm_90a`), the
//! storage dtype is bf16 or f16, the head dim is 64, 72, 96 or 128 and dv == d; every other case
//! (f32, d 32, dv != d, any other GPU) takes the sm_80 kernels. `FLASHJVP_ATTENTION_PATH=sm80`
//! forces the sm_80 kernels on Hopper too (for comparisons and as an escape hatch). The Hopper
//! backward takes the same problems but only with `FLASHJVP_ATTENTION_BWD_PATH=sm90a`
//! ([`bwd_path_for`]).
//!
//! Plans stay pure data: a tensor-map argument is a [`TensorMapDesc`] (pointer, dims, strides, box),
//! encoded into the driver's 128-byte `CUtensorMap` only when the plan is executed, so that the tests
//! check plans against the kernels' PTX signatures without a GPU or a driver.
//!
//! Status: the forward/JVP ran on an NVIDIA H200 (docs/gpu-runs.md); the backward has run on the CPU
//! emulator only.

use super::attention::{AttnDims, BwdPtrs, JvpPtrs, Layout, Strides, Variant};
use super::launch::{dtype_suffix, int_arg, Arg, Launch, Step};
use super::nvrtc;
use crate::error::{Error, Result};
use crate::tensor::DType;

const OP: &str = "attention";

/// The kernel file of the Hopper path (compiled for sm_90a only, see `nvrtc::file_supports_arch`).
pub const FILE: &str = "attention_jvp_sm90.cu";

/// The head dims the Hopper kernels are instantiated for.
pub const HEAD_DIMS: [usize; 4] = [64, 72, 96, 128];

/// Query rows per block (two consumer warpgroups of 64 rows).
pub const BLOCK_ROWS: usize = 128;

/// Threads per block: a producer warpgroup and two consumer warpgroups.
pub const THREADS: u32 = 384;

/// Registers per thread the producer warpgroup keeps after `setmaxnreg.dec` (the kernel's
/// PRODUCER_REGS).
pub const PRODUCER_REGS: u32 = 24;

/// Registers per thread each consumer warpgroup asks for with `setmaxnreg.inc` (CONSUMER_REGS).
pub const CONSUMER_REGS: u32 = 240;

/// Errors unless a Hopper attention kernel compiled to `registers` per thread can make its
/// register moves. The block starts with `registers` for each of its 384 threads; `setmaxnreg.inc`
/// waits until the registers the producer gave back cover the consumers' rise, so with fewer
/// than 168 at entry (128·(R − 24) < 256·(240 − R), R rounded up to the allocation unit of 8) the
/// consumers would wait for ever: a hang, not
/// an error. ptxas gives these kernels the most `__launch_bounds__(384, 1)` allows, 168; a
/// compiler that gave fewer is caught here (by the kernel loader and CI's compile test) instead.
pub fn check_register_pool(kernel: &str, registers: u32) -> Result<()> {
    // Registers are handed out 8 per thread at a time: 161 to 167 start with 168.
    let registers = registers.next_multiple_of(8);
    let (threads, producer, consumers) = (THREADS, 128, THREADS - 128);
    let freed = producer * registers.saturating_sub(PRODUCER_REGS);
    let wanted = consumers * CONSUMER_REGS.saturating_sub(registers);
    if freed >= wanted && threads * registers <= 65536 {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "kernel {kernel} was compiled to {registers} registers per thread: its setmaxnreg moves \
         (producer {PRODUCER_REGS}, consumers {CONSUMER_REGS}) need 168 at entry and would hang; \
         FLASHJVP_ATTENTION_PATH=sm80 runs the sm_80 kernels instead"
    )))
}

/// Which kernel family runs an attention forward/JVP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// attention_jvp.cu (mma.sync, cp.async): every GPU of compute capability 8.0 or newer.
    Sm80,
    /// attention_jvp_sm90.cu (wgmma, TMA): Hopper, bf16/f16, d 64, 72, 96 or 128 with dv == d.
    Sm90a,
}

impl Path {
    /// The path's short name, as the benchmark reports it: `sm80` or `sm90a`.
    pub fn name(self) -> &'static str {
        match self {
            Path::Sm80 => "sm80",
            Path::Sm90a => "sm90a",
        }
    }
}

/// Keys per tile of a variant at head dim `d` (the kernel's `Cfg::BC`): with a tangent 48 at d 128, 96 at
/// d 64 and 80 at d 72, and 128 for the forward (64 for all with `FLASHJVP_SM90_KEYS=64`,
/// [`nvrtc::sm90_keys64`]; a bad value there fails the kernel's compile, so this takes the default for
/// it); else 64.
fn key_tile(variant: Variant, d: usize) -> usize {
    let long = !nvrtc::sm90_keys64().unwrap_or(false);
    match (d, variant != Variant::Fwd) {
        (128, true) => 48,
        (64, true) if long => 96,
        (72, true) if long => 80,
        (_, false) if long => 128,
        _ => 64,
    }
}

/// The shared-memory swizzle at head dim `d` in bytes (the kernel's `Cfg::SWZ`): the widest whose
/// slab of `swizzle / 2` columns divides d; 32 at d 72, whose last slab TMA half fills with zeros.
pub fn swizzle_bytes(d: usize) -> usize {
    if d % 64 == 0 {
        128
    } else if d % 32 == 0 {
        64
    } else {
        32
    }
}

/// Dynamic shared memory of a Hopper kernel (the kernel's `Cfg::SMEM`): 1024 bytes of alignment
/// slack, Q (and Qdot), the K and V rings, the mbarriers; head dim padded to whole slabs.
pub fn shared_bytes(variant: Variant, d: usize) -> usize {
    let tangent = variant != Variant::Fwd;
    let full = variant == Variant::Jvp;
    let swz = swizzle_bytes(d);
    let slabs = d.div_ceil(swz / 2);
    let bc = key_tile(variant, d);
    // 3 stages for the full JVP when one holds 24 KiB or more, and for the forward when one holds
    // more than 24 KiB (the kernel's `Cfg::STAGES`).
    let dp_bc = slabs * swz / 2 * bc;
    let three = if full {
        dp_bc >= 96 * 64
    } else {
        variant == Variant::Fwd && dp_bc > 96 * 128
    };
    let stages = if three { 3 } else { 4 };
    let q_bytes = if tangent { 2 } else { 1 } * slabs * BLOCK_ROWS * swz;
    let stage_bytes = if full { 2 } else { 1 } * slabs * bc * swz;
    1024 + q_bytes + 2 * stages * stage_bytes + 8 * (1 + 4 * stages)
}

/// A 4-D tiled TMA tensor map over a 16-bit operand viewed as [B, H, N, d] with element strides
/// (b, h, n) (its head dim contiguous): dims {d, N, H, B} (innermost first), byte strides
/// {n, h, b}·2, box {swizzle/2, rows, 1, 1}, swizzle of [`swizzle_bytes`]`(d)`, zero fill out of
/// bounds (rows past n, columns past d), no interleave, L2 promotion 128 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMapDesc {
    /// Device address of element (0, 0, 0, 0); 16-byte aligned, non-null.
    pub ptr: u64,
    /// Element type: bf16 or f16 (any other fails [`TensorMapDesc::check`]).
    pub dtype: DType,
    /// Extents {d, N, H, B} in elements, innermost first.
    pub dims: [u64; 4],
    /// Byte strides of the N, H and B axes (the head dim is contiguous).
    pub strides: [u64; 3],
    /// Box extents in elements, innermost first: {swizzle / element size, rows, 1, 1}.
    pub boxdim: [u32; 4],
    /// Shared-memory swizzle in bytes: 32, 64 or 128, the inner box's width.
    pub swizzle: u32,
}

impl TensorMapDesc {
    /// The map of an operand of shape `[B, H, n, d]` and element strides `s` at `ptr`, read in boxes
    /// of one slab (`swizzle_bytes(d) / 2` columns) x `rows` rows of one head.
    pub fn attention(ptr: u64, dtype: DType, shape: [usize; 4], s: Strides, rows: usize) -> Self {
        let e = dtype.size_in_bytes() as u64;
        let [b, h, n, d] = shape.map(|x| x as u64);
        let swizzle = swizzle_bytes(shape[3]) as u32;
        TensorMapDesc {
            ptr,
            dtype,
            dims: [d, n, h, b],
            strides: [s.n as u64 * e, s.h as u64 * e, s.b as u64 * e],
            boxdim: [swizzle / e as u32, rows as u32, 1, 1],
            swizzle,
        }
    }

    /// What cuTensorMapEncodeTiled requires (an error naming the violated rule, never a launch):
    /// 16-byte aligned address, strides multiples of 16 below 2^40, dims in 1..=2^32, box dims in
    /// 1..=256 with the inner box as wide as the swizzle (32, 64 or 128 bytes).
    pub fn check(&self) -> Result<()> {
        let e = self.dtype.size_in_bytes() as u64;
        let bad = |why: String| Err(Error::Unsupported(format!("attention (sm_90a): {why}")));
        if !matches!(self.dtype, DType::BF16 | DType::F16) {
            return bad(format!(
                "tensor maps are built for bf16/f16, not {}",
                self.dtype
            ));
        }
        if self.ptr == 0 || self.ptr % 16 != 0 {
            return bad(format!("tensor at {:#x} is not 16-byte aligned", self.ptr));
        }
        if self.dims.iter().any(|&x| x == 0 || x > 1 << 32) {
            return bad(format!("tensor-map dims {:?} out of range", self.dims));
        }
        if self.strides.iter().any(|&s| s % 16 != 0 || s >= 1 << 40) {
            return bad(format!("tensor-map strides {:?} bytes", self.strides));
        }
        if !matches!(self.swizzle, 32 | 64 | 128) {
            return bad(format!("tensor-map swizzle of {} bytes", self.swizzle));
        }
        if self.boxdim.iter().any(|&b| b == 0 || b > 256)
            || self.boxdim[0] as u64 * e != self.swizzle as u64
        {
            return bad(format!(
                "tensor-map box {:?} (the inner box must span the {}-byte swizzle)",
                self.boxdim, self.swizzle
            ));
        }
        Ok(())
    }
}

/// The driver's `CUtensorMap` as a kernel argument: 128 opaque bytes, 128-byte aligned.
#[repr(C, align(128))]
#[derive(Clone, Copy, Debug)]
pub struct TensorMap(pub [u64; 16]);

// SAFETY: a plain 128-byte value; the kernel declares the parameter as a 128-byte aligned struct
// of 16 u64 (`FjTensorMap`), which the launch copies by value.
unsafe impl cudarc::driver::DeviceRepr for TensorMap {}

/// Encodes a described map with cuTensorMapEncodeTiled (needs the driver library, no device work).
pub fn encode_tensor_map(d: &TensorMapDesc) -> Result<TensorMap> {
    use cudarc::driver::sys;
    d.check()?;
    let dtype = match d.dtype {
        DType::BF16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        _ => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    };
    let swizzle = match d.swizzle {
        32 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
        64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        _ => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
    };
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let element_strides = [1u32; 4];
    // SAFETY: every pointer refers to a live local array of the length the rank (4) implies; the
    // global address is only recorded, not dereferenced.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            4,
            d.ptr as *mut std::ffi::c_void,
            d.dims.as_ptr(),
            d.strides.as_ptr(),
            d.boxdim.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            swizzle,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(|e| {
        Error::Cuda(format!(
            "cuTensorMapEncodeTiled refused {d:?}: {e:?} (the Hopper attention kernels read q, k \
             and v through TMA; FLASHJVP_ATTENTION_PATH=sm80 runs the sm_80 kernels, which take \
             every layout Layout::check accepts, zero strides included)"
        ))
    })?;
    Ok(TensorMap(map.opaque))
}

/// Errors unless every named device pointer is non-null and 16-byte aligned (TMA reads 16-byte
/// aligned tensors; the outputs are written in 16-byte-aligned pairs and rows). `what` names the op.
fn check_tma_ptrs(what: &str, ptrs: &[(&str, u64)]) -> Result<()> {
    match ptrs.iter().find(|(_, p)| *p == 0 || p % 16 != 0) {
        Some((name, ptr)) => Err(Error::Unsupported(format!(
            "{what}: `{name}` at {ptr:#x} is null or not 16-byte aligned (TMA reads 16-byte \
             aligned tensors)"
        ))),
        None => Ok(()),
    }
}

/// Errors unless each f32 row vector (lse, its tangent, delta: read and written one float at a time,
/// never through TMA) is non-null and 4-byte aligned. The per-batch plans of padded keys start
/// them at entry b's rows, which a 16-byte rule would refuse whenever H·Nq is not a multiple of 4.
fn check_f32_ptrs(what: &str, ptrs: &[(&str, u64)]) -> Result<()> {
    match ptrs.iter().find(|(_, p)| *p == 0 || p % 4 != 0) {
        Some((name, ptr)) => Err(Error::Unsupported(format!(
            "{what}: `{name}` at {ptr:#x} is null or not 4-byte aligned (an f32 row vector)"
        ))),
        None => Ok(()),
    }
}

/// Whether the Hopper kernels take this problem on a device of NVRTC arch `arch` (ignoring the
/// `FLASHJVP_ATTENTION_PATH` override; see [`path_for`]).
pub fn supported(arch: &str, dtype: DType, dims: AttnDims) -> bool {
    // The Hopper kernels assume v has the head dim of q and k.
    arch == "sm_90a"
        && matches!(dtype, DType::BF16 | DType::F16)
        && HEAD_DIMS.contains(&dims.d)
        && dims.dv == dims.d
}

/// The path an attention forward/JVP takes on a device of arch `arch`: sm_90a when
/// [`supported`] and not overridden by `FLASHJVP_ATTENTION_PATH=sm80`, else sm_80.
pub fn path_for(arch: &str, dtype: DType, dims: AttnDims) -> Path {
    let forced_sm80 = std::env::var("FLASHJVP_ATTENTION_PATH").is_ok_and(|v| v == "sm80");
    if !forced_sm80 && supported(arch, dtype, dims) {
        Path::Sm90a
    } else {
        Path::Sm80
    }
}

/// The plan of a forward/JVP over q, k, v, o in `layout` on a device of arch `arch`: the Hopper
/// kernel where [`path_for`] says so, else attention_jvp.cu's ([`super::attention::plan_jvp_on`]).
pub fn plan_for(
    arch: &str,
    variant: Variant,
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    scale: f32,
) -> Result<Vec<Step>> {
    match path_for(arch, dtype, dims) {
        Path::Sm90a => plan(variant, dtype, dims, layout, p, scale),
        Path::Sm80 => super::attention::plan_jvp_on(arch, variant, dtype, dims, layout, p, scale),
    }
}

/// Errors unless the Hopper kernels take this problem (bf16/f16, a head dim of [`HEAD_DIMS`],
/// dv == d) with valid dims and scale; `what` names the op.
fn check_problem(what: &str, dtype: DType, dims: AttnDims, scale: f32) -> Result<()> {
    dims.check()?;
    super::attention::check_scale(scale)?;
    if !matches!(dtype, DType::BF16 | DType::F16)
        || !HEAD_DIMS.contains(&dims.d)
        || dims.dv != dims.d
    {
        return Err(Error::Unsupported(format!(
            "{what}: {dtype} at head dims d {} / dv {} (the Hopper kernels take bf16/f16 with \
             dv == d in {HEAD_DIMS:?})",
            dims.d, dims.dv
        )));
    }
    Ok(())
}

/// The launch of one attention_jvp_sm90.cu kernel over q, k, v, o in `layout` (errors for a dtype
/// or head dim it lacks).
pub fn plan(
    variant: Variant,
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    scale: f32,
) -> Result<Vec<Step>> {
    plan_kernel(variant, dtype, dims, layout, p, scale, None)
}

/// The plan of a bf16 JVP with f16 value products
/// ([`super::attention::ValueProducts::F16`]) on the Hopper path
/// over q, k, v, o in `layout`: the f16 copies of V and V̇ into `workspace`
/// (the `attention_values_*` kernels of attention_jvp.cu), then the `attention_jvp{,_nokv}_sm90_bf16_vf16`
/// kernel reading them.
pub fn plan_f16_values(
    variant: Variant,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    scale: f32,
    workspace: u64,
) -> Result<Vec<Step>> {
    check_problem("attention (sm_90a, f16 values)", DType::BF16, dims, scale)?;
    super::attention::plan_with_value_copies(
        variant,
        dims,
        layout,
        p,
        workspace,
        |l, copies, amax| plan_kernel(variant, DType::BF16, dims, l, copies, scale, Some(amax)),
    )
}

/// [`plan_f16_values`] where [`path_for`] gives the Hopper path on `arch`, else the sm_80
/// kernels' form ([`super::attention::plan_jvp_f16_values`]).
pub fn plan_f16_values_for(
    arch: &str,
    variant: Variant,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    scale: f32,
    workspace: u64,
) -> Result<Vec<Step>> {
    match path_for(arch, DType::BF16, dims) {
        Path::Sm90a => plan_f16_values(variant, dims, layout, p, scale, workspace),
        Path::Sm80 => {
            super::attention::plan_jvp_f16_values(arch, variant, dims, layout, p, scale, workspace)
        }
    }
}

/// [`plan`], or with `vamax` (the f16 copies' max bits) the f16-values kernel, whose V and V̇
/// (`p.v`, `p.tv`) are the contiguous f16 copies.
fn plan_kernel(
    variant: Variant,
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: JvpPtrs,
    scale: f32,
    vamax: Option<u64>,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    check_problem("attention (sm_90a)", dtype, dims, scale)?;
    let mut named = vec![("q", p.q), ("k", p.k), ("v", p.v), ("o", p.o)];
    let mut rows = vec![("lse", p.lse)];
    if variant != Variant::Fwd {
        named.extend([("tq", p.tq), ("to", p.to)]);
        rows.push(("tlse", p.tlse));
    }
    if variant == Variant::Jvp {
        named.extend([("tk", p.tk), ("tv", p.tv)]);
    }
    check_tma_ptrs("attention on the GPU (sm_90a)", &named)?;
    check_f32_ptrs("attention on the GPU (sm_90a)", &rows)?;
    layout.check(dtype, dims)?;
    let bh = dims.b * dims.h;
    let bc = key_tile(variant, dims.d);
    let qmap = |ptr| {
        Arg::TensorMap(TensorMapDesc::attention(
            ptr,
            dtype,
            dims.q_shape(),
            layout.q,
            BLOCK_ROWS,
        ))
    };
    let kmap = |ptr| {
        Arg::TensorMap(TensorMapDesc::attention(
            ptr,
            dtype,
            dims.k_shape(),
            layout.k,
            bc,
        ))
    };
    let vmap = |ptr| {
        Arg::TensorMap(TensorMapDesc::attention(
            ptr,
            if vamax.is_some() { DType::F16 } else { dtype },
            dims.v_shape(),
            layout.v,
            bc,
        ))
    };
    for a in [qmap(p.q), kmap(p.k), vmap(p.v)] {
        if let Arg::TensorMap(d) = a {
            d.check()?;
        }
    }
    let (nq, nk) = (int_arg(OP, "Nq", dims.nq)?, int_arg(OP, "Nk", dims.nk)?);
    let (prefix, mut args) = match variant {
        Variant::Jvp => (
            "attention_jvp_sm90",
            vec![
                qmap(p.q),
                kmap(p.k),
                vmap(p.v),
                qmap(p.tq),
                kmap(p.tk),
                vmap(p.tv),
            ],
        ),
        Variant::JvpNoKv => (
            "attention_jvp_nokv_sm90",
            vec![qmap(p.q), kmap(p.k), vmap(p.v), qmap(p.tq)],
        ),
        Variant::Fwd => ("attention_fwd_sm90", vec![qmap(p.q), kmap(p.k), vmap(p.v)]),
    };
    if variant == Variant::Fwd {
        args.extend([Arg::Ptr(p.o), Arg::Ptr(p.lse)]);
    } else {
        args.extend([
            Arg::Ptr(p.o),
            Arg::Ptr(p.to),
            Arg::Ptr(p.lse),
            Arg::Ptr(p.tlse),
        ]);
    }
    args.extend([nq, nk, Arg::F32(scale), int_arg(OP, "H", dims.h)?]);
    args.extend(layout.o.args());
    let values = match vamax {
        Some(amax) => {
            args.push(Arg::Ptr(amax));
            "_vf16"
        }
        None => "",
    };
    let grid = (dims.nq.div_ceil(BLOCK_ROWS) as u64, bh as u64, 1);
    Ok(vec![Step::Kernel(Launch::new(
        OP,
        FILE,
        format!("{prefix}_{dt}{values}_d{}", dims.d),
        grid,
        (THREADS, 1, 1),
        shared_bytes(variant, dims.d),
        args,
    )?)])
}

/// The kernel file of the Hopper backward (compiled for sm_90a only, like [`FILE`]).
pub const BWD_FILE: &str = "attention_bwd_sm90.cu";

/// Whether `kernel` of kernel file `file` moves registers with setmaxnreg (the attention kernels of
/// both Hopper files), so that its register count at entry must pass [`check_register_pool`].
pub fn uses_register_pool(file: &str, kernel: &str) -> bool {
    (file == FILE || file == BWD_FILE) && kernel.starts_with("attention_")
}

/// Stages of the backward kernels' ring (the kernel's `BwdCfg::STAGES`).
const BWD_STAGES: usize = 4;

/// Streamed rows per tile of the Hopper backward at head dim `d`, `[dK/dV, dQ]` (the kernel's
/// `BwdCfg::BT`): dK/dV streams query tiles of 48 rows at d 128 (its registers), else 64; dQ key
/// tiles of 64.
pub fn bwd_stream_rows(d: usize) -> [usize; 2] {
    [if d == 128 { 48 } else { 64 }, 64]
}

/// Dynamic shared memory of the Hopper backward's `[dK/dV, dQ]` kernels at head dim `d` (the
/// kernel's `BwdCfg::SMEM`): alignment slack, the resident pair of 128 rows, the ring of streamed
/// pairs, dK/dV's per-stage lse and delta vectors, the mbarriers.
pub fn bwd_shared_bytes(d: usize) -> [usize; 2] {
    let swz = swizzle_bytes(d);
    let slabs = d.div_ceil(swz / 2);
    let resident = 2 * slabs * BLOCK_ROWS * swz;
    let bytes = |rows: usize, vectors: bool| {
        let vec_bytes = if vectors {
            BWD_STAGES * 2 * rows * 4
        } else {
            0
        };
        1024 + resident + BWD_STAGES * 2 * slabs * rows * swz + vec_bytes + 8 * (1 + 2 * BWD_STAGES)
    };
    let [kv, q] = bwd_stream_rows(d);
    [bytes(kv, true), bytes(q, false)]
}

/// The path an attention backward takes on a device of arch `arch`. The Hopper backward
/// (attention_bwd_sm90.cu) has run only on the CPU emulator, so it is opt-in:
/// `FLASHJVP_ATTENTION_BWD_PATH=sm90a` takes it where [`supported`] (and
/// `FLASHJVP_ATTENTION_PATH=sm80` does not force the sm_80 kernels); every other case runs
/// attention_bwd.cu's kernels.
pub fn bwd_path_for(arch: &str, dtype: DType, dims: AttnDims) -> Path {
    let env_is = |name: &str, value: &str| std::env::var(name).is_ok_and(|v| v == value);
    let forced_sm80 = env_is("FLASHJVP_ATTENTION_PATH", "sm80");
    let opted_in = env_is("FLASHJVP_ATTENTION_BWD_PATH", "sm90a");
    if opted_in && !forced_sm80 && supported(arch, dtype, dims) {
        Path::Sm90a
    } else {
        Path::Sm80
    }
}

/// The backward's plan on a device of arch `arch`: the Hopper kernels where [`bwd_path_for`] says
/// so, else attention_bwd.cu's ([`super::attention::plan_backward`]).
pub fn plan_backward_for(
    arch: &str,
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: BwdPtrs,
    scale: f32,
) -> Result<Vec<Step>> {
    match bwd_path_for(arch, dtype, dims) {
        Path::Sm90a => plan_backward(dtype, dims, layout, p, scale),
        Path::Sm80 => super::attention::plan_backward(dtype, dims, layout, p, scale),
    }
}

/// The Hopper backward: attention_bwd.cu's preprocess (delta = rowsum(dO ⊙ O)), then
/// attention_bwd_sm90.cu's dK/dV and dQ kernels. Gradients in their primal's layout (dq: q's, dk:
/// k's, dv: v's, dout: o's); lse and delta contiguous f32 [B, H, Nq]. Errors for a dtype or head dim
/// the Hopper kernels lack.
pub fn plan_backward(
    dtype: DType,
    dims: AttnDims,
    layout: Layout,
    p: BwdPtrs,
    scale: f32,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    check_problem("attention backward (sm_90a)", dtype, dims, scale)?;
    check_tma_ptrs("attention backward on the GPU (sm_90a)", &p.named())?;
    check_f32_ptrs(
        "attention backward on the GPU (sm_90a)",
        &[("lse", p.lse), ("delta", p.delta)],
    )?;
    layout.check(dtype, dims)?;
    layout.check_gradients(dims)?;
    let [rows_kv, rows_q] = bwd_stream_rows(dims.d);
    let map = |ptr, shape, strides, rows| {
        let m = TensorMapDesc::attention(ptr, dtype, shape, strides, rows);
        m.check().map(|_| Arg::TensorMap(m))
    };
    let (qs, ks, vs, os) = (
        dims.q_shape(),
        dims.k_shape(),
        dims.v_shape(),
        dims.o_shape(),
    );
    let (nq, nk) = (int_arg(OP, "Nq", dims.nq)?, int_arg(OP, "Nk", dims.nk)?);
    let h = int_arg(OP, "H", dims.h)?;
    let bh = (dims.b * dims.h) as u64;
    let [smem_kv, smem_q] = bwd_shared_bytes(dims.d);
    // dK/dV: k and v resident (128 rows), q and dout streamed.
    let mut kv_args = vec![
        map(p.q, qs, layout.q, rows_kv)?,
        map(p.k, ks, layout.k, BLOCK_ROWS)?,
        map(p.v, vs, layout.v, BLOCK_ROWS)?,
        map(p.dout, os, layout.o, rows_kv)?,
        Arg::Ptr(p.lse),
        Arg::Ptr(p.delta),
        Arg::Ptr(p.dk),
        Arg::Ptr(p.dv),
        nq,
        nk,
        Arg::F32(scale),
        h,
    ];
    kv_args.extend(layout.k.args());
    kv_args.extend(layout.v.args());
    // dQ: q and dout resident, k and v streamed.
    let mut q_args = vec![
        map(p.q, qs, layout.q, BLOCK_ROWS)?,
        map(p.k, ks, layout.k, rows_q)?,
        map(p.v, vs, layout.v, rows_q)?,
        map(p.dout, os, layout.o, BLOCK_ROWS)?,
        Arg::Ptr(p.lse),
        Arg::Ptr(p.delta),
        Arg::Ptr(p.dq),
        nq,
        nk,
        Arg::F32(scale),
        h,
    ];
    q_args.extend(layout.q.args());
    let pre = super::attention::plan_bwd_preprocess(dtype, dims, layout.o, p.o, p.dout, p.delta)?;
    let dkdv = Launch::new(
        OP,
        BWD_FILE,
        format!("attention_bwd_dkdv_sm90_{dt}_d{}", dims.d),
        (dims.nk.div_ceil(BLOCK_ROWS) as u64, bh, 1),
        (THREADS, 1, 1),
        smem_kv,
        kv_args,
    )?;
    let dq = Launch::new(
        OP,
        BWD_FILE,
        format!("attention_bwd_dq_sm90_{dt}_d{}", dims.d),
        (dims.nq.div_ceil(BLOCK_ROWS) as u64, bh, 1),
        (THREADS, 1, 1),
        smem_q,
        q_args,
    )?;
    Ok(vec![
        Step::Kernel(pre),
        Step::Kernel(dkdv),
        Step::Kernel(dq),
    ])
}

/// The (head dim, key tile) pairs of the layout probe (`sm90_layout_probe_bf16_d{d}_bc{bc}`): every
/// swizzle (128 bytes at d 64 and 128, 32 with zero fill at d 72, 64 at d 96) and every key tile a
/// kernel uses (64, 96 and 128 at d 64, 64, 80 and 128 at d 72, 64 and 128 at d 96, 48, 64 and 128
/// at d 128).
pub const PROBES: [(usize, usize); 11] = [
    (64, 64),
    (64, 96),
    (64, 128),
    (72, 64),
    (72, 80),
    (72, 128),
    (96, 64),
    (96, 128),
    (128, 48),
    (128, 64),
    (128, 128),
];

/// Query rows of the layout probe's Q tile (the kernels' [`BLOCK_ROWS`]; one warpgroup does both
/// halves).
pub const PROBE_ROWS: usize = BLOCK_ROWS;

/// The head dim the Hopper kernels' products see: `d` padded to whole slabs (80 at d 72).
pub fn padded_head_dim(d: usize) -> usize {
    let cols = swizzle_bytes(d) / 2;
    d.div_ceil(cols) * cols
}

/// Device addresses of one layout probe: inputs contiguous bf16 q [128, d], k and v [bc, d];
/// outputs `q_smem` (u16, [`padded_head_dim`]`(d)·128`: Q's shared-memory bytes as TMA stored them,
/// slab after slab), `s` (f32 [128, bc]: Q Kᵀ) and `o` (f32 [128, padded d]: bf16(S) V).
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbePtrs {
    /// Input q, bf16 [128, d] contiguous.
    pub q: u64,
    /// Input k, bf16 [bc, d] contiguous.
    pub k: u64,
    /// Input v, bf16 [bc, d] contiguous.
    pub v: u64,
    /// Output: Q's shared-memory image, u16 [`padded_head_dim`]`(d)·128`.
    pub q_smem: u64,
    /// Output S = Q Kᵀ, f32 [128, bc].
    pub s: u64,
    /// Output O = bf16(S) V, f32 [128, [`padded_head_dim`]`(d)`].
    pub o: u64,
}

/// The launch of the layout probe (cuda/attention_jvp_sm90.cu, LAYOUT PROBE): the Hopper kernels'
/// TMA copies, descriptors and fragment layouts run once on one tile, each stage written out, so
/// that the first GPU run can tell which reading of the hardware is wrong if the attention kernels
/// disagree with the reference (tests/gpu_attention_sm90.rs).
pub fn plan_layout_probe(d: usize, bc: usize, p: ProbePtrs) -> Result<Vec<Step>> {
    if !PROBES.contains(&(d, bc)) {
        return Err(Error::Unsupported(format!(
            "layout probe at head dim {d}, key tile {bc}: built for {PROBES:?}"
        )));
    }
    check_tma_ptrs(
        "layout probe",
        &[
            ("q", p.q),
            ("k", p.k),
            ("v", p.v),
            ("q_smem", p.q_smem),
            ("s", p.s),
            ("o", p.o),
        ],
    )?;
    let map = |ptr, rows| {
        let m = TensorMapDesc::attention(
            ptr,
            DType::BF16,
            [1, 1, rows, d],
            Strides::contiguous(1, rows, d),
            rows,
        );
        m.check().map(|_| Arg::TensorMap(m))
    };
    let args = vec![
        map(p.q, PROBE_ROWS)?,
        map(p.k, bc)?,
        map(p.v, bc)?,
        Arg::Ptr(p.q_smem),
        Arg::Ptr(p.s),
        Arg::Ptr(p.o),
    ];
    // Q, K and V tiles of padded_head_dim(d) columns, 2 bytes each, and one mbarrier.
    let shared = 1024 + padded_head_dim(d) * 2 * (PROBE_ROWS + 2 * bc) + 8;
    Ok(vec![Step::Kernel(Launch::new(
        OP,
        FILE,
        format!("sm90_layout_probe_bf16_d{d}_bc{bc}"),
        (1, 1, 1),
        (128, 1, 1),
        shared,
        args,
    )?)])
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_register_pool_needs_168_at_entry() {
        assert!(super::check_register_pool("k", 168).is_ok());
        assert!(super::check_register_pool("k", 161).is_ok()); // allocated as 168
        for r in [0, 128, 159, 160, 169, 176, 255] {
            let e = super::check_register_pool("attention_x", r).unwrap_err();
            assert!(e.to_string().contains("attention_x"), "{e}");
        }
    }

    use super::*;
    use crate::cuda::attention::{check_shapes, f16_values_workspace_bytes, ValueProducts};

    fn ptrs() -> JvpPtrs {
        JvpPtrs {
            q: 0x10000,
            k: 0x20000,
            v: 0x30000,
            tq: 0x40000,
            tk: 0x50000,
            tv: 0x60000,
            o: 0x70000,
            to: 0x80000,
            lse: 0x90000,
            tlse: 0xa0000,
        }
    }

    #[test]
    fn shared_memory_matches_the_readme_table() {
        // (variant, d64, d72, d96, d128): cuda/README.md, attention_jvp_sm90.cu.
        for (v, want) in [
            (Variant::Jvp, [181352, 195688, 197736, 214120]),
            (Variant::JvpNoKv, [132232, 144520, 148616, 165000]),
            (Variant::Fwd, [148616, 185480, 222344, 230504]),
        ] {
            for (i, d) in HEAD_DIMS.into_iter().enumerate() {
                let got = shared_bytes(v, d);
                assert_eq!(got, want[i], "{v:?} d{d}");
                assert!(
                    got <= 227 * 1024,
                    "{v:?} d{d}: {got} bytes exceed sm_90's 227 KiB"
                );
            }
        }
    }

    #[test]
    fn backward_plans_carry_the_kernel_tiles_and_shared_memory() {
        // (dK/dV, dQ) bytes at d64, d72, d96, d128: cuda/README.md, attention_bwd_sm90.cu.
        let want = [
            [101448, 99400],
            [126024, 123976],
            [150600, 148552],
            [166472, 197704],
        ];
        for (i, d) in HEAD_DIMS.into_iter().enumerate() {
            assert_eq!(bwd_shared_bytes(d), want[i], "d{d}");
            assert!(want[i].iter().all(|&b| b <= 227 * 1024));
        }
        let dims = check_shapes(&[2, 3, 300, 128], &[2, 3, 77, 128], &[2, 3, 77, 128]).unwrap();
        let bp = BwdPtrs {
            q: 0x10000,
            k: 0x20000,
            v: 0x30000,
            o: 0x40000,
            lse: 0x50000,
            dout: 0x60000,
            delta: 0x70000,
            dq: 0x80000,
            dk: 0x90000,
            dv: 0xa0000,
        };
        let lay = Layout::contiguous(dims);
        let steps = plan_backward(DType::BF16, dims, lay, bp, 0.125).unwrap();
        let launches: Vec<&Launch> = steps
            .iter()
            .map(|s| match s {
                Step::Kernel(l) => l,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(launches[0].kernel, "attention_bwd_preprocess_bf16");
        let (kv, q) = (launches[1], launches[2]);
        assert_eq!(kv.kernel, "attention_bwd_dkdv_sm90_bf16_d128");
        assert_eq!(q.kernel, "attention_bwd_dq_sm90_bf16_d128");
        assert_eq!((kv.file, q.file), (BWD_FILE, BWD_FILE));
        assert_eq!((kv.grid, q.grid), ((1, 6, 1), (3, 6, 1)));
        assert_eq!((kv.shared_bytes, q.shared_bytes), (166472, 197704));
        let rows = |l: &Launch| -> Vec<(u64, u32)> {
            l.args
                .iter()
                .filter_map(|a| match a {
                    Arg::TensorMap(m) => Some((m.ptr, m.boxdim[1])),
                    _ => None,
                })
                .collect()
        };
        // dK/dV: q and dout streamed in 48-row tiles, k and v resident (128); dQ the reverse (64).
        assert_eq!(
            rows(kv),
            [(0x10000, 48), (0x20000, 128), (0x30000, 128), (0x60000, 48)]
        );
        assert_eq!(
            rows(q),
            [(0x10000, 128), (0x20000, 64), (0x30000, 64), (0x60000, 128)]
        );
        // What the Hopper backward lacks is an error; the dispatcher sends it to attention_bwd.cu.
        let dv64 = check_shapes(&[1, 2, 30, 128], &[1, 2, 7, 128], &[1, 2, 7, 64]).unwrap();
        for (dt, dm) in [(DType::F32, dims), (DType::BF16, dv64)] {
            let l = Layout::contiguous(dm);
            assert!(plan_backward(dt, dm, l, bp, 0.125).is_err());
            let s = plan_backward_for("sm_90a", dt, dm, l, bp, 0.125).unwrap();
            assert!(matches!(&s[1], Step::Kernel(l) if !l.file.ends_with("_sm90.cu")));
        }
        // Opt-in only: without FLASHJVP_ATTENTION_BWD_PATH=sm90a even Hopper runs attention_bwd.cu.
        if std::env::var_os("FLASHJVP_ATTENTION_BWD_PATH").is_none() {
            assert_eq!(bwd_path_for("sm_90a", DType::BF16, dims), Path::Sm80);
        }
        assert_eq!(bwd_path_for("sm_80", DType::BF16, dims), Path::Sm80);
        let mut bad = bp;
        bad.dk = 0x90008;
        let e = plan_backward(DType::BF16, dims, lay, bad, 0.125).unwrap_err();
        assert!(e.to_string().contains("`dk`"), "{e}");
    }

    #[test]
    fn dispatch_takes_hopper_only_where_supported() {
        let d64 = check_shapes(&[1, 2, 300, 64], &[1, 2, 77, 64], &[1, 2, 77, 64]).unwrap();
        let d72 = check_shapes(&[1, 2, 300, 72], &[1, 2, 77, 72], &[1, 2, 77, 72]).unwrap();
        let d32 = check_shapes(&[1, 2, 300, 32], &[1, 2, 77, 32], &[1, 2, 77, 32]).unwrap();
        let dv96 = check_shapes(&[1, 2, 300, 64], &[1, 2, 77, 64], &[1, 2, 77, 96]).unwrap();
        assert!(supported("sm_90a", DType::BF16, d64));
        assert!(supported("sm_90a", DType::F16, d64));
        assert!(supported("sm_90a", DType::BF16, d72));
        assert!(!supported("sm_90a", DType::F32, d64));
        assert!(!supported("sm_90a", DType::BF16, d32));
        assert!(!supported("sm_90a", DType::BF16, dv96));
        assert!(!supported("sm_80", DType::BF16, d64));
        assert!(!supported("sm_89", DType::BF16, d64));
        let p = ptrs();
        let steps = plan_for(
            "sm_80",
            Variant::Jvp,
            DType::BF16,
            d64,
            Layout::contiguous(d64),
            p,
            0.125,
        )
        .unwrap();
        let Step::Kernel(l) = &steps[0] else { panic!() };
        assert_eq!(l.file, "attention_jvp.cu");
        let steps = plan_for(
            "sm_90a",
            Variant::Jvp,
            DType::F32,
            d64,
            Layout::contiguous(d64),
            p,
            0.125,
        )
        .unwrap();
        let Step::Kernel(l) = &steps[0] else { panic!() };
        assert_eq!(l.file, "attention_jvp.cu");
    }

    #[test]
    fn plans_carry_tensor_maps_with_the_kernel_tiles() {
        let dims = check_shapes(&[2, 3, 300, 128], &[2, 3, 77, 128], &[2, 3, 77, 128]).unwrap();
        let contiguous = Layout::contiguous(dims);
        let steps = plan(Variant::Jvp, DType::BF16, dims, contiguous, ptrs(), 0.1).unwrap();
        let Step::Kernel(l) = &steps[0] else { panic!() };
        assert_eq!(l.kernel, "attention_jvp_sm90_bf16_d128");
        assert_eq!(l.grid, (3, 6, 1));
        assert_eq!(l.block, (384, 1, 1));
        assert_eq!(l.args.len(), 17);
        let Arg::TensorMap(q) = l.args[0] else {
            panic!()
        };
        assert_eq!(q.dims, [128, 300, 3, 2]);
        assert_eq!(q.strides, [256, 256 * 300, 256 * 300 * 3]);
        assert_eq!(q.boxdim, [64, 128, 1, 1]);
        let Arg::TensorMap(k) = l.args[4] else {
            panic!()
        };
        assert_eq!(
            (k.ptr, k.dims, k.boxdim),
            (0x50000, [128, 77, 3, 2], [64, 48, 1, 1])
        );
        let Arg::TensorMap(v) = l.args[2] else {
            panic!()
        };
        assert_eq!(v.boxdim, [64, 48, 1, 1]);
        // H, then o's strides.
        assert_eq!(l.args[13], Arg::I32(3));
        assert_eq!(&l.args[14..], &contiguous.o.args()[..]);
        let fwd = plan(Variant::Fwd, DType::F16, dims, contiguous, ptrs(), 0.1).unwrap();
        let Step::Kernel(l) = &fwd[0] else { panic!() };
        let Arg::TensorMap(k) = l.args[1] else {
            panic!()
        };
        assert_eq!(k.boxdim, [64, 128, 1, 1]);
        assert_eq!(l.args.len(), 12);
        // Narrower swizzles where 64 columns do not divide d: 16-column boxes of 32 bytes at d 72
        // (the last box half past d, zero-filled), 32-column boxes of 64 bytes at d 96. And the key
        // tiles: 96 keys at d 64 and 80 at d 72 with a tangent (K, Kdot, V, Vdot), 128 for every
        // forward; Q 128 rows.
        for (variant, d, swizzle, keys) in [
            (Variant::Jvp, 72, 32, 80),
            (Variant::JvpNoKv, 72, 32, 80),
            (Variant::Fwd, 72, 32, 128),
            (Variant::Jvp, 96, 64, 64),
            (Variant::Jvp, 64, 128, 96),
            (Variant::JvpNoKv, 64, 128, 96),
            (Variant::Fwd, 64, 128, 128),
            (Variant::Fwd, 96, 64, 128),
            (Variant::Fwd, 128, 128, 128),
        ] {
            let dims = check_shapes(&[1, 2, 300, d], &[1, 2, 77, d], &[1, 2, 77, d]).unwrap();
            let steps = plan(
                variant,
                DType::BF16,
                dims,
                Layout::contiguous(dims),
                ptrs(),
                0.1,
            )
            .unwrap();
            let Step::Kernel(l) = &steps[0] else { panic!() };
            let prefix = match variant {
                Variant::Jvp => "attention_jvp_sm90",
                Variant::JvpNoKv => "attention_jvp_nokv_sm90",
                Variant::Fwd => "attention_fwd_sm90",
            };
            assert_eq!(l.kernel, format!("{prefix}_bf16_d{d}"));
            let tv = if variant == Variant::Jvp { 5 } else { 2 };
            for (i, rows) in [(0, 128), (1, keys), (2, keys), (tv, keys)] {
                let Arg::TensorMap(m) = l.args[i] else {
                    panic!()
                };
                let what = format!("{variant:?} d{d} map {i}");
                assert_eq!(m.swizzle, swizzle, "{what}");
                assert_eq!(m.boxdim, [swizzle / 2, rows, 1, 1], "{what}");
                assert_eq!(m.dims[0], d as u64);
                m.check().unwrap();
            }
        }
    }

    #[test]
    fn f16_value_plans_copy_v_and_read_the_copies() {
        // Packed q, k, v (strided v), full JVP: zero the max, the max, the copies, the kernel.
        let dims = check_shapes(&[2, 3, 77, 64], &[2, 3, 77, 64], &[2, 3, 77, 64]).unwrap();
        let packed = Layout::packed_qkv(dims);
        let ws = 0x100_0000;
        let steps = plan_f16_values(Variant::Jvp, dims, packed, ptrs(), 0.1, ws).unwrap();
        assert_eq!(steps.len(), 4);
        assert_eq!(steps[0], Step::zero(ws, 4));
        let copy = 2 * 3 * 77 * 64 * 2;
        assert_eq!(
            f16_values_workspace_bytes(Variant::Jvp, dims),
            256 + 2 * (copy as usize).next_multiple_of(256)
        );
        let kernel = |i: usize| match &steps[i] {
            Step::Kernel(l) => l.clone(),
            s => panic!("{s:?}"),
        };
        let (amax, conv, attn) = (kernel(1), kernel(2), kernel(3));
        assert_eq!(amax.kernel, "attention_values_amax_bf16");
        assert_eq!(conv.kernel, "attention_values_to_f16_bf16");
        assert_eq!(
            (amax.file, conv.file, attn.file),
            ("attention_jvp.cu", "attention_jvp.cu", FILE)
        );
        assert_eq!(attn.kernel, "attention_jvp_sm90_bf16_vf16_d64");
        // Both read v and tv with v's packed strides; the copies follow the header.
        let v16 = ws + 256;
        let tv16 = v16 + (copy as u64).next_multiple_of(256);
        assert_eq!(
            &conv.args[..5],
            &[
                Arg::Ptr(0x30000),
                Arg::Ptr(0x60000),
                Arg::Ptr(ws),
                Arg::Ptr(v16),
                Arg::Ptr(tv16)
            ]
        );
        assert_eq!(&conv.args[8..11], &packed.v.args()[..]);
        assert_eq!(conv.args[11], Arg::I64(2 * 3 * 77 * 64 / 8));
        assert_eq!(&amax.args[..3], &conv.args[..3]);
        // The kernel: V and V̇ maps over the contiguous f16 copies, the max's address last.
        for (i, ptr) in [(2, v16), (5, tv16)] {
            let Arg::TensorMap(m) = attn.args[i] else {
                panic!()
            };
            assert_eq!((m.ptr, m.dtype), (ptr, DType::F16));
            assert_eq!(m.strides, [128, 128 * 77, 128 * 77 * 3]);
        }
        let Arg::TensorMap(q) = attn.args[0] else {
            panic!()
        };
        assert_eq!((q.dtype, q.strides[0]), (DType::BF16, 2 * 3 * 3 * 64));
        assert_eq!(attn.args.last(), Some(&Arg::Ptr(ws)));
        assert_eq!(attn.args.len(), 18);
        // nokv: one copy, no tangent read.
        let nokv = plan_f16_values(Variant::JvpNoKv, dims, packed, ptrs(), 0.1, ws).unwrap();
        let Step::Kernel(c) = &nokv[2] else { panic!() };
        assert_eq!((&c.args[1], &c.args[4]), (&Arg::Ptr(0), &Arg::Ptr(0)));
        let Step::Kernel(k) = &nokv[3] else { panic!() };
        assert_eq!(k.kernel, "attention_jvp_nokv_sm90_bf16_vf16_d64");
        assert_eq!(
            f16_values_workspace_bytes(Variant::JvpNoKv, dims),
            256 + (copy as usize).next_multiple_of(256)
        );
        // Refusals: the forward, a misaligned or null workspace, a head dim without kernels.
        for (variant, ws) in [
            (Variant::Fwd, ws),
            (Variant::Jvp, ws + 16),
            (Variant::Jvp, 0),
        ] {
            assert!(plan_f16_values(variant, dims, packed, ptrs(), 0.1, ws).is_err());
        }
        let d32 = check_shapes(&[1, 1, 8, 32], &[1, 1, 8, 32], &[1, 1, 8, 32]).unwrap();
        let e = plan_f16_values(Variant::Jvp, d32, Layout::contiguous(d32), ptrs(), 0.1, ws)
            .unwrap_err();
        assert!(e.to_string().contains("f16 values"), "{e}");
        // Where the choice applies: bf16 JVPs with dv == d, on either path.
        let f16v = ValueProducts::F16;
        assert!(f16v.applies(Variant::Jvp, DType::BF16, dims));
        assert!(f16v.applies(Variant::JvpNoKv, DType::BF16, d32));
        assert!(!f16v.applies(Variant::Fwd, DType::BF16, dims));
        assert!(!f16v.applies(Variant::Jvp, DType::F16, dims));
        let dv = check_shapes(&[1, 1, 8, 64], &[1, 1, 8, 64], &[1, 1, 8, 128]).unwrap();
        assert!(!f16v.applies(Variant::Jvp, DType::BF16, dv));
        assert!(!ValueProducts::Storage.applies(Variant::Jvp, DType::BF16, dims));
        // The dispatcher: the Hopper kernel on sm_90a, the sm_80 one elsewhere (and at d 32).
        let kernel_of = |arch: &str, dims: AttnDims| {
            let l = Layout::contiguous(dims);
            let steps = plan_f16_values_for(arch, Variant::Jvp, dims, l, ptrs(), 0.1, ws).unwrap();
            match steps.last() {
                Some(Step::Kernel(l)) => l.kernel.clone(),
                s => panic!("{s:?}"),
            }
        };
        assert_eq!(
            kernel_of("sm_90a", dims),
            "attention_jvp_sm90_bf16_vf16_d64"
        );
        assert_eq!(kernel_of("sm_80", dims), "attention_jvp_bf16_vf16_d64");
        assert_eq!(kernel_of("sm_90a", d32), "attention_jvp_bf16_vf16_d32");
    }

    #[test]
    fn packed_layouts_become_strided_maps() {
        // qkv [B=2, N=300, 3, H=3, d=64]: every map's dims {d, N, H, B}, byte strides
        // {3Hd, d, N 3Hd} * 2; o token-major [B, N, H, d].
        let dims = check_shapes(&[2, 3, 300, 64], &[2, 3, 300, 64], &[2, 3, 300, 64]).unwrap();
        let packed = Layout::packed_qkv(dims);
        let steps = plan_for(
            "sm_90a",
            Variant::Jvp,
            DType::BF16,
            dims,
            packed,
            ptrs(),
            0.1,
        );
        let steps = steps.unwrap();
        let Step::Kernel(l) = &steps[0] else { panic!() };
        assert_eq!(l.file, FILE);
        for i in 0..6 {
            let Arg::TensorMap(m) = l.args[i] else {
                panic!()
            };
            assert_eq!(m.dims, [64, 300, 3, 2]);
            assert_eq!(m.strides, [9 * 64 * 2, 64 * 2, 300 * 9 * 64 * 2]);
            m.check().unwrap();
        }
        assert_eq!(
            &l.args[14..],
            &[Arg::I64(300 * 3 * 64), Arg::I64(64), Arg::I64(3 * 64)]
        );
        // A 16-bit row stride that TMA cannot take is refused before any map is built.
        let mut bad = packed;
        bad.v.n += 4;
        let e = plan(Variant::Fwd, DType::BF16, dims, bad, ptrs(), 0.1).unwrap_err();
        assert!(e.to_string().contains("`v`"), "{e}");
    }

    #[test]
    fn layout_probe_plans() {
        let p = ProbePtrs {
            q: 0x1000,
            k: 0x2000,
            v: 0x3000,
            q_smem: 0x4000,
            s: 0x5000,
            o: 0x6000,
        };
        for (d, bc) in PROBES {
            let steps = plan_layout_probe(d, bc, p).unwrap();
            let Step::Kernel(l) = &steps[0] else {
                panic!("not a kernel launch")
            };
            assert_eq!(l.kernel, format!("sm90_layout_probe_bf16_d{d}_bc{bc}"));
            assert_eq!(l.block, (128, 1, 1));
            let Arg::TensorMap(k) = l.args[1] else {
                panic!("k is not a tensor map")
            };
            assert_eq!(k.dims, [d as u64, bc as u64, 1, 1]);
            assert_eq!(k.boxdim[1] as usize, bc);
            assert_eq!(k.swizzle as usize, swizzle_bytes(d));
        }
        assert_eq!(padded_head_dim(72), 80);
        assert_eq!(padded_head_dim(96), 96);
        assert!(plan_layout_probe(72, 48, p).is_err());
        let e = plan_layout_probe(64, 64, ProbePtrs { s: 0x5004, ..p }).unwrap_err();
        assert!(e.to_string().contains("`s`"), "{e}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let d64 = check_shapes(&[1, 1, 8, 64], &[1, 1, 8, 64], &[1, 1, 8, 64]).unwrap();
        let d32 = check_shapes(&[1, 1, 8, 32], &[1, 1, 8, 32], &[1, 1, 8, 32]).unwrap();
        let mut p = ptrs();
        let (c64, c32) = (Layout::contiguous(d64), Layout::contiguous(d32));
        assert!(plan(Variant::Jvp, DType::BF16, d32, c32, p, 0.1).is_err());
        assert!(plan(Variant::Jvp, DType::F32, d64, c64, p, 0.1).is_err());
        p.tk = 0x50008;
        let e = plan(Variant::Jvp, DType::BF16, d64, c64, p, 0.1).unwrap_err();
        assert!(e.to_string().contains("`tk`"), "{e}");
        // The nokv kernel does not read tk.
        assert!(plan(Variant::JvpNoKv, DType::BF16, d64, c64, p, 0.1).is_ok());
        let s = Strides::contiguous(1, 10, 64);
        let mut d = TensorMapDesc::attention(0x1000, DType::BF16, [2, 1, 10, 64], s, 128);
        assert!(d.check().is_ok());
        d.boxdim[0] = 128; // 256 bytes: wider than the 128-byte swizzle
        assert!(d.check().is_err());
        d.boxdim[0] = 32; // 64 bytes: narrower than the swizzle
        assert!(d.check().is_err());
        d.swizzle = 64;
        assert!(d.check().is_ok());
        d.swizzle = 16;
        assert!(d.check().is_err());
        let mut d = TensorMapDesc::attention(0x1000, DType::BF16, [2, 1, 10, 64], s, 300);
        assert!(d.check().is_err());
        d.boxdim[1] = 64;
        d.ptr = 0x1008;
        assert!(d.check().is_err());
    }
}
