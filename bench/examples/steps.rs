//! Profiling aid: the guard's steps for a batch of one, timed one by one through the
//! public APIs, next to the floor's two steps and `Guard::run_batch` doing the same.
//! Every round of the loop runs each of them once, in turn, so they share the machine's
//! noise; the figures are medians (and 90th percentiles) in microseconds.
//!
//! `cargo run --release -p bench --example steps [rounds]`

use std::time::{Duration, Instant};

use bench::stats::Samples;
use exactly_once::config::GuardConfig;
use exactly_once::guard::{lease, ledger};
use exactly_once::{Clients, Config, Event, EventId, Guard, IdStrategy, Namespace};

/// The steps, in the order they are printed.
const STEPS: [&str; 11] = [
    "floor: SET NX pipeline",
    "floor: INSERT (autocommit)",
    "floor: both",
    "redis acquire",
    "pool acquire",
    "pg lookup",
    "acquire with lookup (joined)",
    "pg confirm (autocommit)",
    "redis release",
    "run_batch (release inline)",
    "run_batch_deferring_release",
];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: i64 = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(2000);
    let mut config = Config::load()?;
    let name = format!("steps_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    config.postgres.schema = Some(name.clone());
    config.clickhouse.database = name.clone();
    config.redis.key_prefix = name.clone();
    let clients = Clients::connect(config).await?;
    println!("Redis leases and markers by {:?}", clients.leases.calls());
    let ns = Namespace::new("steps")?;
    let inline = Guard::new(&clients, "inline", IdStrategy::Header("idempotency_key".into()), GuardConfig::default())?;
    let deferring =
        Guard::new(&clients, "deferring", IdStrategy::Header("idempotency_key".into()), GuardConfig::default())?;
    let mut samples: Vec<Samples> = vec![Samples::default(); STEPS.len()];
    for i in 0..rounds {
        let floor_id = format!("f-{i}");
        let s = Instant::now();
        let (redis, pg) = bench::floor_batch(&clients, &name, "floor", std::slice::from_ref(&floor_id)).await?;
        samples[2].push(s.elapsed());
        samples[0].push(redis);
        samples[1].push(pg);

        let id = EventId::new(format!("s-{i}"))?;
        let e = Event::new("t", 0, i).with_header("idempotency_key", id.to_string()).with_value("{}");
        let s = Instant::now();
        clients.leases.acquire(&ns, &[&id], "tok", Duration::from_secs(30)).await?;
        samples[3].push(s.elapsed());
        let s = Instant::now();
        let mut conn = clients.pg.acquire().await?;
        samples[4].push(s.elapsed());
        let s = Instant::now();
        ledger::lookup(&mut conn, &ns, &[&id]).await?;
        samples[5].push(s.elapsed());
        // Both together, as the guard sends them (a fresh id, so the lease is taken).
        let joined = EventId::new(format!("j-{i}"))?;
        let ids = [&joined];
        let s = Instant::now();
        let (a, b) = tokio::join!(clients.leases.acquire(&ns, &ids, "tok", Duration::from_secs(30)), async {
            let mut c = clients.pg.acquire().await?;
            ledger::lookup(&mut c, &ns, &ids).await
        });
        samples[6].push(s.elapsed());
        a?;
        b?;
        let s = Instant::now();
        ledger::confirm(&mut conn, &ns, &[ledger::ConfirmRow { id: &id, event: &e, hash: e.payload_hash() }], true)
            .await?;
        samples[7].push(s.elapsed());
        drop(conn);
        let s = Instant::now();
        clients
            .leases
            .release(&ns, &[lease::Release { id: &id, done: Some(e.payload_hash()) }], "tok", Duration::from_secs(60))
            .await?;
        samples[8].push(s.elapsed());

        let e = Event::new("t", 0, i).with_header("idempotency_key", format!("g-{i}")).with_value("{}");
        let s = Instant::now();
        let report = inline.run_batch(&bench::Noop, std::slice::from_ref(&e), None).await;
        samples[9].push(s.elapsed());
        anyhow::ensure!(report.all_finished(), "run_batch left the event unfinished");
        let s = Instant::now();
        let report = deferring.run_batch_deferring_release(&bench::Noop, &[e]).await;
        samples[10].push(s.elapsed());
        anyhow::ensure!(report.all_finished(), "run_batch_deferring_release left the event unfinished");
    }
    deferring.flush_releases().await;
    println!("{rounds} rounds, each step once per round; microseconds");
    println!("{:<30} {:>8} {:>8}", "step", "p50", "p90");
    for (name, s) in STEPS.iter().zip(&samples) {
        println!("{name:<30} {:>8.1} {:>8.1}", s.percentile(50.0) * 1e6, s.percentile(90.0) * 1e6);
    }
    let _ = sqlx::query(&format!("DROP SCHEMA \"{name}\" CASCADE")).execute(&clients.pg).await;
    let _ = clients.sink.client().query(&format!("DROP DATABASE {name}")).execute().await;
    Ok(())
}
