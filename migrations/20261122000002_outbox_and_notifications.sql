-- Transactional outbox: messages a handler publishes are written here in the same
-- transaction as its confirm, and sent to Kafka by the relay afterwards (seed 004's
-- "publish unique events onward", seed 002's "queue durably while Kafka is down").
CREATE TABLE IF NOT EXISTS outbox (
    id              BIGSERIAL   PRIMARY KEY,
    namespace       TEXT        NOT NULL,
    event_id        TEXT        NOT NULL,
    topic           TEXT        NOT NULL,
    message_key     BYTEA,
    payload         BYTEA       NOT NULL,
    -- Stable across re-handling (`<event id>:<n>`), so downstream consumers deduplicate
    -- a message the relay had to send twice.
    idempotency_key TEXT        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at    TIMESTAMPTZ,
    attempts        INTEGER     NOT NULL DEFAULT 0,
    last_error      TEXT
);
CREATE INDEX IF NOT EXISTS outbox_pending_idx ON outbox (id) WHERE published_at IS NULL;

-- notifications (functions/notifications): one row per notification request. The
-- unique event_id is a second fence behind processed_events.
CREATE TABLE IF NOT EXISTS notifications (
    id         BIGSERIAL   PRIMARY KEY,
    event_id   TEXT        NOT NULL UNIQUE,
    user_id    TEXT        NOT NULL,
    channel    TEXT        NOT NULL CHECK (channel IN ('email', 'push', 'sms')),
    title      TEXT        NOT NULL,
    body       TEXT        NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A replayed dead letter may be dead-lettered again: only one open entry per event.
ALTER TABLE dead_letters DROP CONSTRAINT IF EXISTS dead_letters_namespace_event_id_key;
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_open_idx ON dead_letters (namespace, event_id) WHERE replayed_at IS NULL;
