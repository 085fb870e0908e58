//! Pinned results: `debiasdd distill` on a tiny generated Colored MNIST must give, to the last
//! bit on the CPU, the losses and synthetic images that the code gave before the engine was
//! split into strata x method and the model into backends (recorded at commit 2a7d2b3, on the
//! 2-core AMD EPYC development machine: AVX2/FMA, no AVX-512). A refactor that changes the order
//! of floating-point operations shows up here. If it fails after an intended numeric change, or
//! on a CPU whose `gemm` kernels differ (AVX-512), re-record with
//! `PIN_PRINT=1 cargo test -p debiasdd-cli --test pinned -- --nocapture` and say why in the
//! commit.
#![allow(clippy::print_stderr)]

use std::path::Path;

mod common;
use common::{debiasdd, s, text, tiny_dataset};

/// FNV-1a over bytes: enough to pin a buffer, no extra dependency.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// (losses of every iteration as f64 bits, hash of the synthetic images' f32 bytes).
fn run(data: &Path, dir: &Path, name: &str, extra: &[&str]) -> (Vec<u64>, u64) {
    let out = dir.join(format!("{name}.safetensors"));
    let history = dir.join(format!("{name}.jsonl"));
    let mut args = vec![
        "distill",
        "--data",
        s(data),
        "--out",
        s(&out),
        "--history",
        s(&history),
        "--iterations",
        "2",
        "--width",
        "4",
        "--depth",
        "2",
        "--outer-loop",
        "2",
        "--inner-loop",
        "2",
        "--batch-real",
        "8",
        "--seed",
        "3",
    ];
    args.extend(extra);
    let run = debiasdd(&args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let losses = std::fs::read_to_string(&history)
        .expect("history written")
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            v["loss"].as_f64().expect("a loss").to_bits()
        })
        .collect();
    let set = debiasdd_data::SyntheticSet::load(&out).expect("synthetic set");
    let bytes: Vec<u8> = set
        .set
        .images
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    (losses, fnv1a(&bytes))
}

#[test]
fn distillation_results_are_unchanged_to_the_bit() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    let cases: [(&str, &[&str]); 5] = [
        ("class", &["--mode", "class"]),
        ("group", &["--mode", "group"]),
        ("class-vs-groups", &["--mode", "class-vs-groups"]),
        (
            "group-real-mse",
            &["--mode", "group", "--init", "real", "--distance", "mse"],
        ),
        (
            "class-cos",
            &["--mode", "class", "--distance", "cos", "--ipc", "3"],
        ),
    ];
    let got: Vec<(&str, (Vec<u64>, u64))> = cases
        .iter()
        .map(|(name, extra)| (*name, run(&data, dir.path(), name, extra)))
        .collect();
    if std::env::var_os("PIN_PRINT").is_some() {
        for (name, (losses, hash)) in &got {
            let losses: Vec<String> = losses.iter().map(|b| format!("{b:#018x}")).collect();
            eprintln!("(\"{name}\", &[{}], {hash:#018x}),", losses.join(", "));
        }
    }
    assert_eq!(got.len(), PINNED.len(), "one pinned entry per case");
    for ((name, (losses, hash)), (pin_name, pin_losses, pin_hash)) in got.iter().zip(PINNED) {
        assert_eq!(name, pin_name);
        let decoded: Vec<f64> = losses.iter().map(|&b| f64::from_bits(b)).collect();
        assert_eq!(
            losses.as_slice(),
            *pin_losses,
            "{name}: losses {decoded:?} differ from the pinned ones"
        );
        assert_eq!(*hash, *pin_hash, "{name}: synthetic images differ");
    }
    Ok(())
}

/// (case, losses per iteration as f64 bits, FNV-1a of the images), recorded at 2a7d2b3.
const PINNED: &[(&str, &[u64], u64)] = &[
    (
        "class",
        &[0x40274b6fb3333333, 0x4028e5ec1999999a],
        0x1931249e7dce5757,
    ),
    (
        "group",
        &[0x402a09820ea0ea0e, 0x402be9c76db6db6e],
        0xde26a23853d3992c,
    ),
    (
        "class-vs-groups",
        &[0x402788bf7c57c57c, 0x4028f0784924924a],
        0xefbc7dffc26c7944,
    ),
    (
        "group-real-mse",
        &[0x4008460e83a83a84, 0x4001151f33333333],
        0x4e7c8e82d6b36826,
    ),
    (
        "class-cos",
        &[0x3fe172cbb3333333, 0x3fe2e470c0000000],
        0x3308eb37231595ed,
    ),
];
