//! Configuration: one typed struct per component, read from environment variables.
//!
//! Every variable is listed once in [`VARIABLES`] with its default and meaning; the
//! configuration table in docs/CONFIGURATION.md is checked against that list by a test
//! (tests/docs.rs), so the docs cannot drift from the code. An invalid value is an error
//! naming the variable; a secret's value never appears in an error or a log line.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// One documented environment variable.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    /// The variable's name, e.g. `DATABASE_URL`.
    pub name: &'static str,
    /// The value used when the variable is unset (empty for none).
    pub default: &'static str,
    /// Secrets (or URLs that may carry one) are never echoed back.
    pub secret: bool,
    /// What the variable does: its row's text in docs/CONFIGURATION.md.
    pub doc: &'static str,
}

const fn var(name: &'static str, default: &'static str, doc: &'static str) -> Var {
    Var { name, default, secret: false, doc }
}

const fn secret(name: &'static str, default: &'static str, doc: &'static str) -> Var {
    Var { name, default, secret: true, doc }
}

/// Every variable the library reads, with its default. The table in docs/CONFIGURATION.md
/// mirrors this (scripts/config-table.py regenerates it).
pub const VARIABLES: &[Var] = &[
    secret(
        "DATABASE_URL",
        "postgres://exactly_once:exactly_once@127.0.0.1:5432/exactly_once",
        "Postgres connection URL (truth: `processed_events`, dead letters, handler effects).",
    ),
    var(
        "DATABASE_SCHEMA",
        "",
        "Postgres schema for the project's tables; empty means the server's default `search_path`. Created if missing.",
    ),
    var("DATABASE_MAX_CONNECTIONS", "10", "Postgres pool size."),
    var("DATABASE_CONNECT_TIMEOUT_MS", "5000", "How long to wait for a Postgres connection before failing."),
    var("DATABASE_GENERIC_PLANS", "true", "Sessions use `plan_cache_mode=force_generic_plan`: the guard's array statements are planned once per connection instead of on every execution (about 0.3 ms saved per statement)."),
    secret("REDIS_URL", "redis://127.0.0.1:6379", "Redis URL for leases and done markers; `rediss://` for TLS, `redis://:<token>@host` or `redis://<user>:<token>@host` for AUTH. With `REDIS_MODE=cluster`, one or more seed nodes, comma-separated (ElastiCache: the configuration endpoint)."),
    var("REDIS_MODE", "standalone", "`standalone` (one Redis, or a primary with replicas behind one address) or `cluster` (Redis Cluster, Valkey cluster, ElastiCache cluster mode and Serverless): redirections and failovers are followed by the client."),
    var("REDIS_TLS_CA_FILE", "", "PEM file of the CA that signed the Redis servers' certificates, for `rediss://` with a private CA; empty means the system's roots (ElastiCache's certificates chain to them)."),
    var("REDIS_POOL_SIZE", "16", "Redis connection pool size (standalone; a cluster connection multiplexes one connection per node)."),
    var("REDIS_KEY_PREFIX", "eo", "Prefix of every Redis key (`<prefix>:{<function>}:event:<id>`, or `<prefix>:{<function>:<bucket>}:event:<id>` with more than one bucket; the key holds the event's lease or its done marker)."),
    var("REDIS_KEY_BUCKETS", "auto", "How many hash slots a function's keys are spread over: `auto` (1 standalone, 64 cluster: with three shards 16 buckets left one shard with a fifth of the keys and another with half, 64 spread them within 15%) or 1 to 1024. A batch sends one Redis call (a pipeline or a script) per bucket it touches, concurrently. Changing it changes every key: done markers are forgotten (Postgres answers instead) and, while old and new processes overlap, their leases do not see each other."),
    var("REDIS_TIMEOUT_MS", "1000", "Per-call Redis timeout; a slow Redis counts as a failure for its breaker."),
    var("REDIS_PING_IDLE_MS", "1000", "A pooled Redis connection (standalone) not checked out for this long gets a `PING` before it is handed out again; one in steady use does not, which saves a round trip per Redis step. After a call goes unanswered or fails at the connection level, every connection is pinged before its next use (a closed one is replaced at once). 0 pings on every checkout, as `deadpool-redis` does."),
    var("REDIS_CONNECT_TIMEOUT_MS", "5000", "How long connecting to Redis may take at start-up, or when the cluster connection is rebuilt: a cluster connection reaches every node, and each that does not answer costs up to `REDIS_TIMEOUT_MS`."),
    var("CLICKHOUSE_URL", "http://127.0.0.1:8123", "ClickHouse HTTP endpoint; several, comma-separated, are used round-robin and a failed write moves to the next."),
    var("CLICKHOUSE_DATABASE", "default", "ClickHouse database holding the function tables."),
    var("CLICKHOUSE_USER", "default", "ClickHouse user."),
    secret("CLICKHOUSE_PASSWORD", "", "ClickHouse password."),
    var("CLICKHOUSE_TIMEOUT_MS", "10000", "Timeout of one ClickHouse write (all its attempts)."),
    var("CLICKHOUSE_WRITE_ATTEMPTS", "3", "Attempts of one ClickHouse write, each on the next endpoint, so one dead endpoint does not fail the write."),
    var("CLICKHOUSE_RETRY_BACKOFF_MS", "10", "Wait before the second attempt; doubles for each further one (10, 20, 40 ms)."),
    var(
        "GUARD_LEASE_TTL_MS",
        "30000",
        "Lease TTL; capped by the caller's deadline (on Lambda, the invocation's remaining time).",
    ),
    var("GUARD_DONE_TTL_SECS", "86400", "How long Redis remembers a confirmed id (the done marker)."),
    var(
        "KAFKA_DEDUP_TTL_SECONDS",
        "3600",
        "How long the in-process cache remembers a confirmed id; 0 disables the cache.",
    ),
    var("GUARD_LOCAL_CACHE_MAX_BYTES", "67108864", "Memory bound of the in-process cache of confirmed ids (64 MiB)."),
    var("GUARD_MAX_ATTEMPTS", "5", "Failed attempts before an event is dead-lettered (a function may set its own)."),
    var("GUARD_MAX_SUBTRANSACTIONS", "64", "Most handler savepoints in one Postgres transaction (1 to 64): a batch whose handlers write to Postgres is confirmed in several transactions of at most this many, so no backend goes past the 64 subtransactions Postgres caches per backend (past it, every other session's visibility checks read `pg_subtrans`)."),
    var("EVENT_ID_FORMAT", "auto", "How event ids are written: `v2` (tagged by kind, unambiguous), `v1` (the untagged ids of earlier versions), `v1+v2` (the transition: both checked and confirmed, so processes on v1 and on v2 fence each other), or `auto` (`v1+v2` while the ledger holds ids only known in v1, then `v2`). See docs/RELIABILITY.md, \"Event ids and the move to v2\"."),
    var("EVENT_ID_FORMAT_RECHECK_SECS", "300", "With `EVENT_ID_FORMAT=auto`: how often a process asks the ledger again whether v1-only rows remain (one small index lookup per function)."),
    var("GUARD_DEFERRED_RELEASES", "64", "In the worker, a batch whose events all finished answers once its confirm has committed, and its release step (done markers, lease release: one Redis round trip) goes out after it, so the next batch does not wait for it. This bounds how many such releases may be in flight; more wait. At most 65536; `0` releases before answering, as Lambda and `POST /invoke` always do."),
    var("GUARD_MAX_VALUE_BYTES", "1048576", "Largest record value handled; larger ones are dead-lettered as `value_too_large`."),
    var("GUARD_MAX_BATCH_DECOMPRESSED_BYTES", "67108864", "Most bytes of zlib-compressed values (AWS Glue's frame) one batch decompresses; past it the batch's other compressed values wait for a later batch (unavailable). Never less than two values (`GUARD_MAX_VALUE_BYTES`: a record's value and key), so every batch makes progress."),
    var("GUARD_DEAD_LETTER_PAYLOAD_MISMATCH", "false", "Also store a copy of a duplicate whose payload differs from the confirmed one in the dead letters (it is always counted and logged)."),
    secret("SCHEMA_REGISTRY_URL", "", "Schema registry with Confluent's REST API (Confluent, Redpanda, Karapace, Apicurio's compatibility API), for functions whose values are framed for one (`ValueFormat::confluent()`); `https://<user>:<password>@host` for basic auth. Unset: a `confluent()` function refuses to start; a `confluent_or_json()` function starts, reads JSON values, and dead-letters framed ones as `schema_registry_unset` (replayable once it is set)."),
    var("SCHEMA_REGISTRY_USERNAME", "", "Basic-auth user for the schema registry (an API key on Confluent Cloud); overrides a user in the URL."),
    secret("SCHEMA_REGISTRY_PASSWORD", "", "Basic-auth password for the schema registry (the API secret)."),
    var("SCHEMA_REGISTRY_TIMEOUT_MS", "5000", "Timeout of one schema lookup (Confluent-compatible or AWS Glue); a slow registry counts as a failure for its breaker, and the records waiting for it are retried."),
    var("SCHEMA_REGISTRY_CACHE_MAX", "10000", "Schemas kept per process (each is fetched once); ids past it are fetched every time, so forged ids cannot grow memory."),
    var("SCHEMA_REGISTRY_BREAKER_FAILURES", "3", "Consecutive schema registry failures that open its breaker. The AWS Glue Schema Registry has a breaker of its own (`glue_schema_registry`) with the same settings."),
    var("SCHEMA_REGISTRY_BREAKER_OPEN_SECS", "10", "How long the schema registry breaker stays open before a probe."),
    var("SCHEMA_REGISTRY_BREAKER_SUCCESSES", "1", "Successful probes that close the schema registry breaker."),
    var("SCHEMA_REGISTRY_BREAKER_PROBES", "1", "Concurrent probe calls allowed while the schema registry breaker is half-open."),
    var("RETENTION_DAYS", "7", "Confirmed ids older than this are deleted by the cleanup (Redis markers expire on their own)."),
    var("CLEANUP_BATCH_SIZE", "5000", "Rows deleted per cleanup statement, so it never holds long locks."),
    var("CLEANUP_INTERVAL_SECS", "3600", "How often the worker runs the cleanup; 0 disables it (run `eo cleanup` instead)."),
    var("CLICKHOUSE_BREAKER_FAILURES", "3", "Consecutive ClickHouse failures that open its breaker."),
    var("CLICKHOUSE_BREAKER_OPEN_SECS", "30", "How long the ClickHouse breaker stays open before a probe."),
    var("CLICKHOUSE_BREAKER_SUCCESSES", "3", "Successful probes that close the ClickHouse breaker."),
    var("CLICKHOUSE_BREAKER_PROBES", "1", "Concurrent probe calls allowed while the ClickHouse breaker is half-open."),
    var("KAFKA_BREAKER_FAILURES", "2", "Consecutive Kafka failures that open its breaker."),
    var("KAFKA_BREAKER_OPEN_SECS", "60", "How long the Kafka breaker stays open before a probe."),
    var("KAFKA_BREAKER_SUCCESSES", "3", "Successful probes that close the Kafka breaker."),
    var("KAFKA_BREAKER_PROBES", "1", "Concurrent probe calls allowed while the Kafka breaker is half-open."),
    var("REDIS_BREAKER_FAILURES", "5", "Consecutive Redis failures that open its breaker."),
    var("REDIS_BREAKER_OPEN_SECS", "15", "How long the Redis breaker stays open before a probe."),
    var("REDIS_BREAKER_SUCCESSES", "2", "Successful probes that close the Redis breaker."),
    var("REDIS_BREAKER_PROBES", "1", "Concurrent probe calls allowed while the Redis breaker is half-open."),
    var("KAFKA_BROKERS", "127.0.0.1:9092", "Kafka bootstrap servers (ignored when `MSK_CLUSTER_ARN` is set)."),
    var("MSK_CLUSTER_ARN", "", "Resolve the brokers of this MSK cluster with `GetBootstrapBrokers` (listener chosen by `KAFKA_AUTH`; region from `AWS_REGION`)."),
    var("KAFKA_AUTH", "plaintext", "`plaintext`, `tls`, `scram` (SASL/SCRAM-SHA-512) or `iam` (SASL/OAUTHBEARER with MSK IAM tokens)."),
    var("KAFKA_SASL_USERNAME", "", "SCRAM user name (`KAFKA_AUTH=scram`)."),
    secret("KAFKA_SASL_PASSWORD", "", "SCRAM password (`KAFKA_AUTH=scram`)."),
    var("KAFKA_GROUP_ID", "exactly-once", "Worker: consumer group id."),
    var(
        "KAFKA_TOPIC_PREFIX",
        "",
        "Worker: prefix added to every function's topic names (isolates environments and tests).",
    ),
    var("KAFKA_SESSION_TIMEOUT_MS", "10000", "Worker: consumer group session timeout."),
    var("KAFKA_MAX_POLL_INTERVAL_MS", "300000", "Worker: longest a member may go without polling before the group removes it (librdkafka's `max.poll.interval.ms`; at least the session timeout). It bounds how long a member that stopped polling (hung, or a process half gone) holds its partitions. A worker polls while partitions are paused, but not while all `MAX_IN_FLIGHT_MESSAGES` permits are held (every slot waiting on a paused partition, e.g. a long ClickHouse outage): past this interval it then leaves the group and its partitions are reassigned, so keep it longer than the outages to ride out."),
    var(
        "KAFKA_CREATE_TOPICS",
        "false",
        "Worker: create missing topics at start (local use; `scripts/run.sh` turns it on).",
    ),
    var("KAFKA_TOPIC_PARTITIONS", "3", "Worker: partitions of topics it creates."),
    var("KAFKA_PRODUCE_TIMEOUT_MS", "30000", "How long a publish (outbox relay, `eo produce`) may take before it counts as failed."),
    var("OUTBOX_RELAY_INTERVAL_MS", "500", "Worker: how often the outbox relay looks for messages to publish."),
    var("OUTBOX_MAX_ATTEMPTS", "5", "Times Kafka may refuse one outbox message on its own merits (too large, unknown topic, not authorised, invalid record) before it is dead-lettered in the outbox (`eo outbox list`); a Kafka outage never counts."),
    var("OUTBOX_RETENTION_HOURS", "24", "Published outbox messages older than this are deleted by the cleanup (and by the scheduled outbox drain on Lambda); queued and dead-lettered ones are kept."),
    var("WORKER_BATCH_SIZE", "500", "Worker: most records of one partition guarded as one batch."),
    var(
        "WORKER_MAX_PARTITION_IN_FLIGHT",
        "0",
        "Worker: most received, unfinished records one partition may hold; at this cap the partition is paused until it has worked off half. 0: `MAX_IN_FLIGHT_MESSAGES` divided by (assigned partitions + 1), so partitions stuck on a retry or an outage never hold every slot and the others keep flowing.",
    ),
    var(
        "MAX_IN_FLIGHT_MESSAGES",
        "1000",
        "Worker: records received but not yet finished, across all partitions; at this bound the worker stops receiving, so its memory stays bounded however far behind it falls.",
    ),
    var(
        "WORKER_RETRY_BACKOFF_MS",
        "200",
        "Worker: first wait before retrying an unfinished record; doubles up to 5 s.",
    ),
    var("WORKER_SHUTDOWN_TIMEOUT_SECS", "30", "Worker: how long a graceful shutdown waits for in-flight batches."),
    var(
        "HTTP_BIND",
        "127.0.0.1:8080",
        "Worker: address of the HTTP server (`/healthz`, `/readyz`, `/metrics`, `POST /invoke/{function}`).",
    ),
    secret(
        "INVOKE_TOKEN",
        "",
        "Bearer token required by `POST /invoke/{function}`; mandatory when `HTTP_BIND` is not a loopback address.",
    ),
    var(
        "HTTP_MAX_BODY_BYTES",
        "6291456",
        "Largest request body the HTTP server accepts (6 MiB, Lambda's payload limit).",
    ),
    var(
        "STARTUP_TIMEOUT_SECS",
        "30",
        "How long start-up waits for Postgres, Redis, ClickHouse and Kafka before giving up.",
    ),
    var(
        "LAMBDA_REPORT_BATCH_ITEM_FAILURES",
        "false",
        "Lambda: answer a partly failed batch with `batchItemFailures` instead of an error. Set it only with `FunctionResponseTypes: [ReportBatchItemFailures]` on the mapping (the template and the CDK app set both by default).",
    ),
    var("LAMBDA_EVENT_RECORD_FORMAT", "JSON", "Lambda, when the MSK event source mapping has a schema registry (`SchemaRegistryConfig`, records carrying `valueSchemaMetadata`): its `EventRecordFormat`. `JSON`: the mapping decoded each value into JSON text, read as it is. `SOURCE`: each value is the producer's datum with the registry's frame removed, decoded here with the schema `valueSchemaMetadata.schemaId` names. Set both from one parameter (the template and the CDK app do)."),
    var("LOG_FORMAT", "text", "`text` or `json`; Lambda always logs JSON."),
];

/// Where values come from: the process environment, or a map in tests.
pub trait Env {
    /// The variable's value, or `None` when it is unset.
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl Env for HashMap<&str, &str> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).map(|s| (*s).to_owned())
    }
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A variable's value is malformed or out of range.
    #[error("{var}={shown}: {reason}")]
    Invalid {
        /// The variable's name.
        var: &'static str,
        /// The value as it may be shown: quoted, or `<hidden>` for a secret.
        shown: String,
        /// Why it cannot be used.
        reason: String,
    },
}

impl ConfigError {
    /// The variable at fault.
    pub fn variable(&self) -> &'static str {
        match self {
            ConfigError::Invalid { var, .. } => var,
        }
    }
}

fn lookup(name: &str) -> &'static Var {
    VARIABLES
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| unreachable!("{name} is read but not listed in config::VARIABLES"))
}

/// Reads one documented variable, falling back to its documented default.
pub fn read<T>(env: &dyn Env, name: &str) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    let v = lookup(name);
    let raw = env.get(v.name).unwrap_or_else(|| v.default.to_owned());
    raw.trim().parse::<T>().map_err(|e| ConfigError::Invalid {
        var: v.name,
        shown: if v.secret { "<hidden>".into() } else { format!("{raw:?}") },
        reason: e.to_string(),
    })
}

fn positive<T: PartialOrd + Default + FromStr>(env: &dyn Env, name: &str) -> Result<T, ConfigError>
where
    T::Err: fmt::Display,
{
    let value: T = read(env, name)?;
    if value <= T::default() {
        return Err(ConfigError::Invalid {
            var: lookup(name).name,
            shown: env.get(name).unwrap_or_default(),
            reason: "must be greater than zero".into(),
        });
    }
    Ok(value)
}

fn millis(env: &dyn Env, name: &str) -> Result<Duration, ConfigError> {
    Ok(Duration::from_millis(positive::<u64>(env, name)?))
}

fn secs(env: &dyn Env, name: &str) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(positive::<u64>(env, name)?))
}

/// A string that is never printed: `Debug` and `Display` show `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The value itself, to hand to the client that needs it; never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `scheme://user:***@host/...`: a URL safe to print. Anything unparsable is hidden whole.
pub fn redact_url(url: &str) -> String {
    // A list of addresses (Redis Cluster seed nodes) is redacted one address at a time.
    split_urls(url).iter().map(|u| redact_one(u)).collect::<Vec<_>>().join(",")
}

/// A comma-separated list of URLs, split. A comma inside a password is not a separator:
/// a piece without a scheme belongs to the address before it.
pub fn split_urls(list: &str) -> Vec<String> {
    let mut parts: Vec<String> = Vec::new();
    for piece in list.split(',') {
        match parts.last_mut() {
            Some(last) if !piece.contains("://") => {
                last.push(',');
                last.push_str(piece);
            }
            _ => parts.push(piece.trim().to_owned()),
        }
    }
    parts.retain(|p| !p.is_empty());
    if parts.is_empty() {
        parts.push(String::new());
    }
    parts
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparsable url>".into();
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{}", strip_query(path))
        }
        None => format!("{scheme}://{authority}{}", strip_query(path)),
    }
}

fn strip_query(path: &str) -> &str {
    // Query strings can carry passwords too (`?password=`).
    path.split('?').next().unwrap_or("")
}

/// Postgres: the connection and the pool.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// `DATABASE_URL`.
    pub url: Secret,
    /// `None`: the server's default search path.
    pub schema: Option<String>,
    /// `DATABASE_MAX_CONNECTIONS`: the pool size.
    pub max_connections: u32,
    /// `DATABASE_CONNECT_TIMEOUT_MS`: how long to wait for a connection.
    pub connect_timeout: Duration,
    /// `DATABASE_GENERIC_PLANS`: sessions set `plan_cache_mode=force_generic_plan`.
    pub generic_plans: bool,
}

impl PostgresConfig {
    /// Reads `DATABASE_*`; a schema that is not a plain lowercase identifier is an error.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let schema: String = read(env, "DATABASE_SCHEMA")?;
        let schema = match schema.as_str() {
            "" => None,
            s if is_identifier(s) => Some(s.to_owned()),
            s => {
                return Err(ConfigError::Invalid {
                    var: "DATABASE_SCHEMA",
                    shown: format!("{s:?}"),
                    reason: "use lowercase letters, digits and `_`, starting with a letter".into(),
                })
            }
        };
        Ok(Self {
            url: Secret::new(read::<String>(env, "DATABASE_URL")?),
            schema,
            max_connections: positive(env, "DATABASE_MAX_CONNECTIONS")?,
            connect_timeout: millis(env, "DATABASE_CONNECT_TIMEOUT_MS")?,
            generic_plans: read(env, "DATABASE_GENERIC_PLANS")?,
        })
    }
}

/// Lowercase SQL identifier we are willing to splice into DDL (schema and database names).
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// How Redis is deployed (`REDIS_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// One server, or a primary with replicas behind one address.
    Standalone,
    /// Redis Cluster (or Valkey, ElastiCache cluster mode and Serverless): keys live on
    /// shards by hash slot, and the client follows `MOVED`/`ASK` redirections.
    Cluster,
}

impl FromStr for RedisMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "standalone" => Ok(Self::Standalone),
            "cluster" => Ok(Self::Cluster),
            other => Err(format!("{other:?} is not standalone or cluster")),
        }
    }
}

/// Redis: the connection pool and the key prefix.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `REDIS_URL`: one address, or with [`RedisMode::Cluster`] one or more seed nodes,
    /// comma-separated.
    pub url: Secret,
    /// `REDIS_MODE`.
    pub mode: RedisMode,
    /// `REDIS_KEY_BUCKETS`, resolved: how many hash slots a function's keys spread over.
    pub key_buckets: u32,
    /// `REDIS_TLS_CA_FILE`: `None` means the system's roots.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// `REDIS_POOL_SIZE`.
    pub pool_size: usize,
    /// `REDIS_KEY_PREFIX`: the first part of every key; non-empty, without spaces or
    /// braces.
    pub key_prefix: String,
    /// `REDIS_TIMEOUT_MS`: the limit on one call.
    pub timeout: Duration,
    /// `REDIS_CONNECT_TIMEOUT_MS`: the limit on building a connection (a cluster
    /// connection reaches every node).
    pub connect_timeout: Duration,
    /// `REDIS_PING_IDLE_MS`: a pooled connection unused this long is pinged before reuse
    /// (zero: on every use).
    pub ping_idle: Duration,
}

impl RedisConfig {
    /// Reads `REDIS_*`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let key_prefix: String = read(env, "REDIS_KEY_PREFIX")?;
        if key_prefix.is_empty() || key_prefix.contains(['{', '}', ' ']) {
            return Err(ConfigError::Invalid {
                var: "REDIS_KEY_PREFIX",
                shown: format!("{key_prefix:?}"),
                reason: "must be non-empty, without spaces or braces".into(),
            });
        }
        let mode: RedisMode = read(env, "REDIS_MODE")?;
        let buckets: String = read(env, "REDIS_KEY_BUCKETS")?;
        let key_buckets = match (buckets.as_str(), mode) {
            ("auto", RedisMode::Standalone) => 1,
            ("auto", RedisMode::Cluster) => 64,
            (n, _) => match n.parse::<u32>() {
                Ok(n @ 1..=1024) => n,
                _ => {
                    return Err(ConfigError::Invalid {
                        var: "REDIS_KEY_BUCKETS",
                        shown: format!("{buckets:?}"),
                        reason: "must be auto or a whole number from 1 to 1024".into(),
                    })
                }
            },
        };
        Ok(Self {
            url: Secret::new(read::<String>(env, "REDIS_URL")?),
            mode,
            key_buckets,
            tls_ca_file: Some(read::<String>(env, "REDIS_TLS_CA_FILE")?)
                .filter(|p| !p.is_empty())
                .map(std::path::PathBuf::from),
            pool_size: positive(env, "REDIS_POOL_SIZE")?,
            key_prefix,
            timeout: millis(env, "REDIS_TIMEOUT_MS")?,
            connect_timeout: millis(env, "REDIS_CONNECT_TIMEOUT_MS")?,
            ping_idle: Duration::from_millis(read(env, "REDIS_PING_IDLE_MS")?),
        })
    }
}

/// ClickHouse: the endpoints, the credentials and how writes are retried.
#[derive(Debug, Clone)]
pub struct ClickHouseConfig {
    /// One or more endpoints; the first is used for DDL and reads.
    pub urls: Vec<String>,
    /// `CLICKHOUSE_DATABASE`: holds the function tables; a plain lowercase identifier.
    pub database: String,
    /// `CLICKHOUSE_USER`.
    pub user: String,
    /// `CLICKHOUSE_PASSWORD`.
    pub password: Secret,
    /// `CLICKHOUSE_TIMEOUT_MS`: the limit on one write, all its attempts included.
    pub timeout: Duration,
    /// `CLICKHOUSE_WRITE_ATTEMPTS`: attempts of one write, each on the next endpoint.
    pub write_attempts: u32,
    /// `CLICKHOUSE_RETRY_BACKOFF_MS`: the wait before the second attempt; doubles for
    /// each further one.
    pub retry_backoff: Duration,
}

impl ClickHouseConfig {
    /// Reads `CLICKHOUSE_*`; the URLs must be `http://` or `https://`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let database: String = read(env, "CLICKHOUSE_DATABASE")?;
        if !is_identifier(&database) {
            return Err(ConfigError::Invalid {
                var: "CLICKHOUSE_DATABASE",
                shown: format!("{database:?}"),
                reason: "use lowercase letters, digits and `_`, starting with a letter".into(),
            });
        }
        let urls: String = read(env, "CLICKHOUSE_URL")?;
        let urls: Vec<String> = urls.split(',').map(|u| u.trim().to_owned()).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() || urls.iter().any(|u| !u.starts_with("http://") && !u.starts_with("https://")) {
            return Err(ConfigError::Invalid {
                var: "CLICKHOUSE_URL",
                shown: format!("{urls:?}"),
                reason: "give one or more http(s):// URLs, comma-separated".into(),
            });
        }
        Ok(Self {
            urls,
            database,
            user: read(env, "CLICKHOUSE_USER")?,
            password: Secret::new(read::<String>(env, "CLICKHOUSE_PASSWORD")?),
            timeout: millis(env, "CLICKHOUSE_TIMEOUT_MS")?,
            write_attempts: positive(env, "CLICKHOUSE_WRITE_ATTEMPTS")?,
            retry_backoff: millis(env, "CLICKHOUSE_RETRY_BACKOFF_MS")?,
        })
    }

    /// The first endpoint (DDL, reads, error messages).
    pub fn url(&self) -> &str {
        &self.urls[0]
    }
}

/// The guard: lease and marker lifetimes, the in-process cache, attempts and limits.
#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// `GUARD_LEASE_TTL_MS`: how long a Redis lease lives, capped by the caller's
    /// deadline.
    pub lease_ttl: Duration,
    /// `GUARD_DONE_TTL_SECS`: how long Redis remembers a confirmed id.
    pub done_ttl: Duration,
    /// Zero disables the in-process cache.
    pub local_cache_ttl: Duration,
    /// `GUARD_LOCAL_CACHE_MAX_BYTES`: the memory bound of the in-process cache.
    pub local_cache_max_bytes: u64,
    /// `GUARD_MAX_ATTEMPTS`: failed attempts before an event is dead-lettered, unless its
    /// function sets its own.
    pub max_attempts: u32,
    /// `GUARD_DEFERRED_RELEASES`: release steps the worker may leave in flight after
    /// their batches answered (0: release before answering).
    pub deferred_releases: usize,
    /// `GUARD_MAX_VALUE_BYTES`: larger record values are dead-lettered as
    /// `value_too_large`.
    pub max_value_bytes: usize,
    /// `GUARD_MAX_BATCH_DECOMPRESSED_BYTES`: compressed values one batch decompresses,
    /// in bytes once decompressed (at least `max_value_bytes` is used).
    pub max_batch_decompressed_bytes: usize,
    /// `GUARD_DEAD_LETTER_PAYLOAD_MISMATCH`: also dead-letter a copy of a duplicate whose
    /// payload differs.
    pub dead_letter_payload_mismatch: bool,
    /// Handler savepoints per transaction, at most [`GuardConfig::SUBTRANSACTION_CACHE`].
    pub max_subtransactions: usize,
    /// `EVENT_ID_FORMAT`.
    pub id_format: crate::event_id::IdFormatSetting,
    /// `EVENT_ID_FORMAT_RECHECK_SECS`.
    pub id_format_recheck: Duration,
    /// `LAMBDA_EVENT_RECORD_FORMAT`: what a value carrying the event source mapping's
    /// schema metadata is.
    pub event_record_format: EventRecordFormat,
}

/// What a Lambda event source mapping with a schema registry delivers as a record's value
/// (its `EventRecordFormat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventRecordFormat {
    /// The value decoded by the mapping into JSON text.
    #[default]
    Json,
    /// The producer's datum, its registry frame (magic byte, schema id) removed; the
    /// schema id is in the record's `valueSchemaMetadata`.
    Source,
}

impl FromStr for EventRecordFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "JSON" => Ok(EventRecordFormat::Json),
            "SOURCE" => Ok(EventRecordFormat::Source),
            other => Err(format!("`{other}` is not an event record format: use JSON or SOURCE")),
        }
    }
}

impl GuardConfig {
    /// Reads `GUARD_*`, `KAFKA_DEDUP_TTL_SECONDS`, `EVENT_ID_FORMAT*` and
    /// `LAMBDA_EVENT_RECORD_FORMAT`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        Ok(Self {
            lease_ttl: millis(env, "GUARD_LEASE_TTL_MS")?,
            done_ttl: secs(env, "GUARD_DONE_TTL_SECS")?,
            local_cache_ttl: Duration::from_secs(read(env, "KAFKA_DEDUP_TTL_SECONDS")?),
            local_cache_max_bytes: read(env, "GUARD_LOCAL_CACHE_MAX_BYTES")?,
            max_attempts: positive(env, "GUARD_MAX_ATTEMPTS")?,
            max_value_bytes: positive(env, "GUARD_MAX_VALUE_BYTES")?,
            max_batch_decompressed_bytes: positive(env, "GUARD_MAX_BATCH_DECOMPRESSED_BYTES")?,
            deferred_releases: {
                let n: usize = read(env, "GUARD_DEFERRED_RELEASES")?;
                if n > Self::MAX_DEFERRED_RELEASES {
                    return Err(ConfigError::Invalid {
                        var: "GUARD_DEFERRED_RELEASES",
                        shown: n.to_string(),
                        reason: format!("must be at most {}", Self::MAX_DEFERRED_RELEASES),
                    });
                }
                n
            },
            dead_letter_payload_mismatch: read(env, "GUARD_DEAD_LETTER_PAYLOAD_MISMATCH")?,
            id_format: read(env, "EVENT_ID_FORMAT")?,
            id_format_recheck: secs(env, "EVENT_ID_FORMAT_RECHECK_SECS")?,
            event_record_format: read(env, "LAMBDA_EVENT_RECORD_FORMAT")?,
            max_subtransactions: {
                let n: usize = positive(env, "GUARD_MAX_SUBTRANSACTIONS")?;
                if n > Self::SUBTRANSACTION_CACHE {
                    return Err(ConfigError::Invalid {
                        var: "GUARD_MAX_SUBTRANSACTIONS",
                        shown: n.to_string(),
                        reason: format!(
                            "must be at most {}, the subtransactions Postgres caches per backend",
                            Self::SUBTRANSACTION_CACHE
                        ),
                    });
                }
                n
            },
        })
    }

    /// The largest `GUARD_DEFERRED_RELEASES`.
    pub const MAX_DEFERRED_RELEASES: usize = 65_536;

    /// `PGPROC_MAX_CACHED_SUBXIDS`: subtransactions Postgres tracks per backend in shared
    /// memory. A transaction with more overflows the cache, and until it ends every
    /// snapshot in every session looks its subtransactions up in `pg_subtrans` (an SLRU
    /// with a small buffer): a well-known cliff on busy servers.
    pub const SUBTRANSACTION_CACHE: usize = 64;
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self::from_env(&HashMap::<&str, &str>::new()).expect("documented defaults are valid")
    }
}

/// The schema registry (`SCHEMA_REGISTRY_*`).
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// `SCHEMA_REGISTRY_URL`; `None` when unset.
    pub url: Option<Secret>,
    /// `SCHEMA_REGISTRY_USERNAME`.
    pub username: Option<String>,
    /// `SCHEMA_REGISTRY_PASSWORD`.
    pub password: Option<Secret>,
    /// `SCHEMA_REGISTRY_TIMEOUT_MS`.
    pub timeout: Duration,
    /// `SCHEMA_REGISTRY_CACHE_MAX`.
    pub cache_max: usize,
    /// `SCHEMA_REGISTRY_BREAKER_*`.
    pub breaker: BreakerConfig,
    /// The AWS SDK configuration for the Glue Schema Registry, when the application
    /// supplies its own (tests do: a local endpoint and fixed credentials). `None`: the
    /// usual chain is loaded on the first Glue lookup (region and credentials from the
    /// environment or the Lambda role; `AWS_ENDPOINT_URL_GLUE` overrides the endpoint).
    pub glue_sdk: Option<aws_types::SdkConfig>,
}

impl RegistryConfig {
    /// Reads `SCHEMA_REGISTRY_*`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let text = |name: &str| -> Result<Option<String>, ConfigError> {
            Ok(Some(read::<String>(env, name)?).filter(|s| !s.is_empty()))
        };
        Ok(Self {
            url: text("SCHEMA_REGISTRY_URL")?.map(Secret::new),
            username: text("SCHEMA_REGISTRY_USERNAME")?,
            password: text("SCHEMA_REGISTRY_PASSWORD")?.map(Secret::new),
            timeout: millis(env, "SCHEMA_REGISTRY_TIMEOUT_MS")?,
            cache_max: read(env, "SCHEMA_REGISTRY_CACHE_MAX")?,
            breaker: BreakerConfig::from_env(env, "SCHEMA_REGISTRY")?,
            glue_sdk: None,
        })
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self::from_env(&HashMap::<&str, &str>::new()).expect("documented defaults are valid")
    }
}

/// Thresholds of one circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker.
    pub failure_threshold: u32,
    /// How long it stays open before letting a probe through.
    pub open_for: Duration,
    /// Successful probes (in half-open) that close it again.
    pub success_threshold: u32,
    /// Probe calls allowed at once while half-open.
    pub half_open_max_calls: u32,
}

impl BreakerConfig {
    /// `prefix` is `CLICKHOUSE`, `KAFKA` or `REDIS`.
    pub fn from_env(env: &dyn Env, prefix: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            failure_threshold: positive(env, &format!("{prefix}_BREAKER_FAILURES"))?,
            open_for: secs(env, &format!("{prefix}_BREAKER_OPEN_SECS"))?,
            success_threshold: positive(env, &format!("{prefix}_BREAKER_SUCCESSES"))?,
            half_open_max_calls: positive(env, &format!("{prefix}_BREAKER_PROBES"))?,
        })
    }
}

/// The three circuit breakers' thresholds.
#[derive(Debug, Clone)]
pub struct BreakersConfig {
    /// In front of ClickHouse (`CLICKHOUSE_BREAKER_*`).
    pub clickhouse: BreakerConfig,
    /// In front of Kafka (`KAFKA_BREAKER_*`).
    pub kafka: BreakerConfig,
    /// In front of Redis (`REDIS_BREAKER_*`).
    pub redis: BreakerConfig,
}

impl BreakersConfig {
    /// Reads `CLICKHOUSE_BREAKER_*`, `KAFKA_BREAKER_*` and `REDIS_BREAKER_*`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        Ok(Self {
            clickhouse: BreakerConfig::from_env(env, "CLICKHOUSE")?,
            kafka: BreakerConfig::from_env(env, "KAFKA")?,
            redis: BreakerConfig::from_env(env, "REDIS")?,
        })
    }
}

impl Default for BreakersConfig {
    fn default() -> Self {
        Self::from_env(&HashMap::<&str, &str>::new()).expect("documented defaults are valid")
    }
}

/// Retention of the ledger and of published outbox messages.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    /// `RETENTION_DAYS`: confirmed ids older than this are deleted.
    pub retention: Duration,
    /// Published outbox messages older than this are deleted.
    pub outbox_retention: Duration,
    /// `CLEANUP_BATCH_SIZE`: rows deleted per statement.
    pub batch_size: i64,
    /// Zero: the worker does not run the cleanup itself.
    pub interval: Duration,
}

impl RetentionConfig {
    /// Reads `RETENTION_DAYS`, `OUTBOX_RETENTION_HOURS` and `CLEANUP_*`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        Ok(Self {
            retention: Duration::from_secs(positive::<u64>(env, "RETENTION_DAYS")? * 86_400),
            outbox_retention: Duration::from_secs(positive::<u64>(env, "OUTBOX_RETENTION_HOURS")? * 3_600),
            batch_size: positive(env, "CLEANUP_BATCH_SIZE")?,
            interval: Duration::from_secs(read(env, "CLEANUP_INTERVAL_SECS")?),
        })
    }
}

/// How clients authenticate to Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KafkaAuth {
    /// No encryption, no authentication (local use).
    Plaintext,
    /// TLS, without authentication.
    Tls,
    /// SASL/SCRAM-SHA-512 over TLS.
    Scram {
        /// `KAFKA_SASL_USERNAME`.
        username: String,
        /// `KAFKA_SASL_PASSWORD`.
        password: Secret,
    },
    /// SASL/OAUTHBEARER with MSK IAM tokens, over TLS.
    Iam,
}

impl KafkaAuth {
    /// `plaintext`, `tls`, `scram` or `iam`, as `KAFKA_AUTH` spells them.
    pub fn name(&self) -> &'static str {
        match self {
            KafkaAuth::Plaintext => "plaintext",
            KafkaAuth::Tls => "tls",
            KafkaAuth::Scram { .. } => "scram",
            KafkaAuth::Iam => "iam",
        }
    }
}

/// Kafka: where the brokers are, how to authenticate, and the worker's consumer.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `KAFKA_BROKERS`: bootstrap servers, comma-separated (unused when `cluster_arn` is
    /// set).
    pub brokers: String,
    /// `MSK_CLUSTER_ARN`: the brokers are looked up from this cluster; `None`: `brokers`
    /// is used.
    pub cluster_arn: Option<String>,
    /// `KAFKA_AUTH`.
    pub auth: KafkaAuth,
    /// `KAFKA_GROUP_ID`: the worker's consumer group.
    pub group_id: String,
    /// `KAFKA_TOPIC_PREFIX`: put before every function's topic names (see
    /// [`KafkaConfig::topic`]).
    pub topic_prefix: String,
    /// `KAFKA_SESSION_TIMEOUT_MS`: the consumer group session timeout.
    pub session_timeout: Duration,
    /// `KAFKA_MAX_POLL_INTERVAL_MS`: how long a member may go without polling before the
    /// group removes it.
    pub max_poll_interval: Duration,
    /// `KAFKA_CREATE_TOPICS`: the worker creates missing topics at start.
    pub create_topics: bool,
    /// `KAFKA_TOPIC_PARTITIONS`: partitions of the topics the worker creates.
    pub topic_partitions: i32,
    /// `KAFKA_PRODUCE_TIMEOUT_MS`: how long a publish may take before it counts as
    /// failed.
    pub produce_timeout: Duration,
    /// `OUTBOX_RELAY_INTERVAL_MS`: how often the outbox relay looks for messages.
    pub relay_interval: Duration,
    /// Refusals of one outbox message before it is dead-lettered.
    pub outbox_max_attempts: u32,
}

impl KafkaConfig {
    /// Reads `KAFKA_*`, `MSK_CLUSTER_ARN` and `OUTBOX_*`; `scram` needs a user name and a
    /// password.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let auth: String = read(env, "KAFKA_AUTH")?;
        let auth = match auth.as_str() {
            "plaintext" => KafkaAuth::Plaintext,
            "tls" => KafkaAuth::Tls,
            "iam" => KafkaAuth::Iam,
            "scram" => {
                let username: String = read(env, "KAFKA_SASL_USERNAME")?;
                let password: String = read(env, "KAFKA_SASL_PASSWORD")?;
                if username.is_empty() || password.is_empty() {
                    return Err(ConfigError::Invalid {
                        var: "KAFKA_AUTH",
                        shown: "\"scram\"".into(),
                        reason: "needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD".into(),
                    });
                }
                KafkaAuth::Scram { username, password: Secret::new(password) }
            }
            other => {
                return Err(ConfigError::Invalid {
                    var: "KAFKA_AUTH",
                    shown: format!("{other:?}"),
                    reason: "use plaintext, tls, scram or iam".into(),
                })
            }
        };
        let arn: String = read(env, "MSK_CLUSTER_ARN")?;
        Ok(Self {
            cluster_arn: (!arn.is_empty()).then_some(arn),
            auth,
            brokers: read(env, "KAFKA_BROKERS")?,
            group_id: read(env, "KAFKA_GROUP_ID")?,
            topic_prefix: read(env, "KAFKA_TOPIC_PREFIX")?,
            session_timeout: millis(env, "KAFKA_SESSION_TIMEOUT_MS")?,
            max_poll_interval: millis(env, "KAFKA_MAX_POLL_INTERVAL_MS")?,
            create_topics: read(env, "KAFKA_CREATE_TOPICS")?,
            topic_partitions: positive(env, "KAFKA_TOPIC_PARTITIONS")?,
            produce_timeout: millis(env, "KAFKA_PRODUCE_TIMEOUT_MS")?,
            relay_interval: millis(env, "OUTBOX_RELAY_INTERVAL_MS")?,
            outbox_max_attempts: positive(env, "OUTBOX_MAX_ATTEMPTS")?,
        })
    }

    /// The topic a function's `topic` is read from.
    pub fn topic(&self, topic: &str) -> String {
        format!("{}{}", self.topic_prefix, topic)
    }
}

/// How the worker schedules records.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `WORKER_BATCH_SIZE`: most records of one partition guarded as one batch.
    pub batch_size: usize,
    /// `MAX_IN_FLIGHT_MESSAGES`: received, unfinished records across all partitions.
    pub max_in_flight: usize,
    /// Most records one partition may hold; 0: a fair share (see `WORKER_MAX_PARTITION_IN_FLIGHT`).
    pub max_partition_in_flight: usize,
    /// `WORKER_RETRY_BACKOFF_MS`: the first wait before retrying an unfinished record.
    pub retry_backoff: Duration,
    /// The longest wait between retries (5 s; not configurable).
    pub retry_backoff_max: Duration,
    /// `WORKER_SHUTDOWN_TIMEOUT_SECS`: how long a graceful shutdown waits for in-flight
    /// batches.
    pub shutdown_timeout: Duration,
}

impl WorkerConfig {
    /// Reads `WORKER_*` and `MAX_IN_FLIGHT_MESSAGES`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        Ok(Self {
            batch_size: positive(env, "WORKER_BATCH_SIZE")?,
            max_in_flight: positive(env, "MAX_IN_FLIGHT_MESSAGES")?,
            max_partition_in_flight: read(env, "WORKER_MAX_PARTITION_IN_FLIGHT")?,
            retry_backoff: millis(env, "WORKER_RETRY_BACKOFF_MS")?,
            retry_backoff_max: Duration::from_secs(5),
            shutdown_timeout: secs(env, "WORKER_SHUTDOWN_TIMEOUT_SECS")?,
        })
    }
}

/// The worker's HTTP server.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// `HTTP_BIND`: the address to listen on.
    pub bind: std::net::SocketAddr,
    /// `INVOKE_TOKEN`: the bearer token `POST /invoke` requires; `None`: no token
    /// (loopback only).
    pub invoke_token: Option<Secret>,
    /// `HTTP_MAX_BODY_BYTES`: the largest request body accepted.
    pub max_body_bytes: usize,
}

impl HttpConfig {
    /// Reads `HTTP_*` and `INVOKE_TOKEN`; a non-loopback address without a token is an
    /// error.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let bind: std::net::SocketAddr = read(env, "HTTP_BIND")?;
        let token: String = read(env, "INVOKE_TOKEN")?;
        let invoke_token = (!token.is_empty()).then(|| Secret::new(token));
        if !bind.ip().is_loopback() && invoke_token.is_none() {
            return Err(ConfigError::Invalid {
                var: "HTTP_BIND",
                shown: format!("{bind}"),
                reason: "not a loopback address: set INVOKE_TOKEN so POST /invoke is not open to the network".into(),
            });
        }
        Ok(Self { bind, invoke_token, max_body_bytes: positive(env, "HTTP_MAX_BODY_BYTES")? })
    }
}

/// How start-up and the process behave, whatever the runtime.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// `STARTUP_TIMEOUT_SECS`: how long start-up waits for the services.
    pub startup_timeout: Duration,
    /// `LAMBDA_REPORT_BATCH_ITEM_FAILURES`: answer a partly failed batch with
    /// `batchItemFailures`.
    pub report_batch_item_failures: bool,
    /// Whether logs are JSON (`LOG_FORMAT=json`).
    pub log_json: bool,
}

impl ProcessConfig {
    /// Reads `STARTUP_TIMEOUT_SECS`, `LAMBDA_REPORT_BATCH_ITEM_FAILURES` and
    /// `LOG_FORMAT`.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let format: String = read(env, "LOG_FORMAT")?;
        let log_json = match format.as_str() {
            "json" => true,
            "text" => false,
            other => {
                return Err(ConfigError::Invalid {
                    var: "LOG_FORMAT",
                    shown: format!("{other:?}"),
                    reason: "use `text` or `json`".into(),
                })
            }
        };
        Ok(Self {
            startup_timeout: secs(env, "STARTUP_TIMEOUT_SECS")?,
            report_batch_item_failures: read(env, "LAMBDA_REPORT_BATCH_ITEM_FAILURES")?,
            log_json,
        })
    }
}

/// Everything the library needs to build its clients.
#[derive(Debug, Clone)]
pub struct Config {
    /// Postgres.
    pub postgres: PostgresConfig,
    /// Redis.
    pub redis: RedisConfig,
    /// ClickHouse.
    pub clickhouse: ClickHouseConfig,
    /// The guard.
    pub guard: GuardConfig,
    /// The circuit breakers.
    pub breakers: BreakersConfig,
    /// Retention and the cleanup.
    pub retention: RetentionConfig,
    /// The schema registry.
    pub registry: RegistryConfig,
}

impl Config {
    /// Reads every part from `env`; the first invalid value is the error.
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        Ok(Self {
            postgres: PostgresConfig::from_env(env)?,
            redis: RedisConfig::from_env(env)?,
            clickhouse: ClickHouseConfig::from_env(env)?,
            guard: GuardConfig::from_env(env)?,
            breakers: BreakersConfig::from_env(env)?,
            retention: RetentionConfig::from_env(env)?,
            registry: RegistryConfig::from_env(env)?,
        })
    }

    /// Reads the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        Self::from_env(&ProcessEnv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn breaker_defaults_are_the_documented_thresholds() {
        let b = BreakersConfig::default();
        assert_eq!(
            (b.clickhouse.failure_threshold, b.clickhouse.open_for.as_secs(), b.clickhouse.success_threshold),
            (3, 30, 3)
        );
        assert_eq!((b.kafka.failure_threshold, b.kafka.open_for.as_secs(), b.kafka.success_threshold), (2, 60, 3));
        assert_eq!((b.redis.failure_threshold, b.redis.open_for.as_secs(), b.redis.success_threshold), (5, 15, 2));
    }

    #[test]
    fn redis_mode_picks_the_bucket_default_and_bounds_an_explicit_one() {
        let standalone = RedisConfig::from_env(&env(&[])).unwrap();
        assert_eq!((standalone.mode, standalone.key_buckets, standalone.tls_ca_file), (RedisMode::Standalone, 1, None));
        let cluster = RedisConfig::from_env(&env(&[("REDIS_MODE", "cluster")])).unwrap();
        assert_eq!((cluster.mode, cluster.key_buckets), (RedisMode::Cluster, 64));
        let fixed = RedisConfig::from_env(&env(&[("REDIS_KEY_BUCKETS", "64")])).unwrap();
        assert_eq!(fixed.key_buckets, 64);
        for bad in ["0", "1025", "many"] {
            let err = RedisConfig::from_env(&env(&[("REDIS_KEY_BUCKETS", bad)])).unwrap_err();
            assert_eq!(err.variable(), "REDIS_KEY_BUCKETS", "{bad}");
        }
        let err = RedisConfig::from_env(&env(&[("REDIS_MODE", "sentinel")])).unwrap_err();
        assert!(err.to_string().contains("standalone or cluster"), "{err}");
    }

    #[test]
    fn invalid_value_names_the_variable() {
        let err = GuardConfig::from_env(&env(&[("GUARD_LEASE_TTL_MS", "soon")])).unwrap_err();
        assert_eq!(err.variable(), "GUARD_LEASE_TTL_MS");
        assert!(err.to_string().contains("GUARD_LEASE_TTL_MS=\"soon\""), "{err}");
        let zero = GuardConfig::from_env(&env(&[("GUARD_MAX_ATTEMPTS", "0")])).unwrap_err();
        assert!(zero.to_string().contains("greater than zero"), "{zero}");
    }

    #[test]
    fn secret_values_are_not_echoed_in_errors() {
        // A URL is a plain string, so only a non-string secret could fail to parse;
        // the redaction flag is what matters, check it directly.
        assert!(lookup("DATABASE_URL").secret && lookup("CLICKHOUSE_PASSWORD").secret && lookup("REDIS_URL").secret);
        let c = PostgresConfig::from_env(&env(&[("DATABASE_URL", "postgres://u:hunter2@h/db")])).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn redact_url_hides_passwords_and_queries() {
        assert_eq!(redact_url("postgres://u:pw@h:5432/db?sslmode=x&password=pw"), "postgres://u:***@h:5432/db");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("garbage"), "<unparsable url>");
        assert_eq!(
            redact_url("rediss://:pw@a:7000, rediss://u:pw@b:7001/?x=pw"),
            "rediss://:***@a:7000,rediss://u:***@b:7001/"
        );
        // A comma in a token is part of it, not a list.
        assert_eq!(redact_url("rediss://:ab,cd@host:6379"), "rediss://:***@host:6379");
        assert_eq!(redact_url("rediss://:a,b@h1:1,rediss://:a,b@h2:2"), "rediss://:***@h1:1,rediss://:***@h2:2");
    }

    #[test]
    fn schema_and_database_names_are_validated() {
        assert!(PostgresConfig::from_env(&env(&[("DATABASE_SCHEMA", "a;drop")])).is_err());
        assert_eq!(
            PostgresConfig::from_env(&env(&[("DATABASE_SCHEMA", "t_1")])).unwrap().schema.as_deref(),
            Some("t_1")
        );
        assert!(ClickHouseConfig::from_env(&env(&[("CLICKHOUSE_DATABASE", "x`y")])).is_err());
    }

    #[test]
    fn zero_ttl_disables_the_local_cache() {
        let g = GuardConfig::from_env(&env(&[("KAFKA_DEDUP_TTL_SECONDS", "0")])).unwrap();
        assert!(g.local_cache_ttl.is_zero());
    }
}
