//! A test handler that writes one Postgres row per event in the guard's transaction,
//! and the guard and events the modules below run it with.

use std::sync::atomic::{AtomicU32, Ordering};

use exactly_once::config::GuardConfig;
use exactly_once::{async_trait, Event, FunctionSpec, Guard, Handler, HandlerContext, HandlerError, IdStrategy};
use integration_tests::{user_event, TestEnv};

/// Writes an effect row in the guard's transaction; can be told to fail.
pub struct Effects {
    pub name: &'static str,
    pub calls: AtomicU32,
    pub fail: bool,
    pub max_attempts: Option<u32>,
}

impl Effects {
    pub fn new(name: &'static str) -> Self {
        Self { name, calls: AtomicU32::new(0), fail: false, max_attempts: None }
    }
}

#[async_trait]
impl Handler for Effects {
    fn spec(&self) -> FunctionSpec {
        let topics: &'static [&'static str] = match self.name {
            "strict" => &["strict"],
            "lenient" => &["lenient"],
            _ => &["features"],
        };
        let spec = FunctionSpec::new(self.name, topics, IdStrategy::Header("idempotency_key".into()));
        match self.max_attempts {
            Some(n) => spec.max_attempts(n),
            None => spec,
        }
    }

    async fn handle(&self, _event: &Event, ctx: &mut HandlerContext<'_>) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.fail {
            return Err(HandlerError::retryable("this handler always fails"));
        }
        let id = ctx.event_id().to_string();
        sqlx::query("INSERT INTO effects (event_id) VALUES ($1)").bind(id).execute(ctx.postgres().await?).await?;
        Ok(())
    }
}

pub async fn effects_table(env: &TestEnv) {
    sqlx::query("CREATE TABLE effects (seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL)")
        .execute(env.pg())
        .await
        .unwrap();
}

pub fn guard(env: &TestEnv, name: &str, config: GuardConfig) -> Guard {
    Guard::new(&env.clients, name, IdStrategy::Header("idempotency_key".into()), config).unwrap()
}

pub fn ev(id: &str, offset: i64) -> Event {
    user_event("features", 0, offset, id, "u")
}
