//! The Lambda runtime: one invocation is one MSK batch, run as one guarded batch.
//!
//! Invariants:
//! - clients are built once at init (by the caller) and shared by every invocation;
//! - the lease TTL never exceeds the invocation's remaining time;
//! - success only when every record is processed, duplicate or dead-lettered; otherwise
//!   an error naming the unfinished records, so the event source mapping retries the
//!   batch (confirmed records then pass as duplicates). With
//!   `LAMBDA_REPORT_BATCH_ITEM_FAILURES=true` the function instead answers
//!   `{"batchItemFailures": [{"itemIdentifier": {"partition": "<topic>-<n>", "offset": <n>}}]}`
//!   naming the unfinished records, AWS's documented Kafka shape (see the README); the
//!   mapping must have `ReportBatchItemFailures` on, or it takes that answer as success;
//! - no retry storm: while records are unfinished because the ClickHouse breaker is open,
//!   the invocation waits for the breaker's probe and runs them again, for as long as
//!   its remaining time allows, instead of failing in milliseconds and being retried at
//!   once by the mapping (the worker pauses its partitions for the same reason).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use tokio::time::Instant;

use super::functions::Functions;
use super::msk::{self, MskEvent};
use crate::breaker::CircuitBreaker;
use crate::outbox::Relay;
use crate::outcome::{EventOutcome, FailureKind};
use crate::Outcome;

/// Time kept back from the invocation's deadline for releasing leases and answering.
const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

/// The least time left before the deadline for the outbox to be drained after a batch.
const RELAY_BUDGET: Duration = Duration::from_secs(1);

/// The shortest wait for a breaker's probe before running records again.
const MIN_PROBE_WAIT: Duration = Duration::from_millis(100);

/// Above this many records, a successful answer carries the counts but not each
/// record's outcome: Lambda refuses answers over 6 MB, and a refused answer is a failed
/// invocation, retried for ever.
const MAX_OUTCOMES_IN_ANSWER: usize = 100;

#[derive(Debug, thiserror::Error)]
#[error("{unfinished} of {total} records not finished, the batch will be retried: {detail}")]
pub struct UnfinishedBatch {
    pub unfinished: usize,
    pub total: usize,
    pub detail: String,
}

/// Serves invocations until the runtime stops. After an invocation that processed
/// events, the outbox is drained once (a Lambda has no background time) when at least
/// `RELAY_BUDGET` of the invocation is left; otherwise it waits for the next one.
pub async fn serve(
    functions: Arc<Functions>,
    relay: Arc<Relay>,
    clickhouse: Arc<CircuitBreaker>,
    probe_budget: Duration,
    report_batch_item_failures: bool,
) -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(move |event: LambdaEvent<MskEvent>| {
        let (functions, relay, clickhouse) = (functions.clone(), relay.clone(), clickhouse.clone());
        async move {
            let remaining = event.context.deadline().duration_since(SystemTime::now()).unwrap_or_default();
            let deadline = Instant::now() + remaining.saturating_sub(DEADLINE_MARGIN);
            let outcomes =
                run_until_done_or_deadline(&functions, &event.payload, deadline, &clickhouse, probe_budget).await;
            let processed = outcomes.iter().any(|o| matches!(o.outcome, Outcome::Processed));
            let result = answer(outcomes, report_batch_item_failures).map(|mut v| {
                if v["outcomes"].as_array().is_some_and(|o| o.len() > MAX_OUTCOMES_IN_ANSWER) {
                    if let Some(map) = v.as_object_mut() {
                        map.remove("outcomes");
                    }
                }
                v
            });
            // The outbox is drained only with time to spare, and never cut off midway:
            // cancelling a Postgres call (sqlx 0.8's `begin()` in particular) can hand
            // the pooled connection back inside a transaction, and the next batch's
            // autocommitted confirm would run in it and never commit.
            if processed && Instant::now() + RELAY_BUDGET <= deadline {
                match relay.drain_once().await {
                    Ok(r) if r.published > 0 => tracing::info!(published = r.published, "outbox drained"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "outbox relay failed; messages stay queued"),
                }
            } else if processed {
                tracing::warn!("no time left to drain the outbox; messages stay queued");
            }
            result
        }
    }))
    .await
}

/// Handles one MSK event once: the path `POST /invoke` takes.
pub async fn invoke(
    functions: &Functions,
    event: &MskEvent,
    deadline: Option<Instant>,
    report_batch_item_failures: bool,
) -> Result<Value, UnfinishedBatch> {
    let records = msk::decode(event);
    answer(functions.run(&records, deadline).await, report_batch_item_failures)
}

/// Runs the batch; while records are unfinished for the open ClickHouse breaker and the
/// breaker's next probe comes before `deadline`, waits for it and runs them again.
/// Records that finished are not run again.
async fn run_until_done_or_deadline(
    functions: &Functions,
    event: &MskEvent,
    deadline: Instant,
    clickhouse: &CircuitBreaker,
    probe_budget: Duration,
) -> Vec<EventOutcome> {
    let records = msk::decode(event);
    let mut outcomes = functions.run(&records, Some(deadline)).await;
    loop {
        let waiting: Vec<usize> = (0..outcomes.len()).filter(|&i| !outcomes[i].outcome.is_finished()).collect();
        let blocked = waiting
            .iter()
            .any(|&i| matches!(outcomes[i].outcome, Outcome::Failed { kind: FailureKind::Unavailable, .. }));
        let Some(retry_in) = clickhouse.retry_in().filter(|_| blocked) else { return outcomes };
        // At least a short pause (an open time already over, with the probe not taken
        // yet, says 0), and a probe needs its own time, up to the write timeout: only
        // wait when both fit before the deadline.
        let retry_in = retry_in.max(MIN_PROBE_WAIT);
        if Instant::now() + retry_in + probe_budget + DEADLINE_MARGIN >= deadline {
            tracing::warn!(
                unfinished = waiting.len(),
                "ClickHouse breaker open past this invocation's time; answering unfinished"
            );
            tokio::time::sleep_until(deadline).await;
            return outcomes;
        }
        tracing::warn!(
            unfinished = waiting.len(),
            retry_in_ms = retry_in.as_millis() as u64,
            "ClickHouse breaker open: waiting for its probe"
        );
        tokio::time::sleep(retry_in).await;
        let again: Vec<_> = waiting.iter().map(|&i| records[i].clone()).collect();
        for (i, o) in waiting.into_iter().zip(functions.run(&again, Some(deadline)).await) {
            outcomes[i] = o;
        }
    }
}

/// The invocation's answer: success, `batchItemFailures`, or an error naming the
/// unfinished records.
fn answer(outcomes: Vec<EventOutcome>, report_batch_item_failures: bool) -> Result<Value, UnfinishedBatch> {
    let unfinished: Vec<&EventOutcome> = outcomes.iter().filter(|o| !o.outcome.is_finished()).collect();
    if unfinished.is_empty() {
        return Ok(summary(&outcomes));
    }
    if report_batch_item_failures {
        let failures: Vec<Value> = unfinished
            .iter()
            .map(|o| json!({"itemIdentifier": {"partition": format!("{}-{}", o.topic, o.partition), "offset": o.offset}}))
            .collect();
        tracing::warn!(unfinished = unfinished.len(), total = outcomes.len(), "reporting batch item failures");
        return Ok(json!({ "batchItemFailures": failures }));
    }
    let detail = unfinished
        .iter()
        .take(20)
        .map(|o| format!("{}-{}@{} ({})", o.topic, o.partition, o.offset, o.outcome))
        .collect::<Vec<_>>()
        .join("; ");
    Err(UnfinishedBatch { unfinished: unfinished.len(), total: outcomes.len(), detail })
}

/// Counts per outcome, and each record's outcome.
pub fn summary(outcomes: &[EventOutcome]) -> Value {
    let count = |label: &str| outcomes.iter().filter(|o| o.outcome.label() == label).count();
    json!({
        "records": outcomes.len(),
        "processed": count("processed"),
        "duplicates": count("duplicate"),
        "deadLettered": count("dead_lettered"),
        "inFlight": count("in_flight"),
        "failed": count("failed"),
        "outcomes": outcomes.iter().map(outcome_json).collect::<Vec<_>>(),
    })
}

pub fn outcome_json(o: &EventOutcome) -> Value {
    let mut v = json!({
        "topic": o.topic,
        "partition": o.partition,
        "offset": o.offset,
        "eventId": o.event_id.as_ref().map(|i| i.as_str()),
        "outcome": o.outcome.label(),
    });
    match &o.outcome {
        crate::Outcome::Failed { kind, error, attempts } => {
            v["kind"] = kind.as_str().into();
            v["error"] = error.clone().into();
            v["attempts"] = (*attempts).into();
        }
        crate::Outcome::DeadLettered { reason } => v["reason"] = reason.clone().into(),
        crate::Outcome::Duplicate { tier, payload_mismatch } => {
            v["tier"] = tier.as_str().into();
            v["payloadMismatch"] = (*payload_mismatch).into();
        }
        _ => {}
    }
    v
}

impl From<UnfinishedBatch> for lambda_runtime::Diagnostic {
    fn from(e: UnfinishedBatch) -> Self {
        lambda_runtime::Diagnostic { error_type: "UnfinishedBatch".into(), error_message: e.to_string() }
    }
}
