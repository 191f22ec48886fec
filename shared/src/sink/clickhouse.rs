//! The ClickHouse sink: batched inserts over HTTP, under the ClickHouse breaker.
//!
//! Invariants:
//! - the breaker is checked before every write and fed by every write's result;
//! - the server version is detected once, at connect; row validation, lz4 compression
//!   and `insert_deduplication_token` are used only where the server supports them
//!   (the local Debian server is 18.16 and has none of them);
//! - exactly-once never depends on the dedup token: tables are ReplacingMergeTree keyed
//!   by the event id, so a repeated insert collapses on every server version.

use std::sync::Arc;
use std::time::Duration;

use clickhouse::{Client, Compression};

use super::SinkBatch;
use crate::breaker::{BreakerOpen, BreakerState, CircuitBreaker};
use crate::config::{is_identifier, ClickHouseConfig};

/// `major.minor` of the server, from `SELECT version()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    pub major: u32,
    pub minor: u32,
}

impl ServerVersion {
    pub fn parse(s: &str) -> Option<Self> {
        let mut parts = s.trim().split('.');
        Some(Self { major: parts.next()?.parse().ok()?, minor: parts.next()?.parse().ok()? })
    }

    /// `insert_deduplication_token` exists since 22.2.
    pub fn supports_dedup_token(&self) -> bool {
        *self >= Self { major: 22, minor: 2 }
    }

    /// The crate's validation needs `RowBinaryWithNamesAndTypes` and today's type names;
    /// we enable it on servers that are still supported upstream (24.x and later).
    pub fn supports_validation(&self) -> bool {
        self.major >= 24
    }

    /// 18.16 answers `compress=1` requests with empty bodies.
    pub fn supports_compression(&self) -> bool {
        self.major >= 20
    }
}

impl std::fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The breaker is open: fail fast, retry later.
    #[error("ClickHouse unavailable: {0}")]
    BreakerOpen(#[from] BreakerOpen),
    #[error("ClickHouse at {url}: insert into `{table}` failed: {message} (breaker {breaker})")]
    Write { url: String, table: String, message: String, breaker: BreakerState },
    #[error("ClickHouse at {url}: no answer within {} ms (breaker {breaker})", timeout.as_millis())]
    Timeout { url: String, timeout: Duration, breaker: BreakerState },
    #[error("ClickHouse at {url}: {message}; start it with scripts/services.sh or set CLICKHOUSE_URL")]
    Unreachable { url: String, message: String },
    #[error("ClickHouse at {url}: DDL failed: {message}")]
    Ddl { url: String, message: String },
    #[error(transparent)]
    RowType(#[from] super::RowTypeMismatch),
}

pub struct ClickHouseSink {
    client: Client,
    breaker: Arc<CircuitBreaker>,
    version: ServerVersion,
    config: ClickHouseConfig,
}

impl ClickHouseSink {
    /// Connects, detects the server version and creates the configured database if
    /// missing. Fails fast with a message naming the URL when the server is unreachable.
    pub async fn connect(config: &ClickHouseConfig, breaker: Arc<CircuitBreaker>) -> Result<Self, SinkError> {
        let base = Client::default()
            .with_url(&config.url)
            .with_user(&config.user)
            .with_password(config.password.expose())
            .with_validation(false)
            .with_compression(Compression::None);
        let unreachable = |message: String| SinkError::Unreachable { url: config.url.clone(), message };
        let raw: String = tokio::time::timeout(config.timeout, base.query("SELECT version()").fetch_one::<String>())
            .await
            .map_err(|_| unreachable(format!("no answer within {} ms", config.timeout.as_millis())))?
            .map_err(|e| unreachable(e.to_string()))?;
        let version =
            ServerVersion::parse(&raw).ok_or_else(|| unreachable(format!("unexpected version string {raw:?}")))?;

        if !is_identifier(&config.database) {
            return Err(SinkError::Ddl {
                url: config.url.clone(),
                message: format!("invalid database name {:?}", config.database),
            });
        }
        base.query(&format!("CREATE DATABASE IF NOT EXISTS {}", config.database))
            .execute()
            .await
            .map_err(|e| SinkError::Ddl { url: config.url.clone(), message: e.to_string() })?;

        let mut client = base.with_database(&config.database).with_validation(version.supports_validation());
        if version.supports_compression() {
            client = client.with_compression(Compression::Lz4);
        }
        tracing::info!(url = %config.url, %version, dedup_token = version.supports_dedup_token(), "connected to ClickHouse");
        Ok(Self { client, breaker, version, config: config.clone() })
    }

    pub fn version(&self) -> ServerVersion {
        self.version
    }

    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.breaker
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn database(&self) -> &str {
        &self.config.database
    }

    /// Fails fast when the breaker is open, without taking a probe slot: handlers call
    /// this before staging a row, so an outage stops the batch before any work.
    pub fn check_available(&self) -> Result<(), SinkError> {
        match self.breaker.retry_in() {
            Some(retry_in) if !retry_in.is_zero() => {
                Err(SinkError::BreakerOpen(BreakerOpen { dependency: self.breaker.dependency(), retry_in }))
            }
            _ => Ok(()),
        }
    }

    /// Applies DDL statements (separated by `;`), each idempotent (`IF NOT EXISTS`).
    /// `--` comment lines are dropped first: older servers reject a statement that
    /// starts with one as empty.
    pub async fn apply_ddl(&self, ddl: &str) -> Result<(), SinkError> {
        let ddl: String = ddl.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n");
        for statement in ddl.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            // `query_raw`: DDL is sent verbatim, `?` is not a bind placeholder here.
            self.client
                .query_raw(statement)
                .execute()
                .await
                .map_err(|e| SinkError::Ddl { url: self.config.url.clone(), message: e.to_string() })?;
        }
        Ok(())
    }

    /// Writes every staged row, one insert per table, under the breaker. `dedup_token`
    /// identifies the batch; it is sent where the server supports it.
    pub async fn write(&self, batch: &SinkBatch, dedup_token: &str) -> Result<(), SinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let permit = self.breaker.try_acquire()?;
        let work = async {
            for (table, rows) in &batch.tables {
                if rows.len() == 0 {
                    continue;
                }
                let token = self.version.supports_dedup_token().then(|| format!("{dedup_token}:{table}"));
                rows.write(&self.client, table, token).await.map_err(|e| (table.to_string(), e.to_string()))?;
            }
            Ok::<(), (String, String)>(())
        };
        match tokio::time::timeout(self.config.timeout, work).await {
            Ok(Ok(())) => {
                permit.success();
                Ok(())
            }
            Ok(Err((table, message))) => {
                permit.failure();
                Err(SinkError::Write { url: self.config.url.clone(), table, message, breaker: self.breaker.state() })
            }
            Err(_) => {
                permit.failure();
                Err(SinkError::Timeout {
                    url: self.config.url.clone(),
                    timeout: self.config.timeout,
                    breaker: self.breaker.state(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_gates() {
        let old = ServerVersion::parse("18.16.1").unwrap();
        assert!(!old.supports_dedup_token() && !old.supports_validation() && !old.supports_compression());
        let mid = ServerVersion::parse("22.2.3.5").unwrap();
        assert!(mid.supports_dedup_token() && !mid.supports_validation());
        let new = ServerVersion::parse("25.3.1").unwrap();
        assert!(new.supports_dedup_token() && new.supports_validation() && new.supports_compression());
        assert_eq!(ServerVersion::parse("x"), None);
    }
}
