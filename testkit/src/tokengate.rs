//! The real `tokengate` binary, run by the test: [`Tokengate`] (a server) and
//! [`run_binary`] (one command to completion).
//!
//! The test passes the binary's path (`env!("CARGO_BIN_EXE_tokengate")`, which only an
//! integration test of the root package knows) and a TOML config. The config is written to
//! a temp dir of the process's own, the binary runs `serve --config FILE --log-format json`
//! (or the arguments of [`Tokengate::launch_args`]), and readiness is its `listening` log
//! line, which also names the bound address (so `server.listen = "127.0.0.1:0"` works):
//! never a fixed sleep. Both output streams are read by threads of their own from the
//! start, so the process never blocks on a full pipe and every line is kept for the test
//! (and printed if the test panics).
//!
//! The caller's `RUST_LOG` and `TOKENGATE_*` variables never reach the binary: what the
//! test does not set, the binary does not see.
//!
//! Signals go through the `kill` command: no unsafe code, no extra crate.

use std::ffi::{OsStr, OsString};
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
/// How long [`Tokengate::wait_for`] waits for a log event.
const EVENT_WITHIN: Duration = Duration::from_secs(30);
/// How often an exit is polled.
const POLL: Duration = Duration::from_millis(10);
/// Lines of each stream printed when a test panics with the process alive.
const TAIL: usize = 200;

/// How to start one process; see [`Tokengate::launch`] and [`Tokengate::launch_args`].
pub struct Launch {
    binary: PathBuf,
    /// The config for `serve --config FILE --log-format json`, or none: see `args`.
    config: Option<String>,
    /// The command line when there is no config ([`Tokengate::launch_args`]).
    args: Vec<OsString>,
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

    /// Starts the process (in its temp dir) and returns once it logged `listening`;
    /// panics (with its output) if it exits first or takes longer than 30 s.
    pub async fn start(self) -> Tokengate {
        let dir = tempfile::Builder::new()
            .prefix("testkit-tokengate-")
            .tempdir()
            .expect("a temp dir for tokengate's config");
        let mut command = Command::new(&self.binary);
        if let Some(text) = &self.config {
            let config = dir.path().join("tokengate.toml");
            std::fs::write(&config, text).expect("write tokengate's config");
            command
                .arg("serve")
                .arg("--config")
                .arg(&config)
                .args(["--log-format", "json"]);
        } else {
            command.args(&self.args);
        }
        command
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        scrub_env(&mut command);
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
            config: Some(config.into()),
            args: Vec::new(),
            name: "tokengate".into(),
            env: Vec::new(),
        }
    }

    /// Prepares to run `binary` with exactly these arguments (e.g. `serve` with no config
    /// file, the environment giving the rest); no config file is written. Readiness is still
    /// the JSON `listening` line, so the arguments or the environment
    /// ([`Launch::env`]) must select JSON logs (`--log-format json`,
    /// `TOKENGATE_LOG_FORMAT=json`).
    pub fn launch_args<A: AsRef<OsStr>>(
        binary: impl AsRef<Path>,
        args: impl IntoIterator<Item = A>,
    ) -> Launch {
        Launch {
            binary: binary.as_ref().to_owned(),
            config: None,
            args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
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

    /// The process's temp dir and working directory (its config, if it was given one, is
    /// `tokengate.toml` there).
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
        self.exit_status().await
    }

    /// Waits for the process to exit (after a signal the test sent, say) and for the end of
    /// its output, and returns how it ended; panics (and kills it) if it has not exited
    /// within 30 s.
    pub async fn exit_status(&mut self) -> ExitStatus {
        let status = self.wait_exit().await;
        self.wait_closed().await;
        status
    }

    /// [`Tokengate::exit_status`] as an exit code; panics if a signal ended the process.
    pub async fn exit_code(&mut self) -> i32 {
        let status = self.exit_status().await;
        status.code().unwrap_or_else(|| {
            panic!(
                "{} was ended by a signal ({status}), it did not exit; its output:\n{}",
                self.name,
                self.output()
            )
        })
    }

    /// Resident set size (`VmRSS` in `/proc/PID/status`), in KiB; panics if the process
    /// is gone.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .unwrap_or_else(|e| panic!("{}: read /proc/{}/status: {e}", self.name, self.pid));
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{}: no VmRSS in /proc/{}/status", self.name, self.pid))
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

    /// [`Tokengate::wait_for_event`] with the default bound, 30 s.
    pub async fn wait_for(&self, predicate: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_event(EVENT_WITHIN, predicate).await
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

/// Runs `binary` with `args` and `env` in `cwd` to completion (stdin empty) and returns
/// (exit code, stdout, stderr); the exit code is -1 when a signal ended it. For the one-shot
/// commands (`--version`, `check-config`, `health-check`, a `serve` that fails at start).
pub fn run_binary(
    binary: impl AsRef<Path>,
    args: &[&str],
    env: &[(&str, &str)],
    cwd: &Path,
) -> (i32, String, String) {
    let binary = binary.as_ref();
    let mut command = Command::new(binary);
    command.args(args).current_dir(cwd).stdin(Stdio::null());
    scrub_env(&mut command);
    command.envs(env.iter().copied());
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Removes the caller's `RUST_LOG` and `TOKENGATE_*` variables from `command`.
fn scrub_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key == "RUST_LOG" || key.to_string_lossy().starts_with("TOKENGATE_") {
            command.env_remove(key);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in for the binary: logs a JSON `listening` line, then one line naming its
    /// working directory and `TESTKIT_GREETING`, and exits 7 on SIGTERM.
    const FAKE_SERVER: &str = r#"trap 'exit 7' TERM
echo '{"fields":{"message":"listening","addr":"127.0.0.1:4321"}}'
echo "{\"fields\":{\"message\":\"hello\",\"cwd\":\"$(pwd)\",\"greeting\":\"$TESTKIT_GREETING\"}}"
echo 'to stderr' >&2
while :; do sleep 0.05; done"#;

    #[tokio::test]
    async fn launch_args_runs_the_command_line_given_and_reports_how_it_exited() {
        let mut process = Tokengate::launch_args("sh", ["-c", FAKE_SERVER])
            .name("fake")
            .env("TESTKIT_GREETING", "hi")
            .start()
            .await;
        assert_eq!(process.addr(), SocketAddr::from(([127, 0, 0, 1], 4321)));
        assert_eq!(process.url(), "http://127.0.0.1:4321");
        let hello = process.wait_for(|e| message(e) == Some("hello")).await;
        assert_eq!(hello["fields"]["greeting"], "hi");
        let cwd = std::fs::canonicalize(process.dir()).unwrap();
        assert_eq!(hello["fields"]["cwd"], cwd.to_str().unwrap());
        assert!(
            !process.dir().join("tokengate.toml").exists(),
            "no config file without a config"
        );
        assert!(process.is_running());
        assert!(process.rss_kib() > 0);

        process.signal("TERM");
        assert_eq!(process.exit_code().await, 7);
        assert!(!process.is_running());
        assert_eq!(process.stderr(), ["to stderr"]);
        assert_eq!(process.messages(), ["listening", "hello"]);
    }

    #[test]
    fn run_binary_returns_the_exit_code_and_both_streams() {
        let dir = tempfile::tempdir().unwrap();
        let (code, stdout, stderr) = run_binary(
            "sh",
            &[
                "-c",
                "printf '%s %s' \"$TESTKIT_GREETING\" \"$(pwd)\"; printf oops >&2; exit 3",
            ],
            &[("TESTKIT_GREETING", "hi")],
            dir.path(),
        );
        assert_eq!(code, 3);
        let cwd = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(stdout, format!("hi {}", cwd.display()));
        assert_eq!(stderr, "oops");
    }
}
