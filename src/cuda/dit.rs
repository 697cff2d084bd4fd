//! Launchers of cuda/dit.cu: the DiT's data movement (a permutation of up to six axes), the
//! periodic add, the class embedding and its gradient, and the time scale. The DiT passes built
//! from them and the other op families live in [`crate::dit::gpu`].

use super::launch::{
    dtype_suffix, int_arg, pointwise_steps, require_ptrs, Arg, Step, MAX_POINTWISE,
};
use crate::error::{Error, Result};
use crate::tensor::{checked_numel, DType};

const FILE: &str = "dit.cu";
const OP: &str = "dit";

fn pointwise(kernel: String, n: usize, args: Vec<Arg>) -> Result<Vec<Step>> {
    pointwise_steps(OP, FILE, kernel, n, args)
}

/// y = x permuted: y is row-major of shape `out_dims` (at most six axes) and its element
/// (i0, .., ik) is x[Σ i_j · in_strides\[j\]] (strides in elements). y must not alias x.
pub fn plan_permute(
    dtype: DType,
    x: u64,
    y: u64,
    out_dims: &[usize],
    in_strides: &[usize],
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(OP, &[("x", x), ("y", y)])?;
    if out_dims.len() != in_strides.len() || out_dims.len() > 6 || out_dims.is_empty() {
        return Err(Error::invalid(
            OP,
            format!("permute of {out_dims:?} with strides {in_strides:?} (1 to 6 axes, one stride each)"),
        ));
    }
    let pad = 6 - out_dims.len();
    let dims: Vec<usize> = std::iter::repeat_n(1, pad)
        .chain(out_dims.iter().copied())
        .collect();
    let strides: Vec<usize> = std::iter::repeat_n(0, pad)
        .chain(in_strides.iter().copied())
        .collect();
    let n = checked_numel(OP, &dims, 1)?;
    let mut args = vec![Arg::Ptr(x), Arg::Ptr(y), Arg::I64(n as i64)];
    for (i, d) in dims.iter().enumerate() {
        args.push(int_arg(OP, &format!("permute axis {i}"), *d)?);
    }
    for &s in &strides {
        let s = i64::try_from(s)
            .map_err(|_| Error::invalid(OP, format!("permute stride {s} exceeds i64")))?;
        args.push(Arg::I64(s));
    }
    pointwise(format!("dit_permute_{dt}"), n, args)
}

/// y\[i\] += x[i mod period] for i < n (the position embedding over a batch; with period n, y += x).
pub fn plan_add_rows(dtype: DType, y: u64, x: u64, n: usize, period: usize) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    if period == 0 || period > MAX_POINTWISE {
        return Err(Error::invalid(
            OP,
            format!("add_rows with period {period} (1 to 2^60)"),
        ));
    }
    require_ptrs(OP, &[("y", y), ("x", x)])?;
    pointwise(
        format!("dit_add_rows_{dt}"),
        n,
        vec![
            Arg::Ptr(y),
            Arg::Ptr(x),
            Arg::I64(n as i64),
            Arg::I64(period as i64),
        ],
    )
}

/// y[r, :] += table[idx\[r\], :] for y [rows, w]; idx is an i32 device vector of `rows` indices.
pub fn plan_add_class(
    dtype: DType,
    y: u64,
    table: u64,
    idx: u64,
    rows: usize,
    w: usize,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(OP, &[("y", y), ("table", table), ("idx", idx)])?;
    let (r, wi) = (int_arg(OP, "rows", rows)?, int_arg(OP, "width", w)?);
    pointwise(
        format!("dit_add_class_{dt}"),
        rows * w,
        vec![Arg::Ptr(y), Arg::Ptr(table), Arg::Ptr(idx), r, wi],
    )
}

/// dtable[k, :] = Σ_{r: idx\[r\] = k} dy[r, :] for dtable [table_rows, w] (every row written).
pub fn plan_class_grad(
    dtype: DType,
    dy: u64,
    idx: u64,
    dtable: u64,
    rows: usize,
    table_rows: usize,
    w: usize,
) -> Result<Vec<Step>> {
    let dt = dtype_suffix(dtype)?;
    require_ptrs(OP, &[("dy", dy), ("idx", idx), ("dtable", dtable)])?;
    let (r, tr, wi) = (
        int_arg(OP, "rows", rows)?,
        int_arg(OP, "table rows", table_rows)?,
        int_arg(OP, "width", w)?,
    );
    pointwise(
        format!("dit_class_grad_{dt}"),
        table_rows * w,
        vec![Arg::Ptr(dy), Arg::Ptr(idx), Arg::Ptr(dtable), r, tr, wi],
    )
}

/// y = a·x over n f32 values.
pub fn plan_scale_f32(x: u64, y: u64, a: f64, n: usize) -> Result<Vec<Step>> {
    if !(a as f32).is_finite() {
        return Err(Error::invalid(
            OP,
            format!("scale {a} is not finite in f32"),
        ));
    }
    require_ptrs(OP, &[("x", x), ("y", y)])?;
    pointwise(
        "dit_scale_f32".into(),
        n,
        vec![
            Arg::Ptr(x),
            Arg::Ptr(y),
            Arg::F32(a as f32),
            Arg::I64(n as i64),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_pads_to_six_axes() {
        let s = plan_permute(DType::F32, 16, 32, &[3, 4, 5], &[1, 15, 3]).unwrap();
        let Step::Kernel(l) = &s[0] else { panic!() };
        assert_eq!(l.kernel, "dit_permute_f32");
        assert_eq!(l.args.len(), 15);
        assert_eq!(l.args[2], Arg::I64(60));
        assert_eq!(&l.args[3..9], &[1, 1, 1, 3, 4, 5].map(Arg::I32));
        assert_eq!(&l.args[9..], &[0, 0, 0, 1, 15, 3].map(Arg::I64));
        assert!(plan_permute(DType::F32, 16, 32, &[1; 7], &[1; 7]).is_err());
        assert!(plan_permute(DType::F32, 16, 32, &[2, 2], &[1]).is_err());
    }
}
