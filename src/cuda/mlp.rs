//! The GELU MLP y = gelu(x W1ᵀ + b1) W2ᵀ + b2 on the GPU: GEMMs through cuBLASLt (see
//! [`super::gemm`]) and the epilogue kernels of cuda/elementwise.cu.
//!
//! The activation lives in the GEMM epilogues (DESIGN.md section 3), so no pass of its own ever
//! reads or writes the [T, Hd] hidden layer: forward g = gelu(x W1ᵀ + b1) (GELU_BIAS); JVP
//! g = gelu(x W1ᵀ + b1) with the pre-activation saved as the epilogue's aux (GELU_AUX_BIAS) and
//! ġ = gelu'(pre) ⊙ ẋW1ᵀ (DGELU, reading that aux), then the second layer as two GEMMs (the bias
//! goes to the primal rows only). Backward: pre and g recomputed by one GELU_AUX_BIAS product,
//! dW2 = gyᵀ g, db2 = 1ᵀ gy, dpre = gelu'(pre) ⊙ (gy W2) (DGELU), dW1 = dpreᵀ x, db1 = 1ᵀ dpre,
//! dx = dpre W1 (bias gradients as products with a ones row, accumulated in f32). Where cuBLASLt has
//! no algorithm for an epilogue, [`super::gemm`] runs the product and then the elementwise kernels.

use super::context::Gpu;
use super::launch::{dtype_suffix, int_arg, require_ptrs, Gemm, GemmAct, Step};
use super::tensor::{expect_tensor, one_bits, DeviceTensor};
use crate::error::{Error, Result};
use crate::tensor::DType;

const OP: &str = "mlp";

/// Rows T, model width C, hidden width Hd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlpDims {
    /// Rows T of x and y.
    pub t: usize,
    /// Model width C: columns of x and y.
    pub c: usize,
    /// Hidden width Hd: rows of w1, columns of w2.
    pub hd: usize,
}

/// Device addresses of the parameters: w1 [Hd, C], b1 \[Hd\], w2 [C, Hd], b2 \[C\].
#[derive(Clone, Copy, Debug)]
pub struct ParamPtrs {
    /// w1 [Hd, C], first layer (x W1ᵀ).
    pub w1: u64,
    /// b1 \[Hd\], first-layer bias.
    pub b1: u64,
    /// w2 [C, Hd], second layer (g W2ᵀ).
    pub w2: u64,
    /// b2 \[C\], second-layer bias.
    pub b2: u64,
}

impl ParamPtrs {
    /// Errors unless all four parameters are given (non-null).
    fn require(&self) -> Result<()> {
        require_ptrs(
            OP,
            &[
                ("w1", self.w1),
                ("b1", self.b1),
                ("w2", self.w2),
                ("b2", self.b2),
            ],
        )
    }
}

/// The parameters as device tensors (all in the dtype of x).
#[derive(Clone, Copy)]
pub struct DeviceMlp<'a> {
    /// [Hd, C].
    pub w1: &'a DeviceTensor,
    /// \[Hd\].
    pub b1: &'a DeviceTensor,
    /// [C, Hd].
    pub w2: &'a DeviceTensor,
    /// \[C\].
    pub b2: &'a DeviceTensor,
}

impl DeviceMlp<'_> {
    fn ptrs(&self) -> ParamPtrs {
        ParamPtrs {
            w1: self.w1.ptr(),
            b1: self.b1.ptr(),
            w2: self.w2.ptr(),
            b2: self.b2.ptr(),
        }
    }
}

/// Checks x [T, C], w1 [Hd, C], b1 \[Hd\], w2 [C, Hd], b2 \[C\] by shape (errors name the tensor).
pub fn check_shapes(
    x: &[usize],
    w1: &[usize],
    b1: &[usize],
    w2: &[usize],
    b2: &[usize],
) -> Result<MlpDims> {
    let rank = |name: &str, s: &[usize], r: usize| -> Result<()> {
        if s.len() != r {
            return Err(Error::Rank {
                op: OP,
                tensor: name.into(),
                expected: r,
                actual: s.to_vec(),
            });
        }
        Ok(())
    };
    rank("x", x, 2)?;
    rank("w1", w1, 2)?;
    let (t, c, hd) = (x[0], x[1], w1[0]);
    for (name, s, want) in [
        ("w1", w1, vec![hd, c]),
        ("b1", b1, vec![hd]),
        ("w2", w2, vec![c, hd]),
        ("b2", b2, vec![c]),
    ] {
        if s != want.as_slice() {
            if s.len() != want.len() {
                rank(name, s, want.len())?;
            }
            return Err(Error::Shape {
                op: OP,
                tensor: name.into(),
                expected: format!("{want:?}"),
                actual: s.to_vec(),
            });
        }
    }
    let d = MlpDims { t, c, hd };
    d.check()?;
    Ok(d)
}

impl MlpDims {
    /// Errors unless T, C and Hd are at least 1 and 2T, C and Hd fit the 32-bit sizes of the
    /// GEMMs; [`check_shapes`] runs it, and so does every plan, for dims built by hand.
    pub fn check(&self) -> Result<()> {
        let MlpDims { t, c, hd } = *self;
        if t == 0 || c == 0 || hd == 0 {
            return Err(Error::invalid(
                OP,
                format!("empty dimension: T {t}, C {c}, Hd {hd} (x [T, C], w1 [Hd, C])"),
            ));
        }
        for (name, v) in [("T", t), ("C", c), ("Hd", hd), ("2T", t.saturating_mul(2))] {
            int_arg(OP, name, v)?;
        }
        Ok(())
    }
}

fn gemm(
    dtype: DType,
    m: usize,
    n: usize,
    k: usize,
    a: (u64, bool),
    b: (u64, bool),
    c: u64,
) -> Step {
    Gemm::step(dtype, (m, n, k), a, b, c, None)
}

fn with_bias(step: Step, bias: u64) -> Step {
    match step {
        Step::Gemm(mut g) => {
            g.bias = Some(bias);
            Step::Gemm(g)
        }
        other => other,
    }
}

/// Forward: `h` is a [T, Hd] scratch buffer, `y` [T, C].
pub fn plan_forward(
    dtype: DType,
    d: MlpDims,
    x: u64,
    p: ParamPtrs,
    h: u64,
    y: u64,
) -> Result<Vec<Step>> {
    dtype_suffix(dtype)?;
    d.check()?;
    require_ptrs(OP, &[("x", x), ("h", h), ("y", y)])?;
    p.require()?;
    Ok(vec![
        // h = gelu(x W1ᵀ + b1).
        Gemm::step_act(
            dtype,
            (d.t, d.hd, d.c),
            (x, false),
            (p.w1, true),
            h,
            Some(p.b1),
            GemmAct::Gelu,
        ),
        with_bias(
            gemm(dtype, d.t, d.c, d.hd, (h, false), (p.w2, true), y),
            p.b2,
        ),
    ])
}

/// JVP: `h2` is a [2T, Hd] scratch buffer (pre-activations, then the hidden tangents in rows
/// T..2T), `g` a [T, Hd] scratch buffer (the activations); y and ty [T, C].
#[allow(clippy::too_many_arguments)]
pub fn plan_jvp(
    dtype: DType,
    d: MlpDims,
    x: u64,
    tx: u64,
    p: ParamPtrs,
    h2: u64,
    g: u64,
    y: u64,
    ty: u64,
) -> Result<Vec<Step>> {
    dtype_suffix(dtype)?;
    d.check()?;
    require_ptrs(
        OP,
        &[
            ("x", x),
            ("tx", tx),
            ("h2", h2),
            ("g", g),
            ("y", y),
            ("ty", ty),
        ],
    )?;
    p.require()?;
    // Rows T..2T of h2; dims no memory holds could wrap the address.
    let th = (d.t as u64)
        .checked_mul(d.hd as u64)
        .and_then(|n| n.checked_mul(dtype.size_in_bytes() as u64))
        .and_then(|bytes| h2.checked_add(bytes))
        .ok_or_else(|| {
            Error::invalid(
                OP,
                format!(
                    "the [2T, Hd] = [{}, {}] {dtype} scratch `h2` at {h2:#x} runs past the end \
                     of the address space",
                    2 * d.t,
                    d.hd
                ),
            )
        })?;
    let dims = (d.t, d.hd, d.c);
    Ok(vec![
        // g = gelu(pre), pre = x W1ᵀ + b1 saved in rows 0..T of h2.
        Gemm::step_act(
            dtype,
            dims,
            (x, false),
            (p.w1, true),
            g,
            Some(p.b1),
            GemmAct::GeluAux { aux: h2 },
        ),
        // ġ = gelu'(pre) ⊙ ẋW1ᵀ into rows T..2T.
        Gemm::step_act(
            dtype,
            dims,
            (tx, false),
            (p.w1, true),
            th,
            None,
            GemmAct::DGelu { aux: h2 },
        ),
        with_bias(
            gemm(dtype, d.t, d.c, d.hd, (g, false), (p.w2, true), y),
            p.b2,
        ),
        gemm(dtype, d.t, d.c, d.hd, (th, false), (p.w2, true), ty),
    ])
}

/// Scratch and outputs of the backward (device addresses).
#[derive(Clone, Copy, Debug)]
pub struct BwdPtrs {
    /// [T, Hd]: pre-activations.
    pub pre: u64,
    /// [T, Hd]: activations g.
    pub g: u64,
    /// [T, Hd]: dpre = gelu'(pre) ⊙ (gy W2).
    pub dg: u64,
    /// \[T\] of ones (filled by the plan).
    pub ones: u64,
    /// [T, C]: gradient of x, dpre W1.
    pub dx: u64,
    /// [Hd, C]: gradient of w1, dpreᵀ x.
    pub dw1: u64,
    /// \[Hd\]: gradient of b1, column sums of dpre.
    pub db1: u64,
    /// [C, Hd]: gradient of w2, gyᵀ g.
    pub dw2: u64,
    /// \[C\]: gradient of b2, column sums of gy.
    pub db2: u64,
}

/// Backward from the output gradient `gy` [T, C]: recomputes pre and g, then writes the five
/// gradients of `b` (every output is overwritten, nothing accumulated).
pub fn plan_backward(
    dtype: DType,
    d: MlpDims,
    x: u64,
    p: ParamPtrs,
    gy: u64,
    b: BwdPtrs,
) -> Result<Vec<Step>> {
    dtype_suffix(dtype)?;
    d.check()?;
    p.require()?;
    require_ptrs(
        OP,
        &[
            ("x", x),
            ("gy", gy),
            ("pre", b.pre),
            ("g", b.g),
            ("dg", b.dg),
            ("ones", b.ones),
            ("dx", b.dx),
            ("dw1", b.dw1),
            ("db1", b.db1),
            ("dw2", b.dw2),
            ("db2", b.db2),
        ],
    )?;
    let (width, bits) = one_bits(dtype);
    let mut s = vec![
        Step::Fill {
            ptr: b.ones,
            width,
            count: d.t,
            bits,
        },
        // g = gelu(pre), pre = x W1ᵀ + b1 (recomputed).
        Gemm::step_act(
            dtype,
            (d.t, d.hd, d.c),
            (x, false),
            (p.w1, true),
            b.g,
            Some(p.b1),
            GemmAct::GeluAux { aux: b.pre },
        ),
    ];
    s.push(gemm(dtype, d.c, d.hd, d.t, (gy, true), (b.g, false), b.dw2));
    s.push(gemm(
        dtype,
        1,
        d.c,
        d.t,
        (b.ones, false),
        (gy, false),
        b.db2,
    ));
    // dpre = gelu'(pre) ⊙ (gy W2).
    s.push(Gemm::step_act(
        dtype,
        (d.t, d.hd, d.c),
        (gy, false),
        (p.w2, false),
        b.dg,
        None,
        GemmAct::DGelu { aux: b.pre },
    ));
    s.push(gemm(dtype, d.hd, d.c, d.t, (b.dg, true), (x, false), b.dw1));
    s.push(gemm(
        dtype,
        1,
        d.hd,
        d.t,
        (b.ones, false),
        (b.dg, false),
        b.db1,
    ));
    s.push(gemm(
        dtype,
        d.t,
        d.c,
        d.hd,
        (b.dg, false),
        (p.w1, false),
        b.dx,
    ));
    Ok(s)
}

fn check_device(x: &DeviceTensor, p: &DeviceMlp) -> Result<MlpDims> {
    let d = check_shapes(
        x.shape(),
        p.w1.shape(),
        p.b1.shape(),
        p.w2.shape(),
        p.b2.shape(),
    )?;
    for (name, t) in [("w1", p.w1), ("b1", p.b1), ("w2", p.w2), ("b2", p.b2)] {
        if t.dtype() != x.dtype() {
            return Err(Error::DType {
                op: OP,
                tensor: name.into(),
                expected: format!("{} (the dtype of x)", x.dtype()),
                actual: t.dtype(),
            });
        }
    }
    Ok(d)
}

fn check_like(name: &str, t: &DeviceTensor, x: &DeviceTensor) -> Result<()> {
    if t.shape() != x.shape() || t.dtype() != x.dtype() {
        return Err(Error::TangentMismatch {
            op: OP,
            tensor: name.into(),
            primal_shape: x.shape().to_vec(),
            primal_dtype: x.dtype(),
            tangent_shape: t.shape().to_vec(),
            tangent_dtype: t.dtype(),
        });
    }
    Ok(())
}

/// y on the GPU.
pub fn forward(x: &DeviceTensor, p: &DeviceMlp) -> Result<DeviceTensor> {
    let d = check_device(x, p)?;
    let gpu = x.gpu();
    let h = gpu.alloc_out(&[d.t, d.hd], x.dtype())?;
    let y = gpu.alloc_out(&[d.t, d.c], x.dtype())?;
    gpu.run(&plan_forward(
        x.dtype(),
        d,
        x.ptr(),
        p.ptrs(),
        h.ptr(),
        y.ptr(),
    )?)?;
    Ok(y)
}

/// y and, with a tangent, ẏ on the GPU.
pub fn jvp(
    x: &DeviceTensor,
    tx: Option<&DeviceTensor>,
    p: &DeviceMlp,
) -> Result<(DeviceTensor, Option<DeviceTensor>)> {
    let Some(tx) = tx else {
        return Ok((forward(x, p)?, None));
    };
    let d = check_device(x, p)?;
    check_like("x", tx, x)?;
    let gpu: &Gpu = x.gpu();
    let dtype = x.dtype();
    let h2 = gpu.alloc_out(&[2 * d.t, d.hd], dtype)?;
    let g = gpu.alloc_out(&[d.t, d.hd], dtype)?;
    let y = gpu.alloc_out(&[d.t, d.c], dtype)?;
    let ty = gpu.alloc_out(&[d.t, d.c], dtype)?;
    gpu.run(&plan_jvp(
        dtype,
        d,
        x.ptr(),
        tx.ptr(),
        p.ptrs(),
        h2.ptr(),
        g.ptr(),
        y.ptr(),
        ty.ptr(),
    )?)?;
    Ok((y, Some(ty)))
}

/// Gradients on the GPU, in the dtype of x.
pub struct DeviceMlpGrads {
    /// [T, C].
    pub dx: DeviceTensor,
    /// [Hd, C].
    pub dw1: DeviceTensor,
    /// \[Hd\].
    pub db1: DeviceTensor,
    /// [C, Hd].
    pub dw2: DeviceTensor,
    /// \[C\].
    pub db2: DeviceTensor,
}

/// Gradients of x and the parameters from `gy` [T, C] on the GPU (scratch: three [T, Hd] buffers
/// and a \[T\] row of ones). Errors on a shape or dtype mismatch, `gy` included (its shape and
/// dtype must be those of x).
pub fn backward(x: &DeviceTensor, p: &DeviceMlp, gy: &DeviceTensor) -> Result<DeviceMlpGrads> {
    let d = check_device(x, p)?;
    expect_tensor(OP, "gy", gy, x.shape(), x.dtype())?;
    let gpu = x.gpu();
    let dtype = x.dtype();
    let th = [d.t, d.hd];
    let scratch = gpu.alloc_stacked(&[&th, &th, &th, &[d.t]], dtype)?;
    let g = DeviceMlpGrads {
        dx: gpu.alloc_out(&[d.t, d.c], dtype)?,
        dw1: gpu.alloc_out(&[d.hd, d.c], dtype)?,
        db1: gpu.alloc_out(&[d.hd], dtype)?,
        dw2: gpu.alloc_out(&[d.c, d.hd], dtype)?,
        db2: gpu.alloc_out(&[d.c], dtype)?,
    };
    let b = BwdPtrs {
        pre: scratch[0].ptr(),
        g: scratch[1].ptr(),
        dg: scratch[2].ptr(),
        ones: scratch[3].ptr(),
        dx: g.dx.ptr(),
        dw1: g.dw1.ptr(),
        db1: g.db1.ptr(),
        dw2: g.dw2.ptr(),
        db2: g.db2.ptr(),
    };
    gpu.run(&plan_backward(dtype, d, x.ptr(), p.ptrs(), gy.ptr(), b)?)?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ParamPtrs {
        ParamPtrs {
            w1: 0x10000,
            b1: 0x20000,
            w2: 0x30000,
            b2: 0x40000,
        }
    }

    /// The JVP is four GEMMs and nothing else: the activation and its tangent come out of the
    /// first layer's epilogues (GELU_AUX_BIAS saving the pre-activation, DGELU reading it).
    #[test]
    fn jvp_is_four_gemms_with_the_gelu_in_their_epilogues() {
        let d = MlpDims { t: 5, c: 8, hd: 16 };
        let (x, tx, h2, g, y, ty) = (0x100000, 0x900000, 0x200000, 0x300000, 0x400000, 0x500000);
        let steps = plan_jvp(DType::BF16, d, x, tx, params(), h2, g, y, ty).unwrap();
        let gemms: Vec<Gemm> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Gemm(g) => Some(*g),
                _ => None,
            })
            .collect();
        assert_eq!(gemms.len(), steps.len(), "only GEMMs");
        assert_eq!(gemms.len(), 4);
        let th = h2 + 5 * 16 * 2;
        assert_eq!(
            (gemms[0].a, gemms[0].c, gemms[0].bias),
            (x, g, Some(params().b1))
        );
        assert_eq!(gemms[0].act, GemmAct::GeluAux { aux: h2 });
        assert_eq!((gemms[1].a, gemms[1].c, gemms[1].bias), (tx, th, None));
        assert_eq!(gemms[1].act, GemmAct::DGelu { aux: h2 });
        assert_eq!(
            (gemms[2].a, gemms[2].c, gemms[2].bias),
            (g, y, Some(params().b2))
        );
        assert_eq!((gemms[3].a, gemms[3].c, gemms[3].bias), (th, ty, None));
        assert!(gemms[2..].iter().all(|g| g.act == GemmAct::None));
    }

    /// f64 is refused by every plan: the GEMMs would otherwise read its buffers as f32.
    #[test]
    fn f64_plans_are_refused() {
        let d = MlpDims { t: 5, c: 8, hd: 16 };
        let b = BwdPtrs {
            pre: 1,
            g: 2,
            dg: 3,
            ones: 4,
            dx: 5,
            dw1: 6,
            db1: 7,
            dw2: 8,
            db2: 9,
        };
        let errs = [
            plan_forward(DType::F64, d, 0x100, params(), 0x200, 0x300).unwrap_err(),
            plan_jvp(DType::F64, d, 1, 2, params(), 3, 4, 5, 6).unwrap_err(),
            plan_backward(DType::F64, d, 1, params(), 2, b).unwrap_err(),
        ];
        for e in errs {
            assert!(e.to_string().contains("f64"), "{e}");
        }
        for dt in [DType::BF16, DType::F16, DType::F32] {
            plan_forward(dt, d, 0x100, params(), 0x200, 0x300).unwrap();
            plan_backward(dt, d, 1, params(), 2, b).unwrap();
        }
    }

    #[test]
    fn shapes_are_named() {
        let e = check_shapes(&[4, 8], &[16, 8], &[15], &[8, 16], &[8]).unwrap_err();
        assert!(e.to_string().contains("`b1`"), "{e}");
        let e = check_shapes(&[4, 8], &[16, 8], &[16], &[8, 16, 1], &[8]).unwrap_err();
        assert!(
            matches!(e, Error::Rank { .. }) && e.to_string().contains("`w2`"),
            "{e}"
        );
        let e = check_shapes(&[4, 8, 1], &[16, 8], &[16], &[8, 16], &[8]).unwrap_err();
        assert!(e.to_string().contains("`x`"), "{e}");
    }
}
