//! `cargo run --release -p bench --bin scale`: 1, 2 and 4 workers in one consumer group
//! on a 12-partition topic, each with its own clients, one after the other: the rate
//! once the group has settled, and exact counts in the ledger and ClickHouse. Prints
//! the table and writes it to `--out` as JSON.
//!
//! `--esm target/release/user-events`: the same with local MSK event source mappings
//! feeding the function binary in Lambda mode, one mapping per concurrent invocation.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
#[command(about = "More consumers: workers in one group on a many-partition topic, rate and exact counts")]
struct Args {
    /// Worker counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// Records published for each worker count (25% repeat an earlier id).
    #[arg(long, default_value_t = 60_000)]
    events: usize,
    /// Partitions of the topic.
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// WORKER_BATCH_SIZE.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// WORKER_MAX_PARTITION_IN_FLIGHT (0: the fair share, the worker's default).
    #[arg(long, default_value_t = 0)]
    max_partition_in_flight: usize,
    /// Longest wait for one worker count, in seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Run local event source mappings over this function binary (Lambda mode, e.g.
    /// target/release/user-events) instead of workers; `--workers` then counts
    /// concurrent invocations.
    #[arg(long)]
    esm: Option<PathBuf>,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "docs/bench/scale.json")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let opts = bench::scale::ScaleOptions {
        workers: a.workers,
        events: a.events.max(1),
        partitions: a.partitions.max(1),
        batch: a.batch.max(1),
        max_partition_in_flight: a.max_partition_in_flight,
        timeout: Duration::from_secs(a.timeout_secs.max(1)),
        seed: a.seed,
        esm: a.esm,
    };
    bench::report_main(&a.out, bench::scale::run(&opts), bench::scale::render)
}
