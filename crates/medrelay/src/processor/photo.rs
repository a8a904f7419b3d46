//! Decoding a photo completely, within limits: the declared size is checked before any pixel
//! buffer is allocated, every pixel is then decoded (a truncated or corrupt photo fails here,
//! not later), and the EXIF orientation is applied. Runs inside the sandbox child.
//!
//! A HEIC photo is read by `heifer` (container and HEVC decoder in safe Rust): the primary
//! image only (thumbnails, depth maps and other images of a burst are never decoded), its
//! declared size and tile count checked first, its `irot`/`imir` applied, its colours turned
//! to sRGB from its ICC profile or `nclx`. Its metadata (EXIF, GPS, XMP) is never read.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits};

use super::{MediaType, ParseLimits, Refusal};

/// Larger photos are refused before any pixel buffer is allocated.
pub const MAX_EDGE_PIXELS: u32 = 12_000;
/// At most this much memory for one decoded photo.
const MAX_ALLOC: u64 = 600 * 1024 * 1024;
/// A HEIC grid with more tiles is refused before any tile is decoded: an iPhone's photo has
/// 48 tiles of 512 × 512.
pub const MAX_TILES: u32 = 1024;

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
        MediaType::Heic if limits.heic => return decode_heic(bytes, limits),
        MediaType::Heic => return Err(Refusal::Unsupported),
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
    check_size(width, height, limits)?;
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

/// A photo larger than the limits is too complex.
fn check_size(width: u32, height: u32, limits: &ParseLimits) -> Result<(), Refusal> {
    if width.max(height) > MAX_EDGE_PIXELS
        || u64::from(width) * u64::from(height) > limits.image_max_pixels
    {
        return Err(Refusal::TooComplex);
    }
    Ok(())
}

/// Bytes a HEIC decode may hold per pixel at its peak: the RGBA canvas, a second one while it
/// is rotated or turned to sRGB, and a coded picture's 16-bit YUV frame with its filtered copy.
const HEIC_BYTES_PER_PIXEL: u64 = 12;

/// Decodes the primary image of a HEIC photo, upright, in sRGB.
fn decode_heic(bytes: &[u8], limits: &ParseLimits) -> Result<DynamicImage, Refusal> {
    use heifer::heifer_isobmff::HeifFile;
    let file = HeifFile::parse(bytes).map_err(|_| Refusal::Unreadable)?;
    // Everything the decode would decode (the primary image, its tiles, its alpha plane),
    // checked before any of it is: pixels, tiles, and memory within the other photos' limit.
    let mut pixels = heic_item_pixels(&file, file.primary_id, limits)?;
    for aux in file.referencing_items(file.primary_id, b"auxl") {
        pixels += heic_item_pixels(&file, aux, limits)?;
    }
    if pixels.saturating_mul(HEIC_BYTES_PER_PIXEL) > MAX_ALLOC {
        return Err(Refusal::TooComplex);
    }
    let options = heifer::Options {
        // Grid tiles in parallel, a few at a time: each holds its frame.
        max_threads: 2,
        max_pixels: limits.image_max_pixels,
    };
    let image = match heifer::decode_srgb_rgba8(bytes, &options) {
        // A colour space heifer cannot convert to sRGB: the samples as coded.
        Err(heifer::Error::Unsupported(_)) => heifer::decode_rgba8(bytes, &options),
        decoded => decoded,
    }
    .map_err(|_| Refusal::Unreadable)?;
    if image.width == 0 || image.height == 0 {
        return Err(Refusal::Unreadable);
    }
    // Kept as RGBA, without a copy: what is sent is scaled down first.
    image::RgbaImage::from_raw(image.width, image.height, image.data)
        .map(DynamicImage::ImageRgba8)
        .ok_or(Refusal::Unreadable)
}

/// The pixels decoding image item `id` would decode, once its shape is checked: a coded
/// picture (`hvc1`), or a grid of distinct coded tiles of one size that covers its output
/// without a spare row or column. Derived images inside derived images, overlays and other
/// kinds are not read.
fn heic_item_pixels(
    file: &heifer::heifer_isobmff::HeifFile<'_>,
    id: u32,
    limits: &ParseLimits,
) -> Result<u64, Refusal> {
    let unreadable = |_| Refusal::Unreadable;
    let (width, height) = file
        .image_size(id)
        .map_err(unreadable)?
        .ok_or(Refusal::Unreadable)?;
    check_size(width, height, limits)?;
    if u64::from(width) * u64::from(height) * HEIC_BYTES_PER_PIXEL > MAX_ALLOC {
        return Err(Refusal::TooComplex);
    }
    match &file.item(id).map_err(unreadable)?.item_type.0 {
        b"hvc1" => {
            check_coded(file, id, width, height)?;
            Ok(u64::from(width) * u64::from(height))
        }
        b"grid" => {
            let grid = file.grid(id).map_err(unreadable)?;
            check_size(grid.output_width, grid.output_height, limits)?;
            let (rows, columns) = (u32::from(grid.rows), u32::from(grid.columns));
            if rows * columns > MAX_TILES {
                return Err(Refusal::TooComplex);
            }
            let tiles = file.referenced_items(id, b"dimg");
            let mut distinct = tiles.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            if tiles.len() as u32 != rows * columns || distinct.len() != tiles.len() {
                return Err(Refusal::Unreadable);
            }
            let mut size = None;
            for &tile in tiles {
                if file.item(tile).map_err(unreadable)?.item_type.0 != *b"hvc1" {
                    return Err(Refusal::Unreadable);
                }
                let (w, h) = file
                    .image_size(tile)
                    .map_err(unreadable)?
                    .ok_or(Refusal::Unreadable)?;
                if *size.get_or_insert((w, h)) != (w, h) {
                    return Err(Refusal::Unreadable);
                }
                check_coded(file, tile, w, h)?;
            }
            let (w, h) = size.ok_or(Refusal::Unreadable)?;
            let covers = |tile: u32, count: u32, output: u32| {
                u64::from(tile) * u64::from(count) >= u64::from(output)
                    && u64::from(tile) * u64::from(count - 1) < u64::from(output)
            };
            if !covers(w, columns, grid.output_width) || !covers(h, rows, grid.output_height) {
                return Err(Refusal::Unreadable);
            }
            Ok(u64::from(w) * u64::from(h) * u64::from(rows * columns))
        }
        _ => Err(Refusal::Unreadable),
    }
}

/// A coded picture's parameter sets (in its `hvcC`) may declare no larger picture than its
/// `ispe`, bar the padding to whole coding blocks.
fn check_coded(
    file: &heifer::heifer_isobmff::HeifFile<'_>,
    id: u32,
    width: u32,
    height: u32,
) -> Result<(), Refusal> {
    use heifer::heifer_hevc_dec::nal::NalUnit;
    use heifer::heifer_hevc_dec::params::ParameterSets;
    let config = file
        .hevc_config(id)
        .map_err(|_| Refusal::Unreadable)?
        .ok_or(Refusal::Unreadable)?;
    let mut sets = ParameterSets::default();
    for nal in &config.nal_units {
        let nal = NalUnit::parse(nal).map_err(|_| Refusal::Unreadable)?;
        sets.add(&nal).map_err(|_| Refusal::Unreadable)?;
    }
    let mut declared = sets.sps.iter().flatten().peekable();
    if declared.peek().is_none() {
        return Err(Refusal::Unreadable);
    }
    if declared.any(|sps| {
        sps.pic_width_in_luma_samples > width.saturating_add(64)
            || sps.pic_height_in_luma_samples > height.saturating_add(64)
    }) {
        return Err(Refusal::TooComplex);
    }
    Ok(())
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

#[cfg(test)]
mod heic {
    use super::*;
    use crate::processor::{Sniffed, sniff};

    /// A HEIC photo stored as an iPhone stores one: a grid of 512 x 512 tiles (heifer's own
    /// encoder; the integration tests use files made by libheif's heif-enc).
    fn grid_heic(width: u32, height: u32) -> Vec<u8> {
        let rgba: Vec<u8> = (0..width * height)
            .flat_map(|i| [200, (i % 251) as u8, 40, 255])
            .collect();
        let options = heifer::EncodeOptions {
            quality: 50,
            max_threads: 1,
        };
        heifer::encode_rgba8(width, height, &rgba, &options).unwrap()
    }

    #[test]
    fn a_grid_photo_decodes_to_its_size_and_a_damaged_one_is_unreadable() {
        let heic = grid_heic(1100, 700);
        assert_eq!(sniff(&heic), Sniffed::Accepted(MediaType::Heic));
        let image = decode(&heic, MediaType::Heic, &ParseLimits::default()).unwrap();
        assert_eq!((image.width(), image.height()), (1100, 700));
        let pixel = image.to_rgb8().get_pixel(10, 10).0;
        assert!(pixel[0] > 150 && pixel[2] < 100, "{pixel:?}");
        for damaged in [
            &heic[..heic.len() / 2],
            &heic[..200],
            &b"\0\0\0\x10ftypheic\0\0\0\0"[..],
        ] {
            assert_eq!(
                decode(damaged, MediaType::Heic, &ParseLimits::default()).err(),
                Some(Refusal::Unreadable)
            );
        }
    }

    #[test]
    fn a_photo_over_the_limits_is_too_complex_before_any_tile_is_decoded() {
        let mut heic = grid_heic(1024, 1024);
        let tight = ParseLimits {
            image_max_pixels: 1_000_000,
            ..ParseLimits::default()
        };
        assert_eq!(
            decode(&heic, MediaType::Heic, &tight).err(),
            Some(Refusal::TooComplex)
        );
        // The grid's descriptor (version 0, 16-bit sizes, rows - 1, columns - 1, 1024, 1024)
        // now claims 256 x 256 tiles.
        let at = heic
            .windows(8)
            .position(|w| w == [0, 0, 1, 1, 4, 0, 4, 0])
            .expect("the grid descriptor");
        heic[at + 2] = 255;
        heic[at + 3] = 255;
        assert_eq!(
            decode(&heic, MediaType::Heic, &ParseLimits::default()).err(),
            Some(Refusal::TooComplex)
        );
    }

    #[test]
    fn a_declared_size_past_the_memory_limit_or_a_picture_past_its_ispe_is_too_complex() {
        let grid = grid_heic(1024, 1024);
        let off = ParseLimits {
            heic: false,
            ..ParseLimits::default()
        };
        assert_eq!(
            decode(&grid, MediaType::Heic, &off).err(),
            Some(Refusal::Unsupported),
            "switched off after the job was admitted"
        );
        // The grid's ispe and output claim 8,000 x 8,000: within the pixel limits, but not
        // within the memory a decode may take.
        let mut large = grid.clone();
        let ispe = large
            .windows(16)
            .position(|w| w[..4] == *b"ispe" && w[8..] == [0, 0, 4, 0, 0, 0, 4, 0])
            .expect("the grid's ispe");
        large[ispe + 8..ispe + 16].copy_from_slice(&[0, 0, 0x1f, 0x40, 0, 0, 0x1f, 0x40]);
        let at = large
            .windows(8)
            .position(|w| w == [0, 0, 1, 1, 4, 0, 4, 0])
            .expect("the grid descriptor");
        large[at + 4..at + 8].copy_from_slice(&[0x1f, 0x40, 0x1f, 0x40]);
        assert_eq!(
            decode(&large, MediaType::Heic, &ParseLimits::default()).err(),
            Some(Refusal::TooComplex)
        );
        // One picture whose ispe says 64 x 64 while its parameter sets say 300 x 200.
        let mut small = grid_heic(300, 200);
        let at = small
            .windows(4)
            .position(|w| w == b"ispe")
            .expect("an ispe");
        small[at + 8..at + 16].copy_from_slice(&[0, 0, 0, 64, 0, 0, 0, 64]);
        assert_eq!(
            decode(&small, MediaType::Heic, &ParseLimits::default()).err(),
            Some(Refusal::TooComplex)
        );
        // The same tile twice in a 2 x 2 grid: not read.
        let mut repeated = grid.clone();
        let dimg = repeated
            .windows(4)
            .position(|w| w == b"dimg")
            .expect("the grid's tiles");
        // dimg: from_item_ID, reference_count, then the tiles' ids (16-bit in a version 0 iref).
        let first = [repeated[dimg + 8], repeated[dimg + 9]];
        repeated[dimg + 10..dimg + 12].copy_from_slice(&first);
        assert_eq!(
            decode(&repeated, MediaType::Heic, &ParseLimits::default()).err(),
            Some(Refusal::Unreadable)
        );
    }
}
