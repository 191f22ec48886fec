//! The MSK event as Lambda delivers it (and `POST /invoke` accepts it), decoded into
//! [`Record`]s.
//!
//! Shape: `records` maps `"<topic>-<partition>"` to a list of records, each with base64
//! `key` (may be absent) and `value`, a millisecond `timestamp`, and `headers` as a list
//! of one-key objects whose values are arrays of *signed* bytes (`-1` is `0xff`).
//!
//! Invariants: decoding never panics and never drops a record: a record that cannot be
//! decoded becomes [`Record::Invalid`] with a classified reason, keeping its raw text, so
//! the guard dead-letters it. Records come out sorted by topic, partition and offset
//! (`records` is a map, so its order is not stable).

use aws_lambda_events::event::kafka::{KafkaEvent, KafkaRecord};
use base64::Engine;
use bytes::Bytes;

use crate::event::{Event, Header, Record};

/// Parses an MSK event from JSON. aws_lambda_events asserts (panics) on a fractional
/// timestamp; a hostile body must get an error, not take the task down.
pub fn parse(body: &[u8]) -> Result<KafkaEvent, String> {
    match std::panic::catch_unwind(|| serde_json::from_slice::<KafkaEvent>(body)) {
        Ok(Ok(e)) => Ok(e),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("invalid record field (a timestamp must be whole milliseconds)".into()),
    }
}

/// Decodes every record of an MSK event.
pub fn decode(event: &KafkaEvent) -> Vec<Record> {
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

fn decode_record(group: &str, r: &KafkaRecord) -> Record {
    // The record's own topic; else the map key without its `-<partition>` suffix.
    let topic = r.topic.clone().unwrap_or_else(|| match group.rsplit_once('-') {
        Some((t, p)) if p.parse::<i64>().is_ok() => t.to_owned(),
        _ => group.to_owned(),
    });
    let partition = i32::try_from(r.partition).unwrap_or(-1);
    let mut event = Event::new(topic, partition, r.offset);
    // aws_lambda_events parses milliseconds through an f64 and truncates, so a
    // timestamp can come back up to 1 ms early (1545084650987 reads as ...986). Ids
    // never derive from it; `occurred_at` fallbacks work in seconds.
    event.timestamp_ms = Some(r.timestamp.0.timestamp_millis());
    event.headers = r
        .headers
        .iter()
        .flat_map(|h| h.iter())
        .map(|(name, bytes)| Header {
            name: name.clone(),
            value: Some(Bytes::from(bytes.iter().map(|b| *b as u8).collect::<Vec<u8>>())),
        })
        .collect();

    let b64 = base64::engine::general_purpose::STANDARD;
    let mut invalid: Option<(&'static str, String)> = None;
    if partition < 0 {
        invalid = Some(("record_partition_invalid", format!("partition {} is out of range", r.partition)));
    }
    match r.key.as_deref().map(|k| b64.decode(k)) {
        None => {}
        Some(Ok(k)) => event.key = Some(k.into()),
        Some(Err(e)) => {
            event.key = r.key.clone().map(Bytes::from);
            invalid.get_or_insert(("record_key_base64", format!("key is not base64: {e}")));
        }
    }
    match r.value.as_deref().map(|v| b64.decode(v)) {
        None => {}
        Some(Ok(v)) => event.value = Some(v.into()),
        Some(Err(e)) => {
            // Keep the raw text: the dead letter shows what arrived.
            event.value = r.value.clone().map(Bytes::from);
            invalid.get_or_insert(("record_value_base64", format!("value is not base64: {e}")));
        }
    }
    match invalid {
        None => Record::Ok(event),
        Some((reason, error)) => Record::Invalid { event, reason, error },
    }
}

/// Builds an MSK event from records (the producer side: tests, the CLI, the fuzzers).
pub fn encode(events: &[Event]) -> serde_json::Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut groups: serde_json::Map<String, serde_json::Value> = serde_json::Map::new();
    for e in events {
        let headers: Vec<serde_json::Value> = e
            .headers
            .iter()
            .map(|h| {
                let bytes: Vec<i8> = h.value.as_deref().unwrap_or_default().iter().map(|b| *b as i8).collect();
                serde_json::json!({ h.name.clone(): bytes })
            })
            .collect();
        let mut record = serde_json::json!({
            "topic": e.topic,
            "partition": e.partition,
            "offset": e.offset,
            "timestamp": e.timestamp_ms.unwrap_or(0),
            "timestampType": "CREATE_TIME",
            "headers": headers,
        });
        if let Some(k) = &e.key {
            record["key"] = b64.encode(k).into();
        }
        if let Some(v) = &e.value {
            record["value"] = b64.encode(v).into();
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
        decode(&serde_json::from_str::<KafkaEvent>(json).expect("valid MSK event"))
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
        assert!((e.timestamp_ms.unwrap() - 1545084650987).abs() <= 1, "within the crate's 1 ms truncation");
        assert_eq!(e.key.as_deref(), Some(&b"key"[..]));
        assert_eq!(e.value_bytes(), b"Hello, this is a test.");
        assert_eq!(e.header("headerKey").unwrap().value.as_deref(), Some(&b"headerValue"[..]));
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
    fn a_fractional_timestamp_is_an_error_not_a_panic() {
        let body = br#"{"records":{"t-0":[{"topic":"t","partition":0,"offset":0,"timestamp":1.5,"value":"e30=","headers":[]}]}}"#;
        assert!(super::parse(body).is_err());
        assert!(super::parse(b"{not json").is_err());
        assert!(super::parse(br#"{"records":{}}"#).unwrap().records.is_empty());
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
}
