//! Typed configuration: a TOML file plus `TOKENGATE_<SECTION>__<KEY>` overrides, loaded and
//! validated once at start. Unknown keys are errors; secrets are read here and stay wrapped.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize, Serializer};

use crate::assertion::{KeyFileError, SigningAlg, load_private_key};
use crate::grant::GrantKind;

/// Prefix of the environment variables that override config keys.
pub const ENV_PREFIX: &str = "TOKENGATE_";

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub clients: ClientsConfig,
    /// The token broker (contract §8): cache, coalescing, replay, fleet-wide state.
    pub cache: CacheConfig,
    /// Who may call; empty lets every caller that reaches the port use every client.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub callers: Vec<CallerConfig>,
    /// Trace export (contract §9).
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]`: OTLP trace export. A key left out falls back to the standard variables, as
/// every OpenTelemetry SDK does: the traces one (`OTEL_EXPORTER_OTLP_TRACES_*`) first, then the
/// generic one (`OTEL_EXPORTER_OTLP_*`), and `OTEL_SERVICE_NAME`. The collector's extra trust
/// roots come from those variables alone (`OTEL_EXPORTER_OTLP_(TRACES_)CERTIFICATE`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector's http(s) base URL (`/v1/traces` is added for http/protobuf); absent:
    /// no export (logs still carry trace ids).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Not a key: set only from `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` when `otlp_endpoint` is
    /// absent, and then the full URL spans go to, used as is. check-config prints it under
    /// its own name, since as `otlp_endpoint` it would mean another URL for http/protobuf.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub otlp_traces_endpoint: Option<String>,
    /// Not a key: set only from `OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`, else
    /// `OTEL_EXPORTER_OTLP_CERTIFICATE`: a PEM bundle trusted for an https collector beside
    /// webpki's roots (a private CA). Checked at load; check-config prints the path.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub otlp_certificate: Option<PathBuf>,
    /// Absent until loaded: then the key, `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`,
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` or gRPC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_protocol: Option<OtlpProtocol>,
    /// Absent until loaded: then the key, `OTEL_SERVICE_NAME` or `tokengate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Share of root traces kept; a caller's sampled or unsampled traceparent decides alone.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_traces_endpoint: None,
            otlp_certificate: None,
            otlp_protocol: None,
            service_name: None,
            sample_ratio: 1.0,
        }
    }
}

/// How spans travel to the collector (`OTEL_EXPORTER_OTLP_PROTOCOL` names them alike).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The name `OTEL_EXPORTER_OTLP_PROTOCOL` and the config use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Grpc, Self::HttpProtobuf]
            .into_iter()
            .find(|protocol| protocol.as_str() == text)
    }
}

impl TelemetryConfig {
    /// Fills the keys left out from the standard variables (`env` looks one up), the traces
    /// variable before the generic one, then the defaults. Errors name the variable a bad
    /// value came from.
    fn resolve(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let set = |name: &'static str| {
            env(name)
                .filter(|v| !v.trim().is_empty())
                .map(|value| (name, value))
        };
        let invalid =
            |name: &str, e: &dyn std::fmt::Display| ConfigError::Invalid(format!("{name} {e}"));
        if self.otlp_endpoint.is_none() {
            // The traces variable is the full URL, the generic one a base URL.
            if let Some((name, url)) = set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
                check_endpoint(&url).map_err(|e| invalid(name, &e))?;
                self.otlp_traces_endpoint = Some(url);
            } else if let Some((name, base)) = set("OTEL_EXPORTER_OTLP_ENDPOINT") {
                check_endpoint(&base).map_err(|e| invalid(name, &e))?;
                self.otlp_endpoint = Some(base);
            }
        }
        // No key to win over: the variables alone say it, the traces one first.
        if let Some((name, path)) = set("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
            .or_else(|| set("OTEL_EXPORTER_OTLP_CERTIFICATE"))
        {
            let path = PathBuf::from(path);
            load_ca_file(&path).map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
            self.otlp_certificate = Some(path);
        }
        if self.otlp_protocol.is_none() {
            let chosen = set("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or_else(|| set("OTEL_EXPORTER_OTLP_PROTOCOL"));
            self.otlp_protocol = Some(match chosen {
                Some((name, text)) => OtlpProtocol::parse(text.trim()).ok_or_else(|| {
                    invalid(
                        name,
                        &format!("{text:?} is not supported: use grpc or http/protobuf"),
                    )
                })?,
                None => OtlpProtocol::Grpc,
            });
        }
        if self.service_name.is_none() {
            self.service_name = Some(
                set("OTEL_SERVICE_NAME").map_or_else(|| "tokengate".to_owned(), |(_, name)| name),
            );
        }
        Ok(())
    }

    /// The protocol in force (gRPC before [`Config::load`] resolved it).
    pub fn protocol(&self) -> OtlpProtocol {
        self.otlp_protocol.unwrap_or_default()
    }

    /// The `service.name` in force.
    pub fn service_name(&self) -> &str {
        self.service_name.as_deref().unwrap_or("tokengate")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if let Some(endpoint) = &self.otlp_endpoint
            && let Err(e) = check_endpoint(endpoint)
        {
            return invalid(format!("telemetry.otlp_endpoint {e}"));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return invalid(format!(
                "telemetry.sample_ratio must be between 0.0 and 1.0 (got {})",
                self.sample_ratio
            ));
        }
        if self
            .service_name
            .as_ref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return invalid("telemetry.service_name must not be empty".into());
        }
        Ok(())
    }
}

/// An OTLP endpoint is an http(s) URL with a host and no credentials (those belong in
/// `OTEL_EXPORTER_OTLP_HEADERS`, which check-config never prints).
fn check_endpoint(endpoint: &str) -> Result<(), EndpointError> {
    let url = reqwest::Url::parse(endpoint).map_err(EndpointError::NotAUrl)?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(EndpointError::NotHttp);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(EndpointError::Credentials);
    }
    Ok(())
}

/// `url`'s parse error, named through reqwest so that `url` need not be a dependency.
pub type UrlError = <reqwest::Url as std::str::FromStr>::Err;

/// Why an OTLP endpoint is refused; the message follows the key or variable that named it.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("is not a URL: {0}")]
    NotAUrl(UrlError),
    #[error("must be an http:// or https:// URL with a host")]
    NotHttp,
    #[error("must not hold credentials; pass them in OTEL_EXPORTER_OTLP_HEADERS")]
    Credentials,
}

/// One `[[callers]]` entry: a caller known by its mTLS identity or by an API key.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CallerConfig {
    pub name: String,
    /// A SAN URI or DNS name of the caller's client certificate (needs mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls_san: Option<String>,
    /// Hex SHA-256 of the key the caller sends as `authorization: Bearer <key>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_sha256: Option<String>,
}

/// `[server.tls]`: TLS on the gRPC listener, and mTLS when `client_ca_file` is set.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    pub fn files(&self) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            client_ca_file: self.client_ca_file.clone(),
        }
    }
}

/// Upper bounds (see `Config::check_upper_bounds`), far above any real deployment and far
/// below what would overflow. The chart's values schema carries the same ones.
pub const MAX_CALLS: usize = 1_000_000;
pub const MAX_CONNECTIONS: usize = 100_000;
pub const MAX_ENTRIES: usize = 100_000_000;
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10 * 60);
pub const MAX_GRACE: Duration = Duration::from_secs(60 * 60);
/// A cached token lives at most a day (the broker's own cap), so no cache duration is longer.
pub const MAX_CACHE_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// `[server]`: the gRPC listener and its shutdown.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address for TokenService, health and reflection.
    pub listen: SocketAddr,
    /// How long in-flight calls may run after SIGTERM/SIGINT before the process exits.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace_period: Duration,
    /// Calls that may work at once; more wait in the queue.
    pub max_concurrent_calls: usize,
    /// Calls that may wait for a turn; more are refused at once (RESOURCE_EXHAUSTED).
    pub max_queued_calls: usize,
    /// Plaintext `grpc.health.v1` only, served whenever TLS is on: Kubernetes' gRPC probes
    /// speak neither TLS nor mTLS.
    pub health_listen: SocketAddr,
    /// Plain-HTTP `GET /metrics` (Prometheus text, or OpenMetrics when asked) on its own
    /// listener, so a NetworkPolicy can open it to the monitoring namespace alone.
    /// Absent: no metrics listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// Absent: plaintext gRPC (e.g. behind a mesh that terminates TLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

impl ServerConfig {
    /// Whether callers must present a client certificate.
    pub fn mtls(&self) -> bool {
        self.tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 50051)),
            shutdown_grace_period: Duration::from_secs(20),
            max_concurrent_calls: 1024,
            max_queued_calls: 1024,
            health_listen: SocketAddr::from(([0, 0, 0, 0], 50052)),
            metrics_listen: None,
            tls: None,
        }
    }
}

/// `[upstream]`: where token requests go and how long they may take.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Server root (scheme, host, optional port), no path.
    pub base_url: String,
    pub token_path: String,
    pub revoke_path: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Upper bound on one upstream call; the caller's deadline can only shorten it.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Upstream requests in flight at once, each on its own HTTP/1.1 connection; further
    /// calls wait for a turn within their deadline. Bounds sockets, memory and the burst the
    /// upstream sees.
    pub max_connections: usize,
    /// Permit a plain `http://` base_url (local tests and development only).
    pub allow_insecure_http: bool,
    /// Extra trust roots (PEM) for the upstream, beside the built-in webpki roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Using a refresh token ends the access token it came with (RingCentral: "calls with it
    /// then get 401"), so calls inside a cached token's renewal window wait for the new one
    /// instead of being handed the one the renewal ends (contract §8.1 I10).
    pub refresh_ends_access_token: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: "https://platform.ringcentral.com".to_owned(),
            token_path: "/restapi/oauth/token".to_owned(),
            revoke_path: "/restapi/oauth/revoke".to_owned(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            max_connections: 100,
            allow_insecure_http: false,
            ca_file: None,
            refresh_ends_access_token: true,
        }
    }
}

/// `[clients]`: the registered OAuth clients and what to do with unknown ones.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientsConfig {
    /// Forward requests for unregistered client ids as public clients (`client_id` only).
    pub allow_public: bool,
    pub registered: Vec<RegisteredClient>,
}

impl Default for ClientsConfig {
    fn default() -> Self {
        Self {
            allow_public: true,
            registered: Vec::new(),
        }
    }
}

/// `[cache]`: what the broker keeps, for how long, and where (contract §8).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub backend: CacheBackend,
    /// Grants whose tokens are cached and shared; every other grant is replayed instead.
    pub grants: BTreeSet<GrantKind>,
    /// Renew in the background when less than this is left (jittered by up to a tenth).
    #[serde(with = "humantime_serde")]
    pub refresh_ahead: Duration,
    /// Never hand out a token with less than this left; callers wait for the renewal.
    #[serde(with = "humantime_serde")]
    pub min_remaining: Duration,
    /// How long the definitive result of a non-cached grant answers identical requests.
    #[serde(with = "humantime_serde")]
    pub replay_window: Duration,
    /// Entries kept in memory (the memory backend, and the local layer in front of Redis).
    pub max_entries: u64,
    /// 32 or more random bytes: identities are HMACs and values AES-256-GCM under keys
    /// derived from it. Absent with `memory`: a random key per process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    pub redis: RedisConfig,
    /// The key material read from `key_file` at load time.
    #[serde(skip)]
    pub key: Option<CacheKey>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            backend: CacheBackend::Memory,
            grants: [
                GrantKind::ClientCredentials,
                GrantKind::JwtBearer,
                GrantKind::PartnerJwt,
                GrantKind::PersonalJwt,
                GrantKind::DeviceCertificate,
            ]
            .into(),
            refresh_ahead: Duration::from_secs(5 * 60),
            min_remaining: Duration::from_secs(60),
            replay_window: Duration::from_secs(30),
            max_entries: 100_000,
            key_file: None,
            redis: RedisConfig::default(),
            key: None,
        }
    }
}

/// Where the broker's state lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheBackend {
    /// In this process only: one replica, alone.
    #[default]
    Memory,
    /// Shared by every replica through Redis, with a memory layer in front.
    Redis,
}

/// `[cache.redis]`: the shared store of a fleet.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://`, `rediss://` (TLS); several URLs separated by commas mean Redis Cluster.
    pub url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Extra trust roots (PEM) for `rediss://`, beside the built-in webpki roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    pub key_prefix: String,
    /// A Redis call slower than this counts as Redis being down, for that call.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The password read from `password_file` at load time.
    #[serde(skip)]
    pub password: Option<SecretString>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://redis:6379/0".to_owned(),
            password_file: None,
            ca_file: None,
            key_prefix: "tokengate:".to_owned(),
            timeout: Duration::from_millis(50),
            password: None,
        }
    }
}

/// The cache key material: at least [`CacheKey::MIN_BYTES`] bytes, never printed.
#[derive(Clone)]
pub struct CacheKey(std::sync::Arc<secrecy::SecretSlice<u8>>);

impl CacheKey {
    pub const MIN_BYTES: usize = 32;

    pub fn new(bytes: Vec<u8>) -> Self {
        Self(std::sync::Arc::new(bytes.into()))
    }

    pub fn expose(&self) -> &[u8] {
        self.0.expose_secret()
    }
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheKey([REDACTED])")
    }
}

/// How tokengate authenticates a registered client upstream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    /// `Authorization: Basic`, plus `client_id` in the body as RingCentral's SDKs send it.
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the body.
    ClientSecretPost,
    /// A public client: `client_id` in the body, no secret.
    None,
    /// An assertion tokengate signs with `private_key_file` (RS256, ES256 or PS256).
    PrivateKeyJwt,
    /// An assertion tokengate signs with the client secret (HS256).
    ClientSecretJwt,
}

impl AuthMethod {
    /// The config name of the method.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientSecretBasic => "client_secret_basic",
            Self::ClientSecretPost => "client_secret_post",
            Self::None => "none",
            Self::PrivateKeyJwt => "private_key_jwt",
            Self::ClientSecretJwt => "client_secret_jwt",
        }
    }

    /// Whether the method authenticates with the client secret.
    fn needs_secret(self) -> bool {
        matches!(
            self,
            Self::ClientSecretBasic | Self::ClientSecretPost | Self::ClientSecretJwt
        )
    }

    /// Whether tokengate signs a client assertion for the method.
    fn signs(self) -> bool {
        matches!(self, Self::PrivateKeyJwt | Self::ClientSecretJwt)
    }
}

/// One `[[clients.registered]]` entry.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegisteredClient {
    pub client_id: String,
    /// Inline secret, for development; prefer `client_secret_file`.
    #[serde(
        default,
        serialize_with = "redacted",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_secret: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub auth_method: AuthMethod,
    /// Grant arms this client may use; absent allows all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_grants: Option<BTreeSet<GrantKind>>,
    /// Used when a request names no `client_id`.
    #[serde(default)]
    pub default: bool,
    /// PKCS#8 (or PKCS#1 RSA) PEM key for `private_key_jwt`; re-read when it changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_file: Option<PathBuf>,
    /// JWS algorithm of the signed assertion; default RS256 (`private_key_jwt`) or HS256
    /// (`client_secret_jwt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_alg: Option<SigningAlg>,
    /// JWS `kid` header of the signed assertion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Names from `[[callers]]` that may use this client; absent: every authenticated caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_callers: Option<BTreeSet<String>>,
    /// `false`: this client's calls pass straight through (no cache, coalescing or replay),
    /// and its responses keep their refresh tokens.
    #[serde(default = "enabled")]
    pub cache: bool,
    /// `aud` of the signed assertion; default the token endpoint URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion_audience: Option<String>,
    /// The secret actually used: inline or read from the file at load time.
    #[serde(skip)]
    pub secret: Option<SecretString>,
}

fn enabled() -> bool {
    true
}

fn redacted<S: Serializer>(
    secret: &Option<SecretString>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match secret {
        Some(_) => serializer.serialize_str("[REDACTED]"),
        None => serializer.serialize_none(),
    }
}

/// A number or duration past its upper bound (see [`Config::check_upper_bounds`]).
#[derive(Debug, thiserror::Error)]
enum BoundError {
    #[error("{key} must be at most {max} (got {value})")]
    Count {
        key: &'static str,
        max: usize,
        value: usize,
    },
    #[error(
        "{key} must be at most {} (got {})",
        humantime::format_duration(*.max),
        humantime::format_duration(*.value)
    )]
    Duration {
        key: &'static str,
        max: Duration,
        value: Duration,
    },
}

/// Why the configuration cannot be used. Each message is one line and never holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(String),
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Loads the file (if any) and the `TOKENGATE_<SECTION>__<KEY>` environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist or is not a file",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        // Only SECTION__KEY names are config keys; TOKENGATE_CONFIG and TOKENGATE_LOG_FORMAT
        // belong to the command line.
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|key| key.as_str().contains("__"))
            .split("__");
        Self::extract(figment.merge(env), &|name| std::env::var(name).ok())
    }

    /// Parses and validates TOML text alone (no environment); used by tests.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::extract(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(text)),
            &|_| None,
        )
    }

    /// `otel_env` looks up the standard `OTEL_*` variables that `[telemetry]` falls back on.
    fn extract(
        figment: Figment,
        otel_env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut config: Config = figment.extract().map_err(|error| {
            // figment can report several errors; the first is the one to fix first.
            let first = error
                .into_iter()
                .next()
                .map(|e| e.to_string())
                .unwrap_or_default();
            ConfigError::Load(first.replace('\n', " "))
        })?;
        config.telemetry.validate()?;
        config.telemetry.resolve(otel_env)?;
        config.validate()?;
        Ok(config)
    }

    /// Refuses numbers and durations past any sane setting: beyond them, what is built from
    /// them would overflow (`Instant + request_timeout`) or panic (a semaphore above tokio's
    /// `Semaphore::MAX_PERMITS`) at run time instead of failing here, naming the key.
    fn check_upper_bounds(&self) -> Result<(), BoundError> {
        let counts = [
            (
                "server.max_concurrent_calls",
                self.server.max_concurrent_calls,
                MAX_CALLS,
            ),
            (
                "server.max_queued_calls",
                self.server.max_queued_calls,
                MAX_CALLS,
            ),
            (
                "upstream.max_connections",
                self.upstream.max_connections,
                MAX_CONNECTIONS,
            ),
            (
                "cache.max_entries",
                usize::try_from(self.cache.max_entries).unwrap_or(usize::MAX),
                MAX_ENTRIES,
            ),
        ];
        for (key, value, max) in counts {
            if value > max {
                return Err(BoundError::Count { key, max, value });
            }
        }
        let durations = [
            (
                "server.shutdown_grace_period",
                self.server.shutdown_grace_period,
                MAX_GRACE,
            ),
            (
                "upstream.connect_timeout",
                self.upstream.connect_timeout,
                MAX_TIMEOUT,
            ),
            (
                "upstream.request_timeout",
                self.upstream.request_timeout,
                MAX_TIMEOUT,
            ),
            ("cache.redis.timeout", self.cache.redis.timeout, MAX_TIMEOUT),
            (
                "cache.refresh_ahead",
                self.cache.refresh_ahead,
                MAX_CACHE_DURATION,
            ),
            (
                "cache.min_remaining",
                self.cache.min_remaining,
                MAX_CACHE_DURATION,
            ),
            (
                "cache.replay_window",
                self.cache.replay_window,
                MAX_CACHE_DURATION,
            ),
        ];
        for (key, value, max) in durations {
            if value > max {
                return Err(BoundError::Duration { key, max, value });
            }
        }
        Ok(())
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if self.server.max_concurrent_calls == 0 {
            return invalid("server.max_concurrent_calls must be at least 1".into());
        }
        if self.upstream.max_connections == 0 {
            return invalid("upstream.max_connections must be at least 1".into());
        }
        if self.server.shutdown_grace_period.is_zero() {
            return invalid("server.shutdown_grace_period must be greater than zero".into());
        }
        self.check_upper_bounds()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let upstream = &self.upstream;
        let url = match reqwest::Url::parse(&upstream.base_url) {
            Ok(url) => url,
            Err(e) => return invalid(format!("upstream.base_url is not a URL: {e}")),
        };
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return invalid(
                "upstream.base_url must be an http:// or https:// URL with a host".into(),
            );
        }
        if url.scheme() == "http" && !upstream.allow_insecure_http {
            return invalid(
                "upstream.base_url is plain http://, which would send client secrets unencrypted; \
                 use https:// or set upstream.allow_insecure_http = true (local testing only)"
                    .into(),
            );
        }
        if let Some(path) = &upstream.ca_file
            && let Err(e) = load_ca_file(path)
        {
            return invalid(format!("upstream.ca_file: {e}"));
        }
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return invalid(format!(
                "upstream.base_url must be the server root with no path (got path {:?}); \
                 set token_path and revoke_path instead",
                url.path()
            ));
        }
        for (key, path) in [
            ("token_path", &upstream.token_path),
            ("revoke_path", &upstream.revoke_path),
        ] {
            if !path.starts_with('/') {
                return invalid(format!("upstream.{key} must start with '/'"));
            }
        }
        for (key, value) in [
            ("connect_timeout", upstream.connect_timeout),
            ("request_timeout", upstream.request_timeout),
        ] {
            if value.is_zero() {
                return invalid(format!("upstream.{key} must be greater than zero"));
            }
        }

        let mut seen = HashSet::new();
        let mut defaults = Vec::new();
        for client in &mut self.clients.registered {
            let id = client.client_id.clone();
            if id.trim().is_empty() {
                return invalid("clients.registered: client_id must not be empty".into());
            }
            if !seen.insert(id.clone()) {
                return invalid(format!(
                    "clients.registered: client_id {id:?} is registered twice"
                ));
            }
            if client.default {
                defaults.push(id.clone());
            }
            if client
                .allowed_grants
                .as_ref()
                .is_some_and(BTreeSet::is_empty)
            {
                return invalid(format!(
                    "client {id:?}: allowed_grants is empty, so the client could never be used; \
                     remove the key to allow every grant"
                ));
            }
            client.secret = match (&client.client_secret, &client.client_secret_file) {
                (Some(_), Some(_)) => {
                    return invalid(format!(
                        "client {id:?}: set client_secret or client_secret_file, not both"
                    ));
                }
                (Some(secret), None) => Some(secret.clone()),
                (None, Some(path)) => Some(read_secret_file(&id, path)?),
                (None, None) => None,
            };
            validate_auth(client)
                .map_err(|e| ConfigError::Invalid(format!("client {id:?}: {e}")))?;
        }
        self.validate_callers()?;
        self.validate_cache()?;
        if let Some(tls) = &self.server.tls {
            tls.files()
                .load()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        if defaults.len() > 1 {
            return invalid(format!(
                "clients.registered: more than one default client: {defaults:?}"
            ));
        }
        Ok(())
    }

    fn validate_callers(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        let mut names = HashSet::new();
        for caller in &self.callers {
            let name = &caller.name;
            if name.trim().is_empty() {
                return invalid("callers: name must not be empty".into());
            }
            if !names.insert(name.as_str()) {
                return invalid(format!("callers: {name:?} is named twice"));
            }
            match (&caller.mtls_san, &caller.api_key_sha256) {
                (Some(_), Some(_)) | (None, None) => {
                    return invalid(format!(
                        "caller {name:?}: set exactly one of mtls_san and api_key_sha256"
                    ));
                }
                (Some(_), None) if !self.server.mtls() => {
                    return invalid(format!(
                        "caller {name:?}: mtls_san needs mTLS (server.tls.client_ca_file)"
                    ));
                }
                (None, Some(hex)) if parse_sha256(hex).is_none() => {
                    return invalid(format!(
                        "caller {name:?}: api_key_sha256 must be 64 hex digits"
                    ));
                }
                _ => {}
            }
        }
        for client in &self.clients.registered {
            for name in client.allowed_callers.iter().flatten() {
                if !names.contains(name.as_str()) {
                    return invalid(format!(
                        "client {:?}: allowed_callers names {name:?}, which is not in [[callers]]",
                        client.client_id
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_cache(&mut self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        let cache = &mut self.cache;
        if cache.max_entries == 0 {
            return invalid("cache.max_entries must be at least 1".into());
        }
        if cache.replay_window.is_zero() {
            return invalid("cache.replay_window must be greater than zero".into());
        }
        if cache.min_remaining > cache.refresh_ahead {
            return invalid(format!(
                "cache.min_remaining ({}) must not exceed cache.refresh_ahead ({}): renewal must \
                 start before callers have to wait for it",
                humantime::format_duration(cache.min_remaining),
                humantime::format_duration(cache.refresh_ahead)
            ));
        }
        if let Some(path) = &cache.key_file {
            let bytes = std::fs::read(path).map_err(|e| {
                ConfigError::Invalid(format!(
                    "cache.key_file: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            if bytes.len() < CacheKey::MIN_BYTES {
                return invalid(format!(
                    "cache.key_file {} holds {} bytes; at least {} random bytes are needed \
                     (e.g. head -c 32 /dev/urandom)",
                    path.display(),
                    bytes.len(),
                    CacheKey::MIN_BYTES
                ));
            }
            cache.key = Some(CacheKey::new(bytes));
        }
        if cache.backend != CacheBackend::Redis {
            return Ok(());
        }
        if cache.key.is_none() {
            return invalid(
                "cache.backend = \"redis\" needs cache.key_file: every replica must share the \
                 key that makes identities and values unreadable to Redis"
                    .into(),
            );
        }
        let redis = &mut cache.redis;
        if redis.timeout.is_zero() {
            return invalid("cache.redis.timeout must be greater than zero".into());
        }
        for url in redis.url.split(',').map(str::trim) {
            match reqwest::Url::parse(url) {
                Ok(parsed) if matches!(parsed.scheme(), "redis" | "rediss") => {}
                Ok(parsed) => {
                    return invalid(format!(
                        "cache.redis.url: scheme {:?} is not redis:// or rediss://",
                        parsed.scheme()
                    ));
                }
                Err(e) => return invalid(format!("cache.redis.url is not a URL: {e}")),
            }
        }
        if let Some(path) = &redis.ca_file
            && let Err(e) = load_ca_file(path)
        {
            return invalid(format!("cache.redis.ca_file: {e}"));
        }
        if let Some(path) = &redis.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Invalid(format!(
                    "cache.redis.password_file: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            redis.password = Some(SecretString::from(trim_newline(&text)));
        }
        Ok(())
    }

    /// The effective configuration as TOML, with every secret replaced by `[REDACTED]`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Checks that a client's auth method has exactly the settings it uses, and that a signing
/// key loads and signs with its algorithm.
fn validate_auth(client: &RegisteredClient) -> Result<(), AuthError> {
    let method = client.auth_method;
    match (&client.secret, method.needs_secret()) {
        (Some(secret), true) if secret.expose_secret().is_empty() => {
            return Err(AuthError::EmptySecret);
        }
        (Some(_), false) => return Err(AuthError::UnusedSecret(method.as_str())),
        (None, true) => return Err(AuthError::MissingSecret(method.as_str())),
        _ => {}
    }
    if !method.signs() {
        let set = [
            ("private_key_file", client.private_key_file.is_some()),
            ("signing_alg", client.signing_alg.is_some()),
            ("key_id", client.key_id.is_some()),
            ("assertion_audience", client.assertion_audience.is_some()),
        ];
        if let Some((key, _)) = set.iter().find(|(_, is_set)| *is_set) {
            return Err(AuthError::SigningKeyUnused(key));
        }
        return Ok(());
    }
    let alg = client.signing_alg();
    match (method, &client.private_key_file) {
        (AuthMethod::PrivateKeyJwt, None) => Err(AuthError::MissingKeyFile),
        (AuthMethod::PrivateKeyJwt, Some(_)) if !alg.uses_private_key() => {
            Err(AuthError::NotPrivateKeyAlg(alg))
        }
        (AuthMethod::PrivateKeyJwt, Some(path)) => Ok(load_private_key(path, alg).map(drop)?),
        (_, Some(_)) => Err(AuthError::KeyFileUnused),
        (_, None) if alg != SigningAlg::HS256 => Err(AuthError::NotHs256(alg)),
        (_, None) => Ok(()),
    }
}

/// Why a client's auth settings do not fit its `auth_method`; the reason after `client "id": `.
#[derive(Debug, thiserror::Error)]
enum AuthError {
    #[error("the client secret is empty")]
    EmptySecret,
    #[error("auth_method {0:?} sends no client secret, so remove client_secret")]
    UnusedSecret(&'static str),
    #[error("auth_method {0:?} needs client_secret_file or client_secret")]
    MissingSecret(&'static str),
    #[error("{0} applies only to auth_method \"private_key_jwt\" or \"client_secret_jwt\"")]
    SigningKeyUnused(&'static str),
    #[error("auth_method \"private_key_jwt\" needs private_key_file")]
    MissingKeyFile,
    #[error("signing_alg {0:?} does not sign with a private key; use RS256, ES256 or PS256")]
    NotPrivateKeyAlg(SigningAlg),
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("private_key_file applies only to auth_method \"private_key_jwt\"")]
    KeyFileUnused,
    #[error("auth_method \"client_secret_jwt\" signs with HS256, not {0:?}")]
    NotHs256(SigningAlg),
}

impl RegisteredClient {
    /// The assertion algorithm, with the method's default.
    pub fn signing_alg(&self) -> SigningAlg {
        self.signing_alg.unwrap_or(match self.auth_method {
            AuthMethod::ClientSecretJwt => SigningAlg::HS256,
            _ => SigningAlg::RS256,
        })
    }
}

/// Parses 64 hex digits.
pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Reads a PEM bundle of trust roots; it must hold at least one certificate.
pub fn load_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, CaFileError> {
    let pem = std::fs::read(path).map_err(|source| CaFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| CaFileError::NotPem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(CaFileError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Why a PEM bundle of trust roots cannot be used; callers prefix the key that named it.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a PEM certificate bundle: {source}", path.display())]
    NotPem {
        path: PathBuf,
        source: reqwest::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    Empty { path: PathBuf },
}

/// Reads a secret file, dropping one trailing newline (editors and `echo` add one).
fn read_secret_file(client_id: &str, path: &Path) -> Result<SecretString, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::Invalid(format!(
            "client {client_id:?}: cannot read client_secret_file {}: {e}",
            path.display()
        ))
    })?;
    Ok(SecretString::from(trim_newline(&text)))
}

/// Drops one trailing newline (editors and `echo` add one).
fn trim_newline(text: &str) -> &str {
    text.strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_documented_defaults() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config.server.listen, "0.0.0.0:50051".parse().unwrap());
        assert_eq!(config.server.shutdown_grace_period, Duration::from_secs(20));
        assert_eq!(config.upstream.base_url, "https://platform.ringcentral.com");
        assert_eq!(config.upstream.token_path, "/restapi/oauth/token");
        assert_eq!(config.upstream.revoke_path, "/restapi/oauth/revoke");
        assert_eq!(config.upstream.connect_timeout, Duration::from_secs(2));
        assert_eq!(config.upstream.request_timeout, Duration::from_secs(10));
        assert!(config.clients.allow_public);
        assert!(config.clients.registered.is_empty());
    }

    #[test]
    fn full_config_parses() {
        let dir = std::env::temp_dir().join(format!("tokengate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secret");
        std::fs::write(&file, "from-file-secret\n").unwrap();
        let config = Config::from_toml(&format!(
            r#"
            [server]
            listen = "127.0.0.1:0"
            shutdown_grace_period = "1m 5s"
            [upstream]
            base_url = "http://127.0.0.1:8080"
            allow_insecure_http = true
            request_timeout = "500ms"
            [clients]
            allow_public = false
            [[clients.registered]]
            client_id = "a"
            client_secret_file = "{}"
            allowed_grants = ["jwt_bearer", "refresh_token"]
            default = true
            [[clients.registered]]
            client_id = "b"
            client_secret = "inline"
            auth_method = "client_secret_post"
            [[clients.registered]]
            client_id = "c"
            auth_method = "none"
            "#,
            file.display()
        ))
        .unwrap();
        assert_eq!(config.server.shutdown_grace_period, Duration::from_secs(65));
        assert_eq!(config.upstream.request_timeout, Duration::from_millis(500));
        let [a, b, c] = &config.clients.registered[..] else {
            panic!("three clients")
        };
        assert_eq!(
            a.secret.as_ref().unwrap().expose_secret(),
            "from-file-secret"
        );
        assert_eq!(
            a.allowed_grants
                .as_ref()
                .unwrap()
                .iter()
                .copied()
                .collect::<Vec<_>>(),
            [GrantKind::JwtBearer, GrantKind::RefreshToken]
        );
        assert_eq!(b.auth_method, AuthMethod::ClientSecretPost);
        assert_eq!(b.secret.as_ref().unwrap().expose_secret(), "inline");
        assert!(c.secret.is_none());

        let shown = config.to_redacted_toml();
        assert!(!shown.contains("inline"), "{shown}");
        assert!(!shown.contains("from-file-secret"), "{shown}");
        assert!(shown.contains("[REDACTED]"), "{shown}");
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("inline") && !debug.contains("from-file-secret"),
            "{debug}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn rejects(toml: &str, expected: &str) {
        let error = Config::from_toml(toml).expect_err(toml).to_string();
        assert!(
            error.contains(expected),
            "{error:?} should mention {expected:?}"
        );
        assert!(!error.contains('\n'), "one line: {error:?}");
    }

    #[test]
    fn absurd_numbers_and_durations_are_refused_naming_the_key() {
        // Each would overflow an `Instant` addition or panic tokio's semaphore at run time.
        for (toml, key) in [
            (
                "[upstream]\nrequest_timeout = \"18446744073709551615s\"",
                "upstream.request_timeout",
            ),
            (
                "[upstream]\nrequest_timeout = \"11m\"",
                "upstream.request_timeout",
            ),
            (
                "[upstream]\nconnect_timeout = \"1000000h\"",
                "upstream.connect_timeout",
            ),
            (
                "[server]\nshutdown_grace_period = \"2h\"",
                "server.shutdown_grace_period",
            ),
            (
                "[server]\nmax_concurrent_calls = 9223372036854775807",
                "server.max_concurrent_calls",
            ),
            (
                "[server]\nmax_queued_calls = 2305843009213693952",
                "server.max_queued_calls",
            ),
            (
                "[upstream]\nmax_connections = 100001",
                "upstream.max_connections",
            ),
            (
                "[cache]\nmax_entries = 9223372036854775807",
                "cache.max_entries",
            ),
            ("[cache]\nreplay_window = \"25h\"", "cache.replay_window"),
            ("[cache.redis]\ntimeout = \"1y\"", "cache.redis.timeout"),
        ] {
            rejects(toml, key);
        }
        let at_the_bounds = format!(
            "[server]\nmax_concurrent_calls = {MAX_CALLS}\nmax_queued_calls = {MAX_CALLS}\n\
             shutdown_grace_period = \"1h\"\n[upstream]\nrequest_timeout = \"10m\"\n\
             max_connections = {MAX_CONNECTIONS}"
        );
        Config::from_toml(&at_the_bounds).expect("the bounds themselves are accepted");
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        rejects("[server]\nlisten = \"nope\"", "listen");
        rejects("[server]\nbogus = 1", "bogus");
        rejects("[upstream]\nrequest_timeout = \"ten\"", "request_timeout");
        rejects(
            "[upstream]\nbase_url = \"https://x.example/restapi\"",
            "no path",
        );
        rejects("[upstream]\nbase_url = \"ftp://x.example\"", "http");
        rejects("[upstream]\ntoken_path = \"oauth\"", "token_path");
        rejects("[upstream]\nconnect_timeout = \"0s\"", "connect_timeout");
        rejects("[upstream]\nmax_connections = 0", "max_connections");
        rejects(
            "[[clients.registered]]\nclient_id = \"a\"",
            "needs client_secret",
        );
        rejects(
            "[[clients.registered]]\nclient_id = \"a\"\nauth_method = \"none\"\nclient_secret = \"s\"",
            "sends no client secret",
        );
        rejects(
            "[[clients.registered]]\nclient_id = \"a\"\nclient_secret = \"s\"\nallowed_grants = [\"magic\"]",
            "magic",
        );
        rejects(
            "[[clients.registered]]\nclient_id = \"a\"\nclient_secret = \"s\"\n\
             [[clients.registered]]\nclient_id = \"a\"\nclient_secret = \"t\"",
            "registered twice",
        );
        rejects(
            "[[clients.registered]]\nclient_id = \"a\"\nclient_secret = \"s\"\ndefault = true\n\
             [[clients.registered]]\nclient_id = \"b\"\nclient_secret = \"t\"\ndefault = true",
            "more than one default",
        );
        rejects(
            "[[clients.registered]]\nclient_id = \"a\"\nclient_secret_file = \"/nonexistent/secret\"",
            "cannot read client_secret_file",
        );
    }

    fn with_env(toml: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::extract(
            Figment::from(Serialized::defaults(Config::default())).merge(Toml::string(toml)),
            &move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
        )
    }

    #[test]
    fn telemetry_defaults_keys_and_otel_variables() {
        let config = Config::from_toml("").unwrap();
        let telemetry = &config.telemetry;
        assert_eq!(telemetry.otlp_endpoint, None, "no export by default");
        assert_eq!(telemetry.protocol(), OtlpProtocol::Grpc);
        assert_eq!(telemetry.service_name(), "tokengate");
        assert_eq!(telemetry.sample_ratio, 1.0);

        let toml = "[telemetry]\notlp_endpoint = \"https://collector.example:4318\"\n\
                    otlp_protocol = \"http/protobuf\"\nservice_name = \"tg-eu\"\nsample_ratio = 0.25";
        let otel = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env-collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_SERVICE_NAME", "from-env"),
        ];
        // The keys win over the variables.
        let config = with_env(toml, &otel).unwrap();
        let telemetry = &config.telemetry;
        assert_eq!(
            telemetry.otlp_endpoint.as_deref(),
            Some("https://collector.example:4318")
        );
        assert_eq!(telemetry.protocol(), OtlpProtocol::HttpProtobuf);
        assert_eq!(telemetry.service_name(), "tg-eu");
        assert_eq!(telemetry.sample_ratio, 0.25);
        let shown = config.to_redacted_toml();
        assert!(
            shown.contains("otlp_protocol = \"http/protobuf\""),
            "{shown}"
        );

        // Without the keys, the variables apply, as in every OpenTelemetry SDK.
        let otel = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env-collector:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "from-env"),
        ];
        let config = with_env("", &otel).unwrap();
        let telemetry = &config.telemetry;
        assert_eq!(
            telemetry.otlp_endpoint.as_deref(),
            Some("http://env-collector:4318")
        );
        assert_eq!(telemetry.protocol(), OtlpProtocol::HttpProtobuf);
        assert_eq!(telemetry.service_name(), "from-env");
        // check-config shows what is in force, wherever it came from.
        let shown = config.to_redacted_toml();
        assert!(shown.contains("http://env-collector:4318"), "{shown}");
        assert!(shown.contains("service_name = \"from-env\""), "{shown}");
    }

    #[test]
    fn bad_telemetry_values_are_refused_naming_the_key() {
        for ratio in ["1.5", "-0.1", "nan", "inf"] {
            rejects(
                &format!("[telemetry]\nsample_ratio = {ratio}"),
                "telemetry.sample_ratio",
            );
        }
        rejects(
            "[telemetry]\notlp_protocol = \"http/json\"",
            "otlp_protocol",
        );
        for endpoint in [
            "collector:4317",
            "ftp://collector",
            "not a url",
            "",
            "http://user:pw@collector:4317",
        ] {
            rejects(
                &format!("[telemetry]\notlp_endpoint = \"{endpoint}\""),
                "telemetry.otlp_endpoint",
            );
        }
        rejects(
            "[telemetry]\nservice_name = \" \"",
            "telemetry.service_name",
        );
        rejects("[telemetry]\nbogus = 1", "bogus");

        let refused = |vars: &[(&str, &str)], expected: &str| {
            let error = with_env("", vars).expect_err(expected).to_string();
            assert!(error.contains(expected), "{error:?} should name {expected}");
            assert!(!error.contains("hunter2"), "no credential echoed: {error}");
        };
        refused(
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        );
        refused(
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://u:hunter2@c.example")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        );
        refused(
            &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        );
    }

    #[test]
    fn the_traces_variables_win_over_the_generic_ones_and_keys_over_both() {
        let generic = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ];
        let traces = [
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:4318/custom/traces",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ];
        let both: Vec<_> = generic.iter().chain(&traces).copied().collect();

        // The traces variables win, and their URL is kept apart: it is the full URL.
        let config = with_env("", &both).unwrap();
        let telemetry = &config.telemetry;
        assert_eq!(
            telemetry.otlp_traces_endpoint.as_deref(),
            Some("http://traces:4318/custom/traces")
        );
        assert_eq!(telemetry.otlp_endpoint, None, "not a base URL");
        assert_eq!(telemetry.protocol(), OtlpProtocol::HttpProtobuf);
        // check-config shows it under its own name: as otlp_endpoint, /v1/traces would be
        // added to it. Fed back as a key, that name is refused, not read as a base URL.
        let shown = config.to_redacted_toml();
        assert!(
            shown.contains("otlp_traces_endpoint = \"http://traces:4318/custom/traces\""),
            "{shown}"
        );
        assert!(!shown.contains("otlp_endpoint ="), "{shown}");
        rejects(
            "[telemetry]\notlp_traces_endpoint = \"http://traces:4318/custom/traces\"",
            "otlp_traces_endpoint",
        );

        // Each traces variable wins alone, too.
        let config = with_env("", &[generic[0], traces[1]]).unwrap();
        assert_eq!(
            config.telemetry.otlp_endpoint.as_deref(),
            Some("http://generic:4318")
        );
        assert_eq!(config.telemetry.otlp_traces_endpoint, None);
        assert_eq!(config.telemetry.protocol(), OtlpProtocol::HttpProtobuf);
        let config = with_env("", &[traces[0], generic[1]]).unwrap();
        assert_eq!(
            config.telemetry.otlp_traces_endpoint.as_deref(),
            Some("http://traces:4318/custom/traces")
        );
        assert_eq!(config.telemetry.protocol(), OtlpProtocol::Grpc);

        // The keys win over both, and the endpoint key stays a base URL.
        let toml = "[telemetry]\notlp_endpoint = \"http://key:4317\"\notlp_protocol = \"grpc\"";
        let config = with_env(toml, &both).unwrap();
        let telemetry = &config.telemetry;
        assert_eq!(telemetry.otlp_endpoint.as_deref(), Some("http://key:4317"));
        assert_eq!(telemetry.otlp_traces_endpoint, None);
        assert_eq!(telemetry.protocol(), OtlpProtocol::Grpc);

        // A blank traces variable is as good as unset.
        let config = with_env(
            "",
            &[
                generic[0],
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", " "),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", ""),
            ],
        )
        .unwrap();
        assert_eq!(
            config.telemetry.otlp_endpoint.as_deref(),
            Some("http://generic:4318")
        );
        assert_eq!(config.telemetry.otlp_traces_endpoint, None);
        assert_eq!(config.telemetry.protocol(), OtlpProtocol::Grpc);
    }

    #[test]
    fn bad_traces_variables_are_refused_naming_them() {
        let refused = |vars: &[(&str, &str)], expected: &str| {
            let error = with_env("", vars).expect_err(expected).to_string();
            assert!(error.contains(expected), "{error:?} should name {expected}");
            assert!(!error.contains("hunter2"), "no credential echoed: {error}");
        };
        // Named even when the generic variable beside it is good.
        for bad in [
            "collector:4318/v1/traces",
            "ftp://collector/v1/traces",
            "https://u:hunter2@c.example/v1/traces",
        ] {
            refused(
                &[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://good:4318"),
                    ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", bad),
                ],
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            );
        }
        refused(
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ],
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        );
        // A key in force leaves the variables unread, bad or not.
        let config = with_env(
            "[telemetry]\notlp_endpoint = \"http://key:4317\"\notlp_protocol = \"grpc\"",
            &[
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "thrift"),
            ],
        )
        .unwrap();
        assert_eq!(
            config.telemetry.otlp_endpoint.as_deref(),
            Some("http://key:4317")
        );
    }

    /// A throwaway CA certificate as PEM.
    fn ca_pem() -> String {
        rcgen::generate_simple_self_signed(vec!["collector.test".into()])
            .unwrap()
            .cert
            .pem()
    }

    #[test]
    fn the_collector_ca_comes_from_the_traces_variable_first() {
        let dir = tempfile::tempdir().unwrap();
        let generic = dir.path().join("generic.pem");
        let traces = dir.path().join("traces.pem");
        std::fs::write(&generic, ca_pem()).unwrap();
        std::fs::write(&traces, ca_pem()).unwrap();
        let (generic, traces) = (generic.to_str().unwrap(), traces.to_str().unwrap());

        let config = with_env("", &[]).unwrap();
        assert_eq!(
            config.telemetry.otlp_certificate, None,
            "webpki's roots alone"
        );
        let config = with_env("", &[("OTEL_EXPORTER_OTLP_CERTIFICATE", generic)]).unwrap();
        assert_eq!(config.telemetry.otlp_certificate, Some(generic.into()));
        let both = [
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", generic),
            ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", traces),
        ];
        let config = with_env("", &both).unwrap();
        assert_eq!(config.telemetry.otlp_certificate, Some(traces.into()));
        // Read beside an endpoint key, which has no certificate key of its own.
        let config = with_env("[telemetry]\notlp_endpoint = \"https://key:4317\"", &both).unwrap();
        assert_eq!(config.telemetry.otlp_certificate, Some(traces.into()));
        // A blank traces variable is as good as unset.
        let config = with_env(
            "",
            &[both[0], ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", " ")],
        )
        .unwrap();
        assert_eq!(config.telemetry.otlp_certificate, Some(generic.into()));

        // check-config prints the path, never the certificates; it is no key to set.
        let shown = config.to_redacted_toml();
        assert!(
            shown.contains(&format!("otlp_certificate = \"{generic}\"")),
            "{shown}"
        );
        assert!(!shown.contains("BEGIN CERTIFICATE"), "{shown}");
        rejects(
            &format!("[telemetry]\notlp_certificate = \"{generic}\""),
            "otlp_certificate",
        );
    }

    #[test]
    fn a_bad_collector_ca_is_refused_naming_its_variable() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let good = dir.path().join("good.pem");
        std::fs::write(&good, ca_pem()).unwrap();
        let missing = dir.path().join("missing.pem");
        let path = |p: &Path| p.to_str().unwrap().to_owned();

        for (file, why) in [
            (path(&missing), "cannot read"),
            (path(dir.path()), "cannot read"),
            (path(&not_pem), "no PEM certificate"),
            (path(&empty), "no PEM certificate"),
        ] {
            for variable in [
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
            ] {
                let error = with_env("", &[(variable, &file)])
                    .expect_err(&file)
                    .to_string();
                assert!(
                    error.contains(&format!("{variable}: ")) && error.contains(why),
                    "{error:?} should name {variable} and say {why}"
                );
                assert!(error.contains(&file), "{error:?} should name {file}");
            }
        }
        // The traces variable is the one read: a bad generic one beside it is not.
        let config = with_env(
            "",
            &[
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", &path(&missing)),
                ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", &path(&good)),
            ],
        )
        .unwrap();
        assert_eq!(config.telemetry.otlp_certificate, Some(good));
    }

    fn key(name: &str) -> String {
        format!("{}/tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    #[test]
    fn signed_assertion_clients_are_validated() {
        let config = Config::from_toml(&format!(
            "[[clients.registered]]\nclient_id = \"pk\"\nauth_method = \"private_key_jwt\"\n\
             private_key_file = \"{}\"\nsigning_alg = \"ES256\"\nkey_id = \"k1\"\n\
             assertion_audience = \"https://aud.example\"\n\
             [[clients.registered]]\nclient_id = \"hs\"\nauth_method = \"client_secret_jwt\"\n\
             client_secret = \"hs-secret\"",
            key("ec-p256.pem")
        ))
        .unwrap();
        let [pk, hs] = &config.clients.registered[..] else {
            panic!("two clients")
        };
        assert_eq!(pk.signing_alg(), SigningAlg::ES256);
        assert_eq!(
            hs.signing_alg(),
            SigningAlg::HS256,
            "client_secret_jwt defaults to HS256"
        );

        let pk = |extra: &str| {
            format!(
                "[[clients.registered]]\nclient_id = \"pk\"\nauth_method = \"private_key_jwt\"\n{extra}"
            )
        };
        rejects(&pk(""), "needs private_key_file");
        rejects(
            &pk(&format!("private_key_file = \"{}\"", key("ec-p256.pem"))),
            "RS256",
        );
        rejects(
            &pk(&format!(
                "private_key_file = \"{}\"\nsigning_alg = \"HS256\"",
                key("rsa-a.pem")
            )),
            "private key",
        );
        rejects(
            &pk(&format!(
                "private_key_file = \"{}\"\nclient_secret = \"x\"",
                key("rsa-a.pem")
            )),
            "sends no client secret",
        );
        rejects(
            &pk("private_key_file = \"/nonexistent.pem\""),
            "cannot read private_key_file",
        );
        rejects(
            &pk(&format!(
                "private_key_file = \"{}\"\nsigning_alg = \"EdDSA\"",
                key("rsa-a.pem")
            )),
            "signing_alg",
        );
        rejects(
            "[[clients.registered]]\nclient_id = \"hs\"\nauth_method = \"client_secret_jwt\"\n\
             client_secret = \"s\"\nsigning_alg = \"RS256\"",
            "HS256",
        );
        rejects(
            "[[clients.registered]]\nclient_id = \"hs\"\nauth_method = \"client_secret_jwt\"",
            "needs client_secret_file",
        );
        rejects(
            "[[clients.registered]]\nclient_id = \"b\"\nclient_secret = \"s\"\nkey_id = \"k1\"",
            "key_id applies only",
        );
    }

    #[test]
    fn a_bad_secret_value_is_never_echoed() {
        let error = Config::from_toml(
            "[[clients.registered]]\nclient_id = \"a\"\nclient_secret = \"s3cr3t-value\"\n\
             client_secret_file = \"/x\"",
        )
        .unwrap_err()
        .to_string();
        assert!(!error.contains("s3cr3t-value"), "{error}");
    }
}
