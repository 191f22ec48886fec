//! An AWS Glue Schema Registry for the tests: the part of Glue's JSON API (the
//! `awsJson1_1` protocol: `POST /` with `X-Amz-Target: AWSGlue.<Operation>`) that Glue's
//! serializers and our client call, served on a free local port. No Glue runs here, so
//! this stands in for it (as the MSK API stub does for MSK); what is tested against it is
//! our client (aws-sdk-glue) and the bytes a third-party Glue serializer writes
//! (`aws-glue-schema-registry` on PyPI, through boto3).
//!
//! - `CreateSchema`, `RegisterSchemaVersion` and `GetSchemaByDefinition`, what a
//!   serializer calls to find or register its schema: the same definition in the same
//!   schema gets the same version id; a missing schema or version is
//!   `EntityNotFoundException` with Glue's messages ("Schema is not found.", "Schema
//!   version is not found."), which the serializer branches on;
//! - `GetSchemaVersion` by `SchemaVersionId`: the definition, data format, status and
//!   version number, or `EntityNotFoundException`;
//! - a request without a SigV4 `Authorization` header is refused
//!   (`MissingAuthenticationTokenException`), so an unsigned client fails here as on AWS;
//! - `set_failing(true)` answers HTTP 500 `InternalServiceException` to everything.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

/// A schema version.
#[derive(Clone)]
struct Version {
    id: String,
    registry: String,
    schema: String,
    number: i64,
    definition: String,
    status: String,
}

#[derive(Default)]
struct Inner {
    versions: Mutex<Vec<Version>>,
    /// Data format per (registry, schema name).
    schemas: Mutex<HashMap<(String, String), String>>,
    failing: AtomicBool,
    lookups: AtomicU64,
}

/// A running stand-in Glue registry; stops when dropped with the test's runtime.
pub struct GlueRegistry {
    url: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl GlueRegistry {
    /// Starts one on a free port.
    pub async fn start() -> Self {
        let inner = Arc::new(Inner::default());
        let app = Router::new().route("/", post(handle)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the Glue stand-in");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, inner, task }
    }

    /// Its endpoint URL, for `endpoint_url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Answers 500 to every request while `failing` (Glue down).
    pub fn set_failing(&self, failing: bool) {
        self.inner.failing.store(failing, Ordering::SeqCst);
    }

    /// `GetSchemaVersion` calls answered so far (not counting refusals while failing).
    pub fn lookups(&self) -> u64 {
        self.inner.lookups.load(Ordering::SeqCst)
    }

    /// Registers `definition` as a new version of `schema` in `registry` directly, in
    /// `data_format` (`AVRO`, `JSON` or `PROTOBUF`), with `status`; its version id.
    pub fn register(&self, registry: &str, schema: &str, data_format: &str, definition: &str, status: &str) -> String {
        self.inner.schemas.lock().unwrap().insert((registry.to_owned(), schema.to_owned()), data_format.to_owned());
        add_version(&self.inner, registry, schema, definition, status).id
    }
}

impl Drop for GlueRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn add_version(inner: &Inner, registry: &str, schema: &str, definition: &str, status: &str) -> Version {
    let mut versions = inner.versions.lock().unwrap();
    let number = versions.iter().filter(|v| v.registry == registry && v.schema == schema).count() as i64 + 1;
    let version = Version {
        id: uuid::Uuid::new_v4().to_string(),
        registry: registry.to_owned(),
        schema: schema.to_owned(),
        number,
        definition: definition.to_owned(),
        status: status.to_owned(),
    };
    versions.push(version.clone());
    version
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/x-amz-json-1.1"), ("x-amzn-errortype", kind)],
        json!({"__type": kind, "Message": message}).to_string(),
    )
        .into_response()
}

fn ok(body: Value) -> Response {
    (StatusCode::OK, [("content-type", "application/x-amz-json-1.1")], body.to_string()).into_response()
}

fn arn(registry: &str, schema: &str) -> String {
    format!("arn:aws:glue:us-east-1:123456789012:schema/{registry}/{schema}")
}

fn text<'a>(body: &'a Value, pointer: &str) -> &'a str {
    body.pointer(pointer).and_then(Value::as_str).unwrap_or_default()
}

async fn handle(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: String) -> Response {
    if inner.failing.load(Ordering::SeqCst) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServiceException", "stand-in is failing");
    }
    let signed =
        headers.get("authorization").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256 "));
    if !signed {
        return error(StatusCode::FORBIDDEN, "MissingAuthenticationTokenException", "Missing Authentication Token");
    }
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let Ok(body) = serde_json::from_str::<Value>(if body.is_empty() { "{}" } else { &body }) else {
        return error(StatusCode::BAD_REQUEST, "SerializationException", "body is not JSON");
    };
    let not_found = |m: &str| error(StatusCode::BAD_REQUEST, "EntityNotFoundException", m);
    match target {
        "AWSGlue.CreateSchema" => {
            let registry = text(&body, "/RegistryId/RegistryName").to_owned();
            let schema = text(&body, "/SchemaName").to_owned();
            let format = text(&body, "/DataFormat").to_owned();
            {
                let mut schemas = inner.schemas.lock().unwrap();
                if schemas.contains_key(&(registry.clone(), schema.clone())) {
                    return error(StatusCode::BAD_REQUEST, "AlreadyExistsException", "Schema already exists.");
                }
                schemas.insert((registry.clone(), schema.clone()), format.clone());
            }
            let v = add_version(&inner, &registry, &schema, text(&body, "/SchemaDefinition"), "AVAILABLE");
            ok(json!({
                "RegistryName": registry, "SchemaName": schema, "SchemaArn": arn(&v.registry, &v.schema),
                "DataFormat": format, "Compatibility": text(&body, "/Compatibility"), "SchemaCheckpoint": 1,
                "LatestSchemaVersion": 1, "NextSchemaVersion": 2, "SchemaStatus": "AVAILABLE",
                "SchemaVersionId": v.id, "SchemaVersionStatus": v.status,
            }))
        }
        "AWSGlue.RegisterSchemaVersion" | "AWSGlue.GetSchemaByDefinition" => {
            let registry = text(&body, "/SchemaId/RegistryName").to_owned();
            let schema = text(&body, "/SchemaId/SchemaName").to_owned();
            let definition = text(&body, "/SchemaDefinition");
            let Some(format) = inner.schemas.lock().unwrap().get(&(registry.clone(), schema.clone())).cloned() else {
                return not_found("Schema is not found.");
            };
            let existing = inner
                .versions
                .lock()
                .unwrap()
                .iter()
                .find(|v| v.registry == registry && v.schema == schema && v.definition == definition)
                .cloned();
            let v = match (existing, target) {
                (Some(v), _) => v,
                (None, "AWSGlue.GetSchemaByDefinition") => return not_found("Schema version is not found."),
                (None, _) => add_version(&inner, &registry, &schema, definition, "AVAILABLE"),
            };
            ok(json!({
                "SchemaVersionId": v.id, "VersionNumber": v.number, "Status": v.status,
                "SchemaArn": arn(&v.registry, &v.schema), "DataFormat": format,
                "CreatedTime": "2026-12-07T00:00:00.000Z",
            }))
        }
        "AWSGlue.GetSchemaVersion" => {
            inner.lookups.fetch_add(1, Ordering::SeqCst);
            let id = text(&body, "/SchemaVersionId");
            let found = inner.versions.lock().unwrap().iter().find(|v| v.id == id).cloned();
            let Some(v) = found else {
                return not_found(&format!("Schema version is not found. SchemaVersionId: {id}"));
            };
            let format = inner.schemas.lock().unwrap().get(&(v.registry.clone(), v.schema.clone())).cloned();
            ok(json!({
                "SchemaVersionId": v.id, "SchemaDefinition": v.definition, "DataFormat": format,
                "SchemaArn": arn(&v.registry, &v.schema), "VersionNumber": v.number, "Status": v.status,
                "CreatedTime": "2026-12-07T00:00:00.000Z",
            }))
        }
        other => error(StatusCode::BAD_REQUEST, "UnknownOperationException", &format!("not served here: {other}")),
    }
}
