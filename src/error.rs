//! The one error type of flashjvp. Every message names the op, the tensor and what was expected,
//! so that a caller (or the CLI) can print it as one line and stop.

use crate::tensor::DType;

/// Every failure of the crate, as a value: bad shapes or dtypes, values out of their domain,
/// what this build or machine cannot do, CUDA failures and file errors. Its `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor whose shape does not fit the op.
    #[error("{op}: tensor `{tensor}` has shape {actual:?}, expected {expected}")]
    Shape {
        /// The op that checked.
        op: &'static str,
        /// The tensor's name in the op's signature (`q`, `x`, `w1` ...).
        tensor: String,
        /// The expected shape, in words or with the sizes implied by the other tensors.
        expected: String,
        /// The shape given.
        actual: Vec<usize>,
    },
    #[error("{op}: tensor `{tensor}` has rank {} (shape {actual:?}), expected rank {expected}", actual.len())]
    /// A tensor with the wrong number of dimensions.
    Rank {
        /// The op that checked.
        op: &'static str,
        /// The tensor's name in the op's signature.
        tensor: String,
        /// The rank the op needs.
        expected: usize,
        /// The shape given (its length is the rank).
        actual: Vec<usize>,
    },
    #[error("{op}: tensor `{tensor}` has dtype {actual}, expected {expected}")]
    /// A tensor in a dtype the op does not take here.
    DType {
        /// The op that checked.
        op: &'static str,
        /// The tensor's name in the op's signature.
        tensor: String,
        /// The dtype(s) accepted, in words.
        expected: String,
        /// The dtype given.
        actual: DType,
    },
    #[error(
        "{op}: the tangent of `{tensor}` has shape {tangent_shape:?} ({tangent_dtype}) but its primal has shape {primal_shape:?} ({primal_dtype})"
    )]
    /// A dual tensor whose tangent differs from its primal in shape or dtype.
    TangentMismatch {
        /// The op that checked.
        op: &'static str,
        /// The dual tensor's name in the op's signature.
        tensor: String,
        /// The primal's shape.
        primal_shape: Vec<usize>,
        /// The primal's dtype.
        primal_dtype: DType,
        /// The tangent's shape.
        tangent_shape: Vec<usize>,
        /// The tangent's dtype.
        tangent_dtype: DType,
    },
    /// A value that is out of its domain (a non-finite scale, an empty dimension, ...).
    #[error("{op}: {message}")]
    Invalid {
        /// The op that checked.
        op: &'static str,
        /// What is wrong, naming the value.
        message: String,
    },
    /// Something this build or this machine cannot do (no CUDA driver, an unsupported head dim ...).
    #[error("{0}")]
    Unsupported(String),
    /// A failure inside the CUDA driver, NVRTC or cuBLAS.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A file that could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's reason.
        message: String,
    },
    /// A file that was read but is not what it should be (a malformed safetensors header ...).
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong with its contents.
        message: String,
    },
}

/// `std::result::Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Invalid`] from the op's name and a message.
    pub fn invalid(op: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            message: message.into(),
        }
    }
}
