//! Bearer-token authentication: HS256 with a configured or generated secret, and RS256, ES256
//! or EdDSA against a JWKS document of an identity provider, which then must name the issuer
//! and audience to check. The user is the `sub` claim. `exp` is required; `nbf` and `iat` are
//! checked (30 s of leeway); each algorithm takes only its own kind of key, so `alg: none` and
//! HS/RS confusion fail.
//!
//! The JWKS document is cached as its `Cache-Control: max-age` says (between 1 minute and 1
//! day; 5 minutes without one) and refetched early on an unknown `kid` at most every 30 s: a
//! provider's key rotation works without a restart, and random `kid`s cannot cause a fetch
//! flood. A failed refetch keeps the keys already known.
//!
//! Never logs a token. Every failure is the same 401 to the client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::config::Settings;
use crate::error::ApiError;
use crate::ids::UserId;
use crate::keys::{self, KeyBytes};

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

/// The authenticated caller of a `/v1` route.
#[derive(Debug, Clone)]
pub struct User {
    pub id: UserId,
}

/// Checks tokens. Cheap to clone.
#[derive(Clone)]
pub struct Authenticator {
    inner: Arc<Inner>,
}

struct Inner {
    hs256: Option<(DecodingKey, KeyBytes)>,
    jwks: Option<Jwks>,
    issuer: Option<String>,
    audience: Option<String>,
}

struct Jwks {
    source: String,
    http: reqwest::Client,
    cache: RwLock<Cached>,
    /// Held while fetching: one fetch at a time, however many requests found the cache stale.
    refreshing: tokio::sync::Mutex<()>,
}

struct Cached {
    keys: JwkSet,
    /// When the document was last fetched (successfully or not), and until when it is fresh.
    fetched: Option<Instant>,
    fresh_until: Option<Instant>,
}

/// An unknown `kid` refreshes the JWKS at most this often, so forged kids cannot hammer the IdP.
const JWKS_REFRESH_MIN: Duration = Duration::from_secs(30);
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
const LEEWAY_SECS: u64 = 30;
/// How long a JWKS document stays fresh: its `max-age`, within these bounds.
const JWKS_MAX_AGE_DEFAULT: Duration = Duration::from_secs(300);
const JWKS_MAX_AGE_MIN: Duration = Duration::from_secs(60);
const JWKS_MAX_AGE_MAX: Duration = Duration::from_secs(86_400);

/// The HS256 secret: configured, from its file, or generated into the data dir.
pub fn hs256_secret(settings: &Settings) -> anyhow::Result<Option<KeyBytes>> {
    if let Some(secret) = &settings.jwt_secret {
        anyhow::ensure!(
            secret.expose().len() >= 32,
            "MEDRELAY_JWT_SECRET must be at least 32 characters"
        );
        return Ok(Some(KeyBytes::new(secret.expose().as_bytes().to_vec())));
    }
    if let Some(file) = &settings.jwt_secret_file {
        return keys::load(file, "the token secret").map(Some);
    }
    if settings.jwks_url.is_some() {
        // An identity provider signs the tokens; no local secret is made up.
        return Ok(None);
    }
    // Every instance of a shared deployment must accept the same tokens.
    anyhow::ensure!(
        !settings.is_shared_deployment(),
        "no token secret is configured, and with PostgreSQL or S3 none is generated (every \
         instance must accept the same tokens): set MEDRELAY_JWKS_URL with MEDRELAY_JWT_ISSUER \
         and MEDRELAY_JWT_AUDIENCE for an identity provider, or MEDRELAY_JWT_SECRET (for example \
         the part after the colon of a line `medrelay keygen` prints) on every instance"
    );
    keys::load_or_create(&settings.data_dir.join("jwt.secret"), 32, "token secret").map(Some)
}

impl Authenticator {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let hs256 = match hs256_secret(settings)? {
            Some(secret) => Some((
                DecodingKey::from_secret(secret.expose()).context("loading the token secret")?,
                secret,
            )),
            None => None,
        };
        let jwks = settings.jwks_url.as_ref().map(|source| Jwks {
            source: source.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("a plain HTTP client builds"),
            cache: RwLock::new(Cached {
                keys: JwkSet { keys: vec![] },
                fetched: None,
                fresh_until: None,
            }),
            refreshing: tokio::sync::Mutex::new(()),
        });
        Ok(Self {
            inner: Arc::new(Inner {
                hs256,
                jwks,
                issuer: settings.jwt_issuer.clone(),
                audience: settings.jwt_audience.clone(),
            }),
        })
    }

    /// Mints a token for `user` (the `token` command and tests). Needs the HS256 secret.
    pub fn mint(&self, user: &str, ttl: Duration) -> anyhow::Result<String> {
        let (_, secret) = self
            .inner
            .hs256
            .as_ref()
            .context("no HS256 secret is configured, so medrelay cannot mint tokens")?;
        anyhow::ensure!(!user.trim().is_empty(), "the user id must not be empty");
        let now = crate::clock::now_secs();
        let claims = Claims {
            sub: user.to_owned(),
            iat: Some(now),
            exp: now + ttl.as_secs(),
            nbf: None,
        };
        let key = EncodingKey::from_secret(secret.expose()).context("loading the token secret")?;
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key)
            .context("signing the token")
    }

    /// Verifies a bearer token and returns its user.
    pub async fn verify(&self, token: &str) -> Result<User, ApiError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| ApiError::Unauthorized)?;
        let key = match header.alg {
            Algorithm::HS256 => self
                .inner
                .hs256
                .as_ref()
                .ok_or(ApiError::Unauthorized)?
                .0
                .clone(),
            Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => {
                let jwks = self.inner.jwks.as_ref().ok_or(ApiError::Unauthorized)?;
                jwks.key_for(header.kid.as_deref(), header.alg).await?
            }
            _ => return Err(ApiError::Unauthorized),
        };
        let mut validation = Validation::new(header.alg);
        validation.leeway = LEEWAY_SECS;
        // The times are checked below on medrelay's clock (the database's on PostgreSQL), not
        // on this host's, which may be skewed; `exp` stays required.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        match &self.inner.issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match &self.inner.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|_| ApiError::Unauthorized)?;
        let sub = data.claims.sub.trim();
        if sub.is_empty() || sub.len() > 256 {
            return Err(ApiError::Unauthorized);
        }
        let now = crate::clock::now_secs();
        let claims = &data.claims;
        // Expired, not valid yet, or issued in the future (a broken or hostile issuer).
        if claims.exp.saturating_add(LEEWAY_SECS) <= now
            || claims.nbf.is_some_and(|nbf| nbf > now + LEEWAY_SECS)
            || claims.iat.is_some_and(|iat| iat > now + LEEWAY_SECS)
        {
            return Err(ApiError::Unauthorized);
        }
        Ok(User {
            id: UserId::from_raw(sub),
        })
    }
}

impl Jwks {
    async fn key_for(&self, kid: Option<&str>, alg: Algorithm) -> Result<DecodingKey, ApiError> {
        let (fetched, expired) = {
            let cache = self.cache.read().await;
            let now = Instant::now();
            (
                cache.fetched,
                cache.fresh_until.is_none_or(|until| now >= until),
            )
        };
        let may_refetch = fetched.is_none_or(|at| at.elapsed() >= JWKS_REFRESH_MIN);
        if expired && may_refetch {
            self.refresh(fetched).await?;
        } else if let Some(key) = self.lookup(kid, alg).await {
            return Ok(key);
        } else if may_refetch {
            // An unknown kid: the provider may have rotated its keys.
            self.refresh(fetched).await?;
        }
        self.lookup(kid, alg).await.ok_or(ApiError::Unauthorized)
    }

    /// Refetches the document, once for all the requests that found it stale at `seen` (the
    /// fetch they saw): whoever comes second finds it already done. On failure the keys
    /// already known stay in use; with none known, the request cannot be checked: 503.
    async fn refresh(&self, seen: Option<Instant>) -> Result<(), ApiError> {
        let _single = self.refreshing.lock().await;
        if self.cache.read().await.fetched != seen {
            return Ok(());
        }
        let fetched = self.fetch().await;
        let mut cache = self.cache.write().await;
        let now = Instant::now();
        cache.fetched = Some(now);
        match fetched {
            Ok((keys, max_age)) => {
                cache.keys = keys;
                cache.fresh_until = Some(now + max_age);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not load the JWKS document");
                if cache.keys.keys.is_empty() {
                    Err(ApiError::unavailable(e))
                } else {
                    Ok(())
                }
            }
        }
    }

    async fn lookup(&self, kid: Option<&str>, alg: Algorithm) -> Option<DecodingKey> {
        let cache = self.cache.read().await;
        let set = &cache.keys;
        let jwk = match kid {
            Some(kid) => set.find(kid)?,
            None if set.keys.len() == 1 => &set.keys[0],
            None => return None,
        };
        // The key's own algorithm, where it names one, must be the token's.
        if let Some(key_alg) = jwk.common.key_algorithm
            && key_alg.to_string() != format!("{alg:?}")
        {
            return None;
        }
        DecodingKey::from_jwk(jwk).ok()
    }

    /// The document and how long it stays fresh.
    async fn fetch(&self) -> anyhow::Result<(JwkSet, Duration)> {
        let (text, max_age) =
            if self.source.starts_with("http://") || self.source.starts_with("https://") {
                let response = self
                    .http
                    .get(&self.source)
                    .send()
                    .await
                    .context("fetching the JWKS document")?
                    .error_for_status()
                    .context("fetching the JWKS document")?;
                let max_age = response
                    .headers()
                    .get(reqwest::header::CACHE_CONTROL)
                    .and_then(|v| v.to_str().ok())
                    .and_then(max_age);
                let text = response.text().await.context("reading the JWKS document")?;
                (text, max_age)
            } else {
                let path = self.source.strip_prefix("file://").unwrap_or(&self.source);
                let text = tokio::fs::read_to_string(path)
                    .await
                    .with_context(|| format!("reading the JWKS file {path}"))?;
                (text, None)
            };
        let max_age = max_age
            .unwrap_or(JWKS_MAX_AGE_DEFAULT)
            .clamp(JWKS_MAX_AGE_MIN, JWKS_MAX_AGE_MAX);
        let keys = serde_json::from_str(&text).context("parsing the JWKS document")?;
        Ok((keys, max_age))
    }
}

/// The `max-age` of a `Cache-Control` value (`no-cache`/`no-store` count as 0: the lower
/// bound applies).
fn max_age(cache_control: &str) -> Option<Duration> {
    cache_control.split(',').find_map(|directive| {
        let directive = directive.trim().to_ascii_lowercase();
        if directive == "no-cache" || directive == "no-store" {
            return Some(Duration::ZERO);
        }
        let seconds = directive.strip_prefix("max-age=")?.trim_matches('"');
        seconds.parse::<u64>().ok().map(Duration::from_secs)
    })
}

impl<S> FromRequestParts<S> for User
where
    S: Send + Sync,
    Authenticator: axum::extract::FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::FromRef;
        let auth = Authenticator::from_ref(state);
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or(ApiError::Unauthorized)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or(ApiError::Unauthorized)?;
        auth.verify(token.trim()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_max_age_of_a_cache_control_header() {
        assert_eq!(
            max_age("public, max-age=3600"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(max_age("max-age=\"60\""), Some(Duration::from_secs(60)));
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=soon"), None);
    }
}
