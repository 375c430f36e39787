"""Trained models kept where the run can reach them, so the best is never trained twice.

A trainer cannot know which trial will end up best, but the best trial of a search is the
best of the trainer that trained it. So each trainer given a folder keeps the model of its
own best trial so far (``trial-<number>.keras``, with ``trial-<number>.json`` saying which
trial, architecture and epochs it is) and deletes the one it replaces: one model per
trainer on disk, a save only when its best improves. The report takes the search's best
from there (:func:`kept_model`) and retrains only when it is gone.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mloptimizer.messages import TrialMessage

__all__ = ["MODELS_DIR", "KeptModels", "identity", "kept_model"]

MODELS_DIR = "models"  # in a run folder: what its trainers kept

log = logging.getLogger("mloptimizer.trainer")


def identity(trial: TrialMessage) -> dict[str, Any]:
    """What a model file must match to stand for ``trial``: its number, architecture and
    epochs (a study's trial numbers repeat across runs of other specs)."""
    return {
        "trial": trial.number,
        "architecture": trial.architecture.model_dump(mode="json"),
        "epochs": trial.epochs,
    }


def _paths(folder: Path, number: int) -> tuple[Path, Path]:
    return folder / f"trial-{number}.keras", folder / f"trial-{number}.json"


def kept_model(folder: Path, trial: TrialMessage) -> Path | None:
    """The kept model file of ``trial`` in ``folder``, if one is there and matches it."""
    model, meta = _paths(folder, trial.number)
    try:
        if json.loads(meta.read_text()).get("identity") != identity(trial):
            return None
    except (OSError, ValueError):
        return None
    return model if model.exists() else None


@dataclass
class KeptModels:
    """One trainer's best model so far, kept in ``folder``."""

    folder: Path
    _best: tuple[float, int] | None = None  # (value as a loss, trial number)

    def offer(self, trial: TrialMessage, value: float | None, model: Any) -> None:
        """Keep ``model`` if ``trial`` is this trainer's best so far (else drop it)."""
        if value is None:
            return
        loss = value if trial.metric.endswith("loss") else -value
        if self._best is not None and loss >= self._best[0]:
            return
        from mloptimizer.trainer.metrics import portable  # Keras: only once a model is kept

        path, meta = _paths(self.folder, trial.number)
        partial = path.with_name(f".{path.stem}.partial.keras")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            portable(model).save(partial)
            os.replace(partial, path)  # never a half-written model under the real name
            meta.write_text(json.dumps({"identity": identity(trial), "value": value}))
        except Exception as error:  # a full disk costs the reuse, never the trial
            log.warning("could not keep the model of trial %d: %s", trial.number, error)
            return
        if self._best is not None:
            for old in _paths(self.folder, self._best[1]):
                old.unlink(missing_ok=True)
        self._best = (loss, trial.number)
