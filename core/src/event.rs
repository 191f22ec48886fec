//! The one event type both runtimes produce.
//!
//! Lambda decodes an MSK event into `Event`s, the worker converts rdkafka messages into
//! them; everything downstream (ids, guard, handlers) sees only this type. Keys, values
//! and header values stay raw bytes: decoding them is the handler's business.

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// One Kafka record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The topic the record was read from.
    pub topic: String,
    /// The partition within the topic (-1 in an [`Record::Invalid`] whose partition could
    /// not be read).
    pub partition: i32,
    /// The record's offset within its partition (-1 in an [`Record::Invalid`] whose
    /// offset could not be read).
    pub offset: i64,
    /// Milliseconds since the Unix epoch, when the broker reported one.
    pub timestamp_ms: Option<i64>,
    /// The record's key, raw; `None` for a null key.
    pub key: Option<Bytes>,
    /// The record's headers, in the order they arrived.
    pub headers: Vec<Header>,
    /// The record's value, raw; `None` for a null value (a tombstone).
    pub value: Option<Bytes>,
    /// The key's schema, as a Lambda event source mapping with a schema registry reports
    /// it (`keySchemaMetadata`); `None` elsewhere.
    pub key_schema: Option<SchemaMetadata>,
    /// The value's schema, as a Lambda event source mapping with a schema registry
    /// reports it (`valueSchemaMetadata`). With `EventRecordFormat: JSON` the mapping has
    /// already decoded the value into JSON text; with `SOURCE` the value is the bytes the
    /// producer wrote (framed for the registry). `None` elsewhere.
    pub value_schema: Option<SchemaMetadata>,
}

/// What a Lambda event source mapping says about a key's or value's schema.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SchemaMetadata {
    /// `AVRO`, `PROTOBUF` or `JSON`.
    #[serde(default)]
    pub data_format: String,
    /// The registry's id of the schema (a number for Confluent, a UUID for Glue).
    #[serde(default)]
    pub schema_id: String,
}

/// A record header. Kafka allows repeated names and null values; both are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The header's name.
    pub name: String,
    /// The header's value, raw; `None` for a header without a value.
    pub value: Option<Bytes>,
}

impl Event {
    /// A record with only the fields every record has; builders fill in the rest.
    pub fn new(topic: impl Into<String>, partition: i32, offset: i64) -> Self {
        Self {
            topic: topic.into(),
            partition,
            offset,
            timestamp_ms: None,
            key: None,
            headers: Vec::new(),
            value: None,
            key_schema: None,
            value_schema: None,
        }
    }

    /// Sets the value.
    pub fn with_value(mut self, value: impl Into<Bytes>) -> Self {
        self.value = Some(value.into());
        self
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header with a value, after the ones already there.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header { name: name.into(), value: Some(value.into()) });
        self
    }

    /// Sets the value's schema metadata (as a Lambda event source mapping reports it).
    pub fn with_value_schema(mut self, data_format: impl Into<String>, schema_id: impl Into<String>) -> Self {
        self.value_schema = Some(SchemaMetadata { data_format: data_format.into(), schema_id: schema_id.into() });
        self
    }

    /// Sets the broker timestamp, in ms since the Unix epoch.
    pub fn with_timestamp_ms(mut self, ts: i64) -> Self {
        self.timestamp_ms = Some(ts);
        self
    }

    /// The first header with this name (Kafka allows repeats; the first wins, as in
    /// most clients).
    pub fn header(&self, name: &str) -> Option<&Header> {
        self.headers.iter().find(|h| h.name == name)
    }

    /// The value's bytes, empty for a null value.
    pub fn value_bytes(&self) -> &[u8] {
        self.value.as_deref().unwrap_or_default()
    }

    /// SHA-256 of the value: what "the same payload" means for payload validation.
    pub fn payload_hash(&self) -> PayloadHash {
        PayloadHash(Sha256::digest(self.value_bytes()).into())
    }

    /// `topic-partition-offset`, the record's position; unique within a cluster.
    pub fn position(&self) -> String {
        format!("{}-{}-{}", self.topic, self.partition, self.offset)
    }
}

/// SHA-256 of an event's value.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PayloadHash(pub [u8; 32]);

impl PayloadHash {
    /// The hash as 64 lowercase hex digits, as stored in the ledger.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A hash from 64 hex digits; `None` if `s` is not exactly that.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(Self(out))
    }

    /// A hash from its 32 raw bytes; `None` for any other length.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Some(Self(b.try_into().ok()?))
    }
}

impl std::fmt::Debug for PayloadHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PayloadHash({})", &self.to_hex()[..12])
    }
}

/// A record as a runtime received it: decoded, or not decodable (bad base64, an
/// oversized value). An undecodable record keeps what could be read of it so its dead
/// letter can be inspected and replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A record that decoded: the guard runs it.
    Ok(Event),
    /// A record that could not be decoded: the guard dead-letters it.
    Invalid {
        /// What could be read of the record; the value holds the raw text when it was not
        /// base64 or not a string.
        event: Event,
        /// A stable label for metrics and dead letters (`record_value_base64`, ...).
        reason: &'static str,
        /// What was wrong, for people.
        error: String,
    },
}

impl Record {
    /// The event, whether it decoded or not (what could be read of an invalid one).
    pub fn event(&self) -> &Event {
        match self {
            Record::Ok(e) | Record::Invalid { event: e, .. } => e,
        }
    }
}

impl From<Event> for Record {
    fn from(e: Event) -> Self {
        Record::Ok(e)
    }
}
