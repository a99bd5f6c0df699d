//! The `tokengate` command: serve, check a config, probe health.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokengate::telemetry::{self, LogFormat};
use tokengate::{Application, Config, Drain};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// `EX_USAGE` from sysexits.h: the configuration is unusable.
const EXIT_BAD_CONFIG: u8 = 64;

/// The least time buffered spans get at exit, even when the drain used the whole grace.
const MIN_FLUSH: Duration = Duration::from_secs(1);

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
            let config = match Config::load(config.as_deref()) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("tokengate: bad config: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let runtime = runtime();
            // Inside the runtime: the gRPC trace exporter's connection task lives there.
            let telemetry = {
                let _inside = runtime.enter();
                telemetry::start(cli.log_format, &config.telemetry)
            };
            let telemetry = match telemetry {
                Ok(telemetry) => telemetry,
                Err(e) => {
                    eprintln!("tokengate: bad config: {e}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let grace = config.server.shutdown_grace_period;
            let signalled = Arc::new(OnceLock::new());
            let code = runtime.block_on(serve(config, signalled.clone()));
            // Spans still buffered get what is left of the grace period (at least
            // MIN_FLUSH): the pod's termination period allows for it.
            let left = signalled
                .get()
                .map_or(grace, |at: &Instant| grace.saturating_sub(at.elapsed()));
            telemetry.shutdown(left.max(MIN_FLUSH));
            code
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

/// Notes when the shutdown signal arrived, so the span flush keeps within the grace period.
async fn serve(config: Config, signalled: Arc<OnceLock<Instant>>) -> ExitCode {
    let app = match Application::build(&config).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    match app
        .run_until_stopped(async move {
            tokengate::startup::shutdown_signal().await;
            let _ = signalled.set(Instant::now());
        })
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
