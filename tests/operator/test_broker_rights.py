"""A search's own trainer identity, held by an attacker (a rented GPU's owner has root):
against the machine's RabbitMQ, everything it tries on the search's queues beyond taking
trials and reporting through the inbox exchange is refused, and the queues stay as they were.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pika
import pika.exceptions
import pytest
from services import SearchIdentity as Search
from services import search_identity

from mloptimizer.broker import PERSISTENT

pytestmark = pytest.mark.services

ACCESS_REFUSED = 403
BUILT_IN = ("", "amq.direct", "amq.topic", "amq.fanout", "amq.headers")


@pytest.fixture
async def search() -> AsyncIterator[Search]:
    """A search's identity with its queues declared by the operator's login, and one trial
    waiting."""
    async with search_identity("rights") as made:
        connection = pika.BlockingConnection(pika.URLParameters(made.operator_url))
        connection.channel().basic_publish("", made.names.trials, b'{"a": "trial"}', PERSISTENT)
        connection.close()
        yield made


@pytest.fixture
def trainer(search: Search) -> Iterator[pika.BlockingConnection]:
    """The attacker's connection: the search's own trainer identity."""
    connection = pika.BlockingConnection(pika.URLParameters(search.trainer_url))
    yield connection
    if connection.is_open:
        connection.close()


def queues(search: Search) -> dict[str, tuple[int, bool, bool, dict[str, Any]]]:
    """Each queue of the search: depth, durable, auto-delete and arguments, as the
    management API shows them."""
    vhost = urllib.parse.quote(search.vhost, safe="")
    request = urllib.request.Request(
        f"http://127.0.0.1:15672/api/queues/{vhost}?columns=name,durable,auto_delete,arguments",
        headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        found = json.load(response)
    shown = {q["name"]: q for q in found if q["name"] in search.names.all}
    connection = pika.BlockingConnection(pika.URLParameters(search.operator_url))
    channel = connection.channel()
    depths = {q: channel.queue_declare(q, passive=True).method.message_count for q in shown}
    connection.close()
    return {
        q: (depths[q], shown[q]["durable"], shown[q]["auto_delete"], shown[q]["arguments"])
        for q in shown
    }


def refused(connection: pika.BlockingConnection, call: str, *args: Any, **kwargs: Any) -> str:
    """Call the channel method ``call`` on a fresh channel (publisher confirms on, so that
    a refused publish is known at once); return the broker's reason, which must be
    ACCESS_REFUSED."""
    channel = connection.channel()
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as closed:
        getattr(channel, call)(*args, **kwargs)
    assert closed.value.reply_code == ACCESS_REFUSED, closed.value
    return str(closed.value.reply_text)


async def test_a_trainer_cannot_reshape_read_or_inject_into_the_searchs_queues(
    search: Search, trainer: pika.BlockingConnection
) -> None:
    names = search.names
    before = queues(search)
    assert set(before) == set(names.all)
    theirs = [q for q in names.all if q != names.trials]  # the operator's side of the search
    for queue in names.all:
        refused(trainer, "queue_delete", queue)
        for durable in (True, False):  # re-declared non-durable, the dispatcher got 406s
            refused(trainer, "queue_declare", queue, durable=durable)
        refused(trainer, "queue_bind", queue, names.inbox, routing_key="x")
    for queue in theirs:
        refused(trainer, "queue_purge", queue)
        refused(trainer, "basic_get", queue)
        refused(trainer, "basic_consume", queue, lambda *_: None)
    for queue in (names.dead_letters, names.rejected):
        for exchange in BUILT_IN:
            reason = refused(trainer, "basic_publish", exchange, queue, b"{}", PERSISTENT)
            assert f"access to exchange '{exchange or 'amq.default'}'" in reason
    # The inbox exchange routes to progress and results only: naming another queue there
    # reaches nothing (unroutable), and no binding can be added to it.
    channel = trainer.channel()
    channel.confirm_delivery()
    for queue in (names.dead_letters, names.rejected, names.trials):
        with pytest.raises(pika.exceptions.UnroutableError):
            channel.basic_publish(names.inbox, queue, b"{}", PERSISTENT, mandatory=True)
    reply = channel.queue_declare("", exclusive=True).method.queue
    refused(trainer, "queue_bind", reply, names.inbox, routing_key=names.dead_letters)
    refused(trainer, "exchange_bind", names.inbox, "amq.direct", routing_key="x")
    refused(trainer, "exchange_delete", names.inbox)
    refused(trainer, "exchange_declare", names.inbox, "fanout", durable=True)
    refused(trainer, "exchange_declare", "attacker", "fanout")
    # A named queue (to fill the broker, or to bind) cannot be made: only server-named ones.
    refused(trainer, "queue_declare", f"{names.base}.mine", durable=True)
    refused(trainer, "queue_declare", "amq.gen-mine", exclusive=True)
    assert trainer.is_open  # refusals close channels, not the connection
    assert queues(search) == before


async def test_a_trainer_takes_trials_and_reports_through_the_inbox_as_before(
    search: Search, trainer: pika.BlockingConnection
) -> None:
    names = search.names
    channel = trainer.channel()
    channel.confirm_delivery()
    reply = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    assert reply.startswith("amq.gen-")
    method, _, body = channel.basic_get(names.trials)
    assert body == b'{"a": "trial"}'
    for queue in (names.progress, names.results):
        channel.basic_publish(names.inbox, queue, b"{}", PERSISTENT, mandatory=True)
    # A trial refused goes to the dead-letter queue by the broker's own hand.
    channel.basic_nack(method.delivery_tag, requeue=False)
    assert channel.basic_get(reply) == (None, None, None)  # its own reply queue it reads
    depth = {q: v[0] for q, v in queues(search).items()}
    assert depth == {
        names.trials: 0,
        names.progress: 1,
        names.results: 1,
        names.dead_letters: 1,
        names.rejected: 0,
    }
    connection = pika.BlockingConnection(pika.URLParameters(search.operator_url))
    _, properties, _ = connection.channel().basic_get(names.dead_letters, auto_ack=True)
    connection.close()
    assert properties.headers["x-first-death-queue"] == names.trials
    assert properties.headers["x-first-death-reason"] == "rejected"


async def test_a_trainer_can_purge_the_trials_queue_as_it_can_take_every_trial(
    search: Search, trainer: pika.BlockingConnection
) -> None:
    """RabbitMQ ties ``queue.purge`` to the read right that taking trials needs: no broker
    right tells them apart. A purge costs the search no more than a trainer taking every
    trial and never reporting (the dispatcher's first-progress deadline retries each, then
    fails it: mloptimizer/dispatch/deadlines.py); it reaches no other queue."""
    assert trainer.channel().queue_purge(search.names.trials).method.message_count == 1
