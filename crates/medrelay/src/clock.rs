//! The clock: every time medrelay stores or compares (leases, retries, expiry, tombstones) is
//! unix milliseconds read here, so that one place decides what "now" is.
//!
//! Owns the conversions between unix milliseconds, `Duration` and RFC 3339 times. Nothing
//! else reads the wall clock (`clippy.toml` forbids it); monotonic `Instant`s for deadlines
//! and timeouts are fine anywhere.

use std::time::Duration;

use time::OffsetDateTime;

/// Now, in unix milliseconds.
#[allow(clippy::disallowed_methods)] // the one sanctioned read of the wall clock
pub fn now_millis() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
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
}
