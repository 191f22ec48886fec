//! The worker runtime: a Kafka consumer group member that runs the guard itself.
//!
//! One consumer receives records for every function's topics and hands each one to the
//! task of its partition. A partition task takes what has queued up (at most
//! `WORKER_BATCH_SIZE`), runs it as one guarded batch, and commits up to the end of the
//! finished prefix. The first unfinished record (failed, in flight elsewhere) and
//! everything after it are run again, so a partition's records are always fed in order
//! and its committed offset only ever covers finished records (records after the first
//! unfinished one that did finish come back as cheap local-cache duplicates).
//!
//! Invariants:
//! - offsets are committed manually (auto commit off), per partition, only up to the
//!   highest contiguous finished offset;
//! - at most `MAX_IN_FLIGHT_MESSAGES` records are received but unfinished: the consumer
//!   stops receiving when the bound is reached;
//! - on revoke, the revoked partitions are fenced (their tasks take nothing new and do
//!   not commit again), what they finished is committed synchronously inside the
//!   rebalance callback, and anything in flight is abandoned: its new owner re-reads it
//!   and the guard turns already-confirmed records into duplicates;
//! - when the ClickHouse breaker is open, a partition whose batch failed for it is
//!   paused in the consumer and resumed only when the breaker lets a probe through: no
//!   busy loop, no offset movement; an assigned partition always starts unpaused (a
//!   pause survives a revoke in librdkafka, and its fenced task cannot lift it);
//! - graceful stop: stop receiving, handle every record already received (retrying
//!   nothing), commit, leave the group. [`Worker::abort`] stops without committing
//!   anything (a crash, for tests).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::functions::{Function, Functions};
use crate::breaker::BreakerState;
use crate::clients::Clients;
use crate::config::{KafkaConfig, WorkerConfig};
use crate::event::{Event, Header};
use crate::kafka_client::KafkaContext;
use crate::metrics::metrics;
use crate::outcome::{FailureKind, Outcome};

type Key = (String, i32);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("Kafka at {brokers}: {message}; start it with scripts/services.sh or set KAFKA_BROKERS")]
    Unreachable { brokers: String, message: String },
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("Kafka: cannot create topic `{topic}`: {message}")]
    CreateTopic { topic: String, message: String },
}

/// One in-flight slot: a permit of the `MAX_IN_FLIGHT_MESSAGES` bound and one unit of
/// the function's in-flight gauge, both given back when the slot is dropped (finished,
/// abandoned on revoke, or dropped at shutdown), so neither can drift.
struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, function: &str) -> Self {
        let gauge = metrics().worker_in_flight.with_label_values(&[function]);
        gauge.inc();
        Self { _permit: permit, gauge }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A record waiting in its partition's queue, holding one in-flight slot.
struct Item {
    event: Event,
    slot: Slot,
}

struct PartitionHandle {
    tx: mpsc::UnboundedSender<Item>,
    fenced: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

struct Shared {
    /// Partitions this member owns now.
    assigned: Mutex<HashSet<Key>>,
    /// The task of each partition that has received records.
    partitions: Mutex<HashMap<Key, PartitionHandle>>,
    /// Next offset to commit per partition: one past the highest contiguous finished.
    finished: Mutex<HashMap<Key, i64>>,
    /// Set by `abort`: commit nothing more, as a crash would.
    aborted: AtomicBool,
    /// One permit per record that may be in flight.
    in_flight: Arc<Semaphore>,
    max_in_flight: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn new(max_in_flight: usize) -> Self {
        Self {
            assigned: Mutex::default(),
            partitions: Mutex::default(),
            finished: Mutex::default(),
            aborted: AtomicBool::new(false),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
        }
    }

    fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }

    /// The commit list for `keys` (all when `None`) from what is finished.
    fn finished_list(&self, keys: Option<&[Key]>) -> TopicPartitionList {
        let finished = lock(&self.finished);
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in finished.iter() {
            if keys.is_none_or(|k| k.contains(&(topic.clone(), *partition))) {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
            }
        }
        tpl
    }
}

pub struct RebalanceContext {
    shared: Arc<Shared>,
    kafka: KafkaContext,
}

impl ClientContext for RebalanceContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        self.kafka.generate_oauth_token(config)
    }
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let keys: Vec<Key> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        {
            let mut assigned = lock(&self.shared.assigned);
            let mut partitions = lock(&self.shared.partitions);
            for k in &keys {
                assigned.remove(k);
                if let Some(h) = partitions.remove(k) {
                    // Fenced: the task takes nothing new and will not commit again.
                    h.fenced.store(true, Ordering::SeqCst);
                }
            }
        }
        if self.shared.aborted.load(Ordering::SeqCst) {
            return;
        }
        let commit = self.shared.finished_list(Some(&keys));
        if commit.count() > 0 {
            match consumer.commit(&commit, CommitMode::Sync) {
                Ok(()) => tracing::info!(partitions = commit.count(), "revoked: committed finished offsets"),
                Err(e) => {
                    tracing::warn!(error = %e, "revoked: commit failed; the new owner re-reads and skips duplicates")
                }
            }
        }
        let mut finished = lock(&self.shared.finished);
        for k in &keys {
            finished.remove(k);
        }
        tracing::info!(?keys, "partitions revoked");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // librdkafka keeps a partition's pause across a revoke and a new assignment,
            // and the task that paused it was fenced before it could resume it: start
            // every assigned partition unpaused (a new task pauses it again if the
            // breaker is still open).
            if let Err(e) = consumer.resume(tpl) {
                tracing::warn!(error = %e, "could not resume newly assigned partitions");
            }
            let keys: Vec<Key> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
            lock(&self.shared.assigned).extend(keys.iter().cloned());
            tracing::info!(?keys, "partitions assigned");
        }
    }
}

type KafkaConsumer = StreamConsumer<RebalanceContext>;

/// A running worker.
pub struct Worker {
    stop: watch::Sender<bool>,
    main: JoinHandle<()>,
    shared: Arc<Shared>,
}

pub use crate::kafka_client::client_config;

/// Creates the topics that do not exist yet.
pub async fn create_topics(kafka: &KafkaConfig, topics: &[String]) -> Result<(), WorkerError> {
    let admin: AdminClient<KafkaContext> = client_config(kafka).create_with_context(KafkaContext::new(kafka))?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|t| NewTopic::new(t, kafka.topic_partitions, TopicReplication::Fixed(1))).collect();
    for result in
        admin.create_topics(&new, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))).await?
    {
        match result {
            Ok(topic) => tracing::info!(%topic, partitions = kafka.topic_partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(WorkerError::CreateTopic { topic, message: code.to_string() }),
        }
    }
    Ok(())
}

/// Fails fast when no broker answers within `timeout`.
pub async fn check_reachable(kafka: &KafkaConfig, timeout: Duration) -> Result<(), WorkerError> {
    let unreachable = |message: String| WorkerError::Unreachable { brokers: kafka.brokers.clone(), message };
    let probe: BaseConsumer<KafkaContext> =
        client_config(kafka).create_with_context(KafkaContext::new(kafka)).map_err(|e| unreachable(e.to_string()))?;
    tokio::task::spawn_blocking(move || probe.fetch_metadata(None, timeout).map(|_| ()))
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .map_err(|e| unreachable(e.to_string()))
}

impl Worker {
    /// Joins the consumer group and starts consuming every function's topics.
    pub async fn start(
        clients: &Clients,
        functions: Arc<Functions>,
        kafka: &KafkaConfig,
        config: &WorkerConfig,
    ) -> Result<Self, WorkerError> {
        check_reachable(kafka, Duration::from_secs(10)).await?;
        let topics = functions.topics();
        if kafka.create_topics {
            create_topics(kafka, &topics).await?;
        }
        let shared = Arc::new(Shared::new(config.max_in_flight));
        let heartbeat = (kafka.session_timeout / 10).max(Duration::from_millis(500));
        let consumer: KafkaConsumer = client_config(kafka)
            .set("group.id", &kafka.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", kafka.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", heartbeat.as_millis().to_string())
            .create_with_context(RebalanceContext { shared: shared.clone(), kafka: KafkaContext::new(kafka) })?;
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topic_refs)?;
        tracing::info!(brokers = %kafka.brokers, group = %kafka.group_id, ?topics, "worker subscribed");

        let consumer = Arc::new(consumer);
        let (stop, stop_rx) = watch::channel(false);
        let main = tokio::spawn(consume(consumer, functions, shared.clone(), stop_rx, config.clone(), clients.clone()));
        Ok(Self { stop, main, shared })
    }

    /// The partitions this member owns now, sorted.
    pub fn assigned(&self) -> Vec<(String, i32)> {
        let mut v: Vec<(String, i32)> = lock(&self.shared.assigned).iter().cloned().collect();
        v.sort();
        v
    }

    /// Records received and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// Graceful stop: no new records, running batches finish, finished offsets are
    /// committed, the group is left.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.main.await;
    }

    /// Stops at once without committing anything more, like a crash.
    pub fn abort(self) {
        self.shared.aborted.store(true, Ordering::SeqCst);
        self.main.abort();
        for (_, h) in lock(&self.shared.partitions).drain() {
            h.task.abort();
        }
    }
}

/// A received Kafka message as the event both runtimes hand to the guard.
pub fn to_event(m: &BorrowedMessage<'_>) -> Event {
    let mut e = Event::new(m.topic(), m.partition(), m.offset());
    e.timestamp_ms = m.timestamp().to_millis();
    e.key = m.key().map(Bytes::copy_from_slice);
    e.value = m.payload().map(Bytes::copy_from_slice);
    if let Some(headers) = m.headers() {
        e.headers = headers
            .iter()
            .map(|h| Header { name: h.key.to_owned(), value: h.value.map(Bytes::copy_from_slice) })
            .collect();
    }
    e
}

async fn consume(
    consumer: Arc<KafkaConsumer>,
    functions: Arc<Functions>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    config: WorkerConfig,
    clients: Clients,
) {
    let kafka_breaker = clients.kafka_breaker.clone();
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = consumer.recv() => m,
        };
        let event = match received {
            Ok(m) => to_event(&m),
            Err(e) => {
                tracing::warn!(error = %e, "Kafka receive error");
                if let Ok(p) = kafka_breaker.try_acquire() {
                    p.failure();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let slot = tokio::select! {
            biased;
            _ = stop.changed() => break,
            s = shared.in_flight.clone().acquire_owned() => s.expect("semaphore never closed"),
        };
        let key: Key = (event.topic.clone(), event.partition);
        if !lock(&shared.assigned).contains(&key) {
            // Delivered after its partition was revoked: its new owner reads it again.
            continue;
        }
        let Some(function) = functions.by_topic(&event.topic).cloned() else {
            tracing::error!(topic = %event.topic, "record from a topic no function consumes; not committing past it");
            continue;
        };
        let slot = Slot::new(slot, function.spec.name);
        let mut partitions = lock(&shared.partitions);
        let handle = partitions.entry(key.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let fenced = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(run_partition(
                key.clone(),
                rx,
                function,
                consumer.clone(),
                shared.clone(),
                fenced.clone(),
                stop.clone(),
                config.clone(),
                clients.clone(),
            ));
            PartitionHandle { tx, fenced, task }
        });
        let _ = handle.tx.send(Item { event, slot });
    }

    // Graceful stop: closing the channels lets every partition task handle what it has
    // received and end; then commit and leave.
    let tasks: Vec<JoinHandle<()>> = lock(&shared.partitions).drain().map(|(_, h)| h.task).collect();
    if tokio::time::timeout(config.shutdown_timeout, futures::future::join_all(tasks)).await.is_err() {
        tracing::warn!(
            timeout_s = config.shutdown_timeout.as_secs(),
            "shutdown: batches still running; abandoning them"
        );
    }
    if !shared.aborted.load(Ordering::SeqCst) {
        let commit = shared.finished_list(None);
        if commit.count() > 0 {
            let c = consumer.clone();
            match tokio::task::spawn_blocking(move || c.commit(&commit, CommitMode::Sync)).await {
                Ok(Ok(())) => tracing::info!("shutdown: committed finished offsets"),
                Ok(Err(e)) => tracing::warn!(error = %e, "shutdown: final commit failed"),
                Err(e) => tracing::warn!(error = %e, "shutdown: final commit task failed"),
            }
        }
    }
    consumer.unsubscribe();
    tracing::info!("worker stopped");
}

#[allow(clippy::too_many_arguments)]
async fn run_partition(
    key: Key,
    mut rx: mpsc::UnboundedReceiver<Item>,
    function: Arc<Function>,
    consumer: Arc<KafkaConsumer>,
    shared: Arc<Shared>,
    fenced: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
    config: WorkerConfig,
    clients: Clients,
) {
    let mut events: VecDeque<Event> = VecDeque::new();
    let mut slots: VecDeque<Slot> = VecDeque::new();
    let mut backoff = config.retry_backoff;
    let tpl_of = |offset: Option<i64>| {
        let mut tpl = TopicPartitionList::new();
        match offset {
            Some(o) => {
                let _ = tpl.add_partition_offset(&key.0, key.1, Offset::Offset(o));
            }
            None => {
                tpl.add_partition(&key.0, key.1);
            }
        }
        tpl
    };
    loop {
        if fenced.load(Ordering::SeqCst) {
            return;
        }
        if events.is_empty() {
            // On shutdown the consumer loop closes the channel: what was received is
            // still handled, then `recv` ends the task.
            let Some(item) = rx.recv().await else { return };
            events.push_back(item.event);
            slots.push_back(item.slot);
        }
        while events.len() < config.batch_size {
            match rx.try_recv() {
                Ok(item) => {
                    events.push_back(item.event);
                    slots.push_back(item.slot);
                }
                Err(_) => break,
            }
        }

        let n = events.len().min(config.batch_size);
        let batch = &events.make_contiguous()[..n];
        let report = function.guard.run_batch(function.handler.as_ref(), batch, None).await;
        let done = report.outcomes.iter().take_while(|o| o.outcome.is_finished()).count();

        if done > 0 && !fenced.load(Ordering::SeqCst) && !shared.aborted.load(Ordering::SeqCst) {
            let next = batch[done - 1].offset + 1;
            lock(&shared.finished).insert(key.clone(), next);
            if let Err(e) = consumer.commit(&tpl_of(Some(next)), CommitMode::Async) {
                tracing::warn!(topic = %key.0, partition = key.1, error = %e, "commit failed; retried with the next batch");
            }
        }
        events.drain(..done);
        slots.drain(..done);

        if done == n {
            backoff = config.retry_backoff;
            continue;
        }
        if *stop.borrow() {
            // Shutting down: no more retries; the next owner picks these up.
            return;
        }
        let first = &report.outcomes[done].outcome;
        let clickhouse_down = matches!(first, Outcome::Failed { kind: FailureKind::Unavailable, .. })
            && clients.sink.breaker().state() == BreakerState::Open;
        if clickhouse_down {
            let breaker = clients.sink.breaker().clone();
            tracing::warn!(topic = %key.0, partition = key.1, "ClickHouse breaker open: pausing partition until a probe is allowed");
            let _ = consumer.pause(&tpl_of(None));
            metrics().partition_pauses.with_label_values(&[function.spec.name]).inc();
            tokio::select! {
                _ = breaker.wait_for_probe() => {}
                _ = stop.changed() => return,
            }
            if !fenced.load(Ordering::SeqCst) {
                let _ = consumer.resume(&tpl_of(None));
            }
        } else {
            tracing::debug!(topic = %key.0, partition = key.1, outcome = %first, backoff_ms = backoff.as_millis() as u64, "retrying unfinished records");
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(config.retry_backoff_max);
        }
    }
}
