//! Launch plans: what a CUDA op does, as data. Each op family builds a `Vec<Step>` from device
//! pointers and sizes with a pure function (no GPU needed), and [`crate::cuda::Gpu::run`] executes
//! it. Keeping the plan separate from its execution lets the tests check, on a machine without a
//! GPU, that every kernel named in a plan exists and that its argument list matches the kernel's
//! parameter list in the PTX (a wrong `int` vs `long long`, or a missing pointer, would otherwise be
//! silent memory corruption), and that grids and shared memory stay within the device limits.

use super::attention_sm90::TensorMapDesc;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// One kernel argument, by value. Pointers are raw device addresses (0 is a null "opt" pointer).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    /// A pointer parameter: a device address, 0 for a null "opt" pointer.
    Ptr(u64),
    /// An `int` parameter.
    I32(i32),
    /// A `long long` (i64) parameter.
    I64(i64),
    /// A `float` parameter.
    F32(f32),
    /// A TMA tensor map passed by value (`const __grid_constant__` 128-byte struct), described here
    /// and encoded with cuTensorMapEncodeTiled at launch (see [`super::attention_sm90`]).
    TensorMap(TensorMapDesc),
}

/// The ABI class of a kernel parameter, as PTX declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// A pointer or a `long long`: `.param .u64` / `.s64` / `.b64`.
    B64,
    /// An `int`: `.param .u32` / `.s32` / `.b32`.
    B32,
    /// A `float`: `.param .f32`.
    F32,
    /// A 128-byte tensor map by value: `.param .align 128 .b8 name[128]` (alignment 64 or 128).
    TensorMap,
}

impl Arg {
    /// The PTX parameter class this argument must meet in the kernel's signature.
    pub fn kind(&self) -> ArgKind {
        match self {
            Arg::Ptr(_) | Arg::I64(_) => ArgKind::B64,
            Arg::I32(_) => ArgKind::B32,
            Arg::F32(_) => ArgKind::F32,
            Arg::TensorMap(_) => ArgKind::TensorMap,
        }
    }
}

/// A kernel launch: which kernel of which embedded file, its grid, block, dynamic shared memory and
/// arguments in parameter order.
///
/// Only this crate's plan functions build launches (their argument lists are checked against
/// each kernel's PTX signature by the tests): the driver reads exactly as many arguments as the
/// kernel declares, so a hand-made list with too few would make it read past the array on the
/// host. Callers read a launch through the accessors and run it with [`super::Gpu::run`].
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    pub(crate) file: &'static str,
    pub(crate) kernel: String,
    pub(crate) grid: (u32, u32, u32),
    pub(crate) block: (u32, u32, u32),
    pub(crate) shared_bytes: u32,
    pub(crate) args: Vec<Arg>,
    /// For a kernel whose tiles depend on the device's shared memory (the sm_80 attention
    /// forward/JVP): whether they were planned for a 99 KiB device
    /// ([`super::attention::small_shared_memory`]); [`super::Gpu::run`] refuses the launch on the
    /// other kind, whose build of the kernel would take other tiles. `None`: any device.
    pub(crate) small_shared: Option<bool>,
}

/// The largest grid the hardware takes (x, y, z).
pub const MAX_GRID: (u64, u64, u64) = (i32::MAX as u64, 65535, 65535);

impl Launch {
    /// The embedded kernel file (e.g. `attention_jvp.cu`), compiled by NVRTC on first use.
    pub fn file(&self) -> &'static str {
        self.file
    }

    /// The kernel's entry name in its file (e.g. `attention_jvp_bf16_d64`).
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    /// Blocks in x, y, z, each within 1..=[`MAX_GRID`].
    pub fn grid(&self) -> (u32, u32, u32) {
        self.grid
    }

    /// Threads per block in x, y, z.
    pub fn block(&self) -> (u32, u32, u32) {
        self.block
    }

    /// Dynamic shared memory in bytes (above 48 KiB the launcher raises the kernel's opt-in
    /// limit).
    pub fn shared_bytes(&self) -> u32 {
        self.shared_bytes
    }

    /// The kernel's arguments, in parameter order.
    pub fn args(&self) -> &[Arg] {
        &self.args
    }

    /// A launch whose grid is checked against the hardware limits: each dimension at least 1 and
    /// at most [`MAX_GRID`]. `what` names the op in the error.
    pub(crate) fn new(
        what: &str,
        file: &'static str,
        kernel: impl Into<String>,
        grid: (u64, u64, u64),
        block: (u32, u32, u32),
        shared_bytes: usize,
        args: Vec<Arg>,
    ) -> Result<Launch> {
        let kernel = kernel.into();
        let ok = |g: u64, max: u64| (1..=max).contains(&g);
        if !(ok(grid.0, MAX_GRID.0) && ok(grid.1, MAX_GRID.1) && ok(grid.2, MAX_GRID.2)) {
            return Err(Error::Unsupported(format!(
                "{what}: kernel {kernel} would need a grid of {grid:?} blocks; the GPU takes 1..={} \
                 in x and 1..=65535 in y and z (too many batch x heads, groups or rows)",
                MAX_GRID.0
            )));
        }
        let shared_bytes = u32::try_from(shared_bytes).map_err(|_| {
            Error::Unsupported(format!("{what}: {shared_bytes} bytes of shared memory"))
        })?;
        Ok(Launch {
            file,
            kernel,
            grid: (grid.0 as u32, grid.1 as u32, grid.2 as u32),
            block,
            shared_bytes,
            args,
            small_shared: None,
        })
    }

    /// This launch, marked as planned for a device with (`true`) or without 99 KiB of shared
    /// memory per block (see the field).
    pub(crate) fn planned_for_small_shared(mut self, small: bool) -> Launch {
        self.small_shared = Some(small);
        self
    }

    /// Errors when the launch was planned for the other kind of device than one of arch `arch`.
    pub(crate) fn check_arch(&self, arch: &str) -> Result<()> {
        match self.small_shared {
            Some(small) if small != super::attention::small_shared_memory(arch) => {
                Err(Error::Unsupported(format!(
                    "kernel {} was planned for a device {} 99 KiB of shared memory per block, \
                     and this one ({arch}) has {}: make the plan with this device's arch \
                     (attention_sm90::plan_for, attention::plan_jvp_on)",
                    self.kernel,
                    if small { "with" } else { "with more than" },
                    if small { "more" } else { "99 KiB" }
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The GELU (tanh form) a GEMM's epilogue applies to P = op(A) op(B) (+ bias), the cuBLASLt
/// epilogues of DESIGN.md section 3: the activation of the MLP's first layer and its tangent (or
/// gradient) come out of the product without a pass of their own over the [T, Hd] activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GemmAct {
    /// C = P.
    #[default]
    None,
    /// C = gelu(P) (cuBLASLt GELU_BIAS / GELU).
    Gelu,
    /// C = gelu(P), and P itself (the pre-activation) into `aux`, [m, n] row-major in `dtype`
    /// (GELU_AUX_BIAS / GELU_AUX).
    GeluAux {
        /// Device address of the pre-activation output, [m, n] in the product's dtype.
        aux: u64,
    },
    /// C = gelu'(aux) ⊙ P, `aux` a saved pre-activation [m, n] (DGELU; no bias): the tangent
    /// ġ = gelu'(h) ⊙ ẋW1ᵀ, or the gradient gelu'(h) ⊙ (dy W2).
    DGelu {
        /// Device address of the saved pre-activation h, [m, n] in the product's dtype.
        aux: u64,
    },
}

/// A matrix product on row-major matrices, C[m, n] = act(op(A) op(B) (+ bias\[n\] on every row)),
/// with f32 accumulation. A is stored [m, k] (or [k, m] when `trans_a`), B is stored [k, n] (or
/// [n, k] when `trans_b`); all three are contiguous and in `dtype`, as are the bias and any aux.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// Storage dtype of A, B, C, the bias and the aux matrix.
    pub dtype: DType,
    /// Rows of C (and of op(A)).
    pub m: usize,
    /// Columns of C (and of op(B)).
    pub n: usize,
    /// The contracted dimension: columns of op(A), rows of op(B).
    pub k: usize,
    /// Device address of A.
    pub a: u64,
    /// A is stored [k, m] and op(A) = Aᵀ.
    pub trans_a: bool,
    /// Device address of B.
    pub b: u64,
    /// B is stored [n, k] and op(B) = Bᵀ.
    pub trans_b: bool,
    /// Device address of C [m, n], overwritten.
    pub c: u64,
    /// Device address of the bias \[n\] added to every row of C; `None`: no bias.
    pub bias: Option<u64>,
    /// The epilogue's activation ([`GemmAct::None`]: C is the product itself).
    pub act: GemmAct,
}

impl Gemm {
    /// The step C[m, n] = op(A) op(B) (+ bias) in `dtype`; an operand is (address, transposed).
    pub fn step(
        dtype: DType,
        (m, n, k): (usize, usize, usize),
        a: (u64, bool),
        b: (u64, bool),
        c: u64,
        bias: Option<u64>,
    ) -> Step {
        Step::Gemm(Gemm {
            dtype,
            m,
            n,
            k,
            a: a.0,
            trans_a: a.1,
            b: b.0,
            trans_b: b.1,
            c,
            bias,
            act: GemmAct::None,
        })
    }

    /// [`Gemm::step`] with a GELU epilogue.
    pub fn step_act(
        dtype: DType,
        dims: (usize, usize, usize),
        a: (u64, bool),
        b: (u64, bool),
        c: u64,
        bias: Option<u64>,
        act: GemmAct,
    ) -> Step {
        match Gemm::step(dtype, dims, a, b, c, bias) {
            Step::Gemm(mut g) => {
                g.act = act;
                Step::Gemm(g)
            }
            other => other,
        }
    }
}

/// One step of a plan, executed in order on the GPU's stream.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// A kernel launch.
    Kernel(Launch),
    /// A matrix product through cuBLASLt (cuBLAS, then the elementwise kernels for the GELU, where
    /// cuBLASLt has no algorithm for it).
    Gemm(Gemm),
    /// Set `count` elements of `width` bytes (1, 2 or 4) at `ptr` to `bits`.
    Fill {
        /// Device address of the first element.
        ptr: u64,
        /// Element size in bytes: 1, 2 or 4 (any other is an error when the step runs).
        width: usize,
        /// Number of elements (0: nothing is done).
        count: usize,
        /// The value, of which the low `width` bytes are written.
        bits: u32,
    },
    /// Copy `bytes` bytes from `src` to `dst` (device to device).
    Copy {
        /// Device address read.
        src: u64,
        /// Device address written.
        dst: u64,
        /// Bytes to copy (0: nothing is done).
        bytes: usize,
    },
    /// Zero `rows` runs of `row_bytes` bytes, the first at `ptr`, each `pitch` bytes after the
    /// last (a 2D memset: the padding rows of one strided gradient).
    ZeroRows {
        /// Device address of the first run.
        ptr: u64,
        /// Bytes from the start of one run to the next (at least `row_bytes`; at most
        /// [`Step::MAX_ZERO_ROWS_PITCH`], the driver's pitch argument, where there is more than one run).
        pitch: usize,
        /// Bytes zeroed in each run (0: nothing is done).
        row_bytes: usize,
        /// Number of runs (0: nothing is done).
        rows: usize,
    },
}

impl Step {
    /// The largest pitch a plan puts in a [`Step::ZeroRows`] (what a signed 32-bit pitch holds:
    /// the limit drivers report for pitched memory); wider-spaced rows take a fill each.
    pub const MAX_ZERO_ROWS_PITCH: usize = i32::MAX as usize;

    /// Zero `bytes` bytes at `ptr`.
    pub fn zero(ptr: u64, bytes: usize) -> Step {
        Step::Fill {
            ptr,
            width: 1,
            count: bytes,
            bits: 0,
        }
    }

    /// Steps that zero `rows` runs of `row_bytes` bytes, `pitch` bytes apart, from `ptr`: one
    /// plain fill when the runs touch (or there is one), one [`Step::ZeroRows`] when the pitch
    /// fits [`Step::MAX_ZERO_ROWS_PITCH`], else a fill per run. Nothing for an empty region.
    pub fn zero_rows(ptr: u64, pitch: usize, row_bytes: usize, rows: usize) -> Vec<Step> {
        if rows == 0 || row_bytes == 0 {
            Vec::new()
        } else if rows == 1 || pitch == row_bytes {
            vec![Step::zero(ptr, rows * row_bytes)]
        } else if pitch <= Step::MAX_ZERO_ROWS_PITCH {
            vec![Step::ZeroRows {
                ptr,
                pitch,
                row_bytes,
                rows,
            }]
        } else {
            (0..rows)
                .map(|r| Step::zero(ptr + (r * pitch) as u64, row_bytes))
                .collect()
        }
    }
}

/// The kernel-name suffix of a storage dtype (`_bf16`, `_f16`, `_f32`).
pub fn dtype_suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        DType::F32 => Ok("f32"),
        DType::F64 => Err(Error::Unsupported(
            "the GPU computes in bf16, f16 or f32, not f64 (use the CPU for f64)".into(),
        )),
    }
}

/// The grid of a grid-stride pointwise kernel over `n` elements: block 256, at most
/// 65535 * 16 blocks (any smaller grid is also correct).
pub fn pointwise_grid(n: usize) -> (u64, u64, u64) {
    ((n as u64).div_ceil(256).clamp(1, 65535 * 16), 1, 1)
}

/// The most elements a pointwise launch takes: more than any device buffer holds, and small
/// enough that the kernels' 64-bit counts and indices never wrap.
pub const MAX_POINTWISE: usize = 1 << 60;

/// The one launch of a grid-stride pointwise `kernel` of `file` over `n` elements (no launch at
/// all for n = 0; an error above [`MAX_POINTWISE`]).
pub fn pointwise_steps(
    op: &str,
    file: &'static str,
    kernel: impl Into<String>,
    n: usize,
    args: Vec<Arg>,
) -> Result<Vec<Step>> {
    if n == 0 {
        return Ok(vec![]);
    }
    if n > MAX_POINTWISE {
        return Err(Error::Unsupported(format!(
            "{op}: {n} elements in one pointwise launch (at most 2^60)"
        )));
    }
    Ok(vec![Step::Kernel(Launch::new(
        op,
        file,
        kernel,
        pointwise_grid(n),
        (256, 1, 1),
        0,
        args,
    )?)])
}

/// Errors unless rows T, width C and groups G (of per-group vectors, row t using group
/// t / (T / G)) are each at least 1 and G divides T: plan dims may be built by hand.
pub fn check_groups(what: &'static str, t: usize, c: usize, g: usize) -> Result<()> {
    if t == 0 || c == 0 || g == 0 || t % g != 0 {
        return Err(Error::invalid(
            what,
            format!("rows T = {t}, width C = {c}, groups G = {g}: each must be at least 1 and G must divide T"),
        ));
    }
    Ok(())
}

/// Errors unless every named device pointer is non-null: the plans built from raw addresses list
/// the pointers their kernels always dereference (the optional ones, where 0 means a zero tangent
/// or "not written", are left out), so a null one is an error naming it instead of a fault.
pub fn require_ptrs(what: &'static str, ptrs: &[(&str, u64)]) -> Result<()> {
    match ptrs.iter().find(|(_, p)| *p == 0) {
        Some((name, _)) => Err(Error::invalid(
            what,
            format!("`{name}` is a null device pointer, and this launch needs it"),
        )),
        None => Ok(()),
    }
}

/// `v` as an `int` kernel argument ([`Arg::I32`]), or an [`Error::Unsupported`] naming `what`
/// and `name` when it exceeds `i32::MAX`.
pub fn int_arg(what: &str, name: &str, v: usize) -> Result<Arg> {
    i32::try_from(v).map(Arg::I32).map_err(|_| {
        Error::Unsupported(format!(
            "{what}: {name} = {v} does not fit the kernels' 32-bit int"
        ))
    })
}

/// One embedded kernel file compiled to PTX for a virtual architecture (e.g. "compute_80"), the
/// header inlined: what [`ptx_signatures`] reads to check launch plans without a GPU. Needs NVRTC.
pub fn kernel_ptx(file: &str, arch: &'static str) -> Result<String> {
    use super::sources::SOURCES;
    if !super::nvrtc_present() {
        return Err(Error::Unsupported("NVRTC not found".into()));
    }
    let mut text = super::nvrtc::embedded(file)?.to_string();
    for (name, body) in SOURCES.iter().filter(|(n, _)| n.ends_with(".cuh")) {
        text = text.replace(&format!("#include \"{name}\""), body);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["-default-device".into(), "--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(text, opts)
        .map(|p| p.to_src())
        .map_err(|e| Error::Cuda(format!("NVRTC (PTX) failed for {file}: {e:?}")))
}

/// The threads-per-block bound (`.maxntid`) of each kernel entry of a PTX text, where declared.
pub fn ptx_max_threads(ptx: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in ptx.lines() {
        if let Some(rest) = line.split(".entry ").nth(1) {
            current = rest
                .split(|c: char| c == '(' || c.is_whitespace())
                .next()
                .map(str::to_string);
        } else if let (Some(name), Some(rest)) = (&current, line.split(".maxntid").nth(1)) {
            let n: u32 = rest
                .split(',')
                .map(|v| {
                    v.trim()
                        .trim_end_matches(';')
                        .trim()
                        .parse::<u32>()
                        .unwrap_or(1)
                })
                .product();
            out.push((name.clone(), n));
        }
    }
    out
}

/// The kernel entries of a PTX text and the ABI class of each parameter, in order.
pub fn ptx_signatures(ptx: &str) -> Vec<(String, Vec<ArgKind>)> {
    let mut out = Vec::new();
    let mut lines = ptx.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.split(".entry ").nth(1) else {
            continue;
        };
        let name = rest
            .split(|c: char| c == '(' || c.is_whitespace())
            .next()
            .unwrap_or_default()
            .to_string();
        let mut params = Vec::new();
        if !rest.contains("()") {
            for p in lines.by_ref() {
                let p = p.trim();
                if p.starts_with(')') {
                    break;
                }
                if let Some(decl) = p.strip_prefix(".param") {
                    let words: Vec<&str> = decl.split_whitespace().collect();
                    if words.contains(&".b8") && decl.trim_end_matches(',').ends_with("[128]") {
                        params.push(ArgKind::TensorMap);
                        continue;
                    }
                    let ty = words.first().copied().unwrap_or_default();
                    params.push(match ty {
                        ".u32" | ".s32" | ".b32" => ArgKind::B32,
                        ".f32" => ArgKind::F32,
                        _ => ArgKind::B64,
                    });
                }
            }
        }
        out.push((name, params));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_rows_takes_the_fewest_steps_the_driver_accepts() {
        assert!(Step::zero_rows(0x1000, 64, 32, 0).is_empty());
        assert!(Step::zero_rows(0x1000, 64, 0, 5).is_empty());
        // One run, or runs that touch: one plain fill.
        assert_eq!(Step::zero_rows(0x1000, 64, 32, 1), [Step::zero(0x1000, 32)]);
        assert_eq!(
            Step::zero_rows(0x1000, 32, 32, 4),
            [Step::zero(0x1000, 128)]
        );
        assert_eq!(
            Step::zero_rows(0x1000, 64, 32, 4),
            [Step::ZeroRows {
                ptr: 0x1000,
                pitch: 64,
                row_bytes: 32,
                rows: 4
            }]
        );
        // A pitch past the driver's argument: a fill per run.
        let far = Step::MAX_ZERO_ROWS_PITCH + 2;
        assert_eq!(
            Step::zero_rows(0x1000, far, 32, 3),
            [0, 1, 2].map(|r| Step::zero(0x1000 + (r * far) as u64, 32))
        );
    }

    #[test]
    fn parses_ptx_entries() {
        let ptx = "\n.visible .entry k1(\n\t.param .u64 k1_param_0,\n\t.param .u32 k1_param_1,\n\
                   \t.param .f32 k1_param_2,\n\t.param .u64 .ptr .align 1 k1_param_3,\n\
                   \t.param .align 128 .b8 k1_param_4[128]\n)\n{\n}\n\
                   .visible .entry k2()\n{\n}\n";
        let s = ptx_signatures(ptx);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0, "k1");
        assert_eq!(
            s[0].1,
            vec![
                ArgKind::B64,
                ArgKind::B32,
                ArgKind::F32,
                ArgKind::B64,
                ArgKind::TensorMap
            ]
        );
        assert_eq!(s[1], ("k2".to_string(), vec![]));
    }

    #[test]
    fn grids_are_checked() {
        let l = |g| Launch::new("t", "f.cu", "k", g, (128, 1, 1), 0, vec![]);
        assert!(l((1, 65535, 1)).is_ok());
        assert!(l((1, 65536, 1)).is_err());
        assert!(l((0, 1, 1)).is_err());
        assert!(l((1 << 31, 1, 1)).is_err());
        assert_eq!(pointwise_grid(0), (1, 1, 1));
        assert_eq!(pointwise_grid(257), (2, 1, 1));
        assert_eq!(pointwise_grid(1 << 40), (65535 * 16, 1, 1));
    }
}
