//! The class x colour preview grid: the picture that shows the bias.
//!
//! Rows are classes, columns colours; a strip on top shows each column's palette colour. Each
//! cell holds the first sample (in split order) of its group, or a hatched dark cell where the
//! group is empty. A bar under each cell grows with log(1 + count), so the dominance of the
//! diagonal in a biased train split is visible at a glance.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::colored::{N_COLOURS, Palette, SIDE, Split};
use crate::error::{CmnistError, Result};
use crate::source::N_CLASSES;

/// Geometry of the grid, in output pixels.
#[derive(Debug, Clone, Copy)]
pub struct PreviewLayout {
    /// Each 28 x 28 image is drawn `scale` times larger.
    pub scale: u32,
    /// Gap between cells.
    pub gap: u32,
    /// Height of the palette strip on top.
    pub header: u32,
    /// Height of the count bar under each cell.
    pub bar: u32,
}

impl Default for PreviewLayout {
    fn default() -> Self {
        Self {
            scale: 2,
            gap: 4,
            header: 10,
            bar: 4,
        }
    }
}

const GAP_COLOUR: Rgb<u8> = Rgb([72, 72, 72]);
const EMPTY_COLOUR: Rgb<u8> = Rgb([24, 24, 24]);
const HATCH_COLOUR: Rgb<u8> = Rgb([110, 40, 40]);
const BAR_COLOUR: Rgb<u8> = Rgb([235, 235, 235]);
const BAR_TRACK: Rgb<u8> = Rgb([40, 40, 40]);

impl PreviewLayout {
    fn cell(&self) -> u32 {
        SIDE as u32 * self.scale
    }

    /// Top-left corner of cell (row, col)'s image.
    pub fn cell_origin(&self, row: usize, col: usize) -> (u32, u32) {
        let pitch_x = self.cell() + self.gap;
        let pitch_y = self.cell() + self.bar + self.gap;
        (
            self.gap + col as u32 * pitch_x,
            self.header + self.gap + row as u32 * pitch_y,
        )
    }

    fn size(&self) -> (u32, u32) {
        let (x, y) = self.cell_origin(N_CLASSES, N_COLOURS);
        (x, y)
    }
}

/// Draws the grid of a split.
pub fn preview_image(split: &Split, palette: &Palette, layout: PreviewLayout) -> RgbImage {
    let (w, h) = layout.size();
    let mut img = RgbImage::from_pixel(w, h, GAP_COLOUR);
    let cell = layout.cell();
    for (col, colour) in palette.iter().enumerate() {
        let (x0, _) = layout.cell_origin(0, col);
        for y in layout.gap / 2..layout.header {
            for x in x0..x0 + cell {
                img.put_pixel(x, y, Rgb(*colour));
            }
        }
    }
    let index = split.group_index();
    let counts = index.counts();
    let max_log = counts
        .as_slice()
        .iter()
        .map(|&c| (1.0 + c as f64).ln())
        .fold(0.0, f64::max);
    for row in 0..N_CLASSES {
        for col in 0..N_COLOURS {
            let group = row * N_COLOURS + col;
            let (x0, y0) = layout.cell_origin(row, col);
            match index.members(group).first() {
                Some(&i) => draw_sample(&mut img, split.image(i), x0, y0, layout.scale),
                None => draw_empty(&mut img, x0, y0, cell),
            }
            let frac = if max_log > 0.0 {
                (1.0 + counts.get(group) as f64).ln() / max_log
            } else {
                0.0
            };
            let filled = (frac * f64::from(cell)).round() as u32;
            for y in y0 + cell..y0 + cell + layout.bar {
                for dx in 0..cell {
                    let colour = if dx < filled { BAR_COLOUR } else { BAR_TRACK };
                    img.put_pixel(x0 + dx, y, colour);
                }
            }
        }
    }
    img
}

fn draw_sample(img: &mut RgbImage, chw: &[u8], x0: u32, y0: u32, scale: u32) {
    let plane = SIDE * SIDE;
    for r in 0..SIDE {
        for c in 0..SIDE {
            let p = r * SIDE + c;
            let rgb = Rgb([chw[p], chw[plane + p], chw[2 * plane + p]]);
            for dy in 0..scale {
                for dx in 0..scale {
                    img.put_pixel(x0 + c as u32 * scale + dx, y0 + r as u32 * scale + dy, rgb);
                }
            }
        }
    }
}

fn draw_empty(img: &mut RgbImage, x0: u32, y0: u32, cell: u32) {
    for dy in 0..cell {
        for dx in 0..cell {
            let hatch = (dx + dy) % 8 < 2 || (dx + cell - dy) % 8 < 2;
            img.put_pixel(
                x0 + dx,
                y0 + dy,
                if hatch { HATCH_COLOUR } else { EMPTY_COLOUR },
            );
        }
    }
}

/// Draws the grid of a split and writes it as PNG.
pub fn write_preview(split: &Split, palette: &Palette, path: &Path) -> Result<()> {
    let img = preview_image(split, palette, PreviewLayout::default());
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| CmnistError::io(parent, e))?;
    }
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| CmnistError::Write {
            path: path.to_owned(),
            problem: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colored::{ColoredMnistConfig, LFF_PALETTE, Preset, build};
    use crate::source::{GreySource, SourceKind, Verification, write_synthetic_source};

    #[test]
    fn cells_show_samples_or_hatching() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        write_synthetic_source(dir.path(), 300, 20)?;
        let source = GreySource::load(dir.path(), SourceKind::Mnist, Verification::Skip)?;
        let config = ColoredMnistConfig {
            train_size: 250,
            valid_size: 50,
            ..ColoredMnistConfig::new(Preset::Seed, 0.0, 1)
        };
        let data = build(&source, &config)?;
        let layout = PreviewLayout::default();
        let img = preview_image(&data.train, &LFF_PALETTE, layout);
        assert_eq!(img.dimensions(), layout.cell_origin(10, 10));
        // Ratio 0: only the diagonal is populated.
        for row in 0..10 {
            for col in 0..10 {
                let (x0, y0) = layout.cell_origin(row, col);
                let cell = 28 * layout.scale;
                let pixels: Vec<Rgb<u8>> = (0..cell)
                    .flat_map(|dy| (0..cell).map(move |dx| (dx, dy)))
                    .map(|(dx, dy)| *img.get_pixel(x0 + dx, y0 + dy))
                    .collect();
                let hatched = pixels.contains(&HATCH_COLOUR);
                assert_eq!(hatched, row != col, "cell ({row}, {col})");
                if row == col {
                    // The digit is drawn in its class colour (modulo jitter).
                    let brightest = pixels
                        .iter()
                        .max_by_key(|p| p.0.iter().map(|&v| u32::from(v)).sum::<u32>())
                        .unwrap();
                    assert!(
                        brightest.0.iter().any(|&v| v > 60),
                        "cell ({row}, {col}) is dark"
                    );
                }
            }
        }
        let path = dir.path().join("p/preview.png");
        write_preview(&data.train, &LFF_PALETTE, &path)?;
        assert_eq!(image::open(&path)?.to_rgb8(), img);
        Ok(())
    }
}
