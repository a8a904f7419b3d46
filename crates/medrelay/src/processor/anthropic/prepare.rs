//! What Claude is sent, made in the sandbox child: a PDF split into parts of at most 100 pages
//! whose base64 fits a request; a photo decoded within pixel limits, turned upright from its
//! EXIF orientation (a HEIC photo from its `irot`/`imir`), scaled to at most 1568 px on the
//! long edge, and re-encoded as JPEG (re-encoding drops every metadata block: EXIF, GPS, XMP).

use std::io::Cursor;

use image::DynamicImage;

use super::MAX_PDF_PAGES;
use crate::processor::sandbox::Part;
use crate::processor::{Document, MediaType, ParseLimits, ProcessError, Refusal, pdf, photo};

/// The parts of a document to send, in order, with their bytes.
pub fn prepare(
    document: &Document,
    limits: &ParseLimits,
) -> Result<Vec<(Part, Vec<u8>)>, ProcessError> {
    match document.media_type {
        MediaType::Pdf => Ok(split_pdf(&document.bytes, limits)?
            .into_iter()
            .map(|(pdf, pages)| (Part::Pdf { pages }, pdf))
            .collect()),
        MediaType::Jpeg | MediaType::Png | MediaType::Webp | MediaType::Heic => {
            let photo = prepare_photo(&document.bytes, document.media_type, limits)?;
            let part = Part::Jpeg {
                width: photo.width,
                height: photo.height,
            };
            Ok(vec![(part, photo.jpeg)])
        }
    }
}

/// Claude gains nothing from a longer edge and downscales anything above it.
pub const MAX_EDGE: u32 = 1568;
/// The per-image limit is 5 MB measured on the base64 text.
pub const MAX_BASE64_BYTES: usize = 5 * 1024 * 1024;

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

/// Decodes, orients, scales and re-encodes a photo.
pub fn prepare_photo(
    bytes: &[u8],
    media_type: MediaType,
    limits: &ParseLimits,
) -> Result<Prepared, ProcessError> {
    let unreadable = || ProcessError::Abort(Refusal::Unreadable);
    let decoded = std::panic::catch_unwind(|| photo::decode(bytes, media_type, limits));
    let image = match decoded {
        Ok(Ok(image)) => image,
        Ok(Err(refusal)) => return Err(ProcessError::Abort(refusal)),
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

/// The base64 of one PDF part must leave room in the 32 MB request for the prompt and schema.
pub const MAX_PDF_BASE64: usize = 30 * 1024 * 1024;

fn base64_len(len: usize) -> usize {
    len.div_ceil(3) * 4
}

/// Splits a PDF into parts of at most 100 pages whose base64 fits a request, in order, with
/// each part's page count. Every part, a PDF within both limits too, is written anew from the
/// parsed document, scrubbed of everything active or attached.
pub fn split_pdf(bytes: &[u8], limits: &ParseLimits) -> Result<Vec<(Vec<u8>, u32)>, ProcessError> {
    let mut doc = pdf::open(bytes, limits).map_err(ProcessError::Abort)?;
    // `open` refuses a document without pages.
    let pages: Vec<u32> = doc.get_pages().keys().copied().collect();
    // Only the parsed document leaves, never the uploaded bytes: no script, action, attached
    // file or form program, and nothing that was appended outside the PDF's structure. The
    // whole document is written only when it may fit one part.
    let one_part = pages.len() <= MAX_PDF_PAGES;
    let scrubbed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        scrub_document(&mut doc);
        let mut out = Vec::new();
        one_part
            .then(|| doc.save_to(&mut out).map(|_| out))
            .transpose()
    }));
    let whole = match scrubbed {
        Ok(Ok(whole)) => whole,
        _ => return Err(ProcessError::Abort(Refusal::Unreadable)),
    };
    if let Some(whole) = whole
        && base64_len(whole.len()) <= MAX_PDF_BASE64
    {
        return Ok(vec![(whole, pages.len() as u32)]);
    }
    let mut parts = Vec::new();
    for chunk in pages.chunks(MAX_PDF_PAGES) {
        split_part(&doc, &pages, chunk, &mut parts)?;
    }
    Ok(parts)
}

/// Keys that hold something active or attached: scripts (`JS`, the `JavaScript` name tree),
/// actions (`OpenAction`, additional actions `AA`), attached files (the `EmbeddedFiles` name
/// tree, a file attachment's `FS`) and XFA form programs. None is needed to read the pages.
const ACTIVE_KEYS: [&[u8]; 7] = [
    b"OpenAction",
    b"AA",
    b"JS",
    b"JavaScript",
    b"EmbeddedFiles",
    b"FS",
    b"XFA",
];

/// Removes everything active or attached from a parsed document; what is no longer referenced
/// is dropped when it is saved.
fn scrub_document(doc: &mut lopdf::Document) {
    for object in doc.objects.values_mut() {
        scrub(object);
    }
    scrub_dictionary(&mut doc.trailer);
    doc.prune_objects();
}

fn scrub(object: &mut lopdf::Object) {
    match object {
        lopdf::Object::Dictionary(dict) => scrub_dictionary(dict),
        lopdf::Object::Stream(stream) => scrub_dictionary(&mut stream.dict),
        lopdf::Object::Array(items) => items.iter_mut().for_each(scrub),
        _ => {}
    }
}

fn scrub_dictionary(dict: &mut lopdf::Dictionary) {
    for key in ACTIVE_KEYS {
        dict.remove(key);
    }
    // An action (`A`: a link's, an outline item's, a form field's): inline with a type `S`,
    // or a reference to one.
    let is_action = match dict.get(b"A") {
        Ok(lopdf::Object::Dictionary(action)) => action.has(b"S"),
        Ok(lopdf::Object::Reference(_)) => true,
        _ => false,
    };
    if is_action {
        dict.remove(b"A");
    }
    for (_, value) in dict.iter_mut() {
        scrub(value);
    }
}

/// Builds the part holding `keep`; halves it until its base64 fits a request.
fn split_part(
    doc: &lopdf::Document,
    pages: &[u32],
    keep: &[u32],
    parts: &mut Vec<(Vec<u8>, u32)>,
) -> Result<(), ProcessError> {
    let wanted: std::collections::HashSet<u32> = keep.iter().copied().collect();
    let drop_pages: Vec<u32> = pages
        .iter()
        .copied()
        .filter(|p| !wanted.contains(p))
        .collect();
    let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut part = doc.clone();
        part.delete_pages(&drop_pages);
        part.prune_objects();
        let mut out = Vec::new();
        part.save_to(&mut out).map(|_| out)
    }));
    let part = match built {
        Ok(Ok(part)) => part,
        _ => return Err(ProcessError::Abort(Refusal::Unreadable)),
    };
    if base64_len(part.len()) <= MAX_PDF_BASE64 {
        parts.push((part, keep.len() as u32));
        return Ok(());
    }
    if keep.len() == 1 {
        // One page larger than a whole request: nothing smaller can be sent.
        return Err(ProcessError::Abort(Refusal::TooComplex));
    }
    let (first, second) = keep.split_at(keep.len() / 2);
    split_part(doc, pages, first, parts)?;
    split_part(doc, pages, second, parts)
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
        let prepared =
            prepare_photo(png.get_ref(), MediaType::Png, &ParseLimits::default()).unwrap();
        assert_eq!((prepared.width, prepared.height), (1568, 1045));
        assert!(prepared.jpeg.starts_with(&[0xff, 0xd8, 0xff]));
        let decoded = image::load_from_memory(&prepared.jpeg).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (1568, 1045));
    }

    #[test]
    fn a_pixel_flood_is_refused_before_decoding() {
        let png = crate::processor::photo::tests::pixel_flood_png();
        let started = std::time::Instant::now();
        // Over the pixel limits: too complex (a limit), not damaged.
        assert!(matches!(
            prepare_photo(&png, MediaType::Png, &ParseLimits::default()),
            Err(ProcessError::Abort(Refusal::TooComplex))
        ));
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
    }
}
