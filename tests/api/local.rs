//! Requests refused before anything goes upstream: validation and client resolution.

use std::collections::HashMap;

use tokengate::proto::get_token_request::Grant;
use tokengate::proto::{GetTokenRequest, PasswordGrant};
use tonic::Code;

use crate::helpers::*;

/// Asserts that the upstream saw nothing at all.
async fn assert_nothing_sent_upstream(app: &TestApp) {
    let requests = app.upstream_requests().await;
    assert!(
        requests.is_empty(),
        "a locally refused request reached the upstream: {requests:?}"
    );
}

#[tokio::test]
async fn a_request_without_a_grant_is_invalid_argument_naming_the_grant_field() {
    let mut app = spawn_app("").await;
    let request = GetTokenRequest {
        client_id: APP_A.into(),
        ..Default::default()
    };

    let status = app.client.get_token(request).await.expect_err("refused");

    assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");
    assert_eq!(bad_request_fields(&status), ["grant"]);
    assert_no_secrets(&status, &config_secrets());
    assert_nothing_sent_upstream(&app).await;
}

#[tokio::test]
async fn a_missing_required_grant_field_is_invalid_argument_naming_its_path() {
    let mut app = spawn_app("").await;
    let request = GetTokenRequest {
        grant: Some(Grant::Password(PasswordGrant {
            username: "alice".into(),
            ..Default::default()
        })),
        client_id: APP_A.into(),
        ..Default::default()
    };

    let status = app.client.get_token(request).await.expect_err("refused");

    let info = assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");
    assert_eq!(bad_request_fields(&status), ["password.password"]);
    assert_eq!(
        info.metadata.get("grantType").map(String::as_str),
        Some("password")
    );
    assert_nothing_sent_upstream(&app).await;
}

#[tokio::test]
async fn a_scope_containing_whitespace_is_invalid_argument_naming_its_index() {
    let mut app = spawn_app("").await;
    let request = GetTokenRequest {
        scopes: vec!["ReadAccounts SMS".into()],
        ..password_request(APP_A, "alice", "pw-scope-1")
    };

    let status = app.client.get_token(request).await.expect_err("refused");

    assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");
    assert_eq!(bad_request_fields(&status), ["scopes[0]"]);
    assert_no_secrets(&status, &["pw-scope-1"]);
    assert_nothing_sent_upstream(&app).await;
}

#[tokio::test]
async fn a_ttl_with_fractional_seconds_is_invalid_argument_naming_the_ttl() {
    let mut app = spawn_app("").await;
    let request = GetTokenRequest {
        access_token_ttl: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 500_000_000,
        }),
        ..password_request(APP_A, "alice", "pw-ttl-1")
    };

    let status = app.client.get_token(request).await.expect_err("refused");

    assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");
    assert_eq!(bad_request_fields(&status), ["access_token_ttl"]);
    assert_nothing_sent_upstream(&app).await;
}

#[tokio::test]
async fn every_violation_is_reported_at_once() {
    let mut app = spawn_app("").await;
    let request = GetTokenRequest {
        grant: Some(Grant::Password(PasswordGrant::default())),
        scopes: vec!["ok".into(), "two words".into()],
        refresh_token_ttl: Some(prost_types::Duration {
            seconds: 0,
            nanos: 0,
        }),
        ..Default::default()
    };

    let status = app.client.get_token(request).await.expect_err("refused");

    assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");
    let mut fields = bad_request_fields(&status);
    fields.sort();
    assert_eq!(
        fields,
        [
            "password.password",
            "password.username",
            "refresh_token_ttl",
            "scopes[1]"
        ]
    );
    assert_nothing_sent_upstream(&app).await;
}

#[tokio::test]
async fn an_unknown_client_is_permission_denied_when_public_clients_are_not_allowed() {
    let mut app = AppSpec::default().allow_public(false).spawn().await;

    let status = app
        .client
        .get_token(password_request("stranger-app", "alice", "pw-unknown-1"))
        .await
        .expect_err("refused");

    let info = assert_error(&status, Code::PermissionDenied, "UNKNOWN_CLIENT");
    assert_eq!(
        info.metadata.get("clientId").map(String::as_str),
        Some("stranger-app")
    );
    assert_eq!(
        info.metadata.get("grantType").map(String::as_str),
        Some("password")
    );
    assert_no_retry_info(&status);
    assert_no_secrets(&status, &["pw-unknown-1"]);
    assert_nothing_sent_upstream(&app).await;
}

#[tokio::test]
async fn a_grant_outside_the_clients_allowed_grants_is_permission_denied() {
    let mut app = spawn_app("").await;

    let status = app
        .client
        .get_token(password_request(APP_LIMITED, "alice", "pw-limited-1"))
        .await
        .expect_err("refused");

    let info = assert_error(&status, Code::PermissionDenied, "GRANT_NOT_ALLOWED");
    let expected: HashMap<String, String> = [("grantType", "password"), ("clientId", APP_LIMITED)]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .into();
    assert_eq!(info.metadata, expected);
    assert_no_secrets(&status, &["pw-limited-1", APP_LIMITED_SECRET]);
    assert_nothing_sent_upstream(&app).await;
}

#[tokio::test]
async fn revoke_without_a_token_is_invalid_argument_naming_the_token_field() {
    let mut app = spawn_app("").await;

    let status = app
        .client
        .revoke_token(tokengate::proto::RevokeTokenRequest {
            client_id: APP_A.into(),
            ..Default::default()
        })
        .await
        .expect_err("refused");

    assert_error(&status, Code::InvalidArgument, "INVALID_REQUEST");
    assert_eq!(bad_request_fields(&status), ["token"]);
    assert_nothing_sent_upstream(&app).await;
}
