//! The integration suite: one test binary, a module per behaviour. Every test starts the real
//! application (or the real `medrelay` binary) and drives it as a client would; the
//! behavioural modules run on every backend: SQLite and PostgreSQL, each with the local
//! folder and with S3 (moto).

// Support
mod claude_mock;
mod fcm_mock;
mod fixtures;
#[macro_use]
mod harness;
mod scripted;
mod server;

// Behaviour
mod access;
mod architecture;
mod binary;
mod chaos;
mod claude;
mod deletion;
mod demo;
mod encryption;
mod expiry;
mod fuzz;
mod heic;
mod hostile;
mod instances;
mod keys;
mod limits;
mod local_processor;
mod operations;
mod polling;
mod purge;
mod push;
mod queue;
mod sweeping;
mod tolerant;
mod tus;
mod tus_clients;
mod upload;
