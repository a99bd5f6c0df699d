//! Redis killed in the middle of a burst: every call still succeeds, each replica going on
//! alone (at most one upstream call each); once Redis is back the replicas rejoin and a
//! burst is one upstream call for the fleet again.

use std::collections::BTreeMap;
use std::time::Duration;

use tokengate::proto::TokenSource;

use crate::harness::{Fleet, LOST, PATIENCE, REJOINED, jwt, source, sources, succeeded};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_burst_then_restarted() {
    let mut fleet = Fleet::start_with(3, Duration::from_secs(1), None).await;
    let request = jwt("outage");
    let burst = fleet.burst(&request, &[0, 1, 2], 8);
    // The first upstream call is under way (its replica holds the lease; the others wait
    // for its result in Redis): Redis goes away now.
    fleet
        .upstream
        .wait_for_posts(1, PATIENCE, |p| p.field("client_id") == Some("outage"))
        .await;
    fleet.redis.kill();

    let answers = succeeded(burst.join_all().await);
    assert_eq!(answers.len(), 24, "every call succeeded");
    let posts = fleet.upstream.posts_with("client_id", "outage");
    assert!(
        (1..=3).contains(&posts),
        "at most one upstream call per replica: {posts}"
    );
    let mut went_upstream = BTreeMap::new();
    for (replica, answer) in &answers {
        if source(answer) == TokenSource::Upstream {
            *went_upstream.entry(*replica).or_insert(0) += 1;
        }
    }
    assert!(
        went_upstream.values().all(|n| *n == 1),
        "one caller per replica at most went upstream: {went_upstream:?}"
    );
    assert_eq!(went_upstream.values().sum::<usize>(), posts);

    // Each replica noticed, says it goes on alone, and still answers from its memory.
    for replica in &fleet.replicas {
        replica.process.wait_for_message(PATIENCE, LOST).await;
    }
    for replica in 0..3 {
        let hit = fleet.token(replica, &request).await;
        assert_eq!(source(&hit), TokenSource::Cache, "replica {replica}");
    }

    fleet.redis.restart();
    for replica in &fleet.replicas {
        replica.process.wait_for_message(PATIENCE, REJOINED).await;
    }
    fleet.wait_subscribers(3).await;

    let after = jwt("after-outage");
    let answers = fleet.burst_ok(&after, 8).await;
    assert_eq!(
        fleet.upstream.posts_with("client_id", "after-outage"),
        1,
        "the fleet shares one upstream call again; POSTs:{}",
        fleet.upstream.summary()
    );
    let (upstream, ..) = sources(answers.iter().map(|(_, a)| a));
    assert_eq!(upstream, 1);
    assert!(
        answers
            .iter()
            .all(|(_, a)| a.access_token == answers[0].1.access_token)
    );
}
