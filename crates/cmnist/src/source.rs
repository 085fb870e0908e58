//! The grey sources Colored MNIST is made from (MNIST, Fashion-MNIST), their files and
//! checksums, and loading them from a folder with verification.
//!
//! Checksums are SHA-256 of the *decompressed* content: mirrors serve different gzip wrappers
//! around the same bytes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{CmnistError, Result};
use crate::idx::{self, IdxImages};

/// Which grey dataset to colour.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    #[default]
    Mnist,
    FashionMnist,
}

impl SourceKind {
    /// The names of its 10 classes, in label order.
    pub fn class_names(self) -> Vec<String> {
        let names: [&str; 10] = match self {
            SourceKind::Mnist => ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
            SourceKind::FashionMnist => [
                "T-shirt/top",
                "Trouser",
                "Pullover",
                "Dress",
                "Coat",
                "Sandal",
                "Shirt",
                "Sneaker",
                "Bag",
                "Ankle boot",
            ],
        };
        names.map(String::from).to_vec()
    }
}

/// One of the four files of a source, with its expected content checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceFile {
    /// File name without `.gz`, e.g. `train-images-idx3-ubyte`.
    pub name: &'static str,
    /// SHA-256 of the decompressed content, lowercase hex.
    pub sha256: &'static str,
}

const MNIST_FILES: [SourceFile; 4] = [
    SourceFile {
        name: "train-images-idx3-ubyte",
        sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    },
    SourceFile {
        name: "train-labels-idx1-ubyte",
        sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    SourceFile {
        name: "t10k-images-idx3-ubyte",
        sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    },
    SourceFile {
        name: "t10k-labels-idx1-ubyte",
        sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
];

// Computed from Debian's `dataset-fashion-mnist` package (zcat FILE | sha256sum).
const FASHION_MNIST_FILES: [SourceFile; 4] = [
    SourceFile {
        name: "train-images-idx3-ubyte",
        sha256: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    },
    SourceFile {
        name: "train-labels-idx1-ubyte",
        sha256: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    },
    SourceFile {
        name: "t10k-images-idx3-ubyte",
        sha256: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    },
    SourceFile {
        name: "t10k-labels-idx1-ubyte",
        sha256: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
];

impl SourceKind {
    /// The name used on the command line and in metadata.
    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Mnist => "mnist",
            SourceKind::FashionMnist => "fashion-mnist",
        }
    }

    /// Train images, train labels, test images, test labels.
    pub fn files(self) -> &'static [SourceFile; 4] {
        match self {
            SourceKind::Mnist => &MNIST_FILES,
            SourceKind::FashionMnist => &FASHION_MNIST_FILES,
        }
    }
}

impl std::fmt::Display for SourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SourceKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mnist" => Ok(SourceKind::Mnist),
            "fashion-mnist" => Ok(SourceKind::FashionMnist),
            other => Err(format!(
                "unknown dataset {other:?}: use mnist or fashion-mnist"
            )),
        }
    }
}

/// Whether to check the decompressed content against the known checksums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Refuse files whose content differs from the published dataset.
    Checksums,
    /// Accept any well-formed IDX files (other or modified data, on purpose).
    Skip,
}

/// Lowercase hex SHA-256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Finds `name.gz` or `name` in `dir` (gzip preferred, as the mirrors serve it).
pub fn find_file(dir: &Path, kind: SourceKind, name: &'static str) -> Result<PathBuf> {
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    let raw = dir.join(name);
    if raw.is_file() {
        return Ok(raw);
    }
    Err(CmnistError::MissingFile {
        dir: dir.to_owned(),
        name,
        source_name: kind.name(),
    })
}

/// Reads one file's content (decompressed) and checks it against `file.sha256`. Returns the
/// content and its checksum.
pub fn read_verified(
    path: &Path,
    kind: SourceKind,
    file: &SourceFile,
    verification: Verification,
) -> Result<(Vec<u8>, String)> {
    let content = idx::read_content(path)?;
    let actual = sha256_hex(&content);
    if verification == Verification::Checksums && actual != file.sha256 {
        return Err(CmnistError::ChecksumMismatch {
            path: path.to_owned(),
            expected: file.sha256,
            actual,
            source_name: kind.name(),
        });
    }
    Ok((content, actual))
}

/// A grey dataset in memory: train and test images with labels.
#[derive(Debug, Clone)]
pub struct GreySource {
    pub kind: SourceKind,
    pub train_images: IdxImages,
    pub train_labels: Vec<u8>,
    pub test_images: IdxImages,
    pub test_labels: Vec<u8>,
    /// SHA-256 of each file's decompressed content, by file name.
    pub checksums: BTreeMap<String, String>,
}

/// Number of classes of both sources.
pub const N_CLASSES: usize = 10;

impl GreySource {
    /// Loads the four IDX files of `kind` from `dir`, checking format, counts, labels and
    /// (unless skipped) checksums. The four files are read in parallel.
    pub fn load(dir: &Path, kind: SourceKind, verification: Verification) -> Result<Self> {
        let files = kind.files();
        let paths = files
            .iter()
            .map(|f| find_file(dir, kind, f.name))
            .collect::<Result<Vec<_>>>()?;
        let contents = files
            .par_iter()
            .zip(paths.par_iter())
            .map(|(file, path)| read_verified(path, kind, file, verification))
            .collect::<Result<Vec<_>>>()?;
        let checksums = files
            .iter()
            .zip(&contents)
            .map(|(f, (_, sum))| (f.name.to_owned(), sum.clone()))
            .collect();
        let train_images = idx::parse_images(&contents[0].0, &paths[0])?;
        let train_labels = idx::parse_labels(&contents[1].0, &paths[1])?;
        let test_images = idx::parse_images(&contents[2].0, &paths[2])?;
        let test_labels = idx::parse_labels(&contents[3].0, &paths[3])?;
        for (images, images_path, labels, labels_path) in [
            (&train_images, &paths[0], &train_labels, &paths[1]),
            (&test_images, &paths[2], &test_labels, &paths[3]),
        ] {
            check_pair(images, images_path, labels, labels_path)?;
        }
        Ok(Self {
            kind,
            train_images,
            train_labels,
            test_images,
            test_labels,
            checksums,
        })
    }

    /// A checksum over the four file checksums: one value that identifies the source content.
    pub fn content_id(&self) -> String {
        let joined: String = self
            .checksums
            .iter()
            .map(|(name, sum)| format!("{name}={sum}\n"))
            .collect();
        sha256_hex(joined.as_bytes())
    }
}

fn check_pair(
    images: &IdxImages,
    images_path: &Path,
    labels: &[u8],
    labels_path: &Path,
) -> Result<()> {
    if (images.rows, images.cols) != (28, 28) {
        return Err(CmnistError::WrongDimensions {
            path: images_path.to_owned(),
            found: format!("{} x {}", images.rows, images.cols),
            expected: "28 x 28".into(),
        });
    }
    if images.count != labels.len() {
        return Err(CmnistError::CountMismatch {
            images: images_path.to_owned(),
            n_images: images.count,
            labels: labels_path.to_owned(),
            n_labels: labels.len(),
        });
    }
    if let Some((index, &label)) = labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= N_CLASSES)
    {
        return Err(CmnistError::BadLabel {
            path: labels_path.to_owned(),
            index,
            label,
            n_classes: N_CLASSES,
        });
    }
    Ok(())
}

/// Writes a small, valid set of the four IDX files (raw, not gzipped) into `dir`: `n_train` and
/// `n_test` 28x28 images whose labels cycle through the classes and whose pixels draw a
/// label-dependent bar. For tests and examples that must not depend on the real data; load it
/// with [`Verification::Skip`].
pub fn write_synthetic_source(dir: &Path, n_train: usize, n_test: usize) -> Result<()> {
    let make = |n: usize, offset: usize| {
        let labels: Vec<u8> = (0..n).map(|i| ((i + offset) % N_CLASSES) as u8).collect();
        let mut pixels = vec![0u8; n * 784];
        for (i, &label) in labels.iter().enumerate() {
            let img = &mut pixels[i * 784..(i + 1) * 784];
            for r in 4..24 {
                for c in 0..3 {
                    let col = 2 + 2 * usize::from(label) + c;
                    img[r * 28 + col] = (120 + 5 * ((r + i) % 27)) as u8;
                }
            }
        }
        (
            IdxImages {
                count: n,
                rows: 28,
                cols: 28,
                pixels,
            },
            labels,
        )
    };
    let (train, train_labels) = make(n_train, 0);
    let (test, test_labels) = make(n_test, 3);
    let files = SourceKind::Mnist.files();
    let blobs = [
        idx::encode_images(&train),
        idx::encode_labels(&train_labels),
        idx::encode_images(&test),
        idx::encode_labels(&test_labels),
    ];
    for (file, blob) in files.iter().zip(blobs) {
        let path = dir.join(file.name);
        std::fs::write(&path, blob).map_err(|e| CmnistError::Write {
            path,
            problem: e.to_string(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_a_known_vector() {
        // FIPS 180-2 test vector for "abc".
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn synthetic_source_loads_without_checksums_and_fails_with_them() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        write_synthetic_source(dir.path(), 40, 20)?;
        let src = GreySource::load(dir.path(), SourceKind::Mnist, Verification::Skip)?;
        assert_eq!(src.train_images.count, 40);
        assert_eq!(src.test_labels.len(), 20);
        assert_eq!(src.checksums.len(), 4);
        let err =
            GreySource::load(dir.path(), SourceKind::Mnist, Verification::Checksums).unwrap_err();
        assert!(matches!(err, CmnistError::ChecksumMismatch { .. }), "{err}");
        assert!(err.to_string().contains("--skip-checksum"));
        Ok(())
    }

    #[test]
    fn missing_folder_or_file_is_named() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let err = GreySource::load(dir.path(), SourceKind::Mnist, Verification::Skip).unwrap_err();
        assert!(matches!(
            err,
            CmnistError::MissingFile {
                name: "train-images-idx3-ubyte",
                ..
            }
        ));
        assert!(err.to_string().contains("--mnist-dir"));
        Ok(())
    }

    #[test]
    fn label_count_mismatch_and_bad_labels_are_caught() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        write_synthetic_source(dir.path(), 30, 10)?;
        std::fs::write(
            dir.path().join("train-labels-idx1-ubyte"),
            idx::encode_labels(&[1; 29]),
        )?;
        let err = GreySource::load(dir.path(), SourceKind::Mnist, Verification::Skip).unwrap_err();
        assert!(
            matches!(
                err,
                CmnistError::CountMismatch {
                    n_images: 30,
                    n_labels: 29,
                    ..
                }
            ),
            "{err}"
        );
        let mut labels = vec![1u8; 30];
        labels[17] = 12;
        std::fs::write(
            dir.path().join("train-labels-idx1-ubyte"),
            idx::encode_labels(&labels),
        )?;
        let err = GreySource::load(dir.path(), SourceKind::Mnist, Verification::Skip).unwrap_err();
        assert!(
            matches!(
                err,
                CmnistError::BadLabel {
                    index: 17,
                    label: 12,
                    ..
                }
            ),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn wrong_image_size_is_caught() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        write_synthetic_source(dir.path(), 4, 4)?;
        let small = IdxImages {
            count: 4,
            rows: 27,
            cols: 28,
            pixels: vec![0; 4 * 27 * 28],
        };
        std::fs::write(
            dir.path().join("t10k-images-idx3-ubyte"),
            idx::encode_images(&small),
        )?;
        let err = GreySource::load(dir.path(), SourceKind::Mnist, Verification::Skip).unwrap_err();
        assert!(matches!(err, CmnistError::WrongDimensions { .. }), "{err}");
        Ok(())
    }
}
