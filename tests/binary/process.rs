//! Starting the binary, reading its log lines, signalling it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::time::{Instant, timeout};

use tokengate::proto::token_service_client::TokenServiceClient;
use tonic::transport::Channel;

/// How long any wait in these tests may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_tokengate")
}

/// A running `tokengate serve` and everything it has written to stdout so far.
pub struct Served {
    pub child: Child,
    pub addr: String,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: Arc<Notify>,
    _dir: tempfile::TempDir,
}

impl Served {
    /// Writes `config` to a file and runs `tokengate serve --config FILE --log-format json`
    /// with `env`, then waits for the `listening` line.
    pub async fn start(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokengate.toml");
        std::fs::write(&file, config).unwrap();
        Self::start_with(
            &[
                "serve",
                "--config",
                file.to_str().unwrap(),
                "--log-format",
                "json",
            ],
            env,
            dir,
        )
        .await
    }

    /// Runs the binary with `args` and waits for the `listening` line.
    pub async fn start_with(args: &[&str], env: &[(&str, &str)], dir: tempfile::TempDir) -> Self {
        let mut command = Command::new(binary());
        command
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        command
            .env_remove("RUST_LOG")
            .env_remove("TOKENGATE_CONFIG")
            .env_remove("TOKENGATE_LOG_FORMAT");
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let new_line = Arc::new(Notify::new());
        let (sink, notify) = (lines.clone(), new_line.clone());
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
                notify.notify_waiters();
            }
            notify.notify_waiters();
        });
        let mut served = Self {
            child,
            addr: String::new(),
            lines,
            new_line,
            _dir: dir,
        };
        let listening = served
            .wait_for(|event| message(event) == Some("listening"))
            .await;
        served.addr = listening["fields"]["addr"]
            .as_str()
            .expect("listening line names addr")
            .to_owned();
        served
    }

    /// Every stdout line so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Every stdout line so far that is a JSON event.
    pub fn events(&self) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until a JSON event matches `predicate` and returns it.
    pub async fn wait_for(&self, predicate: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let notified = self.new_line.notified();
            if let Some(event) = self.events().into_iter().find(|e| predicate(e)) {
                return event;
            }
            if timeout(deadline.saturating_duration_since(Instant::now()), notified)
                .await
                .is_err()
            {
                panic!(
                    "no matching log line within {PATIENCE:?}; output so far:\n{}",
                    self.output()
                );
            }
        }
    }

    pub async fn client(&self) -> TokenServiceClient<Channel> {
        TokenServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill")
            .args([format!("-{name}").as_str(), &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// SIGTERM, a clean exit, and every log line read: logs are written by a background
    /// thread, so a line can reach stdout after the call it describes has returned.
    pub async fn stop(&mut self) {
        self.signal("TERM");
        assert_eq!(self.exit_code().await, 0, "{}", self.output());
        // The drain verdict is the last line the process writes.
        self.wait_for(|e| e["fields"]["drained"].is_boolean()).await;
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn exit_code(&mut self) -> i32 {
        let status = timeout(PATIENCE, self.child.wait())
            .await
            .expect("exits in time")
            .unwrap();
        status.code().expect("exited, not killed by a signal")
    }
}

/// The `message` of a JSON log event.
pub fn message(event: &Value) -> Option<&str> {
    event["fields"]["message"].as_str()
}

/// Runs the binary to completion and returns (exit code, stdout, stderr).
pub fn run(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> (i32, String, String) {
    let mut command = std::process::Command::new(binary());
    command.args(args).current_dir(cwd).stdin(Stdio::null());
    command
        .env_remove("RUST_LOG")
        .env_remove("TOKENGATE_CONFIG")
        .env_remove("TOKENGATE_LOG_FORMAT");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Writes `text` to `name` in `dir` and returns its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}
