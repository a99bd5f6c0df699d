//! The broker's Redis store (contract §8) against a real `redis-server` started by testkit:
//! the version-checked write, TTLs, leases, the token index, pub/sub notices, penalties on
//! join, outages and rejoins, a wrong password, a cluster, and that nothing stored is readable.
//! [`versions`]: versions that never go back, conditional deletes, lease extension, penalties
//! read per key; [`slow`]: one slow reply is not an outage (I8); [`sealed`]: the real binary
//! stores nothing readable.

mod sealed;
mod slow;
mod versions;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use secrecy::SecretString;
use testkit::{RedisCluster, RedisServer, Reply};
use tokengate::broker::redis::{DOWN_AFTER, Down, Notice, RedisStore, Stored, VERSION_TTL};
use tokengate::config::{CacheKey, RedisConfig};
use tokengate::keys::{Digest, Keys, Purpose};
use tokengate::rate_limit::SharedPenalties;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const PREFIX: &str = "tg-test:";
/// A call's budget. Larger than production's 50 ms: other builds share this machine, and a
/// spurious Down would make these tests flaky, not stricter.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// The most any awaited event may take; only a broken store comes near it.
const WAIT: Duration = Duration::from_secs(20);

fn keys() -> Arc<Keys> {
    Arc::new(Keys::new(Some(&CacheKey::new(vec![7; 32]))))
}

fn config(url: &str, password: Option<&str>) -> RedisConfig {
    RedisConfig {
        url: url.to_owned(),
        key_prefix: PREFIX.to_owned(),
        timeout: CALL_TIMEOUT,
        password: password.map(|p| SecretString::from(p.to_owned())),
        ..RedisConfig::default()
    }
}

/// One replica's view: its store and the notices it receives.
struct Replica {
    store: RedisStore,
    notices: UnboundedReceiver<Notice>,
}

fn replica(url: &str, password: Option<&str>) -> Replica {
    let (tx, notices) = unbounded_channel();
    let store = RedisStore::start(&config(url, password), keys(), tx).expect("a valid URL");
    Replica { store, notices }
}

fn ident(name: &str) -> Digest {
    keys().digest([b"test-identity".as_slice(), name.as_bytes()])
}

/// What `get` answers for an entry stored at `version`.
fn stored(version: u64, sealed: &[u8]) -> Result<Stored, Down> {
    Ok(Stored {
        version,
        sealed: Some(sealed.to_vec()),
    })
}

/// What `get` answers for an identity with no entry, whose version is `version`.
fn absent(version: u64) -> Result<Stored, Down> {
    Ok(Stored {
        version,
        sealed: None,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Polls `check` until it holds; fails the test after [`WAIT`].
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "waited {WAIT:?} for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_up(store: &RedisStore) {
    until("the store to reach redis", || async { store.is_up() }).await;
}

/// Waits until `n` connections subscribe to the store's channel on this node.
async fn wait_subscribers(server: &RedisServer, n: i64) {
    let channel = format!("{PREFIX}notices");
    until(&format!("{n} subscriber(s) on {channel}"), || async {
        match server.command(&["PUBSUB", "NUMSUB", &channel]) {
            Ok(Reply::Array(reply)) => matches!(reply.get(1), Some(Reply::Int(k)) if *k >= n),
            _ => false,
        }
    })
    .await;
}

/// The next notice; fails the test after [`WAIT`].
async fn next(notices: &mut UnboundedReceiver<Notice>) -> Notice {
    tokio::time::timeout(WAIT, notices.recv())
        .await
        .expect("a notice within the wait")
        .expect("the store is alive")
}

/// Every notice up to (not including) `marker`, which must come.
async fn until_marker(notices: &mut UnboundedReceiver<Notice>, marker: Digest) -> Vec<Notice> {
    let mut before = Vec::new();
    loop {
        match next(notices).await {
            Notice::Invalidate { id, .. } if id == marker => return before,
            other => before.push(other),
        }
    }
}

/// Publishes a marker through `by` and returns what `to` received before it: pub/sub keeps
/// order, so anything sent earlier and not in the list was ignored.
async fn received_before_marker(
    by: &RedisStore,
    to: &mut UnboundedReceiver<Notice>,
) -> Vec<Notice> {
    let marker = ident(&format!("marker-{}", fastrand::u64(..)));
    by.invalidate(&marker, 1).await.expect("redis is up");
    until_marker(to, marker).await
}

fn keys_in(server: &RedisServer) -> Vec<String> {
    match server.command(&["KEYS", "*"]).expect("KEYS") {
        Reply::Array(keys) => keys.iter().map(Reply::text).collect(),
        other => panic!("KEYS answered {other:?}"),
    }
}

fn pttl(server: &RedisServer, key: &str) -> i64 {
    match server.command(&["PTTL", key]).expect("PTTL") {
        Reply::Int(ms) => ms,
        other => panic!("PTTL answered {other:?}"),
    }
}

#[tokio::test]
async fn a_put_round_trips_and_a_stale_version_does_not_overwrite() {
    let server = RedisServer::start();
    let a = replica(&server.url(), None);
    let store = &a.store;
    let id = ident("round-trip");

    assert_eq!(store.get(&id).await, absent(0));
    assert_eq!(
        store
            .put(&id, 0, b"first", Duration::from_secs(60), &[])
            .await,
        Ok(true)
    );
    assert_eq!(store.get(&id).await, stored(1, b"first"));
    assert!(store.is_up());

    // Someone who read "absent" (or version 0) comes second: refused, the value stays.
    assert_eq!(
        store
            .put(&id, 0, b"stale", Duration::from_secs(60), &[])
            .await,
        Ok(false)
    );
    assert_eq!(store.get(&id).await, stored(1, b"first"));
    assert_eq!(
        store
            .put(&id, 7, b"stale", Duration::from_secs(60), &[])
            .await,
        Ok(false)
    );
    assert_eq!(store.get(&id).await, stored(1, b"first"));

    assert_eq!(
        store
            .put(&id, 1, b"second", Duration::from_secs(60), &[])
            .await,
        Ok(true)
    );
    assert_eq!(store.get(&id).await, stored(2, b"second"));
    assert_eq!(
        store
            .put(&id, 1, b"stale", Duration::from_secs(60), &[])
            .await,
        Ok(false)
    );
    assert_eq!(store.get(&id).await, stored(2, b"second"));

    // Concurrent writers with the same expectation: exactly one wins.
    let other = ident("race");
    let writes = (0..8).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let value = format!("writer {i}");
            store
                .put(&other, 0, value.as_bytes(), Duration::from_secs(60), &[])
                .await
        })
    });
    let mut wins = 0;
    for write in writes {
        if write.await.unwrap() == Ok(true) {
            wins += 1;
        }
    }
    assert_eq!(wins, 1, "one version-checked write wins");
    assert_eq!(store.get(&other).await.unwrap().version, 1);

    // Binary values survive as they are (sealed values are arbitrary bytes).
    let bytes: Vec<u8> = (0..=255).collect();
    let binary = ident("binary");
    assert_eq!(
        store
            .put(&binary, 0, &bytes, Duration::from_secs(60), &[])
            .await,
        Ok(true)
    );
    assert_eq!(store.get(&binary).await, stored(1, &bytes));
}

#[tokio::test]
async fn entries_and_their_index_expire_with_their_ttl() {
    let server = RedisServer::start();
    let a = replica(&server.url(), None);
    let id = ident("short-lived");
    let token = keys().token_digest("short-lived-token");
    let ttl = Duration::from_millis(200);

    assert_eq!(a.store.put(&id, 0, b"value", ttl, &[token]).await, Ok(true));
    for key in [
        format!("{PREFIX}{{{}}}:e", id.hex()),
        format!("{PREFIX}t:{}", token.hex()),
    ] {
        let left = pttl(&server, &key);
        assert!(
            (-2..=200).contains(&left) && left != -1,
            "{key} must carry the TTL, has {left}"
        );
    }
    // The version outlives the entry (VERSION_TTL): a replica may still hold version 1.
    let version = format!("{PREFIX}{{{}}}:v", id.hex());
    let left = pttl(&server, &version);
    let floor = VERSION_TTL.as_millis() as i64 - 60_000;
    assert!(left > floor, "{version} keeps the version for {left} ms");
    until("the entry to expire", || async {
        a.store.get(&id).await == absent(1)
    })
    .await;
    until("the token index to expire", || async {
        a.store.find_token(&token).await == Ok(None)
    })
    .await;
    // The version did not go with it: a writer that expects 0 (it never saw the entry, or
    // forgot it) is refused, one that expects the version Redis reports writes version 2.
    assert_eq!(
        a.store
            .put(&id, 0, b"stale", Duration::from_secs(60), &[])
            .await,
        Ok(false)
    );
    assert_eq!(
        a.store
            .put(&id, 1, b"again", Duration::from_secs(60), &[])
            .await,
        Ok(true)
    );
    assert_eq!(a.store.get(&id).await, stored(2, b"again"));
}

#[tokio::test]
async fn a_lease_is_exclusive_and_only_its_owner_releases_it() {
    let server = RedisServer::start();
    let a = replica(&server.url(), None);
    let b = replica(&server.url(), None);
    let id1 = ident("lease-1");

    assert_eq!(a.store.leased(&id1).await, Ok(false));
    let first = a
        .store
        .lease(&id1, Duration::from_secs(5))
        .await
        .unwrap()
        .expect("free");
    assert!(
        b.store
            .lease(&id1, Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        a.store
            .lease(&id1, Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(b.store.leased(&id1).await, Ok(true));
    a.store.release(&id1, first).await.unwrap();
    assert_eq!(b.store.leased(&id1).await, Ok(false));
    let again = b.store.lease(&id1, Duration::from_secs(5)).await.unwrap();
    assert!(again.is_some(), "a released lease can be taken again");

    // A holder whose lease expired must not free the next holder's.
    let id2 = ident("lease-2");
    let expired = a
        .store
        .lease(&id2, Duration::from_millis(200))
        .await
        .unwrap()
        .expect("free");
    until("the short lease to expire", || async {
        b.store.leased(&id2).await == Ok(false)
    })
    .await;
    let current = b
        .store
        .lease(&id2, Duration::from_secs(30))
        .await
        .unwrap()
        .expect("expired");
    a.store.release(&id2, expired).await.unwrap();
    assert_eq!(
        a.store.leased(&id2).await,
        Ok(true),
        "the stale owner freed a lease not its own"
    );
    assert!(
        a.store
            .lease(&id2, Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
    b.store.release(&id2, current).await.unwrap();
    assert_eq!(a.store.leased(&id2).await, Ok(false));
}

#[tokio::test]
async fn a_token_finds_the_identity_that_holds_it() {
    let server = RedisServer::start();
    let a = replica(&server.url(), None);
    let keys = keys();
    let id = ident("holder");
    let access = keys.token_digest("access-token-1");
    let refresh = keys.token_digest("refresh-token-1");

    assert_eq!(a.store.find_token(&access).await, Ok(None));
    assert_eq!(
        a.store
            .put(
                &id,
                0,
                b"entry",
                Duration::from_secs(60),
                &[access, refresh]
            )
            .await,
        Ok(true)
    );
    assert_eq!(a.store.find_token(&access).await, Ok(Some(id)));
    assert_eq!(a.store.find_token(&refresh).await, Ok(Some(id)));
    assert_eq!(
        a.store.find_token(&keys.token_digest("unknown")).await,
        Ok(None)
    );

    // A refused write indexes nothing.
    let loser = keys.token_digest("losing-writer-token");
    assert_eq!(
        a.store
            .put(&id, 0, b"late", Duration::from_secs(60), &[loser])
            .await,
        Ok(false)
    );
    assert_eq!(a.store.find_token(&loser).await, Ok(None));

    // An index value that is not an id is no answer.
    let garbage = keys.token_digest("garbage");
    server
        .command(&["SET", &format!("{PREFIX}t:{}", garbage.hex()), "not-hex"])
        .unwrap();
    assert_eq!(a.store.find_token(&garbage).await, Ok(None));
}

#[tokio::test]
async fn a_delete_reaches_every_replica() {
    let server = RedisServer::start();
    let mut a = replica(&server.url(), None);
    let mut b = replica(&server.url(), None);
    wait_subscribers(&server, 2).await;
    let id = ident("deleted");

    assert_eq!(
        a.store
            .put(&id, 0, b"value", Duration::from_secs(60), &[])
            .await,
        Ok(true)
    );
    assert_eq!(
        a.store.delete(&id).await,
        Ok(2),
        "the delete bumps the version"
    );
    assert_eq!(b.store.get(&id).await, absent(2));
    // A first subscription is no resync: the first notice each sees is the invalidation,
    // with the version below which entries are dead.
    let dead = Notice::Invalidate { id, version: 2 };
    assert_eq!(next(&mut b.notices).await, dead);
    assert_eq!(next(&mut a.notices).await, dead, "its own too");

    let other = ident("invalidated");
    b.store.invalidate(&other, 5).await.unwrap();
    let told = Notice::Invalidate {
        id: other,
        version: 5,
    };
    assert_eq!(next(&mut a.notices).await, told);
    assert_eq!(next(&mut b.notices).await, told);
}

#[tokio::test]
async fn penalties_reach_replicas_now_and_replicas_that_join_later() {
    let server = RedisServer::start();
    let keys = keys();
    let mut a = replica(&server.url(), None);
    let mut b = replica(&server.url(), None);
    wait_subscribers(&server, 2).await;

    let client = keys.digest([b"penalty".as_slice(), b"client-1"]);
    let until = now_ms() + 60_000;
    a.store.penalise(&client, until).await.unwrap();
    let told = Notice::Penalty {
        key: client,
        until_unix_ms: until,
    };
    assert_eq!(next(&mut b.notices).await, told);
    assert_eq!(next(&mut a.notices).await, told);
    // Stored sealed, expiring when the penalty ends.
    let name = format!("{PREFIX}p:{}", client.hex());
    let left = pttl(&server, &name);
    assert!((50_000..=60_000).contains(&left), "penalty TTL {left}");
    let stored = match server.command(&["GET", &name]).unwrap() {
        Reply::Bulk(Some(v)) => v,
        other => panic!("GET answered {other:?}"),
    };
    assert_eq!(
        keys.open(Purpose::Penalty, &client, &stored).unwrap(),
        until.to_be_bytes()
    );

    // Values that do not open are ignored on join: garbage, and a value sealed under
    // another key. So is a penalty that is already over.
    let garbage = keys.digest([b"penalty".as_slice(), b"garbage"]);
    server
        .command(&[
            "SET",
            &format!("{PREFIX}p:{}", garbage.hex()),
            "garbage",
            "PX",
            "60000",
        ])
        .unwrap();
    let foreign = keys.digest([b"penalty".as_slice(), b"foreign"]);
    let other_key = Keys::new(Some(&CacheKey::new(vec![9; 32])));
    let sealed = other_key.seal(Purpose::Penalty, &foreign, &until.to_be_bytes());
    server
        .command(&[
            b"SET".as_slice(),
            format!("{PREFIX}p:{}", foreign.hex()).as_bytes(),
            &sealed,
            b"PX",
            b"60000",
        ])
        .unwrap();
    let over = keys.digest([b"penalty".as_slice(), b"over"]);
    let sealed = keys.seal(Purpose::Penalty, &over, &(now_ms() - 1_000).to_be_bytes());
    server
        .command(&[
            b"SET".as_slice(),
            format!("{PREFIX}p:{}", over.hex()).as_bytes(),
            &sealed,
            b"PX",
            b"60000",
        ])
        .unwrap();

    // A replica that starts after the penalty learns it when it joins, and only it.
    let mut c = replica(&server.url(), None);
    assert_eq!(next(&mut c.notices).await, told);
    let rest = received_before_marker(&a.store, &mut c.notices).await;
    assert_eq!(rest, vec![], "only the penalty in force, nothing else");

    // A forged notice on the channel is ignored too.
    for forged in [
        format!("p:{}:{}", garbage.hex(), until),
        format!("p:{}:zz", garbage.hex()),
        "p:nothex".to_owned(),
        "i:nothex".to_owned(),
        "garbage".to_owned(),
    ] {
        server
            .command(&["PUBLISH", &format!("{PREFIX}notices"), &forged])
            .unwrap();
    }
    assert_eq!(
        received_before_marker(&a.store, &mut c.notices).await,
        vec![]
    );

    // A penalty already over is neither stored nor told.
    let past = keys.digest([b"penalty".as_slice(), b"past"]);
    a.store.penalise(&past, now_ms() - 1).await.unwrap();
    assert!(!keys_in(&server).iter().any(|k| k.contains(&past.hex())));
    assert_eq!(
        received_before_marker(&a.store, &mut c.notices).await,
        vec![]
    );
}

#[tokio::test]
async fn a_killed_redis_is_down_at_once_and_rejoined_after_its_restart() {
    let mut server = RedisServer::start();
    let mut a = replica(&server.url(), None);
    wait_up(&a.store).await;
    wait_subscribers(&server, 1).await;
    let id = ident("outage");
    assert_eq!(
        a.store
            .put(&id, 0, b"value", Duration::from_secs(60), &[])
            .await,
        Ok(true)
    );

    server.kill();
    // Every call answers Down within about its budget, never hangs.
    let token = keys().token_digest("t");
    for round in 0..3 {
        let started = Instant::now();
        assert_eq!(a.store.get(&id).await, Err(Down), "round {round}");
        assert_eq!(
            a.store
                .put(&id, 1, b"v", Duration::from_secs(1), &[token])
                .await,
            Err(Down)
        );
        assert_eq!(a.store.find_token(&token).await, Err(Down));
        assert!(matches!(
            a.store.lease(&id, Duration::from_secs(1)).await,
            Err(Down)
        ));
        assert_eq!(a.store.leased(&id).await, Err(Down));
        assert_eq!(a.store.invalidate(&id, 2).await, Err(Down));
        assert_eq!(a.store.delete(&id).await, Err(Down));
        assert_eq!(a.store.penalise(&id, now_ms() + 10_000).await, Err(Down));
        assert!(!a.store.is_up());
        // Eight calls; each bounded by CALL_TIMEOUT (a sanity bound, not a benchmark).
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{:?}",
            started.elapsed()
        );
    }

    server.restart();
    until("the store to rejoin", || async {
        a.store.get(&id).await.is_ok() && a.store.is_up()
    })
    .await;
    // The data went with the restart (nothing persisted), and the store writes again.
    assert_eq!(a.store.get(&id).await, absent(0));
    assert_eq!(
        a.store
            .put(&id, 0, b"after", Duration::from_secs(60), &[])
            .await,
        Ok(true)
    );
    // Its pub/sub came back on its own, with a resync first: invalidations may be lost.
    assert_eq!(next(&mut a.notices).await, Notice::Resync);
    wait_subscribers(&server, 1).await;
    let b = replica(&server.url(), None);
    let after = ident("after-restart");
    b.store.invalidate(&after, 1).await.unwrap();
    assert_eq!(until_marker(&mut a.notices, after).await, vec![]);
}

#[tokio::test]
async fn a_store_started_while_redis_is_down_joins_when_it_comes() {
    let mut server = RedisServer::start();
    server.stop();
    let mut a = replica(&server.url(), None);
    let id = ident("late-redis");
    assert_eq!(a.store.get(&id).await, Err(Down));
    assert!(!a.store.is_up());

    server.restart();
    wait_up(&a.store).await;
    assert_eq!(
        a.store
            .put(&id, 0, b"value", Duration::from_secs(60), &[])
            .await,
        Ok(true)
    );
    wait_subscribers(&server, 1).await;
    // Its first subscription: no resync.
    assert_eq!(
        received_before_marker(&a.store, &mut a.notices).await,
        vec![]
    );
}

#[tokio::test]
async fn a_wrong_password_is_down_and_never_a_panic() {
    let server = RedisServer::start_with_password("the-right-password");
    let wrong = replica(&server.url(), Some("a-wrong-password"));
    let none = replica(&server.url(), None);
    let right = replica(&server.url(), Some("the-right-password"));
    let id = ident("password");

    wait_up(&right.store).await;
    assert_eq!(
        right
            .store
            .put(&id, 0, b"value", Duration::from_secs(60), &[])
            .await,
        Ok(true)
    );
    for store in [&wrong.store, &none.store] {
        assert_eq!(store.get(&id).await, Err(Down));
        assert_eq!(
            store.put(&id, 1, b"x", Duration::from_secs(60), &[]).await,
            Err(Down)
        );
        assert!(!store.is_up());
    }
    // The health check keeps trying and keeps reporting down.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(!wrong.store.is_up());
    assert_eq!(right.store.get(&id).await, stored(1, b"value"));
}

#[tokio::test]
async fn nothing_in_redis_is_readable_and_each_identity_shares_a_hash_tag() {
    let server = RedisServer::start();
    let mut a = replica(&server.url(), None);
    wait_subscribers(&server, 1).await;
    let keys = keys();
    let id = keys.digest([b"client-PLAINTEXT".as_slice(), b"secret-PLAINTEXT"]);
    let token = keys.token_digest("access-token-PLAINTEXT");
    let sealed = keys.seal(Purpose::Entry, &id, b"entry holding access-token-PLAINTEXT");
    let client = keys.digest([b"penalty".as_slice(), b"client-PLAINTEXT"]);
    let until = now_ms() + 60_000;

    assert_eq!(
        a.store
            .put(&id, 0, &sealed, Duration::from_secs(60), &[token])
            .await,
        Ok(true)
    );
    let _lease = a
        .store
        .lease(&id, Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    a.store.penalise(&client, until).await.unwrap();
    assert!(matches!(next(&mut a.notices).await, Notice::Penalty { .. }));

    let names = keys_in(&server);
    assert_eq!(names.len(), 5, "{names:?}");
    let hex = |d: &Digest| d.hex();
    let mut expected = vec![
        format!("{PREFIX}{{{}}}:e", hex(&id)),
        format!("{PREFIX}{{{}}}:v", hex(&id)),
        format!("{PREFIX}{{{}}}:l", hex(&id)),
        format!("{PREFIX}t:{}", hex(&token)),
        format!("{PREFIX}p:{}", hex(&client)),
    ];
    expected.sort();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, expected);
    for name in &names {
        assert!(!name.contains("PLAINTEXT"), "{name}");
        let value = match server.command(&["GET", name]).unwrap() {
            Reply::Bulk(Some(v)) => v,
            other => panic!("GET {name} answered {other:?}"),
        };
        for plain in [
            &b"PLAINTEXT"[..],
            until.to_string().as_bytes(),
            &until.to_be_bytes(),
        ] {
            assert!(
                !value.windows(plain.len()).any(|w| w == plain),
                "{name} holds readable data"
            );
        }
    }
}

#[tokio::test]
async fn a_malformed_url_is_the_only_error_at_start() {
    let (tx, _rx) = unbounded_channel();
    for url in ["not a url", "http://localhost:6379", ""] {
        assert!(
            RedisStore::start(&config(url, None), keys(), tx.clone()).is_err(),
            "{url:?}"
        );
    }
    // Nothing listens there: still a store, just down.
    let store = RedisStore::start(&config("redis://127.0.0.1:1/0", None), keys(), tx).unwrap();
    assert_eq!(store.get(&ident("x")).await, Err(Down));
}

#[tokio::test]
async fn a_cluster_holds_entries_leases_and_penalties_across_its_nodes() {
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let keys = keys();
    let a = replica(&urls, None);
    let mut b = replica(&urls, None);
    wait_up(&a.store).await;
    wait_subscribers(&cluster.nodes()[0], 2).await;

    // Enough identities to land on every node; each one's keys share a slot, or the
    // version-checked script would fail with CROSSSLOT.
    let ids: Vec<Digest> = (0..24).map(|i| ident(&format!("cluster-{i}"))).collect();
    for (i, id) in ids.iter().enumerate() {
        let token = keys.token_digest(&format!("cluster-token-{i}"));
        assert_eq!(
            a.store
                .put(id, 0, b"v1", Duration::from_secs(60), &[token])
                .await,
            Ok(true)
        );
        assert_eq!(
            b.store
                .put(id, 0, b"stale", Duration::from_secs(60), &[])
                .await,
            Ok(false)
        );
        assert_eq!(
            b.store
                .put(id, 1, b"v2", Duration::from_secs(60), &[])
                .await,
            Ok(true)
        );
        assert_eq!(a.store.get(id).await, stored(2, b"v2"));
        assert_eq!(b.store.find_token(&token).await, Ok(Some(*id)));
        let lease = a
            .store
            .lease(id, Duration::from_secs(30))
            .await
            .unwrap()
            .unwrap();
        assert!(
            b.store
                .lease(id, Duration::from_secs(30))
                .await
                .unwrap()
                .is_none()
        );
        a.store.release(id, lease).await.unwrap();
        assert_eq!(b.store.leased(id).await, Ok(false));
    }
    for node in cluster.nodes() {
        assert!(
            keys_in(node).iter().any(|k| k.ends_with(":e")),
            "every node holds entries (port {})",
            node.port()
        );
    }

    assert_eq!(a.store.delete(&ids[0]).await, Ok(3));
    assert_eq!(
        next(&mut b.notices).await,
        Notice::Invalidate {
            id: ids[0],
            version: 3
        }
    );
    assert_eq!(a.store.delete_if(&ids[1], 1).await, Ok(None));
    assert_eq!(a.store.delete_if(&ids[1], 2).await, Ok(Some(3)));
    assert_eq!(b.store.get(&ids[1]).await, absent(3));

    // Penalties spread over the nodes; a replica joining later finds them all.
    let until = now_ms() + 60_000;
    let penalised: Vec<Digest> = (0..12)
        .map(|i| keys.digest([b"penalty".as_slice(), format!("cluster-{i}").as_bytes()]))
        .collect();
    for key in &penalised {
        a.store.penalise(key, until).await.unwrap();
    }
    // Read per key with one MGET, whose keys the crate splits over the nodes' slots.
    assert_eq!(
        SharedPenalties::read(&b.store, &penalised).await,
        Some(UNIX_EPOCH + Duration::from_millis(until))
    );
    let mut c = replica(&urls, None);
    let mut learned = Vec::new();
    while learned.len() < penalised.len() {
        match next(&mut c.notices).await {
            Notice::Penalty { key, until_unix_ms } => {
                assert_eq!(until_unix_ms, until);
                learned.push(key);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    learned.sort();
    let mut expected = penalised.clone();
    expected.sort();
    assert_eq!(learned, expected);
}

#[tokio::test]
async fn a_quiet_subscription_stays_joined_and_a_dropped_store_lets_go() {
    let server = RedisServer::start();
    let mut a = replica(&server.url(), None);
    let b = replica(&server.url(), None);
    wait_subscribers(&server, 2).await;
    // Past the pub/sub keep-alive ping (every 5 s): a healthy subscription is kept, with no
    // reconnection and so no resync.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        received_before_marker(&b.store, &mut a.notices).await,
        vec![]
    );

    // Dropping every handle ends the background tasks and closes their connections.
    drop(a);
    drop(b);
    until("the dropped stores to close their connections", || async {
        let info = server.command(&["INFO", "clients"]).unwrap().text();
        // The connection asking is the only one left.
        info.lines().any(|l| l.trim() == "connected_clients:1")
    })
    .await;
}

#[tokio::test]
async fn tls_trusts_the_configured_ca_and_nothing_else() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let (ca_file, cert_file, key_file) = (
        dir.path().join("ca.pem"),
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    );
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, leaf.pem()).unwrap();
    std::fs::write(&key_file, leaf_key.serialize_pem()).unwrap();
    let server = RedisServer::start_tls(&cert_file, &key_file);

    let (tx, mut notices) = unbounded_channel();
    let mut trusted = config(&server.tls_url(), None);
    trusted.ca_file = Some(ca_file);
    let store = RedisStore::start(&trusted, keys(), tx).unwrap();
    wait_up(&store).await;
    wait_subscribers(&server, 1).await;
    let id = ident("over-tls");
    assert_eq!(
        store
            .put(&id, 0, b"value", Duration::from_secs(60), &[])
            .await,
        Ok(true)
    );
    assert_eq!(store.get(&id).await, stored(1, b"value"));
    // Pub/sub runs over TLS too.
    assert_eq!(received_before_marker(&store, &mut notices).await, vec![]);

    // Without the CA the server's certificate is not trusted: down, not a panic.
    let untrusted = replica(&server.tls_url(), None);
    assert_eq!(untrusted.store.get(&id).await, Err(Down));
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert!(!untrusted.store.is_up());
    assert_eq!(untrusted.store.get(&id).await, Err(Down));
}

#[tokio::test]
async fn a_redis_that_never_answers_is_down_within_the_timeout() {
    // Accepts connections and never says a word: a hung or partitioned Redis.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}/0", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    let (tx, _notices) = unbounded_channel();
    let mut hung = config(&url, None);
    hung.timeout = Duration::from_millis(100);
    let store = RedisStore::start(&hung, keys(), tx).unwrap();
    let id = ident("hung");
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(store.get(&id).await, Err(Down));
        assert_eq!(
            store.put(&id, 0, b"v", Duration::from_secs(1), &[]).await,
            Err(Down)
        );
        assert!(matches!(
            store.lease(&id, Duration::from_secs(1)).await,
            Err(Down)
        ));
        // A sanity bound: the crate's own connect and response timeouts are a second each,
        // with retries, so only the call's budget can answer three calls this soon.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(!store.is_up());
    }
}
