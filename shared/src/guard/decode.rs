//! Step 0a: values framed for a schema registry, decoded before ids are derived (an id
//! may be a field of the decoded value).
//!
//! On Lambda, an event source mapping with a schema registry of its own hands records
//! over with `valueSchemaMetadata`: as JSON text it decoded itself (`EventRecordFormat:
//! JSON`, read as it is), or as the datum without its frame (`SOURCE`, decoded here with
//! the schema the metadata names); `LAMBDA_EVENT_RECORD_FORMAT` says which.
//!
//! The batch's schema ids are looked up together, each once (the registry client
//! caches them), so a batch usually waits for none: a new id costs one registry round trip,
//! plus one per schema it references (fetched one after another), and framed keys are
//! looked up after the values.
//!
//! A record that cannot be decoded with its schema (not framed, cut short, not matching
//! its schema, an unknown or unusable schema) is rejected with its own reason and
//! dead-lettered; a record whose schema cannot be had now (registry down, breaker open)
//! fails as unavailable and is retried, never dead-lettered.

use exactly_once_core::event::SchemaMetadata;
use std::borrow::Cow;

use exactly_once_core::payload::{confluent_frame, glue_frame, glue_header, Framed, PayloadError, SchemaId};

use crate::config::EventRecordFormat;

use crate::event::Event;
use crate::outcome::DeadLetterReason;
use crate::payload::ValueFormat;

use super::slot::Rejection;
use super::Guard;

/// How many bytes of Glue datums a batch may still decompress. Glue datums are
/// decompressed one at a time while decoding, and a batch's decompressed bytes are
/// bounded: a batch of small zlib bombs (each up to GUARD_MAX_VALUE_BYTES once inflated)
/// cannot take the process's memory. Past the budget, compressed values and keys wait for
/// a later batch; it holds at least two values' worth, so a batch's first record (its
/// value and its key) always fits and every batch makes progress.
pub(super) struct InflateBudget {
    total: usize,
    left: usize,
}

impl InflateBudget {
    pub(super) fn new(setting: usize, max_value_bytes: usize) -> Self {
        let total = setting.max(max_value_bytes.saturating_mul(2));
        Self { total, left: total }
    }
}

/// Which part of a record step 0a decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    /// The record's value (`FunctionSpec::values`).
    Value,
    /// The record's key (`FunctionSpec::keys`).
    Key,
}

impl Part {
    fn bytes(self, event: &Event) -> Option<&[u8]> {
        match self {
            Part::Value => event.value.as_deref(),
            Part::Key => event.key.as_deref(),
        }
    }

    fn schema(self, event: &Event) -> Option<&SchemaMetadata> {
        match self {
            Part::Value => event.value_schema.as_ref(),
            Part::Key => event.key_schema.as_ref(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Part::Value => "value",
            Part::Key => "key",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Part::Value => "",
            Part::Key => "key: ",
        }
    }
}

/// What step 0a made of a record's value.
pub(super) enum Decoded {
    /// Nothing to decode: a plain value, a null one, or one rejected already.
    Raw,
    /// The decoded value.
    Value(serde_json::Value),
    /// Its schema could not be had now; the record is retried.
    Unavailable(String),
}

impl Guard {
    /// Decodes the framed values (or keys, as `part` says) of `items`; the ones that
    /// cannot be decoded get their rejection. One entry per item, in order. `budget` is
    /// the batch's decompression budget, shared by its value and key passes; the key
    /// pass skips the records whose value waits (`waits`: the value pass's results).
    pub(super) async fn decode(
        &self,
        items: &mut [(&Event, Option<Rejection>)],
        part: Part,
        budget: &mut InflateBudget,
        waits: Option<&[Decoded]>,
    ) -> Vec<Decoded> {
        let format = match part {
            Part::Value => self.values,
            Part::Key => self.keys,
        };
        // A key's failures say it is the key's.
        let reject = |reason: &'static str, error: String| reject(reason, format!("{}{error}", part.prefix()));
        let or_json = match format {
            ValueFormat::Json => return items.iter().map(|_| Decoded::Raw).collect(),
            ValueFormat::Confluent { or_json } | ValueFormat::Glue { or_json } => or_json,
        };
        let max_datum = self.config.max_value_bytes;
        // What to decode, for records that have something and are not refused already.
        let mut frames = Vec::with_capacity(items.len());
        // Records that wait for the operator (a setting that does not match the mapping).
        let mut waiting: Vec<Option<String>> = vec![None; items.len()];
        for (i, (event, rejected)) in items.iter_mut().enumerate() {
            let skip = rejected.is_some()
                || waits.is_some_and(|w| matches!(w.get(i), Some(Decoded::Unavailable(_))))
                || (part == Part::Key && event.value_bytes().len() > max_datum);
            let frame = match part.bytes(event) {
                // A tombstone has nothing to decode; oversize values are refused in step 0b.
                None => None,
                Some(_) if skip => None,
                Some(v) if v.len() > max_datum => {
                    if part == Part::Key {
                        *rejected = Some(Rejection {
                            reason: DeadLetterReason::ValueTooLarge,
                            error: format!("key is {} bytes, over GUARD_MAX_VALUE_BYTES={max_datum}", v.len()),
                        });
                    }
                    None
                }
                Some(v) => match (part.schema(event), self.config.event_record_format) {
                    // From a Lambda event source mapping with a schema registry, which
                    // decoded the value into JSON text itself. Bytes that cannot be JSON
                    // mean the mapping sends SOURCE: every record would be refused, so
                    // they wait for the setting to be fixed instead.
                    (Some(_), EventRecordFormat::Json) => {
                        if !looks_like_json(v) {
                            waiting[i] = Some(format!(
                                "LAMBDA_EVENT_RECORD_FORMAT is JSON, but the event source mapping sent a {} that is not JSON text: set it to SOURCE, as the mapping's EventRecordFormat is",
                                part.name()
                            ));
                        }
                        None
                    }
                    // ... or passed the datum on without its frame, the id beside it.
                    (Some(meta), EventRecordFormat::Source) => match unframed(meta, v) {
                        Ok(f) => Some(f),
                        Err(e) => {
                            *rejected = Some(reject(e.reason.as_str(), e.error));
                            None
                        }
                    },
                    (None, _) => match frame(format, v) {
                        Ok(f) => Some((f, None)),
                        Err(PayloadError::NotFramed { .. }) if or_json => None,
                        Err(e) => {
                            *rejected = Some(reject(e.reason(), e.to_string()));
                            None
                        }
                    },
                },
            };
            frames.push(frame);
        }
        if !self.registry.is_configured() {
            // Only a function that also reads JSON starts without a registry: its framed
            // values are filed, to be replayed once SCHEMA_REGISTRY_URL is set, rather
            // than holding up the JSON ones behind them. (Glue needs no URL.)
            for ((_, rejected), frame) in items.iter_mut().zip(frames.iter_mut()) {
                if frame.as_ref().is_some_and(|(f, _)| matches!(f.schema_id, SchemaId::Confluent(_))) {
                    *frame = None;
                    *rejected = Some(reject(
                        "schema_registry_unset",
                        format!("{} is framed for a schema registry, but SCHEMA_REGISTRY_URL is not set", part.name()),
                    ));
                }
            }
        }
        let schemas = self.registry.schemas(frames.iter().flatten().map(|(f, _)| f.schema_id)).await;
        let mut out = Vec::with_capacity(items.len());
        for (((_, rejected), frame), waiting) in items.iter_mut().zip(frames).zip(waiting) {
            if let Some(why) = waiting {
                out.push(Decoded::Unavailable(why));
                continue;
            }
            let Some((frame, source)) = frame else {
                out.push(Decoded::Raw);
                continue;
            };
            let schema = schemas.get(&frame.schema_id).expect("every frame's schema id was looked up");
            // A Glue frame is kept whole until here: its datum is decompressed now, once its
            // schema is known to be had.
            let glue_whole = matches!(format, ValueFormat::Glue { .. }) && source.is_none();
            let compressed = glue_whole && glue_header(&frame.body).is_ok_and(|(_, zlib)| zlib);
            if compressed && schema.is_ok() && budget.left < max_datum {
                out.push(Decoded::Unavailable(format!(
                    "this batch decompressed up to its {} bytes of Glue values and keys (GUARD_MAX_BATCH_DECOMPRESSED_BYTES); this one waits for a later batch",
                    budget.total
                )));
                continue;
            }
            let frame = if glue_whole && schema.is_ok() {
                match glue_frame(&frame.body, max_datum) {
                    Ok(f) => {
                        if let Cow::Owned(b) = &f.body {
                            budget.left = budget.left.saturating_sub(b.len());
                        }
                        f
                    }
                    Err(e) => {
                        *rejected = Some(reject(e.reason(), e.to_string()));
                        out.push(Decoded::Raw);
                        continue;
                    }
                }
            } else {
                frame
            };
            let decoded = schema.as_ref().map(|schema| match source {
                None => schema.decode(frame.schema_id, &frame.body),
                // The mapping's word for the format must be the schema's.
                Some(format) if format != schema.kind() => Err(PayloadError::SchemaMismatch {
                    schema_id: frame.schema_id,
                    message: format!(
                        "the event source mapping says the value is {format}, but schema {} is {}",
                        frame.schema_id,
                        schema.kind()
                    ),
                }),
                Some(_) => schema.decode_source(frame.schema_id, &frame.body),
            });
            match decoded {
                Ok(decoded) => match decoded {
                    Ok(v) => out.push(Decoded::Value(v)),
                    Err(e) => {
                        *rejected = Some(reject(e.reason(), e.to_string()));
                        out.push(Decoded::Raw);
                    }
                },
                Err(e) => match e.reason() {
                    Some(reason) => {
                        *rejected = Some(reject(reason, e.to_string()));
                        out.push(Decoded::Raw);
                    }
                    None => out.push(Decoded::Unavailable(e.to_string())),
                },
            }
        }
        out
    }
}

/// A value framed as `format` says: Confluent's frame split, or Glue's header checked
/// and the value kept whole (its datum is decompressed when it is decoded).
fn frame(format: ValueFormat, value: &[u8]) -> Result<Framed<'_>, PayloadError> {
    match format {
        ValueFormat::Glue { .. } => {
            glue_header(value).map(|(schema_id, _)| Framed { schema_id, body: Cow::Borrowed(value) })
        }
        _ => confluent_frame(value),
    }
}

/// A value an event source mapping passed on as `SOURCE`: the datum without its frame
/// (for Protobuf, without message indexes too: the file's first message), its schema
/// named by the record's metadata (a Confluent registry's numeric id, or a Glue schema
/// version's UUID), and the format the metadata names.
fn unframed<'v>(meta: &SchemaMetadata, value: &'v [u8]) -> Result<(Framed<'v>, Option<&'static str>), Rejection> {
    let Some(format) =
        ["AVRO", "JSON", "PROTOBUF"].into_iter().find(|f| meta.data_format.trim().eq_ignore_ascii_case(f))
    else {
        return Err(reject(
            "schema_unsupported",
            format!(
                "the event source mapping says the value is {}; Avro, JSON Schema and Protobuf are decoded here",
                meta.data_format
            ),
        ));
    };
    match SchemaId::parse(&meta.schema_id) {
        Some(schema_id) => Ok((Framed { schema_id, body: Cow::Borrowed(value) }, Some(format))),
        None => Err(reject(
            "schema_unsupported",
            format!(
                "schema id `{}` is neither a Confluent registry's number nor an AWS Glue schema version's UUID",
                exactly_once_core::msk::cut(&meta.schema_id, 64)
            ),
        )),
    }
}

/// Whether `v` can be JSON text: its first byte past whitespace starts a JSON value.
fn looks_like_json(v: &[u8]) -> bool {
    v.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| matches!(b, b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n'))
}

fn reject(reason: &'static str, error: String) -> Rejection {
    Rejection { reason: DeadLetterReason::Undecodable(reason), error }
}
