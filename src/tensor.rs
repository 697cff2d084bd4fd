//! Tensors: a shape, a dtype and contiguous row-major storage.
//!
//! On the CPU the reference ops compute in f32 or f64; bf16 and f16 are storage types (the GPU's
//! working dtypes, and what safetensors files often hold) that convert to f32 with `to_dtype`.

use half::{bf16, f16};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
        }
    }

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
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
}

/// A scalar type that a tensor can hold.
pub trait Element: Copy + Send + Sync + std::fmt::Debug + 'static {
    const DTYPE: DType;
    fn into_storage(v: Vec<Self>) -> Storage;
    fn slice(s: &Storage) -> Option<&[Self]>;
    fn slice_mut(s: &mut Storage) -> Option<&mut [Self]>;
    fn to_f64(self) -> f64;
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
element!(bf16, BF16, |x: bf16| x.to_f64(), bf16::from_f64);
element!(f16, F16, |x: f16| x.to_f64(), f16::from_f64);

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

impl Tensor {
    /// A tensor over `data` in row-major order; `data.len()` must equal the product of `shape`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        let numel: usize = shape.iter().product();
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
        let numel: usize = shape.iter().product();
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

    pub fn from_f64_vec(data: Vec<f64>, shape: &[usize], dtype: DType) -> Result<Self> {
        Tensor::from_vec(data, shape).map(|t| t.to_dtype(dtype))
    }

    pub fn zeros(shape: &[usize], dtype: DType) -> Self {
        let n: usize = shape.iter().product();
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

    /// Standard normal entries drawn from `rng`.
    pub fn randn(shape: &[usize], dtype: DType, rng: &mut impl Rng) -> Self {
        let n: usize = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::F64(data),
        }
        .to_dtype(dtype)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::F32(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::BF16(_) => DType::BF16,
            Storage::F16(_) => DType::F16,
        }
    }

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
                    .map(|&x| bf16::from_f64(x))
                    .collect(),
            ),
            (_, DType::F16) => Storage::F16(
                self.to_f64_vec()
                    .iter()
                    .map(|&x| f16::from_f64(x))
                    .collect(),
            ),
        };
        Tensor {
            shape: self.shape.clone(),
            storage,
        }
    }

    /// The same elements under another shape with the same number of elements.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
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
