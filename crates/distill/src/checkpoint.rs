//! Checkpoints of a run in progress: the synthetic images, their momentum, the iteration, and
//! the run's settings (shared and the method's, with the method's name), so that a resumed run
//! continues bit-identically and a run with other settings is refused by name.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};

use crate::engine::Distiller;
use crate::error::DistillError;
use crate::matcher::Matcher;

/// The `format` metadata value. Version 2 records the method and nests its settings.
const CHECKPOINT_FORMAT: &str = "debiasdd-distill-checkpoint/2";
/// Checkpoints of debiasdd before methods were pluggable: readable, not resumable.
const CHECKPOINT_FORMAT_V1: &str = "debiasdd-distill-checkpoint/1";

impl<M: Matcher> Distiller<M> {
    /// The settings that must agree between a checkpoint and the run that resumes it: all but
    /// the number of iterations, as JSON.
    fn identity(&self) -> String {
        let mut json = self.config_json();
        json["settings"]["iterations"] = 0.into();
        json.to_string()
    }

    /// Writes images, momentum, iteration, method and settings to `path` (through a temporary
    /// file, so an interrupted write leaves the previous checkpoint intact).
    pub fn save_checkpoint(&self, path: &Path) -> Result<(), DistillError> {
        let write_err = |problem: String| DistillError::Write {
            path: path.to_owned(),
            problem,
        };
        let (dtype, images, momentum) = match self.dtype {
            DType::F64 => (
                Dtype::F64,
                f64_bytes(self.synthetic.as_tensor())?,
                f64_bytes(&self.momentum)?,
            ),
            _ => (
                Dtype::F32,
                f32_bytes(self.synthetic.as_tensor())?,
                f32_bytes(&self.momentum)?,
            ),
        };
        let shape = self.synthetic.dims().to_vec();
        let views = [("images", &images), ("momentum", &momentum)]
            .into_iter()
            .map(|(name, bytes)| {
                TensorView::new(dtype, shape.clone(), bytes)
                    .map(|v| (name, v))
                    .map_err(|e| write_err(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metadata = HashMap::from([
            ("format".to_owned(), CHECKPOINT_FORMAT.to_owned()),
            ("method".to_owned(), self.matcher.name().to_owned()),
            ("iteration".to_owned(), self.iteration.to_string()),
            ("config".to_owned(), self.identity()),
        ]);
        let bytes = debiasdd_data::serialize_sorted(views, metadata).map_err(write_err)?;
        debiasdd_data::write_atomically(path, &bytes).map_err(|e| write_err(e.to_string()))
    }

    /// Restores images, momentum and iteration from a checkpoint written by a run with the same
    /// method and settings (the number of iterations may differ).
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<(), DistillError> {
        let bad = |problem: String| DistillError::BadCheckpoint {
            path: path.to_owned(),
            problem,
        };
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let meta = header.metadata().clone().unwrap_or_default();
        match meta.get("format").map(String::as_str) {
            Some(CHECKPOINT_FORMAT) => {}
            Some(CHECKPOINT_FORMAT_V1) => {
                return Err(bad(
                    "it was written by an older debiasdd (checkpoint format 1, before methods were recorded) and cannot be resumed; start a new run".into(),
                ));
            }
            _ => return Err(bad(format!("not a {CHECKPOINT_FORMAT} file"))),
        }
        let saved = meta
            .get("config")
            .ok_or_else(|| bad("no config in metadata".into()))?;
        let current = self.identity();
        if *saved != current {
            return Err(DistillError::CheckpointMismatch {
                path: path.to_owned(),
                problem: config_difference(saved, &current),
            });
        }
        let iteration: usize = meta
            .get("iteration")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no iteration in metadata".into()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let load = |name: &str| -> Result<Tensor, DistillError> {
            let view = st
                .tensor(name)
                .map_err(|_| bad(format!("no tensor `{name}`")))?;
            if view.shape() != self.synthetic.dims() {
                return Err(bad(format!(
                    "`{name}` has shape {:?}, expected {:?}",
                    view.shape(),
                    self.synthetic.dims()
                )));
            }
            let t = match view.dtype() {
                Dtype::F64 => Tensor::from_vec(
                    view.data()
                        .chunks_exact(8)
                        .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .collect::<Vec<_>>(),
                    view.shape(),
                    &Device::Cpu,
                )?,
                Dtype::F32 => Tensor::from_vec(
                    view.data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                        .collect::<Vec<_>>(),
                    view.shape(),
                    &Device::Cpu,
                )?,
                other => return Err(bad(format!("`{name}` has dtype {other:?}"))),
            };
            Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
        };
        self.synthetic.set(&load("images")?)?;
        self.momentum = load("momentum")?;
        self.iteration = iteration;
        Ok(())
    }
}

/// The settings that differ between two identity JSONs, as `path: checkpoint A, now B`, for an
/// error message.
fn config_difference(saved: &str, current: &str) -> String {
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
    let mut diffs = Vec::new();
    differences("", &parse(saved), &parse(current), &mut diffs);
    if diffs.is_empty() {
        "settings differ".into()
    } else {
        diffs.join("; ")
    }
}

fn differences(at: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    let path = |key: &str| {
        if at.is_empty() {
            key.to_owned()
        } else {
            format!("{at}.{key}")
        }
    };
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            for (key, va) in a {
                match b.get(key) {
                    Some(vb) => differences(&path(key), va, vb, out),
                    None => out.push(format!("{}: checkpoint {va}, now missing", path(key))),
                }
            }
            for (key, vb) in b.iter().filter(|(key, _)| !a.contains_key(*key)) {
                out.push(format!("{}: checkpoint missing, now {vb}", path(key)));
            }
        }
        _ if a != b => out.push(format!("{at}: checkpoint {a}, now {b}")),
        _ => {}
    }
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>, DistillError> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

fn f64_bytes(t: &Tensor) -> Result<Vec<u8>, DistillError> {
    let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_nested_fields() {
        let a = r#"{"settings":{"lr_img":0.1,"ipc":10},"method":{"name":"dc","outer_loop":5}}"#;
        let b = r#"{"settings":{"lr_img":0.5,"ipc":10},"method":{"name":"dc","outer_loop":5}}"#;
        assert_eq!(
            config_difference(a, b),
            "settings.lr_img: checkpoint 0.1, now 0.5"
        );
        let c = r#"{"settings":{"lr_img":0.1,"ipc":10},"method":{"name":"dm"}}"#;
        let d = config_difference(a, c);
        assert!(
            d.contains("method.name: checkpoint \"dc\", now \"dm\""),
            "{d}"
        );
        assert!(
            d.contains("method.outer_loop: checkpoint 5, now missing"),
            "{d}"
        );
    }
}
