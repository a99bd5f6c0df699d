//! What the broker needs of the state a fleet shares: versioned entries, a token index,
//! invalidation notices and leases. [`super::redis::RedisStore`] is the real one; the model
//! tests put an in-memory one with injected faults behind the same trait.

use std::future::Future;
use std::time::Duration;

use super::redis::{Down, Lease, RedisStore};
use crate::keys::Digest;

/// The fleet's shared store. Every call is bounded by the store's own timeout; `Err(Down)`
/// means this replica goes on alone for that step.
pub trait Fleet: Clone + Send + Sync + 'static {
    /// Proof of holding a lease.
    type Lease: Send + Sync + 'static;

    /// Whether the store answered lately (a replica skips it at once while it does not).
    fn is_up(&self) -> bool;

    /// The identity's current version, and its sealed entry when there is one. Versions
    /// never go back: a delete raises them too.
    fn get(&self, id: &Digest)
    -> impl Future<Output = Result<(u64, Option<Vec<u8>>), Down>> + Send;

    /// Writes `sealed` as version `expected + 1` if the version is still `expected`, and
    /// indexes each token digest to `id`; `Ok(false)` when another writer came first.
    fn put(
        &self,
        id: &Digest,
        expected: u64,
        sealed: &[u8],
        ttl: Duration,
        tokens: &[Digest],
    ) -> impl Future<Output = Result<bool, Down>> + Send;

    /// Deletes the entry, raises the version and tells every replica; the new version.
    fn delete(&self, id: &Digest) -> impl Future<Output = Result<u64, Down>> + Send;

    /// [`Fleet::delete`] only if the version is still `expected`; `None` when it moved.
    fn delete_if(
        &self,
        id: &Digest,
        expected: u64,
    ) -> impl Future<Output = Result<Option<u64>, Down>> + Send;

    /// Tells every replica that entries of `id` below `version` are dead.
    fn invalidate(
        &self,
        id: &Digest,
        version: u64,
    ) -> impl Future<Output = Result<(), Down>> + Send;

    /// The identity whose entry holds this token digest, if the index knows one.
    fn find_token(
        &self,
        token: &Digest,
    ) -> impl Future<Output = Result<Option<Digest>, Down>> + Send;

    /// Takes the lease on `id` for `ttl` if nobody holds it.
    fn lease(
        &self,
        id: &Digest,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<Self::Lease>, Down>> + Send;

    /// Extends a held lease to `ttl` from now; `Ok(false)` when it is no longer ours.
    fn extend(
        &self,
        id: &Digest,
        lease: &Self::Lease,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, Down>> + Send;

    /// Releases the lease if it is still ours.
    fn release(
        &self,
        id: &Digest,
        lease: Self::Lease,
    ) -> impl Future<Output = Result<(), Down>> + Send;

    /// Whether anyone holds the lease on `id`.
    fn leased(&self, id: &Digest) -> impl Future<Output = Result<bool, Down>> + Send;
}

impl Fleet for RedisStore {
    type Lease = Lease;

    fn is_up(&self) -> bool {
        RedisStore::is_up(self)
    }

    async fn get(&self, id: &Digest) -> Result<(u64, Option<Vec<u8>>), Down> {
        let stored = RedisStore::get(self, id).await?;
        Ok((stored.version, stored.sealed))
    }

    async fn put(
        &self,
        id: &Digest,
        expected: u64,
        sealed: &[u8],
        ttl: Duration,
        tokens: &[Digest],
    ) -> Result<bool, Down> {
        RedisStore::put(self, id, expected, sealed, ttl, tokens).await
    }

    async fn delete(&self, id: &Digest) -> Result<u64, Down> {
        RedisStore::delete(self, id).await
    }

    async fn delete_if(&self, id: &Digest, expected: u64) -> Result<Option<u64>, Down> {
        RedisStore::delete_if(self, id, expected).await
    }

    async fn invalidate(&self, id: &Digest, version: u64) -> Result<(), Down> {
        RedisStore::invalidate(self, id, version).await
    }

    async fn find_token(&self, token: &Digest) -> Result<Option<Digest>, Down> {
        RedisStore::find_token(self, token).await
    }

    async fn lease(&self, id: &Digest, ttl: Duration) -> Result<Option<Lease>, Down> {
        RedisStore::lease(self, id, ttl).await
    }

    async fn extend(&self, id: &Digest, lease: &Lease, ttl: Duration) -> Result<bool, Down> {
        RedisStore::extend(self, id, lease, ttl).await
    }

    async fn release(&self, id: &Digest, lease: Lease) -> Result<(), Down> {
        RedisStore::release(self, id, lease).await
    }

    async fn leased(&self, id: &Digest) -> Result<bool, Down> {
        RedisStore::leased(self, id).await
    }
}
