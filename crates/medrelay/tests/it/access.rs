//! Who may see what: every `/v1` route needs a valid bearer token (HS256 with the configured
//! or generated secret, or RS256/ES256 of an identity provider checked against its JWKS with
//! issuer and audience pinned), and a job of another user is a 404 on every route.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::fixtures::png;
use crate::harness::{Backend, TestApp, assert_problem};

on_every_backend!(
    bad_tokens_get_401_as_problem_json,
    another_users_job_is_a_404_on_every_route,
);

const ISSUER: &str = "https://idp.test/";
const AUDIENCE: &str = "medrelay";

/// An ES256 key pair: the signing key and its public JWK.
fn es256_key(kid: &str) -> (EncodingKey, Value) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let pkcs8 = pair.to_pkcs8v1().unwrap();
    let point = pair.public_key().as_ref();
    assert_eq!(point.len(), 65, "an uncompressed P-256 point");
    let jwk = json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
}

fn rs256_key() -> (EncodingKey, Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let pem = std::fs::read(dir.join("rs256-test-key.pem")).unwrap();
    let jwks: Value =
        serde_json::from_slice(&std::fs::read(dir.join("rs256-test-jwks.json")).unwrap()).unwrap();
    (
        EncodingKey::from_rsa_pem(&pem).unwrap(),
        jwks["keys"][0].clone(),
    )
}

fn sign(alg: Algorithm, kid: &str, key: &EncodingKey, claims: Value) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": medrelay::clock::now_secs() + 600})
}

async fn status_with(app: &TestApp, token: &str) -> StatusCode {
    app.http
        .get(app.url("/v1/jobs"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

async fn serve_jwks(jwks: Value) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}/.well-known/jwks.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_provider_tokens_are_checked_against_its_jwks() {
    let (es_key, es_jwk) = es256_key("test-ec");
    let (rs_key, rs_jwk) = rs256_key();
    let (stranger_key, _) = es256_key("test-ec");
    let jwks = json!({"keys": [es_jwk, rs_jwk]});
    let file_dir = tempfile::tempdir().unwrap();
    let file = file_dir.path().join("jwks.json");
    std::fs::write(&file, jwks.to_string()).unwrap();
    let url = serve_jwks(jwks).await;

    for source in [file.display().to_string(), url] {
        let app = TestApp::spawn_with(Backend::SqliteFolder, |s| {
            s.jwks_url = Some(source.clone());
            s.jwt_issuer = Some(ISSUER.into());
            s.jwt_audience = Some(AUDIENCE.into());
        })
        .await;
        let es = sign(Algorithm::ES256, "test-ec", &es_key, claims("patient-1"));
        let rs = sign(Algorithm::RS256, "test-rsa", &rs_key, claims("patient-1"));
        assert_eq!(
            status_with(&app, &es).await,
            StatusCode::OK,
            "ES256 from {source}"
        );
        assert_eq!(
            status_with(&app, &rs).await,
            StatusCode::OK,
            "RS256 from {source}"
        );

        // The same user across both algorithms sees the same jobs.
        let up = app
            .http
            .post(app.url("/v1/documents"))
            .bearer_auth(&es)
            .body(png(4, 4))
            .send()
            .await
            .unwrap();
        assert_eq!(up.status(), StatusCode::ACCEPTED);
        let list: Value = app
            .http
            .get(app.url("/v1/jobs"))
            .bearer_auth(&rs)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list["jobs"].as_array().unwrap().len(), 1);

        let mut wrong_iss = claims("patient-1");
        wrong_iss["iss"] = json!("https://evil.test/");
        let mut wrong_aud = claims("patient-1");
        wrong_aud["aud"] = json!("another-service");
        let mut expired = claims("patient-1");
        expired["exp"] = json!(medrelay::clock::now_secs() - 300);
        let bad = [
            sign(
                Algorithm::ES256,
                "test-ec",
                &stranger_key,
                claims("patient-1"),
            ),
            sign(
                Algorithm::ES256,
                "unknown-kid",
                &es_key,
                claims("patient-1"),
            ),
            sign(Algorithm::ES256, "test-ec", &es_key, wrong_iss),
            sign(Algorithm::ES256, "test-ec", &es_key, wrong_aud),
            sign(Algorithm::ES256, "test-ec", &es_key, expired),
            // A key's declared algorithm must match the token's.
            sign(Algorithm::RS256, "test-ec", &rs_key, claims("patient-1")),
        ];
        for token in bad {
            assert_eq!(
                status_with(&app, &token).await,
                StatusCode::UNAUTHORIZED,
                "{source}"
            );
        }
        // With an identity provider configured and no secret, no HS256 tokens are accepted.
        assert!(
            app.state()
                .auth
                .mint("anyone", Duration::from_secs(60))
                .is_err()
        );
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_hs256_secret_signs_and_checks_tokens() {
    let app = TestApp::spawn_with(Backend::SqliteFolder, |s| {
        s.jwt_secret = Some(medrelay::config::Secret::new(
            "a-configured-secret-of-at-least-32-chars",
        ));
    })
    .await;
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "configured", "exp": medrelay::clock::now_secs() + 60}),
        &EncodingKey::from_secret(b"a-configured-secret-of-at-least-32-chars").unwrap(),
    )
    .unwrap();
    assert_eq!(status_with(&app, &token).await, StatusCode::OK);
    assert!(
        !app.data_dir.path().join("jwt.secret").exists(),
        "no secret is generated when one is configured"
    );
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
        let claims = serde_json::json!({"sub": "alice", "exp": medrelay::clock::now_secs() + 600});
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(b"not-the-server-secret-not-the-server").unwrap(),
        )
        .unwrap()
    };
    let expired = {
        // Minted with the right key but already two minutes past its expiry.
        let secret = std::fs::read_to_string(app.data_dir.path().join("jwt.secret")).unwrap();
        let key = base64::engine::general_purpose::STANDARD
            .decode(secret.trim())
            .unwrap();
        let claims = serde_json::json!({"sub": "alice", "exp": medrelay::clock::now_secs() - 120});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(&key).unwrap(),
        )
        .unwrap()
    };
    let unsigned = {
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
    assert_eq!(
        app.delete(&mallory, "/v1/me/data").await,
        StatusCode::NO_CONTENT
    );
    let r = app.get_job(&alice, id).await;
    assert_eq!(r.status(), StatusCode::OK);
    app.stop().await;
}
