-- Taking a finished job's push token (issue #15) changes nothing an event stream shows: it
-- notifies nobody, so a job with a token does not bring back a notifying commit of its own
-- (issue #14). The take alone leaves status, updated_at and deleted_at as they were; every
-- other change is announced as before (20261130000005_quiet_hot_transitions).
DROP TRIGGER jobs_notify ON jobs;

CREATE TRIGGER jobs_notify AFTER UPDATE ON jobs
    FOR EACH ROW
    WHEN (NOT (
        (OLD.status IN ('queued', 'retry_scheduled') AND NEW.status = 'processing'
            AND NEW.deleted_at IS NULL)
        OR (OLD.status = 'processing' AND NEW.status = 'succeeded' AND NEW.deleted_at IS NULL)
        OR (OLD.status = NEW.status AND OLD.updated_at = NEW.updated_at
            AND OLD.deleted_at IS NOT DISTINCT FROM NEW.deleted_at
            AND OLD.push_token IS NOT NULL AND NEW.push_token IS NULL)
    ))
    EXECUTE FUNCTION medrelay_notify_job();
