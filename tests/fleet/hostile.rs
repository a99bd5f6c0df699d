//! Hostile state: what Redis holds cannot hurt a replica. A value altered by one byte,
//! replaced by garbage or by 10 MiB is a miss (the call succeeds from the upstream) and is
//! replaced by the new token; a wrong Redis password leaves the replica serving alone.

use testkit::{Reply, level, message};
use tokengate::proto::TokenSource;

use crate::harness::{DELAY, Fleet, JOINED, LOST, PATIENCE, jwt, source};

/// How a test replaces a stored value.
type Corrupt = fn(Vec<u8>) -> Vec<u8>;

/// One byte of the ciphertext flipped: it no longer authenticates.
fn flip_a_byte(mut value: Vec<u8>) -> Vec<u8> {
    let middle = value.len() / 2;
    value[middle] ^= 0x01;
    value
}

fn garbage(value: Vec<u8>) -> Vec<u8> {
    (0..value.len()).map(|_| fastrand::u8(..)).collect()
}

fn ten_mib(_: Vec<u8>) -> Vec<u8> {
    vec![b'x'; 10 * 1024 * 1024]
}

/// Replica a stores a token for `client_id`; its entry in Redis is then corrupted. Returns
/// the key and the token stored.
async fn store_and_corrupt(fleet: &Fleet, client_id: &str, corrupt: Corrupt) -> (String, String) {
    let before = fleet.entry_keys();
    let first = fleet.token(0, &jwt(client_id)).await;
    assert_eq!(source(&first), TokenSource::Upstream);
    let key = match &fleet.entry_keys()[..] {
        keys if keys.len() == before.len() + 1 => {
            keys.iter().find(|k| !before.contains(k)).unwrap().clone()
        }
        keys => panic!("one new entry expected: {keys:?} (before: {before:?})"),
    };
    let value = match fleet.redis.command(&["GET", key.as_str()]).expect("GET") {
        Reply::Bulk(Some(value)) => value,
        other => panic!("GET {key} answered {other:?}"),
    };
    let reply = fleet
        .redis
        .command(&[
            b"SET".as_slice(),
            key.as_bytes(),
            &corrupt(value),
            b"KEEPTTL",
        ])
        .expect("SET");
    assert_eq!(reply, Reply::Simple("OK".into()));
    (key, first.access_token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_garbage_and_huge_values_in_redis_are_misses() {
    let fleet = Fleet::start(3).await;
    let cases: [(&str, Corrupt); 3] = [
        ("altered", flip_a_byte),
        ("garbage", garbage),
        ("huge", ten_mib),
    ];
    for (client_id, corrupt) in cases {
        let (key, stored) = store_and_corrupt(&fleet, client_id, corrupt).await;
        // Replica b has no local copy: it reads the value, cannot open it, and calls.
        let answer = fleet.token(1, &jwt(client_id)).await;
        assert_eq!(
            source(&answer),
            TokenSource::Upstream,
            "{client_id}: the value in {key} is a miss"
        );
        assert_ne!(answer.access_token, stored);
        assert_eq!(fleet.upstream.posts_with("client_id", client_id), 2);
        // The bad value does not stay in the way: replica b's token replaced it, and
        // replica c (no local copy either) reads that one.
        let healed = fleet.token(2, &jwt(client_id)).await;
        assert_eq!(
            (source(&healed), healed.access_token.as_str()),
            (TokenSource::Cache, answer.access_token.as_str()),
            "{client_id}: the fleet shares the new token"
        );
        assert_eq!(fleet.upstream.posts_with("client_id", client_id), 2);
    }
    // Said in the log, without the value.
    let warnings: Vec<_> = fleet.replicas[1]
        .process
        .events()
        .into_iter()
        .filter(|e| level(e) == Some("WARN") && message(e).is_some_and(|m| m.contains("redis")))
        .collect();
    assert!(!warnings.is_empty(), "replica b warned about the values");
    assert!(
        !fleet.replicas[1].process.output().contains("xxxxxxxx"),
        "the huge value is not logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_wrong_redis_password_serves_alone() {
    let mut fleet = Fleet::start_with(2, DELAY, Some("fleet-secret")).await;
    let alone = fleet.spawn(Some("not-the-password")).await;
    fleet.replicas[alone]
        .process
        .wait_for_message(PATIENCE, LOST)
        .await;
    let request = jwt("password");

    let shared = fleet.token(0, &request).await;
    assert_eq!(source(&shared), TokenSource::Upstream);
    let hit = fleet.token(1, &request).await;
    assert_eq!(
        (source(&hit), hit.access_token.as_str()),
        (TokenSource::Cache, shared.access_token.as_str()),
        "the replicas with the password share the fleet's state"
    );

    // The third one cannot see it: it calls on its own, succeeds, and keeps its token.
    let own = fleet.token(alone, &request).await;
    assert_eq!(source(&own), TokenSource::Upstream);
    assert_ne!(own.access_token, shared.access_token);
    let again = fleet.token(alone, &request).await;
    assert_eq!(
        (source(&again), again.access_token.as_str()),
        (TokenSource::Cache, own.access_token.as_str()),
        "its memory layer serves it"
    );
    assert_eq!(fleet.upstream.posts_with("client_id", "password"), 2);
    assert_eq!(fleet.entry_keys().len(), 1, "it wrote nothing to Redis");
    assert!(
        !fleet.replicas[alone]
            .process
            .messages()
            .iter()
            .any(|m| m.contains(JOINED)),
        "it never joined"
    );
}
