//! Storms of 429 and 503, concurrent and sequential, and an upstream that flaps between
//! healthy and failing every other request.

use std::time::Duration;

use testkit::{FaultyUpstream, Mode};
use tokengate::proto::token_service_client::TokenServiceClient;
use tokengate::proto::{AuthorizationCodeGrant, GetTokenRequest, get_token_request::Grant};
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::{Gate, assert_failure, call, retry_delay};

/// Calls `ids` concurrently (all at once) and returns the results in order of `ids`.
async fn concurrently(
    client: &TokenServiceClient<Channel>,
    ids: &[String],
) -> Vec<Result<tokengate::proto::GetTokenResponse, tonic::Status>> {
    let mut calls = JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let (mut client, id) = (client.clone(), id.clone());
        calls.spawn(async move { (i, call(&mut client, &id).await) });
    }
    let mut results: Vec<_> = calls.join_all().await;
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Waits until the upstream has counted `n` connections, then asserts exactly `n`.
async fn assert_connections(upstream: &FaultyUpstream, n: usize, what: &str) {
    testkit::wait::until(
        &format!("{what}: {n} upstream requests"),
        Duration::from_secs(2),
        || async { upstream.connections() >= n },
    )
    .await;
    assert_eq!(upstream.connections(), n, "{what}: upstream requests");
}

fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_storm_penalises_each_client_and_later_calls_are_refused_without_sending() {
    let upstream = FaultyUpstream::start(Mode::Status(429, None)).await;
    let gate = Gate::start(&upstream.url()).await;
    let clients = ids("storm429", 32);

    for result in concurrently(&gate.client, &clients).await {
        let status = assert_failure(
            &result,
            Code::ResourceExhausted,
            "UPSTREAM_RATE_LIMITED",
            "429 storm",
        );
        assert_eq!(retry_delay(&status), Some(Duration::from_secs(30)));
    }
    // No Retry-After: nothing is waited out or sent again.
    assert_connections(&upstream, 32, "first wave").await;

    // The upstream is healthy again, but its 30 s penalty is still running: the same
    // clients are answered locally, and nothing is sent (RingCentral would restart it).
    upstream.set(Mode::Healthy).await;
    for result in concurrently(&gate.client, &clients).await {
        let status = assert_failure(
            &result,
            Code::ResourceExhausted,
            "UPSTREAM_RATE_LIMITED",
            "second wave, refused locally",
        );
        let wait = retry_delay(&status).unwrap();
        assert!(
            wait <= Duration::from_secs(30) && wait > Duration::from_secs(20),
            "{wait:?}"
        );
    }
    assert_connections(&upstream, 32, "second wave").await;

    // Other clients are not penalised.
    let mut client = gate.client.clone();
    call(&mut client, "storm429-bystander").await.unwrap();
    assert_connections(&upstream, 33, "bystander").await;
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_penalty_ends_when_retry_after_has_passed() {
    let upstream = FaultyUpstream::start(Mode::Status(429, Some("1"))).await;
    let mut gate = Gate::start(&upstream.url()).await;
    let status = assert_failure(
        &call(&mut gate.client, "short-penalty").await,
        Code::ResourceExhausted,
        "UPSTREAM_RATE_LIMITED",
        "429 with Retry-After: 1",
    );
    // One second does not fit in the 300 ms request_timeout: no wait, no re-send.
    assert_eq!(retry_delay(&status), Some(Duration::from_secs(1)));
    assert_connections(&upstream, 1, "429 Retry-After: 1").await;
    upstream.set(Mode::Healthy).await;
    assert_failure(
        &call(&mut gate.client, "short-penalty").await,
        Code::ResourceExhausted,
        "UPSTREAM_RATE_LIMITED",
        "within the penalty",
    );
    assert_connections(&upstream, 1, "within the penalty").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    call(&mut gate.client, "short-penalty").await.unwrap();
    assert_connections(&upstream, 2, "after the penalty").await;
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_or_503_with_retry_after_zero_is_sent_at_most_three_times() {
    for status in [429, 503] {
        let upstream = FaultyUpstream::start(Mode::Status(status, Some("0"))).await;
        let mut gate = Gate::start(&upstream.url()).await;
        for round in 0..3 {
            // The same client every round: a zero wait leaves no penalty behind.
            let result = call(&mut gate.client, "zero-wait").await;
            let (code, reason) = match status {
                429 => (Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED"),
                _ => (Code::Unavailable, "UPSTREAM_UNAVAILABLE"),
            };
            let failed = assert_failure(&result, code, reason, &format!("{status} storm"));
            assert_eq!(retry_delay(&failed), Some(Duration::ZERO));
            assert_connections(
                &upstream,
                3 * (round + 1),
                &format!("{status} round {round}"),
            )
            .await;
        }
        gate.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_storm_is_not_penalised_and_each_call_is_sent_once() {
    let upstream = FaultyUpstream::start(Mode::Status(503, None)).await;
    let gate = Gate::start(&upstream.url()).await;
    let clients = ids("storm503", 32);
    for wave in 1..=2 {
        for result in concurrently(&gate.client, &clients).await {
            let status = assert_failure(
                &result,
                Code::Unavailable,
                "UPSTREAM_UNAVAILABLE",
                "503 storm",
            );
            assert_eq!(retry_delay(&status), None, "no Retry-After, no RetryInfo");
        }
        assert_connections(&upstream, 32 * wave, "503 storm").await;
    }
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_during_a_503_storm_stay_within_the_retry_budget() {
    // Every answer is 503 with Retry-After: 0, so every call would like two more attempts.
    // The budget (tower TpsBudget: 10 s window, 10 retries/s reserve, 20 % of calls) caps
    // the re-sends at 100 + 0.2 x calls, so a failing upstream is not hammered 3x.
    const CALLS: usize = 300;
    let upstream = FaultyUpstream::start(Mode::Status(503, Some("0"))).await;
    // Nothing hangs here; a roomy request_timeout keeps three quick attempts from being
    // cut short when the machine is busy with the rest of the suite.
    let gate = Gate::start_with(&upstream.url(), Duration::from_secs(5)).await;
    let clients = ids("budget", CALLS);
    for wave in clients.chunks(32) {
        for result in concurrently(&gate.client, wave).await {
            assert_failure(
                &result,
                Code::Unavailable,
                "UPSTREAM_UNAVAILABLE",
                "503 storm",
            );
        }
    }
    let sent = upstream.connections();
    let ceiling = CALLS + 100 + CALLS / 5;
    println!("503 storm, Retry-After: 0: {CALLS} calls sent {sent} requests (ceiling {ceiling})");
    assert!(
        sent >= CALLS + 100,
        "the reserve allows 100 retries: {sent}"
    );
    assert!(
        sent <= ceiling,
        "retries beyond the budget: {sent} > {ceiling}"
    );
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_is_ridden_out_when_a_retry_is_allowed_and_surfaced_when_not() {
    let upstream = FaultyUpstream::start(Mode::Healthy).await;
    let mut gate = Gate::start(&upstream.url()).await;

    // Each call asks for its own scope, so the broker sees a new request every time and
    // every call reaches the upstream.
    let mut n = 0;
    let mut flap = async |client: &mut TokenServiceClient<Channel>| {
        n += 1;
        let request = GetTokenRequest {
            scopes: vec![format!("call-{n}")],
            ..crate::harness::request("flapper")
        };
        tokio::time::timeout(crate::harness::PATIENCE, client.get_token(request))
            .await
            .expect("tokengate answers within PATIENCE")
            .map(tonic::Response::into_inner)
    };

    // Retryable failures (503 or 429 that name a wait that fits): every call succeeds on
    // its second attempt. The same client every time: a 429 retried into a success leaves
    // no penalty.
    for failing in [Mode::Status(503, Some("0")), Mode::Status(429, Some("0"))] {
        upstream
            .set(Mode::Cycle(vec![failing.clone(), Mode::Healthy]))
            .await;
        let before = upstream.connections();
        for _ in 0..10 {
            let token = flap(&mut gate.client)
                .await
                .unwrap_or_else(|s| panic!("flapping {failing:?}: {s:?}"));
            assert_eq!(token.access_token, "fault-suite-token");
        }
        assert_connections(&upstream, before + 20, &format!("flapping {failing:?}")).await;
    }

    // Failures after which a re-send is not safe or not allowed: every other call fails,
    // and nothing is sent twice.
    let not_retried = [
        (
            Mode::Status(503, None),
            Code::Unavailable,
            "UPSTREAM_UNAVAILABLE",
        ),
        (
            Mode::ResetAfterRequest,
            Code::Unavailable,
            "UPSTREAM_UNAVAILABLE",
        ),
        (Mode::Html, Code::Unavailable, "UPSTREAM_BAD_RESPONSE"),
    ];
    for (failing, code, reason) in not_retried {
        upstream
            .set(Mode::Cycle(vec![failing.clone(), Mode::Healthy]))
            .await;
        let before = upstream.connections();
        for i in 0..10 {
            let result = flap(&mut gate.client).await;
            if i % 2 == 0 {
                assert_failure(&result, code, reason, &format!("flapping {failing:?}"));
            } else {
                result.unwrap_or_else(|s| panic!("flapping {failing:?}, call {i}: {s:?}"));
            }
        }
        assert_connections(&upstream, before + 10, &format!("flapping {failing:?}")).await;
    }
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_code_is_never_sent_twice_even_when_the_wait_fits() {
    let upstream = FaultyUpstream::start(Mode::Cycle(vec![
        Mode::Status(503, Some("0")),
        Mode::Healthy,
    ]))
    .await;
    let mut gate = Gate::start(&upstream.url()).await;
    let code_grant = GetTokenRequest {
        grant: Some(Grant::AuthorizationCode(AuthorizationCodeGrant {
            code: "one-time-code".to_owned(),
            ..Default::default()
        })),
        client_id: "code-app".to_owned(),
        ..Default::default()
    };
    let result = gate
        .client
        .get_token(code_grant.clone())
        .await
        .map(tonic::Response::into_inner);
    assert_failure(
        &result,
        Code::Unavailable,
        "UPSTREAM_UNAVAILABLE",
        "code grant",
    );
    assert_connections(&upstream, 1, "authorization_code").await;
    gate.client.get_token(code_grant).await.unwrap();
    assert_connections(&upstream, 2, "authorization_code").await;
    gate.stop().await;
}
