//! The broker through the real server: what `source` says, what reaches the upstream, and
//! what callers of a cached grant receive.

use std::time::Duration;

use serde_json::json;
use tokengate::proto::get_token_request::Grant;
use tokengate::proto::{GetTokenRequest, JwtBearerGrant, RevokeTokenRequest, TokenSource};
use tokio::task::JoinSet;
use tonic::Code;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::{APP_A, AppSpec, REVOKE_PATH, TOKEN_PATH, assert_error, password_request};

/// A JWT bearer request for `client_id`.
fn jwt(client_id: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::JwtBearer(JwtBearerGrant {
            assertion: "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1c2VyLTEifQ.sig".into(),
        })),
        client_id: client_id.into(),
        scopes: vec!["ReadAccounts".into(), "SMS".into()],
        ..Default::default()
    }
}

/// Answers each token POST with a new token (`at-1`, `at-2`, …) after `delay`.
async fn mount_tokens(app: &crate::helpers::TestApp, delay: Duration) {
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(move |_: &wiremock::Request| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            ResponseTemplate::new(200)
                .set_delay(delay)
                .set_body_json(json!({
                    "access_token": format!("at-{n}"), "token_type": "bearer",
                    "expires_in": 3600, "refresh_token": format!("rt-{n}"),
                    "refresh_token_expires_in": 604800,
                }))
        })
        .mount(&app.upstream)
        .await;
}

async fn token_posts(app: &crate::helpers::TestApp) -> usize {
    app.upstream_requests()
        .await
        .iter()
        .filter(|r| r.url.path() == TOKEN_PATH)
        .count()
}

fn source(response: &tokengate::proto::GetTokenResponse) -> TokenSource {
    TokenSource::try_from(response.source).expect("a known source")
}

#[tokio::test]
async fn a_burst_of_identical_calls_reaches_the_upstream_once_and_then_hits_the_cache() {
    let app = AppSpec::default().spawn().await;
    mount_tokens(&app, Duration::from_millis(300)).await;
    let mut calls = JoinSet::new();
    for _ in 0..20 {
        let mut client = app.client.clone();
        calls.spawn(async move { client.get_token(jwt(APP_A)).await.map(|r| r.into_inner()) });
    }
    let answers: Vec<_> = calls
        .join_all()
        .await
        .into_iter()
        .map(|r| r.expect("a token"))
        .collect();
    assert_eq!(
        token_posts(&app).await,
        1,
        "one upstream call for the whole burst"
    );
    assert!(answers.iter().all(|a| a.access_token == "at-1"));
    assert!(
        answers.iter().all(|a| a.refresh_token.is_empty()),
        "a cached grant hands out no refresh token"
    );
    let upstream = answers
        .iter()
        .filter(|a| source(a) == TokenSource::Upstream)
        .count();
    let coalesced = answers
        .iter()
        .filter(|a| source(a) == TokenSource::Coalesced)
        .count();
    assert_eq!((upstream, coalesced), (1, 19));

    let mut reordered = jwt(APP_A);
    reordered.scopes.reverse();
    let hit = app
        .client
        .clone()
        .get_token(reordered)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (hit.access_token.as_str(), source(&hit)),
        ("at-1", TokenSource::Cache)
    );
    let left = hit.expires_in.unwrap().seconds;
    // Up to the planned renewal (5 min before expiry, jittered up to 30 s earlier): the
    // renewal spends the kept refresh token, which ends this token (contract §8.1 I10).
    assert!(
        (3265..=3300).contains(&left),
        "the lifetime up to the planned renewal: {left}"
    );
    assert_eq!(token_posts(&app).await, 1);
}

#[tokio::test]
async fn a_rejected_token_is_replaced_and_revocation_drops_the_entry() {
    let app = AppSpec::default().spawn().await;
    mount_tokens(&app, Duration::ZERO).await;
    Mock::given(method("POST"))
        .and(path(REVOKE_PATH))
        .respond_with(ResponseTemplate::new(200))
        .mount(&app.upstream)
        .await;
    let mut client = app.client.clone();
    client.get_token(jwt(APP_A)).await.unwrap();

    let rejected = GetTokenRequest {
        rejected_access_token: "at-1".into(),
        ..jwt(APP_A)
    };
    let fresh = client
        .get_token(rejected.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fresh.access_token, "at-2");
    let again = client.get_token(rejected).await.unwrap().into_inner();
    assert_eq!(
        (again.access_token.as_str(), source(&again)),
        ("at-2", TokenSource::Cache),
        "already replaced"
    );
    assert_eq!(token_posts(&app).await, 2);

    client
        .revoke_token(RevokeTokenRequest {
            token: "at-2".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let after = client.get_token(jwt(APP_A)).await.unwrap().into_inner();
    assert_eq!(
        (after.access_token.as_str(), source(&after)),
        ("at-3", TokenSource::Upstream)
    );
}

#[tokio::test]
async fn a_wrong_password_is_replayed_not_retried_and_a_pass_through_client_always_goes_upstream() {
    let app = AppSpec::default()
        .clients("[[clients.registered]]\nclient_id = \"direct\"\nauth_method = \"none\"\ncache = false\n")
        .spawn()
        .await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_grant"})))
        .mount(&app.upstream)
        .await;
    let mut client = app.client.clone();
    for _ in 0..3 {
        let status = client
            .get_token(password_request(APP_A, "alice", "wrong"))
            .await
            .unwrap_err();
        assert_error(&status, Code::Unauthenticated, "INVALID_GRANT");
    }
    assert_eq!(
        token_posts(&app).await,
        1,
        "no lockout: the result is replayed"
    );
    for _ in 0..3 {
        client
            .get_token(password_request("direct", "alice", "wrong"))
            .await
            .unwrap_err();
    }
    assert_eq!(token_posts(&app).await, 4, "cache = false sends every call");
}
