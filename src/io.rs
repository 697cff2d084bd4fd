//! safetensors in and out. Reading never panics on a malformed file: a header longer than the file,
//! bad JSON or an unsupported dtype each come back as a `Format` error naming the file.
//! Writing is atomic (a temporary file beside the target, then a rename), so an interrupted
//! checkpoint never leaves a torn file behind.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, SafeTensors, View};

use crate::error::{Error, Result};
use crate::tensor::{DType, Storage, Tensor};

/// Named tensors, sorted by name.
pub type TensorMap = BTreeMap<String, Tensor>;

/// Reads every tensor of a safetensors file. Only a regular file is read (a device such as
/// /dev/zero or a pipe could grow the buffer without end), into a buffer reserved at its size.
pub fn load_safetensors(path: &Path) -> Result<TensorMap> {
    use std::io::Read;
    let io = |message: String| Error::Io {
        path: path.display().to_string(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|e| io(format!("cannot read: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| io(format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(io("not a regular file".into()));
    }
    let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len).map_err(|_| {
        io(format!(
            "a file of {} bytes does not fit in memory",
            meta.len()
        ))
    })?;
    file.read_to_end(&mut bytes)
        .map_err(|e| io(format!("cannot read: {e}")))?;
    parse_safetensors(&bytes, &path.display().to_string())
}

/// Parses safetensors bytes; `label` names the source in errors.
pub fn parse_safetensors(bytes: &[u8], label: &str) -> Result<TensorMap> {
    let format = |message: String| Error::Format {
        path: label.to_string(),
        message,
    };
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| format(format!("not a valid safetensors file: {e}")))?;
    let mut out = TensorMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let raw = view.data();
        let storage = match view.dtype() {
            Dtype::F32 => Storage::F32(decode(raw, f32::from_le_bytes)),
            Dtype::F64 => Storage::F64(decode(raw, f64::from_le_bytes)),
            Dtype::BF16 => Storage::BF16(decode(raw, |b: [u8; 2]| {
                bf16::from_bits(u16::from_le_bytes(b))
            })),
            Dtype::F16 => Storage::F16(decode(raw, |b: [u8; 2]| {
                f16::from_bits(u16::from_le_bytes(b))
            })),
            other => {
                return Err(format(format!(
                    "tensor `{name}` has dtype {other:?}; flashjvp reads F32, F64, BF16 and F16"
                )))
            }
        };
        let tensor = Tensor::from_storage(storage, &shape)
            .map_err(|e| format(format!("tensor `{name}`: {e}")))?;
        out.insert(name, tensor);
    }
    Ok(out)
}

fn decode<const N: usize, T>(raw: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    raw.chunks_exact(N)
        .map(|c| f(c.try_into().expect("chunks_exact yields N bytes")))
        .collect()
}

struct TensorBytes<'a>(&'a Tensor);

impl View for TensorBytes<'_> {
    fn dtype(&self) -> Dtype {
        match self.0.dtype() {
            DType::F32 => Dtype::F32,
            DType::F64 => Dtype::F64,
            DType::BF16 => Dtype::BF16,
            DType::F16 => Dtype::F16,
        }
    }
    fn shape(&self) -> &[usize] {
        self.0.shape()
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(match self.0.storage() {
            Storage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            Storage::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
        })
    }
    fn data_len(&self) -> usize {
        self.0.numel() * self.0.dtype().size_in_bytes()
    }
}

/// The safetensors bytes of named tensors.
pub fn serialize_safetensors<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<Vec<u8>> {
    let views: Vec<(&str, TensorBytes)> = tensors
        .into_iter()
        .map(|(n, t)| (n, TensorBytes(t)))
        .collect();
    safetensors::serialize(views, None).map_err(|e| Error::Format {
        path: "<memory>".into(),
        message: format!("cannot serialize: {e}"),
    })
}

/// Writes named tensors atomically: a temporary file in the same folder, then a rename.
pub fn save_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<()> {
    let bytes = serialize_safetensors(tensors)?;
    let io = |e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        message: format!("cannot write: {e}"),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    // On any failure the temporary file goes too: nothing is left beside the target.
    let written = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_dtype() {
        let a = Tensor::from_vec(vec![1.5f32, -2.0, 3.25, 0.1], &[2, 2]).unwrap();
        let b = Tensor::from_vec(vec![0.1f64, 1e300, -7.0], &[3]).unwrap();
        let c = a.to_dtype(DType::BF16);
        let d = a.to_dtype(DType::F16);
        let bytes = serialize_safetensors([("a", &a), ("b", &b), ("c", &c), ("d", &d)]).unwrap();
        let m = parse_safetensors(&bytes, "mem").unwrap();
        assert_eq!(m["a"], a);
        assert_eq!(m["b"], b);
        assert_eq!(m["c"], c);
        assert_eq!(m["d"], d);
    }

    #[test]
    fn malformed_headers_are_errors() {
        // Header length far beyond the file.
        let mut bytes = (1u64 << 40).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(parse_safetensors(&bytes, "big").is_err());
        // Bad JSON.
        let json = b"{not json";
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json);
        assert!(parse_safetensors(&bytes, "json").is_err());
        // Too short to hold a length.
        assert!(parse_safetensors(&[1, 2, 3], "short").is_err());
        // An integer dtype.
        let json = br#"{"x":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#;
        let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(json);
        bytes.extend_from_slice(&[0; 4]);
        let err = parse_safetensors(&bytes, "int").unwrap_err().to_string();
        assert!(err.contains("`x`") && err.contains("I32"), "{err}");
    }

    #[test]
    fn only_regular_files_are_read_and_failed_writes_leave_nothing() {
        // A device would be read without end; a folder is no file either.
        let e = load_safetensors(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let dir = std::env::temp_dir().join(format!("flashjvp-io-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("taken")).unwrap();
        assert!(load_safetensors(&dir).is_err());
        // The rename onto a folder fails: no temporary file stays beside it.
        let a = Tensor::from_vec(vec![1.0f32], &[1]).unwrap();
        assert!(save_safetensors(&dir.join("taken"), [("a", &a)]).is_err());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        save_safetensors(&dir.join("ok.safetensors"), [("a", &a)]).unwrap();
        assert_eq!(
            load_safetensors(&dir.join("ok.safetensors")).unwrap()["a"],
            a
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
