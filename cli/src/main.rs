//! `eo`: the operator's command line.
//!
//! Exit codes: 0 success; 1 a runtime failure (a dependency down, Kafka refused a
//! message); 2 bad usage or configuration; 3 `inspect`: the event is not confirmed;
//! 4 `dead-letters replay`: some replayed events did not succeed.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use exactly_once::config::{KafkaConfig, ProcessEnv};
use exactly_once::producer::{idempotency_key, Producer};
use exactly_once::runtime::{run_worker, RunError, WorkerOptions};
use exactly_once_cli::{all_functions, runnable_functions};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;

#[derive(Parser)]
#[command(name = "eo", version, about = "Exactly-once Kafka functions: run them locally, feed them events")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run every function as one local worker (creates missing topics; configuration
    /// from the environment, see docs/CONFIGURATION.md).
    Run,
    /// A local MSK event source mapping: runs a function's binary in Lambda mode, fed
    /// from Kafka as MSK triggers it (batching, retries, partial batch responses, the
    /// on-failure destination; options named after template.yaml's parameters). Runs
    /// until Ctrl-C / SIGTERM.
    Esm(exactly_once_esm::MappingSettings),
    /// Apply the Postgres migrations and every function's ClickHouse tables, then exit.
    /// Lambda functions do not migrate at init (they check, and fail naming what is
    /// missing): run this before deploying, as the deploy's migrate step does.
    Migrate,
    /// Show what Redis and Postgres know about one event id (exit 3: not confirmed).
    Inspect {
        /// The function (its namespace), e.g. `user-events`.
        function: String,
        /// The event id, as derived by the function's id strategy.
        event_id: String,
    },
    /// List or replay dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// List or requeue outbox messages Kafka kept refusing (too large, unknown topic,
    /// not authorised, invalid record), dead-lettered after OUTBOX_MAX_ATTEMPTS.
    #[command(subcommand)]
    Outbox(Outbox),
    /// Delete confirmed ids older than RETENTION_DAYS, and outbox messages published
    /// more than OUTBOX_RETENTION_HOURS ago, now, in bounded batches.
    Cleanup,
    /// Make a new function: its crate under functions/ (handler, binary, a test), its
    /// ClickHouse table, and its place in the local worker, template.yaml and
    /// infra/functions.json. Run from the repository.
    New {
        /// The function's name, kebab-case (`order-events`): crate, binary, namespace.
        name: String,
        /// The Kafka topic it reads (before KAFKA_TOPIC_PREFIX).
        #[arg(long)]
        topic: String,
    },
    /// Print the functions this build contains (name, topics), as JSON with `--json`.
    Functions {
        #[arg(long)]
        json: bool,
    },
    /// Publish sample events with `idempotency_key` headers, some of them duplicates.
    Produce {
        /// The function whose topic and sample payloads to use.
        #[arg(long, default_value = "user-events")]
        function: String,
        /// Messages to publish, duplicates included.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Share of messages that repeat an earlier event (same key and payload).
        #[arg(long, default_value_t = 0.25)]
        duplicate_rate: f64,
        /// Write the samples in Avro, framed for the schema registry at
        /// SCHEMA_REGISTRY_URL (the function's sample schema is registered under
        /// `<topic>-value`), as Confluent's serializers and Debezium's Avro converter do.
        #[arg(long)]
        avro: bool,
    },
}

/// Which entries a `list` shows.
#[derive(clap::Args)]
struct ListArgs {
    /// Only this function's.
    #[arg(long)]
    function: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    limit: i64,
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Open dead letters, oldest first.
    List(ListArgs),
    /// Run dead letters through their function again (after fixing the cause).
    Replay {
        /// Dead-letter numbers from `eo dead-letters list`.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

#[derive(Subcommand)]
enum Outbox {
    /// Dead-lettered outbox messages, oldest first.
    List(ListArgs),
    /// Put dead-lettered messages back in the queue (after fixing the cause); the relay
    /// sends them again under their original idempotency keys.
    Replay {
        /// Outbox message numbers from `eo outbox list`.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

/// Why a command failed, and so the exit code it ends with.
#[derive(Debug)]
enum Failure {
    /// Bad usage or configuration (exit 2): fix the command or the environment.
    Usage(String),
    /// A dependency or the operation itself failed (exit 1).
    Failed(String),
}

impl Failure {
    fn usage(e: impl std::fmt::Display) -> Self {
        Failure::Usage(e.to_string())
    }

    fn failed(e: impl std::fmt::Display) -> Self {
        Failure::Failed(e.to_string())
    }

    /// Prints the message and gives the exit code.
    fn report(self) -> ExitCode {
        let (code, message) = match self {
            Failure::Usage(m) => (2, m),
            Failure::Failed(m) => (1, m),
        };
        eprintln!("error: {message}");
        ExitCode::from(code)
    }
}

/// Builds the clients from the environment (fail fast, as every runtime does).
async fn clients() -> Result<exactly_once::Clients, Failure> {
    let process = exactly_once::config::ProcessConfig::from_env(&ProcessEnv).map_err(Failure::usage)?;
    let config = exactly_once::Config::load().map_err(Failure::usage)?;
    exactly_once::runtime::connect(&config, process.startup_timeout).await.map_err(Failure::failed)
}

async fn operate(command: Command) -> Result<u8, Failure> {
    match command {
        Command::Inspect { function, event_id } => {
            // A name no function can have is a usage error, before any connection.
            exactly_once::Namespace::new(function.as_str()).map_err(Failure::usage)?;
            let clients = clients().await?;
            let found =
                exactly_once_cli::ops::inspect(&clients, &function, &event_id).await.map_err(Failure::failed)?;
            print!("{}", found.render(&function, &event_id));
            Ok(if found.is_confirmed() { 0 } else { 3 })
        }
        Command::DeadLetters(DeadLetters::List(ListArgs { function, limit })) => {
            let clients = clients().await?;
            let rows = exactly_once_cli::ops::list_dead_letters(&clients, function.as_deref(), limit)
                .await
                .map_err(Failure::failed)?;
            if rows.is_empty() {
                println!("no open dead letters");
            }
            for d in rows {
                println!(
                    "#{:<6} {:<14} {:<40} {:<28} {:<20} attempts {:<3} {}\n        {}",
                    d.id, d.function, d.event_id, d.position, d.reason, d.attempts, d.created_at, d.error
                );
            }
            Ok(0)
        }
        Command::DeadLetters(DeadLetters::Replay { ids }) => {
            let clients = clients().await?;
            let kafka = KafkaConfig::from_env(&ProcessEnv).map_err(Failure::usage)?;
            let functions = Arc::new(
                exactly_once::runtime::Functions::new(&clients, all_functions(), &kafka)
                    .await
                    .map_err(Failure::failed)?,
            );
            let results = exactly_once_cli::ops::replay(&clients, &functions, &ids).await.map_err(Failure::failed)?;
            let mut all_ok = true;
            for (id, outcome) in results {
                all_ok &= matches!(outcome, exactly_once::Outcome::Processed | exactly_once::Outcome::Duplicate { .. });
                println!("#{id}: {outcome}");
            }
            Ok(if all_ok { 0 } else { 4 })
        }
        Command::Outbox(Outbox::List(ListArgs { function, limit })) => {
            let clients = clients().await?;
            let rows = exactly_once_cli::ops::list_outbox_dead_letters(&clients, function.as_deref(), limit)
                .await
                .map_err(Failure::failed)?;
            if rows.is_empty() {
                println!("no dead-lettered outbox messages");
            }
            for d in rows {
                println!(
                    "#{:<6} {:<14} {:<28} -> {:<24} {:<18} refused {:<3} {} B  {}\n        {}",
                    d.id,
                    d.function,
                    d.idempotency_key,
                    d.topic,
                    d.reason,
                    d.rejections,
                    d.payload_bytes,
                    d.dead_lettered_at,
                    d.error
                );
            }
            Ok(0)
        }
        Command::Outbox(Outbox::Replay { ids }) => {
            let clients = clients().await?;
            let requeued = exactly_once_cli::ops::replay_outbox(&clients, &ids).await.map_err(Failure::failed)?;
            for id in requeued {
                println!("#{id}: requeued");
            }
            Ok(0)
        }
        Command::Migrate => {
            let clients = clients().await?;
            let migrated = exactly_once_cli::migrate::apply(&clients).await.map_err(Failure::failed)?;
            println!("{}", migrated.line(&clients));
            Ok(0)
        }
        Command::Cleanup => {
            let clients = clients().await?;
            let report = exactly_once::retention::cleanup(&clients.pg, &clients.config.retention)
                .await
                .map_err(|e| Failure::failed(format!("Postgres: {e}")))?;
            println!(
                "deleted {} confirmed ids and {} stale failure counters older than {} days, and {} outbox messages published more than {} hours ago, in {} statements",
                report.processed_events_deleted,
                report.attempts_deleted,
                clients.config.retention.retention.as_secs() / 86_400,
                report.outbox_deleted,
                clients.config.retention.outbox_retention.as_secs() / 3_600,
                report.batches
            );
            Ok(0)
        }
        Command::Run | Command::Esm(_) | Command::Produce { .. } | Command::Functions { .. } | Command::New { .. } => {
            unreachable!("handled in main")
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::New { name, topic } => match new_function(&name, &topic) {
            Ok(()) => ExitCode::SUCCESS,
            Err(failure) => failure.report(),
        },
        Command::Functions { json } => {
            let list = exactly_once_cli::functions_json();
            if json {
                println!("{}", serde_json::to_string_pretty(&list).expect("JSON"));
            } else {
                for f in list.as_array().expect("array") {
                    println!(
                        "{:<16} reads {}  publishes {}",
                        f["name"].as_str().unwrap_or(""),
                        f["topics"],
                        f["outputTopics"]
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Command::Run => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            match rt.block_on(run_worker(runnable_functions(), WorkerOptions { create_topics: true })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ RunError::Config(_)) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Esm(settings) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            match rt.block_on(esm(settings)) {
                Ok(report) => {
                    println!("{}", report.line());
                    ExitCode::SUCCESS
                }
                Err(failure) => failure.report(),
            }
        }
        command @ (Command::Inspect { .. }
        | Command::DeadLetters(_)
        | Command::Outbox(_)
        | Command::Cleanup
        | Command::Migrate) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            match rt.block_on(operate(command)) {
                Ok(code) => ExitCode::from(code),
                Err(failure) => failure.report(),
            }
        }
        Command::Produce { function, count, duplicate_rate, avro } => {
            if !(0.0..1.0).contains(&duplicate_rate) {
                eprintln!("error: --duplicate-rate must be in [0, 1)");
                return ExitCode::from(2);
            }
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            match rt.block_on(produce(&function, count, duplicate_rate, avro)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(failure) => failure.report(),
            }
        }
    }
}

/// `eo esm`: the function's topics and binary, its environment as the template sets it,
/// then the mapping until a signal.
async fn esm(settings: exactly_once_esm::MappingSettings) -> Result<exactly_once_esm::Report, Failure> {
    use exactly_once_esm::{EsmError, FunctionSpec, Mapping};
    let process = exactly_once::config::ProcessConfig::from_env(&ProcessEnv).map_err(Failure::usage)?;
    exactly_once::runtime::init_tracing(process.log_json);
    let functions = runnable_functions();
    let names: Vec<&'static str> = functions.iter().map(|f| f.spec().name).collect();
    let Some(handler) = functions.iter().find(|f| f.spec().name == settings.function) else {
        return Err(Failure::usage(format!("no function `{}`; known: {names:?}", settings.function)));
    };
    let exe = std::env::current_exe().map_err(|e| Failure::failed(format!("cannot find the eo binary: {e}")))?;
    let binary = exactly_once_esm::find_binary(&settings, &exe).map_err(Failure::usage)?;
    let mut kafka = KafkaConfig::from_env(&ProcessEnv).map_err(Failure::usage)?;
    exactly_once::kafka_client::prepare(&mut kafka).await.map_err(Failure::failed)?;
    let topics: Vec<String> = if settings.topics.is_empty() {
        handler.spec().topics.iter().map(|t| kafka.topic(t)).collect()
    } else {
        settings.topics.clone()
    };
    if kafka.create_topics {
        exactly_once::runtime::worker::create_topics(&kafka, &topics).await.map_err(Failure::failed)?;
    }
    let spec = FunctionSpec {
        binary,
        name: settings.function.clone(),
        // As the template does: the function answers partial batch responses exactly
        // when the mapping reads them.
        env: vec![("LAMBDA_REPORT_BATCH_ITEM_FAILURES".into(), settings.report_batch_item_failures().to_string())],
        timeout: Duration::from_secs(settings.timeout),
        init_timeout: Duration::from_secs(settings.init_timeout_secs),
        memory_size: settings.memory_size,
        log: settings.function_log.clone(),
    };
    let mapping = Mapping::start(settings.clone(), &kafka, &topics, spec).await.map_err(|e| match e {
        EsmError::Usage(_) | EsmError::Destination(exactly_once_esm::destination::DestinationError::Invalid(_)) => {
            Failure::usage(e)
        }
        e => Failure::failed(e),
    })?;
    println!(
        "esm: function {} from {topics:?} as group {} (batch {}, window {} s, retries {}, response types {:?}); Ctrl-C stops",
        settings.function,
        settings.group_id(),
        settings.batch_size,
        settings.maximum_batching_window_in_seconds,
        settings.maximum_retry_attempts,
        settings.function_response_types
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        exactly_once::runtime::shutdown_signal().await;
        let _ = stop.send(true);
    });
    mapping.run(stopped).await.map_err(Failure::failed)
}

async fn produce(function: &str, count: u64, duplicate_rate: f64, avro: bool) -> Result<(), Failure> {
    let functions = all_functions();
    let names: Vec<&'static str> = functions.iter().map(|f| f.spec().name).collect();
    let Some(handler) = functions.into_iter().find(|f| f.spec().name == function) else {
        return Err(Failure::usage(format!("no function `{function}`; known: {names:?}")));
    };
    let kafka = KafkaConfig::from_env(&ProcessEnv).map_err(Failure::usage)?;
    let topic = kafka.topic(handler.spec().topics[0]);
    let encoder = if avro { Some(AvroEncoder::register(handler.as_ref(), &topic).await?) } else { None };
    exactly_once::runtime::worker::check_reachable(&kafka, Duration::from_secs(10)).await.map_err(Failure::failed)?;
    exactly_once::runtime::worker::create_topics(&kafka, std::slice::from_ref(&topic))
        .await
        .map_err(Failure::failed)?;
    let producer = Producer::new(&kafka).map_err(Failure::failed)?;

    let bar = ProgressBar::new(count);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} messages ({per_sec}, eta {eta}) {msg}")
            .expect("valid template"),
    );
    let mut sent: Vec<(String, Vec<u8>)> = Vec::new();
    let mut duplicates = 0u64;
    let mut rng = rand::rng();
    for _ in 0..count {
        // A duplicate is either re-sent at once (a producer retry) or much later (a replay).
        let (key, payload) = if !sent.is_empty() && rng.random_bool(duplicate_rate) {
            duplicates += 1;
            let i = if rng.random_bool(0.5) { sent.len() - 1 } else { rng.random_range(0..sent.len()) };
            sent[i].clone()
        } else {
            let n = sent.len() as u64;
            let mut payload = handler
                .sample(n)
                .ok_or_else(|| Failure::usage(format!("function `{function}` has no sample payload")))?;
            if let Some(encoder) = &encoder {
                payload = encoder.encode(&payload).map_err(Failure::failed)?;
            }
            let entry = (idempotency_key(), payload);
            sent.push(entry.clone());
            entry
        };
        producer.send(&topic, Some(key.as_bytes()), &payload, Some(&key)).await.map_err(Failure::failed)?;
        bar.inc(1);
    }
    bar.finish_with_message("done");
    let format = match &encoder {
        Some(e) => format!(" in Avro (schema {})", e.schema_id),
        None => String::new(),
    };
    println!("published {count} messages to `{topic}`{format}: {} unique events, {duplicates} duplicates", sent.len());
    Ok(())
}

/// `eo produce --avro`: the function's sample schema, registered, and samples encoded
/// with it in Confluent's wire format.
struct AvroEncoder {
    schema: exactly_once::payload::AvroSchema,
    schema_id: u32,
}

impl AvroEncoder {
    async fn register(handler: &dyn exactly_once::Handler, topic: &str) -> Result<Self, Failure> {
        let name = handler.spec().name;
        let text = handler
            .sample_avro_schema()
            .ok_or_else(|| Failure::usage(format!("function `{name}` has no Avro schema for its samples")))?;
        let config = exactly_once::config::RegistryConfig::from_env(&ProcessEnv).map_err(Failure::usage)?;
        if config.url.is_none() {
            return Err(Failure::usage("--avro needs SCHEMA_REGISTRY_URL: the registry the schema is registered in"));
        }
        let registry = exactly_once::registry::SchemaRegistry::new(&config).map_err(Failure::usage)?;
        let schema = exactly_once::payload::AvroSchema::parse(text).map_err(Failure::failed)?;
        let schema_id = registry.register(&format!("{topic}-value"), text).await.map_err(Failure::failed)?;
        Ok(Self { schema, schema_id })
    }

    fn encode(&self, sample: &[u8]) -> Result<Vec<u8>, String> {
        let json: serde_json::Value = serde_json::from_slice(sample).map_err(|e| format!("sample is not JSON: {e}"))?;
        let body = exactly_once::payload::avro_from_json(self.schema.schema(), json)?;
        Ok(exactly_once::payload::confluent_framed(self.schema_id, &body))
    }
}

/// `eo new`: generates the function in the repository around the current directory.
fn new_function(name: &str, topic: &str) -> Result<(), Failure> {
    use exactly_once_cli::new_function::{generate, Names, NewError};
    let names = Names::new(name, topic).map_err(Failure::usage)?;
    let cwd = std::env::current_dir().map_err(|e| Failure::failed(format!("current directory: {e}")))?;
    let root = cwd.ancestors().find(|d| d.join("template.yaml").is_file() && d.join("functions").is_dir()).ok_or_else(
        || Failure::usage("run `eo new` inside the repository (no template.yaml and functions/ above here)"),
    )?;
    let specs: Vec<_> = exactly_once_cli::runnable_functions().iter().map(|f| f.spec()).collect();
    let known: Vec<(&str, &[&str])> = specs.iter().map(|s| (s.name, s.topics)).collect();
    let written = generate(root, &names, &known).map_err(|e| match e {
        NewError::Io { .. } => Failure::failed(e),
        _ => Failure::usage(e),
    })?;
    println!("made function `{}` (reads `{}`):", names.name, names.topic);
    for path in written {
        println!("  {}", path.display());
    }
    println!(
        "next: edit functions/{0}/src/lib.rs and migrations/clickhouse/{1}.sql, then `cargo test -p {0}` (services up: scripts/services.sh)",
        names.name, names.snake
    );
    Ok(())
}
