//! Every single-call fault and the outcome the contract (§2) gives it. The in-process suite
//! and the real-binary run share this table.

use std::time::Duration;

use testkit::Mode;
use tokengate::proto::GetTokenResponse;
use tonic::{Code, Status};

use crate::harness::{assert_failure, metadata, retry_delay};

/// One fault and what a call during it must end with.
pub struct Case {
    pub name: &'static str,
    pub mode: Mode,
    pub code: Code,
    pub reason: &'static str,
    /// Requests the upstream must see for one call (`None`: not asserted).
    pub connections: Option<usize>,
    /// The RetryInfo delay: `Some(None)` = must be absent, `Some(Some(d))` = must be `d`.
    pub retry: Option<Option<Duration>>,
    /// `upstreamHttpStatus` in ErrorInfo, when the upstream got as far as a status line.
    pub http_status: Option<&'static str>,
}

const UNAVAILABLE: &str = "UPSTREAM_UNAVAILABLE";
const TIMEOUT: &str = "UPSTREAM_TIMEOUT";
const BAD_RESPONSE: &str = "UPSTREAM_BAD_RESPONSE";
const RATE_LIMITED: &str = "UPSTREAM_RATE_LIMITED";
/// A reply that is not HTTP: reached, but not a token or an OAuth error (contract §2).
const NOT_HTTP_REASON: &str = BAD_RESPONSE;

fn case(name: &'static str, mode: Mode, code: Code, reason: &'static str) -> Case {
    Case {
        name,
        mode,
        code,
        reason,
        connections: Some(1),
        retry: Some(None),
        http_status: None,
    }
}

impl Case {
    fn connections(mut self, n: Option<usize>) -> Self {
        self.connections = n;
        self
    }

    fn retry(mut self, delay: Duration) -> Self {
        self.retry = Some(Some(delay));
        self
    }

    fn http_status(mut self, status: &'static str) -> Self {
        self.http_status = Some(status);
        self
    }

    /// Asserts that `result` is this case's outcome.
    #[track_caller]
    pub fn check(&self, result: &Result<GetTokenResponse, Status>) {
        let status = assert_failure(result, self.code, self.reason, self.name);
        if let Some(expected) = self.retry {
            assert_eq!(
                retry_delay(&status),
                expected,
                "{}: RetryInfo; {status:?}",
                self.name
            );
        }
        assert_eq!(
            metadata(&status, "upstreamHttpStatus").as_deref(),
            self.http_status,
            "{}: upstreamHttpStatus; {status:?}",
            self.name
        );
    }
}

/// Every single-call fault. Retry-After values that do not fit in the 300 ms
/// `request_timeout` are not waited out, so each of those calls sends exactly once.
pub fn cases() -> Vec<Case> {
    let secs = Duration::from_secs;
    vec![
        // Connection refused is retried (nothing was sent), so the upstream may be tried
        // up to three times; none of them is accepted.
        case("refused", Mode::Refuse, Code::Unavailable, UNAVAILABLE).connections(Some(0)),
        // Whether reqwest reports a reset right after the handshake as a connect error
        // (retried: nothing was sent) or a send error (not retried) is a race, so the
        // upstream sees one to three attempts.
        case(
            "reset on accept",
            Mode::ResetOnAccept,
            Code::Unavailable,
            UNAVAILABLE,
        )
        .connections(None),
        case(
            "reset after the request",
            Mode::ResetAfterRequest,
            Code::Unavailable,
            UNAVAILABLE,
        ),
        case(
            "reset after the headers",
            Mode::ResetAfterHeaders,
            Code::Unavailable,
            UNAVAILABLE,
        )
        .http_status("200"),
        case(
            "reset mid-body",
            Mode::ResetMidBody,
            Code::Unavailable,
            UNAVAILABLE,
        )
        .http_status("200"),
        case(
            "clean close mid-body",
            Mode::CloseMidBody,
            Code::Unavailable,
            UNAVAILABLE,
        )
        .http_status("200"),
        case("hang", Mode::Hang, Code::Unavailable, TIMEOUT),
        case(
            "trickle",
            Mode::Trickle(Duration::from_millis(50)),
            Code::Unavailable,
            TIMEOUT,
        ),
        // Contract gap (reported, not fixed here: src/ is not this suite's to change):
        // bytes that are not HTTP come back as UPSTREAM_UNAVAILABLE with "upstream could
        // not be reached", because every reqwest error from `send()` is mapped to
        // Unavailable (src/upstream.rs, `send`). The upstream *was* reached and answered
        // nonsense, which §2 files under UPSTREAM_BAD_RESPONSE ("a body that is not an
        // OAuth error or token"). The gRPC code is UNAVAILABLE either way. When `send()`
        // learns to tell a parse error from a transport error, change this line to
        // BAD_RESPONSE.
        case(
            "not HTTP",
            Mode::NotHttp,
            Code::Unavailable,
            NOT_HTTP_REASON,
        ),
        case("HTML", Mode::Html, Code::Unavailable, BAD_RESPONSE).http_status("200"),
        case(
            "truncated JSON",
            Mode::TruncatedJson,
            Code::Unavailable,
            BAD_RESPONSE,
        )
        .http_status("200"),
        case(
            "2 MiB with Content-Length",
            Mode::HugeWithLength,
            Code::Unavailable,
            BAD_RESPONSE,
        )
        .http_status("200"),
        case(
            "2 MiB chunked",
            Mode::HugeChunked,
            Code::Unavailable,
            BAD_RESPONSE,
        )
        .http_status("200"),
        case(
            "429 without Retry-After",
            Mode::Status(429, None),
            Code::ResourceExhausted,
            RATE_LIMITED,
        )
        .retry(secs(30))
        .http_status("429"),
        case(
            "429 with Retry-After: 7",
            Mode::Status(429, Some("7")),
            Code::ResourceExhausted,
            RATE_LIMITED,
        )
        .retry(secs(7))
        .http_status("429"),
        case(
            "503 without Retry-After",
            Mode::Status(503, None),
            Code::Unavailable,
            UNAVAILABLE,
        )
        .http_status("503"),
        case(
            "503 with Retry-After: 7",
            Mode::Status(503, Some("7")),
            Code::Unavailable,
            UNAVAILABLE,
        )
        .retry(secs(7))
        .http_status("503"),
        case(
            "500",
            Mode::Status(500, None),
            Code::Unavailable,
            UNAVAILABLE,
        )
        .http_status("500"),
        case(
            "502",
            Mode::Status(502, None),
            Code::Unavailable,
            UNAVAILABLE,
        )
        .http_status("502"),
    ]
}
