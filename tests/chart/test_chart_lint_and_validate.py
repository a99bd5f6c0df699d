"""Strict `helm lint` and strict Kubernetes schema validation of every value set."""

from __future__ import annotations

import copy

import helm_python as helm
import kubernetes_validate
import pytest

from conftest import CHART, NAMESPACE, load_values

# Info-level lint findings we accept, with the reason. Anything else (or any warning or error)
# fails the test.
ACCEPTED_LINT_INFO = {
    # The project has no logo to point at; an icon URL would be invented.
    ("Chart.yaml", "icon is recommended"),
}

# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion; native preStop sleep is on by
# default from 1.30) and the newest schema kubernetes-validate bundles.
KUBE_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_strict_lint_is_clean(value_set, kube_version):
    report = helm.lint(
        CHART,
        load_values(value_set),
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{kube_version}",
    )
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    unexpected = [
        m for m in report["messages"] if (m["path"], m["error"]) not in ACCEPTED_LINT_INFO
    ]
    assert unexpected == []
    assert all(m["severity"] == 1 for m in report["messages"]), report["messages"]


def test_newest_schema_is_newer_than_the_minimum():
    assert tuple(map(int, KUBE_VERSIONS[1].split("."))) > (1, 30, 0), KUBE_VERSIONS


# The Prometheus Operator's kinds: kubernetes-validate has no schema for CRDs, so
# test_chart_monitoring.py checks their structure instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_manifests_pass_strict_kubernetes_validation(rendered, kube_version):
    assert rendered.docs, "nothing rendered"
    failures = []
    for doc in rendered.docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {e.path}: {e.message}")
    assert failures == []


def test_strict_validation_catches_a_bad_manifest(rendered_sets):
    # The validator is not vacuous: an unknown field and a named gRPC probe port both fail.
    deployment = copy.deepcopy(rendered_sets["default"].deployment)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinessProbe"]["grpc"]["port"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)
    container["readinessProbe"]["grpc"]["port"] = 50051
    kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)
    deployment["spec"]["bogusField"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)
    del deployment["spec"]["bogusField"]


def test_every_value_set_renders_the_expected_objects(rendered_sets):
    kinds = {name: sorted(d["kind"] for d in r.docs) for name, r in rendered_sets.items()}
    # The test Pod and its NetworkPolicy are `helm test` hooks.
    base = ["ConfigMap", "Deployment", "NetworkPolicy", "NetworkPolicy", "Pod", "Service"]
    base += ["ServiceAccount"]
    assert kinds["default"] == sorted(base + ["PodDisruptionBudget"])
    assert kinds["dev"] == sorted(base + ["Secret"])
    assert kinds["production"] == sorted(base + ["HorizontalPodAutoscaler", "PodDisruptionBudget"])
    assert kinds["headless"] == sorted(base + ["PodDisruptionBudget", "Service"])
    # TLS and the upstream CA come from existing Secrets and ConfigMaps: nothing more rendered.
    assert kinds["mtls"] == sorted(base + ["PodDisruptionBudget"])
    # The redis backend's cache key, generated; the Redis password and CA are existing objects.
    assert kinds["fleet"] == sorted(base + ["PodDisruptionBudget", "Secret"])
    # The monitoring objects, the dashboard's ConfigMap, and the fleet's generated cache key.
    assert kinds["observability"] == sorted(
        base + ["ConfigMap", "PodDisruptionBudget", "PrometheusRule", "Secret", "ServiceMonitor"]
    )


def test_crd_kinds_have_no_schema_and_built_in_kinds_have_one(rendered_sets):
    """kubernetes-validate knows every other kind the chart renders, and none of the CRDs, so
    skipping the CRD kinds above skips nothing else."""
    for doc in rendered_sets["observability"].docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
                kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)
        else:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)
