//! `cdc`: row-change events, as a Postgres-to-Kafka CDC tool emits
//! them (Debezium's envelope: `op`, `before`, `after`, `source`), synced into the
//! ClickHouse table `cdc_rows`. Always on: it is part of every deployment, not a flag,
//! so the analytics copy of the database is never silently left behind by a deployment
//! that forgot to enable it.
//!
//! Payload: `{"op": "c"|"u"|"d"|"r", "before": {...}|null, "after": {...}|null,
//! "source": {"table": "users", "lsn": 123, "ts_ms": 1700000000000}}`. The row's primary
//! key is its `id` field. The event id is the change's source position and the row's
//! primary key (`<table>`, `<lsn>`, `<id>`), so a change re-sent by the connector after a
//! restart is the same event; the `idempotency_key` header wins when present. A
//! tombstone (the null value Debezium sends after a delete, for compaction) is confirmed
//! under its position and writes nothing. The
//! position alone is not enough: a snapshot (`op: "r"`) reads every row of a table at
//! one LSN, and a transaction's changes may share one, so only the key tells them apart.
//!
//! The envelope arrives as JSON or, as Debezium is usually set up (its Avro converter
//! with a schema registry), as Avro in Confluent's wire format: both are read
//! (`ValueFormat::confluent_or_json()`), and a change has the same id in either, so a
//! connector switched from one converter to the other does not apply a change twice.

use exactly_once::clickhouse::Row;
use exactly_once::{async_trait, Event, FunctionSpec, Handler, HandlerContext, HandlerError, IdStrategy, ValueFormat};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_repr::Serialize_repr;

pub const NAME: &str = "cdc";
pub const TOPICS: &[&str] = &["cdc-changes"];
pub const TABLE: &str = "cdc_rows";
pub const CLICKHOUSE_DDL: &str = include_str!("../../../migrations/clickhouse/cdc_rows.sql");

/// The samples' envelope in Avro, shaped as Debezium's Avro converter writes a change of
/// the `users` table (its row type named once, referred to again for `after`; the source
/// block cut to the fields read here).
pub const SAMPLE_AVRO_SCHEMA: &str = r#"{
  "type": "record", "name": "Envelope", "namespace": "dbserver1.public.users",
  "fields": [
    {"name": "before", "type": ["null", {"type": "record", "name": "Value", "fields": [
      {"name": "id", "type": "long"},
      {"name": "email", "type": "string"},
      {"name": "version", "type": "long"}]}], "default": null},
    {"name": "after", "type": ["null", "Value"], "default": null},
    {"name": "source", "type": {"type": "record", "name": "Source", "namespace": "io.debezium.connector.postgresql",
      "fields": [
        {"name": "table", "type": "string"},
        {"name": "lsn", "type": ["null", "long"], "default": null},
        {"name": "ts_ms", "type": "long"}]}},
    {"name": "op", "type": "string"},
    {"name": "ts_ms", "type": ["null", "long"], "default": null}
  ]
}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize_repr)]
#[repr(i8)]
pub enum Op {
    #[serde(rename = "c")]
    Create = 1,
    #[serde(rename = "u")]
    Update = 2,
    #[serde(rename = "d")]
    Delete = 3,
    /// A snapshot read.
    #[serde(rename = "r")]
    Read = 4,
}

#[derive(Debug, Deserialize)]
pub struct Change {
    pub op: Op,
    #[serde(default)]
    pub before: Option<Value>,
    #[serde(default)]
    pub after: Option<Value>,
    pub source: Source,
}

#[derive(Debug, Deserialize)]
pub struct Source {
    pub table: String,
    pub lsn: u64,
    #[serde(default)]
    pub ts_ms: Option<u64>,
}

#[derive(Debug, Clone, Row, Serialize)]
#[clickhouse(crate = "exactly_once::clickhouse")]
pub struct CdcRow {
    pub source_table: String,
    pub pk: String,
    pub op: Op,
    pub data: String,
    pub is_deleted: u8,
    pub lsn: u64,
    pub changed_at: u32,
    pub event_id: String,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Cdc;

fn pk_of(image: &Value) -> Option<String> {
    match image.get("id")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[async_trait]
impl Handler for Cdc {
    fn spec(&self) -> FunctionSpec {
        FunctionSpec::new(
            NAME,
            TOPICS,
            IdStrategy::FirstOf(vec![
                IdStrategy::Header(exactly_once::event_id::IDEMPOTENCY_KEY_HEADER.into()),
                // The primary key of the row image the handler writes: the new image
                // (`after`) for c, u and r; the old one (`before`) for d, the only op
                // whose `after` is null, so it falls through to the second composite.
                IdStrategy::Composite(vec!["/source/table".into(), "/source/lsn".into(), "/after/id".into()]),
                IdStrategy::Composite(vec!["/source/table".into(), "/source/lsn".into(), "/before/id".into()]),
                // Last: the record's position, for what carries no change to name it by:
                // a tombstone (null value), or a broken change the handler then refuses
                // (dead-lettered as `payload_invalid`, under its own position).
                IdStrategy::Offset,
            ]),
        )
        .clickhouse_ddl(CLICKHOUSE_DDL)
        .values(ValueFormat::confluent_or_json())
    }

    async fn handle(&self, event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        if event.value.is_none() {
            // Debezium's tombstone after a delete, for log compaction: the delete itself
            // carried the change (its old image), so there is nothing to write.
            return Ok(());
        }
        let change: Change = ctx.payload()?;
        // Deletes carry the old image; everything else the new one.
        let image = match change.op {
            Op::Delete => change.before.as_ref(),
            _ => change.after.as_ref(),
        }
        .ok_or_else(|| {
            HandlerError::permanent("payload_invalid", format!("{:?} change without its row image", change.op))
        })?;
        let pk =
            pk_of(image).ok_or_else(|| HandlerError::permanent("payload_invalid", "row image has no scalar `id`"))?;
        let changed_at = change.source.ts_ms.or(event.timestamp_ms.map(|t| t.max(0) as u64)).unwrap_or(0) / 1000;
        let row = CdcRow {
            source_table: change.source.table,
            pk,
            op: change.op,
            data: image.to_string(),
            is_deleted: u8::from(change.op == Op::Delete),
            lsn: change.source.lsn,
            changed_at: u32::try_from(changed_at).unwrap_or(u32::MAX),
            event_id: ctx.event_id().to_string(),
        };
        ctx.clickhouse(TABLE, row)
    }

    fn sample_avro_schema(&self) -> Option<&'static str> {
        Some(SAMPLE_AVRO_SCHEMA)
    }

    fn sample(&self, n: u64) -> Option<Vec<u8>> {
        // Rows 0..50 of `users`: created, then updated, now and then deleted.
        let id = n % 50;
        let op = match n / 50 {
            0 => "c",
            k if k % 5 == 4 => "d",
            _ => "u",
        };
        let image = serde_json::json!({"id": id, "email": format!("user{id}@example.com"), "version": n});
        let (before, after) = if op == "d" { (image, Value::Null) } else { (Value::Null, image) };
        Some(
            serde_json::json!({
                "op": op, "before": before, "after": after,
                "source": {"table": "users", "lsn": 1_000 + n, "ts_ms": 1_700_000_000_000u64 + n * 1000},
            })
            .to_string()
            .into_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_once::payload::{avro_from_json, AvroSchema};

    #[test]
    fn every_sample_encodes_in_the_avro_envelope_and_decodes_back() {
        let schema = AvroSchema::parse(SAMPLE_AVRO_SCHEMA).expect("the sample schema parses");
        for n in [0, 1, 49, 50, 200, 249] {
            let json: Value = serde_json::from_slice(&Cdc.sample(n).unwrap()).unwrap();
            let body = avro_from_json(schema.schema(), json.clone()).unwrap_or_else(|e| panic!("sample {n}: {e}"));
            let back = schema.decode(1, &body).unwrap();
            for field in ["op", "before", "after", "source"] {
                assert_eq!(back[field], json[field], "sample {n}, `{field}`");
            }
        }
    }
}
