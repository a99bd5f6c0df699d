"""values.schema.json: wrong types, unknown keys and values past the binary's upper bounds are
refused by install-time validation (render) and by lint, and values.yaml is documented and
covered by the schema."""

from __future__ import annotations

import json
import re

import helm_python as helm
import pytest
import yaml

from conftest import CHART, NAMESPACE, UPPER_BOUNDS, Rendered, config_values, load_values, render

SCHEMA = json.loads((CHART / "values.schema.json").read_text())

# (values, text the error must contain)
REFUSED = [
    # wrong types
    ({"replicaCount": "two"}, "/replicaCount"),
    ({"containerPort": "50051"}, "/containerPort"),
    ({"preStopSleepSeconds": 2.5}, "/preStopSleepSeconds"),
    ({"config": {"clients": {"allow_public": "yes"}}}, "/config/clients/allow_public"),
    ({"config": {"server": {"shutdown_grace_period": 20}}}, "/config/server/shutdown_grace_period"),
    ({"networkPolicy": {"enabled": "true"}}, "/networkPolicy/enabled"),
    ({"podSecurityContext": {"runAsUser": "65532"}}, "/podSecurityContext/runAsUser"),
    ({"extraEnv": {"RUST_LOG": "debug"}}, "/extraEnv"),
    # values outside what the binary accepts
    ({"config": {"server": {"shutdown_grace_period": "20 seconds"}}}, "shutdown_grace_period"),
    ({"config": {"upstream": {"base_url": "https://platform.ringcentral.com/restapi"}}}, "base_url"),
    ({"config": {"upstream": {"token_path": "restapi/oauth/token"}}}, "token_path"),
    (
        {"config": {"clients": {"registered": [{"client_id": "a", "allowed_grants": ["magic"]}]}}},
        "allowed_grants",
    ),
    (
        {"config": {"clients": {"registered": [{"client_id": "a", "auth_method": "tls_client_auth"}]}}},
        "auth_method",
    ),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    ({"service": {"type": "NodePort"}}, "/service/type"),
    # unknown keys, at the top and deep down
    ({"replicas": 3}, "replicas"),
    ({"image": {"tags": "1.0"}}, "tags"),
    ({"securityContext": {"runAsUsr": 1000}}, "runAsUsr"),
    ({"networkPolicy": {"ingress": {"allowExternall": True}}}, "allowExternall"),
    ({"config": {"upstream": {"timeout": "1s"}}}, "timeout"),
    # keys the chart owns, so they cannot drift from the pod spec
    ({"config": {"server": {"listen": "0.0.0.0:9000"}}}, "listen"),
    (
        {"config": {"clients": {"registered": [{"client_id": "a", "client_secret_file": "/x"}]}}},
        "client_secret_file",
    ),
    # inline secrets never go into the ConfigMap
    (
        {"config": {"clients": {"registered": [{"client_id": "a", "client_secret": "s"}]}}},
        "client_secret",
    ),
    # signed assertions: private_key_file is the chart's (from secret.mountPath + secretKey) ...
    (
        {"config": {"clients": {"registered": [
            {"client_id": "a", "auth_method": "private_key_jwt", "private_key_file": "/keys/a.pem"}]}}},
        "private_key_file",
    ),
    # ... signing_alg must be one the binary signs with, and fit the method ...
    (
        {"config": {"clients": {"registered": [
            {"client_id": "a", "auth_method": "private_key_jwt", "signing_alg": "EdDSA"}]}}},
        "/config/clients/registered/0/signing_alg",
    ),
    (
        {"config": {"clients": {"registered": [
            {"client_id": "a", "auth_method": "private_key_jwt", "signing_alg": "HS256"}]}}},
        "/config/clients/registered/0/signing_alg",
    ),
    (
        {"config": {"clients": {"registered": [
            {"client_id": "a", "auth_method": "client_secret_jwt", "signing_alg": "RS256"}]}}},
        "/config/clients/registered/0/signing_alg",
    ),
    # ... and the assertion settings apply only to the two methods that sign
    (
        {"config": {"clients": {"registered": [{"client_id": "a", "signing_alg": "RS256"}]}}},
        "/config/clients/registered/0/signing_alg",
    ),
    (
        {"config": {"clients": {"registered": [
            {"client_id": "a", "auth_method": "client_secret_post", "key_id": "k1"}]}}},
        "/config/clients/registered/0/key_id",
    ),
    (
        {"config": {"clients": {"registered": [
            {"client_id": "a", "auth_method": "none", "assertion_audience": "https://x.example/token"}]}}},
        "/config/clients/registered/0/assertion_audience",
    ),
    (
        {"config": {"clients": {"registered": [
            {"client_id": "a", "auth_method": "private_key_jwt", "key_id": ""}]}}},
        "/config/clients/registered/0/key_id",
    ),
    # TLS, health and upstream CA paths are the chart's (from tls, healthPort, upstream.caBundle)
    ({"config": {"server": {"tls": {"cert_file": "/x.crt", "key_file": "/x.key"}}}}, "tls"),
    ({"config": {"server": {"health_listen": "0.0.0.0:9000"}}}, "health_listen"),
    ({"config": {"upstream": {"ca_file": "/etc/ca.pem"}}}, "ca_file"),
    ({"tls": {"certFile": "/x.crt"}}, "certFile"),
    ({"tls": {"mountPath": "relative/tls"}}, "/tls/mountPath"),
    # TLS needs its Secret, and mTLS needs TLS
    ({"tls": {"enabled": True}}, "/tls/existingSecret"),
    ({"tls": {"mtls": True}}, "/tls/enabled"),
    ({"tls": {"enabled": "yes"}}, "/tls/enabled"),
    ({"healthPort": 80}, "/healthPort"),
    # metrics: the listen address is the chart's (from metrics), the namespace a DNS label
    ({"config": {"server": {"metrics_listen": "0.0.0.0:9090"}}}, "metrics_listen"),
    ({"metrics": {"port": 80}}, "/metrics/port"),
    ({"metrics": {"enabled": "yes"}}, "/metrics/enabled"),
    ({"metrics": {"namespace": "Monitoring"}}, "/metrics/namespace"),
    ({"metrics": {"path": "/stats"}}, "path"),
    # limits and the plain-http guard
    ({"config": {"server": {"max_concurrent_calls": 0}}}, "/config/server/max_concurrent_calls"),
    ({"config": {"server": {"max_queued_calls": -1}}}, "/config/server/max_queued_calls"),
    ({"config": {"upstream": {"max_connections": 0}}}, "/config/upstream/max_connections"),
    ({"config": {"server": {"max_queued_calls": "10"}}}, "/config/server/max_queued_calls"),
    ({"config": {"upstream": {"allow_insecure_http": "false"}}}, "/config/upstream/allow_insecure_http"),
    ({"config": {"upstream": {"base_url": "http://auth.internal"}}}, "/config/upstream/allow_insecure_http"),
    # callers: exactly one of mtls_san and api_key_sha256, the key as 64 hex digits
    ({"config": {"callers": [{"name": "a", "api_key_sha256": "abc123"}]}}, "/config/callers/0/api_key_sha256"),
    ({"config": {"callers": [{"name": "a", "api_key_sha256": "g" * 64}]}}, "/config/callers/0/api_key_sha256"),
    ({"config": {"callers": [{"name": "a", "api_key": "s3cr3t"}]}}, "api_key"),
    ({"config": {"callers": [{"name": "a"}]}}, "/config/callers/0"),
    (
        {"config": {"callers": [{"name": "a", "mtls_san": "a.internal", "api_key_sha256": "a" * 64}]}},
        "/config/callers/0",
    ),
    ({"config": {"callers": [{"api_key_sha256": "a" * 64}]}}, "name"),
    (
        {"config": {"clients": {"registered": [{"client_id": "a", "auth_method": "none", "allowed_callers": []}]}}},
        "/config/clients/registered/0/allowed_callers",
    ),
    ({"upstream": {"caBundle": {"configMap": "ca", "key": "a/b"}}}, "/upstream/caBundle/key"),
    # the token broker: enums, durations and limits the binary accepts ...
    ({"config": {"cache": {"backend": "etcd"}}}, "/config/cache/backend"),
    ({"config": {"cache": {"grants": ["magic"]}}}, "/config/cache/grants/0"),
    ({"config": {"cache": {"grants": ["otp", "otp"]}}}, "/config/cache/grants"),
    ({"config": {"cache": {"refresh_ahead": "5 minutes"}}}, "/config/cache/refresh_ahead"),
    ({"config": {"cache": {"min_remaining": 60}}}, "/config/cache/min_remaining"),
    ({"config": {"cache": {"replay_window": "0s"}}}, "/config/cache/replay_window"),
    ({"config": {"cache": {"max_entries": 0}}}, "/config/cache/max_entries"),
    ({"config": {"cache": {"max_entries": "100000"}}}, "/config/cache/max_entries"),
    ({"config": {"cache": {"redis": {"timeout": "0ms"}}}}, "/config/cache/redis/timeout"),
    ({"config": {"cache": {"redis": {"url": "http://redis:6379"}}}}, "/config/cache/redis/url"),
    ({"config": {"cache": {"redis": {"db": 1}}}}, "db"),
    ({"config": {"clients": {"registered": [{"client_id": "a", "auth_method": "none", "cache": "no"}]}}},
     "/config/clients/registered/0/cache"),
    # ... the files are the chart's (from cache.key and cache.redis) ...
    ({"config": {"cache": {"key_file": "/keys/cache.key"}}}, "key_file"),
    ({"config": {"cache": {"redis": {"password_file": "/x"}}}}, "password_file"),
    ({"config": {"cache": {"redis": {"ca_file": "/x.pem"}}}}, "ca_file"),
    # ... and no Redis password ever goes into the ConfigMap, in a key or in the URL
    ({"config": {"cache": {"redis": {"password": "s3cr3t"}}}}, "password"),
    ({"config": {"cache": {"redis": {"url": "redis://:s3cr3t@redis:6379/0"}}}}, "/config/cache/redis/url"),
    ({"config": {"cache": {"redis": {"url": "rediss://tokengate:s3cr3t@redis/0"}}}}, "/config/cache/redis/url"),
    ({"config": {"cache": {"redis": {"url": "redis://a:7000,redis://u:pw@b:7001"}}}}, "/config/cache/redis/url"),
    ({"cache": {"redis": {"password": {"name": "redis-auth"}}}}, "name"),
    ({"cache": {"key": {"secretKey": "keys/cache.key"}}}, "/cache/key/secretKey"),
    ({"cache": {"redis": {"caBundle": {"secret": "ca", "key": "a/b"}}}}, "/cache/redis/caBundle/key"),
    ({"networkPolicy": {"egress": {"redis": {"port": 6379}}}}, "port"),
    ({"networkPolicy": {"egress": {"redis": {"to": [{"ipBlok": {"cidr": "10.0.0.0/8"}}]}}}}, "ipBlok"),
    # observability: the Prometheus Operator objects ...
    ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
    ({"serviceMonitor": {"interval": "30"}}, "/serviceMonitor/interval"),
    ({"serviceMonitor": {"scrapeTimeout": "1h"}}, "/serviceMonitor/scrapeTimeout"),
    ({"serviceMonitor": {"scheme": "https"}}, "scheme"),
    ({"serviceMonitor": {"labels": {"release": 1}}}, "/serviceMonitor/labels/release"),
    ({"serviceMonitor": {"labels": {"-release": "x"}}}, "invalid propertyName '-release'"),
    ({"prometheusRule": {"force": "true"}}, "/prometheusRule/force"),
    ({"prometheusRule": {"alerts": {"errorRatio": {"threshold": 1.5}}}}, "/prometheusRule/alerts/errorRatio/threshold"),
    ({"prometheusRule": {"alerts": {"callerErrorRatio": {"threshold": "50%"}}}}, "/prometheusRule/alerts/callerErrorRatio/threshold"),
    ({"prometheusRule": {"alerts": {"upstreamSlow": {"thresholdSeconds": 0}}}}, "/prometheusRule/alerts/upstreamSlow/thresholdSeconds"),
    ({"prometheusRule": {"alerts": {"upstreamRateLimited": {"threshold": -1}}}}, "/prometheusRule/alerts/upstreamRateLimited/threshold"),
    ({"prometheusRule": {"alerts": {"rateLimitPenalties": {"threshold": 0.5}}}}, "/prometheusRule/alerts/rateLimitPenalties/threshold"),
    ({"prometheusRule": {"alerts": {"certificateExpiry": {"days": 0}}}}, "/prometheusRule/alerts/certificateExpiry/days"),
    ({"prometheusRule": {"alerts": {"cacheHitRatio": {"minLookupsPerSecond": -0.1}}}}, "/prometheusRule/alerts/cacheHitRatio/minLookupsPerSecond"),
    ({"prometheusRule": {"alerts": {"redisDown": {"for": "five minutes"}}}}, "/prometheusRule/alerts/redisDown/for"),
    ({"prometheusRule": {"alerts": {"callsShed": {"severity": ""}}}}, "/prometheusRule/alerts/callsShed/severity"),
    ({"prometheusRule": {"alerts": {"noReplicaReady": {"enabled": 1}}}}, "/prometheusRule/alerts/noReplicaReady/enabled"),
    ({"prometheusRule": {"alerts": {"redisDown": {"threshold": 1}}}}, "threshold"),
    ({"prometheusRule": {"alerts": {"diskFull": {"enabled": True}}}}, "diskFull"),
    ({"prometheusRule": {"rateWindow": "0m"}}, "/prometheusRule/rateWindow"),
    ({"prometheusRule": {"errorReasons": {"caller": ["invalid_grant"]}}}, "/prometheusRule/errorReasons/caller/0"),
    ({"prometheusRule": {"errorReasons": {"ignored": ["SLOW_DOWN", "SLOW_DOWN"]}}}, "/prometheusRule/errorReasons/ignored"),
    ({"prometheusRule": {"alertLabels": {"severity": "page"}}}, "invalid propertyName 'severity'"),
    ({"prometheusRule": {"alertLabels": {"team-name": "auth"}}}, "invalid propertyName 'team-name'"),
    ({"prometheusRule": {"runbookUrl": "https://x.example/runbooks.md#top"}}, "/prometheusRule/runbookUrl"),
    ({"prometheusRule": {"job": 'tokengate"} or vector(1) #'}}, "/prometheusRule/job"),
    # ... the dashboard ...
    ({"dashboard": {"enabled": "true"}}, "/dashboard/enabled"),
    ({"dashboard": {"labelValue": 1}}, "/dashboard/labelValue"),
    ({"dashboard": {"labelValue": "not a label value"}}, "/dashboard/labelValue"),
    ({"dashboard": {"labelKey": "app.kubernetes.io/name"}}, "/dashboard/labelKey"),
    ({"dashboard": {"namespace": "Grafana"}}, "/dashboard/namespace"),
    ({"dashboard": {"folder": "Auth"}}, "folder"),
    # ... and trace export, whose endpoint never carries credentials into the ConfigMap
    ({"config": {"telemetry": {"otlp_protocol": "http/json"}}}, "/config/telemetry/otlp_protocol"),
    ({"config": {"telemetry": {"sample_ratio": 1.5}}}, "/config/telemetry/sample_ratio"),
    ({"config": {"telemetry": {"sample_ratio": "1"}}}, "/config/telemetry/sample_ratio"),
    ({"config": {"telemetry": {"otlp_endpoint": "otel-collector:4317"}}}, "/config/telemetry/otlp_endpoint"),
    ({"config": {"telemetry": {"otlp_endpoint": "http://user:s3cr3t@otel:4317"}}}, "/config/telemetry/otlp_endpoint"),
    ({"config": {"telemetry": {"service_name": ""}}}, "/config/telemetry/service_name"),
    ({"config": {"telemetry": {"headers": "authorization=Bearer x"}}}, "headers"),
    ({"networkPolicy": {"egress": {"telemetry": {"port": 4317}}}}, "port"),
]


@pytest.mark.parametrize("values,expected", REFUSED, ids=[str(v) for v, _ in REFUSED])
def test_render_refuses_bad_values(values, expected):
    with pytest.raises(helm.HelmValuesError) as error:
        render(values)
    assert expected in str(error.value)


@pytest.mark.parametrize("values,expected", REFUSED[:4] + REFUSED[16:20] + REFUSED[24:29], ids=str)
def test_lint_reports_bad_values_as_errors(values, expected):
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert any(expected in e for e in report["errors"]), report
    assert any(m["severity"] == 3 for m in report["messages"]), report


# Template-level checks that a schema cannot express; each stops the render with a reason.
TEMPLATE_REFUSALS = [
    ({"metrics": {"port": 50051}}, "metrics.port (50051) must differ from containerPort"),
    (
        {"metrics": {"port": 50052}, "tls": {"enabled": True, "mtls": True, "existingSecret": "tls"}},
        "metrics.port (50052) must differ from healthPort",
    ),
    ({"metrics": {"port": 9443}, "service": {"port": 9443}}, "metrics.port (9443) must differ from service.port"),
    (
        {"terminationGracePeriodSeconds": 25},  # 20s drain + 5s sleep = 25: not enough
        "terminationGracePeriodSeconds (25) must be greater than",
    ),
    (
        {"config": {"clients": {"registered": [{"client_id": "a"}]}}},
        "registered clients need secrets",
    ),
    (
        {"config": {"clients": {"registered": [{"client_id": "a"}]}},
         "secret": {"create": True, "values": {"b": "x"}}},
        'no non-empty "a"',
    ),
    (
        {"config": {"clients": {"registered": [{"client_id": "a"}]}},
         "secret": {"create": True, "existingSecret": "s", "values": {"a": "x"}}},
        "not both",
    ),
    (
        {"config": {"clients": {"registered": [
            {"client_id": "a", "auth_method": "none", "default": True},
            {"client_id": "b", "auth_method": "none", "default": True}]}}},
        "more than one default client",
    ),
    (
        {"config": {"clients": {"registered": [
            {"client_id": "a", "auth_method": "none"},
            {"client_id": "a", "auth_method": "none"}]}}},
        "registered twice",
    ),
    (
        {"config": {"clients": {"registered": [{"client_id": "app/1"}]}},
         "secret": {"existingSecret": "s"}},
        "not a valid Secret key",
    ),
    (
        {"config": {"clients": {"registered": [{"client_id": "a", "auth_method": "private_key_jwt"}]}},
         "secret": {"create": True, "values": {"a": "x"}}},
        'no non-empty "a.pem"',
    ),
    (
        {"config": {"clients": {"registered": [{"client_id": "a", "auth_method": "private_key_jwt"}]}},
         "secret": {"create": True, "values": {"a.pem": "not a key"}}},
        "secret.values.a.pem must be the PEM private key",
    ),
    (
        {"config": {"clients": {"registered": [{"client_id": "a", "auth_method": "private_key_jwt"}]}}},
        "registered clients need secrets",
    ),
    (
        {"autoscaling": {"enabled": True}, "resources": {"requests": {"cpu": None}}},
        "needs resources.requests.cpu",
    ),
    (
        {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}},
        "not both",
    ),
    (
        {"tls": {"enabled": True, "existingSecret": "tg-tls", "mtls": True}, "healthPort": 50051},
        "healthPort (50051) must differ from containerPort",
    ),
    (
        {"config": {"callers": [{"name": "billing", "mtls_san": "spiffe://cluster.local/ns/billing/sa/api"}]}},
        '"billing" is known by mtls_san, which needs mutual TLS',
    ),
    (
        {"config": {"callers": [{"name": "a", "api_key_sha256": "a" * 64}, {"name": "a", "api_key_sha256": "b" * 64}]}},
        '"a" is named twice',
    ),
    (
        {"config": {"callers": [{"name": "a", "api_key_sha256": "a" * 64}],
                    "clients": {"registered": [{"client_id": "c", "auth_method": "none", "allowed_callers": ["b"]}]}}},
        'allowed_callers names "b", which is not in config.callers',
    ),
    (
        {"config": {"clients": {"registered": [{"client_id": "c", "auth_method": "none", "allowed_callers": ["b"]}]}}},
        'allowed_callers names "b", which is not in config.callers',
    ),
    (
        {"upstream": {"caBundle": {"configMap": "ca", "secret": "ca", "key": "ca.crt"}}},
        "not both",
    ),
    (
        {"serviceMonitor": {"enabled": True}, "metrics": {"enabled": False}},
        "serviceMonitor.enabled needs metrics.enabled",
    ),
    (
        {"serviceMonitor": {"enabled": True, "force": True, "interval": "10s", "scrapeTimeout": "11s"}},
        "serviceMonitor.scrapeTimeout (11s) must not exceed serviceMonitor.interval (10s)",
    ),
    (
        {"config": {"cache": {"min_remaining": "6m"}}},
        "config.cache.min_remaining (6m) must not exceed config.cache.refresh_ahead (5m)",
    ),
    (
        {"cache": {"redis": {"password": {"existingSecret": "redis-auth"}}}},
        "cache.redis.password and cache.redis.caBundle need config.cache.backend: redis",
    ),
    (
        {"cache": {"redis": {"caBundle": {"configMap": "redis-ca"}}}},
        "cache.redis.password and cache.redis.caBundle need config.cache.backend: redis",
    ),
    (
        {"config": {"cache": {"backend": "redis"}}, "cache": {"redis": {"caBundle": {"configMap": "redis-ca"}}}},
        "no URL in config.cache.redis.url is rediss://",
    ),
    (
        {"config": {"cache": {"backend": "redis", "redis": {"url": "rediss://r:6380"}}},
         "cache": {"redis": {"caBundle": {"configMap": "redis-ca", "secret": "redis-ca"}}}},
        "set cache.redis.caBundle.configMap or cache.redis.caBundle.secret, not both",
    ),
]


@pytest.mark.parametrize("values,expected", TEMPLATE_REFUSALS, ids=[e for _, e in TEMPLATE_REFUSALS])
def test_render_fails_with_a_reason(values, expected):
    with pytest.raises(helm.HelmRenderError) as error:
        render(values)
    assert expected in str(error.value)


# Every setting each signing method takes, as in the binary's config (src/config.rs).
ADMITTED = [
    {"client_id": "a", "auth_method": "private_key_jwt"},
    {"client_id": "a", "auth_method": "private_key_jwt", "signing_alg": "RS256", "key_id": "k1",
     "assertion_audience": "https://platform.ringcentral.com/restapi/oauth/token", "secretKey": "a-key.pem"},
    {"client_id": "a", "auth_method": "private_key_jwt", "signing_alg": "ES256"},
    {"client_id": "a", "auth_method": "private_key_jwt", "signing_alg": "PS256"},
    {"client_id": "a", "auth_method": "client_secret_jwt"},
    {"client_id": "a", "auth_method": "client_secret_jwt", "signing_alg": "HS256", "key_id": "k1",
     "assertion_audience": "https://platform.ringcentral.com/restapi/oauth/token"},
]


@pytest.mark.parametrize("client", ADMITTED, ids=str)
def test_schema_admits_the_signing_methods_settings(client):
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({"config": {"clients": {"registered": [client]}}})


# Redis URLs the schema admits: TLS, a database, an ACL user name without a password, IPv6,
# Redis Cluster seeds (each checked by the binary too, in test_chart_drift).
ADMITTED_REDIS_URLS = [
    "redis://redis:6379/0",
    "rediss://redis-master.cache.svc:6380/0",
    "redis://tokengate@redis",
    "redis://[::1]:6379",
    "redis://a:7000,redis://b:7001, redis://c:7002",
]


@pytest.mark.parametrize("url", ADMITTED_REDIS_URLS)
def test_schema_admits_redis_urls_without_a_password(url):
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({"config": {"cache": {"backend": "redis", "redis": {"url": url}}}})


def test_every_value_set_meets_the_schema(value_set):
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(load_values(value_set))


def walk_schema(node: dict, path: str, found: list[str]):
    """Collect the path of every object schema that has declared properties but allows others."""
    if "$ref" in node:
        return
    if node.get("properties") is not None:
        if node.get("additionalProperties") is not False:
            found.append(path)
        for key, child in node["properties"].items():
            walk_schema(child, f"{path}/{key}", found)
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            walk_schema(node[key], f"{path}[{key}]", found)


# Kubernetes types passed through to the pod spec as they are; the API server (and the
# kubernetes-validate test) checks their contents.
PASS_THROUGH = {"/extraVolumes[items]"}


def test_every_schema_object_refuses_unknown_keys():
    open_objects = []
    walk_schema(SCHEMA, "", open_objects)
    for name, definition in SCHEMA["definitions"].items():
        walk_schema(definition, f"#{name}", open_objects)
    assert set(open_objects) == PASS_THROUGH


def value_paths(node, prefix=""):
    """Every key path in values.yaml (maps only; list items are examples)."""
    if isinstance(node, dict):
        for key, child in node.items():
            yield f"{prefix}/{key}"
            yield from value_paths(child, f"{prefix}/{key}")


def schema_for(path: str) -> dict | None:
    node = SCHEMA
    for key in path.strip("/").split("/"):
        if "$ref" in node:
            node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
        props = node.get("properties") or {}
        if key in props:
            node = props[key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return node


def test_every_default_value_is_typed_and_described_in_the_schema():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [p for p in value_paths(values) if schema_for(p) is None]
    assert missing == []
    top = SCHEMA["properties"]
    assert set(top) == set(values), "schema and values.yaml declare different top-level keys"
    undescribed = [k for k, v in top.items() if not v.get("description") and "$ref" not in v]
    assert undescribed == []


def test_every_key_in_values_yaml_has_a_comment():
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w.-]*):", line)
        if not match:
            continue
        above = lines[number - 1].strip() if number else ""
        if not above.startswith("#"):
            uncommented.append(f"{number + 1}: {line.strip()}")
    assert uncommented == []


def test_the_fleet_example_in_values_yaml_is_the_tested_fleet():
    """The commented fleet example above `cache:` in values.yaml is part of
    tests/chart/values/fleet.yaml, so what it shows renders, lints, validates, passes checkov and
    `tokengate check-config` as that value set does."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    start = lines.index("# The fleet example (tested as tests/chart/values/fleet.yaml): three pods share one token cache")
    example = []
    for line in lines[start + 1:]:
        if line == "#":
            break
        if line.startswith("#   "):
            example.append(line[4:])
    shown = yaml.safe_load("\n".join(example))
    fleet = load_values("fleet")

    def contained(part, whole, path=""):
        if isinstance(part, dict):
            assert isinstance(whole, dict), path
            for key, value in part.items():
                assert key in whole, f"{path}/{key}"
                contained(value, whole[key], f"{path}/{key}")
        else:
            assert part == whole, path

    assert shown and set(shown) >= {"replicaCount", "config", "cache", "networkPolicy"}
    contained(shown, fleet)


def config_at(r, key: str):
    node = r.config
    for name in key.split("."):
        node = node[name]
    return node


@pytest.mark.parametrize("key,bound,past", UPPER_BOUNDS, ids=[k for k, _, _ in UPPER_BOUNDS])
def test_the_upper_bound_itself_is_admitted(key, bound, past):
    """The binary's bound renders (schema and templates), into the config unchanged."""
    assert config_at(Rendered(config_values(key, bound)), key) == bound


@pytest.mark.parametrize("key,bound,past", UPPER_BOUNDS, ids=[k for k, _, _ in UPPER_BOUNDS])
def test_one_past_the_upper_bound_is_refused_naming_the_key(key, bound, past):
    """Counts by the schema (helm install and helm lint); durations at render time (helm
    install and helm template), as no schema can compare the number inside "11m"."""
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as error:
        render(config_values(key, past))
    if isinstance(bound, int):
        assert error.type is helm.HelmValuesError
        expected = f"/config/{key.replace('.', '/')}"
        report = helm.lint(CHART, config_values(key, past), strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
        assert any(expected in e for e in report["errors"]), report
    else:
        assert error.type is helm.HelmRenderError
        expected = f"config.{key} ({past}) must be at most"
    assert expected in str(error.value)


@pytest.mark.parametrize(
    "key,value",
    [
        ("upstream.request_timeout", "99999999999999999999m"),
        ("cache.replay_window", "9223372036854775807ms"),
        ("server.shutdown_grace_period", "153722867280912931m"),  # wraps int64 in milliseconds
        ("server.max_concurrent_calls", 10**20),
    ],
)
def test_a_huge_value_is_refused_not_wrapped(key, value):
    """Numbers far past int64 milliseconds are refused, not wrapped round into small ones."""
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)) as error:
        render(config_values(key, value))
    if isinstance(value, int):
        assert f"/config/{key.replace('.', '/')}" in str(error.value)
    else:
        assert f"config.{key} ({value}) must be at most" in str(error.value)
