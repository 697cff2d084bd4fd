//! CPU reference: see crate::ops::embedding for the math. (Being written.)
