//! The class x attribute preview grid of a split: the picture that shows the bias.
//!
//! Rows are classes, columns attributes; when the attributes are colours, a strip on top shows
//! each column's colour. Images of any shape are drawn (1 channel as grey, 3 as RGB, otherwise
//! the first channel as grey). Each
//! cell holds the first sample (in split order) of its group, or a hatched dark cell where the
//! group is empty. A bar under each cell grows with log(1 + count), so the dominance of the
//! diagonal in a biased train split is visible at a glance.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::{DataError, ImageShape, Split};

/// Geometry of the grid, in output pixels.
#[derive(Debug, Clone, Copy)]
pub struct PreviewLayout {
    /// Each image is drawn `scale` times larger.
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
    /// Output pixels of a cell's image: (width, height).
    fn cell(&self, shape: ImageShape) -> (u32, u32) {
        (
            shape.width as u32 * self.scale,
            shape.height as u32 * self.scale,
        )
    }

    /// Top-left corner of cell (row, col)'s image for images of `shape`.
    pub fn cell_origin(&self, shape: ImageShape, row: usize, col: usize) -> (u32, u32) {
        let (w, h) = self.cell(shape);
        let pitch_x = w + self.gap;
        let pitch_y = h + self.bar + self.gap;
        (
            self.gap + col as u32 * pitch_x,
            self.header + self.gap + row as u32 * pitch_y,
        )
    }
}

/// Draws the grid of a split; `colours` (one per attribute) fill the strip on top.
pub fn preview_image(
    split: &Split,
    colours: Option<&[[u8; 3]]>,
    layout: PreviewLayout,
) -> RgbImage {
    let shape = split.shape;
    let (n_c, n_a) = (split.spec.n_classes(), split.spec.n_attributes());
    let (w, h) = layout.cell_origin(shape, n_c, n_a);
    let mut img = RgbImage::from_pixel(w, h, GAP_COLOUR);
    let (cell_w, cell_h) = layout.cell(shape);
    for col in 0..n_a {
        let colour = colours
            .and_then(|c| c.get(col))
            .map_or(GAP_COLOUR, |&c| Rgb(c));
        let (x0, _) = layout.cell_origin(shape, 0, col);
        for y in layout.gap / 2..layout.header {
            for x in x0..x0 + cell_w {
                img.put_pixel(x, y, colour);
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
    for row in 0..n_c {
        for col in 0..n_a {
            let group = row * n_a + col;
            let (x0, y0) = layout.cell_origin(shape, row, col);
            match index.members(group).first() {
                Some(&i) => draw_sample(&mut img, split.image(i), shape, x0, y0, layout.scale),
                None => draw_empty(&mut img, x0, y0, cell_w, cell_h),
            }
            let frac = if max_log > 0.0 {
                (1.0 + counts.get(group) as f64).ln() / max_log
            } else {
                0.0
            };
            let filled = (frac * f64::from(cell_w)).round() as u32;
            for y in y0 + cell_h..y0 + cell_h + layout.bar {
                for dx in 0..cell_w {
                    let colour = if dx < filled { BAR_COLOUR } else { BAR_TRACK };
                    img.put_pixel(x0 + dx, y, colour);
                }
            }
        }
    }
    img
}

fn draw_sample(img: &mut RgbImage, chw: &[u8], shape: ImageShape, x0: u32, y0: u32, scale: u32) {
    let plane = shape.plane();
    for r in 0..shape.height {
        for c in 0..shape.width {
            let p = r * shape.width + c;
            let rgb = if shape.channels == 3 {
                Rgb([chw[p], chw[plane + p], chw[2 * plane + p]])
            } else {
                Rgb([chw[p]; 3])
            };
            for dy in 0..scale {
                for dx in 0..scale {
                    img.put_pixel(x0 + c as u32 * scale + dx, y0 + r as u32 * scale + dy, rgb);
                }
            }
        }
    }
}

fn draw_empty(img: &mut RgbImage, x0: u32, y0: u32, w: u32, h: u32) {
    for dy in 0..h {
        for dx in 0..w {
            let hatch = (dx + dy) % 8 < 2 || (dx + h - dy) % 8 < 2;
            img.put_pixel(
                x0 + dx,
                y0 + dy,
                if hatch { HATCH_COLOUR } else { EMPTY_COLOUR },
            );
        }
    }
}

/// Draws the grid of a split and writes it as PNG.
pub fn write_preview(
    split: &Split,
    colours: Option<&[[u8; 3]]>,
    path: &Path,
) -> Result<(), DataError> {
    let img = preview_image(split, colours, PreviewLayout::default());
    let write_err = |problem: String| DataError::Write {
        path: path.to_owned(),
        problem,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| write_err(e.to_string()))?;
    }
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| write_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use debiasdd_groups::GroupSpec;

    use super::*;

    /// 2 classes x 3 attributes of 1 x 3 x 2 images; group (1, 2) empty, group (0, 1) has 3.
    fn split() -> Split {
        let shape = ImageShape::new(1, 3, 2).unwrap();
        let spec = GroupSpec::new(2, 3).unwrap();
        let pairs = [(0, 0), (0, 1), (0, 1), (0, 1), (0, 2), (1, 0), (1, 1)];
        let images = (0..pairs.len())
            .flat_map(|i| [40 * i as u8 + 10; 6])
            .collect();
        Split::new(
            shape,
            spec,
            images,
            pairs.iter().map(|p| p.0).collect(),
            pairs.iter().map(|p| Some(p.1)).collect(),
        )
        .unwrap()
    }

    #[test]
    fn cells_show_the_first_sample_or_hatching() -> anyhow::Result<()> {
        let split = split();
        let layout = PreviewLayout::default();
        let colours = [[255, 0, 0], [0, 255, 0], [0, 0, 255]];
        let img = preview_image(&split, Some(&colours), layout);
        assert_eq!(img.dimensions(), layout.cell_origin(split.shape, 2, 3));
        for (row, col, first) in [
            (0, 0, Some(0u8)),
            (0, 1, Some(1)),
            (1, 1, Some(6)),
            (1, 2, None),
        ] {
            let (x0, y0) = layout.cell_origin(split.shape, row, col);
            let pixel = *img.get_pixel(x0 + 1, y0 + 1);
            match first {
                Some(i) => assert_eq!(pixel, Rgb([40 * i + 10; 3]), "cell ({row}, {col})"),
                None => assert!(
                    pixel == HATCH_COLOUR || pixel == EMPTY_COLOUR,
                    "cell ({row}, {col}) is not hatched"
                ),
            }
        }
        let (x0, _) = layout.cell_origin(split.shape, 0, 2);
        assert_eq!(*img.get_pixel(x0, layout.header - 1), Rgb([0, 0, 255]));
        // The busiest group's count bar is full, a single sample's shorter.
        let bar_y = |row, col| {
            let (x0, y0) = layout.cell_origin(split.shape, row, col);
            (x0, y0 + 3 * layout.scale)
        };
        let (x, y) = bar_y(0, 1);
        assert_eq!(*img.get_pixel(x + 3, y), BAR_COLOUR);
        let (x, y) = bar_y(0, 0);
        assert_eq!(*img.get_pixel(x + 3, y), BAR_TRACK);

        let dir = tempfile::tempdir()?;
        let path = dir.path().join("p/preview.png");
        write_preview(&split, Some(&colours), &path)?;
        assert_eq!(image::open(&path)?.to_rgb8(), img);
        Ok(())
    }
}
