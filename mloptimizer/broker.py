"""RabbitMQ access shared by the dispatcher and the trainers: one declaration of the queues.

Both sides declare the same queues with the same arguments (a mismatch is a channel
error), so the declaration lives here. The trials queue is a quorum queue: it counts
deliveries (``x-delivery-count``, which results carry as ``attempt``) and dead-letters a
trial that keeps killing its trainers after ``DELIVERY_LIMIT`` deliveries, so a poison
trial cannot crash-loop the workers; the dispatcher reads that dead-letter queue and fails
the trial with the reason. Progress and results the dispatcher refuses go to a separate
``rejected`` queue for a person to read, capped at ``REJECTED_KEPT`` messages and
``REJECTED_BYTES`` bytes (the oldest dropped) so that a flood of bad messages cannot fill
the broker. A search's queues are dialled (:func:`dial`) and deleted
(:func:`delete_queues`) here too.

Only the operator's side declares: trainers hold a login that may consume the trials queue
and its own reply queue and publish to the search's inbox exchange, nothing else
(:mod:`mloptimizer.operator.brokeradmin`). So trainers reach the progress and results
queues through that exchange (:func:`to_dispatcher`), a trainer refuses a trial by
rejecting it (the broker dead-letters it), and a message in the dead-letter queue counts
only when the broker put it there from the trials queue (:func:`dead_lettered`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pika
import pika.exceptions

from mloptimizer.messages import DELIVERY_LIMIT, QueueNames

if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel

__all__ = [
    "DELIVERY_LIMIT",
    "PERSISTENT",
    "REASON_HEADER",
    "REJECTED_BYTES",
    "REJECTED_KEPT",
    "attempt_of",
    "dead_letter",
    "dead_lettered",
    "death_reason",
    "declare_queues",
    "delete_queues",
    "dial",
    "exhausted",
    "to_dispatcher",
]

log = logging.getLogger(__name__)

REASON_HEADER = "x-mlopt-reason"
REJECTED_KEPT = 1000
REJECTED_BYTES = 64 * 1024 * 1024  # a flood of large refused bodies is capped by size too


def dial(url: str, *, heartbeat: int | None = None, name: str = "") -> pika.BlockingConnection:
    """One connection to the broker at ``url`` (pika's errors when it does not answer).

    ``name`` is the connection's name in RabbitMQ's own lists (``rabbitmqctl
    list_connections client_properties``, the management UI): which trainer is which."""
    parameters = pika.URLParameters(url)
    if heartbeat is not None:
        parameters.heartbeat = heartbeat
    if name:
        parameters.client_properties = {"connection_name": name[:255]}
    return pika.BlockingConnection(parameters)


def declare_queues(channel: BlockingChannel, names: QueueNames) -> None:
    """Declare the search's queues and its inbox exchange (idempotent); the operator's side
    only (a trainer's login may not declare)."""
    channel.queue_declare(queue=names.dead_letters, durable=True)
    _declare_rejected(channel, names)
    channel.queue_declare(
        queue=names.trials,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": names.dead_letters,
        },
    )
    channel.queue_declare(queue=names.progress, durable=True)
    channel.queue_declare(queue=names.results, durable=True)
    channel.exchange_declare(names.inbox, exchange_type="direct", durable=True)
    for queue in (names.progress, names.results):
        channel.queue_bind(queue, names.inbox, routing_key=queue)


def _declare_rejected(channel: BlockingChannel, names: QueueNames) -> None:
    """The rejected queue, repaired when it was declared otherwise (a search begun under an
    older version, without the byte cap): it holds only what a person may read, so it is
    made again, on a channel of its own (the broker closes a channel on such a refusal)."""
    arguments = {"x-max-length": REJECTED_KEPT, "x-max-length-bytes": REJECTED_BYTES}
    probe = channel.connection.channel()
    try:
        probe.queue_declare(queue=names.rejected, durable=True, arguments=arguments)
    except pika.exceptions.ChannelClosedByBroker as error:
        if error.reply_code != 406:
            raise
        log.warning("%s was declared otherwise: made again (%s)", names.rejected, error)
        repair = channel.connection.channel()
        repair.queue_delete(names.rejected)
        repair.queue_declare(queue=names.rejected, durable=True, arguments=arguments)
        repair.close()
    else:
        probe.close()


def to_dispatcher(
    channel: BlockingChannel,
    names: QueueNames,
    queue: str,
    body: bytes,
    properties: pika.BasicProperties,
) -> None:
    """A trainer's publish of progress or a result: through the search's inbox exchange,
    the one place its login may write."""
    channel.basic_publish(names.inbox, queue, body, properties)


def delete_queues(url: str, names: QueueNames) -> None:
    """Delete every queue of a search (absent ones too: deleting is idempotent)."""
    connection = dial(url)
    try:
        channel = connection.channel()
        for queue in names.all:
            channel.queue_delete(queue)
        channel.exchange_delete(names.inbox)
    finally:
        if connection.is_open:
            connection.close()


PERSISTENT = pika.BasicProperties(
    delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json"
)


def dead_letter(
    channel: BlockingChannel,
    queue: str,
    body: bytes,
    headers: dict[str, Any] | None,
    reason: str,
) -> None:
    """Put a message nobody can handle on ``queue`` (dead letters or rejected), with the reason.

    Persistent, like the queue: a dead letter is kept for the dispatcher (a trial) or a
    person (anything else) to read, and survives a broker restart.
    """
    kept = {**(headers or {}), REASON_HEADER: reason[:1024]}
    channel.basic_publish(
        "",
        queue,
        body,
        pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, headers=kept),
    )


def attempt_of(headers: dict[str, Any] | None) -> int:
    """The delivery attempt (1 = first) from a quorum queue's ``x-delivery-count``."""
    count = (headers or {}).get("x-delivery-count", 0)
    return int(count) + 1


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")


def dead_lettered(headers: dict[str, Any] | None, names: QueueNames) -> str | None:
    """Why a message in the dead-letter queue does not count, or None when the broker itself
    dead-lettered it from the search's trials queue (its ``x-first-death-queue``).

    A publisher cannot be told apart by its headers alone, so this holds only because no
    login but the operator's may publish there; the check keeps a mistake (or the
    operator's own test tools) from failing a trial without the broker's say.
    """
    queue = _text((headers or {}).get("x-first-death-queue"))
    if queue != names.trials:
        shown = repr(queue[:64]) if queue else "no x-first-death-queue header"
        return f"not dead-lettered by the broker from {names.trials} ({shown})"
    return None


def exhausted(headers: dict[str, Any] | None) -> bool:
    """Whether the broker dead-lettered a message for its delivery limit."""
    return _text((headers or {}).get("x-first-death-reason")) == "delivery_limit"


def death_reason(headers: dict[str, Any] | None) -> str:
    """Why the broker dead-lettered a message (its ``x-first-death-reason``)."""
    reason = _text((headers or {}).get("x-first-death-reason"))
    if reason == "rejected":
        return "a trainer refused it (it could not read the message, or it was not for it)"
    if reason == "delivery_limit":
        return (
            f"no trainer finished it in {DELIVERY_LIMIT + 1} deliveries (each one died or "
            "was killed while training it; too much memory?)"
        )
    return f"dead-lettered by the broker ({reason or 'no reason given'})"
