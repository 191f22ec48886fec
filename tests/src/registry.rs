//! A schema registry for the tests: the part of Confluent's REST API that serializers and
//! our client use, served on a free local port. No Confluent registry runs here, so this
//! stands in for one (as the MSK API stub does for MSK); what is tested against it is
//! our client and the bytes Confluent's own serializers write.
//!
//! - `POST /subjects/{subject}/versions` registers a schema (the same text gets the same
//!   id) and answers `{"id": n}`;
//! - `GET /schemas/ids/{id}` answers `{"schema": ..., "schemaType": ...}` or 404 with
//!   Confluent's error code 40403;
//! - with credentials set, a request without them gets 401;
//! - `set_failing(true)` answers 503 to everything (the registry down).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

#[derive(Default)]
struct Inner {
    /// (schema text, schema type) by id; ids from 1.
    schemas: Mutex<Vec<(String, String)>>,
    failing: AtomicBool,
    lookups: AtomicU64,
    /// `Basic <base64>` expected, when set.
    auth: Option<String>,
}

/// A running stand-in registry; stops when dropped with the test's runtime.
pub struct Registry {
    url: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Registry {
    /// A registry without credentials.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// A registry that requires basic auth with `user` and `password`.
    pub async fn start_with(credentials: Option<(&str, &str)>) -> Self {
        use base64::Engine as _;
        let auth = credentials
            .map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))));
        let inner = Arc::new(Inner { auth, ..Inner::default() });
        let app = Router::new()
            .route("/subjects/{subject}/versions", post(register))
            .route("/schemas/ids/{id}", get(by_id))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the registry");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, inner, task }
    }

    /// Its base URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Registers a schema directly; its id.
    pub fn register(&self, schema: &str, schema_type: &str) -> u32 {
        register_text(&self.inner, schema, schema_type)
    }

    /// Answer 503 to everything (`true`) or serve again.
    pub fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::SeqCst);
    }

    /// `GET /schemas/ids/{id}` requests answered so far, failed ones included.
    pub fn lookups(&self) -> u64 {
        self.inner.lookups.load(Ordering::SeqCst)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn register_text(inner: &Inner, schema: &str, schema_type: &str) -> u32 {
    let mut schemas = inner.schemas.lock().expect("registry lock");
    let n = match schemas.iter().position(|(s, t)| s == schema && t == schema_type) {
        Some(i) => i + 1,
        None => {
            schemas.push((schema.to_owned(), schema_type.to_owned()));
            schemas.len()
        }
    };
    u32::try_from(n).expect("few schemas")
}

fn refuse(inner: &Inner, headers: &HeaderMap) -> Option<Response> {
    if inner.failing.load(Ordering::SeqCst) {
        return Some((StatusCode::SERVICE_UNAVAILABLE, "registry down (test)").into_response());
    }
    if let Some(expected) = &inner.auth {
        let given = headers.get("authorization").and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            return Some(
                (StatusCode::UNAUTHORIZED, Json(json!({"error_code": 401, "message": "Unauthorized"}))).into_response(),
            );
        }
    }
    None
}

async fn register(
    State(inner): State<Arc<Inner>>,
    Path(_subject): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = refuse(&inner, &headers) {
        return r;
    }
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return (StatusCode::UNPROCESSABLE_ENTITY, "not JSON").into_response();
    };
    let Some(schema) = request.get("schema").and_then(|s| s.as_str()) else {
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error_code": 42201, "message": "no schema"})))
            .into_response();
    };
    let schema_type = request.get("schemaType").and_then(|s| s.as_str()).unwrap_or("AVRO");
    let id = register_text(&inner, schema, schema_type);
    Json(json!({ "id": id })).into_response()
}

async fn by_id(State(inner): State<Arc<Inner>>, Path(id): Path<u32>, headers: HeaderMap) -> Response {
    inner.lookups.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = refuse(&inner, &headers) {
        return r;
    }
    let found: Option<(String, String)> = {
        let schemas = inner.schemas.lock().expect("registry lock");
        usize::try_from(id).ok().and_then(|i| i.checked_sub(1)).and_then(|i| schemas.get(i).cloned())
    };
    match found {
        Some((schema, schema_type)) => {
            let mut answer = HashMap::from([("schema", schema)]);
            // Confluent leaves the type out for Avro.
            if schema_type != "AVRO" {
                answer.insert("schemaType", schema_type);
            }
            Json(answer).into_response()
        }
        None => {
            (StatusCode::NOT_FOUND, Json(json!({"error_code": 40403, "message": "Schema not found"}))).into_response()
        }
    }
}
