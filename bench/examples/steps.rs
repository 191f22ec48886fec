//! Profiling aid: the guard's steps for a batch of one, timed one by one through the
//! public APIs, next to `Guard::run_batch` doing the same.

use std::time::{Duration, Instant};

use exactly_once::config::GuardConfig;
use exactly_once::guard::{lease, ledger};
use exactly_once::{Clients, Config, Event, EventId, Guard, IdStrategy, Namespace};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = Config::load()?;
    let name = format!("steps_{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    config.postgres.schema = Some(name.clone());
    config.clickhouse.database = name.clone();
    config.redis.key_prefix = name.clone();
    let clients = Clients::connect(config).await?;
    let ns = Namespace::new("steps")?;
    let mode: String =
        sqlx::query_scalar("SELECT current_setting('plan_cache_mode') || ' / ' || current_setting('search_path')")
            .fetch_one(&clients.pg)
            .await?;
    println!("session: {mode}");
    let n = 2000;
    let mut t = [Duration::ZERO; 6];
    for i in 0..n {
        let id = EventId::new(format!("s-{i}"))?;
        let e = Event::new("t", 0, i).with_header("idempotency_key", id.to_string()).with_value("{}");
        let s = Instant::now();
        clients.leases.acquire(&ns, &[&id], "tok", Duration::from_secs(30)).await?;
        t[0] += s.elapsed();
        let s = Instant::now();
        let mut conn = clients.pg.acquire().await?;
        t[2] += s.elapsed();
        let s = Instant::now();
        ledger::lookup(&mut conn, &ns, &[&id]).await?;
        t[1] += s.elapsed();
        let s = Instant::now();
        sqlx::query("SELECT 1").execute(&mut *conn).await?;
        t[5] += s.elapsed();
        let s = Instant::now();
        ledger::confirm(&mut conn, &ns, &[ledger::ConfirmRow { id: &id, event: &e, hash: e.payload_hash() }], true)
            .await?;
        t[3] += s.elapsed();
        drop(conn);
        let s = Instant::now();
        clients
            .leases
            .release(&ns, &[lease::Release { id: &id, done: Some(e.payload_hash()) }], "tok", Duration::from_secs(60))
            .await?;
        t[4] += s.elapsed();
    }
    for (name, d) in
        ["redis acquire", "pg lookup", "pool acquire", "pg confirm", "redis release", "pg SELECT 1"].iter().zip(t)
    {
        println!("{name:<14} {:>8.1} us", d.as_secs_f64() * 1e6 / n as f64);
    }
    struct Noop;
    #[exactly_once::async_trait]
    impl exactly_once::Handler for Noop {
        fn spec(&self) -> exactly_once::FunctionSpec {
            exactly_once::FunctionSpec::new("steps2", &["t"], IdStrategy::Header("idempotency_key".into()))
        }
        async fn handle(
            &self,
            _: &Event,
            _: &mut exactly_once::HandlerContext<'_>,
        ) -> Result<(), exactly_once::HandlerError> {
            Ok(())
        }
    }
    let g = Guard::new(&clients, "steps2", IdStrategy::Header("idempotency_key".into()), GuardConfig::default())?;
    let s = Instant::now();
    for i in 0..n {
        let e = Event::new("t", 0, i).with_header("idempotency_key", format!("g-{i}")).with_value("{}");
        g.run_batch(&Noop, &[e], None).await;
    }
    println!("run_batch      {:>8.1} us", s.elapsed().as_secs_f64() * 1e6 / n as f64);
    let _ = sqlx::query(&format!("DROP SCHEMA \"{name}\" CASCADE")).execute(&clients.pg).await;
    let _ = clients.sink.client().query(&format!("DROP DATABASE {name}")).execute().await;
    Ok(())
}
