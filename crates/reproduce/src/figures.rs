//! The pictures of a grid: the source paper's Figure 2 per ratio and method (the method's
//! distilled sets over every matching mode side by side), accuracy against ratio with one line per method (SVG, plotters),
//! and per-group accuracy heat maps at the most biased ratio.

use std::path::Path;

use debiasdd_data::SyntheticSet;
use image::{Rgb, RgbImage};
use plotters::prelude::*;

use crate::cell::{Cell, Method};
use crate::config::ReproduceConfig;
use crate::error::ReproduceError;
use crate::store::{CellResult, Paths};
use crate::summary::MethodSummary;
use debiasdd_distill::MethodKind;

/// White gap between the panels of a Figure 2, in pixels.
const PANEL_GAP: u32 = 16;

/// What [`write_all`] wrote, as paths relative to the results folder.
#[derive(Debug, Default)]
pub struct Written {
    /// (ratio, method label, panel labels left to right, file) of each Figure 2.
    pub synthetic: Vec<(f64, String, Vec<String>, String)>,
    /// (title, file) of each plot.
    pub plots: Vec<(String, String)>,
    pub heatmap_ratio: f64,
    /// (method label, file) of each heat map.
    pub heatmaps: Vec<(String, String)>,
}

/// Writes every figure the finished cells allow.
pub fn write_all(
    config: &ReproduceConfig,
    paths: &Paths,
    cells: &[CellResult],
    summary: &[MethodSummary],
) -> Result<Written, ReproduceError> {
    let dir = paths.out.join("figures");
    std::fs::create_dir_all(&dir).map_err(|e| ReproduceError::write(&dir, e))?;
    let mut written = Written::default();
    let seed = config.seeds[0];
    let distillations = config.distillations();
    let mut methods: Vec<MethodKind> = distillations.iter().map(|d| d.method).collect();
    methods.dedup();
    for &ratio in &config.ratios {
        for &method in &methods {
            let panels: Vec<_> = distillations
                .iter()
                .copied()
                .filter(|d| d.method == method)
                .collect();
            let sets: Vec<SyntheticSet> = panels
                .iter()
                .filter_map(|&distilled| {
                    let cell = Cell {
                        ratio,
                        seed,
                        method: Method::Distill(distilled),
                    };
                    let done = cells.iter().any(|c| c.cell == cell);
                    let path = paths.cell_dir(&cell).join("synthetic.safetensors");
                    done.then(|| SyntheticSet::load(&path).ok()).flatten()
                })
                .collect();
            if sets.len() == panels.len() {
                let name = format!("figures/synthetic-r{ratio}-{}.png", method.name());
                side_by_side(&sets)
                    .save(paths.out.join(&name))
                    .map_err(|e| ReproduceError::write(&paths.out.join(&name), e))?;
                let labels = panels.iter().map(|d| d.mode.label().to_owned()).collect();
                written
                    .synthetic
                    .push((ratio, method.label().to_owned(), labels, name));
            }
        }
    }
    type Pick = fn(&MethodSummary) -> f64;
    let plots: [(&str, &str, Pick); 2] = [
        (
            "Unbiased test accuracy against the bias-conflicting ratio",
            "accuracy",
            |s| s.summary.accuracy.mean,
        ),
        (
            "Worst-group accuracy against the bias-conflicting ratio",
            "worst-group",
            |s| s.summary.worst_group_accuracy.mean,
        ),
    ];
    for (title, stem, pick) in plots {
        let name = format!("figures/{stem}-vs-ratio.svg");
        if plot(config, summary, title, pick, &paths.out.join(&name))? {
            written.plots.push((title.to_owned(), name));
        }
    }
    let most_biased = config.ratios.iter().copied().fold(f64::INFINITY, f64::min);
    written.heatmap_ratio = most_biased;
    // A given dataset file's attributes need not be colours: no strip above its heat maps.
    let palette = config.data.is_none().then_some(config.cmnist.palette);
    for s in summary.iter().filter(|s| s.ratio == most_biased) {
        let name = format!("figures/heat-r{most_biased}-{}.png", s.method.slug());
        debiasdd_eval::heatmap::write_group_heatmap(
            &s.summary.group_accuracy_mean,
            &paths.out.join(&name),
            palette.as_ref().map(|p| p.as_slice()),
        )?;
        written.heatmaps.push((s.label.clone(), name));
    }
    Ok(written)
}

/// The grids of `sets` (rows = classes) next to each other on white.
pub fn side_by_side(sets: &[SyntheticSet]) -> RgbImage {
    let panels: Vec<RgbImage> = sets.iter().map(debiasdd_distill::grid::render).collect();
    let width =
        panels.iter().map(RgbImage::width).sum::<u32>() + PANEL_GAP * (panels.len() as u32 + 1);
    let height = panels.iter().map(RgbImage::height).max().unwrap_or(0) + 2 * PANEL_GAP;
    let mut out = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let mut x = PANEL_GAP;
    for panel in &panels {
        image::imageops::replace(&mut out, panel, i64::from(x), i64::from(PANEL_GAP));
        x += panel.width() + PANEL_GAP;
    }
    out
}

/// One line per method over the ratios (log scale); `false` when there is nothing to draw yet.
fn plot(
    config: &ReproduceConfig,
    summary: &[MethodSummary],
    title: &str,
    pick: fn(&MethodSummary) -> f64,
    path: &Path,
) -> Result<bool, ReproduceError> {
    if summary.is_empty() {
        return Ok(false);
    }
    let err = |e: &dyn std::fmt::Display| ReproduceError::write(path, e.to_string());
    let (lo, hi) = config
        .ratios
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &r| {
            (lo.min(r), hi.max(r))
        });
    // Room on the right for the legend, so that it covers no line.
    let (lo, hi) = (lo.max(1e-4) / 1.4, hi.max(1e-4) * 5.0);
    let root = SVGBackend::new(path, (760, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(config.ratios.clone()),
            0.0..100.0,
        )
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("bias-conflicting ratio (log scale)")
        .y_desc("%")
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(WHITE)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, method) in Method::all(config).into_iter().enumerate() {
        let points: Vec<(f64, f64)> = summary
            .iter()
            .filter(|s| s.method == method)
            .map(|s| (s.ratio, pick(s)))
            .collect();
        if points.is_empty() {
            continue;
        }
        let colour = Palette99::pick(i).to_rgba();
        let dashed = matches!(method, Method::Baseline(_) | Method::Floor(_));
        let style = colour.stroke_width(if dashed { 1 } else { 3 });
        chart
            .draw_series(LineSeries::new(points.clone(), style))
            .map_err(|e| err(&e))?
            .label(method.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 3, colour.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(true)
}
