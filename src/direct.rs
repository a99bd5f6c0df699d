//! The direct way to a token: authenticate the client, respect the rate-limit guard, wait
//! for a turn, and POST. The broker wraps it; a pass-through client uses it as it is.

use std::sync::Arc;

use tokio::time::Instant;

use crate::admission::{Admission, Refusal};
use crate::broker::Fetch;
use crate::broker::guard::{GuardKeys, RateLimitGuard, RequestPenalty};
use crate::broker::keys::Keys;
use crate::client::Clients;
use crate::error::Failure;
use crate::grant::{FormField, RevokeRequest, TokenRequest};
use crate::metrics::Metrics;
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
}

/// Which endpoint a request goes to, and so what it answers.
enum Endpoint {
    Token,
    Revoke,
}

impl Direct {
    /// Authenticates the client, holds back while a penalty is in force, waits for a turn
    /// and sends. Answers a token from the token endpoint, nothing from revocation.
    async fn send(
        &self,
        request: Request<'_>,
        endpoint: Endpoint,
        deadline: Option<Instant>,
    ) -> Result<Option<Token>, Failure> {
        let auth = self
            .clients
            .resolve(request.client_id, request.assertion, request.grant)
            .map_err(Failure::Client)?;
        let caller_credentials = auth.from_caller();
        let keys = GuardKeys::new(
            &self.keys,
            auth.client_id().unwrap_or_default(),
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
                Refusal::Overloaded => {
                    self.metrics.call_shed();
                    Failure::Overloaded
                }
                Refusal::DeadlineExceeded => Failure::DeadlineExceeded,
            })?;
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
        };
        self.send(request, Endpoint::Revoke, deadline)
            .await
            .map(drop)
    }
}

impl Fetch for Direct {
    async fn fetch(
        &self,
        request: &TokenRequest,
        deadline: Option<Instant>,
    ) -> Result<Token, Failure> {
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
            user: request.user(),
            fields: request.form_fields(),
            replay,
        };
        let token = self.send(sent, Endpoint::Token, deadline).await?;
        Ok(token.expect("the token endpoint answers a token or an error"))
    }
}
