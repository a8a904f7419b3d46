-- A claim that costs the same at any backlog (issue #14). The claim reads only jobs waiting
-- for a worker, in run_at order, and stops at its LIMIT: this partial index holds exactly
-- those rows (its WHERE is the claim's, term for term, so both planners use it), so finished
-- jobs inside the TTL are never walked. Leases that ran out are found through the second
-- index by a periodic rescue, outside the claim.
CREATE INDEX jobs_waiting ON jobs (run_at) WHERE deleted_at IS NULL AND status IN ('queued', 'retry_scheduled');
CREATE INDEX jobs_leased ON jobs (lease_until) WHERE deleted_at IS NULL AND status = 'processing';
-- Replaced by the two above.
DROP INDEX jobs_due;
