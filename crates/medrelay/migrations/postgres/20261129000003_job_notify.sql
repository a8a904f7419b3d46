-- Every change of a job wakes the event streams of every instance (LISTEN medrelay_jobs).
-- The payload is the job id only: no state, no user, no content.
CREATE FUNCTION medrelay_notify_job() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('medrelay_jobs', NEW.id);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER jobs_notify AFTER INSERT OR UPDATE ON jobs
    FOR EACH ROW EXECUTE FUNCTION medrelay_notify_job();
