//! The ClickHouse sink: batched inserts over HTTP, under the ClickHouse breaker.
//!
//! Invariants:
//! - the breaker is checked before every write and fed by every write's result;
//! - the server version is detected once, at connect; row validation, lz4 compression
//!   and `insert_deduplication_token` are used only where the server supports them
//!   (the local Debian server is 18.16 and has none of them);
//! - exactly-once never depends on the dedup token: tables are ReplacingMergeTree keyed
//!   by the event id, so a repeated insert collapses on every server version;
//! - with several endpoints (`CLICKHOUSE_URL=a,b,c`), writes go round-robin and a failed
//!   attempt is retried on the next endpoint after 10, 20, 40 ms (so one dead replica
//!   does not fail the write),
//!   `CLICKHOUSE_WRITE_ATTEMPTS` attempts in all, under one breaker permit: the breaker
//!   sees one failure only when every attempt failed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clickhouse::{Client, Compression};

use super::SinkBatch;
use crate::breaker::{BreakerOpen, BreakerState, CircuitBreaker};
use crate::config::{is_identifier, ClickHouseConfig};

/// `major.minor` of the server, from `SELECT version()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServerVersion {
    /// The major version, e.g. 24.
    pub major: u32,
    /// The minor version, e.g. 3.
    pub minor: u32,
}

impl ServerVersion {
    /// The version from `SELECT version()`'s answer (`24.3.1.2672`); `None` if it does
    /// not start with `major.minor`.
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

/// Why ClickHouse could not be used, or refused a write.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The breaker is open: fail fast, retry later.
    #[error("ClickHouse unavailable: {0}")]
    BreakerOpen(#[from] BreakerOpen),
    /// Every attempt of a write failed (the server is unwell or unreachable).
    #[error("ClickHouse at {url}: insert into `{table}` failed: {source} (breaker {breaker})")]
    Write {
        /// The endpoint of the last attempt.
        url: String,
        /// The table written to.
        table: String,
        /// What the last attempt's client said.
        #[source]
        source: clickhouse::error::Error,
        /// The breaker's state after this failure.
        breaker: BreakerState,
    },
    /// A write took longer than `CLICKHOUSE_TIMEOUT_MS`, all its attempts together.
    #[error("ClickHouse at {url}: no answer within {} ms (breaker {breaker})", timeout.as_millis())]
    Timeout {
        /// Every configured endpoint, comma-separated.
        url: String,
        /// The time the write was given.
        timeout: Duration,
        /// The breaker's state after this failure.
        breaker: BreakerState,
    },
    /// No endpoint answered at start-up, or the answer made no sense.
    #[error("ClickHouse at {url}: {source}; start it with scripts/services.sh or set CLICKHOUSE_URL")]
    Unreachable {
        /// The endpoints tried, comma-separated.
        url: String,
        /// What went wrong, per endpoint.
        #[source]
        source: crate::BoxError,
    },
    /// A DDL statement failed.
    #[error("ClickHouse at {url}: DDL failed: {source}")]
    Ddl {
        /// The endpoint the statement ran on.
        url: String,
        /// What the server or the client said.
        #[source]
        source: crate::BoxError,
    },
    /// Tables the function needs are missing (a process that does not apply DDL).
    #[error("ClickHouse at {url}: table(s) {tables} missing in database `{database}`; run `eo migrate` (the deploy's migrate step does)")]
    NotMigrated {
        /// The endpoint that was asked.
        url: String,
        /// The database looked in.
        database: String,
        /// The missing tables, comma-separated.
        tables: String,
    },
    /// The server answered and refused the rows themselves (a value it cannot parse or
    /// convert, out of range, a failed check): the same rows fail the same way on every
    /// retry and every endpoint. Not an availability problem: it never feeds the breaker.
    #[error("ClickHouse at {url}: insert into `{table}` rejected the data (code {code}): {message}")]
    Rejected {
        /// The endpoint that refused the rows.
        url: String,
        /// The table written to.
        table: String,
        /// The server's error code (one of the data rejection codes).
        code: u32,
        /// The server's message.
        message: String,
    },
    /// Rows of two types were staged for one table (a programming error).
    #[error(transparent)]
    RowType(#[from] super::RowTypeMismatch),
}

/// Server error codes that mean "this data is invalid", not "the server is unwell":
/// parse and conversion failures of a value, values out of range, `throwIf` and
/// constraint checks, NULL in a non-Nullable column, unknown enum values. Codes that
/// say the row format does not match the table (`CANNOT_READ_ALL_DATA`,
/// `ATTEMPT_TO_READ_AFTER_EOF`, `CANNOT_PARSE_INPUT_ASSERTION_FAILED`) are left out on
/// purpose: they mean a deployment whose row type and table disagree, which fails every
/// row alike and must stop the function (breaker open, `/readyz` 503) rather than
/// dead-letter the whole stream.
const REJECTED_DATA_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    26,  // CANNOT_PARSE_QUOTED_STRING
    38,  // CANNOT_PARSE_DATE
    41,  // CANNOT_PARSE_DATETIME
    53,  // TYPE_MISMATCH
    69,  // ARGUMENT_OUT_OF_BOUND
    70,  // CANNOT_CONVERT_TYPE
    72,  // CANNOT_PARSE_NUMBER
    117, // INCORRECT_DATA
    131, // TOO_LARGE_STRING_SIZE
    321, // VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349, // CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    395, // FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
    407, // DECIMAL_OVERFLOW
    469, // VIOLATED_CONSTRAINT
    691, // UNKNOWN_ELEMENT_OF_ENUM
];

/// The server's error code in an error answer (`Code: 38, e.displayText() = ...` on old
/// servers, `Code: 38. DB::Exception: ...` on new ones), when it is a data rejection.
pub fn rejected_data_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + "Code: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let code: u32 = digits.parse().ok()?;
    REJECTED_DATA_CODES.contains(&code).then_some(code)
}

/// How one write attempt failed.
enum AttemptError {
    /// The server refused the data: do not retry, do not blame the server.
    Rejected {
        table: String,
        code: u32,
        message: String,
    },
    Failed {
        table: String,
        source: clickhouse::error::Error,
    },
}

/// Batched inserts into ClickHouse over one or more endpoints, under the ClickHouse
/// breaker.
pub struct ClickHouseSink {
    /// One client per endpoint, in configuration order.
    clients: Vec<Client>,
    /// The endpoint that answered at connect: DDL and reads go there.
    primary: usize,
    next: AtomicUsize,
    breaker: Arc<CircuitBreaker>,
    version: ServerVersion,
    config: ClickHouseConfig,
}

impl ClickHouseSink {
    /// Connects, detects the server version and creates the configured database if
    /// missing. Fails fast with a message naming the URL when the server is unreachable.
    pub async fn connect(config: &ClickHouseConfig, breaker: Arc<CircuitBreaker>) -> Result<Self, SinkError> {
        let base_for = |url: &str| {
            Client::default()
                .with_url(url)
                .with_user(&config.user)
                .with_password(config.password.expose())
                .with_validation(false)
                .with_compression(Compression::None)
        };
        // The first endpoint that answers detects the version and runs DDL.
        let mut answered = None;
        let mut failures = Vec::new();
        for (i, url) in config.urls.iter().enumerate() {
            let probe = base_for(url).query("SELECT version()").fetch_one::<String>();
            match tokio::time::timeout(config.timeout, probe).await {
                Ok(Ok(raw)) => {
                    answered = Some((i, raw));
                    break;
                }
                Ok(Err(e)) => failures.push(format!("{url}: {e}")),
                Err(_) => failures.push(format!("{url}: no answer within {} ms", config.timeout.as_millis())),
            }
        }
        let Some((primary, raw)) = answered else {
            return Err(SinkError::Unreachable { url: config.urls.join(","), source: failures.join("; ").into() });
        };
        if !failures.is_empty() {
            tracing::warn!(failed = ?failures, "some ClickHouse endpoints did not answer at start-up");
        }
        let base = base_for(&config.urls[primary]);
        let version = ServerVersion::parse(&raw).ok_or_else(|| SinkError::Unreachable {
            url: config.urls[primary].clone(),
            source: format!("unexpected version string {raw:?}").into(),
        })?;

        if !is_identifier(&config.database) {
            return Err(SinkError::Ddl {
                url: config.urls[primary].clone(),
                source: format!("invalid database name {:?}", config.database).into(),
            });
        }
        base.query(&format!("CREATE DATABASE IF NOT EXISTS {}", config.database))
            .execute()
            .await
            .map_err(|e| SinkError::Ddl { url: config.urls[primary].clone(), source: e.into() })?;

        // Every endpoint is expected to be a replica of the same server version.
        let clients = config
            .urls
            .iter()
            .map(|url| {
                let c = base_for(url).with_database(&config.database).with_validation(version.supports_validation());
                if version.supports_compression() {
                    c.with_compression(Compression::Lz4)
                } else {
                    c
                }
            })
            .collect();
        tracing::info!(urls = ?config.urls, %version, dedup_token = version.supports_dedup_token(), "connected to ClickHouse");
        Ok(Self { clients, primary, next: AtomicUsize::new(0), breaker, version, config: config.clone() })
    }

    /// The server version detected at connect.
    pub fn version(&self) -> ServerVersion {
        self.version
    }

    /// The breaker in front of ClickHouse.
    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.breaker
    }

    /// The client of the endpoint that answered at connect (DDL, reads).
    pub fn client(&self) -> &Client {
        &self.clients[self.primary]
    }

    /// Every configured endpoint (`CLICKHOUSE_URL`), in order.
    pub fn endpoints(&self) -> &[String] {
        &self.config.urls
    }

    /// The database holding the function tables (`CLICKHOUSE_DATABASE`).
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
            self.client()
                .query_raw(statement)
                .execute()
                .await
                .map_err(|e| SinkError::Ddl { url: self.config.urls[self.primary].clone(), source: e.into() })?;
        }
        Ok(())
    }

    /// The fast start-up check of a process that does not apply DDL (Lambda): one query
    /// for the tables of the configured database, an error naming those `ddl` creates
    /// that are missing.
    pub async fn check_tables(&self, ddl: &[&str]) -> Result<(), SinkError> {
        let wanted: Vec<String> = ddl.iter().flat_map(|d| created_tables(d)).collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let url = self.config.urls[self.primary].clone();
        let present: Vec<String> = self
            .client()
            .query("SELECT name FROM system.tables WHERE database = currentDatabase()")
            .fetch_all::<String>()
            .await
            .map_err(|e| SinkError::Unreachable { url: url.clone(), source: e.into() })?;
        let missing: Vec<String> = wanted.into_iter().filter(|t| !present.contains(t)).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(SinkError::NotMigrated { url, database: self.config.database.clone(), tables: missing.join(", ") })
        }
    }

    /// Writes every staged row, one insert per table, under the breaker. `dedup_token`
    /// identifies the batch; it is sent where the server supports it. A failed attempt
    /// is retried on the next endpoint (see the module docs).
    pub async fn write(&self, batch: &SinkBatch, dedup_token: &str) -> Result<(), SinkError> {
        self.write_owned_by(batch, None, dedup_token).await
    }

    /// Like [`ClickHouseSink::write`], for the rows staged by the events in `only`
    /// (sorted owner indexes), or all rows. A [`SinkError::Rejected`] answer is not
    /// retried and counts as a success for the breaker: the server is up and answering.
    pub async fn write_owned_by(
        &self,
        batch: &SinkBatch,
        only: Option<&[usize]>,
        dedup_token: &str,
    ) -> Result<(), SinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let permit = self.breaker.try_acquire()?;
        let attempts = async {
            let mut backoff = self.config.retry_backoff;
            let mut last = None;
            for attempt in 0..self.config.write_attempts {
                if attempt > 0 {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
                match self.write_once(&self.clients[i], batch, only, dedup_token).await {
                    Ok(()) => return Ok(()),
                    Err(AttemptError::Rejected { table, code, message }) => {
                        return Err(SinkError::Rejected { url: self.config.urls[i].clone(), table, code, message });
                    }
                    Err(AttemptError::Failed { table, source }) => {
                        tracing::debug!(url = %self.config.urls[i], attempt, %table, error = %source, "ClickHouse write attempt failed");
                        last = Some((self.config.urls[i].clone(), table, source));
                    }
                }
            }
            let (url, table, source) = last.expect("at least one attempt");
            Err(SinkError::Write { url, table, source, breaker: BreakerState::Closed })
        };
        match tokio::time::timeout(self.config.timeout, attempts).await {
            Ok(Ok(())) => {
                permit.success();
                Ok(())
            }
            Ok(Err(e @ SinkError::Rejected { .. })) => {
                permit.success();
                Err(e)
            }
            Ok(Err(SinkError::Write { url, table, source, .. })) => {
                permit.failure();
                Err(SinkError::Write { url, table, source, breaker: self.breaker.state() })
            }
            Ok(Err(other)) => {
                permit.failure();
                Err(other)
            }
            Err(_) => {
                permit.failure();
                Err(SinkError::Timeout {
                    url: self.config.urls.join(","),
                    timeout: self.config.timeout,
                    breaker: self.breaker.state(),
                })
            }
        }
    }

    async fn write_once(
        &self,
        client: &Client,
        batch: &SinkBatch,
        only: Option<&[usize]>,
        dedup_token: &str,
    ) -> Result<(), AttemptError> {
        for (table, rows) in &batch.tables {
            if rows.len() == 0 || only.is_some_and(|o| !rows.owners().iter().any(|w| o.binary_search(w).is_ok())) {
                continue;
            }
            let token = self.version.supports_dedup_token().then(|| format!("{dedup_token}:{table}"));
            if let Err(e) = rows.write(client, table, token, only).await {
                let message = e.to_string();
                return Err(match (&e, rejected_data_code(&message)) {
                    (clickhouse::error::Error::BadResponse(_), Some(code)) => {
                        AttemptError::Rejected { table: table.to_string(), code, message }
                    }
                    _ => AttemptError::Failed { table: table.to_string(), source: e },
                });
            }
        }
        Ok(())
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

    #[test]
    fn data_rejections_are_told_from_other_server_errors() {
        let old = "Code: 38, e.displayText() = DB::Exception: Cannot parse date: value is too short";
        assert_eq!(rejected_data_code(old), Some(38));
        let new = "bad response: Code: 395. DB::Exception: Value passed to 'throwIf' function is non zero";
        assert_eq!(rejected_data_code(new), Some(395));
        // Unknown table, too many parts, a row format that does not match: not the data.
        assert_eq!(rejected_data_code("Code: 60. DB::Exception: Table x doesn't exist"), None);
        assert_eq!(rejected_data_code("Code: 252. DB::Exception: Too many parts"), None);
        assert_eq!(rejected_data_code("Code: 33. DB::Exception: Cannot read all data"), None);
        assert_eq!(rejected_data_code("connection refused"), None);
    }
}

/// The tables a DDL script creates (`CREATE TABLE [IF NOT EXISTS] [db.]name`).
pub fn created_tables(ddl: &str) -> Vec<String> {
    let words: Vec<&str> =
        ddl.lines().filter(|l| !l.trim_start().starts_with("--")).flat_map(str::split_whitespace).collect();
    let mut out = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if !(w.eq_ignore_ascii_case("TABLE") && i > 0 && words[i - 1].eq_ignore_ascii_case("CREATE")) {
            continue;
        }
        let mut j = i + 1;
        if words.get(j).is_some_and(|w| w.eq_ignore_ascii_case("IF")) {
            j += 3;
        }
        if let Some(name) = words.get(j) {
            let name = name.split('(').next().unwrap_or("").trim_matches('`');
            let name = name.rsplit('.').next().unwrap_or(name).trim_matches('`');
            if !name.is_empty() {
                out.push(name.to_owned());
            }
        }
    }
    out
}

#[cfg(test)]
mod created_tables_tests {
    use super::created_tables;

    #[test]
    fn finds_the_tables_a_script_creates() {
        let ddl = "-- CREATE TABLE commented (x)\nCREATE TABLE IF NOT EXISTS user_events (\n a UInt8\n);\ncreate table db.`other`(x UInt8)";
        assert_eq!(created_tables(ddl), vec!["user_events", "other"]);
        assert!(created_tables("").is_empty());
    }
}
