//! The schema registries values are framed for, behind one cache:
//! - Confluent's REST API (the API Redpanda, Karapace and Apicurio's compatibility layer
//!   serve too): a schema by its numeric id, `GET /schemas/ids/{id}`, with the schemas
//!   it references (Avro named types, Protobuf imports) by subject and version;
//! - the AWS Glue Schema Registry: a schema version by its UUID, `GetSchemaVersion`
//!   (aws-sdk-glue; the client is built on the first Glue lookup, from the usual AWS
//!   configuration chain).
//!
//! Each schema is fetched once per id per process and kept; each registry has its own
//! circuit breaker (`schema_registry`, `glue_schema_registry`).
//!
//! What a lookup can end in, and what the guard does with it:
//! - the schema: cached (up to `SCHEMA_REGISTRY_CACHE_MAX` schemas) and used;
//! - the registry says it has no such id (404): [`LookupError::Unknown`], the record's own
//!   fault (dead-lettered as `schema_unknown`; replay it once the schema exists);
//! - a schema we cannot use (not Avro, or not parsable): [`LookupError::Unsupported`] /
//!   [`LookupError::Invalid`], dead-lettered as `schema_unsupported` / `schema_invalid`;
//! - the registry down, slow, refusing our credentials, or its breaker open:
//!   [`LookupError::Unavailable`], retried and never dead-lettered.
//!
//! Concurrent lookups of one id share one request. Nothing secret is logged: the URL is
//! redacted and credentials go in an `Authorization` header, never in a message.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use exactly_once_core::payload::{AvroSchema, JsonSchema, PayloadError, SchemaId};
use exactly_once_core::protobuf::ProtobufSchema;
use tokio::sync::OnceCell;

use crate::breaker::CircuitBreaker;
use crate::config::{RegistryConfig, Secret};

/// A schema the registry returned, ready to decode with.
#[derive(Debug)]
pub enum RegistrySchema {
    /// An Avro schema (`schemaType` absent or `AVRO`).
    Avro(AvroSchema),
    /// A JSON Schema (`schemaType` `JSON`).
    Json(JsonSchema),
    /// A Protobuf schema (`schemaType` `PROTOBUF`), with the files it imports.
    Protobuf(ProtobufSchema),
    /// A Protobuf schema from AWS Glue (`.proto` text): its values carry Glue's message
    /// index, not Confluent's.
    GlueProtobuf(ProtobufSchema),
}

impl RegistrySchema {
    /// Decodes one datum written with this schema.
    pub fn decode(&self, schema_id: SchemaId, body: &[u8]) -> Result<serde_json::Value, PayloadError> {
        match self {
            RegistrySchema::Avro(s) => s.decode(schema_id, body),
            RegistrySchema::Json(s) => s.decode(schema_id, body),
            RegistrySchema::Protobuf(s) => s.decode(schema_id, body),
            RegistrySchema::GlueProtobuf(s) => s.decode_glue(schema_id, body),
        }
    }

    /// Decodes a datum an event source mapping passed on as `SOURCE`: without its frame.
    /// A Protobuf value may keep its message indexes or not (AWS does not say): a leading
    /// zero byte is the indexes of the file's first message (no message starts with it:
    /// field number 0 does not exist) and is skipped; a value without it is read as the
    /// file's first message. A Glue Protobuf value keeps its message index (Powertools
    /// reads it the same way) and decodes as it does framed.
    pub fn decode_source(&self, schema_id: SchemaId, body: &[u8]) -> Result<serde_json::Value, PayloadError> {
        match self {
            RegistrySchema::Protobuf(s) => match body.split_first() {
                Some((0, message)) => s.decode_message(schema_id, &[0], message),
                _ => s.decode_message(schema_id, &[0], body),
            },
            other => other.decode(schema_id, body),
        }
    }

    /// `AVRO`, `JSON` or `PROTOBUF`: the registry's `schemaType`, as event source
    /// mappings name a record's `dataFormat`.
    pub fn kind(&self) -> &'static str {
        match self {
            RegistrySchema::Avro(_) => "AVRO",
            RegistrySchema::Json(_) => "JSON",
            RegistrySchema::Protobuf(_) | RegistrySchema::GlueProtobuf(_) => "PROTOBUF",
        }
    }
}

/// Why a schema could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The registry has no schema with this id.
    #[error("schema registry has no schema with id {0}")]
    Unknown(SchemaId),
    /// The registry's schema is of a type not decoded here.
    #[error("schema {id} is {schema_type}, not decoded here (Avro, JSON Schema and Protobuf are)")]
    Unsupported {
        /// The schema's id.
        id: SchemaId,
        /// Its `schemaType`.
        schema_type: String,
    },
    /// The registry returned something that is not a usable schema.
    #[error("schema {id} from the registry is not a valid schema: {message}")]
    Invalid {
        /// The schema's id.
        id: SchemaId,
        /// What was wrong.
        message: String,
    },
    /// The registry could not answer: retry later.
    #[error("schema registry unavailable: {0}")]
    Unavailable(String),
}

impl LookupError {
    /// The dead-letter label of a failure that is the record's own; `None` for
    /// [`LookupError::Unavailable`], which is retried.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            LookupError::Unknown(_) => Some("schema_unknown"),
            LookupError::Unsupported { .. } => Some("schema_unsupported"),
            LookupError::Invalid { .. } => Some("schema_invalid"),
            LookupError::Unavailable(_) => None,
        }
    }
}

/// The registry client; one per process, shared by every function.
pub struct SchemaRegistry {
    /// The base URL without credentials; `None` when `SCHEMA_REGISTRY_URL` is unset.
    base: Option<reqwest::Url>,
    auth: Option<(String, Secret)>,
    http: reqwest::Client,
    cache: Mutex<HashMap<SchemaId, Arc<OnceCell<Arc<RegistrySchema>>>>>,
    cache_max: usize,
    breaker: CircuitBreaker,
    fetches: AtomicU64,
    glue: GlueRegistry,
}

/// The AWS Glue side: its client, built on first use, and its breaker.
struct GlueRegistry {
    sdk: Option<aws_types::SdkConfig>,
    timeout: Duration,
    client: OnceCell<aws_sdk_glue::Client>,
    breaker: CircuitBreaker,
}

impl std::fmt::Debug for SchemaRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRegistry").field("host", &self.host()).finish()
    }
}

impl SchemaRegistry {
    /// A client for `config` (no request is made until a schema is needed). Fails on a
    /// URL that does not parse, naming the variable but not its value.
    pub fn new(config: &RegistryConfig) -> Result<Self, String> {
        let (base, auth) = match config.url.as_ref().map(|u| u.expose()).filter(|u| !u.is_empty()) {
            None => (None, None),
            Some(raw) => {
                // The URL is never echoed: a password with a `/` in it (base64 API
                // secrets have them) breaks parsing, or moves the secret into the path.
                const HINT: &str = "percent-encode `/`, `@` and `:` in the user and password (%2F, %40, %3A), or use SCHEMA_REGISTRY_USERNAME and SCHEMA_REGISTRY_PASSWORD";
                let mut url =
                    reqwest::Url::parse(raw).map_err(|e| format!("SCHEMA_REGISTRY_URL is not a URL ({e}); {HINT}"))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(format!("SCHEMA_REGISTRY_URL must be http:// or https://; {HINT}"));
                }
                if url.path().contains('@') {
                    return Err(format!("SCHEMA_REGISTRY_URL has an `@` in its path; {HINT}"));
                }
                // Credentials in the URL become the Authorization header, and leave it.
                let mut auth = None;
                if !url.username().is_empty() {
                    let user = percent_decode(url.username());
                    let password = percent_decode(url.password().unwrap_or_default());
                    auth = Some((user, Secret::new(password)));
                    let _ = url.set_username("");
                    let _ = url.set_password(None);
                }
                if !url.path().ends_with('/') {
                    let path = format!("{}/", url.path());
                    url.set_path(&path);
                }
                if let Some(user) = config.username.clone().filter(|u| !u.is_empty()) {
                    let password = config.password.clone().unwrap_or_else(|| Secret::new(""));
                    auth = Some((user, password));
                }
                (Some(url), auth)
            }
        };
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| format!("schema registry client: {e}"))?;
        Ok(Self {
            base,
            auth,
            http,
            cache: Mutex::new(HashMap::new()),
            cache_max: config.cache_max,
            breaker: CircuitBreaker::new("schema_registry", config.breaker),
            fetches: AtomicU64::new(0),
            glue: GlueRegistry {
                sdk: config.glue_sdk.clone(),
                timeout: config.timeout,
                client: OnceCell::new(),
                breaker: CircuitBreaker::new("glue_schema_registry", config.breaker),
            },
        })
    }

    /// The registry's host, for logs (never the whole URL).
    fn host(&self) -> &str {
        self.base.as_ref().and_then(|u| u.host_str()).unwrap_or("-")
    }

    /// Whether `SCHEMA_REGISTRY_URL` is set.
    pub fn is_configured(&self) -> bool {
        self.base.is_some()
    }

    /// Requests sent to the registry so far (cache misses), for tests and metrics.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The breaker in front of the Confluent-compatible registry.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    /// The breaker in front of the AWS Glue Schema Registry.
    pub fn glue_breaker(&self) -> &CircuitBreaker {
        &self.glue.breaker
    }

    /// The schemas of `ids`, each looked up once (concurrently, for the ids not cached):
    /// a batch waits for one registry round trip per new id, plus those for the schemas
    /// it references.
    pub async fn schemas(
        &self,
        ids: impl IntoIterator<Item = SchemaId>,
    ) -> HashMap<SchemaId, Result<Arc<RegistrySchema>, LookupError>> {
        let mut unique: Vec<SchemaId> = ids.into_iter().collect();
        unique.sort_unstable();
        unique.dedup();
        let answers = futures::future::join_all(unique.iter().map(|&id| self.schema(id))).await;
        unique.into_iter().zip(answers).collect()
    }

    /// The schema with `id`, from the cache or its registry.
    pub async fn schema(&self, id: impl Into<SchemaId>) -> Result<Arc<RegistrySchema>, LookupError> {
        let id = id.into();
        let cell = {
            let mut cache = self.cache.lock().expect("registry cache lock");
            match cache.get(&id) {
                Some(cell) => cell.clone(),
                None if cache.len() < self.cache_max => cache.entry(id).or_default().clone(),
                // Full: fetched, not kept (a flood of forged ids cannot grow the cache).
                None => Arc::new(OnceCell::new()),
            }
        };
        let result = cell
            .get_or_try_init(|| async {
                match id {
                    SchemaId::Confluent(n) => self.fetch(n).await,
                    SchemaId::Glue(_) => self.fetch_glue(id).await,
                }
            })
            .await
            .cloned();
        if result.is_err() {
            // Only schemas are kept: an id that failed is asked again next time.
            let mut cache = self.cache.lock().expect("registry cache lock");
            if cache.get(&id).is_some_and(|c| Arc::ptr_eq(c, &cell) && !c.initialized()) {
                cache.remove(&id);
            }
        }
        result
    }

    /// Registers `schema` (Avro, as JSON text) under `subject` (`<topic>-value` in
    /// Confluent's default naming) and returns its id: the producer side, for
    /// `eo produce --avro`. Not behind the breaker: an operator's command, not the guard.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, String> {
        let base = self.base.as_ref().ok_or("SCHEMA_REGISTRY_URL is not set")?;
        let mut url = base.clone();
        url.path_segments_mut()
            .map_err(|()| "SCHEMA_REGISTRY_URL cannot be a base URL".to_owned())?
            .pop_if_empty()
            .extend(["subjects", subject, "versions"]);
        let mut request = self
            .http
            .post(url)
            .header("content-type", "application/vnd.schemaregistry.v1+json")
            .body(serde_json::json!({ "schema": schema }).to_string());
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password.expose()));
        }
        let response = request.send().await.map_err(|e| format!("schema registry: {}", e.without_url()))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| format!("schema registry: {}", e.without_url()))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(format!("schema registry refused the schema for `{subject}`: HTTP {status}: {text}"));
        }
        #[derive(serde::Deserialize)]
        struct Registered {
            id: u32,
        }
        serde_json::from_slice::<Registered>(&body)
            .map(|r| r.id)
            .map_err(|e| format!("schema registry answered without an id: {e}"))
    }

    async fn fetch(&self, id: u32) -> Result<Arc<RegistrySchema>, LookupError> {
        let base = self.base.as_ref().ok_or_else(|| {
            LookupError::Unavailable("SCHEMA_REGISTRY_URL is not set, but a function's values need a registry".into())
        })?;
        let url = base.join(&format!("schemas/ids/{id}")).map_err(|e| LookupError::Unavailable(e.to_string()))?;
        let answer = match self.get(url.clone(), id, &format!("schema {id}")).await? {
            Some(a) => a,
            None => return Err(LookupError::Unknown(id.into())),
        };
        let schema_id = SchemaId::Confluent(id);
        let schema = match answer.schema_type.as_deref().unwrap_or("AVRO") {
            // The named types of the schemas it references are in scope when it is parsed.
            "AVRO" => {
                let referenced: Vec<String> =
                    self.referenced(id, answer.references, false).await?.into_iter().map(|(_, text)| text).collect();
                RegistrySchema::Avro(
                    AvroSchema::parse_with(&answer.schema, &referenced)
                        .map_err(|message| LookupError::Invalid { id: schema_id, message })?,
                )
            }
            // Each referenced document is known under the name its `$ref` uses.
            "JSON" => {
                let referenced = self.referenced(id, answer.references, false).await?;
                RegistrySchema::Json(
                    JsonSchema::parse_with(&answer.schema, &referenced)
                        .map_err(|message| LookupError::Invalid { id: schema_id, message })?,
                )
            }
            "PROTOBUF" => RegistrySchema::Protobuf(self.protobuf(id, url).await?),
            other => return Err(LookupError::Unsupported { id: schema_id, schema_type: other.to_owned() }),
        };
        tracing::info!(registry = self.host(), schema_id = id, "schema fetched from the registry");
        Ok(Arc::new(schema))
    }

    /// A schema version from the AWS Glue Schema Registry, by its UUID
    /// (`GetSchemaVersion`). Avro and JSON Schema definitions are used as Confluent's
    /// are; a version still `PENDING` (its compatibility check running) is asked again
    /// later; one that `FAILURE`d or is being deleted cannot decode anything.
    async fn fetch_glue(&self, id: SchemaId) -> Result<Arc<RegistrySchema>, LookupError> {
        use aws_sdk_glue::types::{DataFormat, SchemaVersionStatus};
        let client = self.glue.client.get_or_init(|| self.glue_client()).await;
        let permit = self.glue.breaker.try_acquire().map_err(|e| LookupError::Unavailable(e.to_string()))?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let answer = match client.get_schema_version().schema_version_id(id.to_string()).send().await {
            Ok(answer) => {
                permit.success();
                answer
            }
            Err(e) => {
                let service = e.as_service_error();
                if service.is_some_and(|s| s.is_entity_not_found_exception()) {
                    // Glue answered: it has no such version. The record's own fault. (Any
                    // other refusal, InvalidInputException included, is not: the id we send
                    // is always a well-formed UUID.)
                    permit.success();
                    return Err(LookupError::Unknown(id));
                }
                permit.failure();
                let message = match service {
                    Some(s) => format!("AWS Glue refused GetSchemaVersion for {id}: {}", cut(&s.to_string())),
                    None => format!(
                        "AWS Glue could not be asked for {id}: {} (a timeout, no network, or no credentials)",
                        cut(&aws_sdk_glue::error::DisplayErrorContext(&e).to_string())
                    ),
                };
                tracing::warn!(schema_id = %id, error = %message, "AWS Glue schema registry lookup failed");
                return Err(LookupError::Unavailable(message));
            }
        };
        match answer.status() {
            Some(SchemaVersionStatus::Available) => {}
            Some(SchemaVersionStatus::Failure | SchemaVersionStatus::Deleting) => {
                return Err(LookupError::Invalid {
                    id,
                    message: format!(
                        "AWS Glue schema version is {}, not AVAILABLE",
                        answer.status().map_or("-", |s| s.as_str())
                    ),
                })
            }
            // PENDING (its compatibility check is running), a status Glue added after this
            // client, or none: waited for, never dead-lettered on what we do not know.
            other => {
                return Err(LookupError::Unavailable(format!(
                    "AWS Glue schema version {id} is {}, not AVAILABLE yet",
                    other.map_or("without a status", |s| s.as_str())
                )))
            }
        }
        let definition = answer
            .schema_definition()
            .ok_or_else(|| LookupError::Invalid { id, message: "AWS Glue returned no SchemaDefinition".into() })?;
        let invalid = |message: String| LookupError::Invalid { id, message };
        let schema = match answer.data_format() {
            Some(DataFormat::Avro) => RegistrySchema::Avro(AvroSchema::parse(definition).map_err(invalid)?),
            Some(DataFormat::Json) => RegistrySchema::Json(JsonSchema::parse(definition).map_err(invalid)?),
            // Glue keeps the producer's `.proto` text. Named after the version, a name no
            // import can take.
            Some(DataFormat::Protobuf) => RegistrySchema::GlueProtobuf(
                ProtobufSchema::from_proto_text(&format!("glue-schema-version-{id}.proto"), definition)
                    .map_err(invalid)?,
            ),
            other => {
                return Err(LookupError::Unsupported {
                    id,
                    schema_type: other.map_or("without a DataFormat", |f| f.as_str()).to_owned(),
                })
            }
        };
        tracing::info!(schema_id = %id, "schema version fetched from AWS Glue");
        Ok(Arc::new(schema))
    }

    /// Builds the Glue client now (loading the AWS configuration, within `wait`) and
    /// checks that it has a region: a function over Glue-framed values refuses to start
    /// without one, rather than failing every lookup.
    pub async fn glue_ready(&self, wait: Duration) -> Result<(), String> {
        let client = tokio::time::timeout(wait, self.glue.client.get_or_init(|| self.glue_client()))
            .await
            .map_err(|_| format!("loading the AWS configuration for the Glue schema registry took over {wait:?}"))?;
        if client.config().region().is_none() {
            return Err("no AWS region for the Glue schema registry: set AWS_REGION (Lambda sets it)".into());
        }
        Ok(())
    }

    /// The Glue client: the application's SDK configuration or the usual chain, every
    /// call bounded by `SCHEMA_REGISTRY_TIMEOUT_MS` and tried at most twice (the guard
    /// retries the batch, and the breaker counts the failure).
    async fn glue_client(&self) -> aws_sdk_glue::Client {
        let sdk = match &self.glue.sdk {
            Some(sdk) => sdk.clone(),
            None => aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await,
        };
        let config = aws_sdk_glue::config::Builder::from(&sdk)
            // An application's own SdkConfig may lack one; the client would panic without it.
            .behavior_version(aws_config::BehaviorVersion::latest())
            .timeout_config(
                aws_sdk_glue::config::timeout::TimeoutConfig::builder().operation_timeout(self.glue.timeout).build(),
            )
            .retry_config(aws_sdk_glue::config::retry::RetryConfig::standard().with_max_attempts(2))
            .build();
        aws_sdk_glue::Client::from_conf(config)
    }

    /// A Protobuf schema: its file descriptor and those of the files it imports, each
    /// in the registry's serialized form (base64 of a `FileDescriptorProto`), the imports
    /// through the schema's references (subject and version), transitively. Google's
    /// well-known types are built in and not fetched.
    async fn protobuf(&self, id: u32, mut url: reqwest::Url) -> Result<ProtobufSchema, LookupError> {
        let invalid = |message: String| LookupError::Invalid { id: id.into(), message };
        url.set_query(Some("format=serialized"));
        let main = self.get(url, id, &format!("schema {id}")).await?.ok_or(LookupError::Unknown(id.into()))?;
        let main_bytes = decode_base64(&main.schema).map_err(|e| invalid(format!("serialized schema: {e}")))?;
        let mut dependencies = Vec::new();
        for (name, text) in self.referenced(id, main.references, true).await? {
            let bytes = decode_base64(&text).map_err(|e| invalid(format!("reference {name}: {e}")))?;
            dependencies.push((name, bytes));
        }
        ProtobufSchema::from_descriptors(&main_bytes, &dependencies).map_err(invalid)
    }

    /// The schemas `references` name, and theirs, transitively (each subject version
    /// once, at most [`MAX_REFERENCES`]): each as its reference's name and the schema's
    /// text (with `serialized`, a Protobuf file's base64 descriptor; Google's well-known
    /// files are built in and skipped). A reference the registry does not have makes
    /// the schema unusable (`schema_invalid`); a registry that cannot answer, unavailable.
    async fn referenced(
        &self,
        id: u32,
        references: Vec<Reference>,
        serialized: bool,
    ) -> Result<Vec<(String, String)>, LookupError> {
        let invalid = |message: String| LookupError::Invalid { id: id.into(), message };
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut queue = references;
        while let Some(reference) = queue.pop() {
            if (serialized && reference.name.starts_with("google/protobuf/"))
                || !seen.insert((reference.subject.clone(), reference.version))
            {
                continue;
            }
            // Version -1 is Confluent's "latest".
            if reference.subject.is_empty() || (reference.version < 1 && reference.version != -1) {
                return Err(invalid(format!(
                    "reference {:?} names no subject and version (subject {:?}, version {})",
                    reference.name, reference.subject, reference.version
                )));
            }
            if seen.len() > MAX_REFERENCES {
                return Err(invalid(format!("more than {MAX_REFERENCES} referenced schemas")));
            }
            let base = self.base.as_ref().expect("fetch checked the base URL");
            let mut url = base.clone();
            url.path_segments_mut()
                .map_err(|()| LookupError::Unavailable("SCHEMA_REGISTRY_URL cannot be a base URL".into()))?
                .pop_if_empty()
                .extend(["subjects", &reference.subject, "versions", &reference.version.to_string()]);
            // A soft-deleted version still decodes the records written with it, as
            // Confluent's own clients read it (`deleted=true`).
            url.set_query(Some(if serialized { "format=serialized&deleted=true" } else { "deleted=true" }));
            let what =
                format!("reference {} (subject {}, version {})", reference.name, reference.subject, reference.version);
            let found = self
                .get(url, id, &what)
                .await?
                .ok_or_else(|| invalid(format!("{what}: the registry has no such subject version")))?;
            out.push((reference.name, found.schema));
            queue.extend(found.references);
        }
        Ok(out)
    }

    /// One GET through the breaker: the registry's answer, `None` for its own "not
    /// found" (error codes 40401-40403), or why the registry cannot be used now.
    async fn get(&self, url: reqwest::Url, id: u32, what: &str) -> Result<Option<Answer>, LookupError> {
        let permit = self.breaker.try_acquire().map_err(|e| LookupError::Unavailable(e.to_string()))?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let mut request =
            self.http.get(url).header("accept", "application/vnd.schemaregistry.v1+json, application/json");
        if let Some((user, password)) = &self.auth {
            request = request.basic_auth(user, Some(password.expose()));
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                permit.failure();
                return Err(LookupError::Unavailable(e.without_url().to_string()));
            }
        };
        let status = response.status();
        let body = match response.bytes().await {
            Ok(b) => b,
            Err(e) => {
                permit.failure();
                return Err(LookupError::Unavailable(format!("reading the answer for {what}: {}", e.without_url())));
            }
        };
        let text = || String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        if status == reqwest::StatusCode::NOT_FOUND {
            #[derive(serde::Deserialize)]
            struct Refusal {
                error_code: Option<i64>,
            }
            let code = serde_json::from_slice::<Refusal>(&body).ok().and_then(|r| r.error_code);
            if matches!(code, Some(40401..=40403)) {
                permit.success();
                return Ok(None);
            }
            permit.failure();
            tracing::warn!(registry = self.host(), schema_id = id, "schema registry answered 404 without a registry's error code: is SCHEMA_REGISTRY_URL the registry's base URL?");
            return Err(LookupError::Unavailable(format!(
                "HTTP 404 for {what}, not from a schema registry: {}",
                text()
            )));
        }
        if !status.is_success() {
            permit.failure();
            tracing::warn!(
                registry = self.host(),
                schema_id = id,
                status = status.as_u16(),
                "schema registry refused a lookup"
            );
            return Err(LookupError::Unavailable(format!("HTTP {status} for {what}: {}", text())));
        }
        match serde_json::from_slice::<Answer>(&body) {
            Ok(a) => {
                permit.success();
                Ok(Some(a))
            }
            Err(e) => {
                permit.failure();
                Err(LookupError::Unavailable(format!("answer for {what} is not a registry's ({e}): {}", text())))
            }
        }
    }
}

/// Most schemas one schema may reference (Avro named types, JSON documents, Protobuf
/// imports), transitively.
const MAX_REFERENCES: usize = 64;

/// A registry's answer for a schema: `GET /schemas/ids/{id}` or a subject's version.
#[derive(serde::Deserialize)]
struct Answer {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<Reference>,
}

/// A schema's reference to another: the import's name, where it is registered.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Reference {
    name: String,
    subject: String,
    version: i64,
}

/// An error's text, cut short for a log line or an outcome.
fn cut(message: &str) -> String {
    exactly_once_core::msk::cut(message, 300)
}

fn decode_base64(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(text.trim()).map_err(|e| format!("not base64: {e}"))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap as Map;

    fn config(pairs: &[(&'static str, &'static str)]) -> RegistryConfig {
        RegistryConfig::from_env(&pairs.iter().copied().collect::<Map<_, _>>()).unwrap()
    }

    #[test]
    fn credentials_leave_the_url() {
        let r = SchemaRegistry::new(&config(&[("SCHEMA_REGISTRY_URL", "https://key:s%40cret@reg.example:8081/api")]))
            .unwrap();
        assert_eq!(r.base.as_ref().unwrap().as_str(), "https://reg.example:8081/api/");
        let (user, password) = r.auth.as_ref().unwrap();
        assert_eq!((user.as_str(), password.expose()), ("key", "s@cret"));
        assert!(!format!("{r:?}").contains("cret"));
        let err = SchemaRegistry::new(&config(&[("SCHEMA_REGISTRY_URL", "ftp://u:hunter2@h")])).unwrap_err();
        assert!(!err.contains("hunter2"), "{err}");
        // A secret with a `/` in it, unencoded: never echoed, whichever way it breaks.
        for url in ["https://KEY:ab/cdsecret@reg.example", "https://KEY:123/cdsecret@reg.example"] {
            let err = SchemaRegistry::new(&config(&[("SCHEMA_REGISTRY_URL", url)])).unwrap_err();
            assert!(!err.contains("cdsecret") && err.contains("percent-encode"), "{err}");
        }
        assert!(!SchemaRegistry::new(&config(&[])).unwrap().is_configured());
    }

    #[tokio::test]
    async fn unset_registry_is_unavailable_not_the_records_fault() {
        let r = SchemaRegistry::new(&config(&[])).unwrap();
        let err = r.schema(1).await.unwrap_err();
        assert_eq!(err.reason(), None, "{err}");
        assert!(r.cache.lock().unwrap().is_empty());
    }
}
