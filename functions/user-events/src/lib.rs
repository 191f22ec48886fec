//! `user-events`: user lifecycle events (created / updated / deleted, JSON) into the
//! ClickHouse table `user_events`, one row per event, repeats collapsed by event id.
//!
//! Payload: `{"event_id"?, "user_id", "type": "created"|"updated"|"deleted",
//! "email"?, "name"?, "occurred_at"?: unix seconds}`. The id comes from the
//! `idempotency_key` header, else the payload's `event_id`, else the record position.

use exactly_once::clickhouse::Row;
use exactly_once::{async_trait, Event, FunctionSpec, Handler, HandlerContext, HandlerError, IdStrategy};
use serde::{Deserialize, Serialize};
use serde_repr::Serialize_repr;

pub const NAME: &str = "user-events";
pub const TOPICS: &[&str] = &["user-events"];
pub const TABLE: &str = "user_events";
pub const CLICKHOUSE_DDL: &str = include_str!("../../../migrations/clickhouse/user_events.sql");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize_repr)]
#[serde(rename_all = "lowercase")]
#[repr(i8)]
pub enum Kind {
    Created = 1,
    Updated = 2,
    Deleted = 3,
}

/// The event as producers send it.
#[derive(Debug, Deserialize)]
pub struct UserEvent {
    pub user_id: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// Unix seconds; the record's timestamp when absent.
    #[serde(default)]
    pub occurred_at: Option<u32>,
}

/// One row of `user_events`.
#[derive(Debug, Clone, Row, Serialize)]
#[clickhouse(crate = "exactly_once::clickhouse")]
pub struct UserEventRow {
    pub event_id: String,
    pub user_id: String,
    pub kind: Kind,
    pub email: Option<String>,
    pub name: Option<String>,
    pub occurred_at: u32,
    pub topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub version: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct UserEvents;

#[async_trait]
impl Handler for UserEvents {
    fn spec(&self) -> FunctionSpec {
        FunctionSpec::new(NAME, TOPICS, IdStrategy::default_chain(Some("/event_id"), None))
            .clickhouse_ddl(CLICKHOUSE_DDL)
    }

    async fn handle(&self, event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        let e: UserEvent = serde_json::from_slice(event.value_bytes())?;
        if e.user_id.trim().is_empty() {
            return Err(HandlerError::permanent("payload_invalid", "user_id is empty"));
        }
        let occurred_at =
            e.occurred_at.or_else(|| event.timestamp_ms.and_then(|ms| u32::try_from(ms / 1000).ok())).unwrap_or(0);
        let row = UserEventRow {
            event_id: ctx.event_id().to_string(),
            user_id: e.user_id,
            kind: e.kind,
            email: e.email,
            name: e.name,
            occurred_at,
            topic: event.topic.clone(),
            kafka_partition: event.partition,
            kafka_offset: event.offset,
            version: event.offset.max(0) as u64,
        };
        ctx.clickhouse(TABLE, row)
    }

    fn sample(&self, n: u64) -> Option<Vec<u8>> {
        let kind = ["created", "updated", "deleted"][(n % 3) as usize];
        let payload = serde_json::json!({
            "user_id": format!("user-{}", n / 3),
            "type": kind,
            "email": format!("user-{}@example.com", n / 3),
            "name": format!("User {}", n / 3),
            "occurred_at": 1_700_000_000u64 + n,
        });
        Some(payload.to_string().into_bytes())
    }
}
