//! `tokengate.v1.TokenService`: proto in, validated domain request, broker call, proto out.
//! Proto types stop here; every failure leaves through [`crate::error`].
//!
//! What a call needs besides its messages (its span, who the caller is, its log line and
//! metrics) is the work of [`layer`], which hands each handler a [`layer::Call`] and hears
//! back how the call ended.

pub mod layer;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret as _, SecretString};
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::{Code, Request, Response, Status};

use crate::broker::{Ask, Broker, Source};
use crate::caller::Unauthenticated;
use crate::client::Clients;
use crate::direct::Direct;
use crate::error::{CallError, Failure};
use crate::grant::{GrantKind, RevokeRequest, TokenRequest};
use crate::metrics::{ClientLabel, Metrics, Outcome};
use crate::proto::{self, token_service_server::TokenService};
use crate::upstream::Token;
use layer::{Call, Ended, Failed};

/// tonic's own `grpc-timeout` layer answers CANCELLED at the caller's deadline, timed from
/// a little before our handler starts; ending our work this much earlier lets us answer
/// DEADLINE_EXCEEDED as the contract says. 5 ms lost that race under load on 2 cores.
const DEADLINE_MARGIN: Duration = Duration::from_millis(20);

/// The TokenService implementation, shared by every connection.
#[derive(Clone, Debug)]
pub struct TokenGate {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    clients: Arc<Clients>,
    broker: Broker<Direct>,
    /// Turns client ids into labels: registered ids or `public`.
    metrics: Arc<Metrics>,
}

impl TokenGate {
    /// The assertion signers whose key files need watching.
    pub fn signers(&self) -> Vec<Arc<crate::assertion::Signer>> {
        self.inner.clients.signers()
    }

    /// Serves behind a [`layer::CallLayer`], which identifies the callers.
    pub fn new(clients: Arc<Clients>, broker: Broker<Direct>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                clients,
                broker,
                metrics,
            }),
        }
    }

    async fn get_token(
        &self,
        request: proto::GetTokenRequest,
        caller: Result<Option<&str>, Unauthenticated>,
        deadline: Option<Instant>,
        call: &mut Labels,
    ) -> Result<(Token, Source), CallError> {
        let caller = caller.map_err(|Unauthenticated| call.fail(Failure::CallerUnauthenticated))?;
        let request = TokenRequest::try_from(request)
            .map_err(|violations| call.fail(Failure::InvalidRequest(violations)))?;
        let clients = &self.inner.clients;
        clients
            .authorize(caller, request.client_id.as_deref())
            .map_err(|e| call.fail(Failure::Client(e)))?;
        let resolved = clients
            .check(
                request.client_id.as_deref(),
                request.client_assertion.is_some(),
                Some(request.grant.kind()),
            )
            .map_err(|e| call.fail(Failure::Client(e)))?;
        call.authenticated(&self.inner.metrics, resolved.client_id);
        let ask = Ask {
            client_id: resolved.client_id.map(str::to_owned),
            caches: resolved.caches,
            request,
            deadline,
        };
        self.inner
            .broker
            .token(ask)
            .await
            .map_err(|failure| call.fail(failure))
    }

    async fn revoke(
        &self,
        request: proto::RevokeTokenRequest,
        caller: Result<Option<&str>, Unauthenticated>,
        deadline: Option<Instant>,
        call: &mut Labels,
    ) -> Result<(), CallError> {
        let caller = caller.map_err(|Unauthenticated| call.fail(Failure::CallerUnauthenticated))?;
        let request = RevokeRequest::try_from(request)
            .map_err(|violations| call.fail(Failure::InvalidRequest(violations)))?;
        let clients = &self.inner.clients;
        clients
            .authorize(caller, request.client_id.as_deref())
            .map_err(|e| call.fail(Failure::Client(e)))?;
        let resolved = clients
            .check(
                request.client_id.as_deref(),
                request.client_assertion.is_some(),
                None,
            )
            .map_err(|e| call.fail(Failure::Client(e)))?;
        call.authenticated(&self.inner.metrics, resolved.client_id);
        let broker = &self.inner.broker;
        let result = broker.fetcher().revoke(&request, deadline).await;
        // Whatever the upstream said, no cached answer may hand the token out again.
        broker.forget(request.token.expose_secret()).await;
        result.map_err(|failure| call.fail(failure))
    }
}

/// What a call is for: labels its span and its errors as it learns more.
struct Labels {
    span: tracing::Span,
    grant: Option<GrantKind>,
    /// The request's `client_id` as sent (or the default client's), for ErrorInfo only.
    client_id: Option<String>,
    /// What logs and metrics name the client by: a registered client_id or `public`.
    client: ClientLabel,
}

impl Labels {
    /// Starts labelling `span` with what the raw request names. A `client_id` that no
    /// registered client has is labelled `public`: a caller's string never reaches a log.
    fn start(
        span: tracing::Span,
        metrics: &Metrics,
        grant: Option<GrantKind>,
        client_id: &str,
    ) -> Self {
        let mut call = Self {
            span,
            grant,
            client_id: None,
            client: metrics.client(None),
        };
        if let Some(grant) = grant {
            call.span.record("grant_type", grant.as_str());
        }
        call.authenticated(metrics, (!client_id.is_empty()).then_some(client_id));
        call
    }

    /// Records the client the call was resolved to.
    fn authenticated(&mut self, metrics: &Metrics, client_id: Option<&str>) {
        if let Some(client_id) = client_id {
            self.client = metrics.client(Some(client_id));
            self.span.record("client_id", self.client.as_str());
            self.client_id = Some(client_id.to_owned());
        }
    }

    fn fail(&self, failure: Failure) -> CallError {
        CallError {
            failure,
            grant: self.grant,
            client_id: self.client_id.clone(),
        }
    }

    /// What the call learned, for the metrics layer.
    fn outcome(&self, reason: &'static str, source: Option<Source>) -> Outcome {
        Outcome {
            grant_type: self.grant.map_or("unspecified", GrantKind::as_str),
            client: self.client.clone(),
            reason,
            source: source.map_or("none", Source::as_str),
        }
    }
}

fn grant_kind_of(grant: &proto::get_token_request::Grant) -> GrantKind {
    use proto::get_token_request::Grant as G;
    match grant {
        G::AuthorizationCode(_) => GrantKind::AuthorizationCode,
        G::Password(_) => GrantKind::Password,
        G::JwtBearer(_) => GrantKind::JwtBearer,
        G::PartnerJwt(_) => GrantKind::PartnerJwt,
        G::RefreshToken(_) => GrantKind::RefreshToken,
        G::IvrPin(_) => GrantKind::IvrPin,
        G::DeviceCode(_) => GrantKind::DeviceCode,
        G::ClientCredentials(_) => GrantKind::ClientCredentials,
        G::Otp(_) => GrantKind::Otp,
        G::Guest(_) => GrantKind::Guest,
        G::PersonalJwt(_) => GrantKind::PersonalJwt,
        G::DeviceCertificate(_) => GrantKind::DeviceCertificate,
    }
}

/// The caller's deadline from `grpc-timeout`, less [`DEADLINE_MARGIN`].
fn caller_deadline(metadata: &MetadataMap, arrived: Instant) -> Option<Instant> {
    let timeout = parse_grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    Some(arrived + timeout.saturating_sub(DEADLINE_MARGIN))
}

/// `grpc-timeout` per the gRPC HTTP/2 spec: at most 8 digits and a unit.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

fn duration(seconds: Option<u64>) -> Option<prost_types::Duration> {
    seconds.map(|s| prost_types::Duration {
        seconds: i64::try_from(s).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

/// `start + seconds`, left unset past 9999-12-31, the last instant a Timestamp may hold.
fn instant_after(start: SystemTime, seconds: Option<u64>) -> Option<prost_types::Timestamp> {
    const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;
    let at = start.checked_add(Duration::from_secs(seconds?))?;
    Some(prost_types::Timestamp::from(at)).filter(|t| t.seconds <= MAX_TIMESTAMP_SECONDS)
}

fn expose(secret: Option<SecretString>) -> String {
    secret
        .map(|s| s.expose_secret().to_owned())
        .unwrap_or_default()
}

impl From<Source> for proto::TokenSource {
    fn from(source: Source) -> Self {
        match source {
            Source::Upstream => Self::Upstream,
            Source::Cache => Self::Cache,
            Source::Coalesced => Self::Coalesced,
            Source::Replayed => Self::Replayed,
        }
    }
}

fn response((token, source): (Token, Source)) -> proto::GetTokenResponse {
    proto::GetTokenResponse {
        source: proto::TokenSource::from(source).into(),
        ..token.into()
    }
}

impl From<Token> for proto::GetTokenResponse {
    fn from(token: Token) -> Self {
        let session_expiration_time = token.session_expiration_time.as_deref().and_then(|text| {
            let parsed = text.parse::<prost_types::Timestamp>();
            if parsed.is_err() {
                tracing::warn!(
                    value = text,
                    "upstream session_expiration_time is not RFC 3339; left unset"
                );
            }
            parsed.ok()
        });
        Self {
            access_token: expose(token.access_token),
            token_type: token.token_type.unwrap_or_default(),
            expires_in: duration(token.expires_in),
            expires_at: instant_after(token.counted_from, token.expires_in),
            refresh_token: expose(token.refresh_token),
            refresh_token_expires_in: duration(token.refresh_token_expires_in),
            refresh_token_expires_at: instant_after(
                token.counted_from,
                token.refresh_token_expires_in,
            ),
            scopes: token
                .scope
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            owner_id: token.owner_id.unwrap_or_default(),
            endpoint_id: token.endpoint_id.unwrap_or_default(),
            session_id: token.session_id.unwrap_or_default(),
            id_token: expose(token.id_token),
            session_expires_in: duration(token.session_expires_in),
            session_expiration_time,
            session_idle_timeout: duration(token.session_idle_timeout),
            source: proto::TokenSource::Unspecified.into(),
        }
    }
}

/// The [`Call`] that [`layer::CallLayer`] put in the request's extensions.
fn call_of<T>(request: &Request<T>) -> Result<Call, Status> {
    request.extensions().get::<Call>().cloned().ok_or_else(|| {
        // Only a server assembled without the layer; startup always adds it.
        Status::internal("tokengate was built without its call layer")
    })
}

/// How a call ended, for the layer: its code, the upstream's status when the call reached
/// it (from the token, or the upstream error) and, on failure, its reason and detail.
fn ended(result: Result<(), &CallError>, upstream_status: Option<u16>) -> Ended {
    let upstream_status = upstream_status.or(match result {
        Err(CallError {
            failure: Failure::Upstream { error, .. },
            ..
        }) => error.http_status,
        _ => None,
    });
    Ended {
        code: result.map_or_else(CallError::code, |()| Code::Ok),
        upstream_status,
        failure: result.err().map(|error| Failed {
            reason: error.reason(),
            detail: error.log_detail(),
        }),
        token_request: None,
    }
}

#[tonic::async_trait]
impl TokenService for TokenGate {
    async fn get_token(
        &self,
        request: Request<proto::GetTokenRequest>,
    ) -> Result<Response<proto::GetTokenResponse>, Status> {
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let call = call_of(&request)?;
        let request = request.into_inner();
        let mut labels = Labels::start(
            call.span.clone(),
            &self.inner.metrics,
            request.grant.as_ref().map(grant_kind_of),
            &request.client_id,
        );
        let caller = call.caller.as_ref().map(Option::as_deref).map_err(|e| *e);
        let result = TokenGate::get_token(self, request, caller, deadline, &mut labels).await;
        match result {
            Ok(answer) => {
                let upstream_status = match &answer {
                    (token, Source::Upstream) => token.upstream_status,
                    _ => None,
                };
                call.end(Ended {
                    token_request: Some(labels.outcome("OK", Some(answer.1))),
                    ..ended(Ok(()), upstream_status)
                });
                Ok(Response::new(response(answer)))
            }
            Err(error) => {
                call.end(Ended {
                    token_request: Some(labels.outcome(error.reason(), None)),
                    ..ended(Err(&error), None)
                });
                Err(Status::from(error))
            }
        }
    }

    async fn revoke_token(
        &self,
        request: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::RevokeTokenResponse>, Status> {
        let deadline = caller_deadline(request.metadata(), Instant::now());
        let call = call_of(&request)?;
        let request = request.into_inner();
        let mut labels = Labels::start(
            call.span.clone(),
            &self.inner.metrics,
            None,
            &request.client_id,
        );
        let caller = call.caller.as_ref().map(Option::as_deref).map_err(|e| *e);
        let result = self.revoke(request, caller, deadline, &mut labels).await;
        match result {
            Ok(()) => {
                call.end(ended(Ok(()), None));
                Ok(Response::new(proto::RevokeTokenResponse {}))
            }
            Err(error) => {
                call.end(ended(Err(&error), None));
                Err(Status::from(error))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header_is_parsed_per_spec() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("123456789S"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
    }
}
