//! Guard and library features beyond the core protocol, against the real services:
//! oversized values, per-function attempts, payload validation, retention, the Redis
//! outage fallback, ClickHouse endpoint rotation, the in-memory tier, fail-fast start-up
//! and the producer's idempotency keys.

use exactly_once::DeadLetterReason;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use exactly_once::config::{GuardConfig, RetentionConfig};
use exactly_once::metrics::metrics;
use exactly_once::runtime::Functions;
use exactly_once::{
    async_trait, BreakerState, DuplicateTier, Event, FunctionSpec, Guard, Handler, HandlerContext, HandlerError,
    IdStrategy, Outcome, Record,
};
use integration_tests::{user_event, TestEnv, ToggleProxy};

/// Writes an effect row in the guard's transaction; can be told to fail.
struct Effects {
    name: &'static str,
    calls: AtomicU32,
    fail: bool,
    max_attempts: Option<u32>,
}

impl Effects {
    fn new(name: &'static str) -> Self {
        Self { name, calls: AtomicU32::new(0), fail: false, max_attempts: None }
    }
}

#[async_trait]
impl Handler for Effects {
    fn spec(&self) -> FunctionSpec {
        let topics: &'static [&'static str] = match self.name {
            "strict" => &["strict"],
            "lenient" => &["lenient"],
            _ => &["features"],
        };
        let spec = FunctionSpec::new(self.name, topics, IdStrategy::Header("idempotency_key".into()));
        match self.max_attempts {
            Some(n) => spec.max_attempts(n),
            None => spec,
        }
    }

    async fn handle(&self, _event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            return Err(HandlerError::retryable("this handler always fails"));
        }
        let id = ctx.event_id().to_string();
        sqlx::query("INSERT INTO effects (event_id) VALUES ($1)").bind(id).execute(ctx.postgres().await?).await?;
        Ok(())
    }
}

async fn effects_table(env: &TestEnv) {
    sqlx::query("CREATE TABLE effects (seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL)")
        .execute(env.pg())
        .await
        .unwrap();
}

fn guard(env: &TestEnv, name: &str, config: GuardConfig) -> Guard {
    Guard::new(&env.clients, name, IdStrategy::Header("idempotency_key".into()), config).unwrap()
}

fn ev(id: &str, offset: i64) -> Event {
    user_event("features", 0, offset, id, "u")
}

#[tokio::test]
async fn an_oversized_value_is_dead_lettered_with_its_reason() {
    let env = TestEnv::new().await;
    effects_table(&env).await;
    let h = Effects::new("features");
    let g = guard(&env, "features", GuardConfig { max_value_bytes: 64, ..GuardConfig::default() });
    let big = Event::new("features", 0, 1).with_header("idempotency_key", "big").with_value(vec![b'x'; 65]);
    let report = g.run_batch(&h, &[big, ev("small", 2)], None).await;
    assert_eq!(report.outcomes[0].outcome, Outcome::DeadLettered { reason: DeadLetterReason::ValueTooLarge });
    assert_eq!(report.outcomes[1].outcome, Outcome::Processed);
    assert_eq!(h.calls.load(Ordering::SeqCst), 1, "the handler never sees the oversized record");
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE reason = 'value_too_large' AND length(record_value) = 65")
            .await,
        1
    );
}

#[tokio::test]
async fn a_function_sets_its_own_max_attempts() {
    let env = TestEnv::new().await;
    let strict = Effects { fail: true, max_attempts: Some(1), ..Effects::new("strict") };
    let lenient = Effects { fail: true, ..Effects::new("lenient") };
    let functions = Functions::new(&env.clients, vec![Arc::new(strict), Arc::new(lenient)], &env.kafka).await.unwrap();
    let f = functions.by_name("strict").unwrap();
    let r = f.guard.run_batch(f.handler.as_ref(), &[ev("once", 0)], None).await;
    assert_eq!(
        r.outcomes[0].outcome,
        Outcome::DeadLettered { reason: DeadLetterReason::MaxAttempts },
        "one attempt is all it gets"
    );
    let f = functions.by_name("lenient").unwrap();
    let r = f.guard.run_batch(f.handler.as_ref(), &[ev("once", 0)], None).await;
    assert!(
        matches!(r.outcomes[0].outcome, Outcome::Failed { attempts: Some(1), .. }),
        "GUARD_MAX_ATTEMPTS (5) applies"
    );
}

#[tokio::test]
async fn a_duplicate_with_another_payload_is_flagged_and_kept_when_configured() {
    let env = TestEnv::new().await;
    effects_table(&env).await;
    let h = Effects::new("features");
    let g = guard(&env, "features", GuardConfig { dead_letter_payload_mismatch: true, ..GuardConfig::default() });
    let before = metrics().payload_mismatch.with_label_values(&["features"]).get();

    assert_eq!(g.run_batch(&h, &[ev("same-id", 0)], None).await.outcomes[0].outcome, Outcome::Processed);
    let changed = Event::new("features", 0, 1)
        .with_header("idempotency_key", "same-id")
        .with_value(r#"{"user_id":"someone else"}"#);
    let same = ev("same-id", 2);
    let r = g.run_batch(&h, &[changed, same], None).await;
    assert!(matches!(r.outcomes[0].outcome, Outcome::Duplicate { payload_mismatch: true, .. }), "{r:?}");
    assert!(matches!(r.outcomes[1].outcome, Outcome::Duplicate { payload_mismatch: false, .. }), "{r:?}");
    assert_eq!(metrics().payload_mismatch.with_label_values(&["features"]).get(), before + 1);
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE reason = 'payload_mismatch' AND event_id = 'mismatch:features-0-1'").await,
        1
    );
    assert_eq!(env.count("SELECT count(*) FROM effects").await, 1, "still applied once");
}

#[tokio::test]
async fn retention_deletes_old_rows_in_bounded_batches_and_keeps_recent_ones() {
    let env = TestEnv::new().await;
    sqlx::query(
        "INSERT INTO processed_events (namespace, event_id, status, processed_at)
         SELECT 'old', 'o-' || i, 'processed', now() - interval '10 days' FROM generate_series(1, 25) i
         UNION ALL
         SELECT 'new', 'n-' || i, 'processed', now() - interval '1 day' FROM generate_series(1, 5) i",
    )
    .execute(env.pg())
    .await
    .unwrap();
    let config = RetentionConfig {
        retention: Duration::from_secs(7 * 86_400),
        outbox_retention: Duration::from_secs(86_400),
        batch_size: 10,
        interval: Duration::ZERO,
    };
    let report = exactly_once::retention::cleanup(env.pg(), &config).await.unwrap();
    assert_eq!(report.processed_events_deleted, 25);
    assert!(report.batches >= 3, "25 rows at 10 per statement take at least 3 statements: {report:?}");
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE namespace = 'new'").await, 5);
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 5);
    assert_eq!(exactly_once::retention::table_size(env.pg()).await.unwrap(), 5);
    assert_eq!(metrics().table_size.get(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_falls_back_to_postgres_and_recovers() {
    let proxy = ToggleProxy::start("127.0.0.1:6379").await;
    let redis_url = format!("redis://{}", proxy.addr);
    let env = TestEnv::with(|c| {
        c.redis.url = exactly_once::config::Secret::new(redis_url);
        c.redis.timeout = Duration::from_millis(300);
        c.breakers.redis.failure_threshold = 1;
        c.breakers.redis.open_for = Duration::from_secs(1);
        c.breakers.redis.success_threshold = 1;
    })
    .await;
    effects_table(&env).await;
    let h = Arc::new(Effects::new("features"));
    let no_cache = GuardConfig { local_cache_ttl: Duration::ZERO, ..GuardConfig::default() };
    let g = guard(&env, "features", no_cache.clone());
    assert_eq!(g.run_batch(&*h, &[ev("before", 0)], None).await.outcomes[0].outcome, Outcome::Processed);

    proxy.take_down().await;
    // Redis is gone: the first call fails (opening the breaker), the guard goes on alone.
    let r = g.run_batch(&*h, &[ev("before", 0), ev("during", 1)], None).await;
    assert!(matches!(r.outcomes[0].outcome, Outcome::Duplicate { tier: DuplicateTier::Postgres, .. }), "{r:?}");
    assert_eq!(r.outcomes[1].outcome, Outcome::Processed);
    let breaker = env.clients.leases.breaker().clone();
    assert_eq!(breaker.state(), BreakerState::Open);

    // Without leases, several consumers may run the handler, but Postgres lets one
    // confirm, so the effect lands once.
    let guards: Vec<Arc<Guard>> = (0..5).map(|_| Arc::new(guard(&env, "features", no_cache.clone()))).collect();
    let attempts_before = proxy.connections.load(Ordering::SeqCst);
    let runs: Vec<_> = guards
        .iter()
        .map(|g| {
            let (g, h) = (g.clone(), h.clone());
            tokio::spawn(async move { g.run_batch(&*h, &[ev("contended", 2)], None).await })
        })
        .collect();
    let mut processed = 0;
    for run in runs {
        match &run.await.unwrap().outcomes[0].outcome {
            Outcome::Processed => processed += 1,
            Outcome::Duplicate { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(processed, 1);
    assert_eq!(env.count("SELECT count(*) FROM effects WHERE event_id = 'h:contended'").await, 1);
    assert_eq!(proxy.connections.load(Ordering::SeqCst), attempts_before, "an open breaker keeps Redis calls away");

    // Redis is back: after the open time a probe closes the breaker and markers return.
    proxy.bring_up();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let redis_before = g.round_trips().redis();
    assert_eq!(g.run_batch(&*h, &[ev("after", 3)], None).await.outcomes[0].outcome, Outcome::Processed);
    assert!(g.round_trips().redis() > redis_before, "Redis is used again");
    assert_eq!(breaker.state(), BreakerState::Closed);
    let r = guard(&env, "features", no_cache).run_batch(&*h, &[ev("after", 3)], None).await;
    assert!(matches!(r.outcomes[0].outcome, Outcome::Duplicate { tier: DuplicateTier::Redis, .. }), "{r:?}");
    assert_eq!(env.count("SELECT count(*) FROM effects").await, 4, "before, during, contended, after: once each");
}

#[tokio::test]
async fn clickhouse_writes_rotate_past_a_dead_endpoint() {
    let dead = ToggleProxy::start("127.0.0.1:8123").await;
    dead.take_down().await;
    let dead_url = dead.url();
    // The dead endpoint first: start-up must use the next one that answers.
    let env = TestEnv::with(|c| c.clickhouse.urls = vec![dead_url, "http://127.0.0.1:8123".into()]).await;
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await.unwrap();
    let g = Guard::new(&env.clients, "user-events", user_events::UserEvents.spec().id_strategy, GuardConfig::default())
        .unwrap();
    for i in 0..6 {
        let r = g
            .run_batch(&user_events::UserEvents, &[user_event("user-events", 0, i, &format!("rot-{i}"), "u")], None)
            .await;
        assert_eq!(r.outcomes[0].outcome, Outcome::Processed, "write {i}");
    }
    assert!(dead.connections.load(Ordering::SeqCst) >= 3, "round-robin tried the dead endpoint");
    assert_eq!(
        env.clients.sink.breaker().state(),
        BreakerState::Closed,
        "retries on the next endpoint hide the failures"
    );
    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events FINAL").await, 6);
}

#[tokio::test]
async fn every_attempt_failing_counts_once_against_the_breaker() {
    let a = ToggleProxy::start("127.0.0.1:8123").await;
    let b = ToggleProxy::start("127.0.0.1:8123").await;
    let (ua, ub) = (a.url(), b.url());
    let env = TestEnv::with(|c| c.clickhouse.urls = vec![ua, ub]).await;
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await.unwrap();
    a.take_down().await;
    b.take_down().await;
    let g = Guard::new(&env.clients, "user-events", user_events::UserEvents.spec().id_strategy, GuardConfig::default())
        .unwrap();
    let started = std::time::Instant::now();
    let r = g.run_batch(&user_events::UserEvents, &[user_event("user-events", 0, 0, "x", "u")], None).await;
    assert!(matches!(r.outcomes[0].outcome, Outcome::Failed { .. }));
    let tried = a.connections.load(Ordering::SeqCst) + b.connections.load(Ordering::SeqCst);
    assert!(tried >= 3, "three attempts across the endpoints, saw {tried}");
    assert!(started.elapsed() >= Duration::from_millis(30), "10 + 20 ms of backoff between the attempts");
    assert_eq!(env.clients.sink.breaker().state(), BreakerState::Closed, "one failed call, not three");
}

#[tokio::test]
async fn kafka_dedup_ttl_zero_disables_the_local_cache() {
    let env = TestEnv::new().await;
    effects_table(&env).await;
    let h = Effects::new("features");
    let g = guard(&env, "features", GuardConfig { local_cache_ttl: Duration::ZERO, ..GuardConfig::default() });
    assert!(!g.local_cache().is_enabled());
    g.run_batch(&h, &[ev("e", 0)], None).await;
    let r = g.run_batch(&h, &[ev("e", 0)], None).await;
    assert!(matches!(r.outcomes[0].outcome, Outcome::Duplicate { tier: DuplicateTier::Redis, .. }), "{r:?}");

    let cached = guard(&env, "features", GuardConfig::default());
    cached.run_batch(&h, &[ev("f", 1)], None).await;
    let r = cached.run_batch(&h, &[ev("f", 1)], None).await;
    assert!(matches!(r.outcomes[0].outcome, Outcome::Duplicate { tier: DuplicateTier::Local, .. }), "{r:?}");
}

#[tokio::test]
async fn unreachable_postgres_fails_start_up_with_a_clear_message() {
    let mut config = exactly_once::Config::load().unwrap();
    config.postgres.url = exactly_once::config::Secret::new("postgres://app:hunter2@127.0.0.1:1/app");
    config.postgres.connect_timeout = Duration::from_secs(1);
    let err = exactly_once::Clients::connect(config).await.err().expect("no Postgres on port 1");
    let text = err.to_string();
    assert!(text.contains("Postgres at postgres://app:***@127.0.0.1:1/app") && text.contains("DATABASE_URL"), "{text}");
    assert!(!text.contains("hunter2"));
}

#[tokio::test]
async fn the_producer_stamps_every_message_with_a_unique_idempotency_key() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let env = TestEnv::new().await;
    let topic = env.kafka.topic("producer");
    exactly_once::runtime::worker::create_topics(&env.kafka, std::slice::from_ref(&topic)).await.unwrap();
    let producer = exactly_once::producer::Producer::new(&env.kafka).unwrap();
    for _ in 0..5 {
        producer.send(&topic, None, b"{}", None).await.unwrap();
    }
    producer.send(&topic, None, b"{}", Some("chosen-key")).await.unwrap();

    let mut config = exactly_once::runtime::worker::client_config(&env.kafka);
    config.set("group.id", &env.kafka.group_id).set("auto.offset.reset", "earliest");
    let keys = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().unwrap();
        consumer.subscribe(&[&topic]).unwrap();
        let mut keys = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while keys.len() < 6 && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(500)) {
                let h = m.headers().expect("headers");
                let key = h.iter().find(|h| h.key == "idempotency_key").and_then(|h| h.value).expect("idempotency_key");
                keys.push(String::from_utf8(key.to_vec()).unwrap());
            }
        }
        keys
    })
    .await
    .unwrap();
    assert_eq!(keys.len(), 6);
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 6, "every key is unique");
    assert!(keys.contains(&"chosen-key".to_owned()));
}

#[tokio::test]
async fn undecodable_records_go_to_the_dead_letters_through_the_guard() {
    let env = TestEnv::new().await;
    effects_table(&env).await;
    let h = Effects::new("features");
    let g = guard(&env, "features", GuardConfig::default());
    let bad = Record::Invalid {
        event: Event::new("features", 3, 9).with_value("%%%"),
        reason: "record_value_base64",
        error: "value is not base64".into(),
    };
    let r = g.run_records(&h, &[bad, Record::Ok(ev("ok", 10))], None).await;
    assert_eq!(
        r.outcomes[0].outcome,
        Outcome::DeadLettered { reason: DeadLetterReason::Undecodable("record_value_base64") }
    );
    assert_eq!(r.outcomes[1].outcome, Outcome::Processed);
}
