//! What happened to each event of a batch.

use std::fmt;
use std::sync::Arc;

use crate::event::Event;
use crate::event_id::EventId;

/// Where a duplicate was caught.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DuplicateTier {
    /// The in-process cache of recently confirmed ids.
    Local,
    /// A Redis done marker.
    Redis,
    /// `processed_events`, before handling (Redis had lost the marker).
    Postgres,
    /// The confirm insert found the row: another holder confirmed first.
    Confirm,
    /// An earlier record of the same batch carries the same id.
    Batch,
}

impl DuplicateTier {
    /// The tier as a metric label: `local`, `redis`, `postgres`, `confirm` or `batch`.
    pub fn as_str(self) -> &'static str {
        match self {
            DuplicateTier::Local => "local",
            DuplicateTier::Redis => "redis",
            DuplicateTier::Postgres => "postgres",
            DuplicateTier::Confirm => "confirm",
            DuplicateTier::Batch => "batch",
        }
    }
}

/// Why an attempt failed, which decides what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The handler failed in a way worth retrying; counts toward dead-lettering.
    Retryable,
    /// The event can never succeed (bad input); dead-lettered at once.
    Permanent,
    /// A dependency is down or a deadline passed; retried later, not counted against
    /// the event (an outage must not dead-letter healthy events).
    Unavailable,
}

impl FailureKind {
    /// The kind as a metric label: `retryable`, `permanent` or `unavailable`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Retryable => "retryable",
            FailureKind::Permanent => "permanent",
            FailureKind::Unavailable => "unavailable",
        }
    }
}

/// What happened to one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled and confirmed now.
    Processed,
    /// Confirmed before; skipped. `payload_mismatch`: the confirmed event's payload
    /// differs from this one's (flagged, not silently skipped).
    Duplicate {
        /// Where it was caught.
        tier: DuplicateTier,
        /// Whether the payload differs from the confirmed one.
        payload_mismatch: bool,
    },
    /// Someone else holds the lease; retry later, do not commit past it.
    InFlight,
    /// Not confirmed; retry later, do not commit past it.
    Failed {
        /// What kind of failure, which decides what happens next.
        kind: FailureKind,
        /// What went wrong.
        error: String,
        /// Failed attempts counted so far, this one included; `None` when this one was
        /// not counted.
        attempts: Option<u32>,
    },
    /// Stored in the dead-letter table and confirmed as such.
    DeadLettered {
        /// Why.
        reason: DeadLetterReason,
    },
}

/// Why an event was dead-lettered. Stored, exported as a metric label and shown to
/// operators as [`DeadLetterReason::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// Failed `GUARD_MAX_ATTEMPTS` times (retryable failures, panics included).
    MaxAttempts,
    /// Its value is over `GUARD_MAX_VALUE_BYTES`.
    ValueTooLarge,
    /// ClickHouse rejected its rows as invalid data (not the server being unavailable).
    ClickHouseRejected,
    /// A copy of a duplicate whose payload differs from the confirmed event's, kept for
    /// inspection (`GUARD_DEAD_LETTER_PAYLOAD_MISMATCH`); nothing to replay.
    PayloadMismatch,
    /// No usable id: the id error's label (`id_header_missing`, `id_missing`, ...).
    NoId(&'static str),
    /// The record could not be decoded (`record_key_base64`, `record_value_base64`).
    Undecodable(&'static str),
    /// The handler refused it for good, with its own label (`payload_invalid`, ...).
    Refused(&'static str),
}

impl DeadLetterReason {
    /// The reason as stored in `dead_letters.reason` and in the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::MaxAttempts => "max_attempts",
            DeadLetterReason::ValueTooLarge => "value_too_large",
            DeadLetterReason::ClickHouseRejected => "clickhouse_rejected",
            DeadLetterReason::PayloadMismatch => "payload_mismatch",
            DeadLetterReason::NoId(label) | DeadLetterReason::Undecodable(label) | DeadLetterReason::Refused(label) => {
                label
            }
        }
    }

    /// The reason for a handler's permanent error: its label, or the variant the guard
    /// knows it by.
    pub fn refused(label: &'static str) -> Self {
        match label {
            "clickhouse_rejected" => DeadLetterReason::ClickHouseRejected,
            other => DeadLetterReason::Refused(other),
        }
    }
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of outcome an [`Outcome`] is, without its details (for counting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    /// [`Outcome::Processed`]: handled and confirmed now.
    Processed,
    /// [`Outcome::Duplicate`]: confirmed before, skipped.
    Duplicate,
    /// [`Outcome::InFlight`]: leased by someone else.
    InFlight,
    /// [`Outcome::Failed`]: not confirmed, to be retried.
    Failed,
    /// [`Outcome::DeadLettered`]: stored as a dead letter and confirmed as such.
    DeadLettered,
}

impl OutcomeKind {
    /// The label used in metrics, logs and JSON reports.
    pub fn label(self) -> &'static str {
        match self {
            OutcomeKind::Processed => "processed",
            OutcomeKind::Duplicate => "duplicate",
            OutcomeKind::InFlight => "in_flight",
            OutcomeKind::Failed => "failed",
            OutcomeKind::DeadLettered => "dead_lettered",
        }
    }
}

impl Outcome {
    /// The kind of outcome, without its details.
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Processed => OutcomeKind::Processed,
            Outcome::Duplicate { .. } => OutcomeKind::Duplicate,
            Outcome::InFlight => OutcomeKind::InFlight,
            Outcome::Failed { .. } => OutcomeKind::Failed,
            Outcome::DeadLettered { .. } => OutcomeKind::DeadLettered,
        }
    }

    /// Processed, duplicate or dead-lettered: the offset may move past this event.
    pub fn is_finished(&self) -> bool {
        matches!(self, Outcome::Processed | Outcome::Duplicate { .. } | Outcome::DeadLettered { .. })
    }

    /// The outcome's label: `processed`, `duplicate`, `in_flight`, `failed` or
    /// `dead_lettered`.
    pub fn label(&self) -> &'static str {
        self.kind().label()
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Failed { kind, error, .. } => write!(f, "failed ({}): {error}", kind.as_str()),
            Outcome::DeadLettered { reason } => write!(f, "dead-lettered ({reason})"),
            Outcome::Duplicate { tier, .. } => write!(f, "duplicate ({})", tier.as_str()),
            other => f.write_str(other.label()),
        }
    }
}

/// The outcome of one record, with where it came from.
#[derive(Debug, Clone)]
pub struct EventOutcome {
    /// The record's topic (shared by the batch's outcomes: one allocation, not one per
    /// record).
    pub topic: Arc<str>,
    /// The record's partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
    /// `None` when no id could be derived (the record was dead-lettered for it).
    pub event_id: Option<EventId>,
    /// What happened to it.
    pub outcome: Outcome,
}

impl EventOutcome {
    /// The outcome of `event`, with its position copied from it.
    pub fn new(event: &Event, event_id: Option<EventId>, outcome: Outcome) -> Self {
        Self::in_topic(Arc::from(event.topic.as_str()), event, event_id, outcome)
    }

    /// Like [`EventOutcome::new`], with the event's topic given (shared by a batch).
    pub fn in_topic(topic: Arc<str>, event: &Event, event_id: Option<EventId>, outcome: Outcome) -> Self {
        debug_assert_eq!(&*topic, event.topic.as_str());
        Self { topic, partition: event.partition, offset: event.offset, event_id, outcome }
    }
}

/// The outcomes of a batch, in the order the records were given.
#[derive(Debug, Clone, Default)]
pub struct BatchReport {
    /// One outcome per record.
    pub outcomes: Vec<EventOutcome>,
}

impl BatchReport {
    /// True when every record may be committed past.
    pub fn all_finished(&self) -> bool {
        self.outcomes.iter().all(|o| o.outcome.is_finished())
    }

    /// How many records ended with an outcome of this kind.
    pub fn count(&self, kind: OutcomeKind) -> usize {
        self.outcomes.iter().filter(|o| o.outcome.kind() == kind).count()
    }

    /// Records that must be retried.
    pub fn unfinished(&self) -> impl Iterator<Item = &EventOutcome> {
        self.outcomes.iter().filter(|o| !o.outcome.is_finished())
    }
}
