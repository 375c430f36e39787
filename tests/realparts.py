"""Real parts a test run may lack, and what that does to the run (a pytest plugin).

A test that needs a real part which cannot be had on this machine (the API server that
``scripts/kube-apiserver`` builds, containers) skips through :func:`skip_missing_part`,
naming the part and the reason. pytest's summary lists each such skip, and a banner at the
end names every missing part. With ``MLOPT_REQUIRE_REAL_PARTS=1`` (``.ci/run`` sets it) such
a skip fails the run, unless ``MLOPT_ALLOW_MISSING`` names the part and a reason, set on
purpose (``MLOPT_ALLOW_MISSING="containers: this runner has no podman"``; several joined by
``;``).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["allowed_missing", "missing", "skip_missing_part"]

MISSING = "missing real part "
missing: dict[str, str] = {}  # part -> reason, once found missing
_skipped: dict[str, list[str]] = {}  # part -> the tests it skipped


def skip_missing_part(part: str, reason: str) -> NoReturn:
    """Skip the test: ``part`` (apiserver, containers, ...) cannot be had here, for ``reason``.

    Remembered for the session, so every later test that needs it skips at once."""
    missing.setdefault(part, reason)
    pytest.skip(f"{MISSING}{part}: {missing[part]}")


def allowed_missing() -> dict[str, str]:
    """``MLOPT_ALLOW_MISSING``: the parts a run may lack on purpose, with the reason given."""
    allowed = {}
    for item in os.environ.get("MLOPT_ALLOW_MISSING", "").split(";"):
        part, _, why = item.partition(":")
        if part.strip() and why.strip():
            allowed[part.strip()] = why.strip()
    return allowed


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2]).removeprefix("Skipped: ")
        if message.startswith(MISSING):
            part = message.removeprefix(MISSING).partition(":")[0]
            _skipped.setdefault(part, []).append(report.nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _skipped:
        return
    allowed = allowed_missing()
    required = os.environ.get("MLOPT_REQUIRE_REAL_PARTS") == "1"
    terminalreporter.write_sep("!", "REAL PARTS MISSING: their tests did not run", red=True)
    for part, tests in sorted(_skipped.items()):
        reason = missing.get(part, "see the skip reasons above")
        terminalreporter.write_line(f"{part}: {len(tests)} test(s) skipped: {reason}", red=True)
        if part in allowed:
            terminalreporter.write_line(f"  allowed by MLOPT_ALLOW_MISSING: {allowed[part]}")
        elif required:
            terminalreporter.write_line(
                f"  this fails the run (MLOPT_REQUIRE_REAL_PARTS=1); to allow it on purpose "
                f'set MLOPT_ALLOW_MISSING="{part}: <why>"',
                red=True,
            )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("MLOPT_REQUIRE_REAL_PARTS") != "1":
        return
    if set(_skipped) - set(allowed_missing()) and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
