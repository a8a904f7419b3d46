#![forbid(unsafe_code)]
//! medrelay: the server half of a medical-document app. It takes a document in, keeps it for
//! minutes, extracts structured data, answers asynchronously, and forgets everything.
//!
//! Modules are nouns for what they own (CONTRIBUTING.md says where each concern lives):
//!
//! - foundations: `ids`, `clock`, `config`, `model`, `error` (with the registry of codes),
//!   `keys`, `crypto`, `telemetry`;
//! - the two stores: `db` (SQL, nothing else) and `store` (bytes, one file per backend);
//! - `processor`: a document in, a result out;
//! - `push`: a data-only push to the device when its job ends (FCM), no patient data;
//! - `limits`: fair use (per-user and per-instance limits, the spend guard);
//! - `lifecycle`: every state change of a job with its side effects, and every rule about
//!   patient data;
//! - the roles, thin callers of `lifecycle`: `http`, `worker`, `sweeper`, `purge`, sharing
//!   `state`;
//! - `app`, the composition root, which only the binary (and tests) import.
//!
//! No module imports one that imports it back (`tests/it/architecture.rs` checks).

pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
/// Envelope encryption (its own crate, `medrelay-crypto`).
pub use medrelay_crypto as crypto;
pub mod db;
pub mod error;
pub mod http;
pub mod ids;
pub mod keys;
pub mod lifecycle;
pub mod limits;
pub mod model;
pub mod processor;
pub mod purge;
pub mod push;
pub mod state;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod worker;
