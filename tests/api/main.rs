//! In-process integration tests: the real server (`Application::build` on 127.0.0.1 port 0)
//! against a wiremock upstream, driven through the generated gRPC clients.
//!
//! Every test starts its own server and upstream; nothing sleeps and hopes.

mod broker;
mod deadline;
mod errors;
mod exchange;
mod hardening;
mod helpers;
mod local;
mod service;
mod signed;
mod tls;
