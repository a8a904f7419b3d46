//! Settings: embedded defaults, an optional TOML file, `MEDRELAY_*` environment variables and
//! command-line flags, in that order of precedence (later wins).
//!
//! Owns the names of api.md's configuration table. It must never print a secret: `Debug` on
//! [`Settings`] redacts every key and token.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The fully commented default configuration, embedded so that `serve` needs no file.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../config/default.toml");

/// Which processor turns a document into a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessorKind {
    Local,
    Anthropic,
}

/// A secret string whose `Debug` and `Display` print nothing.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Secret(loose_string(d)?))
    }
}

/// Environment values such as `MEDRELAY_JWT_SECRET=1234` reach serde as numbers; a string
/// setting accepts them as text.
fn loose_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Loose {
        S(String),
        I(i64),
        U(u64),
        F(f64),
        B(bool),
    }
    Ok(match Loose::deserialize(d)? {
        Loose::S(s) => s,
        Loose::I(i) => i.to_string(),
        Loose::U(u) => u.to_string(),
        Loose::F(f) => f.to_string(),
        Loose::B(b) => b.to_string(),
    })
}

fn loose_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "loose_string")] String);
    Ok(Option::<Wrap>::deserialize(d)?
        .map(|w| w.0)
        .filter(|s| !s.is_empty()))
}

/// A duration written as `500ms`, `5s`, `2m`, `1h` (or a bare number of seconds).
pub mod duration {
    use super::*;

    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        if let Ok(secs) = text.parse::<u64>() {
            return Ok(Duration::from_secs(secs));
        }
        humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
    }

    pub fn format(d: Duration) -> String {
        if d.subsec_millis() != 0 || d.as_secs() == 0 {
            format!("{}ms", d.as_millis())
        } else {
            format!("{}s", d.as_secs())
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = loose_string(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `MEDRELAY_RETRY_DELAYS`: a comma-separated list of durations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryDelays(pub Vec<Duration>);

impl Serialize for RetryDelays {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let text: Vec<String> = self.0.iter().map(|d| duration::format(*d)).collect();
        s.serialize_str(&text.join(","))
    }
}

impl<'de> Deserialize<'de> for RetryDelays {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = loose_string(d)?;
        let delays = text
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(duration::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(serde::de::Error::custom)?;
        if delays.len() > 3 {
            return Err(serde::de::Error::custom(
                "MEDRELAY_RETRY_DELAYS takes at most three delays (a job is retried at most three times)",
            ));
        }
        Ok(RetryDelays(delays))
    }
}

/// The roles one process plays. All three by default; `MEDRELAY_ROLES=api` runs only the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub worker: bool,
    pub sweeper: bool,
}

impl Serialize for Roles {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut names = Vec::new();
        for (on, name) in [
            (self.api, "api"),
            (self.worker, "worker"),
            (self.sweeper, "sweeper"),
        ] {
            if on {
                names.push(name);
            }
        }
        s.serialize_str(&names.join(","))
    }
}

impl<'de> Deserialize<'de> for Roles {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = loose_string(d)?;
        let mut roles = Roles {
            api: false,
            worker: false,
            sweeper: false,
        };
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "api" => roles.api = true,
                "worker" => roles.worker = true,
                "sweeper" => roles.sweeper = true,
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "unknown role {other:?} (expected api, worker, sweeper)"
                    )));
                }
            }
        }
        Ok(roles)
    }
}

/// Every setting of medrelay. Field names are the lower-case `MEDRELAY_*` names.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(deserialize_with = "loose_string")]
    pub listen: String,
    pub data_dir: PathBuf,
    #[serde(default, deserialize_with = "loose_opt_string")]
    pub database_url: Option<String>,
    #[serde(default, deserialize_with = "loose_opt_string")]
    pub storage_url: Option<String>,
    pub processor: ProcessorKind,
    #[serde(default)]
    pub anthropic_api_key: Option<Secret>,
    #[serde(deserialize_with = "loose_string")]
    pub anthropic_base_url: String,
    #[serde(deserialize_with = "loose_string")]
    pub anthropic_model: String,
    /// Upper bound of one Claude call, from connect to the last byte of the answer.
    #[serde(with = "duration")]
    pub anthropic_timeout: Duration,
    #[serde(with = "duration")]
    pub anthropic_connect_timeout: Duration,
    pub anthropic_max_tokens: u32,
    #[serde(with = "duration")]
    pub temp_ttl: Duration,
    pub retry_delays: RetryDelays,
    #[serde(with = "duration")]
    pub sweep_interval: Duration,
    pub max_upload_bytes: u64,
    pub workers: usize,
    #[serde(with = "duration")]
    pub lease: Duration,
    #[serde(default)]
    pub master_key_file: Option<PathBuf>,
    /// Master keys inline (`[kid:]base64`, comma-separated; the last one encrypts). Takes
    /// precedence over `master_key_file`.
    #[serde(default)]
    pub master_key: Option<Secret>,
    /// The id of the master key that wraps new data keys (default: the last listed); the
    /// others only unwrap.
    #[serde(default, deserialize_with = "loose_opt_string")]
    pub master_key_current: Option<String>,
    /// Base64 of 32 bytes from which user prefixes are derived (default: the first master
    /// key), so that every master key can be retired.
    #[serde(default)]
    pub prefix_key: Option<Secret>,
    /// HS256 secret; when neither this nor `jwt_secret_file` is set, one is generated into
    /// the data dir.
    #[serde(default)]
    pub jwt_secret: Option<Secret>,
    #[serde(default)]
    pub jwt_secret_file: Option<PathBuf>,
    /// A JWKS document (http(s) URL or file path) for RS256/ES256/EdDSA tokens of an identity provider.
    #[serde(default, deserialize_with = "loose_opt_string")]
    pub jwks_url: Option<String>,
    #[serde(default, deserialize_with = "loose_opt_string")]
    pub jwt_issuer: Option<String>,
    #[serde(default, deserialize_with = "loose_opt_string")]
    pub jwt_audience: Option<String>,
    /// Address-space limit of a parser child, in bytes.
    pub sandbox_memory: u64,
    /// Wall-clock deadline (and CPU-time limit) of a parser child.
    #[serde(with = "duration")]
    pub sandbox_timeout: Duration,
    /// The binary re-executed as the parser child (default: this process's executable).
    #[serde(default)]
    pub sandbox_exe: Option<PathBuf>,
    /// Bytes a document's PDF streams may inflate to (images excepted).
    pub pdf_max_inflated_bytes: u64,
    pub pdf_max_pages: u32,
    pub pdf_max_objects: u64,
    /// How deep arrays and dictionaries may nest in one PDF object.
    pub pdf_max_depth: u32,
    /// Pixels of one photo.
    pub image_max_pixels: u64,
    /// Accept HEIC/HEIF photos (converted in the sandbox); off: 415 with advice.
    pub heic: bool,
    /// Uploads one user may send at once.
    pub user_concurrent_uploads: u32,
    /// Jobs of one user queued, processing or waiting for a retry at once.
    pub user_active_jobs: u32,
    /// Accepted uploads per user per rolling hour.
    pub user_uploads_per_hour: u32,
    /// Provider (Claude) calls per user per rolling day: the spend guard.
    pub user_provider_calls_per_day: u32,
    /// Event streams one user may hold open at once.
    pub user_event_streams: u32,
    /// Uploads in flight in this instance.
    pub max_concurrent_uploads: u32,
    /// Event streams open in this instance.
    pub max_event_streams: u32,
    /// Claude calls in flight in this instance; jobs wait for a slot.
    pub anthropic_concurrency: u32,
    /// A whole upload must finish within this.
    #[serde(with = "duration")]
    pub upload_deadline: Duration,
    /// Bytes per second, averaged over 30 s, below which an upload is cut off (0: no rule).
    pub upload_min_rate: u64,
    /// When set, `/metrics`, `/healthz` and `/readyz` are served only on this address.
    #[serde(default, deserialize_with = "loose_opt_string")]
    pub admin_listen: Option<String>,
    /// Milliseconds this instance's own clock is shifted by: for tests of skewed instances.
    #[serde(default)]
    pub clock_skew_ms: i64,
    pub roles: Roles,
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    #[serde(deserialize_with = "loose_string")]
    pub log_format: String,
    /// A Google service-account JSON (`project_id`, `client_email`, `private_key`,
    /// `token_uri`) for Firebase Cloud Messaging. Unset: push notifications are off, and an
    /// upload's `Push-Token` is not kept.
    #[serde(default)]
    pub fcm_credentials_file: Option<PathBuf>,
    /// Where FCM's HTTP v1 API is (tests point it at a local mock).
    #[serde(deserialize_with = "loose_string")]
    pub fcm_base_url: String,
    /// Serve the demo page at `/demo`. Unset: on with the embedded defaults, off on
    /// PostgreSQL or S3.
    #[serde(default)]
    pub demo: Option<bool>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Database URLs may carry a password: show the scheme only.
        let scheme = |u: &Option<String>| {
            u.as_deref()
                .map(|u| u.split(':').next().unwrap_or("").to_owned())
        };
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("database", &scheme(&self.database_url))
            .field("storage", &scheme(&self.storage_url))
            .field("processor", &self.processor)
            .field("anthropic_api_key", &self.anthropic_api_key)
            .field("anthropic_base_url", &self.anthropic_base_url)
            .field("anthropic_model", &self.anthropic_model)
            .field("temp_ttl", &self.temp_ttl)
            .field("retry_delays", &self.retry_delays)
            .field("sweep_interval", &self.sweep_interval)
            .field("max_upload_bytes", &self.max_upload_bytes)
            .field("workers", &self.workers)
            .field("lease", &self.lease)
            .field("master_key", &self.master_key)
            .field("master_key_current", &self.master_key_current)
            .field("prefix_key", &self.prefix_key)
            .field("jwt_secret", &self.jwt_secret)
            .field("jwks_url", &self.jwks_url)
            .field("sandbox_memory", &self.sandbox_memory)
            .field("sandbox_timeout", &self.sandbox_timeout)
            .field("user_concurrent_uploads", &self.user_concurrent_uploads)
            .field("user_active_jobs", &self.user_active_jobs)
            .field("user_uploads_per_hour", &self.user_uploads_per_hour)
            .field(
                "user_provider_calls_per_day",
                &self.user_provider_calls_per_day,
            )
            .field("user_event_streams", &self.user_event_streams)
            .field("max_concurrent_uploads", &self.max_concurrent_uploads)
            .field("max_event_streams", &self.max_event_streams)
            .field("anthropic_concurrency", &self.anthropic_concurrency)
            .field("upload_deadline", &self.upload_deadline)
            .field("upload_min_rate", &self.upload_min_rate)
            .field("admin_listen", &self.admin_listen)
            .field("roles", &self.roles)
            .field("fcm_credentials_file", &self.fcm_credentials_file)
            .field("fcm_base_url", &self.fcm_base_url)
            .field("demo", &self.demo)
            .finish_non_exhaustive()
    }
}

/// The settings' names: `MEDRELAY_<NAME>` in upper case. Other `MEDRELAY_*` variables are
/// ignored with a warning (a deployment may set variables for other tools or newer versions);
/// an unknown key in a configuration file is an error.
pub const KNOWN_KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "database_url",
    "storage_url",
    "processor",
    "anthropic_api_key",
    "anthropic_base_url",
    "anthropic_model",
    "anthropic_timeout",
    "anthropic_connect_timeout",
    "anthropic_max_tokens",
    "temp_ttl",
    "retry_delays",
    "sweep_interval",
    "max_upload_bytes",
    "workers",
    "lease",
    "master_key_file",
    "master_key",
    "master_key_current",
    "prefix_key",
    "jwt_secret",
    "jwt_secret_file",
    "jwks_url",
    "jwt_issuer",
    "jwt_audience",
    "sandbox_memory",
    "sandbox_timeout",
    "sandbox_exe",
    "pdf_max_inflated_bytes",
    "pdf_max_pages",
    "pdf_max_objects",
    "pdf_max_depth",
    "image_max_pixels",
    "heic",
    "user_concurrent_uploads",
    "user_active_jobs",
    "user_uploads_per_hour",
    "user_provider_calls_per_day",
    "user_event_streams",
    "max_concurrent_uploads",
    "max_event_streams",
    "anthropic_concurrency",
    "upload_deadline",
    "upload_min_rate",
    "admin_listen",
    "clock_skew_ms",
    "roles",
    "shutdown_grace",
    "poll_interval",
    "log_format",
    "fcm_credentials_file",
    "fcm_base_url",
    "demo",
];

/// Command-line overrides, as the CLI collected them (each `None` when not given).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<String>,
}

impl Settings {
    /// Loads settings: embedded defaults, then `config_file` (or `MEDRELAY_CONFIG`), then the
    /// environment, then `overrides`.
    pub fn load(config_file: Option<&Path>, overrides: &Overrides) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Toml::string(DEFAULT_CONFIG_TOML));
        let file = config_file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("MEDRELAY_CONFIG").map(PathBuf::from));
        if let Some(file) = file {
            anyhow::ensure!(
                file.exists(),
                "configuration file {} does not exist",
                file.display()
            );
            figment = figment.merge(Toml::file(file));
        }
        for (name, _) in std::env::vars() {
            if let Some(key) = name.strip_prefix("MEDRELAY_")
                && key != "CONFIG"
                && !KNOWN_KEYS.contains(&key.to_ascii_lowercase().as_str())
            {
                eprintln!("medrelay: ignoring unknown environment variable {name}");
            }
        }
        figment = figment
            .merge(
                Env::prefixed("MEDRELAY_")
                    .filter(|key| KNOWN_KEYS.contains(&key.as_str().to_ascii_lowercase().as_str())),
            )
            .merge(
                Env::raw()
                    .only(&["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"])
                    .map(|k| k.as_str().to_ascii_lowercase().into()),
            )
            .merge(Serialized::defaults(overrides));
        let settings: Settings = figment
            .extract()
            .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Settings from the embedded defaults alone (tests start from here).
    pub fn defaults() -> Self {
        Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
            .extract()
            .expect("the embedded default configuration is valid")
    }

    fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.workers >= 1, "MEDRELAY_WORKERS must be at least 1");
        if self.jwks_url.is_some() {
            // Without both, a token the same provider issued to another app would be accepted.
            anyhow::ensure!(
                self.jwt_issuer.is_some() && self.jwt_audience.is_some(),
                "MEDRELAY_JWKS_URL needs MEDRELAY_JWT_ISSUER and MEDRELAY_JWT_AUDIENCE: without \
                 them, tokens the identity provider issued to other apps would be accepted"
            );
        }
        anyhow::ensure!(
            self.sandbox_memory >= 64 * 1024 * 1024,
            "MEDRELAY_SANDBOX_MEMORY must be at least 64 MiB"
        );
        anyhow::ensure!(
            self.sandbox_timeout >= Duration::from_secs(1),
            "MEDRELAY_SANDBOX_TIMEOUT must be at least 1s"
        );
        anyhow::ensure!(
            self.max_upload_bytes >= 1,
            "MEDRELAY_MAX_UPLOAD_BYTES must be at least 1"
        );
        anyhow::ensure!(
            !self.temp_ttl.is_zero(),
            "MEDRELAY_TEMP_TTL must be longer than zero"
        );
        anyhow::ensure!(
            !self.sweep_interval.is_zero(),
            "MEDRELAY_SWEEP_INTERVAL must be longer than zero"
        );
        anyhow::ensure!(
            !self.lease.is_zero(),
            "MEDRELAY_LEASE must be longer than zero"
        );
        for (name, value) in [
            (
                "MEDRELAY_USER_CONCURRENT_UPLOADS",
                self.user_concurrent_uploads,
            ),
            ("MEDRELAY_USER_ACTIVE_JOBS", self.user_active_jobs),
            ("MEDRELAY_USER_UPLOADS_PER_HOUR", self.user_uploads_per_hour),
            (
                "MEDRELAY_USER_PROVIDER_CALLS_PER_DAY",
                self.user_provider_calls_per_day,
            ),
            ("MEDRELAY_USER_EVENT_STREAMS", self.user_event_streams),
            (
                "MEDRELAY_MAX_CONCURRENT_UPLOADS",
                self.max_concurrent_uploads,
            ),
            ("MEDRELAY_MAX_EVENT_STREAMS", self.max_event_streams),
            ("MEDRELAY_ANTHROPIC_CONCURRENCY", self.anthropic_concurrency),
        ] {
            anyhow::ensure!(value >= 1, "{name} must be at least 1");
        }
        anyhow::ensure!(
            !self.upload_deadline.is_zero(),
            "MEDRELAY_UPLOAD_DEADLINE must be longer than zero"
        );
        Ok(())
    }

    /// The upload deadline in force: never longer than the TTL, since no byte of an upload may
    /// outlive its start + TTL.
    pub fn upload_deadline_within_ttl(&self) -> Duration {
        self.upload_deadline.min(self.temp_ttl)
    }

    /// Whether this is a shared deployment (PostgreSQL or S3), where every instance must use
    /// the same configured keys and none may be generated.
    /// Whether `/demo` is served: as configured, else only on a single machine's embedded
    /// defaults (SQLite and a local folder).
    pub fn demo_enabled(&self) -> bool {
        self.demo.unwrap_or(!self.is_shared_deployment())
    }

    /// Whether this is a developer's machine: the HS256 token secret is generated here (no
    /// secret configured, no identity provider, no shared deployment) and the service listens
    /// on a loopback address only. The demo's sign-in, which mints a token for any user name,
    /// exists only then.
    pub fn generates_token_secret(&self) -> bool {
        let loopback = self
            .listen
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|addr| addr.ip().is_loopback())
            || self.listen.starts_with("localhost:");
        self.jwt_secret.is_none()
            && self.jwt_secret_file.is_none()
            && self.jwks_url.is_none()
            && !self.is_shared_deployment()
            && loopback
    }

    pub fn is_shared_deployment(&self) -> bool {
        self.database_url()
            .split(':')
            .next()
            .is_some_and(|scheme| scheme.starts_with("postgres"))
            || self.storage_url().starts_with("s3://")
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("medrelay.db").display()))
    }

    pub fn storage_url(&self) -> String {
        self.storage_url
            .clone()
            .unwrap_or_else(|| format!("file://{}", self.data_dir.join("objects").display()))
    }

    pub fn master_key_file(&self) -> PathBuf {
        self.master_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("master.key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_documented_forms() {
        assert_eq!(
            duration::parse("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(duration::parse("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(duration::parse("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(duration::parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(duration::parse("90").unwrap(), Duration::from_secs(90));
        assert!(duration::parse("soon").is_err());
    }

    #[test]
    fn embedded_defaults_match_the_contract() {
        let s = Settings::defaults();
        assert_eq!(s.listen, "127.0.0.1:8080");
        assert_eq!(s.data_dir, PathBuf::from("./data"));
        assert_eq!(s.processor, ProcessorKind::Local);
        assert_eq!(s.anthropic_base_url, "https://api.anthropic.com");
        assert_eq!(s.temp_ttl, Duration::from_secs(3600));
        assert_eq!(
            s.retry_delays.0,
            vec![
                Duration::from_secs(15),
                Duration::from_secs(60),
                Duration::from_secs(240)
            ]
        );
        assert_eq!(s.sweep_interval, Duration::from_secs(30));
        assert_eq!(s.max_upload_bytes, 33_554_432);
        assert_eq!(s.workers, 16);
        assert_eq!(s.lease, Duration::from_secs(120));
        assert_eq!(
            s.database_url(),
            format!("sqlite://{}", Path::new("./data/medrelay.db").display())
        );
        assert!(s.roles.api && s.roles.worker && s.roles.sweeper);
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let mut s = Settings::defaults();
        s.jwt_secret = Some(Secret::new("hunter2-very-secret"));
        s.anthropic_api_key = Some(Secret::new("sk-ant-canary"));
        s.database_url = Some("postgres://u:pgpassword@host/db".into());
        let text = format!("{s:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("sk-ant-canary"), "{text}");
        assert!(!text.contains("pgpassword"), "{text}");
    }

    #[test]
    fn every_setting_has_a_known_key() {
        let value = serde_json::to_value(Settings::defaults()).unwrap();
        let fields: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for field in &fields {
            assert!(
                KNOWN_KEYS.contains(field),
                "{field} is missing from KNOWN_KEYS"
            );
        }
        assert_eq!(fields.len(), KNOWN_KEYS.len());
    }

    #[test]
    fn more_than_three_retry_delays_are_refused() {
        let err = Figment::from(Toml::string(DEFAULT_CONFIG_TOML))
            .merge(Toml::string("retry_delays = \"1s,2s,3s,4s\""))
            .extract::<Settings>();
        assert!(err.is_err());
    }
}
