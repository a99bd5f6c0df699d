//! A held fleet lease (contract §8.1 I6): it covers its holder's whole work because it is
//! extended while the holder works, and the holder never sends an upstream attempt once it has
//! run out by the holder's own clock. A holder that stops (SIGSTOP, a GC-like pause) loses it
//! to the TTL; when it wakes, its own clock says so before anything is sent.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::fleet::Fleet;
use crate::keys::Digest;
use crate::upstream::Precondition;

/// Whether the lease still holds, by the holder's clock; shared with the keeper task.
#[derive(Debug)]
pub struct LeaseClock {
    /// Counted from just before the command that set or extended it was sent.
    valid_until: Mutex<Instant>,
    lost: AtomicBool,
}

impl LeaseClock {
    fn new(valid_until: Instant) -> Self {
        Self {
            valid_until: Mutex::new(valid_until),
            lost: AtomicBool::new(false),
        }
    }

    fn extended(&self, to: Instant) {
        let mut until = self.valid_until.lock().unwrap_or_else(|e| e.into_inner());
        *until = (*until).max(to);
    }
}

impl Precondition for LeaseClock {
    fn holds(&self) -> bool {
        !self.lost.load(Ordering::Acquire)
            && Instant::now() < *self.valid_until.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A lease this replica holds, kept alive until it is released or dropped.
pub struct HeldLease<S: Fleet> {
    fleet: S,
    id: Digest,
    /// Taken by [`HeldLease::release`].
    lease: Option<Arc<S::Lease>>,
    clock: Arc<LeaseClock>,
    keeper: JoinHandle<()>,
}

impl<S: Fleet> HeldLease<S> {
    /// Starts keeping a lease taken with `ttl` by a command sent at `asked_at`.
    pub fn keep(fleet: S, id: Digest, lease: S::Lease, ttl: Duration, asked_at: Instant) -> Self {
        let lease = Arc::new(lease);
        let clock = Arc::new(LeaseClock::new(asked_at + ttl));
        let keeper = tokio::spawn(extend_while_held(
            fleet.clone(),
            id,
            lease.clone(),
            clock.clone(),
            ttl,
        ));
        Self {
            fleet,
            id,
            lease: Some(lease),
            clock,
            keeper,
        }
    }

    /// What an upstream attempt checks before it is sent.
    pub fn clock(&self) -> &LeaseClock {
        &self.clock
    }

    /// Stops extending and releases the lease if it is still ours.
    pub async fn release(mut self) {
        self.keeper.abort();
        // The keeper has let go of its copy once aborted and polled; until then the lease
        // simply runs out.
        tokio::task::yield_now().await;
        if let Some(Ok(lease)) = self.lease.take().map(Arc::try_unwrap) {
            let _ = self.fleet.release(&self.id, lease).await;
        }
    }
}

impl<S: Fleet> Drop for HeldLease<S> {
    fn drop(&mut self) {
        // Released or not, nothing extends it any more; an unreleased one runs out.
        self.keeper.abort();
    }
}

/// Extends the lease every third of its TTL. A lease found taken by someone else is lost for
/// good; a store that does not answer leaves it to run out by the clock.
async fn extend_while_held<S: Fleet>(
    fleet: S,
    id: Digest,
    lease: Arc<S::Lease>,
    clock: Arc<LeaseClock>,
    ttl: Duration,
) {
    let every = (ttl / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        let asked_at = Instant::now();
        match fleet.extend(&id, &lease, ttl).await {
            Ok(true) => clock.extended(asked_at + ttl),
            Ok(false) => {
                clock.lost.store(true, Ordering::Release);
                return;
            }
            Err(_) => {}
        }
    }
}
