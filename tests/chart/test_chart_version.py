"""The chart's version moves whenever what it ships moves.

tests/chart/chart-versions.json records, for each released chart version, the digest of the
chart's package content without that version: every file `helm package` puts in the archive
(templates, values, schema, dashboards, NOTES, helpers, Chart.yaml as Helm writes it), with
Chart.yaml's `version` left out. The current version must be recorded, with the current
content's digest; a change to the chart without a new version fails here. The recorded versions
rise strictly, the current one is the highest, and `appVersion` is Cargo.toml's version. No git
history is needed, so a fresh clone in CI checks the same.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
import tomllib
from pathlib import Path

import helm_python as helm
import pytest
import semver
import yaml

from conftest import CHART, REPO

RECORD = Path(__file__).resolve().parent / "chart-versions.json"


def chart_digest(chart_dir: Path, workdir: Path) -> str:
    """sha256 over the packaged files (name and content, in name order), Chart.yaml without
    its `version`. Packaging decides what counts, so .helmignore'd files do not."""
    workdir.mkdir(parents=True, exist_ok=True)
    archive = helm.package(chart_dir, destination=workdir)
    files = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            name = member.name.split("/", 1)[1]
            content = tar.extractfile(member).read()
            if name == "Chart.yaml":
                metadata = yaml.safe_load(content)
                metadata.pop("version")
                content = json.dumps(metadata, sort_keys=True).encode()
            files[name] = hashlib.sha256(content).hexdigest()
    listing = "".join(f"{files[name]}  {name}\n" for name in sorted(files))
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def chart_metadata(chart_dir: Path) -> dict:
    return yaml.safe_load((chart_dir / "Chart.yaml").read_text())


def cargo_version() -> str:
    return tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]


def record_versions(path: Path = RECORD) -> dict[str, str]:
    return json.loads(path.read_text())["versions"]


def problems(chart_dir: Path, versions: dict[str, str], crate_version: str, workdir: Path) -> list[str]:
    """Every way the chart breaks the versioning rule; empty when it keeps it."""
    metadata = chart_metadata(chart_dir)
    version = str(metadata["version"])
    digest = chart_digest(chart_dir, workdir)
    found = []
    recorded = versions.get(version)
    if recorded is None:
        found.append(
            f"chart version {version} is not in {RECORD.relative_to(REPO)}: "
            f'record it by adding "{version}": "{digest}" to "versions"'
        )
    elif recorded != digest:
        found.append(
            f"chart content changed but version {version} did not: bump "
            f"helm/tokengate/Chart.yaml's version and record it (content digest {digest})"
        )
    parsed = []
    for name in versions:
        try:
            parsed.append(semver.Version.parse(name))
        except ValueError:
            found.append(f"recorded version {name!r} is not SemVer 2")
    for before, after in zip(parsed, parsed[1:]):
        if not before < after:
            found.append(f"recorded versions must rise strictly: {after} comes after {before}")
    if parsed and semver.Version.is_valid(version) and semver.Version.parse(version) < max(parsed):
        found.append(f"chart version {version} is not the highest recorded ({max(parsed)})")
    if str(metadata.get("appVersion")) != crate_version:
        found.append(f"appVersion {metadata.get('appVersion')!r} is not Cargo.toml's version {crate_version!r}")
    return found


def test_the_chart_version_is_recorded_with_its_content(tmp_path):
    assert problems(CHART, record_versions(), cargo_version(), tmp_path) == []


def test_the_record_is_only_versions_and_digests():
    record = json.loads(RECORD.read_text())
    assert set(record) == {"about", "versions"}
    assert record["versions"], "no chart version recorded"
    for version, digest in record["versions"].items():
        assert isinstance(digest, str) and len(digest) == len("sha256:") + 64 and digest.startswith("sha256:"), version


# --- the check can fail: on a copy of the chart ------------------------------------------------


@pytest.fixture
def chart_copy(tmp_path) -> Path:
    copy = tmp_path / "chart" / CHART.name
    shutil.copytree(CHART, copy)
    return copy


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, (path, old)
    path.write_text(text.replace(old, new, 1))


def set_version(chart_dir: Path, version: str) -> None:
    current = chart_metadata(chart_dir)["version"]
    edit(chart_dir / "Chart.yaml", f"\nversion: {current}\n", f"\nversion: {version}\n")


# One change of each kind of shipped file; each must change the digest.
CONTENT_CHANGES = [
    ("templates/configmap.yaml", "kind: ConfigMap", "kind:  ConfigMap"),
    ("templates/_helpers.tpl", "{{/*", "{{/* "),
    ("templates/NOTES.txt", "tokengate", "TokenGate"),
    ("values.yaml", "max_connections: 100\n", "max_connections: 101\n"),
    ("values.schema.json", '"minimum": 1', '"minimum": 2'),
    ("dashboards/tokengate.json", '"refresh": "30s"', '"refresh": "1m"'),
    ("Chart.yaml", "  - grpc\n", "  - grpc\n  - oidc\n"),
    ("Chart.yaml", 'appVersion: "', 'appVersion: "9'),
]


@pytest.mark.parametrize("path,old,new", CONTENT_CHANGES, ids=[f"{p}:{o.strip()}" for p, o, _ in CONTENT_CHANGES])
def test_a_content_change_without_a_new_version_fails(path, old, new, chart_copy, tmp_path):
    versions = record_versions()
    assert problems(chart_copy, versions, cargo_version(), tmp_path / "before") == []
    edit(chart_copy / path, old, new)
    found = problems(chart_copy, versions, cargo_version(), tmp_path / "after")
    version = chart_metadata(CHART)["version"]
    assert (
        f"chart content changed but version {version} did not: bump helm/tokengate/Chart.yaml's version and record it"
        in found[0]
    ), found


def test_a_new_version_passes_once_recorded_with_the_digest_printed(chart_copy, tmp_path):
    """The release step: bump, read the line to record from the failure, add it."""
    edit(chart_copy / "templates/configmap.yaml", "kind: ConfigMap", "kind:  ConfigMap")
    current = semver.Version.parse(chart_metadata(CHART)["version"])
    bumped = str(current.bump_minor())
    set_version(chart_copy, bumped)
    versions = record_versions()
    (found,) = problems(chart_copy, versions, cargo_version(), tmp_path / "bumped")
    digest = chart_digest(chart_copy, tmp_path / "digest")
    assert f'"{bumped}": "{digest}"' in found
    assert problems(chart_copy, {**versions, bumped: digest}, cargo_version(), tmp_path / "recorded") == []


def test_what_does_not_ship_or_is_the_version_does_not_change_the_digest(chart_copy, tmp_path):
    before = chart_digest(chart_copy, tmp_path / "0")
    set_version(chart_copy, "99.0.0")
    (chart_copy / "values.yaml.bak").write_text("ignored by .helmignore\n")
    edit(chart_copy / "Chart.yaml", "# The chart's own version", "# This chart's own version")
    assert chart_digest(chart_copy, tmp_path / "1") == before


def test_versions_must_rise_and_end_at_the_current_one(tmp_path):
    versions = record_versions()
    version = chart_metadata(CHART)["version"]
    digest = versions[version]
    falling = {version: digest, "0.0.1": "sha256:" + "0" * 64}
    found = problems(CHART, falling, cargo_version(), tmp_path / "falling")
    assert f"recorded versions must rise strictly: 0.0.1 comes after {version}" in found, found
    higher = {version: digest, "99.0.0": "sha256:" + "0" * 64}
    found = problems(CHART, higher, cargo_version(), tmp_path / "higher")
    assert f"chart version {version} is not the highest recorded (99.0.0)" in found, found
    found = problems(CHART, {"0.x": "sha256:" + "0" * 64, version: digest}, cargo_version(), tmp_path / "bad")
    assert "recorded version '0.x' is not SemVer 2" in found, found


def test_app_version_must_be_cargos(tmp_path):
    found = problems(CHART, record_versions(), "9.9.9", tmp_path)
    assert found == [f"appVersion {chart_metadata(CHART)['appVersion']!r} is not Cargo.toml's version '9.9.9'"]
