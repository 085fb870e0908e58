//! The picture of a synthetic set: rows = classes, columns = that class's images in order (in
//! group mode, one column per attribute), as in Figure 2 of the source paper. Images of any
//! shape: 3 channels as RGB, any other count as the first channel in grey.

use std::path::Path;

use debiasdd_data::SyntheticSet;
use image::{Rgb, RgbImage};

use crate::error::DistillError;

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
    let shape = set.set.shape;
    let (cell_w, cell_h) = (shape.width * SCALE + GAP, shape.height * SCALE + GAP);
    let (width, height) = (
        (columns * cell_w + GAP) as u32,
        (n_classes * cell_h + GAP) as u32,
    );
    let mut img = RgbImage::from_pixel(width.max(1), height.max(1), Rgb([96, 96, 96]));
    let plane = shape.plane();
    for (r, members) in rows.iter().enumerate() {
        for (col, &i) in members.iter().enumerate() {
            let pixels = set.set.image(i);
            let (x0, y0) = (GAP + col * cell_w, GAP + r * cell_h);
            for y in 0..shape.height {
                for x in 0..shape.width {
                    let rgb = std::array::from_fn(|ch| {
                        let ch = if shape.channels == 3 { ch } else { 0 };
                        (pixels[ch * plane + y * shape.width + x].clamp(0.0, 1.0) * 255.0).round()
                            as u8
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
    use debiasdd_data::{ImageSet, ImageShape, Normalization};
    use debiasdd_groups::GroupSpec;

    use super::*;

    #[test]
    fn cells_land_in_their_class_row() {
        // Two classes, two images each of 3 x 6 x 4; image 3 (class 1, second) is pure red.
        let shape = ImageShape::new(3, 6, 4).unwrap();
        let plane = shape.plane();
        let mut images = vec![0f32; 4 * 3 * plane];
        images[3 * 3 * plane..3 * 3 * plane + plane].fill(1.0);
        let set = SyntheticSet {
            set: ImageSet {
                shape,
                spec: GroupSpec::new(2, 1).unwrap(),
                images,
                labels: vec![0, 0, 1, 1],
                groups: vec![None; 4],
            },
            norm: Normalization {
                mean: vec![0.0; 3],
                std: vec![1.0; 3],
            },
            config: None,
        };
        let img = render(&set);
        let (cell_w, cell_h) = (4 * SCALE + GAP, 6 * SCALE + GAP);
        assert_eq!(
            img.dimensions(),
            ((2 * cell_w + GAP) as u32, (2 * cell_h + GAP) as u32)
        );
        let centre = |row: usize, col: usize| {
            *img.get_pixel(
                (GAP + col * cell_w + 4) as u32,
                (GAP + row * cell_h + 6) as u32,
            )
        };
        assert_eq!(centre(1, 1), Rgb([255, 0, 0]));
        assert_eq!(centre(0, 1), Rgb([0, 0, 0]));
        assert_eq!(*img.get_pixel(0, 0), Rgb([96, 96, 96]));
    }
}
