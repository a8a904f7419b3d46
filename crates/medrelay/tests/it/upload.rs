//! Uploads: what is accepted (decided from the bytes), what is refused and leaves nothing,
//! idempotency, and a document's whole way from upload to deletion.

use reqwest::StatusCode;
use serde_json::Value;

use crate::fixtures::{corpus_file, corpus_manifest, png};
use crate::harness::{Backend, TestApp, assert_problem};

on_every_backend!(
    a_real_pdf_is_read_and_then_forgotten,
    every_corpus_pdf_gets_its_manifest_page_count,
    multipart_uploads_take_the_file_part,
    the_type_comes_from_the_bytes_not_the_declared_type,
    unsupported_files_are_refused_and_leave_nothing,
    an_empty_upload_is_a_bad_request,
    oversized_uploads_are_refused_with_or_without_a_length,
    the_same_idempotency_key_returns_the_same_job,
    a_replayed_idempotency_key_returns_the_finished_job_with_its_result,
    an_accepted_job_survives_a_restart,
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

    assert_eq!(
        app.delete(&alice, &format!("/v1/jobs/{id}")).await,
        StatusCode::NO_CONTENT
    );
    assert_problem(app.get_job(&alice, id).await, 404, "job-not-found").await;
    // Deleting again is success: it is gone either way.
    assert_eq!(
        app.delete(&alice, &format!("/v1/jobs/{id}")).await,
        StatusCode::NO_CONTENT
    );
    app.assert_store_empties().await;
    app.stop().await;
}

async fn every_corpus_pdf_gets_its_manifest_page_count(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let token = app.token("corpus-reader");
    let mut ids = Vec::new();
    for entry in corpus_manifest() {
        let job = app
            .upload_ok(&token, corpus_file(&entry.file), "application/octet-stream")
            .await;
        ids.push((entry, job["id"].as_str().unwrap().to_owned()));
    }
    assert!(ids.len() >= 16);
    for (entry, id) in ids {
        let name = &entry.file;
        let job = app.wait_terminal(&token, &id).await;
        if entry.encrypted {
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
                job["result"]["document"]["page_count"], entry.pages,
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
    // AVIF (HEIC is accepted: tests/it/heic.rs): refused with advice to send JPEG.
    let mut avif = b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf".to_vec();
    avif.extend(vec![0u8; 2000]);
    let response = app.upload(&token, avif, "image/avif").await;
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
    // An idempotency key names an upload of a document: a request without one is refused,
    // not answered with the key's job.
    let pdf = corpus_file("004-pdflatex-4-pages--pdflatex-4-pages.pdf");
    let upload = |body: Vec<u8>| {
        app.http
            .post(app.url("/v1/documents"))
            .bearer_auth(&token)
            .header("idempotency-key", "k-1")
            .body(body)
            .send()
    };
    assert_eq!(
        upload(pdf.clone()).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(upload(pdf).await.unwrap().status(), StatusCode::ACCEPTED);
    let response = upload(Vec::new()).await.unwrap();
    assert_problem(response, 400, "empty-document").await;
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
