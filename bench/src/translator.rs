//! The floor for a call that goes upstream: the echo's tonic server, making one reqwest form
//! POST per GetToken and decoding the JSON answer into the reply, nothing else (no validation,
//! no client registry, no broker, no retries, no limits, no logging).
//!
//! It sends what tokengate sends for the benchmark's request (`client_secret_basic`: Basic
//! credentials, and `client_id` in the body), so the two upstream requests are the same bytes.

use std::net::SocketAddr;

use serde::Deserialize;
use tokengate::proto::token_service_server::{TokenService, TokenServiceServer};
use tokengate::proto::{
    GetTokenRequest, GetTokenResponse, RevokeTokenRequest, RevokeTokenResponse, get_token_request,
};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

struct Translator {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    client_secret: String,
}

/// The upstream's answer, as far as the reply needs it.
#[derive(Deserialize)]
struct Token {
    access_token: String,
    #[serde(default)]
    token_type: String,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    refresh_token: String,
    #[serde(default)]
    refresh_token_expires_in: Option<i64>,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    owner_id: String,
    #[serde(default)]
    endpoint_id: String,
}

fn seconds(value: Option<i64>) -> Option<prost_types::Duration> {
    value.map(|seconds| prost_types::Duration { seconds, nanos: 0 })
}

#[tonic::async_trait]
impl TokenService for Translator {
    async fn get_token(
        &self,
        request: Request<GetTokenRequest>,
    ) -> Result<Response<GetTokenResponse>, Status> {
        let request = request.into_inner();
        let Some(get_token_request::Grant::JwtBearer(grant)) = request.grant else {
            return Err(Status::unimplemented(
                "the translator knows jwt_bearer only",
            ));
        };
        let body = serde_urlencoded::to_string([
            ("grant_type", JWT_BEARER),
            ("assertion", &grant.assertion),
            ("client_id", &self.client_id),
        ])
        .map_err(|e| Status::internal(e.to_string()))?;
        let reply = self
            .http
            .post(&self.token_url)
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        if !reply.status().is_success() {
            return Err(Status::unavailable(format!("upstream {}", reply.status())));
        }
        let bytes = reply
            .bytes()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let token: Token =
            serde_json::from_slice(&bytes).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(GetTokenResponse {
            access_token: token.access_token,
            token_type: token.token_type,
            expires_in: seconds(token.expires_in),
            refresh_token: token.refresh_token,
            refresh_token_expires_in: seconds(token.refresh_token_expires_in),
            scopes: token.scope.split(' ').map(str::to_owned).collect(),
            owner_id: token.owner_id,
            endpoint_id: token.endpoint_id,
            ..GetTokenResponse::default()
        }))
    }

    async fn revoke_token(
        &self,
        _request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        Err(Status::unimplemented(
            "the translator only exchanges tokens",
        ))
    }
}

/// Serves on `listen` until killed; prints `listening ADDR` once bound.
pub async fn serve(
    listen: SocketAddr,
    token_url: String,
    client_id: String,
    client_secret: String,
) -> Result<(), Box<dyn std::error::Error>> {
    let http = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<TokenServiceServer<Translator>>()
        .await;
    Server::builder()
        .add_service(health)
        .add_service(TokenServiceServer::new(Translator {
            http,
            token_url,
            client_id,
            client_secret,
        }))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await?;
    Ok(())
}
