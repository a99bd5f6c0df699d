//! Traces: the OpenTelemetry pipeline behind the `tracing` spans, and the caller's W3C trace
//! context (`traceparent`, `tracestate`) read from gRPC metadata.
//!
//! With a collector, roots are sampled at `sample_ratio` and a caller's decision is followed
//! (parent-based). Without one, spans still get trace and span ids when JSON logs need them
//! (the sampler records nothing); with text logs and no collector the layer is left out,
//! since it would cost a forwarded call some 8 % for ids nobody reads.

use std::path::Path;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _, WithTonicConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, Sampler, SdkTracerProvider, SpanData, SpanExporter,
};
use tracing::{Level, Subscriber};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;

use crate::config::{CaFileError, OtlpProtocol, TelemetryConfig, load_ca_file};

/// How long one export may take, retries included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why trace export cannot start; `origin` names the key or variable the endpoint came
/// from. `tokengate serve` prints it as a bad-config reason.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{origin}: {error}")]
    Endpoint {
        origin: &'static str,
        #[source]
        error: tonic::transport::Error,
    },
    #[error("telemetry: cannot read {}: {error}", path.display())]
    ReadCa {
        path: std::path::PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{origin}: TLS: {error}")]
    Tls {
        origin: &'static str,
        #[source]
        error: tonic::transport::Error,
    },
    #[error("{origin}: cannot build the OTLP exporter: {error}")]
    Exporter {
        origin: &'static str,
        #[source]
        error: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("telemetry: {0}")]
    CaFile(#[from] CaFileError),
    #[error("telemetry: building the OTLP HTTP client panicked")]
    HttpClientPanicked,
    #[error("telemetry: cannot build the OTLP HTTP client: {0}")]
    HttpClient(reqwest::Error),
}

/// The tracer provider: its sampler, and its exporter when there is a collector.
pub struct Traces {
    provider: SdkTracerProvider,
    exporting: bool,
}

impl Traces {
    /// Ids for every span, nothing recorded, nothing sent.
    pub fn off() -> Self {
        Self {
            provider: SdkTracerProvider::builder()
                .with_sampler(Sampler::AlwaysOff)
                .build(),
            exporting: false,
        }
    }

    /// Export to the collector `config` names, when it names one; [`Traces::off`] otherwise.
    /// `otlp_endpoint` is a base URL (`/v1/traces` is added for http/protobuf), a URL from
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is used as is. Must run inside the tokio runtime
    /// (the gRPC channel's connection task lives there).
    pub fn new(config: &TelemetryConfig) -> Result<Self, TraceError> {
        // Where a bad URL came from, for the error.
        let (source, url) = match (&config.otlp_traces_endpoint, &config.otlp_endpoint) {
            (Some(full), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", full.clone()),
            (None, Some(base)) if config.protocol() == OtlpProtocol::HttpProtobuf => {
                ("telemetry.otlp_endpoint", http_traces_url(base))
            }
            (None, Some(base)) => ("telemetry.otlp_endpoint", base.clone()),
            (None, None) => return Ok(Self::off()),
        };
        // A private CA's PEM bundle (load checked it), trusted beside webpki's roots.
        let ca_file = config.otlp_certificate.as_deref();
        // The URL and the protocol are given here, or the HTTP builder would read
        // `OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL` itself and refuse to build when a variable
        // that a key overrides says grpc. Both builders still read
        // `OTEL_EXPORTER_OTLP_TRACES_HEADERS`, else `OTEL_EXPORTER_OTLP_HEADERS` (gRPC: into
        // every export's metadata, our own channel or not).
        let exporter = match config.protocol() {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_channel(grpc_channel(source, &url, ca_file)?)
                .with_timeout(EXPORT_TIMEOUT)
                .build(),
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .with_http_client(http_client(ca_file)?)
                .with_timeout(EXPORT_TIMEOUT)
                .build(),
        }
        .map_err(|error| TraceError::Exporter {
            origin: source,
            error,
        })?;
        let exporter = ReportOnce {
            inner: exporter,
            failing: AtomicBool::new(false),
        };
        let resource = Resource::builder()
            .with_service_name(config.service_name().to_owned())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(BatchSpanProcessor::builder(exporter).build())
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        Ok(Self {
            provider,
            exporting: true,
        })
    }

    /// Whether spans go to a collector.
    pub(super) fn exporting(&self) -> bool {
        self.exporting
    }

    /// The layer that turns tokengate's spans into OpenTelemetry spans. Only tokengate's
    /// own spans and events are traced (INFO and above, and the upstream's DEBUG attempt
    /// spans): a dependency's are not ours to export, and the exporter's own HTTP/2 spans
    /// would otherwise trace themselves.
    pub(super) fn layer<S>(&self) -> impl Layer<S> + use<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        let scope = InstrumentationScope::builder("tokengate")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer_with_scope(scope))
            // Per call, only what says something: no file/line, thread or busy/idle times,
            // and no OpenTelemetry context switch on every poll (parents come from the
            // `tracing` span tree).
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_filter(
                Targets::new()
                    .with_target("tokengate", Level::INFO)
                    .with_target("tokengate::upstream", Level::DEBUG),
            )
    }

    /// Sends what is buffered, waiting at most `timeout`; an unreachable collector costs
    /// that long at most.
    pub(super) fn shutdown(&self, timeout: Duration) {
        if let Err(error) = self.provider.shutdown_with_timeout(timeout) {
            tracing::warn!(%error, "spans still buffered at shutdown were not all exported");
        }
    }
}

/// A gRPC channel to the collector, trusting webpki's roots for https (as the upstream
/// client does), so no second TLS stack and no system store are needed, and `ca_file`'s
/// certificates beside them.
fn grpc_channel(
    source: &'static str,
    endpoint: &str,
    ca_file: Option<&Path>,
) -> Result<tonic::transport::Channel, TraceError> {
    let mut channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
        .map_err(|error| TraceError::Endpoint {
            origin: source,
            error,
        })?
        .timeout(EXPORT_TIMEOUT)
        .connect_timeout(Duration::from_secs(5));
    if endpoint.starts_with("https:") {
        let mut roots: Vec<_> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|der| tonic::transport::Certificate::from_pem(pem(der)))
            .collect();
        if let Some(path) = ca_file {
            // tonic reads every certificate of the bundle.
            let bundle = std::fs::read(path).map_err(|error| TraceError::ReadCa {
                path: path.to_owned(),
                error,
            })?;
            roots.push(tonic::transport::Certificate::from_pem(bundle));
        }
        channel = channel
            .tls_config(tonic::transport::ClientTlsConfig::new().ca_certificates(roots))
            .map_err(|error| TraceError::Tls {
                origin: source,
                error,
            })?;
    }
    Ok(channel.connect_lazy())
}

/// A DER certificate as PEM, the form tonic reads.
fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT` semantics: the base URL, to which `/v1/traces` is added.
fn http_traces_url(endpoint: &str) -> String {
    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
}

/// The blocking client the batch exporter's thread uses (it has no tokio reactor), with
/// webpki's roots and `ca_file`'s certificates. Built on a thread of its own: reqwest's
/// blocking client may not be built inside the runtime.
fn http_client(ca_file: Option<&Path>) -> Result<reqwest::blocking::Client, TraceError> {
    let extra = match ca_file {
        Some(path) => load_ca_file(path)?,
        None => Vec::new(),
    };
    std::thread::spawn(|| {
        let roots = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .filter_map(|der| reqwest::Certificate::from_der(der).ok())
            .chain(extra);
        reqwest::blocking::Client::builder()
            .tls_certs_only(roots)
            .timeout(EXPORT_TIMEOUT)
            .build()
    })
    .join()
    .map_err(|_| TraceError::HttpClientPanicked)?
    .map_err(TraceError::HttpClient)
}

/// Logs the first failed export and the first success after it, not every batch: an
/// unreachable collector is one warning, and spans are dropped meanwhile (the batch
/// processor's queue is bounded, so calls never wait for it).
#[derive(Debug)]
struct ReportOnce<E> {
    inner: E,
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for ReportOnce<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        match &result {
            Err(error) if !self.failing.swap(true, Ordering::Relaxed) => tracing::warn!(
                %error,
                "cannot export spans to the OTLP collector; dropping them until it answers"
            ),
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                tracing::info!("exporting spans to the OTLP collector again");
            }
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The W3C propagator; it holds no state per call.
static PROPAGATOR: LazyLock<TraceContextPropagator> = LazyLock::new(TraceContextPropagator::new);

/// Makes `span` (a call's span, just created) a child of the caller's `traceparent`, when
/// the call's metadata (its HTTP/2 headers) carries a valid one; `tracestate` comes along.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent = PROPAGATOR.extract(&Metadata(headers));
    if parent.span().span_context().is_valid() {
        // Only fails when the span is disabled or already started; neither loses a call.
        let _ = span.set_parent(parent);
    }
}

/// gRPC metadata as the propagator reads it (ASCII entries only: not the `-bin` ones).
struct Metadata<'a>(&'a http::HeaderMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(http::HeaderName::as_str)
            .filter(|key| !key.ends_with("-bin"))
            .collect()
    }
}
