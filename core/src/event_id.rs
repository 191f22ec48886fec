//! Stable event ids and the strategies that derive them.
//!
//! Invariants:
//! - the same record always yields the same id under the same strategy and format;
//! - ids are unambiguous (format [`IdFormat::V2`]): every id starts with the tag of its
//!   kind (`h:` header, `f:` payload field, `c:` composite, `p:` position, `sha256:`
//!   content hash), and a composite escapes `\` and `:` inside its fields, so ids of
//!   different kinds, or of different field lists, are never equal and one event is
//!   never skipped as another's duplicate;
//! - an id is never truncated: text that would make an id longer than
//!   [`EventId::MAX_LEN`] bytes, or that holds control characters, is replaced by its
//!   SHA-256 within its kind (`h#<hex>`), so two distinct long ids never collide, and a
//!   hashed header never equals a content hash;
//! - a missing or unusable id is an [`IdError`], never a panic.
//!
//! [`IdFormat::V1`] is the format before tags: the strategy's text as it is. It is kept
//! only so that ledgers written by earlier versions are still recognised (see
//! [`IdFormats`]).

use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::event::Event;

/// The header producers set to name an event (`Producer::send` and `eo produce` do):
/// the first place the default chain looks, because only the producer knows which sends
/// are the same event.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency_key";

/// A stable id for one logical event, unique within a [`Namespace`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(String);

impl EventId {
    /// Longest id stored as is; longer ids are hashed.
    pub const MAX_LEN: usize = 200;

    /// An id from its text as stored (a ledger row, a dead letter, an operator's
    /// argument), or a v1 id. Empty text is an error; over-long text or text with
    /// control characters (Postgres `text` cannot hold NUL) is hashed as `sha256:<hex>`.
    /// Every id this module derives is kept as is.
    pub fn new(raw: impl Into<String>) -> Result<Self, IdError> {
        let raw = raw.into();
        if raw.is_empty() {
            return Err(IdError::Empty);
        }
        if raw.len() > Self::MAX_LEN || raw.chars().any(char::is_control) {
            return Ok(Self(format!("sha256:{}", hex::encode(Sha256::digest(raw.as_bytes())))));
        }
        Ok(Self(raw))
    }

    /// A v2 id of kind `kind` (lowercase letters, distinct per kind): `<kind>:<text>`,
    /// or `<kind>#<sha256 of text>` when that would be longer than [`Self::MAX_LEN`] or
    /// `text` holds control characters. The tag ends at the first `:` or `#`, so ids of
    /// different kinds never meet, and the `#` keeps hashed ids apart from kept ones.
    pub fn of_kind(kind: &str, text: &str) -> Result<Self, IdError> {
        debug_assert!(!kind.is_empty() && kind.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        if text.is_empty() {
            return Err(IdError::Empty);
        }
        if kind.len() + 1 + text.len() > Self::MAX_LEN || text.chars().any(char::is_control) {
            return Ok(Self(format!("{kind}#{}", hex::encode(Sha256::digest(text.as_bytes())))));
        }
        // By hand rather than `format!`: every event's id is built here.
        let mut id = String::with_capacity(kind.len() + 1 + text.len());
        id.push_str(kind);
        id.push(':');
        id.push_str(text);
        Ok(Self(id))
    }

    /// An id of kind `kind` in `format`: [`Self::of_kind`] in v2; `<kind>:<text>` as
    /// [`Self::new`] builds it in v1. For the guard's own ids (a record without a usable
    /// id is filed under `invalid:<position>`).
    pub fn tagged(format: IdFormat, kind: &str, text: &str) -> Result<Self, IdError> {
        match format {
            IdFormat::V1 => Self::new(format!("{kind}:{text}")),
            IdFormat::V2 => Self::of_kind(kind, text),
        }
    }

    /// The id's text, as stored and as keys are built from it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({:?})", self.0)
    }
}

/// The scope of event ids: a function's name. Lowercase ASCII letters, digits, `-` and
/// `_`, starting with a letter, at most 63 characters, so it is safe in Redis keys,
/// metric labels and log lines.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Namespace(String);

impl Namespace {
    /// A namespace from a function's name, or [`IdError::InvalidNamespace`] if the name
    /// breaks the rules above.
    pub fn new(name: impl Into<String>) -> Result<Self, IdError> {
        let name = name.into();
        let valid = !name.is_empty()
            && name.len() <= 63
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if valid {
            Ok(Self(name))
        } else {
            Err(IdError::InvalidNamespace(name))
        }
    }

    /// The name as it is.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Namespace({})", self.0)
    }
}

/// How an id is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdFormat {
    /// The strategy's text as it is (`abc`, `t-0-5`, `a:b` for a composite): ids of
    /// different kinds can be equal. Only for ledgers written before v2.
    V1,
    /// Tagged by kind, composite fields escaped (see the module docs).
    V2,
}

/// The id formats a guard works with (`EVENT_ID_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdFormats {
    /// v1 only, as versions before v2 did.
    V1,
    /// The transition from v1 to v2. An event's id is its v1 id (what its effects,
    /// attempts and dead letter are keyed by, as in v1), and its v2 id goes along: a
    /// duplicate under either is a duplicate, both are leased and both confirmed in one
    /// statement. So processes on v1, on the transition and on v2 fence each other
    /// through the ledger, and every event confirmed during the transition is known to
    /// v2 afterwards.
    V1AndV2,
    /// v2 only.
    V2,
}

impl IdFormats {
    /// The format of the id an event is known by.
    pub fn primary(self) -> IdFormat {
        match self {
            IdFormats::V1 | IdFormats::V1AndV2 => IdFormat::V1,
            IdFormats::V2 => IdFormat::V2,
        }
    }

    /// The format of the second id checked and confirmed alongside, if any.
    pub fn shadow(self) -> Option<IdFormat> {
        match self {
            IdFormats::V1AndV2 => Some(IdFormat::V2),
            IdFormats::V1 | IdFormats::V2 => None,
        }
    }

    /// `v1`, `v1+v2` or `v2`, as `EVENT_ID_FORMAT` spells them.
    pub fn name(self) -> &'static str {
        match self {
            IdFormats::V1 => "v1",
            IdFormats::V1AndV2 => "v1+v2",
            IdFormats::V2 => "v2",
        }
    }
}

impl fmt::Display for IdFormats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for IdFormats {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "v1" => Ok(IdFormats::V1),
            "v1+v2" => Ok(IdFormats::V1AndV2),
            "v2" => Ok(IdFormats::V2),
            other => Err(format!("`{other}` is not an id format: use v1, v1+v2 or v2")),
        }
    }
}

/// `EVENT_ID_FORMAT`: a fixed set of formats, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdFormatSetting {
    /// `v1+v2` while the function's ledger holds rows only known by their v1 id (written
    /// by a version before v2, or by a process on `v1`), `v2` once none is left. Decided
    /// from the ledger when the guard first runs and checked again every few minutes.
    Auto,
    /// Always these formats.
    Fixed(IdFormats),
}

impl fmt::Display for IdFormatSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdFormatSetting::Auto => f.write_str("auto"),
            IdFormatSetting::Fixed(formats) => formats.fmt(f),
        }
    }
}

impl std::str::FromStr for IdFormatSetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(IdFormatSetting::Auto),
            other => other
                .parse()
                .map(IdFormatSetting::Fixed)
                .map_err(|_| format!("`{other}` is not an id format: use auto, v1, v1+v2 or v2")),
        }
    }
}

/// How a function derives the id of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdStrategy {
    /// A header's value, UTF-8 (usually `idempotency_key`).
    Header(String),
    /// A scalar field of the JSON payload, by JSON pointer (`/id`, `/user/id`).
    PayloadField(String),
    /// Several payload fields joined with `:`, for events without an id field of their
    /// own (analytics events: `timestamp:distinct_id:token:event_name`), each field's own
    /// `\` and `:` escaped with `\`. Every field must be present.
    Composite(Vec<String>),
    /// `topic-partition-offset`: always available, but a re-sent copy of an event gets a
    /// new offset and so a new id. The last resort. (Unambiguous because partitions and
    /// offsets of records are never negative: the decoder rejects such records.)
    Offset,
    /// SHA-256 of the value: identical payloads are the same event. An explicit choice,
    /// never part of the default chain.
    ContentHash,
    /// The first strategy that yields an id. Strategies of one kind share a tag: two
    /// payload fields in one chain are two names for the same id.
    FirstOf(Vec<IdStrategy>),
}

/// What a strategy read, before it is written in a format.
enum Raw {
    Header(String),
    Field(String),
    Composite(Vec<String>),
    Position(String),
    /// Hex SHA-256 of the value.
    ContentHash(String),
}

impl Raw {
    fn is_empty(&self) -> bool {
        match self {
            Raw::Header(t) | Raw::Field(t) | Raw::Position(t) | Raw::ContentHash(t) => t.is_empty(),
            Raw::Composite(parts) => parts.len() == 1 && parts[0].is_empty(),
        }
    }

    fn format(&self, format: IdFormat) -> EventId {
        let id = match (self, format) {
            // The same in both formats: `sha256:` is its tag in v2.
            (Raw::ContentHash(hex), _) => EventId::of_kind("sha256", hex),
            (Raw::Header(t) | Raw::Field(t) | Raw::Position(t), IdFormat::V1) => EventId::new(t.as_str()),
            (Raw::Composite(parts), IdFormat::V1) => EventId::new(parts.join(":")),
            (Raw::Header(t), IdFormat::V2) => EventId::of_kind("h", t),
            (Raw::Field(t), IdFormat::V2) => EventId::of_kind("f", t),
            (Raw::Composite(parts), IdFormat::V2) => EventId::of_kind("c", &escape_fields(parts)),
            (Raw::Position(t), IdFormat::V2) => EventId::of_kind("p", t),
        };
        id.expect("checked non-empty")
    }
}

/// `a\:b:c` for the fields `a:b` and `c`: each field's `\` and `:` escaped, joined with `:`.
/// Injective: an unescaped `:` always separates two fields.
fn escape_fields(parts: &[String]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        for c in part.chars() {
            if c == '\\' || c == ':' {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

impl IdStrategy {
    /// The order docs/DESIGN.md explains: the `idempotency_key` header, then the payload
    /// field, then the composite (when given), then the record's position.
    pub fn default_chain(field: Option<&str>, composite: Option<&[&str]>) -> Self {
        let mut chain = vec![IdStrategy::Header(IDEMPOTENCY_KEY_HEADER.to_owned())];
        if let Some(f) = field {
            chain.push(IdStrategy::PayloadField(f.to_owned()));
        }
        if let Some(c) = composite {
            chain.push(IdStrategy::Composite(c.iter().map(|s| (*s).to_owned()).collect()));
        }
        chain.push(IdStrategy::Offset);
        IdStrategy::FirstOf(chain)
    }

    /// Derives the id of `event` in the current format ([`IdFormat::V2`]).
    pub fn derive(&self, event: &Event) -> Result<EventId, IdError> {
        self.derive_in(event, IdFormat::V2)
    }

    /// Derives the id of `event` in `format`.
    pub fn derive_in(&self, event: &Event, format: IdFormat) -> Result<EventId, IdError> {
        Ok(self.raw(event, &mut LazyJson::default())?.format(format))
    }

    /// The id of `event` in the primary format of `formats`, and in its shadow format
    /// when there is one; the payload is read once.
    pub fn derive_for(&self, event: &Event, formats: IdFormats) -> Result<(EventId, Option<EventId>), IdError> {
        self.derive_decoded(event, None, formats)
    }

    /// Like [`Self::derive_for`], with payload fields read from `decoded` (a value
    /// decoded from Avro, say) instead of parsing the value as JSON; `None` parses it.
    pub fn derive_decoded(
        &self,
        event: &Event,
        decoded: Option<&Value>,
        formats: IdFormats,
    ) -> Result<(EventId, Option<EventId>), IdError> {
        let mut payload = match decoded {
            Some(v) => LazyJson::Decoded(v),
            None => LazyJson::default(),
        };
        let raw = self.raw(event, &mut payload)?;
        Ok((raw.format(formats.primary()), formats.shadow().map(|f| raw.format(f))))
    }

    fn raw(&self, event: &Event, payload: &mut LazyJson<'_>) -> Result<Raw, IdError> {
        let raw = match self {
            IdStrategy::Header(name) => {
                let header = event.header(name).ok_or_else(|| IdError::MissingHeader(name.clone()))?;
                let bytes = header.value.as_deref().ok_or_else(|| IdError::MissingHeader(name.clone()))?;
                let text = std::str::from_utf8(bytes).map_err(|_| IdError::HeaderNotUtf8(name.clone()))?;
                Raw::Header(text.trim().to_owned())
            }
            IdStrategy::PayloadField(pointer) => Raw::Field(field_text(payload.get(event)?, pointer)?),
            IdStrategy::Composite(pointers) => {
                let json = payload.get(event)?;
                Raw::Composite(pointers.iter().map(|p| field_text(json, p)).collect::<Result<Vec<_>, _>>()?)
            }
            IdStrategy::Offset => Raw::Position(event.position()),
            IdStrategy::ContentHash => {
                if event.value.is_none() {
                    return Err(IdError::MissingPayload);
                }
                Raw::ContentHash(event.payload_hash().to_hex())
            }
            IdStrategy::FirstOf(strategies) => {
                let mut errors = Vec::new();
                for s in strategies {
                    match s.raw(event, payload) {
                        Ok(raw) => return Ok(raw),
                        Err(e) => errors.push(e),
                    }
                }
                return Err(IdError::NoneMatched(errors));
            }
        };
        if raw.is_empty() {
            return Err(IdError::Empty);
        }
        Ok(raw)
    }
}

/// Parses the payload at most once, however many strategies look at it; or reads a
/// value decoded before.
enum LazyJson<'v> {
    Parsed(Option<Result<Value, IdError>>),
    Decoded(&'v Value),
}

impl Default for LazyJson<'_> {
    fn default() -> Self {
        LazyJson::Parsed(None)
    }
}

impl LazyJson<'_> {
    fn get(&mut self, event: &Event) -> Result<&Value, IdError> {
        match self {
            LazyJson::Decoded(v) => Ok(v),
            LazyJson::Parsed(parsed) => {
                let parsed = parsed.get_or_insert_with(|| match &event.value {
                    None => Err(IdError::MissingPayload),
                    Some(v) => serde_json::from_slice(v).map_err(|e| IdError::PayloadNotJson(e.to_string())),
                });
                parsed.as_ref().map_err(Clone::clone)
            }
        }
    }
}

fn field_text(json: &Value, pointer: &str) -> Result<String, IdError> {
    match json.pointer(pointer) {
        None | Some(Value::Null) => Err(IdError::MissingField(pointer.to_owned())),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(_) => Err(IdError::FieldNotScalar(pointer.to_owned())),
    }
}

/// Why an event has no usable id. Never retryable: the same record fails the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id would be empty: an empty header value or field, or empty text given to
    /// [`EventId::new`].
    #[error("event id is empty")]
    Empty,
    /// The header (named) is absent, or present without a value.
    #[error("header `{0}` is missing or null")]
    MissingHeader(String),
    /// The header's (named) value is not UTF-8.
    #[error("header `{0}` is not valid UTF-8")]
    HeaderNotUtf8(String),
    /// The record has a null value, so no payload to read.
    #[error("record has no value to read an id from")]
    MissingPayload,
    /// The value is not JSON; holds the parser's message.
    #[error("payload is not JSON: {0}")]
    PayloadNotJson(String),
    /// Nothing, or a JSON `null`, at the JSON pointer (named).
    #[error("payload field `{0}` is missing or null")]
    MissingField(String),
    /// An object or an array at the JSON pointer (named).
    #[error("payload field `{0}` is not a string, number or boolean")]
    FieldNotScalar(String),
    /// Every strategy of a [`IdStrategy::FirstOf`] failed; holds each one's error, in
    /// order.
    #[error("no id strategy matched: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    NoneMatched(Vec<IdError>),
    /// The name is not a valid [`Namespace`]; holds the name as given.
    #[error("invalid namespace `{0}`: use lowercase letters, digits, `-` and `_`, starting with a letter, at most 63 characters")]
    InvalidNamespace(String),
}

impl IdError {
    /// A short, stable label for metrics and dead-letter reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            IdError::Empty => "id_empty",
            IdError::MissingHeader(_) => "id_header_missing",
            IdError::HeaderNotUtf8(_) => "id_header_not_utf8",
            IdError::MissingPayload => "id_payload_missing",
            IdError::PayloadNotJson(_) => "id_payload_not_json",
            IdError::MissingField(_) => "id_field_missing",
            IdError::FieldNotScalar(_) => "id_field_not_scalar",
            IdError::NoneMatched(_) => "id_missing",
            IdError::InvalidNamespace(_) => "namespace_invalid",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_event(v: &str) -> Event {
        Event::new("t", 1, 42).with_value(v.as_bytes().to_vec())
    }

    #[test]
    fn header_strategy_reads_utf8_header() {
        let e = json_event("{}").with_header("idempotency_key", "abc-1");
        assert_eq!(IdStrategy::Header("idempotency_key".into()).derive(&e).unwrap().as_str(), "h:abc-1");
    }

    #[test]
    fn header_strategy_rejects_missing_and_non_utf8() {
        let s = IdStrategy::Header("idempotency_key".into());
        assert_eq!(s.derive(&json_event("{}")), Err(IdError::MissingHeader("idempotency_key".into())));
        let e = json_event("{}").with_header("idempotency_key", vec![0xff, 0xfe]);
        assert_eq!(s.derive(&e), Err(IdError::HeaderNotUtf8("idempotency_key".into())));
    }

    #[test]
    fn payload_field_reads_strings_and_numbers() {
        let s = IdStrategy::PayloadField("/user/id".into());
        assert_eq!(s.derive(&json_event(r#"{"user":{"id":"u7"}}"#)).unwrap().as_str(), "f:u7");
        assert_eq!(s.derive(&json_event(r#"{"user":{"id":17}}"#)).unwrap().as_str(), "f:17");
        assert_eq!(s.derive(&json_event(r#"{"user":{}}"#)), Err(IdError::MissingField("/user/id".into())));
        assert_eq!(s.derive(&json_event(r#"{"user":{"id":[1]}}"#)), Err(IdError::FieldNotScalar("/user/id".into())));
        assert!(matches!(s.derive(&json_event("not json")), Err(IdError::PayloadNotJson(_))));
        assert_eq!(s.derive(&Event::new("t", 0, 0)), Err(IdError::MissingPayload));
    }

    #[test]
    fn composite_joins_fields_in_order() {
        let s =
            IdStrategy::Composite(vec!["/timestamp".into(), "/distinct_id".into(), "/token".into(), "/event".into()]);
        let e = json_event(r#"{"timestamp":1700000000,"distinct_id":"d1","token":"tk","event":"click"}"#);
        assert_eq!(s.derive(&e).unwrap().as_str(), "c:1700000000:d1:tk:click");
        let missing = json_event(r#"{"timestamp":1,"distinct_id":"d1","event":"click"}"#);
        assert_eq!(s.derive(&missing), Err(IdError::MissingField("/token".into())));
    }

    #[test]
    fn offset_strategy_uses_position() {
        assert_eq!(IdStrategy::Offset.derive(&json_event("{}")).unwrap().as_str(), "p:t-1-42");
    }

    #[test]
    fn content_hash_is_stable_and_payload_sensitive() {
        let a = IdStrategy::ContentHash.derive(&json_event(r#"{"a":1}"#)).unwrap();
        let b = IdStrategy::ContentHash.derive(&Event::new("other", 9, 9).with_value(&b"{\"a\":1}"[..])).unwrap();
        let c = IdStrategy::ContentHash.derive(&json_event(r#"{"a":2}"#)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.as_str().starts_with("sha256:"));
        assert_eq!(IdStrategy::ContentHash.derive(&Event::new("t", 0, 0)), Err(IdError::MissingPayload));
    }

    #[test]
    fn default_chain_prefers_header_then_field_then_composite_then_offset() {
        let chain = IdStrategy::default_chain(Some("/id"), Some(&["/a", "/b"]));
        let both = json_event(r#"{"id":"from-field","a":1,"b":2}"#).with_header("idempotency_key", "from-header");
        assert_eq!(chain.derive(&both).unwrap().as_str(), "h:from-header");
        assert_eq!(chain.derive(&json_event(r#"{"id":"from-field"}"#)).unwrap().as_str(), "f:from-field");
        assert_eq!(chain.derive(&json_event(r#"{"a":1,"b":2}"#)).unwrap().as_str(), "c:1:2");
        assert_eq!(chain.derive(&json_event(r#"{"a":1}"#)).unwrap().as_str(), "p:t-1-42");
        // An empty header is no id: the chain goes on.
        let empty = json_event(r#"{"id":"from-field"}"#).with_header("idempotency_key", " ");
        assert_eq!(chain.derive(&empty).unwrap().as_str(), "f:from-field");
    }

    #[test]
    fn chain_without_fallback_reports_every_reason() {
        let chain = IdStrategy::FirstOf(vec![
            IdStrategy::Header("idempotency_key".into()),
            IdStrategy::PayloadField("/id".into()),
        ]);
        let err = chain.derive(&json_event("{}")).unwrap_err();
        assert_eq!(err.reason(), "id_missing");
        let text = err.to_string();
        assert!(text.contains("idempotency_key") && text.contains("/id"), "{text}");
    }

    #[test]
    fn long_and_control_character_ids_are_hashed_not_truncated() {
        let long_a = "a".repeat(EventId::MAX_LEN + 1);
        let mut long_b = long_a.clone();
        long_b.push('b');
        let a = EventId::new(long_a).unwrap();
        let b = EventId::new(long_b).unwrap();
        assert!(a.as_str().starts_with("sha256:"));
        assert_ne!(a, b, "ids sharing a long prefix must not collide");
        assert!(EventId::new("x\0y").unwrap().as_str().starts_with("sha256:"));
        assert_eq!(EventId::new("a".repeat(EventId::MAX_LEN)).unwrap().as_str().len(), EventId::MAX_LEN);
        assert_eq!(EventId::new(""), Err(IdError::Empty));
    }

    // Ids of different kinds, or of different field lists, must never be equal: an equal
    // id makes one event a duplicate of the other, skipped.

    #[test]
    fn composite_fields_containing_the_separator_do_not_collide() {
        let s = IdStrategy::Composite(vec!["/a".into(), "/b".into()]);
        let cases = [
            r#"{"a":"a:b","b":"c"}"#,
            r#"{"a":"a","b":"b:c"}"#,
            r#"{"a":"a\\","b":"c"}"#,
            r#"{"a":"a","b":"\\c"}"#,
            r#"{"a":"a\\:","b":"c"}"#,
            r#"{"a":"a","b":":c"}"#,
            r#"{"a":"a:","b":"c"}"#,
        ];
        let ids: Vec<EventId> = cases.iter().map(|c| s.derive(&json_event(c)).unwrap()).collect();
        for (i, a) in ids.iter().enumerate() {
            for (j, b) in ids.iter().enumerate().skip(i + 1) {
                assert_ne!(a, b, "{} and {} collide", cases[i], cases[j]);
            }
        }
    }

    #[test]
    fn a_header_id_never_equals_a_content_hash() {
        let payload = r#"{"a":1}"#;
        let hash = IdStrategy::ContentHash.derive(&json_event(payload)).unwrap();
        let header = IdStrategy::Header("idempotency_key".into());
        let forged = json_event("{}").with_header("idempotency_key", hash.as_str().to_owned());
        assert_ne!(header.derive(&forged).unwrap(), hash, "a header holding `sha256:<hex>`");
    }

    #[test]
    fn a_hashed_long_header_never_equals_a_content_hash() {
        // A header too long to keep is hashed, but within its own kind: a header whose
        // text is some payload must not take that payload's content hash.
        let header = IdStrategy::Header("idempotency_key".into());
        let long = format!(r#"{{"pad":"{}"}}"#, "x".repeat(EventId::MAX_LEN));
        let long_hash = IdStrategy::ContentHash.derive(&json_event(&long)).unwrap();
        let long_header = json_event("{}").with_header("idempotency_key", long.clone());
        assert_ne!(header.derive(&long_header).unwrap(), long_hash, "a hashed long header");
    }

    #[test]
    fn a_header_or_field_id_never_equals_a_position() {
        let position = IdStrategy::Offset.derive(&json_event("{}")).unwrap();
        let header = json_event("{}").with_header("idempotency_key", "t-1-42");
        assert_ne!(IdStrategy::Header("idempotency_key".into()).derive(&header).unwrap(), position);
        let field = json_event(r#"{"id":"t-1-42"}"#);
        assert_ne!(IdStrategy::PayloadField("/id".into()).derive(&field).unwrap(), position);
    }

    #[test]
    fn a_header_id_never_equals_a_composite_or_a_field() {
        let composite = IdStrategy::Composite(vec!["/a".into(), "/b".into()]);
        let c = composite.derive(&json_event(r#"{"a":"x","b":"y"}"#)).unwrap();
        let h = IdStrategy::Header("idempotency_key".into())
            .derive(&json_event("{}").with_header("idempotency_key", "x:y"))
            .unwrap();
        let f = IdStrategy::PayloadField("/id".into()).derive(&json_event(r#"{"id":"x:y"}"#)).unwrap();
        assert_ne!(c, h);
        assert_ne!(c, f);
        assert_ne!(h, f);
    }

    #[test]
    fn composite_fields_are_escaped() {
        let s = IdStrategy::Composite(vec!["/a".into(), "/b".into()]);
        assert_eq!(s.derive(&json_event(r#"{"a":"x:y","b":"z\\"}"#)).unwrap().as_str(), r"c:x\:y:z\\");
    }

    #[test]
    fn long_and_control_character_ids_are_hashed_within_their_kind() {
        let header = IdStrategy::Header("idempotency_key".into());
        let long = "a".repeat(EventId::MAX_LEN);
        let id = header.derive(&json_event("{}").with_header("idempotency_key", long.clone())).unwrap();
        assert!(id.as_str().starts_with("h#") && id.as_str().len() == 2 + 64, "{id:?}");
        let mut longer = long.clone();
        longer.push('b');
        let other = header.derive(&json_event("{}").with_header("idempotency_key", longer)).unwrap();
        assert_ne!(id, other, "ids sharing a long prefix must not collide");
        // The longest text kept as is makes an id of exactly MAX_LEN bytes.
        let kept = "a".repeat(EventId::MAX_LEN - 2);
        let id = header.derive(&json_event("{}").with_header("idempotency_key", kept.clone())).unwrap();
        assert_eq!(id.as_str(), format!("h:{kept}"));
        let field = IdStrategy::PayloadField("/id".into());
        assert!(field.derive(&json_event(r#"{"id":"x\u0007y"}"#)).unwrap().as_str().starts_with("f#"));
        // Kept or hashed, an id is its own stored form.
        assert_eq!(EventId::new(id.as_str()).unwrap(), id);
        assert_eq!(EventId::of_kind("h", ""), Err(IdError::Empty));
    }

    /// v1 must stay exactly what versions before v2 stored: the transition looks ledger
    /// rows up by it.
    #[test]
    fn v1_is_the_format_before_tags() {
        let v1 = |s: &IdStrategy, e: &Event| s.derive_in(e, IdFormat::V1).unwrap().as_str().to_owned();
        let e = json_event(r#"{"id":17,"a":"a:b","b":"c"}"#).with_header("idempotency_key", " abc-1 ");
        assert_eq!(v1(&IdStrategy::Header("idempotency_key".into()), &e), "abc-1");
        assert_eq!(v1(&IdStrategy::PayloadField("/id".into()), &e), "17");
        assert_eq!(v1(&IdStrategy::Composite(vec!["/a".into(), "/b".into()]), &e), "a:b:c");
        assert_eq!(v1(&IdStrategy::Offset, &e), "t-1-42");
        assert_eq!(v1(&IdStrategy::ContentHash, &e), IdStrategy::ContentHash.derive(&e).unwrap().as_str());
        let long = "x".repeat(EventId::MAX_LEN + 1);
        let e = json_event("{}").with_header("idempotency_key", long.clone());
        assert_eq!(v1(&IdStrategy::Header("idempotency_key".into()), &e), EventId::new(long).unwrap().as_str());
        assert_eq!(EventId::tagged(IdFormat::V1, "invalid", "t-1-42").unwrap().as_str(), "invalid:t-1-42");
        assert_eq!(EventId::tagged(IdFormat::V2, "invalid", "t-1-42").unwrap().as_str(), "invalid:t-1-42");
    }

    #[test]
    fn formats_give_the_primary_id_and_the_shadow() {
        let e = json_event("{}").with_header("idempotency_key", "abc");
        let s = IdStrategy::default_chain(Some("/id"), None);
        let pair = |f: IdFormats| s.derive_for(&e, f).unwrap();
        assert_eq!(pair(IdFormats::V2), (EventId::new("h:abc").unwrap(), None));
        assert_eq!(pair(IdFormats::V1), (EventId::new("abc").unwrap(), None));
        assert_eq!(pair(IdFormats::V1AndV2), (EventId::new("abc").unwrap(), Some(EventId::new("h:abc").unwrap())));
        for f in [IdFormats::V1, IdFormats::V1AndV2, IdFormats::V2] {
            assert_eq!(f.name().parse::<IdFormats>(), Ok(f));
        }
        assert!("v3".parse::<IdFormats>().is_err());
    }

    #[test]
    fn namespace_is_validated() {
        assert!(Namespace::new("user-events").is_ok());
        assert!(Namespace::new("user_events2").is_ok());
        for bad in ["", "User", "9abc", "a b", "a:b", &"a".repeat(64)] {
            assert!(Namespace::new(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn id_format_setting_parses_auto_and_fixed_formats() {
        assert_eq!("auto".parse::<IdFormatSetting>(), Ok(IdFormatSetting::Auto));
        assert_eq!("v1+v2".parse::<IdFormatSetting>(), Ok(IdFormatSetting::Fixed(IdFormats::V1AndV2)));
        assert_eq!("v2".parse::<IdFormatSetting>().unwrap().to_string(), "v2");
        assert!("v3".parse::<IdFormatSetting>().unwrap_err().contains("auto, v1, v1+v2 or v2"));
    }
}
