//! Property tests of request validation and translation: the fuzz target for request
//! translation (issue 5, "Fuzzing").
//!
//! Arbitrary proto requests (every grant arm and none; empty, whitespace, `&=+%`, unicode
//! and over-long strings; any `Duration`; any scopes) are checked against a small model of
//! the contract: exactly which fields are refused, and on success exactly which ordered
//! `name=value` pairs leave tokengate, through the same encoder the upstream client uses.
//!
//! CI runs a bounded number of cases; `PROPTEST_CASES=100000 cargo test --lib proptests`
//! runs longer locally.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::Config;
use prost_types::Duration;

use super::*;
use crate::proto::client_credentials_grant::Subject as ProtoSubject;
use crate::upstream::{Outgoing, Replay};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 512;

fn config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    Config {
        cases,
        // A failure found here becomes a named regression test below, not a seed file.
        failure_persistence: None,
        ..Config::default()
    }
}

/// Ordered `name=value` pairs of a form body.
type Pairs = Vec<(String, String)>;

/// The form-field names whose values are credentials.
const SECRET_NAMES: &[&str] = &[
    "code",
    "code_verifier",
    "password",
    "pin",
    "assertion",
    "refresh_token",
    "ivr_pin",
    "device_code",
    "token",
];

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// A string of exactly `len` bytes of `unit` repeated, padded with ASCII.
fn sized(unit: &str, len: usize) -> String {
    let mut s = unit.repeat(len / unit.len());
    s.push_str(&"x".repeat(len - s.len()));
    s
}

/// A string of `len` bytes made of multi-byte characters, so a byte limit is not a char limit.
fn sized_wide(len: usize) -> String {
    sized("é", len)
}

/// Strings around and beyond the length limit, up to about 10 KiB.
fn long_string() -> impl Strategy<Value = String> {
    let near = (MAX_FIELD_BYTES - 2)..=(MAX_FIELD_BYTES + 2);
    prop_oneof![
        near.clone().prop_map(|n| sized("a", n)),
        near.prop_map(sized_wide),
        (0usize..=10 * 1024).prop_map(|n| sized("&=+% ", n)),
        (1usize..=10 * 1024).prop_map(|n| sized("\u{1F600}", n)),
    ]
}

/// Any string a caller might send: mostly short and hostile, sometimes empty or huge.
fn field_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        1 => "[ \t\r\n\u{a0}\u{2003}\u{3000}]{1,4}",
        4 => "[a-zA-Z0-9._~-]{1,24}",
        4 => "[&=+%#?/ ;,a-z0-9]{1,24}",
        4 => "(?s:.){1,24}",
        1 => long_string(),
    ]
}

/// A required field: usually set, so that whole requests are often valid.
fn required_string() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just(String::new()),
        9 => field_string().prop_filter("set", |s| !s.is_empty()),
    ]
}

fn scope() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[A-Za-z0-9_:./-]{1,16}",
        1 => Just(String::new()),
        1 => "[a-z]{0,4}[ \t\n\u{a0}\u{85}\u{2028}\u{3000}][a-z]{0,4}",
        1 => field_string(),
    ]
}

fn duration() -> impl Strategy<Value = Option<Duration>> {
    let seconds = prop_oneof![-3i64..=3_700, any::<i64>()];
    let nanos = prop_oneof![3 => Just(0i32), 1 => any::<i32>(), 1 => -1i32..=1];
    prop_oneof![
        1 => Just(None),
        3 => (seconds, nanos).prop_map(|(seconds, nanos)| Some(Duration { seconds, nanos })),
    ]
}

fn client_assertion() -> impl Strategy<Value = Option<proto::ClientAssertion>> {
    proptest::option::of(
        required_string().prop_map(|assertion| proto::ClientAssertion { assertion }),
    )
}

#[allow(
    deprecated,
    reason = "the deprecated password fields are still sent when set"
)]
fn grant() -> impl Strategy<Value = Option<ProtoGrant>> {
    let s = field_string;
    let r = required_string;
    let subject = prop_oneof![
        Just(None),
        r().prop_map(|id| Some(ProtoSubject::AccountId(id))),
        (r(), s()).prop_map(|(brand_id, partner_account_id)| {
            Some(ProtoSubject::Brand(proto::BrandSubject {
                brand_id,
                partner_account_id,
            }))
        }),
    ];
    let arm = prop_oneof![
        (r(), s(), s()).prop_map(|(code, redirect_uri, code_verifier)| {
            ProtoGrant::AuthorizationCode(proto::AuthorizationCodeGrant {
                code,
                redirect_uri,
                code_verifier,
            })
        }),
        (r(), r(), s(), s()).prop_map(|(username, password, extension, pin)| {
            ProtoGrant::Password(proto::PasswordGrant {
                username,
                password,
                extension,
                pin,
            })
        }),
        r().prop_map(|assertion| ProtoGrant::JwtBearer(proto::JwtBearerGrant { assertion })),
        r().prop_map(|assertion| ProtoGrant::PartnerJwt(proto::PartnerJwtGrant { assertion })),
        r().prop_map(|refresh_token| {
            ProtoGrant::RefreshToken(proto::RefreshTokenGrant { refresh_token })
        }),
        r().prop_map(|ivr_pin| ProtoGrant::IvrPin(proto::IvrPinGrant { ivr_pin })),
        r().prop_map(|device_code| ProtoGrant::DeviceCode(proto::DeviceCodeGrant { device_code })),
        subject.prop_map(|subject| {
            ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant { subject })
        }),
        r().prop_map(|code| ProtoGrant::Otp(proto::OtpGrant { code })),
        (s(), s(), s()).prop_map(|(brand_id, resource_type, resource)| {
            ProtoGrant::Guest(proto::GuestGrant {
                brand_id,
                resource_type,
                resource,
            })
        }),
        s().prop_map(|assertion| ProtoGrant::PersonalJwt(proto::PersonalJwtGrant { assertion })),
        Just(ProtoGrant::DeviceCertificate(
            proto::DeviceCertificateGrant {}
        )),
    ];
    prop_oneof![1 => Just(None), 24 => arm.prop_map(Some)]
}

fn get_token_request() -> impl Strategy<Value = proto::GetTokenRequest> {
    (
        grant(),
        field_string(),
        client_assertion(),
        prop_oneof![
            3 => Just(Vec::new()),
            3 => proptest::collection::vec(scope(), 1..6),
        ],
        field_string(),
        duration(),
        duration(),
    )
        .prop_map(
            |(
                grant,
                client_id,
                client_assertion,
                scopes,
                endpoint_id,
                access_token_ttl,
                refresh_token_ttl,
            )| proto::GetTokenRequest {
                rejected_access_token: String::new(),
                grant,
                client_id,
                client_assertion,
                scopes,
                endpoint_id,
                access_token_ttl,
                refresh_token_ttl,
            },
        )
}

fn revoke_token_request() -> impl Strategy<Value = proto::RevokeTokenRequest> {
    (required_string(), field_string(), client_assertion()).prop_map(
        |(token, client_id, client_assertion)| proto::RevokeTokenRequest {
            token,
            client_id,
            client_assertion,
        },
    )
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

/// One proto string field: its path, its value, whether it must be set, and the form field
/// it becomes (`None` for client authentication, which `client` encodes).
struct Field {
    path: &'static str,
    value: String,
    required: bool,
    form: Option<&'static str>,
}

fn req(path: &'static str, value: &str, form: &'static str) -> Field {
    Field {
        path,
        value: value.to_owned(),
        required: true,
        form: Some(form),
    }
}

fn opt(path: &'static str, value: &str, form: &'static str) -> Field {
    Field {
        path,
        value: value.to_owned(),
        required: false,
        form: Some(form),
    }
}

/// The `grant_type` an arm sends and its string fields, in contract order.
#[allow(
    deprecated,
    reason = "the deprecated password fields are still sent when set"
)]
fn grant_model(grant: &ProtoGrant) -> (&'static str, Vec<Field>) {
    match grant {
        ProtoGrant::AuthorizationCode(g) => (
            "authorization_code",
            vec![
                req("authorization_code.code", &g.code, "code"),
                opt(
                    "authorization_code.redirect_uri",
                    &g.redirect_uri,
                    "redirect_uri",
                ),
                opt(
                    "authorization_code.code_verifier",
                    &g.code_verifier,
                    "code_verifier",
                ),
            ],
        ),
        ProtoGrant::Password(g) => (
            "password",
            vec![
                req("password.username", &g.username, "username"),
                req("password.password", &g.password, "password"),
                opt("password.extension", &g.extension, "extension"),
                opt("password.pin", &g.pin, "pin"),
            ],
        ),
        ProtoGrant::JwtBearer(g) => (
            "urn:ietf:params:oauth:grant-type:jwt-bearer",
            vec![req("jwt_bearer.assertion", &g.assertion, "assertion")],
        ),
        ProtoGrant::PartnerJwt(g) => (
            "partner_jwt",
            vec![req("partner_jwt.assertion", &g.assertion, "assertion")],
        ),
        ProtoGrant::RefreshToken(g) => (
            "refresh_token",
            vec![req(
                "refresh_token.refresh_token",
                &g.refresh_token,
                "refresh_token",
            )],
        ),
        ProtoGrant::IvrPin(g) => (
            "ivr_pin",
            vec![req("ivr_pin.ivr_pin", &g.ivr_pin, "ivr_pin")],
        ),
        ProtoGrant::DeviceCode(g) => (
            "urn:ietf:params:oauth:grant-type:device_code",
            vec![req(
                "device_code.device_code",
                &g.device_code,
                "device_code",
            )],
        ),
        ProtoGrant::ClientCredentials(g) => (
            "client_credentials",
            match &g.subject {
                None => vec![],
                Some(ProtoSubject::AccountId(id)) => {
                    vec![req("client_credentials.account_id", id, "account_id")]
                }
                Some(ProtoSubject::Brand(b)) => vec![
                    req("client_credentials.brand.brand_id", &b.brand_id, "brand_id"),
                    opt(
                        "client_credentials.brand.partner_account_id",
                        &b.partner_account_id,
                        "partner_account_id",
                    ),
                ],
            },
        ),
        ProtoGrant::Otp(g) => ("otp", vec![req("otp.code", &g.code, "code")]),
        ProtoGrant::Guest(g) => (
            "guest",
            vec![
                opt("guest.brand_id", &g.brand_id, "brand_id"),
                opt("guest.resource_type", &g.resource_type, "resource_type"),
                opt("guest.resource", &g.resource, "resource"),
            ],
        ),
        ProtoGrant::PersonalJwt(g) => (
            "personal_jwt",
            vec![opt("personal_jwt.assertion", &g.assertion, "assertion")],
        ),
        ProtoGrant::DeviceCertificate(_) => ("device_certificate", vec![]),
    }
}

fn client_fields(client_id: &str, assertion: Option<&proto::ClientAssertion>) -> Vec<Field> {
    let mut fields = vec![Field {
        path: "client_id",
        value: client_id.to_owned(),
        required: false,
        form: None,
    }];
    if let Some(assertion) = assertion {
        fields.push(Field {
            path: "client_assertion.assertion",
            value: assertion.assertion.clone(),
            required: true,
            form: None,
        });
    }
    fields
}

/// The violations a string field earns.
fn string_violations(fields: &[Field], out: &mut Vec<String>) {
    for f in fields {
        if (f.required && f.value.is_empty()) || f.value.len() > MAX_FIELD_BYTES {
            out.push(f.path.to_owned());
        }
    }
}

fn ttl_model(ttl: Option<&Duration>) -> Result<Option<u64>, ()> {
    match ttl {
        None => Ok(None),
        Some(d) if d.seconds > 0 && d.nanos == 0 => Ok(Some(d.seconds as u64)),
        Some(_) => Err(()),
    }
}

/// What a GetToken request should become: the violated field paths (sorted), or the
/// ordered form pairs.
fn expected_token(request: &proto::GetTokenRequest) -> Result<Pairs, Vec<String>> {
    let mut violations = Vec::new();
    let (grant_type, grant_fields) = match &request.grant {
        Some(grant) => grant_model(grant),
        None => {
            violations.push("grant".to_owned());
            ("", vec![])
        }
    };
    string_violations(&grant_fields, &mut violations);
    for (i, scope) in request.scopes.iter().enumerate() {
        if scope.is_empty()
            || scope.len() > MAX_FIELD_BYTES
            || scope.chars().any(char::is_whitespace)
        {
            violations.push(format!("scopes[{i}]"));
        }
    }
    // The entries join into one `scope` field, which is capped as well.
    let joined: usize = request.scopes.iter().map(String::len).sum::<usize>()
        + request.scopes.len().saturating_sub(1);
    if joined > MAX_FIELD_BYTES {
        violations.push("scopes".to_owned());
    }
    let access = ttl_model(request.access_token_ttl.as_ref());
    let refresh = ttl_model(request.refresh_token_ttl.as_ref());
    if access.is_err() {
        violations.push("access_token_ttl".to_owned());
    }
    if refresh.is_err() {
        violations.push("refresh_token_ttl".to_owned());
    }
    string_violations(
        &client_fields(&request.client_id, request.client_assertion.as_ref()),
        &mut violations,
    );
    let endpoint = [opt("endpoint_id", &request.endpoint_id, "endpoint_id")];
    string_violations(&endpoint, &mut violations);
    if !violations.is_empty() {
        violations.sort();
        return Err(violations);
    }

    let pair = |name: &str, value: &str| (name.to_owned(), value.to_owned());
    let mut pairs = vec![pair("grant_type", grant_type)];
    for f in &grant_fields {
        if !f.value.is_empty() {
            pairs.push(pair(f.form.unwrap(), &f.value));
        }
    }
    if !request.scopes.is_empty() {
        pairs.push(pair("scope", &request.scopes.join(" ")));
    }
    if !request.endpoint_id.is_empty() {
        pairs.push(pair("endpoint_id", &request.endpoint_id));
    }
    if let Ok(Some(ttl)) = access {
        pairs.push(pair("access_token_ttl", &ttl.to_string()));
    }
    if let Ok(Some(ttl)) = refresh {
        pairs.push(pair("refresh_token_ttl", &ttl.to_string()));
    }
    Ok(pairs)
}

/// Every field path a GetToken request has, so a violation can be checked to name one.
fn token_paths(request: &proto::GetTokenRequest) -> BTreeSet<String> {
    let mut paths: BTreeSet<String> = [
        "grant",
        "client_id",
        "client_assertion.assertion",
        "endpoint_id",
        "access_token_ttl",
        "refresh_token_ttl",
        "scopes",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    paths.extend((0..request.scopes.len()).map(|i| format!("scopes[{i}]")));
    if let Some(grant) = &request.grant {
        paths.extend(grant_model(grant).1.iter().map(|f| f.path.to_owned()));
    }
    paths
}

/// The body exactly as the upstream client would send it, decoded back.
fn round_trip(fields: Vec<FormField<'_>>) -> (Pairs, Pairs) {
    let sent: Pairs = fields
        .iter()
        .map(|f| (f.name.to_owned(), f.value.clone().into_owned()))
        .collect();
    let body = Outgoing {
        penalty: None,
        lease: None,
        fields,
        basic: None,
        replay: Replay::Always,
    }
    .body();
    let decoded = serde_urlencoded::from_str(&body)
        .unwrap_or_else(|e| panic!("the body {body:?} does not decode: {e}"));
    (sent, decoded)
}

fn check_secret_flags(fields: &[FormField<'_>]) -> Result<(), TestCaseError> {
    for f in fields {
        prop_assert_eq!(
            f.secret,
            SECRET_NAMES.contains(&f.name),
            "{} is marked secret={}",
            f.name,
            f.secret
        );
    }
    Ok(())
}

/// Checks that `shown` (a `Debug` rendering) holds none of `secrets`. Only secrets long
/// and distinct enough not to occur by chance (or inside a plain value) are checked.
fn check_redacted(shown: &str, secrets: &[&str], plain: &[&str]) -> Result<(), TestCaseError> {
    for secret in secrets {
        let distinctive = secret.chars().count() >= 12
            && !secret.contains(['\\', '"'])
            && !plain.iter().any(|p| p.contains(secret));
        if distinctive {
            prop_assert!(
                !shown.contains(secret),
                "a secret leaked into Debug: {shown}"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Any GetToken request is refused for exactly the model's violations, each naming a
    /// field the request has, or becomes exactly the model's ordered form pairs.
    #[test]
    fn get_token_translation_matches_the_contract(request in get_token_request()) {
        let expected = expected_token(&request);
        let paths = token_paths(&request);
        let original = request.clone();
        match TokenRequest::try_from(request) {
            Err(violations) => {
                prop_assert!(!violations.is_empty());
                for v in &violations {
                    prop_assert!(paths.contains(&v.field), "no field {:?} in the request", v.field);
                    prop_assert!(!v.description.is_empty());
                }
                let mut got: Vec<String> = violations.into_iter().map(|v| v.field).collect();
                got.sort();
                prop_assert_eq!(Err(got), expected);
            }
            Ok(token) => {
                let want = expected.map_err(|v| format!("accepted despite violations {v:?}"));
                let want = match want {
                    Ok(pairs) => pairs,
                    Err(e) => return Err(TestCaseError::fail(e)),
                };
                let grant_type = original.grant.as_ref().map(|g| grant_model(g).0);
                prop_assert_eq!(Some(token.grant.kind().grant_type()), grant_type);
                // Client authentication travels separately and is carried through as is.
                prop_assert_eq!(
                    token.client_id.as_deref(),
                    Some(original.client_id.as_str()).filter(|s| !s.is_empty())
                );
                prop_assert_eq!(
                    token.client_assertion.as_ref().map(|a| a.expose_secret().to_owned()),
                    original.client_assertion.as_ref().map(|a| a.assertion.clone())
                );
                for scope in &token.scopes {
                    prop_assert!(!scope.is_empty() && !scope.chars().any(char::is_whitespace));
                    prop_assert!(scope.len() <= MAX_FIELD_BYTES);
                }

                let fields = token.form_fields();
                check_secret_flags(&fields)?;
                prop_assert_eq!(fields[0].name, "grant_type");
                for f in &fields {
                    prop_assert!(f.name != "client_id" && !f.name.starts_with("client_assertion"));
                }
                let secrets: Vec<&str> =
                    fields.iter().filter(|f| f.secret).map(|f| f.value.as_ref()).collect();
                // Debug also shows the client id and scopes, which are not form fields: a
                // secret that happens to occur inside them is not a leak.
                let plain: Vec<&str> = fields
                    .iter()
                    .filter(|f| !f.secret)
                    .map(|f| f.value.as_ref())
                    .chain(token.client_id.as_deref())
                    .chain(token.scopes.iter().map(String::as_str))
                    .chain(token.endpoint_id.as_deref())
                    .collect();
                check_redacted(&format!("{token:?}"), &secrets, &plain)?;
                check_redacted(&format!("{fields:?}"), &secrets, &plain)?;

                let (sent, decoded) = round_trip(fields);
                prop_assert_eq!(&sent, &want);
                prop_assert_eq!(&decoded, &sent);
                for (name, value) in &sent {
                    // The only value not bounded field by field is the joined scope list.
                    if name != "scope" {
                        prop_assert!(value.len() <= MAX_FIELD_BYTES, "{} is {} bytes", name, value.len());
                    }
                }
            }
        }
    }

    /// Any RevokeToken request is refused naming exactly its bad fields, or sends exactly
    /// its token.
    #[test]
    fn revoke_translation_matches_the_contract(request in revoke_token_request()) {
        let mut fields = vec![Field {
            path: "token",
            value: request.token.clone(),
            required: true,
            form: Some("token"),
        }];
        fields.extend(client_fields(&request.client_id, request.client_assertion.as_ref()));
        let mut want = Vec::new();
        string_violations(&fields, &mut want);
        want.sort();
        let paths: BTreeSet<&str> = fields.iter().map(|f| f.path).collect();
        let original = request.clone();
        match RevokeRequest::try_from(request) {
            Err(violations) => {
                prop_assert!(!violations.is_empty());
                for v in &violations {
                    prop_assert!(paths.contains(v.field.as_str()), "no field {:?}", v.field);
                }
                let mut got: Vec<String> = violations.into_iter().map(|v| v.field).collect();
                got.sort();
                prop_assert_eq!(got, want);
            }
            Ok(revoke) => {
                prop_assert!(want.is_empty(), "accepted despite violations {:?}", want);
                prop_assert_eq!(
                    revoke.client_id.as_deref(),
                    Some(original.client_id.as_str()).filter(|s| !s.is_empty())
                );
                let fields = revoke.form_fields();
                check_secret_flags(&fields)?;
                check_redacted(&format!("{revoke:?}"), &[original.token.as_str()], &[&original.client_id])?;
                let (sent, decoded) = round_trip(fields);
                prop_assert_eq!(&sent, &vec![("token".to_owned(), original.token.clone())]);
                prop_assert_eq!(&decoded, &sent);
            }
        }
    }

    /// The encoder and decoder agree on any pairs at all, not only those a grant produces.
    #[test]
    fn any_form_body_round_trips(
        values in proptest::collection::vec(field_string(), 0..8),
    ) {
        const NAMES: &[&str] = &["grant_type", "code", "scope", "a&b", "x=y", "p%q", "s t"];
        let fields: Vec<FormField<'_>> = values
            .iter()
            .enumerate()
            .map(|(i, v)| FormField::plain(NAMES[i % NAMES.len()], v.as_str()))
            .collect();
        let (sent, decoded) = round_trip(fields);
        prop_assert_eq!(decoded, sent);
    }
}

// ---------------------------------------------------------------------------------------
// Fixed edge cases the generators reach only rarely
// ---------------------------------------------------------------------------------------

#[test]
fn the_length_limit_is_in_bytes_at_the_exact_boundary() {
    for (value, ok) in [
        (sized("a", MAX_FIELD_BYTES), true),
        (sized("a", MAX_FIELD_BYTES + 1), false),
        (sized_wide(MAX_FIELD_BYTES), true),
        (sized_wide(MAX_FIELD_BYTES + 1), false),
    ] {
        let request = proto::GetTokenRequest {
            grant: Some(ProtoGrant::RefreshToken(proto::RefreshTokenGrant {
                refresh_token: value.clone(),
            })),
            ..Default::default()
        };
        assert_eq!(expected_token(&request).is_ok(), ok);
        match TokenRequest::try_from(request) {
            Ok(_) => assert!(ok, "{} bytes accepted", value.len()),
            Err(v) => {
                assert!(!ok, "{} bytes refused: {v:?}", value.len());
                assert_eq!(v.len(), 1);
                assert_eq!(v[0].field, "refresh_token.refresh_token");
            }
        }
    }
}

#[test]
fn every_unicode_whitespace_refuses_a_scope() {
    for ws in [
        ' ', '\t', '\n', '\r', '\u{b}', '\u{c}', '\u{85}', '\u{a0}', '\u{1680}', '\u{2000}',
        '\u{200a}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}',
    ] {
        let request = proto::GetTokenRequest {
            grant: Some(ProtoGrant::DeviceCertificate(
                proto::DeviceCertificateGrant {},
            )),
            scopes: vec!["ok".into(), format!("a{ws}b")],
            ..Default::default()
        };
        let violations = TokenRequest::try_from(request).expect_err(&format!("{ws:?} accepted"));
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "scopes[1]");
    }
}

#[test]
fn extreme_durations_are_refused_not_wrapped() {
    for (seconds, nanos) in [
        (i64::MIN, 0),
        (-1, 0),
        (0, 0),
        (0, 1),
        (1, -1),
        (1, i32::MAX),
        (i64::MAX, i32::MIN),
    ] {
        let request = proto::GetTokenRequest {
            grant: Some(ProtoGrant::DeviceCertificate(
                proto::DeviceCertificateGrant {},
            )),
            access_token_ttl: Some(Duration { seconds, nanos }),
            ..Default::default()
        };
        let violations =
            TokenRequest::try_from(request).expect_err(&format!("{seconds}s {nanos}ns accepted"));
        assert_eq!(violations[0].field, "access_token_ttl");
    }
    let request = proto::GetTokenRequest {
        grant: Some(ProtoGrant::DeviceCertificate(
            proto::DeviceCertificateGrant {},
        )),
        access_token_ttl: Some(Duration {
            seconds: i64::MAX,
            nanos: 0,
        }),
        ..Default::default()
    };
    let token = TokenRequest::try_from(request).unwrap();
    assert_eq!(token.access_token_ttl, Some(i64::MAX as u64));
}
