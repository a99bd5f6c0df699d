//! A lease holder frozen with SIGSTOP while its upstream call is under way: the other
//! replicas wait out the lease (`request_timeout` + 1 s), then go on with one more upstream
//! call between them; the frozen one, thawed, neither calls again nor overwrites their token,
//! and still exits cleanly.

use std::collections::BTreeSet;
use std::time::Duration;

use tokengate::proto::TokenSource;
use tokio::time::Instant;

use crate::harness::{Fleet, PATIENCE, REQUEST_TIMEOUT, jwt, source, sources, succeeded};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_lease_holder_costs_at_most_one_more_upstream_call() {
    // The upstream answers well within request_timeout, so only the freeze stops replica a.
    let mut fleet = Fleet::start_with(3, Duration::from_secs(1), None).await;
    let request = jwt("frozen");
    let lease = REQUEST_TIMEOUT + Duration::from_secs(1);

    // Replica a alone is asked: it takes the lease and calls. Its POST arriving proves both.
    let held = tokio::spawn({
        let mut client = fleet.client(0);
        let request = request.clone();
        async move { client.get_token(request).await }
    });
    fleet
        .upstream
        .wait_for_posts(1, PATIENCE, |p| p.field("client_id") == Some("frozen"))
        .await;
    fleet.replicas[0].process.freeze();
    let frozen_at = Instant::now();

    let answers = succeeded(fleet.burst(&request, &[1, 2], 5).join_all().await);
    let waited = frozen_at.elapsed();
    assert_eq!(
        fleet.upstream.posts_with("client_id", "frozen"),
        2,
        "one upstream call after the lease expired, for both replicas; POSTs:{}",
        fleet.upstream.summary()
    );
    let tokens: BTreeSet<&str> = answers
        .iter()
        .map(|(_, a)| a.access_token.as_str())
        .collect();
    assert_eq!(tokens.len(), 1, "replicas b and c share it: {tokens:?}");
    let token = answers[0].1.access_token.clone();
    let (upstream, _, _, replayed) = sources(answers.iter().map(|(_, a)| a));
    assert_eq!((upstream, replayed), (1, 0));
    // They waited for the lease to expire rather than calling at once (the count alone
    // would not tell), and not forever. Generous: the lease was taken just before the freeze.
    assert!(
        waited >= lease - Duration::from_secs(1) && waited < PATIENCE,
        "answered {waited:?} after the freeze (lease {lease:?})"
    );

    // Thawed, replica a finishes its call (with its own token, or a timeout), sends
    // nothing more, and its late write does not replace the fleet's newer token.
    fleet.replicas[0].process.thaw();
    let late = tokio::time::timeout(PATIENCE, held)
        .await
        .expect("replica a answers once thawed")
        .unwrap();
    if let Ok(answer) = &late {
        assert_eq!(source(answer.get_ref()), TokenSource::Upstream);
    }
    for replica in [0, 1, 2] {
        let hit = fleet.token(replica, &request).await;
        assert_eq!(
            (source(&hit), hit.access_token.as_str()),
            (TokenSource::Cache, token.as_str()),
            "replica {replica} serves the fleet's token"
        );
    }
    assert_eq!(fleet.upstream.posts_with("client_id", "frozen"), 2);
    fleet.replicas[0].process.stop().await;
}
