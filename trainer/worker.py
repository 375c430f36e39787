"""The broker worker behind ``mloptimizer trainer``: take one trial at a time, never lose one.

Threads: pika is not thread-safe, so the main thread owns the connection. It keeps
heartbeats flowing (``process_data_events``) while a worker thread trains, and does
every publish and ack itself: the training thread hands it progress requests through a
queue and waits (briefly) for the prune decision.

Guarantees:
* prefetch 1; a trial is acked only after its result is confirmed by the broker, so a
  worker that dies mid-trial loses nothing: RabbitMQ redelivers the trial.
* a redelivered trial carries ``attempt`` > 1; results carry the trial id and attempt,
  so the dispatcher tells each trial once. A trial this worker already reported (its
  ack was lost with the channel) is answered from memory instead of trained again.
* malformed messages go to the dead-letter queue with the reason; the worker goes on.
* SIGTERM: stop taking work, stop the trial in hand, requeue it, exit 0.
* a closed channel (consumer timeout) or a lost connection: reconnect with backoff;
  a trial still training finishes and is reported on the new channel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from mloptimizer.broker import REASON_HEADER, attempt_of, declare_queues
from mloptimizer.messages import (
    MessageError,
    ProgressMessage,
    ProgressReply,
    QueueNames,
    ResultMessage,
    TrialMessage,
    decode,
    encode,
)
from mloptimizer.trainer.data import DatasetCache
from mloptimizer.trainer.device import GpuInfo, detect_gpus, device_name
from mloptimizer.trainer.memory import DEFAULT_RECYCLE_MB, MemoryWatch
from mloptimizer.trainer.training import (
    Decision,
    Outcome,
    TrialInterrupted,
    result_message,
    train_trial,
)

__all__ = ["Worker", "WorkerConfig"]

log = logging.getLogger("mloptimizer.trainer")

PERSISTENT = pika.BasicProperties(
    delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json"
)


@dataclass
class WorkerConfig:
    """Settings of one trainer process."""

    broker_url: str
    search: str
    cache_dir: Path
    base_dir: Path | None = None
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    heartbeat: int = 30
    grace_seconds: float = 20.0
    max_backoff: float = 30.0
    queue_prefix: str = "mlopt"
    max_trials: int | None = None  # counted over restarts in place (trials_done)
    # Keras/TensorFlow keep ~8 MB per model built in a process (keras-team/keras#17458),
    # and trials slow down with it: past this growth the worker restarts itself in place.
    recycle_memory_mb: float | None = DEFAULT_RECYCLE_MB
    trials_done: int = 0  # trials served by this worker before it restarted in place


@dataclass
class _ProgressRequest:
    message: ProgressMessage
    decided: threading.Event = field(default_factory=threading.Event)
    decision: Decision = "continue"


@dataclass
class _Job:
    trial: TrialMessage
    attempt: int
    delivery_tag: int | None
    thread: threading.Thread
    stop: threading.Event
    requests: queue.Queue[_ProgressRequest]
    outcome: Outcome | None = None
    load_seconds: float = 0.0
    interrupted: bool = False


class Worker:
    """One trainer: consume trials of one search, train them, report."""

    def __init__(self, config: WorkerConfig, cache: DatasetCache | None = None) -> None:
        self.config = config
        self.names = QueueNames(config.search, config.queue_prefix)
        self.cache = cache or DatasetCache(config.cache_dir, config.base_dir)
        self.gpus: list[GpuInfo] = detect_gpus()
        self.device = device_name(self.gpus)
        self._stop = threading.Event()
        self._job: _Job | None = None
        self._pending: dict[str, _ProgressRequest] = {}
        self._reported: OrderedDict[tuple[int, str], ResultMessage] = OrderedDict()
        self._done = config.trials_done
        self._memory = MemoryWatch(config.recycle_memory_mb)
        self.recycle_due = False
        self._consumer: str | None = None
        self._reply_queue = ""

    def request_stop(self) -> None:
        """Stop taking work (SIGTERM); the trial in hand is requeued."""
        self._stop.set()

    # --- the outer loop: connect, serve, reconnect with backoff --------------------------

    def run(self) -> int:
        """Serve until stopped; returns the process exit code (0)."""
        backoff = 0.5
        while not self._stop.is_set() and not self._finished():
            try:
                parameters = pika.URLParameters(self.config.broker_url)
                parameters.heartbeat = self.config.heartbeat
                connection = pika.BlockingConnection(parameters)
            except pika.exceptions.AMQPError as error:
                log.warning("broker unreachable (%r); retrying in %.1fs", error, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.max_backoff) * random.uniform(0.8, 1.2)
                continue
            backoff = 0.5
            try:
                self._serve(connection)
            except pika.exceptions.AMQPError as error:
                log.warning("lost the broker channel (%r); reconnecting", error)
                if self._job is not None:
                    self._job.delivery_tag = None  # the broker requeued it with the channel
            finally:
                if connection.is_open:
                    with contextlib.suppress(pika.exceptions.AMQPError):
                        connection.close()
        return 0

    def _finished(self) -> bool:
        if self.recycle_due:
            return True
        return self.config.max_trials is not None and self._done >= self.config.max_trials

    @property
    def trials_done(self) -> int:
        """Trials this worker has reported, restarts in place included."""
        return self._done

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested (SIGTERM)."""
        return self._stop.is_set()

    def _check_memory(self) -> None:
        """After a trial: ask for a restart in place once memory grew past the limit."""
        if self._finished():  # leaving anyway
            return
        growth = self._memory.after_trial()
        if growth is not None:
            log.info(
                "memory grew %.0f MB over %d trials (Keras keeps some per model); "
                "restarting in place",
                growth,
                self._done,
            )
            self.recycle_due = True

    def _serve(self, connection: pika.BlockingConnection) -> None:
        channel = connection.channel()
        channel.confirm_delivery()
        declare_queues(channel, self.names)
        channel.basic_qos(prefetch_count=1)
        self._reply_queue = channel.queue_declare(
            queue="", exclusive=True, auto_delete=True
        ).method.queue
        channel.basic_consume(self._reply_queue, self._on_reply, auto_ack=True)
        self._consumer = None
        log.info(
            "worker %s serving %s on %s", self.config.worker_id, self.names.trials, self.device
        )
        while not self._stop.is_set():
            if self._consumer is None and self._job is None and not self._finished():
                self._consumer = channel.basic_consume(self.names.trials, self._on_trial)
            connection.process_data_events(time_limit=0.2)
            if self._job is not None:
                self._pump(channel)
            if self._finished() and self._job is None:
                return
        self._shutdown(channel, connection)

    # --- receiving --------------------------------------------------------------------

    def _on_trial(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        try:
            message = decode(body)
            if not isinstance(message, TrialMessage):
                raise MessageError(f"expected a trial message, got {message.kind!r}")
        except MessageError as error:
            log.error("dead-lettering a message: %s", error.reason)
            headers = dict(properties.headers or {})
            headers[REASON_HEADER] = error.reason
            channel.basic_publish(
                "",
                self.names.dead_letters,
                body,
                pika.BasicProperties(delivery_mode=2, headers=headers),
            )
            channel.basic_ack(method.delivery_tag)
            return
        if self._finished() or self._stop.is_set():
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        attempt = attempt_of(properties.headers)
        if (message.trial_id, message.phase) in self._reported:
            # Its result is confirmed already; only the ack was lost with an old channel.
            log.info("trial %d redelivered after its result was sent: acked", message.number)
            channel.basic_ack(method.delivery_tag)
            return
        stop = threading.Event()
        job = _Job(message, attempt, method.delivery_tag, threading.Thread(), stop, queue.Queue())
        job.thread = threading.Thread(
            target=self._train, args=(job,), daemon=True, name=f"trial-{message.number}"
        )
        self._job = job
        log.info(
            "trial %d (attempt %d): %s", message.number, attempt, message.architecture.summary()
        )
        job.thread.start()

    def _on_reply(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        request = self._pending.pop(properties.correlation_id or "", None)
        if request is None:
            return  # a late reply to a progress message that already timed out
        try:
            reply = decode(body)
        except MessageError:
            reply = None
        if isinstance(reply, ProgressReply) and reply.decision == "prune":
            request.decision = "prune"
        request.decided.set()

    # --- the training thread ------------------------------------------------------------

    def _train(self, job: _Job) -> None:
        trial = job.trial

        def on_epoch(epoch: int, metrics: dict[str, float]) -> Decision:
            request = _ProgressRequest(
                ProgressMessage(
                    search=trial.search,
                    trial_id=trial.trial_id,
                    number=trial.number,
                    attempt=job.attempt,
                    worker_id=self.config.worker_id,
                    epoch=epoch,
                    metrics=metrics,
                )
            )
            job.requests.put(request)
            request.decided.wait(trial.progress_timeout_seconds)
            return request.decision

        try:
            splits, job.load_seconds = self.cache.get(trial.dataset)
        except Exception as error:  # no data: report it, do not crash-loop
            job.outcome = Outcome(state="failed", error=f"dataset: {error}")
            return
        try:
            job.outcome = train_trial(
                trial, splits, on_epoch=on_epoch, stop=job.stop, gpus=self.gpus
            )
        except TrialInterrupted:
            job.interrupted = True

    # --- the main thread's side of a job ----------------------------------------------

    def _pump(self, channel: Any) -> None:
        job = self._job
        assert job is not None
        while True:
            try:
                request = job.requests.get_nowait()
            except queue.Empty:
                break
            correlation = uuid.uuid4().hex
            self._pending[correlation] = request
            channel.basic_publish(
                "",
                self.names.progress,
                encode(request.message),
                pika.BasicProperties(
                    reply_to=self._reply_queue,
                    correlation_id=correlation,
                    content_type="application/json",
                ),
            )
        if job.thread.is_alive():
            return
        if job.interrupted or job.outcome is None:
            self._job = None
            return
        result = self._result(job, job.outcome)
        channel.basic_publish("", self.names.results, encode(result), PERSISTENT)
        self._remember(result)
        self._done += 1
        self._check_memory()
        if self._finished() and self._consumer is not None:
            # Cancel before the ack: prefetch 1 holds the next trial back until then, so
            # none is delivered to a worker about to leave (and counted as an attempt).
            channel.basic_cancel(self._consumer)
            self._consumer = None
        if job.delivery_tag is not None:
            channel.basic_ack(job.delivery_tag)
        self._job = None
        log.info(
            "trial %d %s: value=%s in %.1fs",
            result.number,
            result.state,
            result.value,
            result.train_seconds,
        )

    def _result(self, job: _Job, outcome: Outcome) -> ResultMessage:
        return result_message(
            job.trial,
            outcome,
            attempt=job.attempt,
            worker_id=self.config.worker_id,
            device=self.device,
            load_seconds=job.load_seconds,
        )

    def _remember(self, result: ResultMessage) -> None:
        self._reported[(result.trial_id, result.phase)] = result
        while len(self._reported) > 256:
            self._reported.popitem(last=False)

    def _shutdown(self, channel: Any, connection: pika.BlockingConnection) -> None:
        """SIGTERM: stop the trial in hand and give it back to the queue."""
        job = self._job
        if job is None:
            return
        job.stop.set()
        for request in list(self._pending.values()):
            request.decided.set()
        deadline = time.monotonic() + self.config.grace_seconds
        while job.thread.is_alive() and time.monotonic() < deadline:
            connection.process_data_events(time_limit=0.2)
        if not job.thread.is_alive() and job.outcome is not None and not job.interrupted:
            self._pump(channel)  # it finished before it saw the stop: report it
            return
        if job.delivery_tag is not None:
            channel.basic_nack(job.delivery_tag, requeue=True)
        self._job = None
        log.info("requeued trial %d on shutdown", job.trial.number)
