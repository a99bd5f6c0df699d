//! The token broker (contract §8): between a validated request and the upstream call, it
//! decides once per request whether to answer from the cache, join an identical call in
//! flight, replay a recent result, or go upstream, and keeps what it learns.
//!
//! - [`policy`]: the pure rules per grant; [`identity`]: which requests are identical.
//! - [`entry`]: what is kept; [`redis`]: the state a fleet shares. HMAC identities and
//!   sealing are [`crate::keys`]'s, the upstream's 429 penalties [`crate::rate_limit`]'s.
//!
//! The broker owns a local layer (moka, bounded by `max_entries`) and single-flight per
//! identity. With Redis behind it, a fleet-wide lease makes one replica call while the
//! others wait for its result; a lease only saves calls, the version-checked write and the
//! replay of one-time grants are what keep a credential from being spent twice.

pub mod entry;
pub mod identity;
pub mod policy;
pub mod redis;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use secrecy::ExposeSecret as _;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument as _;

use self::entry::{Entry, Settled, served_from_cache};
use self::policy::{Freshness, Keep, OAuthKind, Outcome, Policy, Treatment, freshness};
use self::redis::{Notice, RedisStore};
use crate::config::CacheConfig;
use crate::error::Failure;
use crate::grant::{Grant, TokenRequest};
use crate::keys::{Digest, Keys, Purpose};
use crate::metrics::{Lookup, Metrics};
use crate::rate_limit::{self as guard, RateLimitGuard};
use crate::upstream::{Precondition, Token, UpstreamErrorKind};

/// How often a replica that waits for another replica's call looks for its result.
const FLEET_POLL: Duration = Duration::from_millis(20);
/// How many times a call starts over after the flight it joined ended in nothing it can use
/// (its leader's deadline, or a lease whose holder vanished).
const MAX_ROUNDS: usize = 3;

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

/// What is kept for a request, as far as answering it goes.
enum Kept {
    /// An entry that answers now; `renew` when it is inside `refresh_ahead`.
    Answers { entry: Arc<Entry>, renew: bool },
    /// Nothing that answers. The entry a new result replaces, if any: its refresh token,
    /// its version and its polling interval still count.
    Replaces(Option<Arc<Entry>>),
}

/// How waiting for another replica's call ended.
enum Awaited {
    /// Its result, now in Redis.
    Entry(Arc<Entry>),
    /// The lease is free (its holder released it or it expired) with no result.
    Free,
    /// Redis stopped answering, or one holder kept the lease past any call's length.
    Stuck,
}

/// How one call's wait for a flight ended.
enum Flown {
    /// The flight's result; `led` when this call started it.
    Landed { landed: Box<Landed>, led: bool },
    /// The call's own deadline passed first.
    TimedOut,
    /// The flight ended with no result (its task was cancelled).
    Vanished,
}

/// What a flight delivers to the calls that share it.
type Landed = Result<(Token, Source), Failure>;

pub struct Broker<F> {
    inner: Arc<Inner<F>>,
}

impl<F> Clone for Broker<F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<F> std::fmt::Debug for Broker<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("policy", &self.inner.policy)
            .field("fleet", &self.inner.fleet.is_some())
            .finish_non_exhaustive()
    }
}

struct Inner<F> {
    fetch: F,
    policy: Policy,
    keys: Arc<Keys>,
    clock: Arc<dyn Clock>,
    token_url: String,
    local: moka::sync::Cache<Digest, Arc<Entry>>,
    /// Token digest → the identity whose entry holds it, for revocation.
    by_token: moka::sync::Cache<Digest, Digest>,
    flights: Mutex<HashMap<Digest, watch::Receiver<Option<Landed>>>>,
    fleet: Option<RedisStore>,
    /// How long a fleet-wide lease lasts: the longest an upstream call can take.
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
pub struct Parts<F> {
    pub fetch: F,
    pub keys: Arc<Keys>,
    pub clock: Arc<dyn Clock>,
    pub token_url: String,
    /// The longest one upstream call may take (`upstream.request_timeout`).
    pub request_timeout: Duration,
    /// The Redis store, when `backend = "redis"`, with the notices it receives.
    pub fleet: Option<(RedisStore, tokio::sync::mpsc::UnboundedReceiver<Notice>)>,
    /// The guard that fleet penalties are applied to, and the penalties it reports.
    pub guard: Arc<RateLimitGuard>,
    pub penalties: Option<tokio::sync::mpsc::UnboundedReceiver<guard::Shared>>,
    /// Where lookups are counted (`tokengate_cache_lookups_total`).
    pub metrics: Arc<Metrics>,
}

impl<F: Fetch> Broker<F> {
    pub fn new(config: &CacheConfig, parts: Parts<F>) -> Self {
        let local = moka::sync::Cache::builder()
            .max_capacity(config.max_entries)
            .expire_after(EntryExpiry)
            .build();
        let by_token = moka::sync::Cache::builder()
            .max_capacity(config.max_entries.saturating_mul(2))
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
                keys: parts.keys,
                clock: parts.clock,
                token_url: parts.token_url,
                local,
                by_token,
                flights: Mutex::default(),
                fleet,
                lease_ttl: parts.request_timeout + Duration::from_secs(1),
                metrics: parts.metrics,
            }),
        };
        if let Some(notices) = notices {
            broker.listen(notices, parts.guard.clone());
        }
        if let (Some(penalties), Some(fleet)) = (parts.penalties, broker.inner.fleet.clone()) {
            tokio::spawn(tell_fleet(penalties, fleet));
        }
        broker
    }

    /// Applies what other replicas report, for as long as the broker lives.
    fn listen(
        &self,
        mut notices: tokio::sync::mpsc::UnboundedReceiver<Notice>,
        guard: Arc<RateLimitGuard>,
    ) {
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            while let Some(notice) = notices.recv().await {
                let Some(inner) = inner.upgrade() else { break };
                match notice {
                    Notice::Invalidate { id, .. } => inner.local.invalidate(&id),
                    Notice::Penalty { key, until_unix_ms } => guard.learn(
                        key,
                        SystemTime::UNIX_EPOCH + Duration::from_millis(until_unix_ms),
                    ),
                    Notice::Resync => inner.local.invalidate_all(),
                }
            }
        });
    }

    /// The upstream call the broker wraps (revocation goes straight to it).
    pub fn fetcher(&self) -> &F {
        &self.inner.fetch
    }

    /// The number of entries in the local layer (for tests and, later, metrics).
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
            let token = inner
                .fetch
                .fetch(
                    &ask.request,
                    Call {
                        deadline: ask.deadline,
                        ..Call::default()
                    },
                )
                .await?;
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
            let previous = match inner.kept(&id, &request).await {
                Kept::Answers { entry, renew } => {
                    if renew {
                        self.renew(id, request.clone(), entry.clone(), treatment);
                    }
                    *lookup = match treatment {
                        Treatment::Cache => Lookup::Hit,
                        _ => Lookup::Replayed,
                    };
                    return served(&entry, treatment, inner.clock.now(), false);
                }
                Kept::Replaces(previous) => previous,
            };
            *lookup = match previous {
                Some(_) => Lookup::Stale,
                None => Lookup::Miss,
            };
            let flown = self
                .fly(id, request.clone(), treatment, previous, ask.deadline)
                .await;
            match flown {
                Flown::Landed { landed, led } => match *landed {
                    Ok((token, source)) => {
                        if !led {
                            *lookup = Lookup::Coalesced;
                            return Ok((token, Source::Coalesced));
                        }
                        return Ok((token, source));
                    }
                    // The leader's own deadline, not ours: start over while time is left.
                    Err(Failure::DeadlineExceeded) if !led => {}
                    Err(failure) => return Err(failure),
                },
                Flown::Vanished => {}
                Flown::TimedOut => return Err(Failure::DeadlineExceeded),
            }
        }
        Err(Failure::DeadlineExceeded)
    }

    /// Starts one background renewal of `id`, unless a call for it is already in flight.
    fn renew(
        &self,
        id: Digest,
        request: Arc<TokenRequest>,
        entry: Arc<Entry>,
        treatment: Treatment,
    ) {
        // Nobody waits for it, so nothing is lost if it finds the work already done.
        drop(self.start_flight(id, request, treatment, Some(entry), None));
    }

    /// Joins the call in flight for `id`, or starts it, and waits for it within `deadline`.
    async fn fly(
        &self,
        id: Digest,
        request: Arc<TokenRequest>,
        treatment: Treatment,
        previous: Option<Arc<Entry>>,
        deadline: Option<Instant>,
    ) -> Flown {
        let (mut receiver, led) = self.start_flight(id, request, treatment, previous, deadline);
        let wait = receiver.wait_for(Option::is_some);
        let landed = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, wait).await {
                Ok(landed) => landed,
                Err(_) => return Flown::TimedOut,
            },
            None => wait.await,
        };
        match landed.ok().and_then(|landed| landed.clone()) {
            Some(landed) => Flown::Landed {
                landed: Box::new(landed),
                led,
            },
            None => Flown::Vanished,
        }
    }

    /// The flight runs in its own task, so its result (a spent refresh token's successor
    /// above all) is kept even when every caller that waited for it has gone. Its upstream
    /// call is bounded by its leader's deadline, as every upstream call is (contract §6).
    fn start_flight(
        &self,
        id: Digest,
        request: Arc<TokenRequest>,
        treatment: Treatment,
        previous: Option<Arc<Entry>>,
        deadline: Option<Instant>,
    ) -> (watch::Receiver<Option<Landed>>, bool) {
        let mut flights = self
            .inner
            .flights
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(receiver) = flights.get(&id)
            && receiver.has_changed().is_ok()
        {
            return (receiver.clone(), false);
        }
        let (sender, receiver) = watch::channel(None);
        flights.insert(id, receiver.clone());
        drop(flights);
        let inner = self.inner.clone();
        tokio::spawn(
            async move {
                let landed = inner
                    .lead(id, &request, treatment, previous, deadline)
                    .await;
                sender.send_replace(Some(landed));
                let mut flights = inner
                    .flights
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if flights
                    .get(&id)
                    .is_some_and(|r| r.same_channel(&sender.subscribe()))
                {
                    flights.remove(&id);
                }
            }
            .instrument(tracing::Span::current()),
        );
        (receiver, true)
    }

    /// Drops every entry that holds `token` (as access or refresh token), on every replica.
    pub async fn forget(&self, token: &str) {
        let inner = &self.inner;
        let digest = inner.keys.token_digest(token);
        if let Some(id) = inner.by_token.get(&digest) {
            inner.local.invalidate(&id);
            inner.by_token.invalidate(&digest);
        }
        if let Some(fleet) = inner.fleet()
            && let Ok(Some(id)) = fleet.find_token(&digest).await
        {
            inner.local.invalidate(&id);
            let _ = fleet.delete(&id).await;
        }
    }
}

/// Forwards this replica's penalties to the fleet.
async fn tell_fleet(
    mut penalties: tokio::sync::mpsc::UnboundedReceiver<guard::Shared>,
    fleet: RedisStore,
) {
    while let Some((key, until)) = penalties.recv().await {
        let until_unix_ms = until
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Down: every replica holds back on its own 429s meanwhile.
        let _ = fleet.penalise(&key, until_unix_ms).await;
    }
}

/// An entry's answer to a request at `now`.
fn served(entry: &Entry, treatment: Treatment, now: SystemTime, coalesced: bool) -> Landed {
    let source = match (coalesced, treatment) {
        (true, _) => Source::Coalesced,
        (false, Treatment::Cache) => Source::Cache,
        (false, _) => Source::Replayed,
    };
    match &entry.settled {
        Settled::Token(token) => Ok((
            served_from_cache(token, now, treatment != Treatment::Cache),
            source,
        )),
        Settled::Refused {
            error,
            caller_credentials,
        } => Err(Failure::Upstream {
            error: error.clone(),
            caller_credentials: *caller_credentials,
        }),
    }
}

impl<F: Fetch> Inner<F> {
    /// Whether what is kept for `id` answers `request` now, after a reported rejection.
    async fn kept(&self, id: &Digest, request: &TokenRequest) -> Kept {
        let Some(mut entry) = self.lookup(id).await else {
            return Kept::Replaces(None);
        };
        let rejected = request
            .rejected_access_token
            .as_ref()
            .is_some_and(|t| entry.holds_access_token(t.expose_secret()));
        if rejected {
            tracing::info!(id = ?id, "the cached token was rejected; fetching a new one");
            match self.drop_rejected(id, &entry).await {
                // Another replica replaced it already: that one answers.
                Some(newer) => entry = newer,
                // Its refresh token may still renew it, into a store that no longer has it.
                None => {
                    return Kept::Replaces(Some(Arc::new(Entry {
                        version: 0,
                        ..Entry::clone(&entry)
                    })));
                }
            }
        }
        match freshness(&entry.keep, self.clock.now()) {
            Freshness::Fresh => Kept::Answers {
                entry,
                renew: false,
            },
            Freshness::Renew => Kept::Answers { entry, renew: true },
            Freshness::Spent => Kept::Replaces(Some(entry)),
        }
    }

    /// The Redis store while it answers. While it is down every call skips it at once
    /// instead of waiting out `cache.redis.timeout` per command; its health check notices
    /// when it is back.
    fn fleet(&self) -> Option<&RedisStore> {
        self.fleet.as_ref().filter(|fleet| fleet.is_up())
    }

    /// The entry kept for `id`: the local layer's while it may answer, else the fleet's.
    async fn lookup(&self, id: &Digest) -> Option<Arc<Entry>> {
        let local = self.local.get(id);
        if let Some(entry) = &local
            && freshness(&entry.keep, self.clock.now()) != Freshness::Spent
        {
            return local;
        }
        let Some(fleet) = self.fleet() else {
            return local;
        };
        match self.fleet_entry(fleet, id).await {
            Some(entry) => {
                self.keep_locally(id, entry.clone());
                Some(entry)
            }
            None => local,
        }
    }

    /// The entry Redis holds for `id`, opened; `None` when absent, unreadable or Redis is down.
    async fn fleet_entry(&self, fleet: &RedisStore, id: &Digest) -> Option<Arc<Entry>> {
        let stored = fleet.get(id).await.ok()?;
        let (version, sealed) = (stored.version, stored.sealed?);
        let entry = self
            .keys
            .open(Purpose::Entry, id, &sealed)
            .ok()
            .and_then(|plain| Entry::decode(version, &plain));
        if entry.is_none() {
            tracing::warn!(
                id = ?id,
                "a value in redis does not open under the cache key; dropped and treated as a miss"
            );
            // Left in place, its version would refuse every write of a good entry until it
            // expired.
            let _ = fleet.delete(id).await;
        }
        entry.map(Arc::new)
    }

    fn keep_locally(&self, id: &Digest, entry: Arc<Entry>) {
        for token in entry.tokens() {
            self.by_token.insert(self.keys.token_digest(token), *id);
        }
        self.local.insert(*id, entry);
    }

    /// Drops a rejected entry here and, if Redis still holds that token, there. Returns the
    /// entry Redis holds instead when another replica has replaced it already (the notice
    /// that would have told us may still be on its way).
    async fn drop_rejected(&self, id: &Digest, rejected: &Entry) -> Option<Arc<Entry>> {
        self.local.invalidate(id);
        let fleet = self.fleet()?;
        let shared = self.fleet_entry(fleet, id).await?;
        if shared.holds_access_token(rejected.access_token()?) {
            let _ = fleet.delete(id).await;
            return None;
        }
        self.keep_locally(id, shared.clone());
        Some(shared)
    }

    /// The flight's work: take the fleet's lease (or wait for its holder's result), call
    /// upstream, keep the result, then release.
    async fn lead(
        &self,
        id: Digest,
        request: &TokenRequest,
        treatment: Treatment,
        previous: Option<Arc<Entry>>,
        deadline: Option<Instant>,
    ) -> Landed {
        let mut lease = None;
        if let Some(fleet) = self.fleet() {
            loop {
                match fleet.lease(&id, self.lease_ttl).await {
                    Ok(Some(held)) => {
                        // Re-checked under the lease: its last holder may have just written.
                        if let Some(entry) = self.fleet_entry(fleet, &id).await
                            && freshness(&entry.keep, self.clock.now()) == Freshness::Fresh
                        {
                            let _ = fleet.release(&id, held).await;
                            self.keep_locally(&id, entry.clone());
                            return served(&entry, treatment, self.clock.now(), true);
                        }
                        lease = Some(held);
                        break;
                    }
                    Ok(None) => match self.await_fleet(fleet, &id).await {
                        Awaited::Entry(entry) => {
                            self.keep_locally(&id, entry.clone());
                            return served(&entry, treatment, self.clock.now(), true);
                        }
                        Awaited::Free => {}
                        // Redis stopped answering, or one holder kept the lease longer than
                        // any call can take: call without it.
                        Awaited::Stuck => break,
                    },
                    // Redis is down: this replica goes on alone.
                    Err(_) => break,
                }
            }
        }
        let grant = request.grant.kind();
        let result = self
            .fetch_fresh(request, treatment, previous.as_deref(), deadline)
            .await;
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
        let previous_interval = previous.as_ref().and_then(|p| p.keep.interval);
        let keep = self.policy.keep(
            treatment,
            grant,
            outcome,
            now,
            previous_interval,
            fastrand::f64(),
        );
        let settled = match &result {
            Ok(token) => Some(Settled::Token(token.clone())),
            Err(Failure::Upstream {
                error,
                caller_credentials,
            }) => Some(Settled::Refused {
                error: error.clone(),
                caller_credentials: *caller_credentials,
            }),
            Err(_) => None,
        };
        if let (Some(keep), Some(settled)) = (keep, settled) {
            self.store(&id, keep, settled, previous.as_deref()).await;
        }
        if let (Some(fleet), Some(held)) = (&self.fleet, lease) {
            let _ = fleet.release(&id, held).await;
        }
        result.map(|token| {
            let token = if treatment == Treatment::Cache {
                served_from_cache(&token, now, false)
            } else {
                token
            };
            (token, Source::Upstream)
        })
    }

    /// Waits for the lease holder's result. Each holder gets `lease_ttl` from when this
    /// replica first sees it: a new holder (the last one's lease expired) starts the wait
    /// again, so waiters follow the lease instead of all calling when the first one lapses.
    async fn await_fleet(&self, fleet: &RedisStore, id: &Digest) -> Awaited {
        let mut holder: Option<(String, Instant)> = None;
        loop {
            if let Some(entry) = self.fleet_entry(fleet, id).await
                && freshness(&entry.keep, self.clock.now()) != Freshness::Spent
            {
                return Awaited::Entry(entry);
            }
            match fleet.lease_holder(id).await {
                Ok(Some(now_holding)) => {
                    let since = match &holder {
                        Some((seen, since)) if *seen == now_holding => *since,
                        _ => Instant::now(),
                    };
                    if since.elapsed() >= self.lease_ttl {
                        return Awaited::Stuck;
                    }
                    holder = Some((now_holding, since));
                    tokio::time::sleep(FLEET_POLL).await;
                }
                Ok(None) => return Awaited::Free,
                Err(_) => return Awaited::Stuck,
            }
        }
    }

    /// A new token: renewed with the refresh token kept from the last one when there is
    /// one, else (or when that fails) by running the request's own grant again.
    async fn fetch_fresh(
        &self,
        request: &TokenRequest,
        treatment: Treatment,
        previous: Option<&Entry>,
        deadline: Option<Instant>,
    ) -> Result<Token, Failure> {
        let kept = previous.and_then(|entry| match &entry.settled {
            Settled::Token(token) if treatment == Treatment::Cache => {
                let alive = token.refresh_token_expires_in.is_none_or(|secs| {
                    token.received_at + Duration::from_secs(secs) > self.clock.now()
                });
                token.refresh_token.clone().filter(|_| alive)
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
            match self
                .fetch
                .fetch(
                    &refresh,
                    Call {
                        deadline,
                        ..Call::default()
                    },
                )
                .await
            {
                Ok(token) => return Ok(token),
                Err(failure) => tracing::info!(
                    reason = crate::error::reason(&failure),
                    "renewal with the kept refresh token failed; running the grant again"
                ),
            }
        }
        self.fetch
            .fetch(
                request,
                Call {
                    deadline,
                    ..Call::default()
                },
            )
            .await
    }

    /// Keeps a result here and, version-checked, in Redis; tells the fleet when it replaced
    /// an entry that others may still hold.
    async fn store(&self, id: &Digest, keep: Keep, settled: Settled, previous: Option<&Entry>) {
        // Versions outlive deletes: with no entry in Redis, a write expects the version Redis
        // has, as it expected "absent" before (an interim shim until the broker uses them).
        let mut expected = previous.map_or(0, |p| p.version);
        if let Some(fleet) = self.fleet()
            && let Ok(stored) = fleet.get(id).await
            && stored.sealed.is_none()
        {
            expected = stored.version;
        }
        let mut entry = Entry {
            version: expected + 1,
            keep,
            settled,
        };
        if let Some(fleet) = self.fleet() {
            let sealed = self.keys.seal(Purpose::Entry, id, &entry.encode());
            let tokens: Vec<Digest> = entry
                .tokens()
                .into_iter()
                .map(|t| self.keys.token_digest(t))
                .collect();
            match fleet.put(id, expected, &sealed, keep.ttl, &tokens).await {
                Ok(true) if previous.is_some() => {
                    let _ = fleet.invalidate(id, expected + 1).await;
                }
                Ok(true) => {}
                // Someone wrote first; theirs stands, and ours is not kept here either.
                Ok(false) => {
                    self.local.invalidate(id);
                    return;
                }
                Err(_) => entry.version = expected,
            }
        }
        self.keep_locally(id, Arc::new(entry));
    }
}

#[cfg(test)]
mod tests;
