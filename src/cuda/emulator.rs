//! A CPU stand-in for the GPU: the kernels of cuda/ compiled as host C++ (by the system's C++
//! compiler, with the shim in cuda/emu/) and run with CUDA's execution model emulated (one fiber per
//! thread, barriers, warp collectives, tensor-core mma and ldmatrix fragments as the PTX ISA defines
//! them, cp.async copies that land only when their group is waited for). See cuda/emu/README.md.
//!
//! Why: kernels are written on machines without a GPU and GPU time is scarce. With
//! `FLASHJVP_EMULATE=1` the process's [`super::Gpu`] is this emulator, so the GPU tests, the CLI's
//! `--device cuda` and the DiT's GPU mode run the real kernel sources and the real launch plans
//! (argument lists, grids, pointers, GEMM layouts) on the CPU, against the CPU reference. What it
//! cannot show: speed, the hardware's own rounding inside mma and wgmma, and races that only a real
//! memory model exposes. With `FLASHJVP_EMULATE=sm_90a` the Hopper kernels run too (wgmma, TMA,
//! mbarriers and named barriers in cuda/emu/sm90.h, which checks their ordering).
//!
//! Device memory is host memory from `mmap`, each buffer ending at a guard page so that a kernel
//! reading or writing past an allocation faults at once; every pointer a step names must lie in a
//! live buffer. GEMM steps run here in f64 with cuBLAS's column-major semantics applied to the exact
//! layout [`super::gemm`] hands to cuBLASLt.
//!
//! Environment (besides `FLASHJVP_SM90_SCHEDULE`, which builds the Hopper kernels as NVRTC would):
//! `FLASHJVP_EMULATOR_SEED` (default 1; 0 runs the threads of a block in index order at
//! every scheduling point, other values in an order drawn from the seed), `FLASHJVP_EMULATOR_WORKERS`
//! (OS threads running blocks; default: the CPU count), `CXX` (default `c++`),
//! `FLASHJVP_EMULATOR_DIR` (where the compiled library is cached; default beside the kernel cache),
//! `FLASHJVP_EMULATOR=off` (never build or load it: the GPU machine's check script sets it).

use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_uint, c_ulonglong, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use half::{bf16, f16};

use super::gemm::{check_gemm_dtype, col_major};
use super::launch::{Arg, Gemm, GemmAct, Launch, Step};
use crate::cpu::activation::{gelu, gelu_grad};
use crate::error::{Error, Result};
use crate::tensor::DType;

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    *const c_uint,
    *const c_uint,
    c_uint,
    *mut *mut c_void,
    c_ulonglong,
    c_int,
) -> c_int;
type ErrorFn = unsafe extern "C" fn() -> *const c_char;
type CountFn = unsafe extern "C" fn() -> c_int;
type NameFn = unsafe extern "C" fn(c_int) -> *const c_char;

/// The loaded kernel library.
pub struct Emulator {
    _lib: libloading::Library,
    launch: LaunchFn,
    error: ErrorFn,
    kernels: Vec<String>,
    seed: u64,
    workers: i32,
    path: PathBuf,
}

static EMULATOR: OnceLock<std::result::Result<Arc<Emulator>, String>> = OnceLock::new();

/// Whether the environment asks for the emulator in place of a GPU (`FLASHJVP_EMULATE` set, not 0).
pub fn requested() -> bool {
    std::env::var("FLASHJVP_EMULATE")
        .map(|v| !v.is_empty() && v != "0")
        .unwrap_or(false)
}

/// The architecture the emulated device claims: `FLASHJVP_EMULATE=sm_90a` for the Hopper path
/// (its kernels then run under the emulator), `sm_89` for a device with 99 KiB of shared memory
/// per block (an RTX 4090's or L40S's: the sm_80 kernels built with `FJ_SMEM_SMALL`, their shorter
/// key tiles), anything else sm_80.
pub fn arch() -> &'static str {
    match std::env::var("FLASHJVP_EMULATE").as_deref() {
        Ok("sm_90a") => "sm_90a",
        Ok("sm_89") => "sm_89",
        _ => "sm_80",
    }
}

/// For tests that need the emulator itself: it, or `None` after printing "skipped: no kernel
/// emulator" (no C++ compiler, say), unless FLASHJVP_REQUIRE_EMULATOR is set (CI sets it), where a
/// failed build fails the test.
pub fn emulator_or_skip() -> Option<Arc<Emulator>> {
    match Emulator::get() {
        Ok(e) => Some(e),
        Err(e) => {
            assert!(
                std::env::var("FLASHJVP_REQUIRE_EMULATOR").is_err(),
                "FLASHJVP_REQUIRE_EMULATOR is set but the kernel emulator is not usable: {e}"
            );
            println!("skipped: no kernel emulator ({e})");
            None
        }
    }
}

impl Emulator {
    /// The process's emulator: the kernel library is compiled on first use (once per source hash,
    /// cached on disk) and loaded.
    pub fn get() -> Result<Arc<Emulator>> {
        EMULATOR
            .get_or_init(|| Emulator::load().map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map_err(Error::Unsupported)
    }

    fn load() -> Result<Emulator> {
        if std::env::var("FLASHJVP_EMULATOR").is_ok_and(|v| v == "off") {
            return Err(Error::Unsupported(
                "the kernel emulator is switched off (FLASHJVP_EMULATOR=off)".into(),
            ));
        }
        let path = build()?;
        // SAFETY: the library is ours (cuda/emu/runtime.cpp): loading runs only its registry's
        // static initialisers; the symbols have the declared C signatures.
        unsafe {
            let lib = libloading::Library::new(&path).map_err(|e| {
                Error::Unsupported(format!(
                    "loading the kernel emulator {}: {e}",
                    path.display()
                ))
            })?;
            let sym = |name: &[u8]| -> Result<*const ()> {
                lib.get::<*const ()>(name)
                    .map(|s| *s)
                    .map_err(|e| Error::Unsupported(format!("kernel emulator: {e}")))
            };
            let launch: LaunchFn = std::mem::transmute(sym(b"fj_emu_launch\0")?);
            let error: ErrorFn = std::mem::transmute(sym(b"fj_emu_error\0")?);
            let count: CountFn = std::mem::transmute(sym(b"fj_emu_kernel_count\0")?);
            let name: NameFn = std::mem::transmute(sym(b"fj_emu_kernel_name\0")?);
            let kernels = (0..count())
                .map(|i| CStr::from_ptr(name(i)).to_string_lossy().into_owned())
                .collect();
            let env_num = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
            Ok(Emulator {
                _lib: lib,
                launch,
                error,
                kernels,
                seed: env_num("FLASHJVP_EMULATOR_SEED").unwrap_or(1),
                workers: env_num("FLASHJVP_EMULATOR_WORKERS")
                    .unwrap_or(cpus)
                    .clamp(1, 64) as i32,
                path,
            })
        }
    }

    /// The names of the kernels the library holds.
    pub fn kernels(&self) -> &[String] {
        &self.kernels
    }

    /// Where the compiled library lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs the steps of a plan, in order, to completion (on the calling thread).
    pub fn run(&self, steps: &[Step]) -> Result<()> {
        self.run_with_seed(steps, self.seed)
    }

    /// [`Emulator::run`] with an explicit scheduling seed (0: threads in index order).
    pub fn run_with_seed(&self, steps: &[Step], seed: u64) -> Result<()> {
        for step in steps {
            match step {
                Step::Kernel(l) => self.launch(l, seed)?,
                Step::Gemm(g) => gemm(g)?,
                Step::Fill {
                    ptr,
                    width,
                    count,
                    bits,
                } => fill(*ptr, *width, *count, *bits)?,
                Step::ZeroRows {
                    ptr,
                    pitch,
                    row_bytes,
                    rows,
                } => zero_rows(*ptr, *pitch, *row_bytes, *rows)?,
                Step::Copy { src, dst, bytes } => {
                    if *bytes > 0 {
                        check_range("copy source", *src, *bytes)?;
                        check_range("copy destination", *dst, *bytes)?;
                        // SAFETY: both ranges lie in live host buffers (checked above); memmove
                        // semantics, as a device-to-device copy of overlapping ranges is undefined.
                        unsafe {
                            std::ptr::copy(*src as *const u8, *dst as *mut u8, *bytes);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn launch(&self, l: &Launch, seed: u64) -> Result<()> {
        let name = &l.kernel;
        if !self.kernels.iter().any(|k| k == name) {
            return Err(Error::Unsupported(format!(
                "the kernel emulator has no kernel {name} (of {}): is it registered with \
                 FJ_REGISTER, and its file listed in cuda/emu/build.sh?",
                l.file
            )));
        }
        // One 128-byte slot per parameter (the largest kind, a tensor map), value at its start.
        let mut slots = vec![[0u64; 16]; l.args.len()];
        for (slot, a) in slots.iter_mut().zip(&l.args) {
            match *a {
                Arg::Ptr(p) => {
                    if p != 0 {
                        check_range(&format!("a pointer argument of {name}"), p, 1)?;
                    }
                    slot[0] = p;
                }
                Arg::I64(v) => slot[0] = v as u64,
                Arg::I32(v) => slot[0] = v as u32 as u64,
                Arg::F32(v) => slot[0] = v.to_bits() as u64,
                Arg::TensorMap(d) => {
                    d.check()?;
                    check_range(&format!("the tensor map of {name}"), d.ptr, 1)?;
                    *slot = encode_tensor_map(&d);
                }
            }
        }
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s.as_mut_ptr() as *mut c_void)
            .collect();
        let cname = CString::new(name.as_str()).expect("kernel names have no NUL");
        let grid = [l.grid.0, l.grid.1, l.grid.2];
        let block = [l.block.0, l.block.1, l.block.2];
        // SAFETY: the parameter slots outlive the call; the pointers in them were checked to lie in
        // live buffers; the library runs the launch to completion before returning.
        let rc = unsafe {
            (self.launch)(
                cname.as_ptr(),
                grid.as_ptr(),
                block.as_ptr(),
                l.shared_bytes,
                params.as_mut_ptr(),
                seed,
                self.workers,
            )
        };
        if rc != 0 {
            // SAFETY: the library returns a NUL-terminated thread-local message.
            let msg = unsafe { CStr::from_ptr((self.error)()) }
                .to_string_lossy()
                .into_owned();
            return Err(Error::Cuda(format!(
                "emulated launch of {name} (grid {:?}, block {:?}, {} B shared): {msg}",
                l.grid, l.block, l.shared_bytes
            )));
        }
        Ok(())
    }
}

/// "FJTMAP\0\0": the first word of an emulator tensor map.
pub const TENSOR_MAP_MAGIC: u64 = 0x0000_5041_4d54_4a46;

/// The emulator's stand-in for cuTensorMapEncodeTiled's 128 opaque bytes (cuda/emu/sm90.h,
/// `decode_tensor_map`): u64 words [magic, global address, rank | element bytes << 32, swizzle
/// bytes (32, 64 or 128), dims 0..4 (words 4..8), strides of dims 1..4 in bytes (words 9..12), box
/// dims 0|1, 2|3, 4 as u32 pairs (words 13..15)]; words past the rank (4) are 0. Zero fill out of
/// bounds, as [`super::attention_sm90::encode_tensor_map`] asks of the driver.
pub fn encode_tensor_map(d: &super::attention_sm90::TensorMapDesc) -> [u64; 16] {
    let mut w = [0u64; 16];
    w[0] = TENSOR_MAP_MAGIC;
    w[1] = d.ptr;
    w[2] = d.dims.len() as u64 | (d.dtype.size_in_bytes() as u64) << 32;
    w[3] = d.swizzle as u64;
    w[4..8].copy_from_slice(&d.dims);
    w[9..12].copy_from_slice(&d.strides);
    w[13] = d.boxdim[0] as u64 | (d.boxdim[1] as u64) << 32;
    w[14] = d.boxdim[2] as u64 | (d.boxdim[3] as u64) << 32;
    w
}

// ---------------------------------------------------------------------------------------------
// Building the library.

/// FNV-1a, continued from `h`.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cuda")
}

/// Files of `dir` (not recursive), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.is_file());
    v.sort();
    v
}

/// Compiles the library unless a build of the same sources and compiler is cached; returns its path.
fn build() -> Result<PathBuf> {
    let src = source_dir();
    let script = src.join("emu").join("build.sh");
    if !script.is_file() {
        return Err(Error::Unsupported(format!(
            "the kernel emulator's sources are not here ({} is missing)",
            script.display()
        )));
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    // The compile flags are part of the build's identity: FJ_EMU_CXXFLAGS, the Hopper kernels'
    // schedule (FLASHJVP_SM90_SCHEDULE=split: -DFJ_SM90_SPLIT_WAIT, as NVRTC gets it) and key tiles
    // (FLASHJVP_SM90_KEYS=64: -DFJ_SM90_KEYS64=1), and the small shared memory of an emulated sm_89
    // (-DFJ_SMEM_SMALL=1, what NVRTC derives from __CUDA_ARCH__ there).
    let mut flags = std::env::var("FJ_EMU_CXXFLAGS").unwrap_or_default();
    if super::attention::small_shared_memory(arch()) {
        flags.push_str(" -DFJ_SMEM_SMALL=1");
    }
    if super::nvrtc::sm90_split_wait()? {
        flags.push_str(" -DFJ_SM90_SPLIT_WAIT=1");
    }
    if super::nvrtc::sm90_keys64()? {
        flags.push_str(" -DFJ_SM90_KEYS64=1");
    }
    let mut h = fnv(0xcbf29ce484222325, cxx.as_bytes());
    h = fnv(h, flags.as_bytes());
    for f in files(&src).into_iter().chain(files(&src.join("emu"))) {
        h = fnv(h, f.file_name().unwrap_or_default().as_encoded_bytes());
        h = fnv(h, &std::fs::read(&f).unwrap_or_default());
    }
    let root = match std::env::var_os("FLASHJVP_EMULATOR_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => super::context::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("emulator"),
    };
    let dir = root.join(format!("{h:016x}"));
    let lib = dir.join("libfjemu.so");
    if lib.is_file() {
        return Ok(lib);
    }
    let tmp = root.join(format!("{h:016x}.tmp{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| {
        Error::Unsupported(format!(
            "kernel emulator: cannot create {}: {e}",
            tmp.display()
        ))
    })?;
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(&tmp)
        .env("FJ_EMU_CXXFLAGS", &flags)
        .current_dir(src.parent().unwrap_or(&src))
        .output()
        .map_err(|e| Error::Unsupported(format!("kernel emulator: running bash: {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::Unsupported(format!(
            "kernel emulator: building with {cxx} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    // Another process may have finished the same build first: either copy will do.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    if lib.is_file() {
        Ok(lib)
    } else {
        Err(Error::Unsupported(format!(
            "kernel emulator: the build left no {}",
            lib.display()
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Host memory standing in for device memory.

/// Live buffers: start address -> length in bytes.
fn live() -> &'static Mutex<BTreeMap<u64, usize>> {
    static LIVE: OnceLock<Mutex<BTreeMap<u64, usize>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(BTreeMap::new()))
}

/// Errors unless `[ptr, ptr + bytes)` lies inside one live buffer.
fn check_range(what: &str, ptr: u64, bytes: usize) -> Result<()> {
    let map = live().lock().expect("emulator buffer registry");
    if let Some((&start, &len)) = map.range(..=ptr).next_back() {
        // In u128: an end past u64::MAX must not wrap to an address inside the buffer.
        if ptr as u128 + bytes as u128 <= start as u128 + len as u128 {
            return Ok(());
        }
        return Err(Error::Cuda(format!(
            "emulator: {what} [{ptr:#x}, +{bytes}) runs past the buffer [{start:#x}, +{len})"
        )));
    }
    Err(Error::Cuda(format!(
        "emulator: {what} {ptr:#x} is not in any live buffer"
    )))
}

const PAGE: usize = 4096;

/// "Device" memory of the emulator: `mmap`ed host memory whose last byte sits just before a
/// `PROT_NONE` guard page (the start is 256-byte aligned, like a cudaMalloc'd block, so up to 255
/// bytes of slack may precede the guard).
pub struct HostBuffer {
    map: *mut c_void,
    map_len: usize,
    ptr: u64,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; access is through raw device addresses
// whose ordering the (synchronous) emulator provides, as the stream does on a GPU.
unsafe impl Send for HostBuffer {}
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// `len` bytes (at least 1), filled with 0xFF (NaN in every float dtype) until written.
    pub fn new(len: usize) -> Result<HostBuffer> {
        let len = len.max(1);
        // Rounded up to whole pages plus the guard page, without wrapping (and, like any
        // allocation, within isize::MAX).
        let sizes = len.checked_next_multiple_of(256).and_then(|slot| {
            let body = slot.checked_next_multiple_of(PAGE)?;
            let map_len = body
                .checked_add(PAGE)
                .filter(|&m| m <= isize::MAX as usize)?;
            Some((slot, body, map_len))
        });
        let Some((slot, body, map_len)) = sizes else {
            return Err(Error::Cuda(format!(
                "emulator: allocating {len} bytes of host memory failed (more than memory can \
                 address)"
            )));
        };
        // SAFETY: an anonymous private mapping; the guard page is the last page of it.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(Error::Cuda(format!(
                "emulator: allocating {len} bytes of host memory failed"
            )));
        }
        // SAFETY: `map + body` is the last page of the mapping.
        unsafe {
            libc::mprotect(
                (map as *mut u8).add(body) as *mut c_void,
                PAGE,
                libc::PROT_NONE,
            );
        }
        let ptr = map as u64 + (body - slot) as u64;
        // SAFETY: [ptr, ptr + len) lies in the readable part of the mapping.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0xff, len) };
        live()
            .lock()
            .expect("emulator buffer registry")
            .insert(ptr, len);
        Ok(HostBuffer {
            map,
            map_len,
            ptr,
            len,
        })
    }

    /// The "device address" (a host address).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The usable size in bytes (at least 1: [`HostBuffer::new`] rounds 0 up).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether `len` is 0 (never, as `new` allocates at least one byte).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Errors unless `[offset, offset + bytes)` lies within the buffer (the end computed without
    /// wrapping).
    fn check_within(&self, what: &str, offset: usize, bytes: usize) -> Result<()> {
        if offset.checked_add(bytes).is_none_or(|end| end > self.len) {
            return Err(Error::Cuda(format!(
                "emulator: {what} of {bytes} bytes at offset {offset} runs past the end of a \
                 {}-byte buffer",
                self.len
            )));
        }
        Ok(())
    }

    /// Copies `bytes` in at byte `offset`; errors (writing nothing) unless they fit.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        self.check_within("a write", offset, bytes.len())?;
        // SAFETY: in bounds (checked); the buffer is live.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.ptr as *mut u8).add(offset),
                bytes.len(),
            )
        };
        Ok(())
    }

    /// Copies `out.len()` bytes out from byte `offset`; errors (reading nothing) unless they lie
    /// within the buffer.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<()> {
        self.check_within("a read", offset, out.len())?;
        // SAFETY: in bounds (checked); the buffer is live.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.ptr as *const u8).add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        Ok(())
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        live()
            .lock()
            .expect("emulator buffer registry")
            .remove(&self.ptr);
        // SAFETY: the mapping was created in `new` and is unmapped once.
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

fn fill(ptr: u64, width: usize, count: usize, bits: u32) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    if !matches!(width, 1 | 2 | 4) {
        return Err(Error::Cuda(format!("memset of width {width}")));
    }
    let Some(total) = width.checked_mul(count) else {
        return Err(Error::Cuda(format!(
            "emulator: fill of {count} elements of {width} bytes overflows"
        )));
    };
    check_range("fill", ptr, total)?;
    let bytes = bits.to_le_bytes();
    // SAFETY: the range lies in a live buffer (checked above).
    let dst = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, total) };
    for chunk in dst.chunks_exact_mut(width) {
        chunk.copy_from_slice(&bytes[..width]);
    }
    Ok(())
}

/// A 2D memset to zero, with the driver's contract: `pitch` ≥ `row_bytes` when there is more than
/// one run; each run must lie in a live buffer.
fn zero_rows(ptr: u64, pitch: usize, row_bytes: usize, rows: usize) -> Result<()> {
    if rows == 0 || row_bytes == 0 {
        return Ok(());
    }
    if rows > 1 && pitch < row_bytes {
        return Err(Error::Cuda(format!(
            "emulator: 2D memset with pitch {pitch} below its width {row_bytes}"
        )));
    }
    for r in 0..rows {
        let start = r
            .checked_mul(pitch)
            .and_then(|o| ptr.checked_add(o as u64))
            .ok_or_else(|| Error::Cuda(format!("emulator: 2D memset row {r} overflows")))?;
        fill(start, 1, row_bytes, 0)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GEMMs: cuBLAS's column-major contract, applied to what gemm.rs hands to cuBLASLt.

fn load(dtype: DType, base: u64, i: usize) -> f64 {
    // SAFETY: callers checked the whole operand range.
    unsafe {
        match dtype {
            DType::BF16 => bf16::from_bits(*(base as *const u16).add(i)).to_f64(),
            DType::F16 => f16::from_bits(*(base as *const u16).add(i)).to_f64(),
            DType::F32 => *(base as *const f32).add(i) as f64,
            DType::F64 => *(base as *const f64).add(i),
        }
    }
}

fn store(dtype: DType, base: u64, i: usize, v: f64) {
    // The f32 accumulator is rounded to the storage dtype, as the GEMM epilogue does.
    let v = v as f32;
    // SAFETY: callers checked the whole output range.
    unsafe {
        match dtype {
            DType::BF16 => *(base as *mut u16).add(i) = bf16::from_f32(v).to_bits(),
            DType::F16 => *(base as *mut u16).add(i) = f16::from_f32(v).to_bits(),
            DType::F32 => *(base as *mut f32).add(i) = v,
            DType::F64 => *(base as *mut f64).add(i) = v as f64,
        }
    }
}

/// P (m x n, column-major, ld m) = op1(A1) op2(A2) + bias[i] on row i, where A1 is stored
/// column-major rows_1 x cols_1 with leading dimension ld_1 at `g.b` (cuBLAS's first operand is
/// the row-major B) and op transposes when asked; likewise A2 at `g.a`. Then cuBLASLt's epilogue:
/// D = P, gelu(P) (with P into the aux matrix, D's layout, for GELU_AUX) or gelu'(aux) ⊙ P (DGELU).
fn gemm(g: &Gemm) -> Result<()> {
    check_gemm_dtype(g)?;
    if g.m == 0 || g.n == 0 {
        return Ok(());
    }
    if g.k == 0 {
        return Err(Error::Unsupported("a matrix product with k = 0".into()));
    }
    let cm = col_major(g);
    let sz = g.dtype.size_in_bytes();
    // Byte extents without wrapping (a wrapped one could pass the range checks).
    let overflow = || Error::Cuda(format!("emulator: the extents of {g:?} overflow"));
    let extent = |rows: usize, cols: usize, ld: usize| {
        ld.checked_mul(cols - 1)
            .and_then(|x| x.checked_add(rows))
            .and_then(|x| x.checked_mul(sz))
            .ok_or_else(overflow)
    };
    let out_bytes = extent(cm.m, cm.n, cm.m)?;
    check_range(
        "GEMM operand A",
        g.b,
        extent(cm.rows_1, cm.cols_1, cm.ld_1)?,
    )?;
    check_range(
        "GEMM operand B",
        g.a,
        extent(cm.rows_2, cm.cols_2, cm.ld_2)?,
    )?;
    check_range("GEMM output", g.c, out_bytes)?;
    if let Some(b) = g.bias {
        check_range("GEMM bias", b, extent(cm.m, 1, cm.m)?)?;
    }
    let aux = match g.act {
        GemmAct::GeluAux { aux } | GemmAct::DGelu { aux } => {
            check_range("GEMM epilogue aux", aux, out_bytes)?;
            aux
        }
        GemmAct::None | GemmAct::Gelu => 0,
    };
    if matches!(g.act, GemmAct::DGelu { .. }) && g.bias.is_some() {
        return Err(Error::Unsupported(
            "a matrix product with a DGELU epilogue takes no bias".into(),
        ));
    }
    // op1(A1)[i, l] and op2(A2)[l, j] in column-major storage.
    let a1 = |i: usize, l: usize| {
        let (r, c) = if cm.trans_1 { (l, i) } else { (i, l) };
        load(g.dtype, g.b, r + c * cm.ld_1)
    };
    let a2 = |l: usize, j: usize| {
        let (r, c) = if cm.trans_2 { (j, l) } else { (l, j) };
        load(g.dtype, g.a, r + c * cm.ld_2)
    };
    let (op1_rows, op1_cols) = if cm.trans_1 {
        (cm.cols_1, cm.rows_1)
    } else {
        (cm.rows_1, cm.cols_1)
    };
    let (op2_rows, op2_cols) = if cm.trans_2 {
        (cm.cols_2, cm.rows_2)
    } else {
        (cm.rows_2, cm.cols_2)
    };
    if (op1_rows, op1_cols, op2_rows, op2_cols) != (cm.m, cm.k, cm.k, cm.n) {
        return Err(Error::Cuda(format!(
            "emulator: GEMM layouts do not chain: op(A) {op1_rows}x{op1_cols}, op(B) \
             {op2_rows}x{op2_cols}, C {}x{} (k {})",
            cm.m, cm.n, cm.k
        )));
    }
    let mut out = vec![0.0f64; cm.m * cm.n];
    for j in 0..cm.n {
        for i in 0..cm.m {
            let mut s = 0.0;
            for l in 0..cm.k {
                s += a1(i, l) * a2(l, j);
            }
            if let Some(b) = g.bias {
                s += load(g.dtype, b, i);
            }
            out[i + j * cm.m] = s;
        }
    }
    for (idx, p) in out.into_iter().enumerate() {
        // The epilogue sees the f32 accumulator.
        let p = p as f32 as f64;
        let d = match g.act {
            GemmAct::None => p,
            GemmAct::Gelu => gelu(p),
            GemmAct::GeluAux { .. } => {
                store(g.dtype, aux, idx, p);
                gelu(p)
            }
            GemmAct::DGelu { .. } => gelu_grad(load(g.dtype, aux, idx)) * p,
        };
        store(g.dtype, g.c, idx, d);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn buffer(v: &[f32]) -> HostBuffer {
        let b = HostBuffer::new(v.len() * 4).unwrap();
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        b.write(0, &bytes).unwrap();
        b
    }

    fn read(b: &HostBuffer, n: usize) -> Vec<f32> {
        let mut bytes = vec![0u8; n * 4];
        b.read(0, &mut bytes).unwrap();
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// The emulated GEMM (cuBLAS's column-major contract applied to gemm.rs's mapping) computes
    /// the row-major product the `Gemm` step documents, for every transpose pair, with and
    /// without bias.
    #[test]
    fn gemm_steps_compute_the_documented_row_major_product() {
        let mut r = rand::rngs::StdRng::seed_from_u64(7);
        let (m, n, k) = (5, 7, 3);
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                for with_bias in [false, true] {
                    let mut randv = |len: usize| -> Vec<f32> {
                        (0..len).map(|_| r.random_range(-1.0..1.0)).collect()
                    };
                    let (a, b, bias) = (randv(m * k), randv(k * n), randv(n));
                    let (ab, bb, biasb) = (buffer(&a), buffer(&b), buffer(&bias));
                    let c = HostBuffer::new(m * n * 4).unwrap();
                    let g = Gemm {
                        dtype: DType::F32,
                        m,
                        n,
                        k,
                        a: ab.ptr(),
                        trans_a,
                        b: bb.ptr(),
                        trans_b,
                        c: c.ptr(),
                        bias: with_bias.then(|| biasb.ptr()),
                        act: GemmAct::None,
                    };
                    gemm(&g).unwrap();
                    let got = read(&c, m * n);
                    for i in 0..m {
                        for j in 0..n {
                            let mut s = if with_bias { bias[j] as f64 } else { 0.0 };
                            for l in 0..k {
                                let av = if trans_a { a[l * m + i] } else { a[i * k + l] };
                                let bv = if trans_b { b[j * k + l] } else { b[l * n + j] };
                                s += av as f64 * bv as f64;
                            }
                            let e = (got[i * n + j] as f64 - s).abs();
                            assert!(e < 1e-6, "{trans_a} {trans_b} {with_bias} ({i},{j}): {e}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn steps_outside_live_buffers_are_errors() {
        let b = HostBuffer::new(100).unwrap();
        assert!(check_range("x", b.ptr(), 100).is_ok());
        assert!(check_range("x", b.ptr() + 1, 100).is_err());
        assert!(fill(b.ptr() + 96, 4, 2, 0).is_err());
        // The zero page is never a buffer.
        let e = check_range("x", 16, 1).unwrap_err().to_string();
        assert!(e.contains("not in any live buffer"), "{e}");
    }

    #[test]
    fn out_of_bounds_host_copies_are_errors_not_wraps() {
        let b = HostBuffer::new(16).unwrap();
        b.write(0, &[1; 16]).unwrap();
        b.write(15, &[2]).unwrap();
        // offset + len wraps past usize::MAX: without a checked sum it passed and wrote out of
        // bounds.
        assert!(b.write(usize::MAX, &[0, 0]).is_err());
        assert!(b.write(16, &[0]).is_err());
        let mut out = [0u8; 2];
        assert!(b.read(usize::MAX, &mut out).is_err());
        assert!(b.read(15, &mut out).is_err());
        b.read(14, &mut out).unwrap();
        assert_eq!(out, [1, 2]);
        // Sizes whose rounding to pages would wrap are errors, not panics or tiny mappings.
        for len in [usize::MAX, usize::MAX - 4095, isize::MAX as usize] {
            let e = HostBuffer::new(len).err().expect("no such mapping");
            assert!(e.to_string().contains("allocating"), "{e}");
        }
        // A range whose end passes u64::MAX does not wrap into a live buffer.
        assert!(check_range("x", b.ptr(), usize::MAX).is_err());
        assert!(check_range("x", u64::MAX - 1, 4).is_err());
        assert!(fill(b.ptr(), 4, usize::MAX / 2, 0).is_err());
    }

    #[test]
    fn f64_matrix_products_are_refused() {
        let b = HostBuffer::new(64).unwrap();
        let g = Gemm {
            dtype: DType::F64,
            m: 2,
            n: 2,
            k: 2,
            a: b.ptr(),
            trans_a: false,
            b: b.ptr(),
            trans_b: false,
            c: b.ptr(),
            bias: None,
            act: GemmAct::None,
        };
        let e = gemm(&g).unwrap_err();
        assert!(e.to_string().contains("f64"), "{e}");
    }

    #[test]
    fn fresh_buffers_are_poisoned() {
        let b = HostBuffer::new(12).unwrap();
        assert!(read(&b, 3).iter().all(|x| x.is_nan()));
    }
}
