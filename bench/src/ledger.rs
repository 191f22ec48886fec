//! The ledger at scale: how `processed_events` behaves as it grows, and whether
//! retention's batched deletes keep it flat under a steady confirm rate.
//!
//! `cargo run --release -p bench --bin ledger`:
//! 1. At each size (rows already in the table, default 0 and 10M): lookup throughput (the
//!    guard's durable check, 500 ids per statement, half of them present), confirm
//!    throughput (the guard at batch 500 on new ids, no-op handler), and bytes per id
//!    (table and indexes over the row count).
//! 2. For `--steady-secs` (default 600) on an empty ledger: the guard confirms new ids as
//!    fast as it can while retention deletes rows older than `--window-secs` every
//!    `--cleanup-every-secs`, as the worker's cleanup does; live and dead tuples, sizes
//!    and the rate are sampled. Retention keeps up when the live rows settle near
//!    rate x window and the table stops growing.

use std::time::{Duration, Instant};

use exactly_once::config::{GuardConfig, RetentionConfig};
use exactly_once::{EventId, Guard, IdStrategy, Namespace};
use serde::Serialize;

use crate::stats::Samples;
use crate::{fill, guard, Env, Noop};

/// What to run.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// Ledger sizes to measure at, ascending (rows put in before measuring).
    pub sizes: Vec<u64>,
    /// New ids confirmed for the confirm figure at each size.
    pub confirm_events: usize,
    /// Lookups (of 500 ids) for the lookup figure at each size.
    pub lookups: usize,
    /// Length of the steady run (0 skips it).
    pub steady_secs: u64,
    /// Retention window of the steady run.
    pub window_secs: u64,
    /// How often the steady run's cleanup runs.
    pub cleanup_every_secs: u64,
    /// `CLEANUP_BATCH_SIZE` for the steady run.
    pub cleanup_batch: i64,
    /// How often the steady run samples the table.
    pub sample_every_secs: u64,
    /// Reset `processed_events`' autovacuum storage parameters to the server's defaults
    /// before measuring, to compare against the migration's settings.
    pub table_defaults: bool,
}

/// Figures at one ledger size.
#[derive(Debug, Clone, Serialize)]
pub struct SizeRow {
    pub rows: u64,
    pub lookup_ids_per_sec: f64,
    pub lookup_p50_ms: f64,
    pub lookup_p99_ms: f64,
    /// Share of the looked-up ids found (half are present by construction).
    pub lookup_found_share: f64,
    pub confirm_events_per_sec: f64,
    pub confirm_batch_p50_ms: f64,
    pub table_bytes_per_id: f64,
    pub index_bytes_per_id: f64,
}

/// One sample of the steady run.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub secs: f64,
    pub confirmed: u64,
    pub rate_per_sec: f64,
    pub deleted: u64,
    pub live_rows: i64,
    pub dead_rows: i64,
    pub table_mib: f64,
    pub index_mib: f64,
    /// Vacuum passes finished on the table so far (autovacuum's and manual ones).
    pub vacuums: i64,
}

/// The steady run's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Steady {
    pub window_secs: u64,
    pub samples: Vec<Sample>,
    /// Mean confirm rate over the run.
    pub rate_per_sec: f64,
    /// Live rows at the end against rate x window.
    pub live_vs_expected: f64,
    /// Table and index size at the end against their size at half-time.
    pub size_end_vs_half: f64,
    pub kept_up: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LedgerReport {
    pub machine: String,
    pub options: String,
    /// The server's `autovacuum` setting: with it off no table is vacuumed on its own,
    /// whatever its storage parameters say.
    pub server_autovacuum: String,
    /// `processed_events`' storage parameters as measured (the migration's, or none).
    pub table_options: Vec<String>,
    pub sizes: Vec<SizeRow>,
    pub steady: Option<Steady>,
}

fn fresh_batch(seq: &mut u64, n: usize) -> Vec<exactly_once::Event> {
    (0..n)
        .map(|_| {
            *seq += 1;
            exactly_once::Event::new("ledger", (*seq % 12) as i32, *seq as i64)
                .with_header("idempotency_key", uuid::Uuid::new_v4().to_string())
                .with_value(r#"{"user_id":"u1","type":"created","occurred_at":1700000000}"#)
        })
        .collect()
}

async fn sizes_of(env: &Env) -> anyhow::Result<(i64, i64, i64)> {
    let (table, index): (i64, i64) =
        sqlx::query_as("SELECT pg_table_size('processed_events'), pg_indexes_size('processed_events')")
            .fetch_one(&env.clients.pg)
            .await?;
    let rows = exactly_once::retention::table_size(&env.clients.pg).await?;
    Ok((rows, table, index))
}

/// Resets the table's autovacuum parameters when asked, and says what is in force.
async fn prepare_table(env: &Env, opts: &LedgerOptions) -> anyhow::Result<(String, Vec<String>)> {
    if opts.table_defaults {
        sqlx::query(
            "ALTER TABLE processed_events RESET (autovacuum_vacuum_threshold, autovacuum_vacuum_scale_factor, \
             autovacuum_vacuum_insert_threshold, autovacuum_vacuum_insert_scale_factor, autovacuum_analyze_threshold, \
             autovacuum_analyze_scale_factor, autovacuum_vacuum_cost_limit)",
        )
        .execute(&env.clients.pg)
        .await?;
    }
    let server: String = sqlx::query_scalar("SELECT current_setting('autovacuum')").fetch_one(&env.clients.pg).await?;
    let table: Option<Vec<String>> =
        sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = 'processed_events'::regclass")
            .fetch_one(&env.clients.pg)
            .await?;
    Ok((server, table.unwrap_or_default()))
}

async fn at_size(env: &Env, rows: u64, opts: &LedgerOptions) -> anyhow::Result<SizeRow> {
    // Lookups: 500 ids, half present (filler rows are md5 of their number), half not.
    let ns = Namespace::new("filler")?;
    let mut samples = Samples::default();
    let mut found = 0usize;
    let started = Instant::now();
    let mut conn = env.clients.pg.acquire().await?;
    for l in 0..opts.lookups as i64 {
        // Filler rows are md5 of their number: Postgres names 250 present ones.
        let mut texts: Vec<String> = if rows > 0 {
            sqlx::query_scalar("SELECT md5(((g * 104729 + $1) % $2)::text) FROM generate_series(0, 249) g")
                .bind(l * 7919)
                .bind(rows as i64)
                .fetch_all(&mut *conn)
                .await?
        } else {
            Vec::new()
        };
        texts.extend((texts.len()..500).map(|_| uuid::Uuid::new_v4().to_string()));
        let ids: Vec<EventId> = texts.into_iter().map(EventId::new).collect::<Result<_, _>>()?;
        let refs: Vec<&EventId> = ids.iter().collect();
        let t = Instant::now();
        found += exactly_once::guard::ledger::lookup(&mut conn, &ns, &refs).await?.len();
        samples.push(t.elapsed());
    }
    drop(conn);
    let lookup_secs = started.elapsed().as_secs_f64();

    let mut seq = rows * 10;
    let events = fresh_batch(&mut seq, opts.confirm_events);
    let confirm = guard(env, &format!("confirm-{rows}"), &events, 500).await?;

    sqlx::query("ANALYZE processed_events").execute(&env.clients.pg).await?;
    let (count, table, index) = sizes_of(env).await?;
    let count = count.max(1) as f64;
    Ok(SizeRow {
        rows,
        lookup_ids_per_sec: (opts.lookups * 500) as f64 / lookup_secs,
        lookup_p50_ms: samples.percentile(50.0) * 1e3,
        lookup_p99_ms: samples.percentile(99.0) * 1e3,
        lookup_found_share: found as f64 / (opts.lookups * 500) as f64,
        confirm_events_per_sec: confirm.events_per_sec,
        confirm_batch_p50_ms: confirm.batch_p50_ms,
        table_bytes_per_id: table as f64 / count,
        index_bytes_per_id: index as f64 / count,
    })
}

async fn steady(opts: &LedgerOptions) -> anyhow::Result<Steady> {
    let env = Env::new().await?;
    let result = async {
        prepare_table(&env, opts).await?;
        steady_in(&env, opts).await
    }
    .await;
    env.cleanup().await;
    result
}

async fn steady_in(env: &Env, opts: &LedgerOptions) -> anyhow::Result<Steady> {
    // Markers expire fast: this run is about Postgres, and Redis must not fill up.
    let config = GuardConfig { done_ttl: Duration::from_secs(60), ..GuardConfig::default() };
    let g = Guard::new(&env.clients, "steady", IdStrategy::Header("idempotency_key".into()), config)?;
    let retention = RetentionConfig {
        retention: Duration::from_secs(opts.window_secs),
        outbox_retention: Duration::from_secs(3600),
        batch_size: opts.cleanup_batch,
        interval: Duration::ZERO,
    };
    let run_for = Duration::from_secs(opts.steady_secs);
    let started = Instant::now();
    let pg = env.clients.pg.clone();
    let every = Duration::from_secs(opts.cleanup_every_secs.max(1));
    let cleaner = tokio::spawn(async move {
        let mut deleted = 0u64;
        while started.elapsed() < run_for {
            tokio::time::sleep(every).await;
            deleted += exactly_once::retention::cleanup(&pg, &retention).await?.processed_events_deleted;
        }
        anyhow::Ok(deleted)
    });
    let mut samples = Vec::new();
    let mut seq = 0u64;
    let mut confirmed = 0u64;
    let mut next_sample = Duration::ZERO;
    let mut last = (Duration::ZERO, 0u64);
    while started.elapsed() < run_for {
        let events = fresh_batch(&mut seq, 500);
        let report = g.run_batch(&Noop, &events, None).await;
        anyhow::ensure!(report.all_finished(), "unfinished: {:?}", report.unfinished().next());
        confirmed += events.len() as u64;
        let now = started.elapsed();
        if now >= next_sample {
            next_sample = now + Duration::from_secs(opts.sample_every_secs.max(1));
            let (live, dead, vacuums): (i64, i64, i64) = sqlx::query_as(
                "SELECT n_live_tup, n_dead_tup, autovacuum_count + vacuum_count FROM pg_stat_user_tables \
                 WHERE relid = 'processed_events'::regclass",
            )
            .fetch_one(&env.clients.pg)
            .await?;
            let (_, table, index) = sizes_of(env).await?;
            let deleted: i64 = sqlx::query_scalar(
                "SELECT n_tup_del FROM pg_stat_user_tables WHERE relid = 'processed_events'::regclass",
            )
            .fetch_one(&env.clients.pg)
            .await?;
            let rate = (confirmed - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-9);
            last = (now, confirmed);
            let s = Sample {
                secs: now.as_secs_f64(),
                confirmed,
                rate_per_sec: rate,
                deleted: deleted.max(0) as u64,
                live_rows: live,
                dead_rows: dead,
                table_mib: table as f64 / 1048576.0,
                index_mib: index as f64 / 1048576.0,
                vacuums,
            };
            eprintln!(
                "[ledger] {:>5.0} s  confirmed {:>9}  {:>7.0}/s  deleted {:>9}  live {:>9}  dead {:>8}  table {:>7.1} MiB  indexes {:>7.1} MiB  vacuums {}",
                s.secs, s.confirmed, s.rate_per_sec, s.deleted, s.live_rows, s.dead_rows, s.table_mib, s.index_mib, s.vacuums
            );
            samples.push(s);
        }
    }
    cleaner.await??;
    let total = started.elapsed().as_secs_f64();
    let rate = confirmed as f64 / total;
    let last = samples.last().cloned().ok_or_else(|| anyhow::anyhow!("no sample taken"))?;
    let half = samples
        .iter()
        .find(|s| s.secs >= total / 2.0)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no sample past half-time"))?;
    let expected = rate * opts.window_secs as f64;
    let live_vs_expected = last.live_rows as f64 / expected.max(1.0);
    let size_end_vs_half = (last.table_mib + last.index_mib) / (half.table_mib + half.index_mib).max(1e-9);
    Ok(Steady {
        window_secs: opts.window_secs,
        samples,
        rate_per_sec: rate,
        live_vs_expected,
        size_end_vs_half,
        // Within reach of the window's worth of rows (plus one cleanup interval), and
        // not growing by more than a fifth over the second half.
        kept_up: live_vs_expected < 1.0 + (opts.cleanup_every_secs as f64 / opts.window_secs as f64) + 0.25
            && size_end_vs_half < 1.2,
    })
}

/// Runs every size, then the steady run.
pub async fn run(opts: &LedgerOptions) -> anyhow::Result<LedgerReport> {
    let env = Env::new().await?;
    let result = async {
        let settings = prepare_table(&env, opts).await?;
        if settings.0 != "on" {
            eprintln!(
                "[ledger] warning: the server's autovacuum is {}: no table is vacuumed on its own, so the steady run \
                 shows bloat production would not have. A superuser turns it on with \
                 ALTER SYSTEM SET autovacuum = on; SELECT pg_reload_conf();",
                settings.0
            );
        }
        let mut rows = Vec::new();
        let mut filled = 0u64;
        for &size in &opts.sizes {
            if size > filled {
                eprintln!("[ledger] filling to {size} rows");
                fill_more(&env, filled, size - filled).await?;
                filled = size;
            }
            eprintln!("[ledger] measuring at {size} rows");
            rows.push(at_size(&env, size, opts).await?);
        }
        anyhow::Ok((settings, rows))
    }
    .await;
    env.cleanup().await;
    let ((server_autovacuum, table_options), sizes) = result?;
    let steady = if opts.steady_secs > 0 {
        eprintln!("[ledger] steady run: {} s, window {} s", opts.steady_secs, opts.window_secs);
        Some(steady(opts).await?)
    } else {
        None
    };
    Ok(LedgerReport {
        machine: crate::machine(),
        options: format!("{opts:?}"),
        server_autovacuum,
        table_options,
        sizes,
        steady,
    })
}

/// Adds `n` filler rows after the first `from` (numbers `from..from + n`).
async fn fill_more(env: &Env, from: u64, n: u64) -> anyhow::Result<()> {
    if from == 0 {
        return fill(env, n).await;
    }
    crate::fill_range(env, from, n).await
}

/// The tables printed after a run.
pub fn render(report: &LedgerReport) -> String {
    let mut out = format!(
        "machine: {}\nserver autovacuum: {}; processed_events options: {}\n\n",
        report.machine,
        report.server_autovacuum,
        if report.table_options.is_empty() {
            "none (server defaults)".to_owned()
        } else {
            report.table_options.join(", ")
        }
    );
    out += &format!(
        "{:>12} {:>12} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}\n",
        "rows", "lookup id/s", "lookup p50", "lookup p99", "confirm ev/s", "batch p50", "table B/id", "index B/id"
    );
    for r in &report.sizes {
        out += &format!(
            "{:>12} {:>12.0} {:>8.2}ms {:>8.2}ms {:>12.0} {:>8.2}ms {:>10.0} {:>10.0}\n",
            r.rows,
            r.lookup_ids_per_sec,
            r.lookup_p50_ms,
            r.lookup_p99_ms,
            r.confirm_events_per_sec,
            r.confirm_batch_p50_ms,
            r.table_bytes_per_id,
            r.index_bytes_per_id
        );
    }
    if let Some(s) = &report.steady {
        out += &format!(
            "\nsteady run, window {} s: {:.0} confirms/s; live rows at the end {:.2}x rate x window; size at the end {:.2}x its size at half-time; kept up: {}\n",
            s.window_secs, s.rate_per_sec, s.live_vs_expected, s.size_end_vs_half, s.kept_up
        );
        out += &format!(
            "{:>6} {:>10} {:>8} {:>10} {:>10} {:>9} {:>10} {:>10} {:>8}\n",
            "secs", "confirmed", "rate/s", "deleted", "live", "dead", "table MiB", "index MiB", "vacuums"
        );
        for x in &s.samples {
            out += &format!(
                "{:>6.0} {:>10} {:>8.0} {:>10} {:>10} {:>9} {:>10.1} {:>10.1} {:>8}\n",
                x.secs,
                x.confirmed,
                x.rate_per_sec,
                x.deleted,
                x.live_rows,
                x.dead_rows,
                x.table_mib,
                x.index_mib,
                x.vacuums
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    /// The smoke run: every part runs at a tiny size, the filler ids the lookup asks for
    /// are found, and the steady run deletes what passes its window. Measures nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn ledger_smoke_run_measures_every_size_and_retention_deletes() {
        let opts = super::LedgerOptions {
            sizes: vec![0, 2_000],
            confirm_events: 1_000,
            lookups: 5,
            steady_secs: 6,
            window_secs: 2,
            cleanup_every_secs: 1,
            cleanup_batch: 1_000,
            sample_every_secs: 1,
            table_defaults: false,
        };
        let report = super::run(&opts).await.expect("ledger smoke run");
        assert_eq!(report.sizes.len(), 2);
        assert!(report.sizes.iter().all(|r| r.confirm_events_per_sec > 0.0 && r.lookup_ids_per_sec > 0.0));
        assert!(report.sizes[1].table_bytes_per_id > 0.0);
        assert_eq!(report.sizes[0].lookup_found_share, 0.0, "an empty ledger finds nothing");
        assert_eq!(report.sizes[1].lookup_found_share, 0.5, "the present half is found");
        // The migration's autovacuum settings are on the table, and the run says so.
        assert!(
            report.table_options.iter().any(|o| o == "autovacuum_vacuum_cost_limit=2000"),
            "{:?}",
            report.table_options
        );
        assert!(!report.server_autovacuum.is_empty());
        let steady = report.steady.expect("steady run");
        assert!(steady.samples.last().unwrap().deleted > 0, "retention deleted rows past the window");
        assert!(super::render(&super::LedgerReport { steady: Some(steady), ..report }).contains("steady run"));
    }
}
