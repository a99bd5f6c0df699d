//! JSON log lines that name their trace: `trace_id` and `span_id` lead every line logged
//! inside a call, so a platform team can find a call's lines by the caller's trace id, with
//! or without a collector. Span fields are written as tracing-subscriber's `JsonFields`
//! writes them, less the `otel.*` fields that only name and classify the exported span.

use std::fmt;

use opentelemetry::trace::{SpanId, TraceContextExt as _, TraceId};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::Record;
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// Wraps a JSON event format and puts the ids of the event's span in front of its fields.
pub(super) struct WithTraceIds<F>(pub(super) F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // The innermost span that has a trace: a dependency's span inside a call has none.
        let ids = ctx
            .event_scope()
            .into_iter()
            .flatten()
            .find_map(|span| ids_of(&span.id()));
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        // Written straight through (no second buffer): the ids go in after the opening brace.
        let mut line = AfterBrace {
            writer: &mut writer,
            ids: Some((trace_id, span_id)),
        };
        self.0.format_event(ctx, Writer::new(&mut line), event)
    }
}

/// Passes a JSON object through, writing the ids right after its opening brace.
struct AfterBrace<'a, 'w> {
    writer: &'a mut Writer<'w>,
    /// Still to write, until the first text arrives.
    ids: Option<(TraceId, SpanId)>,
}

impl fmt::Write for AfterBrace<'_, '_> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        if text.is_empty() {
            return Ok(());
        }
        if let Some((trace_id, span_id)) = self.ids.take()
            && let Some(rest) = text.strip_prefix('{')
        {
            write!(
                self.writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            )
        } else {
            self.writer.write_str(text)
        }
    }
}

/// The trace and span ids of a span the OpenTelemetry layer tracks, if it is valid.
fn ids_of(id: &tracing::span::Id) -> Option<(TraceId, SpanId)> {
    tracing::dispatcher::get_default(|dispatch| {
        tracing_opentelemetry::get_otel_context(id, dispatch)
    })
    .map(|cx| {
        let span = cx.span();
        let context = span.span_context();
        (context.trace_id(), context.span_id())
    })
    .filter(|(trace_id, span_id)| *trace_id != TraceId::INVALID && *span_id != SpanId::INVALID)
}

/// A span's fields as a JSON object, without `otel.*` (and, as `JsonFields`, without
/// `log.*`): those are for the exported span, and every log line would carry them.
pub(super) struct SpanFields;

impl<'w> FormatFields<'w> for SpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut map = Map::new();
        fields.record(&mut Collect(&mut map));
        write!(writer, "{}", Value::Object(map))
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &Record<'_>,
    ) -> fmt::Result {
        let mut map: Map<String, Value> = if current.fields.is_empty() {
            Map::new()
        } else {
            serde_json::from_str(&current.fields).map_err(|_| fmt::Error)?
        };
        fields.record(&mut Collect(&mut map));
        current.fields = Value::Object(map).to_string();
        Ok(())
    }
}

/// Collects fields into a JSON object, as `JsonFields` does.
struct Collect<'a>(&'a mut Map<String, Value>);

impl Collect<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        let name = field.name();
        if super::not_for_log_lines(name) {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.0.insert(name.to_owned(), value);
    }
}

impl Visit for Collect<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::from(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::from(format!("{value:?}")));
    }
}
