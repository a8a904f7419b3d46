//! Logs (tracing) and metrics (Prometheus text).
//!
//! Owns the rule that logs and metric labels carry ids and states only: no document byte, no
//! result, no file name, no user name. The panic hook logs where a panic happened, never its
//! message (a parser's message may quote document content).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Installs the log subscriber (stderr) and the panic hook. `format` is `text` or `json`.
pub fn init(format: &str) {
    // Parsers run in sandbox children whose output is discarded; should one ever run here,
    // its logs (which quote stream bytes and document text) stay out of the service log.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info"))
        .add_directive("lopdf=off".parse().expect("a valid directive"))
        .add_directive("pdf_extract=off".parse().expect("a valid directive"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown".into());
        tracing::error!(%location, "panic (message withheld: it may quote document content)");
    }));
}

/// The Prometheus recorder. One per process: metrics macros write to the global recorder.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
}

impl Metrics {
    pub fn global() -> Metrics {
        static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
        let handle = HANDLE.get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then ours stays unused.
            let _ = metrics::set_global_recorder(recorder);
            handle
        });
        Metrics {
            handle: handle.clone(),
        }
    }

    pub fn render(&self) -> String {
        self.handle.render()
    }
}

/// Keeps histograms bounded: the exporter needs a periodic upkeep when it serves no HTTP.
pub async fn upkeep(metrics: Metrics, shutdown: CancellationToken) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(5)) => metrics.handle.run_upkeep(),
        }
    }
}
