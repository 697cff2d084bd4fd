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

    /// Every element the view reaches lies in `data`, and the strides fit `isize` (checked
    /// arithmetic: a wrapped sum must not pass for a small one).
    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .zip((self.cols - 1).checked_mul(self.cs))
            .and_then(|(r, c)| r.checked_add(c));
        last.is_some_and(|l| l < self.data.len())
            && isize::try_from(self.rs).is_ok()
            && isize::try_from(self.cs).is_ok()
    }
}

/// C (`m × n` row-major with leading dimension `ldc` ≥ n) lies in a slice of `len` elements.
fn c_fits(m: usize, n: usize, ldc: usize, len: usize) -> bool {
    m == 0
        || n == 0
        || (ldc >= n
            && isize::try_from(ldc).is_ok()
            && (m - 1)
                .checked_mul(ldc)
                .and_then(|x| x.checked_add(n))
                .is_some_and(|end| end <= len))
}

/// C ← α·A·B + β·C with C row-major (`a.rows × b.cols`, leading dimension `ldc`), one thread.
///
/// # Panics
/// When the inner dimensions differ, a view reaches outside its slice, `ldc < b.cols` or C does not
/// fit `c` (the ops check their shapes first; this keeps the unsafe call below sound for any input).
pub fn gemm<T: Real>(alpha: T, a: Mat<T>, b: Mat<T>, beta: T, c: &mut [T], ldc: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "gemm: inner dimensions differ");
    assert!(a.fits() && b.fits(), "gemm: view outside its slice");
    assert!(c_fits(m, n, ldc, c.len()), "gemm: C too small");
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
///
/// # Panics
/// As [`gemm`].
pub fn gemm_par<T: Real>(alpha: T, a: Mat<T>, b: Mat<T>, beta: T, c: &mut [T]) {
    let (m, n) = (a.rows, b.cols);
    // Checked before the row split below slices by these sizes.
    assert!(a.fits() && b.fits(), "gemm: view outside its slice");
    assert!(c_fits(m, n, n, c.len()), "gemm: C too small");
    if m.saturating_mul(n).saturating_mul(a.cols) < 1 << 18 || m < 2 * PAR_ROWS {
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

    /// Strides whose reach wraps around usize must not pass for small ones (the unsafe GEMM
    /// would read and write outside the slices).
    #[test]
    fn wrapping_strides_are_refused() {
        let a = [1.0f64, 2.0];
        let wrapped = Mat {
            data: &a,
            rows: 2,
            cols: 2,
            rs: usize::MAX,
            cs: 1,
        };
        assert!(!wrapped.fits());
        assert!(!c_fits(2, 2, usize::MAX, 1));
        assert!(!c_fits(2, 2, 1, 100), "ldc < n overlaps rows");
        assert!(c_fits(2, 3, 4, 7) && !c_fits(2, 3, 4, 6));
        let huge_ldc = std::panic::catch_unwind(|| {
            let mut c = [0.0f64; 1];
            gemm(
                1.0,
                Mat::rows(&a, 1, 2),
                Mat::rows(&a, 2, 1),
                0.0,
                &mut c,
                usize::MAX,
            );
        });
        assert!(huge_ldc.is_err());
        let wrapped_a = std::panic::catch_unwind(|| {
            let mut c = [0.0f64; 4];
            gemm(1.0, wrapped, Mat::rows(&a, 2, 1), 0.0, &mut c, 1);
        });
        assert!(wrapped_a.is_err());
    }

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
