-- Resumable uploads (tus 1.0, issue #15). One row per unfinished upload; its id is the id of the
-- job it becomes. No plaintext and no file name: the upload's bytes are sealed in parts in the
-- object store under a data key of their own (wrapped here, like a document's), the row holds
-- the offset (so that any instance resumes it, after any restart), the names of the parts,
-- the type decided from the first bytes, and the device's push token, sealed. The row goes
-- when the job is committed, when the upload is terminated, expires or its user's data is
-- deleted or purged: nothing of it outlives created_at + the TTL.
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    user_prefix TEXT NOT NULL,
    length BIGINT NOT NULL,
    upload_offset BIGINT NOT NULL DEFAULT 0,
    -- The sealed parts holding bytes 0..upload_offset, in order: space-separated names.
    parts TEXT NOT NULL DEFAULT '',
    part_count BIGINT NOT NULL DEFAULT 0,
    media_type TEXT,
    part_kek TEXT NOT NULL,
    part_dek BLOB NOT NULL,
    push_token BLOB,
    push_kek TEXT,
    push_dek BLOB,
    -- While one request turns the upload into its job (a crash lets it lapse).
    completing_until BIGINT,
    completing_token TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX uploads_user_prefix ON uploads (user_prefix);
CREATE INDEX uploads_expires_at ON uploads (expires_at);
