"""The chart cannot drift from the binary: the rendered config is one `tokengate check-config`
accepts, and the pod spec (ports, probes, mounts, grace period) agrees with that config."""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
from urllib.parse import urlsplit

import pytest

from conftest import Rendered, load_values

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


def secret_files(r: Rendered) -> list[str]:
    return [
        c["client_secret_file"]
        for c in r.config["clients"].get("registered", [])
        if "client_secret_file" in c
    ]


def container_env(r: Rendered) -> dict[str, str]:
    """The literal environment of the tokengate container (valueFrom entries have no value here)."""
    return {e["name"]: e["value"] for e in r.container.get("env", []) if "value" in e}


def check_config(tokengate_bin, r: Rendered, tmp_path) -> subprocess.CompletedProcess:
    """Run `tokengate check-config` on the rendered ConfigMap text, with the container's
    environment, and the secret files written under tmp_path instead of the mount path."""
    text = r.config_text
    files = secret_files(r)
    if files:
        mount = secret_mount(r)["mountPath"]
        secrets = r.secret_data()
        if secrets is None:  # existingSecret: any non-empty value per key the pod mounts
            secrets = {i["key"]: f"secret-for-{i['key']}" for i in secret_volume(r)["secret"]["items"]}
        for item in secret_volume(r)["secret"]["items"]:
            (tmp_path / item["path"]).write_text(secrets[item["key"]] + "\n")
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
