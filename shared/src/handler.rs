//! The trait a function implements, and what a handler gets to work with.

use async_trait::async_trait;
use sqlx::PgConnection;

use crate::event::Event;
use crate::event_id::{EventId, IdStrategy, Namespace};
use crate::outcome::FailureKind;
use crate::payload::ValueFormat;
use crate::sink::{ClickHouseSink, SinkBatch, SinkError, SinkRow};
use crate::transaction::LazyTx;

/// What a function is: its name (the guard's namespace), the topics it consumes, how
/// its event ids are derived, and the ClickHouse DDL of its tables.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// The function's name: the guard's namespace, the label of its metrics.
    pub name: &'static str,
    /// The topics it consumes, without `KAFKA_TOPIC_PREFIX`.
    pub topics: &'static [&'static str],
    /// How its event ids are derived.
    pub id_strategy: IdStrategy,
    /// `CREATE TABLE IF NOT EXISTS ...` statements, separated by `;`.
    pub clickhouse_ddl: &'static str,
    /// Failed attempts before dead-lettering; `None`: `GUARD_MAX_ATTEMPTS`.
    pub max_attempts: Option<u32>,
    /// Topics it publishes to through the outbox (deployments grant write access).
    pub output_topics: &'static [&'static str],
    /// How its record values are written: plain (JSON), or framed for a schema registry
    /// and decoded by the guard before ids are derived (read it with
    /// [`HandlerContext::payload`]).
    pub value_format: ValueFormat,
    /// How its record keys are written: plain (read as they are), or framed for a schema
    /// registry and decoded by the guard with the values (read it with
    /// [`HandlerContext::key`]).
    pub key_format: ValueFormat,
}

impl FunctionSpec {
    /// A function with no ClickHouse tables, no outbox topics and the default attempts.
    pub fn new(name: &'static str, topics: &'static [&'static str], id_strategy: IdStrategy) -> Self {
        Self {
            name,
            topics,
            id_strategy,
            clickhouse_ddl: "",
            max_attempts: None,
            output_topics: &[],
            value_format: ValueFormat::Json,
            key_format: ValueFormat::Json,
        }
    }

    /// Sets the ClickHouse DDL of its tables.
    pub fn clickhouse_ddl(mut self, ddl: &'static str) -> Self {
        self.clickhouse_ddl = ddl;
        self
    }

    /// Sets the topics it publishes to through the outbox.
    pub fn publishes(mut self, topics: &'static [&'static str]) -> Self {
        self.output_topics = topics;
        self
    }

    /// Sets how its record values are written (see [`ValueFormat`]).
    pub fn values(mut self, format: ValueFormat) -> Self {
        self.value_format = format;
        self
    }

    /// Sets how its record keys are written (see [`ValueFormat`]): with a registry format,
    /// keys are decoded as values are, and a key that cannot be decoded dead-letters its
    /// record with the key's reason.
    pub fn keys(mut self, format: ValueFormat) -> Self {
        self.key_format = format;
        self
    }

    /// Sets its own limit of failed attempts before dead-lettering.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
}

/// A per-topic handler. `handle` runs once per event that the guard has not seen
/// confirmed; its Postgres effects (through [`HandlerContext::postgres`]) commit in the
/// same transaction as the confirm, its ClickHouse rows (through
/// [`HandlerContext::clickhouse`]) are written before that commit.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// What the function is; read once, when the function is registered.
    fn spec(&self) -> FunctionSpec;

    /// Handles one event the guard has not seen confirmed. `Ok` confirms it; an error
    /// fails the attempt, as its kind says.
    async fn handle(&self, event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError>;

    /// A valid sample payload (the `n`-th), for the producer command and tests.
    fn sample(&self, n: u64) -> Option<Vec<u8>> {
        let _ = n;
        None
    }

    /// The Avro schema (JSON text) its samples can be written with, for
    /// `eo produce --avro`: each sample (JSON) is encoded with it and framed for the
    /// registry. `None`: the samples exist only as they are.
    fn sample_avro_schema(&self) -> Option<&'static str> {
        None
    }
}

/// A handler's failure, classified.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth retrying (a timeout, a conflict). Counts toward dead-lettering.
    #[error("{0}")]
    Retryable(String),
    /// The event can never succeed (invalid payload). Dead-lettered at once with `reason`.
    #[error("{reason}: {message}")]
    Permanent {
        /// A short, stable label for metrics and the dead letter (`payload_invalid`, ...).
        reason: &'static str,
        /// What was wrong, for people.
        message: String,
    },
    /// A dependency is unavailable; retried later and not counted against the event.
    #[error("{0}")]
    Unavailable(String),
}

impl HandlerError {
    /// A retryable failure, with `e` as its message.
    pub fn retryable(e: impl std::fmt::Display) -> Self {
        HandlerError::Retryable(e.to_string())
    }

    /// A permanent failure: the event is dead-lettered at once under `reason`.
    pub fn permanent(reason: &'static str, e: impl std::fmt::Display) -> Self {
        HandlerError::Permanent { reason, message: e.to_string() }
    }

    /// The class of failure, which decides what the guard does with the event.
    pub fn kind(&self) -> FailureKind {
        match self {
            HandlerError::Retryable(_) => FailureKind::Retryable,
            HandlerError::Permanent { .. } => FailureKind::Permanent,
            HandlerError::Unavailable(_) => FailureKind::Unavailable,
        }
    }
}

impl From<SinkError> for HandlerError {
    fn from(e: SinkError) -> Self {
        match e {
            SinkError::RowType(_) => HandlerError::Permanent { reason: "row_type", message: e.to_string() },
            SinkError::Rejected { .. } => {
                HandlerError::Permanent { reason: "clickhouse_rejected", message: e.to_string() }
            }
            other => HandlerError::Unavailable(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
                HandlerError::Unavailable(format!("Postgres: {e}"))
            }
            _ => HandlerError::Retryable(format!("Postgres: {e}")),
        }
    }
}

impl From<serde_json::Error> for HandlerError {
    fn from(e: serde_json::Error) -> Self {
        HandlerError::permanent("payload_invalid", e)
    }
}

/// What a handler works with for one event.
pub struct HandlerContext<'a> {
    published: u32,
    value: &'a [u8],
    decoded: Option<&'a serde_json::Value>,
    key: Option<&'a [u8]>,
    decoded_key: Option<&'a serde_json::Value>,
    event_id: &'a EventId,
    namespace: &'a Namespace,
    tx: &'a mut LazyTx,
    savepoint: bool,
    rows: SinkBatch,
    sink: &'a ClickHouseSink,
}

const SAVEPOINT: &str = "SAVEPOINT eo_handler";

impl<'a> HandlerContext<'a> {
    pub(crate) fn new(
        event: &'a Event,
        decoded: Option<&'a serde_json::Value>,
        decoded_key: Option<&'a serde_json::Value>,
        event_id: &'a EventId,
        namespace: &'a Namespace,
        tx: &'a mut LazyTx,
        sink: &'a ClickHouseSink,
    ) -> Self {
        Self {
            published: 0,
            value: event.value_bytes(),
            decoded,
            key: event.key.as_deref(),
            decoded_key,
            event_id,
            namespace,
            tx,
            savepoint: false,
            rows: SinkBatch::default(),
            sink,
        }
    }

    /// The event's value as the guard decoded it, for a function whose values are framed
    /// for a schema registry (an Avro record as JSON, see [`crate::payload`]); `None` for
    /// a plain value (read [`Event::value`] yourself, or use [`Self::payload`]).
    pub fn decoded(&self) -> Option<&serde_json::Value> {
        self.decoded
    }

    /// The event's value as `T`, whatever its format: the decoded value of a framed
    /// record, or else the value parsed as JSON. A value that does not fit `T` is the
    /// permanent error `payload_invalid` (dead-lettered at once).
    pub fn payload<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        match self.decoded {
            Some(v) => T::deserialize(v).map_err(|e| HandlerError::permanent("payload_invalid", e)),
            None => serde_json::from_slice(self.value).map_err(HandlerError::from),
        }
    }

    /// The event's key as the guard decoded it, for a function whose keys are framed for
    /// a schema registry ([`crate::FunctionSpec::keys`]); `None` for a plain key.
    pub fn decoded_key(&self) -> Option<&serde_json::Value> {
        self.decoded_key
    }

    /// The event's key as `T`, whatever its format: the decoded key of a framed one, or
    /// else the key parsed as JSON, or else (a plain text key, the common case) its text
    /// as a JSON string. No key, or one that does not fit `T`, is the permanent error
    /// `key_invalid` (dead-lettered at once).
    pub fn key<T: serde::de::DeserializeOwned>(&self) -> Result<T, HandlerError> {
        let invalid = |e: serde_json::Error| HandlerError::permanent("key_invalid", e);
        if let Some(k) = self.decoded_key {
            return T::deserialize(k).map_err(invalid);
        }
        let Some(bytes) = self.key else {
            return Err(HandlerError::permanent("key_invalid", "the record has no key"));
        };
        match serde_json::from_slice(bytes) {
            Ok(v) => Ok(v),
            // Text, not binary that happens to be UTF-8: a key framed for a registry (it
            // starts with a zero byte) or a serialized number would read as garbage.
            Err(e) => match std::str::from_utf8(bytes) {
                Ok(text) if !text.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')) => {
                    T::deserialize(serde_json::Value::String(text.to_owned())).map_err(invalid)
                }
                _ => Err(HandlerError::permanent(
                    "key_invalid",
                    format!("the key is neither JSON nor text ({e}); a key framed for a schema registry needs FunctionSpec::keys"),
                )),
            },
        }
    }

    /// The stable id of this event: use it as the idempotency key of any effect outside
    /// our stores (HTTP calls, emails).
    pub fn event_id(&self) -> &EventId {
        self.event_id
    }

    /// The function's namespace.
    pub fn namespace(&self) -> &Namespace {
        self.namespace
    }

    /// The batch's Postgres transaction. Whatever the handler does here commits together
    /// with the event's confirm, or not at all. The transaction begins at the batch's
    /// first use, with a savepoint per event, so a failing handler's statements roll
    /// back without touching the rest of the batch; a handler that never asks pays no
    /// round trip.
    pub async fn postgres(&mut self) -> Result<&mut PgConnection, HandlerError> {
        if !self.savepoint {
            self.tx.begin().await?;
            sqlx::query(SAVEPOINT).execute(self.tx.conn()).await?;
            self.savepoint = true;
        }
        Ok(self.tx.conn())
    }

    /// Publishes a message to `topic` (the function's logical topic name; the worker's
    /// `KAFKA_TOPIC_PREFIX` applies) through the outbox: it is written in the batch
    /// transaction, so it exists exactly when the event is confirmed, and the relay
    /// sends it with the header `idempotency_key: <event id>:<n>`.
    pub async fn publish(&mut self, topic: &str, key: Option<&[u8]>, payload: &[u8]) -> Result<(), HandlerError> {
        let n = self.published;
        let (event_id, namespace) = (self.event_id, self.namespace);
        crate::outbox::enqueue(self.postgres().await?, namespace, event_id, n, topic, key, payload).await?;
        self.published += 1;
        Ok(())
    }

    /// Stages a row for `table`. Fails fast when the ClickHouse breaker is open.
    pub fn clickhouse<T: SinkRow>(&mut self, table: &'static str, row: T) -> Result<(), HandlerError> {
        self.sink.check_available()?;
        self.rows.push(table, row).map_err(|e| HandlerError::from(SinkError::from(e)))
    }

    /// Ends the event's part of the transaction and hands its rows to the batch.
    ///
    /// A succeeded event's rows are checked against `staged` before its savepoint is
    /// released, so a failure at any step fails this event with its Postgres
    /// statements rolled back, never an event dead-lettered whose effects still commit.
    /// A `RELEASE` the server refuses means one of the handler's statements failed and
    /// the handler went on as if not (the transaction is aborted to the savepoint): the
    /// event fails (retryable) and the rest of the batch goes on. Only an error of the
    /// connection itself is returned as `Err` (it breaks the whole transaction).
    ///
    /// Returns the event's result (possibly turned into a failure) and whether a
    /// savepoint round trip was made.
    pub(crate) async fn finish(
        self,
        result: Result<(), HandlerError>,
        staged: &mut SinkBatch,
        owner: usize,
    ) -> Result<(Result<(), HandlerError>, bool), sqlx::Error> {
        let mut result = result.and_then(|()| staged.accepts(&self.rows).map_err(|e| SinkError::from(e).into()));
        if self.savepoint {
            if result.is_ok() {
                match sqlx::query("RELEASE SAVEPOINT eo_handler").execute(self.tx.conn()).await {
                    Ok(_) => {}
                    Err(e @ sqlx::Error::Database(_)) => {
                        result = Err(HandlerError::Retryable(format!(
                            "Postgres: a statement of the handler failed and the handler went on: {e}"
                        )));
                    }
                    Err(e) => return Err(e),
                }
            }
            if result.is_err() {
                sqlx::query("ROLLBACK TO SAVEPOINT eo_handler").execute(self.tx.conn()).await?;
                sqlx::query("RELEASE SAVEPOINT eo_handler").execute(self.tx.conn()).await?;
            }
        }
        if result.is_ok() {
            staged.extend(self.rows, owner).expect("checked by `accepts`");
        }
        Ok((result, self.savepoint))
    }
}
