//! The Colored MNIST generator (and Colored Fashion-MNIST): a pure function of (grey source,
//! config) that returns a [`Dataset`] of the data layer. This module is the one place that
//! knows Colored MNIST's sizes: 3 x 28 x 28 images, 10 classes x 10 colours.
//!
//! Protocol ("seed" preset): a seeded permutation of the grey training images gives train (first
//! 45,000) and valid (next 5,000); test is the grey test set. Every digit is coloured in the
//! foreground (`pixel = intensity / 255 * colour`, background black) with a per-sample colour
//! jittered by Gaussian noise (std 0.005 per channel, clipped to [0, 1]). In train, exactly
//! `round(ratio * n_k)` samples of class `k` are bias-conflicting, each in a colour drawn
//! uniformly from the 9 other colours; the rest are in colour `k`. Valid and test colours are
//! uniform over all 10. Group id = class * 10 + colour. Background colouring ([`Colouring`])
//! puts the colour behind the digit, which stays dark, as FairDD's C-MNIST (BG) code draws it:
//! `pixel = (1 - intensity / 255) * colour` (a white digit would vanish on the ReBias palette's
//! white).
//!
//! Randomness: one ChaCha8 generator per purpose, all seeded by `config.seed` and told apart by
//! their stream number ([`Stream`]), so changing how one purpose draws never shifts another.

use rand::seq::SliceRandom;
use rand::seq::index::sample as sample_indices;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use debiasdd_data::{Dataset, DatasetInfo, ImageShape, Split};
use debiasdd_groups::GroupSpec;

use crate::error::{CmnistError, Result};
use crate::idx::IdxImages;
use crate::source::{GreySource, N_CLASSES, SourceKind};

/// Image side length; images are `3 x SIDE x SIDE`.
pub const SIDE: usize = 28;
/// The image shape of Colored MNIST: 3 x 28 x 28.
pub const SHAPE: ImageShape = ImageShape {
    channels: 3,
    height: SIDE,
    width: SIDE,
};
/// Bytes of one coloured image.
pub const IMAGE_BYTES: usize = 3 * SIDE * SIDE;
/// Number of colours (bias attributes).
pub const N_COLOURS: usize = 10;

/// RGB 0-255 colours, one per class: class `k`'s bias-aligned colour is `palette[k]`.
pub type Palette = [[u8; 3]; N_COLOURS];

/// The 10-colour palette of the Colored MNIST used in the debiasing literature (LfF, DFA).
pub const LFF_PALETTE: Palette = [
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

/// The ReBias palette used by FairDD's Colored MNIST.
pub const REBIAS_PALETTE: Palette = [
    [255, 0, 0],
    [255, 128, 0],
    [255, 255, 0],
    [255, 255, 128],
    [0, 255, 0],
    [0, 255, 255],
    [0, 0, 255],
    [128, 0, 255],
    [255, 0, 255],
    [255, 255, 255],
];

/// Named settings of the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The project's protocol: 45k/5k/10k, LfF palette, grey intensities kept.
    Seed,
    /// FairDD's: all 60k training images as train (no valid split), ReBias palette, digits
    /// binarised at intensity >= 128.
    Fairdd,
    /// Plain grey MNIST in the same 3-channel format: the seed preset's splits with every
    /// palette entry white and no jitter, so all three channels equal the grey image. Colour
    /// indices are still drawn (and stored) but invisible: the control without bias.
    Grey,
    /// FairDD's C-MNIST (BG): the `fairdd` preset with the colour in the background and the
    /// binarised digit black.
    CmnistBg,
    /// FairDD's C-FMNIST (FG): Fashion-MNIST, 60k train, ReBias palette, the grey item scaled
    /// by the colour (not binarised: garments are textured).
    CfmnistFg,
    /// FairDD's C-FMNIST (BG) / Cui et al.'s BG-FMNIST: Fashion-MNIST with the colour in the
    /// background, the item in darker shades of it (its inverted grey).
    CfmnistBg,
}

impl Preset {
    pub const ALL: [Preset; 6] = [
        Preset::Seed,
        Preset::Fairdd,
        Preset::Grey,
        Preset::CmnistBg,
        Preset::CfmnistFg,
        Preset::CfmnistBg,
    ];

    /// The grey source the preset colours.
    pub fn source(self) -> SourceKind {
        match self {
            Preset::CfmnistFg | Preset::CfmnistBg => SourceKind::FashionMnist,
            _ => SourceKind::Mnist,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Seed => "seed",
            Preset::Fairdd => "fairdd",
            Preset::Grey => "grey",
            Preset::CmnistBg => "cmnist-bg",
            Preset::CfmnistFg => "cfmnist-fg",
            Preset::CfmnistBg => "cfmnist-bg",
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "seed" => Ok(Preset::Seed),
            "fairdd" => Ok(Preset::Fairdd),
            "grey" => Ok(Preset::Grey),
            "cmnist-bg" => Ok(Preset::CmnistBg),
            "cfmnist-fg" => Ok(Preset::CfmnistFg),
            "cfmnist-bg" => Ok(Preset::CfmnistBg),
            other => Err(format!(
                "unknown preset {other:?}: use seed, fairdd, grey, cmnist-bg, cfmnist-fg or \
                 cfmnist-bg"
            )),
        }
    }
}

/// The bias-conflicting ratios the protocol studies (fraction of each class's train images not
/// in the class's majority colour).
pub const PROTOCOL_RATIOS: [f64; 5] = [0.005, 0.01, 0.02, 0.05, 0.1];

/// Everything the generator's output depends on, besides the grey files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColoredMnistConfig {
    pub preset: Preset,
    /// Grey source the digits come from (recorded for provenance).
    pub source: SourceKind,
    /// Fraction of bias-conflicting samples per class in train, in [0, 1].
    pub ratio: f64,
    pub seed: u64,
    /// Std of the Gaussian jitter added to each sample's colour, per channel, in [0, 1] units.
    pub jitter_std: f64,
    pub train_size: usize,
    pub valid_size: usize,
    pub palette: Palette,
    /// Threshold digits at intensity >= 128 before colouring.
    pub binarise: bool,
    /// Where the colour goes: on the digit (foreground) or behind it (background).
    #[serde(default)]
    pub colouring: Colouring,
}

/// Where a sample's colour goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Colouring {
    /// `pixel = intensity / 255 * colour`: the digit in colour on black.
    #[default]
    Foreground,
    /// `pixel = (1 - intensity / 255) * colour`: the digit dark on the colour.
    Background,
}

impl ColoredMnistConfig {
    /// The settings of `preset` for one ratio and seed.
    pub fn new(preset: Preset, ratio: f64, seed: u64) -> Self {
        let base = Self {
            preset,
            source: SourceKind::Mnist,
            ratio,
            seed,
            jitter_std: 0.005,
            train_size: 45_000,
            valid_size: 5_000,
            palette: LFF_PALETTE,
            binarise: false,
            colouring: Colouring::Foreground,
        };
        let fairdd = Self {
            train_size: 60_000,
            valid_size: 0,
            palette: REBIAS_PALETTE,
            binarise: true,
            ..base.clone()
        };
        match preset {
            Preset::Seed => base,
            Preset::Fairdd => fairdd,
            Preset::CmnistBg => Self {
                colouring: Colouring::Background,
                ..fairdd
            },
            Preset::CfmnistFg => Self {
                source: SourceKind::FashionMnist,
                binarise: false,
                ..fairdd
            },
            Preset::CfmnistBg => Self {
                source: SourceKind::FashionMnist,
                binarise: false,
                colouring: Colouring::Background,
                ..fairdd
            },
            Preset::Grey => Self {
                palette: [[255; 3]; N_COLOURS],
                jitter_std: 0.0,
                ..base
            },
        }
    }

    /// The file name this dataset is stored under by `cargo xtask cmnist` and `cargo xtask
    /// reproduce`: `<preset>-ratio<ratio>-seed<seed>.safetensors`.
    pub fn file_name(&self) -> String {
        format!(
            "{}-ratio{}-seed{}.safetensors",
            self.preset.name(),
            self.ratio,
            self.seed
        )
    }

    /// Checks the values against each other and against the source's size.
    pub fn check(&self, available_train: usize) -> Result<()> {
        if !(0.0..=1.0).contains(&self.ratio) {
            return Err(CmnistError::InvalidRatio(self.ratio));
        }
        if !self.jitter_std.is_finite() || self.jitter_std < 0.0 {
            return Err(CmnistError::InvalidJitter(self.jitter_std));
        }
        if self.train_size + self.valid_size > available_train {
            return Err(CmnistError::SplitTooLarge {
                train: self.train_size,
                valid: self.valid_size,
                available: available_train,
            });
        }
        Ok(())
    }
}

/// The random streams of the generator. Each purpose has its own so that they are independent.
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
pub enum Stream {
    SplitPermutation = 1,
    TrainBias = 2,
    ValidColours = 3,
    TestColours = 4,
    TrainJitter = 5,
    ValidJitter = 6,
    TestJitter = 7,
}

/// The generator for one purpose.
pub fn rng_for(seed: u64, stream: Stream) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream as u64);
    rng
}

/// The group layout of Colored MNIST: 10 digits x 10 colours.
pub fn spec() -> GroupSpec {
    GroupSpec::new(N_CLASSES, N_COLOURS).expect("10 x 10")
}

/// A split from per-sample parts; the generator's output is consistent by construction.
fn split_of(images: Vec<u8>, labels: Vec<u8>, colours: Vec<u8>) -> Split {
    Split::new(
        SHAPE,
        spec(),
        images,
        labels,
        colours.into_iter().map(Some).collect(),
    )
    .expect("generator output is consistent")
}

/// What the generator writes into [`DatasetInfo::source`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Provenance {
    generator: String,
    config: ColoredMnistConfig,
    source_sha256: String,
}

const GENERATOR: &str = "colored-mnist";

impl ColoredMnistConfig {
    /// The config a dataset was generated with, if the Colored MNIST generator made it (also
    /// for files of earlier versions).
    pub fn of_dataset(data: &Dataset) -> Option<Self> {
        Self::of_info(&data.info)
    }

    /// [`ColoredMnistConfig::of_dataset`] from the info alone (`debiasdd_data::file::read_info`).
    pub fn of_info(info: &DatasetInfo) -> Option<Self> {
        let source = info.source.as_deref()?;
        let value: serde_json::Value = serde_json::from_str(source).ok()?;
        (value.get("generator")?.as_str()? == GENERATOR)
            .then(|| serde_json::from_value(value.get("config")?.clone()).ok())
            .flatten()
    }

    /// The content id of the grey files a dataset was generated from, if recorded.
    pub fn source_sha256(data: &Dataset) -> Option<String> {
        let value: serde_json::Value = serde_json::from_str(data.info.source.as_deref()?).ok()?;
        Some(value.get("source_sha256")?.as_str()?.to_owned())
    }
}

/// Whether sample `i` of a Colored MNIST split is in its class's bias-aligned colour.
pub fn is_aligned(split: &Split, i: usize) -> bool {
    split.attributes[i] == Some(split.labels[i])
}

/// Generates Colored MNIST from a grey source. Same inputs, same bytes.
pub fn build(source: &GreySource, config: &ColoredMnistConfig) -> Result<Dataset> {
    config.check(source.train_images.count)?;
    let mut order: Vec<usize> = (0..source.train_images.count).collect();
    order.shuffle(&mut rng_for(config.seed, Stream::SplitPermutation));
    let train_idx = &order[..config.train_size];
    let valid_idx = &order[config.train_size..config.train_size + config.valid_size];
    let test_idx: Vec<usize> = (0..source.test_images.count).collect();

    let pick = |labels: &[u8], idx: &[usize]| idx.iter().map(|&i| labels[i]).collect::<Vec<u8>>();
    let train_labels = pick(&source.train_labels, train_idx);
    let valid_labels = pick(&source.train_labels, valid_idx);
    let test_labels = source.test_labels.clone();

    let train_colours = biased_colours(
        &train_labels,
        config.ratio,
        &mut rng_for(config.seed, Stream::TrainBias),
    );
    let valid_colours = uniform_colours(
        valid_labels.len(),
        &mut rng_for(config.seed, Stream::ValidColours),
    );
    let test_colours = uniform_colours(
        test_labels.len(),
        &mut rng_for(config.seed, Stream::TestColours),
    );

    let colourise =
        |images: &IdxImages, idx: &[usize], labels: Vec<u8>, colours: Vec<u8>, stream| {
            let rgb = jittered_colours(&colours, config, &mut rng_for(config.seed, stream));
            let pixels = colourise_images(images, idx, &rgb, config.binarise, config.colouring);
            split_of(pixels, labels, colours)
        };
    let provenance = Provenance {
        generator: GENERATOR.into(),
        config: config.clone(),
        source_sha256: source.content_id(),
    };
    let info = DatasetInfo {
        name: format!("{}-ratio{}", config.preset.name(), config.ratio),
        shape: SHAPE,
        classes: source.kind.class_names(),
        attributes: (0..N_COLOURS).map(|c| format!("colour {c}")).collect(),
        aligned: (0..N_CLASSES as u8).map(Some).collect(),
        attribute_colours: Some(config.palette.to_vec()),
        source: Some(serde_json::to_string(&provenance).expect("provenance serialises")),
        inferred: None,
    };
    let data = Dataset {
        info,
        train: colourise(
            &source.train_images,
            train_idx,
            train_labels,
            train_colours,
            Stream::TrainJitter,
        ),
        valid: colourise(
            &source.train_images,
            valid_idx,
            valid_labels,
            valid_colours,
            Stream::ValidJitter,
        ),
        test: colourise(
            &source.test_images,
            &test_idx,
            test_labels,
            test_colours,
            Stream::TestJitter,
        ),
        true_train_attributes: None,
    };
    data.validate().expect("generator output is consistent");
    Ok(data)
}

/// Number of bias-conflicting samples of a class with `n` samples: `round(ratio * n)`, halves
/// rounded away from zero.
pub fn conflicting_count(ratio: f64, n: usize) -> usize {
    (ratio * n as f64).round() as usize
}

/// Colours of a biased split: per class `k`, `conflicting_count(ratio, n_k)` samples chosen
/// uniformly get a colour uniform over the other 9; the rest get colour `k`.
fn biased_colours(labels: &[u8], ratio: f64, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut colours = labels.to_vec();
    for class in 0..N_CLASSES as u8 {
        let members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        let m = conflicting_count(ratio, members.len());
        for pos in sample_indices(rng, members.len(), m) {
            let other = rng.random_range(0..N_COLOURS as u8 - 1);
            colours[members[pos]] = if other >= class { other + 1 } else { other };
        }
    }
    colours
}

fn uniform_colours(n: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    (0..n)
        .map(|_| rng.random_range(0..N_COLOURS as u8))
        .collect()
}

/// Each sample's RGB colour in [0, 1]: the palette entry plus clipped Gaussian jitter.
fn jittered_colours(
    colours: &[u8],
    config: &ColoredMnistConfig,
    rng: &mut ChaCha8Rng,
) -> Vec<[f32; 3]> {
    let noise = (config.jitter_std > 0.0)
        .then(|| Normal::new(0.0f64, config.jitter_std).expect("std checked finite and >= 0"));
    colours
        .iter()
        .map(|&c| {
            let base = config.palette[usize::from(c)];
            std::array::from_fn(|ch| {
                let jitter = noise.as_ref().map_or(0.0, |n| n.sample(rng));
                (f64::from(base[ch]) / 255.0 + jitter).clamp(0.0, 1.0) as f32
            })
        })
        .collect()
}

/// Colouring: channel `ch` of pixel `p` is `round(intensity(p) * rgb[ch])` in the foreground,
/// `round((255 - intensity(p)) * rgb[ch])` in the background.
fn colourise_images(
    images: &IdxImages,
    idx: &[usize],
    rgb: &[[f32; 3]],
    binarise: bool,
    colouring: Colouring,
) -> Vec<u8> {
    let plane = SIDE * SIDE;
    let mut out = vec![0u8; idx.len() * IMAGE_BYTES];
    out.par_chunks_mut(IMAGE_BYTES)
        .zip(idx.par_iter().zip(rgb.par_iter()))
        .for_each(|(dst, (&src_i, colour))| {
            let grey = &images.pixels[src_i * plane..(src_i + 1) * plane];
            for (ch, &scale) in colour.iter().enumerate() {
                for (d, &g) in dst[ch * plane..(ch + 1) * plane].iter_mut().zip(grey) {
                    let intensity = if binarise {
                        if g >= 128 { 255.0 } else { 0.0 }
                    } else {
                        f32::from(g)
                    };
                    *d = match colouring {
                        Colouring::Foreground => (intensity * scale).round() as u8,
                        Colouring::Background => ((255.0 - intensity) * scale).round() as u8,
                    };
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Verification, write_synthetic_source};

    fn colour(split: &Split, i: usize) -> u8 {
        split.attributes[i].expect("every Colored MNIST sample has a colour")
    }

    fn tiny_source(n_train: usize, n_test: usize) -> GreySource {
        let dir = tempfile::tempdir().unwrap();
        write_synthetic_source(dir.path(), n_train, n_test).unwrap();
        GreySource::load(dir.path(), SourceKind::Mnist, Verification::Skip).unwrap()
    }

    fn tiny_config(ratio: f64, seed: u64) -> ColoredMnistConfig {
        ColoredMnistConfig {
            train_size: 1_000,
            valid_size: 200,
            ..ColoredMnistConfig::new(Preset::Seed, ratio, seed)
        }
    }

    #[test]
    fn conflicting_counts_are_exact_per_class() {
        let source = tiny_source(1_300, 500);
        for ratio in [0.0, 0.005, 0.01, 0.05, 0.1, 0.37, 1.0] {
            let data = build(&source, &tiny_config(ratio, 11)).unwrap();
            for class in 0..10u8 {
                let members: Vec<usize> = (0..data.train.len())
                    .filter(|&i| data.train.labels[i] == class)
                    .collect();
                let conflicting = members
                    .iter()
                    .filter(|&&i| !is_aligned(&data.train, i))
                    .count();
                assert_eq!(
                    conflicting,
                    conflicting_count(ratio, members.len()),
                    "ratio {ratio}, class {class} with {} samples",
                    members.len()
                );
            }
        }
        assert_eq!(conflicting_count(0.005, 100), 1); // 0.5 rounds up
        assert_eq!(conflicting_count(0.01, 4_500), 45);
    }

    #[test]
    fn conflicting_colours_are_never_the_class_colour_and_cover_the_others() {
        let source = tiny_source(1_300, 100);
        let data = build(&source, &tiny_config(0.9, 5)).unwrap();
        let mut seen = [[false; N_COLOURS]; N_CLASSES];
        for i in 0..data.train.len() {
            seen[usize::from(data.train.labels[i])][usize::from(colour(&data.train, i))] = true;
        }
        for (class, row) in seen.iter().enumerate() {
            for (colour, &s) in row.iter().enumerate() {
                assert!(s, "ratio 0.9: class {class} never got colour {colour}");
            }
        }
        let data = build(&source, &tiny_config(0.3, 5)).unwrap();
        let train = &data.train;
        for i in 0..train.len() {
            assert!(colour(train, i) < 10);
            if !is_aligned(train, i) {
                assert_ne!(colour(train, i), train.labels[i]);
            }
        }
    }

    #[test]
    fn valid_and_test_colours_are_unbiased() {
        let source = tiny_source(3_000, 2_000);
        let config = ColoredMnistConfig {
            train_size: 1_000,
            valid_size: 2_000,
            ..ColoredMnistConfig::new(Preset::Seed, 0.0, 3)
        };
        let data = build(&source, &config).unwrap();
        for split in [&data.valid, &data.test] {
            let mut counts = [0usize; N_COLOURS];
            let mut aligned = 0;
            for i in 0..split.len() {
                counts[usize::from(colour(split, i))] += 1;
                aligned += usize::from(is_aligned(split, i));
            }
            // 2000 samples: each colour ~200; 4 sigma of a binomial(2000, 0.1) is ~54.
            for (c, &n) in counts.iter().enumerate() {
                assert!((146..=254).contains(&n), "colour {c}: {n} of 2000");
            }
            // Aligned fraction ~10 %, nowhere near the train split's 100 %.
            assert!((120..=280).contains(&aligned), "{aligned} aligned of 2000");
        }
        assert!((0..data.train.len()).all(|i| is_aligned(&data.train, i)));
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let source = tiny_source(1_300, 300);
        let a = build(&source, &tiny_config(0.05, 42)).unwrap();
        let b = build(&source, &tiny_config(0.05, 42)).unwrap();
        let c = build(&source, &tiny_config(0.05, 43)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.train.images, c.train.images);
        assert_ne!(
            a.train.labels, c.train.labels,
            "the split permutation follows the seed"
        );
        assert_ne!(a.test.attributes, c.test.attributes);
    }

    #[test]
    fn foreground_colouring_is_hand_checked() {
        let source = tiny_source(20, 10);
        let config = ColoredMnistConfig {
            train_size: 10,
            valid_size: 5,
            jitter_std: 0.0,
            ..ColoredMnistConfig::new(Preset::Seed, 0.0, 1)
        };
        let data = build(&source, &config).unwrap();
        // Test sample 0 is unpermuted: grey image 0 of the test set.
        let grey = &source.test_images.pixels[..784];
        let rgb = LFF_PALETTE[usize::from(colour(&data.test, 0))];
        let img = data.test.image(0);
        for p in 0..784 {
            for ch in 0..3 {
                let expected = (f32::from(grey[p]) * (f32::from(rgb[ch]) / 255.0)).round() as u8;
                assert_eq!(img[ch * 784 + p], expected, "pixel {p} channel {ch}");
            }
            if grey[p] == 0 {
                assert_eq!(
                    [img[p], img[784 + p], img[1568 + p]],
                    [0, 0, 0],
                    "background"
                );
            }
        }
        // Binarised: full-intensity palette colour or black.
        let fair = ColoredMnistConfig {
            train_size: 20,
            valid_size: 0,
            jitter_std: 0.0,
            ..ColoredMnistConfig::new(Preset::Fairdd, 0.1, 1)
        };
        let data = build(&source, &fair).unwrap();
        let rgb = REBIAS_PALETTE[usize::from(colour(&data.test, 0))];
        for (p, &g) in grey.iter().enumerate() {
            let expected = if g >= 128 { rgb } else { [0, 0, 0] };
            let got = [
                data.test.image(0)[p],
                data.test.image(0)[784 + p],
                data.test.image(0)[1568 + p],
            ];
            assert_eq!(got, expected);
        }
        assert!(data.valid.is_empty());
    }

    #[test]
    fn grey_preset_copies_the_grey_image_into_every_channel() {
        let source = tiny_source(1_300, 50);
        let config = ColoredMnistConfig {
            train_size: 1_000,
            valid_size: 200,
            ..ColoredMnistConfig::new(Preset::Grey, 0.3, 2)
        };
        let data = build(&source, &config).unwrap();
        let grey = &source.test_images.pixels[..784];
        let img = data.test.image(0);
        for ch in 0..3 {
            assert_eq!(&img[ch * 784..(ch + 1) * 784], grey);
        }
    }

    #[test]
    fn jitter_moves_colours_a_little() {
        let source = tiny_source(1_200, 50);
        let data = build(&source, &tiny_config(0.0, 9)).unwrap();
        // Different samples of one class differ slightly in colour ratios because of jitter.
        let ratios: Vec<f64> = (0..data.train.len())
            .filter(|&j| data.train.labels[j] == 0)
            .take(20)
            .map(|j| {
                let im = data.train.image(j);
                let r: u32 = im[..784].iter().map(|&v| u32::from(v)).sum();
                let g: u32 = im[784..1568].iter().map(|&v| u32::from(v)).sum();
                f64::from(g) / f64::from(r)
            })
            .collect();
        let nominal = f64::from(LFF_PALETTE[0][1]) / f64::from(LFF_PALETTE[0][0]);
        let spread = ratios
            .iter()
            .fold(0.0f64, |m, r| m.max((r - nominal).abs()));
        assert!(spread > 1e-4, "no jitter visible: {ratios:?}");
        assert!(spread < 0.05, "jitter too large: {ratios:?} vs {nominal}");
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let source = tiny_source(100, 10);
        let err = build(&source, &tiny_config(1.5, 0)).unwrap_err();
        assert!(matches!(err, CmnistError::InvalidRatio(r) if r == 1.5));
        assert!(err.to_string().contains("[0, 1]"));
        assert!(matches!(
            build(&source, &tiny_config(f64::NAN, 0)),
            Err(CmnistError::InvalidRatio(_))
        ));
        let err = build(&source, &ColoredMnistConfig::new(Preset::Seed, 0.1, 0)).unwrap_err();
        assert!(
            matches!(err, CmnistError::SplitTooLarge { available: 100, .. }),
            "{err}"
        );
        let bad_jitter = ColoredMnistConfig {
            jitter_std: -1.0,
            ..tiny_config(0.1, 0)
        };
        assert!(matches!(
            ColoredMnistConfig::check(&bad_jitter, 10_000),
            Err(CmnistError::InvalidJitter(_))
        ));
    }

    #[test]
    fn groups_follow_label_and_colour() {
        let source = tiny_source(1_300, 100);
        let data = build(&source, &tiny_config(0.2, 2)).unwrap();
        for i in 0..data.train.len() {
            assert_eq!(
                data.train.group_of(i),
                Some(u16::from(data.train.labels[i]) * 10 + u16::from(colour(&data.train, i)))
            );
        }
        let index = data.train.group_index();
        assert_eq!(index.len(), data.train.len());
        assert_eq!(
            ColoredMnistConfig::of_dataset(&data),
            Some(tiny_config(0.2, 2))
        );
        assert_eq!(
            ColoredMnistConfig::source_sha256(&data),
            Some(source.content_id())
        );
        assert_eq!(data.info.aligned[3], Some(3));
    }

    #[test]
    fn background_colouring_is_hand_checked() {
        let source = tiny_source(80, 10);
        let grey = &source.test_images.pixels[..784];
        for preset in [Preset::CmnistBg, Preset::CfmnistBg] {
            let config = ColoredMnistConfig {
                source: SourceKind::Mnist, // the synthetic files stand in for Fashion-MNIST
                train_size: 50,
                jitter_std: 0.0,
                ..ColoredMnistConfig::new(preset, 0.1, 1)
            };
            let data = build(&source, &config).unwrap();
            let rgb = REBIAS_PALETTE[usize::from(colour(&data.test, 0))];
            let img = data.test.image(0);
            for (p, &g) in grey.iter().enumerate() {
                let g = if config.binarise {
                    if g >= 128 { 255.0 } else { 0.0 }
                } else {
                    f32::from(g)
                };
                for ch in 0..3 {
                    let expected = ((255.0 - g) * f32::from(rgb[ch]) / 255.0).round() as u8;
                    assert_eq!(
                        img[ch * 784 + p],
                        expected,
                        "{preset:?} pixel {p} channel {ch}"
                    );
                }
            }
        }
        assert!(ColoredMnistConfig::new(Preset::CmnistBg, 0.1, 0).binarise);
        assert_eq!(Preset::CfmnistFg.source(), SourceKind::FashionMnist);
        let fg = ColoredMnistConfig::new(Preset::CfmnistFg, 0.1, 0);
        assert_eq!(
            (fg.colouring, fg.binarise, fg.train_size),
            (Colouring::Foreground, false, 60_000)
        );
        for preset in Preset::ALL {
            assert_eq!(preset.name().parse::<Preset>(), Ok(preset));
        }
    }
}
