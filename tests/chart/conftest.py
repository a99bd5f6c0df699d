"""Shared helpers for the chart tests: render helm/tokengate with the real Helm engine
(helm-python-sdk, Helm v4 as a library) and pick objects out of the result.

Every tool these tests use is a requirement in requirements.txt. A missing tool is an install
bug, so nothing here skips: an import or a lookup that fails, fails the test.
"""

from __future__ import annotations

import base64
import os
import re
import tomllib
from pathlib import Path

import helm_python as helm
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "tokengate"
VALUES_DIR = Path(__file__).resolve().parent / "values"
VALUE_SETS = sorted(p.stem for p in VALUES_DIR.glob("*.yaml"))

RELEASE = "tg"
NAMESPACE = "auth"


# The binary's upper bounds (src/config.rs, MAX_* and check_upper_bounds), as the chart writes
# them: (key under config, the bound, the least value past it). Counts are bounded by the
# schema, durations at render time (a schema cannot compare the number inside "11m").
UPPER_BOUNDS = [
    ("server.max_concurrent_calls", 1_000_000, 1_000_001),
    ("server.max_queued_calls", 1_000_000, 1_000_001),
    ("upstream.max_connections", 100_000, 100_001),
    ("cache.max_entries", 100_000_000, 100_000_001),
    ("server.shutdown_grace_period", "60m", "3601s"),
    ("upstream.connect_timeout", "10m", "600001ms"),
    ("upstream.request_timeout", "10m", "600001ms"),
    ("cache.redis.timeout", "10m", "600001ms"),
    ("cache.refresh_ahead", "1440m", "86400001ms"),
    ("cache.min_remaining", "1440m", "86400001ms"),
    ("cache.replay_window", "1440m", "86400001ms"),
]


def config_values(key: str, value) -> dict:
    """Chart values setting config.<key> (dotted) to value. min_remaining must not exceed
    refresh_ahead, so refresh_ahead comes along at its own bound."""
    values: dict = {"config": {}}
    node = values["config"]
    *parents, leaf = key.split(".")
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    if key == "cache.min_remaining":
        values["config"]["cache"]["refresh_ahead"] = "1440m"
    return values


def load_values(name: str) -> dict:
    """The values of tests/chart/values/<name>.yaml."""
    return yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text()) or {}


def render(values: dict | None = None, *, name: str = RELEASE, chart_dir: Path = CHART) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce it."""
    with helm.Chart.load(chart_dir) as chart:
        return chart.render(values=values, name=name, namespace=NAMESPACE)


def manifests(rendered: dict[str, str]) -> list[dict]:
    """Every Kubernetes object in a render (NOTES.txt and empty templates left out)."""
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


class Rendered:
    """One render of the chart, with accessors for the objects the tests look at."""

    def __init__(self, values: dict | None, *, chart_dir: Path = CHART):
        self.values = values
        self.files = render(values, chart_dir=chart_dir)
        self.docs = manifests(self.files)

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict:
        found = [d for d in self.all(kind) if d["metadata"]["name"].endswith(name_suffix)]
        names = [d["metadata"]["name"] for d in found]
        assert len(found) == 1, f"expected one {kind} named *{name_suffix}, got {names}"
        return found[0]

    @property
    def deployment(self) -> dict:
        return self.one("Deployment")

    @property
    def pod_spec(self) -> dict:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict:
        (container,) = [c for c in self.pod_spec["containers"] if c["name"] == "tokengate"]
        return container

    @property
    def config_map(self) -> dict:
        """The ConfigMap holding tokengate.toml (the dashboard has a ConfigMap of its own)."""
        found = [d for d in self.all("ConfigMap") if "tokengate.toml" in d["data"]]
        assert len(found) == 1, [d["metadata"]["name"] for d in self.all("ConfigMap")]
        return found[0]

    @property
    def config_text(self) -> str:
        (text,) = self.config_map["data"].values()
        return text

    @property
    def config(self) -> dict:
        return tomllib.loads(self.config_text)

    @property
    def listen_port(self) -> int:
        listen = self.config["server"]["listen"]
        match = re.fullmatch(r"0\.0\.0\.0:(\d+)", listen)
        assert match, f"server.listen {listen!r} is not 0.0.0.0:<port>"
        return int(match.group(1))

    def secret_data(self) -> dict[str, str] | None:
        """The chart-rendered client Secret's decoded data (secret.create), or None when the
        chart renders none. It has the release's full name, as the ConfigMap has."""
        name = self.config_map["metadata"]["name"]
        secrets = [s for s in self.all("Secret") if s["metadata"]["name"] == name]
        if not secrets:
            return None
        (secret,) = secrets
        return {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}

    def cache_key_secret(self) -> dict | None:
        """The Secret holding the cache key that the chart generates (redis backend without
        cache.key.existingSecret), or None."""
        secrets = [s for s in self.all("Secret") if s["metadata"]["name"].endswith("-cache-key")]
        assert len(secrets) <= 1, secrets
        return secrets[0] if secrets else None


@pytest.fixture(scope="session", params=VALUE_SETS)
def value_set(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def rendered_sets() -> dict[str, Rendered]:
    return {name: Rendered(load_values(name)) for name in VALUE_SETS}


@pytest.fixture(scope="session")
def rendered(value_set, rendered_sets) -> Rendered:
    return rendered_sets[value_set]


@pytest.fixture(scope="session")
def tokengate_bin() -> Path:
    """The tokengate binary (TOKENGATE_BIN, default target/debug/tokengate)."""
    path = Path(os.environ.get("TOKENGATE_BIN", "target/debug/tokengate"))
    if not path.is_absolute():
        path = REPO / path
    assert path.is_file() and os.access(path, os.X_OK), (
        f"tokengate binary not found at {path}: run `cargo build --bins` or set TOKENGATE_BIN"
    )
    return path
