//! `debiasdd distill` and `debiasdd subset` as a user runs them, on a tiny generated Colored
//! MNIST and a tiny network: files written, resume, one-line errors.
#![allow(clippy::print_stderr)]

use std::path::Path;
use std::process::Command;

use debiasdd_data::SyntheticSet;

mod common;
use common::{assert_clean_failure, debiasdd, s, text, tiny_dataset};

/// `distill` on `data` with the tiny network settings, plus `extra`.
fn distill_args<'a>(
    data: &'a Path,
    mode: &'a str,
    iterations: &'a str,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "distill",
        "--data",
        s(data),
        "--mode",
        mode,
        "--iterations",
        iterations,
        "--out",
        s(out),
    ];
    args.extend(TINY);
    args.extend(extra);
    args
}

const TINY: [&str; 12] = [
    "--width",
    "2",
    "--depth",
    "1",
    "--outer-loop",
    "2",
    "--inner-loop",
    "1",
    "--batch-real",
    "4",
    "--grid-every",
    "1",
];

#[test]
fn distills_writes_grids_checkpoints_and_resumes() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    let out = dir.path().join("syn.safetensors");
    let grid = dir.path().join("grid");
    let args = distill_args(&data, "group", "2", &out, &["--grid", s(&grid)]);
    let run = debiasdd(&args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let stdout = text(&run.stdout);
    assert!(stdout.contains("mode group"), "{stdout}");
    let set = SyntheticSet::load(&out)?;
    assert_eq!(set.set.len(), 100);
    assert_eq!(set.set.groups[13], Some(13));
    assert!(set.config.unwrap().contains("\"mode\":\"group\""));
    for png in ["iter-00001.png", "iter-00002.png", "final.png"] {
        assert!(grid.join(png).exists(), "{png}");
    }
    let ckpt = dir.path().join("syn.ckpt.safetensors");
    assert!(ckpt.exists());

    // Resume to 3 iterations, and compare with a straight 3-iteration run.
    let resumed_out = dir.path().join("resumed.safetensors");
    let resume = distill_args(&data, "group", "3", &resumed_out, &["--resume", s(&ckpt)]);
    let run = debiasdd(&resume);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(text(&run.stdout).contains("at iteration 2/3"));
    let straight_out = dir.path().join("straight.safetensors");
    let straight = distill_args(&data, "group", "3", &straight_out, &[]);
    let run = debiasdd(&straight);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert_eq!(
        SyntheticSet::load(&resumed_out)?.set.images,
        SyntheticSet::load(&straight_out)?.set.images
    );
    Ok(())
}

#[test]
fn bad_settings_fail_in_one_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    let out = dir.path().join("syn.safetensors");
    for (extra, needle) in [
        (vec!["--ipc", "0"], "ipc"),
        (vec!["--mode", "group", "--ipc", "5"], "multiple of 10"),
        (vec!["--lr-img=-1"], "lr_img"),
    ] {
        let mut args = vec!["distill", "--data", s(&data), "--out", s(&out)];
        args.extend(extra);
        assert_clean_failure(&debiasdd(&args), needle);
    }
    Ok(())
}

#[test]
fn subsets_are_stratified() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    let class = dir.path().join("class.safetensors");
    let run = debiasdd(&[
        "subset",
        "--data",
        s(&data),
        "--stratify",
        "class",
        "--per",
        "3",
        "--out",
        s(&class),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let set = SyntheticSet::load(&class)?;
    assert_eq!(set.set.len(), 30);
    for c in 0..10u8 {
        assert_eq!(set.set.labels.iter().filter(|&&l| l == c).count(), 3);
    }
    let group = dir.path().join("group.safetensors");
    let run = debiasdd(&[
        "subset",
        "--data",
        s(&data),
        "--stratify",
        "group",
        "--per",
        "1",
        "--out",
        s(&group),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let set = SyntheticSet::load(&group)?;
    let cmnist = debiasdd_data::file::load(&data)?;
    let non_empty = (0..100u16)
        .filter(|&g| cmnist.train.group_ids().contains(&Some(g)))
        .count();
    assert_eq!(set.set.len(), non_empty);
    let mut groups: Vec<u16> = set.set.groups.iter().map(|g| g.unwrap()).collect();
    groups.dedup();
    assert_eq!(groups.len(), non_empty, "one image per group");
    Ok(())
}

#[cfg(unix)]
#[test]
fn ctrl_c_writes_a_checkpoint_that_resumes() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    let out = dir.path().join("syn.safetensors");
    let args = distill_args(&data, "class", "100000", &out, &[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_debiasdd"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    // The handler is installed before the start line is printed.
    let first = lines.next().expect("a start line")?;
    assert!(first.starts_with("distill:"), "{first}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(killed.success());
    let rest: Vec<String> = lines.collect::<Result<_, _>>()?;
    let status = child.wait()?;
    // The checkpoint is written, then the process exits as a run stopped by SIGINT: 130.
    assert_eq!(status.code(), Some(130), "stdout {rest:?}");
    let message = rest.join("\n");
    assert!(message.contains("interrupted after iteration"), "{message}");
    let ckpt = dir.path().join("syn.ckpt.safetensors");
    assert!(ckpt.exists());
    assert!(
        !out.exists(),
        "no synthetic set is written for an interrupted run"
    );
    // Resume and finish one more iteration than the checkpoint holds.
    let done: usize = message
        .split("interrupted after iteration ")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .expect("iteration in the message");
    let target = (done + 1).to_string();
    let resume = distill_args(&data, "class", &target, &out, &["--resume", s(&ckpt)]);
    let run = debiasdd(&resume);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(out.exists());
    Ok(())
}

#[test]
fn a_missing_file_is_named_once_with_its_os_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("nowhere.safetensors");
    let out = dir.path().join("syn.safetensors");
    let run = debiasdd(&distill_args(&missing, "class", "1", &out, &[]));
    assert_clean_failure(&run, "nowhere.safetensors");
    let stderr = text(&run.stderr);
    assert_eq!(
        stderr.matches("No such file or directory").count(),
        1,
        "the OS error once: {stderr}"
    );
    Ok(())
}

#[test]
fn a_diverging_run_names_only_options_that_would_change_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    let out = dir.path().join("syn.safetensors");
    for (distance, suggests_distance) in [("ours", false), ("mse", true)] {
        let args = distill_args(
            &data,
            "class",
            "3",
            &out,
            &["--lr-img", "1e39", "--distance", distance],
        );
        let run = debiasdd(&args);
        assert_clean_failure(&run, "matching loss became");
        let stderr = text(&run.stderr);
        // 1e39 overflows f32 in the first update.
        assert!(
            stderr.contains("lower --lr-img (now 1000000000"),
            "{stderr}"
        );
        assert!(stderr.contains("--lr-net (now 0.01)"), "{stderr}");
        assert_eq!(
            stderr.contains("--distance ours"),
            suggests_distance,
            "{distance}: {stderr}"
        );
    }
    Ok(())
}

#[cfg(unix)]
#[test]
fn outputs_get_the_usual_file_mode() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    let out = dir.path().join("syn.safetensors");
    let run = debiasdd(&distill_args(&data, "class", "1", &out, &[]));
    assert!(run.status.success(), "{}", text(&run.stderr));
    // What an ordinary file gets here under this process's umask.
    let probe = dir.path().join("probe");
    std::fs::write(&probe, b"")?;
    let usual = std::fs::metadata(&probe)?.permissions().mode() & 0o777;
    for file in [out.clone(), dir.path().join("syn.ckpt.safetensors"), data] {
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        assert_eq!(
            mode,
            usual,
            "{}: {mode:o}, expected {usual:o}",
            file.display()
        );
    }
    Ok(())
}

#[test]
fn dm_distils_with_dsa_over_every_strata_and_refuses_dc_options() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    let net = [
        "--width",
        "2",
        "--depth",
        "1",
        "--batch-real",
        "4",
        "--iterations",
        "2",
    ];
    for mode in ["class", "group", "class-vs-groups", "class-vs-group-mean"] {
        let out = dir.path().join(format!("dm-{mode}.safetensors"));
        let history = dir.path().join(format!("dm-{mode}.jsonl"));
        let mut args = vec![
            "distill",
            "--method",
            "dm",
            "--mode",
            mode,
            "--data",
            s(&data),
            "--out",
            s(&out),
            "--history",
            s(&history),
        ];
        args.extend(net);
        let run = debiasdd(&args);
        assert!(run.status.success(), "{mode}: {}", text(&run.stderr));
        let stdout = text(&run.stdout);
        assert!(
            stdout.contains("method dm") && stdout.contains("init real") && stdout.contains("DSA"),
            "{stdout}"
        );
        let config = SyntheticSet::load(&out)?.config.unwrap();
        assert!(
            config.contains("\"name\":\"dm\"") && config.contains("\"dsa\""),
            "{config}"
        );
        assert_eq!(std::fs::read_to_string(&history)?.lines().count(), 2);
    }
    // Real init asking more of a group than it has: drawn with replacement, and said so.
    let out = dir.path().join("ipc20.safetensors");
    let mut args = vec![
        "distill",
        "--method",
        "dm",
        "--ipc",
        "20",
        "--data",
        s(&data),
    ];
    args.extend(["--out", s(&out)]);
    args.extend(net);
    let run = debiasdd(&args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(
        text(&run.stderr).contains("drawing with replacement"),
        "{}",
        text(&run.stderr)
    );
    // --no-dsa is recorded as no augmentation.
    let out = dir.path().join("plain.safetensors");
    let mut args = vec!["distill", "--method", "dm", "--no-dsa", "--data", s(&data)];
    args.extend(["--out", s(&out)]);
    args.extend(net);
    let run = debiasdd(&args);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(
        !SyntheticSet::load(&out)?
            .config
            .unwrap()
            .contains("\"dsa\"")
    );
    // DC's options are refused by name.
    for (extra, needle) in [
        (vec!["--outer-loop", "3"], "`outer_loop`: is a DC setting"),
        (vec!["--distance", "mse"], "`distance`: is a DC setting"),
    ] {
        let mut args = vec![
            "distill",
            "--method",
            "dm",
            "--data",
            s(&data),
            "--out",
            s(&out),
        ];
        args.extend(extra);
        assert_clean_failure(&debiasdd(&args), needle);
    }
    // --dsa and --no-dsa together: clap's usage error, naming both.
    let mut args = vec![
        "distill",
        "--method",
        "dm",
        "--data",
        s(&data),
        "--out",
        s(&out),
    ];
    args.extend(["--dsa", "--no-dsa"]);
    let run = debiasdd(&args);
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--dsa") && stderr.contains("--no-dsa"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn ranks_split_the_terms_and_give_the_same_set() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = tiny_dataset(dir.path());
    // `name`'s set, with the history file of `log`.
    let run =
        |name: &str, log: &str, iterations: &str, extra: &[&str]| -> anyhow::Result<SyntheticSet> {
            let out = dir.path().join(format!("{name}.safetensors"));
            let history = dir.path().join(format!("{log}.jsonl"));
            let mut more = vec!["--history", s(&history)];
            more.extend(extra);
            let args = distill_args(&data, "group", iterations, &out, &more);
            let run = debiasdd(&args);
            assert!(run.status.success(), "{name}: {}", text(&run.stderr));
            let lines = std::fs::read_to_string(&history)?.lines().count();
            assert_eq!(
                lines.to_string(),
                iterations,
                "{name}: one history line per iteration"
            );
            Ok(SyntheticSet::load(&out)?)
        };
    let max_diff = |a: &SyntheticSet, b: &SyntheticSet| {
        a.set
            .images
            .iter()
            .zip(&b.set.images)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
    };
    let one = run("one", "one", "2", &[])?;
    let two = run("two", "two", "2", &["--ranks", "2"])?;
    let scale = one.set.images.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = max_diff(&one, &two);
    assert!(
        diff <= 1e-6 * scale,
        "2 ranks differ by {diff} (scale {scale})"
    );
    // A sharded run's checkpoint resumes with any rank count, its history continued; the
    // result is the straight run's within rounding.
    let ckpt = dir.path().join("two.ckpt.safetensors");
    let resumed = run(
        "resumed",
        "two",
        "3",
        &["--ranks", "3", "--resume", s(&ckpt)],
    )?;
    let straight = run("straight", "straight", "3", &[])?;
    let diff = max_diff(&straight, &resumed);
    assert!(
        diff <= 1e-6 * scale,
        "resumed over 3 ranks differs by {diff}"
    );

    let out = dir.path().join("bad.safetensors");
    let bad = debiasdd(&distill_args(&data, "group", "1", &out, &["--ranks", "0"]));
    assert_clean_failure(&bad, "at least 1 rank");
    // NCCL sums between GPUs: asked for on CPU ranks (or in a build without it), the run is
    // refused before it starts, saying why and what to pass instead.
    let nccl = debiasdd(&distill_args(
        &data,
        "group",
        "1",
        &out,
        &["--ranks", "2", "--collective", "nccl"],
    ));
    assert_clean_failure(&nccl, "--collective host");
    assert!(!out.exists(), "a refused run writes nothing");
    Ok(())
}
