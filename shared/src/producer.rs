//! Publishing to Kafka with an `idempotency_key` header on every message: the consumer's
//! first id strategy reads it, so a message the producer sends again (a retry after a
//! timeout) is recognised as the same event.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::event_id::IDEMPOTENCY_KEY_HEADER;
use crate::kafka_client::KafkaContext;

/// A message was not published.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The producer could not be made.
    #[error("Kafka producer for {brokers}: {source}")]
    Create {
        /// The bootstrap servers it was given.
        brokers: String,
        /// What rdkafka said.
        #[source]
        source: Box<KafkaError>,
    },
    /// The broker did not take the message; `kind` says whether it is the message's fault.
    #[error("Kafka: publishing to `{topic}` failed ({}): {source}", kind.label())]
    Send {
        /// The topic it was sent to.
        topic: String,
        /// Whether the message or Kafka is at fault.
        kind: SendFailure,
        /// What rdkafka said.
        #[source]
        source: Box<KafkaError>,
    },
}

impl ProduceError {
    /// What a failed send says: about this message, or about Kafka. `Create` is Kafka's.
    pub fn kind(&self) -> SendFailure {
        match self {
            ProduceError::Create { .. } => SendFailure::Unavailable,
            ProduceError::Send { kind, .. } => *kind,
        }
    }
}

/// Why one message was not published, as far as it matters to the caller: whether
/// sending it again can help, and whether it says anything about Kafka's health.
///
/// The split exists for the outbox relay: a message Kafka refuses on its own merits
/// (too large, a topic that does not exist or that we may not write to, a record the
/// broker finds invalid) fails the same way on every attempt while every other message
/// goes through. Counting it against the Kafka breaker would keep the breaker open (and
/// the worker not ready) for as long as that one message is queued, so it is counted
/// against the message instead, which is dead-lettered after a few attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFailure {
    /// This message is refused as it is; the label says why (`message_too_large`,
    /// `unknown_topic`, `invalid_topic`, `not_authorised`, `invalid_record`).
    Rejected(&'static str),
    /// Kafka could not take messages at all (unreachable, timing out, refusing this
    /// client): feeds the breaker; the message waits and is sent again.
    Unavailable,
    /// Neither: the message itself is fine and Kafka answered (another record of the
    /// same broker batch was the invalid one). Sent again, counted nowhere.
    Retry,
}

impl SendFailure {
    /// The label used in metrics and logs: the refusal's reason, `unavailable` or
    /// `retry`.
    pub fn label(&self) -> &'static str {
        match self {
            SendFailure::Rejected(reason) => reason,
            SendFailure::Unavailable => "unavailable",
            SendFailure::Retry => "retry",
        }
    }

    /// Classifies a librdkafka error code. Every code that means "this message" is
    /// listed; whatever else librdkafka may report (timeouts, transport, broker and
    /// leader unavailability, authentication of the client, fatal producer state,
    /// codes we have not seen) counts as unavailability: it never dead-letters a
    /// message, at worst it opens the breaker and the message waits.
    pub fn of_code(code: RDKafkaErrorCode) -> Self {
        use RDKafkaErrorCode as C;
        match code {
            C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge => {
                SendFailure::Rejected("message_too_large")
            }
            C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition => {
                SendFailure::Rejected("unknown_topic")
            }
            C::InvalidTopic => SendFailure::Rejected("invalid_topic"),
            // Not allowed to write this topic. Cluster-wide refusals (authentication,
            // ClusterAuthorizationFailed for the idempotent producer) stop every
            // message alike: those are Kafka being unusable, below.
            C::TopicAuthorizationFailed => SendFailure::Rejected("not_authorised"),
            C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTimestamp
            | C::UnsupportedForMessageFormat
            | C::PolicyViolation => SendFailure::Rejected("invalid_record"),
            C::InvalidDifferentRecord => SendFailure::Retry,
            // Listed for the reader; the catch-all below says the same.
            C::MessageTimedOut
            | C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::Resolve
            | C::TimedOutQueue
            | C::OperationTimedOut
            | C::RequestTimedOut
            | C::NetworkException
            | C::BrokerNotAvailable
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::KafkaStorageError
            | C::QueueFull
            | C::ThrottlingQuotaExceeded
            | C::SSL
            | C::Authentication
            | C::SaslAuthenticationFailed
            | C::ClusterAuthorizationFailed
            | C::Fatal => SendFailure::Unavailable,
            _ => SendFailure::Unavailable,
        }
    }

    /// Classifies an rdkafka error (one without a code, such as a cancelled delivery,
    /// says nothing about the message: unavailable).
    pub fn of(error: &KafkaError) -> Self {
        error.rdkafka_error_code().map(Self::of_code).unwrap_or(SendFailure::Unavailable)
    }
}

/// A fresh idempotency key (UUID v4).
pub fn idempotency_key() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Publishes messages to Kafka (the outbox relay, `eo produce`).
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
            .map_err(|e| ProduceError::Create { brokers: kafka.brokers.clone(), source: Box::new(e) })?;
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
        delivery.map(|d| (d.partition, d.offset)).map_err(|(e, _)| ProduceError::Send {
            topic: topic.to_owned(),
            kind: SendFailure::of(&e),
            source: Box::new(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_message_refusals_are_told_apart_from_an_unavailable_kafka() {
        use RDKafkaErrorCode as C;
        for (code, reason) in [
            (C::MessageSizeTooLarge, "message_too_large"),
            (C::UnknownTopicOrPartition, "unknown_topic"),
            (C::UnknownTopic, "unknown_topic"),
            (C::UnknownPartition, "unknown_topic"),
            (C::InvalidTopic, "invalid_topic"),
            (C::TopicAuthorizationFailed, "not_authorised"),
            (C::InvalidRecord, "invalid_record"),
        ] {
            assert_eq!(SendFailure::of_code(code), SendFailure::Rejected(reason), "{code:?}");
        }
        for code in [
            C::MessageTimedOut,
            C::AllBrokersDown,
            C::BrokerTransportFailure,
            C::RequestTimedOut,
            C::NotLeaderForPartition,
            C::ClusterAuthorizationFailed,
            C::SaslAuthenticationFailed,
            C::Fatal,
            C::Unknown,
        ] {
            assert_eq!(SendFailure::of_code(code), SendFailure::Unavailable, "{code:?}");
        }
        assert_eq!(SendFailure::of_code(C::InvalidDifferentRecord), SendFailure::Retry);
        assert_eq!(SendFailure::of(&KafkaError::Canceled), SendFailure::Unavailable);
        let e = KafkaError::MessageProduction(C::MessageSizeTooLarge);
        assert_eq!(SendFailure::of(&e).label(), "message_too_large");
    }
}
