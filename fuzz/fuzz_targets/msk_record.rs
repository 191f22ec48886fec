//! Structured: one MSK record built from arbitrary JSON-ish parts (odd types where
//! numbers, strings and byte lists belong), so the fuzzer spends its time in the record
//! decoder rather than in the JSON syntax.
#![no_main]

use arbitrary::Arbitrary;
use exactly_once_core::event::Record;
use exactly_once_core::msk;
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};

#[derive(Debug, Arbitrary)]
enum Field {
    Absent,
    Null,
    Int(i64),
    Float(f64),
    Text(String),
    Bytes(Vec<i64>),
    Nested(Vec<(String, i16)>),
}

impl Field {
    fn value(&self) -> Option<Value> {
        Some(match self {
            Field::Absent => return None,
            Field::Null => Value::Null,
            Field::Int(i) => json!(i),
            Field::Float(f) => serde_json::Number::from_f64(*f).map(Value::Number).unwrap_or(Value::Null),
            Field::Text(s) => json!(s),
            Field::Bytes(b) => json!(b),
            Field::Nested(kv) => Value::Object(kv.iter().map(|(k, v)| (k.clone(), json!(v))).collect()),
        })
    }
}

#[derive(Debug, Arbitrary)]
struct Input {
    group: String,
    topic: Field,
    partition: Field,
    offset: Field,
    timestamp: Field,
    key: Field,
    value: Field,
    headers: Vec<(String, Field)>,
    headers_field: Field,
}

fuzz_target!(|input: Input| {
    let mut record = serde_json::Map::new();
    for (name, field) in [
        ("topic", &input.topic),
        ("partition", &input.partition),
        ("offset", &input.offset),
        ("timestamp", &input.timestamp),
        ("key", &input.key),
        ("value", &input.value),
    ] {
        if let Some(v) = field.value() {
            record.insert(name.into(), v);
        }
    }
    let headers: Vec<Value> = input
        .headers
        .iter()
        .map(|(name, f)| {
            let mut h = serde_json::Map::new();
            h.insert(name.clone(), f.value().unwrap_or(Value::Null));
            Value::Object(h)
        })
        .collect();
    record.insert("headers".into(), input.headers_field.value().unwrap_or(Value::Array(headers)));
    let body = json!({ "records": { input.group.clone(): [Value::Object(record)] } }).to_string();
    let event = msk::parse(body.as_bytes()).expect("a well-formed envelope parses");
    let records = msk::decode(&event);
    assert_eq!(records.len(), 1, "a record was dropped");
    if let Record::Invalid { reason, .. } = &records[0] {
        assert!(reason.starts_with("record_"));
    }
    // What the producer side writes, the decoder reads back the same.
    if let Record::Ok(e) = &records[0] {
        let again = msk::decode(&msk::parse(msk::encode(std::slice::from_ref(e)).to_string().as_bytes()).unwrap());
        assert_eq!(again, vec![Record::Ok(e.clone())], "encode/decode round trip");
    }
});
