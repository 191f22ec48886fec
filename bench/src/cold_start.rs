//! Lambda cold start of a function binary against the local services: process start to
//! its first request for work (Lambda's Init Duration), the first invocation, the
//! binary's size and the process's peak memory. Each run is a fresh process driven by
//! the local event source mapping's Runtime API (`exactly_once_esm::Function`), exactly
//! as `eo esm` starts functions.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use exactly_once::Event;
use exactly_once_esm::{Answer, Function, FunctionSpec};

use crate::stats::Samples;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ColdStart {
    pub binary: String,
    pub binary_bytes: u64,
    pub runs: usize,
    pub init_p50_ms: f64,
    pub init_p90_ms: f64,
    pub init_max_ms: f64,
    pub first_invocation_p50_ms: f64,
    pub peak_rss_max_kib: u64,
}

impl ColdStart {
    pub fn table(&self) -> String {
        format!(
            "cold start of {} ({:.1} MB), {} runs\n  init (start to first request for work): p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms\n  first invocation (one record): p50 {:.1} ms\n  peak memory (VmHWM): {:.1} MiB\n  target init p50 < 150 ms: {}",
            self.binary,
            self.binary_bytes as f64 / 1e6,
            self.runs,
            self.init_p50_ms,
            self.init_p90_ms,
            self.init_max_ms,
            self.first_invocation_p50_ms,
            self.peak_rss_max_kib as f64 / 1024.0,
            if self.init_p50_ms < 150.0 { "met" } else { "MISSED" }
        )
    }
}

/// Starts `binary` `runs` times, each answering one invocation of one new event.
pub async fn run(binary: &Path, runs: usize) -> anyhow::Result<ColdStart> {
    let env = crate::Env::new().await?;
    let result = measure(&env, binary, runs).await;
    env.cleanup().await;
    result
}

async fn measure(env: &crate::Env, binary: &Path, runs: usize) -> anyhow::Result<ColdStart> {
    // What `eo migrate` does before a deploy; init only checks it.
    env.clients.sink.apply_ddl(user_events::CLICKHOUSE_DDL).await?;
    let binary_bytes =
        std::fs::metadata(binary).with_context(|| format!("{}: build it first", binary.display()))?.len();
    let spec = FunctionSpec {
        binary: binary.to_owned(),
        name: "user-events".into(),
        env: env
            .slice
            .env()
            .into_iter()
            .filter(|(k, _)| !k.starts_with("KAFKA_"))
            .chain([("KAFKA_TOPIC_PREFIX".into(), String::new()), ("RUST_LOG".into(), "warn".into())])
            .collect(),
        timeout: Duration::from_secs(30),
        init_timeout: Duration::from_secs(10),
        memory_size: 256,
        log: None,
    };
    let (mut init, mut first) = (Samples::default(), Samples::default());
    let mut peak = 0u64;
    for i in 0..runs {
        let mut function = Function::new(spec.clone());
        let event = Event::new("user-events", 0, i as i64)
            .with_header("idempotency_key", format!("cold-{i}"))
            .with_value(format!(r#"{{"user_id":"u-{i}","type":"created","occurred_at":1700000000}}"#));
        let body = Bytes::from(exactly_once_core::msk::encode(&[event]).to_string());
        let started = Instant::now();
        let answer = function.invoke(body).await;
        let total = started.elapsed();
        let Answer::Response(_) = &answer else { anyhow::bail!("run {i}: {}", answer.describe()) };
        let init_time = function.last_init.context("no init measured")?;
        init.push(init_time);
        first.push(total.saturating_sub(init_time));
        peak = peak.max(function.peak_rss_kib().unwrap_or(0));
        function.stop().await;
        eprint!("\r[cold-start] {}/{runs}", i + 1);
    }
    eprintln!();
    let ms = |s: &Samples, p: f64| s.percentile(p) * 1000.0;
    Ok(ColdStart {
        binary: binary.display().to_string(),
        binary_bytes,
        runs,
        init_p50_ms: ms(&init, 50.0),
        init_p90_ms: ms(&init, 90.0),
        init_max_ms: ms(&init, 100.0),
        first_invocation_p50_ms: ms(&first, 50.0),
        peak_rss_max_kib: peak,
    })
}
