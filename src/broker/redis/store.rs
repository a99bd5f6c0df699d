//! The state a fleet shares (contract §8): sealed entries with a monotonic version, the token
//! index, invalidations, and 429 penalties. Leases are in `lease.rs`.
//!
//! Redis is shared state, never a source of failure: every call is bounded by
//! `cache.redis.timeout`, and anything else (unreachable, slow, an error, a wrong password)
//! is [`Down`] for that call. The replica then goes on alone and a background task brings it
//! back. Nothing stored is readable without the cache key: keys hold HMAC digests, values
//! are sealed.
//!
//! Layout, under `key_prefix` (the braces are a Redis Cluster hash tag, so one identity's
//! keys share a slot and the version-checked scripts can touch them together):
//! `{id}:e` entry, `{id}:v` version, `{id}:l` lease, `t:<token digest>` → id hex,
//! `p:<penalty key>` sealed end of a penalty, and the channel `notices`.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use super::connection::{Factory, Inner};
use super::health::{Health, check_health};
use super::notices::{Notice, encode_invalidate, encode_penalty, listen, open_penalty};
use crate::config::RedisConfig;
use crate::keys::{Digest, Keys, Purpose};
use crate::rate_limit::{BoxFuture, SharedPenalties};

/// Redis unreachable, too slow (`cache.redis.timeout`), or answering errors, for this call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Down;

/// What Redis holds for an identity: its current version, and the sealed entry if one is
/// there. The version is kept when the entry is deleted or expires, so it never goes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub version: u64,
    pub sealed: Option<Vec<u8>>,
}

/// How long a version outlives the last write or delete of its identity: longer than any
/// entry lives, so no replica can remember an entry newer than what Redis would report.
pub const VERSION_TTL: Duration = Duration::from_secs(25 * 3600);

/// How long a background probe (health check, the penalty scan, a pub/sub (re)connection)
/// may take at least: those are not callers' time, and a TLS handshake to a remote Redis
/// can take longer than a call's budget.
const PROBE_FLOOR: Duration = Duration::from_secs(1);

/// `put`: writes the entry (`PX` its TTL) and version `expected + 1` (`PX` at least
/// [`VERSION_TTL`]) only if the current version is `expected`; an absent version key is 0.
/// The entry's presence does not matter: a deleted or expired entry keeps its version.
const PUT_SCRIPT: &str = r"
local current = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if current ~= tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SET', KEYS[2], string.format('%d', current + 1), 'PX', ARGV[4])
return 1
";

/// `delete` and `delete_if`: deletes the entry and bumps the version, keeping at least
/// [`VERSION_TTL`] on it; with `ARGV[1]` set, only if the version is that. The new
/// version, or -1 when it had moved.
const DELETE_SCRIPT: &str = r"
local current = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if ARGV[1] ~= '' and current ~= tonumber(ARGV[1]) then
  return -1
end
local keep = tonumber(ARGV[2])
local left = redis.call('PTTL', KEYS[2])
if left > keep then
  keep = left
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], string.format('%d', current + 1), 'PX', keep)
return current + 1
";

/// A handle on the fleet's shared state; cheap to clone. The background tasks (health check,
/// pub/sub) stop when the last handle is dropped.
#[derive(Clone)]
pub struct RedisStore {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
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
            delete: Script::new(DELETE_SCRIPT),
            release: Script::new(super::lease::RELEASE_SCRIPT),
            extend: Script::new(super::lease::EXTEND_SCRIPT),
            _shutdown: shutdown,
        });
        tokio::spawn(check_health(Arc::downgrade(&inner), watch.clone()));
        tokio::spawn(listen(Arc::downgrade(&inner), watch, notices));
        Ok(Self { inner })
    }

    /// Whether Redis counts as up: the health check answered last, or the calls since have
    /// not failed [`super::DOWN_AFTER`] times in a row.
    pub fn is_up(&self) -> bool {
        self.inner.health.is_up()
    }

    /// The identity's current version, and its sealed entry if one is stored. The version
    /// is there even when the entry is not (deleted or expired): a write must expect it.
    pub async fn get(&self, id: &Digest) -> Result<Stored, Down> {
        let names = &self.inner.names;
        let mut cmd = redis::cmd("MGET");
        cmd.arg(names.entry(id)).arg(names.version(id));
        let (sealed, version): (Option<Vec<u8>>, Option<Vec<u8>>) = self.inner.query(cmd).await?;
        Ok(Stored {
            version: version.as_deref().map_or(0, parse_version),
            sealed,
        })
    }

    /// Version-checked write: stores `sealed` under `id` for `ttl` with version
    /// `expected + 1`, only if the current version is `expected` (no version yet counts as
    /// 0). `Ok(false)` when another writer or a delete came first. When written, also indexes
    /// each digest in `tokens` to `id` for the same `ttl`.
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
        let version_ms = millis(ttl.max(VERSION_TTL));
        inner
            .call(inner.timeout, |mut conn| async move {
                let written: i64 = inner
                    .put
                    .key(inner.names.entry(id))
                    .key(inner.names.version(id))
                    .arg(expected)
                    .arg(sealed)
                    .arg(ttl_ms)
                    .arg(version_ms)
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

    /// Deletes the entry under `id` and bumps its version, so no writer that read the old
    /// one can put it back; publishes [`Notice::Invalidate`] with the new version, and
    /// returns it.
    pub async fn delete(&self, id: &Digest) -> Result<u64, Down> {
        self.delete_checked(id, None)
            .await
            .map(|version| version.unwrap_or_default())
    }

    /// [`RedisStore::delete`], only if the version is still `expected`: `None` (and nothing
    /// deleted or published) when it had moved.
    pub async fn delete_if(&self, id: &Digest, expected: u64) -> Result<Option<u64>, Down> {
        self.delete_checked(id, Some(expected)).await
    }

    async fn delete_checked(
        &self,
        id: &Digest,
        expected: Option<u64>,
    ) -> Result<Option<u64>, Down> {
        let inner = &self.inner;
        let condition = expected.map(|v| v.to_string()).unwrap_or_default();
        inner
            .call(inner.timeout, |mut conn| async move {
                let version: i64 = inner
                    .delete
                    .key(inner.names.entry(id))
                    .key(inner.names.version(id))
                    .arg(condition)
                    .arg(millis(VERSION_TTL))
                    .invoke_async(&mut conn)
                    .await?;
                let Ok(version) = u64::try_from(version) else {
                    return Ok(None);
                };
                inner
                    .publish_cmd(&encode_invalidate(id, version))
                    .query_async::<()>(&mut conn)
                    .await?;
                Ok(Some(version))
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

    /// Tells every replica (this one too) that this identity's entries below `version` are
    /// dead: after a put that replaced an entry others may hold, `version` is the new one.
    pub async fn invalidate(&self, id: &Digest, version: u64) -> Result<(), Down> {
        let cmd = self.inner.publish_cmd(&encode_invalidate(id, version));
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
            .call(inner.timeout, |mut conn| async move {
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

    /// The latest end among the penalties stored for `keys` that is still ahead, read with
    /// one `MGET`; values that do not open are skipped.
    pub async fn penalty_until(&self, keys: &[Digest]) -> Result<Option<u64>, Down> {
        if keys.is_empty() {
            return Ok(None);
        }
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(self.inner.names.penalty(key));
        }
        let values: Vec<Option<Vec<u8>>> = self.inner.query(cmd).await?;
        let now = now_unix_ms();
        Ok(keys
            .iter()
            .zip(values)
            .filter_map(|(key, sealed)| open_penalty(&self.inner.keys, key, &sealed?))
            .filter(|until| *until > now)
            .max())
    }
}

/// The fleet's penalties for the rate-limit guard: a Redis that does not answer reads as no
/// penalty and drops the write, as the trait asks (the replica holds back on its own).
impl SharedPenalties for RedisStore {
    fn read<'a>(&'a self, keys: &'a [Digest]) -> BoxFuture<'a, Option<SystemTime>> {
        Box::pin(async move {
            let until = self.penalty_until(keys).await.ok()??;
            UNIX_EPOCH.checked_add(Duration::from_millis(until))
        })
    }

    fn write(&self, key: Digest, until: SystemTime) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let until_unix_ms = until
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            let _ = self.penalise(&key, until_unix_ms).await;
        })
    }
}

impl Inner {
    /// Every penalty stored and still in force, opened; values that do not open are skipped.
    pub(super) async fn penalties(&self) -> Result<Vec<(Digest, u64)>, Down> {
        let pattern = format!("{}*", glob_escape(&self.names.penalty_prefix()));
        let names = self
            .call(self.probe, |conn| async move { conn.scan(&pattern).await })
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
                .call(self.probe, |mut conn| async move {
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
pub struct Names {
    pub(super) prefix: String,
    pub(super) channel: String,
}

impl Names {
    pub(super) fn entry(&self, id: &Digest) -> String {
        format!("{}{{{}}}:e", self.prefix, id.hex())
    }

    pub(super) fn version(&self, id: &Digest) -> String {
        format!("{}{{{}}}:v", self.prefix, id.hex())
    }

    pub(super) fn lease(&self, id: &Digest) -> String {
        format!("{}{{{}}}:l", self.prefix, id.hex())
    }

    pub(super) fn token(&self, token: &Digest) -> String {
        format!("{}t:{}", self.prefix, token.hex())
    }

    pub(super) fn penalty_prefix(&self) -> String {
        format!("{}p:", self.prefix)
    }

    pub(super) fn penalty(&self, key: &Digest) -> String {
        format!("{}{}", self.penalty_prefix(), key.hex())
    }
}

/// A stored version; anything that is not one reads as 0, as the scripts read it.
fn parse_version(bytes: &[u8]) -> u64 {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
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
pub(super) fn millis(ttl: Duration) -> u64 {
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
    fn a_version_that_is_not_a_number_reads_as_zero() {
        assert_eq!(parse_version(b"42"), 42);
        assert_eq!(parse_version(b""), 0);
        assert_eq!(parse_version(b"x1"), 0);
        assert_eq!(parse_version(b"\xff"), 0);
    }
}
