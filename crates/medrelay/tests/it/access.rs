//! Who may see what: every `/v1` route needs a valid bearer token (HS256 with the configured
//! or generated secret, or RS256/ES256/EdDSA of an identity provider checked against its JWKS,
//! followed through key rotations, with issuer and audience pinned and every time claim
//! checked), and a job of another user is a 404 on every route.

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
        let key = medrelay::auth::hs256_secret(&app.settings)
            .unwrap()
            .expect("an HS256 secret");
        let key = key.expose();
        let claims = serde_json::json!({"sub": "alice", "exp": medrelay::clock::now_secs() - 120});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(key).unwrap(),
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

/// An Ed25519 key pair: the signing key and its public JWK.
fn ed25519_key(kid: &str) -> (EncodingKey, Value) {
    use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let jwk = json!({
        "kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
    });
    (EncodingKey::from_ed_der(pkcs8.as_ref()), jwk)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_is_followed_without_a_restart_and_claims_are_strict() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (old_key, old_jwk) = es256_key("2026-old");
    let (new_key, new_jwk) = es256_key("2026-new");
    let (ed_key, ed_jwk) = ed25519_key("ed-1");
    let (_, rs_jwk) = rs256_key();
    // The provider's JWKS endpoint, over real HTTP, whose document the test can change.
    let document = Arc::new(parking_lot::Mutex::new(
        json!({"keys": [old_jwk, ed_jwk.clone(), rs_jwk.clone()]}),
    ));
    let fetches = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/.well-known/jwks.json",
        listener.local_addr().unwrap()
    );
    let router = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get({
            let (document, fetches) = (document.clone(), fetches.clone());
            move || {
                fetches.fetch_add(1, Ordering::SeqCst);
                let body = document.lock().clone();
                async move {
                    (
                        [("cache-control", "public, max-age=3600")],
                        axum::Json(body),
                    )
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let app = TestApp::spawn_with(Backend::SqliteFolder, |s| {
        s.jwks_url = Some(url.clone());
        s.jwt_issuer = Some(ISSUER.into());
        s.jwt_audience = Some(AUDIENCE.into());
    })
    .await;

    let old = sign(Algorithm::ES256, "2026-old", &old_key, claims("patient-7"));
    let ed = sign(Algorithm::EdDSA, "ed-1", &ed_key, claims("patient-7"));
    let first_fetch = tokio::time::Instant::now();
    assert_eq!(status_with(&app, &old).await, StatusCode::OK);
    assert_eq!(status_with(&app, &ed).await, StatusCode::OK, "EdDSA");
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "cached per max-age");

    // The provider rotates: the old key is gone, a new one signs.
    *document.lock() = json!({"keys": [new_jwk, ed_jwk, rs_jwk.clone()]});
    let new = sign(Algorithm::ES256, "2026-new", &new_key, claims("patient-7"));
    let forged = |i: usize| {
        sign(
            Algorithm::ES256,
            &format!("made-up-{i}"),
            &old_key,
            claims("patient-7"),
        )
    };
    // Unknown kids refetch at most every 30 s: within them, a flood of made-up kids (and the
    // new key, not yet known) fetches nothing.
    for i in 0..20 {
        assert_eq!(
            status_with(&app, &forged(i)).await,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(status_with(&app, &new).await, StatusCode::UNAUTHORIZED);
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    // Past the 30 s, a concurrent flood of made-up kids and the new key: one fetch for all.
    tokio::time::sleep_until(first_fetch + Duration::from_secs(31)).await;
    let flood = futures::future::join_all((20..60).map(|i| {
        let (app, token) = (&app, forged(i));
        async move { status_with(app, &token).await }
    }));
    let (flood, fresh) = tokio::join!(flood, status_with(&app, &new));
    assert!(flood.iter().all(|s| *s == StatusCode::UNAUTHORIZED));
    assert_eq!(fresh, StatusCode::OK, "the new key, without a restart");
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        2,
        "one refetch for the flood"
    );
    // The old key no longer works once the new document is in.
    assert_eq!(status_with(&app, &old).await, StatusCode::UNAUTHORIZED);

    // Strict claims, each signed with the valid new key.
    let now = medrelay::clock::now_secs();
    let with = |change: &dyn Fn(&mut Value)| {
        let mut c = claims("patient-7");
        change(&mut c);
        sign(Algorithm::ES256, "2026-new", &new_key, c)
    };
    let rejected = [
        ("wrong audience", with(&|c| c["aud"] = json!("another-app"))),
        (
            "wrong issuer",
            with(&|c| c["iss"] = json!("https://evil.test/")),
        ),
        (
            "not valid before a minute from now",
            with(&|c| c["nbf"] = json!(now + 120)),
        ),
        (
            "issued in the future",
            with(&|c| c["iat"] = json!(now + 600)),
        ),
        (
            "no exp",
            with(&|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
        ),
        (
            "no sub",
            with(&|c| {
                c.as_object_mut().unwrap().remove("sub");
            }),
        ),
        ("an empty sub", with(&|c| c["sub"] = json!(""))),
        ("a blank sub", with(&|c| c["sub"] = json!("   "))),
        (
            "alg none",
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"2026-new"}"#),
                URL_SAFE_NO_PAD.encode(claims("patient-7").to_string())
            ),
        ),
        (
            // HS/RS confusion: an HMAC keyed with the provider's public RSA key.
            "HS256 signed with the public RSA key",
            sign(
                Algorithm::HS256,
                "test-rsa",
                &EncodingKey::from_secret(rs_jwk.to_string().as_bytes()).unwrap(),
                claims("patient-7"),
            ),
        ),
    ];
    for (what, token) in rejected {
        let response = app
            .http
            .get(app.url("/v1/jobs"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let problem = assert_problem(response, 401, "unauthorized").await;
        // The answer says nothing about why.
        let text = problem.to_string().to_lowercase();
        for word in ["aud", "iss", "nbf", "exp", "sub", "alg", "kid", "signature"] {
            assert!(!text.contains(word), "{what}: {text}");
        }
    }
    // Within the leeway a slightly early nbf is fine.
    let early = with(&|c| c["nbf"] = json!(now + 5));
    assert_eq!(status_with(&app, &early).await, StatusCode::OK);
    app.stop().await;
}
