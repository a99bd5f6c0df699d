//! The upstream rate-limit guard. RingCentral restarts its 60 s penalty on every request
//! made during it, so after a 429 tokengate stops sending for that client (or that user of
//! the client) until `Retry-After` has passed, and answers callers locally instead.
//!
//! Penalties are keyed by a digest of (client, user), never by the names themselves, so the
//! same keys can be shared with every replica through Redis without exposing who is limited.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::keys::{Digest, Keys};
use crate::upstream::MAX_RETRY_AFTER;

/// A penalty to tell the fleet about: whom, and until when (wall clock, shared by replicas).
pub type Shared = (Digest, SystemTime);

/// A boxed future, so the shared store can sit behind `dyn`.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where a fleet's penalties live (Redis). Both calls are bounded by the store's own timeout
/// and never fail: a store that does not answer reads as no penalty and drops the write (the
/// replica then holds back on its own knowledge alone).
pub trait SharedPenalties: Send + Sync + 'static {
    /// The latest end among the penalties stored for any of `keys`, if one is in force.
    fn read<'a>(&'a self, keys: &'a [Digest]) -> BoxFuture<'a, Option<SystemTime>>;
    /// Stores a penalty for `key` until `until` and tells every replica.
    fn write(&self, key: Digest, until: SystemTime) -> BoxFuture<'_, ()>;
}

/// Penalties in force, each with the instant it ends.
#[derive(Debug)]
pub struct RateLimitGuard {
    until: Mutex<HashMap<Digest, Instant>>,
    /// Where new penalties go to reach the other replicas, when there is a fleet.
    fleet: Option<UnboundedSender<Shared>>,
}

/// Whom one request's penalty concerns: its client as a whole, and its user when known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuardKeys {
    client: Digest,
    user: Option<Digest>,
}

impl GuardKeys {
    /// RingCentral counts the Auth group per user and app, so a 429 for a request that
    /// names its user penalises that user; otherwise the whole client.
    pub fn new(keys: &Keys, client_id: &str, user: Option<&str>) -> Self {
        let client = keys.digest([b"penalty".as_slice(), client_id.as_bytes()]);
        let user = user.map(|user| {
            keys.digest([b"penalty".as_slice(), client_id.as_bytes(), user.as_bytes()])
        });
        Self { client, user }
    }

    /// The key a 429 for this request penalises.
    fn penalised(&self) -> Digest {
        self.user.unwrap_or(self.client)
    }
}

impl RateLimitGuard {
    pub fn new(fleet: Option<UnboundedSender<Shared>>) -> Self {
        Self {
            until: Mutex::default(),
            fleet,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Instant>> {
        self.until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long requests with these keys must still wait, if at all. A client-wide
    /// penalty applies to every user of the client.
    pub fn remaining(&self, keys: &GuardKeys) -> Option<Duration> {
        let now = Instant::now();
        let until = self.map();
        if until.is_empty() {
            return None;
        }
        let lookup = |key: &Digest| until.get(key).copied().filter(|end| *end > now);
        let end = match (lookup(&keys.client), keys.user.as_ref().and_then(lookup)) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b)?,
        };
        Some(end - now)
    }

    /// Penalties in force now (`tokengate_rate_limit_penalties`), read at scrape time.
    pub fn in_force(&self) -> usize {
        let now = Instant::now();
        self.map().values().filter(|end| **end > now).count()
    }

    /// Records a 429: nothing more is sent for these keys for `wait`, on any replica.
    pub fn penalise(&self, keys: &GuardKeys, wait: Duration) {
        // Capped like Retry-After itself, so no wait can overflow the clock.
        let wait = wait.min(MAX_RETRY_AFTER);
        let key = keys.penalised();
        self.insert(key, wait);
        if let Some(fleet) = &self.fleet {
            // A closed channel means the fleet link is gone; this replica still holds back.
            let _ = fleet.send((key, SystemTime::now() + wait));
        }
    }

    /// Applies a penalty another replica reported (or that Redis held when we joined).
    pub fn learn(&self, key: Digest, until: SystemTime) {
        if let Ok(wait) = until.duration_since(SystemTime::now()) {
            self.insert(key, wait.min(MAX_RETRY_AFTER));
        }
    }

    fn insert(&self, key: Digest, wait: Duration) {
        let now = Instant::now();
        let end = now + wait;
        let mut until = self.map();
        // Forget ended penalties so the map stays as small as the set of limited users.
        until.retain(|_, end| *end > now);
        let entry = until.entry(key).or_insert(end);
        *entry = (*entry).max(end);
    }
}

/// One request's view of the guard, handed to the upstream client.
pub struct RequestPenalty<'a> {
    pub guard: &'a RateLimitGuard,
    pub keys: GuardKeys,
}

impl crate::upstream::Penalty for RequestPenalty<'_> {
    fn remaining(&self) -> Option<Duration> {
        self.guard.remaining(&self.keys)
    }

    fn penalise(&self, wait: Duration) {
        self.guard.penalise(&self.keys, wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(client: &str, user: Option<&str>) -> GuardKeys {
        static KEYS: std::sync::LazyLock<Keys> = std::sync::LazyLock::new(|| Keys::new(None));
        GuardKeys::new(&KEYS, client, user)
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_penalty_blocks_that_user_only_until_it_ends() {
        let guard = RateLimitGuard::new(None);
        guard.penalise(&keys("app", Some("alice")), Duration::from_secs(60));
        assert_eq!(guard.in_force(), 1);
        let alice = keys("app", Some("alice"));
        assert_eq!(guard.remaining(&alice), Some(Duration::from_secs(60)));
        assert_eq!(guard.remaining(&keys("app", Some("bob"))), None);
        assert_eq!(guard.remaining(&keys("app", None)), None);
        assert_eq!(guard.remaining(&keys("other", Some("alice"))), None);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(guard.remaining(&alice), Some(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(guard.remaining(&alice), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_penalty_blocks_every_user_and_the_longer_penalty_wins() {
        let guard = RateLimitGuard::new(None);
        guard.penalise(&keys("app", None), Duration::from_secs(30));
        guard.penalise(&keys("app", Some("alice")), Duration::from_secs(45));
        guard.penalise(&keys("app", None), Duration::from_secs(10));
        let wait = |user| guard.remaining(&keys("app", user));
        assert_eq!(wait(Some("bob")), Some(Duration::from_secs(30)));
        assert_eq!(wait(Some("alice")), Some(Duration::from_secs(45)));
        assert_eq!(wait(None), Some(Duration::from_secs(30)));
    }

    #[test]
    fn a_penalty_is_told_to_the_fleet_and_a_reported_one_is_applied() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let guard = RateLimitGuard::new(Some(tx));
        let alice = keys("app", Some("alice"));
        guard.penalise(&alice, Duration::from_secs(60));
        let (key, until) = rx.try_recv().expect("the fleet is told");
        assert_eq!(key, alice.penalised());
        assert!(until > SystemTime::now() + Duration::from_secs(55));

        let other = RateLimitGuard::new(None);
        assert_eq!(other.remaining(&alice), None);
        other.learn(key, until);
        let wait = other.remaining(&alice).expect("the reported penalty holds");
        assert!(wait > Duration::from_secs(55), "{wait:?}");
        other.learn(key, SystemTime::now() - Duration::from_secs(1));
        assert!(other.remaining(&keys("app", Some("bob"))).is_none());
    }
}
