//! Values framed for a schema registry: any bytes through the frame parser and the Avro
//! decoder (with a schema of every kind of field, and with schemas built from the input)
//! give a value or a classified error, never a panic, a hang or an allocation a forged
//! length asked for.
#![no_main]

use exactly_once_core::payload::{confluent_frame, AvroSchema};
use libfuzzer_sys::fuzz_target;

const ORDER: &str = r#"{"type":"record","name":"Order","fields":[
    {"name":"id","type":"string"},
    {"name":"n","type":"long"},
    {"name":"note","type":["null","string","double"]},
    {"name":"tags","type":{"type":"array","items":{"type":"map","values":"bytes"}}},
    {"name":"status","type":{"type":"enum","name":"S","symbols":["A","B"]}},
    {"name":"hash","type":{"type":"fixed","name":"H","size":4}},
    {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
    {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}},
    {"name":"ref","type":{"type":"string","logicalType":"uuid"}}]}"#;

fuzz_target!(|data: &[u8]| {
    let order = AvroSchema::parse(ORDER).expect("the fixed schema parses");
    match confluent_frame(data) {
        Ok(frame) => {
            let _ = order.decode(frame.schema_id, frame.body);
        }
        Err(e) => {
            let _ = e.reason();
        }
    }
    // The input as a schema (a registry answer we did not expect), then as its own datum.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(schema) = AvroSchema::parse(text) {
            let _ = schema.decode(0, data);
        }
    }
});
