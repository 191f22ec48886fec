-- Event ids gained a format (v2): each id is tagged by the kind that derived it (`h:`
-- header, `f:` payload field, `c:` composite with escaped fields, `p:` position,
-- `sha256:` content hash), because untagged (v1) ids of different kinds could be equal
-- and one event could be skipped as another's duplicate.
--
-- v2_known marks rows whose event is also known to the ledger by its v2 id: rows
-- confirmed under v2, and both rows a process in the transition (`v1+v2`) confirms for
-- one event. Rows written before this migration, and rows a process of an earlier
-- version (or one set to `v1`) confirms afterwards, take the default: false. While a
-- function has such rows, `EVENT_ID_FORMAT=auto` keeps its processes in the transition,
-- where an event is a duplicate under either id; once retention has removed the last of
-- them (and no process writes new ones), they move to v2 alone.
ALTER TABLE processed_events ADD COLUMN IF NOT EXISTS v2_known BOOLEAN NOT NULL DEFAULT false;
-- (A new column with a constant default is a catalogue change: no rewrite.)

-- "Does this function still have v1-only rows?" is asked every few minutes by each
-- process in `EVENT_ID_FORMAT=auto`: a small partial index answers it without scanning
-- the ledger, and it empties as those rows age out.
--
-- Built in the migration's transaction: it holds off confirms for the length of one scan
-- of processed_events (instant on a small ledger). It is not built CONCURRENTLY because
-- that waits for every older snapshot in the database, including a second process
-- waiting for the migration lock, which deadlocks. On a large ledger, build both
-- beforehand, and this migration skips them:
--   ALTER TABLE processed_events ADD COLUMN IF NOT EXISTS v2_known BOOLEAN NOT NULL DEFAULT false;
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS processed_events_v1_only_idx
--       ON processed_events (namespace) WHERE NOT v2_known;
CREATE INDEX IF NOT EXISTS processed_events_v1_only_idx ON processed_events (namespace) WHERE NOT v2_known;
