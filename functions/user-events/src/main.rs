//! The `user-events` binary: a Lambda function under an MSK trigger when
//! `AWS_LAMBDA_RUNTIME_API` is set, a Kafka worker otherwise.

use std::process::ExitCode;
use std::sync::Arc;

fn main() -> ExitCode {
    exactly_once::runtime::main(vec![Arc::new(user_events::UserEvents)])
}
