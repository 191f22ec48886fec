//! The worker's HTTP server: `/healthz`, `/readyz`, `/metrics`, and
//! `POST /invoke/{function}` (the MSK event JSON Lambda receives, for local testing).
//!
//! Invariants: `POST /invoke` changes state, so it is never open to the network by
//! default: the server binds to loopback unless `HTTP_BIND` says otherwise, and a
//! non-loopback bind requires `INVOKE_TOKEN` (checked at configuration load). When a
//! token is set, every invoke must carry it as `Authorization: Bearer <token>`. Request
//! bodies are capped at `HTTP_MAX_BODY_BYTES` (413 beyond).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::functions::Functions;
use super::lambda::summary;
use super::msk;
use crate::breaker::BreakerState;
use crate::clients::Clients;
use crate::config::{HttpConfig, Secret};
use crate::metrics::metrics;

#[derive(Clone)]
struct AppState {
    functions: Arc<Functions>,
    clients: Clients,
    token: Option<Secret>,
}

/// The router, ready to serve.
pub fn router(functions: Arc<Functions>, clients: Clients, config: &HttpConfig) -> Router {
    let state = AppState { functions, clients, token: config.invoke_token.clone() };
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/invoke/{function}", post(invoke))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(state)
}

/// Binds and serves until `shutdown` resolves. Returns the bound address first.
pub async fn serve(
    router: Router,
    bind: std::net::SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    Ok((addr, task))
}

async fn render_metrics() -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], metrics().render()).into_response()
}

async fn readyz(State(s): State<AppState>) -> Response {
    const PROBE: Duration = Duration::from_secs(2);
    let postgres =
        matches!(tokio::time::timeout(PROBE, sqlx::query("SELECT 1").execute(&s.clients.pg)).await, Ok(Ok(_)));
    let redis = s.clients.redis.ping(PROBE).await;
    let clickhouse = matches!(
        tokio::time::timeout(PROBE, s.clients.sink.client().query("SELECT 1").fetch_one::<u8>()).await,
        Ok(Ok(1))
    );
    let breakers = [s.clients.leases.breaker(), s.clients.sink.breaker(), &s.clients.kafka_breaker];
    let open: Vec<&str> = breakers.iter().filter(|b| b.state() == BreakerState::Open).map(|b| b.dependency()).collect();
    let ready = postgres && redis && clickhouse && open.is_empty();
    let body = json!({
        "ready": ready,
        "postgres": postgres,
        "redis": redis,
        "clickhouse": clickhouse,
        "open_breakers": open,
    });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn invoke(State(s): State<AppState>, Path(function): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(token) = &s.token {
        let given =
            headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => {
                return error(StatusCode::UNAUTHORIZED, "missing bearer token (Authorization: Bearer <INVOKE_TOKEN>)")
            }
            Some(t) if !constant_time_eq(t.as_bytes(), token.expose().as_bytes()) => {
                return error(StatusCode::FORBIDDEN, "wrong bearer token")
            }
            Some(_) => {}
        }
    }
    let Some(f) = s.functions.by_name(&function) else {
        let known: Vec<&str> = s.functions.iter().map(|f| f.spec.name).collect();
        return error(StatusCode::NOT_FOUND, format!("no function `{function}`; this worker runs {known:?}"));
    };
    let event = match msk::parse(&body) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("body is not an MSK event ({}): {e}", e.reason)),
    };
    let records = msk::decode(&event);
    // The invoke path names its function, so every record goes to it whatever its topic.
    let report = f.guard.run_records(f.handler.as_ref(), &records, None).await;
    let mut body = summary(&report.outcomes);
    body["function"] = f.spec.name.into();
    body["allFinished"] = report.all_finished().into();
    (StatusCode::OK, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_comparison() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"abcd"));
    }
}
