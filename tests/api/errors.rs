//! Contract §2, one test per row: an upstream answering a given way becomes exactly this
//! gRPC code, ErrorInfo reason and metadata, RetryInfo when a wait is known, and never
//! carries a secret from the request.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tokengate::proto::get_token_request::Grant;
use tokengate::proto::{ClientAssertion, GetTokenRequest, JwtBearerGrant, RevokeTokenRequest};
use tonic::{Code, Status};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

const USERNAME: &str = "alice@example.com";
const PASSWORD: &str = "pw-Zq8-hunter2";
const REQUEST_ID: &str = "8a2f44c0-rc-request-id";

/// Every secret a password request through `app-a` carries, plus every configured one.
fn secrets() -> Vec<String> {
    let mut all = config_secrets();
    all.push(PASSWORD.to_owned());
    all
}

fn metadata(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A RingCentral-shaped OAuth error body.
fn rc_error(error: &str, description: &str, code: &str) -> serde_json::Value {
    json!({
        "error": error,
        "error_description": description,
        "errors": [{"errorCode": code, "message": description, "parameters": []}],
    })
}

/// Sends a password grant through `app-a` to an upstream answering `reply`; returns the
/// status after checking that it carries no secret.
async fn password_call_against(app: &mut TestApp, reply: ResponseTemplate) -> Status {
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(reply)
        .mount(&app.upstream)
        .await;
    let status = app
        .client
        .get_token(password_request(APP_A, USERNAME, PASSWORD))
        .await
        .expect_err("the upstream's refusal becomes an error");
    assert_no_secrets(&status, &secrets());
    status
}

async fn password_call(reply: ResponseTemplate) -> Status {
    let mut app = spawn_app("").await;
    password_call_against(&mut app, reply).await
}

/// An OAuth error in a 400 (how RingCentral answers most of them), with `RCRequestId`.
/// Asserts the code, the reason, the complete metadata, and that nothing was retried.
async fn oauth_error_case(error: &str, code: &str, grpc_code: Code, reason: &str) -> Status {
    let description = format!("upstream says {error}");
    let mut app = spawn_app("").await;
    let reply = ResponseTemplate::new(400)
        .insert_header("RCRequestId", REQUEST_ID)
        .set_body_json(rc_error(error, &description, code));
    let status = password_call_against(&mut app, reply).await;

    let info = assert_error(&status, grpc_code, reason);
    assert_eq!(
        info.metadata,
        metadata(&[
            ("oauthError", error),
            ("oauthErrorDescription", &description),
            ("upstreamErrorCode", code),
            ("upstreamHttpStatus", "400"),
            ("upstreamRequestId", REQUEST_ID),
            ("grantType", "password"),
            ("clientId", APP_A),
        ])
    );
    assert_eq!(
        app.upstream_requests().await.len(),
        1,
        "a 400 is never retried"
    );
    status
}

#[tokio::test]
async fn upstream_invalid_request_is_invalid_argument() {
    let status = oauth_error_case(
        "invalid_request",
        "OAU-101",
        Code::InvalidArgument,
        "INVALID_REQUEST",
    )
    .await;
    assert_no_retry_info(&status);
}

#[tokio::test]
async fn upstream_invalid_client_with_configured_credentials_is_failed_precondition() {
    let status = oauth_error_case(
        "invalid_client",
        "OAU-123",
        Code::FailedPrecondition,
        "INVALID_CLIENT",
    )
    .await;
    assert_no_retry_info(&status);
}

#[tokio::test]
async fn upstream_invalid_client_with_the_callers_assertion_is_unauthenticated() {
    let mut app = spawn_app("").await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(
            ResponseTemplate::new(400)
                .insert_header("RCRequestId", REQUEST_ID)
                .set_body_json(rc_error(
                    "invalid_client",
                    "Invalid client assertion",
                    "OAU-123",
                )),
        )
        .mount(&app.upstream)
        .await;
    let request = GetTokenRequest {
        grant: Some(Grant::JwtBearer(JwtBearerGrant {
            assertion: "eyJ.user-jwt-7731.sig".into(),
        })),
        client_id: APP_A.into(),
        client_assertion: Some(ClientAssertion {
            assertion: "eyJ.client-jwt-9902.sig".into(),
        }),
        ..Default::default()
    };

    let status = app.client.get_token(request).await.expect_err("refused");

    let info = assert_error(&status, Code::Unauthenticated, "INVALID_CLIENT");
    assert_eq!(
        info.metadata,
        metadata(&[
            ("oauthError", "invalid_client"),
            ("oauthErrorDescription", "Invalid client assertion"),
            ("upstreamErrorCode", "OAU-123"),
            ("upstreamHttpStatus", "400"),
            ("upstreamRequestId", REQUEST_ID),
            ("grantType", "jwt_bearer"),
            ("clientId", APP_A),
        ])
    );
    assert_no_retry_info(&status);
    let mut secrets = config_secrets();
    secrets.extend([
        "eyJ.user-jwt-7731.sig".to_owned(),
        "eyJ.client-jwt-9902.sig".to_owned(),
    ]);
    assert_no_secrets(&status, &secrets);
}

#[tokio::test]
async fn upstream_invalid_grant_is_unauthenticated() {
    let status = oauth_error_case(
        "invalid_grant",
        "OAU-140",
        Code::Unauthenticated,
        "INVALID_GRANT",
    )
    .await;
    assert_no_retry_info(&status);
}

#[tokio::test]
async fn upstream_unauthorized_client_is_permission_denied() {
    let status = oauth_error_case(
        "unauthorized_client",
        "OAU-251",
        Code::PermissionDenied,
        "UNAUTHORIZED_CLIENT",
    )
    .await;
    assert_no_retry_info(&status);
}

#[tokio::test]
async fn upstream_unsupported_grant_type_is_unimplemented() {
    let status = oauth_error_case(
        "unsupported_grant_type",
        "OAU-250",
        Code::Unimplemented,
        "UNSUPPORTED_GRANT_TYPE",
    )
    .await;
    assert_no_retry_info(&status);
}

#[tokio::test]
async fn upstream_invalid_scope_is_invalid_argument() {
    let status = oauth_error_case(
        "invalid_scope",
        "OAU-130",
        Code::InvalidArgument,
        "INVALID_SCOPE",
    )
    .await;
    assert_no_retry_info(&status);
}

#[tokio::test]
async fn upstream_access_denied_is_permission_denied() {
    let status = oauth_error_case(
        "access_denied",
        "OAU-199",
        Code::PermissionDenied,
        "ACCESS_DENIED",
    )
    .await;
    assert_no_retry_info(&status);
}

#[tokio::test]
async fn upstream_authorization_pending_is_failed_precondition_retrying_after_5_seconds() {
    let status = oauth_error_case(
        "authorization_pending",
        "OAU-190",
        Code::FailedPrecondition,
        "AUTHORIZATION_PENDING",
    )
    .await;
    assert_eq!(retry_delay(&status), Duration::from_secs(5));
}

#[tokio::test]
async fn upstream_slow_down_is_resource_exhausted_with_a_retry_delay() {
    let status =
        oauth_error_case("slow_down", "OAU-191", Code::ResourceExhausted, "SLOW_DOWN").await;
    assert!(
        retry_delay(&status) > Duration::ZERO,
        "slow_down must suggest a wait"
    );
}

#[tokio::test]
async fn upstream_expired_token_is_failed_precondition() {
    let status = oauth_error_case(
        "expired_token",
        "OAU-192",
        Code::FailedPrecondition,
        "EXPIRED_TOKEN",
    )
    .await;
    assert_no_retry_info(&status);
}

/// An OAuth `error` value the contract does not name, with the given HTTP status.
async fn unknown_oauth_error(http_status: u16) -> Status {
    let status = password_call(
        ResponseTemplate::new(http_status)
            .insert_header("RCRequestId", REQUEST_ID)
            .set_body_json(rc_error("mystery_error", "something else", "XYZ-999")),
    )
    .await;
    let info = details(&status).error_info.expect("ErrorInfo");
    assert_eq!(
        info.metadata,
        metadata(&[
            ("oauthError", "mystery_error"),
            ("oauthErrorDescription", "something else"),
            ("upstreamErrorCode", "XYZ-999"),
            ("upstreamHttpStatus", &http_status.to_string()),
            ("upstreamRequestId", REQUEST_ID),
            ("grantType", "password"),
            ("clientId", APP_A),
        ])
    );
    status
}

#[tokio::test]
async fn an_unknown_oauth_error_with_401_is_unauthenticated_upstream_error() {
    let status = unknown_oauth_error(401).await;
    assert_error(&status, Code::Unauthenticated, "UPSTREAM_ERROR");
}

#[tokio::test]
async fn an_unknown_oauth_error_with_403_is_permission_denied_upstream_error() {
    let status = unknown_oauth_error(403).await;
    assert_error(&status, Code::PermissionDenied, "UPSTREAM_ERROR");
}

#[tokio::test]
async fn an_unknown_oauth_error_with_400_is_failed_precondition_upstream_error() {
    let status = unknown_oauth_error(400).await;
    assert_error(&status, Code::FailedPrecondition, "UPSTREAM_ERROR");
}

#[tokio::test]
async fn a_body_with_only_the_ringcentral_error_code_oau_140_is_invalid_grant() {
    let status = password_call(
        ResponseTemplate::new(400)
            .insert_header("RCRequestId", REQUEST_ID)
            .set_body_json(json!({"errors": [{"errorCode": "OAU-140", "message": "Invalid resource owner credentials"}]})),
    )
    .await;

    let info = assert_error(&status, Code::Unauthenticated, "INVALID_GRANT");
    assert_eq!(
        info.metadata.get("upstreamErrorCode").map(String::as_str),
        Some("OAU-140")
    );
    assert_eq!(
        info.metadata.get("upstreamHttpStatus").map(String::as_str),
        Some("400")
    );
    assert_eq!(
        info.metadata.get("upstreamRequestId").map(String::as_str),
        Some(REQUEST_ID)
    );
    assert_eq!(
        info.metadata.get("oauthError"),
        None,
        "the body had no `error` field"
    );
}

#[tokio::test]
async fn a_password_echoed_by_the_upstream_is_scrubbed_from_message_and_details() {
    let description = format!("Invalid password {PASSWORD} for {USERNAME} (client {APP_A_SECRET})");
    let status = password_call(
        ResponseTemplate::new(400)
            .insert_header("RCRequestId", REQUEST_ID)
            .set_body_json(json!({
                "error": "invalid_grant",
                "error_description": description,
                "errors": [{"errorCode": "OAU-140", "message": description}],
            })),
    )
    .await;

    // password_call already asserted that neither secret appears anywhere in the status.
    let info = assert_error(&status, Code::Unauthenticated, "INVALID_GRANT");
    let shown = info
        .metadata
        .get("oauthErrorDescription")
        .expect("the description is kept, scrubbed");
    assert!(
        shown.starts_with("Invalid password ") && shown.contains(USERNAME),
        "the non-secret text stays: {shown}"
    );
}

#[tokio::test]
async fn http_429_with_retry_after_is_resource_exhausted_retrying_after_that_wait() {
    let status = password_call(
        ResponseTemplate::new(429)
            .insert_header("Retry-After", "7")
            .insert_header("RCRequestId", REQUEST_ID)
            .set_body_json(
                json!({"errorCode": "CMN-301", "message": "Request rate exceeded",
                   "errors": [{"errorCode": "CMN-301", "message": "Request rate exceeded"}]}),
            ),
    )
    .await;

    let info = assert_error(&status, Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED");
    assert_eq!(retry_delay(&status), Duration::from_secs(7));
    assert_eq!(
        info.metadata.get("upstreamHttpStatus").map(String::as_str),
        Some("429")
    );
    assert_eq!(
        info.metadata.get("upstreamRequestId").map(String::as_str),
        Some(REQUEST_ID)
    );
    assert_eq!(
        info.metadata.get("upstreamErrorCode").map(String::as_str),
        Some("CMN-301")
    );
    assert_eq!(
        info.metadata.get("grantType").map(String::as_str),
        Some("password")
    );
    assert_eq!(
        info.metadata.get("clientId").map(String::as_str),
        Some(APP_A)
    );
}

#[tokio::test]
async fn http_429_without_retry_after_suggests_30_seconds() {
    let status = password_call(ResponseTemplate::new(429)).await;

    let info = assert_error(&status, Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED");
    assert_eq!(retry_delay(&status), Duration::from_secs(30));
    assert_eq!(
        info.metadata.get("upstreamHttpStatus").map(String::as_str),
        Some("429")
    );
}

#[tokio::test]
async fn http_500_is_unavailable() {
    let status = password_call(
        ResponseTemplate::new(500)
            .insert_header("RCRequestId", REQUEST_ID)
            .set_body_json(json!({"message": "Internal Server Error"})),
    )
    .await;

    let info = assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_no_retry_info(&status);
    assert_eq!(
        info.metadata,
        metadata(&[
            ("upstreamHttpStatus", "500"),
            ("upstreamRequestId", REQUEST_ID),
            ("grantType", "password"),
            ("clientId", APP_A),
        ])
    );
}

#[tokio::test]
async fn http_502_with_an_html_body_is_unavailable() {
    let status = password_call(ResponseTemplate::new(502).set_body_raw(
        "<html><body><h1>502 Bad Gateway</h1></body></html>",
        "text/html",
    ))
    .await;

    let info = assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_no_retry_info(&status);
    assert_eq!(
        info.metadata.get("upstreamHttpStatus").map(String::as_str),
        Some("502")
    );
    assert_eq!(info.metadata.get("oauthError"), None);
}

#[tokio::test]
async fn http_503_with_retry_after_is_unavailable_retrying_after_that_wait() {
    let status = password_call(ResponseTemplate::new(503).insert_header("Retry-After", "3")).await;

    let info = assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(retry_delay(&status), Duration::from_secs(3));
    assert_eq!(
        info.metadata.get("upstreamHttpStatus").map(String::as_str),
        Some("503")
    );
}

#[tokio::test]
async fn a_refused_connection_is_unavailable() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        listener.local_addr().expect("bound").port()
    };
    let mut app = AppSpec::default()
        .base_url(format!("http://127.0.0.1:{port}"))
        .spawn()
        .await;

    let status = app
        .client
        .get_token(password_request(APP_A, USERNAME, PASSWORD))
        .await
        .expect_err("no upstream");

    let info = assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(
        info.metadata,
        metadata(&[("grantType", "password"), ("clientId", APP_A)])
    );
    assert_no_retry_info(&status);
    assert_no_secrets(&status, &secrets());
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_unavailable_upstream_timeout() {
    let mut app = spawn_app(r#"request_timeout = "300ms""#).await;
    let started = std::time::Instant::now();
    let status = password_call_against(
        &mut app,
        ResponseTemplate::new(200)
            .set_body_json(json!({"access_token": "too-late"}))
            .set_delay(Duration::from_secs(30)),
    )
    .await;

    assert_error(&status, Code::Unavailable, "UPSTREAM_TIMEOUT");
    assert_no_retry_info(&status);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the 300 ms request_timeout bounds the call"
    );
}

#[tokio::test]
async fn truncated_json_on_200_is_a_bad_response() {
    let status = password_call(ResponseTemplate::new(200).set_body_raw(
        r#"{"access_token":"at-cut","expires_in":36"#,
        "application/json",
    ))
    .await;

    let info = assert_error(&status, Code::Unavailable, "UPSTREAM_BAD_RESPONSE");
    assert_eq!(
        info.metadata.get("upstreamHttpStatus").map(String::as_str),
        Some("200")
    );
    assert_no_retry_info(&status);
}

#[tokio::test]
async fn a_2_mib_body_is_a_bad_response() {
    let body = format!(r#"{{"access_token":"{}"}}"#, "a".repeat(2 * 1024 * 1024));
    let status =
        password_call(ResponseTemplate::new(200).set_body_raw(body, "application/json")).await;

    assert_error(&status, Code::Unavailable, "UPSTREAM_BAD_RESPONSE");
    assert!(
        status.message().len() < 4096,
        "the body is not echoed: {} bytes",
        status.message().len()
    );
    assert!(
        status.details().len() < 4096,
        "the body is not echoed in details"
    );
}

#[tokio::test]
async fn a_200_without_access_token_is_a_bad_response() {
    let status = password_call(
        ResponseTemplate::new(200)
            .set_body_json(json!({"token_type": "bearer", "expires_in": 3600})),
    )
    .await;

    assert_error(&status, Code::Unavailable, "UPSTREAM_BAD_RESPONSE");
}

#[tokio::test]
async fn a_200_with_an_empty_access_token_is_a_bad_response() {
    let status = password_call(
        ResponseTemplate::new(200).set_body_json(json!({"access_token": "", "expires_in": 3600})),
    )
    .await;

    assert_error(&status, Code::Unavailable, "UPSTREAM_BAD_RESPONSE");
}

#[tokio::test]
async fn a_200_with_an_html_body_is_a_bad_response() {
    let status = password_call(
        ResponseTemplate::new(200).set_body_raw("<html><body>Sign in</body></html>", "text/html"),
    )
    .await;

    assert_error(&status, Code::Unavailable, "UPSTREAM_BAD_RESPONSE");
}

#[tokio::test]
async fn a_400_whose_body_is_not_an_oauth_error_is_a_bad_response() {
    let status = password_call(
        ResponseTemplate::new(400)
            .set_body_raw("<html><body>Bad Request</body></html>", "text/html"),
    )
    .await;

    let info = assert_error(&status, Code::Unavailable, "UPSTREAM_BAD_RESPONSE");
    assert_eq!(
        info.metadata.get("upstreamHttpStatus").map(String::as_str),
        Some("400")
    );
}

#[tokio::test]
async fn a_revocation_refused_upstream_maps_like_a_token_error_without_a_grant_type() {
    let mut app = spawn_app("").await;
    Mock::given(method("POST"))
        .and(path(REVOKE_PATH))
        .respond_with(
            ResponseTemplate::new(400)
                .insert_header("RCRequestId", REQUEST_ID)
                .set_body_json(rc_error(
                    "invalid_request",
                    "Token rt-revoke-6621 is malformed",
                    "OAU-101",
                )),
        )
        .mount(&app.upstream)
        .await;

    let status = app
        .client
        .revoke_token(RevokeTokenRequest {
            token: "rt-revoke-6621".into(),
            client_id: APP_A.into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");

    let info = assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");
    assert_eq!(
        info.metadata.get("grantType"),
        None,
        "revocation has no grant"
    );
    assert_eq!(
        info.metadata.get("clientId").map(String::as_str),
        Some(APP_A)
    );
    assert_eq!(
        info.metadata.get("upstreamRequestId").map(String::as_str),
        Some(REQUEST_ID)
    );
    let mut secrets = config_secrets();
    secrets.push("rt-revoke-6621".to_owned());
    assert_no_secrets(&status, &secrets);
}

#[tokio::test]
async fn error_metadata_values_are_capped_at_256_characters() {
    let long_description = "d".repeat(1000);
    let long_request_id = "r".repeat(300);
    let status = password_call(
        ResponseTemplate::new(400)
            .insert_header("RCRequestId", long_request_id.as_str())
            .set_body_json(rc_error("invalid_grant", &long_description, "OAU-140")),
    )
    .await;

    let info = assert_error(&status, Code::Unauthenticated, "INVALID_GRANT");
    for (key, value) in &info.metadata {
        assert!(
            value.chars().count() <= 256,
            "metadata {key} has {} characters",
            value.chars().count()
        );
    }
    assert_eq!(
        info.metadata.get("oauthErrorDescription"),
        Some(&"d".repeat(256))
    );
    assert_eq!(
        info.metadata.get("upstreamRequestId"),
        Some(&"r".repeat(256))
    );
}

#[tokio::test]
async fn a_connection_closed_without_a_reply_is_unavailable() {
    // An "upstream" that accepts every connection and closes it at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let addr = listener.local_addr().expect("bound");
    let closer = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let mut app = AppSpec::default()
        .base_url(format!("http://{addr}"))
        .spawn()
        .await;

    let status = app
        .client
        .get_token(password_request(APP_A, USERNAME, PASSWORD))
        .await
        .expect_err("no reply");

    let info = assert_error(&status, Code::Unavailable, "UPSTREAM_UNAVAILABLE");
    assert_eq!(
        info.metadata,
        metadata(&[("grantType", "password"), ("clientId", APP_A)])
    );
    assert_no_secrets(&status, &secrets());
    closer.abort();
}
