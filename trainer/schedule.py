"""How a refine trial trains: a learning-rate schedule and an early stop on validation.

Exploring trains every trial at its searched, constant learning rate for a few epochs,
which is what ranks architectures fairly. A retraining for many epochs at that rate wastes
its later epochs (bench/vs_peers.py: an ``lr 9.3e-3`` model refined for 10 epochs went from
0.9093 to 0.9098), so a refine trial warms up, decays the rate along a cosine
(:func:`learning_rate_at`), and stops once its objective stops improving, keeping its best
epoch (:class:`KeepBest`). Both act on epochs, so a resumed trial goes on where it was.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import keras

__all__ = ["FLOOR", "KeepBest", "learning_rate_at", "warmup_epochs"]

FLOOR = 0.01  # the cosine ends at this share of the searched rate
_WARMUP_START = 0.1  # the first warm-up epoch trains at this share of it


def warmup_epochs(epochs: int) -> int:
    """The first tenth of ``epochs``, at least one, never all of them."""
    return max(1, min(epochs - 1, round(epochs / 10)))


def learning_rate_at(
    epoch: int, epochs: int, base: float, schedule: Literal["constant", "cosine"]
) -> float:
    """The learning rate of 0-based ``epoch`` of ``epochs``, for the searched rate ``base``.

    ``cosine``: from a tenth of ``base`` up to ``base`` over :func:`warmup_epochs` epochs,
    then down along a cosine to ``FLOOR`` x ``base`` at the last epoch.
    """
    if schedule == "constant" or epochs <= 1:
        return base
    warm = warmup_epochs(epochs)
    if epoch < warm:
        return base * (_WARMUP_START + (1 - _WARMUP_START) * epoch / warm)
    progress = min(1.0, (epoch - warm) / max(1, epochs - 1 - warm))
    return base * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))


class KeepBest(keras.callbacks.Callback):  # type: ignore[misc]
    """Stops training once ``metric`` has not improved for ``patience`` epochs, and leaves
    the model with its best epoch's weights.

    :attr:`best_epoch` is that epoch (1-based, counted from the first epoch trained, a
    checkpoint's included), None until one ends. The best weights live in memory: a trial
    resumed from a checkpoint judges only the epochs it trains itself.
    """

    def __init__(self, metric: str, patience: int) -> None:
        super().__init__()
        self.metric = metric
        self.patience = patience
        self.sign = -1.0 if metric.endswith("loss") else 1.0  # higher is better after it
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.stopped_early = False
        self._weights: list[Any] | None = None
        self._waited = 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        value = (logs or {}).get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        if self.best is None or self.sign * float(value) > self.sign * self.best:
            self.best, self.best_epoch = float(value), epoch + 1
            self._weights = self.model.get_weights()
            self._waited = 0
            return
        self._waited += 1
        if self.patience > 0 and self._waited >= self.patience:
            self.stopped_early = True
            self.model.stop_training = True

    def restore(self) -> None:
        """Put the best epoch's weights back (nothing to do when the last was the best)."""
        if self._weights is not None and self._waited > 0:
            self.model.set_weights(self._weights)
