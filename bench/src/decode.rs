//! What reading a value costs per event, for each format a function can declare, next to
//! JSON: the work the guard and the handler do on the CPU before any store is asked.
//!
//! For the same order record (`{"order_id", "amount", "note", "tags"}`), per event:
//! - `json`: the value parsed for the id (`/order_id`, as the payload-field strategy
//!   does) and again into the handler's struct (`ctx.payload()` on a plain value);
//! - `avro (confluent)`: the frame split, the datum decoded with its schema into JSON
//!   (the guard's step 0; the schema comes from the cache, as after the first record),
//!   the id read from it, and the struct deserialised from the decoded value;
//! - `json schema (confluent)`: the frame split, the JSON text parsed and validated
//!   against its (cached, compiled) schema, then the id and the struct as for Avro;
//! - `protobuf (confluent)`: the frame split, the message indexes read, the message
//!   decoded with its (cached) descriptor and written as JSON, then the id and the
//!   struct as for Avro;
//! - `avro (glue)` and `avro (glue, zlib)`: the same Avro datums in the AWS Glue Schema
//!   Registry's frame, plain and zlib-compressed (decompressed before decoding);
//! - `protobuf (glue)`: the same messages after Glue's message index, with the schema
//!   parsed from its `.proto` text (once, as the cache does).
//!
//! Each variant runs `rounds` times over `events` values (distinct ids); the median
//! round gives ns per event, and the ratio is against JSON in the same run.

use std::time::Instant;

use exactly_once::event_id::IdFormats;
use exactly_once::payload::{
    avro_from_json, confluent_frame, confluent_framed, glue_frame, glue_framed, AvroSchema, Framed, JsonSchema,
    PayloadError, GLUE_COMPRESSION_ZLIB,
};
use exactly_once::registry::RegistrySchema;
use exactly_once::{Event, IdStrategy};
use exactly_once_core::protobuf::ProtobufSchema;
use prost_reflect::prost::Message as _;
use prost_reflect::prost_types::field_descriptor_proto::{Label, Type};
use prost_reflect::prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto, OneofDescriptorProto};
use serde::{Deserialize, Serialize};

const ORDER_SCHEMA: &str = r#"{"type":"record","name":"Order","fields":[
    {"name":"order_id","type":"string"},
    {"name":"amount","type":"long"},
    {"name":"note","type":["null","string"],"default":null},
    {"name":"tags","type":{"type":"array","items":"string"}}]}"#;

const ORDER_JSON_SCHEMA: &str = r#"{"type":"object","properties":{
    "order_id":{"type":"string"},"amount":{"type":"integer"},
    "note":{"type":["string","null"]},"tags":{"type":"array","items":{"type":"string"}}},
    "required":["order_id","amount","tags"]}"#;

/// The same file as AWS Glue keeps it: `.proto` text.
const ORDER_PROTO: &str = "syntax = \"proto3\";
package bench;
message Order {
  string order_id = 1;
  int64 amount = 2;
  optional string note = 3;
  repeated string tags = 4;
}
";

/// bench/order.proto: `message Order { string order_id = 1; int64 amount = 2; optional
/// string note = 3; repeated string tags = 4; }` (`optional`: an absent note is absent,
/// not "", as the other formats' null).
fn order_proto() -> anyhow::Result<ProtobufSchema> {
    let field = |name: &str, number: i32, kind: Type, label: Label| FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(label as i32),
        r#type: Some(kind as i32),
        ..Default::default()
    };
    let mut note = field("note", 3, Type::String, Label::Optional);
    note.oneof_index = Some(0);
    note.proto3_optional = Some(true);
    let file = FileDescriptorProto {
        name: Some("bench/order.proto".into()),
        package: Some("bench".into()),
        message_type: vec![DescriptorProto {
            name: Some("Order".into()),
            field: vec![
                field("order_id", 1, Type::String, Label::Optional),
                field("amount", 2, Type::Int64, Label::Optional),
                note,
                field("tags", 4, Type::String, Label::Repeated),
            ],
            oneof_decl: vec![OneofDescriptorProto { name: Some("_note".into()), options: None }],
            ..Default::default()
        }],
        syntax: Some("proto3".into()),
        ..Default::default()
    };
    ProtobufSchema::from_descriptors(&file.encode_to_vec(), &[]).map_err(anyhow::Error::msg)
}

#[derive(Debug, Deserialize, PartialEq)]
struct Order {
    order_id: String,
    amount: i64,
    note: Option<String>,
    tags: Vec<String>,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DecodeOptions {
    /// Values per round.
    pub events: usize,
    /// Rounds per format (the median is reported).
    pub rounds: usize,
}

/// One format's figures.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    pub format: String,
    /// Bytes of an average value.
    pub value_bytes: f64,
    /// Median ns per event over the rounds.
    pub ns_per_event: f64,
    /// `ns_per_event` against JSON's, same run.
    pub vs_json: f64,
}

/// The run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct DecodeReport {
    pub machine: String,
    pub events: usize,
    pub rounds: usize,
    pub rows: Vec<DecodeRow>,
}

fn order(i: usize) -> serde_json::Value {
    serde_json::json!({
        "order_id": format!("order-{i:08}"),
        "amount": (i as i64) * 37 % 100_000,
        "note": match i % 3 {
            0 => serde_json::Value::Null,
            _ => format!("note {i}").into(),
        },
        "tags": ["web", "eu"],
    })
}

/// Runs every format; fails if a format reads a value differently from JSON.
pub fn run(opts: &DecodeOptions) -> anyhow::Result<DecodeReport> {
    let schema = AvroSchema::parse(ORDER_SCHEMA).map_err(anyhow::Error::msg)?;
    let ids = IdStrategy::PayloadField("/order_id".into());
    let orders: Vec<serde_json::Value> = (0..opts.events).map(order).collect();
    let json: Vec<Event> = orders.iter().map(|o| Event::new("orders", 0, 0).with_value(o.to_string())).collect();
    let avro: Vec<Event> = orders
        .iter()
        .map(|o| {
            let body = avro_from_json(schema.schema(), o.clone()).map_err(anyhow::Error::msg)?;
            Ok(Event::new("orders", 0, 0).with_value(confluent_framed(1, &body)))
        })
        .collect::<anyhow::Result<_>>()?;

    // The same datums in Glue's frame, as they are and zlib-compressed.
    let version = [7u8; 16];
    let glue: Vec<Event> = avro
        .iter()
        .map(|e| Event::new("orders", 0, 0).with_value(glue_framed(version, &e.value_bytes()[5..])))
        .collect();
    let glue_zlib: Vec<Event> = avro
        .iter()
        .map(|e| {
            use std::io::Write as _;
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            z.write_all(&e.value_bytes()[5..])?;
            let mut value = glue_framed(version, &z.finish()?);
            value[1] = GLUE_COMPRESSION_ZLIB;
            Ok(Event::new("orders", 0, 0).with_value(value))
        })
        .collect::<anyhow::Result<_>>()?;
    let avro_schema = RegistrySchema::Avro(schema.clone());
    let json_schema = RegistrySchema::Json(JsonSchema::parse(ORDER_JSON_SCHEMA).map_err(anyhow::Error::msg)?);
    let framed_json: Vec<Event> = orders
        .iter()
        .map(|o| Event::new("orders", 0, 0).with_value(confluent_framed(2, o.to_string().as_bytes())))
        .collect();
    let proto = order_proto()?;
    let protobuf: Vec<Event> = orders
        .iter()
        .map(|o| {
            let mut o = o.clone();
            // proto3 JSON has no null for a field that is absent: leave it out.
            if let Some(fields) = o.as_object_mut() {
                fields.retain(|_, v| !v.is_null());
            }
            let body = proto.encode_json(&[0], o).map_err(anyhow::Error::msg)?;
            Ok(Event::new("orders", 0, 0).with_value(confluent_framed(3, &body)))
        })
        .collect::<anyhow::Result<_>>()?;
    let proto_schema = RegistrySchema::Protobuf(proto);
    let glue_proto = ProtobufSchema::from_proto_text("bench/order.proto", ORDER_PROTO).map_err(anyhow::Error::msg)?;
    let glue_protobuf: Vec<Event> = protobuf
        .iter()
        .map(|e| {
            // Glue's index of the file's one message is 0, then the same message bytes.
            let mut body = vec![0u8];
            body.extend_from_slice(&e.value_bytes()[6..]);
            Event::new("orders", 0, 0).with_value(glue_framed(version, &body))
        })
        .collect();
    let glue_proto_schema = RegistrySchema::GlueProtobuf(glue_proto);
    // The same reading, every way, before anything is timed.
    for (i, (((j, a), f), p)) in json.iter().zip(&avro).zip(&framed_json).zip(&protobuf).enumerate() {
        let plain = read_json(&ids, j)?;
        anyhow::ensure!(plain == read_framed(&ids, &avro_schema, a)?, "Avro and JSON read differently");
        anyhow::ensure!(plain == read_glue(&ids, &avro_schema, &glue[i])?, "Glue Avro and JSON read differently");
        anyhow::ensure!(
            plain == read_glue(&ids, &avro_schema, &glue_zlib[i])?,
            "zlib Glue Avro and JSON read differently"
        );
        anyhow::ensure!(plain == read_framed(&ids, &json_schema, f)?, "JSON Schema and JSON read differently");
        anyhow::ensure!(plain == read_framed(&ids, &proto_schema, p)?, "Protobuf and JSON read differently");
        anyhow::ensure!(
            plain == read_glue(&ids, &glue_proto_schema, &glue_protobuf[i])?,
            "Glue Protobuf and JSON read differently"
        );
    }
    let time = |read: &dyn Fn(&Event) -> anyhow::Result<(String, Order)>, events: &[Event]| -> anyhow::Result<f64> {
        let mut rounds = Vec::with_capacity(opts.rounds);
        for _ in 0..opts.rounds.max(1) {
            let started = Instant::now();
            for e in events {
                std::hint::black_box(read(e)?);
            }
            rounds.push(started.elapsed().as_nanos() as f64 / events.len().max(1) as f64);
        }
        rounds.sort_by(f64::total_cmp);
        Ok(rounds[rounds.len() / 2])
    };
    let json_ns = time(&|e| read_json(&ids, e), &json)?;
    let avro_ns = time(&|e| read_framed(&ids, &avro_schema, e), &avro)?;
    let json_schema_ns = time(&|e| read_framed(&ids, &json_schema, e), &framed_json)?;
    let protobuf_ns = time(&|e| read_framed(&ids, &proto_schema, e), &protobuf)?;
    let glue_ns = time(&|e| read_glue(&ids, &avro_schema, e), &glue)?;
    let glue_zlib_ns = time(&|e| read_glue(&ids, &avro_schema, e), &glue_zlib)?;
    let glue_protobuf_ns = time(&|e| read_glue(&ids, &glue_proto_schema, e), &glue_protobuf)?;
    let bytes = |events: &[Event]| {
        events.iter().map(|e| e.value_bytes().len()).sum::<usize>() as f64 / events.len().max(1) as f64
    };
    Ok(DecodeReport {
        machine: crate::machine(),
        events: opts.events,
        rounds: opts.rounds,
        rows: vec![
            DecodeRow { format: "json".into(), value_bytes: bytes(&json), ns_per_event: json_ns, vs_json: 1.0 },
            DecodeRow {
                format: "avro (confluent)".into(),
                value_bytes: bytes(&avro),
                ns_per_event: avro_ns,
                vs_json: avro_ns / json_ns,
            },
            DecodeRow {
                format: "json schema (confluent)".into(),
                value_bytes: bytes(&framed_json),
                ns_per_event: json_schema_ns,
                vs_json: json_schema_ns / json_ns,
            },
            DecodeRow {
                format: "protobuf (confluent)".into(),
                value_bytes: bytes(&protobuf),
                ns_per_event: protobuf_ns,
                vs_json: protobuf_ns / json_ns,
            },
            DecodeRow {
                format: "avro (glue)".into(),
                value_bytes: bytes(&glue),
                ns_per_event: glue_ns,
                vs_json: glue_ns / json_ns,
            },
            DecodeRow {
                format: "avro (glue, zlib)".into(),
                value_bytes: bytes(&glue_zlib),
                ns_per_event: glue_zlib_ns,
                vs_json: glue_zlib_ns / json_ns,
            },
            DecodeRow {
                format: "protobuf (glue)".into(),
                value_bytes: bytes(&glue_protobuf),
                ns_per_event: glue_protobuf_ns,
                vs_json: glue_protobuf_ns / json_ns,
            },
        ],
    })
}

fn read_json(ids: &IdStrategy, e: &Event) -> anyhow::Result<(String, Order)> {
    let (id, _) = ids.derive_for(e, IdFormats::V2)?;
    let order: Order = serde_json::from_slice(e.value_bytes())?;
    Ok((id.to_string(), order))
}

/// A framed value as the guard's step 0 reads it (`RegistrySchema::decode`), then the id
/// and the handler's struct from the decoded value.
fn read_framed(ids: &IdStrategy, schema: &RegistrySchema, e: &Event) -> anyhow::Result<(String, Order)> {
    read_frame(ids, schema, e, confluent_frame(e.value_bytes()))
}

/// The same for a value in Glue's frame (decompressed into at most 1 MiB, the guard's
/// default `GUARD_MAX_VALUE_BYTES`).
fn read_glue(ids: &IdStrategy, schema: &RegistrySchema, e: &Event) -> anyhow::Result<(String, Order)> {
    read_frame(ids, schema, e, glue_frame(e.value_bytes(), 1 << 20))
}

fn read_frame(
    ids: &IdStrategy,
    schema: &RegistrySchema,
    e: &Event,
    frame: Result<Framed<'_>, PayloadError>,
) -> anyhow::Result<(String, Order)> {
    let frame = frame?;
    let decoded = schema.decode(frame.schema_id, &frame.body)?;
    let (id, _) = ids.derive_decoded(e, Some(&decoded), IdFormats::V2)?;
    let order = Order::deserialize(&decoded)?;
    Ok((id.to_string(), order))
}

/// The table as printed.
pub fn render(r: &DecodeReport) -> String {
    let mut out = format!(
        "decode cost per event ({} values, median of {} rounds; {})\n\n| format | value bytes | ns/event | vs JSON |\n|---|---|---|---|\n",
        r.events, r.rounds, r.machine
    );
    for row in &r.rows {
        out.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2}x |\n",
            row.format, row.value_bytes, row.ns_per_event, row.vs_json
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_smoke_run_reads_every_format_alike_and_reports_each() {
        let r = run(&DecodeOptions { events: 200, rounds: 3 }).unwrap();
        assert_eq!(r.rows.len(), 7);
        assert!(r.rows.iter().all(|row| row.ns_per_event > 0.0 && row.value_bytes > 10.0), "{r:?}");
        assert!(r.rows[1].value_bytes < r.rows[0].value_bytes, "Avro is smaller than JSON: {r:?}");
        assert!(r.rows[3].value_bytes < r.rows[0].value_bytes, "Protobuf is smaller than JSON: {r:?}");
        assert!(render(&r).contains("avro (confluent)") && render(&r).contains("protobuf (confluent)"));
        assert!(render(&r).contains("avro (glue, zlib)") && render(&r).contains("protobuf (glue)"));
    }
}
