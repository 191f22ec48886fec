//! The `cdc` binary: Lambda under an MSK trigger, or a worker.

use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    exactly_once::runtime::main(vec![Arc::new(cdc::Cdc)])
}
