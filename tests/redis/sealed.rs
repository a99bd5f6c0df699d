//! Contract §8, "nothing in Redis is readable without the key", through the real binary: a
//! replica with `backend = "redis"` gets tokens for a cached grant and a replayed one, and
//! then every key and value in Redis is searched for what went through it. The entries must
//! also open under the key file's key, so it was the broker that sealed them.

use base64::Engine as _;
use testkit::{Answer, CountingUpstream, Tokengate};
use tokengate::proto::get_token_request::Grant;
use tokengate::proto::token_service_client::TokenServiceClient;
use tokengate::proto::{GetTokenRequest, JwtBearerGrant, RefreshTokenGrant};

use super::*;

const CLIENT_ID: &str = "client-id-in-plain-7f3a9c";
const ASSERTION: &str = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1c2VyLXNlYWxlZC04ODIxIn0.sig-sealed-5521";

/// Every form of `secret` that would make it readable: as is, hex, and base64 (standard and
/// URL-safe, without padding, which depends on what follows).
fn forms(secret: &str) -> Vec<Vec<u8>> {
    let b = secret.as_bytes();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let std = base64::engine::general_purpose::STANDARD_NO_PAD.encode(b);
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    vec![
        b.to_vec(),
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
        std.into_bytes(),
        url.into_bytes(),
    ]
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Every key in the node, with `SCAN`, and its value (all of the store's keys are strings).
fn everything(server: &RedisServer) -> Vec<(String, Vec<u8>)> {
    let mut names = Vec::new();
    let mut cursor = "0".to_owned();
    loop {
        let Reply::Array(reply) = server
            .command(&["SCAN", &cursor, "COUNT", "1000"])
            .expect("SCAN")
        else {
            panic!("SCAN answered something else");
        };
        cursor = reply[0].text();
        if let Reply::Array(keys) = &reply[1] {
            names.extend(keys.iter().map(Reply::text));
        }
        if cursor == "0" {
            break;
        }
    }
    names
        .into_iter()
        .map(|name| match server.command(&["GET", &name]).expect("GET") {
            Reply::Bulk(Some(value)) => (name, value),
            other => panic!("GET {name} answered {other:?}: not a string"),
        })
        .collect()
}

#[tokio::test]
async fn the_binary_stores_nothing_readable_and_seals_its_entries() {
    let server = RedisServer::start();
    let upstream = CountingUpstream::start(Duration::ZERO);
    let dir = tempfile::tempdir().unwrap();
    let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    let key_file = dir.path().join("cache.key");
    std::fs::write(&key_file, &key).unwrap();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
health_listen = "127.0.0.1:0"

[upstream]
base_url = "{upstream}"
allow_insecure_http = true

[cache]
backend = "redis"
key_file = {key_file:?}

[cache.redis]
url = "{redis}"
key_prefix = "{PREFIX}"
timeout = "500ms"
"#,
        upstream = upstream.url(),
        key_file = key_file.display().to_string(),
        redis = server.url(),
    );
    let replica = Tokengate::launch(env!("CARGO_BIN_EXE_tokengate"), config)
        .name("sealed")
        .start()
        .await;
    replica.wait_for_message(WAIT, "connected to redis").await;
    let mut client = TokenServiceClient::connect(replica.url()).await.unwrap();

    // A cached grant (its refresh token kept, never handed out) and a replayed one (the
    // caller's refresh token is a one-time credential).
    let jwt = GetTokenRequest {
        grant: Some(Grant::JwtBearer(JwtBearerGrant {
            assertion: ASSERTION.into(),
        })),
        client_id: CLIENT_ID.into(),
        ..Default::default()
    };
    let cached = client.get_token(jwt).await.unwrap().into_inner();
    let (_, spent_refresh) = upstream.issue_pair();
    let refresh = GetTokenRequest {
        grant: Some(Grant::RefreshToken(RefreshTokenGrant {
            refresh_token: spent_refresh.clone(),
        })),
        client_id: CLIENT_ID.into(),
        ..Default::default()
    };
    let replayed = client.get_token(refresh).await.unwrap().into_inner();

    let mut secrets = vec![CLIENT_ID.to_owned(), ASSERTION.to_owned(), spent_refresh];
    for (_, answer) in upstream.answered() {
        if let Answer::Token { access, refresh } = answer {
            secrets.push(access);
            secrets.push(refresh);
        }
    }
    assert!(secrets.contains(&cached.access_token));
    assert!(secrets.contains(&replayed.access_token));
    assert_eq!(secrets.len(), 3 + 4, "two token answers: {secrets:?}");

    let stored = everything(&server);
    let keys = Keys::new(Some(&CacheKey::new(key)));
    let mut entries = 0;
    for (name, value) in &stored {
        for secret in &secrets {
            for form in forms(secret) {
                assert!(!contains(name.as_bytes(), &form), "{name} names {secret:?}");
                assert!(!contains(value, &form), "{name} holds {secret:?}");
            }
        }
        let Some(id) = name
            .strip_prefix(&format!("{PREFIX}{{"))
            .and_then(|rest| rest.strip_suffix("}:e"))
        else {
            continue;
        };
        entries += 1;
        assert!(
            serde_json::from_slice::<serde_json::Value>(value).is_err(),
            "{name} is readable JSON"
        );
        let id = Digest::from_hex(id).expect("an entry is named by its identity");
        let plain = keys
            .open(Purpose::Entry, &id, value)
            .unwrap_or_else(|_| panic!("{name} does not open under the key file's key"));
        // What was sealed is the entry itself: the search above would have found it.
        let entry: serde_json::Value = serde_json::from_slice(&plain).expect("an entry");
        let text = entry.to_string();
        assert!(
            text.contains(&cached.access_token) || text.contains(&replayed.access_token),
            "{name} holds neither token: {text}"
        );
    }
    assert_eq!(entries, 2, "one entry per request: {stored:?}");
}
