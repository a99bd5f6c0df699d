//! What the binary logs: one span per call with its identifiers, and never a secret, even at
//! TRACE level across every grant, every client authentication and every error path.

use std::time::Duration;

use base64::Engine as _;
use testkit::{Tokengate, message};
use tokengate::proto::{self, GetTokenRequest, get_token_request::Grant};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::process::{binary, client};

const CLIENT_SECRET_BASIC: &str = "SECRET-client-basic-4Qx";
const CLIENT_SECRET_POST: &str = "SECRET-client-post-8Zr";
const CLIENT_ASSERTION: &str = "SECRET-client-assertion-2Lp";
const ACCESS_TOKEN: &str = "SECRET-access-token-7Hn";
const REFRESH_TOKEN_OUT: &str = "SECRET-refresh-token-out-3Vb";
const ID_TOKEN: &str = "SECRET-id-token-6Kd";
const REVOKED_TOKEN: &str = "SECRET-revoked-token-1Ws";
const CACHE_KEY: &[u8; 32] = b"SECRET-cache-key-32-bytes-long!!";

/// Every secret a request of [`every_grant`] carries.
const GRANT_SECRETS: &[&str] = &[
    "SECRET-auth-code-1Aa",
    "SECRET-code-verifier-2Bb",
    "SECRET-password-3Cc",
    "SECRET-pin-4Dd",
    "SECRET-jwt-assertion-5Ee",
    "SECRET-partner-assertion-6Ff",
    "SECRET-refresh-token-in-7Gg",
    "SECRET-ivr-pin-8Hh",
    "SECRET-device-code-9Ii",
    "SECRET-otp-code-0Jj",
    "SECRET-personal-jwt-1Kk",
];

fn config(base_url: &str) -> String {
    config_with(base_url, "")
}

/// The config, with extra top-level TOML (e.g. a `[cache]` section) appended.
fn config_with(base_url: &str, extra: &str) -> String {
    format!(
        r#"
        {extra}
        [server]
        listen = "127.0.0.1:0"
        shutdown_grace_period = "5s"
        [upstream]
        base_url = "{base_url}"
        allow_insecure_http = true
        request_timeout = "300ms"
        [clients]
        allow_public = false
        [[clients.registered]]
        client_id = "basic-app"
        client_secret = "{CLIENT_SECRET_BASIC}"
        default = true
        [[clients.registered]]
        client_id = "post-app"
        client_secret = "{CLIENT_SECRET_POST}"
        auth_method = "client_secret_post"
        [[clients.registered]]
        client_id = "signed-app"
        auth_method = "private_key_jwt"
        private_key_file = "{key}"
        signing_alg = "ES256"
        [[clients.registered]]
        client_id = "narrow-app"
        client_secret = "{CLIENT_SECRET_POST}"
        allowed_grants = ["device_certificate"]
        "#,
        key = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/keys/ec-p256.pem"
        ),
    )
}

#[allow(deprecated, reason = "the deprecated password pin is a secret too")]
fn every_grant() -> Vec<Grant> {
    let s = |i: usize| GRANT_SECRETS[i].to_owned();
    vec![
        Grant::AuthorizationCode(proto::AuthorizationCodeGrant {
            code: s(0),
            redirect_uri: "https://app.example/cb".into(),
            code_verifier: s(1),
        }),
        Grant::Password(proto::PasswordGrant {
            username: "alice@example.com".into(),
            password: s(2),
            extension: "101".into(),
            pin: s(3),
        }),
        Grant::JwtBearer(proto::JwtBearerGrant { assertion: s(4) }),
        Grant::PartnerJwt(proto::PartnerJwtGrant { assertion: s(5) }),
        Grant::RefreshToken(proto::RefreshTokenGrant {
            refresh_token: s(6),
        }),
        Grant::IvrPin(proto::IvrPinGrant { ivr_pin: s(7) }),
        Grant::DeviceCode(proto::DeviceCodeGrant { device_code: s(8) }),
        Grant::ClientCredentials(proto::ClientCredentialsGrant {
            subject: Some(proto::client_credentials_grant::Subject::AccountId(
                "acct-1".into(),
            )),
        }),
        Grant::Otp(proto::OtpGrant { code: s(9) }),
        Grant::Guest(proto::GuestGrant {
            brand_id: "1210".into(),
            resource_type: "meeting".into(),
            resource: "https://r.example/1".into(),
        }),
        Grant::PersonalJwt(proto::PersonalJwtGrant { assertion: s(10) }),
        Grant::DeviceCertificate(proto::DeviceCertificateGrant {}),
    ]
}

/// Each grant through each way of authenticating the client. `round` goes into the scope, so
/// each round is new to the broker and reaches the upstream.
fn every_request(round: usize) -> Vec<GetTokenRequest> {
    let mut requests = Vec::new();
    for grant in every_grant() {
        for (client_id, assertion) in [
            ("basic-app", None),
            ("post-app", None),
            ("signed-app", None),
            ("", Some(CLIENT_ASSERTION)),
        ] {
            requests.push(GetTokenRequest {
                grant: Some(grant.clone()),
                client_id: client_id.into(),
                client_assertion: assertion.map(|a| proto::ClientAssertion {
                    assertion: a.into(),
                }),
                scopes: vec!["ReadAccounts".into(), format!("Round{round}")],
                ..Default::default()
            });
            // The same request again, reporting the token the upstream hands out as refused:
            // a rejection (when the cache holds it) or a replay, depending on the grant.
            requests.push(GetTokenRequest {
                rejected_access_token: ACCESS_TOKEN.into(),
                ..requests.last().expect("just pushed").clone()
            });
        }
    }
    requests
}

/// Requests refused locally, each still carrying secrets.
#[allow(deprecated, reason = "the deprecated password pin is a secret too")]
fn locally_refused() -> Vec<GetTokenRequest> {
    let password = Grant::Password(proto::PasswordGrant {
        username: String::new(),
        password: GRANT_SECRETS[2].into(),
        extension: String::new(),
        pin: GRANT_SECRETS[3].into(),
    });
    vec![
        // missing username, bad scope, bad TTL
        GetTokenRequest {
            grant: Some(password),
            scopes: vec!["Read Accounts".into()],
            access_token_ttl: Some(prost_types::Duration {
                seconds: 1,
                nanos: 5,
            }),
            client_assertion: Some(proto::ClientAssertion {
                assertion: CLIENT_ASSERTION.into(),
            }),
            ..Default::default()
        },
        // no grant
        GetTokenRequest {
            client_id: "basic-app".into(),
            ..Default::default()
        },
        // unknown client
        GetTokenRequest {
            grant: Some(Grant::Otp(proto::OtpGrant {
                code: GRANT_SECRETS[9].into(),
            })),
            client_id: "stranger".into(),
            ..Default::default()
        },
        // grant not allowed
        GetTokenRequest {
            grant: Some(Grant::JwtBearer(proto::JwtBearerGrant {
                assertion: GRANT_SECRETS[4].into(),
            })),
            client_id: "narrow-app".into(),
            ..Default::default()
        },
    ]
}

/// Upstream behaviours, one per error path of contract §2 plus success.
fn scenarios() -> Vec<(&'static str, ResponseTemplate)> {
    let echo = format!(
        "bad credentials {} {} {} {}",
        GRANT_SECRETS[2], CLIENT_SECRET_BASIC, CLIENT_SECRET_POST, CLIENT_ASSERTION
    );
    let oauth = |error: &str| {
        ResponseTemplate::new(400).insert_header("RCRequestId", "req-1").set_body_json(serde_json::json!({
            "error": error,
            "error_description": echo,
            "errors": [{"errorCode": "OAU-140", "message": echo, "parameterValue": GRANT_SECRETS[0]}],
        }))
    };
    vec![
        (
            "token",
            ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "access_token": ACCESS_TOKEN,
                "token_type": "bearer",
                "expires_in": 3600,
                "refresh_token": REFRESH_TOKEN_OUT,
                "refresh_token_expires_in": 604800,
                "id_token": ID_TOKEN,
                "scope": "ReadAccounts",
            })),
        ),
        ("invalid_grant", oauth("invalid_grant")),
        ("invalid_client", oauth("invalid_client")),
        ("authorization_pending", oauth("authorization_pending")),
        ("slow_down", oauth("slow_down")),
        ("unknown error", oauth("something_else")),
        (
            "429",
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "5")
                .set_body_string(echo.clone()),
        ),
        (
            "503",
            ResponseTemplate::new(503)
                .insert_header("Retry-After", "2")
                .set_body_string(echo.clone()),
        ),
        (
            "502 html",
            ResponseTemplate::new(502).set_body_string(format!("<html>{echo}</html>")),
        ),
        (
            "truncated",
            ResponseTemplate::new(200)
                .set_body_string(format!("{{\"access_token\":\"{ACCESS_TOKEN}")),
        ),
        (
            "no access_token",
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"refresh_token": REFRESH_TOKEN_OUT})),
        ),
        (
            "oversized",
            ResponseTemplate::new(200).set_body_string(format!(
                "{{\"access_token\":\"{ACCESS_TOKEN}\",\"x\":\"{}\"}}",
                "a".repeat(2 << 20)
            )),
        ),
        (
            "timeout",
            ResponseTemplate::new(200).set_delay(Duration::from_secs(2)),
        ),
    ]
}

fn all_secrets() -> Vec<String> {
    let mut secrets: Vec<String> = GRANT_SECRETS.iter().map(|s| (*s).to_owned()).collect();
    secrets.extend(
        [
            CLIENT_SECRET_BASIC,
            CLIENT_SECRET_POST,
            CLIENT_ASSERTION,
            ACCESS_TOKEN,
            REFRESH_TOKEN_OUT,
            ID_TOKEN,
            REVOKED_TOKEN,
            std::str::from_utf8(CACHE_KEY).expect("ascii"),
        ]
        .map(str::to_owned),
    );
    for (id, secret) in [
        ("basic-app", CLIENT_SECRET_BASIC),
        ("post-app", CLIENT_SECRET_POST),
    ] {
        secrets.push(base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")));
    }
    secrets
}

async fn drive(served: &Tokengate, requests: &[GetTokenRequest]) -> usize {
    let mut client = client(served).await;
    let mut done = 0;
    for request in requests {
        let _ = client.get_token(request.clone()).await;
        done += 1;
    }
    for client_id in ["basic-app", "post-app"] {
        let revoke = proto::RevokeTokenRequest {
            token: REVOKED_TOKEN.into(),
            client_id: client_id.into(),
            client_assertion: None,
        };
        let _ = client.revoke_token(revoke).await;
        done += 1;
    }
    done
}

#[tokio::test]
async fn no_secret_reaches_the_logs_at_trace_level() {
    let upstream = MockServer::start().await;
    let mut served = Tokengate::launch(binary(), config(&upstream.uri()))
        .rust_log("trace")
        .start()
        .await;
    let mut calls = drive(&served, &locally_refused()).await;
    for (round, (name, response)) in scenarios().into_iter().enumerate() {
        upstream.reset().await;
        Mock::given(method("POST"))
            .respond_with(response)
            .named(name)
            .mount(&upstream)
            .await;
        calls += drive(&served, &every_request(round)).await;
    }

    // And with nothing listening upstream at all.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let mut refused = Tokengate::launch(binary(), config(&closed))
        .rust_log("trace")
        .start()
        .await;
    calls += drive(&refused, &every_request(0)).await;

    // The broker's Redis paths: entries sealed and read back, leases, renewal with the
    // kept refresh token, rejection, revocation, then Redis gone.
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("cache.key");
    std::fs::write(&key_file, CACHE_KEY).unwrap();
    let fleet_config = format!(
        "[cache]\nbackend = \"redis\"\nkey_file = \"{}\"\nrefresh_ahead = \"2s\"\nmin_remaining = \"1s\"\n\
         [cache.redis]\nurl = \"{}\"\ntimeout = \"500ms\"\n",
        key_file.display(),
        redis.url()
    );
    upstream.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": ACCESS_TOKEN,
            "token_type": "bearer",
            "expires_in": 3,
            "refresh_token": REFRESH_TOKEN_OUT,
            "id_token": ID_TOKEN,
        })))
        .mount(&upstream)
        .await;
    let mut shared = Tokengate::launch(binary(), config_with(&upstream.uri(), &fleet_config))
        .rust_log("trace")
        .start()
        .await;
    calls += drive(&shared, &every_request(100)).await;
    // Past the renewal point: hits start renewals with the kept refresh token.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    calls += drive(&shared, &every_request(100)).await;
    let stored = match redis.command(&["KEYS", "*:e"]).unwrap() {
        testkit::Reply::Array(keys) => keys.len(),
        other => panic!("KEYS answered {other:?}"),
    };
    assert!(stored > 0, "entries were written to redis");
    drop(redis);
    calls += drive(&shared, &every_request(101)).await;

    served.stop().await;
    refused.stop().await;
    shared.stop().await;

    let finished = |served: &Tokengate| {
        served
            .events()
            .iter()
            .filter(|e| matches!(message(e), Some("call succeeded" | "call failed")))
            .count()
    };
    assert_eq!(
        finished(&served) + finished(&refused) + finished(&shared),
        calls,
        "one finish event per call"
    );

    // Both streams: logs go to stdout, and nothing may leak through stderr either.
    let logs = [&served, &refused, &shared]
        .map(|process| process.output())
        .join("\n");
    assert!(
        // Cached or replayed: the mock answers every grant with the same token.
        logs.contains("token was rejected"),
        "the rejection path ran"
    );
    assert!(
        logs.contains("redis is unreachable"),
        "the Redis-down path ran"
    );
    assert!(
        logs.lines().count() > calls * 5,
        "TRACE logging was on ({} lines)",
        logs.lines().count()
    );
    assert!(
        logs.contains("h2") || logs.contains("hyper"),
        "dependency TRACE logs are included"
    );
    for secret in all_secrets() {
        assert!(!logs.contains(&secret), "{secret} appears in the logs");
    }
    // Assertions tokengate signs are made per call, so look for any JWT: its base64url
    // header always starts with `eyJ` (`{"`).
    assert!(
        !logs.contains("eyJ"),
        "a signed client assertion appears in the logs"
    );
}

#[tokio::test]
async fn each_call_logs_one_span_with_grant_client_status_and_latency() {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({"access_token": ACCESS_TOKEN})),
        )
        .mount(&upstream)
        .await;
    let served = Tokengate::start(binary(), config(&upstream.uri())).await;
    let mut client = client(&served).await;
    let request = GetTokenRequest {
        grant: Some(Grant::JwtBearer(proto::JwtBearerGrant {
            assertion: GRANT_SECRETS[4].into(),
        })),
        client_id: "post-app".into(),
        ..Default::default()
    };
    client.get_token(request).await.unwrap();

    let event = served
        .wait_for(|e| message(e) == Some("call succeeded"))
        .await;
    let span = &event["span"];
    assert_eq!(span["name"], "GetToken", "{event}");
    assert_eq!(span["grant_type"], "jwt_bearer", "{event}");
    assert_eq!(span["client_id"], "post-app", "{event}");
    assert_eq!(span["upstream_status"], 200, "{event}");
    // Read as a person reads it: a number and a unit, such as "412µs" or "1.204ms".
    let latency = span["latency"].as_str().unwrap_or_default();
    let number = ["ms", "µs", "ns", "s"]
        .iter()
        .find_map(|unit| latency.strip_suffix(unit))
        .and_then(|n| n.parse::<f64>().ok());
    assert!(number.is_some_and(|n| n > 0.0), "{event}");

    upstream.reset().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(400).set_body_json(serde_json::json!({"error": "invalid_grant"})),
        )
        .mount(&upstream)
        .await;
    let request = GetTokenRequest {
        grant: Some(Grant::RefreshToken(proto::RefreshTokenGrant {
            refresh_token: GRANT_SECRETS[6].into(),
        })),
        ..Default::default()
    };
    client.get_token(request).await.unwrap_err();
    let event = served.wait_for(|e| message(e) == Some("call failed")).await;
    assert_eq!(event["fields"]["reason"], "INVALID_GRANT", "{event}");
    assert_eq!(event["span"]["grant_type"], "refresh_token", "{event}");
    assert_eq!(event["span"]["client_id"], "basic-app", "{event}");
    assert_eq!(event["span"]["upstream_status"], 400, "{event}");
}

/// Whether a JSON log line was logged inside a call: its span, or one of its spans, is the
/// call's or the upstream POST's.
fn of_a_call(event: &serde_json::Value) -> bool {
    let ours =
        |span: &serde_json::Value| matches!(span["name"].as_str(), Some("GetToken" | "POST"));
    ours(&event["span"])
        || event["spans"]
            .as_array()
            .is_some_and(|spans| spans.iter().any(ours))
}

fn is_hex_id(value: &serde_json::Value, len: usize) -> bool {
    value.as_str().is_some_and(|id| {
        id.len() == len
            && id.bytes().all(|b| b.is_ascii_hexdigit())
            && id.bytes().any(|b| b != b'0')
    })
}

#[tokio::test]
async fn each_log_line_of_a_call_names_the_callers_trace() {
    const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    const CALLER_SPAN_ID: &str = "b7ad6b7169203331";
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("RCRequestId", "req-traced")
                .set_body_json(serde_json::json!({"access_token": ACCESS_TOKEN})),
        )
        .mount(&upstream)
        .await;
    // Every level, dependencies included: lines inside the upstream POST count too. No
    // collector is configured: the ids are there without export.
    let served = Tokengate::launch(binary(), config(&upstream.uri()))
        .rust_log("trace")
        .start()
        .await;
    let mut client = client(&served).await;
    let request = |scope: &str| GetTokenRequest {
        grant: Some(Grant::JwtBearer(proto::JwtBearerGrant {
            assertion: GRANT_SECRETS[4].into(),
        })),
        scopes: vec![scope.into()],
        ..Default::default()
    };
    let mut traced = tonic::Request::new(request("Traced"));
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01")
            .parse()
            .unwrap(),
    );
    client.get_token(traced).await.unwrap();
    let finished = served
        .wait_for(|e| message(e) == Some("call succeeded"))
        .await;
    assert_eq!(finished["trace_id"], TRACE_ID, "{finished}");
    assert!(is_hex_id(&finished["span_id"], 16), "{finished}");
    assert_ne!(
        finished["span_id"], CALLER_SPAN_ID,
        "the call has a span of its own"
    );
    assert_eq!(finished["span"]["name"], "GetToken", "{finished}");
    assert!(
        finished["span"].get("otel.kind").is_none() && finished["span"].get("otel.name").is_none(),
        "the exported span's own fields stay out of the logs: {finished}"
    );
    let call_span = finished["span_id"].clone();

    let lines: Vec<_> = served.events().into_iter().filter(of_a_call).collect();
    assert!(
        lines.len() > 5,
        "TRACE logging inside the call ({} lines)",
        lines.len()
    );
    for line in &lines {
        assert_eq!(line["trace_id"], TRACE_ID, "{line}");
        assert!(is_hex_id(&line["span_id"], 16), "{line}");
    }
    // Inside the upstream POST, lines name the POST's span, a child of the call's.
    assert!(
        lines
            .iter()
            .any(|l| l["span"]["name"] == "POST" && l["span_id"] != call_span),
        "some line was logged inside the upstream POST"
    );

    // Without a traceparent the call starts a trace of its own, and its lines name it.
    client.get_token(request("Untraced")).await.unwrap();
    let finished = served
        .wait_for(|e| message(e) == Some("call succeeded") && e["trace_id"] != TRACE_ID)
        .await;
    assert!(is_hex_id(&finished["trace_id"], 32), "{finished}");
    assert!(is_hex_id(&finished["span_id"], 16), "{finished}");

    // Lines outside any call carry no ids.
    let listening = served
        .events()
        .into_iter()
        .find(|e| message(e) == Some("listening"))
        .expect("the listening line");
    assert!(listening.get("trace_id").is_none(), "{listening}");
}
