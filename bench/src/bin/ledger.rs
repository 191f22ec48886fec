//! `cargo run --release -p bench --bin ledger`: the ledger at 0, 10M (and more) rows, and
//! ten minutes of steady confirms with retention deleting behind them. Prints the tables
//! and writes them to `--out` as JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(about = "processed_events at scale: lookup, confirm and bytes per id by size; retention under a steady rate")]
struct Args {
    /// Ledger sizes, comma-separated, ascending.
    #[arg(long, value_delimiter = ',', default_value = "0,10000000")]
    sizes: Vec<u64>,
    /// New ids confirmed at each size.
    #[arg(long, default_value_t = 50_000)]
    confirm_events: usize,
    /// Lookups of 500 ids at each size.
    #[arg(long, default_value_t = 400)]
    lookups: usize,
    /// Length of the steady run in seconds (0 skips it).
    #[arg(long, default_value_t = 600)]
    steady_secs: u64,
    /// Retention window of the steady run, in seconds.
    #[arg(long, default_value_t = 120)]
    window_secs: u64,
    /// How often the steady run's cleanup runs, in seconds.
    #[arg(long, default_value_t = 10)]
    cleanup_every_secs: u64,
    /// Rows per delete statement.
    #[arg(long, default_value_t = 10_000)]
    cleanup_batch: i64,
    /// Reset processed_events' autovacuum settings (from the migrations) to the server's
    /// defaults first, for a before/after comparison.
    #[arg(long)]
    table_defaults: bool,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "docs/bench/ledger.json")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let opts = bench::ledger::LedgerOptions {
        sizes: a.sizes,
        confirm_events: a.confirm_events.max(500),
        lookups: a.lookups.max(1),
        steady_secs: a.steady_secs,
        window_secs: a.window_secs.max(1),
        cleanup_every_secs: a.cleanup_every_secs.max(1),
        cleanup_batch: a.cleanup_batch.max(1),
        sample_every_secs: 15,
        table_defaults: a.table_defaults,
    };
    bench::report_main(&a.out, bench::ledger::run(&opts), bench::ledger::render)
}
