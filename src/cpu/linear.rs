//! CPU reference: see crate::ops::linear for the math. (Being written.)
