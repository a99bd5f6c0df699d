//! The token broker (contract §8): between a validated request and the upstream call, it
//! decides once per request whether to answer from the cache, join an identical call in
//! flight, replay a recent result, or go upstream, and keeps what it learns. Its promises
//! are contract §8.1's invariants; each lives in one place:
//!
//! - [`policy`]: the pure rules per grant; [`identity`]: which requests are identical.
//! - [`entry`]: what is kept, and how a kept token is served (I3, I10).
//! - [`lookup`]: what is kept for a request and whether it answers (I2, I7, I10).
//! - [`flight`]: single-flight per identity on one replica (I5).
//! - [`leader`]: the one call that goes upstream: the fleet lease, renewal, keeping (I1, I9).
//! - [`lease`]: a fleet lease that covers its holder's whole work (I6).
//! - [`fleet`] and [`redis`]: the state a fleet shares. HMAC identities and sealing are
//!   [`crate::keys`]'s, the upstream's 429 penalties [`crate::rate_limit`]'s (I4).
//!
//! With Redis, a fleet-wide lease makes one replica call while the others wait for its
//! result; entries and notices carry versions, so nothing invalidated comes back.

pub mod entry;
pub mod fleet;
pub mod flight;
pub mod identity;
pub mod leader;
pub mod lease;
pub mod lookup;
#[cfg(test)]
pub mod memory_fleet;
#[cfg(test)]
mod model;
pub mod policy;
pub mod redis;

use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::Instrument as _;

use self::entry::{Entry, Settled, served_from_cache};
use self::fleet::Fleet;
use self::flight::{FlightResult, Flights, Joined, Landed};
use self::lookup::CacheLookup;
use self::policy::{Policy, Treatment};
use self::redis::{Notice, RedisStore};
use crate::config::CacheConfig;
use crate::error::Failure;
use crate::grant::TokenRequest;
use crate::keys::{Digest, Keys};
use crate::metrics::{Lookup, Metrics};
use crate::rate_limit::RateLimitGuard;
use crate::upstream::{Precondition, Token, UpstreamErrorKind};

/// How many times a call starts over after the flight it joined ended in nothing it can use
/// (its lease ran out before it sent, its task vanished, it was cut short by a shorter
/// deadline, or it answered a token this call rejects). Each round waits for a flight, so
/// this bounds a call's work, not its time; its own deadline bounds that.
const MAX_ROUNDS: usize = 16;

/// The upstream call the broker wraps: client authentication, admission, the rate-limit
/// guard and the POST itself.
pub trait Fetch: Send + Sync + 'static {
    fn fetch(
        &self,
        request: &TokenRequest,
        call: Call<'_>,
    ) -> impl Future<Output = Result<Token, Failure>> + Send;
}

/// What bounds one upstream call besides the request itself.
#[derive(Clone, Copy, Default)]
pub struct Call<'a> {
    /// The latest the call may end (a caller's deadline); `None`: `request_timeout` alone.
    pub deadline: Option<Instant>,
    /// The fleet lease the call is made under: no attempt is sent once it has run out.
    pub lease: Option<&'a dyn Precondition>,
    /// The user a 429 penalises when the request itself does not name one (a renewal
    /// with a kept refresh token is for the user of the grant that got it).
    pub user: Option<&'a str>,
}

/// A flight joined or started: where its result arrives, whether this call started it, and
/// the deadline that bounds it.
type Flying = (
    tokio::sync::watch::Receiver<Option<Landed>>,
    bool,
    Option<Instant>,
);

/// Wall-clock time, a seam so tests can drive expiry and renewal.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Debug)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Where an answer came from (`GetTokenResponse.source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Upstream,
    Cache,
    Coalesced,
    Replayed,
}

impl Source {
    /// The `source` label of `tokengate_token_requests_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Upstream => "upstream",
            Self::Cache => "cache",
            Self::Coalesced => "coalesced",
            Self::Replayed => "replayed",
        }
    }
}

/// What one request asks of the broker.
pub struct Ask {
    pub request: TokenRequest,
    /// The client the request resolved to (the default client included).
    pub client_id: Option<String>,
    /// The client's `cache` setting.
    pub caches: bool,
    pub deadline: Option<Instant>,
}

pub struct Broker<F, S = RedisStore> {
    inner: Arc<Inner<F, S>>,
}

impl<F, S> Clone for Broker<F, S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<F, S> std::fmt::Debug for Broker<F, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("policy", &self.inner.policy)
            .field("fleet", &self.inner.fleet.is_some())
            .finish_non_exhaustive()
    }
}

/// A [`Broker`] that may have gone: see [`Broker::downgrade`].
pub struct WeakBroker<F, S = RedisStore>(Weak<Inner<F, S>>);

impl<F, S> WeakBroker<F, S> {
    pub fn upgrade(&self) -> Option<Broker<F, S>> {
        self.0.upgrade().map(|inner| Broker { inner })
    }
}

/// What the broker's parts share.
pub(crate) struct Inner<F, S> {
    fetch: F,
    policy: Policy,
    /// `upstream.refresh_ends_access_token`: calls inside a renewal window wait for it.
    refresh_ends_access_token: bool,
    keys: Arc<Keys>,
    clock: Arc<dyn Clock>,
    token_url: String,
    local: moka::sync::Cache<Digest, Arc<Entry>>,
    /// Token digest → the identity whose entry holds it, for revocation.
    by_token: moka::sync::Cache<Digest, Digest>,
    /// Identity → the version below which its entries are dead (from notices and deletes).
    floors: moka::sync::Cache<Digest, u64>,
    /// Digests of tokens revoked or rejected through this replica: never served again.
    revoked: moka::sync::Cache<Digest, ()>,
    /// Whether `revoked` ever held anything (a hit checks it only then).
    any_revoked: std::sync::atomic::AtomicBool,
    /// Token digests revoked while Redis was down: applied there before it is read again.
    pending_revocations: Mutex<Vec<Digest>>,
    flights: Flights,
    fleet: Option<S>,
    /// A fleet lease's TTL; it is extended while its holder works.
    lease_ttl: Duration,
    /// Counts lookups by result.
    metrics: Arc<Metrics>,
}

/// Expires each local entry when the store would.
struct EntryExpiry;

impl moka::Expiry<Digest, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &Digest,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.keep.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &Digest,
        value: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep.ttl)
    }
}

/// The parts the broker is built from.
pub struct Parts<F, S = RedisStore> {
    pub fetch: F,
    pub keys: Arc<Keys>,
    pub clock: Arc<dyn Clock>,
    pub token_url: String,
    /// The longest one upstream call may take (`upstream.request_timeout`).
    pub request_timeout: Duration,
    /// `upstream.refresh_ends_access_token`.
    pub refresh_ends_access_token: bool,
    /// The fleet's store, when `backend = "redis"`, with the notices it receives.
    pub fleet: Option<(S, tokio::sync::mpsc::UnboundedReceiver<Notice>)>,
    /// The guard that fleet penalties are applied to.
    pub guard: Arc<RateLimitGuard>,
    /// Where lookups are counted (`tokengate_cache_lookups_total`).
    pub metrics: Arc<Metrics>,
}

impl<F: Fetch, S: Fleet> Broker<F, S> {
    pub fn new(config: &CacheConfig, parts: Parts<F, S>) -> Self {
        let local = moka::sync::Cache::builder()
            .max_capacity(config.max_entries)
            .expire_after(EntryExpiry)
            .build();
        let by_token = moka::sync::Cache::builder()
            .max_capacity(config.max_entries.saturating_mul(2))
            .time_to_live(policy::MAX_LIFETIME)
            .build();
        let floors = moka::sync::Cache::builder()
            .max_capacity(config.max_entries)
            .time_to_live(redis::VERSION_TTL)
            .build();
        let revoked = moka::sync::Cache::builder()
            .max_capacity(config.max_entries)
            .time_to_live(policy::MAX_LIFETIME)
            .build();
        let (fleet, notices) = match parts.fleet {
            Some((store, notices)) => (Some(store), Some(notices)),
            None => (None, None),
        };
        let broker = Self {
            inner: Arc::new(Inner {
                fetch: parts.fetch,
                policy: Policy::from(config),
                refresh_ends_access_token: parts.refresh_ends_access_token,
                keys: parts.keys,
                clock: parts.clock,
                token_url: parts.token_url,
                local,
                by_token,
                floors,
                revoked,
                any_revoked: std::sync::atomic::AtomicBool::new(false),
                pending_revocations: Mutex::default(),
                flights: Flights::default(),
                fleet,
                lease_ttl: parts.request_timeout + Duration::from_secs(1),
                metrics: parts.metrics,
            }),
        };
        if let Some(notices) = notices {
            tokio::spawn(listen(
                Arc::downgrade(&broker.inner),
                Arc::downgrade(&parts.guard),
                notices,
            ));
        }
        broker
    }

    /// A handle that does not keep the broker alive (for metrics gauges, which the broker's
    /// own `Metrics` holds: a strong one would be a cycle).
    pub fn downgrade(&self) -> WeakBroker<F, S> {
        WeakBroker(Arc::downgrade(&self.inner))
    }

    /// The upstream call the broker wraps (revocation goes straight to it).
    pub fn fetcher(&self) -> &F {
        &self.inner.fetch
    }

    /// The number of entries in the local layer (for tests and metrics).
    pub fn local_entries(&self) -> u64 {
        self.inner.local.run_pending_tasks();
        self.inner.local.entry_count()
    }

    /// Answers one request: from what is kept, from a call in flight, or from the upstream.
    pub async fn token(&self, ask: Ask) -> Result<(Token, Source), Failure> {
        let inner = &self.inner;
        let grant = ask.request.grant.kind();
        let treatment = inner.policy.treatment(grant, ask.caches);
        if treatment == Treatment::PassThrough {
            let call = Call {
                deadline: ask.deadline,
                ..Call::default()
            };
            let token = inner.fetch.fetch(&ask.request, call).await?;
            return Ok((token, Source::Upstream));
        }
        let mut lookup = Lookup::Miss;
        let result = self.look_up(ask, treatment, &mut lookup).await;
        inner.metrics.cache_lookup(lookup);
        result
    }

    /// [`Broker::token`] for a request the broker keeps answers for; `lookup` ends up
    /// saying how it was answered.
    async fn look_up(
        &self,
        ask: Ask,
        treatment: Treatment,
        lookup: &mut Lookup,
    ) -> Result<(Token, Source), Failure> {
        let inner = &self.inner;
        let id = identity::identity(
            &inner.keys,
            &ask.request,
            ask.client_id.as_deref(),
            &inner.token_url,
        );
        let request = Arc::new(ask.request);
        for _ in 0..MAX_ROUNDS {
            let previous = match inner.cached(&id, &request, treatment).await {
                CacheLookup::Answers { entry, renew } => {
                    if renew {
                        self.renew_in_background(id, request.clone(), entry.clone(), treatment);
                    } else {
                        self.schedule_renewal(id, &request, &entry, treatment);
                    }
                    *lookup = match treatment {
                        Treatment::Cache => Lookup::Hit,
                        _ => Lookup::Replayed,
                    };
                    return inner.served(&entry, treatment, false);
                }
                CacheLookup::Spent => {
                    *lookup = Lookup::Replayed;
                    return Err(Failure::CredentialSpent);
                }
                CacheLookup::Miss(previous) => previous,
            };
            *lookup = match previous {
                Some(_) => Lookup::Stale,
                None => Lookup::Miss,
            };
            // Bounded by this caller's deadline, unless the credential works once: then the
            // flight goes on until its result is kept.
            // A renewal with a kept refresh token spends one too: cut short with no answer,
            // it may have ended the token it was renewing.
            let renews_with_refresh = treatment == Treatment::Cache
                && previous
                    .as_ref()
                    .is_some_and(|p| p.refresh_token().is_some());
            let bound = ask.deadline.filter(|_| {
                !policy::spends_credential(request.grant.kind()) && !renews_with_refresh
            });
            let (receiver, led, flight_deadline) =
                match self.join_or_start_flight(id, request.clone(), treatment, previous, bound) {
                    Ok(joined) => joined,
                    Err(answered) => {
                        *lookup = Lookup::Coalesced;
                        return *answered;
                    }
                };
            match flight::wait(receiver, led, ask.deadline).await {
                FlightResult::Landed { result, led } => match *result {
                    // A flight that started before this call's rejection answered with the
                    // very token it rejects: spent, or start over for a new one (I2, I7).
                    Ok((token, _)) if rejects(&request, &token) => {
                        if treatment != Treatment::Cache {
                            return Err(Failure::CredentialSpent);
                        }
                    }
                    Ok((token, source)) => {
                        if !led {
                            *lookup = Lookup::Coalesced;
                            return Ok((token, Source::Coalesced));
                        }
                        return Ok((token, source));
                    }
                    // Its lease ran out before it sent anything: another replica took over.
                    Err(Failure::Upstream { error, .. })
                        if error.kind == UpstreamErrorKind::LeaseLost => {}
                    // Cut short by a deadline shorter than this caller's own: start over (I5).
                    Err(failure)
                        if flight::cut_short(&failure)
                            && flight::outlives(ask.deadline, flight_deadline) => {}
                    Err(failure) => return Err(failure),
                },
                FlightResult::Vanished => {}
                FlightResult::TimedOut => return Err(Failure::DeadlineExceeded),
            }
        }
        Err(Failure::DeadlineExceeded)
    }

    /// Starts one renewal of `id` that nobody waits for, unless a call for it is in flight.
    /// Its span only follows the call that started it, so that call's span ends with it.
    fn renew_in_background(
        &self,
        id: Digest,
        request: Arc<TokenRequest>,
        entry: Arc<Entry>,
        treatment: Treatment,
    ) {
        let span = tracing::info_span!(parent: None, "renewal");
        span.follows_from(tracing::Span::current());
        let _entered = span.enter();
        drop(self.join_or_start_flight(id, request, treatment, Some(entry), None));
    }

    /// Starts the renewal of a cached entry that callers use at its planned point by itself,
    /// so that callers who come back at the lifetime they were told rarely wait (I10).
    fn schedule_renewal(
        &self,
        id: Digest,
        request: &Arc<TokenRequest>,
        entry: &Arc<Entry>,
        treatment: Treatment,
    ) {
        let Some(renew_at) = entry.keep.renew_at else {
            return;
        };
        if treatment != Treatment::Cache || !entry.upkeep.schedule_once() {
            return;
        }
        let delay = renew_at
            .duration_since(self.inner.clock.now())
            .unwrap_or_default();
        let inner = Arc::downgrade(&self.inner);
        let scheduled = Arc::downgrade(entry);
        let request = request.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let (Some(inner), Some(entry)) = (inner.upgrade(), scheduled.upgrade()) else {
                return;
            };
            // Only the entry this replica still serves; a newer one schedules its own.
            let current = inner.local.get(&id);
            if !current.is_some_and(|c| Arc::ptr_eq(&c, &entry)) {
                return;
            }
            Broker { inner }.renew_in_background(id, request, entry, treatment);
        });
    }

    /// Joins the call in flight for `id`, or starts it in its own task. `Err` carries an
    /// answer that a flight kept just before this call looked.
    fn join_or_start_flight(
        &self,
        id: Digest,
        request: Arc<TokenRequest>,
        treatment: Treatment,
        previous: Option<Arc<Entry>>,
        deadline: Option<Instant>,
    ) -> Result<Flying, Box<Landed>> {
        let inner = &self.inner;
        let kept = || inner.landed_meanwhile(&id, treatment, previous.as_ref());
        let sender = match inner.flights.join_or_start(id, deadline, kept) {
            Joined::Running(receiver, bound) => return Ok((receiver, false, bound)),
            Joined::Answered(answer) => return Err(answer),
            Joined::Started(sender) => sender,
        };
        let receiver = sender.subscribe();
        let inner = self.inner.clone();
        // The flight runs in its own task, so its result (a spent refresh token's successor
        // above all) is kept even when every caller that waited for it has gone.
        tokio::spawn(
            async move {
                let landed = inner
                    .lead(id, &request, treatment, previous, deadline)
                    .await;
                inner.flights.land(&id, &sender, landed);
            }
            .instrument(tracing::Span::current()),
        );
        Ok((receiver, true, deadline))
    }

    /// Drops every entry that holds `token` (as access or refresh token), on every replica.
    pub async fn forget(&self, token: &str) {
        self.inner.forget(token).await;
    }
}

/// Whether `request` reports `token` as rejected.
fn rejects(request: &TokenRequest, token: &Token) -> bool {
    use secrecy::ExposeSecret as _;
    match (&request.rejected_access_token, &token.access_token) {
        (Some(rejected), Some(access)) => rejected.expose_secret() == access.expose_secret(),
        _ => false,
    }
}

/// Applies what other replicas report, for as long as the broker lives.
async fn listen<F: Fetch, S: Fleet>(
    inner: Weak<Inner<F, S>>,
    guard: Weak<RateLimitGuard>,
    mut notices: tokio::sync::mpsc::UnboundedReceiver<Notice>,
) {
    while let Some(notice) = notices.recv().await {
        match notice {
            Notice::Invalidate { id, version } => {
                let Some(inner) = inner.upgrade() else { break };
                inner.raise_floor(&id, version);
            }
            Notice::Penalty { key, until_unix_ms } => {
                let Some(guard) = guard.upgrade() else { break };
                guard.learn(
                    key,
                    SystemTime::UNIX_EPOCH + Duration::from_millis(until_unix_ms),
                );
            }
            Notice::Resync => {
                let Some(inner) = inner.upgrade() else { break };
                inner.local.invalidate_all();
            }
        }
    }
}

impl<F, S> Inner<F, S> {
    /// An entry's answer at this moment. A cached token's lifetime ends where its renewal
    /// is planned (I10) until that point has passed; then it is the true remaining one.
    fn served(&self, entry: &Entry, treatment: Treatment, coalesced: bool) -> Landed {
        let now = self.clock.now();
        let source = match (coalesced, treatment) {
            (true, _) => Source::Coalesced,
            (false, Treatment::Cache) => Source::Cache,
            (false, _) => Source::Replayed,
        };
        match &entry.settled {
            Settled::Token(token) => {
                let cached = treatment == Treatment::Cache;
                let ends = entry.keep.renew_at.filter(|at| cached && now < *at);
                Ok((served_from_cache(token, now, !cached, ends), source))
            }
            Settled::Refused {
                error,
                caller_credentials,
            } => Err(Failure::Upstream {
                error: error.clone(),
                caller_credentials: *caller_credentials,
            }),
            Settled::Spent => Err(Failure::CredentialSpent),
        }
    }
}

#[cfg(test)]
mod tests;
