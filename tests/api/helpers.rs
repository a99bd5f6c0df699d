//! Starting a real tokengate against a wiremock upstream, and reading what came back.

use std::net::SocketAddr;
use std::sync::LazyLock;

use base64::Engine as _;
use tokengate::proto::get_token_request::Grant;
use tokengate::proto::token_service_client::TokenServiceClient;
use tokengate::proto::{GetTokenRequest, PasswordGrant};
use tokengate::startup::StartupError;
use tokengate::{Application, Config, Drain};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::KeyAndValueRef;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::{BadRequest, ErrorInfo, RetryInfo, StatusExt as _};
use wiremock::MockServer;

/// Logs go to stdout only when `TEST_LOG` is set; the subscriber is installed once.
static TRACING: LazyLock<()> = LazyLock::new(|| {
    if std::env::var_os("TEST_LOG").is_some() {
        // Kept for the life of the test process: dropping it would stop the log thread.
        std::mem::forget(tokengate::telemetry::init(
            tokengate::telemetry::LogFormat::Text,
        ));
    }
});

/// The token and revocation endpoint paths (the contract's default `token_path` and
/// `revoke_path`), shared with the other suites.
pub use testkit::{REVOKE_PATH, TOKEN_PATH};

/// `client_secret_basic`, the default client.
pub const APP_A: &str = "app-a";
pub const APP_A_SECRET: &str = "secret-a-7f3k";
/// `client_secret_post`.
pub const APP_POST: &str = "app-post";
pub const APP_POST_SECRET: &str = "secret-post-9q";
/// `auth_method = "none"`.
pub const APP_PUBLIC: &str = "app-public";
/// `client_secret_basic`, `allowed_grants = ["refresh_token"]`.
pub const APP_LIMITED: &str = "app-limited";
pub const APP_LIMITED_SECRET: &str = "secret-l-55";

/// What the `User-Agent` and `X-User-Agent` headers must say.
pub const AGENT: &str = concat!("tokengate/", env!("CARGO_PKG_VERSION"));

/// The `ErrorInfo.domain` of every tokengate error.
pub const DOMAIN: &str = "tokengate";

/// Every configured client secret, in plain and in Basic-encoded form.
pub fn config_secrets() -> Vec<String> {
    vec![
        APP_A_SECRET.to_owned(),
        APP_POST_SECRET.to_owned(),
        APP_LIMITED_SECRET.to_owned(),
        basic(APP_A, APP_A_SECRET),
        basic(APP_POST, APP_POST_SECRET),
        basic(APP_LIMITED, APP_LIMITED_SECRET),
    ]
}

/// `base64(client_id:secret)`, as it appears after `Basic `.
pub fn basic(client_id: &str, secret: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{client_id}:{secret}"))
}

/// How to configure one test server.
pub struct AppSpec {
    allow_public: bool,
    server_extra: String,
    upstream_extra: String,
    base_url: Option<String>,
    clients_extra: String,
}

impl Default for AppSpec {
    fn default() -> Self {
        Self {
            allow_public: true,
            server_extra: String::new(),
            upstream_extra: String::new(),
            base_url: None,
            clients_extra: String::new(),
        }
    }
}

impl AppSpec {
    /// `clients.allow_public`.
    pub fn allow_public(mut self, allow: bool) -> Self {
        self.allow_public = allow;
        self
    }

    /// Extra lines for the `[server]` section, e.g. `max_concurrent_calls = 1`.
    pub fn server(mut self, toml_lines: &str) -> Self {
        self.server_extra = toml_lines.to_owned();
        self
    }

    /// Extra lines for the `[upstream]` section, e.g. `request_timeout = "300ms"`.
    pub fn upstream(mut self, toml_lines: &str) -> Self {
        self.upstream_extra = toml_lines.to_owned();
        self
    }

    /// More `[[clients.registered]]` entries, as TOML.
    pub fn clients(mut self, toml: &str) -> Self {
        self.clients_extra = toml.to_owned();
        self
    }

    /// Points the server somewhere other than the mock (the mock still starts).
    pub fn base_url(mut self, url: impl Into<String>) -> Self {
        self.base_url = Some(url.into());
        self
    }

    pub async fn spawn(self) -> TestApp {
        LazyLock::force(&TRACING);
        // A fresh (unpooled) upstream per test, so that a delayed reply from one test can
        // never reach another.
        let upstream = MockServer::builder().start().await;
        let base_url = self.base_url.unwrap_or_else(|| upstream.uri());
        let toml = format!(
            r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_period = "5s"
{server_extra}

[upstream]
base_url = "{base_url}"
allow_insecure_http = true
{upstream_extra}

[clients]
allow_public = {allow_public}

[[clients.registered]]
client_id = "{APP_A}"
client_secret = "{APP_A_SECRET}"
auth_method = "client_secret_basic"
default = true

[[clients.registered]]
client_id = "{APP_POST}"
client_secret = "{APP_POST_SECRET}"
auth_method = "client_secret_post"

[[clients.registered]]
client_id = "{APP_PUBLIC}"
auth_method = "none"

[[clients.registered]]
client_id = "{APP_LIMITED}"
client_secret = "{APP_LIMITED_SECRET}"
allowed_grants = ["refresh_token"]

{clients_extra}
"#,
            clients_extra = self.clients_extra,
            server_extra = self.server_extra,
            upstream_extra = self.upstream_extra,
            allow_public = self.allow_public,
        );
        let config = Config::from_toml(&toml)
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
        let app = Application::build(&config)
            .await
            .expect("the server starts");
        let addr = app.local_addr();
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            // A dropped sender (the TestApp going away) stops the server too.
            let _ = stop.await;
        }));
        let client = TokenServiceClient::connect(format!("http://{addr}"))
            .await
            .expect("the listener is bound when build() returns");
        TestApp {
            client,
            upstream,
            addr,
            shutdown: Some(shutdown),
            server,
        }
    }
}

/// A running tokengate, its gRPC client and its mock upstream.
pub struct TestApp {
    pub client: TokenServiceClient<Channel>,
    pub upstream: MockServer,
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<Drain, StartupError>>,
}

impl TestApp {
    /// A plain channel to the server, for the health and reflection clients.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("a valid URI")
            .connect()
            .await
            .expect("the server accepts connections")
    }

    /// Every request the upstream received.
    pub async fn upstream_requests(&self) -> Vec<wiremock::Request> {
        self.upstream
            .received_requests()
            .await
            .expect("request recording is on")
    }

    /// Resolves the shutdown future and waits for `run_until_stopped` to return.
    pub async fn stop(mut self) -> Result<Drain, StartupError> {
        drop(self.client);
        if let Some(shutdown) = self.shutdown.take() {
            shutdown
                .send(())
                .expect("the server is still waiting for its shutdown signal");
        }
        (&mut self.server)
            .await
            .expect("the server task does not panic")
    }
}

/// Starts a server with the standard clients, `allow_public = true`, and `upstream_extra`
/// appended to the `[upstream]` section.
pub async fn spawn_app(upstream_extra: &str) -> TestApp {
    AppSpec::default().upstream(upstream_extra).spawn().await
}

/// A password grant request for `client_id` (empty = the default client).
pub fn password_request(client_id: &str, username: &str, password: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::Password(PasswordGrant {
            username: username.to_owned(),
            password: password.to_owned(),
            ..Default::default()
        })),
        client_id: client_id.to_owned(),
        ..Default::default()
    }
}

/// The rich error details of a status.
pub struct Details {
    pub error_info: Option<ErrorInfo>,
    pub retry_info: Option<RetryInfo>,
    pub bad_request: Option<BadRequest>,
}

pub fn details(status: &Status) -> Details {
    let details = status.get_error_details();
    Details {
        error_info: details.error_info().cloned(),
        retry_info: details.retry_info().cloned(),
        bad_request: details.bad_request().cloned(),
    }
}

/// Asserts the code, the domain and the reason, and returns the ErrorInfo.
#[track_caller]
pub fn assert_error(status: &Status, code: Code, reason: &str) -> ErrorInfo {
    assert_eq!(status.code(), code, "unexpected code; status: {status:?}");
    let info = details(status)
        .error_info
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, DOMAIN, "ErrorInfo.domain; status: {status:?}");
    assert_eq!(info.reason, reason, "ErrorInfo.reason; status: {status:?}");
    info
}

/// The suggested wait, asserting that RetryInfo is present.
#[track_caller]
pub fn retry_delay(status: &Status) -> std::time::Duration {
    details(status)
        .retry_info
        .unwrap_or_else(|| panic!("no RetryInfo in {status:?}"))
        .retry_delay
        .unwrap_or_else(|| panic!("RetryInfo without a delay in {status:?}"))
}

#[track_caller]
pub fn assert_no_retry_info(status: &Status) {
    let retry = details(status).retry_info;
    assert!(
        retry.is_none(),
        "unexpected RetryInfo {retry:?} in {status:?}"
    );
}

/// The field names of the BadRequest violations, in order.
#[track_caller]
pub fn bad_request_fields(status: &Status) -> Vec<String> {
    let bad = details(status)
        .bad_request
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    bad.field_violations.into_iter().map(|v| v.field).collect()
}

/// Asserts that no secret appears in the message, the encoded details or the metadata.
#[track_caller]
pub fn assert_no_secrets<S: AsRef<str>>(status: &Status, secrets: &[S]) {
    let message = status.message();
    let details = status.details();
    let metadata: Vec<(String, Vec<u8>)> = status
        .metadata()
        .iter()
        .map(|entry| match entry {
            KeyAndValueRef::Ascii(key, value) => (key.to_string(), value.as_bytes().to_vec()),
            KeyAndValueRef::Binary(key, value) => {
                let bytes = value
                    .to_bytes()
                    .map(|b| b.to_vec())
                    .unwrap_or_else(|_| value.as_encoded_bytes().to_vec());
                (key.to_string(), bytes)
            }
        })
        .collect();
    for secret in secrets {
        let secret = secret.as_ref();
        assert!(!secret.is_empty(), "an empty secret cannot be checked");
        assert!(
            !message.contains(secret),
            "secret {secret:?} in the status message {message:?}"
        );
        assert!(
            !contains(details, secret.as_bytes()),
            "secret {secret:?} in the error details of {status:?}"
        );
        for (key, value) in &metadata {
            assert!(
                !contains(value, secret.as_bytes()),
                "secret {secret:?} in metadata {key}: {value:?}"
            );
            assert!(
                !key.contains(secret),
                "secret {secret:?} in a metadata key {key}"
            );
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// The decoded form body of an upstream request, pairs in order.
pub fn form(request: &wiremock::Request) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(&request.body).expect("the upstream body is form-encoded")
}

/// Owned pairs from borrowed ones, for comparing with [`form`].
pub fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// One header of an upstream request, as text; `None` when absent.
pub fn header(request: &wiremock::Request, name: &str) -> Option<String> {
    let mut values = request.headers.get_all(name).iter();
    let first = values.next()?;
    assert!(
        values.next().is_none(),
        "header {name} was sent more than once"
    );
    Some(first.to_str().expect("header is text").to_owned())
}

/// Asserts the headers every upstream call carries: form content type, JSON accept, agents.
#[track_caller]
pub fn assert_common_headers(request: &wiremock::Request) {
    assert_eq!(
        header(request, "content-type").as_deref(),
        Some("application/x-www-form-urlencoded")
    );
    assert_eq!(
        header(request, "accept").as_deref(),
        Some("application/json")
    );
    assert_eq!(header(request, "user-agent").as_deref(), Some(AGENT));
    assert_eq!(header(request, "x-user-agent").as_deref(), Some(AGENT));
}

/// One unary GetToken over HTTP/2 carrying `grpc-timeout`, with no client-side timer, so
/// the status is the server's own (a tonic client runs its own deadline timer and reports its expiry as CANCELLED).
pub async fn raw_get_token(app: &TestApp, grpc_timeout: &str, request: &GetTokenRequest) -> Status {
    let message = prost::Message::encode_to_vec(request);
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(
        &u32::try_from(message.len())
            .expect("small message")
            .to_be_bytes(),
    );
    body.extend_from_slice(&message);
    let http = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("an HTTP/2 client");
    let response = http
        .post(format!(
            "http://{}/tokengate.v1.TokenService/GetToken",
            app.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", grpc_timeout)
        .body(body)
        .send()
        .await
        .expect("the server answers over HTTP/2");
    assert_eq!(response.status(), 200, "gRPC always answers HTTP 200");
    Status::from_header_map(response.headers())
        .unwrap_or_else(|| panic!("no trailers-only grpc-status in {:?}", response.headers()))
}
