//! Step 1 (first half): a bounded in-process cache of recently confirmed ids.
//!
//! Invariants: an id is only inserted after Postgres confirmed it, so a hit is always a
//! true duplicate; memory is bounded by bytes (`GUARD_LOCAL_CACHE_MAX_BYTES`) whatever
//! the event rate, with moka evicting the least useful entries past the bound; a TTL of
//! zero (`KAFKA_DEDUP_TTL_SECONDS=0`) disables the cache.

use std::time::Duration;

use moka::sync::Cache;

use crate::event::PayloadHash;
use crate::event_id::EventId;

/// Bytes one entry costs beyond its id's text: the hash, the `String` header, and
/// moka's per-entry bookkeeping (node, deque links, frequency sketch, hash table slot).
/// Measured, not guessed: the benchmark fills the cache with 1M ids and compares RSS
/// growth with the weighed size (docs/BENCHMARKS.md); 300 keeps RSS within the bound.
pub const ENTRY_OVERHEAD_BYTES: u32 = 300;

/// The in-process cache of confirmed ids, with the payload hash each was confirmed with.
pub struct LocalCache(Option<Cache<EventId, PayloadHash>>);

impl LocalCache {
    /// A cache of at most `max_bytes` whose entries live `ttl`; disabled when either is
    /// zero.
    pub fn new(ttl: Duration, max_bytes: u64) -> Self {
        if ttl.is_zero() || max_bytes == 0 {
            return Self(None);
        }
        Self(Some(
            Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|id: &EventId, _: &PayloadHash| {
                    (id.as_str().len() as u32).saturating_add(ENTRY_OVERHEAD_BYTES)
                })
                .time_to_live(ttl)
                .build(),
        ))
    }

    /// The confirmed payload hash of `id`, if cached.
    pub fn get(&self, id: &EventId) -> Option<PayloadHash> {
        self.0.as_ref()?.get(id)
    }

    /// Remembers a confirmed id; call only after Postgres confirmed it.
    pub fn insert(&self, id: EventId, hash: PayloadHash) {
        if let Some(c) = &self.0 {
            c.insert(id, hash);
        }
    }

    /// Forgets `id` (a dead letter about to be replayed).
    pub fn remove(&self, id: &EventId) {
        if let Some(c) = &self.0 {
            c.invalidate(id);
        }
    }

    /// Whether the cache is on (a TTL and a size above zero).
    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Weighted size (bytes, by the weigher above) after pending maintenance.
    pub fn weighted_size(&self) -> u64 {
        self.0.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.weighted_size()
        })
    }

    /// Entries held, after pending maintenance.
    pub fn entry_count(&self) -> u64 {
        self.0.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.entry_count()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_byte_bound() {
        let cache = LocalCache::new(Duration::from_secs(60), 64 * 1024);
        for i in 0..10_000 {
            cache.insert(EventId::new(format!("event-{i:08}")).unwrap(), PayloadHash([0; 32]));
        }
        assert!(cache.weighted_size() <= 64 * 1024, "weighted size {}", cache.weighted_size());
        assert!(cache.entry_count() > 0);
    }

    #[test]
    fn zero_ttl_disables_it() {
        let cache = LocalCache::new(Duration::ZERO, 1 << 20);
        cache.insert(EventId::new("a").unwrap(), PayloadHash([1; 32]));
        assert!(!cache.is_enabled());
        assert_eq!(cache.get(&EventId::new("a").unwrap()), None);
    }
}
