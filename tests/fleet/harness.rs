//! A fleet: one `redis-server`, one counting upstream, and tokengate replicas (the real
//! binary) sharing them, each with a gRPC client. Everything is started per test, on
//! ephemeral ports, and waited for by what it says (a log line, a subscriber count), never
//! by a sleep.

use std::path::PathBuf;
use std::time::Duration;

use testkit::{CountingUpstream, RedisServer, Reply, Tokengate};
use tokengate::proto::get_token_request::Grant;
use tokengate::proto::token_service_client::TokenServiceClient;
use tokengate::proto::{
    ClientCredentialsGrant, GetTokenRequest, GetTokenResponse, JwtBearerGrant, RefreshTokenGrant,
    RevokeTokenRequest, TokenSource,
};
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// The longest any awaited event may take; only a broken fleet comes near it.
pub const PATIENCE: Duration = Duration::from_secs(20);
/// `upstream.request_timeout` of every replica. A fleet lease lasts this plus one second.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// The upstream's delay unless a test asks otherwise: long enough for a burst's calls to
/// overlap, short enough for a quick suite.
pub const DELAY: Duration = Duration::from_millis(300);
/// `key_prefix` (the default), so the keys in Redis read as the README describes them.
pub const PREFIX: &str = "tokengate:";
/// The pub/sub channel every replica subscribes to.
pub const CHANNEL: &str = "tokengate:notices";

/// What a replica logs when its store first reaches Redis, when it loses Redis, and when it
/// has it again (`src/broker/redis/health.rs`, `Line::emit`).
pub const JOINED: &str = "connected to redis";
pub const LOST: &str = "redis is unreachable";
pub const REJOINED: &str = "rejoined the fleet";

/// A Redis, an upstream, and the replicas.
pub struct Fleet {
    pub redis: RedisServer,
    pub upstream: CountingUpstream,
    pub replicas: Vec<Replica>,
    /// The shared cache key and password files.
    dir: tempfile::TempDir,
    key_file: PathBuf,
}

/// One tokengate process and a client for it.
pub struct Replica {
    pub process: Tokengate,
    pub client: TokenServiceClient<Channel>,
}

impl Fleet {
    /// Redis, an upstream slow by [`DELAY`], and `n` replicas that have all joined.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, DELAY, None).await
    }

    /// Redis (with `requirepass` when `password` is set), an upstream slow by `delay`, and
    /// `n` replicas with the right password, all joined.
    pub async fn start_with(n: usize, delay: Duration, password: Option<&str>) -> Self {
        let redis = match password {
            Some(password) => RedisServer::start_with_password(password),
            None => RedisServer::start(),
        };
        let dir = tempfile::Builder::new().prefix("fleet-").tempdir().unwrap();
        let key_file = dir.path().join("cache.key");
        let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        std::fs::write(&key_file, key).unwrap();
        let mut fleet = Self {
            redis,
            upstream: CountingUpstream::start(delay),
            replicas: Vec::new(),
            dir,
            key_file,
        };
        for _ in 0..n {
            fleet.spawn(password).await;
        }
        fleet.wait_joined().await;
        fleet
    }

    /// Starts one more replica whose Redis password is `password` (none: no
    /// `password_file`) and returns its index. It is not waited for beyond `listening`.
    pub async fn spawn(&mut self, password: Option<&str>) -> usize {
        let index = self.replicas.len();
        let name = format!("replica-{}", (b'a' + index as u8) as char);
        let password_file = password.map(|password| {
            let file = self.dir.path().join(format!("{name}.redis-password"));
            std::fs::write(&file, password).unwrap();
            file
        });
        let config = self.config(password_file);
        let mut launch = Tokengate::launch(env!("CARGO_BIN_EXE_tokengate"), config).name(&name);
        // The replicas' RUST_LOG, to debug a failure (`FLEET_RUST_LOG=tokengate=debug`).
        if let Ok(filter) = std::env::var("FLEET_RUST_LOG") {
            launch = launch.rust_log(filter);
        }
        let process = launch.start().await;
        let client = TokenServiceClient::connect(process.url())
            .await
            .unwrap_or_else(|e| panic!("connect to {name}: {e}"));
        self.replicas.push(Replica { process, client });
        index
    }

    fn config(&self, password_file: Option<PathBuf>) -> String {
        let password = password_file
            .map(|f| format!("password_file = {:?}\n", f.display().to_string()))
            .unwrap_or_default();
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
health_listen = "127.0.0.1:0"
shutdown_grace_period = "5s"

[upstream]
base_url = "{upstream}"
allow_insecure_http = true
connect_timeout = "1s"
request_timeout = "{timeout}s"

[cache]
backend = "redis"
key_file = {key:?}

[cache.redis]
url = "{redis}"
key_prefix = "{PREFIX}"
# Production's 50 ms is tight for three debug builds on two cores: a call counted as Redis
# being down would send a replica alone and cost an upstream call.
timeout = "500ms"
{password}"#,
            upstream = self.upstream.url(),
            timeout = REQUEST_TIMEOUT.as_secs(),
            key = self.key_file.display().to_string(),
            redis = self.redis.url(),
        )
    }

    /// Waits until every replica's store reached Redis and subscribed to the channel: from
    /// then on a replica that misses takes the fleet's lease.
    pub async fn wait_joined(&self) {
        for replica in &self.replicas {
            replica.process.wait_for_message(PATIENCE, JOINED).await;
        }
        self.wait_subscribers(self.replicas.len()).await;
    }

    /// Waits until at least `n` connections subscribe to the replicas' channel.
    pub async fn wait_subscribers(&self, n: usize) {
        testkit::wait::until(
            &format!("{n} subscriber(s) on {CHANNEL}"),
            PATIENCE,
            || async {
                match self.redis.command(&["PUBSUB", "NUMSUB", CHANNEL]) {
                    Ok(Reply::Array(reply)) => {
                        matches!(reply.get(1), Some(Reply::Int(k)) if *k >= n as i64)
                    }
                    _ => false,
                }
            },
        )
        .await;
    }

    pub fn client(&self, replica: usize) -> TokenServiceClient<Channel> {
        self.replicas[replica].client.clone()
    }

    /// One call on one replica.
    pub async fn get(
        &self,
        replica: usize,
        request: &GetTokenRequest,
    ) -> Result<GetTokenResponse, Status> {
        self.client(replica)
            .get_token(request.clone())
            .await
            .map(tonic::Response::into_inner)
    }

    /// One call that must succeed.
    pub async fn token(&self, replica: usize, request: &GetTokenRequest) -> GetTokenResponse {
        self.get(replica, request)
            .await
            .unwrap_or_else(|status| panic!("replica {replica}: {status:?}"))
    }

    /// `per_replica` identical calls on each of `replicas`, all at once; the answers come
    /// back with the replica that gave them, in no particular order.
    pub fn burst(
        &self,
        request: &GetTokenRequest,
        replicas: &[usize],
        per_replica: usize,
    ) -> JoinSet<(usize, Result<GetTokenResponse, Status>)> {
        let mut calls = JoinSet::new();
        for _ in 0..per_replica {
            for &replica in replicas {
                let mut client = self.client(replica);
                let request = request.clone();
                calls.spawn(async move {
                    let answer = client.get_token(request).await.map(|r| r.into_inner());
                    (replica, answer)
                });
            }
        }
        calls
    }

    /// [`Fleet::burst`] on every replica, waited for; every call must succeed.
    pub async fn burst_ok(
        &self,
        request: &GetTokenRequest,
        per_replica: usize,
    ) -> Vec<(usize, GetTokenResponse)> {
        let all: Vec<usize> = (0..self.replicas.len()).collect();
        succeeded(self.burst(request, &all, per_replica).join_all().await)
    }

    /// RevokeToken for the public client `client_id`, which must succeed.
    pub async fn revoke(&self, replica: usize, client_id: &str, token: &str) {
        self.client(replica)
            .revoke_token(RevokeTokenRequest {
                token: token.into(),
                client_id: client_id.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|status| panic!("RevokeToken on replica {replica}: {status:?}"));
    }

    /// The names of the entry keys (`tokengate:{<id>}:e`) in Redis now.
    pub fn entry_keys(&self) -> Vec<String> {
        match self
            .redis
            .command(&["KEYS", &format!("{PREFIX}{{*}}:e")])
            .expect("KEYS")
        {
            Reply::Array(keys) => keys.iter().map(Reply::text).collect(),
            other => panic!("KEYS answered {other:?}"),
        }
    }
}

/// Every answer, asserting that each call succeeded.
pub fn succeeded(
    answers: Vec<(usize, Result<GetTokenResponse, Status>)>,
) -> Vec<(usize, GetTokenResponse)> {
    answers
        .into_iter()
        .map(|(replica, answer)| {
            (
                replica,
                answer.unwrap_or_else(|status| panic!("a call on replica {replica}: {status:?}")),
            )
        })
        .collect()
}

pub fn source(answer: &GetTokenResponse) -> TokenSource {
    TokenSource::try_from(answer.source).expect("a known source")
}

/// How many answers came from each source: (upstream, cache, coalesced, replayed).
pub fn sources<'a>(
    answers: impl IntoIterator<Item = &'a GetTokenResponse>,
) -> (usize, usize, usize, usize) {
    let mut counts = (0, 0, 0, 0);
    for answer in answers {
        match source(answer) {
            TokenSource::Upstream => counts.0 += 1,
            TokenSource::Cache => counts.1 += 1,
            TokenSource::Coalesced => counts.2 += 1,
            TokenSource::Replayed => counts.3 += 1,
            TokenSource::Unspecified => panic!("an answer without a source: {answer:?}"),
        }
    }
    counts
}

/// Asserts the status code and its `ErrorInfo.reason`.
#[track_caller]
pub fn assert_reason(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    let info = status
        .get_error_details()
        .error_info()
        .cloned()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "{status:?}");
}

/// A JWT bearer request by the public client `client_id` (an unsigned JWT for `user-1`:
/// the fake upstream does not check it).
pub fn jwt(client_id: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::JwtBearer(JwtBearerGrant {
            assertion: "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1c2VyLTEifQ.sig".into(),
        })),
        client_id: client_id.into(),
        scopes: vec!["ReadAccounts".into()],
        ..Default::default()
    }
}

/// A plain client credentials request by the public client `client_id`.
pub fn client_credentials(client_id: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::ClientCredentials(ClientCredentialsGrant {
            subject: None,
        })),
        client_id: client_id.into(),
        ..Default::default()
    }
}

/// A refresh token request by the public client `client_id`.
pub fn refresh(client_id: &str, refresh_token: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::RefreshToken(RefreshTokenGrant {
            refresh_token: refresh_token.into(),
        })),
        client_id: client_id.into(),
        ..Default::default()
    }
}
