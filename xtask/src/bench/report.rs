//! `cargo xtask bench`, the PyTorch side's output: parses the JSON report that
//! `xtask/bench/torch_reference.py` prints (ids in the script's order) into a [`TorchReport`].

use anyhow::{Context, Result};
use serde::Deserialize;

/// The last non-empty line of `text` (a program's output; the script's report, a tool's error).
pub(super) fn last_line(text: &str) -> &str {
    text.trim().lines().last().unwrap_or("")
}

/// What the reference script reported.
#[derive(Debug)]
pub(super) struct TorchReport {
    /// `(benchmark id, median ms)` in the script's order.
    pub(super) results: Vec<(String, f64)>,
    /// One line: version, threads, repetitions.
    pub(super) note: String,
}

/// The script's JSON report; fields it adds later are ignored.
#[derive(Debug, Deserialize)]
struct TorchJson {
    torch_version: Option<String>,
    threads: Option<u64>,
    interop_threads: Option<u64>,
    cpu_count: Option<u64>,
    runs: Option<u64>,
    warmup: Option<u64>,
    #[serde(default)]
    env: InOrder<String>,
    results: InOrder<f64>,
}

/// A JSON object's members in document order (serde_json's own map sorts its keys).
#[derive(Debug, Default)]
struct InOrder<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for InOrder<V> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Members<V> {
            type Value = InOrder<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry()? {
                    members.push(member);
                }
                Ok(InOrder(members))
            }
        }
        deserializer.deserialize_map(Members(std::marker::PhantomData))
    }
}

/// Parses the script's JSON (its last non-empty stdout line).
pub(super) fn parse_torch_report(stdout: &str) -> Result<TorchReport> {
    let json: TorchJson = serde_json::from_str(last_line(stdout))
        .context("the PyTorch script printed no JSON report with \"results\"")?;
    let or_unknown = |v: Option<u64>| v.map_or_else(|| "?".into(), |v| v.to_string());
    let env = if json.env.0.is_empty() {
        "none".into()
    } else {
        json.env
            .0
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let note = format!(
        "PyTorch {}: {} threads ({} inter-op, {} CPUs), median of {} after {} warm-up, thread \
         variables: {env}",
        json.torch_version.as_deref().unwrap_or("?"),
        or_unknown(json.threads),
        or_unknown(json.interop_threads),
        or_unknown(json.cpu_count),
        or_unknown(json.runs),
        or_unknown(json.warmup),
    );
    Ok(TorchReport {
        results: json.results.0,
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_report_keeps_the_script_order() {
        let stdout = "noise\n{\"torch_version\": \"2.15.0+cu132\", \"threads\": 2, \
            \"interop_threads\": 2, \"cpu_count\": 2, \"runs\": 3, \"warmup\": 1, \
            \"env\": {\"OPENBLAS_CORETYPE\": \"Haswell\"}, \"results\": \
            {\"g/forward\": 12.5, \"g/forward_nograd\": 10.0, \"dc/one_class\": 99.0}}\n";
        let report = parse_torch_report(stdout).unwrap();
        let ids: Vec<&str> = report.results.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["g/forward", "g/forward_nograd", "dc/one_class"]);
        assert!(
            report.note.contains("PyTorch 2.15.0+cu132: 2 threads"),
            "{}",
            report.note
        );
        assert!(
            report.note.contains("OPENBLAS_CORETYPE=Haswell"),
            "{}",
            report.note
        );
        assert!(parse_torch_report("not json\n").is_err());
    }

    #[test]
    fn torch_report_takes_the_device_fields() {
        // A line as the script printed it on a GPU (--paper-iteration --device cuda), and the
        // same fields on the CPU, where "gpu" is null.
        let gpu = "{\"torch_version\": \"2.11.0+cu130\", \"threads\": 16, \"interop_threads\": 16, \
            \"cpu_count\": 16, \"python\": \"3.12.3\", \"runs\": 1, \"warmup\": 1, \"env\": {}, \
            \"device\": \"cuda\", \"gpu\": \"NVIDIA H100 80GB HBM3\", \"cudnn_allow_tf32\": true, \
            \"matmul_allow_tf32\": false, \"results\": {\"dc_iteration_paper_w128/class\": 2506.48, \
            \"dc_iteration_paper_w128/group\": 12421.59}}\n";
        let report = parse_torch_report(gpu).unwrap();
        assert_eq!(
            report.results,
            [
                ("dc_iteration_paper_w128/class".to_string(), 2506.48),
                ("dc_iteration_paper_w128/group".to_string(), 12421.59)
            ]
        );
        let cpu = gpu.replace("\"NVIDIA H100 80GB HBM3\"", "null");
        assert_eq!(parse_torch_report(&cpu).unwrap().results.len(), 2);
    }
}
