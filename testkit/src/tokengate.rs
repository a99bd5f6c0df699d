//! The real `tokengate` binary, run by the test: [`Tokengate`].
//!
//! The test passes the binary's path (`env!("CARGO_BIN_EXE_tokengate")`, which only an
//! integration test of the root package knows) and a TOML config. The config is written to
//! a temp dir of the process's own, the binary runs `serve --config FILE --log-format json`,
//! and readiness is its `listening` log line, which also names the bound address (so
//! `server.listen = "127.0.0.1:0"` works): never a fixed sleep. Both output streams are read
//! by threads of their own from the start, so the process never blocks on a full pipe and
//! every line is kept for the test (and printed if the test panics).
//!
//! Signals go through the `kill` command: no unsafe code, no extra crate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::Notify;
use tokio::time::Instant;

/// How long the binary may take to log `listening` (a loaded CI machine, a debug build).
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM (the drain included) or SIGKILL.
const EXIT_WITHIN: Duration = Duration::from_secs(30);
/// How often an exit is polled.
const POLL: Duration = Duration::from_millis(10);
/// Lines of each stream printed when a test panics with the process alive.
const TAIL: usize = 200;

/// How to start one process; see [`Tokengate::launch`].
pub struct Launch {
    binary: PathBuf,
    config: String,
    name: String,
    env: Vec<(String, String)>,
}

impl Launch {
    /// A name for messages and the panic dump (default `tokengate`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets an environment variable for the process. The caller's `RUST_LOG` and
    /// `TOKENGATE_*` variables are never inherited; set them here.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// `RUST_LOG` for the process (by default tokengate's own default, `info`).
    pub fn rust_log(self, filter: impl Into<String>) -> Self {
        self.env("RUST_LOG", filter)
    }

    /// Starts the process and returns once it logged `listening`; panics (with its output)
    /// if it exits first or takes longer than 30 s.
    pub async fn start(self) -> Tokengate {
        let dir = tempfile::Builder::new()
            .prefix("testkit-tokengate-")
            .tempdir()
            .expect("a temp dir for tokengate's config");
        let config = dir.path().join("tokengate.toml");
        std::fs::write(&config, &self.config).expect("write tokengate's config");
        let mut command = Command::new(&self.binary);
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .args(["--log-format", "json"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, _) in std::env::vars_os() {
            if key == "RUST_LOG" || key.to_string_lossy().starts_with("TOKENGATE_") {
                command.env_remove(key);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.binary.display()));
        let logs = Arc::new(Logs::default());
        let readers = vec![
            read_lines(
                child.stdout.take().expect("piped stdout"),
                logs.clone(),
                true,
            ),
            read_lines(
                child.stderr.take().expect("piped stderr"),
                logs.clone(),
                false,
            ),
        ];
        let mut process = Tokengate {
            name: self.name,
            pid: child.id(),
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs,
            readers,
            dir,
        };
        process.addr = process.wait_listening().await;
        process
    }
}

/// Everything the process wrote, line by line.
#[derive(Default)]
struct Logs {
    stdout: Mutex<Vec<String>>,
    stderr: Mutex<Vec<String>>,
    /// Streams that reached their end (0, 1 or 2).
    closed: AtomicUsize,
    /// Woken on every line and at the end of each stream.
    changed: Notify,
}

fn read_lines(
    stream: impl std::io::Read + Send + 'static,
    logs: Arc<Logs>,
    stdout: bool,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        let reader = std::io::BufReader::new(stream);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            let sink = if stdout { &logs.stdout } else { &logs.stderr };
            sink.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(line);
            logs.changed.notify_waiters();
        }
        logs.closed.fetch_add(1, Ordering::SeqCst);
        logs.changed.notify_waiters();
    })
}

/// One running `tokengate serve`. Killed (SIGKILL) on drop; if the test is panicking then,
/// the end of its output is printed first.
pub struct Tokengate {
    name: String,
    pid: u32,
    child: Option<Child>,
    addr: SocketAddr,
    logs: Arc<Logs>,
    readers: Vec<std::thread::JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl Tokengate {
    /// Prepares to run `binary` with `config` (TOML); see [`Launch`].
    pub fn launch(binary: impl AsRef<Path>, config: impl Into<String>) -> Launch {
        Launch {
            binary: binary.as_ref().to_owned(),
            config: config.into(),
            name: "tokengate".into(),
            env: Vec::new(),
        }
    }

    /// Runs `binary` with `config` and the defaults; returns once it listens.
    pub async fn start(binary: impl AsRef<Path>, config: impl Into<String>) -> Self {
        Self::launch(binary, config).start().await
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The gRPC address from the `listening` line.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for a tonic endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process's temp dir (its config is `tokengate.toml` there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is still running (a frozen one is).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGSTOP: the process stops where it is, holding its sockets, leases and timers.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// SIGCONT: a frozen process goes on.
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    /// Sends a signal by name (`TERM`, `STOP`, `HUP`...) with the `kill` command.
    pub fn signal(&self, name: &str) {
        assert!(
            self.child.is_some(),
            "{}: signal {name} to a process already reaped",
            self.name
        );
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run the kill command");
        assert!(status.success(), "kill -{name} {} failed", self.pid);
    }

    /// SIGKILL, and waits for the process to be gone: a crash with no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit (the drain included) and for the end of its output,
    /// and returns how it ended; panics if it does not exit within 30 s.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        let status = self.wait_exit().await;
        self.wait_closed().await;
        status
    }

    /// [`Tokengate::terminate`], asserting a clean exit (code 0).
    pub async fn stop(&mut self) {
        let status = self.terminate().await;
        assert!(
            status.code() == Some(0),
            "{} did not exit cleanly after SIGTERM ({status}); its output:\n{}",
            self.name,
            self.output()
        );
    }

    /// Every stdout line so far.
    pub fn stdout(&self) -> Vec<String> {
        lock(&self.logs.stdout).clone()
    }

    /// Every stderr line so far.
    pub fn stderr(&self) -> Vec<String> {
        lock(&self.logs.stderr).clone()
    }

    /// Both streams so far, for messages: stdout, then stderr.
    pub fn output(&self) -> String {
        let stderr = self.stderr();
        let mut out = self.stdout().join("\n");
        if !stderr.is_empty() {
            out.push_str("\n--- stderr ---\n");
            out.push_str(&stderr.join("\n"));
        }
        out
    }

    /// Every stdout line so far that is a JSON log event.
    pub fn events(&self) -> Vec<Value> {
        lock(&self.logs.stdout)
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The `message` of every JSON event so far.
    pub fn messages(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter_map(|e| message(e).map(str::to_owned))
            .collect()
    }

    /// Waits until a JSON event matches `predicate` and returns the first that does; panics
    /// (with the output) after `within`.
    pub async fn wait_for_event(
        &self,
        within: Duration,
        predicate: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let mut changed = std::pin::pin!(self.logs.changed.notified());
            changed.as_mut().enable();
            if let Some(event) = self.events().into_iter().find(|e| predicate(e)) {
                return event;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "{}: no matching log event within {within:?}; its output so far:\n{}",
                    self.name,
                    self.output()
                );
            }
        }
    }

    /// Waits for an event whose `message` contains `text`.
    pub async fn wait_for_message(&self, within: Duration, text: &str) -> Value {
        self.wait_for_event(within, |e| message(e).is_some_and(|m| m.contains(text)))
            .await
    }

    async fn wait_listening(&mut self) -> SocketAddr {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            let mut changed = std::pin::pin!(self.logs.changed.notified());
            changed.as_mut().enable();
            let listening = self
                .events()
                .into_iter()
                .find(|e| message(e) == Some("listening"));
            if let Some(event) = listening {
                let addr = event["fields"]["addr"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .unwrap_or_else(|| {
                        panic!("{}: a listening line without addr: {event}", self.name)
                    });
                return addr;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.wait_closed().await;
                panic!(
                    "{} exited ({status}) before listening; its output:\n{}",
                    self.name,
                    self.output()
                );
            }
            // Also wakes now and then: an exit with no output left to close is possible.
            let wake = deadline.min(Instant::now() + Duration::from_millis(200));
            let _ = tokio::time::timeout_at(wake, changed).await;
            if Instant::now() >= deadline {
                panic!(
                    "{} did not log listening within {READY_WITHIN:?}; its output so far:\n{}",
                    self.name,
                    self.output()
                );
            }
        }
    }

    async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_WITHIN;
        let child = self
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("{}: already reaped", self.name));
        loop {
            if let Some(status) = child.try_wait().expect("wait for tokengate") {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                panic!(
                    "{} did not exit within {EXIT_WITHIN:?}; killed. Its output:\n{}",
                    self.name,
                    self.output()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until both output streams ended (every line written has been read).
    async fn wait_closed(&self) {
        let deadline = Instant::now() + EXIT_WITHIN;
        loop {
            let mut changed = std::pin::pin!(self.logs.changed.notified());
            changed.as_mut().enable();
            if self.logs.closed.load(Ordering::SeqCst) >= 2 {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
        }
    }
}

impl Drop for Tokengate {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            let tail = |lines: Vec<String>| lines[lines.len().saturating_sub(TAIL)..].join("\n");
            eprintln!(
                "---- {} (pid {}), last stdout lines ----\n{}\n---- stderr ----\n{}",
                self.name,
                self.pid,
                tail(self.stdout()),
                tail(self.stderr())
            );
        }
        self.kill();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `message` field of a JSON log event.
pub fn message(event: &Value) -> Option<&str> {
    event["fields"]["message"].as_str()
}

/// The `level` of a JSON log event (`INFO`, `WARN`...).
pub fn level(event: &Value) -> Option<&str> {
    event["level"].as_str()
}
