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
use crate::rate_limit::{GuardKeys, RateLimitGuard, RequestPenalty};
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
    user: Option<String>,
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
        let keys = GuardKeys::new(
            &self.keys,
            client.client_id.unwrap_or_default(),
            request.user.as_deref(),
        );
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
            user: call.user.map(str::to_owned).or_else(|| request.user()),
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
