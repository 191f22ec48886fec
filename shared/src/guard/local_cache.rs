//! Step 1 (first half): a bounded in-process cache of recently confirmed ids.
//!
//! Invariants: an id is only inserted after Postgres confirmed it, so a hit is a true
//! duplicate (up to a 128-bit hash collision, below); memory is bounded by bytes
//! (`GUARD_LOCAL_CACHE_MAX_BYTES`) whatever the event rate; an entry older than its TTL
//! is never a hit; a TTL of zero (`KAFKA_DEDUP_TTL_SECONDS=0`) disables the cache.
//!
//! Layout: two generations of a plain hash map. New ids go into the current one; when it
//! holds half the byte bound, or is a TTL old, it becomes the previous one and the old
//! previous one is dropped whole. A lookup asks both and checks the entry's age. So the
//! oldest half is evicted first (a redelivery comes soon after its original, so recency
//! is what matters), and an insert or a lookup is one hash-map operation under a mutex
//! that is taken once per batch step, not per id. (A general-purpose cache with
//! frequency-based admission and per-entry queues cost the guard more CPU than
//! everything else it does per event: see docs/BENCHMARKS.md.)
//!
//! An id is held as 128 bits: two SipHash-1-3 hashes of its text under keys drawn at
//! random per process. No copy of the text and no allocation per entry; a false hit
//! needs a new id to collide in all 128 bits with one held, under keys nobody outside
//! the process knows: at a million ids held, about 3 in 10^33 per lookup.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::event::PayloadHash;
use crate::event_id::EventId;

/// Bytes one entry costs: a slot of the hash map (the id's 16 bytes, the payload hash's
/// 32, the insertion time's 16, a control byte) at the map's worst load, just after it
/// doubled (0.44 entries per slot). Checked, not guessed: the benchmark fills the cache
/// with 1M ids and compares RSS growth with the weighed size (docs/BENCHMARKS.md).
pub const ENTRY_BYTES: u64 = 150;

/// The in-process cache of confirmed ids, with the payload hash each was confirmed with.
pub struct LocalCache(Option<Generations>);

struct Generations {
    /// The two keyed hashes an id is held as.
    keys: (RandomState, RandomState),
    ttl: Duration,
    /// Bytes (by [`weight`]) one generation may hold: half the bound.
    half: u64,
    state: Mutex<State>,
}

/// An id as the cache holds it: 128 bits of keyed hashes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key(u64, u64);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

/// The map's hasher: a [`Key`] is already a keyed hash; its first half is used as is.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (see `Key`); anything else still hashes correctly.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[derive(Default)]
struct Generation {
    entries: HashMap<Key, (PayloadHash, Instant), BuildHasherDefault<Prehashed>>,
    bytes: u64,
    started: Option<Instant>,
}

#[derive(Default)]
struct State {
    current: Generation,
    previous: Generation,
}

impl Generations {
    fn key(&self, id: &EventId) -> Key {
        Key(self.keys.0.hash_one(id.as_str()), self.keys.1.hash_one(id.as_str()))
    }
}

impl State {
    fn get(&self, key: &Key, ttl: Duration, now: Instant) -> Option<PayloadHash> {
        [&self.current, &self.previous]
            .into_iter()
            .find_map(|g| g.entries.get(key))
            .filter(|(_, at)| now.saturating_duration_since(*at) < ttl)
            .map(|(hash, _)| *hash)
    }
}

impl LocalCache {
    /// A cache of at most `max_bytes` whose entries live `ttl`; disabled when either is
    /// zero.
    pub fn new(ttl: Duration, max_bytes: u64) -> Self {
        if ttl.is_zero() || max_bytes == 0 {
            return Self(None);
        }
        Self(Some(Generations {
            keys: (RandomState::new(), RandomState::new()),
            ttl,
            half: max_bytes / 2,
            state: Mutex::default(),
        }))
    }

    fn state(g: &Generations) -> MutexGuard<'_, State> {
        // The state is consistent after every statement: a panic elsewhere leaves it usable.
        g.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The confirmed payload hash of `id`, if cached.
    pub fn get(&self, id: &EventId) -> Option<PayloadHash> {
        let g = self.0.as_ref()?;
        let key = g.key(id);
        Self::state(g).get(&key, g.ttl, Instant::now())
    }

    /// Looks up many ids under one lock: `found(i, hash)` for each hit, `i` the id's
    /// position in `ids`.
    pub fn get_many<'a>(&self, ids: impl IntoIterator<Item = &'a EventId>, mut found: impl FnMut(usize, PayloadHash)) {
        let Some(g) = &self.0 else { return };
        let keys: Vec<Key> = ids.into_iter().map(|id| g.key(id)).collect();
        let now = Instant::now();
        let state = Self::state(g);
        for (i, key) in keys.iter().enumerate() {
            if let Some(hash) = state.get(key, g.ttl, now) {
                found(i, hash);
            }
        }
    }

    /// Remembers a confirmed id; call only after Postgres confirmed it.
    pub fn insert(&self, id: &EventId, hash: PayloadHash) {
        self.insert_many([(id, hash)]);
    }

    /// Remembers many confirmed ids under one lock; call only after Postgres confirmed
    /// them.
    pub fn insert_many<'a>(&self, entries: impl IntoIterator<Item = (&'a EventId, PayloadHash)>) {
        let Some(g) = &self.0 else { return };
        let entries: Vec<(Key, PayloadHash)> = entries.into_iter().map(|(id, hash)| (g.key(id), hash)).collect();
        let now = Instant::now();
        let mut dropped = Vec::new();
        {
            let mut state = Self::state(g);
            for (key, hash) in entries {
                let w = ENTRY_BYTES;
                let cur = &state.current;
                let full = cur.bytes + w > g.half && !cur.entries.is_empty();
                let old = cur.started.is_some_and(|s| now.saturating_duration_since(s) >= g.ttl);
                if full || old {
                    let previous = std::mem::take(&mut state.current);
                    dropped.push(std::mem::replace(&mut state.previous, previous));
                }
                let cur = &mut state.current;
                cur.started.get_or_insert(now);
                if cur.entries.insert(key, (hash, now)).is_none() {
                    cur.bytes += w;
                }
            }
        }
        // A whole generation is freed outside the lock.
        drop(dropped);
    }

    /// Forgets `id` (a dead letter about to be replayed).
    pub fn remove(&self, id: &EventId) {
        let Some(g) = &self.0 else { return };
        let key = g.key(id);
        let mut guard = Self::state(g);
        let state = &mut *guard;
        for generation in [&mut state.current, &mut state.previous] {
            if generation.entries.remove(&key).is_some() {
                generation.bytes -= ENTRY_BYTES;
            }
        }
    }

    /// Whether the cache is on (a TTL and a size above zero).
    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Weighted size (bytes, [`ENTRY_BYTES`] per entry) of what is held, expired entries
    /// included until their generation is dropped.
    pub fn weighted_size(&self) -> u64 {
        self.0.as_ref().map_or(0, |g| {
            let state = Self::state(g);
            state.current.bytes + state.previous.bytes
        })
    }

    /// Entries held, expired ones included until their generation is dropped.
    pub fn entry_count(&self) -> u64 {
        self.0.as_ref().map_or(0, |g| {
            let state = Self::state(g);
            (state.current.entries.len() + state.previous.entries.len()) as u64
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: usize) -> EventId {
        EventId::new(format!("event-{i:08}")).unwrap()
    }

    #[test]
    fn stays_within_its_byte_bound_and_keeps_the_newest() {
        let cache = LocalCache::new(Duration::from_secs(60), 64 * 1024);
        for i in 0..10_000 {
            cache.insert(&id(i), PayloadHash([(i % 251) as u8; 32]));
        }
        assert!(cache.weighted_size() <= 64 * 1024, "weighted size {}", cache.weighted_size());
        // At least half the bound is held, and it is the newest ids.
        let per_entry = ENTRY_BYTES;
        assert!(cache.entry_count() >= 32 * 1024 / per_entry, "entries {}", cache.entry_count());
        assert_eq!(cache.get(&id(9_999)), Some(PayloadHash([(9_999 % 251) as u8; 32])));
        assert_eq!(cache.get(&id(0)), None);
    }

    #[test]
    fn an_entry_older_than_its_ttl_is_not_a_hit() {
        let cache = LocalCache::new(Duration::from_millis(50), 1 << 20);
        cache.insert(&id(1), PayloadHash([1; 32]));
        assert_eq!(cache.get(&id(1)), Some(PayloadHash([1; 32])));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get(&id(1)), None);
        // An insert after the TTL starts a new generation; the old one is still asked
        // (its entries by their age) until it is dropped by the next turn.
        cache.insert(&id(2), PayloadHash([2; 32]));
        assert_eq!(cache.get(&id(2)), Some(PayloadHash([2; 32])));
        std::thread::sleep(Duration::from_millis(60));
        cache.insert(&id(3), PayloadHash([3; 32]));
        assert_eq!(cache.entry_count(), 2, "the generation holding id 1 is dropped");
    }

    #[test]
    fn many_at_once_and_removal() {
        let cache = LocalCache::new(Duration::from_secs(60), 1 << 20);
        let ids: Vec<EventId> = (0..10).map(id).collect();
        cache.insert_many(ids.iter().enumerate().map(|(i, id)| (id, PayloadHash([i as u8; 32]))));
        let asked: Vec<EventId> = (5..15).map(id).collect();
        let mut hits = Vec::new();
        cache.get_many(&asked, |i, h| hits.push((i, h.0[0])));
        assert_eq!(hits, (0..5).map(|i| (i, (i + 5) as u8)).collect::<Vec<_>>());
        let before = cache.weighted_size();
        cache.remove(&id(7));
        assert_eq!(cache.get(&id(7)), None);
        assert_eq!(cache.weighted_size(), before - ENTRY_BYTES);
    }

    #[test]
    fn zero_ttl_disables_it() {
        let cache = LocalCache::new(Duration::ZERO, 1 << 20);
        cache.insert(&EventId::new("a").unwrap(), PayloadHash([1; 32]));
        assert!(!cache.is_enabled());
        assert_eq!(cache.get(&EventId::new("a").unwrap()), None);
    }
}
