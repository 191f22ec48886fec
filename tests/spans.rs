//! Tracing: one span per batch and one per event, carrying the event id, the function
//! and the outcome.

use exactly_once::config::GuardConfig;
use exactly_once::{Guard, Handler};
use integration_tests::{user_event, TestEnv};
use user_events::UserEvents;

use crate::capture::Capture;

#[tokio::test]
async fn every_event_gets_a_span_with_its_id_function_and_outcome() {
    let env = TestEnv::new().await;
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await.unwrap();
    let g = Guard::new(&env.clients, "user-events", UserEvents.spec().id_strategy, GuardConfig::default()).unwrap();
    // Other tests run beside this one and log too: only this test's event id counts.
    let key = format!("traced-{}", uuid::Uuid::new_v4().simple());
    let capture = Capture::start();
    g.run_batch(
        &UserEvents,
        &[user_event("user-events", 0, 1, &key, "ann"), user_event("user-events", 0, 2, &key, "ann")],
        None,
    )
    .await;
    let logs = capture.finish();

    let ours = |e: &&serde_json::Value| e["span"]["event_id"] == format!("h:{key}");
    let events: Vec<serde_json::Value> = logs.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let finished: Vec<&serde_json::Value> =
        events.iter().filter(ours).filter(|e| e["fields"]["message"] == "event finished").map(|e| &e["span"]).collect();
    assert_eq!(finished.len(), 2, "{logs}");
    assert_eq!(finished[0]["event_id"], format!("h:{key}"));
    assert_eq!(finished[0]["function"], "user-events");
    assert_eq!(finished[0]["outcome"], "processed");
    assert_eq!(finished[1]["outcome"], "duplicate");
    assert!(
        events
            .iter()
            .filter(ours)
            .any(|e| e["spans"].as_array().is_some_and(|s| s.iter().any(|s| s["name"] == "guard.batch"))),
        "the batch span wraps the events"
    );
}
