//! `debiasdd import` as a user runs it: a CSV of PNG images becomes a dataset that `subset`,
//! `distill` and `evaluate` take as they take Colored MNIST; bad rows fail in one line.
#![allow(clippy::print_stderr)]

use std::path::Path;

mod common;
use common::{assert_clean_failure, debiasdd, s, text};

/// 24 PNGs of 10 x 14 (cropped to 10 x 10, resized to 8 x 8): 2 classes x 2 "places", the
/// class's usual place 5 times out of 6.
fn write_images(dir: &Path) -> std::path::PathBuf {
    let mut csv = String::from("img_filename,y,place\n");
    for i in 0..24u8 {
        let (class, place) = (i % 2, if i % 6 == 5 { 1 - i % 2 } else { i % 2 });
        let rgb = [40 + 150 * place, 60, 40 + 150 * class];
        let img = image::RgbImage::from_fn(10, 14, |x, y| {
            image::Rgb(rgb.map(|c| c.wrapping_add((x * 3 + y * 5) as u8)))
        });
        let name = format!("img/{i:02}.png");
        std::fs::create_dir_all(dir.join("img")).unwrap();
        img.save(dir.join(&name)).unwrap();
        csv += &format!("{name},{class},{}\n", ["land", "water"][usize::from(place)]);
    }
    let path = dir.join("metadata.csv");
    std::fs::write(&path, csv).unwrap();
    path
}

#[test]
fn imported_images_go_through_subset_distill_and_evaluate() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let csv = write_images(dir.path());
    let data = dir.path().join("own.safetensors");
    let run = debiasdd(&[
        "import",
        "--csv",
        s(&csv),
        "--path-column",
        "img_filename",
        "--label-column",
        "y",
        "--attribute-column",
        "place",
        "--size",
        "8",
        "--test-share",
        "0.25",
        "--valid-share",
        "0",
        "--out",
        s(&data),
        "--preview",
        s(&dir.path().join("own.png")),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let stdout = text(&run.stdout);
    assert!(
        stdout.contains("24 images of 3x8x8: 18 train, 0 valid, 6 test"),
        "{stdout}"
    );
    assert!(stdout.contains("attributes: land, water"), "{stdout}");

    let syn = dir.path().join("syn.safetensors");
    let run = debiasdd(&[
        "distill",
        "--data",
        s(&data),
        "--method",
        "dm",
        "--mode",
        "group",
        "--ipc",
        "2",
        "--iterations",
        "2",
        "--width",
        "4",
        "--depth",
        "2",
        "--out",
        s(&syn),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let set = debiasdd_data::SyntheticSet::load(&syn)?;
    assert_eq!(set.set.shape, debiasdd_data::ImageShape::new(3, 8, 8)?);
    assert_eq!(set.set.len(), 4, "2 classes x 2 per class");

    let json = dir.path().join("eval.json");
    let run = debiasdd(&[
        "evaluate",
        "--data",
        s(&data),
        "--synthetic",
        s(&syn),
        "--width",
        "4",
        "--depth",
        "2",
        "--models",
        "1",
        "--epochs",
        "2",
        "--json",
        s(&json),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    let groups = &report["runs"][0]["metrics"]["group_counts"];
    assert_eq!(groups.as_array().map(Vec::len), Some(2), "{groups}");

    let sub = dir.path().join("sub.safetensors");
    let run = debiasdd(&[
        "subset",
        "--data",
        s(&data),
        "--stratify",
        "group",
        "--per",
        "1",
        "--out",
        s(&sub),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    Ok(())
}

#[test]
fn bad_csvs_fail_in_one_line_naming_the_row() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let csv = write_images(dir.path());
    let out = dir.path().join("never.safetensors");
    let import = |csv: &Path, label: &str| {
        debiasdd(&[
            "import",
            "--csv",
            s(csv),
            "--path-column",
            "img_filename",
            "--label-column",
            label,
            "--size",
            "8",
            "--out",
            s(&out),
        ])
    };
    assert_clean_failure(&import(&csv, "label"), "no column \"label\"");
    let text_csv = std::fs::read_to_string(&csv)?.replace("img/03.png", "img/missing.png");
    let broken = dir.path().join("broken.csv");
    std::fs::write(&broken, text_csv)?;
    assert_clean_failure(&import(&broken, "y"), "broken.csv line 5");
    assert!(!out.exists(), "nothing is written when a row fails");
    Ok(())
}
