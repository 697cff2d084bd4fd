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

/// The inverse of `patchify`: patches [B·g·g, C·p·p] → [B, C, S, S], built in destination order.
pub(super) fn unpatchify(y: &Tensor, c: usize, s: usize, p: usize) -> Result<Tensor> {
    with_real!(OP, "patches", y.dtype(), T => {
        let src = y.as_slice::<T>()?;
        let b = y.numel() / (c * s * s);
        let g = s / p;
        let pd = c * p * p;
        let mut dst = Vec::<T>::with_capacity(src.len());
        for bi in 0..b {
            for ci in 0..c {
                for row in 0..s {
                    let (gy, py) = (row / p, row % p);
                    for gx in 0..g {
                        let token = (bi * g + gy) * g + gx;
                        dst.extend_from_slice(&src[token * pd + (ci * p + py) * p..][..p]);
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

/// The inverse of `gather_heads` for whole rows: parts, each [B, heads, N, dh], → token rows
/// [B·N, parts·heads·dh], row (b, n) = [part 0 heads 0..H, part 1 heads 0..H, ...]. Built in
/// destination order, so nothing is zero-filled first.
pub(super) fn merge_heads(
    parts: &[&Tensor],
    b: usize,
    n: usize,
    heads: usize,
    dh: usize,
) -> Result<Tensor> {
    with_real!(OP, "heads", parts[0].dtype(), T => {
        let srcs = parts
            .iter()
            .map(|p| p.as_slice::<T>())
            .collect::<Result<Vec<_>>>()?;
        let width = parts.len() * heads * dh;
        let mut dst = Vec::<T>::with_capacity(b * n * width);
        for bi in 0..b {
            for ni in 0..n {
                for s in &srcs {
                    for h in 0..heads {
                        dst.extend_from_slice(&s[((bi * heads + h) * n + ni) * dh..][..dh]);
                    }
                }
            }
        }
        Tensor::from_vec(dst, &[b * n, width])
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

#[cfg(test)]
mod tests {
    use super::*;

    fn arange(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_vec((0..n).map(|i| i as f64).collect(), shape).unwrap()
    }

    #[test]
    fn patchify_places_pixels_and_unpatchify_inverts_it() {
        // x [2, 3, 6, 6], patch 2 → 9 tokens of 12 values.
        let x = arange(&[2, 3, 6, 6]);
        let p = patchify(&x, 3, 6, 2).unwrap();
        assert_eq!(p.shape(), &[18, 12]);
        let pv = p.as_slice::<f64>().unwrap();
        let xv = x.as_slice::<f64>().unwrap();
        let px = |b: usize, c: usize, y: usize, x: usize| xv[((b * 3 + c) * 6 + y) * 6 + x];
        // Image 1, token (gy 2, gx 1), channel 2, (py 1, px 0) ↔ pixel (5, 2).
        assert_eq!(pv[(9 + 2 * 3 + 1) * 12 + (2 * 2 + 1) * 2], px(1, 2, 5, 2));
        // Image 0, token (0, 2), channel 0, (0, 1) ↔ pixel (0, 5).
        assert_eq!(pv[2 * 12 + 1], px(0, 0, 0, 5));
        assert_eq!(unpatchify(&p, 3, 6, 2).unwrap(), x);
    }

    #[test]
    fn merge_heads_inverts_gather_heads() {
        // qkv rows [B·N, 3·heads·dh] with B 2, N 5, heads 3, dh 4.
        let qkv = arange(&[10, 36]);
        let parts: Vec<Tensor> = (0..3)
            .map(|s| gather_heads(&qkv, 2, 5, 3, 4, 36, s * 12).unwrap())
            .collect();
        // k of image 1, head 2, token 3 = row 8, columns 12 + 8 .. 12 + 12.
        let k = parts[1].as_slice::<f64>().unwrap();
        assert_eq!(
            &k[((3 + 2) * 5 + 3) * 4..][..4],
            &[308.0, 309.0, 310.0, 311.0]
        );
        let refs: Vec<&Tensor> = parts.iter().collect();
        assert_eq!(merge_heads(&refs, 2, 5, 3, 4).unwrap(), qkv);
    }

    #[test]
    fn split_and_concat_columns_invert_each_other() {
        let m = arange(&[3, 12]);
        let parts = split_cols(&m, 4).unwrap();
        assert_eq!(
            parts[2].as_slice::<f64>().unwrap()[3..6],
            [18.0, 19.0, 20.0]
        );
        let refs: Vec<&Tensor> = parts.iter().collect();
        assert_eq!(concat_cols(&refs).unwrap(), m);
    }

    #[test]
    fn scatter_add_rows_is_the_adjoint_of_gather_rows() {
        let table = arange(&[4, 3]);
        let idx = [3, 0, 3];
        let g = gather_rows(&table, &idx).unwrap();
        assert_eq!(
            g.as_slice::<f64>().unwrap(),
            &[9., 10., 11., 0., 1., 2., 9., 10., 11.]
        );
        let back = scatter_add_rows(&g, &idx, 4).unwrap();
        assert_eq!(
            back.as_slice::<f64>().unwrap(),
            &[0., 1., 2., 0., 0., 0., 0., 0., 0., 18., 20., 22.]
        );
    }
}
