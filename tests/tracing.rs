//! Tracing: one span per batch and one per event, carrying the event id, the function
//! and the outcome. Its own test binary: `tracing` caches per-callsite interest
//! process-wide, so a thread-local subscriber must not race other tests' threads.

use std::io::Write;
use std::sync::{Arc, Mutex};

use exactly_once::config::GuardConfig;
use exactly_once::{Guard, Handler};
use integration_tests::{user_event, TestEnv};
use user_events::UserEvents;

/// A `Write` that appends into shared memory, for capturing log lines.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn every_event_gets_a_span_with_its_id_function_and_outcome() {
    let env = TestEnv::new().await;
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await.unwrap();
    let g = Guard::new(&env.clients, "user-events", UserEvents.spec().id_strategy, GuardConfig::default()).unwrap();
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::DEBUG)
        .with_current_span(true)
        .with_span_list(true)
        .with_writer(move || writer.clone())
        .finish();
    let _default = tracing::subscriber::set_default(subscriber);
    g.run_batch(
        &UserEvents,
        &[user_event("user-events", 0, 1, "traced", "ann"), user_event("user-events", 0, 2, "traced", "ann")],
        None,
    )
    .await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let events: Vec<serde_json::Value> = logs.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let finished: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["fields"]["message"] == "event finished").map(|e| &e["span"]).collect();
    assert_eq!(finished.len(), 2, "{logs}");
    assert_eq!(finished[0]["event_id"], "h:traced");
    assert_eq!(finished[0]["function"], "user-events");
    assert_eq!(finished[0]["outcome"], "processed");
    assert_eq!(finished[1]["outcome"], "duplicate");
    assert!(
        events.iter().any(|e| e["spans"].as_array().is_some_and(|s| s.iter().any(|s| s["name"] == "guard.batch"))),
        "the batch span wraps the events"
    );
}
