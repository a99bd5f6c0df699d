//! No leaked task: after a batch of faulty calls has settled, the runtime holds as many
//! live tasks as before it, whether the batch was 100 calls or 1,000.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use testkit::{FaultyUpstream, Mode};
use tokengate::proto::token_service_client::TokenServiceClient;
use tokio::runtime::Handle;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::{Gate, call};

/// Every fault a connection can meet, one per connection in turn (refusal is
/// listener-wide and covered by the outcome tests).
pub fn mixed_faults() -> Mode {
    Mode::Cycle(vec![
        Mode::ResetOnAccept,
        Mode::ResetAfterRequest,
        Mode::ResetAfterHeaders,
        Mode::ResetMidBody,
        Mode::CloseMidBody,
        Mode::Hang,
        Mode::Trickle(Duration::from_millis(20)),
        Mode::NotHttp,
        Mode::Html,
        Mode::TruncatedJson,
        Mode::HugeWithLength,
        Mode::HugeChunked,
        Mode::Status(429, Some("1")),
        Mode::Status(503, Some("0")),
        Mode::Status(503, None),
        Mode::Status(500, None),
    ])
}

/// Drives `calls` GetToken calls, `in_flight` at a time, each for one of `clients` client
/// ids in turn. Returns how many ended with each gRPC code.
pub async fn drive(
    client: &TokenServiceClient<Channel>,
    calls: usize,
    in_flight: usize,
    clients: usize,
) -> Vec<(Code, usize)> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..in_flight {
        let (mut client, next) = (client.clone(), next.clone());
        workers.spawn(async move {
            let mut codes = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= calls {
                    return codes;
                }
                let code = match call(&mut client, &format!("mix-{}", i % clients)).await {
                    Ok(_) => Code::Ok,
                    Err(status) => status.code(),
                };
                codes.push(code);
            }
        });
    }
    let mut tally: Vec<(Code, usize)> = Vec::new();
    for code in workers.join_all().await.into_iter().flatten() {
        match tally.iter_mut().find(|(c, _)| *c == code) {
            Some((_, n)) => *n += 1,
            None => tally.push((code, 1)),
        }
    }
    tally.sort_by_key(|(code, _)| *code as i32);
    tally
}

/// Live tasks once they stop changing: sampled every 50 ms until the same value was seen
/// for half a second (or 15 s have passed), the lowest value seen is returned.
async fn settled_tasks() -> usize {
    let metrics = Handle::current().metrics();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = metrics.num_alive_tasks();
    let mut lowest = last;
    let mut stable = 0;
    while stable < 10 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = metrics.num_alive_tasks();
        lowest = lowest.min(now);
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
    }
    lowest.min(last)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faulty_calls_leave_no_task_behind() {
    let upstream = FaultyUpstream::start(mixed_faults()).await;
    // A 100 ms request_timeout keeps the hangs and trickles cheap.
    let gate = Gate::start_with(&upstream.url(), Duration::from_millis(100)).await;

    // Warm up: the channel's connection, the server's connection task and anything
    // created once per process exist before the baseline is taken.
    drive(&gate.client, 32, 8, 1_000).await;
    let baseline = settled_tasks().await;

    let codes_100 = drive(&gate.client, 100, 32, 1_000).await;
    let after_100 = settled_tasks().await;

    let codes_1000 = drive(&gate.client, 1_000, 32, 1_000).await;
    let after_1000 = settled_tasks().await;

    println!(
        "alive tasks: baseline {baseline}, after 100 faulty calls {after_100}, \
         after 1,000 more {after_1000}"
    );
    println!("outcomes of the 100: {codes_100:?}");
    println!("outcomes of the 1,000: {codes_1000:?}");
    assert_eq!(codes_100.iter().map(|(_, n)| n).sum::<usize>(), 100);
    assert_eq!(codes_1000.iter().map(|(_, n)| n).sum::<usize>(), 1_000);
    for (code, _) in codes_100.iter().chain(&codes_1000) {
        assert!(
            matches!(code, Code::Unavailable | Code::ResourceExhausted | Code::Ok),
            "unexpected outcome {code:?}"
        );
    }
    // tokengate let go of every upstream connection too (hangs and trickles included).
    testkit::wait::until(
        "every upstream connection to be closed",
        Duration::from_secs(5),
        || async { upstream.open() == 0 },
    )
    .await;
    assert_eq!(after_100, baseline, "tasks left behind by 100 faulty calls");
    assert_eq!(
        after_1000, baseline,
        "tasks left behind by 1,000 faulty calls"
    );
    gate.stop().await;
    drop(upstream);
}
