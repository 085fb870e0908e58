//! The agreement heat map: a PNG of the contingency table of annotated attribute (rows) against
//! inferred attribute (columns), over the train images, each row scaled to its own total, so a
//! perfect inference of a permutation-free bias is a dark diagonal. Without annotations the rows
//! are the classes instead. No text (no fonts); layout, in pixels:
//!
//! ```text
//!  8 px margin, white background
//!  [palette strip]  optional: a 20 x 8 swatch of each row's attribute colour left of its row
//!  grid             20 x 20 cells, 1 px white separators; white (0 % of the row) to dark blue
//!                   (100 %); a row with no images is light grey
//! ```

use std::path::Path;

use image::{ImageFormat, Rgb, RgbImage};

use crate::error::InferError;

const CELL: u32 = 20;
const PITCH: u32 = CELL + 1;
const MARGIN: u32 = 8;
const SWATCH: u32 = 8;
const EMPTY_ROW: Rgb<u8> = Rgb([215, 215, 215]);
const DARK: [f64; 3] = [8.0, 48.0, 107.0];

/// The colour of a share in [0, 1]: white to dark blue.
fn share_colour(share: f64) -> Rgb<u8> {
    let t = share.clamp(0.0, 1.0);
    Rgb(std::array::from_fn(|i| {
        (255.0 + (DARK[i] - 255.0) * t).round() as u8
    }))
}

/// Draws `counts` (`rows x columns`, row-major) as the heat map; `row_colours`, when given (one
/// per row), are drawn as swatches left of the rows.
pub fn render(
    counts: &[usize],
    rows: usize,
    columns: usize,
    row_colours: Option<&[[u8; 3]]>,
) -> RgbImage {
    assert_eq!(counts.len(), rows * columns, "rows x columns counts");
    let strip = if row_colours.is_some() { SWATCH + 4 } else { 0 };
    let width = 2 * MARGIN + strip + columns as u32 * PITCH;
    let height = 2 * MARGIN + rows as u32 * PITCH;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for r in 0..rows {
        let row = &counts[r * columns..(r + 1) * columns];
        let total: usize = row.iter().sum();
        let y0 = MARGIN + r as u32 * PITCH;
        if let Some(colours) = row_colours {
            fill(&mut img, MARGIN, y0, SWATCH, CELL, Rgb(colours[r]));
        }
        for (c, &n) in row.iter().enumerate() {
            let colour = if total == 0 {
                EMPTY_ROW
            } else {
                share_colour(n as f64 / total as f64)
            };
            fill(
                &mut img,
                MARGIN + strip + c as u32 * PITCH,
                y0,
                CELL,
                CELL,
                colour,
            );
        }
    }
    img
}

fn fill(img: &mut RgbImage, x0: u32, y0: u32, w: u32, h: u32, colour: Rgb<u8>) {
    for y in y0..y0 + h {
        for x in x0..x0 + w {
            img.put_pixel(x, y, colour);
        }
    }
}

/// [`render`] written as a PNG.
pub fn write(
    path: &Path,
    counts: &[usize],
    rows: usize,
    columns: usize,
    row_colours: Option<&[[u8; 3]]>,
) -> Result<(), InferError> {
    let err = |problem: String| InferError::Heatmap {
        path: path.to_owned(),
        problem,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| err(e.to_string()))?;
    }
    render(counts, rows, columns, row_colours)
        .save_with_format(path, ImageFormat::Png)
        .map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_shaded_by_their_share_of_the_row() {
        let img = render(&[3, 1, 0, 0], 2, 2, None);
        assert_eq!(
            img.dimensions(),
            (2 * MARGIN + 2 * PITCH, 2 * MARGIN + 2 * PITCH)
        );
        let at = |r: u32, c: u32| *img.get_pixel(MARGIN + c * PITCH + 5, MARGIN + r * PITCH + 5);
        assert_eq!(at(0, 0), share_colour(0.75));
        assert_eq!(at(0, 1), share_colour(0.25));
        assert_eq!(at(1, 0), EMPTY_ROW, "a row without images");
        assert_eq!(share_colour(0.0), Rgb([255, 255, 255]));
    }
}
