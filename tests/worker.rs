//! The worker runtime against the real broker (Tansu), Postgres, Redis and ClickHouse:
//! a 3-partition topic, 2,000 messages with a quarter duplicated, and exact counts at the
//! end in every store and in the committed offsets.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use exactly_once::config::WorkerConfig;
use exactly_once::runtime::worker::create_topics;
use exactly_once::runtime::{Functions, Worker};
use exactly_once::Handler;
use integration_tests::{committed_offsets, publish_user_events, wait_until, Published, TestEnv};
use user_events::UserEvents;

const PARTITIONS: i32 = 3;

fn worker_config() -> WorkerConfig {
    let mut c = WorkerConfig::from_env(&exactly_once::config::ProcessEnv).expect("worker configuration");
    c.batch_size = 100;
    c.retry_backoff = Duration::from_millis(50);
    c
}

async fn setup() -> (TestEnv, Arc<Functions>, String) {
    let mut env = TestEnv::new().await;
    env.kafka.topic_partitions = PARTITIONS;
    let functions = Arc::new(
        Functions::new(&env.clients, vec![Arc::new(UserEvents) as Arc<dyn Handler>], &env.kafka)
            .await
            .expect("functions"),
    );
    let topic = env.kafka.topic(user_events::TOPICS[0]);
    create_topics(&env.kafka, std::slice::from_ref(&topic)).await.expect("topic");
    (env, functions, topic)
}

/// Like `setup`, with ClickHouse reached through a proxy the test can take down, and
/// the ClickHouse breaker open for `open_for` once it trips.
async fn setup_behind_clickhouse_proxy(
    open_for: Duration,
) -> (integration_tests::ToggleProxy, TestEnv, Arc<Functions>, String) {
    let proxy = integration_tests::ToggleProxy::start("127.0.0.1:8123").await;
    let url = proxy.url();
    let mut env = TestEnv::with(|c| {
        c.clickhouse.urls = vec![url];
        c.breakers.clickhouse.open_for = open_for;
    })
    .await;
    env.kafka.topic_partitions = PARTITIONS;
    let functions = Arc::new(
        Functions::new(&env.clients, vec![Arc::new(UserEvents) as Arc<dyn Handler>], &env.kafka).await.unwrap(),
    );
    let topic = env.kafka.topic(user_events::TOPICS[0]);
    create_topics(&env.kafka, std::slice::from_ref(&topic)).await.unwrap();
    (proxy, env, functions, topic)
}

async fn start(env: &TestEnv, functions: &Arc<Functions>) -> Worker {
    Worker::start(&env.clients, functions.clone(), &env.kafka, &worker_config()).await.expect("worker starts")
}

/// Waits until every store holds exactly the unique events and every partition's
/// committed offset reached its end.
async fn assert_exactly_once(env: &TestEnv, topic: &str, published: &Published) {
    let unique = published.unique as u64;
    wait_until(Duration::from_secs(120), "all events in ClickHouse and all offsets committed", || async {
        let rows = env.clickhouse_count("SELECT count() FROM user_events FINAL").await;
        assert!(rows <= unique, "ClickHouse holds {rows} rows for {unique} unique events");
        if rows < unique {
            return false;
        }
        let committed = committed_offsets(&env.kafka, topic, PARTITIONS).await;
        published.end_offsets.iter().all(|(p, end)| committed.get(p) == Some(end))
    })
    .await;
    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events FINAL").await, unique);
    assert_eq!(env.clickhouse_count("SELECT uniqExact(event_id) FROM user_events").await, unique);
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE namespace = 'user-events'").await, unique as i64);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_applies_each_unique_event_once_and_commits_every_partition() {
    let (env, functions, topic) = setup().await;
    let published = publish_user_events(&env.kafka, &topic, 1500, 500).await;
    assert_eq!(published.messages, 2000);
    assert_eq!(published.end_offsets.len(), PARTITIONS as usize, "all partitions used");

    let worker = start(&env, &functions).await;
    assert_exactly_once(&env, &topic, &published).await;
    assert_eq!(worker.in_flight(), 0);
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_mid_stream_is_resumed_by_a_new_one_from_committed_offsets() {
    let (env, functions, topic) = setup().await;
    let first = start(&env, &functions).await;
    let published = publish_user_events(&env.kafka, &topic, 1500, 500).await;
    wait_until(Duration::from_secs(60), "the first worker to make progress", || async {
        env.count("SELECT count(*) FROM processed_events").await >= 200
    })
    .await;
    // No graceful shutdown: nothing more is committed, in-flight work is abandoned (its
    // leases hold its records for up to GUARD_LEASE_TTL_MS). `abort` returns once the
    // member has left the group, so the next one never joins a rebalance the dead one
    // leads: the test broker would never finish that rebalance.
    first.abort().await;
    let confirmed_at_crash = env.count("SELECT count(*) FROM processed_events").await;

    let second = start(&env, &functions).await;
    assert_exactly_once(&env, &topic, &published).await;
    assert!(confirmed_at_crash < 1500, "the crash happened mid-stream ({confirmed_at_crash} confirmed)");
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_workers_in_one_group_split_the_partitions() {
    let (env, functions, topic) = setup().await;
    let a = start(&env, &functions).await;
    let b = start(&env, &functions).await;
    wait_until(Duration::from_secs(60), "both workers to own partitions", || async {
        !a.assigned().is_empty()
            && !b.assigned().is_empty()
            && a.assigned().len() + b.assigned().len() == PARTITIONS as usize
    })
    .await;
    let (owned_a, owned_b) = (a.assigned(), b.assigned());
    assert!(owned_a.iter().all(|p| !owned_b.contains(p)), "no partition owned twice: {owned_a:?} / {owned_b:?}");

    let published = publish_user_events(&env.kafka, &topic, 1500, 500).await;
    assert_exactly_once(&env, &topic, &published).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clickhouse_outage_pauses_partitions_without_spinning_or_moving_offsets() {
    use exactly_once::BreakerState;
    use std::sync::atomic::Ordering;

    let (proxy, env, functions, topic) = setup_behind_clickhouse_proxy(Duration::from_secs(2)).await;

    proxy.take_down().await;
    let pauses_before = exactly_once::metrics::metrics().partition_pauses.with_label_values(&["user-events"]).get();
    let worker = start(&env, &functions).await;
    let published = publish_user_events(&env.kafka, &topic, 300, 0).await;
    let breaker = env.clients.sink.breaker().clone();
    wait_until(Duration::from_secs(60), "the ClickHouse breaker to open", || async {
        breaker.state() == BreakerState::Open
    })
    .await;

    // Four seconds of outage (two open periods): a handful of probes, not a busy loop.
    let attempts_before = proxy.connections.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let attempts = proxy.connections.load(Ordering::SeqCst) - attempts_before;
    assert!(attempts <= 12, "{attempts} connection attempts in 4 s of outage: the worker is spinning");
    assert!(
        exactly_once::metrics::metrics().partition_pauses.with_label_values(&["user-events"]).get() > pauses_before
    );
    assert_eq!(
        env.count("SELECT count(*) FROM processed_events").await,
        0,
        "nothing confirmed while ClickHouse is down"
    );
    assert!(committed_offsets(&env.kafka, &topic, PARTITIONS).await.is_empty(), "no offset moves during the outage");
    assert_eq!(env.count("SELECT count(*) FROM event_attempts").await, 0, "an outage does not count against events");

    proxy.bring_up();
    assert_exactly_once(&env, &topic, &published).await;
    worker.shutdown().await;
}

/// A partition paused for the ClickHouse breaker, then revoked and assigned back (a
/// second worker joining and leaving), is consumed again once ClickHouse is back: the
/// pause librdkafka keeps across the reassignment is lifted on assignment.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_paused_for_clickhouse_is_resumed_after_a_rebalance() {
    use exactly_once::BreakerState;

    // The breaker stays open long enough that the pauses span both rebalances.
    let (proxy, env, functions, topic) = setup_behind_clickhouse_proxy(Duration::from_secs(20)).await;

    proxy.take_down().await;
    let a = start(&env, &functions).await;
    let published = publish_user_events(&env.kafka, &topic, 300, 0).await;
    let breaker = env.clients.sink.breaker().clone();
    wait_until(Duration::from_secs(60), "the ClickHouse breaker to open", || async {
        breaker.state() == BreakerState::Open
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let b = start(&env, &functions).await;
    wait_until(Duration::from_secs(60), "the second worker to own partitions", || async { !b.assigned().is_empty() })
        .await;
    b.shutdown().await;
    wait_until(Duration::from_secs(60), "the first worker to own every partition again", || async {
        a.assigned().len() == PARTITIONS as usize
    })
    .await;

    proxy.bring_up();
    assert_exactly_once(&env, &topic, &published).await;
    a.shutdown().await;
}

/// One function stuck on a ClickHouse outage must not stop another: with records of a
/// ClickHouse function queued past its partitions' caps, the Postgres-only
/// notifications of the same worker keep landing. Before, the stuck partitions held
/// every in-flight slot and the consume loop stopped for every partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_keep_flowing_while_clickhouse_is_down() {
    use exactly_once::producer::Producer;
    use exactly_once::BreakerState;

    let proxy = integration_tests::ToggleProxy::start("127.0.0.1:8123").await;
    let url = proxy.url();
    let mut env = TestEnv::with(|c| {
        c.clickhouse.urls = vec![url];
        c.breakers.clickhouse.open_for = Duration::from_secs(2);
    })
    .await;
    env.kafka.topic_partitions = PARTITIONS;
    let handlers: Vec<Arc<dyn Handler>> = vec![Arc::new(UserEvents), Arc::new(notifications::Notifications)];
    let functions = Arc::new(Functions::new(&env.clients, handlers, &env.kafka).await.unwrap());
    let events_topic = env.kafka.topic(user_events::TOPICS[0]);
    let requests_topic = env.kafka.topic(notifications::TOPICS[0]);
    create_topics(&env.kafka, &[events_topic.clone(), requests_topic.clone()]).await.unwrap();

    proxy.take_down().await;
    let mut config = worker_config();
    config.max_in_flight = 60;
    let worker = Worker::start(&env.clients, functions.clone(), &env.kafka, &config).await.unwrap();
    let published = publish_user_events(&env.kafka, &events_topic, 600, 0).await;
    let breaker = env.clients.sink.breaker().clone();
    wait_until(Duration::from_secs(60), "the ClickHouse breaker to open", || async {
        breaker.state() == BreakerState::Open
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let producer = Producer::new(&env.kafka).unwrap();
    for n in 0..40u64 {
        let payload = notifications::Notifications.sample(n).expect("sample");
        producer.send(&requests_topic, None, &payload, Some(&format!("req-{n}"))).await.expect("publish");
    }
    wait_until(Duration::from_secs(60), "every notification while ClickHouse is down", || async {
        env.count("SELECT count(*) FROM notifications").await == 40
    })
    .await;
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE namespace = 'user-events'").await, 0);
    assert!(worker.in_flight() <= 60);

    proxy.bring_up();
    assert_exactly_once(&env, &events_topic, &published).await;
    worker.shutdown().await;
}

/// A partition task that dies (a bug, an abort: not a revoke) is noticed and the
/// partition read again from its last finished offset: every record lands once and
/// every offset is committed. Before, the partition stopped for good without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_task_that_dies_is_restarted_from_its_last_finished_offset() {
    let (env, functions, topic) = setup().await;
    let worker = start(&env, &functions).await;
    let restarts = || exactly_once::metrics::metrics().partition_restarts.with_label_values(&["user-events"]).get();
    let before = restarts();
    let first = publish_user_events(&env.kafka, &topic, 200, 0).await;
    wait_until(Duration::from_secs(60), "partition 0 to have a task", || async {
        worker.kill_partition_task(&topic, 0)
    })
    .await;
    // And once more with records queued behind it.
    let second = {
        let producer = exactly_once::producer::Producer::new(&env.kafka).unwrap();
        let mut end = HashMap::new();
        for i in 200..400usize {
            let payload = serde_json::json!({"user_id": format!("user-{i}"), "type": "created", "occurred_at": 1_700_000_000 + i});
            let id = format!("evt-{i}");
            let (p, o) =
                producer.send(&topic, Some(id.as_bytes()), payload.to_string().as_bytes(), Some(&id)).await.unwrap();
            let e = end.entry(p).or_insert(0);
            *e = (*e).max(o + 1);
        }
        end
    };
    worker.kill_partition_task(&topic, 0);
    let mut all = Published { unique: 400, ..Default::default() };
    for (p, e) in first.end_offsets.iter().chain(second.iter()) {
        let end = all.end_offsets.entry(*p).or_insert(0);
        *end = (*end).max(*e);
    }
    assert_exactly_once(&env, &topic, &all).await;
    assert!(restarts() > before, "the restart is counted");
    worker.shutdown().await;
}
