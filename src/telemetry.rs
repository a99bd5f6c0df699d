//! Logging: one subscriber for the process, human-readable or JSON, filtered by `RUST_LOG`.
//!
//! No secret ever reaches a field: secrets live in `SecretString` (whose `Debug` is
//! redacted) and proto messages with credentials have hand-written redacting `Debug`.

use std::io::IsTerminal as _;

use clap::ValueEnum;
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

/// Installs the global subscriber, writing to stdout. `RUST_LOG` overrides the default
/// `info` level.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::NONE)
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(std::io::stdout);
    // A second init (tests that build several apps) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(false)
            .with_current_span(true)
            .try_init(),
    };
}
