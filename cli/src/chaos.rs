//! `eo chaos`: the fault-injection run. Real workers (`eo run`, every function) consume a
//! stream with 25% duplicate ids and a few poison records while faults hit at seeded
//! random moments: kill -9 of a worker, Redis FLUSHALL, Redis and ClickHouse stopped and
//! started again, Postgres backends terminated, a second worker joining and leaving the
//! group. At the end every store is counted against what was produced; the pass
//! condition is exact.
//!
//! It stops and starts the local services (through `scripts/services.sh`) and flushes
//! Redis, so it must run alone, not beside the tests. Everything else it touches is its
//! own: a Postgres schema, a ClickHouse database, a Redis key prefix, topics and a
//! consumer group named `chaos_<random>`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use exactly_once::config::{KafkaConfig, ProcessEnv};
use exactly_once::producer::Producer;
use exactly_once::{Clients, Config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub seed: u64,
    /// Messages per function (user-events, notifications), duplicates included.
    pub events: usize,
    /// Poison records per function (not JSON: dead-lettered).
    pub poison: usize,
    /// How long production is spread over; the faults fall inside it.
    pub duration: Duration,
    /// kill -9 of the main worker, this many times.
    pub kills: usize,
    /// Postgres backend terminations.
    pub pg_terminations: usize,
    /// The ClickHouse breaker's open time given to the workers; ClickHouse stays down longer.
    pub breaker_open: Duration,
    /// The second worker's lease TTL: shorter than its batches take.
    pub short_lease: Duration,
    /// `scripts/services.sh`: starts what was stopped.
    pub services_script: PathBuf,
    /// Worker logs go here.
    pub log_dir: PathBuf,
}

impl ChaosOptions {
    /// The full run (its result goes in docs/RELIABILITY.md).
    pub fn full(seed: u64) -> Self {
        Self {
            seed,
            events: 20_000,
            poison: 10,
            duration: Duration::from_secs(240),
            kills: 4,
            pg_terminations: 3,
            breaker_open: Duration::from_secs(5),
            short_lease: Duration::from_millis(100),
            services_script: PathBuf::from("scripts/services.sh"),
            log_dir: PathBuf::from("target/chaos"),
        }
    }

    /// The shortened run the test command makes.
    pub fn short(seed: u64) -> Self {
        Self {
            events: 2_000,
            poison: 4,
            duration: Duration::from_secs(45),
            kills: 2,
            pg_terminations: 2,
            breaker_open: Duration::from_secs(2),
            ..Self::full(seed)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Kill9,
    FlushAll,
    RedisDown,
    ClickHouseDown,
    PgTerminate,
    SecondWorkerJoins,
    SecondWorkerLeaves,
}

/// The seeded schedule: (seconds after the start, fault).
fn schedule(opts: &ChaosOptions, rng: &mut StdRng) -> Vec<(f64, Fault)> {
    let span = opts.duration.as_secs_f64();
    let mut at = |lo: f64, hi: f64| rng.random_range(lo * span..hi * span);
    let mut s = Vec::new();
    for _ in 0..opts.kills {
        s.push((at(0.05, 0.85), Fault::Kill9));
    }
    for _ in 0..opts.pg_terminations {
        s.push((at(0.05, 0.85), Fault::PgTerminate));
    }
    s.push((at(0.1, 0.6), Fault::FlushAll));
    s.push((at(0.1, 0.6), Fault::RedisDown));
    s.push((at(0.2, 0.7), Fault::ClickHouseDown));
    let join = at(0.1, 0.5);
    s.push((join, Fault::SecondWorkerJoins));
    let leave = join + at(0.15, 0.35);
    s.push((leave, Fault::SecondWorkerLeaves));
    s.sort_by(|a, b| a.0.total_cmp(&b.0));
    s
}

/// The counts at the end, and whether they are exact.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub seed: u64,
    pub produced: usize,
    pub unique: BTreeMap<String, usize>,
    pub poison: usize,
    pub clickhouse_rows: u64,
    pub clickhouse_raw_rows: u64,
    pub processed: BTreeMap<String, i64>,
    pub notifications: i64,
    pub dead_letters: i64,
    pub unexpected_dead_letters: Vec<String>,
    pub missing_dead_letters: Vec<String>,
    pub partitions_committed: usize,
    pub partitions: usize,
    pub faults: Vec<String>,
    /// Times the main worker's process ended and was started again.
    pub worker_restarts: u32,
    pub seconds: f64,
    pub pass: bool,
}

impl Summary {
    /// One line a person can quote.
    pub fn line(&self) -> String {
        let ue = self.unique.get("user-events").copied().unwrap_or(0);
        let no = self.unique.get("notifications").copied().unwrap_or(0);
        format!(
            "chaos seed={} {}: {} produced ({} unique user-events, {} unique notifications, {} poison); \
             ClickHouse FINAL {}/{ue} ({} raw rows); processed_events {}/{ue} + {}/{no}; notifications {}/{no}; \
             dead letters {}/{} ({} unexpected, {} missing); offsets committed {}/{} partitions; faults: {}; {} worker restarts; {:.0} s",
            self.seed,
            if self.pass { "PASS" } else { "FAIL" },
            self.produced,
            ue,
            no,
            self.poison,
            self.clickhouse_rows,
            self.clickhouse_raw_rows,
            self.processed.get("user-events").copied().unwrap_or(0),
            self.processed.get("notifications").copied().unwrap_or(0),
            self.notifications,
            self.dead_letters,
            self.poison,
            self.unexpected_dead_letters.len(),
            self.missing_dead_letters.len(),
            self.partitions_committed,
            self.partitions,
            self.faults.join(", "),
            self.worker_restarts,
            self.seconds,
        )
    }
}

/// One worker slot, restarted whenever its process ends (as a supervisor would) until
/// told to stop.
pub(crate) struct Slot {
    child: Arc<Mutex<Option<Child>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    restarts: Arc<std::sync::atomic::AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Slot {
    /// The running process's pid, if one is running.
    pub(crate) async fn pid(&self) -> Option<u32> {
        self.child.lock().await.as_ref().and_then(|c| c.id())
    }

    pub(crate) fn start(exe: PathBuf, env: Vec<(String, String)>, log: PathBuf) -> Self {
        let child: Arc<Mutex<Option<Child>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let restarts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (c, s, r) = (child.clone(), stop.clone(), restarts.clone());
        let task = tokio::spawn(async move {
            use std::sync::atomic::Ordering;
            while !s.load(Ordering::SeqCst) {
                let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("worker log file");
                let spawned = Command::new(&exe)
                    .arg("run")
                    .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                    .stdin(Stdio::null())
                    .stdout(file.try_clone().expect("log file"))
                    .stderr(file)
                    .kill_on_drop(true)
                    .spawn();
                match spawned {
                    Ok(child) => *c.lock().await = Some(child),
                    Err(e) => {
                        eprintln!("[chaos] cannot start a worker: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
                // Wait for it to end without holding the lock (kill needs it).
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let mut guard = c.lock().await;
                    match guard.as_mut().map(|ch| ch.try_wait()) {
                        Some(Ok(Some(_))) | Some(Err(_)) | None => {
                            *guard = None;
                            break;
                        }
                        Some(Ok(None)) => {}
                    }
                }
                if !s.load(Ordering::SeqCst) {
                    r.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        });
        Self { child, stop, restarts, task }
    }

    /// Signals the running process, waiting (up to 15 s) for one to be running.
    pub(crate) async fn signal(&self, sig: &str) -> bool {
        for _ in 0..150 {
            if let Some(pid) = self.child.lock().await.as_ref().and_then(|c| c.id()) {
                return Command::new("kill").args([sig, &pid.to_string()]).status().await.is_ok_and(|s| s.success());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// SIGTERM, wait for the process, no restart.
    pub(crate) async fn stop(self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.signal("-TERM").await;
        let _ = tokio::time::timeout(Duration::from_secs(40), self.task).await;
    }
}

/// Starts whatever service is down (`scripts/services.sh`), trying three times.
async fn run_script(script: &Path) -> anyhow::Result<()> {
    let mut last = String::new();
    for attempt in 1..=3 {
        let out = Command::new(script).stdin(Stdio::null()).output().await.with_context(|| format!("{script:?}"))?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        eprintln!("[chaos] {script:?} failed (attempt {attempt} of 3): {}", last.trim());
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    bail!("{script:?} failed: {last}")
}

/// Whether ClickHouse and Redis answer (the faults below take them down on purpose; this
/// finds them down when nobody meant it).
async fn services_answer(clients: &Clients) -> (bool, bool) {
    let ch = tokio::time::timeout(Duration::from_secs(5), clients.sink.client().query("SELECT 1").execute())
        .await
        .is_ok_and(|r| r.is_ok());
    let redis = match tokio::time::timeout(Duration::from_secs(5), clients.leases.pool().get()).await {
        Ok(Ok(mut c)) => redis::cmd("PING").query_async::<String>(&mut c).await.is_ok(),
        _ => false,
    };
    (ch, redis)
}

/// One run's own slice of the services (a schema, a ClickHouse database, a Redis key
/// prefix, topics and a consumer group, all named `<prefix>_<random>`), the controller's
/// clients on it, and the environment its workers get. Every function's topics exist.
pub(crate) struct Isolated {
    pub name: String,
    /// The controller's configuration (a small pool of its own).
    pub config: Config,
    pub clients: Clients,
    pub kafka: KafkaConfig,
    pub worker_env: Vec<(String, String)>,
    /// The workers' Postgres pool size: the most connections one may hold.
    pub worker_pool_size: u32,
}

impl Isolated {
    pub(crate) async fn new(prefix: &str, tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        // Random apart from any seed, so a replay never meets an earlier run's leftovers.
        let name = format!("{prefix}_{}", uuid_like(&mut StdRng::from_os_rng()));
        let mut config = Config::load()?;
        let worker_pool_size = config.postgres.max_connections;
        config.postgres.schema = Some(name.clone());
        config.clickhouse.database = name.clone();
        config.redis.key_prefix = name.clone();
        config.postgres.max_connections = 2;
        tweak(&mut config);
        let clients =
            Clients::connect(config.clone()).await.context("services unreachable: run scripts/services.sh")?;
        let mut kafka = KafkaConfig::from_env(&ProcessEnv)?;
        kafka.topic_prefix = format!("{name}.");
        kafka.group_id = name.clone();
        let topics: Vec<String> = crate::all_functions()
            .iter()
            .flat_map(|f| f.spec().topics.iter().map(|t| kafka.topic(t)).collect::<Vec<_>>())
            .collect();
        exactly_once::runtime::worker::create_topics(&kafka, &topics).await?;
        // The workers connect with the run's name, so its Postgres backends can be found.
        let url = config.postgres.url.expose();
        let sep = if url.contains('?') { '&' } else { '?' };
        let worker_env = [
            ("DATABASE_URL", format!("{url}{sep}application_name={name}")),
            ("DATABASE_SCHEMA", name.clone()),
            ("CLICKHOUSE_DATABASE", name.clone()),
            ("REDIS_KEY_PREFIX", name.clone()),
            ("KAFKA_TOPIC_PREFIX", kafka.topic_prefix.clone()),
            ("KAFKA_GROUP_ID", name.clone()),
            ("HTTP_BIND", "127.0.0.1:0".into()),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec();
        Ok(Self { name, config, clients, kafka, worker_env, worker_pool_size })
    }
}

/// Runs the whole thing with `exe` (the `eo` binary) as the worker.
pub async fn run(exe: &Path, opts: &ChaosOptions) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let mut rng = StdRng::seed_from_u64(opts.seed);
    std::fs::create_dir_all(&opts.log_dir)?;
    let run = Isolated::new("chaos", |config| {
        // FLUSHALL of a big Redis takes longer than a guard call may.
        config.redis.timeout = Duration::from_secs(60);
    })
    .await?;
    let (name, config, clients, kafka) = (run.name.clone(), run.config.clone(), &run.clients, run.kafka.clone());
    eprintln!("[chaos] seed {} run {name}; worker logs in {}", opts.seed, opts.log_dir.display());
    let mut worker_env = run.worker_env.clone();
    worker_env.extend(
        [
            ("KAFKA_SESSION_TIMEOUT_MS", "6000".to_owned()),
            ("CLICKHOUSE_BREAKER_OPEN_SECS", opts.breaker_open.as_secs().max(1).to_string()),
            ("REDIS_BREAKER_OPEN_SECS", "2".into()),
            ("CLEANUP_INTERVAL_SECS", "0".into()),
            ("STARTUP_TIMEOUT_SECS", "5".into()),
            ("RUST_LOG", std::env::var("CHAOS_WORKER_LOG").unwrap_or_else(|_| "warn".into())),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );

    let functions = crate::all_functions();
    let producing: Vec<_> =
        functions.iter().filter(|f| ["user-events", "notifications"].contains(&f.spec().name)).cloned().collect();
    let topics: Vec<String> = producing.iter().map(|f| kafka.topic(f.spec().topics[0])).collect();

    // The stream: per function, new events and repeats (same key, same payload), and
    // poison records (not JSON) with their own ids.
    struct Message {
        topic: String,
        id: String,
        payload: Vec<u8>,
    }
    let mut messages = Vec::new();
    let mut unique: BTreeMap<String, usize> = BTreeMap::new();
    let mut poison_ids: HashSet<String> = HashSet::new();
    for (f, topic) in producing.iter().zip(&topics) {
        let name_f = f.spec().name;
        let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
        let mut list = Vec::new();
        for _ in 0..opts.events {
            if !sent.is_empty() && rng.random_bool(0.25) {
                let (id, payload) = sent[rng.random_range(0..sent.len())].clone();
                list.push(Message { topic: topic.clone(), id, payload });
            } else {
                let payload = f.sample(sent.len() as u64).context("function without sample payloads")?;
                let id = format!("{name_f}-{}", uuid_like(&mut rng));
                sent.push((id.clone(), payload.clone()));
                list.push(Message { topic: topic.clone(), id, payload });
            }
        }
        unique.insert(name_f.to_owned(), sent.len());
        for i in 0..opts.poison {
            let id = format!("{name_f}-poison-{i}-{}", uuid_like(&mut rng));
            poison_ids.insert(id.clone());
            let at = rng.random_range(0..=list.len());
            list.insert(at, Message { topic: topic.clone(), id, payload: b"{not json".to_vec() });
        }
        messages.push(list);
    }
    // Interleave the two functions' streams.
    let mut stream = Vec::new();
    let mut its: Vec<_> = messages.into_iter().map(|l| l.into_iter()).collect();
    loop {
        let mut any = false;
        for it in its.iter_mut() {
            if let Some(m) = it.next() {
                stream.push(m);
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    let produced = stream.len();

    let exe = exe.to_path_buf();
    let main_worker = Slot::start(exe.clone(), worker_env.clone(), opts.log_dir.join(format!("{name}-worker-a.log")));

    // The producer: the whole stream, spread evenly over the run.
    let producer_kafka = kafka.clone();
    let span = opts.duration;
    let producer = tokio::spawn(async move {
        let producer = Producer::new(&producer_kafka)?;
        let mut ends: HashMap<(String, i32), i64> = HashMap::new();
        let t0 = Instant::now();
        let n = stream.len().max(1);
        for (i, m) in stream.iter().enumerate() {
            let due = span.mul_f64(i as f64 / n as f64);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let (p, o) = producer.send(&m.topic, Some(m.id.as_bytes()), &m.payload, Some(&m.id)).await?;
            let end = ends.entry((m.topic.clone(), p)).or_insert(0);
            *end = (*end).max(o + 1);
        }
        anyhow::Ok(ends)
    });

    // The faults.
    let plan = schedule(opts, &mut rng);
    for (at, fault) in &plan {
        eprintln!("[chaos] planned at {at:>6.1} s: {fault:?}");
    }
    let mut done_faults = Vec::new();
    let mut second: Option<Slot> = None;
    let mut leaving = Vec::new();
    let t0 = Instant::now();
    for (at, fault) in plan {
        if let Some(wait) = Duration::from_secs_f64(at).checked_sub(t0.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        let t = t0.elapsed().as_secs_f64();
        let what = match fault {
            Fault::Kill9 => {
                let before = main_worker.restarts.load(std::sync::atomic::Ordering::SeqCst);
                if main_worker.signal("-KILL").await {
                    // Let the supervisor see it die and start the next one before the
                    // schedule goes on (another kill at once would hit the same process).
                    for _ in 0..100 {
                        if main_worker.restarts.load(std::sync::atomic::Ordering::SeqCst) > before {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    "kill -9 worker".to_string()
                } else {
                    "kill -9 worker (no process to kill)".to_string()
                }
            }
            Fault::FlushAll => {
                let mut c = clients.leases.pool().get().await.context("Redis for FLUSHALL")?;
                let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.context("FLUSHALL")?;
                "Redis FLUSHALL".to_string()
            }
            Fault::RedisDown => {
                let down = Duration::from_millis(rng.random_range(3000..6000));
                let stopped = Instant::now();
                if let Ok(mut c) = clients.leases.pool().get().await {
                    let _: Result<(), _> = redis::cmd("SHUTDOWN").arg("NOSAVE").query_async(&mut c).await;
                }
                tokio::time::sleep(down).await;
                run_script(&opts.services_script).await?;
                format!(
                    "Redis down {:.1} s (stopped {:.1} s, then started)",
                    stopped.elapsed().as_secs_f64(),
                    down.as_secs_f64()
                )
            }
            Fault::ClickHouseDown => {
                let down = opts.breaker_open * 2 + Duration::from_millis(rng.random_range(0..2000));
                let stopped = Instant::now();
                // The server may close the connection without answering: do not wait on it.
                let shutdown = clients.sink.client().query("SYSTEM SHUTDOWN");
                let _ = tokio::time::timeout(Duration::from_secs(2), shutdown.execute()).await;
                tokio::time::sleep(down).await;
                run_script(&opts.services_script).await?;
                format!(
                    "ClickHouse down {:.1} s (stopped {:.1} s, then started; breaker open {} s)",
                    stopped.elapsed().as_secs_f64(),
                    down.as_secs_f64(),
                    opts.breaker_open.as_secs()
                )
            }
            Fault::PgTerminate => {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                      WHERE application_name = $1 AND pid <> pg_backend_pid()) t",
                )
                .bind(&name)
                .fetch_one(&clients.pg)
                .await?;
                format!("{n} Postgres backends terminated")
            }
            Fault::SecondWorkerJoins => {
                // Its lease TTL is shorter than its batches take: its leases expire under
                // it while it works, and the other worker may take the same events.
                let mut env = worker_env.clone();
                env.push(("GUARD_LEASE_TTL_MS".into(), opts.short_lease.as_millis().to_string()));
                second = Some(Slot::start(exe.clone(), env, opts.log_dir.join(format!("{name}-worker-b.log"))));
                format!("second worker joins (lease TTL {} ms)", opts.short_lease.as_millis())
            }
            Fault::SecondWorkerLeaves => {
                // Its graceful shutdown may take a while (in-flight batches, a breaker
                // open): the schedule goes on meanwhile.
                if let Some(s) = second.take() {
                    leaving.push(tokio::spawn(s.stop()));
                }
                "second worker leaves".to_string()
            }
        };
        eprintln!("[chaos] {t:>6.1} s  {what}");
        done_faults.push(format!("{what} @{t:.0}s"));
        if !matches!(fault, Fault::RedisDown | Fault::ClickHouseDown) {
            let (ch, redis) = services_answer(clients).await;
            if !(ch && redis) {
                let t = t0.elapsed().as_secs_f64();
                eprintln!("[chaos] {t:>6.1} s  found down unplanned: ClickHouse {ch}, Redis {redis}; starting them");
                done_faults.push(format!("UNPLANNED outage (ClickHouse up {ch}, Redis up {redis}) @{t:.0}s"));
                run_script(&opts.services_script).await?;
            }
        }
    }
    let ends = producer.await.context("producer task")??;
    eprintln!("[chaos] produced {produced} messages; waiting for every offset to be committed");
    run_script(&opts.services_script).await?;

    // Wait for the group to commit every partition to its end.
    let partitions = kafka.topic_partitions;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut committed_parts = 0;
    let total_parts = topics.len() * partitions as usize;
    while Instant::now() < deadline {
        committed_parts = 0;
        for t in &topics {
            let committed = committed_offsets(&kafka, t, partitions).await.unwrap_or_default();
            for p in 0..partitions {
                let end = ends.get(&(t.clone(), p)).copied().unwrap_or(0);
                if committed.get(&p).copied().unwrap_or(if end == 0 { 0 } else { -1 }) >= end {
                    committed_parts += 1;
                }
            }
        }
        if committed_parts == total_parts {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let worker_restarts = main_worker.restarts.load(std::sync::atomic::Ordering::SeqCst);
    main_worker.stop().await;
    if let Some(s) = second.take() {
        s.stop().await;
    }
    for l in leaving {
        let _ = l.await;
    }

    // Count. A fresh connection: the controller's own may have been terminated too.
    let clients = Clients::connect(config).await?;
    let clickhouse_rows: u64 =
        clients.sink.client().query("SELECT count() FROM user_events FINAL").fetch_one().await.unwrap_or(0);
    let clickhouse_raw_rows: u64 =
        clients.sink.client().query("SELECT count() FROM user_events").fetch_one().await.unwrap_or(0);
    let rows: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT namespace, status, count(*) FROM processed_events GROUP BY 1, 2")
            .fetch_all(&clients.pg)
            .await?;
    let processed: BTreeMap<String, i64> =
        rows.iter().filter(|r| r.1 == "processed").map(|r| (r.0.clone(), r.2)).collect();
    let notifications: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications").fetch_one(&clients.pg).await?;
    let letters: Vec<String> = sqlx::query_scalar("SELECT event_id FROM dead_letters").fetch_all(&clients.pg).await?;
    let letters_set: HashSet<String> = letters.iter().cloned().collect();
    let mut unexpected: Vec<String> = letters_set.difference(&poison_ids).cloned().collect();
    let mut missing: Vec<String> = poison_ids.difference(&letters_set).cloned().collect();
    unexpected.sort();
    missing.sort();
    let ue = unique.get("user-events").copied().unwrap_or(0);
    let no = unique.get("notifications").copied().unwrap_or(0);
    let pass = clickhouse_rows == ue as u64
        && processed.get("user-events").copied().unwrap_or(0) == ue as i64
        && processed.get("notifications").copied().unwrap_or(0) == no as i64
        && notifications == no as i64
        && letters.len() == poison_ids.len()
        && unexpected.is_empty()
        && missing.is_empty()
        && committed_parts == total_parts;
    let summary = Summary {
        seed: opts.seed,
        produced,
        unique,
        poison: poison_ids.len(),
        clickhouse_rows,
        clickhouse_raw_rows,
        processed,
        notifications,
        dead_letters: letters.len() as i64,
        unexpected_dead_letters: unexpected,
        missing_dead_letters: missing,
        partitions_committed: committed_parts,
        partitions: total_parts,
        faults: done_faults,
        worker_restarts,
        seconds: started.elapsed().as_secs_f64(),
        pass,
    };
    if pass {
        cleanup(&clients, &name).await;
    } else {
        eprintln!("[chaos] kept schema, database and key prefix `{name}` for inspection");
    }
    Ok(summary)
}

pub(crate) async fn cleanup(clients: &Clients, name: &str) {
    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{name}\" CASCADE")).execute(&clients.pg).await;
    let _ = clients.sink.client().query(&format!("DROP DATABASE IF EXISTS {name}")).execute().await;
}

pub(crate) fn uuid_like(rng: &mut StdRng) -> String {
    format!("{:016x}", rng.random::<u64>())[..12].to_owned()
}

pub(crate) async fn committed_offsets(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<HashMap<i32, i64>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::TopicPartitionList;
    let mut config = exactly_once::runtime::worker::client_config(kafka);
    config.set("group.id", &kafka.group_id);
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect())
    })
    .await?
}
