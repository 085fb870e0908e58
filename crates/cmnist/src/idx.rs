//! The IDX format of MNIST-style files: a big-endian header (`0 0 dtype ndims`, then one u32
//! per dimension) followed by the data. Only the unsigned-byte dtype (0x08) occurs in MNIST and
//! Fashion-MNIST, so only it is supported. Files may be gzipped; that is detected from the
//! content, not the name.

use std::io::Read;
use std::path::Path;

use flate2::read::GzDecoder;

use crate::error::{CmnistError, Result};

/// IDX magic of an image file: unsigned bytes, 3 dimensions (count, rows, cols).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// IDX magic of a label file: unsigned bytes, 1 dimension (count).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A stack of grey images, row-major, one byte per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    pub count: usize,
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
}

/// Reads a file whole, decompressing it when it is gzip.
pub fn read_content(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| CmnistError::io(path, e))?;
    if raw.starts_with(&GZIP_MAGIC) {
        let mut out = Vec::with_capacity(raw.len() * 5);
        GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|source| CmnistError::Gzip {
                path: path.to_owned(),
                source,
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn header(
    bytes: &[u8],
    path: &Path,
    expected_magic: u32,
    kind: &'static str,
) -> Result<Vec<usize>> {
    let ndims = (expected_magic & 0xff) as usize;
    let header_len = 4 + 4 * ndims;
    if bytes.len() < 4 {
        return Err(CmnistError::Truncated {
            path: path.to_owned(),
            expected: header_len,
            actual: bytes.len(),
        });
    }
    let magic = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if magic != expected_magic {
        return Err(CmnistError::BadMagic {
            path: path.to_owned(),
            found: magic,
            expected: expected_magic,
            kind,
        });
    }
    if bytes.len() < header_len {
        return Err(CmnistError::Truncated {
            path: path.to_owned(),
            expected: header_len,
            actual: bytes.len(),
        });
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")) as usize)
        .collect();
    let expected = header_len + dims.iter().product::<usize>();
    match bytes.len().cmp(&expected) {
        std::cmp::Ordering::Less => Err(CmnistError::Truncated {
            path: path.to_owned(),
            expected,
            actual: bytes.len(),
        }),
        std::cmp::Ordering::Greater => Err(CmnistError::TrailingBytes {
            path: path.to_owned(),
            expected,
            actual: bytes.len(),
        }),
        std::cmp::Ordering::Equal => Ok(dims),
    }
}

/// Parses the content of an IDX image file. `path` only names the file in errors.
pub fn parse_images(bytes: &[u8], path: &Path) -> Result<IdxImages> {
    let dims = header(bytes, path, IMAGES_MAGIC, "image")?;
    let pixels = bytes[16..].to_vec();
    Ok(IdxImages {
        count: dims[0],
        rows: dims[1],
        cols: dims[2],
        pixels,
    })
}

/// Parses the content of an IDX label file. `path` only names the file in errors.
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    header(bytes, path, LABELS_MAGIC, "label")?;
    Ok(bytes[8..].to_vec())
}

/// Reads an IDX image file, gzipped or raw.
pub fn read_images(path: &Path) -> Result<IdxImages> {
    parse_images(&read_content(path)?, path)
}

/// Reads an IDX label file, gzipped or raw.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    parse_labels(&read_content(path)?, path)
}

/// Encodes images as IDX bytes (uncompressed). Used to make test fixtures and by tools that
/// export data; the inverse of [`parse_images`].
pub fn encode_images(images: &IdxImages) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + images.pixels.len());
    out.extend_from_slice(&IMAGES_MAGIC.to_be_bytes());
    for d in [images.count, images.rows, images.cols] {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(&images.pixels);
    out
}

/// Encodes labels as IDX bytes (uncompressed); the inverse of [`parse_labels`].
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + labels.len());
    out.extend_from_slice(&LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    out.extend_from_slice(labels);
    out
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::Compression;
    use flate2::write::GzEncoder;

    use super::*;

    fn sample() -> IdxImages {
        IdxImages {
            count: 3,
            rows: 2,
            cols: 4,
            pixels: (0..24).map(|i| (i * 10) as u8).collect(),
        }
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn raw_and_gzip_files_round_trip() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let images = sample();
        let labels = vec![0u8, 9, 4];
        let raw = dir.path().join("imgs");
        let gz = dir.path().join("imgs.gz");
        std::fs::write(&raw, encode_images(&images))?;
        std::fs::write(&gz, gzip(&encode_images(&images)))?;
        assert_eq!(read_images(&raw)?, images);
        assert_eq!(read_images(&gz)?, images);
        let lab = dir.path().join("labels.gz");
        std::fs::write(&lab, gzip(&encode_labels(&labels)))?;
        assert_eq!(read_labels(&lab)?, labels);
        Ok(())
    }

    #[test]
    fn truncated_data_is_named() {
        let mut bytes = encode_images(&sample());
        bytes.truncate(bytes.len() - 5);
        let err = parse_images(&bytes, Path::new("x.idx")).unwrap_err();
        assert!(
            matches!(
                err,
                CmnistError::Truncated {
                    expected: 40,
                    actual: 35,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("x.idx"));
        // Cut inside the header.
        let err = parse_images(&bytes[..10], Path::new("x.idx")).unwrap_err();
        assert!(
            matches!(err, CmnistError::Truncated { expected: 16, .. }),
            "{err}"
        );
        let err = parse_labels(&[0, 0], Path::new("l")).unwrap_err();
        assert!(matches!(err, CmnistError::Truncated { .. }), "{err}");
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode_labels(&[1, 2, 3]);
        bytes.push(7);
        assert!(matches!(
            parse_labels(&bytes, Path::new("l")),
            Err(CmnistError::TrailingBytes {
                expected: 11,
                actual: 12,
                ..
            })
        ));
    }

    #[test]
    fn wrong_magic_is_rejected() {
        // A label file handed to the image parser, and the reverse.
        let err = parse_images(&encode_labels(&[1, 2]), Path::new("l")).unwrap_err();
        assert!(
            matches!(
                err,
                CmnistError::BadMagic {
                    found: 0x801,
                    expected: 0x803,
                    ..
                }
            ),
            "{err}"
        );
        let err = parse_labels(&encode_images(&sample()), Path::new("i")).unwrap_err();
        assert!(matches!(err, CmnistError::BadMagic { .. }), "{err}");
        assert!(err.to_string().contains("label file"));
    }

    #[test]
    fn broken_gzip_is_reported_as_such() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut gz = gzip(&encode_images(&sample()));
        gz.truncate(gz.len() / 2);
        let path = dir.path().join("cut.gz");
        std::fs::write(&path, gz)?;
        let err = read_images(&path).unwrap_err();
        assert!(matches!(err, CmnistError::Gzip { .. }), "{err}");
        assert!(err.to_string().contains("cut.gz"));
        Ok(())
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let err = read_images(Path::new("/nonexistent/nothing.gz")).unwrap_err();
        assert!(matches!(err, CmnistError::Io { .. }));
        assert!(err.to_string().contains("/nonexistent/nothing.gz"));
    }
}
