//! `cargo build --release -p user-events && cargo run --release -p bench --bin cold-start`:
//! the Lambda cold start of a function binary against the local services
//! (`scripts/services.sh`). Prints the figures and writes them to `--out`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(about = "Lambda cold start of a function binary: init time, first invocation, size, peak memory")]
struct Args {
    /// The function binary (a release build, as deployed).
    #[arg(long, default_value = "target/release/user-events")]
    binary: PathBuf,
    /// Fresh processes to start.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Where to write the figures as JSON.
    #[arg(long, default_value = "docs/bench/cold-start.json")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    bench::report_main(&args.out, bench::cold_start::run(&args.binary, args.runs.max(1)), |f| {
        format!("{}\n", f.table())
    })
}
