//! A fleet store in memory, for the broker's tests and its model: Redis's semantics as the
//! broker uses them (versions that never go back, a token index, leases with a TTL, notices
//! to every replica), on tokio's clock, with faults a test turns on: a store that does not
//! answer, and a seeded random delay before every command, which is what makes a model run
//! explore interleavings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::time::Instant;

use super::fleet::Fleet;
use super::redis::{Down, Notice};
use crate::keys::Digest;

/// One shared store; clones share it.
#[derive(Clone, Default)]
pub struct MemoryFleet {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    down: AtomicBool,
    next_owner: AtomicU64,
    /// The longest random delay before a command, and the generator that draws it.
    jitter: Mutex<Option<(Duration, fastrand::Rng)>>,
    /// Commands answered, for tests that count round trips.
    commands: AtomicU64,
}

#[derive(Default)]
struct State {
    versions: HashMap<Digest, u64>,
    entries: HashMap<Digest, (Vec<u8>, Instant)>,
    tokens: HashMap<Digest, Digest>,
    leases: HashMap<Digest, (u64, Instant)>,
    subscribers: Vec<UnboundedSender<Notice>>,
}

/// A lease's owner token.
#[derive(Debug)]
pub struct MemoryLease(u64);

impl MemoryFleet {
    /// A replica's view: the store and the notices it receives.
    pub fn join(&self) -> (Self, UnboundedReceiver<Notice>) {
        let (tx, rx) = unbounded_channel();
        self.state().subscribers.push(tx);
        (self.clone(), rx)
    }

    /// Stops (or resumes) answering every command.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Delays every command by a random time up to `max`, drawn from `seed`.
    pub fn set_jitter(&self, max: Duration, seed: u64) {
        *self.shared.jitter.lock().unwrap() = Some((max, fastrand::Rng::with_seed(seed)));
    }

    /// Whether an entry is stored for `id` now.
    pub fn holds(&self, id: &Digest) -> bool {
        let now = Instant::now();
        self.state()
            .entries
            .get(id)
            .is_some_and(|(_, until)| *until > now)
    }

    /// Commands answered so far.
    pub fn commands(&self) -> u64 {
        self.shared.commands.load(Ordering::SeqCst)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The delay and the outage every command goes through, then the command itself.
    async fn command<T>(&self, op: impl FnOnce(&mut State, Instant) -> T) -> Result<T, Down> {
        let delay = self
            .shared
            .jitter
            .lock()
            .unwrap()
            .as_mut()
            .map(|(max, rng)| max.mul_f64(rng.f64()));
        match delay {
            Some(delay) if !delay.is_zero() => tokio::time::sleep(delay).await,
            _ => tokio::task::yield_now().await,
        }
        if self.shared.down.load(Ordering::SeqCst) {
            return Err(Down);
        }
        self.shared.commands.fetch_add(1, Ordering::SeqCst);
        let now = Instant::now();
        let mut state = self.state();
        state.entries.retain(|_, (_, until)| *until > now);
        state.leases.retain(|_, (_, until)| *until > now);
        Ok(op(&mut state, now))
    }
}

impl State {
    fn publish(&mut self, notice: Notice) {
        self.subscribers.retain(|s| s.send(notice.clone()).is_ok());
    }

    fn delete(&mut self, id: &Digest) -> u64 {
        self.entries.remove(id);
        let version = self.versions.entry(*id).or_insert(0);
        *version += 1;
        let version = *version;
        self.publish(Notice::Invalidate { id: *id, version });
        version
    }
}

impl Fleet for MemoryFleet {
    type Lease = MemoryLease;

    fn is_up(&self) -> bool {
        !self.shared.down.load(Ordering::SeqCst)
    }

    async fn get(&self, id: &Digest) -> Result<(u64, Option<Vec<u8>>), Down> {
        self.command(|state, _| {
            let version = state.versions.get(id).copied().unwrap_or(0);
            (version, state.entries.get(id).map(|(v, _)| v.clone()))
        })
        .await
    }

    async fn put(
        &self,
        id: &Digest,
        expected: u64,
        sealed: &[u8],
        ttl: Duration,
        tokens: &[Digest],
    ) -> Result<bool, Down> {
        self.command(|state, now| {
            if state.versions.get(id).copied().unwrap_or(0) != expected {
                return false;
            }
            state.versions.insert(*id, expected + 1);
            state.entries.insert(*id, (sealed.to_vec(), now + ttl));
            for token in tokens {
                state.tokens.insert(*token, *id);
            }
            true
        })
        .await
    }

    async fn delete(&self, id: &Digest) -> Result<u64, Down> {
        self.command(|state, _| state.delete(id)).await
    }

    async fn delete_if(&self, id: &Digest, expected: u64) -> Result<Option<u64>, Down> {
        self.command(|state, _| {
            (state.versions.get(id).copied().unwrap_or(0) == expected).then(|| state.delete(id))
        })
        .await
    }

    async fn invalidate(&self, id: &Digest, version: u64) -> Result<(), Down> {
        self.command(|state, _| state.publish(Notice::Invalidate { id: *id, version }))
            .await
    }

    async fn find_token(&self, token: &Digest) -> Result<Option<Digest>, Down> {
        self.command(|state, _| state.tokens.get(token).copied())
            .await
    }

    async fn lease(&self, id: &Digest, ttl: Duration) -> Result<Option<MemoryLease>, Down> {
        let owner = self.shared.next_owner.fetch_add(1, Ordering::SeqCst);
        self.command(|state, now| {
            if state.leases.contains_key(id) {
                return None;
            }
            state.leases.insert(*id, (owner, now + ttl));
            Some(MemoryLease(owner))
        })
        .await
    }

    async fn extend(&self, id: &Digest, lease: &MemoryLease, ttl: Duration) -> Result<bool, Down> {
        self.command(|state, now| match state.leases.get_mut(id) {
            Some((owner, until)) if *owner == lease.0 => {
                *until = now + ttl;
                true
            }
            _ => false,
        })
        .await
    }

    async fn release(&self, id: &Digest, lease: MemoryLease) -> Result<(), Down> {
        self.command(|state, _| {
            if state
                .leases
                .get(id)
                .is_some_and(|(owner, _)| *owner == lease.0)
            {
                state.leases.remove(id);
            }
        })
        .await
    }

    async fn leased(&self, id: &Digest) -> Result<bool, Down> {
        self.command(|state, _| state.leases.contains_key(id)).await
    }
}
