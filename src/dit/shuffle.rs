//! Data movement between the layouts the ops want: patches, heads, modulation chunks, class rows.
//! Each is one tight copy loop over contiguous runs; all are applied alike to a primal and its
//! tangent. Shapes are trusted (checked at the DiT's boundary); dtypes still come back as errors.

use crate::dual::Dual;
use crate::error::Result;
use crate::ops::with_real;
use crate::tensor::{Element, Tensor};

const OP: &str = "dit";

/// Applies a shape-preserving-in-kind map to a primal and, when present, its tangent.
pub(super) fn dual_map(d: &Dual, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Dual> {
    Ok(Dual {
        primal: f(&d.primal)?,
        tangent: d.tangent.as_ref().map(&f).transpose()?,
    })
}

/// x [B, C, S, S] → patches [B·g·g, C·p·p], g = S/p; token (gy, gx) row-major, entry (c, py, px).
pub(super) fn patchify(x: &Tensor, c: usize, s: usize, p: usize) -> Result<Tensor> {
    with_real!(OP, "x", x.dtype(), T => {
        let src = x.as_slice::<T>()?;
        let b = x.numel() / (c * s * s);
        let g = s / p;
        let pd = c * p * p;
        let mut dst = Vec::<T>::with_capacity(src.len());
        for bi in 0..b {
            for gy in 0..g {
                for gx in 0..g {
                    for ci in 0..c {
                        let plane = &src[(bi * c + ci) * s * s..][..s * s];
                        for py in 0..p {
                            dst.extend_from_slice(&plane[(gy * p + py) * s + gx * p..][..p]);
                        }
                    }
                }
            }
        }
        Tensor::from_vec(dst, &[b * g * g, pd])
    })
}

/// The inverse of `patchify`: patches [B·g·g, C·p·p] → [B, C, S, S].
pub(super) fn unpatchify(y: &Tensor, c: usize, s: usize, p: usize) -> Result<Tensor> {
    with_real!(OP, "patches", y.dtype(), T => {
        let src = y.as_slice::<T>()?;
        let b = y.numel() / (c * s * s);
        let g = s / p;
        let mut dst = vec![T::from_f64(0.0); src.len()];
        let mut k = 0;
        for bi in 0..b {
            for gy in 0..g {
                for gx in 0..g {
                    for ci in 0..c {
                        let plane = &mut dst[(bi * c + ci) * s * s..][..s * s];
                        for py in 0..p {
                            plane[(gy * p + py) * s + gx * p..][..p].copy_from_slice(&src[k..k + p]);
                            k += p;
                        }
                    }
                }
            }
        }
        Tensor::from_vec(dst, &[b, c, s, s])
    })
}

/// Token-major rows → head-major: dst[b, h, n, :] = src[(b·N + n)·stride + offset + h·dh ..][..dh].
/// Gives q, k or v [B, heads, N, dh] from the fused qkv rows, or splits a merged cotangent.
#[allow(clippy::too_many_arguments)]
pub(super) fn gather_heads(
    src: &Tensor,
    b: usize,
    n: usize,
    heads: usize,
    dh: usize,
    stride: usize,
    offset: usize,
) -> Result<Tensor> {
    with_real!(OP, "tokens", src.dtype(), T => {
        let s = src.as_slice::<T>()?;
        let mut dst = Vec::<T>::with_capacity(b * heads * n * dh);
        for bi in 0..b {
            for h in 0..heads {
                for ni in 0..n {
                    dst.extend_from_slice(&s[(bi * n + ni) * stride + offset + h * dh..][..dh]);
                }
            }
        }
        Tensor::from_vec(dst, &[b, heads, n, dh])
    })
}

/// The inverse of `gather_heads`: writes [B, heads, N, dh] into token rows of `dst`.
#[allow(clippy::too_many_arguments)]
pub(super) fn scatter_heads(
    src: &Tensor,
    dst: &mut Tensor,
    b: usize,
    n: usize,
    heads: usize,
    dh: usize,
    stride: usize,
    offset: usize,
) -> Result<()> {
    with_real!(OP, "heads", src.dtype(), T => {
        let s = src.as_slice::<T>()?;
        let d = dst.as_mut_slice::<T>()?;
        let mut k = 0;
        for bi in 0..b {
            for h in 0..heads {
                for ni in 0..n {
                    d[(bi * n + ni) * stride + offset + h * dh..][..dh]
                        .copy_from_slice(&s[k..k + dh]);
                    k += dh;
                }
            }
        }
        Ok(())
    })
}

/// Splits [rows, k·w] into k tensors [rows, w] (the adaLN modulation chunks).
pub(super) fn split_cols(src: &Tensor, k: usize) -> Result<Vec<Tensor>> {
    with_real!(OP, "modulation", src.dtype(), T => {
        let s = src.as_slice::<T>()?;
        let rows = src.shape()[0];
        let w = src.shape()[1] / k;
        (0..k)
            .map(|j| {
                let mut d = Vec::<T>::with_capacity(rows * w);
                for r in 0..rows {
                    d.extend_from_slice(&s[r * k * w + j * w..][..w]);
                }
                Tensor::from_vec(d, &[rows, w])
            })
            .collect()
    })
}

/// The inverse of `split_cols`: k tensors [rows, w] → [rows, k·w].
pub(super) fn concat_cols(parts: &[&Tensor]) -> Result<Tensor> {
    let (rows, w) = (parts[0].shape()[0], parts[0].shape()[1]);
    let k = parts.len();
    with_real!(OP, "modulation cotangent", parts[0].dtype(), T => {
        let mut d = vec![T::from_f64(0.0); rows * k * w];
        for (j, p) in parts.iter().enumerate() {
            let s = p.as_slice::<T>()?;
            for r in 0..rows {
                d[r * k * w + j * w..][..w].copy_from_slice(&s[r * w..][..w]);
            }
        }
        Tensor::from_vec(d, &[rows, k * w])
    })
}

/// Rows of `table` [R, w] picked by `idx` → [idx.len(), w].
pub(super) fn gather_rows(table: &Tensor, idx: &[usize]) -> Result<Tensor> {
    let w = table.shape()[1];
    with_real!(OP, "y_embedder.embedding_table.weight", table.dtype(), T => {
        let s = table.as_slice::<T>()?;
        let mut d = Vec::<T>::with_capacity(idx.len() * w);
        for &i in idx {
            d.extend_from_slice(&s[i * w..][..w]);
        }
        Tensor::from_vec(d, &[idx.len(), w])
    })
}

/// The adjoint of `gather_rows`: rows of `src` summed into a zero [rows, w] table at `idx`.
pub(super) fn scatter_add_rows(src: &Tensor, idx: &[usize], rows: usize) -> Result<Tensor> {
    let w = src.shape()[1];
    with_real!(OP, "class cotangent", src.dtype(), T => {
        let s = src.as_slice::<T>()?;
        let mut d = vec![T::from_f64(0.0); rows * w];
        for (r, &i) in idx.iter().enumerate() {
            for (a, &b) in d[i * w..][..w].iter_mut().zip(&s[r * w..][..w]) {
                *a += b;
            }
        }
        Tensor::from_vec(d, &[rows, w])
    })
}

/// x += y elementwise, y repeating over x's leading rows (y of x's size, or one period of it).
pub(super) fn add_assign_periodic(x: &mut Tensor, y: &Tensor) -> Result<()> {
    with_real!(OP, "addend", x.dtype(), T => {
        let ys = y.as_slice::<T>()?;
        let xs = x.as_mut_slice::<T>()?;
        for chunk in xs.chunks_mut(ys.len()) {
            for (a, &b) in chunk.iter_mut().zip(ys) {
                *a += b;
            }
        }
        Ok(())
    })
}

/// s·x, computed in the tensor's dtype.
pub(super) fn scaled(x: &Tensor, s: f64) -> Result<Tensor> {
    with_real!(OP, "t", x.dtype(), T => {
        let sc = <T as Element>::from_f64(s);
        let d: Vec<T> = x.as_slice::<T>()?.iter().map(|&v| v * sc).collect();
        Tensor::from_vec(d, x.shape())
    })
}
