//! `cargo xtask bench`, the conditions of a run: the machine and thread-variable notes, the
//! check that the CPUs are idle before each side starts, and the load average.

use std::fs;

/// Environment variables that change how either side's CPU kernels run.
const THREAD_ENV_VARS: &[&str] = &[
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "RAYON_NUM_THREADS",
];

pub(super) fn machine_note() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, name)| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    format!(
        "machine: {cpu}, {cpus} logical CPUs (candle's CPU backend uses all unless RAYON_NUM_THREADS says otherwise)"
    )
}

pub(super) fn env_note() -> String {
    let set: Vec<String> = THREAD_ENV_VARS
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v}")))
        .collect();
    if set.is_empty() {
        format!(
            "thread/BLAS variables: none set ({})",
            THREAD_ENV_VARS.join(", ")
        )
    } else {
        format!("thread/BLAS variables: {}", set.join(" "))
    }
}

/// A warning when other processes kept the CPUs more than a quarter busy during the second
/// before `what` starts: both sides use every core, so timings taken beside a build are not
/// comparable (PyTorch's OpenMP threads in particular slow down several-fold when a core is
/// taken).
pub(super) fn busy_warning(what: &str) -> Option<String> {
    let busy = cpu_busy_fraction(std::time::Duration::from_secs(1))?;
    let note = format!(
        "warning: the CPUs were {:.0}% busy just before {what}: its timings are not reliable",
        busy * 100.0
    );
    (busy > 0.25).then(|| {
        println!("{note}");
        note
    })
}

/// The fraction of CPU time, over all CPUs, spent other than idle or waiting for I/O during
/// `window` (Linux only).
fn cpu_busy_fraction(window: std::time::Duration) -> Option<f64> {
    let read = || -> Option<(u64, u64)> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        parse_cpu_times(stat.lines().next()?)
    };
    let (busy0, total0) = read()?;
    std::thread::sleep(window);
    let (busy1, total1) = read()?;
    let total = total1.checked_sub(total0).filter(|&t| t > 0)?;
    Some(busy1.saturating_sub(busy0) as f64 / total as f64)
}

/// (busy, total) jiffies of the aggregate `cpu` line of `/proc/stat`; idle and iowait are the
/// fourth and fifth numbers.
fn parse_cpu_times(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let times: Vec<u64> = fields.map(str::parse).collect::<Result<_, _>>().ok()?;
    if times.len() < 5 {
        return None;
    }
    let total: u64 = times.iter().take(8).sum();
    Some((total - times[3] - times[4], total))
}

pub(super) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_count_idle_and_iowait_as_free() {
        let line = "cpu  100 5 50 800 20 3 2 0 0 0";
        assert_eq!(parse_cpu_times(line), Some((160, 980)));
        assert_eq!(parse_cpu_times("cpu0 1 2 3 4 5"), None);
        assert_eq!(parse_cpu_times("cpu 1 2"), None);
    }
}
