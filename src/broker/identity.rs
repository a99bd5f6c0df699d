//! A request's identity: an HMAC over every field that reaches the upstream (contract §8),
//! computed before tokengate adds its own client authentication. Two requests with the same
//! identity would send the upstream the same grant, so one answer serves both.

use secrecy::ExposeSecret as _;

use crate::grant::TokenRequest;
use crate::keys::{Digest, Keys};

/// The identity of `request` for `client_id` (the client it resolved to, the default client
/// included) at `token_url`. Scopes are sorted: their order does not change the grant.
pub fn identity(
    keys: &Keys,
    request: &TokenRequest,
    client_id: Option<&str>,
    token_url: &str,
) -> Digest {
    let mut scopes: Vec<&str> = request.scopes.iter().map(String::as_str).collect();
    scopes.sort_unstable();
    let scope = scopes.join(" ");
    let fields = request.form_fields();
    let mut parts: Vec<&[u8]> = vec![b"tokengate/request/v1", token_url.as_bytes()];
    parts.extend(optional(client_id));
    parts.extend(optional(
        request.client_assertion.as_ref().map(|a| a.expose_secret()),
    ));
    for field in &fields {
        parts.push(field.name.as_bytes());
        parts.push(if field.name == "scope" {
            scope.as_bytes()
        } else {
            field.value.as_bytes()
        });
    }
    keys.digest(parts)
}

/// Tells an absent value from an empty one.
fn optional(value: Option<&str>) -> [&[u8]; 2] {
    match value {
        Some(value) => [b"1", value.as_bytes()],
        None => [b"0", b""],
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proto;
    use crate::proto::get_token_request::Grant;

    const URL: &str = "https://platform.example/restapi/oauth/token";

    fn keys() -> &'static Keys {
        static KEYS: std::sync::LazyLock<Keys> = std::sync::LazyLock::new(|| Keys::new(None));
        &KEYS
    }

    fn id(request: proto::GetTokenRequest) -> Digest {
        let request = TokenRequest::try_from(request).expect("valid");
        identity(keys(), &request, request.client_id.as_deref(), URL)
    }

    fn base() -> proto::GetTokenRequest {
        proto::GetTokenRequest {
            grant: Some(Grant::JwtBearer(proto::JwtBearerGrant {
                assertion: "eyJ.a.b".into(),
            })),
            client_id: "app".into(),
            scopes: vec!["ReadAccounts".into(), "SMS".into(), "Calls".into()],
            endpoint_id: "ep".into(),
            access_token_ttl: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0,
            }),
            refresh_token_ttl: Some(prost_types::Duration {
                seconds: 6000,
                nanos: 0,
            }),
            ..Default::default()
        }
    }

    /// Each request differs from `base()` in exactly one field.
    fn variants() -> Vec<(&'static str, proto::GetTokenRequest)> {
        let with = |f: fn(&mut proto::GetTokenRequest)| {
            let mut r = base();
            f(&mut r);
            r
        };
        vec![
            (
                "grant field",
                with(|r| {
                    r.grant = Some(Grant::JwtBearer(proto::JwtBearerGrant {
                        assertion: "eyJ.a.c".into(),
                    }))
                }),
            ),
            (
                "grant type",
                with(|r| {
                    r.grant = Some(Grant::PartnerJwt(proto::PartnerJwtGrant {
                        assertion: "eyJ.a.b".into(),
                    }))
                }),
            ),
            ("client_id", with(|r| r.client_id = "app2".into())),
            ("no client_id", with(|r| r.client_id.clear())),
            (
                "client_assertion",
                with(|r| {
                    r.client_assertion = Some(proto::ClientAssertion {
                        assertion: "x".into(),
                    })
                }),
            ),
            ("a scope", with(|r| r.scopes[0] = "ReadContacts".into())),
            (
                "one scope fewer",
                with(|r| {
                    r.scopes.pop();
                }),
            ),
            ("endpoint_id", with(|r| r.endpoint_id = "ep2".into())),
            ("no endpoint_id", with(|r| r.endpoint_id.clear())),
            (
                "access_token_ttl",
                with(|r| {
                    r.access_token_ttl = Some(prost_types::Duration {
                        seconds: 601,
                        nanos: 0,
                    })
                }),
            ),
            ("refresh_token_ttl", with(|r| r.refresh_token_ttl = None)),
        ]
    }

    #[test]
    fn any_change_to_any_field_gives_a_new_identity() {
        let base = id(base());
        let mut seen = std::collections::HashSet::from([base]);
        for (what, request) in variants() {
            assert!(
                seen.insert(id(request)),
                "{what} did not change the identity"
            );
        }
    }

    #[test]
    fn the_upstream_url_and_the_key_are_part_of_the_identity() {
        let request = TokenRequest::try_from(base()).unwrap();
        let a = identity(keys(), &request, Some("app"), URL);
        assert_ne!(
            a,
            identity(keys(), &request, Some("app"), "https://other.example/token")
        );
        assert_ne!(a, identity(&Keys::new(None), &request, Some("app"), URL));
    }

    #[test]
    fn rejected_access_token_is_not_part_of_the_identity() {
        let mut rejected = base();
        rejected.rejected_access_token = "at-old".into();
        assert_eq!(id(base()), id(rejected));
    }

    proptest! {
        #[test]
        fn scope_order_never_changes_the_identity(
            scopes in proptest::collection::vec("[A-Za-z]{1,12}", 0..8),
            seed in any::<u64>(),
        ) {
            let mut shuffled = scopes.clone();
            fastrand::Rng::with_seed(seed).shuffle(&mut shuffled);
            let with = |scopes: Vec<String>| proto::GetTokenRequest { scopes, ..base() };
            prop_assert_eq!(id(with(scopes)), id(with(shuffled)));
        }

        #[test]
        fn different_assertions_never_share_an_identity(a in "[a-zA-Z0-9._-]{1,64}", b in "[a-zA-Z0-9._-]{1,64}") {
            prop_assume!(a != b);
            let with = |assertion: String| proto::GetTokenRequest {
                grant: Some(Grant::JwtBearer(proto::JwtBearerGrant { assertion })),
                ..base()
            };
            prop_assert_ne!(id(with(a)), id(with(b)));
        }
    }
}
