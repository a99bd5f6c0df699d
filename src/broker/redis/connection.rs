//! Connections to Redis: the shared state behind every handle ([`Inner`]) and the one way a
//! command runs (bounded, counted for health); the factory that (re)builds connections from
//! `cache.redis` (one node or a cluster, TLS trust roots); and the cluster-wide `SCAN`.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    Client, Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult, Script,
    TlsCertificates, Value,
};
use secrecy::ExposeSecret as _;
use tokio::sync::watch;

use super::health::Health;
use super::notices::{BACKOFF_MAX, BACKOFF_MIN};
use super::store::{Down, Names};
use crate::config::RedisConfig;
use crate::keys::Keys;

/// What every handle of one store shares.
pub(super) struct Inner {
    /// Replaced by the health check when it keeps failing; cloned out for each call.
    pub(super) conn: RwLock<Conn>,
    pub(super) factory: Factory,
    pub(super) timeout: Duration,
    pub(super) probe: Duration,
    pub(super) names: Names,
    pub(super) keys: Arc<Keys>,
    pub(super) health: Health,
    pub(super) put: Script,
    pub(super) delete: Script,
    pub(super) release: Script,
    pub(super) extend: Script,
    /// Dropped with the last handle: the background tasks see it and stop.
    pub(super) _shutdown: watch::Sender<()>,
}

/// Who made a request, for [`Health`]: one failed call is not an outage, a failed health
/// check is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Asker {
    Call,
    HealthCheck,
}

impl Inner {
    /// Runs one operation on the current connection within `limit`; any failure is
    /// [`Down`]. Health counts it as a call (see [`Health::record`]).
    pub(super) async fn call<T, F, Fut>(&self, limit: Duration, op: F) -> Result<T, Down>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.run(Asker::Call, limit, op).await
    }

    pub(super) async fn run<T, F, Fut>(
        &self,
        asker: Asker,
        limit: Duration,
        op: F,
    ) -> Result<T, Down>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = self.conn.read().unwrap_or_else(|e| e.into_inner()).clone();
        let result = match tokio::time::timeout(limit, op(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                // The kind only: a server's message could quote what was sent.
                tracing::debug!(kind = ?error.kind(), ?asker, "a redis call failed");
                Err(Down)
            }
            Err(_) => {
                tracing::debug!(timeout = ?limit, ?asker, "a redis call timed out");
                Err(Down)
            }
        };
        self.health.record(asker, result.is_ok());
        result
    }

    /// One command, as a call within `cache.redis.timeout`.
    pub(super) async fn query<T: redis::FromRedisValue>(&self, cmd: Cmd) -> Result<T, Down> {
        self.call(self.timeout, |mut conn| async move {
            cmd.query_async(&mut conn).await
        })
        .await
    }

    pub(super) fn publish_cmd(&self, message: &str) -> Cmd {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.names.channel).arg(message);
        cmd
    }
}

/// The two kinds of connection, behind the crate's [`ConnectionLike`] so that commands and
/// scripts run on either.
#[derive(Clone)]
pub(super) enum Conn {
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
    pub(super) async fn scan(self, pattern: &str) -> RedisResult<Vec<String>> {
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
pub(super) enum Factory {
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
    pub(super) fn new(config: &RedisConfig, probe: Duration) -> Result<Self, String> {
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
    pub(super) fn connect(&self) -> Conn {
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

    pub(super) fn pubsub_client(&self) -> &Client {
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

#[cfg(test)]
mod tests {
    use super::*;

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
