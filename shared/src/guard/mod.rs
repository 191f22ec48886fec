//! The guard protocol (docs/DESIGN.md), batched. A single event is a batch of one.
//!
//! [`Guard::run_batch`] walks the steps in order, each one round trip per batch:
//!
//! 0. derive each record's id; records with no usable id go to the dead letters;
//!    records repeating an id earlier in the batch follow that record's fate;
//! 1. duplicates: the in-process cache (no round trip), then Redis done markers,
//! 2. leases: in the same Redis call as the markers (`SET NX PX GET` per id, pipelined:
//!    one operation takes a missing key or reads a marker or lease);
//! 3. durable check: Postgres `processed_events` (Redis may have lost markers), sent
//!    concurrently with the Redis call;
//! 4. handle: handlers run, their ClickHouse rows staged; the first handler that touches
//!    Postgres begins the batch transaction (handlers without Postgres effects need none);
//! 5. confirm: `INSERT ... UNNEST ... ON CONFLICT DO NOTHING` in that transaction, then
//!    the ClickHouse write, then commit; without a transaction, ClickHouse first and then
//!    the confirm on its own (autocommit);
//! 6. release: done markers written over their ids' keys (plain `SET`s, pipelined) and
//!    the other leases compare-and-deleted (a script beside them), one round trip;
//!    confirmed ids remembered locally.
//!
//! In the transition between id formats (`EVENT_ID_FORMAT=v1+v2`, see
//! [`IdFormats::V1AndV2`]) an event carries two ids, its v1 id (by which it is handled,
//! counted and dead-lettered) and its v2 id (its shadow): each step above checks, leases
//! and confirms both, so processes on either format fence each other.
//!
//! Invariants:
//! - Postgres is the truth: a handler's Postgres effects commit only together with the
//!   event's confirm row, and the primary key on `(namespace, event_id)` lets only one
//!   confirm succeed. If the confirm finds a row (someone else confirmed first, e.g.
//!   after our lease expired), the transaction rolls back and the batch is handled
//!   again without that event, so its effects apply once.
//! - ClickHouse is written before the confirm commits: a crash between the two leaves
//!   rows that the retry writes again and the ReplacingMergeTree collapses; the reverse
//!   order could confirm an event whose rows were never written.
//! - Redis is never needed for correctness: when it fails (or its breaker is open) the
//!   batch goes on without leases, on Postgres alone.
//! - An event whose lease someone else holds is `InFlight`, never skipped: the caller
//!   must not commit past it.

mod decode;
mod id_formats;
pub mod lease;
pub mod ledger;
pub mod local_cache;
mod report;
mod slot;

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foldhash::fast::RandomState;
use futures::FutureExt;
use sha2::{Digest, Sha256};
use sqlx::pool::PoolConnection;
use sqlx::{PgPool, Postgres};
use tokio::time::Instant;
use tracing::Instrument;

use crate::clients::Clients;
use crate::config::GuardConfig;
use crate::event::{Event, PayloadHash, Record};
use crate::event_id::{EventId, IdError, IdFormats, IdStrategy, Namespace};
use crate::handler::{Handler, HandlerContext, HandlerError};
use crate::metrics::metrics;
use crate::outcome::{BatchReport, DeadLetterReason, DuplicateTier, FailureKind, Outcome};
use crate::payload::ValueFormat;
use crate::registry::SchemaRegistry;
use crate::sink::{ClickHouseSink, SinkBatch, SinkError};

use self::decode::{Decoded, InflateBudget, Part};
use self::lease::{LeaseError, LeaseReply, Leases, Release};
use self::ledger::{ConfirmRow, DeadLetterRow};
use self::local_cache::LocalCache;
use self::slot::{fail_all, unconfirmed, Rejection, Slot};
use crate::transaction::LazyTx;

/// Round trips made by one guard, for tests and the benchmark.
#[derive(Debug, Default)]
pub struct RoundTrips {
    redis: AtomicU64,
    postgres: AtomicU64,
}

impl RoundTrips {
    /// Round trips to Redis so far.
    pub fn redis(&self) -> u64 {
        self.redis.load(Ordering::Relaxed)
    }
    /// Round trips to Postgres so far.
    pub fn postgres(&self) -> u64 {
        self.postgres.load(Ordering::Relaxed)
    }
}

/// One function's guard. Cheap to share (`Arc`); one per function per process.
pub struct Guard {
    ns: Namespace,
    ids: IdStrategy,
    config: GuardConfig,
    pg: PgPool,
    leases: Arc<Leases>,
    sink: Arc<ClickHouseSink>,
    cache: LocalCache,
    round_trips: Arc<RoundTrips>,
    /// Deferred release steps in flight hold a permit each (`GUARD_DEFERRED_RELEASES`).
    deferred: Arc<tokio::sync::Semaphore>,
    /// The id formats in use (see `id_formats.rs`).
    formats: Mutex<id_formats::FormatState>,
    /// Held while `auto` asks the ledger, so one batch asks and the others wait for its
    /// answer (the first time) or go on with the last one (later).
    format_check: tokio::sync::Mutex<()>,
    /// Check nothing: the benchmark's baseline (feature `pass-through`).
    pass_through: bool,
    /// How record values are written; framed ones are decoded in step 0.
    values: ValueFormat,
    /// How record keys are written; framed ones are decoded in step 0 too.
    keys: ValueFormat,
    registry: Arc<SchemaRegistry>,
}

impl Guard {
    /// The guard of the function `namespace`; fails if the name is not a valid
    /// [`Namespace`].
    pub fn new(clients: &Clients, namespace: &str, ids: IdStrategy, config: GuardConfig) -> Result<Self, IdError> {
        let id_format = config.id_format;
        let deferred = config.deferred_releases;
        Ok(Self {
            ns: Namespace::new(namespace)?,
            ids,
            cache: LocalCache::new(config.local_cache_ttl, config.local_cache_max_bytes),
            config,
            pg: clients.pg.clone(),
            leases: clients.leases.clone(),
            sink: clients.sink.clone(),
            round_trips: Arc::default(),
            deferred: Arc::new(tokio::sync::Semaphore::new(deferred)),
            format_check: tokio::sync::Mutex::new(()),
            formats: Mutex::new(id_formats::FormatState::new(id_format)),
            pass_through: false,
            values: ValueFormat::Json,
            keys: ValueFormat::Json,
            registry: clients.registry.clone(),
        })
    }

    /// Sets how the function's record values are written (its
    /// [`FunctionSpec::value_format`](crate::handler::FunctionSpec)): values framed for a
    /// schema registry are decoded before ids are derived, and handlers read them with
    /// [`HandlerContext::payload`].
    pub fn with_values(mut self, format: ValueFormat) -> Self {
        self.values = format;
        self
    }

    /// Sets how the function's record keys are written
    /// ([`FunctionSpec::key_format`](crate::handler::FunctionSpec)): keys framed for a
    /// schema registry are decoded with the values (same lookups, same outcomes, errors
    /// prefixed `key:`), and handlers read them with `ctx.key()`.
    pub fn with_keys(mut self, format: ValueFormat) -> Self {
        self.keys = format;
        self
    }

    /// Turns this guard into a pass-through that checks nothing: every record is
    /// handled and its rows written, with no lease, no ledger lookup or confirm, no
    /// cache and no dedup within a batch. What is left is the pipeline the guard sits
    /// in, so a benchmark can measure the guard's own cost against the same worker.
    /// Never use it to run a function.
    #[cfg(feature = "pass-through")]
    pub fn make_pass_through(&mut self) {
        self.pass_through = true;
    }

    /// The pass-through's batch: ids (the handlers need them), handlers, rows.
    async fn run_unchecked(&self, handler: &dyn Handler, items: Vec<(&Event, Option<Rejection>)>) -> BatchReport {
        let mut slots = self.decode_and_derive_ids(items, IdFormats::V2).await;
        for slot in &mut slots {
            slot.leader = None;
        }
        self.handle_and_confirm(handler, &mut slots, None, true).await;
        for slot in &mut slots {
            if let Some(e) = slot.failure.take() {
                slot.fail(e.kind(), e.to_string(), None);
            }
            if let Some(r) = slot.invalid.take() {
                slot.fail(FailureKind::Permanent, r.error, None);
            }
        }
        self.report(slots)
    }

    /// The function's namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// The round trips this guard has made.
    pub fn round_trips(&self) -> &RoundTrips {
        &self.round_trips
    }

    /// This guard's in-process cache of confirmed ids.
    pub fn local_cache(&self) -> &LocalCache {
        &self.cache
    }

    /// Forgets `id` in this process's cache (a dead letter about to be replayed; the
    /// caller removes the Postgres confirmation and the Redis marker).
    pub fn forget(&self, id: &EventId) {
        self.cache.remove(id);
    }

    fn count_redis(&self) {
        count_redis(&self.round_trips, &self.ns);
    }

    fn count_postgres(&self, n: u64) {
        self.round_trips.postgres.fetch_add(n, Ordering::Relaxed);
        metrics().round_trips.with_label_values(&[self.ns.as_str(), "postgres"]).inc_by(n);
    }

    /// Runs the protocol over `events`. `deadline` caps the lease TTL (on Lambda, the
    /// invocation's deadline). Returns one outcome per record, in order.
    pub async fn run_batch(&self, handler: &dyn Handler, events: &[Event], deadline: Option<Instant>) -> BatchReport {
        self.run(handler, events.iter().map(|e| (e, None)).collect(), deadline, false).await
    }

    /// Like [`Guard::run_batch`], as the worker runs it: when every event of the batch
    /// finished (processed, duplicate or dead-lettered), the answer does not wait for
    /// the release step (done markers and lease release); it goes out after, at most
    /// `GUARD_DEFERRED_RELEASES` at once. [`Guard::flush_releases`] waits for them.
    ///
    /// Why this keeps the protocol's invariants: the release still follows the confirm's
    /// commit, so no lease is freed before its event is durably confirmed; what is late
    /// is only the moment other consumers see the lease gone or the done marker set.
    /// Until then a redelivery of such an id finds the lease busy and the ledger's
    /// confirm, and is a duplicate (the durable check decides); this process itself
    /// finds it in its local cache. A process dying with releases in flight leaves
    /// leases that expire after their TTL and no done markers, exactly as a death between
    /// the commit and an inline release does. A batch with a failure or an event in
    /// flight releases before answering, so its retry never meets its own lease.
    pub async fn run_batch_deferring_release(&self, handler: &dyn Handler, events: &[Event]) -> BatchReport {
        let defer = self.config.deferred_releases > 0;
        self.run(handler, events.iter().map(|e| (e, None)).collect(), None, defer).await
    }

    /// Waits until every deferred release step of this guard has been sent and answered
    /// (or failed): before a worker stops, so the leases of what it finished are free
    /// for the next owner at once.
    pub async fn flush_releases(&self) {
        let n = u32::try_from(self.config.deferred_releases).unwrap_or(u32::MAX);
        if n > 0 {
            // Never closed, so this only waits.
            let _all = self.deferred.acquire_many(n).await;
        }
    }

    /// Like [`Guard::run_batch`], for records as a runtime decoded them: undecodable
    /// ones go to the dead letters with their reason.
    pub async fn run_records(
        &self,
        handler: &dyn Handler,
        records: &[Record],
        deadline: Option<Instant>,
    ) -> BatchReport {
        let items = records
            .iter()
            .map(|r| match r {
                Record::Ok(e) => (e, None),
                Record::Invalid { event, reason, error } => {
                    (event, Some(Rejection { reason: DeadLetterReason::Undecodable(reason), error: error.clone() }))
                }
            })
            .collect();
        self.run(handler, items, deadline, false).await
    }

    async fn run(
        &self,
        handler: &dyn Handler,
        items: Vec<(&Event, Option<Rejection>)>,
        deadline: Option<Instant>,
        defer_release: bool,
    ) -> BatchReport {
        let span = tracing::info_span!("guard.batch", function = %self.ns, size = items.len());
        async move {
            if self.pass_through {
                return self.run_unchecked(handler, items).await;
            }
            let (formats, undecided) = match self.batch_id_formats().await {
                Ok(formats) => (formats, None),
                Err(e) => (IdFormats::V2, Some(e)),
            };
            // Rows of every format but v1 are known by their v2 id too.
            let v2_known = formats != IdFormats::V1;
            let mut slots = self.decode_and_derive_ids(items, formats).await;
            if let Some(e) = undecided {
                // Not knowing which ids to write, write none: the batch is retried.
                for slot in &mut slots {
                    slot.fail(FailureKind::Unavailable, format!("Postgres: cannot tell the id format yet: {e}"), None);
                }
                return self.report(slots);
            }
            self.check_local_cache(&mut slots);
            let token = uuid::Uuid::new_v4().to_string();
            let conn = self.check_stores(&mut slots, &token, deadline).await;
            self.handle_and_confirm(handler, &mut slots, conn, v2_known).await;
            self.settle_failures(&mut slots, &token, v2_known).await;
            let all_finished =
                slots.iter().all(|s| s.leader.is_some() || s.outcome.as_ref().is_some_and(Outcome::is_finished));
            if defer_release && all_finished {
                self.release_later(&slots, token).await;
            } else {
                self.release(&slots, &token).await;
            }
            self.remember(&slots);
            self.resolve_followers(&mut slots);
            self.dead_letter_mismatches(&slots, v2_known).await;
            self.report(slots)
        }
        .instrument(span)
        .await
    }

    /// Step 0: values decoded (when framed for a registry), ids (in `formats`), and which
    /// records repeat an earlier record's id (by the id they are handled under: equal v2
    /// ids imply equal v1 ids).
    async fn decode_and_derive_ids<'e>(
        &self,
        mut items: Vec<(&'e Event, Option<Rejection>)>,
        formats: IdFormats,
    ) -> Vec<Slot<'e>> {
        let mut budget = InflateBudget::new(self.config.max_batch_decompressed_bytes, self.config.max_value_bytes);
        let decoded = self.decode(&mut items, Part::Value, &mut budget, None).await;
        let keys = match self.keys {
            ValueFormat::Json => None,
            _ => Some(self.decode(&mut items, Part::Key, &mut budget, Some(&decoded)).await),
        };
        self.derive_ids(items, decoded, keys, formats)
    }

    fn derive_ids<'e>(
        &self,
        items: Vec<(&'e Event, Option<Rejection>)>,
        decoded: Vec<Decoded>,
        keys: Option<Vec<Decoded>>,
        formats: IdFormats,
    ) -> Vec<Slot<'e>> {
        let mut slots = Vec::with_capacity(items.len());
        let mut keys = keys.map(Vec::into_iter);
        for ((event, rejected), decoded) in items.into_iter().zip(decoded) {
            let (decoded, unavailable) = match decoded {
                Decoded::Raw => (None, None),
                Decoded::Value(v) => (Some(v), None),
                Decoded::Unavailable(e) => (None, Some(e)),
            };
            // The key, when the function's keys are framed too: its schema unavailable
            // makes the record wait as the value's would.
            let (decoded_key, unavailable) = match keys.as_mut().and_then(Iterator::next) {
                Some(Decoded::Value(k)) => (Some(k), unavailable),
                Some(Decoded::Unavailable(e)) => (None, unavailable.or(Some(format!("key: {e}")))),
                Some(Decoded::Raw) | None => (None, unavailable),
            };
            // A rejected record, or one without a usable id, is filed under its position.
            let stand_in = || EventId::new(format!("invalid:{}", event.position())).expect("non-empty");
            let too_large = event.value_bytes().len() > self.config.max_value_bytes;
            let rejected = rejected.or_else(|| {
                too_large.then(|| Rejection {
                    reason: DeadLetterReason::ValueTooLarge,
                    error: format!(
                        "value is {} bytes, over GUARD_MAX_VALUE_BYTES={}",
                        event.value_bytes().len(),
                        self.config.max_value_bytes
                    ),
                })
            });
            let (id, shadow, invalid) = match rejected {
                Some(r) => (stand_in(), None, Some(r)),
                // Not decoded yet (the registry could not answer): no id can be read, and
                // the record is retried, not filed.
                None if unavailable.is_some() => {
                    (EventId::new(format!("undecoded:{}", event.position())).expect("non-empty"), None, None)
                }
                None => match self.ids.derive_decoded(event, decoded.as_ref(), formats) {
                    // A content hash is the same text in both formats: one id.
                    Ok((id, shadow)) => {
                        let shadow = shadow.filter(|s| *s != id);
                        (id, shadow, None)
                    }
                    Err(e) => (
                        stand_in(),
                        None,
                        Some(Rejection { reason: DeadLetterReason::NoId(e.reason()), error: e.to_string() }),
                    ),
                },
            };
            let mut slot = Slot {
                event,
                decoded,
                decoded_key,
                hash: event.payload_hash(),
                id,
                shadow,
                invalid,
                leader: None,
                leased: false,
                shadow_leased: false,
                lease_unknown: false,
                confirmed_hash: None,
                failure: None,
                outcome: None,
            };
            if let Some(e) = unavailable {
                slot.fail(FailureKind::Unavailable, e, None);
            }
            slots.push(slot);
        }
        // Leaders: the first record of each id (ids borrowed, not copied).
        let leaders: Vec<(usize, usize)> = {
            let mut first_seen: HashMap<&EventId, usize, RandomState> =
                HashMap::with_capacity_and_hasher(slots.len(), RandomState::default());
            slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.invalid.is_none() && s.outcome.is_none())
                .filter_map(|(i, s)| match first_seen.entry(&s.id) {
                    Entry::Occupied(l) => Some((i, *l.get())),
                    Entry::Vacant(v) => {
                        v.insert(i);
                        None
                    }
                })
                .collect()
        };
        for (i, l) in leaders {
            slots[i].leader = Some(l);
        }
        slots
    }

    /// Step 1a: ids confirmed recently by this process cost no round trip.
    fn check_local_cache(&self, slots: &mut [Slot<'_>]) {
        if !self.cache.is_enabled() {
            return;
        }
        let asked: Vec<(usize, &EventId)> = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_open())
            .flat_map(|(i, s)| s.ids().map(move |id| (i, id)))
            .collect();
        let mut hits: Vec<(usize, PayloadHash)> = Vec::new();
        self.cache.get_many(asked.iter().map(|&(_, id)| id), |k, hash| hits.push((asked[k].0, hash)));
        drop(asked);
        for (i, hash) in hits {
            // An event's first id found wins (its second is in the same state).
            if slots[i].is_open() {
                slots[i].duplicate(DuplicateTier::Local, Some(hash));
            }
        }
    }

    /// Steps 1b to 3: Redis (done markers, leases; one call) and the Postgres durable
    /// check (one statement), sent concurrently so a batch waits for one round trip
    /// instead of two. Postgres is asked about every open id before the leases are known;
    /// its answer counts only for the ids we lease (or, Redis down, all of them). A
    /// confirm landing between that answer and our lease can only make us handle an
    /// event the confirm then finds taken: the fence, not the order, keeps it once.
    /// Returns the pooled connection the batch goes on with.
    async fn check_stores(
        &self,
        slots: &mut [Slot<'_>],
        token: &str,
        deadline: Option<Instant>,
    ) -> Option<PoolConnection<Postgres>> {
        let open: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_open()).collect();
        if open.is_empty() {
            return None;
        }
        let mut ttl = self.config.lease_ttl;
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left < Duration::from_millis(1) {
                for &i in &open {
                    slots[i].fail(FailureKind::Unavailable, "deadline passed before the event could be leased", None);
                }
                return None;
            }
            ttl = ttl.min(left);
        }
        // Every id of the open records, each once (in the transition an event's shadow
        // could spell another event's v1 id; asked twice, Redis would find the second
        // lease busy with ourselves, on every retry). `slot_keys[n]`: where the ids of
        // `open[n]` are in `ids`.
        let mut ids: Vec<&EventId> = Vec::with_capacity(open.len());
        let mut index: HashMap<&EventId, usize, RandomState> =
            HashMap::with_capacity_and_hasher(open.len(), RandomState::default());
        let mut key = |id| {
            *index.entry(id).or_insert_with(|| {
                ids.push(id);
                ids.len() - 1
            })
        };
        let slot_keys: Vec<(usize, Option<usize>)> =
            open.iter().map(|&i| (key(&slots[i].id), slots[i].shadow.as_ref().map(&mut key))).collect();
        drop(index);
        let redis = self.leases.acquire(&self.ns, &ids, token, ttl);
        let postgres = async {
            let mut conn = self.pg.acquire().await?;
            let entries = ledger::lookup(&mut conn, &self.ns, &ids).await?;
            Ok::<_, sqlx::Error>((conn, entries))
        };
        let (replies, looked) = tokio::join!(redis, postgres);
        drop(ids);
        self.count_postgres(1);

        // Redis first: a done marker settles the record; someone else's lease settles
        // it unless the ledger has its confirm (the holder committed and its release
        // has not landed yet: a duplicate, not an event in flight).
        let mut busy: Vec<usize> = Vec::new();
        if !matches!(replies, Err(LeaseError::BreakerOpen(_))) {
            self.count_redis();
        }
        match replies {
            Ok(replies) => {
                for (&i, &(p, shadow)) in open.iter().zip(&slot_keys) {
                    let slot = &mut slots[i];
                    let primary = &replies[p];
                    let second = shadow.map(|k| &replies[k]);
                    // Leases we got are ours to release, whatever the other id says.
                    slot.leased = matches!(primary, LeaseReply::Acquired);
                    slot.shadow_leased = matches!(second, Some(LeaseReply::Acquired));
                    let done = [Some(primary), second].into_iter().flatten().find_map(|r| match r {
                        LeaseReply::Done(hash) => Some(*hash),
                        _ => None,
                    });
                    if let Some(hash) = done {
                        slot.duplicate(DuplicateTier::Redis, hash);
                    } else if matches!(primary, LeaseReply::Busy) || matches!(second, Some(LeaseReply::Busy)) {
                        busy.push(i);
                    }
                }
            }
            // No lease information: go on without leases; Postgres keeps it exactly once.
            Err(LeaseError::BreakerOpen(_)) => {}
            Err(e) => {
                tracing::warn!(function = %self.ns, error = %e, "Redis unavailable; continuing on Postgres alone");
                for &i in &open {
                    slots[i].lease_unknown = true;
                }
            }
        }

        // Then the durable check, for what is still open.
        match looked {
            Ok((conn, confirmed)) => {
                for &i in &open {
                    if !slots[i].is_open() {
                        continue;
                    }
                    let found = slots[i].ids().find_map(|id| confirmed.get(id.as_str())).copied();
                    if let Some(hash) = found {
                        slots[i].duplicate(DuplicateTier::Postgres, hash);
                    } else if busy.binary_search(&i).is_ok() {
                        slots[i].outcome = Some(Outcome::InFlight);
                    }
                }
                Some(conn)
            }
            Err(e) => {
                for &i in &busy {
                    slots[i].outcome = Some(Outcome::InFlight);
                }
                let msg = format!("Postgres: durable check failed: {e}");
                for &i in &open {
                    if slots[i].is_open() {
                        slots[i].fail(FailureKind::Unavailable, msg.clone(), None);
                    }
                }
                None
            }
        }
    }

    /// Steps 4 and 5, part by part: handle, then confirm. A confirm that had to roll
    /// back (events confirmed elsewhere first, rows ClickHouse rejects) runs the part
    /// again without those events.
    ///
    /// A transaction holds at most `GUARD_MAX_SUBTRANSACTIONS` handler savepoints: when
    /// a part of the batch reaches it, that part is confirmed and committed, and the rest
    /// goes on in a new transaction (each part keeps the protocol's order on its own).
    async fn handle_and_confirm(
        &self,
        handler: &dyn Handler,
        slots: &mut [Slot<'_>],
        conn: Option<PoolConnection<Postgres>>,
        v2_known: bool,
    ) {
        let mut work: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_open()).collect();
        if work.is_empty() {
            return;
        }
        let conn = match conn {
            Some(c) => c,
            None => match self.pg.acquire().await {
                Ok(c) => c,
                Err(e) => return fail_all(slots, &work, FailureKind::Unavailable, &format!("Postgres: {e}")),
            },
        };
        let mut tx = LazyTx::new(conn);
        let mut failed: Vec<(usize, HandlerError)> = Vec::new();
        while !work.is_empty() {
            tx.round_trips = 0;
            let part = match self.handle(handler, slots, &work, &mut tx).await {
                Ok(part) => part,
                Err(msg) => {
                    self.rollback(&mut tx).await;
                    return fail_all(slots, &work, FailureKind::Unavailable, &msg);
                }
            };
            let part_len = part.len;
            match self.confirm(slots, &mut tx, part, v2_known).await {
                PartEnd::Done { failed: part_failed } => {
                    failed.extend(part_failed);
                    work.drain(..part_len);
                }
                PartEnd::Again { without, failed: settled } => {
                    work.retain(|i| !without.contains(i));
                    failed.extend(settled);
                }
                PartEnd::Stopped { error, failed: part_failed } => {
                    failed.extend(part_failed);
                    return unconfirmed(slots, &work, failed, &error);
                }
            }
        }
        for (i, e) in failed {
            slots[i].failure = Some(e);
        }
    }

    /// Step 4: handlers in record order, from the start of `work` until the part's
    /// savepoints reach the cap; their ClickHouse rows staged, their Postgres effects in
    /// `tx` (the first handler that touches Postgres begins it). `Err`: a savepoint
    /// failed, the transaction is unusable.
    async fn handle(
        &self,
        handler: &dyn Handler,
        slots: &[Slot<'_>],
        work: &[usize],
        tx: &mut LazyTx,
    ) -> Result<Handled, String> {
        let mut part = Handled {
            len: 0,
            staged: SinkBatch::default(),
            succeeded: Vec::with_capacity(work.len()),
            failed: Vec::new(),
        };
        let mut savepoints = 0usize;
        for &i in work {
            if savepoints >= self.config.max_subtransactions {
                break;
            }
            part.len += 1;
            let slot = &slots[i];
            let mut ctx = HandlerContext::new(
                slot.event,
                slot.decoded.as_ref(),
                slot.decoded_key.as_ref(),
                &slot.id,
                &self.ns,
                tx,
                &self.sink,
            );
            let result = self.call(handler, slot, &mut ctx).await;
            let handler_ok = result.is_ok();
            let (result, used_savepoint) = ctx
                .finish(result, &mut part.staged, i)
                .await
                .map_err(|e| format!("Postgres: savepoint failed: {e}"))?;
            if used_savepoint {
                savepoints += 1;
                self.count_postgres(match (handler_ok, result.is_ok()) {
                    (true, true) => 2,
                    (false, _) => 3,
                    (true, false) => 4,
                });
            }
            match result {
                Ok(()) => part.succeeded.push(i),
                Err(e) => {
                    if handler_ok {
                        tracing::warn!(function = %self.ns, event_id = %slot.id, position = %slot.event.position(), error = %e, "event failed after its handler returned");
                    }
                    part.failed.push((i, e))
                }
            }
        }
        Ok(part)
    }

    /// Runs the handler on one event. A panicking handler fails its own event
    /// (retryable: counted, and dead-lettered after its attempts), not the batch, the
    /// partition or the process.
    async fn call(
        &self,
        handler: &dyn Handler,
        slot: &Slot<'_>,
        ctx: &mut HandlerContext<'_>,
    ) -> Result<(), HandlerError> {
        let span = tracing::debug_span!("handler", function = %self.ns, event_id = %slot.id);
        match AssertUnwindSafe(handler.handle(slot.event, ctx).instrument(span)).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                let message = panic_message(panic.as_ref());
                tracing::error!(
                    function = %self.ns,
                    event_id = %slot.id,
                    position = %slot.event.position(),
                    panic = %message,
                    "handler panicked; counted as a failed attempt"
                );
                Err(HandlerError::retryable(format!("handler panicked: {message}")))
            }
        }
    }

    /// Step 5 for one handled part.
    ///
    /// When a handler touched Postgres, its effects and the confirm share one
    /// transaction: confirm, then ClickHouse, then commit; a confirm that finds ids
    /// confirmed elsewhere rolls everything back and the part runs again without them.
    /// When no handler touched Postgres there is nothing to roll back: ClickHouse is
    /// written first, then the confirm autocommits (two round trips fewer); ids it finds
    /// confirmed elsewhere are duplicates, and their repeated rows collapse.
    ///
    /// Rows ClickHouse rejects (the data, not the server: see [`SinkError::Rejected`])
    /// are traced to their events by splitting the write; those events fail permanently
    /// (dead-lettered as `clickhouse_rejected`) and the others go on.
    async fn confirm(&self, slots: &mut [Slot<'_>], tx: &mut LazyTx, part: Handled, v2_known: bool) -> PartEnd {
        let Handled { staged, mut succeeded, mut failed, .. } = part;
        if succeeded.is_empty() {
            self.rollback(tx).await;
            return PartEnd::Done { failed };
        }
        let transactional = tx.is_open();

        if !transactional {
            // No Postgres effects: ClickHouse first, then the confirm autocommits.
            match self.write_rows(&staged, &succeeded, slots).await {
                Ok(rejected) => {
                    succeeded.retain(|i| !rejected.iter().any(|(r, _)| r == i));
                    failed.extend(rejected);
                }
                Err(e) => return PartEnd::Stopped { error: e.to_string(), failed },
            }
            if succeeded.is_empty() {
                return PartEnd::Done { failed };
            }
        }

        // The confirm: every id of every event (two in the transition between id
        // formats), in the transaction when there is one. (Nothing in a pass-through.)
        if !self.pass_through {
            let rows: Vec<ConfirmRow<'_>> = succeeded
                .iter()
                .flat_map(|&i| slots[i].ids().map(move |id| (i, id)))
                .map(|(i, id)| ConfirmRow { id, event: slots[i].event, hash: slots[i].hash })
                .collect();
            self.count_postgres(1);
            let confirmed = ledger::confirm(tx.conn(), &self.ns, &rows, v2_known).await;
            drop(rows);
            let taken: HashSet<String, RandomState> = match confirmed {
                Ok(ids) => ids.into_iter().collect(),
                Err(e) => {
                    self.rollback(tx).await;
                    return PartEnd::Stopped { error: format!("Postgres: confirm failed: {e}"), failed };
                }
            };
            // Confirmed here only if every id of the event was (in the transition, a process
            // on either format may have confirmed one of them first).
            let conflicts: Vec<usize> = if taken.is_empty() {
                Vec::new()
            } else {
                succeeded.iter().copied().filter(|&i| slots[i].ids().any(|id| taken.contains(id.as_str()))).collect()
            };
            if !conflicts.is_empty() {
                tracing::info!(function = %self.ns, conflicts = conflicts.len(), transactional, "confirmed elsewhere first");
                for &i in &conflicts {
                    slots[i].duplicate(DuplicateTier::Confirm, None);
                }
                if transactional {
                    // Their effects are in our transaction: roll everything back and run the
                    // part again without them.
                    self.rollback(tx).await;
                    return PartEnd::Again { without: conflicts, failed: Vec::new() };
                }
                succeeded.retain(|i| !conflicts.contains(i));
            }
        }

        if transactional {
            // ClickHouse before the commit (see the module docs for why).
            match self.write_rows(&staged, &succeeded, slots).await {
                Ok(rejected) if rejected.is_empty() => {}
                Ok(rejected) => {
                    // Their Postgres effects are in the transaction: roll back and run
                    // the part again without them (their rows are not written).
                    self.rollback(tx).await;
                    return PartEnd::Again { without: rejected.iter().map(|(i, _)| *i).collect(), failed: rejected };
                }
                Err(e) => {
                    self.rollback(tx).await;
                    return PartEnd::Stopped { error: e.to_string(), failed };
                }
            }
        }

        let committed = tx.commit().await;
        self.count_postgres(tx.round_trips);
        match committed {
            Ok(()) => {
                for &i in &succeeded {
                    slots[i].outcome = Some(Outcome::Processed);
                }
                PartEnd::Done { failed }
            }
            Err(e) => PartEnd::Stopped { error: format!("Postgres: commit failed: {e}"), failed },
        }
    }

    /// Rolls the batch transaction back (if one began) and counts its round trips.
    async fn rollback(&self, tx: &mut LazyTx) {
        tx.rollback().await;
        self.count_postgres(tx.round_trips);
    }

    /// Writes the rows of the `events` (slot indexes) that staged any. When ClickHouse
    /// rejects the data, the write is split in halves, recursively, until the events
    /// whose rows it rejects are found (the other halves are written as they go; a
    /// repeat of them collapses); those come back as permanent failures. Any other
    /// error (the server unavailable) ends it: the caller retries the whole part.
    async fn write_rows(
        &self,
        staged: &SinkBatch,
        events: &[usize],
        slots: &[Slot<'_>],
    ) -> Result<Vec<(usize, HandlerError)>, SinkError> {
        let mut owners = staged.owners();
        owners.retain(|o| events.contains(o));
        let mut rejected = Vec::new();
        let mut pending = vec![owners];
        while let Some(group) = pending.pop() {
            if group.is_empty() {
                continue;
            }
            let token = dedup_token(group.iter().map(|&i| &slots[i].id));
            match self.sink.write_owned_by(staged, Some(&group), &token).await {
                Ok(()) => {}
                Err(e @ SinkError::Rejected { .. }) if group.len() == 1 => {
                    let i = group[0];
                    tracing::warn!(function = %self.ns, event_id = %slots[i].id, position = %slots[i].event.position(), error = %e, "ClickHouse rejected the event's rows");
                    rejected.push((i, HandlerError::from(e)));
                }
                Err(SinkError::Rejected { .. }) => {
                    let (a, b) = group.split_at(group.len() / 2);
                    pending.push(b.to_vec());
                    pending.push(a.to_vec());
                }
                Err(e) => return Err(e),
            }
        }
        if !rejected.is_empty() {
            metrics().clickhouse_rejected.with_label_values(&[self.ns.as_str()]).inc_by(rejected.len() as u64);
        }
        Ok(rejected)
    }

    /// Failed handlers and records without an id: count the attempt, dead-letter what
    /// is permanent or out of attempts.
    ///
    /// Only the lease holder counts or dead-letters a handled event: when our lease
    /// expired while the handler ran, another consumer may be handling the event now,
    /// and our failure must not count against it (nor dead-letter an event that is about
    /// to succeed, leaving its ClickHouse rows behind). Such an event is `InFlight` for
    /// us. Without lease information (Redis down at the start, or now), the dead-letter
    /// confirm itself decides: only one confirm of an id can win.
    async fn settle_failures(&self, slots: &mut [Slot<'_>], token: &str, v2_known: bool) {
        self.drop_lost_leases(slots, token).await;
        let mut to_count: Vec<usize> = Vec::new();
        let mut to_dead_letter: Vec<(usize, DeadLetterReason, String, u32)> = Vec::new();
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.outcome.is_some() {
                continue;
            }
            if let Some(r) = &slot.invalid {
                to_dead_letter.push((i, r.reason, r.error.clone(), 1));
                continue;
            }
            match slot.failure.take() {
                None => {}
                Some(HandlerError::Unavailable(msg)) => slot.fail(FailureKind::Unavailable, msg, None),
                Some(HandlerError::Permanent { reason, message }) => {
                    // 0: the ledger adds the failures counted before.
                    to_dead_letter.push((i, DeadLetterReason::refused(reason), message, 0))
                }
                Some(e @ HandlerError::Retryable(_)) => {
                    slot.failure = Some(e);
                    to_count.push(i);
                }
            }
        }

        if !to_count.is_empty() {
            let failures: Vec<(&EventId, String)> = to_count
                .iter()
                .map(|&i| (&slots[i].id, slots[i].failure.as_ref().map(|e| e.to_string()).unwrap_or_default()))
                .collect();
            self.count_postgres(1);
            let counted = ledger::record_failures(&self.pg, &self.ns, &failures).await;
            drop(failures);
            for &i in &to_count {
                let msg = slots[i].failure.take().map(|e| e.to_string()).unwrap_or_default();
                match &counted {
                    Ok(map) => {
                        let attempts = map.get(slots[i].id.as_str()).copied().unwrap_or(1);
                        if attempts >= self.config.max_attempts {
                            to_dead_letter.push((i, DeadLetterReason::MaxAttempts, msg, attempts));
                        } else {
                            slots[i].fail(FailureKind::Retryable, msg, Some(attempts));
                        }
                    }
                    Err(e) => slots[i].fail(FailureKind::Retryable, format!("{msg} (attempt not counted: {e})"), None),
                }
            }
        }

        if to_dead_letter.is_empty() {
            return;
        }
        let rows: Vec<DeadLetterRow<'_>> = to_dead_letter
            .iter()
            .map(|(i, reason, error, attempts)| DeadLetterRow {
                id: &slots[*i].id,
                shadow: slots[*i].shadow.as_ref(),
                event: slots[*i].event,
                reason: *reason,
                error: error.clone(),
                attempts: *attempts,
            })
            .collect();
        self.count_postgres(1);
        let stored = ledger::dead_letter(&self.pg, &self.ns, &rows, v2_known).await;
        drop(rows);
        match stored {
            Ok(ids) => {
                let stored: HashSet<String> = ids.into_iter().collect();
                for (i, reason, error, _) in to_dead_letter {
                    let slot = &mut slots[i];
                    if stored.contains(slot.id.as_str()) {
                        tracing::warn!(function = %self.ns, event_id = %slot.id, position = %slot.event.position(), %reason, %error, "event dead-lettered");
                        slot.outcome = Some(Outcome::DeadLettered { reason });
                    } else {
                        slot.duplicate(DuplicateTier::Confirm, None);
                    }
                }
            }
            Err(e) => {
                for (i, _, error, _) in to_dead_letter {
                    slots[i].fail(FailureKind::Unavailable, format!("{error} (dead-letter store failed: {e})"), None);
                }
            }
        }
    }

    /// Failed events we leased whose lease is no longer ours become `InFlight`.
    async fn drop_lost_leases(&self, slots: &mut [Slot<'_>], token: &str) {
        let failed: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].leased && slots[i].outcome.is_none() && slots[i].failure.is_some())
            .filter(|&i| !matches!(slots[i].failure, Some(HandlerError::Unavailable(_))))
            .collect();
        if failed.is_empty() {
            return;
        }
        // Both leases of an event in the transition: it is ours only while we hold both.
        let owners: Vec<usize> =
            failed.iter().flat_map(|&i| std::iter::once(i).chain(slots[i].shadow_leased.then_some(i))).collect();
        let ids: Vec<&EventId> = failed
            .iter()
            .flat_map(|&i| {
                let s = &slots[i];
                std::iter::once(&s.id).chain(s.shadow.as_ref().filter(|_| s.shadow_leased))
            })
            .collect();
        let held = self.leases.still_held(&self.ns, &ids, token, self.config.lease_ttl).await;
        drop(ids);
        let held = held.map(|held| {
            let lost: HashSet<usize> = owners.iter().zip(held).filter(|(_, ours)| !ours).map(|(&i, _)| i).collect();
            failed.iter().map(|i| !lost.contains(i)).collect::<Vec<bool>>()
        });
        if !matches!(held, Err(LeaseError::BreakerOpen(_))) {
            self.count_redis();
        }
        match held {
            Ok(held) => {
                for (&i, ours) in failed.iter().zip(held) {
                    if !ours {
                        let slot = &mut slots[i];
                        tracing::warn!(
                            function = %self.ns,
                            event_id = %slot.id,
                            position = %slot.event.position(),
                            error = %slot.failure.as_ref().map(|e| e.to_string()).unwrap_or_default(),
                            "handler failed after its lease expired; not counted (the event may be another consumer's now)"
                        );
                        // The lease flags stay: release is a compare-and-delete, so it
                        // frees what is still ours (in the transition one of the two
                        // leases may be) and leaves the rest alone.
                        slot.failure = None;
                        slot.outcome = Some(Outcome::InFlight);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(function = %self.ns, error = %e, "Redis unavailable; failures counted on Postgres alone")
            }
        }
    }

    /// Step 6: done markers for what is confirmed, our leases freed.
    async fn release(&self, slots: &[Slot<'_>], token: &str) {
        let items = release_items(slots);
        if items.is_empty() {
            return;
        }
        let items: Vec<Release<'_>> = items.iter().map(|(id, done)| Release { id, done: *done }).collect();
        send_release(&self.leases, &self.ns, &self.round_trips, &items, token, self.config.done_ttl).await;
    }

    /// The release step sent after the batch answers (see
    /// [`Guard::run_batch_deferring_release`]); waits only for a free permit.
    async fn release_later(&self, slots: &[Slot<'_>], token: String) {
        let items: Vec<(EventId, Option<PayloadHash>)> =
            release_items(slots).into_iter().map(|(id, done)| (id.clone(), done)).collect();
        if items.is_empty() {
            return;
        }
        let Ok(permit) = self.deferred.clone().acquire_owned().await else {
            return self.release(slots, &token).await;
        };
        let (leases, ns, round_trips, ttl) =
            (self.leases.clone(), self.ns.clone(), self.round_trips.clone(), self.config.done_ttl);
        tokio::spawn(async move {
            let items: Vec<Release<'_>> = items.iter().map(|(id, done)| Release { id, done: *done }).collect();
            send_release(&leases, &ns, &round_trips, &items, &token, ttl).await;
            drop(permit);
        });
    }

    /// Confirmed ids go into the local cache.
    fn remember(&self, slots: &[Slot<'_>]) {
        if !self.cache.is_enabled() {
            return;
        }
        self.cache.insert_many(
            slots
                .iter()
                .filter(|s| s.leader.is_none() && s.invalid.is_none())
                // Found in the cache: there already (its age counts from its first confirm).
                .filter(|s| !matches!(&s.outcome, Some(Outcome::Duplicate { tier: DuplicateTier::Local, .. })))
                .filter(|s| matches!(&s.outcome, Some(o) if o.is_finished()))
                .flat_map(|s| s.ids().map(move |id| (id, s.confirmed_hash.unwrap_or(s.hash)))),
        );
    }

    /// Records repeating an earlier record's id take its fate.
    fn resolve_followers(&self, slots: &mut [Slot<'_>]) {
        for i in 0..slots.len() {
            if let Some(l) = slots[i].leader {
                let leader_outcome = slots[l].outcome.clone();
                let leader_hash = slots[l].confirmed_hash.unwrap_or(slots[l].hash);
                slots[i].outcome = Some(match leader_outcome {
                    Some(o) if o.is_finished() => Outcome::Duplicate {
                        tier: DuplicateTier::Batch,
                        payload_mismatch: leader_hash != slots[i].hash,
                    },
                    Some(o) => o,
                    None => {
                        Outcome::Failed { kind: FailureKind::Unavailable, error: "not handled".into(), attempts: None }
                    }
                });
            }
        }
    }

    /// With `GUARD_DEAD_LETTER_PAYLOAD_MISMATCH`, a duplicate carrying another payload
    /// than the confirmed event is also kept in the dead letters for inspection, filed
    /// under `mismatch:<topic>-<partition>-<offset>`. The duplicate itself is skipped as
    /// any duplicate is; the copy never blocks the partition.
    async fn dead_letter_mismatches(&self, slots: &[Slot<'_>], v2_known: bool) {
        if !self.config.dead_letter_payload_mismatch {
            return;
        }
        let mismatched: Vec<(&Slot<'_>, EventId)> = slots
            .iter()
            .filter(|s| matches!(s.outcome, Some(Outcome::Duplicate { payload_mismatch: true, .. })))
            .map(|s| (s, EventId::new(format!("mismatch:{}", s.event.position())).expect("non-empty")))
            .collect();
        if mismatched.is_empty() {
            return;
        }
        let rows: Vec<DeadLetterRow<'_>> = mismatched
            .iter()
            .map(|(s, id)| DeadLetterRow {
                id,
                shadow: None,
                event: s.event,
                reason: DeadLetterReason::PayloadMismatch,
                error: format!("event {} was confirmed with another payload", s.id),
                attempts: 1,
            })
            .collect();
        self.count_postgres(1);
        if let Err(e) = ledger::dead_letter(&self.pg, &self.ns, &rows, v2_known).await {
            tracing::warn!(function = %self.ns, error = %e, "could not store payload mismatches in the dead letters");
        }
    }
}

/// One part of the batch after step 4.
struct Handled {
    /// How many events from the start of `work` the part holds.
    len: usize,
    /// The ClickHouse rows of its events, each tagged with its event (slot index).
    staged: SinkBatch,
    /// Events whose handler succeeded (slot indexes).
    succeeded: Vec<usize>,
    /// Events whose handler (or its staging) failed, with the error.
    failed: Vec<(usize, HandlerError)>,
}

/// How step 5 ended for a part.
enum PartEnd {
    /// Settled: its successes are processed (or duplicates); `failed` goes on to be
    /// counted or dead-lettered.
    Done { failed: Vec<(usize, HandlerError)> },
    /// Rolled back: run the part again `without` these events, whose fate is settled
    /// (duplicates, or the permanent failures in `failed`). The part's other failures
    /// are not kept: the rerun meets them again.
    Again { without: Vec<usize>, failed: Vec<(usize, HandlerError)> },
    /// A dependency failed (`error`): nothing more of the batch is confirmed now.
    Stopped { error: String, failed: Vec<(usize, HandlerError)> },
}

/// What the release step sends: every id we lease (or may lease), with the hash of its
/// done marker when its event finished.
fn release_items<'s>(slots: &'s [Slot<'_>]) -> Vec<(&'s EventId, Option<PayloadHash>)> {
    slots
        .iter()
        .flat_map(|s| {
            let done = match &s.outcome {
                Some(o) if o.is_finished() => Some(s.confirmed_hash.unwrap_or(s.hash)),
                _ => None,
            };
            let shadow = s.shadow.as_ref().filter(|_| s.shadow_leased || s.lease_unknown);
            (s.leased || s.lease_unknown).then_some(&s.id).into_iter().chain(shadow).map(move |id| (id, done))
        })
        .collect()
}

/// Step 6: done markers and lease release, in one round trip. A failure is only
/// logged: leases expire on their own, and markers are an optimisation.
async fn send_release(
    leases: &Leases,
    ns: &Namespace,
    round_trips: &RoundTrips,
    items: &[Release<'_>],
    token: &str,
    done_ttl: Duration,
) {
    let result = leases.release(ns, items, token, done_ttl).await;
    if !matches!(result, Err(LeaseError::BreakerOpen(_))) {
        count_redis(round_trips, ns);
    }
    if let Err(e) = result {
        tracing::warn!(function = %ns, error = %e, "could not release leases; they expire after their TTL");
    }
}

fn count_redis(round_trips: &RoundTrips, ns: &Namespace) {
    round_trips.redis.fetch_add(1, Ordering::Relaxed);
    metrics().round_trips.with_label_values(&[ns.as_str(), "redis"]).inc();
}

/// The text of a caught panic (`panic!` with a literal or a formatted message).
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// The same set of ids always yields the same token, so a retried insert of the same
/// rows is dropped by servers that support `insert_deduplication_token`.
fn dedup_token<'a>(ids: impl Iterator<Item = &'a EventId>) -> String {
    let mut ids: Vec<&str> = ids.map(EventId::as_str).collect();
    ids.sort_unstable();
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..16])
}
