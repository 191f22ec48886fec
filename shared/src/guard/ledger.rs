//! Postgres: the durable ledger of confirmed events, failed attempts and dead letters.
//!
//! Every statement takes the whole batch as arrays (`UNNEST`), so each is one round
//! trip whatever the batch size. The confirm insert sorts by event id so concurrent
//! batches take row locks in the same order and cannot deadlock each other.

use std::collections::HashMap;

use base64::Engine;
use sqlx::{PgConnection, PgPool};

use crate::event::{Event, PayloadHash};
use crate::event_id::{EventId, Namespace};

/// Step 3: which of `ids` are confirmed already (processed or dead-lettered), with the
/// payload hash each was confirmed with. One primary-key lookup per id; failure counts
/// are not needed here (the confirm and the attempt counter read them themselves).
pub async fn lookup(
    conn: &mut PgConnection,
    ns: &Namespace,
    ids: &[&EventId],
) -> Result<HashMap<String, Option<PayloadHash>>, sqlx::Error> {
    let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
    // A function rather than the join itself: it pins the plan to primary-key lookups
    // whatever the table's statistics say (see migrations/*_ledger_lookup.sql).
    let rows: Vec<(String, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT confirmed_id, confirmed_hash FROM eo_confirmed($1, $2)")
            .bind(ns.as_str())
            .bind(&ids)
            .fetch_all(conn)
            .await?;
    Ok(rows.into_iter().map(|(id, hash)| (id, hash.as_deref().and_then(PayloadHash::from_slice))).collect())
}

/// Whether `ns` still has ledger rows only known by their v1 id: rows confirmed before
/// the v2 format existed, or since by a process on `v1` (`EVENT_ID_FORMAT=auto` stays in
/// the transition while there are any). One lookup in a small partial index.
pub async fn has_v1_only_rows(pool: &PgPool, ns: &Namespace) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM processed_events WHERE namespace = $1 AND NOT v2_known)")
        .bind(ns.as_str())
        .fetch_one(pool)
        .await
}

/// One id to confirm (an event in the transition between id formats has two).
pub struct ConfirmRow<'a> {
    pub id: &'a EventId,
    pub event: &'a Event,
    pub hash: PayloadHash,
}

/// Step 5: `INSERT ... ON CONFLICT DO NOTHING` (in the handlers' transaction when there
/// is one). The same statement forgets the events' failure counters and records how many
/// attempts each took. Returns the ids this call inserted; an id missing from the answer
/// was confirmed by someone else. `v2_known`: the events are also known by their v2 ids
/// (every format but `v1`; see the migration that added the column).
pub async fn confirm(
    conn: &mut PgConnection,
    ns: &Namespace,
    rows: &[ConfirmRow<'_>],
    v2_known: bool,
) -> Result<Vec<String>, sqlx::Error> {
    let mut ids = Vec::with_capacity(rows.len());
    let mut hashes = Vec::with_capacity(rows.len());
    let mut topics = Vec::with_capacity(rows.len());
    let mut partitions = Vec::with_capacity(rows.len());
    let mut offsets = Vec::with_capacity(rows.len());
    for r in rows {
        ids.push(r.id.as_str());
        hashes.push(r.hash.0.to_vec());
        topics.push(r.event.topic.as_str());
        partitions.push(r.event.partition);
        offsets.push(r.event.offset);
    }
    sqlx::query_scalar(
        "WITH failures AS (
             DELETE FROM event_attempts a USING UNNEST($2::text[]) AS d(event_id)
             WHERE a.namespace = $1 AND a.event_id = d.event_id
             RETURNING a.event_id, a.attempts
         )
         INSERT INTO processed_events
             (namespace, event_id, status, payload_hash, topic, kafka_partition, kafka_offset, attempts, v2_known)
         SELECT $1, t.event_id, 'processed', t.payload_hash, t.topic, t.kafka_partition, t.kafka_offset,
                COALESCE(f.attempts, 0) + 1, $7
         FROM UNNEST($2::text[], $3::bytea[], $4::text[], $5::int4[], $6::int8[])
              AS t(event_id, payload_hash, topic, kafka_partition, kafka_offset)
         LEFT JOIN failures f USING (event_id)
         ORDER BY t.event_id
         ON CONFLICT (namespace, event_id) DO NOTHING
         RETURNING event_id",
    )
    .bind(ns.as_str())
    .bind(&ids)
    .bind(&hashes)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(v2_known)
    .fetch_all(conn)
    .await
}

/// Counts one more failed attempt for each id; returns the new totals.
pub async fn record_failures(
    pool: &PgPool,
    ns: &Namespace,
    failures: &[(&EventId, String)],
) -> Result<HashMap<String, u32>, sqlx::Error> {
    let ids: Vec<&str> = failures.iter().map(|(id, _)| id.as_str()).collect();
    let errors: Vec<&str> = failures.iter().map(|(_, e)| e.as_str()).collect();
    let rows: Vec<(String, i32)> = sqlx::query_as(
        "INSERT INTO event_attempts (namespace, event_id, attempts, last_error)
         SELECT $1, t.event_id, 1, t.error FROM UNNEST($2::text[], $3::text[]) AS t(event_id, error)
         ORDER BY t.event_id
         ON CONFLICT (namespace, event_id) DO UPDATE
             SET attempts = event_attempts.attempts + 1,
                 last_error = EXCLUDED.last_error,
                 last_failed_at = now()
         RETURNING event_id, attempts",
    )
    .bind(ns.as_str())
    .bind(&ids)
    .bind(&errors)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id, n)| (id, n.max(0) as u32)).collect())
}

/// One event to dead-letter.
pub struct DeadLetterRow<'a> {
    pub id: &'a EventId,
    /// Its v2 id, in the transition between formats: confirmed (dead-lettered) along
    /// with `id`, so processes on v2 know the event is settled.
    pub shadow: Option<&'a EventId>,
    pub event: &'a Event,
    pub reason: String,
    pub error: String,
    /// Attempts taken; 0: this one plus those counted before.
    pub attempts: u32,
}

/// Stores the events in `dead_letters`, confirms them as dead-lettered and forgets
/// their failure history, in one statement (atomic). Returns the ids this call confirmed;
/// the others were confirmed by someone else first and get no dead-letter row.
/// `v2_known` as in [`confirm`].
pub async fn dead_letter(
    pool: &PgPool,
    ns: &Namespace,
    rows: &[DeadLetterRow<'_>],
    v2_known: bool,
) -> Result<Vec<String>, sqlx::Error> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut ids = Vec::new();
    let mut hashes = Vec::new();
    let mut topics = Vec::new();
    let mut partitions = Vec::new();
    let mut offsets = Vec::new();
    let mut keys = Vec::new();
    let mut values = Vec::new();
    let mut headers = Vec::new();
    let mut reasons = Vec::new();
    let mut errors = Vec::new();
    let mut attempts = Vec::new();
    let mut shadows = Vec::new();
    for r in rows {
        ids.push(r.id.as_str());
        shadows.push(r.shadow.map(EventId::as_str));
        hashes.push(r.event.payload_hash().0.to_vec());
        topics.push(r.event.topic.as_str());
        partitions.push(r.event.partition);
        offsets.push(r.event.offset);
        keys.push(r.event.key.as_ref().map(|k| k.to_vec()));
        values.push(r.event.value.as_ref().map(|v| v.to_vec()));
        let h: Vec<serde_json::Value> = r
            .event
            .headers
            .iter()
            .map(|h| serde_json::json!({"name": h.name, "value_b64": h.value.as_ref().map(|v| b64.encode(v))}))
            .collect();
        headers.push(serde_json::Value::Array(h).to_string());
        reasons.push(r.reason.as_str());
        errors.push(r.error.as_str());
        attempts.push(r.attempts as i32);
    }
    sqlx::query_scalar(
        "WITH input AS (
             SELECT * FROM UNNEST($2::text[], $3::bytea[], $4::text[], $5::int4[], $6::int8[],
                                  $7::bytea[], $8::bytea[], $9::text[], $10::text[], $11::text[], $12::int4[],
                                  $13::text[])
                 AS t(event_id, payload_hash, topic, kafka_partition, kafka_offset,
                      record_key, record_value, headers, reason, error, attempts, shadow_id)
         ),
         -- Each event's id and, in the transition, its v2 id: one INSERT, so that an id
         -- given twice is skipped, not a unique violation.
         ledger_rows AS (
             SELECT event_id AS row_id, * FROM input
             UNION ALL
             SELECT shadow_id AS row_id, * FROM input WHERE shadow_id IS NOT NULL
         ),
         inserted AS (
             INSERT INTO processed_events
                 (namespace, event_id, status, payload_hash, topic, kafka_partition, kafka_offset, attempts, metadata,
                  v2_known)
             SELECT $1, row_id, 'dead_lettered', payload_hash, topic, kafka_partition, kafka_offset, attempts,
                    jsonb_build_object('reason', reason), $14
             FROM ledger_rows ORDER BY row_id
             ON CONFLICT (namespace, event_id) DO NOTHING
             RETURNING event_id
         ),
         confirmed AS (
             SELECT event_id FROM inserted WHERE event_id IN (SELECT event_id FROM input)
         ),
         cleared AS (
             DELETE FROM event_attempts
             WHERE namespace = $1 AND event_id IN (SELECT event_id FROM confirmed)
         )
         INSERT INTO dead_letters
             (namespace, event_id, topic, kafka_partition, kafka_offset, record_key, record_value,
              headers, reason, error, attempts)
         SELECT $1, i.event_id, i.topic, i.kafka_partition, i.kafka_offset, i.record_key, i.record_value,
                i.headers::jsonb, i.reason, i.error, i.attempts
         FROM input i JOIN confirmed c USING (event_id)
         -- An open entry for the same event (being replayed): it is this dead letter,
         -- brought up to date, not a second one.
         ON CONFLICT (namespace, event_id) WHERE replayed_at IS NULL DO UPDATE
             SET record_key = EXCLUDED.record_key, record_value = EXCLUDED.record_value,
                 headers = EXCLUDED.headers, reason = EXCLUDED.reason, error = EXCLUDED.error,
                 attempts = EXCLUDED.attempts
         RETURNING event_id",
    )
    .bind(ns.as_str())
    .bind(&ids)
    .bind(&hashes)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&keys)
    .bind(&values)
    .bind(&headers)
    .bind(&reasons)
    .bind(&errors)
    .bind(&attempts)
    .bind(&shadows)
    .bind(v2_known)
    .fetch_all(pool)
    .await
}
