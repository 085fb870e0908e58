//! `debiasdd evaluate` as a user runs it, on a tiny generated Colored MNIST and a tiny network:
//! the DSA protocol recorded in the report, and `--dsa` refused next to `--no-augment`.

mod common;
use common::{debiasdd, s, text, tiny_dataset};

#[test]
fn evaluate_with_dsa_records_the_dsa_augmentation() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    let subset = dir.path().join("subset.safetensors");
    let run = debiasdd(&[
        "subset",
        "--data",
        s(&data),
        "--stratify",
        "class",
        "--per",
        "2",
        "--out",
        s(&subset),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let json = dir.path().join("eval.json");
    let run = debiasdd(&[
        "evaluate",
        "--data",
        s(&data),
        "--synthetic",
        s(&subset),
        "--width",
        "2",
        "--depth",
        "1",
        "--models",
        "1",
        "--dsa",
        "--epochs",
        "1",
        "--json",
        s(&json),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let train = &report["config"]["train"];
    assert_eq!(
        train["epochs"], 1,
        "--epochs overrides the DSA protocol's 1000"
    );
    let augment = &train["augment"];
    assert_eq!(augment["kind"], "dsa", "{augment}");
    assert_eq!(
        augment["families"],
        serde_json::json!(["color", "crop", "cutout", "scale", "rotate"])
    );
    assert_eq!(augment["scale"], 1.2);
    assert_eq!(report["runs"].as_array().map(Vec::len), Some(1));
    Ok(())
}

#[test]
fn dsa_and_no_augment_are_refused_together() {
    // Clap refuses before any file is read, so the paths need not exist.
    let run = debiasdd(&[
        "evaluate",
        "--data",
        "missing.safetensors",
        "--synthetic",
        "missing-too.safetensors",
        "--json",
        "never.json",
        "--dsa",
        "--no-augment",
    ]);
    assert!(!run.status.success());
    let stderr = text(&run.stderr);
    let first = stderr.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("error:") && first.contains("--dsa") && first.contains("--no-augment"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
