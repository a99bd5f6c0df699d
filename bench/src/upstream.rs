//! The mock token endpoint: answers every POST at once (or after `--delay`) with the same ~1 KB
//! token, and counts what it saw so the harness can prove each gRPC call really went upstream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the harness reads back from `GET /stats`.
#[derive(Default)]
struct Stats {
    posts: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// The first POST, kept so the direct call can replay tokengate's exact request.
    first: OnceLock<serde_json::Value>,
}

struct State {
    token: Bytes,
    delay: Duration,
    stats: Stats,
}

/// Serves on `listen` until the process is killed; prints `listening ADDR` once bound.
pub async fn serve(listen: SocketAddr, delay: Duration) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    let state = Arc::new(State {
        token: Bytes::from(crate::fixtures::token_json()),
        delay,
        stats: Stats::default(),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(answer(&state, request).await) }
            });
            // A client that goes away mid-request is normal under load; nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/stats") => json(&serde_json::json!({
            "posts": state.stats.posts.load(Ordering::Relaxed),
            "max_in_flight": state.stats.max_in_flight.load(Ordering::Relaxed),
        })),
        (&Method::GET, "/first-request") => match state.stats.first.get() {
            Some(first) => json(first),
            None => status(StatusCode::NOT_FOUND),
        },
        (&Method::POST, _) => {
            let stats = &state.stats;
            let now = stats.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
            stats.max_in_flight.fetch_max(now, Ordering::Relaxed);
            let response = token(state, request).await;
            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            stats.posts.fetch_add(1, Ordering::Relaxed);
            response
        }
        _ => status(StatusCode::NOT_FOUND),
    }
}

async fn token(state: &State, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let Ok(body) = body.collect().await else {
        return status(StatusCode::BAD_REQUEST);
    };
    if state.stats.first.get().is_none() {
        let header = |name| {
            parts
                .headers
                .get(name)
                .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
                .unwrap_or_default()
                .to_owned()
        };
        let _ = state.stats.first.set(serde_json::json!({
            "path": parts.uri.path(),
            "content_type": header(CONTENT_TYPE),
            "authorization": header(AUTHORIZATION),
            "body": String::from_utf8_lossy(&body.to_bytes()),
        }));
    }
    if !state.delay.is_zero() {
        tokio::time::sleep(state.delay).await;
    }
    let mut response = Response::new(Full::new(state.token.clone()));
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = code;
    response
}
