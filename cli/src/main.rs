//! `eo`: the operator's command line.
//!
//! Exit codes: 0 success, 1 a runtime failure (a dependency down, Kafka refused a
//! message), 2 bad usage or configuration.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use exactly_once::config::{KafkaConfig, ProcessEnv};
use exactly_once::producer::{idempotency_key, Producer};
use exactly_once::runtime::{run_worker, RunError, WorkerOptions};
use exactly_once_cli::all_functions;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;

#[derive(Parser)]
#[command(name = "eo", version, about = "Exactly-once Kafka functions: run them locally, feed them events")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every function as one local worker (creates missing topics; configuration
    /// from the environment, see the README).
    Run,
    /// Publish sample events with `idempotency_key` headers, some of them duplicates.
    Produce {
        /// The function whose topic and sample payloads to use.
        #[arg(long, default_value = "user-events")]
        function: String,
        /// Messages to publish, duplicates included.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Share of messages that repeat an earlier event (same key and payload).
        #[arg(long, default_value_t = 0.25)]
        duplicate_rate: f64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            match rt.block_on(run_worker(all_functions(), WorkerOptions { create_topics: true })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ RunError::Config(_)) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Produce { function, count, duplicate_rate } => {
            if !(0.0..1.0).contains(&duplicate_rate) {
                eprintln!("error: --duplicate-rate must be in [0, 1)");
                return ExitCode::from(2);
            }
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            match rt.block_on(produce(&function, count, duplicate_rate)) {
                Ok(()) => ExitCode::SUCCESS,
                Err((code, message)) => {
                    eprintln!("error: {message}");
                    ExitCode::from(code)
                }
            }
        }
    }
}

async fn produce(function: &str, count: u64, duplicate_rate: f64) -> Result<(), (u8, String)> {
    let functions = all_functions();
    let names: Vec<&'static str> = functions.iter().map(|f| f.spec().name).collect();
    let Some(handler) = functions.into_iter().find(|f| f.spec().name == function) else {
        return Err((2, format!("no function `{function}`; known: {names:?}")));
    };
    let kafka = KafkaConfig::from_env(&ProcessEnv).map_err(|e| (2, e.to_string()))?;
    exactly_once::runtime::worker::check_reachable(&kafka, Duration::from_secs(10))
        .await
        .map_err(|e| (1, e.to_string()))?;
    let topic = kafka.topic(handler.spec().topics[0]);
    exactly_once::runtime::worker::create_topics(&kafka, std::slice::from_ref(&topic))
        .await
        .map_err(|e| (1, e.to_string()))?;
    let producer = Producer::new(&kafka).map_err(|e| (1, e.to_string()))?;

    let bar = ProgressBar::new(count);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} messages ({per_sec}, eta {eta}) {msg}")
            .expect("valid template"),
    );
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    let mut duplicates = 0u64;
    let mut rng = rand::rng();
    for _ in 0..count {
        // A duplicate is either re-sent at once (a producer retry) or much later (a replay).
        let (key, payload) = if !sent.is_empty() && rng.random_bool(duplicate_rate) {
            duplicates += 1;
            let i = if rng.random_bool(0.5) { sent.len() - 1 } else { rng.random_range(0..sent.len()) };
            sent[i].clone()
        } else {
            let n = sent.len() as u64;
            let payload =
                handler.sample(n).ok_or_else(|| (2, format!("function `{function}` has no sample payload")))?;
            let entry = (idempotency_key(), payload);
            sent.push(entry.clone());
            entry
        };
        producer.send(&topic, Some(key.as_bytes()), &payload, Some(&key)).await.map_err(|e| (1, e.to_string()))?;
        bar.inc(1);
    }
    bar.finish_with_message("done");
    println!("published {count} messages to `{topic}`: {} unique events, {duplicates} duplicates", sent.len());
    Ok(())
}
