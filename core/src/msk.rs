//! The MSK event as Lambda delivers it (and `POST /invoke` accepts it), decoded into
//! [`Record`]s.
//!
//! Shape: `records` maps `"<topic>-<partition>"` to a list of records, each with base64
//! `key` (may be absent) and `value`, a millisecond `timestamp`, and `headers` as a list
//! of one-key objects whose values are arrays of *signed* bytes (`-1` is `0xff`).
//!
//! Invariants: parsing fails only when the body is not JSON or not an MSK event at all
//! (a classified [`MskError`]); decoding never panics and never drops a record: a record
//! that cannot be decoded becomes [`Record::Invalid`] with a classified reason, keeping
//! what arrived, so the guard dead-letters it. Records stay JSON until decoded one by one,
//! so one bad record cannot fail its batch. Records come out sorted by topic, partition
//! and offset (`records` is a map, so its order is not stable).
//!
//! Our own types rather than `aws_lambda_events`' `KafkaEvent`: that one reads the
//! timestamp through an `f64` (up to 1 ms off) and asserts (panics) on a fractional one,
//! and a type error anywhere fails the whole batch.

use std::collections::BTreeMap;

use base64::Engine;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{Event, Header, Record, SchemaMetadata};

/// The MSK event envelope. Unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MskEvent {
    /// `aws:kafka` from Lambda; optional, like every envelope field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_source: Option<String>,
    /// The ARN of the MSK cluster the records came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_source_arn: Option<String>,
    /// The brokers the records were read from, comma-separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_servers: Option<String>,
    /// `"<topic>-<partition>"` to that partition's records, each still raw JSON.
    pub records: BTreeMap<String, Vec<Value>>,
}

impl MskEvent {
    /// Records in the event, decodable or not.
    pub fn len(&self) -> usize {
        self.records.values().map(Vec::len).sum()
    }

    /// Whether the event holds no records at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a body is not an MSK event at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct MskError {
    /// `body_not_json` or `body_not_msk_event`.
    pub reason: &'static str,
    /// What was wrong, for logs and the caller (serde_json's message).
    pub message: String,
}

/// Parses an MSK event from JSON.
pub fn parse(body: &[u8]) -> Result<MskEvent, MskError> {
    serde_json::from_slice::<MskEvent>(body).map_err(|e| MskError {
        reason: match e.classify() {
            serde_json::error::Category::Data => "body_not_msk_event",
            _ => "body_not_json",
        },
        message: e.to_string(),
    })
}

/// Decodes every record of an MSK event.
pub fn decode(event: &MskEvent) -> Vec<Record> {
    let mut records: Vec<Record> = event
        .records
        .iter()
        .flat_map(|(group, records)| records.iter().map(move |r| decode_record(group, r)))
        .collect();
    records.sort_by(|a, b| {
        let (a, b) = (a.event(), b.event());
        (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset))
    });
    records
}

/// The group key `"<topic>-<partition>"` split; the whole key is the topic when it has
/// no numeric suffix.
fn split_group(group: &str) -> (&str, Option<i64>) {
    match group.rsplit_once('-') {
        Some((t, p)) => match p.parse::<i64>() {
            Ok(p) => (t, Some(p)),
            Err(_) => (group, None),
        },
        None => (group, None),
    }
}

fn decode_record(group: &str, raw: &Value) -> Record {
    let (group_topic, group_partition) = split_group(group);
    let Some(r) = raw.as_object() else {
        // Nothing to read: keep the whole JSON as the value so the dead letter shows it.
        let mut event = Event::new(group_topic, group_partition.and_then(|p| i32::try_from(p).ok()).unwrap_or(-1), -1);
        event.value = Some(Bytes::from(raw.to_string()));
        return Record::Invalid { event, reason: "record_not_object", error: "record is not a JSON object".into() };
    };
    let mut invalid: Option<(&'static str, String)> = None;
    let mut flag = |reason: &'static str, error: String| {
        invalid.get_or_insert((reason, error));
    };

    let topic = match r.get("topic") {
        None | Some(Value::Null) => group_topic.to_owned(),
        Some(Value::String(t)) if !t.is_empty() => t.clone(),
        Some(other) => {
            flag("record_topic_invalid", format!("topic is not a non-empty string: {}", short(other)));
            group_topic.to_owned()
        }
    };
    if topic.is_empty() {
        flag("record_topic_invalid", "no topic: neither the record nor its group key names one".into());
    }
    let partition = match r.get("partition") {
        None | Some(Value::Null) => group_partition.map(Value::from).unwrap_or(Value::Null),
        Some(p) => p.clone(),
    };
    let partition = match partition.as_i64().and_then(|p| i32::try_from(p).ok()).filter(|p| *p >= 0) {
        Some(p) => p,
        None => {
            flag(
                "record_partition_invalid",
                format!("partition is not a whole number in 0..2^31: {}", short(&partition)),
            );
            -1
        }
    };
    let offset = match r.get("offset").and_then(Value::as_i64).filter(|o| *o >= 0) {
        Some(o) => o,
        None => {
            let got = r.get("offset").map(short).unwrap_or_else(|| "nothing".into());
            flag("record_offset_invalid", format!("offset is not a whole number >= 0: {got}"));
            -1
        }
    };
    let mut event = Event::new(topic, partition, offset);
    // Milliseconds, as a number or a string of digits. Ids never derive from it, so an
    // unusable timestamp is left out rather than failing the record.
    event.timestamp_ms = match r.get("timestamp") {
        Some(Value::Number(n)) => {
            n.as_i64().or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15).map(|f| f as i64))
        }
        Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
        _ => None,
    };

    match r.get("headers") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for h in list {
                let Some(map) = h.as_object() else {
                    flag("record_header_invalid", format!("header is not an object: {}", short(h)));
                    continue;
                };
                for (name, value) in map {
                    match header_bytes(value) {
                        Ok(value) => event.headers.push(Header { name: name.clone(), value }),
                        Err(e) => {
                            flag("record_header_invalid", format!("header `{}`: {e}", short_str(name)));
                            // Kept as its JSON text, so the dead letter shows it.
                            event
                                .headers
                                .push(Header { name: name.clone(), value: Some(Bytes::from(value.to_string())) });
                        }
                    }
                }
            }
        }
        Some(other) => flag("record_headers_invalid", format!("headers is not a list: {}", short(other))),
    }

    // Present when the mapping has a schema registry (`SchemaRegistryConfig`).
    for (field, slot) in
        [("keySchemaMetadata", &mut event.key_schema), ("valueSchemaMetadata", &mut event.value_schema)]
    {
        match r.get(field) {
            None | Some(Value::Null) => {}
            Some(v) => match serde_json::from_value::<SchemaMetadata>(v.clone()) {
                Ok(m) => *slot = Some(m),
                Err(_) => {
                    flag("record_schema_metadata_invalid", format!("{field} is not schema metadata: {}", short(v)))
                }
            },
        }
    }

    let b64 = base64::engine::general_purpose::STANDARD;
    for (field, slot, not_b64, not_str) in [
        ("key", &mut event.key, "record_key_base64", "record_key_invalid"),
        ("value", &mut event.value, "record_value_base64", "record_value_invalid"),
    ] {
        match r.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => match b64.decode(text) {
                Ok(bytes) => *slot = Some(bytes.into()),
                Err(e) => {
                    // Keep the raw text: the dead letter shows what arrived.
                    *slot = Some(Bytes::from(text.clone()));
                    flag(not_b64, format!("{field} is not base64: {e}"));
                }
            },
            Some(other) => {
                *slot = Some(Bytes::from(other.to_string()));
                flag(not_str, format!("{field} is not a base64 string: {}", short(other)));
            }
        }
    }
    match invalid {
        None => Record::Ok(event),
        Some((reason, error)) => Record::Invalid { event, reason, error },
    }
}

/// A header value: a list of bytes, signed (-128..=-1 stand for 0x80..=0xff) as MSK
/// sends them, or unsigned; `null` is a header without a value.
fn header_bytes(value: &Value) -> Result<Option<Bytes>, String> {
    match value {
        Value::Null => Ok(None),
        Value::Array(items) => items
            .iter()
            .map(|b| match b.as_i64() {
                Some(b @ -128..=-1) => Ok(b as i8 as u8),
                Some(b @ 0..=255) => Ok(b as u8),
                _ => Err(format!("not a byte: {}", short(b))),
            })
            .collect::<Result<Vec<u8>, String>>()
            .map(|v| Some(Bytes::from(v))),
        other => Err(format!("not a list of bytes: {}", short(other))),
    }
}

/// A JSON value for an error message, cut short.
fn short(v: &Value) -> String {
    short_str(&v.to_string())
}

fn short_str(s: &str) -> String {
    cut(s, 64)
}

/// `s` cut to at most `max` bytes (on a character boundary), `...` marking a cut: text
/// from outside quoted in an error message.
pub fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Builds an MSK event from records: the producer side, which a deployed function never
/// needs. The local event source mapping (`eo esm`), the tests and the fuzzers use it;
/// it is built only with the `encode` feature.
#[cfg(any(test, feature = "encode"))]
pub fn encode(events: &[Event]) -> serde_json::Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut groups: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
    for e in events {
        let headers: Vec<serde_json::Value> = e
            .headers
            .iter()
            .map(|h| match h.value.as_deref() {
                Some(v) => serde_json::json!({ h.name.clone(): v.iter().map(|b| *b as i8).collect::<Vec<i8>>() }),
                None => serde_json::json!({ h.name.clone(): null }),
            })
            .collect();
        let mut record = serde_json::json!({
            "topic": e.topic,
            "partition": e.partition,
            "offset": e.offset,
            "timestampType": "CREATE_TIME",
            "headers": headers,
        });
        if let Some(ts) = e.timestamp_ms {
            record["timestamp"] = ts.into();
        }
        if let Some(k) = &e.key {
            record["key"] = b64.encode(k).into();
        }
        if let Some(v) = &e.value {
            record["value"] = b64.encode(v).into();
        }
        if let Some(m) = &e.key_schema {
            record["keySchemaMetadata"] = serde_json::json!({"dataFormat": m.data_format, "schemaId": m.schema_id});
        }
        if let Some(m) = &e.value_schema {
            record["valueSchemaMetadata"] = serde_json::json!({"dataFormat": m.data_format, "schemaId": m.schema_id});
        }
        groups
            .entry(format!("{}-{}", e.topic, e.partition))
            .or_insert_with(|| serde_json::Value::Array(Vec::new()))
            .as_array_mut()
            .expect("array")
            .push(record);
    }
    serde_json::json!({
        "eventSource": "aws:kafka",
        "eventSourceArn": "arn:aws:kafka:us-east-1:000000000000:cluster/local/00000000-0000-0000-0000-000000000000-1",
        "bootstrapServers": "127.0.0.1:9092",
        "records": groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_json(json: &str) -> Vec<Record> {
        decode(&parse(json.as_bytes()).expect("valid MSK event"))
    }

    #[test]
    fn decodes_the_aws_sample_event() {
        // The sample from aws_lambda_events' fixtures (AWS's documented example).
        let records = decode_json(
            r#"{"eventSource":"aws:kafka","eventSourceArn":"arn:aws:kafka:sa-east-1:123456789012:cluster/vpc-2priv-2pub/751d2973-a626-431c-9d4e-d7975eb44dd7-2",
            "bootstrapServers":"b-2.demo-cluster-1.a1bcde.c1.kafka.us-east-1.amazonaws.com:9092",
            "records":{"mytopic-0":[{"topic":"mytopic","partition":0,"offset":15,"timestamp":1545084650987,"timestampType":"CREATE_TIME",
            "key":"a2V5","value":"SGVsbG8sIHRoaXMgaXMgYSB0ZXN0Lg==","headers":[{"headerKey":[104,101,97,100,101,114,86,97,108,117,101]}]}]}}"#,
        );
        assert_eq!(records.len(), 1);
        let Record::Ok(e) = &records[0] else { panic!("{records:?}") };
        assert_eq!((e.topic.as_str(), e.partition, e.offset), ("mytopic", 0, 15));
        assert_eq!(e.timestamp_ms, Some(1545084650987), "to the millisecond");
        assert_eq!(e.key.as_deref(), Some(&b"key"[..]));
        assert_eq!(e.value_bytes(), b"Hello, this is a test.");
        assert_eq!(e.header("headerKey").unwrap().value.as_deref(), Some(&b"headerValue"[..]));
    }

    #[test]
    fn schema_metadata_is_kept_and_round_trips() {
        let event = Event::new("orders", 1, 4).with_value(r#"{"id":1}"#).with_value_schema("AVRO", "7");
        let json = encode(std::slice::from_ref(&event)).to_string();
        assert!(json.contains(r#""valueSchemaMetadata":{"dataFormat":"AVRO","schemaId":"7"}"#), "{json}");
        assert_eq!(decode_json(&json), vec![Record::Ok(event)]);
        // As AWS documents it, beside the usual fields.
        let records = decode_json(
            r#"{"records":{"t-0":[{"topic":"t","partition":0,"offset":1,"value":"e30=",
            "keySchemaMetadata":{"dataFormat":"JSON","schemaId":"a3f5c1d2-0000-0000-0000-000000000000"},
            "valueSchemaMetadata":{"dataFormat":"PROTOBUF","schemaId":"12"}},
            {"topic":"t","partition":0,"offset":2,"value":"e30=","valueSchemaMetadata":"AVRO"}]}}"#,
        );
        let Record::Ok(e) = &records[0] else { panic!("{records:?}") };
        assert_eq!(e.key_schema.as_ref().unwrap().data_format, "JSON");
        assert_eq!(e.value_schema.as_ref().unwrap().schema_id, "12");
        let Record::Invalid { reason, .. } = &records[1] else { panic!("{records:?}") };
        assert_eq!(*reason, "record_schema_metadata_invalid");
    }

    #[test]
    fn signed_header_bytes_round_trip() {
        let event = Event::new("t", 2, 7)
            .with_header("idempotency_key", vec![0xff, 0x80, 0x00, 0x7f])
            .with_value("{}")
            .with_key("k")
            .with_timestamp_ms(1_700_000_000_000);
        let json = encode(std::slice::from_ref(&event)).to_string();
        assert!(json.contains("[-1,-128,0,127]"), "{json}");
        let back = decode_json(&json);
        assert_eq!(back, vec![Record::Ok(event)]);
    }

    #[test]
    fn bad_base64_becomes_an_invalid_record_not_a_panic() {
        let records = decode_json(
            r#"{"records":{"t-0":[{"topic":"t","partition":0,"offset":1,"timestamp":0,"value":"%%%not-base64","headers":[]},
                                   {"topic":"t","partition":0,"offset":0,"timestamp":0,"key":"!!","value":"e30=","headers":[]}]}}"#,
        );
        assert_eq!(records.len(), 2);
        match &records[0] {
            Record::Invalid { reason, event, .. } => {
                assert_eq!(*reason, "record_key_base64");
                assert_eq!(event.offset, 0);
            }
            other => panic!("{other:?}"),
        }
        match &records[1] {
            Record::Invalid { reason, event, .. } => {
                assert_eq!(*reason, "record_value_base64");
                assert_eq!(event.value_bytes(), b"%%%not-base64", "raw text kept for the dead letter");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_fractional_timestamp_is_left_out_not_a_panic() {
        for ts in ["1.5", "\"1.5\"", "-1e300", "\"x\"", "[]"] {
            let body = format!(
                r#"{{"records":{{"t-0":[{{"topic":"t","partition":0,"offset":0,"timestamp":{ts},"value":"e30=","headers":[]}}]}}}}"#
            );
            let records = decode(&parse(body.as_bytes()).unwrap());
            let Record::Ok(e) = &records[0] else { panic!("{ts}: {records:?}") };
            assert_eq!(e.timestamp_ms, None, "{ts}");
        }
        assert_eq!(parse(b"{not json").unwrap_err().reason, "body_not_json");
        assert_eq!(parse(br#"{"records":[]}"#).unwrap_err().reason, "body_not_msk_event");
        assert_eq!(parse(br#"{"nothing":1}"#).unwrap_err().reason, "body_not_msk_event");
        assert!(parse(br#"{"records":{}}"#).unwrap().is_empty());
    }

    #[test]
    fn records_are_sorted_and_topic_falls_back_to_the_group_key() {
        let records = decode_json(
            r#"{"records":{"my-topic-1":[{"partition":1,"offset":9,"timestamp":0,"value":"e30=","headers":[]}],
                           "my-topic-0":[{"partition":0,"offset":5,"timestamp":0,"value":"e30=","headers":[]},
                                         {"partition":0,"offset":4,"timestamp":0,"value":"e30=","headers":[]}]}}"#,
        );
        let order: Vec<(String, i32, i64)> =
            records.iter().map(|r| (r.event().topic.clone(), r.event().partition, r.event().offset)).collect();
        assert_eq!(order, [("my-topic".into(), 0, 4), ("my-topic".into(), 0, 5), ("my-topic".into(), 1, 9)]);
    }

    /// Hostile and malformed records, one per row: what each decodes to. Every one is
    /// kept (never dropped) and every rejection names its reason.
    #[test]
    fn hostile_records_are_classified_and_kept() {
        use crate::event_id::{EventId, IdStrategy};
        let huge = "A".repeat(4 << 20);
        let rows: Vec<(&str, String, Option<&str>)> = vec![
            ("missing offset", r#"{"partition":0,"value":"e30="}"#.into(), Some("record_offset_invalid")),
            ("negative offset", r#"{"partition":0,"offset":-5,"value":"e30="}"#.into(), Some("record_offset_invalid")),
            (
                "offset as string",
                r#"{"partition":0,"offset":"7","value":"e30="}"#.into(),
                Some("record_offset_invalid"),
            ),
            ("partition too big", r#"{"partition":4294967296,"offset":1}"#.into(), Some("record_partition_invalid")),
            ("partition from group key", r#"{"offset":1,"value":"e30="}"#.into(), None),
            ("topic a number", r#"{"topic":5,"partition":0,"offset":1}"#.into(), Some("record_topic_invalid")),
            ("record not an object", r#""just text""#.into(), Some("record_not_object")),
            ("record null", "null".into(), Some("record_not_object")),
            ("value a number", r#"{"partition":0,"offset":1,"value":12}"#.into(), Some("record_value_invalid")),
            ("key an object", r#"{"partition":0,"offset":1,"key":{"a":1}}"#.into(), Some("record_key_invalid")),
            ("value not base64", r#"{"partition":0,"offset":1,"value":"***"}"#.into(), Some("record_value_base64")),
            ("huge value", format!(r#"{{"partition":0,"offset":1,"value":"{huge}"}}"#), None),
            (
                "headers an object",
                r#"{"partition":0,"offset":1,"headers":{"a":[1]}}"#.into(),
                Some("record_headers_invalid"),
            ),
            ("header a string", r#"{"partition":0,"offset":1,"headers":["h"]}"#.into(), Some("record_header_invalid")),
            (
                "header byte 300",
                r#"{"partition":0,"offset":1,"headers":[{"h":[300]}]}"#.into(),
                Some("record_header_invalid"),
            ),
            (
                "header byte -129",
                r#"{"partition":0,"offset":1,"headers":[{"h":[-129]}]}"#.into(),
                Some("record_header_invalid"),
            ),
            (
                "header byte 1.5",
                r#"{"partition":0,"offset":1,"headers":[{"h":[1.5]}]}"#.into(),
                Some("record_header_invalid"),
            ),
            (
                "header value a string",
                r#"{"partition":0,"offset":1,"headers":[{"h":"abc"}]}"#.into(),
                Some("record_header_invalid"),
            ),
            ("header value null", r#"{"partition":0,"offset":1,"headers":[{"h":null}]}"#.into(), None),
            ("unsigned header bytes", r#"{"partition":0,"offset":1,"headers":[{"h":[255,128]}]}"#.into(), None),
            ("unknown fields", r#"{"partition":0,"offset":1,"extra":{"deep":[1,2]}}"#.into(), None),
        ];
        for (name, record, want) in rows {
            let body = format!(r#"{{"records":{{"t-3":[{record}]}}}}"#);
            let event = parse(body.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
            let records = decode(&event);
            assert_eq!(records.len(), 1, "{name}: never dropped");
            match (&records[0], want) {
                (Record::Ok(e), None) => {
                    assert_eq!(e.topic, "t", "{name}");
                    let want = if name == "partition from group key" { 3 } else { 0 };
                    assert_eq!(e.partition, want, "{name}");
                }
                (Record::Invalid { reason, error, event }, Some(want)) => {
                    assert_eq!(*reason, want, "{name}: {error}");
                    assert!(!error.is_empty() && error.len() < 300, "{name}: a short message: {error}");
                    // The offset strategy still yields an id for the dead letter.
                    assert!(IdStrategy::Offset.derive(event).is_ok(), "{name}");
                }
                (got, want) => panic!("{name}: wanted {want:?}, got {got:?}"),
            }
        }
        // A header with signed bytes decodes to the same bytes as its unsigned form.
        let signed = decode(&parse(br#"{"records":{"t-0":[{"offset":1,"headers":[{"h":[-1,-128]}]}]}}"#).unwrap());
        assert_eq!(signed[0].event().header("h").unwrap().value.as_deref(), Some(&[0xff, 0x80][..]));
        // Empty batch.
        assert!(decode(&parse(br#"{"records":{}}"#).unwrap()).is_empty());
        assert!(decode(&parse(br#"{"records":{"t-0":[]}}"#).unwrap()).is_empty());
        // Missing envelope fields are fine; a missing `records` is not an MSK event.
        assert_eq!(parse(br#"{"eventSource":"aws:kafka"}"#).unwrap_err().reason, "body_not_msk_event");
        // Ids with SQL and Redis-protocol characters: kept as they are (statements are
        // parameterised, Redis keys are binary-safe) unless they hold control characters,
        // which are hashed.
        for raw in ["'; DROP TABLE processed_events; --", "*3 $3 DEL", "a b\"c", "$1", "{slot}:lease"] {
            let id = EventId::new(raw).unwrap();
            assert_eq!(id.as_str(), raw);
        }
        let crlf = EventId::new("*1\r\n$4\r\nPING\r\n").unwrap();
        assert!(crlf.as_str().starts_with("sha256:"));
        // Very long ids are hashed whole: ids that share a long prefix stay distinct.
        let long_a = EventId::new(format!("{}a", "x".repeat(10_000))).unwrap();
        let long_b = EventId::new(format!("{}b", "x".repeat(10_000))).unwrap();
        assert_ne!(long_a, long_b);
        assert!(long_a.as_str().len() <= EventId::MAX_LEN);
    }
}
