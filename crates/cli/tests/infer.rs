//! `debiasdd infer-groups` as a user runs it: the dataset, report and heat map it writes, the
//! inferred groups used by `subset` and `distill` like annotated ones, one-line errors.

use debiasdd_data::SyntheticSet;

mod common;
use common::{assert_clean_failure, debiasdd, s, text, tiny_dataset};

#[test]
fn infers_groups_that_subset_and_distill_use() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    let out = dir.path().join("inferred.safetensors");
    let json = dir.path().join("report.json");
    let heat = dir.path().join("heat.png");
    let run = debiasdd(&[
        "infer-groups",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--json",
        s(&json),
        "--heatmap",
        s(&heat),
        "--width",
        "8",
        "--epochs",
        "3",
        "--method",
        "prediction",
    ]);
    let stdout = text(&run.stdout);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(stdout.contains("inferred groups: prediction"), "{stdout}");
    assert!(
        stdout.contains("agreement with the annotations"),
        "{stdout}"
    );
    let inferred = debiasdd_data::file::load(&out)?;
    let original = debiasdd_data::file::load(&data)?;
    assert!(inferred.info.inferred.is_some());
    assert_eq!(
        inferred.true_train_attributes.as_deref(),
        Some(&original.train.attributes[..])
    );
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    assert_eq!(report["method"], "prediction");
    assert!(
        report["agreement"]["bias_label_accuracy"]
            .as_f64()
            .is_some()
    );
    // 10 colour rows x 10 inferred columns with a colour swatch per row.
    assert_eq!(image::open(&heat)?.width(), 16 + 12 + 10 * 21);

    // A group-stratified subset draws from the inferred groups.
    let subset = dir.path().join("subset.safetensors");
    let run = debiasdd(&[
        "subset",
        "--data",
        s(&out),
        "--stratify",
        "group",
        "--out",
        s(&subset),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let set = SyntheticSet::load(&subset)?;
    let non_empty = inferred
        .train
        .group_index()
        .counts()
        .as_slice()
        .iter()
        .filter(|&&c| c > 0)
        .count();
    assert_eq!(set.set.len(), non_empty);

    // Group-wise distillation over them.
    let distilled = dir.path().join("dm.safetensors");
    let run = debiasdd(&[
        "distill",
        "--data",
        s(&out),
        "--method",
        "dm",
        "--mode",
        "group",
        "--iterations",
        "2",
        "--batch-real",
        "4",
        "--out",
        s(&distilled),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let set = SyntheticSet::load(&distilled)?;
    assert_eq!(set.set.len(), 100);
    assert_eq!(set.set.spec.n_attributes(), 10);
    Ok(())
}

#[test]
fn bad_options_fail_in_one_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    let out = dir.path().join("x.safetensors");
    for (extra, needle) in [
        (vec!["--folds", "1"], "`folds`"),
        (vec!["--q", "0"], "`q`"),
        (vec!["--clusters", "1"], "`clusters`"),
    ] {
        let mut args = vec!["infer-groups", "--data", s(&data), "--out", s(&out)];
        args.extend(extra);
        assert_clean_failure(&debiasdd(&args), needle);
    }
    let missing = dir.path().join("missing.safetensors");
    assert_clean_failure(
        &debiasdd(&["infer-groups", "--data", s(&missing), "--out", s(&out)]),
        "missing.safetensors",
    );
    Ok(())
}
