//! Prometheus metrics (contract §9): the one registry of the process and every family in it.
//!
//! This module owns:
//! - [`Metrics`]: the registry and pre-resolved handles for what calls record. It is built
//!   once at startup and handed down as an `Arc<Metrics>` to what records (upstream, the
//!   direct path, the broker, the service); there is no global.
//! - [`grpc`]: the tower layer around the tonic server that records go-grpc-middleware's
//!   `grpc_server_*` families and, from the [`Outcome`] a call hands it, the token requests.
//! - [`process`]: the standard `process_*` metrics, read from `/proc/self` at scrape time.
//! - [`serve`]: the plain-HTTP `/metrics` listener (hyper, no second HTTP stack).
//!
//! Cardinality is bounded by construction: every label value is a `&'static str` from a
//! fixed set, except `client`, which is a [`ClientLabel`]: a registered `client_id` or
//! `public`, never a caller-chosen string.
//!
//! It depends on nothing in the crate but the standard names of its label values, so the
//! layers above (upstream, broker, service, startup) can all hold it.

pub mod grpc;
pub mod process;
pub mod serve;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Buckets of go-grpc-middleware's (and Prometheus' Go client's) default histogram, so
/// stock dashboards' `histogram_quantile`s see the same `le`s.
pub const DEFAULT_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `client` label of calls that name no registered client.
pub const PUBLIC: &str = "public";

/// A `client` label value: a registered `client_id` or `public`. Only [`Metrics::client`]
/// makes one, from the clients registered at startup, so no caller can add a series.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientLabel(Arc<str>);

impl ClientLabel {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl EncodeLabelValue for ClientLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, &self.0)
    }
}

/// What a GetToken call learned, handed to the [`grpc`] layer in the response's extensions
/// (by `service::layer`, on success and on failure alike). Every field is a bounded label
/// value.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The grant's name (`grant::GrantKind::as_str`), or `unspecified`.
    pub grant_type: &'static str,
    pub client: ClientLabel,
    /// The ErrorInfo reason, or `OK`.
    pub reason: &'static str,
    /// Where the token came from (`upstream`, `cache`, `coalesced`, `replayed`), or `none`.
    pub source: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TokenLabels {
    grant_type: &'static str,
    client: ClientLabel,
    reason: &'static str,
    source: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct UpstreamLabels {
    endpoint: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CauseLabels {
    cause: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// Which upstream endpoint a request went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Token,
    Revoke,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Token => "token",
            Self::Revoke => "revoke",
        }
    }
}

/// How one upstream request ended, as the `status` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamStatus {
    /// An HTTP answer with this status.
    Http(u16),
    /// No answer within `upstream.request_timeout`.
    Timeout,
    /// The caller's deadline ended the request.
    Deadline,
    /// No HTTP answer: the connection failed or the reply was not HTTP.
    Error,
}

impl UpstreamStatus {
    /// The label: the codes an OAuth endpoint uses by name, any other by its class.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http(code) => match code {
                200 => "200",
                201 => "201",
                204 => "204",
                400 => "400",
                401 => "401",
                403 => "403",
                404 => "404",
                429 => "429",
                500 => "500",
                502 => "502",
                503 => "503",
                504 => "504",
                _ => match code / 100 {
                    0 | 1 => "1xx",
                    2 => "2xx",
                    3 => "3xx",
                    4 => "4xx",
                    _ => "5xx",
                },
            },
            Self::Timeout => "timeout",
            Self::Deadline => "deadline",
            Self::Error => "error",
        }
    }
}

/// Why the upstream client sent a request again (`tokengate_upstream_retries_total{cause}`):
/// exactly the outcomes `upstream::retry_wait` retries on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryCause {
    /// A 429 that named its wait in `Retry-After`.
    RateLimited,
    /// A 503 that named its wait in `Retry-After`.
    Unavailable,
    /// The connection failed, so the request never left.
    Connect,
}

impl RetryCause {
    const ALL: [Self; 3] = [Self::RateLimited, Self::Unavailable, Self::Connect];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "429",
            Self::Unavailable => "503",
            Self::Connect => "connect",
        }
    }
}

/// How a signing-key reload ended (`tokengate_signing_key_reloads_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyReload {
    /// The changed file holds a usable key, now in use.
    Ok,
    /// The changed file cannot be used; the previous key stays in use.
    Error,
}

impl KeyReload {
    const ALL: [Self; 2] = [Self::Ok, Self::Error];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
        }
    }
}

/// How a broker lookup was answered (`tokengate_cache_lookups_total{result}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A kept token answered.
    Hit,
    /// Nothing was kept: the call went upstream.
    Miss,
    /// Something was kept that could no longer answer (expired, rejected): upstream.
    Stale,
    /// Another call's upstream request answered this one too.
    Coalesced,
    /// A kept answer was replayed to a repeated one-shot request.
    Replayed,
}

impl Lookup {
    const ALL: [Self; 5] = [
        Self::Hit,
        Self::Miss,
        Self::Stale,
        Self::Coalesced,
        Self::Replayed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Stale => "stale",
            Self::Coalesced => "coalesced",
            Self::Replayed => "replayed",
        }
    }
}

/// The registry and the handles that calls record into.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Registered client ids, each with its label, so a label costs no allocation.
    clients: HashMap<String, ClientLabel>,
    public: ClientLabel,
    grpc: grpc::ServerMetrics,
    token_requests: Family<TokenLabels, Counter>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_duration: [Histogram; 2],
    upstream_retries: [Counter; 3],
    rate_limit_refusals: Counter,
    calls_shed: Counter,
    cache_lookups: [Counter; 5],
    signing_key_reloads: [Counter; 2],
    sampled: Arc<Sampled>,
}

impl Metrics {
    /// Builds every family; `registered` are the client ids that may become `client` labels.
    pub fn new<'a>(registered: impl IntoIterator<Item = &'a str>) -> Self {
        let mut registry = Registry::default();
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "tokengate_build_info",
            "The running version (always 1)",
            build_info,
        );
        registry.register_collector(Box::new(process::Process::new()));
        let grpc = grpc::ServerMetrics::register(&mut registry);

        let token_requests = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokengate_token_requests",
            "GetToken calls by grant, registered client (or public), ErrorInfo reason (or OK) and source",
            token_requests.clone(),
        );
        let upstream_requests = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "tokengate_upstream_requests",
            "Requests sent to the upstream (each attempt), by endpoint and HTTP status",
            upstream_requests.clone(),
        );
        let upstream_duration_family =
            Family::<EndpointLabels, Histogram>::new_with_constructor(histogram as fn() -> _);
        registry.register(
            "tokengate_upstream_request_duration_seconds",
            "Time from sending a request to the upstream to having read its reply",
            upstream_duration_family.clone(),
        );
        let upstream_duration = [Endpoint::Token, Endpoint::Revoke].map(|endpoint| {
            upstream_duration_family.get_or_create_owned(&EndpointLabels {
                endpoint: endpoint.as_str(),
            })
        });
        let retries = Family::<CauseLabels, Counter>::default();
        registry.register(
            "tokengate_upstream_retries",
            "Requests sent to the upstream again, by what caused it (429, 503, connect)",
            retries.clone(),
        );
        let upstream_retries = RetryCause::ALL.map(|cause| {
            retries.get_or_create_owned(&CauseLabels {
                cause: cause.as_str(),
            })
        });
        let rate_limit_refusals = Counter::default();
        registry.register(
            "tokengate_rate_limit_refusals",
            "Requests refused locally because an upstream 429 penalty was in force",
            rate_limit_refusals.clone(),
        );
        let calls_shed = Counter::default();
        registry.register(
            "tokengate_calls_shed",
            "Calls refused because every slot and queue place was taken",
            calls_shed.clone(),
        );
        let lookups = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tokengate_cache_lookups",
            "Broker lookups by result (hit, miss, stale, coalesced, replayed)",
            lookups.clone(),
        );
        let cache_lookups = Lookup::ALL.map(|lookup| {
            lookups.get_or_create_owned(&ResultLabels {
                result: lookup.as_str(),
            })
        });
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tokengate_signing_key_reloads",
            "private_key_jwt key files re-read after they changed, by result (ok, error: the previous key stays in use)",
            reloads.clone(),
        );
        let signing_key_reloads = KeyReload::ALL.map(|reload| {
            reloads.get_or_create_owned(&ResultLabels {
                result: reload.as_str(),
            })
        });
        let sampled = Arc::new(Sampled::default());
        registry.register_collector(Box::new(sampled.clone()));

        let clients = registered
            .into_iter()
            .map(|id| (id.to_owned(), ClientLabel(Arc::from(id))))
            .collect();
        Self {
            registry,
            clients,
            public: ClientLabel(Arc::from(PUBLIC)),
            grpc,
            token_requests,
            upstream_requests,
            upstream_duration,
            upstream_retries,
            rate_limit_refusals,
            calls_shed,
            cache_lookups,
            signing_key_reloads,
            sampled,
        }
    }

    /// The label of a client: its id when registered, `public` for anything else.
    pub fn client(&self, client_id: Option<&str>) -> ClientLabel {
        client_id
            .and_then(|id| self.clients.get(id))
            .unwrap_or(&self.public)
            .clone()
    }

    /// Counts one GetToken call.
    pub fn token_request(&self, outcome: &Outcome) {
        // Label values are `&'static str`s and an `Arc`: cloned only when a series is new.
        self.token_requests
            .get_or_create(&TokenLabels {
                grant_type: outcome.grant_type,
                client: outcome.client.clone(),
                reason: outcome.reason,
                source: outcome.source,
            })
            .inc();
    }

    /// Counts one request sent to the upstream and how long it took.
    pub fn upstream_request(&self, endpoint: Endpoint, status: UpstreamStatus, took: Duration) {
        self.upstream_requests
            .get_or_create(&UpstreamLabels {
                endpoint: endpoint.as_str(),
                status: status.as_str(),
            })
            .inc();
        self.upstream_duration[endpoint as usize].observe(took.as_secs_f64());
    }

    /// Counts one request about to be sent again.
    pub fn upstream_retry(&self, cause: RetryCause) {
        self.upstream_retries[cause as usize].inc();
    }

    /// Counts one re-read of a changed signing-key file.
    pub fn signing_key_reload(&self, reload: KeyReload) {
        self.signing_key_reloads[reload as usize].inc();
    }

    /// Counts a request refused locally under an upstream 429 penalty.
    pub fn rate_limit_refusal(&self) {
        self.rate_limit_refusals.inc();
    }

    /// Counts a call shed by admission control.
    pub fn call_shed(&self) {
        self.calls_shed.inc();
    }

    /// Counts one broker lookup.
    pub fn cache_lookup(&self, lookup: Lookup) {
        self.cache_lookups[lookup as usize].inc();
    }

    /// How many lookups ended as `lookup` so far.
    pub fn cache_lookups(&self, lookup: Lookup) -> u64 {
        self.cache_lookups[lookup as usize].get()
    }

    /// Registers a gauge whose value is read from `value` at each scrape: state that its
    /// owner already keeps (slots taken, penalties in force) costs calls nothing.
    pub fn sample(
        &self,
        name: &'static str,
        help: &'static str,
        value: impl Fn() -> i64 + Send + Sync + 'static,
    ) {
        self.sampled
            .gauges
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((name, help, Box::new(value)));
    }

    /// The gRPC server families, for [`grpc::MetricsLayer`].
    pub(crate) fn grpc(&self) -> &grpc::ServerMetrics {
        &self.grpc
    }

    /// The exposition in the Prometheus text format (0.0.4).
    pub fn prometheus_text(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }

    /// The exposition in the OpenMetrics text format, `# EOF` included.
    pub fn openmetrics_text(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

fn histogram() -> Histogram {
    Histogram::new(DEFAULT_BUCKETS)
}

type SampleFn = Box<dyn Fn() -> i64 + Send + Sync>;

/// Gauges read at scrape time (see [`Metrics::sample`]).
#[derive(Default)]
struct Sampled {
    gauges: Mutex<Vec<(&'static str, &'static str, SampleFn)>>,
}

impl fmt::Debug for Sampled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampled").finish_non_exhaustive()
    }
}

impl Collector for Sampled {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let gauges = self
            .gauges
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (name, help, value) in gauges.iter() {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value()).encode(metric)?;
        }
        Ok(())
    }
}

/// Encodes one unlabelled gauge or counter from a collector.
fn encode_const(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: f64,
) -> Result<(), fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, kind)?;
    match kind {
        MetricType::Counter => ConstCounter::new(value).encode(metric),
        _ => ConstGauge::new(value).encode(metric),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_registered_clients_become_labels() {
        let metrics = Metrics::new(["app"]);
        assert_eq!(metrics.client(Some("app")).as_str(), "app");
        assert_eq!(metrics.client(Some("someone-else")).as_str(), PUBLIC);
        assert_eq!(metrics.client(None).as_str(), PUBLIC);
    }

    #[test]
    fn upstream_statuses_are_a_fixed_set() {
        let labels: std::collections::HashSet<&str> = (0..=u16::MAX)
            .map(|code| UpstreamStatus::Http(code).as_str())
            .collect();
        assert!(labels.len() <= 17, "{labels:?}");
    }

    #[test]
    fn retries_and_key_reloads_count_under_their_own_label_and_start_at_zero() {
        let metrics = Metrics::new(["app"]);
        metrics.upstream_retry(RetryCause::Unavailable);
        metrics.upstream_retry(RetryCause::Unavailable);
        metrics.signing_key_reload(KeyReload::Error);
        let text = metrics.prometheus_text();
        for line in [
            "tokengate_upstream_retries_total{cause=\"429\"} 0\n",
            "tokengate_upstream_retries_total{cause=\"503\"} 2\n",
            "tokengate_upstream_retries_total{cause=\"connect\"} 0\n",
            "tokengate_signing_key_reloads_total{result=\"ok\"} 0\n",
            "tokengate_signing_key_reloads_total{result=\"error\"} 1\n",
        ] {
            assert!(text.contains(line), "no {line} in {text}");
        }
    }

    #[test]
    fn both_formats_name_counters_with_total_and_openmetrics_ends_with_eof() {
        let metrics = Metrics::new(["app"]);
        metrics.call_shed();
        let text = metrics.prometheus_text();
        assert!(text.contains("tokengate_calls_shed_total 1\n"), "{text}");
        let build = format!(
            "tokengate_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        assert!(text.contains("process_open_fds "), "{text}");
        let open = metrics.openmetrics_text();
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(open.contains("tokengate_calls_shed_total 1\n"), "{open}");
    }
}
