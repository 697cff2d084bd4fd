//! Training state on disk. A checkpoint is one safetensors file (written atomically: a temporary
//! file, then a rename) holding every tensor of a phase under a prefix ("net.", "ema.",
//! "adam_m.", ...) and the phase's counters as a small f64 tensor "counters", so a run killed at
//! any moment resumes from the last complete checkpoint and loses nothing before it.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{self, TensorMap};
use crate::tensor::Tensor;

/// Names of the parameter tensors, in the DiT's canonical order.
pub fn param_names(config: &crate::dit::DitConfig) -> Vec<String> {
    crate::dit::Dit::param_layout(config)
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

/// Writes groups of tensors (each named `prefix.name`) and the counters to `path`.
/// [`Error::Invalid`] when a group does not hold one tensor per name.
pub fn save(
    path: &Path,
    names: &[String],
    groups: &[(&str, &[Tensor])],
    counters: &[f64],
) -> Result<()> {
    let mut owned: Vec<(String, &Tensor)> = Vec::new();
    for (prefix, tensors) in groups {
        if tensors.len() != names.len() {
            return Err(Error::invalid(
                "checkpoint",
                format!(
                    "group `{prefix}` has {} tensors for {} names",
                    tensors.len(),
                    names.len()
                ),
            ));
        }
        for (n, t) in names.iter().zip(tensors.iter()) {
            owned.push((format!("{prefix}.{n}"), t));
        }
    }
    let counters = Tensor::from_vec(counters.to_vec(), &[counters.len()])?;
    owned.push(("counters".to_string(), &counters));
    io::save_safetensors(path, owned.iter().map(|(n, t)| (n.as_str(), *t)))
}

/// A checkpoint read back from disk.
pub struct Checkpoint {
    map: TensorMap,
    label: String,
}

impl Checkpoint {
    /// Reads every tensor of the checkpoint file at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        Ok(Checkpoint {
            map: io::load_safetensors(path)?,
            label: path.display().to_string(),
        })
    }

    /// The tensors saved under `prefix`, in the order of `names`; [`Error::Format`] when one is
    /// missing.
    pub fn group(&self, prefix: &str, names: &[String]) -> Result<Vec<Tensor>> {
        names
            .iter()
            .map(|n| {
                let key = format!("{prefix}.{n}");
                self.map.get(&key).cloned().ok_or_else(|| Error::Format {
                    path: self.label.clone(),
                    message: format!("checkpoint has no tensor `{key}`"),
                })
            })
            .collect()
    }

    /// True when any tensor is saved under `prefix`.
    pub fn has_group(&self, prefix: &str) -> bool {
        let p = format!("{prefix}.");
        self.map.keys().any(|k| k.starts_with(&p))
    }

    /// The phase's counters as saved; [`Error::Format`] when the file has none.
    pub fn counters(&self) -> Result<Vec<f64>> {
        self.map
            .get("counters")
            .map(|t| t.to_f64_vec())
            .ok_or_else(|| Error::Format {
                path: self.label.clone(),
                message: "checkpoint has no `counters`".into(),
            })
    }
}

/// Writes bytes atomically (temporary file beside the target, then a rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        message: format!("cannot write: {e}"),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The fingerprint recorded beside a finished model or a running phase, if any.
pub fn read_fingerprint(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("fingerprint")?.as_str().map(str::to_string)
}

/// Writes `{"fingerprint": fingerprint, "info": extra}` to `path` as JSON, atomically.
pub fn write_fingerprint(path: &Path, fingerprint: &str, extra: serde_json::Value) -> Result<()> {
    let v = serde_json::json!({ "fingerprint": fingerprint, "info": extra });
    let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    write_atomic(path, text.as_bytes())
}
