//! Tolerant PDF reading: every real PDF of the corpus, damaged the ways PDFs are damaged in the
//! field (offsets shifted, `startxref` wrong, the xref table gone or zeroed, stream lengths
//! wrong, linearization data garbage, junk before the header), still opens with its page count
//! and the same text as the undamaged file, for the local analysis and for Claude. Unusual
//! content filters are decoded; a damaged encrypted file is still told apart as encrypted.
//! Then the same through the real service.

use medrelay::config::Settings;
use medrelay::processor::anthropic::prepare::split_pdf;
use medrelay::processor::local::analyze;
use medrelay::processor::{Document, MediaType, ParseLimits, ProcessError, Refusal};

use crate::fixtures::{ContentFilter, Damage, corpus_file, corpus_manifest, text_pdf_encoded};
use crate::harness::{Backend, TestApp};

on_every_backend!(damaged_pdfs_through_the_service_succeed_with_their_page_counts);

fn limits() -> ParseLimits {
    ParseLimits::from_settings(&Settings::defaults())
}

fn pdf(bytes: Vec<u8>) -> Document {
    Document {
        media_type: MediaType::Pdf,
        bytes: bytes.into(),
    }
}

/// Page count and text of the local analysis, or its refusal.
fn read(bytes: &[u8]) -> Result<(u32, Option<String>), Refusal> {
    match analyze(&pdf(bytes.to_vec()), &limits()) {
        Ok(result) => Ok((result.document.page_count.unwrap(), result.text)),
        Err(ProcessError::Abort(refusal)) => Err(refusal),
        Err(other) => panic!("not a refusal: {other:?}"),
    }
}

#[test]
fn damaged_corpus_pdfs_read_like_the_originals() {
    let (mut variants, mut strict_fails) = (0, 0);
    for entry in corpus_manifest() {
        if entry.encrypted {
            continue;
        }
        let (name, pages) = (&entry.file, entry.pages);
        let original = corpus_file(name);
        let (want_pages, want_text) = read(&original).unwrap_or_else(|r| panic!("{name}: {r:?}"));
        assert_eq!(u64::from(want_pages), pages, "{name}");
        for damage in Damage::ALL {
            let Some(damaged) = damage.apply(&original) else {
                continue;
            };
            assert_ne!(damaged, original, "{name} {damage:?}: nothing was damaged");
            variants += 1;
            // The strict reader alone (lopdf) refuses most of these: they test the fallback.
            let strict = lopdf::Document::load_mem(&damaged);
            if strict.map_or(true, |d| d.get_pages().is_empty()) {
                strict_fails += 1;
            }
            let (got_pages, got_text) =
                read(&damaged).unwrap_or_else(|r| panic!("{name} {damage:?}: {r:?}"));
            assert_eq!(got_pages, want_pages, "{name} {damage:?}");
            assert_eq!(got_text, want_text, "{name} {damage:?}");
            // What would go to Claude: new PDFs holding every page.
            let parts = split_pdf(&damaged, &limits())
                .unwrap_or_else(|e| panic!("{name} {damage:?} for Claude: {e:?}"));
            let sent: u32 = parts.iter().map(|(_, pages)| pages).sum();
            assert_eq!(sent, want_pages, "{name} {damage:?} for Claude");
            for (part, part_pages) in &parts {
                let reread = lopdf::Document::load_mem(part).unwrap();
                assert_eq!(reread.get_pages().len() as u32, *part_pages);
            }
        }
    }
    // 15 readable files, 77 variants (the xref-table damages skip files with xref streams,
    // only one file is linearized); lopdf alone reads 56 of them wrongly or not at all.
    assert!(variants >= 75, "{variants} damaged variants");
    assert!(strict_fails >= 50, "lopdf alone failed only {strict_fails}");
}

#[test]
fn a_damaged_encrypted_pdf_is_still_encrypted() {
    let encrypted = corpus_manifest().into_iter().find(|e| e.encrypted).unwrap();
    let original = corpus_file(&encrypted.file);
    assert_eq!(read(&original), Err(Refusal::Encrypted));
    let mut seen = 0;
    for damage in Damage::ALL {
        if let Some(damaged) = damage.apply(&original) {
            seen += 1;
            assert_eq!(read(&damaged), Err(Refusal::Encrypted), "{damage:?}");
        }
    }
    assert!(seen >= 5);
}

#[test]
fn content_in_unusual_filters_is_decoded() {
    let lines = ["Discharge letter", "Amoxicillin 500 mg three times daily"];
    for filter in [ContentFilter::AsciiHex, ContentFilter::RunLength] {
        let bytes = text_pdf_encoded(&lines, filter);
        // lopdf alone cannot decode this content stream: it reads no text.
        let strict = lopdf::Document::load_mem(&bytes).unwrap();
        let strict_text = strict.extract_text(&[1]).unwrap_or_default();
        assert!(
            !strict_text.contains("Amoxicillin"),
            "{filter:?}: {strict_text:?}"
        );
        let (pages, text) = read(&bytes).unwrap();
        assert_eq!(pages, 1);
        let text = text.unwrap_or_default();
        assert!(text.contains("Amoxicillin 500 mg"), "{filter:?}: {text:?}");
    }
}

/// One damaged file per kind of damage (and one per unusual filter) through the real service.
async fn damaged_pdfs_through_the_service_succeed_with_their_page_counts(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("damaged-files");
    let mut uploads = Vec::new();
    let files = corpus_manifest();
    for (i, damage) in Damage::ALL.into_iter().enumerate() {
        // A different file for each damage, where it applies.
        let (damaged, pages) = (0..files.len())
            .map(|k| &files[(i * 3 + k) % files.len()])
            .filter(|f| !f.encrypted)
            .find_map(|f| damage.apply(&corpus_file(&f.file)).map(|d| (d, f.pages)))
            .unwrap();
        let job = app.upload_ok(&token, damaged, "application/pdf").await;
        uploads.push((
            format!("{damage:?}"),
            job["id"].as_str().unwrap().to_owned(),
            pages,
        ));
    }
    for filter in [ContentFilter::AsciiHex, ContentFilter::RunLength] {
        let job = app
            .upload_ok(
                &token,
                text_pdf_encoded(&["Lab Report"], filter),
                "application/pdf",
            )
            .await;
        uploads.push((
            format!("{filter:?}"),
            job["id"].as_str().unwrap().to_owned(),
            1,
        ));
    }
    for (what, id, pages) in uploads {
        let done = app.wait_terminal(&token, &id).await;
        assert_eq!(done["status"], "succeeded", "{what}: {done}");
        assert_eq!(done["result"]["document"]["page_count"], pages, "{what}");
        assert_eq!(done["attempts"], 1, "{what}");
    }
    app.assert_store_empties().await;
    app.stop().await;
}
