//! The one error type of the augmentation crate.

/// What can go wrong when configuring DSA or applying it to a tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DsaError {
    #[error("unknown DSA family '{name}': use one of color, crop, cutout, flip, scale, rotate")]
    UnknownFamily { name: String },
    #[error(
        "DSA families is empty: list at least one of color, crop, cutout, flip, scale, rotate \
         (the digit default is color, crop, cutout, scale, rotate)"
    )]
    NoFamilies,
    #[error("DSA {field} is {value}: {fix}")]
    BadValue {
        field: &'static str,
        value: f64,
        fix: &'static str,
    },
    #[error(
        "DSA augments (N, C, H, W) image batches, but the tensor has shape {dims:?}: \
         reshape it to rank 4"
    )]
    BadRank { dims: Vec<usize> },
    #[error("DSA supports f32 and f64 tensors, not {dtype}: convert with to_dtype first")]
    BadDtype { dtype: String },
    #[error(
        "{transforms} DSA transforms for a batch of {images} images: pass one per image, \
         or one for the whole batch (Siamese)"
    )]
    CountMismatch { transforms: usize, images: usize },
}
