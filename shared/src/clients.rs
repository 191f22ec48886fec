//! Clients built once per process (Lambda init, worker start) and shared by every
//! function and invocation: the Postgres pool, Redis leases, the ClickHouse sink, and
//! the breakers in front of them.

use std::sync::Arc;

use sqlx::PgPool;

use crate::breaker::CircuitBreaker;
use crate::config::Config;
use crate::guard::lease::Leases;
use crate::postgres::{self, PostgresError};
use crate::redis_client::{RedisClient, RedisConnectError};
use crate::registry::SchemaRegistry;
use crate::sink::{ClickHouseSink, SinkError};

/// Every client a process needs, built once; cheap to clone (everything in it is shared).
#[derive(Clone)]
pub struct Clients {
    /// The configuration the clients were built from.
    pub config: Arc<Config>,
    /// The Postgres pool (the ledger, dead letters, the handlers' own tables).
    pub pg: PgPool,
    /// The Redis pool (PINGs, tools); the guard goes through `leases`.
    pub redis: RedisClient,
    /// Done markers and leases in Redis, for the guard.
    pub leases: Arc<Leases>,
    /// The batched ClickHouse sink.
    pub sink: Arc<ClickHouseSink>,
    /// The breaker in front of Kafka (the outbox relay, the worker's produces).
    pub kafka_breaker: Arc<CircuitBreaker>,
    /// The schema registry, for functions whose values are framed for one (its own
    /// breaker inside).
    pub registry: Arc<SchemaRegistry>,
}

/// Start-up failed: which dependency, and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Postgres could not be used: a bad URL, unreachable, migrations failed or not
    /// applied.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// Redis is unreachable, or refused the guard's scripts.
    #[error(transparent)]
    Redis(#[from] RedisConnectError),
    /// ClickHouse is unreachable, DDL failed, or tables are missing.
    #[error(transparent)]
    ClickHouse(#[from] SinkError),
    /// The schema registry's settings are unusable.
    #[error("schema registry: {0}")]
    Registry(String),
}

/// What start-up does about the database schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// Create the schema and apply pending migrations (the worker, `eo`, tests).
    Migrate,
    /// Only check that every migration is applied, failing start-up naming the missing
    /// ones (Lambda: no DDL or migration lock in a cold start; `eo migrate` and the
    /// deploy's migrate step apply them).
    Check,
}

impl Clients {
    /// Connects to every dependency (fail fast: an unreachable one stops start-up with
    /// a message naming it) and applies the Postgres migrations.
    pub async fn connect(config: Config) -> Result<Self, InitError> {
        Self::connect_with(config, Schema::Migrate).await
    }

    /// Like [`connect`](Self::connect), with the schema handled as `schema` says.
    pub async fn connect_with(config: Config, schema: Schema) -> Result<Self, InitError> {
        let b = &config.breakers;
        let redis_breaker = Arc::new(CircuitBreaker::new("redis", b.redis));
        let clickhouse_breaker = Arc::new(CircuitBreaker::new("clickhouse", b.clickhouse));
        let kafka_breaker = Arc::new(CircuitBreaker::new("kafka", b.kafka));
        let registry = Arc::new(SchemaRegistry::new(&config.registry).map_err(InitError::Registry)?);

        let pg = postgres::connect(&config.postgres, schema == Schema::Migrate).await?;
        match schema {
            Schema::Migrate => postgres::migrate(&pg, &config.postgres).await?,
            Schema::Check => postgres::check_migrations(&pg, &config.postgres).await?,
        }
        let redis = RedisClient::connect(&config.redis).await?;
        let leases =
            Leases::connect(redis.clone(), &config.redis.key_prefix, config.redis.key_buckets, redis_breaker).await?;
        let sink = ClickHouseSink::connect(&config.clickhouse, clickhouse_breaker).await?;
        Ok(Self {
            config: Arc::new(config),
            pg,
            redis,
            leases: Arc::new(leases),
            sink: Arc::new(sink),
            kafka_breaker,
            registry,
        })
    }
}
