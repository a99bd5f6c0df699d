//! Client assertions signed by tokengate (`private_key_jwt`, `client_secret_jwt`): what the
//! upstream receives, verified with the public key, and how a refusal maps.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::json;
use tokengate::proto::{ClientCredentialsGrant, GetTokenRequest, get_token_request::Grant};
use tonic::Code;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

const HS_SECRET: &str = "a-client-secret-that-is-at-least-32-bytes-long";

fn key(name: &str) -> String {
    format!("{}/tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn signed_clients() -> String {
    format!(
        r#"
[[clients.registered]]
client_id = "pk-es"
auth_method = "private_key_jwt"
private_key_file = "{}"
signing_alg = "ES256"
key_id = "k1"

[[clients.registered]]
client_id = "pk-rs"
auth_method = "private_key_jwt"
private_key_file = "{}"
assertion_audience = "https://issuer.example"

[[clients.registered]]
client_id = "hs"
auth_method = "client_secret_jwt"
client_secret = "{HS_SECRET}"
"#,
        key("ec-p256.pem"),
        key("rsa-a.pem")
    )
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

async fn mount_token(app: &TestApp) {
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"access_token": "at"})))
        .mount(&app.upstream)
        .await;
}

/// The one request the upstream received: its assertion, after checking the other fields.
async fn sent_assertion(app: &TestApp, client_id: &str) -> String {
    let requests = app.upstream_requests().await;
    let [request] = &requests[..] else {
        panic!("one upstream request, got {}", requests.len())
    };
    assert_eq!(
        header(request, "authorization"),
        None,
        "no Basic header with an assertion"
    );
    let form = form(request);
    let names: Vec<&str> = form.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "grant_type",
            "client_id",
            "client_assertion_type",
            "client_assertion"
        ]
    );
    assert_eq!(form[1].1, client_id);
    assert_eq!(
        form[2].1,
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    form[3].1.clone()
}

fn verify(assertion: &str, key: &DecodingKey, alg: Algorithm, aud: &str) -> serde_json::Value {
    let mut validation = Validation::new(alg);
    validation.set_audience(&[aud]);
    validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
    decode::<serde_json::Value>(assertion, key, &validation)
        .unwrap_or_else(|e| panic!("assertion does not verify: {e}"))
        .claims
}

#[tokio::test]
async fn private_key_jwt_sends_an_es256_assertion_for_the_token_endpoint() {
    let app = AppSpec::default().clients(&signed_clients()).spawn().await;
    mount_token(&app).await;
    app.client
        .clone()
        .get_token(client_credentials("pk-es"))
        .await
        .expect("token");

    let assertion = sent_assertion(&app, "pk-es").await;
    assert_eq!(
        decode_header(&assertion).unwrap().kid.as_deref(),
        Some("k1")
    );
    let public = DecodingKey::from_ec_pem(&std::fs::read(key("ec-p256.pub.pem")).unwrap()).unwrap();
    let token_url = format!("{}{TOKEN_PATH}", app.upstream.uri());
    let claims = verify(&assertion, &public, Algorithm::ES256, &token_url);
    assert_eq!(
        (claims["iss"].as_str(), claims["sub"].as_str()),
        (Some("pk-es"), Some("pk-es"))
    );
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
}

#[tokio::test]
async fn private_key_jwt_uses_the_configured_audience_and_rs256_by_default() {
    let app = AppSpec::default().clients(&signed_clients()).spawn().await;
    mount_token(&app).await;
    app.client
        .clone()
        .get_token(client_credentials("pk-rs"))
        .await
        .expect("token");

    let assertion = sent_assertion(&app, "pk-rs").await;
    let header = decode_header(&assertion).unwrap();
    assert_eq!((header.alg, header.kid), (Algorithm::RS256, None));
    let public = DecodingKey::from_rsa_pem(&std::fs::read(key("rsa-a.pub.pem")).unwrap()).unwrap();
    verify(
        &assertion,
        &public,
        Algorithm::RS256,
        "https://issuer.example",
    );
}

#[tokio::test]
async fn client_secret_jwt_sends_an_hs256_assertion_and_never_the_secret() {
    let app = AppSpec::default().clients(&signed_clients()).spawn().await;
    mount_token(&app).await;
    app.client
        .clone()
        .get_token(client_credentials("hs"))
        .await
        .expect("token");

    let assertion = sent_assertion(&app, "hs").await;
    let token_url = format!("{}{TOKEN_PATH}", app.upstream.uri());
    verify(
        &assertion,
        &DecodingKey::from_secret(HS_SECRET.as_bytes()),
        Algorithm::HS256,
        &token_url,
    );
    let body = String::from_utf8(app.upstream_requests().await[0].body.clone()).unwrap();
    assert!(!body.contains(HS_SECRET), "the secret itself is never sent");
}

#[tokio::test]
async fn a_refused_signed_assertion_is_our_configuration_problem() {
    let app = AppSpec::default().clients(&signed_clients()).spawn().await;
    Mock::given(method("POST"))
        .and(path(TOKEN_PATH))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_client"})))
        .mount(&app.upstream)
        .await;
    let status = app
        .client
        .clone()
        .get_token(client_credentials("pk-es"))
        .await
        .unwrap_err();
    let info = assert_error(&status, Code::FailedPrecondition, "INVALID_CLIENT");
    assert_eq!(info.metadata["clientId"], "pk-es");
}

#[tokio::test]
async fn revocation_is_authenticated_with_a_signed_assertion_too() {
    let app = AppSpec::default().clients(&signed_clients()).spawn().await;
    Mock::given(method("POST"))
        .and(path(REVOKE_PATH))
        .respond_with(ResponseTemplate::new(200))
        .mount(&app.upstream)
        .await;
    let revoke = tokengate::proto::RevokeTokenRequest {
        token: "rt-1".into(),
        client_id: "hs".into(),
        client_assertion: None,
    };
    app.client
        .clone()
        .revoke_token(revoke)
        .await
        .expect("revoked");
    let requests = app.upstream_requests().await;
    let form = form(&requests[0]);
    let names: Vec<&str> = form.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "token",
            "client_id",
            "client_assertion_type",
            "client_assertion"
        ]
    );
}
