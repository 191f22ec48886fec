//! `cargo run --release -p bench --bin cluster`: the guard against a standalone Redis and
//! local Redis Clusters of one, two and three primaries, in one run. Prints the table and
//! writes it to `--out` as JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(about = "The guard on Redis Cluster: 1, 2 and 3 primaries against standalone, and the keys' spread")]
struct Args {
    /// Events in the stream (25% duplicate ids).
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Events per batch.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// REDIS_KEY_BUCKETS for the cluster runs (the library's default in cluster mode).
    #[arg(long, default_value_t = 64)]
    buckets: u32,
    /// Primary counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    primaries: Vec<u16>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "docs/bench/cluster.json")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let opts = bench::cluster::ClusterOptions {
        events: a.events,
        batch: a.batch.max(1),
        buckets: a.buckets.max(1),
        primaries: a.primaries,
        seed: a.seed,
    };
    bench::report_main(&a.out, bench::cluster::run(&opts), bench::cluster::render)
}
