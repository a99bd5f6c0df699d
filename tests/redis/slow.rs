//! I8: one slow Redis reply does not take a replica out of the fleet; consecutive failures
//! do. The slow reply is real: `CLIENT PAUSE ... WRITE` holds every write for a while (Debian's
//! redis-server refuses `DEBUG SLEEP`: `enable-debug-command` is `no`), while reads and the
//! health check's `PING` still answer.

use super::*;

/// A call's budget here: well below the pause, so a paused write times out.
const SHORT: Duration = Duration::from_millis(100);

fn pause_writes(server: &RedisServer, ms: u64) {
    let reply = server
        .command(&["CLIENT", "PAUSE", &ms.to_string(), "WRITE"])
        .unwrap();
    assert_eq!(reply, Reply::Simple("OK".into()));
}

#[tokio::test]
async fn one_slow_reply_keeps_the_replica_in_the_fleet_and_failures_in_a_row_do_not() {
    let server = RedisServer::start();
    let (tx, _notices) = unbounded_channel();
    let mut short = config(&server.url(), None);
    short.timeout = SHORT;
    let store = RedisStore::start(&short, keys(), tx).unwrap();
    wait_up(&store).await;
    let id = ident("slow");

    // One write that answers after the pause (~300 ms), past its 100 ms budget.
    pause_writes(&server, 300);
    let started = Instant::now();
    assert!(matches!(
        store.lease(&id, Duration::from_secs(5)).await,
        Err(Down)
    ));
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "it timed out, not waited"
    );
    assert!(
        store.is_up(),
        "one slow reply took the replica out of the fleet"
    );
    // And the next call, once the pause is over, simply works.
    until("the store to answer again", || async {
        store.get(&id).await.is_ok()
    })
    .await;
    assert!(store.is_up());

    // Writes held for long: failed calls in a row are an outage.
    pause_writes(&server, 10_000);
    let ttl = Duration::from_secs(5);
    for i in 1..=DOWN_AFTER {
        assert!(matches!(
            store.lease(&ident(&format!("slow-{i}")), ttl).await,
            Err(Down)
        ));
        assert_eq!(store.is_up(), i < DOWN_AFTER, "after {i} failed call(s)");
    }
    server.command(&["CLIENT", "UNPAUSE"]).unwrap();
    until("the store to be back up", || async { store.is_up() }).await;
}
