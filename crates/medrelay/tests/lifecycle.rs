//! The behavioural suite of the document lifecycle, run against every backend:
//! SQLite and PostgreSQL, each with the local folder and with S3 (moto).

mod common;

use std::time::Duration;

use common::{Backend, TestApp, assert_problem, corpus_file, jpeg, png, text_pdf, webp};
use reqwest::StatusCode;
use serde_json::Value;

on_every_backend!(
    a_real_pdf_is_read_and_then_forgotten,
    every_corpus_pdf_gets_its_manifest_page_count,
    multipart_uploads_take_the_file_part,
    the_type_comes_from_the_bytes_not_the_declared_type,
    photos_report_their_type_and_pixel_size,
    unsupported_files_are_refused_and_leave_nothing,
    an_empty_upload_is_a_bad_request,
    oversized_uploads_are_refused_with_or_without_a_length,
    bad_tokens_get_401_as_problem_json,
    another_users_job_is_a_404_on_every_route,
    the_same_idempotency_key_returns_the_same_job,
    deleting_my_data_removes_every_job_and_object,
    jobs_are_listed_newest_first,
    events_stream_the_job_until_it_is_terminal,
    an_accepted_job_survives_a_restart,
    expired_jobs_answer_410_and_their_data_is_gone,
    operations_routes_answer,
    simple_rules_fill_the_document_type_and_date,
);

async fn a_real_pdf_is_read_and_then_forgotten(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let alice = app.token("alice");
    let job = app
        .upload_ok(
            &alice,
            corpus_file("004-pdflatex-4-pages--pdflatex-4-pages.pdf"),
            "application/pdf",
        )
        .await;
    assert_eq!(job["status"], "queued");
    assert_eq!(job["media_type"], "application/pdf");
    assert_eq!(job["size_bytes"], 24607);
    assert_eq!(job["max_attempts"], 4);
    assert!(job["result"].is_null() && job["error"].is_null());
    let id = job["id"].as_str().unwrap();

    let done = app.wait_terminal(&alice, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 1);
    let result = &done["result"];
    assert_eq!(result["processor"]["name"], "local");
    assert_eq!(result["document"]["page_count"], 4);
    let text = result["text"].as_str().unwrap();
    assert!(
        text.contains("Hello, here is some text without a meaning"),
        "{text}"
    );
    for list in [
        "providers",
        "diagnoses",
        "medications",
        "lab_results",
        "allergies",
        "procedures",
        "follow_up",
    ] {
        assert!(result[list].is_array(), "{list} must be a list");
    }
    // Expiry is creation + TTL (1 h by default).
    let created = time::OffsetDateTime::parse(
        done["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let expires = time::OffsetDateTime::parse(
        done["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!((expires - created).whole_seconds(), 3600);

    // Success deleted the document; only the result (in the database) remains.
    app.assert_store_empties().await;

    let deleted = app
        .http
        .delete(app.url(&format!("/v1/jobs/{id}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_problem(app.get_job(&alice, id).await, 404, "job-not-found").await;
    // Deleting again is success: it is gone either way.
    let again = app
        .http
        .delete(app.url(&format!("/v1/jobs/{id}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NO_CONTENT);
    app.assert_store_empties().await;
    app.stop().await;
}

async fn every_corpus_pdf_gets_its_manifest_page_count(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("corpus-reader");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(common::corpus_dir().join("manifest.json")).unwrap())
            .unwrap();
    let mut ids = Vec::new();
    for entry in manifest["files"].as_array().unwrap() {
        let name = entry["file"].as_str().unwrap();
        let job = app
            .upload_ok(&token, corpus_file(name), "application/octet-stream")
            .await;
        ids.push((entry.clone(), job["id"].as_str().unwrap().to_owned()));
    }
    assert!(ids.len() >= 16);
    for (entry, id) in ids {
        let name = entry["file"].as_str().unwrap();
        let job = app.wait_terminal(&token, &id).await;
        if entry["encrypted"] == true {
            assert_eq!(job["status"], "failed", "{name}: {job}");
            assert_eq!(job["error"]["code"], "document-encrypted", "{name}");
            assert_eq!(job["error"]["retryable"], false, "{name}");
            assert!(
                job["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("password")
            );
        } else {
            assert_eq!(job["status"], "succeeded", "{name}: {job}");
            assert_eq!(
                job["result"]["document"]["page_count"], entry["pages"],
                "{name}"
            );
        }
    }
    app.assert_store_empties().await;
    app.stop().await;
}

async fn multipart_uploads_take_the_file_part(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("multipart-user");
    let form = reqwest::multipart::Form::new()
        .text("note", "ignored")
        .part(
            "file",
            reqwest::multipart::Part::bytes(corpus_file("001-trivial--minimal-document.pdf"))
                .file_name("../../etc/passwd\u{202e}fdp.pdf")
                .mime_str("image/png")
                .unwrap(),
        );
    let response = app
        .http
        .post(app.url("/v1/documents"))
        .bearer_auth(&token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["media_type"], "application/pdf");
    assert_eq!(job["size_bytes"], 16978);
    let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    assert_eq!(done["result"]["document"]["page_count"], 1);

    // A form without a `file` part.
    let form = reqwest::multipart::Form::new().text("document", "not a file");
    let response = app
        .http
        .post(app.url("/v1/documents"))
        .bearer_auth(&token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "missing-file").await;
    app.assert_store_empties().await;
    app.stop().await;
}

async fn the_type_comes_from_the_bytes_not_the_declared_type(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("sniffer");
    let job = app.upload_ok(&token, png(40, 30), "application/pdf").await;
    assert_eq!(job["media_type"], "image/png");
    let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["result"]["document"]["media_type"], "image/png");
    let job = app
        .upload_ok(
            &token,
            corpus_file("002-trivial-libre-office-writer--002-trivial-libre-office-writer.pdf"),
            "image/jpeg",
        )
        .await;
    assert_eq!(job["media_type"], "application/pdf");
    app.stop().await;
}

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

async fn unsupported_files_are_refused_and_leave_nothing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("refused");
    let elf = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\x02\0>\0".repeat(10);
    let html = b"<!doctype html><html><body>%PDF</body></html>".to_vec();
    let zip = b"PK\x03\x04\x14\0\0\0\x08\0".repeat(20);
    let svg = b"<svg xmlns=\"http://www.w3.org/2000/svg\"></svg>".to_vec();
    for bytes in [elf, html, zip, svg] {
        let response = app.upload(&token, bytes, "application/pdf").await;
        let problem = assert_problem(response, 415, "unsupported-media-type").await;
        assert_eq!(problem["retryable"], false);
    }
    // HEIC: refused with advice to send JPEG.
    let mut heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic".to_vec();
    heic.extend(vec![0u8; 2000]);
    let response = app.upload(&token, heic, "image/heic").await;
    let problem = assert_problem(response, 415, "unsupported-media-type").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("JPEG"),
        "{problem}"
    );

    let list = app.list_jobs(&token).await;
    assert_eq!(list.len(), 0);
    app.assert_store_empties().await;
    app.stop().await;
}

async fn an_empty_upload_is_a_bad_request(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("empty");
    let response = app.upload(&token, Vec::new(), "application/pdf").await;
    assert_problem(response, 400, "empty-document").await;
    // Empty without a Content-Length (chunked).
    let body = reqwest::Body::wrap_stream(futures::stream::iter(Vec::<
        Result<Vec<u8>, std::io::Error>,
    >::new()));
    let response = app
        .http
        .post(app.url("/v1/documents"))
        .bearer_auth(&token)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_problem(response, 400, "empty-document").await;
    app.assert_store_empties().await;
    app.stop().await;
}

async fn oversized_uploads_are_refused_with_or_without_a_length(backend: Backend) {
    let limit = 6 * 1024 * 1024;
    let app = TestApp::spawn_with(backend, |s| s.max_upload_bytes = limit).await;
    let token = app.token("big");
    let mut big = b"%PDF-1.7\n".to_vec();
    big.resize(limit as usize + 1, b'x');

    let response = app.upload(&token, big.clone(), "application/pdf").await;
    let problem = assert_problem(response, 413, "document-too-large").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("6 MB"),
        "{problem}"
    );

    // Chunked, no Content-Length: refused once the limit is crossed; the partial write
    // (a multipart upload on S3) is aborted.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(256 * 1024).map(|c| Ok(c.to_vec())).collect();
    let response = app
        .http
        .post(app.url("/v1/documents"))
        .bearer_auth(&token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_problem(response, 413, "document-too-large").await;

    // Exactly at the limit is fine.
    big.truncate(limit as usize);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(256 * 1024).map(|c| Ok(c.to_vec())).collect();
    let response = app
        .http
        .post(app.url("/v1/documents"))
        .bearer_auth(&token)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["size_bytes"], limit);
    let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "failed", "padding is not a PDF");
    assert_eq!(done["error"]["code"], "document-unreadable");
    app.assert_store_empties().await;
    app.stop().await;
}

async fn bad_tokens_get_401_as_problem_json(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let routes = [
        ("GET", "/v1/jobs".to_owned()),
        ("GET", "/v1/jobs/0193abcd".to_owned()),
        ("DELETE", "/v1/jobs/0193abcd".to_owned()),
        ("GET", "/v1/jobs/0193abcd/events".to_owned()),
        ("DELETE", "/v1/me/data".to_owned()),
        ("POST", "/v1/documents".to_owned()),
    ];
    let forged = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let claims =
            serde_json::json!({"sub": "alice", "exp": jsonwebtoken::get_current_timestamp() + 600});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"not-the-server-secret-not-the-server").unwrap(),
        )
        .unwrap()
    };
    let expired = {
        let auth = &app.state().auth;
        // Minted with the right key but already two minutes past its expiry.
        let secret = std::fs::read_to_string(app.data_dir.path().join("jwt.secret")).unwrap();
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.trim())
            .unwrap();
        let _ = auth;
        let claims =
            serde_json::json!({"sub": "alice", "exp": jsonwebtoken::get_current_timestamp() - 120});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&key).unwrap(),
        )
        .unwrap()
    };
    let unsigned = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(r#"{"sub":"alice","exp":9999999999}"#)
        )
    };
    for (method, path) in &routes {
        for auth in [
            None,
            Some("Bearer".to_owned()),
            Some("Bearer not.a.jwt".into()),
            Some(format!("Bearer {forged}")),
            Some(format!("Bearer {expired}")),
            Some(format!("Bearer {unsigned}")),
            Some(format!("Basic {forged}")),
        ] {
            let mut req = app.http.request(method.parse().unwrap(), app.url(path));
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let response = req.send().await.unwrap();
            let problem = assert_problem(response, 401, "unauthorized").await;
            assert_eq!(problem["retryable"], false);
        }
    }
    // The right token works.
    let ok = app
        .http
        .get(app.url("/v1/jobs"))
        .bearer_auth(app.token("alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    app.stop().await;
}

async fn another_users_job_is_a_404_on_every_route(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let alice = app.token("alice");
    let mallory = app.token("mallory");
    let job = app.upload_ok(&alice, png(10, 10), "image/png").await;
    let id = job["id"].as_str().unwrap();
    app.wait_terminal(&alice, id).await;

    let missing = "0193ffff-0000-7000-8000-000000000000";
    for target in [id, missing] {
        let r = app.get_job(&mallory, target).await;
        let foreign = assert_problem(r, 404, "job-not-found").await;
        let r = app
            .http
            .get(app.url(&format!("/v1/jobs/{target}/events")))
            .bearer_auth(&mallory)
            .send()
            .await
            .unwrap();
        let foreign_events = assert_problem(r, 404, "job-not-found").await;
        let r = app
            .http
            .delete(app.url(&format!("/v1/jobs/{target}")))
            .bearer_auth(&mallory)
            .send()
            .await
            .unwrap();
        let foreign_delete = assert_problem(r, 404, "job-not-found").await;
        // Indistinguishable from a job that does not exist.
        assert_eq!(foreign["detail"], foreign_events["detail"]);
        assert_eq!(foreign["detail"], foreign_delete["detail"]);
    }
    let list = app.list_jobs(&mallory).await;
    assert!(list.is_empty());
    // Mallory deleting all of her data leaves Alice's job alone.
    let r = app
        .http
        .delete(app.url("/v1/me/data"))
        .bearer_auth(&mallory)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = app.get_job(&alice, id).await;
    assert_eq!(r.status(), StatusCode::OK);
    app.stop().await;
}

async fn the_same_idempotency_key_returns_the_same_job(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("retrying-phone");
    let send = |key: &'static str| {
        app.http
            .post(app.url("/v1/documents"))
            .bearer_auth(&token)
            .header("idempotency-key", key)
            .body(corpus_file("001-trivial--minimal-document.pdf"))
            .send()
    };
    let first: Value = send("upload-1").await.unwrap().json().await.unwrap();
    let second = send("upload-1").await.unwrap();
    assert_eq!(second.status(), StatusCode::ACCEPTED);
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["id"], second["id"]);

    // Two concurrent requests with a new key: one job.
    let (a, b) = tokio::join!(send("upload-2"), send("upload-2"));
    let a: Value = a.unwrap().json().await.unwrap();
    let b: Value = b.unwrap().json().await.unwrap();
    assert_eq!(a["id"], b["id"], "{a} {b}");

    // The same key from another user is another job.
    let other = app.token("someone-else");
    let c: Value = app
        .http
        .post(app.url("/v1/documents"))
        .bearer_auth(&other)
        .header("idempotency-key", "upload-1")
        .body(corpus_file("001-trivial--minimal-document.pdf"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(c["id"], first["id"]);

    let list = app.list_jobs(&token).await;
    assert_eq!(list.len(), 2);
    for id in [&first["id"], &a["id"]] {
        app.wait_terminal(&token, id.as_str().unwrap()).await;
    }
    app.wait_terminal(&other, c["id"].as_str().unwrap()).await;
    // The loser of the race discarded its copy: nothing is left once the jobs are done.
    app.assert_store_empties().await;
    app.stop().await;
}

async fn deleting_my_data_removes_every_job_and_object(backend: Backend) {
    // No worker: the documents stay in the store until the purge.
    let app = TestApp::spawn_with(backend, |s| s.roles.worker = false).await;
    let token = app.token("leaving");
    let other = app.token("staying");
    let mut gone = Vec::new();
    for _ in 0..3 {
        gone.push(app.upload_ok(&token, png(8, 8), "image/png").await["id"].clone());
    }
    let kept = app.upload_ok(&other, png(8, 8), "image/png").await;
    assert_eq!(app.objects().await.len(), 4);
    let r = app
        .http
        .delete(app.url("/v1/me/data"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let list = app.list_jobs(&token).await;
    assert!(list.is_empty());
    // What remains for a day is a tombstone without the user id, keys or content.
    for id in &gone {
        let row = app
            .state()
            .db
            .get_job_by_id(id.as_str().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_ne!(row.user_id, "leaving");
        assert!(row.document_dek.is_none() && row.result.is_none());
    }
    let left = app.objects().await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains(kept["id"].as_str().unwrap()));
    // Object keys are opaque: no user id, no file name.
    assert!(!left[0].contains("staying"));
    // Deleting again is fine.
    let r = app
        .http
        .delete(app.url("/v1/me/data"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    app.stop().await;
}

async fn jobs_are_listed_newest_first(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.roles.worker = false).await;
    let token = app.token("lister");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.upload_ok(&token, png(4, 4), "image/png").await["id"].clone());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let list = app.list_jobs(&token).await;
    let listed: Vec<Value> = list.iter().map(|j| j["id"].clone()).collect();
    ids.reverse();
    assert_eq!(listed, ids);
    // A job that is not terminal tells the app when to poll again.
    let r = app.get_job(&token, ids[0].as_str().unwrap()).await;
    let retry_after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=600).contains(&retry_after));
    app.stop().await;
}

async fn events_stream_the_job_until_it_is_terminal(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.roles.worker = false).await;
    let token = app.token("listener");
    let job = app
        .upload_ok(
            &token,
            corpus_file("004-pdflatex-4-pages--pdflatex-4-pages.pdf"),
            "application/pdf",
        )
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let response = app
        .http
        .get(app.url(&format!("/v1/jobs/{id}/events")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );

    // Start a worker only now, so the stream sees queued, then the rest.
    let worker_state = app.state().clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(medrelay::worker::run(worker_state, stop.clone()));

    let body = tokio::time::timeout(Duration::from_secs(30), response.text())
        .await
        .expect("the stream ends after a terminal state")
        .unwrap();
    let statuses: Vec<String> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| {
            serde_json::from_str::<Value>(d.trim()).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(body.contains("event: job"), "{body}");
    assert_eq!(
        statuses.first().map(String::as_str),
        Some("queued"),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("succeeded"),
        "{statuses:?}"
    );
    stop.cancel();
    worker.await.unwrap().unwrap();
    app.stop().await;
}

async fn an_accepted_job_survives_a_restart(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, |s| s.roles.worker = false).await;
    let token = app.token("patient");
    let job = app
        .upload_ok(
            &token,
            corpus_file("001-trivial--minimal-document.pdf"),
            "application/pdf",
        )
        .await;
    let id = job["id"].as_str().unwrap().to_owned();
    app.settings.roles.worker = true;
    app.restart().await;
    let done = app.wait_terminal(&token, &id).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["result"]["document"]["page_count"], 1);
    app.stop().await;
}

async fn expired_jobs_answer_410_and_their_data_is_gone(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.roles.worker = false;
        s.temp_ttl = Duration::from_secs(1);
        s.sweep_interval = Duration::from_millis(200);
    })
    .await;
    let token = app.token("slow");
    let job = app.upload_ok(&token, png(8, 8), "image/png").await;
    let id = job["id"].as_str().unwrap();
    assert_eq!(app.objects().await.len(), 1);
    app.wait_expired(&token, id, Duration::from_secs(10)).await;
    app.assert_store_empties().await;
    app.stop().await;
}

async fn operations_routes_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("ops");
    let job = app.upload_ok(&token, png(8, 8), "image/png").await;
    app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
    for path in ["/healthz", "/readyz"] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("medrelay_jobs{status=\"succeeded\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("medrelay_upload_bytes_total"), "{metrics}");
    let spec: Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in [
        "/v1/documents",
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "/v1/me/data",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(
            spec["paths"][path].is_object(),
            "{path} missing from the OpenAPI document"
        );
    }
    // Unknown routes and wrong methods are problem+json too.
    assert_problem(
        app.http.get(app.url("/v2/nothing")).send().await.unwrap(),
        404,
        "not-found",
    )
    .await;
    assert_problem(
        app.http
            .put(app.url("/v1/documents"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
        405,
        "method-not-allowed",
    )
    .await;
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

mod encryption {
    //! Every temporary byte is encrypted: on disk, in the bucket, in the database.
    use super::*;
    use medrelay::store::{ObjectKind, Store};

    on_every_backend!(
        no_plaintext_reaches_the_disk_the_bucket_or_the_database,
        nothing_is_in_plaintext_while_a_slow_job_is_processing,
        a_ciphertext_moved_to_another_job_fails_closed,
    );

    /// The local processor, held back until the test lets it go.
    struct Gated {
        gate: std::sync::Arc<tokio::sync::Semaphore>,
    }

    impl medrelay::processor::Processor for Gated {
        fn name(&self) -> &'static str {
            "gated"
        }
        fn process(
            &self,
            document: medrelay::processor::Document,
        ) -> futures::future::BoxFuture<
            '_,
            Result<medrelay::model::DocumentResult, medrelay::processor::ProcessError>,
        > {
            Box::pin(async move {
                let _permit = self.gate.acquire().await.unwrap();
                medrelay::processor::local::LocalProcessor
                    .process(document)
                    .await
            })
        }
    }

    async fn nothing_is_in_plaintext_while_a_slow_job_is_processing(backend: Backend) {
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
        let processor_gate = gate.clone();
        let app = TestApp::spawn_custom(
            backend,
            |_| {},
            move |state| {
                state.processor = std::sync::Arc::new(Gated {
                    gate: processor_gate,
                });
            },
        )
        .await;
        let token = app.token("slow");
        let job = app
            .upload_ok(&token, text_pdf(&["Lab Report", MARKER]), "application/pdf")
            .await;
        let id = job["id"].as_str().unwrap();
        app.wait_status(&token, id, "processing").await;
        let stored = everything_stored(&app).await;
        assert!(!stored.is_empty());
        assert_no_plaintext(&stored, &[MARKER.as_bytes(), b"%PDF-", b"Lab Report"]);
        gate.add_permits(1);
        let done = app.wait_terminal(&token, id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_no_plaintext(
            &everything_stored(&app).await,
            &[MARKER.as_bytes(), b"%PDF-"],
        );
        app.stop().await;
    }

    const MARKER: &str = "CANARY-7731-HEMOGLOBIN";

    /// Every file below the data dir and every object in the store, as raw bytes.
    async fn everything_stored(app: &TestApp) -> Vec<(String, Vec<u8>)> {
        let mut all = Vec::new();
        for path in common::walk(app.data_dir.path()) {
            if path.is_file() {
                all.push((path.display().to_string(), std::fs::read(&path).unwrap()));
            }
        }
        let store = &app.state().store;
        for (key, _) in store.list_all().await.unwrap() {
            all.push((
                format!("object {key}"),
                store.read(&key).await.unwrap().to_vec(),
            ));
        }
        if let medrelay::db::Db::Postgres(pool) = &app.state().db {
            let rows: Vec<(Option<Vec<u8>>,)> = sqlx::query_as("SELECT result FROM jobs")
                .fetch_all(pool)
                .await
                .unwrap();
            for (i, (result,)) in rows.into_iter().enumerate() {
                all.push((format!("postgres result {i}"), result.unwrap_or_default()));
            }
        }
        all
    }

    fn assert_no_plaintext(stored: &[(String, Vec<u8>)], needles: &[&[u8]]) {
        for (name, bytes) in stored {
            for needle in needles {
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == *needle),
                    "{name} contains {:?} in plaintext",
                    String::from_utf8_lossy(needle)
                );
            }
        }
    }

    async fn no_plaintext_reaches_the_disk_the_bucket_or_the_database(backend: Backend) {
        let mut app = TestApp::spawn_with(backend, |s| s.roles.worker = false).await;
        let token = app.token("private");
        let pdf = text_pdf(&["Lab Report", MARKER, "Reference range 12 - 16"]);
        assert!(pdf.windows(5).any(|w| w == b"%PDF-"));
        let first = app.upload_ok(&token, pdf.clone(), "application/pdf").await;
        let second = app.upload_ok(&token, pdf.clone(), "application/pdf").await;

        // At rest before processing.
        let stored = everything_stored(&app).await;
        assert_no_plaintext(&stored, &[MARKER.as_bytes(), b"%PDF-", b"Lab Report"]);
        // Identical uploads leave different stored bytes.
        let store = &app.state().store;
        let read = |id: &str| {
            let prefix = app.state().user_prefix("private");
            let path = Store::object_path(&prefix, id, ObjectKind::Document);
            async move { store.read(&path).await.unwrap() }
        };
        let (a, b) = (
            read(first["id"].as_str().unwrap()).await,
            read(second["id"].as_str().unwrap()).await,
        );
        assert_eq!(a.len(), b.len());
        assert_ne!(a, b);

        // After processing: the result is kept encrypted, the document is gone.
        app.settings.roles.worker = true;
        app.restart().await;
        for job in [&first, &second] {
            let done = app.wait_terminal(&token, job["id"].as_str().unwrap()).await;
            assert_eq!(done["status"], "succeeded", "{done}");
            assert!(done["result"]["text"].as_str().unwrap().contains(MARKER));
        }
        let stored = everything_stored(&app).await;
        assert_no_plaintext(
            &stored,
            &[MARKER.as_bytes(), b"%PDF-", b"Lab Report", b"lab_report"],
        );
        app.stop().await;
    }

    async fn a_ciphertext_moved_to_another_job_fails_closed(backend: Backend) {
        let mut app = TestApp::spawn_with(backend, |s| s.roles.worker = false).await;
        let token = app.token("victim");
        let a = app
            .upload_ok(&token, text_pdf(&["first document"]), "application/pdf")
            .await;
        let b = app
            .upload_ok(&token, text_pdf(&["second document"]), "application/pdf")
            .await;
        let prefix = app.state().user_prefix("victim");
        let store = app.state().store.clone();
        let path_a = Store::object_path(&prefix, a["id"].as_str().unwrap(), ObjectKind::Document);
        let path_b = Store::object_path(&prefix, b["id"].as_str().unwrap(), ObjectKind::Document);
        // B's ciphertext placed where A's was: a valid ciphertext, of another job.
        let bytes_b = store.read(&path_b).await.unwrap();
        store.put(&path_a, bytes_b).await.unwrap();

        app.settings.roles.worker = true;
        app.restart().await;
        let done_a = app.wait_terminal(&token, a["id"].as_str().unwrap()).await;
        assert_eq!(done_a["status"], "failed", "{done_a}");
        assert_eq!(done_a["error"]["code"], "processing-failed");
        assert_eq!(done_a["error"]["retryable"], true);
        assert!(
            !done_a["error"]["message"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains("integrity")
        );
        // B was untouched, but an integrity failure purges everything of its user (B may have
        // succeeded first; the purge then ends it too).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let done_b: Value = app
                .get_job(&token, b["id"].as_str().unwrap())
                .await
                .json()
                .await
                .unwrap();
            if done_b["status"] == "failed" {
                assert_eq!(done_b["error"]["code"], "processing-failed");
                assert!(done_b["result"].is_null());
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{done_b}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app.assert_store_empties().await;
        app.stop().await;
    }
}

mod key_rotation {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;

    async fn kek_of(app: &TestApp, id: &str) -> String {
        let medrelay::db::Db::Sqlite(pool) = &app.state().db else {
            unreachable!()
        };
        sqlx::query_scalar("SELECT document_kek FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rotating_the_master_key_keeps_jobs_in_flight_readable() {
        let old = format!("old:{}", STANDARD.encode([11u8; 32]));
        let new = format!("new:{}", STANDARD.encode([12u8; 32]));
        let mut app = TestApp::spawn_with(Backend::SqliteFolder, |s| {
            s.roles.worker = false;
            s.master_key = Some(medrelay::config::Secret::new(old.clone()));
        })
        .await;
        let token = app.token("rotating");
        let before = app
            .upload_ok(&token, text_pdf(&["before rotation"]), "application/pdf")
            .await;
        let before_id = before["id"].as_str().unwrap().to_owned();
        assert_eq!(kek_of(&app, &before_id).await, "old");

        // Rotate: the new key is listed last and encrypts; the old one still decrypts.
        app.settings.master_key = Some(medrelay::config::Secret::new(format!("{old},{new}")));
        app.settings.roles.worker = true;
        app.restart().await;
        let after = app
            .upload_ok(&token, text_pdf(&["after rotation"]), "application/pdf")
            .await;
        let after_id = after["id"].as_str().unwrap().to_owned();
        let done = app.wait_terminal(&token, &before_id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert!(
            done["result"]["text"]
                .as_str()
                .unwrap()
                .contains("before rotation")
        );
        let done = app.wait_terminal(&token, &after_id).await;
        assert_eq!(done["status"], "succeeded", "{done}");

        // A queued job whose master key is gone fails closed, with a friendly message.
        app.settings.roles.worker = false;
        app.restart().await;
        let orphaned = app
            .upload_ok(&token, text_pdf(&["orphaned"]), "application/pdf")
            .await;
        assert_eq!(kek_of(&app, orphaned["id"].as_str().unwrap()).await, "new");
        app.settings.master_key = Some(medrelay::config::Secret::new(format!(
            "other:{}",
            STANDARD.encode([13u8; 32])
        )));
        app.settings.roles.worker = true;
        app.restart().await;
        let done = app
            .wait_terminal(&token, orphaned["id"].as_str().unwrap())
            .await;
        assert_eq!(done["status"], "failed");
        assert_eq!(done["error"]["code"], "processing-failed");
        app.stop().await;
    }
}

mod instances {
    //! Several instances on one PostgreSQL database and one store.
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_reach_a_client_of_one_instance_when_another_runs_the_job() {
        let key = "shared:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
        let secret = "a-shared-token-secret-of-32-characters";
        let api = TestApp::spawn_with(Backend::PostgresFolder, |s| {
            s.roles.worker = false;
            s.master_key = Some(medrelay::config::Secret::new(key));
            s.jwt_secret = Some(medrelay::config::Secret::new(secret));
        })
        .await;
        let objects = api.data_dir.path().join("objects");
        let database = api.settings.database_url.clone();
        let worker = TestApp::spawn_with(Backend::SqliteFolder, |s| {
            s.roles.api = true;
            s.database_url = database;
            s.storage_url = Some(format!("file://{}", objects.display()));
            s.master_key = Some(medrelay::config::Secret::new(key));
            s.jwt_secret = Some(medrelay::config::Secret::new(secret));
            s.poll_interval = Duration::from_secs(3600);
        })
        .await;
        let token = api.token("two-instances");
        let job = api
            .upload_ok(
                &token,
                corpus_file("001-trivial--minimal-document.pdf"),
                "application/pdf",
            )
            .await;
        let id = job["id"].as_str().unwrap().to_owned();
        let stream = api
            .http
            .get(api.url(&format!("/v1/jobs/{id}/events")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        // The worker instance polls once an hour: wake it by hand, as a fresh upload there would.
        worker.state().wake.notify_one();
        let started = std::time::Instant::now();
        let body = tokio::time::timeout(Duration::from_secs(8), stream.text())
            .await
            .expect("the stream ended")
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(8));
        let last = body
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("data:"))
            .unwrap();
        let last: Value = serde_json::from_str(last.trim()).unwrap();
        assert_eq!(last["status"], "succeeded", "{body}");
        worker.stop().await;
        api.stop().await;
    }
}

mod purge {
    //! Unmanaged failures purge everything of that user, queued by the database itself.
    use super::*;
    use medrelay::store::{ObjectKind, Store};

    on_every_backend!(
        a_tampered_ciphertext_purges_every_job_of_that_user_and_no_other,
        orphan_objects_are_swept_after_the_ttl,
    );

    async fn a_tampered_ciphertext_purges_every_job_of_that_user_and_no_other(backend: Backend) {
        let mut app = TestApp::spawn_with(backend, |s| s.workers = 1).await;
        let victim = app.token("victim");
        let other = app.token("bystander");
        // A finished job with a result, for each user.
        let done_v = app
            .upload_ok(&victim, text_pdf(&["earlier result"]), "application/pdf")
            .await;
        let done_o = app
            .upload_ok(&other, text_pdf(&["other result"]), "application/pdf")
            .await;
        for (t, j) in [(&victim, &done_v), (&other, &done_o)] {
            assert_eq!(
                app.wait_terminal(t, j["id"].as_str().unwrap()).await["status"],
                "succeeded"
            );
        }
        // Queued jobs, with the worker stopped.
        app.settings.roles.worker = false;
        app.restart().await;
        let tampered = app
            .upload_ok(&victim, text_pdf(&["to be tampered"]), "application/pdf")
            .await;
        let queued_v = app.upload_ok(&victim, png(8, 8), "image/png").await;
        let queued_o = app.upload_ok(&other, png(8, 8), "image/png").await;
        let prefix = app.state().user_prefix("victim");
        let path = Store::object_path(
            &prefix,
            tampered["id"].as_str().unwrap(),
            ObjectKind::Document,
        );
        let store = app.state().store.clone();
        let mut bytes = store.read(&path).await.unwrap().to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        store.put(&path, bytes.into()).await.unwrap();

        app.settings.roles.worker = true;
        app.restart().await;
        // Every job of the victim ends failed with the friendly "upload it again", results too.
        for job in [&tampered, &queued_v, &done_v] {
            let id = job["id"].as_str().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let now: Value = app.get_job(&victim, id).await.json().await.unwrap();
                if now["status"] == "failed" {
                    assert_eq!(now["error"]["code"], "processing-failed", "{now}");
                    assert_eq!(now["error"]["retryable"], true);
                    assert!(now["result"].is_null());
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{id} not purged: {now}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Nothing of the victim is left in the store; the bystander is untouched.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while app.objects().await.iter().any(|o| o.starts_with(&prefix)) {
            assert!(std::time::Instant::now() < deadline, "victim objects left");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let kept = app
            .wait_terminal(&other, done_o["id"].as_str().unwrap())
            .await;
        assert_eq!(kept["status"], "succeeded");
        assert!(
            kept["result"]["text"]
                .as_str()
                .unwrap()
                .contains("other result")
        );
        let kept = app
            .wait_terminal(&other, queued_o["id"].as_str().unwrap())
            .await;
        assert_eq!(kept["status"], "succeeded");
        // The audit log records it, without a user id.
        let purges = app.state().db.purges().await.unwrap();
        assert_eq!(purges.len(), 1);
        assert_eq!(purges[0].user_prefix, prefix);
        assert_eq!(purges[0].reason, "unmanaged-failure");
        assert_eq!(purges[0].job_id.as_deref(), tampered["id"].as_str());
        assert!(purges[0].completed_at.is_some());
        assert_eq!(purges[0].jobs_purged, Some(3));
        app.assert_store_empties().await;
        app.stop().await;
    }

    async fn orphan_objects_are_swept_after_the_ttl(backend: Backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.temp_ttl = Duration::from_secs(1);
            s.sweep_interval = Duration::from_millis(200);
        })
        .await;
        // What a crash between storing and committing leaves: an object with no row.
        let orphan = Store::object_path(
            "0123456789abcdef0123456789abcdef",
            "crashed-upload",
            ObjectKind::Document,
        );
        app.state()
            .store
            .put(&orphan, bytes::Bytes::from_static(b"ciphertext"))
            .await
            .unwrap();
        assert_eq!(app.objects().await.len(), 1);
        let started = std::time::Instant::now();
        app.assert_store_empties().await;
        assert!(started.elapsed() < Duration::from_secs(5));
        let metrics = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics.contains("medrelay_oldest_object_age_seconds"),
            "{metrics}"
        );
        app.stop().await;
    }
}

mod failures {
    //! Failures nobody planned for, and the one-hour limit on jobs in every state.
    use super::*;
    use std::sync::Arc;

    /// A processor that panics on PNGs (outside any parser's catch_unwind) and works otherwise.
    struct PanicsOnPng;

    impl medrelay::processor::Processor for PanicsOnPng {
        fn name(&self) -> &'static str {
            "panics"
        }
        fn process(
            &self,
            document: medrelay::processor::Document,
        ) -> futures::future::BoxFuture<
            '_,
            Result<medrelay::model::DocumentResult, medrelay::processor::ProcessError>,
        > {
            Box::pin(async move {
                if document.media_type == medrelay::processor::MediaType::Png {
                    panic!("a bug in a processor");
                }
                medrelay::processor::local::LocalProcessor
                    .process(document)
                    .await
            })
        }
    }

    /// Holds every job in `processing` until the test ends.
    struct Stuck;

    impl medrelay::processor::Processor for Stuck {
        fn name(&self) -> &'static str {
            "stuck"
        }
        fn process(
            &self,
            _document: medrelay::processor::Document,
        ) -> futures::future::BoxFuture<
            '_,
            Result<medrelay::model::DocumentResult, medrelay::processor::ProcessError>,
        > {
            Box::pin(futures::future::pending())
        }
    }

    on_every_backend!(
        a_panic_in_a_job_fails_it_purges_its_user_and_the_worker_goes_on,
        jobs_in_every_state_vanish_at_the_ttl,
        finished_and_failed_jobs_vanish_at_the_ttl,
        a_purge_racing_a_finishing_job_leaves_nothing_behind,
    );

    /// Panics on PNGs; holds PDFs until the gate opens, then finishes them normally.
    struct PanicsOrWaits {
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl medrelay::processor::Processor for PanicsOrWaits {
        fn name(&self) -> &'static str {
            "panics-or-waits"
        }
        fn process(
            &self,
            document: medrelay::processor::Document,
        ) -> futures::future::BoxFuture<
            '_,
            Result<medrelay::model::DocumentResult, medrelay::processor::ProcessError>,
        > {
            Box::pin(async move {
                if document.media_type == medrelay::processor::MediaType::Png {
                    panic!("a bug in a processor");
                }
                let _permit = self.gate.acquire().await.unwrap();
                medrelay::processor::local::LocalProcessor
                    .process(document)
                    .await
            })
        }
    }

    async fn a_purge_racing_a_finishing_job_leaves_nothing_behind(backend: Backend) {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let processor_gate = gate.clone();
        let app = TestApp::spawn_custom(
            backend,
            |s| s.workers = 2,
            move |state| {
                state.processor = Arc::new(PanicsOrWaits {
                    gate: processor_gate,
                });
            },
        )
        .await;
        let token = app.token("racing");
        let slow = app
            .upload_ok(
                &token,
                text_pdf(&["finishing as the purge runs"]),
                "application/pdf",
            )
            .await;
        let slow_id = slow["id"].as_str().unwrap();
        app.wait_status(&token, slow_id, "processing").await;
        // An unmanaged failure of the same user purges while the first job is mid-flight.
        let bad = app.upload_ok(&token, png(8, 8), "image/png").await;
        app.wait_terminal(&token, bad["id"].as_str().unwrap()).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while app
            .state()
            .db
            .purges()
            .await
            .unwrap()
            .iter()
            .all(|p| p.completed_at.is_none())
        {
            assert!(std::time::Instant::now() < deadline, "no purge");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Now the slow job may finish: nothing it does may bring data back.
        gate.add_permits(10);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let job: Value = app.get_job(&token, slow_id).await.json().await.unwrap();
        assert_eq!(job["status"], "failed", "{job}");
        assert_eq!(job["error"]["code"], "processing-failed");
        assert!(job["result"].is_null());
        app.assert_store_empties().await;
        let row = app
            .state()
            .db
            .get_job_by_id(slow_id)
            .await
            .unwrap()
            .unwrap();
        assert!(row.result.is_none() && row.result_dek.is_none() && row.document_dek.is_none());
        app.stop().await;
    }

    async fn finished_and_failed_jobs_vanish_at_the_ttl(backend: Backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.temp_ttl = Duration::from_secs(2);
            s.sweep_interval = Duration::from_millis(200);
        })
        .await;
        let token = app.token("ttl-finished");
        let good = app.upload_ok(&token, png(8, 8), "image/png").await;
        let mut broken = jpeg(16, 16);
        broken.truncate(20);
        let bad = app.upload_ok(&token, broken, "image/jpeg").await;
        assert_eq!(
            app.wait_terminal(&token, good["id"].as_str().unwrap())
                .await["status"],
            "succeeded"
        );
        assert_eq!(
            app.wait_terminal(&token, bad["id"].as_str().unwrap()).await["status"],
            "failed"
        );
        for job in [&good, &bad] {
            app.wait_expired(&token, job["id"].as_str().unwrap(), Duration::from_secs(10))
                .await;
        }
        let list = app.list_jobs(&token).await;
        assert!(list.is_empty());
        app.assert_store_empties().await;
        app.stop().await;
    }

    async fn a_panic_in_a_job_fails_it_purges_its_user_and_the_worker_goes_on(backend: Backend) {
        let app = TestApp::spawn_custom(
            backend,
            |s| s.workers = 1,
            |state| {
                state.processor = Arc::new(PanicsOnPng);
            },
        )
        .await;
        let unlucky = app.token("unlucky");
        let fine = app.token("fine");
        let job = app.upload_ok(&unlucky, png(8, 8), "image/png").await;
        let done = app
            .wait_terminal(&unlucky, job["id"].as_str().unwrap())
            .await;
        assert_eq!(done["status"], "failed");
        assert_eq!(done["error"]["code"], "processing-failed");
        assert_eq!(done["error"]["retryable"], true);
        // The single worker slot is free again and serves the next job.
        let job = app
            .upload_ok(
                &fine,
                corpus_file("001-trivial--minimal-document.pdf"),
                "application/pdf",
            )
            .await;
        let done = app.wait_terminal(&fine, job["id"].as_str().unwrap()).await;
        assert_eq!(done["status"], "succeeded");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while app
            .state()
            .db
            .purges()
            .await
            .unwrap()
            .iter()
            .all(|p| p.completed_at.is_none())
        {
            assert!(std::time::Instant::now() < deadline, "no purge recorded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let purges = app.state().db.purges().await.unwrap();
        assert_eq!(purges.len(), 1);
        assert_eq!(purges[0].user_prefix, app.state().user_prefix("unlucky"));
        app.assert_store_empties().await;
        app.stop().await;
    }

    async fn jobs_in_every_state_vanish_at_the_ttl(backend: Backend) {
        let app = TestApp::spawn_custom(
            backend,
            |s| {
                s.temp_ttl = Duration::from_secs(2);
                s.sweep_interval = Duration::from_millis(200);
            },
            |state| state.processor = Arc::new(Stuck),
        )
        .await;
        let token = app.token("ttl");
        let processing = app.upload_ok(&token, png(8, 8), "image/png").await;
        let id = processing["id"].as_str().unwrap();
        app.wait_status(&token, id, "processing").await;
        // The claim commits `processing` a moment before the worker's task registers the job.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while app.state().running.len() != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the processing job never held a worker slot"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        app.wait_expired(&token, id, Duration::from_secs(10)).await;
        // The stuck attempt was cancelled, not left holding a worker slot.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !app.state().running.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the expired job is still running"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        app.assert_store_empties().await;
        app.stop().await;
    }
}

mod abandoned_uploads {
    //! An upload a crash interrupted: parts S3 keeps out of its listing, or a staging file.
    use super::*;
    use medrelay::store::{ObjectKind, Store};

    on_every_backend!(an_upload_interrupted_by_a_crash_is_cleaned_after_the_ttl);

    /// Incomplete multipart uploads in the test bucket (moto answers unsigned requests).
    async fn incomplete_uploads(app: &TestApp) -> usize {
        let bucket = app
            .settings
            .storage_url
            .as_deref()
            .unwrap()
            .trim_start_matches("s3://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let endpoint = std::env::var("AWS_ENDPOINT_URL").unwrap();
        let xml = reqwest::get(format!("{endpoint}/{bucket}?uploads"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        xml.matches("<UploadId>").count()
    }

    async fn an_upload_interrupted_by_a_crash_is_cleaned_after_the_ttl(backend: Backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.temp_ttl = Duration::from_secs(1);
            s.sweep_interval = Duration::from_millis(200);
        })
        .await;
        let store = app.state().store.clone();
        let path = Store::object_path(
            "0123456789abcdef0123456789abcdef",
            "interrupted",
            ObjectKind::Document,
        );
        let mut writer = store.writer(&path);
        writer
            .write(bytes::Bytes::from(vec![7u8; 6 * 1024 * 1024]))
            .await
            .unwrap();
        // The process "crashes": the writer is neither finished, aborted nor dropped (a drop
        // would let object_store clean its staging file; a SIGKILL does not).
        std::mem::forget(writer);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let open = if backend.s3() {
                incomplete_uploads(&app).await
            } else {
                common::walk(&app.data_dir.path().join("objects"))
                    .into_iter()
                    .filter(|p| p.to_string_lossy().contains('#'))
                    .count()
            };
            if open == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no upload in progress to abandon"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = if backend.s3() {
                incomplete_uploads(&app).await
            } else {
                common::walk(&app.data_dir.path().join("objects")).len()
            };
            if left == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{left} left behind: {:?}",
                common::walk(&app.data_dir.path().join("objects"))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        app.assert_store_empties().await;
        app.stop().await;
    }
}

mod review_fixes {
    //! Behaviour at the edges found in review.
    use super::*;

    on_every_backend!(
        a_replayed_idempotency_key_returns_the_finished_job_with_its_result,
        a_job_past_its_lifetime_is_gone_before_the_sweeper_runs,
    );

    async fn a_replayed_idempotency_key_returns_the_finished_job_with_its_result(backend: Backend) {
        let app = TestApp::spawn(backend).await;
        let token = app.token("replay");
        let send = || {
            app.http
                .post(app.url("/v1/documents"))
                .bearer_auth(&token)
                .header("idempotency-key", "same")
                .body(corpus_file("001-trivial--minimal-document.pdf"))
                .send()
        };
        let first: Value = send().await.unwrap().json().await.unwrap();
        app.wait_terminal(&token, first["id"].as_str().unwrap())
            .await;
        let again: Value = send().await.unwrap().json().await.unwrap();
        assert_eq!(again["id"], first["id"]);
        assert_eq!(again["status"], "succeeded");
        assert_eq!(again["result"]["document"]["page_count"], 1, "{again}");
        app.stop().await;
    }

    async fn a_job_past_its_lifetime_is_gone_before_the_sweeper_runs(backend: Backend) {
        let app = TestApp::spawn_with(backend, |s| {
            s.temp_ttl = Duration::from_secs(1);
            s.sweep_interval = Duration::from_secs(3600);
        })
        .await;
        let token = app.token("late");
        let job = app.upload_ok(&token, png(8, 8), "image/png").await;
        let id = job["id"].as_str().unwrap();
        app.wait_terminal(&token, id).await;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_problem(app.get_job(&token, id).await, 410, "job-expired").await;
        let list = app.list_jobs(&token).await;
        assert!(list.is_empty());
        app.stop().await;
    }
}
