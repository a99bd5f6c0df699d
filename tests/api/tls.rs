//! TLS on the listener, mTLS, caller authorization and the plaintext health port
//! (contract §7), with certificates made per test by rcgen.

use std::path::Path;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use serde_json::json;
use tokengate::proto::token_service_client::TokenServiceClient;
use tokengate::proto::{ClientCredentialsGrant, GetTokenRequest, get_token_request::Grant};
use tokengate::{Application, Config};
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::assert_error;

/// A test CA that issues server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and its key.
struct Pair {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(&self, dns: &[&str], uri: Option<&str>) -> Pair {
        let mut params =
            CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
                .unwrap();
        if let Some(uri) = uri {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

const BILLING: &str = "spiffe://cluster.local/ns/billing/sa/api";
const CRM_KEY: &str = "crm-api-key-5e1b";

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A running server from `toml`; dropped, it stops.
struct Served {
    addr: std::net::SocketAddr,
    health_addr: Option<std::net::SocketAddr>,
    upstream: MockServer,
    _stop: oneshot::Sender<()>,
}

async fn serve(extra: impl FnOnce(&str) -> String) -> Served {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"access_token": "at-tls"})))
        .mount(&upstream)
        .await;
    let toml = extra(&upstream.uri());
    let config = Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    let app = Application::build(&config).await.expect("starts");
    let (addr, health_addr) = (app.local_addr(), app.health_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    Served {
        addr,
        health_addr,
        upstream,
        _stop: stop,
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The server's files: a certificate for `localhost` from `ca`, and the client CA if any.
fn server_files(dir: &Path, ca: &Ca, client_ca: Option<&Ca>) -> String {
    let server = ca.issue(&["localhost"], None);
    let cert = write(dir, "tls.crt", &server.cert);
    let key = write(dir, "tls.key", &server.key);
    let client_ca =
        client_ca.map(|c| format!("client_ca_file = \"{}\"", write(dir, "ca.crt", &c.pem())));
    format!(
        "[server.tls]\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n{}\n",
        client_ca.unwrap_or_default()
    )
}

fn base(upstream: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nhealth_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{upstream}\"\nallow_insecure_http = true\n"
    )
}

fn clients(allowed_callers: &str) -> String {
    format!(
        "[[clients.registered]]\nclient_id = \"app-a\"\nclient_secret = \"s-a\"\ndefault = true\n{allowed_callers}\n\
         [[clients.registered]]\nclient_id = \"app-open\"\nclient_secret = \"s-o\"\n"
    )
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &Ca,
    identity: Option<&Pair>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(&pair.cert, &pair.key));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

fn request(client_id: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::ClientCredentials(ClientCredentialsGrant {
            subject: None,
        })),
        client_id: client_id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn tls_serves_token_calls_and_health_and_refuses_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let files = server_files(dir.path(), &ca, None);
    let served = serve(|up| format!("{}{files}{}", base(up), clients(""))).await;
    // Kubernetes' gRPC probes speak no TLS: health is also on a plaintext port.
    let health_addr = served
        .health_addr
        .expect("TLS without mTLS opens the plaintext health port too");
    let plain_health = Endpoint::from_shared(format!("http://{health_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(plain_health)
        .check(HealthCheckRequest {
            service: "tokengate.v1.TokenService".into(),
        })
        .await
        .unwrap();
    assert_eq!(status.into_inner().status(), ServingStatus::Serving);

    let channel = tls_channel(served.addr, &ca, None)
        .await
        .expect("TLS handshake");
    let token = TokenServiceClient::new(channel.clone())
        .get_token(request("app-a"))
        .await
        .unwrap();
    assert_eq!(token.into_inner().access_token, "at-tls");
    let health = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(health.into_inner().status(), ServingStatus::Serving);

    let plaintext = TokenServiceClient::connect(format!("http://{}", served.addr)).await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(mut client) => client.get_token(request("app-a")).await.is_err(),
    };
    assert!(
        refused,
        "a plaintext call must not be served on a TLS listener"
    );
}

#[tokio::test]
async fn mtls_identifies_callers_by_san_or_api_key_and_enforces_allowed_callers() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca) = (Ca::new("server CA"), Ca::new("client CA"));
    let files = server_files(dir.path(), &server_ca, Some(&client_ca));
    let callers = format!(
        "[[callers]]\nname = \"billing\"\nmtls_san = \"{BILLING}\"\n\
         [[callers]]\nname = \"crm\"\napi_key_sha256 = \"{}\"\n",
        sha256_hex(CRM_KEY)
    );
    let served = serve(|up| {
        format!(
            "{}{files}{callers}{}",
            base(up),
            clients("allowed_callers = [\"billing\"]")
        )
    })
    .await;

    // A known SAN may use the client that lists it.
    let billing = client_ca.issue(&["billing.internal"], Some(BILLING));
    let channel = tls_channel(served.addr, &server_ca, Some(&billing))
        .await
        .unwrap();
    let token = TokenServiceClient::new(channel)
        .get_token(request("app-a"))
        .await
        .unwrap();
    assert_eq!(token.into_inner().access_token, "at-tls");

    // A valid certificate that names no caller, and no key: refused before anything is sent.
    let stranger = client_ca.issue(
        &["stranger.internal"],
        Some("spiffe://cluster.local/ns/x/sa/y"),
    );
    let channel = tls_channel(served.addr, &server_ca, Some(&stranger))
        .await
        .unwrap();
    let sent_before = served.upstream.received_requests().await.unwrap().len();
    let status = TokenServiceClient::new(channel.clone())
        .get_token(request("app-open"))
        .await
        .unwrap_err();
    assert_error(&status, Code::Unauthenticated, "CALLER_UNAUTHENTICATED");

    // The same connection with crm's API key: known, but not allowed to use app-a.
    let mut with_key = tonic::Request::new(request("app-a"));
    with_key.metadata_mut().insert(
        "authorization",
        format!("Bearer {CRM_KEY}").parse().unwrap(),
    );
    let status = TokenServiceClient::new(channel.clone())
        .get_token(with_key)
        .await
        .unwrap_err();
    let info = assert_error(&status, Code::PermissionDenied, "CALLER_NOT_ALLOWED");
    assert_eq!(info.metadata["clientId"], "app-a");
    assert_eq!(
        served.upstream.received_requests().await.unwrap().len(),
        sent_before,
        "nothing sent"
    );

    // A client without allowed_callers is open to every authenticated caller.
    let mut with_key = tonic::Request::new(request("app-open"));
    with_key.metadata_mut().insert(
        "authorization",
        format!("Bearer {CRM_KEY}").parse().unwrap(),
    );
    TokenServiceClient::new(channel)
        .get_token(with_key)
        .await
        .expect("crm may use app-open");

    // No client certificate at all: the handshake itself fails.
    let anonymous = match tls_channel(served.addr, &server_ca, None).await {
        Err(_) => true,
        Ok(channel) => TokenServiceClient::new(channel)
            .get_token(request("app-open"))
            .await
            .is_err(),
    };
    assert!(anonymous, "mTLS requires a client certificate");

    // Kubernetes probes cannot present a certificate: health is also on a plaintext port.
    let health_addr = served
        .health_addr
        .expect("mTLS opens the plaintext health port");
    let health = Endpoint::from_shared(format!("http://{health_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(health.clone())
        .check(HealthCheckRequest {
            service: "tokengate.v1.TokenService".into(),
        })
        .await
        .unwrap();
    assert_eq!(status.into_inner().status(), ServingStatus::Serving);
    let only_health = TokenServiceClient::new(health)
        .get_token(request("app-open"))
        .await
        .unwrap_err();
    assert_eq!(
        only_health.code(),
        Code::Unimplemented,
        "the health port serves health only"
    );
}

#[tokio::test]
async fn api_keys_authenticate_callers_on_a_plaintext_listener() {
    let callers = format!(
        "[[callers]]\nname = \"crm\"\napi_key_sha256 = \"{}\"\n",
        sha256_hex(CRM_KEY)
    );
    let served = serve(|up| format!("{}{callers}{}", base(up), clients(""))).await;
    let mut client = TokenServiceClient::connect(format!("http://{}", served.addr))
        .await
        .unwrap();

    let status = client.get_token(request("app-a")).await.unwrap_err();
    assert_error(&status, Code::Unauthenticated, "CALLER_UNAUTHENTICATED");
    let mut wrong = tonic::Request::new(request("app-a"));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer not-the-key".parse().unwrap());
    assert_error(
        &client.get_token(wrong).await.unwrap_err(),
        Code::Unauthenticated,
        "CALLER_UNAUTHENTICATED",
    );
    assert!(
        served
            .upstream
            .received_requests()
            .await
            .unwrap()
            .is_empty(),
        "nothing sent"
    );

    let mut right = tonic::Request::new(request("app-a"));
    right.metadata_mut().insert(
        "authorization",
        format!("Bearer {CRM_KEY}").parse().unwrap(),
    );
    client
        .get_token(right)
        .await
        .expect("a known key is served");
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = server_files(dir.path(), &old_ca, None);
    let served = serve(|up| format!("{}{files}{}", base(up), clients(""))).await;
    tls_channel(served.addr, &old_ca, None)
        .await
        .expect("the first certificate is served");

    let before = match tls_channel(served.addr, &new_ca, None).await {
        Err(_) => true,
        Ok(channel) => TokenServiceClient::new(channel)
            .get_token(request("app-a"))
            .await
            .is_err(),
    };
    assert!(
        before,
        "a client trusting only the new CA cannot call before the rotation"
    );

    // cert-manager replaces both files; the server must pick them up within seconds.
    let rotated = new_ca.issue(&["localhost"], None);
    write(dir.path(), "tls.key", &rotated.key);
    write(dir.path(), "tls.crt", &rotated.cert);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(channel) = tls_channel(served.addr, &new_ca, None).await
            && TokenServiceClient::new(channel)
                .get_token(request("app-a"))
                .await
                .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tls_channel(served.addr, &old_ca, None).await.is_err(),
        "the old chain is no longer served"
    );
}

#[test]
fn tls_and_caller_config_is_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("CA");
    let files = server_files(dir.path(), &ca, None);
    let refused = |toml: String, expected: &str| {
        let error = Config::from_toml(&toml).expect_err(&toml).to_string();
        assert!(
            error.contains(expected),
            "{error} should mention {expected}"
        );
    };
    refused(
        "[server.tls]\ncert_file = \"/nonexistent.crt\"\nkey_file = \"/nonexistent.key\"\n".into(),
        "cert_file",
    );
    refused(
        format!("{files}[[callers]]\nname = \"b\"\nmtls_san = \"{BILLING}\"\n"),
        "needs mTLS",
    );
    refused(
        "[[callers]]\nname = \"b\"\napi_key_sha256 = \"abc\"\n".into(),
        "64 hex",
    );
    refused("[[callers]]\nname = \"b\"\n".into(), "exactly one");
    refused(
        clients("allowed_callers = [\"nobody\"]"),
        "not in [[callers]]",
    );
    let other = Ca::new("other");
    let mismatched = other.issue(&["localhost"], None);
    write(dir.path(), "tls.key", &mismatched.key);
    refused(files, "do not match");
}

/// Clients that connect and never send a ClientHello hold a handshake each; beyond
/// `MAX_HANDSHAKES` the server closes new connections at once instead of holding thousands,
/// and serves again as soon as the stalled ones go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_are_capped_and_the_excess_closed_at_once() {
    use tokengate::tls::{HANDSHAKE_TIMEOUT, MAX_HANDSHAKES};
    use tokio::io::AsyncReadExt as _;

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test CA");
    let files = server_files(dir.path(), &ca, None);
    let served = serve(|up| format!("{}{files}{}", base(up), clients(""))).await;

    let mut stalled = Vec::new();
    for _ in 0..MAX_HANDSHAKES {
        stalled.push(tokio::net::TcpStream::connect(served.addr).await.unwrap());
    }
    // Each further connection is closed by the server well before the handshake timeout;
    // without a cap it would be held open, unanswered, for the full timeout.
    let patience = HANDSHAKE_TIMEOUT / 2;
    let mut closed = 0;
    for _ in 0..20 {
        let mut extra = tokio::net::TcpStream::connect(served.addr).await.unwrap();
        let mut byte = [0u8; 1];
        match tokio::time::timeout(patience, extra.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => closed += 1,
            Ok(Ok(n)) => panic!("the server sent {n} bytes to a silent client"),
            Err(_) => {}
        }
    }
    assert_eq!(
        closed, 20,
        "every connection past {MAX_HANDSHAKES} stalled ones is closed"
    );

    // The stalled clients leave: their handshakes end, and real clients are served again.
    drop(stalled);
    let deadline = tokio::time::Instant::now() + patience;
    let channel = loop {
        match tls_channel(served.addr, &ca, None).await {
            Ok(channel) => break channel,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "not served again after the stalled clients left: {error}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let token = TokenServiceClient::new(channel)
        .get_token(request("app-a"))
        .await
        .unwrap();
    assert_eq!(token.into_inner().access_token, "at-tls");
}
