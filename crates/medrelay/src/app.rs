//! The composition root: builds the application from settings and a listener, and runs its
//! roles (API, worker, sweeper) until one cancellation token stops them all.
//!
//! Owns start-up order and shutdown; it must never start serving before the database is
//! migrated and the store is open. Imported by nobody but the binary (and tests).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::db::Db;
use crate::lifecycle::{Lifecycle, Rules};
use crate::limits::Limits;
use crate::state::AppState;
use crate::store::Store;
use crate::telemetry::Metrics;

/// Opens the database, the store and the keys that `settings` name.
pub async fn build_state(settings: Settings) -> anyhow::Result<AppState> {
    crate::clock::set_skew(settings.clock_skew_ms);
    let db = Db::connect(&settings.database_url())
        .await
        .context("opening the job database")?;
    // Every time this instance stores or compares is on the database's clock from here on.
    db.align_clock()
        .await
        .context("reading the database's clock")?;
    let store = Store::open(&settings.storage_url()).context("opening the object store")?;
    let keyring = crate::keys::load_keyring(&settings).context("loading the master keys")?;
    let auth = Authenticator::new(&settings).context("loading token keys")?;
    let processor = crate::processor::configured(&settings)?;
    let limits = Limits::new(db.clone(), &settings);
    let push = crate::push::Fcm::from_settings(&settings)?;
    if push.is_none() {
        tracing::info!(
            "push notifications are off (MEDRELAY_FCM_CREDENTIALS_FILE is not set): an upload's \
             Push-Token is not kept"
        );
    }
    let rules = Rules::from_settings(&settings);
    let lifecycle = Lifecycle::new(db, store, keyring, rules, push)?;
    Ok(AppState {
        settings: Arc::new(settings),
        lifecycle,
        limits,
        auth,
        processor,
        metrics: Metrics::global(),
    })
}

/// A started medrelay: its address and the handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    /// Where the operations routes are served when `MEDRELAY_ADMIN_LISTEN` is set.
    pub admin_addr: Option<SocketAddr>,
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
        self.state.lifecycle.db().close().await;
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
    let state = build_state(settings).await?;
    start_with(state, listener).await
}

/// Starts the roles on an already built state and bound listener.
pub async fn start_with(state: AppState, listener: TcpListener) -> anyhow::Result<Running> {
    let addr = listener.local_addr().context("reading the bound address")?;
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let roles = state.settings.roles;
    // With MEDRELAY_ADMIN_LISTEN, the operations routes are served there, by every role.
    let admin_addr = match &state.settings.admin_listen {
        Some(admin) => {
            let admin_listener = TcpListener::bind(admin)
                .await
                .with_context(|| format!("binding MEDRELAY_ADMIN_LISTEN {admin}"))?;
            let admin_addr = admin_listener
                .local_addr()
                .context("reading the bound admin address")?;
            serve(
                &mut tasks,
                admin_listener,
                crate::http::admin_router(state.clone()),
                shutdown.clone(),
            );
            Some(admin_addr)
        }
        None => None,
    };
    if roles.api {
        serve(
            &mut tasks,
            listener,
            crate::http::router(state.clone()),
            shutdown.clone(),
        );
    }
    if (roles.api || roles.worker) && state.lifecycle.db().has_notifications() {
        // On PostgreSQL, changes made by other instances reach this instance: its event
        // streams, and its running attempts (a job deleted or purged elsewhere stops here at
        // once, before its document reaches a provider).
        tasks.spawn(crate::lifecycle::relay_notifications(
            state.lifecycle.clone(),
            shutdown.clone(),
        ));
    }
    if roles.worker {
        tasks.spawn(crate::worker::run(state.clone(), shutdown.clone()));
    }
    if roles.sweeper {
        tasks.spawn(crate::sweeper::run(state.clone(), shutdown.clone()));
    }
    if state.lifecycle.db().has_notifications() {
        // The claims and successes of this instance, which the database's trigger leaves to it.
        tasks.spawn(crate::lifecycle::announce_changes(
            state.lifecycle.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(keep_clock_aligned(
            state.lifecycle.db().clone(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(crate::telemetry::upkeep(
        state.metrics.clone(),
        shutdown.clone(),
    ));
    Ok(Running {
        addr,
        admin_addr,
        state,
        shutdown,
        tasks,
    })
}

/// Serves `router` on `listener` until `shutdown`.
fn serve(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
) {
    tasks.spawn(async move {
        axum::serve(
            no_delay(listener),
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .context("serving HTTP")
    });
}

/// `listener`, its accepted connections with `TCP_NODELAY`: an answer leaves at once instead of
/// waiting for the client's delayed ACK of the previous small write (Nagle's algorithm; an
/// event stream's head and first event are two small writes, 40 ms apart without this).
fn no_delay(listener: TcpListener) -> axum::serve::TapIo<TcpListener, fn(&mut TcpStream)> {
    use axum::serve::ListenerExt;
    fn set(tcp: &mut TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY could not be set on a connection");
        }
    }
    listener.tap_io(set)
}

/// How often the clock is aligned with the database's again (own clocks drift, and NTP steps).
const CLOCK_ALIGN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Keeps this process's clock aligned with the database's until `shutdown`.
async fn keep_clock_aligned(db: Db, shutdown: CancellationToken) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(CLOCK_ALIGN_EVERY) => {}
        }
        match db.align_clock().await {
            Ok(correction) => {
                metrics::gauge!("medrelay_clock_correction_seconds").set(correction as f64 / 1000.0)
            }
            Err(e) => tracing::warn!(error = %e, "aligning the clock with the database failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::serve::Listener;

    use super::*;

    #[tokio::test]
    async fn accepted_connections_have_no_delay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = no_delay(listener);
        let client = tokio::net::TcpStream::connect(addr);
        let ((accepted, _), client) = tokio::join!(listener.accept(), client);
        let client = client.unwrap();
        assert!(!client.nodelay().unwrap(), "a plain socket has Nagle on");
        assert!(accepted.nodelay().unwrap());
    }
}
