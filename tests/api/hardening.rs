//! Holding up under faults and load (issue 5): safe retries, the upstream rate-limit guard,
//! admission control, request limits and upstream TLS.
//!
//! Every count of upstream requests is exact, and a wait is only ever observed, never
//! assumed: a call "in flight" is one the upstream has recorded, and a call "shed fast" is
//! one answered while an earlier call is provably still running.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use prost::Message as _;
use serde_json::json;
use tokengate::proto::get_token_request::Grant;
use tokengate::proto::{
    AuthorizationCodeGrant, ClientCredentialsGrant, GetTokenRequest, GetTokenResponse,
    JwtBearerGrant, RefreshTokenGrant,
};
use tonic::{Code, Status};
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

/// How long a test waits for something that should take milliseconds before it gives up.
const PATIENCE: Duration = Duration::from_secs(10);

fn token_ok() -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "access_token": "at-hardening",
        "token_type": "bearer",
        "expires_in": 3600,
    }))
}

fn status_with_retry_after(status: u16, retry_after: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).insert_header("Retry-After", retry_after)
}

/// `first` for the first `times` token requests, a token after that.
async fn mount_then_token(app: &TestApp, first: ResponseTemplate, times: u64) {
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(first)
        .up_to_n_times(times)
        .with_priority(1)
        .named("the failure")
        .mount(&app.upstream)
        .await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(token_ok())
        .named("the token")
        .mount(&app.upstream)
        .await;
}

/// `reply` to every token request.
async fn mount_always(app: &TestApp, reply: ResponseTemplate) {
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(reply)
        .mount(&app.upstream)
        .await;
}

async fn upstream_count(app: &TestApp) -> usize {
    app.upstream_requests().await.len()
}

/// Polls the mock until it has recorded `n` requests (wiremock records a request when it
/// arrives, before any configured delay).
async fn wait_for_upstream_requests(app: &TestApp, n: usize) {
    let started = Instant::now();
    while upstream_count(app).await < n {
        assert!(
            started.elapsed() < PATIENCE,
            "the upstream never received {n} request(s)"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn get_token(app: &TestApp, request: GetTokenRequest) -> Result<GetTokenResponse, Status> {
    app.client
        .clone()
        .get_token(request)
        .await
        .map(tonic::Response::into_inner)
}

fn request_with(grant: Grant) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(grant),
        client_id: APP_A.to_owned(),
        ..Default::default()
    }
}

fn refresh_request(refresh_token: &str) -> GetTokenRequest {
    request_with(Grant::RefreshToken(RefreshTokenGrant {
        refresh_token: refresh_token.to_owned(),
    }))
}

/// An unsigned JWT with these claims; the guard reads `sub` without verifying.
fn unsigned_jwt(claims: &serde_json::Value) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"none"}"#),
        b64(claims.to_string().as_bytes()),
        b64(b"sig")
    )
}

fn jwt_request(assertion: &str) -> GetTokenRequest {
    request_with(Grant::JwtBearer(JwtBearerGrant {
        assertion: assertion.to_owned(),
    }))
}

// ---------------------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_503_with_retry_after_is_waited_out_and_sent_again() {
    let app = spawn_app("").await;
    mount_then_token(&app, status_with_retry_after(503, "1"), 1).await;

    let started = Instant::now();
    let token = get_token(&app, password_request(APP_A, "alice", "pw-retry-503"))
        .await
        .expect("the second attempt gets the token");
    let elapsed = started.elapsed();

    assert_eq!(token.access_token, "at-hardening");
    let requests = app.upstream_requests().await;
    assert_eq!(requests.len(), 2, "one failure, one retry: {requests:?}");
    assert_eq!(
        form(&requests[0]),
        form(&requests[1]),
        "the retry is the same request"
    );
    // A lower bound only: the retry honours `Retry-After` rather than hammering.
    assert!(
        elapsed >= Duration::from_millis(900),
        "re-sent after {elapsed:?}, before Retry-After: 1 had passed"
    );
}

#[tokio::test]
async fn a_429_with_retry_after_that_fits_is_waited_out_and_the_user_is_not_penalised() {
    let app = spawn_app("").await;
    mount_then_token(&app, status_with_retry_after(429, "1"), 1).await;

    get_token(&app, password_request(APP_A, "alice", "pw-retry-429"))
        .await
        .expect("the second attempt gets the token");
    assert_eq!(upstream_count(&app).await, 2, "one 429, one retry");

    // The retry succeeded, so the wait has passed: the user's next call goes upstream. (It
    // differs from the first, which the broker would replay instead.)
    get_token(&app, password_request(APP_A, "alice", "pw-retry-429-again"))
        .await
        .expect("not refused by the rate-limit guard");
    assert_eq!(upstream_count(&app).await, 3);
}

#[tokio::test]
async fn a_400_is_never_sent_again_even_with_retry_after() {
    let app = spawn_app("").await;
    let invalid_grant = ResponseTemplate::new(400)
        .insert_header("Retry-After", "0")
        .set_body_json(json!({"error": "invalid_grant", "error_description": "bad password"}));
    mount_then_token(&app, invalid_grant, 1).await;

    let status = get_token(&app, password_request(APP_A, "alice", "pw-400"))
        .await
        .expect_err("a 400 is final");

    assert_error(&status, Code::Unauthenticated, "INVALID_GRANT");
    assert_eq!(upstream_count(&app).await, 1, "never re-sent after a 400");
}

#[tokio::test]
async fn a_503_without_retry_after_is_not_sent_again() {
    let app = spawn_app("").await;
    mount_then_token(&app, ResponseTemplate::new(503), 1).await;

    let status = get_token(&app, password_request(APP_A, "alice", "pw-503-bare"))
        .await
        .expect_err("no Retry-After, no retry");

    assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_no_retry_info(&status);
    assert_eq!(upstream_count(&app).await, 1);
}

#[tokio::test]
async fn an_authorization_code_is_never_sent_twice() {
    let app = spawn_app("").await;
    mount_then_token(&app, status_with_retry_after(503, "1"), 1).await;
    let request = request_with(Grant::AuthorizationCode(AuthorizationCodeGrant {
        code: "code-once".to_owned(),
        ..Default::default()
    }));

    let status = get_token(&app, request)
        .await
        .expect_err("an authorization code is single-use; not replayed");

    assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(retry_delay(&status), Duration::from_secs(1));
    assert_eq!(upstream_count(&app).await, 1, "sent exactly once");
}

#[tokio::test]
async fn a_refresh_is_replayed_when_the_wait_fits_the_replay_window() {
    let app = spawn_app("").await;
    mount_then_token(&app, status_with_retry_after(503, "1"), 1).await;

    get_token(&app, refresh_request("rt-replay-ok"))
        .await
        .expect("replayed within RingCentral's ~10 s window");

    let requests = app.upstream_requests().await;
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert!(
            form(request).contains(&("refresh_token".to_owned(), "rt-replay-ok".to_owned())),
            "{:?}",
            form(request)
        );
    }
}

#[tokio::test]
async fn a_refresh_is_not_replayed_when_the_wait_runs_past_the_replay_window() {
    // request_timeout is long enough for a 12 s wait, so only the refresh window refuses it.
    let app = spawn_app(r#"request_timeout = "30s""#).await;
    mount_then_token(&app, status_with_retry_after(503, "12"), 1).await;

    // Had tokengate waited the 12 s out, this would time out (and the test would fail)
    // rather than the test waiting 12 s.
    let status = tokio::time::timeout(
        Duration::from_secs(6),
        get_token(&app, refresh_request("rt-replay-late")),
    )
    .await
    .expect("answered at once, without waiting 12 s to replay the refresh")
    .expect_err("the 503 is passed on");

    assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(retry_delay(&status), Duration::from_secs(12));
    assert_eq!(
        upstream_count(&app).await,
        1,
        "the refresh token is not spent twice"
    );
}

#[tokio::test]
async fn a_retry_after_beyond_the_callers_deadline_is_answered_before_the_deadline() {
    let app = spawn_app("").await;
    mount_then_token(&app, status_with_retry_after(503, "5"), 1).await;
    let mut request = tonic::Request::new(password_request(APP_A, "alice", "pw-deadline"));
    request.set_timeout(Duration::from_secs(1));

    let started = Instant::now();
    let status = app
        .client
        .clone()
        .get_token(request)
        .await
        .expect_err("a 5 s wait does not fit a 1 s deadline");
    let elapsed = started.elapsed();

    // The server's own answer, not the client's timer: the retry was not attempted.
    assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(retry_delay(&status), Duration::from_secs(5));
    assert!(
        elapsed < Duration::from_secs(1),
        "answered after {elapsed:?}"
    );
    assert_eq!(upstream_count(&app).await, 1);
}

#[tokio::test]
async fn attempts_are_capped_at_three() {
    let app = spawn_app("").await;
    mount_always(&app, status_with_retry_after(503, "0")).await;

    let status = get_token(&app, password_request(APP_A, "alice", "pw-cap"))
        .await
        .expect_err("the upstream never recovers");

    assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(
        upstream_count(&app).await,
        3,
        "the first attempt and two retries"
    );
}

// ---------------------------------------------------------------------------------------
// The upstream rate-limit guard
// ---------------------------------------------------------------------------------------

/// A 429 with `Retry-After: 30` for requests whose body contains every one of `needles`,
/// a token for the rest.
async fn mount_429_for(app: &TestApp, needles: &[&str]) {
    let mut limited = Mock::given(method("POST")).and(path(TOKEN_PATH));
    for needle in needles {
        limited = limited.and(body_string_contains(*needle));
    }
    limited
        .respond_with(status_with_retry_after(429, "30"))
        .with_priority(1)
        .mount(&app.upstream)
        .await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(token_ok())
        .mount(&app.upstream)
        .await;
}

/// The first call gets the upstream's 429 at once: a 30 s wait exceeds request_timeout
/// (10 s by default), so it is not waited out inside the call.
async fn first_429(app: &TestApp, request: GetTokenRequest) -> Status {
    let status = tokio::time::timeout(Duration::from_secs(5), get_token(app, request))
        .await
        .expect("a 429 that cannot be waited out is answered at once")
        .expect_err("rate-limited");
    assert_error(&status, Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED");
    assert_eq!(retry_delay(&status), Duration::from_secs(30));
    status
}

#[track_caller]
fn assert_refused_locally(status: &Status) {
    let info = assert_error(status, Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED");
    assert!(
        !info.metadata.contains_key("upstreamHttpStatus"),
        "refused locally, so there is no upstream status: {info:?}"
    );
    let wait = retry_delay(status);
    assert!(
        wait <= Duration::from_secs(30) && wait >= Duration::from_secs(20),
        "the remaining penalty, got {wait:?}"
    );
}

#[tokio::test]
async fn after_a_429_for_a_user_that_user_is_refused_locally_and_others_are_not() {
    let app = spawn_app("").await;
    mount_429_for(&app, &["username=alice", "client_id=app-a"]).await;

    first_429(&app, password_request(APP_A, "alice", "pw-alice-1")).await;
    assert_eq!(upstream_count(&app).await, 1);

    let status = get_token(&app, password_request(APP_A, "alice", "pw-alice-2"))
        .await
        .expect_err("alice is still penalised");
    assert_refused_locally(&status);
    let info = assert_error(&status, Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED");
    assert_eq!(
        info.metadata.get("clientId").map(String::as_str),
        Some(APP_A)
    );
    assert_eq!(
        info.metadata.get("grantType").map(String::as_str),
        Some("password")
    );
    assert_no_secrets(&status, &["pw-alice-2", APP_A_SECRET]);
    assert_eq!(
        upstream_count(&app).await,
        1,
        "nothing sent during the penalty (it would restart it)"
    );

    get_token(&app, password_request(APP_A, "bob", "pw-bob"))
        .await
        .expect("bob, through the same client, is not penalised");
    assert_eq!(upstream_count(&app).await, 2);

    get_token(&app, password_request(APP_POST, "alice", "pw-alice-3"))
        .await
        .expect("alice through another client is not penalised");
    assert_eq!(upstream_count(&app).await, 3);
}

#[tokio::test]
async fn after_a_429_for_a_request_without_a_user_the_whole_client_is_refused_locally() {
    let app = spawn_app("").await;
    mount_429_for(&app, &["grant_type=client_credentials", "client_id=app-a"]).await;

    first_429(
        &app,
        request_with(Grant::ClientCredentials(ClientCredentialsGrant::default())),
    )
    .await;

    let status = get_token(&app, password_request(APP_A, "dave", "pw-dave"))
        .await
        .expect_err("every user of the client waits");
    assert_refused_locally(&status);
    let status = get_token(
        &app,
        request_with(Grant::ClientCredentials(ClientCredentialsGrant::default())),
    )
    .await
    .expect_err("and so does the client itself");
    assert_refused_locally(&status);
    assert_eq!(upstream_count(&app).await, 1, "nothing more was sent");

    get_token(&app, password_request(APP_POST, "dave", "pw-dave"))
        .await
        .expect("another client is not penalised");
    assert_eq!(upstream_count(&app).await, 2);
}

#[tokio::test]
async fn a_jwt_bearer_grant_is_penalised_by_the_subject_of_its_assertion() {
    let app = spawn_app("").await;
    let u1_first = unsigned_jwt(&json!({"sub": "u1", "jti": "first"}));
    let u1_second = unsigned_jwt(&json!({"sub": "u1", "jti": "second"}));
    let u2 = unsigned_jwt(&json!({"sub": "u2", "jti": "first"}));
    mount_429_for(&app, &[&u1_first]).await;

    first_429(&app, jwt_request(&u1_first)).await;

    let status = get_token(&app, jwt_request(&u1_second))
        .await
        .expect_err("another assertion for the same subject waits too");
    assert_refused_locally(&status);
    assert_eq!(upstream_count(&app).await, 1);

    get_token(&app, jwt_request(&u2))
        .await
        .expect("another subject is not penalised");
    assert_eq!(upstream_count(&app).await, 2);
}

// ---------------------------------------------------------------------------------------
// Overload
// ---------------------------------------------------------------------------------------

/// How long the slow upstream holds each call; every "while in flight" check has this
/// much slack.
const SLOW: Duration = Duration::from_secs(3);

async fn overload_app(server: &str) -> TestApp {
    let app = AppSpec::default().server(server).spawn().await;
    mount_always(&app, token_ok().set_delay(SLOW)).await;
    app
}

/// Starts a call that will hold the only slot, and waits until the upstream has it.
async fn occupy_the_slot(
    app: &TestApp,
) -> tokio::task::JoinHandle<Result<GetTokenResponse, Status>> {
    let mut client = app.client.clone();
    let first = tokio::spawn(async move {
        client
            .get_token(password_request(APP_A, "first", "pw-first"))
            .await
            .map(tonic::Response::into_inner)
    });
    wait_for_upstream_requests(app, 1).await;
    first
}

#[tokio::test]
async fn with_no_queue_a_call_beyond_the_limit_is_shed_at_once() {
    let app = overload_app("max_concurrent_calls = 1\nmax_queued_calls = 0").await;
    let first = occupy_the_slot(&app).await;

    let status = get_token(&app, password_request(APP_A, "second", "pw-second"))
        .await
        .expect_err("no slot, no queue");

    assert!(
        !first.is_finished(),
        "the refusal must come while the first call is still in flight, not after it"
    );
    assert_error(&status, Code::ResourceExhausted, "OVERLOADED");
    assert!(retry_delay(&status) > Duration::ZERO);
    first
        .await
        .expect("no panic")
        .expect("the call in flight is unaffected");
    assert_eq!(upstream_count(&app).await, 1, "the shed call was not sent");
}

#[tokio::test]
async fn a_queued_call_waits_for_the_slot_and_a_call_beyond_the_queue_is_shed() {
    let app = overload_app("max_concurrent_calls = 1\nmax_queued_calls = 1").await;
    let first = occupy_the_slot(&app).await;

    // Two more at once: whichever arrives first takes the one queue place, the other is
    // shed. Each reports when it ends.
    let (done, mut ended) = tokio::sync::mpsc::unbounded_channel();
    for user in ["second", "third"] {
        let mut client = app.client.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let result = client
                .get_token(password_request(APP_A, user, "pw-more"))
                .await
                .map(tonic::Response::into_inner);
            let _ = done.send(result);
        });
    }

    let shed = ended
        .recv()
        .await
        .expect("a result")
        .expect_err("the call beyond the queue is shed");
    assert!(
        !first.is_finished(),
        "shed while the first call is still in flight"
    );
    assert_error(&shed, Code::ResourceExhausted, "OVERLOADED");
    assert!(retry_delay(&shed) > Duration::ZERO);

    let queued = ended.recv().await.expect("a result");
    assert!(
        first.is_finished(),
        "the queued call ends only after the slot is released"
    );
    queued.expect("the queued call gets its turn and succeeds");
    first.await.expect("no panic").expect("the first succeeds");
    assert_eq!(upstream_count(&app).await, 2, "first and the queued call");
}

// The production binary serves on a multi-thread runtime; so does this test (as in
// `deadline.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_call_whose_deadline_passes_gets_deadline_exceeded() {
    let app = overload_app("max_concurrent_calls = 1\nmax_queued_calls = 4").await;
    let first = occupy_the_slot(&app).await;

    let status = raw_get_token(
        &app,
        "300m",
        &password_request(APP_A, "queued", "pw-queued"),
    )
    .await;

    assert!(
        !first.is_finished(),
        "the deadline ended the wait, not a freed slot"
    );
    assert_error(&status, Code::DeadlineExceeded, "DEADLINE_EXCEEDED");
    first.await.expect("no panic").expect("the first succeeds");
    assert_eq!(
        upstream_count(&app).await,
        1,
        "the expired call was not sent"
    );
}

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

const MAX_FIELD: usize = 8 * 1024;

async fn assert_field_refused(request: GetTokenRequest, field: &str) {
    let app = spawn_app("").await;
    mount_always(&app, token_ok()).await;

    let status = get_token(&app, request)
        .await
        .expect_err("an over-long field is refused");

    assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");
    assert_eq!(bad_request_fields(&status), vec![field.to_owned()]);
    assert_eq!(upstream_count(&app).await, 0, "nothing sent upstream");
}

#[tokio::test]
async fn an_assertion_one_byte_over_8_kib_is_invalid_argument_naming_it() {
    assert_field_refused(
        jwt_request(&"a".repeat(MAX_FIELD + 1)),
        "jwt_bearer.assertion",
    )
    .await;
}

#[tokio::test]
async fn a_scope_one_byte_over_8_kib_is_invalid_argument_naming_it() {
    let app = spawn_app("").await;
    mount_always(&app, token_ok()).await;
    let mut request = password_request(APP_A, "alice", "pw-scope");
    request.scopes = vec!["ReadAccounts".to_owned(), "s".repeat(MAX_FIELD + 1)];

    let status = get_token(&app, request)
        .await
        .expect_err("an over-long scope is refused");

    assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");
    // The joined `scope` field is over the cap too, and may be named beside the entry.
    let fields = bad_request_fields(&status);
    assert!(fields.contains(&"scopes[1]".to_owned()), "{fields:?}");
    assert_eq!(upstream_count(&app).await, 0, "nothing sent upstream");
}

#[tokio::test]
async fn a_client_id_one_byte_over_8_kib_is_invalid_argument_naming_it() {
    let request = password_request(&"c".repeat(MAX_FIELD + 1), "alice", "pw-client");
    assert_field_refused(request, "client_id").await;
}

#[tokio::test]
async fn fields_of_exactly_8_kib_are_accepted_and_sent() {
    let app = spawn_app("").await;
    mount_always(&app, token_ok()).await;
    let assertion = "a".repeat(MAX_FIELD);
    let scope = "s".repeat(MAX_FIELD);
    let client_id = "c".repeat(MAX_FIELD);
    let mut request = jwt_request(&assertion);
    request.scopes = vec![scope.clone()];
    request.client_id.clone_from(&client_id);

    get_token(&app, request)
        .await
        .expect("8192 bytes is within the limit");

    let requests = app.upstream_requests().await;
    assert_eq!(requests.len(), 1);
    let sent = form(&requests[0]);
    for (name, value) in [
        ("assertion", &assertion),
        ("scope", &scope),
        ("client_id", &client_id),
    ] {
        assert!(
            sent.contains(&(name.to_owned(), value.clone())),
            "{name} sent whole"
        );
    }
}

/// A password request whose first `n` string fields (of eight) are each exactly 8 KiB:
/// every field is valid on its own.
#[allow(
    deprecated,
    reason = "the deprecated password fields are strings like any other"
)]
fn request_of_full_fields(n: usize) -> GetTokenRequest {
    let mut values = (0..8).map(|i| {
        if i < n {
            format!("{i}{}", "v".repeat(MAX_FIELD - 1))
        } else {
            String::new()
        }
    });
    let mut next = || values.next().expect("eight values");
    let (username, password, extension, pin) = (next(), next(), next(), next());
    let (client_id, endpoint_id, scope, client_assertion) = (next(), next(), next(), next());
    GetTokenRequest {
        grant: Some(Grant::Password(tokengate::proto::PasswordGrant {
            username,
            password,
            extension,
            pin,
        })),
        client_id,
        endpoint_id,
        scopes: if scope.is_empty() {
            vec![]
        } else {
            vec![scope]
        },
        client_assertion: (!client_assertion.is_empty()).then_some(
            tokengate::proto::ClientAssertion {
                assertion: client_assertion,
            },
        ),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_request_near_but_under_64_kib_is_decoded_and_sent() {
    let app = spawn_app("").await;
    mount_always(&app, token_ok()).await;
    let request = request_of_full_fields(7);
    assert!(request.encoded_len() > 56 * 1024 && request.encoded_len() < 64 * 1024);

    get_token(&app, request)
        .await
        .expect("a large but valid request is served");
    assert_eq!(upstream_count(&app).await, 1);
}

#[tokio::test]
async fn a_request_over_64_kib_is_refused_before_decoding() {
    let app = spawn_app("").await;
    mount_always(&app, token_ok()).await;
    // Every field is within its own limit; only the message as a whole is too large.
    let request = request_of_full_fields(8);
    assert!(request.encoded_len() > 64 * 1024);

    let status = get_token(&app, request)
        .await
        .expect_err("the message is too large");

    // tonic's decoder refuses a message above max_decoding_message_size with OUT_OF_RANGE.
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("too large"),
        "tonic's message: {status:?}"
    );
    assert_eq!(upstream_count(&app).await, 0, "nothing sent upstream");

    // The connection is still good for the next call.
    get_token(&app, password_request(APP_A, "alice", "pw-after"))
        .await
        .expect("served");
}

// ---------------------------------------------------------------------------------------
// Upstream TLS
// ---------------------------------------------------------------------------------------

/// An HTTPS token endpoint with a certificate for 127.0.0.1 issued by a throwaway CA that
/// no trust store knows. It answers every request with a token over HTTP/1.1 and records
/// each request it read.
struct TlsUpstream {
    base_url: String,
    ca_file: tempfile::NamedTempFile,
    requests: Arc<Mutex<Vec<String>>>,
    /// TCP connections accepted, whatever became of their handshakes.
    connections: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TlsUpstream {
    async fn start() -> Self {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "tokengate test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("a CA");
        let issuer: &rcgen::Issuer<'_, rcgen::KeyPair> = &ca;

        let leaf_key = rcgen::KeyPair::generate().expect("a server key");
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .signed_by(&leaf_key, issuer)
            .expect("a server certificate");

        let ca_file = tempfile::NamedTempFile::new().expect("a temp file");
        std::fs::write(ca_file.path(), ca.pem()).expect("write the CA");

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .expect("a server config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("an address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&requests);
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::clone(&connections);
        let server = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    // A client that does not trust us aborts the handshake: nothing to do.
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        serve_one(tls, &seen).await;
                    }
                });
            }
        });
        Self {
            base_url: format!("https://{addr}"),
            ca_file,
            requests,
            connections,
            server,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("not poisoned").clone()
    }
}

/// Reads one HTTP/1.1 request (headers and a `Content-Length` body) and answers a token.
async fn serve_one<S>(mut stream: S, seen: &Mutex<Vec<String>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let mut buf = Vec::new();
    let mut chunk = [0_u8; 4096];
    let complete = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                break true;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    if !complete {
        return;
    }
    seen.lock()
        .expect("not poisoned")
        .push(String::from_utf8_lossy(&buf).into_owned());
    let body = json!({"access_token": "at-over-tls", "token_type": "bearer"}).to_string();
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

#[tokio::test]
async fn an_https_upstream_with_an_unknown_ca_is_refused_without_ca_file() {
    let tls = TlsUpstream::start().await;
    let app = AppSpec::default().base_url(&tls.base_url).spawn().await;

    let status = get_token(&app, password_request(APP_A, "alice", "pw-untrusted"))
        .await
        .expect_err("the certificate is not trusted");

    assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_no_secrets(&status, &["pw-untrusted", APP_A_SECRET]);
    assert!(
        tls.connections.load(Ordering::SeqCst) >= 1,
        "tokengate did reach the server; the handshake is what failed"
    );
    assert!(
        tls.requests().is_empty(),
        "no request may cross an untrusted TLS session: {:?}",
        tls.requests()
    );
}

#[tokio::test]
async fn an_https_upstream_is_trusted_through_ca_file() {
    let tls = TlsUpstream::start().await;
    let app = AppSpec::default()
        .base_url(&tls.base_url)
        .upstream(&format!("ca_file = {:?}", tls.ca_file.path()))
        .spawn()
        .await;

    let token = get_token(&app, password_request(APP_A, "alice", "pw-trusted"))
        .await
        .expect("the upstream's CA is trusted through ca_file");

    assert_eq!(token.access_token, "at-over-tls");
    let requests = tls.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert!(
        requests[0].starts_with(&format!("POST {TOKEN_PATH} HTTP/1.1\r\n")),
        "{:?}",
        requests[0]
    );
    assert!(requests[0].contains("grant_type=password"));
}
