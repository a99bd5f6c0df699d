//! The real binary under faults: no panic in its output, a clean drain on SIGTERM, and a
//! resident set that stays bounded over 10,000 faulty calls.

use std::time::Duration;

use testkit::{FaultyUpstream, Mode, Tokengate, message};
use tokengate::proto::token_service_client::TokenServiceClient;
use tonic::transport::Channel;

use crate::cases::cases;
use crate::harness::{REQUEST_TIMEOUT, call, config_toml};
use crate::leaks::{drive, mixed_faults};

/// Largest RSS growth tolerated between the warm-up and the end of the 10,000 calls.
const RSS_GROWTH_LIMIT_KIB: u64 = 16 * 1024;

/// Runs `tokengate serve` with `config` and `RUST_BACKTRACE=1`, and waits for its
/// `listening` line.
async fn start_binary(config: &str) -> Tokengate {
    Tokengate::launch(env!("CARGO_BIN_EXE_tokengate"), config)
        .env("RUST_BACKTRACE", "1")
        .start()
        .await
}

async fn client(binary: &Tokengate) -> TokenServiceClient<Channel> {
    TokenServiceClient::connect(binary.url()).await.unwrap()
}

/// SIGTERM, then asserts: exit 0, the final log line says `drained: true`, and nothing in
/// stdout or stderr mentions a panic.
async fn assert_clean_exit(mut binary: Tokengate) {
    // Returns once the process exited and both pipes reached their end: every line is in.
    let status = binary.terminate().await;
    let output = binary.output();
    assert_eq!(
        status.code(),
        Some(0),
        "exit code after SIGTERM; output:\n{output}"
    );
    assert!(
        output.contains("\"drained\":true") || output.contains("\"drained\":false"),
        "no drain line; output:\n{output}"
    );
    assert!(
        output.contains("\"drained\":true"),
        "the drain was not complete; output:\n{output}"
    );
    assert!(
        !output.contains("panicked"),
        "tokengate panicked; output:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_survives_every_fault_without_a_panic_and_drains_on_sigterm() {
    let upstream = FaultyUpstream::start(Mode::Healthy).await;
    let binary = start_binary(&config_toml(&upstream.url(), REQUEST_TIMEOUT)).await;
    let mut client = client(&binary).await;
    for (i, case) in cases().into_iter().enumerate() {
        upstream.set(case.mode.clone()).await;
        let id = format!("bin-case-{i}");
        case.check(&call(&mut client, &id).await);
        // The failure is logged once, with the same reason and a detail for operators. The
        // calls are one after another, so this is the i-th failure logged; the unregistered
        // client_id is logged as `public`, never as the caller's string.
        let failures = || -> Vec<serde_json::Value> {
            binary
                .events()
                .into_iter()
                .filter(|e| message(e) == Some("call failed"))
                .collect()
        };
        testkit::wait::until(
            &format!("the failure of {id} logged"),
            Duration::from_secs(30),
            || std::future::ready(failures().len() > i),
        )
        .await;
        let event = failures().swap_remove(i);
        assert_eq!(event["span"]["client_id"], "public", "{event}");
        let (reason, detail) = (&event["fields"]["reason"], &event["fields"]["detail"]);
        assert_eq!(*reason, case.reason, "{}: logged reason", case.name);
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
    assert_clean_exit(binary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_stays_bounded_over_10_000_faulty_calls() {
    let upstream = FaultyUpstream::start(mixed_faults()).await;
    // A 100 ms request_timeout keeps the hangs and trickles (2 in 16) cheap.
    let binary = start_binary(&config_toml(&upstream.url(), Duration::from_millis(100))).await;
    let client = client(&binary).await;
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
    assert_clean_exit(binary).await;
}
