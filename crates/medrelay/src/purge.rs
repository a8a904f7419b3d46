//! The purge of one user's data after an unmanaged failure. The database queues it: a trigger
//! on `jobs.unmanaged_at` inserts into `purges` (both migrations), so no code path can mark an
//! unmanaged failure and forget the purge. Workers and sweepers carry the queue out through
//! `lifecycle`, which destroys every data key of the user in one commit first, so everything
//! is unreadable at once, and only then deletes the objects. The `purges` rows are the
//! PHI-free audit log (opaque user prefix, reason, counts, times).

use crate::lifecycle::{self, Lifecycle};

/// Carries out every pending purge. Returns how many it completed.
pub async fn run_pending(lifecycle: &Lifecycle) -> Result<usize, lifecycle::Error> {
    lifecycle.run_pending_purges().await
}
