//! Proto requests → validated domain requests → the form fields the upstream expects.
//!
//! Everything here is pure. Validation collects every violation at once, each naming the
//! proto field path, so a caller can fix a request in one round trip. Nothing that fails
//! here ever reaches the upstream.

use std::borrow::Cow;
use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::proto;
use crate::proto::get_token_request::Grant as ProtoGrant;

/// Longest string accepted in any request field: room for large JWTs, none for abuse.
pub const MAX_FIELD_BYTES: usize = 8 * 1024;

/// `client_assertion_type` for RFC 7523 client authentication.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The twelve grant arms, named as in the proto `oneof` and in `allowed_grants`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    AuthorizationCode,
    Password,
    JwtBearer,
    PartnerJwt,
    RefreshToken,
    IvrPin,
    DeviceCode,
    ClientCredentials,
    Otp,
    Guest,
    PersonalJwt,
    DeviceCertificate,
}

impl GrantKind {
    /// Every arm, in proto order.
    pub const ALL: [Self; 12] = [
        Self::AuthorizationCode,
        Self::Password,
        Self::JwtBearer,
        Self::PartnerJwt,
        Self::RefreshToken,
        Self::IvrPin,
        Self::DeviceCode,
        Self::ClientCredentials,
        Self::Otp,
        Self::Guest,
        Self::PersonalJwt,
        Self::DeviceCertificate,
    ];

    /// The arm name, as used in config and in error metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthorizationCode => "authorization_code",
            Self::Password => "password",
            Self::JwtBearer => "jwt_bearer",
            Self::PartnerJwt => "partner_jwt",
            Self::RefreshToken => "refresh_token",
            Self::IvrPin => "ivr_pin",
            Self::DeviceCode => "device_code",
            Self::ClientCredentials => "client_credentials",
            Self::Otp => "otp",
            Self::Guest => "guest",
            Self::PersonalJwt => "personal_jwt",
            Self::DeviceCertificate => "device_certificate",
        }
    }

    /// The `grant_type` value sent upstream.
    pub fn grant_type(self) -> &'static str {
        match self {
            Self::JwtBearer => "urn:ietf:params:oauth:grant-type:jwt-bearer",
            Self::DeviceCode => "urn:ietf:params:oauth:grant-type:device_code",
            other => other.as_str(),
        }
    }
}

impl fmt::Display for GrantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One local validation failure, named by its proto field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub field: String,
    pub description: String,
}

impl Violation {
    fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// One `name=value` pair of the upstream form body. `secret` marks values that must be
/// scrubbed from anything the upstream echoes back.
#[derive(Clone, PartialEq, Eq)]
pub struct FormField<'a> {
    pub name: &'static str,
    pub value: Cow<'a, str>,
    pub secret: bool,
}

impl<'a> FormField<'a> {
    pub fn plain(name: &'static str, value: impl Into<Cow<'a, str>>) -> Self {
        Self {
            name,
            value: value.into(),
            secret: false,
        }
    }

    pub fn secret(name: &'static str, value: &'a SecretString) -> Self {
        Self {
            name,
            value: Cow::Borrowed(value.expose_secret()),
            secret: true,
        }
    }
}

impl fmt::Debug for FormField<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value: &dyn fmt::Debug = if self.secret {
            &"[REDACTED]"
        } else {
            &self.value
        };
        f.debug_tuple(self.name).field(value).finish()
    }
}

/// The subject of a client credentials grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    Account {
        account_id: String,
    },
    Brand {
        brand_id: String,
        partner_account_id: Option<String>,
    },
}

/// A grant whose required fields are present. Credentials stay wrapped until encoded.
#[derive(Clone, Debug)]
pub enum Grant {
    AuthorizationCode {
        code: SecretString,
        redirect_uri: Option<String>,
        code_verifier: Option<SecretString>,
    },
    Password {
        username: String,
        password: SecretString,
        extension: Option<String>,
        pin: Option<SecretString>,
    },
    JwtBearer {
        assertion: SecretString,
    },
    PartnerJwt {
        assertion: SecretString,
    },
    RefreshToken {
        refresh_token: SecretString,
    },
    IvrPin {
        ivr_pin: SecretString,
    },
    DeviceCode {
        device_code: SecretString,
    },
    ClientCredentials {
        subject: Option<Subject>,
    },
    Otp {
        code: SecretString,
    },
    Guest {
        brand_id: Option<String>,
        resource_type: Option<String>,
        resource: Option<String>,
    },
    PersonalJwt {
        assertion: Option<SecretString>,
    },
    DeviceCertificate,
}

impl Grant {
    pub fn kind(&self) -> GrantKind {
        match self {
            Self::AuthorizationCode { .. } => GrantKind::AuthorizationCode,
            Self::Password { .. } => GrantKind::Password,
            Self::JwtBearer { .. } => GrantKind::JwtBearer,
            Self::PartnerJwt { .. } => GrantKind::PartnerJwt,
            Self::RefreshToken { .. } => GrantKind::RefreshToken,
            Self::IvrPin { .. } => GrantKind::IvrPin,
            Self::DeviceCode { .. } => GrantKind::DeviceCode,
            Self::ClientCredentials { .. } => GrantKind::ClientCredentials,
            Self::Otp { .. } => GrantKind::Otp,
            Self::Guest { .. } => GrantKind::Guest,
            Self::PersonalJwt { .. } => GrantKind::PersonalJwt,
            Self::DeviceCertificate => GrantKind::DeviceCertificate,
        }
    }

    /// `grant_type` followed by the grant's own fields, in contract order.
    fn push_fields<'a>(&'a self, out: &mut Vec<FormField<'a>>) {
        out.push(FormField::plain("grant_type", self.kind().grant_type()));
        match self {
            Self::AuthorizationCode {
                code,
                redirect_uri,
                code_verifier,
            } => {
                out.push(FormField::secret("code", code));
                push_plain(out, "redirect_uri", redirect_uri);
                push_secret(out, "code_verifier", code_verifier);
            }
            Self::Password {
                username,
                password,
                extension,
                pin,
            } => {
                out.push(FormField::plain("username", username.as_str()));
                out.push(FormField::secret("password", password));
                push_plain(out, "extension", extension);
                push_secret(out, "pin", pin);
            }
            Self::JwtBearer { assertion } | Self::PartnerJwt { assertion } => {
                out.push(FormField::secret("assertion", assertion));
            }
            Self::RefreshToken { refresh_token } => {
                out.push(FormField::secret("refresh_token", refresh_token));
            }
            Self::IvrPin { ivr_pin } => out.push(FormField::secret("ivr_pin", ivr_pin)),
            Self::DeviceCode { device_code } => {
                out.push(FormField::secret("device_code", device_code));
            }
            Self::ClientCredentials { subject } => match subject {
                None => {}
                Some(Subject::Account { account_id }) => {
                    out.push(FormField::plain("account_id", account_id.as_str()));
                }
                Some(Subject::Brand {
                    brand_id,
                    partner_account_id,
                }) => {
                    out.push(FormField::plain("brand_id", brand_id.as_str()));
                    push_plain(out, "partner_account_id", partner_account_id);
                }
            },
            Self::Otp { code } => out.push(FormField::secret("code", code)),
            Self::Guest {
                brand_id,
                resource_type,
                resource,
            } => {
                push_plain(out, "brand_id", brand_id);
                push_plain(out, "resource_type", resource_type);
                push_plain(out, "resource", resource);
            }
            Self::PersonalJwt { assertion } => push_secret(out, "assertion", assertion),
            Self::DeviceCertificate => {}
        }
    }
}

fn push_plain<'a>(out: &mut Vec<FormField<'a>>, name: &'static str, value: &'a Option<String>) {
    if let Some(value) = value {
        out.push(FormField::plain(name, value.as_str()));
    }
}

fn push_secret<'a>(
    out: &mut Vec<FormField<'a>>,
    name: &'static str,
    value: &'a Option<SecretString>,
) {
    if let Some(value) = value {
        out.push(FormField::secret(name, value));
    }
}

/// A validated GetToken request, before client authentication is added.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub grant: Grant,
    pub client_id: Option<String>,
    pub client_assertion: Option<SecretString>,
    pub scopes: Vec<String>,
    pub endpoint_id: Option<String>,
    pub access_token_ttl: Option<u64>,
    pub refresh_token_ttl: Option<u64>,
    /// A token the resource server refused; tells the broker, never sent upstream.
    pub rejected_access_token: Option<SecretString>,
}

impl TokenRequest {
    /// Whom the request acts for, when it says: the password grant's username or the
    /// subject of a JWT grant's assertion. Keys the rate-limit guard.
    pub fn user(&self) -> Option<String> {
        match &self.grant {
            Grant::Password { username, .. } => Some(username.clone()),
            Grant::JwtBearer { assertion } | Grant::PartnerJwt { assertion } => {
                jwt_subject(assertion.expose_secret())
            }
            Grant::PersonalJwt { assertion } => assertion
                .as_ref()
                .and_then(|a| jwt_subject(a.expose_secret())),
            _ => None,
        }
    }

    /// Whom a 429 for this request penalises besides its client: the user it names, or for
    /// a refresh, the session its refresh token belongs to (a refresh is one user's, so its
    /// 429 must not hold back the whole client). Only for [`crate::rate_limit::GuardKeys`],
    /// which hashes it; `user()` stays free of tokens for any other use.
    pub fn penalty_user(&self) -> Option<crate::rate_limit::User<'_>> {
        match &self.grant {
            Grant::RefreshToken { refresh_token } => {
                Some(crate::rate_limit::User::Session(refresh_token))
            }
            _ => self
                .user()
                .map(|user| crate::rate_limit::User::Named(user.into())),
        }
    }

    /// The form fields of the grant and the common fields; client authentication is added
    /// by [`crate::client::ClientAuth::push_fields`].
    pub fn form_fields(&self) -> Vec<FormField<'_>> {
        let mut out = Vec::with_capacity(10);
        self.grant.push_fields(&mut out);
        if !self.scopes.is_empty() {
            out.push(FormField::plain("scope", self.scopes.join(" ")));
        }
        push_plain(&mut out, "endpoint_id", &self.endpoint_id);
        if let Some(ttl) = self.access_token_ttl {
            out.push(FormField::plain("access_token_ttl", ttl.to_string()));
        }
        if let Some(ttl) = self.refresh_token_ttl {
            out.push(FormField::plain("refresh_token_ttl", ttl.to_string()));
        }
        out
    }
}

/// A validated RevokeToken request.
#[derive(Clone, Debug)]
pub struct RevokeRequest {
    pub token: SecretString,
    pub client_id: Option<String>,
    pub client_assertion: Option<SecretString>,
}

impl RevokeRequest {
    pub fn form_fields(&self) -> Vec<FormField<'_>> {
        vec![FormField::secret("token", &self.token)]
    }
}

/// The `sub` claim of a JWT, read without verifying it: it only names whom a penalty is for.
pub fn jwt_subject(jwt: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Claims {
        sub: Option<String>,
    }
    serde_json::from_slice::<Claims>(&bytes)
        .ok()?
        .sub
        .filter(|s| !s.is_empty())
}

/// Collects violations while a request is taken apart.
#[derive(Default)]
struct Checker {
    violations: Vec<Violation>,
}

impl Checker {
    /// Refuses a value longer than [`MAX_FIELD_BYTES`].
    fn length(&mut self, field: &str, value: &str) {
        if value.len() > MAX_FIELD_BYTES {
            self.violations.push(Violation::new(
                field,
                format!(
                    "is {} bytes; at most {MAX_FIELD_BYTES} are accepted",
                    value.len()
                ),
            ));
        }
    }

    fn required(&mut self, field: &str, value: String) -> String {
        if value.is_empty() {
            self.violations.push(Violation::new(field, "is required"));
        }
        self.length(field, &value);
        value
    }

    fn optional(&mut self, field: &str, value: String) -> Option<String> {
        self.length(field, &value);
        (!value.is_empty()).then_some(value)
    }

    fn optional_secret(&mut self, field: &str, value: String) -> Option<SecretString> {
        self.optional(field, value).map(SecretString::from)
    }

    fn required_secret(&mut self, field: &str, value: String) -> SecretString {
        SecretString::from(self.required(field, value))
    }

    fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, Vec<Violation>> {
        if self.violations.is_empty() {
            Ok(value())
        } else {
            Err(self.violations)
        }
    }

    fn ttl(&mut self, field: &str, ttl: Option<prost_types::Duration>) -> Option<u64> {
        let ttl = ttl?;
        match u64::try_from(ttl.seconds) {
            Ok(seconds) if seconds > 0 && ttl.nanos == 0 => Some(seconds),
            _ => {
                self.violations.push(Violation::new(
                    field,
                    "must be a positive whole number of seconds",
                ));
                None
            }
        }
    }

    fn client_assertion(
        &mut self,
        field: &str,
        assertion: Option<proto::ClientAssertion>,
    ) -> Option<SecretString> {
        let assertion = assertion?.assertion;
        Some(self.required_secret(&format!("{field}.assertion"), assertion))
    }
}

impl TryFrom<proto::GetTokenRequest> for TokenRequest {
    type Error = Vec<Violation>;

    fn try_from(request: proto::GetTokenRequest) -> Result<Self, Self::Error> {
        let proto::GetTokenRequest {
            grant,
            client_id,
            client_assertion,
            scopes,
            endpoint_id,
            access_token_ttl,
            refresh_token_ttl,
            rejected_access_token,
        } = request;
        let mut check = Checker::default();
        let grant = match grant {
            Some(grant) => Some(grant_from_proto(&mut check, grant)),
            None => {
                check.violations.push(Violation::new(
                    "grant",
                    "exactly one grant must be set (authorization_code, password, jwt_bearer, \
                     partner_jwt, refresh_token, ivr_pin, device_code, client_credentials, otp, \
                     guest, personal_jwt or device_certificate)",
                ));
                None
            }
        };
        for (i, scope) in scopes.iter().enumerate() {
            if scope.is_empty() {
                check
                    .violations
                    .push(Violation::new(format!("scopes[{i}]"), "must not be empty"));
            } else if scope.len() > MAX_FIELD_BYTES {
                check.length(&format!("scopes[{i}]"), scope);
            } else if scope.chars().any(char::is_whitespace) {
                check.violations.push(Violation::new(
                    format!("scopes[{i}]"),
                    "must not contain whitespace; pass each scope as its own entry",
                ));
            }
        }
        // Each entry is capped, and so is the `scope` field they are joined into.
        let joined = scopes.iter().map(String::len).sum::<usize>() + scopes.len().saturating_sub(1);
        if joined > MAX_FIELD_BYTES {
            check.violations.push(Violation::new(
                "scopes",
                format!("join to {joined} bytes; at most {MAX_FIELD_BYTES} are accepted"),
            ));
        }
        let access_token_ttl = check.ttl("access_token_ttl", access_token_ttl);
        let refresh_token_ttl = check.ttl("refresh_token_ttl", refresh_token_ttl);
        let client_assertion = check.client_assertion("client_assertion", client_assertion);
        let client_id = check.optional("client_id", client_id);
        let endpoint_id = check.optional("endpoint_id", endpoint_id);
        let rejected_access_token =
            check.optional_secret("rejected_access_token", rejected_access_token);
        match grant {
            Some(grant) if check.violations.is_empty() => Ok(Self {
                grant,
                client_id,
                client_assertion,
                scopes,
                endpoint_id,
                access_token_ttl,
                refresh_token_ttl,
                rejected_access_token,
            }),
            // A missing grant is itself a violation.
            _ => Err(check.violations),
        }
    }
}

#[allow(
    deprecated,
    reason = "the deprecated password fields are still sent when set"
)]
fn grant_from_proto(check: &mut Checker, grant: ProtoGrant) -> Grant {
    match grant {
        ProtoGrant::AuthorizationCode(proto::AuthorizationCodeGrant {
            code,
            redirect_uri,
            code_verifier,
        }) => Grant::AuthorizationCode {
            code: check.required_secret("authorization_code.code", code),
            redirect_uri: check.optional("authorization_code.redirect_uri", redirect_uri),
            code_verifier: check.optional_secret("authorization_code.code_verifier", code_verifier),
        },
        ProtoGrant::Password(proto::PasswordGrant {
            username,
            password,
            extension,
            pin,
        }) => Grant::Password {
            username: check.required("password.username", username),
            password: check.required_secret("password.password", password),
            extension: check.optional("password.extension", extension),
            pin: check.optional_secret("password.pin", pin),
        },
        ProtoGrant::JwtBearer(proto::JwtBearerGrant { assertion }) => Grant::JwtBearer {
            assertion: check.required_secret("jwt_bearer.assertion", assertion),
        },
        ProtoGrant::PartnerJwt(proto::PartnerJwtGrant { assertion }) => Grant::PartnerJwt {
            assertion: check.required_secret("partner_jwt.assertion", assertion),
        },
        ProtoGrant::RefreshToken(proto::RefreshTokenGrant { refresh_token }) => {
            Grant::RefreshToken {
                refresh_token: check.required_secret("refresh_token.refresh_token", refresh_token),
            }
        }
        ProtoGrant::IvrPin(proto::IvrPinGrant { ivr_pin }) => Grant::IvrPin {
            ivr_pin: check.required_secret("ivr_pin.ivr_pin", ivr_pin),
        },
        ProtoGrant::DeviceCode(proto::DeviceCodeGrant { device_code }) => Grant::DeviceCode {
            device_code: check.required_secret("device_code.device_code", device_code),
        },
        ProtoGrant::ClientCredentials(proto::ClientCredentialsGrant { subject }) => {
            use proto::client_credentials_grant::Subject as ProtoSubject;
            let subject = subject.map(|subject| match subject {
                ProtoSubject::AccountId(account_id) => Subject::Account {
                    account_id: check.required("client_credentials.account_id", account_id),
                },
                ProtoSubject::Brand(proto::BrandSubject {
                    brand_id,
                    partner_account_id,
                }) => Subject::Brand {
                    brand_id: check.required("client_credentials.brand.brand_id", brand_id),
                    partner_account_id: check.optional(
                        "client_credentials.brand.partner_account_id",
                        partner_account_id,
                    ),
                },
            });
            Grant::ClientCredentials { subject }
        }
        ProtoGrant::Otp(proto::OtpGrant { code }) => Grant::Otp {
            code: check.required_secret("otp.code", code),
        },
        ProtoGrant::Guest(proto::GuestGrant {
            brand_id,
            resource_type,
            resource,
        }) => Grant::Guest {
            brand_id: check.optional("guest.brand_id", brand_id),
            resource_type: check.optional("guest.resource_type", resource_type),
            resource: check.optional("guest.resource", resource),
        },
        ProtoGrant::PersonalJwt(proto::PersonalJwtGrant { assertion }) => Grant::PersonalJwt {
            assertion: check.optional_secret("personal_jwt.assertion", assertion),
        },
        ProtoGrant::DeviceCertificate(proto::DeviceCertificateGrant {}) => Grant::DeviceCertificate,
    }
}

impl TryFrom<proto::RevokeTokenRequest> for RevokeRequest {
    type Error = Vec<Violation>;

    fn try_from(request: proto::RevokeTokenRequest) -> Result<Self, Self::Error> {
        let proto::RevokeTokenRequest {
            token,
            client_id,
            client_assertion,
        } = request;
        let mut check = Checker::default();
        let token = check.required_secret("token", token);
        let client_assertion = check.client_assertion("client_assertion", client_assertion);
        let client_id = check.optional("client_id", client_id);
        check.finish(|| Self {
            token,
            client_id,
            client_assertion,
        })
    }
}

#[cfg(test)]
mod jwt_tests {
    use super::*;

    #[test]
    fn the_subject_of_a_jwt_is_read_without_verifying() {
        // {"alg":"none"}.{"sub":"user-42","iss":"x"}.sig
        let jwt = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1c2VyLTQyIiwiaXNzIjoieCJ9.c2ln";
        assert_eq!(jwt_subject(jwt).as_deref(), Some("user-42"));
        assert_eq!(jwt_subject("not-a-jwt"), None);
        assert_eq!(jwt_subject("a.!!!.c"), None);
        assert_eq!(
            jwt_subject("eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0.c2ln"),
            None,
            "no sub"
        );
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod proptests;
