-- Fair use (per-user limits). Rows hold the user's opaque prefix and times only.
--
-- A slot is an upload in flight or an open event stream. It is taken by one conditional
-- INSERT while the user's limits row is locked, released when the upload or stream ends, and
-- lapses by itself at expires_at (a crashed instance leaks nothing): an upload's slot at its
-- deadline, a stream's unless its instance renews it.
CREATE TABLE user_slots (
    id           TEXT PRIMARY KEY NOT NULL,
    user_prefix  TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('upload', 'stream')),
    expires_at   BIGINT NOT NULL
);
CREATE INDEX user_slots_by_user ON user_slots (user_prefix, kind, expires_at);

-- One row per provider call, for the spend guard's rolling day; dropped after a day.
CREATE TABLE provider_calls (
    user_prefix  TEXT NOT NULL,
    called_at    BIGINT NOT NULL
);
CREATE INDEX provider_calls_by_user ON provider_calls (user_prefix, called_at);

-- One row per user who was limited, locked (FOR UPDATE on PostgreSQL) while a limit is
-- checked and taken, so that instances sharing the database never both take the last slot.
CREATE TABLE user_limits (
    user_prefix  TEXT PRIMARY KEY NOT NULL
);

-- The per-user counts read the jobs table by prefix (tombstones keep the prefix only): active
-- jobs, and uploads accepted within the rolling hour.
CREATE INDEX jobs_by_user_prefix ON jobs (user_prefix, created_at);
