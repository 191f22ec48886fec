//! The mapping's settings: the event source mapping's and the function's properties,
//! named after the parameters of `template.yaml` (in kebab case) and with the same
//! defaults, so what is deployed can be tried here first (tests/deploy.rs checks that
//! the defaults agree).

use std::path::PathBuf;
use std::time::Duration;

use crate::batch::BatchRules;

/// Lambda's invocation payload limit (synchronous invocations): 6 MB.
pub const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;

/// The `eo esm` options: the mapping's and the function's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct MappingSettings {
    /// The function (as `eo functions` lists it): its topics and consumer group.
    #[arg(long)]
    pub function: String,
    /// The function's binary; default: the one beside `eo` (e.g. target/debug/user-events).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Topics to read; default: the function's own, with KAFKA_TOPIC_PREFIX.
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    /// The consumer group is `<prefix>-<function>`, as in the template.
    #[arg(long, default_value = "exactly-once")]
    pub consumer_group_prefix: String,
    /// Where a new consumer group starts: TRIM_HORIZON (earliest) or LATEST.
    #[arg(long, default_value = "TRIM_HORIZON", value_parser = ["TRIM_HORIZON", "LATEST"])]
    pub starting_position: String,
    /// Most records per invocation (1-10000).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub batch_size: u32,
    /// How long to gather records before invoking with fewer than a full batch (0-300).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=300))]
    pub maximum_batching_window_in_seconds: u32,
    /// Retries of a failed batch before its records are discarded (-1: until they
    /// succeed).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(-1..=10000))]
    pub maximum_retry_attempts: i64,
    /// Failed records older than this are discarded instead of retried (-1: never).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true, value_parser = clap::value_parser!(i64).range(-1..=604800))]
    pub maximum_record_age_in_seconds: i64,
    /// Split a failed batch in two before retrying it.
    #[arg(long, default_value = "false", value_parser = ["true", "false"])]
    pub bisect_batch_on_function_error: String,
    /// `ReportBatchItemFailures`: the function's `batchItemFailures` answer names the
    /// failed records, and only they and the records after them are retried. Empty: off.
    #[arg(long, default_value = "ReportBatchItemFailures", value_parser = ["ReportBatchItemFailures", ""])]
    pub function_response_types: String,
    /// Where discarded records go: `kafka://<topic>` (the records themselves) or
    /// `file://<directory>` (a JSON failure record per discarded batch, as an S3
    /// destination gets). Empty: discarded records are only logged (lost).
    #[arg(long, default_value = "")]
    pub on_failure_destination: String,
    /// The function's timeout in seconds: an invocation still running then fails and
    /// its process is restarted.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=900))]
    pub timeout: u64,
    /// AWS_LAMBDA_FUNCTION_MEMORY_SIZE given to the function (not enforced).
    #[arg(long, default_value_t = 256)]
    pub memory_size: u32,
    /// How long a new process may take to ask for its first invocation (Lambda: 10 s).
    #[arg(long, default_value_t = 10)]
    pub init_timeout_secs: u64,
    /// Append the function's output to this file instead of printing it.
    #[arg(long)]
    pub function_log: Option<PathBuf>,
    /// Give up after this many failed starts of the function in a row.
    #[arg(long, default_value_t = 5)]
    pub max_init_failures: u32,
}

impl MappingSettings {
    /// Settings for `function` with every default (as the CLI parses them).
    pub fn for_function(function: &str) -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrap {
            #[command(flatten)]
            s: MappingSettings,
        }
        Wrap::parse_from(["esm", "--function", function]).s
    }

    /// The batch-shaping rules these settings give.
    pub fn rules(&self) -> BatchRules {
        BatchRules {
            batch_size: self.batch_size as usize,
            max_payload_bytes: MAX_PAYLOAD_BYTES - 64 * 1024,
            maximum_retry_attempts: self.maximum_retry_attempts,
            maximum_record_age: u64::try_from(self.maximum_record_age_in_seconds).ok().map(Duration::from_secs),
            bisect_batch_on_function_error: self.bisect_batch_on_function_error == "true",
        }
    }

    /// Whether the function's answer may name failed records (`ReportBatchItemFailures`).
    pub fn report_batch_item_failures(&self) -> bool {
        self.function_response_types == "ReportBatchItemFailures"
    }

    /// `MaximumBatchingWindowInSeconds` as a duration.
    pub fn batching_window(&self) -> Duration {
        Duration::from_secs(u64::from(self.maximum_batching_window_in_seconds))
    }

    /// The consumer group, `<consumer-group-prefix>-<function>`, as in the template.
    pub fn group_id(&self) -> String {
        format!("{}-{}", self.consumer_group_prefix, self.function)
    }
}
