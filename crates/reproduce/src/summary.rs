//! The tables' rows: the finished cells pooled per (method, ratio) over seeds and networks.

use debiasdd_eval::metrics::{GroupMetrics, MetricSummary};
use serde::{Deserialize, Serialize};

use crate::cell::Method;
use crate::config::ReproduceConfig;
use crate::error::ReproduceError;
use crate::store::CellResult;

/// One row of the tables: a method at one ratio, pooled over seeds and networks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodSummary {
    pub method: Method,
    pub label: String,
    pub ratio: f64,
    pub seeds: Vec<u64>,
    pub summary: MetricSummary,
}

/// Pools the finished cells per (method, ratio), in table order.
pub fn summarise(
    config: &ReproduceConfig,
    cells: &[CellResult],
) -> Result<Vec<MethodSummary>, ReproduceError> {
    let mut out = Vec::new();
    for method in Method::all(config) {
        for &ratio in &config.ratios {
            let matching: Vec<&CellResult> = cells
                .iter()
                .filter(|c| c.cell.method == method && c.cell.ratio == ratio)
                .collect();
            if matching.is_empty() {
                continue;
            }
            let runs: Vec<GroupMetrics> = matching
                .iter()
                .flat_map(|c| c.report.runs.iter().map(|r| r.metrics.clone()))
                .collect();
            out.push(MethodSummary {
                method,
                label: method.label(),
                ratio,
                seeds: matching.iter().map(|c| c.cell.seed).collect(),
                summary: MetricSummary::from_runs(&runs)?,
            });
        }
    }
    Ok(out)
}
