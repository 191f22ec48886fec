//! End to end: the worker consuming from the broker into ClickHouse with the guard,
//! against the same consume-decode-insert-commit pipeline with the guard switched off.
//! Both read the same stream (published to two topics); timing runs from the first
//! record handled to the last, so the consumer group join is not counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_once::config::{KafkaConfig, ProcessEnv, WorkerConfig};
use exactly_once::kafka_client::{client_config, KafkaContext};
use exactly_once::metrics::metrics;
use exactly_once::producer::Producer;
use exactly_once::runtime::worker::create_topics;
use exactly_once::runtime::{Functions, Worker};
use exactly_once::sink::SinkBatch;
use exactly_once::{Clients, Event, Handler};
use futures::StreamExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use user_events::{UserEvent, UserEventRow, UserEvents};

use crate::stats::Samples;
use crate::{row, stream, Row};

/// Publishes `events` to `topic` (created if missing), keyed and tagged by their ids.
pub(crate) async fn publish(kafka: &KafkaConfig, topic: &str, events: &[Event]) -> anyhow::Result<()> {
    create_topics(kafka, &[topic.to_owned()]).await?;
    let producer = Producer::new(kafka)?;
    for chunk in events.chunks(500) {
        let sends = chunk.iter().map(|e| {
            let id = e.header("idempotency_key").and_then(|h| h.value.as_deref()).unwrap_or_default();
            producer.send(topic, Some(id), e.value_bytes(), Some(std::str::from_utf8(id).unwrap_or_default()))
        });
        for r in futures::future::join_all(sends).await {
            r?;
        }
    }
    Ok(())
}

fn kafka(name: &str, variant: &str) -> anyhow::Result<KafkaConfig> {
    let mut k = KafkaConfig::from_env(&ProcessEnv)?;
    k.topic_prefix = format!("{name}.{variant}.");
    k.group_id = format!("{name}-{variant}");
    k.topic_partitions = 3;
    Ok(k)
}

/// Records of `user-events` handled in this process so far (processed or deduplicated).
pub(crate) fn handled() -> u64 {
    let m = metrics();
    m.processed.with_label_values(&["user-events"]).get() + m.deduplicated.with_label_values(&["user-events"]).get()
}

/// Returns (with the guard, without it).
pub async fn compare(clients: &Clients, name: &str, n: usize, seed: u64) -> anyhow::Result<(Row, Row)> {
    let events = stream(n, 0.25, seed + 1);

    // With the guard: the real worker.
    let k = kafka(name, "with")?;
    let topic = k.topic(user_events::TOPICS[0]);
    eprintln!("[bench] e2e: publishing {n} messages for the guarded worker");
    publish(&k, &topic, &events).await?;
    let functions = Arc::new(Functions::new(clients, vec![Arc::new(UserEvents) as Arc<dyn Handler>], &k).await?);
    let mut config = WorkerConfig::from_env(&ProcessEnv)?;
    config.batch_size = 500;
    let before = handled();
    let worker = Worker::start(clients, functions, &k, &config).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    while handled() - before < n as u64 {
        anyhow::ensure!(Instant::now() < deadline, "guarded worker did not finish");
        if first.is_none() && handled() > before {
            first = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let with_took = first.map_or(Duration::ZERO, |f| f.elapsed());
    worker.shutdown().await;
    let with = row("e2e with guard", 500, n, with_took, &Samples::default(), 0.0, 0.0);

    // Without: consume, decode, insert into ClickHouse, commit.
    let k = kafka(name, "without")?;
    let topic = k.topic(user_events::TOPICS[0]);
    eprintln!("[bench] e2e: publishing {n} messages for the unguarded pipeline");
    publish(&k, &topic, &events).await?;
    let consumer: StreamConsumer<KafkaContext> = client_config(&k)
        .set("group.id", &k.group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .create_with_context(KafkaContext::new(&k))?;
    consumer.subscribe(&[&topic])?;
    // Batches of what has arrived (at most 500), as the worker takes them.
    let mut chunks = consumer.stream().ready_chunks(500);
    let mut done = 0usize;
    let mut first = None;
    let mut batch_no = 0u64;
    while done < n {
        let chunk = tokio::time::timeout(Duration::from_secs(120), chunks.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("consumer stream ended"))?;
        first.get_or_insert_with(Instant::now);
        let mut rows = SinkBatch::default();
        let mut offsets = TopicPartitionList::new();
        for m in chunk {
            let m = m?;
            let id = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "idempotency_key").and_then(|h| h.value))
                .unwrap_or_default();
            let e: UserEvent = serde_json::from_slice(m.payload().unwrap_or_default())?;
            rows.push(
                user_events::TABLE,
                UserEventRow {
                    event_id: String::from_utf8_lossy(id).into_owned(),
                    user_id: e.user_id,
                    kind: e.kind,
                    email: e.email,
                    name: e.name,
                    occurred_at: e.occurred_at.unwrap_or(0),
                    topic: m.topic().to_owned(),
                    kafka_partition: m.partition(),
                    kafka_offset: m.offset(),
                    version: m.offset() as u64,
                },
            )?;
            offsets.add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))?;
            done += 1;
        }
        batch_no += 1;
        clients.sink.write(&rows, &format!("unguarded-{batch_no}")).await?;
        consumer.commit(&offsets, CommitMode::Async)?;
    }
    let without_took = first.map_or(Duration::ZERO, |f| f.elapsed());
    let without = row("e2e without guard", 500, n, without_took, &Samples::default(), 0.0, 0.0);
    Ok((with, without))
}
