//! The `eo` binary: help, usage errors and exit codes, against the real services.

use std::process::Command;

use exactly_once::config::GuardConfig;
use exactly_once::{Guard, Handler};
use integration_tests::{user_event, TestEnv};

fn eo(env: &TestEnv, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_eo"))
        .args(args)
        .env("DATABASE_SCHEMA", &env.schema)
        .env("CLICKHOUSE_DATABASE", &env.clickhouse_db)
        .env("REDIS_KEY_PREFIX", &env.key_prefix)
        .output()
        .expect("run eo");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn help_usage_errors_and_exit_codes() {
    let env = TestEnv::new().await;
    let (code, help) = eo(&env, &["--help"]);
    assert_eq!(code, 0);
    for command in ["run", "esm", "migrate", "inspect", "dead-letters", "outbox", "cleanup", "produce"] {
        assert!(help.contains(command), "--help lists `{command}`:\n{help}");
    }
    assert_eq!(eo(&env, &["no-such-command"]).0, 2);
    assert_eq!(eo(&env, &["produce", "--duplicate-rate", "1.5"]).0, 2);
    let (code, text) = eo(&env, &["esm", "--function", "no-such-function"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("no function `no-such-function`"), "{text}");
    let (code, text) = eo(&env, &["esm", "--function", "user-events", "--binary", "/no/such/bootstrap"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("/no/such/bootstrap"), "{text}");
    assert_eq!(eo(&env, &["esm", "--function", "user-events", "--batch-size", "0"]).0, 2);
    let (code, text) = eo(&env, &["esm", "--function", "user-events", "--on-failure-destination", "sqs://q"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("kafka://<topic> or file://<directory>"), "{text}");
    let (code, text) = eo(&env, &["inspect", "Not A Function", "x"]);
    assert_eq!(code, 2, "a function name that cannot exist is a usage error: {text}");
    assert!(text.contains("invalid namespace"), "{text}");

    let (code, text) = eo(&env, &["inspect", "user-events", "not-yet"]);
    assert_eq!(code, 3, "not confirmed: {text}");

    // `eo migrate`: every function's ClickHouse table, idempotently.
    assert_eq!(env.clickhouse_count("SELECT count() FROM system.tables WHERE database = currentDatabase()").await, 0);
    for _ in 0..2 {
        let (code, text) = eo(&env, &["migrate"]);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("user_events") && text.contains("cdc_rows"), "{text}");
    }
    assert_eq!(
        env.clickhouse_count("SELECT count() FROM system.tables WHERE database = currentDatabase() AND name IN ('user_events', 'cdc_rows')").await,
        2
    );
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await.unwrap();
    let g = Guard::new(&env.clients, "user-events", user_events::UserEvents.spec().id_strategy, GuardConfig::default())
        .unwrap();
    g.run_batch(&user_events::UserEvents, &[user_event("user-events", 0, 3, "not-yet", "ann")], None).await;
    let (code, text) = eo(&env, &["inspect", "user-events", "not-yet"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("processed"), "{text}");

    let (code, text) = eo(&env, &["dead-letters", "list"]);
    assert_eq!((code, text.trim()), (0, "no open dead letters"));
    let (code, text) = eo(&env, &["dead-letters", "replay", "999999"]);
    assert_eq!(code, 1);
    assert!(text.contains("no open dead letter #999999"), "{text}");
    let (code, text) = eo(&env, &["outbox", "list"]);
    assert_eq!((code, text.trim()), (0, "no dead-lettered outbox messages"));
    let (code, text) = eo(&env, &["outbox", "replay", "999999"]);
    assert_eq!(code, 1);
    assert!(text.contains("not dead-lettered outbox messages: #999999"), "{text}");
    let (code, text) = eo(&env, &["cleanup"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("deleted 0 confirmed ids"), "{text}");

    let bad =
        Command::new(env!("CARGO_BIN_EXE_eo")).args(["cleanup"]).env("GUARD_MAX_ATTEMPTS", "zero").output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "bad configuration is a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("GUARD_MAX_ATTEMPTS"));
}

/// `eo produce --avro`: the function's sample schema registered under `<topic>-value`,
/// samples framed and encoded with it; a worker running `cdc` decodes every one.
#[tokio::test(flavor = "multi_thread")]
async fn produce_avro_publishes_samples_the_worker_decodes() {
    use std::sync::Arc;
    use std::time::Duration;

    use exactly_once::config::{ProcessEnv, Secret, WorkerConfig};
    use exactly_once::runtime::{Functions, Worker};
    use integration_tests::registry::Registry;

    let registry = Registry::start().await;
    let url = registry.url().to_owned();
    let env = TestEnv::with(|c| c.registry.url = Some(Secret::new(url))).await;
    // Without a registry it is a usage error, before anything is sent.
    let (code, text) = eo(&env, &["produce", "--function", "cdc", "--avro", "--count", "1"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("SCHEMA_REGISTRY_URL"), "{text}");

    let out = Command::new(env!("CARGO_BIN_EXE_eo"))
        .args(["produce", "--function", "cdc", "--avro", "--count", "30", "--duplicate-rate", "0"])
        .env("SCHEMA_REGISTRY_URL", registry.url())
        .env("KAFKA_TOPIC_PREFIX", &env.kafka.topic_prefix)
        .env("KAFKA_CREATE_TOPICS", "true")
        .output()
        .expect("run eo");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(text.contains("in Avro (schema 1)"), "{text}");

    let functions =
        Arc::new(Functions::new(&env.clients, vec![Arc::new(cdc::Cdc) as Arc<dyn Handler>], &env.kafka).await.unwrap());
    let config = WorkerConfig::from_env(&ProcessEnv).unwrap();
    let worker = Worker::start(&env.clients, functions, &env.kafka, &config).await.unwrap();
    integration_tests::wait_until(Duration::from_secs(60), "30 rows in cdc_rows", || async {
        env.clickhouse_count("SELECT count() FROM cdc_rows FINAL").await >= 30
    })
    .await;
    worker.shutdown().await;
    assert_eq!(env.clickhouse_count("SELECT count() FROM cdc_rows FINAL").await, 30);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(registry.lookups(), 1, "the worker fetched the schema once");
}
