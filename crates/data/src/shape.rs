//! The shape of every image of a set.

use serde::{Deserialize, Serialize};

use crate::DataError;

/// `channels x height x width` of every image of a set; images are stored channel-major (CHW).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    /// A shape with no zero side.
    pub fn new(channels: usize, height: usize, width: usize) -> Result<Self, DataError> {
        let shape = Self {
            channels,
            height,
            width,
        };
        shape.validate()?;
        Ok(shape)
    }

    /// Checks that no side is zero.
    pub fn validate(&self) -> Result<(), DataError> {
        for (field, value) in [
            ("channels", self.channels),
            ("height", self.height),
            ("width", self.width),
        ] {
            if value == 0 {
                return Err(DataError::ZeroShape { field });
            }
        }
        Ok(())
    }

    /// Pixels of one channel plane.
    pub fn plane(&self) -> usize {
        self.height * self.width
    }

    /// Values of one image (`C * H * W`).
    pub fn numel(&self) -> usize {
        self.channels * self.plane()
    }

    /// The side of a square image, or an error naming the shape for a non-square one (the
    /// ConvNet of the protocol takes square inputs).
    pub fn square_side(&self) -> Result<usize, DataError> {
        if self.height == self.width {
            Ok(self.height)
        } else {
            Err(DataError::NotSquare { shape: *self })
        }
    }

    /// `[C, H, W]`.
    pub fn dims(&self) -> [usize; 3] {
        [self.channels, self.height, self.width]
    }
}

impl std::fmt::Display for ImageShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.channels, self.height, self.width)
    }
}
