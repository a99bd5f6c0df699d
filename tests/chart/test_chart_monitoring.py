"""The chart's observability objects: the ServiceMonitor and the PrometheusRule (Prometheus
Operator CRDs, which kubernetes-validate has no schema for, so their structure is checked here),
the Grafana dashboard's ConfigMap, and the `[telemetry]` section with its NetworkPolicy egress.
The alerts' behaviour is test_chart_alerts.py's (promtool)."""

from __future__ import annotations

import json
import re
import tomllib

import helm_python as helm
import pytest
import yaml

from conftest import CHART, NAMESPACE, RELEASE, REPO, Rendered, load_values, render

FULLNAME = f"{RELEASE}-tokengate"
MONITORING_API = "monitoring.coreos.com/v1"
ALERTS = {
    "errorRatio": "TokengateErrorRatioHigh",
    "callerErrorRatio": "TokengateCallerErrorRatioHigh",
    "upstreamUnavailable": "TokengateUpstreamUnavailable",
    "upstreamSlow": "TokengateUpstreamSlow",
    "upstreamRateLimited": "TokengateUpstreamRateLimited",
    "upstreamRetrying": "TokengateUpstreamRetrying",
    "rateLimitPenalties": "TokengateRateLimitPenaltiesInForce",
    "callsShed": "TokengateCallsShed",
    "certificateExpiry": "TokengateCertificateExpiringSoon",
    "signingKeyReload": "TokengateSigningKeyReloadFailing",
    "noReplicaReady": "TokengateNoReplicaReady",
    "redisDown": "TokengateRedisDown",
    "cacheHitRatio": "TokengateCacheHitRatioCollapsed",
}
DASHBOARD_FILE = CHART / "dashboards" / "tokengate.json"


def rules(r: Rendered) -> list[dict]:
    (group,) = r.one("PrometheusRule")["spec"]["groups"]
    return group["rules"]


def rule(r: Rendered, alert: str) -> dict:
    (found,) = [x for x in rules(r) if x["alert"] == alert]
    return found


def dashboard_map(r: Rendered) -> dict:
    return r.one("ConfigMap", "-dashboard")


# --- Rendered only when asked, and only where the API exists (or forced) ----------------------


@pytest.mark.parametrize("key,kind", [("serviceMonitor", "ServiceMonitor"), ("prometheusRule", "PrometheusRule")])
def test_operator_objects_render_with_the_flag_and_the_api_or_force(key, kind):
    assert Rendered({}).all(kind) == []
    # The Helm engine here, like `helm template`, lists no monitoring.coreos.com/v1: enabled
    # alone renders nothing, as it would on a cluster without the Prometheus Operator.
    assert Rendered({key: {"enabled": True}}).all(kind) == []
    assert Rendered({key: {"force": True}}).all(kind) == []
    (obj,) = Rendered({key: {"enabled": True, "force": True}}).all(kind)
    assert obj["apiVersion"] == MONITORING_API
    assert obj["metadata"] == {
        "name": FULLNAME,
        "namespace": NAMESPACE,
        "labels": Rendered({}).one("Service")["metadata"]["labels"],
    }


def test_the_api_check_is_the_operators_group_version():
    """What the engine cannot be told in the tests: the template asks for exactly the group and
    version the objects use, which `helm template --api-versions` and a cluster list."""
    for name in ("servicemonitor.yaml", "prometheusrule.yaml"):
        text = (CHART / "templates" / name).read_text()
        assert f"apiVersion: {MONITORING_API}" in text
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert f'.Capabilities.APIVersions.Has "{MONITORING_API}"' in helpers


@pytest.mark.parametrize("key", ["serviceMonitor", "prometheusRule"])
def test_operator_objects_need_metrics(key):
    with pytest.raises(helm.HelmRenderError) as error:
        render({key: {"enabled": True}, "metrics": {"enabled": False}})
    assert f"{key}.enabled needs metrics.enabled" in str(error.value)


def test_the_dashboard_renders_with_its_flag():
    assert [c for c in Rendered({}).all("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")] == []
    assert dashboard_map(Rendered({"dashboard": {"enabled": True}}))


# --- ServiceMonitor -------------------------------------------------------------------------


def test_the_service_monitor_scrapes_the_metrics_port_of_the_main_service(rendered_sets):
    r = rendered_sets["observability"]
    monitor = r.one("ServiceMonitor")
    values = load_values("observability")["serviceMonitor"]
    assert monitor["metadata"]["labels"]["release"] == values["labels"]["release"]
    spec = monitor["spec"]
    assert set(spec) == {"selector", "namespaceSelector", "endpoints"}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "scheme": "http",
        "interval": values["interval"],
        "scrapeTimeout": values["scrapeTimeout"],
    }
    # The selector picks the main Service, whose port "metrics" reaches the container's.
    selected = [
        s for s in r.all("Service")
        if spec["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == [FULLNAME]
    (port,) = [p for p in selected[0]["spec"]["ports"] if p["name"] == "metrics"]
    (container_port,) = [p for p in r.container["ports"] if p["name"] == "metrics"]
    assert port["targetPort"] == container_port["containerPort"]
    assert r.config["server"]["metrics_listen"] == f"0.0.0.0:{container_port['containerPort']}"


def test_the_headless_service_is_selected_too_but_has_no_metrics_port():
    """Both Services carry the server's labels; only the main one has the port "metrics", so
    the Operator makes one target per pod."""
    r = Rendered({"serviceMonitor": {"enabled": True, "force": True}, "service": {"headless": {"enabled": True}}})
    selector = r.one("ServiceMonitor")["spec"]["selector"]["matchLabels"]
    services = {s["metadata"]["name"]: s for s in r.all("Service")}
    assert set(services) == {FULLNAME, f"{FULLNAME}-headless"}
    with_metrics = [
        name for name, s in services.items()
        if selector.items() <= s["metadata"]["labels"].items()
        and "metrics" in {p["name"] for p in s["spec"]["ports"]}
    ]
    assert with_metrics == [FULLNAME]


def test_the_scrape_timeout_may_not_exceed_the_interval():
    Rendered({"serviceMonitor": {"enabled": True, "force": True, "interval": "10s", "scrapeTimeout": "10s"}})
    with pytest.raises(helm.HelmRenderError) as error:
        render({"serviceMonitor": {"enabled": True, "force": True, "interval": "10s", "scrapeTimeout": "15s"}})
    assert "serviceMonitor.scrapeTimeout (15s) must not exceed serviceMonitor.interval (10s)" in str(error.value)


# --- PrometheusRule -------------------------------------------------------------------------


def test_every_alert_is_labelled_described_and_linked_to_its_runbook(rendered_sets):
    r = rendered_sets["observability"]
    values = load_values("observability")["prometheusRule"]
    obj = r.one("PrometheusRule")
    assert obj["metadata"]["labels"]["release"] == values["labels"]["release"]
    (group,) = obj["spec"]["groups"]
    assert set(group) == {"name", "rules"} and group["name"] == "tokengate"
    assert [x["alert"] for x in group["rules"]] == list(ALERTS.values())
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]
    for key, alert in ALERTS.items():
        x = rule(r, alert)
        assert set(x) == {"alert", "expr", "for", "labels", "annotations"}, alert
        assert x["for"] == defaults["alerts"][key]["for"]
        assert x["labels"] == {"severity": defaults["alerts"][key]["severity"], **values["alertLabels"]}
        assert set(x["annotations"]) == {"summary", "description", "runbook_url"}
        assert x["annotations"]["runbook_url"] == f"docs/runbooks.md#{alert.lower()}"
        assert len(x["annotations"]["summary"]) > 20 and len(x["annotations"]["description"]) > 80
        # Every expression is this release's: namespace and job select its series.
        selector = f'namespace="{NAMESPACE}", job="{FULLNAME}"'
        assert selector in x["expr"], alert
        assert x["expr"].count(selector) == x["expr"].count("{"), alert


def test_the_rule_follows_its_values():
    values = {
        "prometheusRule": {
            "enabled": True,
            "force": True,
            "job": "tokengate-scraped",
            "runbookUrl": "https://git.example.com/platform/tokengate/blob/main/docs/runbooks.md",
            "rateWindow": "10m",
            "errorReasons": {"caller": ["INVALID_GRANT"], "ignored": []},
            "alerts": {
                "redisDown": {"enabled": False},
                "errorRatio": {"threshold": 0.2, "for": "1h", "severity": "page"},
                "upstreamSlow": {"thresholdSeconds": 0.75},
                "certificateExpiry": {"days": 30},
                "cacheHitRatio": {"threshold": 0.9, "minLookupsPerSecond": 2},
                "upstreamRetrying": {"threshold": 0.25, "minRequestsPerSecond": 3},
            },
        }
    }
    r = Rendered(values)
    names = [x["alert"] for x in rules(r)]
    assert names == [a for a in ALERTS.values() if a != "TokengateRedisDown"]
    error_ratio = rule(r, "TokengateErrorRatioHigh")
    assert error_ratio["for"] == "1h" and error_ratio["labels"]["severity"] == "page"
    assert re.search(r">\s*0\.2\s*$", error_ratio["expr"])
    # Every reason but OK, the caller's and the ignored ones is the service's.
    assert 'reason!~"OK|INVALID_GRANT"' in error_ratio["expr"]
    assert 'reason=~"INVALID_GRANT"' in rule(r, "TokengateCallerErrorRatioHigh")["expr"]
    assert re.search(r">\s*0\.75\s*$", rule(r, "TokengateUpstreamSlow")["expr"])
    assert "< 30 * 86400" in rule(r, "TokengateCertificateExpiringSoon")["expr"]
    hit_ratio = rule(r, "TokengateCacheHitRatioCollapsed")["expr"]
    assert ") < 0.9" in hit_ratio and re.search(r">\s*2\s*$", hit_ratio)
    retrying = rule(r, "TokengateUpstreamRetrying")["expr"]
    assert ") > 0.25" in retrying and re.search(r">\s*3\s*$", retrying)
    for x in rules(r):
        assert 'job="tokengate-scraped"' in x["expr"] and f'job="{FULLNAME}"' not in x["expr"]
        assert "[5m]" not in x["expr"]
        assert x["annotations"]["runbook_url"] == (
            "https://git.example.com/platform/tokengate/blob/main/docs/runbooks.md#" + x["alert"].lower()
        )
    assert "[10m]" in error_ratio["expr"]


def test_every_alert_has_a_switch_in_values():
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["alerts"]
    assert set(defaults) == set(ALERTS)
    for key in ALERTS:
        r = Rendered({"prometheusRule": {"enabled": True, "force": True, "alerts": {key: {"enabled": False}}}})
        assert [x["alert"] for x in rules(r)] == [a for k, a in ALERTS.items() if k != key]


# --- The Grafana dashboard ------------------------------------------------------------------


def test_the_dashboard_configmap_carries_the_charts_dashboard():
    expected = json.loads(DASHBOARD_FILE.read_text())
    cm = dashboard_map(Rendered(load_values("observability")))
    assert cm["metadata"]["name"] == f"{FULLNAME}-dashboard"
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Auth"}
    (key,) = cm["data"]
    assert key == "tokengate.json"
    dashboard = json.loads(cm["data"][key])
    assert dashboard == expected
    assert dashboard["panels"] and dashboard.get("title")


def test_the_dashboard_label_and_namespace_follow_values():
    r = Rendered({"dashboard": {"enabled": True, "labelKey": "grafana.example.com/dashboard", "labelValue": "tokengate", "namespace": "grafana"}})
    cm = dashboard_map(r)
    assert cm["metadata"]["labels"]["grafana.example.com/dashboard"] == "tokengate"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["namespace"] == "grafana"
    assert "annotations" not in cm["metadata"]


def test_the_packaged_chart_keeps_the_dashboard(tmp_path):
    """.helmignore must not drop dashboards/: package the chart as `helm package` does and
    render the dashboard from the archive."""
    archive = helm.package(CHART, destination=str(tmp_path))
    with helm.Chart.load(archive) as chart:
        out = chart.render(values={"dashboard": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE)
    (text,) = [t for path, t in out.items() if path.endswith("dashboard-configmap.yaml")]
    (cm,) = [d for d in yaml.safe_load_all(text) if d]
    assert json.loads(cm["data"]["tokengate.json"]) == json.loads(DASHBOARD_FILE.read_text())


# --- [telemetry] ----------------------------------------------------------------------------


def test_no_endpoint_writes_no_telemetry_section(rendered):
    endpoint = (rendered.values or {}).get("config", {}).get("telemetry", {}).get("otlp_endpoint", "")
    if endpoint:
        assert rendered.config["telemetry"]["otlp_endpoint"] == endpoint
    else:
        assert "telemetry" not in rendered.config
        assert "[telemetry]" not in rendered.config_text


def test_the_telemetry_section_has_the_contracts_keys(rendered_sets):
    r = rendered_sets["observability"]
    values = load_values("observability")["config"]["telemetry"]
    assert r.config["telemetry"] == values
    assert set(r.config["telemetry"]) == {"otlp_endpoint", "otlp_protocol", "service_name", "sample_ratio"}
    # The ratio stays a TOML float, whatever YAML made of it.
    one = Rendered({"config": {"telemetry": {"otlp_endpoint": "http://otel:4317", "sample_ratio": 1}}})
    assert isinstance(tomllib.loads(one.config_text)["telemetry"]["sample_ratio"], float)


@pytest.mark.parametrize(
    "endpoint,port",
    [
        ("http://otel-collector.observability:4317", 4317),
        ("https://otel.example.com", 443),
        ("http://otel.example.com/v1/traces", 80),
        ("http://[fd00::1]:4318", 4318),
    ],
)
def test_the_network_policy_opens_the_collectors_port(endpoint, port):
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}]
    for to in ([], peers):
        r = Rendered({"config": {"telemetry": {"otlp_endpoint": endpoint}}, "networkPolicy": {"egress": {"telemetry": {"to": to}}}})
        (policy,) = [p for p in r.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test-health")]
        expected = {"ports": [{"port": port, "protocol": "TCP"}], **({"to": to} if to else {})}
        assert policy["spec"]["egress"][2] == expected
        assert policy["spec"]["egress"][-1] == expected


def test_without_an_endpoint_the_collector_gets_no_egress():
    peers = [{"ipBlock": {"cidr": "10.0.0.0/8"}}]
    r = Rendered({"networkPolicy": {"egress": {"telemetry": {"to": peers}}}})
    (policy,) = [p for p in r.all("NetworkPolicy") if not p["metadata"]["name"].endswith("-test-health")]
    assert [p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]] == [53, 53, 443]


def notes(values: dict) -> str:
    (text,) = [t for path, t in render(values).items() if path.endswith("NOTES.txt")]
    return text


@pytest.mark.parametrize("key,kind", [("serviceMonitor", "ServiceMonitor"), ("prometheusRule", "PrometheusRule")])
def test_the_notes_warn_when_an_enabled_object_was_not_rendered(key, kind):
    """Enabled but not rendered (no Operator API, no force) is easy to miss: the notes say so."""
    warning = f"WARNING: {key}.enabled is set, but this cluster does not serve {MONITORING_API}"
    assert warning in notes({key: {"enabled": True}})
    forced = notes({key: {"enabled": True, "force": True}})
    assert warning not in forced and f"A {kind} ({key}) is rendered" in forced
    assert "WARNING" not in notes({}) and f"A {kind}" not in notes({})


def test_the_readmes_observability_example_renders(tmp_path):
    """The README's example under "Run it on Kubernetes" meets the schema and, with `force`
    (no Operator API here), renders every object it turns on."""
    readme = (REPO / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if b.startswith("serviceMonitor:")]
    values = yaml.safe_load(block)
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values)
    for key in ("serviceMonitor", "prometheusRule"):
        values[key]["force"] = True
    r = Rendered(values)
    assert r.one("ServiceMonitor") and r.one("PrometheusRule") and dashboard_map(r)
    assert r.config["telemetry"]["otlp_endpoint"] == values["config"]["telemetry"]["otlp_endpoint"]
    assert re.search(r">\s*1\s*$", rule(r, "TokengateUpstreamSlow")["expr"])


def test_the_notes_warn_when_the_alerts_name_a_job_nothing_scrapes():
    rule_only = {"prometheusRule": {"enabled": True, "force": True}}
    warning = f'WARNING: the alerts select job="{FULLNAME}"'
    assert warning in notes(rule_only)
    assert warning not in notes({**rule_only, "serviceMonitor": {"enabled": True, "force": True}})
    assert warning not in notes({"prometheusRule": {"enabled": True, "force": True, "job": "kubernetes-pods"}})
