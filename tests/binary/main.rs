//! Tests of the real `tokengate` binary: CLI, signals and drain, and what it logs.
//!
//! Each test starts the binary on 127.0.0.1 port 0 and waits for its `listening` log line
//! (JSON, on stdout) before talking to it; nothing sleeps and hopes.

mod cli;
mod logs;
mod process;
mod shutdown;
