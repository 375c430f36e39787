"""The dispatcher's RabbitMQ transport against the machine's RabbitMQ."""

from __future__ import annotations

from services import RABBITMQ_URL, Broker

from mloptimizer.amqp import AmqpTransport
from mloptimizer.messages import QueueNames


def test_a_closed_transport_is_never_reopened_and_holds_no_result(broker: Broker) -> None:
    """Found running the operator's image: the status flush after a search ended asked the
    closed transport for its queue depth, which reconnected it, and its new consumer took
    the final job's answer and sat on it until the broker dropped the connection (3 min)."""
    search = f"test.{broker.prefix}"
    names = QueueNames(search)
    transport = AmqpTransport(RABBITMQ_URL, search)
    connection = broker.connect()
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        assert channel.queue_declare(names.results, passive=True).method.consumer_count == 1
        transport.close()
        assert transport.queued() is None
        assert transport.consumers() is None
        assert channel.queue_declare(names.results, passive=True).method.consumer_count == 0
        channel.basic_publish("", names.results, b"for the final job")
        _, _, body = channel.basic_get(names.results, auto_ack=True)
        assert body == b"for the final job"  # left for its reader
    finally:
        for queue in names.all:
            channel.queue_delete(queue)
        connection.close()
