//! Fixtures: the real PDFs of `shared/corpus/pdf-real`, and documents made here (photos,
//! PDFs with chosen text, pages or weight). Generators only; no assertions.

use std::path::{Path, PathBuf};

/// The corpus of real PDFs, relative to this crate.
const CORPUS: &str = "../../../shared/corpus/pdf-real";

pub fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(CORPUS)
}

/// One PDF of the corpus, as `manifest.json` describes it.
pub struct CorpusPdf {
    pub file: String,
    pub pages: u64,
    pub encrypted: bool,
}

/// Every PDF of the corpus, in the manifest's order.
pub fn corpus_manifest() -> Vec<CorpusPdf> {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(corpus_dir().join("manifest.json")).unwrap())
            .unwrap();
    manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| CorpusPdf {
            file: e["file"].as_str().unwrap().to_owned(),
            pages: e["pages"].as_u64().unwrap(),
            encrypted: e["encrypted"] == true,
        })
        .collect()
}

pub fn corpus_file(name: &str) -> Vec<u8> {
    let path = corpus_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A minimal valid PNG of `w` x `h` pixels (grey, uncompressed deflate blocks).
pub fn png(w: u32, h: u32) -> Vec<u8> {
    use std::io::Cursor;
    let img = image::GrayImage::from_pixel(w, h, image::Luma([128]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encoding a PNG");
    out.into_inner()
}

pub fn jpeg(w: u32, h: u32) -> Vec<u8> {
    use std::io::Cursor;
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([200, 120, 40]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg)
        .expect("encoding a JPEG");
    out.into_inner()
}

pub fn webp(w: u32, h: u32) -> Vec<u8> {
    use std::io::Cursor;
    let img = image::RgbaImage::from_pixel(w, h, image::Rgba([10, 200, 40, 255]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::WebP)
        .expect("encoding a WebP");
    out.into_inner()
}

/// A one-page PDF whose text is `lines`, built with lopdf (Helvetica, Flate-compressed).
pub fn text_pdf(lines: &[&str]) -> Vec<u8> {
    text_pdf_encoded(lines, ContentFilter::Flate)
}

/// How the page's content stream of [`text_pdf_encoded`] is encoded.
#[derive(Clone, Copy, Debug)]
pub enum ContentFilter {
    Flate,
    /// `/ASCIIHexDecode`: legal, rare, and not decoded by lopdf.
    AsciiHex,
    /// `/RunLengthDecode` (literal runs only): legal, rare, and not decoded by lopdf.
    RunLength,
    /// `/ASCII85Decode` without its `~>` end marker: read, with a warning from the library.
    Ascii85WithoutEnd,
}

/// [`text_pdf`] with its content stream encoded by `filter`.
pub fn text_pdf_encoded(lines: &[&str], filter: ContentFilter) -> Vec<u8> {
    use lopdf::content::{Content, Operation};
    use lopdf::{Document, Object, Stream, dictionary};
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica",
    });
    let resources_id = doc.add_object(dictionary! {
        "Font" => dictionary! { "F1" => font_id },
    });
    let mut operations = vec![
        Operation::new("BT", vec![]),
        Operation::new("Tf", vec!["F1".into(), 12.into()]),
        Operation::new("Td", vec![50.into(), 750.into()]),
        Operation::new("TL", vec![16.into()]),
    ];
    for line in lines {
        operations.push(Operation::new("Tj", vec![Object::string_literal(*line)]));
        operations.push(Operation::new("T*", vec![]));
    }
    operations.push(Operation::new("ET", vec![]));
    let content = Content { operations }.encode().unwrap();
    let stream = match filter {
        ContentFilter::Flate => {
            let mut stream = Stream::new(dictionary! {}, content);
            stream.compress().expect("flate compression");
            stream
        }
        ContentFilter::AsciiHex => {
            let mut hex: Vec<u8> = content
                .iter()
                .flat_map(|b| format!("{b:02X}").into_bytes())
                .collect();
            hex.push(b'>');
            Stream::new(dictionary! {"Filter" => "ASCIIHexDecode"}, hex)
        }
        ContentFilter::Ascii85WithoutEnd => {
            let mut encoded = Vec::new();
            for group in content.chunks(4) {
                let mut word = [0u8; 4];
                word[..group.len()].copy_from_slice(group);
                let mut value = u32::from_be_bytes(word);
                let mut digits = [0u8; 5];
                for digit in digits.iter_mut().rev() {
                    *digit = (value % 85) as u8 + b'!';
                    value /= 85;
                }
                encoded.extend_from_slice(&digits[..group.len() + 1]);
            }
            Stream::new(dictionary! {"Filter" => "ASCII85Decode"}, encoded)
        }
        ContentFilter::RunLength => {
            // Literal runs of 5 bytes, each after its length byte (n - 1), then EOD: read
            // undecoded, the length bytes would break every word.
            let mut runs = Vec::new();
            for chunk in content.chunks(5) {
                runs.push(chunk.len() as u8 - 1);
                runs.extend_from_slice(chunk);
            }
            runs.push(128);
            Stream::new(dictionary! {"Filter" => "RunLengthDecode"}, runs)
        }
    };
    let content_id = doc.add_object(stream.with_compression(false));
    let page_id = doc.add_object(dictionary! {
        "Type" => "Page", "Parent" => pages_id, "Contents" => content_id,
    });
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! {
            "Type" => "Pages", "Kids" => vec![page_id.into()], "Count" => 1,
            "Resources" => resources_id, "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
        }),
    );
    let catalog_id = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
    doc.trailer.set("Root", catalog_id);
    let mut out = Vec::new();
    doc.save_to(&mut out).expect("saving a PDF");
    out
}

/// A PDF with one page per entry of `pages`, each showing its text.
pub fn pages_pdf(pages: &[String]) -> Vec<u8> {
    use lopdf::content::{Content, Operation};
    use lopdf::{Document, Object, dictionary};
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica",
    });
    let resources_id = doc.add_object(dictionary! { "Font" => dictionary! { "F1" => font_id } });
    let mut kids = Vec::new();
    for text in pages {
        let content = Content {
            operations: vec![
                Operation::new("BT", vec![]),
                Operation::new("Tf", vec!["F1".into(), 12.into()]),
                Operation::new("Td", vec![50.into(), 750.into()]),
                Operation::new("Tj", vec![Object::string_literal(text.as_str())]),
                Operation::new("ET", vec![]),
            ],
        };
        let content_id = doc.add_object(lopdf::Stream::new(
            dictionary! {},
            content.encode().unwrap(),
        ));
        let page_id = doc.add_object(dictionary! {
            "Type" => "Page", "Parent" => pages_id, "Contents" => content_id,
        });
        kids.push(page_id.into());
    }
    let resources = dictionary! {"Resources" => resources_id};
    finish_pdf(doc, pages_id, kids, (595, 842), resources)
}

/// A PDF of `pages` pages, each carrying `bytes_per_page` of incompressible image-like data.
pub fn heavy_pdf(pages: usize, bytes_per_page: usize) -> Vec<u8> {
    use lopdf::{Document, Stream, dictionary};
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let mut kids = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..pages {
        let data: Vec<u8> = (0..bytes_per_page)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let image = doc.add_object(Stream::new(
            dictionary! {"Type" => "XObject", "Subtype" => "Image", "Width" => 1024, "Height" => (bytes_per_page / 1024) as i64,
                         "ColorSpace" => "DeviceGray", "BitsPerComponent" => 8},
            data,
        ));
        let content = doc.add_object(Stream::new(
            dictionary! {},
            b"q 595 0 0 842 0 0 cm /Im0 Do Q".to_vec(),
        ));
        let page = doc.add_object(dictionary! {
            "Type" => "Page", "Parent" => pages_id, "Contents" => content,
            "Resources" => dictionary! {"XObject" => dictionary! {"Im0" => image}},
        });
        kids.push(page.into());
    }
    finish_pdf(doc, pages_id, kids, (595, 842), lopdf::Dictionary::new())
}

/// A JPEG whose EXIF says "rotate 90° clockwise to display" (orientation 6), with a GPS-like
/// marker string inside the EXIF block.
pub fn jpeg_with_orientation_6(w: u32, h: u32) -> Vec<u8> {
    let plain = jpeg(w, h);
    let mut tiff = b"II\x2a\x00\x08\x00\x00\x00".to_vec();
    tiff.extend_from_slice(&[1, 0]); // one IFD entry
    tiff.extend_from_slice(&[0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0]); // Orientation = 6
    tiff.extend_from_slice(&[0, 0, 0, 0]); // no next IFD
    tiff.extend_from_slice(b"GPS-CANARY-48.8584N");
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let len = (app1.len() + 2) as u16;
    let mut out = plain[..2].to_vec();
    out.extend_from_slice(&[0xff, 0xe1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&plain[2..]);
    out
}

/// A PDF with one page and the given objects (numbered from 4), the page's content being
/// object 4; `catalog` and `page` add entries to those dictionaries. Built by hand, with a
/// correct cross-reference table: hostile shapes are not what PDF libraries write.
fn raw_pdf(objects: &[Vec<u8>], catalog: &str, page: &str) -> Vec<u8> {
    let mut all: Vec<Vec<u8>> = vec![
        format!("<< /Type /Catalog /Pages 2 0 R {catalog}>>").into_bytes(),
        // Six digits, so that a test can change the claim without moving any object.
        b"<< /Type /Pages /Kids [3 0 R] /Count 000001 >>".to_vec(),
        format!("<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R {page}>>")
            .into_bytes(),
    ];
    all.extend(objects.iter().cloned());
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in all.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(format!("xref\n0 {}\n0000000000 65535 f \n", all.len() + 1).as_bytes());
    for offset in offsets {
        out.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            all.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// A stream object with `data`; `dict` adds entries (a filter).
fn stream(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut out = format!("<< /Length {} {dict} >>\nstream\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\nendstream");
    out
}

/// A PDF whose page content is a Flate stream of about `inflated` bytes of drawing commands,
/// compressed to about a thousandth of that: it takes memory only when someone inflates it.
pub fn flate_bomb_pdf(inflated: u64) -> Vec<u8> {
    raw_pdf(
        &[stream("/Filter /FlateDecode", &repeated_zlib(inflated))],
        "",
        "",
    )
}

/// A PDF whose page content is Flate inside Flate: about `inflated` bytes of drawing
/// commands in a file of a few kilobytes (a million to one).
pub fn nested_flate_bomb_pdf(inflated: u64) -> Vec<u8> {
    let inner = repeated_zlib(inflated);
    let mut outer = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut outer, &inner).unwrap();
    let data = outer.finish().unwrap();
    raw_pdf(
        &[stream("/Filter [/FlateDecode /FlateDecode]", &data)],
        "",
        "",
    )
}

/// A readable one-page PDF that also holds an object stream (which lopdf inflates while it
/// loads, before anything else runs) of about `inflated` bytes.
pub fn object_stream_bomb_pdf(inflated: u64) -> Vec<u8> {
    let bomb = stream(
        "/Type /ObjStm /N 1 /First 4 /Filter /FlateDecode",
        &repeated_zlib(inflated),
    );
    readable_raw_pdf("object stream", vec![bomb])
}

/// A one-page PDF showing `text` (objects 1 to 5), then `more` objects.
fn readable_raw_pdf(text: &str, more: Vec<Vec<u8>>) -> Vec<u8> {
    let content = stream(
        "",
        format!("BT /F1 12 Tf 50 700 Td ({text}) Tj ET").as_bytes(),
    );
    let font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec();
    let objects: Vec<Vec<u8>> = [content, font].into_iter().chain(more).collect();
    raw_pdf(&objects, "", "/Resources << /Font << /F1 5 0 R >> >> ")
}

/// A readable one-page PDF updated once, its update's cross-reference a stream of about
/// `inflated` bytes (which lopdf inflates first of all, to find the objects).
pub fn xref_stream_bomb_pdf(inflated: u64) -> Vec<u8> {
    let mut out = readable_raw_pdf("cross-reference stream", vec![]);
    let previous = String::from_utf8_lossy(&out)
        .rsplit("startxref")
        .next()
        .and_then(|tail| tail.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap();
    let offset = out.len();
    let data = repeated_zlib(inflated);
    out.extend_from_slice(
        format!(
            "6 0 obj\n<< /Type /XRef /Size 7 /W [1 4 2] /Prev {previous} /Root 1 0 R \
             /Filter /FlateDecode /Length {} >>\nstream\n",
            data.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&data);
    out.extend_from_slice(format!("\nendstream\nendobj\nstartxref\n{offset}\n%%EOF\n").as_bytes());
    out
}

/// A zlib stream of about `inflated` bytes of `0 0 m` lines, made in milliseconds: each MiB is
/// compressed once after a full flush (which resets the compressor), so every following MiB
/// compresses to the same bytes, repeated. (Its checksum covers one MiB only: readers inflate
/// everything before they check it.)
fn repeated_zlib(inflated: u64) -> Vec<u8> {
    use flate2::{Compress, Compression, FlushCompress};
    let chunk = b"0 0 m\n".repeat((1 << 20) / 6);
    let mut compress = Compress::new(Compression::best(), true);
    let mut block = |input: &[u8], flush| {
        let mut out = Vec::with_capacity(64 << 10);
        let before = compress.total_in();
        compress.compress_vec(input, &mut out, flush).unwrap();
        assert_eq!(compress.total_in() - before, input.len() as u64);
        out
    };
    let mut data = block(&chunk, FlushCompress::Full);
    let repeated = block(&chunk, FlushCompress::Full);
    for _ in 2..inflated.div_ceil(chunk.len() as u64) {
        data.extend_from_slice(&repeated);
    }
    data.extend_from_slice(&block(&chunk, FlushCompress::Finish));
    data
}

/// A PDF whose page dictionary holds arrays nested `depth` deep.
pub fn deeply_nested_pdf(depth: usize) -> Vec<u8> {
    let page = format!(
        "/Resources << /Font << /F1 5 0 R >> >> /Nested {}{} ",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let content = stream("", b"BT /F1 12 Tf 50 700 Td (nested) Tj ET");
    let font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec();
    raw_pdf(&[content, font], "", &page)
}

/// A one-page PDF that carries everything active or attached, each part holding
/// `{marker}-{part}`: a document-level script (`/OpenAction`, the `JavaScript` name tree), a
/// page action (`/AA`), a link that launches a program, an attached file, an XFA form, and a
/// ZIP archive appended after `%%EOF` (the whole file is also a valid ZIP: a polyglot). Its
/// page shows `page_text`. Read as data: nothing in it runs.
pub fn active_pdf_with_appended_zip(page_text: &str, marker: &str) -> Vec<u8> {
    let content = stream(
        "",
        format!("BT /F1 12 Tf 50 700 Td ({page_text}) Tj ET").as_bytes(),
    );
    let objects = vec![
        content,
        // 5: a script.
        format!("<< /S /JavaScript /JS (app.alert\\('{marker}-JS'\\)) >>").into_bytes(),
        // 6: the page's font.
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec(),
        // 7, 8: an attached file and its file specification.
        stream(
            "/Type /EmbeddedFile",
            format!("{marker}-EMBEDDED").as_bytes(),
        ),
        b"<< /Type /Filespec /F (notes.txt) /EF << /F 7 0 R >> >>".to_vec(),
        // 9: an XFA form program.
        stream("", format!("<xdp:xdp>{marker}-XFA</xdp:xdp>").as_bytes()),
        // 10: a link that launches a program.
        format!(
            "<< /Type /Annot /Subtype /Link /Rect [0 0 10 10] \
             /A << /S /Launch /F ({marker}-LAUNCH.exe) >> >>"
        )
        .into_bytes(),
    ];
    let mut pdf = raw_pdf(
        &objects,
        "/OpenAction 5 0 R /Names << /JavaScript << /Names [(go) 5 0 R] >> \
         /EmbeddedFiles << /Names [(notes.txt) 8 0 R] >> >> /AcroForm << /Fields [] /XFA 9 0 R >> ",
        "/Resources << /Font << /F1 6 0 R >> >> /AA << /O 5 0 R >> /Annots [10 0 R] ",
    );
    let zip = stored_zip(pdf.len(), "notes.txt", format!("{marker}-ZIP").as_bytes());
    pdf.extend_from_slice(&zip);
    pdf
}

/// A complete ZIP archive holding one stored (uncompressed) file, to be placed `at` bytes into
/// a file: its offsets count from the start of that file, so that the whole file is both a PDF
/// and a valid ZIP (a polyglot).
fn stored_zip(at: usize, name: &str, data: &[u8]) -> Vec<u8> {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    let (crc, size, name_len) = (crc.sum(), data.len() as u32, name.len() as u16);
    // Version, flags, method 0 (stored), time, date, CRC, sizes, name length, extra length.
    let mut fields = Vec::new();
    fields.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0x21, 0]);
    fields.extend_from_slice(&crc.to_le_bytes());
    fields.extend_from_slice(&size.to_le_bytes());
    fields.extend_from_slice(&size.to_le_bytes());
    fields.extend_from_slice(&name_len.to_le_bytes());
    fields.extend_from_slice(&0u16.to_le_bytes());
    let mut zip = b"PK\x03\x04".to_vec();
    zip.extend_from_slice(&fields);
    zip.extend_from_slice(name.as_bytes());
    zip.extend_from_slice(data);
    let directory_at = at + zip.len();
    let mut directory = b"PK\x01\x02\x14\x00".to_vec();
    directory.extend_from_slice(&fields);
    // Comment length, disk, internal and external attributes, local header offset.
    directory.extend_from_slice(&[0; 10]);
    directory.extend_from_slice(&(at as u32).to_le_bytes());
    directory.extend_from_slice(name.as_bytes());
    zip.extend_from_slice(&directory);
    zip.extend_from_slice(b"PK\x05\x06\0\0\0\0\x01\0\x01\0");
    zip.extend_from_slice(&(directory.len() as u32).to_le_bytes());
    zip.extend_from_slice(&(directory_at as u32).to_le_bytes());
    zip.extend_from_slice(&0u16.to_le_bytes());
    zip
}

/// A PNG whose (valid) header declares 65535 x 65535 pixels, with no pixel data at all.
pub fn pixel_flood_png() -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend_from_slice(&65535u32.to_be_bytes());
    png.extend_from_slice(&65535u32.to_be_bytes());
    png.extend_from_slice(&[8, 2, 0, 0, 0]);
    let crc = flate2::Crc::new();
    let mut crc = crc;
    crc.update(&png[12..29]);
    png.extend_from_slice(&crc.sum().to_be_bytes());
    png
}

/// A scanned document: `pages` pages, each a `width` × `height` grey image (300 dpi letter is
/// 2550 × 3300) of paper with sparse dark specks, Flate-compressed, plus a line of text. Every
/// page holds its own copy of the same compressed image.
pub fn scan_pdf(pages: usize, width: u32, height: u32) -> Vec<u8> {
    use lopdf::{Document, Stream, dictionary};
    use std::io::Write;
    let mut pixels = vec![250u8; (width * height) as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for pixel in pixels.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 1000 < 25 {
            *pixel = 20;
        }
    }
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(&pixels).unwrap();
    let compressed = encoder.finish().unwrap();
    let mut doc = Document::with_version("1.5");
    let pages_id = doc.new_object_id();
    let font_id = doc.add_object(dictionary! {
        "Type" => "Font", "Subtype" => "Type1", "BaseFont" => "Helvetica",
    });
    let mut kids = Vec::new();
    for page in 0..pages {
        let image = doc.add_object(Stream::new(
            dictionary! {"Type" => "XObject", "Subtype" => "Image", "Width" => width as i64,
            "Height" => height as i64, "ColorSpace" => "DeviceGray",
            "BitsPerComponent" => 8, "Filter" => "FlateDecode"},
            compressed.clone(),
        ));
        let text = format!(
            "q 612 0 0 792 0 0 cm /Im0 Do Q BT /F1 12 Tf 50 750 Td (Scanned page {}) Tj ET",
            page + 1
        );
        let content = doc.add_object(Stream::new(dictionary! {}, text.into_bytes()));
        let page = doc.add_object(dictionary! {
            "Type" => "Page", "Parent" => pages_id, "Contents" => content,
            "Resources" => dictionary! {
                "XObject" => dictionary! {"Im0" => image},
                "Font" => dictionary! {"F1" => font_id},
            },
        });
        kids.push(page.into());
    }
    finish_pdf(doc, pages_id, kids, (612, 792), lopdf::Dictionary::new())
}

/// A small, valid grey PNG whose zTXt (text) and iCCP (colour profile) chunks each inflate to
/// 2 GiB of zeros: a bomb in the metadata, not the pixels.
/// One PNG chunk: length, type, data, CRC.
fn png_chunk(kind: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.sum().to_be_bytes());
    out
}

/// The zlib data of a `w` x `h` grey PNG image of one shade (filter byte 0 on every row).
fn png_grey_idat(w: u32, h: u32, shade: u8) -> Vec<u8> {
    use std::io::Write;
    let raw: Vec<u8> = (0..h)
        .flat_map(|_| std::iter::once(0).chain(std::iter::repeat_n(shade, w as usize)))
        .collect();
    let mut idat = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    idat.write_all(&raw).unwrap();
    idat.finish().unwrap()
}

fn png_grey_header(w: u32, h: u32) -> Vec<u8> {
    let mut header = w.to_be_bytes().to_vec();
    header.extend_from_slice(&h.to_be_bytes());
    header.extend_from_slice(&[8, 0, 0, 0, 0]);
    header
}

/// An animated PNG of `frames` frames of 64 x 64 pixels (acTL, then fcTL + IDAT for the
/// first frame and fcTL + fdAT for each other one). A viewer that shows a still shows the
/// first frame.
pub fn apng(frames: u32) -> Vec<u8> {
    let (w, h) = (64u32, 64u32);
    let frame_control = |sequence: u32| {
        let mut fc = sequence.to_be_bytes().to_vec();
        for v in [w, h, 0, 0] {
            fc.extend_from_slice(&v.to_be_bytes());
        }
        // Delay 1/100 s, dispose none, blend source.
        fc.extend_from_slice(&[0, 1, 0, 100, 0, 0]);
        fc
    };
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &png_grey_header(w, h)));
    let mut actl = frames.to_be_bytes().to_vec();
    actl.extend_from_slice(&0u32.to_be_bytes());
    png.extend(png_chunk(b"acTL", &actl));
    let mut sequence = 0;
    png.extend(png_chunk(b"fcTL", &frame_control(sequence)));
    png.extend(png_chunk(b"IDAT", &png_grey_idat(w, h, 128)));
    for frame in 1..frames {
        sequence += 1;
        png.extend(png_chunk(b"fcTL", &frame_control(sequence)));
        sequence += 1;
        let mut fdat = sequence.to_be_bytes().to_vec();
        fdat.extend(png_grey_idat(w, h, (frame % 256) as u8));
        png.extend(png_chunk(b"fdAT", &fdat));
    }
    png.extend(png_chunk(b"IEND", b""));
    png
}

pub fn png_with_chunk_bombs() -> Vec<u8> {
    use std::io::Write;
    let mut bomb = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..2048 {
        bomb.write_all(&zeros).unwrap();
    }
    let bomb = bomb.finish().unwrap();
    let (w, h) = (16u32, 16u32);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &png_grey_header(w, h)));
    png.extend(png_chunk(
        b"zTXt",
        &[b"Comment\0\0".as_slice(), &bomb].concat(),
    ));
    png.extend(png_chunk(b"iCCP", &[b"icc\0\0".as_slice(), &bomb].concat()));
    png.extend(png_chunk(b"IDAT", &png_grey_idat(w, h, 128)));
    png.extend(png_chunk(b"IEND", b""));
    png
}

/// A PDF whose page tree claims `claimed` pages over one real page.
pub fn pdf_claiming_pages(claimed: u64) -> Vec<u8> {
    let content = stream("", b"BT /F1 12 Tf 50 700 Td (one real page) Tj ET");
    let font = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec();
    let pdf = raw_pdf(
        &[content, font],
        "",
        "/Resources << /Font << /F1 5 0 R >> >> ",
    );
    let honest = b"/Count 000001";
    let at = find(&pdf, honest).unwrap();
    // Same length, so the cross-reference table stays right.
    let claim = format!("/Count {claimed:06}");
    assert_eq!(claim.len(), honest.len(), "at most six digits");
    let mut out = pdf[..at].to_vec();
    out.extend_from_slice(claim.as_bytes());
    out.extend_from_slice(&pdf[at + honest.len()..]);
    out
}

/// Ends a PDF made with lopdf: the page tree over `kids` (with `extra` entries, such as shared
/// resources), the catalog, and the bytes.
fn finish_pdf(
    mut doc: lopdf::Document,
    pages_id: lopdf::ObjectId,
    kids: Vec<lopdf::Object>,
    (width, height): (i64, i64),
    extra: lopdf::Dictionary,
) -> Vec<u8> {
    use lopdf::{Object, dictionary};
    let count = kids.len() as i64;
    let mut pages = dictionary! {
        "Type" => "Pages", "Kids" => kids, "Count" => count,
        "MediaBox" => vec![0.into(), 0.into(), width.into(), height.into()],
    };
    pages.extend(&extra);
    doc.objects.insert(pages_id, Object::Dictionary(pages));
    let catalog = doc.add_object(dictionary! {"Type" => "Catalog", "Pages" => pages_id});
    doc.trailer.set("Root", catalog);
    let mut out = Vec::new();
    doc.save_to(&mut out).expect("saving a PDF");
    out
}

/// Damage that PDFs suffer in the field and that viewers repair: what a mail gateway, a broken
/// download or a careless tool does to the cross-reference section, stream lengths and
/// linearization data. Each keeps every object intact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Damage {
    /// A line inserted after the header: every offset in the xref is off.
    ShiftedOffsets,
    /// Mail headers before `%PDF-`.
    JunkBeforeHeader,
    /// `startxref` points past the end of the file.
    StartxrefNowhere,
    /// The (last) classic xref table is gone; the trailer stays.
    XrefTableRemoved,
    /// Every offset of the (last) classic xref table reads 0.
    XrefOffsetsZeroed,
    /// Every direct stream `/Length` is wrong (same width, so offsets stay right).
    StreamLengthsWrong,
    /// A linearized file whose linearization dictionary and first-page xref are garbage.
    LinearizationDamaged,
}

impl Damage {
    pub const ALL: [Damage; 7] = [
        Damage::ShiftedOffsets,
        Damage::JunkBeforeHeader,
        Damage::StartxrefNowhere,
        Damage::XrefTableRemoved,
        Damage::XrefOffsetsZeroed,
        Damage::StreamLengthsWrong,
        Damage::LinearizationDamaged,
    ];

    /// `bytes` with this damage, or `None` where the file has nothing it applies to (an
    /// xref stream instead of a table, no linearization).
    pub fn apply(self, bytes: &[u8]) -> Option<Vec<u8>> {
        match self {
            Damage::ShiftedOffsets => {
                let header_end = find(bytes, b"\n")? + 1;
                let mut out = bytes[..header_end].to_vec();
                out.extend_from_slice(
                    b"% inserted by a mail gateway that rewrote the attachment\n",
                );
                out.extend_from_slice(&bytes[header_end..]);
                Some(out)
            }
            Damage::JunkBeforeHeader => {
                let mut out =
                    b"From: scanner@clinic.example\r\nContent-Type: application/pdf\r\n\r\n"
                        .to_vec();
                out.extend_from_slice(bytes);
                Some(out)
            }
            Damage::StartxrefNowhere => {
                let at = rfind(bytes, b"startxref")?;
                let mut out = bytes[..at].to_vec();
                out.extend_from_slice(b"startxref\n987654321\n%%EOF\n");
                Some(out)
            }
            Damage::XrefTableRemoved => {
                let (start, end) = last_xref_table(bytes)?;
                let mut out = bytes[..start].to_vec();
                out.extend_from_slice(&bytes[end..]);
                Some(out)
            }
            Damage::XrefOffsetsZeroed => {
                let (start, end) = last_xref_table(bytes)?;
                let mut out = bytes.to_vec();
                zero_entries(&mut out[start..end]);
                Some(out)
            }
            Damage::StreamLengthsWrong => {
                let mut out = bytes.to_vec();
                let mut changed = false;
                let mut at = 0;
                while let Some(found) = find(&out[at..], b"/Length ") {
                    let digits = at + found + b"/Length ".len();
                    let end = digits
                        + out[digits..]
                            .iter()
                            .take_while(|b| b.is_ascii_digit())
                            .count();
                    // Only a direct length (`/Length 12 0 R` is a reference).
                    let direct = end > digits && !out[end..].starts_with(b" 0 R");
                    if direct {
                        for d in &mut out[digits..end] {
                            *d = if *d == b'1' { b'2' } else { b'1' };
                        }
                        changed = true;
                    }
                    at = end;
                }
                changed.then_some(out)
            }
            Damage::LinearizationDamaged => {
                let lin = find(bytes, b"/Linearized")?;
                let dict_end = lin + find(&bytes[lin..], b">>")?;
                let mut out = bytes.to_vec();
                for d in &mut out[lin + b"/Linearized".len()..dict_end] {
                    if d.is_ascii_digit() {
                        *d = b'7';
                    }
                }
                // The first-page xref table follows the linearization dictionary.
                let start = dict_end + find(&bytes[dict_end..], b"xref")?;
                let end = start + find(&bytes[start..], b"trailer")?;
                zero_entries(&mut out[start..end]);
                Some(out)
            }
        }
    }
}

/// The byte range of the last classic xref table, from `xref` up to `trailer`.
fn last_xref_table(bytes: &[u8]) -> Option<(usize, usize)> {
    let trailer = rfind(bytes, b"trailer")?;
    let start = rfind(&bytes[..trailer], b"xref")?;
    // `startxref` also contains `xref`.
    if bytes[..start].ends_with(b"start") {
        return None;
    }
    Some((start, trailer))
}

/// Overwrites the 10-digit offset of every `nnnnnnnnnn ggggg n` entry with zeros.
fn zero_entries(table: &mut [u8]) {
    let mut i = 0;
    while i + 18 <= table.len() {
        let entry = &table[i..i + 18];
        if entry[..10].iter().all(u8::is_ascii_digit)
            && entry[10] == b' '
            && entry[11..16].iter().all(u8::is_ascii_digit)
            && entry[16] == b' '
            && entry[17] == b'n'
        {
            table[i..i + 10].fill(b'0');
            i += 18;
        } else {
            i += 1;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn rfind(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// A photo of a paper record: light paper, dark lines of "text", and a red mark in the top-left
/// corner that tells which way is up. With `exif` (a TIFF block), the JPEG carries it in APP1.
pub fn record_jpeg(w: u32, h: u32, exif: Option<Vec<u8>>) -> Vec<u8> {
    use image::ImageEncoder;
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        if x < w / 5 && y < h / 5 {
            image::Rgb([220, 20, 20])
        } else if y % 40 < 6 && x % 97 > 10 && (x / 13 + y / 40) % 3 != 0 {
            image::Rgb([25, 25, 35])
        } else {
            image::Rgb([235, 230, 215])
        }
    });
    let mut out = Vec::new();
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90);
    if let Some(exif) = exif {
        encoder.set_exif_metadata(exif).expect("EXIF in a JPEG");
    }
    encoder
        .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
        .expect("encoding a JPEG");
    out
}

/// What the GPS position of [`exif_with_gps`] holds as text, to look for in what leaves.
pub const GPS_CANARY: &[u8] = b"GPS-CANARY-48.8584N";

/// An EXIF (TIFF) block as a phone writes it: `orientation` and a GPS directory with a
/// latitude (48° 51' 29.97" N) and, as its map datum, [`GPS_CANARY`].
pub fn exif_with_gps(orientation: u16) -> Vec<u8> {
    let be16 = |v: u16| v.to_be_bytes();
    let be32 = |v: u32| v.to_be_bytes();
    let mut t = b"MM\0\x2a\0\0\0\x08".to_vec();
    // IFD0 at 8: Orientation, GPS directory pointer.
    let gps_ifd = 8 + 2 + 2 * 12 + 4;
    t.extend_from_slice(&be16(2));
    t.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1]);
    t.extend_from_slice(&be16(orientation));
    t.extend_from_slice(&[0, 0]);
    t.extend_from_slice(&[0x88, 0x25, 0, 4, 0, 0, 0, 1]);
    t.extend_from_slice(&be32(gps_ifd));
    t.extend_from_slice(&be32(0));
    // The GPS directory: LatitudeRef, Latitude (three rationals), MapDatum (text).
    let latitude = gps_ifd + 2 + 3 * 12 + 4;
    let datum = latitude + 24;
    t.extend_from_slice(&be16(3));
    t.extend_from_slice(&[0, 1, 0, 2, 0, 0, 0, 2, b'N', 0, 0, 0]);
    t.extend_from_slice(&[0, 2, 0, 5, 0, 0, 0, 3]);
    t.extend_from_slice(&be32(latitude));
    t.extend_from_slice(&[0, 0x12, 0, 2]);
    t.extend_from_slice(&be32(GPS_CANARY.len() as u32 + 1));
    t.extend_from_slice(&be32(datum));
    t.extend_from_slice(&be32(0));
    for (n, d) in [(48u32, 1u32), (51, 1), (2997, 100)] {
        t.extend_from_slice(&be32(n));
        t.extend_from_slice(&be32(d));
    }
    t.extend_from_slice(GPS_CANARY);
    t.push(0);
    t
}

/// Encodes JPEGs with `heif-enc` (Debian's libheif-examples, x265; libaom with `-A`) into
/// one HEIF file, the first image primary; `args` adds options (`-t 64`: thumbnails).
pub fn heif_enc(jpegs: &[&[u8]], args: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let out = dir.path().join(if args.contains(&"-A") {
        "out.avif"
    } else {
        "out.heic"
    });
    let mut command = std::process::Command::new("heif-enc");
    command.args(["-q", "50"]);
    if !args.contains(&"-A") {
        // x265's fastest preset: the 6000 x 4500 photo takes seconds, not half a minute.
        command.args(["-p", "preset=ultrafast"]);
    }
    command.args(args);
    for (i, jpeg) in jpegs.iter().enumerate() {
        let input = dir.path().join(format!("in{i}.jpg"));
        std::fs::write(&input, jpeg).expect("writing a fixture");
        command.arg(input);
    }
    let output = command.arg("-o").arg(&out).output().unwrap_or_else(|e| {
        panic!(
            "heif-enc did not start ({e}): install Debian's libheif-examples \
             (apt-get install libheif-examples; scripts/test does)"
        )
    });
    if !output.status.success() {
        panic!(
            "heif-enc failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    std::fs::read(out).expect("heif-enc's output")
}

/// `heif` with transformative properties added to its primary image, as a camera records how
/// to show the photo: `irot` (quarter turns anticlockwise), then `imir` (axis 0: top to bottom,
/// 1: left to right) when `mirror` is set. The boxes that hold them grow, and every data
/// offset in `iloc` moves by the bytes inserted before it (heif-enc's `mdat` follows `meta`).
pub fn heif_with_transforms(heif: &[u8], quarter_turns: u8, mirror: Option<u8>) -> Vec<u8> {
    let be = |at: usize, n: usize| {
        heif[at..at + n]
            .iter()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b))
    };
    let children = |from: usize, to: usize| {
        let mut boxes = Vec::new();
        let mut at = from;
        while at + 8 <= to {
            let size = be(at, 4) as usize;
            boxes.push((heif[at + 4..at + 8].to_vec(), at, size));
            at += size;
        }
        boxes
    };
    let find = |boxes: &[(Vec<u8>, usize, usize)], name: &[u8]| {
        boxes
            .iter()
            .find(|(kind, _, _)| kind == name)
            .map(|(_, at, size)| (*at, *size))
            .unwrap_or_else(|| panic!("no {} box", String::from_utf8_lossy(name)))
    };
    let top = children(0, heif.len());
    let (meta, meta_size) = find(&top, b"meta");
    assert!(find(&top, b"mdat").0 > meta, "mdat after meta");
    let inside = children(meta + 12, meta + meta_size);
    let (iloc, _) = find(&inside, b"iloc");
    let (pitm, _) = find(&inside, b"pitm");
    let (iprp, _) = find(&inside, b"iprp");
    let in_iprp = children(iprp + 8, iprp + be(iprp, 4) as usize);
    let (ipco, ipco_size) = find(&in_iprp, b"ipco");
    let (ipma, _) = find(&in_iprp, b"ipma");
    let primary = if heif[pitm + 8] == 0 {
        be(pitm + 12, 2)
    } else {
        be(pitm + 12, 4)
    };

    // The new properties, numbered after the existing ones.
    let existing = children(ipco + 8, ipco + ipco_size).len();
    let mut properties = vec![0, 0, 0, 9, b'i', b'r', b'o', b't', quarter_turns & 3];
    if let Some(axis) = mirror {
        properties.extend_from_slice(&[0, 0, 0, 9, b'i', b'm', b'i', b'r', axis & 1]);
    }
    let added = properties.len() / 9;
    // Their associations with the primary image, essential.
    let (version, wide) = (heif[ipma + 8], heif[ipma + 11] & 1 == 1);
    let id_len = if version < 1 { 2 } else { 4 };
    let assoc_len = if wide { 2 } else { 1 };
    let mut at = ipma + 16;
    let mut insert_at = None;
    for _ in 0..be(ipma + 12, 4) {
        let id = be(at, id_len);
        let count = heif[at + id_len] as usize;
        let end = at + id_len + 1 + count * assoc_len;
        if id == primary {
            insert_at = Some((at + id_len, end));
        }
        at = end;
    }
    let (count_at, assoc_at) = insert_at.expect("the primary image has properties");
    let mut associations = Vec::new();
    for i in 0..added {
        let index = (existing + 1 + i) as u16;
        if wide {
            associations.extend_from_slice(&(0x8000 | index).to_be_bytes());
        } else {
            associations.push(0x80 | index as u8);
        }
    }
    let delta = (properties.len() + associations.len()) as u64;

    let mut out = heif.to_vec();
    // Data offsets (construction method 0) point past `meta`: they move by `delta`.
    let put = |out: &mut Vec<u8>, at: usize, n: usize, value: u64| {
        for i in 0..n {
            out[at + i] = (value >> (8 * (n - 1 - i))) as u8;
        }
    };
    let version = heif[iloc + 8];
    let (offset_size, length_size) = (
        (heif[iloc + 12] >> 4) as usize,
        (heif[iloc + 12] & 15) as usize,
    );
    let base_size = (heif[iloc + 13] >> 4) as usize;
    let index_size = if version >= 1 {
        (heif[iloc + 13] & 15) as usize
    } else {
        0
    };
    let (count, mut at) = if version < 2 {
        (be(iloc + 14, 2), iloc + 16)
    } else {
        (be(iloc + 14, 4), iloc + 18)
    };
    for _ in 0..count {
        at += if version < 2 { 2 } else { 4 };
        let method = if version >= 1 {
            let m = be(at, 2) & 15;
            at += 2;
            m
        } else {
            0
        };
        at += 2; // data reference index
        if method == 0 && base_size > 0 {
            put(&mut out, at, base_size, be(at, base_size) + delta);
        }
        let base_moved = method == 0 && base_size > 0;
        at += base_size;
        let extents = be(at, 2);
        at += 2;
        for _ in 0..extents {
            at += index_size;
            if method == 0 && !base_moved && offset_size > 0 {
                put(&mut out, at, offset_size, be(at, offset_size) + delta);
            }
            at += offset_size + length_size;
        }
    }
    // The boxes that hold the insertions grow.
    for (at, grows) in [
        (meta, delta),
        (iprp, delta),
        (ipco, properties.len() as u64),
        (ipma, associations.len() as u64),
    ] {
        put(&mut out, at, 4, be(at, 4) + grows);
    }
    out[count_at] += added as u8;
    // Insert from the back, so that the earlier position stays valid.
    let mut splices = [(ipco + ipco_size, properties), (assoc_at, associations)];
    splices.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    for (at, bytes) in splices {
        out.splice(at..at, bytes);
    }
    out
}
