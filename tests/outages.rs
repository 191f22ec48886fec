//! A dependency down: Redis (the guard goes on with Postgres alone, and comes back),
//! a ClickHouse endpoint (writes rotate past it; the breaker counts calls, not
//! attempts), Postgres at start-up (a clear message without the password).
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use exactly_once::config::GuardConfig;
use exactly_once::{BreakerState, DuplicateTier, Guard, Handler, Outcome};
use integration_tests::{user_event, TestEnv, ToggleProxy};

use crate::effects::{effects_table, ev, guard, Effects};

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
async fn unreachable_postgres_fails_start_up_with_a_clear_message() {
    let mut config = exactly_once::Config::load().unwrap();
    config.postgres.url = exactly_once::config::Secret::new("postgres://app:hunter2@127.0.0.1:1/app");
    config.postgres.connect_timeout = Duration::from_secs(1);
    let err = exactly_once::Clients::connect(config).await.err().expect("no Postgres on port 1");
    let text = err.to_string();
    assert!(text.contains("Postgres at postgres://app:***@127.0.0.1:1/app") && text.contains("DATABASE_URL"), "{text}");
    assert!(!text.contains("hunter2"));
}

/// The last command the server saw on client `id` (`CLIENT LIST ID`), asked on
/// `observer`; `None` once the server has no such client.
async fn last_command(observer: &mut redis::aio::MultiplexedConnection, id: i64) -> Option<String> {
    let list: String =
        redis::cmd("CLIENT").arg("LIST").arg("ID").arg(id).query_async(observer).await.expect("CLIENT LIST");
    list.split_whitespace().find_map(|f| f.strip_prefix("cmd=")).map(str::to_owned)
}

/// `redis_pool_events_total{event}` (process-wide: other tests may add to it, so only
/// its growth is asserted).
fn pool_events(event: &str) -> u64 {
    exactly_once::metrics::metrics().redis_pool.with_label_values(&[event]).get()
}

async fn client_id(conn: &mut exactly_once::redis_client::RedisConnection) -> redis::RedisResult<i64> {
    redis::cmd("CLIENT").arg("ID").query_async(conn).await
}

/// A pooled Redis connection in steady use is handed out without a PING (the PING
/// would double every Redis step); one idle for `REDIS_PING_IDLE_MS` gets one. A
/// connection the server dropped fails one call and is replaced, and every other
/// connection of the pool is pinged before its next use, so a Redis restart costs one
/// failed call, not one per pooled connection. A call given up before its answer has the
/// pool ping first too, and a stuck connection is replaced. A server error leaves the
/// connection be.
#[tokio::test]
async fn redis_pool_pings_only_idle_connections_and_replaces_dropped_ones_after_one_failed_call() {
    use exactly_once::redis_client::RedisClient;
    let config = exactly_once::Config::load().expect("configuration");
    if config.redis.mode == exactly_once::config::RedisMode::Cluster {
        eprintln!("skipped: the pool is the standalone mode's (the cluster tests cover REDIS_MODE=cluster)");
        return;
    }
    let observer_client = redis::Client::open(config.redis.url.expose()).expect("REDIS_URL");
    let mut observer = observer_client.get_multiplexed_async_connection().await.expect("observer connection");
    let settings =
        |ping_idle: Duration| exactly_once::config::RedisConfig { pool_size: 2, ping_idle, ..config.redis.clone() };

    // In steady use: the same connection comes back (LIFO) and nothing is sent first.
    let steady = RedisClient::connect(&settings(Duration::from_secs(60))).await.expect("connect");
    let mut c = steady.connection().await.expect("connection");
    let id = client_id(&mut c).await.expect("CLIENT ID");
    drop(c);
    let mut c = steady.connection().await.expect("connection");
    assert_eq!(last_command(&mut observer, id).await.as_deref(), Some("client|id"), "no PING before reuse");
    assert_eq!(client_id(&mut c).await.expect("CLIENT ID"), id, "the connection used last comes back");
    drop(c);
    assert_eq!(steady.pings(), 0, "the pool counts no PING");

    // With REDIS_PING_IDLE_MS=0 every checkout is checked first.
    let pinging = RedisClient::connect(&settings(Duration::ZERO)).await.expect("connect");
    let mut c = pinging.connection().await.expect("connection");
    let pinged_id = client_id(&mut c).await.expect("CLIENT ID");
    drop(c);
    let c = pinging.connection().await.expect("connection");
    assert_eq!(last_command(&mut observer, pinged_id).await.as_deref(), Some("ping"), "PING before reuse");
    assert_eq!(pinging.pings(), 2, "a PING on each of the two checkouts");
    drop(c);

    // A command the server refuses does not cost the connection.
    let key = format!("{}:list", integration_tests::unique("pool"));
    let mut c = steady.connection().await.expect("connection");
    let _: () = redis::cmd("RPUSH").arg(&key).arg("x").query_async(&mut c).await.expect("RPUSH");
    let wrong: redis::RedisResult<Option<String>> = redis::cmd("GET").arg(&key).query_async(&mut c).await;
    assert!(wrong.is_err(), "GET of a list is WRONGTYPE");
    drop(c);
    let mut c = steady.connection().await.expect("connection");
    assert_eq!(client_id(&mut c).await.expect("CLIENT ID"), id, "kept after a server error");
    let _: () = redis::cmd("DEL").arg(&key).query_async(&mut c).await.expect("DEL");
    drop(c);

    // A call given up before its answer (as the guard's timeout around a step gives up):
    // the connection may be stuck, so it is pinged before its next use. This one is
    // (BLPOP holds it), so its PING does not come back, and a new connection takes its
    // place instead of failing the next call.
    let (unanswered, check_failed) = (pool_events("call_unanswered"), pool_events("check_failed"));
    let key = format!("{}:blocked", integration_tests::unique("pool"));
    let mut c = steady.connection().await.expect("connection");
    let blocked = client_id(&mut c).await.expect("CLIENT ID");
    let mut blpop = redis::cmd("BLPOP");
    blpop.arg(&key).arg(5);
    let held = tokio::time::timeout(Duration::from_millis(100), blpop.query_async::<Option<(String, String)>>(&mut c));
    assert!(held.await.is_err(), "BLPOP holds the connection");
    drop(c);
    let pings = steady.pings();
    let mut c = steady.connection().await.expect("connection");
    let started = std::time::Instant::now();
    let next = client_id(&mut c).await.expect("a connection that answers");
    assert!(started.elapsed() < Duration::from_secs(1), "not queued behind the BLPOP");
    assert_ne!(next, blocked, "the stuck connection was handed out again");
    assert_eq!(steady.pings() - pings, 1, "pinged before reuse");
    assert!(pool_events("call_unanswered") > unanswered, "the given-up call is counted");
    assert!(pool_events("check_failed") > check_failed, "the failed check is counted");
    drop(c);

    // Both pooled connections in use once, then both dropped by the server (a restart).
    let (mut a, mut b) = (steady.connection().await.expect("a"), steady.connection().await.expect("b"));
    let ids = [client_id(&mut a).await.expect("CLIENT ID"), client_id(&mut b).await.expect("CLIENT ID")];
    assert_ne!(ids[0], ids[1], "two connections held at once");
    drop((a, b));
    for id in ids {
        let killed: i64 =
            redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id).query_async(&mut observer).await.expect("KILL");
        assert_eq!(killed, 1);
    }
    wait_until_gone(&mut observer, &ids).await;
    let call_failed = pool_events("call_failed");
    // Used a moment ago, so handed out unchecked: this one call fails...
    let mut c = steady.connection().await.expect("connection");
    assert!(client_id(&mut c).await.is_err(), "the first call after the restart meets a dropped connection");
    assert!(pool_events("call_failed") > call_failed, "the failed call is counted");
    drop(c);
    // ...and it tells the pool: the broken one is replaced, the other is pinged (and
    // replaced too) instead of failing the next call.
    let before = steady.pings();
    for _ in 0..3 {
        let mut c = steady.connection().await.expect("connection");
        let fresh = client_id(&mut c).await.expect("a fresh connection answers");
        assert!(!ids.contains(&fresh), "a dropped connection was handed out again");
    }
    assert_eq!(steady.pings() - before, 1, "the surviving connection was pinged once, then replaced");
}

async fn wait_until_gone(observer: &mut redis::aio::MultiplexedConnection, ids: &[i64]) {
    for _ in 0..100 {
        let mut gone = true;
        for &id in ids {
            gone &= last_command(observer, id).await.is_none();
        }
        if gone {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the killed clients are still listed");
}
