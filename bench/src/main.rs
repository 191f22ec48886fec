//! `cargo run --release -p bench -- [options]`: runs the benchmark against the local
//! services (`scripts/services.sh`), prints the table and the targets, and writes
//! `results.json` and `throughput.png` into `--out` (default `docs/bench`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Benchmark the guard against the common per-event design and the bare round trips")]
struct Args {
    /// Events in the stream (25% duplicate ids).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Batch sizes for the guard and the floor.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,500,1000")]
    batch_sizes: Vec<usize>,
    /// Events for the baseline (two statements per event: slow).
    #[arg(long, default_value_t = 5_000)]
    baseline_events: usize,
    /// Rows to put into processed_events before re-measuring the guard (10000000 for the target).
    #[arg(long, default_value_t = 0)]
    fill: u64,
    /// Messages for the end-to-end comparison through the broker (0 skips it).
    #[arg(long, default_value_t = 20_000)]
    e2e_events: usize,
    /// Distinct ids pushed through the local cache for the memory figure.
    #[arg(long, default_value_t = 1_000_000)]
    cache_ids: usize,
    /// Round-trip time (microseconds) to add through delay proxies for a second run of
    /// baseline, guard and floor: the stores across a network, as in a deployment (0 skips).
    #[arg(long, default_value_t = 500)]
    added_rtt_us: u64,
    /// Where results.json and throughput.png go.
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Tiny sizes: checks the benchmark still works, measures nothing meaningful.
    #[arg(long)]
    smoke: bool,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Leases and done markers by Lua script, as on Redis Cluster or before Redis 7.0
    /// (and as every server got them before the plain commands): a before/after in one binary.
    #[arg(long)]
    redis_scripts: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let opts = if a.smoke {
        bench::Options::smoke(a.out)
    } else {
        bench::Options {
            events: a.events,
            batch_sizes: a.batch_sizes,
            baseline_events: a.baseline_events,
            fill_rows: a.fill,
            e2e_events: a.e2e_events,
            cache_ids: a.cache_ids,
            added_rtt_us: a.added_rtt_us,
            out_dir: a.out,
            seed: a.seed,
            redis_scripts: a.redis_scripts,
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(bench::run_and_write(&opts)) {
        Ok(report) => {
            print!("{}", bench::render(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
