//! What the roles (API, worker, sweeper) share: the settings, the lifecycle (database, store,
//! keys, running attempts), the token checker and the processor. Built by `app`; imported by
//! every role, so it imports none of them.

use std::sync::Arc;

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::lifecycle::Lifecycle;
use crate::limits::Limits;
use crate::processor::Processor;
use crate::telemetry::Metrics;

/// Everything a request handler or a job needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub lifecycle: Lifecycle,
    pub limits: Limits,
    pub auth: Authenticator,
    pub processor: Arc<dyn Processor>,
    pub metrics: Metrics,
}

impl axum::extract::FromRef<AppState> for Authenticator {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}
