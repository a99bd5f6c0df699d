//! Shared test support for tokengate's integration tests: real servers started by the test
//! itself, so the tests exercise the real protocol instead of a mock's idea of it.

#![forbid(unsafe_code)]

mod redis;

pub use redis::{RedisCluster, RedisServer, Reply};
