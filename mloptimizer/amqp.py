"""RabbitMQ as a :class:`~mloptimizer.dispatch.Transport`: the dispatcher's side of the queues.

Trials are published persistent with publisher confirms, so :meth:`AmqpTransport.send`
returns only once the broker has them. Progress and results are consumed with manual
acks, settled only after the dispatcher handled them: a dispatcher that dies in between
gets them again and the study (which knows what it was told) drops the copies. Trials in
flight live in the broker, so the transport is durable: a restarted dispatcher adopts
them. A message that does not parse goes to the dead-letter queue with its reason.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import pika
import pika.exceptions

from mloptimizer.broker import PERSISTENT, dead_letter, declare_queues
from mloptimizer.dispatch import Inbound
from mloptimizer.messages import (
    Decision,
    MessageError,
    ProgressMessage,
    ProgressReply,
    QueueNames,
    ResultMessage,
    TrialMessage,
    decode,
    encode,
)

__all__ = ["AmqpTransport"]

log = logging.getLogger(__name__)


class AmqpTransport:
    """The dispatcher's connection to one search's queues."""

    durable = True

    def __init__(
        self, url: str, search: str, *, prefix: str = "mlopt", max_backoff: float = 30.0
    ) -> None:
        self.url = url
        self.names = QueueNames(search, prefix)
        self.max_backoff = max_backoff
        self._received: list[Inbound] = []
        self._connection: pika.BlockingConnection | None = None
        self._channel: Any = None
        self._connect()

    def _connect(self) -> None:
        backoff = 0.5
        while True:
            try:
                self._connection = pika.BlockingConnection(pika.URLParameters(self.url))
                break
            except pika.exceptions.AMQPConnectionError as error:
                if backoff > self.max_backoff:
                    raise
                log.warning("broker unreachable (%r); retrying in %.1fs", error, backoff)
                time.sleep(backoff)
                backoff *= 2
        channel = self._connection.channel()
        channel.confirm_delivery()
        declare_queues(channel, self.names)
        channel.basic_qos(prefetch_count=100)
        channel.basic_consume(self.names.progress, self._on_message)
        channel.basic_consume(self.names.results, self._on_message)
        self._channel = channel
        self._received = []  # unacked deliveries of the old channel come again

    def _on_message(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        tag = method.delivery_tag
        try:
            message = decode(body)
            if not isinstance(message, ProgressMessage | ResultMessage):
                raise MessageError(f"expected progress or result, got {message.kind!r}")
        except MessageError as error:
            log.error("dead-lettering a message from %s: %s", method.routing_key, error.reason)
            dead_letter(channel, self.names, body, properties.headers, error.reason)
            channel.basic_ack(tag)
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

        self._received.append(Inbound(message, reply=reply, settle=settle))

    def send(self, trial: TrialMessage) -> None:
        for _ in range(5):
            try:
                self._channel.basic_publish("", self.names.trials, encode(trial), PERSISTENT)
                return
            except pika.exceptions.AMQPError as error:
                log.warning("publishing trial %d failed (%r); reconnecting", trial.number, error)
                self._connect()
        raise ConnectionError(f"could not publish trial {trial.number} to {self.names.trials}")

    def receive(self, timeout: float) -> list[Inbound]:
        try:
            assert self._connection is not None
            self._connection.process_data_events(time_limit=timeout)
        except pika.exceptions.AMQPError as error:
            log.warning("lost the broker (%r); reconnecting", error)
            self._connect()
        received, self._received = self._received, []
        return received

    def queued(self) -> int:
        """Trials waiting in the queue (not yet taken by a trainer)."""
        declared = self._channel.queue_declare(self.names.trials, passive=True)
        return int(declared.method.message_count)

    def close(self) -> None:
        if self._connection is not None and self._connection.is_open:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._connection.close()
