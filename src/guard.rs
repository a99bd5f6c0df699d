//! The upstream rate-limit guard. RingCentral restarts its 60 s penalty on every request
//! made during it, so after a 429 tokengate stops sending for that client (or that user of
//! the client) until `Retry-After` has passed, and answers callers locally instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Whom a 429 penalises: one user of a client when the request names the user, otherwise
/// the whole client (RingCentral counts the Auth group per user and app).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GuardKey {
    pub client_id: String,
    pub user: Option<String>,
}

/// Penalties in force, each with the instant it ends.
#[derive(Debug, Default)]
pub struct RateLimitGuard {
    until: Mutex<HashMap<GuardKey, Instant>>,
}

impl RateLimitGuard {
    /// How long requests for `client_id` (as `user`, if known) must still wait, if at all.
    /// A client-wide penalty applies to every user of the client.
    pub fn remaining(&self, client_id: &str, user: Option<&str>) -> Option<Duration> {
        let now = Instant::now();
        let until = self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if until.is_empty() {
            return None;
        }
        let lookup = |user: Option<&str>| {
            let key = GuardKey {
                client_id: client_id.to_owned(),
                user: user.map(str::to_owned),
            };
            until.get(&key).copied().filter(|end| *end > now)
        };
        let end = match (lookup(None), user.and_then(|u| lookup(Some(u)))) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b)?,
        };
        Some(end - now)
    }

    /// Records a 429: nothing more is sent for `key` for `wait`.
    pub fn penalise(&self, key: GuardKey, wait: Duration) {
        let now = Instant::now();
        // Capped like Retry-After itself, so no wait can overflow the clock.
        let end = now + wait.min(crate::upstream::MAX_RETRY_AFTER);
        let mut until = self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget ended penalties so the map stays as small as the set of limited users.
        until.retain(|_, end| *end > now);
        let entry = until.entry(key).or_insert(end);
        *entry = (*entry).max(end);
    }
}

/// The `sub` claim of a JWT, read without verifying it: it only names whom a penalty is for.
pub fn jwt_subject(jwt: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Claims {
        sub: Option<String>,
    }
    serde_json::from_slice::<Claims>(&bytes)
        .ok()?
        .sub
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(client: &str, user: Option<&str>) -> GuardKey {
        GuardKey {
            client_id: client.into(),
            user: user.map(Into::into),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_penalty_blocks_that_user_only_until_it_ends() {
        let guard = RateLimitGuard::default();
        guard.penalise(key("app", Some("alice")), Duration::from_secs(60));
        assert_eq!(
            guard.remaining("app", Some("alice")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(guard.remaining("app", Some("bob")), None);
        assert_eq!(guard.remaining("app", None), None);
        assert_eq!(guard.remaining("other", Some("alice")), None);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(
            guard.remaining("app", Some("alice")),
            Some(Duration::from_secs(1))
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(guard.remaining("app", Some("alice")), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_penalty_blocks_every_user_and_the_longer_penalty_wins() {
        let guard = RateLimitGuard::default();
        guard.penalise(key("app", None), Duration::from_secs(30));
        guard.penalise(key("app", Some("alice")), Duration::from_secs(45));
        guard.penalise(key("app", None), Duration::from_secs(10));
        assert_eq!(
            guard.remaining("app", Some("bob")),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            guard.remaining("app", Some("alice")),
            Some(Duration::from_secs(45))
        );
        assert_eq!(guard.remaining("app", None), Some(Duration::from_secs(30)));
    }

    #[test]
    fn the_subject_of_a_jwt_is_read_without_verifying() {
        // {"alg":"none"}.{"sub":"user-42","iss":"x"}.sig
        let jwt = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1c2VyLTQyIiwiaXNzIjoieCJ9.c2ln";
        assert_eq!(jwt_subject(jwt).as_deref(), Some("user-42"));
        assert_eq!(jwt_subject("not-a-jwt"), None);
        assert_eq!(jwt_subject("a.!!!.c"), None);
        assert_eq!(
            jwt_subject("eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0.c2ln"),
            None,
            "no sub"
        );
    }
}
