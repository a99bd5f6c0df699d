//! `tokengate-bench`: the pieces bench/harness.py starts and drives. Not part of the product.

#![forbid(unsafe_code)]

mod calls;
mod echo;
mod fixtures;
mod probe;
mod translator;
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
        /// `expires_in` of the tokens, in seconds.
        #[arg(long, default_value_t = 3600)]
        expires_in: u64,
        /// A new token pair per POST, and refresh tokens that work once (RingCentral's rules).
        #[arg(long)]
        rotate: bool,
    },
    /// The minimal translator: the echo's tonic server making one reqwest form POST per
    /// GetToken and decoding the JSON. Prints `listening ADDR`.
    Translator {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// The token endpoint, e.g. http://127.0.0.1:PORT/restapi/oauth/token.
        #[arg(long)]
        token_url: String,
        #[arg(long, default_value = fixtures::CLIENT_ID)]
        client_id: String,
        #[arg(long)]
        client_secret: String,
    },
    /// The tonic echo: GetToken answered with a canned token, no upstream. Prints `listening ADDR`.
    Echo {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Write the GetToken request as a gRPC length-prefixed frame (h2load's `-d` file).
    Frame {
        out: PathBuf,
        /// The request's `client_id`.
        #[arg(long, default_value = fixtures::CLIENT_ID)]
        client: String,
    },
    /// Make one GetToken and fail unless it returns the benchmark's token (and, with
    /// --source, from there); prints the response frame size.
    Check {
        #[arg(long)]
        addr: String,
        #[arg(long, default_value = fixtures::CLIENT_ID)]
        client: String,
        /// upstream, cache, coalesced or replayed.
        #[arg(long)]
        source: Option<String>,
    },
    /// Many checked GetToken calls over one or more servers; prints a JSON summary.
    Calls {
        /// A server, e.g. http://127.0.0.1:PORT; repeat for several replicas.
        #[arg(long = "addr", required = true)]
        addrs: Vec<String>,
        /// HTTP/2 connections per server.
        #[arg(long, default_value_t = 8)]
        connections: usize,
        #[arg(long, default_value = fixtures::CLIENT_ID)]
        client: String,
        /// Send client_credentials for accounts PREFIX0, PREFIX1, …; without it, the
        /// benchmark's jwt_bearer request.
        #[arg(long)]
        accounts: Option<String>,
        /// How many distinct accounts (with --accounts).
        #[arg(long, default_value_t = 1)]
        distinct: usize,
        /// A fixed number of calls (with --concurrency) …
        #[arg(long, conflicts_with = "duration")]
        calls: Option<usize>,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// … or callers that call every --interval for this long.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        #[arg(long, default_value_t = 1)]
        callers: usize,
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Connect, then wait until this Unix time in milliseconds before calling.
        #[arg(long)]
        start_at_ms: Option<u64>,
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
        Command::Upstream {
            listen,
            delay,
            expires_in,
            rotate,
        } => current_thread()
            .block_on(upstream::serve(
                listen,
                upstream::Options {
                    delay,
                    expires_in,
                    rotate,
                },
            ))
            .map_err(Into::into),
        Command::Echo { listen } => multi_thread().block_on(echo::serve(listen)),
        Command::Translator {
            listen,
            token_url,
            client_id,
            client_secret,
        } => multi_thread().block_on(translator::serve(
            listen,
            token_url,
            client_id,
            client_secret,
        )),
        Command::Frame { out, client } => std::fs::write(
            &out,
            fixtures::grpc_frame(&fixtures::get_token_request(&client)),
        )
        .map_err(Into::into),
        Command::Check {
            addr,
            client,
            source,
        } => current_thread()
            .block_on(probe::check(&addr, &client, source.as_deref()))
            .map(|bytes| println!("{bytes}")),
        Command::Calls {
            addrs,
            connections,
            client,
            accounts,
            distinct,
            calls,
            concurrency,
            duration,
            callers,
            interval,
            start_at_ms,
        } => {
            let pace = match (calls, duration) {
                (_, Some(duration)) => calls::Pace::Steady {
                    callers,
                    interval,
                    duration,
                },
                (calls, None) => calls::Pace::Count {
                    calls: calls.unwrap_or(1),
                    concurrency,
                },
            };
            let shape = match accounts {
                Some(prefix) => calls::Shape::Accounts { prefix, distinct },
                None => calls::Shape::Jwt,
            };
            multi_thread()
                .block_on(calls::run(calls::Plan {
                    addrs,
                    connections,
                    client_id: client,
                    shape,
                    pace,
                    start_at_ms,
                }))
                .map(|summary| println!("{summary}"))
        }
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
