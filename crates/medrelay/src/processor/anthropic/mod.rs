//! The `anthropic` processor: Claude's Messages API (`POST {base}/v1/messages`, non-streaming),
//! with the document inline as base64 and the answer forced through one strict tool whose
//! input schema is the result shape of api.md.
//!
//! Owns the request shape, what is sent ([`prepare`]: PDF parts within Claude's limits, photos
//! decoded, oriented, stripped of metadata and scaled; made in the sandbox child) and the
//! mapping of every provider answer to Retry or Abort. It makes no retries of its own: the
//! job's schedule is the only retry layer. It never logs request or response bodies, and never
//! uses the Files API or Message Batches (both keep copies outside our one hour).

pub mod prepare;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures::FutureExt;
use futures::future::BoxFuture;
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::sandbox::{Part, Sandbox};
use super::{CallBudget, Document, ProcessError, Processor, Refusal};
use crate::config::Settings;
use crate::model::{DocumentResult, ProcessorInfo};

/// The system prompt, reviewed as a file of its own.
pub const SYSTEM_PROMPT: &str = include_str!("system_prompt.md");
/// The tool input schema: the result shape of api.md (without `processor`, which we fill).
pub const EXTRACTION_SCHEMA: &str = include_str!("extraction_schema.json");
pub const TOOL_NAME: &str = "record_extraction";
pub const API_VERSION: &str = "2023-06-01";
/// Claude reads at most this many PDF pages per request.
pub const MAX_PDF_PAGES: usize = 100;
/// A provider's `Retry-After` is honoured up to this.
const RETRY_AFTER_CAP: Duration = Duration::from_secs(300);

#[derive(Clone)]
pub struct AnthropicProcessor {
    http: reqwest::Client,
    endpoint: String,
    api_key: String,
    model: String,
    max_tokens: u32,
    sandbox: Sandbox,
    /// Calls in flight in this instance.
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for AnthropicProcessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnthropicProcessor")
            .field("endpoint", &self.endpoint)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl AnthropicProcessor {
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let api_key = settings
            .anthropic_api_key
            .as_ref()
            .map(|k| k.expose().to_owned())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!("MEDRELAY_PROCESSOR=anthropic needs ANTHROPIC_API_KEY")
            })?;
        let http = reqwest::Client::builder()
            .connect_timeout(settings.anthropic_connect_timeout)
            .timeout(settings.anthropic_timeout)
            // The job's retry schedule is the only retry layer.
            .retry(reqwest::retry::never())
            .build()?;
        Ok(Self {
            http,
            endpoint: format!(
                "{}/v1/messages",
                settings.anthropic_base_url.trim_end_matches('/')
            ),
            api_key,
            model: settings.anthropic_model.clone(),
            max_tokens: settings.anthropic_max_tokens,
            sandbox: Sandbox::from_settings(settings)?,
            slots: Arc::new(Semaphore::new(settings.anthropic_concurrency as usize)),
        })
    }

    /// The request body for one document part (a PDF of at most 100 pages, or a photo).
    pub fn request_body(&self, block: Value) -> Value {
        let schema: Value = serde_json::from_str(EXTRACTION_SCHEMA).expect("the schema is JSON");
        json!({
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": SYSTEM_PROMPT,
            "tools": [{
                "name": TOOL_NAME,
                "description": "Record the structured content of the medical document.",
                "input_schema": schema,
                "strict": true,
            }],
            "tool_choice": {"type": "tool", "name": TOOL_NAME},
            "messages": [{
                "role": "user",
                "content": [
                    block,
                    {"type": "text", "text": "Record this document with the record_extraction tool."},
                ],
            }],
        })
    }

    async fn call(&self, body: Vec<u8>) -> Result<DocumentResult, ProcessError> {
        // At most MEDRELAY_ANTHROPIC_CONCURRENCY calls in flight: the others wait here.
        let _slot = match self.slots.try_acquire() {
            Ok(slot) => slot,
            Err(_) => {
                metrics::counter!("medrelay_provider_call_waits_total").increment(1);
                self.slots
                    .acquire()
                    .await
                    .map_err(|_| ProcessError::Unmanaged(anyhow::anyhow!("closed call slots")))?
            }
        };
        let response = self
            .http
            .post(&self.endpoint)
            .header("x-api-key", &self.api_key)
            .header("anthropic-version", API_VERSION)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| ProcessError::Retry {
                reason: if e.is_timeout() {
                    "the provider timed out".into()
                } else {
                    "the provider could not be reached".into()
                },
                retry_after: None,
            })?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.map_err(|_| ProcessError::Retry {
            reason: "the provider's answer was cut off".into(),
            retry_after: None,
        })?;
        if !status.is_success() {
            return Err(classify_error(status, &headers, &text));
        }
        parse_answer(&text)
    }
}

impl Processor for AnthropicProcessor {
    fn name(&self) -> &'static str {
        "anthropic"
    }

    fn process<'a>(
        &'a self,
        document: Document,
        budget: &'a dyn CallBudget,
    ) -> BoxFuture<'a, Result<DocumentResult, ProcessError>> {
        async move {
            // Parsed, split and re-encoded in the sandbox child: never in this process.
            let parts = self.sandbox.prepare(&document).await?;
            let parts: Vec<(Value, u32)> = parts
                .into_iter()
                .map(|(part, bytes)| match part {
                    Part::Pdf { pages } => (pdf_block(&bytes), pages),
                    Part::Jpeg { .. } => (image_block(&bytes), 1),
                })
                .collect();
            // The spend guard first, for every part at once: a refused call is never made.
            budget.charge(parts.len() as u32).await?;
            let mut merged: Option<DocumentResult> = None;
            let mut total_pages = 0u32;
            for (block, pages) in parts {
                // Serialised at once, and the tree dropped: a call in flight holds its bytes only
                // (thousands may wait on the provider at once).
                let body = serde_json::to_vec(&self.request_body(block))
                    .map_err(|e| ProcessError::Unmanaged(e.into()))?;
                let part = self.call(body).await?;
                total_pages += pages;
                merged = Some(match merged {
                    None => part,
                    Some(acc) => merge(acc, part),
                });
            }
            let mut result = merged.ok_or(ProcessError::Abort(Refusal::Unreadable))?;
            result.processor = ProcessorInfo {
                name: "anthropic".into(),
                model: Some(self.model.clone()),
            };
            result.document.media_type = Some(document.media_type.as_str().into());
            if total_pages > 0 {
                result.document.page_count = Some(total_pages);
            }
            Ok(result)
        }
        .boxed()
    }
}

fn pdf_block(pdf: &[u8]) -> Value {
    json!({
        "type": "document",
        "source": {"type": "base64", "media_type": "application/pdf", "data": STANDARD.encode(pdf)},
    })
}

fn image_block(jpeg: &[u8]) -> Value {
    json!({
        "type": "image",
        "source": {"type": "base64", "media_type": "image/jpeg", "data": STANDARD.encode(jpeg)},
    })
}

/// Merges the result of a later part into the result so far.
fn merge(mut acc: DocumentResult, part: DocumentResult) -> DocumentResult {
    acc.providers.extend(part.providers);
    acc.diagnoses.extend(part.diagnoses);
    acc.medications.extend(part.medications);
    acc.lab_results.extend(part.lab_results);
    acc.allergies.extend(part.allergies);
    acc.procedures.extend(part.procedures);
    acc.follow_up.extend(part.follow_up);
    acc.summary = match (acc.summary, part.summary) {
        (Some(a), Some(b)) => Some(format!("{a}\n\n{b}")),
        (a, b) => a.or(b),
    };
    acc.text = match (acc.text, part.text) {
        (Some(a), Some(b)) => Some(format!("{a}\n\n{b}")),
        (a, b) => a.or(b),
    };
    acc.patient.name = acc.patient.name.or(part.patient.name);
    acc.patient.date_of_birth = acc.patient.date_of_birth.or(part.patient.date_of_birth);
    acc.document.title = acc.document.title.or(part.document.title);
    acc.document.date = acc.document.date.or(part.document.date);
    acc.document.language = acc.document.language.or(part.document.language);
    acc
}

/// Reads `retry-after-ms` or `retry-after` (seconds, or an HTTP date), capped at 5 minutes.
/// Whatever a provider sends (`inf`, `1e30`, `NaN`, negative numbers, garbage) never panics:
/// a number is clamped into 0..=cap before it becomes a `Duration`.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let seconds = |value: f64| {
        (!value.is_nan())
            .then(|| Duration::from_secs_f64(value.clamp(0.0, RETRY_AFTER_CAP.as_secs_f64())))
    };
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return seconds(ms / 1000.0);
    }
    let value = header("retry-after")?;
    match value.parse::<f64>() {
        Ok(secs) => seconds(secs),
        Err(_) => httpdate_delay(value).map(|d| d.min(RETRY_AFTER_CAP)),
    }
}

fn httpdate_delay(value: &str) -> Option<Duration> {
    let format = time::format_description::parse_borrowed::<2>(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT",
    )
    .ok()?;
    let at = time::PrimitiveDateTime::parse(value, &format)
        .ok()?
        .assume_utc();
    let wait = at - crate::clock::now();
    Some(Duration::from_secs(wait.whole_seconds().max(0) as u64))
}

/// Maps an error answer of the Messages API to Retry or Abort, following Anthropic's error
/// documentation. Nothing of the provider's text reaches the app.
pub fn classify_error(status: StatusCode, headers: &HeaderMap, body: &str) -> ProcessError {
    let parsed: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let error_type = parsed["error"]["type"].as_str().unwrap_or("").to_owned();
    let spend_limit = parsed["error"]["details"]["error_code"] == "enforced_spend_limit_reached"
        || body.contains("enforced_spend_limit_reached");
    let should_retry = headers
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.eq_ignore_ascii_case("true"));
    let retry = ProcessError::Retry {
        reason: format!("the provider answered {} {error_type}", status.as_u16()),
        retry_after: retry_after(headers),
    };
    if should_retry == Some(false) {
        return ProcessError::Abort(match status.as_u16() {
            401 | 403 | 429 => Refusal::ServiceUnavailable,
            _ => Refusal::Rejected,
        });
    }
    match status.as_u16() {
        429 if spend_limit => ProcessError::Abort(Refusal::ServiceUnavailable),
        408 | 409 | 429 | 500..=599 => retry,
        401..=403 => ProcessError::Abort(Refusal::ServiceUnavailable),
        413 => ProcessError::Abort(Refusal::TooComplex),
        _ if should_retry == Some(true) => retry,
        _ => ProcessError::Abort(Refusal::Rejected),
    }
}

/// Reads a successful answer: the tool's input, validated against the result shape.
pub fn parse_answer(body: &str) -> Result<DocumentResult, ProcessError> {
    let invalid = |why: &str| ProcessError::Retry {
        reason: format!("the provider's answer was invalid: {why}"),
        retry_after: None,
    };
    let answer: Value = serde_json::from_str(body).map_err(|_| invalid("not JSON"))?;
    match answer["stop_reason"].as_str() {
        Some("refusal") => return Err(ProcessError::Abort(Refusal::Refused)),
        // A truncated answer cannot be trusted; a longer document part will not shrink.
        Some("max_tokens") => return Err(ProcessError::Abort(Refusal::TooComplex)),
        _ => {}
    }
    let input = answer["content"]
        .as_array()
        .and_then(|blocks| {
            blocks
                .iter()
                .find(|b| b["type"] == "tool_use" && b["name"] == TOOL_NAME)
        })
        .map(|b| b["input"].clone())
        .ok_or_else(|| invalid("no tool call"))?;
    let mut with_processor = input;
    if let Some(map) = with_processor.as_object_mut() {
        map.insert(
            "processor".into(),
            json!({"name": "anthropic", "model": null}),
        );
    } else {
        return Err(invalid("the tool input is not an object"));
    }
    let result: DocumentResult = serde_json::from_value(with_processor)
        .map_err(|_| invalid("the tool input does not match the schema"))?;
    validate(&result).map_err(invalid)?;
    Ok(result)
}

/// Checks what the types cannot: dates are real `YYYY-MM-DD` dates.
fn validate(result: &DocumentResult) -> Result<(), &'static str> {
    let date_ok = |d: &Option<String>| {
        d.as_deref().is_none_or(|d| {
            time::Date::parse(
                d,
                &time::macros::format_description!("[year]-[month]-[day]"),
            )
            .is_ok()
        })
    };
    if !date_ok(&result.document.date) || !date_ok(&result.patient.date_of_birth) {
        return Err("a date is not YYYY-MM-DD");
    }
    if result.procedures.iter().any(|p| !date_ok(&p.date)) {
        return Err("a procedure date is not YYYY-MM-DD");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn is_retry(e: &ProcessError) -> bool {
        matches!(e, ProcessError::Retry { .. })
    }

    #[test]
    fn provider_errors_map_as_documented() {
        let body =
            |t: &str| format!(r#"{{"type":"error","error":{{"type":"{t}","message":"x"}}}}"#);
        let none = HeaderMap::new();
        for (status, t) in [
            (429, "rate_limit_error"),
            (500, "api_error"),
            (529, "overloaded_error"),
            (408, "timeout"),
            (409, "conflict"),
            (503, "x"),
        ] {
            assert!(
                is_retry(&classify_error(
                    StatusCode::from_u16(status).unwrap(),
                    &none,
                    &body(t)
                )),
                "{status}"
            );
        }
        for (status, refusal) in [
            (400, Refusal::Rejected),
            (401, Refusal::ServiceUnavailable),
            (403, Refusal::ServiceUnavailable),
            (404, Refusal::Rejected),
            (413, Refusal::TooComplex),
        ] {
            match classify_error(
                StatusCode::from_u16(status).unwrap(),
                &none,
                &body("invalid_request_error"),
            ) {
                ProcessError::Abort(r) => assert_eq!(r, refusal, "{status}"),
                other => panic!("{status}: {other:?}"),
            }
        }
        let spend = r#"{"type":"error","error":{"type":"rate_limit_error","message":"x","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
        assert!(matches!(
            classify_error(StatusCode::TOO_MANY_REQUESTS, &none, spend),
            ProcessError::Abort(Refusal::ServiceUnavailable)
        ));
        let no_retry = headers(&[("x-should-retry", "false")]);
        assert!(matches!(
            classify_error(
                StatusCode::from_u16(529).unwrap(),
                &no_retry,
                &body("overloaded_error")
            ),
            ProcessError::Abort(_)
        ));
    }

    #[test]
    fn retry_after_headers_are_read_and_capped() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")])),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "1500")])),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "86400")])),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            retry_after(&headers(&[(
                "retry-after",
                "Wed, 21 Oct 2015 07:28:00 GMT"
            )])),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&HeaderMap::new()), None);
        // Hostile or broken values never panic.
        let cap = Some(Duration::from_secs(300));
        for (name, value, expected) in [
            ("retry-after", "inf", cap),
            ("retry-after", "1e30", cap),
            ("retry-after", "-5", Some(Duration::ZERO)),
            ("retry-after", "NaN", None),
            ("retry-after", "soon", None),
            ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT", cap),
            ("retry-after-ms", "inf", cap),
            ("retry-after-ms", "-inf", Some(Duration::ZERO)),
            ("retry-after-ms", "1e308", cap),
        ] {
            assert_eq!(
                retry_after(&headers(&[(name, value)])),
                expected,
                "{name}: {value}"
            );
        }
        match classify_error(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "12")]),
            "{}",
        ) {
            ProcessError::Retry { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(12)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_or_truncated_answers_are_classified_not_panics() {
        assert!(is_retry(&parse_answer("not json").unwrap_err()));
        assert!(is_retry(
            &parse_answer(r#"{"content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn"}"#)
                .unwrap_err()
        ));
        assert!(is_retry(&parse_answer(r#"{"content":[{"type":"tool_use","name":"record_extraction","input":{"document":{}}}],"stop_reason":"tool_use"}"#).unwrap_err()));
        assert!(matches!(
            parse_answer(r#"{"content":[],"stop_reason":"max_tokens"}"#).unwrap_err(),
            ProcessError::Abort(Refusal::TooComplex)
        ));
        assert!(matches!(
            parse_answer(r#"{"content":[],"stop_reason":"refusal"}"#).unwrap_err(),
            ProcessError::Abort(Refusal::Refused)
        ));
    }

    #[test]
    fn the_schema_names_every_field_of_the_result() {
        let schema: Value = serde_json::from_str(EXTRACTION_SCHEMA).unwrap();
        let result = serde_json::to_value(DocumentResult::default()).unwrap();
        for key in result
            .as_object()
            .unwrap()
            .keys()
            .filter(|k| *k != "processor")
        {
            assert!(
                schema["properties"][key].is_object(),
                "{key} missing from the schema"
            );
        }
        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for key in schema["properties"].as_object().unwrap().keys() {
            assert!(
                required.contains(&key.as_str()),
                "strict tools need {key} required"
            );
        }
    }
}
