//! The media type of an upload, decided from its first bytes alone.

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
}

impl MediaType {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaType::Pdf => "application/pdf",
            MediaType::Jpeg => "image/jpeg",
            MediaType::Png => "image/png",
            MediaType::Webp => "image/webp",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            MediaType::Pdf,
            MediaType::Jpeg,
            MediaType::Png,
            MediaType::Webp,
        ]
        .into_iter()
        .find(|m| m.as_str() == text)
    }
}

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    Accepted(MediaType),
    /// A HEIC/HEIF photo: refused until a build can convert it, with advice to send JPEG.
    Heic,
    Unsupported,
}

/// Decides the type from the first bytes (up to [`SNIFF_LEN`]) of a file.
pub fn sniff(head: &[u8]) -> Sniffed {
    if head.starts_with(b"%PDF-") {
        return Sniffed::Accepted(MediaType::Pdf);
    }
    match infer::get(head).map(|t| t.mime_type()) {
        Some("image/jpeg") => Sniffed::Accepted(MediaType::Jpeg),
        Some("image/png") => Sniffed::Accepted(MediaType::Png),
        Some("image/webp") => Sniffed::Accepted(MediaType::Webp),
        Some("image/heif" | "image/heic" | "image/heif-sequence" | "image/heic-sequence") => {
            Sniffed::Heic
        }
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
        assert_eq!(sniff(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic"), Sniffed::Heic);
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
}
