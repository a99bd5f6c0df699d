"""The container image, tested as far as a machine without a Docker engine allows.

What is checked: the Dockerfile's shape (a release build, then only the binary on distroless,
a numeric non-root user, port 50051, tokengate as the entrypoint), checkov's Dockerfile
policies, agreement with the chart, and that the binary serves as that UID on a read-only
root filesystem. What is not: building and running the image itself (no engine here).
"""

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BINARY = (ROOT / os.environ.get("TOKENGATE_BIN", "target/debug/tokengate")).resolve()
CHECKOV = shutil.which("checkov", path=str(Path(sys.executable).parent))


def stages():
    """Each build stage as (base image, [(instruction, value)])."""
    parser = DockerfileParser(path=str(DOCKERFILE))
    result = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            result.append((item["value"], []))
        elif result:
            result[-1][1].append((item["instruction"], item["value"]))
    return result


def final_stage():
    return stages()[-1]


def values(stage, instruction):
    return [value for name, value in stage[1] if name == instruction]


def test_two_stages_a_locked_release_build_then_distroless():
    (build_from, build), (final_from, final) = stages()
    assert build_from.startswith("rust:") and build_from.endswith(" AS build"), build_from
    runs = " ".join(value for name, value in build if name == "RUN")
    assert "cargo build --release --locked --bin tokengate" in runs, runs
    assert final_from.startswith("gcr.io/distroless/"), final_from


def test_the_final_stage_holds_only_the_binary():
    copies = values(final_stage(), "COPY")
    assert copies == ["--from=build /src/target/release/tokengate /usr/local/bin/tokengate"], copies
    assert not values(final_stage(), "RUN"), "no commands run in the final stage"


def test_runs_as_a_numeric_non_root_user_on_port_50051_with_tokengate_as_entrypoint():
    (user,) = values(final_stage(), "USER")
    uid, gid = (int(part) for part in user.split(":"))
    assert uid > 10000 and gid > 10000, user
    assert values(final_stage(), "EXPOSE") == ["50051"]
    (entrypoint,) = values(final_stage(), "ENTRYPOINT")
    assert json.loads(entrypoint) == ["/usr/local/bin/tokengate"]
    (healthcheck,) = values(final_stage(), "HEALTHCHECK")
    assert '"health-check"' in healthcheck, healthcheck


def checkov(dockerfile):
    run = subprocess.run(
        [CHECKOV, "-f", str(dockerfile), "--framework", "dockerfile", "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=300,
    )
    report = json.loads(run.stdout)
    return run.returncode, report


def test_checkov_dockerfile_policies_pass():
    code, report = checkov(DOCKERFILE)
    summary = report["summary"]
    assert code == 0 and summary["failed"] == 0, report["results"]["failed_checks"]
    assert summary["passed"] >= 20 and summary["skipped"] == 0, summary


def test_checkov_would_catch_a_root_image(tmp_path):
    rooted = tmp_path / "Dockerfile"
    rooted.write_text(re.sub(r"^USER .*$", "", DOCKERFILE.read_text(), flags=re.M))
    code, report = checkov(rooted)
    failed = {check["check_id"] for check in report["results"]["failed_checks"]}
    assert code != 0 and "CKV_DOCKER_3" in failed, failed


def test_the_chart_runs_the_image_as_its_user_on_its_port():
    chart = yaml.safe_load((ROOT / "helm/tokengate/values.yaml").read_text())
    (user,) = values(final_stage(), "USER")
    uid, gid = (int(part) for part in user.split(":"))
    pod = chart["podSecurityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)
    assert pod["runAsNonRoot"] is True
    assert chart["containerPort"] == int(values(final_stage(), "EXPOSE")[0])


def test_the_binary_serves_as_the_image_uid_on_a_read_only_root_filesystem():
    (user,) = values(final_stage(), "USER")
    uid, gid = user.split(":")
    # A private mount namespace whose root is remounted read-only, then the image's UID/GID.
    script = (
        "mount --bind / / && mount -o remount,bind,ro / && "
        f'exec setpriv --reuid {uid} --regid {gid} --clear-groups -- "$0" serve --log-format json'
    )
    env = {"PATH": os.environ["PATH"], "TOKENGATE_SERVER__LISTEN": "127.0.0.1:0"}
    proc = subprocess.Popen(
        ["unshare", "--mount", "sh", "-c", script, str(BINARY)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/",
        # Unbuffered: `select` must see every line not yet read. A buffered readline would
        # take in two lines written together and leave the second where select cannot see it.
        bufsize=0,
    )
    try:
        addr = wait_for_listening(proc)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(rf"^Uid:\s+{uid}\s", status, re.M), status
        check = subprocess.run(
            [str(BINARY), "health-check", "--addr", f"http://{addr}"],
            capture_output=True, text=True, timeout=30,
        )
        assert check.returncode == 0, check.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_listening(proc, patience=20.0):
    deadline = time.monotonic() + patience
    seen = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.decode(errors="replace"))
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("fields", {}).get("message") == "listening":
            return event["fields"]["addr"]
    err = proc.stderr.read().decode(errors="replace") if proc.poll() is not None else ""
    pytest.fail(f"no listening line; stdout: {''.join(seen)} stderr: {err}")
