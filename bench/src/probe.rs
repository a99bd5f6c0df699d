//! Probes the harness runs against a live server: one checked GetToken, and exec → SERVING.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokengate::proto::TokenSource;
use tokengate::proto::token_service_client::TokenServiceClient;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

pub type Error = Box<dyn std::error::Error>;

/// One GetToken for `client` that must succeed with the benchmark's token (and come from
/// `source`, when given); h2load cannot see gRPC status. Returns the size of the response frame,
/// which the harness uses to check h2load's byte counts.
pub async fn check(addr: &str, client: &str, source: Option<&str>) -> Result<usize, Error> {
    let channel = Endpoint::from_shared(addr.to_owned())?.connect().await?;
    let response = TokenServiceClient::new(channel)
        .get_token(crate::fixtures::get_token_request(client))
        .await
        .map_err(|status| format!("GetToken failed: {status:?}"))?
        .into_inner();
    let expected = crate::fixtures::canned_response();
    if response.access_token != expected.access_token || response.scopes != expected.scopes {
        return Err("GetToken answered, but not with the benchmark's token".into());
    }
    if let Some(source) = source {
        let name = TokenSource::try_from(response.source)
            .map(|s| s.as_str_name())
            .unwrap_or("?");
        if !name.eq_ignore_ascii_case(&format!("TOKEN_SOURCE_{source}")) {
            return Err(format!("GetToken answered from {name}, not from {source}").into());
        }
    }
    Ok(crate::fixtures::grpc_frame(&response).len())
}

/// Starts `command` pinned to `cpu` and times exec → the first SERVING health answer, `runs`
/// times. The probe itself stays on `home_cpu`.
pub async fn startup(
    command: &[String],
    cpu: usize,
    home_cpu: usize,
    runs: usize,
) -> Result<Vec<Duration>, Error> {
    let (program, args) = command.split_first().ok_or("no command to time")?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        // The child inherits this thread's affinity at fork; pin, spawn, and move back.
        pin(cpu)?;
        let started = Instant::now();
        let spawned = Command::new(program)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        pin(home_cpu)?;
        let mut child = spawned?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let addr = listening_addr(BufReader::new(stdout)).await?;
        let channel = loop {
            match Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await
            {
                Ok(channel) => break channel,
                Err(_) if started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return Err(format!("{addr} never accepted: {e}").into()),
            }
        };
        wait_serving(channel, started).await?;
        times.push(started.elapsed());
        child.kill().await?;
    }
    Ok(times)
}

fn pin(cpu: usize) -> Result<(), Error> {
    if core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        Ok(())
    } else {
        Err(format!("cannot pin to CPU {cpu}").into())
    }
}

/// The first `127.0.0.1:PORT` the child prints (tokengate's "listening" log line, the echo's
/// "listening ADDR").
async fn listening_addr(stdout: BufReader<tokio::process::ChildStdout>) -> Result<String, Error> {
    let mut lines = stdout.lines();
    while let Some(line) = lines.next_line().await? {
        if let Some(at) = line.find("127.0.0.1:") {
            let port: String = line[at + 10..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            if !port.is_empty() {
                return Ok(format!("127.0.0.1:{port}"));
            }
        }
    }
    Err("the server exited without printing its address".into())
}

async fn wait_serving(channel: Channel, started: Instant) -> Result<(), Error> {
    let mut health = HealthClient::new(channel);
    loop {
        let status = health
            .check(HealthCheckRequest::default())
            .await
            .map(|r| r.into_inner().status());
        if matches!(status, Ok(ServingStatus::Serving)) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err(format!("not SERVING after 10 s: {status:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
