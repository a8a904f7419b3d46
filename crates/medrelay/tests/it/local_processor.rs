//! The offline `local` processor, through the whole service: photos report their type and
//! pixel size, simple rules fill the document type and date.

use crate::fixtures::{jpeg, png, scan_pdf, text_pdf, webp};
use crate::harness::{Backend, TestApp};

on_every_backend!(
    photos_report_their_type_and_pixel_size,
    simple_rules_fill_the_document_type_and_date,
);

async fn photos_report_their_type_and_pixel_size(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("photographer");
    for (bytes, media_type, w, h) in [
        (jpeg(640, 480), "image/jpeg", 640, 480),
        (png(300, 200), "image/png", 300, 200),
        (webp(120, 90), "image/webp", 120, 90),
    ] {
        let job = app
            .upload_ok(&token, bytes, "application/octet-stream")
            .await;
        assert_eq!(job["media_type"], media_type);
        let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let doc = &done["result"]["document"];
        assert_eq!(doc["pixel_width"], w);
        assert_eq!(doc["pixel_height"], h);
        assert_eq!(doc["media_type"], media_type);
        assert!(done["result"]["text"].is_null());
    }
    // A truncated photo is refused as unreadable, not retried.
    let mut broken = jpeg(64, 64);
    broken.truncate(12);
    let job = app.upload_ok(&token, broken, "image/jpeg").await;
    let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["code"], "document-unreadable");
    assert_eq!(done["error"]["retryable"], false);
    app.assert_store_empties().await;
    app.stop().await;
}

async fn simple_rules_fill_the_document_type_and_date(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("lab");
    let pdf = text_pdf(&[
        "City Hospital Laboratory",
        "Lab Report",
        "Collected: 2026-10-02",
        "Hemoglobin 13.2 g/dL   Reference range 12.0 - 16.0",
        "The patient sample was analysed and the results are listed in this report.",
    ]);
    let job = app.upload_ok(&token, pdf, "application/pdf").await;
    let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let doc = &done["result"]["document"];
    assert_eq!(doc["type"], "lab_report", "{done}");
    assert_eq!(doc["date"], "2026-10-02");
    assert_eq!(doc["page_count"], 1);
    assert_eq!(doc["language"], "en");
    assert!(
        done["result"]["text"]
            .as_str()
            .unwrap()
            .contains("Hemoglobin 13.2")
    );
    app.stop().await;
}

/// Nothing is inflated that reading does not need: a scan whose images inflate to 420 MB, far
/// over the 256 MiB cap on inflated bytes, is read (its images are copied, never decoded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_mb_scan_of_50_pages_at_300_dpi_is_read() {
    let app = TestApp::spawn(Backend::SqliteFolder).await;
    let token = app.token("scanner");
    let scan = scan_pdf(50, 2550, 3300);
    assert!(
        (24 << 20..32 << 20).contains(&scan.len()),
        "a scan of about 30 MB: {} bytes",
        scan.len()
    );
    let job = app.upload_ok(&token, scan, "application/pdf").await;
    let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["document"]["page_count"], 50);
    let text = done["result"]["text"].as_str().unwrap();
    assert!(text.contains("Scanned page 50"), "{text}");
    app.stop().await;
}
