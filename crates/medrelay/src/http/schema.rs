//! Schemas the OpenAPI document needs that no Rust type of the API carries: a document's bytes
//! (a binary string, not an array of numbers), the multipart form of an upload, and the tus
//! version header. They describe the wire only; no handler reads them.

use serde::Serialize;
use utoipa::ToSchema;

/// A document's bytes, as the request body.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct FileBytes(#[allow(dead_code)] Vec<u8>);

/// An upload as a multipart form: one part named `file` (the server ignores any other part;
/// a client sends none).
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentForm {
    /// The document: a PDF, JPEG, PNG, WebP or HEIC (the type is decided from its bytes).
    #[schema(value_type = String, format = Binary)]
    #[allow(dead_code)]
    pub file: Vec<u8>,
}

/// The tus protocol version (`Tus-Resumable`): `1.0.0`.
#[derive(ToSchema, Serialize)]
#[allow(dead_code)]
pub enum TusVersion {
    #[serde(rename = "1.0.0")]
    V1,
}
