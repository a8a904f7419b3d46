//! The tolerant reader: hayro-syntax reads what lopdf refuses (a cross-reference table that is
//! missing, damaged or points to the wrong offsets, bytes before the header, an unusual stream
//! filter), and the objects that the document's catalog reaches are copied into an lopdf
//! [`Document`], so that counting pages, extracting text and re-serialising for Claude work
//! the same on every PDF. Objects nothing reaches are left behind; so is the original
//! trailer.
//!
//! Streams are copied as they are (images are never decoded), except the few non-image
//! streams whose filter lopdf cannot decode: those are decoded here and stored plain, and
//! their size counts against the inflation cap like any other.
//!
//! The choice and the corpus results are in `docs/adr/0005-tolerant-pdf-reading.md`.

use std::collections::{BTreeMap, HashSet, VecDeque};

use hayro_syntax::object::{self as h, MaybeRef, ObjectIdentifier};
use lopdf::{Dictionary, Document, Object, Stream};

use super::super::{ParseLimits, Refusal};

/// The filters lopdf 0.42 decodes (`Stream::decompressed_content`).
const LOPDF_FILTERS: [&[u8]; 3] = [b"FlateDecode", b"LZWDecode", b"ASCII85Decode"];
/// Image codecs: never decoded, whatever stream carries them (a thumbnail has no /Subtype).
const IMAGE_FILTERS: [&[u8]; 6] = [
    b"DCTDecode",
    b"JPXDecode",
    b"JBIG2Decode",
    b"CCITTFaxDecode",
    b"DCT",
    b"CCF",
];

/// Reads `bytes` with hayro-syntax and copies what the catalog reaches into a new document.
pub fn read(bytes: &[u8], limits: &ParseLimits) -> Result<Document, Refusal> {
    // A damaged encrypted file: its trailer may be lost, and its streams would read as noise,
    // so it is refused as encrypted (what the patient can act on), never read as garbage.
    if memchr::memmem::find(bytes, b"/Encrypt").is_some() {
        return Err(Refusal::Encrypted);
    }
    let pdf = match hayro_syntax::Pdf::new(bytes.to_vec()) {
        Ok(pdf) => pdf,
        Err(hayro_syntax::LoadPdfError::Decryption(_)) => return Err(Refusal::Encrypted),
        Err(_) => return Err(Refusal::Unreadable),
    };
    let mut copy = Copy {
        limits,
        references: Vec::new(),
        decoded_bytes: 0,
    };
    let xref = pdf.xref();
    let root = xref.root_id();
    let mut queue = VecDeque::from([root]);
    let mut seen = HashSet::from([root]);
    let mut objects = BTreeMap::new();
    while let Some(id) = queue.pop_front() {
        if objects.len() as u64 >= limits.pdf_max_objects {
            return Err(Refusal::TooComplex);
        }
        // A reference to an object that is not there reads as null, as the standard says.
        let object = xref
            .get::<h::Object<'_>>(id)
            .unwrap_or(h::Object::Null(h::Null));
        let object = copy.object(object, 0)?;
        for reference in copy.references.drain(..) {
            let id = ObjectIdentifier::from(reference);
            if seen.insert(id) {
                queue.push_back(id);
            }
        }
        objects.insert(lopdf_id(id.obj_number, id.gen_number)?, object);
    }
    let mut doc = Document::with_version("1.7");
    doc.max_id = objects.keys().map(|(number, _)| *number).max().unwrap_or(0);
    doc.objects = objects;
    doc.trailer.set(
        "Root",
        Object::Reference(lopdf_id(root.obj_number, root.gen_number)?),
    );
    Ok(doc)
}

/// Whether lopdf would fail to decode one of this document's non-image streams.
pub fn needs_decoding(doc: &Document) -> bool {
    doc.objects.values().any(|object| match object {
        Object::Stream(stream) => !copied_as_is(&stream.dict),
        _ => false,
    })
}

struct Copy<'l> {
    limits: &'l ParseLimits,
    /// References met in the object being copied, to visit next.
    references: Vec<h::ObjRef>,
    /// Bytes of the streams decoded here.
    decoded_bytes: u64,
}

impl Copy<'_> {
    fn object(&mut self, object: h::Object<'_>, depth: u32) -> Result<Object, Refusal> {
        if depth > self.limits.pdf_max_depth {
            return Err(Refusal::TooComplex);
        }
        Ok(match object {
            h::Object::Null(_) => Object::Null,
            h::Object::Boolean(b) => Object::Boolean(b),
            h::Object::Number(n) => {
                let (integer, real) = (n.as_i64(), n.as_f64());
                if integer as f64 == real {
                    Object::Integer(integer)
                } else {
                    Object::Real(real as f32)
                }
            }
            h::Object::String(s) => {
                Object::String(s.as_bytes().to_vec(), lopdf::StringFormat::Literal)
            }
            h::Object::Name(n) => Object::Name(n.to_vec()),
            h::Object::Dict(d) => Object::Dictionary(self.dictionary(&d, depth)?),
            h::Object::Array(a) => {
                let mut items = Vec::new();
                for item in a.raw_iter() {
                    items.push(self.entry(item, depth + 1)?);
                }
                Object::Array(items)
            }
            h::Object::Stream(s) => Object::Stream(self.stream(&s, depth)?),
        })
    }

    fn entry(&mut self, entry: MaybeRef<h::Object<'_>>, depth: u32) -> Result<Object, Refusal> {
        match entry {
            MaybeRef::Ref(reference) => {
                self.references.push(reference);
                Ok(Object::Reference(lopdf_id(
                    reference.obj_number,
                    reference.gen_number,
                )?))
            }
            MaybeRef::NotRef(object) => self.object(object, depth),
        }
    }

    fn dictionary(&mut self, dict: &h::Dict<'_>, depth: u32) -> Result<Dictionary, Refusal> {
        let mut out = Dictionary::new();
        for (key, value) in dict.entries() {
            out.set(key.to_vec(), self.entry(value, depth + 1)?);
        }
        Ok(out)
    }

    fn stream(&mut self, stream: &h::Stream<'_>, depth: u32) -> Result<Stream, Refusal> {
        let mut dict = self.dictionary(stream.dict(), depth)?;
        // `Stream::new` sets /Length to what was found, whatever the file claimed.
        let as_is = |dict| Stream::new(dict, stream.raw_data().to_vec()).with_compression(false);
        if copied_as_is(&dict) {
            return Ok(as_is(dict));
        }
        // Measured within what is left of the cap before hayro-syntax decodes it whole.
        let left = self
            .limits
            .pdf_max_inflated_bytes
            .saturating_sub(self.decoded_bytes);
        let raw = Stream::new(dict.clone(), stream.raw_data().to_vec()).with_compression(false);
        if super::decoded::decoded_len(&raw, left).is_ok_and(|len| len > left) {
            return Err(Refusal::TooComplex);
        }
        // A stream that does not decode is kept as it is: reading its page fails, not the file.
        let Ok(decoded) = stream.decoded() else {
            return Ok(as_is(dict));
        };
        self.decoded_bytes += decoded.len() as u64;
        if self.decoded_bytes > self.limits.pdf_max_inflated_bytes {
            return Err(Refusal::TooComplex);
        }
        dict.remove(b"Filter");
        dict.remove(b"DecodeParms");
        Ok(Stream::new(dict, decoded.into_owned()).with_compression(false))
    }
}

/// Whether a stream is copied without decoding: an image, an image codec, or filters that
/// lopdf decodes itself (no filter at all included).
fn copied_as_is(dict: &Dictionary) -> bool {
    let image = dict
        .get(b"Subtype")
        .and_then(Object::as_name)
        .is_ok_and(|s| s == b"Image");
    let filters: Vec<&[u8]> = match dict.get(b"Filter") {
        Err(_) | Ok(Object::Null) => vec![],
        Ok(Object::Name(name)) => vec![name.as_slice()],
        Ok(Object::Array(names)) => names.iter().filter_map(|n| n.as_name().ok()).collect(),
        // A reference or anything else: lopdf would not follow it, nor do we.
        Ok(_) => return true,
    };
    image
        || filters.iter().any(|f| IMAGE_FILTERS.contains(f))
        || filters.iter().all(|f| LOPDF_FILTERS.contains(f))
}

fn lopdf_id(number: u32, generation: i32) -> Result<lopdf::ObjectId, Refusal> {
    let generation = u16::try_from(generation).map_err(|_| Refusal::Unreadable)?;
    Ok((number, generation))
}
