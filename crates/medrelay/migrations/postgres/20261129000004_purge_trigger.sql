-- Unmanaged failures: a job marked here makes the database itself enqueue a purge of
-- everything of that user (trigger below). The purge table is also the PHI-free audit log:
-- the opaque user prefix, the reason, counts and times; never a user id or content.
ALTER TABLE jobs ADD COLUMN unmanaged_at BIGINT;

CREATE TABLE purges (
    id               BIGSERIAL PRIMARY KEY,
    user_prefix      TEXT NOT NULL,
    reason           TEXT NOT NULL,
    job_id           TEXT,
    requested_at     BIGINT NOT NULL,
    started_at       BIGINT,
    completed_at     BIGINT,
    jobs_purged      BIGINT,
    objects_deleted  BIGINT
);
CREATE INDEX purges_pending ON purges (completed_at, id);

CREATE FUNCTION medrelay_enqueue_purge() RETURNS trigger AS $$
BEGIN
    INSERT INTO purges (user_prefix, reason, job_id, requested_at)
    VALUES (NEW.user_prefix, 'unmanaged-failure', NEW.id, NEW.unmanaged_at);
    PERFORM pg_notify('medrelay_purges', '');
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_unmanaged_purge AFTER UPDATE OF unmanaged_at ON jobs
    FOR EACH ROW WHEN (OLD.unmanaged_at IS NULL AND NEW.unmanaged_at IS NOT NULL)
    EXECUTE FUNCTION medrelay_enqueue_purge();
