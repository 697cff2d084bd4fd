//! Safe wrappers over the GEMM crate for the matrix views the ops use.

use rayon::prelude::*;

use super::Real;

/// A read-only matrix view: `rows × cols`, element (i, j) at `data[i*rs + j*cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    /// The elements; every (i, j) in range must index inside it.
    pub data: &'a [T],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Row stride, in elements.
    pub rs: usize,
    /// Column stride, in elements.
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `rows × cols` matrix.
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose view (no copy).
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// C ← α·A·B + β·C with C row-major (`a.rows × b.cols`, leading dimension `ldc`), one thread.
pub fn gemm<T: Real>(alpha: T, a: Mat<T>, b: Mat<T>, beta: T, c: &mut [T], ldc: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: inner dimensions differ");
    assert!(a.fits() && b.fits(), "gemm: view outside its slice");
    assert!(
        m == 0 || n == 0 || (m - 1) * ldc + n <= c.len(),
        "gemm: C too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for x in &mut c[i * ldc..i * ldc + n] {
                *x = if beta == T::zero() {
                    T::zero()
                } else {
                    *x * beta
                };
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index the strides reach inside the slices.
    unsafe {
        T::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        )
    }
}

/// Rows per parallel task: large enough that the GEMM's packing cost amortises.
const PAR_ROWS: usize = 64;

/// C ← α·A·B + β·C with C row-major and contiguous (`ldc = b.cols`), rows split across rayon threads.
pub fn gemm_par<T: Real>(alpha: T, a: Mat<T>, b: Mat<T>, beta: T, c: &mut [T]) {
    let (m, n) = (a.rows, b.cols);
    if m * n * a.cols < 1 << 18 || m < 2 * PAR_ROWS {
        return gemm(alpha, a, b, beta, c, n);
    }
    let chunk = m.div_ceil(rayon::current_num_threads() * 2).max(PAR_ROWS);
    c[..m * n]
        .par_chunks_mut(chunk * n)
        .enumerate()
        .for_each(|(i, c_rows)| {
            let r0 = i * chunk;
            let rows = c_rows.len() / n;
            let a_rows = Mat {
                data: &a.data[r0 * a.rs..],
                rows,
                ..a
            };
            gemm(alpha, a_rows, b, beta, c_rows, n);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_naive_with_transposes() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.11).cos()).collect();
        // C = A · Bᵀ with B stored n×k.
        let mut c = vec![1.0; m * n];
        gemm(
            2.0,
            Mat::rows(&a, m, k),
            Mat::rows(&b, n, k).t(),
            0.5,
            &mut c,
            n,
        );
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
                assert!((c[i * n + j] - (2.0 * dot + 0.5)).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn gemm_par_matches_gemm() {
        let (m, k, n) = (300, 64, 40);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) - 6.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32) - 5.0).collect();
        let mut c1 = vec![0.0; m * n];
        let mut c2 = vec![0.0; m * n];
        gemm(
            1.0,
            Mat::rows(&a, m, k),
            Mat::rows(&b, k, n),
            0.0,
            &mut c1,
            n,
        );
        gemm_par(1.0, Mat::rows(&a, m, k), Mat::rows(&b, k, n), 0.0, &mut c2);
        assert_eq!(c1, c2);
    }
}
