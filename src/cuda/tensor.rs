//! Device tensors: a shape, a storage dtype (bf16, f16 or f32) and a range of device memory.
//!
//! Several tensors may share one allocation (see [`Gpu::upload_stacked`]): the MLP JVP stacks x
//! and its tangent as [x; ẋ] so that one GEMM serves both (DESIGN.md section 3). bf16 and f16
//! travel as their 16-bit patterns (the `half` crate's `to_bits`/`from_bits`).

use std::sync::Arc;

use half::{bf16, f16};

use super::context::{DeviceBuf, Gpu};
use super::launch::{dtype_suffix, pointwise_steps, Arg, Step};
use crate::error::{Error, Result};
use crate::tensor::{checked_numel, DType, Storage, Tensor};

/// The largest `align` [`Gpu::upload_packed`] takes, in bytes (a page).
pub const MAX_ALIGN: usize = 4096;

/// A contiguous row-major tensor in GPU memory.
#[derive(Clone)]
pub struct DeviceTensor {
    shape: Vec<usize>,
    dtype: DType,
    buf: Arc<DeviceBuf>,
    /// Byte offset of this tensor in `buf`.
    offset: usize,
    gpu: Gpu,
}

impl std::fmt::Debug for DeviceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceTensor({:?}, {}, at {:#x})",
            self.shape,
            self.dtype,
            self.ptr()
        )
    }
}

/// The quiet-NaN bit pattern of a storage dtype (what `poison` fills with).
pub fn nan_bits(dtype: DType) -> (usize, u32) {
    match dtype {
        DType::BF16 => (2, 0x7fc0),
        DType::F16 => (2, 0x7e00),
        _ => (4, 0x7fc0_0000),
    }
}

/// The bit pattern of 1.0 in a storage dtype.
pub fn one_bits(dtype: DType) -> (usize, u32) {
    match dtype {
        DType::BF16 => (2, 0x3f80),
        DType::F16 => (2, 0x3c00),
        _ => (4, 0x3f80_0000),
    }
}

fn host_bytes(t: &Tensor) -> Vec<u8> {
    match t.storage() {
        Storage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Storage::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        Storage::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        Storage::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn storage_from_bytes(bytes: &[u8], dtype: DType) -> Storage {
    match dtype {
        DType::F32 => Storage::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::BF16 => Storage::BF16(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::F16 => Storage::F16(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
        ),
        DType::F64 => Storage::F64(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ),
    }
}

impl Gpu {
    /// An uninitialised tensor (poison or write it before reading).
    pub fn alloc(&self, shape: &[usize], dtype: DType) -> Result<DeviceTensor> {
        dtype_suffix(dtype)?;
        let bytes = checked_numel("alloc", shape, dtype.size_in_bytes())? * dtype.size_in_bytes();
        Ok(DeviceTensor {
            shape: shape.to_vec(),
            dtype,
            buf: Arc::new(self.alloc_bytes(bytes)?),
            offset: 0,
            gpu: self.clone(),
        })
    }

    /// An output tensor: NaN-poisoned unless [`super::context::set_poison_outputs`] turned that
    /// off.
    pub fn alloc_out(&self, shape: &[usize], dtype: DType) -> Result<DeviceTensor> {
        let t = self.alloc(shape, dtype)?;
        if super::context::poison_outputs() {
            t.poison()?;
        }
        Ok(t)
    }

    /// A tensor of zeros.
    pub fn zeros(&self, shape: &[usize], dtype: DType) -> Result<DeviceTensor> {
        let t = self.alloc(shape, dtype)?;
        t.fill_bits(0)?;
        Ok(t)
    }

    /// A tensor filled with NaN (see [`DeviceTensor::poison`]).
    pub fn poisoned(&self, shape: &[usize], dtype: DType) -> Result<DeviceTensor> {
        let t = self.alloc(shape, dtype)?;
        t.poison()?;
        Ok(t)
    }

    /// `t` converted to `dtype` (round to nearest) and copied to the GPU.
    pub fn upload(&self, t: &Tensor, dtype: DType) -> Result<DeviceTensor> {
        Ok(self.upload_stacked(&[t], dtype)?.pop().expect("one tensor"))
    }

    /// Several tensors converted to `dtype` and copied back to back into one allocation, in
    /// order (each starts where the previous ends). Returns one view per tensor.
    pub fn upload_stacked(&self, ts: &[&Tensor], dtype: DType) -> Result<Vec<DeviceTensor>> {
        self.upload_packed(ts, dtype, 1)
    }

    /// Several tensors in one allocation, each starting at a multiple of `align` bytes (256
    /// gives every tensor the alignment of a separate allocation); `align` must be a power of two
    /// (1 packs them back to back) of at most [`MAX_ALIGN`].
    pub fn upload_packed(
        &self,
        ts: &[&Tensor],
        dtype: DType,
        align: usize,
    ) -> Result<Vec<DeviceTensor>> {
        dtype_suffix(dtype)?;
        if !align.is_power_of_two() || align > MAX_ALIGN {
            return Err(Error::invalid(
                "upload_packed",
                format!("align {align} is not a power of two at most {MAX_ALIGN} (bytes)"),
            ));
        }
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(ts.len());
        for t in ts {
            bytes.resize(bytes.len().next_multiple_of(align), 0);
            offsets.push(bytes.len());
            let converted;
            let t = if t.dtype() == dtype {
                *t
            } else {
                converted = t.to_dtype(dtype);
                &converted
            };
            bytes.extend_from_slice(&host_bytes(t));
        }
        self.bind()?;
        let mut buf = self.alloc_bytes(bytes.len())?;
        self.copy_to_device(&mut buf, 0, &bytes)?;
        let buf = Arc::new(buf);
        Ok(ts
            .iter()
            .zip(offsets)
            .map(|(t, offset)| DeviceTensor {
                shape: t.shape().to_vec(),
                dtype,
                buf: buf.clone(),
                offset,
                gpu: self.clone(),
            })
            .collect())
    }

    /// A tensor of `shape` filled in row-major order from `values`, each converted to `dtype`
    /// (round to nearest even), copied to the GPU a chunk at a time: the host never holds more
    /// than a chunk, whatever the size of the tensor. Errors if `values` ends early.
    pub(crate) fn upload_values(
        &self,
        shape: &[usize],
        dtype: DType,
        mut values: impl Iterator<Item = f32>,
    ) -> Result<DeviceTensor> {
        const CHUNK: usize = 1 << 20;
        let mut t = self.alloc(shape, dtype)?;
        let (n, size) = (t.numel(), dtype.size_in_bytes());
        self.bind()?;
        let buf = Arc::get_mut(&mut t.buf).expect("a fresh allocation is not shared");
        let mut bytes = Vec::with_capacity(CHUNK.min(n) * size);
        let mut done = 0;
        while done < n {
            let len = CHUNK.min(n - done);
            bytes.clear();
            for v in values.by_ref().take(len) {
                match dtype {
                    DType::BF16 => bytes.extend(bf16::from_f32(v).to_bits().to_le_bytes()),
                    DType::F16 => bytes.extend(f16::from_f32(v).to_bits().to_le_bytes()),
                    _ => bytes.extend(v.to_le_bytes()),
                }
            }
            if bytes.len() != len * size {
                return Err(Error::invalid(
                    "upload",
                    format!(
                        "{} values for a tensor of shape {shape:?} ({n} elements)",
                        done + bytes.len() / size
                    ),
                ));
            }
            self.copy_to_device(buf, done * size, &bytes)?;
            done += len;
        }
        Ok(t)
    }

    /// Tensors of the given shapes in one allocation, each 256-byte aligned, uninitialised (NaN-poisoned
    /// like [`Gpu::alloc_out`] when poisoning is on).
    pub fn alloc_stacked(&self, shapes: &[&[usize]], dtype: DType) -> Result<Vec<DeviceTensor>> {
        dtype_suffix(dtype)?;
        // Each slot starts 256-byte aligned, like a separate allocation (cuBLASLt, vector loads).
        let sizes: Vec<usize> = shapes
            .iter()
            .map(|s| {
                let n = checked_numel("alloc_stacked", s, dtype.size_in_bytes())?;
                Ok((n * dtype.size_in_bytes()).next_multiple_of(256))
            })
            .collect::<Result<_>>()?;
        // At most isize::MAX bytes in all, like any one allocation (checked_numel's bound).
        let total = sizes
            .iter()
            .try_fold(0usize, |a, &b| a.checked_add(b))
            .filter(|&t| t <= isize::MAX as usize)
            .ok_or_else(|| {
                Error::invalid(
                    "alloc_stacked",
                    format!(
                        "{dtype} tensors of shapes {shapes:?} hold more bytes in all than memory \
                         can address"
                    ),
                )
            })?;
        let buf = Arc::new(self.alloc_bytes(total)?);
        let mut offset = 0;
        let ts: Vec<DeviceTensor> = shapes
            .iter()
            .zip(sizes)
            .map(|(s, n)| {
                let t = DeviceTensor {
                    shape: s.to_vec(),
                    dtype,
                    buf: buf.clone(),
                    offset,
                    gpu: self.clone(),
                };
                offset += n;
                t
            })
            .collect();
        if super::context::poison_outputs() {
            for t in &ts {
                t.poison()?;
            }
        }
        Ok(ts)
    }
}

impl DeviceTensor {
    /// The shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The storage dtype: bf16, f16 or f32.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The number of elements (1 for shape []).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The size of the data in bytes (numel times the dtype's size; no alignment padding).
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }

    /// The GPU whose memory holds this tensor.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.buf.ptr() + self.offset as u64
    }

    /// This tensor's address as a kernel argument.
    pub fn arg(&self) -> Arg {
        Arg::Ptr(self.ptr())
    }

    /// The same memory under another shape with as many elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<DeviceTensor> {
        if checked_numel("reshape", shape, 1)? != self.numel() {
            return Err(Error::invalid(
                "reshape",
                format!("cannot view {:?} as {shape:?}", self.shape),
            ));
        }
        let mut t = self.clone();
        t.shape = shape.to_vec();
        Ok(t)
    }

    /// A view of `shape` starting `offset` elements into this tensor (same memory, same dtype);
    /// errors unless it lies within this tensor.
    pub fn view(&self, offset: usize, shape: &[usize]) -> Result<DeviceTensor> {
        let n = checked_numel("view", shape, 1)?;
        if offset.checked_add(n).is_none_or(|end| end > self.numel()) {
            return Err(Error::invalid(
                "view",
                format!(
                    "{shape:?} at element {offset} does not fit in {:?}",
                    self.shape
                ),
            ));
        }
        let mut t = self.clone();
        t.shape = shape.to_vec();
        t.offset += offset * self.dtype.size_in_bytes();
        Ok(t)
    }

    /// Copies the tensor to the host (waiting for the GPU; a failed kernel surfaces here).
    pub fn download(&self) -> Result<Tensor> {
        let gpu = &self.gpu;
        gpu.bind()?;
        let mut bytes = vec![0u8; self.bytes()];
        gpu.copy_to_host(&self.buf, self.offset, &mut bytes)?;
        Tensor::from_storage(storage_from_bytes(&bytes, self.dtype), &self.shape)
    }

    /// Sets every element to the bit pattern `bits` (its width is the dtype's).
    pub fn fill_bits(&self, bits: u32) -> Result<()> {
        let width = self.dtype.size_in_bytes();
        self.gpu.run(&[Step::Fill {
            ptr: self.ptr(),
            width,
            count: self.numel(),
            bits,
        }])
    }

    /// Fills the tensor with NaN, so that an element a kernel fails to write shows up in the
    /// comparison with the reference (the method: outputs are poisoned before each run).
    pub fn poison(&self) -> Result<()> {
        self.fill_bits(nan_bits(self.dtype).1)
    }

    /// A converted copy (f32 <-> bf16/f16 on the GPU; a copy when the dtype already matches).
    pub fn to_dtype(&self, dtype: DType) -> Result<DeviceTensor> {
        let out = self.gpu.alloc(&self.shape, dtype)?;
        self.gpu.run(&cast_plan(self, &out)?)?;
        Ok(out)
    }
}

/// The plan of a dtype conversion from `x` into `y` (same number of elements).
pub fn cast_plan(x: &DeviceTensor, y: &DeviceTensor) -> Result<Vec<Step>> {
    if y.numel() != x.numel() {
        return Err(Error::invalid(
            "cast",
            format!("{:?} into {:?}", x.shape(), y.shape()),
        ));
    }
    plan_cast(x.dtype(), y.dtype(), x.numel(), x.ptr(), y.ptr())
}

/// Converts `n` elements at `x` (dtype `from`) into `y` (dtype `to`): f32 <-> bf16/f16 by the cast
/// kernels (round to nearest even), a plain copy when the dtypes agree.
pub fn plan_cast(from: DType, to: DType, n: usize, x: u64, y: u64) -> Result<Vec<Step>> {
    if n == 0 {
        return Ok(vec![]);
    }
    let kernel = match (from, to) {
        (a, b) if a == b => {
            return Ok(vec![Step::Copy {
                src: x,
                dst: y,
                bytes: n * a.size_in_bytes(),
            }]);
        }
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::F32, DType::F16) => "cast_f32_f16",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (DType::F16, DType::F32) => "cast_f16_f32",
        (a, b) => {
            return Err(Error::Unsupported(format!(
                "no GPU conversion from {a} to {b} (convert through f32)"
            )))
        }
    };
    pointwise_steps(
        "cast",
        "elementwise.cu",
        kernel,
        n,
        vec![Arg::Ptr(x), Arg::Ptr(y), Arg::I64(n as i64)],
    )
}

/// Whether the byte ranges `[a.0, a.0 + a.1)` and `[b.0, b.0 + b.1)` share a byte (an empty range
/// shares none; the ends are computed without wrapping).
pub(crate) fn ranges_overlap(a: (u64, usize), b: (u64, usize)) -> bool {
    let end = |(p, n): (u64, usize)| p as u128 + n as u128;
    a.1 > 0 && b.1 > 0 && (a.0 as u128) < end(b) && (b.0 as u128) < end(a)
}

/// Errors unless the device bytes of every output are disjoint from those of every input and of
/// every other output: a kernel reading memory it (or another step of the plan) writes, or two
/// outputs written in one place, would give a silently wrong result. The error is an
/// [`Error::Invalid`] of `op` naming both tensors and their byte ranges.
pub(crate) fn check_disjoint(
    op: &'static str,
    outputs: &[(&str, &DeviceTensor)],
    inputs: &[(&str, &DeviceTensor)],
) -> Result<()> {
    let range = |t: &DeviceTensor| (t.ptr(), t.bytes());
    let show = |t: &DeviceTensor| {
        let (p, n) = range(t);
        format!("[{p:#x}, {:#x})", p as u128 + n as u128)
    };
    for (i, &(name, out)) in outputs.iter().enumerate() {
        let others = outputs[i + 1..]
            .iter()
            .map(|&(n, t)| ("output", n, t))
            .chain(inputs.iter().map(|&(n, t)| ("input", n, t)));
        for (kind, other_name, other) in others {
            if ranges_overlap(range(out), range(other)) {
                return Err(Error::invalid(
                    op,
                    format!(
                        "output `{name}` at {} overlaps {kind} `{other_name}` at {}: outputs must \
                         not share memory with an input or another output",
                        show(out),
                        show(other)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Errors unless `tangent` has the shape and dtype of `primal` (a [`Error::TangentMismatch`]
/// of `op` naming `name`, the primal).
pub(crate) fn expect_tangent(
    op: &'static str,
    name: &str,
    tangent: &DeviceTensor,
    primal: &DeviceTensor,
) -> Result<()> {
    if tangent.shape() != primal.shape() || tangent.dtype() != primal.dtype() {
        return Err(Error::TangentMismatch {
            op,
            tensor: name.into(),
            primal_shape: primal.shape().to_vec(),
            primal_dtype: primal.dtype(),
            tangent_shape: tangent.shape().to_vec(),
            tangent_dtype: tangent.dtype(),
        });
    }
    Ok(())
}

/// Errors unless `t` has `shape` and `dtype`: an [`Error::DType`] or an [`Error::Shape`] naming
/// `op` and the tensor `name`.
pub(crate) fn expect_tensor(
    op: &'static str,
    name: &str,
    t: &DeviceTensor,
    shape: &[usize],
    dtype: DType,
) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::DType {
            op,
            tensor: name.into(),
            expected: dtype.to_string(),
            actual: t.dtype(),
        });
    }
    if t.shape() != shape {
        return Err(Error::Shape {
            op,
            tensor: name.into(),
            expected: format!("{shape:?}"),
            actual: t.shape().to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ranges_overlap;

    #[test]
    fn byte_ranges_overlap_only_where_they_share_a_byte() {
        assert!(ranges_overlap((100, 10), (105, 10)));
        assert!(ranges_overlap((105, 10), (100, 10)));
        assert!(ranges_overlap((100, 10), (100, 1)));
        assert!(ranges_overlap((100, 100), (150, 1)));
        // Adjacent, empty, or far apart: disjoint.
        assert!(!ranges_overlap((100, 10), (110, 10)));
        assert!(!ranges_overlap((110, 10), (100, 10)));
        assert!(!ranges_overlap((100, 0), (100, 10)));
        assert!(!ranges_overlap((100, 10), (105, 0)));
        // Ends past u64::MAX do not wrap into a false answer.
        assert!(ranges_overlap(
            (u64::MAX - 4, usize::MAX),
            (u64::MAX - 1, 1)
        ));
        assert!(!ranges_overlap((u64::MAX - 4, usize::MAX), (0, 16)));
    }
}
