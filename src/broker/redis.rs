//! The Redis side of the broker (contract §8): the state a fleet shares (sealed entries with a
//! version, leases, a token index, 429 penalties) and the pub/sub channel that keeps every
//! replica's local layer honest.
//!
//! Redis is shared state, never a source of failure: every call is bounded by
//! `cache.redis.timeout`, and anything else (unreachable, slow, an error, a wrong password)
//! is [`Down`] for that call. The replica then goes on alone and a background task brings it
//! back. Nothing stored is readable without the cache key: keys hold HMAC digests, values
//! are sealed.
//!
//! Layout, under `key_prefix` (the braces are a Redis Cluster hash tag, so one identity's
//! keys share a slot and the version-checked write can be one script):
//! `{id}:e` entry, `{id}:v` version, `{id}:l` lease, `t:<token digest>` → id hex,
//! `p:<penalty key>` sealed end of a penalty, and the channel `notices`.

use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    Client, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisError, RedisFuture,
    RedisResult, Script, TlsCertificates, Value,
};
use secrecy::ExposeSecret as _;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;
use tokio_stream::StreamExt as _;

use crate::config::RedisConfig;
use crate::keys::{Digest, Keys, Purpose};

/// Something another replica told the fleet, received over pub/sub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Drop the local copy of this identity's entry (it was renewed, rejected or revoked).
    Invalidate(Digest),
    /// A 429 penalty: `key` is the digest naming the client (and user); `until_unix_ms` is
    /// when it ends.
    Penalty { key: Digest, until_unix_ms: u64 },
    /// The pub/sub connection was lost and is back: invalidations may have been missed, so
    /// clear the whole local layer. Sent before the penalties found on that rejoin.
    Resync,
}

/// Redis unreachable, too slow (`cache.redis.timeout`), or answering errors, for this call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Down;

/// Proof of holding a fleet-wide lease: a random owner token, so that a holder whose lease
/// expired cannot release the next holder's.
#[derive(Debug)]
pub struct Lease {
    owner: String,
}

/// A handle on the fleet's shared state; cheap to clone. The background tasks (health check,
/// pub/sub) stop when the last handle is dropped.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

/// How long a background probe (health check, the penalty scan, a pub/sub (re)connection)
/// may take at least: those are not callers' time, and a TLS handshake to a remote Redis
/// can take longer than a call's budget.
const PROBE_FLOOR: Duration = Duration::from_secs(1);
/// How often the health check runs.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// Failed health checks in a row after which the connection is rebuilt from scratch, and how
/// often at most: the crate reconnects on I/O errors only, and a connection that keeps failing
/// otherwise (say `LOADING` after a restart) must not stay broken.
const REBUILD_AFTER: u32 = 4;
const REBUILD_EVERY: Duration = Duration::from_secs(5);
/// Pub/sub reconnection backoff, and how often a quiet subscription is pinged.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const PUBSUB_PING_EVERY: Duration = Duration::from_secs(5);
/// At most one "still unreachable" line per this while down.
const REMIND_EVERY: Duration = Duration::from_secs(60);

/// `put`: writes entry and version only if the version is still the expected one. An absent
/// entry has version 0 whatever the version key says, as [`RedisStore::get`] reports it.
const PUT_SCRIPT: &str = r"
local current = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  current = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
end
if current ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], string.format('%d', current + 1), 'PX', ARGV[3])
return 1
";

/// `release`: deletes the lease only if it still holds this owner's token.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

struct Inner {
    /// Replaced by the health check when it keeps failing; cloned out for each call.
    conn: RwLock<Conn>,
    factory: Factory,
    timeout: Duration,
    probe: Duration,
    names: Names,
    keys: Arc<Keys>,
    health: Health,
    put: Script,
    release: Script,
    /// Dropped with the last handle: the background tasks see it and stop.
    _shutdown: watch::Sender<()>,
}

impl RedisStore {
    /// Starts connecting in the background and returns at once: tokengate must start (and
    /// serve, alone) while Redis is down. Notices from other replicas (and its own) are sent
    /// on `notices`. After every (re)subscription it sends [`Notice::Resync`] (except the
    /// first time) and then a [`Notice::Penalty`] for every penalty in force in Redis, so a
    /// replica that (re)joins learns them.
    ///
    /// Must be called within a Tokio runtime. `Err` only for a malformed `url` or an
    /// unreadable `ca_file`.
    pub fn start(
        config: &RedisConfig,
        keys: Arc<Keys>,
        notices: UnboundedSender<Notice>,
    ) -> Result<Self, String> {
        let timeout = config.timeout;
        let probe = timeout.max(PROBE_FLOOR);
        let factory = Factory::new(config, probe)?;
        let (shutdown, watch) = watch::channel(());
        let inner = Arc::new(Inner {
            conn: RwLock::new(factory.connect()),
            factory,
            timeout,
            probe,
            names: Names {
                prefix: config.key_prefix.clone(),
                channel: format!("{}notices", config.key_prefix),
            },
            keys,
            health: Health::default(),
            put: Script::new(PUT_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            _shutdown: shutdown,
        });
        tokio::spawn(check_health(Arc::downgrade(&inner), watch.clone()));
        tokio::spawn(listen(Arc::downgrade(&inner), watch, notices));
        Ok(Self { inner })
    }

    /// Whether the last call (or the background health check) reached Redis.
    pub fn is_up(&self) -> bool {
        self.inner.health.is_up()
    }

    /// The sealed entry bytes stored under `id`, with their version (see [`RedisStore::put`]).
    pub async fn get(&self, id: &Digest) -> Result<Option<(u64, Vec<u8>)>, Down> {
        let names = &self.inner.names;
        let mut cmd = redis::cmd("MGET");
        cmd.arg(names.entry(id)).arg(names.version(id));
        let (entry, version): (Option<Vec<u8>>, Option<u64>) = self.inner.query(cmd).await?;
        Ok(entry.map(|sealed| (version.unwrap_or(0), sealed)))
    }

    /// Version-checked write: stores `sealed` under `id` for `ttl` with version
    /// `expected + 1`, only if the current version is `expected` (absent counts as 0).
    /// `Ok(false)` when another writer came first. When written, also indexes each digest in
    /// `tokens` to `id` for the same `ttl`.
    pub async fn put(
        &self,
        id: &Digest,
        expected: u64,
        sealed: &[u8],
        ttl: Duration,
        tokens: &[Digest],
    ) -> Result<bool, Down> {
        let inner = &self.inner;
        let ttl_ms = millis(ttl);
        inner
            .run(inner.timeout, |mut conn| async move {
                let written: i64 = inner
                    .put
                    .key(inner.names.entry(id))
                    .key(inner.names.version(id))
                    .arg(expected)
                    .arg(sealed)
                    .arg(ttl_ms)
                    .invoke_async(&mut conn)
                    .await?;
                if written != 1 {
                    return Ok(false);
                }
                let id_hex = id.hex();
                for token in tokens {
                    let mut set = redis::cmd("SET");
                    set.arg(inner.names.token(token))
                        .arg(&id_hex)
                        .arg("PX")
                        .arg(ttl_ms);
                    set.query_async::<()>(&mut conn).await?;
                }
                Ok(true)
            })
            .await
    }

    /// Deletes the entry (and its version) under `id`, and publishes [`Notice::Invalidate`].
    pub async fn delete(&self, id: &Digest) -> Result<(), Down> {
        let inner = &self.inner;
        inner
            .run(inner.timeout, |mut conn| async move {
                let mut del = redis::cmd("DEL");
                del.arg(inner.names.entry(id)).arg(inner.names.version(id));
                del.query_async::<()>(&mut conn).await?;
                inner
                    .publish_cmd(&encode_invalidate(id))
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
    }

    /// The identity whose entry holds this token digest, if any (via the index). The entry
    /// may have been renewed since: the caller checks what it finds.
    pub async fn find_token(&self, token: &Digest) -> Result<Option<Digest>, Down> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.inner.names.token(token));
        let hex: Option<String> = self.inner.query(cmd).await?;
        Ok(hex.as_deref().and_then(Digest::from_hex))
    }

    /// `SET NX PX`: `Some` when this replica now holds the lease on `id` for `ttl`.
    pub async fn lease(&self, id: &Digest, ttl: Duration) -> Result<Option<Lease>, Down> {
        let owner = format!("{:032x}", fastrand::u128(..));
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.inner.names.lease(id))
            .arg(&owner)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl));
        let taken: Option<String> = self.inner.query(cmd).await?;
        Ok(taken.map(|_| Lease { owner }))
    }

    /// Releases the lease on `id` only if it is still this one's (compare-and-delete): after
    /// an expiry another replica may hold it.
    pub async fn release(&self, id: &Digest, lease: Lease) -> Result<(), Down> {
        let inner = &self.inner;
        inner
            .run(inner.timeout, |mut conn| async move {
                inner
                    .release
                    .key(inner.names.lease(id))
                    .arg(&lease.owner)
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map(drop)
            })
            .await
    }

    /// Whether anyone holds the lease on `id` now.
    pub async fn leased(&self, id: &Digest) -> Result<bool, Down> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(self.inner.names.lease(id));
        let n: i64 = self.inner.query(cmd).await?;
        Ok(n > 0)
    }

    /// Who holds the lease on `id` now (its random owner token), if anyone: a waiter can
    /// tell a holder that is stuck from a new holder that just took over.
    pub async fn lease_holder(&self, id: &Digest) -> Result<Option<String>, Down> {
        let mut cmd = redis::cmd("GET");
        cmd.arg(self.inner.names.lease(id));
        self.inner.query(cmd).await
    }

    /// Publishes an invalidation to every replica (including this one).
    pub async fn invalidate(&self, id: &Digest) -> Result<(), Down> {
        let cmd = self.inner.publish_cmd(&encode_invalidate(id));
        self.inner.query::<()>(cmd).await
    }

    /// Stores a penalty until `until_unix_ms` (sealed, expiring then) and publishes
    /// [`Notice::Penalty`]. A penalty already over is not stored.
    pub async fn penalise(&self, key: &Digest, until_unix_ms: u64) -> Result<(), Down> {
        let left = until_unix_ms.saturating_sub(now_unix_ms());
        if left == 0 {
            return Ok(());
        }
        let inner = &self.inner;
        let sealed = inner
            .keys
            .seal(Purpose::Penalty, key, &until_unix_ms.to_be_bytes());
        let message = encode_penalty(key, &sealed);
        inner
            .run(inner.timeout, |mut conn| async move {
                let mut set = redis::cmd("SET");
                set.arg(inner.names.penalty(key))
                    .arg(&sealed)
                    .arg("PX")
                    .arg(left);
                set.query_async::<()>(&mut conn).await?;
                inner
                    .publish_cmd(&message)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
    }
}

impl Inner {
    /// Runs one operation on the current connection within `limit`; any failure is [`Down`]
    /// and marks Redis down, any success marks it up.
    async fn run<T, F, Fut>(&self, limit: Duration, op: F) -> Result<T, Down>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = self.conn.read().unwrap_or_else(|e| e.into_inner()).clone();
        match tokio::time::timeout(limit, op(conn)).await {
            Ok(Ok(value)) => {
                self.health.mark(true);
                Ok(value)
            }
            Ok(Err(error)) => {
                // The kind only: a server's message could quote what was sent.
                tracing::debug!(kind = ?error.kind(), "a redis call failed");
                self.health.mark(false);
                Err(Down)
            }
            Err(_) => {
                tracing::debug!(timeout = ?limit, "a redis call timed out");
                self.health.mark(false);
                Err(Down)
            }
        }
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: Cmd) -> Result<T, Down> {
        self.run(self.timeout, |mut conn| async move {
            cmd.query_async(&mut conn).await
        })
        .await
    }

    fn publish_cmd(&self, message: &str) -> Cmd {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.names.channel).arg(message);
        cmd
    }

    /// Every penalty stored and still in force, opened; values that do not open are skipped.
    async fn penalties(&self) -> Result<Vec<(Digest, u64)>, Down> {
        let pattern = format!("{}*", glob_escape(&self.names.penalty_prefix()));
        let names = self
            .run(self.probe, |conn| async move { conn.scan(&pattern).await })
            .await?;
        let now = now_unix_ms();
        let mut found = Vec::new();
        for name in names {
            let Some(key) = name
                .strip_prefix(&self.names.penalty_prefix())
                .and_then(Digest::from_hex)
            else {
                continue;
            };
            let mut get = redis::cmd("GET");
            get.arg(&name);
            let sealed: Option<Vec<u8>> = self
                .run(self.probe, |mut conn| async move {
                    get.query_async(&mut conn).await
                })
                .await?;
            // Gone since the scan: it just ended.
            let Some(sealed) = sealed else { continue };
            match open_penalty(&self.keys, &key, &sealed) {
                Some(until) if until > now => found.push((key, until)),
                Some(_) => {}
                None => tracing::debug!(key = ?key, "a penalty in redis does not open; ignored"),
            }
        }
        Ok(found)
    }
}

/// The store's key names (contract §8), built from `key_prefix`.
struct Names {
    prefix: String,
    channel: String,
}

impl Names {
    fn entry(&self, id: &Digest) -> String {
        format!("{}{{{}}}:e", self.prefix, id.hex())
    }

    fn version(&self, id: &Digest) -> String {
        format!("{}{{{}}}:v", self.prefix, id.hex())
    }

    fn lease(&self, id: &Digest) -> String {
        format!("{}{{{}}}:l", self.prefix, id.hex())
    }

    fn token(&self, token: &Digest) -> String {
        format!("{}t:{}", self.prefix, token.hex())
    }

    fn penalty_prefix(&self) -> String {
        format!("{}p:", self.prefix)
    }

    fn penalty(&self, key: &Digest) -> String {
        format!("{}{}", self.penalty_prefix(), key.hex())
    }
}

/// The two kinds of connection, behind the crate's [`ConnectionLike`] so that commands and
/// scripts run on either.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    /// Every key matching `pattern`, with `SCAN` (never `KEYS`): on a cluster, on each primary.
    async fn scan(self, pattern: &str) -> RedisResult<Vec<String>> {
        let mut found = Vec::new();
        match self {
            Self::Single(mut conn) => {
                let mut cursor = 0;
                loop {
                    let reply = scan_step(cursor, pattern).query_async(&mut conn).await?;
                    cursor = take_keys(reply, &mut found)?;
                    if cursor == 0 {
                        break;
                    }
                }
            }
            Self::Cluster(mut conn) => {
                let slots = conn
                    .route_command(
                        redis::cmd("CLUSTER").arg("SLOTS").clone(),
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    )
                    .await?;
                for (host, port) in primaries(&slots) {
                    let at =
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                    let mut cursor = 0;
                    loop {
                        let reply = conn
                            .route_command(scan_step(cursor, pattern), at.clone())
                            .await?;
                        cursor = take_keys(reply, &mut found)?;
                        if cursor == 0 {
                            break;
                        }
                    }
                }
            }
        }
        Ok(found)
    }
}

fn scan_step(cursor: u64, pattern: &str) -> Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1000);
    cmd
}

/// Adds one `SCAN` reply's keys to `found`; the next cursor (0: done).
fn take_keys(reply: Value, found: &mut Vec<String>) -> RedisResult<u64> {
    let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply)?;
    found.extend(keys);
    Ok(next)
}

/// The primaries' addresses in a `CLUSTER SLOTS` reply (the first node of each range).
fn primaries(slots: &Value) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    let Value::Array(ranges) = slots else {
        return out;
    };
    for range in ranges {
        let Value::Array(range) = range else { continue };
        let Some(Value::Array(node)) = range.get(2) else {
            continue;
        };
        let host = match node.first() {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = node.get(1) else {
            continue;
        };
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        if !host.is_empty() && host != "?" && !out.contains(&(host.clone(), port)) {
            out.push((host, port));
        }
    }
    out
}

/// How to make a connection: kept so the health check can start over.
enum Factory {
    Single {
        client: Client,
        config: ConnectionManagerConfig,
    },
    Cluster {
        client: Box<ClusterClient>,
        config: ClusterConfig,
        /// Pub/sub goes to the first node: `PUBLISH` reaches every node of a cluster.
        pubsub: Client,
    },
}

impl Factory {
    fn new(config: &RedisConfig, probe: Duration) -> Result<Self, String> {
        let ca = match &config.ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                format!("cache.redis.ca_file: cannot read {}: {e}", path.display())
            })?),
            None => None,
        };
        let password = config
            .password
            .as_ref()
            .map(|p| p.expose_secret().to_owned());
        let urls: Vec<&str> = config
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let infos = urls
            .iter()
            .map(|url| {
                let info = url
                    .into_connection_info()
                    .map_err(|e| format!("cache.redis.url: {e}"))?;
                Ok(match &password {
                    Some(password) => {
                        let redis = info.redis_settings().clone().set_password(password);
                        info.set_redis_settings(redis)
                    }
                    None => info,
                })
            })
            .collect::<Result<Vec<ConnectionInfo>, String>>()?;
        let Some(first) = infos.first().cloned() else {
            return Err("cache.redis.url is empty".into());
        };
        let client = |info: ConnectionInfo| -> Result<Client, String> {
            let tls = matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. });
            if tls {
                Client::build_with_tls(info, certificates(ca.as_deref()))
            } else {
                Client::open(info)
            }
            .map_err(|e| format!("cache.redis.url: {e}"))
        };
        if infos.len() == 1 {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(probe))
                .set_response_timeout(Some(probe))
                .set_number_of_retries(2)
                .set_min_delay(BACKOFF_MIN)
                .set_max_delay(BACKOFF_MAX);
            return Ok(Self::Single {
                client: client(first)?,
                config,
            });
        }
        let tls = matches!(first.addr(), redis::ConnectionAddr::TcpTls { .. });
        let mut builder = ClusterClientBuilder::new(infos).retries(2);
        if let Some(password) = &password {
            builder = builder.password(password);
        }
        if tls {
            builder = builder.certs(certificates(ca.as_deref()));
        }
        let cluster = builder
            .build()
            .map_err(|e| format!("cache.redis.url: {e}"))?;
        Ok(Self::Cluster {
            client: Box::new(cluster),
            config: ClusterConfig::new()
                .set_connection_timeout(probe)
                .set_response_timeout(probe),
            pubsub: client(first)?,
        })
    }

    /// A connection that connects lazily, in the background: never blocks, never fails.
    fn connect(&self) -> Conn {
        match self {
            Self::Single { client, config } => Conn::Single(
                ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
                    .expect("no push sender is configured, so the lazy manager cannot fail"),
            ),
            Self::Cluster { client, config, .. } => {
                Conn::Cluster(client.get_pending_async_connection_with_config(config.clone()))
            }
        }
    }

    fn pubsub_client(&self) -> &Client {
        match self {
            Self::Single { client, .. } => client,
            Self::Cluster { pubsub, .. } => pubsub,
        }
    }
}

/// The trust roots for `rediss://`: the built-in webpki roots, as for the upstream, plus
/// `ca_file` when set. Given explicitly because the crate would otherwise read the system's
/// store, which differs per image (and the crate's `root_cert` replaces, never adds).
fn certificates(ca: Option<&[u8]>) -> TlsCertificates {
    let mut pem = webpki_roots_pem().into_bytes();
    if let Some(ca) = ca {
        pem.push(b'\n');
        pem.extend_from_slice(ca);
    }
    TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }
}

fn webpki_roots_pem() -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// Up/down as callers see it, and the log lines an operator sees: one warning when Redis is
/// lost, at most one reminder a minute while it stays lost, one line when it is back.
#[derive(Default)]
struct Health {
    /// [`UNKNOWN`], [`UP`] or [`DOWN`]; read on every call without taking the lock.
    state: AtomicU8,
    log: Mutex<HealthLog>,
}

const UNKNOWN: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

#[derive(Default)]
struct HealthLog {
    /// When the last warning (or reminder) was logged.
    warned_at: Option<Instant>,
    /// Whether this outage was announced, so its end is too. A blip within a minute of the
    /// last warning is neither.
    announced: bool,
}

/// What a health transition logs.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Joined,
    Lost,
    StillLost,
    Rejoined,
}

impl Health {
    fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    fn mark(&self, up: bool) {
        let target = if up { UP } else { DOWN };
        if self.state.load(Ordering::Relaxed) == target {
            return;
        }
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let previous = self.state.swap(target, Ordering::Relaxed);
        if let Some(line) = log.transition(previous, target, Instant::now()) {
            line.emit();
        }
    }

    /// Called by the health check while Redis stays down.
    fn remind(&self) {
        if self.state.load(Ordering::Relaxed) != DOWN {
            return;
        }
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(line) = log.remind(Instant::now()) {
            line.emit();
        }
    }
}

impl HealthLog {
    fn transition(&mut self, from: u8, to: u8, now: Instant) -> Option<Line> {
        match (from, to) {
            (UNKNOWN, UP) => Some(Line::Joined),
            (DOWN, UP) => std::mem::take(&mut self.announced).then_some(Line::Rejoined),
            (UNKNOWN | UP, DOWN) => {
                let quiet = self
                    .warned_at
                    .is_some_and(|at| now.duration_since(at) < REMIND_EVERY);
                self.announced = !quiet;
                if quiet {
                    return None;
                }
                self.warned_at = Some(now);
                Some(Line::Lost)
            }
            _ => None,
        }
    }

    fn remind(&mut self, now: Instant) -> Option<Line> {
        if self
            .warned_at
            .is_some_and(|at| now.duration_since(at) < REMIND_EVERY)
        {
            return None;
        }
        self.warned_at = Some(now);
        self.announced = true;
        Some(Line::StillLost)
    }
}

impl Line {
    fn emit(&self) {
        match self {
            Self::Joined => {
                tracing::info!("connected to redis; this replica shares the fleet's state")
            }
            Self::Lost => tracing::warn!("redis is unreachable; this replica goes on alone"),
            Self::StillLost => {
                tracing::warn!("redis is still unreachable; this replica goes on alone")
            }
            Self::Rejoined => {
                tracing::info!("redis answers again; this replica rejoined the fleet")
            }
        }
    }
}

/// Pings Redis so that `is_up` and the log follow it even with no traffic, reminds while it
/// is down, and rebuilds a connection that keeps failing.
async fn check_health(inner: Weak<Inner>, mut shutdown: watch::Receiver<()>) {
    let mut failures = 0u32;
    let mut rebuilt = Instant::now();
    loop {
        {
            let Some(inner) = inner.upgrade() else { return };
            let ping = redis::cmd("PING");
            // Beyond the crate's own response timeout, so that a connection that stopped
            // answering fails inside the crate, which then reconnects.
            let ok = inner
                .run(inner.probe * 3 / 2, |mut conn| async move {
                    ping.query_async::<()>(&mut conn).await
                })
                .await
                .is_ok();
            if ok {
                failures = 0;
            } else {
                failures += 1;
                inner.health.remind();
                if failures >= REBUILD_AFTER && rebuilt.elapsed() >= REBUILD_EVERY {
                    tracing::debug!("rebuilding the redis connection");
                    let fresh = inner.factory.connect();
                    *inner.conn.write().unwrap_or_else(|e| e.into_inner()) = fresh;
                    rebuilt = Instant::now();
                }
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            () = tokio::time::sleep(HEALTH_EVERY) => {}
        }
    }
}

/// The pub/sub side: subscribes, forwards notices, and on any loss reconnects with backoff,
/// for as long as the store lives.
async fn listen(
    inner: Weak<Inner>,
    mut shutdown: watch::Receiver<()>,
    notices: UnboundedSender<Notice>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut joined_before = false;
    loop {
        let (client, channel, probe, keys) = {
            let Some(inner) = inner.upgrade() else { return };
            (
                inner.factory.pubsub_client().clone(),
                inner.names.channel.clone(),
                inner.probe,
                inner.keys.clone(),
            )
        };
        let subscribe = async {
            let (mut sink, stream) = client.get_async_pubsub().await?.split();
            sink.subscribe(&channel).await?;
            Ok::<_, RedisError>((sink, stream))
        };
        let subscribed = tokio::select! {
            _ = shutdown.changed() => return,
            r = tokio::time::timeout(probe, subscribe) => r,
        };
        let (mut sink, mut stream) = match subscribed {
            Ok(Ok(pair)) => pair,
            Ok(Err(error)) => {
                tracing::debug!(kind = ?error.kind(), "redis pub/sub: cannot subscribe");
                if !sleep_or_stop(&mut shutdown, &mut backoff).await {
                    return;
                }
                continue;
            }
            Err(_) => {
                tracing::debug!("redis pub/sub: subscribing timed out");
                if !sleep_or_stop(&mut shutdown, &mut backoff).await {
                    return;
                }
                continue;
            }
        };
        if std::mem::replace(&mut joined_before, true) {
            let _ = notices.send(Notice::Resync);
        }
        // Penalties set before this subscription: the scan runs after subscribing, so one
        // set meanwhile arrives by one way or the other.
        let penalties = {
            let Some(inner) = inner.upgrade() else { return };
            inner.penalties().await
        };
        match penalties {
            Ok(found) => {
                for (key, until_unix_ms) in found {
                    let _ = notices.send(Notice::Penalty { key, until_unix_ms });
                }
            }
            Err(Down) => {
                // Start over: the next subscription scans again.
                if !sleep_or_stop(&mut shutdown, &mut backoff).await {
                    return;
                }
                continue;
            }
        }
        backoff = BACKOFF_MIN;
        let mut ping = tokio::time::interval(PUBSUB_PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                message = stream.next() => {
                    let Some(message) = message else { break };
                    if let Some(notice) = decode(&keys, message.get_payload_bytes()) {
                        let _ = notices.send(notice);
                    } else {
                        tracing::debug!("redis pub/sub: ignored a malformed notice");
                    }
                }
                _ = ping.tick() => {
                    let alive = tokio::time::timeout(probe, sink.ping::<Value>()).await;
                    if !matches!(alive, Ok(Ok(_))) {
                        break;
                    }
                }
            }
        }
        tracing::debug!("redis pub/sub: connection lost; reconnecting");
        if !sleep_or_stop(&mut shutdown, &mut backoff).await {
            return;
        }
    }
}

/// Waits out the backoff (then doubles it); `false` when the store was dropped meanwhile.
async fn sleep_or_stop(shutdown: &mut watch::Receiver<()>, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = shutdown.changed() => false,
        () = tokio::time::sleep(wait) => true,
    }
}

/// `i:<id hex>`.
fn encode_invalidate(id: &Digest) -> String {
    format!("i:{}", id.hex())
}

/// `p:<key hex>:<sealed end, hex>`: sealed like the stored value, so a forged notice is
/// ignored like a forged value.
fn encode_penalty(key: &Digest, sealed: &[u8]) -> String {
    let mut out = format!("p:{}:", key.hex());
    for b in sealed {
        use std::fmt::Write as _;
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A notice from the channel; `None` for anything malformed or that does not open.
fn decode(keys: &Keys, payload: &[u8]) -> Option<Notice> {
    let text = std::str::from_utf8(payload).ok()?;
    if let Some(hex) = text.strip_prefix("i:") {
        return Digest::from_hex(hex).map(Notice::Invalidate);
    }
    let (key, sealed) = text.strip_prefix("p:")?.split_once(':')?;
    let key = Digest::from_hex(key)?;
    let sealed = from_hex(sealed)?;
    let until_unix_ms = open_penalty(keys, &key, &sealed)?;
    Some(Notice::Penalty { key, until_unix_ms })
}

fn open_penalty(keys: &Keys, key: &Digest, sealed: &[u8]) -> Option<u64> {
    let plain = keys.open(Purpose::Penalty, key, sealed).ok()?;
    Some(u64::from_be_bytes(plain.try_into().ok()?))
}

fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// `SCAN MATCH` treats these as pattern syntax; a prefix holding them must match literally.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A TTL in whole milliseconds, at least one (`PX 0` is an error).
fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheKey;

    fn keys(byte: u8) -> Keys {
        Keys::new(Some(&CacheKey::new(vec![byte; 32])))
    }

    #[test]
    fn notices_round_trip_and_forgeries_are_ignored() {
        let keys = keys(1);
        let id = keys.digest([b"id".as_slice()]);
        assert_eq!(
            decode(&keys, encode_invalidate(&id).as_bytes()),
            Some(Notice::Invalidate(id))
        );
        let sealed = keys.seal(Purpose::Penalty, &id, &42u64.to_be_bytes());
        assert_eq!(
            decode(&keys, encode_penalty(&id, &sealed).as_bytes()),
            Some(Notice::Penalty {
                key: id,
                until_unix_ms: 42
            })
        );
        let other = self::keys(2).seal(Purpose::Penalty, &id, &42u64.to_be_bytes());
        let entry = keys.seal(Purpose::Entry, &id, &42u64.to_be_bytes());
        for forged in [
            encode_penalty(&id, &other),
            encode_penalty(&id, &entry),
            format!("p:{}:42", id.hex()),
            format!("p:{}", id.hex()),
            "i:zz".to_owned(),
            format!("i:{}x", id.hex()),
            "x:1".to_owned(),
            String::new(),
        ] {
            assert_eq!(decode(&keys, forged.as_bytes()), None, "{forged}");
        }
        assert_eq!(decode(&keys, b"\xff\xfe"), None);
    }

    #[test]
    fn key_names_use_a_hash_tag_per_identity() {
        let names = Names {
            prefix: "tg:".into(),
            channel: "tg:notices".into(),
        };
        let id = Digest([0xab; 32]);
        let hex = id.hex();
        assert_eq!(names.entry(&id), format!("tg:{{{hex}}}:e"));
        assert_eq!(names.version(&id), format!("tg:{{{hex}}}:v"));
        assert_eq!(names.lease(&id), format!("tg:{{{hex}}}:l"));
        assert_eq!(names.token(&id), format!("tg:t:{hex}"));
        assert_eq!(names.penalty(&id), format!("tg:p:{hex}"));
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn an_outage_is_logged_once_then_once_a_minute() {
        let mut log = HealthLog::default();
        let t0 = Instant::now();
        assert_eq!(log.transition(UNKNOWN, UP, t0), Some(Line::Joined));
        assert_eq!(log.transition(UP, DOWN, t0), Some(Line::Lost));
        assert_eq!(log.remind(t0 + Duration::from_secs(30)), None);
        assert_eq!(
            log.transition(DOWN, UP, t0 + Duration::from_secs(31)),
            Some(Line::Rejoined)
        );
        // A blip soon after: neither a warning nor a "rejoined".
        assert_eq!(log.transition(UP, DOWN, t0 + Duration::from_secs(40)), None);
        assert_eq!(log.transition(DOWN, UP, t0 + Duration::from_secs(41)), None);
        assert_eq!(log.transition(UP, DOWN, t0 + Duration::from_secs(50)), None);
        // Still down a minute after the warning: one reminder, and its end is announced.
        assert_eq!(
            log.remind(t0 + Duration::from_secs(61)),
            Some(Line::StillLost)
        );
        assert_eq!(log.remind(t0 + Duration::from_secs(62)), None);
        assert_eq!(
            log.transition(DOWN, UP, t0 + Duration::from_secs(70)),
            Some(Line::Rejoined)
        );
        assert_eq!(
            log.transition(UP, DOWN, t0 + Duration::from_secs(200)),
            Some(Line::Lost)
        );
    }

    #[test]
    fn primaries_are_read_from_cluster_slots() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let slots = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5000),
                node("10.0.0.1", 7000),
                node("10.0.0.9", 7009),
            ]),
            Value::Array(vec![
                Value::Int(5001),
                Value::Int(9000),
                node("10.0.0.2", 7001),
            ]),
            Value::Array(vec![
                Value::Int(9001),
                Value::Int(16383),
                node("10.0.0.1", 7000),
            ]),
        ]);
        assert_eq!(
            primaries(&slots),
            vec![("10.0.0.1".to_owned(), 7000), ("10.0.0.2".to_owned(), 7001)]
        );
    }

    #[test]
    fn a_configured_ca_is_added_to_the_webpki_roots() {
        let ca = rcgen::generate_simple_self_signed(vec!["redis.test".into()]).unwrap();
        let certs = certificates(Some(ca.cert.pem().as_bytes()));
        let pem = certs.root_cert.unwrap();
        let mut store = tokio_rustls::rustls::RootCertStore::empty();
        use rustls_pki_types::pem::PemObject as _;
        let parsed: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            parsed.len(),
            webpki_root_certs::TLS_SERVER_ROOT_CERTS.len() + 1
        );
        assert_eq!(parsed.last(), Some(ca.cert.der()));
        let builtin = certificates(None).root_cert.unwrap();
        assert_eq!(
            rustls_pki_types::CertificateDer::pem_slice_iter(&builtin).count(),
            webpki_root_certs::TLS_SERVER_ROOT_CERTS.len()
        );
        for cert in parsed {
            store
                .add(cert)
                .expect("every root parses as a trust anchor");
        }
    }
}
