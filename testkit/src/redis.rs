//! Debian's `redis-server`, run by the test on 127.0.0.1: one node ([`RedisServer`]) or a small
//! Redis Cluster ([`RedisCluster`]). Nothing is persisted (`--save "" --appendonly no`), each
//! node has its own temp dir, and readiness is a `PING` that answers, never a fixed sleep.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a node may take to answer `PING` after its start (a loaded CI machine).
const READY_WITHIN: Duration = Duration::from_secs(20);
/// How often readiness is polled.
const POLL: Duration = Duration::from_millis(10);

const MISSING: &str = "redis-server is not installed: the Redis tests need Debian's redis-server \
     package (scripts/test installs it; by hand: apt-get install -y --no-install-recommends \
     redis-server)";

/// A reply in the Redis protocol (RESP2), as [`RedisServer::command`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

impl Reply {
    /// The reply as text: simple strings, errors and bulk strings; empty for anything else.
    pub fn text(&self) -> String {
        match self {
            Self::Simple(s) | Self::Error(s) => s.clone(),
            Self::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            _ => String::new(),
        }
    }
}

/// One `redis-server` process on 127.0.0.1. Killed (SIGKILL) on drop.
pub struct RedisServer {
    port: u16,
    password: Option<String>,
    /// Arguments beyond the common ones (cluster mode).
    extra: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a node on a free port and returns once it answers `PING`.
    pub fn start() -> Self {
        Self::launch(None, Vec::new)
    }

    /// Like [`RedisServer::start`], with `requirepass`: clients must `AUTH` with `password`.
    pub fn start_with_password(password: &str) -> Self {
        Self::launch(Some(password.to_owned()), Vec::new)
    }

    /// Like [`RedisServer::start`], also serving TLS on [`RedisServer::tls_url`] with this
    /// certificate and key (PEM files). Clients are not asked for certificates. The plain port
    /// stays open, for readiness checks and [`RedisServer::command`].
    pub fn start_tls(cert_file: &Path, key_file: &Path) -> Self {
        let (cert, key) = (cert_file.to_owned(), key_file.to_owned());
        Self::launch(None, move || {
            vec![
                "--tls-port".into(),
                free_port().to_string(),
                "--tls-cert-file".into(),
                cert.display().to_string(),
                "--tls-key-file".into(),
                key.display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
            ]
        })
    }

    /// Picks a free port and starts there; a port taken between the pick and the bind (another
    /// test) is retried on a new port.
    fn launch(password: Option<String>, extra: impl Fn() -> Vec<String>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("testkit-redis-")
            .tempdir()
            .expect("a temp dir for redis-server");
        let mut server = Self {
            port: 0,
            password,
            extra: Vec::new(),
            dir,
            child: None,
        };
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            server.extra = extra();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("redis-server did not start: {last}");
    }

    /// `redis://127.0.0.1:<port>/0` (no password in it: tests pass that separately).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// `rediss://localhost:<tls port>/0`, for a node started with [`RedisServer::start_tls`].
    pub fn tls_url(&self) -> String {
        format!("rediss://localhost:{}/0", self.arg("--tls-port"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, and waits for the process to be gone: an outage with no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A clean stop (`SHUTDOWN NOSAVE`), killing it if it does not exit within ten seconds.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = self.command(&["SHUTDOWN", "NOSAVE"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the node if it runs, then starts it again on the same port (an outage that ends),
    /// returning once it answers `PING`. Its data is gone: nothing is persisted.
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn() {
            panic!("redis-server did not restart on port {}: {e}", self.port);
        }
    }

    /// Sends one command over a fresh connection (after `AUTH` when the node has a password)
    /// and returns the reply.
    pub fn command<A: AsRef<[u8]>>(&self, args: &[A]) -> Result<Reply, String> {
        command(self.port, self.password.as_deref(), args)
    }

    /// The value given to one of the extra arguments (`--cluster-port`, `--tls-port`).
    fn arg(&self, name: &str) -> &str {
        self.extra
            .iter()
            .position(|a| a == name)
            .and_then(|i| self.extra.get(i + 1))
            .unwrap_or_else(|| panic!("this node was not started with {name}"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port, "--bind", "127.0.0.1", "--daemonize", "no"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!("{MISSING}"),
            Err(e) => panic!("cannot run redis-server: {e}"),
        };
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let child = self.child.as_mut().expect("spawned");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited ({status}); its log ends with:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            if matches!(self.command(&["PING"]), Ok(Reply::Simple(s)) if s == "PONG") {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {READY_WITHIN:?}; its log \
                     ends with:\n{}",
                    self.port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(POLL);
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of a few primaries (no replicas), every slot assigned, on 127.0.0.1.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `primaries` cluster-mode nodes, splits the 16384 slots between them, joins them
    /// with `CLUSTER MEET`, and returns once every node reports `cluster_state:ok`.
    pub fn start(primaries: usize) -> Self {
        assert!(primaries >= 1, "a cluster needs a node");
        let nodes: Vec<RedisServer> = (0..primaries)
            .map(|_| {
                RedisServer::launch(None, || {
                    vec![
                        "--cluster-enabled".into(),
                        "yes".into(),
                        "--cluster-config-file".into(),
                        "nodes.conf".into(),
                        "--cluster-port".into(),
                        free_port().to_string(),
                    ]
                })
            })
            .collect();
        let per = 16384 / primaries;
        for (i, node) in nodes.iter().enumerate() {
            let first = i * per;
            let last = if i + 1 == primaries {
                16383
            } else {
                first + per - 1
            };
            expect_ok(node.command(&[
                "CLUSTER",
                "ADDSLOTSRANGE",
                &first.to_string(),
                &last.to_string(),
            ]));
        }
        for node in &nodes[1..] {
            expect_ok(nodes[0].command(&[
                "CLUSTER",
                "MEET",
                "127.0.0.1",
                &node.port().to_string(),
                node.arg("--cluster-port"),
            ]));
        }
        let cluster = Self { nodes };
        cluster.wait_ok();
        cluster
    }

    /// Every node's URL, comma-separated: the form `cache.redis.url` takes for a cluster.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    fn wait_ok(&self) {
        let deadline = Instant::now() + READY_WITHIN;
        let want = format!("cluster_known_nodes:{}", self.nodes.len());
        loop {
            let ready = self.nodes.iter().all(|node| {
                node.command(&["CLUSTER", "INFO"]).is_ok_and(|reply| {
                    let info = reply.text();
                    info.contains("cluster_state:ok") && info.contains(&want)
                })
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis cluster did not reach cluster_state:ok within {READY_WITHIN:?}"
            );
            std::thread::sleep(POLL);
        }
    }
}

fn expect_ok(reply: Result<Reply, String>) {
    match reply {
        Ok(Reply::Simple(s)) if s == "OK" => {}
        other => panic!("redis-server refused a cluster set-up command: {other:?}"),
    }
}

/// A port nothing listens on now (the OS's pick for an ephemeral bind).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port on 127.0.0.1")
        .port()
}

fn command<A: AsRef<[u8]>>(port: u16, password: Option<&str>, args: &[A]) -> Result<Reply, String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream;
    if let Some(password) = password {
        writer
            .write_all(&encode(&["AUTH".as_bytes(), password.as_bytes()]))
            .map_err(|e| e.to_string())?;
        match read_reply(&mut reader)? {
            Reply::Simple(_) => {}
            other => return Err(format!("AUTH refused: {other:?}")),
        }
    }
    writer.write_all(&encode(args)).map_err(|e| e.to_string())?;
    read_reply(&mut reader)
}

fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        let arg = arg.as_ref();
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn read_reply(reader: &mut impl BufRead) -> Result<Reply, String> {
    let mut line = String::new();
    let n = reader.read_line(&mut line).map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("connection closed".into());
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(1.min(line.len()));
    let number = || {
        rest.parse::<i64>()
            .map_err(|e| format!("bad reply {line:?}: {e}"))
    };
    Ok(match kind {
        "+" => Reply::Simple(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Int(number()?),
        "$" => match usize::try_from(number()?) {
            Err(_) => Reply::Bulk(None),
            Ok(len) => {
                let mut body = vec![0; len + 2];
                reader.read_exact(&mut body).map_err(|e| e.to_string())?;
                body.truncate(len);
                Reply::Bulk(Some(body))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Reply::Array(Vec::new()),
            Ok(len) => Reply::Array(
                (0..len)
                    .map(|_| read_reply(reader))
                    .collect::<Result<_, _>>()?,
            ),
        },
        _ => return Err(format!("unexpected reply {line:?}")),
    })
}
