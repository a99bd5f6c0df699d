//! What runs beside TokenService: gRPC health, reflection (v1 and v1alpha), and shutdown.

use std::time::Duration;

use serde_json::json;
use tokengate::Drain;
use tokengate::proto::token_service_client::TokenServiceClient;
use tokio::sync::mpsc;
use tonic::codegen::tokio_stream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::{v1, v1alpha};
use wiremock::matchers::{method, path};
use wiremock::{Match, Mock, ResponseTemplate};

use crate::helpers::*;

const TOKEN_SERVICE: &str = "tokengate.v1.TokenService";
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

async fn health_of(app: &TestApp, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(app.channel().await);
    let response = health
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap_or_else(|status| panic!("health check of {service:?} failed: {status:?}"))
        .into_inner();
    ServingStatus::try_from(response.status).expect("a known serving status")
}

#[tokio::test]
async fn health_reports_serving_for_the_server_and_the_token_service() {
    let app = spawn_app("").await;

    assert_eq!(health_of(&app, "").await, ServingStatus::Serving);
    assert_eq!(health_of(&app, TOKEN_SERVICE).await, ServingStatus::Serving);
}

#[tokio::test]
async fn health_does_not_depend_on_the_upstream_being_reachable() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        listener.local_addr().expect("bound").port()
    };
    let app = AppSpec::default()
        .base_url(format!("http://127.0.0.1:{port}"))
        .spawn()
        .await;

    assert_eq!(health_of(&app, "").await, ServingStatus::Serving);
    assert_eq!(health_of(&app, TOKEN_SERVICE).await, ServingStatus::Serving);
}

#[tokio::test]
async fn reflection_v1_lists_the_token_service_and_health() {
    let app = spawn_app("").await;
    let mut reflection =
        v1::server_reflection_client::ServerReflectionClient::new(app.channel().await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };

    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1 answers")
        .into_inner();
    let reply = stream
        .message()
        .await
        .expect("a reply")
        .expect("one message");

    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("not a list_services reply: {:?}", reply.message_response);
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == TOKEN_SERVICE), "{names:?}");
    assert!(names.iter().any(|n| n == HEALTH_SERVICE), "{names:?}");
}

#[tokio::test]
async fn reflection_v1alpha_also_lists_the_token_service_for_older_grpcurl() {
    let app = spawn_app("").await;
    let mut reflection =
        v1alpha::server_reflection_client::ServerReflectionClient::new(app.channel().await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };

    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection v1alpha answers")
        .into_inner();
    let reply = stream
        .message()
        .await
        .expect("a reply")
        .expect("one message");

    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("not a list_services reply: {:?}", reply.message_response);
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == TOKEN_SERVICE), "{names:?}");
    assert!(names.iter().any(|n| n == HEALTH_SERVICE), "{names:?}");
}

#[tokio::test]
async fn resolving_the_shutdown_future_drains_completely_and_closes_the_listener() {
    let app = spawn_app("").await;
    let addr = app.addr;
    // A call served before shutdown, so the server has had a live connection.
    assert_eq!(health_of(&app, "").await, ServingStatus::Serving);

    let drain = app.stop().await.expect("the server stops cleanly");

    assert_eq!(drain, Drain::Complete);
    let reconnect = TokenServiceClient::connect(format!("http://{addr}")).await;
    assert!(
        reconnect.is_err(),
        "the listener is closed after run_until_stopped returns"
    );
}

/// Matches every request, and says so on a channel: the test learns that a call reached
/// the upstream without polling.
struct Arrival(mpsc::UnboundedSender<()>);

impl Match for Arrival {
    fn matches(&self, _request: &wiremock::Request) -> bool {
        let _ = self.0.send(());
        true
    }
}

#[tokio::test]
async fn a_call_in_flight_when_shutdown_starts_completes_and_the_drain_is_complete() {
    let app = spawn_app("").await;
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .and(Arrival(arrived_tx))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "at-drained"}))
                // Keeps the call in flight while shutdown starts.
                .set_delay(Duration::from_millis(500)),
        )
        .mount(&app.upstream)
        .await;
    let mut client = app.client.clone();
    let call = tokio::spawn(async move {
        client
            .get_token(password_request(APP_A, "alice", "pw-drain"))
            .await
    });
    arrived.recv().await.expect("the call reached the upstream");

    let drain = app.stop().await.expect("the server stops cleanly");

    assert_eq!(drain, Drain::Complete);
    let token = call
        .await
        .expect("the call task does not panic")
        .expect("the in-flight call succeeds");
    assert_eq!(token.into_inner().access_token, "at-drained");
}
