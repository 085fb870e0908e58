//! The picture of a synthetic set: rows = classes, columns = that class's images in order (in
//! group mode, one column per colour), as in Figure 2 of the source paper.

use std::path::Path;

use debiasdd_eval::data::SyntheticSet;
use image::{Rgb, RgbImage};

use crate::error::DistillError;

const SIDE: usize = 28;
/// Pixels per image pixel in the PNG.
const SCALE: usize = 2;
/// Gap between cells, in PNG pixels.
const GAP: usize = 2;

/// Renders `set` (pixel space, clamped to [0, 1]) as a class-by-image grid on a grey background.
pub fn render(set: &SyntheticSet) -> RgbImage {
    let n_classes = set
        .set
        .labels
        .iter()
        .map(|&l| l as usize + 1)
        .max()
        .unwrap_or(0);
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); n_classes];
    for (i, &label) in set.set.labels.iter().enumerate() {
        rows[label as usize].push(i);
    }
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let cell = SIDE * SCALE + GAP;
    let (width, height) = (
        (columns * cell + GAP) as u32,
        (n_classes * cell + GAP) as u32,
    );
    let mut img = RgbImage::from_pixel(width.max(1), height.max(1), Rgb([96, 96, 96]));
    let plane = SIDE * SIDE;
    for (r, members) in rows.iter().enumerate() {
        for (col, &i) in members.iter().enumerate() {
            let pixels = &set.set.images[i * 3 * plane..(i + 1) * 3 * plane];
            let (x0, y0) = (GAP + col * cell, GAP + r * cell);
            for y in 0..SIDE {
                for x in 0..SIDE {
                    let rgb = std::array::from_fn(|ch| {
                        (pixels[ch * plane + y * SIDE + x].clamp(0.0, 1.0) * 255.0).round() as u8
                    });
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            img.put_pixel(
                                (x0 + x * SCALE + dx) as u32,
                                (y0 + y * SCALE + dy) as u32,
                                Rgb(rgb),
                            );
                        }
                    }
                }
            }
        }
    }
    img
}

/// Writes [`render`]'s picture to `path` as PNG, creating the folder.
pub fn save(set: &SyntheticSet, path: &Path) -> Result<(), DistillError> {
    let write_err = |problem: String| DistillError::Write {
        path: path.to_owned(),
        problem,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| write_err(e.to_string()))?;
    }
    render(set).save(path).map_err(|e| write_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use debiasdd_eval::data::{ImageSet, Normalization};

    use super::*;

    #[test]
    fn cells_land_in_their_class_row() {
        // Two classes, two images each; image 3 (class 1, second) is pure red.
        let plane = SIDE * SIDE;
        let mut images = vec![0f32; 4 * 3 * plane];
        images[3 * 3 * plane..3 * 3 * plane + plane].fill(1.0);
        let set = SyntheticSet {
            set: ImageSet {
                images,
                labels: vec![0, 0, 1, 1],
                groups: vec![None; 4],
            },
            norm: Normalization {
                mean: [0.0; 3],
                std: [1.0; 3],
            },
            config: None,
        };
        let img = render(&set);
        let cell = SIDE * SCALE + GAP;
        assert_eq!(
            img.dimensions(),
            ((2 * cell + GAP) as u32, (2 * cell + GAP) as u32)
        );
        let centre = |row: usize, col: usize| {
            *img.get_pixel(
                (GAP + col * cell + SIDE) as u32,
                (GAP + row * cell + SIDE) as u32,
            )
        };
        assert_eq!(centre(1, 1), Rgb([255, 0, 0]));
        assert_eq!(centre(0, 1), Rgb([0, 0, 0]));
        assert_eq!(*img.get_pixel(0, 0), Rgb([96, 96, 96]));
    }
}
