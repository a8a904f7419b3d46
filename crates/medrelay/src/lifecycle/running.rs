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

    /// Stops one job; returns whether it was running here.
    pub fn cancel(&self, id: &JobId) -> bool {
        match self.0.lock().get(id) {
            Some((_, token)) => {
                token.cancel();
                true
            }
            None => false,
        }
    }

    /// Stops every job of one user.
    pub fn cancel_owner(&self, owner: &UserPrefix) -> usize {
        let guard = self.0.lock();
        let mut n = 0;
        for (prefix, token) in guard.values() {
            if prefix == owner {
                token.cancel();
                n += 1;
            }
        }
        n
    }

    pub fn len(&self) -> usize {
        self.0.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
