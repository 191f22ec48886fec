//! `notifications` (a communication service: a notification must reach a user once, and a
//! duplicate email or push is visible to them): a request event creates one row
//! in the Postgres table `notifications`, in the same transaction as the event's
//! confirm, and announces it on `notifications-outbound` through the outbox for the
//! sender that delivers it.
//!
//! Payload: `{"user_id", "channel": "email"|"push"|"sms", "title", "body"}`; the id is
//! the `idempotency_key` header, else the payload's `request_id`.
//!
//! Why a notification is never created twice, not even when a lease expires mid-handler:
//! the row and the confirm commit together; a second holder's insert waits on the first
//! holder's uncommitted row (`event_id` is unique), then inserts nothing
//! (`ON CONFLICT DO NOTHING`), and its confirm finds the first holder's row, so its
//! transaction rolls back.

use exactly_once::{async_trait, Event, FunctionSpec, Handler, HandlerContext, HandlerError, IdStrategy};
use serde::Deserialize;

pub const NAME: &str = "notifications";
pub const TOPICS: &[&str] = &["notification-requests"];
pub const OUTBOUND_TOPIC: &str = "notifications-outbound";

#[derive(Debug, Deserialize)]
pub struct NotificationRequest {
    pub user_id: String,
    pub channel: Channel,
    pub title: String,
    pub body: String,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Email,
    Push,
    Sms,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Push => "push",
            Channel::Sms => "sms",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Notifications;

#[async_trait]
impl Handler for Notifications {
    fn spec(&self) -> FunctionSpec {
        FunctionSpec::new(
            NAME,
            TOPICS,
            IdStrategy::FirstOf(vec![
                IdStrategy::Header(exactly_once::event_id::IDEMPOTENCY_KEY_HEADER.into()),
                IdStrategy::PayloadField("/request_id".into()),
            ]),
        )
        .publishes(&[OUTBOUND_TOPIC])
    }

    async fn handle(&self, event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        let req: NotificationRequest = serde_json::from_slice(event.value_bytes())?;
        if req.user_id.trim().is_empty() || req.title.is_empty() {
            return Err(HandlerError::permanent("payload_invalid", "user_id and title must not be empty"));
        }
        let event_id = ctx.event_id().to_string();
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO notifications (event_id, user_id, channel, title, body) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (event_id) DO NOTHING RETURNING id",
        )
        .bind(&event_id)
        .bind(&req.user_id)
        .bind(req.channel.as_str())
        .bind(&req.title)
        .bind(&req.body)
        .fetch_optional(ctx.postgres().await?)
        .await?;
        // None: another holder created it and committed while we waited; our confirm
        // will find its row and roll this transaction back.
        if let Some(id) = id {
            let announcement = serde_json::json!({
                "notification_id": id,
                "user_id": req.user_id,
                "channel": req.channel.as_str(),
                "title": req.title,
            });
            ctx.publish(OUTBOUND_TOPIC, Some(req.user_id.as_bytes()), announcement.to_string().as_bytes()).await?;
        }
        Ok(())
    }

    fn sample(&self, n: u64) -> Option<Vec<u8>> {
        let channel = ["email", "push", "sms"][(n % 3) as usize];
        Some(
            serde_json::json!({
                "user_id": format!("user-{}", n / 3),
                "channel": channel,
                "title": format!("Hello #{n}"),
                "body": "Welcome aboard.",
            })
            .to_string()
            .into_bytes(),
        )
    }
}
