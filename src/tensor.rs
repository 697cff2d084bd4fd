//! Tensors: a shape, a dtype and contiguous row-major storage.
//!
//! On the CPU the reference ops compute in f32 or f64; bf16 and f16 are storage types (the GPU's
//! working dtypes, and what safetensors files often hold) that convert to f32 with `to_dtype`.

use half::{bf16, f16};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32: a CPU compute type, the GPU's f32 storage.
    F32,
    /// IEEE binary64: the CPU reference's exact-as-possible compute type (no GPU kernels).
    F64,
    /// bfloat16 (8-bit exponent, 8-bit significand): the GPU's usual storage type.
    BF16,
    /// IEEE binary16 (5-bit exponent, 11-bit significand): GPU storage.
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The short name (`f32`, `f64`, `bf16`, `f16`), as the CLI and `Display` spell it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }

    /// A dtype from its short name or PyTorch's (`float32`, `bfloat16` ...), any case.
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f64" | "float64" => Ok(DType::F64),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" => Ok(DType::F16),
            other => Err(Error::Unsupported(format!(
                "unknown dtype `{other}`: expected f32, f64, bf16 or f16"
            ))),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Host storage, one variant per dtype. Device storage joins this enum with the CUDA backend.
#[derive(Clone, Debug, PartialEq)]
pub enum Storage {
    /// f32 elements.
    F32(Vec<f32>),
    /// f64 elements.
    F64(Vec<f64>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// f16 elements.
    F16(Vec<f16>),
}

/// A scalar type that a tensor can hold.
pub trait Element: Copy + Send + Sync + std::fmt::Debug + 'static {
    /// The dtype of a tensor of `Self`.
    const DTYPE: DType;
    /// The storage variant holding `v`.
    fn into_storage(v: Vec<Self>) -> Storage;
    /// The elements when `s` holds `Self`, else `None`.
    fn slice(s: &Storage) -> Option<&[Self]>;
    /// The elements, mutably, when `s` holds `Self`, else `None`.
    fn slice_mut(s: &mut Storage) -> Option<&mut [Self]>;
    /// Widened to f64 (exact).
    fn to_f64(self) -> f64;
    /// Rounded from f64 to nearest, ties to even.
    fn from_f64(x: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn into_storage(v: Vec<Self>) -> Storage {
                Storage::$variant(v)
            }
            fn slice(s: &Storage) -> Option<&[Self]> {
                match s {
                    Storage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut Storage) -> Option<&mut [Self]> {
                match s {
                    Storage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn to_f64(self) -> f64 {
                ($to)(self)
            }
            fn from_f64(x: f64) -> Self {
                ($from)(x)
            }
        }
    };
}
element!(f32, F32, |x: f32| x as f64, |x: f64| x as f32);
element!(f64, F64, |x: f64| x, |x: f64| x);
element!(bf16, BF16, |x: bf16| x.to_f64(), bf16_from_f64);
element!(f16, F16, |x: f16| x.to_f64(), f16_from_f64);

/// f64 → f32 rounded to odd: the f32 next toward zero, with its last bit set when x is not exact.
/// Rounding that to nearest in a format at least two bits shorter gives x correctly rounded.
fn f64_to_f32_odd(x: f64) -> f32 {
    let r = x as f32;
    if !r.is_finite() || r as f64 == x {
        return r;
    }
    let toward_zero = if (r as f64).abs() > x.abs() {
        f32::from_bits(r.to_bits() - 1)
    } else {
        r
    };
    f32::from_bits(toward_zero.to_bits() | 1)
}

/// f64 → bf16, to nearest with ties to even. `half`'s `bf16::from_f64` drops the low 32 bits of
/// the f64 before rounding, so a value just past a halfway point can round the wrong way (rare, but
/// visible to a bit-exact check); rounding to odd in f32 first is exact.
pub fn bf16_from_f64(x: f64) -> bf16 {
    bf16::from_f32(f64_to_f32_odd(x))
}

/// f64 → f16, to nearest with ties to even (as [`bf16_from_f64`]).
pub fn f16_from_f64(x: f64) -> f16 {
    f16::from_f32(f64_to_f32_odd(x))
}

/// The number of elements of `shape` for constructors that return no `Result`; the panic of
/// `vec!` with a capacity overflow, but naming the shape.
fn numel_or_panic(op: &'static str, shape: &[usize]) -> usize {
    match checked_numel(op, shape, 8) {
        Ok(n) => n,
        Err(e) => panic!("{e}"),
    }
}

/// The number of elements of `shape`, or an error naming `op` when the product (or, with
/// `elem_bytes`, the byte count) overflows: a shape from outside must never wrap to a small size.
pub fn checked_numel(op: &'static str, shape: &[usize], elem_bytes: usize) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|n| {
            n.checked_mul(elem_bytes.max(1))
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or_else(|| {
            Error::invalid(
                op,
                format!("shape {shape:?} holds more elements than memory can address"),
            )
        })
}

/// A host tensor: a shape and row-major storage of its dtype whose length is the product of the
/// shape (every constructor checks it).
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// A tensor over `data` in row-major order; `data.len()` must equal the product of `shape`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        let numel = checked_numel("tensor", shape, 1)?;
        if numel != data.len() {
            return Err(Error::invalid(
                "tensor",
                format!(
                    "shape {shape:?} holds {numel} elements but {} were given",
                    data.len()
                ),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: T::into_storage(data),
        })
    }

    /// A tensor over existing storage; its length must equal the product of `shape`.
    pub fn from_storage(storage: Storage, shape: &[usize]) -> Result<Self> {
        let numel = checked_numel("tensor", shape, 1)?;
        let len = match &storage {
            Storage::F32(v) => v.len(),
            Storage::F64(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::F16(v) => v.len(),
        };
        if numel != len {
            return Err(Error::invalid(
                "tensor",
                format!("shape {shape:?} holds {numel} elements but the data has {len}"),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage,
        })
    }

    /// A tensor of `dtype` from f64 values (rounded to nearest, ties to even).
    pub fn from_f64_vec(data: Vec<f64>, shape: &[usize], dtype: DType) -> Result<Self> {
        Tensor::from_vec(data, shape).map(|t| t.to_dtype(dtype))
    }

    /// A tensor of zeros.
    ///
    /// # Panics
    /// When the shape holds more elements than memory can address (as `vec!` does).
    pub fn zeros(shape: &[usize], dtype: DType) -> Self {
        let n = numel_or_panic("Tensor::zeros", shape);
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::F64 => Storage::F64(vec![0.0; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
        };
        Tensor {
            shape: shape.to_vec(),
            storage,
        }
    }

    /// Standard normal entries drawn from `rng` (in f64, then rounded to `dtype`).
    ///
    /// # Panics
    /// When the shape holds more elements than memory can address.
    pub fn randn(shape: &[usize], dtype: DType, rng: &mut impl Rng) -> Self {
        let n = numel_or_panic("Tensor::randn", shape);
        let data: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::F64(data),
        }
        .to_dtype(dtype)
    }

    /// The sizes of the dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The number of elements (1 for a scalar of rank 0).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::F32(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
        }
    }

    /// The elements, row-major.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The elements as `T`, or a dtype error naming `T`.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        let dtype = self.dtype();
        T::slice(&self.storage).ok_or_else(|| Error::DType {
            op: "tensor",
            tensor: "self".into(),
            expected: T::DTYPE.to_string(),
            actual: dtype,
        })
    }

    /// The elements as `T`, mutably, or a dtype error naming `T`.
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        let dtype = self.dtype();
        T::slice_mut(&mut self.storage).ok_or_else(|| Error::DType {
            op: "tensor",
            tensor: "self".into(),
            expected: T::DTYPE.to_string(),
            actual: dtype,
        })
    }

    /// Every element widened to f64 (exact for all dtypes).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.storage {
            Storage::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Storage::F64(v) => v.clone(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Storage::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
        }
    }

    /// A copy in another dtype (round to nearest); a clone when the dtype already matches.
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let storage = match (&self.storage, dtype) {
            (Storage::F64(v), DType::F32) => Storage::F32(v.iter().map(|&x| x as f32).collect()),
            (Storage::BF16(v), DType::F32) => Storage::F32(v.iter().map(|x| x.to_f32()).collect()),
            (Storage::F16(v), DType::F32) => Storage::F32(v.iter().map(|x| x.to_f32()).collect()),
            (Storage::F32(v), DType::BF16) => {
                Storage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect())
            }
            (Storage::F32(v), DType::F16) => {
                Storage::F16(v.iter().map(|&x| f16::from_f32(x)).collect())
            }
            (_, DType::F64) => Storage::F64(self.to_f64_vec()),
            (_, DType::F32) => Storage::F32(self.to_f64_vec().iter().map(|&x| x as f32).collect()),
            (_, DType::BF16) => Storage::BF16(
                self.to_f64_vec()
                    .iter()
                    .map(|&x| bf16_from_f64(x))
                    .collect(),
            ),
            (_, DType::F16) => {
                Storage::F16(self.to_f64_vec().iter().map(|&x| f16_from_f64(x)).collect())
            }
        };
        Tensor {
            shape: self.shape.clone(),
            storage,
        }
    }

    /// The same elements under another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        let n = checked_numel("reshape", shape, 1)?;
        if n != self.numel() {
            return Err(Error::invalid(
                "reshape",
                format!(
                    "cannot view shape {:?} ({} elements) as {shape:?} ({n} elements)",
                    self.shape,
                    self.numel()
                ),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn shapes_that_overflow_are_errors() {
        // 2^64 elements would wrap to 0 and match an empty buffer.
        let e = Tensor::from_vec(Vec::<f32>::new(), &[1 << 32, 1 << 32]).unwrap_err();
        assert!(e.to_string().contains("more elements than memory"), "{e}");
        assert!(Tensor::from_storage(Storage::F32(vec![]), &[1 << 32, 1 << 32]).is_err());
        let x = Tensor::from_vec(vec![1.0f32; 6], &[2, 3]).unwrap();
        assert!(x.clone().reshape(&[usize::MAX, 2]).is_err());
        assert_eq!(x.reshape(&[3, 2]).unwrap().shape(), &[3, 2]);
        assert_eq!(checked_numel("t", &[], 4).unwrap(), 1);
        assert!(checked_numel("t", &[1 << 62], 4).is_err());
    }

    /// x rounded to nearest, ties to even, among the positive values of a 16-bit format: the
    /// neighbours of `near` (any value within an ulp) decided by exact midpoints (each midpoint of
    /// two 16-bit values is exact in f64).
    fn reference(x: f64, near: u16, value: impl Fn(u16) -> f64) -> u16 {
        let lo = (near.saturating_sub(2)..=near + 2)
            .rev()
            .find(|&b| value(b) <= x)
            .unwrap();
        let (a, b) = (value(lo), value(lo + 1));
        let mid = (a + b) / 2.0;
        if x < mid || (x == mid && lo % 2 == 0) {
            lo
        } else {
            lo + 1
        }
    }

    #[test]
    fn f64_to_16_bit_formats_round_to_nearest_even() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut xs: Vec<f64> = Vec::new();
        for _ in 0..20000 {
            // Random magnitudes, and values at and just off the halfway points of both formats,
            // among them f32-exact ones whose low 16 bits are 0x8000 plus a little (where dropping
            // low bits before rounding goes wrong).
            let e = rng.random_range(-20..20);
            xs.push(rng.random::<f64>() * 2f64.powi(e));
            let b = rng.random_range(0x3000u16..0x4f00);
            let mid = (bf16::from_bits(b).to_f64() + bf16::from_bits(b + 1).to_f64()) / 2.0;
            let h = rng.random_range(0x0400u16..0x7000);
            let hmid = (f16::from_bits(h).to_f64() + f16::from_bits(h + 1).to_f64()) / 2.0;
            for m in [mid, hmid] {
                xs.extend([m, m * (1.0 + 1e-12), m * (1.0 - 1e-12)]);
            }
            let k = rng.random_range(1u32..8);
            xs.push(f32::from_bits(((b as u32) << 16) | 0x8000 | k) as f64);
        }
        for x in xs {
            let want = reference(x, bf16::from_f64(x).to_bits(), |b| {
                bf16::from_bits(b).to_f64()
            });
            assert_eq!(bf16_from_f64(x).to_bits(), want, "bf16 of {x:e}");
            assert_eq!(
                bf16_from_f64(-x).to_bits(),
                want | 0x8000,
                "bf16 of {:e}",
                -x
            );
            if x < 65000.0 {
                let want = reference(x, f16::from_f64(x).to_bits(), |b| {
                    f16::from_bits(b).to_f64()
                });
                assert_eq!(f16_from_f64(x).to_bits(), want, "f16 of {x:e}");
            }
        }
        // Specials: overflow, NaN, zero signs, the smallest magnitudes.
        assert!(bf16_from_f64(1e300).is_infinite() && f16_from_f64(1e6).is_infinite());
        assert!(bf16_from_f64(f64::NAN).is_nan() && f16_from_f64(f64::NAN).is_nan());
        assert_eq!(bf16_from_f64(-0.0).to_bits(), 0x8000);
        assert_eq!(bf16_from_f64(1e-300).to_bits(), 0);
        assert_eq!(f16_from_f64(-1e-300).to_bits(), 0x8000);
    }
}
