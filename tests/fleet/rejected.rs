//! `rejected_access_token` reported by many callers on every replica at once: one new
//! token for all of them, and a late report of the same token costs nothing.

use std::collections::BTreeSet;

use tokengate::proto::{GetTokenRequest, TokenSource};

use crate::harness::{Fleet, jwt, source, sources};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rejected_by_many_callers_at_once_is_replaced_once_for_the_fleet() {
    let fleet = Fleet::start(3).await;
    let request = jwt("rejected");
    let first = fleet.token(0, &request).await;
    assert_eq!(source(&first), TokenSource::Upstream);
    // Every replica now holds it in its local layer too.
    for replica in 1..3 {
        let hit = fleet.token(replica, &request).await;
        assert_eq!(
            (source(&hit), hit.access_token.as_str()),
            (TokenSource::Cache, first.access_token.as_str())
        );
    }
    assert_eq!(fleet.upstream.posts_with("client_id", "rejected"), 1);

    let reported = GetTokenRequest {
        rejected_access_token: first.access_token.clone(),
        ..request.clone()
    };
    let answers = fleet.burst_ok(&reported, 10).await;

    assert_eq!(
        fleet.upstream.posts_with("client_id", "rejected"),
        2,
        "one new token for 30 reports on 3 replicas; POSTs:{}",
        fleet.upstream.summary()
    );
    let tokens: BTreeSet<&str> = answers
        .iter()
        .map(|(_, a)| a.access_token.as_str())
        .collect();
    assert_eq!(tokens.len(), 1, "one new token for all: {tokens:?}");
    let fresh = answers[0].1.access_token.clone();
    assert_ne!(
        fresh, first.access_token,
        "the rejected token is not served"
    );
    let (upstream, _, _, replayed) = sources(answers.iter().map(|(_, a)| a));
    assert_eq!((upstream, replayed), (1, 0));

    // Reporting the old token again: the cache already holds a newer one.
    for replica in 0..3 {
        let again = fleet.token(replica, &reported).await;
        assert_eq!(
            (source(&again), again.access_token.as_str()),
            (TokenSource::Cache, fresh.as_str()),
            "replica {replica}"
        );
    }
    assert_eq!(fleet.upstream.posts_with("client_id", "rejected"), 2);
}

/// A replica that missed the renewal's notice (its subscription was down) still holds the
/// rejected token, and a caller reports it there: the newer token in Redis is what it must
/// answer, with no upstream call, rather than taking that newer token for the rejected one,
/// dropping it and fetching a third.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_the_renewal_answers_a_late_report_with_the_newer_token() {
    let fleet = Fleet::start(3).await;
    let request = jwt("stale");
    let first = fleet.token(0, &request).await;
    assert_eq!(source(&fleet.token(2, &request).await), TokenSource::Cache);

    // Replica c is frozen and its subscription cut: the renewal's notice will not reach it.
    // Once thawed it resubscribes after a backoff, and the report below comes first.
    fleet.replicas[2].process.freeze();
    fleet
        .redis
        .command(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .expect("CLIENT KILL");
    fleet.wait_subscribers(2).await;
    let reported = GetTokenRequest {
        rejected_access_token: first.access_token.clone(),
        ..request.clone()
    };
    let renewed = fleet.token(1, &reported).await;
    assert_ne!(renewed.access_token, first.access_token);
    assert_eq!(fleet.upstream.posts_with("client_id", "stale"), 2);

    let late = tokio::spawn({
        let mut client = fleet.client(2);
        let reported = reported.clone();
        async move { client.get_token(reported).await }
    });
    fleet.replicas[2].process.thaw();
    let late = late
        .await
        .unwrap()
        .unwrap_or_else(|status| panic!("replica c: {status:?}"))
        .into_inner();
    assert_eq!(
        (source(&late), late.access_token.as_str()),
        (TokenSource::Cache, renewed.access_token.as_str()),
        "the newer token, from Redis; POSTs:{}",
        fleet.upstream.summary()
    );
    assert_eq!(fleet.upstream.posts_with("client_id", "stale"), 2);
    let shared = fleet.token(0, &request).await;
    assert_eq!(
        shared.access_token, renewed.access_token,
        "the fleet still shares it"
    );
}
