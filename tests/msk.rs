//! MSK without AWS: broker discovery against a local stub of the MSK API (the SDK's
//! endpoint override), then a real worker consuming from the discovered broker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use exactly_once::config::{KafkaAuth, Secret};
use exactly_once::kafka_client::{resolve_brokers, KafkaClientError};
use integration_tests::TestEnv;

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(String, String)>>>);

/// `GET /v1/clusters/{arn}/bootstrap-brokers`, as MSK answers it, with the local
/// broker on the plaintext listener and made-up brokers on the others.
async fn bootstrap(State(seen): State<Seen>, Path(arn): Path<String>, headers: HeaderMap) -> Json<serde_json::Value> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    seen.0.lock().unwrap().push((arn, auth));
    Json(serde_json::json!({
        "bootstrapBrokerString": "127.0.0.1:9092",
        "bootstrapBrokerStringTls": "b-1.example.kafka.eu-west-1.amazonaws.com:9094",
        "bootstrapBrokerStringSaslScram": "b-1.example.kafka.eu-west-1.amazonaws.com:9096",
        "bootstrapBrokerStringSaslIam": "b-1.example.kafka.eu-west-1.amazonaws.com:9098"
    }))
}

async fn stub() -> (String, Seen) {
    let seen = Seen::default();
    let app = Router::new().route("/v1/clusters/{arn}/bootstrap-brokers", get(bootstrap)).with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn sdk(endpoint: &str) -> aws_types::SdkConfig {
    integration_tests::aws_sdk(endpoint, Some("eu-west-1"))
}

const ARN: &str = "arn:aws:kafka:eu-west-1:111122223333:cluster/example/11111111-2222-3333-4444-555555555555-1";

#[tokio::test]
async fn the_listener_follows_the_authentication_mode() {
    let (endpoint, seen) = stub().await;
    let env = TestEnv::new().await;
    let cases = [
        (KafkaAuth::Plaintext, "127.0.0.1:9092"),
        (KafkaAuth::Tls, "b-1.example.kafka.eu-west-1.amazonaws.com:9094"),
        (
            KafkaAuth::Scram { username: "u".into(), password: Secret::new("p") },
            "b-1.example.kafka.eu-west-1.amazonaws.com:9096",
        ),
        (KafkaAuth::Iam, "b-1.example.kafka.eu-west-1.amazonaws.com:9098"),
    ];
    for (auth, expected) in cases {
        let mut kafka = env.kafka.clone();
        kafka.brokers = "ignored:1".into();
        kafka.cluster_arn = Some(ARN.into());
        kafka.auth = auth.clone();
        resolve_brokers(&mut kafka, &sdk(&endpoint)).await.unwrap();
        assert_eq!(kafka.brokers, expected, "{}", auth.name());
    }
    let calls = seen.0.lock().unwrap().clone();
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[0].0, ARN, "the cluster ARN travels in the path");
    assert!(
        calls[0].1.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
            && calls[0].1.contains("/kafka/aws4_request"),
        "signed: {}",
        calls[0].1
    );
}

#[tokio::test]
async fn a_missing_listener_or_an_unreachable_api_is_a_clear_error() {
    let env = TestEnv::new().await;
    let app = Router::new().route(
        "/v1/clusters/{arn}/bootstrap-brokers",
        get(|| async { Json(serde_json::json!({"bootstrapBrokerStringTls": "b-1:9094"})) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut kafka = env.kafka.clone();
    kafka.cluster_arn = Some(ARN.into());
    kafka.auth = KafkaAuth::Iam;
    let err = resolve_brokers(&mut kafka, &sdk(&format!("http://{addr}"))).await.unwrap_err();
    assert!(matches!(err, KafkaClientError::NoListener { listener: "IAM", .. }), "{err}");
    assert!(err.to_string().contains("KAFKA_AUTH=iam"));

    let err = resolve_brokers(&mut kafka, &sdk("http://127.0.0.1:1")).await.unwrap_err();
    assert!(
        err.to_string().contains("GetBootstrapBrokers failed") && err.to_string().contains("MSK_CLUSTER_ARN"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_consumes_from_brokers_discovered_by_cluster_arn() {
    use exactly_once::runtime::{worker::create_topics, Functions, Worker};
    use exactly_once::Handler;
    let (endpoint, _) = stub().await;
    let mut env = TestEnv::new().await;
    env.kafka.brokers = "nowhere.invalid:9092".into();
    env.kafka.cluster_arn = Some(ARN.into());
    resolve_brokers(&mut env.kafka, &sdk(&endpoint)).await.unwrap();
    assert_eq!(env.kafka.brokers, "127.0.0.1:9092");

    let functions = Arc::new(
        Functions::new(&env.clients, vec![Arc::new(user_events::UserEvents) as Arc<dyn Handler>], &env.kafka)
            .await
            .unwrap(),
    );
    let topic = env.kafka.topic(user_events::TOPICS[0]);
    create_topics(&env.kafka, std::slice::from_ref(&topic)).await.unwrap();
    let published = integration_tests::publish_user_events(&env.kafka, &topic, 50, 10).await;
    let config = exactly_once::config::WorkerConfig::from_env(&exactly_once::config::ProcessEnv).unwrap();
    let worker = Worker::start(&env.clients, functions, &env.kafka, &config).await.unwrap();
    integration_tests::wait_until(Duration::from_secs(60), "the events", || async {
        env.clickhouse_count("SELECT count() FROM user_events FINAL").await == published.unique as u64
    })
    .await;
    worker.shutdown().await;
}
