//! Record values framed for a schema registry, and Avro datums decoded into JSON.
//!
//! Confluent's wire format, which Confluent's serializers, Debezium's Avro converter,
//! Redpanda, Karapace and Apicurio's compatibility API all write: one magic byte `0`, the
//! schema id as four big-endian bytes, then the datum encoded with that schema.
//!
//! A decoded Avro value becomes a [`serde_json::Value`], so event id strategies (JSON
//! pointers) and handlers (serde) read Avro values exactly as they read JSON ones. The
//! mapping: records and maps are objects, arrays arrays, unions their branch's value
//! (no wrapper), enums their symbol, `bytes` and `fixed` arrays of byte values (what
//! serde reads into a `Vec<u8>`), logical types their underlying number (dates in days,
//! times and timestamps in their unit), decimals their unscaled two's-complement bytes,
//! UUIDs their text; a float that JSON cannot hold (NaN, infinities) its name as a string.
//!
//! Invariant: hostile bytes get a classified [`PayloadError`], never a panic; a datum is
//! decoded only whole (bytes left after it are an error, not ignored).

use std::collections::HashMap;

use apache_avro::schema::Schema;
use apache_avro::types::Value as Avro;
use serde_json::{Map, Number, Value};

/// How a function's record values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ValueFormat {
    /// The value is the payload itself (JSON, or anything the handler parses).
    #[default]
    Json,
    /// Framed in Confluent's wire format and encoded with a schema from the registry
    /// (Avro). With `or_json`, a value that does not start with the magic byte is read
    /// as plain JSON instead of being refused (a topic moving from JSON to Avro; JSON
    /// text never starts with a zero byte).
    Confluent {
        /// Accept unframed values as JSON.
        or_json: bool,
    },
}

impl ValueFormat {
    /// Values framed for a Confluent-compatible registry, only.
    pub const fn confluent() -> Self {
        ValueFormat::Confluent { or_json: false }
    }

    /// Values framed for a Confluent-compatible registry, or plain JSON.
    pub const fn confluent_or_json() -> Self {
        ValueFormat::Confluent { or_json: true }
    }

    /// `json`, `confluent` or `confluent-or-json`: the name docs and logs use.
    pub fn name(self) -> &'static str {
        match self {
            ValueFormat::Json => "json",
            ValueFormat::Confluent { or_json: false } => "confluent",
            ValueFormat::Confluent { or_json: true } => "confluent-or-json",
        }
    }

    /// Whether values need a schema registry.
    pub fn needs_registry(self) -> bool {
        matches!(self, ValueFormat::Confluent { .. })
    }
}

/// The first byte of a value in Confluent's wire format.
pub const CONFLUENT_MAGIC: u8 = 0;

/// Magic byte and schema id: the bytes before the datum.
pub const CONFLUENT_HEADER_LEN: usize = 5;

/// A value split into its schema id and its datum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framed<'a> {
    /// The registry's id of the schema the datum was written with.
    pub schema_id: u32,
    /// The encoded datum.
    pub body: &'a [u8],
}

/// Why a value could not be decoded. Every variant is the record's own fault: the same
/// bytes fail the same way on every attempt, so the record is dead-lettered under
/// [`PayloadError::reason`] (a registry that cannot answer is a different matter,
/// handled by the caller as unavailable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The value does not start with the magic byte: not framed for a registry.
    #[error("value is not framed for a schema registry: first byte is {first:#04x}, not 0x00")]
    NotFramed {
        /// The byte found instead.
        first: u8,
    },
    /// The value is shorter than the frame's header, or has no datum after it.
    #[error("value is a truncated frame: {len} bytes, a frame needs at least 6")]
    Truncated {
        /// The value's length.
        len: usize,
    },
    /// The datum does not decode with its schema (wrong schema id, corrupt bytes, bytes
    /// left after the datum).
    #[error("value does not match its schema {schema_id}: {message}")]
    SchemaMismatch {
        /// The schema the frame names.
        schema_id: u32,
        /// What the decoder said.
        message: String,
    },
    /// The schema is of a kind this library does not decode.
    #[error("schema {schema_id} is not supported: {message}")]
    Unsupported {
        /// The schema the frame names.
        schema_id: u32,
        /// Why.
        message: String,
    },
}

impl PayloadError {
    /// A stable label for metrics and dead letters.
    pub fn reason(&self) -> &'static str {
        match self {
            PayloadError::NotFramed { .. } => "payload_not_framed",
            PayloadError::Truncated { .. } => "payload_truncated",
            PayloadError::SchemaMismatch { .. } => "payload_schema_mismatch",
            PayloadError::Unsupported { .. } => "schema_unsupported",
        }
    }
}

/// Splits a value in Confluent's wire format into schema id and datum.
pub fn confluent_frame(value: &[u8]) -> Result<Framed<'_>, PayloadError> {
    match value.first() {
        None => return Err(PayloadError::Truncated { len: 0 }),
        Some(&first) if first != CONFLUENT_MAGIC => return Err(PayloadError::NotFramed { first }),
        Some(_) => {}
    }
    // An Avro datum is never empty for a record schema, and a bare header is what a
    // producer cut short leaves.
    if value.len() <= CONFLUENT_HEADER_LEN {
        return Err(PayloadError::Truncated { len: value.len() });
    }
    let schema_id = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
    Ok(Framed { schema_id, body: &value[CONFLUENT_HEADER_LEN..] })
}

/// A value in Confluent's wire format: the header for `schema_id`, then `body`.
pub fn confluent_framed(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONFLUENT_HEADER_LEN + body.len());
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// An Avro schema as the registry returned it, checked once so every record it decodes
/// can be decoded safely.
#[derive(Debug, Clone)]
pub struct AvroSchema {
    schema: Schema,
    recursive: bool,
}

impl AvroSchema {
    /// Parses the schema's JSON text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let schema = Schema::parse_str(text).map_err(|e| e.to_string())?;
        let recursive = is_recursive(&schema);
        Ok(Self { schema, recursive })
    }

    /// The parsed schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Decodes one datum written with this schema (`schema_id` names it in errors).
    ///
    /// A recursive schema (a record that contains itself, a linked list) is refused:
    /// the decoder recurses once per level, so a long enough value would exhaust the
    /// stack and take the process with it, record after record.
    pub fn decode(&self, schema_id: u32, body: &[u8]) -> Result<Value, PayloadError> {
        if self.recursive {
            return Err(PayloadError::Unsupported {
                schema_id,
                message: "recursive Avro schemas are not decoded (a deep value would exhaust the stack)".into(),
            });
        }
        limit_allocations();
        let mut reader = body;
        let value = apache_avro::from_avro_datum(&self.schema, &mut reader, None)
            .map_err(|e| PayloadError::SchemaMismatch { schema_id, message: e.to_string() })?;
        if !reader.is_empty() {
            return Err(PayloadError::SchemaMismatch {
                schema_id,
                message: format!("{} bytes left after the datum", reader.len()),
            });
        }
        Ok(avro_to_json(value))
    }
}

/// The most a length field in a datum may claim (bytes of a string, items of an array).
/// The decoder reserves what a length claims before reading it, so without a bound one
/// forged length would reserve gigabytes and abort the process. Values are at most
/// `GUARD_MAX_VALUE_BYTES` (1 MiB by default, Kafka's own default limit) and a length
/// beyond the value's size cannot be honest (but for arrays of empty items); 16 MiB
/// leaves room for larger limits while capping a forged array's reservation at well
/// under a gigabyte of address space, untouched until items are read.
pub const MAX_AVRO_LENGTH: usize = 16 * 1024 * 1024;

fn limit_allocations() {
    // Process-wide and set once; every caller sets the same value.
    apache_avro::util::max_allocation_bytes(MAX_AVRO_LENGTH);
}

/// Whether a record type contains itself, through any path of fields, unions, arrays
/// or maps (a reference to a type defined elsewhere in the schema is followed).
fn is_recursive(schema: &Schema) -> bool {
    let mut defs = HashMap::new();
    collect_records(schema, &mut defs);
    walk(schema, &defs, &mut Vec::new())
}

fn collect_records<'a>(schema: &'a Schema, defs: &mut HashMap<&'a str, &'a Schema>) {
    match schema {
        Schema::Record(r) => {
            defs.insert(r.name.name.as_str(), schema);
            for f in &r.fields {
                collect_records(&f.schema, defs);
            }
        }
        Schema::Array(a) => collect_records(&a.items, defs),
        Schema::Map(m) => collect_records(&m.types, defs),
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_records(v, defs)),
        _ => {}
    }
}

fn walk<'a>(schema: &'a Schema, defs: &HashMap<&'a str, &'a Schema>, stack: &mut Vec<&'a str>) -> bool {
    match schema {
        Schema::Record(r) => {
            let name = r.name.name.as_str();
            if stack.contains(&name) {
                return true;
            }
            stack.push(name);
            let found = r.fields.iter().any(|f| walk(&f.schema, defs, stack));
            stack.pop();
            found
        }
        Schema::Ref { name } => {
            let name = name.name.as_str();
            stack.contains(&name) || defs.get(name).is_some_and(|d| walk(d, defs, stack))
        }
        Schema::Array(a) => walk(&a.items, defs, stack),
        Schema::Map(m) => walk(&m.types, defs, stack),
        Schema::Union(u) => u.variants().iter().any(|v| walk(v, defs, stack)),
        _ => false,
    }
}

/// An Avro value as JSON, mapped as the module docs say.
pub fn avro_to_json(value: Avro) -> Value {
    match value {
        Avro::Null => Value::Null,
        Avro::Boolean(b) => Value::Bool(b),
        Avro::Int(n) | Avro::Date(n) | Avro::TimeMillis(n) => Value::from(n),
        Avro::Long(n)
        | Avro::TimeMicros(n)
        | Avro::TimestampMillis(n)
        | Avro::TimestampMicros(n)
        | Avro::TimestampNanos(n)
        | Avro::LocalTimestampMillis(n)
        | Avro::LocalTimestampMicros(n)
        | Avro::LocalTimestampNanos(n) => Value::from(n),
        Avro::Float(f) => float(f64::from(f)),
        Avro::Double(f) => float(f),
        Avro::Bytes(b) | Avro::Fixed(_, b) => bytes(&b),
        Avro::String(s) | Avro::Enum(_, s) => Value::String(s),
        Avro::Union(_, inner) => avro_to_json(*inner),
        Avro::Array(items) => Value::Array(items.into_iter().map(avro_to_json).collect()),
        Avro::Map(entries) => Value::Object(entries.into_iter().map(|(k, v)| (k, avro_to_json(v))).collect()),
        Avro::Record(fields) => {
            let mut object = Map::with_capacity(fields.len());
            for (k, v) in fields {
                object.insert(k, avro_to_json(v));
            }
            Value::Object(object)
        }
        Avro::Decimal(d) => bytes(&num_bigint_bytes(d)),
        Avro::BigDecimal(d) => Value::String(d.to_string()),
        Avro::Duration(d) => {
            let mut object = Map::with_capacity(3);
            object.insert("months".into(), Value::from(u32::from(d.months())));
            object.insert("days".into(), Value::from(u32::from(d.days())));
            object.insert("millis".into(), Value::from(u32::from(d.millis())));
            Value::Object(object)
        }
        Avro::Uuid(u) => Value::String(u.to_string()),
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

fn bytes(b: &[u8]) -> Value {
    Value::Array(b.iter().map(|&x| Value::from(x)).collect())
}

fn num_bigint_bytes(d: apache_avro::Decimal) -> Vec<u8> {
    <Vec<u8>>::try_from(d).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::to_avro_datum;

    const ORDER: &str = r#"{"type":"record","name":"Order","fields":[
        {"name":"order_id","type":"string"},
        {"name":"amount","type":"long"},
        {"name":"note","type":["null","string"],"default":null},
        {"name":"status","type":{"type":"enum","name":"Status","symbols":["NEW","PAID"]}},
        {"name":"tags","type":{"type":"array","items":"string"}},
        {"name":"raw","type":"bytes"}]}"#;

    fn order_body() -> Vec<u8> {
        let schema = Schema::parse_str(ORDER).unwrap();
        let value = Avro::Record(vec![
            ("order_id".into(), Avro::String("o-1".into())),
            ("amount".into(), Avro::Long(42)),
            ("note".into(), Avro::Union(1, Box::new(Avro::String("gift".into())))),
            ("status".into(), Avro::Enum(1, "PAID".into())),
            ("tags".into(), Avro::Array(vec![Avro::String("a".into())])),
            ("raw".into(), Avro::Bytes(vec![1, 2])),
        ]);
        to_avro_datum(&schema, value).unwrap()
    }

    #[test]
    fn a_framed_datum_decodes_to_json() {
        let framed = confluent_framed(7, &order_body());
        let Framed { schema_id, body } = confluent_frame(&framed).unwrap();
        assert_eq!(schema_id, 7);
        let json = AvroSchema::parse(ORDER).unwrap().decode(schema_id, body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"order_id":"o-1","amount":42,"note":"gift","status":"PAID","tags":["a"],"raw":[1,2]})
        );
    }

    #[test]
    fn bad_frames_and_bodies_are_classified() {
        assert_eq!(confluent_frame(b"{\"a\":1}").unwrap_err().reason(), "payload_not_framed");
        assert_eq!(confluent_frame(b"").unwrap_err().reason(), "payload_truncated");
        assert_eq!(confluent_frame(&[0, 0, 0, 1]).unwrap_err().reason(), "payload_truncated");
        assert_eq!(confluent_frame(&[0, 0, 0, 0, 1]).unwrap_err().reason(), "payload_truncated");
        let schema = AvroSchema::parse(ORDER).unwrap();
        let body = order_body();
        // Cut short, or with bytes after it.
        let short = schema.decode(1, &body[..body.len() - 1]).unwrap_err();
        assert_eq!(short.reason(), "payload_schema_mismatch", "{short}");
        let mut long = body.clone();
        long.push(0);
        let err = schema.decode(1, &long).unwrap_err();
        assert!(err.to_string().contains("1 bytes left"), "{err}");
    }

    #[test]
    fn a_forged_length_is_refused_without_reserving_it() {
        // An array whose block claims 2^40 items of nothing.
        let schema = AvroSchema::parse(r#"{"type":"array","items":"null"}"#).unwrap();
        let mut body = Vec::new();
        let mut n: u64 = (1u64 << 40) << 1; // zig-zag of a positive count
        while n >= 0x80 {
            body.push((n as u8) | 0x80);
            n >>= 7;
        }
        body.push(n as u8);
        let err = schema.decode(3, &body).unwrap_err();
        assert_eq!(err.reason(), "payload_schema_mismatch", "{err}");
    }

    #[test]
    fn recursive_schemas_are_refused_and_shared_types_are_not() {
        let list = r#"{"type":"record","name":"Node","fields":[{"name":"next","type":["null","Node"]}]}"#;
        let schema = AvroSchema::parse(list).unwrap();
        let err = schema.decode(9, &[2, 2, 2, 0]).unwrap_err();
        assert_eq!(err.reason(), "schema_unsupported");
        // Debezium's envelope names its row type once and refers to it again: not recursion.
        let envelope = r#"{"type":"record","name":"Envelope","fields":[
            {"name":"before","type":["null",{"type":"record","name":"Value","fields":[{"name":"id","type":"int"}]}]},
            {"name":"after","type":["null","Value"]},
            {"name":"op","type":"string"}]}"#;
        let schema = AvroSchema::parse(envelope).unwrap();
        // before: null; after: {id: 5}; op: "c"
        let json = schema.decode(2, &[0, 2, 10, 2, b'c']).unwrap();
        assert_eq!(json, serde_json::json!({"before": null, "after": {"id": 5}, "op": "c"}));
    }

    #[test]
    fn mutated_frames_never_panic() {
        // A stable stand-in for the fuzz target (which needs nightly): valid frames with
        // bytes flipped, cut, repeated and inserted, each decoded or refused.
        let schema = AvroSchema::parse(ORDER).unwrap();
        let valid = confluent_framed(1, &order_body());
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut decoded, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % bytes.len();
                match next() % 4 {
                    0 => bytes[at] = next() as u8,
                    1 => bytes.truncate(at.max(1)),
                    2 => bytes.insert(at, next() as u8),
                    _ => bytes[at] ^= 0x80,
                }
            }
            match confluent_frame(&bytes).and_then(|f| schema.decode(f.schema_id, f.body)) {
                Ok(_) => decoded += 1,
                Err(e) => {
                    assert!(!e.reason().is_empty());
                    refused += 1;
                }
            }
        }
        assert!(decoded > 0 && refused > 0, "decoded {decoded}, refused {refused}");
    }

    #[test]
    fn floats_json_cannot_hold_are_named() {
        assert_eq!(avro_to_json(Avro::Double(f64::NAN)), Value::String("NaN".into()));
        assert_eq!(avro_to_json(Avro::Float(1.5)), serde_json::json!(1.5));
    }
}
