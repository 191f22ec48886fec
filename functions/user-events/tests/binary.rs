//! The real `user-events` binary in both modes: as a Lambda function driven through a
//! local Lambda Runtime API (served by this test), and as a worker answering
//! `POST /invoke`. Both must give the same outcomes and the same rows.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::routing::{get, post};
use axum::Router;
use exactly_once::runtime::msk;
use exactly_once::{Event, EventId, Namespace};
use integration_tests::{idempotency_keys_on, queue_outbox, user_event, TestEnv};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, Notify};

/// Queued invocations: request id and payload.
type Invocations = Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, Vec<u8>)>>>;

/// The few routes of the Lambda Runtime API a function uses.
#[derive(Clone)]
struct FakeRuntime {
    queue: Invocations,
    results: Arc<Mutex<HashMap<String, Result<Value, Value>>>>,
    done: Arc<Notify>,
}

struct RuntimeApi {
    addr: std::net::SocketAddr,
    submit: mpsc::UnboundedSender<(String, Vec<u8>)>,
    state: FakeRuntime,
}

impl RuntimeApi {
    async fn start() -> Self {
        let (submit, rx) = mpsc::unbounded_channel();
        let state = FakeRuntime {
            queue: Arc::new(tokio::sync::Mutex::new(rx)),
            results: Default::default(),
            done: Arc::new(Notify::new()),
        };
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route("/2018-06-01/runtime/invocation/{id}/response", post(response))
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { addr, submit, state }
    }

    /// Queues one invocation and waits for the function's answer.
    async fn invoke(&self, event: &Value) -> Result<Value, Value> {
        let id = uuid::Uuid::new_v4().to_string();
        self.submit.send((id.clone(), event.to_string().into_bytes())).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let notified = self.state.done.notified();
            if let Some(r) = self.state.results.lock().unwrap().remove(&id) {
                return r;
            }
            assert!(tokio::time::Instant::now() < deadline, "the function did not answer invocation {id}");
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }
}

async fn next(State(s): State<FakeRuntime>) -> (HeaderMap, Vec<u8>) {
    let (id, body) = s.queue.lock().await.recv().await.expect("test still running");
    let deadline_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() + 30_000;
    let mut headers = HeaderMap::new();
    headers.insert("lambda-runtime-aws-request-id", HeaderValue::from_str(&id).unwrap());
    headers.insert("lambda-runtime-deadline-ms", HeaderValue::from_str(&deadline_ms.to_string()).unwrap());
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        HeaderValue::from_static("arn:aws:lambda:us-east-1:000000000000:function:user-events"),
    );
    (headers, body)
}

async fn response(State(s): State<FakeRuntime>, Path(id): Path<String>, body: Bytes) -> &'static str {
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.results.lock().unwrap().insert(id, Ok(v));
    s.done.notify_waiters();
    "{}"
}

async fn error(State(s): State<FakeRuntime>, Path(id): Path<String>, body: Bytes) -> &'static str {
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    s.results.lock().unwrap().insert(id, Err(v));
    s.done.notify_waiters();
    "{}"
}

/// The binary, configured for this test's isolated schema, database and key prefix.
fn binary(env: &TestEnv) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_user-events"));
    cmd.env("DATABASE_SCHEMA", &env.schema)
        .env("CLICKHOUSE_DATABASE", &env.clickhouse_db)
        .env("REDIS_KEY_PREFIX", &env.key_prefix)
        .env("KAFKA_TOPIC_PREFIX", &env.kafka.topic_prefix)
        .env("KAFKA_GROUP_ID", &env.kafka.group_id)
        .env("RUST_LOG", std::env::var("TEST_WORKER_LOG").unwrap_or("warn".into()))
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// What `eo migrate` does before a deploy: Lambda init only checks for it. (TestEnv has
/// migrated Postgres; the ClickHouse table is the function's.)
async fn migrate(env: &TestEnv) {
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await.expect("ClickHouse DDL");
}

fn lambda(env: &TestEnv, api: &RuntimeApi) -> Command {
    let mut cmd = binary(env);
    cmd.env("AWS_LAMBDA_RUNTIME_API", format!("http://{}", api.addr))
        .env("AWS_LAMBDA_FUNCTION_NAME", "user-events")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Starts the binary as a worker and returns it with its HTTP address.
async fn worker(env: &TestEnv) -> (Child, std::net::SocketAddr) {
    let mut child = binary(env)
        .env("HTTP_BIND", "127.0.0.1:0")
        .env("KAFKA_CREATE_TOPICS", "true")
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("TEST_WORKER_LOG").is_some() { Stdio::inherit() } else { Stdio::null() })
        .spawn()
        .expect("spawn worker");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("HTTP on http://") {
                return rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        }
        panic!("the worker exited before printing its address");
    })
    .await
    .expect("worker prints its HTTP address");
    (child, addr)
}

fn poison(offset: i64) -> Event {
    Event::new("user-events", 0, offset).with_header("idempotency_key", "poison-1").with_value("{this is not json")
}

fn mixed_batch() -> Value {
    let mut event = msk::encode(&[
        user_event("user-events", 0, 0, "b-1", "ann"),
        user_event("user-events", 0, 1, "b-2", "ben"),
        user_event("user-events", 1, 0, "b-1", "ann"),
        poison(2),
    ]);
    // One record whose value is not base64: dead-lettered with its raw text.
    event["records"]["user-events-1"].as_array_mut().unwrap().push(serde_json::json!({
        "topic": "user-events", "partition": 1, "offset": 1, "timestamp": 0,
        "value": "%%%", "headers": []
    }));
    event
}

fn labels(v: &Value) -> Vec<(String, String)> {
    v["outcomes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["eventId"].as_str().unwrap_or("-").to_owned(), o["outcome"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn lambda_processes_a_batch_skips_its_repeat_and_dead_letters_poison() {
    let env = TestEnv::new().await;
    let api = RuntimeApi::start().await;
    migrate(&env).await;
    let _function = lambda(&env, &api).spawn().expect("spawn lambda");

    let fresh = msk::encode(&[
        user_event("user-events", 0, 10, "l-1", "ann"),
        user_event("user-events", 0, 11, "l-2", "ben"),
        user_event("user-events", 2, 12, "l-1", "ann"),
    ]);
    let first = api.invoke(&fresh).await.expect("a new batch succeeds");
    assert_eq!((first["processed"].as_u64(), first["duplicates"].as_u64()), (Some(2), Some(1)), "{first}");

    let again = api.invoke(&fresh).await.expect("the same batch again succeeds");
    assert_eq!(again["duplicates"], 3, "{again}");

    let poisoned = msk::encode(&[user_event("user-events", 0, 13, "l-3", "cy"), poison(14)]);
    let r = api.invoke(&poisoned).await.expect("a batch with a poison record succeeds");
    assert_eq!((r["processed"].as_u64(), r["deadLettered"].as_u64()), (Some(1), Some(1)), "{r}");
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE event_id = 'h:poison-1' AND reason = 'payload_invalid'")
            .await,
        1
    );
    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events FINAL").await, 3);

    // A record leased by another consumer is unfinished: the invocation fails and names it.
    let ns = Namespace::new("user-events").unwrap();
    let busy = EventId::new("h:l-busy").unwrap();
    env.clients.leases.acquire(&ns, &[&busy], "another-consumer", Duration::from_secs(60)).await.unwrap();
    let blocked = msk::encode(&[
        user_event("user-events", 0, 15, "l-4", "dee"),
        user_event("user-events", 0, 16, "l-busy", "eve"),
    ]);
    let err = api.invoke(&blocked).await.expect_err("an unfinished batch is an error, so the trigger retries it");
    let message = err["errorMessage"].as_str().unwrap();
    assert!(message.contains("1 of 2 records") && message.contains("user-events-0@16 (in_flight)"), "{message}");
    assert_eq!(err["errorType"], "UnfinishedBatch");
}

/// What an EventBridge rule's schedule delivers (AWS's documented example).
fn scheduled_event() -> Value {
    serde_json::from_str(include_str!("../../../shared/src/runtime/fixtures/scheduled_event.json")).expect("JSON")
}

/// Every function binary shares the Lambda runtime and its outbox relay; the deployment
/// schedules the ones that publish. A backlog (left by batches processed while Kafka
/// was down) drains on the schedule alone, with no record arriving on the topic.
#[tokio::test(flavor = "multi_thread")]
async fn lambda_drains_the_outbox_on_a_scheduled_event_and_refuses_unknown_payloads() {
    let env = TestEnv::new().await;
    let api = RuntimeApi::start().await;
    migrate(&env).await;
    let topic = "scheduled-drain";
    let full = env.kafka.topic(topic);
    exactly_once::runtime::worker::create_topics(&env.kafka, std::slice::from_ref(&full)).await.unwrap();
    for i in 0..3 {
        queue_outbox(env.pg(), "notifications", topic, &format!("backlog-{i}:0"), b"{}").await;
    }
    let sent = queue_outbox(env.pg(), "notifications", topic, "sent-long-ago:0", b"{}").await;
    sqlx::query("UPDATE outbox SET published_at = now() - interval '30 days' WHERE id = $1")
        .bind(sent)
        .execute(env.pg())
        .await
        .unwrap();
    let _function = lambda(&env, &api).spawn().expect("spawn lambda");

    let r = api.invoke(&scheduled_event()).await.expect("a scheduled invocation succeeds");
    assert_eq!((r["outbox"]["published"].as_u64(), r["pruned"].as_u64()), (Some(3), Some(1)), "{r}");
    assert_eq!(env.count("SELECT count(*) FROM outbox WHERE published_at IS NULL").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 3, "the long-published message is pruned");
    assert_eq!(idempotency_keys_on(&env.kafka, &full, 3).await, ["backlog-0:0", "backlog-1:0", "backlog-2:0"]);

    // Neither an MSK event nor a schedule: a clear error naming the shape, no crash.
    let err = api
        .invoke(&serde_json::json!({"source": "aws.s3", "detail-type": "Object Created", "detail": {"key": "x"}}))
        .await
        .expect_err("an unknown payload is an error");
    assert_eq!(err["errorType"], "UnrecognisedEvent", "{err}");
    let message = err["errorMessage"].as_str().unwrap();
    assert!(message.contains("keys [detail, detail-type, source]"), "{message}");
    let again = api.invoke(&scheduled_event()).await.expect("the function keeps serving");
    assert_eq!(again["outbox"]["published"], 0, "{again}");
}

#[tokio::test(flavor = "multi_thread")]
async fn lambda_reports_batch_item_failures_when_configured() {
    let env = TestEnv::new().await;
    let api = RuntimeApi::start().await;
    migrate(&env).await;
    let _function = lambda(&env, &api).env("LAMBDA_REPORT_BATCH_ITEM_FAILURES", "true").spawn().expect("spawn lambda");
    let ns = Namespace::new("user-events").unwrap();
    let busy = EventId::new("h:p-busy").unwrap();
    env.clients.leases.acquire(&ns, &[&busy], "another-consumer", Duration::from_secs(60)).await.unwrap();
    let batch =
        msk::encode(&[user_event("user-events", 0, 1, "p-1", "ann"), user_event("user-events", 0, 2, "p-busy", "ben")]);
    let r = api.invoke(&batch).await.expect("a partial failure is reported, not raised");
    assert_eq!(
        r,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": {"partition": "user-events-0", "offset": 2}}]})
    );
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE event_id = 'h:p-1'").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn invoke_endpoint_and_lambda_give_the_same_outcomes_and_rows() {
    let (a, b) = (TestEnv::new().await, TestEnv::new().await);
    let api = RuntimeApi::start().await;
    migrate(&a).await;
    let _function = lambda(&a, &api).spawn().expect("spawn lambda");
    let (_worker, addr) = worker(&b).await;

    let event = mixed_batch();
    let via_lambda = api.invoke(&event).await.expect("lambda succeeds");
    let (status, body) =
        integration_tests::http(addr, "POST", "/invoke/user-events", &[], event.to_string().as_bytes()).await;
    assert_eq!(status, 200, "{body}");
    let via_invoke: Value = serde_json::from_str(&body).unwrap();

    assert_eq!(labels(&via_lambda), labels(&via_invoke));
    assert_eq!(
        labels(&via_lambda),
        [
            ("h:b-1", "processed"),
            ("h:b-2", "processed"),
            ("h:poison-1", "dead_lettered"),
            ("h:b-1", "duplicate"),
            ("-", "dead_lettered"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );

    let rows = |env: &TestEnv| {
        let client = env.clients.sink.client().clone();
        async move {
            client
                .query("SELECT concat(event_id, '|', user_id, '|', toString(kind)) FROM user_events FINAL ORDER BY event_id")
                .fetch_all::<String>()
                .await
                .unwrap()
        }
    };
    let (rows_a, rows_b) = (rows(&a).await, rows(&b).await);
    assert_eq!(rows_a, ["h:b-1|ann|created", "h:b-2|ben|created"]);
    assert_eq!(rows_a, rows_b);
    let ledger = "SELECT string_agg(event_id || ':' || status, ',' ORDER BY event_id) FROM processed_events";
    let ledger_a: String = sqlx::query_scalar(ledger).fetch_one(a.pg()).await.unwrap();
    let ledger_b: String = sqlx::query_scalar(ledger).fetch_one(b.pg()).await.unwrap();
    assert_eq!(ledger_a, ledger_b);
    assert_eq!(
        ledger_a,
        "h:b-1:processed,h:b-2:processed,h:poison-1:dead_lettered,invalid:user-events-1-1:dead_lettered"
    );
}

/// Runs a process that must fail to start; returns what it wrote on stderr.
async fn fails(cmd: &mut Command) -> String {
    let output = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().await.expect("run the binary");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "expected a failed start, it succeeded: {stderr}");
    stderr
}

#[tokio::test(flavor = "multi_thread")]
async fn init_fails_fast_naming_the_unreachable_dependency() {
    let env = TestEnv::new().await;
    let api = RuntimeApi::start().await;
    let stderr =
        fails(lambda(&env, &api).env("REDIS_URL", "redis://:hunter2@127.0.0.1:1").env("STARTUP_TIMEOUT_SECS", "1"))
            .await;
    assert!(stderr.contains("Redis at redis://:***@127.0.0.1:1") && stderr.contains("REDIS_URL"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password never reaches the logs");

    let stderr = fails(binary(&env).env("CLICKHOUSE_URL", "http://127.0.0.1:1").env("STARTUP_TIMEOUT_SECS", "1")).await;
    assert!(stderr.contains("ClickHouse at http://127.0.0.1:1") && stderr.contains("CLICKHOUSE_URL"), "{stderr}");
}

/// Lambda init migrates nothing: it checks, in one query per store, and fails naming
/// what `eo migrate` has not applied yet.
#[tokio::test(flavor = "multi_thread")]
async fn lambda_init_fails_naming_what_is_not_migrated() {
    let env = TestEnv::new().await;
    let api = RuntimeApi::start().await;
    // ClickHouse: Postgres is migrated (TestEnv did it), the function's table is not there.
    let started = std::time::Instant::now();
    let stderr = fails(lambda(&env, &api).env("STARTUP_TIMEOUT_SECS", "30")).await;
    assert!(stderr.contains("user_events") && stderr.contains("eo migrate"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10), "not retried until the start-up timeout");

    // Postgres: a schema nobody migrated.
    migrate(&env).await;
    let unmigrated = integration_tests::unique("unmigrated");
    let stderr = fails(lambda(&env, &api).env("STARTUP_TIMEOUT_SECS", "30").env("DATABASE_SCHEMA", unmigrated)).await;
    assert!(stderr.contains("migrations not applied: 20261122000001") && stderr.contains("eo migrate"), "{stderr}");

    // Migrated: init succeeds and the function asks for work (it answers an invocation).
    let _function = lambda(&env, &api).spawn().expect("spawn lambda");
    let r = api.invoke(&msk::encode(&[user_event("user-events", 0, 1, "m-1", "ann")])).await.expect("ok");
    assert_eq!(r["processed"], 1, "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_stream_exits_zero_without_committing_past_unfinished_records() {
    let mut env = TestEnv::new().await;
    env.kafka.topic_partitions = 3;
    let topic = env.kafka.topic(user_events::TOPICS[0]);
    exactly_once::runtime::worker::create_topics(&env.kafka, std::slice::from_ref(&topic)).await.unwrap();
    let published = integration_tests::publish_user_events(&env.kafka, &topic, 1500, 500).await;

    let (mut child, _addr) = worker(&env).await;
    integration_tests::wait_until(Duration::from_secs(60), "the worker to be mid-stream", || async {
        env.count("SELECT count(*) FROM processed_events").await >= 200
    })
    .await;
    let pid = child.id().expect("running").to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().await.unwrap().success());
    let status =
        tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits after SIGTERM").unwrap();
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");

    // Every record below each committed offset is confirmed: nothing was skipped.
    let committed = integration_tests::committed_offsets(&env.kafka, &topic, 3).await;
    let confirmed: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM processed_events").fetch_all(env.pg()).await.unwrap();
    let confirmed: std::collections::HashSet<String> = confirmed.into_iter().collect();
    let mut covered = 0;
    for (partition, offset, id) in &published.records {
        if committed.get(partition).is_some_and(|c| offset < c) {
            covered += 1;
            assert!(
                confirmed.contains(&format!("h:{id}")),
                "committed past {id} at {partition}@{offset}, which is not confirmed"
            );
        }
    }
    assert!(covered > 0, "the shutdown committed what it finished");

    // A new worker in the same group finishes the stream, exactly once.
    let (_second, _) = worker(&env).await;
    integration_tests::wait_until(Duration::from_secs(90), "the second worker to finish the stream", || async {
        let committed = integration_tests::committed_offsets(&env.kafka, &topic, 3).await;
        published.end_offsets.iter().all(|(p, end)| committed.get(p) == Some(end))
    })
    .await;
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 1500);
    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events FINAL").await, 1500);
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_start_fails_fast_when_kafka_is_unreachable() {
    let env = TestEnv::new().await;
    let stderr = fails(
        binary(&env)
            .env("KAFKA_BROKERS", "127.0.0.1:1")
            .env("STARTUP_TIMEOUT_SECS", "2")
            .env("HTTP_BIND", "127.0.0.1:0"),
    )
    .await;
    assert!(stderr.contains("Kafka at 127.0.0.1:1") && stderr.contains("KAFKA_BROKERS"), "{stderr}");
}

/// The real worker at debug level, with secrets configured: a database password (when
/// the local Postgres trusts loopback, as the project's services do, a made-up password
/// connects), the invoke token, and a Redis password on a dead fallback URL. Requests with
/// and without the token, poison records, then SIGTERM. No secret appears in anything
/// the process printed, nor in any HTTP answer.
#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_the_logs_or_the_http_answers() {
    let env = TestEnv::new().await;
    let marker = uuid::Uuid::new_v4().simple().to_string();
    let token = format!("tok{marker}");
    let mut secrets = vec![token.clone()];
    let config = exactly_once::Config::load().unwrap();
    let real_url = config.postgres.url.expose().to_owned();
    // postgres://user:password@host/db: swap in a unique password if the server lets it in.
    let mut database_url = real_url.clone();
    if let Some((scheme, rest)) = real_url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            let user = userinfo.split(':').next().unwrap_or(userinfo);
            let candidate = format!("{scheme}://{user}:pw{marker}@{host}");
            if sqlx::PgPool::connect(&candidate).await.is_ok() {
                database_url = candidate;
                secrets.push(format!("pw{marker}"));
            }
        }
    }
    let mut child = binary(&env)
        .env("DATABASE_URL", &database_url)
        .env("INVOKE_TOKEN", &token)
        .env("HTTP_BIND", "127.0.0.1:0")
        .env("KAFKA_CREATE_TOPICS", "true")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn worker");
    let out = Arc::new(Mutex::new(String::new()));
    let (addr_tx, mut addr_rx) = mpsc::unbounded_channel::<std::net::SocketAddr>();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let (o1, o2) = (out.clone(), out.clone());
    let readers = [
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                if let Some(rest) = line.strip_prefix("HTTP on http://") {
                    let _ = addr_tx.send(rest.split_whitespace().next().unwrap().parse().unwrap());
                }
                o1.lock().unwrap().push_str(&(line + "\n"));
            }
        }),
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                o2.lock().unwrap().push_str(&(line + "\n"));
            }
        }),
    ];
    let addr = tokio::time::timeout(Duration::from_secs(60), addr_rx.recv())
        .await
        .expect("worker prints its address")
        .expect("worker running");

    let mut answers = String::new();
    let body = mixed_batch().to_string();
    let (wrong, right) = (format!("Bearer wrong{marker}"), format!("Bearer {token}"));
    for headers in [vec![], vec![("Authorization", wrong.as_str())], vec![("Authorization", right.as_str())]] {
        let (status, text) =
            integration_tests::http(addr, "POST", "/invoke/user-events", &headers, body.as_bytes()).await;
        answers.push_str(&format!("{status} {text}\n"));
    }
    assert!(answers.contains("401 ") && answers.contains("403 ") && answers.contains("200 "), "{answers}");
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 2, "the poison records were handled");

    let pid = child.id().expect("running").to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().await.unwrap().success());
    tokio::time::timeout(Duration::from_secs(30), child.wait()).await.expect("exits after SIGTERM").unwrap();
    for r in readers {
        r.await.unwrap();
    }
    let logs = out.lock().unwrap().clone();
    assert!(logs.lines().count() > 20, "debug logging captured: {logs}");
    for secret in &secrets {
        assert!(!logs.contains(secret.as_str()), "a secret reached the logs:\n{logs}");
        assert!(!answers.contains(secret.as_str()), "a secret reached an HTTP answer:\n{answers}");
    }
}
