//! Host side of the Hopper attention JVP (cuda/attention_jvp_sm90.cu): TMA tensor-map descriptions
//! and their encoding (cuTensorMapEncodeTiled through cudarc's driver bindings), the launch plan,
//! and the dispatch predicate that picks it over the sm_80 kernels of attention_jvp.cu.
//!
//! The sm_90a path runs when the device is compute capability 9.0 (NVRTC arch `sm_90a`), the storage
//! dtype is bf16 or f16 and the head dim is 64 or 128 (dv == d is required everywhere already); every
//! other case (f32, d 32/72/96, any other GPU) takes the sm_80 kernels. `FLASHJVP_ATTENTION_PATH=sm80`
//! forces the sm_80 kernels on Hopper too (for comparisons and as an escape hatch).
//!
//! Plans stay pure data: a tensor-map argument is a [`TensorMapDesc`] (pointer, dims, strides, box),
//! encoded into the driver's 128-byte `CUtensorMap` only when the plan is executed, so that the tests
//! check plans against the kernels' PTX signatures without a GPU or a driver.
//!
//! Status: compiled and plan-checked without a GPU; never run on one.

use super::attention::{AttnDims, JvpPtrs, Variant};
use super::launch::{dtype_suffix, int_arg, Arg, Launch, Step};
use crate::error::{Error, Result};
use crate::tensor::DType;

const OP: &str = "attention";

/// The kernel file of the Hopper path (compiled for sm_90a only, see `nvrtc::file_supports_arch`).
pub const FILE: &str = "attention_jvp_sm90.cu";

/// The head dims the Hopper kernels are instantiated for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// Query rows per block (two consumer warpgroups of 64 rows).
pub const BLOCK_ROWS: usize = 128;

/// Threads per block: a producer warpgroup and two consumer warpgroups.
pub const THREADS: u32 = 384;

/// Which kernel family runs an attention forward/JVP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// attention_jvp.cu (mma.sync, cp.async): every GPU of compute capability 8.0 or newer.
    Sm80,
    /// attention_jvp_sm90.cu (wgmma, TMA): Hopper, bf16/f16, d 64 or 128.
    Sm90a,
}

impl Path {
    pub fn name(self) -> &'static str {
        match self {
            Path::Sm80 => "sm80",
            Path::Sm90a => "sm90a",
        }
    }
}

/// Keys per tile of a variant at head dim `d` (the kernel's `Cfg::BC`).
fn key_tile(variant: Variant, d: usize) -> usize {
    if d == 128 && variant != Variant::Fwd {
        48
    } else {
        64
    }
}

/// Dynamic shared memory of a Hopper kernel (the kernel's `Cfg::SMEM`): 1024 bytes of alignment
/// slack, Q (and Qdot), the K and V rings, the mbarriers.
pub fn shared_bytes(variant: Variant, d: usize) -> usize {
    let tangent = variant != Variant::Fwd;
    let full = variant == Variant::Jvp;
    let slabs = d / 64;
    let bc = key_tile(variant, d);
    let stages = if full && d == 128 { 3 } else { 4 };
    let q_bytes = if tangent { 2 } else { 1 } * slabs * BLOCK_ROWS * 128;
    let stage_bytes = if full { 2 } else { 1 } * slabs * bc * 128;
    1024 + q_bytes + 2 * stages * stage_bytes + 8 * (1 + 4 * stages)
}

/// A 3-D tiled TMA tensor map over a contiguous [B, H, N, d] 16-bit tensor: dims {d, N, B*H}
/// (innermost first), byte strides {2d, 2dN}, box {64, rows, 1}, 128-byte swizzle, zero fill of
/// out-of-bounds rows, no interleave, L2 promotion 128 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMapDesc {
    pub ptr: u64,
    pub dtype: DType,
    pub dims: [u64; 3],
    pub strides: [u64; 2],
    pub boxdim: [u32; 3],
}

impl TensorMapDesc {
    /// The map of a [B, H, n, d] tensor at `ptr`, read in boxes of 64 columns x `rows` rows.
    pub fn attention(ptr: u64, dtype: DType, bh: usize, n: usize, d: usize, rows: usize) -> Self {
        let e = dtype.size_in_bytes() as u64;
        TensorMapDesc {
            ptr,
            dtype,
            dims: [d as u64, n as u64, bh as u64],
            strides: [d as u64 * e, d as u64 * n as u64 * e],
            boxdim: [64, rows as u32, 1],
        }
    }

    /// What cuTensorMapEncodeTiled requires (an error naming the violated rule, never a launch):
    /// 16-byte aligned address, strides multiples of 16 below 2^40, dims in 1..=2^32, box dims in
    /// 1..=256 with the inner box 128 bytes wide at most (the swizzle span) and a multiple of 16 bytes.
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
        if self.boxdim.iter().any(|&b| b == 0 || b > 256)
            || self.boxdim[0] as u64 * e > 128
            || (self.boxdim[0] as u64 * e) % 16 != 0
        {
            return bad(format!("tensor-map box {:?}", self.boxdim));
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
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    let element_strides = [1u32; 3];
    // SAFETY: every pointer refers to a live local array of the length the rank (3) implies; the
    // global address is only recorded, not dereferenced.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            3,
            d.ptr as *mut std::ffi::c_void,
            d.dims.as_ptr(),
            d.strides.as_ptr(),
            d.boxdim.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .map_err(|e| Error::Cuda(format!("cuTensorMapEncodeTiled for {d:?}: {e:?}")))?;
    Ok(TensorMap(map.opaque))
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

/// The plan of a forward/JVP on a device of arch `arch`: the Hopper kernel where [`path_for`] says
/// so, else attention_jvp.cu's ([`super::attention::plan_jvp`]).
pub fn plan_for(
    arch: &str,
    variant: Variant,
    dtype: DType,
    dims: AttnDims,
    p: JvpPtrs,
    scale: f32,
) -> Result<Vec<Step>> {
    match path_for(arch, dtype, dims) {
        Path::Sm90a => plan(variant, dtype, dims, p, scale),
        Path::Sm80 => super::attention::plan_jvp(variant, dtype, dims, p, scale),
    }
}

/// The launch of one attention_jvp_sm90.cu kernel (errors for a dtype or head dim it lacks).
pub fn plan(
    variant: Variant,
    dtype: DType,
    dims: AttnDims,
    p: JvpPtrs,
    scale: f32,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    if !matches!(dtype, DType::BF16 | DType::F16)
        || !HEAD_DIMS.contains(&dims.d)
        || dims.dv != dims.d
    {
        return Err(Error::Unsupported(format!(
            "attention (sm_90a): {dtype} at head dims d {} / dv {} (the Hopper kernels take bf16/f16 \
             with dv == d in {HEAD_DIMS:?})",
            dims.d, dims.dv
        )));
    }
    let mut named = vec![
        ("q", p.q),
        ("k", p.k),
        ("v", p.v),
        ("o", p.o),
        ("lse", p.lse),
    ];
    if variant != Variant::Fwd {
        named.extend([("tq", p.tq), ("to", p.to), ("tlse", p.tlse)]);
    }
    if variant == Variant::Jvp {
        named.extend([("tk", p.tk), ("tv", p.tv)]);
    }
    for (name, ptr) in &named {
        if *ptr == 0 || ptr % 16 != 0 {
            return Err(Error::Unsupported(format!(
                "attention on the GPU (sm_90a): `{name}` at {ptr:#x} is null or not 16-byte aligned \
                 (TMA reads 16-byte aligned tensors)"
            )));
        }
    }
    let bh = dims.b * dims.h;
    let bc = key_tile(variant, dims.d);
    let qmap = |ptr| {
        Arg::TensorMap(TensorMapDesc::attention(
            ptr, dtype, bh, dims.nq, dims.d, BLOCK_ROWS,
        ))
    };
    let kmap = |ptr| {
        Arg::TensorMap(TensorMapDesc::attention(
            ptr, dtype, bh, dims.nk, dims.d, bc,
        ))
    };
    for a in [qmap(p.q), kmap(p.k)] {
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
                kmap(p.v),
                qmap(p.tq),
                kmap(p.tk),
                kmap(p.tv),
            ],
        ),
        Variant::JvpNoKv => (
            "attention_jvp_nokv_sm90",
            vec![qmap(p.q), kmap(p.k), kmap(p.v), qmap(p.tq)],
        ),
        Variant::Fwd => ("attention_fwd_sm90", vec![qmap(p.q), kmap(p.k), kmap(p.v)]),
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
    args.extend([nq, nk, Arg::F32(scale)]);
    let grid = (dims.nq.div_ceil(BLOCK_ROWS) as u64, bh as u64, 1);
    Ok(vec![Step::Kernel(Launch::new(
        OP,
        FILE,
        format!("{prefix}_{dt}_d{}", dims.d),
        grid,
        (THREADS, 1, 1),
        shared_bytes(variant, dims.d),
        args,
    )?)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::attention::check_shapes;

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
        // (variant, d64, d128): cuda/README.md, attention_jvp_sm90.cu.
        for (v, want) in [
            (Variant::Jvp, [165000, 214120]),
            (Variant::JvpNoKv, [99464, 165000]),
            (Variant::Fwd, [83080, 165000]),
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
    fn dispatch_takes_hopper_only_where_supported() {
        let d64 = check_shapes(&[1, 2, 300, 64], &[1, 2, 77, 64], &[1, 2, 77, 64]).unwrap();
        let d72 = check_shapes(&[1, 2, 300, 72], &[1, 2, 77, 72], &[1, 2, 77, 72]).unwrap();
        assert!(supported("sm_90a", DType::BF16, d64));
        assert!(supported("sm_90a", DType::F16, d64));
        assert!(!supported("sm_90a", DType::F32, d64));
        assert!(!supported("sm_90a", DType::BF16, d72));
        assert!(!supported("sm_80", DType::BF16, d64));
        assert!(!supported("sm_89", DType::BF16, d64));
        let p = ptrs();
        let steps = plan_for("sm_80", Variant::Jvp, DType::BF16, d64, p, 0.125).unwrap();
        let Step::Kernel(l) = &steps[0] else { panic!() };
        assert_eq!(l.file, "attention_jvp.cu");
        let steps = plan_for("sm_90a", Variant::Jvp, DType::F32, d64, p, 0.125).unwrap();
        let Step::Kernel(l) = &steps[0] else { panic!() };
        assert_eq!(l.file, "attention_jvp.cu");
    }

    #[test]
    fn plans_carry_tensor_maps_with_the_kernel_tiles() {
        let dims = check_shapes(&[2, 3, 300, 128], &[2, 3, 77, 128], &[2, 3, 77, 128]).unwrap();
        let steps = plan(Variant::Jvp, DType::BF16, dims, ptrs(), 0.1).unwrap();
        let Step::Kernel(l) = &steps[0] else { panic!() };
        assert_eq!(l.kernel, "attention_jvp_sm90_bf16_d128");
        assert_eq!(l.grid, (3, 6, 1));
        assert_eq!(l.block, (384, 1, 1));
        assert_eq!(l.args.len(), 13);
        let Arg::TensorMap(q) = l.args[0] else {
            panic!()
        };
        assert_eq!(q.dims, [128, 300, 6]);
        assert_eq!(q.strides, [256, 256 * 300]);
        assert_eq!(q.boxdim, [64, 128, 1]);
        let Arg::TensorMap(k) = l.args[4] else {
            panic!()
        };
        assert_eq!(
            (k.ptr, k.dims, k.boxdim),
            (0x50000, [128, 77, 6], [64, 48, 1])
        );
        let Arg::TensorMap(v) = l.args[2] else {
            panic!()
        };
        assert_eq!(v.boxdim, [64, 48, 1]);
        let fwd = plan(Variant::Fwd, DType::F16, dims, ptrs(), 0.1).unwrap();
        let Step::Kernel(l) = &fwd[0] else { panic!() };
        let Arg::TensorMap(k) = l.args[1] else {
            panic!()
        };
        assert_eq!(k.boxdim, [64, 64, 1]);
        assert_eq!(l.args.len(), 8);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let d64 = check_shapes(&[1, 1, 8, 64], &[1, 1, 8, 64], &[1, 1, 8, 64]).unwrap();
        let d96 = check_shapes(&[1, 1, 8, 96], &[1, 1, 8, 96], &[1, 1, 8, 96]).unwrap();
        let mut p = ptrs();
        assert!(plan(Variant::Jvp, DType::BF16, d96, p, 0.1).is_err());
        assert!(plan(Variant::Jvp, DType::F32, d64, p, 0.1).is_err());
        p.tk = 0x50008;
        let e = plan(Variant::Jvp, DType::BF16, d64, p, 0.1).unwrap_err();
        assert!(e.to_string().contains("`tk`"), "{e}");
        // The nokv kernel does not read tk.
        assert!(plan(Variant::JvpNoKv, DType::BF16, d64, p, 0.1).is_ok());
        let mut d = TensorMapDesc::attention(0x1000, DType::BF16, 2, 10, 64, 128);
        assert!(d.check().is_ok());
        d.boxdim[0] = 128; // 256 bytes: wider than the 128-byte swizzle
        assert!(d.check().is_err());
        let mut d = TensorMapDesc::attention(0x1000, DType::BF16, 2, 10, 64, 300);
        assert!(d.check().is_err());
        d.boxdim[1] = 64;
        d.ptr = 0x1008;
        assert!(d.check().is_err());
    }
}
