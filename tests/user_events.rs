//! The `user-events` function through the guard, into the real ClickHouse.

use exactly_once::config::GuardConfig;
use exactly_once::DeadLetterReason;
use exactly_once::OutcomeKind;
use exactly_once::{Event, Guard, Handler, Outcome};
use integration_tests::{user_event, TestEnv};
use user_events::UserEvents;

async fn setup() -> (TestEnv, Guard) {
    let env = TestEnv::new().await;
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await.expect("DDL");
    // Applying the DDL twice is harmless.
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await.expect("DDL again");
    let g = Guard::new(&env.clients, user_events::NAME, UserEvents.spec().id_strategy, GuardConfig::default()).unwrap();
    (env, g)
}

#[tokio::test]
async fn repeated_events_collapse_to_one_row_each() {
    let (env, g) = setup().await;
    let events: Vec<Event> =
        (0..40).map(|i| user_event("user-events", i % 3, i as i64, &format!("u-{}", i % 30), "alice")).collect();
    let report = g.run_batch(&UserEvents, &events, None).await;
    assert!(report.all_finished());
    assert_eq!(report.count(OutcomeKind::Processed), 30);
    assert_eq!(report.count(OutcomeKind::Duplicate), 10);

    // Redelivery of the whole batch (a consumer restart): nothing new.
    let again =
        Guard::new(&env.clients, user_events::NAME, UserEvents.spec().id_strategy, GuardConfig::default()).unwrap();
    assert_eq!(again.run_batch(&UserEvents, &events, None).await.count(OutcomeKind::Duplicate), 40);

    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events FINAL").await, 30);
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE namespace = 'user-events'").await, 30);
}

#[tokio::test]
async fn a_repeated_insert_collapses_in_clickhouse() {
    // The guard's fallback for a crash between the ClickHouse write and the commit:
    // the retry writes the same rows again and the table keeps one per event id.
    let (env, g) = setup().await;
    let e = user_event("user-events", 0, 1, "crash-window", "bob");
    assert_eq!(g.run_batch(&UserEvents, std::slice::from_ref(&e), None).await.outcomes[0].outcome, Outcome::Processed);
    sqlx::query("DELETE FROM processed_events").execute(env.pg()).await.unwrap();
    env.flush_redis().await;
    let fresh =
        Guard::new(&env.clients, user_events::NAME, UserEvents.spec().id_strategy, GuardConfig::default()).unwrap();
    assert_eq!(fresh.run_batch(&UserEvents, &[e], None).await.outcomes[0].outcome, Outcome::Processed);
    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events FINAL").await, 1);
}

#[tokio::test]
async fn id_strategies_of_the_function_fall_back_in_order() {
    let (env, g) = setup().await;
    let by_header = user_event("user-events", 0, 10, "hdr-1", "carol");
    let by_field =
        Event::new("user-events", 0, 11).with_value(r#"{"event_id":"fld-1","user_id":"dave","type":"updated"}"#);
    let by_offset = Event::new("user-events", 1, 12).with_value(r#"{"user_id":"erin","type":"deleted"}"#);
    let report = g.run_batch(&UserEvents, &[by_header, by_field, by_offset], None).await;
    let ids: Vec<String> = report.outcomes.iter().map(|o| o.event_id.as_ref().unwrap().to_string()).collect();
    assert_eq!(ids, ["h:hdr-1", "f:fld-1", "p:user-events-1-12"]);
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 3);
    assert_eq!(
        env.clickhouse_count("SELECT count() FROM user_events FINAL WHERE kind = 'deleted' AND user_id = 'erin'").await,
        1
    );
}

#[tokio::test]
async fn invalid_payload_is_dead_lettered_not_retried() {
    let (env, g) = setup().await;
    let not_json = Event::new("user-events", 0, 20).with_header("idempotency_key", "bad-json").with_value("{not json");
    let unknown_kind = Event::new("user-events", 0, 21)
        .with_header("idempotency_key", "bad-kind")
        .with_value(r#"{"user_id":"x","type":"exploded"}"#);
    let report = g.run_batch(&UserEvents, &[not_json, unknown_kind], None).await;
    for o in &report.outcomes {
        assert_eq!(o.outcome, Outcome::DeadLettered { reason: DeadLetterReason::Refused("payload_invalid") });
    }
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE reason = 'payload_invalid'").await, 2);
    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events").await, 0);
}
