//! The `local` processor: real work offline, in pure Rust. For a PDF, the page count and the
//! full text (lopdf + pdf-extract), plus the document type, date and language where simple
//! rules can tell. For a photo, the media type and pixel size.
//!
//! [`analyze`] runs only in the sandbox child ([`super::sandbox`]): a parser that runs away,
//! exhausts memory or crashes ends its child, not the server. Inside the child, parser panics
//! are still contained, so a malformed file is reported as unreadable. This module never logs
//! document content, and its panic messages are never logged either.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::LazyLock;

use futures::FutureExt;
use futures::future::BoxFuture;
use regex::Regex;

use super::sandbox::Sandbox;
use super::{
    CallBudget, Document, MediaType, ParseLimits, ProcessError, Processor, Refusal, pdf, photo,
};
use crate::model::{DocumentInfo, DocumentResult, DocumentType, ProcessorInfo};

/// The `local` processor: each document is analyzed by a sandbox child.
#[derive(Debug, Clone)]
pub struct LocalProcessor {
    sandbox: Sandbox,
}

impl LocalProcessor {
    pub fn new(sandbox: Sandbox) -> Self {
        Self { sandbox }
    }
}

impl Processor for LocalProcessor {
    fn name(&self) -> &'static str {
        "local"
    }

    fn process<'a>(
        &'a self,
        document: Document,
        // Calls no provider: nothing to charge.
        _budget: &'a dyn CallBudget,
    ) -> BoxFuture<'a, Result<DocumentResult, ProcessError>> {
        async move { self.sandbox.analyze(&document).await }.boxed()
    }
}

/// Analyzes a document synchronously: the task of the sandbox child.
pub fn analyze(document: &Document, limits: &ParseLimits) -> Result<DocumentResult, ProcessError> {
    match document.media_type {
        MediaType::Pdf => analyze_pdf(&document.bytes, limits),
        MediaType::Jpeg | MediaType::Png | MediaType::Webp | MediaType::Heic => {
            analyze_image(&document.bytes, document.media_type, limits)
        }
    }
}

fn base_result(media_type: MediaType) -> DocumentResult {
    DocumentResult {
        processor: ProcessorInfo {
            name: "local".into(),
            model: None,
        },
        document: DocumentInfo {
            media_type: Some(media_type.as_str().into()),
            ..DocumentInfo::default()
        },
        ..DocumentResult::default()
    }
}

/// Runs a parser call, turning a panic into `None`.
fn contained<T>(f: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}

fn analyze_pdf(bytes: &[u8], limits: &ParseLimits) -> Result<DocumentResult, ProcessError> {
    let doc = pdf::open(bytes, limits).map_err(ProcessError::Abort)?;
    let pages = contained(|| doc.get_pages()).ok_or(ProcessError::Abort(Refusal::Unreadable))?;
    let page_count = pages.len() as u32;

    // pdf-extract understands fonts and layout best; lopdf's own extractor is the fallback
    // when it fails or panics on this file.
    let text = contained(|| {
        let mut text = String::new();
        let mut output = pdf_extract::PlainTextOutput::new(&mut text);
        pdf_extract::output_doc(&doc, &mut output).map(|_| text)
    })
    .and_then(Result::ok)
    .or_else(|| {
        let numbers: Vec<u32> = pages.keys().copied().collect();
        contained(|| doc.extract_text(&numbers)).and_then(Result::ok)
    })
    .map(|t| normalize_text(&t))
    .filter(|t| !t.is_empty());

    let mut result = base_result(MediaType::Pdf);
    result.document.page_count = Some(page_count);
    if let Some(text) = &text {
        result.document.kind = classify(text);
        result.document.date = find_date(text);
        result.document.language = detect_language(text);
        result.document.title = title_of(text);
    }
    result.text = text;
    Ok(result)
}

fn analyze_image(
    bytes: &[u8],
    media_type: MediaType,
    limits: &ParseLimits,
) -> Result<DocumentResult, ProcessError> {
    // Every pixel is decoded (within limits checked before any buffer is allocated), so a
    // truncated or corrupt photo fails here instead of passing on its header alone.
    let image = match contained(|| photo::decode(bytes, media_type, limits)) {
        Some(Ok(image)) => image,
        Some(Err(refusal)) => return Err(ProcessError::Abort(refusal)),
        None => return Err(ProcessError::Abort(Refusal::Unreadable)),
    };
    let (width, height) = (image.width(), image.height());
    let mut result = base_result(media_type);
    result.document.page_count = Some(1);
    result.document.pixel_width = Some(width);
    result.document.pixel_height = Some(height);
    Ok(result)
}

/// Collapses runs of blank lines and trailing spaces left by layout-based extraction.
fn normalize_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            blank_run += 1;
            if blank_run > 1 {
                continue;
            }
        } else {
            blank_run = 0;
        }
        out.push_str(line);
        out.push('\n');
    }
    out.trim().to_owned()
}

fn title_of(text: &str) -> Option<String> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let title: String = line.chars().take(120).collect();
    Some(title)
}

/// Keyword rules, first match wins; the order puts specific kinds before general ones.
fn classify(text: &str) -> DocumentType {
    let lower = text.to_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| lower.contains(w));
    if has(&[
        "discharge summary",
        "discharge letter",
        "entlassungsbericht",
        "arztbrief",
    ]) {
        DocumentType::DischargeSummary
    } else if has(&[
        "vaccination",
        "immunization",
        "immunisation",
        "impfpass",
        "impfung",
    ]) {
        DocumentType::VaccinationRecord
    } else if has(&[
        "radiology",
        "radiolog",
        "mri ",
        "ct scan",
        "x-ray",
        "ultrasound",
        "impression:",
        "befund der bildgebung",
    ]) {
        DocumentType::ImagingReport
    } else if has(&[
        "reference range",
        "lab report",
        "laboratory",
        "laborbefund",
        "normal range",
        "specimen",
    ]) {
        DocumentType::LabReport
    } else if has(&["prescription", "rezept", "rx:", "sig:", "dispense"]) {
        DocumentType::Prescription
    } else if has(&["referral", "überweisung", "ueberweisung", "referred to"]) {
        DocumentType::Referral
    } else if has(&[
        "invoice",
        "rechnungsnummer",
        "rechnungsbetrag",
        "amount due",
        "total due",
    ]) {
        DocumentType::Invoice
    } else if has(&["insurance", "versicherung", "policy number", "member id"]) {
        DocumentType::Insurance
    } else if has(&[
        "visit note",
        "progress note",
        "chief complaint",
        "consultation",
        "anamnese",
    ]) {
        DocumentType::VisitNote
    } else {
        DocumentType::Other
    }
}

static ISO_DATE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(\d{4})-(\d{2})-(\d{2})\b").expect("valid regex"));
static DOTTED_DATE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b(\d{1,2})\.(\d{1,2})\.(\d{4})\b").expect("valid regex"));
static WRITTEN_DATE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)\b(january|february|march|april|may|june|july|august|september|october|november|december)\s+(\d{1,2}),?\s+(\d{4})\b",
    )
    .expect("valid regex")
});

/// The first unambiguous date in the text, as `YYYY-MM-DD`.
fn find_date(text: &str) -> Option<String> {
    let valid = |y: i32, m: u32, d: u32| {
        time::Month::try_from(m as u8)
            .ok()
            .and_then(|month| time::Date::from_calendar_date(y, month, d as u8).ok())
            .filter(|_| (1900..=2100).contains(&y))
            .map(|date| date.to_string())
    };
    let mut found: Vec<(usize, String)> = Vec::new();
    for c in ISO_DATE.captures_iter(text) {
        if let Some(d) = valid(c[1].parse().ok()?, c[2].parse().ok()?, c[3].parse().ok()?) {
            found.push((c.get(0)?.start(), d));
        }
    }
    for c in DOTTED_DATE.captures_iter(text) {
        if let Some(d) = valid(c[3].parse().ok()?, c[2].parse().ok()?, c[1].parse().ok()?) {
            found.push((c.get(0)?.start(), d));
        }
    }
    for c in WRITTEN_DATE.captures_iter(text) {
        let month = match c[1].to_lowercase().as_str() {
            "january" => 1,
            "february" => 2,
            "march" => 3,
            "april" => 4,
            "may" => 5,
            "june" => 6,
            "july" => 7,
            "august" => 8,
            "september" => 9,
            "october" => 10,
            "november" => 11,
            _ => 12,
        };
        if let Some(d) = valid(c[3].parse().ok()?, month, c[2].parse().ok()?) {
            found.push((c.get(0)?.start(), d));
        }
    }
    found
        .into_iter()
        .min_by_key(|(pos, _)| *pos)
        .map(|(_, d)| d)
}

/// A language code when the text's common words say so clearly, else `None`.
fn detect_language(text: &str) -> Option<String> {
    const WORDS: [(&str, &[&str]); 6] = [
        (
            "en",
            &[
                "the", "and", "of", "to", "is", "with", "for", "patient", "this", "in",
            ],
        ),
        (
            "de",
            &[
                "der", "die", "und", "das", "mit", "ist", "nicht", "ein", "für", "von",
            ],
        ),
        (
            "fr",
            &[
                "le", "la", "les", "et", "des", "est", "une", "pour", "avec", "du",
            ],
        ),
        (
            "es",
            &[
                "el", "la", "los", "y", "que", "con", "para", "una", "del", "por",
            ],
        ),
        (
            "it",
            &[
                "il", "di", "che", "per", "una", "con", "della", "sono", "gli", "nel",
            ],
        ),
        (
            "nl",
            &[
                "de", "het", "een", "en", "van", "met", "voor", "niet", "zijn", "op",
            ],
        ),
    ];
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .take(5000)
        .map(str::to_lowercase)
        .collect();
    if words.len() < 8 {
        return None;
    }
    let mut scores: Vec<(&str, usize)> = WORDS
        .iter()
        .map(|(lang, stop)| {
            (
                *lang,
                words.iter().filter(|w| stop.contains(&w.as_str())).count(),
            )
        })
        .collect();
    scores.sort_by_key(|s| std::cmp::Reverse(s.1));
    let (best, score) = scores[0];
    let runner_up = scores[1].1;
    // Demand a clear lead and a minimum share of function words.
    (score * 20 >= words.len() && score > runner_up * 3 / 2).then(|| best.to_owned())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::time::Duration;

    use super::*;

    #[test]
    fn dates_are_found_in_common_formats() {
        assert_eq!(
            find_date("Collected 2026-10-02 at 8:00").as_deref(),
            Some("2026-10-02")
        );
        assert_eq!(
            find_date("Datum: 02.10.2026").as_deref(),
            Some("2026-10-02")
        );
        assert_eq!(
            find_date("Seen on October 2, 2026.").as_deref(),
            Some("2026-10-02")
        );
        assert_eq!(find_date("Version 1.2.3 of 2026-13-45"), None);
        assert_eq!(
            find_date("Printed 2026-11-01, collected 01.10.2026").as_deref(),
            Some("2026-11-01")
        );
    }

    #[test]
    fn simple_rules_classify_documents() {
        assert_eq!(
            classify("LABORATORY REPORT\nHemoglobin 13.2 g/dL reference range 12-16"),
            DocumentType::LabReport
        );
        assert_eq!(
            classify("Discharge Summary\nAdmitted..."),
            DocumentType::DischargeSummary
        );
        assert_eq!(
            classify("Prescription\nAmoxicillin 500 mg"),
            DocumentType::Prescription
        );
        assert_eq!(classify("Lorem ipsum dolor sit amet"), DocumentType::Other);
    }

    #[test]
    fn language_is_detected_only_when_clear() {
        assert_eq!(
            detect_language("The patient was seen in the clinic and the results of the test are normal for this age.").as_deref(),
            Some("en")
        );
        assert_eq!(
            detect_language("Der Patient wurde in der Klinik gesehen und die Werte sind nicht auffällig für das Alter.").as_deref(),
            Some("de")
        );
        assert_eq!(detect_language("Hb 13.2 g/dL"), None);
    }

    #[test]
    fn garbage_that_claims_to_be_a_pdf_is_unreadable_not_a_crash() {
        let mut bytes = b"%PDF-1.7\n".to_vec();
        bytes.extend((0..5000u32).map(|i| (i * 7919 % 251) as u8));
        let result = analyze_pdf(&bytes, &ParseLimits::default());
        assert!(
            matches!(result, Err(ProcessError::Abort(Refusal::Unreadable))),
            "{result:?}"
        );
    }

    #[test]
    fn a_photo_gives_its_pixel_size() {
        let img = image::RgbImage::from_pixel(321, 123, image::Rgb([1, 2, 3]));
        let mut png = Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let result = analyze_image(png.get_ref(), MediaType::Png, &ParseLimits::default()).unwrap();
        assert_eq!(result.document.pixel_width, Some(321));
        assert_eq!(result.document.pixel_height, Some(123));
        assert_eq!(result.document.page_count, Some(1));
        assert_eq!(result.text, None);
    }

    #[test]
    fn a_pixel_flood_png_is_refused_without_allocating() {
        let started = std::time::Instant::now();
        let result = analyze_image(
            &photo::tests::pixel_flood_png(),
            MediaType::Png,
            &ParseLimits::default(),
        );
        // Over the pixel limits: too complex (a limit), not damaged.
        assert!(
            matches!(result, Err(ProcessError::Abort(Refusal::TooComplex))),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_truncated_photo_is_unreadable_though_its_header_is_fine() {
        let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut png = Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png).unwrap();
        let mut bytes = png.into_inner();
        bytes.truncate(bytes.len() / 2);
        let result = analyze_image(&bytes, MediaType::Png, &ParseLimits::default());
        assert!(
            matches!(result, Err(ProcessError::Abort(Refusal::Unreadable))),
            "{result:?}"
        );
    }
}
