//! A refresh token raced by callers on every replica: the upstream, which rotates refresh
//! tokens and refuses a spent one like RingCentral, sees it once; every caller gets the pair
//! that one call bought.

use std::collections::BTreeSet;

use testkit::Answer;
use tokengate::proto::TokenSource;

use crate::harness::{Fleet, refresh, source, sources};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_token_raced_across_replicas_reaches_the_upstream_once() {
    let fleet = Fleet::start(3).await;
    let (_, spent) = fleet.upstream.issue_pair();
    let request = refresh("refresh-race", &spent);

    let answers = fleet.burst_ok(&request, 10).await;

    assert_eq!(
        fleet.upstream.posts_with("refresh_token", &spent),
        1,
        "the refresh token reached the upstream once; POSTs:{}",
        fleet.upstream.summary()
    );
    let bought = match &fleet.upstream.answered()[..] {
        [(_, Answer::Token { access, refresh })] => (access.clone(), refresh.clone()),
        other => panic!("one POST, answered with a pair: {other:#?}"),
    };
    let pairs: BTreeSet<(&str, &str)> = answers
        .iter()
        .map(|(_, a)| (a.access_token.as_str(), a.refresh_token.as_str()))
        .collect();
    assert_eq!(
        pairs,
        BTreeSet::from([(bought.0.as_str(), bought.1.as_str())]),
        "every caller on every replica got the new pair"
    );
    let (upstream, cache, coalesced, replayed) = sources(answers.iter().map(|(_, a)| a));
    assert_eq!(
        (upstream, cache, coalesced + replayed),
        (1, 0, 29),
        "one caller went upstream; the others shared its call or got its result replayed"
    );

    // A late caller on any replica gets the same pair replayed, and nothing is sent.
    for replica in 0..3 {
        let late = fleet.token(replica, &request).await;
        assert_eq!(source(&late), TokenSource::Replayed, "replica {replica}");
        assert_eq!((late.access_token, late.refresh_token), bought.clone());
    }
    assert_eq!(fleet.upstream.token_posts(), 1);

    // The pair handed out is the live one: its refresh token works, once.
    let next = fleet.token(2, &refresh("refresh-race", &bought.1)).await;
    assert_eq!(source(&next), TokenSource::Upstream);
    assert_ne!(next.refresh_token, bought.1);
    assert_eq!(fleet.upstream.token_posts(), 2);
}
