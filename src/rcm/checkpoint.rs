//! Training state on disk. A checkpoint is one safetensors file (written atomically: a temporary
//! file, then a rename) holding every tensor of a phase under a prefix ("net.", "ema.",
//! "adam_m.", ...) and the phase's counters as a small f64 tensor "counters", so a run killed at
//! any moment resumes from the last complete checkpoint and loses nothing before it.
//!
//! The counters end with [`fingerprint_tag`] of the settings that wrote them, so a checkpoint
//! left by another run (other seed, other settings) is recognised as such even where the
//! `*.run.json` beside it names the current settings.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{self, TensorMap};
use crate::tensor::Tensor;

/// Names of the parameter tensors, in the DiT's canonical order; the errors of
/// `Dit::param_layout` for a config no network can have.
pub fn param_names(config: &crate::dit::DitConfig) -> Result<Vec<String>> {
    Ok(crate::dit::Dit::param_layout(config)?
        .into_iter()
        .map(|(n, _)| n)
        .collect())
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

    /// The tensors saved under `prefix`, in the order of `names`, each with the shape and dtype
    /// of the same tensor of `like` (the network being resumed); [`Error::Format`] naming the
    /// file and the tensor when one is missing or differs (an edited or foreign checkpoint).
    pub fn group_like(
        &self,
        prefix: &str,
        names: &[String],
        like: &[Tensor],
    ) -> Result<Vec<Tensor>> {
        let group = self.group(prefix, names)?;
        if like.len() != group.len() {
            return Err(Error::invalid(
                "checkpoint",
                format!("{} reference tensors for {} names", like.len(), group.len()),
            ));
        }
        for ((n, t), l) in names.iter().zip(&group).zip(like) {
            if t.shape() != l.shape() || t.dtype() != l.dtype() {
                return Err(Error::Format {
                    path: self.label.clone(),
                    message: format!(
                        "tensor `{prefix}.{n}` is {:?} {}, expected {:?} {}",
                        t.shape(),
                        t.dtype(),
                        l.shape(),
                        l.dtype()
                    ),
                });
            }
        }
        Ok(group)
    }

    /// The counters as counts, one per label (their names in error messages): [`Error::Format`]
    /// naming the file unless there are exactly `labels.len()` of them, each a whole number in
    /// [0, 2^53] (an edited counter of NaN, −1, 2.5 or 1e300 is refused, not cast to 0 or
    /// `usize::MAX`).
    pub fn counts(&self, labels: &[&str]) -> Result<Vec<usize>> {
        let c = self.counters()?;
        let bad = |message: String| Error::Format {
            path: self.label.clone(),
            message,
        };
        if c.len() != labels.len() {
            return Err(bad(format!(
                "checkpoint has {} counters, expected {} ({})",
                c.len(),
                labels.len(),
                labels.join(", ")
            )));
        }
        c.iter()
            .zip(labels)
            .map(|(&v, label)| {
                let whole = v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= MAX_COUNT;
                whole
                    .then(|| usize::try_from(v as u64).ok())
                    .flatten()
                    .ok_or_else(|| {
                        bad(format!(
                            "counter `{label}` is {v}; expected a whole number from 0 to {}",
                            MAX_COUNT.min(usize::MAX as f64)
                        ))
                    })
            })
            .collect()
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

/// The largest counter a checkpoint holds: 2^53, up to which f64 holds every whole number.
const MAX_COUNT: f64 = 9_007_199_254_740_992.0;

/// A 52-bit hash (FNV-1a, stable across builds) of a phase's fingerprint, exact as an f64: the
/// last counter of a checkpoint, compared on resume.
pub fn fingerprint_tag(fingerprint: &str) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in fingerprint.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 12) as f64
}

/// Removes `path` if it exists (a stale checkpoint or fingerprint); [`Error::Io`] when it exists
/// but cannot be removed.
pub fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            path: path.display().to_string(),
            message: format!("cannot remove: {e}"),
        }),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn with_counters(c: &[f64]) -> Checkpoint {
        let mut map = TensorMap::new();
        map.insert(
            "counters".into(),
            Tensor::from_vec(c.to_vec(), &[c.len()]).unwrap(),
        );
        Checkpoint {
            map,
            label: "out/x.ckpt.safetensors".into(),
        }
    }

    #[test]
    fn counters_must_be_whole_counts() {
        let labels = ["step", "adam step", "fingerprint"];
        let tag = fingerprint_tag("teacher|...");
        assert_eq!(tag, tag.trunc());
        assert!(tag < MAX_COUNT);
        let c = with_counters(&[4.0, 4.0, tag]).counts(&labels).unwrap();
        assert_eq!(c, vec![4, 4, tag as usize]);
        // Short (used to panic on indexing), NaN, negative, fractional and huge counters (used
        // to become 0 or usize::MAX under `as usize`) are errors naming the file and counter.
        let e = with_counters(&[4.0, 4.0])
            .counts(&labels)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.ckpt.safetensors") && e.contains("2 counters"),
            "{e}"
        );
        for bad in [f64::NAN, -1.0, 2.5, 1e300, f64::INFINITY] {
            let e = with_counters(&[4.0, bad, tag])
                .counts(&labels)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("`adam step`") && e.contains("x.ckpt"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn groups_must_match_the_network() {
        let like = vec![Tensor::from_vec(vec![0f32; 2], &[2]).unwrap()];
        let names = vec!["w".to_string()];
        let mut map = TensorMap::new();
        map.insert("net.w".into(), like[0].to_dtype(crate::tensor::DType::F64));
        let ck = Checkpoint {
            map,
            label: "c".into(),
        };
        let e = ck.group_like("net", &names, &like).unwrap_err().to_string();
        assert!(e.contains("net.w"), "{e}");
        assert!(ck.group_like("ema", &names, &like).is_err());
    }
}
