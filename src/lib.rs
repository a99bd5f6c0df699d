//! tokengate: a gRPC service that turns typed token requests into the form POSTs an OAuth 2.0
//! token endpoint (RingCentral's first of all) expects, and answers with typed tokens or
//! precise gRPC errors.

#![forbid(unsafe_code)]

pub mod admission;
pub mod assertion;
pub mod broker;
pub mod caller;
pub mod client;
pub mod config;
pub mod direct;
pub mod error;
pub mod grant;
pub mod keys;
pub mod metrics;
pub mod proto;
pub mod rate_limit;
pub mod service;
pub mod startup;
pub mod telemetry;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use startup::{Application, Drain};
