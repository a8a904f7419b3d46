//! The demo page (`/demo`), in a real browser: Debian's chromium, headless, driven through
//! playwright-core by `tests/demo/browser.mjs` (both installed by `scripts/test`). A person
//! signs in, sends a real PDF of the corpus and a photo, watches each reach `succeeded`, reads
//! the result's tables, deletes the job, and sends a file the service does not take. The page
//! takes nothing from anywhere but the server, and breaks no rule of its own CSP. A screenshot
//! goes to `target/demo.png`.

use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use medrelay::model::{Diagnosis, DocumentResult, DocumentType, LabFlag, LabResult, Medication};
use medrelay::processor::{CallBudget, Document, ProcessError, Processor};
use reqwest::StatusCode;
use serde_json::Value;

use crate::fixtures::{corpus_file, png};
use crate::harness::{Backend, TestApp};

/// The configured processor's result, with what a clinic letter would carry.
struct Clinic(Arc<dyn Processor>);

impl Processor for Clinic {
    fn name(&self) -> &'static str {
        "clinic"
    }

    fn process<'a>(
        &'a self,
        document: Document,
        budget: &'a dyn CallBudget,
    ) -> BoxFuture<'a, Result<DocumentResult, ProcessError>> {
        Box::pin(async move {
            let mut result = self.0.process(document, budget).await?;
            result.document.kind = DocumentType::LabReport;
            result.document.date = Some("2026-11-02".into());
            result.summary = Some("Blood count within range; potassium slightly high.".into());
            result.medications = vec![Medication {
                name: "Metoprolol".into(),
                dose: Some("47.5 mg".into()),
                frequency: Some("once daily".into()),
                route: Some("oral".into()),
                instructions: None,
            }];
            result.lab_results = vec![LabResult {
                test: "Potassium".into(),
                value: Some("5.4".into()),
                unit: Some("mmol/L".into()),
                reference_range: Some("3.5-5.1".into()),
                flag: Some(LabFlag::High),
            }];
            result.diagnoses = vec![Diagnosis {
                description: "Essential hypertension".into(),
                code: Some("I10".into()),
                code_system: Some("ICD-10".into()),
            }];
            Ok(result)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_sends_a_pdf_and_a_photo_through_the_demo_page_in_a_real_browser() {
    let app = TestApp::spawn_custom(
        Backend::SqliteFolder,
        // As on a developer's machine: a generated token secret, so the page can sign in.
        |s| s.jwt_secret = None,
        |state| state.processor = Arc::new(Clinic(state.processor.clone())),
    )
    .await;
    // The page itself: a strict CSP, nothing inline.
    let page = app.http.get(app.url("/demo")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    let html = page.text().await.unwrap();
    assert!(
        !html.contains("<script>") && !html.contains(" style="),
        "nothing inline"
    );

    let tools = std::env::var("MEDRELAY_BROWSER_TOOLS").expect(
        "the browser test's tools are not installed: run scripts/test (it installs Debian's \
         chromium and playwright-core and exports MEDRELAY_BROWSER_TOOLS), or `source \
         scripts/services.sh` in this shell first",
    );
    let dir = tempfile::tempdir().unwrap();
    let pdf = dir.path().join("letter.pdf");
    std::fs::write(
        &pdf,
        corpus_file("004-pdflatex-4-pages--pdflatex-4-pages.pdf"),
    )
    .unwrap();
    let photo = dir.path().join("photo.png");
    std::fs::write(&photo, png(40, 30)).unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "Not a document type the service takes.\n".repeat(40)).unwrap();
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/demo.png");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/demo/browser.mjs");
    let out = tokio::process::Command::new("node")
        .arg(script)
        .arg(app.url("/demo"))
        .args([&pdf, &photo, &text])
        .arg(&target)
        .env("MEDRELAY_BROWSER_TOOLS", tools)
        .kill_on_drop(true)
        .output()
        .await
        .expect("node runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the browser run failed: {stderr}");
    let seen: Value = serde_json::from_slice(out.stdout.trim_ascii())
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));

    assert!(
        seen["notice"].as_str().unwrap().contains("one hour"),
        "{seen}"
    );
    assert_eq!(seen["pdf"]["status"], "succeeded", "{seen}");
    assert_eq!(seen["pdf"]["type"], "lab report");
    assert_eq!(
        seen["pdf"]["medications"][0],
        serde_json::json!(["Metoprolol", "47.5 mg", "once daily", "oral"])
    );
    assert_eq!(
        seen["pdf"]["labs"][0],
        serde_json::json!(["Potassium", "5.4", "mmol/L", "3.5-5.1", "high"])
    );
    assert_eq!(
        seen["pdf"]["diagnoses"][0],
        serde_json::json!(["Essential hypertension", "ICD-10 I10"])
    );
    assert!(seen["pdf"]["expires"].as_str().unwrap().contains("min"));
    assert_eq!(seen["deleted"], "deleted");
    assert_eq!(seen["photo"]["status"], "succeeded", "{seen}");
    let unsupported = seen["unsupported"].as_str().unwrap();
    assert!(unsupported.contains("PDF or a photo"), "{unsupported}");
    // The browser reports every answer over 399 as a console error (the 415 is the point of
    // the last step); anything else, a CSP violation above all, is a failure.
    let errors: Vec<&str> = seen["console_errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|e| {
            !e.starts_with("Failed to load resource: the server responded with a status of 415")
        })
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(seen["requests_elsewhere"], serde_json::json!([]));
    assert!(
        std::fs::metadata(&target).unwrap().len() > 10_000,
        "a screenshot"
    );

    // The deleted job is gone on the server too: only the photo's job is left.
    let jobs = app.list_jobs(&app.token("browser")).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["media_type"], "image/png");
    app.stop().await;
}

#[tokio::test]
async fn the_demo_is_off_where_asked_and_its_sign_in_only_with_a_generated_secret() {
    // A configured secret: the page, but no development sign-in.
    let app = TestApp::spawn_with(Backend::SqliteFolder, |s| {
        s.jwt_secret = Some(medrelay::config::Secret::new(
            "a configured secret of 40 characters..",
        ))
    })
    .await;
    assert_eq!(
        app.http
            .get(app.url("/demo"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let r = app
        .http
        .post(app.url("/demo/token"))
        .json(&serde_json::json!({"user": "mallory"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    app.stop().await;
    // A developer's machine: the sign-in, for pages of this machine only (DNS rebinding).
    let app = TestApp::spawn_with(Backend::SqliteFolder, |s| s.jwt_secret = None).await;
    let sign_in = |host: Option<&str>, origin: Option<&str>| {
        let mut request = app
            .http
            .post(app.url("/demo/token"))
            .json(&serde_json::json!({"user": "dev"}));
        if let Some(host) = host {
            request = request.header("host", host);
        }
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request.send()
    };
    let r = sign_in(None, None).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let token: Value = r.json().await.unwrap();
    assert!(
        token["token"]
            .as_str()
            .is_some_and(|t| t.split('.').count() == 3)
    );
    let local = app.addr.trim_start_matches("http://").to_owned();
    let r = sign_in(None, Some(&format!("http://{local}")))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for (host, origin) in [
        (Some("evil.example:8080"), None),
        (None, Some("http://evil.example")),
        (Some("127.0.0.1.evil.example"), None),
    ] {
        let r = sign_in(host, origin).await.unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{host:?} {origin:?}");
    }
    app.stop().await;
    // Listening beyond the loopback: no sign-in, whatever the secret.
    let app = TestApp::spawn_with(Backend::SqliteFolder, |s| {
        s.jwt_secret = None;
        s.listen = "0.0.0.0:0".into();
    })
    .await;
    let r = app
        .http
        .post(app.url("/demo/token"))
        .json(&serde_json::json!({"user": "dev"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    app.stop().await;
    // Turned off: no page.
    let app = TestApp::spawn_with(Backend::SqliteFolder, |s| s.demo = Some(false)).await;
    assert_eq!(
        app.http
            .get(app.url("/demo"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    app.stop().await;
    // A shared deployment: off unless asked for.
    let app = TestApp::spawn(Backend::PostgresS3).await;
    assert_eq!(
        app.http
            .get(app.url("/demo"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );
    app.stop().await;
}
