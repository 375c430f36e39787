"""The broker worker behind ``mloptimizer trainer``: take one trial at a time, never lose one.

Threads: pika is not thread-safe, so the main thread owns the connection. It keeps
heartbeats flowing (``process_data_events``) while a worker thread trains, and does every
publish and ack itself: the training thread queues its progress messages (and, at its end,
its result) and wakes the main thread with ``add_callback_threadsafe``, then waits
(briefly) for the prune decision. The training itself is :class:`TrialSession`'s, the
same as a local trainer's.

Guarantees:
* prefetch 1; a trial is acked only after its result is confirmed by the broker, so a
  worker that dies mid-trial loses nothing: RabbitMQ redelivers the trial.
* a redelivered trial carries ``attempt`` > 1; results carry the trial id and attempt,
  so the dispatcher tells each trial once. A trial this worker already reported (its
  ack was lost with the channel) is acked at once instead of trained again.
* malformed messages, and trials of another search, are rejected: the broker
  dead-letters them (the dispatcher fails such a trial); the worker goes on. Its login
  may consume the trials queue and its reply queue and publish to the search's inbox
  exchange, nothing more (:func:`~mloptimizer.broker.to_dispatcher`).
* SIGTERM: cancel the consumer first (so no redelivery reaches a worker that would only
  give it back, using up one of the trial's delivery attempts), stop the trial in hand,
  requeue it, exit 0; a trial waiting for a prune decision stops waiting at once.
* a closed channel (consumer timeout) or a lost connection: reconnect with backoff;
  a trial still training finishes and is reported on the new channel.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pika
import pika.exceptions

from mloptimizer.broker import PERSISTENT, attempt_of, dial, to_dispatcher
from mloptimizer.faults import Resume, transient
from mloptimizer.messages import (
    Decision,
    DeliveredMessage,
    DeliverMessage,
    MessageError,
    ProgressMessage,
    QueueNames,
    Receiver,
    Refuse,
    ResultMessage,
    TrialMessage,
    decode,
    encode,
)
from mloptimizer.trainer.checkpoint import Checkpoints
from mloptimizer.trainer.data import DatasetCache
from mloptimizer.trainer.kept import KeptModels
from mloptimizer.trainer.memory import DEFAULT_RECYCLE_MB
from mloptimizer.trainer.session import Ask, TrialSession, decision_of
from mloptimizer.trainer.training import TrialInterrupted

__all__ = ["Worker", "WorkerConfig"]

log = logging.getLogger("mloptimizer.trainer")

# The main thread wakes up at least this often without a callback (a stop request, a
# reconnect), and at once when the training thread has something to send.
_IDLE_SECONDS = 1.0


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
    keep_models: Path | None = None  # where to keep its best model (mloptimizer run's)
    output_dir: Path | None = None  # the search's output volume (the final job writes there)
    checkpoint_dir: Path | None = None  # each trial's epochs, for the next trainer to go on


@dataclass
class _ProgressRequest:
    message: ProgressMessage
    decided: threading.Event = field(default_factory=threading.Event)
    decision: Decision = "continue"


@dataclass
class _Job:
    trial: TrialMessage | DeliverMessage
    attempt: int
    delivery_tag: int | None
    stop: threading.Event = field(default_factory=threading.Event)
    requests: queue.Queue[_ProgressRequest] = field(default_factory=queue.Queue)
    thread: threading.Thread | None = None
    result: ResultMessage | DeliveredMessage | None = None
    ended: bool = False  # the training thread returned (with a result, or interrupted)


def _release_requests(job: _Job) -> None:
    """Answer "continue" to progress asked while stopping (it is never sent)."""
    while True:
        try:
            job.requests.get_nowait().decided.set()
        except queue.Empty:
            return


class Worker:
    """One trainer: consume trials of one search, train them, report."""

    def __init__(self, config: WorkerConfig, cache: DatasetCache | None = None) -> None:
        self.config = config
        self.names = QueueNames(config.search, config.queue_prefix)
        self.session = TrialSession(
            config.worker_id,
            cache or DatasetCache(config.cache_dir, config.base_dir),
            config.recycle_memory_mb,
            KeptModels(config.keep_models) if config.keep_models else None,
            config.output_dir,
            Checkpoints(config.checkpoint_dir),
        )
        self._stop = threading.Event()
        self._job: _Job | None = None
        self._pending: dict[str, _ProgressRequest] = {}
        self._reported: OrderedDict[tuple[int, str], None] = OrderedDict()  # see _key
        self._done = config.trials_done
        self.recycle_due = False
        self._consumer: str | None = None
        self._reply_queue = ""
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None

    @property
    def device(self) -> str:
        return self.session.device

    def request_stop(self) -> None:
        """Stop taking work (SIGTERM); the trial in hand is requeued.

        Called from a signal handler: it only sets a flag (waking pika from here could
        deadlock on its lock); the main loop sees it within a second.
        """
        self._stop.set()

    # --- the outer loop: connect, serve, reconnect with backoff --------------------------

    def run(self) -> int:
        """Serve until stopped; returns the process exit code (0)."""
        resume = Resume(
            self._stop, first=0.5, cap=self.config.max_backoff, jitter=0.2, say=log.warning
        )
        while not self._stop.is_set() and not self._finished():
            try:
                connection = dial(
                    self.config.broker_url,
                    heartbeat=self.config.heartbeat,
                    name=f"trainer {self.config.worker_id}",
                )
            except pika.exceptions.AMQPError as error:
                if not resume.retry(error):
                    raise
                continue
            resume.back()
            try:
                self._serve(connection)
            except pika.exceptions.AMQPError as error:
                if not transient(error):
                    raise
                log.warning("lost the broker channel (%r); reconnecting", error)
                if self._job is not None:
                    self._job.delivery_tag = None  # the broker requeued it with the channel
                    if not connection.is_open:
                        self._abandon(self._job)
            finally:
                self._connection = None
                if connection.is_open:
                    with contextlib.suppress(pika.exceptions.AMQPError):
                        connection.close()
        return 0

    def _abandon(self, job: _Job) -> None:
        """The connection dropped mid-trial: the broker gives the trial out again, so stop
        rather than train on beside its next holder, which goes on from the last epoch
        kept (a broker outage costs at most the epoch in progress). Without checkpoints it
        trains on: its result, reported once the broker is back, may still come first."""
        trial = job.trial
        if (
            not job.ended
            and isinstance(trial, TrialMessage)
            and self.session.checkpoints.kept(trial)
        ):
            log.warning("trial %d stopped: the broker gives it out again, and its next holder "
                        "goes on from the last epoch kept", trial.number)  # fmt: skip
            job.stop.set()
            for request in list(self._pending.values()):  # their answers went with the link
                request.decided.set()
            _release_requests(job)

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

    def _wake(self) -> None:
        """From any thread: have the main thread send what is queued, now."""
        connection = self._connection
        if connection is None:
            return
        with contextlib.suppress(Exception):  # closed meanwhile: the next loop turn sends it
            connection.add_callback_threadsafe(self._pump)

    def _serve(self, connection: pika.BlockingConnection) -> None:
        channel = connection.channel()
        channel.confirm_delivery()
        # No declaring: the operator's side made the queues, and this login may not. Until
        # it has, consuming fails with 404 (a closed channel) and the worker dials again.
        channel.basic_qos(prefetch_count=1)
        self._reply_queue = channel.queue_declare(
            queue="", exclusive=True, auto_delete=True
        ).method.queue
        channel.basic_consume(self._reply_queue, self._on_reply, auto_ack=True)
        self._consumer = None
        self._connection, self._channel = connection, channel
        log.info(
            "worker %s serving %s on %s", self.config.worker_id, self.names.trials, self.device
        )
        self._pump()  # a trial that finished while the broker was away is reported here
        while not self._stop.is_set():
            if not channel.is_open:  # closed by the broker (a consumer timeout): reconnect
                raise pika.exceptions.ChannelWrongStateError("the broker closed the channel")
            if self._consumer is None and self._job is None and not self._finished():
                self._consumer = channel.basic_consume(self.names.trials, self._on_trial)
            connection.process_data_events(time_limit=_IDLE_SECONDS)
            self._pump()
            if self._finished() and self._job is None:
                return
        self._shutdown(channel, connection)

    # --- receiving --------------------------------------------------------------------

    def _on_trial(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        try:
            message = decode(body)
            handler = RECEIVER.route(message, "trials")
            if isinstance(handler, Refuse):
                raise MessageError(handler.reason)
            assert isinstance(message, TrialMessage | DeliverMessage)  # what the table takes
            if message.search != self.config.search:
                raise MessageError(
                    f"a trial of search {message.search!r} in the queue of {self.config.search!r}"
                )
        except MessageError as error:
            # Rejected, not requeued: the broker dead-letters it (this login may not
            # publish there itself), and the dispatcher fails a trial it can read.
            log.error("refusing a message (dead-lettered by the broker): %s", error.reason)
            channel.basic_nack(method.delivery_tag, requeue=False)
            return
        if self._finished() or self._stop.is_set():
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        attempt = attempt_of(properties.headers)
        if _key(message) in self._reported:
            # Its result is confirmed already; only the ack was lost with an old channel.
            log.info("trial %d redelivered after its result was sent: acked", message.number)
            channel.basic_ack(method.delivery_tag)
            return
        job = _Job(message, attempt, method.delivery_tag)
        job.thread = threading.Thread(
            target=self._train, args=(job,), daemon=True, name=f"trial-{message.number}"
        )
        self._job = job
        if isinstance(message, DeliverMessage):
            log.info("final job (round %d, attempt %d): trial %d", message.round, attempt,
                     message.number)  # fmt: skip
        else:
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
        handler = RECEIVER.route(reply, "reply_to") if reply is not None else None
        if handler is not None and not isinstance(handler, Refuse):
            request.decision = handler(reply)
        request.decided.set()

    # --- the training thread ------------------------------------------------------------

    def _train(self, job: _Job) -> None:
        def ask(progress: ProgressMessage) -> Decision:
            if job.stop.is_set():  # stopping: no progress goes out, so no answer comes
                return "continue"
            request = _ProgressRequest(progress)
            job.requests.put(request)
            self._wake()
            trial = job.trial
            assert isinstance(trial, TrialMessage)  # a final job asks nothing
            request.decided.wait(trial.progress_timeout_seconds)
            return request.decision

        try:
            job.result = RECEIVER.handlers[job.trial.kind](self, job, ask)  # type: ignore[operator]
        except TrialInterrupted:
            pass
        finally:
            job.ended = True
            self._wake()

    # --- the main thread's side of a job ----------------------------------------------

    def _run_trial(self, job: _Job, ask: Ask) -> ResultMessage:
        assert isinstance(job.trial, TrialMessage)
        return self.session.run(job.trial, job.attempt, ask, job.stop)

    def _run_final_job(self, job: _Job, ask: Ask) -> DeliveredMessage:
        assert isinstance(job.trial, DeliverMessage)
        return self.session.deliver(job.trial, job.attempt, job.stop)

    def _pump(self) -> None:
        """Main thread: publish the job's progress, and its result once it ended."""
        job, channel = self._job, self._channel
        if job is None or channel is None or not channel.is_open:
            return
        while True:
            try:
                request = job.requests.get_nowait()
            except queue.Empty:
                break
            if job.stop.is_set():  # stopping: nobody will wait for the answer
                request.decided.set()
                continue
            correlation = uuid.uuid4().hex
            self._pending[correlation] = request
            to_dispatcher(
                channel,
                self.names,
                self.names.progress,
                encode(request.message),
                pika.BasicProperties(
                    reply_to=self._reply_queue,
                    correlation_id=correlation,
                    content_type="application/json",
                ),
            )
        if not job.ended:
            return
        if job.result is None:  # interrupted: _shutdown requeues it, or the broker did
            if job.delivery_tag is None:
                self._job = None  # abandoned with its connection (_abandon): serve on
            return
        result = job.result
        to_dispatcher(channel, self.names, self.names.results, encode(result), PERSISTENT)
        self._remember(result)
        self._done += 1
        if not self._finished() and self.session.restart_due(self._done):
            self.recycle_due = True
        if self._finished() and self._consumer is not None:
            # Cancel before the ack: prefetch 1 holds the next trial back until then, so
            # none is delivered to a worker about to leave (and counted as an attempt).
            channel.basic_cancel(self._consumer)
            self._consumer = None
        if job.delivery_tag is not None:
            channel.basic_ack(job.delivery_tag)
        self._job = None
        if isinstance(result, DeliveredMessage):
            log.info("final job %s: %s", result.state, result.error or "delivered")
            return
        log.info(
            "trial %d %s: value=%s in %.1fs",
            result.number,
            result.state,
            result.value,
            result.train_seconds,
        )

    def _remember(self, result: ResultMessage | DeliveredMessage) -> None:
        self._reported[_key(result)] = None
        while len(self._reported) > 256:
            self._reported.popitem(last=False)

    def _shutdown(self, channel: Any, connection: pika.BlockingConnection) -> None:
        """SIGTERM: stop the trial in hand and give it back to the queue."""
        if self._consumer is not None:
            # First: a trial requeued below (or any other) must not come back to this
            # consumer, which would only nack it again and use up its delivery attempts.
            channel.basic_cancel(self._consumer)
            self._consumer = None
        job = self._job
        if job is None:
            return
        job.stop.set()
        for request in list(self._pending.values()):
            request.decided.set()
        deadline = time.monotonic() + self.config.grace_seconds
        while not job.ended and time.monotonic() < deadline:
            _release_requests(job)
            connection.process_data_events(time_limit=0.2)
        if job.ended and job.result is not None:
            self._pump()  # it finished before it saw the stop: report it
            return
        if job.delivery_tag is not None:
            channel.basic_nack(job.delivery_tag, requeue=True)
        self._job = None
        log.info("requeued trial %d on shutdown", job.trial.number)


# What a trainer does with each kind that can arrive on the queues it reads (messages.ROUTES):
# a trial or the final job from the trials queue, the dispatcher's answer on its own reply
# queue (any other kind there is ignored: the epoch goes on).
RECEIVER: Final[Receiver[Any]] = Receiver(
    party="trainer",
    reads=("trials", "reply_to"),
    handlers={
        "trial": Worker._run_trial,
        "deliver": Worker._run_final_job,
        "progress-reply": decision_of,
    },
)


def _key(
    message: TrialMessage | DeliverMessage | ResultMessage | DeliveredMessage,
) -> tuple[int, str]:
    """What a result answers: a trial's phase, or a round of the final job."""
    if isinstance(message, DeliverMessage | DeliveredMessage):
        return (message.trial_id, f"deliver-{message.round}")
    return (message.trial_id, message.phase)
