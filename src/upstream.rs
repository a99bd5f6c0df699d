//! The upstream token endpoint: one pooled HTTP client for the process, a form POST per
//! call, and the decoding of a token or an OAuth error from a size-capped body.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER, USER_AGENT};
use reqwest::{StatusCode, Url};
use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Deserializer};
use tokio::time::Instant;
use tower::retry::budget::{Budget as _, TpsBudget};

use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::config::UpstreamConfig;
use crate::grant::FormField;
use crate::metrics::{Endpoint, Metrics, RetryCause, UpstreamStatus};
use crate::rate_limit::BoxFuture;

/// Largest body read from the upstream (contract §6).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Most attempts one call makes, the first included.
pub const MAX_ATTEMPTS: u32 = 3;

/// First backoff after a failed connection; it doubles per attempt, with full jitter.
const CONNECT_BACKOFF: Duration = Duration::from_millis(50);

/// `User-Agent` and `X-User-Agent` (RingCentral's SDKs send both).
pub const AGENT: &str = concat!("tokengate/", env!("CARGO_PKG_VERSION"));

/// Longest `Retry-After` honoured; a larger one is read as this, so that adding it to a
/// clock can never overflow.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Penalty after a 429 without `Retry-After` (RingCentral: "30 s or more").
pub const RATE_LIMIT_WAIT: Duration = Duration::from_secs(30);

const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";

/// One form POST: the body fields in order, and Basic credentials when the client uses them.
pub struct Outgoing<'a> {
    pub fields: Vec<FormField<'a>>,
    pub basic: Option<(&'a str, &'a SecretString)>,
    /// Whether the request may be sent again after a failure.
    pub replay: Replay,
    /// The rate-limit penalty that applies to this request: checked just before every
    /// attempt, and told of every 429 at once.
    pub penalty: Option<&'a dyn Penalty>,
    /// What must still hold for another attempt to go out (a fleet lease): checked just
    /// before every attempt.
    pub lease: Option<&'a dyn Precondition>,
}

impl std::fmt::Debug for Outgoing<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outgoing")
            .field("fields", &self.fields)
            .field("basic", &self.basic.map(|(id, _)| id))
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

/// The upstream's 429 penalty for one request's client (and user), fleet-wide. Async, as
/// both calls may ask Redis; one boxed future per attempt is noise next to the POST.
pub trait Penalty: Sync {
    /// How long sending must still wait, if at all, by every replica's penalties.
    fn remaining(&self) -> BoxFuture<'_, Option<Duration>>;
    /// The upstream answered 429: nothing more is sent for `wait`. Resolves once every
    /// replica can see it, so the answer that passes the 429 on leaves after that.
    fn penalise(&self, wait: Duration) -> BoxFuture<'_, ()>;
}

/// A condition that must still hold when an attempt is sent: a fleet lease, by its holder's
/// own clock. A lease that ran out means another replica may be sending the same credential.
pub trait Precondition: Sync {
    fn holds(&self) -> bool;
}

/// When a request may be sent again. Whatever this says, a request is never re-sent after
/// a 400, and only a 429 or 503 that names its wait in `Retry-After` is waited out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replay {
    /// Never: the grant works once (an authorization code).
    Never,
    /// Whenever it is safe: the upstream answers a repeat as it answered the first.
    Always,
    /// Only this long after the first send: RingCentral answers a repeated refresh
    /// identically for about 10 s, after which the old refresh token is spent.
    Within(Duration),
}

impl Outgoing<'_> {
    /// The `application/x-www-form-urlencoded` body.
    pub fn body(&self) -> String {
        let pairs: Vec<(&str, &str)> = self
            .fields
            .iter()
            .map(|f| (f.name, f.value.as_ref()))
            .collect();
        serde_urlencoded::to_string(pairs).expect("a sequence of string pairs always encodes")
    }

    /// Every secret value this request carries, as sent and as form-encoded, to scrub from
    /// what the upstream echoes.
    fn secrets(&self) -> Vec<String> {
        let fields = self
            .fields
            .iter()
            .filter(|f| f.secret)
            .map(|f| f.value.as_ref());
        let all = fields.chain(self.basic.map(|(_, secret)| secret.expose_secret()));
        let mut secrets = Vec::new();
        for secret in all {
            secrets.push(secret.to_owned());
            let encoded = serde_urlencoded::to_string([("", secret)]).unwrap_or_default();
            if let Some(encoded) = encoded.strip_prefix('=')
                && encoded != secret
            {
                secrets.push(encoded.to_owned());
            }
        }
        secrets
    }
}

/// The token endpoint and the revocation endpoint of one authorization server.
#[derive(Clone)]
pub struct Upstream {
    http: reqwest::Client,
    token_url: Url,
    revoke_url: Url,
    request_timeout: Duration,
    /// One permit per upstream request in flight (`upstream.max_connections`).
    connections: std::sync::Arc<tokio::sync::Semaphore>,
    /// Retries may add at most about a fifth to the upstream's load (plus a trickle), so a
    /// failing upstream is not hammered by every caller's retries at once.
    budget: std::sync::Arc<TpsBudget>,
    /// Counts and times every request sent.
    metrics: std::sync::Arc<Metrics>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("token_url", &self.token_url.as_str())
            .field("revoke_url", &self.revoke_url.as_str())
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// A successful token response, secrets wrapped, with the time it arrived.
#[derive(Clone, Debug, Deserialize)]
pub struct Token {
    #[serde(default)]
    pub access_token: Option<SecretString>,
    #[serde(default)]
    pub token_type: Option<String>,
    #[serde(default, deserialize_with = "seconds")]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<SecretString>,
    #[serde(default, deserialize_with = "seconds")]
    pub refresh_token_expires_in: Option<u64>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub owner_id: Option<String>,
    #[serde(default)]
    pub endpoint_id: Option<String>,
    #[serde(default)]
    pub session_id: Option<String>,
    #[serde(default)]
    pub id_token: Option<SecretString>,
    #[serde(default, deserialize_with = "seconds")]
    pub session_expires_in: Option<u64>,
    #[serde(default)]
    pub session_expiration_time: Option<String>,
    #[serde(default, deserialize_with = "seconds")]
    pub session_idle_timeout: Option<u64>,
    /// When the attempt that got this token was sent; its lifetimes count from here, not from
    /// the answer. The upstream's clock started no earlier, so a reported expiry never outlasts
    /// the token, however slow the answer or however long this process was paused (§8.1 I10).
    #[serde(skip, default = "SystemTime::now")]
    pub counted_from: SystemTime,
    /// The HTTP status of the upstream answer that carried this token (`None` once it went
    /// through Redis). Only a call whose answer came from the upstream reports it.
    #[serde(skip)]
    pub upstream_status: Option<u16>,
}

/// Accepts a whole number of seconds as a JSON number or a numeric string (both occur).
fn seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seconds<'a> {
        Number(u64),
        Float(f64),
        Text(Cow<'a, str>),
        Null(()),
    }
    // Any size is a lifetime: the broker clamps what it keeps and serves (contract §8.1 I3),
    // and refusing the body would waste a one-time credential the upstream already spent.
    let whole = |f: f64| {
        if f.is_finite() && f > 0.0 {
            f as u64
        } else {
            0
        }
    };
    match Seconds::deserialize(deserializer)? {
        Seconds::Number(n) => Ok(Some(n)),
        Seconds::Float(f) => Ok(Some(whole(f))),
        Seconds::Text(text) => {
            let text = text.trim();
            match text.parse::<u64>() {
                Ok(n) => Ok(Some(n)),
                Err(_) => text
                    .parse::<f64>()
                    .ok()
                    .filter(|f| !f.is_nan())
                    .map(|f| Some(whole(f)))
                    .ok_or_else(|| serde::de::Error::custom("not a number of seconds")),
            }
        }
        Seconds::Null(()) => Ok(None),
    }
}

/// An OAuth error as the upstream reported it, scrubbed of any secret we sent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OAuthError {
    /// RFC 6749 `error`, e.g. `invalid_grant`.
    pub error: Option<String>,
    pub description: Option<String>,
    /// RingCentral `errors[0].errorCode`, e.g. `OAU-140`.
    pub error_code: Option<String>,
}

/// What went wrong upstream, with what the upstream told us about it.
#[derive(Clone, Debug)]
pub struct UpstreamError {
    pub kind: UpstreamErrorKind,
    pub http_status: Option<u16>,
    /// RingCentral's `RCRequestId` header.
    pub request_id: Option<String>,
    pub retry_after: Option<Duration>,
    /// Boxed: most failures carry none, and it keeps `Result`s small.
    pub oauth: Option<Box<OAuthError>>,
    /// The request never reached the upstream (the connection failed), so it may be re-sent.
    pub not_sent: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// A 4xx (or 2xx) carrying an OAuth error in `oauth`.
    OAuth,
    /// HTTP 429.
    RateLimited,
    /// HTTP 5xx, or the connection failed; the detail is for logs.
    Unavailable(String),
    /// No answer within `request_timeout`.
    Timeout,
    /// A body that is neither a token nor an OAuth error; the detail says which.
    BadResponse(&'static str),
    /// The caller's deadline ran out before the upstream answered.
    DeadlineExceeded,
    /// Not sent: a 429 penalty for this client (or user) is in force for this long yet.
    Held(Duration),
    /// Not sent: the fleet lease this call was made under ran out, so another replica may
    /// be sending the same request. The broker starts over; no caller is answered with it.
    LeaseLost,
}

impl UpstreamError {
    fn new(kind: UpstreamErrorKind) -> Self {
        Self {
            kind,
            http_status: None,
            request_id: None,
            retry_after: None,
            oauth: None,
            not_sent: false,
        }
    }
}

/// A response whose body was read within the cap.
struct Reply {
    status: StatusCode,
    request_id: Option<String>,
    retry_after: Option<Duration>,
    body: Vec<u8>,
    /// When the request went out.
    sent_at: SystemTime,
}

impl Reply {
    fn error(&self, kind: UpstreamErrorKind, oauth: Option<OAuthError>) -> UpstreamError {
        UpstreamError {
            kind,
            http_status: Some(self.status.as_u16()),
            request_id: self.request_id.clone(),
            retry_after: self.retry_after,
            oauth: oauth.map(Box::new),
            not_sent: false,
        }
    }
}

/// Why the upstream client cannot be built (config validation refuses most of it first).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("upstream.base_url: {0}")]
    BaseUrl(crate::config::UrlError),
    #[error("upstream path {path:?}: {source}")]
    Path {
        path: String,
        source: crate::config::UrlError,
    },
    #[error(transparent)]
    CaFile(#[from] crate::config::CaFileError),
    #[error("cannot build the HTTP client: {0}")]
    Client(reqwest::Error),
}

impl Upstream {
    pub fn new(
        config: &UpstreamConfig,
        metrics: std::sync::Arc<Metrics>,
    ) -> Result<Self, BuildError> {
        let base = Url::parse(&config.base_url).map_err(BuildError::BaseUrl)?;
        let join = |path: &str| {
            base.join(path).map_err(|source| BuildError::Path {
                path: path.to_owned(),
                source,
            })
        };
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(USER_AGENT, HeaderValue::from_static(AGENT));
        headers.insert("x-user-agent", HeaderValue::from_static(AGENT));
        // webpki's roots, not the host's: the same trust everywhere, distroless included.
        let mut roots: Vec<reqwest::Certificate> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .filter_map(|der| reqwest::Certificate::from_der(der).ok())
            .collect();
        if let Some(path) = &config.ca_file {
            roots.extend(crate::config::load_ca_file(path)?);
        }
        let http = reqwest::Client::builder()
            .tls_certs_only(roots)
            .https_only(!config.allow_insecure_http)
            .default_headers(headers)
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(config.max_connections)
            // A token endpoint that redirects is misconfigured; never re-send credentials.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(BuildError::Client)?;
        Ok(Self {
            http,
            token_url: join(&config.token_path)?,
            revoke_url: join(&config.revoke_path)?,
            request_timeout: config.request_timeout,
            connections: std::sync::Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
            budget: std::sync::Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
            metrics,
        })
    }

    pub fn token_url(&self) -> &Url {
        &self.token_url
    }

    /// Exchanges a grant for a token.
    pub async fn token(
        &self,
        request: &Outgoing<'_>,
        deadline: Option<Instant>,
    ) -> Result<Token, UpstreamError> {
        let reply = self
            .post(Endpoint::Token, &self.token_url, request, deadline)
            .await?;
        decode_token(&reply, request)
    }

    /// Revokes a token; any 2xx is success.
    pub async fn revoke(
        &self,
        request: &Outgoing<'_>,
        deadline: Option<Instant>,
    ) -> Result<(), UpstreamError> {
        let reply = self
            .post(Endpoint::Revoke, &self.revoke_url, request, deadline)
            .await?;
        if reply.status.is_success() {
            return Ok(());
        }
        Err(decode_failure(&reply, request))
    }

    /// Sends the form and reads the reply. The waits before a send (a penalty's patience, a
    /// free connection) spend the call's budget, min(caller's deadline, request_timeout); a
    /// send that goes out then has that much again of its own. A request that left late is
    /// not abandoned early: an abandoned one-time credential is spent with nobody to keep its
    /// answer (§8.1 I1).
    async fn post(
        &self,
        endpoint: Endpoint,
        url: &Url,
        request: &Outgoing<'_>,
        deadline: Option<Instant>,
    ) -> Result<Reply, UpstreamError> {
        let bound = |from: Instant| match deadline {
            Some(caller) if caller < from + self.request_timeout => (caller, true),
            _ => (from + self.request_timeout, false),
        };
        let (until, callers) = bound(Instant::now());
        let expired = |callers: bool| {
            UpstreamError::new(if callers {
                UpstreamErrorKind::DeadlineExceeded
            } else {
                UpstreamErrorKind::Timeout
            })
        };
        // `timeout_at` polls its future once even when already expired; send nothing then.
        if callers && until <= Instant::now() {
            return Err(UpstreamError::new(UpstreamErrorKind::DeadlineExceeded));
        }
        self.budget.deposit();
        let body = request.body();
        let first_sent = Instant::now();
        let mut attempt = 1;
        // Why this attempt is a retry; counted only once it is really sent.
        let mut retry: Option<RetryCause> = None;
        loop {
            if request.lease.is_some_and(|lease| !lease.holds()) {
                return Err(UpstreamError {
                    not_sent: true,
                    ..UpstreamError::new(UpstreamErrorKind::LeaseLost)
                });
            }
            if let Some(penalty) = request.penalty {
                // Asked before every attempt: another replica's 429 may have landed since.
                // The check spends the call's own time, like waiting for a connection.
                let held = match tokio::time::timeout_at(until, penalty.remaining()).await {
                    Ok(held) => held.map(UpstreamErrorKind::Held).map(UpstreamError::new),
                    Err(_elapsed) => Some(expired(callers)),
                };
                if let Some(error) = held {
                    return Err(UpstreamError {
                        not_sent: true,
                        ..error
                    });
                }
            }
            if let Some(cause) = retry.take() {
                self.metrics.upstream_retry(cause);
            }
            let mut builder = self
                .http
                .post(url.clone())
                .header(CONTENT_TYPE, FORM_CONTENT_TYPE)
                .body(body.clone());
            if let Some((client_id, secret)) = request.basic {
                builder = builder.basic_auth(client_id, Some(secret.expose_secret()));
            }
            // Waiting for a connection spends the call's budget; nothing has been sent yet.
            let Ok(_permit) = tokio::time::timeout_at(until, self.connections.acquire()).await
            else {
                return Err(UpstreamError {
                    not_sent: true,
                    ..expired(callers)
                });
            };
            let span = attempt_span(url, attempt);
            let sent = Instant::now();
            let (attempt_until, callers_bound) = bound(sent);
            let result = match tokio::time::timeout_at(attempt_until, send(builder))
                .instrument(span.clone())
                .await
            {
                Ok(result) => result,
                Err(_elapsed) => Err(expired(callers_bound)),
            };
            record_attempt(&span, &result);
            self.metrics
                .upstream_request(endpoint, status_of(&result), sent.elapsed());
            if let (Ok(reply), Some(penalty)) = (&result, request.penalty)
                && reply.status == StatusCode::TOO_MANY_REQUESTS
            {
                // Awaited: the penalty is shared before this loop retries or answers.
                penalty
                    .penalise(reply.retry_after.unwrap_or(RATE_LIMIT_WAIT))
                    .await;
            }
            let Some(wait) = retry_wait(&result, request.replay, attempt, first_sent) else {
                return result;
            };
            if attempt >= MAX_ATTEMPTS || Instant::now() + wait >= until || !self.budget.withdraw()
            {
                return result;
            }
            tracing::debug!(
                attempt,
                wait_ms = wait.as_millis(),
                "sending the request again"
            );
            retry = retry_cause(&result);
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

/// What made [`retry_wait`] allow another attempt, as `tokengate_upstream_retries_total`
/// says it.
fn retry_cause(result: &Result<Reply, UpstreamError>) -> Option<RetryCause> {
    match result {
        Err(error) if error.not_sent => Some(RetryCause::Connect),
        Ok(reply) if reply.status == StatusCode::TOO_MANY_REQUESTS => Some(RetryCause::RateLimited),
        Ok(reply) if reply.status == StatusCode::SERVICE_UNAVAILABLE => {
            Some(RetryCause::Unavailable)
        }
        _ => None,
    }
}

/// The trace span of one attempt, a child of the call's span (OpenTelemetry's HTTP client
/// conventions). It holds the method and where the request went (never the body or
/// headers, which carry the credentials); [`record_attempt`] adds how it ended.
fn attempt_span(url: &Url, attempt: u32) -> tracing::Span {
    // DEBUG: traced always (see `telemetry::traces`), logged only when asked for, so an
    // INFO log spends nothing on it.
    let span = tracing::debug_span!(
        "POST",
        otel.kind = "client",
        http.request.method = "POST",
        server.address = url.host_str().unwrap_or_default(),
        // As i64: OpenTelemetry has no unsigned integers, and would export a u16 as text.
        server.port = i64::from(url.port_or_known_default().unwrap_or_default()),
        url.path = url.path(),
    );
    if attempt > 1 {
        span.set_attribute("http.request.resend_count", i64::from(attempt - 1));
    }
    span
}

/// Puts how an attempt ended on its trace span: the status, RingCentral's `RCRequestId`,
/// and for a failure its type. Trace attributes only: as log fields they would cost every
/// attempt a re-formatting of the span's fields.
fn record_attempt(span: &tracing::Span, result: &Result<Reply, UpstreamError>) {
    let (status, request_id) = match result {
        Ok(reply) => (Some(reply.status.as_u16()), reply.request_id.as_deref()),
        Err(error) => (error.http_status, error.request_id.as_deref()),
    };
    if let Some(status) = status {
        span.set_attribute("http.response.status_code", i64::from(status));
    }
    if let Some(request_id) = request_id {
        span.set_attribute("http.response.header.rcrequestid", request_id.to_owned());
    }
    let failed = match result {
        // As the conventions say for a client: any 4xx or 5xx is an error.
        Ok(reply) if reply.status.as_u16() >= 400 => Some(status_of(result).as_str()),
        Ok(_) => None,
        Err(_) => Some(status_of(result).as_str()),
    };
    if let Some(error_type) = failed {
        span.set_attribute("error.type", error_type);
        span.set_status(opentelemetry::trace::Status::error(error_type));
    }
}

/// How one attempt ended, as `tokengate_upstream_requests_total{status}` says it.
fn status_of(result: &Result<Reply, UpstreamError>) -> UpstreamStatus {
    match result {
        Ok(reply) => UpstreamStatus::Http(reply.status.as_u16()),
        Err(error) => match (&error.kind, error.http_status) {
            (_, Some(status)) => UpstreamStatus::Http(status),
            (UpstreamErrorKind::Timeout, None) => UpstreamStatus::Timeout,
            (UpstreamErrorKind::DeadlineExceeded, None) => UpstreamStatus::Deadline,
            (_, None) => UpstreamStatus::Error,
        },
    }
}

/// How long to wait before sending again, when the outcome allows another attempt.
fn retry_wait(
    result: &Result<Reply, UpstreamError>,
    replay: Replay,
    attempt: u32,
    first_sent: Instant,
) -> Option<Duration> {
    if replay == Replay::Never {
        return None;
    }
    match result {
        // Nothing reached the upstream, so sending again is safe for any replayable grant.
        Err(error) if error.not_sent => {
            let ceiling = CONNECT_BACKOFF.saturating_mul(1 << (attempt - 1).min(8));
            Some(Duration::from_millis(fastrand::u64(
                0..=ceiling.as_millis() as u64,
            )))
        }
        Ok(reply) if matches!(reply.status.as_u16(), 429 | 503) => {
            let wait = reply.retry_after?;
            match replay {
                Replay::Within(window) if first_sent.elapsed() + wait >= window => None,
                _ => Some(wait),
            }
        }
        _ => None,
    }
}

async fn send(builder: reqwest::RequestBuilder) -> Result<Reply, UpstreamError> {
    let sent_at = SystemTime::now();
    let mut response = builder.send().await.map_err(|e| {
        if answered_with_garbage(&e) {
            // It was reached and answered, but not in HTTP: a bad response, not an outage.
            return UpstreamError::new(UpstreamErrorKind::BadResponse("a reply that is not HTTP"));
        }
        UpstreamError {
            // A failed connect means the request never left; anything later may have.
            not_sent: e.is_connect(),
            ..unavailable(None, &e)
        }
    })?;
    let status = response.status();
    let headers = response.headers();
    let request_id = headers
        .get("rcrequestid")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let retry_after = headers.get(RETRY_AFTER).and_then(parse_retry_after);
    let too_big = |status: StatusCode, request_id: Option<String>| UpstreamError {
        request_id,
        http_status: Some(status.as_u16()),
        ..UpstreamError::new(UpstreamErrorKind::BadResponse(
            "the response body is larger than 1 MiB",
        ))
    };
    if response
        .content_length()
        .is_some_and(|len| len > MAX_BODY_BYTES as u64)
    {
        return Err(too_big(status, request_id));
    }
    let mut body = Vec::with_capacity(response.content_length().map_or(1024, |len| len as usize));
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() > MAX_BODY_BYTES => {
                return Err(too_big(status, request_id));
            }
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => break,
            Err(e) => {
                return Err(UpstreamError {
                    request_id,
                    ..unavailable(Some(status), &e)
                });
            }
        }
    }
    Ok(Reply {
        status,
        request_id,
        retry_after,
        body,
        sent_at,
    })
}

/// Whether the upstream's reply could not be parsed as HTTP at all.
fn answered_with_garbage(error: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

fn unavailable(status: Option<StatusCode>, error: &reqwest::Error) -> UpstreamError {
    // The URL holds no secret (credentials travel in the body and headers); the cause
    // chain is for the logs only.
    let mut detail = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        detail.push_str(": ");
        detail.push_str(&cause.to_string());
        source = cause.source();
    }
    UpstreamError {
        http_status: status.map(|s| s.as_u16()),
        ..UpstreamError::new(UpstreamErrorKind::Unavailable(detail))
    }
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3), at most a day.
fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    let wait = if let Ok(seconds) = text.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let at = httpdate::parse_http_date(text).ok()?;
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

fn decode_token(reply: &Reply, request: &Outgoing<'_>) -> Result<Token, UpstreamError> {
    if !reply.status.is_success() {
        return Err(decode_failure(reply, request));
    }
    match serde_json::from_slice::<Token>(&reply.body) {
        Ok(token)
            if token
                .access_token
                .as_ref()
                .is_some_and(|t| !t.expose_secret().is_empty()) =>
        {
            Ok(Token {
                counted_from: reply.sent_at,
                upstream_status: Some(reply.status.as_u16()),
                ..token
            })
        }
        // Some servers answer 200 with an OAuth error body.
        Ok(_) => Err(match oauth_error(&reply.body, request) {
            Some(oauth) => reply.error(UpstreamErrorKind::OAuth, Some(oauth)),
            None => reply.error(
                UpstreamErrorKind::BadResponse("a 2xx response without access_token"),
                None,
            ),
        }),
        Err(_) => Err(reply.error(
            UpstreamErrorKind::BadResponse("a 2xx response that is not a JSON token"),
            None,
        )),
    }
}

/// Classifies a non-2xx reply: rate limit and server errors by status, OAuth errors by body.
fn decode_failure(reply: &Reply, request: &Outgoing<'_>) -> UpstreamError {
    let oauth = oauth_error(&reply.body, request);
    let status = reply.status;
    if status == StatusCode::TOO_MANY_REQUESTS {
        reply.error(UpstreamErrorKind::RateLimited, oauth)
    } else if status.is_server_error() {
        let detail = format!("HTTP {status}");
        reply.error(UpstreamErrorKind::Unavailable(detail), oauth)
    } else if oauth.is_some() {
        reply.error(UpstreamErrorKind::OAuth, oauth)
    } else {
        reply.error(
            UpstreamErrorKind::BadResponse("an error status without an OAuth error body"),
            None,
        )
    }
}

/// The OAuth error in a body, if it is one: `error` (RFC 6749 §5.2) and/or RingCentral's
/// `errors[].errorCode`. Read field by field, so a missing, null or oddly typed field never
/// hides the others.
fn oauth_error(body: &[u8], request: &Outgoing<'_>) -> Option<OAuthError> {
    let body: serde_json::Value = serde_json::from_slice(body).ok()?;
    let body = body.as_object()?;
    let first = body
        .get("errors")
        .and_then(serde_json::Value::as_array)
        .and_then(|errors| errors.first())
        .and_then(serde_json::Value::as_object);
    let text = |object: Option<&serde_json::Map<String, serde_json::Value>>, key: &str| {
        let value = object?.get(key)?.as_str()?;
        (!value.trim().is_empty()).then(|| value.to_owned())
    };
    let error = text(Some(body), "error");
    let error_code = text(first, "errorCode").or_else(|| text(Some(body), "errorCode"));
    if error.is_none() && error_code.is_none() {
        return None;
    }
    let description = text(Some(body), "error_description")
        .or_else(|| text(first, "message"))
        .or_else(|| text(Some(body), "message"));
    let secrets = request.secrets();
    let scrub = |text: Option<String>| text.map(|t| scrub(t, &secrets));
    Some(OAuthError {
        error: scrub(error),
        description: scrub(description),
        error_code: scrub(error_code),
    })
}

/// Replaces every stretch of `text` covered by an occurrence of a secret (overlaps merged)
/// with one `[REDACTED]`, so no part of any secret survives.
fn scrub(text: String, secrets: &[String]) -> String {
    let mut ranges = Vec::new();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        let step = secret.chars().next().map_or(1, char::len_utf8);
        let mut from = 0;
        while let Some(at) = text[from..].find(secret.as_str()) {
            let start = from + at;
            ranges.push((start, start + secret.len()));
            from = start + step;
        }
    }
    if ranges.is_empty() {
        return text;
    }
    ranges.sort_unstable();
    let mut out = String::with_capacity(text.len());
    let mut written = 0;
    let mut current = ranges[0];
    for &(start, end) in &ranges[1..] {
        if start <= current.1 {
            current.1 = current.1.max(end);
        } else {
            out.push_str(&text[written..current.0]);
            out.push_str("[REDACTED]");
            written = current.1;
            current = (start, end);
        }
    }
    out.push_str(&text[written..current.0]);
    out.push_str("[REDACTED]");
    out.push_str(&text[current.1..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status: StatusCode::from_u16(status).unwrap(),
            request_id: None,
            retry_after: None,
            body: body.as_bytes().to_vec(),
            sent_at: SystemTime::now(),
        }
    }

    #[test]
    fn every_retry_has_a_cause() {
        let waited = |status: u16| {
            let mut reply = reply(status, "");
            reply.retry_after = Some(Duration::from_millis(1));
            Ok(reply)
        };
        let refused: Result<Reply, UpstreamError> = Err(UpstreamError {
            not_sent: true,
            ..UpstreamError::new(UpstreamErrorKind::Unavailable("refused".into()))
        });
        for (result, cause) in [
            (waited(429), Some(RetryCause::RateLimited)),
            (waited(503), Some(RetryCause::Unavailable)),
            (refused, Some(RetryCause::Connect)),
            (waited(500), None),
            (waited(200), None),
        ] {
            let retried = retry_wait(&result, Replay::Always, 1, Instant::now()).is_some();
            assert_eq!(retried, cause.is_some(), "{cause:?}");
            assert_eq!(retry_cause(&result), cause);
        }
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        assert_eq!(
            parse_retry_after(&HeaderValue::from_static("42")),
            Some(Duration::from_secs(42))
        );
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let parsed = parse_retry_after(&HeaderValue::from_str(&later).unwrap()).unwrap();
        assert!(
            parsed > Duration::from_secs(110) && parsed <= Duration::from_secs(120),
            "{parsed:?}"
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon")), None);
    }

    #[test]
    fn echoed_secrets_are_scrubbed_from_oauth_errors() {
        let secret = SecretString::from("pa55-word");
        let request = Outgoing {
            penalty: None,
            lease: None,
            fields: vec![FormField::secret("password", &secret)],
            basic: None,
            replay: Replay::Always,
        };
        let body = r#"{"error":"invalid_grant","error_description":"password pa55-word is wrong"}"#;
        let error = decode_failure(&reply(400, body), &request);
        assert_eq!(error.kind, UpstreamErrorKind::OAuth);
        assert_eq!(
            error.oauth.unwrap().description.as_deref(),
            Some("password [REDACTED] is wrong")
        );
    }

    #[test]
    fn numeric_strings_are_accepted_as_seconds() {
        let request = Outgoing {
            penalty: None,
            lease: None,
            fields: vec![],
            basic: None,
            replay: Replay::Always,
        };
        let token = decode_token(
            &reply(200, r#"{"access_token":"a","expires_in":"3600","x":[1]}"#),
            &request,
        )
        .unwrap();
        assert_eq!(token.expires_in, Some(3600));
        let error = decode_token(
            &reply(200, r#"{"access_token":"a","expires_in":"soon"}"#),
            &request,
        )
        .unwrap_err();
        assert!(matches!(error.kind, UpstreamErrorKind::BadResponse(_)));
    }

    /// A lifetime of any size is a token, never a wasted one-time credential (I3).
    #[test]
    fn absurd_lifetimes_are_tokens() {
        let request = Outgoing {
            penalty: None,
            lease: None,
            fields: vec![],
            basic: None,
            replay: Replay::Always,
        };
        for (lifetime, seconds) in [
            ("9.3e18", 9_300_000_000_000_000_000),
            ("18446744073709551615", u64::MAX),
            ("1e300", u64::MAX),
            ("\"1e300\"", u64::MAX),
            ("36.6", 36),
            ("-5", 0),
        ] {
            let body = format!(
                r#"{{"access_token":"a","expires_in":{lifetime},"refresh_token_expires_in":{lifetime}}}"#
            );
            let token = decode_token(&reply(200, &body), &request).unwrap();
            assert_eq!(token.expires_in, Some(seconds), "{lifetime}");
            assert_eq!(token.refresh_token_expires_in, Some(seconds), "{lifetime}");
        }
    }
}

#[cfg(test)]
mod proptests;
