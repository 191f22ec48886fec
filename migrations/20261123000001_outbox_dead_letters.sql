-- Outbox messages Kafka refuses on their own merits (too large, a topic that does not
-- exist or that we may not write to, a record the broker finds invalid) fail the same
-- way on every attempt. They are counted here, apart from attempts that failed because
-- Kafka was unavailable (which must never set a message aside), and after
-- OUTBOX_MAX_ATTEMPTS refusals the message is dead-lettered in place: it keeps its
-- payload and idempotency key, leaves the queue the relay reads, and waits for an
-- operator (`eo outbox list`, `eo outbox replay`, which clears dead_lettered_at).
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS rejections INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS dead_lettered_at TIMESTAMPTZ;
-- The refusal's class (`message_too_large`, `unknown_topic`, `invalid_topic`,
-- `not_authorised`, `invalid_record`); last_error keeps the broker's words.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS dead_letter_reason TEXT;

-- The relay's queue: neither published nor dead-lettered.
DROP INDEX IF EXISTS outbox_pending_idx;
CREATE INDEX IF NOT EXISTS outbox_queued_idx ON outbox (id) WHERE published_at IS NULL AND dead_lettered_at IS NULL;
-- Operators list dead letters; few, so a small partial index.
CREATE INDEX IF NOT EXISTS outbox_dead_lettered_idx ON outbox (id) WHERE dead_lettered_at IS NOT NULL;
-- The cleanup deletes published messages by age, in bounded batches.
CREATE INDEX IF NOT EXISTS outbox_published_at_idx ON outbox (published_at) WHERE published_at IS NOT NULL;
