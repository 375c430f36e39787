"""Train one trial: build the model, fit on the cached data, report each epoch, classify failures.

Nothing here knows about the broker: the worker passes ``on_epoch`` (send progress,
return the prune decision) and ``stop`` (set on SIGTERM). A trial that fails — a bad
architecture, a NaN loss, out of memory, any exception — comes back as a ``failed``
outcome with the error; it never raises into the worker, except
:class:`TrialInterrupted` when the worker asked it to stop.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from mloptimizer.messages import (
    BUILDER_UNAVAILABLE,
    MAX_EPOCHS,
    MAX_TEXT,
    Decision,
    ResultMessage,
    TrialMessage,
    finite,
    finite_metrics,
)
from mloptimizer.trainer.augment import augmenter
from mloptimizer.trainer.checkpoint import Checkpoints
from mloptimizer.trainer.custom import BuilderFailed, BuilderUnavailable
from mloptimizer.trainer.data import Splits, make_dataset
from mloptimizer.trainer.device import GpuInfo, choose_precision, fresh_session, use_xla
from mloptimizer.trainer.litert import int8_litert, multiply_adds
from mloptimizer.trainer.model import ArchitectureError, build_model, parameter_count
from mloptimizer.trainer.schedule import KeepBest, learning_rate_at

__all__ = [
    "Outcome",
    "TrialInterrupted",
    "balanced_weights",
    "result_message",
    "retrain",
    "train_trial",
]


class TrialInterrupted(Exception):
    """Training stopped because the worker is shutting down; the trial goes back to the queue."""


@dataclass
class Outcome:
    """How a trial ended, before the worker adds its identity."""

    state: Literal["complete", "pruned", "failed"]
    value: float | None = None
    val_loss: float | None = None
    val_accuracy: float | None = None
    epochs_run: int = 0
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    parameter_count: int = 0
    mflops: float | None = None
    model_kb: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None
    resumed_at: int = 0  # epochs restored from a checkpoint (0: trained from the start)


class _EpochHook(keras.callbacks.Callback):  # type: ignore[misc]
    """Reports each epoch, honours a prune decision, catches NaN, stops on request."""

    def __init__(
        self,
        on_epoch: Callable[[int, dict[str, float]], Decision],
        stop: threading.Event,
        save: Callable[[int, list[dict[str, float]]], None] | None = None,
        history: list[dict[str, float]] | None = None,
    ) -> None:
        super().__init__()
        self.on_epoch = on_epoch
        self.stop = stop
        self.save = save  # a checkpoint of each epoch reported (None: none kept)
        self.history: list[dict[str, float]] = list(history or [])  # a resumed one's so far
        self.pruned = False
        self.interrupted = False
        self.nan_epoch: int | None = None

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self.stop.is_set():
            self.interrupted = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        if self.interrupted:
            return
        if not all(math.isfinite(v) for v in metrics.values()):
            self.nan_epoch = epoch + 1
            self.model.stop_training = True
            return
        self.history.append(metrics)
        # kept first, then reported: a trainer killed between the two costs no epoch, and the
        # one that goes on reports that epoch again (the dispatcher keeps the first report)
        if self.save is not None:
            self.save(epoch + 1, self.history)
        if self.on_epoch(epoch + 1, metrics) == "prune":
            self.pruned = True
            self.model.stop_training = True


def train_trial(
    trial: TrialMessage,
    splits: Splits,
    *,
    on_epoch: Callable[[int, dict[str, float]], Decision],
    stop: threading.Event,
    gpus: Sequence[GpuInfo] = (),
    keep_model: dict[str, Any] | None = None,
    checkpoints: Checkpoints | None = None,
    on_replay: Callable[[int, dict[str, float]], Decision] | None = None,
) -> Outcome:
    """Train ``trial`` on ``splits``; returns its outcome, failures included.

    ``keep_model``, when given, receives the trained model under ``"model"`` (the report
    keeps the best one; trainers discard theirs). ``checkpoints``: where each epoch is
    kept, and where a trial that was stopped goes on from (``Outcome.resumed_at``); it
    first tells the checkpoint's epoch again through ``on_replay`` (default ``on_epoch``).

    Raises:
        TrialInterrupted: ``stop`` was set before training ended.
    """
    resumed_at = 0
    try:
        fresh_session(choose_precision(trial.mixed_precision, gpus))
        keras.utils.set_random_seed(trial.seed)

        def build() -> Any:
            return build_model(
                trial.architecture,
                splits.input_shape,
                splits.num_classes,
                trial.metric,
                steps_per_epoch=math.ceil(len(splits.y_train) / trial.batch_size),
            )

        kept = checkpoints.load(trial, build) if checkpoints is not None else None
        if kept is not None:
            model, resumed_at = kept.model, kept.epoch
        else:
            model = build()
        if kept is None and (over := _over_a_limit(trial, model)) is not None:
            return over  # a custom model over a device limit: measured, never trained
        if use_xla(gpus):
            model.jit_compile = True
        train = make_dataset(
            splits.x_train,
            splits.y_train,
            batch_size=trial.batch_size,
            shuffle=True,
            seed=trial.seed,
            epochs=range(resumed_at, trial.epochs),
            augment=augmenter(trial.architecture.augmentation, trial.seed),
        )
        val = make_dataset(
            splits.x_val, splits.y_val, batch_size=trial.batch_size, shuffle=False, seed=trial.seed
        )

        def save(epoch: int, history: list[dict[str, float]]) -> None:
            if checkpoints is not None:
                checkpoints.save(trial, epoch, history, model)

        hook = _EpochHook(on_epoch, stop, save, kept.history if kept is not None else None)
        replay = on_replay or on_epoch  # the checkpoint's epoch, told again
        if kept is not None and replay(resumed_at, kept.history[-1]) == "prune":
            hook.pruned = True  # the checkpoint's epoch, told again: it may have gone unsent
        callbacks: list[keras.callbacks.Callback] = [hook]
        if trial.schedule != "constant":
            base, epochs, schedule = trial.architecture.learning_rate, trial.epochs, trial.schedule
            callbacks.append(
                keras.callbacks.LearningRateScheduler(
                    lambda epoch, _: learning_rate_at(epoch, epochs, base, schedule)
                )
            )
        keep = KeepBest(trial.metric, trial.patience) if trial.patience > 0 else None
        if keep is not None:
            callbacks.append(keep)
        started = time.perf_counter()
        if resumed_at < trial.epochs and not hook.pruned:
            model.fit(
                train,
                validation_data=val,
                epochs=trial.epochs,
                initial_epoch=resumed_at,
                steps_per_epoch=math.ceil(len(splits.y_train) / trial.batch_size),
                shuffle=False,  # the dataset orders each epoch itself, seeded per trial
                class_weight=(
                    balanced_weights(splits.y_train) if trial.class_weights == "balanced" else None
                ),
                verbose=0,
                callbacks=callbacks,
            )
        if keep is not None:
            keep.restore()  # the best epoch's weights are the trial's model
        seconds = time.perf_counter() - started
        if keep_model is not None:
            keep_model["model"] = model
    except ArchitectureError as error:
        return Outcome(state="failed", error=f"bad architecture: {error}")
    except BuilderUnavailable as error:
        return Outcome(state="failed", error=f"{BUILDER_UNAVAILABLE}{error}"[:2000])
    except BuilderFailed as error:
        return Outcome(state="failed", error=str(error)[:2000])
    except tf.errors.ResourceExhaustedError as error:
        return Outcome(state="failed", error=f"out of memory: {error.message[:500]}")
    except Exception as error:  # a trial's failure must never take the worker down
        return Outcome(state="failed", error=f"{type(error).__name__}: {error}"[:2000])
    if hook.interrupted:
        raise TrialInterrupted(f"trial {trial.number} interrupted")
    epochs_run = len(hook.history)
    trained = epochs_run - resumed_at  # by this trainer
    outcome = Outcome(
        state="pruned" if hook.pruned else "complete",
        epochs_run=epochs_run,
        resumed_at=resumed_at,
        train_seconds=seconds,
        images_per_second=len(splits.y_train) * trained / seconds if seconds > 0 else 0.0,
        parameter_count=parameter_count(model),
        mflops=multiply_adds(model) / 1e6,
        history=hook.history,
    )
    if hook.nan_epoch is not None:
        outcome.state = "failed"
        outcome.error = f"loss became NaN at epoch {hook.nan_epoch}; lower the learning rate"
        return outcome
    if trial.measure_model_kb and outcome.state == "complete":
        try:
            outcome.model_kb = len(int8_litert(model, splits.x_train)) / 1024
        except Exception as error:  # an op LiteRT lacks: the trial cannot be measured
            outcome.state = "failed"
            outcome.error = f"int8 LiteRT conversion failed: {type(error).__name__}: {error}"
            return outcome
    kept_epoch = keep.best_epoch if keep is not None and keep.best_epoch else len(hook.history)
    last = hook.history[kept_epoch - 1] if hook.history else {}
    outcome.val_loss = last.get("val_loss")
    outcome.val_accuracy = last.get("val_accuracy")
    outcome.value = last.get(trial.metric)
    return outcome


def _over_a_limit(trial: TrialMessage, model: Any) -> Outcome | None:
    """A custom model over ``objective.constraints``, measured once built: stopped before
    its first epoch (the dispatcher tells it infeasible). Built-in families never get here
    over a limit: the dispatcher sized them before sending."""
    limits = trial.constraints
    if trial.architecture.family != "custom" or limits is None:
        return None
    params, mflops = parameter_count(model), multiply_adds(model) / 1e6
    if (
        (limits.max_params is not None and params > limits.max_params)
        or (limits.max_mflops is not None and mflops > limits.max_mflops)
        or (limits.max_model_kb is not None and params / 1024 > limits.max_model_kb)
    ):
        return Outcome(state="pruned", epochs_run=0, parameter_count=params, mflops=mflops)
    return None


def balanced_weights(labels: Any) -> dict[int, float]:
    """scikit-learn's ``balanced`` class weights: images / (classes x images of the class).

    A class with no training image gets 1.0: Keras wants a weight for every label up to the
    largest, and that one weighs nothing anyway."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    present = np.count_nonzero(counts)
    return {
        c: float(len(labels) / (present * n)) if n > 0 else 1.0
        for c, n in enumerate(counts.tolist())
    }


def retrain(
    trial: TrialMessage,
    splits: Splits,
    *,
    stop: threading.Event,
    gpus: Sequence[GpuInfo] = (),
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Any, Outcome]:
    """Train ``trial`` again to its last epoch (never pruned) and return the model: the
    final model of a search, for the report and the final job.

    Raises:
        RuntimeError: the training failed (named with the trial and the reason).
        TrialInterrupted: ``stop`` was set before training ended.
    """
    holder: dict[str, Any] = {}

    def go_on(epoch: int, metrics: dict[str, float]) -> Decision:
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        return "continue"

    outcome = train_trial(trial, splits, on_epoch=go_on, stop=stop, gpus=gpus, keep_model=holder)
    if outcome.state != "complete":
        raise RuntimeError(f"retraining trial {trial.number} failed: {outcome.error}")
    return holder["model"], outcome


def result_message(
    trial: TrialMessage,
    outcome: Outcome,
    *,
    attempt: int,
    worker_id: str,
    device: str,
    load_seconds: float,
    gpu_share: int = 1,
) -> ResultMessage:
    """The result message of ``trial``: its identity, the attempt, and how it ended
    (``gpu_share``: the trainers sharing this one's GPU, who split its price)."""
    return ResultMessage(
        search=trial.search,
        trial_id=trial.trial_id,
        number=trial.number,
        phase=trial.phase,
        attempt=attempt,
        worker_id=worker_id,
        state=outcome.state,
        value=finite(outcome.value),
        val_loss=finite(outcome.val_loss),
        val_accuracy=finite(outcome.val_accuracy),
        epochs_run=outcome.epochs_run,
        resumed_at=outcome.resumed_at,
        train_seconds=outcome.train_seconds,
        images_per_second=finite(outcome.images_per_second) or 0.0,
        parameter_count=outcome.parameter_count,
        mflops=finite(outcome.mflops),
        model_kb=finite(outcome.model_kb),
        device=device,
        dataset_load_seconds=load_seconds,
        gpu_share=gpu_share,
        history=[finite_metrics(h) for h in outcome.history[:MAX_EPOCHS]],
        error=outcome.error[:MAX_TEXT] if outcome.error else None,
        token=trial.token,
    )
