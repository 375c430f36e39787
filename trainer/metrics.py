"""Imbalance-aware metrics, counted during Keras' own validation pass.

A model that never predicts a rare class can still score a high accuracy; macro F1 (the
mean over classes of each one's F1) and balanced accuracy (the mean of each class's recall)
weigh every class alike. Both are read off one confusion matrix that Keras accumulates batch
by batch, on the predictions it computes anyway: no extra pass over the data. They follow
scikit-learn's definitions: the classes averaged are those seen among the labels or the
predictions (F1), or among the labels (recall), and 0/0 counts as 0.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

__all__ = ["CLASS_METRICS", "CLASS_METRIC_FLAG", "ConfusionMetric", "class_metrics", "portable"]

# objective.metric -> the Keras metric's name (Keras prefixes "val_" on validation)
CLASS_METRICS = {"val_f1_macro": "f1_macro", "val_balanced_accuracy": "balanced_accuracy"}


class ConfusionMetric(keras.metrics.Metric):  # type: ignore[misc]
    """Macro F1 or balanced accuracy of sparse labels against softmax outputs."""

    def __init__(self, num_classes: int, kind: str, **kwargs: Any) -> None:
        if kind not in CLASS_METRICS.values():
            raise ValueError(f"unknown class metric {kind!r}")
        super().__init__(name=kind, **kwargs)
        self.num_classes = num_classes
        self.kind = kind
        self.matrix = self.add_variable(
            shape=(num_classes, num_classes), initializer="zeros", name="confusion"
        )

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        # sample weights (training.classWeights) reweigh the loss, never what is counted
        n = self.num_classes
        true = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        predicted = ops.cast(ops.argmax(y_pred, axis=-1), "int32")
        counts = ops.bincount(true * n + predicted, minlength=n * n)
        self.matrix.assign_add(ops.reshape(ops.cast(counts[: n * n], self.dtype), (n, n)))

    def result(self) -> Any:
        m = self.matrix
        hits = ops.diagonal(m)
        labelled = ops.sum(m, axis=1)  # per true class
        predicted = ops.sum(m, axis=0)
        recall = ops.divide_no_nan(hits, labelled)
        if self.kind == "balanced_accuracy":
            seen = ops.cast(labelled > 0, self.dtype)
            return ops.divide_no_nan(ops.sum(recall * seen), ops.sum(seen))
        precision = ops.divide_no_nan(hits, predicted)
        f1 = ops.divide_no_nan(2 * precision * recall, precision + recall)
        seen = ops.cast((labelled + predicted) > 0, self.dtype)
        return ops.divide_no_nan(ops.sum(f1 * seen), ops.sum(seen))

    def reset_state(self) -> None:
        self.matrix.assign(ops.zeros_like(self.matrix))

    def get_config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "kind": self.kind, "dtype": self.dtype}


# Set on a model compiled with a class metric (trainer/model.py): portable() recompiles it.
CLASS_METRIC_FLAG = "mloptimizer_class_metric"


def class_metrics(metric: str, num_classes: int) -> list[keras.metrics.Metric]:
    """The metric objects ``objective.metric`` needs besides accuracy (none for the others)."""
    kind = CLASS_METRICS.get(metric)
    return [] if kind is None else [ConfusionMetric(num_classes, kind)]


def portable(model: keras.Model) -> keras.Model:
    """``model`` compiled with Keras' own metrics only, ready to save.

    A saved model names its compiled metrics, and Keras cannot load one that names a class
    it does not know: a model delivered to a user must load in plain Keras. The weights
    and the optimizer (with its state) are kept as they are.
    """
    if getattr(model, CLASS_METRIC_FLAG, False):  # else nothing of ours is named in it
        model.compile(optimizer=model.optimizer, loss=model.loss, metrics=["accuracy"])
        setattr(model, CLASS_METRIC_FLAG, False)
    return model
