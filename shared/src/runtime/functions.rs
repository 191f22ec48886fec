//! The functions one process runs: each handler with its guard, found by name (for
//! `POST /invoke/{function}`) or by topic (for records from Kafka or MSK).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::clients::{Clients, Schema};
use crate::config::KafkaConfig;
use crate::event::Record;
use crate::guard::Guard;
use crate::handler::{FunctionSpec, Handler};
use crate::outcome::{EventOutcome, FailureKind, Outcome};
use crate::payload::ValueFormat;
use crate::sink::SinkError;

/// One function as a process runs it: its spec, its handler and its guard.
pub struct Function {
    /// What the function is.
    pub spec: FunctionSpec,
    /// Its handler.
    pub handler: Arc<dyn Handler>,
    /// Its guard, built from the process's clients with the function's own attempt limit.
    pub guard: Arc<Guard>,
    /// The topics it reads, with the configured prefix.
    pub topics: Vec<String>,
}

/// The functions of one process, found by name or by topic.
pub struct Functions {
    list: Vec<Arc<Function>>,
    by_topic: HashMap<String, usize>,
}

/// Why the functions could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FunctionsError {
    /// The function's name is not a valid namespace: (function, why).
    #[error("function `{0}`: {1}")]
    Invalid(String, String),
    /// Two functions read the same topic.
    #[error("topic `{topic}` is claimed by both `{first}` and `{second}`")]
    TopicClash {
        /// The topic, with the configured prefix.
        topic: String,
        /// The function that claimed it first.
        first: String,
        /// The function that claimed it second.
        second: String,
    },
    /// Applying a function's ClickHouse DDL failed: (function, error).
    #[error("function `{0}`: {1}")]
    Ddl(String, SinkError),
    /// The ClickHouse tables a function needs are missing (a process that does not apply
    /// DDL).
    #[error("{0}")]
    NotMigrated(SinkError),
}

impl Functions {
    /// Builds a guard per function and applies each function's ClickHouse DDL.
    pub async fn new(
        clients: &Clients,
        handlers: Vec<Arc<dyn Handler>>,
        kafka: &KafkaConfig,
    ) -> Result<Self, FunctionsError> {
        Self::new_with(clients, handlers, kafka, Schema::Migrate).await
    }

    /// Like [`new`](Self::new), with guards that check nothing (see
    /// [`Guard::make_pass_through`]): the benchmark's baseline for what the guard costs
    /// in the same worker. Never use it to run a function.
    #[cfg(feature = "pass-through")]
    pub async fn pass_through(
        clients: &Clients,
        handlers: Vec<Arc<dyn Handler>>,
        kafka: &KafkaConfig,
    ) -> Result<Self, FunctionsError> {
        let mut functions = Self::new(clients, handlers, kafka).await?;
        for f in &mut functions.list {
            let f = Arc::get_mut(f).expect("not shared yet");
            let guard = Arc::get_mut(&mut f.guard).expect("not shared yet");
            guard.make_pass_through();
        }
        Ok(functions)
    }

    /// Like [`new`](Self::new); with [`Schema::Check`] the ClickHouse tables are only
    /// checked (one query for all functions), not created.
    pub async fn new_with(
        clients: &Clients,
        handlers: Vec<Arc<dyn Handler>>,
        kafka: &KafkaConfig,
        schema: Schema,
    ) -> Result<Self, FunctionsError> {
        if schema == Schema::Check {
            let ddl: Vec<&str> = handlers.iter().map(|h| h.spec().clickhouse_ddl).collect();
            clients.sink.check_tables(&ddl).await.map_err(FunctionsError::NotMigrated)?;
        }
        let mut list = Vec::new();
        let mut by_topic: HashMap<String, usize> = HashMap::new();
        for handler in handlers {
            let spec = handler.spec();
            let mut guard_config = clients.config.guard.clone();
            if let Some(n) = spec.max_attempts {
                guard_config.max_attempts = n;
            }
            let guard = Guard::new(clients, spec.name, spec.id_strategy.clone(), guard_config)
                .map_err(|e| FunctionsError::Invalid(spec.name.to_owned(), e.to_string()))?
                .with_values(spec.value_format)
                .with_keys(spec.key_format);
            for (format, part) in [(spec.value_format, "values"), (spec.key_format, "keys")] {
                match format {
                    ValueFormat::Confluent { or_json } if !clients.registry.is_configured() => {
                        if !or_json {
                            // Every record would wait for a registry that is not there.
                            return Err(FunctionsError::Invalid(
                                spec.name.to_owned(),
                                format!(
                                    "its {part} are `{}`, framed for a schema registry: set SCHEMA_REGISTRY_URL",
                                    format.name()
                                ),
                            ));
                        }
                        tracing::warn!(
                            function = spec.name,
                            part,
                            "SCHEMA_REGISTRY_URL is not set: JSON is handled, what is framed for a registry is dead-lettered (schema_registry_unset; replay it once it is set)"
                        );
                    }
                    ValueFormat::Glue { .. } => {
                        // Every lookup would fail without a region: refuse to start instead.
                        clients
                            .registry
                            .glue_ready(Duration::from_secs(30))
                            .await
                            .map_err(|e| FunctionsError::Invalid(spec.name.to_owned(), e))?;
                    }
                    _ => {}
                }
            }
            if schema == Schema::Migrate && !spec.clickhouse_ddl.trim().is_empty() {
                clients
                    .sink
                    .apply_ddl(spec.clickhouse_ddl)
                    .await
                    .map_err(|e| FunctionsError::Ddl(spec.name.to_owned(), e))?;
            }
            // Export this function's series from the start (0, not absent).
            let m = crate::metrics::metrics();
            m.worker_in_flight.with_label_values(&[spec.name]).add(0);
            m.processed.with_label_values(&[spec.name]).inc_by(0);
            let topics: Vec<String> = spec.topics.iter().map(|t| kafka.topic(t)).collect();
            for t in &topics {
                if let Some(&other) = by_topic.get(t) {
                    let first: &Arc<Function> = &list[other];
                    return Err(FunctionsError::TopicClash {
                        topic: t.clone(),
                        first: first.spec.name.to_owned(),
                        second: spec.name.to_owned(),
                    });
                }
                by_topic.insert(t.clone(), list.len());
            }
            list.push(Arc::new(Function { spec, handler, guard: Arc::new(guard), topics }));
        }
        Ok(Self { list, by_topic })
    }

    /// Every function, in the order they were given.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Function>> {
        self.list.iter()
    }

    /// The function named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Function>> {
        self.list.iter().find(|f| f.spec.name == name)
    }

    /// The function reading `topic`; a process with a single function takes every topic
    /// (an MSK trigger only delivers the topics it was configured with).
    pub fn by_topic(&self, topic: &str) -> Option<&Arc<Function>> {
        match self.by_topic.get(topic) {
            Some(&i) => Some(&self.list[i]),
            None if self.list.len() == 1 => self.list.first(),
            None => None,
        }
    }

    /// Every function's topics, with the configured prefix.
    pub fn topics(&self) -> Vec<String> {
        self.list.iter().flat_map(|f| f.topics.iter().cloned()).collect()
    }

    /// Runs records through the function owning each one's topic, one guarded batch per
    /// function. Outcomes come back in the order of `records`.
    pub async fn run(&self, records: &[Record], deadline: Option<Instant>) -> Vec<EventOutcome> {
        let mut groups: Vec<(Option<Arc<Function>>, Vec<usize>)> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let f = self.by_topic(&r.event().topic).cloned();
            let name = f.as_ref().map(|f| f.spec.name);
            match groups.iter_mut().find(|(g, _)| g.as_ref().map(|g| g.spec.name) == name) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((f, vec![i])),
            }
        }
        let mut out: Vec<Option<EventOutcome>> = vec![None; records.len()];
        for (function, idx) in groups {
            match function {
                Some(f) => {
                    let batch: Vec<Record> = idx.iter().map(|&i| records[i].clone()).collect();
                    let report = f.guard.run_records(f.handler.as_ref(), &batch, deadline).await;
                    for (i, o) in idx.into_iter().zip(report.outcomes) {
                        out[i] = Some(o);
                    }
                }
                None => {
                    for i in idx {
                        let event = records[i].event();
                        out[i] = Some(EventOutcome::new(
                            event,
                            None,
                            Outcome::Failed {
                                kind: FailureKind::Permanent,
                                error: format!("no function in this process consumes topic `{}`", event.topic),
                                attempts: None,
                            },
                        ));
                    }
                }
            }
        }
        out.into_iter().map(|o| o.expect("every record has an outcome")).collect()
    }
}
