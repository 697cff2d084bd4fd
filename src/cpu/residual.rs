//! CPU reference: see crate::ops::residual for the math. (Being written.)
