//! Retention (the ledger must not grow without bound): confirmed ids older than `RETENTION_DAYS` are deleted
//! in bounded batches (`CLEANUP_BATCH_SIZE` rows per statement, each its own short
//! transaction), so the cleanup never holds long locks on the ledger the guard writes
//! to. Stale failure counters go the same way, and so do outbox messages published
//! more than `OUTBOX_RETENTION_HOURS` ago (kept that long only to answer "was it
//! sent?"; queued and dead-lettered messages are never deleted here). Redis markers
//! expire on their own.
//!
//! Trade-off, stated plainly: an event redelivered after its row was deleted is handled
//! again. Keep the retention longer than any redelivery you expect (Kafka topic
//! retention, replays).

use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::config::RetentionConfig;
use crate::metrics::metrics;

/// What one cleanup deleted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CleanupReport {
    /// Rows deleted from `processed_events` (confirmed ids past `RETENTION_DAYS`).
    pub processed_events_deleted: u64,
    /// Rows deleted from `event_attempts` (failure counters not updated for
    /// `RETENTION_DAYS`).
    pub attempts_deleted: u64,
    /// Published outbox messages deleted (past `OUTBOX_RETENTION_HOURS`).
    pub outbox_deleted: u64,
    /// Delete statements run.
    pub batches: u64,
}

/// Deletes everything past retention, batch by batch, and returns what it removed.
pub async fn cleanup(pool: &PgPool, config: &RetentionConfig) -> Result<CleanupReport, sqlx::Error> {
    let started = Instant::now();
    let (processed_events_deleted, b1) =
        delete_older(pool, "processed_events", "processed_at", config.retention, config.batch_size).await?;
    let (attempts_deleted, b2) =
        delete_older(pool, "event_attempts", "last_failed_at", config.retention, config.batch_size).await?;
    let (outbox_deleted, b3) = prune_outbox(pool, config).await?;
    let report = CleanupReport { processed_events_deleted, attempts_deleted, outbox_deleted, batches: b1 + b2 + b3 };
    metrics().cleanup_deleted.inc_by(report.processed_events_deleted);
    tracing::info!(
        deleted = report.processed_events_deleted,
        attempts_deleted = report.attempts_deleted,
        outbox_deleted = report.outbox_deleted,
        batches = report.batches,
        elapsed_ms = started.elapsed().as_millis() as u64,
        retention_days = config.retention.as_secs() / 86_400,
        "retention cleanup done"
    );
    Ok(report)
}

/// Deletes outbox messages published more than `outbox_retention` ago, in bounded
/// batches (rows never published have no `published_at` and are never matched).
/// Returns the rows deleted and the statements run.
pub async fn prune_outbox(pool: &PgPool, config: &RetentionConfig) -> Result<(u64, u64), sqlx::Error> {
    let (deleted, batches) =
        delete_older(pool, "outbox", "published_at", config.outbox_retention, config.batch_size).await?;
    metrics().outbox_cleanup_deleted.inc_by(deleted);
    Ok((deleted, batches))
}

/// Deletes rows of `table` whose `column` is older than `retention`, `batch_size` at a
/// time. Returns the rows deleted and the statements run. `table` and `column` are
/// constants of this module, never input.
async fn delete_older(
    pool: &PgPool,
    table: &str,
    column: &str,
    retention: Duration,
    batch_size: i64,
) -> Result<(u64, u64), sqlx::Error> {
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY(
             SELECT ctid FROM {table} WHERE {column} < now() - make_interval(secs => $1) LIMIT $2))"
    );
    let (mut total, mut batches) = (0, 0);
    loop {
        let deleted =
            sqlx::query(&sql).bind(retention.as_secs_f64()).bind(batch_size).execute(pool).await?.rows_affected();
        total += deleted;
        batches += 1;
        if deleted < batch_size as u64 {
            return Ok((total, batches));
        }
    }
}

/// Rows in `processed_events`: the planner's estimate once the table is analysed (cheap
/// at any size), an exact count before that.
pub async fn table_size(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let estimate: Option<f32> =
        sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = 'processed_events'::regclass")
            .fetch_optional(pool)
            .await?;
    let size = match estimate {
        Some(n) if n >= 0.0 => n as i64,
        _ => sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(pool).await?,
    };
    metrics().table_size.set(size);
    Ok(size)
}

/// Runs the cleanup every `interval` and refreshes the table-size gauge every minute.
pub fn spawn(pool: PgPool, config: RetentionConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut size_tick = tokio::time::interval(Duration::from_secs(60));
        let mut cleanup_tick =
            tokio::time::interval(if config.interval.is_zero() { Duration::MAX / 4 } else { config.interval });
        loop {
            tokio::select! {
                _ = size_tick.tick() => {
                    if let Err(e) = table_size(&pool).await {
                        tracing::warn!(error = %e, "could not read the processed_events size");
                    }
                }
                _ = cleanup_tick.tick(), if !config.interval.is_zero() => {
                    if let Err(e) = cleanup(&pool, &config).await {
                        tracing::warn!(error = %e, "retention cleanup failed; retried at the next interval");
                    }
                }
            }
        }
    })
}
