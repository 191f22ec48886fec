//! Operations: alert rules and dashboard are valid and name real metrics; the operator
//! functions behind `eo` (inspect, dead letters, replay).

use exactly_once::DeadLetterReason;
use std::sync::Arc;

use exactly_once::runtime::Functions;
use exactly_once::Outcome;
use integration_tests::{user_event, TestEnv};

fn infra(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../infra/monitoring/{path}", env!("CARGO_MANIFEST_DIR"))).expect(path)
}

/// Metric names used in a PromQL expression: identifiers followed by `{`, `[`, `)` or
/// an operator that are not functions or keywords.
fn metrics_in(expr: &str) -> Vec<String> {
    let known_words = [
        "sum",
        "by",
        "rate",
        "increase",
        "deriv",
        "max",
        "min",
        "clamp_min",
        "and",
        "or",
        "unless",
        "without",
        "avg",
        "count",
        "function",
        "dependency",
        "tier",
        "kind",
        "reason",
        "store",
    ];
    regex::Regex::new(r"[a-z_][a-z0-9_]*")
        .unwrap()
        .find_iter(expr)
        .map(|m| m.as_str().to_owned())
        .filter(|w| w.contains('_') && !known_words.contains(&w.as_str()))
        .collect()
}

#[test]
fn alert_rules_parse_and_use_only_exported_metrics() {
    let rules: serde_norway::Value = serde_norway::from_str(&infra("alerts.yml")).expect("valid YAML");
    let rules = rules["groups"][0]["rules"].as_sequence().expect("a rule group");
    let names: Vec<&str> = rules.iter().map(|r| r["alert"].as_str().unwrap()).collect();
    for required in ["HighDuplicateRate", "ProcessedEventsTableGrowing"] {
        assert!(names.contains(&required), "the {required} alert (producer retry loops, ledger growth) is missing");
    }
    for rule in rules {
        let expr = rule["expr"].as_str().expect("every rule has an expr");
        assert!(rule["annotations"]["summary"].as_str().is_some(), "{names:?}: every rule explains itself");
        for metric in metrics_in(expr) {
            assert!(exactly_once::metrics::ALL.contains(&metric.as_str()), "alert uses unknown metric `{metric}`");
        }
    }
}

#[test]
fn dashboard_parses_and_uses_only_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(&infra("dashboard.json")).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    let mut seen = std::collections::HashSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            for metric in metrics_in(target["expr"].as_str().unwrap()) {
                assert!(
                    exactly_once::metrics::ALL.contains(&metric.as_str()),
                    "dashboard uses unknown metric `{metric}`"
                );
                seen.insert(metric);
            }
        }
    }
    for shown in [
        "kafka_events_processed_total",
        "kafka_events_duplicates_total",
        "circuit_breaker_state",
        "processed_events_table_size",
    ] {
        assert!(seen.contains(shown), "the dashboard should show {shown}");
    }
}

async fn functions(env: &TestEnv) -> Arc<Functions> {
    Arc::new(Functions::new(&env.clients, exactly_once_cli::all_functions(), &env.kafka).await.unwrap())
}

#[tokio::test]
async fn inspect_reports_lease_marker_ledger_and_dead_letters() {
    let env = TestEnv::new().await;
    let fns = functions(&env).await;
    let f = fns.by_name("user-events").unwrap();
    f.guard.run_batch(f.handler.as_ref(), &[user_event("user-events", 0, 5, "seen", "ann")], None).await;

    let found = exactly_once_cli::ops::inspect(&env.clients, "user-events", "seen").await.unwrap();
    assert!(found.is_confirmed());
    assert!(found.done_marker.is_some() && found.lease.is_none());
    let text = found.render("user-events", "seen");
    assert!(text.contains("processed") && text.contains("user-events-0@5") && text.contains("done marker"), "{text}");

    let unknown = exactly_once_cli::ops::inspect(&env.clients, "user-events", "never").await.unwrap();
    assert!(!unknown.is_confirmed());
    assert!(unknown.render("user-events", "never").contains("not confirmed"));
}

#[tokio::test]
async fn dead_letters_are_listed_and_replayed_once_the_cause_is_fixed() {
    let env = TestEnv::new().await;
    let fns = functions(&env).await;
    let f = fns.by_name("user-events").unwrap();
    // A record the function rejects today (an unknown event type)...
    let rejected = exactly_once::Event::new("user-events", 0, 9)
        .with_header("idempotency_key", "fixable")
        .with_value(r#"{"user_id":"zoe","type":"suspended"}"#);
    let r = f.guard.run_batch(f.handler.as_ref(), &[rejected], None).await;
    assert_eq!(r.outcomes[0].outcome, Outcome::DeadLettered { reason: DeadLetterReason::Refused("payload_invalid") });
    let listed = exactly_once_cli::ops::list_dead_letters(&env.clients, Some("user-events"), 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].event_id.as_str(), listed[0].reason.as_str()), ("h:fixable", "payload_invalid"));

    // ...replayed as is, it is dead-lettered again: the same entry, brought up to date
    // and still open.
    let again = exactly_once_cli::ops::replay(&env.clients, &fns, &[listed[0].id]).await.unwrap();
    assert_eq!(again[0].1, Outcome::DeadLettered { reason: DeadLetterReason::Refused("payload_invalid") });
    let listed2 = exactly_once_cli::ops::list_dead_letters(&env.clients, None, 10).await.unwrap();
    assert_eq!(listed2.len(), 1);
    assert_eq!(listed2[0].id, listed[0].id);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 1, "no second entry");

    // The cause is fixed (here: the stored payload is corrected); the replay processes it.
    sqlx::query("UPDATE dead_letters SET record_value = convert_to($1, 'UTF8') WHERE id = $2")
        .bind(r#"{"user_id":"zoe","type":"updated"}"#)
        .bind(listed2[0].id)
        .execute(env.pg())
        .await
        .unwrap();
    let fixed = exactly_once_cli::ops::replay(&env.clients, &fns, &[listed2[0].id]).await.unwrap();
    assert_eq!(fixed[0].1, Outcome::Processed);
    assert!(exactly_once_cli::ops::list_dead_letters(&env.clients, None, 10).await.unwrap().is_empty());
    assert_eq!(
        env.count("SELECT count(*) FROM processed_events WHERE event_id = 'h:fixable' AND status = 'processed'").await,
        1
    );
    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events FINAL WHERE event_id = 'h:fixable'").await, 1);
    assert!(
        exactly_once_cli::ops::replay(&env.clients, &fns, &[listed2[0].id]).await.is_err(),
        "a closed entry is not replayed"
    );
}

/// A replay that cannot finish (ClickHouse down) leaves the dead letter open and its
/// ledger row in place: the event is never in neither place. Once ClickHouse is back,
/// the same entry replays and closes.
#[tokio::test]
async fn a_replay_that_cannot_finish_leaves_the_dead_letter_open() {
    let clickhouse = integration_tests::ToggleProxy::start("127.0.0.1:8123").await;
    let url = clickhouse.url();
    let env = TestEnv::with(|c| c.clickhouse.urls = vec![url]).await;
    let fns = functions(&env).await;
    let f = fns.by_name("user-events").unwrap();
    let rejected = exactly_once::Event::new("user-events", 0, 9)
        .with_header("idempotency_key", "stuck")
        .with_value(r#"{"user_id":"zoe","type":"suspended"}"#);
    let r = f.guard.run_batch(f.handler.as_ref(), &[rejected], None).await;
    assert_eq!(r.outcomes[0].outcome, Outcome::DeadLettered { reason: DeadLetterReason::Refused("payload_invalid") });
    let listed = exactly_once_cli::ops::list_dead_letters(&env.clients, None, 10).await.unwrap();
    sqlx::query("UPDATE dead_letters SET record_value = convert_to($1, 'UTF8') WHERE id = $2")
        .bind(r#"{"user_id":"zoe","type":"updated"}"#)
        .bind(listed[0].id)
        .execute(env.pg())
        .await
        .unwrap();

    clickhouse.take_down().await;
    let failed = exactly_once_cli::ops::replay(&env.clients, &fns, &[listed[0].id]).await.unwrap();
    assert!(matches!(failed[0].1, Outcome::Failed { .. }), "{:?}", failed[0].1);
    let still = exactly_once_cli::ops::list_dead_letters(&env.clients, None, 10).await.unwrap();
    assert_eq!(still.iter().map(|d| d.id).collect::<Vec<_>>(), vec![listed[0].id], "the entry stays open");
    assert_eq!(
        env.count("SELECT count(*) FROM processed_events WHERE event_id = 'h:stuck' AND status = 'dead_lettered'")
            .await,
        1,
        "its ledger row is back"
    );

    clickhouse.bring_up();
    let fixed = exactly_once_cli::ops::replay(&env.clients, &fns, &[listed[0].id]).await.unwrap();
    assert_eq!(fixed[0].1, Outcome::Processed);
    assert!(exactly_once_cli::ops::list_dead_letters(&env.clients, None, 10).await.unwrap().is_empty());
    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events FINAL WHERE event_id = 'h:stuck'").await, 1);
}

/// The functions with another `EVENT_ID_FORMAT`, on the same services and schema.
async fn functions_on(env: &TestEnv, id_format: &str) -> Arc<Functions> {
    let mut clients = env.clients.clone();
    let mut config = (*clients.config).clone();
    config.guard.id_format = id_format.parse().unwrap();
    clients.config = Arc::new(config);
    Arc::new(Functions::new(&clients, exactly_once_cli::all_functions(), &env.kafka).await.unwrap())
}

/// A dead letter filed under an id of the earlier format (v1, or the transition's two
/// ids) replays once the function is on v2: the replay finds every ledger row of the
/// event, whatever its format, and a repeat failure leaves one open entry, not two.
#[tokio::test]
async fn dead_letters_replay_across_an_id_format_change() {
    let env = TestEnv::new().await;
    let bad = |key: &str, offset| {
        exactly_once::Event::new("user-events", 0, offset)
            .with_header("idempotency_key", key.to_owned())
            .with_value(r#"{"user_id":"zoe","type":"suspended"}"#)
    };
    let v1 = functions_on(&env, "v1").await;
    let both = functions_on(&env, "v1+v2").await;
    let v2 = functions_on(&env, "v2").await;
    for (fns, key, offset) in [(&v1, "old", 1), (&both, "mid", 2)] {
        let f = fns.by_name("user-events").unwrap();
        let r = f.guard.run_batch(f.handler.as_ref(), &[bad(key, offset)], None).await;
        assert_eq!(
            r.outcomes[0].outcome,
            Outcome::DeadLettered { reason: DeadLetterReason::Refused("payload_invalid") }
        );
    }
    assert_eq!(
        env.count("SELECT count(*) FROM processed_events WHERE status = 'dead_lettered' AND event_id IN ('old', 'mid', 'h:mid')")
            .await,
        3,
        "the transition dead-letters under both ids"
    );
    let listed = exactly_once_cli::ops::list_dead_letters(&env.clients, None, 10).await.unwrap();
    assert_eq!(listed.len(), 2);
    let entry = |key: &str| listed.iter().find(|d| d.event_id == key).unwrap().id;

    // Replayed on v2 before the cause is fixed: dead-lettered again under its v2 id, and
    // the old entry is closed for the new one.
    let again = exactly_once_cli::ops::replay(&env.clients, &v2, &[entry("old")]).await.unwrap();
    assert_eq!(again[0].1, Outcome::DeadLettered { reason: DeadLetterReason::Refused("payload_invalid") });
    let open = exactly_once_cli::ops::list_dead_letters(&env.clients, None, 10).await.unwrap();
    let mut keys: Vec<&str> = open.iter().map(|d| d.event_id.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["h:old", "mid"]);

    // Fixed, both replay on v2 and take effect once, under their v2 ids.
    sqlx::query("UPDATE dead_letters SET record_value = convert_to($1, 'UTF8') WHERE replayed_at IS NULL")
        .bind(r#"{"user_id":"zoe","type":"updated"}"#)
        .execute(env.pg())
        .await
        .unwrap();
    let ids: Vec<i64> = open.iter().map(|d| d.id).collect();
    let fixed = exactly_once_cli::ops::replay(&env.clients, &v2, &ids).await.unwrap();
    assert!(fixed.iter().all(|(_, o)| *o == Outcome::Processed), "{fixed:?}");
    assert!(exactly_once_cli::ops::list_dead_letters(&env.clients, None, 10).await.unwrap().is_empty());
    assert_eq!(
        env.count(
            "SELECT count(*) FROM processed_events WHERE status = 'processed' AND event_id IN ('h:old', 'h:mid')"
        )
        .await,
        2
    );
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE status = 'dead_lettered'").await, 0);
}

/// Cleaning up a slice deletes its Redis keys, however many, step by step (`SCAN`,
/// `UNLINK`), and leaves every other slice's keys alone. (It used `KEYS`, which with a
/// few million keys of other runs outlasted the client's timeout and deleted nothing.)
#[tokio::test]
async fn slice_cleanup_deletes_its_keys_in_steps_and_no_others() {
    let env = TestEnv::new().await;
    let other = format!("{}_other", env.key_prefix);
    let mut conn = env.redis().await;
    for chunk in (0..12_000).collect::<Vec<_>>().chunks(1_000) {
        let mut mset = redis::cmd("MSET");
        for i in chunk {
            mset.arg(format!("{}:{{f}}:done:k{i}", env.key_prefix)).arg("1");
        }
        let () = mset.query_async(&mut conn).await.expect("MSET");
    }
    let () = redis::cmd("SET").arg(format!("{other}:kept")).arg("1").query_async(&mut conn).await.expect("SET");
    assert_eq!(env.redis_keys(&env.key_prefix).await.len(), 12_000);

    env.flush_redis().await;

    assert!(env.redis_keys(&env.key_prefix).await.is_empty());
    assert_eq!(env.redis_keys(&other).await, vec![format!("{other}:kept")], "another prefix's key survives");
    let _: i64 = redis::cmd("DEL").arg(format!("{other}:kept")).query_async(&mut conn).await.expect("DEL");
}
