//! The per-group accuracy heat map: a PNG with one coloured cell per (class, attribute) group.
//!
//! Input is a `classes x attributes` matrix of accuracies in percent (as
//! [`GroupMetrics::group_accuracy`](crate::metrics::GroupMetrics) or
//! [`MetricSummary::group_accuracy_mean`](crate::metrics::MetricSummary)), `None` for groups with
//! no test samples. There is no text (no fonts); the layout, in pixels, is:
//!
//! ```text
//!  8 px margin all round, white background
//!  [palette strip]  optional: one 24 x 10 swatch of each attribute's colour above its column
//!                   (grey outline), then 4 px gap
//!  grid             row = class (0 at the top), column = attribute (0 on the left);
//!                   24 x 24 cells with 1 px white separators; colour runs red (0 %) through
//!                   yellow (50 %) to green (100 %); absent groups are light grey with darker
//!                   diagonal hatching
//!  legend           12 px right of the grid: a 12 px wide bar as tall as the grid, 100 % at the
//!                   top and 0 % at the bottom, grey outline, 4 px ticks on its right at 0, 25,
//!                   50, 75 and 100 %
//! ```

use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};

use crate::error::EvalError;

/// Side of one group cell, px.
pub const CELL_PX: u32 = 24;
const SEP: u32 = 1;
const PITCH: u32 = CELL_PX + SEP;
const MARGIN: u32 = 8;
const STRIP_H: u32 = 10;
const STRIP_GAP: u32 = 4;
const LEGEND_GAP: u32 = 12;
const LEGEND_W: u32 = 12;
const TICK: u32 = 4;

const BACKGROUND: Rgb<u8> = Rgb([255, 255, 255]);
const OUTLINE: Rgb<u8> = Rgb([120, 120, 120]);
const HATCH_BASE: Rgb<u8> = Rgb([205, 205, 205]);
const HATCH_LINE: Rgb<u8> = Rgb([150, 150, 150]);
const RED: [f64; 3] = [215.0, 48.0, 39.0];
const YELLOW: [f64; 3] = [250.0, 220.0, 60.0];
const GREEN: [f64; 3] = [26.0, 152.0, 80.0];

/// The colour of an accuracy in percent: red at 0, yellow at 50, green at 100 (clamped).
pub fn accuracy_colour(percent: f64) -> Rgb<u8> {
    let t = (percent / 100.0).clamp(0.0, 1.0);
    let (from, to, s) = if t < 0.5 {
        (RED, YELLOW, t * 2.0)
    } else {
        (YELLOW, GREEN, (t - 0.5) * 2.0)
    };
    Rgb(std::array::from_fn(|i| {
        (from[i] + (to[i] - from[i]) * s).round() as u8
    }))
}

/// Draws the heat map (layout in the module docs) into an image.
pub fn render_group_heatmap(
    matrix: &[Vec<Option<f64>>],
    title_colours: Option<&[[u8; 3]]>,
) -> Result<RgbImage, EvalError> {
    let n_c = matrix.len();
    let n_a = matrix.first().map_or(0, Vec::len);
    if n_c == 0 || n_a == 0 {
        return Err(EvalError::BadMatrix("it has no cells".into()));
    }
    if let Some(row) = matrix.iter().position(|r| r.len() != n_a) {
        return Err(EvalError::BadMatrix(format!(
            "row {row} has {} cells, row 0 has {n_a}",
            matrix[row].len()
        )));
    }
    if matrix.iter().flatten().flatten().any(|v| !v.is_finite()) {
        return Err(EvalError::BadMatrix(
            "it holds a non-finite accuracy".into(),
        ));
    }
    if let Some(colours) = title_colours {
        if colours.len() != n_a {
            return Err(EvalError::PaletteMismatch {
                colours: colours.len(),
                columns: n_a,
            });
        }
    }

    let (n_c, n_a) = (n_c as u32, n_a as u32);
    let grid_w = n_a * PITCH - SEP;
    let grid_h = n_c * PITCH - SEP;
    let grid_x = MARGIN;
    let grid_y = MARGIN + title_colours.map_or(0, |_| STRIP_H + STRIP_GAP);
    let width = grid_x + grid_w + LEGEND_GAP + LEGEND_W + TICK + MARGIN;
    let height = grid_y + grid_h + MARGIN;
    let mut img = RgbImage::from_pixel(width, height, BACKGROUND);

    if let Some(colours) = title_colours {
        for (a, &rgb) in colours.iter().enumerate() {
            let x = grid_x + a as u32 * PITCH;
            fill_rect(&mut img, x, MARGIN, CELL_PX, STRIP_H, Rgb(rgb));
            outline_rect(&mut img, x, MARGIN, CELL_PX, STRIP_H);
        }
    }

    for (y, row) in matrix.iter().enumerate() {
        for (a, cell) in row.iter().enumerate() {
            let (x0, y0) = (grid_x + a as u32 * PITCH, grid_y + y as u32 * PITCH);
            match cell {
                Some(percent) => fill_rect(
                    &mut img,
                    x0,
                    y0,
                    CELL_PX,
                    CELL_PX,
                    accuracy_colour(*percent),
                ),
                None => {
                    for dy in 0..CELL_PX {
                        for dx in 0..CELL_PX {
                            let hatch = (dx + dy) % 6 < 2;
                            let colour = if hatch { HATCH_LINE } else { HATCH_BASE };
                            img.put_pixel(x0 + dx, y0 + dy, colour);
                        }
                    }
                }
            }
        }
    }

    let legend_x = grid_x + grid_w + LEGEND_GAP;
    for dy in 0..grid_h {
        let percent = 100.0 * (1.0 - f64::from(dy) / f64::from((grid_h - 1).max(1)));
        fill_rect(
            &mut img,
            legend_x,
            grid_y + dy,
            LEGEND_W,
            1,
            accuracy_colour(percent),
        );
    }
    outline_rect(&mut img, legend_x, grid_y, LEGEND_W, grid_h);
    for quarter in 0..=4u32 {
        let dy = (grid_h - 1) * quarter / 4;
        fill_rect(&mut img, legend_x + LEGEND_W, grid_y + dy, TICK, 1, OUTLINE);
    }
    Ok(img)
}

/// Writes the heat map of `matrix` (`[class][attribute]`, percent, `None` = absent group) as a
/// PNG at `path`, optionally with the attribute colours above the columns. See the module docs
/// for the layout.
pub fn write_group_heatmap(
    matrix: &[Vec<Option<f64>>],
    path: &Path,
    title_colours: Option<&[[u8; 3]]>,
) -> Result<(), EvalError> {
    render_group_heatmap(matrix, title_colours)?.save_with_format(path, ImageFormat::Png)?;
    Ok(())
}

fn fill_rect(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32, colour: Rgb<u8>) {
    for py in y..y + h {
        for px in x..x + w {
            img.put_pixel(px, py, colour);
        }
    }
}

fn outline_rect(img: &mut RgbImage, x: u32, y: u32, w: u32, h: u32) {
    fill_rect(img, x, y, w, 1, OUTLINE);
    fill_rect(img, x, y + h - 1, w, 1, OUTLINE);
    fill_rect(img, x, y, 1, h, OUTLINE);
    fill_rect(img, x + w - 1, y, 1, h, OUTLINE);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pixel at the centre of cell (row, col) in an image drawn with or without the strip.
    fn cell_centre(img: &RgbImage, row: u32, col: u32, strip: bool) -> Rgb<u8> {
        let y0 = MARGIN + if strip { STRIP_H + STRIP_GAP } else { 0 };
        *img.get_pixel(
            MARGIN + col * PITCH + CELL_PX / 2 + 1,
            y0 + row * PITCH + CELL_PX / 2,
        )
    }

    fn is_green(Rgb([r, g, b]): Rgb<u8>) -> bool {
        g > 120 && g > r + 60 && g > b + 40
    }

    fn is_red(Rgb([r, g, b]): Rgb<u8>) -> bool {
        r > 180 && r > g + 100 && r > b + 100
    }

    fn demo_matrix() -> Vec<Vec<Option<f64>>> {
        (0..10)
            .map(|y| {
                (0..10)
                    .map(|a| match (y, a) {
                        (3, 7) | (8, 2) => None,
                        _ if y == a => Some(99.0),
                        _ => Some(((y * 10 + a * 7) % 100) as f64),
                    })
                    .collect()
            })
            .collect()
    }

    const PALETTE: [[u8; 3]; 10] = [
        [251, 80, 43],
        [253, 233, 90],
        [172, 118, 148],
        [200, 212, 153],
        [22, 198, 250],
        [82, 245, 114],
        [6, 60, 193],
        [142, 26, 194],
        [53, 100, 5],
        [213, 52, 68],
    ];

    #[test]
    fn dimensions_follow_the_layout() -> Result<(), EvalError> {
        let m = vec![vec![Some(50.0); 3]; 2];
        let img = render_group_heatmap(&m, None)?;
        let w = MARGIN + 3 * PITCH - SEP + LEGEND_GAP + LEGEND_W + TICK + MARGIN;
        assert_eq!(img.dimensions(), (w, MARGIN + 2 * PITCH - SEP + MARGIN));
        let with_strip = render_group_heatmap(&m, Some(&PALETTE[..3]))?;
        assert_eq!(
            with_strip.dimensions(),
            (w, img.height() + STRIP_H + STRIP_GAP)
        );
        let full = render_group_heatmap(&demo_matrix(), Some(&PALETTE))?;
        assert_eq!(full.dimensions(), (293, 279));
        Ok(())
    }

    #[test]
    fn full_is_green_zero_is_red_absent_is_hatched() -> Result<(), EvalError> {
        let m = vec![vec![Some(100.0), Some(0.0), None]];
        let img = render_group_heatmap(&m, None)?;
        assert!(is_green(cell_centre(&img, 0, 0, false)));
        assert!(is_red(cell_centre(&img, 0, 1, false)));
        // Hatching: the absent cell shows both greys along its first row, and nothing else.
        let (x0, y0) = (MARGIN + 2 * PITCH, MARGIN);
        let row: Vec<Rgb<u8>> = (0..CELL_PX).map(|dx| *img.get_pixel(x0 + dx, y0)).collect();
        assert!(row.contains(&HATCH_LINE) && row.contains(&HATCH_BASE));
        assert!(row.iter().all(|&p| p == HATCH_LINE || p == HATCH_BASE));
        Ok(())
    }

    #[test]
    fn legend_runs_from_green_at_the_top_to_red_at_the_bottom() -> Result<(), EvalError> {
        let img = render_group_heatmap(&vec![vec![Some(10.0); 4]; 4], None)?;
        let x = MARGIN + 4 * PITCH - SEP + LEGEND_GAP + LEGEND_W / 2;
        let grid_h = 4 * PITCH - SEP;
        assert!(is_green(*img.get_pixel(x, MARGIN + 1)));
        assert!(is_red(*img.get_pixel(x, MARGIN + grid_h - 2)));
        Ok(())
    }

    #[test]
    fn palette_strip_shows_each_columns_colour() -> Result<(), EvalError> {
        let img = render_group_heatmap(&demo_matrix(), Some(&PALETTE))?;
        for (a, rgb) in PALETTE.iter().enumerate() {
            let x = MARGIN + a as u32 * PITCH + CELL_PX / 2;
            assert_eq!(img.get_pixel(x, MARGIN + STRIP_H / 2), &Rgb(*rgb));
        }
        Ok(())
    }

    #[test]
    fn bad_matrices_and_palettes_are_errors() {
        assert!(matches!(
            render_group_heatmap(&[], None),
            Err(EvalError::BadMatrix(_))
        ));
        assert!(matches!(
            render_group_heatmap(&[vec![Some(1.0)], vec![]], None),
            Err(EvalError::BadMatrix(_))
        ));
        assert!(matches!(
            render_group_heatmap(&[vec![Some(f64::NAN)]], None),
            Err(EvalError::BadMatrix(_))
        ));
        assert!(matches!(
            render_group_heatmap(&[vec![Some(1.0); 2]], Some(&PALETTE)),
            Err(EvalError::PaletteMismatch {
                colours: 10,
                columns: 2
            })
        ));
    }

    #[test]
    fn writes_a_png_that_reads_back() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("heatmap.png");
        write_group_heatmap(&demo_matrix(), &path, Some(&PALETTE))?;
        let back = image::open(&path)?.to_rgb8();
        assert_eq!(back, render_group_heatmap(&demo_matrix(), Some(&PALETTE))?);
        Ok(())
    }

    /// Writes the demo picture for a human to look at:
    /// `cargo test -p debiasdd-eval heatmap::tests::demo -- --ignored`.
    #[test]
    #[ignore = "writes heatmap_demo.png into the system temp dir for inspection"]
    fn demo() -> anyhow::Result<()> {
        let path = std::env::temp_dir().join("heatmap_demo.png");
        write_group_heatmap(&demo_matrix(), &path, Some(&PALETTE))?;
        Ok(())
    }
}
