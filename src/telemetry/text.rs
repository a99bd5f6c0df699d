//! Text log lines: span and event fields as `name=value`, as tracing-subscriber's default
//! formatter writes them, less the `otel.*` fields that only name and classify the exported
//! span (`GetToken{otel.name=… otel.kind="server" …}` said the span's name twice per line).

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::span::Record;
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::FormattedFields;
use tracing_subscriber::fmt::format::Writer;

/// Fields separated by a space; `message` unnamed and unquoted; `otel.*` and `log.*` left out.
pub(super) struct SpanFields;

impl<'w> FormatFields<'w> for SpanFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut visit = Pairs {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visit);
        visit.result
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &Record<'_>,
    ) -> fmt::Result {
        let mut visit = Pairs {
            first: current.fields.is_empty(),
            writer: current.as_writer(),
            result: Ok(()),
        };
        fields.record(&mut visit);
        visit.result
    }
}

struct Pairs<'w> {
    writer: Writer<'w>,
    /// No separator before the first field written.
    first: bool,
    result: fmt::Result,
}

impl Visit for Pairs<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let name = field.name();
        if self.result.is_err() || super::not_for_log_lines(name) {
            return;
        }
        let separator = if self.first { "" } else { " " };
        self.first = false;
        self.result = if name == "message" {
            write!(self.writer, "{separator}{value:?}")
        } else {
            let name = name.strip_prefix("r#").unwrap_or(name);
            write!(self.writer, "{separator}{name}={value:?}")
        };
    }
}
