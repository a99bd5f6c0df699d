//! Versions that never go back (I7), conditional deletes, lease extension (I6), and
//! penalties read per key (I4).

use super::*;

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn versions_never_go_back_across_deletes_and_expiry() {
    let server = RedisServer::start();
    let a = replica(&server.url(), None);
    let store = &a.store;
    let id = ident("monotonic");
    let version_key = format!("{PREFIX}{{{}}}:v", id.hex());
    let floor = VERSION_TTL.as_millis() as i64 - 60_000;

    // A delete of nothing still moves the version: a writer that read "nothing" before it
    // must not write after it.
    assert_eq!(store.delete(&id).await, Ok(1));
    assert_eq!(store.get(&id).await, absent(1));
    assert!(pttl(&server, &version_key) > floor, "the version is kept");
    assert_eq!(store.put(&id, 0, b"stale", MINUTE, &[]).await, Ok(false));

    assert_eq!(store.put(&id, 1, b"two", MINUTE, &[]).await, Ok(true));
    assert_eq!(store.get(&id).await, stored(2, b"two"));

    // The race I7 is about: a replica read version 2, the entry is deleted (a revocation),
    // and that replica then writes what it read, expecting 2. Refused.
    assert_eq!(store.delete(&id).await, Ok(3));
    assert_eq!(store.get(&id).await, absent(3));
    assert_eq!(store.put(&id, 2, b"revoked", MINUTE, &[]).await, Ok(false));
    assert_eq!(store.get(&id).await, absent(3));
    assert!(pttl(&server, &version_key) > floor);

    // A version stored with a TTL longer than VERSION_TTL keeps it through a delete.
    server
        .command(&["PEXPIRE", &version_key, "200000000"])
        .unwrap();
    assert_eq!(store.delete(&id).await, Ok(4));
    assert!(pttl(&server, &version_key) > 199_000_000);

    // An entry that expires keeps its version too.
    assert_eq!(
        store
            .put(&id, 4, b"short", Duration::from_millis(100), &[])
            .await,
        Ok(true)
    );
    until("the short entry to expire", || async {
        store.get(&id).await == absent(5)
    })
    .await;
    assert_eq!(store.put(&id, 0, b"stale", MINUTE, &[]).await, Ok(false));
    assert_eq!(store.put(&id, 4, b"stale", MINUTE, &[]).await, Ok(false));
    assert_eq!(store.put(&id, 5, b"six", MINUTE, &[]).await, Ok(true));
    assert_eq!(store.get(&id).await, stored(6, b"six"));
    assert!(pttl(&server, &version_key) > floor);
}

#[tokio::test]
async fn delete_if_deletes_only_at_the_expected_version() {
    let server = RedisServer::start();
    let mut a = replica(&server.url(), None);
    wait_subscribers(&server, 1).await;
    let store = &a.store;
    let id = ident("delete-if");

    assert_eq!(store.put(&id, 0, b"one", MINUTE, &[]).await, Ok(true));
    assert_eq!(store.put(&id, 1, b"two", MINUTE, &[]).await, Ok(true));
    // The version moved past what the caller saw: nothing is deleted, nothing told.
    assert_eq!(store.delete_if(&id, 1).await, Ok(None));
    assert_eq!(store.delete_if(&id, 3).await, Ok(None));
    assert_eq!(store.get(&id).await, stored(2, b"two"));
    assert_eq!(
        received_before_marker(store, &mut a.notices).await,
        vec![],
        "a refused delete publishes nothing"
    );
    // At the version seen: deleted, bumped, and told.
    assert_eq!(store.delete_if(&id, 2).await, Ok(Some(3)));
    assert_eq!(store.get(&id).await, absent(3));
    assert_eq!(
        next(&mut a.notices).await,
        Notice::Invalidate { id, version: 3 }
    );
    // Absent counts as 0, like the write.
    let fresh = ident("delete-if-fresh");
    assert_eq!(store.delete_if(&fresh, 1).await, Ok(None));
    assert_eq!(store.delete_if(&fresh, 0).await, Ok(Some(1)));
    assert_eq!(store.get(&fresh).await, absent(1));
}

#[tokio::test]
async fn a_lease_is_extended_only_by_its_owner() {
    let server = RedisServer::start();
    let a = replica(&server.url(), None);
    let b = replica(&server.url(), None);
    let id = ident("extended");
    let name = format!("{PREFIX}{{{}}}:l", id.hex());

    let held = a
        .store
        .lease(&id, Duration::from_secs(2))
        .await
        .unwrap()
        .expect("free");
    assert!(pttl(&server, &name) <= 2_000);
    assert_eq!(a.store.extend(&id, &held, MINUTE).await, Ok(true));
    let left = pttl(&server, &name);
    assert!(left > 50_000, "extended to a minute, has {left} ms");
    assert!(b.store.lease(&id, MINUTE).await.unwrap().is_none());
    // Released by reference too; then it is gone and cannot be extended back.
    a.store.release(&id, &held).await.unwrap();
    assert_eq!(a.store.leased(&id).await, Ok(false));
    assert_eq!(a.store.extend(&id, &held, MINUTE).await, Ok(false));
    assert_eq!(a.store.leased(&id).await, Ok(false), "extend never creates");

    // Expired: the old holder's extension fails ...
    let short = a
        .store
        .lease(&id, Duration::from_millis(100))
        .await
        .unwrap()
        .expect("free");
    until("the short lease to expire", || async {
        a.store.leased(&id).await == Ok(false)
    })
    .await;
    assert_eq!(a.store.extend(&id, &short, MINUTE).await, Ok(false));
    // ... and once another replica took it, extending leaves that holder's TTL alone.
    let stolen = b
        .store
        .lease(&id, Duration::from_secs(5))
        .await
        .unwrap()
        .expect("expired");
    assert_eq!(a.store.extend(&id, &short, MINUTE).await, Ok(false));
    assert!(pttl(&server, &name) <= 5_000, "the new holder's TTL stands");
    assert_eq!(b.store.extend(&id, &stolen, MINUTE).await, Ok(true));
    assert!(pttl(&server, &name) > 50_000);
}

#[tokio::test]
async fn penalties_are_read_per_key_and_a_value_that_does_not_open_is_none() {
    let server = RedisServer::start();
    let keys = keys();
    let a = replica(&server.url(), None);
    let client = keys.digest([b"penalty".as_slice(), b"read-client"]);
    let user = keys.digest([b"penalty".as_slice(), b"read-client", b"user"]);
    let other = keys.digest([b"penalty".as_slice(), b"read-other"]);
    let at = |ms: u64| Some(UNIX_EPOCH + Duration::from_millis(ms));

    assert_eq!(SharedPenalties::read(&a.store, &[]).await, None);
    assert_eq!(SharedPenalties::read(&a.store, &[client, user]).await, None);

    let sooner = now_ms() + 30_000;
    let later = now_ms() + 50_000;
    a.store.penalise(&client, sooner).await.unwrap();
    assert_eq!(
        SharedPenalties::read(&a.store, &[client, user]).await,
        at(sooner)
    );
    // The latest end of the keys asked about, and only those.
    SharedPenalties::write(&a.store, user, UNIX_EPOCH + Duration::from_millis(later)).await;
    assert_eq!(
        SharedPenalties::read(&a.store, &[client, user]).await,
        at(later)
    );
    assert_eq!(SharedPenalties::read(&a.store, &[client]).await, at(sooner));
    assert_eq!(SharedPenalties::read(&a.store, &[other]).await, None);

    // Garbage, a value sealed under another key, a value sealed for another penalty key,
    // and a penalty that is over (its TTL not yet run out): none of them counts.
    let set = |key: &Digest, value: &[u8]| {
        server
            .command(&[
                b"SET".as_slice(),
                format!("{PREFIX}p:{}", key.hex()).as_bytes(),
                value,
                b"PX",
                b"60000",
            ])
            .unwrap();
    };
    let foreign = Keys::new(Some(&CacheKey::new(vec![9; 32])));
    for value in [
        b"garbage".to_vec(),
        foreign.seal(Purpose::Penalty, &other, &later.to_be_bytes()),
        keys.seal(Purpose::Penalty, &client, &later.to_be_bytes()),
        keys.seal(Purpose::Penalty, &other, &(now_ms() - 1_000).to_be_bytes()),
    ] {
        set(&other, &value);
        assert_eq!(SharedPenalties::read(&a.store, &[other]).await, None);
        assert_eq!(
            SharedPenalties::read(&a.store, &[other, client]).await,
            at(sooner),
            "the others still count"
        );
    }

    // Down reads as no penalty, and a write is dropped without an error.
    let (tx, _rx) = unbounded_channel();
    let down = RedisStore::start(&config("redis://127.0.0.1:1/0", None), keys.clone(), tx).unwrap();
    assert_eq!(SharedPenalties::read(&down, &[client]).await, None);
    SharedPenalties::write(&down, client, SystemTime::now() + MINUTE).await;
}
