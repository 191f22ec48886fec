//! Protobuf values in Confluent's and AWS Glue's wire formats, decoded into JSON without
//! generated code.
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
//! AWS Glue frames Protobuf its own way ([`ProtobufSchema::decode_glue`]): one unsigned
//! varint numbering the message among all the file's messages sorted by full name, then
//! the message; and it keeps the schema as `.proto` text, parsed here with protox's
//! parser ([`ProtobufSchema::from_proto_text`]). Glue resolves no imports but built-in
//! ones, so neither do we: the files above, and the two its Kafka Connect converter
//! imports (`additionalTypes/decimal.proto`, `metadata/metadata.proto`).
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
    /// Every message of the file, nested ones too, by full name: the numbering of AWS
    /// Glue's message index.
    glue_order: Vec<MessageDescriptor>,
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
        Self::link(main, pending)
    }

    /// Builds the schema from `.proto` text, as AWS Glue keeps a Protobuf schema: parsed
    /// as `name`, linked with Google's well-known and common types and the other built-in
    /// files (Glue's deserializers resolve no other imports). A definition that does not
    /// parse or link is refused with the parser's message.
    ///
    /// Glue's Java serializer does not keep the producer's file: it registers the compiled
    /// descriptor written back out as text by Wire, which names types fully qualified
    /// (`.shop.Order.Line`), writes map entries as nested messages with
    /// `option map_entry = true`, and writes custom options without their parentheses
    /// (`[metadata.metadata_key = "..."]`), which `protoc` would read as a path of plain
    /// field names. Such an option (its first name neither a field of its options message
    /// nor an extension) is dropped: decoding needs no custom option.
    pub fn from_proto_text(name: &str, text: &str) -> Result<Self, String> {
        if text.len() > MAX_PROTO_TEXT {
            return Err(format!("a .proto definition of {} bytes (at most {MAX_PROTO_TEXT})", text.len()));
        }
        // The text is the registry's, not the record's; the parser is still kept from
        // turning a definition it mishandles into a panic the worker would retry for ever.
        let mut parsed = std::panic::catch_unwind(|| protox_parse::parse(name, text))
            .map_err(|_| "the .proto parser failed on this definition".to_owned())?
            .map_err(|e| {
                let mut message = e.to_string();
                if message.len() > 300 {
                    let mut end = 300;
                    while !message.is_char_boundary(end) {
                        end -= 1;
                    }
                    message.truncate(end);
                    message.push('…');
                }
                format!("not a valid .proto definition: {message}")
            })?;
        drop_unresolvable_options(&mut parsed);
        Self::link(parsed, Vec::new())
    }

    /// Links `main` after `pending` (the files it imports, in any order) and the built-in
    /// files any of them import.
    fn link(main: FileDescriptorProto, pending: Vec<FileDescriptorProto>) -> Result<Self, String> {
        // prost-reflect 0.16 indexes past its file table building the error for a syntax
        // it does not know (`editions`, or garbage): refused here first.
        let mut main = main;
        let mut pending = pending;
        // An empty syntax is proto2's (descriptors leave it out for proto2).
        for file in std::iter::once(&mut main).chain(pending.iter_mut()) {
            if file.syntax.as_deref() == Some("") {
                file.syntax = None;
            }
        }
        if let Some(file) = std::iter::once(&main)
            .chain(&pending)
            .find(|f| !matches!(f.syntax.as_deref(), None | Some("proto2" | "proto3")))
        {
            return Err(format!(
                "{}: syntax {:?} (proto2 and proto3 are decoded here)",
                file.name(),
                file.syntax.as_deref().unwrap_or_default()
            ));
        }
        // The descriptors are the registry's, not the record's, but a panic on them would
        // make the worker retry the batch for ever: it becomes the schema's error instead.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Self::link_checked(main, pending)))
            .map_err(|_| "the descriptor library failed on this schema".to_owned())?
    }

    fn link_checked(main: FileDescriptorProto, mut pending: Vec<FileDescriptorProto>) -> Result<Self, String> {
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
        Ok(Self { glue_order: glue_order(&file), file })
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
        let descriptor =
            self.message(indexes).map_err(|message| PayloadError::SchemaMismatch { schema_id, message })?;
        decode_as(schema_id, descriptor, message)
    }

    /// Decodes one value framed for AWS Glue, after its 18-byte header (and, if it was
    /// compressed, inflated): a message index, then the message.
    ///
    /// Glue's serializers write one unsigned varint before the message (not Confluent's
    /// zigzag list): the message's place among all the file's messages, nested ones and
    /// generated map entries included, sorted by full name and numbered from 0. For a
    /// file with `Refund` and `Order { message Line }` in package `shop`, `shop.Order` is
    /// 0, `shop.Order.Line` 1 and `shop.Refund` 2, whatever their order in the file.
    /// Event source mappings passing values on as `SOURCE` keep the index.
    pub fn decode_glue(&self, schema_id: impl Into<SchemaId>, body: &[u8]) -> Result<Value, PayloadError> {
        let schema_id = schema_id.into();
        let mismatch = |message: String| PayloadError::SchemaMismatch { schema_id, message };
        let (index, message) = glue_message_index(body).map_err(mismatch)?;
        let descriptor = self.glue_message(index).map_err(mismatch)?;
        decode_as(schema_id, descriptor, message)
    }

    /// The message AWS Glue's index `index` names.
    fn glue_message(&self, index: u32) -> Result<MessageDescriptor, String> {
        // Java reads it as a signed int: past 2^31 it is negative and names nothing.
        let found = i32::try_from(index).ok().and_then(|i| self.glue_order.get(i as usize));
        found.cloned().ok_or_else(|| {
            format!(
                "message index {index}: the schema has {} messages (AWS Glue numbers nested ones too)",
                self.glue_order.len()
            )
        })
    }

    /// AWS Glue's message index of the message named `full_name` (`shop.Order.Line`).
    pub fn glue_index(&self, full_name: &str) -> Option<usize> {
        self.glue_order.iter().position(|m| m.full_name() == full_name)
    }

    /// Encodes `json` (proto3 JSON) as the message named `full_name`, after its AWS Glue
    /// message index: the body of a Glue frame (the producer side, for tools and tests).
    pub fn encode_glue_json(&self, full_name: &str, json: Value) -> Result<Vec<u8>, String> {
        let index = self.glue_index(full_name).ok_or_else(|| format!("the schema has no message {full_name}"))?;
        let message = DynamicMessage::deserialize(self.glue_order[index].clone(), json).map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        put_varint(&mut out, index as u64);
        message.encode(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// Largest `.proto` text parsed (AWS Glue keeps definitions of at most 170,000 characters).
const MAX_PROTO_TEXT: usize = 1 << 20;

/// Drops the options of `file` that could only fail to resolve and that decoding does
/// not need: a name whose first part is written without parentheses yet is no field of
/// its options message (`metadata.metadata_key`, as Wire writes an extension).
fn drop_unresolvable_options(file: &mut FileDescriptorProto) {
    use prost_reflect::prost_types::UninterpretedOption;
    fn keep(options: &mut Vec<UninterpretedOption>, kind: &str) {
        let Some(message) = DescriptorPool::global().get_message_by_name(&format!("google.protobuf.{kind}")) else {
            return;
        };
        options.retain(|o| {
            o.name.first().is_none_or(|part| part.is_extension || message.get_field_by_name(&part.name_part).is_some())
        });
    }
    fn enums(items: &mut [prost_reflect::prost_types::EnumDescriptorProto]) {
        for e in items {
            if let Some(o) = e.options.as_mut() {
                keep(&mut o.uninterpreted_option, "EnumOptions");
            }
            for v in &mut e.value {
                if let Some(o) = v.options.as_mut() {
                    keep(&mut o.uninterpreted_option, "EnumValueOptions");
                }
            }
        }
    }
    fn fields(items: &mut [prost_reflect::prost_types::FieldDescriptorProto]) {
        for f in items {
            if let Some(o) = f.options.as_mut() {
                keep(&mut o.uninterpreted_option, "FieldOptions");
            }
        }
    }
    fn messages(items: &mut [prost_reflect::prost_types::DescriptorProto]) {
        for m in items {
            if let Some(o) = m.options.as_mut() {
                keep(&mut o.uninterpreted_option, "MessageOptions");
            }
            fields(&mut m.field);
            fields(&mut m.extension);
            for oneof in &mut m.oneof_decl {
                if let Some(o) = oneof.options.as_mut() {
                    keep(&mut o.uninterpreted_option, "OneofOptions");
                }
            }
            for range in &mut m.extension_range {
                if let Some(o) = range.options.as_mut() {
                    keep(&mut o.uninterpreted_option, "ExtensionRangeOptions");
                }
            }
            enums(&mut m.enum_type);
            messages(&mut m.nested_type);
        }
    }
    if let Some(o) = file.options.as_mut() {
        keep(&mut o.uninterpreted_option, "FileOptions");
    }
    messages(&mut file.message_type);
    enums(&mut file.enum_type);
    fields(&mut file.extension);
    for service in &mut file.service {
        if let Some(o) = service.options.as_mut() {
            keep(&mut o.uninterpreted_option, "ServiceOptions");
        }
        for method in &mut service.method {
            if let Some(o) = method.options.as_mut() {
                keep(&mut o.uninterpreted_option, "MethodOptions");
            }
        }
    }
}

/// Decodes `message` as `descriptor` into proto3 JSON, within the checks of [`Walk`].
fn decode_as(schema_id: SchemaId, descriptor: MessageDescriptor, message: &[u8]) -> Result<Value, PayloadError> {
    let mismatch = |message: String| PayloadError::SchemaMismatch { schema_id, message };
    let decoded = DynamicMessage::decode(descriptor, message).map_err(|e| mismatch(e.to_string()))?;
    let mut walk = Walk { fields: 0, budget: MIN_FIELD_BUDGET + FIELDS_PER_BYTE * message.len() };
    walk.check(&decoded, 0).map_err(mismatch)?;
    let options =
        SerializeOptions::new().use_proto_field_name(true).stringify_64_bit_integers(false).skip_default_fields(false);
    decoded
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| mismatch(format!("not representable as JSON: {e}")))
}

/// Every message of `file`, nested ones (map entries too) included, sorted by full name
/// as AWS Glue's serializers number them. Their sort is Java's `String` order; names are
/// ASCII identifiers and dots, where it is byte order.
fn glue_order(file: &FileDescriptor) -> Vec<MessageDescriptor> {
    let mut all = Vec::new();
    let mut queue: std::collections::VecDeque<MessageDescriptor> = file.messages().collect();
    while let Some(message) = queue.pop_front() {
        queue.extend(message.child_messages());
        all.push(message);
    }
    all.sort_by(|a, b| a.full_name().cmp(b.full_name()));
    all
}

/// Splits a Glue body into its message index and the message: one unsigned varint, read
/// as Java's `CodedInputStream.readUInt32` reads it (at most 10 bytes, the low 32 bits
/// kept, as a signed `int`: past 2^31 it names no message).
pub fn glue_message_index(body: &[u8]) -> Result<(u32, &[u8]), String> {
    let mut value: u64 = 0;
    for (i, &byte) in body.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok((value as u32, &body[i + 1..]));
        }
    }
    Err(if body.len() < 10 {
        "message index: cut short".into()
    } else {
        "message index: a varint longer than 10 bytes".into()
    })
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
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
        // A syntax prost-reflect does not know (here ""; found by the fuzzer: it panicked).
        assert!(ProtobufSchema::from_descriptors(b"p\xd12p\xd13b\x00", &[]).is_err());
        let mut garbage = main.clone();
        garbage.syntax = Some("garbage".into());
        let e = ProtobufSchema::from_descriptors(&garbage.encode_to_vec(), &[]).unwrap_err();
        assert!(e.contains("syntax"), "{e}");
    }

    /// The file AWS Glue's tests below use: `Refund` declared before `Order`, a nested
    /// message, a map (whose generated entry type Glue numbers too), imports Glue
    /// resolves by itself, and Connect's metadata option.
    const GLUE_PROTO: &str = r#"
        syntax = "proto3";
        package shop;

        import "google/protobuf/timestamp.proto";
        import "google/type/money.proto";
        import "additionalTypes/decimal.proto";
        import "metadata/metadata.proto";

        message Refund {
          string order_id = 1;
          additionalTypes.Decimal amount = 2;
        }

        message Order {
          string order_id = 1 [(metadata.metadata_key) = "source", (metadata.metadata_value) = "pos"];
          int64 amount = 2;
          repeated Line lines = 3;
          map<string, string> tags = 4;
          google.protobuf.Timestamp placed_at = 5;
          google.type.Money total = 6;
          message Line { string sku = 1; int32 quantity = 2; }
        }
    "#;

    #[test]
    fn glue_numbers_every_message_by_full_name() {
        let s = ProtobufSchema::from_proto_text("shop.proto", GLUE_PROTO).expect("the text parses and links");
        let order: Vec<&str> = s.glue_order.iter().map(|m| m.full_name()).collect();
        assert_eq!(order, ["shop.Order", "shop.Order.Line", "shop.Order.TagsEntry", "shop.Refund"]);
        // The example in Glue's own MessageIndexFinder: B { C {} A { D {} } } numbers
        // B = 0, B.A = 1, B.A.D = 2, B.C = 3.
        let b = ProtobufSchema::from_proto_text(
            "b.proto",
            "syntax = \"proto3\"; message B { message C {} message A { message D {} } }",
        )
        .unwrap();
        let names: Vec<&str> = b.glue_order.iter().map(|m| m.full_name()).collect();
        assert_eq!(names, ["B", "B.A", "B.A.D", "B.C"]);
    }

    #[test]
    fn glue_values_decode_by_their_message_index() {
        let s = ProtobufSchema::from_proto_text("shop.proto", GLUE_PROTO).unwrap();
        let order = serde_json::json!({
            "order_id": "o-1", "amount": 12,
            "lines": [{"sku": "a", "quantity": 2}],
            "tags": {"channel": "web"},
            "placed_at": "2026-12-07T03:00:00Z",
            "total": {"currency_code": "EUR", "units": 12, "nanos": 0}
        });
        let body = s.encode_glue_json("shop.Order", order).unwrap();
        assert_eq!(body[0], 0, "shop.Order is message 0");
        let v = s.decode_glue(SchemaId::Glue([7; 16]), &body).unwrap();
        assert_eq!(v["order_id"], "o-1");
        assert_eq!(v["lines"][0]["quantity"], 2);
        assert_eq!(v["tags"]["channel"], "web");
        assert_eq!(v["placed_at"], "2026-12-07T03:00:00Z");
        assert_eq!(v["total"]["currency_code"], "EUR");
        let refund = s
            .encode_glue_json("shop.Refund", serde_json::json!({"order_id": "o-1", "amount": {"units": 3, "scale": 2}}))
            .unwrap();
        assert_eq!(refund[0], 3, "shop.Refund is message 3, though first in the file");
        let v = s.decode_glue(SchemaId::Glue([7; 16]), &refund).unwrap();
        assert_eq!(v["amount"]["units"], 3);
        // The same bytes read as the nested Line are a mismatch (field 2 of Line is an
        // int32, a length-delimited value there is the wrong wire type).
        let mut as_line = refund.clone();
        as_line[0] = 1;
        assert_eq!(s.decode_glue(1, &as_line).unwrap_err().reason(), "payload_schema_mismatch");
        // An index past the last message, a cut or overlong varint, nothing at all.
        for body in [
            vec![4u8, 0x0a, 0],
            vec![0x80],
            vec![0xff; 11],
            vec![],
            // 2^31: Java's signed int is negative there.
            vec![0x80, 0x80, 0x80, 0x80, 0x08],
        ] {
            let e = s.decode_glue(1, &body).unwrap_err();
            assert_eq!(e.reason(), "payload_schema_mismatch", "{body:?}: {e}");
        }
        // A zero index and an empty message: the first message, all defaults.
        assert_eq!(s.decode_glue(1, &[0]).unwrap()["amount"], 0);
        // A 10-byte varint keeps its low 32 bits, as Java's readUInt32: 2^63 reads as 0.
        let long = [0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01];
        assert_eq!(s.decode_glue(1, &long).unwrap()["order_id"], "");
    }

    /// [`GLUE_PROTO`] as Glue's Java serializer registers it: the compiled descriptor
    /// written back as text by Wire (through apicurio's FileDescriptorUtils): types fully
    /// qualified, `json_name` on every field, the map as its entry message with
    /// `option map_entry = true`, and the custom options without parentheses.
    const GLUE_PROTO_AS_WIRE_WRITES_IT: &str = r#"syntax = "proto3";
package shop;

import "google/protobuf/timestamp.proto";
import "google/type/money.proto";
import "additionalTypes/decimal.proto";
import "metadata/metadata.proto";

option java_package = "shop";
option java_outer_classname = "ShopProto";

message Refund {
  string order_id = 1 [json_name = "orderId"];
  .additionalTypes.Decimal amount = 2 [json_name = "amount"];
}
message Order {
  string order_id = 1 [
    json_name = "orderId",
    metadata.metadata_key = "source",
    metadata.metadata_value = "pos"
  ];
  int64 amount = 2 [json_name = "amount"];
  repeated .shop.Order.Line lines = 3 [json_name = "lines"];
  repeated .shop.Order.TagsEntry tags = 4 [json_name = "tags"];
  .google.protobuf.Timestamp placed_at = 5 [json_name = "placedAt"];
  .google.type.Money total = 6 [json_name = "total"];

  message Line {
    string sku = 1 [json_name = "sku"];
    int32 quantity = 2 [json_name = "quantity"];
  }
  message TagsEntry {
    option map_entry = true;

    string key = 1 [json_name = "key"];
    string value = 2 [json_name = "value"];
  }
}
"#;

    #[test]
    fn glue_definitions_as_wire_writes_them_decode_the_same_values() {
        let source = ProtobufSchema::from_proto_text("shop.proto", GLUE_PROTO).unwrap();
        let wire = ProtobufSchema::from_proto_text("shop.proto", GLUE_PROTO_AS_WIRE_WRITES_IT)
            .expect("Wire's rendering parses and links");
        let names = |s: &ProtobufSchema| s.glue_order.iter().map(|m| m.full_name().to_owned()).collect::<Vec<_>>();
        assert_eq!(names(&source), names(&wire));
        let body = source
            .encode_glue_json(
                "shop.Order",
                serde_json::json!({"order_id": "o-1", "amount": 3, "tags": {"a": "b"}, "lines": [{"sku": "x"}]}),
            )
            .unwrap();
        let (a, b) = (source.decode_glue(1, &body).unwrap(), wire.decode_glue(1, &body).unwrap());
        assert_eq!(a, b);
        assert_eq!(b["tags"], serde_json::json!({"a": "b"}), "the entry message is still a map");
        // A custom option written with parentheses stays and resolves; one naming nothing
        // resolvable without them is dropped, not refused.
        let odd = GLUE_PROTO_AS_WIRE_WRITES_IT.replace("metadata.metadata_value", "nowhere.at_all");
        assert!(ProtobufSchema::from_proto_text("shop.proto", &odd).is_ok());
        let unknown_extension = GLUE_PROTO_AS_WIRE_WRITES_IT.replace("metadata.metadata_value", "(nowhere.at_all)");
        assert!(ProtobufSchema::from_proto_text("shop.proto", &unknown_extension).is_err());
    }

    #[test]
    fn glue_definitions_that_do_not_parse_or_link_are_refused() {
        for (text, says) in [
            ("syntax = \"proto3\"; message {", "not a valid .proto"),
            ("syntax = \"proto3\"; import \"shop/other.proto\"; message A { shop.Other o = 1; }", "shop/other.proto"),
            ("syntax = \"proto3\"; message A { Missing m = 1; }", "Missing"),
            ("syntax = \"proto3\"; enum E { E0 = 0; }", "no message"),
            ("", "no message"),
            ("edition = \"2023\"; message A {}", "not a valid .proto"),
            // A long token quoted back is cut.
            (&format!("syntax = \"proto3\"; {} A {{}}", "x".repeat(5000)), "…"),
        ] {
            let e = ProtobufSchema::from_proto_text("x.proto", text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }
}
