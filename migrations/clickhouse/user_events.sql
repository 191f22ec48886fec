-- user-events: one row per user event. Repeats of an event (same event_id) collapse:
-- ReplacingMergeTree keeps one row per ORDER BY key (the event id), the highest
-- `version` winning; queries read with FINAL for exact counts before merges run.
CREATE TABLE IF NOT EXISTS user_events (
    event_id        String,
    user_id         String,
    kind            Enum8('created' = 1, 'updated' = 2, 'deleted' = 3),
    email           Nullable(String),
    name            Nullable(String),
    occurred_at     DateTime,
    topic           String,
    kafka_partition Int32,
    kafka_offset    Int64,
    version         UInt64
) ENGINE = ReplacingMergeTree(version)
ORDER BY event_id
