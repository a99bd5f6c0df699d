//! The binary under test, through testkit: [`testkit::Tokengate`] runs `tokengate serve`
//! (readiness, log lines, signals, exit), [`run`] one command to completion. What stays
//! here is what needs the tokengate crate (the gRPC client) or this test crate (the
//! binary's path).

use std::path::{Path, PathBuf};

use testkit::Tokengate;
use tokengate::proto::token_service_client::TokenServiceClient;
use tonic::transport::Channel;

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_tokengate")
}

/// A TokenService client connected to `served`.
pub async fn client(served: &Tokengate) -> TokenServiceClient<Channel> {
    TokenServiceClient::connect(served.url()).await.unwrap()
}

/// Runs the binary to completion and returns (exit code, stdout, stderr).
pub fn run(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (i32, String, String) {
    testkit::run_binary(binary(), args, env, cwd)
}

/// Writes `text` to `name` in `dir` and returns its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
