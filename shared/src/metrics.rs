//! Prometheus metrics, under names that stay put (`kafka_events_*`, `processed_events_*`,
//! ...): alert rules and dashboards are written against them.
//!
//! One process-wide registry; every series carries the function (namespace) or the
//! dependency as a label, so one worker running several functions exports them side by
//! side. Names are constants so dashboards and alert rules can refer to the code.

use std::sync::LazyLock;

use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// The name of [`Metrics::processed`].
pub const EVENTS_PROCESSED: &str = "kafka_events_processed_total";
/// The name of [`Metrics::duplicates`].
pub const EVENTS_DUPLICATES: &str = "kafka_events_duplicates_total";
/// The name of [`Metrics::deduplicated`].
pub const EVENT_DEDUPLICATED: &str = "kafka_event_deduplicated_total";
/// The name of [`Metrics::lease_contention`].
pub const EVENTS_IN_FLIGHT_SKIPPED: &str = "kafka_events_lease_contention_total";
/// The name of [`Metrics::failed`].
pub const EVENTS_FAILED: &str = "kafka_events_failed_total";
/// The name of [`Metrics::dead_lettered`].
pub const EVENTS_DEAD_LETTERED: &str = "kafka_events_dead_lettered_total";
/// The name of [`Metrics::payload_mismatch`].
pub const PAYLOAD_MISMATCH: &str = "kafka_events_payload_mismatch_total";
/// The name of [`Metrics::breaker_state`].
pub const BREAKER_STATE: &str = "circuit_breaker_state";
/// The name of [`Metrics::breaker_transitions`].
pub const BREAKER_TRANSITIONS: &str = "circuit_breaker_transitions_total";
/// The name of [`Metrics::round_trips`].
pub const GUARD_ROUND_TRIPS: &str = "guard_round_trips_total";
/// The name of [`Metrics::worker_in_flight`].
pub const WORKER_IN_FLIGHT: &str = "kafka_events_in_flight";
/// The name of [`Metrics::partition_pauses`].
pub const PARTITION_PAUSES: &str = "kafka_partition_pauses_total";
/// The name of [`Metrics::partition_restarts`].
pub const PARTITION_RESTARTS: &str = "kafka_partition_task_restarts_total";
/// The name of [`Metrics::clickhouse_rejected`].
pub const CLICKHOUSE_REJECTED: &str = "clickhouse_rejected_events_total";
/// The name of [`Metrics::table_size`].
pub const TABLE_SIZE: &str = "processed_events_table_size";
/// The name of [`Metrics::cleanup_deleted`].
pub const CLEANUP_DELETED: &str = "processed_events_cleanup_deleted_total";
/// The name of [`Metrics::outbox_published`].
pub const OUTBOX_PUBLISHED: &str = "outbox_messages_published_total";
/// The name of [`Metrics::outbox_failed`].
pub const OUTBOX_FAILED: &str = "outbox_publish_failures_total";
/// The name of [`Metrics::outbox_dead_lettered`].
pub const OUTBOX_DEAD_LETTERED: &str = "outbox_messages_dead_lettered_total";
/// The name of [`Metrics::outbox_cleanup_deleted`].
pub const OUTBOX_CLEANUP_DELETED: &str = "outbox_cleanup_deleted_total";

/// The name of [`Metrics::redis_pool`].
pub const REDIS_POOL_EVENTS: &str = "redis_pool_events_total";

/// Every metric this library exports (alert rules and dashboards are checked against it).
pub const ALL: &[&str] = &[
    EVENTS_PROCESSED,
    EVENTS_DUPLICATES,
    EVENT_DEDUPLICATED,
    EVENTS_IN_FLIGHT_SKIPPED,
    EVENTS_FAILED,
    EVENTS_DEAD_LETTERED,
    PAYLOAD_MISMATCH,
    BREAKER_STATE,
    BREAKER_TRANSITIONS,
    GUARD_ROUND_TRIPS,
    WORKER_IN_FLIGHT,
    PARTITION_PAUSES,
    CLICKHOUSE_REJECTED,
    PARTITION_RESTARTS,
    TABLE_SIZE,
    CLEANUP_DELETED,
    OUTBOX_PUBLISHED,
    OUTBOX_FAILED,
    OUTBOX_DEAD_LETTERED,
    OUTBOX_CLEANUP_DELETED,
    REDIS_POOL_EVENTS,
];

/// The process's metrics, registered once in one registry (see `metrics()`).
pub struct Metrics {
    /// The registry every metric below is registered in; `/metrics` exports it.
    pub registry: Registry,
    /// `{function}`: handled and confirmed.
    pub processed: IntCounterVec,
    /// `{function, tier}`: skipped as already confirmed; tier is where it was found
    /// (`local`, `redis`, `postgres`, `confirm`, `batch`).
    pub duplicates: IntCounterVec,
    /// `{function}`: every duplicate, whatever the tier (one counter for dashboards that
    /// do not care where it was found).
    pub deduplicated: IntCounterVec,
    /// `{function}`: leased by someone else, to be retried.
    pub lease_contention: IntCounterVec,
    /// `{function, kind}`: failed attempts (`retryable`, `permanent`, `unavailable`).
    pub failed: IntCounterVec,
    /// `{function, reason}`.
    pub dead_lettered: IntCounterVec,
    /// `{function}`: a duplicate id whose payload differs from the confirmed one.
    pub payload_mismatch: IntCounterVec,
    /// `{dependency}`: 0 closed, 1 half-open, 2 open.
    pub breaker_state: IntGaugeVec,
    /// `{dependency, to}`.
    pub breaker_transitions: IntCounterVec,
    /// `{function, store}`: round trips the guard made to Redis and Postgres.
    pub round_trips: IntCounterVec,
    /// Records the worker has received and not yet finished.
    /// `{function}`: records the worker has received and not yet finished.
    pub worker_in_flight: IntGaugeVec,
    /// `{function}`: partitions paused because the ClickHouse breaker was open.
    pub partition_pauses: IntCounterVec,
    /// `{function}`: events whose rows ClickHouse refused as invalid data (dead-lettered).
    pub clickhouse_rejected: IntCounterVec,
    /// `{function}`: partition tasks that ended unexpectedly and were restarted.
    pub partition_restarts: IntCounterVec,
    /// Rows in `processed_events`, so an alert sees the ledger outgrow its retention.
    pub table_size: IntGauge,
    /// Rows the retention cleanup deleted.
    pub cleanup_deleted: prometheus::IntCounter,
    /// `{function}`: outbox messages the broker acknowledged.
    pub outbox_published: IntCounterVec,
    /// `{function, kind}`: outbox sends that failed; kind is the refusal's reason
    /// (`message_too_large`, `unknown_topic`, ...), `unavailable` or `retry`.
    pub outbox_failed: IntCounterVec,
    /// `{function, reason}`: outbox messages set aside after `OUTBOX_MAX_ATTEMPTS` refusals.
    pub outbox_dead_lettered: IntCounterVec,
    /// Published outbox messages deleted past `OUTBOX_RETENTION_HOURS`.
    pub outbox_cleanup_deleted: prometheus::IntCounter,
    /// `{event}`: the standalone Redis pool's connections. `checked`: pinged before reuse
    /// (idle, or after a failure in the pool); `check_failed`: that PING failed, the
    /// connection was replaced; `call_failed`: a call found its connection closed or
    /// unusable, replaced; `call_unanswered`: a call timed out or was given up, every
    /// connection is checked before its next use.
    pub redis_pool: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry.register(Box::new(c.clone())).expect("metric registered once");
    c
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let breaker_state = IntGaugeVec::new(
            Opts::new(BREAKER_STATE, "Circuit breaker state: 0 closed, 1 half-open, 2 open"),
            &["dependency"],
        )
        .expect("valid metric definition");
        registry.register(Box::new(breaker_state.clone())).expect("metric registered once");
        let worker_in_flight = IntGaugeVec::new(
            Opts::new(WORKER_IN_FLIGHT, "Records received by the worker and not yet finished"),
            &["function"],
        )
        .expect("valid metric");
        registry.register(Box::new(worker_in_flight.clone())).expect("metric registered once");
        let table_size = IntGauge::new(TABLE_SIZE, "Current number of rows in processed_events").expect("valid metric");
        registry.register(Box::new(table_size.clone())).expect("metric registered once");
        let cleanup_deleted = prometheus::IntCounter::new(CLEANUP_DELETED, "Rows deleted by the retention cleanup")
            .expect("valid metric");
        registry.register(Box::new(cleanup_deleted.clone())).expect("metric registered once");
        let outbox_cleanup_deleted =
            prometheus::IntCounter::new(OUTBOX_CLEANUP_DELETED, "Published outbox messages deleted by the cleanup")
                .expect("valid metric");
        registry.register(Box::new(outbox_cleanup_deleted.clone())).expect("metric registered once");
        Self {
            table_size,
            cleanup_deleted,
            outbox_cleanup_deleted,
            outbox_published: counter(
                &registry,
                OUTBOX_PUBLISHED,
                "Outbox messages acknowledged by Kafka",
                &["function"],
            ),
            outbox_failed: counter(
                &registry,
                OUTBOX_FAILED,
                "Outbox sends that failed, by why: a refusal of that message, or Kafka unavailable",
                &["function", "kind"],
            ),
            outbox_dead_lettered: counter(
                &registry,
                OUTBOX_DEAD_LETTERED,
                "Outbox messages dead-lettered after repeated refusals",
                &["function", "reason"],
            ),
            worker_in_flight,
            processed: counter(&registry, EVENTS_PROCESSED, "Events handled and confirmed", &["function"]),
            duplicates: counter(
                &registry,
                EVENTS_DUPLICATES,
                "Duplicate events skipped, by the tier that caught them",
                &["function", "tier"],
            ),
            deduplicated: counter(&registry, EVENT_DEDUPLICATED, "Duplicate events skipped", &["function"]),
            lease_contention: counter(
                &registry,
                EVENTS_IN_FLIGHT_SKIPPED,
                "Events leased by another consumer, left for a retry",
                &["function"],
            ),
            failed: counter(&registry, EVENTS_FAILED, "Failed attempts, by kind", &["function", "kind"]),
            dead_lettered: counter(
                &registry,
                EVENTS_DEAD_LETTERED,
                "Events moved to the dead-letter store",
                &["function", "reason"],
            ),
            payload_mismatch: counter(
                &registry,
                PAYLOAD_MISMATCH,
                "Duplicate ids whose payload differs from the confirmed event",
                &["function"],
            ),
            breaker_transitions: counter(
                &registry,
                BREAKER_TRANSITIONS,
                "Circuit breaker state changes",
                &["dependency", "to"],
            ),
            partition_pauses: counter(
                &registry,
                PARTITION_PAUSES,
                "Partitions paused while the ClickHouse breaker was open",
                &["function"],
            ),
            clickhouse_rejected: counter(
                &registry,
                CLICKHOUSE_REJECTED,
                "Events whose rows ClickHouse rejected as invalid data (dead-lettered as clickhouse_rejected)",
                &["function"],
            ),
            partition_restarts: counter(
                &registry,
                PARTITION_RESTARTS,
                "Partition tasks that ended unexpectedly; the partition was read again from its last finished offset",
                &["function"],
            ),
            round_trips: counter(&registry, GUARD_ROUND_TRIPS, "Round trips made by the guard", &["function", "store"]),
            redis_pool: counter(
                &registry,
                REDIS_POOL_EVENTS,
                "Standalone Redis pool: connections checked before reuse (checked, check_failed: replaced), calls that broke their connection (call_failed: replaced) or went unanswered (call_unanswered)",
                &["event"],
            ),
            breaker_state,
            registry,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding of gathered metrics");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}
