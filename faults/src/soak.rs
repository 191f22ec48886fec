//! `eo-faults soak`: one worker (`eo run`) under a steady stream for a long time, its memory
//! and open connections sampled. Both must stay flat: growth after the warm-up means a
//! leak. Every event must still land exactly once.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use exactly_once::producer::Producer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::chaos::{Isolated, Supervised};

/// One sample of the worker.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    pub seconds: f64,
    pub rss_bytes: u64,
    pub open_fds: u64,
    pub postgres_connections: i64,
    pub tcp_connections: u64,
    pub produced: u64,
    pub confirmed: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SoakReport {
    pub duration_secs: u64,
    pub rate_per_sec: u64,
    /// Messages produced per second over the production time, as achieved.
    pub achieved_rate: f64,
    pub samples: Vec<Sample>,
    /// Mean RSS of the last quarter against the second quarter (after warm-up).
    pub rss_growth: f64,
    pub max_postgres_connections: i64,
    pub max_tcp_connections: u64,
    pub produced: u64,
    pub unique: u64,
    pub confirmed: i64,
    pub flat: bool,
    pub exact: bool,
}

impl SoakReport {
    pub fn line(&self) -> String {
        let rss = |s: &Sample| s.rss_bytes as f64 / 1048576.0;
        let (first, last) = (self.samples.first(), self.samples.last());
        format!(
            "soak {} s at {}/s (achieved {:.0}/s): {}; RSS {:.1} MiB at start, {:.1} MiB at end, {:+.1}% after warm-up; \
             Postgres connections max {}, TCP connections max {}, open fds {} -> {}; {} produced, {} unique, {} confirmed",
            self.duration_secs,
            self.rate_per_sec,
            self.achieved_rate,
            if self.flat && self.exact { "PASS" } else { "FAIL" },
            first.map(rss).unwrap_or(0.0),
            last.map(rss).unwrap_or(0.0),
            self.rss_growth * 100.0,
            self.max_postgres_connections,
            self.max_tcp_connections,
            first.map_or(0, |s| s.open_fds),
            last.map_or(0, |s| s.open_fds),
            self.produced,
            self.unique,
            self.confirmed,
        )
    }
}

fn proc_status(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}

fn open_fds(pid: u32) -> (u64, u64) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return (0, 0) };
    let mut fds = 0;
    let mut sockets = 0;
    for e in dir.flatten() {
        fds += 1;
        if std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:")) {
            sockets += 1;
        }
    }
    (fds, sockets)
}

/// `cache_bytes`: the worker's local cache bound. The cache grows until it is full by
/// design; a small bound fills it during the warm-up, so that what grows afterwards is
/// something else.
pub async fn run(
    exe: &Path,
    duration: Duration,
    rate: u64,
    every: Duration,
    cache_bytes: u64,
) -> anyhow::Result<SoakReport> {
    let run = Isolated::new("soak", |_| {}).await?;
    let (name, clients, kafka) = (&run.name, &run.clients, &run.kafka);
    let functions = exactly_once_cli::all_functions();
    let handler = functions.iter().find(|f| f.spec().name == "user-events").context("user-events")?.clone();
    let topic = kafka.topic(handler.spec().topics[0]);
    let mut env = run.worker_env.clone();
    env.push(("RUST_LOG".into(), "warn".into()));
    env.push(("GUARD_LOCAL_CACHE_MAX_BYTES".into(), cache_bytes.to_string()));
    std::fs::create_dir_all("target/soak")?;
    let worker =
        Supervised::start(exe.to_path_buf(), vec!["run".into()], env, format!("target/soak/{name}-worker.log").into());
    eprintln!("[soak] {name}: {} s at {rate} messages/s, sampled every {} s", duration.as_secs(), every.as_secs());

    let produced = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (p, k, t, h) = (produced.clone(), kafka.clone(), topic.clone(), handler.clone());
    let producer = tokio::spawn(async move {
        // Sends overlap (up to 256 in flight): one at a time, the broker's ack latency
        // would cap the rate below what was asked for.
        let producer = std::sync::Arc::new(Producer::new(&k)?);
        let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
        let mut sends = tokio::task::JoinSet::new();
        let mut rng = StdRng::seed_from_u64(11);
        let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
        let t0 = Instant::now();
        let total = duration.as_secs() * rate;
        for i in 0..total {
            let due = Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let (id, payload) = if !sent.is_empty() && rng.random_bool(0.25) {
                sent[rng.random_range(0..sent.len())].clone()
            } else {
                let e = (format!("soak-{i}"), h.sample(sent.len() as u64).unwrap_or_default());
                sent.push(e.clone());
                e
            };
            let permit = in_flight.clone().acquire_owned().await?;
            let (producer, t, p) = (producer.clone(), t.clone(), p.clone());
            sends.spawn(async move {
                producer.send(&t, Some(id.as_bytes()), &payload, Some(&id)).await?;
                p.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                drop(permit);
                anyhow::Ok(())
            });
            while let Some(done) = sends.try_join_next() {
                done??;
            }
        }
        while let Some(done) = sends.join_next().await {
            done??;
        }
        anyhow::Ok(sent.into_iter().map(|(id, _)| id).collect::<HashSet<String>>())
    });

    let mut samples = Vec::new();
    let t0 = Instant::now();
    while !producer.is_finished() {
        tokio::time::sleep(every).await;
        let Some(pid) = worker.pid().await else { continue };
        let (fds, sockets) = open_fds(pid);
        let pg: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(name)
            .fetch_one(&clients.pg)
            .await
            .unwrap_or(-1);
        let confirmed: i64 =
            sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&clients.pg).await.unwrap_or(-1);
        let s = Sample {
            seconds: t0.elapsed().as_secs_f64(),
            rss_bytes: proc_status(pid, "VmRSS:"),
            open_fds: fds,
            postgres_connections: pg,
            tcp_connections: sockets,
            produced: produced.load(std::sync::atomic::Ordering::Relaxed),
            confirmed,
        };
        eprintln!(
            "[soak] {:>5.0} s  RSS {:>6.1} MiB  fds {:>4}  sockets {:>3}  pg {:>2}  produced {:>7}  confirmed {:>7}",
            s.seconds,
            s.rss_bytes as f64 / 1048576.0,
            s.open_fds,
            s.tcp_connections,
            s.postgres_connections,
            s.produced,
            s.confirmed
        );
        samples.push(s);
    }
    let unique_ids = producer.await.context("producer task")??;
    let production_secs = t0.elapsed().as_secs_f64();
    let unique = unique_ids.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut confirmed = 0;
    while Instant::now() < deadline {
        confirmed = sqlx::query_scalar("SELECT count(*) FROM processed_events").fetch_one(&clients.pg).await?;
        if confirmed >= unique {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    worker.stop().await;

    let n = samples.len();
    let mean = |xs: &[Sample]| xs.iter().map(|s| s.rss_bytes as f64).sum::<f64>() / xs.len().max(1) as f64;
    let (warm, late) =
        if n >= 4 { (&samples[n / 4..n / 2], &samples[n - n / 4..]) } else { (&samples[..], &samples[..]) };
    let rss_growth = mean(late) / mean(warm).max(1.0) - 1.0;
    let max_pg = samples.iter().map(|s| s.postgres_connections).max().unwrap_or(0);
    let max_tcp = samples.iter().map(|s| s.tcp_connections).max().unwrap_or(0);
    let fds_flat = match (warm.first(), samples.last()) {
        (Some(a), Some(b)) => b.open_fds <= a.open_fds + 8,
        _ => false,
    };
    let flat = rss_growth < 0.10 && max_pg <= i64::from(run.worker_pool_size) && fds_flat;
    let exact = confirmed == unique;
    let report = SoakReport {
        duration_secs: duration.as_secs(),
        rate_per_sec: rate,
        achieved_rate: produced.load(std::sync::atomic::Ordering::Relaxed) as f64 / production_secs,
        samples,
        rss_growth,
        max_postgres_connections: max_pg,
        max_tcp_connections: max_tcp,
        produced: produced.load(std::sync::atomic::Ordering::Relaxed),
        unique: unique as u64,
        confirmed,
        flat,
        exact,
    };
    if flat && exact {
        run.slice.remove(&run.config, Duration::from_secs(30)).await;
    }
    Ok(report)
}
