#![forbid(unsafe_code)]
//! Envelope encryption of every temporary byte.
//!
//! A crate of its own so that the generic AEAD code is instantiated (and optimised) here: in an
//! unoptimised build of the service crate it would seal at ~8 MiB/s.
//!
//! - Key-encryption keys (KEKs) come from `MEDRELAY_MASTER_KEY` or `MEDRELAY_MASTER_KEY_FILE`,
//!   each with a key id; the last one listed encrypts, all of them decrypt (rotation).
//! - Every stored object (a document, a result) gets its own random 256-bit data key (DEK).
//!   The DEK is kept only wrapped by a KEK (AES-256-GCM, aws-lc-rs), in the job's database row,
//!   never next to the ciphertext.
//! - Objects are encrypted with the STREAM construction (`aead-stream`, STREAM-BE32) over
//!   AES-256-GCM from ring (adapted to the `aead` traits below): 64 KiB segments, a nonce of a
//!   random 7-byte prefix, a 32-bit segment counter and a last-segment flag. Every segment's associated data binds it to its user prefix, job,
//!   object kind and key id, so a ciphertext moved to another job fails to open.
//!
//! This module owns key material and plaintext-to-ciphertext conversion; it never logs either,
//! and `Debug` of every key type prints nothing. Opening fails closed: no plaintext is returned
//! unless every segment, including the last, authenticated.
//!
//! Object layout (byte offsets):
//!
//! ```text
//! 0..4    magic "MRE1"
//! 4..11   nonce prefix (7 random bytes)
//! 11..    segments: each 65536 plaintext bytes + 16-byte tag; the last one 0..=65536 bytes + tag
//! ```

use std::fmt;

use aead::consts::{U12, U16};
use aead::inout::InOutBuf;
use aead::{AeadCore, AeadInOut, TagPosition};
use aead_stream::{DecryptorBE32, EncryptorBE32};
use anyhow::Context;
use aws_lc_rs::aead::{AES_256_GCM, Aad, Nonce, RandomizedNonceKey};
use aws_lc_rs::digest;
use aws_lc_rs::hkdf;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use zeroize::Zeroizing;

/// Secret bytes that cannot be printed and are wiped when dropped.
#[derive(Clone)]
pub struct KeyBytes(Zeroizing<Vec<u8>>);

impl KeyBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyBytes([redacted])")
    }
}

/// Bytes from the operating system's random generator.
pub fn random_bytes(len: usize) -> anyhow::Result<Vec<u8>> {
    use aws_lc_rs::rand::SecureRandom;
    let mut bytes = vec![0u8; len];
    aws_lc_rs::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    Ok(bytes)
}

/// Plaintext bytes per segment.
pub const SEGMENT: usize = 64 * 1024;
const TAG: usize = 16;
const MAGIC: &[u8; 4] = b"MRE1";
const PREFIX: usize = 7;
const HEADER: usize = MAGIC.len() + PREFIX;
/// A wrapped data key: a 12-byte nonce, the 32-byte key encrypted, a 16-byte tag.
const WRAPPED_LEN: usize = 12 + 32 + TAG;

/// A ciphertext failed to authenticate, was truncated or reordered, or its key could not be
/// unwrapped. Never a processing error: the data may have been tampered with.
#[derive(Debug, thiserror::Error)]
#[error("integrity failure: {0}")]
pub struct IntegrityError(&'static str);

/// What a ciphertext is bound to.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    pub user_prefix: &'a str,
    pub job_id: &'a str,
    /// `document` or `result`.
    pub kind: &'a str,
}

impl Binding<'_> {
    fn bytes(&self, kid: &str) -> Vec<u8> {
        format!(
            "medrelay/v1\0{}\0{}\0{}\0{}",
            self.user_prefix, self.job_id, self.kind, kid
        )
        .into_bytes()
    }
}

/// A data key in memory; wiped on drop; prints nothing.
pub struct DataKey {
    key: Zeroizing<[u8; 32]>,
    kid: String,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([redacted])")
    }
}

impl DataKey {
    /// A key of its own for one part of what this key protects (HKDF-SHA256 with `context` as
    /// the info): the parts of one upload each get a distinct key, so no two of them can ever
    /// share a nonce under one key, however many there are.
    pub fn derive(&self, context: &[u8]) -> anyhow::Result<DataKey> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"medrelay/v1 derive").extract(&*self.key);
        let mut key = Zeroizing::new([0u8; 32]);
        prk.expand(&[context], hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut *key))
            .map_err(|_| anyhow::anyhow!("deriving a key failed"))?;
        Ok(DataKey {
            key,
            kid: self.kid.clone(),
        })
    }
}

/// A data key wrapped by a KEK, as stored in the job row.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    pub kid: String,
    pub bytes: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

struct Kek {
    id: String,
    key: RandomizedNonceKey,
}

/// The key-encryption keys. Cheap to share behind an `Arc`.
pub struct Keyring {
    keks: Vec<Kek>,
    /// The KEK that wraps new data keys (the last listed unless chosen).
    current: usize,
    /// The key material the user-prefix key is derived from (the first KEK listed, unless a
    /// separate one is configured).
    prefix_source: KeyBytes,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keks.iter().map(|k| k.id.as_str()).collect();
        f.debug_struct("Keyring")
            .field("kek_ids", &ids)
            .finish_non_exhaustive()
    }
}

impl Keyring {
    /// Parses KEKs: entries separated by newlines or commas, each `[kid:]base64` of 32 bytes.
    /// Without an explicit id, the id is derived from the key (`k` + 8 hex digits of its
    /// SHA-256), so the same key always has the same id.
    pub fn parse(text: &str) -> anyhow::Result<Keyring> {
        let mut keks = Vec::new();
        let mut first = None;
        for entry in text
            .split(['\n', ','])
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with('#'))
        {
            let (kid, b64) = match entry.split_once(':') {
                Some((kid, b64)) => (Some(kid.trim().to_owned()), b64.trim()),
                None => (None, entry),
            };
            let material = Zeroizing::new(
                STANDARD
                    .decode(b64)
                    .context("a master key must be base64 of 32 bytes")?,
            );
            anyhow::ensure!(material.len() == 32, "a master key must be 32 bytes");
            let kid = kid.unwrap_or_else(|| {
                let d = digest::digest(&digest::SHA256, &material);
                format!("k{}", hex(&d.as_ref()[..4]))
            });
            anyhow::ensure!(
                !kid.is_empty() && kid.len() <= 64 && !keks.iter().any(|k: &Kek| k.id == kid),
                "master key ids must be unique, 1 to 64 characters"
            );
            let key = RandomizedNonceKey::new(&AES_256_GCM, &material)
                .map_err(|_| anyhow::anyhow!("loading a master key failed"))?;
            if first.is_none() {
                first = Some(KeyBytes::new(material.to_vec()));
            }
            keks.push(Kek { id: kid, key });
        }
        let prefix_source = first.context("no master key configured")?;
        Ok(Keyring {
            current: keks.len() - 1,
            keks,
            prefix_source,
        })
    }

    /// The id of the KEK that wraps new data keys.
    pub fn current_id(&self) -> &str {
        &self.keks[self.current].id
    }

    /// Makes the KEK `kid` the one that wraps new data keys; the others only unwrap (the
    /// first phase of a rotation adds the new key this way, decrypt-only).
    pub fn set_current(&mut self, kid: &str) -> anyhow::Result<()> {
        self.current = self
            .keks
            .iter()
            .position(|k| k.id == kid)
            .with_context(|| format!("the encrypting master key {kid:?} is not in the keyring"))?;
        Ok(())
    }

    /// Derives user prefixes from `material` instead of the first KEK, so that every master
    /// key can be retired.
    pub fn set_prefix_source(&mut self, material: KeyBytes) {
        self.prefix_source = material;
    }

    /// Whether a master key of this id is configured (an unknown id is a configuration
    /// problem, not tampering).
    pub fn knows(&self, kid: &str) -> bool {
        self.keks.iter().any(|k| k.id == kid)
    }

    pub fn prefix_source(&self) -> &KeyBytes {
        &self.prefix_source
    }

    /// A fresh random data key, and its wrapped form for the job row.
    pub fn new_data_key(&self, binding: &Binding<'_>) -> anyhow::Result<(DataKey, WrappedKey)> {
        let kek = &self.keks[self.current];
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&random_bytes(32)?);
        let mut sealed = key.to_vec();
        let nonce = kek
            .key
            .seal_in_place_append_tag(Aad::from(binding.bytes(&kek.id)), &mut sealed)
            .map_err(|_| anyhow::anyhow!("wrapping a data key failed"))?;
        let mut bytes = nonce.as_ref().to_vec();
        bytes.extend_from_slice(&sealed);
        Ok((
            DataKey {
                key,
                kid: kek.id.clone(),
            },
            WrappedKey {
                kid: kek.id.clone(),
                bytes,
            },
        ))
    }

    /// Unwraps a data key; a wrong KEK, a key moved to another binding or tampering fail.
    pub fn unwrap_key(
        &self,
        wrapped: &WrappedKey,
        binding: &Binding<'_>,
    ) -> Result<DataKey, IntegrityError> {
        let kek = self
            .keks
            .iter()
            .find(|k| k.id == wrapped.kid)
            .ok_or(IntegrityError(
                "the data key's master key is not configured",
            ))?;
        if wrapped.bytes.len() != WRAPPED_LEN {
            return Err(IntegrityError("a wrapped data key has the wrong length"));
        }
        let (nonce, sealed) = wrapped.bytes.split_at(12);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| IntegrityError("a wrapped data key has a bad nonce"))?;
        let mut buffer = Zeroizing::new(sealed.to_vec());
        let plain = kek
            .key
            .open_in_place(nonce, Aad::from(binding.bytes(&kek.id)), &mut buffer)
            .map_err(|_| IntegrityError("a data key did not authenticate"))?;
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(plain);
        Ok(DataKey {
            key,
            kid: kek.id.clone(),
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// AES-256-GCM from `ring` behind the `aead` traits, so that `aead-stream`'s STREAM
/// construction runs on it (neither ring nor aws-lc-rs has a streaming construction of its own).
/// ring, not aws-lc-rs, for the segments because it has BoringSSL's VAES/AVX2 AES-GCM: on this
/// project's AMD EPYC (Zen 3) machines it seals at ~5.5 GB/s against aws-lc-rs's ~3 GB/s; on
/// AVX-512 machines both run at ~7 GiB/s (docs/benchmarks.md). The bytes are the same
/// AES-256-GCM either way. Only the cipher is adapted: nonces come from STREAM, which makes them
/// unique per data key.
pub struct Aes256Gcm(ring::aead::LessSafeKey);

impl AeadCore for Aes256Gcm {
    type NonceSize = U12;
    type TagSize = U16;
    const TAG_POSITION: TagPosition = TagPosition::Postfix;
}

fn nonce_of(nonce: &aead::Nonce<Aes256Gcm>) -> aead::Result<ring::aead::Nonce> {
    let bytes: [u8; 12] = nonce.as_slice().try_into().map_err(|_| aead::Error)?;
    Ok(ring::aead::Nonce::assume_unique_for_key(bytes))
}

impl AeadInOut for Aes256Gcm {
    fn encrypt_inout_detached(
        &self,
        nonce: &aead::Nonce<Self>,
        associated_data: &[u8],
        buffer: InOutBuf<'_, '_, u8>,
    ) -> aead::Result<aead::Tag<Self>> {
        let data = buffer.into_out_with_copied_in();
        let tag = self
            .0
            .seal_in_place_separate_tag(
                nonce_of(nonce)?,
                ring::aead::Aad::from(associated_data),
                data,
            )
            .map_err(|_| aead::Error)?;
        aead::Tag::<Self>::try_from(tag.as_ref()).map_err(|_| aead::Error)
    }

    fn decrypt_inout_detached(
        &self,
        nonce: &aead::Nonce<Self>,
        associated_data: &[u8],
        buffer: InOutBuf<'_, '_, u8>,
        tag: &aead::Tag<Self>,
    ) -> aead::Result<()> {
        let data = buffer.into_out_with_copied_in();
        let tag = ring::aead::Tag::try_from(tag.as_slice()).map_err(|_| aead::Error)?;
        self.0
            .open_in_place_separate_tag(
                nonce_of(nonce)?,
                ring::aead::Aad::from(associated_data),
                tag,
                data,
                0..,
            )
            .map(|_| ())
            .map_err(|_| aead::Error)
    }
}

fn cipher(key: &DataKey) -> Aes256Gcm {
    let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, key.key.as_ref())
        .expect("a 32-byte key");
    Aes256Gcm(ring::aead::LessSafeKey::new(unbound))
}

/// Encrypts a stream segment by segment. Feed plaintext with [`SealingStream::push`], then call
/// [`SealingStream::finish`]; each returns ciphertext ready to store. Holds at most one
/// segment of plaintext, and seals it in place (no extra copies).
pub struct SealingStream {
    encryptor: EncryptorBE32<Aes256Gcm>,
    aad: Vec<u8>,
    header: Option<Bytes>,
    pending: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for SealingStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingStream")
    }
}

fn segment_buffer() -> Zeroizing<Vec<u8>> {
    Zeroizing::new(Vec::with_capacity(SEGMENT + TAG))
}

impl SealingStream {
    pub fn new(key: &DataKey, binding: &Binding<'_>) -> anyhow::Result<SealingStream> {
        let prefix = random_bytes(PREFIX)?;
        let mut header = Vec::with_capacity(HEADER);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&prefix);
        let nonce = aead_stream::Nonce::<Aes256Gcm, aead_stream::StreamBE32<Aes256Gcm>>::try_from(
            prefix.as_slice(),
        )
        .expect("a 7-byte nonce prefix");
        let mut aad = header.clone();
        aad.extend_from_slice(&binding.bytes(&key.kid));
        Ok(SealingStream {
            encryptor: EncryptorBE32::from_aead(cipher(key), &nonce),
            aad,
            header: Some(Bytes::from(header)),
            pending: segment_buffer(),
        })
    }

    /// Takes plaintext; returns the ciphertext of every segment completed so far.
    pub fn push(&mut self, mut plaintext: &[u8]) -> anyhow::Result<Vec<Bytes>> {
        let mut out = Vec::new();
        if let Some(header) = self.header.take() {
            out.push(header);
        }
        while !plaintext.is_empty() {
            // A full segment is sealed only once more data follows, so the last segment is
            // always sealed by `finish` with the last-segment flag.
            if self.pending.len() == SEGMENT {
                self.encryptor
                    .encrypt_next_in_place(&self.aad, &mut *self.pending)
                    .map_err(|_| anyhow::anyhow!("sealing a segment failed"))?;
                // The buffer now holds ciphertext only; hand it over without copying.
                let sealed = std::mem::take(&mut *self.pending);
                self.pending = segment_buffer();
                out.push(Bytes::from(sealed));
            }
            let take = (SEGMENT - self.pending.len()).min(plaintext.len());
            self.pending.extend_from_slice(&plaintext[..take]);
            plaintext = &plaintext[take..];
        }
        Ok(out)
    }

    /// Seals what is left as the last segment; returns the final ciphertext.
    pub fn finish(mut self) -> anyhow::Result<Vec<Bytes>> {
        let mut out = Vec::new();
        if let Some(header) = self.header.take() {
            out.push(header);
        }
        let mut last = std::mem::take(&mut self.pending);
        self.encryptor
            .encrypt_last_in_place(&self.aad, &mut *last)
            .map_err(|_| anyhow::anyhow!("sealing the last segment failed"))?;
        out.push(Bytes::from(std::mem::take(&mut *last)));
        Ok(out)
    }
}

/// Encrypts a whole (small) plaintext, such as a result.
pub fn seal(key: &DataKey, binding: &Binding<'_>, plaintext: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut stream = SealingStream::new(key, binding)?;
    let mut out =
        Vec::with_capacity(plaintext.len() + HEADER + TAG * (plaintext.len() / SEGMENT + 1));
    for part in stream.push(plaintext)? {
        out.extend_from_slice(&part);
    }
    for part in stream.finish()? {
        out.extend_from_slice(&part);
    }
    Ok(out)
}

/// The tail of a vector, from `start`, as an in-place AEAD buffer: segments are decrypted where
/// they land in the output.
struct Tail<'a> {
    vec: &'a mut Vec<u8>,
    start: usize,
}

impl AsRef<[u8]> for Tail<'_> {
    fn as_ref(&self) -> &[u8] {
        &self.vec[self.start..]
    }
}

impl AsMut<[u8]> for Tail<'_> {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..]
    }
}

impl aead::Buffer for Tail<'_> {
    fn extend_from_slice(&mut self, other: &[u8]) -> aead::Result<()> {
        self.vec.extend_from_slice(other);
        Ok(())
    }

    fn truncate(&mut self, len: usize) {
        self.vec.truncate(self.start + len);
    }
}

/// Decrypts a whole ciphertext. Returns plaintext only if every segment authenticated, in
/// order, and the last one carries the last-segment flag; on failure, what was decrypted so far
/// is wiped.
pub fn open(
    key: &DataKey,
    binding: &Binding<'_>,
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, IntegrityError> {
    if ciphertext.len() < HEADER + TAG || &ciphertext[..MAGIC.len()] != MAGIC {
        return Err(IntegrityError("not a medrelay ciphertext"));
    }
    let (header, mut body) = ciphertext.split_at(HEADER);
    let nonce = aead_stream::Nonce::<Aes256Gcm, aead_stream::StreamBE32<Aes256Gcm>>::try_from(
        &header[MAGIC.len()..],
    )
    .map_err(|_| IntegrityError("bad nonce prefix"))?;
    let mut aad = header.to_vec();
    aad.extend_from_slice(&binding.bytes(&key.kid));
    let mut decryptor = DecryptorBE32::from_aead(cipher(key), &nonce);
    // Zeroizing: a failure half-way drops (and wipes) what was already decrypted.
    let mut plaintext = Zeroizing::new(Vec::with_capacity(body.len()));
    while body.len() > SEGMENT + TAG {
        let (segment, rest) = body.split_at(SEGMENT + TAG);
        let start = plaintext.len();
        plaintext.extend_from_slice(segment);
        decryptor
            .decrypt_next_in_place(
                &aad,
                &mut Tail {
                    vec: &mut plaintext,
                    start,
                },
            )
            .map_err(|_| IntegrityError("a segment did not authenticate"))?;
        body = rest;
    }
    let start = plaintext.len();
    plaintext.extend_from_slice(body);
    decryptor
        .decrypt_last_in_place(
            &aad,
            &mut Tail {
                vec: &mut plaintext,
                start,
            },
        )
        .map_err(|_| IntegrityError("the last segment did not authenticate (truncated?)"))?;
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_differ_by_context_and_open_only_their_own() {
        let ring = keyring(3);
        let (key, _) = ring.new_data_key(&BIND).unwrap();
        let a = key.derive(b"part 0").unwrap();
        let b = key.derive(b"part 1").unwrap();
        assert_eq!(*a.key, *key.derive(b"part 0").unwrap().key, "deterministic");
        assert_ne!(*a.key, *b.key);
        assert_ne!(*a.key, *key.key);
        let sealed = seal(&a, &BIND, b"chunk").unwrap();
        assert_eq!(&open(&a, &BIND, &sealed).unwrap()[..], b"chunk");
        assert!(open(&b, &BIND, &sealed).is_err());
        assert!(open(&key, &BIND, &sealed).is_err());
    }

    fn keyring(n: u8) -> Keyring {
        Keyring::parse(&STANDARD.encode([n; 32])).unwrap()
    }

    const BIND: Binding<'static> = Binding {
        user_prefix: "u1",
        job_id: "job-1",
        kind: "document",
    };

    fn sealed_with_stream(key: &DataKey, data: &[u8], chunk: usize) -> Vec<u8> {
        let mut stream = SealingStream::new(key, &BIND).unwrap();
        let mut out = Vec::new();
        for piece in data.chunks(chunk.max(1)) {
            for part in stream.push(piece).unwrap() {
                out.extend_from_slice(&part);
            }
        }
        for part in stream.finish().unwrap() {
            out.extend_from_slice(&part);
        }
        out
    }

    #[test]
    fn round_trips_at_every_segment_boundary() {
        let ring = keyring(1);
        let sizes = [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            2 * SEGMENT,
            3 * 1024 * 1024 + 17,
        ];
        for size in sizes {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            for chunk in [1000, SEGMENT, 3 * SEGMENT + 5] {
                let (key, _) = ring.new_data_key(&BIND).unwrap();
                let sealed = sealed_with_stream(&key, &data, chunk);
                let segments = size.div_ceil(SEGMENT).max(1);
                assert_eq!(sealed.len(), HEADER + size + segments * TAG, "size {size}");
                let opened = open(&key, &BIND, &sealed).unwrap();
                assert_eq!(
                    opened.as_slice(),
                    data.as_slice(),
                    "size {size} chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn tampering_fails_closed() {
        let ring = keyring(2);
        let (key, wrapped) = ring.new_data_key(&BIND).unwrap();
        let data: Vec<u8> = (0..3 * SEGMENT + 100).map(|i| i as u8).collect();
        let sealed = seal(&key, &BIND, &data).unwrap();
        let seg = SEGMENT + TAG;

        let mut flipped = sealed.clone();
        flipped[HEADER + 5] ^= 1;
        assert!(open(&key, &BIND, &flipped).is_err(), "flipped bit");

        let truncated = &sealed[..sealed.len() - 1];
        assert!(open(&key, &BIND, truncated).is_err(), "truncated tail");

        let dropped_last = &sealed[..HEADER + 3 * seg];
        assert!(
            open(&key, &BIND, dropped_last).is_err(),
            "dropped last segment"
        );

        let mut swapped = sealed[..HEADER].to_vec();
        swapped.extend_from_slice(&sealed[HEADER + seg..HEADER + 2 * seg]);
        swapped.extend_from_slice(&sealed[HEADER..HEADER + seg]);
        swapped.extend_from_slice(&sealed[HEADER + 2 * seg..]);
        assert!(open(&key, &BIND, &swapped).is_err(), "swapped segments");

        let mut extra = sealed.clone();
        extra.extend_from_slice(&sealed[HEADER..HEADER + seg]);
        assert!(open(&key, &BIND, &extra).is_err(), "extra segment");

        let other_job = Binding {
            job_id: "job-2",
            ..BIND
        };
        assert!(
            open(&key, &other_job, &sealed).is_err(),
            "moved to another job"
        );
        assert!(
            ring.unwrap_key(&wrapped, &other_job).is_err(),
            "key moved to another job"
        );
        let as_result = Binding {
            kind: "result",
            ..BIND
        };
        assert!(
            ring.unwrap_key(&wrapped, &as_result).is_err(),
            "document key used for a result"
        );

        let wrong_kek = keyring(3);
        assert!(wrong_kek.unwrap_key(&wrapped, &BIND).is_err(), "wrong KEK");
        let same_id_other_key =
            Keyring::parse(&format!("{}:{}", wrapped.kid, STANDARD.encode([9u8; 32]))).unwrap();
        assert!(
            same_id_other_key.unwrap_key(&wrapped, &BIND).is_err(),
            "wrong KEK with the same id"
        );

        // And untouched, it opens.
        let key = ring.unwrap_key(&wrapped, &BIND).unwrap();
        assert_eq!(
            open(&key, &BIND, &sealed).unwrap().as_slice(),
            data.as_slice()
        );
    }

    #[test]
    fn no_key_and_nonce_pair_repeats_across_ten_thousand_objects() {
        let ring = keyring(4);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let (key, wrapped) = ring.new_data_key(&BIND).unwrap();
            let sealed = seal(&key, &BIND, b"x").unwrap();
            // (data key, nonce prefix): each object has its own key and prefix.
            assert!(seen.insert((key.key.to_vec(), sealed[4..HEADER].to_vec())));
            // The wrapping nonces under the one KEK never repeat either.
            assert!(seen.insert((b"kek".to_vec(), wrapped.bytes[..12].to_vec())));
        }
    }

    #[test]
    fn the_newest_key_encrypts_and_all_keys_decrypt() {
        let old = STANDARD.encode([5u8; 32]);
        let new = STANDARD.encode([6u8; 32]);
        let before = Keyring::parse(&old).unwrap();
        let (_, wrapped_old) = before.new_data_key(&BIND).unwrap();
        let rotated = Keyring::parse(&format!("{old}\n{new}\n")).unwrap();
        let (_, wrapped_new) = rotated.new_data_key(&BIND).unwrap();
        assert_ne!(wrapped_old.kid, wrapped_new.kid);
        assert_eq!(rotated.current_id(), wrapped_new.kid);
        assert!(rotated.unwrap_key(&wrapped_old, &BIND).is_ok());
        assert!(rotated.unwrap_key(&wrapped_new, &BIND).is_ok());
        assert!(before.unwrap_key(&wrapped_new, &BIND).is_err());
        // Explicit ids are accepted; duplicates and short keys are not.
        assert!(Keyring::parse(&format!("a:{old},b:{new}")).is_ok());
        assert!(Keyring::parse(&format!("a:{old},a:{new}")).is_err());
        assert!(Keyring::parse(&STANDARD.encode([1u8; 16])).is_err());
        assert!(format!("{rotated:?}").contains(&wrapped_new.kid));
    }

    #[test]
    fn segments_are_the_same_aes_256_gcm_as_aws_lc_rs_computes() {
        // Objects sealed before the segment cipher moved from aws-lc-rs to ring must still open:
        // both must produce the same bytes for the same key, nonce and associated data.
        use aead::AeadInOut;
        let key = [0x42u8; 32];
        let nonce_bytes = [9u8; 12];
        let plaintext: Vec<u8> = (0..SEGMENT + 5).map(|i| (i * 31) as u8).collect();

        let ours = Aes256Gcm(ring::aead::LessSafeKey::new(
            ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).unwrap(),
        ));
        let mut by_ring = plaintext.clone();
        let tag = ours
            .encrypt_inout_detached(
                &aead::Nonce::<Aes256Gcm>::from(nonce_bytes),
                b"ad",
                by_ring.as_mut_slice().into(),
            )
            .unwrap();
        by_ring.extend_from_slice(&tag);

        let aws = aws_lc_rs::aead::LessSafeKey::new(
            aws_lc_rs::aead::UnboundKey::new(&AES_256_GCM, &key).unwrap(),
        );
        let mut by_aws_lc = plaintext.clone();
        aws.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(b"ad"),
            &mut by_aws_lc,
        )
        .unwrap();
        assert_eq!(by_ring, by_aws_lc);

        // And what aws-lc-rs sealed, the adapter opens.
        let (body, tag) = by_aws_lc.split_at_mut(plaintext.len());
        ours.decrypt_inout_detached(
            &aead::Nonce::<Aes256Gcm>::from(nonce_bytes),
            b"ad",
            body.into(),
            &aead::Tag::<Aes256Gcm>::try_from(&*tag).unwrap(),
        )
        .unwrap();
        assert_eq!(body, plaintext.as_slice());
    }

    #[test]
    fn the_same_plaintext_never_gives_the_same_ciphertext() {
        let ring = keyring(7);
        let (k1, _) = ring.new_data_key(&BIND).unwrap();
        let (k2, _) = ring.new_data_key(&BIND).unwrap();
        let a = seal(&k1, &BIND, b"%PDF-1.7 same bytes").unwrap();
        let b = seal(&k2, &BIND, b"%PDF-1.7 same bytes").unwrap();
        assert_ne!(a, b);
        assert!(!a.windows(5).any(|w| w == b"%PDF-"));
    }
}
