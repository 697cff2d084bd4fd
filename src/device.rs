//! Where an op runs. The CPU is always there; CUDA is chosen at run time when a usable GPU exists.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda,
}

/// What the user asked for on the command line: `auto` means the GPU when one is usable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceRequest {
    Auto,
    Cpu,
    Cuda,
}

impl DeviceRequest {
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

    /// The device to run on. The CUDA backend is not in this build yet, so `cuda` is an error and
    /// `auto` falls back to the CPU.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceRequest::Cpu | DeviceRequest::Auto => Ok(Device::Cpu),
            DeviceRequest::Cuda => Err(Error::Unsupported(
                "--device cuda: the CUDA backend is not part of this build yet; use --device cpu"
                    .into(),
            )),
        }
    }
}
