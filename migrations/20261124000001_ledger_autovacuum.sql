-- processed_events churns like a queue: every row is inserted once and deleted by
-- retention once its window passes, so at a steady rate the table holds about
-- rate x retention live rows and gains that many dead ones per window. Postgres's
-- defaults vacuum a table once a fifth of it is dead and throttle that vacuum to a
-- crawl; on a large ledger the deleted rows' space comes back late, the table and its
-- indexes grow past memory, and lookups slow down.
--
-- Here vacuum starts after 50,000 changed rows plus 2% of the table (instead of 50
-- plus 20%), runs ten times faster than the default throttle, and ANALYZE keeps the
-- statistics current as the table fills. Inserts count too, so new rows get their
-- visibility map bits (cheaper lookups) without waiting for a delete pass.
--
-- These are storage parameters: the autovacuum daemon still has to be on for the
-- server (it is by default and on RDS); they cannot turn it on for one table.
-- ALTER TABLE ... SET takes a SHARE UPDATE EXCLUSIVE lock, which does not block
-- reads, confirms or retention's deletes while this runs.
ALTER TABLE processed_events SET (
    autovacuum_vacuum_threshold = 50000,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_threshold = 50000,
    autovacuum_vacuum_insert_scale_factor = 0.02,
    autovacuum_analyze_threshold = 50000,
    autovacuum_analyze_scale_factor = 0.02,
    autovacuum_vacuum_cost_limit = 2000
);
