//! Applying the schema: the Postgres migrations and every function's ClickHouse tables.
//! `eo migrate` runs it from a shell; the `migrate` binary runs it as the deploy's
//! migrate step (a CloudFormation custom resource, see `custom_resource`). Lambda
//! functions themselves only check it at init.

use exactly_once::config::{KafkaConfig, ProcessEnv};
use exactly_once::Clients;

/// What is in place after a migration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Migrated {
    pub postgres_migrations: i64,
    pub clickhouse_tables: Vec<String>,
}

impl Migrated {
    pub fn line(&self, clients: &Clients) -> String {
        format!(
            "Postgres: {} migrations applied (schema {}); ClickHouse: tables {} in database `{}`",
            self.postgres_migrations,
            clients.config.postgres.schema.as_deref().unwrap_or("from search_path"),
            self.clickhouse_tables.join(", "),
            clients.config.clickhouse.database
        )
    }
}

/// `clients` were connected with migrations applied; this adds every function's tables
/// and reports what is in place. Idempotent.
pub async fn apply(clients: &Clients) -> Result<Migrated, String> {
    let postgres_migrations: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&clients.pg)
        .await
        .map_err(|e| format!("Postgres: {e}"))?;
    let kafka = KafkaConfig::from_env(&ProcessEnv).map_err(|e| e.to_string())?;
    let functions = exactly_once::runtime::Functions::new(clients, crate::all_functions(), &kafka)
        .await
        .map_err(|e| e.to_string())?;
    let clickhouse_tables =
        functions.iter().flat_map(|f| exactly_once::sink::clickhouse::created_tables(f.spec.clickhouse_ddl)).collect();
    Ok(Migrated { postgres_migrations, clickhouse_tables })
}
