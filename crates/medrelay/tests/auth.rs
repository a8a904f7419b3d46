//! Tokens of an identity provider: RS256 and ES256 checked against a JWKS document given as a
//! file or fetched over HTTP, with issuer and audience pinned.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Backend, TestApp};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};

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
    json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": jsonwebtoken::get_current_timestamp() + 600})
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
            .body(common::png(4, 4))
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
        expired["exp"] = json!(jsonwebtoken::get_current_timestamp() - 300);
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
        &json!({"sub": "configured", "exp": jsonwebtoken::get_current_timestamp() + 60}),
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
