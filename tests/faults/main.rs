//! Fault injection: tokengate against a local upstream that misbehaves on command
//! ([`testkit::FaultyUpstream`], raw TCP speaking just enough HTTP/1.1).
//!
//! - `outcomes`: every fault (refused, reset at each stage, hang, trickle, garbage, huge
//!   bodies, 429 and 503 with and without `Retry-After`) ends in its contract §2 outcome,
//!   and the next healthy call succeeds.
//! - `storms`: concurrent 429 and 503 storms, the rate-limit guard, the retry budget,
//!   flapping between healthy and failing.
//! - `connections`: `upstream.max_connections` bounds the requests open upstream at once.
//! - `leaks`: no task outlives the calls (100 vs 1,000 faulty calls).
//! - `binary`: the real binary shows no panic, drains on SIGTERM, and its RSS stays
//!   bounded over 10,000 faulty calls.
//!
//! Every server uses a short `request_timeout` (100–300 ms), so the suite stays fast.

mod binary;
mod cases;
mod connections;
mod harness;
mod leaks;
mod outcomes;
mod storms;
