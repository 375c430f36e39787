"""Direct-mode broker users against the machine's RabbitMQ (management API on 15672): a
rented trainer's credentials reach its own search's queues and nothing else."""

from __future__ import annotations

import uuid

import pika
import pika.exceptions
import pytest
from services import RABBITMQ_URL

from mloptimizer.broker import declare_queues
from mloptimizer.messages import QueueNames
from mloptimizer.operator.brokeradmin import (
    BrokerAdmin,
    admin_url_for,
    scoped_permissions,
    scoped_url,
    search_user,
    vhost_of,
)

pytestmark = pytest.mark.services


def test_urls() -> None:
    assert admin_url_for("amqp://u:p@rabbit:5672/%2F") == "http://u:p@rabbit:15672"
    assert admin_url_for("amqps://rabbit/") == "https://guest:guest@rabbit:15672"
    assert vhost_of("amqps://b:5671/") == "/"
    assert vhost_of("amqps://b:5671/team%2Fa") == "team/a"
    assert (
        scoped_url("amqps://b.example.com:5671/", "mlopt-1", "p@ss/w")
        == "amqps://mlopt-1:p%40ss%2Fw@b.example.com:5671/"
    )


async def test_a_scoped_user_reaches_its_search_only() -> None:
    uid = str(uuid.uuid4())
    mine = QueueNames(f"default.pool-{uid[:8]}")
    theirs = QueueNames(f"default.other-{uid[:8]}")
    admin = BrokerAdmin(admin_url_for(RABBITMQ_URL))
    user, password = search_user(uid), uuid.uuid4().hex
    # the operator's queues exist before any trainer comes
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    declare_queues(connection.channel(), mine)
    declare_queues(connection.channel(), theirs)
    await admin.ensure_user(user, password, "/", scoped_permissions(mine))
    try:
        url = scoped_url("amqp://127.0.0.1:5672/", user, password)
        scoped = pika.BlockingConnection(pika.URLParameters(url))
        channel = scoped.channel()
        declare_queues(channel, mine)  # what `mloptimizer trainer` does first
        channel.queue_declare(queue="", exclusive=True, auto_delete=True)  # its reply queue
        channel.basic_publish("", mine.results, b"{}")
        channel.basic_get(mine.trials)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="ACCESS_REFUSED"):
            scoped.channel().basic_get(theirs.trials)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="ACCESS_REFUSED"):
            scoped.channel().queue_declare(theirs.results, durable=True)
        scoped.close()
    finally:
        await admin.delete_user(user)
        await admin.delete_user(user)  # gone is done
        admin_channel = connection.channel()
        for names in (mine, theirs):
            for queue in (names.trials, names.progress, names.results, names.dead_letters):
                admin_channel.queue_delete(queue)
        connection.close()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(pika.URLParameters(url))
