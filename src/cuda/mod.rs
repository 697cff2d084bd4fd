//! The CUDA backend. Libraries (driver, NVRTC, cuBLASLt) are loaded at run time through cudarc, so
//! the crate builds and runs without a CUDA toolkit; kernels are compiled by NVRTC from the sources
//! embedded at build time (see build.rs and cuda/).
//!
//! cudarc panics when it calls into a library that is missing, so every entry point here probes
//! first and turns absence into an `Error`.

pub mod nvrtc;

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
