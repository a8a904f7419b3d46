//! Secrets kept in files: the HS256 token secret and the master keys, generated into the data
//! dir (mode 0600) on first start when none is configured, and the opaque per-user prefix
//! derived from the master key.
//!
//! Never logs or prints key material; `Debug` of [`KeyBytes`] prints nothing.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;
use aws_lc_rs::{hkdf, hmac};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use zeroize::Zeroizing;

pub use medrelay_crypto::{KeyBytes, random_bytes};

use crate::config::Settings;
use crate::crypto::Keyring;
use crate::ids::{UserId, UserPrefix};

/// The configured master keys (`MEDRELAY_MASTER_KEY`), else the key file, generated with mode
/// 0600 when it does not exist in development (SQLite and a local folder); refused otherwise.
pub fn load_keyring(settings: &Settings) -> anyhow::Result<Keyring> {
    let mut keyring = configured_keyring(settings)?;
    if let Some(kid) = &settings.master_key_current {
        keyring
            .set_current(kid)
            .context("reading MEDRELAY_MASTER_KEY_CURRENT")?;
    }
    if let Some(prefix) = &settings.prefix_key {
        let material = decode(prefix.expose()).context("reading MEDRELAY_PREFIX_KEY")?;
        keyring.set_prefix_source(material);
    }
    Ok(keyring)
}

fn configured_keyring(settings: &Settings) -> anyhow::Result<Keyring> {
    if let Some(inline) = &settings.master_key {
        return Keyring::parse(inline.expose()).context("reading MEDRELAY_MASTER_KEY");
    }
    // Instances sharing a database and a bucket must share their keys: a key made up here (or
    // one an earlier version made up in the data dir) would leave the others unable to read
    // this instance's jobs. A shared deployment names its key explicitly.
    anyhow::ensure!(
        !settings.is_shared_deployment() || settings.master_key_file.is_some(),
        "no master key is configured, and with PostgreSQL or S3 none is generated or taken from \
         the data dir (every instance must use the same one): set MEDRELAY_MASTER_KEY to the \
         line that `medrelay keygen` prints (the same on every instance), or \
         MEDRELAY_MASTER_KEY_FILE to a file holding it"
    );
    let file = settings.master_key_file();
    if !file.exists() {
        anyhow::ensure!(
            !settings.is_shared_deployment(),
            "no master key is configured, and with PostgreSQL or S3 none is generated (every \
             instance must use the same one): set MEDRELAY_MASTER_KEY to the line that \
             `medrelay keygen` prints (the same on every instance), or MEDRELAY_MASTER_KEY_FILE \
             to a file holding it"
        );
        load_or_create(&file, 32, "master key")?;
    }
    let text = Zeroizing::new(
        std::fs::read_to_string(&file)
            .with_context(|| format!("reading the master key file {}", file.display()))?,
    );
    Keyring::parse(&text).with_context(|| format!("reading the master key file {}", file.display()))
}

/// Reads a base64 secret from `path`, or creates one of `len` random bytes there with mode
/// 0600 when the file does not exist yet. `what` names it in the log line.
pub fn load_or_create(path: &Path, len: usize, what: &str) -> anyhow::Result<KeyBytes> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            decode(&text).with_context(|| format!("reading {what} from {}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            let bytes = random_bytes(len)?;
            let encoded = Zeroizing::new(STANDARD.encode(&bytes));
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
            match file {
                Ok(mut file) => {
                    file.write_all(encoded.as_bytes())
                        .and_then(|_| file.write_all(b"\n"))
                        .and_then(|_| file.sync_all())
                        .with_context(|| format!("writing {}", path.display()))?;
                    tracing::warn!(
                        path = %path.display(),
                        "generated a new {what}: fine for development; configure one for production"
                    );
                    Ok(KeyBytes::new(bytes))
                }
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    load_or_create(path, len, what)
                }
                Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Reads an existing base64 secret file.
pub fn load(path: &Path, what: &str) -> anyhow::Result<KeyBytes> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {what} from {}", path.display()))?;
    decode(&text).with_context(|| format!("decoding {what} in {}", path.display()))
}

fn decode(text: &str) -> anyhow::Result<KeyBytes> {
    let bytes = STANDARD
        .decode(text.trim())
        .context("the file must hold base64")?;
    anyhow::ensure!(bytes.len() >= 32, "the key must be at least 32 bytes");
    Ok(KeyBytes::new(bytes))
}

struct HmacLen;
impl hkdf::KeyType for HmacLen {
    fn len(&self) -> usize {
        32
    }
}

/// Derives the key that turns user ids into opaque object-key prefixes.
pub fn derive_prefix_key(master: &KeyBytes) -> anyhow::Result<hmac::Key> {
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"medrelay");
    let prk = salt.extract(master.expose());
    let info: [&[u8]; 1] = [b"medrelay user prefix v1"];
    let okm = prk
        .expand(&info, HmacLen)
        .map_err(|_| anyhow::anyhow!("deriving the prefix key failed"))?;
    let mut key = Zeroizing::new([0u8; 32]);
    okm.fill(key.as_mut())
        .map_err(|_| anyhow::anyhow!("deriving the prefix key failed"))?;
    Ok(hmac::Key::new(hmac::HMAC_SHA256, key.as_ref()))
}

/// The opaque object-key prefix of a user: 128 bits of HMAC-SHA256(user id), in hex. Object
/// keys never carry the user id itself.
pub fn user_prefix(key: &hmac::Key, user_id: &UserId) -> UserPrefix {
    let tag = hmac::sign(key, user_id.as_str().as_bytes());
    UserPrefix::from_raw(
        tag.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
    )
}

/// A fresh master key line, `kid:base64` (the id names the day it was made, plus 4 random hex
/// digits so that two keys made the same day differ): what `medrelay keygen` prints.
pub fn new_key_line(today: &str) -> anyhow::Result<String> {
    let material = Zeroizing::new(random_bytes(32)?);
    let tag = random_bytes(2)?;
    Ok(format!(
        "k{today}-{:02x}{:02x}:{}",
        tag[0],
        tag[1],
        STANDARD.encode(material.as_slice())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_generated_secret_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/jwt.secret");
        let first = load_or_create(&path, 32, "test secret").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let second = load_or_create(&path, 32, "test secret").unwrap();
        assert_eq!(first.expose(), second.expose());
        assert_eq!(first.expose().len(), 32);
        assert_eq!(format!("{first:?}"), "KeyBytes([redacted])");
    }

    #[test]
    fn a_new_key_line_is_a_keyring_of_one_fresh_key() {
        let a = new_key_line("20261130").unwrap();
        let b = new_key_line("20261130").unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with("k20261130-"), "{a}");
        let keyring = Keyring::parse(&a).unwrap();
        assert_eq!(keyring.current_id(), a.split(':').next().unwrap());
        // Two lines make a keyring (the rotation's "add a key").
        assert!(Keyring::parse(&format!("{a},{b}")).is_ok());
    }

    #[test]
    fn a_rotation_first_adds_the_new_key_decrypt_only() {
        let (old, new) = (
            new_key_line("20261101").unwrap(),
            new_key_line("20261130").unwrap(),
        );
        let old_id = old.split(':').next().unwrap();
        let mut keyring = Keyring::parse(&format!("{old},{new}")).unwrap();
        assert_ne!(
            keyring.current_id(),
            old_id,
            "the last listed encrypts by default"
        );
        keyring.set_current(old_id).unwrap();
        assert_eq!(keyring.current_id(), old_id);
        assert!(keyring.set_current("k-unknown").is_err());
    }

    #[test]
    fn user_prefixes_are_opaque_and_distinct() {
        let key = derive_prefix_key(&KeyBytes::new(vec![7u8; 32])).unwrap();
        let alice = UserId::from_raw("alice@example.org");
        let a = user_prefix(&key, &alice);
        let b = user_prefix(&key, &UserId::from_raw("bob@example.org"));
        assert_eq!(a.as_str().len(), 32);
        assert_ne!(a, b);
        assert!(!a.as_str().contains("alice"));
        assert_eq!(a, user_prefix(&key, &alice));
        let other = derive_prefix_key(&KeyBytes::new(vec![8u8; 32])).unwrap();
        assert_ne!(a, user_prefix(&other, &alice));
    }
}
