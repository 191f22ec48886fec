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
