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
//!   stops receiving when the bound is reached; and one partition holds at most its cap
//!   (`WORKER_MAX_PARTITION_IN_FLIGHT`, by default a fair share of the bound): at the cap
//!   it is paused in the consumer until it has worked off half, so partitions stuck on a
//!   retry or an outage cannot take every slot and stop the others;
//! - a partition task that ends unexpectedly (not revoked, not stopping) is detected by
//!   the consume loop, which seeks the partition back to its last finished offset and
//!   starts a new task: the records the dead task held are read again, never skipped;
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
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
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

type TopicPartition = (String, i32);

/// The worker could not start consuming.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// No broker answered the start-up probe.
    #[error("Kafka at {brokers}: {source}; start it with scripts/services.sh or set KAFKA_BROKERS")]
    Unreachable {
        /// The brokers tried.
        brokers: String,
        /// What the client said.
        #[source]
        source: crate::BoxError,
    },
    /// A client could not be made or a call failed.
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The broker refused to create a topic.
    #[error("Kafka: cannot create topic `{topic}`: {code}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's error code.
        #[source]
        code: RDKafkaErrorCode,
    },
}

/// One in-flight slot: a permit of the `MAX_IN_FLIGHT_MESSAGES` bound and one unit of
/// the function's in-flight gauge, both given back when the slot is dropped (finished,
/// abandoned on revoke, or dropped at shutdown), so neither can drift.
struct InFlightPermit {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl InFlightPermit {
    fn new(permit: OwnedSemaphorePermit, function: &str) -> Self {
        let gauge = metrics().worker_in_flight.with_label_values(&[function]);
        gauge.inc();
        Self { _permit: permit, gauge }
    }
}

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// A record waiting in its partition's queue, holding one in-flight slot.
struct Item {
    event: Event,
    permit: InFlightPermit,
}

struct PartitionHandle {
    tx: mpsc::UnboundedSender<Item>,
    flow: Arc<Flow>,
    task: JoinHandle<()>,
    /// Offset of the first record handed to this task: where a replacement starts when
    /// the task dies before finishing anything.
    first: i64,
}

/// A partition's flow control, shared by the consume loop and the partition's task.
/// The partition is paused in the consumer while it holds its cap of records or waits
/// for the ClickHouse breaker, and resumed when neither holds.
struct Flow {
    key: TopicPartition,
    /// Records handed to the task and not finished yet.
    queued: AtomicUsize,
    /// (at its cap, waiting for the ClickHouse breaker)
    reasons: Mutex<(bool, bool)>,
    /// Revoked: the task takes nothing new, commits nothing, and pauses or resumes
    /// nothing (the partition may be someone else's, or a new task's, by now).
    fenced: AtomicBool,
}

impl Flow {
    fn new(key: TopicPartition) -> Self {
        Self { key, queued: AtomicUsize::new(0), reasons: Mutex::new((false, false)), fenced: AtomicBool::new(false) }
    }

    fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    fn set(&self, consumer: &KafkaConsumer, at_cap: Option<bool>, breaker: Option<bool>) {
        let mut reasons = lock(&self.reasons);
        if self.is_fenced() {
            return;
        }
        let was = reasons.0 || reasons.1;
        if let Some(c) = at_cap {
            reasons.0 = c;
        }
        if let Some(b) = breaker {
            reasons.1 = b;
        }
        let now = reasons.0 || reasons.1;
        if was == now {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.key.0, self.key.1);
        let result = if now { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
        if let Err(e) = result {
            tracing::warn!(topic = %self.key.0, partition = self.key.1, paused = now, error = %e, "could not pause or resume partition");
        }
    }
}

struct Shared {
    /// Partitions this member owns now.
    assigned: Mutex<HashSet<TopicPartition>>,
    /// The task of each partition that has received records.
    partitions: Mutex<HashMap<TopicPartition, PartitionHandle>>,
    /// Tasks of revoked partitions that may still be finishing a batch (fenced: they
    /// commit nothing). Kept so that stopping waits for them too: each holds the consumer.
    fenced: Mutex<Vec<JoinHandle<()>>>,
    /// Next offset to commit per partition: one past the highest contiguous finished.
    finished: Mutex<HashMap<TopicPartition, i64>>,
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
            fenced: Mutex::default(),
            finished: Mutex::default(),
            aborted: AtomicBool::new(false),
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
        }
    }

    /// Every partition task, the fenced ones included, leaving none behind.
    fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        let mut tasks: Vec<JoinHandle<()>> = lock(&self.partitions).drain().map(|(_, h)| h.task).collect();
        tasks.append(&mut lock(&self.fenced));
        tasks
    }

    fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }

    /// Most records one partition may hold: the configured cap, or a fair share that
    /// always leaves room for one more partition's records.
    fn partition_cap(&self, configured: usize) -> usize {
        if configured > 0 {
            return configured.min(self.max_in_flight);
        }
        (self.max_in_flight / (lock(&self.assigned).len() + 1)).max(1)
    }

    /// The commit list for `keys` (all when `None`) from what is finished.
    fn finished_list(&self, keys: Option<&[TopicPartition]>) -> TopicPartitionList {
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

/// The worker's consumer context: commits what revoked partitions finished, fences their
/// tasks, and supplies IAM tokens.
pub struct RebalanceContext {
    shared: Arc<Shared>,
    kafka: KafkaContext,
}

crate::client_context_serving_iam_tokens!(RebalanceContext);

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let keys: Vec<TopicPartition> = tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
        {
            let mut assigned = lock(&self.shared.assigned);
            let mut partitions = lock(&self.shared.partitions);
            for k in &keys {
                assigned.remove(k);
                if let Some(h) = partitions.remove(k) {
                    // Fenced: the task takes nothing new and will not commit again.
                    h.flow.fenced.store(true, Ordering::SeqCst);
                    let mut fenced = lock(&self.shared.fenced);
                    fenced.retain(|t| !t.is_finished());
                    fenced.push(h.task);
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
            let keys: Vec<TopicPartition> =
                tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect();
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
    /// Held so that the consumer is closed by `shutdown` or `abort`, off the async threads.
    consumer: Arc<KafkaConsumer>,
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
            Err((topic, code)) => return Err(WorkerError::CreateTopic { topic, code }),
        }
    }
    Ok(())
}

/// Fails fast when no broker answers within `timeout`.
pub async fn check_reachable(kafka: &KafkaConfig, timeout: Duration) -> Result<(), WorkerError> {
    let unreachable = |source: crate::BoxError| WorkerError::Unreachable { brokers: kafka.brokers.clone(), source };
    let probe: BaseConsumer<KafkaContext> =
        client_config(kafka).create_with_context(KafkaContext::new(kafka)).map_err(|e| unreachable(e.into()))?;
    tokio::task::spawn_blocking(move || probe.fetch_metadata(None, timeout).map(|_| ()))
        .await
        .map_err(|e| unreachable(e.into()))?
        .map_err(|e| unreachable(e.into()))
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
            .set("max.poll.interval.ms", kafka.max_poll_interval.max(kafka.session_timeout).as_millis().to_string())
            .create_with_context(RebalanceContext { shared: shared.clone(), kafka: KafkaContext::new(kafka) })?;
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topic_refs)?;
        tracing::info!(brokers = %kafka.brokers, group = %kafka.group_id, ?topics, "worker subscribed");

        let consumer = Arc::new(consumer);
        let (stop, stop_rx) = watch::channel(false);
        let main = tokio::spawn(consume(
            consumer.clone(),
            functions,
            shared.clone(),
            stop_rx,
            config.clone(),
            clients.clone(),
        ));
        Ok(Self { stop, main, shared, consumer })
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
        if let Err(e) = self.main.await {
            // The consumer loop died (a bug) before its graceful end: nothing was
            // committed or flushed by it, and its partition tasks still hold the consumer.
            tracing::error!(error = %e, "the worker's consumer loop ended abnormally; stopping its partition tasks");
            abort_all(self.shared.take_tasks()).await;
        }
        close_consumer(self.consumer).await;
    }

    /// Fault injection (tests, `eo-faults chaos`): ends the task of one partition as a bug in
    /// it would, without fencing it. The worker must notice and recover. Returns whether
    /// the partition had a task.
    #[doc(hidden)]
    pub fn kill_partition_task(&self, topic: &str, partition: i32) -> bool {
        match lock(&self.shared.partitions).get(&(topic.to_owned(), partition)) {
            Some(h) => {
                h.task.abort();
                true
            }
            None => false,
        }
    }

    /// Stops at once without committing anything more, like a crash, and returns once
    /// this member has left its consumer group (or after 30 s with an error logged, the
    /// close going on).
    ///
    /// Every task is aborted and awaited, so none is left holding the consumer, then the
    /// consumer is closed: the group learns at once that the member is gone, as it would
    /// after a crashed process's session timed out. Its close commits nothing (the
    /// revoke callback sees the abort). Returning only when it is closed lets a test
    /// start the next member knowing this one is out of the group: the test broker
    /// (Tansu 0.6) never finishes a rebalance whose leader leaves during it, so a new
    /// member that joined while this one was still leaving would wait forever.
    pub async fn abort(self) {
        let Worker { stop, main, shared, consumer } = self;
        shared.aborted.store(true, Ordering::SeqCst);
        main.abort();
        let _ = main.await;
        // The consumer loop is gone, so no partition task starts after this.
        abort_all(shared.take_tasks()).await;
        drop(stop);
        close_consumer(consumer).await;
    }
}

/// Aborts `tasks` and waits until each has ended (and dropped what it held).
async fn abort_all(tasks: Vec<JoinHandle<()>>) {
    for task in &tasks {
        task.abort();
    }
    futures::future::join_all(tasks).await;
}

/// Drops the last reference to the consumer off the async threads: its close blocks
/// until librdkafka has taken the member out of the group. Says so when that takes long
/// (the close goes on; the member stays in its group with its partitions until it ends).
async fn close_consumer(consumer: Arc<KafkaConsumer>) {
    let others = Arc::strong_count(&consumer) - 1;
    if others > 0 {
        tracing::error!(others, "closing the Kafka consumer while other references hold it: it closes when they end");
    }
    let closing = tokio::task::spawn_blocking(move || drop(consumer));
    match tokio::time::timeout(CONSUMER_CLOSE_WARNING, closing).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "closing the Kafka consumer failed"),
        Err(_) => tracing::error!(
            after_s = CONSUMER_CLOSE_WARNING.as_secs(),
            "the Kafka consumer has not closed yet: until it has, this member stays in its group with its partitions"
        ),
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
    // Partition tasks that died are looked for on every record and once a second, so a
    // partition that receives nothing more is recovered too.
    let mut check = tokio::time::interval(Duration::from_secs(1));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let received = tokio::select! {
            biased;
            _ = stop.changed() => break,
            _ = check.tick() => {
                recover_dead_tasks(&consumer, &shared, &functions);
                continue;
            }
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
        let permit = tokio::select! {
            biased;
            _ = stop.changed() => break,
            s = shared.in_flight.clone().acquire_owned() => s.expect("semaphore never closed"),
        };
        let key: TopicPartition = (event.topic.clone(), event.partition);
        if !lock(&shared.assigned).contains(&key) {
            // Delivered after its partition was revoked: its new owner reads it again.
            continue;
        }
        let Some(function) = functions.by_topic(&event.topic).cloned() else {
            tracing::error!(topic = %event.topic, "record from a topic no function consumes; not committing past it");
            continue;
        };
        let permit = InFlightPermit::new(permit, function.spec.name);
        let cap = shared.partition_cap(config.max_partition_in_flight);
        let offset = event.offset;
        let sent = {
            let mut partitions = lock(&shared.partitions);
            // Aborted: start nothing more (`abort()` also waits for this loop to end
            // before it empties this map, so no partition task escapes it).
            if shared.aborted.load(Ordering::SeqCst) {
                return;
            }
            if partitions.get(&key).is_some_and(|h| h.task.is_finished()) {
                None
            } else {
                let handle = partitions.entry(key.clone()).or_insert_with(|| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    let flow = Arc::new(Flow::new(key.clone()));
                    let task = tokio::spawn(run_partition(
                        PartitionTask {
                            key: key.clone(),
                            function,
                            consumer: consumer.clone(),
                            shared: shared.clone(),
                            flow: flow.clone(),
                            config: config.clone(),
                            clients: clients.clone(),
                        },
                        rx,
                        stop.clone(),
                    ));
                    PartitionHandle { tx, flow, task, first: offset }
                });
                let flow = handle.flow.clone();
                handle.tx.send(Item { event, permit }).ok().map(|()| flow)
            }
        };
        match sent {
            Some(flow) => {
                if flow.queued.fetch_add(1, Ordering::SeqCst) + 1 >= cap {
                    flow.set(&consumer, Some(true), None);
                }
            }
            // The partition's task is gone: this record (dropped here) is read again
            // after the seek back to the last finished offset.
            None => recover_dead_tasks(&consumer, &shared, &functions),
        }
    }

    // Graceful stop: closing the channels lets every partition task handle what it has
    // received and end; then commit and leave.
    let mut tasks = shared.take_tasks();
    if tokio::time::timeout(config.shutdown_timeout, futures::future::join_all(tasks.iter_mut())).await.is_err() {
        tracing::warn!(
            timeout_s = config.shutdown_timeout.as_secs(),
            "shutdown: batches still running; abandoning them"
        );
        // Abandoned, not left running: each holds the consumer, which closes (and this
        // member leaves its group) only when the last of them lets go. (A handle that
        // already answered must not be awaited again: only the unfinished ones are.)
        let stragglers: Vec<JoinHandle<()>> = tasks.into_iter().filter(|t| !t.is_finished()).collect();
        abort_all(stragglers).await;
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
    // The release steps that went out after their batches answered: the next owner of
    // these partitions finds the leases free and the done markers set.
    if tokio::time::timeout(
        config.shutdown_timeout,
        futures::future::join_all(functions.iter().map(|f| f.guard.flush_releases())),
    )
    .await
    .is_err()
    {
        tracing::warn!("shutdown: deferred lease releases still pending; they expire after their TTL");
    }
    consumer.unsubscribe();
    tracing::info!("worker stopped");
}

/// How long `Worker::shutdown` waits for the consumer to close before saying so.
const CONSUMER_CLOSE_WARNING: Duration = Duration::from_secs(30);

/// Finds partition tasks that ended although their partition is still ours and the
/// worker is not stopping (a bug, an abort), and recovers each partition: seek back to
/// its last finished offset (or the first record the task got), lift any pause, and let
/// the next record start a new task. Logged and counted: a partition never stops
/// without a word.
fn recover_dead_tasks(consumer: &KafkaConsumer, shared: &Shared, functions: &Functions) {
    if shared.aborted.load(Ordering::SeqCst) {
        return;
    }
    let dead: Vec<(TopicPartition, i64)> = {
        let mut partitions = lock(&shared.partitions);
        let keys: Vec<TopicPartition> = partitions
            .iter()
            .filter(|(_, h)| h.task.is_finished() && !h.flow.is_fenced())
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter().filter_map(|k| partitions.remove(&k).map(|h| (k, h.first))).collect()
    };
    for (key, first) in dead {
        let from = lock(&shared.finished).get(&key).copied().unwrap_or(first);
        let function = functions.by_topic(&key.0).map(|f| f.spec.name).unwrap_or("unknown");
        metrics().partition_restarts.with_label_values(&[function]).inc();
        tracing::error!(
            function,
            topic = %key.0,
            partition = key.1,
            from,
            "partition task ended unexpectedly; reading the partition again from its last finished offset"
        );
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition_offset(&key.0, key.1, Offset::Offset(from));
        if let Err(e) = consumer.seek_partitions(tpl, Duration::ZERO) {
            tracing::error!(topic = %key.0, partition = key.1, error = %e, "could not seek the partition back; its records are read again after the next rebalance");
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&key.0, key.1);
        if let Err(e) = consumer.resume(&tpl) {
            tracing::warn!(topic = %key.0, partition = key.1, error = %e, "could not resume the partition");
        }
    }
}

/// What a partition's task works with (besides its queue and the stop signal).
struct PartitionTask {
    key: TopicPartition,
    function: Arc<Function>,
    consumer: Arc<KafkaConsumer>,
    shared: Arc<Shared>,
    flow: Arc<Flow>,
    config: WorkerConfig,
    clients: Clients,
}

async fn run_partition(task: PartitionTask, mut rx: mpsc::UnboundedReceiver<Item>, mut stop: watch::Receiver<bool>) {
    let PartitionTask { key, function, consumer, shared, flow, config, clients } = task;
    let mut events: VecDeque<Event> = VecDeque::new();
    let mut permits: VecDeque<InFlightPermit> = VecDeque::new();
    let mut backoff = config.retry_backoff;
    let commit_list = |offset: i64| {
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition_offset(&key.0, key.1, Offset::Offset(offset));
        tpl
    };
    loop {
        if flow.is_fenced() {
            return;
        }
        if events.is_empty() {
            // On shutdown the consumer loop closes the channel: what was received is
            // still handled, then `recv` ends the task.
            let Some(item) = rx.recv().await else { return };
            events.push_back(item.event);
            permits.push_back(item.permit);
        }
        while events.len() < config.batch_size {
            match rx.try_recv() {
                Ok(item) => {
                    events.push_back(item.event);
                    permits.push_back(item.permit);
                }
                Err(_) => break,
            }
        }

        let n = events.len().min(config.batch_size);
        let batch = &events.make_contiguous()[..n];
        // The guard turns a handler's panic into that event's failure; a panic anywhere
        // else in the batch (a bug of ours) must not end the partition's task either.
        let report = match AssertUnwindSafe(
            function.guard.run_batch_deferring_release(function.handler.as_ref(), batch),
        )
        .catch_unwind()
        .await
        {
            Ok(report) => report,
            Err(_) => {
                tracing::error!(topic = %key.0, partition = key.1, first_offset = batch[0].offset, "the batch panicked outside the handlers; retrying it");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(config.retry_backoff_max);
                continue;
            }
        };
        let done = report.outcomes.iter().take_while(|o| o.outcome.is_finished()).count();

        if done > 0 && !flow.is_fenced() && !shared.aborted.load(Ordering::SeqCst) {
            let next = batch[done - 1].offset + 1;
            lock(&shared.finished).insert(key.clone(), next);
            if let Err(e) = consumer.commit(&commit_list(next), CommitMode::Async) {
                tracing::warn!(topic = %key.0, partition = key.1, error = %e, "commit failed; retried with the next batch");
            }
        }
        events.drain(..done);
        permits.drain(..done);
        let left = flow.queued.fetch_sub(done, Ordering::SeqCst).saturating_sub(done);
        if left <= shared.partition_cap(config.max_partition_in_flight) / 2 {
            flow.set(&consumer, Some(false), None);
        }

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
            flow.set(&consumer, None, Some(true));
            metrics().partition_pauses.with_label_values(&[function.spec.name]).inc();
            tokio::select! {
                _ = breaker.wait_for_probe() => {}
                _ = stop.changed() => return,
            }
            flow.set(&consumer, None, Some(false));
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
