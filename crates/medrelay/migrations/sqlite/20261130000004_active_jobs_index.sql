-- The job insert counts the user's active jobs (issue #14): this index holds exactly those
-- rows (its WHERE is the count's, term for term), so the count reads the user's active jobs
-- and not their whole history inside the TTL.
CREATE INDEX jobs_active_by_user ON jobs (user_prefix) WHERE deleted_at IS NULL AND status IN ('queued', 'processing', 'retry_scheduled');
