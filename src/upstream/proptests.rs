//! Property tests of upstream-response decoding: the fuzz target for decoding (issue 5,
//! "Fuzzing").
//!
//! Arbitrary statuses and bodies (random bytes, random JSON, token- and error-shaped
//! objects with fields of every type, truncated tokens) must never panic, must be
//! classified by status first, and must never hand back a secret of the request that the
//! upstream echoed. `Retry-After` parsing is fuzzed the same way.
//!
//! CI runs a bounded number of cases; `PROPTEST_CASES=100000 cargo test --lib proptests`
//! runs longer locally.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{Value, json};

use super::*;

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

const MARKER: &str = "[REDACTED]";

fn reply(status: u16, body: Vec<u8>) -> Reply {
    Reply {
        status: StatusCode::from_u16(status).unwrap(),
        request_id: Some("rc-request-1".to_owned()),
        retry_after: Some(Duration::from_secs(7)),
        body,
        sent_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    }
}

fn no_secrets() -> Outgoing<'static> {
    Outgoing {
        penalty: None,
        lease: None,
        fields: vec![FormField::plain("grant_type", "password")],
        basic: None,
        replay: Replay::Always,
    }
}

fn nonblank(s: &Option<String>) -> Option<String> {
    s.clone().filter(|s| !s.trim().is_empty())
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[ \t\n]{1,3}",
        "[a-z_]{1,12}",
        "(?s:.){0,24}",
        "[0-9]{1,22}",
        " ?[0-9]{1,5} ?",
    ]
}

const KEYS: &[&str] = &[
    "access_token",
    "token_type",
    "expires_in",
    "refresh_token",
    "refresh_token_expires_in",
    "scope",
    "owner_id",
    "endpoint_id",
    "session_id",
    "id_token",
    "session_expires_in",
    "session_expiration_time",
    "session_idle_timeout",
    "error",
    "error_description",
    "errorCode",
    "message",
    "errors",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(KEYS).prop_map(str::to_owned),
        1 => "[a-zA-Z_]{0,8}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 32, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec((key(), inner), 0..6).prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A value a token or error field might plausibly (or implausibly) hold.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => text().prop_map(Value::String),
        1 => Just(Value::Null),
        1 => any::<u32>().prop_map(Value::from),
        1 => json_value(),
    ]
}

/// An object with a random selection of the known fields, each of a random type.
fn shaped_object() -> impl Strategy<Value = Value> {
    let errors = prop_oneof![
        vec(
            vec(
                (
                    prop_oneof![
                        Just("errorCode".to_owned()),
                        Just("message".to_owned()),
                        key()
                    ],
                    field_value()
                ),
                0..3
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            0..3
        )
        .prop_map(Value::Array),
        json_value(),
    ];
    (
        vec((key(), field_value()), 0..8),
        proptest::option::of(errors),
    )
        .prop_map(|(fields, errors)| {
            let mut object: serde_json::Map<String, Value> = fields.into_iter().collect();
            if let Some(errors) = errors {
                object.insert("errors".to_owned(), errors);
            }
            Value::Object(object)
        })
}

/// A field of a well-typed token: absent, null, or a value of the expected type.
#[derive(Clone, Debug)]
enum Slot<T> {
    Absent,
    Null,
    Set(T),
}

fn slot<T: std::fmt::Debug + Clone + 'static>(
    set: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Slot<T>> {
    prop_oneof![
        2 => Just(Slot::Absent),
        1 => Just(Slot::Null),
        3 => set.prop_map(Slot::Set),
    ]
}

/// Seconds as the upstream may send them: a number or a (padded) numeric string.
#[derive(Clone, Debug)]
struct Secs {
    value: u64,
    as_text: bool,
    pad: bool,
}

fn secs() -> impl Strategy<Value = Slot<Secs>> {
    slot(
        (
            prop_oneof![0u64..100_000, any::<u64>()],
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(value, as_text, pad)| Secs {
                value,
                as_text,
                pad,
            }),
    )
}

#[derive(Clone, Debug)]
struct TokenModel {
    access_token: String,
    token_type: Slot<String>,
    expires_in: Slot<Secs>,
    refresh_token: Slot<String>,
    refresh_token_expires_in: Slot<Secs>,
    scope: Slot<String>,
    owner_id: Slot<String>,
    session_idle_timeout: Slot<Secs>,
    extra: Vec<(String, Value)>,
}

fn token_model() -> impl Strategy<Value = TokenModel> {
    (
        "(?s:.){1,40}",
        slot(text()),
        secs(),
        slot(text()),
        secs(),
        slot(text()),
        slot(text()),
        secs(),
        vec(("x_[a-z]{1,6}", json_value()), 0..3),
    )
        .prop_map(
            |(
                access_token,
                token_type,
                expires_in,
                refresh_token,
                refresh_token_expires_in,
                scope,
                owner_id,
                session_idle_timeout,
                extra,
            )| TokenModel {
                access_token,
                token_type,
                expires_in,
                refresh_token,
                refresh_token_expires_in,
                scope,
                owner_id,
                session_idle_timeout,
                extra,
            },
        )
}

impl TokenModel {
    fn to_json(&self) -> String {
        fn put<T>(
            o: &mut serde_json::Map<String, Value>,
            k: &str,
            s: &Slot<T>,
            f: impl Fn(&T) -> Value,
        ) {
            match s {
                Slot::Absent => {}
                Slot::Null => {
                    o.insert(k.to_owned(), Value::Null);
                }
                Slot::Set(v) => {
                    o.insert(k.to_owned(), f(v));
                }
            }
        }
        let string = |s: &String| Value::String(s.clone());
        let seconds = |s: &Secs| match (s.as_text, s.pad) {
            (false, _) => Value::from(s.value),
            (true, false) => Value::String(s.value.to_string()),
            (true, true) => Value::String(format!(" {} ", s.value)),
        };
        let mut o: serde_json::Map<String, Value> = self.extra.iter().cloned().collect();
        o.insert("access_token".to_owned(), string(&self.access_token));
        put(&mut o, "token_type", &self.token_type, string);
        put(&mut o, "expires_in", &self.expires_in, seconds);
        put(&mut o, "refresh_token", &self.refresh_token, string);
        put(
            &mut o,
            "refresh_token_expires_in",
            &self.refresh_token_expires_in,
            seconds,
        );
        put(&mut o, "scope", &self.scope, string);
        put(&mut o, "owner_id", &self.owner_id, string);
        put(
            &mut o,
            "session_idle_timeout",
            &self.session_idle_timeout,
            seconds,
        );
        serde_json::to_string(&Value::Object(o)).unwrap()
    }
}

fn value_of<T: Clone>(s: &Slot<T>) -> Option<T> {
    match s {
        Slot::Set(v) => Some(v.clone()),
        _ => None,
    }
}

fn seconds_of(s: &Slot<Secs>) -> Option<u64> {
    value_of(s).map(|s| s.value)
}

/// Any body at all.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..200),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        shaped_object().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        (token_model(), any::<prop::sample::Index>()).prop_map(|(t, cut)| {
            let json = t.to_json().into_bytes();
            let at = cut.index(json.len() + 1);
            json[..at].to_vec()
        }),
    ]
}

/// A well-typed OAuth error body: every field absent, null or of its type.
#[derive(Clone, Debug)]
struct ErrorModel {
    error: Slot<String>,
    error_description: Slot<String>,
    error_code: Slot<String>,
    message: Slot<String>,
    errors: Slot<Vec<(Slot<String>, Slot<String>)>>,
}

fn error_model() -> impl Strategy<Value = ErrorModel> {
    (
        slot(text()),
        slot(text()),
        slot(text()),
        slot(text()),
        prop_oneof![
            Just(Slot::Absent),
            Just(Slot::Null),
            vec((slot(text()), slot(text())), 0..3).prop_map(Slot::Set),
        ],
    )
        .prop_map(
            |(error, error_description, error_code, message, errors)| ErrorModel {
                error,
                error_description,
                error_code,
                message,
                errors,
            },
        )
}

impl ErrorModel {
    fn to_json(&self) -> Vec<u8> {
        fn put(o: &mut serde_json::Map<String, Value>, k: &str, s: &Slot<String>) {
            match s {
                Slot::Absent => {}
                Slot::Null => {
                    o.insert(k.to_owned(), Value::Null);
                }
                Slot::Set(v) => {
                    o.insert(k.to_owned(), Value::String(v.clone()));
                }
            }
        }
        let mut o = serde_json::Map::new();
        put(&mut o, "error", &self.error);
        put(&mut o, "error_description", &self.error_description);
        put(&mut o, "errorCode", &self.error_code);
        put(&mut o, "message", &self.message);
        if let Slot::Null = self.errors {
            o.insert("errors".to_owned(), Value::Null);
        }
        if let Slot::Set(errors) = &self.errors {
            let errors = errors
                .iter()
                .map(|(code, message)| {
                    let mut e = serde_json::Map::new();
                    put(&mut e, "errorCode", code);
                    put(&mut e, "message", message);
                    Value::Object(e)
                })
                .collect();
            o.insert("errors".to_owned(), Value::Array(errors));
        }
        serde_json::to_vec(&Value::Object(o)).unwrap()
    }

    /// What `oauth_error` should make of it, with no secrets to scrub.
    fn expected(&self) -> Option<OAuthError> {
        let errors = value_of(&self.errors).unwrap_or_default();
        let first = errors.first();
        let first_code = first.and_then(|(c, _)| value_of(c));
        let first_message = first.and_then(|(_, m)| value_of(m));
        let error = nonblank(&value_of(&self.error));
        let error_code = nonblank(&first_code).or(nonblank(&value_of(&self.error_code)));
        if error.is_none() && error_code.is_none() {
            return None;
        }
        let description = nonblank(&value_of(&self.error_description))
            .or(nonblank(&first_message))
            .or(nonblank(&value_of(&self.message)));
        Some(OAuthError {
            error,
            description,
            error_code,
        })
    }
}

/// A secret the scrubbing property can speak about: one that cannot be made up out of the
/// `[REDACTED]` marker and its neighbours.
fn scrubbable(secret: &str) -> bool {
    !secret.is_empty() && !secret.contains(['[', ']']) && !MARKER.contains(secret)
}

fn secret() -> impl Strategy<Value = String> {
    prop_oneof![
        // A tiny alphabet, so that secrets overlap and contain each other.
        "[ab1]{1,4}",
        "[a-z0-9]{1,10}",
        "(?s:.){1,16}",
        "[&=+% \"\\\\/<>]{1,6}",
    ]
    .prop_filter("scrubbable", |s| scrubbable(s))
}

/// Text with secrets (by index) spliced in.
#[derive(Clone, Debug)]
enum Piece {
    Text(String),
    Secret(prop::sample::Index),
}

fn pieces() -> impl Strategy<Value = Vec<Piece>> {
    vec(
        prop_oneof![
            "(?s:.){0,8}".prop_map(Piece::Text),
            any::<prop::sample::Index>().prop_map(Piece::Secret),
        ],
        0..5,
    )
}

fn assemble(prefix: &str, pieces: &[Piece], secrets: &[String]) -> String {
    let mut out = prefix.to_owned();
    for piece in pieces {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Secret(i) => out.push_str(&secrets[i.index(secrets.len())]),
        }
    }
    out
}

/// A form field name for the n-th secret of a request.
const SECRET_FIELDS: &[&str] = &[
    "password",
    "client_secret",
    "code",
    "refresh_token",
    "assertion",
    "client_assertion",
    "pin",
];

fn http_date_ish() -> impl Strategy<Value = String> {
    const DAYS: &[&str] = &[
        "Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sunday", "Xyz", "",
    ];
    const MONTHS: &[&str] = &["Jan", "Feb", "Nov", "Dec", "Foo", ""];
    let n = || prop_oneof![0u32..100, any::<u32>()];
    let y = || prop_oneof![1960u32..10_100, any::<u32>()];
    let day = proptest::sample::select(DAYS);
    let month = proptest::sample::select(MONTHS);
    prop_oneof![
        (day.clone(), n(), month.clone(), y(), n(), n(), n()).prop_map(
            |(wd, d, mo, y, h, mi, s)| format!("{wd}, {d:02} {mo} {y} {h:02}:{mi:02}:{s:02} GMT")
        ),
        (day.clone(), n(), month.clone(), n(), n(), n(), n()).prop_map(
            |(wd, d, mo, y, h, mi, s)| format!(
                "{wd}, {d:02}-{mo}-{y:02} {h:02}:{mi:02}:{s:02} GMT"
            )
        ),
        (day, month, n(), n(), n(), n(), y()).prop_map(|(wd, mo, d, h, mi, s, y)| format!(
            "{wd} {mo} {d:>2} {h:02}:{mi:02}:{s:02} {y}"
        )),
    ]
}

// ---------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// Any status and body: no panic; a token only from a 2xx with a non-empty access
    /// token; otherwise an error classified by status first, carrying the reply's metadata.
    #[test]
    fn any_reply_decodes_without_panic_and_is_classified_by_status(
        status in prop_oneof![100u16..=599, Just(200u16), Just(400u16), Just(429u16), Just(503u16)],
        body in body(),
    ) {
        let reply = reply(status, body);
        let request = no_secrets();
        match decode_token(&reply, &request) {
            Ok(token) => {
                prop_assert!((200..300).contains(&status), "a token from HTTP {}", status);
                let access = token.access_token.as_ref().map(|t| t.expose_secret().to_owned());
                prop_assert!(access.is_some_and(|t| !t.is_empty()));
                prop_assert_eq!(token.counted_from, reply.sent_at);
            }
            Err(error) => {
                prop_assert_eq!(error.http_status, Some(status));
                prop_assert_eq!(error.retry_after, reply.retry_after);
                prop_assert_eq!(&error.request_id, &reply.request_id);
                prop_assert!(!error.not_sent);
                match status {
                    429 => prop_assert_eq!(&error.kind, &UpstreamErrorKind::RateLimited),
                    500..=599 => prop_assert!(
                        matches!(error.kind, UpstreamErrorKind::Unavailable(_)),
                        "{:?}", error.kind
                    ),
                    _ => prop_assert!(
                        matches!(error.kind, UpstreamErrorKind::OAuth | UpstreamErrorKind::BadResponse(_)),
                        "{:?}", error.kind
                    ),
                }
                if error.kind == UpstreamErrorKind::OAuth {
                    let oauth = error.oauth.as_deref();
                    prop_assert!(oauth.is_some());
                    let oauth = oauth.unwrap();
                    let blank = |s: &Option<String>| s.as_ref().is_none_or(|s| s.trim().is_empty());
                    prop_assert!(!blank(&oauth.error) || !blank(&oauth.error_code), "{:?}", oauth);
                }
                if matches!(error.kind, UpstreamErrorKind::BadResponse(_)) {
                    prop_assert!(error.oauth.is_none());
                }
                if !(200..300).contains(&status) {
                    // The token path and the revoke path classify a failure the same way.
                    let again = decode_failure(&reply, &request);
                    prop_assert_eq!(&again.kind, &error.kind);
                    prop_assert_eq!(again.oauth, error.oauth);
                }
            }
        }
    }

    /// A well-formed token decodes to exactly its values; every truncation of it is refused
    /// as a bad response (never half a token).
    #[test]
    fn tokens_decode_exactly_and_truncations_never_do(model in token_model()) {
        let request = no_secrets();
        let json = model.to_json();
        let token = decode_token(&reply(200, json.clone().into_bytes()), &request);
        let token = match token {
            Ok(token) => token,
            Err(e) => return Err(TestCaseError::fail(format!("{json} refused: {e:?}"))),
        };
        prop_assert_eq!(token.access_token.as_ref().unwrap().expose_secret(), model.access_token.as_str());
        prop_assert_eq!(&token.token_type, &value_of(&model.token_type));
        prop_assert_eq!(token.expires_in, seconds_of(&model.expires_in));
        prop_assert_eq!(
            token.refresh_token.as_ref().map(|t| t.expose_secret().to_owned()),
            value_of(&model.refresh_token)
        );
        prop_assert_eq!(token.refresh_token_expires_in, seconds_of(&model.refresh_token_expires_in));
        prop_assert_eq!(&token.scope, &value_of(&model.scope));
        prop_assert_eq!(&token.owner_id, &value_of(&model.owner_id));
        prop_assert_eq!(token.session_idle_timeout, seconds_of(&model.session_idle_timeout));

        let bytes = json.as_bytes();
        for end in 0..bytes.len() {
            let error = decode_token(&reply(200, bytes[..end].to_vec()), &request)
                .map(|_| ())
                .expect_err("a truncated token was accepted");
            prop_assert_eq!(
                error.kind,
                UpstreamErrorKind::BadResponse("a 2xx response that is not a JSON token")
            );
        }
    }

    /// A well-typed OAuth error body (every field absent, null or a string) is read exactly:
    /// `error`, the first `errors[].errorCode` or `errorCode`, and the first non-blank
    /// description.
    #[test]
    fn well_typed_oauth_errors_are_read_exactly(
        model in error_model(),
        status in prop_oneof![400u16..=428, 430u16..=499, Just(200u16)],
    ) {
        let body = model.to_json();
        let request = no_secrets();
        let error = match decode_token(&reply(status, body.clone()), &request) {
            Ok(_) => return Err(TestCaseError::fail("a token without access_token")),
            Err(error) => error,
        };
        let want = model.expected();
        let shown = String::from_utf8_lossy(&body).into_owned();
        match want {
            Some(want) => {
                prop_assert_eq!(&error.kind, &UpstreamErrorKind::OAuth, "{}", shown);
                prop_assert_eq!(error.oauth.as_deref(), Some(&want), "{}", shown);
            }
            None => {
                prop_assert!(matches!(error.kind, UpstreamErrorKind::BadResponse(_)), "{}", shown);
            }
        }
    }

    /// Whatever secret of the request the upstream echoes in `error`, the description or the
    /// error code, on any status, it never survives into the `OAuthError`; text holding no
    /// secret is left alone.
    #[test]
    fn echoed_secrets_never_survive(
        secrets in vec(secret(), 1..4),
        basic in any::<bool>(),
        plain in "(?s:.){0,8}",
        error in pieces(),
        description in pieces(),
        code in pieces(),
        where_description in 0usize..3,
        where_code in 0usize..2,
        status in proptest::sample::select(&[200u16, 400, 401, 403, 404, 429, 500, 503][..]),
    ) {
        let basic_secret = SecretString::from(secrets[secrets.len() - 1].clone());
        let in_body = if basic { &secrets[..secrets.len() - 1] } else { &secrets[..] };
        let mut fields = vec![FormField::plain("username", plain.as_str())];
        fields.extend(in_body.iter().enumerate().map(|(i, s)| FormField {
            name: SECRET_FIELDS[i % SECRET_FIELDS.len()],
            value: Cow::Borrowed(s.as_str()),
            secret: true,
        }));
        let request = Outgoing {
            penalty: None,
            lease: None,
            fields,
            basic: basic.then_some(("my-app", &basic_secret)),
            replay: Replay::Always,
        };

        let error_text = assemble("invalid_grant ", &error, &secrets);
        let description_text = assemble("wrong: ", &description, &secrets);
        let code_text = assemble("OAU-", &code, &secrets);
        let mut body = json!({ "error": error_text });
        let mut first = serde_json::Map::new();
        match where_description {
            0 => { body["error_description"] = json!(description_text); }
            1 => { first.insert("message".into(), json!(description_text)); }
            _ => { body["message"] = json!(description_text); }
        }
        if where_code == 0 {
            first.insert("errorCode".into(), json!(code_text));
        } else {
            body["errorCode"] = json!(code_text);
        }
        body["errors"] = json!([Value::Object(first)]);
        let reply = reply(status, serde_json::to_vec(&body).unwrap());

        let error = decode_token(&reply, &request).map(|_| ()).expect_err("no access_token");
        let oauth = error.oauth.as_deref();
        prop_assert!(oauth.is_some(), "{:?} lost the OAuth error", error.kind);
        let oauth = oauth.unwrap();
        for (got, sent) in [
            (&oauth.error, &error_text),
            (&oauth.description, &description_text),
            (&oauth.error_code, &code_text),
        ] {
            let got = got.as_deref().unwrap_or_default();
            for secret in &secrets {
                prop_assert!(!got.contains(secret.as_str()), "{:?} survives in {:?}", secret, got);
            }
            // Secrets are also scrubbed in their form-encoded shape, as they travelled.
            let encoded = secrets.iter().map(|s| {
                serde_urlencoded::to_string([("", s.as_str())]).unwrap().trim_start_matches('=').to_owned()
            });
            if !secrets.iter().cloned().chain(encoded).any(|s| sent.contains(s.as_str())) {
                prop_assert_eq!(got, sent.as_str());
            }
        }
    }

    /// A secret echoed whole is redacted whole, even when another, shorter secret of the
    /// request lies inside it. (The text around it shares no character with any secret.)
    #[test]
    fn an_echoed_secret_is_redacted_whole(
        secrets in vec("[ab1]{1,5}", 1..4),
        target in any::<prop::sample::Index>(),
        before in "[ .,:XYZ]{0,4}",
        after in "[ .,:XYZ]{0,4}",
    ) {
        let target = &secrets[target.index(secrets.len())];
        let request = Outgoing {
            penalty: None,
            lease: None,
            fields: secrets
                .iter()
                .map(|s| FormField { name: "password", value: Cow::Borrowed(s.as_str()), secret: true })
                .collect(),
            basic: None,
            replay: Replay::Always,
        };
        let body = json!({
            "error": "invalid_grant",
            "error_description": format!("{before}{target}{after}"),
        });
        let error = decode_failure(&reply(400, serde_json::to_vec(&body).unwrap()), &request);
        let description = error.oauth.and_then(|o| o.description);
        prop_assert_eq!(description, Some(format!("{before}{MARKER}{after}")));
    }

    /// `Retry-After` parsing never panics; delay-seconds are read exactly up to
    /// `MAX_RETRY_AFTER`; nothing parsed can overflow a clock.
    #[test]
    fn retry_after_parsing_never_panics(
        raw in prop_oneof![
            vec(any::<u8>(), 0..40).prop_map(|b| (b, None)),
            "(?s:.){0,40}".prop_map(|s| (s.into_bytes(), None)),
            ("[ \t]{0,2}", "[0-9]{1,22}", "[ \t]{0,2}").prop_map(|(a, d, b)| {
                let n = d.parse::<u64>().ok();
                (format!("{a}{d}{b}").into_bytes(), n.map(Duration::from_secs))
            }),
            http_date_ish().prop_map(|s| (s.into_bytes(), None)),
        ],
    ) {
        let (bytes, seconds) = raw;
        if let Ok(value) = HeaderValue::from_bytes(&bytes) {
            let parsed = parse_retry_after(&value);
            if let Some(seconds) = seconds {
                prop_assert_eq!(parsed, Some(seconds.min(MAX_RETRY_AFTER)));
            }
            if let Some(wait) = parsed {
                // Bounded, so that `now + wait` can never overflow a clock.
                prop_assert!(wait <= MAX_RETRY_AFTER);
                prop_assert!(Instant::now().checked_add(wait).is_some());
                prop_assert!(SystemTime::now().checked_add(wait).is_some());
            }
        }
    }

    /// An HTTP-date gives the time until then: zero once past, at most `MAX_RETRY_AFTER`.
    #[test]
    fn retry_after_dates_count_down_to_the_date(at in 0u64..253_402_300_799) {
        let when = SystemTime::UNIX_EPOCH + Duration::from_secs(at);
        let value = HeaderValue::from_str(&httpdate::fmt_http_date(when)).unwrap();
        let before = SystemTime::now();
        let parsed = parse_retry_after(&value).expect("a date is a Retry-After");
        let most = when
            .duration_since(before)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RETRY_AFTER);
        prop_assert!(parsed <= most, "{:?} > {:?}", parsed, most);
        prop_assert!(most.saturating_sub(parsed) <= Duration::from_secs(2), "{:?} vs {:?}", parsed, most);
    }
}

// ---------------------------------------------------------------------------------------
// Regression tests: failures the properties found
// ---------------------------------------------------------------------------------------

/// Found by fuzzing: `parse_retry_after` took any delay-seconds that fits a `u64`, so a
/// broken or hostile upstream could name a wait no `Instant` can hold, and every later
/// `now + wait` panicked: on the retry path (`post`), in the refresh-window check
/// (`retry_wait`), and when the rate-limit guard recorded the 429 (`penalise`).
#[test]
fn a_retry_after_always_fits_after_now() {
    for text in ["18446744073709551615", "10000000000000000000"] {
        let wait = parse_retry_after(&HeaderValue::from_static(text)).expect("delay-seconds");
        assert!(
            Instant::now().checked_add(wait).is_some(),
            "Retry-After: {text} overflows an Instant"
        );
    }
}

/// The refresh-window check adds the upstream's wait to the time already spent; once a
/// second had passed, the largest delay-seconds overflowed a `Duration`.
#[test]
fn a_huge_retry_after_in_the_refresh_window_is_not_waited_for() {
    let mut reply = reply(429, Vec::new());
    reply.retry_after = parse_retry_after(&HeaderValue::from_static("18446744073709551615"));
    let result: Result<Reply, UpstreamError> = Ok(reply);
    let wait = retry_wait(
        &result,
        Replay::Within(Duration::from_secs(10)),
        1,
        Instant::now() - Duration::from_secs(2),
    );
    assert_eq!(wait, None);
}

/// The rate-limit guard records whatever wait a 429 carried; this is the path an
/// authorization-code request (never retried) takes.
#[tokio::test]
async fn the_guard_can_record_any_retry_after() {
    let wait = parse_retry_after(&HeaderValue::from_static("10000000000000000000")).unwrap();
    let guard = crate::rate_limit::RateLimitGuard::new(None);
    let keys = crate::keys::Keys::new(None);
    let key = crate::rate_limit::GuardKeys::new(&keys, "my-app", None);
    guard.penalise(&key, wait).await;
    assert!(guard.remaining(&key).is_some());
}

/// End to end: a 429 naming a wait too long for an `Instant` is a rate limit, not a panic.
/// The retry decision used to panic ("overflow when adding duration to instant"), killing
/// the task serving the call.
#[tokio::test]
async fn a_429_with_a_huge_retry_after_is_rate_limited_not_a_panic() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("retry-after", "10000000000000000000")
                .set_body_string(r#"{"errorCode":"CMN-301"}"#),
        )
        .mount(&server)
        .await;
    let upstream = Upstream::new(
        &UpstreamConfig {
            base_url: server.uri(),
            allow_insecure_http: true,
            ..UpstreamConfig::default()
        },
        std::sync::Arc::new(crate::metrics::Metrics::new([])),
    )
    .unwrap();
    let error = upstream
        .token(&no_secrets(), None)
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(error.kind, UpstreamErrorKind::RateLimited);
}

/// Found by `an_echoed_secret_is_redacted_whole` (minimal input: secrets `["1", "11"]`,
/// echoed text `"11"`, scrubbed to `"[REDACTED][REDACTED]"`): `scrub` replaced secrets in
/// request order, so a shorter secret inside a longer one (a PIN inside a password) was
/// redacted first and the rest of the longer secret survived around it.
#[test]
fn a_secret_containing_a_shorter_secret_is_redacted_whole() {
    let pin = SecretString::from("1234");
    let password = SecretString::from("pass1234word");
    let request = Outgoing {
        penalty: None,
        lease: None,
        fields: vec![
            FormField::secret("pin", &pin),
            FormField::secret("password", &password),
        ],
        basic: None,
        replay: Replay::Always,
    };
    let body = br#"{"error":"invalid_grant","error_description":"bad password pass1234word"}"#;
    let error = decode_failure(&reply(400, body.to_vec()), &request);
    assert_eq!(
        error.oauth.unwrap().description.as_deref(),
        Some("bad password [REDACTED]"),
    );
}

/// Regression, found by `well_typed_oauth_errors_are_read_exactly` (minimal input
/// `{"errorCode":"a","errors":null}` on a 400): a `null` errors list once failed the whole
/// body, turning a real OAuth error into UPSTREAM_BAD_RESPONSE.
#[test]
fn a_null_errors_list_does_not_hide_the_oauth_error() {
    let request = no_secrets();
    for body in [
        r#"{"errorCode":"a","errors":null}"#,
        r#"{"error":"invalid_grant","error_description":"bad","errors":null}"#,
    ] {
        let error = decode_failure(&reply(400, body.as_bytes().to_vec()), &request);
        assert_eq!(error.kind, UpstreamErrorKind::OAuth, "{body}");
        assert!(error.oauth.is_some(), "{body}");
    }
}

/// Overlapping secrets are redacted as one stretch, and a secret echoed form-encoded (as it
/// travelled in the body) is redacted too.
#[test]
fn overlapping_and_form_encoded_echoes_are_redacted() {
    let (a, b, c) = (
        SecretString::from("abcd"),
        SecretString::from("cdef"),
        SecretString::from("p@ss word"),
    );
    let request = Outgoing {
        penalty: None,
        lease: None,
        fields: vec![
            FormField::secret("code", &a),
            FormField::secret("pin", &b),
            FormField::secret("password", &c),
        ],
        basic: None,
        replay: Replay::Always,
    };
    let body = r#"{"error":"invalid_grant","error_description":"got abcdef and p%40ss+word"}"#;
    let error = decode_failure(&reply(400, body.as_bytes().to_vec()), &request);
    let description = error.oauth.and_then(|o| o.description);
    assert_eq!(
        description.as_deref(),
        Some("got [REDACTED] and [REDACTED]")
    );
}
