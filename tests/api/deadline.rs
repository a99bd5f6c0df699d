//! The caller's deadline and the upstream timeout bound each call (contract §2, §6).
//!
//! A tonic client enforces its own deadline too, and reports its own expiry as CANCELLED
//! ("Timeout expired") when its timer beats the server's answer. So what the *server*
//! answers at the caller's deadline is checked with a raw HTTP/2 gRPC call that carries a
//! `grpc-timeout` header but runs no timer of its own.

use std::time::{Duration, Instant};

use serde_json::json;
use tonic::{Code, Status};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

async fn mount_slow_token(app: &TestApp, delay: Duration) {
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "late"}))
                .set_delay(delay),
        )
        .mount(&app.upstream)
        .await;
}

/// Whether the status was made by the tonic client itself when its own deadline timer
/// fired, rather than received from the server.
fn is_client_side_timeout(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.downcast_ref::<tonic::TimeoutExpired>().is_some() {
            return true;
        }
        source = error.source();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_answers_deadline_exceeded_when_the_callers_deadline_passes_before_the_upstream_answers()
 {
    let app = spawn_app(r#"request_timeout = "10s""#).await;
    mount_slow_token(&app, Duration::from_secs(5)).await;

    let started = Instant::now();
    let status = raw_get_token(
        &app,
        "200m",
        &password_request(APP_A, "alice", "pw-deadline-0"),
    )
    .await;
    let elapsed = started.elapsed();

    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "the server's answer: {status:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}, not near the 200 ms deadline"
    );
    assert_no_secrets(&status, &["pw-deadline-0", APP_A_SECRET]);
}

// The production binary serves on a multi-thread runtime; so does this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_caller_deadline_ends_the_call_long_before_the_upstream_answers() {
    let mut app = spawn_app(r#"request_timeout = "10s""#).await;
    mount_slow_token(&app, Duration::from_secs(5)).await;
    let mut request = tonic::Request::new(password_request(APP_A, "alice", "pw-deadline-1"));
    request.set_timeout(Duration::from_millis(200));

    let started = Instant::now();
    let status = app
        .client
        .get_token(request)
        .await
        .expect_err("the deadline passes first");
    let elapsed = started.elapsed();

    // Either the server's DEADLINE_EXCEEDED arrived first, or tonic's own timer fired a
    // moment before it did (see the module comment); never an upstream error.
    assert!(
        status.code() == Code::DeadlineExceeded || is_client_side_timeout(&status),
        "expected DEADLINE_EXCEEDED, got {status:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}, not near the 200 ms deadline"
    );
    assert_no_secrets(&status, &["pw-deadline-1", APP_A_SECRET]);
}

#[tokio::test]
async fn without_a_caller_deadline_the_upstream_request_timeout_gives_upstream_timeout() {
    let mut app = spawn_app(r#"request_timeout = "300ms""#).await;
    mount_slow_token(&app, Duration::from_secs(5)).await;

    let started = Instant::now();
    let status = app
        .client
        .get_token(password_request(APP_A, "alice", "pw-deadline-2"))
        .await
        .expect_err("the upstream is too slow");
    let elapsed = started.elapsed();

    let info = assert_error(&status, Code::Unavailable, "UPSTREAM_TIMEOUT");
    assert_eq!(
        info.metadata.get("grantType").map(String::as_str),
        Some("password")
    );
    assert_eq!(
        info.metadata.get("clientId").map(String::as_str),
        Some(APP_A)
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "answered after {elapsed:?}, not near the 300 ms timeout"
    );
}

#[tokio::test]
async fn a_caller_deadline_longer_than_request_timeout_still_gives_upstream_timeout() {
    let mut app = spawn_app(r#"request_timeout = "300ms""#).await;
    mount_slow_token(&app, Duration::from_secs(5)).await;
    let mut request = tonic::Request::new(password_request(APP_A, "alice", "pw-deadline-3"));
    request.set_timeout(Duration::from_secs(30));

    let status = app
        .client
        .get_token(request)
        .await
        .expect_err("the upstream is too slow");

    assert_error(&status, Code::Unavailable, "UPSTREAM_TIMEOUT");
}
