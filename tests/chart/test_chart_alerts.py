"""The chart's alert rules, checked with the real promtool (Debian's `prometheus` package, which
scripts/test installs): the PrometheusRule of the all-on value set (values/observability.yaml)
is rendered, its `spec` written out as a rules file, `promtool check rules` must pass on it, and
each alert's unit test in rules/ (`promtool test rules`) must pass: the alert fires, with exact
labels and annotations, on the series that should fire it, and stays quiet on a healthy one.
Each test is shown to fail when its alert's expression is broken. Every alert has a section in
docs/runbooks.md and a row in the README's alerts table."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, Rendered

RULE_TESTS = Path(__file__).resolve().parent / "rules"
RUNBOOKS = REPO / "docs" / "runbooks.md"
PROMTOOL = shutil.which("promtool")


@pytest.fixture(scope="session")
def rule_spec(rendered_sets) -> dict:
    return rendered_sets["observability"].one("PrometheusRule")["spec"]


@pytest.fixture(scope="session")
def alerts(rule_spec) -> list[str]:
    return [r["alert"] for g in rule_spec["groups"] for r in g["rules"]]


def promtool(*args, cwd: Path) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is not installed (scripts/test installs Debian's prometheus package)"
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def write_case(directory: Path, spec: dict, test_file: dict) -> Path:
    """rules.yaml (the given spec) and the unit test file, side by side as the test expects."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    path = directory / "test.yaml"
    path.write_text(yaml.safe_dump(test_file, sort_keys=False))
    return path


def load_test(alert: str) -> dict:
    return yaml.safe_load((RULE_TESTS / f"{alert}.yaml").read_text())


def with_expr(spec: dict, alert: str, expr: str) -> dict:
    spec = copy.deepcopy(spec)
    found = [r for g in spec["groups"] for r in g["rules"] if r.get("alert") == alert]
    assert len(found) == 1
    found[0]["expr"] = expr
    return spec


def firing_and_quiet(test_file: dict, alert: str) -> tuple[dict, dict]:
    """The test file split in two: the tests that expect the alert to fire at some point, and
    the tests that expect it quiet throughout (the healthy series)."""
    firing, quiet = [], []
    for test in test_file["tests"]:
        checks = [c for c in test["alert_rule_test"] if c["alertname"] == alert]
        assert checks, test["name"]
        (firing if any(c["exp_alerts"] for c in checks) else quiet).append(test)
    return {**test_file, "tests": firing}, {**test_file, "tests": quiet}


def test_promtool_checks_the_rendered_rules(rule_spec, alerts, tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_spec, sort_keys=False))
    proc = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(alerts)} rules found" in proc.stdout


def test_promtool_checks_the_rules_with_every_knob_turned(tmp_path):
    """Thresholds, windows, durations, reasons, labels and the job from values all make valid
    rules, not only the defaults."""
    values = {
        "prometheusRule": {
            "enabled": True,
            "force": True,
            "job": "kubernetes-pods",
            "rateWindow": "2m",
            "alertLabels": {"team": "auth", "page": "yes"},
            "errorReasons": {"caller": [], "ignored": ["SLOW_DOWN", "OK"]},
            "alerts": {
                "errorRatio": {"threshold": 0.001, "for": "1h30m", "severity": "page"},
                "upstreamSlow": {"thresholdSeconds": 0.25, "for": "0s"},
                "certificateExpiry": {"days": 2.5},
                "cacheHitRatio": {"threshold": 1, "minLookupsPerSecond": 0},
                "upstreamRetrying": {"threshold": 0.025, "minRequestsPerSecond": 2.5, "for": "1h"},
                "signingKeyReload": {"for": "30s", "severity": "page"},
                "redisDown": {"enabled": False},
            },
        }
    }
    spec = Rendered(values).one("PrometheusRule")["spec"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 12 rules found" in proc.stdout


def test_promtool_check_is_not_vacuous(rule_spec, tmp_path):
    broken = with_expr(rule_spec, "TokengateRedisDown", "tokengate_redis_up{job=} == 0")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(broken, sort_keys=False))
    proc = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode != 0


def test_every_alert_has_one_unit_test_file(alerts):
    assert sorted(p.stem for p in RULE_TESTS.glob("*.yaml")) == sorted(alerts)


def test_each_unit_test_fires_with_labels_and_annotations_and_stays_quiet_when_healthy(alerts):
    for alert in alerts:
        test_file = load_test(alert)
        assert test_file["rule_files"] == ["rules.yaml"], alert
        firing, quiet = firing_and_quiet(test_file, alert)
        assert firing["tests"] and quiet["tests"], alert
        for test in firing["tests"]:
            for check in test["alert_rule_test"]:
                for expected in check["exp_alerts"]:
                    assert expected["exp_labels"]["severity"], alert
                    assert set(expected["exp_annotations"]) == {"summary", "description", "runbook_url"}, alert
                    assert expected["exp_annotations"]["runbook_url"] == f"docs/runbooks.md#{alert.lower()}"
            # Each firing test also shows the alert not firing before its `for` has passed.
            assert any(c["exp_alerts"] == [] for c in test["alert_rule_test"]), alert


@pytest.mark.parametrize(
    "alert",
    sorted(p.stem for p in RULE_TESTS.glob("*.yaml")),
)
def test_promtool_unit_test(alert, rule_spec, tmp_path):
    path = write_case(tmp_path, rule_spec, load_test(alert))
    proc = promtool("test", "rules", path.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize(
    "alert",
    sorted(p.stem for p in RULE_TESTS.glob("*.yaml")),
)
def test_a_broken_expression_fails_the_unit_test(alert, rule_spec, tmp_path):
    """The firing half fails when the expression finds nothing, and the healthy half fails when
    it always fires: neither half passes by itself on a broken rule."""
    firing, quiet = firing_and_quiet(load_test(alert), alert)
    never = with_expr(rule_spec, alert, "vector(1) < 0")
    always = with_expr(rule_spec, alert, 'label_replace(vector(1), "namespace", "auth", "", "")')
    for name, spec, part in (("never", never, firing), ("always", always, quiet)):
        path = write_case(tmp_path / name, spec, part)
        proc = promtool("test", "rules", path.name, cwd=path.parent)
        assert proc.returncode != 0, (name, proc.stdout)
        assert "FAILED" in proc.stdout + proc.stderr, (name, proc.stdout)
    # The unbroken rules pass each half alone.
    for name, part in (("firing", firing), ("quiet", quiet)):
        path = write_case(tmp_path / name, rule_spec, part)
        proc = promtool("test", "rules", path.name, cwd=path.parent)
        assert proc.returncode == 0, (name, proc.stdout + proc.stderr)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes for the headings of a Markdown file."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", markdown, re.M):
        text = re.sub(r"[`*_]", "", heading.strip()).lower()
        anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_every_alert_has_a_runbook_section_with_the_four_parts(alerts, rule_spec):
    text = RUNBOOKS.read_text()
    anchors = github_anchors(text)
    sections = dict(re.findall(r"^## (\w+)\n(.*?)(?=^## |\Z)", text, re.M | re.S))
    assert sorted(sections) == sorted(alerts)
    for r in (r for g in rule_spec["groups"] for r in g["rules"]):
        anchor = r["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor in anchors, anchor
        body = sections[r["alert"]]
        for part in ("What it means", "Confirm", "What to do", "Whose fault"):
            assert f"**{part}.**" in body, (r["alert"], part)


def test_the_readme_lists_every_alert_with_its_severity_and_runbook(rule_spec):
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n### Alerts\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \((\w+)\) \|.*\[runbook\]\(docs/runbooks\.md#(\w+)\) \|$", section, re.M)
    rules = [r for g in rule_spec["groups"] for r in g["rules"]]
    assert rows == [(r["alert"], r["labels"]["severity"], r["alert"].lower()) for r in rules]
