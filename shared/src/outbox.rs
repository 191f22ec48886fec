//! The transactional outbox: publishing to Kafka from a handler, exactly once in effect.
//!
//! A handler calls [`HandlerContext::publish`](crate::HandlerContext::publish); the
//! message is written to `outbox` inside the batch transaction, so it exists if and only
//! if the event is confirmed. The [`Relay`] sends queued messages afterwards, under the
//! Kafka breaker: while the breaker is open nothing is attempted and messages wait in
//! Postgres (queued durably while Kafka is down, sent once the breaker closes: an outage
//! delays messages, never loses them). The
//! worker runs the relay every `OUTBOX_RELAY_INTERVAL_MS`; on Lambda it runs after an
//! invocation that processed events and on a schedule (an EventBridge rule invokes the
//! function, see `runtime::lambda`), so a backlog drains without new traffic.
//!
//! Invariants: a message is marked published only after the broker acknowledged it; a
//! message may be sent more than once (a crash between the acknowledgement and the
//! mark), always with the same `idempotency_key` header (`<event id>:<n>`), so
//! downstream guards drop the repeat. Concurrent relays never send the same row at the
//! same time (`FOR UPDATE SKIP LOCKED`).
//!
//! Failures are told apart ([`SendFailure`]): Kafka being unavailable feeds the breaker
//! and never counts against a message; Kafka refusing one message (too large, unknown
//! topic, not authorised, invalid record) counts against that message only, and after
//! `OUTBOX_MAX_ATTEMPTS` refusals it is dead-lettered in place (`dead_lettered_at`,
//! `dead_letter_reason`, `last_error`), counted (`outbox_messages_dead_lettered_total`)
//! and logged, while the messages behind it keep flowing. Operators list them with
//! `eo outbox list` and requeue them with `eo outbox replay` once the cause is fixed.
//! Published messages are deleted by the retention cleanup after
//! `OUTBOX_RETENTION_HOURS`.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Row};

use crate::breaker::CircuitBreaker;
use crate::config::KafkaConfig;
use crate::event_id::{EventId, Namespace};
use crate::metrics::metrics;
use crate::producer::{ProduceError, Producer, SendFailure};

/// Writes one message to the outbox (inside the caller's transaction).
pub(crate) async fn enqueue(
    conn: &mut PgConnection,
    ns: &Namespace,
    event_id: &EventId,
    n: u32,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox (namespace, event_id, topic, message_key, payload, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(ns.as_str())
    .bind(event_id.as_str())
    .bind(topic)
    .bind(key)
    .bind(payload)
    .bind(format!("{event_id}:{n}"))
    .execute(conn)
    .await?;
    Ok(())
}

/// What one [`Relay::drain_once`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RelayReport {
    /// Messages Kafka acknowledged, now marked published.
    pub published: u64,
    /// Messages attempted and not published (for any reason), dead-lettered ones included.
    pub failed: u64,
    /// Of `failed`: refused by Kafka on their own merits (too large, unknown topic...).
    pub rejected: u64,
    /// Of `rejected`: refused for the `OUTBOX_MAX_ATTEMPTS`th time, now dead-lettered.
    pub dead_lettered: u64,
    /// True when the Kafka breaker was open and nothing was attempted.
    pub skipped: bool,
    /// True when the batch was full: more messages may be queued.
    pub full: bool,
}

/// Why the relay could not run.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading or updating the outbox table failed.
    #[error("outbox: Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The Kafka producer could not be made.
    #[error("outbox: {0}")]
    Producer(#[from] ProduceError),
}

/// One queued message, as the relay read it.
struct Queued {
    id: i64,
    namespace: String,
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    idempotency_key: String,
    rejections: i32,
}

/// Sends pending outbox messages to Kafka.
pub struct Relay {
    pg: PgPool,
    producer: Producer,
    breaker: Arc<CircuitBreaker>,
    kafka: KafkaConfig,
    batch_size: i64,
}

impl Relay {
    /// A relay publishing through its own producer, under the Kafka breaker.
    pub fn new(pg: PgPool, kafka: &KafkaConfig, breaker: Arc<CircuitBreaker>) -> Result<Self, RelayError> {
        Ok(Self { pg, producer: Producer::new(kafka)?, breaker, kafka: kafka.clone(), batch_size: 500 })
    }

    /// Sends up to one batch of queued messages (neither published nor dead-lettered).
    ///
    /// Per message: acknowledged, it is marked published; refused on its own merits
    /// ([`SendFailure::Rejected`]), its refusal is counted and, at the
    /// `OUTBOX_MAX_ATTEMPTS`th, it is dead-lettered with the reason; any other failure
    /// leaves it queued as it was. For the Kafka breaker, only unavailability counts as
    /// a failure: a refused message says nothing about Kafka's health, and counting it
    /// would hold the breaker open (and the worker unready) for as long as it is queued.
    /// A batch of nothing but refusals reports nothing to the breaker.
    pub async fn drain_once(&self) -> Result<RelayReport, RelayError> {
        if self.breaker.retry_in().is_some_and(|d| !d.is_zero()) {
            return Ok(RelayReport { skipped: true, ..Default::default() });
        }
        let mut tx = self.pg.begin().await?;
        // Every early exit rolls back explicitly: a dropped transaction would keep its
        // row locks until the pooled connection happens to be reused.
        let rows = sqlx::query(
            "SELECT id, namespace, topic, message_key, payload, idempotency_key, rejections FROM outbox
             WHERE published_at IS NULL AND dead_lettered_at IS NULL
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(self.batch_size)
        .fetch_all(&mut *tx)
        .await;
        let rows = match rows {
            Ok(rows) if !rows.is_empty() => rows,
            other => {
                let _ = tx.rollback().await;
                return other.map(|_| RelayReport::default()).map_err(Into::into);
            }
        };
        let Ok(permit) = self.breaker.try_acquire() else {
            let _ = tx.rollback().await;
            return Ok(RelayReport { skipped: true, ..Default::default() });
        };
        let messages: Result<Vec<Queued>, sqlx::Error> = rows
            .iter()
            .map(|row| {
                Ok(Queued {
                    id: row.try_get("id")?,
                    namespace: row.try_get("namespace")?,
                    topic: self.kafka.topic(&row.try_get::<String, _>("topic")?),
                    key: row.try_get("message_key")?,
                    payload: row.try_get("payload")?,
                    idempotency_key: row.try_get("idempotency_key")?,
                    rejections: row.try_get("rejections")?,
                })
            })
            .collect();
        let messages = match messages {
            Ok(m) => m,
            Err(e) => {
                let _ = tx.rollback().await;
                return Err(e.into());
            }
        };
        let sends = messages
            .iter()
            .map(|m| self.producer.send(&m.topic, m.key.as_deref(), &m.payload, Some(&m.idempotency_key)));
        let results = futures::future::join_all(sends).await;

        let m = metrics();
        let max_attempts = self.kafka.outbox_max_attempts as i32;
        let mut report = RelayReport { full: messages.len() as i64 >= self.batch_size, ..Default::default() };
        let mut sent = Vec::new();
        // Failed rows: id, error, refusals so far, dead-letter reason (empty: stays queued).
        let (mut failed, mut errors, mut rejections, mut reasons) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut unavailable: Option<String> = None;
        let mut dead: Vec<(&Queued, &'static str, String)> = Vec::new();
        for (msg, result) in messages.iter().zip(results) {
            let e = match result {
                Ok(_) => {
                    sent.push(msg.id);
                    m.outbox_published.with_label_values(&[&msg.namespace]).inc();
                    continue;
                }
                Err(e) => e,
            };
            let kind = e.kind();
            m.outbox_failed.with_label_values(&[&msg.namespace, kind.label()]).inc();
            report.failed += 1;
            let mut count = msg.rejections;
            let mut reason = "";
            match kind {
                SendFailure::Rejected(why) => {
                    report.rejected += 1;
                    count += 1;
                    if count >= max_attempts {
                        reason = why;
                        report.dead_lettered += 1;
                        dead.push((msg, why, e.to_string()));
                    }
                }
                SendFailure::Unavailable => {
                    unavailable.get_or_insert_with(|| e.to_string());
                }
                SendFailure::Retry => {}
            }
            failed.push(msg.id);
            errors.push(e.to_string());
            rejections.push(count);
            reasons.push(reason);
        }
        let marked = async {
            sqlx::query("UPDATE outbox SET published_at = now(), attempts = attempts + 1 WHERE id = ANY($1)")
                .bind(&sent)
                .execute(&mut *tx)
                .await?;
            if !failed.is_empty() {
                sqlx::query(
                    "UPDATE outbox o SET attempts = o.attempts + 1, last_error = f.error, rejections = f.rejections,
                            dead_letter_reason = NULLIF(f.reason, ''),
                            dead_lettered_at = CASE WHEN f.reason <> '' THEN now() END
                     FROM UNNEST($1::bigint[], $2::text[], $3::int[], $4::text[]) AS f(id, error, rejections, reason)
                     WHERE o.id = f.id",
                )
                .bind(&failed)
                .bind(&errors)
                .bind(&rejections)
                .bind(&reasons)
                .execute(&mut *tx)
                .await?;
            }
            Ok::<(), sqlx::Error>(())
        }
        .await;
        if let Err(e) = marked {
            // Sent but not marked: they go out again later, with the same idempotency keys.
            let _ = tx.rollback().await;
            return Err(e.into());
        }
        tx.commit().await?;
        report.published = sent.len() as u64;
        for (msg, reason, error) in dead {
            m.outbox_dead_lettered.with_label_values(&[&msg.namespace, reason]).inc();
            tracing::error!(
                id = msg.id,
                function = %msg.namespace,
                topic = %msg.topic,
                idempotency_key = %msg.idempotency_key,
                reason,
                %error,
                attempts = max_attempts,
                "outbox message dead-lettered: Kafka refused it every time; see `eo outbox list`"
            );
        }
        match unavailable {
            Some(error) => {
                permit.failure();
                tracing::warn!(failed = report.failed, %error, "outbox: Kafka unavailable; messages stay queued");
            }
            None if !sent.is_empty() => permit.success(),
            // Only refusals: nothing learnt about Kafka's health either way.
            None => drop(permit),
        }
        if report.rejected > report.dead_lettered {
            tracing::warn!(
                rejected = report.rejected - report.dead_lettered,
                "outbox: Kafka refused some messages; they are tried again, up to OUTBOX_MAX_ATTEMPTS"
            );
        }
        Ok(report)
    }

    /// Drains continuously: at once while a batch comes back full, every `idle`
    /// otherwise, and not at all while the Kafka breaker is open.
    pub fn spawn(self, idle: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let wait = match self.drain_once().await {
                    Ok(r) if r.skipped => self.breaker.retry_in().unwrap_or(idle).max(Duration::from_millis(10)),
                    Ok(r) if r.full && r.published > 0 => Duration::ZERO,
                    Ok(_) => idle,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox relay failed; retrying");
                        idle * 10
                    }
                };
                tokio::time::sleep(wait).await;
            }
        })
    }
}

/// Messages queued for the relay (for tests and the operator CLI).
pub async fn pending(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL AND dead_lettered_at IS NULL")
        .fetch_one(pool)
        .await
}

/// One dead-lettered outbox message (`eo outbox list`).
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The outbox row's id (`eo outbox replay <id>`).
    pub id: i64,
    /// The function (namespace) that queued it.
    pub function: String,
    /// The event whose handler queued it.
    pub event_id: String,
    /// The topic it was to be published to.
    pub topic: String,
    /// The key Kafka's `idempotency_key` header carries: `<event id>:<n>`, n counting the
    /// event's messages.
    pub idempotency_key: String,
    /// Why it was dead-lettered (the refusal's label, e.g. `message_too_large`).
    pub reason: String,
    /// The last error Kafka gave.
    pub error: String,
    /// Times Kafka refused it.
    pub rejections: i32,
    /// The size of its payload in bytes.
    pub payload_bytes: i64,
    /// When it was dead-lettered, as Postgres prints a `timestamptz`.
    pub dead_lettered_at: String,
}

/// Dead-lettered outbox messages, oldest first, of one function or all.
pub async fn dead_letters(pool: &PgPool, function: Option<&str>, limit: i64) -> Result<Vec<DeadLetter>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, namespace, event_id, topic, idempotency_key, coalesce(dead_letter_reason, '') AS reason,
                coalesce(last_error, '') AS error, rejections, octet_length(payload)::bigint AS payload_bytes,
                dead_lettered_at::text AS dead_lettered_at
         FROM outbox WHERE dead_lettered_at IS NOT NULL AND ($1::text IS NULL OR namespace = $1)
         ORDER BY id LIMIT $2",
    )
    .bind(function)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(DeadLetter {
                id: r.try_get("id")?,
                function: r.try_get("namespace")?,
                event_id: r.try_get("event_id")?,
                topic: r.try_get("topic")?,
                idempotency_key: r.try_get("idempotency_key")?,
                reason: r.try_get("reason")?,
                error: r.try_get("error")?,
                rejections: r.try_get("rejections")?,
                payload_bytes: r.try_get("payload_bytes")?,
                dead_lettered_at: r.try_get("dead_lettered_at")?,
            })
        })
        .collect()
}

/// Puts dead-lettered messages back in the queue (after the cause is fixed: the topic
/// created, the permission granted, the broker's size limit raised), with their
/// refusal count reset, so the relay sends them again under their original
/// idempotency keys. Returns the ids requeued; ids that are not dead-lettered (unknown,
/// published, queued) are left alone and not returned.
pub async fn requeue(pool: &PgPool, ids: &[i64]) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE outbox SET dead_lettered_at = NULL, dead_letter_reason = NULL, rejections = 0
         WHERE id = ANY($1) AND dead_lettered_at IS NOT NULL AND published_at IS NULL
         RETURNING id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
}
