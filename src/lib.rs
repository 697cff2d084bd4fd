//! flashjvp: forward-mode autodiff (Jacobian-vector products) for transformers.
//!
//! Dual tensors carry a primal and its tangent; every op returns both in one call (`*_jvp`), next
//! to its plain `*_forward` and the `*_backward` a training loop needs. The CPU reference (`cpu`) is
//! the specification every kernel is checked against. See DESIGN.md for the math.

#![warn(missing_docs)]

pub mod cli;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod device;
pub mod dit;
pub mod dual;
pub mod error;
pub mod io;
pub mod ops;
pub mod rcm;
pub mod tensor;

pub use device::{Device, DeviceRequest};
pub use dual::Dual;
pub use error::{Error, Result};
pub use tensor::{DType, Element, Tensor};
