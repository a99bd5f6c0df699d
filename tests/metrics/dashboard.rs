//! The chart's Grafana dashboard (`helm/tokengate/dashboards/tokengate.json`) against a real
//! Prometheus: two replicas ("pods") with TLS and the Redis backend, so that every family
//! exists, scraped with the `namespace` and `pod` target labels Kubernetes discovery adds.
//! After known traffic, every panel query and template variable runs through Prometheus'
//! HTTP API: it must parse, answer at least one series, filter on `$namespace` and `$pod`,
//! and name only families tokengate's own exposition declares.
//!
//! With `TOKENGATE_DASHBOARD_DUMP=<dir>`, a longer varying traffic phase runs first
//! (`TOKENGATE_DASHBOARD_SECONDS`, default 120) and every panel's range query is written to
//! `<dir>/panels.json`, which `scripts/dashboard-picture` plots.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::{client_credentials, jwt, password};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::{Value, json};
use testkit::{CountingUpstream, Prometheus, RedisServer, Tokengate, http_get, message};
use tokengate::proto::get_token_request::Grant;
use tokengate::proto::token_service_client::TokenServiceClient;
use tokengate::proto::{GetTokenRequest, RefreshTokenGrant, RevokeTokenRequest};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const DASHBOARD: &str = include_str!("../../helm/tokengate/dashboards/tokengate.json");
/// The registered client.
const APP: &str = "app";
const NAMESPACE: &str = "tokengate-test";
const PODS: [&str; 2] = ["tokengate-0", "tokengate-1"];
/// Slots and queue places per replica: small, so that a burst in the long run is shed.
const SLOTS: usize = 4;
/// What the picture's range queries put for `$__rate_interval` (Grafana would put 4 s for
/// a 1 s scrape interval; 10 s smooths the lines of a two-minute run).
const PICTURE_RATE_INTERVAL: &str = "10s";
const PICTURE_STEP: Duration = Duration::from_secs(2);
/// The `signer` client's key file, in the fleet's dir.
const SIGNING_KEY: &str = "signer.pem";
const CERTIFICATE_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

/// One replica: its process, a TLS client and its `/metrics` address.
struct Pod {
    /// Killed on drop (printing its logs if the test failed).
    _process: Tokengate,
    client: TokenServiceClient<Channel>,
    metrics: SocketAddr,
}

/// Redis, the upstream, the replicas and Prometheus scraping them.
struct Fleet {
    _redis: RedisServer,
    upstream: CountingUpstream,
    pods: Vec<Pod>,
    prometheus: Prometheus,
    /// The certificates, the cache key and the signing key.
    dir: tempfile::TempDir,
}

/// Writes `tls.crt` and `tls.key`, a `localhost` certificate from a new CA; returns the
/// CA's PEM.
fn certificates(dir: &Path) -> String {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    // cert-manager's default lifetime, so the expiry panel reads like a real one.
    params.not_after = (SystemTime::now() + CERTIFICATE_LIFETIME).into();
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    ca.pem()
}

fn config(dir: &Path, upstream: &CountingUpstream, redis: &RedisServer) -> String {
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
health_listen = "127.0.0.1:0"
max_concurrent_calls = {SLOTS}
max_queued_calls = {SLOTS}
shutdown_grace_period = "2s"

[server.tls]
cert_file = {cert:?}
key_file = {key:?}

[upstream]
base_url = "{upstream}"
allow_insecure_http = true

[clients]
allow_public = true

[[clients.registered]]
client_id = "{APP}"
client_secret = "app-secret"

[[clients.registered]]
client_id = "signer"
auth_method = "private_key_jwt"
private_key_file = {signing_key:?}

[cache]
backend = "redis"
key_file = {cache_key:?}

[cache.redis]
url = "{redis}"
timeout = "500ms"
"#,
        upstream = upstream.url(),
        redis = redis.url(),
        cache_key = dir.join("cache.key"),
        signing_key = dir.join(SIGNING_KEY),
    )
}

async fn start() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let ca = certificates(dir.path());
    std::fs::write(dir.path().join("cache.key"), [7u8; 32]).unwrap();
    replace(&dir.path().join(SIGNING_KEY), &fixture_key("rsa-a.pem"));
    let redis = tokio::task::block_in_place(RedisServer::start);
    let upstream = CountingUpstream::start(Duration::ZERO);
    let mut pods = Vec::new();
    for name in PODS {
        let process = Tokengate::launch(
            env!("CARGO_BIN_EXE_tokengate"),
            config(dir.path(), &upstream, &redis),
        )
        .name(name)
        .start()
        .await;
        let event = process
            .wait_for(|e| message(e) == Some("serving metrics"))
            .await;
        let metrics = event["fields"]["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("a metrics line without addr: {event}"));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&ca))
            .domain_name("localhost");
        let channel = Endpoint::from_shared(format!("https://{}", process.addr()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        pods.push(Pod {
            _process: process,
            client: TokenServiceClient::new(channel),
            metrics,
        });
    }
    let labels: Vec<[(&str, &str); 2]> = PODS
        .iter()
        .map(|pod| [("namespace", NAMESPACE), ("pod", *pod)])
        .collect();
    let targets: Vec<(SocketAddr, &[(&str, &str)])> = pods
        .iter()
        .zip(&labels)
        .map(|(pod, labels)| (pod.metrics, &labels[..]))
        .collect();
    let prometheus = tokio::task::block_in_place(|| Prometheus::start_labelled(&targets));
    Fleet {
        _redis: redis,
        upstream,
        pods,
        prometheus,
        dir,
    }
}

/// A signing key from `tests/fixtures/keys`.
fn fixture_key(name: &str) -> String {
    let path = format!("{}/tests/fixtures/keys/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Replaces a file at once, as a Secret's update does.
fn replace(path: &Path, text: &str) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// A refresh token the upstream never issued: it answers `400 invalid_grant`.
fn unknown_refresh() -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::RefreshToken(RefreshTokenGrant {
            refresh_token: "rt-never-issued".into(),
        })),
        client_id: APP.into(),
        ..Default::default()
    }
}

/// No grant at all: refused before any lookup.
fn no_grant() -> GetTokenRequest {
    GetTokenRequest {
        client_id: APP.into(),
        ..Default::default()
    }
}

impl Fleet {
    fn client(&self, pod: usize) -> TokenServiceClient<Channel> {
        self.pods[pod % self.pods.len()].client.clone()
    }

    async fn get(&self, pod: usize, request: GetTokenRequest) -> Result<(), tonic::Status> {
        self.client(pod).get_token(request).await.map(drop)
    }

    async fn revoke(&self, pod: usize, token: String) -> Result<(), tonic::Status> {
        self.client(pod)
            .revoke_token(RevokeTokenRequest {
                token,
                client_id: APP.into(),
                ..Default::default()
            })
            .await
            .map(drop)
    }

    /// A little of everything the panels show: misses and hits on both replicas, failures
    /// of several reasons, an upstream 400 and 429, a retried 429, a penalty on one user and
    /// a call refused under it, client credentials, and a revocation.
    async fn known_traffic(&self) {
        self.get(0, jwt(APP, "alice")).await.unwrap();
        for pod in 0..2 {
            self.get(pod, jwt(APP, "alice")).await.unwrap();
            self.get(pod, password("public-caller", "bob"))
                .await
                .unwrap();
            self.get(pod, no_grant()).await.unwrap_err();
            self.get(pod, unknown_refresh()).await.unwrap_err();
        }
        // A 429 whose Retry-After fits the call's deadline is waited out and sent again.
        self.upstream.rate_limit_next(1, Duration::from_secs(1));
        self.get(1, jwt(APP, "carol")).await.unwrap();
        // One that does not fit fails, and holds a penalty on that user that refuses the
        // next call (short, so that the long run's traffic is not held back).
        self.upstream.rate_limit_next(1, Duration::from_secs(15));
        self.get(0, jwt(APP, "mallory")).await.unwrap_err();
        self.get(0, jwt(APP, "mallory")).await.unwrap_err();
        self.get(1, client_credentials(APP)).await.unwrap();
        self.revoke(1, "rt-of-someone".into()).await.unwrap();
    }

    /// `seconds` of traffic whose mix changes over time, so the picture's lines have shape:
    /// a load that swells and ebbs over a growing set of users (misses, then hits), steady
    /// failures, a slow upstream with bursts that fill the slots and the queue and are shed,
    /// 429 penalties, retried 429s, revocations, and signing-key rotations. Outcomes are
    /// not checked here. Only calls with a user reach the upstream while the penalising
    /// 429s are answered: a 429 for a call without one holds back the whole client.
    async fn varying_traffic(&self, seconds: u64) {
        let tick = Duration::from_millis(200);
        let ticks = seconds * 5;
        let mut pace = tokio::time::interval(tick);
        let mut calls = tokio::task::JoinSet::new();
        let penalties = ticks * 55 / 100..ticks * 75 / 100;
        for n in 0..ticks {
            pace.tick().await;
            let phase = n as f64 / ticks as f64;
            let client_wide = !penalties.contains(&n);
            // Between 1 and 7 calls a tick, in a wave with a period of a third of the run.
            let load = 4.0 + 3.0 * (phase * 6.0 * std::f64::consts::PI).sin();
            let users = 10 + n / 2;
            for k in 0..load.round() as u64 {
                let i = (n * 7 + k * 13) % users;
                let request = if k % 3 == 2 {
                    password("public-caller", &format!("user-{i}"))
                } else {
                    jwt(APP, &format!("user-{i}"))
                };
                calls.spawn(call(self.client((n + k) as usize), request));
            }
            if n % 10 == 0 {
                calls.spawn(call(self.client(n as usize), no_grant()));
            }
            if n % 25 == 0 && client_wide {
                calls.spawn(call(self.client(n as usize + 1), unknown_refresh()));
            }
            if n % 50 == 25 && client_wide {
                // Refused while a short 429 holds the client back: that is fine here.
                let _ = self.revoke(n as usize, format!("rt-of-someone-{n}")).await;
            }
            // A slow upstream from a quarter to half of the run, with bursts of new users
            // that fill every slot and queue place and are shed.
            if n == ticks / 4 {
                self.upstream.set_delay(Duration::from_millis(250));
            }
            if n == ticks / 2 {
                self.upstream.set_delay(Duration::ZERO);
            }
            if (ticks / 4..ticks / 2).contains(&n) && n % 10 == 0 {
                for k in 0..4 * SLOTS as u64 {
                    calls.spawn(call(self.client(0), jwt(APP, &format!("burst-{n}-{k}"))));
                }
            }
            // From 55 % to 75 %, 429s with a Retry-After longer than a call may wait: each
            // puts a penalty on a user (the users come back, so some calls are refused).
            if penalties.contains(&n) && n % 15 == 0 {
                self.upstream.rate_limit_next(1, Duration::from_secs(20));
            }
            if n % 5 == 0 && client_wide {
                calls.spawn(call(self.client(n as usize), client_credentials(APP)));
            }
            // The signing key is rotated at 30 %, broken at 60 % and mended at 70 %.
            let signing_key = self.dir.path().join(SIGNING_KEY);
            if n == ticks * 30 / 100 {
                replace(&signing_key, &(fixture_key("rsa-b.pem") + "\n"));
            }
            if n == ticks * 60 / 100 {
                replace(&signing_key, "not a key");
            }
            if n == ticks * 70 / 100 {
                replace(&signing_key, &fixture_key("rsa-a.pem"));
            }
            // Short 429s at 85 %, waited out and retried.
            if n == ticks * 85 / 100 {
                self.upstream.rate_limit_next(3, Duration::from_secs(1));
            }
        }
        while calls.join_next().await.is_some() {}
    }

    /// Waits until two scrapes of every pod began after now: then every series the
    /// traffic made has at least two samples, so `rate()` answers it.
    fn wait_two_scrapes(&self) {
        tokio::task::block_in_place(|| {
            self.prometheus.wait_scraped_after(SystemTime::now());
            self.prometheus.wait_scraped_after(SystemTime::now());
        });
    }
}

/// One GetToken call, to spawn; its outcome is left to the panels.
async fn call(mut client: TokenServiceClient<Channel>, request: GetTokenRequest) {
    let _ = client.get_token(request).await;
}

/// The metric names a family declares in a text exposition (`# TYPE` lines): a counter's
/// with and without `_total`, a histogram's `_bucket`, `_sum` and `_count`.
fn families(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').expect("# TYPE <name> <type>");
        names.insert(name.to_owned());
        match kind {
            "counter" => {
                let base = name.strip_suffix("_total").unwrap_or(name);
                names.insert(format!("{base}_total"));
            }
            "histogram" | "summary" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {}
        }
    }
    names
}

/// Every vector selector of a PromQL expression: its metric name and its matchers (the
/// text between the braces, empty when it has none). Strings, ranges, function names,
/// keywords, numbers and the label lists of `by`, `without`, `on`, `ignoring` and
/// `group_*` are skipped. A selector without a metric name is an error.
fn selectors(expr: &str) -> Result<Vec<(String, String)>, String> {
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: [&str; 7] = ["and", "or", "unless", "bool", "offset", "inf", "nan"];
    // Aggregations may be followed by `by (…)` before their arguments.
    const AGGREGATIONS: [&str; 12] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let chars: Vec<char> = expr.chars().collect();
    // The index just past the bracket that closes the one at `open`, skipping strings.
    let close = |open: usize, closing: char| -> Result<usize, String> {
        let opening = chars[open];
        let (mut depth, mut i) = (0, open);
        while i < chars.len() {
            match chars[i] {
                '"' | '\'' | '`' => i = skip_string(&chars, i)?,
                c if c == opening => {
                    depth += 1;
                    i += 1;
                }
                c if c == closing => {
                    depth -= 1;
                    i += 1;
                    if depth == 0 {
                        return Ok(i);
                    }
                }
                _ => i += 1,
            }
        }
        Err(format!("{expr}: unclosed {opening}"))
    };
    let next_char = |mut i: usize| {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        (i, chars.get(i).copied())
    };
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "._".contains(chars[i])) {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let (after, next) = next_char(i);
            if GROUPING.contains(&word.as_str()) && next == Some('(') {
                i = close(after, ')')?;
            } else if next == Some('(')
                || GROUPING.contains(&word.as_str())
                || AGGREGATIONS.contains(&word.as_str())
                || KEYWORDS.contains(&word.to_lowercase().as_str())
            {
                // A function, or an operator: its arguments are scanned as they come.
            } else if next == Some('{') {
                let end = close(after, '}')?;
                found.push((word, chars[after + 1..end - 1].iter().collect()));
                i = end;
            } else {
                found.push((word, String::new()));
            }
        } else if c == '{' {
            return Err(format!("{expr}: a selector without a metric name"));
        } else if c == '[' {
            i = close(i, ']')?;
        } else if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i)?;
        } else {
            i += 1;
        }
    }
    Ok(found)
}

/// The index just past the string literal that starts at `open`.
fn skip_string(chars: &[char], open: usize) -> Result<usize, String> {
    let quote = chars[open];
    let mut i = open + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err(format!("an unclosed string at {open}"))
}

/// `$namespace` and `$pod` as "All" puts them, and Grafana's interval variables.
fn substitute(expr: &str, rate_interval: &str) -> String {
    expr.replace("$namespace", ".*")
        .replace("$pod", ".*")
        .replace("$__rate_interval", rate_interval)
        .replace("$__interval", "1s")
        .replace("$__range", rate_interval)
}

/// Every panel that shows data (rows only group), with its targets.
fn data_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in panels.as_array().into_iter().flatten() {
            if panel["type"] == "row" {
                walk(&panel["panels"], out);
            } else {
                out.push(panel);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The dashboard's structure: unique panel ids, a datasource and a query on every panel,
/// and the three template variables.
fn check_structure(dashboard: &Value) {
    let mut ids = BTreeSet::new();
    fn all_ids(panels: &Value, ids: &mut BTreeSet<i64>) {
        for panel in panels.as_array().into_iter().flatten() {
            let id = panel["id"]
                .as_i64()
                .unwrap_or_else(|| panic!("a panel without an id: {panel}"));
            assert!(ids.insert(id), "panel id {id} twice");
            all_ids(&panel["panels"], ids);
        }
    }
    all_ids(&dashboard["panels"], &mut ids);
    let panels = data_panels(dashboard);
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().map(Vec::as_slice);
        assert!(
            targets.is_some_and(|t| !t.is_empty()),
            "{title}: no targets"
        );
        for target in targets.unwrap_or_default() {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title}");
            assert!(
                target["expr"]
                    .as_str()
                    .is_some_and(|e| !e.trim().is_empty()),
                "{title}: a target without a query"
            );
        }
    }
    let variables: BTreeMap<&str, &Value> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| (v["name"].as_str().unwrap_or_default(), v))
        .collect();
    assert_eq!(variables["datasource"]["type"], "datasource");
    assert_eq!(variables["datasource"]["query"], "prometheus");
    for name in ["namespace", "pod"] {
        let variable = variables
            .get(name)
            .unwrap_or_else(|| panic!("no ${name} variable"));
        assert_eq!(variable["type"], "query", "${name}");
        assert_eq!(variable["datasource"]["uid"], "${datasource}", "${name}");
        // Grafana runs `query.query`; `definition` is what its editor shows.
        assert_eq!(
            variable["definition"], variable["query"]["query"],
            "${name}: the definition is not the query"
        );
    }
}

/// A query variable's `label_values(<selector>, <label>)`.
fn label_values_query(variable: &Value) -> (String, String) {
    let query = variable["query"]["query"]
        .as_str()
        .or_else(|| variable["query"].as_str())
        .unwrap_or_else(|| panic!("a variable without a query: {variable}"));
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not label_values(…): {query}"));
    let (selector, label) = inner
        .rsplit_once(',')
        .unwrap_or_else(|| panic!("label_values without a label: {query}"));
    (selector.trim().to_owned(), label.trim().to_owned())
}

/// Runs every template variable and panel query, and checks what each names; panics
/// listing every one that failed.
fn check_queries(fleet: &Fleet, dashboard: &Value, families: &BTreeSet<String>, window: &str) {
    let prometheus = &fleet.prometheus;
    let mut failures = Vec::new();
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] != "query" {
            continue;
        }
        let (selector, label) = label_values_query(variable);
        let name = variable["name"].as_str().unwrap_or_default();
        if label != name {
            failures.push(format!("variable {name} lists the values of {label}"));
        }
        for (metric, matchers) in selectors(&selector).unwrap_or_else(|e| panic!("{e}")) {
            if !families.contains(&metric) {
                failures.push(format!("variable {label}: {metric} is not exported"));
            }
            // The pods offered are those of the namespaces chosen.
            let filter = r#"namespace=~"$namespace""#;
            if name == "pod" && !matchers.split(',').any(|m| m.trim() == filter) {
                failures.push(format!("variable pod: {metric} lacks {filter}"));
            }
        }
        let expected: Vec<String> = match label.as_str() {
            "namespace" => vec![NAMESPACE.to_owned()],
            "pod" => PODS.iter().map(|p| (*p).to_owned()).collect(),
            other => panic!("a variable on an unexpected label {other}"),
        };
        match tokio::task::block_in_place(|| {
            prometheus.label_values(&label, &substitute(&selector, window))
        }) {
            Ok(values) if values == expected => {}
            Ok(values) => failures.push(format!("variable {label}: {values:?}")),
            Err(e) => failures.push(format!("variable {label}: {e}")),
        }
    }
    for panel in data_panels(dashboard) {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let found = selectors(expr).unwrap_or_else(|e| panic!("{title}: {e}"));
            if found.is_empty() {
                failures.push(format!("{title}: no metric in {expr}"));
            }
            for (name, matchers) in found {
                if !families.contains(&name) {
                    failures.push(format!("{title}: {name} is not exported ({expr})"));
                }
                for filter in [r#"namespace=~"$namespace""#, r#"pod=~"$pod""#] {
                    if !matchers.split(',').any(|m| m.trim() == filter) {
                        failures.push(format!("{title}: {name} lacks {filter} ({expr})"));
                    }
                }
            }
            let promql = substitute(expr, window);
            match tokio::task::block_in_place(|| prometheus.query(&promql)) {
                Ok(samples) if samples.is_empty() => {
                    failures.push(format!("{title}: no series for {promql}"));
                }
                Ok(_) => {}
                Err(e) => failures.push(format!("{title}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every panel's range query over the run, for `scripts/dashboard-picture`.
fn dump(fleet: &Fleet, dashboard: &Value, dir: &Path, start: SystemTime, end: SystemTime) {
    let mut panels = Vec::new();
    for panel in data_panels(dashboard) {
        let mut targets = Vec::new();
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let promql = substitute(expr, PICTURE_RATE_INTERVAL);
            let data = tokio::task::block_in_place(|| {
                fleet
                    .prometheus
                    .query_range(&promql, start, end, PICTURE_STEP)
            })
            .unwrap_or_else(|e| panic!("{e}"));
            targets.push(json!({
                "expr": promql,
                "legend": target["legendFormat"],
                "result": data["result"],
            }));
        }
        panels.push(json!({
            "title": panel["title"],
            "unit": panel["fieldConfig"]["defaults"]["unit"],
            "min": panel["fieldConfig"]["defaults"]["min"],
            "max": panel["fieldConfig"]["defaults"]["max"],
            "gridPos": panel["gridPos"],
            "targets": targets,
        }));
    }
    let seconds = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let out = json!({
        "title": dashboard["title"],
        "start": seconds(start),
        "end": seconds(end),
        "rate_interval": PICTURE_RATE_INTERVAL,
        "panels": panels,
    });
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("panels.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_runs_against_prometheus() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    check_structure(&dashboard);

    let fleet = start().await;
    let start = SystemTime::now();
    fleet.known_traffic().await;
    let dump_dir = std::env::var_os("TOKENGATE_DASHBOARD_DUMP");
    if dump_dir.is_some() {
        let seconds = std::env::var("TOKENGATE_DASHBOARD_SECONDS")
            .map(|s| {
                s.parse()
                    .expect("TOKENGATE_DASHBOARD_SECONDS is whole seconds")
            })
            .unwrap_or(120);
        fleet.varying_traffic(seconds).await;
    }
    fleet.wait_two_scrapes();

    let exposition = http_get(fleet.pods[0].metrics, "/metrics", &[]).unwrap();
    assert_eq!(exposition.status, 200);
    let families = families(&exposition.body);
    assert!(
        families.contains("tokengate_build_info") && families.contains("grpc_server_handled_total"),
        "{families:?}"
    );
    // Every rate covers the whole run.
    let window = format!(
        "{}s",
        start.elapsed().expect("the clock moved forward").as_secs() + 5
    );
    check_queries(&fleet, &dashboard, &families, &window);

    if let Some(dir) = dump_dir {
        dump(
            &fleet,
            &dashboard,
            Path::new(&dir),
            start,
            SystemTime::now(),
        );
    }
}

#[test]
fn selectors_finds_metric_names_and_skips_the_rest() {
    let found = selectors(
        r#"histogram_quantile(0.99, sum by (le, grpc_method) (rate(a_bucket{x="}", y=~"$pod"}[5m]))) / on (pod) group_left b - time() > bool 1e3 or c offset 5m"#,
    )
    .unwrap();
    assert_eq!(
        found,
        vec![
            ("a_bucket".to_owned(), r#"x="}", y=~"$pod""#.to_owned()),
            ("b".to_owned(), String::new()),
            ("c".to_owned(), String::new()),
        ]
    );
    assert!(selectors(r#"{__name__="x"}"#).is_err());
    assert!(selectors("sum(x{a=\"b\"").is_err());
}

#[test]
fn families_come_from_type_lines() {
    let found = families(
        "# HELP a_total A.\n# TYPE a_total counter\na_total 1\n# TYPE b counter\n\
         # TYPE h histogram\n# TYPE g gauge\ng 1\nnot_declared 2\n",
    );
    let expected: BTreeSet<String> = [
        "a_total", "b", "b_total", "h", "h_bucket", "h_sum", "h_count", "g",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(found, expected);
}
