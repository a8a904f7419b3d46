//! The clock: every time medrelay stores or compares (leases, retries, expiry, tombstones) is
//! unix milliseconds read here, so that one place decides what "now" is. On PostgreSQL that
//! is the database's clock (the own clock corrected by an offset measured against it every few
//! seconds), so that a skewed instance steals no lease and deletes nothing early.
//!
//! Owns the conversions between unix milliseconds, `Duration` and RFC 3339 times. Nothing
//! else reads the wall clock (`clippy.toml` forbids it); monotonic `Instant`s for deadlines
//! and timeouts are fine anywhere.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;

/// Milliseconds this process's own clock is shifted by (`MEDRELAY_CLOCK_SKEW_MS`, for tests
/// that play an instance with a wrong clock).
static SKEW_MS: AtomicI64 = AtomicI64::new(0);
/// Milliseconds added to the own clock to read the shared one (the database's, on
/// PostgreSQL); 0 when this process is its own reference (SQLite).
static CORRECTION_MS: AtomicI64 = AtomicI64::new(0);

/// Now, in unix milliseconds, on the clock every instance shares: this process's clock
/// corrected to the database's on PostgreSQL, so that leases, retries and expiry mean the
/// same on every instance whatever its own clock says.
pub fn now_millis() -> i64 {
    own_millis() + CORRECTION_MS.load(Ordering::Relaxed)
}

/// This process's own clock (skew included), uncorrected.
#[allow(clippy::disallowed_methods)] // the one sanctioned read of the wall clock
pub fn own_millis() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
        + SKEW_MS.load(Ordering::Relaxed)
}

/// Shifts this process's own clock (tests of skewed instances).
pub fn set_skew(ms: i64) {
    SKEW_MS.store(ms, Ordering::Relaxed);
}

/// Takes `reference` (unix ms, read between the own-clock readings `before` and `after`) as
/// the shared clock. Returns the correction now applied.
pub fn align_to(reference: i64, before: i64, after: i64) -> i64 {
    let correction = reference - (before + (after - before) / 2);
    CORRECTION_MS.store(correction, Ordering::Relaxed);
    correction
}

/// Now, as a time of day (for the wire format).
pub fn now() -> OffsetDateTime {
    from_millis(now_millis())
}

/// Now, in unix seconds (token claims).
pub fn now_secs() -> u64 {
    (now_millis() / 1000).max(0) as u64
}

/// A stored time, for the wire format.
pub fn from_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// A duration in milliseconds, saturating.
pub fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_trip_and_saturate() {
        let now = now_millis();
        assert_eq!(
            (from_millis(now).unix_timestamp_nanos() / 1_000_000) as i64,
            now
        );
        assert_eq!(millis(Duration::from_secs(2)), 2000);
        assert_eq!(millis(Duration::MAX), i64::MAX);
        assert!(now_secs() > 1_700_000_000);
    }

    #[test]
    fn the_correction_centres_the_reference_between_its_readings() {
        assert_eq!(align_to(10_500, 1_000, 1_200), 9_400);
        assert_eq!(align_to(0, 0, 0), 0);
    }
}
