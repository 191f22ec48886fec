//! Values framed for the AWS Glue Schema Registry, written by a Glue serializer nobody
//! here wrote (`aws-glue-schema-registry` from PyPI, over boto3 and fastavro:
//! `tests/py/glue_serialize.py`) against a stand-in serving Glue's JSON API
//! (`integration_tests::glue`; no Glue runs here). Our side looks schema versions up with
//! aws-sdk-glue (`GetSchemaVersion`, signed, through its own breaker). The worker consumes
//! them exactly once, and every way a value can be wrong ends in its own outcome.

use std::sync::Arc;
use std::time::Duration;

use exactly_once::config::{EventRecordFormat, GuardConfig, WorkerConfig};
use exactly_once::payload::{confluent_framed, glue_framed};
use exactly_once::runtime::worker::create_topics;
use exactly_once::runtime::{Functions, Worker};
use exactly_once::{
    async_trait, DeadLetterReason, Event, FailureKind, FunctionSpec, Guard, Handler, HandlerContext, HandlerError,
    IdStrategy, Outcome, ValueFormat,
};
use integration_tests::glue::GlueRegistry;
use integration_tests::{committed_offsets, run_python, wait_until, TestEnv};
use serde_json::json;

const PARTITIONS: i32 = 3;

const ORDER_AVRO: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
    {"name":"order_id","type":"string"},{"name":"amount","type":"long"},
    {"name":"note","type":["null","string"],"default":null},
    {"name":"placed_at","type":"long","default":1700000000000}]}"#;

const ORDER_JSON_SCHEMA: &str = r#"{"type":"object","required":["order_id","amount"],
    "properties":{"order_id":{"type":"string"},"amount":{"type":"integer"}}}"#;

#[derive(Debug, serde::Deserialize)]
struct Order {
    order_id: String,
    amount: i64,
}

/// Writes each order to Postgres in the guard's transaction.
struct Orders(ValueFormat);

#[async_trait]
impl Handler for Orders {
    fn spec(&self) -> FunctionSpec {
        FunctionSpec::new("glue-orders", &["orders"], IdStrategy::default_chain(Some("/order_id"), None)).values(self.0)
    }

    async fn handle(&self, _event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        let order: Order = ctx.payload()?;
        sqlx::query("INSERT INTO orders (order_id, amount) VALUES ($1, $2)")
            .bind(&order.order_id)
            .bind(order.amount)
            .execute(ctx.postgres().await?)
            .await?;
        Ok(())
    }
}

async fn env_with(glue: &GlueRegistry, tweak: impl FnOnce(&mut exactly_once::config::Config)) -> TestEnv {
    // Requests are signed as on AWS; the stand-in refuses unsigned ones.
    let sdk = integration_tests::aws_sdk(glue.url(), Some("us-east-1"));
    let env = TestEnv::with(|c| {
        c.registry.glue_sdk = Some(sdk);
        c.registry.breaker.open_for = Duration::from_millis(200);
        tweak(c);
    })
    .await;
    sqlx::query("CREATE TABLE orders (order_id TEXT NOT NULL, amount BIGINT NOT NULL)")
        .execute(env.pg())
        .await
        .unwrap();
    env
}

/// Values as the Glue serializer frames them: `records` (JSON lines) in `format`
/// (`avro` or `json`) of `schema`, registered in `registry` under the topic's name.
async fn encode(
    glue: &GlueRegistry,
    registry: &str,
    format: &str,
    schema: &str,
    records: &[serde_json::Value],
    compress: bool,
) -> Vec<Vec<u8>> {
    let file = std::env::temp_dir().join(format!("{}.schema", integration_tests::unique("glue")));
    std::fs::write(&file, schema).unwrap();
    let input: String = records.iter().map(|r| format!("{r}\n")).collect();
    let path = file.to_string_lossy().into_owned();
    let mut args = vec![
        "encode",
        "--endpoint",
        glue.url(),
        "--registry",
        registry,
        "--topic",
        "orders",
        "--format",
        format,
        "--schema-file",
        &path,
    ];
    if compress {
        args.push("--compress");
    }
    let out = run_python("glue_serialize.py", &args, &input).await;
    let _ = std::fs::remove_file(&file);
    out.lines().map(|l| hex_bytes(l.trim())).collect()
}

fn hex_bytes(line: &str) -> Vec<u8> {
    (0..line.len()).step_by(2).map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex")).collect()
}

fn order(id: &str, amount: i64) -> serde_json::Value {
    serde_json::json!({"order_id": id, "amount": amount, "note": null})
}

fn guard(env: &TestEnv, format: ValueFormat) -> Guard {
    let spec = Orders(format).spec();
    Guard::new(&env.clients, spec.name, spec.id_strategy, GuardConfig::default()).unwrap().with_values(format)
}

fn record(offset: i64, value: Vec<u8>) -> Event {
    Event::new("orders", 0, offset).with_value(value)
}

fn uuid_of(framed: &[u8]) -> [u8; 16] {
    framed[2..18].try_into().unwrap()
}

#[tokio::test]
async fn glue_avro_orders_from_a_third_party_serializer_are_consumed_exactly_once_by_the_worker() {
    let glue = GlueRegistry::start().await;
    let mut env = env_with(&glue, |_| {}).await;
    env.kafka.topic_partitions = PARTITIONS;
    let topic = env.kafka.topic("orders");
    create_topics(&env.kafka, std::slice::from_ref(&topic)).await.expect("topic");
    // 150 orders, half of them zlib-compressed by the serializer's own codec, and the
    // first 40 sent again (a producer's retry): 190 records.
    let orders: Vec<serde_json::Value> = (0..150).map(|i| order(&format!("g-{i}"), i)).collect();
    let plain = encode(&glue, "shop", "avro", ORDER_AVRO, &orders[..75], false).await;
    let compressed = encode(&glue, "shop", "avro", ORDER_AVRO, &orders[75..], true).await;
    assert_eq!(compressed[0][1], 5, "the serializer's codec compressed it");
    assert_eq!(uuid_of(&plain[0]), uuid_of(&compressed[0]), "one schema version");
    let mut values: Vec<(String, Vec<u8>)> =
        plain.into_iter().chain(compressed).enumerate().map(|(i, v)| (format!("g-{i}"), v)).collect();
    values.extend(values[..40].to_vec());
    // Published as they are, with no headers (the library's producer would add an
    // idempotency key, which the id strategy would read before the order id).
    let producer: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &env.kafka.brokers).create().expect("producer");
    for (key, value) in &values {
        let record = rdkafka::producer::FutureRecord::to(&topic).key(key.as_str()).payload(value.as_slice());
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("publish");
    }

    let functions = Arc::new(
        Functions::new(&env.clients, vec![Arc::new(Orders(ValueFormat::glue())) as Arc<dyn Handler>], &env.kafka)
            .await
            .expect("functions"),
    );
    let mut config = WorkerConfig::from_env(&exactly_once::config::ProcessEnv).expect("worker configuration");
    config.batch_size = 50;
    config.retry_backoff = Duration::from_millis(50);
    let worker = Worker::start(&env.clients, functions, &env.kafka, &config).await.expect("worker starts");
    wait_until(Duration::from_secs(120), "every order stored and every offset committed", || async {
        if env.count("SELECT count(*) FROM orders").await < 150 {
            return false;
        }
        committed_offsets(&env.kafka, &topic, PARTITIONS).await.values().sum::<i64>() == 190
    })
    .await;
    worker.shutdown().await;

    assert_eq!(env.count("SELECT count(*) FROM orders").await, 150);
    assert_eq!(env.count("SELECT count(DISTINCT order_id) FROM orders").await, 150);
    assert_eq!(env.count("SELECT sum(amount)::bigint FROM orders").await, (0..150).sum::<i64>());
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE event_id LIKE 'f:g-%'").await, 150);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    // One schema version, looked up once by our client (the serializer asked once too).
    assert_eq!(env.clients.registry.fetches(), 1);
    assert_eq!(glue.lookups(), 2);
}

#[tokio::test]
async fn every_glue_value_that_cannot_be_decoded_has_its_own_outcome() {
    let glue = GlueRegistry::start().await;
    let env = env_with(&glue, |_| {}).await;
    let good = encode(&glue, "shop", "avro", ORDER_AVRO, &[order("good", 1)], false).await.remove(0);
    let json = encode(&glue, "shop-json", "json", ORDER_JSON_SCHEMA, &[order("json", 2)], false).await.remove(0);
    let datum = &good[18..];
    let other = glue.register(
        "shop",
        "other",
        "AVRO",
        r#"{"type":"record","name":"Other","fields":[{"name":"n","type":"long"},{"name":"m","type":"long"}]}"#,
        "AVAILABLE",
    );
    let uuid = |text: &str| *uuid::Uuid::parse_str(text).unwrap().as_bytes();
    let pending = glue.register("shop", "pending", "AVRO", ORDER_AVRO, "PENDING");
    let deleting = glue.register("shop", "deleting", "AVRO", ORDER_AVRO, "DELETING");
    let newer = glue.register("shop", "newer", "AVRO", ORDER_AVRO, "A_STATUS_ADDED_LATER");
    let failed = glue.register("shop", "failed", "AVRO", ORDER_AVRO, "FAILURE");
    // A data format Glue may add one day.
    let xml = glue.register("shop", "xml", "XML", "<order/>", "AVAILABLE");
    let missing = uuid::Uuid::new_v4();
    let mut bad_compression = good.clone();
    bad_compression[1] = 9;
    let mut not_zlib = good.clone();
    not_zlib[1] = 5;
    let records = vec![
        record(1, good.clone()),
        record(2, json),
        record(3, br#"{"order_id": "plain", "amount": 3}"#.to_vec()),
        record(4, confluent_framed(7, datum)),
        record(5, good[..12].to_vec()),
        record(6, glue_framed(uuid(&other), datum)),
        record(7, glue_framed(*missing.as_bytes(), datum)),
        record(8, bad_compression),
        record(9, not_zlib),
        record(10, glue_framed(uuid(&failed), datum)),
        record(11, glue_framed(uuid(&xml), b"<order/>")),
        record(12, glue_framed(uuid(&deleting), datum)),
        record(13, glue_framed(uuid(&pending), datum)),
        record(14, glue_framed(uuid(&newer), datum)),
    ];
    let report = guard(&env, ValueFormat::glue()).run_batch(&Orders(ValueFormat::glue()), &records, None).await;
    let dead = |r: &'static str| Outcome::DeadLettered { reason: DeadLetterReason::Undecodable(r) };
    let outcomes: Vec<&Outcome> = report.outcomes.iter().map(|o| &o.outcome).collect();
    assert_eq!(
        outcomes[..12],
        [
            &Outcome::Processed,
            &Outcome::Processed,
            &dead("payload_not_framed"),
            &dead("payload_not_framed"),
            &dead("payload_truncated"),
            &dead("payload_schema_mismatch"),
            &dead("schema_unknown"),
            &dead("payload_compression"),
            &dead("payload_compression"),
            &dead("schema_invalid"),
            &dead("schema_unsupported"),
            &dead("schema_invalid"),
        ],
        "{report:?}"
    );
    // A version whose compatibility check is still running, or in a status this client
    // does not know, is waited for, not filed.
    for (i, status) in [(12, "PENDING"), (13, "A_STATUS_ADDED_LATER")] {
        assert!(
            matches!(&report.outcomes[i].outcome, Outcome::Failed { kind: FailureKind::Unavailable, error, .. } if error.contains(status)),
            "{:?}",
            report.outcomes[i]
        );
    }
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE record_value IS NOT NULL").await, 10);
    let unknown: String = sqlx::query_scalar("SELECT error FROM dead_letters WHERE reason = 'schema_unknown'")
        .fetch_one(env.pg())
        .await
        .unwrap();
    assert!(unknown.contains(&missing.to_string()), "the error names the schema version's UUID: {unknown}");

    // With `glue-or-json` the plain JSON value is read as JSON instead.
    let g = guard(&env, ValueFormat::glue_or_json());
    let report = g.run_batch(&Orders(ValueFormat::glue_or_json()), &[records[2].clone()], None).await;
    assert_eq!(report.outcomes[0].outcome, Outcome::Processed, "{report:?}");
    assert_eq!(env.count("SELECT count(*) FROM orders WHERE order_id = 'plain'").await, 1);
}

#[tokio::test]
async fn a_glue_outage_retries_framed_values_and_never_dead_letters_them() {
    let glue = GlueRegistry::start().await;
    let env = env_with(&glue, |_| {}).await;
    let orders = [order("a", 1), order("b", 2)];
    let framed = encode(&glue, "shop", "avro", ORDER_AVRO, &orders, false).await;
    let records: Vec<Event> = framed.into_iter().enumerate().map(|(i, v)| record(i as i64, v)).collect();
    let g = guard(&env, ValueFormat::glue());
    let h = Orders(ValueFormat::glue());
    glue.set_failing(true);
    for _ in 0..4 {
        let report = g.run_batch(&h, &records, None).await;
        for o in &report.outcomes {
            assert!(
                matches!(&o.outcome, Outcome::Failed { kind: FailureKind::Unavailable, attempts: None, .. }),
                "{o:?}"
            );
        }
    }
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 0);
    assert_eq!(
        env.clients.registry.glue_breaker().state(),
        exactly_once::BreakerState::Open,
        "three failed lookups open the Glue breaker"
    );
    // Three lookups reached Glue; the fourth batch was held back by the open breaker.
    assert_eq!(env.clients.registry.fetches(), 3);

    glue.set_failing(false);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let report = g.run_batch(&h, &records, None).await;
    assert!(report.outcomes.iter().all(|o| o.outcome == Outcome::Processed), "{report:?}");
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
}

#[tokio::test]
async fn on_lambda_source_values_named_by_a_glue_schema_version_are_decoded() {
    let glue = GlueRegistry::start().await;
    // No SCHEMA_REGISTRY_URL: a Glue schema version needs none.
    let env = env_with(&glue, |c| c.guard.event_record_format = EventRecordFormat::Source).await;
    let framed = encode(&glue, "shop", "avro", ORDER_AVRO, &[order("l-1", 1), order("l-2", 2)], false).await;
    let version = uuid::Uuid::from_bytes(uuid_of(&framed[0])).to_string();
    // SOURCE: the mapping removed Glue's frame; the schema version is in the metadata.
    let events = vec![
        Event::new("orders", 0, 0).with_value(framed[0][18..].to_vec()).with_value_schema("AVRO", &version),
        Event::new("orders", 0, 1)
            .with_value(framed[1][18..].to_vec())
            .with_value_schema("AVRO", version.to_uppercase()),
        Event::new("orders", 0, 2).with_value(framed[1][18..].to_vec()).with_value_schema("JSON", &version),
    ];
    let functions = Functions::new(
        &env.clients,
        vec![Arc::new(Orders(ValueFormat::confluent_or_json())) as Arc<dyn Handler>],
        &env.kafka,
    )
    .await
    .expect("functions");
    let body = exactly_once::runtime::msk::encode(&events).to_string();
    let event = exactly_once::runtime::msk::parse(body.as_bytes()).expect("an MSK event");
    let answer = exactly_once::runtime::lambda::invoke(&functions, &event, None, false).await.expect("finished");
    assert_eq!(
        (answer["processed"].as_u64(), answer["duplicates"].as_u64(), answer["deadLettered"].as_u64()),
        (Some(2), Some(0), Some(1)),
        "{answer}"
    );
    assert_eq!(env.count("SELECT count(*) FROM orders WHERE order_id IN ('l-1', 'l-2')").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE reason = 'payload_schema_mismatch'").await, 1);
    assert_eq!(env.clients.registry.fetches(), 1, "the UUID in either case is one schema version");
}

#[tokio::test]
async fn a_glue_function_refuses_to_start_without_an_aws_region() {
    let glue = GlueRegistry::start().await;
    let no_region = integration_tests::aws_sdk(glue.url(), None);
    let env = TestEnv::with(|c| c.registry.glue_sdk = Some(no_region)).await;
    let err = Functions::new(&env.clients, vec![Arc::new(Orders(ValueFormat::glue())) as Arc<dyn Handler>], &env.kafka)
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("AWS_REGION"), "{err}");
}

#[tokio::test]
async fn a_batch_of_compressed_values_decompresses_a_bounded_amount_and_the_rest_waits() {
    let glue = GlueRegistry::start().await;
    let env = env_with(&glue, |_| {}).await;
    let version = glue.register("shop", "orders", "AVRO", ORDER_AVRO, "AVAILABLE");
    let schema = exactly_once::payload::AvroSchema::parse(ORDER_AVRO).unwrap();
    // Four values of 20 MiB each once inflated (a note of 20 MiB), about 20 KiB each on
    // the wire; the batch's budget (64 MiB) takes three.
    let max = 21 << 20;
    let records: Vec<Event> = (0..4)
        .map(|i| {
            let json = serde_json::json!({"order_id": format!("big-{i}"), "amount": i, "note": "n".repeat(20 << 20)});
            let datum = exactly_once::payload::avro_from_json(schema.schema(), json).unwrap();
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut z, &datum).unwrap();
            let mut value = glue_framed(*uuid::Uuid::parse_str(&version).unwrap().as_bytes(), &z.finish().unwrap());
            value[1] = exactly_once::payload::GLUE_COMPRESSION_ZLIB;
            assert!(value.len() < 64 << 10, "{}", value.len());
            record(i, value)
        })
        .collect();
    let config = GuardConfig { max_value_bytes: max, ..GuardConfig::default() };
    let spec = Orders(ValueFormat::glue()).spec();
    let g = Guard::new(&env.clients, spec.name, spec.id_strategy, config).unwrap().with_values(ValueFormat::glue());
    let h = Orders(ValueFormat::glue());
    let report = g.run_batch(&h, &records, None).await;
    let outcomes: Vec<&Outcome> = report.outcomes.iter().map(|o| &o.outcome).collect();
    assert_eq!(outcomes[..3], [&Outcome::Processed; 3], "{outcomes:?}");
    assert!(
        matches!(outcomes[3], Outcome::Failed { kind: FailureKind::Unavailable, error, .. } if error.contains("GUARD_MAX_BATCH_DECOMPRESSED_BYTES")),
        "{:?}",
        outcomes[3]
    );
    // The one left over goes through in the next batch; nothing was dead-lettered.
    let report = g.run_batch(&h, &records[3..], None).await;
    assert_eq!(report.outcomes[0].outcome, Outcome::Processed, "{report:?}");
    assert_eq!(env.count("SELECT count(*) FROM orders WHERE order_id LIKE 'big-%'").await, 4);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
}

/// The Protobuf schema of the Glue Protobuf tests, as a producer's `.proto` file (Glue
/// keeps it as text). `Refund` comes first in the file, yet Glue numbers messages by full
/// name: `shop.Order` 0, `shop.Order.Line` 1, `shop.Order.TagsEntry` 2 (the map's
/// generated entry), `shop.Refund` 3.
const SHOP_PROTO: &str = r#"syntax = "proto3";
package shop;

import "google/protobuf/timestamp.proto";
import "google/type/money.proto";

message Refund {
  string order_id = 1;
  int64 amount = 2;
  string reason = 3;
}

message Order {
  string order_id = 1;
  int64 amount = 2;
  repeated Line lines = 3;
  map<string, string> tags = 4;
  google.protobuf.Timestamp placed_at = 5;
  google.type.Money total = 6;

  message Line {
    string sku = 1;
    int32 quantity = 2;
  }
}
"#;

/// Stores every decoded value whole, with its id fields, in the guard's transaction.
struct Messages(ValueFormat);

#[async_trait]
impl Handler for Messages {
    fn spec(&self) -> FunctionSpec {
        FunctionSpec::new("glue-messages", &["orders"], IdStrategy::default_chain(Some("/order_id"), None))
            .values(self.0)
    }

    async fn handle(&self, _event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        let value: serde_json::Value = ctx.payload()?;
        sqlx::query("INSERT INTO messages (order_id, amount, body) VALUES ($1, $2, $3)")
            .bind(value["order_id"].as_str())
            .bind(value["amount"].as_i64())
            .bind(&value)
            .execute(ctx.postgres().await?)
            .await?;
        Ok(())
    }
}

async fn messages_table(env: &TestEnv) {
    sqlx::query("CREATE TABLE messages (order_id TEXT NOT NULL, amount BIGINT NOT NULL, body JSONB NOT NULL)")
        .execute(env.pg())
        .await
        .unwrap();
}

/// Glue Protobuf values: each `(message full name, proto3 JSON)` compiled by protoc and
/// encoded by Google's runtime, framed by the Glue package's codec.
async fn encode_protobuf(glue: &GlueRegistry, messages: &[(&str, serde_json::Value)], compress: bool) -> Vec<Vec<u8>> {
    let records: Vec<serde_json::Value> =
        messages.iter().map(|(name, value)| json!({"message": name, "value": value})).collect();
    encode(glue, "shop", "protobuf", SHOP_PROTO, &records, compress).await
}

fn proto_order(id: &str, amount: i64) -> (&'static str, serde_json::Value) {
    (
        "shop.Order",
        json!({
            "order_id": id, "amount": amount.to_string(),
            "lines": [{"sku": "sku-1", "quantity": 2}, {"sku": "sku-2", "quantity": 1}],
            "tags": {"channel": "web"},
            "placedAt": "2026-12-07T03:00:00Z",
            "total": {"currencyCode": "EUR", "units": amount.to_string(), "nanos": 500000000}
        }),
    )
}

fn proto_refund(id: &str, amount: i64) -> (&'static str, serde_json::Value) {
    ("shop.Refund", json!({"order_id": id, "amount": amount.to_string(), "reason": "damaged"}))
}

#[tokio::test]
async fn glue_protobuf_values_from_googles_runtime_are_consumed_exactly_once_by_the_worker() {
    let glue = GlueRegistry::start().await;
    let mut env = env_with(&glue, |_| {}).await;
    messages_table(&env).await;
    env.kafka.topic_partitions = PARTITIONS;
    let topic = env.kafka.topic("orders");
    create_topics(&env.kafka, std::slice::from_ref(&topic)).await.expect("topic");
    // 60 orders and 40 refunds, interleaved, the second half zlib-compressed by the
    // package's codec, the first 30 sent again: 130 records.
    let all: Vec<(&str, serde_json::Value)> = (0..100)
        .map(|i| if i % 5 < 3 { proto_order(&format!("p-{i}"), i) } else { proto_refund(&format!("p-{i}"), i) })
        .collect();
    let plain = encode_protobuf(&glue, &all[..50], false).await;
    let compressed = encode_protobuf(&glue, &all[50..], true).await;
    assert_eq!((plain[0][1], compressed[0][1]), (0, 5));
    assert_eq!(uuid_of(&plain[0]), uuid_of(&compressed[0]), "one schema version");
    // Glue's message index, as the serializer's port wrote it: Order 0, Refund 3.
    assert_eq!((plain[0][18], plain[3][18]), (0, 3));
    let mut values: Vec<Vec<u8>> = plain.into_iter().chain(compressed).collect();
    values.extend(values[..30].to_vec());
    let producer: rdkafka::producer::FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &env.kafka.brokers).create().expect("producer");
    for (i, value) in values.iter().enumerate() {
        let key = format!("k-{}", i % 100);
        let record = rdkafka::producer::FutureRecord::to(&topic).key(key.as_str()).payload(value.as_slice());
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("publish");
    }

    let functions = Arc::new(
        Functions::new(&env.clients, vec![Arc::new(Messages(ValueFormat::glue())) as Arc<dyn Handler>], &env.kafka)
            .await
            .expect("functions"),
    );
    let mut config = WorkerConfig::from_env(&exactly_once::config::ProcessEnv).expect("worker configuration");
    config.batch_size = 40;
    config.retry_backoff = Duration::from_millis(50);
    let worker = Worker::start(&env.clients, functions, &env.kafka, &config).await.expect("worker starts");
    wait_until(Duration::from_secs(120), "every message stored and every offset committed", || async {
        if env.count("SELECT count(*) FROM messages").await < 100 {
            return false;
        }
        committed_offsets(&env.kafka, &topic, PARTITIONS).await.values().sum::<i64>() == 130
    })
    .await;
    worker.shutdown().await;

    assert_eq!(env.count("SELECT count(*) FROM messages").await, 100);
    assert_eq!(env.count("SELECT count(DISTINCT order_id) FROM messages").await, 100);
    assert_eq!(env.count("SELECT sum(amount)::bigint FROM messages").await, (0..100).sum::<i64>());
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    // Each message read as its own type, field for field.
    assert_eq!(env.count("SELECT count(*) FROM messages WHERE body->>'reason' = 'damaged'").await, 40);
    assert_eq!(
        env.count(
            "SELECT count(*) FROM messages WHERE body->'lines'->1->>'sku' = 'sku-2' AND (body->'lines'->0->>'quantity')::int = 2
               AND body->'tags'->>'channel' = 'web' AND body->>'placed_at' = '2026-12-07T03:00:00Z'
               AND body->'total'->>'currency_code' = 'EUR' AND (body->'total'->>'units')::bigint = amount"
        )
        .await,
        60
    );
    assert_eq!(env.clients.registry.fetches(), 1, "one schema version, looked up once");
}

#[tokio::test]
async fn every_glue_protobuf_value_that_cannot_be_decoded_has_its_own_outcome() {
    let glue = GlueRegistry::start().await;
    let env = env_with(&glue, |_| {}).await;
    messages_table(&env).await;
    let framed = encode_protobuf(&glue, &[proto_order("good", 1), proto_refund("refund", 2)], false).await;
    let (good, refund) = (&framed[0], &framed[1]);
    let version = uuid_of(good);
    let uuid = |text: &str| *uuid::Uuid::parse_str(text).unwrap().as_bytes();
    let unparsable = glue.register("shop", "broken", "PROTOBUF", "syntax = \"proto3\"; message Order {", "AVAILABLE");
    let unresolved = glue.register(
        "shop",
        "imports",
        "PROTOBUF",
        "syntax = \"proto3\"; import \"shop/common.proto\"; message Order { shop.Common c = 1; }",
        "AVAILABLE",
    );
    let with_index = |index: u8, message: &[u8]| {
        let mut body = vec![index];
        body.extend_from_slice(message);
        glue_framed(version, &body)
    };
    let records = vec![
        record(1, good.clone()),
        record(2, refund.clone()),
        // Index 4: past the schema's four messages.
        record(3, with_index(4, &good[19..])),
        // The refund's bytes under the nested Line's index: reason (field 3) is not Line's.
        record(4, with_index(1, &refund[19..])),
        // The index varint cut short, and nothing after the header.
        record(5, glue_framed(version, &[0x80])),
        // Cut inside the order's first field.
        record(6, good[..22].to_vec()),
        record(7, glue_framed(uuid(&unparsable), &good[18..])),
        record(8, glue_framed(uuid(&unresolved), &good[18..])),
    ];
    let h = Messages(ValueFormat::glue());
    let spec = h.spec();
    let g = Guard::new(&env.clients, spec.name, spec.id_strategy, GuardConfig::default())
        .unwrap()
        .with_values(ValueFormat::glue());
    let report = g.run_batch(&h, &records, None).await;
    let dead = |r: &'static str| Outcome::DeadLettered { reason: DeadLetterReason::Undecodable(r) };
    let outcomes: Vec<&Outcome> = report.outcomes.iter().map(|o| &o.outcome).collect();
    assert_eq!(
        outcomes,
        [
            &Outcome::Processed,
            &Outcome::Processed,
            &dead("payload_schema_mismatch"),
            &dead("payload_schema_mismatch"),
            &dead("payload_schema_mismatch"),
            &dead("payload_schema_mismatch"),
            &dead("schema_invalid"),
            &dead("schema_invalid"),
        ],
        "{report:?}"
    );
    assert_eq!(env.count("SELECT count(*) FROM messages").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM messages WHERE body->>'reason' = 'damaged'").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE record_value IS NOT NULL").await, 6);
    let errors: Vec<String> =
        sqlx::query_scalar("SELECT error FROM dead_letters ORDER BY kafka_offset").fetch_all(env.pg()).await.unwrap();
    assert!(errors[0].contains("message index 4"), "{}", errors[0]);
    assert!(errors[4].contains("not a valid .proto"), "{}", errors[4]);
    assert!(errors[5].contains("shop/common.proto"), "{}", errors[5]);
}

#[tokio::test]
async fn on_lambda_source_glue_protobuf_values_keep_their_message_index() {
    let glue = GlueRegistry::start().await;
    let env = env_with(&glue, |c| c.guard.event_record_format = EventRecordFormat::Source).await;
    messages_table(&env).await;
    let framed = encode_protobuf(&glue, &[proto_order("s-1", 1), proto_refund("s-2", 2)], false).await;
    let version = uuid::Uuid::from_bytes(uuid_of(&framed[0])).to_string();
    // SOURCE: Glue's header removed, the message index kept (as Powertools reads it).
    let events: Vec<Event> = framed
        .iter()
        .enumerate()
        .map(|(i, v)| {
            Event::new("orders", 0, i as i64).with_value(v[18..].to_vec()).with_value_schema("PROTOBUF", &version)
        })
        .collect();
    let functions =
        Functions::new(&env.clients, vec![Arc::new(Messages(ValueFormat::glue())) as Arc<dyn Handler>], &env.kafka)
            .await
            .expect("functions");
    let body = exactly_once::runtime::msk::encode(&events).to_string();
    let event = exactly_once::runtime::msk::parse(body.as_bytes()).expect("an MSK event");
    let answer = exactly_once::runtime::lambda::invoke(&functions, &event, None, false).await.expect("finished");
    assert_eq!((answer["processed"].as_u64(), answer["deadLettered"].as_u64()), (Some(2), Some(0)), "{answer}");
    assert_eq!(
        env.count("SELECT count(*) FROM messages WHERE order_id = 's-1' AND body->'tags'->>'channel' = 'web'").await,
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM messages WHERE order_id = 's-2' AND body->>'reason' = 'damaged'").await,
        1
    );
}
