//! The CDC and notifications functions and the outbox relay, against the real services.

use exactly_once::DeadLetterReason;
use exactly_once::OutcomeKind;
use std::sync::Arc;
use std::time::Duration;

use exactly_once::breaker::CircuitBreaker;
use exactly_once::config::{BreakerConfig, GuardConfig, ProcessEnv, RetentionConfig};
use exactly_once::metrics::metrics;
use exactly_once::outbox::{pending, Relay, RelayReport};
use exactly_once::BreakerState;
use exactly_once::{
    async_trait, DuplicateTier, Event, FunctionSpec, Guard, Handler, HandlerContext, HandlerError, Outcome,
};
use integration_tests::{idempotency_keys_on, queue_outbox, TestEnv};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};

fn change(offset: i64, op: &str, id: u64, lsn: u64, email: &str) -> Event {
    let image = json!({"id": id, "email": email});
    let (before, after) = if op == "d" { (image, json!(null)) } else { (json!(null), image) };
    let value = json!({"op": op, "before": before, "after": after, "source": {"table": "users", "lsn": lsn, "ts_ms": 1_700_000_000_000u64}});
    Event::new("cdc-changes", 0, offset).with_value(value.to_string())
}

#[tokio::test]
async fn cdc_replays_duplicates_and_late_changes_never_double_or_regress_a_row() {
    let env = TestEnv::new().await;
    env.clients.sink.apply_ddl(cdc::CLICKHOUSE_DDL).await.unwrap();
    let g = Guard::new(&env.clients, cdc::NAME, cdc::Cdc.spec().id_strategy, GuardConfig::default()).unwrap();
    let stream = vec![
        change(0, "c", 1, 100, "a@old"),
        change(1, "c", 2, 101, "b@old"),
        change(2, "u", 1, 102, "a@new"),
        change(3, "c", 1, 100, "a@old"), // the connector re-sends a change after a restart
        change(4, "d", 2, 103, "b@old"),
        change(5, "c", 3, 104, "c@x"),
    ];
    let r = g.run_batch(&cdc::Cdc, &stream, None).await;
    assert_eq!(r.count(OutcomeKind::Processed), 5);
    assert_eq!(r.count(OutcomeKind::Duplicate), 1);
    assert_eq!(
        r.outcomes[0].event_id.as_ref().unwrap().as_str(),
        "c:users:100:1",
        "id = source table, LSN and primary key"
    );

    // The whole stream again (a replay from an earlier offset), plus a late copy of an
    // old change under a fresh position: nothing doubles, nothing regresses.
    let again = Guard::new(&env.clients, cdc::NAME, cdc::Cdc.spec().id_strategy, GuardConfig::default()).unwrap();
    let mut replay = stream.clone();
    replay.push(change(6, "u", 1, 99, "a@ancient").with_header("idempotency_key", "late-copy"));
    let r = again.run_batch(&cdc::Cdc, &replay, None).await;
    assert_eq!(r.count(OutcomeKind::Duplicate), stream.len());

    let rows: Vec<String> = env
        .clients
        .sink
        .client()
        .query("SELECT concat(pk, ':', toString(op), ':', toString(is_deleted), ':', data) FROM cdc_rows FINAL ORDER BY pk")
        .fetch_all::<String>()
        .await
        .unwrap();
    assert_eq!(
        rows,
        [r#"1:u:0:{"email":"a@new","id":1}"#, r#"2:d:1:{"email":"b@old","id":2}"#, r#"3:c:0:{"email":"c@x","id":3}"#,]
    );
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE namespace = 'cdc'").await, 6);
}

/// A Debezium snapshot (`op: "r"`) reads every row of a table at one LSN, so the source
/// position alone does not tell its rows apart: the row's primary key is part of the id.
#[tokio::test]
async fn cdc_snapshot_rows_sharing_one_lsn_each_land_once() {
    let env = TestEnv::new().await;
    env.clients.sink.apply_ddl(cdc::CLICKHOUSE_DDL).await.unwrap();
    let g = Guard::new(&env.clients, cdc::NAME, cdc::Cdc.spec().id_strategy, GuardConfig::default()).unwrap();
    const ROWS: u64 = 300;
    let mut stream: Vec<Event> = (1..=ROWS).map(|id| change(id as i64, "r", id, 500, &format!("{id}@snap"))).collect();
    // Streamed changes after the snapshot.
    stream.push(change(301, "u", 5, 501, "5@new"));
    stream.push(change(302, "d", 6, 502, "6@snap"));
    stream.push(change(303, "c", ROWS + 1, 503, "new@row"));
    let mut processed = 0;
    for batch in stream.chunks(100) {
        let r = g.run_batch(&cdc::Cdc, batch, None).await;
        assert_eq!(
            r.count(OutcomeKind::Duplicate),
            0,
            "{:?}",
            r.outcomes.iter().find(|o| o.outcome != Outcome::Processed)
        );
        processed += r.count(OutcomeKind::Processed);
    }
    assert_eq!(processed, stream.len());

    // The connector re-sends a streamed change and a snapshot row (new offsets): both
    // are duplicates.
    let resent = [change(304, "u", 5, 501, "5@new"), change(305, "r", 7, 500, "7@snap")];
    let r = g.run_batch(&cdc::Cdc, &resent, None).await;
    assert_eq!(r.count(OutcomeKind::Duplicate), 2, "{:?}", r.outcomes);

    let ledger = "SELECT count(*) FROM processed_events WHERE namespace = 'cdc'";
    assert_eq!(env.count(ledger).await, stream.len() as i64, "one ledger row per change");
    assert_eq!(env.clickhouse_count("SELECT count() FROM cdc_rows FINAL").await, ROWS + 1, "one row per source row");
    assert_eq!(env.clickhouse_count("SELECT uniqExact(pk) FROM cdc_rows FINAL").await, ROWS + 1);
    assert_eq!(env.clickhouse_count("SELECT count() FROM cdc_rows FINAL WHERE op = 'r'").await, ROWS - 2);
    assert_eq!(env.clickhouse_count("SELECT count() FROM cdc_rows FINAL WHERE pk = '5' AND op = 'u'").await, 1);
    assert_eq!(env.clickhouse_count("SELECT count() FROM cdc_rows FINAL WHERE pk = '6' AND is_deleted = 1").await, 1);
}

#[tokio::test]
async fn cdc_change_without_its_row_image_is_dead_lettered() {
    let env = TestEnv::new().await;
    env.clients.sink.apply_ddl(cdc::CLICKHOUSE_DDL).await.unwrap();
    let g = Guard::new(&env.clients, cdc::NAME, cdc::Cdc.spec().id_strategy, GuardConfig::default()).unwrap();
    // Two broken changes at one LSN: without a row image there is no primary key, so
    // they fall back to their positions; the handler refuses each, neither skipped as the
    // other's duplicate.
    let broken = |offset: i64| {
        Event::new("cdc-changes", 0, offset).with_value(
            json!({"op": "u", "before": null, "after": null, "source": {"table": "users", "lsn": 7}}).to_string(),
        )
    };
    // With an `idempotency_key` header it has an id, and the handler rejects it.
    let keyed = broken(2).with_header("idempotency_key", "k-2");
    let r = g.run_batch(&cdc::Cdc, &[broken(0), broken(1), keyed], None).await;
    for o in &r.outcomes {
        assert_eq!(o.outcome, Outcome::DeadLettered { reason: DeadLetterReason::Refused("payload_invalid") });
    }
    assert_eq!(
        env.count(
            "SELECT count(*) FROM dead_letters WHERE error LIKE '%without its row image%' AND event_id LIKE 'p:%'"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn a_debezium_tombstone_is_confirmed_and_writes_nothing() {
    let env = TestEnv::new().await;
    env.clients.sink.apply_ddl(cdc::CLICKHOUSE_DDL).await.unwrap();
    let g = Guard::new(&env.clients, cdc::NAME, cdc::Cdc.spec().id_strategy, GuardConfig::default()).unwrap();
    // A delete, then the tombstone Debezium sends after it (same key, null value).
    let delete = change(0, "d", 9, 70, "gone@example.com");
    let tombstone = Event::new("cdc-changes", 0, 1).with_key(r#"{"id":9}"#);
    let r = g.run_batch(&cdc::Cdc, &[delete, tombstone], None).await;
    assert!(r.outcomes.iter().all(|o| o.outcome == Outcome::Processed), "{r:?}");
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE event_id = 'p:cdc-changes-0-1'").await, 1);
    assert_eq!(env.clickhouse_count("SELECT count() FROM cdc_rows FINAL WHERE pk = '9' AND is_deleted = 1").await, 1);
}

#[test]
fn cdc_is_always_on() {
    let names: Vec<&str> = exactly_once_cli::all_functions().iter().map(|f| f.spec().name).collect();
    assert!(names.contains(&"cdc"), "{names:?}");
}

fn request(offset: i64, id: &str, user: &str) -> Event {
    Event::new("notification-requests", 0, offset)
        .with_header("idempotency_key", id.to_owned())
        .with_value(json!({"user_id": user, "channel": "email", "title": "Welcome", "body": "Hello"}).to_string())
}

#[tokio::test]
async fn a_notification_request_creates_one_row_and_one_outbox_message() {
    let env = TestEnv::new().await;
    let h = notifications::Notifications;
    let g = Guard::new(&env.clients, notifications::NAME, h.spec().id_strategy, GuardConfig::default()).unwrap();
    let r =
        g.run_batch(&h, &[request(0, "n-1", "ann"), request(1, "n-2", "ben"), request(2, "n-1", "ann")], None).await;
    assert_eq!(r.count(OutcomeKind::Processed), 2);
    let again = Guard::new(&env.clients, notifications::NAME, h.spec().id_strategy, GuardConfig::default()).unwrap();
    assert_eq!(again.run_batch(&h, &[request(0, "n-1", "ann")], None).await.count(OutcomeKind::Duplicate), 1);
    assert_eq!(env.count("SELECT count(*) FROM notifications").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM outbox WHERE topic = 'notifications-outbound'").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM outbox WHERE idempotency_key = 'h:n-1:0'").await, 1);
}

/// The real notifications handler, stalled after its insert the first time it runs.
struct Stalled {
    inner: notifications::Notifications,
    entered: Arc<Notify>,
    gate: Arc<Semaphore>,
    first: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl Handler for Stalled {
    fn spec(&self) -> FunctionSpec {
        self.inner.spec()
    }
    async fn handle(&self, event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        self.inner.handle(event, ctx).await?;
        if self.first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.entered.notify_one();
            let _permit = self.gate.acquire().await.unwrap();
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notification_is_never_created_twice_even_when_a_lease_expires_mid_handler() {
    let env = TestEnv::new().await;
    let config = GuardConfig { lease_ttl: Duration::from_millis(300), ..GuardConfig::default() };
    let stalled = Arc::new(Stalled {
        inner: notifications::Notifications,
        entered: Arc::new(Notify::new()),
        gate: Arc::new(Semaphore::new(0)),
        first: true.into(),
    });
    let spec = stalled.spec();
    let a = Arc::new(Guard::new(&env.clients, spec.name, spec.id_strategy.clone(), config.clone()).unwrap());
    let b = Arc::new(Guard::new(&env.clients, spec.name, spec.id_strategy.clone(), config).unwrap());

    let a_run = {
        let (a, h) = (a.clone(), stalled.clone());
        tokio::spawn(async move { a.run_batch(&*h, &[request(0, "once", "ann")], None).await })
    };
    stalled.entered.notified().await;
    tokio::time::sleep(Duration::from_millis(500)).await; // A's lease has expired

    // B takes the lease; its insert waits on A's uncommitted row.
    let b_run = {
        let (b, h) = (b.clone(), stalled.clone());
        tokio::spawn(async move { b.run_batch(&*h, &[request(0, "once", "ann")], None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b_run.is_finished(), "B is blocked behind A's uncommitted notification");
    stalled.gate.add_permits(1);

    let (ra, rb) = (a_run.await.unwrap(), b_run.await.unwrap());
    assert_eq!(ra.outcomes[0].outcome, Outcome::Processed);
    assert!(matches!(rb.outcomes[0].outcome, Outcome::Duplicate { tier: DuplicateTier::Confirm, .. }), "{rb:?}");
    assert_eq!(env.count("SELECT count(*) FROM notifications").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM outbox").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_outbox_waits_out_a_kafka_outage_and_publishes_when_the_breaker_closes() {
    let env = TestEnv::new().await;
    let h = notifications::Notifications;
    let g = Guard::new(&env.clients, notifications::NAME, h.spec().id_strategy, GuardConfig::default()).unwrap();
    let r = g.run_batch(&h, &[request(0, "o-1", "ann"), request(1, "o-2", "ben"), request(2, "o-3", "cy")], None).await;
    assert_eq!(r.count(OutcomeKind::Processed), 3);

    let breaker = Arc::new(CircuitBreaker::new(
        "kafka-test",
        BreakerConfig {
            failure_threshold: 2,
            open_for: Duration::from_secs(2),
            success_threshold: 1,
            half_open_max_calls: 1,
        },
    ));
    let mut down = env.kafka.clone();
    down.brokers = "127.0.0.1:1".into();
    down.produce_timeout = Duration::from_millis(500);
    let relay_down = Relay::new(env.pg().clone(), &down, breaker.clone()).unwrap();
    for _ in 0..2 {
        let report = relay_down.drain_once().await.unwrap();
        assert_eq!((report.published, report.failed), (0, 3));
    }
    assert!(relay_down.drain_once().await.unwrap().skipped, "the open breaker stops further attempts");
    assert_eq!(pending(env.pg()).await.unwrap(), 3, "messages wait durably in Postgres");

    // Kafka is back: nothing is sent until the breaker lets a probe through.
    let topic = env.kafka.topic(notifications::OUTBOUND_TOPIC);
    exactly_once::runtime::worker::create_topics(&env.kafka, std::slice::from_ref(&topic)).await.unwrap();
    let relay = Relay::new(env.pg().clone(), &env.kafka, breaker.clone()).unwrap();
    assert!(relay.drain_once().await.unwrap().skipped);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(relay.drain_once().await.unwrap().published, 3);
    assert_eq!(pending(env.pg()).await.unwrap(), 0);
    assert_eq!(breaker.state(), exactly_once::BreakerState::Closed);

    // The outage counted against Kafka (its breaker), never against the messages.
    assert_eq!(env.count("SELECT coalesce(max(rejections), 0)::bigint FROM outbox").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM outbox WHERE dead_lettered_at IS NOT NULL").await, 0);
    assert_eq!(idempotency_keys_on(&env.kafka, &topic, 3).await, ["h:o-1:0", "h:o-2:0", "h:o-3:0"]);
}

fn kafka_breaker() -> Arc<CircuitBreaker> {
    // The production thresholds: two failures open it.
    Arc::new(CircuitBreaker::new("kafka-outbox-test", BreakerConfig::from_env(&ProcessEnv, "KAFKA").unwrap()))
}

/// Larger than librdkafka's `message.max.bytes` (1,000,000 by default): refused for
/// this message alone, every time, while Kafka is healthy.
const TOO_LARGE: usize = 1_200_000;

/// Not a legal topic name: refused every time. (An unknown but legal name is no test
/// here: the local broker creates topics on first use, as MSK does when
/// `auto.create.topics.enable` is set.)
const INVALID_TOPIC: &str = "not a topic!";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_kafka_refuses_is_dead_lettered_after_its_attempts_while_the_others_flow_and_the_breaker_stays_closed(
) {
    let env = TestEnv::new().await;
    let function = env.schema.as_str(); // a namespace of its own, for the metrics
    let topic = "outbox-poison";
    let full_topic = env.kafka.topic(topic);
    exactly_once::runtime::worker::create_topics(&env.kafka, std::slice::from_ref(&full_topic)).await.unwrap();
    let pg = env.pg();
    queue_outbox(pg, function, topic, "good-1:0", b"{}").await;
    let poison = queue_outbox(pg, function, topic, "huge-1:0", &vec![b'x'; TOO_LARGE]).await;
    queue_outbox(pg, function, topic, "good-2:0", b"{}").await;
    let nowhere = queue_outbox(pg, function, INVALID_TOPIC, "nowhere-1:0", b"{}").await;

    let breaker = kafka_breaker();
    let mut kafka = env.kafka.clone();
    kafka.outbox_max_attempts = 4;
    let relay = Relay::new(pg.clone(), &kafka, breaker.clone()).unwrap();
    let dead = |reason: &str| metrics().outbox_dead_lettered.with_label_values(&[function, reason]).get();
    // librdkafka remembers the broker's "invalid topic" and answers later sends itself,
    // as an unknown topic: either is this message's fault alone.
    let nameless = || dead("invalid_topic") + dead("unknown_topic");
    let dead_before = (dead("message_too_large"), nameless());

    let first = relay.drain_once().await.unwrap();
    assert_eq!((first.published, first.failed, first.rejected, first.dead_lettered), (2, 2, 2, 0), "{first:?}");
    for attempt in 2..=3 {
        let r = relay.drain_once().await.unwrap();
        assert!(!r.skipped, "attempt {attempt}: a refused message never opens the Kafka breaker");
        assert_eq!((r.published, r.rejected, r.dead_lettered), (0, 2, 0), "attempt {attempt}: {r:?}");
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
    // A message queued meanwhile goes out past the refused ones.
    queue_outbox(pg, function, topic, "good-3:0", b"{}").await;
    let last = relay.drain_once().await.unwrap();
    assert_eq!((last.published, last.rejected, last.dead_lettered), (1, 2, 2), "the 4th refusal dead-letters them");
    assert_eq!(breaker.state(), BreakerState::Closed);
    assert_eq!(pending(pg).await.unwrap(), 0);
    assert_eq!(relay.drain_once().await.unwrap(), RelayReport::default(), "dead-lettered: no longer attempted");

    let row = sqlx::query_as::<_, (Option<String>, i32, bool, bool, String)>(
        "SELECT dead_letter_reason, rejections, dead_lettered_at IS NOT NULL, published_at IS NULL, last_error
         FROM outbox WHERE id = $1",
    )
    .bind(poison)
    .fetch_one(pg)
    .await
    .unwrap();
    assert_eq!((row.0.as_deref(), row.1, row.2, row.3), (Some("message_too_large"), 4, true, true), "{row:?}");
    assert!(row.4.contains("too large") || row.4.contains("TooLarge"), "the broker's words are kept: {}", row.4);
    assert_eq!((dead("message_too_large"), nameless()), (dead_before.0 + 1, dead_before.1 + 1));
    let reason: Option<String> = sqlx::query_scalar("SELECT dead_letter_reason FROM outbox WHERE id = $1")
        .bind(nowhere)
        .fetch_one(pg)
        .await
        .unwrap();
    assert!(matches!(reason.as_deref(), Some("invalid_topic" | "unknown_topic")), "{reason:?}");
    assert_eq!(idempotency_keys_on(&env.kafka, &full_topic, 3).await, ["good-1:0", "good-2:0", "good-3:0"]);

    // Operators see it, and can put it back in the queue once the cause is fixed.
    let listed = exactly_once_cli::ops::list_outbox_dead_letters(&env.clients, Some(function), 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    let d = &listed[0];
    assert_eq!((d.id, d.reason.as_str(), d.idempotency_key.as_str()), (poison, "message_too_large", "huge-1:0"));
    assert_eq!((d.rejections, d.payload_bytes), (4, TOO_LARGE as i64));
    let found = exactly_once_cli::ops::inspect(&env.clients, function, "huge-1").await.unwrap();
    assert!(found.render(function, "huge-1").contains("dead-lettered (message_too_large)"), "{found:?}");
    let good = poison + 1; // published: nothing to requeue
    let err = exactly_once_cli::ops::replay_outbox(&env.clients, &[poison, good]).await.unwrap_err();
    assert!(err.contains(&format!("#{good} ")) && err.contains(&format!("requeued: [#{poison}]")), "{err}");
    assert_eq!(pending(pg).await.unwrap(), 1, "requeued");
    let again = relay.drain_once().await.unwrap();
    assert_eq!((again.rejected, again.dead_lettered), (1, 0), "its refusals start again from zero");
}

#[tokio::test]
async fn pruning_deletes_published_outbox_messages_past_retention_and_nothing_else() {
    let env = TestEnv::new().await;
    let pg = env.pg();
    for (key, published, dead) in [
        ("old-1:0", Some("30 hours"), false),
        ("old-2:0", Some("3 days"), false),
        ("old-3:0", Some("25 hours"), false),
        ("recent:0", Some("23 hours"), false),
        ("queued:0", None, false),
        ("dead:0", None, true),
    ] {
        let id = queue_outbox(pg, "prune", "t", key, b"{}").await;
        // Everything was created long ago; only publication time decides.
        sqlx::query(
            "UPDATE outbox SET created_at = now() - interval '10 days',
                    published_at = now() - $2::interval,
                    dead_lettered_at = CASE WHEN $3 THEN now() - interval '10 days' END
             WHERE id = $1",
        )
        .bind(id)
        .bind(published)
        .bind(dead)
        .execute(pg)
        .await
        .unwrap();
    }
    sqlx::query("INSERT INTO processed_events (namespace, event_id, status) VALUES ('prune', 'kept', 'processed')")
        .execute(pg)
        .await
        .unwrap();
    let config = RetentionConfig {
        retention: Duration::from_secs(7 * 86_400),
        outbox_retention: Duration::from_secs(24 * 3_600),
        batch_size: 2,
        interval: Duration::ZERO,
    };
    let before = metrics().outbox_cleanup_deleted.get();
    // `cleanup` also sets the table-size gauge another test reads.
    let gauges = crate::GLOBAL_GAUGES.lock().await;
    let report = exactly_once::retention::cleanup(pg, &config).await.unwrap();
    drop(gauges);
    assert_eq!(report.outbox_deleted, 3, "{report:?}");
    assert!(metrics().outbox_cleanup_deleted.get() >= before + 3);
    let left: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM outbox ORDER BY idempotency_key").fetch_all(pg).await.unwrap();
    assert_eq!(left, ["dead:0", "queued:0", "recent:0"]);
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 1);
    assert_eq!(exactly_once::retention::prune_outbox(pg, &config).await.unwrap().0, 0, "idempotent");
}
