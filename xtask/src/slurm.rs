//! `cargo xtask slurm-check`: the grid's job-array path against a real Slurm on this machine.
//!
//! Installs Debian's `slurm-wlm` and `munge` when they are missing, starts a private `munged`
//! (as the munge user, with its own key and socket), `slurmctld` and `slurmd` on free ports with
//! a minimal `slurm.conf` (two fake GPUs through `gres.conf`), runs the smoke grid serially, then
//! submits the same grid with the script of `reproduce --emit-sbatch` (a job array of one task
//! per cell, at most two at once, one fake GPU each, and a dependent report job), waits, and
//! checks that both reports agree. Every daemon it started is stopped by its process id, also
//! when a step fails. Everything lives under one folder (default `target/slurm-check`), which is
//! left for inspection.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct SlurmCheckArgs {
    /// Work folder: configuration, daemon state and logs, the two grids [default:
    /// target/slurm-check]. Emptied first.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seconds to wait for the job array and the report job.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
}

/// Programs the check needs, and the Debian package of each.
const PROGRAMS: [(&str, &str); 7] = [
    ("munged", "munge"),
    ("mungekey", "munge"),
    ("slurmctld", "slurm-wlm"),
    ("slurmd", "slurm-wlm"),
    ("sbatch", "slurm-wlm"),
    ("squeue", "slurm-wlm"),
    ("scontrol", "slurm-wlm"),
];

pub fn run(args: SlurmCheckArgs, root: &Path) -> Result<()> {
    let start = Instant::now();
    if !cfg!(target_os = "linux") {
        bail!("slurm-check runs Slurm's daemons on this machine and needs Linux");
    }
    let uid = output(Command::new("id").arg("-u"))?;
    if uid.trim() != "0" {
        bail!(
            "slurm-check starts slurmd and munged (as the munge user), which needs root; run it \
             as root (CI does), e.g. `sudo -E cargo xtask slurm-check`"
        );
    }
    install()?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| root.join("target/slurm-check"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot empty {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let mut daemons = Daemons::default();
    let result = check(&dir, &mut daemons, Duration::from_secs(args.timeout));
    let stopped = daemons.stop();
    if let Err(e) = &result {
        eprintln!("slurm-check failed: {e:#}");
        for log in [
            "log/slurmctld.log",
            "log/slurmd.log",
            "munge/munged.log",
            "sharded/smoke/slurm/report.log",
        ] {
            print_tail(&dir.join(log), 15);
        }
    }
    result?;
    stopped?;
    println!(
        "slurm-check: passed in {:.0} s (work folder {})",
        start.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}

/// Installs the missing packages with apt-get (after an `apt-get update` if the first try
/// fails).
fn install() -> Result<()> {
    let mut missing: Vec<&str> = PROGRAMS
        .iter()
        .filter(|(program, _)| which(program).is_none())
        .map(|&(_, package)| package)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    println!("== slurm-check: apt-get install {}", missing.join(" "));
    let apt = |args: &[&str]| -> Result<bool> {
        Ok(Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get: slurm-check installs Debian's slurm-wlm and munge")?
            .success())
    };
    let install: Vec<&str> = ["install", "-y", "-q"]
        .into_iter()
        .chain(missing.iter().copied())
        .collect();
    if apt(&install)? {
        return Ok(());
    }
    if apt(&["update", "-q"])? && apt(&install)? {
        return Ok(());
    }
    bail!(
        "apt-get could not install {}; install them by hand (Debian: apt-get install slurm-wlm munge)",
        missing.join(" ")
    )
}

fn check(dir: &Path, daemons: &mut Daemons, timeout: Duration) -> Result<()> {
    let host = output(Command::new("hostname").arg("-s"))?
        .trim()
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let conf = write_config(dir, &host, cpus)?;
    // Character devices (the null device's numbers), as slurmd expects of a GPU's file.
    for gpu in fake_gpus(dir) {
        run_ok(Command::new("mknod").arg(&gpu).args(["c", "1", "3"]))?;
    }

    println!("== slurm-check: munged (as munge), slurmctld and slurmd on {host}");
    let munge = dir.join("munge");
    run_ok(Command::new("chown").args(["munge:munge"]).arg(&munge))?;
    run_ok(
        Command::new("runuser")
            .args(["-u", "munge", "--", "mungekey", "--create", "--keyfile"])
            .arg(munge.join("munge.key")),
    )?;
    run_ok(
        Command::new("runuser")
            .args(["-u", "munge", "--", "munged", "--force"])
            .arg(format!("--socket={}", munge.join("socket").display()))
            .arg(format!("--key-file={}", munge.join("munge.key").display()))
            .arg(format!("--pid-file={}", munge.join("munged.pid").display()))
            .arg(format!("--log-file={}", munge.join("munged.log").display()))
            .arg(format!("--seed-file={}", munge.join("seed").display())),
    )?;
    daemons.adopt("munged", &munge.join("munged.pid"))?;
    run_ok(Command::new("slurmctld").arg("-f").arg(&conf).arg("-i"))?;
    daemons.adopt("slurmctld", &dir.join("state/slurmctld.pid"))?;
    run_ok(Command::new("slurmd").arg("-f").arg(&conf))?;
    daemons.adopt("slurmd", &dir.join("state/slurmd.pid"))?;
    let slurm = |program: &str| {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &conf);
        c
    };
    wait_for(Duration::from_secs(60), "the node to come up idle", || {
        let state = output(slurm("sinfo").args(["-h", "-N", "-o", "%T"]))?;
        Ok(state.trim() == "idle")
    })?;

    let mnist = dir.join("mnist");
    std::fs::create_dir_all(&mnist)?;
    debiasdd_cmnist::source::write_synthetic_source(&mnist, 500, 200)?;
    let exe = std::env::current_exe().context("cannot find the xtask binary's path")?;
    let grid = |out: &str| {
        let mut c = Command::new(&exe);
        c.args([
            "reproduce",
            "--preset",
            "smoke",
            "--skip-checksum",
            "--mnist-dir",
        ])
        .arg(&mnist)
        .arg("--out")
        .arg(dir.join(out))
        .arg("--datasets")
        .arg(dir.join(format!("cmnist-{out}")))
        .env("SLURM_CONF", &conf);
        c
    };

    println!("== slurm-check: the smoke grid, serially");
    let serial = Instant::now();
    run_ok(grid("serial").stdout(std::fs::File::create(dir.join("serial.log"))?))?;
    println!("   {:.0} s", serial.elapsed().as_secs_f64());

    println!("== slurm-check: the same grid as a job array (2 fake GPUs, 2 tasks at once)");
    let script = dir.join("submit.sh");
    run_ok(grid("sharded").arg("--emit-sbatch").arg(&script).args([
        "--max-parallel",
        "2",
        "--cpus-per-task",
        "1",
    ]))?;
    let sharded = Instant::now();
    print!("   {}", output(slurm("bash").arg(&script))?);
    wait_for(timeout, "the job array and the report job", || {
        Ok(output(slurm("squeue").args(["-h", "-o", "%i"]))?
            .trim()
            .is_empty())
    })?;
    println!("   {:.0} s", sharded.elapsed().as_secs_f64());
    let jobs = output(slurm("scontrol").args(["show", "job", "-o"]))?;
    let states: Vec<&str> = jobs
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("JobState=")))
        .collect();
    if states.is_empty() || states.iter().any(|s| *s != "JobState=COMPLETED") {
        bail!("not every job completed: {states:?}\n{jobs}");
    }
    // One job per array task, and the report job.
    println!(
        "   {} jobs completed ({} cell tasks and the report job)",
        states.len(),
        states.len() - 1
    );
    compare(
        &dir.join("serial/smoke/results.json"),
        &dir.join("sharded/smoke/results.json"),
    )
}

/// Writes `slurm.conf` (free ports, a private state folder, munge's private socket) and
/// `gres.conf` (two fake GPUs, each a device file of its own: Slurm drops a GPU without a
/// `File=`).
fn write_config(dir: &Path, host: &str, cpus: usize) -> Result<PathBuf> {
    for sub in ["munge", "state", "spool", "log"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let gpus = fake_gpus(dir);
    let (ctld_port, slurmd_port) = (free_port()?, free_port()?);
    let d = dir.display();
    let conf = format!(
        "# Written by cargo xtask slurm-check: one node, two fake GPUs, everything under {d}.
ClusterName=debiasdd-check
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/socket
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/state/slurmctld.pid
SlurmdPidFile={d}/state/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
MinJobAge=3600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:2 State=UNKNOWN
PartitionName=check Nodes=ALL Default=YES OverSubscribe=YES MaxTime=INFINITE State=UP
"
    );
    let gres: String = gpus
        .iter()
        .map(|g| format!("NodeName={host} Name=gpu File={}\n", g.display()))
        .collect();
    std::fs::write(dir.join("gres.conf"), gres)?;
    let path = dir.join("slurm.conf");
    std::fs::write(&path, conf)?;
    Ok(path)
}

/// The files of the two fake GPUs.
fn fake_gpus(dir: &Path) -> Vec<PathBuf> {
    (0..2).map(|i| dir.join(format!("fake-gpu{i}"))).collect()
}

/// Checks that the job array's report equals the serial one: the summary table, and every
/// cell's metrics.
fn compare(serial: &Path, sharded: &Path) -> Result<()> {
    let read = |path: &Path| -> Result<Value> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
    };
    let (a, b) = (read(serial)?, read(sharded)?);
    for (name, results) in [("serial", &a), ("job array", &b)] {
        let pending = results["pending"].as_array().map_or(0, Vec::len);
        if pending > 0 {
            bail!("the {name} report still lists {pending} pending cells");
        }
    }
    if a["summary"] != b["summary"] {
        bail!(
            "the job array's summary differs from the serial run's:\n serial: {}\n array:  {}",
            a["summary"],
            b["summary"]
        );
    }
    let cells = |v: &Value| -> Vec<(String, Value)> {
        v["cells"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| (c["id"].to_string(), c["report"]["summary"].clone()))
            .collect()
    };
    let (x, y) = (cells(&a), cells(&b));
    if x.is_empty() || x != y {
        bail!(
            "the job array's cells differ from the serial run's ({} vs {} cells)",
            x.len(),
            y.len()
        );
    }
    println!(
        "   the merged report equals the serial one: summary and all {} cells' metrics",
        x.len()
    );
    Ok(())
}

/// The daemons this check started, stopped by process id.
#[derive(Debug, Default)]
struct Daemons {
    pids: Vec<(&'static str, u32)>,
}

impl Daemons {
    /// Records the daemon whose pid file is `pid_file` (waiting for the file to appear).
    fn adopt(&mut self, name: &'static str, pid_file: &Path) -> Result<()> {
        let mut pid = None;
        wait_for(
            Duration::from_secs(20),
            &format!("{name}'s pid file"),
            || {
                pid = std::fs::read_to_string(pid_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok());
                Ok(pid.is_some())
            },
        )?;
        let pid = pid.expect("waited for it");
        self.pids.push((name, pid));
        Ok(())
    }

    /// SIGTERM to each, newest first; SIGKILL to any still alive after 10 s.
    fn stop(&mut self) -> Result<()> {
        let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
        for &(_, pid) in self.pids.iter().rev() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.pids.iter().any(|&(_, p)| alive(p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let stuck: Vec<String> = self
            .pids
            .iter()
            .filter(|&&(_, p)| alive(p))
            .map(|&(name, pid)| {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                format!("{name} ({pid})")
            })
            .collect();
        self.pids.clear();
        if stuck.is_empty() {
            Ok(())
        } else {
            bail!(
                "{} did not stop on SIGTERM and were killed",
                stuck.join(", ")
            )
        }
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Polls `ready` every 200 ms until it says yes, or fails after `limit` naming `what`.
fn wait_for(limit: Duration, what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if ready()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("gave up waiting for {what} after {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A TCP port nobody listens on now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Runs `cmd` and fails, naming it and its exit status, unless it succeeds.
fn run_ok(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its standard output, or fails with its standard error.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of `path`, on standard error, if it exists.
fn print_tail(path: &Path, n: usize) {
    if let Ok(text) = std::fs::read_to_string(path) {
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("--- {} (last {n} lines)", path.display());
        for line in &lines[lines.len().saturating_sub(n)..] {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_names_private_paths_and_gives_every_gpu_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let conf = write_config(tmp.path(), "node1", 2).unwrap();
        let text = std::fs::read_to_string(&conf).unwrap();
        let d = tmp.path().display();
        for line in [
            "SlurmctldHost=node1\n".to_owned(),
            format!("AuthInfo=socket={d}/munge/socket\n"),
            format!("StateSaveLocation={d}/state\n"),
            "NodeName=node1 NodeAddr=127.0.0.1 CPUs=2 Gres=gpu:2 State=UNKNOWN\n".to_owned(),
        ] {
            assert!(text.contains(&line), "{line:?} not in\n{text}");
        }
        let gres = std::fs::read_to_string(tmp.path().join("gres.conf")).unwrap();
        let files: Vec<&str> = gres.lines().filter(|l| l.contains(" File=")).collect();
        assert_eq!(files.len(), 2, "{gres}");
        assert!(files[1].ends_with("fake-gpu1"));
    }

    #[test]
    fn reports_that_differ_fail_the_comparison() {
        let tmp = tempfile::tempdir().unwrap();
        let write = |name: &str, v: Value| {
            let path = tmp.path().join(name);
            std::fs::write(&path, v.to_string()).unwrap();
            path
        };
        let cell =
            |acc: f64| serde_json::json!({"id": "c0", "report": {"summary": {"accuracy": acc}}});
        let results = |acc: f64, pending: Vec<&str>| serde_json::json!({"summary": [{"acc": acc}], "cells": [cell(acc)], "pending": pending});
        let a = write("a.json", results(1.0, vec![]));
        let same = write("b.json", results(1.0, vec![]));
        compare(&a, &same).unwrap();
        let other = write("c.json", results(2.0, vec![]));
        let err = compare(&a, &other).unwrap_err().to_string();
        assert!(err.contains("summary differs"), "{err}");
        let mut cells_only = results(1.0, vec![]);
        cells_only["cells"] = serde_json::json!([cell(3.0)]);
        let cells_only = write("d.json", cells_only);
        let err = compare(&a, &cells_only).unwrap_err().to_string();
        assert!(err.contains("cells differ"), "{err}");
        let pending = write("e.json", results(1.0, vec!["c1"]));
        let err = compare(&a, &pending).unwrap_err().to_string();
        assert!(err.contains("1 pending"), "{err}");
    }
}
