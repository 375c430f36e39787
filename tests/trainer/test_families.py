"""The user's own problem on real data: mobilenet blocks that survive int8, augmentation
that stays out of the model, and metrics that see a rare class."""

from __future__ import annotations

import dataclasses
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dispatch import digits_trial
from sklearn.metrics import balanced_accuracy_score, f1_score
from sklearn.utils.class_weight import compute_class_weight

from mloptimizer.messages import TrialMessage
from mloptimizer.space import Architecture, Augment, InvertedResidual
from mloptimizer.spec import Dataset
from mloptimizer.trainer.augment import augmenter
from mloptimizer.trainer.data import DatasetCache, Splits, make_dataset, synthetic
from mloptimizer.trainer.export import export_model
from mloptimizer.trainer.metrics import portable
from mloptimizer.trainer.training import Outcome, balanced_weights, train_trial


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Splits:
    splits, _ = DatasetCache(tmp_path_factory.mktemp("cache")).get(Dataset(builtin="digits"))
    return splits


def mobilenet(**changes: object) -> Architecture:
    arch = Architecture(
        family="mobilenet",
        stem_filters=16,
        mobilenet_blocks=(
            InvertedResidual(expansion=1, filters=16, stride=1),
            InvertedResidual(expansion=4, filters=24, stride=2),
            InvertedResidual(expansion=4, filters=24, stride=1),
        ),
        classifier="gap",
        dropout=0.1,
        learning_rate=0.005,
    )
    return arch.model_copy(update=changes)


def run(trial: TrialMessage, splits: Splits, kept: dict[str, Any] | None = None) -> Outcome:
    outcome = train_trial(
        trial, splits, on_epoch=lambda e, m: "continue", stop=threading.Event(), keep_model=kept
    )
    assert outcome.state == "complete", outcome.error
    return outcome


def test_a_mobilenet_learns_digits_and_keeps_its_accuracy_in_int8(
    digits: Splits, tmp_path: Path
) -> None:
    kept: dict[str, Any] = {}
    trial = digits_trial("ns.families", 1, epochs=12).model_copy(
        update={"architecture": mobilenet()}
    )
    outcome = run(trial, digits, kept)
    assert outcome.value is not None
    assert outcome.value > 0.85
    found = {
        a.format: a for a in export_model(kept["model"], digits, tmp_path, ("keras", "tflite-int8"))
    }
    assert found["tflite-int8"].error is None, found["tflite-int8"].error
    assert found["keras"].accuracy is not None
    assert found["tflite-int8"].accuracy is not None
    assert found["keras"].accuracy > 0.85
    # the bar: int8 within 1 point of the float model, on the held-out digits
    assert abs(found["tflite-int8"].accuracy - found["keras"].accuracy) <= 0.01


def test_augmentation_changes_training_batches_only_and_never_enters_the_model(
    digits: Splits, tmp_path: Path
) -> None:
    augment = Augment(horizontal_flip=True, rotation=0.1, zoom=0.1, contrast=0.2)
    apply = augmenter(augment, seed=3)
    assert apply is not None
    assert augmenter(Augment(), seed=3) is None
    x, y = digits.x_train, digits.y_train
    plain = next(iter(make_dataset(x, y, batch_size=64, shuffle=False, seed=0)))
    changed = next(iter(make_dataset(x, y, batch_size=64, shuffle=False, seed=0, augment=apply)))
    assert changed[0].shape == plain[0].shape
    assert np.array_equal(changed[1].numpy(), plain[1].numpy())  # labels untouched
    assert not np.allclose(changed[0].numpy(), plain[0].numpy())
    assert float(np.min(changed[0])) >= 0.0
    assert float(np.max(changed[0])) <= 1.0
    kept: dict[str, Any] = {}
    arch = mobilenet(augmentation=augment)
    trial = digits_trial("ns.families", 2, epochs=3).model_copy(update={"architecture": arch})
    outcome = run(trial, digits, kept)
    assert len(outcome.history) == 3
    model = kept["model"]
    layers = [type(layer).__name__ for layer in model.layers]
    assert not [name for name in layers if name.startswith("Random")], layers
    found = export_model(model, digits, tmp_path, ("tflite-int8",))
    assert found[0].error is None, found[0].error


def imbalanced(seed: int = 0) -> Splits:
    """Three classes, the last at 5 % of the images (cracks, potholes, and few of the third)."""
    base = synthetic((8, 8, 1), num_classes=3, n=2400, seed=seed)

    def thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rare = np.flatnonzero(y == 2)
        drop = rare[len(rare) // 10 :]  # keep one in ten of class 2
        keep = np.setdiff1d(np.arange(len(y)), drop)
        return x[keep], y[keep]

    x_train, y_train = thin(base.x_train, base.y_train)
    x_val, y_val = thin(base.x_val, base.y_val)
    return dataclasses.replace(base, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val)


@pytest.mark.parametrize(
    ("metric", "score"),
    [
        ("val_f1_macro", lambda y, p: f1_score(y, p, average="macro")),
        ("val_balanced_accuracy", balanced_accuracy_score),
    ],
)
def test_class_metrics_are_scikit_learns_on_the_validation_images(
    metric: str, score: object, tmp_path: Path
) -> None:
    splits = imbalanced()
    assert np.bincount(splits.y_val)[2] < 0.1 * len(splits.y_val)
    kept: dict[str, Any] = {}
    outcome = run(digits_trial("ns.families", 3, epochs=2, metric=metric), splits, kept)
    assert outcome.value == outcome.history[-1][metric]
    assert metric.removeprefix("val_") in outcome.history[-1]  # on training batches too
    model = kept["model"]
    predicted = model.predict(splits.x_val.astype("float32") / 255.0, verbose=0).argmax(1)
    assert outcome.value == pytest.approx(score(splits.y_val, predicted), abs=1e-5)  # type: ignore[operator]
    # a saved model names only Keras' own metrics: it loads in plain Keras
    portable(model).save(tmp_path / "m.keras")
    with zipfile.ZipFile(tmp_path / "m.keras") as saved:
        assert "ConfusionMetric" not in saved.read("config.json").decode()


def test_balanced_class_weights_are_scikit_learns_and_train() -> None:
    splits = imbalanced()
    weights = balanced_weights(splits.y_train)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=splits.y_train)
    assert [weights[c] for c in range(3)] == pytest.approx(list(expected))
    assert weights[2] > 5 * weights[0]
    assert balanced_weights(np.array([0, 0, 2])) == {0: 0.75, 1: 1.0, 2: 1.5}
    trial = digits_trial(
        "ns.families", 4, epochs=2, metric="val_balanced_accuracy", class_weights="balanced"
    )
    outcome = run(trial, splits)
    assert outcome.value is not None
    assert outcome.value > 0.5


def test_batch_norm_averages_span_a_quarter_epoch_of_a_small_image_set() -> None:
    from mloptimizer.trainer.model import batch_norm_momentum, build_model

    assert batch_norm_momentum(None) == 0.9
    assert batch_norm_momentum(400) == 0.9  # capped: digits (40 steps) keeps 0.9 too
    assert batch_norm_momentum(40) == pytest.approx(0.9)
    assert batch_norm_momentum(8) == pytest.approx(0.5)
    assert batch_norm_momentum(4) == 0.0
    assert batch_norm_momentum(1) == 0.0
    model = build_model(mobilenet(), (16, 16, 3), 3, steps_per_epoch=8)
    norms = [layer for layer in model.layers if "BatchNormalization" in type(layer).__name__]
    assert len(norms) == 1 + 2 + 3 + 3  # stem; expansion 1 has no expand; two with one
    assert [layer.momentum for layer in norms] == pytest.approx([0.5] * len(norms))
