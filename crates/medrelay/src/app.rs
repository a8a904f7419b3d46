//! Builds the application from settings and a listener, and runs its roles (API, worker,
//! sweeper) until one cancellation token stops them all.
//!
//! Owns start-up order and shutdown; it must never start serving before the database is
//! migrated and the store is open.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use aws_lc_rs::hmac;
use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::{ProcessorKind, Settings};
use crate::crypto::Keyring;
use crate::db::Db;
use crate::keys;
use crate::processor::Processor;
use crate::processor::local::LocalProcessor;
use crate::store::Store;
use crate::telemetry::Metrics;

/// Everything a request handler or a job needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub db: Db,
    pub store: Store,
    pub auth: Authenticator,
    pub processor: Arc<dyn Processor>,
    pub keyring: Arc<Keyring>,
    pub prefix_key: Arc<hmac::Key>,
    /// Ids of jobs that changed, for server-sent events.
    pub events: broadcast::Sender<String>,
    /// Wakes the worker when a job was queued here.
    pub wake: Arc<Notify>,
    pub running: RunningJobs,
    pub metrics: Metrics,
}

impl axum::extract::FromRef<AppState> for Authenticator {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

impl AppState {
    /// Opens the database, the store and the keys that `settings` name.
    pub async fn new(settings: Settings) -> anyhow::Result<AppState> {
        let db = Db::connect(&settings.database_url())
            .await
            .context("opening the job database")?;
        let store = Store::open(&settings.storage_url()).context("opening the object store")?;
        let auth = Authenticator::new(&settings).context("loading token keys")?;
        let keyring = load_keyring(&settings).context("loading the master keys")?;
        let prefix_key = keys::derive_prefix_key(keyring.prefix_source())?;
        let processor: Arc<dyn Processor> = match settings.processor {
            ProcessorKind::Local => Arc::new(LocalProcessor),
            ProcessorKind::Anthropic => Arc::new(
                crate::processor::anthropic::AnthropicProcessor::new(&settings)
                    .context("configuring the anthropic processor")?,
            ),
        };
        let (events, _) = broadcast::channel(1024);
        Ok(AppState {
            settings: Arc::new(settings),
            db,
            store,
            auth,
            processor,
            keyring: Arc::new(keyring),
            prefix_key: Arc::new(prefix_key),
            events,
            wake: Arc::new(Notify::new()),
            running: RunningJobs::default(),
            metrics: Metrics::global(),
        })
    }

    pub fn user_prefix(&self, user_id: &str) -> String {
        keys::user_prefix(&self.prefix_key, user_id)
    }

    /// Tells event streams that a job changed.
    pub fn publish(&self, job_id: &str) {
        // No subscriber is fine: nobody is watching.
        let _ = self.events.send(job_id.to_owned());
    }
}

/// The configured master keys (`MEDRELAY_MASTER_KEY`), else the key file, generated with mode
/// 0600 when it does not exist (development only).
pub fn load_keyring(settings: &Settings) -> anyhow::Result<Keyring> {
    if let Some(inline) = &settings.master_key {
        return Keyring::parse(inline.expose()).context("reading MEDRELAY_MASTER_KEY");
    }
    let file = settings.master_key_file();
    if !file.exists() {
        keys::load_or_create(&file, 32, "master key")?;
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(&file)
            .with_context(|| format!("reading the master key file {}", file.display()))?,
    );
    Keyring::parse(&text).with_context(|| format!("reading the master key file {}", file.display()))
}

/// Jobs being processed by this instance, so that a delete can stop them.
#[derive(Clone, Default)]
pub struct RunningJobs(Arc<Mutex<HashMap<String, (String, CancellationToken)>>>);

impl RunningJobs {
    pub fn insert(&self, job_id: &str, user_id: &str, token: CancellationToken) {
        self.lock()
            .insert(job_id.to_owned(), (user_id.to_owned(), token));
    }

    pub fn remove(&self, job_id: &str) {
        self.lock().remove(job_id);
    }

    pub fn contains(&self, job_id: &str) -> bool {
        self.lock().contains_key(job_id)
    }

    /// Stops one job; returns whether it was running here.
    pub fn cancel(&self, job_id: &str) -> bool {
        match self.lock().get(job_id) {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops every job of one user (by opaque user prefix).
    pub fn cancel_owner(&self, user_prefix: &str) -> usize {
        let guard = self.lock();
        let mut n = 0;
        for (owner, token) in guard.values() {
            if owner == user_prefix {
                token.cancel();
                n += 1;
            }
        }
        n
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, CancellationToken)>> {
        // A poisoned map still holds valid tokens; keep going.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// On PostgreSQL, forwards `NOTIFY medrelay_jobs` (sent by a trigger on every job change, by
/// any instance) to this instance's event streams. SQLite serves one instance: nothing to do.
async fn relay_notifications(state: AppState, shutdown: CancellationToken) -> anyhow::Result<()> {
    let Db::Postgres(pool) = &state.db else {
        return Ok(());
    };
    loop {
        let listener = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(pool).await?;
            listener.listen("medrelay_jobs").await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            l = listener => l,
        };
        match &mut listener {
            Ok(listener) => loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    got = listener.recv() => match got {
                        Ok(note) => {
                            state.publish(note.payload());
                            stop_if_ended_elsewhere(&state, note.payload());
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "job notifications interrupted; reconnecting");
                            break;
                        }
                    },
                }
            },
            Err(e) => tracing::warn!(error = %e, "listening for job notifications failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// A job running here that another instance deleted, expired or purged is stopped at once,
/// not at its next heartbeat: its document must not reach a provider after the delete.
fn stop_if_ended_elsewhere(state: &AppState, job_id: &str) {
    if !state.running.contains(job_id) {
        return;
    }
    let state = state.clone();
    let job_id = job_id.to_owned();
    tokio::spawn(async move {
        if let Ok(Some(row)) = state.db.get_job_by_id(&job_id).await
            && (row.deleted_at.is_some() || row.status != "processing")
        {
            state.running.cancel(&job_id);
        }
    });
}

/// A started medrelay: its address and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight requests and jobs finish within the grace period, and
    /// returns when every role has stopped.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let mut first_error = None;
        while let Some(done) = self.tasks.join_next().await {
            let outcome = done.context("a role task failed").and_then(|r| r);
            if let Err(e) = outcome {
                tracing::error!(error = %format!("{e:#}"), "a role stopped with an error");
                first_error.get_or_insert(e);
            }
        }
        self.state.db.close().await;
        first_error.map_or(Ok(()), Err)
    }

    /// Waits until a role stops by itself (an error), or `stop` is called elsewhere.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        match self.tasks.join_next().await {
            Some(done) => done.context("a role task failed").and_then(|r| r),
            None => Ok(()),
        }
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Binds `settings.listen` and starts the configured roles.
pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    let listener = TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let state = AppState::new(settings).await?;
    start_with(state, listener).await
}

/// Starts the roles on an already built state and bound listener.
pub async fn start_with(state: AppState, listener: TcpListener) -> anyhow::Result<Running> {
    let addr = listener.local_addr().context("reading the bound address")?;
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let roles = state.settings.roles;
    if roles.api {
        let router = crate::http::router(state.clone());
        let token = shutdown.clone();
        tasks.spawn(async move {
            axum::serve(
                listener,
                router.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { token.cancelled().await })
            .await
            .context("serving HTTP")
        });
    }
    if roles.api && matches!(state.db, Db::Postgres(_)) {
        tasks.spawn(relay_notifications(state.clone(), shutdown.clone()));
    }
    if roles.worker {
        tasks.spawn(crate::worker::run(state.clone(), shutdown.clone()));
    }
    if roles.sweeper {
        tasks.spawn(crate::sweeper::run(state.clone(), shutdown.clone()));
    }
    tasks.spawn(crate::telemetry::upkeep(
        state.metrics.clone(),
        shutdown.clone(),
    ));
    Ok(Running {
        addr,
        state,
        shutdown,
        tasks,
    })
}
