//! Values framed for a schema registry: any bytes through the frame parser, the Avro
//! decoder (with a schema of every kind of field, and with schemas built from the input)
//! and the Protobuf decoder (message indexes, then a message of a file with nested,
//! repeated, map, enum and well-known fields; and the input as a file descriptor), Glue's
//! Protobuf index and the `.proto` text parser (the input as a Glue definition) give a
//! value or a classified error, never a panic, a hang or an allocation a forged length
//! asked for.
#![no_main]

use exactly_once_core::payload::{confluent_frame, glue_frame, AvroSchema};
use exactly_once_core::protobuf::ProtobufSchema;
use libfuzzer_sys::fuzz_target;
use prost_reflect::prost::Message as _;
use prost_reflect::prost_types::field_descriptor_proto::{Label, Type};
use prost_reflect::prost_types::{DescriptorProto, FieldDescriptorProto, FileDescriptorProto, MessageOptions};

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

fn field(name: &str, number: i32, kind: Type, label: Label, type_name: Option<&str>) -> FieldDescriptorProto {
    FieldDescriptorProto {
        name: Some(name.into()),
        number: Some(number),
        label: Some(label as i32),
        r#type: Some(kind as i32),
        type_name: type_name.map(Into::into),
        ..Default::default()
    }
}

/// fuzz/order.proto: `Order { string id; sint64 n; double d; bytes b; repeated Order
/// children; map<string, int32> counts; Status status; google.protobuf.Timestamp at;
/// Line line; message Line { fixed32 q; bool ok; } }` and `enum Status`.
fn proto_order() -> ProtobufSchema {
    use Label::{Optional, Repeated};
    let entry = DescriptorProto {
        name: Some("CountsEntry".into()),
        field: vec![
            field("key", 1, Type::String, Optional, None),
            field("value", 2, Type::Int32, Optional, None),
        ],
        options: Some(MessageOptions { map_entry: Some(true), ..Default::default() }),
        ..Default::default()
    };
    let line = DescriptorProto {
        name: Some("Line".into()),
        field: vec![field("q", 1, Type::Fixed32, Optional, None), field("ok", 2, Type::Bool, Optional, None)],
        ..Default::default()
    };
    let order = DescriptorProto {
        name: Some("Order".into()),
        field: vec![
            field("id", 1, Type::String, Optional, None),
            field("n", 2, Type::Sint64, Optional, None),
            field("d", 3, Type::Double, Optional, None),
            field("b", 4, Type::Bytes, Optional, None),
            field("children", 5, Type::Message, Repeated, Some(".fuzz.Order")),
            field("counts", 6, Type::Message, Repeated, Some(".fuzz.Order.CountsEntry")),
            field("status", 7, Type::Enum, Optional, Some(".fuzz.Status")),
            field("at", 8, Type::Message, Optional, Some(".google.protobuf.Timestamp")),
            field("line", 9, Type::Message, Optional, Some(".fuzz.Order.Line")),
        ],
        nested_type: vec![entry, line],
        ..Default::default()
    };
    let status = prost_reflect::prost_types::EnumDescriptorProto {
        name: Some("Status".into()),
        value: vec![
            prost_reflect::prost_types::EnumValueDescriptorProto { name: Some("NEW".into()), number: Some(0), options: None },
            prost_reflect::prost_types::EnumValueDescriptorProto { name: Some("PAID".into()), number: Some(1), options: None },
        ],
        ..Default::default()
    };
    let file = FileDescriptorProto {
        name: Some("fuzz/order.proto".into()),
        package: Some("fuzz".into()),
        dependency: vec!["google/protobuf/timestamp.proto".into()],
        message_type: vec![order],
        enum_type: vec![status],
        syntax: Some("proto3".into()),
        ..Default::default()
    };
    ProtobufSchema::from_descriptors(&file.encode_to_vec(), &[]).expect("the fixed Protobuf schema builds")
}

fuzz_target!(|data: &[u8]| {
    let order = AvroSchema::parse(ORDER).expect("the fixed schema parses");
    static PROTO: std::sync::OnceLock<ProtobufSchema> = std::sync::OnceLock::new();
    let proto = PROTO.get_or_init(proto_order);
    if let Ok(frame) = confluent_frame(data) {
        let _ = proto.decode(frame.schema_id, &frame.body);
    }
    let _ = proto.decode(0, data);
    let _ = proto.decode_glue(0, data);
    if let Ok(schema) = ProtobufSchema::from_descriptors(data, &[]) {
        let _ = schema.decode(0, data);
    }
    match confluent_frame(data) {
        Ok(frame) => {
            let _ = order.decode(frame.schema_id, &frame.body);
        }
        Err(e) => {
            let _ = e.reason();
        }
    }
    // Glue's frame: a compressed datum is bounded (64 KiB here) however it inflates.
    match glue_frame(data, 64 * 1024) {
        Ok(frame) => {
            assert!(frame.body.len() <= 64 * 1024);
            let _ = order.decode(frame.schema_id, &frame.body);
            let _ = proto.decode_glue(frame.schema_id, &frame.body);
            let _ = frame.schema_id.to_string();
        }
        Err(e) => {
            let _ = (e.reason(), e.to_string());
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(id) = exactly_once_core::payload::SchemaId::parse(text) {
            assert_eq!(exactly_once_core::payload::SchemaId::parse(&id.to_string()), Some(id));
        }
    }
    // The input as a schema (a registry answer we did not expect), then as its own datum.
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(schema) = AvroSchema::parse(text) {
            let _ = schema.decode(0, data);
        }
        if let Ok(schema) = ProtobufSchema::from_proto_text("fuzz.proto", text) {
            let _ = schema.decode_glue(0, data);
        }
    }
});
