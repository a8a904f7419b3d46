//! Opening a PDF within limits, in the sandbox child: the parse itself (lopdf first, the
//! tolerant reader when lopdf refuses the file; panics contained), then the document's size
//! checked against [`ParseLimits`] before any work: pages, objects, nesting depth, and the
//! bytes its streams inflate to. Image streams are never inflated (reading text, counting pages
//! and re-serialising copy them as they are), so a large scan passes where a bomb of the same
//! size does not.

mod decoded;
mod tolerant;

use std::panic::{AssertUnwindSafe, catch_unwind};

use lopdf::{Document, Object};

use super::{ParseLimits, Refusal};

/// Parses `bytes` and checks it against `limits`.
pub fn open(bytes: &[u8], limits: &ParseLimits) -> Result<Document, Refusal> {
    let tolerant =
        || catch_unwind(|| tolerant::read(bytes, limits)).unwrap_or(Err(Refusal::Unreadable));
    let cap = limits.pdf_max_inflated_bytes;
    let (doc, streams) = match strict(bytes, cap) {
        Ok(doc) => {
            let streams = inflated(&doc, cap);
            let partly = read_partly(&doc);
            if partly || streams.damaged > 0 {
                // lopdf dropped objects or read streams wrongly (a /Length that lied, say):
                // the tolerant reader finds where each stream really ends. Unless it does
                // better, lopdf's reading stands.
                match tolerant().map(|t| {
                    let s = inflated(&t, cap);
                    (t, s)
                }) {
                    Ok((t, s)) if partly || s.damaged < streams.damaged => (t, s),
                    _ => (doc, streams),
                }
            } else {
                (doc, streams)
            }
        }
        Err(Refusal::Unreadable) => {
            let doc = tolerant()?;
            let streams = inflated(&doc, cap);
            (doc, streams)
        }
        Err(refusal) => return Err(refusal),
    };
    if streams.bytes > cap {
        return Err(Refusal::TooComplex);
    }
    checked(doc, limits)
}

/// lopdf's reading: fast and exact on well-formed files; `Unreadable` for anything it cannot
/// read whole (its page tree included), or whose streams it could not decode; `TooComplex`
/// when the object streams it inflates while loading would inflate past `cap`.
fn strict(bytes: &[u8], cap: u64) -> Result<Document, Refusal> {
    let doc = match catch_unwind(|| decoded::load_guard::load(bytes, cap)) {
        Ok(Ok(Some(doc))) => doc,
        Ok(Ok(None)) => return Err(Refusal::TooComplex),
        Ok(Err(lopdf::Error::Decryption(_) | lopdf::Error::InvalidPassword)) => {
            return Err(Refusal::Encrypted);
        }
        _ => return Err(Refusal::Unreadable),
    };
    // A document that still carries /Encrypt after loading needs a password we do not have.
    // (Owner-password-only files open with the empty user password and are readable.)
    if doc.is_encrypted() {
        return Err(Refusal::Encrypted);
    }
    let pages = catch_unwind(AssertUnwindSafe(|| doc.get_pages().len())).unwrap_or(0);
    if pages == 0 || tolerant::needs_decoding(&doc) {
        return Err(Refusal::Unreadable);
    }
    Ok(doc)
}

/// Whether lopdf skipped what it could not parse: an object the xref lists is missing, or a
/// stream was read as a bare dictionary (it still carries the stream's /Length).
fn read_partly(doc: &Document) -> bool {
    use lopdf::xref::XrefEntry;
    let present: std::collections::HashSet<u32> = doc.objects.keys().map(|(n, _)| *n).collect();
    let missing = doc.reference_table.entries.iter().any(|(number, entry)| {
        matches!(
            entry,
            XrefEntry::Normal { .. } | XrefEntry::Compressed { .. }
        ) && !present.contains(number)
    });
    missing
        || doc
            .objects
            .values()
            .any(|o| matches!(o, Object::Dictionary(d) if d.has(b"Length")))
}

fn checked(doc: Document, limits: &ParseLimits) -> Result<Document, Refusal> {
    if doc.objects.len() as u64 > limits.pdf_max_objects {
        return Err(Refusal::TooComplex);
    }
    let pages = catch_unwind(AssertUnwindSafe(|| doc.get_pages().len()))
        .map_err(|_| Refusal::Unreadable)?;
    if pages == 0 {
        return Err(Refusal::Unreadable);
    }
    if pages as u64 > u64::from(limits.pdf_max_pages) {
        return Err(Refusal::TooComplex);
    }
    if doc
        .objects
        .values()
        .any(|o| depth(o, limits.pdf_max_depth) > limits.pdf_max_depth)
    {
        return Err(Refusal::TooComplex);
    }
    Ok(doc)
}

/// How deep arrays and dictionaries nest in `object`, counted up to just past `max`.
fn depth(object: &Object, max: u32) -> u32 {
    let mut deepest = 0;
    let mut stack = vec![(object, 0u32)];
    while let Some((object, level)) = stack.pop() {
        deepest = deepest.max(level);
        if deepest > max {
            break;
        }
        match object {
            Object::Array(items) => stack.extend(items.iter().map(|i| (i, level + 1))),
            Object::Dictionary(dict) => stack.extend(dict.iter().map(|(_, v)| (v, level + 1))),
            Object::Stream(stream) => stack.extend(stream.dict.iter().map(|(_, v)| (v, level + 1))),
            _ => {}
        }
    }
    deepest
}

/// What the document's non-image streams inflate to.
struct Inflated {
    /// Bytes, counted up to just past the cap (inflated into a sink, never held).
    bytes: u64,
    /// Streams that failed to inflate: damaged, or read wrongly.
    damaged: usize,
}

/// Measures the non-image streams through their whole filter chain, up to just past `cap`
/// (decoded into a bounded sink, a middle stage of a chain held within the cap, never more).
fn inflated(doc: &Document, cap: u64) -> Inflated {
    let mut measured = Inflated {
        bytes: 0,
        damaged: 0,
    };
    for object in doc.objects.values() {
        let Object::Stream(stream) = object else {
            continue;
        };
        let is_image = stream
            .dict
            .get(b"Subtype")
            .and_then(Object::as_name)
            .is_ok_and(|s| s == b"Image");
        if is_image {
            measured.bytes += stream.content.len() as u64;
        } else {
            let left = cap.saturating_sub(measured.bytes);
            // A damaged stream counts what it decoded before the damage.
            measured.bytes += decoded::decoded_len(stream, left).unwrap_or_else(|partly| {
                measured.damaged += 1;
                partly
            });
        }
        if measured.bytes > cap {
            break;
        }
    }
    measured
}

#[cfg(test)]
mod tests {
    use lopdf::{Stream, dictionary};

    use super::*;

    /// A PDF of `pages` pages, each with a Flate content stream of `content_bytes` and an
    /// image of `image_bytes` (Flate too), its page dictionary nesting an array `nesting` deep.
    fn pdf(pages: usize, content_bytes: usize, image_bytes: usize, nesting: usize) -> Vec<u8> {
        let mut doc = Document::with_version("1.5");
        let pages_id = doc.new_object_id();
        let mut kids = Vec::new();
        for _ in 0..pages {
            // `1 w` (4 bytes) repeated: about `content_bytes` of drawing commands.
            let mut content = Stream::new(dictionary! {}, b"1 w\n".repeat(content_bytes / 4 + 1));
            content.compress().unwrap();
            let content = doc.add_object(content);
            let mut image = Stream::new(
                dictionary! {"Type" => "XObject", "Subtype" => "Image", "Width" => 1, "Height" => 1,
                "ColorSpace" => "DeviceGray", "BitsPerComponent" => 8},
                vec![0u8; image_bytes],
            );
            image.compress().unwrap();
            let image = doc.add_object(image);
            let mut nested = Object::Array(vec![]);
            for _ in 0..nesting {
                nested = Object::Array(vec![nested]);
            }
            let page = doc.add_object(dictionary! {
                "Type" => "Page", "Parent" => pages_id, "Contents" => content, "Nested" => nested,
                "Resources" => dictionary! {"XObject" => dictionary! {"Im0" => image}},
            });
            kids.push(page.into());
        }
        let count = kids.len() as i64;
        doc.objects.insert(
            pages_id,
            Object::Dictionary(
                dictionary! {"Type" => "Pages", "Kids" => kids, "Count" => count,
                "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()]},
            ),
        );
        let catalog = doc.add_object(dictionary! {"Type" => "Catalog", "Pages" => pages_id});
        doc.trailer.set("Root", catalog);
        let mut out = Vec::new();
        doc.save_to(&mut out).unwrap();
        out
    }

    fn limits() -> ParseLimits {
        ParseLimits {
            pdf_max_inflated_bytes: 100_000,
            pdf_max_pages: 10,
            pdf_max_objects: 100,
            pdf_max_depth: 20,
            image_max_pixels: 1_000_000,
            heic: true,
        }
    }

    #[test]
    fn a_document_within_every_limit_opens() {
        assert!(open(&pdf(3, 1_000, 1_000, 5), &limits()).is_ok());
    }

    #[test]
    fn too_many_pages_are_too_complex() {
        let limits = ParseLimits {
            pdf_max_pages: 2,
            ..limits()
        };
        assert_eq!(
            open(&pdf(3, 10, 10, 1), &limits).err(),
            Some(Refusal::TooComplex)
        );
    }

    #[test]
    fn too_many_objects_are_too_complex() {
        let limits = ParseLimits {
            pdf_max_objects: 8,
            ..limits()
        };
        assert_eq!(
            open(&pdf(3, 10, 10, 1), &limits).err(),
            Some(Refusal::TooComplex)
        );
    }

    #[test]
    fn nesting_deeper_than_allowed_is_too_complex() {
        assert_eq!(
            open(&pdf(1, 10, 10, 30), &limits()).err(),
            Some(Refusal::TooComplex)
        );
    }

    #[test]
    fn streams_inflating_past_the_cap_are_too_complex_but_images_never_count() {
        // 2 pages x 60 kB of content: over the 100 kB cap.
        assert_eq!(
            open(&pdf(2, 60_000, 10, 1), &limits()).err(),
            Some(Refusal::TooComplex)
        );
        // 2 pages x 5 MB of image: far over the cap, and fine: images are not inflated.
        assert!(open(&pdf(2, 1_000, 5_000_000, 1), &limits()).is_ok());
    }

    /// [`pdf`] with its objects in object streams (and its cross-reference in a stream), as
    /// modern writers save, one of them a string of `padding` spaces (so that its object
    /// stream inflates to more).
    fn modern_pdf(pages: usize, padding: usize) -> Vec<u8> {
        let mut doc = Document::load_mem(&pdf(pages, 10, 10, 1)).unwrap();
        let pad = doc.add_object(dictionary! {
            "Pad" => Object::string_literal(vec![b' '; padding]),
        });
        let root = doc.trailer.get(b"Root").unwrap().as_reference().unwrap();
        doc.get_dictionary_mut(root).unwrap().set("Pad", pad);
        let mut out = Vec::new();
        doc.save_modern(&mut out).unwrap();
        out
    }

    #[test]
    fn object_streams_that_lopdf_inflates_while_loading_count_against_the_cap() {
        let modern = modern_pdf(3, 0);
        assert!(
            memchr::memmem::find(&modern, b"/ObjStm").is_some(),
            "the fixture has object streams"
        );
        assert!(open(&modern, &limits()).is_ok());
        // 1 MB of spaces in an object stream: over the 100 kB cap before lopdf inflates it.
        let padded = modern_pdf(3, 1_000_000);
        assert!(matches!(
            decoded::load_guard::load(&padded, 100_000),
            Ok(None)
        ));
        assert!(matches!(
            decoded::load_guard::load(&padded, 2_000_000),
            Ok(Some(_))
        ));
        assert_eq!(open(&padded, &limits()).err(), Some(Refusal::TooComplex));
        let generous = ParseLimits {
            pdf_max_inflated_bytes: 10_000_000,
            ..limits()
        };
        assert!(open(&padded, &generous).is_ok());
    }

    #[test]
    fn flate_inside_flate_counts_what_the_inner_layer_inflates_to() {
        let mut doc = Document::load_mem(&pdf(1, 10, 10, 1)).unwrap();
        for object in doc.objects.values_mut() {
            if let Object::Stream(stream) = object
                && !stream.dict.has(b"Subtype")
            {
                // 1 MB of drawing commands, compressed twice: a few kB in the file.
                stream.set_plain_content(b"1 w\n".repeat(250_000));
                stream.compress().unwrap();
                let once = stream.content.clone();
                let mut twice = Stream::new(dictionary! {}, once);
                twice.compress().unwrap();
                stream.set_content(twice.content);
                stream.dict.set(
                    "Filter",
                    vec![Object::from("FlateDecode"), Object::from("FlateDecode")],
                );
            }
        }
        let mut out = Vec::new();
        doc.save_to(&mut out).unwrap();
        assert!(out.len() < 20_000, "{} bytes", out.len());
        assert_eq!(open(&out, &limits()).err(), Some(Refusal::TooComplex));
    }

    #[test]
    fn garbage_is_unreadable_and_a_password_is_encrypted() {
        assert_eq!(
            open(b"%PDF-1.7\ngarbage", &limits()).err(),
            Some(Refusal::Unreadable)
        );
    }
}
