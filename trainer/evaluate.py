"""The best model of a search, scored on the held-out test split, for the report.

The trainers of ``mloptimizer run`` keep each their best model in the run folder's
``models/`` (:mod:`~mloptimizer.trainer.kept`): the best trial's model is taken from there.
Only when it is gone (a run under an older version, trainers elsewhere, a deleted folder)
is the best trial retrained here — same architecture, epochs and seed. It is saved as
``best.keras`` and scored on the test images no trial ever saw: accuracy, precision,
recall and F1, macro and per class, and the confusion matrix (the seed's four metrics).
A ``best.json`` next to the model says which trial it is, so a rebuild reuses it.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from mloptimizer.messages import TrialMessage
from mloptimizer.trainer.custom import add_builder_path, import_builder
from mloptimizer.trainer.data import DatasetCache, Splits, make_dataset
from mloptimizer.trainer.device import detect_gpus
from mloptimizer.trainer.kept import MODELS_DIR, identity, kept_model
from mloptimizer.trainer.metrics import portable
from mloptimizer.trainer.training import retrain

__all__ = ["evaluate_best", "evaluate_model", "scores"]


def scores(
    y_true: np.ndarray[Any, Any], y_pred: np.ndarray[Any, Any], class_names: tuple[str, ...]
) -> dict[str, Any]:
    """Accuracy, macro and per-class precision/recall/F1 and the confusion matrix."""
    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    macro = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    return {
        "images": len(y_true),
        "accuracy": float(np.mean(y_true == y_pred)),
        "precision_macro": float(macro[0]),
        "recall_macro": float(macro[1]),
        "f1_macro": float(macro[2]),
        "per_class": [
            {
                "class": name,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(class_names)
        ],
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }


def _test_split(splits: Splits) -> tuple[str, Any, Any]:
    if len(splits.y_test):
        return "test", splits.x_test, splits.y_test
    return "validation", splits.x_val, splits.y_val  # testSplit: 0 keeps no test images


def evaluate_best(
    trial: TrialMessage, out: Path, *, cache_dir: Path, base_dir: Path | None
) -> dict[str, Any]:
    """Retrain ``trial`` (unless ``out/best.keras`` is it) and score it on the test split."""
    splits, _ = DatasetCache(cache_dir, base_dir).get(trial.dataset)
    if trial.architecture.custom_builder is not None:
        if base_dir is not None:
            add_builder_path(base_dir)
        import_builder(trial.architecture.custom_builder)  # registers its Keras classes
    model_path, meta_path = out / "best.keras", out / "best.json"
    wanted = identity(trial)
    model = None
    source = "best.keras"
    if (
        model_path.exists()
        and meta_path.exists()
        and json.loads(meta_path.read_text()).get("identity") == wanted
    ):
        model = keras.models.load_model(model_path)
    elif (kept := kept_model(out / MODELS_DIR, trial)) is not None:
        shutil.copyfile(kept, model_path)  # the trainer's own weights: no second training
        model = keras.models.load_model(model_path)
        meta_path.write_text(json.dumps({"identity": wanted, "source": "kept by its trainer"}))
        source = "kept by its trainer"
    if model is None:
        source = "retrained"
        model, outcome = retrain(trial, splits, stop=threading.Event(), gpus=detect_gpus())
        portable(model).save(model_path)
        meta_path.write_text(
            json.dumps({"identity": wanted, "val_accuracy": outcome.val_accuracy, "source": source})
        )
    result = evaluate_model(model, splits)
    result["trial"] = trial.number
    result["model"] = source  # retrained, kept by its trainer, or best.keras of a rebuild
    return result


def evaluate_model(model: Any, splits: Splits) -> dict[str, Any]:
    """:func:`scores` of ``model`` on the held-out split (test, or validation when the spec
    keeps no test images), which it names under ``split``."""
    split, x, y = _test_split(splits)
    probabilities = model.predict(
        make_dataset(x, y, batch_size=256, shuffle=False, seed=0), verbose=0
    )
    result = scores(np.asarray(y), np.argmax(probabilities, axis=1), splits.class_names)
    result["split"] = split
    return result
