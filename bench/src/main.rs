//! `tokengate-bench`: the pieces bench/harness.py starts and drives. Not part of the product.

#![forbid(unsafe_code)]

mod echo;
mod fixtures;
mod probe;
mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Baselines and probes for tokengate's benchmark (bench/run drives them)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The mock token endpoint (HTTP/1.1, one thread). Prints `listening ADDR`.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Hold every token POST this long before answering (keeps calls in flight).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        delay: Duration,
    },
    /// The tonic echo: GetToken answered with a canned token, no upstream. Prints `listening ADDR`.
    Echo {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Write the GetToken request as a gRPC length-prefixed frame (h2load's `-d` file).
    Frame { out: PathBuf },
    /// Make one GetToken and fail unless it returns the benchmark's token; prints the
    /// response frame size.
    Check {
        #[arg(long)]
        addr: String,
    },
    /// Time exec → SERVING of COMMAND, pinned to --cpu; prints milliseconds, one line a run.
    Startup {
        #[arg(long)]
        cpu: usize,
        #[arg(long, default_value_t = 0)]
        home_cpu: usize,
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    let result: Result<(), probe::Error> = match Cli::parse().command {
        Command::Upstream { listen, delay } => current_thread()
            .block_on(upstream::serve(listen, delay))
            .map_err(Into::into),
        Command::Echo { listen } => multi_thread().block_on(echo::serve(listen)),
        Command::Frame { out } => {
            std::fs::write(&out, fixtures::grpc_frame(&fixtures::get_token_request()))
                .map_err(Into::into)
        }
        Command::Check { addr } => current_thread()
            .block_on(probe::check(&addr))
            .map(|bytes| println!("{bytes}")),
        Command::Startup {
            cpu,
            home_cpu,
            runs,
            command,
        } => current_thread()
            .block_on(probe::startup(&command, cpu, home_cpu, runs))
            .map(|times| {
                for time in times {
                    println!("{:.3}", time.as_secs_f64() * 1000.0);
                }
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokengate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The upstream and the probes: one thread, as the harness gives each one core.
fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime needs only the OS timer")
}

/// The echo: the same runtime tokengate's `serve` builds, so the two compare.
fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime needs only threads and the OS timer")
}
