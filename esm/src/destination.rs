//! Where records go that the mapping gives up on (retries or age exhausted): Lambda's
//! on-failure destination. Only destinations that keep the records themselves are
//! offered (a Kafka topic, or a directory standing in for S3); SQS and SNS get metadata
//! only in AWS, which is why the template does not use them.

use std::path::PathBuf;
use std::time::Duration;

use exactly_once::config::KafkaConfig;
use exactly_once::kafka_client::{client_config, KafkaContext};
use exactly_once_core::event::Event;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;

use crate::batch::DiscardReason;

/// Why the destination could not be set up, or could not take records.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// The `--on-failure-destination` value is neither `kafka://<topic>` nor
    /// `file://<directory>`.
    #[error("--on-failure-destination {0:?}: use kafka://<topic> or file://<directory>")]
    Invalid(String),
    /// The destination could not be set up or could not take the records.
    #[error("on-failure destination {target}: {source}")]
    Write {
        /// The destination as given.
        target: String,
        /// What the producer or the file system said.
        #[source]
        source: exactly_once::BoxError,
    },
}

/// Lambda's on-failure destination: where discarded records go
/// (`--on-failure-destination`).
pub enum Destination {
    /// Discarded records are logged, and lost.
    None,
    /// `kafka://<topic>`: the records themselves, re-produced to a topic with headers
    /// naming why.
    Kafka {
        /// The topic the records go to.
        topic: String,
        /// An idempotent producer (`acks=all`).
        producer: FutureProducer<KafkaContext>,
    },
    /// `file://<directory>`: a JSON failure record per discarded batch, as an S3
    /// destination gets.
    Directory(PathBuf),
}

impl Destination {
    /// The destination named by `spec` (empty: none); a `file://` directory is created if
    /// missing.
    pub fn parse(spec: &str, kafka: &KafkaConfig) -> Result<Self, DestinationError> {
        if spec.is_empty() {
            return Ok(Self::None);
        }
        if let Some(topic) = spec.strip_prefix("kafka://").filter(|t| !t.is_empty()) {
            let producer = client_config(kafka)
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .create_with_context(KafkaContext::new(kafka))
                .map_err(|e| DestinationError::Write { target: spec.into(), source: e.into() })?;
            return Ok(Self::Kafka { topic: topic.to_owned(), producer });
        }
        if let Some(dir) = spec.strip_prefix("file://").filter(|d| !d.is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| DestinationError::Write { target: spec.into(), source: e.into() })?;
            return Ok(Self::Directory(dir.into()));
        }
        Err(DestinationError::Invalid(spec.into()))
    }

    /// Sends discarded records on. Until this succeeds, the caller must not commit past
    /// them.
    pub async fn send(
        &self,
        function: &str,
        reason: DiscardReason,
        error: &str,
        records: &[Event],
    ) -> Result<(), DestinationError> {
        match self {
            Self::None => {
                let positions: Vec<String> = records.iter().map(Event::position).collect();
                tracing::error!(
                    function,
                    condition = reason.condition(),
                    records = records.len(),
                    ?positions,
                    last_error = error,
                    "records DISCARDED and lost: no on-failure destination is configured"
                );
                Ok(())
            }
            Self::Kafka { topic, producer } => {
                for e in records {
                    let mut headers = OwnedHeaders::new();
                    for h in &e.headers {
                        headers = headers.insert(Header { key: &h.name, value: h.value.as_deref() });
                    }
                    headers = headers.insert(Header { key: "x-esm-condition", value: Some(reason.condition()) });
                    headers = headers.insert(Header { key: "x-esm-source", value: Some(e.position().as_str()) });
                    let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).headers(headers);
                    if let Some(k) = &e.key {
                        record = record.key(k.as_ref());
                    }
                    if let Some(v) = &e.value {
                        record = record.payload(v.as_ref());
                    }
                    producer.send(record, Duration::from_secs(30)).await.map_err(|(err, _)| {
                        DestinationError::Write { target: format!("kafka://{topic}"), source: err.into() }
                    })?;
                }
                tracing::warn!(function, condition = reason.condition(), records = records.len(), %topic, "records sent to the on-failure destination");
                Ok(())
            }
            Self::Directory(dir) => {
                let first = records.first().map(Event::position).unwrap_or_default();
                let record = json!({
                    "requestContext": {
                        "functionArn": format!("arn:aws:lambda:us-east-1:000000000000:function:{function}"),
                        "condition": reason.condition(),
                    },
                    "responseContext": { "functionError": error },
                    "version": "1.0",
                    "timestamp": chrono_like_now(),
                    "payload": exactly_once_core::msk::encode(records),
                });
                let path =
                    dir.join(format!("{}-{}.json", first.replace(['/', '@'], "_"), uuid::Uuid::new_v4().simple()));
                tokio::fs::write(&path, serde_json::to_vec_pretty(&record).unwrap_or_default()).await.map_err(|e| {
                    DestinationError::Write { target: format!("file://{}", dir.display()), source: e.into() }
                })?;
                tracing::warn!(function, condition = reason.condition(), records = records.len(), path = %path.display(), "records written to the on-failure destination");
                Ok(())
            }
        }
    }
}

/// Milliseconds since the epoch, as text (the failure record's timestamp).
fn chrono_like_now() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
    ms.to_string()
}
