//! The function process and the Lambda Runtime API it talks to, as Lambda runs them:
//! the binary starts with `AWS_LAMBDA_RUNTIME_API` pointing at a server of ours, asks
//! for the next invocation, and answers it (`/response` or `/error`).
//!
//! Invariants:
//! - one invocation at a time (concurrency one, like one Lambda execution environment);
//! - each process gets its own server: when a process dies or is killed, its server and
//!   every request it left open go with it, so a dead process can never take the next
//!   invocation;
//! - an invocation ends in exactly one [`Answer`]: the function's response or error, or
//!   our verdict (timeout, crash, failed init). A timeout or a crash kills the process;
//!   the next invocation starts a fresh one (a cold start), as Lambda does.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How to start the function.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    /// The function's binary, run in Lambda mode.
    pub binary: PathBuf,
    /// `AWS_LAMBDA_FUNCTION_NAME`.
    pub name: String,
    /// Extra environment of the process (on top of the mapping's own).
    pub env: Vec<(String, String)>,
    /// The function's `Timeout`.
    pub timeout: Duration,
    /// How long start-up may take before the first request for work (Lambda: 10 s).
    pub init_timeout: Duration,
    /// `AWS_LAMBDA_FUNCTION_MEMORY_SIZE` (not enforced).
    pub memory_size: u32,
    /// Where the function's output goes: a file (appended), or our stderr when `None`.
    pub log: Option<PathBuf>,
}

/// How an invocation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `/response`: the body the function returned.
    Response(Bytes),
    /// `/error`: the function reported an error.
    Error {
        /// `errorType` (`Unhandled` when the function gave none).
        error_type: String,
        /// `errorMessage`, or the whole body when it has none.
        message: String,
    },
    /// No answer within the timeout; the process was killed.
    Timeout,
    /// The process exited during the invocation.
    Crashed {
        /// How it exited (its exit status), or what ended the invocation otherwise.
        status: String,
        /// The process's last lines of output, joined with ` | `.
        output: String,
    },
    /// The process exited, reported an init error or took too long before asking for
    /// work.
    InitFailed {
        /// What went wrong.
        message: String,
        /// The process's last lines of output, joined with ` | ` (empty if it never ran).
        output: String,
    },
}

impl Answer {
    /// A one-line description for logs and failure records.
    pub fn describe(&self) -> String {
        match self {
            Self::Response(_) => "response".into(),
            Self::Error { error_type, message } => format!("function error {error_type}: {message}"),
            Self::Timeout => "timed out".into(),
            Self::Crashed { status, output } => {
                format!("the function process exited ({status}); last output: {output}")
            }
            Self::InitFailed { message, output } => format!("init failed: {message}; last output: {output}"),
        }
    }
}

struct Invocation {
    id: String,
    body: Bytes,
    timeout: Duration,
    /// Told when the function takes the invocation, with its deadline.
    taken: oneshot::Sender<Instant>,
    answer: oneshot::Sender<Answer>,
}

#[derive(Clone)]
struct ApiState {
    queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Invocation>>>,
    open: Arc<Mutex<HashMap<String, oneshot::Sender<Answer>>>>,
    init_error: Arc<Mutex<Option<oneshot::Sender<String>>>>,
    arn: String,
}

/// One running process with its own Runtime API server.
struct Instance {
    child: Child,
    server: JoinHandle<()>,
    submit: mpsc::UnboundedSender<Invocation>,
    init_error: oneshot::Receiver<String>,
    /// Whether the process has taken an invocation (its init is over).
    warm: bool,
    started: Instant,
    output: Arc<Mutex<VecDeque<String>>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.server.abort();
        let _ = self.child.start_kill();
    }
}

/// Counters of what happened to the function.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct FunctionStats {
    /// Processes started.
    pub cold_starts: u64,
    /// Processes that failed their init (exited, reported an init error, or were too slow
    /// to ask for work).
    pub init_failures: u64,
    /// Invocations that timed out (the process was killed).
    pub timeouts: u64,
    /// Processes that exited during an invocation.
    pub crashes: u64,
}

/// The function, started on demand and restarted after a timeout or a crash.
pub struct Function {
    spec: FunctionSpec,
    instance: Option<Instance>,
    pid: Arc<Mutex<Option<u32>>>,
    /// What has happened to the function so far.
    pub stats: FunctionStats,
    /// The last cold start's init: from spawning the process to its first request for
    /// work (what Lambda reports as Init Duration).
    pub last_init: Option<Duration>,
}

const OUTPUT_LINES_KEPT: usize = 20;

/// How a warm process that was already gone before taking the invocation is reported.
const IDLE_EXIT: &str = "exited while idle";

/// Lambda's limit on a function's answer (synchronous invocation): 6 MB.
const MAX_ANSWER_BYTES: usize = 6 * 1024 * 1024;

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

impl Function {
    /// The function, not started yet: its first invocation starts it (a cold start).
    pub fn new(spec: FunctionSpec) -> Self {
        Self { spec, instance: None, pid: Arc::default(), stats: FunctionStats::default(), last_init: None }
    }

    /// How the function is started.
    pub fn spec(&self) -> &FunctionSpec {
        &self.spec
    }

    /// The running process's id (None between processes), kept current.
    pub fn pid_handle(&self) -> Arc<Mutex<Option<u32>>> {
        self.pid.clone()
    }

    /// The running process's peak resident memory (VmHWM) in KiB, where /proc tells.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let pid = self.instance.as_ref()?.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// Stops the process (if any).
    pub async fn stop(&mut self) {
        *self.pid.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(mut i) = self.instance.take() {
            let _ = i.child.start_kill();
            let _ = i.child.wait().await;
        }
    }

    async fn start(&mut self) -> Result<(), Answer> {
        let (submit, rx) = mpsc::unbounded_channel();
        let (init_tx, init_error) = oneshot::channel();
        let state = ApiState {
            queue: Arc::new(tokio::sync::Mutex::new(rx)),
            open: Arc::default(),
            init_error: Arc::new(Mutex::new(Some(init_tx))),
            arn: format!("arn:aws:lambda:us-east-1:000000000000:function:{}", self.spec.name),
        };
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route("/2018-06-01/runtime/invocation/{id}/response", post(response))
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error_route))
            // Lambda's own limit is 6 MB; a bigger answer is an error of the invocation
            // (below), not a 413 the runtime would log and forget.
            .layer(DefaultBodyLimit::max(MAX_ANSWER_BYTES * 2))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| Answer::InitFailed {
            message: format!("cannot open the Runtime API on loopback: {e}"),
            output: String::new(),
        })?;
        let addr =
            listener.local_addr().map_err(|e| Answer::InitFailed { message: e.to_string(), output: String::new() })?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });

        let mut cmd = Command::new(&self.spec.binary);
        cmd.envs(self.spec.env.iter().cloned())
            .env("AWS_LAMBDA_RUNTIME_API", format!("http://{addr}"))
            .env("AWS_LAMBDA_FUNCTION_NAME", &self.spec.name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", self.spec.memory_size.to_string())
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{}", self.spec.name))
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "local")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            server.abort();
            Answer::InitFailed {
                message: format!("cannot start {}: {e}", self.spec.binary.display()),
                output: String::new(),
            }
        })?;
        let output: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let log = match &self.spec.log {
            Some(path) => tokio::fs::OpenOptions::new().create(true).append(true).open(path).await.ok(),
            None => None,
        };
        let log = Arc::new(tokio::sync::Mutex::new(log));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward(BufReader::new(out), output.clone(), log.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward(BufReader::new(err), output.clone(), log));
        }
        self.stats.cold_starts += 1;
        *self.pid.lock().unwrap_or_else(|p| p.into_inner()) = child.id();
        tracing::info!(binary = %self.spec.binary.display(), pid = child.id(), runtime_api = %addr, "function process started");
        self.instance =
            Some(Instance { child, server, submit, init_error, warm: false, started: Instant::now(), output });
        Ok(())
    }

    /// Runs one invocation to its end.
    pub async fn invoke(&mut self, body: Bytes) -> Answer {
        if self.instance.is_none() {
            if let Err(answer) = self.start().await {
                self.stats.init_failures += 1;
                return answer;
            }
        }
        let mut answer = self.run(body.clone()).await;
        if let Answer::Crashed { status, .. } = &answer {
            if status.starts_with(IDLE_EXIT) {
                // It died between invocations: this batch never reached it. Start a new
                // process and deliver it, without counting a failed invocation.
                tracing::warn!(%status, "the function process had exited while idle; starting a new one");
                self.stop().await;
                if let Err(a) = self.start().await {
                    self.stats.init_failures += 1;
                    return a;
                }
                answer = self.run(body).await;
            }
        }
        match &answer {
            Answer::Timeout => self.stats.timeouts += 1,
            Answer::Crashed { .. } => self.stats.crashes += 1,
            Answer::InitFailed { .. } => self.stats.init_failures += 1,
            _ => {}
        }
        if matches!(answer, Answer::Timeout | Answer::Crashed { .. } | Answer::InitFailed { .. }) {
            self.stop().await;
        }
        answer
    }

    async fn run(&mut self, body: Bytes) -> Answer {
        let (init_timeout, timeout) = (self.spec.init_timeout, self.spec.timeout);
        let Some(instance) = self.instance.as_mut() else {
            return Answer::InitFailed { message: "no process".into(), output: String::new() };
        };
        let (taken_tx, taken) = oneshot::channel();
        let (answer_tx, answer) = oneshot::channel();
        let id = uuid::Uuid::new_v4().to_string();
        if instance.submit.send(Invocation { id, body, timeout, taken: taken_tx, answer: answer_tx }).is_err() {
            return Answer::Crashed { status: "its Runtime API server stopped".into(), output: tail(&instance.output) };
        }

        // Phase 1: until the process takes the invocation (bounded by the init timeout
        // for a cold process; a warm one asks for work right after its last answer).
        let deadline = tokio::select! {
            taken = taken => match taken {
                Ok(deadline) => deadline,
                Err(_) => return Answer::Crashed { status: "invocation dropped".into(), output: tail(&instance.output) },
            },
            status = instance.child.wait() => {
                let output = tail(&instance.output);
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                return if instance.warm {
                    Answer::Crashed { status: format!("{IDLE_EXIT} ({status})"), output }
                } else {
                    Answer::InitFailed { message: format!("the process exited before asking for work ({status})"), output }
                };
            }
            message = &mut instance.init_error => {
                let message = message.unwrap_or_else(|_| "init error".into());
                return Answer::InitFailed { message, output: tail(&instance.output) };
            }
            // A cold process has its init timeout; a warm one that does not take the
            // invocation (stopped, stuck) runs into the function's timeout.
            _ = tokio::time::sleep(if instance.warm { timeout } else { init_timeout }) => {
                return if instance.warm {
                    Answer::Timeout
                } else {
                    Answer::InitFailed {
                        message: format!("no request for work within {} s of start", init_timeout.as_secs_f64()),
                        output: tail(&instance.output),
                    }
                };
            }
        };
        if !instance.warm {
            self.last_init = Some(instance.started.elapsed());
        }
        instance.warm = true;

        // Phase 2: the answer, until the deadline (an answer that came in wins).
        tokio::select! {
            biased;
            answer = answer => answer.unwrap_or_else(|_| Answer::Crashed {
                status: "the invocation was dropped by the Runtime API".into(),
                output: tail(&instance.output),
            }),
            status = instance.child.wait() => Answer::Crashed {
                status: status.map_or_else(|e| e.to_string(), |s| s.to_string()),
                output: tail(&instance.output),
            },
            _ = tokio::time::sleep_until(deadline) => Answer::Timeout,
        }
    }
}

fn tail(output: &Mutex<VecDeque<String>>) -> String {
    let lines = output.lock().unwrap_or_else(|p| p.into_inner());
    lines.iter().cloned().collect::<Vec<_>>().join(" | ")
}

async fn forward<R: tokio::io::AsyncRead + Unpin>(
    reader: BufReader<R>,
    kept: Arc<Mutex<VecDeque<String>>>,
    log: Arc<tokio::sync::Mutex<Option<tokio::fs::File>>>,
) {
    let mut lines = reader.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        {
            let mut log = log.lock().await;
            match log.as_mut() {
                Some(f) => {
                    let _ = f.write_all(format!("{line}\n").as_bytes()).await;
                }
                None => eprintln!("[function] {line}"),
            }
        }
        let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == OUTPUT_LINES_KEPT {
            kept.pop_front();
        }
        let mut short = line;
        if short.len() > 500 {
            let mut end = 500;
            while !short.is_char_boundary(end) {
                end -= 1;
            }
            short.truncate(end);
        }
        kept.push_back(short);
    }
}

async fn next(State(s): State<ApiState>) -> Result<(HeaderMap, Bytes), StatusCode> {
    let invocation = {
        let mut queue = s.queue.lock().await;
        queue.recv().await.ok_or(StatusCode::GONE)?
    };
    let Invocation { id, body, timeout, taken, answer } = invocation;
    let deadline = Instant::now() + timeout;
    let deadline_ms = now_ms() + timeout.as_millis();
    s.open.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), answer);
    let _ = taken.send(deadline);
    let mut headers = HeaderMap::new();
    let value = |v: &str| HeaderValue::from_str(v).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR);
    headers.insert("lambda-runtime-aws-request-id", value(&id)?);
    headers.insert("lambda-runtime-deadline-ms", value(&deadline_ms.to_string())?);
    headers.insert("lambda-runtime-invoked-function-arn", value(&s.arn)?);
    headers.insert("lambda-runtime-trace-id", value(&format!("Root=1-{:08x}-{}", now_ms() / 1000, &id[..8]))?);
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    Ok((headers, body))
}

fn finish(s: &ApiState, id: &str, answer: Answer) -> StatusCode {
    match s.open.lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
        Some(tx) => {
            let _ = tx.send(answer);
            StatusCode::ACCEPTED
        }
        // Unknown or already answered (Lambda answers 400 for an invalid request id).
        None => StatusCode::BAD_REQUEST,
    }
}

async fn response(State(s): State<ApiState>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    if body.len() > MAX_ANSWER_BYTES {
        let message = format!("the answer is {} bytes, over Lambda's 6 MB limit", body.len());
        finish(&s, &id, Answer::Error { error_type: "Function.ResponseSizeTooLarge".into(), message });
        return StatusCode::PAYLOAD_TOO_LARGE;
    }
    finish(&s, &id, Answer::Response(body))
}

async fn error(State(s): State<ApiState>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let error_type = v["errorType"].as_str().unwrap_or("Unhandled").to_owned();
    let message = v["errorMessage"].as_str().map_or_else(|| String::from_utf8_lossy(&body).into_owned(), str::to_owned);
    finish(&s, &id, Answer::Error { error_type, message })
}

async fn init_error_route(State(s): State<ApiState>, body: Bytes) -> StatusCode {
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let message = v["errorMessage"].as_str().map_or_else(|| String::from_utf8_lossy(&body).into_owned(), str::to_owned);
    if let Some(tx) = s.init_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = tx.send(message);
    }
    StatusCode::ACCEPTED
}
