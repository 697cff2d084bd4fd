//! Row helpers shared by the row-wise ops (linear bias, layernorm, modulation, gated residual):
//! how many rows one rayon task takes, the [G, C] modulation view, and sums over the rows of
//! each group (the backward of a broadcast).

use rayon::prelude::*;

use super::Real;

/// Elements one rayon task should touch: below this, scheduling costs more than it saves.
const ELEMS_PER_TASK: usize = 1 << 14;

/// Rows of width `c` per rayon task (at least one).
pub fn rows_per_task(c: usize) -> usize {
    (ELEMS_PER_TASK / c.max(1)).max(1)
}

/// A modulation tensor [G, C] (G = 1 for \[C\]) broadcast over `rows` rows: row r reads vector
/// r / (rows / G). G divides `rows` (checked at the op boundary).
#[derive(Clone, Copy, Debug)]
pub struct Groups<'a, T> {
    /// The vectors, [G, C] row-major.
    pub data: &'a [T],
    /// G.
    pub groups: usize,
    /// The rows they are broadcast over (a multiple of G).
    pub rows: usize,
    /// C, the width of a vector and of a row.
    pub c: usize,
}

impl<'a, T> Groups<'a, T> {
    /// The view; `data` holds `groups` vectors of `c`.
    pub fn new(data: &'a [T], groups: usize, rows: usize, c: usize) -> Self {
        Groups {
            data,
            groups,
            rows,
            c,
        }
    }

    /// The vector that row `r` reads.
    pub fn row(&self, r: usize) -> &'a [T] {
        let g = r / (self.rows / self.groups);
        &self.data[g * self.c..(g + 1) * self.c]
    }
}

/// out[g, ·] = Σ over the rows r of group g (rows / groups consecutive rows) of `term(r, ·)`, where
/// `term(r, acc)` adds row r's contribution to `acc` (length c). Work is split in fixed row blocks
/// that depend on the shape only, so the result does not depend on the number of threads.
pub fn group_row_sums<T: Real>(
    rows: usize,
    c: usize,
    groups: usize,
    term: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::zero(); groups * c];
    if rows == 0 || c == 0 || groups == 0 {
        return out;
    }
    let per = rows / groups;
    let block = rows_per_task(c);
    if per <= block {
        // Small groups (G = T, or many samples): one group per task, summed in row order.
        out.par_chunks_mut(c)
            .enumerate()
            .with_min_len((block / per.max(1)).max(1))
            .for_each(|(g, acc)| (g * per..(g + 1) * per).for_each(|r| term(r, acc)));
    } else {
        // Few large groups: partial sums over row blocks in parallel, then added in block order.
        for (g, acc) in out.chunks_mut(c).enumerate() {
            let r0 = g * per;
            let partials: Vec<Vec<T>> = (0..per.div_ceil(block))
                .into_par_iter()
                .map(|k| {
                    let mut part = vec![T::zero(); c];
                    (r0 + k * block..r0 + ((k + 1) * block).min(per))
                        .for_each(|r| term(r, &mut part));
                    part
                })
                .collect();
            for part in partials {
                acc.iter_mut().zip(part).for_each(|(a, p)| *a += p);
            }
        }
    }
    out
}

/// Column sums of a row-major `rows × c` matrix (the gradient of a bias).
pub fn sum_rows<T: Real>(a: &[T], rows: usize, c: usize) -> Vec<T> {
    group_row_sums(rows, c, 1, |r, acc| {
        acc.iter_mut()
            .zip(&a[r * c..(r + 1) * c])
            .for_each(|(s, &v)| *s += v)
    })
}
