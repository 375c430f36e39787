"""RabbitMQ access shared by the dispatcher and the trainers: one declaration of the queues.

Both sides declare the same queues with the same arguments (a mismatch is a channel
error), so the declaration lives here. The trials queue is a quorum queue: it counts
deliveries (``x-delivery-count``, which results carry as ``attempt``) and dead-letters a
trial that keeps killing its trainers after ``DELIVERY_LIMIT`` deliveries, so a poison
trial cannot crash-loop the workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pika

from mloptimizer.messages import QueueNames

if TYPE_CHECKING:
    from pika.adapters.blocking_connection import BlockingChannel

__all__ = [
    "DELIVERY_LIMIT",
    "PERSISTENT",
    "REASON_HEADER",
    "attempt_of",
    "dead_letter",
    "declare_queues",
]

DELIVERY_LIMIT = 5
REASON_HEADER = "x-mlopt-reason"


def declare_queues(channel: BlockingChannel, names: QueueNames) -> None:
    """Declare the search's queues (idempotent)."""
    channel.queue_declare(queue=names.dead_letters, durable=True)
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


PERSISTENT = pika.BasicProperties(
    delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json"
)


def dead_letter(
    channel: BlockingChannel,
    names: QueueNames,
    body: bytes,
    headers: dict[str, Any] | None,
    reason: str,
) -> None:
    """Put a message nobody can handle on the search's dead-letter queue, with the reason.

    Persistent, like the queue: a dead letter is kept for a person (or the dispatcher) to
    read, and survives a broker restart.
    """
    kept = {**(headers or {}), REASON_HEADER: reason[:1024]}
    channel.basic_publish(
        "",
        names.dead_letters,
        body,
        pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, headers=kept),
    )


def attempt_of(headers: dict[str, Any] | None) -> int:
    """The delivery attempt (1 = first) from a quorum queue's ``x-delivery-count``."""
    count = (headers or {}).get("x-delivery-count", 0)
    return int(count) + 1
