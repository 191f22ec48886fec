//! `eo-faults`: the fault-injection run and the soak run. Both drive the real `eo`
//! (found beside this binary, or at `EO_BIN`) against the local services, and stop and
//! start those services: run them alone, on a development machine or in CI.
//!
//! Exit codes: 0 the run passed; 1 it failed (or could not run); 2 bad usage.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use exactly_once_faults::chaos::ChaosOptions;
use rand::Rng;

#[derive(Parser)]
#[command(name = "eo-faults", version, about = "The fault-injection and soak runs of the exactly-once functions")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The fault-injection run: workers consume while they are killed and the services
    /// fail under them; then every store is checked against what was produced (exit 0:
    /// exact). Stops and starts the local services: run it alone.
    Chaos {
        /// Seed of the stream and of the fault schedule (printed; random when absent).
        #[arg(long)]
        seed: Option<u64>,
        /// The shortened run (what the test command makes).
        #[arg(long)]
        short: bool,
        /// Who consumes: `worker` (`eo run`) or `lambda` (each function's binary behind
        /// `eo esm`, which must be built: cargo build -p user-events -p notifications).
        #[arg(long, value_enum, default_value = "worker")]
        runtime: exactly_once_faults::chaos::Runtime,
        /// Messages per function (overrides the preset).
        #[arg(long)]
        events: Option<usize>,
        /// Seconds the production (and the faults) are spread over (overrides the preset).
        #[arg(long)]
        duration_secs: Option<u64>,
        /// Also write the summary as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// The soak run: one worker under a steady stream, its memory and connections
    /// sampled; exit 0 when both stay flat and every event landed once.
    Soak {
        /// How long to produce, in seconds.
        #[arg(long, default_value_t = 600)]
        duration_secs: u64,
        /// Messages per second (25% of them repeats).
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 10)]
        every_secs: u64,
        /// The worker's local cache bound (GUARD_LOCAL_CACHE_MAX_BYTES): small, so the
        /// cache is full before the comparison and its designed growth is not mistaken
        /// for a leak.
        #[arg(long, default_value_t = 4 << 20)]
        cache_bytes: u64,
        /// Also write the report (with every sample) as JSON here.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Chaos { seed, short, runtime, events, duration_secs, json } => {
            let seed = seed.unwrap_or_else(|| rand::rng().random_range(0..1_000_000));
            let mut opts = if short { ChaosOptions::short(seed) } else { ChaosOptions::full(seed) };
            opts.runtime = runtime;
            let replay = format!(
                "eo-faults chaos --seed {seed}{} --runtime {}",
                if short { " --short" } else { "" },
                if runtime == exactly_once_faults::chaos::Runtime::Lambda { "lambda" } else { "worker" }
            );
            if let Some(e) = events {
                opts.events = e;
            }
            if let Some(d) = duration_secs {
                opts.duration = Duration::from_secs(d.max(10));
            }
            let (exe, rt) = match setup() {
                Ok(setup) => setup,
                Err(code) => return code,
            };
            match rt.block_on(exactly_once_faults::chaos::run(&exe, &opts)) {
                Ok(summary) => {
                    println!("{}", summary.line());
                    write_json(json, &summary);
                    if summary.pass {
                        ExitCode::SUCCESS
                    } else {
                        eprintln!("replay this schedule with: {replay}");
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    eprintln!("replay this schedule with: {replay}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Soak { duration_secs, rate, every_secs, cache_bytes, json } => {
            let (exe, rt) = match setup() {
                Ok(setup) => setup,
                Err(code) => return code,
            };
            let run = exactly_once_faults::soak::run(
                &exe,
                Duration::from_secs(duration_secs.max(10)),
                rate.max(1),
                Duration::from_secs(every_secs.max(1)),
                cache_bytes,
            );
            match rt.block_on(run) {
                Ok(report) => {
                    println!("{}", report.line());
                    write_json(json, &report);
                    if report.flat && report.exact {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The `eo` binary the runs drive, and a runtime (exit 2 when `eo` is not built).
fn setup() -> Result<(std::path::PathBuf, tokio::runtime::Runtime), ExitCode> {
    let exe = exactly_once_faults::eo_binary().map_err(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("error: tokio runtime: {e}");
        ExitCode::FAILURE
    })?;
    Ok((exe, rt))
}

/// Writes a run's summary as JSON where `--json` says, if it says.
fn write_json(path: Option<std::path::PathBuf>, value: &impl serde::Serialize) {
    let Some(path) = path else { return };
    let written = serde_json::to_string_pretty(value)
        .map_err(|e| e.to_string())
        .and_then(|text| std::fs::write(&path, text).map_err(|e| e.to_string()));
    if let Err(e) = written {
        eprintln!("error: cannot write {}: {e}", path.display());
    }
}
