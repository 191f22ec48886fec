//! The Lambda form of the fault run's `chaos-faults` function (see
//! `exactly_once_cli::chaos_function`); `eo esm --function chaos-faults` runs it.

use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    exactly_once::runtime::main(vec![Arc::new(exactly_once_cli::chaos_function::ChaosFaults)])
}
