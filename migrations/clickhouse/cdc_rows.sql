-- cdc: the latest image of every source row. One row per (source_table, pk); among
-- versions of a row, the highest source LSN wins, so a replayed or duplicated change
-- never doubles a row and an old change arriving late never overwrites a newer one.
-- Deletes are kept as tombstones (is_deleted = 1); read with FINAL.
CREATE TABLE IF NOT EXISTS cdc_rows (
    source_table String,
    pk           String,
    op           Enum8('c' = 1, 'u' = 2, 'd' = 3, 'r' = 4),
    data         String,
    is_deleted   UInt8,
    lsn          UInt64,
    changed_at   DateTime,
    event_id     String
) ENGINE = ReplacingMergeTree(lsn)
ORDER BY (source_table, pk)
