//! The attempts running in this process, so that ending a job (a delete, expiry, a purge, a
//! change seen from another instance) stops its attempt at once, not at its next heartbeat.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::ids::{JobId, UserPrefix};

/// Jobs being processed by this instance, with their owner's prefix. Cheap to clone.
#[derive(Clone, Default)]
pub struct RunningJobs(Arc<Mutex<HashMap<JobId, (UserPrefix, CancellationToken)>>>);

impl RunningJobs {
    pub fn insert(&self, id: &JobId, owner: &UserPrefix, token: CancellationToken) {
        self.0.lock().insert(id.clone(), (owner.clone(), token));
    }

    pub fn remove(&self, id: &JobId) {
        self.0.lock().remove(id);
    }

    pub fn contains(&self, id: &JobId) -> bool {
        self.0.lock().contains_key(id)
    }

    /// Stops one job, if it runs here.
    pub fn cancel(&self, id: &JobId) {
        if let Some((_, token)) = self.0.lock().get(id) {
            token.cancel();
        }
    }

    /// Stops every job of one user that runs here.
    pub fn cancel_owner(&self, owner: &UserPrefix) {
        for (prefix, token) in self.0.lock().values() {
            if prefix == owner {
                token.cancel();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
