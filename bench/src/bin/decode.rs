//! `cargo run --release -p bench --bin decode`: what reading a value costs per event in
//! each format a function can declare, next to JSON (no services needed). Prints the
//! table and writes it to `--out` as JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Decode cost per event: Avro and JSON Schema framed for a schema registry, next to JSON")]
struct Args {
    /// Values per round.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Rounds per format (the median is reported).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "docs/bench/decode.json")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let opts = bench::decode::DecodeOptions { events: a.events.max(1), rounds: a.rounds.max(1) };
    bench::report_main(&a.out, async move { bench::decode::run(&opts) }, bench::decode::render)
}
