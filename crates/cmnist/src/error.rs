//! The errors of reading grey MNIST, building Colored MNIST and reading and writing its files,
//! each naming the file or value at fault and the fix.

use std::path::PathBuf;

/// Everything that can go wrong reading grey sources, building Colored MNIST, or reading and
/// writing its files. Every variant names the file or value at fault and, where there is one,
/// the fix.
#[derive(Debug, thiserror::Error)]
pub enum CmnistError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not a valid gzip stream ({source}); the download was probably cut short, \
         delete the file and fetch it again"
    )]
    Gzip {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: wrong IDX magic number {found:#010x} (expected {expected:#010x}); \
         this is not an MNIST-style {kind} file"
    )]
    BadMagic {
        path: PathBuf,
        found: u32,
        expected: u32,
        kind: &'static str,
    },
    #[error("{path}: truncated IDX file: {actual} bytes where the header promises {expected}")]
    Truncated {
        path: PathBuf,
        expected: usize,
        actual: usize,
    },
    #[error(
        "{path}: {actual} bytes where the header promises {expected}; trailing data means the file \
         is not what its header says"
    )]
    TrailingBytes {
        path: PathBuf,
        expected: usize,
        actual: usize,
    },
    #[error("{path}: images are {found}, expected {expected}")]
    WrongDimensions {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{images}: {n_images} images but {labels} has {n_labels} labels; the pair must match")]
    CountMismatch {
        images: PathBuf,
        n_images: usize,
        labels: PathBuf,
        n_labels: usize,
    },
    #[error("{path}: sample {index} has label {label}, but only classes 0..{n_classes} exist")]
    BadLabel {
        path: PathBuf,
        index: usize,
        label: u8,
        n_classes: usize,
    },
    #[error(
        "{dir} has no {name}(.gz); point at a folder holding the four {source_name} IDX files \
         (e.g. `cargo xtask download --from DIR` or `--mnist-dir DIR`)"
    )]
    MissingFile {
        dir: PathBuf,
        name: &'static str,
        source_name: &'static str,
    },
    #[error(
        "{path}: SHA-256 of the decompressed content is {actual}, expected {expected} for \
         {source_name}; the file is corrupt or not {source_name} (re-download it, or pass \
         --skip-checksum to use other data on purpose)"
    )]
    ChecksumMismatch {
        path: PathBuf,
        expected: &'static str,
        actual: String,
        source_name: &'static str,
    },
    #[error("bias-conflicting ratio {0} is outside [0, 1]; pass e.g. --ratio 0.01")]
    InvalidRatio(f64),
    #[error("colour jitter std {0} must be finite and >= 0")]
    InvalidJitter(f64),
    #[error(
        "the split sizes ask for {train} train + {valid} valid images, but the grey training set \
         has only {available}; lower them (e.g. --train-size/--valid-size)"
    )]
    SplitTooLarge {
        train: usize,
        valid: usize,
        available: usize,
    },
    #[error("{path}: {problem}")]
    BadArchive { path: PathBuf, problem: String },
    #[error("cannot write {path}: {problem}")]
    Write { path: PathBuf, problem: String },
    #[error(transparent)]
    Data(#[from] debiasdd_data::DataError),
}

pub type Result<T, E = CmnistError> = std::result::Result<T, E>;

impl CmnistError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
