//! The metrics suite (contract §9, README "Operate it"): the real binary with
//! `server.metrics_listen`, a counting upstream, and Debian's `prometheus` and `promtool`
//! (testkit), all started per test.
//!
//! - the exposition passes `promtool check metrics` (Prometheus text) and is OpenMetrics when
//!   asked for;
//! - a real Prometheus scrapes tokengate every second under known traffic, and the series it
//!   stored hold exactly what that traffic must produce;
//! - hundreds of distinct users and public client ids add no series, and no caller-chosen
//!   client id reaches a log line;
//! - without `metrics_listen` nothing listens;
//! - upstream retries are counted by cause (a misbehaving upstream, through Prometheus);
//! - the TLS expiry gauge is the served certificate's notAfter, and follows a reload;
//! - signing-key reloads are counted by result as key files are replaced.
//!
//! Waits are on log lines and on a scrape that began after the traffic, never on a sleep.

mod dashboard;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use testkit::{
    CountingUpstream, FaultyUpstream, Mode, Prometheus, Tokengate, http_get, message,
    promtool_check_metrics,
};
use tokengate::proto::get_token_request::Grant;
use tokengate::proto::token_service_client::TokenServiceClient;
use tokengate::proto::{
    ClientCredentialsGrant, GetTokenRequest, GetTokenResponse, JwtBearerGrant, PasswordGrant,
    TokenSource,
};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// The registered client; every other client id is a public client.
const APP: &str = "app";

fn config(upstream: &CountingUpstream, metrics: bool) -> String {
    config_for(&upstream.url(), metrics, "")
}

/// The config of [`config`] for any upstream, with `more` (clients, `[server.tls]`) at the end.
fn config_for(upstream: &str, metrics: bool, more: &str) -> String {
    let metrics_listen = if metrics {
        r#"metrics_listen = "127.0.0.1:0""#
    } else {
        ""
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
# Served only with TLS; port 0, so tests that run at once never race for the default 50052.
health_listen = "127.0.0.1:0"
{metrics_listen}
shutdown_grace_period = "2s"

[upstream]
base_url = "{upstream}"
allow_insecure_http = true

[clients]
allow_public = true

[[clients.registered]]
client_id = "{APP}"
client_secret = "app-secret"
{more}
"#
    )
}

/// A tokengate with metrics on, its upstream, a client and the `/metrics` address.
struct Setup {
    upstream: CountingUpstream,
    served: Tokengate,
    client: TokenServiceClient<Channel>,
    metrics: SocketAddr,
}

/// The `/metrics` address the process logged.
async fn metrics_addr(served: &Tokengate) -> SocketAddr {
    let event = served
        .wait_for(|e| message(e) == Some("serving metrics"))
        .await;
    event["fields"]["addr"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("a metrics line without addr: {event}"))
}

/// `/metrics` of `addr` as Prometheus text, which promtool accepts.
fn scrape_linted(addr: SocketAddr) -> String {
    let reply = http_get(addr, "/metrics", &[]).unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    let linted = promtool_check_metrics(&reply.body).unwrap_or_else(|e| panic!("{e}\n{reply:?}"));
    assert!(linted.trim().is_empty(), "promtool: {linted}");
    reply.body
}

/// The value of the one sample line that starts with `series` (name and labels, exactly).
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().expect("a numeric sample"))
    })
}

async fn start() -> Setup {
    let upstream = CountingUpstream::start(Duration::ZERO);
    let served = Tokengate::start(env!("CARGO_BIN_EXE_tokengate"), config(&upstream, true)).await;
    let metrics = metrics_addr(&served).await;
    let client = TokenServiceClient::connect(served.url()).await.unwrap();
    Setup {
        upstream,
        served,
        client,
        metrics,
    }
}

impl Setup {
    async fn get(&self, request: GetTokenRequest) -> Result<GetTokenResponse, Status> {
        self.client
            .clone()
            .get_token(request)
            .await
            .map(tonic::Response::into_inner)
    }

    /// `/metrics` as Prometheus text.
    fn scrape(&self) -> String {
        let reply = http_get(self.metrics, "/metrics", &[]).unwrap();
        assert_eq!(reply.status, 200, "{reply:?}");
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        reply.body
    }
}

/// Every series an exposition holds (name and labels, without the value).
fn series(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (series, _value) = line.rsplit_once(' ').expect("a sample line has a value");
            series.to_owned()
        })
        .collect()
}

fn jwt(client_id: &str, subject: &str) -> GetTokenRequest {
    use base64::Engine as _;
    let part = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
    let assertion = format!(
        "{}.{}.sig",
        part(r#"{"alg":"none"}"#),
        part(&format!(r#"{{"sub":"{subject}"}}"#))
    );
    GetTokenRequest {
        grant: Some(Grant::JwtBearer(JwtBearerGrant { assertion })),
        client_id: client_id.into(),
        ..Default::default()
    }
}

fn password(client_id: &str, username: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::Password(PasswordGrant {
            username: username.into(),
            password: "pw".into(),
            ..Default::default()
        })),
        client_id: client_id.into(),
        ..Default::default()
    }
}

fn client_credentials(client_id: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::ClientCredentials(ClientCredentialsGrant {
            subject: None,
        })),
        client_id: client_id.into(),
        ..Default::default()
    }
}

fn reason(status: &Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
}

/// The Go name of a code, as `grpc_code` carries it (only the codes this suite meets).
fn go_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::InvalidArgument => "InvalidArgument",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::Unavailable => "Unavailable",
        Code::FailedPrecondition => "FailedPrecondition",
        other => panic!("this suite does not expect {other:?}"),
    }
}

#[tokio::test]
async fn the_exposition_passes_promtool_and_speaks_openmetrics_when_asked() {
    let setup = start().await;
    setup.get(jwt(APP, "alice")).await.unwrap();
    setup
        .get(GetTokenRequest {
            client_id: APP.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();

    let text = setup.scrape();
    let linted = promtool_check_metrics(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert!(linted.trim().is_empty(), "promtool: {linted}");
    for family in [
        "tokengate_build_info{version=\"",
        "grpc_server_started_total{",
        "grpc_server_handled_total{",
        "grpc_server_handling_seconds_bucket{",
        "tokengate_token_requests_total{",
        "tokengate_upstream_requests_total{",
        "tokengate_upstream_request_duration_seconds_bucket{",
        "tokengate_upstream_retries_total{cause=\"429\"} ",
        "tokengate_upstream_retries_total{cause=\"503\"} ",
        "tokengate_upstream_retries_total{cause=\"connect\"} ",
        "tokengate_rate_limit_penalties ",
        "tokengate_rate_limit_refusals_total ",
        "tokengate_calls_in_flight ",
        "tokengate_calls_queued ",
        "tokengate_calls_shed_total ",
        "tokengate_cache_lookups_total{",
        "tokengate_cache_entries ",
        "tokengate_signing_key_reloads_total{result=\"ok\"} ",
        "tokengate_signing_key_reloads_total{result=\"error\"} ",
        "process_cpu_seconds_total ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
    ] {
        assert!(
            text.lines().any(|line| line.starts_with(family)),
            "no {family} in\n{text}"
        );
    }
    // Without TLS there is no certificate, and so no expiry series to alert on.
    assert!(
        !text.contains("tokengate_tls_certificate_expiry_timestamp_seconds"),
        "{text}"
    );

    // Prometheus' own Accept header, which asks for OpenMetrics first.
    let accept = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                  version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let reply = http_get(setup.metrics, "/metrics", &[("Accept", accept)]).unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let open = reply.body;
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(
        open.contains("# TYPE grpc_server_handled counter\n"),
        "{open}"
    );

    assert_eq!(http_get(setup.metrics, "/", &[]).unwrap().status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_stores_exactly_what_known_traffic_produced() {
    let setup = start().await;
    let prometheus = tokio::task::block_in_place(|| Prometheus::start(setup.metrics));

    // A cache miss that goes upstream, then two hits.
    let first = setup.get(jwt(APP, "alice")).await.unwrap();
    assert_eq!(first.source(), TokenSource::Upstream);
    for _ in 0..2 {
        let hit = setup.get(jwt(APP, "alice")).await.unwrap();
        assert_eq!(hit.source(), TokenSource::Cache);
    }
    // Refused locally before any lookup: no grant at all.
    let invalid = setup
        .get(GetTokenRequest {
            client_id: APP.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // The upstream answers 429 (an upstream error); the next call for the client is refused
    // locally while the penalty holds.
    setup.upstream.rate_limit_next(1, Duration::from_secs(3600));
    let limited = setup.get(client_credentials(APP)).await.unwrap_err();
    let refused = setup.get(client_credentials(APP)).await.unwrap_err();
    assert_eq!(
        setup.upstream.token_posts(),
        2,
        "{}",
        setup.upstream.summary()
    );

    let traffic_done = SystemTime::now();
    tokio::task::block_in_place(|| prometheus.wait_scraped_after(traffic_done));
    let value = |promql: &str| tokio::task::block_in_place(|| prometheus.value(promql));
    let exactly = |promql: &str, expected: f64| {
        assert_eq!(value(promql), Some(expected), "{promql}");
    };

    let get_token =
        r#"grpc_service="tokengate.v1.TokenService",grpc_method="GetToken",grpc_type="unary""#;
    exactly(&format!("grpc_server_started_total{{{get_token}}}"), 6.0);
    exactly(
        &format!("grpc_server_handling_seconds_count{{{get_token}}}"),
        6.0,
    );
    exactly(
        &format!(r#"grpc_server_handled_total{{{get_token},grpc_code="OK"}}"#),
        3.0,
    );
    let mut codes = std::collections::BTreeMap::new();
    for status in [&invalid, &limited, &refused] {
        *codes.entry(go_name(status.code())).or_insert(0.0) += 1.0;
    }
    for (code, count) in &codes {
        exactly(
            &format!(r#"grpc_server_handled_total{{{get_token},grpc_code="{code}"}}"#),
            *count,
        );
    }
    exactly(
        &format!("sum(grpc_server_handled_total{{{get_token}}})"),
        6.0,
    );

    // What each call handed to the layer.
    let token_requests = |grant: &str, reason: &str, source: &str| {
        format!(
            r#"tokengate_token_requests_total{{grant_type="{grant}",client="{APP}",reason="{reason}",source="{source}"}}"#
        )
    };
    exactly(&token_requests("jwt_bearer", "OK", "upstream"), 1.0);
    exactly(&token_requests("jwt_bearer", "OK", "cache"), 2.0);
    exactly(
        &token_requests("unspecified", &reason(&invalid), "none"),
        1.0,
    );
    if reason(&limited) == reason(&refused) {
        exactly(
            &token_requests("client_credentials", &reason(&limited), "none"),
            2.0,
        );
    } else {
        for status in [&limited, &refused] {
            exactly(
                &token_requests("client_credentials", &reason(status), "none"),
                1.0,
            );
        }
    }
    exactly("sum(tokengate_token_requests_total)", 6.0);

    // The upstream saw two token POSTs: a 200 and a 429.
    exactly(
        r#"tokengate_upstream_requests_total{endpoint="token",status="200"}"#,
        1.0,
    );
    exactly(
        r#"tokengate_upstream_requests_total{endpoint="token",status="429"}"#,
        1.0,
    );
    exactly("sum(tokengate_upstream_requests_total)", 2.0);
    exactly(
        r#"tokengate_upstream_request_duration_seconds_count{endpoint="token"}"#,
        2.0,
    );
    exactly(
        r#"tokengate_upstream_request_duration_seconds_count{endpoint="revoke"}"#,
        0.0,
    );

    // The 429's penalty holds, and it refused one request.
    exactly("tokengate_rate_limit_penalties", 1.0);
    exactly("tokengate_rate_limit_refusals_total", 1.0);
    exactly("tokengate_calls_in_flight", 0.0);
    exactly("tokengate_calls_queued", 0.0);
    exactly("tokengate_calls_shed_total", 0.0);

    // Lookups: alice's miss and two hits; both client_credentials calls missed (a 429 is
    // not kept). One entry is kept: alice's.
    exactly(r#"tokengate_cache_lookups_total{result="hit"}"#, 2.0);
    exactly(r#"tokengate_cache_lookups_total{result="miss"}"#, 3.0);
    for result in ["stale", "coalesced", "replayed"] {
        exactly(
            &format!(r#"tokengate_cache_lookups_total{{result="{result}"}}"#),
            0.0,
        );
    }
    exactly("tokengate_cache_entries", 1.0);
    assert_eq!(value("tokengate_redis_up"), None, "no Redis, no redis_up");

    exactly(
        &format!(
            r#"tokengate_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        ),
        1.0,
    );
    exactly(r#"up{job="tokengate"}"#, 1.0);
    let started = value("process_start_time_seconds").expect("process_start_time_seconds");
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now && started > now - 600.0,
        "{started} vs {now}"
    );
    assert!(value("process_resident_memory_bytes").is_some_and(|b| b > 1e6));
    assert!(value("process_open_fds").is_some_and(|n| n >= 3.0));
    // Counted in clock ticks (10 ms): a process this young may not have used one yet.
    assert!(value("process_cpu_seconds_total").is_some_and(|s| s >= 0.0));
}

#[tokio::test]
async fn hundreds_of_users_and_public_clients_add_no_series() {
    let setup = start().await;
    // One call of each kind, so every series this traffic can touch exists.
    setup.get(jwt(APP, "user-warm")).await.unwrap();
    setup
        .get(password("public-warm", "user-warm"))
        .await
        .unwrap();
    let before = series(&setup.scrape());

    const N: usize = 300;
    for i in 0..N {
        setup.get(jwt(APP, &format!("user-{i}"))).await.unwrap();
        setup
            .get(password(
                &format!("caller-chosen-{i}"),
                &format!("user-{i}"),
            ))
            .await
            .unwrap();
    }
    let text = setup.scrape();
    let after = series(&text);
    assert_eq!(
        after.symmetric_difference(&before).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "series moved"
    );
    assert!(
        text.contains(&format!(
            r#"tokengate_token_requests_total{{grant_type="password",client="public",reason="OK",source="upstream"}} {}"#,
            N + 1
        )),
        "{text}"
    );
    assert_eq!(setup.upstream.token_posts(), 2 * N + 2);

    // Logs name a registered client or `public`, never the caller's string.
    let output = setup.served.output();
    assert!(!output.contains("caller-chosen-"), "{output}");
    assert!(output.contains(r#""client_id":"public""#), "{output}");
}

#[tokio::test]
async fn without_metrics_listen_nothing_listens() {
    let upstream = CountingUpstream::start(Duration::ZERO);
    let served = Tokengate::start(env!("CARGO_BIN_EXE_tokengate"), config(&upstream, false)).await;
    assert!(
        !served.messages().iter().any(|m| m == "serving metrics"),
        "{:?}",
        served.messages()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_each_upstream_retry_by_its_cause() {
    let upstream = FaultyUpstream::start(Mode::Healthy).await;
    let served = Tokengate::start(
        env!("CARGO_BIN_EXE_tokengate"),
        config_for(&upstream.url(), true, ""),
    )
    .await;
    let metrics = metrics_addr(&served).await;
    let prometheus = tokio::task::block_in_place(|| Prometheus::start(metrics));
    let mut client = TokenServiceClient::connect(served.url()).await.unwrap();
    let mut get = async |request| {
        client
            .get_token(request)
            .await
            .map(tonic::Response::into_inner)
    };

    // A 503 and a 429 that name their wait, each followed by a token: one retry each.
    for (status, user) in [(503, "after-503"), (429, "after-429")] {
        let fails_once = vec![Mode::Status(status, Some("0")), Mode::Healthy];
        upstream.set(Mode::Cycle(fails_once)).await;
        let token = get(jwt(APP, user)).await.unwrap();
        assert_eq!(token.source(), TokenSource::Upstream);
    }
    assert_eq!(upstream.connections(), 4);
    // Refused connections: nothing left, so the request is tried MAX_ATTEMPTS (3) times.
    upstream.set(Mode::Refuse).await;
    let refused = get(jwt(APP, "refused")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    // A 503 that names no wait is not retried, so it adds no retry.
    upstream.set(Mode::Status(503, None)).await;
    get(jwt(APP, "no-wait")).await.unwrap_err();
    assert_eq!(upstream.connections(), 5);

    let traffic_done = SystemTime::now();
    tokio::task::block_in_place(|| prometheus.wait_scraped_after(traffic_done));
    let value = |promql: &str| tokio::task::block_in_place(|| prometheus.value(promql));
    for (cause, expected) in [("503", 1.0), ("429", 1.0), ("connect", 2.0)] {
        let promql = format!(r#"tokengate_upstream_retries_total{{cause="{cause}"}}"#);
        assert_eq!(value(&promql), Some(expected), "{promql}");
    }
    assert_eq!(value("sum(tokengate_upstream_retries_total)"), Some(4.0));
    // Every attempt is a request: 2 + 2 answered, 3 refused, 1 answered.
    for (status, expected) in [("200", 2.0), ("503", 2.0), ("429", 1.0), ("error", 3.0)] {
        let promql =
            format!(r#"tokengate_upstream_requests_total{{endpoint="token",status="{status}"}}"#);
        assert_eq!(value(&promql), Some(expected), "{promql}");
    }
}

/// A test CA, and certificates for `localhost` from it expiring on a given day.
struct Ca(rcgen::CertifiedIssuer<'static, rcgen::KeyPair>);

impl Ca {
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        Self(rcgen::CertifiedIssuer::self_signed(params, key).unwrap())
    }

    /// (certificate PEM, key PEM, notAfter in Unix seconds).
    fn issue(&self, year: i32, month: u8, day: u8) -> (String, String, i64) {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, month, day);
        let not_after = params.not_after.unix_timestamp();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.0).unwrap();
        (cert.pem(), key.serialize_pem(), not_after)
    }

    /// The notAfter of the certificate `addr` serves, read from a real handshake.
    async fn served_not_after(&self, addr: SocketAddr) -> i64 {
        use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
        use tokio_rustls::rustls;
        use x509_parser::prelude::{FromDer as _, X509Certificate};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.0.pem().as_bytes()).unwrap())
            .unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("a TLS handshake that verifies against the test CA");
        let served = &tls.get_ref().1.peer_certificates().expect("a certificate")[0];
        let (_, cert) = X509Certificate::from_der(served).unwrap();
        cert.validity().not_after.timestamp()
    }
}

/// Writes `text` to `path` as cert-manager's kubelet does: whole, by a rename.
fn replace(path: &std::path::Path, text: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

const EXPIRY: &str = "tokengate_tls_certificate_expiry_timestamp_seconds";

#[tokio::test]
async fn the_expiry_gauge_is_the_served_certificate_and_follows_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let ca = Ca::new();
    let (cert, key, first) = ca.issue(2031, 5, 17);
    replace(&cert_file, &cert);
    replace(&key_file, &key);
    let upstream = CountingUpstream::start(Duration::ZERO);
    let tls = format!(
        "[server.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert_file.display().to_string(),
        key_file.display().to_string()
    );
    let served = Tokengate::start(
        env!("CARGO_BIN_EXE_tokengate"),
        config_for(&upstream.url(), true, &tls),
    )
    .await;
    let metrics = metrics_addr(&served).await;

    assert_eq!(ca.served_not_after(served.addr()).await, first);
    let text = scrape_linted(metrics);
    assert_eq!(sample(&text, EXPIRY), Some(first as f64), "{text}");

    // cert-manager renews: a new pair replaces the files in place.
    let (cert, key, renewed) = ca.issue(2032, 2, 29);
    assert_ne!(renewed, first);
    replace(&key_file, &key);
    replace(&cert_file, &cert);
    served
        .wait_for_message(Duration::from_secs(30), "reloaded the TLS certificate")
        .await;
    assert_eq!(ca.served_not_after(served.addr()).await, renewed);
    let text = scrape_linted(metrics);
    assert_eq!(sample(&text, EXPIRY), Some(renewed as f64), "{text}");
}

#[tokio::test]
async fn signing_key_reloads_are_counted_by_result() {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let fixture = |name: &str| {
        std::fs::read_to_string(format!(
            "{}/tests/fixtures/keys/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key.pem");
    replace(&key_file, &fixture("rsa-a.pem"));
    let signed = format!(
        "[[clients.registered]]\nclient_id = \"pk\"\nauth_method = \"private_key_jwt\"\n\
         private_key_file = {:?}\n",
        key_file.display().to_string()
    );
    let upstream = CountingUpstream::start(Duration::ZERO);
    let served = Tokengate::start(
        env!("CARGO_BIN_EXE_tokengate"),
        config_for(&upstream.url(), true, &signed),
    )
    .await;
    let metrics = metrics_addr(&served).await;
    let reloads = |text: &str, result: &str| {
        sample(
            text,
            &format!(r#"tokengate_signing_key_reloads_total{{result="{result}"}}"#),
        )
    };
    let text = scrape_linted(metrics);
    assert_eq!(
        (reloads(&text, "ok"), reloads(&text, "error")),
        (Some(0.0), Some(0.0))
    );

    // The Secret is rotated to another key (one byte longer, so its size changes too).
    replace(&key_file, &(fixture("rsa-b.pem") + "\n"));
    served
        .wait_for_message(Duration::from_secs(30), "reloaded the signing key")
        .await;
    // The line is logged as the key is swapped, the count a moment later: poll the count.
    let counted = |ok: f64, error: f64| async move {
        let text = scrape_linted(metrics);
        (reloads(&text, "ok"), reloads(&text, "error")) == (Some(ok), Some(error))
    };
    testkit::wait::until("ok=1 error=0", Duration::from_secs(10), || {
        counted(1.0, 0.0)
    })
    .await;

    // A broken key: counted as an error, and the rotated key stays in use.
    replace(&key_file, "not a key");
    served
        .wait_for_message(
            Duration::from_secs(30),
            "the changed signing key cannot be used",
        )
        .await;
    testkit::wait::until("ok=1 error=1", Duration::from_secs(10), || {
        counted(1.0, 1.0)
    })
    .await;
    let mut client = TokenServiceClient::connect(served.url()).await.unwrap();
    client.get_token(client_credentials("pk")).await.unwrap();
    let assertion = upstream
        .posts()
        .last()
        .and_then(|post| post.field("client_assertion").map(str::to_owned))
        .unwrap_or_else(|| panic!("no client_assertion sent:{}", upstream.summary()));
    let rotated = DecodingKey::from_rsa_pem(fixture("rsa-b.pub.pem").as_bytes()).unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.validate_aud = false;
    jsonwebtoken::decode::<serde_json::Value>(&assertion, &rotated, &validation)
        .expect("the assertion is signed with the rotated key");
}
