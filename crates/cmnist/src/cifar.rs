//! CIFAR-10 from its binary archive, and CIFAR10-S built from it.
//!
//! The archive (`cifar-10-binary.tar.gz`, MD5 [`CIFAR10_ARCHIVE_MD5`]; `cargo xtask download
//! --dataset cifar10` fetches and verifies it) holds `cifar-10-batches-bin/data_batch_1.bin` ..
//! `data_batch_5.bin`, `test_batch.bin` and `batches.meta.txt`. Each batch is a run of 3,073-byte
//! records: the label byte, then the 32 x 32 red, green and blue planes (already CHW).
//! [`CifarArchive::load`] reads the archive or a folder holding the extracted files.
//!
//! CIFAR10-S (Wang et al., CVPR 2020, "Towards Fairness in Visual Recognition", as FairDD's
//! `data_handler/cifar10.py` builds it): the attribute is grey (0) or colour (1). After a seeded
//! shuffle of the training images, classes 0-4 keep the first `n_k - round(ratio * n_k)` of
//! theirs in grey and the rest in colour; classes 5-9 the reverse, so `ratio` is the share of
//! bias-conflicting images per class (FairDD's `skewed_ratio` is `1 - ratio`; the published
//! setting is 0.05). The test split holds every test image twice, once grey and once in colour
//! (20,000 images, balanced). There is no validation split, as in FairDD. Grey is ITU-R 601-2
//! luma as PIL's `convert('L')` computes it, copied into all three channels.

use std::io::Read;
use std::path::{Path, PathBuf};

use debiasdd_data::{Dataset, DatasetInfo, ImageShape, Split};
use debiasdd_groups::GroupSpec;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::colored::conflicting_count;
use crate::error::{CmnistError, Result};

/// MD5 of `cifar-10-binary.tar.gz` as the dataset's page publishes it.
pub const CIFAR10_ARCHIVE_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";
/// Its size in bytes.
pub const CIFAR10_ARCHIVE_BYTES: u64 = 170_052_171;
/// The folder the archive unpacks to.
pub const CIFAR10_FOLDER: &str = "cifar-10-batches-bin";
const RECORD: usize = 1 + 3 * 32 * 32;
const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
const TEST_FILE: &str = "test_batch.bin";
const META_FILE: &str = "batches.meta.txt";
/// CIFAR-10's classes, used when the archive has no `batches.meta.txt`.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
/// CIFAR-10's images: 3 x 32 x 32.
pub const CIFAR10_SHAPE: ImageShape = ImageShape {
    channels: 3,
    height: 32,
    width: 32,
};

/// CIFAR-10's images (CHW bytes) and labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CifarArchive {
    pub train_images: Vec<u8>,
    pub train_labels: Vec<u8>,
    pub test_images: Vec<u8>,
    pub test_labels: Vec<u8>,
    pub classes: Vec<String>,
}

impl CifarArchive {
    /// Reads the binary archive (`.tar.gz`) or a folder holding its files (the
    /// `cifar-10-batches-bin` folder itself or its parent).
    pub fn load(path: &Path) -> Result<Self> {
        let files = if path.is_dir() {
            read_folder(path)?
        } else {
            read_archive(path)?
        };
        let bad = |problem: String| CmnistError::BadArchive {
            path: path.to_owned(),
            problem,
        };
        let mut train_images = Vec::new();
        let mut train_labels = Vec::new();
        for name in TRAIN_FILES {
            let bytes = files
                .get(name)
                .ok_or_else(|| bad(format!("{name} is missing; is this the CIFAR-10 *binary* version (cifar-10-binary.tar.gz)?")))?;
            split_records(name, bytes, &mut train_images, &mut train_labels).map_err(bad)?;
        }
        let (mut test_images, mut test_labels) = (Vec::new(), Vec::new());
        let test = files
            .get(TEST_FILE)
            .ok_or_else(|| bad(format!("{TEST_FILE} is missing")))?;
        split_records(TEST_FILE, test, &mut test_images, &mut test_labels).map_err(bad)?;
        let classes = match files.get(META_FILE) {
            Some(meta) => {
                let names: Vec<String> = String::from_utf8_lossy(meta)
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from)
                    .collect();
                if names.len() != 10 {
                    return Err(bad(format!(
                        "{META_FILE} names {} classes, CIFAR-10 has 10",
                        names.len()
                    )));
                }
                names
            }
            None => CIFAR10_CLASSES.map(String::from).to_vec(),
        };
        Ok(Self {
            train_images,
            train_labels,
            test_images,
            test_labels,
            classes,
        })
    }
}

/// The batch files of the archive, by file name.
type Files = std::collections::BTreeMap<&'static str, Vec<u8>>;

fn wanted(name: &str) -> Option<&'static str> {
    TRAIN_FILES
        .iter()
        .chain([&TEST_FILE, &META_FILE])
        .find(|&&w| w == name)
        .copied()
}

fn read_folder(dir: &Path) -> Result<Files> {
    let inner = dir.join(CIFAR10_FOLDER);
    let dir = if inner.is_dir() {
        inner
    } else {
        dir.to_owned()
    };
    let mut files = Files::new();
    for name in TRAIN_FILES.iter().chain([&TEST_FILE, &META_FILE]) {
        let path = dir.join(name);
        if path.is_file() {
            files.insert(
                name,
                std::fs::read(&path).map_err(|e| CmnistError::io(&path, e))?,
            );
        }
    }
    if files.is_empty() {
        return Err(CmnistError::BadArchive {
            path: dir,
            problem: format!(
                "no CIFAR-10 batch files here; pass the cifar-10-binary.tar.gz archive or the \
                 folder it unpacks to ({CIFAR10_FOLDER}), e.g. from `cargo xtask download --dataset cifar10`"
            ),
        });
    }
    Ok(files)
}

fn read_archive(path: &Path) -> Result<Files> {
    let file = std::fs::File::open(path).map_err(|e| CmnistError::io(path, e))?;
    let bad = |problem: String| CmnistError::BadArchive {
        path: path.to_owned(),
        problem: format!(
            "{problem}; the archive is damaged or cut short: fetch it again (`cargo xtask download --dataset cifar10`)"
        ),
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut files = Files::new();
    for entry in archive
        .entries()
        .map_err(|e| bad(format!("not a tar.gz archive ({e})")))?
    {
        let mut entry = entry.map_err(|e| bad(format!("unreadable entry ({e})")))?;
        let entry_path: PathBuf = entry
            .path()
            .map_err(|e| bad(format!("bad entry name ({e})")))?
            .into_owned();
        let Some(name) = entry_path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(wanted)
        else {
            continue;
        };
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("cannot read {name} ({e})")))?;
        files.insert(name, bytes);
    }
    Ok(files)
}

fn split_records(
    name: &str,
    bytes: &[u8],
    images: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> std::result::Result<(), String> {
    if bytes.is_empty() || bytes.len() % RECORD != 0 {
        return Err(format!(
            "{name} has {} bytes, not a whole number of {RECORD}-byte records (label + 32x32x3); \
             the file is truncated",
            bytes.len()
        ));
    }
    for (i, record) in bytes.chunks_exact(RECORD).enumerate() {
        if record[0] >= 10 {
            return Err(format!(
                "{name} record {i} has label {}, CIFAR-10 has classes 0..10",
                record[0]
            ));
        }
        labels.push(record[0]);
        images.extend_from_slice(&record[1..]);
    }
    Ok(())
}

/// Everything CIFAR10-S depends on besides the archive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cifar10sConfig {
    /// Share of bias-conflicting images per class in train, in [0, 1] (0.05 in the paper).
    pub ratio: f64,
    pub seed: u64,
}

impl Cifar10sConfig {
    /// The file name `cargo xtask` and `debiasdd generate` store it under.
    pub fn file_name(&self) -> String {
        format!("cifar10s-ratio{}-seed{}.safetensors", self.ratio, self.seed)
    }
}

/// PIL's `convert('L')`: `(19595 R + 38470 G + 7471 B + 2^15) >> 16`, in all three channels.
fn grey(chw: &[u8]) -> Vec<u8> {
    let plane = chw.len() / 3;
    let luma: Vec<u8> = (0..plane)
        .map(|p| {
            let (r, g, b) = (
                u32::from(chw[p]),
                u32::from(chw[plane + p]),
                u32::from(chw[2 * plane + p]),
            );
            ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
        })
        .collect();
    [luma.as_slice(), &luma, &luma].concat()
}

/// Builds CIFAR10-S (see the module docs). Same archive and config, same bytes.
pub fn build_cifar10s(archive: &CifarArchive, config: &Cifar10sConfig) -> Result<Dataset> {
    if !(0.0..=1.0).contains(&config.ratio) {
        return Err(CmnistError::InvalidRatio(config.ratio));
    }
    let shape = CIFAR10_SHAPE;
    let spec = GroupSpec::new(10, 2).expect("10 x 2");
    let n_pixels = shape.numel();
    let image = |images: &[u8], i: usize| images[i * n_pixels..(i + 1) * n_pixels].to_vec();
    let mut order: Vec<usize> = (0..archive.train_labels.len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(config.seed));
    let mut per_class = [0usize; 10];
    for &l in &archive.train_labels {
        per_class[usize::from(l)] += 1;
    }
    // Grey images each class keeps first, in shuffled order.
    let grey_quota: Vec<usize> = (0..10)
        .map(|k| {
            let minority = conflicting_count(config.ratio, per_class[k]);
            if k < 5 {
                per_class[k] - minority
            } else {
                minority
            }
        })
        .collect();
    let mut seen = [0usize; 10];
    let (mut images, mut labels, mut attributes) = (Vec::new(), Vec::new(), Vec::new());
    for &i in &order {
        let k = usize::from(archive.train_labels[i]);
        let is_grey = seen[k] < grey_quota[k];
        seen[k] += 1;
        let chw = image(&archive.train_images, i);
        images.extend(if is_grey { grey(&chw) } else { chw });
        labels.push(k as u8);
        attributes.push(Some(u8::from(!is_grey)));
    }
    let train = Split::new(shape, spec, images, labels, attributes)?;
    let n_test = archive.test_labels.len();
    let mut test_images = Vec::with_capacity(2 * n_test * n_pixels);
    for i in 0..n_test {
        test_images.extend(grey(&image(&archive.test_images, i)));
    }
    test_images.extend_from_slice(&archive.test_images);
    let test = Split::new(
        shape,
        spec,
        test_images,
        [archive.test_labels.as_slice(), &archive.test_labels].concat(),
        std::iter::repeat_n(Some(0), n_test)
            .chain(std::iter::repeat_n(Some(1), n_test))
            .collect(),
    )?;
    let info = DatasetInfo {
        name: format!("cifar10s-ratio{}", config.ratio),
        shape,
        classes: archive.classes.clone(),
        attributes: vec!["grey".into(), "colour".into()],
        aligned: (0..10).map(|k| Some(u8::from(k >= 5))).collect(),
        attribute_colours: Some(vec![[128, 128, 128], [230, 120, 40]]),
        source: Some(serde_json::json!({ "generator": "cifar10s", "config": config }).to_string()),
        inferred: None,
    };
    Ok(Dataset::new(info, train, Split::empty(shape, spec), test)?)
}

/// Writes a tiny CIFAR-10 binary archive for tests: `per_file` records in each of the five
/// train batches, `n_test` in the test batch, labels cycling 0..10, pixels from the record index.
pub fn write_synthetic_archive(path: &Path, per_file: usize, n_test: usize) -> std::io::Result<()> {
    let record = |i: usize| {
        let mut r = vec![(i % 10) as u8];
        r.extend((0..RECORD - 1).map(|p| ((i * 7 + p * 3) % 256) as u8));
        r
    };
    let file = std::fs::File::create(path)?;
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    let mut add = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, format!("{CIFAR10_FOLDER}/{name}"), bytes)
    };
    for (f, name) in TRAIN_FILES.iter().enumerate() {
        let bytes: Vec<u8> = (0..per_file)
            .flat_map(|i| record(f * per_file + i))
            .collect();
        add(name, &bytes)?;
    }
    let test: Vec<u8> = (0..n_test).flat_map(|i| record(1000 + i)).collect();
    add(TEST_FILE, &test)?;
    add(META_FILE, CIFAR10_CLASSES.join("\n").as_bytes())?;
    tar.into_inner()?.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_and_folder_read_alike_and_cifar10s_follows_the_recipe() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("cifar-10-binary.tar.gz");
        write_synthetic_archive(&path, 40, 30)?;
        let archive = CifarArchive::load(&path)?;
        assert_eq!(archive.train_labels.len(), 200);
        assert_eq!(archive.test_images.len(), 30 * 3072);
        assert_eq!(archive.classes[9], "truck");
        // The same files unpacked into a folder.
        let folder = dir.path().join("x").join(CIFAR10_FOLDER);
        std::fs::create_dir_all(&folder)?;
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(&path)?));
        tar.unpack(dir.path().join("x"))?;
        assert_eq!(CifarArchive::load(&dir.path().join("x"))?, archive);

        let config = Cifar10sConfig {
            ratio: 0.1,
            seed: 3,
        };
        let data = build_cifar10s(&archive, &config)?;
        assert_eq!(data.spec().n_groups(), 20);
        let counts = data.train.group_index().counts();
        for k in 0..10 {
            // 20 images a class, 2 of them (round(0.1 * 20)) conflicting.
            let (grey, colour) = (counts.get(2 * k), counts.get(2 * k + 1));
            assert_eq!(
                (grey, colour),
                if k < 5 { (18, 2) } else { (2, 18) },
                "class {k}"
            );
        }
        assert_eq!(data.aligned_attributes()[2], Some(0));
        assert_eq!(data.test.len(), 60);
        // Test image i in grey, then in colour; grey has three equal planes of PIL's luma.
        let (g, c) = (data.test.image(0), data.test.image(30));
        assert_eq!(c, &archive.test_images[..3072]);
        assert_eq!(&g[..1024], &g[1024..2048]);
        let (r, gr, b) = (
            u32::from(c[5]),
            u32::from(c[1024 + 5]),
            u32::from(c[2048 + 5]),
        );
        assert_eq!(
            u32::from(g[5]),
            (r * 19595 + gr * 38470 + b * 7471 + 0x8000) >> 16
        );
        assert_eq!(build_cifar10s(&archive, &config)?, data, "deterministic");
        assert!(matches!(
            build_cifar10s(
                &archive,
                &Cifar10sConfig {
                    ratio: 1.5,
                    seed: 0
                }
            ),
            Err(CmnistError::InvalidRatio(_))
        ));
        Ok(())
    }

    #[test]
    fn damaged_archives_say_what_is_wrong() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.tar.gz");
        write_synthetic_archive(&path, 4, 3)?;
        let bytes = std::fs::read(&path)?;
        std::fs::write(&path, &bytes[..bytes.len() / 2])?;
        let err = CifarArchive::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("damaged or cut short") || err.contains("missing"),
            "{err}"
        );
        let folder = dir.path().join(CIFAR10_FOLDER);
        std::fs::create_dir_all(&folder)?;
        for name in TRAIN_FILES {
            std::fs::write(folder.join(name), vec![0u8; RECORD])?;
        }
        std::fs::write(folder.join(TEST_FILE), vec![0u8; RECORD + 5])?;
        let err = CifarArchive::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("test_batch.bin has 3078 bytes"), "{err}");
        let err = CifarArchive::load(&dir.path().join("none")).unwrap_err();
        assert!(matches!(err, CmnistError::Io { .. }), "{err}");
        Ok(())
    }
}
