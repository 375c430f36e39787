"""The one trainer loop body, shared by the broker worker and the local worker.

Whatever carries trials (RabbitMQ for ``mloptimizer trainer``, pipes for the local
processes of ``mloptimizer run``), a trainer does the same with each: get the dataset from
its cache (a failure to load is the trial's failure, not the process's), train with one
progress message per epoch answered by the dispatcher's decision, turn the outcome into the
result message, and watch its memory between trials. :class:`TrialSession` does exactly
that; the transports only move messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mloptimizer.messages import (
    Decision,
    DeliveredMessage,
    DeliverMessage,
    ProgressMessage,
    ProgressReply,
    ResultMessage,
    TrialMessage,
    finite_metrics,
)
from mloptimizer.trainer.checkpoint import Checkpoints
from mloptimizer.trainer.data import DatasetCache
from mloptimizer.trainer.device import GpuInfo, detect_gpus, device_name
from mloptimizer.trainer.kept import KeptModels
from mloptimizer.trainer.memory import MemoryWatch
from mloptimizer.trainer.sharing import share_from_env
from mloptimizer.trainer.training import Outcome, result_message, train_trial

__all__ = ["Ask", "TrialSession", "decision_of"]

log = logging.getLogger("mloptimizer.trainer")

# Send one progress message and return the dispatcher's decision ("continue" if none came).
Ask = Callable[[ProgressMessage], Decision]


def decision_of(reply: ProgressReply) -> Decision:
    """What the dispatcher's answer to a progress report says: go on or prune."""
    return reply.decision


@dataclass
class TrialSession:
    """One trainer process's state across trials: its name, dataset cache, GPUs, memory.

    Args:
        worker_id: the trainer's name in progress and result messages.
        cache: the dataset cache, kept across trials.
        recycle_memory_mb: memory growth (after the first trial) that calls for a restart
            in place; None or 0 never does.
        kept: where this trainer keeps its best model so far (None: nowhere), so that the
            run's report need not train the best again.
        output_dir: where the search's output volume is mounted (the final job writes there).
        checkpoints: where each trial's epochs are kept, so that a trial this or another
            trainer was stopped in goes on where it was: a folder, or the bucket URLs a
            trial's message carries (neither: the trial starts over).
    """

    worker_id: str
    cache: DatasetCache
    recycle_memory_mb: float | None = None
    kept: KeptModels | None = None
    output_dir: Path | None = None
    checkpoints: Checkpoints = field(default_factory=Checkpoints)
    gpus: list[GpuInfo] = field(default_factory=detect_gpus)
    gpu_share: int = field(default_factory=share_from_env)  # trainers on this GPU
    _memory: MemoryWatch = field(init=False)

    def __post_init__(self) -> None:
        self._memory = MemoryWatch(self.recycle_memory_mb)

    @property
    def device(self) -> str:
        return str(device_name(self.gpus))

    def progress(
        self,
        trial: TrialMessage,
        attempt: int,
        epoch: int,
        metrics: dict[str, float],
        replay: bool = False,
    ) -> ProgressMessage:
        """The progress message of one epoch of ``trial`` (``replay``: a checkpoint's
        epoch, told again by the trainer that resumed it)."""
        return ProgressMessage(
            search=trial.search,
            trial_id=trial.trial_id,
            number=trial.number,
            attempt=attempt,
            worker_id=self.worker_id,
            epoch=epoch,
            metrics=finite_metrics(metrics),
            replay=replay,
            token=trial.token,
        )

    def run(
        self, trial: TrialMessage, attempt: int, ask: Ask, stop: threading.Event
    ) -> ResultMessage:
        """Train ``trial`` and return its result message.

        Raises:
            TrialInterrupted: ``stop`` was set (the trial goes back to the queue).
        """
        load_seconds = 0.0
        try:
            splits, load_seconds = self.cache.get(trial.dataset)
        except Exception as error:  # no data: the trial fails, the trainer goes on
            outcome = Outcome(state="failed", error=f"dataset: {error}")
        else:
            began = time.monotonic()

            def on_epoch(epoch: int, metrics: dict[str, float]) -> Decision:
                # a line per epoch in the trainer's log (kubectl logs): signs of life
                pace = (time.monotonic() - began) / max(1, epoch)
                shown = metrics.get(trial.metric)
                log.info(
                    "trial %d epoch %d/%d %s %s %.1fs/epoch",
                    trial.number,
                    epoch,
                    trial.epochs,
                    trial.metric,
                    f"{shown:.4f}" if shown is not None else "-",
                    pace,
                )
                return ask(self.progress(trial, attempt, epoch, metrics))

            def on_replay(epoch: int, metrics: dict[str, float]) -> Decision:
                return ask(self.progress(trial, attempt, epoch, metrics, replay=True))

            holder: dict[str, object] | None = {} if self.kept is not None else None
            outcome = train_trial(
                trial, splits, on_epoch=on_epoch, stop=stop, gpus=self.gpus, keep_model=holder,
                checkpoints=self.checkpoints, on_replay=on_replay,
            )  # fmt: skip
            self.checkpoints.discard(trial)  # ended (an interrupted one raised): not resumed
            if outcome.resumed_at:
                log.info("trial %d resumed at epoch %d", trial.number, outcome.resumed_at)
            if self.kept is not None and holder and outcome.state == "complete":
                self.kept.offer(trial, outcome.value, holder.pop("model"))
        return result_message(
            trial,
            outcome,
            attempt=attempt,
            worker_id=self.worker_id,
            device=self.device,
            load_seconds=load_seconds,
            gpu_share=self.gpu_share if self.gpus else 1,
        )

    def deliver(
        self, message: DeliverMessage, attempt: int, stop: threading.Event
    ) -> DeliveredMessage:
        """The search's final job (:func:`~mloptimizer.trainer.deliver.final_job`).

        Raises:
            TrialInterrupted: ``stop`` was set (the job goes back to the queue).
        """
        from mloptimizer.trainer.deliver import final_job

        return final_job(
            message,
            attempt,
            worker_id=self.worker_id,
            cache=self.cache,
            output_dir=self.output_dir,
            gpus=self.gpus,
            stop=stop,
        )

    def restart_due(self, trials_done: int) -> bool:
        """After a trial: whether memory grew past the limit, so the process should restart."""
        growth = self._memory.after_trial()
        if growth is None:
            return False
        log.info(
            "memory grew %.0f MB over %d trials (Keras keeps some per model); restarting in place",
            growth,
            trials_done,
        )
        return True
