-- How many attempts of a job ended with a lost lease (the worker died without a word). A job
-- that lost its lease twice is a poison pill: it is not handed to a third worker but ends as
-- an unmanaged failure, which purges its user (the trigger on unmanaged_at).
ALTER TABLE jobs ADD COLUMN lost_leases INTEGER NOT NULL DEFAULT 0;
