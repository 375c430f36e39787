"""The report's rules that need no training: when parameter importances are estimated, and
native libraries' log lines kept off the console."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from mloptimizer.app.cli import build_parser
from mloptimizer.app.report import IMPORTANCE_MIN_TRIALS, _page, plot_importances

optuna.logging.set_verbosity(optuna.logging.WARNING)
PNG = b"\x89PNG\r\n\x1a\n"


def study_of(complete: int) -> optuna.Study:
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    study.optimize(
        lambda t: t.suggest_float("lr", 1e-4, 1e-1, log=True) * t.suggest_int("blocks", 1, 3),
        n_trials=complete,
    )
    return study


def test_below_the_threshold_the_report_says_why_and_draws_nothing(tmp_path: Path) -> None:
    picture = tmp_path / "importances.png"
    picture.write_bytes(PNG)  # left by an earlier report of the same folder
    note = plot_importances(study_of(IMPORTANCE_MIN_TRIALS - 1), picture)
    assert note is not None
    assert f"Not estimated: {IMPORTANCE_MIN_TRIALS - 1} complete trials" in note
    assert f"needs at least {IMPORTANCE_MIN_TRIALS}" in note
    assert not picture.exists()  # a stale estimate is not shown beside the note


def test_at_the_threshold_the_importances_are_drawn(tmp_path: Path) -> None:
    picture = tmp_path / "importances.png"
    assert plot_importances(study_of(IMPORTANCE_MIN_TRIALS), picture) is None
    assert picture.read_bytes().startswith(PNG)


def _summary() -> dict[str, object]:
    return {
        "search": "s",
        "ended": None,
        "counts": {"complete": 3, "pruned": 0, "failed": 0, "running": 0},
        "cost_usd": 0.0,
        "best": None,
        "tradeoff": None,
        "metric": "val_accuracy",
        "trials": [],
    }


@pytest.mark.parametrize("note", [None, "Not estimated: 3 complete trials, and ..."])
def test_the_page_shows_either_the_picture_or_the_reason(note: str | None) -> None:
    page = _page(_summary(), None, importances=note)
    assert "## Parameter importances" in page
    assert ("![importances](importances.png)" in page) == (note is None)
    if note:
        assert note in page


def test_the_page_says_what_lost_trainers_cost_and_what_checkpoints_saved() -> None:
    assert "trained again" not in _page(_summary(), None, importances=None)  # none lost
    summary = {**_summary(), "cost_usd": 1.5, "redone_usd": 0.25, "saved_usd": 0.75}
    page = _page(summary, None, importances=None)
    assert (
        "Cost: $1.5000 ($0.2500 on epochs trained again after a trainer went away; "
        "$0.7500 saved by resuming from checkpoints)." in page
    )


QUIET_PROBE = """
import os
from mloptimizer.logs import native_quiet
with native_quiet():
    os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
os.write(2, b"after\\n")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_native_lines_reach_stderr_only_when_verbose(verbose: bool) -> None:
    env = {"MLOPT_VERBOSE": "1"} if verbose else {}
    done = subprocess.run(
        [sys.executable, "-c", QUIET_PROBE],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        check=True,
    )
    assert ("XNNPACK" in done.stderr) == verbose
    assert "after" in done.stderr  # the descriptor is given back


@pytest.mark.parametrize("command", ["run", "report", "export"])
def test_verbose_is_a_flag_of_the_commands_that_convert(command: str) -> None:
    args = build_parser().parse_args([command, "x", "--verbose"])
    assert args.verbose is True
