//! Assembles the server: binds the listener, builds TokenService with health and reflection,
//! serves, and drains on shutdown (contract §5).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admission::Admission;
use crate::broker::redis::RedisStore;
use crate::broker::{Broker, Parts, SystemClock};
use crate::caller::Callers;
use crate::client::Clients;
use crate::config::{CacheBackend, Config};
use crate::direct::Direct;
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::metrics::grpc::MetricsLayer;
use crate::proto::token_service_server::TokenServiceServer;
use crate::rate_limit::RateLimitGuard;
use crate::service::TokenGate;
use crate::service::layer::CallLayer;
use crate::tls::ReloadingTls;
use crate::upstream::Upstream;

/// Largest GetToken/RevokeToken message accepted (tonic answers OUT_OF_RANGE beyond it).
/// Real requests are a few KiB; a request filling many fields to their 8 KiB cap
/// (`grant::MAX_FIELD_BYTES`) can exceed it, and is refused as a whole.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// HTTP/2 streams one connection may have open; more wait at the client.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// The health name of the token service.
pub const SERVICE_NAME: &str = "tokengate.v1.TokenService";

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::BuildError),
    #[error(transparent)]
    Clients(#[from] crate::client::ClientsError),
    /// Reflection or the Redis store, which report in words.
    #[error("{0}")]
    Setup(String),
    #[error("server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// How the drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drain {
    /// Every in-flight call finished within the grace period.
    Complete,
    /// The grace period ran out; remaining calls were dropped.
    TimedOut,
    /// The server stopped without a shutdown signal.
    NotStarted,
}

/// A bound, ready-to-serve tokengate.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    /// The plaintext health listener, bound only when mTLS is on.
    health_listener: Option<(TcpListener, SocketAddr)>,
    tls: Option<Arc<ReloadingTls>>,
    grace: Duration,
    /// Who may call, for the call layer.
    callers: Callers,
    service: TokenGate,
    /// The `/metrics` listener, bound only when `server.metrics_listen` is set.
    metrics_listener: Option<(TcpListener, SocketAddr)>,
    metrics: Arc<Metrics>,
}

impl Application {
    /// Binds the listener (port 0 picks a free port) and builds the service.
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        let (listener, addr) = bind(config.server.listen).await?;
        // Kubernetes' gRPC probes speak neither TLS nor mTLS (contract §7).
        let health_listener = if config.server.tls.is_some() {
            Some(bind(config.server.health_listen).await?)
        } else {
            None
        };
        let metrics_listener = match config.server.metrics_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let tls = match &config.server.tls {
            Some(tls) => Some(Arc::new(ReloadingTls::new(tls.files())?)),
            None => None,
        };
        let metrics = Arc::new(Metrics::new(
            config
                .clients
                .registered
                .iter()
                .map(|c| c.client_id.as_str()),
        ));
        if let Some(tls) = &tls {
            // Only with TLS on: a series that is absent without it cannot fire an alert.
            let served = tls.clone();
            metrics.sample(
                "tokengate_tls_certificate_expiry_timestamp_seconds",
                "When the serving TLS certificate expires (its notAfter, Unix seconds); follows reloads.",
                move || served.not_after(),
            );
        }
        let upstream = Upstream::new(&config.upstream, metrics.clone())?;
        let clients = Arc::new(Clients::new(
            &config.clients,
            upstream.token_url().as_str(),
        )?);
        let broker = broker(config, clients.clone(), upstream, &metrics)?;
        Ok(Self {
            listener,
            addr,
            health_listener,
            tls,
            grace: config.server.shutdown_grace_period,
            callers: Callers::new(&config.callers),
            service: TokenGate::new(clients, broker, metrics.clone()),
            metrics_listener,
            metrics,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The `/metrics` address, when `server.metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// The plaintext health address, when mTLS is on.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener.as_ref().map(|(_, addr)| *addr)
    }

    /// Serves until `shutdown` resolves, then flips health to NOT_SERVING, stops accepting
    /// and drains in-flight calls for at most the grace period.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<Drain, StartupError> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<TokenServiceServer<TokenGate>>()
            .await;
        let reflection = |builder: tonic_reflection::server::Builder<'static>| {
            builder
                .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // google.rpc error details, so grpcurl can show ErrorInfo and friends.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
            .build_v1()
            .map_err(|e| StartupError::Setup(format!("reflection: {e}")))?;
        // grpcurl 1.8 speaks only v1alpha.
        let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
            .build_v1alpha()
            .map_err(|e| StartupError::Setup(format!("reflection: {e}")))?;

        // Dropped (and so stopped) when this function returns.
        let _key_watcher = AbortOnDrop(tokio::spawn(crate::assertion::watch_keys(
            self.service.signers(),
            self.metrics.clone(),
        )));
        let _tls_watcher = self
            .tls
            .clone()
            .map(|tls| AbortOnDrop(tokio::spawn(crate::tls::watch(tls))));

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let _health_server = self.health_listener.map(|(listener, addr)| {
            tracing::info!(%addr, "serving plaintext health for probes");
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            AbortOnDrop(tokio::spawn({
                let server = Server::builder()
                    .add_service(health.clone())
                    .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
                async move {
                    if let Err(error) = server.await {
                        tracing::error!(%error, "the health server failed");
                    }
                }
            }))
        });

        // Metrics on: the listener, and the per-RPC layer around every route.
        let metered = self.metrics_listener.map(|(listener, addr)| {
            tracing::info!(%addr, "serving metrics");
            AbortOnDrop(tokio::spawn(crate::metrics::serve::serve(
                listener,
                self.metrics.clone(),
            )))
        });
        let layers = tower::ServiceBuilder::new()
            // Outermost: counts every call, including those tonic refuses before a handler
            // runs, and reads the GetToken labels the call layer leaves in the response.
            .layer(MetricsLayer::new(
                metered.as_ref().map(|_| self.metrics.clone()),
            ))
            // TokenService calls: span, caller, log line (see `service::layer`).
            .layer(CallLayer::new(self.callers));

        let token_service =
            TokenServiceServer::new(self.service).max_decoding_message_size(MAX_REQUEST_BYTES);
        let router = Server::builder()
            .layer(layers)
            // Find dead peers (and keep NAT/LB state alive) without waiting for TCP.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(token_service);
        tracing::info!(addr = %self.addr, tls = self.tls.is_some(), "listening");
        let signal = stopped(stop_rx);
        let server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
            match self.tls {
                Some(tls) => Box::pin(router.serve_with_incoming_shutdown(
                    crate::tls::incoming(self.listener, tls),
                    signal,
                )),
                None => Box::pin(router.serve_with_incoming_shutdown(
                    TcpIncoming::from(self.listener).with_nodelay(Some(true)),
                    signal,
                )),
            };
        tokio::pin!(server);
        let grace = self.grace;
        let signalled = async {
            shutdown.await;
            tracing::info!(grace = %humantime::format_duration(grace), "shutdown signal received; draining");
            set_all(&reporter, ServingStatus::NotServing).await;
            stop_tx.send_replace(true);
        };
        tokio::select! {
            result = &mut server => return result.map(|()| Drain::NotStarted).map_err(StartupError::from),
            () = signalled => {}
        }
        match tokio::time::timeout(grace, server).await {
            Ok(result) => result.map(|()| Drain::Complete).map_err(StartupError::from),
            Err(_) => Ok(Drain::TimedOut),
        }
    }
}

/// The broker over the direct upstream path, with Redis behind it when configured. Redis
/// being down is no reason not to start: the store connects in the background.
fn broker(
    config: &Config,
    clients: Arc<Clients>,
    upstream: Upstream,
    metrics: &Arc<Metrics>,
) -> Result<Broker<Direct>, StartupError> {
    let cache = &config.cache;
    let keys = Arc::new(Keys::new(cache.key.as_ref()));
    let guard = RateLimitGuard::new(None);
    let (fleet, guard) = match cache.backend {
        CacheBackend::Memory => (None, guard),
        CacheBackend::Redis => {
            let (notices_tx, notices) = tokio::sync::mpsc::unbounded_channel();
            let store = RedisStore::start(&cache.redis, keys.clone(), notices_tx)
                .map_err(StartupError::Setup)?;
            let up = store.clone();
            metrics.sample(
                "tokengate_redis_up",
                "Whether Redis answers (1) or not (0).",
                move || i64::from(up.is_up()),
            );
            // Past the store's own timeout (which should always end a call first), a
            // store that hangs costs each attempt at most this.
            let guard = guard.with_patience(cache.redis.timeout.saturating_mul(2));
            guard.share(Arc::new(store.clone()));
            (Some((store, notices)), guard)
        }
    };
    let guard = Arc::new(guard);
    let token_url = upstream.token_url().to_string();
    let direct = Direct {
        clients,
        upstream,
        guard: guard.clone(),
        admission: Admission::new(
            config.server.max_concurrent_calls,
            config.server.max_queued_calls,
            config.upstream.request_timeout,
        ),
        keys: keys.clone(),
        metrics: metrics.clone(),
    };
    tracing::info!(backend = ?cache.backend, "token broker ready");
    // Every gauge reads through a weak handle: `metrics` is held by the broker (through its
    // upstream), so a strong one would keep the broker, its guard and the Redis store alive
    // for good, and their background tasks with them.
    let penalties_in_force = Arc::downgrade(&guard);
    metrics.sample(
        "tokengate_rate_limit_penalties",
        "Upstream 429 penalties in force on this replica (clients or users held back).",
        move || count(penalties_in_force.upgrade().map_or(0, |g| g.in_force())),
    );
    let broker = Broker::new(
        cache,
        Parts {
            fetch: direct,
            keys,
            clock: Arc::new(SystemClock),
            token_url,
            request_timeout: config.upstream.request_timeout,
            refresh_ends_access_token: config.upstream.refresh_ends_access_token,
            fleet,
            guard,
            metrics: metrics.clone(),
        },
    );
    let sampled = broker.downgrade();
    metrics.sample(
        "tokengate_calls_in_flight",
        "Calls holding one of the max_concurrent_calls slots.",
        move || {
            sampled
                .upgrade()
                .map_or(0, |b| count(b.fetcher().admission.in_flight()))
        },
    );
    let sampled = broker.downgrade();
    metrics.sample(
        "tokengate_calls_queued",
        "Calls waiting for a slot.",
        move || {
            sampled
                .upgrade()
                .map_or(0, |b| count(b.fetcher().admission.queued()))
        },
    );
    let sampled = broker.downgrade();
    metrics.sample(
        "tokengate_cache_entries",
        "Entries in this replica's local cache.",
        move || {
            sampled
                .upgrade()
                .map_or(0, |b| i64::try_from(b.local_entries()).unwrap_or(i64::MAX))
        },
    );
    Ok(broker)
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Binds `addr` (port 0 picks a free port) and returns the address actually bound.
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartupError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartupError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| StartupError::Bind { addr, source })?;
    Ok((listener, addr))
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gauges that read the broker are kept by `Metrics`, which the broker itself holds
    /// (through its upstream). Strong handles there were a cycle: a dropped service kept
    /// its broker, guard and Redis store (and so their background tasks) for good.
    #[tokio::test]
    async fn a_dropped_broker_is_freed_while_its_metrics_live_on() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("cache.key");
        std::fs::write(&key, [7u8; 32]).unwrap();
        // Nothing listens there: the store tries to connect in the background and fails.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let config = Config::from_toml(&format!(
            "[upstream]\nbase_url = \"http://127.0.0.1:9\"\nallow_insecure_http = true\n\
             [cache]\nbackend = \"redis\"\nkey_file = \"{}\"\n\
             [cache.redis]\nurl = \"redis://127.0.0.1:{port}/0\"\n",
            key.display()
        ))
        .unwrap();
        let metrics = Arc::new(Metrics::new([]));
        let upstream = Upstream::new(&config.upstream, metrics.clone()).unwrap();
        let clients =
            Arc::new(Clients::new(&config.clients, upstream.token_url().as_str()).unwrap());
        let broker = broker(&config, clients, upstream, &metrics).unwrap();
        let weak = broker.downgrade();
        let guard = Arc::downgrade(&broker.fetcher().guard);
        drop(broker);

        // Let the runtime run every task that could still let go of them.
        for _ in 0..1_000 {
            if weak.upgrade().is_none() && guard.upgrade().is_none() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(weak.upgrade().is_none(), "the broker outlived every handle");
        assert!(guard.upgrade().is_none(), "the guard outlived the broker");
        // A scrape after the broker has gone still answers.
        let text = metrics.prometheus_text();
        assert!(text.contains("tokengate_cache_entries 0"), "{text}");
    }
}
