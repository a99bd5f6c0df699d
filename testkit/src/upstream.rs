//! A local OAuth token endpoint that counts what it receives: [`CountingUpstream`].
//!
//! Plain HTTP/1.1 over `tokio::net` on 127.0.0.1, on its own thread with its own runtime, so
//! it keeps answering whatever the test's runtime is doing (blocked in a Redis command, or
//! a current-thread runtime busy elsewhere). It is slow on purpose (a configurable delay
//! before every answer), so that identical calls overlap, and it behaves like RingCentral
//! where the broker cares:
//!
//! - every token POST gets a fresh pair, `at-N` and `rt-N` (one counter for both);
//! - a `refresh_token` grant rotates: the refresh token is spent on arrival and a spent or
//!   unknown one gets `400 invalid_grant`;
//! - [`CountingUpstream::rate_limit_next`] answers the next requests `429` with
//!   `Retry-After`;
//! - POSTs to the revoke path are accepted (`200`), and a revoked refresh token is spent.
//!
//! Every POST is recorded (path, form fields) the moment its body has arrived, before the
//! delay, so a test can act while the caller still waits for the answer.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot};

/// tokengate's default token path (`upstream.token_path`).
pub const TOKEN_PATH: &str = "/restapi/oauth/token";
/// tokengate's default revoke path (`upstream.revoke_path`).
pub const REVOKE_PATH: &str = "/restapi/oauth/revoke";
/// The `grant_type` of the JWT bearer grant (RFC 7523).
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// `refresh_token_expires_in` of every pair issued.
const REFRESH_LIFETIME_SECS: u64 = 7 * 24 * 3600;
/// Largest request head or body read; anything larger is answered 413 and closed.
const MAX_REQUEST: usize = 1024 * 1024;

/// One POST as it arrived.
#[derive(Clone, Debug)]
pub struct Post {
    pub path: String,
    /// The form fields, decoded, in the order sent.
    pub form: Vec<(String, String)>,
    /// When its body had fully arrived.
    pub arrived: Instant,
}

impl Post {
    /// The value of the first field named `name`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `grant_type`, empty when absent.
    pub fn grant_type(&self) -> &str {
        self.field("grant_type").unwrap_or_default()
    }

    pub fn is_token(&self) -> bool {
        self.path == TOKEN_PATH
    }

    pub fn is_revoke(&self) -> bool {
        self.path == REVOKE_PATH
    }
}

/// What the upstream answered one POST, as the test can see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A token pair.
    Token { access: String, refresh: String },
    /// `400 invalid_grant` (a spent or unknown refresh token).
    InvalidGrant,
    /// `429` with this `Retry-After`.
    RateLimited(Duration),
    /// `200` to a revocation.
    Revoked,
    /// `404` (an unknown path) or `405` (not a POST).
    NotFound,
}

/// A running counting upstream. Dropping it stops the listener and every connection.
pub struct CountingUpstream {
    addr: SocketAddr,
    started: Instant,
    state: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    inner: Mutex<State>,
    /// Woken on every POST recorded.
    arrived: Notify,
}

struct State {
    delay: Duration,
    expires_in: u64,
    /// How many of the next token POSTs are answered 429, and with which `Retry-After`.
    rate_limited: usize,
    retry_after: Duration,
    /// The last number used for `at-N` / `rt-N`.
    issued: u64,
    /// Refresh tokens issued and not yet spent.
    live_refresh: HashSet<String>,
    posts: Vec<(Post, Answer)>,
}

impl CountingUpstream {
    /// Listens on 127.0.0.1 (a free port) and answers after `delay`; tokens live an hour.
    pub fn start(delay: Duration) -> Self {
        let std_listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 for the upstream");
        std_listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = std_listener.local_addr().expect("the upstream's address");
        let state = Arc::new(Shared {
            inner: Mutex::new(State {
                delay,
                expires_in: 3600,
                rate_limited: 0,
                retry_after: Duration::from_secs(60),
                issued: 0,
                live_refresh: HashSet::new(),
                posts: Vec::new(),
            }),
            arrived: Notify::new(),
        });
        let (stop, stopped) = oneshot::channel();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("counting-upstream".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the upstream");
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(std_listener).expect("a tokio listener");
                    serve(listener, shared, stopped).await;
                });
            })
            .expect("spawn the upstream's thread");
        Self {
            addr,
            started: Instant::now(),
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, for `upstream.base_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// The delay before every answer from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// `expires_in` of the access tokens issued from now on.
    pub fn set_expires_in(&self, seconds: u64) {
        self.lock().expires_in = seconds;
    }

    /// Answers the next `n` token POSTs `429 Too Many Requests` with `Retry-After` (whole
    /// seconds), whatever they ask.
    pub fn rate_limit_next(&self, n: usize, retry_after: Duration) {
        let mut state = self.lock();
        state.rate_limited = n;
        state.retry_after = retry_after;
    }

    /// Mints a pair as if a token POST had been answered, without one being made (so the
    /// refresh token is live): the credentials a test's caller starts from.
    pub fn issue_pair(&self) -> (String, String) {
        self.lock().issue()
    }

    /// Every POST so far (token and revoke paths, and any other), in arrival order.
    pub fn posts(&self) -> Vec<Post> {
        self.lock().posts.iter().map(|(p, _)| p.clone()).collect()
    }

    /// Every POST so far with what it was answered.
    pub fn answered(&self) -> Vec<(Post, Answer)> {
        self.lock().posts.clone()
    }

    /// One line per POST so far, for failure messages: when it arrived (after the
    /// upstream's start), its path, `grant_type`, `client_id`, and the answer.
    pub fn summary(&self) -> String {
        let state = self.lock();
        let mut out = String::new();
        for (post, answer) in &state.posts {
            let at = post.arrived.saturating_duration_since(self.started);
            out.push_str(&format!(
                "\n  +{:>6} ms {} grant_type={} client_id={} -> {answer:?}",
                at.as_millis(),
                post.path,
                post.grant_type(),
                post.field("client_id").unwrap_or_default(),
            ));
        }
        out
    }

    /// How many POSTs reached the token path.
    pub fn token_posts(&self) -> usize {
        self.count(|p| p.is_token())
    }

    /// How many token POSTs had this `grant_type`.
    pub fn grant_posts(&self, grant_type: &str) -> usize {
        self.count(|p| p.is_token() && p.grant_type() == grant_type)
    }

    /// How many token POSTs carried the form field `name` = `value` (a `client_id`, a
    /// `refresh_token`, an `assertion`...).
    pub fn posts_with(&self, name: &str, value: &str) -> usize {
        self.count(|p| p.is_token() && p.field(name) == Some(value))
    }

    /// How many token POSTs had exactly this form body (the fields in any order).
    pub fn posts_of_form(&self, form: &[(&str, &str)]) -> usize {
        let mut wanted: Vec<(&str, &str)> = form.to_vec();
        wanted.sort_unstable();
        self.count(|p| {
            let mut got: Vec<(&str, &str)> = p
                .form
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            got.sort_unstable();
            p.is_token() && got == wanted
        })
    }

    /// How many POSTs reached the revoke path.
    pub fn revocations(&self) -> usize {
        self.count(Post::is_revoke)
    }

    /// How many POSTs match `predicate`.
    pub fn count(&self, predicate: impl Fn(&Post) -> bool) -> usize {
        self.lock()
            .posts
            .iter()
            .filter(|(p, _)| predicate(p))
            .count()
    }

    /// Waits until at least `n` POSTs match `predicate` (counted on arrival, before the
    /// delay); panics after `within`.
    pub async fn wait_for_posts(
        &self,
        n: usize,
        within: Duration,
        predicate: impl Fn(&Post) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let mut arrived = std::pin::pin!(self.state.arrived.notified());
            arrived.as_mut().enable();
            let seen = self.count(&predicate);
            if seen >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!(
                    "{seen} matching POST(s) reached the upstream within {within:?}, not {n}; \
                     every POST:{}",
                    self.summary()
                );
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for CountingUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl State {
    fn issue(&mut self) -> (String, String) {
        self.issued += 1;
        let n = self.issued;
        let refresh = format!("rt-{n}");
        self.live_refresh.insert(refresh.clone());
        (format!("at-{n}"), refresh)
    }

    /// Records a POST and decides its answer, as the server would on arrival.
    fn answer(&mut self, post: Post) -> Answer {
        let answer = if post.is_revoke() {
            if let Some(token) = post.field("token") {
                self.live_refresh.remove(token);
            }
            Answer::Revoked
        } else if !post.is_token() {
            Answer::NotFound
        } else if self.rate_limited > 0 {
            self.rate_limited -= 1;
            Answer::RateLimited(self.retry_after)
        } else if post.grant_type() == "refresh_token" {
            let presented = post.field("refresh_token").unwrap_or_default();
            if self.live_refresh.remove(presented) {
                let (access, refresh) = self.issue();
                Answer::Token { access, refresh }
            } else {
                Answer::InvalidGrant
            }
        } else {
            let (access, refresh) = self.issue();
            Answer::Token { access, refresh }
        };
        self.posts.push((post, answer.clone()));
        answer
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(connection(stream, shared.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One request as read off the wire.
struct Request {
    method: String,
    path: String,
    close: bool,
    body: Vec<u8>,
}

/// Serves the requests of one connection (HTTP/1.1 keep-alive) until the peer closes it.
async fn connection(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    loop {
        let request = match read_request(&mut stream, &mut buf).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(()) => {
                let _ = stream
                    .write_all(&response(413, &[], "", true).into_bytes())
                    .await;
                return;
            }
        };
        let (answer, delay) = if request.method == "POST" {
            let form = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&request.body)
                .unwrap_or_default();
            let post = Post {
                path: request.path,
                form,
                arrived: Instant::now(),
            };
            let mut state = shared.lock();
            let answer = state.answer(post);
            let delay = state.delay;
            drop(state);
            shared.arrived.notify_waiters();
            (answer, delay)
        } else {
            (Answer::NotFound, Duration::ZERO)
        };
        tokio::time::sleep(delay).await;
        let expires_in = shared.lock().expires_in;
        let reply = render(&answer, expires_in, request.close);
        if stream.write_all(reply.as_bytes()).await.is_err() || request.close {
            return;
        }
    }
}

/// Reads one request into `buf` (which keeps what follows it); `Ok(None)` when the peer
/// closed the connection between requests, `Err` for a request too large.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Option<Request>, ()> {
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > MAX_REQUEST {
            return Err(());
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_owned();
    let target = first.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_owned();
    let mut length = 0usize;
    let mut close = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => length = value.parse().map_err(drop)?,
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    if length > MAX_REQUEST {
        return Err(());
    }
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..head_end + length].to_vec();
    buf.drain(..head_end + length);
    Ok(Some(Request {
        method,
        path,
        close,
        body,
    }))
}

fn render(answer: &Answer, expires_in: u64, close: bool) -> String {
    let json = [("Content-Type", "application/json".to_owned())];
    match answer {
        Answer::Token { access, refresh } => {
            let body = format!(
                r#"{{"access_token":"{access}","token_type":"bearer","expires_in":{expires_in},"refresh_token":"{refresh}","refresh_token_expires_in":{REFRESH_LIFETIME_SECS},"scope":"ReadAccounts","owner_id":"42"}}"#
            );
            response(200, &json, &body, close)
        }
        Answer::InvalidGrant => response(
            400,
            &json,
            r#"{"error":"invalid_grant","errors":[{"errorCode":"OAU-211","message":"Token is revoked"}],"error_description":"Token is revoked"}"#,
            close,
        ),
        Answer::RateLimited(wait) => {
            let headers = [
                ("Content-Type", "application/json".to_owned()),
                ("Retry-After", wait.as_secs().to_string()),
            ];
            response(
                429,
                &headers,
                r#"{"errorCode":"CMN-301","message":"Request rate exceeded","errors":[{"errorCode":"CMN-301","message":"Request rate exceeded"}]}"#,
                close,
            )
        }
        Answer::Revoked => response(200, &[], "", close),
        Answer::NotFound => response(404, &json, r#"{"message":"not found"}"#, close),
    }
}

fn response(status: u16, headers: &[(&str, String)], body: &str, close: bool) -> String {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        _ => "Unknown",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    if close {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    use std::net::TcpStream;

    use super::*;

    /// Sends one POST on `stream` (kept alive) and returns (status, body).
    fn post(stream: &mut TcpStream, path: &str, form: &str) -> (u16, String) {
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             Content-Length: {}\r\n\r\n{form}",
            form.len()
        )
        .unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut length = 0;
        loop {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        (status, String::from_utf8(body).unwrap())
    }

    #[test]
    fn issues_pairs_rotates_refresh_tokens_and_counts_on_one_connection() {
        let upstream = CountingUpstream::start(Duration::ZERO);
        let mut stream = TcpStream::connect(upstream.addr()).unwrap();
        let (status, body) = post(&mut stream, TOKEN_PATH, "grant_type=password&client_id=a");
        assert_eq!(status, 200);
        assert!(body.contains(r#""access_token":"at-1""#), "{body}");
        assert!(body.contains(r#""refresh_token":"rt-1""#), "{body}");

        let refresh = "grant_type=refresh_token&refresh_token=rt-1&client_id=a";
        let (status, body) = post(&mut stream, TOKEN_PATH, refresh);
        assert_eq!(status, 200);
        assert!(body.contains(r#""refresh_token":"rt-2""#), "{body}");
        let (status, body) = post(&mut stream, TOKEN_PATH, refresh);
        assert_eq!(status, 400, "a spent refresh token");
        assert!(body.contains("invalid_grant"), "{body}");

        let (status, _) = post(&mut stream, REVOKE_PATH, "token=rt-2");
        assert_eq!(status, 200);
        let (status, _) = post(
            &mut stream,
            TOKEN_PATH,
            "grant_type=refresh_token&refresh_token=rt-2",
        );
        assert_eq!(status, 400, "a revoked refresh token");

        assert_eq!(upstream.token_posts(), 4);
        assert_eq!(upstream.revocations(), 1);
        assert_eq!(upstream.grant_posts("refresh_token"), 3);
        assert_eq!(upstream.posts_with("refresh_token", "rt-1"), 2);
        assert_eq!(
            upstream.posts_of_form(&[("client_id", "a"), ("grant_type", "password")]),
            1
        );
        assert_eq!(upstream.posts()[0].field("client_id"), Some("a"));
    }

    #[test]
    fn answers_429_for_the_next_requests_then_tokens_again() {
        let upstream = CountingUpstream::start(Duration::ZERO);
        upstream.rate_limit_next(2, Duration::from_secs(42));
        let mut stream = TcpStream::connect(upstream.addr()).unwrap();
        for _ in 0..2 {
            let (status, _) = post(&mut stream, TOKEN_PATH, "grant_type=client_credentials");
            assert_eq!(status, 429);
        }
        let (status, _) = post(&mut stream, TOKEN_PATH, "grant_type=client_credentials");
        assert_eq!(status, 200);
        let answers: Vec<Answer> = upstream.answered().into_iter().map(|(_, a)| a).collect();
        assert_eq!(
            answers[..2],
            [
                Answer::RateLimited(Duration::from_secs(42)),
                Answer::RateLimited(Duration::from_secs(42))
            ]
        );
        assert!(matches!(answers[2], Answer::Token { .. }));
    }
}
