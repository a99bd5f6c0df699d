//! The tower layer around TokenService's RPCs: what every call needs that is not about its
//! messages. For each GetToken and RevokeToken call it
//!
//! 1. opens the call's span, a child of the caller's `traceparent` when it sends one;
//! 2. identifies the caller (`[[callers]]`, by mTLS certificate or API key);
//! 3. hands both to the handler as a [`Call`] in the request's extensions;
//! 4. once the handler has answered, logs the call's one line, finishes its span, and passes
//!    GetToken's labels on to [`crate::metrics::grpc`] as a [`metrics::Outcome`] in the
//!    response's extensions.
//!
//! The handler says how the call ended with [`Call::end`]. That report travels back in a slot
//! that [`Call`] shares with the layer, not in the response: a failed call answers with a
//! `tonic::Status`, which has no extensions of its own (tonic 0.14), so only a slot carries
//! the same report on success and on failure.
//!
//! Other paths (health, reflection) pass through untouched.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Code;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tracing::field;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::caller::{Callers, Unauthenticated};
use crate::metrics;
use crate::telemetry;

/// The target of the call's span and log line: the handler's module, where they were
/// written before this layer existed; log filters (`RUST_LOG`) and readers name it.
const TARGET: &str = "tokengate::service";

/// What the layer hands a TokenService handler, in the request's extensions.
#[derive(Clone, Debug)]
pub struct Call {
    /// The call's span: the handler records `grant_type` and `client_id` on it as it learns
    /// them, so every line logged during the call carries them.
    pub span: tracing::Span,
    /// Who is calling; `Ok(None)` when no callers are registered.
    pub caller: Result<Option<Arc<str>>, Unauthenticated>,
    ended: Arc<Mutex<Option<Ended>>>,
}

impl Call {
    /// Reports how the call ended, for the layer to log, trace and count.
    pub fn end(&self, ended: Ended) {
        *self.ended.lock().unwrap_or_else(PoisonError::into_inner) = Some(ended);
    }
}

/// How a call ended, as its handler reports it.
#[derive(Debug)]
pub struct Ended {
    /// The gRPC code of the answer.
    pub code: Code,
    /// The upstream's HTTP status, when this call reached it.
    pub upstream_status: Option<u16>,
    /// `None` on success.
    pub failure: Option<Failed>,
    /// GetToken's labels of `tokengate_token_requests_total`; `None` for other RPCs.
    pub token_request: Option<metrics::Outcome>,
}

/// Why a call failed, as its log line says it.
#[derive(Debug)]
pub struct Failed {
    /// The ErrorInfo reason.
    pub reason: &'static str,
    /// More for the operator; never a secret, nor a caller-chosen string.
    pub detail: String,
}

/// The RPCs that get a [`Call`].
#[derive(Clone, Copy, Debug)]
enum Rpc {
    GetToken,
    RevokeToken,
}

impl Rpc {
    fn of(path: &str) -> Option<Self> {
        match path {
            "/tokengate.v1.TokenService/GetToken" => Some(Self::GetToken),
            "/tokengate.v1.TokenService/RevokeToken" => Some(Self::RevokeToken),
            _ => None,
        }
    }

    /// The call's span, its fields empty until the call learns them. Never a secret: only
    /// the grant's name, a registered client_id (or `public`), the upstream's status and
    /// the latency.
    fn span(self) -> tracing::Span {
        match self {
            Self::GetToken => tracing::info_span!(
                target: TARGET,
                "GetToken",
                otel.name = "tokengate.v1.TokenService/GetToken",
                otel.kind = "server",
                grant_type = field::Empty,
                client_id = field::Empty,
                upstream_status = field::Empty,
                latency = field::Empty,
            ),
            Self::RevokeToken => tracing::info_span!(
                target: TARGET,
                "RevokeToken",
                otel.name = "tokengate.v1.TokenService/RevokeToken",
                otel.kind = "server",
                client_id = field::Empty,
                upstream_status = field::Empty,
                latency = field::Empty,
            ),
        }
    }
}

/// Wraps the tonic server's routes (see the module docs).
#[derive(Clone, Debug)]
pub struct CallLayer {
    callers: Arc<Callers>,
}

impl CallLayer {
    pub fn new(callers: Callers) -> Self {
        Self {
            callers: Arc::new(callers),
        }
    }
}

impl<S> tower::Layer<S> for CallLayer {
    type Service = CallService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallService {
            inner,
            callers: self.callers.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CallService<S> {
    inner: S,
    callers: Arc<Callers>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for CallService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CallFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let open = Rpc::of(request.uri().path()).map(|rpc| {
            let started = Instant::now();
            let span = rpc.span();
            telemetry::traces::continue_trace(&span, request.headers());
            let peer_certs = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(TlsConnectInfo::peer_certs);
            let caller = self
                .callers
                .identify(peer_certs.as_deref().map(Vec::as_slice), request.headers())
                .map(|name| name.map(Arc::from));
            let ended = Arc::default();
            request.extensions_mut().insert(Call {
                span: span.clone(),
                caller,
                ended: Arc::clone(&ended),
            });
            Open {
                span,
                started,
                ended,
            }
        });
        CallFuture {
            inner: self.inner.call(request),
            open,
        }
    }
}

/// A call whose handler has not answered yet.
struct Open {
    span: tracing::Span,
    started: Instant,
    ended: Arc<Mutex<Option<Ended>>>,
}

impl Open {
    /// Logs and traces the end the handler reported. A call that ends with no report (tonic
    /// refused the request before the handler ran) logs nothing, as before this layer.
    fn finish<RB>(self, response: &mut http::Response<RB>) {
        let ended = self
            .ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(ended) = ended else { return };
        let span = &self.span;
        // As a person reads it ("412µs", "1.204ms"), to the microsecond: not 0.41200000000000003.
        let micros = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        span.record("latency", field::debug(Duration::from_micros(micros)));
        if let Some(status) = ended.upstream_status {
            // As i64: OpenTelemetry's attributes have no unsigned integers (a u16 would become text).
            span.record("upstream_status", i64::from(status));
        }
        match &ended.failure {
            None => tracing::info!(target: TARGET, parent: span, "call succeeded"),
            Some(Failed { reason, detail }) => {
                tracing::info!(target: TARGET, parent: span, reason, detail, "call failed");
            }
        }
        code_on_trace(span, ended.code);
        if let Some(outcome) = ended.token_request {
            response.extensions_mut().insert(outcome);
        }
    }
}

/// Puts the call's gRPC code on its trace span only (as a log field it would cost every call
/// another re-formatting of the span's fields, and the log line says it already), marked as
/// an error when the code is a server-side fault (OpenTelemetry's gRPC conventions); a
/// caller's mistake is not one.
fn code_on_trace(span: &tracing::Span, code: Code) {
    span.set_attribute("rpc.grpc.status_code", i64::from(code as i32));
    if matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    ) {
        span.set_status(opentelemetry::trace::Status::error(code.description()));
    }
}

pin_project_lite::pin_project! {
    pub struct CallFuture<F> {
        #[pin]
        inner: F,
        // `None` for paths that are not TokenService RPCs.
        open: Option<Open>,
    }
}

impl<F, RB, E> Future for CallFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // The handler runs inside the call's span, so what it logs belongs to the call.
        let entered = this.open.as_ref().map(|open| open.span.enter());
        let mut result = ready!(this.inner.poll(cx));
        drop(entered);
        if let (Some(open), Ok(response)) = (this.open.take(), &mut result) {
            open.finish(response);
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use tower::{Layer as _, Service as _};

    use super::*;

    /// A handler that reports `ended` through the [`Call`] it was handed, and says what it got.
    #[derive(Clone)]
    struct Handler {
        ended: fn() -> Option<Ended>,
        got: Arc<Mutex<Option<Call>>>,
    }

    impl tower::Service<http::Request<()>> for Handler {
        type Response = http::Response<()>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<()>) -> Self::Future {
            let call = request.extensions().get::<Call>().cloned();
            if let (Some(call), Some(ended)) = (&call, (self.ended)()) {
                call.end(ended);
            }
            *self.got.lock().unwrap() = call;
            std::future::ready(Ok(http::Response::new(())))
        }
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder().uri(path).body(()).unwrap()
    }

    fn served(ended: fn() -> Option<Ended>) -> (CallService<Handler>, Arc<Mutex<Option<Call>>>) {
        let got = Arc::default();
        let handler = Handler {
            ended,
            got: Arc::clone(&got),
        };
        (CallLayer::new(Callers::default()).layer(handler), got)
    }

    #[tokio::test]
    async fn a_get_token_call_gets_a_call_and_its_labels_reach_the_metrics_layer() {
        let (mut service, got) = served(|| {
            Some(Ended {
                code: Code::Ok,
                upstream_status: Some(200),
                failure: None,
                token_request: Some(metrics::Outcome {
                    grant_type: "password",
                    client: metrics::Metrics::new([]).client(None),
                    reason: "OK",
                    source: "upstream",
                }),
            })
        });
        let response = service
            .call(request("/tokengate.v1.TokenService/GetToken"))
            .await
            .unwrap();
        let call = got.lock().unwrap().take().expect("the handler got a Call");
        assert_eq!(
            call.caller,
            Ok(None),
            "no callers registered: anyone may call"
        );
        let outcome = response.extensions().get::<metrics::Outcome>().unwrap();
        assert_eq!(
            (outcome.grant_type, outcome.source),
            ("password", "upstream")
        );
    }

    #[tokio::test]
    async fn other_paths_and_unreported_calls_pass_through() {
        let (mut service, got) = served(|| None);
        let response = service.call(request("/grpc.health.v1.Health/Check")).await;
        assert!(got.lock().unwrap().is_none(), "health gets no Call");
        assert!(response.unwrap().extensions().is_empty());

        let response = service
            .call(request("/tokengate.v1.TokenService/RevokeToken"))
            .await
            .unwrap();
        assert!(got.lock().unwrap().is_some());
        assert!(response.extensions().get::<metrics::Outcome>().is_none());
    }
}
