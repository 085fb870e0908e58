//! The user's own images as a dataset: PNG/JPEG files listed in a CSV (a Waterbirds
//! `metadata.csv`, a CelebA attribute table saved as CSV) or laid out as an image folder, resized
//! to S x S and written with a train/valid/test split.
//!
//! * CSV: one row per image; the path column (relative to the root folder), the label column,
//!   optionally an attribute column (an empty cell: attribute unknown) and a split column
//!   (`train` / `valid` / `test`, or `0` / `1` / `2` as Waterbirds and CelebA number them).
//! * Image folder: `DIR/<class>/<attribute>/*.png` (or `DIR/<class>/*.png`, attribute unknown);
//!   with `DIR/train`, `DIR/valid`, `DIR/test` each holding that layout, the folders are the
//!   split.
//!
//! Labels and attributes are integers (used as indices, so `0..max`) when every value of the
//! column is a non-negative integer, else names (indexed in sorted order). Without a split column
//! the split is drawn from the seed. Images are centre-cropped to a square, resized to S x S
//! (bilinear), and kept in 1 channel if every image is grey, 3 if every one is colour; a mix is
//! refused unless `channels` says which to convert to. Errors name the CSV line or the file and
//! the fix; nothing is written until every image has been read.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;

use crate::{DataError, Dataset, DatasetInfo, ImageShape, Split};

/// One image to import: where it is, its label and attribute as written, its split if given,
/// and where it was listed (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRow {
    pub path: PathBuf,
    pub label: String,
    pub attribute: Option<String>,
    pub split: Option<usize>,
    /// `metadata.csv line 17`, or the file itself for an image folder.
    pub origin: String,
}

/// The columns of a CSV import.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvColumns {
    pub path: String,
    pub label: String,
    pub attribute: Option<String>,
    pub split: Option<String>,
}

/// How images become a dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportOptions {
    /// Name of the dataset (e.g. the CSV's stem).
    pub name: String,
    /// Side S of the square images.
    pub size: usize,
    /// Channels to convert every image to (1 or 3); `None`: the images' own, which must agree.
    pub channels: Option<usize>,
    /// Shares of valid and test images when no split is given.
    pub valid_share: f64,
    pub test_share: f64,
    pub seed: u64,
}

fn import_err(at: impl Into<String>, problem: impl Into<String>) -> DataError {
    DataError::Import {
        at: at.into(),
        problem: problem.into(),
    }
}

fn split_index(value: &str) -> Option<usize> {
    match value.trim().to_ascii_lowercase().as_str() {
        "train" | "0" => Some(0),
        "valid" | "val" | "validation" | "1" => Some(1),
        "test" | "2" => Some(2),
        _ => None,
    }
}

/// Reads the rows of a CSV file (first line: column names).
pub fn read_csv(
    root: &Path,
    csv_path: &Path,
    columns: &CsvColumns,
    delimiter: u8,
) -> Result<Vec<ImportRow>, DataError> {
    let name = csv_path.display().to_string();
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .trim(csv::Trim::All)
        .from_path(csv_path)
        .map_err(|e| import_err(&name, format!("cannot read the CSV ({e})")))?;
    let headers = reader
        .headers()
        .map_err(|e| import_err(&name, format!("no header line ({e})")))?
        .clone();
    let column = |wanted: &str, flag: &str| {
        headers.iter().position(|h| h == wanted).ok_or_else(|| {
            import_err(
                &name,
                format!(
                    "no column {wanted:?} (its columns: {}); name the right one with {flag}",
                    headers.iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    };
    let path_col = column(&columns.path, "--path-column")?;
    let label_col = column(&columns.label, "--label-column")?;
    let attribute_col = columns
        .attribute
        .as_deref()
        .map(|c| column(c, "--attribute-column"))
        .transpose()?;
    let split_col = columns
        .split
        .as_deref()
        .map(|c| column(c, "--split-column"))
        .transpose()?;
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let line = i + 2;
        let at = format!("{name} line {line}");
        let record = record.map_err(|e| import_err(&at, format!("not a CSV row ({e})")))?;
        let cell = |col: usize| record.get(col).unwrap_or("").to_owned();
        let path = cell(path_col);
        if path.is_empty() {
            return Err(import_err(&at, "the path cell is empty"));
        }
        let label = cell(label_col);
        if label.is_empty() {
            return Err(import_err(
                &at,
                "the label cell is empty; every image needs a class",
            ));
        }
        let split = match split_col {
            Some(col) => Some(split_index(&cell(col)).ok_or_else(|| {
                import_err(
                    &at,
                    format!(
                        "split {:?} is none of train/valid/test (or 0/1/2)",
                        cell(col)
                    ),
                )
            })?),
            None => None,
        };
        rows.push(ImportRow {
            path: root.join(path),
            label,
            attribute: attribute_col.map(cell).filter(|a| !a.is_empty()),
            split,
            origin: at,
        });
    }
    if rows.is_empty() {
        return Err(import_err(&name, "no rows below the header"));
    }
    Ok(rows)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| DataError::Io {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    Ok(entries)
}

fn folder_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Reads an image folder: `DIR/<class>/<attribute>/*.png` or `DIR/<class>/*.png`, optionally
/// under `DIR/train`, `DIR/valid` and `DIR/test`.
pub fn read_image_folder(dir: &Path) -> Result<Vec<ImportRow>, DataError> {
    let has = |name: &str| dir.join(name).is_dir();
    let parts: Vec<(PathBuf, Option<usize>)> = if has("train") && has("test") {
        ["train", "valid", "test"]
            .iter()
            .filter(|s| has(s))
            .map(|s| (dir.join(s), split_index(s)))
            .collect()
    } else {
        vec![(dir.to_owned(), None)]
    };
    let mut rows = Vec::new();
    for (part, split) in parts {
        for class_dir in sorted_entries(&part)?.into_iter().filter(|p| p.is_dir()) {
            let label = folder_name(&class_dir);
            for entry in sorted_entries(&class_dir)? {
                if entry.is_dir() {
                    let attribute = folder_name(&entry);
                    for file in sorted_entries(&entry)?.into_iter().filter(|p| is_image(p)) {
                        rows.push(ImportRow {
                            origin: file.display().to_string(),
                            path: file,
                            label: label.clone(),
                            attribute: Some(attribute.clone()),
                            split,
                        });
                    }
                } else if is_image(&entry) {
                    rows.push(ImportRow {
                        origin: entry.display().to_string(),
                        path: entry,
                        label: label.clone(),
                        attribute: None,
                        split,
                    });
                }
            }
        }
    }
    if rows.is_empty() {
        return Err(import_err(
            dir.display().to_string(),
            "no PNG or JPEG images in <class>/<attribute>/ or <class>/ folders here",
        ));
    }
    Ok(rows)
}

/// Names and per-row indices of one column: integers when every value is a non-negative
/// integer (names "0".."max"), else the sorted distinct names.
fn index_values(values: &[Option<&str>]) -> (Vec<String>, Vec<Option<u8>>, bool) {
    let ints: Option<Vec<Option<usize>>> = values
        .iter()
        .map(|v| v.map_or(Some(None), |v| v.parse::<usize>().ok().map(Some)))
        .collect();
    match ints {
        Some(ints) => {
            let max = ints.iter().flatten().copied().max().unwrap_or(0);
            let names = (0..=max).map(|i| i.to_string()).collect();
            let idx = ints.iter().map(|i| i.map(|i| i.min(255) as u8)).collect();
            (names, idx, max > 255)
        }
        None => {
            let names: Vec<String> = values
                .iter()
                .flatten()
                .map(|v| v.to_string())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let idx = values
                .iter()
                .map(|v| {
                    v.map(|v| names.iter().position(|n| n == v).expect("listed").min(255) as u8)
                })
                .collect();
            let too_many = names.len() > 256;
            (names, idx, too_many)
        }
    }
}

/// Decodes, crops and resizes one image; returns its CHW bytes and its own channel count.
fn load_image(
    row: &ImportRow,
    size: u32,
    channels: Option<usize>,
) -> Result<(Vec<u8>, usize), DataError> {
    let bytes = std::fs::read(&row.path).map_err(|e| {
        import_err(
            &row.origin,
            format!(
                "cannot read {} ({e}); fix the path or the --root it is relative to",
                row.path.display()
            ),
        )
    })?;
    let img = image::load_from_memory(&bytes).map_err(|e| {
        import_err(
            &row.origin,
            format!("{} is not a readable PNG or JPEG ({e})", row.path.display()),
        )
    })?;
    let own = if img.color().has_color() { 3 } else { 1 };
    let (w, h) = img.dimensions();
    let side = w.min(h);
    let square = img.crop_imm((w - side) / 2, (h - side) / 2, side, side);
    let resized = square.resize_exact(size, size, FilterType::Triangle);
    let plane = (size * size) as usize;
    let chw = match channels.unwrap_or(own) {
        1 => DynamicImage::ImageLuma8(resized.to_luma8()).into_bytes(),
        _ => {
            let rgb = resized.to_rgb8();
            let mut out = vec![0u8; 3 * plane];
            for (p, px) in rgb.pixels().enumerate() {
                for ch in 0..3 {
                    out[ch * plane + p] = px[ch];
                }
            }
            out
        }
    };
    Ok((chw, own))
}

/// Reads every image of `rows` and builds the dataset (see the module docs).
pub fn build(rows: &[ImportRow], options: &ImportOptions) -> Result<Dataset, DataError> {
    if options.size == 0 {
        return Err(DataError::invalid(
            "size",
            "0; ask for images of at least 1 x 1",
        ));
    }
    if let Some(c) = options.channels
        && c != 1
        && c != 3
    {
        return Err(DataError::invalid(
            "channels",
            format!("{c}; use 1 (grey) or 3 (RGB)"),
        ));
    }
    for (field, share) in [
        ("valid_share", options.valid_share),
        ("test_share", options.test_share),
    ] {
        if !(0.0..=1.0).contains(&share) {
            return Err(DataError::invalid(
                field,
                format!("{share} is outside [0, 1]"),
            ));
        }
    }
    if options.valid_share + options.test_share >= 1.0 {
        return Err(DataError::invalid(
            "test_share",
            "valid and test shares leave no training images; lower them",
        ));
    }
    let labels: Vec<Option<&str>> = rows.iter().map(|r| Some(r.label.as_str())).collect();
    let (classes, label_idx, too_many_classes) = index_values(&labels);
    let attrs: Vec<Option<&str>> = rows.iter().map(|r| r.attribute.as_deref()).collect();
    let (mut attributes, attr_idx, too_many_attributes) = index_values(&attrs);
    if too_many_classes || too_many_attributes {
        return Err(DataError::invalid(
            if too_many_classes {
                "label"
            } else {
                "attribute"
            },
            "more than 256 distinct values; at most 256 classes and 256 attributes are supported",
        ));
    }
    if attributes.is_empty() {
        attributes.push("unknown".into());
    }
    let decoded: Vec<(Vec<u8>, usize)> = rows
        .par_iter()
        .map(|row| load_image(row, options.size as u32, options.channels))
        .collect::<Result<_, _>>()?;
    let channels = match options.channels {
        Some(c) => c,
        None => {
            let first = decoded[0].1;
            if let Some(i) = decoded.iter().position(|d| d.1 != first) {
                return Err(import_err(
                    &rows[i].origin,
                    format!(
                        "{} has {} channel(s) but {} has {first}; pass --channels 3 (or 1) to convert every image",
                        rows[i].path.display(),
                        decoded[i].1,
                        rows[0].path.display()
                    ),
                ));
            }
            first
        }
    };
    let shape = ImageShape::new(channels, options.size, options.size)?;
    let mut info = DatasetInfo::new(options.name.clone(), shape, classes, attributes)?;
    let spec = info.spec();
    // The split of every row: given, or a seeded shuffle cut into train / valid / test.
    let given: Option<Vec<usize>> = rows.iter().map(|r| r.split).collect();
    let split_of = match given {
        Some(split) => split,
        None => {
            let mut order: Vec<usize> = (0..rows.len()).collect();
            order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(options.seed));
            let n = rows.len() as f64;
            let n_test = (options.test_share * n).round() as usize;
            let n_valid = (options.valid_share * n).round() as usize;
            let mut split = vec![0; rows.len()];
            for (rank, &i) in order.iter().enumerate() {
                split[i] = if rank < n_test {
                    2
                } else if rank < n_test + n_valid {
                    1
                } else {
                    0
                };
            }
            split
        }
    };
    let mut parts: Vec<Split> = (0..3).map(|_| Split::empty(shape, spec)).collect();
    for (i, (chw, _)) in decoded.into_iter().enumerate() {
        let part = &mut parts[split_of[i]];
        part.images.extend(chw);
        part.labels
            .push(label_idx[i].expect("every row has a label"));
        part.attributes.push(attr_idx[i]);
    }
    let test = parts.pop().expect("3");
    let valid = parts.pop().expect("3");
    let train = parts.pop().expect("3");
    let present: BTreeSet<u8> = train.labels.iter().copied().collect();
    if let Some(empty) = (0..spec.n_classes()).find(|&k| !present.contains(&(k as u8))) {
        return Err(DataError::invalid(
            format!("class {}", info.classes[empty]),
            "has no training images; every class needs some (check the labels, or the split)",
        ));
    }
    info.source = Some(
        serde_json::json!({
            "generator": "import",
            "images": rows.len(),
            "size": options.size,
            "seed": options.seed,
        })
        .to_string(),
    );
    Dataset::new(info, train, valid, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, w: u32, h: u32, rgb: Option<[u8; 3]>) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        match rgb {
            Some(c) => image::RgbImage::from_pixel(w, h, image::Rgb(c))
                .save(path)
                .unwrap(),
            None => image::GrayImage::from_pixel(w, h, image::Luma([77]))
                .save(path)
                .unwrap(),
        }
    }

    fn options(size: usize) -> ImportOptions {
        ImportOptions {
            name: "toy".into(),
            size,
            channels: None,
            valid_share: 0.0,
            test_share: 0.25,
            seed: 1,
        }
    }

    #[test]
    fn csv_rows_become_a_dataset_with_their_split() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut csv = String::from("img_filename,y,place,split\n");
        for i in 0..8 {
            let colour = if i % 2 == 0 {
                [200, 10, 10]
            } else {
                [10, 10, 200]
            };
            write_png(
                &dir.path().join(format!("imgs/{i}.png")),
                12,
                8,
                Some(colour),
            );
            csv += &format!(
                "imgs/{i}.png,{},{},{}\n",
                i % 2,
                ["land", "water"][i / 4],
                i / 6
            );
        }
        let path = dir.path().join("metadata.csv");
        std::fs::write(&path, csv)?;
        let columns = CsvColumns {
            path: "img_filename".into(),
            label: "y".into(),
            attribute: Some("place".into()),
            split: Some("split".into()),
        };
        let rows = read_csv(dir.path(), &path, &columns, b',')?;
        let data = build(&rows, &options(4))?;
        assert_eq!(data.shape(), ImageShape::new(3, 4, 4)?);
        assert_eq!(data.info.attributes, ["land", "water"]);
        assert_eq!((data.train.len(), data.valid.len()), (6, 2));
        assert_eq!(data.train.group_ids()[5], Some(3), "class 1, water");
        // Red image: the R plane is 200 everywhere after the crop and resize.
        assert!(data.train.image(0)[..16].iter().all(|&v| v == 200));
        assert!(data.train.image(0)[32..].iter().all(|&v| v == 10));

        let mut missing = columns.clone();
        missing.label = "label".into();
        let err = read_csv(dir.path(), &path, &missing, b',')
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no column \"label\"") && err.contains("--label-column"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn bad_rows_name_the_line_and_the_fix() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        write_png(&dir.path().join("a.png"), 5, 5, Some([1, 2, 3]));
        write_png(&dir.path().join("g.png"), 5, 5, None);
        std::fs::write(dir.path().join("junk.png"), b"not an image")?;
        let columns = CsvColumns {
            path: "file".into(),
            label: "label".into(),
            attribute: None,
            split: None,
        };
        let run = |csv: &str| {
            let path = dir.path().join("list.csv");
            std::fs::write(&path, csv).unwrap();
            read_csv(dir.path(), &path, &columns, b',')
                .and_then(|rows| build(&rows, &options(4)))
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let err = run("file,label\na.png,0\nmissing.png,1\n");
        assert!(
            err.contains("line 3") && err.contains("missing.png"),
            "{err}"
        );
        let err = run("file,label\na.png,0\njunk.png,1\n");
        assert!(
            err.contains("line 3") && err.contains("not a readable PNG"),
            "{err}"
        );
        let err = run("file,label\na.png,0\ng.png,1\n");
        assert!(
            err.contains("line 3") && err.contains("--channels 3"),
            "{err}"
        );
        let err = run("file,label\na.png,\n");
        assert!(
            err.contains("line 2") && err.contains("label cell is empty"),
            "{err}"
        );
        // Integer labels 0 and 2: class 1 has no images.
        let err = run("file,label\na.png,0\na.png,2\na.png,0\na.png,2\n");
        assert!(
            err.contains("class 1") && err.contains("no training images"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn image_folders_give_classes_attributes_and_splits() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for split in ["train", "test"] {
            for (class, attr) in [("cat", "indoor"), ("cat", "outdoor"), ("dog", "indoor")] {
                write_png(
                    &dir.path().join(format!("{split}/{class}/{attr}/1.png")),
                    6,
                    6,
                    None,
                );
            }
            write_png(&dir.path().join(format!("{split}/dog/2.png")), 6, 6, None);
        }
        let rows = read_image_folder(dir.path())?;
        assert_eq!(rows.len(), 8);
        let data = build(&rows, &options(3))?;
        assert_eq!(data.info.classes, ["cat", "dog"]);
        assert_eq!(data.shape().channels, 1);
        assert_eq!((data.train.len(), data.test.len()), (4, 4));
        assert_eq!(
            data.train.attributes.iter().filter(|a| a.is_none()).count(),
            1
        );
        Ok(())
    }
}
