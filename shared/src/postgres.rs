//! The Postgres pool and the project's migrations.

use std::str::FromStr;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

use crate::config::{redact_url, PostgresConfig};

/// The sqlx migrations in `migrations/` (Postgres only; ClickHouse DDL lives in
/// `migrations/clickhouse/`).
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Postgres could not be used at start-up. `url` is the address with any password
/// replaced by `***`.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// `DATABASE_URL` does not parse.
    #[error("DATABASE_URL is not a valid Postgres URL ({url}): {source}")]
    BadUrl {
        /// The address, with any password replaced by `***`.
        url: String,
        /// What sqlx said about the URL.
        #[source]
        source: sqlx::Error,
    },
    /// No connection, or the first statements failed.
    #[error("Postgres at {url}: {source}; start it with scripts/services.sh or set DATABASE_URL")]
    Unreachable {
        /// The address, with any password replaced by `***`.
        url: String,
        /// What went wrong.
        #[source]
        source: crate::BoxError,
    },
    /// A migration failed.
    #[error("Postgres at {url}: migrations failed: {source}")]
    Migrate {
        /// The address, with any password replaced by `***`.
        url: String,
        /// What the migrator said.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// Start-up without migrating found migrations not applied.
    #[error("Postgres at {url}: migrations not applied: {missing}; run `eo migrate` against this database (the deploy's migrate step does)")]
    NotMigrated {
        /// The address, with any password replaced by `***`.
        url: String,
        /// The missing migrations, comma-separated.
        missing: String,
    },
}

fn options(config: &PostgresConfig) -> Result<PgConnectOptions, PostgresError> {
    let url = redact_url(config.url.expose());
    let opts = PgConnectOptions::from_str(config.url.expose())
        .map_err(|source| PostgresError::BadUrl { url, source })?
        // Statement logging would print parameters (payloads) at info level.
        .disable_statement_logging();
    let opts = match &config.schema {
        Some(schema) => opts.options([("search_path", schema.as_str())]),
        None => opts,
    };
    // The guard's statements take arrays; a custom plan per execution costs more than
    // running them (see docs/BENCHMARKS.md).
    Ok(if config.generic_plans { opts.options([("plan_cache_mode", "force_generic_plan")]) } else { opts })
}

/// Connects, and fails fast with a message that says which database and how to fix it.
/// With `create_schema`, the configured schema is created first when missing (the
/// Lambda init skips that round trip: `eo migrate` made it).
pub async fn connect(config: &PostgresConfig, create_schema: bool) -> Result<PgPool, PostgresError> {
    let url = redact_url(config.url.expose());
    let unreachable = |e: sqlx::Error| PostgresError::Unreachable { url: url.clone(), source: e.into() };
    let opts = options(config)?;
    if let Some(schema) = config.schema.as_ref().filter(|_| create_schema) {
        // The schema name was validated as a plain identifier by the config loader.
        let mut conn = tokio::time::timeout(config.connect_timeout, opts.connect())
            .await
            .map_err(|_| PostgresError::Unreachable { url: url.clone(), source: "connect timed out".into() })?
            .map_err(unreachable)?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
            .execute(&mut conn)
            .await
            .map_err(unreachable)?;
        conn.close().await.map_err(unreachable)?;
    }
    let pool = PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.connect_timeout)
        // No ping before every acquire: it is a round trip per batch. A broken
        // connection fails its first statement instead, which the guard reports as
        // unavailable and the batch is retried.
        .test_before_acquire(false)
        .connect_with(opts)
        .await
        .map_err(unreachable)?;
    Ok(pool)
}

/// Applies pending migrations (idempotent).
pub async fn migrate(pool: &PgPool, config: &PostgresConfig) -> Result<(), PostgresError> {
    MIGRATOR.run(pool).await.map_err(|source| PostgresError::Migrate { url: redact_url(config.url.expose()), source })
}

/// The fast start-up check of a process that does not migrate (Lambda): one query, and
/// an error naming every migration not applied yet.
pub async fn check_migrations(pool: &PgPool, config: &PostgresConfig) -> Result<(), PostgresError> {
    let url = redact_url(config.url.expose());
    let applied: Vec<i64> =
        match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success").fetch_all(pool).await {
            Ok(v) => v,
            // No migration table: nothing applied.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
            Err(e) => return Err(PostgresError::Unreachable { url, source: e.into() }),
        };
    let missing: Vec<String> = MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !applied.contains(&m.version))
        .map(|m| format!("{} ({})", m.version, m.description))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PostgresError::NotMigrated { url, missing: missing.join(", ") })
    }
}
