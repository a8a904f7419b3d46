#![forbid(unsafe_code)]
//! medrelay: the server half of a medical-document app. It takes a document in, keeps it for
//! minutes, extracts structured data, answers asynchronously, and forgets everything.
//!
//! Modules are nouns for what they own; see README.md for the architecture.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
/// Envelope encryption (its own crate, `medrelay-crypto`).
pub use medrelay_crypto as crypto;
pub mod db;
pub mod error;
pub mod http;
pub mod keys;
pub mod model;
pub mod processor;
pub mod purge;
pub mod store;
pub mod sweeper;
pub mod telemetry;
pub mod worker;
