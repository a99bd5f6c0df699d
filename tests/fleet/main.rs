//! The fleet suite (contract §8, README "A fleet behind Redis"): three real tokengate
//! binaries, one `redis-server` and a slow local upstream that counts POSTs, all from
//! testkit, started per test.
//!
//! - `bursts`: identical calls spread over the replicas reach the upstream once.
//! - `refresh`: a refresh token sent by callers on every replica is spent once, and every
//!   caller gets the pair it bought.
//! - `rejected`: many callers reporting the same rejected token cause one new token; a
//!   replica that missed the renewal answers a late report with the newer token.
//! - `revoke`: RevokeToken on one replica drops the entry on all of them.
//! - `rate_limit`: a 429 on one replica holds back the others, which send nothing.
//! - `outage`: Redis killed in the middle of a burst, then restarted.
//! - `frozen`: a lease holder frozen with SIGSTOP; the others go on after the lease.
//! - `hostile`: altered, garbage and 10 MiB values are misses; a wrong password means the
//!   replica runs alone.
//!
//! Assertions are on what the upstream received and on `GetTokenResponse.source`; waits are
//! on log lines, subscriber counts and POST arrivals, each bounded.

mod bursts;
mod frozen;
mod harness;
mod hostile;
mod outage;
mod rate_limit;
mod refresh;
mod rejected;
mod revoke;
