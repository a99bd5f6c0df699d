//! The one call that goes upstream for an identity: take the fleet's lease (or wait for its
//! holder's result), renew with the kept refresh token or run the grant, keep the result,
//! release. A credential is sent only under a lease that still holds by this replica's clock
//! (I1, I6); a failed renewal backs off and leaves the old token serving (I9, I10).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::entry::{Entry, Settled, Upkeep, renewal_backoff, served_from_cache};
use super::fleet::Fleet;
use super::flight::Landed;
use super::lease::HeldLease;
use super::lookup::refresh_alive;
use super::policy::{Freshness, Keep, OAuthKind, Outcome, Treatment, freshness};
use super::{Call, Fetch, Inner, Source};
use crate::error::Failure;
use crate::grant::{Grant, TokenRequest};
use crate::keys::{Digest, Purpose};
use crate::upstream::{Precondition, Token, UpstreamErrorKind};

/// How often a replica that waits for another replica's call looks for its result.
const FLEET_POLL: Duration = Duration::from_millis(20);
/// How many lease TTLs a waiter follows one identity's lease before it takes it for a holder
/// that never ends (a live holder's work is bounded well below this) and goes on alone.
const LONGEST_HOLD: u32 = 8;

/// How taking the fleet's lease ended.
enum Leased<S: Fleet> {
    /// Another replica's result, found under the lease or while waiting for its holder.
    Answered(Arc<Entry>),
    /// This replica holds the lease; the version and entry Redis held under it.
    Held(HeldLease<S>, u64, Option<Arc<Entry>>),
    /// This replica holds the lease, but reading under it failed.
    Unread(HeldLease<S>),
    /// Redis does not answer: this replica goes on alone.
    Alone,
}

/// What a flight's upstream work produced.
struct Fresh {
    result: Result<Token, Failure>,
    /// The upstream refused the kept refresh token (an OAuth error): it is dead.
    refresh_refused: bool,
}

impl Fresh {
    fn answered(result: Result<Token, Failure>) -> Self {
        Self {
            result,
            refresh_refused: false,
        }
    }
}

/// Whether the upstream refused a request outright (an OAuth error), as opposed to failing.
fn refused(failure: &Failure) -> bool {
    matches!(failure, Failure::Upstream { error, .. } if error.kind == UpstreamErrorKind::OAuth)
}

/// How waiting for another replica's call ended.
enum Awaited {
    /// Its result, now in Redis.
    Entry(Arc<Entry>),
    /// The lease is free (its holder released it or it ran out) with no result.
    Free,
    /// Redis stopped answering, or one holder kept the lease past any call's length.
    Alone,
}

impl<F: Fetch, S: Fleet> Inner<F, S> {
    /// The flight's work. `previous` is the entry the result replaces, if any.
    pub(super) async fn lead(
        &self,
        id: Digest,
        request: &TokenRequest,
        treatment: Treatment,
        previous: Option<Arc<Entry>>,
        deadline: Option<Instant>,
    ) -> Landed {
        let (lease, expected, renewing) = match self.take_lease(&id, treatment).await {
            Leased::Answered(entry)
                if treatment != Treatment::Cache && self.holds_revoked(&entry) =>
            {
                return Err(Failure::CredentialSpent);
            }
            Leased::Answered(entry) => return self.served(&entry, treatment, true),
            Leased::Held(lease, version, current) => {
                // Only an entry no one replaced since may spend its kept refresh token.
                let renewing = current
                    .or_else(|| previous.clone())
                    .filter(|entry| entry.version == version);
                (Some(lease), version, renewing)
            }
            // Unverified, a kept refresh token may have been spent by someone else: run the
            // grant instead.
            Leased::Unread(lease) => (
                Some(lease),
                previous.as_ref().map_or(0, |p| p.version),
                None,
            ),
            Leased::Alone => (
                None,
                previous.as_ref().map_or(0, |p| p.version),
                previous.clone(),
            ),
        };
        let held: Option<&dyn Precondition> = lease.as_ref().map(|l| l.clock() as _);
        let fresh = self
            .fetch_fresh(request, treatment, renewing.as_deref(), held, deadline)
            .await;
        let landed = self
            .settle(&id, request, treatment, previous, expected, fresh)
            .await;
        if let Some(lease) = lease {
            lease.release().await;
        }
        landed
    }

    /// Takes the fleet's lease on `id`, or waits for its holder's result.
    async fn take_lease(&self, id: &Digest, treatment: Treatment) -> Leased<S> {
        loop {
            let Some(fleet) = self.fleet().await else {
                return Leased::Alone;
            };
            let asked_at = Instant::now();
            match fleet.lease(id, self.lease_ttl).await {
                Ok(Some(lease)) => {
                    let held = HeldLease::keep(fleet.clone(), *id, lease, self.lease_ttl, asked_at);
                    // Re-checked under the lease: its last holder may have just written.
                    return match self.fleet_entry(fleet, id).await {
                        Ok((_, Some(entry))) if self.answers(&entry, treatment) => {
                            held.release().await;
                            self.keep_locally(id, entry.clone());
                            Leased::Answered(entry)
                        }
                        Ok((version, current)) => Leased::Held(held, version, current),
                        // One failed read: the lease still keeps others off while it lasts,
                        // and the write finds out whether this was the version it replaces.
                        Err(_) => Leased::Unread(held),
                    };
                }
                Ok(None) => match self.await_holder(fleet, id, treatment).await {
                    Awaited::Entry(entry) => {
                        self.keep_locally(id, entry.clone());
                        return Leased::Answered(entry);
                    }
                    Awaited::Free => {}
                    Awaited::Alone => return Leased::Alone,
                },
                Err(_) => return Leased::Alone,
            }
        }
    }

    /// Whether an entry found in Redis answers a flight's callers without a new call: fresh,
    /// and holding no token revoked or rejected here (another replica may not have dropped
    /// it yet; I7).
    fn answers(&self, entry: &Entry, treatment: Treatment) -> bool {
        match (treatment, freshness(&entry.keep, self.clock.now())) {
            (Treatment::Cache, fresh) => fresh == Freshness::Fresh && !self.holds_revoked(entry),
            // A replayed result answers even when its token was rejected here: with
            // CREDENTIAL_SPENT, never by sending its credential again (I1, I2).
            (_, fresh) => fresh != Freshness::Spent,
        }
    }

    /// Waits while another replica holds the lease, for as long as it holds it (its holder
    /// extends it while it works).
    async fn await_holder(&self, fleet: &S, id: &Digest, treatment: Treatment) -> Awaited {
        let since = Instant::now();
        loop {
            match self.fleet_entry(fleet, id).await {
                Ok((_, Some(entry))) if self.answers(&entry, treatment) => {
                    return Awaited::Entry(entry);
                }
                Ok(_) => {}
                Err(_) => return Awaited::Alone,
            }
            match fleet.leased(id).await {
                Ok(false) => return Awaited::Free,
                Ok(true) if since.elapsed() < self.lease_ttl * LONGEST_HOLD => {
                    tokio::time::sleep(FLEET_POLL).await;
                }
                Ok(true) | Err(_) => return Awaited::Alone,
            }
        }
    }

    /// A new token: renewed with the refresh token `renewing` kept when there is one, else
    /// (or when that fails) by running the request's own grant again. Says whether the
    /// upstream refused the kept refresh token.
    async fn fetch_fresh(
        &self,
        request: &TokenRequest,
        treatment: Treatment,
        renewing: Option<&Entry>,
        lease: Option<&dyn Precondition>,
        deadline: Option<Instant>,
    ) -> Fresh {
        let user = request.user();
        let call = Call {
            deadline,
            lease,
            user: user.as_deref(),
        };
        let now = self.clock.now();
        let kept = renewing.and_then(|entry| match &entry.settled {
            Settled::Token(token) if treatment == Treatment::Cache && refresh_alive(token, now) => {
                token.refresh_token.clone()
            }
            _ => None,
        });
        if let Some(refresh_token) = kept {
            let refresh = TokenRequest {
                grant: Grant::RefreshToken { refresh_token },
                client_id: request.client_id.clone(),
                client_assertion: request.client_assertion.clone(),
                scopes: Vec::new(),
                endpoint_id: request.endpoint_id.clone(),
                access_token_ttl: request.access_token_ttl,
                refresh_token_ttl: request.refresh_token_ttl,
                rejected_access_token: None,
            };
            match self.fetch.fetch(&refresh, call).await {
                Ok(token) => return Fresh::answered(Ok(token)),
                Err(failure) if lease_lost(&failure) => return Fresh::answered(Err(failure)),
                Err(failure) => {
                    tracing::info!(
                        reason = crate::error::reason(&failure),
                        "renewal with the kept refresh token failed; running the grant again"
                    );
                    if refused(&failure) {
                        return Fresh {
                            result: self.fetch.fetch(request, call).await,
                            refresh_refused: true,
                        };
                    }
                }
            }
        }
        Fresh::answered(self.fetch.fetch(request, call).await)
    }

    /// Keeps what the call produced and says what its callers get. A cached token whose
    /// renewal failed answers with the old token while that is still good, and backs off.
    async fn settle(
        &self,
        id: &Digest,
        request: &TokenRequest,
        treatment: Treatment,
        previous: Option<Arc<Entry>>,
        expected: u64,
        fresh: Fresh,
    ) -> Landed {
        let Fresh {
            result,
            refresh_refused,
        } = fresh;
        let now = self.clock.now();
        let outcome = match &result {
            Ok(token) => Outcome::Token {
                lifetime: token.expires_in.map(Duration::from_secs),
            },
            Err(Failure::Upstream { error, .. }) if error.kind == UpstreamErrorKind::OAuth => {
                Outcome::OAuth(OAuthKind::of(
                    error.oauth.as_ref().and_then(|o| o.error.as_deref()),
                ))
            }
            Err(_) => Outcome::Transient,
        };
        let keep = self.policy.keep(
            treatment,
            request.grant.kind(),
            outcome,
            now,
            previous.as_ref().and_then(|p| p.keep.interval),
            fastrand::f64(),
        );
        match result {
            Ok(token) => {
                let ends = keep.and_then(|k| k.renew_at);
                if let Some(keep) = keep {
                    self.store(id, keep, Settled::Token(token.clone()), 0, expected, true)
                        .await;
                }
                let token = served_from_cache(&token, now, treatment != Treatment::Cache, ends);
                Ok((token, Source::Upstream))
            }
            Err(failure) if lease_lost(&failure) => Err(failure),
            Err(failure) if refresh_refused => {
                // The kept refresh token is dead, and so, on RingCentral, is the token it came
                // with: its entry goes, so that no replica sends it again (I1) or serves that
                // token (I10). The next call runs the grant.
                self.drop_entry(id, expected).await;
                Err(failure)
            }
            Err(failure) => {
                if treatment == Treatment::Cache
                    && let Some(previous) = previous.filter(|p| self.still_serves(id, p, now))
                {
                    // The old token serves on until the next try, which the whole fleet reads
                    // from the entry: no replica retries on every hit (I9), and none tells a
                    // caller it lives past that try, which may end it (I10).
                    let failures = previous.failures.saturating_add(1);
                    let wait =
                        renewal_backoff(failures, self.policy.min_remaining, fastrand::f64());
                    let keep = Keep {
                        renew_at: now.checked_add(wait),
                        ..previous.keep
                    };
                    tracing::info!(
                        reason = crate::error::reason(&failure),
                        failures,
                        "renewal failed; the current token serves on until the next try"
                    );
                    let entry = self
                        .store(
                            id,
                            keep,
                            previous.settled.clone(),
                            failures,
                            expected,
                            false,
                        )
                        .await;
                    return self.served(&entry, treatment, false);
                }
                if let (
                    Some(keep),
                    Failure::Upstream {
                        error,
                        caller_credentials,
                    },
                ) = (keep, &failure)
                {
                    let refused = Settled::Refused {
                        error: error.clone(),
                        caller_credentials: *caller_credentials,
                    };
                    self.store(id, keep, refused, 0, expected, true).await;
                }
                Err(failure)
            }
        }
    }

    /// Drops the entry of `id` here and, unless another replica replaced it since
    /// `expected`, in Redis, telling the fleet.
    async fn drop_entry(&self, id: &Digest, expected: u64) {
        self.local.invalidate(id);
        if let Some(fleet) = self.fleet().await
            && let Ok(Some(version)) = fleet.delete_if(id, expected).await
        {
            self.raise_floor(id, version);
        }
    }

    /// Whether a cached token may still answer after its renewal failed: not past its
    /// serving limit, and not revoked or rejected here.
    fn still_serves(&self, id: &Digest, entry: &Entry, now: std::time::SystemTime) -> bool {
        matches!(entry.settled, Settled::Token(_))
            && now < entry.keep.serve_until
            && !self.holds_revoked(entry)
            && self
                .floors
                .get(id)
                .is_none_or(|floor| entry.version >= floor)
    }

    /// Keeps a result here and, version-checked, in Redis; tells the fleet that older
    /// entries of `id` are dead. A `fresh` result (from the upstream just now) also takes the
    /// place of an entry deleted while it was out; an old token kept on after a failed renewal
    /// does not, since what deleted it may have been that token's rejection (I7).
    async fn store(
        &self,
        id: &Digest,
        keep: Keep,
        settled: Settled,
        failures: u32,
        expected: u64,
        fresh: bool,
    ) -> Arc<Entry> {
        let mut entry = Entry {
            version: expected + 1,
            keep,
            settled,
            failures,
            upkeep: Upkeep::default(),
        };
        if let Some(fleet) = self.fleet().await {
            let sealed = self.keys.seal(Purpose::Entry, id, &entry.encode());
            let tokens: Vec<Digest> = entry
                .tokens()
                .into_iter()
                .map(|t| self.keys.token_digest(t))
                .collect();
            let mut expected = expected;
            // Twice at most: a rejection or revocation may have deleted the entry this result
            // replaces while the call was out; then nothing newer stands, and this result
            // (fresh, so neither revoked nor rejected) belongs there.
            for _ in 0..2 {
                match fleet.put(id, expected, &sealed, keep.ttl, &tokens).await {
                    Ok(true) => {
                        entry.version = expected + 1;
                        if expected > 0 {
                            let _ = fleet.invalidate(id, entry.version).await;
                        }
                        break;
                    }
                    Ok(false) => match fleet.get(id).await {
                        Ok((version, None)) if fresh && version > expected => expected = version,
                        // Someone wrote a newer result; theirs stands, and ours is not kept
                        // here either.
                        _ => {
                            self.local.invalidate(id);
                            return Arc::new(entry);
                        }
                    },
                    Err(_) => break,
                }
            }
        }
        let entry = Arc::new(entry);
        self.keep_locally(id, entry.clone());
        entry
    }
}

/// The call was not sent because its lease ran out first.
fn lease_lost(failure: &Failure) -> bool {
    matches!(failure, Failure::Upstream { error, .. } if error.kind == UpstreamErrorKind::LeaseLost)
}
