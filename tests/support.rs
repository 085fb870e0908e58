//! Shared helpers of the end-to-end tests: where the real data lives, and a loud skip when it
//! does not.
#![allow(clippy::print_stderr)]

use std::path::{Path, PathBuf};

/// `../shared/data/mnist` beside the project, if it exists; otherwise prints why the caller
/// skips and returns `None`.
pub fn shared_mnist(test: &str) -> Option<PathBuf> {
    existing_dir(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist"),
        test,
    )
}

/// Debian's Fashion-MNIST (`apt-get install dataset-fashion-mnist`), if installed.
pub fn system_fashion_mnist(test: &str) -> Option<PathBuf> {
    existing_dir(PathBuf::from("/usr/share/datasets/fashion-mnist"), test)
}

fn existing_dir(dir: PathBuf, test: &str) -> Option<PathBuf> {
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("SKIPPED {test}: {} does not exist", dir.display());
        None
    }
}
