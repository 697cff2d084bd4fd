//! CPU reference of rotary position embeddings (see crate::ops::rope for the math): each pair of
//! a head's values rotated by its token's angle, one rayon task per block of tokens.

use rayon::prelude::*;

use super::Real;

/// Which values of a head of width d form the pairs that rotate together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopePairs {
    /// (x\[2i\], x\[2i+1\]): the complex-number form of Wan, Flux and the original RoFormer.
    Interleaved,
    /// (x\[i\], x\[i + d/2\]): the "rotate half" form of GPT-NeoX, LLaMA and most HF models.
    Halves,
}

impl RopePairs {
    /// The element indices of pair i in a head of width d.
    #[inline(always)]
    pub fn pair(self, i: usize, d: usize) -> (usize, usize) {
        match self {
            RopePairs::Interleaved => (2 * i, 2 * i + 1),
            RopePairs::Halves => (i, i + d / 2),
        }
    }
}

/// The shape of a rope: x [B, N, H, d]; the angles' tables hold N·d/2 values, once
/// (`per_batch` false) or per batch entry.
#[derive(Clone, Copy, Debug)]
pub struct RopeDims {
    /// Batch entries.
    pub b: usize,
    /// Tokens per entry.
    pub n: usize,
    /// Heads per token.
    pub h: usize,
    /// Head width (even).
    pub d: usize,
    /// Whether the tables are [B, N, d/2] (else [N, d/2], shared by every entry).
    pub per_batch: bool,
}

/// y = R(±θ)·x pairwise: (a, b) → (a·cos − s·b·sin, s·a·sin + b·cos) with s = `sign` (+1 the
/// rotation, −1 its inverse and transpose, for the backward).
pub fn rotate<T: Real>(
    x: &[T],
    cos: &[T],
    sin: &[T],
    dims: RopeDims,
    pairs: RopePairs,
    sign: T,
) -> Vec<T> {
    let RopeDims {
        b,
        n,
        h,
        d,
        per_batch,
    } = dims;
    let half = d / 2;
    let token = h * d;
    let mut y = vec![T::zero(); b * n * token];
    y.par_chunks_mut(token)
        .zip(x.par_chunks(token))
        .enumerate()
        .for_each(|(t, (yt, xt))| {
            let (bi, ni) = (t / n, t % n);
            let row = if per_batch { bi * n + ni } else { ni } * half;
            let (cr, sr) = (&cos[row..row + half], &sin[row..row + half]);
            for (yh, xh) in yt.chunks_mut(d).zip(xt.chunks(d)) {
                for i in 0..half {
                    let (p, q) = pairs.pair(i, d);
                    let (a, bb, c, s) = (xh[p], xh[q], cr[i], sign * sr[i]);
                    yh[p] = a * c - bb * s;
                    yh[q] = a * s + bb * c;
                }
            }
        });
    y
}
