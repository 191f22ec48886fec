//! One record's progress through a batch, and how a batch settles what it could not
//! finish.

use std::collections::HashSet;

use crate::event::{Event, PayloadHash};
use crate::event_id::EventId;
use crate::handler::HandlerError;
use crate::outcome::{DeadLetterReason, DuplicateTier, FailureKind, Outcome};

/// A record rejected before any handler saw it.
pub(super) struct Rejection {
    pub(super) reason: DeadLetterReason,
    pub(super) error: String,
}

/// One record's progress through the batch.
pub(super) struct Slot<'e> {
    pub(super) event: &'e Event,
    /// Its value as step 0 decoded it (framed for a registry); `None` for a plain value.
    pub(super) decoded: Option<serde_json::Value>,
    /// Its key as step 0 decoded it (keys framed for a registry); `None` for a plain key.
    pub(super) decoded_key: Option<serde_json::Value>,
    pub(super) id: EventId,
    /// Its v2 id, in the transition between id formats.
    pub(super) shadow: Option<EventId>,
    /// Why the record cannot be handled at all: undecodable, or no usable id (the id
    /// above is then a stand-in the dead letter is filed under).
    pub(super) invalid: Option<Rejection>,
    pub(super) hash: PayloadHash,
    /// Index of an earlier record with the same id.
    pub(super) leader: Option<usize>,
    /// We hold its Redis lease (of `id`) and must release it.
    pub(super) leased: bool,
    /// We hold the lease of `shadow`.
    pub(super) shadow_leased: bool,
    /// The lease step failed, so we may hold the leases of `id` and `shadow` without
    /// knowing it (a cluster step whose other buckets succeeded, or an answer lost on the
    /// way back): the release step offers them anyway (an id without a marker is
    /// compare-and-deleted, freeing only what our token holds; a confirmed id's marker is
    /// written whoever holds its key), so they do not block a retry until their TTL.
    pub(super) lease_unknown: bool,
    /// The hash Postgres or Redis recorded when this id was confirmed, if known.
    pub(super) confirmed_hash: Option<PayloadHash>,
    /// A handler failure waiting to be counted or dead-lettered.
    pub(super) failure: Option<HandlerError>,
    pub(super) outcome: Option<Outcome>,
}

impl Slot<'_> {
    /// Its ids: `id`, then the shadow if any.
    pub(super) fn ids(&self) -> impl Iterator<Item = &EventId> {
        std::iter::once(&self.id).chain(self.shadow.as_ref())
    }

    pub(super) fn is_open(&self) -> bool {
        self.outcome.is_none() && self.leader.is_none() && self.invalid.is_none() && self.failure.is_none()
    }

    pub(super) fn duplicate(&mut self, tier: DuplicateTier, confirmed: Option<PayloadHash>) {
        self.confirmed_hash = confirmed;
        self.outcome = Some(Outcome::Duplicate { tier, payload_mismatch: confirmed.is_some_and(|h| h != self.hash) });
    }

    pub(super) fn fail(&mut self, kind: FailureKind, error: impl Into<String>, attempts: Option<u32>) {
        self.outcome = Some(Outcome::Failed { kind, error: error.into(), attempts });
    }
}

pub(super) fn fail_all(slots: &mut [Slot<'_>], work: &[usize], kind: FailureKind, msg: &str) {
    for &i in work {
        slots[i].fail(kind, msg, None);
    }
}

/// The events left in `work` cannot be confirmed now (`msg`: a dependency failed); those
/// in `failed` keep their own errors.
pub(super) fn unconfirmed(slots: &mut [Slot<'_>], work: &[usize], failed: Vec<(usize, HandlerError)>, msg: &str) {
    let failed_ids: HashSet<usize> = failed.iter().map(|(i, _)| *i).collect();
    for &i in work {
        if !failed_ids.contains(&i) && slots[i].outcome.is_none() {
            slots[i].fail(FailureKind::Unavailable, msg, None);
        }
    }
    for (i, e) in failed {
        slots[i].failure = Some(e);
    }
}
