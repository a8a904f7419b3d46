//! Identifiers that say what they are: a job, a user, a user's opaque prefix, a lease.
//!
//! Owns the rule that these never mix: a function that takes a [`UserId`] cannot be handed a
//! [`UserPrefix`]. A [`UserId`] is the token's `sub` and may be an e-mail address, so it has
//! no `Display` and its `Debug` prints nothing; the others are opaque and may be logged.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Declares a text newtype stored as TEXT in both databases.
macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, sqlx::Type)]
        #[sqlx(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a value read from outside (a path, a header, a test).
            pub fn from_raw(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

text_id!(
    /// A job's id (a UUIDv7: time-ordered, opaque). Also the id of its upload. In the wire
    /// format and in paths, it is a plain string.
    JobId
);

impl Serialize for JobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(JobId)
    }
}
text_id!(
    /// The authenticated caller: the token's `sub`. Never logged, never in an object key.
    UserId
);
text_id!(
    /// The opaque per-user prefix of object keys: HMAC of the user id, in hex. What tombstones,
    /// purges and logs keep instead of the user id.
    UserPrefix
);
text_id!(
    /// The token of one claim of a job; every write of the claimer is a compare-and-set on it.
    LeaseToken
);

impl JobId {
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl LeaseToken {
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }
}

impl Default for LeaseToken {
    fn default() -> Self {
        Self::new()
    }
}

macro_rules! printable {
    ($($name:ident),*) => {$(
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    )*};
}

printable!(JobId, UserPrefix, LeaseToken);

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UserId([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_id_never_prints_but_opaque_ids_do() {
        let user = UserId::from_raw("alice@example.org");
        assert_eq!(format!("{user:?}"), "UserId([redacted])");
        let job = JobId::new();
        assert_eq!(format!("{job}"), job.as_str());
        assert_eq!(job.as_str().len(), 36);
        assert_ne!(LeaseToken::new(), LeaseToken::new());
        let json = serde_json::to_string(&job).unwrap();
        assert_eq!(json, format!("\"{job}\""));
    }
}
