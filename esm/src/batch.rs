//! What the mapping holds between Kafka and the function: the received, unfinished
//! records of each partition, the batch taken from them, and what an invocation's answer
//! does to them.
//!
//! Invariants:
//! - a partition's records leave its queue only from the front, in offset order, and
//!   only when an invocation succeeded for them or they are discarded (retries or age
//!   exhausted); the offset to commit is always one past the last record that left;
//! - a partition revoked (and perhaps assigned again) gets a new epoch; an answer about
//!   an older epoch changes nothing and commits nothing (its records are re-read from the
//!   committed offset by whoever owns the partition now);
//! - retries are counted per partition, against the record at its front: a record that
//!   keeps failing is retried `MaximumRetryAttempts` times (unbounded at -1), then
//!   discarded with the records after it in the failed batch, as Lambda does.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use exactly_once_core::event::Event;

/// A partition: topic and number.
pub type PartitionKey = (String, i32);

/// The batch-shaping settings (the template's names).
#[derive(Debug, Clone, Copy)]
pub struct BatchRules {
    /// Most records in one invocation (`BatchSize`).
    pub batch_size: usize,
    /// Most bytes of record values and keys in one invocation (Lambda's 6 MB payload
    /// limit, with room for the JSON around them).
    pub max_payload_bytes: usize,
    /// -1: unbounded.
    pub maximum_retry_attempts: i64,
    /// `None`: records never age out.
    pub maximum_record_age: Option<Duration>,
    /// Whether a failed batch is halved before it is retried
    /// (`BisectBatchOnFunctionError`).
    pub bisect_batch_on_function_error: bool,
}

#[derive(Debug, Default)]
struct Queue {
    records: VecDeque<Event>,
    epoch: u64,
    /// Failed invocations in a row that held this partition's front record.
    failures: u32,
    /// Bisection: the most records of this partition the next batch takes.
    cap: Option<usize>,
}

/// Every assigned partition's received and unfinished records.
#[derive(Debug, Default)]
pub struct Pending {
    queues: BTreeMap<PartitionKey, Queue>,
    next_epoch: u64,
    /// Where the next batch starts taking, so no partition starves the others.
    cursor: usize,
}

/// One invocation's records, partition by partition.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The partitions in the batch, each with its records.
    pub parts: Vec<BatchPart>,
}

/// One partition's share of a batch: consecutive records from the front of its queue.
#[derive(Debug, Clone)]
pub struct BatchPart {
    /// The partition.
    pub key: PartitionKey,
    epoch: u64,
    /// Its records, in offset order.
    pub records: Vec<Event>,
}

impl Batch {
    /// Records in the batch, over every partition.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.records.len()).sum()
    }

    /// Whether the batch holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every record of the batch, partition after partition.
    pub fn events(&self) -> Vec<Event> {
        self.parts.iter().flat_map(|p| p.records.iter().cloned()).collect()
    }
}

/// What an invocation said about its batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Every record succeeded.
    Succeeded,
    /// The whole batch failed (a function error, a timeout, a crash, a bad answer).
    Failed,
    /// `batchItemFailures`: per partition, the lowest offset named. Partitions not named
    /// succeeded.
    Partial(BTreeMap<PartitionKey, i64>),
}

/// Why records were discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardReason {
    /// A batch failed more than `MaximumRetryAttempts` times.
    RetryAttemptsExhausted,
    /// A failed record was older than `MaximumRecordAgeInSeconds`.
    RecordAgeExceeded,
}

impl DiscardReason {
    /// The condition name Lambda puts in its failure records.
    pub fn condition(self) -> &'static str {
        match self {
            Self::RetryAttemptsExhausted => "RetryAttemptsExhausted",
            Self::RecordAgeExceeded => "RecordAgeExceeded",
        }
    }
}

/// The effect of an answer: offsets to commit and records given up on.
#[derive(Debug, Default)]
pub struct Settled {
    /// Per partition, the next offset to read (what Kafka's commit stores).
    pub commits: Vec<(PartitionKey, i64)>,
    /// Records given up on, with why: they go to the destination before their offsets are
    /// committed.
    pub discarded: Vec<(DiscardReason, Vec<Event>)>,
    /// Records that succeeded and left their queues.
    pub succeeded: usize,
    /// Whether anything in the batch failed (so the next try should back off).
    pub failed: bool,
}

impl Pending {
    /// A partition was assigned: it starts empty under a new epoch.
    pub fn assign(&mut self, key: PartitionKey) {
        self.next_epoch += 1;
        self.queues.insert(key, Queue { epoch: self.next_epoch, ..Queue::default() });
    }

    /// A partition was revoked: what it held is dropped (its new owner re-reads it from
    /// the committed offset).
    pub fn revoke(&mut self, key: &PartitionKey) {
        self.queues.remove(key);
    }

    /// The assignment was lost as a whole (a failed rebalance): nothing is held.
    pub fn clear(&mut self) {
        self.queues.clear();
    }

    /// Records received. A record of a partition not assigned (a late delivery after a
    /// revoke) or at or before what the queue already holds is ignored: it is re-read.
    pub fn push(&mut self, event: Event) -> bool {
        let key = (event.topic.clone(), event.partition);
        let Some(q) = self.queues.get_mut(&key) else { return false };
        if q.records.back().is_some_and(|last| last.offset >= event.offset) {
            return false;
        }
        q.records.push_back(event);
        true
    }

    /// Partitions assigned to this mapping now.
    pub fn partitions(&self) -> usize {
        self.queues.len()
    }

    /// Records waiting, over every partition.
    pub fn len(&self) -> usize {
        self.queues.values().map(|q| q.records.len()).sum()
    }

    /// Whether no partition holds a record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether some front record has failed before (a retry is due).
    pub fn retrying(&self) -> bool {
        self.queues.values().any(|q| q.failures > 0 && !q.records.is_empty())
    }

    /// Drops front records of retried partitions older than the maximum age, as Lambda
    /// does before retrying them. Returns them with the offsets to commit past them.
    pub fn expire(&mut self, rules: &BatchRules, now_ms: i64) -> Settled {
        let mut settled = Settled::default();
        let Some(max_age) = rules.maximum_record_age else { return settled };
        let max_age = max_age.as_millis() as i64;
        for (key, q) in &mut self.queues {
            if q.failures == 0 {
                continue;
            }
            let mut gone = Vec::new();
            while q.records.front().is_some_and(|e| e.timestamp_ms.is_some_and(|ts| now_ms - ts > max_age)) {
                gone.extend(q.records.pop_front());
            }
            if let Some(last) = gone.last() {
                settled.commits.push((key.clone(), last.offset + 1));
                q.failures = 0;
                q.cap = None;
                settled.discarded.push((DiscardReason::RecordAgeExceeded, gone));
            }
        }
        settled
    }

    /// The next batch: up to `batch_size` records and `max_payload_bytes`, taken from the
    /// front of each partition in turn (never skipping a record of a partition).
    pub fn take(&mut self, rules: &BatchRules) -> Batch {
        let keys: Vec<PartitionKey> =
            self.queues.iter().filter(|(_, q)| !q.records.is_empty()).map(|(k, _)| k.clone()).collect();
        let mut parts: Vec<BatchPart> = Vec::new();
        if keys.is_empty() {
            return Batch { parts };
        }
        let start = self.cursor % keys.len();
        self.cursor = self.cursor.wrapping_add(1);
        let (mut total, mut bytes) = (0usize, 0usize);
        for key in keys[start..].iter().chain(&keys[..start]) {
            let q = &self.queues[key];
            let cap = q.cap.unwrap_or(usize::MAX);
            let mut records = Vec::new();
            for e in q.records.iter().take(cap) {
                let size = e.value.as_ref().map_or(0, |v| v.len()) + e.key.as_ref().map_or(0, |k| k.len());
                // Base64 grows the bytes by 4/3; one record always fits, alone if need be.
                let size = size * 4 / 3 + 256;
                if total >= rules.batch_size || (total > 0 && bytes + size > rules.max_payload_bytes) {
                    break;
                }
                total += 1;
                bytes += size;
                records.push(e.clone());
            }
            if !records.is_empty() {
                parts.push(BatchPart { key: key.clone(), epoch: q.epoch, records });
            }
            if total >= rules.batch_size {
                break;
            }
        }
        Batch { parts }
    }

    /// Applies an invocation's verdict to the records it was given.
    pub fn settle(&mut self, batch: &Batch, verdict: &Verdict, rules: &BatchRules) -> Settled {
        let mut settled = Settled::default();
        for part in &batch.parts {
            let Some(q) = self.queues.get_mut(&part.key) else { continue };
            if q.epoch != part.epoch {
                continue;
            }
            let first_failed = match verdict {
                Verdict::Succeeded => None,
                Verdict::Failed => Some(part.records[0].offset),
                Verdict::Partial(failed) => failed.get(&part.key).copied(),
            };
            // What succeeded leaves the queue.
            let boundary = first_failed.unwrap_or(i64::MAX);
            let mut last_done = None;
            while q.records.front().is_some_and(|e| e.offset < boundary && e.offset <= part.last_offset()) {
                last_done = q.records.pop_front().map(|e| e.offset);
                settled.succeeded += 1;
            }
            if last_done.is_some() {
                q.failures = 0;
                q.cap = None;
            }
            let Some(first_failed) = first_failed else {
                if let Some(o) = last_done {
                    settled.commits.push((part.key.clone(), o + 1));
                }
                continue;
            };
            settled.failed = true;
            q.failures += 1;
            let failed_here = part.records.iter().filter(|e| e.offset >= first_failed).count();
            if rules.bisect_batch_on_function_error && matches!(verdict, Verdict::Failed) && failed_here > 1 {
                q.cap = Some(failed_here.div_ceil(2));
            }
            let exhausted = rules.maximum_retry_attempts >= 0 && i64::from(q.failures) > rules.maximum_retry_attempts;
            if exhausted {
                let mut gone = Vec::new();
                while q.records.front().is_some_and(|e| e.offset <= part.last_offset()) {
                    gone.extend(q.records.pop_front());
                }
                if let Some(last) = gone.last() {
                    last_done = Some(last.offset);
                    settled.discarded.push((DiscardReason::RetryAttemptsExhausted, gone));
                }
                q.failures = 0;
                q.cap = None;
            }
            if let Some(o) = last_done {
                settled.commits.push((part.key.clone(), o + 1));
            }
        }
        settled
    }
}

impl BatchPart {
    fn last_offset(&self) -> i64 {
        self.records.last().map_or(i64::MIN, |e| e.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> BatchRules {
        BatchRules {
            batch_size: 10,
            max_payload_bytes: 6 << 20,
            maximum_retry_attempts: -1,
            maximum_record_age: None,
            bisect_batch_on_function_error: false,
        }
    }

    fn pending(partitions: &[(i32, std::ops::Range<i64>)]) -> Pending {
        let mut p = Pending::default();
        for (partition, offsets) in partitions {
            p.assign(("t".into(), *partition));
            for o in offsets.clone() {
                assert!(p.push(Event::new("t", *partition, o).with_value("x").with_timestamp_ms(o * 1000)));
            }
        }
        p
    }

    fn offsets(b: &Batch, partition: i32) -> Vec<i64> {
        b.parts.iter().filter(|p| p.key.1 == partition).flat_map(|p| p.records.iter().map(|e| e.offset)).collect()
    }

    #[test]
    fn a_batch_takes_at_most_the_batch_size_and_success_commits_one_past_the_last() {
        let mut p = pending(&[(0, 0..8), (1, 0..8)]);
        let b = p.take(&rules());
        assert_eq!(b.len(), 10);
        let s = p.settle(&b, &Verdict::Succeeded, &rules());
        assert_eq!(s.succeeded, 10);
        assert_eq!(p.len(), 6);
        for (key, next) in s.commits {
            assert_eq!(next, offsets(&b, key.1).last().unwrap() + 1);
        }
    }

    #[test]
    fn a_failed_batch_is_retried_whole_and_commits_nothing() {
        let mut p = pending(&[(0, 0..3)]);
        let b = p.take(&rules());
        let s = p.settle(&b, &Verdict::Failed, &rules());
        assert!(s.commits.is_empty() && s.failed && s.discarded.is_empty());
        assert_eq!(offsets(&p.take(&rules()), 0), vec![0, 1, 2]);
    }

    #[test]
    fn a_partial_answer_commits_before_the_lowest_failed_offset_and_retries_from_it() {
        let mut p = pending(&[(0, 0..6), (1, 0..2)]);
        let b = p.take(&rules());
        let failed = BTreeMap::from([(("t".to_owned(), 0), 3)]);
        let s = p.settle(&b, &Verdict::Partial(failed), &rules());
        let commits: BTreeMap<_, _> = s.commits.into_iter().collect();
        assert_eq!(commits[&("t".to_owned(), 0)], 3);
        assert_eq!(commits[&("t".to_owned(), 1)], 2);
        let again = p.take(&rules());
        assert_eq!(offsets(&again, 0), vec![3, 4, 5]);
        assert!(offsets(&again, 1).is_empty());
    }

    #[test]
    fn retries_exhausted_discard_the_failed_records_and_move_past_them() {
        let r = BatchRules { maximum_retry_attempts: 2, ..rules() };
        let mut p = pending(&[(0, 0..3)]);
        for attempt in 1..=3 {
            let b = p.take(&r);
            let s = p.settle(&b, &Verdict::Failed, &r);
            if attempt < 3 {
                assert!(s.discarded.is_empty(), "attempt {attempt}");
            } else {
                assert_eq!(s.discarded.len(), 1);
                assert_eq!(s.discarded[0].0, DiscardReason::RetryAttemptsExhausted);
                assert_eq!(s.commits, vec![(("t".to_owned(), 0), 3)]);
            }
        }
        assert!(p.is_empty());
    }

    #[test]
    fn unbounded_retries_never_discard() {
        let mut p = pending(&[(0, 0..3)]);
        for _ in 0..1000 {
            let b = p.take(&rules());
            assert!(p.settle(&b, &Verdict::Failed, &rules()).discarded.is_empty());
        }
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn bisection_halves_the_failing_partition_until_it_succeeds() {
        let r = BatchRules { bisect_batch_on_function_error: true, ..rules() };
        let mut p = pending(&[(0, 0..8)]);
        let b = p.take(&r);
        p.settle(&b, &Verdict::Failed, &r);
        let b = p.take(&r);
        assert_eq!(offsets(&b, 0), vec![0, 1, 2, 3]);
        p.settle(&b, &Verdict::Failed, &r);
        assert_eq!(offsets(&p.take(&r), 0), vec![0, 1]);
    }

    #[test]
    fn an_answer_about_a_revoked_partition_commits_nothing() {
        let mut p = pending(&[(0, 0..3)]);
        let b = p.take(&rules());
        p.revoke(&("t".into(), 0));
        p.assign(("t".into(), 0));
        assert!(p.push(Event::new("t", 0, 0)));
        let s = p.settle(&b, &Verdict::Succeeded, &rules());
        assert!(s.commits.is_empty());
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn only_retried_records_age_out() {
        let r = BatchRules { maximum_record_age: Some(Duration::from_secs(60)), ..rules() };
        let mut p = pending(&[(0, 0..3), (1, 0..3)]);
        let now = 1_000_000;
        assert!(p.expire(&r, now).discarded.is_empty(), "nothing failed yet");
        let b = p.take(&r);
        let failed = BTreeMap::from([(("t".to_owned(), 0), 0)]);
        p.settle(&b, &Verdict::Partial(failed), &r);
        let s = p.expire(&r, now);
        assert_eq!(s.discarded.len(), 1);
        assert_eq!(s.discarded[0].0, DiscardReason::RecordAgeExceeded);
        assert_eq!(s.commits, vec![(("t".to_owned(), 0), 3)]);
    }

    #[test]
    fn the_payload_limit_splits_batches_but_one_record_always_fits() {
        let r = BatchRules { max_payload_bytes: 1000, ..rules() };
        let mut p = Pending::default();
        p.assign(("t".into(), 0));
        for o in 0..3 {
            p.push(Event::new("t", 0, o).with_value(vec![b'x'; 2000]));
        }
        assert_eq!(p.take(&r).len(), 1);
    }

    #[test]
    fn records_of_unassigned_partitions_and_redeliveries_are_not_queued() {
        let mut p = pending(&[(0, 0..3)]);
        assert!(!p.push(Event::new("t", 5, 0)));
        assert!(!p.push(Event::new("t", 0, 2)));
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn partitions_follow_assignments_revokes_and_a_lost_assignment() {
        let mut p = Pending::default();
        assert_eq!(p.partitions(), 0);
        p.assign(("t".into(), 0));
        p.assign(("t".into(), 1));
        p.assign(("u".into(), 0));
        assert_eq!(p.partitions(), 3);
        p.revoke(&("t".into(), 1));
        assert_eq!(p.partitions(), 2);
        p.clear();
        assert_eq!(p.partitions(), 0);
    }
}
