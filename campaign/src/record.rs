//! What the campaign records: every upstream POST ([`PostRec`]), every token the upstream
//! issued with its birth and death ([`TokenRec`]), every caller's answer ([`CallRec`]) and
//! every fault window ([`Fault`]). Times are seconds since the campaign's epoch
//! ([`Clock`]), one monotonic clock shared by the upstream, the callers and the faults.

use std::time::Instant;

use sha2::Digest as _;

/// One monotonic clock for every record.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }

    /// Seconds since the epoch.
    pub fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }
}

/// A short digest of a credential or token, for messages: never the raw value.
pub fn digest(value: &str) -> String {
    let hash = sha2::Sha256::digest(value.as_bytes());
    hash[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// The kinds of one-time credential I1 is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cred {
    Code,
    Otp,
    Pin,
    Refresh,
}

impl Cred {
    pub fn name(self) -> &'static str {
        match self {
            Self::Code => "authorization code",
            Self::Otp => "OTP",
            Self::Pin => "IVR PIN",
            Self::Refresh => "refresh token",
        }
    }
}

/// What the upstream did with one POST.
#[derive(Clone, Debug)]
pub enum UpAnswer {
    /// 200 with a token pair (`expires_in` as the raw JSON number sent).
    Token {
        access: String,
        refresh: String,
        expires_in: String,
    },
    /// 400 with this OAuth `error`.
    OAuth(String),
    /// 429 with this Retry-After (s).
    RateLimited(u64),
    /// A 5xx.
    ServerError(u16),
    /// The connection was reset before anything was processed.
    Reset,
    /// A revoke POST, accepted.
    Revoked,
}

/// One POST as the upstream saw it.
#[derive(Clone, Debug)]
pub struct PostRec {
    pub id: usize,
    /// When its body had arrived.
    pub arrived: f64,
    /// When the answer was written (none: reset, or abandoned by the sender first).
    pub written: Option<f64>,
    /// The sender closed the connection before the answer was written.
    pub abandoned: bool,
    /// The delay the script put before the answer.
    pub delay: f64,
    pub revoke: bool,
    pub grant_type: String,
    pub client: String,
    /// Whom the request acts for, by tokengate's rule (password username, JWT subject, the
    /// user of the grant a kept refresh token came from, else the refresh token's session:
    /// [`session_user`]); none: the whole client.
    pub user: Option<String>,
    /// The one-time credential it carried.
    pub credential: Option<(Cred, String)>,
    /// A refresh token that tokengate keeps (issued to a cached grant, never to a caller).
    pub kept: bool,
    pub answer: UpAnswer,
}

impl PostRec {
    /// 5xx, 429 and resets spend nothing: the credential may be sent again.
    pub fn spends_nothing(&self) -> bool {
        matches!(
            self.answer,
            UpAnswer::RateLimited(_) | UpAnswer::ServerError(_) | UpAnswer::Reset
        )
    }

    /// The sender saw no answer through the upstream's doing: a reset, or a delay past
    /// `upstream.request_timeout`.
    pub fn transport_failure(&self, request_timeout: f64) -> bool {
        matches!(self.answer, UpAnswer::Reset) || self.delay >= request_timeout
    }

    pub fn outcome(&self) -> String {
        let what = match &self.answer {
            UpAnswer::Token {
                access,
                refresh,
                expires_in,
            } => format!(
                "200 at#{} rt#{} expires_in {expires_in}",
                digest(access),
                digest(refresh)
            ),
            UpAnswer::OAuth(e) => format!("400 {e}"),
            UpAnswer::RateLimited(s) => format!("429 Retry-After {s}"),
            UpAnswer::ServerError(s) => format!("{s}"),
            UpAnswer::Reset => "connection reset".into(),
            UpAnswer::Revoked => "200 revoked".into(),
        };
        let late = if self.delay >= 1.0 {
            format!(" after {:.1}s", self.delay)
        } else {
            String::new()
        };
        let abandoned = if self.abandoned {
            " (sender hung up first)"
        } else {
            ""
        };
        format!("{what}{late}{abandoned}")
    }
}

/// Why an access token ended before its expiry.
#[derive(Clone, Debug)]
pub enum EndCause {
    /// The refresh token issued with it was used.
    Refresh(String),
    /// RevokeToken reached the upstream.
    Revoke,
}

/// One access token's life at the upstream.
#[derive(Clone, Debug)]
pub struct TokenRec {
    pub birth: f64,
    /// Birth + the `expires_in` sent (infinite for the absurd values).
    pub expiry: f64,
    pub ended: Option<(f64, EndCause)>,
    pub client: String,
}

/// A fault the campaign caused, with its window.
#[derive(Clone, Debug)]
pub struct Fault {
    pub kind: FaultKind,
    pub start: f64,
    pub end: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FaultKind {
    /// SIGSTOP … SIGCONT of a replica.
    Pause(usize),
    /// SIGKILL, then a new process.
    Kill(usize),
    /// redis-server killed, then restarted (empty).
    RedisDown,
    /// Every chunk through the proxy delayed this long (s), each way.
    RedisSlow(f64),
}

impl FaultKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Pause(_) => "replica paused",
            Self::Kill(_) => "replica killed",
            Self::RedisDown => "redis down",
            Self::RedisSlow(_) => "redis slowed",
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            FaultKind::Pause(r) | FaultKind::Kill(r) => write!(
                f,
                "{} {} from {:.3} to {:.3}",
                self.kind.name(),
                replica_name(r),
                self.start,
                self.end
            ),
            FaultKind::RedisDown => {
                write!(f, "redis down from {:.3} to {:.3}", self.start, self.end)
            }
            FaultKind::RedisSlow(d) => write!(
                f,
                "redis slowed by {:.0} ms each way from {:.3} to {:.3}",
                d * 1000.0,
                self.start,
                self.end
            ),
        }
    }
}

pub fn replica_name(index: usize) -> String {
    format!("replica-{}", (b'a' + index as u8) as char)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallKind {
    Get,
    Revoke,
}

/// One caller's call and its answer.
#[derive(Clone, Debug)]
pub struct CallRec {
    pub id: usize,
    pub replica: usize,
    pub kind: CallKind,
    /// The request's subject in the schedule (`code-2`, `jwt-0`…): identical requests share it.
    pub subject: String,
    pub grant: &'static str,
    pub client: String,
    pub user: Option<String>,
    pub credential: Option<(Cred, String)>,
    /// A grant in `cache.grants` (cached and shared rather than replayed).
    pub cached: bool,
    pub rejected: Option<String>,
    /// RevokeToken's token.
    pub revoked: Option<String>,
    /// The caller's own deadline (s).
    pub deadline: f64,
    pub sent: f64,
    pub received: f64,
    pub outcome: Outcome,
}

#[derive(Clone, Debug)]
pub enum Outcome {
    Ok {
        access: String,
        refresh: String,
        /// `expires_in` in seconds.
        expires_in: f64,
        source: i32,
    },
    Err {
        code: tonic::Code,
        reason: String,
        retry: Option<f64>,
        message: String,
    },
    /// tonic's own client-side timer (the grpc-timeout header) fired at the caller's deadline.
    ClientDeadline,
    /// Nothing came back within deadline + the campaign's grace.
    NoAnswer,
}

impl Outcome {
    pub fn describe(&self) -> String {
        match self {
            Self::Ok {
                access,
                expires_in,
                source,
                ..
            } => format!(
                "OK at#{} expires_in {expires_in:.3}s source {}",
                digest(access),
                source_name(*source)
            ),
            Self::Err {
                code,
                reason,
                message,
                ..
            } => {
                let message: String = message.chars().take(160).collect();
                format!("{code:?} {reason} ({message})")
            }
            Self::ClientDeadline => "the caller's own deadline passed (client side)".into(),
            Self::NoAnswer => "no answer".into(),
        }
    }
}

pub fn source_name(source: i32) -> &'static str {
    match source {
        1 => "UPSTREAM",
        2 => "CACHE",
        3 => "COALESCED",
        4 => "REPLAYED",
        _ => "UNSPECIFIED",
    }
}

impl CallRec {
    pub fn describe(&self) -> String {
        let rejected = self
            .rejected
            .as_deref()
            .map(|t| format!(" rejected_access_token=at#{}", digest(t)))
            .unwrap_or_default();
        let credential = self
            .credential
            .as_ref()
            .map(|(k, v)| format!(" {} #{}", k.name(), digest(v)))
            .unwrap_or_default();
        let what = match self.kind {
            CallKind::Get => format!(
                "GetToken {} ({}){credential}{rejected}",
                self.subject, self.grant
            ),
            CallKind::Revoke => format!(
                "RevokeToken at#{}",
                digest(self.revoked.as_deref().unwrap_or_default())
            ),
        };
        format!(
            "call {} on {}: {what}, deadline {:.0} ms, sent {:.3}, answered {:.3}: {}",
            self.id,
            replica_name(self.replica),
            self.deadline * 1000.0,
            self.sent,
            self.received,
            self.outcome.describe()
        )
    }
}

/// The user a refresh is penalised for when no grant names one: its own session (tokengate's
/// `User::Session`), so a 429 on it holds back that refresh token only.
pub fn session_user(refresh_token: &str) -> String {
    format!("session #{}", digest(refresh_token))
}
