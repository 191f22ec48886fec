//! Stable event ids and the strategies that derive them.
//!
//! Invariants:
//! - the same record always yields the same id under the same strategy;
//! - an id is never truncated: ids longer than [`EventId::MAX_LEN`] bytes, or holding
//!   control characters, are replaced by `sha256:<hex>` of their bytes, so two distinct
//!   long ids never collide into one;
//! - a missing or unusable id is an [`IdError`], never a panic.

use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::event::Event;

/// The header seed 001 and 003 standardise on.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency_key";

/// A stable id for one logical event, unique within a [`Namespace`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(String);

impl EventId {
    /// Longest id stored as is; longer ids are hashed.
    pub const MAX_LEN: usize = 200;

    /// Builds an id from raw text. Empty text is an error; over-long text or text with
    /// control characters (Postgres `text` cannot hold NUL) is hashed.
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

/// How a function derives the id of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdStrategy {
    /// A header's value, UTF-8 (seed 001: `idempotency_key`).
    Header(String),
    /// A scalar field of the JSON payload, by JSON pointer (`/id`, `/user/id`).
    PayloadField(String),
    /// Several payload fields joined with `:` (seed 004:
    /// `timestamp:distinct_id:token:event_name`). Every field must be present.
    Composite(Vec<String>),
    /// `topic-partition-offset`: always available, but a re-sent copy of an event gets a
    /// new offset and so a new id. The last resort.
    Offset,
    /// SHA-256 of the value: identical payloads are the same event. An explicit choice,
    /// never part of the default chain.
    ContentHash,
    /// The first strategy that yields an id.
    FirstOf(Vec<IdStrategy>),
}

impl IdStrategy {
    /// DESIGN.md's order: the `idempotency_key` header, then the payload field, then the
    /// composite (when given), then the record's position.
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

    /// Derives the id of `event`.
    pub fn derive(&self, event: &Event) -> Result<EventId, IdError> {
        let mut payload = LazyJson::default();
        self.derive_with(event, &mut payload)
    }

    fn derive_with(&self, event: &Event, payload: &mut LazyJson) -> Result<EventId, IdError> {
        match self {
            IdStrategy::Header(name) => {
                let header = event.header(name).ok_or_else(|| IdError::MissingHeader(name.clone()))?;
                let bytes = header.value.as_deref().ok_or_else(|| IdError::MissingHeader(name.clone()))?;
                let text = std::str::from_utf8(bytes).map_err(|_| IdError::HeaderNotUtf8(name.clone()))?;
                EventId::new(text.trim())
            }
            IdStrategy::PayloadField(pointer) => EventId::new(field_text(payload.get(event)?, pointer)?),
            IdStrategy::Composite(pointers) => {
                let json = payload.get(event)?;
                let parts = pointers.iter().map(|p| field_text(json, p)).collect::<Result<Vec<_>, _>>()?;
                EventId::new(parts.join(":"))
            }
            IdStrategy::Offset => EventId::new(event.position()),
            IdStrategy::ContentHash => {
                if event.value.is_none() {
                    return Err(IdError::MissingPayload);
                }
                EventId::new(format!("sha256:{}", event.payload_hash().to_hex()))
            }
            IdStrategy::FirstOf(strategies) => {
                let mut errors = Vec::new();
                for s in strategies {
                    match s.derive_with(event, payload) {
                        Ok(id) => return Ok(id),
                        Err(e) => errors.push(e),
                    }
                }
                Err(IdError::NoneMatched(errors))
            }
        }
    }
}

/// Parses the payload at most once, however many strategies look at it.
#[derive(Default)]
struct LazyJson(Option<Result<Value, IdError>>);

impl LazyJson {
    fn get(&mut self, event: &Event) -> Result<&Value, IdError> {
        let parsed = self.0.get_or_insert_with(|| match &event.value {
            None => Err(IdError::MissingPayload),
            Some(v) => serde_json::from_slice(v).map_err(|e| IdError::PayloadNotJson(e.to_string())),
        });
        parsed.as_ref().map_err(Clone::clone)
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
    #[error("event id is empty")]
    Empty,
    #[error("header `{0}` is missing or null")]
    MissingHeader(String),
    #[error("header `{0}` is not valid UTF-8")]
    HeaderNotUtf8(String),
    #[error("record has no value to read an id from")]
    MissingPayload,
    #[error("payload is not JSON: {0}")]
    PayloadNotJson(String),
    #[error("payload field `{0}` is missing or null")]
    MissingField(String),
    #[error("payload field `{0}` is not a string, number or boolean")]
    FieldNotScalar(String),
    #[error("no id strategy matched: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    NoneMatched(Vec<IdError>),
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
        assert_eq!(IdStrategy::Header("idempotency_key".into()).derive(&e).unwrap().as_str(), "abc-1");
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
        assert_eq!(s.derive(&json_event(r#"{"user":{"id":"u7"}}"#)).unwrap().as_str(), "u7");
        assert_eq!(s.derive(&json_event(r#"{"user":{"id":17}}"#)).unwrap().as_str(), "17");
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
        assert_eq!(s.derive(&e).unwrap().as_str(), "1700000000:d1:tk:click");
        let missing = json_event(r#"{"timestamp":1,"distinct_id":"d1","event":"click"}"#);
        assert_eq!(s.derive(&missing), Err(IdError::MissingField("/token".into())));
    }

    #[test]
    fn offset_strategy_uses_position() {
        assert_eq!(IdStrategy::Offset.derive(&json_event("{}")).unwrap().as_str(), "t-1-42");
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
        assert_eq!(chain.derive(&both).unwrap().as_str(), "from-header");
        assert_eq!(chain.derive(&json_event(r#"{"id":"from-field"}"#)).unwrap().as_str(), "from-field");
        assert_eq!(chain.derive(&json_event(r#"{"a":1,"b":2}"#)).unwrap().as_str(), "1:2");
        assert_eq!(chain.derive(&json_event(r#"{"a":1}"#)).unwrap().as_str(), "t-1-42");
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

    #[test]
    fn namespace_is_validated() {
        assert!(Namespace::new("user-events").is_ok());
        assert!(Namespace::new("user_events2").is_ok());
        for bad in ["", "User", "9abc", "a b", "a:b", &"a".repeat(64)] {
            assert!(Namespace::new(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
