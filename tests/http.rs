//! The worker's HTTP server, over real TCP: health, readiness, metrics, and the
//! protected `POST /invoke/{function}`.

use std::collections::HashMap;
use std::sync::Arc;

use exactly_once::config::{HttpConfig, Secret};
use exactly_once::runtime::{http, msk, Functions};
use exactly_once::{Event, Handler};
use integration_tests::{user_event, TestEnv};
use user_events::UserEvents;

const TOKEN: &str = "test-token-7f3a";

async fn serve(env: &TestEnv, token: Option<&str>, max_body_bytes: usize) -> std::net::SocketAddr {
    let functions = Arc::new(
        Functions::new(&env.clients, vec![Arc::new(UserEvents) as Arc<dyn Handler>], &env.kafka).await.unwrap(),
    );
    let config =
        HttpConfig { bind: "127.0.0.1:0".parse().unwrap(), invoke_token: token.map(Secret::new), max_body_bytes };
    let router = http::router(functions, env.clients.clone(), &config);
    let (addr, _task) = http::serve(router, config.bind, std::future::pending()).await.unwrap();
    addr
}

fn batch() -> Vec<u8> {
    let events: Vec<Event> = vec![
        user_event("user-events", 0, 0, "inv-1", "ann"),
        user_event("user-events", 0, 1, "inv-2", "ben"),
        user_event("user-events", 1, 0, "inv-1", "ann"),
    ];
    msk::encode(&events).to_string().into_bytes()
}

#[tokio::test]
async fn invoke_runs_the_guard_and_returns_per_record_outcomes() {
    let env = TestEnv::new().await;
    let addr = serve(&env, None, 1 << 20).await;
    let (status, body) = integration_tests::http(addr, "POST", "/invoke/user-events", &[], &batch()).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let outcomes: Vec<&str> =
        v["outcomes"].as_array().unwrap().iter().map(|o| o["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["processed", "processed", "duplicate"]);
    assert_eq!(v["allFinished"], true);
    assert_eq!(env.clickhouse_count("SELECT count() FROM user_events FINAL").await, 2);

    let (status, body) = integration_tests::http(addr, "POST", "/invoke/user-events", &[], &batch()).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["duplicates"], 3, "{body}");
}

#[tokio::test]
async fn invoke_rejects_missing_and_wrong_tokens() {
    let env = TestEnv::new().await;
    let addr = serve(&env, Some(TOKEN), 1 << 20).await;
    let (status, body) = integration_tests::http(addr, "POST", "/invoke/user-events", &[], &batch()).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("bearer token"));
    let (status, _) =
        integration_tests::http(addr, "POST", "/invoke/user-events", &[("Authorization", "Bearer nope")], &batch())
            .await;
    assert_eq!(status, 403);
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 0, "rejected calls change nothing");

    let auth = format!("Bearer {TOKEN}");
    let (status, body) =
        integration_tests::http(addr, "POST", "/invoke/user-events", &[("Authorization", &auth)], &batch()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, 2);
}

#[tokio::test]
async fn invoke_rejects_oversized_bodies_bad_json_and_unknown_functions() {
    let env = TestEnv::new().await;
    let addr = serve(&env, None, 4096).await;
    let big = vec![b' '; 64 * 1024];
    let (status, _) = integration_tests::http(addr, "POST", "/invoke/user-events", &[], &big).await;
    assert_eq!(status, 413);
    let (status, body) = integration_tests::http(addr, "POST", "/invoke/user-events", &[], b"{not json").await;
    assert_eq!(status, 400);
    assert!(body.contains("not an MSK event (body_not_json)"), "{body}");
    let (status, body) = integration_tests::http(addr, "POST", "/invoke/user-events", &[], br#"{"records":[1]}"#).await;
    assert_eq!(status, 400);
    assert!(body.contains("body_not_msk_event"), "{body}");
    // A record with odd fields (a fractional timestamp, a header byte out of range, a
    // value that is not base64) is answered per record: dead-lettered with its reason,
    // never a failed request or a crash.
    let hostile = br#"{"records":{"t-0":[
        {"topic":"t","partition":0,"offset":0,"timestamp":1.5,"value":"e30=","headers":[{"h":[300]}]},
        {"topic":"t","partition":0,"offset":1,"timestamp":"x","value":"%%%","headers":[]}]}}"#;
    let (status, body) = integration_tests::http(addr, "POST", "/invoke/user-events", &[], hostile).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE reason = 'record_header_invalid'").await,
        1,
        "{body}"
    );
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE reason = 'record_value_base64'").await, 1, "{body}");
    let (status, body) = integration_tests::http(addr, "POST", "/invoke/nope", &[], &batch()).await;
    assert_eq!(status, 404);
    assert!(body.contains("user-events"), "names the functions it has: {body}");
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let env = TestEnv::new().await;
    let addr = serve(&env, None, 1 << 20).await;
    let (status, _) = integration_tests::http(addr, "POST", "/invoke/user-events", &[], &batch()).await;
    assert_eq!(status, 200);
    assert_eq!(integration_tests::http(addr, "GET", "/healthz", &[], b"").await.0, 200);
    let (status, body) = integration_tests::http(addr, "GET", "/readyz", &[], b"").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""ready":true"#));
    let (status, body) = integration_tests::http(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    for name in [
        "kafka_events_processed_total",
        "kafka_events_duplicates_total",
        "circuit_breaker_state",
        "kafka_events_in_flight",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}");
    }
    assert!(body.contains(r#"kafka_events_processed_total{function="user-events"}"#));
}

#[test]
fn a_non_loopback_bind_requires_a_token() {
    let env: HashMap<&str, &str> = [("HTTP_BIND", "0.0.0.0:8080")].into_iter().collect();
    let err = HttpConfig::from_env(&env).unwrap_err();
    assert_eq!(err.variable(), "HTTP_BIND");
    assert!(err.to_string().contains("INVOKE_TOKEN"), "{err}");

    let env: HashMap<&str, &str> = [("HTTP_BIND", "0.0.0.0:8080"), ("INVOKE_TOKEN", "x")].into_iter().collect();
    assert!(HttpConfig::from_env(&env).is_ok());
    let default = HttpConfig::from_env(&HashMap::<&str, &str>::new()).unwrap();
    assert!(default.bind.ip().is_loopback(), "loopback by default");
    assert!(default.invoke_token.is_none());
}
