-- The guard's ledger. A row here is the truth that an event took effect (or was
-- dead-lettered); the primary key (namespace, event_id) is the fence that makes a
-- second confirm of the same event insert nothing.
CREATE TABLE IF NOT EXISTS processed_events (
    namespace       TEXT        NOT NULL,
    event_id        TEXT        NOT NULL,
    status          TEXT        NOT NULL CHECK (status IN ('processed', 'dead_lettered')),
    -- SHA-256 of the record value, to flag a duplicate id carrying a different payload.
    payload_hash    BYTEA,
    processed_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    topic           TEXT,
    kafka_partition INTEGER,
    kafka_offset    BIGINT,
    -- Attempts it took, the successful one included.
    attempts        INTEGER     NOT NULL DEFAULT 1,
    metadata        JSONB,
    PRIMARY KEY (namespace, event_id)
);

-- Retention cleanup deletes by age in bounded batches.
CREATE INDEX IF NOT EXISTS processed_events_processed_at_idx ON processed_events (processed_at);

-- Failed attempts of events not yet confirmed. Kept apart from processed_events so
-- that a failure never occupies the confirm fence.
CREATE TABLE IF NOT EXISTS event_attempts (
    namespace       TEXT        NOT NULL,
    event_id        TEXT        NOT NULL,
    attempts        INTEGER     NOT NULL,
    last_error      TEXT        NOT NULL,
    first_failed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_failed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (namespace, event_id)
);

-- Events that could not be handled: everything needed to replay them.
CREATE TABLE IF NOT EXISTS dead_letters (
    id              BIGSERIAL   PRIMARY KEY,
    namespace       TEXT        NOT NULL,
    event_id        TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    kafka_partition INTEGER     NOT NULL,
    kafka_offset    BIGINT      NOT NULL,
    record_key      BYTEA,
    record_value    BYTEA,
    -- [{"name": "...", "value_b64": "..." | null}, ...]
    headers         JSONB       NOT NULL DEFAULT '[]',
    reason          TEXT        NOT NULL,
    error           TEXT        NOT NULL,
    attempts        INTEGER     NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    replayed_at     TIMESTAMPTZ,
    UNIQUE (namespace, event_id)
);
CREATE INDEX IF NOT EXISTS dead_letters_created_at_idx ON dead_letters (created_at);
