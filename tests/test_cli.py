"""CLI commands that need no model."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsafe.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_policy_commands(tmp_path):
    shown = run("policy", "show", "rsafe-default", "--level", "response")
    assert shown.returncode == 0 and "'Agent' messages" in shown.stdout and "Agent: {response}" in shown.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncategories: [{code: A, name: a}, {code: A, name: b}]\n")
    res = run("policy", "validate", str(bad))
    assert res.returncode == 1 and f"{bad}: categories.1.code: duplicate code 'A'" in res.stderr
    # the version printed is the bare hash that records carry (policy_version), no "v" prefix
    from rsafe.policies import BUNDLED_DIR, load_policy

    version = load_policy(BUNDLED_DIR / "kids-platform.yaml").version
    ok = run("policy", "validate", str(BUNDLED_DIR / "kids-platform.yaml"))
    assert ok.returncode == 0 and f"kids-platform version {version}," in ok.stdout
    listed = run("policy", "list")
    assert f"kids-platform\t{version}\t" in listed.stdout


def test_cli_classify_needs_input():
    res = run("classify", "--model", "m", "--policy", "rsafe-default")
    assert res.returncode == 2 and "give --text or --input" in res.stderr


def test_cli_unknown_policy():
    res = run("classify", "--model", "m", "--policy", "nope", "--text", "hi")
    assert res.returncode == 2 and "unknown policy 'nope'" in res.stderr
