-- A job's insert in one round trip (issue #14): the user's lock, the release of the upload's
-- own slot and the insert that checks the caps, in one call. The same three statements ran as
-- a transaction of five round trips (BEGIN, lock, release, insert, COMMIT).
--
-- Why a function: the caps' counts must see every job of the user committed before the lock
-- was granted. A single statement reads from a snapshot taken before it waits for the lock;
-- a VOLATILE function takes a fresh snapshot for each statement it runs, so the insert reads
-- after the lock. The insert's text is INSERT_JOB_ADMITTED of src/db/limits.rs, word for word
-- (a test compares them); its parameters are the same $1..$18, and $19 is the upload's own
-- slot (NULL when it held none).
--
-- A refusal raises MR001, which undoes the lock and the release; the caller then runs the
-- transaction of old, which reads the usage the refusal reports.
CREATE FUNCTION medrelay_insert_job(
    TEXT, TEXT, TEXT, TEXT, BIGINT, BIGINT, BIGINT, TEXT, BIGINT, TEXT, BYTEA, BIGINT,
    BIGINT, BIGINT, BIGINT, BYTEA, TEXT, BYTEA, TEXT
) RETURNS SETOF jobs LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    INSERT INTO user_limits (user_prefix) VALUES ($3)
        ON CONFLICT (user_prefix) DO UPDATE SET user_prefix = excluded.user_prefix;
    IF $19 IS NOT NULL THEN
        DELETE FROM user_slots WHERE id = $19;
    END IF;
    RETURN QUERY
    INSERT INTO jobs (id, user_id, user_prefix, status, media_type, size_bytes, attempts,
        max_attempts, run_at, idempotency_key, created_at, updated_at, expires_at, document_kek,
        document_dek, push_token, push_kek, push_dek)
    SELECT $1, $2, $3, 'queued', $4, $5, 0, $6, $7, $8, $12, $7, $9, $10, $11, $16, $17, $18
    WHERE (SELECT count(*) FROM jobs WHERE user_prefix = $3 AND deleted_at IS NULL
        AND status IN ('queued', 'processing', 'retry_scheduled'))
        + (SELECT count(*) FROM user_slots WHERE user_prefix = $3 AND kind = 'upload'
        AND expires_at > $7) < $13
    AND (SELECT count(*) FROM jobs WHERE user_prefix = $3 AND created_at > $14)
        + (SELECT count(*) FROM user_slots WHERE user_prefix = $3 AND kind = 'upload'
        AND expires_at > $7) < $15
    RETURNING *;
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'MR001', MESSAGE = 'medrelay: over a cap';
    END IF;
END
$fn$;
