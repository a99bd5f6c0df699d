//! RevokeToken on one replica drops the entry on every replica.

use std::time::Duration;

use tokengate::proto::TokenSource;
use tokio::time::Instant;

use crate::harness::{Fleet, PATIENCE, jwt, source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_replica_drops_the_entry_on_every_replica() {
    let fleet = Fleet::start(3).await;
    let request = jwt("revoked");
    let revoked = fleet.token(0, &request).await.access_token;
    for replica in 1..3 {
        let hit = fleet.token(replica, &request).await;
        assert_eq!(source(&hit), TokenSource::Cache);
        assert_eq!(hit.access_token, revoked, "every local layer holds it");
    }
    assert_eq!(fleet.entry_keys().len(), 1);

    fleet.revoke(1, "revoked", &revoked).await;
    assert_eq!(fleet.upstream.revocations(), 1);
    assert_eq!(
        fleet.upstream.posts().last().unwrap().field("token"),
        Some(revoked.as_str())
    );
    assert!(
        fleet.entry_keys().is_empty(),
        "the entry is gone from Redis"
    );

    // Each replica drops its local copy when the notice reaches it: until then (a few
    // milliseconds at most) it may still answer from it; never after.
    let mut fresh = Vec::new();
    for replica in [0, 2, 1] {
        let deadline = Instant::now() + PATIENCE;
        let answer = loop {
            let answer = fleet.token(replica, &request).await;
            if answer.access_token != revoked {
                break answer;
            }
            assert!(
                Instant::now() < deadline,
                "replica {replica} still serves the revoked token after {PATIENCE:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        fresh.push(answer.access_token);
    }
    assert!(
        fresh.iter().all(|t| *t == fresh[0]),
        "one new token: {fresh:?}"
    );
    assert_eq!(
        fleet.upstream.posts_with("client_id", "revoked"),
        2,
        "one new upstream call for the fleet; POSTs:{}",
        fleet.upstream.summary()
    );
}
