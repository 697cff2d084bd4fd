//! CPU reference: see crate::ops::activation for the math. (Being written.)
