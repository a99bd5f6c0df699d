//! Unit tests of grant validation and translation.
//!
//! Every body is produced by the same encoder the upstream client uses
//! ([`crate::upstream::Outgoing::body`]) and decoded back, so each test pins the exact
//! ordered list of `name=value` pairs that leaves tokengate.

use std::collections::BTreeSet;

use prost::Message as _;
use prost_types::Duration;

use super::*;
use crate::proto::client_credentials_grant::Subject as ProtoSubject;
use crate::upstream::Outgoing;

type Pairs = Vec<(String, String)>;

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const DEVICE_CODE: &str = "urn:ietf:params:oauth:grant-type:device_code";

fn pairs(expected: &[(&str, &str)]) -> Pairs {
    expected
        .iter()
        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
        .collect()
}

/// The body exactly as the upstream client would send it.
fn body(fields: Vec<FormField<'_>>) -> String {
    Outgoing {
        penalty: None,
        lease: None,
        fields,
        basic: None,
        replay: crate::upstream::Replay::Always,
    }
    .body()
}

fn decode(body: &str) -> Pairs {
    serde_urlencoded::from_str(body).unwrap_or_else(|e| panic!("{body:?} does not decode: {e}"))
}

fn request(grant: ProtoGrant) -> proto::GetTokenRequest {
    proto::GetTokenRequest {
        grant: Some(grant),
        ..Default::default()
    }
}

fn ttl(seconds: i64, nanos: i32) -> Option<Duration> {
    Some(Duration { seconds, nanos })
}

/// Every common field set. `client_id` and `client_assertion` belong to client
/// authentication, so they must not show up among the request's own form fields.
fn with_common(grant: ProtoGrant) -> proto::GetTokenRequest {
    proto::GetTokenRequest {
        rejected_access_token: String::new(),
        grant: Some(grant),
        client_id: "my-app".into(),
        client_assertion: Some(proto::ClientAssertion {
            assertion: "client-assertion-jwt".into(),
        }),
        scopes: vec!["ReadAccounts".into(), "SubscriptionWebhook".into()],
        endpoint_id: "endpoint-7".into(),
        access_token_ttl: ttl(3600, 0),
        refresh_token_ttl: ttl(604_800, 0),
    }
}

/// What [`with_common`] adds after the grant's own fields.
const COMMON: [(&str, &str); 4] = [
    ("scope", "ReadAccounts SubscriptionWebhook"),
    ("endpoint_id", "endpoint-7"),
    ("access_token_ttl", "3600"),
    ("refresh_token_ttl", "604800"),
];

fn validated(request: proto::GetTokenRequest) -> TokenRequest {
    TokenRequest::try_from(request).unwrap_or_else(|v| panic!("unexpected violations: {v:?}"))
}

fn sent(request: &TokenRequest) -> Pairs {
    decode(&body(request.form_fields()))
}

/// The full variant: the grant with every optional field set, plus every common field.
fn assert_full(grant: ProtoGrant, kind: GrantKind, grant_fields: &[(&str, &str)]) {
    let request = validated(with_common(grant));
    assert_eq!(request.grant.kind(), kind);
    assert_eq!(request.client_id.as_deref(), Some("my-app"));
    assert_eq!(
        request
            .client_assertion
            .as_ref()
            .map(|a| a.expose_secret().to_owned()),
        Some("client-assertion-jwt".to_owned())
    );
    let mut expected = pairs(grant_fields);
    expected.extend(pairs(&COMMON));
    assert_eq!(sent(&request), expected, "full {kind} request");
}

/// The minimal variant: only required fields, everything optional left empty.
fn assert_minimal(grant: ProtoGrant, kind: GrantKind, grant_fields: &[(&str, &str)]) {
    let request = validated(request(grant));
    assert_eq!(request.grant.kind(), kind);
    assert_eq!(request.client_id, None);
    assert!(request.client_assertion.is_none());
    assert_eq!(
        sent(&request),
        pairs(grant_fields),
        "minimal {kind} request"
    );
}

fn violations(request: proto::GetTokenRequest) -> Vec<String> {
    match TokenRequest::try_from(request) {
        Ok(request) => panic!("accepted: {request:?}"),
        Err(violations) => {
            for v in &violations {
                assert!(!v.description.is_empty(), "{v:?}");
            }
            violations.into_iter().map(|v| v.field).collect()
        }
    }
}

fn sorted(fields: &[&str]) -> Vec<String> {
    let mut fields: Vec<String> = fields.iter().map(|f| (*f).to_owned()).collect();
    fields.sort();
    fields
}

// ---------------------------------------------------------------------------------------
// The twelve arms, full and minimal.
// ---------------------------------------------------------------------------------------

#[test]
fn authorization_code_fields() {
    assert_full(
        ProtoGrant::AuthorizationCode(proto::AuthorizationCodeGrant {
            code: "auth-code-1".into(),
            redirect_uri: "https://app.example/callback".into(),
            code_verifier: "verifier-xyz".into(),
        }),
        GrantKind::AuthorizationCode,
        &[
            ("grant_type", "authorization_code"),
            ("code", "auth-code-1"),
            ("redirect_uri", "https://app.example/callback"),
            ("code_verifier", "verifier-xyz"),
        ],
    );
    assert_minimal(
        ProtoGrant::AuthorizationCode(proto::AuthorizationCodeGrant {
            code: "auth-code-1".into(),
            ..Default::default()
        }),
        GrantKind::AuthorizationCode,
        &[
            ("grant_type", "authorization_code"),
            ("code", "auth-code-1"),
        ],
    );
}

#[test]
#[allow(
    deprecated,
    reason = "the deprecated extension and pin are still sent when set"
)]
fn password_fields_include_the_deprecated_extension_and_pin() {
    assert_full(
        ProtoGrant::Password(proto::PasswordGrant {
            username: "alice@example.com".into(),
            password: "hunter2".into(),
            extension: "101".into(),
            pin: "4321".into(),
        }),
        GrantKind::Password,
        &[
            ("grant_type", "password"),
            ("username", "alice@example.com"),
            ("password", "hunter2"),
            ("extension", "101"),
            ("pin", "4321"),
        ],
    );
    assert_minimal(
        ProtoGrant::Password(proto::PasswordGrant {
            username: "alice@example.com".into(),
            password: "hunter2".into(),
            ..Default::default()
        }),
        GrantKind::Password,
        &[
            ("grant_type", "password"),
            ("username", "alice@example.com"),
            ("password", "hunter2"),
        ],
    );
}

#[test]
fn jwt_bearer_fields() {
    let grant = || {
        ProtoGrant::JwtBearer(proto::JwtBearerGrant {
            assertion: "eyJ.user-jwt.sig".into(),
        })
    };
    let expected = [
        ("grant_type", JWT_BEARER),
        ("assertion", "eyJ.user-jwt.sig"),
    ];
    assert_full(grant(), GrantKind::JwtBearer, &expected);
    assert_minimal(grant(), GrantKind::JwtBearer, &expected);
}

#[test]
fn partner_jwt_fields() {
    let grant = || {
        ProtoGrant::PartnerJwt(proto::PartnerJwtGrant {
            assertion: "eyJ.partner-jwt.sig".into(),
        })
    };
    let expected = [
        ("grant_type", "partner_jwt"),
        ("assertion", "eyJ.partner-jwt.sig"),
    ];
    assert_full(grant(), GrantKind::PartnerJwt, &expected);
    assert_minimal(grant(), GrantKind::PartnerJwt, &expected);
}

#[test]
fn refresh_token_fields() {
    let grant = || {
        ProtoGrant::RefreshToken(proto::RefreshTokenGrant {
            refresh_token: "rt-abc".into(),
        })
    };
    let expected = [("grant_type", "refresh_token"), ("refresh_token", "rt-abc")];
    assert_full(grant(), GrantKind::RefreshToken, &expected);
    assert_minimal(grant(), GrantKind::RefreshToken, &expected);
}

#[test]
fn ivr_pin_fields() {
    let grant = || {
        ProtoGrant::IvrPin(proto::IvrPinGrant {
            ivr_pin: "246810".into(),
        })
    };
    let expected = [("grant_type", "ivr_pin"), ("ivr_pin", "246810")];
    assert_full(grant(), GrantKind::IvrPin, &expected);
    assert_minimal(grant(), GrantKind::IvrPin, &expected);
}

#[test]
fn device_code_fields() {
    let grant = || {
        ProtoGrant::DeviceCode(proto::DeviceCodeGrant {
            device_code: "dc-42".into(),
        })
    };
    let expected = [("grant_type", DEVICE_CODE), ("device_code", "dc-42")];
    assert_full(grant(), GrantKind::DeviceCode, &expected);
    assert_minimal(grant(), GrantKind::DeviceCode, &expected);
}

#[test]
fn client_credentials_without_a_subject_is_plain_rfc_6749() {
    let grant = || ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant { subject: None });
    let expected = [("grant_type", "client_credentials")];
    assert_full(grant(), GrantKind::ClientCredentials, &expected);
    assert_minimal(grant(), GrantKind::ClientCredentials, &expected);
}

#[test]
fn client_credentials_for_an_account() {
    let grant = || {
        ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant {
            subject: Some(ProtoSubject::AccountId("400131844008".into())),
        })
    };
    let expected = [
        ("grant_type", "client_credentials"),
        ("account_id", "400131844008"),
    ];
    assert_full(grant(), GrantKind::ClientCredentials, &expected);
    assert_minimal(grant(), GrantKind::ClientCredentials, &expected);
}

#[test]
fn client_credentials_for_a_brand() {
    assert_full(
        ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant {
            subject: Some(ProtoSubject::Brand(proto::BrandSubject {
                brand_id: "1210".into(),
                partner_account_id: "partner-77".into(),
            })),
        }),
        GrantKind::ClientCredentials,
        &[
            ("grant_type", "client_credentials"),
            ("brand_id", "1210"),
            ("partner_account_id", "partner-77"),
        ],
    );
    assert_minimal(
        ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant {
            subject: Some(ProtoSubject::Brand(proto::BrandSubject {
                brand_id: "1210".into(),
                partner_account_id: String::new(),
            })),
        }),
        GrantKind::ClientCredentials,
        &[("grant_type", "client_credentials"), ("brand_id", "1210")],
    );
}

#[test]
fn otp_fields() {
    let grant = || {
        ProtoGrant::Otp(proto::OtpGrant {
            code: "otp-135790".into(),
        })
    };
    let expected = [("grant_type", "otp"), ("code", "otp-135790")];
    assert_full(grant(), GrantKind::Otp, &expected);
    assert_minimal(grant(), GrantKind::Otp, &expected);
}

#[test]
fn guest_fields() {
    assert_full(
        ProtoGrant::Guest(proto::GuestGrant {
            brand_id: "1210".into(),
            resource_type: "meeting".into(),
            resource: "https://v.example/join/123".into(),
        }),
        GrantKind::Guest,
        &[
            ("grant_type", "guest"),
            ("brand_id", "1210"),
            ("resource_type", "meeting"),
            ("resource", "https://v.example/join/123"),
        ],
    );
    assert_minimal(
        ProtoGrant::Guest(proto::GuestGrant::default()),
        GrantKind::Guest,
        &[("grant_type", "guest")],
    );
}

#[test]
fn personal_jwt_fields() {
    assert_full(
        ProtoGrant::PersonalJwt(proto::PersonalJwtGrant {
            assertion: "eyJ.personal-jwt.sig".into(),
        }),
        GrantKind::PersonalJwt,
        &[
            ("grant_type", "personal_jwt"),
            ("assertion", "eyJ.personal-jwt.sig"),
        ],
    );
    assert_minimal(
        ProtoGrant::PersonalJwt(proto::PersonalJwtGrant::default()),
        GrantKind::PersonalJwt,
        &[("grant_type", "personal_jwt")],
    );
}

#[test]
fn device_certificate_fields() {
    let grant = || ProtoGrant::DeviceCertificate(proto::DeviceCertificateGrant {});
    let expected = [("grant_type", "device_certificate")];
    assert_full(grant(), GrantKind::DeviceCertificate, &expected);
    assert_minimal(grant(), GrantKind::DeviceCertificate, &expected);
}

// ---------------------------------------------------------------------------------------
// Common fields and encoding.
// ---------------------------------------------------------------------------------------

fn device_certificate() -> ProtoGrant {
    ProtoGrant::DeviceCertificate(proto::DeviceCertificateGrant {})
}

#[test]
fn scopes_are_joined_by_single_spaces() {
    let one = validated(proto::GetTokenRequest {
        scopes: vec!["ReadAccounts".into()],
        ..request(device_certificate())
    });
    assert_eq!(
        sent(&one),
        pairs(&[
            ("grant_type", "device_certificate"),
            ("scope", "ReadAccounts"),
        ])
    );

    let three = validated(proto::GetTokenRequest {
        scopes: vec!["ReadAccounts".into(), "SMS".into(), "Meetings".into()],
        ..request(device_certificate())
    });
    let raw = body(three.form_fields());
    assert_eq!(
        raw,
        "grant_type=device_certificate&scope=ReadAccounts+SMS+Meetings"
    );
    assert_eq!(
        decode(&raw),
        pairs(&[
            ("grant_type", "device_certificate"),
            ("scope", "ReadAccounts SMS Meetings"),
        ])
    );
}

#[test]
fn empty_common_fields_are_not_sent() {
    let request = validated(proto::GetTokenRequest {
        scopes: Vec::new(),
        endpoint_id: String::new(),
        access_token_ttl: None,
        refresh_token_ttl: None,
        client_id: String::new(),
        ..request(device_certificate())
    });
    assert_eq!(request.endpoint_id, None);
    assert_eq!(request.access_token_ttl, None);
    assert_eq!(request.refresh_token_ttl, None);
    assert_eq!(request.client_id, None);
    assert_eq!(body(request.form_fields()), "grant_type=device_certificate");
}

#[test]
fn each_common_field_is_sent_on_its_own() {
    let cases: [(proto::GetTokenRequest, (&str, &str)); 4] = [
        (
            proto::GetTokenRequest {
                endpoint_id: "ep-1".into(),
                ..request(device_certificate())
            },
            ("endpoint_id", "ep-1"),
        ),
        (
            proto::GetTokenRequest {
                access_token_ttl: ttl(3600, 0),
                ..request(device_certificate())
            },
            ("access_token_ttl", "3600"),
        ),
        (
            proto::GetTokenRequest {
                refresh_token_ttl: ttl(1, 0),
                ..request(device_certificate())
            },
            ("refresh_token_ttl", "1"),
        ),
        (
            proto::GetTokenRequest {
                scopes: vec!["A".into(), "B".into()],
                ..request(device_certificate())
            },
            ("scope", "A B"),
        ),
    ];
    for (request, field) in cases {
        let request = validated(request);
        assert_eq!(
            sent(&request),
            pairs(&[("grant_type", "device_certificate"), field]),
        );
    }
}

#[test]
fn ttls_are_whole_seconds() {
    let request = validated(proto::GetTokenRequest {
        access_token_ttl: ttl(3600, 0),
        refresh_token_ttl: ttl(i64::MAX, 0),
        ..request(device_certificate())
    });
    assert_eq!(request.access_token_ttl, Some(3600));
    assert_eq!(request.refresh_token_ttl, Some(i64::MAX as u64));
    assert_eq!(
        sent(&request),
        pairs(&[
            ("grant_type", "device_certificate"),
            ("access_token_ttl", "3600"),
            ("refresh_token_ttl", "9223372036854775807"),
        ])
    );
}

#[test]
fn reserved_and_non_ascii_characters_are_encoded_and_round_trip() {
    let username = "a b&c=d+e@example.com";
    let password = "p%ss w&rd=+é中";
    let endpoint = "ü/?#;";
    let request = validated(proto::GetTokenRequest {
        endpoint_id: endpoint.into(),
        scopes: vec!["Read&Write".into(), "x=y+z".into()],
        ..request(ProtoGrant::Password(proto::PasswordGrant {
            username: username.into(),
            password: password.into(),
            ..Default::default()
        }))
    });
    let raw = body(request.form_fields());
    assert_eq!(
        raw,
        "grant_type=password\
         &username=a+b%26c%3Dd%2Be%40example.com\
         &password=p%25ss+w%26rd%3D%2B%C3%A9%E4%B8%AD\
         &scope=Read%26Write+x%3Dy%2Bz\
         &endpoint_id=%C3%BC%2F%3F%23%3B"
    );
    assert_eq!(
        decode(&raw),
        pairs(&[
            ("grant_type", "password"),
            ("username", username),
            ("password", password),
            ("scope", "Read&Write x=y+z"),
            ("endpoint_id", endpoint),
        ])
    );
}

#[test]
fn urn_grant_types_are_percent_encoded_in_the_raw_body() {
    let jwt = validated(request(ProtoGrant::JwtBearer(proto::JwtBearerGrant {
        assertion: "a.b.c".into(),
    })));
    assert_eq!(
        body(jwt.form_fields()),
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=a.b.c"
    );
    let device = validated(request(ProtoGrant::DeviceCode(proto::DeviceCodeGrant {
        device_code: "d-1".into(),
    })));
    assert_eq!(
        body(device.form_fields()),
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Adevice_code&device_code=d-1"
    );
}

// ---------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------

#[test]
fn a_request_without_a_grant_is_refused_on_grant() {
    assert_eq!(violations(proto::GetTokenRequest::default()), ["grant"]);
    assert_eq!(
        violations(proto::GetTokenRequest {
            client_id: "my-app".into(),
            scopes: vec!["ReadAccounts".into()],
            ..Default::default()
        }),
        ["grant"]
    );
}

#[test]
#[allow(
    deprecated,
    reason = "the deprecated fields are optional and do not help"
)]
fn each_missing_required_field_is_named_by_its_path() {
    let cases: Vec<(ProtoGrant, &[&str])> = vec![
        (
            ProtoGrant::AuthorizationCode(proto::AuthorizationCodeGrant {
                code: String::new(),
                redirect_uri: "https://app.example/cb".into(),
                code_verifier: "v".into(),
            }),
            &["authorization_code.code"],
        ),
        (
            ProtoGrant::Password(proto::PasswordGrant {
                username: String::new(),
                password: "hunter2".into(),
                extension: "101".into(),
                pin: "1".into(),
            }),
            &["password.username"],
        ),
        (
            ProtoGrant::Password(proto::PasswordGrant {
                username: "alice".into(),
                password: String::new(),
                ..Default::default()
            }),
            &["password.password"],
        ),
        (
            ProtoGrant::Password(proto::PasswordGrant::default()),
            &["password.username", "password.password"],
        ),
        (
            ProtoGrant::JwtBearer(proto::JwtBearerGrant::default()),
            &["jwt_bearer.assertion"],
        ),
        (
            ProtoGrant::PartnerJwt(proto::PartnerJwtGrant::default()),
            &["partner_jwt.assertion"],
        ),
        (
            ProtoGrant::RefreshToken(proto::RefreshTokenGrant::default()),
            &["refresh_token.refresh_token"],
        ),
        (
            ProtoGrant::IvrPin(proto::IvrPinGrant::default()),
            &["ivr_pin.ivr_pin"],
        ),
        (
            ProtoGrant::DeviceCode(proto::DeviceCodeGrant::default()),
            &["device_code.device_code"],
        ),
        (ProtoGrant::Otp(proto::OtpGrant::default()), &["otp.code"]),
        (
            ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant {
                subject: Some(ProtoSubject::AccountId(String::new())),
            }),
            &["client_credentials.account_id"],
        ),
        (
            ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant {
                subject: Some(ProtoSubject::Brand(proto::BrandSubject {
                    brand_id: String::new(),
                    partner_account_id: "partner-77".into(),
                })),
            }),
            &["client_credentials.brand.brand_id"],
        ),
    ];
    for (grant, expected) in cases {
        let shown = format!("{grant:?}");
        let mut got = violations(request(grant));
        got.sort();
        assert_eq!(got, sorted(expected), "{shown}");
    }
}

#[test]
fn arms_without_required_fields_accept_an_empty_message() {
    for grant in [
        ProtoGrant::Guest(proto::GuestGrant::default()),
        ProtoGrant::PersonalJwt(proto::PersonalJwtGrant::default()),
        ProtoGrant::DeviceCertificate(proto::DeviceCertificateGrant {}),
        ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant::default()),
    ] {
        validated(request(grant));
    }
}

#[test]
fn every_violation_is_reported_at_once() {
    let fields = violations(proto::GetTokenRequest {
        rejected_access_token: String::new(),
        grant: Some(ProtoGrant::Password(proto::PasswordGrant::default())),
        client_id: "my-app".into(),
        client_assertion: Some(proto::ClientAssertion::default()),
        scopes: vec!["ok".into(), "two words".into(), String::new()],
        endpoint_id: "ep".into(),
        access_token_ttl: ttl(0, 0),
        refresh_token_ttl: ttl(10, 5),
    });
    let mut got = fields.clone();
    got.sort();
    assert_eq!(
        got,
        sorted(&[
            "password.username",
            "password.password",
            "scopes[1]",
            "scopes[2]",
            "access_token_ttl",
            "refresh_token_ttl",
            "client_assertion.assertion",
        ]),
        "{fields:?}"
    );

    // A missing grant does not hide the other problems either.
    let mut fields = violations(proto::GetTokenRequest {
        scopes: vec!["a\tb".into()],
        access_token_ttl: ttl(-1, 0),
        ..Default::default()
    });
    fields.sort();
    assert_eq!(fields, sorted(&["grant", "scopes[0]", "access_token_ttl"]));
}

#[test]
fn a_scope_with_whitespace_or_an_empty_scope_is_refused_by_index() {
    for (i, bad) in [
        "two words",
        "tab\there",
        "new\nline",
        "carriage\rreturn",
        " leading",
        "trailing ",
        "nbsp\u{a0}inside",
        "",
    ]
    .into_iter()
    .enumerate()
    {
        let mut scopes = vec!["ReadAccounts".to_owned(); i + 1];
        scopes.push(bad.to_owned());
        scopes.push("SMS".to_owned());
        let index = i + 1;
        assert_eq!(
            violations(proto::GetTokenRequest {
                scopes,
                ..request(device_certificate())
            }),
            [format!("scopes[{index}]")],
            "scope {bad:?}"
        );
    }
}

#[test]
fn a_ttl_must_be_positive_whole_seconds() {
    let bad = [
        ttl(3600, 1),
        ttl(3600, 500_000_000),
        ttl(0, 0),
        ttl(0, 500_000_000),
        ttl(-1, 0),
        ttl(-3600, 0),
        ttl(0, -1),
        ttl(i64::MIN, 0),
    ];
    for value in bad {
        assert_eq!(
            violations(proto::GetTokenRequest {
                access_token_ttl: value,
                ..request(device_certificate())
            }),
            ["access_token_ttl"],
            "access_token_ttl {value:?}"
        );
        assert_eq!(
            violations(proto::GetTokenRequest {
                refresh_token_ttl: value,
                ..request(device_certificate())
            }),
            ["refresh_token_ttl"],
            "refresh_token_ttl {value:?}"
        );
    }
}

#[test]
fn a_client_assertion_must_carry_an_assertion() {
    assert_eq!(
        violations(proto::GetTokenRequest {
            client_assertion: Some(proto::ClientAssertion {
                assertion: String::new(),
            }),
            ..request(device_certificate())
        }),
        ["client_assertion.assertion"]
    );
    // Absent is fine, and present with a value is kept (it is sent by client auth).
    assert!(
        validated(request(device_certificate()))
            .client_assertion
            .is_none()
    );
    let with = validated(proto::GetTokenRequest {
        client_assertion: Some(proto::ClientAssertion {
            assertion: "eyJ.client.sig".into(),
        }),
        ..request(device_certificate())
    });
    assert_eq!(
        with.client_assertion.as_ref().map(|a| a.expose_secret()),
        Some("eyJ.client.sig")
    );
    assert_eq!(body(with.form_fields()), "grant_type=device_certificate");
}

#[test]
fn revoke_request() {
    let revoke = RevokeRequest::try_from(proto::RevokeTokenRequest {
        token: "rt a&b".into(),
        client_id: "my-app".into(),
        client_assertion: None,
    })
    .expect("valid");
    assert_eq!(revoke.client_id.as_deref(), Some("my-app"));
    assert!(revoke.client_assertion.is_none());
    let fields = revoke.form_fields();
    assert!(fields.iter().all(|f| f.secret), "the token is a secret");
    let raw = body(fields);
    assert_eq!(raw, "token=rt+a%26b");
    assert_eq!(decode(&raw), pairs(&[("token", "rt a&b")]));

    let anonymous = RevokeRequest::try_from(proto::RevokeTokenRequest {
        token: "rt-1".into(),
        client_id: String::new(),
        client_assertion: Some(proto::ClientAssertion {
            assertion: "eyJ.client.sig".into(),
        }),
    })
    .expect("valid");
    assert_eq!(anonymous.client_id, None);
    assert_eq!(
        anonymous
            .client_assertion
            .as_ref()
            .map(|a| a.expose_secret()),
        Some("eyJ.client.sig")
    );

    let refused = |request: proto::RevokeTokenRequest| -> Vec<String> {
        let mut fields: Vec<String> = RevokeRequest::try_from(request)
            .expect_err("refused")
            .into_iter()
            .map(|v| v.field)
            .collect();
        fields.sort();
        fields
    };
    assert_eq!(
        refused(proto::RevokeTokenRequest {
            client_id: "my-app".into(),
            ..Default::default()
        }),
        ["token"]
    );
    assert_eq!(
        refused(proto::RevokeTokenRequest {
            token: String::new(),
            client_id: String::new(),
            client_assertion: Some(proto::ClientAssertion::default()),
        }),
        sorted(&["token", "client_assertion.assertion"])
    );
}

// ---------------------------------------------------------------------------------------
// Secrets.
// ---------------------------------------------------------------------------------------

/// Each arm with distinctive secret values, the secrets, and the names of the form fields
/// that must be flagged secret (the upstream client scrubs those from echoed errors).
#[allow(deprecated, reason = "the deprecated pin is a secret too")]
fn secret_cases() -> Vec<(ProtoGrant, Vec<&'static str>, Vec<&'static str>)> {
    vec![
        (
            ProtoGrant::AuthorizationCode(proto::AuthorizationCodeGrant {
                code: "SECRET-code-1".into(),
                redirect_uri: "https://app.example/cb".into(),
                code_verifier: "SECRET-verifier-2".into(),
            }),
            vec!["SECRET-code-1", "SECRET-verifier-2"],
            vec!["code", "code_verifier"],
        ),
        (
            ProtoGrant::Password(proto::PasswordGrant {
                username: "alice@example.com".into(),
                password: "SECRET-password-3".into(),
                extension: "101".into(),
                pin: "SECRET-pin-4".into(),
            }),
            vec!["SECRET-password-3", "SECRET-pin-4"],
            vec!["password", "pin"],
        ),
        (
            ProtoGrant::JwtBearer(proto::JwtBearerGrant {
                assertion: "SECRET-jwt-5".into(),
            }),
            vec!["SECRET-jwt-5"],
            vec!["assertion"],
        ),
        (
            ProtoGrant::PartnerJwt(proto::PartnerJwtGrant {
                assertion: "SECRET-partner-6".into(),
            }),
            vec!["SECRET-partner-6"],
            vec!["assertion"],
        ),
        (
            ProtoGrant::RefreshToken(proto::RefreshTokenGrant {
                refresh_token: "SECRET-refresh-7".into(),
            }),
            vec!["SECRET-refresh-7"],
            vec!["refresh_token"],
        ),
        (
            ProtoGrant::IvrPin(proto::IvrPinGrant {
                ivr_pin: "SECRET-ivr-8".into(),
            }),
            vec!["SECRET-ivr-8"],
            vec!["ivr_pin"],
        ),
        (
            ProtoGrant::DeviceCode(proto::DeviceCodeGrant {
                device_code: "SECRET-device-9".into(),
            }),
            vec!["SECRET-device-9"],
            vec!["device_code"],
        ),
        (
            ProtoGrant::Otp(proto::OtpGrant {
                code: "SECRET-otp-10".into(),
            }),
            vec!["SECRET-otp-10"],
            vec!["code"],
        ),
        (
            ProtoGrant::PersonalJwt(proto::PersonalJwtGrant {
                assertion: "SECRET-personal-11".into(),
            }),
            vec!["SECRET-personal-11"],
            vec!["assertion"],
        ),
        (
            ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant {
                subject: Some(ProtoSubject::Brand(proto::BrandSubject {
                    brand_id: "1210".into(),
                    partner_account_id: "p-1".into(),
                })),
            }),
            vec![],
            vec![],
        ),
        (
            ProtoGrant::Guest(proto::GuestGrant {
                brand_id: "1210".into(),
                resource_type: "meeting".into(),
                resource: "r".into(),
            }),
            vec![],
            vec![],
        ),
        (device_certificate(), vec![], vec![]),
    ]
}

#[test]
fn debug_output_never_contains_a_secret() {
    for (grant, secrets, secret_names) in secret_cases() {
        let request = validated(proto::GetTokenRequest {
            client_assertion: Some(proto::ClientAssertion {
                assertion: "SECRET-client-assertion".into(),
            }),
            ..with_common(grant)
        });
        let kind = request.grant.kind();
        let shown_request = format!("{request:?}");
        let fields = request.form_fields();
        let shown_fields = format!("{fields:?}");
        for secret in secrets.iter().chain(&["SECRET-client-assertion"]) {
            assert!(
                !shown_request.contains(secret),
                "{secret} leaked from {kind}: {shown_request}"
            );
            assert!(
                !shown_fields.contains(secret),
                "{secret} leaked from {kind}: {shown_fields}"
            );
        }
        // Debug still shows the plain values, so it is not just empty.
        assert!(shown_request.contains("endpoint-7"), "{shown_request}");
        assert!(shown_fields.contains("endpoint-7"), "{shown_fields}");

        let flagged: BTreeSet<&str> = fields.iter().filter(|f| f.secret).map(|f| f.name).collect();
        assert_eq!(
            flagged,
            secret_names.iter().copied().collect::<BTreeSet<_>>(),
            "secret fields of {kind}"
        );
        // ...and the secrets do reach the body.
        let raw = body(fields);
        for secret in &secrets {
            assert!(raw.contains(secret), "{secret} missing from {raw}");
        }
    }
}

#[test]
fn violations_never_contain_a_secret() {
    let errors = TokenRequest::try_from(proto::GetTokenRequest {
        grant: Some(ProtoGrant::Password(proto::PasswordGrant {
            username: String::new(),
            password: "SECRET-password".into(),
            ..Default::default()
        })),
        scopes: vec!["SECRET scope".into()],
        ..Default::default()
    })
    .expect_err("refused");
    let shown = format!("{errors:?}");
    assert!(!shown.contains("SECRET-password"), "{shown}");
}

// ---------------------------------------------------------------------------------------
// GrantKind names.
// ---------------------------------------------------------------------------------------

/// The contract's table: arm name and the `grant_type` sent upstream.
const KINDS: [(GrantKind, &str, &str); 12] = [
    (
        GrantKind::AuthorizationCode,
        "authorization_code",
        "authorization_code",
    ),
    (GrantKind::Password, "password", "password"),
    (GrantKind::JwtBearer, "jwt_bearer", JWT_BEARER),
    (GrantKind::PartnerJwt, "partner_jwt", "partner_jwt"),
    (GrantKind::RefreshToken, "refresh_token", "refresh_token"),
    (GrantKind::IvrPin, "ivr_pin", "ivr_pin"),
    (GrantKind::DeviceCode, "device_code", DEVICE_CODE),
    (
        GrantKind::ClientCredentials,
        "client_credentials",
        "client_credentials",
    ),
    (GrantKind::Otp, "otp", "otp"),
    (GrantKind::Guest, "guest", "guest"),
    (GrantKind::PersonalJwt, "personal_jwt", "personal_jwt"),
    (
        GrantKind::DeviceCertificate,
        "device_certificate",
        "device_certificate",
    ),
];

/// A valid proto grant of each kind. The exhaustive match makes a thirteenth kind a
/// compile error here until it is added to [`KINDS`] as well.
fn valid_grant(kind: GrantKind) -> ProtoGrant {
    match kind {
        GrantKind::AuthorizationCode => {
            ProtoGrant::AuthorizationCode(proto::AuthorizationCodeGrant {
                code: "c".into(),
                ..Default::default()
            })
        }
        GrantKind::Password => ProtoGrant::Password(proto::PasswordGrant {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        }),
        GrantKind::JwtBearer => ProtoGrant::JwtBearer(proto::JwtBearerGrant {
            assertion: "a".into(),
        }),
        GrantKind::PartnerJwt => ProtoGrant::PartnerJwt(proto::PartnerJwtGrant {
            assertion: "a".into(),
        }),
        GrantKind::RefreshToken => ProtoGrant::RefreshToken(proto::RefreshTokenGrant {
            refresh_token: "r".into(),
        }),
        GrantKind::IvrPin => ProtoGrant::IvrPin(proto::IvrPinGrant {
            ivr_pin: "i".into(),
        }),
        GrantKind::DeviceCode => ProtoGrant::DeviceCode(proto::DeviceCodeGrant {
            device_code: "d".into(),
        }),
        GrantKind::ClientCredentials => {
            ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant::default())
        }
        GrantKind::Otp => ProtoGrant::Otp(proto::OtpGrant { code: "o".into() }),
        GrantKind::Guest => ProtoGrant::Guest(proto::GuestGrant::default()),
        GrantKind::PersonalJwt => ProtoGrant::PersonalJwt(proto::PersonalJwtGrant::default()),
        GrantKind::DeviceCertificate => {
            ProtoGrant::DeviceCertificate(proto::DeviceCertificateGrant {})
        }
    }
}

#[test]
fn grant_kind_names_round_trip_through_serde_and_as_str() {
    let distinct: BTreeSet<GrantKind> = KINDS.iter().map(|(kind, ..)| *kind).collect();
    assert_eq!(distinct.len(), 12, "KINDS lists every kind once");
    for (kind, name, grant_type) in KINDS {
        assert_eq!(kind.as_str(), name);
        assert_eq!(kind.to_string(), name);
        assert_eq!(kind.grant_type(), grant_type, "{kind}");
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{name}\""));
        assert_eq!(serde_json::from_str::<GrantKind>(&json).unwrap(), kind);

        // The proto arm of that name becomes this kind and sends this grant_type.
        let request = validated(request(valid_grant(kind)));
        assert_eq!(request.grant.kind(), kind);
        assert_eq!(
            sent(&request).first(),
            Some(&("grant_type".to_owned(), grant_type.to_owned())),
            "{kind}"
        );
    }
    for unknown in ["\"magic\"", "\"JwtBearer\"", "\"jwt-bearer\"", "\"\""] {
        assert!(
            serde_json::from_str::<GrantKind>(unknown).is_err(),
            "{unknown} must not parse"
        );
    }
}

#[test]
fn grant_kind_names_are_the_proto_oneof_arm_names() {
    let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
    let message = set
        .file
        .iter()
        .flat_map(|file| &file.message_type)
        .find(|message| message.name() == "GetTokenRequest")
        .expect("GetTokenRequest in the descriptor set");
    let grant_oneof = message
        .oneof_decl
        .iter()
        .position(|oneof| oneof.name() == "grant")
        .expect("oneof grant") as i32;
    let arms: Vec<&str> = message
        .field
        .iter()
        .filter(|field| field.oneof_index == Some(grant_oneof))
        .map(|field| field.name())
        .collect();
    let names: Vec<&str> = KINDS.iter().map(|(_, name, _)| *name).collect();
    assert_eq!(arms, names);
}
