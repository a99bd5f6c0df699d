//! The direct way to a token: authenticate the client, respect the rate-limit guard, wait
//! for a turn, and POST. The broker wraps it; a pass-through client uses it as it is.

use std::sync::Arc;

use tokio::time::Instant;

use crate::admission::{Admission, Refusal};
use crate::broker::{Call, Fetch};
use crate::client::Clients;
use crate::error::Failure;
use crate::grant::{FormField, RevokeRequest, TokenRequest};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::rate_limit::{GuardKeys, RateLimitGuard, RequestPenalty, User};
use crate::upstream::{Outgoing, Replay, Token, Upstream, UpstreamErrorKind};

/// How long after a refresh RingCentral answers the same refresh token identically, so a
/// re-send cannot spend it twice (upstream reference §9: "about 10 s").
const REFRESH_REPLAY_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug)]
pub struct Direct {
    pub clients: Arc<Clients>,
    pub upstream: Upstream,
    pub guard: Arc<RateLimitGuard>,
    pub admission: Admission,
    /// Names penalties without naming clients or users.
    pub keys: Arc<Keys>,
    /// Counts refusals under a penalty and calls shed.
    pub metrics: Arc<Metrics>,
}

/// One request as the upstream will see it, before client authentication.
struct Request<'a> {
    client_id: Option<&'a str>,
    assertion: Option<&'a secrecy::SecretString>,
    grant: Option<crate::grant::GrantKind>,
    /// Whom a 429 penalises besides the client; only ever hashed into [`GuardKeys`].
    user: Option<User<'a>>,
    fields: Vec<FormField<'a>>,
    replay: Replay,
    lease: Option<&'a dyn crate::upstream::Precondition>,
}

/// Which endpoint a request goes to, and so what it answers.
enum Endpoint {
    Token,
    Revoke,
}

impl Direct {
    /// Checks the client, holds back while a penalty is in force, waits for a turn, and only
    /// then authenticates (signing an assertion costs CPU that a shed call must not burn) and
    /// sends. Answers a token from the token endpoint, nothing from revocation.
    async fn send(
        &self,
        request: Request<'_>,
        endpoint: Endpoint,
        deadline: Option<Instant>,
    ) -> Result<Option<Token>, Failure> {
        let client = self
            .clients
            .check(
                request.client_id,
                request.assertion.is_some(),
                request.grant,
            )
            .map_err(Failure::Client)?;
        let keys = GuardKeys::of(
            &self.keys,
            client.client_id.unwrap_or_default(),
            request.user.as_ref(),
        );
        // This replica's own knowledge, before queueing for a turn; the fleet's is checked
        // before every attempt (`Penalty::remaining`).
        if let Some(wait) = self.guard.remaining(&keys) {
            self.metrics.rate_limit_refusal();
            return Err(Failure::RateLimited(wait));
        }
        let _turn = self
            .admission
            .admit(deadline)
            .await
            .map_err(|refusal| match refusal {
                Refusal::Overloaded | Refusal::WaitedTooLong => {
                    self.metrics.call_shed();
                    Failure::Overloaded
                }
                Refusal::DeadlineExceeded => Failure::DeadlineExceeded,
            })?;
        let auth = self
            .clients
            .resolve(request.client_id, request.assertion, request.grant)
            .map_err(Failure::Client)?;
        let caller_credentials = auth.from_caller();
        let mut fields = request.fields;
        auth.push_fields(&mut fields);
        let penalty = RequestPenalty {
            guard: &self.guard,
            keys,
        };
        let outgoing = Outgoing {
            fields,
            basic: auth.basic(),
            replay: request.replay,
            penalty: Some(&penalty),
            lease: request.lease,
        };
        let result = match endpoint {
            Endpoint::Token => self.upstream.token(&outgoing, deadline).await.map(Some),
            Endpoint::Revoke => self
                .upstream
                .revoke(&outgoing, deadline)
                .await
                .map(|()| None),
        };
        result.map_err(|error| match error.kind {
            UpstreamErrorKind::Held(wait) => {
                self.metrics.rate_limit_refusal();
                Failure::RateLimited(wait)
            }
            _ => Failure::Upstream {
                error,
                caller_credentials,
            },
        })
    }

    /// Revokes a token at the upstream.
    pub async fn revoke(
        &self,
        request: &RevokeRequest,
        deadline: Option<Instant>,
    ) -> Result<(), Failure> {
        let request = Request {
            client_id: request.client_id.as_deref(),
            assertion: request.client_assertion.as_ref(),
            grant: None,
            user: None,
            fields: request.form_fields(),
            replay: Replay::Always,
            lease: None,
        };
        self.send(request, Endpoint::Revoke, deadline)
            .await
            .map(drop)
    }
}

impl Fetch for Direct {
    async fn fetch(&self, request: &TokenRequest, call: Call<'_>) -> Result<Token, Failure> {
        use crate::grant::GrantKind;
        let kind = request.grant.kind();
        let replay = match kind {
            GrantKind::AuthorizationCode => Replay::Never,
            GrantKind::RefreshToken => Replay::Within(REFRESH_REPLAY_WINDOW),
            _ => Replay::Always,
        };
        let sent = Request {
            client_id: request.client_id.as_deref(),
            assertion: request.client_assertion.as_ref(),
            grant: Some(kind),
            user: call
                .user
                .map(|user| User::Named(user.into()))
                .or_else(|| request.penalty_user()),
            fields: request.form_fields(),
            replay,
            lease: call.lease,
        };
        let token = self.send(sent, Endpoint::Token, call.deadline).await?;
        Ok(token.expect("the token endpoint answers a token or an error"))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use super::*;
    use crate::config::Config;
    use crate::grant::Grant;

    use crate::rate_limit::SharedPenalties;
    use crate::rate_limit::testing::{DownPenalties, MemoryPenalties, SilentPenalties};

    const RETRY_AFTER: Duration = Duration::from_secs(60);
    /// How long a call may take before the test gives up on it (a bound, not a timing).
    const PATIENCE: Duration = Duration::from_secs(10);

    /// A replica's direct path to `upstream` for public clients, sharing penalties through
    /// `store` only: no pub/sub copy ever reaches it. Replicas share the cache key.
    fn replica(
        upstream: &testkit::CountingUpstream,
        keys: &Arc<Keys>,
        store: Arc<dyn SharedPenalties>,
    ) -> Direct {
        let config = Config::from_toml(&format!(
            "[upstream]\nbase_url = \"{}\"\nallow_insecure_http = true\n",
            upstream.url()
        ))
        .unwrap();
        let metrics = Arc::new(Metrics::new(["app"]));
        let upstream = Upstream::new(&config.upstream, metrics.clone()).unwrap();
        let clients =
            Arc::new(Clients::new(&config.clients, upstream.token_url().as_str()).unwrap());
        Direct {
            clients,
            upstream,
            guard: Arc::new(
                RateLimitGuard::new(Some(store)).with_patience(Duration::from_millis(20)),
            ),
            admission: Admission::new(4, 4, PATIENCE),
            keys: keys.clone(),
            metrics,
        }
    }

    fn token_request(grant: Grant) -> TokenRequest {
        TokenRequest {
            grant,
            client_id: Some("app".into()),
            client_assertion: None,
            scopes: Vec::new(),
            endpoint_id: None,
            access_token_ttl: None,
            refresh_token_ttl: None,
            rejected_access_token: None,
        }
    }

    fn password(user: &str) -> TokenRequest {
        token_request(Grant::Password {
            username: user.into(),
            password: "pw".to_owned().into(),
            extension: None,
            pin: None,
        })
    }

    fn refresh(token: &str) -> TokenRequest {
        token_request(Grant::RefreshToken {
            refresh_token: token.to_owned().into(),
        })
    }

    async fn fetch(direct: &Direct, request: &TokenRequest) -> Result<Token, Failure> {
        tokio::time::timeout(PATIENCE, direct.fetch(request, Call::default()))
            .await
            .expect("the call ends")
    }

    /// The upstream's own 429, passed on.
    fn assert_passed_on_429(result: Result<Token, Failure>) {
        match result {
            Err(Failure::Upstream { error, .. })
                if error.kind == UpstreamErrorKind::RateLimited => {}
            other => panic!("expected the upstream's 429, got {other:?}"),
        }
    }

    /// Refused here, with the wait that is left of the upstream's `Retry-After`.
    fn assert_held_back(result: Result<Token, Failure>) {
        match result {
            Err(failure @ Failure::RateLimited(wait)) => {
                assert_eq!(crate::error::reason(&failure), "UPSTREAM_RATE_LIMITED");
                assert!(
                    wait > RETRY_AFTER - Duration::from_secs(5) && wait <= RETRY_AFTER,
                    "{wait:?}"
                );
            }
            other => panic!("expected a local UPSTREAM_RATE_LIMITED, got {other:?}"),
        }
    }

    fn alice_keys(keys: &Keys) -> Vec<crate::keys::Digest> {
        MemoryPenalties::keys_of(&GuardKeys::new(keys, "app", Some("alice")))
    }

    /// I4: replica a passes a 429 on for alice; replica b, which shares only the store
    /// with it (no pub/sub), sends nothing for alice and answers the wait that is left.
    /// The 429 named its user, so bob of the same client still goes upstream.
    #[tokio::test]
    async fn a_429_passed_on_by_one_replica_holds_back_another_through_the_store_alone() {
        let upstream = testkit::CountingUpstream::start(Duration::ZERO);
        let keys = Arc::new(Keys::new(None));
        let store = Arc::new(MemoryPenalties::default());
        let a = replica(&upstream, &keys, store.clone());
        let b = replica(&upstream, &keys, store.clone());

        upstream.rate_limit_next(1, RETRY_AFTER);
        assert_passed_on_429(fetch(&a, &password("alice")).await);
        assert_eq!(upstream.token_posts(), 1);

        assert_held_back(fetch(&b, &password("alice")).await);
        assert_eq!(
            upstream.token_posts(),
            1,
            "b sent nothing:{}",
            upstream.summary()
        );
        assert!(
            b.guard
                .remaining(&GuardKeys::new(&keys, "app", Some("alice")))
                .is_some()
        );

        fetch(&b, &password("bob"))
            .await
            .expect("bob is not held back");
        assert_eq!(upstream.token_posts(), 2);
    }

    /// I4: the penalty is in the store by the time the answer that passes the 429 on
    /// leaves: read at once, without waiting for anything.
    #[tokio::test]
    async fn the_store_holds_the_penalty_when_the_429_is_answered() {
        let upstream = testkit::CountingUpstream::start(Duration::ZERO);
        let keys = Arc::new(Keys::new(None));
        let store = Arc::new(MemoryPenalties::default());
        let a = replica(&upstream, &keys, store.clone());

        upstream.rate_limit_next(1, RETRY_AFTER);
        assert_passed_on_429(fetch(&a, &password("alice")).await);
        let until = store
            .held(&alice_keys(&keys))
            .expect("the penalty is in the store");
        assert!(until > std::time::SystemTime::now() + RETRY_AFTER - Duration::from_secs(5));
    }

    /// F8: a refresh is one user's session, so its 429 holds back that refresh token only:
    /// a password grant for another user of the client, and another session's refresh,
    /// still go upstream.
    #[tokio::test]
    async fn a_429_on_a_refresh_penalises_that_session_not_the_client() {
        let upstream = testkit::CountingUpstream::start(Duration::ZERO);
        let keys = Arc::new(Keys::new(None));
        let store = Arc::new(MemoryPenalties::default());
        let a = replica(&upstream, &keys, store.clone());
        let b = replica(&upstream, &keys, store.clone());
        let (_, limited) = upstream.issue_pair();
        let (_, other) = upstream.issue_pair();

        upstream.rate_limit_next(1, RETRY_AFTER);
        assert_passed_on_429(fetch(&a, &refresh(&limited)).await);
        assert_eq!(upstream.token_posts(), 1);

        fetch(&b, &password("alice"))
            .await
            .expect("the client is not held back");
        assert_eq!(upstream.token_posts(), 2);
        assert_held_back(fetch(&b, &refresh(&limited)).await);
        assert_held_back(fetch(&a, &refresh(&limited)).await);
        assert_eq!(upstream.token_posts(), 2, "{}", upstream.summary());
        fetch(&b, &refresh(&other))
            .await
            .expect("another session is not held back");
        assert_eq!(upstream.token_posts(), 3);
    }

    /// §8: Redis is never a source of failure. A store that hangs, or answers nothing,
    /// neither blocks nor fails a call; the replica still holds back on its own 429s.
    #[tokio::test]
    async fn a_store_that_does_not_answer_never_blocks_or_fails_a_call() {
        let upstream = testkit::CountingUpstream::start(Duration::ZERO);
        let keys = Arc::new(Keys::new(None));
        let stores: [Arc<dyn SharedPenalties>; 2] =
            [Arc::new(SilentPenalties), Arc::new(DownPenalties)];
        for (n, store) in stores.into_iter().enumerate() {
            let direct = replica(&upstream, &keys, store);
            let posts = upstream.token_posts();
            fetch(&direct, &password("alice"))
                .await
                .expect("a call goes through");
            upstream.rate_limit_next(1, RETRY_AFTER);
            assert_passed_on_429(fetch(&direct, &password("bob")).await);
            assert_held_back(fetch(&direct, &password("bob")).await);
            assert_eq!(upstream.token_posts(), posts + 2, "store {n}");
        }
    }

    /// Signing an RSA assertion costs far more than shedding a call: under overload, the
    /// call is refused before anything is signed.
    #[tokio::test]
    async fn a_shed_call_signs_no_assertion() {
        let key = format!(
            "{}/tests/fixtures/keys/rsa-a.pem",
            env!("CARGO_MANIFEST_DIR")
        );
        let config = Config::from_toml(&format!(
            "[upstream]\nbase_url = \"http://127.0.0.1:9\"\nallow_insecure_http = true\n\
             [[clients.registered]]\nclient_id = \"pk\"\nauth_method = \"private_key_jwt\"\n\
             private_key_file = \"{key}\"\n"
        ))
        .unwrap();
        let metrics = Arc::new(Metrics::new(["pk"]));
        let upstream = Upstream::new(&config.upstream, metrics.clone()).unwrap();
        let clients =
            Arc::new(Clients::new(&config.clients, upstream.token_url().as_str()).unwrap());
        let [signer] = &clients.signers()[..] else {
            panic!("one signing client")
        };
        let signer = signer.clone();
        let direct = Direct {
            clients,
            upstream,
            guard: Arc::new(RateLimitGuard::new(None)),
            admission: Admission::new(1, 0, Duration::from_secs(1)),
            keys: Arc::new(Keys::new(None)),
            metrics,
        };
        let _every_slot = direct.admission.admit(None).await.unwrap();
        let request = TokenRequest {
            grant: Grant::ClientCredentials { subject: None },
            client_id: Some("pk".into()),
            client_assertion: None,
            scopes: Vec::new(),
            endpoint_id: None,
            access_token_ttl: None,
            refresh_token_ttl: None,
            rejected_access_token: None,
        };
        let refused = direct.fetch(&request, Call::default()).await.unwrap_err();
        assert!(matches!(refused, Failure::Overloaded), "{refused:?}");
        assert_eq!(
            signer.signed.load(Ordering::Relaxed),
            0,
            "nothing was signed"
        );
    }
}
