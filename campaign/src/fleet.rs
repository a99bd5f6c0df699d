//! The system under test: one real `redis-server` (testkit), the campaign's proxy in front of
//! it, the scripted upstream, and N release `tokengate` replicas (testkit's [`Tokengate`])
//! that reach Redis through the proxy. Readiness is what each says: `listening` and
//! `connected to redis` log lines, `PUBSUB NUMSUB` on Redis; never a sleep.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use testkit::{RedisServer, Reply, Tokengate};
use tokengate::proto::token_service_client::TokenServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::proxy::Proxy;
use crate::record::{Clock, replica_name};
use crate::upstream::Upstream;

/// `upstream.request_timeout` of every replica; a fleet lease lasts this plus one second.
pub const REQUEST_TIMEOUT: f64 = 2.0;
/// The lease a replica takes on a flight (tokengate: request_timeout + 1 s).
pub const LEASE: f64 = REQUEST_TIMEOUT + 1.0;
/// `cache.redis.timeout`: a slower Redis counts as down for that call.
pub const REDIS_TIMEOUT: f64 = 0.15;
/// `cache.replay_window`.
pub const REPLAY_WINDOW: f64 = 30.0;
/// `cache.refresh_ahead` and `cache.min_remaining`.
pub const REFRESH_AHEAD: f64 = 4.0;
pub const MIN_REMAINING: f64 = 2.0;
/// `server.max_concurrent_calls` / `max_queued_calls`: small, so calls queue.
pub const MAX_CONCURRENT: usize = 2;
pub const MAX_QUEUED: usize = 24;
/// The grants tokengate caches (the default `cache.grants` among those the campaign uses).
pub const CACHED_GRANTS: [&str; 2] = ["client_credentials", crate::upstream::JWT_BEARER];

const CHANNEL: &str = "tokengate:notices";
const JOINED: &str = "connected to redis";
const REJOINED: &str = "rejoined the fleet";
const PATIENCE: Duration = Duration::from_secs(30);

pub struct Fleet {
    pub clock: Clock,
    pub upstream: Upstream,
    pub proxy: Proxy,
    redis: Arc<Mutex<RedisServer>>,
    procs: tokio::sync::Mutex<Vec<Option<Tokengate>>>,
    channels: RwLock<Vec<Option<TokenServiceClient<Channel>>>>,
    /// Panic lines already reported, per replica process.
    panics_seen: Mutex<Vec<usize>>,
    binary: PathBuf,
    config: String,
    _dir: tempfile::TempDir,
}

impl Fleet {
    pub async fn start(binary: PathBuf, replicas: usize, clock: Clock) -> Self {
        let redis = tokio::task::spawn_blocking(RedisServer::start)
            .await
            .expect("start redis-server");
        let proxy = Proxy::start(redis.port()).await;
        let upstream = Upstream::start(
            clock,
            CACHED_GRANTS.iter().map(|g| (*g).to_owned()).collect(),
        )
        .await;
        let dir = tempfile::Builder::new()
            .prefix("campaign-")
            .tempdir()
            .expect("temp dir");
        let key_file = dir.path().join("cache.key");
        let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        std::fs::write(&key_file, key).expect("write the cache key");
        let config = format!(
            r#"
[server]
listen = "127.0.0.1:0"
health_listen = "127.0.0.1:0"
shutdown_grace_period = "1s"
max_concurrent_calls = {MAX_CONCURRENT}
max_queued_calls = {MAX_QUEUED}

[upstream]
base_url = "{upstream}"
allow_insecure_http = true
connect_timeout = "1s"
request_timeout = "{REQUEST_TIMEOUT}s"

[cache]
backend = "redis"
key_file = {key:?}
refresh_ahead = "{REFRESH_AHEAD}s"
min_remaining = "{MIN_REMAINING}s"
replay_window = "{REPLAY_WINDOW}s"

[cache.redis]
url = "{redis}"
timeout = "{redis_timeout}ms"
"#,
            upstream = upstream.url(),
            key = key_file.display().to_string(),
            redis = proxy.url(),
            redis_timeout = (REDIS_TIMEOUT * 1000.0) as u64,
        );
        let fleet = Self {
            clock,
            upstream,
            proxy,
            redis: Arc::new(Mutex::new(redis)),
            procs: tokio::sync::Mutex::new((0..replicas).map(|_| None).collect()),
            channels: RwLock::new(vec![None; replicas]),
            panics_seen: Mutex::new(vec![0; replicas]),
            binary,
            config,
            _dir: dir,
        };
        for index in 0..replicas {
            fleet.spawn(index).await;
        }
        fleet.wait_healthy().await;
        fleet
    }

    pub fn replicas(&self) -> usize {
        self.channels.read().map(|c| c.len()).unwrap_or(0)
    }

    /// A client for the replica's current process; none while it is down.
    pub fn client(&self, index: usize) -> Option<TokenServiceClient<Channel>> {
        self.channels
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[index]
            .clone()
    }

    async fn spawn(&self, index: usize) {
        let process = Tokengate::launch(&self.binary, self.config.clone())
            .name(replica_name(index))
            .rust_log(
                std::env::var("CAMPAIGN_RUST_LOG").unwrap_or_else(|_| "warn,tokengate=info".into()),
            )
            .start()
            .await;
        let channel = Endpoint::from_shared(process.url())
            .expect("replica url")
            .connect_lazy();
        self.channels
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[index] =
            Some(TokenServiceClient::new(channel));
        self.procs.lock().await[index] = Some(process);
        lock(&self.panics_seen)[index] = 0;
    }

    /// Every replica runs and has joined the fleet (its store reached Redis and subscribed).
    pub async fn wait_healthy(&self) {
        {
            let procs = self.procs.lock().await;
            for process in procs.iter().flatten() {
                // A replica started while Redis was away logs that it rejoined instead.
                process
                    .wait_for_event(PATIENCE, |e| {
                        testkit::message(e)
                            .is_some_and(|m| m.contains(JOINED) || m.contains(REJOINED))
                    })
                    .await;
            }
        }
        let n = self.replicas() as i64;
        let redis = self.redis.clone();
        testkit::wait::until(
            &format!("{n} subscribers on {CHANNEL}"),
            PATIENCE,
            || {
                let redis = redis.clone();
                async move {
                    let reply = tokio::task::spawn_blocking(move || {
                        lock(&redis).command(&["PUBSUB", "NUMSUB", CHANNEL])
                    })
                    .await
                    .ok();
                    matches!(reply, Some(Ok(Reply::Array(r))) if matches!(r.get(1), Some(Reply::Int(k)) if *k >= n))
                }
            },
        )
        .await;
    }

    pub async fn pause(&self, index: usize) {
        if let Some(p) = self.procs.lock().await[index].as_ref() {
            p.freeze();
        }
    }

    pub async fn resume(&self, index: usize) {
        if let Some(p) = self.procs.lock().await[index].as_ref() {
            p.thaw();
        }
    }

    pub async fn kill(&self, index: usize) {
        self.channels
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)[index] = None;
        let process = self.procs.lock().await[index].take();
        if let Some(mut process) = process {
            tokio::task::spawn_blocking(move || process.kill())
                .await
                .ok();
        }
    }

    pub async fn restart(&self, index: usize) {
        if self.procs.lock().await[index].is_none() {
            self.spawn(index).await;
        }
    }

    pub async fn redis_kill(&self) {
        let redis = self.redis.clone();
        tokio::task::spawn_blocking(move || lock(&redis).kill())
            .await
            .ok();
    }

    pub async fn redis_restart(&self) {
        let redis = self.redis.clone();
        tokio::task::spawn_blocking(move || {
            let mut redis = lock(&redis);
            if !redis.is_running() {
                redis.restart();
            }
        })
        .await
        .ok();
    }

    /// Replicas that exited without being killed by the campaign, with the end of their
    /// output (a panic message, say). Each is started again.
    pub async fn crashed(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        let mut procs = self.procs.lock().await;
        for (index, slot) in procs.iter_mut().enumerate() {
            if let Some(process) = slot
                && !process.is_running()
            {
                let stderr = process.stderr();
                let tail = stderr[stderr.len().saturating_sub(8)..].join("\n");
                out.push((index, tail));
                *slot = None;
            }
        }
        drop(procs);
        for (index, _) in &out {
            self.spawn(*index).await;
        }
        out
    }

    /// With `CAMPAIGN_DUMP=DIR`, writes each live replica's output to `DIR/replica-N.log`
    /// after every schedule, for a replay that needs the replicas' view
    /// (`CAMPAIGN_RUST_LOG` sets their filter; `warn,tokengate=info` by default).
    pub async fn dump(&self) {
        if let Ok(dir) = std::env::var("CAMPAIGN_DUMP") {
            let procs = self.procs.lock().await;
            for (index, process) in procs.iter().enumerate() {
                if let Some(process) = process {
                    let _ = std::fs::write(
                        format!("{dir}/replica-{index}.log"),
                        process
                            .stdout()
                            .into_iter()
                            .chain(process.stderr())
                            .collect::<Vec<_>>()
                            .join("\n"),
                    );
                }
            }
        }
    }

    /// Panic lines the replicas logged since the last look (a panic in a call's task leaves
    /// the process alive).
    pub async fn panics(&self) -> Vec<(usize, String)> {
        let procs = self.procs.lock().await;
        let mut seen = lock(&self.panics_seen);
        let mut out = Vec::new();
        for (index, process) in procs.iter().enumerate() {
            if let Some(process) = process {
                // The panic's location line and its message, the line after it.
                let output: Vec<String> = process
                    .stderr()
                    .into_iter()
                    .chain(process.stdout())
                    .collect();
                let lines: Vec<String> = output
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| l.contains("panicked"))
                    .map(|(i, l)| {
                        let next = output.get(i + 1).map(String::as_str).unwrap_or_default();
                        format!("{l} {next}")
                    })
                    .collect();
                for line in lines.iter().skip(seen[index]) {
                    out.push((index, line.chars().take(300).collect()));
                }
                seen[index] = lines.len();
            }
        }
        out
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
