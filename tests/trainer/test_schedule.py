"""A refine trial's learning-rate schedule and early stop (trainer/schedule.py), alone and
in a real trial trained on synthetic images."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import numpy as np
import pytest
from dispatch import digits_trial, make_spec

from mloptimizer.dispatch import trial_message
from mloptimizer.trainer.data import Splits, make_dataset, synthetic
from mloptimizer.trainer.schedule import FLOOR, KeepBest, learning_rate_at, warmup_epochs
from mloptimizer.trainer.training import train_trial


def test_cosine_warms_up_then_decays_to_the_floor() -> None:
    rates = [learning_rate_at(e, 20, 1e-2, "cosine") for e in range(20)]
    warm = warmup_epochs(20)
    assert warm == 2
    assert rates[0] == pytest.approx(1e-3)  # a tenth of the searched rate
    assert rates[0] < rates[1] < rates[warm] == pytest.approx(1e-2)
    after = rates[warm:]
    assert all(a > b for a, b in itertools.pairwise(after))
    assert rates[-1] == pytest.approx(FLOOR * 1e-2)
    # 21 epochs: 2 of warm-up, then 18 steps of decay; halfway down at epoch 11
    assert warmup_epochs(21) == 2
    midway = learning_rate_at(11, 21, 1e-2, "cosine")
    assert midway == pytest.approx(1e-2 * (FLOOR + (1 - FLOOR) / 2))


def test_constant_and_a_single_epoch_keep_the_searched_rate() -> None:
    assert {learning_rate_at(e, 10, 3e-3, "constant") for e in range(10)} == {3e-3}
    assert learning_rate_at(0, 1, 3e-3, "cosine") == 3e-3
    # two epochs: one of warm-up, then the searched rate (no room left to decay)
    assert warmup_epochs(2) == 1
    assert learning_rate_at(0, 2, 3e-3, "cosine") == pytest.approx(3e-4)
    assert learning_rate_at(1, 2, 3e-3, "cosine") == 3e-3


class _Model:
    """What KeepBest uses of a Keras model: its weights and the stop flag."""

    def __init__(self) -> None:
        self.weights = [np.zeros(2)]
        self.stop_training = False

    def get_weights(self) -> list[Any]:
        return [w.copy() for w in self.weights]

    def set_weights(self, weights: list[Any]) -> None:
        self.weights = [w.copy() for w in weights]


def run_epochs(keep: KeepBest, model: _Model, values: list[float], key: str) -> int:
    """Epochs run before the stop, each leaving weights equal to its 1-based number."""
    keep.set_model(model)
    for epoch, value in enumerate(values):
        model.weights = [np.full(2, float(epoch + 1))]
        keep.on_epoch_end(epoch, {key: value})
        if model.stop_training:
            return epoch + 1
    return len(values)


def test_keep_best_stops_after_patience_and_restores_the_best_epoch() -> None:
    keep, model = KeepBest("val_accuracy", patience=2), _Model()
    ran = run_epochs(keep, model, [0.5, 0.7, 0.65, 0.69, 0.9], "val_accuracy")
    assert ran == 4  # 0.65 and 0.69 did not beat 0.7: stopped after two
    assert keep.stopped_early
    assert (keep.best_epoch, keep.best) == (2, 0.7)
    keep.restore()
    assert model.weights[0].tolist() == [2.0, 2.0]


def test_keep_best_minimizes_a_loss_and_leaves_a_best_last_epoch_alone() -> None:
    keep, model = KeepBest("val_loss", patience=3), _Model()
    ran = run_epochs(keep, model, [1.0, 0.8, 0.9, 0.5], "val_loss")
    assert ran == 4
    assert not keep.stopped_early
    assert keep.best_epoch == 4
    keep.restore()
    assert model.weights[0].tolist() == [4.0, 4.0]  # the last was the best: unchanged


@pytest.fixture(scope="module")
def splits() -> Splits:
    return synthetic((8, 8, 1), num_classes=3, n=600, seed=0)


def test_a_refine_trial_reports_its_best_epoch_with_those_weights(splits: Splits) -> None:
    spec = make_spec(training={"epochs": 3, "refine": {"topK": 1, "epochs": 12, "patience": 2}})
    base = digits_trial("ns.schedule", trial_id=1)
    message = trial_message(
        spec,
        search="ns.schedule",
        number=1,
        trial_id=1,
        phase="refine",
        architecture=base.architecture.model_copy(update={"learning_rate": 0.05}),
    )
    assert (message.schedule, message.patience, message.epochs) == ("cosine", 2, 12)
    keep: dict[str, Any] = {}
    outcome = train_trial(
        message, splits, on_epoch=lambda e, m: "continue", stop=threading.Event(), keep_model=keep
    )
    assert outcome.state == "complete"
    values = [h["val_accuracy"] for h in outcome.history]
    assert outcome.value == max(values)  # the earliest best epoch, kept
    model = keep["model"]
    val = make_dataset(splits.x_val, splits.y_val, batch_size=32, shuffle=False, seed=0)
    scores = model.evaluate(val, verbose=0, return_dict=True)
    assert scores["accuracy"] == pytest.approx(outcome.value, abs=1e-6)  # its weights
    last = learning_rate_at(outcome.epochs_run - 1, 12, 0.05, "cosine")
    assert float(model.optimizer.learning_rate) == pytest.approx(last, rel=1e-4)


def test_an_explore_trial_keeps_a_constant_rate_and_its_last_epoch(splits: Splits) -> None:
    message = digits_trial("ns.schedule", trial_id=2, epochs=3)
    assert (message.schedule, message.patience) == ("constant", 0)
    keep: dict[str, Any] = {}
    outcome = train_trial(
        message, splits, on_epoch=lambda e, m: "continue", stop=threading.Event(), keep_model=keep
    )
    assert outcome.epochs_run == 3
    assert outcome.value == outcome.history[-1]["val_accuracy"]
    rate = message.architecture.learning_rate
    assert float(keep["model"].optimizer.learning_rate) == pytest.approx(rate, rel=1e-6)
