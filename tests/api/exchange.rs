//! Successful exchanges: what goes upstream for each client authentication method, and how
//! the upstream's token becomes a GetTokenResponse.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokengate::proto::get_token_request::Grant;
use tokengate::proto::{ClientAssertion, GetTokenRequest, JwtBearerGrant, RevokeTokenRequest};
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// A minimal token, enough for a successful exchange.
async fn mount_token(app: &TestApp) {
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "at-minimal",
            "token_type": "bearer",
            "expires_in": 3600,
        })))
        .mount(&app.upstream)
        .await;
}

/// The one request the upstream received, asserting it was a POST to the token path.
async fn single_token_request(app: &TestApp) -> wiremock::Request {
    let requests = app.upstream_requests().await;
    assert_eq!(
        requests.len(),
        1,
        "exactly one upstream request: {requests:?}"
    );
    let request = requests.into_iter().next().expect("one request");
    assert_eq!(request.method.as_str(), "POST");
    assert_eq!(request.url.path(), TOKEN_PATH);
    assert_eq!(
        request.url.query(),
        None,
        "nothing travels in the query string"
    );
    assert_common_headers(&request);
    request
}

fn seconds_since_epoch(time: SystemTime) -> i64 {
    i64::try_from(
        time.duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs(),
    )
    .expect("fits")
}

#[tokio::test]
async fn password_grant_for_a_basic_client_sends_basic_auth_and_the_exact_form() {
    let mut app = spawn_app("").await;
    mount_token(&app).await;
    let request = GetTokenRequest {
        scopes: vec!["ReadAccounts".into(), "SMS".into()],
        endpoint_id: "ep-42".into(),
        access_token_ttl: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        refresh_token_ttl: Some(prost_types::Duration {
            seconds: 86400,
            nanos: 0,
        }),
        ..password_request(APP_A, "+16505550100*101", "hunter2 & more=")
    };

    let response = app
        .client
        .get_token(request)
        .await
        .expect("the exchange succeeds")
        .into_inner();
    assert_eq!(response.access_token, "at-minimal");

    let sent = single_token_request(&app).await;
    assert_eq!(
        header(&sent, "authorization"),
        Some(format!("Basic {}", basic(APP_A, APP_A_SECRET))),
        "client_secret_basic sends Basic base64(client_id:secret)"
    );
    assert_eq!(
        form(&sent),
        pairs(&[
            ("grant_type", "password"),
            ("username", "+16505550100*101"),
            ("password", "hunter2 & more="),
            ("scope", "ReadAccounts SMS"),
            ("endpoint_id", "ep-42"),
            ("access_token_ttl", "3600"),
            ("refresh_token_ttl", "86400"),
            ("client_id", APP_A),
        ])
    );
}

#[tokio::test]
async fn a_request_without_client_id_uses_the_default_client() {
    let mut app = spawn_app("").await;
    mount_token(&app).await;

    app.client
        .get_token(password_request("", "alice", "pw-1"))
        .await
        .expect("the exchange succeeds");

    let sent = single_token_request(&app).await;
    assert_eq!(
        header(&sent, "authorization"),
        Some(format!("Basic {}", basic(APP_A, APP_A_SECRET)))
    );
    assert_eq!(
        form(&sent),
        pairs(&[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", "pw-1"),
            ("client_id", APP_A)
        ])
    );
}

#[tokio::test]
async fn password_grant_for_a_post_client_sends_the_secret_in_the_body_and_no_authorization() {
    let mut app = spawn_app("").await;
    mount_token(&app).await;

    app.client
        .get_token(password_request(APP_POST, "alice", "pw-2"))
        .await
        .expect("the exchange succeeds");

    let sent = single_token_request(&app).await;
    assert_eq!(header(&sent, "authorization"), None);
    assert_eq!(
        form(&sent),
        pairs(&[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", "pw-2"),
            ("client_id", APP_POST),
            ("client_secret", APP_POST_SECRET),
        ])
    );
}

#[tokio::test]
async fn a_registered_public_client_sends_only_its_client_id() {
    let mut app = spawn_app("").await;
    mount_token(&app).await;

    app.client
        .get_token(password_request(APP_PUBLIC, "alice", "pw-3"))
        .await
        .expect("the exchange succeeds");

    let sent = single_token_request(&app).await;
    assert_eq!(header(&sent, "authorization"), None);
    assert_eq!(
        form(&sent),
        pairs(&[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", "pw-3"),
            ("client_id", APP_PUBLIC)
        ])
    );
}

#[tokio::test]
async fn an_unregistered_client_is_forwarded_as_public_when_allowed() {
    let mut app = AppSpec::default().allow_public(true).spawn().await;
    mount_token(&app).await;

    app.client
        .get_token(password_request("someone-elses-app", "alice", "pw-4"))
        .await
        .expect("the exchange succeeds");

    let sent = single_token_request(&app).await;
    assert_eq!(header(&sent, "authorization"), None);
    assert_eq!(
        form(&sent),
        pairs(&[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", "pw-4"),
            ("client_id", "someone-elses-app"),
        ])
    );
}

#[tokio::test]
async fn a_caller_client_assertion_replaces_basic_auth_with_the_assertion_fields() {
    let mut app = spawn_app("").await;
    mount_token(&app).await;
    let request = GetTokenRequest {
        grant: Some(Grant::JwtBearer(JwtBearerGrant {
            assertion: "eyJ.user-jwt.sig".into(),
        })),
        client_id: APP_A.into(),
        client_assertion: Some(ClientAssertion {
            assertion: "eyJ.client-jwt.sig".into(),
        }),
        ..Default::default()
    };

    app.client
        .get_token(request)
        .await
        .expect("the exchange succeeds");

    let sent = single_token_request(&app).await;
    assert_eq!(
        header(&sent, "authorization"),
        None,
        "no Basic header with a caller assertion"
    );
    assert_eq!(
        form(&sent),
        pairs(&[
            ("grant_type", JWT_BEARER),
            ("assertion", "eyJ.user-jwt.sig"),
            ("client_id", APP_A),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", "eyJ.client-jwt.sig"),
        ])
    );
}

#[tokio::test]
async fn every_field_of_the_upstream_token_is_mapped_into_the_response() {
    let mut app = spawn_app("").await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "at-full",
            "token_type": "bearer",
            "expires_in": 3600,
            "refresh_token": "rt-full",
            "refresh_token_expires_in": 604800,
            "scope": "ReadAccounts SMS ReadMessages",
            "owner_id": "1001",
            "endpoint_id": "ep-full",
            "session_id": "sess-full",
            "id_token": "idt-full",
            "session_expires_in": 7200,
            "session_expiration_time": "2030-01-02T03:04:05Z",
            "session_idle_timeout": 900,
            "something_new": {"nested": [1, 2, 3]},
            "another_unknown": "ignored",
        })))
        .expect(1)
        .mount(&app.upstream)
        .await;

    let before = SystemTime::now();
    let token = app
        .client
        .get_token(password_request(APP_A, "alice", "pw"))
        .await
        .expect("ok")
        .into_inner();
    let after = SystemTime::now();

    let secs = |seconds| Some(prost_types::Duration { seconds, nanos: 0 });
    assert_eq!(token.access_token, "at-full");
    assert_eq!(token.token_type, "bearer");
    assert_eq!(token.expires_in, secs(3600));
    assert_eq!(token.refresh_token, "rt-full");
    assert_eq!(token.refresh_token_expires_in, secs(604_800));
    assert_eq!(token.scopes, ["ReadAccounts", "SMS", "ReadMessages"]);
    assert_eq!(token.owner_id, "1001");
    assert_eq!(token.endpoint_id, "ep-full");
    assert_eq!(token.session_id, "sess-full");
    assert_eq!(token.id_token, "idt-full");
    assert_eq!(token.session_expires_in, secs(7200));
    assert_eq!(token.session_idle_timeout, secs(900));
    let session_end = token
        .session_expiration_time
        .expect("session_expiration_time is set");
    // 2030-01-02T03:04:05Z, computed independently of any RFC 3339 parser.
    assert_eq!((session_end.seconds, session_end.nanos), (1_893_553_445, 0));

    // Absolute expiries count from the arrival of the response: within the call's window.
    let (lo, hi) = (
        seconds_since_epoch(before) - 1,
        seconds_since_epoch(after) + 1,
    );
    let expires_at = token.expires_at.expect("expires_at is set").seconds;
    assert!(
        (lo + 3600..=hi + 3600).contains(&expires_at),
        "expires_at {expires_at} not in now+3600 ({lo}..{hi})"
    );
    let refresh_at = token
        .refresh_token_expires_at
        .expect("refresh_token_expires_at is set")
        .seconds;
    assert!(
        (lo + 604_800..=hi + 604_800).contains(&refresh_at),
        "refresh_token_expires_at {refresh_at} not in now+604800 ({lo}..{hi})"
    );
}

#[tokio::test]
async fn a_token_with_only_access_token_leaves_every_other_field_at_its_default() {
    let mut app = spawn_app("").await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"access_token": "at-bare"})))
        .expect(1)
        .mount(&app.upstream)
        .await;

    let token = app
        .client
        .get_token(password_request(APP_A, "alice", "pw"))
        .await
        .expect("ok")
        .into_inner();

    let expected = tokengate::proto::GetTokenResponse {
        access_token: "at-bare".into(),
        source: tokengate::proto::TokenSource::Upstream.into(),
        ..Default::default()
    };
    assert_eq!(token, expected);
}

#[tokio::test]
async fn revoke_token_posts_the_token_with_the_default_clients_basic_auth_and_accepts_an_empty_200()
{
    let mut app = spawn_app("").await;
    Mock::given(method("POST"))
        .and(path(REVOKE_PATH))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&app.upstream)
        .await;

    let request = RevokeTokenRequest {
        token: "rt-to-revoke".into(),
        ..Default::default()
    };
    app.client
        .revoke_token(request)
        .await
        .expect("the revocation succeeds");

    let requests = app.upstream_requests().await;
    assert_eq!(
        requests.len(),
        1,
        "exactly one upstream request: {requests:?}"
    );
    let sent = &requests[0];
    assert_eq!(sent.method.as_str(), "POST");
    assert_eq!(sent.url.path(), REVOKE_PATH);
    assert_common_headers(sent);
    assert_eq!(
        header(sent, "authorization"),
        Some(format!("Basic {}", basic(APP_A, APP_A_SECRET)))
    );
    assert_eq!(
        form(sent),
        pairs(&[("token", "rt-to-revoke"), ("client_id", APP_A)])
    );
}

#[tokio::test]
async fn session_expiration_time_with_an_offset_and_fractional_seconds_is_read_as_rfc_3339() {
    let mut app = spawn_app("").await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "at-offset",
            "session_expiration_time": "2030-01-02T05:04:05.250+02:00",
        })))
        .mount(&app.upstream)
        .await;

    let token = app
        .client
        .get_token(password_request(APP_A, "alice", "pw"))
        .await
        .expect("ok")
        .into_inner();

    let at = token
        .session_expiration_time
        .expect("session_expiration_time is set");
    // The same instant as 2030-01-02T03:04:05.250Z.
    assert_eq!((at.seconds, at.nanos), (1_893_553_445, 250_000_000));
}
