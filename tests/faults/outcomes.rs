//! One call per fault, in process: the gRPC code, the ErrorInfo reason, RetryInfo, how
//! many times the upstream was tried, and that tokengate recovers when the upstream does.

use std::time::Duration;

use testkit::{FaultyUpstream, Mode};
use tokio::time::Instant;
use tonic::Code;

use crate::cases::cases;
use crate::harness::{Gate, REQUEST_TIMEOUT, assert_failure, call};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_ends_in_its_contract_outcome_and_the_next_healthy_call_succeeds() {
    let upstream = FaultyUpstream::start(Mode::Healthy).await;
    let mut gate = Gate::start(&upstream.url()).await;
    for (i, case) in cases().into_iter().enumerate() {
        upstream.set(case.mode.clone()).await;
        let before = upstream.connections();
        let started = Instant::now();
        // Each call names its own (public) client, so a 429 penalty never touches the next.
        let result = call(&mut gate.client, &format!("case-{i}")).await;
        let took = started.elapsed();
        case.check(&result);
        if let Some(expected) = case.connections {
            // A reset or refusal may be noticed by tokengate before the upstream's counter
            // moves; give the counter a moment (more than expected fails just below).
            testkit::wait::until(
                &format!("{}: {expected} upstream request(s)", case.name),
                Duration::from_secs(2),
                || async { upstream.connections() - before >= expected },
            )
            .await;
            assert_eq!(
                upstream.connections() - before,
                expected,
                "{}: upstream requests",
                case.name
            );
        }
        // Nothing waits longer than request_timeout (plus scheduling slack), and the
        // timeouts wait that long.
        assert!(
            took < REQUEST_TIMEOUT + Duration::from_secs(2),
            "{}: took {took:?}",
            case.name
        );
        if case.reason == "UPSTREAM_TIMEOUT" {
            assert!(took >= REQUEST_TIMEOUT, "{}: took {took:?}", case.name);
        }
        println!("{:<28} -> {:?} in {took:?}", case.name, case.code);

        // The upstream recovers: the very next call succeeds.
        upstream.set(Mode::Healthy).await;
        let healthy = call(&mut gate.client, &format!("recovered-{i}")).await;
        let token = healthy.unwrap_or_else(|s| panic!("after {}: {s:?}", case.name));
        assert_eq!(token.access_token, "fault-suite-token");
    }
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upstream_is_tried_again_before_the_call_fails() {
    // The listener closes, tokengate retries the connect with backoff; the upstream comes
    // back while the call is still retrying... or not; either way the call ends within
    // request_timeout and the next one succeeds. What is asserted: refused connects are not
    // reported as a timeout, and they do not wait out request_timeout.
    let upstream = FaultyUpstream::start(Mode::Refuse).await;
    let mut gate = Gate::start(&upstream.url()).await;
    let started = Instant::now();
    let result = call(&mut gate.client, "refused").await;
    assert_failure(
        &result,
        Code::Unavailable,
        "UPSTREAM_UNAVAILABLE",
        "refused",
    );
    assert!(
        started.elapsed() < REQUEST_TIMEOUT,
        "three refused connects with backoff take well under request_timeout: {:?}",
        started.elapsed()
    );
    upstream.set(Mode::Healthy).await;
    call(&mut gate.client, "refused").await.unwrap();
    gate.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_deadline_ends_a_hang_long_before_request_timeout() {
    let upstream = FaultyUpstream::start(Mode::Hang).await;
    // request_timeout is long here: only the caller's 100 ms deadline can end the call.
    let mut gate = Gate::start_with(&upstream.url(), Duration::from_secs(5)).await;
    let mut request = tonic::Request::new(crate::harness::request("deadline"));
    request.set_timeout(Duration::from_millis(100));
    let started = Instant::now();
    let result = gate
        .client
        .get_token(request)
        .await
        .map(tonic::Response::into_inner);
    let took = started.elapsed();
    // tokengate answers DEADLINE_EXCEEDED 5 ms before the deadline; on a busy machine
    // tonic's own client-side timer (which answers CANCELLED "Timeout expired", locally)
    // can still fire first. Either way the caller is released at its deadline.
    let status = result.expect_err("a hang cannot produce a token");
    if status.code() == Code::Cancelled {
        assert_eq!(status.message(), "Timeout expired", "{status:?}");
    } else {
        assert_failure(
            &Err(status),
            Code::DeadlineExceeded,
            "DEADLINE_EXCEEDED",
            "hang with a 100 ms deadline",
        );
    }
    assert!(took < Duration::from_secs(2), "{took:?}");
    // And tokengate gave up on the upstream at the deadline too: the hanging connection
    // is closed long before the 5 s request_timeout.
    testkit::wait::until(
        "the hanging upstream connection to be closed after the call",
        Duration::from_secs(2),
        || async { upstream.open() == 0 },
    )
    .await;
    gate.stop().await;
}

/// A token's lifetime counts from when its request was sent, not from its answer: the
/// upstream's clock started no later, so however slow the answer, the reported expiry is
/// never after the token's own (§8.1 I10).
#[tokio::test]
async fn a_slow_answer_does_not_stretch_the_reported_lifetime() {
    let upstream = FaultyUpstream::start(Mode::Slow(Duration::from_millis(1500))).await;
    // Not cached: a cached token reports up to its planned renewal, well before 3600 s.
    let toml = crate::harness::config_toml(&upstream.url(), Duration::from_secs(5))
        + "\n[cache]\ngrants = []\n";
    let mut gate = Gate::start_config(&tokengate::Config::from_toml(&toml).unwrap()).await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let token = call(&mut gate.client, "slow").await.unwrap();
    let expires_at = token.expires_at.expect("expires_at is set");
    let expires_at = Duration::new(expires_at.seconds as u64, expires_at.nanos as u32);
    // The upstream said 3600 s, counted from no earlier than `before`.
    let latest = before + Duration::from_secs(3600) + Duration::from_millis(500);
    assert!(
        expires_at <= latest,
        "expires_at is {:?} after the token's own expiry",
        expires_at - (before + Duration::from_secs(3600))
    );
    assert!(expires_at >= before + Duration::from_secs(3599));
    gate.stop().await;
}
