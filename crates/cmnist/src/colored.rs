//! The Colored MNIST generator: a pure function of (grey source, config).
//!
//! Protocol ("seed" preset): a seeded permutation of the grey training images gives train (first
//! 45,000) and valid (next 5,000); test is the grey test set. Every digit is coloured in the
//! foreground (`pixel = intensity / 255 * colour`, background black) with a per-sample colour
//! jittered by Gaussian noise (std 0.005 per channel, clipped to [0, 1]). In train, exactly
//! `round(ratio * n_k)` samples of class `k` are bias-conflicting, each in a colour drawn
//! uniformly from the 9 other colours; the rest are in colour `k`. Valid and test colours are
//! uniform over all 10. Group id = class * 10 + colour.
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

use debiasdd_groups::{GroupIndex, GroupSpec};

use crate::error::{CmnistError, Result};
use crate::idx::IdxImages;
use crate::source::{GreySource, N_CLASSES, SourceKind};

/// Image side length; images are `3 x SIDE x SIDE`.
pub const SIDE: usize = 28;
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
}

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Seed => "seed",
            Preset::Fairdd => "fairdd",
            Preset::Grey => "grey",
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
            other => Err(format!(
                "unknown preset {other:?}: use seed, fairdd or grey"
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
        };
        match preset {
            Preset::Seed => base,
            Preset::Fairdd => Self {
                train_size: 60_000,
                valid_size: 0,
                palette: REBIAS_PALETTE,
                binarise: true,
                ..base
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

/// One split of Colored MNIST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// `len x 3 x 28 x 28`, channel-major (CHW) per image, 0-255.
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    /// Colour index of each sample, 0..10.
    pub colours: Vec<u8>,
    /// `label * 10 + colour`.
    pub groups: Vec<u16>,
}

impl Split {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The CHW bytes of sample `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_BYTES..(i + 1) * IMAGE_BYTES]
    }

    /// Whether sample `i` is in its class's bias-aligned colour.
    pub fn is_aligned(&self, i: usize) -> bool {
        self.labels[i] == self.colours[i]
    }

    /// The per-group index of this split (10 classes x 10 colours).
    pub fn group_index(&self) -> GroupIndex {
        GroupIndex::from_group_ids(GroupSpec::COLORED_MNIST, &self.groups)
            .expect("groups are built as label * 10 + colour with both below 10")
    }

    /// Builds a split from per-sample parts, deriving the groups. Checks lengths and ranges.
    pub(crate) fn from_parts(
        images: Vec<u8>,
        labels: Vec<u8>,
        colours: Vec<u8>,
    ) -> Result<Self, String> {
        if images.len() != labels.len() * IMAGE_BYTES || colours.len() != labels.len() {
            return Err(format!(
                "{} labels, {} colours and {} image bytes do not describe the same samples",
                labels.len(),
                colours.len(),
                images.len()
            ));
        }
        let spec = GroupSpec::COLORED_MNIST;
        let groups = labels
            .iter()
            .zip(&colours)
            .map(|(&l, &c)| {
                spec.group_id(l.into(), c.into())
                    .map(|g| g as u16)
                    .map_err(|e| e.to_string())
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self {
            images,
            labels,
            colours,
            groups,
        })
    }
}

/// A generated Colored MNIST: three splits and the config that made them.
#[derive(Debug, Clone, PartialEq)]
pub struct ColoredMnist {
    pub config: ColoredMnistConfig,
    /// Content checksum of the grey source ([`GreySource::content_id`]).
    pub source_sha256: String,
    pub train: Split,
    pub valid: Split,
    pub test: Split,
}

impl ColoredMnist {
    /// The split by name: `train`, `valid` or `test`.
    pub fn split(&self, name: &str) -> Option<&Split> {
        match name {
            "train" => Some(&self.train),
            "valid" => Some(&self.valid),
            "test" => Some(&self.test),
            _ => None,
        }
    }
}

/// Generates Colored MNIST from a grey source. Same inputs, same bytes.
pub fn build(source: &GreySource, config: &ColoredMnistConfig) -> Result<ColoredMnist> {
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
            let pixels = colourise_images(images, idx, &rgb, config.binarise);
            Split::from_parts(pixels, labels, colours).expect("generator output is consistent")
        };
    Ok(ColoredMnist {
        config: config.clone(),
        source_sha256: source.content_id(),
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
    })
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

/// Foreground colouring: channel `ch` of pixel `p` is `round(intensity(p) * rgb[ch])`.
fn colourise_images(
    images: &IdxImages,
    idx: &[usize],
    rgb: &[[f32; 3]],
    binarise: bool,
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
                    *d = (intensity * scale).round() as u8;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Verification, write_synthetic_source};

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
                    .filter(|&&i| !data.train.is_aligned(i))
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
            seen[usize::from(data.train.labels[i])][usize::from(data.train.colours[i])] = true;
        }
        for (class, row) in seen.iter().enumerate() {
            for (colour, &s) in row.iter().enumerate() {
                assert!(s, "ratio 0.9: class {class} never got colour {colour}");
            }
        }
        let data = build(&source, &tiny_config(0.3, 5)).unwrap();
        let train = &data.train;
        for i in 0..train.len() {
            assert!(train.colours[i] < 10);
            if !train.is_aligned(i) {
                assert_ne!(train.colours[i], train.labels[i]);
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
                counts[usize::from(split.colours[i])] += 1;
                aligned += usize::from(split.is_aligned(i));
            }
            // 2000 samples: each colour ~200; 4 sigma of a binomial(2000, 0.1) is ~54.
            for (c, &n) in counts.iter().enumerate() {
                assert!((146..=254).contains(&n), "colour {c}: {n} of 2000");
            }
            // Aligned fraction ~10 %, nowhere near the train split's 100 %.
            assert!((120..=280).contains(&aligned), "{aligned} aligned of 2000");
        }
        assert!((0..data.train.len()).all(|i| data.train.is_aligned(i)));
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
        assert_ne!(a.test.colours, c.test.colours);
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
        let colour = LFF_PALETTE[usize::from(data.test.colours[0])];
        let img = data.test.image(0);
        for p in 0..784 {
            for ch in 0..3 {
                let expected = (f32::from(grey[p]) * (f32::from(colour[ch]) / 255.0)).round() as u8;
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
        let colour = REBIAS_PALETTE[usize::from(data.test.colours[0])];
        for (p, &g) in grey.iter().enumerate() {
            let expected = if g >= 128 { colour } else { [0, 0, 0] };
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
                data.train.groups[i],
                u16::from(data.train.labels[i]) * 10 + u16::from(data.train.colours[i])
            );
        }
        let index = data.train.group_index();
        assert_eq!(index.len(), data.train.len());
    }
}
