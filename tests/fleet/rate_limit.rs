//! A 429 on one replica holds back the others: they refuse locally and send nothing.
//!
//! The penalty reaches the other replicas over pub/sub, so the test waits until they have
//! it, deterministically: it watches the channel for the penalty's notice, then has a
//! revocation publish an invalidation after it. Pub/sub keeps each subscriber's order, so a
//! replica that has dropped the revoked entry has applied the penalty before.

use std::time::Duration;

use tokengate::proto::TokenSource;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tonic::Code;
use tonic_types::StatusExt as _;

use crate::harness::{CHANNEL, Fleet, PATIENCE, assert_reason, jwt, source};

const RETRY_AFTER: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_on_one_replica_holds_back_the_others_without_a_request() {
    let fleet = Fleet::start(3).await;
    let probe = jwt("probe");
    let probe_token = fleet.token(1, &probe).await.access_token;
    assert_eq!(source(&fleet.token(2, &probe).await), TokenSource::Cache);

    let (subscribed, notice) = watch_channel(&fleet.redis.url());
    subscribed
        .await
        .expect("subscribed to the replicas' channel");

    fleet.upstream.rate_limit_next(1, RETRY_AFTER);
    let limited = jwt("limited");
    let status = fleet
        .get(0, &limited)
        .await
        .expect_err("the upstream said 429");
    assert_reason(&status, Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED");
    assert_eq!(fleet.upstream.posts_with("client_id", "limited"), 1);

    tokio::time::timeout(PATIENCE, notice)
        .await
        .expect("replica a announces its penalty on the channel")
        .expect("the watcher is alive");
    fleet.revoke(0, "probe", &probe_token).await;
    for replica in [1, 2] {
        let deadline = Instant::now() + PATIENCE;
        while fleet.token(replica, &probe).await.access_token == probe_token {
            assert!(
                Instant::now() < deadline,
                "replica {replica} never dropped the revoked probe"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Now replicas b and c know: every caller is refused, and nothing is sent.
    let answers = fleet.burst(&limited, &[1, 2], 5).join_all().await;
    for (replica, answer) in answers {
        let status = answer.expect_err("held back");
        assert_reason(&status, Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED");
        let wait = status
            .get_error_details()
            .retry_info()
            .and_then(|r| r.retry_delay)
            .unwrap_or_else(|| panic!("replica {replica}: no RetryInfo in {status:?}"));
        assert!(
            wait > Duration::from_secs(30) && wait <= RETRY_AFTER,
            "replica {replica} waits out the shared penalty: {wait:?}"
        );
    }
    let again = fleet.get(0, &limited).await.expect_err("held back");
    assert_reason(&again, Code::ResourceExhausted, "UPSTREAM_RATE_LIMITED");
    assert_eq!(
        fleet.upstream.posts_with("client_id", "limited"),
        1,
        "only replica a's first call reached the upstream; POSTs:{}",
        fleet.upstream.summary()
    );
    // Other clients are not held back.
    assert!(fleet.get(2, &jwt("unlimited")).await.is_ok());
}

/// Subscribes to the replicas' channel on a thread of its own; the first receiver fires
/// once subscribed, the second with the first message published after that.
fn watch_channel(url: &str) -> (oneshot::Receiver<()>, oneshot::Receiver<Vec<u8>>) {
    let (subscribed_tx, subscribed) = oneshot::channel();
    let (message_tx, message) = oneshot::channel();
    let client = redis::Client::open(url).expect("a redis URL");
    std::thread::spawn(move || {
        let mut connection = client.get_connection().expect("connect to redis");
        let mut pubsub = connection.as_pubsub();
        pubsub.subscribe(CHANNEL).expect("SUBSCRIBE");
        pubsub
            .set_read_timeout(Some(PATIENCE))
            .expect("a read timeout");
        let _ = subscribed_tx.send(());
        if let Ok(msg) = pubsub.get_message() {
            let _ = message_tx.send(msg.get_payload_bytes().to_vec());
        }
    });
    (subscribed, message)
}
