//! More consumers: 1, 2, 4 (...) workers in one consumer group on one topic of many
//! partitions, each with its own clients (pools, guard, local cache) as separate
//! processes would have, all reading one stream with 25% duplicate ids.
//!
//! The Lambda variant (`--esm <binary>`) does the same with local MSK event source
//! mappings (`exactly_once_esm::Mapping`) in place of workers: each mapping is one group
//! member feeding one function process in Lambda mode, so N mappings are N concurrent
//! invocations, as Lambda runs at most one invocation per partition at a time.
//!
//! Per worker count: the stream is published first, the workers join together, and the
//! clock starts once the group has settled (every worker owns partitions, all partitions
//! are owned), so the figure is the steady rate, not the join. The run then checks the
//! effect exactly: every distinct id confirmed once in `processed_events` and one row
//! per id in ClickHouse, whatever the rebalance redelivered.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_once::config::{KafkaConfig, ProcessEnv, WorkerConfig};
use exactly_once::runtime::{Functions, Worker};
use exactly_once::{Clients, Handler};
use exactly_once_esm::{Assignment, EsmError, FunctionSpec, Invoked, Mapping, MappingSettings, Report, Verdict};
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use user_events::UserEvents;

use crate::e2e::{handled, publish};
use crate::{stream, Env};

/// What to run.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// Worker counts, run one after the other.
    pub workers: Vec<usize>,
    /// Records published for each worker count.
    pub events: usize,
    /// Partitions of the topic.
    pub partitions: i32,
    /// `WORKER_BATCH_SIZE`.
    pub batch: usize,
    /// `WORKER_MAX_PARTITION_IN_FLIGHT` (0: the fair share, the default).
    pub max_partition_in_flight: usize,
    /// Longest wait for one worker count to finish.
    pub timeout: Duration,
    pub seed: u64,
    /// Run local event source mappings feeding this function binary (Lambda mode)
    /// instead of workers: `workers` then counts concurrent invocations.
    pub esm: Option<PathBuf>,
}

/// Figures for one worker count.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    /// `worker` or `esm` (local event source mappings, the function in Lambda mode).
    pub runtime: &'static str,
    /// Workers, or concurrent invocations (mappings) for `esm`.
    pub workers: usize,
    pub records: usize,
    pub distinct_ids: usize,
    /// Records handled per second (processed and deduplicated) once the group settled.
    pub records_per_sec: f64,
    /// Seconds from starting the workers until the group settled.
    pub settle_secs: f64,
    /// Records handled after the settle, over which the rate is measured.
    pub measured_records: u64,
    /// Records handled more than once (a rebalance redelivered them; the guard found
    /// them confirmed or in flight).
    pub redelivered: u64,
    /// Partitions each worker owned at the end.
    pub partitions_per_worker: Vec<usize>,
    /// Most unfinished records one of its partitions could hold, per worker: the fair
    /// share of `MAX_IN_FLIGHT_MESSAGES` unless a cap was set. A batch is at most this.
    /// Empty for `esm`, whose batches are `BatchSize` records over all its partitions.
    pub partition_cap: Vec<usize>,
    /// `esm`: invocations made (all mappings), invocations that failed or partly
    /// failed (retried), and function processes started (cold starts).
    pub invocations: Option<u64>,
    pub failed_invocations: Option<u64>,
    pub cold_starts: Option<u64>,
    /// Confirmed ids in the ledger, and rows in ClickHouse (after merges): both must
    /// equal `distinct_ids`.
    pub confirmed: u64,
    pub clickhouse_rows: u64,
    pub exact: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub machine: String,
    pub options: String,
    pub rows: Vec<ScaleRow>,
}

async fn ledger_count(clients: &Clients, topic: &str) -> anyhow::Result<u64> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events WHERE topic = $1")
        .bind(topic)
        .fetch_one(&clients.pg)
        .await?;
    Ok(n.max(0) as u64)
}

/// One local event source mapping and its function process, running.
struct EsmMember {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<Report, EsmError>>,
    assignment: Assignment,
}

/// The consumers of one run: workers, or event source mappings.
enum Members {
    Workers { running: Vec<exactly_once::runtime::Worker>, max_in_flight: usize, cap: usize },
    Esm { members: Vec<EsmMember>, handled: Arc<AtomicU64>, failed: Arc<AtomicU64> },
}

impl Members {
    fn owned(&self) -> Vec<usize> {
        match self {
            Self::Workers { running, .. } => running.iter().map(|w| w.assigned().len()).collect(),
            Self::Esm { members, .. } => members.iter().map(|m| m.assignment.partitions()).collect(),
        }
    }

    /// Records handled so far (processed or deduplicated), over every member.
    fn handled(&self) -> u64 {
        match self {
            Self::Workers { .. } => handled(),
            Self::Esm { handled, .. } => handled.load(Ordering::Relaxed),
        }
    }

    /// A mapping that stopped on its own (its function cannot start, a destination write
    /// failed) ends the run with its error instead of a timeout.
    fn check(&self) -> anyhow::Result<()> {
        if let Self::Esm { members, .. } = self {
            anyhow::ensure!(
                !members.iter().any(|m| m.task.is_finished()),
                "an event source mapping stopped during the run (its error follows at shutdown)"
            );
        }
        Ok(())
    }

    fn partition_cap(&self, owned: &[usize]) -> Vec<usize> {
        match self {
            Self::Workers { max_in_flight, cap, .. } => owned
                .iter()
                .map(|&n| match cap {
                    0 => max_in_flight / (n + 1),
                    cap => *cap,
                })
                .collect(),
            Self::Esm { .. } => Vec::new(),
        }
    }

    /// Stops every member; for mappings, their summed reports.
    async fn shutdown(self) -> anyhow::Result<Option<(Report, u64)>> {
        match self {
            Self::Workers { running, .. } => {
                for w in running {
                    w.shutdown().await;
                }
                Ok(None)
            }
            Self::Esm { members, failed, .. } => {
                let mut sum = Report::default();
                let mut errors = Vec::new();
                for m in &members {
                    let _ = m.stop.send(true);
                }
                for m in members {
                    match m.task.await {
                        Ok(Ok(r)) => {
                            sum.invocations += r.invocations;
                            sum.records_succeeded += r.records_succeeded;
                            sum.records_discarded += r.records_discarded;
                            sum.function.cold_starts += r.function.cold_starts;
                        }
                        Ok(Err(e)) => errors.push(e.to_string()),
                        Err(e) => errors.push(format!("the mapping task panicked: {e}")),
                    }
                }
                anyhow::ensure!(errors.is_empty(), "event source mappings failed: {errors:?}");
                anyhow::ensure!(sum.records_discarded == 0, "{} records were discarded", sum.records_discarded);
                Ok(Some((sum, failed.load(Ordering::Relaxed))))
            }
        }
    }
}

/// Records of an invocation that succeeded: all of them, or for a partial answer those
/// before the lowest failed offset of their partition.
fn succeeded(invoked: &Invoked) -> u64 {
    match &invoked.verdict {
        Verdict::Succeeded => invoked.records.len() as u64,
        Verdict::Failed => 0,
        Verdict::Partial(lowest) => {
            invoked.records.iter().filter(|(t, p, o)| lowest.get(&(t.clone(), *p)).is_none_or(|l| o < l)).count() as u64
        }
    }
}

/// The function binary's environment: the slice's stores, the run's topic prefix (the
/// function maps a record's topic to itself through it), and errors only in its log
/// (`SCALE_FUNCTION_LOG` overrides): a warning per duplicate, written and piped through
/// the mapping, is a cost the workers, with no log subscriber in this process, do not pay.
fn function_env(env: &Env, kafka: &exactly_once::config::KafkaConfig) -> Vec<(String, String)> {
    env.slice
        .env()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("KAFKA_"))
        .chain([
            ("KAFKA_TOPIC_PREFIX".into(), kafka.topic_prefix.clone()),
            ("RUST_LOG".into(), std::env::var("SCALE_FUNCTION_LOG").unwrap_or_else(|_| "error".into())),
            ("LAMBDA_REPORT_BATCH_ITEM_FAILURES".into(), "true".into()),
        ])
        .collect()
}

async fn start_esm(
    env: &Env,
    opts: &ScaleOptions,
    binary: &std::path::Path,
    kafka: &exactly_once::config::KafkaConfig,
    run: &str,
    count: usize,
    topic: &str,
) -> anyhow::Result<Members> {
    anyhow::ensure!(
        binary.is_file(),
        "{}: no such function binary (cargo build --release -p user-events)",
        binary.display()
    );
    // What `eo migrate` does before a deploy; a function in Lambda mode only checks it.
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await?;
    let mut settings = MappingSettings::for_function(user_events::UserEvents.spec().name);
    settings.consumer_group_prefix = format!("{run}-c{count}");
    settings.batch_size = u32::try_from(opts.batch.clamp(1, 10_000)).unwrap_or(10_000);
    settings.timeout = 120;
    let spec = FunctionSpec {
        binary: binary.to_owned(),
        name: settings.function.clone(),
        env: function_env(env, kafka),
        timeout: Duration::from_secs(settings.timeout),
        init_timeout: Duration::from_secs(settings.init_timeout_secs),
        memory_size: settings.memory_size,
        log: None,
    };
    let handled = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut members = Vec::with_capacity(count);
    for _ in 0..count {
        let mut mapping = match Mapping::start(settings.clone(), kafka, &[topic.to_owned()], spec.clone()).await {
            Ok(m) => m,
            Err(e) => {
                // The ones started already leave the group and stop their functions.
                let started = Members::Esm { members, handled, failed };
                let _ = started.shutdown().await;
                return Err(e.into());
            }
        };
        let mut invoked: mpsc::UnboundedReceiver<Invoked> = mapping.observe();
        let (h, f) = (handled.clone(), failed.clone());
        tokio::spawn(async move {
            while let Some(i) = invoked.recv().await {
                h.fetch_add(succeeded(&i), Ordering::Relaxed);
                if i.verdict != Verdict::Succeeded {
                    f.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let assignment = mapping.assignment();
        let (stop, stopped) = watch::channel(false);
        members.push(EsmMember { stop, task: tokio::spawn(mapping.run(stopped)), assignment });
    }
    Ok(Members::Esm { members, handled, failed })
}

async fn one(env: &Env, opts: &ScaleOptions, workers: usize, run: &str) -> anyhow::Result<ScaleRow> {
    // Ids of their own per worker count: the runs share a ledger, and the same ids
    // would all be duplicates the second time.
    let events = stream(opts.events, 0.25, opts.seed.wrapping_add(workers as u64 * 7919));
    let distinct: HashSet<&[u8]> =
        events.iter().filter_map(|e| e.header("idempotency_key").and_then(|h| h.value.as_deref())).collect();
    let distinct = distinct.len();
    let runtime = if opts.esm.is_some() { "esm" } else { "worker" };
    let what = if opts.esm.is_some() { "concurrent invocation(s)" } else { "worker(s)" };

    let mut kafka = KafkaConfig::from_env(&ProcessEnv)?;
    kafka.topic_prefix = format!("{run}.{runtime}{workers}.");
    kafka.group_id = format!("{run}-w{workers}");
    kafka.topic_partitions = opts.partitions;
    let topic = kafka.topic(user_events::TOPICS[0]);
    eprintln!(
        "[scale] {workers} {what}: publishing {} records to {topic} ({} partitions)",
        events.len(),
        opts.partitions
    );
    publish(&kafka, &topic, &events).await?;

    // The workers' count is process-wide (their handler counts); the mappings' starts at 0.
    let before = if opts.esm.is_some() { 0 } else { handled() };
    let started;
    let members = match &opts.esm {
        Some(binary) => {
            // What `eo migrate` does before a deploy; a function in Lambda mode only checks it.
            env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await?;
            started = Instant::now();
            start_esm(env, opts, binary, &kafka, run, workers, &topic).await?
        }
        None => {
            let mut config = WorkerConfig::from_env(&ProcessEnv)?;
            config.batch_size = opts.batch;
            config.max_partition_in_flight = opts.max_partition_in_flight;
            // Each worker its own clients, functions (guard, local cache) and consumer.
            let mut prepared = Vec::with_capacity(workers);
            for _ in 0..workers {
                let clients = Clients::connect((*env.clients.config).clone()).await?;
                let functions =
                    Arc::new(Functions::new(&clients, vec![Arc::new(UserEvents) as Arc<dyn Handler>], &kafka).await?);
                prepared.push((clients, functions));
            }
            started = Instant::now();
            let starts = prepared.iter().map(|(c, f)| Worker::start(c, f.clone(), &kafka, &config));
            let mut running = Vec::with_capacity(workers);
            for w in futures::future::join_all(starts).await {
                running.push(w?);
            }
            Members::Workers { running, max_in_flight: config.max_in_flight, cap: config.max_partition_in_flight }
        }
    };
    let result = measure(env, opts, &members, workers, what, &topic, &events, distinct, started, before).await;
    let shut = members.shutdown().await;
    // A mapping that stopped on its own says why only at shutdown: keep both.
    let (settle_secs, handled_at_settle, took, total, partitions_per_worker, partition_cap) = match (result, &shut) {
        (Ok(r), _) => r,
        (Err(e), Err(at_shutdown)) => return Err(e.context(format!("{at_shutdown:#}"))),
        (Err(e), Ok(_)) => return Err(e),
    };
    let esm = shut?;

    let confirmed = ledger_count(&env.clients, &topic).await?;
    let clickhouse_rows: u64 = env
        .clients
        .sink
        .client()
        .query("SELECT count() FROM user_events FINAL WHERE topic = ?")
        .bind(&topic)
        .fetch_one::<u64>()
        .await?;
    let measured = total - handled_at_settle;
    Ok(ScaleRow {
        runtime,
        workers,
        records: events.len(),
        distinct_ids: distinct,
        records_per_sec: measured as f64 / took.as_secs_f64().max(1e-9),
        settle_secs,
        measured_records: measured,
        redelivered: total.saturating_sub(events.len() as u64),
        partitions_per_worker,
        partition_cap,
        invocations: esm.as_ref().map(|(r, _)| r.invocations),
        failed_invocations: esm.as_ref().map(|(_, f)| *f),
        cold_starts: esm.as_ref().map(|(r, _)| r.function.cold_starts),
        confirmed,
        clickhouse_rows,
        exact: confirmed == distinct as u64 && clickhouse_rows == distinct as u64,
    })
}

type Measured = (f64, u64, Duration, u64, Vec<usize>, Vec<usize>);

/// Waits for the group to settle, then for every record to be handled and every id
/// confirmed: (settle seconds, handled at settle, time since settle, handled in all,
/// partitions per member, partition caps).
#[allow(clippy::too_many_arguments)]
async fn measure(
    env: &Env,
    opts: &ScaleOptions,
    members: &Members,
    workers: usize,
    what: &str,
    topic: &str,
    events: &[exactly_once::Event],
    distinct: usize,
    started: Instant,
    before: u64,
) -> anyhow::Result<Measured> {
    // Settled: every member owns partitions and together they own them all.
    let deadline = started + opts.timeout;
    let (settle_at, handled_at_settle) = loop {
        let owned = members.owned();
        if owned.iter().all(|&n| n > 0) && owned.iter().sum::<usize>() == opts.partitions as usize {
            break (Instant::now(), members.handled() - before);
        }
        members.check()?;
        anyhow::ensure!(Instant::now() < deadline, "the group did not settle: partitions per member {owned:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!(
        "[scale] {workers} {what}: group settled after {:.1} s ({handled_at_settle} records already handled)",
        (settle_at - started).as_secs_f64()
    );

    // Done: every record handled at least once and every distinct id confirmed.
    let mut last_report = Instant::now();
    loop {
        let confirmed = ledger_count(&env.clients, topic).await?;
        let h = members.handled() - before;
        if h >= events.len() as u64 && confirmed >= distinct as u64 {
            break;
        }
        members.check()?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "{workers} {what} did not finish in {:?}: {h} of {} records handled, {confirmed} of {distinct} ids confirmed",
            opts.timeout,
            events.len()
        );
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!("[scale] {workers} {what}: {h} of {} handled, {confirmed} of {distinct} confirmed", events.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = settle_at.elapsed();
    let total = members.handled() - before;
    let owned = members.owned();
    let caps = members.partition_cap(&owned);
    Ok(((settle_at - started).as_secs_f64(), handled_at_settle, took, total, owned, caps))
}

/// Runs every worker count, one after the other, in one isolated slice.
pub async fn run(opts: &ScaleOptions) -> anyhow::Result<ScaleReport> {
    let env = Env::new().await?;
    let run = format!("scale-{}", uuid::Uuid::new_v4().simple());
    let result = async {
        let mut rows = Vec::new();
        for &w in &opts.workers {
            rows.push(one(&env, opts, w.max(1), &run).await?);
        }
        anyhow::Ok(rows)
    }
    .await;
    env.cleanup().await;
    Ok(ScaleReport { machine: crate::machine(), options: format!("{opts:?}"), rows: result? })
}

/// The table printed after a run.
pub fn render(report: &ScaleReport) -> String {
    let mut out = format!("machine: {}\n\n", report.machine);
    let esm = report.rows.iter().any(|r| r.runtime == "esm");
    out += &format!(
        "{:>7} {:>7} {:>8} {:>9} {:>10} {:>8} {:>8} {:>11} {:>10} {:>10} {:>6}  {}\n",
        "runtime",
        if esm { "concur." } else { "workers" },
        "records",
        "distinct",
        "records/s",
        "vs 1",
        "settle",
        "redelivered",
        "confirmed",
        "ch rows",
        "exact",
        if esm { "partitions per mapping; invocations (failed), cold starts" } else { "partitions per worker (cap)" }
    );
    let one = report.rows.iter().find(|r| r.workers == 1).map(|r| r.records_per_sec);
    for r in &report.rows {
        let tail = match (r.invocations, r.failed_invocations, r.cold_starts) {
            (Some(i), Some(f), Some(c)) => format!("{:?}; {i} ({f}), {c}", r.partitions_per_worker),
            _ => format!("{:?} ({:?})", r.partitions_per_worker, r.partition_cap),
        };
        out += &format!(
            "{:>7} {:>7} {:>8} {:>9} {:>10.0} {:>8} {:>7.1}s {:>11} {:>10} {:>10} {:>6}  {tail}\n",
            r.runtime,
            r.workers,
            r.records,
            r.distinct_ids,
            r.records_per_sec,
            one.map_or("-".to_owned(), |o| format!("{:.2}x", r.records_per_sec / o)),
            r.settle_secs,
            r.redelivered,
            r.confirmed,
            r.clickhouse_rows,
            r.exact,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    /// The smoke run: two worker counts at a tiny size; the group settles, every record
    /// is handled and the effect is exact. Measures nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn scale_smoke_run_is_exact_with_one_and_two_workers() {
        let opts = super::ScaleOptions {
            workers: vec![1, 2],
            events: 600,
            partitions: 4,
            batch: 100,
            max_partition_in_flight: 0,
            timeout: std::time::Duration::from_secs(180),
            seed: 11,
            esm: None,
        };
        let report = super::run(&opts).await.expect("scale smoke run");
        assert_eq!(report.rows.len(), 2);
        for r in &report.rows {
            assert!(r.exact, "not exact: {r:?}");
            assert_eq!(r.partitions_per_worker.len(), r.workers);
            assert_eq!(r.partitions_per_worker.iter().sum::<usize>(), 4, "{r:?}");
            assert!(r.distinct_ids < r.records, "the stream repeats ids");
        }
        assert!(super::render(&report).contains("partitions per worker"));
    }

    /// The `user-events` binary `cargo test --workspace` builds beside this test (its
    /// integration tests need it); a clear error when it is missing.
    fn user_events_binary() -> std::path::PathBuf {
        let exe = std::env::current_exe().expect("test binary path");
        // target/<profile>/deps/bench-<hash> -> target/<profile>/user-events
        let binary = exe.parent().and_then(|d| d.parent()).expect("target directory").join("user-events");
        assert!(binary.is_file(), "{} missing: cargo build -p user-events first", binary.display());
        binary
    }

    /// The Lambda variant's smoke run: one and two local event source mappings (two
    /// function processes at once), each invoking the real `user-events` binary; every
    /// record succeeds and the effect is exact. Measures nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn scale_smoke_run_through_event_source_mappings_is_exact() {
        let opts = super::ScaleOptions {
            workers: vec![1, 2],
            events: 600,
            partitions: 4,
            batch: 100,
            max_partition_in_flight: 0,
            timeout: std::time::Duration::from_secs(180),
            seed: 13,
            esm: Some(user_events_binary()),
        };
        let report = super::run(&opts).await.expect("scale smoke run (esm)");
        assert_eq!(report.rows.len(), 2);
        for r in &report.rows {
            assert_eq!(r.runtime, "esm");
            assert!(r.exact, "not exact: {r:?}");
            assert_eq!(r.partitions_per_worker.len(), r.workers);
            assert_eq!(r.partitions_per_worker.iter().sum::<usize>(), 4, "{r:?}");
            assert!(r.invocations.expect("invocations counted") >= 1, "{r:?}");
            assert_eq!(r.cold_starts, Some(r.workers as u64), "one function process per mapping: {r:?}");
            assert!(r.distinct_ids < r.records, "the stream repeats ids");
        }
        assert!(super::render(&report).contains("partitions per mapping"));
    }
}
