//! End to end: the worker consuming from the broker into ClickHouse with the guard,
//! against the same worker with a pass-through guard that checks nothing. Both read the
//! same stream (published to two topics); timing runs from the first record handled to
//! the last, so the consumer group join is not counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_once::config::{KafkaConfig, ProcessEnv, WorkerConfig};
use exactly_once::metrics::metrics;
use exactly_once::producer::Producer;
use exactly_once::runtime::worker::create_topics;
use exactly_once::runtime::{Functions, Worker};
use exactly_once::{Clients, Event, Handler};
use user_events::UserEvents;

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

/// Runs the worker over `n` records of `user-events` (published first to its own
/// topic), and returns its row: timed from the first record handled to the last, so the
/// consumer group's join is not counted.
async fn worker_run(
    clients: &Clients,
    name: &str,
    variant: &str,
    events: &[Event],
    pass_through: bool,
) -> anyhow::Result<Row> {
    let n = events.len();
    let k = kafka(name, &variant.replace(' ', "-"))?;
    let topic = k.topic(user_events::TOPICS[0]);
    eprintln!("[bench] e2e: publishing {n} messages for the {variant} worker");
    publish(&k, &topic, events).await?;
    let handlers = vec![Arc::new(UserEvents) as Arc<dyn Handler>];
    let functions = Arc::new(if pass_through {
        Functions::pass_through(clients, handlers, &k).await?
    } else {
        Functions::new(clients, handlers, &k).await?
    });
    let mut config = WorkerConfig::from_env(&ProcessEnv)?;
    config.batch_size = 500;
    let before = handled();
    let worker = Worker::start(clients, functions, &k, &config).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut first = None;
    while handled() - before < n as u64 {
        anyhow::ensure!(Instant::now() < deadline, "the {variant} worker did not finish");
        if first.is_none() && handled() > before {
            first = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = first.map_or(Duration::ZERO, |f| f.elapsed());
    worker.shutdown().await;
    Ok(row(&format!("e2e {variant}"), 500, n, took, &Samples::default(), 0.0, 0.0))
}

/// Returns (with the guard, pass-through): the same worker, concurrency, batch size,
/// handler and sink over the same stream, once with the guard and once with a guard
/// that checks nothing ([`Functions::pass_through`]: every record handled, its rows
/// written, no lease, no ledger). The difference is the guard alone. The pass-through
/// writes the duplicates' rows again (they collapse in ClickHouse), as a pipeline
/// without a guard would.
pub async fn compare(clients: &Clients, name: &str, n: usize, seed: u64) -> anyhow::Result<(Row, Row)> {
    let events = stream(n, 0.25, seed + 1);
    let with = worker_run(clients, name, "with guard", &events, false).await?;
    let without = worker_run(clients, name, "pass-through", &events, true).await?;
    Ok((with, without))
}
