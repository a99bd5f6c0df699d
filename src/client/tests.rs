//! Unit tests of client resolution and authentication fields.
//!
//! Clients come from `Config::from_toml`, so they are exactly what a validated config
//! yields; bodies go through the upstream's own encoder and are decoded back.

use secrecy::ExposeSecret as _;

use super::*;
use crate::config::{Config, RegisteredClient};
use crate::grant::{RevokeRequest, TokenRequest};
use crate::proto;
use crate::proto::get_token_request::Grant as ProtoGrant;
use crate::upstream::Outgoing;

type Pairs = Vec<(String, String)>;

/// Basic credentials as (client_id, secret).
type Creds = Option<(String, String)>;

/// The default audience of signed assertions in these tests.
const TOKEN_URL: &str = "https://platform.example/restapi/oauth/token";

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

const ALL_GRANTS: [GrantKind; 12] = GrantKind::ALL;

/// The registry: one client per auth method, one with the method left at its default,
/// and one restricted to two grants. `default` marks one of them as the default client.
fn clients(allow_public: bool, default: Option<&str>) -> Clients {
    let entries = [
        (
            "basic-app",
            "client_secret = \"basic-secret\"\nauth_method = \"client_secret_basic\"",
        ),
        (
            "post-app",
            "client_secret = \"post-secret\"\nauth_method = \"client_secret_post\"",
        ),
        ("public-app", "auth_method = \"none\""),
        ("implicit-app", "client_secret = \"implicit-secret\""),
        (
            "limited-app",
            "client_secret = \"limited-secret\"\nallowed_grants = [\"jwt_bearer\", \"refresh_token\"]",
        ),
    ];
    let mut toml = format!("[clients]\nallow_public = {allow_public}\n");
    for (id, rest) in entries {
        toml.push_str(&format!(
            "[[clients.registered]]\nclient_id = \"{id}\"\n{rest}\ndefault = {}\n",
            default == Some(id)
        ));
    }
    let config = Config::from_toml(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
    assert_eq!(config.clients.allow_public, allow_public);
    Clients::new(&config.clients, TOKEN_URL).expect("a validated config always indexes")
}

fn pairs(expected: &[(&str, &str)]) -> Pairs {
    expected
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

fn decode(body: &str) -> Pairs {
    serde_urlencoded::from_str(body).unwrap_or_else(|e| panic!("{body:?} does not decode: {e}"))
}

/// The body fields of an auth method alone, through the upstream encoder.
fn auth_fields(auth: &ClientAuth<'_>) -> (String, Pairs) {
    let mut fields = Vec::new();
    auth.push_fields(&mut fields);
    let raw = Outgoing {
        penalty: None,
        lease: None,
        fields,
        basic: auth.basic(),
        replay: crate::upstream::Replay::Always,
    }
    .body();
    let decoded = decode(&raw);
    (raw, decoded)
}

fn basic(auth: &ClientAuth<'_>) -> Creds {
    auth.basic()
        .map(|(id, secret)| (id.to_owned(), secret.expose_secret().to_owned()))
}

fn basic_of(id: &str, secret: &str) -> Creds {
    Some((id.to_owned(), secret.to_owned()))
}

fn secret(value: &str) -> SecretString {
    SecretString::from(value)
}

// ---------------------------------------------------------------------------------------
// One auth method at a time.
// ---------------------------------------------------------------------------------------

#[test]
fn client_secret_basic_sends_client_id_in_the_body_and_the_secret_in_basic() {
    for allow_public in [true, false] {
        let clients = clients(allow_public, None);
        let auth = clients
            .resolve(Some("basic-app"), None, Some(GrantKind::JwtBearer))
            .unwrap();
        assert!(matches!(auth, ClientAuth::Basic { .. }), "{auth:?}");
        let (raw, fields) = auth_fields(&auth);
        assert_eq!(raw, "client_id=basic-app");
        assert_eq!(fields, pairs(&[("client_id", "basic-app")]));
        assert_eq!(basic(&auth), basic_of("basic-app", "basic-secret"));
        assert_eq!(auth.client_id(), Some("basic-app"));
        assert!(!auth.from_caller());
    }
}

#[test]
fn an_absent_auth_method_means_client_secret_basic() {
    let clients = clients(true, None);
    let auth = clients
        .resolve(Some("implicit-app"), None, Some(GrantKind::Password))
        .unwrap();
    assert_eq!(
        auth_fields(&auth).1,
        pairs(&[("client_id", "implicit-app")])
    );
    assert_eq!(basic(&auth), basic_of("implicit-app", "implicit-secret"));
    assert!(!auth.from_caller());
}

#[test]
fn client_secret_post_sends_id_and_secret_in_the_body() {
    for allow_public in [true, false] {
        let clients = clients(allow_public, None);
        let auth = clients
            .resolve(Some("post-app"), None, Some(GrantKind::Password))
            .unwrap();
        assert!(matches!(auth, ClientAuth::Post { .. }), "{auth:?}");
        let mut fields = Vec::new();
        auth.push_fields(&mut fields);
        let secret_names: Vec<&str> = fields.iter().filter(|f| f.secret).map(|f| f.name).collect();
        assert_eq!(secret_names, ["client_secret"]);
        let (_, decoded) = auth_fields(&auth);
        assert_eq!(
            decoded,
            pairs(&[("client_id", "post-app"), ("client_secret", "post-secret")])
        );
        assert_eq!(basic(&auth), None);
        assert_eq!(auth.client_id(), Some("post-app"));
        assert!(!auth.from_caller());
    }
}

#[test]
fn auth_method_none_sends_only_the_client_id() {
    for allow_public in [true, false] {
        let clients = clients(allow_public, None);
        let auth = clients
            .resolve(Some("public-app"), None, Some(GrantKind::AuthorizationCode))
            .unwrap();
        assert!(matches!(auth, ClientAuth::Public { .. }), "{auth:?}");
        assert_eq!(auth_fields(&auth).1, pairs(&[("client_id", "public-app")]));
        assert_eq!(basic(&auth), None);
        assert_eq!(auth.client_id(), Some("public-app"));
        assert!(!auth.from_caller());
    }
}

#[test]
fn a_caller_assertion_replaces_the_configured_credentials() {
    let assertion = secret("eyJ.caller-assertion.sig");
    for allow_public in [true, false] {
        let clients = clients(allow_public, None);
        // Whatever the registered method, the caller's assertion is what authenticates.
        for id in ["basic-app", "post-app", "public-app", "implicit-app"] {
            let auth = clients
                .resolve(Some(id), Some(&assertion), Some(GrantKind::JwtBearer))
                .unwrap();
            assert!(matches!(auth, ClientAuth::Assertion { .. }), "{auth:?}");
            let (raw, fields) = auth_fields(&auth);
            assert_eq!(
                fields,
                pairs(&[
                    ("client_id", id),
                    ("client_assertion_type", ASSERTION_TYPE),
                    ("client_assertion", "eyJ.caller-assertion.sig"),
                ]),
                "{id}"
            );
            assert!(!raw.contains("client_secret"), "{raw}");
            assert!(!raw.contains("-secret"), "{raw}");
            assert_eq!(basic(&auth), None, "{id}");
            assert_eq!(auth.client_id(), Some(id));
            assert!(auth.from_caller());
        }
    }
}

#[test]
fn a_caller_assertion_for_an_unregistered_client_when_public_clients_are_allowed() {
    let assertion = secret("eyJ.caller-assertion.sig");
    let clients = clients(true, None);
    let auth = clients
        .resolve(
            Some("stranger"),
            Some(&assertion),
            Some(GrantKind::Password),
        )
        .unwrap();
    assert_eq!(
        auth_fields(&auth).1,
        pairs(&[
            ("client_id", "stranger"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", "eyJ.caller-assertion.sig"),
        ])
    );
    assert!(auth.from_caller());
    assert_eq!(basic(&auth), None);
}

#[test]
fn a_caller_assertion_without_a_client_id_sends_no_client_id() {
    let assertion = secret("eyJ.caller-assertion.sig");
    let clients = clients(true, None);
    for grant in [Some(GrantKind::JwtBearer), None] {
        let auth = clients.resolve(None, Some(&assertion), grant).unwrap();
        let (raw, fields) = auth_fields(&auth);
        assert_eq!(
            fields,
            pairs(&[
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", "eyJ.caller-assertion.sig"),
            ])
        );
        assert_eq!(
            raw,
            "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer\
             &client_assertion=eyJ.caller-assertion.sig"
        );
        assert_eq!(auth.client_id(), None);
        assert_eq!(basic(&auth), None);
        assert!(auth.from_caller());
    }
}

#[test]
fn an_unregistered_client_is_public_only_when_allowed() {
    let open = clients(true, None);
    for grant in ALL_GRANTS.map(Some).into_iter().chain([None]) {
        let auth = open.resolve(Some("stranger"), None, grant).unwrap();
        assert!(matches!(auth, ClientAuth::Public { .. }), "{auth:?}");
        assert_eq!(auth_fields(&auth).1, pairs(&[("client_id", "stranger")]));
        assert_eq!(basic(&auth), None);
        assert!(!auth.from_caller());
    }

    let closed = clients(false, None);
    for grant in [Some(GrantKind::JwtBearer), None] {
        assert_eq!(
            closed.resolve(Some("stranger"), None, grant).unwrap_err(),
            ClientError::Unknown("stranger".to_owned())
        );
    }
    let assertion = secret("eyJ.caller-assertion.sig");
    assert_eq!(
        closed
            .resolve(
                Some("stranger"),
                Some(&assertion),
                Some(GrantKind::JwtBearer)
            )
            .unwrap_err(),
        ClientError::Unknown("stranger".to_owned())
    );
}

#[test]
fn an_empty_client_id_selects_the_default_client() {
    for allow_public in [true, false] {
        for (default, expected, basic_creds) in [
            (
                "basic-app",
                vec![("client_id", "basic-app")],
                basic_of("basic-app", "basic-secret"),
            ),
            (
                "post-app",
                vec![("client_id", "post-app"), ("client_secret", "post-secret")],
                None,
            ),
            ("public-app", vec![("client_id", "public-app")], None),
        ] {
            let clients = clients(allow_public, Some(default));
            // The proto's empty client_id is what "no client_id" looks like on the wire.
            let request = TokenRequest::try_from(proto::GetTokenRequest {
                grant: Some(ProtoGrant::JwtBearer(proto::JwtBearerGrant {
                    assertion: "a.b.c".into(),
                })),
                client_id: String::new(),
                ..Default::default()
            })
            .unwrap();
            assert_eq!(request.client_id, None);
            let auth = clients
                .resolve(
                    request.client_id.as_deref(),
                    None,
                    Some(request.grant.kind()),
                )
                .unwrap();
            assert_eq!(auth.client_id(), Some(default));
            assert_eq!(auth_fields(&auth).1, pairs(&expected), "{default}");
            assert_eq!(basic(&auth), basic_creds, "{default}");
            assert!(!auth.from_caller());

            // A named client still wins over the default.
            let named = clients
                .resolve(Some("public-app"), None, Some(GrantKind::JwtBearer))
                .unwrap();
            assert_eq!(named.client_id(), Some("public-app"));
        }
    }
}

#[test]
fn no_client_id_and_no_default_is_missing() {
    for allow_public in [true, false] {
        let clients = clients(allow_public, None);
        for grant in [Some(GrantKind::JwtBearer), None] {
            assert_eq!(
                clients.resolve(None, None, grant).unwrap_err(),
                ClientError::Missing,
                "allow_public = {allow_public}, grant = {grant:?}"
            );
        }
    }
}

#[test]
fn a_grant_outside_allowed_grants_is_refused() {
    for allow_public in [true, false] {
        let clients = clients(allow_public, None);
        for grant in ALL_GRANTS {
            let result = clients.resolve(Some("limited-app"), None, Some(grant));
            if matches!(grant, GrantKind::JwtBearer | GrantKind::RefreshToken) {
                let auth = result.unwrap_or_else(|e| panic!("{grant}: {e}"));
                assert_eq!(basic(&auth), basic_of("limited-app", "limited-secret"));
            } else {
                assert_eq!(
                    result.unwrap_err(),
                    ClientError::GrantNotAllowed {
                        client_id: "limited-app".to_owned(),
                        grant,
                    }
                );
            }
        }
        // Clients without the key may use every grant.
        for id in ["basic-app", "post-app", "public-app", "implicit-app"] {
            for grant in ALL_GRANTS {
                clients
                    .resolve(Some(id), None, Some(grant))
                    .unwrap_or_else(|e| panic!("{id} {grant}: {e}"));
            }
        }
    }
}

#[test]
fn allowed_grants_apply_to_the_default_client_and_to_caller_assertions() {
    let clients = clients(true, Some("limited-app"));
    assert_eq!(
        clients
            .resolve(None, None, Some(GrantKind::Password))
            .unwrap_err(),
        ClientError::GrantNotAllowed {
            client_id: "limited-app".to_owned(),
            grant: GrantKind::Password,
        }
    );
    clients
        .resolve(None, None, Some(GrantKind::RefreshToken))
        .unwrap();
    let assertion = secret("eyJ.caller-assertion.sig");
    assert_eq!(
        clients
            .resolve(Some("limited-app"), Some(&assertion), Some(GrantKind::Otp))
            .unwrap_err(),
        ClientError::GrantNotAllowed {
            client_id: "limited-app".to_owned(),
            grant: GrantKind::Otp,
        }
    );
}

#[test]
fn revocation_is_never_refused_for_grants() {
    for allow_public in [true, false] {
        let clients = clients(allow_public, Some("limited-app"));
        let auth = clients.resolve(Some("limited-app"), None, None).unwrap();
        assert_eq!(basic(&auth), basic_of("limited-app", "limited-secret"));
        let auth = clients.resolve(None, None, None).unwrap();
        assert_eq!(auth.client_id(), Some("limited-app"));
    }
}

#[test]
fn error_messages_name_the_client_and_grant() {
    let clients = clients(false, None);
    let unknown = clients
        .resolve(Some("stranger"), None, Some(GrantKind::Otp))
        .unwrap_err()
        .to_string();
    assert!(unknown.contains("\"stranger\""), "{unknown}");
    let refused = clients
        .resolve(Some("limited-app"), None, Some(GrantKind::Otp))
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("\"limited-app\"") && refused.contains("otp"),
        "{refused}"
    );
}

#[test]
fn new_refuses_a_method_without_its_secret() {
    let client = |auth_method, secret: Option<&str>| RegisteredClient {
        client_id: "odd".into(),
        client_secret: None,
        client_secret_file: None,
        auth_method,
        allowed_grants: None,
        default: false,
        private_key_file: None,
        signing_alg: None,
        key_id: None,
        assertion_audience: None,
        allowed_callers: None,
        cache: true,
        secret: secret.map(SecretString::from),
    };
    for (method, secret) in [
        (AuthMethod::ClientSecretBasic, None),
        (AuthMethod::ClientSecretPost, None),
        (AuthMethod::None, Some("s3cr3t")),
        (AuthMethod::ClientSecretJwt, None),
        (AuthMethod::PrivateKeyJwt, None),
    ] {
        let error = Clients::new(
            &ClientsConfig {
                allow_public: true,
                registered: vec![client(method, secret)],
            },
            TOKEN_URL,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("\"odd\""), "{error}");
        assert!(!error.contains("s3cr3t"), "{error}");
    }
}

#[test]
fn debug_output_never_contains_a_client_secret() {
    let clients = clients(true, Some("basic-app"));
    let shown = format!("{clients:?}");
    for secret in [
        "basic-secret",
        "post-secret",
        "implicit-secret",
        "limited-secret",
    ] {
        assert!(!shown.contains(secret), "{secret} leaked: {shown}");
    }
    assert!(shown.contains("basic-app"), "{shown}");
    let assertion = secret("eyJ.caller-assertion.sig");
    for auth in [
        clients.resolve(Some("basic-app"), None, None).unwrap(),
        clients.resolve(Some("post-app"), None, None).unwrap(),
        clients
            .resolve(Some("basic-app"), Some(&assertion), None)
            .unwrap(),
    ] {
        let mut fields = Vec::new();
        auth.push_fields(&mut fields);
        let shown = format!("{auth:?} {fields:?}");
        for secret in ["basic-secret", "post-secret", "eyJ.caller-assertion.sig"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Whole bodies: grant fields, then common fields, then client authentication.
// ---------------------------------------------------------------------------------------

struct Sent {
    body: Pairs,
    raw: String,
    basic: Creds,
    from_caller: bool,
}

/// Does what the service does: validate, resolve, grant + common fields, then auth fields.
fn send(clients: &Clients, request: proto::GetTokenRequest) -> Sent {
    let request = TokenRequest::try_from(request).unwrap_or_else(|v| panic!("{v:?}"));
    let auth = clients
        .resolve(
            request.client_id.as_deref(),
            request.client_assertion.as_ref(),
            Some(request.grant.kind()),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let mut fields = request.form_fields();
    auth.push_fields(&mut fields);
    let outgoing = Outgoing {
        penalty: None,
        lease: None,
        fields,
        basic: auth.basic(),
        replay: crate::upstream::Replay::Always,
    };
    let raw = outgoing.body();
    Sent {
        body: decode(&raw),
        raw,
        basic: outgoing
            .basic
            .map(|(id, secret)| (id.to_owned(), secret.expose_secret().to_owned())),
        from_caller: auth.from_caller(),
    }
}

fn common(grant: ProtoGrant, client_id: &str) -> proto::GetTokenRequest {
    proto::GetTokenRequest {
        rejected_access_token: String::new(),
        grant: Some(grant),
        client_id: client_id.into(),
        client_assertion: None,
        scopes: vec!["ReadAccounts".into(), "SMS".into()],
        endpoint_id: "ep-9".into(),
        access_token_ttl: Some(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        refresh_token_ttl: Some(prost_types::Duration {
            seconds: 86_400,
            nanos: 0,
        }),
    }
}

const COMMON: [(&str, &str); 4] = [
    ("scope", "ReadAccounts SMS"),
    ("endpoint_id", "ep-9"),
    ("access_token_ttl", "3600"),
    ("refresh_token_ttl", "86400"),
];

fn expected(grant: &[(&str, &str)], auth: &[(&str, &str)]) -> Pairs {
    let mut all = pairs(grant);
    all.extend(pairs(&COMMON));
    all.extend(pairs(auth));
    all
}

#[test]
fn full_body_with_client_secret_basic() {
    let sent = send(
        &clients(false, None),
        common(
            ProtoGrant::JwtBearer(proto::JwtBearerGrant {
                assertion: "eyJ.user.sig".into(),
            }),
            "basic-app",
        ),
    );
    assert_eq!(
        sent.body,
        expected(
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", "eyJ.user.sig"),
            ],
            &[("client_id", "basic-app")],
        )
    );
    assert_eq!(sent.basic, basic_of("basic-app", "basic-secret"));
    assert!(!sent.raw.contains("basic-secret"), "{}", sent.raw);
    assert!(!sent.from_caller);
}

#[test]
#[allow(deprecated, reason = "the deprecated extension is still sent when set")]
fn full_body_with_client_secret_post() {
    let sent = send(
        &clients(false, None),
        common(
            ProtoGrant::Password(proto::PasswordGrant {
                username: "alice@example.com".into(),
                password: "hunter 2&x".into(),
                extension: "101".into(),
                pin: String::new(),
            }),
            "post-app",
        ),
    );
    assert_eq!(
        sent.body,
        expected(
            &[
                ("grant_type", "password"),
                ("username", "alice@example.com"),
                ("password", "hunter 2&x"),
                ("extension", "101"),
            ],
            &[("client_id", "post-app"), ("client_secret", "post-secret")],
        )
    );
    assert_eq!(sent.basic, None);
    assert!(!sent.from_caller);
}

#[test]
fn full_body_with_auth_method_none() {
    let sent = send(
        &clients(false, None),
        common(
            ProtoGrant::RefreshToken(proto::RefreshTokenGrant {
                refresh_token: "rt-1".into(),
            }),
            "public-app",
        ),
    );
    assert_eq!(
        sent.body,
        expected(
            &[("grant_type", "refresh_token"), ("refresh_token", "rt-1")],
            &[("client_id", "public-app")],
        )
    );
    assert_eq!(sent.basic, None);
    assert!(!sent.from_caller);
}

#[test]
fn full_body_with_a_caller_assertion() {
    let sent = send(
        &clients(false, None),
        proto::GetTokenRequest {
            client_assertion: Some(proto::ClientAssertion {
                assertion: "eyJ.client.sig".into(),
            }),
            ..common(
                ProtoGrant::AuthorizationCode(proto::AuthorizationCodeGrant {
                    code: "code-1".into(),
                    redirect_uri: "https://app.example/cb".into(),
                    code_verifier: "verifier-1".into(),
                }),
                "basic-app",
            )
        },
    );
    assert_eq!(
        sent.body,
        expected(
            &[
                ("grant_type", "authorization_code"),
                ("code", "code-1"),
                ("redirect_uri", "https://app.example/cb"),
                ("code_verifier", "verifier-1"),
            ],
            &[
                ("client_id", "basic-app"),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", "eyJ.client.sig"),
            ],
        )
    );
    assert_eq!(sent.basic, None);
    assert!(sent.from_caller);

    // Without a client_id (and no default), only the assertion identifies the client.
    let sent = send(
        &clients(true, None),
        proto::GetTokenRequest {
            client_assertion: Some(proto::ClientAssertion {
                assertion: "eyJ.client.sig".into(),
            }),
            ..common(
                ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant { subject: None }),
                "",
            )
        },
    );
    assert_eq!(
        sent.body,
        expected(
            &[("grant_type", "client_credentials")],
            &[
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", "eyJ.client.sig"),
            ],
        )
    );
    assert_eq!(sent.basic, None);
    assert!(sent.from_caller);
}

#[test]
fn full_body_for_an_unregistered_public_client() {
    let sent = send(
        &clients(true, None),
        common(
            ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant {
                subject: Some(proto::client_credentials_grant::Subject::AccountId(
                    "400131844008".into(),
                )),
            }),
            "stranger",
        ),
    );
    assert_eq!(
        sent.body,
        expected(
            &[
                ("grant_type", "client_credentials"),
                ("account_id", "400131844008"),
            ],
            &[("client_id", "stranger")],
        )
    );
    assert_eq!(sent.basic, None);
    assert!(!sent.from_caller);
}

#[test]
fn full_revoke_bodies() {
    let clients = clients(false, Some("basic-app"));
    let cases: [(&str, Option<&str>, Pairs, Creds); 4] = [
        (
            "post-app",
            None,
            pairs(&[
                ("token", "rt-1"),
                ("client_id", "post-app"),
                ("client_secret", "post-secret"),
            ]),
            None,
        ),
        (
            "",
            None,
            pairs(&[("token", "rt-1"), ("client_id", "basic-app")]),
            basic_of("basic-app", "basic-secret"),
        ),
        (
            "limited-app",
            None,
            pairs(&[("token", "rt-1"), ("client_id", "limited-app")]),
            basic_of("limited-app", "limited-secret"),
        ),
        (
            "public-app",
            Some("eyJ.client.sig"),
            pairs(&[
                ("token", "rt-1"),
                ("client_id", "public-app"),
                ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", "eyJ.client.sig"),
            ]),
            None,
        ),
    ];
    for (client_id, assertion, body, basic_creds) in cases {
        let request = RevokeRequest::try_from(proto::RevokeTokenRequest {
            token: "rt-1".into(),
            client_id: client_id.into(),
            client_assertion: assertion.map(|a| proto::ClientAssertion {
                assertion: a.into(),
            }),
        })
        .unwrap();
        let auth = clients
            .resolve(
                request.client_id.as_deref(),
                request.client_assertion.as_ref(),
                None,
            )
            .unwrap();
        let mut fields = request.form_fields();
        auth.push_fields(&mut fields);
        let outgoing = Outgoing {
            penalty: None,
            lease: None,
            fields,
            basic: auth.basic(),
            replay: crate::upstream::Replay::Always,
        };
        assert_eq!(decode(&outgoing.body()), body, "{client_id:?}");
        assert_eq!(basic(&auth), basic_creds, "{client_id:?}");
    }
}
