//! `debiasdd generate` as a user runs it: exit codes, one-line errors, the files it writes.
//! Uses a tiny synthetic source, and the real MNIST under `../shared/data/mnist` when present.
#![allow(clippy::print_stderr)]

use std::path::{Path, PathBuf};

use debiasdd_cmnist::colored::conflicting_count;
use debiasdd_cmnist::source::write_synthetic_source;

mod common;
use common::{assert_clean_failure, debiasdd, s, text};

fn synthetic_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    write_synthetic_source(dir.path(), 400, 100).expect("synthetic source");
    dir
}

#[test]
fn generates_file_preview_and_table_from_a_small_source() -> anyhow::Result<()> {
    let src = synthetic_dir();
    let out_dir = tempfile::tempdir()?;
    let file = out_dir.path().join("c.safetensors");
    let png = out_dir.path().join("c.png");
    let out = debiasdd(&[
        "generate",
        "--mnist-dir",
        s(src.path()),
        "--skip-checksum",
        "--ratio",
        "0.1",
        "--seed",
        "3",
        "--train-size",
        "300",
        "--valid-size",
        "50",
        "--out",
        s(&file),
        "--preview",
        s(&png),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let data = debiasdd_data::file::load(&file)?;
    assert_eq!(
        (data.train.len(), data.valid.len(), data.test.len()),
        (300, 50, 100)
    );
    assert_eq!(
        debiasdd_cmnist::ColoredMnistConfig::of_dataset(&data).map(|c| c.seed),
        Some(3)
    );
    assert_eq!(image::open(&png)?.width(), 604);
    let train_row: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with("train "))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(train_row.get(1), Some(&"300"), "{stdout}");
    // The counts table: a header, 10 class rows, a total row.
    let rows = stdout.lines().filter(|l| l.contains(" | ")).count();
    assert_eq!(rows, 12, "{stdout}");
    Ok(())
}

#[test]
fn invalid_ratio_is_one_clear_line() {
    let src = synthetic_dir();
    let out = debiasdd(&[
        "generate",
        "--mnist-dir",
        s(src.path()),
        "--ratio",
        "1.5",
        "--out",
        "/tmp/never.st",
    ]);
    assert_clean_failure(&out, "ratio 1.5 is outside [0, 1]");
    assert!(!Path::new("/tmp/never.st").exists());
}

#[test]
fn missing_folder_points_to_the_fix() {
    let out = debiasdd(&[
        "generate",
        "--mnist-dir",
        "/no/such/folder",
        "--ratio",
        "0.1",
        "--out",
        "/tmp/x.st",
    ]);
    assert_clean_failure(&out, "--mnist-dir");
}

#[test]
fn wrong_checksum_is_refused_unless_skipped() {
    let src = synthetic_dir();
    let out_dir = tempfile::tempdir().expect("temp dir");
    let file = out_dir.path().join("c.safetensors");
    let out = debiasdd(&[
        "generate",
        "--mnist-dir",
        s(src.path()),
        "--ratio",
        "0.1",
        "--train-size",
        "300",
        "--valid-size",
        "50",
        "--out",
        s(&file),
    ]);
    assert_clean_failure(&out, "--skip-checksum");
    assert!(!file.exists());
}

#[test]
fn split_larger_than_the_source_is_explained() {
    let src = synthetic_dir();
    let out = debiasdd(&[
        "generate",
        "--mnist-dir",
        s(src.path()),
        "--skip-checksum",
        "--ratio",
        "0.1",
        "--out",
        "/tmp/x.st",
    ]);
    assert_clean_failure(&out, "--train-size");
}

fn shared_mnist() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/mnist");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: {} not found; the real-MNIST check of `debiasdd generate` did not run",
            dir.display()
        );
        None
    }
}

#[test]
fn real_mnist_seed_preset_follows_the_protocol() -> anyhow::Result<()> {
    let Some(mnist) = shared_mnist() else {
        return Ok(());
    };
    let out_dir = tempfile::tempdir()?;
    let run = |name: &str| -> anyhow::Result<PathBuf> {
        let file = out_dir.path().join(name);
        let png = file.with_extension("png");
        let out = debiasdd(&[
            "generate",
            "--mnist-dir",
            s(&mnist),
            "--ratio",
            "0.01",
            "--seed",
            "7",
            "--out",
            s(&file),
            "--preview",
            s(&png),
        ]);
        anyhow::ensure!(out.status.success(), "{}", text(&out.stderr));
        anyhow::ensure!(png.is_file(), "no preview written");
        Ok(file)
    };
    let first = run("a.safetensors")?;
    let data = debiasdd_data::file::load(&first)?;
    assert_eq!(
        (data.train.len(), data.valid.len(), data.test.len()),
        (45_000, 5_000, 10_000)
    );
    for class in 0..10u8 {
        let members: Vec<usize> = (0..data.train.len())
            .filter(|&i| data.train.labels[i] == class)
            .collect();
        let conflicting = members
            .iter()
            .filter(|&&i| !debiasdd_cmnist::is_aligned(&data.train, i))
            .count();
        assert_eq!(
            conflicting,
            conflicting_count(0.01, members.len()),
            "class {class}"
        );
    }
    for split in [&data.valid, &data.test] {
        let mut per_colour = [0usize; 10];
        for c in split.attributes.iter().flatten() {
            per_colour[usize::from(*c)] += 1;
        }
        let expected = split.len() / 10;
        for n in per_colour {
            assert!(n.abs_diff(expected) < expected / 5, "{per_colour:?}");
        }
    }
    let second = run("b.safetensors")?;
    assert_eq!(
        std::fs::read(&first)?,
        std::fs::read(&second)?,
        "same seed, same bytes"
    );
    Ok(())
}

#[test]
fn cifar10s_comes_from_the_binary_archive_and_background_presets_colour_the_background()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let archive = dir.path().join("cifar-10-binary.tar.gz");
    debiasdd_cmnist::cifar::write_synthetic_archive(&archive, 20, 10)?;
    let out = dir.path().join("c10s.safetensors");
    let run = debiasdd(&[
        "generate",
        "--preset",
        "cifar10s",
        "--cifar",
        s(&archive),
        "--ratio",
        "0.1",
        "--out",
        s(&out),
        "--preview",
        s(&dir.path().join("c10s.png")),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(text(&run.stdout).contains("100 train, 20 test images of 3x32x32"));
    let data = debiasdd_data::file::load(&out)?;
    assert_eq!(data.info.attributes, ["grey", "colour"]);
    assert_eq!(
        data.train.group_index().counts().get(0),
        9,
        "class 0: 9 of 10 grey"
    );
    assert!(dir.path().join("c10s.png").is_file());

    let missing = debiasdd(&[
        "generate",
        "--preset",
        "cifar10s",
        "--cifar",
        s(&dir.path().join("nowhere")),
        "--ratio",
        "0.05",
        "--out",
        s(&out),
    ]);
    assert_clean_failure(&missing, "cargo xtask download --dataset cifar10");

    let src = synthetic_dir();
    let bg = dir.path().join("bg.safetensors");
    let run = debiasdd(&[
        "generate",
        "--preset",
        "cmnist-bg",
        "--mnist-dir",
        s(src.path()),
        "--skip-checksum",
        "--ratio",
        "0.1",
        "--train-size",
        "300",
        "--out",
        s(&bg),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let data = debiasdd_data::file::load(&bg)?;
    let config = debiasdd_cmnist::ColoredMnistConfig::of_dataset(&data).expect("provenance");
    assert_eq!(config.colouring, debiasdd_cmnist::Colouring::Background);
    assert_eq!(data.info.name, "cmnist-bg-ratio0.1");
    Ok(())
}
