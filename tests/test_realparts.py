"""A run that lacks a real part says so, and fails under MLOPT_REQUIRE_REAL_PARTS unless the
part is allowed on purpose (``realparts.py``): run on a tiny suite in a pytest subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SUITE = """
from realparts import skip_missing_part

def test_needs_the_api_server():
    skip_missing_part("apiserver", "scripts/kube-apiserver could not download its packages")

def test_needs_it_too():
    skip_missing_part("apiserver", "never asked again")

def test_needs_nothing():
    assert True
"""


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_suite.py").write_text(SUITE)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLOPT_")}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "realparts", "-rs", "-q", "-p", "no:cacheprovider",
         str(tmp_path / "test_suite.py")],
        env={**clean, "PYTHONPATH": str(TESTS), **env}, cwd=tmp_path,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_missing_part_is_said_loudly_and_passes_a_plain_run(tmp_path: Path) -> None:
    done = run(tmp_path)
    assert done.returncode == 0, done.stdout
    assert "REAL PARTS MISSING" in done.stdout
    assert "apiserver: 2 test(s) skipped: scripts/kube-apiserver could not download" in done.stdout
    assert "missing real part apiserver" in done.stdout  # pytest's own skip summary


@pytest.mark.parametrize(
    ("allowed", "code"),
    [("", 1), ("containers: no podman on this runner", 1), ("apiserver: an arm64 runner", 0)],
)
def test_a_required_run_fails_unless_the_missing_part_is_allowed_on_purpose(
    tmp_path: Path, allowed: str, code: int
) -> None:
    done = run(tmp_path, MLOPT_REQUIRE_REAL_PARTS="1", MLOPT_ALLOW_MISSING=allowed)
    assert done.returncode == code, done.stdout
    if code:
        assert 'set MLOPT_ALLOW_MISSING="apiserver: <why>"' in done.stdout
    else:
        assert "allowed by MLOPT_ALLOW_MISSING: an arm64 runner" in done.stdout
