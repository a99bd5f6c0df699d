//! The upstream rate-limit guard. RingCentral restarts its 60 s penalty on every request
//! made during it, so after a 429 tokengate stops sending for that client (or that user of
//! the client) until `Retry-After` has passed, and answers callers locally instead.
//!
//! Penalties are keyed by a digest of (client, user), never by the names themselves, so the
//! same keys can be shared with every replica through Redis without exposing who is limited.
//!
//! A fleet's penalties are causal (invariant I4): a 429 is written to the shared store
//! before the answer that passes it on leaves, and every upstream attempt reads the store
//! first. Pub/sub copies ([`RateLimitGuard::learn`]) only save those reads a round trip.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret as _, SecretString};
use tokio::time::Instant;

use crate::keys::{Digest, Keys};
use crate::upstream::MAX_RETRY_AFTER;

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

/// How long the guard waits for the shared store when nobody said otherwise. The store's
/// own timeout should end every call long before; this only keeps a store that hangs past
/// it from holding up calls.
pub const SHARED_PATIENCE: Duration = Duration::from_millis(250);

/// Penalties in force, each with the instant it ends.
pub struct RateLimitGuard {
    until: Mutex<HashMap<Digest, Instant>>,
    /// The fleet's store, when there is a fleet. Set once, possibly after construction:
    /// the store may start after the guard is handed out.
    shared: OnceLock<Arc<dyn SharedPenalties>>,
    /// The longest one read or write of `shared` may hold up a call.
    patience: Duration,
}

impl std::fmt::Debug for RateLimitGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitGuard")
            .field("in_force", &self.in_force())
            .field("shared", &self.shared.get().is_some())
            .finish_non_exhaustive()
    }
}

/// Whom a request acts for, as far as its penalty goes.
#[derive(Clone)]
pub enum User<'a> {
    /// A user the request names (a username, an assertion's subject), or the user of the
    /// grant a renewal came from.
    Named(Cow<'a, str>),
    /// The session a caller's refresh token belongs to: the token is the only name
    /// tokengate has for its user, so it names the penalty. It is only ever hashed.
    Session(&'a SecretString),
}

impl std::fmt::Debug for User<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither a name nor a token belongs in a log line.
        f.write_str(match self {
            Self::Named(_) => "Named(..)",
            Self::Session(_) => "Session(..)",
        })
    }
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
        Self::of(
            keys,
            client_id,
            user.map(|u| User::Named(Cow::Borrowed(u))).as_ref(),
        )
    }

    /// [`GuardKeys::new`] for any [`User`]. A session's key cannot equal a named user's:
    /// the two are digested under different labels.
    pub fn of(keys: &Keys, client_id: &str, user: Option<&User<'_>>) -> Self {
        let client = keys.digest([b"penalty".as_slice(), client_id.as_bytes()]);
        let user = user.map(|user| match user {
            User::Named(name) => {
                keys.digest([b"penalty".as_slice(), client_id.as_bytes(), name.as_bytes()])
            }
            User::Session(token) => keys.digest([
                b"penalty-session".as_slice(),
                client_id.as_bytes(),
                token.expose_secret().as_bytes(),
            ]),
        });
        Self { client, user }
    }

    /// The key a 429 for this request penalises.
    fn penalised(&self) -> Digest {
        self.user.unwrap_or(self.client)
    }

    /// Every key whose penalty holds this request back.
    fn all(&self) -> Vec<Digest> {
        std::iter::once(self.client).chain(self.user).collect()
    }
}

impl RateLimitGuard {
    /// A guard that shares its penalties through `shared`, when given.
    pub fn new(shared: Option<Arc<dyn SharedPenalties>>) -> Self {
        let guard = Self {
            until: Mutex::default(),
            shared: OnceLock::new(),
            patience: SHARED_PATIENCE,
        };
        if let Some(shared) = shared {
            guard.share(shared);
        }
        guard
    }

    /// Bounds each read or write of the shared store (default [`SHARED_PATIENCE`]).
    #[must_use]
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Shares penalties through `shared` from now on. Returns false, changing nothing, if
    /// the guard shares through a store already.
    pub fn share(&self, shared: Arc<dyn SharedPenalties>) -> bool {
        self.shared.set(shared).is_ok()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Instant>> {
        self.until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long requests with these keys must still wait, by what this replica knows. A
    /// client-wide penalty applies to every user of the client. Cheap: no store is asked.
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

    /// How long requests with these keys must still wait, asking the shared store when
    /// this replica knows of no penalty: the one check to make before sending, since a
    /// pub/sub copy of another replica's penalty may still be on its way. A penalty found
    /// there is learnt. A store that does not answer within the patience counts as none.
    pub async fn check(&self, keys: &GuardKeys) -> Option<Duration> {
        if let Some(wait) = self.remaining(keys) {
            return Some(wait);
        }
        let shared = self.shared.get()?;
        let all = keys.all();
        let until = tokio::time::timeout(self.patience, shared.read(&all))
            .await
            .ok()
            .flatten()?;
        let wait = until.duration_since(SystemTime::now()).ok()?;
        // Learnt for the narrowest key: it holds back exactly this request's kind, whether
        // the store's penalty was for the user or for the whole client.
        self.learn(keys.penalised(), until);
        Some(wait.min(MAX_RETRY_AFTER))
    }

    /// Penalties in force now (`tokengate_rate_limit_penalties`), read at scrape time.
    pub fn in_force(&self) -> usize {
        let now = Instant::now();
        self.map().values().filter(|end| **end > now).count()
    }

    /// Records a 429: nothing more is sent for these keys for `wait`, on any replica.
    /// Returns once the shared store has it (or has not answered within the patience),
    /// so the answer that passes the 429 on leaves only after every replica can see it.
    pub async fn penalise(&self, keys: &GuardKeys, wait: Duration) {
        // Capped like Retry-After itself, so no wait can overflow the clock.
        let wait = wait.min(MAX_RETRY_AFTER);
        let key = keys.penalised();
        self.insert(key, wait);
        if let Some(shared) = self.shared.get() {
            let until = SystemTime::now() + wait;
            // Not answering in time: this replica still holds back; the others learn it
            // from their own 429s.
            let _ = tokio::time::timeout(self.patience, shared.write(key, until)).await;
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
    fn remaining(&self) -> BoxFuture<'_, Option<Duration>> {
        Box::pin(self.guard.check(&self.keys))
    }

    fn penalise(&self, wait: Duration) -> BoxFuture<'_, ()> {
        Box::pin(self.guard.penalise(&self.keys, wait))
    }
}

/// Shared stores for tests: one in memory, and one that never answers.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Penalties in memory, shared by every guard given the same `Arc`: a fleet with
    /// no pub/sub between its replicas.
    #[derive(Default)]
    pub struct MemoryPenalties {
        stored: Mutex<HashMap<Digest, SystemTime>>,
        pub reads: AtomicUsize,
    }

    impl MemoryPenalties {
        /// The latest end stored for any of `keys`, as the store holds it now.
        pub fn held(&self, keys: &[Digest]) -> Option<SystemTime> {
            let stored = self
                .stored
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = SystemTime::now();
            keys.iter()
                .filter_map(|key| stored.get(key).copied())
                .filter(|until| *until > now)
                .max()
        }

        /// The keys of one request, for [`MemoryPenalties::held`].
        pub fn keys_of(keys: &GuardKeys) -> Vec<Digest> {
            keys.all()
        }
    }

    impl SharedPenalties for MemoryPenalties {
        fn read<'a>(&'a self, keys: &'a [Digest]) -> BoxFuture<'a, Option<SystemTime>> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move { self.held(keys) })
        }

        fn write(&self, key: Digest, until: SystemTime) -> BoxFuture<'_, ()> {
            Box::pin(async move {
                // Yields once first, as a network write would: a caller that does not
                // wait for it returns before it lands.
                tokio::task::yield_now().await;
                let mut stored = self
                    .stored
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let entry = stored.entry(key).or_insert(until);
                *entry = (*entry).max(until);
            })
        }
    }

    /// A store that never answers (Redis hung past its own timeout).
    pub struct SilentPenalties;

    impl SharedPenalties for SilentPenalties {
        fn read<'a>(&'a self, _keys: &'a [Digest]) -> BoxFuture<'a, Option<SystemTime>> {
            Box::pin(std::future::pending())
        }

        fn write(&self, _key: Digest, _until: SystemTime) -> BoxFuture<'_, ()> {
            Box::pin(std::future::pending())
        }
    }

    /// A store that answers at once with nothing and keeps nothing (Redis down).
    pub struct DownPenalties;

    impl SharedPenalties for DownPenalties {
        fn read<'a>(&'a self, _keys: &'a [Digest]) -> BoxFuture<'a, Option<SystemTime>> {
            Box::pin(async { None })
        }

        fn write(&self, _key: Digest, _until: SystemTime) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{MemoryPenalties, SilentPenalties};
    use super::*;

    fn keys(client: &str, user: Option<&str>) -> GuardKeys {
        static KEYS: std::sync::LazyLock<Keys> = std::sync::LazyLock::new(|| Keys::new(None));
        GuardKeys::new(&KEYS, client, user)
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_penalty_blocks_that_user_only_until_it_ends() {
        let guard = RateLimitGuard::new(None);
        guard
            .penalise(&keys("app", Some("alice")), Duration::from_secs(60))
            .await;
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
        guard
            .penalise(&keys("app", None), Duration::from_secs(30))
            .await;
        guard
            .penalise(&keys("app", Some("alice")), Duration::from_secs(45))
            .await;
        guard
            .penalise(&keys("app", None), Duration::from_secs(10))
            .await;
        let wait = |user| guard.remaining(&keys("app", user));
        assert_eq!(wait(Some("bob")), Some(Duration::from_secs(30)));
        assert_eq!(wait(Some("alice")), Some(Duration::from_secs(45)));
        assert_eq!(wait(None), Some(Duration::from_secs(30)));
    }

    /// A refresh token's session is a user of its own: its key is neither the client's nor
    /// any named user's, and it never shows in Debug.
    #[test]
    fn a_session_is_keyed_apart_from_named_users() {
        let store = Keys::new(None);
        let token = SecretString::from("rt-secret");
        let session = GuardKeys::of(&store, "app", Some(&User::Session(&token)));
        let named = GuardKeys::new(&store, "app", Some("rt-secret"));
        assert_eq!(session.client, named.client);
        assert_ne!(session.penalised(), named.penalised());
        assert_ne!(session.penalised(), session.client);
        let shown = format!("{:?}", User::Session(&token));
        assert!(!shown.contains("rt-secret"), "{shown}");
    }

    /// I4: the write is awaited, so the store holds the penalty the moment `penalise`
    /// returns; another guard over the same store, told nothing else, holds back too.
    #[tokio::test]
    async fn a_penalty_is_in_the_store_when_penalise_returns_and_holds_back_other_guards() {
        let store = Arc::new(MemoryPenalties::default());
        let a = RateLimitGuard::new(Some(store.clone()));
        let b = RateLimitGuard::new(None);
        assert!(b.share(store.clone()));
        let alice = keys("app", Some("alice"));
        a.penalise(&alice, Duration::from_secs(60)).await;
        assert!(
            store.held(&MemoryPenalties::keys_of(&alice)).is_some(),
            "written before penalise returned"
        );

        assert_eq!(b.remaining(&alice), None, "b has no pub/sub copy");
        let wait = b.check(&alice).await.expect("b finds it in the store");
        assert!(wait > Duration::from_secs(55), "{wait:?}");
        assert!(b.remaining(&alice).is_some(), "and learns it");
        assert_eq!(b.check(&keys("app", Some("bob"))).await, None);
        assert_eq!(b.check(&keys("app", None)).await, None);
    }

    /// A client-wide penalty in the store holds back every user of the client, and is
    /// learnt only for the user that found it.
    #[tokio::test]
    async fn a_client_penalty_in_the_store_holds_back_every_user() {
        let store = Arc::new(MemoryPenalties::default());
        let a = RateLimitGuard::new(Some(store.clone()));
        let b = RateLimitGuard::new(Some(store.clone()));
        a.penalise(&keys("app", None), Duration::from_secs(60))
            .await;
        assert!(b.check(&keys("app", Some("bob"))).await.is_some());
        assert!(b.remaining(&keys("app", Some("bob"))).is_some());
        assert_eq!(b.remaining(&keys("app", Some("carol"))), None);
        assert!(b.check(&keys("app", Some("carol"))).await.is_some());
    }

    #[test]
    fn a_reported_penalty_is_applied_and_an_ended_one_is_not() {
        let guard = RateLimitGuard::new(None);
        let alice = keys("app", Some("alice"));
        guard.learn(
            alice.penalised(),
            SystemTime::now() + Duration::from_secs(60),
        );
        let wait = guard.remaining(&alice).expect("the reported penalty holds");
        assert!(wait > Duration::from_secs(55), "{wait:?}");
        let bob = keys("app", Some("bob"));
        guard.learn(bob.penalised(), SystemTime::now() - Duration::from_secs(1));
        assert!(guard.remaining(&bob).is_none());
    }

    /// A store that hangs costs each call at most the patience, and is no penalty.
    #[tokio::test(start_paused = true)]
    async fn a_store_that_never_answers_neither_blocks_nor_holds_back() {
        let guard = RateLimitGuard::new(Some(Arc::new(SilentPenalties)))
            .with_patience(Duration::from_millis(50));
        let alice = keys("app", Some("alice"));
        assert_eq!(guard.check(&alice).await, None);
        guard.penalise(&alice, Duration::from_secs(60)).await;
        assert!(
            guard.check(&alice).await.is_some(),
            "still held back locally"
        );
    }
}
