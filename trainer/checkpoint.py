"""A checkpoint of every epoch, so that a trial whose trainer died goes on where it stopped.

After each epoch the trainer writes the trial's state to a folder that the next trainer to
get the trial can read: ``mloptimizer run``'s run folder, or the search's claim. The state
is everything an uninterrupted run would carry over:

* every variable of the model and of its optimizer, in the order Keras keeps them (one
  uncompressed ``.npz``: a few milliseconds, where a ``.keras`` file took 50-170 ms an
  epoch). That includes the state of its random generators (dropout's), which a ``.keras``
  file leaves out, so that a resumed run draws the same dropout masks;
* the epochs done and the history so far.

The next trainer builds the trial's model from its architecture and puts the variables
back.

The order of the training data is a function of the trial's seed and the epoch
(:func:`~mloptimizer.trainer.data.make_dataset` with ``epochs``). So a trial resumed at
epoch k gives the same metrics as one never stopped: identical on this CPU
(tests/trainer/test_checkpoint.py).

Writing is atomic: the variables go to their own file for that epoch first, then
``meta.json`` is replaced in one step to name it, then older epochs' files go. A trainer
killed at any point leaves the previous checkpoint whole.

Only the trial's holder can write a checkpoint that is believed. ``meta.json`` carries an
HMAC, keyed with the trial's capability token (which only trainers that received the trial
learn), over the identity, the epoch, the history and the variables file's SHA-256.
Another trainer of the search shares the folder but cannot forge one. A checkpoint that
does not verify, or is of another architecture, epochs or seed, is ignored: the trial
starts over, and nothing is lost but time. Variables are read with ``allow_pickle=False``:
a planted file can hold numbers only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mloptimizer.messages import TrialMessage

__all__ = ["CHECKPOINTS_DIR", "Checkpoint", "Checkpoints", "file_sha256", "seed_states"]

CHECKPOINTS_DIR = "checkpoints"  # in a run folder, or in the search's folder of its claim

log = logging.getLogger("mloptimizer.trainer")


def _identity(trial: TrialMessage) -> dict[str, Any]:
    """What a checkpoint must match to stand for ``trial``."""
    return {
        "trial_id": trial.trial_id,
        "number": trial.number,
        "architecture": trial.architecture.model_dump(mode="json"),
        "epochs": trial.epochs,
        "seed": trial.seed,
        "batch_size": trial.batch_size,
    }


def _state(model: Any) -> list[Any]:
    """Every variable that carries training on, in a fixed order: the model's (weights,
    and its random generators' states, which a ``.keras`` file leaves out), then the
    optimizer's (its step count and moments)."""
    return [*model.variables, *model.optimizer.variables]


def seed_states(model: Any) -> list[list[int]]:
    """The model's random generator states (dropout's, among others), in model order."""
    return [[int(x) for x in v.numpy().ravel()] for v in model.variables if "seed_gen" in v.path]


def file_sha256(path: Path) -> str:
    """The file's SHA-256 (hex), read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _mac(token: str, meta: dict[str, Any]) -> str:
    signed = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(token.encode(), signed, hashlib.sha256).hexdigest()


@dataclass
class Checkpoint:
    """A trial's state after ``epoch`` epochs: the model to go on with, and its history."""

    epoch: int
    history: list[dict[str, float]]
    model: Any = field(repr=False)


@dataclass
class Checkpoints:
    """The checkpoints of a search's trials, one folder per trial under ``folder``."""

    folder: Path

    def _dir(self, trial: TrialMessage) -> Path:
        return self.folder / f"trial-{trial.trial_id}"

    def save(
        self, trial: TrialMessage, epoch: int, history: list[dict[str, float]], model: Any
    ) -> None:
        """Keep ``model`` after ``epoch`` epochs. A failure (a full disk) is logged: it
        costs the resume, never the trial."""
        import numpy as np

        where = self._dir(trial)
        file = where / f"epoch-{epoch}.npz"
        partial = where / f".epoch-{epoch}.partial.npz"
        try:
            where.mkdir(parents=True, exist_ok=True)
            arrays = [v.numpy() for v in _state(model)]
            with partial.open("wb") as handle:
                np.savez(handle, *arrays)  # uncompressed: a few ms, not a .keras's 50-170
            os.replace(partial, file)
            meta = {
                "identity": _identity(trial),
                "epoch": epoch,
                "history": history,
                "variables": [list(a.shape) for a in arrays],
                "model": file.name,
                "sha256": file_sha256(file),
            }
            meta["mac"] = _mac(trial.token, meta)
            staged = where / ".meta.partial.json"
            staged.write_text(json.dumps(meta))
            os.replace(staged, where / "meta.json")  # the checkpoint is now this epoch's
        except Exception as error:
            log.warning("could not checkpoint trial %d at epoch %d: %s", trial.number, epoch, error)
            return
        for old in where.glob("epoch-*.npz"):
            if old.name != file.name:
                old.unlink(missing_ok=True)

    def load(self, trial: TrialMessage, build: Callable[[], Any]) -> Checkpoint | None:
        """The trial's last checkpoint, on a model ``build()`` makes, if there is one that is
        whole, verifies with the trial's token and matches the trial; else None (the trial
        starts over)."""
        import numpy as np

        where = self._dir(trial)
        try:
            meta = json.loads((where / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        why = self._refusal(trial, meta, where)
        if why is None:
            try:
                with np.load(where / meta["model"], allow_pickle=False) as saved:
                    arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
                model = build()
                model.optimizer.build(model.trainable_variables)
                variables = _state(model)
                if [list(v.shape) for v in variables] != [list(a.shape) for a in arrays]:
                    why = "its variables are not this model's"
                else:
                    for variable, array in zip(variables, arrays, strict=True):
                        variable.assign(array)
            except Exception as error:
                why = f"unreadable: {type(error).__name__}: {error}"[:300]
        if why is not None:
            log.warning("trial %d: checkpoint ignored (%s); starting over", trial.number, why)
            return None
        return Checkpoint(int(meta["epoch"]), list(meta["history"]), model)

    @staticmethod
    def _refusal(trial: TrialMessage, meta: Any, where: Path) -> str | None:
        if not isinstance(meta, dict) or not isinstance(meta.get("mac"), str):
            return "no MAC"
        unsigned = {k: v for k, v in meta.items() if k != "mac"}
        if not hmac.compare_digest(meta["mac"], _mac(trial.token, unsigned)):
            return "not written by a holder of the trial"
        if meta.get("identity") != _identity(trial):
            return "of another trial, architecture, seed or epoch count"
        epoch = meta.get("epoch")
        if not isinstance(epoch, int) or not 0 < epoch <= trial.epochs:
            return f"epoch {epoch!r} out of range"
        if len(meta.get("history") or []) != epoch:
            return "history does not match its epoch"
        name = meta.get("model")
        if not isinstance(name, str) or "/" in name or not name.endswith(".npz"):
            return "bad model file name"
        try:
            if file_sha256(where / name) != meta.get("sha256"):
                return "model file changed since"
        except OSError:
            return "model file missing"
        return None

    def discard(self, trial: TrialMessage) -> None:
        """The trial has ended: its checkpoints go."""
        shutil.rmtree(self._dir(trial), ignore_errors=True)
