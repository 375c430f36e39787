"""The report's rules that need no training: when parameter importances are estimated, and
native libraries' log lines kept off the console."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from mloptimizer.app.cli import build_parser
from mloptimizer.reporting import IMPORTANCE_MIN_TRIALS, param_importances, render_report
from mloptimizer.reportpage import page as _page

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
    importances, note = param_importances(study_of(IMPORTANCE_MIN_TRIALS - 1))
    assert importances is None
    assert note is not None
    assert f"Not estimated: {IMPORTANCE_MIN_TRIALS - 1} complete trials" in note
    assert f"needs at least {IMPORTANCE_MIN_TRIALS}" in note
    page = render_report(tmp_path, _summary(), None, importances, note).read_text()
    assert note in page
    assert not picture.exists()  # a stale estimate is not shown beside the note
    # a delivery holds every file: there the picture says why
    render_report(tmp_path, _summary(), None, importances, note, every_file=True)
    assert picture.read_bytes().startswith(PNG)
    assert (tmp_path / "front.png").read_bytes().startswith(PNG)


def test_at_the_threshold_the_importances_are_drawn(tmp_path: Path) -> None:
    importances, note = param_importances(study_of(IMPORTANCE_MIN_TRIALS))
    assert note is None
    assert importances is not None
    assert set(importances) == {"lr", "blocks"}
    page = render_report(tmp_path, _summary(), None, importances, note).read_text()
    assert "![importances](importances.png)" in page
    assert (tmp_path / "importances.png").read_bytes().startswith(PNG)


def _summary() -> dict[str, object]:
    return {
        "search": "s",
        "ended": None,
        "counts": {"complete": 3, "pruned": 0, "failed": 0, "running": 0},
        "direction": "maximize",
        "front": [],
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


def test_a_long_searchs_report_fits_the_final_jobs_message_and_says_what_it_left_out(
    tmp_path: Path,
) -> None:
    from dispatch import digits_trial

    from mloptimizer.messages import MAX_BODY_BYTES, DeliverMessage, ToFolder, decode, encode
    from mloptimizer.reporting import report_data, study_of_inputs
    from mloptimizer.space import sample_architecture
    from mloptimizer.spec import ArchitectureSearchSpec
    from mloptimizer.study import Attr

    spec = ArchitectureSearchSpec.model_validate(
        {"dataset": {"builtin": "digits"}, "searchSpace": {"architectures": ["cnn", "mobilenet"],
         "classifier": {"layers": {"min": 1, "max": 3}}}}
    )  # fmt: skip
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(1))
    for _ in range(1500):
        trial = study.ask()
        architecture = sample_architecture(trial, spec.search_space)
        trial.set_user_attr(Attr.ARCHITECTURE, architecture.model_dump(mode="json"))
        study.tell(trial, architecture.learning_rate * 50 + 0.3)
    data = report_data(study, spec, {"reason": "maxTrials", "message": "1500 trials"})
    message = DeliverMessage(
        search="ns.long", trial_id=1, number=1, round=1, best=digits_trial("ns.long", 1),
        formats=["keras"], to=ToFolder(path="ns/long"), report=data,
    )  # fmt: skip
    body = encode(message)
    assert len(body) < MAX_BODY_BYTES
    received = decode(body)
    assert isinstance(received, DeliverMessage)
    assert received.report == data
    shown = data.summary["trials"]
    assert data.summary["trials_total"] == 1500
    assert 10 <= len(shown) < 1500
    assert data.summary["best"]["number"] in {t["number"] for t in shown}
    assert max(t["number"] for t in shown) == 1499  # the latest are kept
    # the final job estimates the importances from what the message carries
    assert data.trials is not None
    importances, note = param_importances(study_of_inputs(data.trials))
    assert note is None
    assert importances is not None
    assert "learning_rate" in importances
    page = render_report(tmp_path, data.summary, None, importances, note).read_text()
    assert f"{len(shown)} of 1500 trials: the best, the front and the latest." in page


def test_mloptimizer_report_draws_a_delivered_folder_again_from_its_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mloptimizer.app.cli import main

    summary = {**_summary(), "search": "ns.delivered"}
    evaluation = {
        "split": "test", "images": 4, "accuracy": 0.75, "precision_macro": 0.8,
        "recall_macro": 0.75, "f1_macro": 0.7, "confusion": [[2, 0], [1, 1]],
        "class_names": ["cracks", "potholes"], "model": "kept", "model_file": "model.keras",
        "per_class": [
            {"class": "cracks", "precision": 0.67, "recall": 1.0, "f1": 0.8, "support": 2},
            {"class": "potholes", "precision": 1.0, "recall": 0.5, "f1": 0.67, "support": 2},
        ],
    }  # fmt: skip
    first = render_report(tmp_path, summary, evaluation, None, "Not estimated: 3 trials.",
                          every_file=True).read_text()  # fmt: skip
    assert "| potholes | 1.0000 | 0.5000 | 0.6700 | 2 |" in first
    (tmp_path / "report.md").unlink()
    (tmp_path / "confusion.png").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert f"report: {tmp_path / 'report.md'}" in capsys.readouterr().out
    assert (tmp_path / "report.md").read_text() == first
    assert (tmp_path / "confusion.png").read_bytes().startswith(PNG)
