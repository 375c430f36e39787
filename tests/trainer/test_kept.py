"""Each trainer keeps its best model so far, and only that one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mloptimizer.messages import TrialMessage
from mloptimizer.space import Architecture
from mloptimizer.trainer.kept import KeptModels, kept_model


class FakeModel:
    """A model that saves a file naming itself: what ``KeptModels`` needs of Keras."""

    def __init__(self, name: str) -> None:
        self.name = name

    def save(self, path: Path) -> None:
        Path(path).write_text(self.name)


def trial(number: int, metric: str = "val_accuracy", **overrides: Any) -> TrialMessage:
    architecture = Architecture.model_validate(
        {
            "family": "cnn",
            "conv_blocks": [{"filters": 16, "kernel_size": 3}],
            "classifier": "gap",
            "dropout": 0.1,
            "learning_rate": 0.001,
            **overrides,
        }
    )
    return TrialMessage(
        search="ns.s",
        trial_id=number + 100,
        number=number,
        phase="explore",
        architecture=architecture,
        dataset={"builtin": "digits"},
        epochs=3,
        batch_size=32,
        metric=metric,
        seed=number,
    )


def test_keeps_only_the_best_so_far_and_finds_it_by_identity(tmp_path: Path) -> None:
    kept = KeptModels(tmp_path)
    kept.offer(trial(0), 0.80, FakeModel("t0"))
    kept.offer(trial(1), 0.70, FakeModel("t1"))  # worse: not saved
    kept.offer(trial(2), 0.90, FakeModel("t2"))  # better: replaces trial 0's
    kept.offer(trial(3), None, FakeModel("t3"))  # no value: never kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial-2.json", "trial-2.keras"]
    assert json.loads((tmp_path / "trial-2.json").read_text())["value"] == 0.90
    assert kept_model(tmp_path, trial(2)) == tmp_path / "trial-2.keras"
    assert kept_model(tmp_path, trial(0)) is None  # deleted when replaced
    # a trial of the same number but another architecture (another run's study) is not it
    assert kept_model(tmp_path, trial(2, dropout=0.3)) is None


def test_a_loss_metric_keeps_the_lowest(tmp_path: Path) -> None:
    kept = KeptModels(tmp_path)
    kept.offer(trial(0, "val_loss"), 0.5, FakeModel("t0"))
    kept.offer(trial(1, "val_loss"), 0.9, FakeModel("t1"))
    kept.offer(trial(2, "val_loss"), 0.2, FakeModel("t2"))
    assert [p.name for p in sorted(tmp_path.glob("*.keras"))] == ["trial-2.keras"]


def test_a_failed_save_costs_the_reuse_never_the_trial(tmp_path: Path) -> None:
    blocked = tmp_path / "models"
    blocked.write_text("a file where the folder should be")
    KeptModels(blocked).offer(trial(0), 0.9, FakeModel("t0"))  # logs, does not raise
    assert kept_model(blocked, trial(0)) is None
