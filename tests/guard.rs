//! The guard protocol against the real services: duplicates, restarts, failures, lease
//! expiry, round trips per batch, and the ClickHouse breaker.

use exactly_once::DeadLetterReason;
use exactly_once::OutcomeKind;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use exactly_once::config::GuardConfig;
use exactly_once::guard::lease::{Calls, LeaseReply, Leases, Release};
use exactly_once::{
    async_trait, BreakerState, DuplicateTier, Event, FailureKind, FunctionSpec, Guard, Handler, HandlerContext,
    HandlerError, IdStrategy, Outcome,
};
use integration_tests::{user_event, TestEnv, ToggleProxy};
use tokio::sync::{Notify, Semaphore};

const NS: &str = "probe";

/// A handler that records what happened to it, and can be told to fail, stall, or write
/// a Postgres effect.
#[derive(Default)]
struct Probe {
    calls: AtomicU32,
    /// Fail (retryable) this many calls before succeeding.
    fail_first: AtomicU32,
    fail_permanently: bool,
    delay: Duration,
    /// Writes a row into `effects` (in the guard's transaction) tagged with this.
    effect_tag: Option<&'static str>,
    /// Signalled when the handler starts; the handler then waits for `gate`.
    entered: Option<Arc<Notify>>,
    gate: Option<Arc<Semaphore>>,
    ids: Option<IdStrategy>,
    /// Panics on the event with this id.
    panic_on: Option<&'static str>,
}

/// The spec of every test handler here: namespace `NS`, topic `probe`, ids from the
/// `idempotency_key` header.
fn probe_spec() -> FunctionSpec {
    FunctionSpec::new(NS, &["probe"], IdStrategy::Header("idempotency_key".into()))
}

/// Writes the event's effect row in the batch transaction, tagged with `writer`;
/// returns the event id.
async fn write_effect(ctx: &mut HandlerContext<'_>, writer: &str) -> Result<String, HandlerError> {
    let id = ctx.event_id().to_string();
    sqlx::query("INSERT INTO effects (event_id, writer) VALUES ($1, $2)")
        .bind(&id)
        .bind(writer)
        .execute(ctx.postgres().await?)
        .await?;
    Ok(id)
}

#[async_trait]
impl Handler for Probe {
    fn spec(&self) -> FunctionSpec {
        FunctionSpec::new(
            NS,
            &["probe"],
            self.ids.clone().unwrap_or_else(|| IdStrategy::Header("idempotency_key".into())),
        )
    }

    async fn handle(&self, event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(tag) = self.effect_tag {
            write_effect(ctx, tag).await?;
        }
        // After its Postgres effect: that effect must be rolled back with the event.
        if self.panic_on == Some(ctx.event_id().as_str()) {
            panic!("probe panics on {}", ctx.event_id());
        }
        if let Some(entered) = &self.entered {
            entered.notify_one();
        }
        if let Some(gate) = &self.gate {
            let _permit = gate.acquire().await.expect("gate open");
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.fail_permanently {
            return Err(HandlerError::permanent("payload_invalid", "probe refuses this event"));
        }
        if self.fail_first.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(HandlerError::retryable(format!("probe failure at offset {}", event.offset)));
        }
        Ok(())
    }
}

fn guard(env: &TestEnv, probe: &Probe, config: GuardConfig) -> Guard {
    Guard::new(&env.clients, NS, probe.spec().id_strategy, config).expect("guard")
}

fn event(id: &str, offset: i64) -> Event {
    user_event("probe", 0, offset, id, "u1")
}

async fn create_effects_table(env: &TestEnv) {
    sqlx::query("CREATE TABLE effects (seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, writer TEXT NOT NULL)")
        .execute(env.pg())
        .await
        .expect("effects table");
}

fn only(report: &exactly_once::BatchReport) -> &Outcome {
    assert_eq!(report.outcomes.len(), 1);
    &report.outcomes[0].outcome
}

#[tokio::test]
async fn same_event_twice_runs_the_handler_once() {
    let env = TestEnv::new().await;
    let probe = Probe::default();
    let g = guard(&env, &probe, GuardConfig::default());

    let first = g.run_batch(&probe, &[event("e-1", 0)], None).await;
    assert_eq!(only(&first), &Outcome::Processed);
    let second = g.run_batch(&probe, &[event("e-1", 1)], None).await;
    assert!(
        matches!(only(&second), Outcome::Duplicate { tier: DuplicateTier::Local, payload_mismatch: false }),
        "{second:?}"
    );
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE event_id = 'h:e-1'").await, 1);

    // A second consumer (own cache) sees the Redis done marker.
    let other = guard(&env, &probe, GuardConfig::default());
    let third = other.run_batch(&probe, &[event("e-1", 2)], None).await;
    assert!(matches!(only(&third), Outcome::Duplicate { tier: DuplicateTier::Redis, .. }), "{third:?}");
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn ten_concurrent_consumers_of_one_event_run_the_handler_once() {
    let env = TestEnv::new().await;
    let probe = Arc::new(Probe { delay: Duration::from_millis(200), ..Default::default() });
    let guards: Vec<Arc<Guard>> = (0..10).map(|_| Arc::new(guard(&env, &probe, GuardConfig::default()))).collect();

    let tasks: Vec<_> = guards
        .iter()
        .map(|g| {
            let (g, p) = (g.clone(), probe.clone());
            tokio::spawn(async move { g.run_batch(&*p, &[event("contended", 7)], None).await })
        })
        .collect();
    let mut processed = 0;
    for t in tasks {
        match only(&t.await.unwrap()) {
            Outcome::Processed => processed += 1,
            Outcome::Duplicate { .. } | Outcome::InFlight => {}
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!(processed, 1);
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 1);

    // Once it is confirmed, every consumer reports a duplicate.
    for g in &guards {
        assert!(matches!(only(&g.run_batch(&*probe, &[event("contended", 7)], None).await), Outcome::Duplicate { .. }));
    }
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn duplicate_is_detected_from_postgres_after_restart_and_marker_restored() {
    let env = TestEnv::new().await;
    let probe = Probe::default();
    let before = guard(&env, &probe, GuardConfig::default());
    assert_eq!(only(&before.run_batch(&probe, &[event("e-restart", 0)], None).await), &Outcome::Processed);
    drop(before);

    // A restart: new guard (empty local cache) and Redis has lost everything.
    env.flush_redis().await;
    let ns = exactly_once::Namespace::new(NS).unwrap();
    let id = exactly_once::EventId::new("h:e-restart").unwrap();
    assert!(!env.redis_exists(&env.clients.leases.key(&ns, &id)).await);

    let after = guard(&env, &probe, GuardConfig::default());
    let report = after.run_batch(&probe, &[event("e-restart", 0)], None).await;
    assert!(
        matches!(only(&report), Outcome::Duplicate { tier: DuplicateTier::Postgres, payload_mismatch: false }),
        "{report:?}"
    );
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1);
    let (lease, marker) = env.clients.leases.inspect(&ns, &id).await.unwrap();
    assert!(marker.is_some(), "the done marker is restored");
    assert!(lease.is_none(), "the lease is released (the marker replaced it)");
}

#[tokio::test]
async fn failing_handler_confirms_nothing_releases_the_lease_and_counts_the_attempt() {
    let env = TestEnv::new().await;
    let probe = Probe { fail_first: AtomicU32::new(1), ..Default::default() };
    let g = guard(&env, &probe, GuardConfig::default());

    let report = g.run_batch(&probe, &[event("e-fail", 3)], None).await;
    match only(&report) {
        Outcome::Failed { kind: FailureKind::Retryable, attempts: Some(1), error } => {
            assert!(error.contains("probe failure"), "{error}")
        }
        other => panic!("expected a counted retryable failure, got {other:?}"),
    }
    assert!(!report.all_finished(), "a failed event must hold the offset");
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 0);
    assert_eq!(env.count("SELECT attempts::bigint FROM event_attempts WHERE event_id = 'h:e-fail'").await, 1);
    let ns = exactly_once::Namespace::new(NS).unwrap();
    let id = exactly_once::EventId::new("h:e-fail").unwrap();
    assert!(!env.redis_exists(&env.clients.leases.key(&ns, &id)).await, "lease released after failure");

    // The retry succeeds and records that it took two attempts.
    let retry = g.run_batch(&probe, &[event("e-fail", 3)], None).await;
    assert_eq!(only(&retry), &Outcome::Processed);
    assert_eq!(env.count("SELECT attempts::bigint FROM processed_events WHERE event_id = 'h:e-fail'").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM event_attempts").await, 0);
}

#[tokio::test]
async fn event_is_dead_lettered_after_max_attempts_and_then_skipped() {
    let env = TestEnv::new().await;
    let probe = Probe { fail_first: AtomicU32::new(u32::MAX), ..Default::default() };
    let g = guard(&env, &probe, GuardConfig { max_attempts: 2, ..GuardConfig::default() });

    assert!(matches!(
        only(&g.run_batch(&probe, &[event("e-poison", 9)], None).await),
        Outcome::Failed { attempts: Some(1), .. }
    ));
    let second = g.run_batch(&probe, &[event("e-poison", 9)], None).await;
    assert_eq!(only(&second), &Outcome::DeadLettered { reason: DeadLetterReason::MaxAttempts });
    assert!(second.all_finished(), "a dead-lettered event lets the offset move");
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE event_id = 'h:e-poison' AND attempts = 2 AND record_value IS NOT NULL AND error LIKE '%probe failure%'").await,
        1
    );
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE status = 'dead_lettered'").await, 1);
    assert!(matches!(only(&g.run_batch(&probe, &[event("e-poison", 9)], None).await), Outcome::Duplicate { .. }));
    assert_eq!(probe.calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn permanent_failure_is_dead_lettered_at_once() {
    let env = TestEnv::new().await;
    let probe = Probe { fail_permanently: true, ..Default::default() };
    let g = guard(&env, &probe, GuardConfig::default());
    let report = g.run_batch(&probe, &[event("e-bad", 1)], None).await;
    assert_eq!(only(&report), &Outcome::DeadLettered { reason: DeadLetterReason::Refused("payload_invalid") });
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE reason = 'payload_invalid'").await, 1);
}

#[tokio::test]
async fn lease_expiry_does_not_double_apply_postgres_effects() {
    let env = TestEnv::new().await;
    create_effects_table(&env).await;
    let lease_ttl = Duration::from_millis(300);
    let config = GuardConfig { lease_ttl, ..GuardConfig::default() };

    // A takes the lease, writes its effect, then stalls past the lease TTL.
    let entered = Arc::new(Notify::new());
    let gate = Arc::new(Semaphore::new(0));
    let slow = Arc::new(Probe {
        effect_tag: Some("A"),
        entered: Some(entered.clone()),
        gate: Some(gate.clone()),
        ..Default::default()
    });
    let a = Arc::new(guard(&env, &slow, config.clone()));
    let a_run = {
        let (a, slow) = (a.clone(), slow.clone());
        tokio::spawn(async move { a.run_batch(&*slow, &[event("e-lease", 5)], None).await })
    };
    entered.notified().await;
    tokio::time::sleep(lease_ttl + Duration::from_millis(200)).await;

    // B finds the lease expired, takes it, handles and confirms.
    let fast = Probe { effect_tag: Some("B"), ..Default::default() };
    let b = guard(&env, &fast, config);
    assert_eq!(only(&b.run_batch(&fast, &[event("e-lease", 5)], None).await), &Outcome::Processed);

    // A wakes up: its confirm finds B's row, so A's transaction (and effect) rolls back.
    gate.add_permits(1);
    let a_report = a_run.await.unwrap();
    assert!(matches!(only(&a_report), Outcome::Duplicate { tier: DuplicateTier::Confirm, .. }), "{a_report:?}");

    assert_eq!(env.count("SELECT count(*) FROM effects").await, 1, "effects applied exactly once");
    assert_eq!(env.count("SELECT count(*) FROM effects WHERE writer = 'B'").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 1);
}

/// The real user-events handler, stalled (after staging its row) the first time it runs.
struct StalledUserEvents {
    entered: Arc<Notify>,
    gate: Arc<Semaphore>,
    first: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Handler for StalledUserEvents {
    fn spec(&self) -> FunctionSpec {
        user_events::UserEvents.spec()
    }
    async fn handle(&self, event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        user_events::UserEvents.handle(event, ctx).await?;
        if self.first.swap(false, Ordering::SeqCst) {
            self.entered.notify_one();
            let _permit = self.gate.acquire().await.expect("gate open");
        }
        Ok(())
    }
}

#[tokio::test]
async fn lease_expiry_with_a_clickhouse_only_handler_leaves_one_row() {
    // No Postgres effects, so no transaction: both holders write their row to
    // ClickHouse, the confirm lets one win, and the table collapses the repeat.
    let env = TestEnv::new().await;
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await.unwrap();
    let config = GuardConfig { lease_ttl: Duration::from_millis(300), ..GuardConfig::default() };
    let stalled = Arc::new(StalledUserEvents {
        entered: Arc::new(Notify::new()),
        gate: Arc::new(Semaphore::new(0)),
        first: true.into(),
    });
    let spec = stalled.spec();
    let a = Arc::new(Guard::new(&env.clients, spec.name, spec.id_strategy.clone(), config.clone()).unwrap());
    let e = user_event("user-events", 0, 1, "raced", "ann");
    let a_run = {
        let (a, h, e) = (a.clone(), stalled.clone(), e.clone());
        tokio::spawn(async move { a.run_batch(&*h, &[e], None).await })
    };
    stalled.entered.notified().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = Guard::new(&env.clients, spec.name, spec.id_strategy, config).unwrap();
    assert_eq!(only(&b.run_batch(&*stalled, &[e], None).await), &Outcome::Processed);
    stalled.gate.add_permits(1);
    let a_report = a_run.await.unwrap();
    assert!(matches!(only(&a_report), Outcome::Duplicate { tier: DuplicateTier::Confirm, .. }), "{a_report:?}");
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 1);
    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events FINAL").await, 1);
}

#[tokio::test]
async fn handler_effects_and_confirm_commit_together_per_event() {
    // Two events in one batch; one handler fails after writing its effect. The other's
    // effect and confirm commit; the failed one's effect is rolled back with it.
    let env = TestEnv::new().await;
    create_effects_table(&env).await;

    struct Picky;
    #[async_trait]
    impl Handler for Picky {
        fn spec(&self) -> FunctionSpec {
            probe_spec()
        }
        async fn handle(&self, _event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
            let id = write_effect(ctx, "picky").await?;
            if id == "h:e-no" {
                return Err(HandlerError::retryable("refused after writing"));
            }
            Ok(())
        }
    }
    let g = Guard::new(&env.clients, NS, Picky.spec().id_strategy, GuardConfig::default()).unwrap();
    let report = g.run_batch(&Picky, &[event("e-yes", 0), event("e-no", 1)], None).await;
    assert_eq!(report.outcomes[0].outcome, Outcome::Processed);
    assert!(matches!(report.outcomes[1].outcome, Outcome::Failed { kind: FailureKind::Retryable, .. }));
    assert_eq!(env.count("SELECT count(*) FROM effects WHERE event_id = 'h:e-yes'").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM effects WHERE event_id = 'h:e-no'").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 1);
}

/// Builds a batch of `n` records, a quarter of which repeat an id: some repeat an id of
/// the same batch, some an id confirmed by an earlier batch.
fn batch_with_duplicates(n: usize, already_confirmed: &[String], tag: &str) -> Vec<Event> {
    let dup = n / 4;
    let from_earlier = dup.min(already_confirmed.len()) / 2;
    let fresh = n - dup;
    let mut events: Vec<Event> = (0..fresh).map(|i| event(&format!("{tag}-{i}"), i as i64)).collect();
    for (k, id) in already_confirmed.iter().take(from_earlier).enumerate() {
        events.push(event(id, (fresh + k) as i64));
    }
    for k in 0..(dup - from_earlier) {
        events.push(event(&format!("{tag}-{}", k % fresh), (fresh + from_earlier + k) as i64));
    }
    events
}

#[tokio::test]
async fn a_batch_costs_a_constant_number_of_round_trips() {
    let env = TestEnv::new().await;
    let probe = Probe::default();
    let warm = guard(&env, &probe, GuardConfig::default());
    let earlier: Vec<String> = (0..200).map(|i| format!("earlier-{i}")).collect();
    let warm_events: Vec<Event> = earlier.iter().enumerate().map(|(i, id)| event(id, i as i64)).collect();
    assert!(warm.run_batch(&probe, &warm_events, None).await.all_finished());

    let mut costs = Vec::new();
    for (n, tag) in [(10usize, "small"), (1000, "large")] {
        // A fresh guard: its local cache is cold, as after a restart.
        let g = guard(&env, &probe, GuardConfig::default());
        let events = batch_with_duplicates(n, &earlier, tag);
        let report = g.run_batch(&probe, &events, None).await;
        assert!(report.all_finished(), "{:?}", report.unfinished().next());
        assert_eq!(report.count(OutcomeKind::Processed) + report.count(OutcomeKind::Duplicate), n);
        assert_eq!(report.count(OutcomeKind::Duplicate), n / 4, "a quarter are duplicates");
        costs.push((n, g.round_trips().redis(), g.round_trips().postgres()));
    }
    // Redis: one script to check markers and take leases, one to release.
    // Postgres: durable check and confirm (no handler touched Postgres, so no
    // transaction: the confirm autocommits).
    for (n, redis, postgres) in &costs {
        assert_eq!((*redis, *postgres), (2, 2), "batch of {n}: redis {redis}, postgres {postgres}");
    }

    // With Postgres effects the confirm shares their transaction: BEGIN and COMMIT more,
    // plus a savepoint and its release per event.
    create_effects_table(&env).await;
    let writer = Probe { effect_tag: Some("w"), ..Default::default() };
    let g = guard(&env, &writer, GuardConfig::default());
    let events: Vec<Event> = (0..10).map(|i| event(&format!("tx-{i}"), i)).collect();
    g.run_batch(&writer, &events, None).await;
    assert_eq!((g.round_trips().redis(), g.round_trips().postgres()), (2, 4 + 2 * 10));

    // A batch that is entirely in the local cache costs nothing at all.
    let g = guard(&env, &probe, GuardConfig::default());
    let events: Vec<Event> = (0..50).map(|i| event(&format!("cached-{i}"), i)).collect();
    g.run_batch(&probe, &events, None).await;
    let (r0, p0) = (g.round_trips().redis(), g.round_trips().postgres());
    let again = g.run_batch(&probe, &events, None).await;
    assert_eq!(again.count(OutcomeKind::Duplicate), 50);
    assert_eq!((g.round_trips().redis(), g.round_trips().postgres()), (r0, p0), "local hits make no round trip");
}

#[tokio::test]
async fn record_without_a_usable_id_is_dead_lettered_with_its_reason() {
    let env = TestEnv::new().await;
    let probe = Probe::default();
    let g = guard(&env, &probe, GuardConfig::default());
    let no_header = Event::new("probe", 2, 77).with_value("{}");
    let report = g.run_batch(&probe, &[no_header, event("fine", 78)], None).await;
    assert_eq!(
        report.outcomes[0].outcome,
        Outcome::DeadLettered { reason: DeadLetterReason::NoId("id_header_missing") }
    );
    assert_eq!(report.outcomes[0].event_id, None);
    assert_eq!(report.outcomes[1].outcome, Outcome::Processed);
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1, "the handler never sees a record without an id");
    assert_eq!(
        env.count(
            "SELECT count(*) FROM dead_letters WHERE event_id = 'invalid:probe-2-77' AND reason = 'id_header_missing'"
        )
        .await,
        1
    );
}

/// Reads the PTTL of its own lease while it runs.
struct TtlSpy {
    redis: exactly_once::redis_client::RedisClient,
    key: String,
    seen: std::sync::Mutex<Option<i64>>,
}

#[async_trait]
impl Handler for TtlSpy {
    fn spec(&self) -> FunctionSpec {
        probe_spec()
    }
    async fn handle(&self, _event: &Event, _ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        let mut conn = self.redis.connection().await.map_err(HandlerError::retryable)?;
        let pttl: i64 =
            redis::cmd("PTTL").arg(&self.key).query_async(&mut conn).await.map_err(HandlerError::retryable)?;
        *self.seen.lock().unwrap() = Some(pttl);
        Ok(())
    }
}

#[tokio::test]
async fn lease_ttl_is_capped_by_the_deadline() {
    let env = TestEnv::new().await;
    let ns = exactly_once::Namespace::new(NS).unwrap();
    let spy = |id: &str| TtlSpy {
        redis: env.clients.redis.clone(),
        key: env.clients.leases.key(&ns, &exactly_once::EventId::new(format!("h:{id}")).unwrap()),
        seen: Default::default(),
    };
    let config = GuardConfig { lease_ttl: Duration::from_secs(30), ..GuardConfig::default() };
    let g = Guard::new(&env.clients, NS, IdStrategy::Header("idempotency_key".into()), config).unwrap();

    let no_deadline = spy("e-ttl-a");
    assert_eq!(only(&g.run_batch(&no_deadline, &[event("e-ttl-a", 0)], None).await), &Outcome::Processed);
    let ttl = no_deadline.seen.lock().unwrap().expect("handler ran");
    assert!(ttl > 25_000 && ttl <= 30_000, "configured TTL applies without a deadline: {ttl} ms");

    let capped = spy("e-ttl-b");
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    assert_eq!(only(&g.run_batch(&capped, &[event("e-ttl-b", 1)], Some(deadline)).await), &Outcome::Processed);
    let ttl = capped.seen.lock().unwrap().expect("handler ran");
    assert!(ttl > 0 && ttl <= 1500, "lease TTL {ttl} ms must not exceed the time left");

    // Past the deadline no lease is taken and nothing is handled.
    let late = spy("e-ttl-c");
    let report = g.run_batch(&late, &[event("e-ttl-c", 2)], Some(tokio::time::Instant::now())).await;
    assert!(matches!(only(&report), Outcome::Failed { kind: FailureKind::Unavailable, .. }), "{report:?}");
    assert!(late.seen.lock().unwrap().is_none());
}

#[tokio::test]
async fn clickhouse_breaker_fails_fast_confirms_nothing_and_recovers_through_half_open() {
    let proxy = ToggleProxy::start("127.0.0.1:8123").await;
    let url = proxy.url();
    let env = TestEnv::with(|c| {
        c.clickhouse.urls = vec![url];
        c.breakers.clickhouse.open_for = Duration::from_secs(1);
    })
    .await;
    let handler = user_events::UserEvents;
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await.unwrap();
    let g = Guard::new(&env.clients, "user-events", handler.spec().id_strategy, GuardConfig::default()).unwrap();
    let breaker = env.clients.sink.breaker().clone();

    proxy.take_down().await;
    for i in 0..3 {
        let r = g.run_batch(&handler, &[user_event("user-events", 0, i, &format!("ch-{i}"), "u")], None).await;
        assert!(matches!(only(&r), Outcome::Failed { kind: FailureKind::Unavailable, .. }), "{r:?}");
    }
    assert_eq!(breaker.state(), BreakerState::Open);

    // Open: the handler fails fast, without touching the network.
    let attempts_before = proxy.connections.load(Ordering::SeqCst);
    let r = g.run_batch(&handler, &[user_event("user-events", 0, 3, "ch-3", "u")], None).await;
    match only(&r) {
        Outcome::Failed { kind: FailureKind::Unavailable, error, .. } => {
            assert!(error.contains("circuit breaker is open"), "{error}")
        }
        other => panic!("expected fail-fast, got {other:?}"),
    }
    assert_eq!(proxy.connections.load(Ordering::SeqCst), attempts_before);
    assert_eq!(
        env.count("SELECT count(*) FROM processed_events").await,
        0,
        "nothing confirmed while ClickHouse is down"
    );
    assert_eq!(env.count("SELECT count(*) FROM event_attempts").await, 0, "an outage does not count against events");

    // Recovery: after the open time, three successful probes close it.
    proxy.bring_up();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(breaker.state(), BreakerState::HalfOpen);
    for i in 0..3 {
        let r = g.run_batch(&handler, &[user_event("user-events", 0, i, &format!("ch-{i}"), "u")], None).await;
        assert_eq!(only(&r), &Outcome::Processed);
        let expected = if i < 2 { BreakerState::HalfOpen } else { BreakerState::Closed };
        assert_eq!(breaker.state(), expected, "after probe {i}");
    }
    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events FINAL").await, 3);
}

/// The duplicate check's plan is made once per connection (generic plans). Made while the
/// table was empty, a join plan scans every row of the namespace on each lookup once the
/// table has grown. The lookup must stay a primary-key lookup per id: the heap rows it
/// reads are the ids it was asked about, however many rows the table holds.
#[tokio::test]
async fn ledger_lookup_stays_a_key_lookup_after_the_table_grows_under_a_cached_plan() {
    use exactly_once::guard::ledger;
    use exactly_once::{EventId, Namespace};

    let env = TestEnv::new().await;
    let ns = Namespace::new(NS).unwrap();
    let ids: Vec<EventId> = ["grow-1", "grow-19999", "absent"].iter().map(|s| EventId::new(*s).unwrap()).collect();
    let refs: Vec<&EventId> = ids.iter().collect();
    let mut conn = env.pg().acquire().await.unwrap();
    // Planned and cached on this connection while the table is empty.
    assert!(ledger::lookup(&mut conn, &ns, &refs).await.unwrap().is_empty());
    sqlx::query(
        "INSERT INTO processed_events (namespace, event_id, status, payload_hash)
         SELECT $1, 'grow-' || g, 'processed', '\\x00' FROM generate_series(1, 20000) g",
    )
    .bind(NS)
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query("BEGIN").execute(&mut *conn).await.unwrap();
    let found = ledger::lookup(&mut conn, &ns, &refs).await.unwrap();
    let (seq_read, idx_fetched): (i64, i64) = sqlx::query_as(
        "SELECT pg_stat_get_xact_tuples_returned('processed_events'::regclass)
                - pg_stat_get_xact_tuples_fetched('processed_events'::regclass),
                pg_stat_get_xact_tuples_fetched('processed_events'::regclass)",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    assert_eq!(found.len(), 2, "both stored ids found: {found:?}");
    assert!(found.contains_key("grow-1") && found.contains_key("grow-19999"));
    assert_eq!(seq_read, 0, "no sequential scan");
    assert!(idx_fetched <= 3, "read {idx_fetched} rows through the index for 3 ids: the plan scans the namespace");
}

/// A panic in a handler fails that event only, as a retryable attempt, and after its
/// attempts it is dead-lettered; the events around it are processed, their Postgres
/// effects committed, and the guard keeps working.
#[tokio::test]
async fn a_panicking_handler_fails_its_own_event_and_is_dead_lettered_after_its_attempts() {
    let env = TestEnv::new().await;
    create_effects_table(&env).await;
    let probe = Probe { panic_on: Some("h:p-2"), effect_tag: Some("panic-test"), ..Probe::default() };
    let g = guard(&env, &probe, GuardConfig { max_attempts: 2, ..GuardConfig::default() });
    let batch = [event("p-1", 0), event("p-2", 1), event("p-3", 2)];

    let first = g.run_batch(&probe, &batch, None).await;
    let outcomes: Vec<&Outcome> = first.outcomes.iter().map(|o| &o.outcome).collect();
    assert_eq!(outcomes[0], &Outcome::Processed);
    assert!(
        matches!(outcomes[1], Outcome::Failed { kind: FailureKind::Retryable, error, .. } if error.contains("handler panicked: probe panics on h:p-2")),
        "{first:?}"
    );
    assert_eq!(outcomes[2], &Outcome::Processed);
    assert_eq!(
        env.count("SELECT count(*) FROM effects").await,
        2,
        "the others' effects committed, not the panicking one's"
    );

    let second = g.run_batch(&probe, &batch, None).await;
    assert!(matches!(&second.outcomes[1].outcome, Outcome::DeadLettered { .. }), "{second:?}");
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE event_id = 'h:p-2'").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM effects").await, 2);
}

/// A handler whose own Postgres statement fails and who carries on as if it had not
/// (the error swallowed) fails that event alone; the rest of the batch commits. Before,
/// the refused `RELEASE SAVEPOINT` failed the whole batch as `Unavailable`, forever.
#[tokio::test]
async fn a_handler_that_swallows_a_postgres_error_fails_only_its_own_event() {
    let env = TestEnv::new().await;
    create_effects_table(&env).await;

    struct Swallower;
    #[async_trait]
    impl Handler for Swallower {
        fn spec(&self) -> FunctionSpec {
            probe_spec()
        }
        async fn handle(&self, _event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
            let id = write_effect(ctx, "swallower").await?;
            if id == "h:s-2" {
                // Fails (no such table); the handler ignores it.
                let _ = sqlx::query("INSERT INTO no_such_table VALUES (1)").execute(ctx.postgres().await?).await;
            }
            Ok(())
        }
    }
    let g = Guard::new(&env.clients, NS, Swallower.spec().id_strategy, GuardConfig::default()).unwrap();
    let batch = [event("s-1", 0), event("s-2", 1), event("s-3", 2)];
    let report = g.run_batch(&Swallower, &batch, None).await;
    assert_eq!(report.outcomes[0].outcome, Outcome::Processed, "{report:?}");
    assert!(
        matches!(&report.outcomes[1].outcome, Outcome::Failed { kind: FailureKind::Retryable, error, .. } if error.contains("handler went on")),
        "{report:?}"
    );
    assert_eq!(report.outcomes[2].outcome, Outcome::Processed, "{report:?}");
    assert_eq!(env.count("SELECT count(*) FROM effects WHERE event_id IN ('h:s-1', 'h:s-3')").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM effects WHERE event_id = 'h:s-2'").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM event_attempts WHERE event_id = 'h:s-2'").await, 1, "attempt counted");
}

#[derive(exactly_once::clickhouse::Row, serde::Serialize)]
#[clickhouse(crate = "exactly_once::clickhouse")]
struct DatedRow {
    id: String,
    d: String,
}

#[derive(exactly_once::clickhouse::Row, serde::Serialize)]
#[clickhouse(crate = "exactly_once::clickhouse")]
struct OtherRow {
    id: String,
}

const DATED: &str = "dated_rows";

/// Stages one `DatedRow` per event (its `d` is the record key), or, for the event
/// `other_type`, a row of another type into the same table; writes a Postgres effect
/// first when `effect` is set.
struct Dated {
    effect: bool,
    other_type: Option<&'static str>,
}

#[async_trait]
impl Handler for Dated {
    fn spec(&self) -> FunctionSpec {
        probe_spec()
    }
    async fn handle(&self, event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        let id = if self.effect { write_effect(ctx, "dated").await? } else { ctx.event_id().to_string() };
        if self.other_type == Some(id.as_str()) {
            return ctx.clickhouse(DATED, OtherRow { id });
        }
        let d = String::from_utf8_lossy(event.key.as_deref().unwrap_or_default()).into_owned();
        ctx.clickhouse(DATED, DatedRow { id, d })
    }
}

/// ClickHouse parses `d` into a Date on insert: a row whose `d` is not a date is
/// rejected by the server, which says so (code 6, CANNOT_PARSE_TEXT), while it is up and answering.
async fn create_dated_table(env: &TestEnv) {
    env.clients
        .sink
        .apply_ddl(&format!(
            "CREATE TABLE {DATED} (id String, d String, parsed Date MATERIALIZED toDate(d)) ENGINE = ReplacingMergeTree ORDER BY id"
        ))
        .await
        .expect("dated table");
}

fn dated(id: &str, offset: i64, d: &str) -> Event {
    let mut e = event(id, offset);
    e.key = Some(d.as_bytes().to_vec().into());
    e
}

/// A row ClickHouse rejects in the middle of a batch is traced to its event, which is
/// dead-lettered as `clickhouse_rejected`; the others land; the breaker never counts it.
/// Before, the whole batch failed as `Unavailable` on every retry and fed the breaker
/// until it opened for the whole process. Both paths: without a transaction
/// (ClickHouse-only handler) and with Postgres effects (rolled back for the rejected).
#[tokio::test]
async fn a_row_clickhouse_rejects_is_dead_lettered_alone_and_the_breaker_stays_closed() {
    for effect in [false, true] {
        let env = TestEnv::new().await;
        create_effects_table(&env).await;
        create_dated_table(&env).await;
        let handler = Dated { effect, other_type: None };
        let g = Guard::new(&env.clients, NS, handler.spec().id_strategy, GuardConfig::default()).unwrap();
        let batch: Vec<Event> =
            (0..7).map(|i| dated(&format!("d-{i}"), i, if i == 4 { "not a date" } else { "2026-11-23" })).collect();
        for round in 0..3 {
            let report = g.run_batch(&handler, &batch, None).await;
            for (i, o) in report.outcomes.iter().enumerate() {
                if i == 4 {
                    assert!(
                        matches!(&o.outcome, Outcome::DeadLettered { reason } if *reason == DeadLetterReason::ClickHouseRejected)
                            || (round > 0 && matches!(o.outcome, Outcome::Duplicate { .. })),
                        "effect={effect} round {round}: {report:?}"
                    );
                } else {
                    assert!(o.outcome.is_finished(), "effect={effect} round {round}: {report:?}");
                }
            }
        }
        assert_eq!(env.clients.sink.breaker().state(), BreakerState::Closed, "effect={effect}");
        assert_eq!(env.clickhouse_count(&format!("SELECT count() FROM {DATED} FINAL")).await, 6, "effect={effect}");
        assert_eq!(
            env.count("SELECT count(*) FROM dead_letters WHERE event_id = 'h:d-4' AND reason = 'clickhouse_rejected' ")
                .await,
            1,
            "effect={effect}"
        );
        assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE status = 'processed'").await, 6);
        let error: String = sqlx::query_scalar("SELECT error FROM dead_letters WHERE event_id = 'h:d-4'")
            .fetch_one(env.pg())
            .await
            .unwrap();
        assert!(
            error.contains("rejected the data (code 6)") && error.contains(DATED),
            "the reason names the server's answer: {error}"
        );
        let effects = if effect { 6 } else { 0 };
        assert_eq!(
            env.count("SELECT count(*) FROM effects").await,
            effects,
            "effect={effect}: the rejected one's rolled back"
        );
    }
}

/// Rows that cannot join the batch (another row type for the same table) fail their
/// event before its savepoint is released: its Postgres effects are rolled back with
/// it. Before, they were kept only after `RELEASE`, so the event was dead-lettered while
/// its effects committed with the batch.
#[tokio::test]
async fn an_event_whose_rows_cannot_be_staged_keeps_no_postgres_effects() {
    let env = TestEnv::new().await;
    create_effects_table(&env).await;
    create_dated_table(&env).await;
    let handler = Dated { effect: true, other_type: Some("h:o-1") };
    let g = Guard::new(&env.clients, NS, handler.spec().id_strategy, GuardConfig::default()).unwrap();
    let batch = [dated("o-0", 0, "2026-11-23"), dated("o-1", 1, "2026-11-23"), dated("o-2", 2, "2026-11-23")];
    let report = g.run_batch(&handler, &batch, None).await;
    assert_eq!(report.outcomes[0].outcome, Outcome::Processed, "{report:?}");
    assert!(
        matches!(&report.outcomes[1].outcome, Outcome::DeadLettered { reason } if reason.as_str() == "row_type"),
        "{report:?}"
    );
    assert_eq!(report.outcomes[2].outcome, Outcome::Processed, "{report:?}");
    assert_eq!(
        env.count("SELECT count(*) FROM effects WHERE event_id = 'h:o-1'").await,
        0,
        "dead-lettered, no effects"
    );
    assert_eq!(env.count("SELECT count(*) FROM effects").await, 2);
}

/// A batch of 150 events that all write to Postgres is confirmed in transactions of at
/// most 64 handler savepoints (Postgres caches 64 subtransactions per backend; past
/// that, every session's visibility checks go through `pg_subtrans`). Counted by the
/// top-level transaction id each effect was written in. Before, all 150 savepoints were
/// in one transaction.
#[tokio::test]
async fn a_transaction_holds_at_most_64_subtransactions_whatever_the_batch_size() {
    let env = TestEnv::new().await;
    sqlx::query(
        "CREATE TABLE effects (seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL, writer TEXT NOT NULL,
                               top_xact xid8 NOT NULL DEFAULT pg_current_xact_id())",
    )
    .execute(env.pg())
    .await
    .unwrap();
    let probe = Probe { effect_tag: Some("sub"), fail_first: AtomicU32::new(3), ..Probe::default() };
    let g = guard(&env, &probe, GuardConfig::default());
    assert_eq!(GuardConfig::default().max_subtransactions, 64);
    let batch: Vec<Event> = (0..150).map(|i| event(&format!("x-{i}"), i)).collect();
    let report = g.run_batch(&probe, &batch, None).await;
    let failed = report.outcomes.iter().filter(|o| !o.outcome.is_finished()).count();
    assert_eq!(failed, 3, "the three failing handlers fail alone: {:?}", &report.outcomes[..4]);
    let report = g.run_batch(&probe, &batch, None).await;
    assert!(report.outcomes.iter().all(|o| o.outcome.is_finished()), "{report:?}");

    let per_tx: Vec<i64> = sqlx::query_scalar("SELECT count(*) FROM effects GROUP BY top_xact ORDER BY count(*) DESC")
        .fetch_all(env.pg())
        .await
        .unwrap();
    assert!(per_tx[0] <= 64, "a transaction held {} handler savepoints: {per_tx:?}", per_tx[0]);
    assert!(per_tx.len() >= 3, "150 events need at least 3 transactions: {per_tx:?}");
    assert_eq!(per_tx.iter().sum::<i64>(), 150, "every effect exactly once");
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 150);
}

/// A consumer whose lease expired while its handler ran must not count the failure or
/// dead-letter the event: another consumer holds it now and succeeds. Before, the first
/// consumer's permanent failure dead-lettered the event and the holder's confirm lost.
#[tokio::test]
async fn only_the_lease_holder_dead_letters_an_event() {
    let env = TestEnv::new().await;
    create_effects_table(&env).await;
    let config = GuardConfig { lease_ttl: Duration::from_millis(300), ..GuardConfig::default() };

    let a_entered = Arc::new(Notify::new());
    let a_gate = Arc::new(Semaphore::new(0));
    let failing = Arc::new(Probe {
        fail_permanently: true,
        entered: Some(a_entered.clone()),
        gate: Some(a_gate.clone()),
        ..Default::default()
    });
    let a = Arc::new(guard(&env, &failing, config.clone()));
    let a_run = {
        let (a, h) = (a.clone(), failing.clone());
        tokio::spawn(async move { a.run_batch(&*h, &[event("held", 3)], None).await })
    };
    a_entered.notified().await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // B takes the expired lease and is still handling when A's failure comes back.
    let b_entered = Arc::new(Notify::new());
    let b_gate = Arc::new(Semaphore::new(0));
    let healthy = Arc::new(Probe {
        effect_tag: Some("B"),
        entered: Some(b_entered.clone()),
        gate: Some(b_gate.clone()),
        ..Default::default()
    });
    let b = Arc::new(guard(&env, &healthy, config));
    let b_run = {
        let (b, h) = (b.clone(), healthy.clone());
        tokio::spawn(async move { b.run_batch(&*h, &[event("held", 3)], None).await })
    };
    b_entered.notified().await;
    a_gate.add_permits(1);
    let a_report = a_run.await.unwrap();
    assert_eq!(only(&a_report), &Outcome::InFlight, "A lost its lease: {a_report:?}");
    b_gate.add_permits(1);
    let b_report = b_run.await.unwrap();
    assert_eq!(only(&b_report), &Outcome::Processed, "{b_report:?}");
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM event_attempts").await, 0, "A's failure not counted");
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE status = 'processed'").await, 1);
}

fn with_id_format(setting: &str) -> GuardConfig {
    GuardConfig { id_format: setting.parse().expect("an id format"), ..GuardConfig::default() }
}

/// An upgrade from v1 ids: events confirmed by the earlier version (untagged ids) must
/// stay duplicates for processes on the new version, from Postgres alone (Redis markers
/// lost), until retention removes them; only then does `auto` move on to v2.
#[tokio::test]
async fn events_confirmed_under_v1_ids_stay_duplicates_through_the_transition_to_v2() {
    let env = TestEnv::new().await;
    let probe = Probe::default();
    let old = guard(&env, &probe, with_id_format("v1"));
    let first = old.run_batch(&probe, &[event("e-1", 0), event("e-2", 1)], None).await;
    assert!(first.outcomes.iter().all(|o| o.outcome == Outcome::Processed), "{first:?}");
    assert_eq!(
        env.count("SELECT count(*) FROM processed_events WHERE event_id IN ('e-1', 'e-2') AND NOT v2_known").await,
        2,
        "v1 rows are written untagged and marked as not known by their v2 ids"
    );
    env.flush_redis().await;

    // The new version in `auto` sees the v1-only rows and runs the transition.
    let new = guard(&env, &probe, GuardConfig::default());
    let again = new.run_batch(&probe, &[event("e-1", 2), event("e-2", 3), event("e-3", 4)], None).await;
    assert_eq!(new.id_formats(), exactly_once::event_id::IdFormats::V1AndV2);
    let outcomes: Vec<&Outcome> = again.outcomes.iter().map(|o| &o.outcome).collect();
    assert!(
        matches!(
            outcomes[..],
            [
                Outcome::Duplicate { tier: DuplicateTier::Postgres, .. },
                Outcome::Duplicate { tier: DuplicateTier::Postgres, .. },
                Outcome::Processed
            ]
        ),
        "{outcomes:?}"
    );
    assert_eq!(probe.calls.load(Ordering::SeqCst), 3, "e-1 and e-2 were not handled again");
    // e-3, confirmed in the transition, is known by both ids.
    assert_eq!(
        env.count("SELECT count(*) FROM processed_events WHERE event_id IN ('e-3', 'h:e-3') AND v2_known").await,
        2
    );

    // Retention removes the v1-only rows: `auto` moves to v2 on its next check, and the
    // event confirmed in the transition is still a duplicate there.
    sqlx::query("DELETE FROM processed_events WHERE NOT v2_known").execute(env.pg()).await.unwrap();
    env.flush_redis().await;
    let later = guard(&env, &probe, GuardConfig::default());
    assert_eq!(later.refresh_id_formats().await.unwrap(), exactly_once::event_id::IdFormats::V2);
    let third = later.run_batch(&probe, &[event("e-3", 5), event("e-4", 6)], None).await;
    let outcomes: Vec<&Outcome> = third.outcomes.iter().map(|o| &o.outcome).collect();
    assert!(
        matches!(outcomes[..], [Outcome::Duplicate { tier: DuplicateTier::Postgres, .. }, Outcome::Processed]),
        "{outcomes:?}"
    );
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE event_id IN ('e-4', 'h:e-4')").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE event_id = 'h:e-4' AND v2_known").await, 1);

    // A process of the earlier version confirming again makes `auto` go back to the
    // transition at its next check: the two fence each other only there.
    old.run_batch(&probe, &[event("e-5", 7)], None).await;
    assert_eq!(later.refresh_id_formats().await.unwrap(), exactly_once::event_id::IdFormats::V1AndV2);
}

/// During a rolling deploy processes on v1, on the transition and on v2 run side by
/// side: the transition shares the v1 id with the first and the v2 id with the last, so
/// an event is handled once whichever of them sees it, in the ledger and in the leases.
#[tokio::test]
async fn processes_on_different_id_formats_fence_each_other_in_the_ledger() {
    let env = TestEnv::new().await;
    let probe = Probe::default();
    let v1 = guard(&env, &probe, with_id_format("v1"));
    let both = guard(&env, &probe, with_id_format("v1+v2"));
    let v2 = guard(&env, &probe, with_id_format("v2"));

    assert_eq!(only(&v1.run_batch(&probe, &[event("a", 0)], None).await), &Outcome::Processed);
    assert_eq!(only(&v2.run_batch(&probe, &[event("b", 1)], None).await), &Outcome::Processed);
    env.flush_redis().await;
    // The transition knows both: "a" by its v1 id, "b" by its v2 id.
    let seen = both.run_batch(&probe, &[event("a", 2), event("b", 3), event("c", 4)], None).await;
    let outcomes: Vec<&Outcome> = seen.outcomes.iter().map(|o| &o.outcome).collect();
    assert!(
        matches!(
            outcomes[..],
            [
                Outcome::Duplicate { tier: DuplicateTier::Postgres, .. },
                Outcome::Duplicate { tier: DuplicateTier::Postgres, .. },
                Outcome::Processed
            ]
        ),
        "{outcomes:?}"
    );
    env.flush_redis().await;
    // And what it confirmed is a duplicate for both sides.
    for (g, offset) in [(&v1, 5), (&v2, 6)] {
        let r = g.run_batch(&probe, &[event("c", offset)], None).await;
        assert!(matches!(only(&r), Outcome::Duplicate { tier: DuplicateTier::Postgres, .. }), "{r:?}");
    }
    assert_eq!(probe.calls.load(Ordering::SeqCst), 3);

    // Leases: while the transition handles "d", a v2 process finds it in flight.
    let entered = Arc::new(Notify::new());
    let gate = Arc::new(Semaphore::new(0));
    let slow = Arc::new(Probe { entered: Some(entered.clone()), gate: Some(gate.clone()), ..Probe::default() });
    let both = Arc::new(guard(&env, &slow, with_id_format("v1+v2")));
    let running = {
        let (both, slow) = (both.clone(), slow.clone());
        tokio::spawn(async move { both.run_batch(slow.as_ref(), &[event("d", 7)], None).await })
    };
    entered.notified().await;
    let contended = v2.run_batch(&probe, &[event("d", 8)], None).await;
    assert_eq!(only(&contended), &Outcome::InFlight);
    gate.add_permits(1);
    assert_eq!(only(&running.await.unwrap()), &Outcome::Processed);
    let after = v2.run_batch(&probe, &[event("d", 9)], None).await;
    assert!(matches!(only(&after), Outcome::Duplicate { .. }), "{after:?}");
    assert_eq!(probe.calls.load(Ordering::SeqCst), 3, "the v2 process never handled d");
}

/// v1 ids of different kinds could be equal: a header `42` and a position-derived id are
/// different events, and so are composites whose fields contain `:`. Under v2 each is
/// handled.
#[tokio::test]
async fn ids_of_different_kinds_never_collide_under_v2() {
    let env = TestEnv::new().await;
    let composite = Probe {
        ids: Some(IdStrategy::FirstOf(vec![
            IdStrategy::Header("idempotency_key".into()),
            IdStrategy::Composite(vec!["/a".into(), "/b".into()]),
        ])),
        ..Probe::default()
    };
    let g = guard(&env, &composite, with_id_format("v2"));
    let header = event("x:y:z", 0);
    let fields = |offset, a: &str, b: &str| {
        Event::new("probe", 0, offset).with_value(serde_json::json!({"a": a, "b": b}).to_string().into_bytes())
    };
    // v1 would file all three under `x:y:z`.
    let report = g.run_batch(&composite, &[header, fields(1, "x:y", "z"), fields(2, "x", "y:z")], None).await;
    assert!(report.outcomes.iter().all(|o| o.outcome == Outcome::Processed), "{report:?}");
    assert_eq!(composite.calls.load(Ordering::SeqCst), 3);
    let v1 = guard(&env, &composite, with_id_format("v1"));
    env.flush_redis().await;
    let report = v1.run_batch(&composite, &[fields(3, "x", "y:z")], None).await;
    // (In v1 that id was never confirmed: the v2 rows are tagged; the point is v2.)
    assert_eq!(only(&report), &Outcome::Processed);
    let again = v1.run_batch(&composite, &[fields(4, "x:y", "z")], None).await;
    assert!(matches!(only(&again), Outcome::Duplicate { .. }), "v1 takes another event for a duplicate: {again:?}");
}

/// `auto` must not write ids in a format it guessed: until the ledger has answered once,
/// batches handle nothing (unavailable, retried) instead of going on in the transition
/// and switching to v2 a moment later (the rows ClickHouse collapses by id would then
/// be written under two ids). Once answered, a failed recheck keeps the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_id_format_handles_nothing_until_the_ledger_answers() {
    let proxy = ToggleProxy::start("127.0.0.1:5432").await;
    let addr = proxy.addr.to_string();
    let env = TestEnv::with(|c| {
        let url = c.postgres.url.expose().replace("127.0.0.1:5432", &addr).replace("localhost:5432", &addr);
        c.postgres.url = exactly_once::config::Secret::new(url);
        c.postgres.connect_timeout = Duration::from_secs(1);
    })
    .await;
    assert!(env.clients.config.postgres.url.expose().contains(&addr), "Postgres goes through the proxy");
    let probe = Probe::default();
    let config = GuardConfig { id_format_recheck: Duration::from_secs(1), ..GuardConfig::default() };
    let g = guard(&env, &probe, config);

    proxy.take_down().await;
    let report = g.run_batch(&probe, &[event("u-1", 0)], None).await;
    assert!(
        matches!(only(&report), Outcome::Failed { kind: FailureKind::Unavailable, error, .. } if error.contains("id format")),
        "{report:?}"
    );
    assert_eq!(probe.calls.load(Ordering::SeqCst), 0, "nothing handled in a guessed format");

    proxy.bring_up();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let report = g.run_batch(&probe, &[event("u-1", 1)], None).await;
    assert_eq!(only(&report), &Outcome::Processed);
    assert_eq!(g.id_formats(), exactly_once::event_id::IdFormats::V2);
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE event_id = 'h:u-1'").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 1, "one id, one row");

    // Decided: a recheck that fails keeps v2 (the batch itself fails on Postgres, not on
    // the format), and no batch runs in the transition afterwards.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    proxy.take_down().await;
    let report = g.run_batch(&probe, &[event("u-2", 2)], None).await;
    assert!(
        matches!(only(&report), Outcome::Failed { kind: FailureKind::Unavailable, error, .. } if !error.contains("id format")),
        "{report:?}"
    );
    assert_eq!(g.id_formats(), exactly_once::event_id::IdFormats::V2);
    proxy.bring_up();
    let report = g.run_batch(&probe, &[event("u-2", 3)], None).await;
    assert_eq!(only(&report), &Outcome::Processed);
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 2);
}

/// The worker's way: a finished batch answers before its release step; the flush waits
/// for it, and then the done marker is set and the lease gone, in the same two Redis
/// round trips as an inline release.
#[tokio::test]
async fn deferred_release_goes_out_after_the_answer_and_the_flush_waits_for_it() {
    let env = TestEnv::new().await;
    let probe = Probe::default();
    let g = guard(&env, &probe, GuardConfig::default());
    let report = g.run_batch_deferring_release(&probe, &[event("e-deferred", 0)]).await;
    assert_eq!(only(&report), &Outcome::Processed);
    g.flush_releases().await;
    let ns = exactly_once::Namespace::new(NS).unwrap();
    let id = exactly_once::EventId::new("h:e-deferred").unwrap();
    let (lease, marker) = env.clients.leases.inspect(&ns, &id).await.unwrap();
    assert!(marker.is_some(), "done marker set");
    assert!(lease.is_none(), "lease released");
    assert_eq!(g.round_trips().redis(), 2, "lease step and release step");
    assert_eq!(g.round_trips().postgres(), 2, "durable check and confirm");
}

/// A batch with a failure releases before it answers, so the retry that follows at
/// once never meets its own lease; `GUARD_DEFERRED_RELEASES=0` turns deferral off.
#[tokio::test]
async fn a_failed_batch_or_no_deferral_releases_before_answering() {
    let env = TestEnv::new().await;
    let ns = exactly_once::Namespace::new(NS).unwrap();
    let lease = |id: &str| env.clients.leases.key(&ns, &exactly_once::EventId::new(id).unwrap());

    let failing = Probe { fail_first: AtomicU32::new(1), ..Default::default() };
    let g = guard(&env, &failing, GuardConfig::default());
    let report = g.run_batch_deferring_release(&failing, &[event("e-def-fail", 0)]).await;
    assert!(matches!(only(&report), Outcome::Failed { kind: FailureKind::Retryable, .. }), "{report:?}");
    // No flush: the release went out before the answer.
    assert!(!env.redis_exists(&lease("h:e-def-fail")).await, "lease released before the answer");
    let retry = g.run_batch_deferring_release(&failing, &[event("e-def-fail", 0)]).await;
    assert_eq!(only(&retry), &Outcome::Processed, "the retry is not blocked by our own lease");

    let probe = Probe::default();
    let inline = guard(&env, &probe, GuardConfig { deferred_releases: 0, ..GuardConfig::default() });
    let report = inline.run_batch_deferring_release(&probe, &[event("e-def-off", 1)]).await;
    assert_eq!(only(&report), &Outcome::Processed);
    let (lease, marker) =
        env.clients.leases.inspect(&ns, &exactly_once::EventId::new("h:e-def-off").unwrap()).await.unwrap();
    assert!(marker.is_some(), "marker set before the answer");
    assert!(lease.is_none(), "lease released before the answer");
}

/// A lease still held over an id the ledger has confirmed (its holder committed; its
/// release has not landed): a duplicate by the durable check, not an event in flight.
/// A lease held over an id not confirmed stays in flight.
#[tokio::test]
async fn a_busy_lease_over_a_confirmed_id_is_a_duplicate() {
    let env = TestEnv::new().await;
    let probe = Probe::default();
    let no_cache = GuardConfig { local_cache_ttl: Duration::ZERO, ..GuardConfig::default() };
    let first = guard(&env, &probe, no_cache.clone());
    assert_eq!(only(&first.run_batch(&probe, &[event("e-busy-done", 0)], None).await), &Outcome::Processed);

    // Another consumer's lease on it, and no done marker (its release still on the way).
    let ns = exactly_once::Namespace::new(NS).unwrap();
    let mut c = env.redis().await;
    for id in ["h:e-busy-done", "h:e-busy-open"] {
        let id = exactly_once::EventId::new(id).unwrap();
        // (The lease takes the key the marker held.)
        let _: () = redis::cmd("SET")
            .arg(env.clients.leases.key(&ns, &id))
            .arg("someone-else")
            .arg("PX")
            .arg(30_000)
            .query_async(&mut c)
            .await
            .unwrap();
    }

    let second = guard(&env, &probe, no_cache);
    let report = second.run_batch(&probe, &[event("e-busy-done", 0), event("e-busy-open", 1)], None).await;
    assert!(
        matches!(report.outcomes[0].outcome, Outcome::Duplicate { tier: DuplicateTier::Postgres, .. }),
        "{report:?}"
    );
    assert_eq!(report.outcomes[1].outcome, Outcome::InFlight, "{report:?}");
    assert_eq!(probe.calls.load(Ordering::SeqCst), 1, "the handler ran once, for the first guard");
    // The release left both keys alone: they were never ours.
    for id in ["h:e-busy-done", "h:e-busy-open"] {
        let (lease, marker) = env.clients.leases.inspect(&ns, &exactly_once::EventId::new(id).unwrap()).await.unwrap();
        assert_eq!((lease.map(|l| l.0), marker), (Some("someone-else".to_owned()), None), "{id}");
    }
}

/// A confirmed event's marker is written over a lease another consumer took after ours
/// lapsed (the event is in the ledger: that consumer's confirm finds a duplicate); an
/// event that failed leaves the other consumer's lease alone; a marker is never taken by
/// a lease, and `forget` deletes a marker but never a lease. With the lease step as
/// plain `SET NX GET` commands, which the project's Redis (7.0) takes.
#[tokio::test]
async fn a_confirmed_events_marker_replaces_a_lapsed_lease_and_nothing_else_does() {
    let env = TestEnv::new().await;
    assert_eq!(env.clients.leases.calls(), Calls::Commands, "Redis 7.0 takes SET with NX and GET");
    markers_and_leases(&env, &env.clients.leases).await;
}

/// The same with leases and markers by script, as on Redis Cluster or a server before
/// Redis 7.0: both forms must answer alike.
#[tokio::test]
async fn the_scripts_answer_as_the_commands_do() {
    let env = TestEnv::new().await;
    let leases = Leases::connect(
        env.clients.redis.clone(),
        &env.key_prefix,
        env.clients.leases.buckets(),
        env.clients.leases.breaker().clone(),
    )
    .await
    .unwrap();
    leases.set_calls(Calls::Scripts);
    markers_and_leases(&env, &leases).await;
}

async fn markers_and_leases(env: &TestEnv, leases: &Leases) {
    let ns = exactly_once::Namespace::new(NS).unwrap();
    let id = |i: &str| exactly_once::EventId::new(i).unwrap();
    let ttl = Duration::from_secs(30);
    // Ours on both, then both lapse and another consumer takes them.
    let ours = leases.acquire(&ns, &[&id("h:m-done"), &id("h:m-failed")], "ours", ttl).await.unwrap();
    assert_eq!(ours, [LeaseReply::Acquired, LeaseReply::Acquired]);
    let (lease, marker) = leases.inspect(&ns, &id("h:m-done")).await.unwrap();
    let (token, left) = lease.expect("a lease");
    assert_eq!((token.as_str(), marker), ("ours", None));
    assert!(left > 20_000 && left <= 30_000, "the lease has the TTL asked for: {left} ms left");
    let mut c = env.redis().await;
    for i in ["h:m-done", "h:m-failed"] {
        let _: () = redis::cmd("SET")
            .arg(leases.key(&ns, &id(i)))
            .arg("theirs")
            .arg("PX")
            .arg(30_000)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    // Someone else's lease is busy, and stays theirs.
    assert_eq!(leases.acquire(&ns, &[&id("h:m-failed")], "ours", ttl).await.unwrap(), [LeaseReply::Busy]);
    let hash = exactly_once::PayloadHash([7; 32]);
    let released = leases
        .release(
            &ns,
            &[Release { id: &id("h:m-done"), done: Some(hash) }, Release { id: &id("h:m-failed"), done: None }],
            "ours",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(released, 1, "one marker written, no lease of ours left to free");
    assert_eq!(leases.inspect(&ns, &id("h:m-done")).await.unwrap(), (None, Some(hash.to_hex())));
    assert_eq!(leases.inspect(&ns, &id("h:m-failed")).await.unwrap().0.map(|l| l.0), Some("theirs".to_owned()));
    // Acquiring over the marker answers done with its hash; a marker without a hash is
    // still done.
    let again = leases.acquire(&ns, &[&id("h:m-done")], "third", ttl).await.unwrap();
    assert_eq!(again, [LeaseReply::Done(Some(hash))]);
    let _: () = redis::cmd("SET").arg(leases.key(&ns, &id("h:m-bare"))).arg("done:").query_async(&mut c).await.unwrap();
    assert_eq!(leases.acquire(&ns, &[&id("h:m-bare")], "third", ttl).await.unwrap(), [LeaseReply::Done(None)]);
    // Our own lease, asked for again (a resent call), is still ours.
    let mine = leases.acquire(&ns, &[&id("h:m-mine")], "ours", ttl).await.unwrap();
    assert_eq!(leases.acquire(&ns, &[&id("h:m-mine")], "ours", ttl).await.unwrap(), mine);
    // One call mixing every case answers each id in its place.
    let mixed = [&id("h:m-new"), &id("h:m-done"), &id("h:m-failed"), &id("h:m-mine"), &id("h:m-bare")];
    assert_eq!(
        leases.acquire(&ns, &mixed, "ours", ttl).await.unwrap(),
        [
            LeaseReply::Acquired,
            LeaseReply::Done(Some(hash)),
            LeaseReply::Busy,
            LeaseReply::Acquired,
            LeaseReply::Done(None),
        ]
    );
    // A release frees our leases and writes markers in one call; a key that is no
    // lease of ours (a marker) is left as it is.
    let released = leases
        .release(
            &ns,
            &[
                Release { id: &id("h:m-new"), done: None },
                Release { id: &id("h:m-mine"), done: Some(hash) },
                Release { id: &id("h:m-bare"), done: None },
            ],
            "ours",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(released, 2, "h:m-new freed, h:m-mine marked");
    assert_eq!(leases.inspect(&ns, &id("h:m-new")).await.unwrap(), (None, None));
    assert_eq!(leases.inspect(&ns, &id("h:m-mine")).await.unwrap(), (None, Some(hash.to_hex())));
    assert_eq!(leases.inspect(&ns, &id("h:m-bare")).await.unwrap(), (None, Some(String::new())));
    // forget: the marker goes, the lease stays.
    leases.forget(&ns, &id("h:m-done")).await.unwrap();
    leases.forget(&ns, &id("h:m-failed")).await.unwrap();
    assert!(!env.redis_exists(&leases.key(&ns, &id("h:m-done"))).await);
    assert!(env.redis_exists(&leases.key(&ns, &id("h:m-failed"))).await);
    // A key of another type fails the step (no lease information), never reads as free
    // or busy.
    let _: () =
        redis::cmd("HSET").arg(leases.key(&ns, &id("h:m-hash"))).arg("f").arg("v").query_async(&mut c).await.unwrap();
    let err = leases.acquire(&ns, &[&id("h:m-x"), &id("h:m-hash")], "ours", ttl).await.unwrap_err();
    assert!(err.to_string().contains("WRONGTYPE"), "{err}");
}

/// The confirm statement names exactly the ids someone else confirmed first (and nothing
/// when there are none), stores each row's own position whether the batch holds one
/// partition (topic and partition sent once) or several (a Lambda batch), and clears the
/// failure counters of what it confirms, counting the attempts.
#[tokio::test]
async fn the_confirm_names_only_ids_confirmed_elsewhere_and_keeps_each_rows_position() {
    use exactly_once::guard::ledger::{self, ConfirmRow};
    use exactly_once::{EventId, Namespace};

    let env = TestEnv::new().await;
    let ns = Namespace::new(NS).unwrap();
    let mut conn = env.pg().acquire().await.unwrap();
    async fn confirm(conn: &mut sqlx::PgConnection, ns: &Namespace, events: &[Event]) -> Vec<String> {
        let ids: Vec<EventId> = events.iter().map(|e| EventId::new(e.offset.to_string()).unwrap()).collect();
        let rows: Vec<ConfirmRow<'_>> =
            events.iter().zip(&ids).map(|(event, id)| ConfirmRow { id, event, hash: event.payload_hash() }).collect();
        let mut taken = ledger::confirm(conn, ns, &rows, true).await.unwrap();
        taken.sort();
        taken
    }

    assert!(confirm(&mut conn, &ns, &[]).await.is_empty());
    // Offsets double as ids. 12 and 15 are confirmed first; 13 has failed twice.
    let first: Vec<Event> = [12, 15].iter().map(|&o| user_event("t-one", 4, o, "x", "u")).collect();
    assert!(confirm(&mut conn, &ns, &first).await.is_empty(), "nothing confirmed before");
    sqlx::query("INSERT INTO event_attempts (namespace, event_id, attempts, last_error) VALUES ($1, '13', 2, 'boom')")
        .bind(NS)
        .execute(&mut *conn)
        .await
        .unwrap();

    let one: Vec<Event> = (10..16).map(|o| user_event("t-one", 4, o, "x", "u")).collect();
    assert_eq!(confirm(&mut conn, &ns, &one).await, vec!["12".to_string(), "15".to_string()]);
    // Several partitions in one batch, one of its ids confirmed before.
    let many = vec![
        user_event("t-a", 0, 20, "x", "u"),
        user_event("t-b", 3, 21, "x", "u"),
        user_event("t-a", 1, 10, "x", "u"),
        user_event("t-b", 3, 22, "x", "u"),
    ];
    assert_eq!(confirm(&mut conn, &ns, &many).await, vec!["10".to_string()]);

    let stored: Vec<(String, String, i32, i64, i32)> = sqlx::query_as(
        "SELECT event_id, topic, kafka_partition, kafka_offset, attempts FROM processed_events
         WHERE namespace = $1 ORDER BY kafka_offset",
    )
    .bind(NS)
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let expected: Vec<(String, String, i32, i64, i32)> = [
        ("t-one", 4, 10, 1),
        ("t-one", 4, 11, 1),
        ("t-one", 4, 12, 1),
        ("t-one", 4, 13, 3),
        ("t-one", 4, 14, 1),
        ("t-one", 4, 15, 1),
        ("t-a", 0, 20, 1),
        ("t-b", 3, 21, 1),
        ("t-b", 3, 22, 1),
    ]
    .iter()
    .map(|&(t, p, o, a)| (o.to_string(), t.to_string(), p, o, a))
    .collect();
    assert_eq!(stored, expected);
    assert_eq!(env.count("SELECT count(*) FROM event_attempts").await, 0, "the counter of 13 is cleared");

    // Every id taken: all named (the count check passes nothing through by mistake).
    let all: Vec<String> = (10..16).map(|o: i64| o.to_string()).collect();
    assert_eq!(confirm(&mut conn, &ns, &one).await, all);
    // One event under two ids (the transition between id formats), one of them taken.
    let pair_event = user_event("t-one", 4, 30, "x", "u");
    let (v1, v2) = (EventId::new("pair-v1").unwrap(), EventId::new("pair-v2").unwrap());
    let rows = [ConfirmRow { id: &v1, event: &pair_event, hash: pair_event.payload_hash() }];
    assert!(ledger::confirm(&mut conn, &ns, &rows, true).await.unwrap().is_empty());
    let rows = [
        ConfirmRow { id: &v1, event: &pair_event, hash: pair_event.payload_hash() },
        ConfirmRow { id: &v2, event: &pair_event, hash: pair_event.payload_hash() },
    ];
    assert_eq!(ledger::confirm(&mut conn, &ns, &rows, true).await.unwrap(), vec!["pair-v1".to_string()]);
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE event_id = 'pair-v2'").await, 1);
}
