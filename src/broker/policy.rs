//! What the broker does with a request and with its result: pure decisions, no I/O, no
//! clock of their own (the time is passed in), so every rule is unit-tested per grant.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use crate::config::CacheConfig;
use crate::grant::GrantKind;

/// The longest a token is kept, whatever `expires_in` the upstream announces.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// RFC 8628's default polling interval, and what each `slow_down` adds to it.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// How the broker treats identical requests of one grant for one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Treatment {
    /// Every call goes upstream as it comes (a client with `cache = false`).
    PassThrough,
    /// Cached and shared while the token lasts; renewed ahead of expiry.
    Cache,
    /// Coalesced, and the definitive result replayed within `replay_window`.
    Replay,
}

/// The broker's settings, taken from `[cache]`.
#[derive(Clone, Debug)]
pub struct Policy {
    pub grants: BTreeSet<GrantKind>,
    pub refresh_ahead: Duration,
    pub min_remaining: Duration,
    pub replay_window: Duration,
}

impl From<&CacheConfig> for Policy {
    fn from(config: &CacheConfig) -> Self {
        Self {
            grants: config.grants.clone(),
            refresh_ahead: config.refresh_ahead,
            min_remaining: config.min_remaining,
            replay_window: config.replay_window,
        }
    }
}

/// What a finished upstream call produced, as far as keeping it is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A token that lives this long (`None`: the upstream did not say).
    Token { lifetime: Option<Duration> },
    /// A definitive OAuth error from the upstream, by its `error` value.
    OAuth(OAuthKind),
    /// Anything else: transport failures, timeouts, 5xx, 429, bad bodies, deadlines.
    Transient,
}

/// The OAuth errors the policy tells apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OAuthKind {
    AuthorizationPending,
    SlowDown,
    Other,
}

impl OAuthKind {
    pub fn of(error: Option<&str>) -> Self {
        match error {
            Some("authorization_pending") => Self::AuthorizationPending,
            Some("slow_down") => Self::SlowDown,
            _ => Self::Other,
        }
    }
}

/// How long a result answers identical requests, and how long it is kept (a cached token
/// is kept to its expiry; a device-flow answer is kept past its interval so the next one
/// knows the interval it raised).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep {
    /// Served to identical requests until then.
    pub serve_until: SystemTime,
    /// A cached token starts its renewal from then on.
    pub renew_at: Option<SystemTime>,
    /// The device flow's polling interval now in force.
    pub interval: Option<Duration>,
    /// How long the store keeps the entry.
    pub ttl: Duration,
}

impl Policy {
    /// The treatment of `grant` for a client whose `cache` setting is `client_caches`.
    pub fn treatment(&self, grant: GrantKind, client_caches: bool) -> Treatment {
        if !client_caches {
            Treatment::PassThrough
        } else if self.grants.contains(&grant) {
            Treatment::Cache
        } else {
            Treatment::Replay
        }
    }

    /// Whether and how a result is kept. `previous_interval` is the device-flow interval of
    /// the entry this result replaces; `jitter` in [0, 1) spreads renewals across a fleet.
    pub fn keep(
        &self,
        treatment: Treatment,
        grant: GrantKind,
        outcome: Outcome,
        now: SystemTime,
        previous_interval: Option<Duration>,
        jitter: f64,
    ) -> Option<Keep> {
        let replay = |ttl: Duration| Keep {
            serve_until: now + ttl,
            renew_at: None,
            interval: None,
            ttl,
        };
        match (treatment, outcome) {
            (Treatment::PassThrough, _) | (_, Outcome::Transient) => None,
            (Treatment::Cache, Outcome::Token { lifetime }) => {
                let lifetime = lifetime?.min(MAX_LIFETIME);
                let (ahead, min_remaining) = self.margins(lifetime);
                if lifetime <= min_remaining {
                    return None;
                }
                // Up to a tenth earlier, so that replicas and keys do not renew in step.
                let ahead = ahead
                    .mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 10.0)
                    .min(lifetime);
                let expires = now + lifetime;
                Some(Keep {
                    serve_until: expires - min_remaining,
                    renew_at: Some(expires - ahead),
                    interval: None,
                    ttl: lifetime,
                })
            }
            // A cached grant's errors are shared by the calls in flight, not replayed.
            (Treatment::Cache, Outcome::OAuth(_)) => None,
            (Treatment::Replay, Outcome::OAuth(kind))
                if grant == GrantKind::DeviceCode && kind != OAuthKind::Other =>
            {
                let interval = match (kind, previous_interval) {
                    (OAuthKind::SlowDown, Some(previous)) => previous + POLL_INTERVAL,
                    (OAuthKind::SlowDown, None) => POLL_INTERVAL * 2,
                    (_, previous) => previous.unwrap_or(POLL_INTERVAL),
                };
                Some(Keep {
                    serve_until: now + interval,
                    renew_at: None,
                    interval: Some(interval),
                    ttl: (interval * 2).max(self.replay_window),
                })
            }
            (Treatment::Replay, Outcome::Token { .. } | Outcome::OAuth(_)) => {
                Some(replay(self.replay_window))
            }
        }
    }

    /// `refresh_ahead` and `min_remaining` for a token of this lifetime: a token shorter
    /// than the configured margins is renewed at half its life and served to its last
    /// quarter, so it is still cached at all.
    pub fn margins(&self, lifetime: Duration) -> (Duration, Duration) {
        (
            self.refresh_ahead.min(lifetime / 2),
            self.min_remaining.min(lifetime / 4),
        )
    }
}

/// Whether a grant's credential works once (contract §8.1 I1): its flight goes on until its
/// result is kept, whatever the deadlines of the callers waiting for it.
pub fn spends_credential(grant: GrantKind) -> bool {
    matches!(
        grant,
        GrantKind::AuthorizationCode | GrantKind::RefreshToken | GrantKind::Otp | GrantKind::IvrPin
    )
}

/// Whether a kept entry may answer now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freshness {
    /// Answer from the entry.
    Fresh,
    /// Answer from the entry, and start one renewal.
    Renew,
    /// Do not answer from it: go upstream (or join the call that does).
    Spent,
}

/// Where `now` falls in an entry's life.
pub fn freshness(keep: &Keep, now: SystemTime) -> Freshness {
    if now >= keep.serve_until {
        Freshness::Spent
    } else if keep.renew_at.is_some_and(|at| now >= at) {
        Freshness::Renew
    } else {
        Freshness::Fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [GrantKind; 12] = GrantKind::ALL;

    fn policy() -> Policy {
        Policy::from(&CacheConfig::default())
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn the_default_grants_are_cached_and_every_other_is_replayed() {
        let policy = policy();
        for grant in ALL {
            let expected = match grant {
                GrantKind::ClientCredentials
                | GrantKind::JwtBearer
                | GrantKind::PartnerJwt
                | GrantKind::PersonalJwt
                | GrantKind::DeviceCertificate => Treatment::Cache,
                _ => Treatment::Replay,
            };
            assert_eq!(policy.treatment(grant, true), expected, "{grant}");
            assert_eq!(policy.treatment(grant, false), Treatment::PassThrough);
        }
    }

    #[test]
    fn one_time_credentials_are_never_cached_whatever_they_return() {
        let policy = policy();
        for grant in [
            GrantKind::AuthorizationCode,
            GrantKind::Otp,
            GrantKind::IvrPin,
            GrantKind::RefreshToken,
            GrantKind::DeviceCode,
            GrantKind::Password,
        ] {
            let treatment = policy.treatment(grant, true);
            let keep = policy
                .keep(
                    treatment,
                    grant,
                    Outcome::Token {
                        lifetime: Some(HOUR),
                    },
                    t0(),
                    None,
                    0.0,
                )
                .expect("a token is replayed");
            assert_eq!(keep.serve_until, t0() + policy.replay_window, "{grant}");
            assert_eq!(keep.renew_at, None, "{grant} is never renewed");
        }
    }

    #[test]
    fn transient_failures_are_never_kept_and_pass_through_keeps_nothing() {
        let policy = policy();
        for grant in ALL {
            for treatment in [Treatment::Cache, Treatment::Replay, Treatment::PassThrough] {
                assert_eq!(
                    policy.keep(treatment, grant, Outcome::Transient, t0(), None, 0.5),
                    None
                );
            }
            let token = Outcome::Token {
                lifetime: Some(HOUR),
            };
            assert_eq!(
                policy.keep(Treatment::PassThrough, grant, token, t0(), None, 0.5),
                None
            );
        }
    }

    #[test]
    fn a_cached_token_is_served_until_min_remaining_and_renewed_ahead_with_jitter() {
        let policy = policy();
        let token = Outcome::Token {
            lifetime: Some(HOUR),
        };
        let grant = GrantKind::JwtBearer;
        let keep = policy
            .keep(Treatment::Cache, grant, token, t0(), None, 0.0)
            .unwrap();
        assert_eq!(keep.serve_until, t0() + HOUR - Duration::from_secs(60));
        assert_eq!(keep.renew_at, Some(t0() + HOUR - Duration::from_secs(300)));
        assert_eq!(keep.ttl, HOUR);
        let late = policy
            .keep(Treatment::Cache, grant, token, t0(), None, 0.99)
            .unwrap();
        assert!(late.renew_at < keep.renew_at, "jitter renews earlier");
        assert!(late.renew_at.unwrap() >= t0() + HOUR - Duration::from_secs(330));

        assert_eq!(freshness(&keep, t0()), Freshness::Fresh);
        assert_eq!(
            freshness(&keep, t0() + HOUR - Duration::from_secs(299)),
            Freshness::Renew
        );
        assert_eq!(
            freshness(&keep, t0() + HOUR - Duration::from_secs(60)),
            Freshness::Spent
        );
    }

    #[test]
    fn a_short_token_is_still_cached_and_a_huge_one_is_capped() {
        let policy = policy();
        let grant = GrantKind::ClientCredentials;
        let short = Outcome::Token {
            lifetime: Some(Duration::from_secs(20)),
        };
        let keep = policy
            .keep(Treatment::Cache, grant, short, t0(), None, 0.0)
            .unwrap();
        assert_eq!(keep.renew_at, Some(t0() + Duration::from_secs(10)));
        assert_eq!(keep.serve_until, t0() + Duration::from_secs(15));
        let huge = Outcome::Token {
            lifetime: Some(Duration::from_secs(u64::MAX / 4)),
        };
        let keep = policy
            .keep(Treatment::Cache, grant, huge, t0(), None, 0.0)
            .unwrap();
        assert_eq!(keep.ttl, MAX_LIFETIME);
        let unknown = Outcome::Token { lifetime: None };
        assert_eq!(
            policy.keep(Treatment::Cache, grant, unknown, t0(), None, 0.0),
            None
        );
        let zero = Outcome::Token {
            lifetime: Some(Duration::ZERO),
        };
        assert_eq!(
            policy.keep(Treatment::Cache, grant, zero, t0(), None, 0.0),
            None
        );
    }

    #[test]
    fn oauth_errors_are_replayed_for_replayed_grants_only() {
        let policy = policy();
        let error = Outcome::OAuth(OAuthKind::Other);
        let keep = policy
            .keep(
                Treatment::Replay,
                GrantKind::Password,
                error,
                t0(),
                None,
                0.0,
            )
            .expect("a wrong password is replayed, not retried into a lockout");
        assert_eq!(keep.serve_until, t0() + policy.replay_window);
        assert_eq!(
            policy.keep(
                Treatment::Cache,
                GrantKind::JwtBearer,
                error,
                t0(),
                None,
                0.0
            ),
            None
        );
    }

    #[test]
    fn device_polling_is_replayed_for_the_interval_which_slow_down_raises() {
        let policy = policy();
        let grant = GrantKind::DeviceCode;
        let pending = Outcome::OAuth(OAuthKind::AuthorizationPending);
        let slow = Outcome::OAuth(OAuthKind::SlowDown);
        let keep = |outcome, previous| {
            policy
                .keep(Treatment::Replay, grant, outcome, t0(), previous, 0.0)
                .unwrap()
        };
        let first = keep(pending, None);
        assert_eq!(first.serve_until, t0() + POLL_INTERVAL);
        let slowed = keep(slow, first.interval);
        assert_eq!(slowed.interval, Some(Duration::from_secs(10)));
        let slowed_again = keep(slow, slowed.interval);
        assert_eq!(slowed_again.serve_until, t0() + Duration::from_secs(15));
        assert_eq!(
            keep(pending, slowed_again.interval).interval,
            Some(Duration::from_secs(15))
        );
        assert!(slowed_again.ttl >= Duration::from_secs(30));
        // Elsewhere these errors are ordinary OAuth errors.
        let other = policy
            .keep(
                Treatment::Replay,
                GrantKind::Password,
                slow,
                t0(),
                None,
                0.0,
            )
            .unwrap();
        assert_eq!(other.interval, None);
    }
}
