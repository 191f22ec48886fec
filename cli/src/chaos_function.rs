//! `chaos-faults`: a function that exists only for the fault run (`eo-faults chaos`), never
//! deployed. Its records ask for the failures a real handler or a real table can make,
//! so the run can count exactly what became of each:
//!
//! - `{"kind": "ok"}`: one row in `chaos_rows`, confirmed;
//! - `{"kind": "panic"}`: the handler panics on every attempt: a counted, retryable
//!   failure, dead-lettered as `max_attempts` after [`MAX_ATTEMPTS`];
//! - `{"kind": "reject"}`: a row ClickHouse refuses as data (`d` is not a date, and the
//!   table parses it on insert): dead-lettered as `clickhouse_rejected`, the rest of its
//!   batch lands;
//! - `{"kind": "unpublishable"}`: a row, confirmed, and an outbox message larger than
//!   the producer may send ([`UNPUBLISHABLE_BYTES`]): the broker can never take it, so
//!   the relay dead-letters it after `OUTBOX_MAX_ATTEMPTS`, without opening the Kafka
//!   breaker, while the other messages flow.
//!
//! `eo run` and `eo esm` include it only with `EO_CHAOS_FUNCTION=1`; the `chaos-faults`
//! binary is its Lambda form.

use exactly_once::clickhouse::Row;
use exactly_once::{async_trait, Event, FunctionSpec, Handler, HandlerContext, HandlerError, IdStrategy};
use serde::{Deserialize, Serialize};

pub const NAME: &str = "chaos-faults";
pub const TOPICS: &[&str] = &["chaos-faults"];
pub const TABLE: &str = "chaos_rows";
/// Attempts before a panicking event is dead-lettered (few: the run is short).
pub const MAX_ATTEMPTS: u32 = 2;
pub const DDL: &str = "CREATE TABLE IF NOT EXISTS chaos_rows (
    event_id String,
    d        String,
    parsed   Date MATERIALIZED toDate(d)
) ENGINE = ReplacingMergeTree ORDER BY event_id";

/// Where unpublishable messages would go.
pub const OUTPUT_TOPIC: &str = "chaos-faults-out";
/// Over the producer's default `message.max.bytes` (1,000,000).
pub const UNPUBLISHABLE_BYTES: usize = 1_200_000;

/// The variable that adds this function to `eo run` and `eo esm`.
pub const ENABLE_VAR: &str = "EO_CHAOS_FUNCTION";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Ok,
    Panic,
    Reject,
    Unpublishable,
}

#[derive(Debug, Deserialize, Serialize)]
pub struct Request {
    pub kind: Kind,
}

#[derive(Debug, Row, Serialize)]
#[clickhouse(crate = "exactly_once::clickhouse")]
struct ChaosRow {
    event_id: String,
    d: String,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ChaosFaults;

impl ChaosFaults {
    pub fn payload(kind: Kind) -> Vec<u8> {
        serde_json::to_vec(&Request { kind }).expect("serialisable")
    }
}

#[async_trait]
impl Handler for ChaosFaults {
    fn spec(&self) -> FunctionSpec {
        FunctionSpec::new(NAME, TOPICS, IdStrategy::Header(exactly_once::event_id::IDEMPOTENCY_KEY_HEADER.into()))
            .clickhouse_ddl(DDL)
            .max_attempts(MAX_ATTEMPTS)
            .publishes(&[OUTPUT_TOPIC])
    }

    async fn handle(&self, event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        let request: Request = serde_json::from_slice(event.value_bytes())?;
        let d = match request.kind {
            Kind::Ok => "2026-11-23",
            Kind::Panic => panic!("chaos-faults: a handler panic, as asked"),
            Kind::Reject => "not a date",
            Kind::Unpublishable => {
                ctx.publish(OUTPUT_TOPIC, None, &vec![b'x'; UNPUBLISHABLE_BYTES]).await?;
                "2026-11-23"
            }
        };
        ctx.clickhouse(TABLE, ChaosRow { event_id: ctx.event_id().to_string(), d: d.into() })
    }

    fn sample(&self, _n: u64) -> Option<Vec<u8>> {
        Some(Self::payload(Kind::Ok))
    }
}
