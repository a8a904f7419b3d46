//! Photos for Claude: decoded within pixel limits, turned upright from their EXIF orientation,
//! scaled to at most 1568 px on the long edge, and re-encoded as JPEG. Re-encoding drops every
//! metadata block (EXIF, GPS, XMP) of the original.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use crate::processor::{ProcessError, Refusal};

/// Claude gains nothing from a longer edge and downscales anything above it.
pub const MAX_EDGE: u32 = 1568;
/// The per-image limit is 5 MB measured on the base64 text.
pub const MAX_BASE64_BYTES: usize = 5 * 1024 * 1024;
/// Larger photos are refused before any pixel buffer is allocated.
pub const MAX_PIXELS_EDGE: u32 = 12_000;

/// A photo ready to send.
pub struct Prepared {
    pub jpeg: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("size", &self.jpeg.len())
            .finish()
    }
}

pub fn prepare(bytes: &[u8]) -> Result<Prepared, ProcessError> {
    let unreadable = || ProcessError::Abort(Refusal::Unreadable);
    let contained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|_| unreadable())?;
        let mut limits = Limits::default();
        limits.max_image_width = Some(MAX_PIXELS_EDGE);
        limits.max_image_height = Some(MAX_PIXELS_EDGE);
        limits.max_alloc = Some(600 * 1024 * 1024);
        reader.limits(limits);
        // The header is checked against the limits before any pixel is decoded.
        let mut decoder = reader.into_decoder().map_err(|_| unreadable())?;
        let orientation = decoder.orientation().ok();
        let mut image = DynamicImage::from_decoder(decoder).map_err(|_| unreadable())?;
        if let Some(orientation) = orientation {
            image.apply_orientation(orientation);
        }
        Ok::<_, ProcessError>(image)
    }));
    let image = match contained {
        Ok(Ok(image)) => image,
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(unreadable()),
    };
    let image = if image.width().max(image.height()) > MAX_EDGE {
        image.resize(MAX_EDGE, MAX_EDGE, image::imageops::FilterType::Triangle)
    } else {
        image
    };
    let rgb = DynamicImage::ImageRgb8(image.to_rgb8());
    for quality in [85u8, 70, 55, 40] {
        let mut out = Cursor::new(Vec::new());
        let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
        rgb.write_with_encoder(encoder).map_err(|_| unreadable())?;
        let jpeg = out.into_inner();
        if jpeg.len().div_ceil(3) * 4 < MAX_BASE64_BYTES {
            return Ok(Prepared {
                width: rgb.width(),
                height: rgb.height(),
                jpeg,
            });
        }
    }
    Err(ProcessError::Abort(Refusal::TooComplex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_photo_is_scaled_and_re_encoded_as_jpeg() {
        let img = image::RgbImage::from_fn(3000, 2000, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
        });
        let mut png = Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let prepared = prepare(png.get_ref()).unwrap();
        assert_eq!((prepared.width, prepared.height), (1568, 1045));
        assert!(prepared.jpeg.starts_with(&[0xff, 0xd8, 0xff]));
        let decoded = image::load_from_memory(&prepared.jpeg).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (1568, 1045));
    }

    #[test]
    fn a_pixel_flood_is_refused_before_decoding() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend_from_slice(&65535u32.to_be_bytes());
        png.extend_from_slice(&65535u32.to_be_bytes());
        png.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0]);
        let started = std::time::Instant::now();
        assert!(matches!(
            prepare(&png),
            Err(ProcessError::Abort(Refusal::Unreadable))
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
