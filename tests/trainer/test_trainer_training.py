"""train_trial: the four ways a trial ends (complete, pruned, failed, interrupted)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import tensorflow as tf
from dispatch import digits_trial

from mloptimizer.messages import Decision, TrialMessage
from mloptimizer.space import Architecture
from mloptimizer.spec import Dataset
from mloptimizer.trainer import training
from mloptimizer.trainer.data import DatasetCache, Splits, synthetic
from mloptimizer.trainer.training import TrialInterrupted, train_trial


@pytest.fixture(scope="module")
def splits() -> Splits:
    return synthetic((8, 8, 1), num_classes=3, n=600, seed=0)


def trial(**changes: Any) -> TrialMessage:
    base = digits_trial("ns.training", trial_id=1, epochs=3)
    if "learning_rate" in changes:
        architecture = base.architecture.model_copy(
            update={"learning_rate": changes.pop("learning_rate")}
        )
        changes["architecture"] = architecture
    return base.model_copy(update=changes)


def test_a_complete_trial_reports_every_epoch_and_the_objective(splits: Splits) -> None:
    seen: list[int] = []

    def on_epoch(epoch: int, metrics: dict[str, float]) -> Decision:
        seen.append(epoch)
        return "continue"

    outcome = train_trial(trial(), splits, on_epoch=on_epoch, stop=threading.Event())
    assert outcome.state == "complete"
    assert seen == [1, 2, 3]
    assert outcome.epochs_run == 3
    assert len(outcome.history) == 3
    assert outcome.value == outcome.val_accuracy == outcome.history[-1]["val_accuracy"]
    assert outcome.value is not None
    assert outcome.value > 0.5  # three separable classes: chance is 0.33
    assert outcome.parameter_count > 0
    assert outcome.images_per_second > 0


def test_the_objective_follows_the_metric(splits: Splits) -> None:
    outcome = train_trial(
        trial(metric="val_loss", epochs=1),
        splits,
        on_epoch=lambda e, m: "continue",
        stop=threading.Event(),
    )
    assert outcome.value == outcome.val_loss != outcome.val_accuracy


def test_a_prune_decision_stops_after_that_epoch(splits: Splits) -> None:
    outcome = train_trial(
        trial(),
        splits,
        on_epoch=lambda e, m: "prune" if e == 2 else "continue",
        stop=threading.Event(),
    )
    assert outcome.state == "pruned"
    assert outcome.epochs_run == 2


def test_a_diverging_trial_fails_with_nan_and_the_fix(splits: Splits) -> None:
    outcome = train_trial(
        trial(learning_rate=1e30),
        splits,
        on_epoch=lambda e, m: "continue",
        stop=threading.Event(),
    )
    assert outcome.state == "failed"
    assert outcome.error is not None
    assert "NaN" in outcome.error
    assert "learning rate" in outcome.error


def test_out_of_memory_is_a_failed_trial(splits: Splits, monkeypatch: pytest.MonkeyPatch) -> None:
    def exhausted(*args: Any, **kwargs: Any) -> None:
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")

    monkeypatch.setattr(training, "build_model", exhausted)
    outcome = train_trial(trial(), splits, on_epoch=lambda e, m: "continue", stop=threading.Event())
    assert outcome.state == "failed"
    assert outcome.error == "out of memory: OOM when allocating tensor"


def test_a_bad_architecture_is_a_failed_trial_with_the_reason() -> None:
    tiny = synthetic((4, 4, 1), num_classes=2, n=40, seed=0)
    deep = trial().architecture.model_copy(
        update={"conv_blocks": [{"filters": 16, "kernel_size": 3}] * 4}
    )
    outcome = train_trial(
        trial(architecture=deep), tiny, on_epoch=lambda e, m: "continue", stop=threading.Event()
    )
    assert outcome.state == "failed"
    assert outcome.error is not None
    assert outcome.error.startswith("bad architecture:")


def test_stop_interrupts_instead_of_reporting(splits: Splits) -> None:
    stop = threading.Event()

    def on_epoch(epoch: int, metrics: dict[str, float]) -> Decision:
        stop.set()  # the worker got SIGTERM during epoch 2
        return "continue"

    with pytest.raises(TrialInterrupted):
        train_trial(trial(), splits, on_epoch=on_epoch, stop=stop)


def test_short_trials_score_what_they_learned_not_stale_batch_norm_statistics(
    tmp_path: Path,
) -> None:
    # With Keras' default BatchNormalization momentum (0.99) this model scores ~0.11 (chance)
    # on digits after 4 epochs of 40 steps: the moving statistics have not moved yet.
    splits, _ = DatasetCache(tmp_path).get(Dataset(builtin="digits"))
    gap = Architecture.model_validate(
        {
            "family": "cnn",
            "conv_blocks": [{"filters": 64, "kernel_size": 3}],
            "classifier": "gap",
            "dropout": 0.26,
            "learning_rate": 6.5e-3,
        }
    )
    outcome = train_trial(
        trial(architecture=gap, epochs=4),
        splits,
        on_epoch=lambda e, m: "continue",
        stop=threading.Event(),
    )
    assert outcome.val_accuracy is not None
    assert outcome.val_accuracy > 0.3


def test_a_trial_measures_its_multiply_adds_and_when_asked_its_int8_litert_size(
    splits: Splits,
) -> None:
    from mloptimizer.sizing import model_size

    def go_on(epoch: int, metrics: dict[str, float]) -> Decision:
        return "continue"

    plain = train_trial(trial(epochs=1), splits, on_epoch=go_on, stop=threading.Event())
    assert plain.state == "complete", plain.error
    assert plain.model_kb is None  # not asked: no conversion
    expected = model_size(trial().architecture, (8, 8, 1), 3)
    assert plain.mflops == pytest.approx(expected.mflops)
    measured = train_trial(
        trial(epochs=1, measure_model_kb=True), splits, on_epoch=go_on, stop=threading.Event()
    )
    assert measured.state == "complete", measured.error
    assert measured.model_kb is not None
    # int8: about a byte per weight, plus the flatbuffer's own structure
    assert expected.parameters / 1024 < measured.model_kb < expected.parameters / 1024 + 64
