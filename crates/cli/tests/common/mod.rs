//! Helpers shared by the binary's integration tests: run `debiasdd`, read its output, check
//! that a failure is one clean line.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn debiasdd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_debiasdd"))
        .args(args)
        .env_remove("DEBIASDD_MNIST_DIR")
        .output()
        .expect("the debiasdd binary runs")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A failure is one `error:` line on stderr, exit code 1, no panic.
pub fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one line expected: {stderr}"
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A 300-image Colored MNIST at ratio 0.1 in `dir/c.safetensors`.
pub fn tiny_dataset(dir: &Path) -> PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).expect("source dir");
    debiasdd_cmnist::source::write_synthetic_source(&src, 400, 100).expect("synthetic source");
    let file = dir.join("c.safetensors");
    let out = debiasdd(&[
        "generate",
        "--mnist-dir",
        s(&src),
        "--skip-checksum",
        "--ratio",
        "0.1",
        "--train-size",
        "300",
        "--valid-size",
        "50",
        "--out",
        s(&file),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    file
}
