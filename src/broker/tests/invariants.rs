//! One test per finding of the broker-proof work, each named for the promise it keeps
//! (contract §8.1). Each failed before its fix.

use super::*;

/// A JWT whose subject is `alice` (only its payload is read).
fn alice_jwt() -> TokenRequest {
    use base64::Engine as _;
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"sub":"alice"}"#);
    request(Grant::JwtBearer {
        assertion: format!("eyJhbGciOiJub25lIn0.{payload}.sig").into(),
    })
}

fn code() -> TokenRequest {
    request(Grant::AuthorizationCode {
        code: "code-1".into(),
        redirect_uri: None,
        code_verifier: None,
    })
}

fn refresh() -> TokenRequest {
    request(Grant::RefreshToken {
        refresh_token: "caller-rt".into(),
    })
}

fn rejecting(mut request: TokenRequest, token: &str) -> TokenRequest {
    request.rejected_access_token = Some(token.into());
    request
}

/// `n` replicas sharing one in-memory fleet and one upstream.
fn fleet(n: usize, request_timeout: Duration) -> (Vec<Broker<Arc<Fake>, MemoryFleet>>, Setup) {
    let setup = setup();
    let shared = MemoryFleet::default();
    let replicas = (0..n)
        .map(|_| {
            Broker::new(
                &CacheConfig::default(),
                Parts {
                    fetch: setup.fake.clone(),
                    keys: Arc::new(Keys::new(Some(&crate::config::CacheKey::new(vec![9; 32])))),
                    clock: setup.clock.clone(),
                    token_url: "https://platform.example/restapi/oauth/token".into(),
                    request_timeout,
                    refresh_ends_access_token: true,
                    fleet: Some(shared.join()),
                    guard: Arc::new(RateLimitGuard::new(None)),
                    metrics: setup.metrics.clone(),
                },
            )
        })
        .collect();
    (replicas, setup)
}

// I2: `rejected_access_token` on a replayed grant never re-sends its credential.
#[tokio::test]
async fn a_rejected_token_of_a_one_time_grant_never_sends_the_credential_again() {
    for one_time in [code(), refresh()] {
        let Setup { broker, fake, .. } = setup();
        let (token, _) = broker.token(ask(one_time.clone())).await.unwrap();
        let first = access(&token).to_owned();
        let spent = broker
            .token(ask(rejecting(one_time.clone(), &first)))
            .await
            .unwrap_err();
        assert!(matches!(spent, Failure::CredentialSpent), "{spent:?}");
        // Nor does the same request without the rejection, while the window lasts.
        let again = broker.token(ask(one_time.clone())).await.unwrap_err();
        assert!(matches!(again, Failure::CredentialSpent), "{again:?}");
        assert_eq!(fake.calls(), 1, "the credential went upstream once");
        assert_eq!(fake.credentials.lock().unwrap().len(), 1);
    }
}

// I3: no upstream lifetime, however large, makes serving panic.
#[tokio::test]
async fn an_absurd_expires_in_gives_a_token_and_never_a_panic() {
    for expires_in in [u64::MAX, 9_300_000_000_000_000_000, i64::MAX as u64] {
        let Setup {
            broker,
            fake,
            clock,
            ..
        } = setup_with(expires_in, 1_000);
        let (token, source) = broker.token(ask(jwt())).await.unwrap();
        assert_eq!(source, Source::Upstream);
        assert!(
            token
                .expires_in
                .is_some_and(|s| s <= policy::MAX_LIFETIME.as_secs())
        );
        clock.advance(Duration::from_secs(5));
        let (_, source) = broker.token(ask(jwt())).await.unwrap();
        assert_eq!(source, Source::Cache, "the kept entry serves");
        let (replayed, _) = broker.token(ask(password())).await.unwrap();
        assert!(replayed.expires_in.is_some());
        broker.token(ask(password())).await.unwrap();
        assert_eq!(fake.calls(), 2);
    }
}

// I5: a caller is never failed by another caller's deadline. A one-time credential's flight
// carries no deadline and goes on; any other flight is bounded by its first caller's, and a
// caller that outlives it starts over when it was cut short.
#[tokio::test(start_paused = true)]
async fn a_caller_that_joins_a_short_deadline_flight_gets_its_token() {
    for (request, calls) in [(refresh(), 1), (jwt(), 2)] {
        let Setup { broker, fake, .. } = setup_with(HOUR, 0);
        let hasty = Ask {
            deadline: Some(Instant::now() + Duration::from_millis(300)),
            ..ask(request.clone())
        };
        let patient = Ask {
            deadline: Some(Instant::now() + Duration::from_secs(10)),
            ..ask(request.clone())
        };
        let first = tokio::spawn({
            let broker = broker.clone();
            async move { broker.token(hasty).await }
        });
        settle().await;
        let second = tokio::spawn({
            let broker = broker.clone();
            async move { broker.token(patient).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        fake.gate.add_permits(1);
        let failed = first.await.unwrap().unwrap_err();
        assert!(matches!(failed, Failure::DeadlineExceeded), "{failed:?}");
        let (token, _) = second.await.unwrap().unwrap();
        assert_eq!(
            access(&token),
            format!("at-{calls}"),
            "{:?}",
            request.grant.kind()
        );
        assert_eq!(fake.calls(), calls, "{:?}", request.grant.kind());
        assert!(
            fake.credentials.lock().unwrap().len() <= 1,
            "sent once at most"
        );
    }
}

// A request that missed just before a flight landed does not start a second call (the
// check and the flight map's lock were not atomic).
#[tokio::test]
async fn a_call_that_missed_just_before_a_flight_landed_starts_no_second_call() {
    let Setup { broker, fake, .. } = setup();
    let request = jwt();
    let id = identity::identity(
        &broker.inner.keys,
        &request,
        Some("app"),
        &broker.inner.token_url,
    );
    broker.token(ask(request.clone())).await.unwrap();
    // Where a call stands that found nothing before that flight kept its result.
    let joined = broker.join_or_start_flight(id, Arc::new(request), Treatment::Cache, None, None);
    let answered = joined.expect_err("the kept result answers");
    assert_eq!(access(&answered.unwrap().0), "at-1");
    settle().await;
    assert_eq!(fake.calls(), 1);
}

// I6: a lease covers its holder's whole work, however long admission and the upstream take.
#[tokio::test(start_paused = true)]
async fn a_lease_outlives_a_slow_holder_so_no_other_replica_sends_the_refresh_token() {
    let (replicas, Setup { fake, .. }) = fleet(2, Duration::from_secs(2));
    fake.gate.forget_permits(1_000);
    let first = tokio::spawn({
        let broker = replicas[0].clone();
        async move { broker.token(ask(refresh())).await }
    });
    settle().await;
    // Far beyond the lease's TTL (request_timeout + 1 s).
    tokio::time::sleep(Duration::from_secs(20)).await;
    let second = tokio::spawn({
        let broker = replicas[1].clone();
        async move { broker.token(ask(refresh())).await }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(fake.calls(), 1, "the second replica waits for the holder");
    fake.gate.add_permits(10);
    let (a, _) = first.await.unwrap().unwrap();
    let (b, source) = second.await.unwrap().unwrap();
    assert_eq!((access(&a), access(&b)), ("at-1", "at-1"));
    assert_eq!(source, Source::Coalesced);
    assert_eq!(*fake.credentials.lock().unwrap(), ["caller-rt"]);
}

// I6: a holder whose lease ran out by its own clock sends nothing.
#[tokio::test(start_paused = true)]
async fn a_holder_whose_lease_ran_out_sends_nothing() {
    let shared = MemoryFleet::default();
    let id = Digest([1; 32]);
    let lease = shared
        .lease(&id, Duration::from_secs(3))
        .await
        .unwrap()
        .unwrap();
    let held = lease::HeldLease::keep(
        shared.clone(),
        id,
        lease,
        Duration::from_secs(3),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(held.clock().holds(), "extended while held");
    shared.set_down(true);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !held.clock().holds(),
        "ran out while the store did not answer"
    );
    shared.set_down(false);
    held.release().await;
    assert!(!shared.leased(&id).await.unwrap());
}

// I10: inside the window a caller waits for the renewal; a renewal that fails leaves the old
// token serving, reported alive until the next try (which will end it), and that try backs
// off instead of going out on every hit (I9).
#[tokio::test]
async fn a_failed_renewal_serves_the_old_token_and_backs_off_instead_of_retrying_per_hit() {
    let Setup {
        broker,
        fake,
        clock,
        ..
    } = setup();
    broker.token(ask(jwt())).await.unwrap();
    clock.advance(Duration::from_secs(HOUR - 200));
    fake.push(Err(unavailable()));
    fake.push(Err(unavailable()));
    let (token, _) = broker.token(ask(jwt())).await.unwrap();
    assert_eq!(access(&token), "at-1", "the old token is still good");
    assert!(
        token.expires_in.is_some_and(|secs| secs <= 1),
        "reported alive until the next try, which will end it: {:?}",
        token.expires_in
    );
    assert_eq!(fake.calls(), 3, "the refresh, then the grant once more");
    for _ in 0..20 {
        let (token, _) = broker.token(ask(jwt())).await.unwrap();
        assert_eq!(access(&token), "at-1");
    }
    settle().await;
    assert_eq!(fake.calls(), 3, "no renewal per hit while it backs off");
    clock.advance(Duration::from_secs(5));
    let (token, _) = broker.token(ask(jwt())).await.unwrap();
    assert_eq!(access(&token), "at-4", "the next try after the backoff");
}

// I10: an entry that callers use renews at its planned point by itself.
#[tokio::test(start_paused = true)]
async fn a_used_entry_renews_itself_at_the_planned_point() {
    let Setup {
        broker,
        fake,
        clock,
        ..
    } = setup();
    let (token, _) = broker.token(ask(jwt())).await.unwrap();
    let planned = Duration::from_secs(token.expires_in.unwrap());
    broker.token(ask(jwt())).await.unwrap();
    clock.advance(planned);
    // expires_in is rounded to the second; the renewal is due within one.
    tokio::time::sleep(planned + Duration::from_secs(1)).await;
    settle().await;
    assert_eq!(fake.calls(), 2, "renewed without a call");
    assert_eq!(
        *fake.grants.lock().unwrap(),
        [GrantKind::JwtBearer, GrantKind::RefreshToken]
    );
    let (token, source) = broker.token(ask(jwt())).await.unwrap();
    assert_eq!((access(&token), source), ("at-2", Source::Cache));
}

// I4: a renewal's 429 penalises the user the grant was for, not the whole client.
#[tokio::test]
async fn a_renewal_is_sent_for_the_user_of_the_grant_that_got_it() {
    let Setup {
        broker,
        fake,
        clock,
        ..
    } = setup();
    broker.token(ask(alice_jwt())).await.unwrap();
    clock.advance(Duration::from_secs(HOUR - 200));
    broker.token(ask(alice_jwt())).await.unwrap();
    assert_eq!(
        *fake.grants.lock().unwrap(),
        [GrantKind::JwtBearer, GrantKind::RefreshToken]
    );
    assert_eq!(
        *fake.users.lock().unwrap(),
        [Some("alice".to_owned()), Some("alice".to_owned())]
    );
}

// I7: an entry older than a notice's version is never put back.
#[tokio::test]
async fn an_entry_older_than_an_invalidation_is_never_kept_again() {
    let (replicas, Setup { fake, .. }) = fleet(1, Duration::from_secs(10));
    let broker = &replicas[0];
    broker.token(ask(jwt())).await.unwrap();
    let id = identity::identity(
        &broker.inner.keys,
        &jwt(),
        Some("app"),
        &broker.inner.token_url,
    );
    let old = broker.inner.local.get(&id).unwrap();
    broker.inner.raise_floor(&id, old.version + 1);
    assert!(
        broker.inner.local.get(&id).is_none(),
        "dropped by the notice"
    );
    assert!(
        !broker.inner.keep_locally(&id, old),
        "a read from before the notice is not kept"
    );
    assert_eq!(fake.calls(), 1);
}

// I7: a revocation made while Redis was down reaches it before this replica reads it again.
#[tokio::test]
async fn a_revocation_during_an_outage_reaches_the_fleet_before_it_is_read_again() {
    let (replicas, Setup { fake, .. }) = fleet(2, Duration::from_secs(10));
    let (token, _) = replicas[0].token(ask(jwt())).await.unwrap();
    let fleet = replicas[0].inner.fleet.clone().unwrap();
    fleet.set_down(true);
    replicas[0].forget(access(&token)).await;
    fleet.set_down(false);
    let (again, source) = replicas[0].token(ask(jwt())).await.unwrap();
    assert_ne!(access(&again), "at-1", "{source:?}");
    let (other, _) = replicas[1].token(ask(jwt())).await.unwrap();
    assert_ne!(access(&other), "at-1", "the fleet's copy is gone too");
    assert_eq!(fake.calls(), 2);
}

// Background tasks hold the broker and the guard weakly: dropping them frees both.
#[tokio::test]
async fn dropping_the_broker_frees_it_and_its_guard() {
    let shared = MemoryFleet::default();
    let setup = setup();
    let guard = Arc::new(RateLimitGuard::new(None));
    let broker = Broker::new(
        &CacheConfig::default(),
        Parts {
            fetch: setup.fake.clone(),
            keys: Arc::new(Keys::new(None)),
            clock: setup.clock.clone(),
            token_url: "https://platform.example/token".into(),
            request_timeout: Duration::from_secs(10),
            refresh_ends_access_token: true,
            fleet: Some(shared.join()),
            guard: guard.clone(),
            metrics: setup.metrics.clone(),
        },
    );
    broker.token(ask(jwt())).await.unwrap();
    broker.token(ask(jwt())).await.unwrap();
    let (inner, guard_left) = (Arc::downgrade(&broker.inner), Arc::downgrade(&guard));
    drop((broker, guard));
    settle().await;
    assert!(inner.upgrade().is_none(), "the broker is freed");
    assert!(guard_left.upgrade().is_none(), "the guard is freed");
}

// I1 with RevokeToken (found by the model): revoking the token a code or refresh token was
// exchanged for spends its replayed result instead of dropping it, so an identical request
// in the window cannot send the credential again.
#[tokio::test]
async fn revoking_a_replayed_token_never_lets_its_credential_go_upstream_again() {
    let (replicas, Setup { fake, .. }) = fleet(2, Duration::from_secs(10));
    for one_time in [code(), refresh()] {
        let (token, _) = replicas[0].token(ask(one_time.clone())).await.unwrap();
        replicas[0].forget(access(&token)).await;
        for replica in &replicas {
            let again = replica.token(ask(one_time.clone())).await.unwrap_err();
            assert!(matches!(again, Failure::CredentialSpent), "{again:?}");
        }
    }
    assert_eq!(*fake.credentials.lock().unwrap(), ["code-1", "caller-rt"]);
    let Setup { broker, fake, .. } = setup();
    let (token, _) = broker.token(ask(code())).await.unwrap();
    broker.forget(access(&token)).await;
    let again = broker.token(ask(code())).await.unwrap_err();
    assert!(matches!(again, Failure::CredentialSpent), "{again:?}");
    assert_eq!(fake.calls(), 1, "the memory backend spends it too");
}

// I1, I10: a kept refresh token the upstream refused is dead; when the grant run in its place
// fails too, the entry holding it is dropped rather than kept on, so no later try sends it
// again (the campaign saw a second invalid_grant) and its token is not served.
#[tokio::test(start_paused = true)]
async fn a_refused_kept_refresh_token_is_never_sent_again() {
    let Setup {
        broker,
        fake,
        clock,
        ..
    } = setup();
    broker.token(ask(jwt())).await.unwrap();
    clock.advance(Duration::from_secs(HOUR - 200));
    fake.push(Err(oauth("invalid_grant")));
    fake.push(Err(unavailable()));
    let failure = broker.token(ask(jwt())).await.unwrap_err();
    assert_eq!(crate::error::reason(&failure), "UPSTREAM_UNAVAILABLE");
    clock.advance(Duration::from_secs(10));
    let (token, source) = broker.token(ask(jwt())).await.unwrap();
    assert_eq!((access(&token), source), ("at-4", Source::Upstream));
    settle().await;
    assert_eq!(
        *fake.grants.lock().unwrap(),
        [
            GrantKind::JwtBearer,
            GrantKind::RefreshToken,
            GrantKind::JwtBearer,
            GrantKind::JwtBearer
        ],
        "the refused refresh token went out once"
    );
}
