//! A local Amazon MSK event source mapping: it does what Lambda's pollers do, so a
//! function binary runs in Lambda mode, fed from Kafka exactly as MSK triggers it
//! (`sam local` has no MSK polling).
//!
//! One mapping is one consumer group member and one execution environment (concurrency
//! one): it gathers records into a batch (`BatchSize`, `MaximumBatchingWindowInSeconds`,
//! the 6 MB payload limit), invokes the function through the Lambda Runtime API with the
//! MSK event JSON, and acts on the answer:
//! - success: every record's offset is committed;
//! - an error, a timeout (the process is killed and started again), a crash, an answer
//!   that cannot be read: the whole batch is retried (halved first with
//!   `BisectBatchOnFunctionError`);
//! - with `ReportBatchItemFailures`, `batchItemFailures`: per partition, records before
//!   the lowest failed offset are committed, the rest are retried;
//! - retries past `MaximumRetryAttempts`, or failed records older than
//!   `MaximumRecordAgeInSeconds`, go to the on-failure destination and are committed
//!   past; without a destination they are logged as lost.
//!
//! Invariants:
//! - an offset is committed only past records that succeeded or were handed to the
//!   destination (a destination write that fails stops the mapping uncommitted);
//! - a partition's records are invoked in offset order and never skipped (see `batch`);
//! - a failing function is retried after a growing pause (200 ms doubling to 5 s; AWS
//!   does not document its own), never in a busy loop;
//! - a function that cannot start `--max-init-failures` times in a row stops the
//!   mapping with its exit status and last output, rather than retrying in silence.

#![warn(missing_docs)]

pub mod batch;
pub mod destination;
pub mod function;
pub mod settings;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use exactly_once::config::KafkaConfig;
use exactly_once::kafka_client::{client_config, KafkaContext};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

pub use batch::{Batch, BatchRules, PartitionKey, Pending, Verdict};
pub use destination::Destination;
pub use function::{Answer, Function, FunctionSpec, FunctionStats};
pub use settings::MappingSettings;

/// Why the mapping could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum EsmError {
    /// The Kafka consumer could not be created or could not subscribe.
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// No broker answered the start-up probe.
    #[error(transparent)]
    Unreachable(#[from] exactly_once::runtime::worker::WorkerError),
    /// The on-failure destination is invalid, could not be set up, or failed a write.
    #[error("{0}")]
    Destination(#[from] destination::DestinationError),
    /// The function failed to start `--max-init-failures` times in a row.
    #[error("the function {binary} failed to start {count} times in a row; last: {last}")]
    Init {
        /// The function's binary.
        binary: String,
        /// Failed starts in a row.
        count: u32,
        /// How the last start failed, with the process's last output.
        last: String,
    },
    /// A setting or the command line is wrong, or the mapping cannot go on (no binary,
    /// the Kafka receiver stopped).
    #[error("{0}")]
    Usage(String),
}

/// What the mapping did, for its summary line and for tests.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// Invocations made, whatever their answer.
    pub invocations: u64,
    /// Invocations whose every record succeeded.
    pub succeeded: u64,
    /// Invocations whose whole batch failed (an error, a timeout, a crash, an unreadable
    /// answer).
    pub failed: u64,
    /// Invocations that reported some records failed (`batchItemFailures`).
    pub partial: u64,
    /// Records that succeeded.
    pub records_succeeded: u64,
    /// Records given up on (retries or age exhausted) and handed to the destination, or
    /// logged as lost.
    pub records_discarded: u64,
    /// What happened to the function process.
    pub function: FunctionStats,
}

impl Report {
    /// The summary line the mapping logs when it stops.
    pub fn line(&self) -> String {
        format!(
            "esm: {} invocations ({} ok, {} failed, {} partial), {} records succeeded, {} discarded; {} cold starts, {} timeouts, {} crashes, {} init failures",
            self.invocations,
            self.succeeded,
            self.failed,
            self.partial,
            self.records_succeeded,
            self.records_discarded,
            self.function.cold_starts,
            self.function.timeouts,
            self.function.crashes,
            self.function.init_failures
        )
    }
}

/// One invocation as the mapping saw it (for tests and tools watching the mapping).
#[derive(Debug, Clone)]
pub struct Invoked {
    /// (topic, partition, offset) of every record given to the function, in order.
    pub records: Vec<(String, i32, i64)>,
    /// What the answer meant for the batch.
    pub verdict: Verdict,
    /// What went wrong, when something did.
    pub error: Option<String>,
}

/// The records between the consumer and the invoker, and the consumer's view of them.
struct Shared {
    pending: Mutex<Pending>,
    arrived: Notify,
    /// Set when the assignment changed: the pause state is applied to it again.
    reassigned: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Context {
    shared: Arc<Shared>,
    kafka: KafkaContext,
}

exactly_once::client_context_serving_iam_tokens!(Context);

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Error(e) = rebalance {
            // librdkafka drops the whole assignment: so do we (re-read when assigned).
            lock(&self.shared.pending).clear();
            tracing::warn!(error = %e, "esm: rebalance error; every partition dropped until reassigned");
            return;
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut pending = lock(&self.shared.pending);
            for e in tpl.elements() {
                pending.revoke(&(e.topic().to_owned(), e.partition()));
            }
            tracing::info!(partitions = tpl.count(), "esm: partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut pending = lock(&self.shared.pending);
            for e in tpl.elements() {
                pending.assign((e.topic().to_owned(), e.partition()));
            }
            self.shared.reassigned.store(true, Ordering::SeqCst);
            tracing::info!(partitions = tpl.count(), "esm: partitions assigned");
        }
    }
}

type KafkaConsumer = StreamConsumer<Context>;

/// The function's binary: `--binary`, or the one named after the function beside `exe`.
pub fn find_binary(settings: &MappingSettings, exe: &Path) -> Result<PathBuf, EsmError> {
    if let Some(b) = &settings.binary {
        return if b.is_file() {
            Ok(b.clone())
        } else {
            Err(EsmError::Usage(format!("--binary {}: no such file", b.display())))
        };
    }
    let beside = exe.parent().map(|d| d.join(&settings.function)).unwrap_or_default();
    if beside.is_file() {
        return Ok(beside);
    }
    Err(EsmError::Usage(format!(
        "no binary {} for function `{}`: build it (cargo build -p {}) or pass --binary",
        beside.display(),
        settings.function,
        settings.function
    )))
}

/// Receives records into `shared` until aborted; pauses the assignment while more than
/// `high` records wait, so a slow function bounds memory without leaving the group.
async fn receive(consumer: Arc<KafkaConsumer>, shared: Arc<Shared>, high: usize) {
    let mut paused = false;
    loop {
        let received = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
        match received {
            Ok(Ok(m)) => {
                if lock(&shared.pending).push(exactly_once::runtime::worker::to_event(&m)) {
                    shared.arrived.notify_one();
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "esm: Kafka receive error");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(_) => {}
        }
        let len = lock(&shared.pending).len();
        let want_paused = len >= high || (paused && len > high / 2);
        if want_paused != paused || shared.reassigned.swap(false, Ordering::SeqCst) {
            let applied = consumer.assignment().and_then(|assignment| {
                if want_paused {
                    consumer.pause(&assignment)
                } else {
                    consumer.resume(&assignment)
                }
            });
            match applied {
                Ok(()) => paused = want_paused,
                Err(e) => {
                    // Tried again on the next pass.
                    shared.reassigned.store(true, Ordering::SeqCst);
                    tracing::warn!(error = %e, "esm: pause/resume failed; retrying");
                }
            }
        }
    }
}

/// The MSK event Lambda sends for `batch`.
pub fn msk_event(batch: &Batch, kafka: &KafkaConfig) -> Value {
    let mut event = exactly_once_core::msk::encode(&batch.events());
    event["eventSourceArn"] = kafka
        .cluster_arn
        .clone()
        .unwrap_or_else(|| {
            "arn:aws:kafka:us-east-1:000000000000:cluster/local/00000000-0000-0000-0000-000000000000-1".into()
        })
        .into();
    event["bootstrapServers"] = kafka.brokers.clone().into();
    event
}

/// Reads an answer into a verdict on the batch, with the error text when it failed.
pub fn verdict(answer: &Answer, batch: &Batch, report_batch_item_failures: bool) -> (Verdict, Option<String>) {
    let body = match answer {
        Answer::Response(body) => body,
        other => return (Verdict::Failed, Some(other.describe())),
    };
    if !report_batch_item_failures {
        // Lambda reads nothing from a success without ReportBatchItemFailures.
        if serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("batchItemFailures").and_then(Value::as_array).map(|a| !a.is_empty()))
            == Some(true)
        {
            tracing::error!(
                "esm: the function answered batchItemFailures but ReportBatchItemFailures is off: Lambda takes this as success and the named records are LOST; turn both on or both off"
            );
        }
        return (Verdict::Succeeded, None);
    }
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return (
                Verdict::Failed,
                Some(format!("the answer is not JSON ({e}): {}", short(&String::from_utf8_lossy(body)))),
            )
        }
    };
    let failures = match parsed.get("batchItemFailures") {
        None | Some(Value::Null) => return (Verdict::Succeeded, None),
        Some(Value::Array(a)) if a.is_empty() => return (Verdict::Succeeded, None),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return (Verdict::Failed, Some(format!("batchItemFailures is not a list: {}", short(&other.to_string()))))
        }
    };
    let in_batch: BTreeMap<String, &batch::BatchPart> =
        batch.parts.iter().map(|p| (format!("{}-{}", p.key.0, p.key.1), p)).collect();
    let mut lowest: BTreeMap<PartitionKey, i64> = BTreeMap::new();
    for item in failures {
        let id = &item["itemIdentifier"];
        let (Some(partition), Some(offset)) = (id["partition"].as_str(), id["offset"].as_i64()) else {
            return (
                Verdict::Failed,
                Some(format!(
                    "batchItemFailures entry {} is not {{\"itemIdentifier\": {{\"partition\": \"<topic>-<partition>\", \"offset\": <n>}}}}",
                    short(&item.to_string())
                )),
            );
        };
        let Some(part) = in_batch.get(partition).filter(|p| p.records.iter().any(|e| e.offset == offset)) else {
            return (
                Verdict::Failed,
                Some(format!("batchItemFailures names {partition}@{offset}, which is not in the batch")),
            );
        };
        let entry = lowest.entry(part.key.clone()).or_insert(offset);
        *entry = (*entry).min(offset);
    }
    (Verdict::Partial(lowest), Some(format!("{} records reported failed", failures.len())))
}

fn short(s: &str) -> String {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// How many partitions a mapping owns, read while it runs ([`Mapping::assignment`]).
#[derive(Clone)]
pub struct Assignment(Arc<Shared>);

impl Assignment {
    /// Partitions assigned to the mapping now (0 before it joined its group).
    pub fn partitions(&self) -> usize {
        lock(&self.0.pending).partitions()
    }
}

/// A running mapping.
pub struct Mapping {
    settings: MappingSettings,
    kafka: KafkaConfig,
    consumer: Arc<KafkaConsumer>,
    shared: Arc<Shared>,
    function: Function,
    destination: Destination,
    report: Report,
    observers: Vec<tokio::sync::mpsc::UnboundedSender<Invoked>>,
}

impl Mapping {
    /// Joins the consumer group on `topics` (full names) and prepares the function.
    pub async fn start(
        settings: MappingSettings,
        kafka: &KafkaConfig,
        topics: &[String],
        spec: FunctionSpec,
    ) -> Result<Self, EsmError> {
        exactly_once::runtime::worker::check_reachable(kafka, Duration::from_secs(10)).await?;
        let destination = Destination::parse(&settings.on_failure_destination, kafka)?;
        let shared =
            Arc::new(Shared { pending: Mutex::default(), arrived: Notify::new(), reassigned: AtomicBool::new(false) });
        let reset = if settings.starting_position == "LATEST" { "latest" } else { "earliest" };
        let heartbeat = (kafka.session_timeout / 10).max(Duration::from_millis(500));
        let consumer: KafkaConsumer = client_config(kafka)
            .set("group.id", settings.group_id())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", reset)
            .set("session.timeout.ms", kafka.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", heartbeat.as_millis().to_string())
            .create_with_context(Context { shared: shared.clone(), kafka: KafkaContext::new(kafka) })?;
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&refs)?;
        tracing::info!(group = %settings.group_id(), ?topics, "esm: subscribed");
        Ok(Self {
            function: Function::new(spec),
            settings,
            kafka: kafka.clone(),
            consumer: Arc::new(consumer),
            shared,
            destination,
            report: Report::default(),
            observers: Vec::new(),
        })
    }

    /// Every invocation from now on, as it ends.
    pub fn observe(&mut self) -> tokio::sync::mpsc::UnboundedReceiver<Invoked> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.observers.push(tx);
        rx
    }

    /// A view of the mapping's assignment that stays valid while it runs (for tools that
    /// wait for a group to settle, such as the scale benchmark).
    pub fn assignment(&self) -> Assignment {
        Assignment(self.shared.clone())
    }

    /// The function process's id, kept current (None between processes), for tools
    /// that signal it (the fault run).
    pub fn pid_handle(&self) -> Arc<Mutex<Option<u32>>> {
        self.function.pid_handle()
    }

    /// Polls and invokes until `stop` turns true; then finishes the invocation under
    /// way, commits, stops the function and leaves the group.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<Report, EsmError> {
        let high = (self.settings.batch_size as usize * 4).max(1000);
        let mut receiver = tokio::spawn(receive(self.consumer.clone(), self.shared.clone(), high));
        // The receiver runs until aborted below: if it ends before (a panic), no
        // record would ever arrive again, so the mapping stops with an error instead.
        let result = tokio::select! {
            r = self.invoke_loop(&mut stop) => r,
            ended = &mut receiver => Err(EsmError::Usage(format!(
                "the Kafka receiver stopped unexpectedly ({}); restart the mapping",
                ended.err().map_or_else(|| "it returned".to_owned(), |e| e.to_string())
            ))),
        };
        receiver.abort();
        self.function.stop().await;
        self.report.function = self.function.stats;
        tracing::info!("{}", self.report.line());
        result.map(|()| self.report.clone())
    }

    async fn invoke_loop(&mut self, stop: &mut watch::Receiver<bool>) -> Result<(), EsmError> {
        let rules = self.settings.rules();
        let report_failures = self.settings.report_batch_item_failures();
        let window = self.settings.batching_window();
        let mut backoff = Duration::ZERO;
        let mut init_failures = 0u32;
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            // Gather: a full batch, or whatever came within the window of the first.
            let retrying = lock(&self.shared.pending).retrying();
            if !retrying {
                let mut window_end: Option<Instant> = None;
                loop {
                    let len = lock(&self.shared.pending).len();
                    if len >= rules.batch_size {
                        break;
                    }
                    if len > 0 {
                        let end = *window_end.get_or_insert_with(|| Instant::now() + window);
                        if Instant::now() >= end {
                            break;
                        }
                    }
                    let wake = window_end.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                    tokio::select! {
                        _ = stop.changed() => return Ok(()),
                        _ = self.shared.arrived.notified() => {}
                        _ = tokio::time::sleep_until(wake) => {}
                        // Records may have arrived before this wait began.
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }

            let now_ms = exactly_once::kafka_client::now_ms();
            let expired = lock(&self.shared.pending).expire(&rules, now_ms);
            self.dispose(&expired, "record too old to retry").await?;
            self.commit(&expired.commits).await;

            let batch = lock(&self.shared.pending).take(&rules);
            if batch.is_empty() {
                continue;
            }
            let body = Bytes::from(serde_json::to_vec(&msk_event(&batch, &self.kafka)).unwrap_or_default());
            let started = Instant::now();
            let answer = self.function.invoke(body).await;
            self.report.invocations += 1;
            if let Answer::InitFailed { .. } = &answer {
                init_failures += 1;
                if init_failures >= self.settings.max_init_failures {
                    return Err(EsmError::Init {
                        binary: self.function.spec().binary.display().to_string(),
                        count: init_failures,
                        last: answer.describe(),
                    });
                }
            } else {
                init_failures = 0;
            }
            let (verdict, error) = verdict(&answer, &batch, report_failures);
            let settled = lock(&self.shared.pending).settle(&batch, &verdict, &rules);
            match &verdict {
                Verdict::Succeeded => self.report.succeeded += 1,
                Verdict::Failed => self.report.failed += 1,
                Verdict::Partial(_) => self.report.partial += 1,
            }
            self.report.records_succeeded += settled.succeeded as u64;
            let ms = started.elapsed().as_millis();
            match &error {
                None => tracing::info!(records = batch.len(), ms, "esm: invocation succeeded"),
                Some(e) => tracing::warn!(records = batch.len(), ms, error = %e, "esm: invocation failed; retrying"),
            }
            let invoked = Invoked {
                records: batch.events().iter().map(|e| (e.topic.clone(), e.partition, e.offset)).collect(),
                verdict: verdict.clone(),
                error: error.clone(),
            };
            self.observers.retain(|o| o.send(invoked.clone()).is_ok());
            self.dispose(&settled, error.as_deref().unwrap_or("")).await?;
            self.commit(&settled.commits).await;

            if settled.failed {
                backoff = (backoff * 2).clamp(Duration::from_millis(200), Duration::from_secs(5));
                tokio::select! {
                    _ = stop.changed() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
            } else {
                backoff = Duration::ZERO;
            }
        }
    }

    /// Hands discarded records to the destination; an error stops the mapping before
    /// their offsets are committed.
    async fn dispose(&mut self, settled: &batch::Settled, error: &str) -> Result<(), EsmError> {
        for (reason, records) in &settled.discarded {
            self.destination.send(&self.settings.function, *reason, error, records).await?;
            self.report.records_discarded += records.len() as u64;
        }
        Ok(())
    }

    async fn commit(&self, commits: &[(PartitionKey, i64)]) {
        if commits.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in commits {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        let consumer = self.consumer.clone();
        let result = tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "esm: commit failed; the records will be read again"),
            Err(e) => tracing::warn!(error = %e, "esm: commit task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use exactly_once_core::event::Event;

    fn batch() -> Batch {
        let mut p = Pending::default();
        p.assign(("orders".into(), 0));
        p.assign(("orders".into(), 1));
        for partition in 0..2 {
            for o in 10..13 {
                p.push(Event::new("orders", partition, o));
            }
        }
        p.take(&BatchRules {
            batch_size: 100,
            max_payload_bytes: 1 << 20,
            maximum_retry_attempts: -1,
            maximum_record_age: None,
            bisect_batch_on_function_error: false,
        })
    }

    fn answer(body: &str) -> Answer {
        Answer::Response(Bytes::from(body.to_owned()))
    }

    #[test]
    fn the_documented_shape_names_the_lowest_failed_offset_per_partition() {
        let body = r#"{"batchItemFailures":[{"itemIdentifier":{"partition":"orders-1","offset":12}},
            {"itemIdentifier":{"partition":"orders-1","offset":11}}]}"#;
        let (v, _) = verdict(&answer(body), &batch(), true);
        assert_eq!(v, Verdict::Partial([(("orders".to_owned(), 1), 11)].into()));
    }

    #[test]
    fn empty_null_or_absent_failures_are_success() {
        for body in [r#"{"batchItemFailures":[]}"#, r#"{"batchItemFailures":null}"#, "{}", "null"] {
            assert_eq!(verdict(&answer(body), &batch(), true).0, Verdict::Succeeded, "{body}");
        }
    }

    #[test]
    fn an_unreadable_answer_fails_the_whole_batch_with_a_reason() {
        for (body, reason) in [
            ("not json", "not JSON"),
            (r#"{"batchItemFailures":[{"itemIdentifier":"orders-1-11"}]}"#, "is not"),
            (r#"{"batchItemFailures":[{"itemIdentifier":{"topic-partition":"orders-1","offset":11}}]}"#, "is not"),
            (r#"{"batchItemFailures":[{"itemIdentifier":{"partition":"orders-1","offset":99}}]}"#, "not in the batch"),
            (r#"{"batchItemFailures":[{"itemIdentifier":{"partition":"orders-7","offset":11}}]}"#, "not in the batch"),
            (r#"{"batchItemFailures":"all"}"#, "not a list"),
        ] {
            let (v, error) = verdict(&answer(body), &batch(), true);
            assert_eq!(v, Verdict::Failed, "{body}");
            assert!(error.unwrap_or_default().contains(reason), "{body}");
        }
    }

    #[test]
    fn without_report_batch_item_failures_any_response_is_success() {
        let body = r#"{"batchItemFailures":[{"itemIdentifier":{"partition":"orders-1","offset":11}}]}"#;
        assert_eq!(verdict(&answer(body), &batch(), false).0, Verdict::Succeeded);
        assert_eq!(verdict(&answer("not json"), &batch(), false).0, Verdict::Succeeded);
    }

    #[test]
    fn errors_timeouts_and_crashes_fail_the_whole_batch() {
        for a in [
            Answer::Error { error_type: "UnfinishedBatch".into(), message: "x".into() },
            Answer::Timeout,
            Answer::Crashed { status: "signal: 9".into(), output: String::new() },
        ] {
            assert_eq!(verdict(&a, &batch(), true).0, Verdict::Failed);
        }
    }
}
