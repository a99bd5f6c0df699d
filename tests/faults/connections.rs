//! `upstream.max_connections`: calls beyond it wait for a turn instead of opening sockets.

use std::time::Duration;

use testkit::{FaultyUpstream, Mode};
use tokengate::Config;

use crate::harness::{Gate, PATIENCE, call, config_toml, request};

#[tokio::test]
async fn calls_beyond_max_connections_wait_for_a_turn_and_then_succeed() {
    let upstream = FaultyUpstream::start(Mode::Hang).await;
    let toml = config_toml(&upstream.url(), Duration::from_secs(10))
        .replace("[upstream]\n", "[upstream]\nmax_connections = 2\n");
    let gate = Gate::start_config(&Config::from_toml(&toml).unwrap()).await;

    // Two calls with a short deadline take both connections, and the upstream hangs them.
    let hung: Vec<_> = (0..2)
        .map(|i| {
            let mut client = gate.client.clone();
            let mut request = tonic::Request::new(request(&format!("hung-{i}")));
            request.set_timeout(Duration::from_millis(500));
            tokio::spawn(async move { client.get_token(request).await })
        })
        .collect();
    testkit::wait::until("the two calls to hang upstream", PATIENCE, || async {
        upstream.open() == 2
    })
    .await;
    upstream.set(Mode::Healthy).await;
    // Three more calls wait for a turn rather than opening sockets of their own.
    let waiting: Vec<_> = (0..3)
        .map(|i| {
            let mut client = gate.client.clone();
            tokio::spawn(async move { call(&mut client, &format!("waiting-{i}")).await })
        })
        .collect();
    // Without the limit they would connect within milliseconds; the hung pair still has
    // ~300 ms to go.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(upstream.connections(), 2, "max_connections was exceeded");

    for handle in hung {
        let result = handle.await.expect("the call task does not panic");
        assert!(result.is_err(), "a hung call cannot return a token");
    }
    for handle in waiting {
        let token = handle.await.expect("the call task does not panic").unwrap();
        assert_eq!(token.access_token, "fault-suite-token");
    }
    assert_eq!(upstream.connections(), 5);
    gate.stop().await;
}

/// A send that waited for a free connection is still given the whole `request_timeout`:
/// cut short by the time it spent waiting, it would be abandoned after it went out, and a
/// one-time credential would be spent with nobody to keep its answer (§8.1 I1).
#[tokio::test]
async fn a_call_that_waited_for_a_connection_gets_the_whole_request_timeout_once_sent() {
    let upstream = FaultyUpstream::start(Mode::Hang).await;
    let toml = config_toml(&upstream.url(), Duration::from_millis(1000))
        .replace("[upstream]\n", "[upstream]\nmax_connections = 1\n");
    let gate = Gate::start_config(&Config::from_toml(&toml).unwrap()).await;

    // A call with a 500 ms deadline holds the only connection, which the upstream hangs.
    let hung = {
        let mut client = gate.client.clone();
        let mut request = tonic::Request::new(request("hung"));
        request.set_timeout(Duration::from_millis(500));
        tokio::spawn(async move { client.get_token(request).await })
    };
    testkit::wait::until("the first call to hang upstream", PATIENCE, || async {
        upstream.open() == 1
    })
    .await;
    // The next call waits ~500 ms for that connection, then takes 700 ms upstream: past
    // what was left of a budget counted from its start, well inside one counted from its send.
    upstream.set(Mode::Slow(Duration::from_millis(700))).await;
    let mut client = gate.client.clone();
    let token = call(&mut client, "waited").await.unwrap();
    assert_eq!(token.access_token, "fault-suite-token");
    assert!(hung.await.expect("the call task does not panic").is_err());
    assert_eq!(upstream.connections(), 2, "one send each, no retry");
    gate.stop().await;
}
