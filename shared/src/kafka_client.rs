//! How every client (worker consumer, outbox relay, producer, admin) connects to Kafka.
//!
//! - Brokers: `KAFKA_BROKERS`, or, given `MSK_CLUSTER_ARN`, resolved once at start-up
//!   with `aws-sdk-kafka`'s `GetBootstrapBrokers`, picking the listener that matches the
//!   configured authentication (plaintext 9092, TLS 9094, SASL/SCRAM 9096, IAM 9098).
//! - Security: `KAFKA_AUTH` = `plaintext`, `tls`, `scram` (SCRAM-SHA-512, as MSK uses)
//!   or `iam` (SASL/OAUTHBEARER with a SigV4-signed token for `kafka-cluster:Connect`).
//! - IAM tokens: librdkafka asks for a token from a synchronous callback, so tokens are
//!   made ahead of time by a background refresher into a [`TokenCache`]; the callback
//!   only reads it. A token is refreshed once 80% of its lifetime has passed (MSK tokens
//!   live 15 minutes, so about 3 minutes before expiry), and start-up waits for the first
//!   one, failing fast when credentials are missing.
//! - The token cache belongs to the process, not to the configuration: a process signs
//!   with one set of AWS credentials for one cluster, so [`prepare`] installs one cache
//!   and every client context made afterwards reads it. `KafkaConfig` stays plain data.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::client::OAuthToken;
use rdkafka::config::ClientConfig;
use rdkafka::ClientContext;

use crate::config::{KafkaAuth, KafkaConfig};
use crate::BoxError;

/// Kafka could not be prepared at start-up.
#[derive(Debug, thiserror::Error)]
pub enum KafkaClientError {
    /// The MSK API did not give the cluster's brokers.
    #[error("MSK cluster {arn}: GetBootstrapBrokers failed: {}; check MSK_CLUSTER_ARN, AWS_REGION and the kafka:GetBootstrapBrokers permission", DisplaySdkError(.source))]
    Discovery {
        /// The cluster asked about.
        arn: String,
        /// What the MSK API (or the SDK) said.
        #[source]
        source: BoxError,
    },
    /// The cluster has no listener for the configured authentication.
    #[error("MSK cluster {arn} has no {listener} listener for KAFKA_AUTH={auth}; enable it on the cluster or pick another KAFKA_AUTH")]
    NoListener {
        /// The cluster.
        arn: String,
        /// The listener `KAFKA_AUTH` needs.
        listener: &'static str,
        /// `KAFKA_AUTH`.
        auth: &'static str,
    },
    /// No IAM token could be made.
    #[error("MSK IAM authentication: cannot sign a token: {0}; check the AWS credentials (role, AWS_* variables) and AWS_REGION")]
    Token(String),
}

/// Shows an SDK error with its whole context (the SDK's own `Display` says only
/// "service error").
struct DisplaySdkError<'a>(&'a BoxError);

impl std::fmt::Display for DisplaySdkError<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

/// The process's IAM token cache, once [`prepare`] has made the first token.
static TOKENS: OnceLock<Arc<TokenCache>> = OnceLock::new();

/// The rdkafka settings for the configured brokers and security.
pub fn client_config(kafka: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers);
    match &kafka.auth {
        KafkaAuth::Plaintext => {}
        KafkaAuth::Tls => {
            c.set("security.protocol", "ssl");
        }
        KafkaAuth::Scram { username, password } => {
            c.set("security.protocol", "sasl_ssl")
                .set("sasl.mechanism", "SCRAM-SHA-512")
                .set("sasl.username", username)
                .set("sasl.password", password.expose());
        }
        KafkaAuth::Iam => {
            c.set("security.protocol", "sasl_ssl").set("sasl.mechanism", "OAUTHBEARER");
        }
    }
    c
}

/// The MSK listener that matches an authentication mode.
pub fn listener(
    out: &aws_sdk_kafka::operation::get_bootstrap_brokers::GetBootstrapBrokersOutput,
    auth: &KafkaAuth,
) -> (&'static str, Option<String>) {
    let (name, brokers) = match auth {
        KafkaAuth::Plaintext => ("plaintext", out.bootstrap_broker_string()),
        KafkaAuth::Tls => ("TLS", out.bootstrap_broker_string_tls()),
        KafkaAuth::Scram { .. } => ("SASL/SCRAM", out.bootstrap_broker_string_sasl_scram()),
        KafkaAuth::Iam => ("IAM", out.bootstrap_broker_string_sasl_iam()),
    };
    (name, brokers.filter(|b| !b.is_empty()).map(str::to_owned))
}

/// Resolves `kafka.brokers` from `kafka.cluster_arn` (when set) through the MSK API.
pub async fn resolve_brokers(kafka: &mut KafkaConfig, sdk: &aws_types::SdkConfig) -> Result<(), KafkaClientError> {
    let Some(arn) = kafka.cluster_arn.clone() else { return Ok(()) };
    let out = aws_sdk_kafka::Client::new(sdk)
        .get_bootstrap_brokers()
        .cluster_arn(&arn)
        .send()
        .await
        .map_err(|e| KafkaClientError::Discovery { arn: arn.clone(), source: e.into() })?;
    let (name, brokers) = listener(&out, &kafka.auth);
    kafka.brokers =
        brokers.ok_or(KafkaClientError::NoListener { arn: arn.clone(), listener: name, auth: kafka.auth.name() })?;
    tracing::info!(cluster = %arn, listener = name, brokers = %kafka.brokers, "resolved MSK bootstrap brokers");
    Ok(())
}

/// Prepares `kafka` for use: resolves MSK brokers and, for IAM, starts the process's
/// token refresher and waits for the first token. Call at start-up; a second call
/// keeps the refresher the first one started.
pub async fn prepare(kafka: &mut KafkaConfig) -> Result<(), KafkaClientError> {
    let needs_aws = kafka.cluster_arn.is_some() || kafka.auth == KafkaAuth::Iam;
    if !needs_aws {
        return Ok(());
    }
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    resolve_brokers(kafka, &sdk).await?;
    if kafka.auth == KafkaAuth::Iam && TOKENS.get().is_none() {
        let region =
            sdk.region().cloned().ok_or_else(|| KafkaClientError::Token("no AWS region (set AWS_REGION)".into()))?;
        let credentials =
            sdk.credentials_provider().ok_or_else(|| KafkaClientError::Token("no credentials provider".into()))?;
        let cache = Arc::new(TokenCache::new(Arc::new(IamTokenSource { region, credentials })));
        cache.refresh().await.map_err(KafkaClientError::Token)?;
        if TOKENS.set(cache.clone()).is_ok() {
            cache.spawn_refresher();
        }
    }
    Ok(())
}

/// A signed token and when it expires (ms since the Unix epoch).
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// The token itself, a bearer credential: never logged.
    pub value: String,
    /// When it expires (ms since the Unix epoch).
    pub expires_ms: i64,
    /// When it was made (ms since the Unix epoch).
    pub issued_ms: i64,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a bearer credential: never print it.
        f.debug_struct("Token").field("expires_ms", &self.expires_ms).field("issued_ms", &self.issued_ms).finish()
    }
}

impl Token {
    /// When to replace it: after 80% of its lifetime.
    pub fn refresh_at_ms(&self) -> i64 {
        self.issued_ms + (self.expires_ms - self.issued_ms) * 4 / 5
    }
}

type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<(String, i64), String>> + Send + 'a>>;

/// Makes tokens: IAM in production, a fake in tests of the refresh logic.
pub trait TokenSource: Send + Sync {
    /// A new token and its expiry (ms since the Unix epoch).
    fn generate(&self) -> TokenFuture<'_>;
}

/// SigV4-signed `kafka-cluster:Connect` tokens (aws-msk-iam-sasl-signer).
pub struct IamTokenSource {
    /// The region the cluster is in.
    pub region: aws_types::region::Region,
    /// Where the signing credentials come from.
    pub credentials: aws_types::sdk_config::SharedCredentialsProvider,
}

impl TokenSource for IamTokenSource {
    fn generate(&self) -> TokenFuture<'_> {
        Box::pin(async move {
            aws_msk_iam_sasl_signer::generate_auth_token_from_credentials_provider(
                self.region.clone(),
                self.credentials.clone(),
            )
            .await
            .map_err(|e| e.to_string())
        })
    }
}

/// Now, in ms since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The current token, refreshed ahead of expiry.
pub struct TokenCache {
    source: Arc<dyn TokenSource>,
    current: Mutex<Option<Token>>,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache").field("current", &self.current()).finish()
    }
}

impl TokenCache {
    /// An empty cache over `source`: the first [`TokenCache::refresh`] makes a token.
    pub fn new(source: Arc<dyn TokenSource>) -> Self {
        Self { source, current: Mutex::new(None) }
    }

    /// The token held now, if any (it may be past its refresh time).
    pub fn current(&self) -> Option<Token> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True when there is no token or it is past 80% of its lifetime at `now_ms`.
    pub fn needs_refresh(&self, now_ms: i64) -> bool {
        self.current().is_none_or(|t| now_ms >= t.refresh_at_ms())
    }

    /// How long to sleep before the next refresh is due, seen from `now_ms`.
    pub fn next_refresh_in(&self, now_ms: i64) -> Duration {
        match self.current() {
            None => Duration::ZERO,
            Some(t) => Duration::from_millis((t.refresh_at_ms() - now_ms).max(0) as u64),
        }
    }

    /// Makes a new token now.
    pub async fn refresh(&self) -> Result<(), String> {
        let issued_ms = now_ms();
        let (value, expires_ms) = self.source.generate().await?;
        if expires_ms <= issued_ms {
            return Err(format!("token already expired (expiry {expires_ms} ms, now {issued_ms} ms)"));
        }
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(Token { value, expires_ms, issued_ms });
        Ok(())
    }

    /// Keeps the token fresh for the life of the process; a failed refresh is logged
    /// and retried every 5 s (librdkafka keeps using the last token until it expires).
    pub fn spawn_refresher(self: Arc<Self>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(self.next_refresh_in(now_ms())).await;
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "MSK IAM token refresh failed; retrying in 5 s");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        })
    }

    /// The token in the shape librdkafka wants.
    pub fn oauth_token(&self) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        let t = self.current().ok_or("no MSK IAM token yet")?;
        Ok(OAuthToken { token: t.value, principal_name: String::new(), lifetime_ms: t.expires_ms })
    }
}

/// The rdkafka client context of producers and admin clients: serves IAM tokens.
#[derive(Clone, Default)]
pub struct KafkaContext {
    oauth: Option<Arc<TokenCache>>,
}

impl KafkaContext {
    /// The context for clients of `kafka`: with `KAFKA_AUTH=iam`, the process's token
    /// cache (none before [`prepare`], and librdkafka then reports the missing token).
    pub fn new(kafka: &KafkaConfig) -> Self {
        let oauth = if kafka.auth == KafkaAuth::Iam { TOKENS.get().cloned() } else { None };
        Self { oauth }
    }
}

impl ClientContext for KafkaContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(&self, _config: Option<&str>) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        match &self.oauth {
            Some(cache) => cache.oauth_token(),
            None => {
                Err("no MSK IAM token: KAFKA_AUTH is not iam, or the client was made before kafka_client::prepare"
                    .into())
            }
        }
    }
}

/// Implements rdkafka's `ClientContext` for a consumer context that has its own
/// rebalance handling and a `kafka: KafkaContext` field: the field serves the IAM tokens.
/// (The worker's and the local event source mapping's consumers.)
#[macro_export]
macro_rules! client_context_serving_iam_tokens {
    ($context:ty) => {
        impl ::rdkafka::ClientContext for $context {
            const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

            fn generate_oauth_token(
                &self,
                config: Option<&str>,
            ) -> Result<::rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
                ::rdkafka::ClientContext::generate_oauth_token(&self.kafka, config)
            }
        }
    };
}

/// Plain consumers (the start-up probe, tools) need no rebalance handling.
impl rdkafka::consumer::ConsumerContext for KafkaContext {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn kafka(auth: KafkaAuth) -> KafkaConfig {
        let mut k = KafkaConfig::from_env(&std::collections::HashMap::<&str, &str>::new()).unwrap();
        k.auth = auth;
        k
    }

    #[test]
    fn security_settings_follow_the_auth_mode() {
        let c = client_config(&kafka(KafkaAuth::Plaintext));
        assert_eq!(c.get("security.protocol"), None);
        let c = client_config(&kafka(KafkaAuth::Tls));
        assert_eq!(c.get("security.protocol"), Some("ssl"));
        let c = client_config(&kafka(KafkaAuth::Scram { username: "u".into(), password: Secret::new("p") }));
        assert_eq!((c.get("security.protocol"), c.get("sasl.mechanism")), (Some("sasl_ssl"), Some("SCRAM-SHA-512")));
        assert_eq!((c.get("sasl.username"), c.get("sasl.password")), (Some("u"), Some("p")));
        let c = client_config(&kafka(KafkaAuth::Iam));
        assert_eq!((c.get("security.protocol"), c.get("sasl.mechanism")), (Some("sasl_ssl"), Some("OAUTHBEARER")));
    }

    /// Tokens that live `lifetime_ms`, numbered.
    struct Counting {
        lifetime_ms: i64,
        made: std::sync::atomic::AtomicU32,
    }

    impl TokenSource for Counting {
        fn generate(&self) -> TokenFuture<'_> {
            let n = self.made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let expires = now_ms() + self.lifetime_ms;
            Box::pin(async move { Ok((format!("token-{n}"), expires)) })
        }
    }

    #[tokio::test]
    async fn a_token_is_refreshed_after_80_percent_of_its_lifetime() {
        let cache = TokenCache::new(Arc::new(Counting { lifetime_ms: 900_000, made: Default::default() }));
        assert!(cache.needs_refresh(now_ms()), "no token yet");
        assert!(cache.oauth_token().is_err());
        cache.refresh().await.unwrap();
        let t = cache.current().unwrap();
        assert_eq!(t.value, "token-0");
        assert!(!cache.needs_refresh(t.issued_ms + 700_000), "still fresh after 700 s of 900");
        assert!(cache.needs_refresh(t.issued_ms + 720_000), "due at 80%: 720 s of 900");
        let wait = cache.next_refresh_in(t.issued_ms + 600_000);
        assert_eq!(wait, Duration::from_millis(120_000));
        cache.refresh().await.unwrap();
        assert_eq!(cache.oauth_token().unwrap().token, "token-1");
        assert!(!format!("{t:?}").contains("token-0"), "Debug never shows the token");
    }

    struct Expired;
    impl TokenSource for Expired {
        fn generate(&self) -> TokenFuture<'_> {
            Box::pin(async { Ok(("stale".to_owned(), now_ms() - 1)) })
        }
    }

    #[tokio::test]
    async fn an_already_expired_token_is_refused() {
        let cache = TokenCache::new(Arc::new(Expired));
        assert!(cache.refresh().await.unwrap_err().contains("expired"));
        assert!(cache.current().is_none());
    }

    #[tokio::test]
    async fn iam_tokens_are_presigned_kafka_cluster_connect_urls() {
        use base64::Engine;
        let credentials = aws_credential_types::Credentials::new("AKIDEXAMPLE", "secret", None, None, "test");
        let source = IamTokenSource {
            region: aws_types::region::Region::new("eu-west-1"),
            credentials: aws_types::sdk_config::SharedCredentialsProvider::new(credentials),
        };
        let cache = TokenCache::new(Arc::new(source));
        cache.refresh().await.expect("signing needs no network");
        let t = cache.current().unwrap();
        let url =
            String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&t.value).unwrap()).unwrap();
        assert!(url.starts_with("https://kafka.eu-west-1.amazonaws.com/?"), "{url}");
        for part in [
            "Action=kafka-cluster%3AConnect",
            "X-Amz-Credential=AKIDEXAMPLE%2F",
            "X-Amz-Signature=",
            "X-Amz-Expires=900",
        ] {
            assert!(url.contains(part), "{part} missing in {url}");
        }
        let lifetime = t.expires_ms - t.issued_ms;
        assert!((890_000..=900_000).contains(&lifetime), "15-minute tokens: {lifetime} ms");
    }
}
