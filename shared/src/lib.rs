//! # exactly-once
//!
//! Consume Kafka exactly once in effect. Every function (one per topic) implements
//! [`Handler`]; this library runs it under the guard protocol (`guard`), with circuit
//! breakers (`breaker`) in front of Redis, ClickHouse and Kafka, and a batched
//! ClickHouse sink (`sink`).
//!
//! Where an event goes: `event` (the record) → `event_id` (its stable id) →
//! `guard` (cache, Redis lease, Postgres check, handler, confirm, release) →
//! `outcome` (what happened, and whether the offset may move).

#![warn(missing_docs)]

pub use exactly_once_core::{event, event_id, payload};

pub mod breaker;
pub mod clients;
pub mod config;
pub mod guard;
pub mod handler;
#[cfg(feature = "isolation")]
pub mod isolation;
pub mod kafka_client;
#[cfg(feature = "isolation")]
pub mod local_cluster;
pub mod metrics;
pub mod outbox;
pub mod outcome;
pub mod postgres;
pub mod producer;
pub mod redis_client;
pub mod registry;
pub mod retention;
pub mod runtime;
pub mod sink;
mod transaction;

pub use breaker::{BreakerState, CircuitBreaker};
pub use clients::{Clients, InitError, Schema};
pub use config::Config;
pub use event::{Event, Header, PayloadHash, Record};
pub use event_id::{EventId, IdError, IdStrategy, Namespace};
pub use guard::Guard;
pub use handler::{FunctionSpec, Handler, HandlerContext, HandlerError};
pub use outcome::{BatchReport, DeadLetterReason, DuplicateTier, EventOutcome, FailureKind, Outcome, OutcomeKind};
pub use payload::ValueFormat;

/// An error kept as the source of ours: what a dependency said, for the error chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub use async_trait::async_trait;
/// Re-exported so function crates derive rows against the same version.
pub use clickhouse;

/// Code the docs show (the README's handler example), compiled as doc tests.
#[cfg(doctest)]
mod doctests;
