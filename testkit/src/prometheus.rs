//! Debian's `prometheus` (and its `promtool`), run by the test on 127.0.0.1:
//! [`Prometheus`] scrapes its targets every second into its own temp dir, and answers PromQL
//! through its HTTP API. Readiness is `/-/ready` answering 200 and, for the data, a scrape
//! that began after the moment the test names ([`Prometheus::wait_scraped_after`]), never a
//! fixed sleep.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

/// How long Prometheus may take to be ready, and a scrape to land (a loaded CI machine).
const PATIENCE: Duration = Duration::from_secs(30);
/// How often readiness and scrapes are polled.
const POLL: Duration = Duration::from_millis(50);
/// The job name of the one target.
pub const JOB: &str = "tokengate";

const MISSING: &str = "prometheus is not installed: the metrics tests need Debian's prometheus \
     package, which also ships promtool (scripts/test installs it; by hand: apt-get install -y \
     --no-install-recommends prometheus)";

/// One sample of an instant query: its labels and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One `prometheus` process on 127.0.0.1, scraping its targets. Killed on drop.
pub struct Prometheus {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    targets: usize,
}

impl Prometheus {
    /// Starts Prometheus on a free port, scraping `http://<target>/metrics` every second
    /// (job [`JOB`]), and returns once it is ready.
    pub fn start(target: SocketAddr) -> Self {
        Self::start_labelled(&[(target, &[])])
    }

    /// As [`Prometheus::start`], for several targets, each with its own target labels (as
    /// Kubernetes service discovery adds `namespace` and `pod`, so that a dashboard's
    /// filters have something to select).
    pub fn start_labelled(targets: &[(SocketAddr, &[(&str, &str)])]) -> Self {
        assert!(!targets.is_empty(), "prometheus needs a target");
        let dir = tempfile::Builder::new()
            .prefix("testkit-prometheus-")
            .tempdir()
            .expect("a temp dir for prometheus");
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n"
        );
        for (target, labels) in targets {
            config.push_str(&format!("      - targets: ['{target}']\n"));
            if !labels.is_empty() {
                config.push_str("        labels:\n");
                for (name, value) in *labels {
                    // JSON strings are YAML strings: any value stays one scalar.
                    config.push_str(&format!("          {name}: {}\n", Value::from(*value)));
                }
            }
        }
        std::fs::write(dir.path().join("prometheus.yml"), config).expect("write prometheus.yml");
        let mut server = Self {
            port: 0,
            dir,
            child: None,
            targets: targets.len(),
        };
        let mut last = String::new();
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last = e,
            }
        }
        panic!("prometheus did not start: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let dir = self.dir.path();
        let log = std::fs::File::create(dir.join("prometheus.log")).map_err(|e| e.to_string())?;
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => panic!("{MISSING}"),
                _ => format!("spawn prometheus: {e}"),
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("prometheus exited ({status}): {}", self.log()));
            }
            if matches!(self.get("/-/ready"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("not ready within {PATIENCE:?}: {}", self.log()));
            }
            std::thread::sleep(POLL);
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn get(&self, path_and_query: &str) -> Result<(u16, String), String> {
        http_get(
            SocketAddr::from(([127, 0, 0, 1], self.port)),
            path_and_query,
            &[],
        )
        .map(|reply| (reply.status, reply.body))
    }

    /// An instant query through `/api/v1/query`: every sample of the vector it answers (a
    /// scalar answers one sample without labels). A query Prometheus refuses is an `Err`
    /// with its error.
    pub fn query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        let query = serde_urlencoded::to_string([("query", promql)]).expect("a query encodes");
        let data = &self.api(&format!("/api/v1/query?{query}"), promql)?;
        let number = |pair: &Value| -> Result<f64, String> {
            pair[1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{promql}: a sample without a value: {pair}"))
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|sample| {
                    let labels = sample["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect();
                    Ok(Sample {
                        labels,
                        value: number(&sample["value"])?,
                    })
                })
                .collect(),
            Some("scalar") => Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: number(&data["result"])?,
            }]),
            other => Err(format!("{promql}: unexpected result type {other:?}")),
        }
    }

    /// A range query through `/api/v1/query_range` from `start` to `end` every `step`: the
    /// `data` of the answer as Prometheus gave it (`resultType` `matrix`, each series with
    /// its labels and `[time, "value"]` pairs). A query Prometheus refuses is an `Err`.
    pub fn query_range(
        &self,
        promql: &str,
        start: SystemTime,
        end: SystemTime,
        step: Duration,
    ) -> Result<Value, String> {
        let seconds = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .expect("after the epoch")
                .as_secs_f64()
                .to_string()
        };
        let query = serde_urlencoded::to_string([
            ("query", promql.to_owned()),
            ("start", seconds(start)),
            ("end", seconds(end)),
            ("step", step.as_secs_f64().to_string()),
        ])
        .expect("a query encodes");
        let data = self.api(&format!("/api/v1/query_range?{query}"), promql)?;
        if data["resultType"] != "matrix" {
            return Err(format!("{promql}: not a matrix: {data}"));
        }
        Ok(data)
    }

    /// The values of label `name` on the series `selector` matches, through
    /// `/api/v1/label/<name>/values` (what Grafana's `label_values(selector, name)` asks).
    pub fn label_values(&self, name: &str, selector: &str) -> Result<Vec<String>, String> {
        let query = serde_urlencoded::to_string([("match[]", selector)]).expect("a query encodes");
        let data = self.api(&format!("/api/v1/label/{name}/values?{query}"), selector)?;
        data.as_array()
            .ok_or_else(|| format!("{selector}: not a list: {data}"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{selector}: not a string: {v}"))
            })
            .collect()
    }

    /// The `data` of a successful API answer; `what` names the request in errors.
    fn api(&self, path_and_query: &str, what: &str) -> Result<Value, String> {
        let (status, body) = self.get(path_and_query)?;
        let mut reply: Value = serde_json::from_str(&body)
            .map_err(|e| format!("{what}: HTTP {status}, not JSON ({e}): {body}"))?;
        if reply["status"] != "success" {
            return Err(format!(
                "{what}: {}: {}",
                reply["errorType"], reply["error"]
            ));
        }
        Ok(reply["data"].take())
    }

    /// The one value an instant query answers; `None` when the vector is empty. Panics when
    /// the query fails or answers more than one sample.
    pub fn value(&self, promql: &str) -> Option<f64> {
        let samples = self.query(promql).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            samples.len() <= 1,
            "{promql}: more than one sample: {samples:?}"
        );
        samples.first().map(|s| s.value)
    }

    /// Waits until a scrape of every target that started after `after` has been stored and
    /// was successful (`up == 1`): from then on instant queries see everything the targets
    /// exposed at `after`. Panics with Prometheus' log after the patience runs out.
    pub fn wait_scraped_after(&self, after: SystemTime) {
        let after = after
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after the epoch")
            .as_secs_f64();
        let deadline = Instant::now() + PATIENCE;
        // `timestamp()` of a selector is its sample's time; of an expression such as
        // `up == 1` it would be the query's, which is always "after".
        let query =
            format!("timestamp(up{{job=\"{JOB}\"}}) and on (instance) (up{{job=\"{JOB}\"}} == 1)");
        loop {
            if let Ok(samples) = self.query(&query)
                && samples.len() == self.targets
                && samples.iter().all(|s| s.value > after)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no successful scrape after {after} within {PATIENCE:?}; targets: {}; log: {}",
                self.get("/api/v1/targets")
                    .map(|(_, body)| body)
                    .unwrap_or_default(),
                self.log()
            );
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `promtool check metrics` on an exposition: `Ok` with its output when it finds nothing,
/// else `Err` with what it said.
pub fn promtool_check_metrics(exposition: &str) -> Result<String, String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => panic!("{MISSING}"),
            _ => format!("spawn promtool: {e}"),
        })?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(exposition.as_bytes())
        .map_err(|e| format!("write to promtool: {e}"))?;
    let output = child
        .wait_with_output()
        .map_err(|e| format!("promtool: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "promtool check metrics ({}): {text}",
            output.status
        ))
    }
}

/// What [`http_get`] received.
#[derive(Clone, Debug)]
pub struct HttpReply {
    pub status: u16,
    /// In order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    /// The first value of a header (`name` lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.0 GET (the server closes the connection after the answer).
pub fn http_get(
    addr: SocketAddr,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<HttpReply, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(PATIENCE))
        .map_err(|e| e.to_string())?;
    let mut request = format!("GET {path_and_query} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let raw = String::from_utf8(raw).map_err(|e| format!("{addr}: not UTF-8: {e}"))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: no end of headers in {raw:?}"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("{addr}: no status line in {head:?}"))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    Ok(HttpReply {
        status,
        headers,
        body: body.to_owned(),
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port on 127.0.0.1")
        .port()
}
