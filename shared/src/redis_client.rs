//! The Redis connection pool of a process, apart from what is done with it: the guard's
//! leases ([`Leases`](crate::guard::lease::Leases)) use it, and so do `/readyz` (a PING)
//! and the operator's tools (the fault run's FLUSHALL).

use std::time::Duration;

use deadpool_redis::{Connection, Pool, Runtime};

use crate::config::{redact_url, RedisConfig};
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

/// A pool of Redis connections, and where they go (for messages, without the password).
#[derive(Clone)]
pub struct RedisClient {
    pool: Pool,
    url: String,
    timeout: Duration,
}

impl std::fmt::Debug for RedisClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClient").field("url", &self.url).field("timeout", &self.timeout).finish()
    }
}

impl RedisClient {
    /// Builds the pool and takes one connection, so an unreachable Redis fails start-up
    /// with its address instead of the first batch.
    pub async fn connect(config: &RedisConfig) -> Result<Self, RedisConnectError> {
        let url = redact_url(config.url.expose());
        let err = |source: BoxError| RedisConnectError { url: url.clone(), source };
        let pool = deadpool_redis::Config::from_url(config.url.expose())
            .builder()
            .map_err(|e| err(e.into()))?
            .max_size(config.pool_size)
            .wait_timeout(Some(config.timeout))
            .create_timeout(Some(config.timeout))
            .recycle_timeout(Some(config.timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| err(e.into()))?;
        let client = Self { pool, url: url.clone(), timeout: config.timeout };
        client.connection().await.map_err(err)?;
        Ok(client)
    }

    /// A connection from the pool, within the configured timeout.
    pub async fn connection(&self) -> Result<Connection, BoxError> {
        match tokio::time::timeout(self.timeout, self.pool.get()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(format!("no connection within {} ms", self.timeout.as_millis()).into()),
        }
    }

    /// True when Redis answers a PING within `within`.
    pub async fn ping(&self, within: Duration) -> bool {
        let ping = async {
            let mut conn = self.pool.get().await.ok()?;
            redis::cmd("PING").query_async::<String>(&mut conn).await.ok()
        };
        matches!(tokio::time::timeout(within, ping).await, Ok(Some(_)))
    }

    /// The pool itself.
    pub fn pool(&self) -> &Pool {
        &self.pool
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
