//! The CUDA backend. Libraries (driver, NVRTC, cuBLASLt) are loaded at run time through cudarc, so
//! the crate builds and runs without a CUDA toolkit; kernels are compiled by NVRTC from the sources
//! embedded at build time (see build.rs and cuda/).
//!
//! cudarc panics when it calls into a library that is missing, so every entry point here probes
//! first and turns absence into an `Error`.
//!
//! Layers, bottom up:
//! - [`context`]: the process-wide [`Gpu`] (device 0 or the one `FLASHJVP_DEVICE` names, its stream,
//!   compiled modules, cuBLASLt) and
//!   the executor of launch plans.
//! - [`launch`]: a launch plan is a list of [`launch::Step`]s (kernel launches with typed
//!   arguments, GEMMs, memsets) built by pure functions from device pointers and sizes, so that
//!   every argument list can be checked against the kernels' PTX signatures without a GPU.
//! - [`tensor`]: [`DeviceTensor`], upload/download of host [`crate::Tensor`]s, NaN poisoning.
//! - One file per op family, mirroring cuda/: [`attention`], [`layernorm`], [`elementwise`],
//!   [`mlp`] (GEMMs in [`gemm`]): shape checks, plans and device-resident entry points.
//! - [`ops`]: host-level entry points (host tensors in, host tensors out) for the CLI and tests.
//! - [`bench`](mod@bench): CUDA-event timings of forward, JVP and backward.

pub mod attention;
pub mod attention_sm90;
pub mod bench;
pub mod bench_dit;
pub mod context;
pub mod dit;
pub mod elementwise;
pub mod emulator;
pub mod gemm;
pub mod launch;
pub mod layernorm;
pub mod mlp;
pub mod nvrtc;
pub mod ops;
pub mod rmsnorm;
pub mod rope;
pub mod tensor;

pub use context::{gpu_available, nvrtc_or_skip, require_gpu_or_skip, Gpu, GpuInfo, DEVICE_VAR};
pub use tensor::DeviceTensor;

/// The kernel sources and headers under cuda/, embedded by build.rs.
pub mod sources {
    include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));
}

/// Whether libcuda can be loaded (never panics).
pub fn driver_present() -> bool {
    // SAFETY: only dlopens candidate library names; no symbol is called.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether libnvrtc can be loaded (never panics).
pub fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Whether libcublasLt can be loaded (never panics).
pub fn cublaslt_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::cublaslt::sys::is_culib_present() }
}

/// Whether libcublas can be loaded (never panics).
pub fn cublas_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}
