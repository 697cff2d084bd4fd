//! CPU reference: see crate::ops::layernorm for the math. (Being written.)
