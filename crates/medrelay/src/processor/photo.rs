//! Decoding a photo completely, within limits: the declared size is checked before any pixel
//! buffer is allocated, every pixel is then decoded (a truncated or corrupt photo fails here,
//! not later), and the EXIF orientation is applied. Runs inside the sandbox child.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits};

use super::{MediaType, ParseLimits, Refusal};

/// Larger photos are refused before any pixel buffer is allocated.
pub const MAX_EDGE_PIXELS: u32 = 12_000;
/// At most this much memory for one decoded photo.
const MAX_ALLOC: u64 = 600 * 1024 * 1024;

/// Decodes every pixel of a photo of `media_type`, turned upright.
pub fn decode(
    bytes: &[u8],
    media_type: MediaType,
    limits: &ParseLimits,
) -> Result<DynamicImage, Refusal> {
    let format = match media_type {
        MediaType::Jpeg => image::ImageFormat::Jpeg,
        MediaType::Png => image::ImageFormat::Png,
        MediaType::Webp => image::ImageFormat::WebP,
        MediaType::Pdf => return Err(Refusal::Unsupported),
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut decoder_limits = Limits::default();
    decoder_limits.max_image_width = Some(MAX_EDGE_PIXELS);
    decoder_limits.max_image_height = Some(MAX_EDGE_PIXELS);
    decoder_limits.max_alloc = Some(MAX_ALLOC);
    reader.limits(decoder_limits);
    // The header is checked against the limits before any pixel is decoded.
    let mut decoder = reader.into_decoder().map_err(refusal)?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > limits.image_max_pixels {
        return Err(Refusal::TooComplex);
    }
    let orientation = decoder.orientation().ok();
    let mut image = DynamicImage::from_decoder(decoder).map_err(refusal)?;
    if image.width() == 0 || image.height() == 0 {
        return Err(Refusal::Unreadable);
    }
    if let Some(orientation) = orientation {
        image.apply_orientation(orientation);
    }
    Ok(image)
}

/// A photo over the limits is too complex; anything else that does not decode is unreadable.
fn refusal(e: ImageError) -> Refusal {
    match e {
        ImageError::Limits(_) => Refusal::TooComplex,
        _ => Refusal::Unreadable,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    /// A PNG whose (valid) header declares 65535 x 65535 pixels, with no pixel data at all.
    pub fn pixel_flood_png() -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend_from_slice(&65535u32.to_be_bytes());
        png.extend_from_slice(&65535u32.to_be_bytes());
        png.extend_from_slice(&[8, 2, 0, 0, 0]);
        let crc = crc32(&png[12..29]);
        png.extend_from_slice(&crc.to_be_bytes());
        png
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xffff_ffffu32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xedb8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn a_photo_over_the_pixel_limits_is_too_complex_before_any_pixel_is_decoded() {
        let limits = super::ParseLimits::default();
        let result = super::decode(&pixel_flood_png(), super::MediaType::Png, &limits);
        assert!(
            matches!(result, Err(super::Refusal::TooComplex)),
            "{result:?}"
        );
    }
}

#[cfg(test)]
mod pixel_limit {
    use super::*;

    #[test]
    fn a_photo_over_the_configured_pixel_count_is_too_complex() {
        let img = image::GrayImage::from_pixel(1200, 1000, image::Luma([9]));
        let mut png = Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let tight = ParseLimits {
            image_max_pixels: 1_000_000,
            ..ParseLimits::default()
        };
        assert_eq!(
            decode(png.get_ref(), MediaType::Png, &tight).err(),
            Some(Refusal::TooComplex)
        );
        assert!(decode(png.get_ref(), MediaType::Png, &ParseLimits::default()).is_ok());
    }
}
