-- One index by user id instead of two (issue #14): every insert and every non-HOT update
-- writes each of jobs' indexes. jobs_idempotency (user_id, idempotency_key) already leads
-- with user_id, so the caller's list and a user's deletion read it; the list then sorts the
-- user's live jobs, which the per-user caps bound (at most the uploads of an hour).
DROP INDEX jobs_by_user;
