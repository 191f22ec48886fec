//! Values framed for a schema registry (Confluent's wire format, Avro), written by
//! Confluent's own Python serializer (confluent-kafka with fastavro, from PyPI:
//! `scripts/pyclients.sh`) against a stand-in registry serving Confluent's REST API
//! (`integration_tests::registry`; no Confluent registry runs here). The worker consumes
//! them from the broker exactly once, and every way a value can be wrong ends in its own
//! outcome: dead-lettered with its reason, or retried while the registry is down.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use exactly_once::config::{GuardConfig, Secret, WorkerConfig};
use exactly_once::payload::confluent_framed;
use exactly_once::runtime::worker::create_topics;
use exactly_once::runtime::{Functions, Worker};
use exactly_once::{
    async_trait, DeadLetterReason, Event, FailureKind, FunctionSpec, Guard, Handler, HandlerContext, HandlerError,
    IdStrategy, Outcome, ValueFormat,
};
use integration_tests::registry::Registry;
use integration_tests::{committed_offsets, run_python, wait_until, TestEnv};

const PARTITIONS: i32 = 3;

/// The order as the handler reads it: serde, from the decoded Avro record.
#[derive(Debug, serde::Deserialize)]
struct Order {
    order_id: String,
    amount: i64,
    note: Option<String>,
    placed_at: i64,
}

/// Writes each order to Postgres in the guard's transaction.
struct Orders(ValueFormat);

#[async_trait]
impl Handler for Orders {
    fn spec(&self) -> FunctionSpec {
        FunctionSpec::new("orders", &["orders"], IdStrategy::default_chain(Some("/order_id"), None)).values(self.0)
    }

    async fn handle(&self, _event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        let order: Order = ctx.payload()?;
        sqlx::query("INSERT INTO orders (order_id, amount, note, placed_at) VALUES ($1, $2, $3, $4)")
            .bind(&order.order_id)
            .bind(order.amount)
            .bind(&order.note)
            .bind(order.placed_at)
            .execute(ctx.postgres().await?)
            .await?;
        Ok(())
    }
}

async fn orders_table(env: &TestEnv) {
    sqlx::query("CREATE TABLE orders (order_id TEXT NOT NULL, amount BIGINT NOT NULL, note TEXT, placed_at BIGINT)")
        .execute(env.pg())
        .await
        .unwrap();
}

async fn env_with(registry: &Registry, credentials: Option<(&str, &str)>) -> TestEnv {
    let url = registry.url().to_owned();
    let credentials = credentials.map(|(u, p)| (u.to_owned(), p.to_owned()));
    let env = TestEnv::with(|c| {
        c.registry.url = Some(Secret::new(url));
        if let Some((u, p)) = credentials {
            c.registry.username = Some(u);
            c.registry.password = Some(Secret::new(p));
        }
        c.registry.breaker.open_for = Duration::from_millis(200);
    })
    .await;
    orders_table(&env).await;
    env
}

fn order_line(id: &str, amount: i64) -> String {
    format!("{{\"order_id\": \"{id}\", \"amount\": {amount}, \"note\": \"n-{id}\"}}\n")
}

/// Framed values, as Confluent's serializer writes them for these orders.
async fn encode(registry: &Registry, orders: &[(&str, i64)]) -> Vec<Vec<u8>> {
    let input: String = orders.iter().map(|(id, amount)| order_line(id, *amount)).collect();
    let out = run_python("confluent_serialize.py", &["encode", "--registry", registry.url()], &input).await;
    out.lines().map(from_hex).collect()
}

/// Framed values of any records of `schema`, as Confluent's serializer writes them.
async fn encode_with(registry: &Registry, schema: &str, records: &[serde_json::Value]) -> Vec<Vec<u8>> {
    encode_as(registry, "avro", schema, records).await
}

/// Framed values of any records of `schema`, in `format` (`avro` or `json`, a JSON Schema).
async fn encode_as(registry: &Registry, format: &str, schema: &str, records: &[serde_json::Value]) -> Vec<Vec<u8>> {
    let file = std::env::temp_dir().join(format!("{}.schema", integration_tests::unique("schema")));
    std::fs::write(&file, schema).unwrap();
    let input: String = records.iter().map(|r| format!("{r}\n")).collect();
    let path = file.to_string_lossy().into_owned();
    let args = ["encode", "--registry", registry.url(), "--format", format, "--schema-file", &path];
    let out = run_python("confluent_serialize.py", &args, &input).await;
    let _ = std::fs::remove_file(&file);
    out.lines().map(from_hex).collect()
}

fn from_hex(line: &str) -> Vec<u8> {
    (0..line.len()).step_by(2).map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex")).collect()
}

fn guard(env: &TestEnv, format: ValueFormat) -> Guard {
    let spec = Orders(format).spec();
    Guard::new(&env.clients, spec.name, spec.id_strategy, GuardConfig::default()).unwrap().with_values(format)
}

fn record(offset: i64, value: Vec<u8>) -> Event {
    Event::new("orders", 0, offset).with_value(value)
}

#[tokio::test]
async fn avro_orders_from_confluent_kafka_are_consumed_exactly_once_by_the_worker() {
    let registry = Registry::start_with(Some(("svc", "s3cret"))).await;
    let mut env = env_with(&registry, Some(("svc", "s3cret"))).await;
    env.kafka.topic_partitions = PARTITIONS;
    let topic = env.kafka.topic("orders");
    create_topics(&env.kafka, std::slice::from_ref(&topic)).await.expect("topic");
    // 200 orders, the first 60 sent twice (a producer's retry): 260 records, 200 orders.
    let mut input = String::new();
    for i in 0..200 {
        input.push_str(&order_line(&format!("o-{i}"), i));
        if i < 60 {
            input.push_str(&order_line(&format!("o-{i}"), i));
        }
    }
    let sent = run_python(
        "confluent_serialize.py",
        &[
            "produce",
            "--registry",
            registry.url(),
            "--user",
            "svc",
            "--password",
            "s3cret",
            "--brokers",
            &env.kafka.brokers,
            "--topic",
            &topic,
        ],
        &input,
    )
    .await;
    assert_eq!(sent.trim(), "260");

    let functions = Arc::new(
        Functions::new(&env.clients, vec![Arc::new(Orders(ValueFormat::confluent())) as Arc<dyn Handler>], &env.kafka)
            .await
            .expect("functions"),
    );
    let mut config = WorkerConfig::from_env(&exactly_once::config::ProcessEnv).expect("worker configuration");
    config.batch_size = 50;
    config.retry_backoff = Duration::from_millis(50);
    let worker = Worker::start(&env.clients, functions, &env.kafka, &config).await.expect("worker starts");
    wait_until(Duration::from_secs(120), "every order stored and every offset committed", || async {
        if env.count("SELECT count(*) FROM orders").await < 200 {
            return false;
        }
        let committed = committed_offsets(&env.kafka, &topic, PARTITIONS).await;
        committed.values().sum::<i64>() == 260
    })
    .await;
    worker.shutdown().await;

    assert_eq!(env.count("SELECT count(*) FROM orders").await, 200);
    assert_eq!(env.count("SELECT count(DISTINCT order_id) FROM orders").await, 200);
    assert_eq!(env.count("SELECT sum(amount)::bigint FROM orders").await, (0..200).sum::<i64>());
    assert_eq!(
        env.count("SELECT count(*) FROM orders WHERE note = 'n-' || order_id AND placed_at = 1700000000000").await,
        200
    );
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE event_id LIKE 'f:o-%'").await, 200);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    // One schema, fetched once by a process whose partitions all needed it at once.
    assert_eq!(env.clients.registry.fetches(), 1);
    assert_eq!(registry.lookups(), 1);
}

#[tokio::test]
async fn every_undecodable_value_is_dead_lettered_with_its_own_reason() {
    let registry = Registry::start().await;
    let env = env_with(&registry, None).await;
    let framed = encode(&registry, &[("good", 5), ("other", 6)]).await;
    let good = framed[0].clone();
    // The same datum under another schema's id: it does not decode as that schema.
    let other_id =
        registry.register(r#"{"type":"record","name":"Other","fields":[{"name":"n","type":"long"}]}"#, "AVRO");
    let mismatched = confluent_framed(other_id, &framed[1][5..]);
    let records = vec![
        record(1, good.clone()),
        record(2, br#"{"order_id": "plain"}"#.to_vec()),
        record(3, good[..4].to_vec()),
        record(4, mismatched),
        record(5, confluent_framed(999, &good[5..])),
        record(6, confluent_framed(registry.register("{\"type\": \"string\"", "AVRO"), b"\x02a")),
        // A schema type this library does not decode.
        record(7, confluent_framed(registry.register_in("xml-value", "<order/>", "XML", vec![]).0, b"<order/>")),
    ];
    let g = guard(&env, ValueFormat::confluent());
    let report = g.run_batch(&Orders(ValueFormat::confluent()), &records, None).await;
    let outcomes: Vec<&Outcome> = report.outcomes.iter().map(|o| &o.outcome).collect();
    let dead = |r: &'static str| Outcome::DeadLettered { reason: DeadLetterReason::Undecodable(r) };
    assert_eq!(
        outcomes,
        vec![
            &Outcome::Processed,
            &dead("payload_not_framed"),
            &dead("payload_truncated"),
            &dead("payload_schema_mismatch"),
            &dead("schema_unknown"),
            &dead("schema_invalid"),
            &dead("schema_unsupported"),
        ]
    );
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 1);
    let stored: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT reason, count(*) FROM dead_letters WHERE record_value IS NOT NULL GROUP BY reason",
    )
    .fetch_all(env.pg())
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert_eq!(stored.len(), 6, "{stored:?}");
    assert!(stored.values().all(|&n| n == 1), "{stored:?}");

    // With `confluent-or-json` the plain JSON value is read as JSON instead.
    let g = guard(&env, ValueFormat::confluent_or_json());
    let plain = record(8, br#"{"order_id": "plain-2", "amount": 1, "note": null, "placed_at": 3}"#.to_vec());
    let report = g.run_batch(&Orders(ValueFormat::confluent_or_json()), &[plain], None).await;
    assert_eq!(report.outcomes[0].outcome, Outcome::Processed);
    assert_eq!(env.count("SELECT count(*) FROM orders WHERE order_id = 'plain-2'").await, 1);
}

#[tokio::test]
async fn a_registry_outage_retries_framed_values_and_never_dead_letters_them() {
    let registry = Registry::start().await;
    let env = env_with(&registry, None).await;
    let framed = encode(&registry, &[("a", 1), ("b", 2)]).await;
    let records: Vec<Event> = framed.into_iter().enumerate().map(|(i, v)| record(i as i64, v)).collect();
    let g = guard(&env, ValueFormat::confluent());
    let h = Orders(ValueFormat::confluent());
    registry.set_failing(true);
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
    // The breaker opened after three failures: the fourth batch did not ask.
    assert_eq!(registry.lookups(), 3);

    registry.set_failing(false);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let report = g.run_batch(&h, &records, None).await;
    assert!(report.outcomes.iter().all(|o| o.outcome == Outcome::Processed), "{report:?}");
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
}

#[tokio::test]
async fn a_registry_url_that_is_not_a_registry_retries_instead_of_dead_lettering() {
    // A wrong base path: 404s, but not the registry's own "schema not found".
    let registry = Registry::start().await;
    let framed = encode(&registry, &[("w", 1)]).await;
    let url = format!("{}/not-the-api", registry.url());
    let env = TestEnv::with(|c| c.registry.url = Some(Secret::new(url))).await;
    orders_table(&env).await;
    let report = guard(&env, ValueFormat::confluent())
        .run_batch(&Orders(ValueFormat::confluent()), &[record(0, framed[0].clone())], None)
        .await;
    assert!(
        matches!(&report.outcomes[0].outcome, Outcome::Failed { kind: FailureKind::Unavailable, error, .. } if error.contains("not from a schema registry")),
        "{report:?}"
    );
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
}

#[tokio::test]
async fn a_function_over_framed_values_refuses_to_start_without_a_registry() {
    let env = TestEnv::new().await;
    let err =
        Functions::new(&env.clients, vec![Arc::new(Orders(ValueFormat::confluent())) as Arc<dyn Handler>], &env.kafka)
            .await
            .err()
            .expect("refused");
    assert!(err.to_string().contains("SCHEMA_REGISTRY_URL"), "{err}");
}

/// Records as a Lambda event source mapping with a schema registry hands them over,
/// through the same decoder and guard the Lambda handler runs (`lambda::invoke`).
async fn invoke_lambda(env: &TestEnv, events: &[Event]) -> serde_json::Value {
    invoke_lambda_with(env, Arc::new(Orders(ValueFormat::confluent())), events).await
}

async fn invoke_lambda_with(env: &TestEnv, handler: Arc<dyn Handler>, events: &[Event]) -> serde_json::Value {
    let functions = Functions::new(&env.clients, vec![handler], &env.kafka).await.expect("functions");
    let body = exactly_once::runtime::msk::encode(events).to_string();
    let event = exactly_once::runtime::msk::parse(body.as_bytes()).expect("an MSK event");
    exactly_once::runtime::lambda::invoke(&functions, &event, None, false).await.expect("every record finished")
}

#[tokio::test]
async fn on_lambda_values_the_event_source_mapping_decoded_to_json_are_read_as_json() {
    let registry = Registry::start().await;
    // LAMBDA_EVENT_RECORD_FORMAT=JSON, the default.
    let env = env_with(&registry, None).await;
    let json = |id: &str| format!(r#"{{"order_id": "{id}", "amount": 3, "note": null, "placed_at": 9}}"#);
    let events = vec![
        Event::new("orders", 0, 0).with_value(json("j-1")).with_value_schema("AVRO", "1"),
        Event::new("orders", 0, 1).with_value(json("j-2")).with_value_schema("AVRO", "1"),
        Event::new("orders", 1, 0).with_value(json("j-1")).with_value_schema("AVRO", "1"),
    ];
    let answer = invoke_lambda(&env, &events).await;
    assert_eq!((answer["processed"].as_u64(), answer["duplicates"].as_u64()), (Some(2), Some(1)), "{answer}");
    assert_eq!(env.count("SELECT count(*) FROM orders").await, 2);
    assert_eq!(registry.lookups(), 0, "the mapping decoded them: no registry needed here");
}

#[tokio::test]
async fn on_lambda_source_values_are_decoded_with_the_schema_their_metadata_names() {
    let registry = Registry::start().await;
    let url = registry.url().to_owned();
    let env = TestEnv::with(|c| {
        c.registry.url = Some(Secret::new(url));
        c.guard.event_record_format = exactly_once::config::EventRecordFormat::Source;
    })
    .await;
    orders_table(&env).await;
    let framed = encode(&registry, &[("s-1", 1), ("s-2", 2)]).await;
    let id = u32::from_be_bytes([framed[0][1], framed[0][2], framed[0][3], framed[0][4]]).to_string();
    // SOURCE: the mapping removed the frame; the id is in the metadata.
    let events = vec![
        Event::new("orders", 0, 0).with_value(framed[0][5..].to_vec()).with_value_schema("AVRO", &id),
        Event::new("orders", 0, 1).with_value(framed[1][5..].to_vec()).with_value_schema("AVRO", &id),
        Event::new("orders", 0, 2).with_value(framed[1][5..].to_vec()).with_value_schema("AVRO", "2c6b8a1e-glue-uuid"),
        // The metadata says Protobuf, the schema is Avro.
        Event::new("orders", 0, 3).with_value(framed[1][5..].to_vec()).with_value_schema("PROTOBUF", &id),
        Event::new("orders", 0, 4).with_value(framed[1][5..].to_vec()).with_value_schema("THRIFT", &id),
    ];
    let answer = invoke_lambda(&env, &events).await;
    assert_eq!((answer["processed"].as_u64(), answer["deadLettered"].as_u64()), (Some(2), Some(3)), "{answer}");
    assert_eq!(env.count("SELECT count(*) FROM orders WHERE order_id IN ('s-1', 's-2')").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE reason = 'schema_unsupported'").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE reason = 'payload_schema_mismatch'").await, 1);
}

#[tokio::test]
async fn debezium_avro_changes_reach_cdc_and_their_json_copies_are_duplicates() {
    let registry = Registry::start().await;
    let env = env_with(&registry, None).await;
    env.clients.sink.apply_ddl(cdc::CLICKHOUSE_DDL).await.unwrap();
    let change = |op: &str, id: i64, version: i64, lsn: i64| {
        let image = serde_json::json!({"id": id, "email": format!("u{id}@example.com"), "version": version});
        serde_json::json!({
            "before": null, "after": image, "op": op, "ts_ms": null,
            "source": {"table": "users", "lsn": lsn, "ts_ms": 1_700_000_000_000i64 + lsn},
        })
    };
    let changes = vec![change("c", 1, 1, 100), change("u", 1, 2, 101), change("c", 2, 1, 102)];
    // Debezium's Avro converter's framing and encoding, by Confluent's serializer.
    let framed = encode_with(&registry, cdc::SAMPLE_AVRO_SCHEMA, &changes).await;
    let spec = cdc::Cdc.spec();
    let g = Guard::new(&env.clients, spec.name, spec.id_strategy, GuardConfig::default())
        .unwrap()
        .with_values(spec.value_format);
    let avro: Vec<Event> =
        framed.into_iter().enumerate().map(|(i, v)| Event::new("cdc-changes", 0, i as i64).with_value(v)).collect();
    let report = g.run_batch(&cdc::Cdc, &avro, None).await;
    assert!(report.outcomes.iter().all(|o| o.outcome == Outcome::Processed), "{report:?}");
    assert_eq!(env.clickhouse_count("SELECT count() FROM cdc_rows FINAL").await, 2);
    assert_eq!(
        env.clickhouse_count(
            "SELECT count() FROM cdc_rows FINAL WHERE pk = '1' AND lsn = 101 AND data LIKE '%\"version\":2%'"
        )
        .await,
        1
    );
    // The same changes as the JSON converter writes them: the same ids, so duplicates.
    let json: Vec<Event> = changes
        .iter()
        .enumerate()
        .map(|(i, c)| Event::new("cdc-changes", 1, i as i64).with_value(c.to_string()))
        .collect();
    let report = g.run_batch(&cdc::Cdc, &json, None).await;
    assert!(report.outcomes.iter().all(|o| matches!(o.outcome, Outcome::Duplicate { .. })), "{report:?}");
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE namespace = 'cdc'").await, 3);
}

#[tokio::test]
async fn json_schema_values_from_confluent_kafka_are_checked_against_their_schema() {
    let registry = Registry::start().await;
    let env = env_with(&registry, None).await;
    let schema = r#"{"$schema": "http://json-schema.org/draft-07/schema#", "title": "Order", "type": "object",
        "properties": {"order_id": {"type": "string"}, "amount": {"type": "integer", "minimum": 0},
            "note": {"type": ["string", "null"]}, "placed_at": {"type": "integer"}},
        "required": ["order_id", "amount", "placed_at"]}"#;
    let orders = [
        serde_json::json!({"order_id": "js-1", "amount": 4, "note": "a", "placed_at": 7}),
        serde_json::json!({"order_id": "js-2", "amount": 5, "note": null, "placed_at": 8}),
    ];
    // JSONSerializer validates, registers the schema (type JSON) and frames the text.
    let framed = encode_as(&registry, "json", schema, &orders).await;
    let id = u32::from_be_bytes([framed[0][1], framed[0][2], framed[0][3], framed[0][4]]);
    // What a producer that skips validation could send under the same schema.
    let invalid = confluent_framed(id, br#"{"order_id": "js-3", "amount": -1, "placed_at": 9}"#);
    let not_json = confluent_framed(id, b"{\"order_id\": ");
    let records =
        vec![record(0, framed[0].clone()), record(1, framed[1].clone()), record(2, invalid), record(3, not_json)];
    let report =
        guard(&env, ValueFormat::confluent()).run_batch(&Orders(ValueFormat::confluent()), &records, None).await;
    let dead = Outcome::DeadLettered { reason: DeadLetterReason::Undecodable("payload_schema_mismatch") };
    let outcomes: Vec<&Outcome> = report.outcomes.iter().map(|o| &o.outcome).collect();
    assert_eq!(outcomes, vec![&Outcome::Processed, &Outcome::Processed, &dead, &dead], "{report:?}");
    assert_eq!(env.count("SELECT count(*) FROM orders WHERE order_id IN ('js-1', 'js-2')").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE error LIKE '%/amount%'").await, 1);
    assert_eq!(registry.lookups(), 1);
}

#[tokio::test]
async fn without_a_registry_framed_values_are_filed_and_json_ones_flow() {
    // `confluent_or_json()` starts without a registry (cdc does, in every deployment).
    let env = TestEnv::new().await;
    orders_table(&env).await;
    let records = vec![
        record(0, confluent_framed(1, b"\x02a")),
        record(1, br#"{"order_id": "plain-3", "amount": 2, "note": null, "placed_at": 1}"#.to_vec()),
    ];
    let report = guard(&env, ValueFormat::confluent_or_json())
        .run_batch(&Orders(ValueFormat::confluent_or_json()), &records, None)
        .await;
    assert_eq!(
        report.outcomes[0].outcome,
        Outcome::DeadLettered { reason: DeadLetterReason::Undecodable("schema_registry_unset") }
    );
    assert_eq!(report.outcomes[1].outcome, Outcome::Processed);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE reason = 'schema_registry_unset'").await, 1);
}

#[tokio::test]
async fn on_lambda_source_bytes_under_the_json_setting_wait_for_the_setting() {
    // The mapping sends SOURCE while LAMBDA_EVENT_RECORD_FORMAT says JSON: no record is
    // to blame, so none is dead-lettered; they wait (retried) for the setting.
    let registry = Registry::start().await;
    let env = env_with(&registry, None).await;
    let framed = encode(&registry, &[("m", 1)]).await;
    let event = record(0, framed[0][5..].to_vec()).with_value_schema("AVRO", "1");
    let report =
        guard(&env, ValueFormat::confluent()).run_batch(&Orders(ValueFormat::confluent()), &[event], None).await;
    assert!(
        matches!(&report.outcomes[0].outcome, Outcome::Failed { kind: FailureKind::Unavailable, error, .. } if error.contains("set it to SOURCE")),
        "{report:?}"
    );
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
}

/// A Protobuf `shop.Order` (or `shop.Refund`) as the handler reads it: serde, from the
/// decoded message (proto field names; the Timestamp as RFC 3339 text, as proto3 JSON
/// writes it).
#[derive(Debug, serde::Deserialize)]
struct ProtoOrder {
    order_id: String,
    amount: i64,
    #[serde(default)]
    placed_at: Option<String>,
    #[serde(default)]
    total: Option<Money>,
    #[serde(default)]
    lines: Vec<Line>,
}

#[derive(Debug, serde::Deserialize)]
struct Money {
    cents: i64,
    currency: String,
}

#[derive(Debug, serde::Deserialize)]
struct Line {
    sku: String,
    quantity: i64,
}

/// Writes each Protobuf order to Postgres in the guard's transaction.
struct ProtoOrders;

#[async_trait]
impl Handler for ProtoOrders {
    fn spec(&self) -> FunctionSpec {
        FunctionSpec::new("proto-orders", &["proto-orders"], IdStrategy::default_chain(Some("/order_id"), None))
            .values(ValueFormat::confluent())
    }

    async fn handle(&self, _event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        let o: ProtoOrder = ctx.payload()?;
        let skus: Vec<String> = o.lines.iter().map(|l| format!("{}x{}", l.sku, l.quantity)).collect();
        sqlx::query("INSERT INTO proto_orders (order_id, amount, placed_at, cents, currency, skus) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&o.order_id)
            .bind(o.amount)
            .bind(&o.placed_at)
            .bind(o.total.as_ref().map(|t| t.cents))
            .bind(o.total.as_ref().map(|t| t.currency.clone()))
            .bind(skus.join(","))
            .execute(ctx.postgres().await?)
            .await?;
        Ok(())
    }
}

async fn proto_orders_table(env: &TestEnv) {
    sqlx::query(
        "CREATE TABLE proto_orders (order_id TEXT NOT NULL, amount BIGINT NOT NULL, placed_at TEXT, cents BIGINT, currency TEXT, skus TEXT)",
    )
    .execute(env.pg())
    .await
    .unwrap();
}

fn proto_order_line(id: &str, amount: i64) -> String {
    format!(
        "{{\"order_id\": \"{id}\", \"amount\": {amount}, \"placed_at\": \"2026-12-06T10:00:00Z\", \"total\": {{\"cents\": {}, \"currency\": \"EUR\"}}, \"lines\": [{{\"sku\": \"s-{id}\", \"quantity\": 2}}]}}\n",
        amount * 100
    )
}

/// Protobuf values as Confluent's ProtobufSerializer frames them (`message`: `Order` or
/// `Refund`, the file's second message).
async fn encode_proto(registry: &Registry, message: &str, lines: &str) -> Vec<Vec<u8>> {
    let args = ["encode", "--registry", registry.url(), "--format", "protobuf", "--message", message];
    run_python("confluent_serialize.py", &args, lines).await.lines().map(from_hex).collect()
}

#[tokio::test]
async fn protobuf_orders_from_confluent_kafka_are_consumed_exactly_once_by_the_worker() {
    let registry = Registry::start().await;
    let mut env = env_with(&registry, None).await;
    proto_orders_table(&env).await;
    env.kafka.topic_partitions = PARTITIONS;
    let topic = env.kafka.topic("proto-orders");
    create_topics(&env.kafka, std::slice::from_ref(&topic)).await.expect("topic");
    // 100 orders, the first 30 sent twice: 130 records.
    let mut input = String::new();
    for i in 0..100 {
        input.push_str(&proto_order_line(&format!("p-{i}"), i));
        if i < 30 {
            input.push_str(&proto_order_line(&format!("p-{i}"), i));
        }
    }
    let args = [
        "produce",
        "--registry",
        registry.url(),
        "--format",
        "protobuf",
        "--brokers",
        &env.kafka.brokers,
        "--topic",
        &topic,
    ];
    assert_eq!(run_python("confluent_serialize.py", &args, &input).await.trim(), "130");

    let functions = Arc::new(
        Functions::new(&env.clients, vec![Arc::new(ProtoOrders) as Arc<dyn Handler>], &env.kafka).await.unwrap(),
    );
    let mut config = WorkerConfig::from_env(&exactly_once::config::ProcessEnv).expect("worker configuration");
    config.batch_size = 40;
    let worker = Worker::start(&env.clients, functions, &env.kafka, &config).await.expect("worker starts");
    wait_until(Duration::from_secs(120), "every order stored and every offset committed", || async {
        if env.count("SELECT count(*) FROM proto_orders").await < 100 {
            return false;
        }
        committed_offsets(&env.kafka, &topic, PARTITIONS).await.values().sum::<i64>() == 130
    })
    .await;
    worker.shutdown().await;

    assert_eq!(env.count("SELECT count(*) FROM proto_orders").await, 100);
    assert_eq!(env.count("SELECT count(DISTINCT order_id) FROM proto_orders").await, 100);
    assert_eq!(env.count("SELECT sum(amount)::bigint FROM proto_orders").await, (0..100).sum::<i64>());
    assert_eq!(env.count("SELECT sum(cents)::bigint FROM proto_orders").await, (0..100).sum::<i64>() * 100);
    assert_eq!(
        env.count(
            "SELECT count(*) FROM proto_orders WHERE placed_at = '2026-12-06T10:00:00Z' AND currency = 'EUR' AND skus = 's-' || order_id || 'x2'"
        )
        .await,
        100
    );
    assert_eq!(env.count("SELECT count(*) FROM processed_events WHERE event_id LIKE 'f:p-%'").await, 100);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
    // Fetched once: the schema's type, its serialized descriptor, and the file it
    // imports (shop/common.proto) through its reference; the well-known Timestamp is
    // built in.
    assert_eq!(registry.lookups(), 3);
    assert_eq!(env.clients.registry.fetches(), 3);
}

#[tokio::test]
async fn protobuf_values_decode_by_message_index_and_each_bad_one_has_its_reason() {
    let registry = Registry::start().await;
    let env = env_with(&registry, None).await;
    proto_orders_table(&env).await;
    let orders = encode_proto(&registry, "Order", &proto_order_line("q-1", 7)).await;
    let refunds = encode_proto(&registry, "Refund", "{\"order_id\": \"q-r\", \"amount\": -7}\n").await;
    let (order, refund) = (orders[0].clone(), refunds[0].clone());
    // The Refund is the file's second message: indexes [1], one entry (zigzag 2, 2).
    assert_eq!(order[5], 0, "the first message: the single 0 byte");
    assert_eq!(refund[5..7], [2, 2]);
    let schema_id = u32::from_be_bytes([order[1], order[2], order[3], order[4]]);
    let with_indexes = |indexes: &[u8], message: &[u8]| {
        let mut body = indexes.to_vec();
        body.extend_from_slice(message);
        confluent_framed(schema_id, &body)
    };
    // A Protobuf schema whose import is not registered.
    let (orphan, _) = registry.register_in(
        "orphan-value",
        &registry.schema(schema_id).expect("the Order's schema"),
        "PROTOBUF",
        vec![serde_json::json!({"name": "shop/common.proto", "subject": "no-such-subject", "version": 1})],
    );
    let records = vec![
        record(1, order.clone()),
        record(2, refund.clone()),
        // The Order's bytes read as a Refund: fields 3-6 are not in it.
        record(3, with_indexes(&[2, 2], &order[6..])),
        // A message index past the file's messages.
        record(4, with_indexes(&[2, 10], &order[6..])),
        // Cut inside a field.
        record(5, order[..order.len() - 3].to_vec()),
        record(6, confluent_framed(orphan, &order[5..])),
    ];
    let g = Guard::new(&env.clients, "proto-orders", ProtoOrders.spec().id_strategy, GuardConfig::default())
        .unwrap()
        .with_values(ValueFormat::confluent());
    let report = g.run_batch(&ProtoOrders, &records, None).await;
    let outcomes: Vec<&Outcome> = report.outcomes.iter().map(|o| &o.outcome).collect();
    let dead = |r: &'static str| Outcome::DeadLettered { reason: DeadLetterReason::Undecodable(r) };
    assert_eq!(
        outcomes,
        vec![
            &Outcome::Processed,
            &Outcome::Processed,
            &dead("payload_schema_mismatch"),
            &dead("payload_schema_mismatch"),
            &dead("payload_schema_mismatch"),
            &dead("schema_invalid"),
        ],
        "{report:?}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM proto_orders WHERE (order_id, amount) IN (('q-1', 7), ('q-r', -7))").await,
        2
    );
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE record_value IS NOT NULL").await, 4);
}

#[tokio::test]
async fn on_lambda_source_protobuf_values_are_read_with_or_without_message_indexes() {
    let registry = Registry::start().await;
    let url = registry.url().to_owned();
    let env = TestEnv::with(|c| {
        c.registry.url = Some(Secret::new(url));
        c.guard.event_record_format = exactly_once::config::EventRecordFormat::Source;
    })
    .await;
    proto_orders_table(&env).await;
    let framed = encode_proto(&registry, "Order", &(proto_order_line("ps-1", 4) + &proto_order_line("ps-2", 5))).await;
    let id = u32::from_be_bytes([framed[0][1], framed[0][2], framed[0][3], framed[0][4]]).to_string();
    // SOURCE: no frame, the schema id in the metadata; the first without message indexes,
    // the second with them (the single zero byte of the file's first message): AWS does
    // not say which the mapping sends, and both read the same.
    let events = vec![
        Event::new("proto-orders", 0, 0).with_value(framed[0][6..].to_vec()).with_value_schema("PROTOBUF", &id),
        Event::new("proto-orders", 0, 1).with_value(framed[1][5..].to_vec()).with_value_schema("PROTOBUF", &id),
    ];
    let answer = invoke_lambda_with(&env, Arc::new(ProtoOrders), &events).await;
    assert_eq!(answer["processed"].as_u64(), Some(2), "{answer}");
    assert_eq!(env.count("SELECT count(*) FROM proto_orders WHERE skus = 's-' || order_id || 'x2'").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters").await, 0);
}

#[tokio::test]
async fn avro_values_whose_schema_refers_to_other_registered_schemas_decode() {
    let registry = Registry::start().await;
    let env = env_with(&registry, None).await;
    let dir = std::env::temp_dir();
    let file = |name: &str, text: &str| {
        let path = dir.join(format!("{}-{name}.avsc", integration_tests::unique("ref")));
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };
    let money = file(
        "money",
        r#"{"type":"record","name":"Money","namespace":"shop","fields":[{"name":"units","type":"long"},
            {"name":"currency","type":{"type":"enum","name":"Currency","symbols":["EUR","USD"]}}]}"#,
    );
    let address = file(
        "address",
        r#"{"type":"record","name":"Address","namespace":"shop","fields":[{"name":"city","type":"string"}]}"#,
    );
    let order = file(
        "order",
        r#"{"type":"record","name":"PricedOrder","namespace":"shop","fields":[{"name":"order_id","type":"string"},
            {"name":"amount","type":"long"},{"name":"total","type":"shop.Money"},
            {"name":"ship_to","type":["null","shop.Address"],"default":null},
            {"name":"note","type":["null","string"],"default":null},{"name":"placed_at","type":"long"}]}"#,
    );
    let money_ref = format!("shop.Money=money-value={money}");
    let address_ref = format!("shop.Address=address-value={address}");
    // Confluent's serializer registers the two referenced schemas, then the order schema
    // with its references, and frames each value under the order schema's id.
    let args = [
        "encode",
        "--registry",
        registry.url(),
        "--schema-file",
        &order,
        "--reference",
        &money_ref,
        "--reference",
        &address_ref,
    ];
    let input = concat!(
        r#"{"order_id": "r-1", "amount": 5, "total": {"units": 500, "currency": "EUR"}, "ship_to": {"city": "Oslo"}, "note": null, "placed_at": 1}"#,
        "\n",
        r#"{"order_id": "r-2", "amount": 7, "total": {"units": 700, "currency": "USD"}, "ship_to": null, "note": "n", "placed_at": 2}"#,
        "\n"
    );
    let out = run_python("confluent_serialize.py", &args, input).await;
    let framed: Vec<Vec<u8>> = out.lines().map(from_hex).collect();
    assert_eq!(framed.len(), 2);
    let records: Vec<Event> = framed.iter().enumerate().map(|(i, v)| record(i as i64, v.clone())).collect();
    let report =
        guard(&env, ValueFormat::confluent()).run_batch(&Orders(ValueFormat::confluent()), &records, None).await;
    assert!(report.outcomes.iter().all(|o| o.outcome == Outcome::Processed), "{report:?}");
    assert_eq!(env.count("SELECT count(*) FROM orders WHERE order_id IN ('r-1', 'r-2')").await, 2);
    assert_eq!(env.clients.registry.fetches(), 3, "the schema and its two references, once each");
    // Every field as written, the referenced records and enum included.
    let schema = env
        .clients
        .registry
        .schema(u32::from_be_bytes([framed[0][1], framed[0][2], framed[0][3], framed[0][4]]))
        .await
        .unwrap();
    let decoded: Vec<serde_json::Value> =
        framed.iter().map(|v| schema.decode(exactly_once::payload::SchemaId::Confluent(0), &v[5..]).unwrap()).collect();
    assert_eq!(
        decoded,
        vec![
            serde_json::json!({"order_id": "r-1", "amount": 5, "total": {"units": 500, "currency": "EUR"}, "ship_to": {"city": "Oslo"}, "note": null, "placed_at": 1}),
            serde_json::json!({"order_id": "r-2", "amount": 7, "total": {"units": 700, "currency": "USD"}, "ship_to": null, "note": "n", "placed_at": 2}),
        ]
    );
    // The ids came from the decoded values (`/order_id`).
    assert!(
        report.outcomes.iter().all(|o| o.event_id.as_ref().is_some_and(|id| id.to_string().starts_with("f:r-"))),
        "{report:?}"
    );

    // A reference the registry does not have makes the schema unusable: schema_invalid.
    let (missing, _) = registry.register_in(
        "dangling-value",
        r#"{"type":"record","name":"D","fields":[{"name":"m","type":"shop.Gone"}]}"#,
        "AVRO",
        vec![serde_json::json!({"name": "shop.Gone", "subject": "gone", "version": 1})],
    );
    let report = guard(&env, ValueFormat::confluent())
        .run_batch(&Orders(ValueFormat::confluent()), &[record(9, confluent_framed(missing, b"\x00"))], None)
        .await;
    assert_eq!(
        report.outcomes[0].outcome,
        Outcome::DeadLettered { reason: DeadLetterReason::Undecodable("schema_invalid") },
        "{report:?}"
    );
    for f in [money, address, order] {
        let _ = std::fs::remove_file(f);
    }
}

#[tokio::test]
async fn json_schema_values_are_validated_with_the_documents_their_schema_references() {
    let registry = Registry::start().await;
    let env = env_with(&registry, None).await;
    let money = std::env::temp_dir().join(format!("{}-money.json", integration_tests::unique("ref")));
    std::fs::write(
        &money,
        r#"{"type": "object", "properties": {"units": {"type": "integer", "minimum": 0}}, "required": ["units"]}"#,
    )
    .unwrap();
    let schema = r#"{"type": "object", "properties": {"order_id": {"type": "string"}, "amount": {"type": "integer"},
        "placed_at": {"type": "integer"}, "total": {"$ref": "money.json"}},
        "required": ["order_id", "amount", "placed_at", "total"]}"#;
    let main = std::env::temp_dir().join(format!("{}-order.json", integration_tests::unique("ref")));
    std::fs::write(&main, schema).unwrap();
    let (money_path, main_path) = (money.to_string_lossy().into_owned(), main.to_string_lossy().into_owned());
    let reference = format!("money.json=money-json={money_path}");
    // JSONSerializer registers the referenced document, validates each order against the
    // schema with it, registers the schema with its reference, and frames the text.
    let args = [
        "encode",
        "--registry",
        registry.url(),
        "--format",
        "json",
        "--schema-file",
        &main_path,
        "--reference",
        &reference,
    ];
    let input = concat!(
        r#"{"order_id": "jr-1", "amount": 1, "placed_at": 1, "total": {"units": 100}}"#,
        "\n",
        r#"{"order_id": "jr-2", "amount": 2, "placed_at": 2, "total": {"units": 200}}"#,
        "\n"
    );
    let framed: Vec<Vec<u8>> = run_python("confluent_serialize.py", &args, input).await.lines().map(from_hex).collect();
    let id = u32::from_be_bytes([framed[0][1], framed[0][2], framed[0][3], framed[0][4]]);
    // What a producer that skips validation could send: the referenced document's rule broken.
    let invalid = confluent_framed(id, br#"{"order_id": "jr-3", "amount": 3, "placed_at": 3, "total": {"units": -1}}"#);
    let records = vec![record(0, framed[0].clone()), record(1, framed[1].clone()), record(2, invalid)];
    let report =
        guard(&env, ValueFormat::confluent()).run_batch(&Orders(ValueFormat::confluent()), &records, None).await;
    let outcomes: Vec<&Outcome> = report.outcomes.iter().map(|o| &o.outcome).collect();
    let dead = Outcome::DeadLettered { reason: DeadLetterReason::Undecodable("payload_schema_mismatch") };
    assert_eq!(outcomes, vec![&Outcome::Processed, &Outcome::Processed, &dead], "{report:?}");
    assert_eq!(env.count("SELECT count(*) FROM orders WHERE order_id IN ('jr-1', 'jr-2')").await, 2);
    assert_eq!(env.count("SELECT count(*) FROM dead_letters WHERE error LIKE '%/total/units%'").await, 1);
    assert_eq!(env.clients.registry.fetches(), 2, "the schema and its reference, once each");
    let _ = (std::fs::remove_file(money), std::fs::remove_file(main));
}

/// An order's key as the producer framed it: Avro, through the registry.
#[derive(Debug, serde::Deserialize)]
struct OrderKey {
    order_id: String,
    region: String,
}

/// Orders whose keys are framed too: the key's region goes in the note.
struct KeyedOrders;

#[async_trait]
impl Handler for KeyedOrders {
    fn spec(&self) -> FunctionSpec {
        FunctionSpec::new("keyed_orders", &["orders"], IdStrategy::default_chain(Some("/order_id"), None))
            .values(ValueFormat::confluent())
            .keys(ValueFormat::confluent())
    }

    async fn handle(&self, _event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        let key: OrderKey = ctx.key()?;
        let order: Order = ctx.payload()?;
        if key.order_id != order.order_id {
            return Err(HandlerError::permanent("key_mismatch", "the key names another order"));
        }
        sqlx::query("INSERT INTO orders (order_id, amount, note, placed_at) VALUES ($1, $2, $3, $4)")
            .bind(&order.order_id)
            .bind(order.amount)
            .bind(&key.region)
            .bind(order.placed_at)
            .execute(ctx.postgres().await?)
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn keys_framed_for_the_registry_are_decoded_and_a_bad_key_is_dead_lettered_with_its_reason() {
    let registry = Registry::start().await;
    let env = env_with(&registry, None).await;
    let key_schema = r#"{"type":"record","name":"OrderKey","namespace":"shop","fields":[
        {"name":"order_id","type":"string"},{"name":"region","type":"string"}]}"#;
    let file = std::env::temp_dir().join(format!("{}-key.avsc", integration_tests::unique("key")));
    std::fs::write(&file, key_schema).unwrap();
    let path = file.to_string_lossy().into_owned();
    // confluent-kafka's AvroSerializer for the record's key (subject `orders-key`).
    let args = ["encode", "--registry", registry.url(), "--field", "key", "--schema-file", &path];
    let input = "{\"order_id\": \"k-1\", \"region\": \"eu\"}\n{\"order_id\": \"k-2\", \"region\": \"us\"}\n";
    let keys: Vec<Vec<u8>> = run_python("confluent_serialize.py", &args, input).await.lines().map(from_hex).collect();
    let _ = std::fs::remove_file(&file);
    let values = encode(&registry, &[("k-1", 1), ("k-2", 2), ("k-3", 3), ("k-4", 4)]).await;
    let keyed = |offset: i64, key: Vec<u8>, value: &Vec<u8>| {
        Event::new("orders", 0, offset).with_key(key).with_value(value.clone())
    };
    let records = vec![
        keyed(0, keys[0].clone(), &values[0]),
        keyed(1, keys[1].clone(), &values[1]),
        // A key cut short, and one framed under a schema id the registry does not have.
        keyed(2, keys[0][..3].to_vec(), &values[2]),
        keyed(3, confluent_framed(4242, &keys[0][5..]), &values[3]),
        // A key over GUARD_MAX_VALUE_BYTES is refused, not read undecoded.
        keyed(4, vec![0u8; (1 << 20) + 1], &values[3]),
    ];
    let spec = KeyedOrders.spec();
    let g = Guard::new(&env.clients, spec.name, spec.id_strategy, GuardConfig::default())
        .unwrap()
        .with_values(spec.value_format)
        .with_keys(spec.key_format);
    let report = g.run_batch(&KeyedOrders, &records, None).await;
    let outcomes: Vec<&Outcome> = report.outcomes.iter().map(|o| &o.outcome).collect();
    let dead = |r: &'static str| Outcome::DeadLettered { reason: DeadLetterReason::Undecodable(r) };
    assert_eq!(
        outcomes,
        vec![
            &Outcome::Processed,
            &Outcome::Processed,
            &dead("payload_truncated"),
            &dead("schema_unknown"),
            &Outcome::DeadLettered { reason: DeadLetterReason::ValueTooLarge }
        ],
        "{report:?}"
    );
    assert_eq!(env.count("SELECT count(*) FROM orders WHERE order_id = 'k-1' AND note = 'eu'").await, 1);
    assert_eq!(env.count("SELECT count(*) FROM orders WHERE order_id = 'k-2' AND note = 'us'").await, 1);
    assert_eq!(
        env.count("SELECT count(*) FROM dead_letters WHERE error LIKE 'key%' AND record_key IS NOT NULL").await,
        3
    );
}

/// Plain keys (the default format), read with `ctx.key()`: the key's text goes in the note.
struct PlainKeys;

#[async_trait]
impl Handler for PlainKeys {
    fn spec(&self) -> FunctionSpec {
        FunctionSpec::new("plain_keys", &["orders"], IdStrategy::default_chain(Some("/order_id"), None))
    }

    async fn handle(&self, _event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        let key: String = ctx.key()?;
        let id = ctx.event_id().as_str().to_owned();
        sqlx::query("INSERT INTO orders (order_id, amount, note, placed_at) VALUES ($1, 0, $2, 0)")
            .bind(&id)
            .bind(&key)
            .execute(ctx.postgres().await?)
            .await?;
        Ok(())
    }
}

#[tokio::test]
async fn a_plain_key_is_read_as_text_or_json_and_a_missing_one_is_key_invalid() {
    let registry = Registry::start().await;
    let env = env_with(&registry, None).await;
    let records = vec![
        Event::new("orders", 0, 0).with_key("abc-1").with_value(r#"{"order_id": "p-1"}"#),
        Event::new("orders", 0, 1).with_key(r#""quoted""#).with_value(r#"{"order_id": "p-2"}"#),
        Event::new("orders", 0, 2).with_value(r#"{"order_id": "p-3"}"#),
        // A key framed for a registry, read by a function that did not declare it.
        Event::new("orders", 0, 3).with_key(confluent_framed(1, b"\x02a")).with_value(r#"{"order_id": "p-4"}"#),
    ];
    let spec = PlainKeys.spec();
    let g = Guard::new(&env.clients, spec.name, spec.id_strategy, GuardConfig::default()).unwrap();
    let report = g.run_batch(&PlainKeys, &records, None).await;
    let outcomes: Vec<&Outcome> = report.outcomes.iter().map(|o| &o.outcome).collect();
    assert_eq!(
        outcomes,
        vec![
            &Outcome::Processed,
            &Outcome::Processed,
            &Outcome::DeadLettered { reason: DeadLetterReason::Refused("key_invalid") },
            &Outcome::DeadLettered { reason: DeadLetterReason::Refused("key_invalid") }
        ],
        "{report:?}"
    );
    assert_eq!(env.count("SELECT count(*) FROM orders WHERE note IN ('abc-1', 'quoted')").await, 2);
}

#[tokio::test]
async fn protobuf_values_importing_google_common_types_decode_without_references() {
    let registry = Registry::start().await;
    let env = env_with(&registry, None).await;
    // confluent-kafka's ProtobufSerializer registers shop/priced.proto, which imports
    // google/type/money.proto and date.proto, without references for them.
    let lines = "{\"order_id\": \"pr-1\", \"price\": {\"currency_code\": \"NOK\", \"units\": \"99\", \"nanos\": 500000000}, \"due\": {\"year\": 2026, \"month\": 12, \"day\": 24}}\n";
    let framed = encode_proto(&registry, "Priced", lines).await;
    let id = u32::from_be_bytes([framed[0][1], framed[0][2], framed[0][3], framed[0][4]]);
    let schema = env.clients.registry.schema(id).await.expect("the schema links with the built-in common types");
    let decoded = schema.decode(exactly_once::payload::SchemaId::Confluent(id), &framed[0][5..]).unwrap();
    assert_eq!(
        decoded,
        serde_json::json!({
            "order_id": "pr-1",
            "price": {"currency_code": "NOK", "units": 99, "nanos": 500000000},
            "due": {"year": 2026, "month": 12, "day": 24}
        })
    );
    // The schema and its serialized descriptor; no reference was there to fetch.
    assert_eq!(env.clients.registry.fetches(), 2);
}
