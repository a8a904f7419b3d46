//! Operations: liveness, readiness, metrics, the OpenAPI document, problem+json for unknown
//! routes and wrong methods, and database errors sorted by what retrying can do.

use medrelay::db::Db;
use reqwest::StatusCode;
use serde_json::Value;

use crate::fixtures::png;
use crate::harness::{Backend, TestApp, assert_problem};

on_every_backend!(
    operations_routes_answer,
    a_broken_query_is_a_500_and_a_database_outage_a_503,
);

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

/// Runs one statement on the app's own database.
async fn execute(app: &TestApp, sql: &'static str) {
    match app.db() {
        Db::Sqlite(p, ..) => sqlx::query(sql).execute(p).await.map(|_| ()),
        Db::Postgres(p, ..) => sqlx::query(sql).execute(p).await.map(|_| ()),
    }
    .expect("a test statement");
}

async fn a_broken_query_is_a_500_and_a_database_outage_a_503(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.roles.worker = false;
        s.roles.sweeper = false;
    })
    .await;
    let token = app.token("unlucky-moment");
    let list = |app: &TestApp| app.http.get(app.url("/v1/jobs")).bearer_auth(&token).send();
    assert_eq!(list(&app).await.unwrap().status(), StatusCode::OK);

    // A statement that cannot run (as a bug in a query would be) is not an outage.
    execute(&app, "ALTER TABLE jobs RENAME TO jobs_elsewhere").await;
    let bug = assert_problem(list(&app).await.unwrap(), 500, "internal-error").await;
    assert!(!bug["detail"].as_str().unwrap().contains("jobs"), "{bug}");
    execute(&app, "ALTER TABLE jobs_elsewhere RENAME TO jobs").await;
    assert_eq!(list(&app).await.unwrap().status(), StatusCode::OK);

    // A database that cannot serve is an outage: 503, retryable, with Retry-After.
    app.db().close().await;
    let response = list(&app).await.unwrap();
    assert!(response.headers().contains_key("retry-after"));
    let outage = assert_problem(response, 503, "service-unavailable").await;
    assert_eq!(outage["retryable"], true);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_problem(ready, 503, "service-unavailable").await;
    app.stop().await;
}
