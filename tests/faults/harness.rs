//! Starting tokengate in process against a [`testkit::FaultyUpstream`], calling it, and
//! checking outcomes. (The real binary is started by `testkit::Tokengate`; see `binary`.)

use std::time::Duration;

use tokengate::proto::get_token_request::Grant;
use tokengate::proto::token_service_client::TokenServiceClient;
use tokengate::proto::{ClientCredentialsGrant, GetTokenRequest, GetTokenResponse};
use tokengate::startup::StartupError;
use tokengate::{Application, Config, Drain};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

/// How long any single wait in this suite may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The `request_timeout` of the servers in this suite: short, so timeouts are cheap.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);

/// The tokengate config used throughout: public clients allowed (so every call can name
/// its own client id and stay clear of another call's rate-limit penalty).
pub fn config_toml(base_url: &str, request_timeout: Duration) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_period = "5s"

[upstream]
base_url = "{base_url}"
allow_insecure_http = true
connect_timeout = "300ms"
request_timeout = "{}ms"

[clients]
allow_public = true
"#,
        request_timeout.as_millis()
    )
}

/// A tokengate running in this process, on its own task.
pub struct Gate {
    pub client: TokenServiceClient<Channel>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<Drain, StartupError>>,
}

impl Gate {
    pub async fn start(base_url: &str) -> Self {
        Self::start_with(base_url, REQUEST_TIMEOUT).await
    }

    pub async fn start_with(base_url: &str, request_timeout: Duration) -> Self {
        Self::start_config(&Config::from_toml(&config_toml(base_url, request_timeout)).unwrap())
            .await
    }

    pub async fn start_config(config: &Config) -> Self {
        let app = Application::build(config).await.unwrap();
        let addr = app.local_addr();
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stop.await;
        }));
        let client = TokenServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        Self {
            client,
            shutdown: Some(shutdown),
            server,
        }
    }

    /// Stops the server and asserts it drained completely.
    pub async fn stop(mut self) {
        drop(self.client);
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        let drain = timeout(PATIENCE, &mut self.server)
            .await
            .expect("the server stops in time")
            .expect("the server task does not panic")
            .expect("the server stops cleanly");
        assert_eq!(drain, Drain::Complete);
    }
}

/// A client-credentials request for `client_id` (an unregistered, public client).
pub fn request(client_id: &str) -> GetTokenRequest {
    GetTokenRequest {
        grant: Some(Grant::ClientCredentials(ClientCredentialsGrant {
            subject: None,
        })),
        client_id: client_id.to_owned(),
        ..Default::default()
    }
}

/// One GetToken call, bounded by [`PATIENCE`] (no gRPC deadline of its own).
pub async fn call(
    client: &mut TokenServiceClient<Channel>,
    client_id: &str,
) -> Result<GetTokenResponse, Status> {
    timeout(PATIENCE, client.get_token(request(client_id)))
        .await
        .expect("tokengate answers within PATIENCE")
        .map(tonic::Response::into_inner)
}

/// The RetryInfo delay of a status, if any.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    let delay = status.get_error_details().retry_info()?.retry_delay?;
    Some(delay)
}

/// One ErrorInfo metadata value.
pub fn metadata(status: &Status, key: &str) -> Option<String> {
    status
        .get_error_details()
        .error_info()?
        .metadata
        .get(key)
        .cloned()
}

/// Asserts the gRPC code, the ErrorInfo domain and reason of a failed call.
#[track_caller]
pub fn assert_failure(
    result: &Result<GetTokenResponse, Status>,
    code: Code,
    reason_: &str,
    what: &str,
) -> Status {
    let status = match result {
        Ok(_) => panic!("{what}: expected {code:?}/{reason_}, got a token"),
        Err(status) => status.clone(),
    };
    assert_eq!(status.code(), code, "{what}: {status:?}");
    let info = status
        .get_error_details()
        .error_info()
        .cloned()
        .unwrap_or_else(|| panic!("{what}: no ErrorInfo in {status:?}"));
    assert_eq!(info.domain, "tokengate", "{what}: {status:?}");
    assert_eq!(info.reason, reason_, "{what}: {status:?}");
    status
}
