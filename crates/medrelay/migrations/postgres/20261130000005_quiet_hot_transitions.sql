-- A NOTIFY serialises every commit that carries one on PostgreSQL's notification queue (the
-- queue's lock is held through the commit's WAL flush), so the trigger below cost the queue two
-- thirds of its throughput: three notifying commits per job (issue #14, docs/benchmarks.md).
-- Now:
-- - an insert notifies nobody: no event stream can follow a job before its 202 is answered;
-- - a claim and a success are announced by the instance that made them, batched with its other
--   announcements in one NOTIFY after the commit (lifecycle `announce`), not by this trigger;
-- - every other change (deletions, expiry, purges, retries, failures, rescued leases, by any
--   instance or by `medrelay purge-user`) is still announced here, by the database itself.
DROP TRIGGER jobs_notify ON jobs;

CREATE TRIGGER jobs_notify AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (NOT (
        (OLD.status IN ('queued', 'retry_scheduled') AND NEW.status = 'processing'
            AND NEW.deleted_at IS NULL)
        OR (OLD.status = 'processing' AND NEW.status = 'succeeded' AND NEW.deleted_at IS NULL)
    ))
    EXECUTE FUNCTION medrelay_notify_job();
