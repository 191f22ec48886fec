//! The guard on Redis Cluster: the same stream and batch size against a standalone Redis
//! and against local clusters of one, two and three primaries (`scripts/redis-cluster.sh`,
//! primaries only), all in one run, with where the function's keys landed.
//!
//! `cargo run --release -p bench --bin cluster`. On one machine every primary shares the
//! same cores, so more primaries cannot add CPU here; what the run shows is the cost of
//! the cluster client and of one script per bucket, and that the keys spread.

use std::collections::BTreeMap;
use std::time::Duration;

use exactly_once::config::{RedisMode, Secret};
use exactly_once::local_cluster::LocalCluster;
use serde::Serialize;

use crate::{guard, stream, Env, Row};

/// What to run.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Events in the stream (25% duplicate ids).
    pub events: usize,
    /// Events per batch.
    pub batch: usize,
    /// `REDIS_KEY_BUCKETS` for the cluster runs.
    pub buckets: u32,
    /// Primary counts to measure.
    pub primaries: Vec<u16>,
    pub seed: u64,
}

/// One measured setup.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterRow {
    /// `standalone` or `cluster, N primaries`.
    pub setup: String,
    pub row: Row,
    /// Guard throughput against the standalone row of the same run.
    pub vs_standalone: f64,
    /// Keys left on each primary after the run (done markers), by port.
    pub keys_per_primary: BTreeMap<u16, usize>,
    /// Distinct hash slots the function's keys use.
    pub slots_used: usize,
}

/// The run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterReport {
    pub machine: String,
    pub options: String,
    pub rows: Vec<ClusterRow>,
}

/// Runs the standalone reference, then each cluster size.
pub async fn run(opts: &ClusterOptions) -> anyhow::Result<ClusterReport> {
    let events = stream(opts.events, 0.25, opts.seed);
    let mut rows = Vec::new();

    eprintln!("[cluster] standalone Redis, batch {}, {} events", opts.batch, events.len());
    let env = Env::new().await?;
    let standalone = guard(&env, "cluster-bench", &events, opts.batch).await;
    env.cleanup().await;
    let standalone = standalone?;
    let base = standalone.events_per_sec;
    rows.push(ClusterRow {
        setup: "standalone".into(),
        row: standalone,
        vs_standalone: 1.0,
        keys_per_primary: BTreeMap::new(),
        slots_used: 1,
    });

    for &n in &opts.primaries {
        eprintln!("[cluster] {n} primaries, {} buckets", opts.buckets);
        let cluster = LocalCluster::start_with(n, 0, None, false);
        let url = cluster.url();
        let buckets = opts.buckets;
        let env = Env::with(move |c| {
            c.redis.mode = RedisMode::Cluster;
            c.redis.url = Secret::new(url);
            c.redis.key_buckets = buckets;
            Ok(())
        })
        .await?;
        let measured = guard(&env, "cluster-bench", &events, opts.batch).await;
        let pattern = format!("{}:*", env.slice.name());
        let spread = cluster.keys_per_primary(&pattern).await;
        let slots = (0..buckets)
            .map(|b| exactly_once::local_cluster::slot_of(&format!("{}:{{cluster-bench:{b}}}:x", env.slice.name())))
            .collect::<std::collections::HashSet<_>>()
            .len();
        env.cleanup().await;
        drop(cluster);
        let row = measured?;
        rows.push(ClusterRow {
            setup: format!("cluster, {n} primar{}", if n == 1 { "y" } else { "ies" }),
            vs_standalone: row.events_per_sec / base,
            row,
            keys_per_primary: spread.into_iter().collect(),
            slots_used: slots,
        });
        // Let the stopped nodes' ports settle before the next cluster takes new ones.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(ClusterReport { machine: crate::machine(), options: format!("{opts:?}"), rows })
}

/// The table printed after a run.
pub fn render(report: &ClusterReport) -> String {
    let mut out = format!("machine: {}\n\n", report.machine);
    out += &format!(
        "{:<22} {:>6} {:>10} {:>8} {:>10} {:>10} {:>8} {:>6}  {}\n",
        "setup", "batch", "events/s", "vs std", "batch p50", "batch p99", "redis/b", "slots", "keys per primary"
    );
    for r in &report.rows {
        let spread: Vec<String> = r.keys_per_primary.values().map(|n| n.to_string()).collect();
        out += &format!(
            "{:<22} {:>6} {:>10.0} {:>7.2}x {:>8.3}ms {:>8.3}ms {:>8.2} {:>6}  {}\n",
            r.setup,
            r.row.batch,
            r.row.events_per_sec,
            r.vs_standalone,
            r.row.batch_p50_ms,
            r.row.batch_p99_ms,
            r.row.redis_round_trips_per_batch,
            r.slots_used,
            if spread.is_empty() { "-".into() } else { spread.join(" / ") }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    /// The smoke run of the cluster variant: every setup runs at a tiny size, keys land
    /// on every primary, a batch still costs two Redis steps. Speed is not judged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn cluster_smoke_run_spreads_keys_over_every_primary() {
        let opts = super::ClusterOptions { events: 400, batch: 100, buckets: 16, primaries: vec![1, 3], seed: 7 };
        let report = super::run(&opts).await.expect("cluster smoke run");
        assert_eq!(report.rows.len(), 3);
        for r in &report.rows[1..] {
            assert!(r.row.events_per_sec > 0.0);
            let standalone = report.rows[0].row.redis_round_trips_per_batch;
            assert_eq!(r.row.redis_round_trips_per_batch, standalone, "{}: as many Redis steps as standalone", r.setup);
            assert_eq!(r.keys_per_primary.len(), r.setup.split(' ').nth(1).unwrap().parse::<usize>().unwrap());
            assert!(r.keys_per_primary.values().all(|&k| k > 0), "{}: {:?}", r.setup, r.keys_per_primary);
            assert_eq!(r.slots_used, 16);
        }
        assert!(super::render(&report).contains("cluster, 3 primaries"));
    }
}
