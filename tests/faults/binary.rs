//! The real binary under faults: no panic in its output, a clean drain on SIGTERM, and a
//! resident set that stays bounded over 10,000 faulty calls.

use std::time::Duration;

use crate::cases::cases;
use crate::harness::{Binary, REQUEST_TIMEOUT, call, config_toml};
use crate::leaks::{drive, mixed_faults};
use crate::upstream::{FaultyUpstream, Mode};

/// Largest RSS growth tolerated between the warm-up and the end of the 10,000 calls.
const RSS_GROWTH_LIMIT_KIB: u64 = 16 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_survives_every_fault_without_a_panic_and_drains_on_sigterm() {
    let upstream = FaultyUpstream::start(Mode::Healthy).await;
    let binary = Binary::start(&config_toml(&upstream.url(), REQUEST_TIMEOUT)).await;
    let mut client = binary.client().await;
    for (i, case) in cases().into_iter().enumerate() {
        upstream.set(case.mode.clone()).await;
        let id = format!("bin-case-{i}");
        case.check(&call(&mut client, &id).await);
        // The failure is logged once, with the same reason and a detail for operators.
        let (reason, detail) = binary
            .wait_for(|line| {
                let event: serde_json::Value = serde_json::from_str(line).ok()?;
                let fields = &event["fields"];
                (event["span"]["client_id"] == id.as_str() && fields["message"] == "call failed")
                    .then(|| (fields["reason"].clone(), fields["detail"].clone()))
            })
            .await;
        assert_eq!(reason, case.reason, "{}: logged reason", case.name);
        println!("{:<28} logged {reason} ({detail})", case.name);
    }
    for flapping in [
        Mode::Cycle(vec![Mode::Status(503, Some("0")), Mode::Healthy]),
        Mode::Cycle(vec![Mode::Status(429, Some("0")), Mode::Healthy]),
    ] {
        upstream.set(flapping.clone()).await;
        for _ in 0..4 {
            call(&mut client, "bin-flapper")
                .await
                .unwrap_or_else(|s| panic!("{flapping:?}: {s:?}"));
        }
    }
    upstream.set(Mode::Healthy).await;
    call(&mut client, "bin-healthy").await.unwrap();
    drop(client);
    binary.assert_clean_exit().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_stays_bounded_over_10_000_faulty_calls() {
    let upstream = FaultyUpstream::start(mixed_faults()).await;
    // A 100 ms request_timeout keeps the hangs and trickles (2 in 16) cheap.
    let binary = Binary::start(&config_toml(&upstream.url(), Duration::from_millis(100))).await;
    let client = binary.client().await;
    let start = binary.rss_kib();

    let warm_up = drive(&client, 1_000, 32, 256).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = binary.rss_kib();

    let outcomes = drive(&client, 10_000, 32, 256).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = binary.rss_kib();

    let growth = after.saturating_sub(before);
    println!(
        "VmRSS: at start {start} KiB, after 1,000 warm-up faulty calls {before} KiB, \
         after 10,000 more {after} KiB (growth {growth} KiB, limit {RSS_GROWTH_LIMIT_KIB} KiB)"
    );
    println!("warm-up outcomes: {warm_up:?}");
    println!("outcomes of the 10,000: {outcomes:?}");
    assert_eq!(outcomes.iter().map(|(_, n)| n).sum::<usize>(), 10_000);
    assert!(
        growth < RSS_GROWTH_LIMIT_KIB,
        "RSS grew by {growth} KiB over 10,000 faulty calls ({before} -> {after} KiB)"
    );
    drop(client);
    binary.assert_clean_exit().await;
}
