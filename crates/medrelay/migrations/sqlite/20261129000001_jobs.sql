-- Jobs: one row per uploaded document. Times are unix milliseconds, bound from Rust.
-- Columns hold ids and states only; the result column holds the extraction result.
CREATE TABLE jobs (
    id               TEXT PRIMARY KEY NOT NULL,
    user_id          TEXT NOT NULL,
    user_prefix      TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('queued', 'processing', 'retry_scheduled', 'succeeded', 'failed')),
    media_type       TEXT NOT NULL,
    size_bytes       INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    run_at           INTEGER NOT NULL,
    next_attempt_at  INTEGER,
    lease_token      TEXT,
    lease_until      INTEGER,
    result           BLOB,
    error_code       TEXT,
    error_message    TEXT,
    error_retryable  BOOLEAN,
    idempotency_key  TEXT,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    deleted_at       INTEGER,
    deleted_reason   TEXT
);

CREATE UNIQUE INDEX jobs_idempotency ON jobs (user_id, idempotency_key);
CREATE INDEX jobs_due ON jobs (status, run_at) WHERE deleted_at IS NULL;
CREATE INDEX jobs_by_user ON jobs (user_id, created_at);
CREATE INDEX jobs_expiry ON jobs (expires_at);
