//! CPU reference implementations, generic over f32 and f64 (`Real`). These are the specification:
//! every CUDA kernel is checked against them. Inner functions trust their inputs (shapes are checked
//! once, at the public boundary in `crate::ops`).
//!
//! # Panics
//! Called directly, these functions take slices and sizes on trust: sizes that disagree with the
//! slices panic on an index (never undefined behaviour: the one unsafe call, the GEMM, checks its
//! views itself). Use [`crate::ops`] for checked entry points with error values.

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod gemm;
pub mod layernorm;
pub mod linear;
pub mod mlp;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod rows;

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use crate::tensor::Element;

/// A real scalar the CPU reference computes in: f32 or f64.
pub trait Real:
    Element
    + num_traits::Float
    + num_traits::FloatConst
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Default
    + Debug
    + Send
    + Sync
{
    /// C ← α·A·B + β·C for row/column-strided A (m×k), B (k×n), C (m×n), single-threaded.
    ///
    /// # Safety
    /// The strides must keep every accessed element inside the given pointers' allocations.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );

    /// A constant, rounded from f64.
    fn c(x: f64) -> Self {
        <Self as Element>::from_f64(x)
    }
}

impl Real for f32 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Real for f64 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}
