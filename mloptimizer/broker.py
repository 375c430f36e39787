"""RabbitMQ access shared by the dispatcher and the trainers: one declaration of the queues.

Both sides declare the same queues with the same arguments (a mismatch is a channel
error), so the declaration lives here. The trials queue is a quorum queue: it counts
deliveries (``x-delivery-count``, which results carry as ``attempt``) and dead-letters a
trial that keeps killing its trainers after ``DELIVERY_LIMIT`` deliveries, so a poison
trial cannot crash-loop the workers; the dispatcher reads that dead-letter queue and fails
the trial with the reason. Progress and results the dispatcher refuses go to a separate
``rejected`` queue for a person to read, capped at ``REJECTED_KEPT`` messages (the oldest
dropped) so that a flood of bad messages cannot fill the broker. A search's queues are
dialled (:func:`dial`) and deleted (:func:`delete_queues`) here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pika

from mloptimizer.messages import DELIVERY_LIMIT, QueueNames

if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel

__all__ = [
    "DELIVERY_LIMIT",
    "PERSISTENT",
    "REASON_HEADER",
    "REJECTED_KEPT",
    "attempt_of",
    "dead_letter",
    "death_reason",
    "declare_queues",
    "delete_queues",
    "dial",
]

REASON_HEADER = "x-mlopt-reason"
REJECTED_KEPT = 1000


def dial(url: str, *, heartbeat: int | None = None) -> pika.BlockingConnection:
    """One connection to the broker at ``url`` (pika's errors when it does not answer)."""
    parameters = pika.URLParameters(url)
    if heartbeat is not None:
        parameters.heartbeat = heartbeat
    return pika.BlockingConnection(parameters)


def declare_queues(channel: BlockingChannel, names: QueueNames) -> None:
    """Declare the search's queues (idempotent)."""
    channel.queue_declare(queue=names.dead_letters, durable=True)
    channel.queue_declare(
        queue=names.rejected, durable=True, arguments={"x-max-length": REJECTED_KEPT}
    )
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


def delete_queues(url: str, names: QueueNames) -> None:
    """Delete every queue of a search (absent ones too: deleting is idempotent)."""
    connection = dial(url)
    try:
        channel = connection.channel()
        for queue in names.all:
            channel.queue_delete(queue)
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


def death_reason(headers: dict[str, Any] | None) -> str:
    """Why a message was dead-lettered: our reason header, or the broker's own."""
    headers = headers or {}
    if REASON_HEADER in headers:
        return str(headers[REASON_HEADER])[:1024]
    reason = headers.get("x-first-death-reason")
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    if reason == "delivery_limit":
        return (
            f"no trainer finished it in {DELIVERY_LIMIT + 1} deliveries (each one died or "
            "was killed while training it; too much memory?)"
        )
    return f"dead-lettered by the broker ({reason or 'no reason given'})"
