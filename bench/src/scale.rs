//! More consumers: 1, 2, 4 (...) workers in one consumer group on one topic of many
//! partitions, each with its own clients (pools, guard, local cache) as separate
//! processes would have, all reading one stream with 25% duplicate ids.
//!
//! Per worker count: the stream is published first, the workers join together, and the
//! clock starts once the group has settled (every worker owns partitions, all partitions
//! are owned), so the figure is the steady rate, not the join. The run then checks the
//! effect exactly: every distinct id confirmed once in `processed_events` and one row
//! per id in ClickHouse, whatever the rebalance redelivered.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use exactly_once::config::{KafkaConfig, ProcessEnv, WorkerConfig};
use exactly_once::runtime::{Functions, Worker};
use exactly_once::{Clients, Handler};
use serde::Serialize;
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
}

/// Figures for one worker count.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
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
    pub partition_cap: Vec<usize>,
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

async fn one(env: &Env, opts: &ScaleOptions, workers: usize, run: &str) -> anyhow::Result<ScaleRow> {
    // Ids of their own per worker count: the runs share a ledger, and the same ids
    // would all be duplicates the second time.
    let events = stream(opts.events, 0.25, opts.seed.wrapping_add(workers as u64 * 7919));
    let distinct: HashSet<&[u8]> =
        events.iter().filter_map(|e| e.header("idempotency_key").and_then(|h| h.value.as_deref())).collect();
    let distinct = distinct.len();

    let mut kafka = KafkaConfig::from_env(&ProcessEnv)?;
    kafka.topic_prefix = format!("{run}.w{workers}.");
    kafka.group_id = format!("{run}-w{workers}");
    kafka.topic_partitions = opts.partitions;
    let topic = kafka.topic(user_events::TOPICS[0]);
    eprintln!(
        "[scale] {workers} worker(s): publishing {} records to {topic} ({} partitions)",
        events.len(),
        opts.partitions
    );
    publish(&kafka, &topic, &events).await?;

    let mut config = WorkerConfig::from_env(&ProcessEnv)?;
    config.batch_size = opts.batch;
    config.max_partition_in_flight = opts.max_partition_in_flight;
    // Each worker its own clients, functions (guard, local cache) and consumer.
    let mut members = Vec::with_capacity(workers);
    for _ in 0..workers {
        let clients = Clients::connect((*env.clients.config).clone()).await?;
        let functions =
            Arc::new(Functions::new(&clients, vec![Arc::new(UserEvents) as Arc<dyn Handler>], &kafka).await?);
        members.push((clients, functions));
    }
    let before = handled();
    let started = Instant::now();
    let starts = members.iter().map(|(c, f)| Worker::start(c, f.clone(), &kafka, &config));
    let mut running = Vec::with_capacity(workers);
    for w in futures::future::join_all(starts).await {
        running.push(w?);
    }

    // Settled: every worker owns partitions and together they own them all.
    let deadline = started + opts.timeout;
    let (settle_at, handled_at_settle) = loop {
        let owned: Vec<usize> = running.iter().map(|w| w.assigned().len()).collect();
        if owned.iter().all(|&n| n > 0) && owned.iter().sum::<usize>() == opts.partitions as usize {
            break (Instant::now(), handled() - before);
        }
        anyhow::ensure!(Instant::now() < deadline, "the group did not settle: partitions per worker {owned:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!(
        "[scale] {workers} worker(s): group settled after {:.1} s ({handled_at_settle} records already handled)",
        (settle_at - started).as_secs_f64()
    );

    // Done: every record handled at least once and every distinct id confirmed.
    let mut last_report = Instant::now();
    loop {
        let confirmed = ledger_count(&env.clients, &topic).await?;
        let h = handled() - before;
        if h >= events.len() as u64 && confirmed >= distinct as u64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{workers} worker(s) did not finish in {:?}: {h} of {} records handled, {confirmed} of {distinct} ids confirmed",
            opts.timeout,
            events.len()
        );
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "[scale] {workers} worker(s): {h} of {} handled, {confirmed} of {distinct} confirmed",
                events.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = settle_at.elapsed();
    let total = handled() - before;
    let partitions_per_worker: Vec<usize> = running.iter().map(|w| w.assigned().len()).collect();
    let partition_cap = partitions_per_worker
        .iter()
        .map(|&owned| match config.max_partition_in_flight {
            0 => config.max_in_flight / (owned + 1),
            cap => cap,
        })
        .collect();
    for w in running {
        w.shutdown().await;
    }

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
        workers,
        records: events.len(),
        distinct_ids: distinct,
        records_per_sec: measured as f64 / took.as_secs_f64().max(1e-9),
        settle_secs: (settle_at - started).as_secs_f64(),
        measured_records: measured,
        redelivered: total.saturating_sub(events.len() as u64),
        partitions_per_worker,
        partition_cap,
        confirmed,
        clickhouse_rows,
        exact: confirmed == distinct as u64 && clickhouse_rows == distinct as u64,
    })
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
    out += &format!(
        "{:>7} {:>8} {:>9} {:>10} {:>8} {:>8} {:>11} {:>10} {:>10} {:>6}  partitions per worker (cap)\n",
        "workers", "records", "distinct", "records/s", "vs 1", "settle", "redelivered", "confirmed", "ch rows", "exact"
    );
    let one = report.rows.iter().find(|r| r.workers == 1).map(|r| r.records_per_sec);
    for r in &report.rows {
        out += &format!(
            "{:>7} {:>8} {:>9} {:>10.0} {:>8} {:>7.1}s {:>11} {:>10} {:>10} {:>6}  {:?} ({:?})\n",
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
            r.partitions_per_worker,
            r.partition_cap
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
}
