//! Identical calls spread over the fleet: one upstream call per distinct request.

use std::collections::BTreeSet;
use std::time::Duration;

use tokengate::proto::TokenSource;

use crate::harness::{Fleet, client_credentials, jwt, source, sources};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_spread_over_three_replicas_reach_the_upstream_once_per_request() {
    // Slow enough that every call of a burst starts before the first answer comes back.
    let fleet = Fleet::start_with(3, Duration::from_secs(1), None).await;
    let by_jwt = jwt("burst-jwt");
    let by_secret = client_credentials("burst-cc");

    // Two different requests at once, ten calls of each on every replica.
    let (jwt_answers, cc_answers) =
        tokio::join!(fleet.burst_ok(&by_jwt, 10), fleet.burst_ok(&by_secret, 10));

    for (client_id, answers) in [("burst-jwt", &jwt_answers), ("burst-cc", &cc_answers)] {
        assert_eq!(answers.len(), 30);
        assert_eq!(
            fleet.upstream.posts_with("client_id", client_id),
            1,
            "{client_id}: one upstream call for 30 calls on 3 replicas; POSTs:{}",
            fleet.upstream.summary()
        );
        let tokens: BTreeSet<&str> = answers
            .iter()
            .map(|(_, a)| a.access_token.as_str())
            .collect();
        assert_eq!(
            tokens.len(),
            1,
            "{client_id}: one token for all: {tokens:?}"
        );
        assert!(
            answers.iter().all(|(_, a)| a.refresh_token.is_empty()),
            "{client_id}: a cached grant hands out no refresh token"
        );
        let (upstream, cache, coalesced, replayed) = sources(answers.iter().map(|(_, a)| a));
        assert_eq!(
            (upstream, cache + coalesced, replayed),
            (1, 29, 0),
            "{client_id}: one caller went upstream, the others shared its call or its result"
        );
        // The replicas that did not call waited for the one that did (fleet-wide
        // single-flight), rather than each calling and one winning.
        let leader = answers
            .iter()
            .find(|(_, a)| source(a) == TokenSource::Upstream)
            .map(|(r, _)| *r)
            .unwrap();
        for replica in (0..3).filter(|r| *r != leader) {
            assert!(
                answers
                    .iter()
                    .any(|(r, a)| *r == replica && source(a) == TokenSource::Coalesced),
                "{client_id}: replica {replica} joined the flight of replica {leader}"
            );
        }
    }
    assert_eq!(fleet.upstream.token_posts(), 2);

    // Then every replica answers both from the cache, with the same tokens.
    for replica in 0..3 {
        for (request, answers) in [(&by_jwt, &jwt_answers), (&by_secret, &cc_answers)] {
            let hit = fleet.token(replica, request).await;
            assert_eq!(source(&hit), TokenSource::Cache, "replica {replica}");
            assert_eq!(hit.access_token, answers[0].1.access_token);
        }
    }
    assert_eq!(fleet.upstream.token_posts(), 2, "hits send nothing");
}
