//! The batch's report: outcomes in record order, metrics added up per batch, one span
//! per event.

use std::collections::HashMap;

use super::slot::Slot;
use super::Guard;
use crate::metrics::metrics;
use crate::outcome::{BatchReport, EventOutcome, FailureKind, Outcome};

impl Guard {
    /// Metrics (added up per batch: one update per label set, not per event), one
    /// span per event, and the report.
    pub(super) fn report(&self, slots: Vec<Slot<'_>>) -> BatchReport {
        let ns = self.ns.as_str();
        let mut processed = 0u64;
        let mut duplicates: HashMap<&'static str, u64> = HashMap::new();
        let mut contention = 0u64;
        let mut failed: HashMap<&'static str, u64> = HashMap::new();
        let mut dead: HashMap<&'static str, u64> = HashMap::new();
        let mut mismatches = 0u64;
        // A batch is nearly always one topic: one shared copy of its name.
        let mut topic: Option<std::sync::Arc<str>> = None;
        let outcomes = slots
            .into_iter()
            .map(|s| {
                let outcome = s
                    .outcome
                    .unwrap_or(Outcome::Failed { kind: FailureKind::Unavailable, error: "not handled".into(), attempts: None });
                match &outcome {
                    Outcome::Processed => processed += 1,
                    Outcome::Duplicate { tier, payload_mismatch } => {
                        *duplicates.entry(tier.as_str()).or_default() += 1;
                        if *payload_mismatch {
                            mismatches += 1;
                            tracing::warn!(function = ns, event_id = %s.id, position = %s.event.position(), "duplicate id with a different payload than the confirmed event");
                        }
                    }
                    Outcome::InFlight => contention += 1,
                    Outcome::Failed { kind, error, .. } => {
                        *failed.entry(kind.as_str()).or_default() += 1;
                        tracing::debug!(function = ns, event_id = %s.id, %error, "event failed");
                    }
                    Outcome::DeadLettered { reason } => *dead.entry(reason.as_str()).or_default() += 1,
                }
                // One span per event: its id, function, position and outcome.
                let span = tracing::info_span!(
                    "event",
                    function = ns,
                    event_id = %s.id,
                    topic = %s.event.topic,
                    partition = s.event.partition,
                    offset = s.event.offset,
                    outcome = outcome.label(),
                );
                span.in_scope(|| tracing::debug!(detail = %outcome, "event finished"));
                let shared = match &topic {
                    Some(t) if **t == *s.event.topic => t.clone(),
                    _ => topic.insert(std::sync::Arc::from(s.event.topic.as_str())).clone(),
                };
                EventOutcome::in_topic(shared, s.event, s.invalid.is_none().then_some(s.id), outcome)
            })
            .collect();
        let m = metrics();
        if processed > 0 {
            m.processed.with_label_values(&[ns]).inc_by(processed);
        }
        let all_duplicates: u64 = duplicates.values().sum();
        if all_duplicates > 0 {
            m.deduplicated.with_label_values(&[ns]).inc_by(all_duplicates);
        }
        for (tier, n) in duplicates {
            m.duplicates.with_label_values(&[ns, tier]).inc_by(n);
        }
        if mismatches > 0 {
            m.payload_mismatch.with_label_values(&[ns]).inc_by(mismatches);
        }
        if contention > 0 {
            m.lease_contention.with_label_values(&[ns]).inc_by(contention);
        }
        for (kind, n) in failed {
            m.failed.with_label_values(&[ns, kind]).inc_by(n);
        }
        for (reason, n) in dead {
            m.dead_lettered.with_label_values(&[ns, reason]).inc_by(n);
        }
        BatchReport { outcomes }
    }
}
