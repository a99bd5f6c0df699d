//! The ceiling: a tonic server for tokengate's own proto that answers GetToken with a canned
//! token and calls nothing. Same runtime and server builder as tokengate, nothing else.

use std::net::SocketAddr;

use tokengate::proto::token_service_server::{TokenService, TokenServiceServer};
use tokengate::proto::{
    GetTokenRequest, GetTokenResponse, RevokeTokenRequest, RevokeTokenResponse,
};
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

struct Echo {
    canned: GetTokenResponse,
}

#[tonic::async_trait]
impl TokenService for Echo {
    async fn get_token(
        &self,
        _request: Request<GetTokenRequest>,
    ) -> Result<Response<GetTokenResponse>, Status> {
        Ok(Response::new(self.canned.clone()))
    }

    async fn revoke_token(
        &self,
        _request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        Ok(Response::new(RevokeTokenResponse {}))
    }
}

/// Serves on `listen` until killed; prints `listening ADDR` once bound.
pub async fn serve(listen: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<TokenServiceServer<Echo>>().await;
    Server::builder()
        .add_service(health)
        .add_service(TokenServiceServer::new(Echo {
            canned: crate::fixtures::canned_response(),
        }))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await?;
    Ok(())
}
