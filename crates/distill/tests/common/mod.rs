//! The tiny hand-made split the engine's integration tests distil.
#![allow(dead_code)]

use debiasdd_cmnist::colored::Split;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const IMAGE: usize = 3 * 28 * 28;

/// 6 images per class: 4 in the class's colour, 2 in colour (class + 1) mod 10; so 20 non-empty
/// groups out of 100. `skip_class` leaves one class out.
pub fn tiny_split(skip_class: Option<u8>) -> Split {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut split = Split {
        images: Vec::new(),
        labels: Vec::new(),
        colours: Vec::new(),
        groups: Vec::new(),
    };
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
            split.colours.push(colour);
            split.groups.push(u16::from(class) * 10 + u16::from(colour));
        }
    }
    split
}
