"""Local trainer processes as a :class:`~mloptimizer.dispatch.Transport`.

``mloptimizer run`` without ``--broker`` trains on this machine: N processes (spawned,
so TensorFlow is only ever imported in them), each holding its dataset cache across
trials. What runs in a process is given (``serve``, the trainer's entry point, as the
application layer names it): the core never imports the trainer. The transport hands a
trial to an idle process, relays its progress and result messages (the same JSON as over
RabbitMQ), and gives the trial of a process that died to another one with the next
attempt number. It is not durable: trials in flight end with the runner, which
re-enqueues them on the next run.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import multiprocessing.connection
import os
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any, Final

from mloptimizer.dispatch import DeadTrial, Inbound
from mloptimizer.messages import (
    DELIVERY_LIMIT,
    Decision,
    MessageError,
    ProgressMessage,
    ProgressReply,
    Receiver,
    Refuse,
    ResultMessage,
    TrialMessage,
    decode,
    encode,
)

__all__ = ["LocalTransport", "default_threads"]

log = logging.getLogger(__name__)


def default_threads(workers: int) -> int:
    """TensorFlow intra-op threads per local trainer: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


@dataclass
class _Trainer:
    worker_id: str
    process: SpawnProcess
    tasks: Queue[Any]
    replies: Queue[bytes]
    events: Connection
    trial: TrialMessage | None = None
    attempt: int = 0
    leaving: bool = False  # restarting to shed memory: no new trial for it


class LocalTransport:
    """N local trainer processes fed one trial at a time."""

    durable = False

    def __init__(
        self,
        workers: int,
        *,
        serve: Callable[..., None],
        cache_dir: Path,
        base_dir: Path | None = None,
        threads: int | None = None,
        recycle_memory_mb: float | None = None,
        models_dir: Path | None = None,
        checkpoints_dir: Path | None = None,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._context = context
        # Run by each spawned process with (worker id, tasks, events, replies, cache dir,
        # base dir, threads, recycle limit, models dir, checkpoints dir); a module-level
        # function, so spawn can find it.
        self._serve = serve
        self._pending: collections.deque[tuple[int, TrialMessage]] = collections.deque()
        self._dead: list[Inbound] = []  # trials given up after DELIVERY_LIMIT deaths
        self._args = (
            str(cache_dir),
            str(base_dir) if base_dir else None,
            threads,
            recycle_memory_mb,
            str(models_dir) if models_dir else None,
            str(checkpoints_dir) if checkpoints_dir else None,
        )
        self._trainers = [self._start(f"local-{i + 1}") for i in range(workers)]

    def _start(self, worker_id: str) -> _Trainer:
        # Everything is per process: a process killed while writing to a shared queue
        # would leave its lock held (or half a message in it) and silence the others.
        tasks: Queue[Any] = self._context.Queue()
        replies: Queue[bytes] = self._context.Queue()
        events, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=self._serve,
            args=(worker_id, tasks, writer, replies, *self._args),
            name=worker_id,
            daemon=True,
        )
        process.start()
        writer.close()  # the child holds the only writer: its death reads as EOF here
        return _Trainer(worker_id, process, tasks, replies, events)

    def send(self, trial: TrialMessage) -> None:
        self._pending.append((1, trial))
        self._assign()

    def _assign(self) -> None:
        for trainer in self._trainers:
            if not self._pending:
                return
            if trainer.trial is None and not trainer.leaving and trainer.process.is_alive():
                trainer.attempt, trainer.trial = self._pending.popleft()
                trainer.tasks.put((trainer.attempt, encode(trainer.trial)))

    def _revive(self) -> None:
        """Replace dead processes; their trial goes to the front with the next attempt."""
        for i, trainer in enumerate(self._trainers):
            if trainer.process.is_alive():
                continue
            if trainer.leaving and trainer.trial is None:
                log.info("local trainer %s restarted to shed memory", trainer.worker_id)
            else:
                log.warning(
                    "local trainer %s exited (code %s)",
                    trainer.worker_id,
                    trainer.process.exitcode,
                )
            if trainer.trial is not None and trainer.attempt > DELIVERY_LIMIT:
                why = (
                    f"no trainer finished it in {DELIVERY_LIMIT + 1} deliveries (the last "
                    f"exited with code {trainer.process.exitcode}; too much memory?)"
                )
                self._dead.append(Inbound(DeadTrial(trainer.trial, why, exhausted=True)))
            elif trainer.trial is not None:
                self._pending.appendleft((trainer.attempt + 1, trainer.trial))
            trainer.events.close()
            self._trainers[i] = self._start(trainer.worker_id)

    def queued(self) -> None:
        """Local trainers take trials from a process queue nobody can count."""
        return None

    def receive(self, timeout: float) -> list[Inbound]:
        self._revive()
        self._assign()
        received, self._dead = self._dead, []
        readers = {t.events: t for t in self._trainers if not t.events.closed}
        for reader in multiprocessing.connection.wait(list(readers), timeout=timeout):
            trainer = readers[reader]  # type: ignore[index]
            while not trainer.events.closed and trainer.events.poll():
                try:
                    _, body = trainer.events.recv()
                except (EOFError, OSError):  # it died; _revive replaces it
                    trainer.events.close()
                    break
                if body is None:  # about to restart: its result follows, then it ends
                    trainer.leaving = True
                    continue
                inbound = self._inbound(trainer, body)
                if inbound is not None:
                    received.append(inbound)
        self._assign()
        return received

    def _inbound(self, trainer: _Trainer, body: bytes) -> Inbound | None:
        worker_id = trainer.worker_id
        try:
            message = decode(body)
        except MessageError as error:  # our own child wrote it: a bug, not user input
            log.error("local trainer %s sent a bad message: %s", worker_id, error.reason)
            return None
        handler = _RECEIVER.route(message)
        if isinstance(handler, Refuse):
            log.error("local trainer %s sent a message refused: %s", worker_id, handler.reason)
            return None
        return handler(trainer, message)

    def close(self) -> None:
        for trainer in self._trainers:
            if trainer.process.is_alive():
                trainer.tasks.put(None) if trainer.trial is None else trainer.process.terminate()
        for trainer in self._trainers:
            trainer.process.join(timeout=10)
            if trainer.process.is_alive():
                trainer.process.kill()
                trainer.process.join()


def _result_in(trainer: _Trainer, message: ResultMessage) -> Inbound:
    trainer.trial = None
    return Inbound(message)


def _progress_in(trainer: _Trainer, message: ProgressMessage) -> Inbound:
    def reply(decision: Decision) -> None:
        trainer.replies.put(encode(ProgressReply(trial_id=message.trial_id, decision=decision)))

    return Inbound(message, reply=reply)


# What a local trainer process can send over its pipe (messages.ROUTES: the progress and
# results queues, carried together), and what becomes of it.
_RECEIVER: Final[Receiver[Callable[[_Trainer, Any], Inbound]]] = Receiver(
    party="dispatcher",
    reads=("progress", "results"),
    handlers={
        "progress": _progress_in,
        "result": _result_in,
        "delivered": Refuse("no final job runs on this machine"),
    },
)
