//! The process-wide GPU handle: one device (ordinal 0 unless [`DEVICE_VAR`] or [`Gpu::select`] names
//! another), its default stream, the compiled kernel modules and the cuBLASLt state, created once on
//! first use. Absence of a driver, NVRTC or a device, and every driver failure, is an `Error` value,
//! never a panic.
//!
//! One device per process, as data-parallel training runs one process per GPU: a process launched for
//! GPU 3 (torchrun's `LOCAL_RANK=3`, say, with every GPU visible) sets `FLASHJVP_DEVICE=3`, or calls
//! `Gpu::select(3)` before any other GPU use, and flashjvp then works on device 3's primary context,
//! the one PyTorch's `torch.cuda.set_device(3)` uses, so device memory passes between the two.
//!
//! Only the default stream is used, so cudarc's per-allocation event tracking is switched off:
//! work is ordered by the stream, and allocations are freed stream-ordered.
//!
//! Kernel modules are compiled by NVRTC once per process and file (see [`super::nvrtc`]) and, to
//! spare the many short processes of a GPU session (each test binary, compute-sanitizer runs, the
//! benchmark) a compile each, cached on disk as CUBIN keyed by the hash of the sources, the
//! architecture and the NVRTC version: `$FLASHJVP_KERNEL_CACHE` (a directory, or `off`), else
//! `$XDG_CACHE_HOME/flashjvp`, else `$HOME/.cache/flashjvp`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::{self as dsys, CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, PushKernelArg};

use super::emulator::{Emulator, HostBuffer};
use super::gemm::Blas;
use super::launch::{Arg, Launch, Step};
use super::sources::SOURCES;
use super::{driver_present, nvrtc, nvrtc_present};
use crate::error::{Error, Result};

/// A cheap, clonable handle on the process's GPU (device 0, or the one [`DEVICE_VAR`] or
/// [`Gpu::select`] names).
#[derive(Clone)]
pub struct Gpu {
    inner: Arc<Inner>,
}

struct Inner {
    info: GpuInfo,
    backend: Backend,
}

/// A real GPU through the driver, or the CPU emulator of the kernels (`FLASHJVP_EMULATE=1`).
enum Backend {
    Cuda(Box<CudaState>),
    Emulated(Arc<Emulator>),
}

struct CudaState {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Loaded functions, with the dynamic shared memory limit already raised for them.
    functions: Mutex<HashMap<String, (CudaFunction, u32)>>,
    blas: Mutex<Option<Blas>>,
}

/// Device memory: a driver allocation, or host memory standing in for it under the emulator.
pub(crate) enum DeviceBuf {
    /// Freed by `DeviceBuf`'s drop, inside the context it belongs to.
    Cuda(std::mem::ManuallyDrop<CudaSlice<u8>>),
    Host(HostBuffer),
}

impl DeviceBuf {
    /// The device address of the first byte.
    pub(crate) fn ptr(&self) -> u64 {
        match self {
            DeviceBuf::Cuda(s) => {
                use cudarc::driver::DevicePtr;
                // No events are tracked (one stream), so the guard does nothing.
                let (p, _guard) = s.device_ptr(s.stream());
                p
            }
            DeviceBuf::Host(h) => h.ptr(),
        }
    }
}

impl Drop for DeviceBuf {
    /// cudarc frees a slice on its stream without binding the context first, and the legacy
    /// default stream (0) means the calling thread's current context: on a thread that never made
    /// it current (one that was only handed a tensor) the free would fail, leak, and leave its
    /// error for an unrelated later call. The slice's context is made current for the free, and
    /// the thread's own one (another library's, another device's) put back after it. Not through
    /// `bind_to_thread`, which would first take (and so hide) an error pending from earlier work.
    fn drop(&mut self) {
        use cudarc::driver::result::ctx;
        if let DeviceBuf::Cuda(s) = self {
            let want = s.stream().context().cu_ctx();
            let before = ctx::get_current().ok().flatten();
            let switch = before != Some(want);
            if switch {
                // SAFETY: `want` is the live context that owns the slice (the slice holds it).
                let _ = unsafe { ctx::set_current(want) };
            }
            // SAFETY: dropped once, here; the enum is never used after its drop.
            unsafe { std::mem::ManuallyDrop::drop(s) };
            if switch {
                // SAFETY: the thread's previous context (or none: null unbinds), as it was.
                let _ = unsafe { ctx::set_current(before.unwrap_or(std::ptr::null_mut())) };
            }
        }
    }
}

/// What `flashjvp info` reports about the GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// The device's ordinal as the driver counts them (after `CUDA_VISIBLE_DEVICES`); 0 under the
    /// emulator.
    pub ordinal: usize,
    /// How many CUDA devices the driver sees (1 under the emulator).
    pub device_count: usize,
    /// The driver's device name ("flashjvp kernel emulator (CPU)" under the emulator).
    pub name: String,
    /// NVRTC's architecture name for the device (sm_90a on Hopper).
    pub arch: String,
    /// Compute capability (major, minor); (8, 0), (8, 9) or (9, 0) under the emulator, after its arch.
    pub capability: (u32, u32),
    /// Device memory in bytes (a nominal 8 GiB under the emulator).
    pub total_mem_bytes: usize,
    /// Streaming multiprocessors (the host's CPU threads under the emulator).
    pub multiprocessors: u32,
    /// L2 cache in bytes (0 under the emulator).
    pub l2_bytes: usize,
    /// The most dynamic shared memory one block may ask for (after raising the limit).
    pub max_shared_per_block: usize,
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device {} of {}: {} ({}, compute capability {}.{}, {:.1} GiB, {} SMs, {} MiB L2, {} KiB shared memory per block)",
            self.ordinal,
            self.device_count,
            self.name,
            self.arch,
            self.capability.0,
            self.capability.1,
            self.total_mem_bytes as f64 / (1u64 << 30) as f64,
            self.multiprocessors,
            self.l2_bytes >> 20,
            self.max_shared_per_block >> 10
        )
    }
}

/// A driver error as an `Error::Cuda` saying what was being done.
pub(crate) fn cuda_err(
    what: impl std::fmt::Display,
) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e:?}"))
}

static GPU: OnceLock<std::result::Result<Gpu, Error>> = OnceLock::new();

/// The environment variable naming the process's CUDA device by ordinal (`FLASHJVP_DEVICE=3`; unset
/// or empty: 0). Read once, when the process's [`Gpu`] is created.
pub const DEVICE_VAR: &str = "FLASHJVP_DEVICE";

/// The device ordinal a value of [`DEVICE_VAR`] names: unset or empty means 0; anything but a
/// non-negative integer is an error naming the variable and the value.
pub fn device_ordinal(value: Option<&str>) -> Result<usize> {
    match value.map(str::trim) {
        None | Some("") => Ok(0),
        Some(v) => v.parse::<usize>().map_err(|_| {
            Error::Unsupported(format!(
                "{DEVICE_VAR}=`{v}`: expected a CUDA device ordinal (0, 1, ...)"
            ))
        }),
    }
}

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(true);

/// Sets whether the device-level entry points fill the outputs they allocate with NaN before the
/// kernels write them (on by default: an element a kernel misses then shows up as NaN instead of
/// stale memory; one memset per output). The benchmark replays plans and never pays for it.
pub fn set_poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::Relaxed);
}

/// Whether outputs are NaN-poisoned now (see [`set_poison_outputs`]; on unless switched off).
pub fn poison_outputs() -> bool {
    POISON_OUTPUTS.load(Ordering::Relaxed)
}

impl Gpu {
    /// The process's GPU, created on first use on the device [`DEVICE_VAR`] names (0 when it is
    /// unset). Errors (kept for the whole process): "no CUDA driver found", "NVRTC not found", no
    /// such device, or a driver failure.
    ///
    /// With `FLASHJVP_EMULATE=1` in the environment this is the CPU emulator of the kernels
    /// ([`super::emulator`]) instead, whether or not a GPU is there.
    pub fn get() -> Result<Gpu> {
        Self::process_gpu(None)
    }

    /// The process's GPU on device `ordinal`, created now if no GPU use came first (what
    /// [`DEVICE_VAR`] would have said is then not read). Once the process's GPU exists on
    /// another device this is an error: flashjvp drives one device per process, so call it before
    /// anything else touches the GPU (uploads, ops, [`Gpu::get`]).
    pub fn select(ordinal: usize) -> Result<Gpu> {
        let gpu = Self::process_gpu(Some(ordinal))?;
        match gpu.info().ordinal {
            o if o == ordinal => Ok(gpu),
            o => Err(Error::Unsupported(format!(
                "Gpu::select({ordinal}): this process's GPU is already device {o} (flashjvp drives \
                 one device per process; select the device before any other GPU use, or set \
                 {DEVICE_VAR}={ordinal})"
            ))),
        }
    }

    fn process_gpu(ordinal: Option<usize>) -> Result<Gpu> {
        match GPU.get_or_init(|| {
            let ordinal = match ordinal {
                Some(o) => o,
                None => device_ordinal(std::env::var(DEVICE_VAR).ok().as_deref())?,
            };
            if super::emulator::requested() {
                init_emulated(ordinal)
            } else {
                init(ordinal)
            }
        }) {
            Ok(g) => Ok(g.clone()),
            Err(e) => Err(clone_error(e)),
        }
    }

    /// The device's description, read once at creation.
    pub fn info(&self) -> &GpuInfo {
        &self.inner.info
    }

    /// NVRTC's architecture name the kernels are compiled for (`sm_80`, `sm_90a`, ...).
    pub fn arch(&self) -> &str {
        &self.inner.info.arch
    }

    /// Whether this is the CPU emulator of the kernels rather than a GPU.
    pub fn is_emulated(&self) -> bool {
        matches!(self.inner.backend, Backend::Emulated(_))
    }

    /// The driver state; an error under the emulator (which has no stream, events or cuBLAS).
    fn cuda(&self) -> Result<&CudaState> {
        match &self.inner.backend {
            Backend::Cuda(c) => Ok(c),
            Backend::Emulated(_) => Err(Error::Unsupported(
                "the kernel emulator has no CUDA stream, events or cuBLAS (timing needs a GPU)"
                    .into(),
            )),
        }
    }

    /// The stream every kernel runs on (an error under the emulator).
    pub fn stream(&self) -> Result<&Arc<CudaStream>> {
        Ok(&self.cuda()?.stream)
    }

    /// The driver context (an error under the emulator).
    pub fn context(&self) -> Result<&Arc<CudaContext>> {
        Ok(&self.cuda()?.ctx)
    }

    /// Makes the context current on the calling thread (needed before raw driver calls).
    pub(crate) fn bind(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Cuda(c) => c
                .ctx
                .bind_to_thread()
                .map_err(cuda_err("binding the CUDA context")),
            Backend::Emulated(_) => Ok(()),
        }
    }

    /// Waits for all queued work, then returns the device memory freed tensors left cached in the
    /// allocator's pool to the driver (the pool keeps freed memory for reuse, so another library
    /// in the process, PyTorch say, may find the GPU full until this is called). A no-op under the
    /// emulator.
    pub fn release_cached_memory(&self) -> Result<()> {
        let Backend::Cuda(c) = &self.inner.backend else {
            return Ok(());
        };
        self.synchronize()?;
        let Some(pool) = current_pool(&c.ctx) else {
            return Ok(()); // no pool, nothing cached
        };
        // SAFETY: a pool of this live context; trimming only releases unused memory.
        unsafe { dsys::cuMemPoolTrimTo(pool, 0) }
            .result()
            .map_err(cuda_err("releasing the memory pool's cached memory"))
    }

    /// Bytes of device memory the allocator's pool holds but no tensor uses (freed memory kept for
    /// reuse; see [`Gpu::release_cached_memory`]). 0 under the emulator and without a pool.
    pub fn cached_memory_bytes(&self) -> Result<u64> {
        let Backend::Cuda(c) = &self.inner.backend else {
            return Ok(0);
        };
        self.bind()?;
        let Some(pool) = current_pool(&c.ctx) else {
            return Ok(0);
        };
        use dsys::CUmemPool_attribute as A;
        let reserved = pool_attribute(pool, A::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?;
        let used = pool_attribute(pool, A::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
        Ok(reserved.saturating_sub(used))
    }

    /// Waits for all queued work; a kernel fault or other asynchronous error surfaces here.
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Cuda(c) => c
                .stream
                .synchronize()
                .map_err(cuda_err("waiting for the GPU (an earlier kernel failed)")),
            Backend::Emulated(_) => Ok(()),
        }
    }

    /// `bytes` bytes of uninitialised device memory (at least one byte is allocated).
    pub(crate) fn alloc_bytes(&self, bytes: usize) -> Result<DeviceBuf> {
        match &self.inner.backend {
            Backend::Cuda(_) => self
                .alloc_cuda_bytes(bytes)
                .map(|s| DeviceBuf::Cuda(std::mem::ManuallyDrop::new(s))),
            Backend::Emulated(_) => HostBuffer::new(bytes).map(DeviceBuf::Host),
        }
    }

    /// `bytes` bytes of driver-allocated device memory (an error under the emulator).
    pub(crate) fn alloc_cuda_bytes(&self, bytes: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: the memory is uninitialised; every user writes it (or poisons it) before reading.
        unsafe { self.cuda()?.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| {
            Error::Cuda(format!(
                "allocating {bytes} bytes on {}: {e:?}",
                self.inner.info.name
            ))
        })
    }

    /// Copies host bytes to `dst` (a device address of a live allocation of at least that size).
    pub(crate) fn copy_to_device(
        &self,
        buf: &mut DeviceBuf,
        offset: usize,
        bytes: &[u8],
    ) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        match buf {
            DeviceBuf::Cuda(s) => {
                let stream = &self.cuda()?.stream;
                let mut view = s.slice_mut(offset..offset + bytes.len());
                stream
                    .memcpy_htod(bytes, &mut view)
                    .map_err(cuda_err(format!(
                        "copying {} bytes to the GPU",
                        bytes.len()
                    )))
            }
            DeviceBuf::Host(h) => h.write(offset, bytes),
        }
    }

    /// Copies `out.len()` bytes from byte `offset` of `buf` to the host, waiting for the GPU.
    pub(crate) fn copy_to_host(
        &self,
        buf: &DeviceBuf,
        offset: usize,
        out: &mut [u8],
    ) -> Result<()> {
        if !out.is_empty() {
            match buf {
                DeviceBuf::Cuda(s) => {
                    let stream = &self.cuda()?.stream;
                    let view = s.slice(offset..offset + out.len());
                    stream.memcpy_dtoh(&view, out).map_err(cuda_err(format!(
                        "copying {} bytes from the GPU (an earlier kernel may have failed)",
                        out.len()
                    )))?;
                }
                DeviceBuf::Host(h) => h.read(offset, out)?,
            }
        }
        self.synchronize()
    }

    /// Compiles (or finds in the caches) every embedded kernel file, in parallel, and loads them.
    pub fn preload(&self) -> Result<()> {
        if self.is_emulated() {
            // The emulator's library was built and loaded when it was created.
            return Ok(());
        }
        let arch = self.arch().to_string();
        let files = nvrtc::kernel_files_for(&arch);
        let results: Vec<Result<Vec<u8>>> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .map(|f| {
                    let arch = arch.as_str();
                    s.spawn(move || cubin(f, arch))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Cuda("kernel compile thread panicked".into()))
                    })
                })
                .collect()
        });
        for r in results {
            r?;
        }
        for f in files {
            self.module(f)?;
        }
        Ok(())
    }

    fn module(&self, file: &'static str) -> Result<Arc<CudaModule>> {
        let cuda = self.cuda()?;
        let mut modules = cuda.modules.lock().expect("module cache lock");
        if let Some(m) = modules.get(file) {
            return Ok(m.clone());
        }
        let image = cubin(file, self.arch())?;
        let m = cuda
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image))
            .map_err(cuda_err(format!(
                "loading the {} module of {file} (was it compiled for this GPU?)",
                self.arch()
            )))?;
        modules.insert(file, m.clone());
        Ok(m)
    }

    /// The kernel `name` of `file`, with its dynamic shared memory limit raised to at least
    /// `shared_bytes` when that is above the default 48 KiB.
    fn function(&self, file: &'static str, name: &str, shared_bytes: u32) -> Result<CudaFunction> {
        let max = self.inner.info.max_shared_per_block;
        if shared_bytes as usize > max {
            return Err(Error::Unsupported(format!(
                "kernel {name} needs {shared_bytes} bytes of shared memory per block; {} ({}) allows \
                 {max} (a plan made for another device?)",
                self.inner.info.name,
                self.inner.info.arch
            )));
        }
        let cuda = self.cuda()?;
        let mut functions = cuda.functions.lock().expect("function cache lock");
        if let Some((f, set)) = functions.get_mut(name) {
            if shared_bytes > 48 * 1024 && shared_bytes > *set {
                raise_shared(f, name, shared_bytes)?;
                *set = shared_bytes;
            }
            return Ok(f.clone());
        }
        drop(functions);
        let module = self.module(file)?;
        let f = module
            .load_function(name)
            .map_err(cuda_err(format!("kernel {name} is not in {file}")))?;
        if super::attention_sm90::uses_register_pool(file, name) {
            // A register count the kernel's setmaxnreg moves cannot work with hangs the GPU.
            let regs = f
                .num_regs()
                .map_err(cuda_err(format!("the register count of {name}")))?;
            super::attention_sm90::check_register_pool(name, regs.max(0) as u32)?;
        }
        let mut set = 48 * 1024;
        if shared_bytes > set {
            raise_shared(&f, name, shared_bytes)?;
            set = shared_bytes;
        }
        cuda.functions
            .lock()
            .expect("function cache lock")
            .insert(name.to_string(), (f.clone(), set));
        Ok(f)
    }

    /// Queues the steps of a plan, in order, on the stream (asynchronously: errors inside kernels
    /// surface at the next synchronisation). With `FLASHJVP_SYNC_STEPS=1` every step is waited
    /// for and a fault is reported by the step that caused it, naming its kernel (diagnosis: a
    /// fault otherwise surfaces at a later download, under that copy's name). A plan whose
    /// attention tiles were made for another kind of device (`attention::plan_jvp_on` with another
    /// arch's shared memory) is refused before any step runs.
    pub fn run(&self, steps: &[Step]) -> Result<()> {
        check_archs(self.arch(), steps)?;
        let cuda = match &self.inner.backend {
            Backend::Cuda(c) => c,
            Backend::Emulated(e) => return e.run(steps),
        };
        self.bind()?;
        self.run_steps(cuda, &cuda.stream, steps)
    }

    /// [`Gpu::run`] on a stream another library owns (a framework's current stream: PyTorch's
    /// `torch.cuda.current_stream().cuda_stream`, a cudarc stream's `cu_stream()`), given as its
    /// raw `CUstream` handle. The steps are ordered after everything flashjvp queued before on any
    /// stream, and everything flashjvp queues later comes after them (an event each way), so device
    /// memory flashjvp allocated, uploads and downloads, and the cuBLASLt workspace need no more
    /// synchronisation than the stream's own order; work of the stream's owner is ordered by that
    /// stream as usual. Under the kernel emulator, which has no streams, the steps run at once.
    ///
    /// # Safety
    ///
    /// `stream` must be a live stream of this device's primary context (the context PyTorch and
    /// cudarc use on that device), or 0 for the legacy default stream; it need only outlive this
    /// call.
    pub unsafe fn run_on_stream(&self, steps: &[Step], stream: u64) -> Result<()> {
        check_archs(self.arch(), steps)?;
        let cuda = match &self.inner.backend {
            Backend::Cuda(c) => c,
            Backend::Emulated(e) => return e.run(steps),
        };
        self.bind()?;
        // SAFETY: the caller vouches for the handle (a live stream of this context, or 0); the
        // wrapper borrows it and never destroys it.
        let theirs = unsafe { cuda.ctx.wrap_borrowed_stream(stream as dsys::CUstream) };
        theirs.join(&cuda.stream).map_err(cuda_err(
            "ordering the given stream after flashjvp's earlier work",
        ))?;
        let ran = self.run_steps(cuda, &theirs, steps);
        // Even after a failed step: what was queued there comes before flashjvp's later work.
        cuda.stream.join(&theirs).map_err(cuda_err(
            "ordering flashjvp's later work after the given stream",
        ))?;
        ran
    }

    /// Queues `steps` on `stream` (the Gpu's own, or one given to [`Gpu::run_on_stream`]).
    pub(crate) fn run_on(&self, stream: &CudaStream, steps: &[Step]) -> Result<()> {
        check_archs(self.arch(), steps)?;
        let cuda = match &self.inner.backend {
            Backend::Cuda(c) => c,
            Backend::Emulated(e) => return e.run(steps),
        };
        self.run_steps(cuda, stream, steps)
    }

    fn run_steps(&self, cuda: &CudaState, stream: &CudaStream, steps: &[Step]) -> Result<()> {
        static SYNC_STEPS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let sync_steps = *SYNC_STEPS
            .get_or_init(|| std::env::var("FLASHJVP_SYNC_STEPS").is_ok_and(|v| v == "1"));
        for step in steps {
            self.run_one(cuda, stream, step)?;
            if sync_steps {
                stream.synchronize().map_err(cuda_err(format!(
                    "FLASHJVP_SYNC_STEPS: an error surfaced after {} (in it, unless an earlier \
                     asynchronous call failed)",
                    step_name(step)
                )))?;
            }
        }
        Ok(())
    }

    fn run_one(&self, cuda: &CudaState, stream: &CudaStream, step: &Step) -> Result<()> {
        match step {
            Step::Kernel(l) => self.launch(stream, l)?,
            Step::Gemm(g) => {
                let mut blas = cuda.blas.lock().expect("cuBLAS lock");
                if blas.is_none() {
                    *blas = Some(Blas::new(self)?);
                    // Its workspace was allocated on the Gpu's stream; this product may run on
                    // another (run_on_stream).
                    stream
                        .join(&cuda.stream)
                        .map_err(cuda_err("ordering a product after its workspace"))?;
                }
                blas.as_mut()
                    .expect("created above")
                    .gemm(self, stream, g)?;
            }
            Step::Fill {
                ptr,
                width,
                count,
                bits,
            } => fill(stream, *ptr, *width, *count, *bits)?,
            Step::ZeroRows {
                ptr,
                pitch,
                row_bytes,
                rows,
            } => {
                if *rows > 0 && *row_bytes > 0 {
                    // SAFETY: the plan builder put every run inside a live allocation (the
                    // strided gradient whose padding rows these are).
                    unsafe {
                        dsys::cuMemsetD2D8Async(
                            *ptr,
                            *pitch,
                            0,
                            *row_bytes,
                            *rows,
                            stream.cu_stream(),
                        )
                    }
                    .result()
                    .map_err(cuda_err(format!(
                        "zeroing {rows} runs of {row_bytes} bytes, {pitch} bytes apart"
                    )))?;
                }
            }
            Step::Copy { src, dst, bytes } => {
                if *bytes > 0 {
                    // SAFETY: both ranges lie in live allocations of at least `bytes` bytes.
                    unsafe { dsys::cuMemcpyDtoDAsync_v2(*dst, *src, *bytes, stream.cu_stream()) }
                        .result()
                        .map_err(cuda_err(format!("copying {bytes} bytes on the GPU")))?;
                }
            }
        }
        Ok(())
    }

    fn launch(&self, stream: &CudaStream, l: &Launch) -> Result<()> {
        let f = self.function(l.file, &l.kernel, l.shared_bytes)?;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: l.grid,
            block_dim: l.block,
            shared_mem_bytes: l.shared_bytes,
        };
        // Tensor maps are encoded first (each must outlive the launch call that reads it).
        let maps = l
            .args
            .iter()
            .filter_map(|a| match a {
                Arg::TensorMap(d) => Some(super::attention_sm90::encode_tensor_map(d)),
                _ => None,
            })
            .collect::<Result<Vec<_>>>()?;
        let mut next_map = maps.iter();
        let mut b = stream.launch_builder(&f);
        for a in &l.args {
            match a {
                Arg::Ptr(p) => {
                    b.arg(p);
                }
                Arg::I32(v) => {
                    b.arg(v);
                }
                Arg::I64(v) => {
                    b.arg(v);
                }
                Arg::F32(v) => {
                    b.arg(v);
                }
                Arg::TensorMap(_) => {
                    b.arg(
                        next_map
                            .next()
                            .expect("one encoded map per TensorMap argument"),
                    );
                }
            }
        }
        // SAFETY: the plan builders checked shapes, pointers and the argument list against the
        // kernel's signature (tests compare every plan with the PTX parameter lists).
        unsafe { b.launch(cfg) }
            .map_err(cuda_err(format!("launching {} with {cfg:?}", l.kernel)))?;
        Ok(())
    }

    /// A timing event (with timing enabled).
    pub fn event(&self) -> Result<cudarc::driver::CudaEvent> {
        self.cuda()?
            .ctx
            .new_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("creating an event"))
    }
}

/// What a step is, for an error message.
fn step_name(step: &Step) -> String {
    match step {
        Step::Kernel(l) => format!(
            "kernel {} (grid {:?}, block {:?})",
            l.kernel, l.grid, l.block
        ),
        Step::Gemm(g) => format!("a {} matrix product {}x{}x{}", g.dtype, g.m, g.n, g.k),
        Step::Fill { count, .. } => format!("a fill of {count} elements"),
        Step::Copy { bytes, .. } => format!("a device copy of {bytes} bytes"),
        Step::ZeroRows {
            rows, row_bytes, ..
        } => format!("zeroing {rows} runs of {row_bytes} bytes"),
    }
}

fn raise_shared(f: &CudaFunction, name: &str, bytes: u32) -> Result<()> {
    f.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map_err(cuda_err(format!(
        "raising the shared memory limit of {name} to {bytes} bytes"
    )))
}

/// A memset of `count` elements of `width` bytes to `bits`, queued on `stream`.
fn fill(stream: &CudaStream, ptr: u64, width: usize, count: usize, bits: u32) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let s = stream.cu_stream();
    // SAFETY: the pointer and count come from a live allocation of at least count * width bytes.
    let r = unsafe {
        match width {
            1 => dsys::cuMemsetD8Async(ptr, bits as u8, count, s),
            2 => dsys::cuMemsetD16Async(ptr, bits as u16, count, s),
            4 => dsys::cuMemsetD32Async(ptr, bits, count, s),
            _ => return Err(Error::Cuda(format!("memset of width {width}"))),
        }
    };
    r.result()
        .map_err(cuda_err(format!("filling {count} x {width} bytes")))
}

/// Refuses a plan whose attention launches were made for another kind of device (see
/// [`Launch::check_arch`]) before any step runs.
fn check_archs(arch: &str, steps: &[Step]) -> Result<()> {
    for step in steps {
        if let Step::Kernel(l) = step {
            l.check_arch(arch)?;
        }
    }
    Ok(())
}

fn clone_error(e: &Error) -> Error {
    match e {
        Error::Unsupported(m) => Error::Unsupported(m.clone()),
        other => Error::Cuda(other.to_string().trim_start_matches("CUDA: ").to_string()),
    }
}

fn init(ordinal: usize) -> std::result::Result<Gpu, Error> {
    if !driver_present() {
        return Err(Error::Unsupported(
            "no CUDA driver found (libcuda.so could not be loaded)".into(),
        ));
    }
    if !nvrtc_present() {
        return Err(Error::Unsupported(
            "NVRTC not found (libnvrtc.so.13 could not be loaded; put it on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    // cudarc panics on a symbol an old driver lacks; keep that an error too.
    std::panic::catch_unwind(|| init_device(ordinal))
        .unwrap_or_else(|_| Err(Error::Cuda("the CUDA driver library is unusable".into())))
}

fn init_device(ordinal: usize) -> std::result::Result<Gpu, Error> {
    let count = CudaContext::device_count().map_err(cuda_err("no usable CUDA device"))?;
    if count < 1 {
        return Err(Error::Cuda("no CUDA device found".into()));
    }
    if ordinal >= count as usize {
        return Err(Error::Cuda(format!(
            "CUDA device {ordinal} asked for ({DEVICE_VAR} or Gpu::select), but the driver sees \
             {count} (ordinals 0 to {}; CUDA_VISIBLE_DEVICES renumbers them)",
            count - 1
        )));
    }
    let ctx = CudaContext::new(ordinal).map_err(cuda_err(format!(
        "creating a context on CUDA device {ordinal}"
    )))?;
    // SAFETY: only the default stream is ever used, so no cross-stream synchronisation is needed.
    unsafe { ctx.disable_event_tracking() };
    keep_freed_memory(&ctx);
    let stream = ctx.default_stream();
    let attr = |a: CUdevice_attribute| {
        ctx.attribute(a)
            .map_err(cuda_err(format!("reading device attribute {a:?}")))
    };
    let (major, minor) = ctx
        .compute_capability()
        .map_err(cuda_err("reading the compute capability"))?;
    if major < 8 {
        return Err(Error::Unsupported(format!(
            "CUDA device {ordinal} has compute capability {major}.{minor}; the kernels need 8.0 or newer"
        )));
    }
    let info = GpuInfo {
        ordinal,
        device_count: count as usize,
        name: ctx.name().map_err(cuda_err("reading the device name"))?,
        arch: nvrtc::arch_for_capability(major as u32, minor as u32),
        capability: (major as u32, minor as u32),
        total_mem_bytes: ctx
            .total_mem()
            .map_err(cuda_err("reading the memory size"))?,
        multiprocessors: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32,
        l2_bytes: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)? as usize,
        max_shared_per_block: attr(
            CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )? as usize,
    };
    Ok(Gpu {
        inner: Arc::new(Inner {
            info,
            backend: Backend::Cuda(Box::new(CudaState {
                ctx,
                stream,
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
                blas: Mutex::new(None),
            })),
        }),
    })
}

/// The device's current memory pool, where cudarc's stream-ordered allocations come from (None
/// on a device without pools, where cudarc allocates and frees synchronously: nothing is cached).
fn current_pool(ctx: &CudaContext) -> Option<dsys::CUmemoryPool> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer and the device ordinal comes from a live context.
    let r = unsafe { dsys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) };
    (r == dsys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
}

/// A u64 attribute of a memory pool.
fn pool_attribute(pool: dsys::CUmemoryPool, attr: dsys::CUmemPool_attribute) -> Result<u64> {
    let mut v = 0u64;
    // SAFETY: the byte-count attributes are u64s written through the pointer.
    unsafe { dsys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void) }
        .result()
        .map_err(cuda_err(format!("reading memory pool attribute {attr:?}")))?;
    Ok(v)
}

/// The default pool hands freed memory back to the driver at every synchronisation (release
/// threshold 0), so a training step that frees and allocates gigabytes maps them afresh each time.
/// Kept in the pool instead, as PyTorch's caching allocator keeps its own;
/// [`Gpu::release_cached_memory`] hands it back. Best effort: a failure costs speed only.
fn keep_freed_memory(ctx: &CudaContext) {
    if let Some(pool) = current_pool(ctx) {
        let mut keep = u64::MAX;
        // SAFETY: the release threshold attribute takes a pointer to a u64.
        let _ = unsafe {
            dsys::cuMemPoolSetAttribute(
                pool,
                dsys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut std::ffi::c_void,
            )
        };
    }
}

/// The CPU emulator as the process's "GPU", with the shared memory an H100 allows per block: it
/// claims sm_80 (the sm_80 kernels run), or sm_90a with `FLASHJVP_EMULATE=sm_90a` (the Hopper
/// attention kernels run where they apply), or sm_89 with `FLASHJVP_EMULATE=sm_89` and the 99 KiB
/// an RTX 4090 or L40S allows (the sm_80 kernels with their shorter key tiles there).
fn init_emulated(ordinal: usize) -> std::result::Result<Gpu, Error> {
    if ordinal != 0 {
        return Err(Error::Unsupported(format!(
            "the kernel emulator (FLASHJVP_EMULATE) is one device, ordinal 0; device {ordinal} was \
             asked for ({DEVICE_VAR} or Gpu::select)"
        )));
    }
    let emu = Emulator::get()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arch = super::emulator::arch();
    let info = GpuInfo {
        ordinal: 0,
        device_count: 1,
        name: "flashjvp kernel emulator (CPU)".into(),
        arch: arch.into(),
        capability: match arch {
            "sm_90a" => (9, 0),
            "sm_89" => (8, 9),
            _ => (8, 0),
        },
        total_mem_bytes: 8 << 30,
        multiprocessors: cpus as u32,
        l2_bytes: 0,
        max_shared_per_block: if super::attention::small_shared_memory(arch) {
            super::attention::SMALL_SHARED_BYTES
        } else {
            232448
        },
    };
    Ok(Gpu {
        inner: Arc::new(Inner {
            info,
            backend: Backend::Emulated(emu),
        }),
    })
}

/// Whether a usable GPU is there (driver, NVRTC, a device of compute capability 8.0 or newer).
/// Never panics.
pub fn gpu_available() -> bool {
    Gpu::get().is_ok()
}

/// For tests that compile kernels (no GPU needed): whether NVRTC can be loaded; `false` after
/// printing "skipped: no NVRTC", unless the environment sets FLASHJVP_REQUIRE_NVRTC (CI does), where
/// a missing NVRTC fails the test.
pub fn nvrtc_or_skip() -> bool {
    if super::nvrtc_present() {
        return true;
    }
    assert!(
        std::env::var("FLASHJVP_REQUIRE_NVRTC").is_err(),
        "FLASHJVP_REQUIRE_NVRTC is set but NVRTC cannot be loaded"
    );
    println!("skipped: no NVRTC");
    false
}

/// For GPU tests: the GPU, or `None` after printing "skipped: no CUDA device" — unless the
/// environment sets FLASHJVP_REQUIRE_GPU=1 (the GPU machine's run.sh does), where a missing GPU
/// fails the test.
///
/// The first call also compiles (or loads from the caches) every kernel file, in parallel; a
/// kernel that fails to compile or load on a present GPU fails the test.
pub fn require_gpu_or_skip() -> Option<Gpu> {
    static PRELOAD: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    match Gpu::get() {
        Ok(g) => {
            if let Err(e) = PRELOAD.get_or_init(|| g.preload().map_err(|e| e.to_string())) {
                panic!("the GPU is there but the kernels did not load: {e}");
            }
            Some(g)
        }
        Err(e) => {
            let required = std::env::var("FLASHJVP_REQUIRE_GPU")
                .map(|v| !v.is_empty() && v != "0")
                .unwrap_or(false);
            if required {
                panic!("FLASHJVP_REQUIRE_GPU is set but no GPU is usable: {e}");
            }
            // Written past the test harness's capture so that the skip is visible.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "skipped: no CUDA device\n  ({e})");
            None
        }
    }
}

/// FNV-1a, continued from `h`.
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

fn nvrtc_version() -> (i32, i32) {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (probed at init) and both pointers are valid.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (major, minor)
}

pub(crate) fn cache_dir() -> Option<PathBuf> {
    match std::env::var_os("FLASHJVP_KERNEL_CACHE") {
        Some(v) if v == "off" => return None,
        Some(v) if !v.is_empty() => return Some(PathBuf::from(v)),
        _ => {}
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("flashjvp"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("flashjvp"))
}

/// The CUBIN of one kernel file for `arch`: from the disk cache, else compiled by NVRTC (and then
/// written to the disk cache; a cache that cannot be written is skipped silently).
fn cubin(file: &str, arch: &str) -> Result<Vec<u8>> {
    let source = nvrtc::source_text(file)?;
    let (major, minor) = nvrtc_version();
    let mut h = fnv(0xcbf29ce484222325, source.as_bytes());
    for (name, text) in SOURCES.iter().filter(|(n, _)| n.ends_with(".cuh")) {
        h = fnv(h, name.as_bytes());
        h = fnv(h, text.as_bytes());
    }
    h = fnv(h, format!("{arch} nvrtc {major}.{minor}").as_bytes());
    // The compile options live in nvrtc.rs: a change there must not reuse old binaries.
    h = fnv(h, include_str!("nvrtc.rs").as_bytes());
    let stem = file.trim_end_matches(".cu");
    let path = cache_dir().map(|d| d.join(format!("{stem}-{arch}-{h:016x}.cubin")));
    if let Some(p) = &path {
        if let Ok(bytes) = std::fs::read(p) {
            if !bytes.is_empty() {
                return Ok(bytes);
            }
        }
    }
    let compiled = nvrtc::compile(file, arch)?;
    if let Some(p) = &path {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &compiled.cubin).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(compiled.cubin.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_gpu_is_an_error_not_a_panic() {
        // On a machine without a GPU this is an error naming what is missing; with one it works.
        match Gpu::get() {
            Ok(g) => assert!(g.arch().starts_with("sm_")),
            Err(e) => {
                let m = e.to_string();
                assert!(
                    m.contains("CUDA") || m.contains("NVRTC") || m.contains("compute capability"),
                    "{m}"
                );
            }
        }
        let _ = gpu_available();
    }

    #[test]
    fn the_device_variable_takes_an_ordinal_or_nothing() {
        assert_eq!(device_ordinal(None).unwrap(), 0);
        assert_eq!(device_ordinal(Some("")).unwrap(), 0);
        assert_eq!(device_ordinal(Some("3")).unwrap(), 3);
        assert_eq!(device_ordinal(Some(" 1 ")).unwrap(), 1);
        for bad in ["-1", "cuda:1", "one", "1.5"] {
            let m = device_ordinal(Some(bad)).unwrap_err().to_string();
            assert!(m.contains(DEVICE_VAR) && m.contains(bad), "{m}");
        }
    }

    #[test]
    fn select_keeps_the_process_on_one_device() {
        // Only once the process's GPU exists: a select that created it on a device that is not
        // there would leave every other test of this binary without a GPU.
        let Ok(g) = Gpu::get() else { return };
        let o = g.info().ordinal;
        assert!(o < g.info().device_count, "{}", g.info());
        assert_eq!(Gpu::select(o).unwrap().info().ordinal, o);
        let m = Gpu::select(o + 1)
            .err()
            .expect("another device")
            .to_string();
        assert!(m.contains(&format!("already device {o}")), "{m}");
    }
}
