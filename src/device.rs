//! Where an op runs. The CPU is always there; CUDA is chosen at run time when a usable GPU exists.

use crate::error::{Error, Result};

/// The device an op runs on, once a [`DeviceRequest`] is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU reference ops (f32/f64).
    Cpu,
    /// The CUDA backend on the process's GPU (bf16/f16/f32): device 0, or the one `FLASHJVP_DEVICE`
    /// names.
    Cuda,
}

/// What the user asked for on the command line: `auto` means the GPU when one is usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The GPU when one is usable, else the CPU.
    Auto,
    /// The CPU, even with a GPU present.
    Cpu,
    /// The GPU, or an error saying why it cannot be used.
    Cuda,
}

impl DeviceRequest {
    /// `auto`, `cpu`, or `cuda` (also `gpu`); anything else is an error naming the value.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" | "gpu" => Ok(DeviceRequest::Cuda),
            other => Err(Error::Unsupported(format!(
                "unknown device `{other}`: expected auto, cpu or cuda"
            ))),
        }
    }

    /// The device to run on: `cuda` needs a usable GPU (else an error saying why), `auto` takes
    /// the GPU when one is usable and the CPU otherwise.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceRequest::Cpu => Ok(Device::Cpu),
            DeviceRequest::Auto => Ok(if cuda_usable().is_ok() {
                Device::Cuda
            } else {
                Device::Cpu
            }),
            DeviceRequest::Cuda => cuda_usable().map(|_| Device::Cuda),
        }
    }
}

/// Ok when the CUDA backend is built in and a GPU is usable; else why not (one line).
pub fn cuda_usable() -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::Gpu::get()
            .map(|_| ())
            .map_err(|e| Error::Unsupported(format!("--device cuda: no usable GPU: {e}")))
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(cuda_not_built())
    }
}

/// The answer to a request for the GPU in a build without the `cuda` feature.
pub fn cuda_not_built() -> Error {
    Error::Unsupported(
        "--device cuda: this build has no CUDA backend (built without the `cuda` feature); use \
         --device cpu"
            .into(),
    )
}

/// Which CUDA libraries the dynamic loader can find on this machine (the driver for running
/// kernels, NVRTC for compiling them). `None` means not found under any of the names tried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaProbe {
    /// The soname that opened, e.g. `libcuda.so.1`.
    pub driver: Option<&'static str>,
    /// The NVRTC soname that opened, e.g. `libnvrtc.so.13`.
    pub nvrtc: Option<&'static str>,
}

/// Sonames tried in order: the versioned name a driver or wheel installs first, the bare
/// development symlink second.
pub const CUDA_DRIVER_NAMES: &[&str] = &["libcuda.so.1", "libcuda.so"];
/// NVRTC's sonames, tried in order (13.x: the version the kernels are built for).
pub const NVRTC_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so"];

/// Looks for the CUDA driver and NVRTC with dlopen. Never panics: a missing library is `None`.
/// cudarc panics when libcuda is missing, so the CUDA backend asks this first.
pub fn probe_cuda_libraries() -> CudaProbe {
    CudaProbe {
        driver: first_loadable(CUDA_DRIVER_NAMES),
        nvrtc: first_loadable(NVRTC_NAMES),
    }
}

fn first_loadable(names: &[&'static str]) -> Option<&'static str> {
    names.iter().copied().find(|name| {
        // SAFETY: loading runs the library's initialisers; the CUDA driver and NVRTC are
        // well-behaved system libraries, and the handle is closed again at once.
        unsafe { libloading::Library::new(*name) }.is_ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_never_panics_and_finds_only_listed_names() {
        let p = probe_cuda_libraries();
        assert!(p.driver.is_none_or(|n| CUDA_DRIVER_NAMES.contains(&n)));
        assert!(p.nvrtc.is_none_or(|n| NVRTC_NAMES.contains(&n)));
        // A library that exists on every glibc system opens through the same path.
        assert_eq!(
            first_loadable(&["libnot-a-library.so.9", "libc.so.6"]),
            Some("libc.so.6")
        );
        assert_eq!(first_loadable(&["libnot-a-library.so.9"]), None);
    }
}
