//! The transactional outbox: publishing to Kafka from a handler, exactly once in effect.
//!
//! A handler calls [`HandlerContext::publish`](crate::HandlerContext::publish); the
//! message is written to `outbox` inside the batch transaction, so it exists if and only
//! if the event is confirmed. The [`Relay`] sends pending messages afterwards, under the
//! Kafka breaker: while the breaker is open nothing is attempted and messages wait in
//! Postgres (seed 002: queue durably while Kafka is down, send when it closes).
//!
//! Invariants: a message is marked published only after the broker acknowledged it; a
//! message may be sent more than once (a crash between the acknowledgement and the
//! mark), always with the same `idempotency_key` header (`<event id>:<n>`), so
//! downstream guards drop the repeat. Concurrent relays never send the same row at the
//! same time (`FOR UPDATE SKIP LOCKED`).

use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool, Row};

use crate::breaker::CircuitBreaker;
use crate::config::KafkaConfig;
use crate::event_id::{EventId, Namespace};
use crate::producer::{ProduceError, Producer};

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

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RelayReport {
    pub published: u64,
    pub failed: u64,
    /// True when the Kafka breaker was open and nothing was attempted.
    pub skipped: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("outbox: Postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    #[error("outbox: {0}")]
    Producer(#[from] ProduceError),
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
    pub fn new(pg: PgPool, kafka: &KafkaConfig, breaker: Arc<CircuitBreaker>) -> Result<Self, RelayError> {
        Ok(Self { pg, producer: Producer::new(kafka)?, breaker, kafka: kafka.clone(), batch_size: 500 })
    }

    /// Sends up to one batch of pending messages.
    pub async fn drain_once(&self) -> Result<RelayReport, RelayError> {
        if self.breaker.retry_in().is_some_and(|d| !d.is_zero()) {
            return Ok(RelayReport { skipped: true, ..Default::default() });
        }
        let mut tx = self.pg.begin().await?;
        // Every early exit rolls back explicitly: a dropped transaction would keep its
        // row locks until the pooled connection happens to be reused.
        let rows = sqlx::query(
            "SELECT id, topic, message_key, payload, idempotency_key FROM outbox
             WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
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
        let messages: Result<Vec<_>, sqlx::Error> = rows
            .iter()
            .map(|row| {
                Ok((
                    row.try_get::<i64, _>("id")?,
                    self.kafka.topic(&row.try_get::<String, _>("topic")?),
                    row.try_get::<Option<Vec<u8>>, _>("message_key")?,
                    row.try_get::<Vec<u8>, _>("payload")?,
                    row.try_get::<String, _>("idempotency_key")?,
                ))
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
            .map(|(_, topic, key, payload, idem)| self.producer.send(topic, key.as_deref(), payload, Some(idem)));
        let results = futures::future::join_all(sends).await;
        let (mut sent, mut failed, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        for ((id, ..), r) in messages.iter().zip(results) {
            match r {
                Ok(_) => sent.push(*id),
                Err(e) => {
                    failed.push(*id);
                    errors.push(e.to_string());
                }
            }
        }
        let marked = async {
            sqlx::query("UPDATE outbox SET published_at = now(), attempts = attempts + 1 WHERE id = ANY($1)")
                .bind(&sent)
                .execute(&mut *tx)
                .await?;
            if !failed.is_empty() {
                sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE id = ANY($1)")
                    .bind(&failed)
                    .bind(errors.first().cloned().unwrap_or_default())
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
        if failed.is_empty() {
            permit.success();
        } else {
            permit.failure();
            tracing::warn!(failed = failed.len(), error = %errors[0], "outbox: some messages were not published; they stay queued");
        }
        Ok(RelayReport { published: sent.len() as u64, failed: failed.len() as u64, skipped: false })
    }

    /// Drains continuously: at once while a batch comes back full, every `idle`
    /// otherwise, and not at all while the Kafka breaker is open.
    pub fn spawn(self, idle: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let wait = match self.drain_once().await {
                    Ok(r) if r.skipped => self.breaker.retry_in().unwrap_or(idle).max(Duration::from_millis(10)),
                    Ok(r) if r.published as i64 >= self.batch_size => Duration::ZERO,
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

/// Messages not yet published (for tests and the operator CLI).
pub async fn pending(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetch_one(pool).await
}
