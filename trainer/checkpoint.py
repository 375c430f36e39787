"""A checkpoint of every epoch, so that a trial whose trainer died goes on where it stopped.

After each epoch the trainer writes the trial's state where the next trainer to get the
trial can read it: ``mloptimizer run``'s run folder, the search's claim, or (a search
delivering to S3, whose trainers share no folder) the search's bucket, through URLs the
operator signed for that trial alone. The state is everything an uninterrupted run would
carry over:

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

Writing is atomic: the variables go to one of two files (``state-0.npz``, ``state-1.npz``,
by the epoch's parity) first, then ``meta.json`` is replaced in one step to name it. A
trainer killed at any point, or a PUT that fails, leaves the previous checkpoint whole.

Only the trial's holder can write a checkpoint that is believed. ``meta.json`` carries an
HMAC, keyed with the trial's capability token (which only trainers that received the trial
learn), over the identity, the epoch, the history and the variables file's SHA-256.
Another trainer of the search shares the folder (a bucket URL is its trial's alone) but
cannot forge one. A checkpoint that
does not verify, or is of another architecture, epochs or seed, is ignored: the trial
starts over, and nothing is lost but time. Variables are read with ``allow_pickle=False``:
a planted file can hold numbers only.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mloptimizer.messages import CHECKPOINTS_DIR, CheckpointUrls, TrialMessage

__all__ = ["CHECKPOINTS_DIR", "Checkpoint", "Checkpoints", "file_sha256", "seed_states"]

STATE_OBJECTS = ("state-0.npz", "state-1.npz")  # meta.json names one of the two
MAX_CHECKPOINT_BYTES = 2 * 1024**3  # read at most (a 160M-weight model's state)
MAX_META_BYTES = 16 * 1024**2  # meta.json: the history of 10,000 epochs fits many times
_HTTP_TIMEOUT = 120.0

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


def _limit(name: str) -> int:
    """The most bytes a checkpoint object may hold: another trainer of the search could
    plant a huge one where the next holder reads."""
    return MAX_META_BYTES if name == "meta.json" else MAX_CHECKPOINT_BYTES


class _Folder:
    """A trial's checkpoint objects as files in its folder (a run folder's, a claim's):
    each replaced in one step."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def read(self, name: str) -> bytes | None:
        try:
            with (self.where / name).open("rb") as handle:
                data = handle.read(_limit(name) + 1)
        except OSError:
            return None
        if len(data) > _limit(name):
            raise ValueError(f"{name} is over {_limit(name)} bytes")
        return data

    def write(self, name: str, data: bytes) -> None:
        self.where.mkdir(parents=True, exist_ok=True)
        staged = self.where / f".{name}.partial"
        staged.write_bytes(data)
        os.replace(staged, self.where / name)

    def discard(self) -> None:
        shutil.rmtree(self.where, ignore_errors=True)


class _Urls:
    """A trial's checkpoint objects in a bucket, through the URLs the operator signed for
    it (:class:`~mloptimizer.messages.CheckpointUrls`): one PUT replaces an object whole.
    The operator removes them when the trial ends (the trainer may not delete)."""

    def __init__(self, urls: CheckpointUrls) -> None:
        self.urls = urls

    def read(self, name: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.urls.get[name], timeout=_HTTP_TIMEOUT) as answer:  # type: ignore[index]
                data: bytes = answer.read(_limit(name) + 1)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None  # none kept yet
            raise
        if len(data) > _limit(name):
            raise ValueError(f"{name} is over {_limit(name)} bytes")
        return data

    def write(self, name: str, data: bytes) -> None:
        request = urllib.request.Request(
            self.urls.put[name],  # type: ignore[index]
            data=data,
            method="PUT",
            headers={"Content-Length": str(len(data))},
        )
        with urllib.request.urlopen(request, timeout=_HTTP_TIMEOUT) as answer:
            answer.read()

    def discard(self) -> None:
        pass


_Store = _Folder | _Urls


@dataclass
class Checkpoints:
    """Where a trainer keeps its trials' checkpoints: the bucket URLs a trial's message
    carries, else one folder per trial under ``folder`` (None: no folder; a trial without
    URLs then starts over if its trainer goes away)."""

    folder: Path | None = None

    def _store(self, trial: TrialMessage) -> _Store | None:
        if trial.checkpoint is not None:
            return _Urls(trial.checkpoint)
        if self.folder is not None:
            return _Folder(self.folder / f"trial-{trial.trial_id}")
        return None

    def kept(self, trial: TrialMessage) -> bool:
        """Whether ``trial``'s epochs are kept somewhere the next trainer can read."""
        return self._store(trial) is not None

    def save(
        self, trial: TrialMessage, epoch: int, history: list[dict[str, float]], model: Any
    ) -> None:
        """Keep ``model`` after ``epoch`` epochs. A failure (a full disk, a bucket away) is
        logged: it costs the resume, never the trial."""
        import numpy as np

        store = self._store(trial)
        if store is None:
            return
        # two alternating objects: meta.json always names one that is whole, even when a
        # trainer dies (or a PUT fails) while the next is written
        name = f"state-{epoch % 2}.npz"
        try:
            arrays = [v.numpy() for v in _state(model)]
            buffer = io.BytesIO()
            np.savez(buffer, *arrays)  # uncompressed: a few ms, not a .keras's 50-170
            data = buffer.getvalue()
            store.write(name, data)
            meta = {
                "identity": _identity(trial),
                "epoch": epoch,
                "history": history,
                "variables": [list(a.shape) for a in arrays],
                "model": name,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            meta["mac"] = _mac(trial.token, meta)
            store.write("meta.json", json.dumps(meta).encode())  # now this epoch's
        except Exception as error:
            log.warning("could not checkpoint trial %d at epoch %d: %s", trial.number, epoch, error)

    def load(self, trial: TrialMessage, build: Callable[[], Any]) -> Checkpoint | None:
        """The trial's last checkpoint, on a model ``build()`` makes, if there is one that is
        whole, verifies with the trial's token and matches the trial; else None (the trial
        starts over)."""
        import numpy as np

        store = self._store(trial)
        if store is None:
            return None
        data = b""
        try:
            raw = store.read("meta.json")
            if raw is None:
                return None
            meta = json.loads(raw)
            why = self._refusal(trial, meta)
            if why is None:
                data = store.read(meta["model"]) or b""
                if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
                    why = "its variables file is missing or changed since"
        except Exception as error:
            why = f"unreadable: {type(error).__name__}: {error}"[:300]
        if why is None:
            try:
                with np.load(io.BytesIO(data), allow_pickle=False) as saved:
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
    def _refusal(trial: TrialMessage, meta: Any) -> str | None:
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
        if meta.get("model") not in STATE_OBJECTS:
            return "bad model file name"
        return None

    def discard(self, trial: TrialMessage) -> None:
        """The trial has ended: its checkpoints go (a bucket's, the operator removes)."""
        store = self._store(trial)
        if store is not None:
            store.discard()
