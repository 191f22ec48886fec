//! The real `user-events` binary in Lambda mode behind the local MSK event source
//! mapping (`eo esm`), against the real broker and stores: batches, partial batch
//! responses, retries, timeouts, the on-failure destination, and clear errors.

use std::time::Duration;

use exactly_once::runtime::worker::create_topics;
use exactly_once_esm::{EsmError, FunctionSpec, Invoked, Mapping, MappingSettings, Report, Verdict};
use integration_tests::{committed_offsets, publish_user_events, wait_until, Published, TestEnv};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<Report, EsmError>>,
    invoked: mpsc::UnboundedReceiver<Invoked>,
    pid: std::sync::Arc<std::sync::Mutex<Option<u32>>>,
}

impl Running {
    async fn stop(self) -> Report {
        let _ = self.stop.send(true);
        self.task.await.expect("mapping task").expect("mapping ends cleanly")
    }

    async fn next_invocation(&mut self) -> Invoked {
        tokio::time::timeout(Duration::from_secs(60), self.invoked.recv())
            .await
            .expect("an invocation within 60 s")
            .expect("mapping running")
    }
}

fn settings(env: &TestEnv) -> MappingSettings {
    let mut s = MappingSettings::for_function("user-events");
    s.consumer_group_prefix = env.kafka.group_id.clone();
    s.maximum_batching_window_in_seconds = 0;
    s.timeout = 30;
    s
}

fn spec(env: &TestEnv, s: &MappingSettings) -> FunctionSpec {
    FunctionSpec {
        binary: env!("CARGO_BIN_EXE_user-events").into(),
        name: "user-events".into(),
        env: vec![
            ("DATABASE_SCHEMA".into(), env.schema.clone()),
            ("CLICKHOUSE_DATABASE".into(), env.clickhouse_db.clone()),
            ("REDIS_KEY_PREFIX".into(), env.key_prefix.clone()),
            ("KAFKA_TOPIC_PREFIX".into(), env.kafka.topic_prefix.clone()),
            ("RUST_LOG".into(), std::env::var("TEST_WORKER_LOG").unwrap_or("warn".into())),
            ("LAMBDA_REPORT_BATCH_ITEM_FAILURES".into(), s.report_batch_item_failures().to_string()),
        ],
        timeout: Duration::from_secs(s.timeout),
        init_timeout: Duration::from_secs(s.init_timeout_secs),
        memory_size: 128,
        log: None,
    }
}

async fn topic(env: &mut TestEnv, partitions: i32) -> String {
    env.kafka.topic_partitions = partitions;
    let topic = env.kafka.topic(user_events::TOPICS[0]);
    create_topics(&env.kafka, std::slice::from_ref(&topic)).await.expect("topic");
    topic
}

async fn start(env: &TestEnv, s: MappingSettings, topic: &str) -> Running {
    start_with(env, s.clone(), topic, spec(env, &s)).await
}

async fn start_with(env: &TestEnv, s: MappingSettings, topic: &str, spec: FunctionSpec) -> Running {
    // What `eo migrate` does before a deploy (Lambda init only checks for it).
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await.expect("ClickHouse DDL");
    let mut mapping = Mapping::start(s, &env.kafka, &[topic.to_owned()], spec).await.expect("mapping starts");
    let invoked = mapping.observe();
    let pid = mapping.pid_handle();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(mapping.run(stopped));
    Running { stop, task, invoked, pid }
}

/// The mapping's group, for reading its committed offsets.
fn group(env: &TestEnv, s: &MappingSettings) -> exactly_once::config::KafkaConfig {
    let mut k = env.kafka.clone();
    k.group_id = s.group_id();
    k
}

async fn assert_all_landed_once(
    env: &TestEnv,
    s: &MappingSettings,
    topic: &str,
    published: &Published,
    partitions: i32,
) {
    let unique = published.unique as u64;
    let kafka = group(env, s);
    wait_until(Duration::from_secs(120), "every event in ClickHouse and every offset committed", || async {
        let rows = env.clickhouse_count("SELECT count() FROM user_events FINAL").await;
        assert!(rows <= unique, "ClickHouse holds {rows} rows for {unique} unique events");
        let committed = committed_offsets(&kafka, topic, partitions).await;
        rows == unique && published.end_offsets.iter().all(|(p, end)| committed.get(p) == Some(end))
    })
    .await;
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE namespace = 'user-events'").await, unique as i64);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
}

/// Holds the lease of `event_id` in Redis for `ttl`, as another consumer would.
async fn hold_lease(env: &TestEnv, event_id: &str, ttl: Duration) {
    let mut c = env.redis().await;
    let key = format!("{}:{{user-events}}:event:h:{event_id}", env.key_prefix);
    let ok: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg("someone-else")
        .arg("NX")
        .arg("PX")
        .arg(ttl.as_millis() as u64)
        .query_async(&mut c)
        .await
        .expect("SET");
    assert_eq!(ok.as_deref(), Some("OK"), "took the lease {key}");
}

/// Lets go of a lease taken by `hold_lease`.
async fn release_lease(env: &TestEnv, event_id: &str) {
    let mut c = env.redis().await;
    let key = format!("{}:{{user-events}}:event:h:{event_id}", env.key_prefix);
    let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut c).await.expect("DEL");
}

fn offsets(i: &Invoked) -> Vec<i64> {
    i.records.iter().map(|r| r.2).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mapping_feeds_the_lambda_binary_and_every_event_lands_once() {
    let mut env = TestEnv::new().await;
    let topic = topic(&mut env, 3).await;
    let published = publish_user_events(&env.kafka, &topic, 600, 200).await;
    let mut s = settings(&env);
    s.batch_size = 100;
    let mut running = start(&env, s.clone(), &topic).await;
    let first = running.next_invocation().await;
    assert!(first.records.len() <= 100, "a batch holds at most BatchSize records");
    assert_all_landed_once(&env, &s, &topic, &published, 3).await;
    let report = running.stop().await;
    assert_eq!(report.failed, 0, "{}", report.line());
    assert_eq!(report.records_succeeded, published.messages as u64, "{}", report.line());
    assert_eq!(report.function.cold_starts, 1, "one warm process serves every invocation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_batch_response_retries_from_the_failed_record_only() {
    let mut env = TestEnv::new().await;
    let topic = topic(&mut env, 1).await;
    let published = publish_user_events(&env.kafka, &topic, 10, 0).await;
    // evt-4 (offset 4) is in flight elsewhere: unfinished until its lease is let go.
    hold_lease(&env, "evt-4", Duration::from_secs(120)).await;
    let s = settings(&env);
    assert!(s.report_batch_item_failures(), "partial batch responses are the default");
    let mut running = start(&env, s.clone(), &topic).await;

    let first = running.next_invocation().await;
    assert_eq!(offsets(&first), (0..10).collect::<Vec<_>>());
    assert_eq!(first.verdict, Verdict::Partial([((topic.clone(), 0), 4)].into()), "{first:?}");
    let retry = running.next_invocation().await;
    assert_eq!(offsets(&retry), (4..10).collect::<Vec<_>>(), "{retry:?}");
    release_lease(&env, "evt-4").await;
    // Every retry starts at the failed record: records before it are never sent again.
    loop {
        let next = running.next_invocation().await;
        assert_eq!(offsets(&next), (4..10).collect::<Vec<_>>(), "{next:?}");
        if next.verdict == Verdict::Succeeded {
            break;
        }
    }
    assert_all_landed_once(&env, &s, &topic, &published, 1).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_partial_responses_an_unfinished_batch_is_retried_whole() {
    let mut env = TestEnv::new().await;
    let topic = topic(&mut env, 1).await;
    let published = publish_user_events(&env.kafka, &topic, 10, 0).await;
    hold_lease(&env, "evt-4", Duration::from_secs(120)).await;
    let mut s = settings(&env);
    s.function_response_types = String::new();
    let mut running = start(&env, s.clone(), &topic).await;

    let first = running.next_invocation().await;
    assert_eq!(first.verdict, Verdict::Failed);
    assert!(first.error.as_deref().unwrap_or("").contains("UnfinishedBatch"), "{first:?}");
    release_lease(&env, "evt-4").await;
    let second = running.next_invocation().await;
    assert_eq!(offsets(&second), (0..10).collect::<Vec<_>>(), "the whole batch again");
    assert_all_landed_once(&env, &s, &topic, &published, 1).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invocation_past_its_timeout_fails_and_the_function_restarts_cold() {
    let mut env = TestEnv::new().await;
    let topic = topic(&mut env, 1).await;
    let published = publish_user_events(&env.kafka, &topic, 20, 0).await;
    // The confirm cannot take its lock: the first invocation hangs past the timeout.
    let mut lock = env.pg().begin().await.unwrap();
    sqlx::query("LOCK TABLE processed_events IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let mut s = settings(&env);
    s.timeout = 3;
    let mut running = start(&env, s.clone(), &topic).await;

    let first = running.next_invocation().await;
    assert_eq!(first.verdict, Verdict::Failed);
    assert_eq!(first.error.as_deref(), Some("timed out"), "{first:?}");
    lock.rollback().await.unwrap();
    assert_all_landed_once(&env, &s, &topic, &published, 1).await;
    let report = running.stop().await;
    assert_eq!(report.function.timeouts, 1, "{}", report.line());
    assert_eq!(report.function.cold_starts, 2, "the timed-out process was replaced: {}", report.line());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_function_killed_mid_invocation_is_restarted_and_nothing_is_lost() {
    let mut env = TestEnv::new().await;
    let topic = topic(&mut env, 1).await;
    let published = publish_user_events(&env.kafka, &topic, 20, 0).await;
    let mut lock = env.pg().begin().await.unwrap();
    sqlx::query("LOCK TABLE processed_events IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let running = start(&env, settings(&env), &topic).await;
    // Wait for the process, give it time to take the (hanging) invocation, kill it.
    let mut pid = None;
    wait_until(Duration::from_secs(30), "the function process", || {
        pid = *running.pid.lock().unwrap();
        async move { pid.is_some() }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = std::process::Command::new("kill").args(["-9", &pid.unwrap().to_string()]).status().unwrap();
    assert!(status.success());
    let mut running = running;
    let first = running.next_invocation().await;
    assert_eq!(first.verdict, Verdict::Failed);
    assert!(first.error.as_deref().unwrap_or("").contains("exited"), "{first:?}");
    lock.rollback().await.unwrap();
    let s = settings(&env);
    assert_all_landed_once(&env, &s, &topic, &published, 1).await;
    let report = running.stop().await;
    assert_eq!(report.function.crashes, 1, "{}", report.line());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_exhausted_send_the_batch_to_the_destination_and_move_past_it() {
    let mut env = TestEnv::new().await;
    let topic = topic(&mut env, 1).await;
    publish_user_events(&env.kafka, &topic, 5, 0).await;
    hold_lease(&env, "evt-2", Duration::from_secs(120)).await;
    let dir = std::env::temp_dir().join(integration_tests::unique("esm-dest"));
    let mut s = settings(&env);
    s.maximum_retry_attempts = 1;
    s.on_failure_destination = format!("file://{}", dir.display());
    let running = start(&env, s.clone(), &topic).await;

    let kafka = group(&env, &s);
    wait_until(Duration::from_secs(60), "the partition committed to its end", || async {
        committed_offsets(&kafka, &topic, 1).await.get(&0) == Some(&5)
    })
    .await;
    let report = running.stop().await;
    assert_eq!(report.records_discarded, 3, "evt-2 and the records after it: {}", report.line());
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 1);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(files[0].as_ref().unwrap().path()).unwrap()).unwrap();
    assert_eq!(record["requestContext"]["condition"], "RetryAttemptsExhausted");
    let discarded: Vec<i64> = record["payload"]["records"][format!("{topic}-0")]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["offset"].as_i64().unwrap())
        .collect();
    assert_eq!(discarded, vec![2, 3, 4]);
    // evt-3 and evt-4 were processed before the batch was given up on; evt-2, a healthy
    // event, was never processed and is gone from the stream: what a retry limit does.
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 4);
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE event_id = 'h:evt-2'").await, 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_function_that_cannot_start_stops_the_mapping_with_its_own_error() {
    let mut env = TestEnv::new().await;
    let topic = topic(&mut env, 1).await;
    publish_user_events(&env.kafka, &topic, 1, 0).await;
    let mut s = settings(&env);
    s.max_init_failures = 2;
    let mut spec = spec(&env, &s);
    spec.env.push(("DATABASE_MAX_CONNECTIONS".into(), "many".into()));
    let running = start_with(&env, s, &topic, spec).await;
    let err = tokio::time::timeout(Duration::from_secs(60), running.task)
        .await
        .expect("the mapping gives up")
        .expect("task")
        .expect_err("a function that cannot start is an error");
    let text = err.to_string();
    assert!(text.contains("failed to start 2 times"), "{text}");
    assert!(text.contains("DATABASE_MAX_CONNECTIONS"), "the function's own message is shown: {text}");
    assert_eq!(committed_offsets(&group(&env, &settings(&env)), &topic, 1).await.get(&0), None, "nothing committed");
}

#[tokio::test]
async fn an_unreachable_broker_is_a_clear_error() {
    let env = TestEnv::new().await;
    let mut kafka = env.kafka.clone();
    kafka.brokers = "127.0.0.1:1".into();
    let s = settings(&env);
    let err = match Mapping::start(s.clone(), &kafka, &["t".into()], spec(&env, &s)).await {
        Ok(_) => panic!("a mapping without a broker must not start"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("Kafka at 127.0.0.1:1") && err.contains("KAFKA_BROKERS"), "{err}");
}

/// During a ClickHouse outage the invocation waits for the breaker's probes (within its
/// time) instead of failing in milliseconds: a handful of long invocations, no storm,
/// no timeout, and every event lands once ClickHouse is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn during_a_clickhouse_outage_invocations_wait_for_the_breaker_instead_of_storming() {
    let mut env = TestEnv::new().await;
    let topic = topic(&mut env, 1).await;
    let clickhouse = integration_tests::ToggleProxy::start("127.0.0.1:8123").await;
    let mut s = settings(&env);
    s.timeout = 4;
    let mut spec = spec(&env, &s);
    spec.env.extend(
        [
            ("CLICKHOUSE_URL", clickhouse.url()),
            ("CLICKHOUSE_BREAKER_FAILURES", "1".into()),
            ("CLICKHOUSE_BREAKER_OPEN_SECS", "1".into()),
            ("CLICKHOUSE_BREAKER_SUCCESSES", "1".into()),
            ("CLICKHOUSE_WRITE_ATTEMPTS", "1".into()),
            // A probe fits in the 4 s invocation only if a write's own timeout is short.
            ("CLICKHOUSE_TIMEOUT_MS", "1000".into()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    let mut running = start_with(&env, s.clone(), &topic, spec).await;
    let warm = publish_user_events(&env.kafka, &topic, 1, 0).await;
    assert_eq!(running.next_invocation().await.verdict, Verdict::Succeeded, "warm-up");

    clickhouse.take_down().await;
    let mut published = publish_user_events(&env.kafka, &topic, 20, 0).await;
    published.end_offsets = published.end_offsets.into_iter().map(|(p, e)| (p, e.max(warm.end_offsets[&p]))).collect();
    let outage = Duration::from_secs(9);
    let down_at = tokio::time::Instant::now();
    let mut during = Vec::new();
    while down_at.elapsed() < outage {
        let left = outage.saturating_sub(down_at.elapsed());
        match tokio::time::timeout(left, running.invoked.recv()).await {
            Ok(Some(i)) => during.push(i),
            _ => break,
        }
    }
    clickhouse.bring_up();
    // Each failed invocation held on to nearly all of its 4 s waiting for probes, so a
    // 9 s outage sees a few of them, not one every few hundred milliseconds.
    let seen: Vec<_> = during.iter().map(|i| (i.records.len(), i.error.clone())).collect();
    assert!(!during.is_empty() && during.len() <= 3, "{} invocations during a 9 s outage: {seen:?}", during.len());
    for i in &during {
        assert_ne!(i.verdict, Verdict::Succeeded, "{i:?}");
        assert_ne!(i.error.as_deref(), Some("timed out"), "answered before the timeout: {i:?}");
    }
    // evt-0 was the warm-up's event too: 20 unique events in all.
    assert_all_landed_once(&env, &s, &topic, &published, 1).await;
    let report = running.stop().await;
    assert_eq!(report.function.timeouts, 0, "{}", report.line());
}
