"""checkov on the rendered manifests of every value set, with the skips of checkov-skips.yaml.

checkov cannot render a chart without a helm binary (`--framework helm` silently scans nothing),
so the manifests are rendered by the Helm engine first and checkov scans the files.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import VALUE_SETS

SKIPS_FILE = Path(__file__).resolve().parent / "checkov-skips.yaml"
CHECKOV = Path(sys.executable).parent / "checkov"


def load_skips() -> list[dict]:
    skips = yaml.safe_load(SKIPS_FILE.read_text())
    for skip in skips:
        assert set(skip) <= {"check", "kinds", "valueSets", "reason"}, skip
        assert skip["check"] and skip["kinds"] and len(skip["reason"]) > 40, skip
        assert set(skip.get("valueSets", VALUE_SETS)) <= set(VALUE_SETS), skip
    return skips


def skips_for(skips: list[dict], value_set: str, kind: str) -> list[dict]:
    return [
        s
        for s in skips
        if kind in s["kinds"] and value_set in s.get("valueSets", VALUE_SETS)
    ]


def write_manifests(docs: list[dict], directory: Path, annotate: list[dict] | None):
    """One file per object; with `annotate`, add each applicable skip as an annotation."""
    directory.mkdir(parents=True)
    for i, doc in enumerate(docs):
        doc = copy.deepcopy(doc)
        if annotate is not None:
            annotations = doc["metadata"].setdefault("annotations", {})
            for n, skip in enumerate(skips_for(annotate, directory.name, doc["kind"]), 1):
                reason = " ".join(skip["reason"].split())
                annotations[f"checkov.io/skip{n}"] = f"{skip['check']}={reason}"
        name = f"{i:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        (directory / name).write_text(yaml.safe_dump(doc, sort_keys=False))


def run_checkov(directory: Path) -> tuple[int, dict]:
    assert CHECKOV.is_file(), f"checkov is not installed next to {sys.executable}"
    proc = subprocess.run(
        [CHECKOV, "-d", directory, "--framework", "kubernetes", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.strip(), proc.stderr
    report = json.loads(proc.stdout)
    # One framework gives one report object; checkov gives a list for several.
    assert isinstance(report, dict), report
    return proc.returncode, report


@pytest.fixture(scope="session")
def checkov_reports(rendered_sets, tmp_path_factory) -> dict[tuple[str, bool], tuple[int, dict]]:
    """(value set, with skips?) -> (exit code, JSON report). Each set is scanned on its own so
    that a NetworkPolicy of one set can never cover the pods of another in checkov's graph."""
    skips = load_skips()
    root = tmp_path_factory.mktemp("checkov")
    jobs = {}
    for name in VALUE_SETS:
        for with_skips in (True, False):
            directory = root / ("skipped" if with_skips else "raw") / name
            write_manifests(rendered_sets[name].docs, directory, skips if with_skips else None)
            jobs[(name, with_skips)] = directory
    with ThreadPoolExecutor(max_workers=2) as pool:
        return Reports(zip(jobs, pool.map(run_checkov, jobs.values())))


class Reports(dict):
    """The checkov reports, with a short repr so that a failing test does not print them all."""

    def __repr__(self) -> str:
        return f"<checkov reports for {sorted(self)}>"


def kind_of(check: dict) -> str:
    # checkov names a resource "<Kind>.<namespace>.<name>".
    return check["resource"].split(".", 1)[0]


def test_checkov_passes_with_the_listed_skips(value_set, checkov_reports):
    code, report = checkov_reports[(value_set, True)]
    failed = [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for c in report["results"]["failed_checks"]
    ]
    assert failed == []
    assert code == 0
    summary = report["summary"]
    assert summary["passed"] > 150, summary
    print(f"checkov {value_set}: {summary['passed']} passed, {summary['skipped']} skipped")


def test_every_skip_is_used_and_carries_its_reason(value_set, checkov_reports):
    skips = load_skips()
    _, raw = checkov_reports[(value_set, False)]
    would_fail = {(c["check_id"], kind_of(c)) for c in raw["results"]["failed_checks"]}
    listed = {
        (s["check"], kind)
        for s in skips
        if value_set in s.get("valueSets", VALUE_SETS)
        for kind in s["kinds"]
    }
    # Without the skips, exactly the listed checks fail: no stale entry, nothing unlisted.
    assert would_fail == listed

    _, skipped = checkov_reports[(value_set, True)]
    reported = {(c["check_id"], kind_of(c)) for c in skipped["results"]["skipped_checks"]}
    assert reported == listed
    for check in skipped["results"]["skipped_checks"]:
        assert check["check_result"]["suppress_comment"], check["check_id"]


def test_checkov_scanned_every_rendered_object(value_set, rendered_sets, checkov_reports):
    _, report = checkov_reports[(value_set, True)]
    results = report["results"]
    scanned = {
        c["resource"]
        for c in results["passed_checks"] + results["failed_checks"] + results["skipped_checks"]
    }
    # The kinds checkov has policies for (the workloads, and the ConfigMaps and Secrets it
    # searches for secrets, the dashboard's included); it has none for NetworkPolicy or the
    # Prometheus Operator's CRDs, though they are in the scanned directory too.
    checked = {
        f"{d['kind']}.{d['metadata']['namespace']}.{d['metadata']['name']}"
        for d in rendered_sets[value_set].docs
        if d["kind"] in ("Deployment", "Pod", "ConfigMap", "Secret", "Service", "ServiceAccount")
    }
    assert checked and checked <= scanned, (checked, scanned)
