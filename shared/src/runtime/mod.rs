//! One handler, two runtimes. A function binary calls [`main`] with its handler(s); the
//! binary becomes a Lambda function when `AWS_LAMBDA_RUNTIME_API` is set (Lambda sets
//! it), and a long-running worker otherwise.
//!
//! - `lambda`: MSK event in, one guarded batch, success or an error naming the
//!   unfinished records;
//! - `worker`: a Kafka consumer group member with manual commits, plus the `http`
//!   server (`/healthz`, `/readyz`, `/metrics`, `POST /invoke/{function}`);
//! - `msk`: the MSK event format both share; `functions`: which handler owns a topic.

pub mod functions;
pub mod http;
pub mod lambda;
pub mod worker;

pub use exactly_once_core::msk;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::clients::{Clients, InitError, Schema};
use crate::config::{Config, ConfigError, HttpConfig, KafkaConfig, ProcessConfig, ProcessEnv, WorkerConfig};
use crate::handler::Handler;

pub use functions::{Function, Functions};
pub use worker::Worker;

/// The entry point of every function binary.
pub fn main(handlers: Vec<Arc<dyn Handler>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let in_lambda = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    let result = runtime.block_on(async {
        if in_lambda {
            run_lambda(handlers).await
        } else {
            run_worker(handlers, WorkerOptions::default()).await
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "stopped");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why a process could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A configuration value is invalid.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// A dependency could not be reached at start-up.
    #[error("start-up: {0}")]
    Init(#[from] InitError),
    /// The functions could not be set up.
    #[error("start-up: {0}")]
    Functions(#[from] functions::FunctionsError),
    /// Kafka could not be reached, or its consumer or topics could not be set up.
    #[error("start-up: {0}")]
    Worker(#[from] worker::WorkerError),
    /// The HTTP server could not bind its address.
    #[error("HTTP server on {bind}: {source}")]
    Http {
        /// The address it tried.
        bind: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The Lambda runtime stopped with an error.
    #[error("Lambda runtime: {0}")]
    Lambda(String),
    /// The outbox relay's producer could not be made.
    #[error("start-up: {0}")]
    Outbox(#[from] crate::outbox::RelayError),
    /// The Kafka client could not be prepared (MSK brokers, IAM tokens).
    #[error("start-up: {0}")]
    Kafka(#[from] crate::kafka_client::KafkaClientError),
}

/// Sets up logging once: JSON in Lambda or with `LOG_FORMAT=json`, `RUST_LOG` filters.
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}

/// Connects to every dependency, retrying until `timeout`, then fails fast with a
/// message saying which dependency and how to fix it: a process that cannot work stops
/// at start-up, where the cause is plain, instead of failing every event later.
pub async fn connect(config: &Config, timeout: Duration) -> Result<Clients, InitError> {
    connect_with(config, timeout, Schema::Migrate).await
}

/// Like [`connect`], with the schema handled as `schema` says. A schema that is not
/// migrated is not waited for: it will not fix itself.
pub async fn connect_with(config: &Config, timeout: Duration, schema: Schema) -> Result<Clients, InitError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match Clients::connect_with(config.clone(), schema).await {
            Ok(c) => return Ok(c),
            Err(e @ InitError::Postgres(crate::postgres::PostgresError::NotMigrated { .. })) => return Err(e),
            Err(e) if tokio::time::Instant::now() + Duration::from_secs(1) < deadline => {
                tracing::warn!(error = %e, "dependency not ready; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn run_lambda(handlers: Vec<Arc<dyn Handler>>) -> Result<(), RunError> {
    init_tracing(true);
    let process = ProcessConfig::from_env(&ProcessEnv)?;
    let config = Config::load()?;
    let mut kafka = KafkaConfig::from_env(&ProcessEnv)?;
    crate::kafka_client::prepare(&mut kafka).await?;
    // Init: clients built once, reused by every invocation. No migrations or DDL here
    // (a cold start should not take the migration lock or wait on DDL): only a check
    // that `eo migrate` ran, failing init with what is missing.
    let clients = connect_with(&config, process.startup_timeout, Schema::Check).await?;
    let functions = Arc::new(Functions::new_with(&clients, handlers, &kafka, Schema::Check).await?);
    let relay = crate::outbox::Relay::new(clients.pg.clone(), &kafka, clients.kafka_breaker.clone())?;
    let app = lambda::LambdaApp {
        functions,
        relay: Arc::new(relay),
        clickhouse: clients.sink.breaker().clone(),
        pg: clients.pg.clone(),
        retention: config.retention.clone(),
        probe_budget: config.clickhouse.timeout,
        report_batch_item_failures: process.report_batch_item_failures,
    };
    lambda::serve(Arc::new(app)).await.map_err(|e| RunError::Lambda(e.to_string()))
}

/// Knobs of [`run_worker`] that are not environment configuration.
#[derive(Debug, Default, Clone)]
pub struct WorkerOptions {
    /// Create missing topics at start, whatever `KAFKA_CREATE_TOPICS` says.
    pub create_topics: bool,
}

/// Runs handlers as a worker until SIGTERM or Ctrl-C, then shuts down gracefully.
pub async fn run_worker(handlers: Vec<Arc<dyn Handler>>, options: WorkerOptions) -> Result<(), RunError> {
    let process = ProcessConfig::from_env(&ProcessEnv)?;
    init_tracing(process.log_json);
    let config = Config::load()?;
    let mut kafka = KafkaConfig::from_env(&ProcessEnv)?;
    kafka.create_topics |= options.create_topics;
    crate::kafka_client::prepare(&mut kafka).await?;
    let worker_config = WorkerConfig::from_env(&ProcessEnv)?;
    let http = HttpConfig::from_env(&ProcessEnv)?;

    let clients = connect(&config, process.startup_timeout).await?;
    worker::check_reachable(&kafka, process.startup_timeout).await?;
    let functions = Arc::new(Functions::new(&clients, handlers, &kafka).await?);

    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let router = http::router(functions.clone(), clients.clone(), &http);
    let (addr, http_task) = http::serve(router, http.bind, async {
        let _ = http_stopped.await;
    })
    .await
    .map_err(|source| RunError::Http { bind: http.bind.to_string(), source })?;
    let worker = Worker::start(&clients, functions.clone(), &kafka, &worker_config).await?;
    let retention = crate::retention::spawn(clients.pg.clone(), config.retention.clone());
    let relay = crate::outbox::Relay::new(clients.pg.clone(), &kafka, clients.kafka_breaker.clone())?
        .spawn(kafka.relay_interval);

    let names: Vec<&str> = functions.iter().map(|f| f.spec.name).collect();
    tracing::info!(http = %addr, functions = ?names, topics = ?functions.topics(), "worker running");
    println!("worker running: functions {names:?} on topics {:?}", functions.topics());
    println!("HTTP on http://{addr}  (/healthz, /readyz, /metrics, POST /invoke/{{function}})");

    shutdown_signal().await;
    tracing::info!("shutdown requested: finishing in-flight batches");
    worker.shutdown().await;
    retention.abort();
    relay.abort();
    let _ = stop_http.send(());
    let _ = http_task.await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
