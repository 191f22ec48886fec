//! A private slice of shared services under one name: its own Postgres schema,
//! ClickHouse database, Redis key prefix, Kafka topic prefix and consumer group. The
//! integration tests, the fault run, the soak run and the benchmark each take one, so
//! they run beside each other on the same local services and clean up after themselves.
//!
//! Built only with the `isolation` feature: a deployed function never needs it.

use crate::config::{Config, KafkaConfig};

/// One name for a slice of the services: `<prefix>_<12 random hex digits>`, usable as a
/// Postgres schema, a ClickHouse database, a Redis key prefix and a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    name: String,
}

impl Slice {
    /// A new slice; `prefix` must be a plain lowercase identifier (`a-z`, `0-9`, `_`),
    /// as the Postgres schema and ClickHouse database checks want.
    pub fn new(prefix: &str) -> Self {
        assert!(
            !prefix.is_empty() && prefix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "slice prefix {prefix:?} is not a plain identifier"
        );
        Self { name: format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]) }
    }

    /// The slice's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Points `config` at the slice: schema, ClickHouse database, Redis key prefix.
    pub fn apply(&self, config: &mut Config) {
        config.postgres.schema = Some(self.name.clone());
        config.clickhouse.database = self.name.clone();
        config.redis.key_prefix = self.name.clone();
    }

    /// Points `kafka` at the slice: topics `<name>.<topic>`, consumer group `<name>`.
    pub fn apply_kafka(&self, kafka: &mut KafkaConfig) {
        kafka.topic_prefix = format!("{}.", self.name);
        kafka.group_id = self.name.clone();
    }

    /// The environment a process (`eo run`, a function binary) needs to work in the
    /// slice, as the variables `Config::load` and `KafkaConfig::from_env` read.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("DATABASE_SCHEMA", self.name.clone()),
            ("CLICKHOUSE_DATABASE", self.name.clone()),
            ("REDIS_KEY_PREFIX", self.name.clone()),
            ("KAFKA_TOPIC_PREFIX", format!("{}.", self.name)),
            ("KAFKA_GROUP_ID", self.name.clone()),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec()
    }

    /// Drops the schema and the ClickHouse database and deletes the Redis keys, over
    /// fresh connections to the services `config` names (so it works whatever state the
    /// slice's own clients are in). Best effort, bounded by `within`: a service that is
    /// down keeps its leftovers, which carry the slice's name. Topics are left to the
    /// broker (tansu keeps them in memory).
    pub async fn remove(&self, config: &Config, within: std::time::Duration) {
        let name = self.name.clone();
        let work = async {
            use sqlx::Connection;
            if let Ok(mut pg) = sqlx::PgConnection::connect(config.postgres.url.expose()).await {
                // The name is generated: a plain identifier, safe to quote.
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")).execute(&mut pg).await;
                let _ = pg.close().await;
            }
            let ch = clickhouse::Client::default()
                .with_url(config.clickhouse.url())
                .with_user(&config.clickhouse.user)
                .with_password(config.clickhouse.password.expose())
                .with_validation(false)
                .with_compression(clickhouse::Compression::None);
            let _ = ch.query(&format!("DROP DATABASE IF EXISTS {name}")).execute().await;
            if let Ok(client) = crate::redis_client::RedisClient::connect(&config.redis).await {
                if let Ok(mut c) = client.connection().await {
                    if client.is_cluster() {
                        // `KEYS` goes to every primary; a cluster's `SCAN` would see one.
                        delete_keys(&mut c, &name).await;
                    } else {
                        scan_delete_keys(&mut c, &name).await;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(within, work).await;
    }
}

/// Deletes every key under `<prefix>:` on one Redis, a bounded step at a time: `SCAN`
/// and `UNLINK`. (`KEYS` walks the whole keyspace in one command: with a few million
/// keys from other slices it outlasts the client's response timeout, and nothing was
/// deleted.) Best effort: stops at the first error.
pub async fn scan_delete_keys(conn: &mut impl redis::aio::ConnectionLike, prefix: &str) {
    let pattern = format!("{prefix}:*");
    let mut cursor = 0u64;
    loop {
        let step: Result<(u64, Vec<String>), _> =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(5_000).query_async(conn).await;
        let Ok((next, keys)) = step else { return };
        if !keys.is_empty() && redis::cmd("UNLINK").arg(&keys).query_async::<i64>(conn).await.is_err() {
            return;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// Deletes every key under `<prefix>:` with `KEYS` (a cluster connection sends it to
/// every primary). For a small keyspace; on one Redis prefer [`scan_delete_keys`].
pub async fn delete_keys(conn: &mut impl redis::aio::ConnectionLike, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(conn).await.unwrap_or_default();
    for chunk in keys.chunks(1000) {
        let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query_async(conn).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_names_every_store_alike_and_apart_from_others() {
        let (a, b) = (Slice::new("t"), Slice::new("t"));
        assert_ne!(a, b);
        assert!(a.name().starts_with("t_") && a.name().len() == 14, "{}", a.name());
        let env: std::collections::HashMap<&str, &str> = std::collections::HashMap::new();
        let mut config = Config::from_env(&env).expect("defaults");
        a.apply(&mut config);
        assert_eq!(config.postgres.schema.as_deref(), Some(a.name()));
        assert_eq!((config.clickhouse.database.as_str(), config.redis.key_prefix.as_str()), (a.name(), a.name()));
        let mut kafka = KafkaConfig::from_env(&env).expect("defaults");
        a.apply_kafka(&mut kafka);
        assert_eq!(kafka.topic("orders"), format!("{}.orders", a.name()));
        assert_eq!(kafka.group_id, a.name());
    }
}
