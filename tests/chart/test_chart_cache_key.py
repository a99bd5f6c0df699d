"""The cache key Secret the chart generates for the redis backend is kept across upgrades: the
template reads the key already in the cluster with Helm's `lookup` and renders it again.

`lookup` returns nothing in an offline render, so these tests render cluster-aware
(helm-python-sdk's Config.render, the same engine code path as `helm upgrade`) against a small
stand-in for the Kubernetes API server: it answers the discovery request and the GET of a
Secret, from a dict of Secrets, as the real API server would (a Secret, or a 404 Status), and
records every request. Nothing else of a cluster is involved.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import helm_python as helm
import pytest

from conftest import CHART, NAMESPACE, RELEASE, load_values, manifests

KEY_SECRET = f"{RELEASE}-tokengate-cache-key"


class FakeAPIServer:
    """Serves GET /api/v1 (discovery) and GET /api/v1/namespaces/<ns>/secrets/<name>."""

    def __init__(self):
        self.secrets: dict[tuple[str, str], dict] = {}
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?", 1)[0]
                fake.requests.append(path)
                parts = path.strip("/").split("/")
                if path == "/api/v1":
                    self.reply(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
                                     "resources": [{"name": "secrets", "singularName": "secret", "namespaced": True,
                                                    "kind": "Secret", "verbs": ["get", "list"]}]})
                elif len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
                    secret = fake.secrets.get((parts[3], parts[5]))
                    if secret is None:
                        self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                         "reason": "NotFound", "code": 404,
                                         "message": f'secrets "{parts[5]}" not found',
                                         "details": {"name": parts[5], "kind": "secrets"}})
                    else:
                        self.reply(200, secret)
                else:
                    self.reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                     "reason": "NotFound", "code": 404})

            def reply(self, code: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def kubeconfig(self) -> str:
        host, port = self.server.server_address
        return f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "http://{host}:{port}"}}}}]
users: [{{name: fake, user: {{token: fake}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: fake, namespace: {NAMESPACE}}}}}]
current-context: fake
"""

    def add_secret(self, namespace: str, name: str, data: dict[str, bytes]):
        self.secrets[(namespace, name)] = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }


@pytest.fixture
def api():
    fake = FakeAPIServer()
    fake.thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


def upgrade(api: FakeAPIServer, values: dict) -> list[dict]:
    """The objects `helm upgrade` would apply, rendered with lookup against the fake API."""
    with helm.Config(kubeconfig_content=api.kubeconfig(), namespace=NAMESPACE) as config, helm.Chart.load(CHART) as chart:
        rendered = config.render(chart, values, name=RELEASE, namespace=NAMESPACE, is_upgrade=True)
    return manifests(rendered)


def key_secrets(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-cache-key")]


def decoded(secret: dict) -> dict[str, bytes]:
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


@pytest.mark.parametrize("namespace", [NAMESPACE, "cache-ns"])
def test_an_upgrade_renders_the_key_already_in_the_cluster(api, namespace):
    key = os.urandom(32)
    api.add_secret(namespace, KEY_SECRET, {"cache.key": key})
    values = load_values("fleet")
    if namespace != NAMESPACE:
        values["namespaceOverride"] = namespace
    (secret,) = key_secrets(upgrade(api, values))
    assert (secret["metadata"]["name"], secret["metadata"]["namespace"]) == (KEY_SECRET, namespace)
    assert decoded(secret) == {"cache.key": key}
    assert f"/api/v1/namespaces/{namespace}/secrets/{KEY_SECRET}" in api.requests


def test_without_a_key_in_the_cluster_a_new_one_is_generated_each_time(api):
    """Install (no Secret yet): 32 fresh random bytes, a different key for every release."""
    keys = []
    for _ in range(2):
        (secret,) = key_secrets(upgrade(api, load_values("fleet")))
        keys.append(decoded(secret)["cache.key"])
    assert [len(k) for k in keys] == [32, 32]
    assert keys[0] != keys[1]
    # The lookup really ran, and found nothing.
    assert api.requests.count(f"/api/v1/namespaces/{NAMESPACE}/secrets/{KEY_SECRET}") == 2


def test_a_secret_without_the_configured_key_gets_a_new_key(api):
    """After cache.key.secretKey changes, the old Secret has no such key: a new key is made under
    the new name, and the old one is not carried over under it."""
    old = os.urandom(32)
    api.add_secret(NAMESPACE, KEY_SECRET, {"cache.key": old})
    values = {**load_values("fleet")}
    values["cache"] = {**values["cache"], "key": {"existingSecret": "", "secretKey": "key.bin"}}
    (secret,) = key_secrets(upgrade(api, values))
    data = decoded(secret)
    assert set(data) == {"key.bin"}
    assert len(data["key.bin"]) == 32 and data["key.bin"] != old


@pytest.mark.parametrize(
    "values",
    [{}, {**load_values("fleet"), "cache": {**load_values("fleet")["cache"], "key": {"existingSecret": "k", "secretKey": "cache.key"}}}],
    ids=["memory", "redis-with-existing-secret"],
)
def test_no_key_secret_and_no_lookup_unless_the_chart_generates_the_key(api, values):
    docs = upgrade(api, values)
    assert key_secrets(docs) == []
    assert [r for r in api.requests if "/secrets/" in r] == []
