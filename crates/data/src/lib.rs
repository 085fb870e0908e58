//! The data layer of debiasdd: labelled image sets of any channels x height x width, any number
//! of classes and bias attributes, and their files.
//!
//! * [`ImageShape`]: `C x H x W` of every image of a set.
//! * [`Split`] and [`Dataset`]: real images as bytes (0-255, CHW per image) with a class label
//!   and a bias attribute per image (the attribute may be unknown), the group layout
//!   ([`debiasdd_groups::GroupSpec`]) and the class and attribute names ([`DatasetInfo`]).
//! * [`file`]: the one dataset file (`debiasdd-dataset/1`, safetensors) every generator and
//!   importer writes and every command reads, validated on load with errors naming the field.
//! * [`ImageSet`], [`Normalization`]: images in pixel space as floats, per-channel statistics,
//!   conversion to candle tensors, random real subsets ([`random_real_subset`]).
//! * [`SyntheticSet`]: the small-set file a distillation or a subset writes.
//! * [`import`]: the user's own PNG/JPEG images, listed in a CSV or laid out in folders.
//! * [`preview`]: the class x attribute grid of a split, the picture that shows the bias.
//!
//! It sits above `debiasdd-groups` and below everything that trains or distils: the
//! distillation engine and the evaluator both stand on it, and neither imports the other.
//! Dataset generators (Colored MNIST, CIFAR10-S) and importers produce a [`Dataset`]; only they
//! know their sizes.
//!
//! ```
//! use debiasdd_data::{Dataset, DatasetInfo, ImageShape, Split};
//! let shape = ImageShape::new(1, 2, 2)?;
//! let info = DatasetInfo::new("toy", shape, vec!["a".into(), "b".into()], vec!["x".into()])?;
//! let train = Split::new(shape, info.spec(), vec![0; 8], vec![0, 1], vec![Some(0), None])?;
//! let data = Dataset::new(info, train.clone(), train.clone(), train)?;
//! assert_eq!(data.train.group_ids(), vec![Some(0), None]);
//! # Ok::<(), debiasdd_data::DataError>(())
//! ```

mod dataset;
mod error;
pub mod file;
mod image_set;
pub mod import;
pub mod preview;
mod shape;
mod synthetic;

pub use dataset::{Dataset, DatasetInfo, InferredGroups, SPLIT_NAMES, Split};
pub use error::DataError;
pub use file::{serialize_sorted, write_atomically};
pub use image_set::{ImageSet, Normalization, Stratify, random_real_subset};
pub use shape::ImageShape;
pub use synthetic::{SYNTHETIC_FORMAT, SyntheticSet};
