//! The per-RPC tower layer: go-grpc-middleware's server metrics, with its names and label
//! values, so stock dashboards and alerts work unchanged:
//! `grpc_server_started_total`, `grpc_server_handled_total` and `grpc_server_handling_seconds`.
//!
//! The status of a call is read where gRPC puts it: in the response headers for a
//! trailers-only answer (every error), else in the body's trailers. A response body dropped
//! before its trailers (the caller went away) counts as `Canceled`.
//!
//! Only the methods tokengate serves are counted (as go-grpc-middleware only sees registered
//! handlers); a path naming anything else adds no series. Their handles are resolved once,
//! so a call costs a few atomic increments and no allocation for labels.
//!
//! GetToken calls hand their [`Outcome`] over in the response's extensions (see
//! `service::layer`), and this layer counts `tokengate_token_requests_total` from it.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::Code;

use super::{Metrics, Outcome};

/// The RPCs served: path, service, method and go-grpc-middleware's `grpc_type`.
const METHODS: [(&str, &str, &str, &str); 6] = [
    (
        "/tokengate.v1.TokenService/GetToken",
        "tokengate.v1.TokenService",
        "GetToken",
        "unary",
    ),
    (
        "/tokengate.v1.TokenService/RevokeToken",
        "tokengate.v1.TokenService",
        "RevokeToken",
        "unary",
    ),
    (
        "/grpc.health.v1.Health/Check",
        "grpc.health.v1.Health",
        "Check",
        "unary",
    ),
    (
        "/grpc.health.v1.Health/Watch",
        "grpc.health.v1.Health",
        "Watch",
        "server_stream",
    ),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
];

/// Index of GetToken in [`METHODS`]: its calls carry an [`Outcome`].
const GET_TOKEN: usize = 0;

/// Every gRPC code, indexed by its number.
const CODES: usize = 17;

/// A code's name as Go's `codes.Code.String()` spells it (tonic prints `Ok`, `Cancelled`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_type: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_type: &'static str,
    grpc_code: &'static str,
}

/// One method's handles.
#[derive(Debug)]
struct Method {
    labels: MethodLabels,
    started: Counter,
    handling: Histogram,
    /// By code number, created at first use so unused codes add no series.
    handled: [OnceLock<Counter>; CODES],
}

/// The three families and a method's handles.
#[derive(Debug)]
pub struct ServerMetrics {
    handled: Family<HandledLabels, Counter>,
    methods: Vec<Method>,
}

impl ServerMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let started = Family::<MethodLabels, Counter>::default();
        registry.register(
            "grpc_server_started",
            "Total number of RPCs started on the server",
            started.clone(),
        );
        let handled = Family::<HandledLabels, Counter>::default();
        registry.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure",
            handled.clone(),
        );
        let handling =
            Family::<MethodLabels, Histogram>::new_with_constructor(super::histogram as fn() -> _);
        registry.register(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server",
            handling.clone(),
        );
        let methods = METHODS
            .iter()
            .map(|&(_, grpc_service, grpc_method, grpc_type)| {
                let labels = MethodLabels {
                    grpc_service,
                    grpc_method,
                    grpc_type,
                };
                Method {
                    started: started.get_or_create_owned(&labels),
                    handling: handling.get_or_create_owned(&labels),
                    handled: Default::default(),
                    labels,
                }
            })
            .collect();
        Self { handled, methods }
    }

    fn handled(&self, method: usize, code: Code) -> &Counter {
        let method = &self.methods[method];
        let index = (code as usize).min(CODES - 1);
        method.handled[index].get_or_init(|| {
            self.handled.get_or_create_owned(&HandledLabels {
                grpc_service: method.labels.grpc_service,
                grpc_method: method.labels.grpc_method,
                grpc_type: method.labels.grpc_type,
                grpc_code: code_name(code),
            })
        })
    }
}

fn method_of(path: &str) -> Option<usize> {
    METHODS.iter().position(|(p, ..)| *p == path)
}

/// Wraps the tonic server's routes (see the module docs). Without metrics (no
/// `server.metrics_listen`) it records nothing and passes everything through.
#[derive(Clone, Debug)]
pub struct MetricsLayer {
    metrics: Option<Arc<Metrics>>,
}

impl MetricsLayer {
    pub fn new(metrics: Option<Arc<Metrics>>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Option<Arc<Metrics>>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<MeteredBody<RB>>;
    type Error = S::Error;
    type Future = MeteredFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let pending = self.metrics.as_ref().and_then(|metrics| {
            let method = method_of(request.uri().path())?;
            metrics.grpc().methods[method].started.inc();
            Some(Pending {
                metrics: metrics.clone(),
                method,
                started: Instant::now(),
                outcome: None,
                finished: false,
            })
        });
        MeteredFuture {
            inner: self.inner.call(request),
            pending,
        }
    }
}

/// A call counted as started and not yet as handled.
struct Pending {
    metrics: Arc<Metrics>,
    method: usize,
    started: Instant,
    outcome: Option<Outcome>,
    finished: bool,
}

impl Pending {
    fn finish(&mut self, code: Code) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let grpc = self.metrics.grpc();
        grpc.handled(self.method, code).inc();
        grpc.methods[self.method]
            .handling
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(outcome) = &self.outcome {
            self.metrics.token_request(outcome);
        }
    }
}

impl Drop for Pending {
    /// Dropped unfinished: the caller (or its connection) went away before the status.
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

/// The status in `grpc-status`, if the headers hold one.
fn status_code(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .map(|value| Code::from_bytes(value.as_bytes()))
}

pin_project_lite::pin_project! {
    pub struct MeteredFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
    }
}

impl<F, RB, E> Future for MeteredFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<MeteredBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let mut pending = this.pending.take();
        Poll::Ready(match result {
            Ok(response) => {
                if let Some(pending) = &mut pending
                    && pending.method == GET_TOKEN
                {
                    pending.outcome = response.extensions().get::<Outcome>().cloned();
                }
                // Trailers-only (every error): the status is in the headers already.
                if let Some(code) = status_code(response.headers())
                    && let Some(mut pending) = pending.take()
                {
                    pending.finish(code);
                }
                Ok(response.map(|body| MeteredBody {
                    inner: body,
                    pending,
                }))
            }
            Err(error) => {
                if let Some(mut pending) = pending {
                    pending.finish(Code::Unknown);
                }
                Err(error)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// The response body, which counts the call as handled at its trailers.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        // Dropped before its trailers: counted as `Canceled` (see `Pending`'s drop).
        pending: Option<Pending>,
    }
}

impl<B: Body> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(status_code)
                    && let Some(mut pending) = this.pending.take()
                {
                    pending.finish(code);
                }
            }
            Some(Err(_)) => {
                if let Some(mut pending) = this.pending.take() {
                    pending.finish(Code::Internal);
                }
            }
            None => {
                // The body ended with no status at all.
                if let Some(mut pending) = this.pending.take() {
                    pending.finish(Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::combinators::UnsyncBoxBody;
    use http_body_util::{BodyExt as _, Full};
    use tower::{Layer as _, Service as _};

    use super::*;

    type TestBody = UnsyncBoxBody<Bytes, Infallible>;

    /// A route that answers with `grpc-status` in the headers (trailers-only) or in the
    /// trailers, and an [`Outcome`] in the extensions when given one.
    #[derive(Clone)]
    struct Route {
        in_headers: Option<&'static str>,
        in_trailers: Option<&'static str>,
        outcome: Option<Outcome>,
    }

    impl tower::Service<http::Request<()>> for Route {
        type Response = http::Response<TestBody>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let mut trailers = http::HeaderMap::new();
            if let Some(code) = self.in_trailers {
                trailers.insert("grpc-status", http::HeaderValue::from_static(code));
            }
            let body = Full::new(Bytes::from_static(b"message"))
                .with_trailers(std::future::ready(Some(Ok(trailers))))
                .boxed_unsync();
            let mut response = http::Response::new(body);
            if let Some(code) = self.in_headers {
                response
                    .headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static(code));
            }
            if let Some(outcome) = &self.outcome {
                response.extensions_mut().insert(outcome.clone());
            }
            std::future::ready(Ok(response))
        }
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    const GET_TOKEN_LABELS: &str =
        r#"grpc_service="tokengate.v1.TokenService",grpc_method="GetToken",grpc_type="unary""#;

    fn handled(metrics: &Metrics, code: &str) -> bool {
        metrics.prometheus_text().contains(&format!(
            "grpc_server_handled_total{{{GET_TOKEN_LABELS},grpc_code=\"{code}\"}} 1\n"
        ))
    }

    #[tokio::test]
    async fn the_status_is_read_from_the_trailers_or_the_headers_and_a_dropped_body_is_canceled() {
        let metrics = Arc::new(Metrics::new(["app"]));
        let layer = MetricsLayer::new(Some(metrics.clone()));
        let outcome = Outcome {
            grant_type: "jwt_bearer",
            client: metrics.client(Some("app")),
            reason: "OK",
            source: "cache",
        };

        // OK in the trailers: counted once the body has been read to its trailers.
        let mut ok = layer.layer(Route {
            in_headers: None,
            in_trailers: Some("0"),
            outcome: Some(outcome),
        });
        let response = ok.call(request(METHODS[GET_TOKEN].0)).await.unwrap();
        assert!(!handled(&metrics, "OK"), "not before the trailers");
        response.into_body().collect().await.unwrap();
        assert!(handled(&metrics, "OK"));
        assert!(metrics.prometheus_text().contains(
            "tokengate_token_requests_total{grant_type=\"jwt_bearer\",client=\"app\",reason=\"OK\",source=\"cache\"} 1\n"
        ));

        // Trailers-only: counted from the headers at once.
        let mut refused = layer.layer(Route {
            in_headers: Some("16"),
            in_trailers: None,
            outcome: None,
        });
        let response = refused.call(request(METHODS[GET_TOKEN].0)).await.unwrap();
        assert!(handled(&metrics, "Unauthenticated"));
        drop(response);

        // The caller went away before the trailers.
        let response = ok.call(request(METHODS[GET_TOKEN].0)).await.unwrap();
        drop(response);
        assert!(handled(&metrics, "Canceled"));

        let text = metrics.prometheus_text();
        assert!(
            text.contains(&format!(
                "grpc_server_started_total{{{GET_TOKEN_LABELS}}} 3\n"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "grpc_server_handling_seconds_count{{{GET_TOKEN_LABELS}}} 3\n"
            )),
            "{text}"
        );
    }

    #[tokio::test]
    async fn unknown_paths_and_a_layer_without_metrics_record_nothing() {
        let metrics = Arc::new(Metrics::new([]));
        let route = Route {
            in_headers: Some("12"),
            in_trailers: None,
            outcome: None,
        };
        let mut unknown = MetricsLayer::new(Some(metrics.clone())).layer(route.clone());
        unknown.call(request("/x.Y/Z")).await.unwrap();
        let mut off = MetricsLayer::new(None).layer(route);
        off.call(request(METHODS[GET_TOKEN].0)).await.unwrap();
        let text = metrics.prometheus_text();
        assert!(!text.contains("grpc_server_handled_total{"), "{text}");
        assert!(
            text.lines()
                .filter(|line| line.starts_with("grpc_server_"))
                .all(|line| line.ends_with(" 0") || line.ends_with(" 0.0")),
            "{text}"
        );
    }

    #[test]
    fn codes_are_named_as_go_names_them() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        assert_eq!(code_name(Code::Unauthenticated), "Unauthenticated");
        for number in 0..CODES as i32 {
            assert_eq!(Code::from_i32(number) as usize, number as usize);
        }
    }

    #[test]
    fn only_served_methods_are_counted() {
        assert_eq!(
            method_of("/tokengate.v1.TokenService/GetToken"),
            Some(GET_TOKEN)
        );
        assert_eq!(method_of("/tokengate.v1.TokenService/Nope"), None);
        assert_eq!(method_of("/x.y/GetToken"), None);
    }
}
