//! The `anthropic` processor against a local mock of Claude's Messages API: the exact request
//! shape, photo preparation, PDF splitting, and the retry schedule the provider's answers
//! cause (counts of calls and the gaps between them).

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::claude_mock::{Call, Mock, Reply, extraction};
use crate::fixtures::{
    active_pdf_with_appended_zip, corpus_file, heavy_pdf, jpeg, jpeg_with_orientation_6, pages_pdf,
    png, webp,
};
use crate::harness::{Backend, TestApp, eventually};

pub(crate) async fn claude_app(
    base: &str,
    delays: &str,
    tweak: impl FnOnce(&mut medrelay::config::Settings),
) -> TestApp {
    let base = base.to_owned();
    let delays = delays.to_owned();
    TestApp::spawn_with(Backend::SqliteFolder, move |s| {
        s.processor = medrelay::config::ProcessorKind::Anthropic;
        s.anthropic_base_url = base;
        s.anthropic_api_key = Some(medrelay::config::Secret::new("sk-ant-test-key"));
        s.anthropic_model = "claude-test-model".into();
        s.retry_delays = medrelay::config::RetryDelays(
            delays
                .split(',')
                .map(|d| medrelay::config::duration::parse(d).unwrap())
                .collect(),
        );
        tweak(s);
    })
    .await
}

fn decoded(block: &Value) -> Vec<u8> {
    STANDARD
        .decode(block["source"]["data"].as_str().unwrap())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdf_is_sent_as_a_document_block_with_the_documented_headers() {
    let (mock, base) = Mock::start(vec![Reply::ok(extraction("page text"))], None).await;
    let app = claude_app(&base, "1s,1s,1s", |_| {}).await;
    let token = app.token("claude-user");
    let pdf = corpus_file("004-pdflatex-4-pages--pdflatex-4-pages.pdf");
    let job = app.upload_ok(&token, pdf.clone(), "application/pdf").await;
    let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let result = &done["result"];
    assert_eq!(
        result["processor"],
        json!({"name": "anthropic", "model": "claude-test-model"})
    );
    assert_eq!(
        result["document"]["page_count"], 4,
        "the page count is ours, not the model's"
    );
    assert_eq!(result["lab_results"][0]["flag"], "normal");
    assert_eq!(result["summary"], "Your blood count is normal.");

    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.headers["x-api-key"], "sk-ant-test-key");
    assert_eq!(call.headers["anthropic-version"], "2023-06-01");
    assert!(
        call.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
    let body = &call.body;
    assert_eq!(body["model"], "claude-test-model");
    assert!(body["max_tokens"].as_u64().unwrap() > 1000);
    assert!(body["system"].as_str().unwrap().contains("never invent"));
    assert_eq!(body["tools"][0]["name"], "record_extraction");
    assert_eq!(body["tools"][0]["strict"], true);
    assert_eq!(
        body["tool_choice"],
        json!({"type": "tool", "name": "record_extraction"})
    );
    let block = &body["messages"][0]["content"][0];
    assert_eq!(block["type"], "document");
    assert_eq!(block["source"]["type"], "base64");
    assert_eq!(block["source"]["media_type"], "application/pdf");
    // The parsed document, written anew: the same pages and text, not the uploaded bytes.
    let sent = decoded(block);
    assert_ne!(sent, pdf);
    let sent = lopdf::Document::load_mem(&sent).unwrap();
    let original = lopdf::Document::load_mem(&pdf).unwrap();
    assert_eq!(sent.get_pages().len(), 4);
    assert_eq!(
        sent.extract_text(&[1, 2, 3, 4]).unwrap(),
        original.extract_text(&[1, 2, 3, 4]).unwrap()
    );
    app.assert_store_empties().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn photos_are_re_encoded_upright_small_and_without_metadata() {
    let replies = (0..4)
        .map(|_| Reply::ok(extraction("photo text")))
        .collect();
    let (mock, base) = Mock::start(replies, None).await;
    let app = claude_app(&base, "1s,1s,1s", |_| {}).await;
    let token = app.token("photographer");
    let big = jpeg(6000, 4500);
    for (bytes, w, h) in [
        (jpeg(800, 600), 800, 600),
        (png(300, 200), 300, 200),
        (webp(120, 90), 120, 90),
        (big, 1568, 1176),
    ] {
        let job = app
            .upload_ok(&token, bytes, "application/octet-stream")
            .await;
        let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        let call = mock.calls().last().unwrap().clone();
        let block = &call.body["messages"][0]["content"][0];
        assert_eq!(block["type"], "image");
        assert_eq!(block["source"]["media_type"], "image/jpeg");
        let sent = decoded(block);
        assert!(
            sent.starts_with(&[0xff, 0xd8, 0xff]),
            "the bytes match the declared media type"
        );
        assert!(block["source"]["data"].as_str().unwrap().len() < 5 * 1024 * 1024);
        let image = image::load_from_memory(&sent).unwrap();
        assert_eq!((image.width(), image.height()), (w, h));
        // No EXIF (APP1) segment survives re-encoding.
        assert!(!sent.windows(4).any(|w| w == b"Exif"));
    }
    assert_eq!(mock.calls().len(), 4);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_150_page_pdf_is_split_into_two_requests_and_merged() {
    let (mock, base) = Mock::start(
        vec![
            Reply::ok(extraction("first part")),
            Reply::ok(extraction("second part")),
        ],
        None,
    )
    .await;
    let app = claude_app(&base, "1s,1s,1s", |_| {}).await;
    let token = app.token("long-record");
    let lines: Vec<String> = (1..=150)
        .map(|i| format!("Page {i} of the record"))
        .collect();
    let pdf = pages_pdf(&lines);
    let job = app.upload_ok(&token, pdf, "application/pdf").await;
    let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let calls = mock.calls();
    assert_eq!(calls.len(), 2);
    let pages: Vec<usize> = calls
        .iter()
        .map(|c| {
            lopdf::Document::load_mem(&decoded(&c.body["messages"][0]["content"][0]))
                .unwrap()
                .get_pages()
                .len()
        })
        .collect();
    assert_eq!(pages, vec![100, 50]);
    let second =
        lopdf::Document::load_mem(&decoded(&calls[1].body["messages"][0]["content"][0])).unwrap();
    assert!(second.extract_text(&[1]).unwrap().contains("Page 101"));
    let result = &done["result"];
    assert_eq!(result["document"]["page_count"], 150);
    assert_eq!(
        result["lab_results"].as_array().unwrap().len(),
        2,
        "both parts' findings are kept"
    );
    assert_eq!(result["text"], "first part\n\nsecond part");
    app.stop().await;
}

/// Uploads one document and waits for the end, recording the statuses seen on the way.
async fn run_one(app: &TestApp) -> (Value, Vec<String>) {
    let token = app.token("retry-user");
    let job = app
        .upload_ok(
            &token,
            corpus_file("001-trivial--minimal-document.pdf"),
            "application/pdf",
        )
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let seen = std::cell::RefCell::new(Vec::<String>::new());
    let job = eventually(Duration::from_secs(60), "a terminal state", || async {
        let job = app.job(&token, &id).await;
        let status = job["status"].as_str().unwrap().to_owned();
        let mut seen = seen.borrow_mut();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        match status.as_str() {
            "succeeded" | "failed" => Ok(job),
            _ => Err(status),
        }
    })
    .await;
    (job, seen.into_inner())
}

fn gaps(calls: &[Call]) -> Vec<Duration> {
    calls.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_twice_then_ok_succeeds_on_the_third_call_after_growing_delays() {
    let (mock, base) = Mock::start(
        vec![
            Reply::error(529, "overloaded_error"),
            Reply::error(529, "overloaded_error"),
            Reply::ok(extraction("ok")),
        ],
        None,
    )
    .await;
    let app = claude_app(&base, "300ms,900ms,2s", |_| {}).await;
    let (job, seen) = run_one(&app).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["attempts"], 3);
    assert!(seen.contains(&"retry_scheduled".to_owned()), "{seen:?}");
    let calls = mock.calls();
    assert_eq!(calls.len(), 3);
    let g = gaps(&calls);
    assert!(
        g[0] >= Duration::from_millis(300) && g[0] < Duration::from_millis(900),
        "{g:?}"
    );
    assert!(g[1] >= Duration::from_millis(900), "{g:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overloaded_forever_fails_after_four_calls_with_a_retryable_friendly_error() {
    let (mock, base) = Mock::start(vec![], Some(Reply::error(529, "overloaded_error"))).await;
    let app = claude_app(&base, "100ms,200ms,300ms", |_| {}).await;
    let (job, _) = run_one(&app).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["attempts"], 4);
    assert_eq!(job["error"]["retryable"], true);
    assert_eq!(job["error"]["code"], "processing-unavailable");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("provider text")
            && !message.contains("529")
            && !message.contains("overloaded"),
        "{message}"
    );
    assert_eq!(
        mock.calls().len(),
        4,
        "the first try and three retries, no more"
    );
    app.assert_store_empties().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_provider_errors_are_not_retried() {
    let spend = Reply {
        status: 429,
        headers: vec![],
        body: json!({"type": "error", "error": {"type": "rate_limit_error", "message": "x", "details": {"error_code": "enforced_spend_limit_reached"}}}),
        delay: Duration::ZERO,
    };
    let mut no_retry = Reply::error(529, "overloaded_error");
    no_retry.headers.push(("x-should-retry", "false".into()));
    for (reply, code, retryable) in [
        (
            Reply::error(400, "invalid_request_error"),
            "document-rejected",
            false,
        ),
        (
            Reply::error(401, "authentication_error"),
            "service-unavailable",
            true,
        ),
        (
            Reply::error(403, "permission_error"),
            "service-unavailable",
            true,
        ),
        (
            Reply::error(404, "not_found_error"),
            "document-rejected",
            false,
        ),
        (
            Reply::error(413, "request_too_large"),
            "document-too-complex",
            false,
        ),
        (spend, "service-unavailable", true),
        (no_retry, "document-rejected", false),
    ] {
        let (mock, base) = Mock::start(vec![], Some(reply)).await;
        let app = claude_app(&base, "100ms,100ms,100ms", |_| {}).await;
        let (job, _) = run_one(&app).await;
        assert_eq!(job["status"], "failed");
        assert_eq!(job["error"]["code"], code);
        assert_eq!(job["error"]["retryable"], retryable);
        assert_eq!(job["attempts"], 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(mock.calls().len(), 1, "{code}: no retry");
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_from_the_provider_is_a_floor_for_the_next_delay() {
    let mut limited = Reply::error(429, "rate_limit_error");
    limited.headers.push(("retry-after", "2".into()));
    let (mock, base) = Mock::start(vec![limited, Reply::ok(extraction("ok"))], None).await;
    let app = claude_app(&base, "100ms,100ms,100ms", |_| {}).await;
    let (job, _) = run_one(&app).await;
    assert_eq!(job["status"], "succeeded");
    let g = gaps(&mock.calls());
    assert!(g[0] >= Duration::from_secs(2), "{g:?}");
    assert!(g[0] < Duration::from_secs(4), "{g:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_tool_output_is_a_classified_failure() {
    let mut bad = extraction("x");
    bad["document"]["type"] = json!("horoscope");
    let mut bad_date = extraction("x");
    bad_date["document"]["date"] = json!("2 Oct 2026");
    let truncated = Reply {
        status: 200,
        headers: vec![],
        body: json!({"content": [], "stop_reason": "max_tokens"}),
        delay: Duration::ZERO,
    };
    let (mock, base) = Mock::start(
        vec![
            Reply::ok(bad),
            Reply::ok(bad_date),
            Reply::ok(json!("not an object")),
        ],
        Some(truncated),
    )
    .await;
    let app = claude_app(&base, "50ms,50ms,50ms", |_| {}).await;
    let (job, _) = run_one(&app).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(
        job["error"]["code"], "document-too-complex",
        "three invalid answers were retried, the truncated one ended it"
    );
    assert_eq!(mock.calls().len(), 4);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_photo_is_turned_upright_from_its_exif_and_the_exif_is_dropped() {
    let (mock, base) = Mock::start(vec![Reply::ok(extraction("upright"))], None).await;
    let app = claude_app(&base, "1s,1s,1s", |_| {}).await;
    let token = app.token("sideways");
    let photo = jpeg_with_orientation_6(400, 200);
    assert!(photo.windows(19).any(|w| w == b"GPS-CANARY-48.8584N"));
    let job = app.upload_ok(&token, photo, "image/jpeg").await;
    let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let sent = decoded(&mock.calls()[0].body["messages"][0]["content"][0]);
    let image = image::load_from_memory(&sent).unwrap();
    assert_eq!(
        (image.width(), image.height()),
        (200, 400),
        "rotated upright"
    );
    assert!(!sent.windows(4).any(|w| w == b"Exif"));
    assert!(!sent.windows(10).any(|w| w == b"GPS-CANARY"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdf_too_large_for_one_request_is_split_by_size() {
    let replies = (0..4)
        .map(|i| Reply::ok(extraction(&format!("part {i}"))))
        .collect();
    let (mock, base) = Mock::start(replies, None).await;
    let app = claude_app(&base, "1s,1s,1s", |_| {}).await;
    let token = app.token("big-scans");
    let pdf = heavy_pdf(3, 10 * 1024 * 1024);
    assert!(pdf.len() > 30 * 1024 * 1024 && pdf.len() < 32 * 1024 * 1024);
    let job = app.upload_ok(&token, pdf, "application/pdf").await;
    let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["document"]["page_count"], 3);
    let calls = mock.calls();
    assert!(calls.len() >= 2, "{} calls", calls.len());
    let mut pages = 0;
    for call in &calls {
        let data = call.body["messages"][0]["content"][0]["source"]["data"]
            .as_str()
            .unwrap();
        assert!(
            data.len() <= 30 * 1024 * 1024,
            "a request part of {} bytes",
            data.len()
        );
        pages += lopdf::Document::load_mem(&STANDARD.decode(data).unwrap())
            .unwrap()
            .get_pages()
            .len();
    }
    assert_eq!(pages, 3);
    app.stop().await;
}

#[test]
fn recorded_answers_map_as_documented() {
    use medrelay::processor::anthropic::{classify_error, parse_answer};
    use medrelay::processor::{ProcessError, Refusal};
    use reqwest::StatusCode;
    use reqwest::header::HeaderMap;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/anthropic");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
    let none = HeaderMap::new();
    let retry = |status: u16, file: &str| {
        matches!(
            classify_error(StatusCode::from_u16(status).unwrap(), &none, &read(file)),
            ProcessError::Retry { .. }
        )
    };
    let abort = |status: u16, file: &str| match classify_error(
        StatusCode::from_u16(status).unwrap(),
        &none,
        &read(file),
    ) {
        ProcessError::Abort(r) => Some(r),
        _ => None,
    };
    assert!(retry(529, "overloaded_529.json"));
    assert!(retry(429, "rate_limit_429.json"));
    assert!(retry(500, "api_error_500.json"));
    assert_eq!(
        abort(429, "spend_limit_429.json"),
        Some(Refusal::ServiceUnavailable)
    );
    assert_eq!(
        abort(400, "invalid_request_400.json"),
        Some(Refusal::Rejected)
    );
    assert_eq!(
        abort(401, "authentication_401.json"),
        Some(Refusal::ServiceUnavailable)
    );
    assert_eq!(
        abort(413, "request_too_large_413.json"),
        Some(Refusal::TooComplex)
    );
    let result = parse_answer(&read("tool_use_200.json")).unwrap();
    let json = serde_json::to_value(&result).unwrap();
    assert_eq!(json["document"]["type"], "lab_report");
    assert_eq!(json["lab_results"][0]["flag"], "low");
    assert_eq!(json["medications"][0]["dose"], "325 mg");
    assert_eq!(json["diagnoses"][0]["code_system"], "ICD-10");
    // The provider's own words never reach a job's error.
    for file in ["invalid_request_400.json", "spend_limit_429.json"] {
        let status = if file.contains("400") { 400 } else { 429 };
        if let ProcessError::Abort(r) =
            classify_error(StatusCode::from_u16(status).unwrap(), &none, &read(file))
        {
            let message = r.job_error().message;
            assert!(
                !message.contains("PDF specified") && !message.contains("workspace"),
                "{message}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pdf_reaches_claude_without_scripts_actions_attachments_or_appended_bytes() {
    let (mock, base) = Mock::start(vec![Reply::ok(extraction("read as data"))], None).await;
    let app = claude_app(&base, "1s,1s,1s", |_| {}).await;
    let token = app.token("careful");
    let marker = "CANARY-8830";
    let pdf = active_pdf_with_appended_zip("Potassium 4.1 mmol/L", marker);
    let parts = ["JS", "EMBEDDED", "XFA", "LAUNCH", "ZIP"];
    for part in parts {
        let needle = format!("{marker}-{part}");
        assert!(
            pdf.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the fixture carries {needle}"
        );
    }
    // The file is also a ZIP archive: its end-of-central-directory record points at the
    // directory, which points at the stored file (offsets from the start of the PDF).
    let at = |offset: usize| u32::from_le_bytes(pdf[offset..offset + 4].try_into().unwrap());
    let end = pdf.len() - 22;
    assert_eq!(&pdf[end..end + 4], b"PK\x05\x06");
    let directory = at(end + 16) as usize;
    assert_eq!(&pdf[directory..directory + 4], b"PK\x01\x02");
    let local = at(directory + 42) as usize;
    assert_eq!(&pdf[local..local + 4], b"PK\x03\x04");
    let job = app.upload_ok(&token, pdf, "application/pdf").await;
    let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    let sent = decoded(&calls[0].body["messages"][0]["content"][0]);
    assert!(
        !sent.windows(marker.len()).any(|w| w == marker.as_bytes()),
        "something active or attached reached the provider: {}",
        String::from_utf8_lossy(&sent)
    );
    assert!(!sent.windows(4).any(|w| w == b"PK\x03\x04"), "the ZIP");
    let sent = lopdf::Document::load_mem(&sent).unwrap();
    assert!(
        sent.extract_text(&[1])
            .unwrap()
            .contains("Potassium 4.1 mmol/L")
    );
    app.stop().await;
}
