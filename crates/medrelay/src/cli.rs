//! The command line: `serve | token | process FILE | purge-user ID | openapi`, plus flags for
//! the settings of api.md. Part of the binary, not the library: it is the one importer of the
//! composition root (`medrelay::app`). Uses `anyhow` at the top; prints results to stdout,
//! logs to stderr.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use medrelay::config::{Overrides, Settings, duration};
use medrelay::ids::UserId;
use medrelay::model::DeletionReason;
use medrelay::processor::{Document, ProcessError, Sniffed, admit};

#[derive(Debug, Parser)]
#[command(
    name = "medrelay",
    version,
    about = "Medical documents in, structured data out, nothing kept."
)]
pub struct Cli {
    /// A TOML configuration file (also MEDRELAY_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to bind (MEDRELAY_LISTEN).
    #[arg(long, global = true)]
    pub listen: Option<String>,
    /// Where embedded defaults live (MEDRELAY_DATA_DIR).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// sqlite://… or postgres://… (MEDRELAY_DATABASE_URL).
    #[arg(long, global = true)]
    pub database_url: Option<String>,
    /// file://… or s3://bucket/prefix (MEDRELAY_STORAGE_URL).
    #[arg(long, global = true)]
    pub storage_url: Option<String>,
    /// local or anthropic (MEDRELAY_PROCESSOR).
    #[arg(long, global = true)]
    pub processor: Option<String>,
    /// Jobs processed at once (MEDRELAY_WORKERS).
    #[arg(long, global = true)]
    pub workers: Option<usize>,
    /// Roles of this process: api,worker,sweeper (MEDRELAY_ROLES).
    #[arg(long, global = true)]
    pub roles: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// API, worker and sweeper in one process.
    Serve,
    /// Print a bearer token for a user, signed with the configured HS256 secret.
    Token {
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "1h", value_parser = duration::parse)]
        ttl: Duration,
    },
    /// Run one file through validation and the configured processor; print the result JSON.
    Process { file: PathBuf },
    /// Delete every temporary byte and key of one user.
    PurgeUser { id: String },
    /// Print the OpenAPI document.
    Openapi,
    /// Print a fresh master key line (`kid:base64`) for MEDRELAY_MASTER_KEY.
    Keygen,
}

impl Cli {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            storage_url: self.storage_url.clone(),
            processor: self.processor.clone(),
            workers: self.workers,
            roles: self.roles.clone(),
        }
    }

    pub fn settings(&self) -> anyhow::Result<Settings> {
        Settings::load(self.config.as_deref(), &self.overrides())
    }
}

/// Runs the parsed command; the process exit code follows the result.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Openapi => {
            let text = serde_json::to_string_pretty(&medrelay::http::openapi())?;
            println!("{text}");
            Ok(())
        }
        Command::Keygen => {
            let today = medrelay::clock::now().date();
            let line = medrelay::keys::new_key_line(&format!(
                "{:04}{:02}{:02}",
                today.year(),
                u8::from(today.month()),
                today.day()
            ))?;
            println!("{line}");
            Ok(())
        }
        Command::Serve => serve(cli.settings()?).await,
        Command::Token { user, ttl } => {
            let settings = cli.settings()?;
            let auth = medrelay::auth::Authenticator::new(&settings)?;
            println!("{}", auth.mint(user, *ttl)?);
            Ok(())
        }
        Command::Process { file } => process(cli.settings()?, file).await,
        Command::PurgeUser { id } => {
            let settings = cli.settings()?;
            let state = medrelay::app::build_state(settings).await?;
            let lifecycle = &state.lifecycle;
            let (jobs, objects) = lifecycle
                .delete_user_data(&UserId::from_raw(id.as_str()), DeletionReason::Operator)
                .await?;
            lifecycle.db().close().await;
            println!("deleted {jobs} jobs and {objects} objects");
            Ok(())
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    medrelay::telemetry::init(&settings.log_format);
    tracing::info!(settings = ?settings, "starting");
    if !settings.heic {
        tracing::warn!(
            "HEIC photos are off: an iPhone's HEIC photo is refused (415) with advice to send \
             JPEG. Set MEDRELAY_HEIC=true (or heic = true in the configuration file) to accept \
             and convert them"
        );
    }
    let mut running = medrelay::app::start(settings).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{}", running.addr)?;
        if let Some(admin) = running.admin_addr {
            writeln!(out, "admin listening on http://{admin}")?;
        }
        out.flush()?;
    }
    tracing::info!(addr = %running.addr, "listening");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let failed = tokio::select! {
        _ = sigterm.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
        outcome = running.wait() => Some(outcome),
    };
    if let Some(outcome) = failed {
        outcome.context("a role stopped unexpectedly")?;
    }
    tracing::info!("shutting down: finishing in-flight requests and jobs");
    running.stop().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn process(settings: Settings, file: &PathBuf) -> anyhow::Result<()> {
    let meta = std::fs::metadata(file).with_context(|| format!("reading {}", file.display()))?;
    anyhow::ensure!(
        meta.len() <= settings.max_upload_bytes,
        "the file is larger than MEDRELAY_MAX_UPLOAD_BYTES ({} bytes)",
        settings.max_upload_bytes
    );
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    anyhow::ensure!(!bytes.is_empty(), "the file is empty");
    let media_type = match admit(&bytes, settings.heic) {
        Sniffed::Accepted(m) => m,
        Sniffed::Heic => anyhow::bail!("HEIC photos are switched off (MEDRELAY_HEIC=false)"),
        Sniffed::Avif => anyhow::bail!("AVIF photos are not supported: send JPEG"),
        Sniffed::Unsupported => {
            anyhow::bail!("unsupported file type: send a PDF, JPEG, PNG, WebP or HEIC")
        }
    };
    let processor = medrelay::processor::configured(&settings)?;
    let document = Document {
        media_type,
        bytes: bytes.into(),
    };
    // Nothing is stored or charged to a user: this is the operator's own run.
    match processor
        .process(document, &medrelay::processor::Unlimited)
        .await
    {
        Ok(result) => {
            println!("{}", serde_json::to_string_pretty(&result)?);
            Ok(())
        }
        Err(ProcessError::Abort(refusal)) => {
            let error = refusal.job_error();
            anyhow::bail!("{} ({})", error.message, error.code)
        }
        Err(ProcessError::Retry { reason, .. }) => anyhow::bail!("temporary failure: {reason}"),
        Err(ProcessError::Unmanaged(e)) => Err(e.context("processing failed")),
        // A file from disk is never sealed: no master key is asked for.
        Err(e @ ProcessError::KeyMissing { .. }) => Err(e.into()),
    }
}
