//! CPU reference: see crate::ops::mlp for the math. (Being written.)
