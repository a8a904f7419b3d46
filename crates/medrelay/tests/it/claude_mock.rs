//! A local stand-in for Claude's Messages API: scripted answers, recorded calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use parking_lot::Mutex;
use serde_json::{Value, json};

/// One scripted answer of the mock.
#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Value,
    pub delay: Duration,
}

impl Reply {
    pub fn ok(input: Value) -> Reply {
        Reply {
            status: 200,
            headers: vec![],
            body: json!({
                "id": "msg_test", "type": "message", "role": "assistant", "model": "claude-test",
                "content": [{"type": "tool_use", "id": "toolu_1", "name": "record_extraction", "input": input}],
                "stop_reason": "tool_use",
                "usage": {"input_tokens": 10, "output_tokens": 10},
            }),
            delay: Duration::ZERO,
        }
    }
    pub fn error(status: u16, kind: &str) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: json!({"type": "error", "error": {"type": kind, "message": "provider text that must never reach the app"}, "request_id": "req_1"}),
            delay: Duration::ZERO,
        }
    }
}

/// A recorded call.
#[derive(Clone)]
pub struct Call {
    pub at: Instant,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Clone, Default)]
pub struct Mock {
    script: Arc<Mutex<Vec<Reply>>>,
    /// Answer used when the script is exhausted.
    fallback: Arc<Mutex<Option<Reply>>>,
    calls: Arc<Mutex<Vec<Call>>>,
    /// Calls being answered now, and the most there ever were at once.
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Mock {
    pub async fn start(script: Vec<Reply>, fallback: Option<Reply>) -> (Mock, String) {
        let mock = Mock {
            script: Arc::new(Mutex::new(script.into_iter().rev().collect())),
            fallback: Arc::new(Mutex::new(fallback)),
            calls: Arc::default(),
            in_flight: Arc::default(),
            max_in_flight: Arc::default(),
        };
        let state = mock.clone();
        let router = axum::Router::new().route(
            "/v1/messages",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                    state.max_in_flight.fetch_max(now, Ordering::SeqCst);
                    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    state.calls.lock().push(Call {
                        at: Instant::now(),
                        headers,
                        body,
                    });
                    let reply = state
                        .script
                        .lock()
                        .pop()
                        .or_else(|| state.fallback.lock().clone())
                        .unwrap_or_else(|| Reply::error(500, "api_error"));
                    tokio::time::sleep(reply.delay).await;
                    state.in_flight.fetch_sub(1, Ordering::SeqCst);
                    let mut response = axum::response::Response::builder()
                        .status(reply.status)
                        .header("content-type", "application/json");
                    for (k, v) in &reply.headers {
                        response = response.header(*k, v);
                    }
                    response
                        .body(axum::body::Body::from(reply.body.to_string()))
                        .unwrap()
                }
            }),
        );
        // Like the real API, take requests up to 32 MB.
        let router = router.layer(axum::extract::DefaultBodyLimit::max(32 * 1024 * 1024));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        (mock, format!("http://{addr}"))
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().clone()
    }

    /// The most calls that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

pub fn extraction(text: &str) -> Value {
    json!({
        "document": {"type": "lab_report", "title": "Blood count", "date": "2026-10-02", "language": "en", "page_count": 1},
        "summary": "Your blood count is normal.",
        "patient": {"name": null, "date_of_birth": null},
        "providers": [{"name": "Dr. Test", "role": "physician", "organization": null}],
        "diagnoses": [],
        "medications": [],
        "lab_results": [{"test": "Hemoglobin", "value": "13.2", "unit": "g/dL", "reference_range": "12-16", "flag": "normal"}],
        "allergies": [],
        "procedures": [],
        "follow_up": ["Repeat in a year"],
        "text": text,
    })
}
