//! Starting tokengate (in process, or the real binary as a child process) against a
//! [`FaultyUpstream`](crate::upstream::FaultyUpstream), calling it, and checking outcomes.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokengate::proto::get_token_request::Grant;
use tokengate::proto::token_service_client::TokenServiceClient;
use tokengate::proto::{ClientCredentialsGrant, GetTokenRequest, GetTokenResponse};
use tokengate::startup::StartupError;
use tokengate::{Application, Config, Drain};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// How long any single wait in this suite may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The `request_timeout` of the servers in this suite: short, so timeouts are cheap.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);

/// The tokengate config used throughout: public clients allowed (so every call can name
/// its own client id and stay clear of another call's rate-limit penalty).
pub fn config_toml(base_url: &str, request_timeout: Duration) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_period = "5s"

[upstream]
base_url = "{base_url}"
allow_insecure_http = true
connect_timeout = "300ms"
request_timeout = "{}ms"

[clients]
allow_public = true
"#,
        request_timeout.as_millis()
    )
}

/// A tokengate running in this process, on its own task.
pub struct Gate {
    pub client: TokenServiceClient<Channel>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<Drain, StartupError>>,
}

impl Gate {
    pub async fn start(base_url: &str) -> Self {
        Self::start_with(base_url, REQUEST_TIMEOUT).await
    }

    pub async fn start_with(base_url: &str, request_timeout: Duration) -> Self {
        Self::start_config(&Config::from_toml(&config_toml(base_url, request_timeout)).unwrap())
            .await
    }

    pub async fn start_config(config: &Config) -> Self {
        let app = Application::build(config).await.unwrap();
        let addr = app.local_addr();
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stop.await;
        }));
        let client = TokenServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Self {
            client,
            shutdown: Some(shutdown),
            server,
        }
    }

    /// Stops the server and asserts it drained completely.
    pub async fn stop(mut self) {
        drop(self.client);
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let drain = timeout(PATIENCE, &mut self.server)
            .await
            .expect("the server stops in time")
            .expect("the server task does not panic")
            .expect("the server stops cleanly");
        assert_eq!(drain, Drain::Complete);
    }
}

/// A client-credentials request for `client_id` (an unregistered, public client).
pub fn request(client_id: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::ClientCredentials(ClientCredentialsGrant {
            subject: None,
        })),
        client_id: client_id.to_owned(),
        ..Default::default()
    }
}

/// One GetToken call, bounded by [`PATIENCE`] (no gRPC deadline of its own).
pub async fn call(
    client: &mut TokenServiceClient<Channel>,
    client_id: &str,
) -> Result<GetTokenResponse, Status> {
    timeout(PATIENCE, client.get_token(request(client_id)))
        .await
        .expect("tokengate answers within PATIENCE")
        .map(tonic::Response::into_inner)
}

/// The RetryInfo delay of a status, if any.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    let delay = status.get_error_details().retry_info()?.retry_delay?;
    Some(delay)
}

/// One ErrorInfo metadata value.
pub fn metadata(status: &Status, key: &str) -> Option<String> {
    status
        .get_error_details()
        .error_info()?
        .metadata
        .get(key)
        .cloned()
}

/// Asserts the gRPC code, the ErrorInfo domain and reason of a failed call.
#[track_caller]
pub fn assert_failure(
    result: &Result<GetTokenResponse, Status>,
    code: Code,
    reason_: &str,
    what: &str,
) -> Status {
    let status = match result {
        Ok(_) => panic!("{what}: expected {code:?}/{reason_}, got a token"),
        Err(status) => status.clone(),
    };
    assert_eq!(status.code(), code, "{what}: {status:?}");
    let info = status
        .get_error_details()
        .error_info()
        .cloned()
        .unwrap_or_else(|| panic!("{what}: no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "tokengate", "{what}: {status:?}");
    assert_eq!(info.reason, reason_, "{what}: {status:?}");
    status
}

/// Polls `condition` until it holds or `within` passes; returns whether it held.
pub async fn eventually(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The real `tokengate` binary as a child process, with stdout and stderr captured.
pub struct Binary {
    child: Child,
    pub addr: String,
    lines: Arc<Mutex<Vec<String>>>,
    new_line: Arc<Notify>,
    _dir: tempfile::TempDir,
}

impl Binary {
    /// Runs `tokengate serve --config FILE --log-format json` with `RUST_BACKTRACE=1` and
    /// waits for its `listening` line.
    pub async fn start(config: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokengate.toml");
        std::fs::write(&file, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["serve", "--config", file.to_str().unwrap()])
            .args(["--log-format", "json"])
            .env_remove("RUST_LOG")
            .env_remove("TOKENGATE_CONFIG")
            .env_remove("TOKENGATE_LOG_FORMAT")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let new_line = Arc::new(Notify::new());
        collect(child.stdout.take().unwrap(), &lines, &new_line);
        collect(child.stderr.take().unwrap(), &lines, &new_line);
        let mut binary = Self {
            child,
            addr: String::new(),
            lines,
            new_line,
            _dir: dir,
        };
        let listening = binary
            .wait_for(|line| {
                line.contains(r#""message":"listening""#).then(|| {
                    let event: serde_json::Value = serde_json::from_str(line).unwrap();
                    event["fields"]["addr"].as_str().unwrap().to_owned()
                })
            })
            .await;
        binary.addr = listening;
        binary
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    pub async fn client(&self) -> TokenServiceClient<Channel> {
        TokenServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    /// Everything written to stdout and stderr so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Resident set size, from `/proc/PID/status`, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Waits until some output line gives `Some` and returns that.
    pub async fn wait_for<T>(&self, find: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let notified = self.new_line.notified();
            if let Some(found) = self.lines.lock().unwrap().iter().find_map(|l| find(l)) {
                return found;
            }
            if timeout(deadline.saturating_duration_since(Instant::now()), notified)
                .await
                .is_err()
            {
                panic!("no matching output line; output so far:\n{}", self.output());
            }
        }
    }

    /// Sends SIGTERM and returns the exit code.
    pub async fn terminate(&mut self) -> i32 {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = timeout(PATIENCE, self.child.wait())
            .await
            .expect("exits in time after SIGTERM")
            .unwrap();
        status.code().expect("exited, not killed by a signal")
    }

    /// SIGTERM, then asserts: exit 0, the final log line says `drained: true`, and nothing
    /// in stdout or stderr mentions a panic.
    pub async fn assert_clean_exit(mut self) {
        let code = self.terminate().await;
        // The pipes close at exit; give the readers a moment to take the last lines.
        let done = eventually(PATIENCE, || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("\"drained\":true") || l.contains("\"drained\":false"))
        })
        .await;
        let output = self.output();
        assert_eq!(code, 0, "exit code after SIGTERM; output:\n{output}");
        assert!(done, "no drain line; output:\n{output}");
        assert!(
            output.contains("\"drained\":true"),
            "the drain was not complete; output:\n{output}"
        );
        assert!(
            !output.contains("panicked"),
            "tokengate panicked; output:\n{output}"
        );
    }
}

fn collect(
    stream: impl AsyncRead + Unpin + Send + 'static,
    lines: &Arc<Mutex<Vec<String>>>,
    new_line: &Arc<Notify>,
) {
    let (sink, notify) = (lines.clone(), new_line.clone());
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push(line);
            notify.notify_waiters();
        }
        notify.notify_waiters();
    });
}
