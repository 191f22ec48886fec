//! Redis: done markers and leases, one round trip per batch in each direction.
//!
//! Keys: `<prefix>:{<tag>}:done:<id>` holds the payload hash of a confirmed event;
//! `<prefix>:{<tag>}:lease:<id>` holds the token of the batch working on it. The tag is
//! the namespace, or with `REDIS_KEY_BUCKETS` above one `<namespace>:<bucket>`, the bucket
//! being a fixed hash (FNV-1a) of the id. The tag is a Redis hash tag: every key with the
//! same tag sits in one cluster slot, so a script over one bucket's keys is legal on Redis
//! Cluster, and the buckets spread a function's keys over slots and so over shards.
//!
//! A batch sends one script per bucket it touches, all at once, and waits for the last:
//! about one round trip per step whatever the number of buckets. In standalone mode the
//! default is one bucket, which is one script per step, as before buckets existed.
//!
//! Invariants:
//! - a lease is only ever deleted by the holder of its token (compare-and-delete inside
//!   the script, never a plain DEL), so an expired holder cannot free a successor's lease;
//! - Redis is an optimisation: every caller must treat an error here as "no lease
//!   information" and fall back to Postgres, which stays the truth.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use redis::{Script, ScriptInvocation};

use crate::breaker::{BreakerOpen, CircuitBreaker};
use crate::event::PayloadHash;
use crate::event_id::{EventId, Namespace};
use crate::redis_client::{RedisClient, RedisConnectError, RedisConnection};
use crate::BoxError;

/// KEYS: n done keys, then the n matching lease keys; ARGV: token, ttl (ms).
/// One MGET reads every done marker; ids without one try `SET NX PX` for the lease.
/// Replies the marker's text (done), 1 (lease taken, or already ours: a client that
/// resent the script after losing its answer must not find its own lease busy) or 0
/// (busy: someone else holds it). Numbers, not letters: an integer reply costs the
/// client no allocation, and most ids get one.
const ACQUIRE: &str = r#"
local n = #KEYS / 2
local done = {}
for from = 1, n, 4000 do
  local part = redis.call('MGET', unpack(KEYS, from, math.min(from + 3999, n)))
  for j = 1, #part do done[from + j - 1] = part[j] end
end
local out = {}
for i = 1, n do
  if done[i] then
    out[i] = done[i]
  elseif redis.call('SET', KEYS[n + i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = 1
  elseif redis.call('GET', KEYS[n + i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[n + i], ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

/// KEYS: n lease keys, then the n matching done keys; ARGV: token, done ttl (ms), then
/// one marker per id (empty: no marker). Writes the markers, then deletes, in one DEL,
/// the leases that still hold our token (compare-and-delete). Returns how many were ours.
const RELEASE: &str = r#"
local n = #KEYS / 2
local mine = {}
for from = 1, n, 4000 do
  local to = math.min(from + 3999, n)
  local leases = redis.call('MGET', unpack(KEYS, from, to))
  for j = 1, #leases do
    if leases[j] == ARGV[1] then mine[#mine + 1] = KEYS[from + j - 1] end
  end
end
for i = 1, n do
  if ARGV[2 + i] ~= '' then
    redis.call('SET', KEYS[n + i], ARGV[2 + i], 'PX', ARGV[2])
  end
end
for from = 1, #mine, 4000 do
  redis.call('DEL', unpack(mine, from, math.min(from + 3999, #mine)))
end
return #mine
"#;

/// KEYS: n lease keys; ARGV: token, ttl (ms). For each lease: still ours? Then it is
/// extended by ttl, so it cannot lapse while the caller acts on the answer. Replies
/// 1 (ours) or 0 (expired, or someone else's) per key.
const HOLD: &str = r#"
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"#;

/// What Redis said about one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseReply {
    /// A done marker exists, with the payload hash it recorded (if readable).
    Done(Option<PayloadHash>),
    /// We hold the lease now.
    Acquired,
    /// Someone else holds the lease.
    Busy,
}

/// What to do with one id on release.
pub struct Release<'a> {
    /// The id whose lease is released.
    pub id: &'a EventId,
    /// `Some`: the event is confirmed; write its done marker with this hash.
    pub done: Option<PayloadHash>,
}

/// Why a Redis call failed; the guard falls back to Postgres for the batch.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The Redis breaker is open: no call was made.
    #[error(transparent)]
    BreakerOpen(#[from] BreakerOpen),
    /// Redis answered with an error, or the connection failed.
    #[error("Redis at {url}: {source}")]
    Redis {
        /// The address, with any password replaced by `***`.
        url: String,
        /// What the client said.
        #[source]
        source: BoxError,
    },
    /// Redis did not answer within `REDIS_TIMEOUT_MS`.
    #[error("Redis at {url}: no answer within {} ms", timeout.as_millis())]
    Timeout {
        /// The address, with any password replaced by `***`.
        url: String,
        /// How long the call waited.
        timeout: Duration,
    },
}

/// The Redis side of the guard, shared by every function in a process.
pub struct Leases {
    redis: RedisClient,
    breaker: Arc<CircuitBreaker>,
    prefix: String,
    buckets: u32,
    acquire: Script,
    release: Script,
    hold: Script,
}

impl Leases {
    /// Leases over `redis`, keys under `prefix`, spread over `buckets` hash slots per
    /// namespace (at least one). Loads the scripts now (on every node of a cluster): it
    /// saves the first batch a NOSCRIPT round trip, and a Redis that refuses scripts fails
    /// start-up.
    pub async fn connect(
        redis: RedisClient,
        prefix: &str,
        buckets: u32,
        breaker: Arc<CircuitBreaker>,
    ) -> Result<Self, RedisConnectError> {
        let leases = Self {
            redis,
            breaker,
            prefix: prefix.to_owned(),
            buckets: buckets.max(1),
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
            hold: Script::new(HOLD),
        };
        let err = |source: BoxError| RedisConnectError { url: leases.redis.url().to_owned(), source };
        let mut conn = leases.redis.connection().await.map_err(err)?;
        for script in [&leases.acquire, &leases.release, &leases.hold] {
            script.load_async(&mut conn).await.map_err(|e| err(e.into()))?;
        }
        Ok(leases)
    }

    /// The breaker in front of Redis.
    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.breaker
    }

    /// The Redis key of `kind` (`done` or `lease`) for `id`:
    /// `<prefix>:{<namespace>}:<kind>:<id>` with one bucket,
    /// `<prefix>:{<namespace>:<bucket>}:<kind>:<id>` with more.
    pub fn key(&self, ns: &Namespace, kind: &str, id: &EventId) -> String {
        let bucket = (self.buckets != 1).then(|| self.bucket(id));
        key_text(&self.prefix, ns.as_str(), bucket, kind, id.as_str())
    }

    /// The bucket of `id`: FNV-1a (64 bits) of its text, modulo the bucket count. Part of
    /// the key layout: every process of a function must agree on it.
    pub fn bucket(&self, id: &EventId) -> u32 {
        if self.buckets == 1 {
            return 0;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in id.as_str().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        (h % u64::from(self.buckets)) as u32
    }

    /// How many buckets a namespace's keys spread over.
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Positions `0..n` of `ids`, grouped by bucket: one script per group keeps every
    /// script inside one hash slot.
    fn groups<'i>(&self, ids: impl Iterator<Item = &'i EventId>) -> Vec<Vec<usize>> {
        if self.buckets == 1 {
            return vec![(0..ids.count()).collect()];
        }
        let mut by_bucket: Vec<Vec<usize>> = vec![Vec::new(); self.buckets as usize];
        for (i, id) in ids.enumerate() {
            by_bucket[self.bucket(id) as usize].push(i);
        }
        by_bucket.retain(|g| !g.is_empty());
        by_bucket
    }

    /// One round trip: done markers and leases for `ids`, in order.
    pub async fn acquire(
        &self,
        ns: &Namespace,
        ids: &[&EventId],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<LeaseReply>, LeaseError> {
        let replies: Vec<redis::Value> =
            self.per_id("acquire", &self.acquire, ns, ids, &["done", "lease"], token, ttl).await?;
        replies
            .into_iter()
            .map(|r| match r {
                redis::Value::Int(1) => Ok(LeaseReply::Acquired),
                redis::Value::Int(0) => Ok(LeaseReply::Busy),
                // A marker whose text is not a hash is still a marker: done.
                redis::Value::BulkString(b) => {
                    Ok(LeaseReply::Done(std::str::from_utf8(&b).ok().and_then(PayloadHash::from_hex)))
                }
                other => Err(self.malformed(format!("acquire script answered {other:?} for an id"))),
            })
            .collect()
    }

    /// One round trip over `ids`: `script` once per bucket, all at once. A bucket's
    /// script gets the keys of each of `kinds` for its ids (every id's key of the first
    /// kind, then of the next), then `token` and `ttl` (ms); it answers one reply per
    /// id. The replies come back in the order of `ids`.
    #[allow(clippy::too_many_arguments)]
    async fn per_id<T: redis::FromRedisValue>(
        &self,
        name: &str,
        script: &Script,
        ns: &Namespace,
        ids: &[&EventId],
        kinds: &[&str],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<T>, LeaseError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let groups = self.groups(ids.iter().copied());
        let ttl = ttl.as_millis().max(1) as u64;
        let invocations: Vec<ScriptInvocation<'_>> = groups
            .iter()
            .map(|group| {
                let mut inv = script.prepare_invoke();
                for kind in kinds {
                    for &i in group {
                        inv.key(self.key(ns, kind, ids[i]));
                    }
                }
                inv.arg(token).arg(ttl);
                inv
            })
            .collect();
        let replies: Vec<Vec<T>> = self.call(|conn| run_all(conn, invocations)).await?;
        let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(ids.len()).collect();
        for (group, replies) in groups.iter().zip(replies) {
            for (&i, r) in group.iter().zip(self.one_per_id(name, replies, group.len())?) {
                out[i] = Some(r);
            }
        }
        // Every id is in exactly one group and every group answered one reply per id.
        out.into_iter()
            .map(|r| r.ok_or_else(|| self.malformed(format!("{name} script left an id without a reply"))))
            .collect()
    }

    /// One round trip: writes done markers and frees the leases our token still holds.
    pub async fn release(
        &self,
        ns: &Namespace,
        items: &[Release<'_>],
        token: &str,
        done_ttl: Duration,
    ) -> Result<u64, LeaseError> {
        if items.is_empty() {
            return Ok(0);
        }
        let done_ttl = done_ttl.as_millis().max(1) as u64;
        let invocations: Vec<ScriptInvocation<'_>> = self
            .groups(items.iter().map(|item| item.id))
            .iter()
            .map(|group| {
                let mut inv = self.release.prepare_invoke();
                inv.arg(token).arg(done_ttl);
                for &i in group {
                    inv.key(self.key(ns, "lease", items[i].id));
                    inv.arg(items[i].done.map(|h| h.to_hex()).unwrap_or_default());
                }
                for &i in group {
                    inv.key(self.key(ns, "done", items[i].id));
                }
                inv
            })
            .collect();
        let freed: Vec<u64> = self.call(|conn| run_all(conn, invocations)).await?;
        Ok(freed.into_iter().sum())
    }

    /// One round trip: which of `ids` our token still leases; those are extended by
    /// `ttl`. Only the holder may count a failed attempt or dead-letter an event: a
    /// consumer whose lease expired mid-handler must not fail an event another consumer
    /// is handling now.
    pub async fn still_held(
        &self,
        ns: &Namespace,
        ids: &[&EventId],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<bool>, LeaseError> {
        let held: Vec<i64> = self.per_id("hold", &self.hold, ns, ids, &["lease"], token, ttl).await?;
        Ok(held.into_iter().map(|h| h == 1).collect())
    }

    /// A script's replies, checked to be one per id (a short answer must not be read as
    /// "the rest are fine").
    fn one_per_id<T>(&self, script: &str, replies: Vec<T>, ids: usize) -> Result<Vec<T>, LeaseError> {
        if replies.len() != ids {
            return Err(self.malformed(format!("{script} script answered {} replies for {ids} ids", replies.len())));
        }
        Ok(replies)
    }

    fn malformed(&self, what: String) -> LeaseError {
        LeaseError::Redis { url: self.redis.url().to_owned(), source: what.into() }
    }

    /// What Redis holds for one id: the lease (token, ms left) and the done marker.
    pub async fn inspect(
        &self,
        ns: &Namespace,
        id: &EventId,
    ) -> Result<(Option<(String, i64)>, Option<String>), LeaseError> {
        let (lease, done) = (self.key(ns, "lease", id), self.key(ns, "done", id));
        let (token, pttl, marker): (Option<String>, i64, Option<String>) = self
            .call(|mut conn| async move {
                redis::pipe().get(&lease).cmd("PTTL").arg(&lease).get(&done).query_async(&mut conn).await
            })
            .await?;
        Ok((token.map(|t| (t, pttl)), marker))
    }

    /// Deletes the done marker of `id` (a dead letter being replayed).
    pub async fn forget(&self, ns: &Namespace, id: &EventId) -> Result<(), LeaseError> {
        let done = self.key(ns, "done", id);
        self.call(|mut conn| async move { redis::cmd("DEL").arg(&done).query_async::<i64>(&mut conn).await }).await?;
        Ok(())
    }

    /// Runs one Redis step under the breaker and the timeout: one permit and one time
    /// limit for all of the step's scripts, so a step is one call to the breaker.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, LeaseError>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let permit = self.breaker.try_acquire()?;
        let work = async {
            let conn = self.redis.connection().await?;
            f(conn).await.map_err(BoxError::from)
        };
        match tokio::time::timeout(self.redis.timeout(), work).await {
            Ok(Ok(v)) => {
                permit.success();
                Ok(v)
            }
            Ok(Err(source)) => {
                permit.failure();
                self.redis.recover();
                Err(LeaseError::Redis { url: self.redis.url().to_owned(), source })
            }
            Err(_) => {
                permit.failure();
                self.redis.recover();
                Err(LeaseError::Timeout { url: self.redis.url().to_owned(), timeout: self.redis.timeout() })
            }
        }
    }
}

/// Sends every invocation at once (each on a clone of `conn`: the same sockets, pipelined)
/// and collects the answers in order. Every script runs to its end even when another
/// fails (a release on a healthy shard still frees its leases when another shard is
/// down); then any error fails the step.
async fn run_all<T: redis::FromRedisValue>(
    conn: RedisConnection,
    invocations: Vec<ScriptInvocation<'_>>,
) -> redis::RedisResult<Vec<T>> {
    join_all(invocations.iter().map(|inv| {
        let mut conn = conn.clone();
        async move { inv.invoke_async(&mut conn).await }
    }))
    .await
    .into_iter()
    .collect()
}

/// The text of a key (see [`Leases::key`]). Built by hand: it runs twice per id per
/// step, and `format!` cost more than the rest of building the script call.
fn key_text(prefix: &str, ns: &str, bucket: Option<u32>, kind: &str, id: &str) -> String {
    let bucket = bucket.map(|b| b.to_string());
    let bucket_len = bucket.as_ref().map_or(0, |b| b.len() + 1);
    let mut key = String::with_capacity(prefix.len() + ns.len() + bucket_len + kind.len() + id.len() + 5);
    key.push_str(prefix);
    key.push_str(":{");
    key.push_str(ns);
    if let Some(bucket) = &bucket {
        key.push(':');
        key.push_str(bucket);
    }
    key.push_str("}:");
    key.push_str(kind);
    key.push(':');
    key.push_str(id);
    key
}

#[cfg(test)]
mod tests {
    use super::key_text;

    #[test]
    fn key_layout_is_stable() {
        // Every process of a function must build the same keys: the layout is part of
        // the protocol (a change strands the leases and markers of a running version).
        assert_eq!(key_text("eo", "user-events", None, "lease", "h:a-1"), "eo:{user-events}:lease:h:a-1");
        assert_eq!(key_text("eo", "user-events", Some(17), "done", "h:a-1"), "eo:{user-events:17}:done:h:a-1");
    }
}
