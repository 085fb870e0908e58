//! Pinned results: `debiasdd distill` on a tiny generated Colored MNIST must give, to the last
//! bit on the CPU, the losses and synthetic images that the code gave before the engine was
//! split into strata x method and the model into backends (recorded at commit 2a7d2b3, on the
//! 2-core AMD EPYC development machine: AVX2/FMA, no AVX-512; a second set for AVX-512 CPUs). A
//! refactor that changes the order of floating-point operations shows up here. If it fails after an intended numeric change, or
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
    let pinned = pinned_for_this_cpu();
    assert_eq!(got.len(), pinned.len(), "one pinned entry per case");
    for ((name, (losses, hash)), (pin_name, pin_losses, pin_hash)) in got.iter().zip(pinned) {
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

/// The pins of this CPU's `gemm` kernels: `gemm` (with `x86-v4`) picks its AVX-512 kernels at
/// run time where the CPU has them, which sum in another order than the AVX2/FMA ones.
fn pinned_for_this_cpu() -> &'static [(&'static str, &'static [u64], u64)] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return PINNED_AVX512;
    }
    PINNED
}

/// The same cases on a 2-core machine with AVX-512 (avx512f/bw/cd/dq/vl/ifma/vbmi), recorded at
/// f82d39d and 1d3514f alike (the same bytes before and after the NCCL change). The losses agree
/// with the AVX2 pins in the leading digits and differ in the last ones in three cases; the
/// images differ in rounding.
const PINNED_AVX512: &[(&str, &[u64], u64)] = &[
    (
        "class",
        &[0x40274b6fb3333333, 0x4028e5ec1999999a],
        0x6c62565693c5109d,
    ),
    (
        "group",
        &[0x402a09820ea0ea0e, 0x402be9c77c57c57b],
        0x4dc5a0b611a80179,
    ),
    (
        "class-vs-groups",
        &[0x402788bf7c57c57c, 0x4028f0784924924a],
        0x1911053a50f184cf,
    ),
    (
        "group-real-mse",
        &[0x4008460e57c57c58, 0x4001151f33333333],
        0x2f311a859dfb8b26,
    ),
    (
        "class-cos",
        &[0x3fe172cbb3333333, 0x3fe2e470cccccccd],
        0x2042800a17e039d0,
    ),
];

/// (case, losses per iteration as f64 bits, FNV-1a of the images), recorded at 2a7d2b3 (AVX2/FMA).
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
