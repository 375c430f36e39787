"""Per-search broker identities against the machine's RabbitMQ (management API on 15672):
a search's user reaches its own search's traffic and nothing else, whatever it tries."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pika
import pika.exceptions
import pytest
from services import RABBITMQ_URL

from mloptimizer.broker import PERSISTENT, declare_queues
from mloptimizer.messages import QueueNames
from mloptimizer.operator.brokeradmin import (
    LIMITS,
    MOST_TRAINERS,
    BrokerAdmin,
    admin_url_for,
    in_vhost,
    scoped_url,
    search_user,
    search_vhost,
    sweep_identities,
    uid_of,
    vhost_of,
)
from mloptimizer.spec.workers import Workers

pytestmark = pytest.mark.services


def test_urls() -> None:
    assert admin_url_for("amqp://u:p@rabbit:5672/%2F") == "http://u:p@rabbit:15672"
    assert admin_url_for("amqps://rabbit/") == "https://guest:guest@rabbit:15672"
    assert vhost_of("amqps://b:5671/") == "/"
    assert vhost_of("amqps://b:5671/team%2Fa") == "team/a"
    assert (
        scoped_url("amqps://b.example.com:5671/", "mlopt-1", "p@ss/w", "mlopt-1")
        == "amqps://mlopt-1:p%40ss%2Fw@b.example.com:5671/mlopt-1"
    )
    # the operator's own credentials in the URL it starts from are replaced, never kept
    assert (
        scoped_url("amqp://admin:secret@rabbit:5672/%2F", "mlopt-2", "pw", "mlopt-2")
        == "amqp://mlopt-2:pw@rabbit:5672/mlopt-2"
    )
    assert in_vhost("amqp://admin:secret@rabbit:5672/%2F", "mlopt-3") == (
        "amqp://admin:secret@rabbit:5672/mlopt-3"
    )
    uid = str(uuid.uuid4())
    assert uid_of(search_vhost(uid)) == uid == uid_of(search_user(uid))
    for other in ("/", "guest", "mlopt-", "mlopt-x", f"mlopt-{uid}-v2", f"team-{uid}"):
        assert uid_of(other) is None  # never someone else's vhost or user


@dataclass
class Search:
    uid: str
    names: QueueNames
    password: str

    @property
    def url(self) -> str:
        return scoped_url(RABBITMQ_URL, search_user(self.uid), self.password, self.vhost)

    @property
    def vhost(self) -> str:
        return search_vhost(self.uid)

    @property
    def operator_url(self) -> str:
        return in_vhost(RABBITMQ_URL, self.vhost)


@pytest.fixture
async def two_searches() -> AsyncIterator[tuple[Search, Search]]:
    """Search ``a`` and its dotted neighbour ``a.v2``, each with an identity holding every
    right on its vhost (no queue names given): the vhost alone keeps searches apart. What a
    trainer may do within its own search is ``test_broker_rights.py``'s."""
    admin = BrokerAdmin(admin_url_for(RABBITMQ_URL))
    tag = uuid.uuid4().hex[:8]
    made = [
        Search(str(uuid.uuid4()), QueueNames(f"ns.{tag}"), uuid.uuid4().hex),
        Search(str(uuid.uuid4()), QueueNames(f"ns.{tag}.v2"), uuid.uuid4().hex),
    ]
    for search in made:
        await admin.ensure_identity(search.vhost, search_user(search.uid), search.password)
        # the dispatcher declares the queues with the operator's login, in the search's vhost
        connection = pika.BlockingConnection(pika.URLParameters(search.operator_url))
        declare_queues(connection.channel(), search.names)
        connection.close()
    yield made[0], made[1]
    for search in made:
        await admin.delete_identity(search.vhost, search_user(search.uid))


def depth(search: Search, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(search.operator_url))
    count = int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    connection.close()
    return count


async def test_a_search_identity_works_within_its_own_search(
    two_searches: tuple[Search, Search],
) -> None:
    mine, _ = two_searches
    connection = pika.BlockingConnection(pika.URLParameters(mine.url))
    channel = connection.channel()
    declare_queues(channel, mine.names)  # every right: even declaring
    reply = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
    assert reply.startswith("amq.gen-")
    channel.basic_publish("", mine.names.results, b"{}", PERSISTENT)
    channel.basic_get(mine.names.trials)
    connection.close()
    assert depth(mine, mine.names.results) == 1


async def test_a_search_identity_cannot_reach_another_search(
    two_searches: tuple[Search, Search],
) -> None:
    mine, theirs = two_searches
    # Not even a connection to the other search's vhost.
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(scoped_url(
            RABBITMQ_URL, search_user(mine.uid), mine.password, theirs.vhost
        )))  # fmt: skip
    # Nor the default vhost, where the operator's own traffic could be.
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(scoped_url(
            RABBITMQ_URL, search_user(mine.uid), mine.password, "/"
        )))  # fmt: skip
    connection = pika.BlockingConnection(pika.URLParameters(mine.url))
    channel = connection.channel()
    # Naming the neighbour's queues through the default exchange, amq.direct and amq.topic
    # routes within its own vhost only: nothing reaches the neighbour.
    for exchange in ("", "amq.direct", "amq.topic"):
        channel.basic_publish(exchange, theirs.names.results, b'{"forged": true}')
    # Declaring the neighbour's queue names makes queues in its own vhost, not theirs.
    channel.queue_declare(theirs.names.results, durable=True)
    channel.basic_publish("", theirs.names.results, b'{"forged": true}')
    connection.close()
    assert depth(theirs, theirs.names.results) == 0
    assert depth(theirs, theirs.names.trials) == 0


async def test_a_deleted_search_identity_cannot_log_in_and_its_queues_are_gone() -> None:
    admin = BrokerAdmin(admin_url_for(RABBITMQ_URL))
    search = Search(str(uuid.uuid4()), QueueNames("ns.gone"), uuid.uuid4().hex)
    await admin.ensure_identity(search.vhost, search_user(search.uid), search.password)
    await admin.ensure_identity(search.vhost, search_user(search.uid), search.password)
    pika.BlockingConnection(pika.URLParameters(search.url)).close()
    await admin.delete_identity(search.vhost, search_user(search.uid))
    await admin.delete_identity(search.vhost, search_user(search.uid))  # gone is done
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(search.url))
    with pytest.raises(pika.exceptions.AMQPConnectionError):  # the vhost went too
        pika.BlockingConnection(pika.URLParameters(search.operator_url))


async def test_handlers_making_the_same_identity_at_once_all_succeed() -> None:
    """The create handler, the search daemon and the pool daemon make a search's identity
    at the same moment: RabbitMQ refused all but one first PUT of the user
    (``user_already_exists``) and the refused daemon waited kopf's 60 s to try again."""
    uid = str(uuid.uuid4())
    admin = BrokerAdmin(admin_url_for(RABBITMQ_URL))
    vhost, user = search_vhost(uid), search_user(uid)
    try:
        for _ in range(5):
            await asyncio.gather(
                *(admin.ensure_identity(vhost, user, "same-password") for _ in range(8))
            )
            await admin.delete_user(user)
    finally:
        await admin.delete_identity(vhost, user)


async def test_a_search_vhost_is_bounded_past_the_most_trainers_the_crd_allows() -> None:
    """One search's trainers cannot take every connection and queue of the shared broker,
    and the bounds leave room for the most trainers a search may have."""
    (most,) = (b.le for b in Workers.model_fields["max_replicas"].metadata if hasattr(b, "le"))
    assert most == MOST_TRAINERS
    assert LIMITS["max-connections"] > 2 * most
    assert LIMITS["max-queues"] == 5 + LIMITS["max-connections"]
    admin = BrokerAdmin(admin_url_for(RABBITMQ_URL))
    uid = str(uuid.uuid4())
    await admin.ensure_identity(search_vhost(uid), search_user(uid), "pw")
    try:
        assert await admin.limits(search_vhost(uid)) == LIMITS
    finally:
        await admin.delete_identity(search_vhost(uid), search_user(uid))


def management(method: str, path: str, body: object = None) -> None:
    """One call to the management API as the operator's login (guest)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:15672{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={
            "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
            "Content-Type": "application/json",
        },
    )
    urllib.request.urlopen(request, timeout=10).close()


def exists(kind: str, name: str) -> bool:
    try:
        management("GET", f"/api/{kind}/{urllib.parse.quote(name, safe='')}")
    except urllib.error.HTTPError as error:
        if error.code != 404:
            raise
        return False
    return True


async def test_the_sweep_deletes_the_identities_of_searches_gone_and_only_those() -> None:
    """A search deleted while no operator ran (or whose finalizer was removed by hand) left
    its vhost and user, whose password still logged in: the sweep deletes them. It leaves
    live searches' identities, and those of another operator sharing the broker (its vhost
    was never given to this operator's login)."""
    admin = BrokerAdmin(admin_url_for(RABBITMQ_URL))
    live, gone, user_alone, foreign = (str(uuid.uuid4()) for _ in range(4))
    for uid in (live, gone, user_alone, foreign):
        await admin.ensure_identity(search_vhost(uid), search_user(uid), "pw")
    management("DELETE", f"/api/vhosts/{search_vhost(user_alone)}")  # its user was left
    management("DELETE", f"/api/permissions/{search_vhost(foreign)}/guest")
    try:

        async def searches() -> set[str]:  # every identity there is, but the two gone
            return (await admin.identities()) - {gone, user_alone}

        swept = await sweep_identities(admin, searches)
        assert {gone, user_alone} <= set(swept)
        assert not {live, foreign} & set(swept)
        for uid in (gone, user_alone):
            assert not exists("users", search_user(uid))
            assert not exists("vhosts", search_vhost(uid))
        for uid in (live, foreign):
            assert exists("users", search_user(uid))
            assert exists("vhosts", search_vhost(uid))
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(pika.URLParameters(scoped_url(
                RABBITMQ_URL, search_user(gone), "pw", search_vhost(gone)
            )))  # fmt: skip
    finally:
        for uid in (live, gone, user_alone, foreign):
            await admin.delete_identity(search_vhost(uid), search_user(uid))
