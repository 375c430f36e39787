"""The service fixtures work against the real servers and fail clearly without them."""

from __future__ import annotations

import psycopg2
import pytest
from services import Broker, ServiceUnavailable, connect_rabbitmq, fresh_postgres_database


def test_postgres_database_is_fresh_and_writable(postgres_dsn: str) -> None:
    with psycopg2.connect(postgres_dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        assert cursor.fetchone() == (0,)
        cursor.execute("CREATE TABLE probe (x int)")
        cursor.execute("INSERT INTO probe VALUES (42)")
        cursor.execute("SELECT x FROM probe")
        assert cursor.fetchone() == (42,)


def test_rabbitmq_round_trip_with_unique_names(broker: Broker) -> None:
    queue = broker.name("probe")
    assert queue.startswith(broker.prefix)
    assert queue != broker.name("probe")
    connection = broker.connect()
    channel = connection.channel()
    channel.queue_declare(queue=queue, durable=True)
    channel.basic_publish(exchange="", routing_key=queue, body=b"hello")
    method, _, body = channel.basic_get(queue=queue, auto_ack=True)
    assert method is not None
    assert body == b"hello"
    connection.close()


def test_missing_postgres_fails_with_the_fix() -> None:
    with (
        pytest.raises(ServiceUnavailable, match=r"127\.0\.0\.1:1/.*pg_ctlcluster"),
        fresh_postgres_database("postgresql://postgres@127.0.0.1:1/postgres"),
    ):
        pass


def test_missing_rabbitmq_fails_with_the_fix() -> None:
    with pytest.raises(ServiceUnavailable, match=r"127\.0\.0\.1:1/.*rabbitmq-server -detached"):
        connect_rabbitmq("amqp://guest:guest@127.0.0.1:1/%2F")


def test_broker_cleanup_deletes_its_queues(broker: Broker) -> None:
    queue = broker.name("gone")
    connection = broker.connect()
    connection.channel().queue_declare(queue=queue)
    connection.close()
    broker.cleanup()
    connection = broker.connect()
    channel = connection.channel()
    with pytest.raises(Exception, match="NOT_FOUND"):
        channel.queue_declare(queue=queue, passive=True)
    connection.close()
