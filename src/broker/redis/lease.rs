//! Fleet-wide leases: one replica calls upstream for an identity while the others wait for
//! its result. A lease only saves calls (the version-checked write keeps the data right), so
//! each holder proves itself with a random owner token, never a fencing token.

use std::borrow::Borrow;
use std::time::Duration;

use super::store::{Down, RedisStore, millis};
use crate::keys::Digest;

/// `release`: deletes the lease only if it still holds this owner's token.
pub(super) const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// `extend`: a new TTL for the lease only if it still holds this owner's token.
pub(super) const EXTEND_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Proof of holding a fleet-wide lease: a random owner token, so that a holder whose lease
/// expired cannot release or extend the next holder's.
#[derive(Debug)]
pub struct Lease {
    owner: String,
}

impl RedisStore {
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

    /// Makes the lease on `id` last `ttl` from now, if it is still this one's
    /// (compare-and-`PEXPIRE`): `Ok(false)` when it expired, and maybe went to another
    /// holder, meanwhile. A holder whose work outlasts its TTL calls this while it works.
    pub async fn extend(&self, id: &Digest, lease: &Lease, ttl: Duration) -> Result<bool, Down> {
        let inner = &self.inner;
        inner
            .call(inner.timeout, |mut conn| async move {
                inner
                    .extend
                    .key(inner.names.lease(id))
                    .arg(&lease.owner)
                    .arg(millis(ttl))
                    .invoke_async::<i64>(&mut conn)
                    .await
                    .map(|extended| extended == 1)
            })
            .await
    }

    /// Releases the lease on `id` only if it is still this one's (compare-and-delete): after
    /// an expiry another replica may hold it. Takes the lease or a reference to it.
    pub async fn release(&self, id: &Digest, lease: impl Borrow<Lease>) -> Result<(), Down> {
        let inner = &self.inner;
        let owner = &lease.borrow().owner;
        inner
            .call(inner.timeout, |mut conn| async move {
                inner
                    .release
                    .key(inner.names.lease(id))
                    .arg(owner)
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
}
