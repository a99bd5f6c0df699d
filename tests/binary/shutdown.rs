//! SIGTERM and SIGINT: health flips, the listener closes, in-flight calls drain.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use testkit::{Tokengate, message};
use tokengate::proto::{ClientCredentialsGrant, GetTokenRequest, get_token_request::Grant};
use tokio::time::Instant;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::process::{binary, client};

/// How long the polls below wait before the test fails.
const PATIENCE: Duration = Duration::from_secs(20);

fn config(upstream: &MockServer, grace: &str) -> String {
    format!(
        r#"
        [server]
        listen = "127.0.0.1:0"
        shutdown_grace_period = "{grace}"
        [upstream]
        base_url = "{}"
        allow_insecure_http = true
        [[clients.registered]]
        client_id = "svc"
        client_secret = "svc-secret"
        default = true
        "#,
        upstream.uri()
    )
}

async fn slow_upstream(delay: Duration) -> MockServer {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/restapi/oauth/token"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(
                    serde_json::json!({"access_token": "slow-token", "expires_in": 3600}),
                )
                .set_delay(delay),
        )
        .mount(&upstream)
        .await;
    upstream
}

fn client_credentials() -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::ClientCredentials(ClientCredentialsGrant {
            subject: None,
        })),
        ..Default::default()
    }
}

/// Polls until the upstream has seen `n` requests.
async fn upstream_received(upstream: &MockServer, n: usize) {
    testkit::wait::until("the upstream to receive the call", PATIENCE, || async {
        upstream.received_requests().await.unwrap_or_default().len() >= n
    })
    .await;
}

/// Polls until connecting to `addr` is refused.
async fn connections_refused(addr: SocketAddr) {
    testkit::wait::until(
        "the listener to refuse connections after SIGTERM",
        PATIENCE,
        || async {
            matches!(
                tokio::net::TcpStream::connect(addr).await,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused
            )
        },
    )
    .await;
}

#[tokio::test]
async fn sigterm_flips_health_refuses_new_connections_and_drains_the_call_in_flight() {
    let upstream = slow_upstream(Duration::from_secs(2)).await;
    let mut served = Tokengate::start(binary(), config(&upstream, "15s")).await;

    let channel = tonic::transport::Endpoint::from_shared(served.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    let mut client = client(&served).await;
    let in_flight = tokio::spawn(async move { client.get_token(client_credentials()).await });
    upstream_received(&upstream, 1).await;

    served.signal("TERM");
    let flipped = watch.message().await.unwrap().unwrap();
    assert_eq!(flipped.status(), ServingStatus::NotServing);
    drop(watch);

    connections_refused(served.addr()).await;
    assert!(
        !in_flight.is_finished(),
        "the slow call must still be in flight when new connections are refused"
    );

    let token = in_flight
        .await
        .unwrap()
        .expect("the in-flight call completes during the drain");
    assert_eq!(token.into_inner().access_token, "slow-token");

    assert_eq!(served.exit_code().await, 0);
    let last = served
        .wait_for(|e| e["fields"]["drained"].is_boolean())
        .await;
    assert_eq!(last["fields"]["drained"], true, "{}", served.output());
}

#[tokio::test]
async fn grace_period_bounds_the_drain_and_the_log_says_it_was_incomplete() {
    let upstream = slow_upstream(Duration::from_secs(30)).await;
    let mut served = Tokengate::start(binary(), config(&upstream, "300ms")).await;
    let mut client = client(&served).await;
    let in_flight = tokio::spawn(async move { client.get_token(client_credentials()).await });
    upstream_received(&upstream, 1).await;

    let signalled = Instant::now();
    served.signal("INT");
    assert_eq!(served.exit_code().await, 0);
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exited {:?} after SIGINT",
        signalled.elapsed()
    );
    let last = served
        .wait_for(|e| e["fields"]["drained"].is_boolean())
        .await;
    assert_eq!(last["fields"]["drained"], false, "{}", served.output());
    assert!(in_flight.await.unwrap().is_err(), "the dropped call fails");
    assert!(
        served
            .events()
            .iter()
            .any(|e| message(e).is_some_and(|m| m.contains("shutdown signal")))
    );
}
