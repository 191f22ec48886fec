//! What `eo` does for operators, as functions the tests call directly: inspect one
//! event, list and replay dead letters (the guard's, and the outbox's), run the
//! retention cleanup.
//!
//! Replaying is an admin action: it is only reachable from this command line (with
//! database credentials), never over HTTP.

use std::sync::Arc;

use exactly_once::guard::ledger;
use exactly_once::runtime::Functions;
use exactly_once::{Clients, EventId, Namespace, Outcome};
use sqlx::Row;

/// Everything the stores know about one event id.
#[derive(Debug, Default)]
pub struct Inspection {
    /// The id looked at: as given, or with the tag of its kind (see [`inspect`]).
    pub event_id: String,
    /// (token, ms left) of a live lease.
    pub lease: Option<(String, i64)>,
    pub done_marker: Option<String>,
    /// (status, attempts, processed_at, position) from `processed_events`.
    pub ledger: Option<(String, i32, String, String)>,
    /// (attempts, last error) of failures not yet confirmed.
    pub failures: Option<(i32, String)>,
    /// (id, reason, error, replayed) of dead-letter entries.
    pub dead_letters: Vec<(i64, String, String, bool)>,
    /// (id, topic, idempotency key, state) of the outbox messages the event published.
    pub outbox: Vec<(i64, String, String, String)>,
    pub redis_error: Option<String>,
}

impl Inspection {
    pub fn is_confirmed(&self) -> bool {
        self.ledger.is_some()
    }

    /// No store knows anything about the id.
    fn is_unknown(&self) -> bool {
        self.ledger.is_none()
            && self.failures.is_none()
            && self.dead_letters.is_empty()
            && self.lease.is_none()
            && self.done_marker.is_none()
    }

    pub fn render(&self, function: &str, id: &str) -> String {
        let id = if self.event_id.is_empty() { id } else { self.event_id.as_str() };
        let mut out = format!("event {id} of {function}\n");
        match &self.ledger {
            Some((status, attempts, at, position)) => {
                out += &format!("  postgres:  {status} at {at} after {attempts} attempt(s), from {position}\n")
            }
            None => out += "  postgres:  not confirmed\n",
        }
        if let Some((attempts, error)) = &self.failures {
            out += &format!("  failures:  {attempts} attempt(s), last error: {error}\n");
        }
        match (&self.redis_error, &self.lease) {
            (Some(e), _) => out += &format!("  redis:     unavailable ({e})\n"),
            (None, Some((token, ms))) => out += &format!("  redis:     leased by {token} for {ms} ms more\n"),
            (None, None) => out += "  redis:     no lease\n",
        }
        if self.redis_error.is_none() {
            match &self.done_marker {
                Some(h) => out += &format!("             done marker (payload sha256 {})\n", &h[..h.len().min(16)]),
                None => out += "             no done marker\n",
            }
        }
        for (dl, reason, error, replayed) in &self.dead_letters {
            let state = if *replayed { "replayed" } else { "open" };
            out += &format!("  dead letter #{dl} ({state}): {reason}: {error}\n");
        }
        for (id, topic, key, state) in &self.outbox {
            out += &format!("  outbox #{id} to {topic} ({key}): {state}\n");
        }
        out
    }
}

/// What the stores know about event `id` of `function`. Operators usually know the key
/// an event was sent with, not the id the guard derived from it: when nothing is known
/// under `id` as given, it is looked up with the tag of each kind in turn (`h:` header,
/// `f:` payload field, `c:` composite, `p:` position), and the first id any store knows
/// is reported.
pub async fn inspect(clients: &Clients, function: &str, id: &str) -> Result<Inspection, String> {
    let given = inspect_id(clients, function, id).await?;
    if !given.is_unknown() {
        return Ok(given);
    }
    for tag in ["h:", "f:", "c:", "p:"] {
        if id.starts_with(tag) {
            continue;
        }
        let tagged = inspect_id(clients, function, &format!("{tag}{id}")).await?;
        if !tagged.is_unknown() {
            return Ok(tagged);
        }
    }
    Ok(given)
}

async fn inspect_id(clients: &Clients, function: &str, id: &str) -> Result<Inspection, String> {
    let ns = Namespace::new(function).map_err(|e| e.to_string())?;
    let event_id = EventId::new(id).map_err(|e| e.to_string())?;
    let mut out = Inspection { event_id: event_id.as_str().to_owned(), ..Inspection::default() };
    match clients.leases.inspect(&ns, &event_id).await {
        Ok((lease, marker)) => {
            out.lease = lease;
            out.done_marker = marker;
        }
        Err(e) => out.redis_error = Some(e.to_string()),
    }
    let pg = &clients.pg;
    let db = |e: sqlx::Error| format!("Postgres: {e}");
    let history = ledger::history(pg, &ns, &event_id).await.map_err(db)?;
    out.ledger = history.confirmed;
    out.failures = history.failures;
    out.dead_letters = history.dead_letters;
    out.outbox = sqlx::query(
        "SELECT id, topic, idempotency_key,
                CASE WHEN published_at IS NOT NULL THEN 'published at ' || published_at::text
                     WHEN dead_lettered_at IS NOT NULL
                         THEN 'dead-lettered (' || coalesce(dead_letter_reason, '?') || '): ' || coalesce(last_error, '')
                     WHEN last_error IS NOT NULL
                         THEN 'queued, ' || attempts || ' attempt(s), ' || rejections || ' refusal(s), last error: ' || last_error
                     ELSE 'queued' END AS state
         FROM outbox WHERE namespace = $1 AND event_id = $2 ORDER BY id",
    )
    .bind(ns.as_str())
    .bind(event_id.as_str())
    .fetch_all(pg)
    .await
    .map_err(db)?
    .into_iter()
    .map(|r| (r.get("id"), r.get("topic"), r.get("idempotency_key"), r.get("state")))
    .collect();
    Ok(out)
}

/// Dead-lettered outbox messages (`eo outbox list`), oldest first.
pub async fn list_outbox_dead_letters(
    clients: &Clients,
    function: Option<&str>,
    limit: i64,
) -> Result<Vec<exactly_once::outbox::DeadLetter>, String> {
    exactly_once::outbox::dead_letters(&clients.pg, function, limit).await.map_err(|e| format!("Postgres: {e}"))
}

/// Puts dead-lettered outbox messages back in the relay's queue (`eo outbox replay`):
/// the relay sends them again, with their original idempotency keys, the next time it
/// drains (within `OUTBOX_RELAY_INTERVAL_MS` in a worker, at the next schedule on
/// Lambda). Every id must be a dead-lettered message; those that are not are named in
/// the error, and the others are requeued all the same.
pub async fn replay_outbox(clients: &Clients, ids: &[i64]) -> Result<Vec<i64>, String> {
    let requeued = exactly_once::outbox::requeue(&clients.pg, ids).await.map_err(|e| format!("Postgres: {e}"))?;
    let missing: Vec<String> = ids.iter().filter(|id| !requeued.contains(id)).map(|id| format!("#{id}")).collect();
    if missing.is_empty() {
        Ok(requeued)
    } else {
        let done: Vec<String> = requeued.iter().map(|id| format!("#{id}")).collect();
        Err(format!(
            "not dead-lettered outbox messages: {} (see `eo outbox list`); requeued: [{}]",
            missing.join(", "),
            done.join(", ")
        ))
    }
}

/// One row of `eo dead-letters list`.
pub use exactly_once::guard::ledger::DeadLetterEntry as DeadLetter;

pub async fn list_dead_letters(
    clients: &Clients,
    function: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, String> {
    ledger::open_dead_letters(&clients.pg, function, limit).await.map_err(|e| format!("Postgres: {e}"))
}

/// Replays open dead letters through their function's guard: the entry is marked
/// replayed and the event's `dead_lettered` confirmation removed (one transaction), its
/// Redis marker forgotten, then the stored record is handled again. It may succeed, or
/// be dead-lettered again (a new entry) if the cause is still there.
pub async fn replay(clients: &Clients, functions: &Arc<Functions>, ids: &[i64]) -> Result<Vec<(i64, Outcome)>, String> {
    let db = |e: sqlx::Error| format!("Postgres: {e}");
    let mut results = Vec::new();
    for &dl in ids {
        // The entry stays open until the event has a finished outcome: a replay that
        // fails (a dependency down, a crash of this process) leaves it listed, and its
        // ledger row is put back, so the event is never in neither place.
        let mut tx = clients.pg.begin().await.map_err(db)?;
        let Some(stored) = ledger::lock_open_dead_letter(&mut tx, dl).await.map_err(db)? else {
            // Explicitly: a dropped transaction keeps its locks until the connection is reused.
            let _ = tx.rollback().await;
            return Err(format!("no open dead letter #{dl} (see `eo dead-letters list`)"));
        };
        let ledger::StoredDeadLetter { function, event_id, reason, event } = stored;
        if reason == exactly_once::DeadLetterReason::PayloadMismatch.as_str() {
            let _ = tx.rollback().await;
            return Err(format!(
                "dead letter #{dl} is a copy of a mismatching duplicate, kept for inspection; nothing to replay"
            ));
        }
        let Some(f) = functions.by_name(&function) else {
            let _ = tx.rollback().await;
            return Err(format!("dead letter #{dl} belongs to `{function}`, which this build does not have"));
        };
        // The ids the event may be confirmed under: the one it was dead-lettered under,
        // and its ids in every format (the function may have moved from v1 to v2 ids
        // since; in the transition it was dead-lettered under both).
        let mut ids: Vec<String> = vec![event_id.clone()];
        for id in f.guard.known_ids(&event) {
            if !ids.iter().any(|i| i == id.as_str()) {
                ids.push(id.as_str().to_owned());
            }
        }
        // The dead-lettered confirms would make the guard skip the event as a duplicate:
        // they go for the replay, kept here to be put back if the replay does not finish.
        let taken = ledger::take_dead_lettered(&mut tx, &function, &ids).await.map_err(db)?;
        tx.commit().await.map_err(db)?;
        if let Ok(ns) = Namespace::new(&function) {
            for id in ids.iter().filter_map(|i| EventId::new(i.as_str()).ok()) {
                let _ = clients.leases.forget(&ns, &id).await;
                f.guard.forget(&id);
            }
        }
        let report = f.guard.run_batch(f.handler.as_ref(), &[event], None).await;
        let first = report.outcomes.into_iter().next().expect("one outcome");
        let outcome = first.outcome;
        // Dead-lettered again under another id (the function's id format changed since):
        // the new entry holds the event now, and this one is closed, not listed twice.
        let superseded = matches!(outcome, Outcome::DeadLettered { .. })
            && first.event_id.as_ref().is_some_and(|id| id.as_str() != event_id);
        // Closed only once the event took effect (here, or as a duplicate of an event
        // processed elsewhere). Dead-lettered again, it is this same entry, updated
        // and still open.
        let took_effect = match &outcome {
            Outcome::Processed => true,
            Outcome::Duplicate { .. } => ledger::any_processed(&clients.pg, &function, &ids).await.map_err(db)?,
            _ => false,
        };
        if took_effect || superseded {
            ledger::close_dead_letter(&clients.pg, dl)
                .await
                .map_err(|e| format!("dead letter #{dl}: replayed ({outcome}) but not closed: {e}; it stays listed"))?;
        } else if !matches!(outcome, Outcome::DeadLettered { .. }) {
            // Not finished (a dependency failed), or a duplicate of nothing processed (a
            // done marker outlived the ledger row): the rows go back, the entry stays open.
            ledger::put_back(&clients.pg, &function, &taken).await.map_err(|e| {
                format!("dead letter #{dl}: the replay did not finish ({outcome}) and its ledger row could not be put back ({e}); it stays listed: replay it again")
            })?;
        }
        results.push((dl, outcome));
    }
    Ok(results)
}
