//! The one place where a failed call becomes a `tonic::Status` (contract §2).
//!
//! Every status carries `google.rpc.ErrorInfo` (domain `tokengate`), `RetryInfo` whenever a
//! wait is known, and `BadRequest` for local validation. Messages and metadata never hold a
//! secret: upstream text was scrubbed when it was decoded, and is capped here.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};

use crate::client::ClientError;
use crate::grant::{GrantKind, Violation};
use crate::upstream::{OAuthError, UpstreamError, UpstreamErrorKind};

/// `ErrorInfo.domain` of every tokengate error.
pub const DOMAIN: &str = "tokengate";

/// Longest `ErrorInfo.metadata` value, in characters.
const MAX_METADATA_CHARS: usize = 256;

/// Wait suggested for `authorization_pending` (RFC 8628's default polling interval).
const PENDING_RETRY: Duration = Duration::from_secs(5);
/// Wait suggested for `slow_down` without `Retry-After`: the default interval plus the
/// 5 s that RFC 8628 §3.5 adds.
const SLOW_DOWN_RETRY: Duration = Duration::from_secs(10);
/// Wait suggested for a 429 without `Retry-After` (RingCentral: "30 s or more").
pub const RATE_LIMIT_RETRY: Duration = Duration::from_secs(30);
/// Wait suggested when tokengate itself sheds load.
const OVERLOAD_RETRY: Duration = Duration::from_secs(1);

/// Why a call failed. Cloned when one upstream call answers several callers.
#[derive(Clone, Debug)]
pub enum Failure {
    /// The request failed local validation.
    InvalidRequest(Vec<Violation>),
    /// The client could not be resolved or may not use the grant.
    Client(ClientError),
    /// `[[callers]]` are registered and the caller is none of them.
    CallerUnauthenticated,
    /// Refused locally because the upstream rate-limited this client (or user); the wait
    /// left is attached.
    RateLimited(Duration),
    /// Every slot and queue place is taken.
    Overloaded,
    /// The caller's deadline passed before the call could start.
    DeadlineExceeded,
    /// The upstream refused or failed. `caller_credentials` is true when the caller supplied
    /// the client authentication (a `client_assertion`).
    Upstream {
        error: UpstreamError,
        caller_credentials: bool,
    },
    /// A one-time credential whose result the resource server rejected: it was exchanged
    /// already and is not sent again (contract §8.1 I2).
    CredentialSpent,
}

/// A failed call and what it was for.
#[derive(Debug)]
pub struct CallError {
    pub failure: Failure,
    pub grant: Option<GrantKind>,
    pub client_id: Option<String>,
}

/// The ErrorInfo reason of a failure, for logs that have no call around them.
pub fn reason(failure: &Failure) -> &'static str {
    classify(failure).1
}

impl CallError {
    /// The ErrorInfo reason, also logged.
    pub fn reason(&self) -> &'static str {
        classify(&self.failure).1
    }

    /// The gRPC code of the [`Status`] it becomes.
    pub fn code(&self) -> Code {
        classify(&self.failure).0
    }

    /// What the call's log line says beside the reason. Never a secret, nor the caller's
    /// client_id (a caller-chosen string).
    pub fn log_detail(&self) -> String {
        match &self.failure {
            Failure::Upstream { error, .. } => format!("{:?}", error.kind),
            Failure::InvalidRequest(violations) => {
                let fields: Vec<&str> = violations.iter().map(|v| v.field.as_str()).collect();
                format!("invalid field(s): {}", fields.join(", "))
            }
            Failure::Client(ClientError::Signing(error)) => error.to_string(),
            // Its message quotes the caller's client_id, which no log line may hold.
            Failure::Client(ClientError::Unknown(_)) => {
                "the client_id is not registered and public clients are not allowed".to_owned()
            }
            Failure::Client(e) => e.to_string(),
            Failure::RateLimited(_)
            | Failure::Overloaded
            | Failure::DeadlineExceeded
            | Failure::CredentialSpent
            | Failure::CallerUnauthenticated => "refused locally".to_owned(),
        }
    }
}

/// The code, the reason and the suggested wait of a failure.
fn classify(failure: &Failure) -> (Code, &'static str, Option<Duration>) {
    match failure {
        Failure::InvalidRequest(_) => (Code::InvalidArgument, "INVALID_REQUEST", None),
        Failure::Client(ClientError::Missing) => (Code::InvalidArgument, "INVALID_REQUEST", None),
        Failure::Client(ClientError::Unknown(_)) => {
            (Code::PermissionDenied, "UNKNOWN_CLIENT", None)
        }
        Failure::Client(ClientError::CallerNotAllowed { .. }) => {
            (Code::PermissionDenied, "CALLER_NOT_ALLOWED", None)
        }
        Failure::CallerUnauthenticated => (Code::Unauthenticated, "CALLER_UNAUTHENTICATED", None),
        Failure::Client(ClientError::Signing(_)) => (Code::Internal, "SIGNING_FAILED", None),
        Failure::Client(ClientError::GrantNotAllowed { .. }) => {
            (Code::PermissionDenied, "GRANT_NOT_ALLOWED", None)
        }
        Failure::RateLimited(wait) => (
            Code::ResourceExhausted,
            "UPSTREAM_RATE_LIMITED",
            Some(*wait),
        ),
        Failure::Overloaded => (Code::ResourceExhausted, "OVERLOADED", Some(OVERLOAD_RETRY)),
        Failure::DeadlineExceeded => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED", None),
        Failure::CredentialSpent => (Code::FailedPrecondition, "CREDENTIAL_SPENT", None),
        Failure::Upstream {
            error,
            caller_credentials,
        } => classify_upstream(error, *caller_credentials),
    }
}

fn classify_upstream(
    error: &UpstreamError,
    caller_credentials: bool,
) -> (Code, &'static str, Option<Duration>) {
    match &error.kind {
        UpstreamErrorKind::OAuth => classify_oauth(error, caller_credentials),
        UpstreamErrorKind::RateLimited => (
            Code::ResourceExhausted,
            "UPSTREAM_RATE_LIMITED",
            Some(error.retry_after.unwrap_or(RATE_LIMIT_RETRY)),
        ),
        UpstreamErrorKind::Unavailable(_) => {
            (Code::Unavailable, "UPSTREAM_UNAVAILABLE", error.retry_after)
        }
        UpstreamErrorKind::Timeout => (Code::Unavailable, "UPSTREAM_TIMEOUT", None),
        UpstreamErrorKind::BadResponse(_) => (Code::Unavailable, "UPSTREAM_BAD_RESPONSE", None),
        UpstreamErrorKind::DeadlineExceeded => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED", None),
        UpstreamErrorKind::Held(wait) => (
            Code::ResourceExhausted,
            "UPSTREAM_RATE_LIMITED",
            Some(*wait),
        ),
        // The broker starts over on it; should one ever surface, nothing was sent.
        UpstreamErrorKind::LeaseLost => (Code::Unavailable, "UPSTREAM_UNAVAILABLE", None),
    }
}

/// Maps on the OAuth `error` value, then on RingCentral's error code, and only then on the
/// HTTP status: RingCentral answers most token errors with 400 whatever its docs list.
fn classify_oauth(
    error: &UpstreamError,
    caller_credentials: bool,
) -> (Code, &'static str, Option<Duration>) {
    let oauth = error.oauth.as_ref();
    let name = oauth.and_then(|o| o.error.as_deref());
    let name = name.or_else(|| {
        oauth
            .and_then(|o| o.error_code.as_deref())
            .and_then(oauth_name_of_code)
    });
    match name {
        Some("invalid_request") => (Code::InvalidArgument, "INVALID_REQUEST", None),
        Some("invalid_client") if caller_credentials => {
            (Code::Unauthenticated, "INVALID_CLIENT", None)
        }
        Some("invalid_client") => (Code::FailedPrecondition, "INVALID_CLIENT", None),
        Some("invalid_grant") => (Code::Unauthenticated, "INVALID_GRANT", None),
        Some("unauthorized_client") => (Code::PermissionDenied, "UNAUTHORIZED_CLIENT", None),
        Some("unsupported_grant_type") => (Code::Unimplemented, "UNSUPPORTED_GRANT_TYPE", None),
        Some("invalid_scope") => (Code::InvalidArgument, "INVALID_SCOPE", None),
        Some("access_denied") => (Code::PermissionDenied, "ACCESS_DENIED", None),
        Some("authorization_pending") => (
            Code::FailedPrecondition,
            "AUTHORIZATION_PENDING",
            Some(error.retry_after.unwrap_or(PENDING_RETRY)),
        ),
        Some("slow_down") => (
            Code::ResourceExhausted,
            "SLOW_DOWN",
            Some(error.retry_after.unwrap_or(SLOW_DOWN_RETRY)),
        ),
        Some("expired_token") => (Code::FailedPrecondition, "EXPIRED_TOKEN", None),
        _ => {
            let code = match error.http_status {
                Some(401) => Code::Unauthenticated,
                Some(403) => Code::PermissionDenied,
                _ => Code::FailedPrecondition,
            };
            (code, "UPSTREAM_ERROR", error.retry_after)
        }
    }
}

/// The RFC 6749 error that a RingCentral error code stands for, for bodies that carry only
/// `errors[].errorCode` (DOCS `errors.md`).
fn oauth_name_of_code(code: &str) -> Option<&'static str> {
    Some(match code {
        "OAU-120" | "OAU-121" | "OAU-123" | "OAU-127" | "OAU-134" | "OAU-146" | "OAU-151" => {
            "invalid_client"
        }
        "OAU-106" | "OAU-108" | "OAU-110" | "OAU-140" => "invalid_grant",
        "OAU-112" | "OAU-125" | "OAU-251" => "unauthorized_client",
        _ => return None,
    })
}

fn cap(text: &str) -> String {
    match text.char_indices().nth(MAX_METADATA_CHARS) {
        Some((end, _)) => text[..end].to_owned(),
        None => text.to_owned(),
    }
}

fn message(error: &CallError) -> String {
    match &error.failure {
        Failure::InvalidRequest(violations) => {
            let fields: Vec<String> = violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect();
            format!("invalid request: {}", fields.join("; "))
        }
        Failure::Client(client) => client.to_string(),
        Failure::RateLimited(wait) => format!(
            "not sent: the upstream rate-limited this client; retry in {} s",
            wait.as_secs_f64().ceil()
        ),
        Failure::Overloaded => "tokengate is at capacity; retry shortly".to_owned(),
        Failure::CallerUnauthenticated => {
            "caller not recognised: present a registered client certificate or API key".to_owned()
        }
        Failure::DeadlineExceeded => {
            "the call's deadline passed while it waited for a turn".to_owned()
        }
        Failure::CredentialSpent => {
            "already exchanged: use the refresh token of its result, or sign in again".to_owned()
        }
        Failure::Upstream { error, .. } => upstream_message(error),
    }
}

fn upstream_message(error: &UpstreamError) -> String {
    let status = error
        .http_status
        .map(|s| format!(" (HTTP {s})"))
        .unwrap_or_default();
    let said = error
        .oauth
        .as_deref()
        .map(oauth_summary)
        .unwrap_or_default();
    match &error.kind {
        UpstreamErrorKind::OAuth => format!("upstream refused the request{status}{said}"),
        UpstreamErrorKind::RateLimited => format!("upstream rate limit reached{status}{said}"),
        UpstreamErrorKind::Unavailable(_) if error.http_status.is_some() => {
            format!("upstream failed{status}{said}")
        }
        UpstreamErrorKind::Unavailable(_) => "upstream could not be reached".to_owned(),
        UpstreamErrorKind::Timeout => {
            "upstream did not answer within upstream.request_timeout".to_owned()
        }
        UpstreamErrorKind::BadResponse(what) => format!("upstream sent {what}{status}"),
        UpstreamErrorKind::DeadlineExceeded => {
            "the call's deadline passed before the upstream answered".to_owned()
        }
        UpstreamErrorKind::Held(wait) => format!(
            "not sent: the upstream rate-limited this client; retry in {} s",
            wait.as_secs_f64().ceil()
        ),
        UpstreamErrorKind::LeaseLost => {
            "not sent: another replica took over this request; retry".to_owned()
        }
    }
}

fn oauth_summary(oauth: &OAuthError) -> String {
    let parts: Vec<&str> = [&oauth.error, &oauth.error_code, &oauth.description]
        .into_iter()
        .filter_map(|p| p.as_deref())
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        cap(&format!(": {}", parts.join(" ")))
    }
}

fn metadata(error: &CallError) -> HashMap<String, String> {
    let mut metadata = HashMap::new();
    let mut put = |key: &str, value: &str| {
        metadata.insert(key.to_owned(), cap(value));
    };
    if let Some(grant) = error.grant {
        put("grantType", grant.as_str());
    }
    if let Some(client_id) = &error.client_id {
        put("clientId", client_id);
    }
    if let Failure::Upstream { error, .. } = &error.failure {
        if let Some(status) = error.http_status {
            put("upstreamHttpStatus", &status.to_string());
        }
        if let Some(id) = &error.request_id {
            put("upstreamRequestId", id);
        }
        if let Some(oauth) = &error.oauth {
            for (key, value) in [
                ("oauthError", &oauth.error),
                ("oauthErrorDescription", &oauth.description),
                ("upstreamErrorCode", &oauth.error_code),
            ] {
                if let Some(value) = value {
                    put(key, value);
                }
            }
        }
    }
    metadata
}

impl From<CallError> for Status {
    fn from(error: CallError) -> Self {
        let (code, reason, retry) = classify(&error.failure);
        let mut details = ErrorDetails::new();
        details.set_error_info(reason, DOMAIN, metadata(&error));
        if retry.is_some() {
            details.set_retry_info(retry);
        }
        if let Failure::InvalidRequest(violations) = &error.failure {
            let violations: Vec<FieldViolation> = violations
                .iter()
                .map(|v| FieldViolation::new(&v.field, &v.description))
                .collect();
            details.set_bad_request(violations);
        }
        if let Failure::Client(ClientError::Missing) = &error.failure {
            details.add_bad_request_violation(
                "client_id",
                "is required: no default client is registered",
            );
        }
        Status::with_error_details(code, message(&error), details)
    }
}
