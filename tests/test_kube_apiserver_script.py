"""scripts/kube-apiserver when it cannot build: it names the step, and the tests that need the
real API server are skipped with that reason instead of failing obscurely or passing quietly."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from kubeproxy import SCRIPT, RealServerUnavailable, real_apiserver

UNREACHABLE_MIRROR = "http://127.0.0.1:9/debian"  # the discard port: refused at once


def offline(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "MLOPT_DEBIAN_MIRROR": UNREACHABLE_MIRROR,
            "MLOPT_KUBE_CACHE": str(tmp_path / "empty-cache")}  # fmt: skip


def test_a_build_that_cannot_download_names_the_step_and_exits_3(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(SCRIPT), "build"], env=offline(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3
    assert "FAILED at step 'apt-get update (private sid sources)'" in done.stderr
    assert done.stdout == ""


def test_a_machine_whose_apt_sources_name_no_archive_fails_saying_so(tmp_path: Path) -> None:
    """No archive host is guessed: the sources are the machine's, or MLOPT_DEBIAN_MIRROR."""
    if os.geteuid() != 0:
        pytest.fail("this test hides /etc/apt in a mount namespace: run the suite as root")
    empty = tmp_path / "apt"
    empty.mkdir()
    env = {k: v for k, v in offline(tmp_path).items() if k != "MLOPT_DEBIAN_MIRROR"}
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f'mount --bind "{empty}" /etc/apt && exec "$0" build',
         str(SCRIPT)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "FAILED at step 'find the Debian archive'" in done.stderr
    assert "MLOPT_DEBIAN_MIRROR" in done.stderr
    assert done.stdout == ""


def test_offline_with_a_cached_build_uses_it(tmp_path: Path) -> None:
    cached = tmp_path / "empty-cache" / "0123456789abcdef"
    cached.mkdir(parents=True)
    for binary in ("apiextensions-apiserver", "etcd"):
        (cached / binary).write_text("#!/bin/sh\n")
        (cached / binary).chmod(0o755)
    done = subprocess.run(
        [str(SCRIPT), "build"], env=offline(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(cached)
    assert "using the cached" in done.stderr


def test_the_fixture_reports_why_the_server_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in offline(tmp_path).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RealServerUnavailable) as unavailable, real_apiserver(tmp_path / "kube"):
        pass
    assert "FAILED at step 'apt-get update (private sid sources)'" in str(unavailable.value)
