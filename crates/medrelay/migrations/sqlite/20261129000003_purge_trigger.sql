-- Unmanaged failures: a job marked here makes the database itself enqueue a purge of
-- everything of that user (trigger below). The purge table is also the PHI-free audit log:
-- the opaque user prefix, the reason, counts and times; never a user id or content.
ALTER TABLE jobs ADD COLUMN unmanaged_at INTEGER;

CREATE TABLE purges (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    user_prefix      TEXT NOT NULL,
    reason           TEXT NOT NULL,
    job_id           TEXT,
    requested_at     INTEGER NOT NULL,
    started_at       INTEGER,
    completed_at     INTEGER,
    jobs_purged      INTEGER,
    objects_deleted  INTEGER
);
CREATE INDEX purges_pending ON purges (completed_at, id);

CREATE TRIGGER jobs_unmanaged_purge AFTER UPDATE OF unmanaged_at ON jobs
WHEN OLD.unmanaged_at IS NULL AND NEW.unmanaged_at IS NOT NULL
BEGIN
    INSERT INTO purges (user_prefix, reason, job_id, requested_at)
    VALUES (NEW.user_prefix, 'unmanaged-failure', NEW.id, NEW.unmanaged_at);
END;
