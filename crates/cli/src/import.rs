//! `debiasdd import`: the user's own PNG/JPEG images (listed in a CSV, or an image folder) as a
//! dataset file every other command reads.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use debiasdd_data::import::{CsvColumns, ImportOptions, build, read_csv, read_image_folder};

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Folder the CSV's paths are relative to.
    #[arg(long, requires = "csv")]
    root: Option<PathBuf>,
    /// CSV file listing the images, first line the column names (e.g. Waterbirds'
    /// metadata.csv).
    #[arg(
        long,
        conflicts_with = "image_folder",
        required_unless_present = "image_folder"
    )]
    csv: Option<PathBuf>,
    /// Column holding each image's path.
    #[arg(long, requires = "csv")]
    path_column: Option<String>,
    /// Column holding each image's class (integers or names).
    #[arg(long, requires = "csv")]
    label_column: Option<String>,
    /// Column holding each image's bias attribute (integers or names; empty: unknown).
    #[arg(long, requires = "csv")]
    attribute_column: Option<String>,
    /// Column holding each image's split: train/valid/test or 0/1/2 [default: a seeded split].
    #[arg(long, requires = "csv")]
    split_column: Option<String>,
    /// Field delimiter of the CSV.
    #[arg(long, default_value = ",")]
    delimiter: char,
    /// An image folder instead of a CSV: DIR/<class>/<attribute>/*.png (or DIR/<class>/*.png),
    /// optionally under DIR/train, DIR/valid and DIR/test.
    #[arg(long, value_name = "DIR")]
    image_folder: Option<PathBuf>,
    /// Side S: images are centre-cropped to a square and resized to S x S.
    #[arg(long)]
    size: usize,
    /// Convert every image to 1 (grey) or 3 (RGB) channels [default: the images' own, which
    /// must agree].
    #[arg(long)]
    channels: Option<usize>,
    /// Share of images drawn into the validation split when no split is given.
    #[arg(long, default_value_t = 0.1)]
    valid_share: f64,
    /// Share of images drawn into the test split when no split is given.
    #[arg(long, default_value_t = 0.2)]
    test_share: f64,
    /// Seed of the split draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Dataset name [default: the CSV's or the folder's name].
    #[arg(long)]
    name: Option<String>,
    /// Output dataset file (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Also write the class x attribute preview grid of the train split as PNG.
    #[arg(long)]
    preview: Option<PathBuf>,
}

pub fn run(args: ImportArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let (rows, source) = match (&args.csv, &args.image_folder) {
        (Some(csv), _) => {
            let need = |value: &Option<String>, flag: &str| {
                value
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("--csv needs {flag} (the CSV's column name)"))
            };
            let columns = CsvColumns {
                path: need(&args.path_column, "--path-column")?,
                label: need(&args.label_column, "--label-column")?,
                attribute: args.attribute_column.clone(),
                split: args.split_column.clone(),
            };
            if !args.delimiter.is_ascii() {
                anyhow::bail!(
                    "--delimiter {:?} is not a single ASCII character",
                    args.delimiter
                );
            }
            let root = args
                .root
                .clone()
                .unwrap_or_else(|| csv.parent().map(PathBuf::from).unwrap_or_default());
            (read_csv(&root, csv, &columns, args.delimiter as u8)?, csv)
        }
        (None, Some(dir)) => (read_image_folder(dir)?, dir),
        (None, None) => anyhow::bail!("pass --csv FILE (with its columns) or --image-folder DIR"),
    };
    let name = args.name.clone().unwrap_or_else(|| {
        source
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "imported".into())
    });
    tracing::info!(images = rows.len(), "reading images");
    let data = build(
        &rows,
        &ImportOptions {
            name,
            size: args.size,
            channels: args.channels,
            valid_share: args.valid_share,
            test_share: args.test_share,
            seed: args.seed,
        },
    )?;
    debiasdd_data::file::save(&data, &args.out)?;
    if let Some(preview) = &args.preview {
        debiasdd_data::preview::write_preview(&data.train, None, preview)?;
    }
    println!(
        "wrote {} ({} images of {}: {} train, {} valid, {} test; {} classes x {} attributes) in {:.1} s",
        args.out.display(),
        rows.len(),
        data.shape(),
        data.train.len(),
        data.valid.len(),
        data.test.len(),
        data.info.classes.len(),
        data.info.attributes.len(),
        started.elapsed().as_secs_f64()
    );
    println!("classes: {}", data.info.classes.join(", "));
    println!("attributes: {}", data.info.attributes.join(", "));
    println!();
    println!("train images per group (rows = class, columns = attribute):");
    print!("{}", data.train.group_index().counts());
    let unknown = data.train.attributes.iter().filter(|a| a.is_none()).count();
    if unknown > 0 {
        println!("{unknown} train images have no attribute (class-wise distillation only)");
    }
    Ok(())
}
