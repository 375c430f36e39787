"""A trainer process for ``mloptimizer run`` without a broker.

The local runner starts a few of these with ``multiprocessing`` (spawn) and talks to
each over its own queues and pipe, carrying the same JSON messages as RabbitMQ: ``tasks``
brings ``(attempt, trial body)``, the ``events`` pipe takes progress and result bodies
(and ``None`` when the process is about to restart to shed memory),
``replies`` brings the prune decisions. Ctrl-C belongs to the runner, so the process ignores SIGINT;
the runner ends it with a ``None`` task, or terminates it.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from pathlib import Path

from mloptimizer.messages import ProgressMessage, ProgressReply, TrialMessage, decode, encode
from mloptimizer.trainer.data import DatasetCache
from mloptimizer.trainer.device import configure_threads, detect_gpus, device_name
from mloptimizer.trainer.memory import MemoryWatch, recycle_limit_from_env
from mloptimizer.trainer.training import Decision, Outcome, result_message, train_trial

__all__ = ["serve"]

Task = tuple[int, bytes] | None


def serve(
    worker_id: str,
    tasks: Queue[Task],
    events: Connection,
    replies: Queue[bytes],
    cache_dir: str,
    base_dir: str | None,
    threads: int | None,
    recycle_memory_mb: float | None = None,
) -> None:
    """Train trials from ``tasks`` until a ``None`` task arrives.

    Once memory has grown ``recycle_memory_mb`` (None: ``MLOPT_RECYCLE_MEMORY_MB``, else
    1024) past its level after the first trial, the
    process says so on ``events`` (a ``None`` body, before the result, so the runner gives
    it no further trial) and ends; the runner starts a fresh one in its place.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        configure_threads(threads, None)
    cache = DatasetCache(Path(cache_dir), Path(base_dir) if base_dir else None)
    gpus = detect_gpus()
    device = device_name(gpus)
    memory = MemoryWatch(
        recycle_limit_from_env() if recycle_memory_mb is None else recycle_memory_mb
    )
    while (task := tasks.get()) is not None:
        attempt, body = task
        trial = decode(body)
        assert isinstance(trial, TrialMessage)

        on_epoch = _progress_callback(trial, attempt, worker_id, events, replies)
        load_seconds = 0.0
        try:
            splits, load_seconds = cache.get(trial.dataset)
        except Exception as error:  # no data: report it as the trial's failure
            outcome = Outcome(state="failed", error=f"dataset: {error}")
        else:
            outcome = train_trial(
                trial, splits, on_epoch=on_epoch, stop=threading.Event(), gpus=gpus
            )
        result = result_message(
            trial,
            outcome,
            attempt=attempt,
            worker_id=worker_id,
            device=device,
            load_seconds=load_seconds,
        )
        leaving = memory.after_trial() is not None
        if leaving:
            events.send((worker_id, None))
        events.send((worker_id, encode(result)))
        if leaving:
            return


def _progress_callback(
    trial: TrialMessage,
    attempt: int,
    worker_id: str,
    events: Connection,
    replies: Queue[bytes],
) -> Callable[[int, dict[str, float]], Decision]:
    """Send each epoch's progress and wait briefly for the decision (none: continue)."""

    def on_epoch(epoch: int, metrics: dict[str, float]) -> Decision:
        _drain(replies)  # a late reply to an earlier epoch is stale now
        progress = ProgressMessage(
            search=trial.search,
            trial_id=trial.trial_id,
            number=trial.number,
            attempt=attempt,
            worker_id=worker_id,
            epoch=epoch,
            metrics=metrics,
        )
        events.send((worker_id, encode(progress)))
        try:
            reply = decode(replies.get(timeout=trial.progress_timeout_seconds))
        except queue.Empty:
            return "continue"
        if isinstance(reply, ProgressReply) and reply.trial_id == trial.trial_id:
            return reply.decision
        return "continue"

    return on_epoch


def _drain(replies: Queue[bytes]) -> None:
    with contextlib.suppress(queue.Empty):
        while True:
            replies.get_nowait()
