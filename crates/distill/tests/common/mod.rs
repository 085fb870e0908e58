//! The tiny hand-made split the engine's integration tests distil.
#![allow(dead_code)]

use candle_core::{DType, Tensor};
use debiasdd_data::{ImageShape, Split};
use debiasdd_groups::GroupSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const IMAGE: usize = 3 * 28 * 28;

/// Colored MNIST's shape and layout: 3 x 28 x 28, 10 classes x 10 colours.
pub fn cmnist_layout() -> (ImageShape, GroupSpec) {
    (
        ImageShape::new(3, 28, 28).unwrap(),
        GroupSpec::new(10, 10).unwrap(),
    )
}

/// 6 images per class: 4 in the class's colour, 2 in colour (class + 1) mod 10; so 20 non-empty
/// groups out of 100. `skip_class` leaves one class out.
pub fn tiny_split(skip_class: Option<u8>) -> Split {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (shape, spec) = cmnist_layout();
    let mut split = Split::empty(shape, spec);
    for class in 0..10u8 {
        if Some(class) == skip_class {
            continue;
        }
        for k in 0..6 {
            let colour = if k < 4 { class } else { (class + 1) % 10 };
            split
                .images
                .extend((0..IMAGE).map(|_| rng.random_range(0..=255u8)));
            split.labels.push(class);
            split.attributes.push(Some(colour));
        }
    }
    split
}

/// A tensor's values as f64, in order.
pub fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("values")
}
