//! Record values framed for a schema registry, and Avro datums decoded into JSON.
//!
//! Two frames are read:
//! - Confluent's wire format, which Confluent's serializers, Debezium's Avro converter,
//!   Redpanda, Karapace and Apicurio's compatibility API all write: one magic byte `0`,
//!   the schema id as four big-endian bytes, then the datum encoded with that schema: an
//!   Avro datum, or JSON text for a JSON Schema ([`JsonSchema`], parsed and validated);
//! - the AWS Glue Schema Registry's ([`glue_frame`]): the header version byte `3`, a
//!   compression byte (`0` none, `5` zlib), the schema version's 16-byte UUID, then the
//!   datum, zlib-compressed when the compression byte says so.
//!
//! A decoded Avro value becomes a [`serde_json::Value`], so event id strategies (JSON
//! pointers) and handlers (serde) read Avro values exactly as they read JSON ones. The
//! mapping: records and maps are objects, arrays arrays, unions their branch's value
//! (no wrapper), enums their symbol, `bytes` and `fixed` base64 strings (as Kafka
//! Connect's JSON converter writes them), decimals their value as a decimal string
//! (`"12.34"`), logical dates, times and timestamps their underlying number (days, or the
//! unit's count), UUIDs their text, durations `{"months", "days", "millis"}`; a float
//! that JSON cannot hold (NaN, infinities) its name as a string.
//!
//! The datum decoder is our own, over apache-avro's parsed schema: apache-avro's decoder
//! reserves whatever a length field claims before reading it (a ten-byte record could ask
//! for gigabytes and abort the process), reads a string cut short by the end of the input
//! as null instead of failing, and recurses without a bound. Ours checks every length
//! and count against the bytes left, fails on any short read, and stops at
//! [`MAX_DEPTH`] levels of nesting, so recursive schemas are decoded safely.
//!
//! Invariant: hostile bytes get a classified [`PayloadError`], never a panic; a datum is
//! decoded only whole (bytes left after it are an error, not ignored).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read as _;

use apache_avro::schema::{Alias, Name, Namespace, Schema};
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
    /// Framed in the AWS Glue Schema Registry's format and encoded with a schema version
    /// from Glue (Avro or JSON Schema). With `or_json`, a value that does not start with
    /// Glue's header version byte (3) is read as plain JSON instead of being refused
    /// (JSON text never starts with that byte).
    Glue {
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

    /// Values framed for the AWS Glue Schema Registry, only.
    pub const fn glue() -> Self {
        ValueFormat::Glue { or_json: false }
    }

    /// Values framed for the AWS Glue Schema Registry, or plain JSON.
    pub const fn glue_or_json() -> Self {
        ValueFormat::Glue { or_json: true }
    }

    /// `json`, `confluent`, `confluent-or-json`, `glue` or `glue-or-json`: the name docs
    /// and logs use.
    pub fn name(self) -> &'static str {
        match self {
            ValueFormat::Json => "json",
            ValueFormat::Confluent { or_json: false } => "confluent",
            ValueFormat::Confluent { or_json: true } => "confluent-or-json",
            ValueFormat::Glue { or_json: false } => "glue",
            ValueFormat::Glue { or_json: true } => "glue-or-json",
        }
    }
}

/// The registry's name for the schema a value was written with: a Confluent-compatible
/// registry's number, or a Glue schema version's UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SchemaId {
    /// A Confluent-compatible registry's schema id.
    Confluent(u32),
    /// An AWS Glue schema version id (a UUID, as its 16 bytes).
    Glue([u8; 16]),
}

impl From<u32> for SchemaId {
    fn from(id: u32) -> Self {
        SchemaId::Confluent(id)
    }
}

impl SchemaId {
    /// A schema id as an event source mapping's `schemaId` names it: a number is a
    /// Confluent registry's, a UUID (`8-4-4-4-12` hex digits) a Glue schema version's.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if let Ok(n) = text.parse::<u32>() {
            return Some(SchemaId::Confluent(n));
        }
        let groups: Vec<&str> = text.split('-').collect();
        if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
            return None;
        }
        let hex_digits: String = groups.concat();
        let mut bytes = [0u8; 16];
        hex::decode_to_slice(&hex_digits, &mut bytes).ok()?;
        Some(SchemaId::Glue(bytes))
    }
}

impl std::fmt::Display for SchemaId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SchemaId::Confluent(n) => write!(f, "{n}"),
            SchemaId::Glue(b) => {
                let h = hex::encode(b);
                write!(f, "{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
            }
        }
    }
}

/// The first byte of a value in Confluent's wire format.
pub const CONFLUENT_MAGIC: u8 = 0;

/// Magic byte and schema id: the bytes before the datum.
pub const CONFLUENT_HEADER_LEN: usize = 5;

/// The first byte of a value in the AWS Glue Schema Registry's format (its header
/// version).
pub const GLUE_HEADER_VERSION: u8 = 3;

/// Header version, compression byte and schema version UUID: the bytes before the datum.
pub const GLUE_HEADER_LEN: usize = 18;

/// Glue's compression byte for a datum written as it is.
pub const GLUE_COMPRESSION_NONE: u8 = 0;

/// Glue's compression byte for a zlib-compressed datum.
pub const GLUE_COMPRESSION_ZLIB: u8 = 5;

/// A value split into its schema id and its datum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framed<'a> {
    /// The registry's id of the schema the datum was written with.
    pub schema_id: SchemaId,
    /// The encoded datum (decompressed, for a compressed Glue frame).
    pub body: Cow<'a, [u8]>,
}

/// Why a value could not be decoded. Every variant is the record's own fault: the same
/// bytes fail the same way on every attempt, so the record is dead-lettered under
/// [`PayloadError::reason`] (a registry that cannot answer is a different matter,
/// handled by the caller as unavailable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The value does not start with the frame's first byte: not framed for the
    /// registry the function reads.
    #[error("value is not framed for a schema registry: first byte is {first:#04x}, not {expected:#04x}")]
    NotFramed {
        /// The byte found instead.
        first: u8,
        /// The byte the frame starts with (0 for Confluent's, 3 for Glue's).
        expected: u8,
    },
    /// The value is shorter than the frame's header, or has no datum after it.
    #[error("value is a truncated frame: {len} bytes, a frame needs at least {needs}")]
    Truncated {
        /// The value's length.
        len: usize,
        /// The least a frame takes: its header and one byte of datum.
        needs: usize,
    },
    /// A Glue frame whose compression byte is not one Glue writes, or whose datum does
    /// not decompress (corrupt, or larger than the limit once decompressed).
    #[error("value's compressed datum (schema {schema_id}) cannot be read: {message}")]
    Compression {
        /// The schema the frame names.
        schema_id: SchemaId,
        /// What was wrong.
        message: String,
    },
    /// The datum does not decode with its schema (wrong schema id, corrupt bytes, bytes
    /// left after the datum).
    #[error("value does not match its schema {schema_id}: {message}")]
    SchemaMismatch {
        /// The schema the frame names.
        schema_id: SchemaId,
        /// What the decoder said.
        message: String,
    },
    /// The schema is of a kind this library does not decode.
    #[error("schema {schema_id} is not supported: {message}")]
    Unsupported {
        /// The schema the frame names.
        schema_id: SchemaId,
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
            PayloadError::Compression { .. } => "payload_compression",
            PayloadError::SchemaMismatch { .. } => "payload_schema_mismatch",
            PayloadError::Unsupported { .. } => "schema_unsupported",
        }
    }
}

/// Splits a value in Confluent's wire format into schema id and datum.
pub fn confluent_frame(value: &[u8]) -> Result<Framed<'_>, PayloadError> {
    const NEEDS: usize = CONFLUENT_HEADER_LEN + 1;
    match value.first() {
        None => return Err(PayloadError::Truncated { len: 0, needs: NEEDS }),
        Some(&first) if first != CONFLUENT_MAGIC => {
            return Err(PayloadError::NotFramed { first, expected: CONFLUENT_MAGIC })
        }
        Some(_) => {}
    }
    // An Avro datum is never empty for a record schema, and a bare header is what a
    // producer cut short leaves.
    if value.len() < NEEDS {
        return Err(PayloadError::Truncated { len: value.len(), needs: NEEDS });
    }
    let schema_id = u32::from_be_bytes([value[1], value[2], value[3], value[4]]);
    Ok(Framed { schema_id: SchemaId::Confluent(schema_id), body: Cow::Borrowed(&value[CONFLUENT_HEADER_LEN..]) })
}

/// Splits a value in the AWS Glue Schema Registry's format into schema version id and
/// datum, decompressing a zlib datum into at most `max_datum` bytes (a larger one is
/// refused, so a small compressed value cannot expand without bound).
pub fn glue_frame(value: &[u8], max_datum: usize) -> Result<Framed<'_>, PayloadError> {
    let (schema_id, compressed) = glue_header(value)?;
    let datum = &value[GLUE_HEADER_LEN..];
    if !compressed {
        return Ok(Framed { schema_id, body: Cow::Borrowed(datum) });
    }
    let compression = |message: String| PayloadError::Compression { schema_id, message };
    let mut out = Vec::with_capacity(datum.len().saturating_mul(4).min(max_datum));
    let limit = u64::try_from(max_datum).unwrap_or(u64::MAX).saturating_add(1);
    let mut decoder = flate2::read::ZlibDecoder::new(datum);
    (&mut decoder).take(limit).read_to_end(&mut out).map_err(|e| compression(format!("not a zlib stream: {e}")))?;
    if out.len() > max_datum {
        return Err(compression(format!("decompresses to more than {max_datum} bytes")));
    }
    // Bytes after the end of the zlib stream are not part of the datum: refused, as
    // bytes left after any datum are.
    let read = usize::try_from(decoder.total_in()).unwrap_or(usize::MAX);
    if read < datum.len() {
        return Err(compression(format!("{} bytes after the end of the zlib stream", datum.len() - read)));
    }
    if out.is_empty() {
        return Err(PayloadError::Truncated { len: value.len(), needs: GLUE_HEADER_LEN + 1 });
    }
    Ok(Framed { schema_id, body: Cow::Owned(out) })
}

/// Checks a value's Glue header without touching its datum: its schema version id, and
/// whether the datum is zlib-compressed. [`glue_frame`] fails the same way on the same
/// header, and may fail later on the datum.
pub fn glue_header(value: &[u8]) -> Result<(SchemaId, bool), PayloadError> {
    const NEEDS: usize = GLUE_HEADER_LEN + 1;
    match value.first() {
        None => return Err(PayloadError::Truncated { len: 0, needs: NEEDS }),
        Some(&first) if first != GLUE_HEADER_VERSION => {
            return Err(PayloadError::NotFramed { first, expected: GLUE_HEADER_VERSION })
        }
        Some(_) => {}
    }
    if value.len() < NEEDS {
        return Err(PayloadError::Truncated { len: value.len(), needs: NEEDS });
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&value[2..GLUE_HEADER_LEN]);
    let schema_id = SchemaId::Glue(uuid);
    match value[1] {
        GLUE_COMPRESSION_NONE => Ok((schema_id, false)),
        GLUE_COMPRESSION_ZLIB => Ok((schema_id, true)),
        other => Err(PayloadError::Compression {
            schema_id,
            message: format!("compression byte {other:#04x} is not one Glue writes (0x00 none, 0x05 zlib)"),
        }),
    }
}

/// A value in the AWS Glue Schema Registry's format: the header for `schema_version`,
/// then `body` as it is (no compression).
pub fn glue_framed(schema_version: [u8; 16], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(GLUE_HEADER_LEN + body.len());
    out.push(GLUE_HEADER_VERSION);
    out.push(GLUE_COMPRESSION_NONE);
    out.extend_from_slice(&schema_version);
    out.extend_from_slice(body);
    out
}

/// A value in Confluent's wire format: the header for `schema_id`, then `body`.
pub fn confluent_framed(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CONFLUENT_HEADER_LEN + body.len());
    out.push(CONFLUENT_MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// An Avro schema as the registry returned it, with its named types resolved once, so
/// every record it decodes pays only for the decoding.
#[derive(Debug, Clone)]
pub struct AvroSchema {
    schema: Schema,
    names: HashMap<Name, Schema>,
}

/// Deepest nesting of records, arrays, maps and unions decoded (a recursive schema's
/// values, a linked list, stop here rather than exhaust the stack).
pub const MAX_DEPTH: usize = 128;

/// Most items of zero size (`null`, an empty record) one value may hold, over all its
/// arrays: such items take no bytes, so the value's size cannot bound them.
const MAX_EMPTY_ITEMS: usize = 65_536;

/// Largest decimal scale written out as a decimal string (a 128-bit unscaled value has
/// at most 39 digits); larger ones come out as base64 of the unscaled bytes.
const MAX_DECIMAL_SCALE: usize = 76;

impl AvroSchema {
    /// Parses the schema's JSON text.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_with(text, &[])
    }

    /// Parses the schema's JSON text, with the named types (records, enums, fixed) of
    /// `references` in scope: the schemas a registry lists as its references, which it
    /// refers to by full name.
    pub fn parse_with(text: &str, references: &[String]) -> Result<Self, String> {
        // apache-avro files a referenced schema under its name and panics when a nested
        // definition hides it: each must be a named type at its top.
        for r in references {
            let named = serde_json::from_str::<Value>(r).ok().is_some_and(|v| {
                v.get("name").is_some_and(Value::is_string)
                    && v.get("type").and_then(Value::as_str).is_some_and(|t| matches!(t, "record" | "enum" | "fixed"))
            });
            if !named {
                return Err(format!("a referenced schema is not a named record, enum or fixed: {}", short(r)));
            }
        }
        // Some malformed schemas make apache-avro panic (an invalid nested name): such a
        // schema is invalid, not a reason to take the partition down.
        let parsed = std::panic::catch_unwind(|| {
            if references.is_empty() {
                Schema::parse_str(text).map(|s| (s, Vec::new()))
            } else {
                Schema::parse_str_with_list(text, references)
            }
        })
        .map_err(|_| "the schema could not be parsed (apache-avro gave up on it)".to_owned())?;
        let (schema, referenced) = parsed.map_err(|e| e.to_string())?;
        for t in std::iter::once(text).chain(references.iter().map(String::as_str)) {
            if serde_json::from_str::<Value>(t).is_ok_and(|json| uuid_on_fixed(&json)) {
                return Err("a uuid on fixed(16) is not decoded here (a uuid on string is)".into());
            }
        }
        let mut names = HashMap::new();
        for s in referenced.iter().chain(std::iter::once(&schema)) {
            collect_names(s, &None, &mut names, 0)?;
        }
        for s in std::iter::once(&schema).chain(referenced.iter()) {
            if let Some(name) = unresolved(s, &None, &names, 0) {
                return Err(format!("the schema refers to a type it does not define: {name}"));
            }
        }
        Ok(Self { schema, names })
    }

    /// The parsed schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Decodes one datum written with this schema (`schema_id` names it in errors).
    pub fn decode(&self, schema_id: impl Into<SchemaId>, body: &[u8]) -> Result<Value, PayloadError> {
        let schema_id = schema_id.into();
        let mismatch = |message: String| PayloadError::SchemaMismatch { schema_id, message };
        let mut reader = Reader { buf: body, pos: 0, empty_items: MAX_EMPTY_ITEMS };
        let value = self.value(&self.schema, &None, &mut reader, 0).map_err(mismatch)?;
        if reader.pos != body.len() {
            return Err(mismatch(format!("{} bytes left after the datum", body.len() - reader.pos)));
        }
        Ok(value)
    }

    fn value(&self, schema: &Schema, ns: &Namespace, r: &mut Reader<'_>, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(format!("nested deeper than {MAX_DEPTH} levels"));
        }
        Ok(match schema {
            Schema::Null => Value::Null,
            Schema::Boolean => match r.byte()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{b:#04x} is not a boolean")),
            },
            Schema::Int | Schema::Date | Schema::TimeMillis => Value::from(r.int()?),
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => Value::from(r.long()?),
            Schema::Float => {
                let b = r.take(4)?;
                float(f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            }
            Schema::Double => {
                let b = r.take(8)?;
                float(f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            }
            Schema::Bytes | Schema::BigDecimal => base64(r.bytes()?),
            Schema::String => Value::String(r.string()?.to_owned()),
            Schema::Uuid => {
                let b = r.bytes()?;
                match std::str::from_utf8(b) {
                    Ok(text) => Value::String(text.to_owned()),
                    Err(_) if b.len() == 16 => Value::String(uuid_text(b)),
                    Err(_) => return Err("uuid is neither text nor 16 bytes".into()),
                }
            }
            Schema::Fixed(f) => base64(r.take(f.size)?),
            Schema::Decimal(d) => {
                let unscaled = match d.inner.as_ref() {
                    Schema::Fixed(f) => r.take(f.size)?,
                    _ => r.bytes()?,
                };
                decimal(unscaled, d.scale)
            }
            Schema::Duration => {
                let b = r.take(12)?;
                let part = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                let mut object = Map::with_capacity(3);
                object.insert("months".into(), Value::from(part(0)));
                object.insert("days".into(), Value::from(part(4)));
                object.insert("millis".into(), Value::from(part(8)));
                Value::Object(object)
            }
            Schema::Enum(e) => {
                let i = r.long()?;
                let symbol = usize::try_from(i).ok().and_then(|i| e.symbols.get(i));
                Value::String(symbol.ok_or_else(|| format!("{i} is not a symbol of enum {}", e.name.name))?.clone())
            }
            Schema::Union(u) => {
                let i = r.long()?;
                let branch = usize::try_from(i).ok().and_then(|i| u.variants().get(i));
                self.value(branch.ok_or_else(|| format!("{i} is not a branch of the union"))?, ns, r, depth + 1)?
            }
            Schema::Array(a) => {
                let mut items = Vec::new();
                let empty = is_empty(&a.items);
                while let Some(count) = r.block(empty)? {
                    if empty {
                        // Charged against the whole value, not this array alone: nested
                        // arrays of nulls cannot multiply it.
                        r.empty_items = r.empty_items.checked_sub(count).ok_or_else(|| {
                            format!("arrays of empty items claim over {MAX_EMPTY_ITEMS} in one value")
                        })?;
                    }
                    items.reserve(count);
                    for _ in 0..count {
                        items.push(self.value(&a.items, ns, r, depth + 1)?);
                    }
                }
                Value::Array(items)
            }
            Schema::Map(m) => {
                let mut object = Map::new();
                // A key takes at least its length byte: the bytes left bound the count.
                while let Some(count) = r.block(false)? {
                    for _ in 0..count {
                        let key = r.string()?.to_owned();
                        let value = self.value(&m.types, ns, r, depth + 1)?;
                        object.insert(key, value);
                    }
                }
                Value::Object(object)
            }
            Schema::Record(rec) => {
                let inner = rec.name.fully_qualified_name(ns).namespace;
                let mut object = Map::with_capacity(rec.fields.len());
                for field in &rec.fields {
                    let value = self.value(&field.schema, &inner, r, depth + 1)?;
                    object.insert(field.name.clone(), value);
                }
                Value::Object(object)
            }
            Schema::Ref { name } => {
                let full = name.fully_qualified_name(ns);
                let named = self.names.get(&full).ok_or_else(|| format!("unknown type {}", full.name))?;
                self.value(named, &full.namespace, r, depth + 1)?
            }
            #[allow(unreachable_patterns)]
            other => return Err(format!("schema type {other:?} is not decoded here")),
        })
    }
}

/// The schema's named types (records, enums, fixed) by full name, for references.
fn collect_names(
    schema: &Schema,
    ns: &Namespace,
    names: &mut HashMap<Name, Schema>,
    depth: usize,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("schema nested deeper than {MAX_DEPTH} levels"));
    }
    match schema {
        Schema::Record(r) => {
            let full = r.name.fully_qualified_name(ns);
            let inner = full.namespace.clone();
            add_name(names, full, r.aliases.as_deref(), schema);
            for f in &r.fields {
                collect_names(&f.schema, &inner, names, depth + 1)?;
            }
        }
        Schema::Enum(e) => add_name(names, e.name.fully_qualified_name(ns), e.aliases.as_deref(), schema),
        Schema::Fixed(f) => add_name(names, f.name.fully_qualified_name(ns), f.aliases.as_deref(), schema),
        // A decimal on `fixed` names that fixed type; a reference to it is the decimal.
        Schema::Decimal(d) => {
            if let Schema::Fixed(f) = d.inner.as_ref() {
                add_name(names, f.name.fully_qualified_name(ns), f.aliases.as_deref(), schema);
            }
        }
        Schema::Array(a) => collect_names(&a.items, ns, names, depth + 1)?,
        Schema::Map(m) => collect_names(&m.types, ns, names, depth + 1)?,
        Schema::Union(u) => {
            for v in u.variants() {
                collect_names(v, ns, names, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A named type under its full name and its aliases (in its namespace).
fn add_name(names: &mut HashMap<Name, Schema>, full: Name, aliases: Option<&[Alias]>, schema: &Schema) {
    for alias in aliases.unwrap_or_default() {
        names.insert(alias.fully_qualified_name(&full.namespace), schema.clone());
    }
    names.insert(full, schema.clone());
}

/// The first reference in `schema` that names no type of it, if any (checked when the
/// schema is parsed, so a schema that cannot decode anything is refused once, as
/// `schema_invalid`, not on every record).
fn unresolved(schema: &Schema, ns: &Namespace, names: &HashMap<Name, Schema>, depth: usize) -> Option<String> {
    if depth > MAX_DEPTH {
        return None;
    }
    let next = depth + 1;
    match schema {
        Schema::Ref { name } => {
            let full = name.fully_qualified_name(ns);
            (!names.contains_key(&full)).then(|| full.name.clone())
        }
        Schema::Record(r) => {
            let inner = r.name.fully_qualified_name(ns).namespace;
            r.fields.iter().find_map(|f| unresolved(&f.schema, &inner, names, next))
        }
        Schema::Array(a) => unresolved(&a.items, ns, names, next),
        Schema::Map(m) => unresolved(&m.types, ns, names, next),
        Schema::Union(u) => u.variants().iter().find_map(|v| unresolved(v, ns, names, next)),
        _ => None,
    }
}

/// Whether the schema's JSON puts a `uuid` logical type on `fixed`, which apache-avro
/// parses to the same type as a uuid on `string` (their encodings differ).
fn uuid_on_fixed(json: &Value) -> bool {
    match json {
        Value::Object(o) => {
            (o.get("logicalType").and_then(Value::as_str) == Some("uuid")
                && o.get("type").and_then(Value::as_str) == Some("fixed"))
                || o.values().any(uuid_on_fixed)
        }
        Value::Array(a) => a.iter().any(uuid_on_fixed),
        _ => false,
    }
}

/// Whether values of `schema` take no bytes at all.
fn is_empty(schema: &Schema) -> bool {
    match schema {
        Schema::Null => true,
        Schema::Fixed(f) => f.size == 0,
        Schema::Record(r) => r.fields.iter().all(|f| is_empty(&f.schema)),
        _ => false,
    }
}

/// The datum's bytes and how far they have been read; every read checks what is left.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Items of zero size the rest of the value may still hold.
    empty_items: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.left() {
            return Err(format!("needs {n} bytes, {} left", self.left()));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    /// A zig-zag varint of at most ten bytes.
    fn long(&mut self) -> Result<i64, String> {
        let mut raw: u64 = 0;
        for i in 0..10 {
            let b = self.byte()?;
            if i == 9 && b > 1 {
                return Err("varint overflows 64 bits".into());
            }
            raw |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(((raw >> 1) as i64) ^ -((raw & 1) as i64));
            }
        }
        Err("varint longer than ten bytes".into())
    }

    fn int(&mut self) -> Result<i32, String> {
        let n = self.long()?;
        i32::try_from(n).map_err(|_| format!("{n} does not fit an int"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.long()?;
        let n = usize::try_from(n).map_err(|_| format!("negative length {n}"))?;
        self.take(n)
    }

    fn string(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.bytes()?).map_err(|e| format!("string is not UTF-8: {e}"))
    }

    /// The count of the next block of an array or map, `None` at the end. A block's count
    /// may not exceed the bytes left (each item takes at least one), unless its items
    /// take none.
    fn block(&mut self, empty_items: bool) -> Result<Option<usize>, String> {
        let n = self.long()?;
        if n == 0 {
            return Ok(None);
        }
        if n < 0 {
            // A negative count is followed by the block's size in bytes.
            let size = self.long()?;
            if size < 0 {
                return Err(format!("negative block size {size}"));
            }
        }
        let count = usize::try_from(n.unsigned_abs()).map_err(|_| format!("count {n} is out of range"))?;
        if !empty_items && count > self.left() {
            return Err(format!("a block claims {count} items, {} bytes left", self.left()));
        }
        Ok(Some(count))
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

fn base64(b: &[u8]) -> Value {
    use base64::Engine as _;
    Value::String(base64::engine::general_purpose::STANDARD.encode(b))
}

fn uuid_text(b: &[u8]) -> String {
    let hex = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// A decimal's unscaled big-endian two's-complement bytes, with its scale, as a decimal
/// string; base64 of the bytes when they do not fit 128 bits.
fn decimal(unscaled: &[u8], scale: usize) -> Value {
    if unscaled.is_empty() || unscaled.len() > 16 || scale > MAX_DECIMAL_SCALE {
        return base64(unscaled);
    }
    let fill = if unscaled[0] & 0x80 != 0 { 0xff } else { 0 };
    let mut wide = [fill; 16];
    wide[16 - unscaled.len()..].copy_from_slice(unscaled);
    let n = i128::from_be_bytes(wide);
    let digits = n.unsigned_abs().to_string();
    let sign = if n < 0 { "-" } else { "" };
    if scale == 0 {
        return Value::String(format!("{sign}{digits}"));
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    Value::String(format!("{sign}{whole}.{fraction}"))
}

/// A JSON Schema as the registry returned it, compiled once. Values framed with it are
/// JSON text after the frame; each is parsed and validated.
pub struct JsonSchema {
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for JsonSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonSchema")
    }
}

impl JsonSchema {
    /// Parses and compiles the schema's text. A `$ref` outside the schema is not fetched:
    /// it fails here.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_with(text, &[])
    }

    /// Parses and compiles the schema's text with the documents a registry lists as its
    /// references, each under its reference's name (the URI a `$ref` uses; a relative
    /// one is taken against the schema's `$id`, or the default base). Nothing else is
    /// fetched: a `$ref` to any other document fails here.
    pub fn parse_with(text: &str, references: &[(String, String)]) -> Result<Self, String> {
        let schema: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if references.is_empty() {
            let validator = jsonschema::validator_for(&schema).map_err(|e| short(&e.to_string()))?;
            return Ok(Self { validator });
        }
        // Names resolve as the validator resolves `$ref`s (RFC 3986), against the
        // schema's own `$id` when it is absolute, or the validator's default base.
        let id = schema.get("$id").and_then(Value::as_str).unwrap_or(DEFAULT_JSON_BASE);
        let base = jsonschema::uri::from_str(id)
            .or_else(|_| jsonschema::uri::from_str(DEFAULT_JSON_BASE))
            .map_err(|e| format!("the schema's $id: {e}"))?;
        let mut registry = jsonschema::Registry::new();
        for (name, document) in references {
            let contents: Value =
                serde_json::from_str(document).map_err(|e| format!("reference {name} is not JSON: {e}"))?;
            let uri = jsonschema::uri::resolve_against(&base.borrow(), name)
                .map_err(|e| format!("reference {name} is not a URI reference: {e}"))?;
            registry = registry.add(uri.as_str(), contents).map_err(|e| format!("reference {name}: {e}"))?;
        }
        let registry = registry.prepare().map_err(|e| short(&e.to_string()))?;
        let validator =
            jsonschema::options().with_registry(&registry).build(&schema).map_err(|e| short(&e.to_string()))?;
        Ok(Self { validator })
    }

    /// Parses one value written with this schema and checks it against the schema.
    pub fn decode(&self, schema_id: impl Into<SchemaId>, body: &[u8]) -> Result<Value, PayloadError> {
        let schema_id = schema_id.into();
        let mismatch = |message: String| PayloadError::SchemaMismatch { schema_id, message };
        let value: Value = serde_json::from_slice(body).map_err(|e| mismatch(format!("not JSON: {e}")))?;
        if let Err(e) = self.validator.validate(&value) {
            let at = e.instance_path().to_string();
            return Err(mismatch(short(&format!("at `{at}`: {e}"))));
        }
        Ok(value)
    }
}

/// The base a JSON Schema without an absolute `$id` resolves relative `$ref`s against
/// (the validator's own default).
const DEFAULT_JSON_BASE: &str = "json-schema:///";

/// A validator's message, cut short (it may quote a whole value).
fn short(message: &str) -> String {
    crate::msk::cut(message, 300)
}

/// Encodes `json` as an Avro datum of `schema` (objects become records, values are
/// matched to union branches and widened where the schema asks): the producer side, for
/// `eo produce --avro` and tests.
pub fn avro_from_json(schema: &Schema, json: Value) -> Result<Vec<u8>, String> {
    let value = apache_avro::types::Value::from(json).resolve(schema).map_err(|e| e.to_string())?;
    apache_avro::to_avro_datum(schema, value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::to_avro_datum;
    use apache_avro::types::Value as Avro;

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

    /// A zig-zag varint, as the encoder writes it.
    fn varint(n: i64) -> Vec<u8> {
        let mut z = ((n << 1) ^ (n >> 63)) as u64;
        let mut out = Vec::new();
        while z >= 0x80 {
            out.push((z as u8) | 0x80);
            z >>= 7;
        }
        out.push(z as u8);
        out
    }

    #[test]
    fn a_framed_datum_decodes_to_json() {
        let framed = confluent_framed(7, &order_body());
        let Framed { schema_id, body } = confluent_frame(&framed).unwrap();
        assert_eq!(schema_id, SchemaId::Confluent(7));
        let json = AvroSchema::parse(ORDER).unwrap().decode(schema_id, &body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"order_id":"o-1","amount":42,"note":"gift","status":"PAID","tags":["a"],"raw":"AQI="})
        );
    }

    #[test]
    fn logical_types_decode_to_their_documented_forms() {
        let text = r#"{"type":"record","name":"L","fields":[
            {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}},
            {"name":"neg","type":{"type":"fixed","name":"F","size":2,"logicalType":"decimal","precision":4,"scale":1}},
            {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"id","type":{"type":"string","logicalType":"uuid"}},
            {"name":"x","type":"double"}]}"#;
        let schema = AvroSchema::parse(text).unwrap();
        let mut body = varint(2);
        body.extend([0x04, 0xd2]); // 1234, scale 2
        body.extend([0xff, 0x85]); // -123, scale 1
        body.extend(varint(1_700_000_000_000));
        let id = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
        body.extend(varint(id.len() as i64));
        body.extend(id.as_bytes());
        body.extend(f64::NAN.to_le_bytes());
        assert_eq!(
            schema.decode(1, &body).unwrap(),
            serde_json::json!({"price":"12.34","neg":"-12.3","at":1_700_000_000_000i64,"id":id,"x":"NaN"})
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
        // Cut anywhere (inside a string too), or with bytes after it.
        for cut in 1..body.len() {
            let err = schema.decode(1, &body[..cut]).unwrap_err();
            assert_eq!(err.reason(), "payload_schema_mismatch", "cut at {cut}: {err}");
        }
        let mut long = body.clone();
        long.push(0);
        let err = schema.decode(1, &long).unwrap_err();
        assert!(err.to_string().contains("1 bytes left"), "{err}");
    }

    const UUID: [u8; 16] =
        [0x2c, 0x6b, 0x8a, 0x1e, 0x0b, 0x1f, 0x4c, 0x3d, 0x9e, 0x10, 0x77, 0x00, 0xab, 0xcd, 0xef, 0x01];

    fn zlib(bytes: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn a_glue_frame_plain_or_zlib_decodes_to_the_same_datum() {
        let body = order_body();
        let plain = glue_framed(UUID, &body);
        let frame = glue_frame(&plain, 1 << 20).unwrap();
        assert_eq!(frame.schema_id, SchemaId::Glue(UUID));
        assert_eq!(frame.schema_id.to_string(), "2c6b8a1e-0b1f-4c3d-9e10-7700abcdef01");
        assert!(matches!(frame.body, Cow::Borrowed(_)));
        let mut compressed = vec![GLUE_HEADER_VERSION, GLUE_COMPRESSION_ZLIB];
        compressed.extend(UUID);
        compressed.extend(zlib(&body));
        let zframe = glue_frame(&compressed, 1 << 20).unwrap();
        assert_eq!(zframe.body, frame.body);
        let schema = AvroSchema::parse(ORDER).unwrap();
        assert_eq!(schema.decode(zframe.schema_id, &zframe.body).unwrap()["order_id"], "o-1");
    }

    #[test]
    fn bad_glue_frames_are_classified() {
        let reason = |v: &[u8]| glue_frame(v, 1024).unwrap_err().reason();
        assert_eq!(reason(b""), "payload_truncated");
        // Confluent's frame and JSON are not Glue's; the message names the byte expected.
        assert_eq!(reason(&confluent_framed(7, b"\x02a")), "payload_not_framed");
        assert!(glue_frame(b"{}", 1024).unwrap_err().to_string().contains("not 0x03"));
        let header = glue_framed(UUID, b"");
        assert_eq!(reason(&header), "payload_truncated");
        assert_eq!(reason(&header[..10]), "payload_truncated");
        let mut unknown = glue_framed(UUID, b"\x02a");
        unknown[1] = 7;
        assert_eq!(reason(&unknown), "payload_compression");
        let mut corrupt = glue_framed(UUID, b"not zlib at all");
        corrupt[1] = GLUE_COMPRESSION_ZLIB;
        assert_eq!(reason(&corrupt), "payload_compression");
        // A bomb: 1 MiB of zeros in about a kilobyte stops at the limit.
        let mut bomb = vec![GLUE_HEADER_VERSION, GLUE_COMPRESSION_ZLIB];
        bomb.extend(UUID);
        bomb.extend(zlib(&vec![0u8; 1 << 20]));
        assert!(bomb.len() < 4096, "{}", bomb.len());
        let err = glue_frame(&bomb, 1024).unwrap_err();
        assert!(err.to_string().contains("more than 1024 bytes"), "{err}");
        // Bytes after the zlib stream are refused, not ignored.
        let mut trailing = vec![GLUE_HEADER_VERSION, GLUE_COMPRESSION_ZLIB];
        trailing.extend(UUID);
        trailing.extend(zlib(b"abc"));
        trailing.push(0);
        let err = glue_frame(&trailing, 1024).unwrap_err();
        assert!(err.to_string().contains("1 bytes after the end"), "{err}");
        // The header alone says the same as the whole frame about the header.
        assert_eq!(glue_header(&unknown).unwrap_err().reason(), "payload_compression");
        assert_eq!(glue_header(&bomb).unwrap(), (SchemaId::Glue(UUID), true));
        // A compressed empty datum is as truncated as a bare header.
        let mut empty = vec![GLUE_HEADER_VERSION, GLUE_COMPRESSION_ZLIB];
        empty.extend(UUID);
        empty.extend(zlib(b""));
        assert_eq!(reason(&empty), "payload_truncated");
    }

    #[test]
    fn named_types_of_referenced_schemas_are_in_scope() {
        let money = r#"{"type":"record","name":"Money","namespace":"shop","fields":[{"name":"units","type":"long"}]}"#;
        let kind = r#"{"type":"enum","name":"Kind","namespace":"shop","symbols":["A","B"]}"#;
        let main = r#"{"type":"record","name":"O","fields":[{"name":"total","type":"shop.Money"},{"name":"kind","type":"shop.Kind"}]}"#;
        assert!(AvroSchema::parse(main).is_err(), "without its references the schema does not parse");
        let schema = AvroSchema::parse_with(main, &[money.to_owned(), kind.to_owned()]).unwrap();
        let mut body = varint(-3);
        body.extend(varint(1));
        assert_eq!(schema.decode(1, &body).unwrap(), serde_json::json!({"total": {"units": -3}, "kind": "B"}));
        // A reference that does not define the name the schema uses is refused.
        assert!(AvroSchema::parse_with(main, &[money.to_owned()]).is_err());
        // Malformed references (apache-avro would panic on the first) are errors here.
        let hidden = r#"{"name":"A","type":{"type":"record","name":"B","fields":[]}}"#.to_owned();
        assert!(AvroSchema::parse_with(main, &[hidden, kind.to_owned()]).is_err());
        assert!(AvroSchema::parse_with(main, &["\"string\"".to_owned()]).is_err());
    }

    #[test]
    fn a_json_schema_validates_with_its_referenced_documents_and_fetches_nothing_else() {
        let main = r#"{"type":"object","properties":{"m":{"$ref":"money.json"}},"required":["m"]}"#;
        let money = r#"{"type":"object","properties":{"units":{"type":"integer","minimum":0}},"required":["units"]}"#;
        assert!(JsonSchema::parse(main).is_err(), "an unknown document is not fetched");
        let schema = JsonSchema::parse_with(main, &[("money.json".into(), money.into())]).unwrap();
        assert!(schema.decode(1, br#"{"m":{"units":3}}"#).is_ok());
        let err = schema.decode(1, br#"{"m":{"units":-3}}"#).unwrap_err();
        assert!(err.to_string().contains("/m/units"), "{err}");
        // Under an absolute name, with the schema's own absolute $id.
        let main = r#"{"$id":"https://shop.example/schemas/order.json","properties":{"m":{"$ref":"money.json"}}}"#;
        let schema = JsonSchema::parse_with(main, &[("money.json".into(), money.into())]).unwrap();
        assert!(schema.decode(1, br#"{"m":{"units":-3}}"#).is_err());
        // Names resolve as `$ref`s do: against an `$id` without a path, and a URN `$id`
        // with an absolute name.
        let main = r#"{"$id":"https://shop.example","properties":{"m":{"$ref":"money.json"}}}"#;
        let schema = JsonSchema::parse_with(main, &[("money.json".into(), money.into())]).unwrap();
        assert!(schema.decode(1, br#"{"m":{"units":-3}}"#).is_err());
        let main = r#"{"$id":"urn:shop:order","properties":{"m":{"$ref":"https://shop.example/money.json"}}}"#;
        let refs = [("https://shop.example/money.json".into(), money.into())];
        let schema = JsonSchema::parse_with(main, &refs).unwrap();
        assert!(schema.decode(1, br#"{"m":{"units":-3}}"#).is_err());
        assert!(schema.decode(1, br#"{"m":{"units":3}}"#).is_ok());
    }

    #[test]
    fn schema_ids_parse_as_event_source_mappings_name_them() {
        assert_eq!(SchemaId::parse("12"), Some(SchemaId::Confluent(12)));
        let id = SchemaId::parse(" 2C6B8A1E-0b1f-4c3d-9e10-7700abcdef01 ").unwrap();
        assert_eq!(id, SchemaId::Glue(UUID));
        assert_eq!(SchemaId::parse(&id.to_string()), Some(id));
        for bad in
            ["", "-1", "2c6b8a1e-glue-uuid", "2c6b8a1e0b1f4c3d9e107700abcdef01", "2c6b8a1e-0b1f-4c3d-9e10-7700abcdef0g"]
        {
            assert_eq!(SchemaId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_string_cut_by_the_end_of_the_value_is_refused_not_read_as_null() {
        // apache-avro's own decoder reads this as {"s": null}.
        let schema =
            AvroSchema::parse(r#"{"type":"record","name":"R","fields":[{"name":"s","type":"string"}]}"#).unwrap();
        let err = schema.decode(1, &[0x0a, b'a', b'b']).unwrap_err();
        assert!(err.to_string().contains("needs 5 bytes, 2 left"), "{err}");
    }

    #[test]
    fn forged_counts_are_refused_before_anything_is_reserved() {
        // Arrays and maps claiming 2^40 items in a few bytes (the count is checked
        // against the bytes left, so nothing is reserved for them).
        for text in [r#"{"type":"array","items":"long"}"#, r#"{"type":"map","values":"long"}"#] {
            let schema = AvroSchema::parse(text).unwrap();
            let err = schema.decode(3, &varint(1 << 40)).unwrap_err();
            assert!(err.to_string().contains("claims 1099511627776 items"), "{text}: {err}");
        }
        // Items that take no bytes are bounded by count instead.
        let schema = AvroSchema::parse(r#"{"type":"array","items":"null"}"#).unwrap();
        let err = schema.decode(3, &varint(1 << 40)).unwrap_err();
        assert_eq!(err.reason(), "payload_schema_mismatch", "{err}");
        let mut ok = varint(3);
        ok.push(0);
        assert_eq!(schema.decode(3, &ok).unwrap(), serde_json::json!([null, null, null]));
        // A length beyond the value, a negative one, an over-long varint.
        let bytes = AvroSchema::parse(r#""bytes""#).unwrap();
        assert!(bytes.decode(1, &varint(1 << 40)).is_err());
        assert!(bytes.decode(1, &varint(-1)).is_err());
        assert!(bytes.decode(1, &[0xff; 11]).is_err());
    }

    #[test]
    fn nested_arrays_of_empty_items_share_one_budget() {
        // An array of arrays of nulls: each inner array a few bytes claiming 65,536 nulls.
        let schema = AvroSchema::parse(r#"{"type":"array","items":{"type":"array","items":"null"}}"#).unwrap();
        let inner = [varint(65_536), varint(0)].concat();
        let mut body = varint(100);
        for _ in 0..100 {
            body.extend(&inner);
        }
        body.extend(varint(0));
        let err = schema.decode(1, &body).unwrap_err();
        assert!(err.to_string().contains("arrays of empty items"), "{err}");
    }

    #[test]
    fn odd_but_valid_schemas_parse_and_bad_ones_are_refused_once() {
        // A decimal on a named fixed, referred to again; an alias.
        let text = r#"{"type":"record","name":"R","namespace":"a","fields":[
            {"name":"p","type":{"type":"fixed","name":"Money","size":2,"logicalType":"decimal","precision":4,"scale":2}},
            {"name":"q","type":"Money"},
            {"name":"e","type":{"type":"enum","name":"E","aliases":["Old"],"symbols":["X"]}},
            {"name":"f","type":"Old"}]}"#;
        let schema = AvroSchema::parse(text).unwrap();
        assert_eq!(
            schema.decode(1, &[0x04, 0xd2, 0x00, 0x05, 0, 0]).unwrap(),
            serde_json::json!({"p":"12.34","q":"0.05","e":"X","f":"X"})
        );
        // A huge scale is not written out digit by digit.
        let big = AvroSchema::parse(r#"{"type":"bytes","logicalType":"decimal","precision":4000,"scale":3000}"#);
        if let Ok(big) = big {
            assert_eq!(big.decode(1, &[2, 1]).unwrap(), serde_json::json!("AQ=="));
        }
        let uuid_fixed = r#"{"type":"fixed","name":"U","size":16,"logicalType":"uuid"}"#;
        assert!(AvroSchema::parse(uuid_fixed).unwrap_err().contains("uuid on fixed"));
    }

    #[test]
    fn recursive_schemas_decode_within_the_depth_bound() {
        let list = AvroSchema::parse(
            r#"{"type":"record","name":"Node","fields":[{"name":"v","type":"int"},{"name":"next","type":["null","Node"]}]}"#,
        )
        .unwrap();
        // v=1 -> v=2 -> end
        let json = list.decode(9, &[2, 2, 4, 0]).unwrap();
        assert_eq!(json, serde_json::json!({"v": 1, "next": {"v": 2, "next": null}}));
        // A million levels deep: refused at the bound, not a stack overflow.
        let mut deep = Vec::new();
        for _ in 0..1_000_000 {
            deep.extend([2, 2]);
        }
        let err = list.decode(9, &deep).unwrap_err();
        assert!(err.to_string().contains("nested deeper than"), "{err}");
        // Debezium's envelope names its row type once and refers to it again.
        let envelope = r#"{"type":"record","name":"Envelope","namespace":"db.users","fields":[
            {"name":"before","type":["null",{"type":"record","name":"Value","fields":[{"name":"id","type":"int"}]}]},
            {"name":"after","type":["null","Value"]},
            {"name":"op","type":"string"}]}"#;
        let schema = AvroSchema::parse(envelope).unwrap();
        // before: null; after: {id: 5}; op: "c"
        let json = schema.decode(2, &[0, 2, 10, 2, b'c']).unwrap();
        assert_eq!(json, serde_json::json!({"before": null, "after": {"id": 5}, "op": "c"}));
    }

    #[test]
    fn the_decoder_reads_what_apache_avro_writes() {
        let text = r#"{"type":"record","name":"All","fields":[
            {"name":"b","type":"boolean"},{"name":"i","type":"int"},{"name":"l","type":"long"},
            {"name":"f","type":"float"},{"name":"d","type":"double"},{"name":"s","type":"string"},
            {"name":"m","type":{"type":"map","values":"int"}},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["A","B","C"]}},
            {"name":"x","type":{"type":"fixed","name":"X","size":3}},
            {"name":"u","type":["null","long","string"]}]}"#;
        let schema = AvroSchema::parse(text).unwrap();
        let json = serde_json::json!({"b":true,"i":-7,"l":1i64<<40,"f":1.5,"d":-2.25,"s":"ünï","m":{"k":3},
            "e":"C","x":"\u{1}\u{2}\u{3}","u":"txt"});
        let body = avro_from_json(schema.schema(), json).unwrap();
        assert_eq!(
            schema.decode(1, &body).unwrap(),
            serde_json::json!({"b":true,"i":-7,"l":1i64<<40,"f":1.5,"d":-2.25,"s":"ünï","m":{"k":3},
                "e":"C","x":"AQID","u":"txt"})
        );
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
            match confluent_frame(&bytes).and_then(|f| schema.decode(f.schema_id, &f.body)) {
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
    fn json_schema_values_are_parsed_and_checked() {
        let schema = JsonSchema::parse(
            r#"{"type":"object","properties":{"order_id":{"type":"string"},"amount":{"type":"integer","minimum":0}},"required":["order_id"]}"#,
        )
        .unwrap();
        let ok = schema.decode(4, br#"{"order_id":"o-1","amount":3}"#).unwrap();
        assert_eq!(ok["order_id"], "o-1");
        let err = schema.decode(4, br#"{"order_id":"o-1","amount":-3}"#).unwrap_err();
        assert_eq!(err.reason(), "payload_schema_mismatch");
        assert!(err.to_string().contains("/amount"), "{err}");
        assert!(schema.decode(4, br#"{"amount":1}"#).is_err());
        assert!(schema.decode(4, b"{not json").unwrap_err().to_string().contains("not JSON"));
        // A reference the library would have to fetch is refused when compiling.
        assert!(JsonSchema::parse(r#"{"$ref":"https://example.com/order.json"}"#).is_err());
        assert!(JsonSchema::parse("{").is_err());
    }

    #[test]
    fn json_encodes_to_avro_and_back() {
        let schema = AvroSchema::parse(ORDER).unwrap();
        let json = serde_json::json!({"order_id":"o-2","amount":7,"note":null,"status":"NEW","tags":[],"raw":[9]});
        let body = avro_from_json(schema.schema(), json).unwrap();
        assert_eq!(
            schema.decode(1, &body).unwrap(),
            serde_json::json!({"order_id":"o-2","amount":7,"note":null,"status":"NEW","tags":[],"raw":"CQ=="})
        );
        assert!(avro_from_json(schema.schema(), serde_json::json!({"order_id": 1})).is_err());
    }
}
