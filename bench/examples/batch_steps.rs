//! Profiling aid: the guard's steps for one batch of N (default 1000) new ids, each timed
//! alone through the public APIs, next to the floor's two round trips for the same ids
//! and `Guard::run_batch_deferring_release` doing the whole. The lease step is timed in
//! both forms, and so is the release: plain commands (what a standalone Redis of 7.0 or
//! later gets) and the scripts (a cluster, an older server), on other ids of the same
//! count. Each Redis step also gets Redis's own CPU time (`INFO cpu`), which a busy
//! machine disturbs less than the wall time. Run with
//! `cargo run --release -p bench --example batch_steps -- [N] [batches]`.

use std::time::{Duration, Instant};

use exactly_once::config::GuardConfig;
use exactly_once::guard::{lease, ledger};
use exactly_once::{Clients, Config, Event, EventId, Guard, IdStrategy, Namespace};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let batches: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100);
    let mut config = Config::load()?;
    let name = format!("bsteps_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    config.postgres.schema = Some(name.clone());
    config.clickhouse.database = name.clone();
    config.redis.key_prefix = name.clone();
    let clients = Clients::connect(config).await?;
    let ns = Namespace::new("steps")?;
    let ttl = Duration::from_secs(30);
    let by_script = lease::Leases::connect(
        clients.redis.clone(),
        &name,
        clients.leases.buckets(),
        clients.leases.breaker().clone(),
    )
    .await?;
    by_script.set_calls(lease::Calls::Scripts);
    let mut t = [Duration::ZERO; 8];
    // Redis's own CPU time (INFO cpu) over each Redis step, in seconds.
    let mut cpu = [0f64; 8];
    for b in 0..batches {
        let ids: Vec<EventId> = (0..n).map(|i| EventId::new(format!("s-{b}-{i}"))).collect::<Result<_, _>>()?;
        let refs: Vec<&EventId> = ids.iter().collect();
        let events: Vec<Event> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| Event::new("t", 0, i as i64).with_header("idempotency_key", id.to_string()).with_value("{}"))
            .collect();

        let (s, c) = (Instant::now(), redis_cpu(&clients).await?);
        clients.leases.acquire(&ns, &refs, "tok", ttl).await?;
        t[0] += s.elapsed();
        cpu[0] += redis_cpu(&clients).await? - c;
        let mut conn = clients.pg.acquire().await?;
        let s = Instant::now();
        ledger::lookup(&mut conn, &ns, &refs).await?;
        t[1] += s.elapsed();
        let rows: Vec<ledger::ConfirmRow<'_>> = ids
            .iter()
            .zip(&events)
            .map(|(id, e)| ledger::ConfirmRow { id, event: e, hash: e.payload_hash() })
            .collect();
        let s = Instant::now();
        ledger::confirm(&mut conn, &ns, &rows, true).await?;
        t[2] += s.elapsed();
        drop(conn);
        let releases: Vec<lease::Release<'_>> =
            ids.iter().zip(&events).map(|(id, e)| lease::Release { id, done: Some(e.payload_hash()) }).collect();
        let (s, c) = (Instant::now(), redis_cpu(&clients).await?);
        clients.leases.release(&ns, &releases, "tok", Duration::from_secs(60)).await?;
        t[3] += s.elapsed();
        cpu[3] += redis_cpu(&clients).await? - c;

        // The floor's two round trips for the same number of other ids.
        let floor_ids: Vec<String> = (0..n).map(|i| format!("f-{b}-{i}")).collect();
        let c = redis_cpu(&clients).await?;
        let (redis, pg) = bench::floor_batch(&clients, &name, "floor", &floor_ids).await?;
        t[4] += redis;
        t[5] += pg;
        cpu[4] += redis_cpu(&clients).await? - c;

        let other: Vec<EventId> = (0..n).map(|i| EventId::new(format!("x-{b}-{i}"))).collect::<Result<_, _>>()?;
        let refs: Vec<&EventId> = other.iter().collect();
        let (s, c) = (Instant::now(), redis_cpu(&clients).await?);
        by_script.acquire(&ns, &refs, "tok", ttl).await?;
        t[6] += s.elapsed();
        cpu[6] += redis_cpu(&clients).await? - c;
        let releases: Vec<lease::Release<'_>> =
            other.iter().zip(&events).map(|(id, e)| lease::Release { id, done: Some(e.payload_hash()) }).collect();
        let (s, c) = (Instant::now(), redis_cpu(&clients).await?);
        by_script.release(&ns, &releases, "tok", Duration::from_secs(60)).await?;
        t[7] += s.elapsed();
        cpu[7] += redis_cpu(&clients).await? - c;
    }
    let per = |d: Duration| d.as_secs_f64() * 1e3 / batches as f64;
    println!("batch of {n}, {batches} batches, ms per batch (wall; Redis's own CPU for its steps):");
    for (i, (label, d)) in [
        "redis acquire",
        "pg lookup",
        "pg confirm",
        "redis release",
        "floor: redis SET NX",
        "floor: pg insert",
        "redis acquire script",
        "redis release script",
    ]
    .iter()
    .zip(t)
    .enumerate()
    {
        if cpu[i] > 0.0 {
            println!("  {label:<20} {:>7.2}  (Redis CPU {:>5.2})", per(d), cpu[i] * 1e3 / batches as f64);
        } else {
            println!("  {label:<20} {:>7.2}", per(d));
        }
    }
    println!(
        "  guard path (max(acquire, lookup) + confirm) {:>6.2}; floor (SET NX + insert) {:>6.2}",
        per(t[0]).max(per(t[1])) + per(t[2]),
        per(t[4]) + per(t[5])
    );

    let g = Guard::new(&clients, "bsteps", IdStrategy::Header("idempotency_key".into()), GuardConfig::default())?;
    let s = Instant::now();
    for b in 0..batches {
        let events: Vec<Event> = (0..n)
            .map(|i| Event::new("t", 0, i as i64).with_header("idempotency_key", format!("g-{b}-{i}")).with_value("{}"))
            .collect();
        g.run_batch_deferring_release(&bench::Noop, &events).await;
    }
    g.flush_releases().await;
    println!("  run_batch (deferred release) {:>7.2}", s.elapsed().as_secs_f64() * 1e3 / batches as f64);
    let _ = sqlx::query(&format!("DROP SCHEMA \"{name}\" CASCADE")).execute(&clients.pg).await;
    let _ = clients.sink.client().query(&format!("DROP DATABASE {name}")).execute().await;
    Ok(())
}

/// Redis's CPU time so far (`used_cpu_sys` + `used_cpu_user` of `INFO cpu`), in seconds.
async fn redis_cpu(clients: &Clients) -> anyhow::Result<f64> {
    let mut conn = clients.redis.connection().await.map_err(|e| anyhow::anyhow!(e))?;
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await?;
    Ok(info
        .lines()
        .filter_map(|l| l.strip_prefix("used_cpu_sys:").or_else(|| l.strip_prefix("used_cpu_user:")))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum())
}
