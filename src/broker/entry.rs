//! What the broker keeps for one identity: a settled result and how long it may answer.
//! The stored form is JSON, sealed by [`crate::keys::Keys`] before it leaves the process.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret as _, SecretString};
use serde::{Deserialize, Serialize};

use super::policy::Keep;
use crate::upstream::{OAuthError, Token, UpstreamError, UpstreamErrorKind};

/// A definitive result of one upstream call.
#[derive(Clone, Debug)]
pub enum Settled {
    Token(Token),
    /// An OAuth error from the upstream; `caller_credentials` as in [`crate::error::Failure`].
    Refused {
        error: UpstreamError,
        caller_credentials: bool,
    },
    /// A one-time credential's token that the resource server rejected: the credential is
    /// spent and the token is not handed out again (contract §8.1 I2).
    Spent,
}

/// One kept result.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The store's version of this identity's entry; a write names the version it replaces.
    pub version: u64,
    pub keep: Keep,
    pub settled: Settled,
    /// Renewals that failed in a row since this token was fetched; its `keep.renew_at` is
    /// then the next try, for the whole fleet (I9).
    pub failures: u32,
    /// This replica's bookkeeping for the entry; never stored.
    pub upkeep: Upkeep,
}

/// What one replica remembers about a cached entry while it serves it: whether its renewal
/// at the planned point is scheduled (contract §8.1 I10).
#[derive(Debug, Default)]
pub struct Upkeep {
    scheduled: AtomicBool,
}

/// First wait after a failed renewal; it doubles per failure, jittered, up to `min_remaining`.
const RENEWAL_BACKOFF: Duration = Duration::from_secs(1);

impl Clone for Upkeep {
    /// A copy is a new entry as far as upkeep goes.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl Upkeep {
    /// True the first time it is asked: the caller schedules the entry's renewal.
    pub fn schedule_once(&self) -> bool {
        !self.scheduled.swap(true, Ordering::AcqRel)
    }
}

/// How long to wait after the `failures`-th failed renewal in a row: doubling from 1 s,
/// capped at `cap`, half of it random so a fleet does not retry in step (I9).
pub fn renewal_backoff(failures: u32, cap: Duration, jitter: f64) -> Duration {
    let doubled = RENEWAL_BACKOFF.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let ceiling = doubled.min(cap).max(Duration::from_millis(1));
    ceiling.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
}

impl Entry {
    /// The access and refresh tokens the entry holds, to find it by either.
    pub fn tokens(&self) -> Vec<&str> {
        match &self.settled {
            Settled::Token(token) => [&token.access_token, &token.refresh_token]
                .into_iter()
                .flatten()
                .map(|s| s.expose_secret())
                .collect(),
            Settled::Refused { .. } | Settled::Spent => Vec::new(),
        }
    }

    /// The access token the entry holds, if it holds a token.
    pub fn access_token(&self) -> Option<&str> {
        match &self.settled {
            Settled::Token(token) => token.access_token.as_ref().map(|a| a.expose_secret()),
            Settled::Refused { .. } | Settled::Spent => None,
        }
    }

    /// The refresh token a renewal of this cached entry would spend, if any.
    pub fn refresh_token(&self) -> Option<&SecretString> {
        match &self.settled {
            Settled::Token(token) => token.refresh_token.as_ref(),
            Settled::Refused { .. } | Settled::Spent => None,
        }
    }

    /// Whether the entry's access token is `token`.
    pub fn holds_access_token(&self, token: &str) -> bool {
        self.access_token() == Some(token)
    }

    /// The JSON that is sealed for the store.
    pub fn encode(&self) -> Vec<u8> {
        let wire = Wire {
            serve_until: millis(self.keep.serve_until),
            renew_at: self.keep.renew_at.map(millis),
            interval_ms: self.keep.interval.map(|d| d.as_millis() as u64),
            ttl_ms: self.keep.ttl.as_millis() as u64,
            failures: self.failures,
            settled: match &self.settled {
                Settled::Token(token) => WireSettled::Token(WireToken::from(token)),
                Settled::Refused {
                    error,
                    caller_credentials,
                } => WireSettled::Refused {
                    http_status: error.http_status,
                    request_id: error.request_id.clone(),
                    retry_after_ms: error.retry_after.map(|d| d.as_millis() as u64),
                    error: error.oauth.as_ref().and_then(|o| o.error.clone()),
                    description: error.oauth.as_ref().and_then(|o| o.description.clone()),
                    error_code: error.oauth.as_ref().and_then(|o| o.error_code.clone()),
                    caller_credentials: *caller_credentials,
                },
                Settled::Spent => WireSettled::Spent,
            },
        };
        serde_json::to_vec(&wire).expect("an entry always encodes")
    }

    /// Reads what [`Entry::encode`] wrote; `None` for anything else.
    pub fn decode(version: u64, bytes: &[u8]) -> Option<Self> {
        let wire: Wire = serde_json::from_slice(bytes).ok()?;
        let settled = match wire.settled {
            WireSettled::Token(token) => Settled::Token(token.into()),
            WireSettled::Refused {
                http_status,
                request_id,
                retry_after_ms,
                error,
                description,
                error_code,
                caller_credentials,
            } => Settled::Refused {
                error: UpstreamError {
                    kind: UpstreamErrorKind::OAuth,
                    http_status,
                    request_id,
                    retry_after: retry_after_ms.map(Duration::from_millis),
                    oauth: Some(Box::new(OAuthError {
                        error,
                        description,
                        error_code,
                    })),
                    not_sent: false,
                },
                caller_credentials,
            },
            WireSettled::Spent => Settled::Spent,
        };
        Some(Self {
            version,
            keep: Keep {
                serve_until: time(wire.serve_until)?,
                renew_at: match wire.renew_at {
                    Some(at) => Some(time(at)?),
                    None => None,
                },
                interval: wire.interval_ms.map(Duration::from_millis),
                ttl: Duration::from_millis(wire.ttl_ms),
            },
            settled,
            failures: wire.failures,
            upkeep: Upkeep::default(),
        })
    }
}

fn millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn time(ms: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

#[derive(Serialize, Deserialize)]
struct Wire {
    serve_until: u64,
    renew_at: Option<u64>,
    interval_ms: Option<u64>,
    ttl_ms: u64,
    #[serde(default)]
    failures: u32,
    settled: WireSettled,
}

#[derive(Serialize, Deserialize)]
enum WireSettled {
    Token(WireToken),
    Refused {
        http_status: Option<u16>,
        request_id: Option<String>,
        retry_after_ms: Option<u64>,
        error: Option<String>,
        description: Option<String>,
        error_code: Option<String>,
        caller_credentials: bool,
    },
    Spent,
}

/// [`Token`] with its secrets exposed: it exists only inside a sealed value.
#[derive(Serialize, Deserialize)]
struct WireToken {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<u64>,
    refresh_token: Option<String>,
    refresh_token_expires_in: Option<u64>,
    scope: Option<String>,
    owner_id: Option<String>,
    endpoint_id: Option<String>,
    session_id: Option<String>,
    id_token: Option<String>,
    session_expires_in: Option<u64>,
    session_expiration_time: Option<String>,
    session_idle_timeout: Option<u64>,
    /// Stored under its old name: entries already in Redis stay readable across an upgrade.
    #[serde(rename = "received_at")]
    counted_from: u64,
}

fn exposed(secret: &Option<SecretString>) -> Option<String> {
    secret.as_ref().map(|s| s.expose_secret().to_owned())
}

impl From<&Token> for WireToken {
    fn from(t: &Token) -> Self {
        Self {
            access_token: exposed(&t.access_token),
            token_type: t.token_type.clone(),
            expires_in: t.expires_in,
            refresh_token: exposed(&t.refresh_token),
            refresh_token_expires_in: t.refresh_token_expires_in,
            scope: t.scope.clone(),
            owner_id: t.owner_id.clone(),
            endpoint_id: t.endpoint_id.clone(),
            session_id: t.session_id.clone(),
            id_token: exposed(&t.id_token),
            session_expires_in: t.session_expires_in,
            session_expiration_time: t.session_expiration_time.clone(),
            session_idle_timeout: t.session_idle_timeout,
            counted_from: millis(t.counted_from),
        }
    }
}

impl From<WireToken> for Token {
    fn from(t: WireToken) -> Self {
        Self {
            access_token: t.access_token.map(SecretString::from),
            token_type: t.token_type,
            expires_in: t.expires_in,
            refresh_token: t.refresh_token.map(SecretString::from),
            refresh_token_expires_in: t.refresh_token_expires_in,
            scope: t.scope,
            owner_id: t.owner_id,
            endpoint_id: t.endpoint_id,
            session_id: t.session_id,
            id_token: t.id_token.map(SecretString::from),
            session_expires_in: t.session_expires_in,
            session_expiration_time: t.session_expiration_time,
            session_idle_timeout: t.session_idle_timeout,
            counted_from: time(t.counted_from).unwrap_or(UNIX_EPOCH),
            upstream_status: None,
        }
    }
}

/// The token as a kept entry hands it out at `now`: the remaining lifetime up to its upstream
/// expiry or `ends`, whichever is first (a cached token's planned renewal, which may end it:
/// contract §8.1 I10), and, unless `keep_refresh` (a replayed one-time grant, whose caller
/// needs the new refresh token), no refresh token: a refresh by one caller would kill the
/// token that the others share.
pub fn served_from_cache(
    token: &Token,
    now: SystemTime,
    keep_refresh: bool,
    ends: Option<SystemTime>,
) -> Token {
    let elapsed = now.duration_since(token.counted_from).unwrap_or_default();
    let until_ends = ends.map(|at| at.duration_since(now).unwrap_or_default());
    let remaining = match (
        token
            .expires_in
            .map(|secs| Duration::from_secs(secs).saturating_sub(elapsed)),
        until_ends,
    ) {
        (Some(upstream), Some(planned)) => Some(upstream.min(planned)),
        (upstream, planned) => upstream.or(planned),
    }
    // Whatever the upstream announced, no lifetime beyond what the broker keeps (I3).
    .map(|r| r.min(super::policy::MAX_LIFETIME));
    // The nearest whole second, from a counted_from chosen so that expires_at stays
    // exact (a token fresh from the upstream keeps the `expires_in` it came with).
    let expires_in = remaining.map(|r| (r.as_millis() as u64).saturating_add(500) / 1000);
    let counted_from = match (remaining, expires_in) {
        (Some(r), Some(secs)) => now
            .checked_add(r)
            .and_then(|end| end.checked_sub(Duration::from_secs(secs)))
            .unwrap_or(now),
        _ => now,
    };
    let (refresh_token, refresh_token_expires_in) = if keep_refresh {
        let left = token
            .refresh_token_expires_in
            .map(|secs| secs.saturating_sub(elapsed.as_secs()));
        (token.refresh_token.clone(), left)
    } else {
        (None, None)
    };
    Token {
        expires_in,
        refresh_token,
        refresh_token_expires_in,
        session_expires_in: token
            .session_expires_in
            .map(|secs| secs.saturating_sub(elapsed.as_secs())),
        counted_from,
        ..token.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(now: SystemTime) -> Token {
        serde_json::from_value::<Token>(serde_json::json!({
            "access_token": "at-1", "token_type": "bearer", "expires_in": 3600,
            "refresh_token": "rt-1", "refresh_token_expires_in": 604800,
            "scope": "A B", "owner_id": "42", "session_expires_in": 7200,
        }))
        .map(|t| Token {
            counted_from: now,
            ..t
        })
        .unwrap()
    }

    fn keep(now: SystemTime) -> Keep {
        Keep {
            serve_until: now + Duration::from_secs(3540),
            renew_at: Some(now + Duration::from_secs(3300)),
            interval: None,
            ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn an_entry_survives_encoding_to_the_millisecond() {
        let now = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        let entry = Entry {
            version: 3,
            keep: keep(now),
            settled: Settled::Token(token(now)),
            failures: 0,
            upkeep: Upkeep::default(),
        };
        let back = Entry::decode(3, &entry.encode()).unwrap();
        assert_eq!(back.keep, entry.keep);
        let Settled::Token(t) = back.settled else {
            panic!("a token")
        };
        assert_eq!(t.counted_from, now);
        assert_eq!(t.refresh_token.unwrap().expose_secret(), "rt-1");
        assert_eq!(back.version, 3);
        assert!(Entry::decode(0, b"{}").is_none());
        assert!(Entry::decode(0, b"\xff").is_none());
    }

    #[test]
    fn a_refusal_survives_encoding() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let entry = Entry {
            version: 1,
            keep: keep(now),
            settled: Settled::Refused {
                error: UpstreamError {
                    kind: UpstreamErrorKind::OAuth,
                    http_status: Some(400),
                    request_id: Some("rc-1".into()),
                    retry_after: None,
                    oauth: Some(Box::new(OAuthError {
                        error: Some("invalid_grant".into()),
                        description: Some("bad".into()),
                        error_code: Some("OAU-140".into()),
                    })),
                    not_sent: false,
                },
                caller_credentials: true,
            },
            failures: 0,
            upkeep: Upkeep::default(),
        };
        let back = Entry::decode(1, &entry.encode()).unwrap();
        let Settled::Refused {
            error,
            caller_credentials,
        } = back.settled
        else {
            panic!("a refusal")
        };
        assert!(caller_credentials);
        assert_eq!(error.kind, UpstreamErrorKind::OAuth);
        assert_eq!(error.http_status, Some(400));
        assert_eq!(error.oauth.unwrap().error_code.as_deref(), Some("OAU-140"));
    }

    #[test]
    fn a_hit_carries_the_true_remaining_lifetime_and_no_refresh_token() {
        let received = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let now = received + Duration::from_millis(100_600);
        let served = served_from_cache(&token(received), now, false, None);
        assert_eq!(served.expires_in, Some(3499), "3499.4 s left");
        assert_eq!(
            served.counted_from + Duration::from_secs(3499),
            received + Duration::from_secs(3600),
            "expires_at is unchanged"
        );
        assert!(served.refresh_token.is_none());
        assert!(served.refresh_token_expires_in.is_none());
        assert_eq!(served.session_expires_in, Some(7100));
        assert_eq!(served.access_token.unwrap().expose_secret(), "at-1");
        let replayed = served_from_cache(&token(received), now, true, None);
        assert_eq!(replayed.refresh_token.unwrap().expose_secret(), "rt-1");
        assert_eq!(replayed.refresh_token_expires_in, Some(604800 - 100));
        let fresh = served_from_cache(
            &token(received),
            received + Duration::from_millis(3),
            false,
            None,
        );
        assert_eq!(
            fresh.expires_in,
            Some(3600),
            "an answer fresh from the upstream keeps its lifetime"
        );
    }
}
