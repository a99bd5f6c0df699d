//! Telemetry: the process's one `tracing` subscriber. It owns what leaves the process about
//! calls: log lines (human-readable or JSON, filtered by `RUST_LOG`) and traces
//! (OpenTelemetry spans, exported over OTLP when `[telemetry]` names a collector).
//!
//! - [`traces`]: the OpenTelemetry pipeline (sampler, exporter, flush) and the caller's W3C
//!   trace context read from gRPC metadata;
//! - `json`: JSON log lines stamped with the call's `trace_id` and `span_id`;
//! - `text`: human-readable lines without the fields that only shape exported spans.
//!
//! No secret ever reaches a field: secrets live in `SecretString` (whose `Debug` is
//! redacted) and proto messages with credentials have hand-written redacting `Debug`. Span
//! attributes are the same fields, so the same holds for every exported span.

mod json;
mod text;
pub mod traces;

use std::fs::File;
use std::io::{BufWriter, IsTerminal as _, Write};
use std::os::fd::AsFd as _;
use std::time::Duration;

use clap::ValueEnum;
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry};

use crate::config::TelemetryConfig;
use traces::{TraceError, Traces};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors; each line of a call carries its
    /// `trace_id` and `span_id`.
    Json,
}

/// Lines the log thread may hold before callers wait for it (nothing is dropped).
const BUFFERED_LINES: usize = 16 * 1024;

/// Keeps logging and tracing alive; [`Telemetry::shutdown`] flushes both.
#[must_use = "dropping it stops the log thread"]
pub struct Telemetry {
    traces: Traces,
    log: WorkerGuard,
}

impl Telemetry {
    /// Flushes the spans still buffered (waiting at most `timeout` for the collector), then
    /// the log lines.
    pub fn shutdown(self, timeout: Duration) {
        self.traces.shutdown(timeout);
        drop(self.log);
    }
}

/// Installs the global subscriber without trace export: logs only (with trace ids in JSON).
/// `RUST_LOG` overrides the default `info` level.
pub fn init(format: LogFormat) -> Telemetry {
    install(format, Traces::off())
}

/// Installs the global subscriber with the trace export `config` asks for. Call it inside
/// the tokio runtime: the gRPC exporter's connection lives there.
pub fn start(format: LogFormat, config: &TelemetryConfig) -> Result<Telemetry, TraceError> {
    let telemetry = install(format, Traces::new(config)?);
    if let Some(endpoint) = config
        .otlp_traces_endpoint
        .as_ref()
        .or(config.otlp_endpoint.as_ref())
    {
        tracing::info!(
            endpoint,
            protocol = config.protocol().as_str(),
            sample_ratio = config.sample_ratio,
            "exporting traces"
        );
    }
    Ok(telemetry)
}

/// Every call logs a line, so lines are handed to a log thread that writes them in batches:
/// a `write` per line cost a fifth of a call's CPU time under load.
fn install(format: LogFormat, traces: Traces) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, log) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("tokengate-log")
        .finish(batched_stdout());
    let lines = tracing_subscriber::fmt::layer()
        .with_span_events(FmtSpan::NONE)
        .with_ansi(std::io::stdout().is_terminal())
        .with_writer(writer);
    let lines = match format {
        LogFormat::Text => lines
            .fmt_fields(text::SpanFields)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => lines
            .json()
            .fmt_fields(json::SpanFields)
            .event_format(json::WithTraceIds(
                tracing_subscriber::fmt::format()
                    .json()
                    .flatten_event(false)
                    .with_current_span(true),
            ))
            .with_filter(filter)
            .boxed(),
    };
    // RUST_LOG filters the log lines only: spans are traced whatever the log level. Without a
    // collector, only JSON lines read the ids the layer gives spans.
    let spans = (traces.exporting() || format == LogFormat::Json).then(|| traces.layer());
    // A second init (tests that build several apps) keeps the first subscriber.
    let _ = Registry::default().with(lines).with(spans).try_init();
    Telemetry { traces, log }
}

/// Fields that log lines leave out: `otel.*` only name and classify the exported span, and
/// `log.*` are the `log` crate's bridge metadata (as tracing-subscriber's own formatters do).
fn not_for_log_lines(field: &str) -> bool {
    field.starts_with("otel.") || field.starts_with("log.")
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
