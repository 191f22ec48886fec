//! The Redis connections of a process, apart from what is done with them: the guard's
//! leases ([`Leases`](crate::guard::lease::Leases)) use them, and so do `/readyz` (a PING)
//! and the operator's tools (the fault run's FLUSHALL).
//!
//! Two deployments, one interface ([`RedisConnection`]):
//! - **standalone** (`REDIS_MODE=standalone`): a pool of multiplexed connections to one
//!   address. A connection in steady use is handed out again as it is: checking it with a
//!   `PING` first (what `deadpool-redis` does on every checkout) would double the time of
//!   every Redis step. It is pinged first when it has not been checked out for
//!   `REDIS_PING_IDLE_MS`, and after any call in the pool went unanswered or failed at
//!   the connection level (a Redis restart or a network partition breaks them all at
//!   once: the calls in flight find out, the others are pinged before their next use,
//!   within a quarter of `REDIS_TIMEOUT_MS` and at most 250 ms). A connection that is
//!   closed, unreadable, or answers `READONLY` (a demoted primary) is replaced; one that
//!   was only slow is kept. Calls time out after `REDIS_TIMEOUT_MS` (redis-rs would
//!   otherwise stop waiting at 500 ms);
//! - **cluster** (`REDIS_MODE=cluster`): one multiplexed connection per node, found from
//!   the seed nodes in `REDIS_URL`. The client routes each command by the hash slot of its
//!   first key, follows `MOVED` and `ASK` redirections, retries `TRYAGAIN` and
//!   `CLUSTERDOWN` with a short backoff, and refreshes the slot map after a failover or a
//!   resharding. Every call stays bounded by `REDIS_TIMEOUT_MS` on top of that.
//!
//!   One gap is closed here: the client refreshes its slot map when a server redirects
//!   it, but a primary that died answers nothing, so requests for its slots would go on
//!   failing against its address after its replica took over. So after a failed call
//!   [`RedisClient::recover`] builds a fresh cluster connection from the seed nodes (at
//!   most once per second, in the background) and swaps it in.
//!
//! `rediss://` addresses use TLS (rustls, the system's roots, or `REDIS_TLS_CA_FILE`);
//! AUTH comes from the address (`redis://:<token>@host`, or `<user>:<token>@` for ACLs).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use deadpool::Runtime;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::config::{redact_url, RedisConfig, RedisMode};
use crate::BoxError;

/// Redis could not be reached at start-up.
#[derive(Debug, thiserror::Error)]
#[error("Redis at {url}: {source}; start it with scripts/services.sh or set REDIS_URL")]
pub struct RedisConnectError {
    /// The address, with any password replaced by `***`.
    pub url: String,
    /// What went wrong.
    #[source]
    pub source: BoxError,
}

#[derive(Clone)]
enum Backend {
    Pool(Pool),
    Cluster(Arc<Cluster>),
}

type Pool = managed::Pool<Manager>;

/// Makes the standalone pool's connections (as `deadpool-redis` does) and decides when
/// one needs a `PING` before it is handed out again (see the module docs).
struct Manager {
    inner: deadpool_redis::Manager,
    ping_idle: Duration,
    /// How long the PING before reuse may take: a quarter of `REDIS_TIMEOUT_MS`, at most
    /// 250 ms, so a stuck connection is given up and a new one made within the call's
    /// own time.
    check_timeout: Duration,
    failures: Arc<AtomicU64>,
    pings: AtomicU64,
}

/// A pooled connection.
struct Pooled {
    conn: MultiplexedConnection,
    /// `failures` when it was made or last answered a `PING`.
    verified: u64,
    /// Set when a call on it failed at the connection level.
    broken: Arc<AtomicBool>,
}

impl managed::Manager for Manager {
    type Type = Pooled;
    type Error = redis::RedisError;

    async fn create(&self) -> Result<Pooled, redis::RedisError> {
        let verified = self.failures.load(Ordering::SeqCst);
        let conn = managed::Manager::create(&self.inner).await?;
        Ok(Pooled { conn, verified, broken: Arc::default() })
    }

    async fn recycle(&self, conn: &mut Pooled, metrics: &Metrics) -> RecycleResult<redis::RedisError> {
        if conn.broken.load(Ordering::SeqCst) {
            return Err(RecycleError::message("a call on this connection failed; replaced"));
        }
        let failures = self.failures.load(Ordering::SeqCst);
        if conn.verified == failures && metrics.last_used() < self.ping_idle {
            return Ok(());
        }
        // UNWATCH and PING, in one round trip.
        self.pings.fetch_add(1, Ordering::Relaxed);
        let check =
            tokio::time::timeout(self.check_timeout, managed::Manager::recycle(&self.inner, &mut conn.conn, metrics));
        let failed = match check.await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(RecycleError::message(format!("no PONG within {} ms", self.check_timeout.as_millis()))),
        };
        if let Some(e) = failed {
            pool_event("check_failed");
            tracing::info!(error = %e, "a pooled Redis connection failed its check before reuse; replacing it");
            return Err(e);
        }
        pool_event("checked");
        conn.verified = failures;
        Ok(())
    }
}

fn pool_event(event: &str) {
    crate::metrics::metrics().redis_pool.with_label_values(&[event]).inc();
}

/// What a failed call says about its connection.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The server refused the command: the connection is fine.
    Fine,
    /// No answer in time: the connection may be stuck, or Redis slow or unreachable.
    /// Every connection is pinged before its next use (a stuck one fails the PING and is
    /// replaced); a slow but healthy one is kept.
    Suspect,
    /// The connection is gone (closed, reset, unreadable), or talks to a server that can
    /// no longer take writes (`READONLY`: a primary demoted in a failover, while the
    /// address now names the new one). It is replaced, and every other connection pinged.
    Broken,
}

fn verdict(e: &redis::RedisError) -> Verdict {
    if e.is_timeout() {
        Verdict::Suspect
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() || e.code() == Some("READONLY")
    {
        Verdict::Broken
    } else {
        Verdict::Fine
    }
}

/// The cluster connection in use, and what is needed to build a fresh one.
struct Cluster {
    client: ClusterClient,
    conn: RwLock<ClusterConnection>,
    rebuilding: AtomicBool,
    last_rebuild: Mutex<Option<Instant>>,
    connect_timeout: Duration,
}

/// Clears `rebuilding` however the rebuild ends (done, failed, panicked, or dropped with
/// its runtime), so a later failure can try again.
struct Rebuilding(Arc<Cluster>);

impl Drop for Rebuilding {
    fn drop(&mut self) {
        self.0.rebuilding.store(false, Ordering::SeqCst);
    }
}

/// How often a failing cluster connection may be rebuilt.
const REBUILD_EVERY: Duration = Duration::from_secs(1);

/// The Redis connections of a process, and where they go (for messages, without the
/// password).
#[derive(Clone)]
pub struct RedisClient {
    backend: Backend,
    url: String,
    timeout: Duration,
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.backend {
            Backend::Pool(_) => "standalone",
            Backend::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisClient")
            .field("url", &self.url)
            .field("mode", &mode)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// One connection: pooled (standalone) or to the whole cluster. Cheap to clone; clones
/// share the underlying sockets, so concurrent calls on clones are pipelined. A pooled
/// connection goes back to the pool when its last clone is dropped, so the pool still
/// spreads concurrent callers over its connections.
#[derive(Clone)]
pub struct RedisConnection(Inner);

#[derive(Clone)]
enum Inner {
    Standalone { conn: MultiplexedConnection, health: Health, _checked_out: Arc<managed::Object<Manager>> },
    Cluster(ClusterConnection),
}

/// Where a standalone connection reports a call that failed at the connection level.
#[derive(Clone)]
struct Health {
    broken: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
}

impl Health {
    /// `call`, noting what its failure says about the connection (see [`Verdict`]). A
    /// call given up before its answer (a caller's timeout around it) counts as
    /// [`Verdict::Suspect`]: the answer may never come.
    fn watch<'a, T: Send + 'a>(&self, call: RedisFuture<'a, T>) -> RedisFuture<'a, T> {
        let mut unanswered = Unanswered(Some(self.clone()));
        Box::pin(async move {
            let result = call.await;
            let Some(health) = unanswered.0.take() else { return result };
            if let Err(e) = &result {
                match verdict(e) {
                    Verdict::Fine => {}
                    Verdict::Suspect => health.unanswered(),
                    Verdict::Broken => {
                        if !health.broken.swap(true, Ordering::SeqCst) {
                            pool_event("call_failed");
                            tracing::warn!(error = %e, "a Redis connection failed; replacing it and checking the others before reuse");
                            health.suspect();
                        }
                    }
                }
            }
            result
        })
    }

    fn suspect(&self) {
        self.failures.fetch_add(1, Ordering::SeqCst);
    }

    fn unanswered(&self) {
        pool_event("call_unanswered");
        self.suspect();
    }
}

/// Marks the pool suspect when a watched call is dropped before its answer.
struct Unanswered(Option<Health>);

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(health) = self.0.take() {
            health.unanswered();
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Inner::Standalone { conn, health, .. } => health.watch(conn.req_packed_command(cmd)),
            Inner::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Inner::Standalone { conn, health, .. } => health.watch(conn.req_packed_commands(pipeline, offset, count)),
            Inner::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Inner::Standalone { conn, .. } => conn.get_db(),
            Inner::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisClient {
    /// Connects (standalone: builds the pool and takes one connection; cluster: reads the
    /// slot map from the seed nodes and connects to every node), so an unreachable Redis
    /// fails start-up with its address instead of the first batch.
    pub async fn connect(config: &RedisConfig) -> Result<Self, RedisConnectError> {
        let url = redact_url(config.url.expose());
        let err = |source: BoxError| RedisConnectError { url: url.clone(), source };
        let certificates = tls_certificates(config).map_err(err)?;
        let backend = match config.mode {
            RedisMode::Standalone => {
                let info = match &certificates {
                    Some(certs) => redis::Client::build_with_tls(config.url.expose(), certs.clone())
                        .map_err(|e| err(e.into()))?
                        .get_connection_info()
                        .clone(),
                    None => redis::IntoConnectionInfo::into_connection_info(config.url.expose())
                        .map_err(|e| err(e.into()))?,
                };
                // redis-rs's own defaults (500 ms per call, 1 s to connect) would cut
                // REDIS_TIMEOUT_MS short.
                let timeouts = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(config.timeout))
                    .set_connection_timeout(Some(config.timeout));
                let inner = deadpool_redis::Manager::new_with_config(info, timeouts).map_err(|e| err(e.into()))?;
                let manager = Manager {
                    inner,
                    ping_idle: config.ping_idle,
                    check_timeout: (config.timeout / 4).min(Duration::from_millis(250)),
                    failures: Arc::default(),
                    pings: AtomicU64::new(0),
                };
                let pool = Pool::builder(manager)
                    .max_size(config.pool_size)
                    // The connection used last is handed out first, so a few stay in
                    // steady use (no PING) and the rest idle until a burst needs them.
                    .queue_mode(managed::QueueMode::Lifo)
                    .wait_timeout(Some(config.timeout))
                    .create_timeout(Some(config.timeout))
                    .runtime(Runtime::Tokio1)
                    .build()
                    .map_err(|e| err(e.into()))?;
                Backend::Pool(pool)
            }
            RedisMode::Cluster => {
                let seeds = crate::config::split_urls(config.url.expose());
                let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
                    .connection_timeout(config.timeout)
                    .response_timeout(config.timeout)
                    // Redirections and TRYAGAIN during a slot migration are retried with a
                    // short backoff; REDIS_TIMEOUT_MS still bounds the whole call.
                    .retries(8)
                    .min_retry_wait(5)
                    .max_retry_wait(200);
                if let Some(certs) = certificates {
                    builder = builder.certs(certs);
                }
                let client = builder.build().map_err(|e| err(e.into()))?;
                let conn = cluster_connection(&client, config.connect_timeout).await.map_err(err)?;
                Backend::Cluster(Arc::new(Cluster {
                    client,
                    conn: RwLock::new(conn),
                    rebuilding: AtomicBool::new(false),
                    last_rebuild: Mutex::new(None),
                    connect_timeout: config.connect_timeout,
                }))
            }
        };
        let client = Self { backend, url: url.clone(), timeout: config.timeout };
        client.connection().await.map_err(err)?;
        Ok(client)
    }

    /// A connection, within the configured timeout.
    pub async fn connection(&self) -> Result<RedisConnection, BoxError> {
        match &self.backend {
            Backend::Cluster(cluster) => {
                let conn = cluster.conn.read().unwrap_or_else(|p| p.into_inner()).clone();
                Ok(RedisConnection(Inner::Cluster(conn)))
            }
            Backend::Pool(pool) => match tokio::time::timeout(self.timeout, pool.get()).await {
                Ok(Ok(pooled)) => {
                    let conn = pooled.conn.clone();
                    let health = Health { broken: pooled.broken.clone(), failures: pool.manager().failures.clone() };
                    Ok(RedisConnection(Inner::Standalone { conn, health, _checked_out: Arc::new(pooled) }))
                }
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(format!("no connection within {} ms", self.timeout.as_millis()).into()),
            },
        }
    }

    /// Called after a failed call. In cluster mode, builds a fresh connection (a new slot
    /// map read from the seed nodes) in the background and swaps it in: at most one
    /// rebuild at a time and one per second. Calls in flight finish on the old one.
    /// Nothing to do in standalone mode, where the pool replaces broken connections.
    pub fn recover(&self) {
        let Backend::Cluster(cluster) = &self.backend else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        {
            let mut last = cluster.last_rebuild.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < REBUILD_EVERY) || cluster.rebuilding.swap(true, Ordering::SeqCst) {
                return;
            }
            *last = Some(Instant::now());
        }
        let (guard, url) = (Rebuilding(cluster.clone()), self.url.clone());
        runtime.spawn(async move {
            let cluster = &guard.0;
            match cluster_connection(&cluster.client, cluster.connect_timeout).await {
                Ok(conn) => {
                    *cluster.conn.write().unwrap_or_else(|p| p.into_inner()) = conn;
                    tracing::info!(redis = %url, "rebuilt the Redis cluster connection after a failed call (fresh slot map)");
                }
                Err(e) => {
                    tracing::warn!(redis = %url, error = %e, "could not rebuild the Redis cluster connection; retrying after the next failure")
                }
            }
            drop(guard);
        });
    }

    /// True when Redis (in a cluster: every node) answers a PING within `within`.
    ///
    /// A failed PING rebuilds a cluster connection as a failed call does, so an idle
    /// process does not stay not-ready on a slot map from before a failover.
    pub async fn ping(&self, within: Duration) -> bool {
        let ping = async {
            let mut conn = self.connection().await.ok()?;
            redis::cmd("PING").query_async::<String>(&mut conn).await.ok()
        };
        let ok = matches!(tokio::time::timeout(within, ping).await, Ok(Some(_)));
        if !ok {
            self.recover();
        }
        ok
    }

    /// How many `PING`s the standalone pool has sent to check a connection before
    /// handing it out (always 0 on a cluster): round trips on top of the calls
    /// themselves, which the benchmark reports beside the guard's own.
    pub fn pings(&self) -> u64 {
        match &self.backend {
            Backend::Pool(pool) => pool.manager().pings.load(Ordering::Relaxed),
            Backend::Cluster(_) => 0,
        }
    }

    /// True for a cluster connection.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// The address, with any password replaced by `***`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How long one call may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

/// A cluster connection: the slot map read from the seed nodes and a connection to every
/// node, within `timeout`.
async fn cluster_connection(client: &ClusterClient, timeout: Duration) -> Result<ClusterConnection, BoxError> {
    match tokio::time::timeout(timeout, client.get_async_connection()).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(format!("no cluster connection within {} ms", timeout.as_millis()).into()),
    }
}

/// `REDIS_TLS_CA_FILE`, read: `None` means the system's roots (which honour
/// `SSL_CERT_FILE`).
fn tls_certificates(config: &RedisConfig) -> Result<Option<redis::TlsCertificates>, BoxError> {
    let Some(path) = &config.tls_ca_file else { return Ok(None) };
    let pem = std::fs::read(path).map_err(|e| format!("REDIS_TLS_CA_FILE {}: {e}", path.display()))?;
    Ok(Some(redis::TlsCertificates { client_tls: None, root_cert: Some(pem) }))
}

#[cfg(test)]
mod tests {
    use super::{verdict, Verdict};
    use redis::{ErrorKind, RedisError, ServerErrorKind};
    use std::io;

    /// How a failed call's error is read. (The pool acting on it, against a real Redis:
    /// `tests/outages.rs`.)
    #[test]
    fn a_failed_call_is_judged_by_what_it_says_about_the_connection() {
        let io = |kind| RedisError::from(io::Error::new(kind, "on the socket"));
        assert_eq!(verdict(&io(io::ErrorKind::TimedOut)), Verdict::Suspect);
        for kind in [io::ErrorKind::ConnectionReset, io::ErrorKind::BrokenPipe, io::ErrorKind::UnexpectedEof] {
            assert_eq!(verdict(&io(kind)), Verdict::Broken, "{kind:?}");
        }
        let server = |kind| RedisError::from((ErrorKind::Server(kind), "from the server"));
        assert_eq!(verdict(&server(ServerErrorKind::ReadOnly)), Verdict::Broken, "a demoted primary");
        for kind in [ServerErrorKind::ResponseError, ServerErrorKind::NoScript, ServerErrorKind::BusyLoading] {
            assert_eq!(verdict(&server(kind)), Verdict::Fine, "{kind:?}");
        }
        assert_eq!(verdict(&RedisError::from((ErrorKind::Parse, "garbled reply"))), Verdict::Broken);
    }
}
