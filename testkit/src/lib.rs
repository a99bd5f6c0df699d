//! Shared test support for tokengate's integration tests: real servers started by the test
//! itself, so the tests exercise the real protocol instead of a mock's idea of it.
//!
//! - [`RedisServer`], [`RedisCluster`]: Debian's `redis-server`.
//! - [`Tokengate`]: the real binary, with its config, its logs and signals;
//!   [`run_binary`]: one command of it, to completion.
//! - [`CountingUpstream`]: a slow local token endpoint that counts what it receives.
//! - [`FaultyUpstream`]: a token endpoint that misbehaves on command ([`Mode`]).
//! - [`Prometheus`]: Debian's `prometheus`, scraping one target; [`promtool_check_metrics`]:
//!   its linter; [`http_get`]: one plain GET.
//! - [`wait::until`]: bounded polling.

#![forbid(unsafe_code)]

mod faulty;
mod prometheus;
mod redis;
mod tokengate;
mod upstream;
pub mod wait;

pub use faulty::{FaultyUpstream, Mode};
pub use prometheus::{HttpReply, Prometheus, Sample, http_get, promtool_check_metrics};
pub use redis::{RedisCluster, RedisServer, Reply};
pub use tokengate::{Launch, Tokengate, level, message, run_binary};
pub use upstream::{Answer, CountingUpstream, JWT_BEARER, Post, REVOKE_PATH, TOKEN_PATH};
