-- The guard's duplicate check, step 3 of the protocol: which of these ids are
-- confirmed already, and with which payload hash.
--
-- A function, not a plain statement, for one reason: the guard runs its statements
-- with generic plans (planned once per connection, see DATABASE_GENERIC_PLANS), and a
-- generic plan made while the table's statistics say "empty" scans the whole namespace
-- (a hash join over a bitmap scan on the key prefix) and keeps doing so while the table
-- grows, until autovacuum analyzes it again. Measured: 0.1 ms with an index lookup
-- against 99 ms with the stale plan at 200k rows. Here the only plan the planner may
-- make is one primary-key lookup per id, whatever the statistics say: the subquery
-- is correlated and kept apart (LIMIT 1), and the settings below leave an index scan
-- as its only allowed access path.
CREATE OR REPLACE FUNCTION eo_confirmed(ns TEXT, ids TEXT[])
RETURNS TABLE (confirmed_id TEXT, confirmed_hash BYTEA)
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_hashjoin = off
SET enable_mergejoin = off
AS $$
BEGIN
    RETURN QUERY
        SELECT i.id, p.payload_hash
        FROM UNNEST(ids) AS i(id)
        CROSS JOIN LATERAL (
            SELECT e.payload_hash FROM processed_events e
            WHERE e.namespace = ns AND e.event_id = i.id
            LIMIT 1  -- keeps the subquery a per-id lookup (never flattened into a join)
        ) p;
END
$$;
