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
    /// The id to confirm under.
    pub id: &'a EventId,
    /// The event, for its position.
    pub event: &'a Event,
    /// Its payload hash, kept to tell a true duplicate from a different payload under the
    /// same id.
    pub hash: PayloadHash,
}

/// Step 5: `INSERT ... ON CONFLICT DO NOTHING` (in the handlers' transaction when there
/// is one). The same statement forgets the events' failure counters and records how many
/// attempts each took. Returns the ids this call did *not* insert: those were confirmed
/// by someone else first (an id given twice and taken is named twice). That answer is
/// nearly always empty, so the statement names them only when it inserted fewer rows
/// than it was given (a one-time check on the count; the anti-join is not run
/// otherwise), and the ids inserted never come back over the wire. A batch from one partition (every worker batch) sends its topic and
/// partition once instead of once per row. `v2_known`: the events are also known by
/// their v2 ids (every format but `v1`; see the migration that added the column).
///
/// Rows are inserted in byte order of their ids (`COLLATE "C"`: a plain memory
/// comparison, where the database's collation would go through `strcoll` for each one),
/// so concurrent confirms take their row locks in one order and cannot deadlock each
/// other. [`dead_letter`] and [`record_failures`] sort the same way, but a confirm racing
/// a dead letter or a failure count of the same ids (only possible after a lease lapsed)
/// can still deadlock: the dead letter locks an event's v1 ids before its v2 ids, and it
/// and the confirm touch `processed_events` and `event_attempts` in opposite orders.
/// Postgres detects that, aborts one statement, and its batch is retried.
pub async fn confirm(
    conn: &mut PgConnection,
    ns: &Namespace,
    rows: &[ConfirmRow<'_>],
    v2_known: bool,
) -> Result<Vec<String>, sqlx::Error> {
    let Some(first) = rows.first() else {
        return Ok(Vec::new());
    };
    let mut ids = Vec::with_capacity(rows.len());
    let mut hashes = Vec::with_capacity(rows.len());
    let mut offsets = Vec::with_capacity(rows.len());
    for r in rows {
        ids.push(r.id.as_str());
        hashes.push(&r.hash.0[..]);
        offsets.push(r.event.offset);
    }
    let one_partition =
        rows.iter().all(|r| r.event.partition == first.event.partition && r.event.topic == first.event.topic);
    if one_partition {
        sqlx::query_scalar(CONFIRM_ONE_PARTITION)
            .bind(ns.as_str())
            .bind(&ids)
            .bind(&hashes)
            .bind(first.event.topic.as_str())
            .bind(first.event.partition)
            .bind(&offsets)
            .bind(v2_known)
            .fetch_all(conn)
            .await
    } else {
        let topics: Vec<&str> = rows.iter().map(|r| r.event.topic.as_str()).collect();
        let partitions: Vec<i32> = rows.iter().map(|r| r.event.partition).collect();
        sqlx::query_scalar(CONFIRM_MANY_PARTITIONS)
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
}

/// Shared start of the two confirm statements: the failure counters deleted, the insert
/// begun.
macro_rules! confirm_sql_head {
    () => {
        "WITH failures AS (
             DELETE FROM event_attempts a USING UNNEST($2::text[]) AS d(event_id)
             WHERE a.namespace = $1 AND a.event_id = d.event_id
             RETURNING a.event_id, a.attempts
         ),
         inserted AS (
             INSERT INTO processed_events
                 (namespace, event_id, status, payload_hash, topic, kafka_partition, kafka_offset, attempts, v2_known)
         "
    };
}

/// Shared end of the two confirm statements: the insert in id order, then the ids not
/// inserted, looked for only when fewer rows went in than were given.
macro_rules! confirm_sql_tail {
    () => {
        "
             LEFT JOIN failures f USING (event_id)
             ORDER BY t.event_id COLLATE \"C\"
             ON CONFLICT (namespace, event_id) DO NOTHING
             RETURNING event_id
         )
         SELECT d.event_id FROM UNNEST($2::text[]) AS d(event_id)
         WHERE (SELECT count(*) FROM inserted) < cardinality($2::text[])
           AND NOT EXISTS (SELECT 1 FROM inserted i WHERE i.event_id = d.event_id)"
    };
}

/// The confirm of [`confirm`]: `$4` and `$5` the batch's one topic and partition.
const CONFIRM_ONE_PARTITION: &str = concat!(
    confirm_sql_head!(),
    "SELECT $1, t.event_id, 'processed', t.payload_hash, $4::text, $5::int4, t.kafka_offset,
            COALESCE(f.attempts, 0) + 1, $7
     FROM UNNEST($2::text[], $3::bytea[], $6::int8[]) AS t(event_id, payload_hash, kafka_offset)",
    confirm_sql_tail!()
);

/// The confirm of [`confirm`]: a topic and a partition per row (a Lambda batch can hold
/// several partitions).
const CONFIRM_MANY_PARTITIONS: &str = concat!(
    confirm_sql_head!(),
    "SELECT $1, t.event_id, 'processed', t.payload_hash, t.topic, t.kafka_partition, t.kafka_offset,
            COALESCE(f.attempts, 0) + 1, $7
     FROM UNNEST($2::text[], $3::bytea[], $4::text[], $5::int4[], $6::int8[])
          AS t(event_id, payload_hash, topic, kafka_partition, kafka_offset)",
    confirm_sql_tail!()
);

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
         ORDER BY t.event_id COLLATE \"C\"
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
    /// The id the dead letter is stored and confirmed under.
    pub id: &'a EventId,
    /// Its v2 id, in the transition between formats: confirmed (dead-lettered) along
    /// with `id`, so processes on v2 know the event is settled.
    pub shadow: Option<&'a EventId>,
    /// The record as received, stored whole for inspection and replay.
    pub event: &'a Event,
    /// Why it is dead-lettered.
    pub reason: crate::outcome::DeadLetterReason,
    /// The last error, for people.
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
         confirmed AS (
             INSERT INTO processed_events
                 (namespace, event_id, status, payload_hash, topic, kafka_partition, kafka_offset, attempts, metadata,
                  v2_known)
             SELECT $1, event_id, 'dead_lettered', payload_hash, topic, kafka_partition, kafka_offset, attempts,
                    jsonb_build_object('reason', reason), $14
             FROM input ORDER BY event_id COLLATE \"C\"
             ON CONFLICT (namespace, event_id) DO NOTHING
             RETURNING event_id
         ),
         -- In the transition, the v2 id of each event dead-lettered here (and only
         -- those: an event confirmed elsewhere under its v1 id leaves no row behind).
         shadows AS (
             INSERT INTO processed_events
                 (namespace, event_id, status, payload_hash, topic, kafka_partition, kafka_offset, attempts, metadata,
                  v2_known)
             SELECT $1, i.shadow_id, 'dead_lettered', i.payload_hash, i.topic, i.kafka_partition, i.kafka_offset,
                    i.attempts, jsonb_build_object('reason', i.reason), $14
             FROM input i JOIN confirmed c USING (event_id)
             WHERE i.shadow_id IS NOT NULL
             ORDER BY i.shadow_id COLLATE \"C\"
             ON CONFLICT (namespace, event_id) DO NOTHING
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

// Operator access (`eo inspect`, `eo dead-letters`): the same tables, read and repaired
// from outside a batch.

/// What the ledger knows about one id.
#[derive(Debug, Default)]
pub struct IdHistory {
    /// (status, attempts, processed_at, position) of its confirmation.
    pub confirmed: Option<(String, i32, String, String)>,
    /// (attempts, last error) of failures not yet confirmed.
    pub failures: Option<(i32, String)>,
    /// (entry id, reason, error, replayed) of its dead-letter entries, oldest first.
    pub dead_letters: Vec<(i64, String, String, bool)>,
}

/// Everything the ledger holds about `id` in `ns` (`eo inspect`).
pub async fn history(pool: &PgPool, ns: &Namespace, id: &EventId) -> Result<IdHistory, sqlx::Error> {
    use sqlx::Row;
    let confirmed = sqlx::query(
        "SELECT status, attempts, processed_at::text AS at,
                coalesce(topic || '-' || kafka_partition || '@' || kafka_offset, '?') AS position
         FROM processed_events WHERE namespace = $1 AND event_id = $2",
    )
    .bind(ns.as_str())
    .bind(id.as_str())
    .fetch_optional(pool)
    .await?
    .map(|r| (r.get("status"), r.get("attempts"), r.get("at"), r.get("position")));
    let failures =
        sqlx::query("SELECT attempts, last_error FROM event_attempts WHERE namespace = $1 AND event_id = $2")
            .bind(ns.as_str())
            .bind(id.as_str())
            .fetch_optional(pool)
            .await?
            .map(|r| (r.get("attempts"), r.get("last_error")));
    let dead_letters = sqlx::query(
        "SELECT id, reason, error, replayed_at IS NOT NULL AS replayed FROM dead_letters
         WHERE namespace = $1 AND event_id = $2 ORDER BY id",
    )
    .bind(ns.as_str())
    .bind(id.as_str())
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.get("id"), r.get("reason"), r.get("error"), r.get("replayed")))
    .collect();
    Ok(IdHistory { confirmed, failures, dead_letters })
}

/// One open dead-letter entry (`eo dead-letters list`).
#[derive(Debug, Clone)]
pub struct DeadLetterEntry {
    /// The entry's id (`eo dead-letters replay <id>`).
    pub id: i64,
    /// The function (namespace) it belongs to.
    pub function: String,
    /// The event id it was dead-lettered under.
    pub event_id: String,
    /// `topic-partition@offset` of the record.
    pub position: String,
    /// The [`DeadLetterReason`](crate::outcome::DeadLetterReason) label, e.g.
    /// `max_attempts`.
    pub reason: String,
    /// The last error.
    pub error: String,
    /// Attempts taken.
    pub attempts: i32,
    /// When it was dead-lettered, as Postgres prints a `timestamptz`.
    pub created_at: String,
}

/// Open dead-letter entries, of one function or all, oldest first.
pub async fn open_dead_letters(
    pool: &PgPool,
    function: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetterEntry>, sqlx::Error> {
    use sqlx::Row;
    let rows = sqlx::query(
        "SELECT id, namespace, event_id, topic || '-' || kafka_partition || '@' || kafka_offset AS position,
                reason, error, attempts, created_at::text AS created_at
         FROM dead_letters WHERE replayed_at IS NULL AND ($1::text IS NULL OR namespace = $1)
         ORDER BY id LIMIT $2",
    )
    .bind(function)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| DeadLetterEntry {
            id: r.get("id"),
            function: r.get("namespace"),
            event_id: r.get("event_id"),
            position: r.get("position"),
            reason: r.get("reason"),
            error: r.get("error"),
            attempts: r.get("attempts"),
            created_at: r.get("created_at"),
        })
        .collect())
}

/// An open dead letter, with the record as it was stored.
pub struct StoredDeadLetter {
    /// The function (namespace) it belongs to.
    pub function: String,
    /// The event id it was dead-lettered under.
    pub event_id: String,
    /// The [`DeadLetterReason`](crate::outcome::DeadLetterReason) label.
    pub reason: String,
    /// The record, rebuilt from the stored key, value and headers.
    pub event: Event,
}

/// The open dead letter `id`, locked (`FOR UPDATE`) in `conn`'s transaction.
pub async fn lock_open_dead_letter(conn: &mut PgConnection, id: i64) -> Result<Option<StoredDeadLetter>, sqlx::Error> {
    use sqlx::Row;
    let Some(row) = sqlx::query(
        "SELECT namespace, event_id, topic, kafka_partition, kafka_offset, record_key, record_value, headers, reason
           FROM dead_letters WHERE id = $1 AND replayed_at IS NULL FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?
    else {
        return Ok(None);
    };
    let mut event = Event::new(row.get::<String, _>("topic"), row.get("kafka_partition"), row.get("kafka_offset"));
    event.key = row.get::<Option<Vec<u8>>, _>("record_key").map(Into::into);
    event.value = row.get::<Option<Vec<u8>>, _>("record_value").map(Into::into);
    let headers: serde_json::Value = row.get("headers");
    let b64 = base64::engine::general_purpose::STANDARD;
    for h in headers.as_array().into_iter().flatten() {
        let name = h["name"].as_str().unwrap_or_default().to_owned();
        let value = h["value_b64"].as_str().and_then(|v| b64.decode(v).ok()).map(Into::into);
        event.headers.push(crate::event::Header { name, value });
    }
    Ok(Some(StoredDeadLetter {
        function: row.get("namespace"),
        event_id: row.get("event_id"),
        reason: row.get("reason"),
        event,
    }))
}

/// A `dead_lettered` confirmation taken out of the ledger for a replay, kept to be put
/// back if the replay does not finish.
pub struct TakenConfirmation {
    event_id: String,
    payload_hash: Option<Vec<u8>>,
    processed_at: sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc>,
    topic: Option<String>,
    kafka_partition: Option<i32>,
    kafka_offset: Option<i64>,
    attempts: i32,
    metadata: Option<serde_json::Value>,
    v2_known: bool,
}

/// Deletes the `dead_lettered` confirmations of `ids` (in `conn`'s transaction) and
/// returns them.
pub async fn take_dead_lettered(
    conn: &mut PgConnection,
    function: &str,
    ids: &[String],
) -> Result<Vec<TakenConfirmation>, sqlx::Error> {
    use sqlx::Row;
    let rows = sqlx::query(
        "DELETE FROM processed_events
         WHERE namespace = $1 AND event_id = ANY($2) AND status = 'dead_lettered'
         RETURNING event_id, payload_hash, processed_at, topic, kafka_partition, kafka_offset, attempts,
                   metadata, v2_known",
    )
    .bind(function)
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|l| TakenConfirmation {
            event_id: l.get("event_id"),
            payload_hash: l.get("payload_hash"),
            processed_at: l.get("processed_at"),
            topic: l.get("topic"),
            kafka_partition: l.get("kafka_partition"),
            kafka_offset: l.get("kafka_offset"),
            attempts: l.get("attempts"),
            metadata: l.get("metadata"),
            v2_known: l.get("v2_known"),
        })
        .collect())
}

/// Puts confirmations taken by [`take_dead_lettered`] back (those whose id nobody
/// confirmed since).
pub async fn put_back(pool: &PgPool, function: &str, rows: &[TakenConfirmation]) -> Result<(), sqlx::Error> {
    for l in rows {
        sqlx::query(
            "INSERT INTO processed_events
                 (namespace, event_id, status, payload_hash, processed_at, topic, kafka_partition, kafka_offset,
                  attempts, metadata, v2_known)
             VALUES ($1, $2, 'dead_lettered', $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT DO NOTHING",
        )
        .bind(function)
        .bind(&l.event_id)
        .bind(&l.payload_hash)
        .bind(l.processed_at)
        .bind(&l.topic)
        .bind(l.kafka_partition)
        .bind(l.kafka_offset)
        .bind(l.attempts)
        .bind(&l.metadata)
        .bind(l.v2_known)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Whether any of `ids` is confirmed as processed.
pub async fn any_processed(pool: &PgPool, function: &str, ids: &[String]) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM processed_events
                        WHERE namespace = $1 AND event_id = ANY($2) AND status = 'processed')",
    )
    .bind(function)
    .bind(ids)
    .fetch_one(pool)
    .await
}

/// Closes dead-letter entry `id` (its event took effect, or a newer entry holds it).
pub async fn close_dead_letter(pool: &PgPool, id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE dead_letters SET replayed_at = now() WHERE id = $1 AND replayed_at IS NULL")
        .bind(id)
        .execute(pool)
        .await
        .map(|_| ())
}
