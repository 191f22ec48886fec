//! The deploy's migrate step: the real `migrate` binary as a Lambda function (driven by
//! the local mapping's Runtime API), answering CloudFormation custom resource requests
//! with a PUT to their ResponseURL (a local server here).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::put;
use axum::Router;
use bytes::Bytes;
use exactly_once_esm::{Answer, Function, FunctionSpec};
use integration_tests::TestEnv;
use serde_json::{json, Value};

/// A stand-in for the pre-signed S3 URL: keeps what was PUT.
async fn response_url() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let keep = got.clone();
    let app = Router::new().route(
        "/cfn-response",
        put(move |body: Bytes| {
            let keep = keep.clone();
            async move {
                keep.lock().unwrap().push(serde_json::from_slice(&body).unwrap_or(Value::Null));
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/cfn-response?X-Amz-Signature=abc"), got)
}

fn request(kind: &str, url: &str) -> Bytes {
    Bytes::from(
        json!({
            "RequestType": kind,
            "ResponseURL": url,
            "StackId": "arn:aws:cloudformation:us-east-1:000000000000:stack/eo/1",
            "RequestId": format!("req-{kind}"),
            "ResourceType": "Custom::Migrations",
            "LogicalResourceId": "Migrations",
            "ResourceProperties": {"ServiceToken": "arn:aws:lambda:...", "MigrationsVersion": "1"}
        })
        .to_string(),
    )
}

fn function(env: &TestEnv, extra: &[(&str, &str)]) -> Function {
    let mut vars: Vec<(String, String)> = vec![
        ("DATABASE_SCHEMA".into(), env.schema.clone()),
        ("CLICKHOUSE_DATABASE".into(), env.clickhouse_db.clone()),
        ("REDIS_KEY_PREFIX".into(), env.key_prefix.clone()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    vars.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    Function::new(FunctionSpec {
        binary: env!("CARGO_BIN_EXE_migrate").into(),
        name: "migrate".into(),
        env: vars,
        timeout: Duration::from_secs(60),
        init_timeout: Duration::from_secs(10),
        memory_size: 256,
        log: None,
    })
}

async fn tables(env: &TestEnv) -> u64 {
    env.clickhouse_count(
        "SELECT count() FROM system.tables WHERE database = currentDatabase() AND name IN ('user_events', 'cdc_rows')",
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn create_applies_the_schema_and_answers_cloudformation() {
    let env = TestEnv::new().await;
    let (url, got) = response_url().await;
    let mut f = function(&env, &[]);
    assert_eq!(tables(&env).await, 0);

    let answer = f.invoke(request("Create", &url)).await;
    assert!(matches!(answer, Answer::Response(_)), "{answer:?}");
    let put = got.lock().unwrap().pop().expect("an answer was PUT to the ResponseURL");
    assert_eq!(put["Status"], "SUCCESS", "{put}");
    assert_eq!(put["RequestId"], "req-Create");
    assert_eq!(put["LogicalResourceId"], "Migrations");
    assert_eq!(put["PhysicalResourceId"], "exactly-once-migrations");
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .expect("migrations/")
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql")))
        .count();
    assert_eq!(put["Data"]["postgres_migrations"], migrations, "every migration in migrations/: {put}");
    assert_eq!(tables(&env).await, 2, "every function's ClickHouse table");

    // Update runs it again (idempotent); Delete keeps the data and still answers.
    for kind in ["Update", "Delete"] {
        f.invoke(request(kind, &url)).await;
        let put = got.lock().unwrap().pop().expect("answered");
        assert_eq!(put["Status"], "SUCCESS", "{kind}: {put}");
    }
    assert_eq!(tables(&env).await, 2);

    // Not a custom resource request: a function error, nothing PUT.
    let answer = f.invoke(Bytes::from_static(b"{\"records\": {}}")).await;
    assert!(
        matches!(&answer, Answer::Error { error_type, .. } if error_type == "NotACustomResourceRequest"),
        "{answer:?}"
    );
    assert!(got.lock().unwrap().is_empty());
    f.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_migration_answers_failed_with_the_reason_and_no_secret() {
    let env = TestEnv::new().await;
    let (url, got) = response_url().await;
    let mut f =
        function(&env, &[("DATABASE_URL", "postgres://eo:hunter2@127.0.0.1:1/eo"), ("STARTUP_TIMEOUT_SECS", "1")]);
    f.invoke(request("Create", &url)).await;
    let put = got.lock().unwrap().pop().expect("a failure is answered too, or CloudFormation waits an hour");
    assert_eq!(put["Status"], "FAILED", "{put}");
    let reason = put["Reason"].as_str().unwrap();
    assert!(reason.contains("Postgres at postgres://eo:***@127.0.0.1:1"), "{reason}");
    assert!(!put.to_string().contains("hunter2"), "no password in the answer: {put}");
    f.stop().await;
}
