"""RabbitMQ as a :class:`~mloptimizer.dispatch.Transport`: the dispatcher's side of the queues.

Trials are published persistent with publisher confirms, so :meth:`AmqpTransport.send`
returns only once the broker has them. Progress and results are consumed with manual
acks, settled only after the dispatcher handled them: a dispatcher that dies in between
gets them again and the study (which knows what it was told) drops the copies. Trials in
flight live in the broker, so the transport is durable: a restarted dispatcher adopts
them. The dead-letter queue is consumed too: a trial in it (given up by the broker after
its delivery limit, or refused by a trainer) reaches the dispatcher as a
:class:`~mloptimizer.dispatch.DeadTrial`, which fails it. A message that does not parse,
or that the dispatcher refuses, goes to the rejected queue with its reason.

Memory stays bounded whatever is queued: the broker refuses bodies over its
``max_message_size``, bodies over ``MAX_BODY_BYTES`` are refused before parsing, and at
most ``prefetch`` messages are held unacknowledged at once on the channel (all its consumers
together): 64 x 512 KiB = 32 MiB for a search flooded at its worst.

:class:`SearchChannel` is what the dispatcher's transport and the operator's final job
(:class:`~mloptimizer.operator.delivery.FinalJobChannel`) share: the dial, confirms, the
declaration, the consumers and the rejected queue.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import pika
import pika.exceptions

from mloptimizer.broker import (
    PERSISTENT,
    dead_letter,
    dead_lettered,
    death_reason,
    declare_queues,
    dial,
    exhausted,
)
from mloptimizer.dispatch import DeadTrial, Inbound, Malformed
from mloptimizer.dispatch.loop import RECEIVER
from mloptimizer.faults import Resume, transient
from mloptimizer.messages import (
    Decision,
    DeliverMessage,
    MessageError,
    ProgressMessage,
    ProgressReply,
    Queue,
    QueueNames,
    Refuse,
    ResultMessage,
    TrialMessage,
    decode,
    encode,
)

__all__ = ["AmqpTransport", "Consumer", "SearchChannel", "prefetch_for"]

log = logging.getLogger(__name__)


SERVER_NAMED = "amq.gen-"  # the prefix of queues the broker names (a trainer's reply queue)

Received = TypeVar("Received")
# A consumer callback of a blocking channel: (channel, method, properties, body).
Consumer = Callable[[Any, Any, Any, bytes], None]


def prefetch_for(parallelism: int) -> int:
    """Unacked messages to hold: enough for every trial in flight to report, bounded."""
    return min(64, 2 * parallelism + 4)


class SearchChannel(Generic[Received]):
    """One blocking channel on a search's queues, for the operator's side of them.

    Dialled with patience (a broker away for ``max_backoff`` s or less is waited for; 0:
    dial once), publisher confirms on, the queues declared, the subclass's consumers
    (:meth:`_consumers`: results and dead letters, and what else it reads) fed with manual
    acks; what they make of the messages is collected for :meth:`receive`. A message
    refused goes to the rejected queue with its reason (:meth:`_reject`).
    """

    def __init__(
        self,
        url: str,
        search: str,
        *,
        prefix: str = "mlopt",
        max_backoff: float = 30.0,
        prefetch: int = 64,
    ) -> None:
        self.url = url
        self.names = QueueNames(search, prefix)
        self.max_backoff = max_backoff
        self.prefetch = prefetch
        self._received: list[Received] = []
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._closed = False
        self._connect()

    def _consumers(self) -> dict[str, Consumer]:
        """Queue -> callback: what this side reads."""
        raise NotImplementedError

    def _connect(self) -> None:
        dialling = Resume(first=0.5, cap=self.max_backoff, give_up_at_cap=True, say=log.warning)
        while True:
            try:
                self._connection = dial(self.url)
                break
            except pika.exceptions.AMQPError as error:
                if not dialling.retry(error):
                    raise
        channel = self._connection.channel()
        channel.confirm_delivery()
        declare_queues(channel, self.names)
        # Per channel, not per consumer (RabbitMQ's global flag): a trainer flooding both
        # progress and results holds the operator to ``prefetch`` bodies in all, each at
        # most the broker's max_message_size (512 KiB: scripts/test, the chart).
        channel.basic_qos(prefetch_count=self.prefetch, global_qos=True)
        for queue, callback in self._consumers().items():
            channel.basic_consume(queue, callback)
        self._channel = channel
        self._received = []  # unacked deliveries of the old channel come again

    def _reject(self, channel: Any, method: Any, properties: Any, body: bytes, why: str) -> None:
        """Keep a message aside in the rejected queue with ``why``, and ack it."""
        dead_letter(channel, self.names.rejected, body, properties.headers, why)
        channel.basic_ack(method.delivery_tag)

    def _publish(self, message: TrialMessage | DeliverMessage) -> None:
        """Put ``message`` on the trials queue, persistent; returns once confirmed."""
        self._channel.basic_publish("", self.names.trials, encode(message), PERSISTENT)

    def _process(self, timeout: float) -> None:
        assert self._connection is not None
        self._connection.process_data_events(time_limit=timeout)

    def receive(self, timeout: float) -> list[Received]:
        """What arrived within ``timeout`` seconds."""
        self._process(timeout)
        received, self._received = self._received, []
        return received

    def close(self) -> None:
        self._closed = True
        if self._connection is not None and self._connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._connection.close()


class AmqpTransport(SearchChannel[Inbound]):
    """The dispatcher's connection to one search's queues."""

    durable = True

    def _consumers(self) -> dict[str, Consumer]:
        return {
            self.names.progress: functools.partial(self._on_message, "progress"),
            self.names.results: functools.partial(self._on_message, "results"),
            self.names.dead_letters: self._on_dead,
        }

    def _rejecter(self, channel: Any, method: Any, properties: Any, body: bytes) -> Any:
        def reject(reason: str) -> None:
            self._reject(channel, method, properties, body, reason)

        return reject

    def _on_dead(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        reject = self._rejecter(channel, method, properties, body)
        try:
            if (forged := dead_lettered(properties.headers, self.names)) is not None:
                raise MessageError(forged)
            message = decode(body)
            if isinstance(refused := RECEIVER.route(message, "dead"), Refuse):
                raise MessageError(refused.reason)
            assert isinstance(message, TrialMessage)  # the only kind the table takes there
        except MessageError as error:
            why = f"in the dead-letter queue, not a trial: {error.reason}"
            self._received.append(Inbound(Malformed(why), reject=reject))
            return
        self._received.append(
            Inbound(
                DeadTrial(
                    message,
                    death_reason(properties.headers),
                    exhausted=exhausted(properties.headers),
                ),
                settle=lambda: channel.basic_ack(method.delivery_tag),
                reject=reject,
            )
        )

    def _on_message(
        self, queue: Queue, channel: Any, method: Any, properties: Any, body: bytes
    ) -> None:
        tag = method.delivery_tag
        reject = self._rejecter(channel, method, properties, body)
        try:
            message = decode(body)
            if isinstance(refused := RECEIVER.route(message, queue), Refuse):
                raise MessageError(refused.reason)
            assert isinstance(message, ProgressMessage | ResultMessage)  # what the table takes
            reply_to = properties.reply_to or ""
            if reply_to and not reply_to.startswith(SERVER_NAMED):
                # Only a trainer's own server-named queue: the reply must not be a way to
                # make the dispatcher publish into a queue of the sender's choosing.
                raise MessageError(f"reply_to {reply_to[:64]!r} is not a server-named queue")
        except MessageError as error:
            self._received.append(Inbound(Malformed(error.reason), reject=reject))
            return

        def settle() -> None:
            channel.basic_ack(tag)

        def reply(decision: Decision) -> None:
            if properties.reply_to:
                answer = ProgressReply(trial_id=message.trial_id, decision=decision)
                channel.basic_publish(
                    "",
                    properties.reply_to,
                    encode(answer),
                    pika.BasicProperties(correlation_id=properties.correlation_id),
                )

        self._received.append(Inbound(message, reply=reply, settle=settle, reject=reject))

    def _reconnect(self, error: pika.exceptions.AMQPError) -> None:
        """A pika error mid-use: a lost broker is dialled again, anything else raised."""
        if not transient(error):
            raise error
        log.warning("lost the broker (%r); reconnecting", error)
        self._connect()

    def send(self, trial: TrialMessage) -> None:
        for _ in range(5):
            try:
                self._publish(trial)
                return
            except pika.exceptions.AMQPError as error:
                log.warning("publishing trial %d failed (%r)", trial.number, error)
                self._reconnect(error)
        raise ConnectionError(f"could not publish trial {trial.number} to {self.names.trials}")

    def receive(self, timeout: float) -> list[Inbound]:
        try:
            self._process(timeout)
        except pika.exceptions.AMQPError as error:
            self._reconnect(error)
        received, self._received = self._received, []
        return received

    def _trials_queue(self) -> Any:
        """The trials queue's counts now (``message_count``, ``consumer_count``), or None
        when the broker went away (reconnected for the next call) or the transport is closed
        (never reopened: its consumers would hold results meant for whoever reads next)."""
        if self._closed:
            return None
        try:
            return self._channel.queue_declare(self.names.trials, passive=True).method
        except pika.exceptions.AMQPError as error:
            self._reconnect(error)
            return None

    def queued(self) -> int | None:
        """Trials waiting in the queue (not yet taken by a trainer); None if unknown now."""
        counts = self._trials_queue()
        return None if counts is None else int(counts.message_count)

    def consumers(self) -> int | None:
        """Trainers consuming the trials queue now; None if unknown now."""
        counts = self._trials_queue()
        return None if counts is None else int(counts.consumer_count)
