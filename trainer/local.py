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
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any, Final

from mloptimizer.messages import (
    Decision,
    ProgressMessage,
    Receiver,
    Refuse,
    ResultMessage,
    TrialMessage,
    decode,
    encode,
)
from mloptimizer.trainer.checkpoint import Checkpoints
from mloptimizer.trainer.custom import add_builder_path
from mloptimizer.trainer.data import DatasetCache
from mloptimizer.trainer.device import configure_threads
from mloptimizer.trainer.kept import KeptModels
from mloptimizer.trainer.memory import recycle_limit_from_env
from mloptimizer.trainer.session import Ask, TrialSession, decision_of

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
    models_dir: str | None = None,
    checkpoints_dir: str | None = None,
) -> None:
    """Train trials from ``tasks`` until a ``None`` task arrives.

    Once memory has grown ``recycle_memory_mb`` (None: ``MLOPT_RECYCLE_MEMORY_MB``, else
    1024) past its level after the first trial, the process says so on ``events`` (a
    ``None`` body, before the result, so the runner gives it no further trial) and ends;
    the runner starts a fresh one in its place. ``models_dir``: where the process keeps
    the model of its best trial (see :mod:`~mloptimizer.trainer.kept`); ``checkpoints_dir``:
    where each trial's epochs are kept, so that a trial whose process died goes on where it
    was (see :mod:`~mloptimizer.trainer.checkpoint`).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if base_dir:  # a custom builder may live beside the search file
        add_builder_path(Path(base_dir))
    if threads:
        configure_threads(threads, None)
    session = TrialSession(
        worker_id,
        DatasetCache(Path(cache_dir), Path(base_dir) if base_dir else None),
        recycle_limit_from_env() if recycle_memory_mb is None else recycle_memory_mb,
        KeptModels(Path(models_dir)) if models_dir else None,
        checkpoints=Checkpoints(Path(checkpoints_dir) if checkpoints_dir else None),
    )
    done = 0
    while (task := tasks.get()) is not None:
        attempt, body = task
        trial = decode(body)
        run = RECEIVER.route(trial, "trials")
        assert not isinstance(run, Refuse), run.reason  # the runner sends trials only
        result = run(session, trial, attempt, (worker_id, events, replies))
        done += 1
        leaving = session.restart_due(done)
        if leaving:
            events.send((worker_id, None))
        events.send((worker_id, encode(result)))
        if leaving:
            return


_NEVER = threading.Event()  # the runner stops a local trainer by ending it, not mid-trial


def _asker(trial: TrialMessage, worker_id: str, events: Connection, replies: Queue[bytes]) -> Ask:
    """Send each epoch's progress and wait briefly for the decision (none: continue)."""

    def ask(progress: ProgressMessage) -> Decision:
        _drain(replies)  # a late reply to an earlier epoch is stale now
        events.send((worker_id, encode(progress)))
        try:
            reply = decode(replies.get(timeout=trial.progress_timeout_seconds))
        except queue.Empty:
            return "continue"
        decide = RECEIVER.route(reply, "reply_to")
        if isinstance(decide, Refuse) or reply.trial_id != trial.trial_id:
            return "continue"
        decision: Decision = decide(reply)
        return decision

    return ask


def _drain(replies: Queue[bytes]) -> None:
    with contextlib.suppress(queue.Empty):
        while True:
            replies.get_nowait()


def _run(
    session: TrialSession,
    trial: TrialMessage,
    attempt: int,
    pipes: tuple[str, Connection, Queue[bytes]],
) -> ResultMessage:
    return session.run(trial, attempt, _asker(trial, *pipes), _NEVER)


# What a local trainer process takes from the runner (messages.ROUTES: the trials queue and
# its reply queue, over pipes): trials and the answers to its progress.
RECEIVER: Final[Receiver[Any]] = Receiver(
    party="trainer",
    reads=("trials", "reply_to"),
    handlers={
        "trial": _run,
        "deliver": Refuse("no final job runs on this machine: mloptimizer run exports itself"),
        "progress-reply": decision_of,
    },
)
