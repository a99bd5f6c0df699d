//! Logging: one subscriber for the process, human-readable or JSON, filtered by `RUST_LOG`.
//!
//! No secret ever reaches a field: secrets live in `SecretString` (whose `Debug` is
//! redacted) and proto messages with credentials have hand-written redacting `Debug`.

use std::fs::File;
use std::io::{BufWriter, IsTerminal as _, Write};
use std::os::fd::AsFd as _;

use clap::ValueEnum;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Lines the log thread may hold before callers wait for it (nothing is dropped).
const BUFFERED_LINES: usize = 16 * 1024;

/// Installs the global subscriber, writing to stdout. `RUST_LOG` overrides the default
/// `info` level. Keep the returned guard until exit: dropping it flushes what is buffered.
///
/// Every call logs a line, so lines are handed to a log thread that writes them in batches:
/// a `write` per line cost a fifth of a call's CPU time under load.
pub fn init(format: LogFormat) -> WorkerGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("tokengate-log")
        .finish(batched_stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE)
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(writer);
    // A second init (tests that build several apps) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(false)
            .with_current_span(true)
            .try_init(),
    };
    guard
}

/// Stdout without `std`'s line buffering: the log thread flushes whenever it has caught up,
/// so a quiet server's lines appear at once and a busy one's go out many to a `write`.
fn batched_stdout() -> Box<dyn Write + Send> {
    match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => Box::new(BufWriter::with_capacity(64 * 1024, File::from(fd))),
        // No descriptor to share (stdout closed): fall back to std's own stdout.
        Err(_) => Box::new(std::io::stdout()),
    }
}
