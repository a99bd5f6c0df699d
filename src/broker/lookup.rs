//! What is kept for a request and whether it answers: the local layer first, then the fleet's
//! store. Invalidation is never undone (I7): an entry older than the version a notice or a
//! delete announced, or holding a token revoked or rejected here, is never kept again, and
//! revocations made while Redis was down reach it before it is read again.

use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret as _;

use super::entry::{Entry, Settled, Upkeep};
use super::fleet::Fleet;
use super::flight::Landed;
use super::policy::{Freshness, Keep, Treatment, freshness};
use super::{Fetch, Inner};
use crate::grant::TokenRequest;
use crate::keys::{Digest, Purpose};

/// What is kept for a request, as far as answering it goes.
pub enum CacheLookup {
    /// An entry that answers now; `renew` when a renewal should start in the background.
    Answers { entry: Arc<Entry>, renew: bool },
    /// A one-time credential whose result was rejected: it is not sent again (I2).
    Spent,
    /// Nothing that answers. The entry a new result replaces, if any: its refresh token, its
    /// version and its polling interval still count.
    Miss(Option<Arc<Entry>>),
}

impl<F: Fetch, S: Fleet> Inner<F, S> {
    /// Whether what is kept for `id` answers `request` now, after a reported rejection.
    pub(super) async fn cached(
        &self,
        id: &Digest,
        request: &TokenRequest,
        treatment: Treatment,
    ) -> CacheLookup {
        // Whatever is kept, this replica never serves a token reported rejected (I7): the
        // entry may already hold a newer one while an older copy still sits in Redis.
        if let Some(rejected) = &request.rejected_access_token {
            self.revoke_reported(rejected.expose_secret());
        }
        let Some(mut entry) = self.lookup(id).await else {
            return CacheLookup::Miss(None);
        };
        if let Some(rejected) = &request.rejected_access_token
            && entry.holds_access_token(rejected.expose_secret())
        {
            self.revoke_locally(rejected.expose_secret());
            if treatment != Treatment::Cache {
                tracing::info!(id = ?id, "a replayed token was rejected; its credential is spent");
                self.spend(id, &entry).await;
                return CacheLookup::Spent;
            }
            tracing::info!(id = ?id, "the cached token was rejected; fetching a new one");
            match self.drop_rejected(id, &entry).await {
                // Another replica replaced it already: that one answers.
                Some(newer) => entry = newer,
                // Its refresh token may still renew it.
                None => return CacheLookup::Miss(Some(entry)),
            }
        }
        // Read before the rejection or revocation that ended it reached this layer: this
        // replica never serves that token again (I7).
        if treatment == Treatment::Cache && self.holds_revoked(&entry) {
            self.local.invalidate(id);
            return CacheLookup::Miss(Some(entry));
        }
        let now = self.clock.now();
        match freshness(&entry.keep, now) {
            Freshness::Spent => CacheLookup::Miss(Some(entry)),
            _ if matches!(entry.settled, Settled::Spent) => CacheLookup::Spent,
            Freshness::Fresh => CacheLookup::Answers {
                entry,
                renew: false,
            },
            Freshness::Renew => {
                // The renewal will spend the kept refresh token, which ends this access
                // token: wait for the new one rather than take one about to die (I10).
                let renewal_ends_it =
                    self.refresh_ends_access_token && entry.refresh_token().is_some();
                if renewal_ends_it {
                    CacheLookup::Miss(Some(entry))
                } else {
                    // Still good: nothing the renewal does ends it.
                    CacheLookup::Answers { entry, renew: true }
                }
            }
        }
    }

    /// An answer that a flight kept since this call looked (checked under the flights'
    /// lock): a local entry that answers and is not the one this call found wanting.
    pub(super) fn landed_meanwhile(
        &self,
        id: &Digest,
        treatment: Treatment,
        previous: Option<&Arc<Entry>>,
    ) -> Option<Landed> {
        let entry = self.local.get(id)?;
        if previous.is_some_and(|p| Arc::ptr_eq(p, &entry) || entry.version <= p.version) {
            return None;
        }
        if self.holds_revoked(&entry) {
            return None;
        }
        match freshness(&entry.keep, self.clock.now()) {
            Freshness::Fresh => Some(self.served(&entry, treatment, true)),
            Freshness::Renew | Freshness::Spent => None,
        }
    }

    /// The store while it answers, with this replica's revocations from an outage applied
    /// first. While it is down every call skips it at once instead of waiting out
    /// `cache.redis.timeout` per command; its health check notices when it is back.
    pub(super) async fn fleet(&self) -> Option<&S> {
        let fleet = self.fleet.as_ref().filter(|fleet| fleet.is_up())?;
        let pending = std::mem::take(
            &mut *self
                .pending_revocations
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        if pending.is_empty() {
            return Some(fleet);
        }
        for (i, token) in pending.iter().enumerate() {
            if self.revoke_in_fleet(fleet, token).await.is_err() {
                self.pending_revocations
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&pending[i..]);
                return None;
            }
        }
        Some(fleet)
    }

    /// The entry kept for `id`: the local layer's while it may answer, else the fleet's.
    async fn lookup(&self, id: &Digest) -> Option<Arc<Entry>> {
        let local = self.local.get(id);
        if let Some(entry) = &local
            && freshness(&entry.keep, self.clock.now()) != Freshness::Spent
        {
            return local;
        }
        let Some(fleet) = self.fleet().await else {
            return local;
        };
        match self.fleet_entry(fleet, id).await {
            // Returned even when not kept (it holds a token revoked here): the caller drops it
            // in Redis too, or goes around it.
            Ok((_, Some(entry))) => {
                self.keep_locally(id, entry.clone());
                Some(entry)
            }
            _ => local,
        }
    }

    /// The version Redis holds for `id` and its entry, opened; an entry that does not open
    /// under the cache key is dropped and read as none.
    pub(super) async fn fleet_entry(
        &self,
        fleet: &S,
        id: &Digest,
    ) -> Result<(u64, Option<Arc<Entry>>), super::redis::Down> {
        let (version, sealed) = fleet.get(id).await?;
        let Some(sealed) = sealed else {
            return Ok((version, None));
        };
        let entry = self
            .keys
            .open(Purpose::Entry, id, &sealed)
            .ok()
            .and_then(|plain| Entry::decode(version, &plain));
        if entry.is_none() {
            tracing::warn!(
                id = ?id,
                "a value in redis does not open under the cache key; dropped and treated as a miss"
            );
            let version = fleet.delete_if(id, version).await?.unwrap_or(version);
            return Ok((version, None));
        }
        Ok((version, entry.map(Arc::new)))
    }

    /// Keeps an entry in the local layer unless it is older than what was invalidated or
    /// holds a token revoked here; `false` when it was refused.
    pub(super) fn keep_locally(&self, id: &Digest, entry: Arc<Entry>) -> bool {
        if self
            .floors
            .get(id)
            .is_some_and(|floor| entry.version < floor)
        {
            return false;
        }
        let digests: Vec<Digest> = entry
            .tokens()
            .into_iter()
            .map(|t| self.keys.token_digest(t))
            .collect();
        if digests.iter().any(|d| self.revoked.contains_key(d)) {
            return false;
        }
        for digest in digests {
            self.by_token.insert(digest, *id);
        }
        self.local.insert(*id, entry);
        true
    }

    /// Whether an entry holds a token revoked or rejected through this replica.
    pub(super) fn holds_revoked(&self, entry: &Entry) -> bool {
        // Hits pay for the digests only on a replica that has revoked something.
        self.any_revoked.load(std::sync::atomic::Ordering::Acquire)
            && entry
                .tokens()
                .into_iter()
                .any(|t| self.revoked.contains_key(&self.keys.token_digest(t)))
    }

    /// A notice or a delete says entries of `id` below `version` are dead.
    pub(super) fn raise_floor(&self, id: &Digest, version: u64) {
        let floor = self.floors.get(id).unwrap_or(0).max(version);
        self.floors.insert(*id, floor);
        if self.local.get(id).is_some_and(|e| e.version < floor) {
            self.local.invalidate(id);
        }
    }

    /// Drops a rejected entry here and, if Redis still holds that token, there. Returns the
    /// entry Redis holds instead when another replica has replaced it already.
    async fn drop_rejected(&self, id: &Digest, rejected: &Entry) -> Option<Arc<Entry>> {
        self.local.invalidate(id);
        let fleet = self.fleet().await?;
        let token = rejected.access_token()?;
        // Between the read and the delete, another replica may write the entry again with
        // the same token (a failed renewal keeps it on, under a new version): look again.
        for _ in 0..3 {
            let (version, shared) = self.fleet_entry(fleet, id).await.ok()?;
            let shared = shared?;
            if !shared.holds_access_token(token) {
                return self.keep_locally(id, shared.clone()).then_some(shared);
            }
            match fleet.delete_if(id, version).await {
                Ok(Some(new)) => {
                    self.raise_floor(id, new);
                    return None;
                }
                Ok(None) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// Replaces a replayed result whose token was rejected with a marker that answers
    /// `CREDENTIAL_SPENT` for the rest of its window, here and in Redis.
    async fn spend(&self, id: &Digest, entry: &Entry) {
        let fleet = self.fleet().await;
        self.spend_in(fleet, id, entry).await;
    }

    /// [`Inner::spend`] with the store already in hand (or none).
    async fn spend_in(&self, fleet: Option<&S>, id: &Digest, entry: &Entry) {
        let now = self.clock.now();
        let left = entry
            .keep
            .serve_until
            .duration_since(now)
            .unwrap_or_default()
            .max(Duration::from_millis(1));
        let keep = Keep {
            ttl: left,
            ..entry.keep
        };
        let mut spent = Entry {
            version: entry.version + 1,
            keep,
            settled: Settled::Spent,
            failures: 0,
            upkeep: Upkeep::default(),
        };
        if let Some(fleet) = fleet {
            let sealed = self.keys.seal(Purpose::Entry, id, &spent.encode());
            match fleet.put(id, entry.version, &sealed, left, &[]).await {
                Ok(true) => {
                    let _ = fleet.invalidate(id, spent.version).await;
                }
                // Someone wrote first: read what they wrote next time, but never this token.
                Ok(false) => {
                    self.local.invalidate(id);
                    return;
                }
                Err(_) => spent.version = entry.version,
            }
        }
        self.local.insert(*id, Arc::new(spent));
    }

    /// Adds a reported token to the revoked set without touching the entry holding it (the
    /// rejection path that follows decides about that).
    fn revoke_reported(&self, token: &str) {
        self.revoked.insert(self.keys.token_digest(token), ());
        self.any_revoked
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// This replica never serves `token` again.
    fn revoke_locally(&self, token: &str) {
        self.revoke_reported(token);
        let digest = self.keys.token_digest(token);
        if let Some(id) = self.by_token.get(&digest) {
            // A spent marker stays: it is what keeps the credential from going out again.
            if !self
                .local
                .get(&id)
                .is_some_and(|e| matches!(e.settled, Settled::Spent))
            {
                self.local.invalidate(&id);
            }
            self.by_token.invalidate(&digest);
        }
    }

    /// Drops every entry that holds `token` here at once, and in Redis now or, while it is
    /// down, before this replica reads from it again. A replayed one-time grant's result is
    /// not dropped but spent: dropping it would let an identical request send its code or
    /// refresh token a second time (I1).
    pub(super) async fn forget(&self, token: &str) {
        let digest = self.keys.token_digest(token);
        if let Some(id) = self.by_token.get(&digest)
            && let Some(entry) = self.local.get(&id)
            && replayed(&entry)
        {
            self.revoke_locally(token);
            self.spend(&id, &entry).await;
        } else {
            self.revoke_locally(token);
        }
        if self.fleet.is_none() {
            return;
        }
        let done = match self.fleet().await {
            Some(fleet) => self.revoke_in_fleet(fleet, &digest).await.is_ok(),
            None => false,
        };
        if !done {
            self.pending_revocations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(digest);
        }
    }

    /// Drops (or, for a replayed result, spends) the fleet's entry holding the token with
    /// this digest, if any.
    async fn revoke_in_fleet(&self, fleet: &S, token: &Digest) -> Result<(), super::redis::Down> {
        let Some(id) = fleet.find_token(token).await? else {
            return Ok(());
        };
        let (_, entry) = self.fleet_entry(fleet, &id).await?;
        let Some(entry) = entry else {
            return Ok(());
        };
        let holds = entry
            .tokens()
            .into_iter()
            .any(|t| self.keys.token_digest(t) == *token);
        if !holds {
            // Renewed since: the token is in no entry any more.
            return Ok(());
        }
        if replayed(&entry) {
            self.spend_in(Some(fleet), &id, &entry).await;
        } else {
            let version = fleet.delete(&id).await?;
            self.raise_floor(&id, version);
        }
        Ok(())
    }
}

/// Whether an entry is a replayed one-time grant's token (a cached one has a renewal point).
fn replayed(entry: &Entry) -> bool {
    matches!(entry.settled, Settled::Token(_)) && entry.keep.renew_at.is_none()
}

/// Whether an entry's refresh token may still be used at `now`.
pub(super) fn refresh_alive(token: &crate::upstream::Token, now: std::time::SystemTime) -> bool {
    token.refresh_token_expires_in.is_none_or(|secs| {
        token
            .counted_from
            .checked_add(Duration::from_secs(secs))
            .is_none_or(|end| end > now)
    })
}
