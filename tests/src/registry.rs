//! A schema registry for the tests: the part of Confluent's REST API that serializers and
//! our client use, served on a free local port. No Confluent registry runs here, so this
//! stands in for one (as the MSK API stub does for MSK); what is tested against it is
//! our client and the bytes Confluent's own serializers write.
//!
//! - `POST /subjects/{subject}/versions` registers a schema with its references (the same
//!   text gets the same id) and answers `{"id", "subject", "version"}`;
//! - `POST /subjects/{subject}` looks a schema up in a subject (serializers do, for the
//!   files a Protobuf schema imports), or 404 with 40403;
//! - `GET /schemas/ids/{id}` answers `{"schema", "schemaType", "references"}` or 404 with
//!   Confluent's error code 40403;
//! - `GET /subjects/{subject}/versions/{version}` answers the same with subject, version
//!   and id, or 404 with 40401 (no such subject) or 40402 (no such version);
//! - `?format=serialized` is accepted and changes nothing: a Protobuf schema is kept as
//!   the serializer registered it, a base64 `FileDescriptorProto`, which is what a real
//!   registry gives for `format=serialized` (it would give `.proto` text without it;
//!   our client asks for the serialized form);
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

/// A registered schema.
#[derive(Clone, PartialEq)]
struct Stored {
    schema: String,
    schema_type: String,
    references: Vec<serde_json::Value>,
}

#[derive(Default)]
struct Inner {
    /// Schemas by id; ids from 1.
    schemas: Mutex<Vec<Stored>>,
    /// Per subject, the ids of its versions (version n at n - 1).
    subjects: Mutex<HashMap<String, Vec<u32>>>,
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
            .route("/subjects/{subject}", post(lookup))
            .route("/subjects/{subject}/versions/{version}", get(version))
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

    /// Registers a schema with references under `subject`; its id and version.
    pub fn register_in(
        &self,
        subject: &str,
        schema: &str,
        schema_type: &str,
        references: Vec<serde_json::Value>,
    ) -> (u32, u32) {
        let stored = Stored { schema: schema.to_owned(), schema_type: schema_type.to_owned(), references };
        register_stored(&self.inner, subject, stored)
    }

    /// A registered schema's text (for Protobuf, the serialized descriptor).
    pub fn schema(&self, id: u32) -> Option<String> {
        stored(&self.inner, id).map(|s| s.schema)
    }

    /// Answer 503 to everything (`true`) or serve again.
    pub fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::SeqCst);
    }

    /// Schema reads (`GET /schemas/ids/{id}` and `GET /subjects/{s}/versions/{v}`) answered
    /// so far, failed ones included.
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
    id_of(inner, Stored { schema: schema.to_owned(), schema_type: schema_type.to_owned(), references: Vec::new() })
}

fn id_of(inner: &Inner, stored: Stored) -> u32 {
    let mut schemas = inner.schemas.lock().expect("registry lock");
    let n = match schemas.iter().position(|s| *s == stored) {
        Some(i) => i + 1,
        None => {
            schemas.push(stored);
            schemas.len()
        }
    };
    u32::try_from(n).expect("few schemas")
}

/// The id, and the schema's version in `subject` (a new one unless it is there already).
fn register_stored(inner: &Inner, subject: &str, stored: Stored) -> (u32, u32) {
    let id = id_of(inner, stored);
    let mut subjects = inner.subjects.lock().expect("registry lock");
    let versions = subjects.entry(subject.to_owned()).or_default();
    let version = match versions.iter().position(|&v| v == id) {
        Some(i) => i + 1,
        None => {
            versions.push(id);
            versions.len()
        }
    };
    (id, u32::try_from(version).expect("few versions"))
}

fn stored(inner: &Inner, id: u32) -> Option<Stored> {
    let schemas = inner.schemas.lock().expect("registry lock");
    usize::try_from(id).ok().and_then(|i| i.checked_sub(1)).and_then(|i| schemas.get(i).cloned())
}

/// A schema as the registry's answers show it, with `extra` fields.
fn answer(stored: &Stored, extra: serde_json::Value) -> Response {
    let mut answer = json!({ "schema": stored.schema });
    // Confluent leaves the type out for Avro, and the references when there are none.
    if stored.schema_type != "AVRO" {
        answer["schemaType"] = stored.schema_type.clone().into();
    }
    if !stored.references.is_empty() {
        answer["references"] = stored.references.clone().into();
    }
    if let (Some(a), Some(e)) = (answer.as_object_mut(), extra.as_object()) {
        a.extend(e.clone());
    }
    Json(answer).into_response()
}

fn not_found(code: u32, message: &str) -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error_code": code, "message": message}))).into_response()
}

/// The schema of a registration or lookup request, or the registry's refusal.
fn requested(body: &[u8]) -> Result<Stored, Box<Response>> {
    let Ok(request) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Err(Box::new((StatusCode::UNPROCESSABLE_ENTITY, "not JSON").into_response()));
    };
    let Some(schema) = request.get("schema").and_then(|s| s.as_str()) else {
        return Err(Box::new(
            (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"error_code": 42201, "message": "no schema"})))
                .into_response(),
        ));
    };
    Ok(Stored {
        schema: schema.to_owned(),
        schema_type: request.get("schemaType").and_then(|s| s.as_str()).unwrap_or("AVRO").to_owned(),
        references: request.get("references").and_then(|r| r.as_array()).cloned().unwrap_or_default(),
    })
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
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = refuse(&inner, &headers) {
        return r;
    }
    let stored = match requested(&body) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let (id, version) = register_stored(&inner, &subject, stored);
    Json(json!({ "id": id, "subject": subject, "version": version })).into_response()
}

async fn lookup(
    State(inner): State<Arc<Inner>>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = refuse(&inner, &headers) {
        return r;
    }
    let wanted = match requested(&body) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let versions = inner.subjects.lock().expect("registry lock").get(&subject).cloned();
    let Some(versions) = versions else { return not_found(40401, "Subject not found") };
    for (i, &id) in versions.iter().enumerate() {
        if stored(&inner, id).as_ref() == Some(&wanted) {
            return answer(&wanted, json!({ "subject": subject, "version": i + 1, "id": id }));
        }
    }
    not_found(40403, "Schema not found")
}

async fn version(
    State(inner): State<Arc<Inner>>,
    Path((subject, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    inner.lookups.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = refuse(&inner, &headers) {
        return r;
    }
    let versions = inner.subjects.lock().expect("registry lock").get(&subject).cloned();
    let Some(versions) = versions else { return not_found(40401, "Subject not found") };
    let index = match version.as_str() {
        "latest" | "-1" => versions.len().checked_sub(1),
        v => v.parse::<usize>().ok().and_then(|v| v.checked_sub(1)),
    };
    let Some((n, id)) = index.and_then(|i| versions.get(i).map(|&id| (i + 1, id))) else {
        return not_found(40402, "Version not found");
    };
    match stored(&inner, id) {
        Some(s) => answer(&s, json!({ "subject": subject, "version": n, "id": id })),
        None => not_found(40402, "Version not found"),
    }
}

async fn by_id(State(inner): State<Arc<Inner>>, Path(id): Path<u32>, headers: HeaderMap) -> Response {
    inner.lookups.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = refuse(&inner, &headers) {
        return r;
    }
    match stored(&inner, id) {
        Some(s) => answer(&s, json!({})),
        None => not_found(40403, "Schema not found"),
    }
}
