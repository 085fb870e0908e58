//! Colored MNIST as one safetensors file.
//!
//! For each split `train`, `valid`, `test`: `<split>.images` (U8, N x 3 x 28 x 28),
//! `<split>.labels`, `<split>.colours`, `<split>.groups` (I64, N). Metadata (all strings):
//! `format` = [`FORMAT`], `preset`, `ratio`, `seed`, `jitter_std`, `source`, `palette` (JSON list
//! of RGB triples), `source_sha256` (content id of the grey files), `config` (the whole config
//! as JSON, which is what [`load`] reads back). See the crate README for reading it from Python.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::colored::{ColoredMnist, ColoredMnistConfig, IMAGE_BYTES, SIDE, Split};
use crate::error::{CmnistError, Result};

/// Value of the `format` metadata key; bumped when the layout changes.
pub const FORMAT: &str = "debiasdd-cmnist/1";

const SPLITS: [&str; 3] = ["train", "valid", "test"];

fn i64_bytes<T: Copy + Into<i64>>(values: &[T]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| v.into().to_le_bytes())
        .collect()
}

/// Writes the dataset to `path` (a sibling `.partial` file renamed into place, so a crash never
/// leaves a half-written file under the real name).
pub fn save(data: &ColoredMnist, path: &Path) -> Result<()> {
    let write_err = |problem: String| CmnistError::Write {
        path: path.to_owned(),
        problem,
    };
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in SPLITS {
        let split = data.split(name).expect("known split");
        let n = split.len();
        buffers.push((
            format!("{name}.images"),
            Dtype::U8,
            vec![n, 3, SIDE, SIDE],
            split.images.clone(),
        ));
        buffers.push((
            format!("{name}.labels"),
            Dtype::I64,
            vec![n],
            i64_bytes(&split.labels),
        ));
        buffers.push((
            format!("{name}.colours"),
            Dtype::I64,
            vec![n],
            i64_bytes(&split.colours),
        ));
        buffers.push((
            format!("{name}.groups"),
            Dtype::I64,
            vec![n],
            i64_bytes(&split.groups),
        ));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| write_err(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let config = &data.config;
    let metadata: HashMap<String, String> = [
        ("format", FORMAT.to_owned()),
        ("preset", config.preset.name().to_owned()),
        ("ratio", config.ratio.to_string()),
        ("seed", config.seed.to_string()),
        ("jitter_std", config.jitter_std.to_string()),
        ("source", config.source.name().to_owned()),
        (
            "palette",
            serde_json::to_string(&config.palette).expect("palette serialises"),
        ),
        ("source_sha256", data.source_sha256.clone()),
        (
            "config",
            serde_json::to_string(config).expect("config serialises"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let bytes = serialize_sorted(views, metadata).map_err(write_err)?;
    write_atomically(path, &bytes).map_err(|e| write_err(e.to_string()))
}

/// Writes `bytes` to `path` through a sibling temporary file renamed into place, creating the
/// folder: a crash never leaves half a file under the real name, and the file gets the usual
/// mode under the umask (`std::fs::write`'s), not a temporary file's 0600.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// `safetensors::serialize` with the header's keys sorted, so that equal content gives
/// byte-identical files (safetensors keeps metadata in a `HashMap`).
pub fn serialize_sorted<S, V, I>(
    tensors: I,
    metadata: HashMap<String, String>,
) -> std::result::Result<Vec<u8>, String>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: safetensors::View,
    I: IntoIterator<Item = (S, V)>,
{
    let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(|e| e.to_string())?;
    with_sorted_header(&bytes)
}

/// safetensors keeps metadata in a `HashMap`, so its header order changes from run to run.
/// Rewrites the header with sorted keys (same content, padded to 8 bytes with spaces as the
/// format asks) so that equal datasets give byte-identical files.
fn with_sorted_header(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use std::collections::BTreeMap;
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| e.to_string())?;
    if let Some(meta) = header.remove("__metadata__") {
        let sorted: BTreeMap<String, String> =
            serde_json::from_value(meta).map_err(|e| e.to_string())?;
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(sorted).map_err(|e| e.to_string())?,
        );
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    SafeTensors::deserialize(&out).map_err(|e| format!("rewritten header does not parse: {e}"))?;
    Ok(out)
}

/// Reads a file written by [`save`], checking every tensor's dtype, shape and value range.
pub fn load(path: &Path) -> Result<ColoredMnist> {
    let bytes = std::fs::read(path).map_err(|e| CmnistError::io(path, e))?;
    let bad = |problem: String| CmnistError::BadDatasetFile {
        path: path.to_owned(),
        problem,
    };
    let tensors =
        SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not safetensors ({e})")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    match metadata.get("format").map(String::as_str) {
        Some(FORMAT) => {}
        Some(other) => {
            return Err(bad(format!(
                "format {other:?}, this build reads {FORMAT:?}"
            )));
        }
        None => {
            return Err(bad(
                "no `format` metadata; was it written by `debiasdd generate`?".into(),
            ));
        }
    }
    let config: ColoredMnistConfig = metadata
        .get("config")
        .ok_or_else(|| bad("no `config` metadata".into()))
        .and_then(|c| {
            serde_json::from_str(c).map_err(|e| bad(format!("bad `config` metadata: {e}")))
        })?;
    let source_sha256 = metadata.get("source_sha256").cloned().unwrap_or_default();

    let tensor = |name: &str, dtype: Dtype| -> Result<TensorView<'_>> {
        let view = tensors
            .tensor(name)
            .map_err(|_| bad(format!("tensor `{name}` is missing")))?;
        if view.dtype() != dtype {
            return Err(bad(format!(
                "tensor `{name}` is {:?}, expected {dtype:?}",
                view.dtype()
            )));
        }
        Ok(view)
    };
    let small_ints = |name: &str, n: usize, limit: i64| -> Result<Vec<u8>> {
        let view = tensor(name, Dtype::I64)?;
        if view.shape() != [n] {
            return Err(bad(format!(
                "tensor `{name}` has shape {:?}, expected [{n}]",
                view.shape()
            )));
        }
        view.data()
            .chunks_exact(8)
            .enumerate()
            .map(|(i, b)| {
                let v = i64::from_le_bytes(b.try_into().expect("8 bytes"));
                u8::try_from(v)
                    .ok()
                    .filter(|&v| i64::from(v) < limit)
                    .ok_or_else(|| bad(format!("`{name}`[{i}] = {v} is outside 0..{limit}")))
            })
            .collect()
    };
    let mut splits = Vec::with_capacity(3);
    for name in SPLITS {
        let images = tensor(&format!("{name}.images"), Dtype::U8)?;
        let n = images.shape().first().copied().unwrap_or(0);
        if images.shape() != [n, 3, SIDE, SIDE] {
            return Err(bad(format!(
                "tensor `{name}.images` has shape {:?}, expected [N, 3, 28, 28]",
                images.shape()
            )));
        }
        debug_assert_eq!(images.data().len(), n * IMAGE_BYTES);
        let labels = small_ints(&format!("{name}.labels"), n, 10)?;
        let colours = small_ints(&format!("{name}.colours"), n, 10)?;
        let split = Split::from_parts(images.data().to_vec(), labels, colours).map_err(bad)?;
        let stored_groups = small_ints(&format!("{name}.groups"), n, 100)?;
        if let Some(i) = (0..n).find(|&i| u16::from(stored_groups[i]) != split.groups[i]) {
            return Err(bad(format!(
                "`{name}.groups`[{i}] = {} but label * 10 + colour = {}",
                stored_groups[i], split.groups[i]
            )));
        }
        splits.push(split);
    }
    let test = splits.pop().expect("three splits");
    let valid = splits.pop().expect("three splits");
    let train = splits.pop().expect("three splits");
    Ok(ColoredMnist {
        config,
        source_sha256,
        train,
        valid,
        test,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colored::{Preset, build};
    use crate::source::{GreySource, SourceKind, Verification, write_synthetic_source};

    fn tiny() -> ColoredMnist {
        let dir = tempfile::tempdir().unwrap();
        write_synthetic_source(dir.path(), 120, 30).unwrap();
        let source = GreySource::load(dir.path(), SourceKind::Mnist, Verification::Skip).unwrap();
        let config = ColoredMnistConfig {
            train_size: 100,
            valid_size: 20,
            ..ColoredMnistConfig::new(Preset::Seed, 0.1, 4)
        };
        build(&source, &config).unwrap()
    }

    #[test]
    fn save_load_round_trip() -> anyhow::Result<()> {
        let data = tiny();
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("sub/cmnist.safetensors");
        save(&data, &path)?;
        assert_eq!(load(&path)?, data);
        // Same data, same bytes on disk.
        let again = dir.path().join("again.safetensors");
        save(&data, &again)?;
        assert_eq!(std::fs::read(&path)?, std::fs::read(&again)?);
        Ok(())
    }

    #[test]
    fn metadata_is_readable_without_this_crate() -> anyhow::Result<()> {
        let data = tiny();
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.safetensors");
        save(&data, &path)?;
        let bytes = std::fs::read(&path)?;
        let (_, header) = SafeTensors::read_metadata(&bytes)?;
        let meta = header.metadata().clone().unwrap();
        assert_eq!(meta["preset"], "seed");
        assert_eq!(meta["ratio"], "0.1");
        assert_eq!(meta["seed"], "4");
        assert_eq!(meta["jitter_std"], "0.005");
        assert!(meta["palette"].starts_with("[[251,80,43],"));
        assert_eq!(meta["source_sha256"].len(), 64);
        let st = SafeTensors::deserialize(&bytes)?;
        assert_eq!(st.tensor("valid.images")?.shape(), &[20, 3, 28, 28]);
        assert_eq!(st.tensor("test.groups")?.dtype(), Dtype::I64);
        Ok(())
    }

    #[test]
    fn corrupt_files_give_clear_errors() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("junk.safetensors");
        std::fs::write(&path, b"not a tensor file at all")?;
        let err = load(&path).unwrap_err();
        assert!(matches!(err, CmnistError::BadDatasetFile { .. }), "{err}");
        assert!(err.to_string().contains("junk.safetensors"));

        // A label out of range, patched into the bytes of a good file.
        let good = tiny();
        save(&good, &path)?;
        let bytes = std::fs::read(&path)?;
        let st = SafeTensors::deserialize(&bytes)?;
        let offset_of = |name: &str| {
            let view = st.tensor(name).unwrap();
            view.data().as_ptr() as usize - bytes.as_ptr() as usize
        };
        let at = offset_of("train.labels") + 3 * 8;
        let mut broken = bytes.clone();
        broken[at] = 10;
        std::fs::write(&path, &broken)?;
        let err = load(&path).unwrap_err();
        assert!(err.to_string().contains("`train.labels`[3] = 10"), "{err}");

        let missing = dir.path().join("missing.safetensors");
        assert!(matches!(load(&missing), Err(CmnistError::Io { .. })));
        Ok(())
    }
}
