//! CPU reference: see crate::ops::attention for the math. (Being written.)
