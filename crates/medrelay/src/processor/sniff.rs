//! The media type of an upload, decided from its first bytes alone.
//!
//! HEIF files (HEIC from an iPhone, AVIF) are told by the brands of their `ftyp` box, read
//! here without any library: the codec-specific brands first, then, for a generic `mif1`,
//! `mif2` or `msf1` file, the item types that follow in the first bytes.

use serde::{Deserialize, Serialize};

/// Bytes needed to decide; a PDF header may follow up to 1 KiB of leading junk.
pub const SNIFF_LEN: usize = 1024;

/// The types medrelay accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MediaType {
    #[serde(rename = "application/pdf")]
    Pdf,
    #[serde(rename = "image/jpeg")]
    Jpeg,
    #[serde(rename = "image/png")]
    Png,
    #[serde(rename = "image/webp")]
    Webp,
    /// A HEIF photo coded in HEVC (an iPhone's HEIC), converted to JPEG in the sandbox.
    #[serde(rename = "image/heic")]
    Heic,
}

impl MediaType {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaType::Pdf => "application/pdf",
            MediaType::Jpeg => "image/jpeg",
            MediaType::Png => "image/png",
            MediaType::Webp => "image/webp",
            MediaType::Heic => "image/heic",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            MediaType::Pdf,
            MediaType::Jpeg,
            MediaType::Png,
            MediaType::Webp,
            MediaType::Heic,
        ]
        .into_iter()
        .find(|m| m.as_str() == text)
    }
}

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Accepted(MediaType),
    /// A HEIC photo where HEIC is switched off (`MEDRELAY_HEIC`): refused with advice to send
    /// JPEG.
    Heic,
    /// An AVIF photo: no AV1 decoder here; refused with advice to send JPEG.
    Avif,
    Unsupported,
}

/// What this service accepts: [`sniff`], with HEIC refused (with advice) where `heic` is off.
pub fn admit(head: &[u8], heic: bool) -> Sniffed {
    match sniff(head) {
        Sniffed::Accepted(MediaType::Heic) if !heic => Sniffed::Heic,
        sniffed => sniffed,
    }
}

/// Decides the type from the first bytes (up to [`SNIFF_LEN`]) of a file.
pub fn sniff(head: &[u8]) -> Sniffed {
    if head.starts_with(b"%PDF-") {
        return Sniffed::Accepted(MediaType::Pdf);
    }
    if let Some(heif) = heif(head) {
        return heif;
    }
    match infer::get(head).map(|t| t.mime_type()) {
        Some("image/jpeg") => Sniffed::Accepted(MediaType::Jpeg),
        Some("image/png") => Sniffed::Accepted(MediaType::Png),
        Some("image/webp") => Sniffed::Accepted(MediaType::Webp),
        // The PDF specification lets readers accept a header within the first 1024 bytes.
        _ if head[..head.len().min(SNIFF_LEN)]
            .windows(5)
            .any(|w| w == b"%PDF-") =>
        {
            Sniffed::Accepted(MediaType::Pdf)
        }
        _ => Sniffed::Unsupported,
    }
}

/// Brands of HEIF files coded in HEVC (ISO/IEC 23008-12 Annex B).
const HEVC_BRANDS: [&[u8; 4]; 6] = [b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"];
/// Brands of HEIF files coded in AV1 (the AVIF specification).
const AV1_BRANDS: [&[u8; 4]; 2] = [b"avif", b"avis"];
/// Brands that name no codec: images (`mif1`, `mif2`) or image sequences (`msf1`).
const GENERIC_BRANDS: [&[u8; 4]; 3] = [b"mif1", b"mif2", b"msf1"];

/// A HEIF file's type from its `ftyp` box, or `None` when it is not a HEIF file.
fn heif(head: &[u8]) -> Option<Sniffed> {
    // Only the first bytes are read, so that both upload routes decide alike.
    let head = &head[..head.len().min(SNIFF_LEN)];
    let size = usize::try_from(u32::from_be_bytes(head.get(..4)?.try_into().ok()?)).ok()?;
    if head.get(4..8)? != b"ftyp" || size < 16 {
        return None;
    }
    // The major brand, then (after the minor version) the compatible brands.
    let major = head.get(8..12)?;
    let compatible = head.get(16..size.min(head.len()))?.chunks_exact(4);
    let brands: Vec<&[u8]> = std::iter::once(major).chain(compatible).collect();
    let has = |set: &[&[u8; 4]]| brands.iter().any(|b| set.iter().any(|s| s[..] == **b));
    if has(&HEVC_BRANDS) {
        return Some(Sniffed::Accepted(MediaType::Heic));
    }
    if has(&AV1_BRANDS) {
        return Some(Sniffed::Avif);
    }
    if !has(&GENERIC_BRANDS) {
        return None;
    }
    // A generic HEIF file: its item types (`infe`) usually follow within the first bytes.
    let rest = head.get(size..).unwrap_or_default();
    let mentions = |what: &[u8]| rest.windows(4).any(|w| w == what);
    Some(if mentions(b"av01") && !mentions(b"hvc1") {
        Sniffed::Avif
    } else {
        // HEVC or unknown: the decoder decides, and a codec it does not know is unreadable.
        Sniffed::Accepted(MediaType::Heic)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_bytes_decide_the_type() {
        assert_eq!(sniff(b"%PDF-1.7\n..."), Sniffed::Accepted(MediaType::Pdf));
        assert_eq!(
            sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"),
            Sniffed::Accepted(MediaType::Png)
        );
        assert_eq!(
            sniff(b"\xff\xd8\xff\xe0\0\x10JFIF\0"),
            Sniffed::Accepted(MediaType::Jpeg)
        );
        assert_eq!(
            sniff(b"RIFF\x10\0\0\0WEBPVP8 "),
            Sniffed::Accepted(MediaType::Webp)
        );
        assert_eq!(
            sniff(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic"),
            Sniffed::Accepted(MediaType::Heic)
        );
        assert_eq!(sniff(b"\x7fELF\x02\x01\x01\0"), Sniffed::Unsupported);
        assert_eq!(sniff(b"<html><body>%PD"), Sniffed::Unsupported);
        assert_eq!(sniff(b"PK\x03\x04"), Sniffed::Unsupported);
        assert_eq!(sniff(b""), Sniffed::Unsupported);
    }

    #[test]
    fn a_pdf_header_after_leading_junk_is_still_a_pdf() {
        let mut bytes = vec![b' '; 300];
        bytes.extend_from_slice(b"%PDF-1.4");
        assert_eq!(sniff(&bytes), Sniffed::Accepted(MediaType::Pdf));
    }

    #[test]
    fn heif_files_are_told_by_their_brands() {
        let ftyp = |major: &[u8; 4], compatible: &[&[u8; 4]], rest: &[u8]| {
            let mut out = ((16 + 4 * compatible.len()) as u32).to_be_bytes().to_vec();
            out.extend_from_slice(b"ftyp");
            out.extend_from_slice(major);
            out.extend_from_slice(&[0; 4]);
            for brand in compatible {
                out.extend_from_slice(*brand);
            }
            out.extend_from_slice(rest);
            out
        };
        let heic = Sniffed::Accepted(MediaType::Heic);
        // An iPhone photo, and the other HEVC brands.
        assert_eq!(
            sniff(&ftyp(b"heic", &[b"mif1", b"MiHE", b"miaf"], b"")),
            heic
        );
        assert_eq!(sniff(&ftyp(b"heix", &[b"mif1"], b"")), heic);
        assert_eq!(sniff(&ftyp(b"mif1", &[b"heic"], b"")), heic);
        assert_eq!(sniff(&ftyp(b"msf1", &[b"hevc"], b"")), heic);
        // Generic brands: the item types decide; HEVC or nothing known goes to the decoder.
        let meta_hevc = b"\0\0\0\x20metainfe\0\0\0\x01hvc1";
        let meta_av1 = b"\0\0\0\x20metainfe\0\0\0\x01av01";
        assert_eq!(sniff(&ftyp(b"mif1", &[b"mif1"], meta_hevc)), heic);
        assert_eq!(sniff(&ftyp(b"msf1", &[], b"")), heic);
        assert_eq!(sniff(&ftyp(b"mif1", &[b"miaf"], meta_av1)), Sniffed::Avif);
        // AVIF.
        assert_eq!(
            sniff(&ftyp(b"avif", &[b"mif1", b"miaf"], b"")),
            Sniffed::Avif
        );
        assert_eq!(sniff(&ftyp(b"mif1", &[b"avif"], b"")), Sniffed::Avif);
        assert_eq!(sniff(&ftyp(b"avis", &[b"msf1"], b"")), Sniffed::Avif);
        // Other ISO files (a video), and broken boxes.
        assert_eq!(sniff(&ftyp(b"isom", &[b"mp41"], b"")), Sniffed::Unsupported);
        assert_eq!(sniff(b"\0\0\0\x08ftypheic"), Sniffed::Unsupported);
        assert_eq!(sniff(b"\0\0\0\x18ftyphe"), Sniffed::Unsupported);
        // Switched off: recognised, and refused with advice.
        let iphone = ftyp(b"heic", &[b"mif1"], b"");
        assert_eq!(admit(&iphone, false), Sniffed::Heic);
        assert_eq!(admit(&iphone, true), heic);
        assert_eq!(
            admit(b"%PDF-1.7\n", false),
            Sniffed::Accepted(MediaType::Pdf)
        );
    }
}
