//! The command line: `--version`, `check-config`, `serve` with and without a file, env
//! overrides, log formats and `health-check`.

use testkit::Tokengate;

use crate::process::{binary, run, write};

#[test]
fn version_names_the_crate_version() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, _) = run(&["--version"], &[], dir.path());
    assert_eq!(code, 0);
    assert_eq!(
        stdout.trim(),
        format!("tokengate {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write(dir.path(), "file-secret", "file-secret-value-31\n");
    let config = write(
        dir.path(),
        "tokengate.toml",
        &format!(
            r#"
            [upstream]
            request_timeout = "3s"
            [[clients.registered]]
            client_id = "inline-app"
            client_secret = "inline-secret-value-77"
            [[clients.registered]]
            client_id = "file-app"
            client_secret_file = "{}"
            auth_method = "client_secret_post"
            allowed_grants = ["jwt_bearer"]
            "#,
            secret_file.display()
        ),
    );
    let (code, stdout, stderr) = run(
        &["check-config", "--config", config.to_str().unwrap()],
        &[],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(r#"request_timeout = "3s""#), "{stdout}");
    assert!(
        stdout.contains(r#"client_secret = "[REDACTED]""#),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "client_secret_file = \"{}\"",
            secret_file.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"allowed_grants = ["jwt_bearer"]"#),
        "{stdout}"
    );
    for secret in ["inline-secret-value-77", "file-secret-value-31"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked"
        );
    }
    // What it prints is itself a valid config.
    let printed = write(
        dir.path(),
        "printed.toml",
        &stdout.replace(r#"client_secret = "[REDACTED]""#, r#"client_secret = "x""#),
    );
    let (code, _, stderr) = run(
        &["check-config", "--config", printed.to_str().unwrap()],
        &[],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn bad_config_exits_64_with_one_line_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[server]\nlisten = \"not-an-address\"\n", "listen"),
        (
            "[upstream]\nbase_url = \"https://h.example/restapi/v1.0\"\n",
            "base_url",
        ),
        ("[upstream]\ntypo_key = 1\n", "typo_key"),
        (
            "[[clients.registered]]\nclient_id = \"a\"\nclient_secret = \"leaky-secret-9\"\nauth_method = \"none\"\n",
            "auth_method",
        ),
        // Values that once overflowed an `Instant` addition or panicked tokio's semaphore.
        (
            "[upstream]\nrequest_timeout = \"584542046090y\"\n",
            "upstream.request_timeout",
        ),
        (
            "[server]\nmax_concurrent_calls = 9223372036854775807\n",
            "server.max_concurrent_calls",
        ),
    ];
    for (text, expected) in cases {
        let config = write(dir.path(), "bad.toml", text);
        for command in ["check-config", "serve"] {
            let (code, stdout, stderr) = run(
                &[command, "--config", config.to_str().unwrap()],
                &[],
                dir.path(),
            );
            assert_eq!(code, 64, "{command} {text}: {stdout}{stderr}");
            assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
            assert!(stderr.contains(expected), "{stderr} should name {expected}");
            assert!(!stderr.contains("leaky-secret-9") && !stdout.contains("leaky-secret-9"));
        }
    }
    let (code, _, stderr) = run(
        &["check-config", "--config", "/nonexistent/tokengate.toml"],
        &[],
        dir.path(),
    );
    assert_eq!(code, 64);
    assert!(stderr.contains("/nonexistent/tokengate.toml"), "{stderr}");
}

#[test]
fn environment_overrides_file_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "tokengate.toml",
        "[upstream]\nrequest_timeout = \"3s\"\n",
    );
    let env = [
        ("TOKENGATE_UPSTREAM__REQUEST_TIMEOUT", "7s"),
        ("TOKENGATE_UPSTREAM__BASE_URL", "http://127.0.0.1:9"),
        ("TOKENGATE_UPSTREAM__ALLOW_INSECURE_HTTP", "true"),
        ("TOKENGATE_CLIENTS__ALLOW_PUBLIC", "false"),
    ];
    let (code, stdout, stderr) = run(
        &["check-config", "--config", config.to_str().unwrap()],
        &env,
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(r#"request_timeout = "7s""#), "{stdout}");
    assert!(
        stdout.contains(r#"base_url = "http://127.0.0.1:9""#),
        "{stdout}"
    );
    assert!(stdout.contains("allow_public = false"), "{stdout}");

    let (code, _, stderr) = run(
        &["check-config"],
        &[("TOKENGATE_SERVER__NOPE", "1")],
        dir.path(),
    );
    assert_eq!(
        code, 64,
        "an unknown key from the environment is an error too"
    );
    assert!(stderr.contains("nope"), "{stderr}");
}

#[test]
fn check_config_without_a_file_shows_the_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout, stderr) = run(&["check-config"], &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    for line in [
        r#"listen = "0.0.0.0:50051""#,
        r#"shutdown_grace_period = "20s""#,
        r#"base_url = "https://platform.ringcentral.com""#,
        r#"token_path = "/restapi/oauth/token""#,
        r#"revoke_path = "/restapi/oauth/revoke""#,
        r#"connect_timeout = "2s""#,
        r#"request_timeout = "10s""#,
        "allow_public = true",
    ] {
        assert!(stdout.contains(line), "{line} missing from:\n{stdout}");
    }
}

#[tokio::test]
async fn serve_without_a_config_file_starts_and_health_check_passes() {
    // No --config: the defaults, with only the listen address moved to a free loopback port.
    let mut served = Tokengate::launch_args(binary(), ["serve"])
        .env("TOKENGATE_SERVER__LISTEN", "127.0.0.1:0")
        .env("TOKENGATE_LOG_FORMAT", "json")
        .start()
        .await;
    let url = served.url();
    let cwd = std::env::temp_dir();
    let (code, stdout, stderr) = run(&["health-check", "--addr", &url], &[], &cwd);
    assert_eq!((code, stdout.trim()), (0, "SERVING"), "{stderr}");
    let (code, _, stderr) = run(
        &[
            "health-check",
            "--addr",
            &url,
            "--service",
            "tokengate.v1.TokenService",
        ],
        &[],
        &cwd,
    );
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run(
        &[
            "health-check",
            "--addr",
            &url,
            "--service",
            "no.such.Service",
        ],
        &[],
        &cwd,
    );
    assert_ne!(code, 0, "an unknown service is not SERVING");
    assert!(
        stderr.contains("NotFound") || stderr.contains("not found"),
        "{stderr}"
    );

    served.signal("TERM");
    assert_eq!(served.exit_code().await, 0);
}

#[test]
fn health_check_fails_when_nothing_listens() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let cwd = std::env::temp_dir();
    let addr = format!("http://127.0.0.1:{port}");
    let (code, _, stderr) = run(
        &["health-check", "--addr", &addr, "--timeout", "2s"],
        &[],
        &cwd,
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("cannot connect"), "{stderr}");
}

#[test]
fn text_logs_are_the_default_and_json_is_selected_by_flag() {
    let dir = tempfile::tempdir().unwrap();
    // 192.0.2.1 (TEST-NET-1) is not a local address, so binding fails at once and the
    // startup error is logged in the selected format; no packet leaves the machine.
    let config = write(
        dir.path(),
        "foreign.toml",
        "[server]\nlisten = \"192.0.2.1:50051\"\n",
    );
    let (code, text, _) = run(
        &["serve", "--config", config.to_str().unwrap()],
        &[],
        dir.path(),
    );
    assert_eq!(code, 1, "binding a foreign address fails at start: {text}");
    assert!(
        text.contains("cannot start") && !text.trim_start().starts_with('{'),
        "{text}"
    );
    let (code, json, _) = run(
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--log-format",
            "json",
        ],
        &[],
        dir.path(),
    );
    assert_eq!(code, 1);
    let event: serde_json::Value = serde_json::from_str(json.lines().last().unwrap()).unwrap();
    assert_eq!(event["fields"]["message"], "cannot start", "{json}");
}

#[test]
fn the_example_config_in_the_repository_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write(dir.path(), "my-app", "example-secret");
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/tokengate.toml"
    ))
    .unwrap();
    let example = example.replace(
        "/var/run/secrets/tokengate/my-app",
        secret.to_str().unwrap(),
    );
    let config = write(dir.path(), "tokengate.toml", &example);
    let (code, stdout, stderr) = run(
        &["check-config", "--config", config.to_str().unwrap()],
        &[],
        dir.path(),
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(r#"allowed_grants = ["jwt_bearer", "refresh_token"]"#),
        "{stdout}"
    );
}

#[test]
fn a_plain_http_upstream_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let plain = [("TOKENGATE_UPSTREAM__BASE_URL", "http://upstream.example")];
    let (code, _, stderr) = run(&["check-config"], &plain, dir.path());
    assert_eq!(code, 64);
    assert!(stderr.contains("allow_insecure_http"), "{stderr}");
    let allowed = [
        plain[0],
        ("TOKENGATE_UPSTREAM__ALLOW_INSECURE_HTTP", "true"),
    ];
    let (code, _, stderr) = run(&["check-config"], &allowed, dir.path());
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn an_extra_upstream_ca_must_be_a_pem_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = write(dir.path(), "ca.pem", "not a certificate");
    let env = [("TOKENGATE_UPSTREAM__CA_FILE", not_pem.to_str().unwrap())];
    let (code, _, stderr) = run(&["check-config"], &env, dir.path());
    assert_eq!(code, 64);
    assert!(stderr.contains("ca_file"), "{stderr}");
}

#[test]
fn the_local_example_config_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/local.toml");
    let (code, stdout, stderr) = run(&["check-config", "--config", example], &[], dir.path());
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains(r#"base_url = "http://127.0.0.1:8080""#),
        "{stdout}"
    );
}
