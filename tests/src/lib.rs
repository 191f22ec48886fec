//! Test support: each test gets its own Postgres schema, ClickHouse database and Redis
//! key prefix on the real local services (started by `scripts/services.sh`), so tests
//! run in parallel and clean up after themselves, even when they fail.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use std::collections::HashMap;
use std::time::Duration;

use exactly_once::config::{KafkaConfig, ProcessEnv};
use exactly_once::isolation::{delete_keys, scan_delete_keys, Slice};
use exactly_once::producer::Producer;
use exactly_once::{Clients, Config, Event};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::TopicPartitionList;
use tokio::net::{TcpListener, TcpStream};

pub use exactly_once::local_cluster as cluster;

pub mod glue;
pub mod registry;

/// An AWS SDK configuration for a local stand-in (the MSK API, Glue): its endpoint,
/// `region` if any, and fixed credentials, so requests are signed as on AWS.
pub fn aws_sdk(endpoint: &str, region: Option<&str>) -> aws_types::SdkConfig {
    let credentials = aws_credential_types::Credentials::new("AKIDEXAMPLE", "secret", None, None, "test");
    let mut sdk = aws_types::SdkConfig::builder()
        .endpoint_url(endpoint)
        .credentials_provider(aws_types::sdk_config::SharedCredentialsProvider::new(credentials))
        .behavior_version(aws_config::BehaviorVersion::latest());
    if let Some(region) = region {
        sdk = sdk.region(aws_types::region::Region::new(region.to_owned()));
    }
    sdk.build()
}

/// The Python with the third-party Kafka clients (`scripts/pyclients.sh` installs them
/// and prints its path; `scripts/test.sh` exports it as `EO_PYTHON`).
pub fn python() -> String {
    std::env::var("EO_PYTHON").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| {
        let home = std::env::var("HOME").unwrap_or_default();
        let state = std::env::var("EO_STATE_DIR").unwrap_or_else(|_| format!("{home}/.local/state/exactly-once"));
        format!("{state}/pyclients/bin/python")
    })
}

/// Runs `tests/py/<script>` with `args` and `stdin` under [`python`]; its stdout. Panics
/// with its stderr when it fails, or with how to install it when it is missing.
pub async fn run_python(script: &str, args: &[&str], stdin: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let python = python();
    let path = format!("{}/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = tokio::process::Command::new(&python)
        .arg(&path)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python} ({e}): run scripts/pyclients.sh to install the Python clients"));
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.as_bytes()).await.expect("write to the script");
    drop(input);
    let out = child.wait_with_output().await.expect("the script runs");
    assert!(out.status.success(), "{script} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A unique, identifier-safe suffix.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// One test's isolated slice of the real services.
pub struct TestEnv {
    pub clients: Clients,
    /// Kafka settings with this test's own topic prefix and consumer group.
    pub kafka: KafkaConfig,
    /// The configuration before the test's tweaks (used for cleanup).
    config: Config,
    slice: Slice,
    pub schema: String,
    pub clickhouse_db: String,
    pub key_prefix: String,
}

impl TestEnv {
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// Like `new`, with a chance to adjust the configuration first.
    pub async fn with(tweak: impl FnOnce(&mut Config)) -> Self {
        let slice = Slice::new("t");
        let name = slice.name().to_owned();
        let mut config = Config::load().expect("configuration from the environment");
        slice.apply(&mut config);
        config.postgres.max_connections = 8;
        // Cleanup goes straight to the services, even if the test pointed a client
        // elsewhere (a proxy that dies with the test's runtime).
        let cleanup = config.clone();
        tweak(&mut config);
        let clients = Clients::connect(config.clone())
            .await
            .unwrap_or_else(|e| panic!("test services unreachable ({e}); run scripts/services.sh first"));
        let mut kafka = KafkaConfig::from_env(&ProcessEnv).expect("Kafka configuration");
        slice.apply_kafka(&mut kafka);
        kafka.session_timeout = Duration::from_secs(10);
        // A member that stopped polling (a worker aborted in a test) leaves its group in
        // 20 s instead of librdkafka's 5 minutes.
        kafka.max_poll_interval = Duration::from_secs(20);
        Self {
            clients,
            kafka,
            config: cleanup,
            slice,
            schema: name,
            clickhouse_db: config.clickhouse.database.clone(),
            key_prefix: config.redis.key_prefix.clone(),
        }
    }

    pub fn pg(&self) -> &sqlx::PgPool {
        &self.clients.pg
    }

    pub async fn redis(&self) -> exactly_once::redis_client::RedisConnection {
        self.clients.redis.connection().await.expect("redis connection")
    }

    pub async fn redis_exists(&self, key: &str) -> bool {
        let mut c = self.redis().await;
        let n: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut c).await.expect("EXISTS");
        n == 1
    }

    /// Deletes this test's Redis keys (what a Redis restart or FLUSHALL would do to it).
    /// Panics when keys are left: a test that meant to lose Redis state must not go on
    /// with it (the shared `delete_keys` is best effort).
    pub async fn flush_redis(&self) {
        let mut conn = self.redis().await;
        if self.clients.redis.is_cluster() {
            delete_keys(&mut conn, &self.key_prefix).await;
        } else {
            scan_delete_keys(&mut conn, &self.key_prefix).await;
        }
        let left = self.redis_keys(&self.key_prefix).await;
        assert!(left.is_empty(), "flush_redis left {} keys", left.len());
    }

    /// Every key under `<prefix>:` (one `SCAN` pass on one Redis, `KEYS` on a cluster,
    /// which sends it to every primary).
    pub async fn redis_keys(&self, prefix: &str) -> Vec<String> {
        let mut conn = self.redis().await;
        let pattern = format!("{prefix}:*");
        if self.clients.redis.is_cluster() {
            return redis::cmd("KEYS").arg(&pattern).query_async(&mut conn).await.expect("KEYS");
        }
        let (mut cursor, mut keys) = (0u64, Vec::new());
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(5_000)
                .query_async(&mut conn)
                .await
                .expect("SCAN");
            keys.extend(found);
            if next == 0 {
                return keys;
            }
            cursor = next;
        }
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(self.pg()).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub async fn clickhouse_count(&self, sql: &str) -> u64 {
        self.clients.sink.client().query(sql).fetch_one::<u64>().await.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Async cleanup from a sync Drop, so it also runs when the test panicked: fresh
        // connections on a fresh runtime (the test's pools are bound to its runtime).
        let (config, slice) = (self.config.clone(), self.slice.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(slice.remove(&config, Duration::from_secs(10)));
        })
        .join();
    }
}

/// A JSON user event with an `idempotency_key` header.
pub fn user_event(topic: &str, partition: i32, offset: i64, id: &str, user: &str) -> Event {
    Event::new(topic, partition, offset)
        .with_header("idempotency_key", id.to_owned())
        .with_value(
            serde_json::json!({"user_id": user, "type": "created", "email": format!("{user}@example.com")}).to_string(),
        )
        .with_timestamp_ms(1_700_000_000_000)
}

/// A TCP proxy in front of a real server that a test can take down and bring back:
/// "down" refuses new connections and cuts open ones, as a crashed server would.
pub struct ToggleProxy {
    pub addr: std::net::SocketAddr,
    up: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    active: Arc<AtomicU64>,
    /// Connections attempted so far (accepted or refused).
    pub connections: Arc<AtomicU64>,
}

impl ToggleProxy {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let active = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let target = target.to_owned();
        let (up2, cut2, active2, conns2) = (up.clone(), cut.clone(), active.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                conns2.fetch_add(1, Ordering::SeqCst);
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut cut_rx = cut2.subscribe();
                let active3 = active2.clone();
                active3.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cut_rx.changed() => {}
                        }
                    }
                    drop(inbound);
                    active3.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Self { addr, up, cut, active, connections }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Refuses new connections and returns once every open one is closed.
    pub async fn take_down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|g| *g += 1);
        while self.active.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    pub fn bring_up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Polls `check` every 200 ms until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What a test published: the unique ids, and the end offset of every partition.
#[derive(Debug, Default)]
pub struct Published {
    pub unique: usize,
    pub messages: usize,
    pub end_offsets: HashMap<i32, i64>,
    /// (partition, offset, event id) of every message.
    pub records: Vec<(i32, i64, String)>,
}

/// Publishes `unique` user events plus `duplicates` repeats: half re-sent at once with
/// the same Kafka key (a producer retry), half re-sent at the end with another key
/// (a replay that may land on another partition).
pub async fn publish_user_events(kafka: &KafkaConfig, topic: &str, unique: usize, duplicates: usize) -> Published {
    let producer = Producer::new(kafka).expect("producer");
    let mut plan: Vec<(String, String, Vec<u8>)> = Vec::new(); // (id, kafka key, payload)
    let payload = |i: usize| {
        serde_json::json!({"user_id": format!("user-{i}"), "type": "created", "occurred_at": 1_700_000_000 + i})
            .to_string()
            .into_bytes()
    };
    let immediate = duplicates / 2;
    for i in 0..unique {
        let id = format!("evt-{i}");
        plan.push((id.clone(), id.clone(), payload(i)));
        if i < immediate {
            plan.push((id.clone(), id.clone(), payload(i)));
        }
    }
    for k in 0..(duplicates - immediate) {
        let i = (k * 7) % unique;
        plan.push((format!("evt-{i}"), format!("replay-{k}"), payload(i)));
    }
    let mut published = Published { unique, messages: plan.len(), ..Default::default() };
    for chunk in plan.chunks(200) {
        let sends = chunk.iter().map(|(id, key, value)| producer.send(topic, Some(key.as_bytes()), value, Some(id)));
        for ((id, _, _), result) in chunk.iter().zip(futures::future::join_all(sends).await) {
            let (partition, offset) = result.expect("publish");
            published.records.push((partition, offset, id.clone()));
            let end = published.end_offsets.entry(partition).or_insert(0);
            *end = (*end).max(offset + 1);
        }
    }
    published
}

/// The group's committed offset of each partition of `topic` (absent: none committed).
pub async fn committed_offsets(kafka: &KafkaConfig, topic: &str, partitions: i32) -> HashMap<i32, i64> {
    let mut config = exactly_once::runtime::worker::client_config(kafka);
    config.set("group.id", &kafka.group_id);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).expect("committed offsets");
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    })
    .await
    .expect("committed offsets task")
}

/// A minimal HTTP/1.1 client: one request per connection, whole response read.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    // The server may answer (413) before reading a large body; a failed write is fine.
    let _ = stream.write_all(body).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, dechunk(&body))
}

/// Undoes `Transfer-Encoding: chunked` when present (good enough for JSON bodies).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else { return body.to_owned() };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { return body.to_owned() };
        if n == 0 {
            return out;
        }
        if after.len() < n {
            return body.to_owned();
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

/// Queues one outbox message directly, as a confirmed batch leaves it behind
/// (`ctx.publish` inside the batch transaction). Returns its id.
pub async fn queue_outbox(
    pg: &sqlx::PgPool,
    function: &str,
    topic: &str,
    idempotency_key: &str,
    payload: &[u8],
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (namespace, event_id, topic, message_key, payload, idempotency_key)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(function)
    .bind(idempotency_key.split(':').next().unwrap_or(idempotency_key))
    .bind(topic)
    .bind(idempotency_key.as_bytes())
    .bind(payload)
    .bind(idempotency_key)
    .fetch_one(pg)
    .await
    .expect("queue an outbox message")
}

/// Reads `topic` from the start until `expected` messages arrived (or 30 s passed) and
/// returns their `idempotency_key` headers, sorted.
pub async fn idempotency_keys_on(kafka: &KafkaConfig, topic: &str, expected: usize) -> Vec<String> {
    use rdkafka::message::{Headers, Message};
    let mut config = exactly_once::runtime::worker::client_config(kafka);
    config.set("group.id", unique("reader")).set("auto.offset.reset", "earliest");
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().expect("consumer");
        consumer.subscribe(&[&topic]).expect("subscribe");
        let mut keys = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while keys.len() < expected && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
                let key = m.headers().and_then(|h| h.iter().find(|h| h.key == "idempotency_key").and_then(|h| h.value));
                keys.push(String::from_utf8_lossy(key.unwrap_or_default()).into_owned());
            }
        }
        keys.sort();
        keys
    })
    .await
    .expect("reader task")
}
