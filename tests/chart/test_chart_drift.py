"""The chart cannot drift from the binary: the rendered config is one `tokengate check-config`
accepts, the pod spec (ports, probes, mounts, grace period) agrees with that config, and the
schema admits the client settings the binary admits, method by method."""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import helm_python as helm
import pytest

from conftest import CHART, REPO, Rendered, load_values

LIVENESS_SERVICE = ""
READINESS_SERVICE = "tokengate.v1.TokenService"


def seconds(duration: str) -> float:
    """A humantime duration as the chart's schema allows it ("500ms", "20s", "1m")."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", duration)
    assert match, f"unexpected duration {duration!r}"
    value, unit = int(match.group(1)), match.group(2)
    return value * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


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


def container_env(r: Rendered) -> dict[str, str]:
    """The literal environment of the tokengate container (valueFrom entries have no value here)."""
    return {e["name"]: e["value"] for e in r.container.get("env", []) if "value" in e}


def check_config(tokengate_bin, r: Rendered, tmp_path) -> subprocess.CompletedProcess:
    """Run `tokengate check-config` on the rendered ConfigMap text, with the container's
    environment, and the secret files written under tmp_path instead of the mount path.
    A chart-rendered Secret supplies its own values; for an existing Secret, each mounted
    private key is a real PEM fixture for the client's algorithm, and every other key any
    non-empty secret."""
    text = r.config_text
    files = secret_files(r)
    if files:
        mount = secret_mount(r)["mountPath"]
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
    config_file = tmp_path / "tokengate.toml"
    config_file.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENGATE_")}
    env.update(container_env(r))
    return subprocess.run(
        [tokengate_bin, "check-config", "--config", config_file],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_check_config_accepts_the_rendered_config(rendered, tokengate_bin, tmp_path):
    proc = check_config(tokengate_bin, rendered, tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The effective config is the rendered one, and no secret is printed.
    assert f'listen = "0.0.0.0:{rendered.listen_port}"' in proc.stdout
    for secret in (rendered.secret_data() or {}).values():
        assert secret not in proc.stdout


def test_check_config_is_not_vacuous(tokengate_bin, tmp_path):
    # The same pipeline refuses a config the binary does not accept.
    r = Rendered(load_values("dev"))
    r.one("ConfigMap")["data"] = {
        "tokengate.toml": r.config_text.replace('shutdown_grace_period = "5s"', 'shutdown_grace_period = "0s"')
    }
    proc = check_config(tokengate_bin, r, tmp_path)
    assert proc.returncode == 64, proc
    assert "shutdown_grace_period" in proc.stderr


def test_the_container_runs_the_mounted_config(rendered):
    (mount,) = [m for m in rendered.container["volumeMounts"] if m["name"] == "config"]
    (volume,) = [v for v in rendered.pod_spec["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == rendered.one("ConfigMap")["metadata"]["name"]
    (key,) = rendered.one("ConfigMap")["data"]
    args = rendered.container["args"]
    assert args[:2] == ["serve", "--config"]
    assert args[2] == posixpath.join(mount["mountPath"], key)
    assert mount["readOnly"] is True


def test_ports_and_probes_use_the_port_in_server_listen(rendered):
    port = rendered.listen_port
    (container_port,) = rendered.container["ports"]
    assert container_port["containerPort"] == port
    assert container_port["name"] == "grpc"
    probes = {kind: rendered.container[f"{kind}Probe"] for kind in ("startup", "readiness", "liveness")}
    for kind, probe in probes.items():
        assert probe["grpc"]["port"] == port, kind
    assert probes["liveness"]["grpc"]["service"] == LIVENESS_SERVICE
    assert probes["startup"]["grpc"]["service"] == LIVENESS_SERVICE
    assert probes["readiness"]["grpc"]["service"] == READINESS_SERVICE


def test_services_target_the_container_port(rendered):
    services = rendered.all("Service")
    assert services
    for service in services:
        (service_port,) = service["spec"]["ports"]
        assert service_port["name"] == "grpc"
        assert service_port["appProtocol"] == "grpc"
        assert service_port["targetPort"] == rendered.listen_port
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
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": rendered.listen_port, "protocol": "TCP"}]
    url = urlsplit(rendered.config["upstream"]["base_url"])
    upstream_port = url.port or {"https": 443, "http": 80}[url.scheme]
    egress_ports = [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]]
    assert sorted(egress_ports) == sorted([53, 53, upstream_port])


def test_network_policy_upstream_port_follows_base_url():
    r = Rendered({"config": {"upstream": {"base_url": "http://auth.internal:8080"}}})
    (policy,) = [p for p in r.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test-health")]
    assert [p["port"] for p in policy["spec"]["egress"][1]["ports"]] == [8080]


def test_helm_test_pod_checks_the_service(rendered):
    pod = rendered.one("Pod", "-test-health")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    service = [s for s in rendered.all("Service") if "clusterIP" not in s["spec"]][0]
    port = service["spec"]["ports"][0]["port"]
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


def test_standard_labels_on_every_object(rendered):
    for doc in rendered.docs:
        labels = doc["metadata"]["labels"]
        for key in ("name", "instance", "version", "component", "part-of", "managed-by"):
            assert f"app.kubernetes.io/{key}" in labels, (doc["kind"], key)
        assert labels["helm.sh/chart"] == "tokengate-0.1.0"
        assert doc["metadata"]["namespace"] == "auth"


CONFIG_CHANGES = [
    {"config": {"upstream": {"request_timeout": "7s"}}},
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
