//! `tokengate-bench calls`: many real GetToken calls, spread over one or more tokengate
//! replicas, each one checked (gRPC status, a token in the answer) and counted by
//! `GetTokenResponse.source`. The broker scenarios drive it; h2load cannot read a gRPC status
//! or the source field.
//!
//! Two shapes: a fixed number of calls with a given concurrency (a burst: every call starts
//! at the same instant when the concurrency equals the count; a fill: distinct requests at a
//! bounded concurrency), or callers that each call every `interval` for a duration (a steady
//! state). The outcome is one JSON object on stdout.

use std::collections::{BTreeMap, HashSet};
use std::hash::{DefaultHasher, Hash as _, Hasher as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokengate::proto::token_service_client::TokenServiceClient;
use tokengate::proto::{GetTokenRequest, TokenSource};
use tonic::transport::{Channel, Endpoint};

use crate::probe::Error;

/// Which request each call sends.
#[derive(Clone, Debug)]
pub enum Shape {
    /// The benchmark's jwt_bearer request (one identity for every call).
    Jwt,
    /// client_credentials for account `{prefix}{n % distinct}`, n the call's number.
    Accounts { prefix: String, distinct: usize },
}

/// How many calls and when.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// `calls` calls, at most `concurrency` at once; all start together when equal.
    Count { calls: usize, concurrency: usize },
    /// `callers` callers, each calling every `interval` (back to back when zero), for `duration`.
    Steady {
        callers: usize,
        interval: Duration,
        duration: Duration,
    },
}

pub struct Plan {
    pub addrs: Vec<String>,
    /// HTTP/2 connections per address.
    pub connections: usize,
    pub client_id: String,
    pub shape: Shape,
    pub pace: Pace,
    /// Connect first, then wait until this Unix time (ms) before the first call.
    pub start_at_ms: Option<u64>,
}

/// What one worker saw.
#[derive(Default)]
struct Tally {
    calls: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    sources: BTreeMap<&'static str, u64>,
    tokens: HashSet<u64>,
    latencies_us: Vec<u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.calls += other.calls;
        self.ok += other.ok;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.sources {
            *self.sources.entry(k).or_default() += v;
        }
        self.tokens.extend(other.tokens);
        self.latencies_us.extend(other.latencies_us);
    }
}

fn source_name(source: i32) -> &'static str {
    match TokenSource::try_from(source) {
        Ok(TokenSource::Upstream) => "upstream",
        Ok(TokenSource::Cache) => "cache",
        Ok(TokenSource::Coalesced) => "coalesced",
        Ok(TokenSource::Replayed) => "replayed",
        _ => "unspecified",
    }
}

fn request(shape: &Shape, client_id: &str, n: usize) -> GetTokenRequest {
    match shape {
        Shape::Jwt => crate::fixtures::get_token_request(client_id),
        Shape::Accounts { prefix, distinct } => crate::fixtures::client_credentials_request(
            client_id,
            &format!("{prefix}{}", n % distinct.max(&1)),
        ),
    }
}

async fn one(
    client: &mut TokenServiceClient<Channel>,
    request: GetTokenRequest,
    tally: &mut Tally,
) {
    let started = Instant::now();
    let outcome = client.get_token(request).await;
    tally
        .latencies_us
        .push(started.elapsed().as_micros() as u64);
    tally.calls += 1;
    match outcome {
        Ok(response) => {
            let response = response.into_inner();
            if response.access_token.is_empty() {
                *tally.errors.entry("EMPTY_TOKEN".into()).or_default() += 1;
                return;
            }
            tally.ok += 1;
            *tally
                .sources
                .entry(source_name(response.source))
                .or_default() += 1;
            let mut hasher = DefaultHasher::new();
            response.access_token.hash(&mut hasher);
            tally.tokens.insert(hasher.finish());
        }
        Err(status) => {
            *tally
                .errors
                .entry(format!("{:?}", status.code()))
                .or_default() += 1;
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64 * p / 100.0).ceil() as usize).max(1);
    sorted[rank - 1]
}

/// Runs the plan and returns its outcome as JSON.
pub async fn run(plan: Plan) -> Result<serde_json::Value, Error> {
    let mut channels = Vec::new();
    for addr in &plan.addrs {
        for _ in 0..plan.connections.max(1) {
            let channel = Endpoint::from_shared(addr.clone())?
                .tcp_nodelay(true)
                .connect()
                .await?;
            channels.push(channel);
        }
    }
    if let Some(at) = plan.start_at_ms {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
        if at > now {
            tokio::time::sleep(Duration::from_millis(at - now)).await;
        }
    }
    let shape = Arc::new(plan.shape);
    let client_id: Arc<str> = plan.client_id.into();
    let started = Instant::now();
    let started_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let workers = match plan.pace {
        Pace::Count { concurrency, .. } => concurrency,
        Pace::Steady { callers, .. } => callers,
    }
    .max(1);
    // Every worker is ready before the first call, so that a burst really is one.
    let barrier = Arc::new(tokio::sync::Barrier::new(workers));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(workers);
    for worker in 0..workers {
        // Workers are dealt round-robin over the addresses, then over their connections.
        let index = (worker % plan.addrs.len()) * plan.connections.max(1)
            + (worker / plan.addrs.len()) % plan.connections.max(1);
        let mut client = TokenServiceClient::new(channels[index].clone());
        let (barrier, next, shape, client_id) = (
            barrier.clone(),
            next.clone(),
            shape.clone(),
            client_id.clone(),
        );
        let pace = plan.pace;
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            barrier.wait().await;
            match pace {
                Pace::Count { calls, .. } => loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= calls {
                        break;
                    }
                    one(&mut client, request(&shape, &client_id, n), &mut tally).await;
                },
                Pace::Steady {
                    interval, duration, ..
                } => {
                    let until = tokio::time::Instant::now() + duration;
                    // Callers start spread over one interval, as independent backends would.
                    let offset = interval.mul_f64(worker as f64 / workers as f64);
                    let mut tick = tokio::time::interval_at(
                        tokio::time::Instant::now() + offset,
                        interval.max(Duration::from_micros(1)),
                    );
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while tokio::time::Instant::now() < until {
                        if !interval.is_zero() {
                            tick.tick().await;
                        }
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        one(&mut client, request(&shape, &client_id, n), &mut tally).await;
                    }
                }
            }
            tally
        }));
    }
    let mut total = Tally::default();
    for task in tasks {
        total.merge(task.await?);
    }
    let elapsed = started.elapsed();
    total.latencies_us.sort_unstable();
    let lat = &total.latencies_us;
    Ok(serde_json::json!({
        "calls": total.calls,
        "ok": total.ok,
        "errors": total.errors,
        "sources": total.sources,
        "distinct_tokens": total.tokens.len(),
        "started_unix_ms": started_unix_ms,
        "elapsed_s": elapsed.as_secs_f64(),
        "p50_us": percentile(lat, 50.0),
        "p99_us": percentile(lat, 99.0),
        "max_us": lat.last().copied().unwrap_or(0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_cycle_over_the_distinct_count() {
        let shape = Shape::Accounts {
            prefix: "a-".into(),
            distinct: 3,
        };
        let account = |n| match request(&shape, "c", n).grant {
            Some(tokengate::proto::get_token_request::Grant::ClientCredentials(g)) => {
                match g.subject {
                    Some(tokengate::proto::client_credentials_grant::Subject::AccountId(a)) => a,
                    _ => panic!("no account"),
                }
            }
            _ => panic!("not client_credentials"),
        };
        assert_eq!(account(0), "a-0");
        assert_eq!(account(4), "a-1");
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), 50);
        assert_eq!(percentile(&values, 99.0), 99);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
