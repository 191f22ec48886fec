//! The Lambda runtime: an invocation is either one MSK batch, run as one guarded batch,
//! or an EventBridge scheduled event, which drains the outbox (see [`Invocation`]).
//!
//! Invariants:
//! - clients are built once at init (by the caller) and shared by every invocation;
//! - the lease TTL never exceeds the invocation's remaining time;
//! - success only when every record is processed, duplicate or dead-lettered; otherwise
//!   an error naming the unfinished records, so the event source mapping retries the
//!   batch (confirmed records then pass as duplicates). With
//!   `LAMBDA_REPORT_BATCH_ITEM_FAILURES=true` the function instead answers
//!   `{"batchItemFailures": [{"itemIdentifier": {"partition": "<topic>-<n>", "offset": <n>}}]}`
//!   naming the unfinished records, AWS's documented Kafka shape (see docs/RUNTIMES.md); the
//!   mapping must have `ReportBatchItemFailures` on, or it takes that answer as success;
//! - no retry storm: while records are unfinished because the ClickHouse breaker is open,
//!   the invocation waits for the breaker's probe and runs them again, for as long as
//!   its remaining time allows, instead of failing in milliseconds and being retried at
//!   once by the mapping (the worker pauses its partitions for the same reason);
//! - the outbox drains without new traffic: a Lambda has no background time, and the
//!   drain after a batch only runs when a batch arrives, so messages queued while Kafka
//!   was down (or left behind by an invocation out of time) would wait for the next
//!   event on the topic, which may never come. The deployment (template.yaml, infra/)
//!   invokes each publishing function on a schedule with EventBridge's "Scheduled
//!   Event"; that invocation drains the outbox while batches come back full and time
//!   allows, deletes published messages past `OUTBOX_RETENTION_HOURS`, and answers
//!   what it did. A payload that is neither shape is a clear error naming its keys
//!   (`UnrecognisedEvent`), never a panic or a silent success.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::time::Instant;

use super::functions::Functions;
use super::msk::{self, MskEvent};
use crate::breaker::CircuitBreaker;
use crate::config::RetentionConfig;
use crate::outbox::{Relay, RelayError, RelayReport};
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

/// Records of a batch left unfinished: the invocation fails so that Lambda retries the
/// batch.
#[derive(Debug, thiserror::Error)]
#[error("{unfinished} of {total} records not finished, the batch will be retried: {detail}")]
pub struct UnfinishedBatch {
    /// Records not finished.
    pub unfinished: usize,
    /// Records in the batch.
    pub total: usize,
    /// The first unfinished records (at most 20), `topic-partition@offset (outcome)`,
    /// joined with `; `.
    pub detail: String,
}

/// What one invocation carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Invocation {
    /// A batch from the MSK event source mapping (it has `records`).
    Msk(MskEvent),
    /// An EventBridge rule's scheduled event (`"source": "aws.events"`,
    /// `"detail-type": "Scheduled Event"`): drain the outbox. `rule` is the rule's ARN.
    Scheduled {
        /// The rule's ARN (the event's first resource), if given.
        rule: Option<String>,
    },
}

/// A payload that is neither an MSK event nor a scheduled event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unrecognised invocation payload: {0}; this function takes an MSK event (with `records`) or an EventBridge scheduled event (`source` aws.events, `detail-type` Scheduled Event)")]
pub struct UnrecognisedEvent(pub String);

impl Invocation {
    /// Tells the two payloads apart. Only key names are quoted in an error, never
    /// values (a payload may carry data that does not belong in a log).
    pub fn classify(payload: Value) -> Result<Self, UnrecognisedEvent> {
        let Value::Object(map) = payload else {
            let kind = match payload {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                Value::Array(_) => "an array",
                Value::Object(_) => unreachable!("matched above"),
            };
            return Err(UnrecognisedEvent(format!("{kind}, not a JSON object")));
        };
        if map.contains_key("records") {
            return serde_json::from_value(Value::Object(map))
                .map(Invocation::Msk)
                .map_err(|e| UnrecognisedEvent(format!("an MSK event that does not parse ({e})")));
        }
        let field = |k: &str| map.get(k).and_then(Value::as_str);
        if field("source") == Some("aws.events") && field("detail-type") == Some("Scheduled Event") {
            let rule = map.get("resources").and_then(|r| r.get(0)).and_then(Value::as_str).map(str::to_owned);
            return Ok(Invocation::Scheduled { rule });
        }
        let mut keys: Vec<&str> = map.keys().map(String::as_str).take(12).collect();
        keys.sort_unstable();
        let shown = if keys.is_empty() { "none".to_owned() } else { keys.join(", ") };
        Err(UnrecognisedEvent(format!("an object with keys [{shown}]")))
    }
}

/// Why an invocation failed (the `errorType` Lambda records is the variant's name).
#[derive(Debug, thiserror::Error)]
pub enum InvocationError {
    /// Records were left unfinished and `batchItemFailures` is off.
    #[error(transparent)]
    Unfinished(#[from] UnfinishedBatch),
    /// The payload is neither an MSK event nor a scheduled event.
    #[error(transparent)]
    Unrecognised(#[from] UnrecognisedEvent),
    /// The scheduled drain could not run (Postgres unreachable); the next schedule
    /// tries again, and messages stay queued meanwhile.
    #[error("scheduled outbox drain failed; messages stay queued: {0}")]
    OutboxDrain(String),
}

impl From<InvocationError> for lambda_runtime::Diagnostic {
    fn from(e: InvocationError) -> Self {
        let error_type = match &e {
            InvocationError::Unfinished(_) => "UnfinishedBatch",
            InvocationError::Unrecognised(_) => "UnrecognisedEvent",
            InvocationError::OutboxDrain(_) => "OutboxDrainFailed",
        };
        lambda_runtime::Diagnostic { error_type: error_type.into(), error_message: e.to_string() }
    }
}

/// Everything an invocation needs, built once at init and shared by every invocation.
pub struct LambdaApp {
    /// The process's functions, each with its guard.
    pub functions: Arc<Functions>,
    /// The outbox relay, drained after a batch and on a schedule.
    pub relay: Arc<Relay>,
    /// The ClickHouse breaker: a batch stopped by it waits for a probe before running
    /// records again.
    pub clickhouse: Arc<CircuitBreaker>,
    /// The Postgres pool (the scheduled outbox cleanup).
    pub pg: PgPool,
    /// How long published outbox messages are kept.
    pub retention: RetentionConfig,
    /// Time a ClickHouse probe may take (its write timeout).
    pub probe_budget: Duration,
    /// `LAMBDA_REPORT_BATCH_ITEM_FAILURES`: answer a partly failed batch with
    /// `batchItemFailures`.
    pub report_batch_item_failures: bool,
}

impl LambdaApp {
    /// Handles one invocation's payload, finishing before `deadline`.
    pub async fn handle(&self, payload: Value, deadline: Instant) -> Result<Value, InvocationError> {
        match Invocation::classify(payload) {
            Ok(Invocation::Msk(event)) => self.handle_batch(&event, deadline).await,
            Ok(Invocation::Scheduled { rule }) => self.handle_schedule(rule.as_deref(), deadline).await,
            Err(e) => {
                tracing::error!(error = %e, "unrecognised invocation");
                Err(e.into())
            }
        }
    }

    /// One MSK batch; after it, when it processed events and time is left, the outbox
    /// is drained once.
    async fn handle_batch(&self, event: &MskEvent, deadline: Instant) -> Result<Value, InvocationError> {
        let outcomes =
            run_until_done_or_deadline(&self.functions, event, deadline, &self.clickhouse, self.probe_budget).await;
        let processed = outcomes.iter().any(|o| matches!(o.outcome, Outcome::Processed));
        let result = answer(outcomes, self.report_batch_item_failures).map(|mut v| {
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
            match self.relay.drain_once().await {
                Ok(r) if r.published > 0 => tracing::info!(published = r.published, "outbox drained"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "outbox relay failed; messages stay queued"),
            }
        } else if processed {
            tracing::warn!("no time left to drain the outbox; messages stay queued (the scheduled drain sends them)");
        }
        Ok(result?)
    }

    /// A scheduled invocation: drains the outbox batch after batch while they come back
    /// full and `RELAY_BUDGET` is left, then deletes published messages past retention.
    async fn handle_schedule(&self, rule: Option<&str>, deadline: Instant) -> Result<Value, InvocationError> {
        let mut total = RelayReport::default();
        let mut batches = 0u32;
        let drain_failed = |e: RelayError| {
            tracing::error!(error = %e, "scheduled outbox drain failed; messages stay queued");
            InvocationError::OutboxDrain(e.to_string())
        };
        while Instant::now() + RELAY_BUDGET <= deadline {
            let r = self.relay.drain_once().await.map_err(drain_failed)?;
            batches += 1;
            total.published += r.published;
            total.failed += r.failed;
            total.rejected += r.rejected;
            total.dead_lettered += r.dead_lettered;
            total.skipped |= r.skipped;
            if r.skipped || !r.full || r.published == 0 {
                break;
            }
        }
        let pruned = if Instant::now() + RELAY_BUDGET <= deadline {
            crate::retention::prune_outbox(&self.pg, &self.retention)
                .await
                .map_err(|e| drain_failed(RelayError::Postgres(e)))?
                .0
        } else {
            0
        };
        tracing::info!(
            rule = rule.unwrap_or("?"),
            batches,
            published = total.published,
            failed = total.failed,
            dead_lettered = total.dead_lettered,
            kafka_breaker_open = total.skipped,
            pruned,
            "scheduled outbox drain"
        );
        Ok(json!({
            "scheduled": true,
            "outbox": {
                "batches": batches,
                "published": total.published,
                "failed": total.failed,
                "rejected": total.rejected,
                "deadLettered": total.dead_lettered,
                "kafkaBreakerOpen": total.skipped,
            },
            "pruned": pruned,
        }))
    }
}

/// Serves invocations until the runtime stops.
pub async fn serve(app: Arc<LambdaApp>) -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
        let app = app.clone();
        async move {
            let remaining = event.context.deadline().duration_since(SystemTime::now()).unwrap_or_default();
            let deadline = Instant::now() + remaining.saturating_sub(DEADLINE_MARGIN);
            app.handle(event.payload, deadline).await
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

/// One record's outcome as JSON, as the invocation's answer and `POST /invoke` give it.
pub fn outcome_json(o: &EventOutcome) -> Value {
    let mut v = json!({
        "topic": &*o.topic,
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
        crate::Outcome::DeadLettered { reason } => v["reason"] = reason.as_str().into(),
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
        InvocationError::Unfinished(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's documented example of what an EventBridge rule's schedule delivers (the
    /// binary's tests send the same one).
    const SCHEDULED: &str = include_str!("fixtures/scheduled_event.json");

    #[test]
    fn a_scheduled_event_and_an_msk_event_are_told_apart() {
        let scheduled = Invocation::classify(serde_json::from_str(SCHEDULED).unwrap()).unwrap();
        assert_eq!(
            scheduled,
            Invocation::Scheduled { rule: Some("arn:aws:events:us-east-1:123456789012:rule/outbox-drain".into()) }
        );
        let msk =
            json!({"eventSource": "aws:kafka", "records": {"t-0": [{"topic": "t", "partition": 0, "offset": 1}]}});
        match Invocation::classify(msk).unwrap() {
            Invocation::Msk(e) => assert_eq!(e.len(), 1),
            other => panic!("expected an MSK event, got {other:?}"),
        }
    }

    #[test]
    fn any_other_payload_is_a_clear_error_that_quotes_no_values() {
        for (payload, says) in [
            (
                json!({"source": "aws.s3", "detail-type": "Object Created", "secret": "hunter2"}),
                "keys [detail-type, secret, source]",
            ),
            (
                json!({"source": "aws.events", "detail-type": "EC2 Instance State-change Notification"}),
                "keys [detail-type, source]",
            ),
            (json!({}), "keys [none]"),
            (json!([1, 2]), "an array"),
            (json!("hunter2"), "a string"),
            (json!({"records": "not a map"}), "an MSK event that does not parse"),
        ] {
            let e = Invocation::classify(payload.clone()).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(says), "{payload}: {text}");
            assert!(!text.contains("hunter2"), "values never appear: {text}");
            let d: lambda_runtime::Diagnostic = InvocationError::from(e).into();
            assert_eq!(d.error_type, "UnrecognisedEvent");
        }
    }
}
