//! A token endpoint that misbehaves on command: [`FaultyUpstream`], a raw
//! `tokio::net::TcpListener` on 127.0.0.1:0 speaking just enough HTTP/1.1 to read one
//! request per connection and answer it (or not) as the current [`Mode`] says.
//!
//! Every connection carries exactly one request and is closed after it (`Connection: close`),
//! so tokengate never reuses a pooled connection across a mode switch and each request sees
//! the mode in force when it connected.
//!
//! Unlike [`CountingUpstream`](crate::CountingUpstream), it runs on the test's own runtime
//! (its tasks are spawned there): start it from inside that runtime.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// What the upstream does with the next connection.
#[derive(Clone, Debug)]
pub enum Mode {
    /// 200 with a token: `access_token` `fault-suite-token`, `expires_in` 3600, scope `A B`.
    Healthy,
    /// The listener is closed: connecting is refused (ECONNREFUSED).
    Refuse,
    /// Accepts, then resets (SO_LINGER 0) before reading anything.
    ResetOnAccept,
    /// Reads the request, then resets without a byte of answer.
    ResetAfterRequest,
    /// Sends the status line and headers (Content-Length 512), then resets.
    ResetAfterHeaders,
    /// Sends the headers and half of the announced body, then resets.
    ResetMidBody,
    /// Sends the headers and half of the announced body, then closes cleanly (FIN).
    CloseMidBody,
    /// Reads the request and never answers; the connection stays open until the peer
    /// closes it (or 30 s pass).
    Hang,
    /// Reads the request, waits this long, then answers as `Healthy` does.
    Slow(Duration),
    /// Sends the headers, then one body byte per period; the whole body would take far
    /// longer than any `request_timeout` used here.
    Trickle(Duration),
    /// Bytes that are not HTTP at all, then a close.
    NotHttp,
    /// 200 with an HTML page.
    Html,
    /// 200 with JSON cut in half (Content-Length matches what is sent).
    TruncatedJson,
    /// 200 with `Content-Length: 2 MiB` and that many bytes behind it.
    HugeWithLength,
    /// 200, chunked, 2 MiB with no length announced.
    HugeChunked,
    /// An error status (429, 503...) with an optional `Retry-After` value.
    Status(u16, Option<&'static str>),
    /// Round-robin over these modes, one per connection (e.g. flapping between healthy
    /// and failing every other request). `Refuse` is not allowed inside.
    Cycle(Vec<Mode>),
}

/// Longest a hanging connection is held open when the peer never closes it.
const HANG_CAP: Duration = Duration::from_secs(30);

/// The body of a healthy answer.
const TOKEN_JSON: &str =
    r#"{"access_token":"fault-suite-token","token_type":"bearer","expires_in":3600,"scope":"A B"}"#;

/// Size of the huge bodies: twice tokengate's 1 MiB cap.
const HUGE: usize = 2 * 1024 * 1024;

type Command = (Mode, oneshot::Sender<()>);

/// A running misbehaving upstream. Dropping it stops the listener and every connection.
pub struct FaultyUpstream {
    addr: SocketAddr,
    control: mpsc::Sender<Command>,
    connections: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

impl FaultyUpstream {
    /// Listens on 127.0.0.1 (a free port) in `mode`; call it from the test's runtime.
    pub async fn start(mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0 for the faulty upstream");
        let addr = listener.local_addr().expect("the upstream's address");
        let (control, commands) = mpsc::channel(4);
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        tokio::spawn(serve(
            listener,
            addr,
            commands,
            connections.clone(),
            open.clone(),
        ));
        let upstream = Self {
            addr,
            control,
            connections,
            open,
        };
        upstream.set(mode).await;
        upstream
    }

    /// `http://127.0.0.1:PORT`, for `upstream.base_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Switches the mode; returns once the accept loop applied it (for `Refuse`, once the
    /// listener is closed; leaving `Refuse`, once it is bound again).
    pub async fn set(&self, mode: Mode) {
        if let Mode::Cycle(modes) = &mode {
            assert!(
                !modes
                    .iter()
                    .any(|m| matches!(m, Mode::Refuse | Mode::Cycle(_))),
                "Refuse and Cycle are listener-wide; they cannot be one step of a cycle"
            );
        }
        let (ack, applied) = oneshot::channel();
        self.control
            .send((mode, ack))
            .await
            .expect("the faulty upstream's accept loop is running");
        applied
            .await
            .expect("the faulty upstream's accept loop applies the mode");
    }

    /// Connections accepted so far (one request each).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Connections whose handler is still running (e.g. hangs the peer has not closed).
    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// Counts a connection as open until its handler ends, however it ends.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(
    listener: TcpListener,
    addr: SocketAddr,
    mut commands: mpsc::Receiver<Command>,
    connections: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
) {
    let mut listener = Some(listener);
    let mut mode = Mode::Healthy;
    let mut turn = 0usize;
    // Owned here, so that they are all aborted when the upstream is dropped.
    let mut handlers = JoinSet::new();
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some((next, ack)) = command else { return };
                match next {
                    Mode::Refuse => listener = None,
                    _ if listener.is_none() => listener = Some(rebind(addr)),
                    _ => {}
                }
                mode = next;
                turn = 0;
                let _ = ack.send(());
            }
            accepted = accept(listener.as_ref()) => {
                let Ok((stream, _)) = accepted else { continue };
                connections.fetch_add(1, Ordering::SeqCst);
                let step = match &mode {
                    Mode::Cycle(modes) => modes[turn % modes.len()].clone(),
                    other => other.clone(),
                };
                turn += 1;
                let open = Open::new(&open);
                handlers.spawn(async move {
                    handle(stream, step).await;
                    drop(open);
                });
            }
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
        }
    }
}

async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(listener) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Binds the same port again after a `Refuse`.
fn rebind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("a socket for the faulty upstream");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(addr)
        .unwrap_or_else(|e| panic!("bind {addr} again after Refuse: {e}"));
    socket.listen(1024).expect("listen")
}

/// Reads one request (head and `Content-Length` body); false if the peer went away first.
async fn read_request(stream: &mut TcpStream) -> bool {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        if buf.len() > 64 * 1024 {
            return false;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

fn head(status: u16, headers: &[(&str, String)]) -> String {
    let reason = match status {
        200 => "OK",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Whatever",
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

fn json_head(status: u16, length: usize) -> String {
    head(
        status,
        &[
            ("Content-Type", "application/json".to_owned()),
            ("Content-Length", length.to_string()),
            ("RCRequestId", "fault-suite-1".to_owned()),
        ],
    )
}

/// Resets the connection: SO_LINGER 0, then close, so the peer sees RST, not FIN. The
/// pause first lets what was written reach the peer before the reset discards it.
async fn reset(stream: TcpStream) {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Writes `total` filler bytes in 64 KiB pieces, stopping when the peer goes away.
async fn write_filler(stream: &mut TcpStream, total: usize, chunked: bool) -> bool {
    let piece = vec![b' '; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        let n = piece.len().min(total - sent);
        let ok = if chunked {
            let mut framed = format!("{n:x}\r\n").into_bytes();
            framed.extend_from_slice(&piece[..n]);
            framed.extend_from_slice(b"\r\n");
            stream.write_all(&framed).await.is_ok()
        } else {
            stream.write_all(&piece[..n]).await.is_ok()
        };
        if !ok {
            return false;
        }
        sent += n;
    }
    true
}

async fn handle(mut stream: TcpStream, mode: Mode) {
    if matches!(mode, Mode::ResetOnAccept) {
        let _ = stream.set_zero_linger();
        return;
    }
    if !read_request(&mut stream).await {
        return;
    }
    let half_body = || {
        let body = format!("{TOKEN_JSON:<512}");
        (json_head(200, body.len()), body[..256].to_owned())
    };
    match mode {
        Mode::Healthy => {
            let reply = format!("{}{TOKEN_JSON}", json_head(200, TOKEN_JSON.len()));
            let _ = stream.write_all(reply.as_bytes()).await;
        }
        Mode::Slow(delay) => {
            tokio::time::sleep(delay).await;
            let reply = format!("{}{TOKEN_JSON}", json_head(200, TOKEN_JSON.len()));
            let _ = stream.write_all(reply.as_bytes()).await;
        }
        Mode::Refuse | Mode::Cycle(_) | Mode::ResetOnAccept => unreachable!("handled above"),
        Mode::ResetAfterRequest => reset(stream).await,
        Mode::ResetAfterHeaders => {
            let _ = stream.write_all(json_head(200, 512).as_bytes()).await;
            reset(stream).await;
        }
        Mode::ResetMidBody => {
            let (head, half) = half_body();
            let _ = stream.write_all(format!("{head}{half}").as_bytes()).await;
            reset(stream).await;
        }
        Mode::CloseMidBody => {
            let (head, half) = half_body();
            let _ = stream.write_all(format!("{head}{half}").as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        Mode::Hang => {
            // Hold the connection, reading (and discarding) until the peer closes it.
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(HANG_CAP, async {
                while let Ok(n) = stream.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            })
            .await;
        }
        Mode::Trickle(period) => {
            let body = format!("{TOKEN_JSON:<4096}");
            if stream
                .write_all(json_head(200, body.len()).as_bytes())
                .await
                .is_err()
            {
                return;
            }
            for byte in body.as_bytes() {
                tokio::time::sleep(period).await;
                if stream.write_all(std::slice::from_ref(byte)).await.is_err() {
                    return;
                }
            }
        }
        Mode::NotHttp => {
            let _ = stream
                .write_all(b"\x00\x01garbage, not HTTP at all\r\n\xff\xfe\r\n\r\n")
                .await;
            let _ = stream.shutdown().await;
        }
        Mode::Html => {
            let page = "<html><body><h1>502 Bad Gateway</h1>nginx</body></html>";
            let head = head(
                200,
                &[
                    ("Content-Type", "text/html".to_owned()),
                    ("Content-Length", page.len().to_string()),
                ],
            );
            let _ = stream.write_all(format!("{head}{page}").as_bytes()).await;
        }
        Mode::TruncatedJson => {
            let cut = &TOKEN_JSON[..TOKEN_JSON.len() / 2];
            let reply = format!("{}{cut}", json_head(200, cut.len()));
            let _ = stream.write_all(reply.as_bytes()).await;
        }
        Mode::HugeWithLength => {
            if stream
                .write_all(json_head(200, HUGE).as_bytes())
                .await
                .is_ok()
            {
                write_filler(&mut stream, HUGE, false).await;
            }
        }
        Mode::HugeChunked => {
            let head = head(
                200,
                &[
                    ("Content-Type", "application/json".to_owned()),
                    ("Transfer-Encoding", "chunked".to_owned()),
                ],
            );
            if stream.write_all(head.as_bytes()).await.is_ok()
                && write_filler(&mut stream, HUGE, true).await
            {
                let _ = stream.write_all(b"0\r\n\r\n").await;
            }
        }
        Mode::Status(status, retry_after) => {
            let body = match status {
                429 => {
                    r#"{"errorCode":"CMN-301","message":"Request rate exceeded","errors":[{"errorCode":"CMN-301","message":"Request rate exceeded"}]}"#
                }
                _ => r#"{"message":"Service temporarily unavailable"}"#,
            };
            let mut headers = vec![
                ("Content-Type", "application/json".to_owned()),
                ("Content-Length", body.len().to_string()),
            ];
            if let Some(wait) = retry_after {
                headers.push(("Retry-After", wait.to_owned()));
            }
            let reply = format!("{}{body}", head(status, &headers));
            let _ = stream.write_all(reply.as_bytes()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends one POST and reads the answer to the end (the upstream closes every
    /// connection after one request).
    async fn post(upstream: &FaultyUpstream) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(upstream.addr).await?;
        let form = "grant_type=client_credentials";
        let request = format!(
            "POST /restapi/oauth/token HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    #[tokio::test]
    async fn answers_as_the_mode_says_and_counts_connections() {
        let upstream = FaultyUpstream::start(Mode::Healthy).await;
        assert_eq!(upstream.url(), format!("http://{}", upstream.addr));
        let answer = post(&upstream).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with(TOKEN_JSON), "{answer}");

        upstream.set(Mode::Status(429, Some("7"))).await;
        let answer = post(&upstream).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 429 "), "{answer}");
        assert!(answer.contains("\r\nRetry-After: 7\r\n"), "{answer}");

        upstream
            .set(Mode::Cycle(vec![Mode::Status(503, None), Mode::Html]))
            .await;
        let first = post(&upstream).await.unwrap();
        let second = post(&upstream).await.unwrap();
        assert!(first.starts_with("HTTP/1.1 503 "), "{first}");
        assert!(!first.contains("Retry-After"), "{first}");
        assert!(second.contains("text/html"), "{second}");
        assert_eq!(upstream.connections(), 4);
    }

    #[tokio::test]
    async fn refuse_closes_the_listener_until_the_next_mode() {
        let upstream = FaultyUpstream::start(Mode::Refuse).await;
        let refused = TcpStream::connect(upstream.addr).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
        upstream.set(Mode::Healthy).await;
        let answer = post(&upstream).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert_eq!(upstream.connections(), 1);
    }

    #[tokio::test]
    async fn a_hanging_connection_stays_open_until_the_peer_closes_it() {
        let upstream = FaultyUpstream::start(Mode::Hang).await;
        let mut stream = TcpStream::connect(upstream.addr).await.unwrap();
        stream
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        crate::wait::until(
            "the hang to be counted open",
            Duration::from_secs(10),
            || std::future::ready(upstream.open() == 1),
        )
        .await;
        drop(stream);
        crate::wait::until("the hang to end", Duration::from_secs(10), || {
            std::future::ready(upstream.open() == 0)
        })
        .await;
    }
}
