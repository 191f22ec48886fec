//! Protobuf values in Confluent's wire format, decoded into JSON without generated code.
//!
//! After the magic byte and the schema id, a Protobuf value carries its *message
//! indexes*: which message of the schema's file it is (a schema file may define several,
//! and nest them). They are a zigzag varint count followed by that many zigzag varint
//! indexes, the first into the file's top-level messages, each next one into the
//! previous message's nested messages; the common case, the file's first message, is a
//! single `0` byte. The encoded message follows.
//!
//! The schema comes from the registry as a serialized `FileDescriptorProto` (the
//! registry's `format=serialized`), with the files it imports fetched the same way
//! through its references. Google's well-known types (`google/protobuf/*.proto`), its
//! common types (`google/type/*.proto`) and Confluent's (`confluent/meta.proto`,
//! `confluent/type/decimal.proto`) are built in, as the serializers skip them when
//! registering.
//!
//! A decoded message becomes a [`serde_json::Value`] in the proto3 JSON mapping, with two
//! choices made for event ids and serde handlers: field names as written in the `.proto`
//! (`order_id`, not `orderId`) and 64-bit integers as JSON numbers (not strings). Scalar
//! and repeated fields at their default value are written out; message, `optional` and
//! `oneof` fields that are not set are left out. Bytes are base64, enums their value's
//! name. A `google.protobuf.Any` is followed at most 4 deep, and a value
//! that would expand past a budget of fields (100,000, or one per byte of the value) is
//! refused.
//!
//! Invariant: hostile bytes get a classified [`PayloadError`], never a panic. The
//! decoder (prost's) checks every length against the bytes left and stops at 100 levels
//! of nesting. A value written with another schema often still decodes (Protobuf keeps
//! fields it does not know); a field number the schema does not define is refused as a
//! mismatch, since the frame names the very schema the value was written with. A value
//! cut short between two fields is a valid shorter message: the encoding has no length
//! or end marker that could tell (cut inside a field, it is refused).

use prost_reflect::prost::Message as _;
use prost_reflect::prost_types::FileDescriptorProto;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FileDescriptor, MessageDescriptor, ReflectMessage, SerializeOptions,
};
use serde_json::Value;

use crate::payload::{PayloadError, SchemaId};

/// Most message indexes a frame may carry (nesting of the message in its file).
const MAX_INDEXES: usize = 64;

/// A Protobuf schema as the registry returned it: its file and the files it imports,
/// linked once.
#[derive(Debug, Clone)]
pub struct ProtobufSchema {
    file: FileDescriptor,
}

impl ProtobufSchema {
    /// Builds the schema from its serialized `FileDescriptorProto`, after the files it
    /// imports (`dependencies`: each the name it is imported by, as the schema's reference
    /// gives it, and its serialized descriptor; in any order). The import name wins over
    /// the name inside the descriptor, which a registry need not keep. Well-known types
    /// need not be given.
    pub fn from_descriptors(main: &[u8], dependencies: &[(String, Vec<u8>)]) -> Result<Self, String> {
        let decode = |bytes: &[u8]| {
            FileDescriptorProto::decode(bytes).map_err(|e| format!("not a serialized FileDescriptorProto: {e}"))
        };
        let main = decode(main)?;
        let mut pending = Vec::with_capacity(dependencies.len());
        for (name, bytes) in dependencies {
            let mut file = decode(bytes)?;
            if !name.is_empty() {
                file.name = Some(name.clone());
            }
            pending.push(file);
        }
        let mut pool = DescriptorPool::global();
        // Imports every client is expected to have, which serializers never register as
        // references (google/type, confluent): built in, unless the registry gave them.
        let mut wanted: Vec<String> =
            main.dependency.iter().chain(pending.iter().flat_map(|f| f.dependency.iter())).cloned().collect();
        while let Some(name) = wanted.pop() {
            if pool.get_file_by_name(&name).is_some() || pending.iter().any(|f| f.name() == name) {
                continue;
            }
            if let Some(file) = crate::protobuf_builtin::file(&name) {
                wanted.extend(file.dependency.iter().cloned());
                pending.push(file);
            }
        }
        // Dependencies may come in any order: add those whose imports are all present,
        // until none is left (or none can be added: an import is missing).
        while !pending.is_empty() {
            let before = pending.len();
            let mut left = Vec::new();
            for file in pending {
                if pool.get_file_by_name(file.name()).is_some() {
                    continue;
                }
                if file.dependency.iter().all(|d| pool.get_file_by_name(d).is_some()) {
                    pool.add_file_descriptor_proto(file).map_err(|e| e.to_string())?;
                } else {
                    left.push(file);
                }
            }
            if left.len() == before {
                let missing: Vec<&str> = left.iter().map(|f| f.name()).collect();
                return Err(format!("the imports of {missing:?} are missing"));
            }
            pending = left;
        }
        if let Some(missing) = main.dependency.iter().find(|d| pool.get_file_by_name(d).is_none()) {
            return Err(format!("the schema imports {missing}, which the registry did not give as a reference"));
        }
        let name = main.name().to_owned();
        pool.add_file_descriptor_proto(main).map_err(|e| e.to_string())?;
        let file = pool.get_file_by_name(&name).ok_or("the schema's file is missing from its own pool")?;
        if file.messages().next().is_none() {
            return Err("the schema defines no message".into());
        }
        Ok(Self { file })
    }

    /// The message the indexes name, or why they name none.
    fn message(&self, indexes: &[usize]) -> Result<MessageDescriptor, String> {
        let (&first, rest) = indexes.split_first().unwrap_or((&0, &[]));
        let mut message =
            self.file.messages().nth(first).ok_or_else(|| {
                format!("message index {first}: the schema has {} messages", self.file.messages().len())
            })?;
        for &i in rest {
            let next = message.child_messages().nth(i);
            message = next.ok_or_else(|| format!("nested message index {i} in {}", message.full_name()))?;
        }
        Ok(message)
    }

    /// Decodes one value after its schema id: the message indexes, then the message.
    pub fn decode(&self, schema_id: impl Into<SchemaId>, body: &[u8]) -> Result<Value, PayloadError> {
        let schema_id = schema_id.into();
        let (indexes, message) =
            message_indexes(body).map_err(|message| PayloadError::SchemaMismatch { schema_id, message })?;
        self.decode_message(schema_id, &indexes, message)
    }

    /// Decodes one message of the schema's file, the one `indexes` name (`[0]`: the
    /// first), from its bytes alone.
    pub fn decode_message(
        &self,
        schema_id: impl Into<SchemaId>,
        indexes: &[usize],
        message: &[u8],
    ) -> Result<Value, PayloadError> {
        let schema_id = schema_id.into();
        let mismatch = |message: String| PayloadError::SchemaMismatch { schema_id, message };
        let descriptor = self.message(indexes).map_err(mismatch)?;
        let decoded = DynamicMessage::decode(descriptor, message).map_err(|e| mismatch(e.to_string()))?;
        let mut walk = Walk { fields: 0, budget: MIN_FIELD_BUDGET + FIELDS_PER_BYTE * message.len() };
        walk.check(&decoded, 0).map_err(mismatch)?;
        let options = SerializeOptions::new()
            .use_proto_field_name(true)
            .stringify_64_bit_integers(false)
            .skip_default_fields(false);
        decoded
            .serialize_with_options(serde_json::value::Serializer, &options)
            .map_err(|e| mismatch(format!("not representable as JSON: {e}")))
    }
}

impl ProtobufSchema {
    /// Encodes `json` (proto3 JSON) as the message `indexes` name, message indexes first,
    /// as a frame's body: the producer side, for tools and benchmarks.
    pub fn encode_json(&self, indexes: &[usize], json: Value) -> Result<Vec<u8>, String> {
        let descriptor = self.message(indexes)?;
        let message = DynamicMessage::deserialize(descriptor, json).map_err(|e| e.to_string())?;
        let mut out = encode_message_indexes(indexes);
        message.encode(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// Most `google.protobuf.Any` values nested in one another: the JSON writer decodes each
/// one's payload afresh, with a fresh nesting limit, so their depth is bounded here.
const MAX_ANY_DEPTH: usize = 4;

/// Fields a value may expand to in JSON, at least, and per byte of the value beyond
/// that: defaults are written out, so an empty nested message (two bytes in a repeated
/// field) becomes an object of all its fields; a value built to expand is refused
/// instead of taking gigabytes.
const MIN_FIELD_BUDGET: usize = 100_000;
const FIELDS_PER_BYTE: usize = 1;

/// A check of a decoded message before it is written as JSON.
struct Walk {
    fields: usize,
    budget: usize,
}

impl Walk {
    /// Refuses a field number the schema does not define (at any depth, inside `Any`
    /// payloads too), `Any` values nested deeper than [`MAX_ANY_DEPTH`], and a message
    /// that would expand past the budget.
    fn check(&mut self, message: &DynamicMessage, any_depth: usize) -> Result<(), String> {
        if let Some(field) = message.unknown_fields().next() {
            return Err(format!("field number {} is not in the schema", field.number()));
        }
        let descriptor = message.descriptor();
        self.fields += descriptor.fields().len().max(1);
        if self.fields > self.budget {
            return Err(format!("the value expands to more than {} fields", self.budget));
        }
        if descriptor.full_name() == "google.protobuf.Any" {
            return self.any(message, any_depth);
        }
        for (_, value) in message.fields() {
            match value {
                prost_reflect::Value::Message(m) => self.check(m, any_depth)?,
                prost_reflect::Value::List(items) => {
                    for m in items.iter().filter_map(|v| v.as_message()) {
                        self.check(m, any_depth)?;
                    }
                }
                prost_reflect::Value::Map(entries) => {
                    self.fields += entries.len();
                    for m in entries.values().filter_map(|v| v.as_message()) {
                        self.check(m, any_depth)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// An `Any`: its payload decoded with the type its URL names, as the JSON writer will.
    fn any(&mut self, message: &DynamicMessage, any_depth: usize) -> Result<(), String> {
        if any_depth >= MAX_ANY_DEPTH {
            return Err(format!("google.protobuf.Any nested more than {MAX_ANY_DEPTH} deep"));
        }
        let url = message.get_field_by_name("type_url");
        let Some(url) = url.as_deref().and_then(|v| v.as_str()) else { return Ok(()) };
        let name = url.rsplit('/').next().unwrap_or(url);
        let Some(inner) = message.descriptor().parent_pool().get_message_by_name(name) else {
            return Err(format!("google.protobuf.Any of {name}, a type the schema does not define"));
        };
        let value = message.get_field_by_name("value");
        let bytes = value.as_deref().and_then(|v| v.as_bytes()).cloned().unwrap_or_default();
        let decoded =
            DynamicMessage::decode(inner, bytes).map_err(|e| format!("google.protobuf.Any of {name}: {e}"))?;
        self.check(&decoded, any_depth + 1)
    }
}

/// Splits the bytes after a frame's schema id into its message indexes and the message.
pub fn message_indexes(body: &[u8]) -> Result<(Vec<usize>, &[u8]), String> {
    let mut pos = 0;
    let count = zigzag(body, &mut pos).map_err(|e| format!("message indexes: {e}"))?;
    if count == 0 {
        return Ok((vec![0], &body[pos..]));
    }
    let count = usize::try_from(count)
        .ok()
        .filter(|&c| c <= MAX_INDEXES)
        .ok_or_else(|| format!("message indexes: a count of {count}"))?;
    let mut indexes = Vec::with_capacity(count);
    for _ in 0..count {
        let i = zigzag(body, &mut pos).map_err(|e| format!("message indexes: {e}"))?;
        indexes.push(usize::try_from(i).map_err(|_| format!("message indexes: index {i}"))?);
    }
    Ok((indexes, &body[pos..]))
}

/// One zigzag varint at `pos`.
fn zigzag(buf: &[u8], pos: &mut usize) -> Result<i64, String> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(*pos).ok_or("cut short")?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
        }
    }
    Err("a varint longer than 10 bytes".into())
}

/// The message indexes as a frame writes them (the producer side, for tests and tools).
pub fn encode_message_indexes(indexes: &[usize]) -> Vec<u8> {
    fn put(out: &mut Vec<u8>, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            out.push((z as u8 & 0x7f) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
    }
    if indexes == [0] || indexes.is_empty() {
        return vec![0];
    }
    let mut out = Vec::new();
    put(&mut out, indexes.len() as i64);
    for &i in indexes {
        put(&mut out, i as i64);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::prost_types::{field_descriptor_proto, DescriptorProto, FieldDescriptorProto};

    fn field(
        name: &str,
        number: i32,
        kind: field_descriptor_proto::Type,
        type_name: Option<&str>,
    ) -> FieldDescriptorProto {
        FieldDescriptorProto {
            name: Some(name.into()),
            number: Some(number),
            label: Some(field_descriptor_proto::Label::Optional as i32),
            r#type: Some(kind as i32),
            type_name: type_name.map(Into::into),
            json_name: None,
            ..Default::default()
        }
    }

    #[test]
    fn google_and_confluent_common_types_are_built_in() {
        use field_descriptor_proto::Type;
        let imports = [
            "google/type/money.proto",
            "google/type/date.proto",
            "google/type/datetime.proto",
            "google/type/phone_number.proto",
            "google/type/dayofweek.proto",
            "confluent/meta.proto",
            "confluent/type/decimal.proto",
        ];
        let mut when = field("when", 5, Type::Enum, Some(".google.type.DayOfWeek"));
        when.label = Some(field_descriptor_proto::Label::Optional as i32);
        let file = FileDescriptorProto {
            name: Some("shop/priced.proto".into()),
            package: Some("shop".into()),
            dependency: imports.iter().map(|i| (*i).to_owned()).collect(),
            message_type: vec![DescriptorProto {
                name: Some("Priced".into()),
                field: vec![
                    field("total", 1, Type::Message, Some(".google.type.Money")),
                    field("on", 2, Type::Message, Some(".google.type.Date")),
                    field("exact", 3, Type::Message, Some(".confluent.type.Decimal")),
                    field("phone", 4, Type::Message, Some(".google.type.PhoneNumber")),
                    when,
                    field("at", 6, Type::Message, Some(".google.type.DateTime")),
                ],
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        };
        let schema = ProtobufSchema::from_descriptors(&file.encode_to_vec(), &[]).expect("the imports are built in");
        let json = serde_json::json!({
            "total": {"currency_code": "EUR", "units": 12, "nanos": 500000000},
            "on": {"year": 2026, "month": 12, "day": 7},
            "exact": {"value": "AQI=", "precision": 5, "scale": 2},
            "phone": {"short_code": {"region_code": "NO", "number": "1881"}},
            "when": "MONDAY",
            "at": {"year": 2026, "hours": 1, "time_zone": {"id": "Europe/Oslo"}}
        });
        let body = schema.encode_json(&[0], json).unwrap();
        let decoded = schema.decode(1, &body).unwrap();
        assert_eq!(decoded["total"]["units"], 12);
        assert_eq!(decoded["on"]["day"], 7);
        assert_eq!(decoded["exact"]["scale"], 2);
        assert_eq!(decoded["phone"]["short_code"]["number"], "1881");
        assert_eq!(decoded["when"], "MONDAY");
        assert_eq!(decoded["at"]["time_zone"]["id"], "Europe/Oslo");
        // Every built-in file links on its own.
        for name in [
            "google/type/calendar_period.proto",
            "google/type/color.proto",
            "google/type/decimal.proto",
            "google/type/expr.proto",
            "google/type/fraction.proto",
            "google/type/interval.proto",
            "google/type/latlng.proto",
            "google/type/localized_text.proto",
            "google/type/month.proto",
            "google/type/postal_address.proto",
            "google/type/quaternion.proto",
            "google/type/timeofday.proto",
        ] {
            let mut one = file.clone();
            one.dependency = vec![name.to_owned()];
            one.message_type[0].field.truncate(0);
            one.message_type[0].field.push(field("n", 1, Type::String, None));
            ProtobufSchema::from_descriptors(&one.encode_to_vec(), &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// shop/order.proto: `Order { string order_id = 1; int64 amount = 2; Line line = 3;
    /// message Line { string sku = 1; } }` and `Refund { string order_id = 1; }`.
    fn order_file() -> Vec<u8> {
        use field_descriptor_proto::Type;
        let line = DescriptorProto {
            name: Some("Line".into()),
            field: vec![field("sku", 1, Type::String, None)],
            ..Default::default()
        };
        let order = DescriptorProto {
            name: Some("Order".into()),
            field: vec![
                field("order_id", 1, Type::String, None),
                field("amount", 2, Type::Int64, None),
                field("line", 3, Type::Message, Some(".shop.Order.Line")),
            ],
            nested_type: vec![line],
            ..Default::default()
        };
        let refund = DescriptorProto {
            name: Some("Refund".into()),
            field: vec![field("order_id", 1, Type::String, None)],
            ..Default::default()
        };
        let mut items = field("items", 3, Type::Message, Some(".shop.Order"));
        items.label = Some(field_descriptor_proto::Label::Repeated as i32);
        let node = DescriptorProto {
            name: Some("Node".into()),
            field: vec![
                field("next", 1, Type::Message, Some(".shop.Node")),
                field("any", 2, Type::Message, Some(".google.protobuf.Any")),
                items,
            ],
            ..Default::default()
        };
        FileDescriptorProto {
            name: Some("shop/order.proto".into()),
            package: Some("shop".into()),
            dependency: vec!["google/protobuf/any.proto".into()],
            message_type: vec![order, refund, node],
            syntax: Some("proto3".into()),
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn schema() -> ProtobufSchema {
        ProtobufSchema::from_descriptors(&order_file(), &[]).expect("schema")
    }

    fn order(schema: &ProtobufSchema, json: Value) -> Vec<u8> {
        let d = schema.message(&[0]).unwrap();
        let m = DynamicMessage::deserialize(d, json).expect("message");
        m.encode_to_vec()
    }

    #[test]
    fn an_order_decodes_with_proto_field_names_and_numbers() {
        let s = schema();
        let mut body = vec![0u8];
        body.extend(order(
            &s,
            serde_json::json!({"order_id": "o-1", "amount": "9007199254740993", "line": {"sku": "x"}}),
        ));
        let v = s.decode(7, &body).unwrap();
        assert_eq!(v, serde_json::json!({"order_id": "o-1", "amount": 9007199254740993_i64, "line": {"sku": "x"}}));
        // Defaults are written out.
        let v = s.decode(7, &[0]).unwrap();
        assert_eq!(v["order_id"], "");
        assert_eq!(v["amount"], 0);
    }

    #[test]
    fn message_indexes_pick_second_and_nested_messages() {
        let s = schema();
        for (indexes, name) in [(vec![0], "shop.Order"), (vec![1], "shop.Refund"), (vec![0, 0], "shop.Order.Line")] {
            let encoded = encode_message_indexes(&indexes);
            let (read, rest) = message_indexes(&encoded).unwrap();
            assert_eq!(read, indexes);
            assert!(rest.is_empty());
            assert_eq!(s.message(&read).unwrap().full_name(), name);
        }
        let mut body = encode_message_indexes(&[1]);
        body.extend(
            DynamicMessage::deserialize(s.message(&[1]).unwrap(), serde_json::json!({"order_id": "r"}))
                .unwrap()
                .encode_to_vec(),
        );
        assert_eq!(s.decode(1, &body).unwrap(), serde_json::json!({"order_id": "r"}));
        let e = s.decode(1, &encode_message_indexes(&[5])).unwrap_err();
        assert_eq!(e.reason(), "payload_schema_mismatch", "{e}");
    }

    #[test]
    fn broken_values_are_mismatches_not_panics() {
        let s = schema();
        let good = {
            let mut b = vec![0u8];
            b.extend(order(&s, serde_json::json!({"order_id": "o-1", "amount": 5})));
            b
        };
        // Cut short inside a field, bad varints, an unknown field number, a wrong wire type.
        // (Cut between two fields, a message is a shorter valid one: the encoding has no
        // length or end marker to tell.)
        assert_eq!(good, [0, 0x0a, 3, b'o', b'-', b'1', 0x10, 5]);
        for cut in (2..6).chain(7..good.len()) {
            assert_eq!(s.decode(1, &good[..cut]).unwrap_err().reason(), "payload_schema_mismatch", "cut at {cut}");
        }
        assert_eq!(s.decode(1, &good[..6]).unwrap()["amount"], 0, "cut between fields");
        for body in [
            vec![0x80; 12],
            vec![0x02, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            vec![0, 0x78, 0x01],       // field 15, varint: not in the schema
            vec![0, 0x0a, 0x05, b'a'], // field 1, length 5, one byte
            vec![0, 0x0b],             // field 1 as a start group
        ] {
            assert_eq!(s.decode(1, &body).unwrap_err().reason(), "payload_schema_mismatch", "{body:?}");
        }
        // Deep nesting (Node.next in Node.next ...) stops at prost's limit, without
        // exhausting the stack.
        let mut deep: Vec<u8> = Vec::new();
        for _ in 0..1_000 {
            deep = length_delimited(1, &deep);
        }
        let e = s.decode_message(1, &[2], &deep).unwrap_err();
        assert_eq!(e.reason(), "payload_schema_mismatch", "{e}");
        let shallow = (0..50).fold(Vec::new(), |inner, _| length_delimited(1, &inner));
        assert!(s.decode_message(1, &[2], &shallow).is_ok());
    }

    /// A length-delimited field `number` holding `inner`.
    fn length_delimited(number: u32, inner: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(inner.len() + 6);
        for mut n in [u64::from(number << 3 | 2), inner.len() as u64] {
            while n >= 0x80 {
                out.push((n as u8 & 0x7f) | 0x80);
                n >>= 7;
            }
            out.push(n as u8);
        }
        out.extend_from_slice(inner);
        out
    }

    #[test]
    fn nested_any_and_expanding_values_are_refused_not_followed() {
        let s = schema();
        // An Any holding a Node holding an Any ... : refused past MAX_ANY_DEPTH.
        let any_of = |node: &[u8]| {
            let mut any = length_delimited(1, b"type.googleapis.com/shop.Node");
            any.extend(length_delimited(2, node));
            length_delimited(2, &any)
        };
        let mut node = Vec::new();
        for _ in 0..MAX_ANY_DEPTH {
            node = any_of(&node);
        }
        assert!(s.decode_message(1, &[2], &node).is_ok(), "{MAX_ANY_DEPTH} levels of Any are fine");
        let e = s.decode_message(1, &[2], &any_of(&node)).unwrap_err();
        assert!(e.to_string().contains("nested more than"), "{e}");
        // An Any of a type the schema does not define; an unknown field inside an Any.
        let mut any = length_delimited(1, b"type.googleapis.com/shop.Nothing");
        any.extend(length_delimited(2, b""));
        assert!(s.decode_message(1, &[2], &length_delimited(2, &any)).is_err());
        let mut any = length_delimited(1, b"type.googleapis.com/shop.Node");
        any.extend(length_delimited(2, &[0x78, 0x01]));
        let e = s.decode_message(1, &[2], &length_delimited(2, &any)).unwrap_err();
        assert!(e.to_string().contains("field number 15"), "{e}");
        // 200,000 empty Orders (two bytes each, three fields each) would expand to 600,000
        // fields from 400,000 bytes.
        let items: Vec<u8> = (0..200_000).flat_map(|_| [0x1a, 0x00]).collect();
        match s.decode_message(1, &[2], &items) {
            Err(e) => assert!(e.to_string().contains("expands to more than"), "{e}"),
            Ok(_) => panic!("an expanding value was accepted"),
        }
        let few: Vec<u8> = (0..1_000).flat_map(|_| [0x1a, 0x00]).collect();
        assert_eq!(s.decode_message(1, &[2], &few).unwrap()["items"].as_array().map(Vec::len), Some(1_000));
    }

    #[test]
    fn imports_resolve_through_dependencies_and_well_known_types() {
        let dep = FileDescriptorProto {
            name: Some("common/money.proto".into()),
            package: Some("common".into()),
            message_type: vec![DescriptorProto {
                name: Some("Money".into()),
                field: vec![field("cents", 1, field_descriptor_proto::Type::Int64, None)],
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        };
        let main = FileDescriptorProto {
            name: Some("shop/paid.proto".into()),
            package: Some("shop".into()),
            dependency: vec!["common/money.proto".into(), "google/protobuf/timestamp.proto".into()],
            message_type: vec![DescriptorProto {
                name: Some("Paid".into()),
                field: vec![
                    field("total", 1, field_descriptor_proto::Type::Message, Some(".common.Money")),
                    field("at", 2, field_descriptor_proto::Type::Message, Some(".google.protobuf.Timestamp")),
                ],
                ..Default::default()
            }],
            syntax: Some("proto3".into()),
            ..Default::default()
        };
        let err = ProtobufSchema::from_descriptors(&main.encode_to_vec(), &[]).unwrap_err();
        assert!(err.contains("common/money.proto"), "{err}");
        // The import's name is the reference's, whatever the registry kept inside.
        let mut renamed = dep.clone();
        renamed.name = Some("money.proto".into());
        let s = ProtobufSchema::from_descriptors(
            &main.encode_to_vec(),
            &[("common/money.proto".to_owned(), renamed.encode_to_vec())],
        )
        .unwrap();
        let m = DynamicMessage::deserialize(
            s.message(&[0]).unwrap(),
            serde_json::json!({"total": {"cents": 250}, "at": "2026-12-06T10:00:00Z"}),
        )
        .unwrap();
        let mut body = vec![0u8];
        body.extend(m.encode_to_vec());
        let v = s.decode(3, &body).unwrap();
        assert_eq!(v["total"]["cents"], 250);
        assert_eq!(v["at"], "2026-12-06T10:00:00Z");
        assert!(ProtobufSchema::from_descriptors(b"\xff\xff", &[]).is_err());
    }
}
