//! The broker on the memory backend, against a scripted upstream and a hand-driven clock.
//! [`invariants`] holds one test per finding of the broker-proof work (contract §8.1).

mod invariants;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use secrecy::SecretString;

use super::*;
use crate::broker::memory_fleet::MemoryFleet;
use crate::grant::{Grant, GrantKind};
use crate::keys::Keys;
use crate::upstream::{OAuthError, UpstreamError};
use secrecy::ExposeSecret as _;

const HOUR: u64 = 3600;

/// A clock the test moves by hand.
struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// The upstream: answers from a script (or a fresh token per call), counts calls, records
/// which grant each call ran, and holds every call until the gate lets it through.
struct Fake {
    calls: AtomicUsize,
    /// The user each call would penalise on a 429, and the one-time credential it carried.
    users: Mutex<Vec<Option<String>>>,
    credentials: Mutex<Vec<String>>,
    grants: Mutex<Vec<GrantKind>>,
    script: Mutex<VecDeque<Result<Token, Failure>>>,
    gate: tokio::sync::Semaphore,
    clock: Arc<ManualClock>,
    expires_in: u64,
}

impl Fake {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn push(&self, result: Result<Token, Failure>) {
        self.script.lock().unwrap().push_back(result);
    }
}

impl Fetch for Arc<Fake> {
    async fn fetch(&self, request: &TokenRequest, call: Call<'_>) -> Result<Token, Failure> {
        if call.lease.is_some_and(|lease| !lease.holds()) {
            return Err(lease_lost());
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.users
            .lock()
            .unwrap()
            .push(call.user.map(str::to_owned).or_else(|| request.user()));
        match &request.grant {
            Grant::RefreshToken { refresh_token } => self
                .credentials
                .lock()
                .unwrap()
                .push(refresh_token.expose_secret().to_owned()),
            Grant::AuthorizationCode { code, .. } => self
                .credentials
                .lock()
                .unwrap()
                .push(code.expose_secret().to_owned()),
            _ => {}
        }
        self.grants.lock().unwrap().push(request.grant.kind());
        // An upstream call is bounded by the deadline it is given, as `Upstream::post` is.
        let _pass = match call.deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, self.gate.acquire()).await {
                Ok(pass) => pass.expect("the gate stays open"),
                Err(_) => return Err(upstream_deadline()),
            },
            None => self.gate.acquire().await.expect("the gate stays open"),
        };
        let scripted = self.script.lock().unwrap().pop_front();
        scripted.unwrap_or_else(|| {
            Ok(token(
                &format!("at-{n}"),
                Some(&format!("rt-{n}")),
                self.expires_in,
                self.clock.now(),
            ))
        })
    }
}

fn token(access: &str, refresh: Option<&str>, expires_in: u64, at: SystemTime) -> Token {
    let mut token: Token = serde_json::from_value(serde_json::json!({
        "access_token": access, "token_type": "bearer", "expires_in": expires_in,
    }))
    .unwrap();
    token.refresh_token = refresh.map(SecretString::from);
    token.counted_from = at;
    token
}

fn oauth(error: &str) -> Failure {
    Failure::Upstream {
        error: UpstreamError {
            kind: UpstreamErrorKind::OAuth,
            http_status: Some(400),
            request_id: None,
            retry_after: None,
            oauth: Some(Box::new(OAuthError {
                error: Some(error.into()),
                description: None,
                error_code: None,
            })),
            not_sent: false,
        },
        caller_credentials: false,
    }
}

fn upstream_deadline() -> Failure {
    Failure::Upstream {
        error: UpstreamError {
            kind: UpstreamErrorKind::DeadlineExceeded,
            http_status: None,
            request_id: None,
            retry_after: None,
            oauth: None,
            not_sent: false,
        },
        caller_credentials: false,
    }
}

fn lease_lost() -> Failure {
    Failure::Upstream {
        error: UpstreamError {
            kind: UpstreamErrorKind::LeaseLost,
            http_status: None,
            request_id: None,
            retry_after: None,
            oauth: None,
            not_sent: true,
        },
        caller_credentials: false,
    }
}

fn unavailable() -> Failure {
    Failure::Upstream {
        error: UpstreamError {
            kind: UpstreamErrorKind::Unavailable("503".into()),
            http_status: Some(503),
            request_id: None,
            retry_after: None,
            oauth: None,
            not_sent: false,
        },
        caller_credentials: false,
    }
}

struct Setup {
    broker: Broker<Arc<Fake>, MemoryFleet>,
    fake: Arc<Fake>,
    clock: Arc<ManualClock>,
    metrics: Arc<crate::metrics::Metrics>,
}

fn setup() -> Setup {
    setup_with(HOUR, 1_000)
}

fn setup_with(expires_in: u64, open: usize) -> Setup {
    setup_ends(expires_in, open, true)
}

/// `ends`: `upstream.refresh_ends_access_token`.
fn setup_ends(expires_in: u64, open: usize, ends: bool) -> Setup {
    let clock = Arc::new(ManualClock(Mutex::new(
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
    )));
    let fake = Arc::new(Fake {
        calls: AtomicUsize::new(0),
        users: Mutex::default(),
        credentials: Mutex::default(),
        grants: Mutex::default(),
        script: Mutex::default(),
        gate: tokio::sync::Semaphore::new(open),
        clock: clock.clone(),
        expires_in,
    });
    let metrics = Arc::new(crate::metrics::Metrics::new([]));
    let broker = Broker::new(
        &CacheConfig::default(),
        Parts {
            fetch: fake.clone(),
            keys: Arc::new(Keys::new(None)),
            clock: clock.clone(),
            token_url: "https://platform.example/restapi/oauth/token".into(),
            request_timeout: Duration::from_secs(10),
            refresh_ends_access_token: ends,
            fleet: None,
            guard: Arc::new(RateLimitGuard::new(None)),
            metrics: metrics.clone(),
        },
    );
    Setup {
        broker,
        fake,
        clock,
        metrics,
    }
}

fn request(grant: Grant) -> TokenRequest {
    TokenRequest {
        grant,
        client_id: Some("app".into()),
        client_assertion: None,
        scopes: vec!["A".into(), "B".into()],
        endpoint_id: None,
        access_token_ttl: None,
        refresh_token_ttl: None,
        rejected_access_token: None,
    }
}

fn jwt() -> TokenRequest {
    request(Grant::JwtBearer {
        assertion: "eyJ.user.sig".into(),
    })
}

fn password() -> TokenRequest {
    request(Grant::Password {
        username: "alice".into(),
        password: "hunter2".into(),
        extension: None,
        pin: None,
    })
}

fn ask(request: TokenRequest) -> Ask {
    Ask {
        client_id: request.client_id.clone(),
        caches: true,
        request,
        deadline: None,
    }
}

fn access(token: &Token) -> &str {
    token.access_token.as_ref().unwrap().expose_secret()
}

/// Lets spawned tasks run until nothing more is ready.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_burst_of_identical_calls_makes_one_upstream_call_and_then_hits_the_cache() {
    let Setup {
        broker,
        fake,
        metrics,
        ..
    } = setup_with(HOUR, 0);
    let calls: Vec<_> = (0..50)
        .map(|_| {
            tokio::spawn({
                let broker = broker.clone();
                async move { broker.token(ask(jwt())).await }
            })
        })
        .collect();
    settle().await;
    assert_eq!(
        fake.calls(),
        1,
        "the burst is coalesced while the call is in flight"
    );
    fake.gate.add_permits(1_000);
    let mut sources = Vec::new();
    for call in calls {
        let (token, source) = call.await.unwrap().expect("a token");
        assert_eq!(access(&token), "at-1");
        assert!(
            token.refresh_token.is_none(),
            "a cached grant hands out no refresh token"
        );
        sources.push(source);
    }
    assert_eq!(
        sources.iter().filter(|s| **s == Source::Upstream).count(),
        1
    );
    assert_eq!(
        sources.iter().filter(|s| **s == Source::Coalesced).count(),
        49
    );
    let (token, source) = broker.token(ask(jwt())).await.unwrap();
    assert_eq!((access(&token), source), ("at-1", Source::Cache));
    assert_eq!(fake.calls(), 1);
    let lookups = [
        Lookup::Miss,
        Lookup::Coalesced,
        Lookup::Hit,
        Lookup::Stale,
        Lookup::Replayed,
    ]
    .map(|lookup| metrics.cache_lookups(lookup));
    assert_eq!(
        lookups,
        [1, 49, 1, 0, 0],
        "miss, coalesced, hit, stale, replayed"
    );
}

#[tokio::test]
async fn a_hit_carries_the_lifetime_up_to_the_planned_renewal_and_scope_order_does_not_matter() {
    let Setup {
        broker,
        fake,
        clock,
        ..
    } = setup();
    let (fresh, _) = broker.token(ask(jwt())).await.unwrap();
    // The renewal is planned refresh_ahead (5 min), jittered up to a tenth more, before expiry.
    let planned = (HOUR - 330)..=(HOUR - 300);
    assert!(planned.contains(&fresh.expires_in.unwrap()), "{fresh:?}");
    clock.advance(Duration::from_secs(600));
    let mut reordered = jwt();
    reordered.scopes.reverse();
    let (token, source) = broker.token(ask(reordered)).await.unwrap();
    assert_eq!(source, Source::Cache);
    assert_eq!(token.expires_in, Some(fresh.expires_in.unwrap() - 600));
    assert_eq!(fake.calls(), 1);
}

#[tokio::test]
async fn with_refresh_not_ending_the_token_a_hit_in_the_window_answers_at_once_and_renews_once() {
    let Setup {
        broker,
        fake,
        clock,
        ..
    } = setup_ends(HOUR, 1, false);
    broker.token(ask(jwt())).await.unwrap();
    // Past the jittered renewal point (at most 330 s before expiry), before min_remaining.
    clock.advance(Duration::from_secs(HOUR - 200));
    for _ in 0..20 {
        let (token, source) = broker.token(ask(jwt())).await.unwrap();
        assert_eq!((access(&token), source), ("at-1", Source::Cache));
        assert_eq!(token.expires_in, Some(200), "its true remaining lifetime");
    }
    settle().await;
    assert_eq!(fake.calls(), 2, "one renewal, however many hits");
    assert_eq!(
        *fake.grants.lock().unwrap(),
        [GrantKind::JwtBearer, GrantKind::RefreshToken]
    );
    fake.gate.add_permits(10);
    settle().await;
    let (token, source) = broker.token(ask(jwt())).await.unwrap();
    assert_eq!((access(&token), source), ("at-2", Source::Cache));
}

#[tokio::test]
async fn inside_the_renewal_window_every_caller_waits_for_the_one_renewal_with_the_kept_refresh_token()
 {
    let Setup {
        broker,
        fake,
        clock,
        ..
    } = setup_with(HOUR, 1);
    broker.token(ask(jwt())).await.unwrap();
    clock.advance(Duration::from_secs(HOUR - 200));
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let broker = broker.clone();
            tokio::spawn(async move { broker.token(ask(jwt())).await })
        })
        .collect();
    settle().await;
    assert_eq!(fake.calls(), 2, "one renewal, however many callers");
    fake.gate.add_permits(10);
    for call in calls {
        let (token, _) = call.await.unwrap().unwrap();
        assert_eq!(access(&token), "at-2", "never the token the renewal ends");
    }
    assert_eq!(
        *fake.grants.lock().unwrap(),
        [GrantKind::JwtBearer, GrantKind::RefreshToken]
    );
}

#[tokio::test]
async fn a_failed_refresh_falls_back_to_the_grant_with_the_request_at_hand() {
    let Setup {
        broker,
        fake,
        clock,
        metrics,
    } = setup();
    broker.token(ask(jwt())).await.unwrap();
    clock.advance(Duration::from_secs(HOUR - 30));
    fake.push(Err(oauth("invalid_grant")));
    // Below min_remaining: the caller waits for the new token.
    let (token, source) = broker.token(ask(jwt())).await.unwrap();
    assert_eq!((access(&token), source), ("at-3", Source::Upstream));
    assert_eq!(
        [Lookup::Miss, Lookup::Stale].map(|lookup| metrics.cache_lookups(lookup)),
        [1, 1],
        "the kept token could no longer answer: a stale lookup"
    );
    assert_eq!(
        *fake.grants.lock().unwrap(),
        [
            GrantKind::JwtBearer,
            GrantKind::RefreshToken,
            GrantKind::JwtBearer
        ]
    );
}

#[tokio::test]
async fn a_definitive_error_of_a_one_time_grant_is_replayed_within_the_window_only() {
    let Setup {
        broker,
        fake,
        clock,
        ..
    } = setup();
    fake.push(Err(oauth("invalid_grant")));
    let first = broker.token(ask(password())).await.unwrap_err();
    let again = broker.token(ask(password())).await.unwrap_err();
    assert_eq!(
        fake.calls(),
        1,
        "a wrong password is not retried into a lockout"
    );
    assert_eq!(crate::error::reason(&first), crate::error::reason(&again));
    clock.advance(Duration::from_secs(31));
    let (_, source) = broker.token(ask(password())).await.unwrap();
    assert_eq!(source, Source::Upstream);
    assert_eq!(fake.calls(), 2);
}

#[tokio::test]
async fn a_replayed_token_keeps_its_refresh_token_and_is_never_a_cache_hit() {
    let Setup {
        broker,
        fake,
        metrics,
        ..
    } = setup();
    for grant in [
        Grant::RefreshToken {
            refresh_token: "rt-old".into(),
        },
        Grant::AuthorizationCode {
            code: "code-1".into(),
            redirect_uri: None,
            code_verifier: None,
        },
    ] {
        let before = fake.calls();
        let (first, source) = broker.token(ask(request(grant.clone()))).await.unwrap();
        assert_eq!(source, Source::Upstream);
        let (again, source) = broker.token(ask(request(grant))).await.unwrap();
        assert_eq!(
            source,
            Source::Replayed,
            "one-time credentials are never served from the cache"
        );
        assert_eq!(access(&again), access(&first));
        assert!(
            again.refresh_token.is_some(),
            "the caller needs the new refresh token"
        );
        assert_eq!(
            fake.calls(),
            before + 1,
            "a one-time credential reaches the upstream once"
        );
    }
    assert_eq!(metrics.cache_lookups(Lookup::Replayed), 2);
    assert_eq!(metrics.cache_lookups(Lookup::Miss), 2);
    assert_eq!(metrics.cache_lookups(Lookup::Hit), 0);
}

#[tokio::test]
async fn transient_failures_are_never_replayed() {
    let Setup { broker, fake, .. } = setup();
    fake.push(Err(unavailable()));
    broker.token(ask(password())).await.unwrap_err();
    let (_, source) = broker.token(ask(password())).await.unwrap();
    assert_eq!(source, Source::Upstream);
    assert_eq!(fake.calls(), 2);
}

#[tokio::test]
async fn a_rejected_token_is_replaced_once_for_every_caller_that_reports_it() {
    let Setup { broker, fake, .. } = setup_with(HOUR, 1);
    broker.token(ask(jwt())).await.unwrap();
    fake.gate.forget_permits(10);
    let rejected = || {
        let mut request = jwt();
        request.rejected_access_token = Some("at-1".into());
        ask(request)
    };
    let calls: Vec<_> = (0..10)
        .map(|_| {
            tokio::spawn({
                let broker = broker.clone();
                let ask = rejected();
                async move { broker.token(ask).await }
            })
        })
        .collect();
    settle().await;
    fake.gate.add_permits(10);
    for call in calls {
        let (token, _) = call.await.unwrap().unwrap();
        assert_eq!(access(&token), "at-2");
    }
    assert_eq!(
        fake.calls(),
        2,
        "one new token for all who reported the old one"
    );
    assert_eq!(
        fake.grants.lock().unwrap()[1],
        GrantKind::RefreshToken,
        "renewed with the kept refresh token"
    );
    let (token, source) = broker.token(rejected()).await.unwrap();
    assert_eq!(
        (access(&token), source),
        ("at-2", Source::Cache),
        "a newer token is returned with no call"
    );
    assert_eq!(fake.calls(), 2);
}

#[tokio::test]
async fn forgetting_a_token_drops_the_entry_that_holds_it() {
    let Setup { broker, fake, .. } = setup();
    broker.token(ask(jwt())).await.unwrap();
    broker.forget("rt-1").await;
    let (token, source) = broker.token(ask(jwt())).await.unwrap();
    assert_eq!((access(&token), source), ("at-2", Source::Upstream));
    broker.forget("at-2").await;
    broker.token(ask(jwt())).await.unwrap();
    assert_eq!(fake.calls(), 3);
}

#[tokio::test]
async fn a_pass_through_client_goes_upstream_every_time_and_keeps_its_refresh_token() {
    let Setup { broker, fake, .. } = setup();
    for n in 1..=3 {
        let mut ask = ask(jwt());
        ask.caches = false;
        let (token, source) = broker.token(ask).await.unwrap();
        assert_eq!(source, Source::Upstream);
        assert!(token.refresh_token.is_some());
        assert_eq!(fake.calls(), n);
    }
    assert_eq!(broker.local_entries(), 0);
}

#[tokio::test]
async fn device_polling_is_answered_once_per_interval() {
    let Setup {
        broker,
        fake,
        clock,
        ..
    } = setup();
    let device = || {
        ask(request(Grant::DeviceCode {
            device_code: "dc-1".into(),
        }))
    };
    fake.push(Err(oauth("authorization_pending")));
    fake.push(Err(oauth("slow_down")));
    for _ in 0..5 {
        broker.token(device()).await.unwrap_err();
    }
    assert_eq!(fake.calls(), 1);
    clock.advance(Duration::from_secs(5));
    let slow = broker.token(device()).await.unwrap_err();
    assert_eq!(crate::error::reason(&slow), "SLOW_DOWN");
    assert_eq!(fake.calls(), 2);
    clock.advance(Duration::from_secs(9));
    broker.token(device()).await.unwrap_err();
    assert_eq!(fake.calls(), 2, "slow_down raised the interval to 10 s");
    clock.advance(Duration::from_secs(1));
    broker.token(device()).await.unwrap();
    assert_eq!(fake.calls(), 3);
}

#[tokio::test]
async fn different_requests_never_share_an_answer() {
    let Setup { broker, fake, .. } = setup();
    broker.token(ask(jwt())).await.unwrap();
    let mut other = jwt();
    other.scopes.push("C".into());
    let (token, source) = broker.token(ask(other)).await.unwrap();
    assert_eq!((access(&token), source), ("at-2", Source::Upstream));
    let mut other_client = ask(jwt());
    other_client.client_id = Some("app-2".into());
    broker.token(other_client).await.unwrap();
    assert_eq!(fake.calls(), 3);
}

/// A grant of each kind, with its required fields set.
fn grant_of(kind: GrantKind) -> Grant {
    let secret = || SecretString::from("s3cr3t");
    match kind {
        GrantKind::AuthorizationCode => Grant::AuthorizationCode {
            code: secret(),
            redirect_uri: None,
            code_verifier: None,
        },
        GrantKind::Password => Grant::Password {
            username: "alice".into(),
            password: secret(),
            extension: None,
            pin: None,
        },
        GrantKind::JwtBearer => Grant::JwtBearer {
            assertion: secret(),
        },
        GrantKind::PartnerJwt => Grant::PartnerJwt {
            assertion: secret(),
        },
        GrantKind::RefreshToken => Grant::RefreshToken {
            refresh_token: secret(),
        },
        GrantKind::IvrPin => Grant::IvrPin { ivr_pin: secret() },
        GrantKind::DeviceCode => Grant::DeviceCode {
            device_code: secret(),
        },
        GrantKind::ClientCredentials => Grant::ClientCredentials { subject: None },
        GrantKind::Otp => Grant::Otp { code: secret() },
        GrantKind::Guest => Grant::Guest {
            brand_id: None,
            resource_type: None,
            resource: None,
        },
        GrantKind::PersonalJwt => Grant::PersonalJwt { assertion: None },
        GrantKind::DeviceCertificate => Grant::DeviceCertificate,
    }
}

#[tokio::test]
async fn only_the_cached_grants_are_ever_served_from_the_cache() {
    let Setup {
        broker,
        fake,
        clock,
        ..
    } = setup();
    let cached = CacheConfig::default().grants;
    let mut sent = 0;
    for kind in GrantKind::ALL {
        let call = || broker.token(ask(request(grant_of(kind))));
        assert_eq!(call().await.unwrap().1, Source::Upstream, "{kind}");
        sent += 1;
        let kept = if cached.contains(&kind) {
            Source::Cache
        } else {
            Source::Replayed
        };
        for _ in 0..3 {
            clock.advance(Duration::from_secs(1));
            assert_eq!(call().await.unwrap().1, kept, "{kind}");
        }
        assert_eq!(fake.calls(), sent, "{kind} reached the upstream once");
        // Past the replay window a one-time grant goes upstream again; a cached one does not.
        clock.advance(Duration::from_secs(30));
        let later = call().await.unwrap().1;
        if cached.contains(&kind) {
            assert_eq!(later, Source::Cache, "{kind}");
        } else {
            assert_eq!(later, Source::Upstream, "{kind}");
            sent += 1;
        }
        assert_eq!(fake.calls(), sent, "{kind}");
    }
}
