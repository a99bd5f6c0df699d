//! The `tokengate` command: serve, check a config, probe health.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokengate::telemetry::{self, LogFormat};
use tokengate::{Application, Config, Drain};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// `EX_USAGE` from sysexits.h: the configuration is unusable.
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(version, about = "gRPC front for OAuth 2.0 token endpoints")]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "TOKENGATE_LOG_FORMAT",
        default_value_t
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// TOML config file; without one the defaults apply.
        #[arg(long, env = "TOKENGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate the config and print it with secrets redacted.
    CheckConfig {
        /// TOML config file; without one the defaults apply.
        #[arg(long, env = "TOKENGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Ask a running tokengate for its health; exit 0 only when SERVING.
    HealthCheck {
        /// Server address.
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        /// Health service name; "" is the whole server.
        #[arg(long, default_value = "")]
        service: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let _log = telemetry::init(cli.log_format);
            let config = match Config::load(config.as_deref()) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("tokengate: bad config: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            runtime().block_on(serve(config))
        }
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(config) => {
                print!("{}", config.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tokengate: bad config: {e}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::HealthCheck {
            addr,
            service,
            timeout,
        } => runtime().block_on(health_check(addr, service, timeout)),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime needs only threads and the OS timer, available at start")
}

async fn serve(config: Config) -> ExitCode {
    let app = match Application::build(&config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    match app
        .run_until_stopped(tokengate::startup::shutdown_signal())
        .await
    {
        Ok(Drain::Complete | Drain::NotStarted) => {
            tracing::info!(drained = true, "stopped; every in-flight call finished");
            ExitCode::SUCCESS
        }
        Ok(Drain::TimedOut) => {
            tracing::warn!(
                drained = false,
                "stopped; the grace period ran out with calls still in flight"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn health_check(addr: String, service: String, timeout: Duration) -> ExitCode {
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(addr.clone())
            .map_err(|e| format!("bad --addr {addr:?}: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.clone(),
            })
            .await
            .map_err(|s| format!("health check failed: {} {}", s.code(), s.message()))?;
        Ok::<_, String>(response.into_inner().status())
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(ServingStatus::Serving)) => {
            println!("SERVING");
            ExitCode::SUCCESS
        }
        Ok(Ok(status)) => {
            eprintln!("tokengate: {service:?} is {}", status.as_str_name());
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("tokengate: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!(
                "tokengate: no health answer from {addr} within {}",
                humantime::format_duration(timeout)
            );
            ExitCode::FAILURE
        }
    }
}
