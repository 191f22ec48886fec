//! Publishing to Kafka with an `idempotency_key` header on every message (seed 001,
//! step 4): the consumer's first id strategy reads it, so a re-sent message is
//! recognised as the same event.

use std::time::Duration;

use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::event_id::IDEMPOTENCY_KEY_HEADER;
use crate::kafka_client::KafkaContext;

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("Kafka producer for {brokers}: {message}")]
    Create { brokers: String, message: String },
    #[error("Kafka: publishing to `{topic}` failed: {message}")]
    Send { topic: String, message: String },
}

/// A fresh idempotency key (UUID v4).
pub fn idempotency_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub struct Producer {
    inner: FutureProducer<KafkaContext>,
}

impl Producer {
    /// An idempotent producer (`acks=all`): the broker drops its own retries.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, ProduceError> {
        let inner = crate::kafka_client::client_config(kafka)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", kafka.produce_timeout.as_millis().to_string())
            .create_with_context(KafkaContext::new(kafka))
            .map_err(|e| ProduceError::Create { brokers: kafka.brokers.clone(), message: e.to_string() })?;
        Ok(Self { inner })
    }

    /// Publishes `value` with its `idempotency_key` header (a new key when `None`).
    /// Returns the partition and offset it landed at.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: &[u8],
        idempotency_key: Option<&str>,
    ) -> Result<(i32, i64), ProduceError> {
        let generated;
        let id = match idempotency_key {
            Some(k) => k,
            None => {
                generated = self::idempotency_key();
                &generated
            }
        };
        let headers =
            OwnedHeaders::new().insert(KafkaHeader { key: IDEMPOTENCY_KEY_HEADER, value: Some(id.as_bytes()) });
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).payload(value).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        let delivery = self.inner.send(record, Duration::from_secs(5)).await;
        delivery
            .map(|d| (d.partition, d.offset))
            .map_err(|(e, _)| ProduceError::Send { topic: topic.to_owned(), message: e.to_string() })
    }
}
