"""The chart cannot drift from the binary: the rendered config is one `tokengate check-config`
accepts, the pod spec (ports, probes, mounts, grace period) agrees with that config, and the
schema admits the client settings the binary admits, method by method. With mTLS, the probes and
the `helm test` pod use the plaintext health port the binary really serves."""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
import os
import posixpath
import re
import select
import shutil
import signal
import subprocess
import time
import tomllib
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import helm_python as helm
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import CHART, REPO, UPPER_BOUNDS, Rendered, load_values

LIVENESS_SERVICE = ""
READINESS_SERVICE = "tokengate.v1.TokenService"


def seconds(duration: str) -> float:
    """A humantime duration as the chart's schema allows it ("500ms", "20s", "1m")."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    assert match, f"unexpected duration {duration!r}"
    value, unit = int(match.group(1)), match.group(2)
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def seconds_any(duration: str) -> float:
    """A duration as the binary prints it: humantime parts such as "1m 30s" or "50ms"."""
    parts = duration.split()
    assert parts, duration
    return sum(seconds(part) for part in parts)


def secret_volume(r: Rendered) -> dict | None:
    volumes = [v for v in r.pod_spec["volumes"] if v["name"] == "client-secrets"]
    return volumes[0] if volumes else None


def secret_mount(r: Rendered) -> dict | None:
    mounts = [m for m in r.container["volumeMounts"] if m["name"] == "client-secrets"]
    return mounts[0] if mounts else None


# The chart writes these client keys itself, from secret.mountPath and the client's secretKey.
CREDENTIAL_FILE_KEYS = ("client_secret_file", "private_key_file")

# Test-only keys (tests/fixtures/keys) that sign with each private-key algorithm.
FIXTURE_KEYS = REPO / "tests" / "fixtures" / "keys"
FIXTURE_KEY_FOR_ALG = {"RS256": "rsa-a.pem", "PS256": "rsa-a.pem", "ES256": "ec-p256.pem"}
BINARY_DEFAULT_PRIVATE_KEY_ALG = "RS256"


def registered(r: Rendered) -> list[dict]:
    return r.config["clients"].get("registered", [])


def secret_files(r: Rendered) -> list[str]:
    """Every credential file the rendered config reads: client secrets and private keys."""
    return [c[key] for c in registered(r) for key in CREDENTIAL_FILE_KEYS if key in c]


def private_key_algs(r: Rendered) -> dict[str, str]:
    """File name of each rendered private_key_file -> the algorithm the binary will sign with."""
    return {
        posixpath.basename(c["private_key_file"]): c.get("signing_alg", BINARY_DEFAULT_PRIVATE_KEY_ALG)
        for c in registered(r)
        if "private_key_file" in c
    }


def volume(r: Rendered, name: str) -> dict | None:
    volumes = [v for v in r.pod_spec["volumes"] if v["name"] == name]
    return volumes[0] if volumes else None


def mount(r: Rendered, name: str) -> dict | None:
    mounts = [m for m in r.container["volumeMounts"] if m["name"] == name]
    return mounts[0] if mounts else None


def tls_config(r: Rendered) -> dict | None:
    return r.config["server"].get("tls")


def mtls(r: Rendered) -> bool:
    return bool((tls_config(r) or {}).get("client_ca_file"))


def health_port(r: Rendered) -> int | None:
    """The port of server.health_listen when the binary serves it (TLS), else None."""
    if tls_config(r) is None:
        return None
    listen = r.config["server"]["health_listen"]
    match = re.fullmatch(r"0\.0\.0\.0:(\d+)", listen)
    assert match, f"server.health_listen {listen!r} is not 0.0.0.0:<port>"
    return int(match.group(1))


def metrics_port(r: Rendered) -> int | None:
    """The port of server.metrics_listen when the chart turns metrics on, else None."""
    listen = r.config["server"].get("metrics_listen")
    if listen is None:
        return None
    match = re.fullmatch(r"0\.0\.0\.0:(\d+)", listen)
    assert match, f"server.metrics_listen {listen!r} is not 0.0.0.0:<port>"
    return int(match.group(1))


def metrics_rules(policy: dict, port: int) -> list[dict]:
    """The NetworkPolicy's ingress rules that open the metrics port."""
    return [i for i in policy["spec"]["ingress"] if {"port": port, "protocol": "TCP"} in i["ports"]]


# --- Throwaway PKI for the TLS files: a CA, a server certificate it issued, and a second CA
# standing in for the upstream's private CA. Made once per session with `cryptography`.


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _pem_cert(cert) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, sans=()) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@functools.cache
def throwaway_pki() -> dict[str, str]:
    """PEMs by name: ca.crt, tls.crt and tls.key (a kubernetes.io/tls Secret as cert-manager
    writes it), client.crt and client.key (a caller), other.key (a key matching nothing) and
    upstream-ca.crt."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("tokengate test CA", ca_key, "tokengate test CA", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(
        "tg-tokengate", server_key, "tokengate test CA", ca_key, ca=False,
        sans=[x509.DNSName("tg-tokengate.auth.svc"), x509.DNSName("localhost")],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate(
        "billing", client_key, "tokengate test CA", ca_key, ca=False,
        sans=[x509.UniformResourceIdentifier("spiffe://cluster.local/ns/billing/sa/api")],
    )
    upstream_key = ec.generate_private_key(ec.SECP256R1())
    upstream_ca = _certificate("upstream CA", upstream_key, "upstream CA", upstream_key, ca=True)
    return {
        "ca.crt": _pem_cert(ca),
        "tls.crt": _pem_cert(server),
        "tls.key": _pem_key(server_key),
        "client.crt": _pem_cert(client),
        "client.key": _pem_key(client_key),
        "other.key": _pem_key(ec.generate_private_key(ec.SECP256R1())),
        "upstream-ca.crt": _pem_cert(upstream_ca),
    }


# Config keys naming one file that the chart mounts from a ConfigMap or Secret of its own:
# (the key's section, the key, the volume).
SINGLE_FILE_MOUNTS = [
    (("upstream",), "ca_file", "upstream-ca"),
    (("cache",), "key_file", "cache-key"),
    (("cache", "redis"), "password_file", "redis-password"),
    (("cache", "redis"), "ca_file", "redis-ca"),
]


def single_files(r: Rendered) -> dict[str, str]:
    """Volume name -> the file the rendered config names in it, for SINGLE_FILE_MOUNTS."""
    found = {}
    for section, key, volume_name in SINGLE_FILE_MOUNTS:
        node = r.config
        for name in section:
            node = node.get(name, {})
        if key in node:
            found[volume_name] = node[key]
    return found


def volume_items(r: Rendered, name: str) -> list[dict]:
    source = volume(r, name)
    return (source.get("configMap") or source["secret"])["items"]


# What the tests write into each single-file mount, unless the chart renders the content.
REDIS_PASSWORD = "redis-password-for-the-chart-tests"


def single_file_content(r: Rendered, volume_name: str) -> bytes:
    if volume_name == "cache-key":
        generated = r.cache_key_secret()
        if generated is not None:
            (value,) = generated["data"].values()
            return base64.b64decode(value)
        return os.urandom(32)
    if volume_name == "redis-password":
        return REDIS_PASSWORD.encode()
    return throwaway_pki()["upstream-ca.crt" if volume_name == "upstream-ca" else "ca.crt"].encode()


def chart_files(r: Rendered) -> list[str]:
    """Every file path in the rendered config that points into a chart-made mount."""
    files = secret_files(r)
    files += [v for k, v in (tls_config(r) or {}).items() if k.endswith("_file")]
    files += single_files(r).values()
    return files


def container_env(r: Rendered) -> dict[str, str]:
    """The literal environment of the tokengate container (valueFrom entries have no value here)."""
    return {e["name"]: e["value"] for e in r.container.get("env", []) if "value" in e}


def check_config(
    tokengate_bin, r: Rendered, tmp_path, *, tls_files: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `tokengate check-config` on the rendered ConfigMap text, with the container's
    environment, and the secret files written under tmp_path instead of the mount path.
    A chart-rendered Secret supplies its own values; for an existing Secret, each mounted
    private key is a real PEM fixture for the client's algorithm, and every other key any
    non-empty secret. The TLS Secret's keys get the throwaway PKI's PEMs (or `tls_files`), the
    upstream and Redis CA bundles a CA certificate, the cache key the chart-generated Secret's
    bytes (else 32 random ones) and the Redis password REDIS_PASSWORD, each under a directory of
    its own."""
    return run_rendered(tokengate_bin, r, tmp_path, ["check-config"], tls_files=tls_files)


def write_mounted_files(r: Rendered, tmp_path, tls_files: dict[str, str] | None = None) -> str:
    """Writes every file the rendered config reads from a chart-made mount under tmp_path and
    returns the config text with the mount prefixes rewritten to those directories. Each mount
    prefix must occur exactly as often as the config names files in it."""
    text = rewrite_secret_files(r, tmp_path)
    tls = tls_config(r)
    if tls:
        tls_mount = mount(r, "tls")["mountPath"]
        directory = tmp_path / "tls"
        directory.mkdir()
        pems = {**throwaway_pki(), **(tls_files or {})}
        for item in volume(r, "tls")["secret"]["items"]:
            (directory / item["path"]).write_text(pems[item["key"]])
        needle = f'"{tls_mount}/'
        assert text.count(needle) == sum(k.endswith("_file") for k in tls), (needle, text)
        text = text.replace(needle, f'"{directory}/')
    for volume_name in single_files(r):
        (item,) = volume_items(r, volume_name)
        directory = tmp_path / volume_name
        directory.mkdir()
        (directory / item["path"]).write_bytes(single_file_content(r, volume_name))
        needle = f'"{mount(r, volume_name)["mountPath"]}/'
        assert text.count(needle) == 1, (needle, text)
        text = text.replace(needle, f'"{directory}/')
    return text


def run_rendered(tokengate_bin, r: Rendered, tmp_path, args: list[str], *, tls_files=None, popen=False, env_extra=None):
    """Runs `tokengate <args> --config <rendered config>` with the mounted files in place."""
    text = write_mounted_files(r, tmp_path, tls_files)
    config_file = tmp_path / "tokengate.toml"
    config_file.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
    env.update(container_env(r))
    env.update(env_extra or {})
    command = [tokengate_bin, *args, "--config", config_file]
    if popen:
        # Unbuffered, so that select() sees every line not yet read.
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=30)


def rewrite_secret_files(r: Rendered, tmp_path) -> str:
    text = r.config_text
    files = secret_files(r)
    if files:
        mount = secret_mount(r)["mountPath"]  # noqa: F811 (the mount path, not the helper)
        secrets = r.secret_data()
        items = secret_volume(r)["secret"]["items"]
        if secrets is None:
            algs = private_key_algs(r)
            secrets = {
                i["key"]: (
                    (FIXTURE_KEYS / FIXTURE_KEY_FOR_ALG.get(algs[i["path"]], "rsa-a.pem")).read_text()
                    if i["path"] in algs
                    else f"secret-for-{i['key']}\n"
                )
                for i in items
            }
        for item in items:
            (tmp_path / item["path"]).write_text(secrets[item["key"]])
        needle = f'"{mount}/'
        assert text.count(needle) == len(files), (needle, text)
        text = text.replace(needle, f'"{tmp_path}/')
    return text


def test_check_config_accepts_the_rendered_config(rendered, tokengate_bin, tmp_path):
    proc = check_config(tokengate_bin, rendered, tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The effective config is the rendered one, and no secret is printed.
    assert f'listen = "0.0.0.0:{rendered.listen_port}"' in proc.stdout
    for secret in (rendered.secret_data() or {}).values():
        assert secret not in proc.stdout
    assert REDIS_PASSWORD not in proc.stdout


def test_check_config_is_not_vacuous(tokengate_bin, tmp_path):
    # The same pipeline refuses a config the binary does not accept.
    r = Rendered(load_values("dev"))
    r.config_map["data"] = {
        "tokengate.toml": r.config_text.replace('shutdown_grace_period = "5s"', 'shutdown_grace_period = "0s"')
    }
    proc = check_config(tokengate_bin, r, tmp_path)
    assert proc.returncode == 64, proc
    assert "shutdown_grace_period" in proc.stderr


def test_the_container_runs_the_mounted_config(rendered):
    (mount,) = [m for m in rendered.container["volumeMounts"] if m["name"] == "config"]
    (volume,) = [v for v in rendered.pod_spec["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == rendered.config_map["metadata"]["name"]
    (key,) = rendered.config_map["data"]
    args = rendered.container["args"]
    assert args[:2] == ["serve", "--config"]
    assert args[2] == posixpath.join(mount["mountPath"], key)
    assert mount["readOnly"] is True


def test_ports_and_probes_use_the_port_in_server_listen(rendered):
    """The gRPC port is server.listen's. The probes use it too, except with mTLS: then all
    three use the plaintext health port, which is server.health_listen's."""
    port = rendered.listen_port
    ports = {p["name"]: p for p in rendered.container["ports"]}
    assert ports["grpc"]["containerPort"] == port
    # The metrics port is server.metrics_listen's, when metrics are on; never a probe's.
    metrics = metrics_port(rendered)
    if metrics is None:
        assert "metrics" not in ports
    else:
        assert ports.pop("metrics") == {"name": "metrics", "containerPort": metrics, "protocol": "TCP"}
        assert metrics not in (port, health_port(rendered))
    health = health_port(rendered)
    if health is None:
        assert set(ports) == {"grpc"}
        probe_port = port
    else:
        assert set(ports) == {"grpc", "health"}
        assert ports["health"]["containerPort"] == health != port
        assert ports["health"]["protocol"] == "TCP"
        probe_port = health
    probes = {kind: rendered.container[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")}
    for kind, probe in probes.items():
        assert probe["grpc"]["port"] == probe_port, kind
    assert probes["liveness"]["grpc"]["service"] == LIVENESS_SERVICE
    assert probes["startup"]["grpc"]["service"] == LIVENESS_SERVICE
    assert probes["readiness"]["grpc"]["service"] == READINESS_SERVICE


def test_services_target_the_container_port(rendered):
    services = rendered.all("Service")
    assert services
    for service in services:
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        service_port = ports.pop("grpc")
        assert service_port["appProtocol"] == "grpc"
        assert service_port["targetPort"] == rendered.listen_port
        # The main Service carries the plaintext health port with mTLS, for the `helm test`
        # pod; the headless one never does.
        if health_port(rendered) is not None and "clusterIP" not in service["spec"]:
            assert ports.pop("health")["targetPort"] == health_port(rendered)
        # The main Service carries the metrics port when metrics are on, for Prometheus.
        if metrics_port(rendered) is not None and "clusterIP" not in service["spec"]:
            metrics = ports.pop("metrics")
            assert metrics["port"] == metrics["targetPort"] == metrics_port(rendered)
            assert metrics["appProtocol"] == "http"
        assert ports == {}
        selector = service["spec"]["selector"]
        labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    (main,) = [s for s in services if "clusterIP" not in s["spec"]]
    assert main["spec"]["type"] == "ClusterIP"
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == (1 if rendered.values.get("service", {}).get("headless", {}).get("enabled") else 0)


def test_secret_mount_path_is_where_the_config_looks(rendered):
    files = secret_files(rendered)
    mount, volume = secret_mount(rendered), secret_volume(rendered)
    if not files:
        assert mount is None and volume is None
        return
    assert mount["readOnly"] is True
    # Not a subPath mount: the kubelet then never updates the files of a rotated Secret.
    assert "subPath" not in mount and "subPathExpr" not in mount
    assert {posixpath.dirname(f) for f in files} == {mount["mountPath"]}
    items = volume["secret"]["items"]
    assert sorted(posixpath.basename(f) for f in files) == sorted(i["path"] for i in items)
    secrets = rendered.secret_data()
    values = rendered.values
    if secrets is not None:
        assert volume["secret"]["secretName"] == rendered.one("Secret")["metadata"]["name"]
        for item in items:
            assert secrets.get(item["key"]), f"Secret has no value for {item['key']}"
    else:
        assert volume["secret"]["secretName"] == values["secret"]["existingSecret"]


def test_termination_grace_outlasts_the_drain(rendered):
    drain = seconds(rendered.config["server"]["shutdown_grace_period"])
    sleep = rendered.container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep >= 1
    assert rendered.pod_spec["terminationGracePeriodSeconds"] > drain + sleep


def test_termination_grace_follows_the_drain_when_derived():
    r = Rendered({"config": {"server": {"shutdown_grace_period": "2m"}}, "preStopSleepSeconds": 7})
    assert r.pod_spec["terminationGracePeriodSeconds"] == 120 + 7 + 10


def test_rolling_update_never_removes_a_serving_pod(rendered):
    strategy = rendered.deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_network_policy_opens_the_grpc_port_and_the_upstream_port(rendered):
    (policy,) = [p for p in rendered.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test-health")]
    ingress, *health_rules = policy["spec"]["ingress"]
    metrics = metrics_port(rendered)
    if metrics is not None:
        health_rules = [rule for rule in health_rules if rule not in metrics_rules(policy, metrics)]
    assert ingress["ports"] == [{"port": rendered.listen_port, "protocol": "TCP"}]
    # With mTLS (and the test pod), one more rule: the health port, from the test pod only.
    expected = 1 if health_port(rendered) is not None and rendered.all("Pod") else 0
    assert len(health_rules) == expected
    url = urlsplit(rendered.config["upstream"]["base_url"])
    upstream_port = url.port or {"https": 443, "http": 80}[url.scheme]
    egress_ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]]
    assert sorted(egress_ports) == sorted([53, 53, upstream_port, *redis_ports(rendered), *telemetry_ports(rendered)])


def test_network_policy_upstream_port_follows_base_url():
    r = Rendered({"config": {"upstream": {"base_url": "http://auth.internal:8080", "allow_insecure_http": True}}})
    (policy,) = [p for p in r.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test-health")]
    assert [p["port"] for p in policy["spec"]["egress"][1]["ports"]] == [8080]


def test_helm_test_pod_checks_the_service(rendered):
    pod = rendered.one("Pod", "-test-health")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    service = [s for s in rendered.all("Service") if "clusterIP" not in s["spec"]][0]
    # The gRPC port, or with mTLS the plaintext health port: the pod has no client certificate.
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    port = ports["health" if health_port(rendered) is not None else "grpc"]["port"]
    assert container["args"][:3] == ["health-check", "--addr", f"http://{service['metadata']['name']}:{port}"]
    assert container["args"][3:5] == ["--service", READINESS_SERVICE]
    assert container["image"] == rendered.container["image"]
    assert container["securityContext"] == rendered.container["securityContext"]
    assert pod["spec"]["securityContext"] == rendered.pod_spec["securityContext"]
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_restricted_security_context(rendered):
    pod = rendered.pod_spec
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = rendered.container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 10000 and sc["runAsGroup"] > 10000
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}


CHART_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]


def test_standard_labels_on_every_object(rendered):
    for doc in rendered.docs:
        labels = doc["metadata"]["labels"]
        for key in ("name", "instance", "version", "component", "part-of", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, (doc["kind"], key)
        assert labels["helm.sh/chart"] == f"tokengate-{CHART_VERSION}"
        assert doc["metadata"]["namespace"] == "auth"


CONFIG_CHANGES = [
    {"config": {"upstream": {"request_timeout": "7s"}}},
    {"config": {"cache": {"replay_window": "10s"}}},
    {"config": {"clients": {"allow_public": False}}},
    {"containerPort": 50052},
]


@pytest.mark.parametrize("change", CONFIG_CHANGES, ids=str)
def test_config_checksum_changes_with_the_config(change):
    before = Rendered(load_values("dev"))
    after = Rendered({**load_values("dev"), **change})
    annotations = lambda r: r.deployment["spec"]["template"]["metadata"]["annotations"]  # noqa: E731
    assert before.config_text != after.config_text
    assert annotations(before)["checksum/config"] != annotations(after)["checksum/config"]
    assert annotations(before)["checksum/secret"] == annotations(after)["checksum/secret"]


def test_secret_checksum_changes_with_a_chart_rendered_secret():
    values = load_values("dev")
    before = Rendered(values)
    after = Rendered({**values, "secret": {**values["secret"], "values": {**values["secret"]["values"], "dev-app": "rotated"}}})
    annotations = lambda r: r.deployment["spec"]["template"]["metadata"]["annotations"]  # noqa: E731
    assert annotations(before)["checksum/secret"] != annotations(after)["checksum/secret"]
    assert annotations(before)["checksum/config"] == annotations(after)["checksum/config"]


def test_checksum_is_stable_across_renders():
    a, b = Rendered(load_values("production")), Rendered(load_values("production"))
    key = "checksum/config"
    assert a.deployment["spec"]["template"]["metadata"]["annotations"][key] == b.deployment["spec"]["template"]["metadata"]["annotations"][key]
    assert "checksum/secret" not in a.deployment["spec"]["template"]["metadata"]["annotations"]


def test_image_by_tag_or_digest():
    digest = "sha256:" + "a" * 64
    image = lambda values: Rendered(values).container["image"]  # noqa: E731
    assert image({"image": {"repository": "r/tg"}}) == "r/tg:0.1.0"
    assert image({"image": {"repository": "r/tg", "tag": "1.2.3"}}) == "r/tg:1.2.3"
    assert image({"image": {"repository": "r/tg", "digest": digest}}) == f"r/tg@{digest}"
    assert image({"image": {"repository": "r/tg", "tag": "1.2.3", "digest": digest}}) == f"r/tg:1.2.3@{digest}"


def test_replicas_are_left_to_the_autoscaler_when_it_is_on(rendered):
    hpa = rendered.all("HorizontalPodAutoscaler")
    if hpa:
        assert "replicas" not in rendered.deployment["spec"]
        (hpa,) = hpa
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] == rendered.deployment["metadata"]["name"]
    else:
        assert rendered.deployment["spec"]["replicas"] == rendered.values.get("replicaCount", 2)


def test_topology_spread_gets_the_pod_selector(rendered_sets):
    r = rendered_sets["production"]
    (constraint,) = r.pod_spec["topologySpreadConstraints"]
    assert constraint["labelSelector"]["matchLabels"] == r.deployment["spec"]["selector"]["matchLabels"]


# --- Signed client assertions (private_key_jwt, client_secret_jwt) ---------------------------


def test_each_client_reads_the_credential_file_of_its_method(rendered):
    expected = {"none": set(), "private_key_jwt": {"private_key_file"}}
    for client in registered(rendered):
        method = client["auth_method"]
        present = {key for key in CREDENTIAL_FILE_KEYS if key in client}
        assert present == expected.get(method, {"client_secret_file"}), client


def test_every_private_key_file_is_in_the_read_only_secret_mount(rendered_sets):
    # Some value set has a private_key_jwt client, so this is not vacuous.
    with_keys = {name: r for name, r in rendered_sets.items() if private_key_algs(r)}
    assert with_keys, "no value set renders a private_key_file"
    for name, r in with_keys.items():
        mount, volume = secret_mount(r), secret_volume(r)
        assert mount["readOnly"] is True, name
        assert "subPath" not in mount, name
        paths = {i["path"]: i["key"] for i in volume["secret"]["items"]}
        for client in registered(r):
            if "private_key_file" not in client:
                continue
            path = client["private_key_file"]
            assert posixpath.dirname(path) == mount["mountPath"], (name, path)
            (values_client,) = [
                c for c in r.values["config"]["clients"]["registered"] if c["client_id"] == client["client_id"]
            ]
            key = values_client.get("secretKey", f"{client['client_id']}.pem")
            assert paths[posixpath.basename(path)] == key, (name, path)


def with_private_key_client(client: dict, key: str, pem: str) -> dict:
    """The dev values plus a private_key_jwt client whose PEM is in the chart-rendered Secret."""
    values = load_values("dev")
    values["config"]["clients"]["registered"].append(client)
    values["secret"]["values"][key] = pem
    return values


@pytest.mark.parametrize("alg", [None, "RS256", "PS256", "ES256"])
def test_a_chart_rendered_secret_carries_a_private_key(alg, tokengate_bin, tmp_path):
    pem = (FIXTURE_KEYS / FIXTURE_KEY_FOR_ALG[alg or BINARY_DEFAULT_PRIVATE_KEY_ALG]).read_text()
    client = {"client_id": "dev-pk", "auth_method": "private_key_jwt", "key_id": "k1"}
    if alg:
        client["signing_alg"] = alg
    r = Rendered(with_private_key_client(client, "dev-pk.pem", pem))
    assert r.secret_data()["dev-pk.pem"] == pem
    (rendered_client,) = [c for c in registered(r) if c["client_id"] == "dev-pk"]
    assert rendered_client["private_key_file"] == posixpath.join(secret_mount(r)["mountPath"], "dev-pk.pem")
    assert "client_secret_file" not in rendered_client
    proc = check_config(tokengate_bin, r, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "PRIVATE KEY" not in proc.stdout


def test_check_config_refuses_a_private_key_that_cannot_sign_its_alg(tokengate_bin, tmp_path):
    # The same pipeline is not vacuous for keys: an RSA key cannot sign ES256.
    pem = (FIXTURE_KEYS / "rsa-a.pem").read_text()
    client = {"client_id": "dev-pk", "auth_method": "private_key_jwt", "signing_alg": "ES256"}
    proc = check_config(tokengate_bin, Rendered(with_private_key_client(client, "dev-pk.pem", pem)), tmp_path)
    assert proc.returncode == 64, proc
    assert "ES256" in proc.stderr and "dev-pk" in proc.stderr


def test_a_custom_secret_key_names_the_private_key_file():
    pem = (FIXTURE_KEYS / "rsa-a.pem").read_text()
    client = {"client_id": "dev-pk", "auth_method": "private_key_jwt", "secretKey": "keys.dev-pk"}
    r = Rendered(with_private_key_client(client, "keys.dev-pk", pem))
    (rendered_client,) = [c for c in registered(r) if c["client_id"] == "dev-pk"]
    assert rendered_client["private_key_file"].endswith("/keys.dev-pk")
    assert {"key": "keys.dev-pk", "path": "keys.dev-pk"} in secret_volume(r)["secret"]["items"]


SCHEMA = json.loads((CHART / "values.schema.json").read_text())
CLIENT_SCHEMA = SCHEMA["properties"]["config"]["properties"]["clients"]["properties"]["registered"]["items"]
SCHEMA_METHODS = CLIENT_SCHEMA["properties"]["auth_method"]["enum"]
SCHEMA_ALGS = CLIENT_SCHEMA["properties"]["signing_alg"]["enum"]
# Client keys in the values that are the chart's own, not the binary's.
CHART_ONLY_CLIENT_KEYS = {"secretKey"}
# Binary keys the values never take: the files the chart writes, and inline secrets (which would
# end up in the ConfigMap).
BINARY_ONLY_CLIENT_KEYS = {*CREDENTIAL_FILE_KEYS, "client_secret"}


def binary_choices(tokengate_bin, tmp_path, client_toml: str) -> set[str]:
    """The names the binary lists in its "unknown variant/field ..., expected one of" error."""
    config = tmp_path / "probe.toml"
    config.write_text(f'[[clients.registered]]\nclient_id = "probe"\n{client_toml}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
    proc = subprocess.run(
        [tokengate_bin, "check-config", "--config", config], capture_output=True, text=True, env=env, timeout=30
    )
    assert proc.returncode == 64, proc
    assert "expected" in proc.stderr, proc.stderr
    choices = set(re.findall(r"`(\w+)`", proc.stderr.split("expected", 1)[1]))
    assert choices, proc.stderr
    return choices


def test_schema_auth_methods_are_the_binarys(tokengate_bin, tmp_path):
    assert set(SCHEMA_METHODS) == binary_choices(tokengate_bin, tmp_path, 'auth_method = "bogus"')


def test_schema_signing_algs_are_the_binarys(tokengate_bin, tmp_path):
    toml = 'auth_method = "private_key_jwt"\nsigning_alg = "bogus"'
    assert set(SCHEMA_ALGS) == binary_choices(tokengate_bin, tmp_path, toml)


def test_schema_client_keys_are_the_binarys(tokengate_bin, tmp_path):
    binary = binary_choices(tokengate_bin, tmp_path, "bogus_key = 1")
    schema = set(CLIENT_SCHEMA["properties"])
    assert schema - CHART_ONLY_CLIENT_KEYS == binary - BINARY_ONLY_CLIENT_KEYS
    assert BINARY_ONLY_CLIENT_KEYS <= binary


@pytest.fixture(scope="session")
def schemaless_chart(tmp_path_factory) -> Path:
    """A copy of the chart without values.schema.json, so it renders what `helm install
    --skip-schema-validation` would: the binary can then judge values the schema refuses."""
    copy = tmp_path_factory.mktemp("schemaless") / CHART.name
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    return copy


# Each optional assertion setting alone, with every algorithm either side knows plus one neither does.
ASSERTION_SETTINGS = (
    [{}]
    + [{"signing_alg": alg} for alg in [*SCHEMA_ALGS, "EdDSA"]]
    + [{"key_id": "k1"}, {"assertion_audience": "https://platform.ringcentral.com/restapi/oauth/token"}]
)


@pytest.mark.parametrize("method", [*SCHEMA_METHODS, None], ids=str)
def test_schema_and_binary_agree_on_each_methods_settings(method, schemaless_chart, tokengate_bin, tmp_path):
    """For every auth method (None: the key left out) and assertion setting, the schema admits
    the client exactly when `tokengate check-config` accepts the config the chart renders for it
    (rendered without the schema, with real credential files)."""
    verdicts = []
    with helm.Chart.load(CHART) as chart:
        for n, setting in enumerate(ASSERTION_SETTINGS):
            client = {"client_id": "c", **({"auth_method": method} if method else {}), **setting}
            values = {"config": {"clients": {"registered": [client]}}, "secret": {"existingSecret": "s"}}
            try:
                chart.validate_schema(values)
                schema_ok = True
            except helm.HelmValuesError:
                schema_ok = False
            directory = tmp_path / str(n)
            directory.mkdir()
            proc = check_config(tokengate_bin, Rendered(values, chart_dir=schemaless_chart), directory)
            assert proc.returncode in (0, 64), proc
            verdicts.append((setting, schema_ok, proc.returncode == 0, proc.stderr.strip()))
    disagreements = [v for v in verdicts if v[1] != v[2]]
    assert disagreements == []
    # Not vacuous: every method takes its plain form and refuses something.
    assert verdicts[0][1] is True
    assert any(not ok for _, ok, _, _ in verdicts)
    signs = method in ("private_key_jwt", "client_secret_jwt")
    assert all(ok == signs for setting, ok, _, _ in verdicts if set(setting) <= {"key_id", "assertion_audience"} and setting)


# --- TLS, mTLS, the health port, callers and the upstream CA -----------------------------------


def test_a_value_set_renders_mtls_callers_and_an_upstream_ca(rendered_sets):
    # Not vacuous: the checks above and below see every new key in at least one value set.
    r = rendered_sets["mtls"]
    assert mtls(r) and health_port(r) is not None
    assert r.config["callers"] and any("allowed_callers" in c for c in registered(r))
    assert "ca_file" in r.config["upstream"]


def test_check_config_accepts_tls_mtls_callers_and_the_upstream_ca(rendered_sets, tokengate_bin, tmp_path):
    r = rendered_sets["mtls"]
    proc = check_config(tokengate_bin, r, tmp_path)
    assert proc.returncode == 0, proc.stderr
    for line in (
        f'health_listen = "0.0.0.0:{health_port(r)}"',
        f'client_ca_file = "{tmp_path}/tls/ca.crt"',
        f'ca_file = "{tmp_path}/upstream-ca/',
        'mtls_san = "spiffe://cluster.local/ns/billing/sa/api"',
        f"max_concurrent_calls = {r.config['server']['max_concurrent_calls']}",
    ):
        assert line in proc.stdout, (line, proc.stdout)
    assert "PRIVATE KEY" not in proc.stdout


@pytest.mark.parametrize(
    "swap,expected",
    [({"tls.key": "other.key"}, "do not match"), ({"ca.crt": "tls.key"}, "client_ca_file"),
     ({"upstream": None}, "ca_file")],
    ids=["key-mismatch", "bad-client-ca", "missing-upstream-ca"],
)
def test_check_config_is_not_vacuous_for_tls(swap, expected, rendered_sets, tokengate_bin, tmp_path):
    """The same pipeline refuses a key that is not the certificate's, a client CA that is no
    certificate, and a missing upstream CA file."""
    r = rendered_sets["mtls"]
    pki = throwaway_pki()
    if "upstream" in swap:
        text = write_mounted_files(r, tmp_path)
        (tmp_path / "upstream-ca" / "ca.crt").unlink()
        config = tmp_path / "tokengate.toml"
        config.write_text(text)
        proc = subprocess.run([tokengate_bin, "check-config", "--config", config], capture_output=True, text=True, timeout=30)
    else:
        proc = check_config(tokengate_bin, r, tmp_path, tls_files={k: pki[v] for k, v in swap.items()})
    assert proc.returncode == 64, proc
    assert expected in proc.stderr


def test_no_mount_uses_subpath_and_all_are_read_only(rendered):
    # subPath mounts never see an updated Secret or ConfigMap: rotation would not reach them.
    for m in rendered.container["volumeMounts"]:
        assert "subPath" not in m and "subPathExpr" not in m, m
        assert m["readOnly"] is True, m


def test_tls_files_are_in_the_tls_secret_mount(rendered):
    tls = tls_config(rendered)
    if tls is None:
        assert mount(rendered, "tls") is None and volume(rendered, "tls") is None
        assert "health_listen" not in rendered.config["server"]
        return
    directory = mount(rendered, "tls")["mountPath"]
    source = volume(rendered, "tls")["secret"]
    assert source["secretName"] == rendered.values["tls"]["existingSecret"]
    # cert-manager's kubernetes.io/tls layout, file names as the keys.
    expected = {"cert_file": "tls.crt", "key_file": "tls.key", "client_ca_file": "ca.crt"}
    assert set(tls) <= set(expected)
    assert {k: posixpath.basename(v) for k, v in tls.items()} == {k: expected[k] for k in tls}
    assert {posixpath.dirname(v) for v in tls.values()} == {directory}
    assert sorted(i["path"] for i in source["items"]) == sorted(posixpath.basename(v) for v in tls.values())
    assert all(i["key"] == i["path"] for i in source["items"])


def test_the_upstream_ca_file_is_in_its_mount(rendered):
    ca_file = rendered.config["upstream"].get("ca_file")
    if ca_file is None:
        assert mount(rendered, "upstream-ca") is None and volume(rendered, "upstream-ca") is None
        return
    bundle = rendered.values["upstream"]["caBundle"]
    source = volume(rendered, "upstream-ca")
    if bundle.get("configMap"):
        assert source["configMap"]["name"] == bundle["configMap"]
    else:
        assert source["secret"]["secretName"] == bundle["secret"]
    (item,) = (source.get("configMap") or source.get("secret"))["items"]
    assert ca_file == posixpath.join(mount(rendered, "upstream-ca")["mountPath"], item["path"])
    assert item["key"] == bundle["key"]


def test_the_upstream_ca_can_come_from_a_secret():
    r = Rendered({"upstream": {"caBundle": {"secret": "corp-ca", "key": "bundle.pem"}}})
    assert volume(r, "upstream-ca")["secret"]["secretName"] == "corp-ca"
    assert r.config["upstream"]["ca_file"].endswith("/bundle.pem")


def test_without_tls_nothing_opens_the_health_port(rendered):
    if health_port(rendered) is not None:
        return
    assert "health_listen" not in rendered.config["server"]
    port = str(rendered.values.get("healthPort", 50052))
    for doc in rendered.docs:
        assert port not in json.dumps(doc.get("spec", {})), doc["kind"]


def test_with_mtls_the_health_port_is_open_to_the_test_pod_only(rendered_sets):
    r = rendered_sets["mtls"]
    port = health_port(r)
    (policy,) = [p for p in r.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test-health")]
    (rule,) = [i for i in policy["spec"]["ingress"] if {"port": port, "protocol": "TCP"} in i["ports"]]
    assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
    pod = r.one("Pod", "-test-health")
    assert rule["from"] == [{"podSelector": {"matchLabels": {
        k: v for k, v in pod["metadata"]["labels"].items()
        if k in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")}}}]
    # The test pod's own policy lets it reach that port, and only that one, on the servers.
    test_policy = r.one("NetworkPolicy", "-test-health")
    server_rule = [e for e in test_policy["spec"]["egress"] if "to" in e]
    assert [p["port"] for e in server_rule for p in e["ports"]] == [port]
    # Without the test pod the health port has no rule: the kubelet needs none.
    values = {**load_values("mtls"), "tests": {"enabled": False}}
    (policy,) = Rendered(values).all("NetworkPolicy")
    assert all({"port": port, "protocol": "TCP"} not in i["ports"] for i in policy["spec"]["ingress"])


def test_the_metrics_port_is_open_to_the_named_namespace_only(rendered):
    """With metrics on and the NetworkPolicy on, one rule opens the metrics port, to the pods of
    metrics.namespace and nothing else; no other rule opens it."""
    metrics = metrics_port(rendered)
    policies = [p for p in rendered.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test-health")]
    if metrics is None or not policies:
        return
    (policy,) = policies
    (rule,) = metrics_rules(policy, metrics)
    assert rule["ports"] == [{"port": metrics, "protocol": "TCP"}]
    namespace = rendered.values.get("metrics", {}).get("namespace", "monitoring")
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}]


def test_a_value_set_serves_metrics_on_its_own_port_and_namespace(rendered_sets):
    r = rendered_sets["production"]
    assert metrics_port(r) == 9100
    (policy,) = [p for p in r.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test-health")]
    (rule,) = metrics_rules(policy, 9100)
    assert rule["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "observability"}


def test_metrics_off_or_without_a_namespace_open_nothing():
    off = Rendered({"metrics": {"enabled": False}})
    assert "metrics_listen" not in off.config["server"]
    assert "metrics" not in {p["name"] for p in off.container["ports"]}
    for service in off.all("Service"):
        assert "metrics" not in {p["name"] for p in service["spec"]["ports"]}
    for doc in off.docs:
        assert "9090" not in json.dumps(doc.get("spec", {})), doc["kind"]
    # On, but no namespace named: served and on the Service, yet no rule admits anyone.
    closed = Rendered({"metrics": {"namespace": ""}})
    assert metrics_port(closed) == 9090
    (policy,) = [p for p in closed.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test-health")]
    assert metrics_rules(policy, 9090) == []


def test_the_binary_serves_metrics_where_the_chart_says(rendered_sets, tokengate_bin, tmp_path):
    """Serve the rendered default config with its listeners moved to free loopback ports: the
    binary logs the metrics listener and answers GET /metrics there."""
    r = rendered_sets["default"]
    assert metrics_port(r) == 9090
    proc = run_rendered(
        tokengate_bin, r, tmp_path, ["serve"], popen=True,
        env_extra={"TOKENGATE_SERVER__LISTEN": "127.0.0.1:0", "TOKENGATE_SERVER__METRICS_LISTEN": "127.0.0.1:0",
                   "TOKENGATE_LOG_FORMAT": "json"},
    )
    try:
        logs = wait_for_logs(proc, {"serving metrics", "listening"})
        with urllib.request.urlopen(f"http://{logs['serving metrics']['addr']}/metrics", timeout=30) as reply:
            body = reply.read().decode()
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "# TYPE grpc_server_started_total counter" in body, body
        assert "tokengate_build_info{version=" in body, body
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_logs(proc, messages: set[str], patience: float = 20.0) -> dict[str, dict]:
    """The fields of the first JSON log line of each message in `messages`, by message."""
    deadline = time.monotonic() + patience
    seen, found = [], {}
    while time.monotonic() < deadline and set(found) != messages:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.decode(errors="replace"))
        try:
            fields = json.loads(line).get("fields", {})
        except ValueError:
            continue
        if fields.get("message") in messages:
            found.setdefault(fields["message"], fields)
    if set(found) != messages:
        pytest.fail(f"no {messages - set(found)} log line; stdout: {''.join(seen)}")
    return found


@pytest.mark.parametrize("value_set", ["mtls", "observability"])
def test_the_binary_serves_what_the_probes_and_the_test_pod_check(value_set, rendered_sets, tokengate_bin, tmp_path):
    """Serve the rendered TLS config, mutual (mtls) or not (observability), with the files in
    place and loopback addresses on free ports, and run the `helm test` pod's health check
    against the plaintext health port, as the probes do: SERVING. The same plaintext check
    against the gRPC port fails, so the probes could not use it."""
    r = rendered_sets[value_set]
    assert tls_config(r) and mtls(r) == (value_set == "mtls")
    (container,) = r.one("Pod", "-test-health")["spec"]["containers"]
    probe_ports = {r.container[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probe_ports == {health_port(r)}
    assert container["args"][2].endswith(f":{health_port(r)}")
    proc = run_rendered(
        tokengate_bin, r, tmp_path, ["serve"], popen=True,
        env_extra={"TOKENGATE_SERVER__LISTEN": "127.0.0.1:0", "TOKENGATE_SERVER__HEALTH_LISTEN": "127.0.0.1:0",
                   "TOKENGATE_SERVER__METRICS_LISTEN": "127.0.0.1:0", "TOKENGATE_LOG_FORMAT": "json"},
    )
    try:
        logs = wait_for_logs(proc, {"serving plaintext health for probes", "listening"})
        health = logs["serving plaintext health for probes"]["addr"]
        grpc = logs["listening"]["addr"]
        check = lambda addr: subprocess.run(  # noqa: E731
            [tokengate_bin, "health-check", "--addr", f"http://{addr}", *container["args"][3:]],
            capture_output=True, text=True, timeout=30,
        )
        served = check(health)
        assert served.returncode == 0 and served.stdout.strip() == "SERVING", served
        refused = check(grpc)
        assert refused.returncode != 0, refused
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# The binary's defaults for the keys values.yaml sets: the chart must not change them silently.
# Durations are compared as durations (the binary prints "60s" as "1m"), lists as sets.
DEFAULTED_KEYS = {
    "server": ["max_concurrent_calls", "max_queued_calls"],
    "upstream": ["max_connections", "allow_insecure_http", "refresh_ends_access_token"],
    "cache": ["backend", "grants", "refresh_ahead", "min_remaining", "replay_window", "max_entries"],
    "cache.redis": ["url", "key_prefix", "timeout"],
    "telemetry": ["otlp_protocol", "service_name", "sample_ratio"],
}
DURATION_KEYS = {"refresh_ahead", "min_remaining", "replay_window", "timeout"}


def test_values_yaml_defaults_are_the_binarys(tokengate_bin, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENGATE_", "OTEL_"))}
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    proc = subprocess.run([tokengate_bin, "check-config", "--config", empty], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    binary = tomllib.loads(proc.stdout)
    values = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    for section, keys in DEFAULTED_KEYS.items():
        ours, theirs = values, binary
        for name in section.split("."):
            ours, theirs = ours[name], theirs[name]
        for key in keys:
            if key in DURATION_KEYS:
                assert seconds(ours[key]) == seconds_any(theirs[key]), (section, key, ours[key], theirs[key])
            elif isinstance(ours[key], list):
                assert sorted(ours[key]) == sorted(theirs[key]), (section, key)
            else:
                assert ours[key] == theirs[key], (section, key)
    assert values["callers"] == [] and "callers" not in binary
    # Without the redis backend the binary runs with no key file (a random key per process).
    assert "key_file" not in binary["cache"]


def binary_fields(tokengate_bin, tmp_path, toml: str) -> set[str]:
    """The field names the binary lists in its "unknown field ..., expected one of" error."""
    config = tmp_path / "fields.toml"
    config.write_text(toml)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
    proc = subprocess.run([tokengate_bin, "check-config", "--config", config], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 64 and "expected" in proc.stderr, proc
    return set(re.findall(r"`(\w+)`", proc.stderr.split("expected", 1)[1]))


CONFIG_SCHEMA = SCHEMA["properties"]["config"]["properties"]
# Per section: (the TOML that puts an unknown key there, the schema's keys, the keys the chart
# writes itself and the schema refuses).
SECTIONS = {
    "config": ("bogus_key = 1", set(CONFIG_SCHEMA), set()),
    "server": (
        "[server]\nbogus_key = 1",
        set(CONFIG_SCHEMA["server"]["properties"]),
        {"listen", "health_listen", "metrics_listen", "tls"},
    ),
    "server.tls": ('[server.tls]\ncert_file = "a"\nkey_file = "b"\nbogus_key = 1', set(), {"cert_file", "key_file", "client_ca_file"}),
    "upstream": ("[upstream]\nbogus_key = 1", set(CONFIG_SCHEMA["upstream"]["properties"]), {"ca_file"}),
    "callers": ('[[callers]]\nname = "a"\nbogus_key = 1', set(CONFIG_SCHEMA["callers"]["items"]["properties"]), set()),
    "cache": ("[cache]\nbogus_key = 1", set(CONFIG_SCHEMA["cache"]["properties"]), {"key_file"}),
    "cache.redis": (
        "[cache.redis]\nbogus_key = 1",
        set(CONFIG_SCHEMA["cache"]["properties"]["redis"]["properties"]),
        {"password_file", "ca_file"},
    ),
    "telemetry": ("[telemetry]\nbogus_key = 1", set(CONFIG_SCHEMA["telemetry"]["properties"]), set()),
}


@pytest.mark.parametrize("section", SECTIONS)
def test_schema_keys_plus_chart_owned_keys_are_the_binarys(section, tokengate_bin, tmp_path):
    toml, schema, chart_owned = SECTIONS[section]
    assert not schema & chart_owned
    assert schema | chart_owned == binary_fields(tokengate_bin, tmp_path, toml)


CALLERS = [
    {"name": "c", "mtls_san": "spiffe://cluster.local/ns/a/sa/b"},
    {"name": "c", "mtls_san": "c.internal"},
    {"name": "c", "api_key_sha256": hashlib.sha256(b"k").hexdigest()},
    {"name": "c", "api_key_sha256": hashlib.sha256(b"k").hexdigest().upper()},
    {"name": "c", "api_key_sha256": hashlib.sha256(b"k").hexdigest()[:63]},
    {"name": "c", "api_key_sha256": hashlib.sha256(b"k").hexdigest() + "0"},
    {"name": "c", "api_key_sha256": "z" * 64},
    {"name": "c"},
    {"name": "c", "mtls_san": "c.internal", "api_key_sha256": hashlib.sha256(b"k").hexdigest()},
    {"name": "", "api_key_sha256": hashlib.sha256(b"k").hexdigest()},
]


def test_schema_and_binary_agree_on_callers(schemaless_chart, tokengate_bin, tmp_path):
    """Each caller entry in the mTLS value set: the schema admits it exactly when
    `tokengate check-config` accepts the config the chart renders for it."""
    verdicts = []
    with helm.Chart.load(CHART) as chart:
        for n, caller in enumerate(CALLERS):
            values = load_values("mtls")
            values["config"]["callers"] = [caller]
            for client in values["config"]["clients"]["registered"]:
                client.pop("allowed_callers", None)
            try:
                chart.validate_schema(values)
                schema_ok = True
            except helm.HelmValuesError:
                schema_ok = False
            directory = tmp_path / str(n)
            directory.mkdir()
            proc = check_config(tokengate_bin, Rendered(values, chart_dir=schemaless_chart), directory)
            assert proc.returncode in (0, 64), proc
            verdicts.append((caller, schema_ok, proc.returncode == 0, proc.stderr.strip()))
    assert [v for v in verdicts if v[1] != v[2]] == []
    assert sum(ok for _, ok, _, _ in verdicts) == 4


# Telemetry settings: the schema admits each exactly when `tokengate check-config` accepts the
# config the chart renders for it (an empty endpoint leaves the section out, so it is not here).
TELEMETRY_SETTINGS = [
    {"otlp_endpoint": "http://otel-collector.observability.svc:4317"},
    {"otlp_endpoint": "https://otel.example.com", "otlp_protocol": "http/protobuf"},
    {"otlp_endpoint": "http://[fd00::1]:4318/v1/traces", "otlp_protocol": "http/protobuf"},
    {"otlp_endpoint": "http://otel:4317", "sample_ratio": 0, "service_name": "auth"},
    {"otlp_endpoint": "http://otel:4317", "sample_ratio": 1.5},
    {"otlp_endpoint": "http://otel:4317", "sample_ratio": -0.1},
    {"otlp_endpoint": "http://otel:4317", "otlp_protocol": "http/json"},
    {"otlp_endpoint": "otel:4317"},
    {"otlp_endpoint": "ftp://otel:4317"},
    {"otlp_endpoint": "http://otel:4317", "service_name": ""},
]


def test_schema_and_binary_agree_on_telemetry(schemaless_chart, tokengate_bin, tmp_path):
    verdicts = []
    with helm.Chart.load(CHART) as chart:
        for n, setting in enumerate(TELEMETRY_SETTINGS):
            values = {"config": {"telemetry": setting}}
            try:
                chart.validate_schema(values)
                schema_ok = True
            except helm.HelmValuesError:
                schema_ok = False
            directory = tmp_path / str(n)
            directory.mkdir()
            r = Rendered(values, chart_dir=schemaless_chart)
            assert r.config["telemetry"]["otlp_endpoint"] == setting["otlp_endpoint"]
            proc = check_config(tokengate_bin, r, directory)
            assert proc.returncode in (0, 64), proc
            verdicts.append((setting, schema_ok, proc.returncode == 0, proc.stderr.strip()))
    assert [v for v in verdicts if v[1] != v[2]] == []
    assert sum(ok for _, ok, _, _ in verdicts) == 4


def test_schema_telemetry_protocols_are_the_binarys(tokengate_bin, tmp_path):
    protocols = CONFIG_SCHEMA["telemetry"]["properties"]["otlp_protocol"]["enum"]
    assert set(protocols) == binary_fields_any(tokengate_bin, tmp_path, '[telemetry]\notlp_protocol = "bogus"')


def binary_fields_any(tokengate_bin, tmp_path, toml: str) -> set[str]:
    """The names the binary lists in its "expected ..." error, words with a slash included."""
    config = tmp_path / "fields.toml"
    config.write_text(toml)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENGATE_", "OTEL_"))}
    proc = subprocess.run([tokengate_bin, "check-config", "--config", config], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 64 and "expected" in proc.stderr, proc
    return set(re.findall(r"`([\w/]+)`", proc.stderr.split("expected", 1)[1]))


# --- The token broker: cache key, Redis, clients passed through --------------------------------


def redis_backend(r: Rendered) -> bool:
    return r.config["cache"]["backend"] == "redis"


def telemetry_ports(r: Rendered) -> list[int]:
    """The port of the rendered `[telemetry]` otlp_endpoint (the scheme's when it names none);
    [] when the config has no endpoint, so tokengate exports nothing."""
    endpoint = r.config.get("telemetry", {}).get("otlp_endpoint")
    if not endpoint:
        return []
    url = urlsplit(endpoint)
    return [url.port or {"https": 443, "http": 80}[url.scheme]]


def redis_ports(r: Rendered) -> list[int]:
    """The ports of the Redis URLs (6379 when a URL names none), without repeats; [] without
    the redis backend."""
    if not redis_backend(r):
        return []
    ports = []
    for url in r.config["cache"]["redis"]["url"].split(","):
        port = urlsplit(url.strip()).port or 6379
        if port not in ports:
            ports.append(port)
    return ports


def server_policy(r: Rendered) -> dict:
    (policy,) = [p for p in r.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test-health")]
    return policy


FLEET_REDIS = {"config": {"cache": {"backend": "redis"}}}


def test_a_value_set_renders_the_redis_fleet(rendered_sets):
    # Not vacuous: the checks above and below see every broker key in at least one value set.
    r = rendered_sets["fleet"]
    assert redis_backend(r) and r.deployment["spec"]["replicas"] == 3
    assert r.config["cache"]["redis"]["url"].startswith("rediss://")
    assert set(single_files(r)) == {"cache-key", "redis-password", "redis-ca"}
    assert r.cache_key_secret() is not None
    assert [c["client_id"] for c in registered(r) if c.get("cache") is False] == ["legacy-app"]


def test_check_config_accepts_the_fleet(rendered_sets, tokengate_bin, tmp_path):
    r = rendered_sets["fleet"]
    proc = check_config(tokengate_bin, r, tmp_path)
    assert proc.returncode == 0, proc.stderr
    effective = tomllib.loads(proc.stdout)
    cache = effective["cache"]
    assert cache["backend"] == "redis"
    assert cache["key_file"] == f"{tmp_path}/cache-key/cache.key"
    assert cache["redis"]["password_file"] == f"{tmp_path}/redis-password/password"
    assert cache["redis"]["ca_file"] == f"{tmp_path}/redis-ca/ca.crt"
    assert cache["redis"]["url"] == r.config["cache"]["redis"]["url"]
    # The passthrough switch reaches the binary, per client.
    assert {c["client_id"]: c["cache"] for c in effective["clients"]["registered"]} == {
        "billing-app": True, "legacy-app": False}
    assert REDIS_PASSWORD not in proc.stdout


@pytest.mark.parametrize(
    "breakage,expected",
    [("short-key", "cache.key_file"), ("no-key", "needs cache.key_file"), ("bad-ca", "cache.redis.ca_file"),
     ("no-password", "cache.redis.password_file")],
)
def test_check_config_is_not_vacuous_for_the_cache(breakage, expected, rendered_sets, tokengate_bin, tmp_path):
    """The same pipeline refuses a cache key under 32 bytes, redis without a key file, a Redis
    CA that is no certificate and a missing password file."""
    r = rendered_sets["fleet"]
    text = write_mounted_files(r, tmp_path)
    if breakage == "short-key":
        (tmp_path / "cache-key" / "cache.key").write_bytes(b"k" * 31)
    elif breakage == "no-key":
        text = re.sub(r"(?m)^\s*key_file = .*\n", "", text)
    elif breakage == "bad-ca":
        (tmp_path / "redis-ca" / "ca.crt").write_text("not a certificate\n")
    else:
        (tmp_path / "redis-password" / "password").unlink()
    config = tmp_path / "tokengate.toml"
    config.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
    proc = subprocess.run([tokengate_bin, "check-config", "--config", config], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 64, proc
    assert expected in proc.stderr


def file_keys(node) -> list[str]:
    """Every value of a `*_file` key anywhere in a config."""
    if isinstance(node, list):
        return [f for item in node for f in file_keys(item)]
    if isinstance(node, dict):
        return [f for k, v in node.items() for f in ([v] if k.endswith("_file") else file_keys(v))]
    return []


def test_every_file_in_the_config_is_in_a_chart_made_mount(rendered):
    """No file key of the rendered config points anywhere the chart did not mount."""
    files = chart_files(rendered)
    assert sorted(file_keys(rendered.config)) == sorted(files)
    mounts = {m["mountPath"] for m in rendered.container["volumeMounts"]}
    assert {posixpath.dirname(f) for f in files} <= mounts


def test_the_broker_files_are_in_their_mounts(rendered):
    """Each of cache.key_file, cache.redis.password_file and cache.redis.ca_file is the one file
    of a read-only volume of its own, from the Secret or ConfigMap the values name; without the
    file the volume is absent."""
    files = single_files(rendered)
    values = rendered.values or {}
    cache_values = values.get("cache", {})
    for _, _, volume_name in SINGLE_FILE_MOUNTS:
        if volume_name not in files:
            assert volume(rendered, volume_name) is None and mount(rendered, volume_name) is None, volume_name
            continue
        (item,) = volume_items(rendered, volume_name)
        assert item["key"] == item["path"]
        assert files[volume_name] == posixpath.join(mount(rendered, volume_name)["mountPath"], item["path"])
        source = volume(rendered, volume_name)
        if volume_name == "cache-key":
            existing = cache_values.get("key", {}).get("existingSecret")
            name = existing or rendered.cache_key_secret()["metadata"]["name"]
            assert source["secret"]["secretName"] == name
        elif volume_name == "redis-password":
            assert source["secret"]["secretName"] == cache_values["redis"]["password"]["existingSecret"]
        elif volume_name == "redis-ca":
            bundle = cache_values["redis"]["caBundle"]
            assert (source.get("configMap", {}).get("name") or source["secret"]["secretName"]) == (
                bundle.get("configMap") or bundle.get("secret"))


def test_the_cache_key_is_there_exactly_when_needed(rendered):
    """redis: a key file always (the binary refuses redis without one), from the generated Secret
    unless an existing one is named. memory: none unless an existing Secret is named."""
    existing = ((rendered.values or {}).get("cache", {}).get("key", {}).get("existingSecret"))
    has_key = "key_file" in rendered.config["cache"]
    generated = rendered.cache_key_secret()
    if redis_backend(rendered):
        assert has_key
        assert (generated is None) == bool(existing)
    else:
        assert has_key == bool(existing)
        assert generated is None


def test_the_generated_cache_key_is_32_random_bytes_and_rolls_no_pod():
    """Rendered without a cluster (no `lookup`), each render makes a new key, as `helm template`
    would; the pods' checksum does not cover it, so a new key never rolls the pods by itself."""
    a, b = Rendered(load_values("fleet")), Rendered(load_values("fleet"))
    keys = [base64.b64decode(r.cache_key_secret()["data"]["cache.key"]) for r in (a, b)]
    assert [len(k) for k in keys] == [32, 32]
    assert keys[0] != keys[1]
    annotations = lambda r: r.deployment["spec"]["template"]["metadata"]["annotations"]  # noqa: E731
    assert annotations(a) == annotations(b)


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_an_existing_cache_key_secret_is_mounted_and_none_generated(backend):
    values = {**load_values("fleet"), "cache": {"key": {"existingSecret": "fleet-key", "secretKey": "key.bin"}}}
    values["config"] = {**values["config"], "cache": {**values["config"]["cache"], "backend": backend}}
    r = Rendered(values)
    assert r.cache_key_secret() is None
    assert volume(r, "cache-key")["secret"] == {
        "secretName": "fleet-key", "items": [{"key": "key.bin", "path": "key.bin"}], "defaultMode": 0o440}
    assert r.config["cache"]["key_file"] == posixpath.join(mount(r, "cache-key")["mountPath"], "key.bin")


def test_the_redis_password_never_reaches_the_configmap(rendered_sets):
    """The chart only names the password's Secret: the ConfigMap holds the file's path, the pod
    spec mounts the Secret's key, and no value of the chart carries the password itself (the
    schema refuses one in the URL, see test_chart_schema)."""
    r = rendered_sets["fleet"]
    password = r.values["cache"]["redis"]["password"]
    assert r.config["cache"]["redis"]["password_file"].endswith(f"/{password['secretKey']}")
    assert set(r.config["cache"]["redis"]) == {"url", "key_prefix", "timeout", "password_file", "ca_file"}
    assert urlsplit(r.config["cache"]["redis"]["url"]).password is None
    assert volume(r, "redis-password")["secret"]["secretName"] == password["existingSecret"]
    for env in r.container.get("env", []):
        assert "REDIS" not in env["name"], env


def test_network_policy_opens_redis_only_with_the_redis_backend(rendered):
    egress = server_policy(rendered)["spec"]["egress"]
    np = (rendered.values or {}).get("networkPolicy", {}).get("egress", {})
    dns = np.get("dns", True)
    # DNS, the upstream, Redis (with the redis backend), the OTLP collector (with an endpoint),
    # then the extra rules.
    telemetry = bool(telemetry_ports(rendered))
    assert len(egress) == int(dns) + 1 + int(redis_backend(rendered)) + int(telemetry) + len(np.get("extra", []))
    if redis_backend(rendered):
        rule = egress[int(dns) + 1]
        assert rule["ports"] == [{"port": p, "protocol": "TCP"} for p in redis_ports(rendered)]
        assert rule.get("to", []) == np.get("redis", {}).get("to", [])
    if telemetry:
        rule = egress[int(dns) + 1 + int(redis_backend(rendered))]
        assert rule["ports"] == [{"port": p, "protocol": "TCP"} for p in telemetry_ports(rendered)]
        assert rule.get("to", []) == np.get("telemetry", {}).get("to", [])


def test_redis_egress_ports_follow_the_urls():
    url = "redis://a.cache:7000/0, redis://b.cache:7001,redis://c.cache,rediss://d.cache:7000"
    r = Rendered({"config": {"cache": {"backend": "redis", "redis": {"url": url}}}})
    (rule,) = [e for e in server_policy(r)["spec"]["egress"] if e["ports"][0]["port"] == 7000]
    assert rule == {"ports": [{"port": p, "protocol": "TCP"} for p in (7000, 7001, 6379)]}
    # The memory backend opens nothing to Redis, whatever networkPolicy.egress.redis says.
    peers = [{"ipBlock": {"cidr": "10.20.0.0/24"}}]
    r = Rendered({"networkPolicy": {"egress": {"redis": {"to": peers}}}})
    assert [p["port"] for e in server_policy(r)["spec"]["egress"] for p in e["ports"]] == [53, 53, 443]
    r = Rendered({**FLEET_REDIS, "networkPolicy": {"egress": {"redis": {"to": peers}}}})
    assert {"ports": [{"port": 6379, "protocol": "TCP"}], "to": peers} in server_policy(r)["spec"]["egress"]


def test_schema_cache_enums_are_the_binarys(tokengate_bin, tmp_path):
    cache = CONFIG_SCHEMA["cache"]["properties"]
    grants = SCHEMA["definitions"]["grantType"]["enum"]
    assert set(grants) == binary_fields(tokengate_bin, tmp_path, '[cache]\ngrants = ["bogus"]')
    assert set(cache["backend"]["enum"]) == binary_fields(tokengate_bin, tmp_path, '[cache]\nbackend = "bogus"')
    # The clients' allowed_grants take the same names.
    assert CLIENT_SCHEMA["properties"]["allowed_grants"]["items"] == {"$ref": "#/definitions/grantType"}


def binary_accepts(tokengate_bin, r: Rendered, tmp_path, edit=lambda text: text) -> subprocess.CompletedProcess:
    """check-config on the rendered config (files in place), after `edit` of its text."""
    text = edit(write_mounted_files(r, tmp_path))
    config = tmp_path / "tokengate.toml"
    config.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
    proc = subprocess.run([tokengate_bin, "check-config", "--config", config], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode in (0, 64), proc
    return proc


# Per cache duration: values either side of what the binary accepts (zero is fine for the two
# renewal thresholds, not for the replay window or the Redis timeout).
CACHE_DURATIONS = [
    (("refresh_ahead",), ["0s", "1ms", "90s", "5m"]),
    (("min_remaining",), ["0s", "0ms", "250ms", "60s"]),
    (("replay_window",), ["0s", "1ms", "30s", "2m"]),
    (("redis", "timeout"), ["0ms", "1ms", "50ms", "2s"]),
]


def test_schema_and_binary_agree_on_the_cache_durations(schemaless_chart, tokengate_bin, tmp_path):
    """Each cache duration in the fleet value set: the schema admits it exactly when
    `tokengate check-config` accepts the config the chart renders for it."""
    verdicts = []
    with helm.Chart.load(CHART) as chart:
        for path, durations in CACHE_DURATIONS:
            for duration in durations:
                values = load_values("fleet")
                node = values["config"]["cache"]
                node["min_remaining"] = "0s"  # at most any refresh_ahead here
                for name in path[:-1]:
                    node = node.setdefault(name, {})
                node[path[-1]] = duration
                try:
                    chart.validate_schema(values)
                    schema_ok = True
                except helm.HelmValuesError:
                    schema_ok = False
                directory = tmp_path / f"{'.'.join(path)}-{duration}"
                directory.mkdir()
                proc = binary_accepts(tokengate_bin, Rendered(values, chart_dir=schemaless_chart), directory)
                verdicts.append((path, duration, schema_ok, proc.returncode == 0, proc.stderr.strip()))
    assert [v for v in verdicts if v[2] != v[3]] == []
    # Not vacuous: zero is refused for the replay window and the Redis timeout only.
    assert [(v[0], v[1]) for v in verdicts if not v[2]] == [(("replay_window",), "0s"), (("redis", "timeout"), "0ms")]


@pytest.mark.parametrize(
    "min_remaining,refresh_ahead",
    [("60s", "5m"), ("5m", "5m"), ("301s", "5m"), ("1001ms", "1s"), ("1000ms", "1s"), ("0s", "0s"), ("1ms", "0s")],
)
def test_chart_and_binary_agree_on_min_remaining_against_refresh_ahead(min_remaining, refresh_ahead, rendered_sets, tokengate_bin, tmp_path):
    """The chart refuses min_remaining > refresh_ahead (no schema can compare two values) with
    the binary's reason, exactly when the binary refuses it."""
    values = load_values("fleet")
    values["config"]["cache"].update(min_remaining=min_remaining, refresh_ahead=refresh_ahead)
    try:
        Rendered(values)
        chart_ok = True
    except helm.HelmRenderError as error:
        assert "must not exceed config.cache.refresh_ahead" in str(error)
        chart_ok = False

    def edit(text: str) -> str:
        text = re.sub(r'(?m)^(\s*min_remaining = )".*"$', rf'\g<1>"{min_remaining}"', text)
        return re.sub(r'(?m)^(\s*refresh_ahead = )".*"$', rf'\g<1>"{refresh_ahead}"', text)

    proc = binary_accepts(tokengate_bin, rendered_sets["fleet"], tmp_path, edit)
    assert chart_ok == (proc.returncode == 0), proc.stderr
    assert chart_ok == (seconds(min_remaining) <= seconds(refresh_ahead))


# Redis URLs, and whether the binary takes them. The schema admits the same, except a URL with
# a password: the binary would take it, but the password would then be in the ConfigMap.
REDIS_URLS = [
    ("redis://redis:6379/0", True),
    ("rediss://redis-master.cache.svc:6380/0", True),
    ("redis://redis", True),
    ("redis://tokengate@redis:6379/0", True),
    ("redis://[::1]:6379/0", True),
    ("redis://a:7000,redis://b:7001, redis://c:7002", True),
    ("http://redis:6379", False),
    ("redis-sentinel://redis:26379", False),
    ("redis://a:7000,", False),
    ("redis", False),
]
REDIS_URLS_WITH_PASSWORDS = ["redis://:s3cr3t@redis:6379/0", "redis://user:s3cr3t@redis/0", "redis://a:7000,rediss://u:pw@b:7001"]


def test_schema_and_binary_agree_on_redis_urls(schemaless_chart, tokengate_bin, tmp_path):
    verdicts = []
    with helm.Chart.load(CHART) as chart:
        for n, (url, _) in enumerate(REDIS_URLS + [(u, True) for u in REDIS_URLS_WITH_PASSWORDS]):
            values = load_values("fleet")
            values["config"]["cache"]["redis"]["url"] = url
            values["cache"]["redis"]["caBundle"] = {"secret": "", "configMap": "", "key": "ca.crt"}
            try:
                chart.validate_schema(values)
                schema_ok = True
            except helm.HelmValuesError:
                schema_ok = False
            directory = tmp_path / str(n)
            directory.mkdir()
            proc = binary_accepts(tokengate_bin, Rendered(values, chart_dir=schemaless_chart), directory)
            verdicts.append((url, schema_ok, proc.returncode == 0, proc.stderr.strip()))
    expected = [(url, ok and url not in REDIS_URLS_WITH_PASSWORDS, ok) for url, ok in REDIS_URLS] + [
        (url, False, True) for url in REDIS_URLS_WITH_PASSWORDS]
    assert [v[:3] for v in verdicts] == expected, verdicts


def test_the_chart_at_its_upper_bounds_is_the_binarys(tokengate_bin, tmp_path):
    """Every count and duration at its bound at once (the fleet set, so the Redis timeout is in
    use): the chart renders it and `tokengate check-config` accepts it. One past any bound in that
    same config, the binary refuses it naming the key, so the chart's bounds are the binary's."""
    values = load_values("fleet")
    for key, bound, _ in UPPER_BOUNDS:
        node = values["config"]
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = bound
    r = Rendered(values)
    (tmp_path / "at").mkdir()
    proc = check_config(tokengate_bin, r, tmp_path / "at")
    assert proc.returncode == 0, proc.stderr
    for key, bound, past in UPPER_BOUNDS:
        line = re.compile(rf"(?m)^(\s*{re.escape(key.rsplit('.', 1)[1])} = ){re.escape(json.dumps(bound))}$")

        def edit(text: str, line=line, past=past) -> str:
            edited, count = line.subn(rf"\g<1>{json.dumps(past)}", text)
            assert count == 1, (line.pattern, text)
            return edited

        directory = tmp_path / key
        directory.mkdir()
        proc = binary_accepts(tokengate_bin, r, directory, edit)
        assert proc.returncode == 64, proc
        assert f"{key} must be at most" in proc.stderr, proc.stderr
