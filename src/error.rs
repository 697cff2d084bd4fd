//! The one error type of flashjvp. Every message names the op, the tensor and what was expected,
//! so that a caller (or the CLI) can print it as one line and stop.

use crate::tensor::DType;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: tensor `{tensor}` has shape {actual:?}, expected {expected}")]
    Shape {
        op: &'static str,
        tensor: String,
        expected: String,
        actual: Vec<usize>,
    },
    #[error("{op}: tensor `{tensor}` has rank {} (shape {actual:?}), expected rank {expected}", actual.len())]
    Rank {
        op: &'static str,
        tensor: String,
        expected: usize,
        actual: Vec<usize>,
    },
    #[error("{op}: tensor `{tensor}` has dtype {actual}, expected {expected}")]
    DType {
        op: &'static str,
        tensor: String,
        expected: String,
        actual: DType,
    },
    #[error(
        "{op}: the tangent of `{tensor}` has shape {tangent_shape:?} ({tangent_dtype}) but its primal has shape {primal_shape:?} ({primal_dtype})"
    )]
    TangentMismatch {
        op: &'static str,
        tensor: String,
        primal_shape: Vec<usize>,
        primal_dtype: DType,
        tangent_shape: Vec<usize>,
        tangent_dtype: DType,
    },
    /// A value that is out of its domain (a non-finite scale, an empty dimension, ...).
    #[error("{op}: {message}")]
    Invalid { op: &'static str, message: String },
    /// Something this build or this machine cannot do (no CUDA driver, an unsupported head dim ...).
    #[error("{0}")]
    Unsupported(String),
    /// A failure inside the CUDA driver, NVRTC or cuBLAS.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A file that could not be read or written.
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// A file that was read but is not what it should be (a malformed safetensors header ...).
    #[error("{path}: {message}")]
    Format { path: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn invalid(op: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            message: message.into(),
        }
    }
}
