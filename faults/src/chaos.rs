//! `eo-faults chaos`: the fault-injection run. Real consumers read a stream with 25% duplicate
//! ids and a few poison records while faults hit at seeded random moments: kill -9 of a
//! consumer, Redis FLUSHALL, Redis and ClickHouse stopped and started again, Postgres
//! backends terminated, a second consumer joining and leaving the group. At the end every
//! store is counted against what was produced; the pass condition is exact.
//!
//! Two runtimes, one schedule: `--runtime worker` runs `eo run` (every function in one
//! worker); `--runtime lambda` runs each function's real binary in Lambda mode behind
//! the local MSK event source mapping (`eo esm`, one per function, with the template's
//! error-handling defaults). There, kill -9 hits the function process mid-invocation,
//! and two faults are added: an invocation stalled past the function's timeout (the
//! process is stopped; the mapping must time it out, kill it and retry), and a poller
//! restart (kill -9 of `eo esm`). Each mapping has a directory as on-failure destination:
//! it must stay empty, since nothing healthy may be discarded.
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
use exactly_once::isolation::Slice;
use exactly_once::producer::Producer;
use exactly_once::{Clients, Config};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;

/// Which runtime consumes the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// `eo run`: the long-running worker.
    Worker,
    /// Each function's binary in Lambda mode behind `eo esm`.
    Lambda,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub seed: u64,
    pub runtime: Runtime,
    /// Lambda: the functions' timeout (the template's is 60 s; shorter here so a stalled
    /// invocation fits in the run).
    pub lambda_timeout: Duration,
    /// Messages per function (user-events, notifications), duplicates included.
    pub events: usize,
    /// Poison records per function (not JSON: dead-lettered).
    pub poison: usize,
    /// How long production is spread over; the faults fall inside it.
    pub duration: Duration,
    /// Records of the `chaos-faults` function asking for each failure a handler or a
    /// table can make (a handler panic, a row ClickHouse rejects), this many of each,
    /// among ten times as many healthy ones.
    pub handler_faults: usize,
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
            runtime: Runtime::Worker,
            lambda_timeout: Duration::from_secs(10),
            events: 20_000,
            poison: 10,
            handler_faults: 10,
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
            handler_faults: 3,
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
    /// Lambda: a function process stopped mid-invocation, past its timeout.
    StallPastTimeout,
    /// Lambda: kill -9 of a mapping (`eo esm`), restarted by the supervisor.
    PollerRestart,
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
    if opts.runtime == Runtime::Lambda {
        s.push((at(0.1, 0.7), Fault::StallPastTimeout));
        s.push((at(0.1, 0.8), Fault::PollerRestart));
    }
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
    pub runtime: Runtime,
    /// Lambda: records the mappings discarded to their on-failure destination.
    pub discarded: usize,
    pub produced: usize,
    pub unique: BTreeMap<String, usize>,
    pub poison: usize,
    /// `chaos_rows` (FINAL) of the healthy chaos-faults records.
    pub chaos_rows: u64,
    pub panics: usize,
    /// Panicking events dead-lettered as `max_attempts`.
    pub panics_dead_lettered: usize,
    pub rejects: usize,
    /// Rejected-row events dead-lettered as `clickhouse_rejected`.
    pub rejects_dead_lettered: usize,
    pub unpublishable: usize,
    /// Unpublishable outbox messages dead-lettered in the outbox.
    pub outbox_dead_lettered: usize,
    /// Other outbox messages not published at the end (there must be none).
    pub outbox_unpublished_others: usize,
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
        let cf = self.unique.get(exactly_once_cli::chaos_function::NAME).copied().unwrap_or(0);
        format!(
            "chaos seed={} runtime={:?} {}: {} produced ({} unique user-events, {} unique notifications, {} poison); \
             ClickHouse FINAL {}/{ue} ({} raw rows); processed_events {}/{ue} + {}/{no}; notifications {}/{no}; \
             chaos-faults rows {}/{cf}, processed {}/{cf}, panics dead-lettered {}/{}, rejected rows dead-lettered {}/{}, unpublishable outbox messages dead-lettered {}/{} ({} others unpublished); \
             dead letters {}/{} ({} unexpected, {} missing); offsets committed {}/{} partitions; {} discarded; faults: {}; {} consumer restarts; {:.0} s",
            self.seed,
            self.runtime,
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
            self.chaos_rows,
            self.processed.get(exactly_once_cli::chaos_function::NAME).copied().unwrap_or(0),
            self.panics_dead_lettered,
            self.panics,
            self.rejects_dead_lettered,
            self.rejects,
            self.outbox_dead_lettered,
            self.unpublishable,
            self.outbox_unpublished_others,
            self.dead_letters,
            self.poison + self.panics + self.rejects,
            self.unexpected_dead_letters.len(),
            self.missing_dead_letters.len(),
            self.partitions_committed,
            self.partitions,
            self.discarded,
            self.faults.join(", "),
            self.worker_restarts,
            self.seconds,
        )
    }
}

/// One supervised process (a worker, a mapping), restarted whenever it ends (as a
/// supervisor would) until told to stop.
pub(crate) struct Supervised {
    child: Arc<Mutex<Option<Child>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    restarts: Arc<std::sync::atomic::AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Supervised {
    /// The running process's pid, if one is running.
    pub(crate) async fn pid(&self) -> Option<u32> {
        self.child.lock().await.as_ref().and_then(|c| c.id())
    }

    /// Runs `exe args...` with `env`, output appended to `log`.
    pub(crate) fn start(exe: PathBuf, args: Vec<String>, env: Vec<(String, String)>, log: PathBuf) -> Self {
        let child: Arc<Mutex<Option<Child>>> = Arc::default();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let restarts = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (c, s, r) = (child.clone(), stop.clone(), restarts.clone());
        let task = tokio::spawn(async move {
            use std::sync::atomic::Ordering;
            while !s.load(Ordering::SeqCst) {
                let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("worker log file");
                let spawned = Command::new(&exe)
                    .args(&args)
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

/// The consumers of one run: one worker, or one mapping per function (each with its
/// function process as a child), every process restarted by its [`Supervised`] when it ends.
struct Fleet {
    /// (function, slot); the function is `None` for the worker.
    slots: Vec<(Option<&'static str>, Supervised)>,
}

impl Fleet {
    fn start(
        runtime: Runtime,
        exe: &Path,
        env: &[(String, String)],
        run: &str,
        label: &str,
        opts: &ChaosOptions,
        functions: &[&'static str],
    ) -> Self {
        let log = |what: &str| opts.log_dir.join(format!("{run}-{label}-{what}.log"));
        let slots = match runtime {
            Runtime::Worker => {
                vec![(None, Supervised::start(exe.to_path_buf(), vec!["run".into()], env.to_vec(), log("worker")))]
            }
            Runtime::Lambda => functions
                .iter()
                .map(|&f| {
                    // The template's defaults, but for the timeout; a directory as the
                    // on-failure destination so anything discarded is seen.
                    let args = [
                        "esm",
                        "--function",
                        f,
                        "--consumer-group-prefix",
                        run,
                        "--timeout",
                        &opts.lambda_timeout.as_secs().to_string(),
                        "--on-failure-destination",
                        &format!("file://{}", discarded_dir(opts, run).display()),
                        "--max-init-failures",
                        "1000",
                    ]
                    .map(str::to_owned)
                    .to_vec();
                    (Some(f), Supervised::start(exe.to_path_buf(), args, env.to_vec(), log(f)))
                })
                .collect(),
        };
        Self { slots }
    }

    fn restarts(&self) -> u32 {
        self.slots.iter().map(|(_, s)| s.restarts.load(std::sync::atomic::Ordering::SeqCst)).sum()
    }

    /// A seeded choice of slot.
    fn pick(&self, rng: &mut StdRng) -> &(Option<&'static str>, Supervised) {
        &self.slots[rng.random_range(0..self.slots.len())]
    }

    /// kill -9 of the consumer doing the work: the worker, or a function process
    /// mid-invocation (its mapping starts it again, cold).
    async fn kill(&self, rng: &mut StdRng) -> String {
        let (function, slot) = self.pick(rng);
        match function {
            None => {
                let before = slot.restarts.load(std::sync::atomic::Ordering::SeqCst);
                if !slot.signal("-KILL").await {
                    return "kill -9 worker (no process to kill)".into();
                }
                // Let the supervisor see it die and start the next one before the
                // schedule goes on (another kill at once would hit the same process).
                for _ in 0..100 {
                    if slot.restarts.load(std::sync::atomic::Ordering::SeqCst) > before {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                "kill -9 worker".into()
            }
            Some(f) => match function_pid(slot).await {
                Some(pid) if signal(pid, "-KILL").await => format!("kill -9 {f} function process"),
                _ => format!("kill -9 {f} function process (none running)"),
            },
        }
    }

    /// Lambda: stops a function process; its mapping times the invocation out and kills it.
    async fn stall(&self, rng: &mut StdRng, timeout: Duration) -> String {
        let (function, slot) = self.pick(rng);
        let f = function.unwrap_or("worker");
        let Some(pid) = function_pid(slot).await else { return format!("{f} function stall (none running)") };
        if !signal(pid, "-STOP").await {
            return format!("{f} function stall (the process was gone)");
        }
        // Wait for the mapping to time the invocation out and replace the process, so
        // no other fault (a kill -9) hits the stopped one first.
        let started = Instant::now();
        while started.elapsed() < timeout + Duration::from_secs(20) {
            if std::fs::metadata(format!("/proc/{pid}")).is_err() {
                return format!(
                    "{f} function stalled past its {} s timeout (replaced after {:.1} s)",
                    timeout.as_secs(),
                    started.elapsed().as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        format!("{f} function stalled, NOT replaced within its timeout")
    }

    /// Lambda: kill -9 of a mapping; its supervisor starts it again.
    async fn restart_poller(&self, rng: &mut StdRng) -> String {
        let (function, slot) = self.pick(rng);
        let f = function.unwrap_or("worker");
        let orphan = function_pid(slot).await;
        if !slot.signal("-KILL").await {
            return format!("{f} poller restart (no process)");
        }
        // Its function process loses its Runtime API and exits; make sure of it.
        if let Some(pid) = orphan {
            signal(pid, "-KILL").await;
        }
        format!("{f} poller killed and restarted")
    }

    async fn stop(self) {
        for (_, slot) in self.slots {
            slot.stop().await;
        }
    }
}

/// Where a run's mappings put what they discard.
fn discarded_dir(opts: &ChaosOptions, run: &str) -> PathBuf {
    let dir = opts.log_dir.join(format!("{run}-discarded"));
    std::path::absolute(&dir).unwrap_or(dir)
}

async fn signal(pid: u32, sig: &str) -> bool {
    Command::new("kill").args([sig, &pid.to_string()]).status().await.is_ok_and(|s| s.success())
}

/// The function process a mapping runs (its child), waiting up to 10 s for one.
async fn function_pid(slot: &Supervised) -> Option<u32> {
    for _ in 0..100 {
        if let Some(parent) = slot.pid().await {
            let tasks = std::fs::read_dir(format!("/proc/{parent}/task")).ok()?;
            let child = tasks
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
                .flat_map(|c| c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()).collect::<Vec<_>>())
                .next();
            if child.is_some() {
                return child;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
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
    let redis = clients.redis.ping(Duration::from_secs(5)).await;
    (ch, redis)
}

/// One run's own slice of the services (a schema, a ClickHouse database, a Redis key
/// prefix, topics and a consumer group, all named `<prefix>_<random>`), the controller's
/// clients on it, and the environment its workers get. Every function's topics exist.
pub(crate) struct Isolated {
    pub slice: Slice,
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
        let slice = Slice::new(prefix);
        let name = slice.name().to_owned();
        let mut config = Config::load()?;
        let worker_pool_size = config.postgres.max_connections;
        slice.apply(&mut config);
        config.postgres.max_connections = 2;
        tweak(&mut config);
        let clients =
            Clients::connect(config.clone()).await.context("services unreachable: run scripts/services.sh")?;
        let mut kafka = KafkaConfig::from_env(&ProcessEnv)?;
        slice.apply_kafka(&mut kafka);
        let with_chaos = || {
            let mut f = exactly_once_cli::all_functions();
            f.push(std::sync::Arc::new(exactly_once_cli::chaos_function::ChaosFaults));
            f
        };
        let topics: Vec<String> = with_chaos()
            .iter()
            .flat_map(|f| f.spec().topics.iter().map(|t| kafka.topic(t)).collect::<Vec<_>>())
            .collect();
        exactly_once::runtime::worker::create_topics(&kafka, &topics).await?;
        // What `eo migrate` does (Lambda functions only check it at init).
        for f in with_chaos() {
            let ddl = f.spec().clickhouse_ddl;
            if !ddl.trim().is_empty() {
                clients.sink.apply_ddl(ddl).await?;
            }
        }
        // The workers connect with the run's name, so its Postgres backends can be found.
        let url = config.postgres.url.expose();
        let sep = if url.contains('?') { '&' } else { '?' };
        let mut worker_env = slice.env();
        worker_env.push(("DATABASE_URL".into(), format!("{url}{sep}application_name={name}")));
        worker_env.push(("HTTP_BIND".into(), "127.0.0.1:0".into()));
        Ok(Self { slice, name, config, clients, kafka, worker_env, worker_pool_size })
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
            (exactly_once_cli::chaos_function::ENABLE_VAR, "1".into()),
            ("RUST_LOG", std::env::var("CHAOS_WORKER_LOG").unwrap_or_else(|_| "warn".into())),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );

    let functions = exactly_once_cli::all_functions();
    let producing: Vec<_> =
        functions.iter().filter(|f| ["user-events", "notifications"].contains(&f.spec().name)).cloned().collect();
    let topics: Vec<String> = producing.iter().map(|f| kafka.topic(f.spec().topics[0])).collect();

    let chaos_topic = kafka.topic(exactly_once_cli::chaos_function::TOPICS[0]);
    let (stream, expected) = plan_stream(opts, &mut rng, &producing, &topics, &chaos_topic)?;
    let mut topics = topics;
    topics.push(chaos_topic);
    let produced = stream.len();

    let exe = exe.to_path_buf();
    let mut names: Vec<&'static str> = producing.iter().map(|f| f.spec().name).collect();
    names.push(exactly_once_cli::chaos_function::NAME);
    if opts.runtime == Runtime::Lambda {
        std::fs::create_dir_all(discarded_dir(opts, &name))?;
        for f in &names {
            let binary = exe.parent().map(|d| d.join(f)).unwrap_or_default();
            if !binary.is_file() {
                bail!("no function binary {}: build it first (cargo build -p {f})", binary.display());
            }
        }
    }
    let main_worker = Fleet::start(opts.runtime, &exe, &worker_env, &name, "a", opts, &names);

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

    // The faults, on their schedule.
    let faults = FaultRun { opts, clients, name: &name, worker_env: &worker_env, exe: &exe, names: &names };
    let (done_faults, mut second, leaving) = faults.inject(&main_worker, &mut rng).await?;
    let ends = producer.await.context("producer task")??;
    eprintln!("[chaos] produced {produced} messages; waiting for every offset to be committed");
    run_script(&opts.services_script).await?;

    let total_parts = topics.len() * kafka.topic_partitions as usize;
    let committed_parts = wait_for_commits(&kafka, opts, &name, &topics, &names, &ends).await;
    // Every unpublishable outbox message dead-lettered and nothing else left queued. The
    // worker's relay drains on its own; a Lambda drains after invocations and on its
    // schedule, which this loop stands in for (one drain per second, as the controller).
    let relay = exactly_once::outbox::Relay::new(clients.pg.clone(), &kafka, clients.kafka_breaker.clone())?;
    let outbox_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (queued, dead): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE published_at IS NULL AND dead_lettered_at IS NULL),
                    count(*) FILTER (WHERE dead_lettered_at IS NOT NULL)
             FROM outbox",
        )
        .fetch_one(&clients.pg)
        .await
        .unwrap_or((-1, -1));
        if (queued == 0 && dead as usize >= expected.unpublishable_ids.len()) || Instant::now() > outbox_deadline {
            break;
        }
        if opts.runtime == Runtime::Lambda {
            if let Err(e) = relay.drain_once().await {
                eprintln!("[chaos] outbox drain (the schedule's stand-in) failed: {e}");
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(relay);
    let worker_restarts = main_worker.restarts();
    main_worker.stop().await;
    if let Some(s) = second.take() {
        s.stop().await;
    }
    for l in leaving {
        let _ = l.await;
    }

    // Count. A fresh connection: the controller's own may have been terminated too.
    let Expected { unique, poison_ids, panic_ids, reject_ids, unpublishable_ids, chaos_ok } = expected;
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
    let chaos_rows: u64 = clients
        .sink
        .client()
        .query("SELECT count() FROM chaos_rows FINAL WHERE d != 'not a date'")
        .fetch_one()
        .await
        .unwrap_or(0);
    let letters: Vec<(String, String)> =
        sqlx::query_as("SELECT event_id, reason FROM dead_letters").fetch_all(&clients.pg).await?;
    let letters: Vec<(String, String)> = letters.into_iter().map(|(id, reason)| (sent_key(&id), reason)).collect();
    // Each kind with its own reason: a panic runs out of attempts, a rejected row is
    // dead-lettered as such at once.
    let panics_dead_lettered =
        letters.iter().filter(|(id, reason)| panic_ids.contains(id) && reason == "max_attempts").count();
    let rejects_dead_lettered =
        letters.iter().filter(|(id, reason)| reject_ids.contains(id) && reason == "clickhouse_rejected").count();
    let letters: Vec<String> = letters.into_iter().map(|(id, _)| id).collect();
    // The outbox: the unpublishable messages dead-lettered as too large, exactly those;
    // every other message published.
    let outbox: Vec<(String, Option<String>, bool)> =
        sqlx::query_as("SELECT event_id, dead_letter_reason, published_at IS NOT NULL FROM outbox")
            .fetch_all(&clients.pg)
            .await?;
    let outbox: Vec<(String, Option<String>, bool)> =
        outbox.into_iter().map(|(id, reason, published)| (sent_key(&id), reason, published)).collect();
    let outbox_dead_lettered =
        outbox.iter().filter(|(id, reason, _)| unpublishable_ids.contains(id) && reason.is_some()).count();
    let outbox_unpublished_others =
        outbox.iter().filter(|(id, _, published)| !unpublishable_ids.contains(id) && !published).count();
    let letters_set: HashSet<String> = letters.iter().cloned().collect();
    let expected_letters: HashSet<String> = poison_ids.union(&panic_ids).chain(reject_ids.iter()).cloned().collect();
    let mut unexpected: Vec<String> = letters_set.difference(&expected_letters).cloned().collect();
    let mut missing: Vec<String> = expected_letters.difference(&letters_set).cloned().collect();
    unexpected.sort();
    missing.sort();
    let ue = unique.get("user-events").copied().unwrap_or(0);
    let no = unique.get("notifications").copied().unwrap_or(0);
    // Lambda: records the mappings gave up on (there must be none).
    let discarded = discarded_records(&discarded_dir(opts, &name));
    let pass = discarded == 0
        && clickhouse_rows == ue as u64
        && processed.get("user-events").copied().unwrap_or(0) == ue as i64
        && processed.get("notifications").copied().unwrap_or(0) == no as i64
        && notifications == no as i64
        && letters.len() == expected_letters.len()
        && chaos_rows == chaos_ok as u64
        && processed.get(exactly_once_cli::chaos_function::NAME).copied().unwrap_or(0) == chaos_ok as i64
        && panics_dead_lettered == panic_ids.len()
        && rejects_dead_lettered == reject_ids.len()
        && outbox_dead_lettered == unpublishable_ids.len()
        && outbox_unpublished_others == 0
        && unexpected.is_empty()
        && missing.is_empty()
        && committed_parts == total_parts;
    let summary = Summary {
        seed: opts.seed,
        runtime: opts.runtime,
        discarded,
        produced,
        unique,
        poison: poison_ids.len(),
        chaos_rows,
        panics: panic_ids.len(),
        panics_dead_lettered,
        rejects: reject_ids.len(),
        rejects_dead_lettered,
        unpublishable: unpublishable_ids.len(),
        outbox_dead_lettered,
        outbox_unpublished_others,
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
        run.slice.remove(&run.config, Duration::from_secs(30)).await;
    } else {
        eprintln!("[chaos] kept schema, database and key prefix `{name}` for inspection");
    }
    Ok(summary)
}

/// What the fault schedule acts on.
struct FaultRun<'a> {
    opts: &'a ChaosOptions,
    clients: &'a Clients,
    /// The run's name (its Postgres application name, schema, group prefix).
    name: &'a str,
    worker_env: &'a [(String, String)],
    exe: &'a Path,
    names: &'a [&'static str],
}

impl FaultRun<'_> {
    /// Makes the faults of the seed's schedule at their times, against `main` (and a
    /// second consumer it starts and stops); after each, services found down unplanned
    /// are started again (and said so). Returns what was done, the second consumer if
    /// it is still there, and those leaving.
    async fn inject(
        &self,
        main: &Fleet,
        rng: &mut StdRng,
    ) -> anyhow::Result<(Vec<String>, Option<Fleet>, Vec<tokio::task::JoinHandle<()>>)> {
        let (opts, clients) = (self.opts, self.clients);
        let plan = schedule(opts, rng);
        for (at, fault) in &plan {
            eprintln!("[chaos] planned at {at:>6.1} s: {fault:?}");
        }
        let mut done_faults = Vec::new();
        let mut second: Option<Fleet> = None;
        let mut leaving = Vec::new();
        let t0 = Instant::now();
        for (at, fault) in plan {
            if let Some(wait) = Duration::from_secs_f64(at).checked_sub(t0.elapsed()) {
                tokio::time::sleep(wait).await;
            }
            let t = t0.elapsed().as_secs_f64();
            let what = match fault {
                Fault::Kill9 => main.kill(rng).await,
                Fault::StallPastTimeout => main.stall(rng, opts.lambda_timeout).await,
                Fault::PollerRestart => main.restart_poller(rng).await,
                Fault::FlushAll => {
                    let mut c = clients
                        .redis
                        .connection()
                        .await
                        .map_err(|e| anyhow::anyhow!(e))
                        .context("Redis for FLUSHALL")?;
                    let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.context("FLUSHALL")?;
                    "Redis FLUSHALL".to_string()
                }
                Fault::RedisDown => {
                    let down = Duration::from_millis(rng.random_range(3000..6000));
                    let stopped = Instant::now();
                    if let Ok(mut c) = clients.redis.connection().await {
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
                    .bind(self.name)
                    .fetch_one(&clients.pg)
                    .await?;
                    format!("{n} Postgres backends terminated")
                }
                Fault::SecondWorkerJoins => {
                    // Its lease TTL is shorter than its batches take: its leases expire under
                    // it while it works, and the other worker may take the same events.
                    let mut env = self.worker_env.to_vec();
                    env.push(("GUARD_LEASE_TTL_MS".into(), opts.short_lease.as_millis().to_string()));
                    second = Some(Fleet::start(opts.runtime, self.exe, &env, self.name, "b", opts, self.names));
                    format!("second consumer joins (lease TTL {} ms)", opts.short_lease.as_millis())
                }
                Fault::SecondWorkerLeaves => {
                    // Its graceful shutdown may take a while (in-flight batches, a breaker
                    // open): the schedule goes on meanwhile.
                    if let Some(s) = second.take() {
                        leaving.push(tokio::spawn(s.stop()));
                    }
                    "second consumer leaves".to_string()
                }
            };
            eprintln!("[chaos] {t:>6.1} s  {what}");
            done_faults.push(format!("{what} @{t:.0}s"));
            if !matches!(fault, Fault::RedisDown | Fault::ClickHouseDown) {
                let (ch, redis) = services_answer(clients).await;
                if !(ch && redis) {
                    let t = t0.elapsed().as_secs_f64();
                    eprintln!(
                        "[chaos] {t:>6.1} s  found down unplanned: ClickHouse {ch}, Redis {redis}; starting them"
                    );
                    done_faults.push(format!("UNPLANNED outage (ClickHouse up {ch}, Redis up {redis}) @{t:.0}s"));
                    run_script(&opts.services_script).await?;
                }
            }
        }
        Ok((done_faults, second, leaving))
    }
}

/// One message of the stream the run produces.
struct Message {
    topic: String,
    id: String,
    payload: Vec<u8>,
}

/// What the stream must come to: the exact counts the run checks at the end.
struct Expected {
    /// Distinct events per function.
    unique: BTreeMap<String, usize>,
    /// Records that are not JSON (dead-lettered at once).
    poison_ids: HashSet<String>,
    /// chaos-faults records whose handler panics (dead-lettered after their attempts).
    panic_ids: HashSet<String>,
    /// chaos-faults records whose row ClickHouse rejects (dead-lettered at once).
    reject_ids: HashSet<String>,
    /// chaos-faults records that publish a message Kafka refuses (dead-lettered in the
    /// outbox; the event itself lands).
    unpublishable_ids: HashSet<String>,
    /// chaos-faults events whose row lands.
    chaos_ok: usize,
}

/// The stream, drawn from the seed: per producing function new events and repeats (same
/// key, same payload) and poison records (not JSON) with their own ids; for chaos-faults
/// healthy records, handler panics, rows ClickHouse rejects and unpublishable outbox
/// messages, each with its own id. The functions' streams are interleaved.
fn plan_stream(
    opts: &ChaosOptions,
    rng: &mut StdRng,
    producing: &[Arc<dyn exactly_once::Handler>],
    topics: &[String],
    chaos_topic: &str,
) -> anyhow::Result<(Vec<Message>, Expected)> {
    let mut messages = Vec::new();
    let mut unique: BTreeMap<String, usize> = BTreeMap::new();
    let mut poison_ids: HashSet<String> = HashSet::new();
    for (f, topic) in producing.iter().zip(topics) {
        let name_f = f.spec().name;
        let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
        let mut list = Vec::new();
        for _ in 0..opts.events {
            if !sent.is_empty() && rng.random_bool(0.25) {
                let (id, payload) = sent[rng.random_range(0..sent.len())].clone();
                list.push(Message { topic: topic.clone(), id, payload });
            } else {
                let payload = f.sample(sent.len() as u64).context("function without sample payloads")?;
                let id = format!("{name_f}-{}", uuid_like(rng));
                sent.push((id.clone(), payload.clone()));
                list.push(Message { topic: topic.clone(), id, payload });
            }
        }
        unique.insert(name_f.to_owned(), sent.len());
        for i in 0..opts.poison {
            let id = format!("{name_f}-poison-{i}-{}", uuid_like(rng));
            poison_ids.insert(id.clone());
            let at = rng.random_range(0..=list.len());
            list.insert(at, Message { topic: topic.clone(), id, payload: b"{not json".to_vec() });
        }
        messages.push(list);
    }
    let mut panic_ids: HashSet<String> = HashSet::new();
    let mut reject_ids: HashSet<String> = HashSet::new();
    let mut unpublishable_ids: HashSet<String> = HashSet::new();
    let chaos_ok = opts.handler_faults * 10;
    {
        use exactly_once_cli::chaos_function::{ChaosFaults, Kind};
        let mut list = Vec::new();
        for i in 0..chaos_ok {
            let id = format!("chaos-ok-{i}-{}", uuid_like(rng));
            list.push(Message { topic: chaos_topic.to_owned(), id, payload: ChaosFaults::payload(Kind::Ok) });
        }
        for i in 0..opts.handler_faults {
            for (kind, ids) in [
                (Kind::Panic, &mut panic_ids),
                (Kind::Reject, &mut reject_ids),
                (Kind::Unpublishable, &mut unpublishable_ids),
            ] {
                let id = format!("chaos-{kind:?}-{i}-{}", uuid_like(rng)).to_lowercase();
                ids.insert(id.clone());
                let at = rng.random_range(0..=list.len());
                list.insert(at, Message { topic: chaos_topic.to_owned(), id, payload: ChaosFaults::payload(kind) });
            }
        }
        messages.push(list);
    }
    // An unpublishable message's event is itself confirmed: its row lands.
    let chaos_ok = chaos_ok + opts.handler_faults;
    unique.insert(exactly_once_cli::chaos_function::NAME.to_owned(), chaos_ok);

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
    Ok((stream, Expected { unique, poison_ids, panic_ids, reject_ids, unpublishable_ids, chaos_ok }))
}

/// Waits (up to four minutes) for every partition of every topic to be committed to its
/// end; returns how many are.
async fn wait_for_commits(
    kafka: &KafkaConfig,
    opts: &ChaosOptions,
    name: &str,
    topics: &[String],
    names: &[&str],
    ends: &HashMap<(String, i32), i64>,
) -> usize {
    let partitions = kafka.topic_partitions;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut committed_parts = 0;
    let total_parts = topics.len() * partitions as usize;
    while Instant::now() < deadline {
        committed_parts = 0;
        for (t, f) in topics.iter().zip(names) {
            let mut group = kafka.clone();
            if opts.runtime == Runtime::Lambda {
                group.group_id = format!("{name}-{f}");
            }
            let committed = committed_offsets(&group, t, partitions).await.unwrap_or_default();
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
    committed_parts
}

/// Records in a mapping's on-failure directory (one JSON failure record per discarded
/// batch, its records under `payload.records`); 0 when there is no such directory.
fn discarded_records(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .map(|bytes| {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
            v["payload"]["records"]
                .as_object()
                .map_or(1, |r| r.values().filter_map(|l| l.as_array()).map(Vec::len).sum())
        })
        .sum()
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

/// The `idempotency_key` a message was sent with, from the id the guard filed it under:
/// `h:<key>` in the v2 format, the key itself in v1 (the run may use either).
fn sent_key(event_id: &str) -> String {
    event_id.strip_prefix("h:").unwrap_or(event_id).to_owned()
}
