//! Redis: leases and done markers, one round trip per batch in each direction.
//!
//! Keys: one per event id, `<prefix>:{<tag>}:event:<id>`, holding either the token of the
//! batch working on the event (its lease) or, once the event is confirmed, `done:` and
//! the payload hash (its done marker). The tag is the namespace, or with
//! `REDIS_KEY_BUCKETS` above one `<namespace>:<bucket>`, the bucket being a fixed hash
//! (FNV-1a) of the id. The tag is a Redis hash tag: every key with the same tag sits in
//! one cluster slot, so a script or pipeline over one bucket's keys is legal on Redis
//! Cluster, and the buckets spread a function's keys over slots and so over shards.
//!
//! One key rather than a lease key and a marker key: a new id costs Redis two key
//! operations with commands (`SET NX PX GET` to lease it; one `SET` turning it into the
//! marker), three with scripts (a read first), and half the keys of two. Both states
//! still mean what they did: a key that exists is either someone's lease (busy) or a
//! marker (done), and `SET NX` takes a lease only where there is neither.
//!
//! Plain commands where a key needs no condition beyond its own ([`Calls::Commands`],
//! standalone Redis 7.0 and later): the lease step sends one `SET key token NX PX ttl
//! GET` per id, which takes a missing key and answers what an existing one holds in one
//! operation, and the release step writes each done marker with a plain `SET`.
//! Pipelined, these cost Redis about what as many bare `SET NX` cost it, where the same
//! work inside a Lua script cost about one and a half times that (every `redis.call`
//! converts its arguments and reply between Lua and Redis). Scripts remain where one
//! key's change depends on its read (compare-and-delete of a lease, the holder check),
//! and for both steps on Redis Cluster and on servers before 7.0 ([`Calls::Scripts`]).
//!
//! A batch sends one pipeline (or script) per bucket it touches, all at once, and waits
//! for the last: about one round trip per step whatever the number of buckets. In
//! standalone mode the default is one bucket, which is one call per step.
//!
//! Invariants:
//! - a lease is only ever deleted or turned into a marker by the holder of its token
//!   (compare-and-delete inside the script, never a plain DEL), except that a confirmed
//!   event's marker replaces whatever lease is there: the event is in Postgres, so a
//!   holder whose lease it overwrites finds the event confirmed when it confirms;
//! - a marker is never replaced by a lease (`SET NX`) and never deleted by a release;
//! - Redis is an optimisation: every caller must treat an error here as "no lease
//!   information" and fall back to Postgres, which stays the truth.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use redis::{Script, ScriptInvocation};

use crate::breaker::{BreakerOpen, CircuitBreaker};
use crate::event::PayloadHash;
use crate::event_id::{EventId, Namespace};
use crate::redis_client::{RedisClient, RedisConnectError, RedisConnection};
use crate::BoxError;

/// The lease step as a script ([`Calls::Scripts`]).
/// KEYS: n event keys; ARGV: token, ttl (ms). One MGET reads every key; a missing one
/// gets `SET NX PX` (the lease), one holding our own token is extended (a client that
/// resent the script after losing its answer must not find its own lease busy), one
/// holding a marker answers done. Replies the marker's hash (done; empty if it has
/// none), 1 (lease taken, or already ours) or 0 (busy: someone else holds it). Numbers,
/// not letters: an integer reply costs the client no allocation, and most ids get one.
/// (MGET reads a key of another type as missing; its `SET NX` fails and the `GET` after
/// it raises WRONGTYPE, failing the step as such a key always has.)
const ACQUIRE: &str = r#"
local n = #KEYS
local held = {}
for from = 1, n, 4000 do
  local part = redis.call('MGET', unpack(KEYS, from, math.min(from + 3999, n)))
  for j = 1, #part do held[from + j - 1] = part[j] end
end
local out = {}
for i = 1, n do
  local v = held[i]
  if not v then
    if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
      out[i] = 1
    else
      redis.call('GET', KEYS[i])
      out[i] = 0
    end
  elseif v == ARGV[1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[2])
    out[i] = 1
  elseif string.sub(v, 1, 5) == 'done:' then
    out[i] = string.sub(v, 6)
  else
    out[i] = 0
  end
end
return out
"#;

/// KEYS: n event keys; ARGV: token, done ttl (ms), then one marker per id (empty: no
/// marker). A confirmed id's marker is written over its key, whatever it holds (our
/// lease, or one taken after ours lapsed: the event is confirmed either way), without
/// reading it first. The other ids' keys are read with one MGET and those still holding
/// our token deleted with one DEL (compare-and-delete). Returns how many keys were
/// written or deleted. With [`Calls::Commands`] it gets only the ids without a marker
/// (the markers go as plain `SET`s beside it).
const RELEASE: &str = r#"
local open = {}
local written = 0
for i = 1, #KEYS do
  if ARGV[2 + i] ~= '' then
    redis.call('SET', KEYS[i], 'done:' .. ARGV[2 + i], 'PX', ARGV[2])
    written = written + 1
  else
    open[#open + 1] = KEYS[i]
  end
end
local mine = {}
for from = 1, #open, 4000 do
  local to = math.min(from + 3999, #open)
  local held = redis.call('MGET', unpack(open, from, to))
  for j = 1, #held do
    if held[j] == ARGV[1] then mine[#mine + 1] = open[from + j - 1] end
  end
end
for from = 1, #mine, 4000 do
  redis.call('DEL', unpack(mine, from, math.min(from + 3999, #mine)))
end
return written + #mine
"#;

/// KEYS: n event keys; ARGV: token, ttl (ms). For each lease: still ours? Then it is
/// extended by ttl, so it cannot lapse while the caller acts on the answer. Replies
/// 1 (ours) or 0 (expired, someone else's, or done) per key.
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

/// KEYS: one event key. Deletes it if it holds a done marker (a lease is left alone).
const FORGET: &str = r#"
local held = redis.call('GET', KEYS[1])
if held and string.sub(held, 1, 5) == 'done:' then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The prefix of a done marker's value (a lease's is a UUID token).
const DONE: &str = "done:";

/// How the lease and release steps talk to Redis, chosen at connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calls {
    /// Plain commands, pipelined: one `SET key token NX PX ttl GET` per id to lease (a
    /// missing key is taken and the reply is nil; an existing one is left as it is and
    /// its value answered: a marker, our own token, or someone else's), one plain `SET`
    /// per done marker; the release script only for the ids without a marker.
    /// Standalone Redis 7.0 and later, Valkey.
    Commands,
    /// The acquire and release scripts: Redis Cluster, and servers before Redis 7.0
    /// (which refuse `NX` together with `GET`). On a cluster a pipeline is redirected
    /// as a whole (one `ASKING` for all of it while a slot migrates), so a key could be
    /// written on the importing node while it still lives on the old one; a script is
    /// refused there (`TRYAGAIN`) and writes nothing.
    Scripts,
}

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
    /// [`Calls::Scripts`] when set (an atomic: a server found refusing the commands
    /// later, after a failover to an older one, switches it).
    by_script: AtomicBool,
    acquire: Script,
    release: Script,
    hold: Script,
    forget: Script,
}

impl Leases {
    /// Leases over `redis`, keys under `prefix`, spread over `buckets` hash slots per
    /// namespace (at least one). Loads the scripts now (on every node of a cluster): it
    /// saves the first batch a NOSCRIPT round trip, and a Redis that refuses scripts fails
    /// start-up. On a standalone server, then finds out whether it takes
    /// `SET ... NX ... GET`: [`Calls::Commands`] if it does, [`Calls::Scripts`] if not
    /// (and on a cluster).
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
            by_script: AtomicBool::new(true),
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
            hold: Script::new(HOLD),
            forget: Script::new(FORGET),
        };
        let err = |source: BoxError| RedisConnectError { url: leases.redis.url().to_owned(), source };
        let mut conn = leases.redis.connection().await.map_err(err)?;
        for script in [&leases.acquire, &leases.release, &leases.hold, &leases.forget] {
            script.load_async(&mut conn).await.map_err(|e| err(e.into()))?;
        }
        if !leases.redis.is_cluster() {
            let by_script = !takes_set_nx_get(&mut conn, &leases.prefix).await;
            leases.by_script.store(by_script, Ordering::Relaxed);
        }
        Ok(leases)
    }

    /// How the lease and release steps talk to Redis.
    pub fn calls(&self) -> Calls {
        if self.by_script.load(Ordering::Relaxed) {
            Calls::Scripts
        } else {
            Calls::Commands
        }
    }

    /// Talks to Redis as `calls` says from now on. For tests and benchmarks of the script
    /// form on a current server: the form chosen at connect is the right one otherwise.
    pub fn set_calls(&self, calls: Calls) {
        self.by_script.store(calls == Calls::Scripts, Ordering::Relaxed);
    }

    /// The breaker in front of Redis.
    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.breaker
    }

    /// The Redis key of `id`, holding its lease or its done marker:
    /// `<prefix>:{<namespace>}:event:<id>` with one bucket,
    /// `<prefix>:{<namespace>:<bucket>}:event:<id>` with more.
    pub fn key(&self, ns: &Namespace, id: &EventId) -> String {
        let bucket = (self.buckets != 1).then(|| self.bucket(id));
        key_text(&self.prefix, ns.as_str(), bucket, "event", id.as_str())
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
        if self.calls() == Calls::Scripts {
            return self.acquire_by_script(ns, ids, token, ttl).await;
        }
        match self.acquire_by_commands(ns, ids, token, ttl).await {
            // A server that refuses the commands now (a failover to an older version):
            // scripts from here on, and this step again by script (what the commands
            // wrote, if anything, is ours: the script answers it as ours).
            Err(LeaseError::Redis { source, .. }) if refuses_set_nx_get(&*source) => {
                tracing::warn!(error = %source, "Redis refuses SET with NX and GET: leases are taken by script from now on");
                self.by_script.store(true, Ordering::Relaxed);
                self.acquire_by_script(ns, ids, token, ttl).await
            }
            other => other,
        }
    }

    /// The lease step by commands ([`Calls::Commands`]).
    async fn acquire_by_commands(
        &self,
        ns: &Namespace,
        ids: &[&EventId],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<LeaseReply>, LeaseError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let groups = self.groups(ids.iter().copied());
        let ttl = ttl.as_millis().max(1).to_string();
        let pipes: Vec<redis::Pipeline> = groups
            .iter()
            .map(|group| {
                let mut pipe = redis::Pipeline::with_capacity(group.len());
                for &i in group {
                    pipe.cmd("SET").arg(self.key(ns, ids[i])).arg(token).arg("NX").arg("PX").arg(&ttl).arg("GET");
                }
                pipe
            })
            .collect();
        let replies: Vec<Vec<redis::Value>> = self.call(|conn| run_pipes(conn, pipes)).await?;
        self.in_id_order("acquire", &groups, replies, ids.len())?
            .into_iter()
            .map(|r| match r {
                // The key was missing: ours now.
                redis::Value::Nil => Ok(LeaseReply::Acquired),
                // Our own token: a resent call whose first answer was lost.
                redis::Value::BulkString(b) if b == token.as_bytes() => Ok(LeaseReply::Acquired),
                redis::Value::BulkString(b) => Ok(match b.strip_prefix(DONE.as_bytes()) {
                    Some(hash) => LeaseReply::Done(std::str::from_utf8(hash).ok().and_then(PayloadHash::from_hex)),
                    None => LeaseReply::Busy,
                }),
                other => Err(self.malformed(format!("SET NX GET answered {other:?} for an id"))),
            })
            .collect()
    }

    /// The lease step by script ([`Calls::Scripts`]).
    async fn acquire_by_script(
        &self,
        ns: &Namespace,
        ids: &[&EventId],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<LeaseReply>, LeaseError> {
        let replies: Vec<redis::Value> = self.per_id("acquire", &self.acquire, ns, ids, token, ttl).await?;
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
    /// script gets the keys of its ids, then `token` and `ttl` (ms); it answers one reply
    /// per id. The replies come back in the order of `ids`.
    async fn per_id<T: redis::FromRedisValue>(
        &self,
        name: &str,
        script: &Script,
        ns: &Namespace,
        ids: &[&EventId],
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
                for &i in group {
                    inv.key(self.key(ns, ids[i]));
                }
                inv.arg(token).arg(ttl);
                inv
            })
            .collect();
        let replies: Vec<Vec<T>> = self.call(|conn| run_all(conn, invocations)).await?;
        self.in_id_order(name, &groups, replies, ids.len())
    }

    /// The replies of each bucket's call (`replies[g]` for the ids at positions
    /// `groups[g]`), put back in the order of the `n` ids. A call that answered other
    /// than one reply per id fails the step (a short answer must not be read as "the
    /// rest are fine").
    fn in_id_order<T>(
        &self,
        step: &str,
        groups: &[Vec<usize>],
        replies: Vec<Vec<T>>,
        n: usize,
    ) -> Result<Vec<T>, LeaseError> {
        let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(n).collect();
        for (group, replies) in groups.iter().zip(replies) {
            if replies.len() != group.len() {
                return Err(self.malformed(format!("{step}: {} replies for {} ids", replies.len(), group.len())));
            }
            for (&i, r) in group.iter().zip(replies) {
                out[i] = Some(r);
            }
        }
        // Every id is in exactly one group and every group answered one reply per id.
        out.into_iter().map(|r| r.ok_or_else(|| self.malformed(format!("{step}: an id without a reply")))).collect()
    }

    /// One round trip: writes done markers (each replacing its id's lease) and frees the
    /// other leases our token still holds. Returns how many keys were written or freed.
    ///
    /// Per bucket, with [`Calls::Commands`], the markers go as a pipeline of plain
    /// `SET key done:<hash> PX ttl` (no condition: see the module's invariants) and the
    /// other ids to the release script, sent only when there are such ids; all at once.
    /// With [`Calls::Scripts`], the release script does both.
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
        let done_ttl = done_ttl.as_millis().max(1).to_string();
        let commands = self.calls() == Calls::Commands;
        let mut pipes: Vec<redis::Pipeline> = Vec::new();
        let mut invocations: Vec<ScriptInvocation<'_>> = Vec::new();
        let mut written = 0u64;
        for group in self.groups(items.iter().map(|item| item.id)) {
            let mut pipe = redis::Pipeline::new();
            let mut inv: Option<ScriptInvocation<'_>> = None;
            for i in group {
                let key = self.key(ns, items[i].id);
                match items[i].done {
                    Some(hash) if commands => {
                        let mut marker = String::with_capacity(DONE.len() + 64);
                        marker.push_str(DONE);
                        marker.push_str(&hash.to_hex());
                        pipe.cmd("SET").arg(key).arg(marker).arg("PX").arg(&done_ttl).ignore();
                        written += 1;
                    }
                    done => {
                        inv.get_or_insert_with(|| {
                            let mut inv = self.release.prepare_invoke();
                            inv.arg(token).arg(&done_ttl);
                            inv
                        })
                        .key(key)
                        .arg(done.map(|h| h.to_hex()).unwrap_or_default());
                    }
                }
            }
            if !pipe.is_empty() {
                pipes.push(pipe);
            }
            invocations.extend(inv);
        }
        let (_, freed): ((), Vec<u64>) = self
            .call(|conn| async move {
                // Both run to their end; then either's error fails the step.
                let (set, freed) = tokio::join!(run_pipes::<()>(conn.clone(), pipes), run_all(conn, invocations));
                Ok((set.map(drop)?, freed?))
            })
            .await?;
        Ok(written + freed.into_iter().sum::<u64>())
    }

    /// One round trip: which of `ids` our token still leases; those are extended by
    /// `ttl`. Only the holder may count a failed attempt or dead-letter an event: a
    /// consumer whose lease expired mid-handler must not fail an event another consumer
    /// is handling now (or one another consumer confirmed: its marker replaced the lease).
    pub async fn still_held(
        &self,
        ns: &Namespace,
        ids: &[&EventId],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<bool>, LeaseError> {
        let held: Vec<i64> = self.per_id("hold", &self.hold, ns, ids, token, ttl).await?;
        Ok(held.into_iter().map(|h| h == 1).collect())
    }

    fn malformed(&self, what: String) -> LeaseError {
        LeaseError::Redis { url: self.redis.url().to_owned(), source: what.into() }
    }

    /// What Redis holds for one id: the lease (token, ms left) or the done marker (its
    /// hash, possibly empty).
    pub async fn inspect(
        &self,
        ns: &Namespace,
        id: &EventId,
    ) -> Result<(Option<(String, i64)>, Option<String>), LeaseError> {
        let key = self.key(ns, id);
        let (held, pttl): (Option<String>, i64) = self
            .call(|mut conn| async move { redis::pipe().get(&key).cmd("PTTL").arg(&key).query_async(&mut conn).await })
            .await?;
        Ok(match held {
            Some(marker) if marker.starts_with(DONE) => (None, Some(marker[DONE.len()..].to_owned())),
            Some(token) => (Some((token, pttl)), None),
            None => (None, None),
        })
    }

    /// Deletes the done marker of `id` (a dead letter being replayed); a lease someone
    /// holds on it now is left alone.
    pub async fn forget(&self, ns: &Namespace, id: &EventId) -> Result<(), LeaseError> {
        let key = self.key(ns, id);
        let forget = &self.forget;
        self.call(|mut conn| async move { forget.key(&key).invoke_async::<i64>(&mut conn).await }).await?;
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

/// Whether the server takes `SET key value NX PX ttl GET` (Redis 7.0 and later). The
/// probe key is in no namespace's slot, holds no token a batch could use, and is
/// deleted at once. Any answer but the refusal of a server before 7.0 (`ERR syntax
/// error`) is not taken as its verdict: a Redis that is out of memory, read-only or
/// refuses the probe key by ACL gets scripts, which work on every version, and starts
/// (the guard runs on Postgres alone while Redis refuses writes, as always).
async fn takes_set_nx_get(conn: &mut RedisConnection, prefix: &str) -> bool {
    let probe = format!("{prefix}:{{probe}}:set-nx-get");
    let probed: redis::RedisResult<(Option<String>, i64)> = redis::pipe()
        .cmd("SET")
        .arg(&probe)
        .arg("probe")
        .arg("NX")
        .arg("PX")
        .arg(1000)
        .arg("GET")
        .cmd("DEL")
        .arg(&probe)
        .query_async(conn)
        .await;
    match probed {
        Ok(_) => true,
        Err(e) if refuses_set_nx_get(&e) => {
            tracing::info!(error = %e, "Redis refuses SET with NX and GET (before 7.0): leases are taken by script");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not find out whether Redis takes SET with NX and GET: leases are taken by script");
            false
        }
    }
}

/// Whether `e` is a server's refusal of `SET ... NX ... GET`: `ERR syntax error`
/// (Redis 6.2 and before).
fn refuses_set_nx_get(e: &(dyn std::error::Error + 'static)) -> bool {
    e.to_string().to_ascii_lowercase().contains("syntax error")
}

/// Sends every pipeline at once (each on a clone of `conn`) and collects their replies
/// in order; like [`run_all`], each runs to its end, then any error fails the step.
async fn run_pipes<T: redis::FromRedisValue>(
    conn: RedisConnection,
    pipes: Vec<redis::Pipeline>,
) -> redis::RedisResult<Vec<T>> {
    join_all(pipes.iter().map(|pipe| {
        let mut conn = conn.clone();
        async move { pipe.query_async(&mut conn).await }
    }))
    .await
    .into_iter()
    .collect()
}

/// The text of a key (see [`Leases::key`]). Built by hand: it runs once per id per
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
        assert_eq!(key_text("eo", "user-events", None, "event", "h:a-1"), "eo:{user-events}:event:h:a-1");
        assert_eq!(key_text("eo", "user-events", Some(17), "event", "h:a-1"), "eo:{user-events:17}:event:h:a-1");
    }
}
