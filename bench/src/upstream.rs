//! The mock token endpoint: answers every POST at once (or after `--delay`) with a ~1 KB token,
//! and counts what it saw so the harness can prove how many calls really went upstream.
//!
//! By default every answer is the same token (the saturation runs compare byte counts). With
//! `--rotate` each POST issues a new access and refresh token of the same size, and a refresh
//! token is accepted once, as RingCentral does: a second use is answered 400 `invalid_grant` and
//! counted, so the broker scenarios can show that no refresh token was spent twice.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How the mock answers.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Hold every token POST this long before answering.
    pub delay: Duration,
    /// `expires_in` of every token, in seconds.
    pub expires_in: u64,
    /// A new token pair per POST; refresh tokens are single-use.
    pub rotate: bool,
}

/// What the harness reads back from `GET /stats`.
#[derive(Default)]
struct Stats {
    posts: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    /// POSTs by `grant_type`, and (with `--rotate`) refresh tokens presented again.
    grants: Mutex<Grants>,
    /// The first POST, kept so the direct call can replay tokengate's exact request.
    first: OnceLock<serde_json::Value>,
}

#[derive(Default)]
struct Grants {
    by_type: BTreeMap<String, u64>,
    refresh_reused: u64,
    refresh_unknown: u64,
    /// With `--rotate`: refresh tokens issued and not yet used.
    live: HashSet<String>,
    issued: u64,
}

struct State {
    token: Bytes,
    options: Options,
    stats: Stats,
}

/// Serves on `listen` until the process is killed; prints `listening ADDR` once bound.
pub async fn serve(listen: SocketAddr, options: Options) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    let state = Arc::new(State {
        token: Bytes::from(crate::fixtures::token_json_lasting(options.expires_in)),
        options,
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
        (&Method::GET, "/stats") => {
            let grants = state.stats.grants.lock().expect("no panic holds it");
            json(&serde_json::json!({
                "posts": state.stats.posts.load(Ordering::Relaxed),
                "max_in_flight": state.stats.max_in_flight.load(Ordering::Relaxed),
                "by_grant": grants.by_type,
                "refresh_reused": grants.refresh_reused,
                "refresh_unknown": grants.refresh_unknown,
                "issued": grants.issued,
            }))
        }
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
    let body = body.to_bytes();
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
            "body": String::from_utf8_lossy(&body),
        }));
    }
    let grant_type = field(&body, "grant_type").unwrap_or_default();
    let answer = {
        let mut grants = state.stats.grants.lock().expect("no panic holds it");
        *grants.by_type.entry(grant_type.clone()).or_default() += 1;
        if state.options.rotate {
            rotate(state, &mut grants, &grant_type, &body)
        } else {
            Ok(state.token.clone())
        }
    };
    if !state.options.delay.is_zero() {
        tokio::time::sleep(state.options.delay).await;
    }
    match answer {
        Ok(token) => {
            let mut response = Response::new(Full::new(token));
            response.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(error) => {
            let mut response = json(&serde_json::json!({
                "error": error,
                "error_description": "Token is revoked",
            }));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            response
        }
    }
}

/// A new token pair, or `invalid_grant` for a refresh token that is unknown or already used.
fn rotate(
    state: &State,
    grants: &mut Grants,
    grant_type: &str,
    body: &[u8],
) -> Result<Bytes, &'static str> {
    if grant_type == "refresh_token" {
        let presented = field(body, "refresh_token").unwrap_or_default();
        if !grants.live.remove(&presented) {
            if presented.contains(crate::fixtures::ROTATED_MARK) {
                grants.refresh_reused += 1;
            } else {
                grants.refresh_unknown += 1;
            }
            return Err("invalid_grant");
        }
    }
    grants.issued += 1;
    let (json, refresh) =
        crate::fixtures::rotated_token_json(grants.issued, state.options.expires_in);
    grants.live.insert(refresh);
    Ok(Bytes::from(json))
}

/// The first value of `name` in a form body, decoded.
fn field(body: &[u8], name: &str) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    text.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| decode(value))
    })
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit() =>
            {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_fields_are_found_and_decoded() {
        let body = b"grant_type=refresh_token&refresh_token=a%2Bb+c%3D&x=1";
        assert_eq!(field(body, "grant_type").as_deref(), Some("refresh_token"));
        assert_eq!(field(body, "refresh_token").as_deref(), Some("a+b c="));
        assert_eq!(field(body, "x").as_deref(), Some("1"));
        assert_eq!(field(body, "missing"), None);
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%4"), "%4");
    }

    #[test]
    fn a_rotated_refresh_token_is_accepted_once() {
        let state = State {
            token: Bytes::new(),
            options: Options {
                delay: Duration::ZERO,
                expires_in: 20,
                rotate: true,
            },
            stats: Stats::default(),
        };
        let mut grants = Grants::default();
        let first = rotate(&state, &mut grants, "client_credentials", b"").unwrap();
        let first: serde_json::Value = serde_json::from_slice(&first).unwrap();
        assert_eq!(first["expires_in"], 20);
        let refresh = first["refresh_token"].as_str().unwrap().to_owned();
        let body = format!("grant_type=refresh_token&refresh_token={refresh}");
        let second = rotate(&state, &mut grants, "refresh_token", body.as_bytes()).unwrap();
        let second: serde_json::Value = serde_json::from_slice(&second).unwrap();
        assert_ne!(second["access_token"], first["access_token"]);
        assert_eq!(
            second["access_token"].as_str().unwrap().len(),
            first["access_token"].as_str().unwrap().len()
        );
        assert_eq!(
            rotate(&state, &mut grants, "refresh_token", body.as_bytes()),
            Err("invalid_grant")
        );
        assert_eq!((grants.refresh_reused, grants.issued), (1, 2));
        let unknown = b"grant_type=refresh_token&refresh_token=nope";
        assert!(rotate(&state, &mut grants, "refresh_token", unknown).is_err());
        assert_eq!(grants.refresh_unknown, 1);
    }
}
