//! The dataset file: one safetensors file per dataset, whatever made it.
//!
//! Tensors, for each split `train`, `valid`, `test`: `<split>.images` (U8, N x C x H x W),
//! `<split>.labels` (I64, N, in 0..classes) and `<split>.attributes` (I64, N, in 0..attributes,
//! or -1 where the attribute is unknown). Metadata (all strings): `format` = [`FORMAT`], `info`
//! (the [`DatasetInfo`] as JSON: name, shape, class and attribute names, aligned attributes,
//! attribute colours, source) and, for a quick look without JSON, `name`, `shape` (`CxHxW`),
//! `n_classes`, `n_attributes`. Keys are sorted, so equal datasets give byte-identical files.
//!
//! A dataset whose train groups were inferred (`info.inferred`) stores the inferred attributes
//! as `train.attributes` (in 0..inferred attributes) and the annotated ones, kept apart, as
//! `train.true_attributes` (I64, N, -1 where unknown).
//!
//! [`load`] also reads the Colored MNIST files of earlier versions (`debiasdd-cmnist/1`: 3 x 28
//! x 28, 10 digits x 10 colours, the attribute stored as `<split>.colours`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::{DataError, Dataset, DatasetInfo, ImageShape, SPLIT_NAMES, Split};

/// Value of the `format` metadata key; bumped when the layout changes.
pub const FORMAT: &str = "debiasdd-dataset/1";
/// The Colored MNIST file of earlier versions, still read.
pub const LEGACY_CMNIST_FORMAT: &str = "debiasdd-cmnist/1";

/// Writes `data` to `path` atomically (see [`write_atomically`]).
pub fn save(data: &Dataset, path: &Path) -> Result<(), DataError> {
    data.validate()?;
    let write_err = |problem: String| DataError::Write {
        path: path.to_owned(),
        problem,
    };
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in SPLIT_NAMES {
        let split = data.split(name).expect("known split");
        let n = split.len();
        let [c, h, w] = split.shape.dims();
        buffers.push((
            format!("{name}.images"),
            Dtype::U8,
            vec![n, c, h, w],
            split.images.clone(),
        ));
        buffers.push((
            format!("{name}.labels"),
            Dtype::I64,
            vec![n],
            split
                .labels
                .iter()
                .flat_map(|&l| i64::from(l).to_le_bytes())
                .collect(),
        ));
        buffers.push((
            format!("{name}.attributes"),
            Dtype::I64,
            vec![n],
            attribute_bytes(&split.attributes),
        ));
    }
    if let Some(truth) = &data.true_train_attributes {
        buffers.push((
            "train.true_attributes".into(),
            Dtype::I64,
            vec![truth.len()],
            attribute_bytes(truth),
        ));
    }
    let views = buffers
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| write_err(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let info = &data.info;
    let metadata: HashMap<String, String> = [
        ("format", FORMAT.to_owned()),
        (
            "info",
            serde_json::to_string(info).expect("info serialises"),
        ),
        ("name", info.name.clone()),
        ("shape", info.shape.to_string()),
        ("n_classes", info.classes.len().to_string()),
        ("n_attributes", info.attributes.len().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let bytes = serialize_sorted(views, metadata).map_err(write_err)?;
    write_atomically(path, &bytes).map_err(|e| write_err(e.to_string()))
}

/// Attributes as little-endian I64, -1 where unknown.
fn attribute_bytes(attributes: &[Option<u8>]) -> Vec<u8> {
    attributes
        .iter()
        .flat_map(|a| a.map_or(-1, i64::from).to_le_bytes())
        .collect()
}

/// A safetensors file read whole, with its metadata; errors name the file.
pub(crate) fn read_safetensors(
    path: &Path,
) -> Result<(Vec<u8>, HashMap<String, String>), DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })?;
    let bad = |problem: String| DataError::BadFile {
        path: path.to_owned(),
        problem,
    };
    SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not safetensors ({e})")))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    Ok((bytes, metadata))
}

/// Tensor `name` of `tensors`, which must be of `dtype`.
pub(crate) fn typed_tensor<'a>(
    tensors: &'a SafeTensors<'a>,
    name: &str,
    dtype: Dtype,
    bad: &dyn Fn(String) -> DataError,
) -> Result<TensorView<'a>, DataError> {
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
}

/// The I64 vector `name` of `tensors`, which must hold `n` values.
pub(crate) fn i64_vector(
    tensors: &SafeTensors<'_>,
    name: &str,
    n: usize,
    bad: &dyn Fn(String) -> DataError,
) -> Result<Vec<i64>, DataError> {
    let view = typed_tensor(tensors, name, Dtype::I64, bad)?;
    if view.shape() != [n] {
        return Err(bad(format!(
            "tensor `{name}` has shape {:?}, expected [{n}]",
            view.shape()
        )));
    }
    Ok(view
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
        .collect())
}

/// Reads a dataset file (or a Colored MNIST file of an earlier version), checking every
/// tensor's dtype, shape and value range.
pub fn load(path: &Path) -> Result<Dataset, DataError> {
    let (bytes, metadata) = read_safetensors(path)?;
    let bad = |problem: String| DataError::BadFile {
        path: path.to_owned(),
        problem,
    };
    let tensors =
        SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not safetensors ({e})")))?;
    let (info, attribute_key) = info_of(&metadata, &bad)?;
    info.validate()
        .map_err(|e| bad(format!("bad `info` metadata: {e}")))?;
    let spec = info.spec();
    let [c, h, w] = info.shape.dims();
    let ints = |name: &str, n: usize| i64_vector(&tensors, name, n, &bad);
    let mut splits = Vec::with_capacity(3);
    let mut true_train_attributes = None;
    for name in SPLIT_NAMES {
        let images = typed_tensor(&tensors, &format!("{name}.images"), Dtype::U8, &bad)?;
        let n = images.shape().first().copied().unwrap_or(0);
        if images.shape() != [n, c, h, w] {
            return Err(bad(format!(
                "tensor `{name}.images` has shape {:?}, expected [N, {c}, {h}, {w}] (the info's shape)",
                images.shape()
            )));
        }
        let labels_name = format!("{name}.labels");
        let labels = class_labels(ints(&labels_name, n)?, &labels_name, spec.n_classes(), &bad)?;
        let split_spec = if name == "train" {
            info.train_spec()
        } else {
            spec
        };
        let key = format!("{name}.{attribute_key}");
        let attributes = attributes_of(ints(&key, n)?, &key, split_spec.n_attributes(), &bad)?;
        if name == "train" && info.inferred.is_some() {
            let key = "train.true_attributes";
            true_train_attributes = Some(attributes_of(
                ints(key, n)?,
                key,
                spec.n_attributes(),
                &bad,
            )?);
        }
        splits.push(Split {
            shape: info.shape,
            spec: split_spec,
            images: images.data().to_vec(),
            labels,
            attributes,
        });
    }
    let test = splits.pop().expect("three splits");
    let valid = splits.pop().expect("three splits");
    let train = splits.pop().expect("three splits");
    let data = Dataset {
        info,
        train,
        valid,
        test,
        true_train_attributes,
    };
    data.validate().map_err(|e| bad(e.to_string()))?;
    Ok(data)
}

/// Attributes stored as I64 (-1: unknown), each checked to be in `0..n_attributes`.
fn attributes_of(
    values: Vec<i64>,
    key: &str,
    n_attributes: usize,
    bad: &dyn Fn(String) -> DataError,
) -> Result<Vec<Option<u8>>, DataError> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, a)| match a {
            -1 => Ok(None),
            _ => u8::try_from(a)
                .ok()
                .filter(|&a| usize::from(a) < n_attributes)
                .map(Some)
                .ok_or_else(|| {
                    bad(format!(
                        "`{key}`[{i}] = {a} is neither -1 (unknown) nor in 0..{n_attributes}"
                    ))
                }),
        })
        .collect()
}

/// The info of a dataset file from its metadata, and the name its attribute tensors have.
fn info_of(
    metadata: &HashMap<String, String>,
    bad: &dyn Fn(String) -> DataError,
) -> Result<(DatasetInfo, &'static str), DataError> {
    match metadata.get("format").map(String::as_str) {
        Some(FORMAT) => {
            let info: DatasetInfo = metadata
                .get("info")
                .ok_or_else(|| bad("no `info` metadata".into()))
                .and_then(|c| {
                    serde_json::from_str(c).map_err(|e| bad(format!("bad `info` metadata: {e}")))
                })?;
            Ok((info, "attributes"))
        }
        Some(LEGACY_CMNIST_FORMAT) => Ok((legacy_cmnist_info(metadata), "colours")),
        Some(other) => Err(bad(format!(
            "format {other:?}; this build reads datasets ({FORMAT:?}); a distilled set goes \
                 to --synthetic, not --data"
        ))),
        None => Err(bad(
            "no `format` metadata; was it written by `debiasdd generate` or `debiasdd import`?"
                .into(),
        )),
    }
}

/// The info of a dataset file (name, shape, classes, attributes, ...), read from its header
/// alone: what a caller needs before deciding to load gigabytes of images.
pub fn read_info(path: &Path) -> Result<DatasetInfo, DataError> {
    use std::io::Read;
    let bad = |problem: String| DataError::BadFile {
        path: path.to_owned(),
        problem,
    };
    let mut file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| bad(format!("not safetensors ({e})")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!("not safetensors (a header of {len} bytes)")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(format!("not safetensors: the header is cut short ({e})")))?;
    let header: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not safetensors: the header is not JSON ({e})")))?;
    let metadata: HashMap<String, String> = header
        .get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default();
    let (info, _) = info_of(&metadata, &bad)?;
    info.validate()
        .map_err(|e| bad(format!("bad `info` metadata: {e}")))?;
    Ok(info)
}

/// Class labels read from I64 `values`, each in `0..n_classes`; `name` is the tensor's.
pub(crate) fn class_labels(
    values: Vec<i64>,
    name: &str,
    n_classes: usize,
    bad: &dyn Fn(String) -> DataError,
) -> Result<Vec<u8>, DataError> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            u8::try_from(l)
                .ok()
                .filter(|&l| usize::from(l) < n_classes)
                .ok_or_else(|| bad(format!("`{name}`[{i}] = {l} is outside 0..{n_classes}")))
        })
        .collect()
}

/// The info of a `debiasdd-cmnist/1` file: 3 x 28 x 28, digits x colours, each digit biased to
/// its own colour, the palette from its metadata and its `config` and `source_sha256` as the
/// source (the shape `debiasdd-cmnist` writes today).
fn legacy_cmnist_info(metadata: &HashMap<String, String>) -> DatasetInfo {
    let config: Option<serde_json::Value> = metadata
        .get("config")
        .and_then(|c| serde_json::from_str(c).ok());
    let palette: Option<Vec<[u8; 3]>> = metadata
        .get("palette")
        .and_then(|p| serde_json::from_str(p).ok())
        .filter(|p: &Vec<[u8; 3]>| p.len() == 10);
    let preset = metadata.get("preset").cloned().unwrap_or_default();
    let source = serde_json::json!({
        "generator": "colored-mnist",
        "config": config,
        "source_sha256": metadata.get("source_sha256"),
    });
    DatasetInfo {
        inferred: None,
        name: format!("cmnist-{preset}"),
        shape: ImageShape {
            channels: 3,
            height: 28,
            width: 28,
        },
        classes: (0..10).map(|d| d.to_string()).collect(),
        attributes: (0..10).map(|c| format!("colour {c}")).collect(),
        aligned: (0..10).map(Some).collect(),
        attribute_colours: palette,
        source: Some(source.to_string()),
    }
}

/// Writes `bytes` to `path` through a sibling temporary file renamed into place, creating the
/// folder: a crash never leaves half a file under the real name, and the file gets the usual
/// mode under the umask (`std::fs::write`'s), not a temporary file's 0600. The temporary name
/// is unique to the process and the call, so writers of the same file at once (cells of a
/// grid sharing a results folder) never write into each other's temporary file; the last
/// rename wins, with a whole file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}-{n}.partial", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// `safetensors::serialize` with the header's keys sorted, so that equal content gives
/// byte-identical files (safetensors keeps metadata in a `HashMap`, whose order changes from run
/// to run). The header is padded to 8 bytes with spaces, as the format asks.
pub fn serialize_sorted<S, V, I>(
    tensors: I,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, String>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: safetensors::View,
    I: IntoIterator<Item = (S, V)>,
{
    let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(|e| e.to_string())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> Dataset {
        let shape = ImageShape::new(2, 3, 4).unwrap();
        let mut info = DatasetInfo::new(
            "toy",
            shape,
            vec!["cat".into(), "dog".into(), "owl".into()],
            vec!["indoor".into(), "outdoor".into()],
        )
        .unwrap();
        info.aligned = vec![Some(0), Some(1), None];
        info.source = Some("{\"made\":\"by hand\"}".into());
        let spec = info.spec();
        let split = |n: usize, offset: u8| {
            Split::new(
                shape,
                spec,
                (0..n * 24)
                    .map(|i| (i as u8).wrapping_add(offset))
                    .collect(),
                (0..n).map(|i| (i % 3) as u8).collect(),
                (0..n)
                    .map(|i| (i % 4 != 3).then_some((i % 2) as u8))
                    .collect(),
            )
            .unwrap()
        };
        Dataset::new(info, split(7, 0), Split::empty(shape, spec), split(5, 9)).unwrap()
    }

    #[test]
    fn round_trips_byte_for_byte() -> anyhow::Result<()> {
        let data = toy();
        let dir = tempfile::tempdir()?;
        let (a, b) = (
            dir.path().join("a/d.safetensors"),
            dir.path().join("b.safetensors"),
        );
        save(&data, &a)?;
        save(&data, &b)?;
        assert_eq!(load(&a)?, data);
        assert_eq!(read_info(&a)?, data.info, "the header alone holds the info");
        assert_eq!(std::fs::read(&a)?, std::fs::read(&b)?);
        let bytes = std::fs::read(&a)?;
        let (_, header) = SafeTensors::read_metadata(&bytes)?;
        let meta = header.metadata().clone().unwrap();
        assert_eq!(meta["shape"], "2x3x4");
        assert_eq!(meta["n_classes"], "3");
        let st = SafeTensors::deserialize(&bytes)?;
        assert_eq!(st.tensor("test.images")?.shape(), &[5, 2, 3, 4]);
        Ok(())
    }

    #[test]
    fn damaged_files_name_the_tensor() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("d.safetensors");
        save(&toy(), &path)?;
        let bytes = std::fs::read(&path)?;
        let st = SafeTensors::deserialize(&bytes)?;
        let at = st.tensor("train.attributes")?.data().as_ptr() as usize - bytes.as_ptr() as usize;
        let mut broken = bytes.clone();
        broken[at + 8] = 2; // attribute 2 of 2
        std::fs::write(&path, &broken)?;
        let err = load(&path).unwrap_err().to_string();
        assert!(
            err.contains("`train.attributes`[1] = 2 is neither -1"),
            "{err}"
        );

        std::fs::write(&path, &bytes[..bytes.len() - 10])?;
        let err = load(&path).unwrap_err().to_string();
        assert!(err.contains("not safetensors"), "{err}");
        let err = load(&dir.path().join("none.safetensors")).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err}");
        Ok(())
    }

    #[test]
    fn reads_the_colored_mnist_files_of_earlier_versions() -> anyhow::Result<()> {
        let n = 3;
        let images = vec![7u8; n * 3 * 28 * 28];
        let ints = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (labels, colours, groups) = (ints(&[0, 4, 9]), ints(&[0, 5, 9]), ints(&[0, 45, 99]));
        let mut buffers = Vec::new();
        for name in SPLIT_NAMES {
            buffers.push((
                format!("{name}.images"),
                Dtype::U8,
                vec![n, 3, 28, 28],
                &images,
            ));
            buffers.push((format!("{name}.labels"), Dtype::I64, vec![n], &labels));
            buffers.push((format!("{name}.colours"), Dtype::I64, vec![n], &colours));
            buffers.push((format!("{name}.groups"), Dtype::I64, vec![n], &groups));
        }
        let views: Vec<(String, TensorView<'_>)> = buffers
            .iter()
            .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let meta = HashMap::from([
            ("format".to_owned(), LEGACY_CMNIST_FORMAT.to_owned()),
            ("preset".to_owned(), "seed".to_owned()),
            ("config".to_owned(), "{\"ratio\":0.01}".to_owned()),
        ]);
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("old.safetensors");
        std::fs::write(
            &path,
            serialize_sorted(views, meta).map_err(anyhow::Error::msg)?,
        )?;
        let data = load(&path)?;
        assert_eq!(data.spec().n_groups(), 100);
        assert_eq!(data.train.group_ids(), vec![Some(0), Some(45), Some(99)]);
        assert_eq!(data.info.aligned[4], Some(4));
        assert!(data.info.source.unwrap().contains("\"ratio\":0.01"));
        Ok(())
    }
}
