"""A broker identity per search: its own RabbitMQ vhost and a user that reaches only it.

Trainers run images a search's author chose, and in a GPU pool on machines whose owners
have root: whatever they hold may leak. So the operator's own broker login never leaves
its pod; every search gets a vhost of its own (``mlopt-<uid>``) and a user
(``mlopt-<uid>``) with rights on that vhost only, created through the RabbitMQ management
API when the search starts and deleted with it. Isolation is by construction: a vhost is a
separate namespace of queues and exchanges, so publishing through the default exchange,
``amq.topic`` or ``amq.direct``, naming a neighbour's queue (``a`` vs ``a.v2``) or declaring
queues can only ever touch this search's own traffic. The operator's user is given the
vhost too, to dispatch there. Deleting the vhost deletes the search's queues.

Each vhost is bounded (:data:`LIMITS`: connections and queues), so that one search's
trainers cannot exhaust the broker every search shares. No identity outlives its search:
the finalizer deletes it, and :func:`sweep_identities` deletes those of searches deleted
while no operator ran (or whose finalizer was removed by hand).
"""

from __future__ import annotations

import base64
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from mloptimizer.messages import QueueNames

__all__ = [
    "ALL",
    "LIMITS",
    "MOST_TRAINERS",
    "BrokerAdmin",
    "admin_url_for",
    "in_vhost",
    "scoped_url",
    "search_user",
    "search_vhost",
    "sweep_identities",
    "trainer_rights",
    "uid_of",
    "vhost_of",
]

log = logging.getLogger(__name__)

# Every right on a search's vhost: the operator's own login's (a vhost is the unit of
# isolation between searches; within one, trainers get :func:`trainer_rights`).
ALL = {"configure": ".*", "write": ".*", "read": ".*"}
SERVER_NAMED = r"amq\.gen-.*"  # the queues the broker names: a trainer's reply queue

# Per-vhost limits. Connections: every trainer of a search holds one (at most the CRD's
# 1000 workers.maxReplicas), twice over because a replaced trainer's connection lingers
# until the broker notices it gone, plus the operator's own (dispatcher, final job,
# deletion, a reconnect in flight). Queues: the search's five plus one reply queue per
# trainer connection. A search past them is refused more, its neighbours are not.
MOST_TRAINERS = 1000  # workers.maxReplicas' maximum in the CRD (tests hold it to the model)
OPERATOR_CONNECTIONS = 8
MAX_CONNECTIONS = 2 * MOST_TRAINERS + OPERATOR_CONNECTIONS
LIMITS = {"max-connections": MAX_CONNECTIONS, "max-queues": 5 + MAX_CONNECTIONS}

_PREFIX = "mlopt-"
_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def search_user(uid: str) -> str:
    """The broker user of the search with ``uid``."""
    return f"{_PREFIX}{uid}"


def search_vhost(uid: str) -> str:
    """The broker vhost of the search with ``uid``."""
    return f"mlopt-{uid}"


def trainer_rights(names: QueueNames) -> dict[str, str]:
    """What a search's trainers may do on its vhost, and nothing more (RabbitMQ's access
    control: each operation needs configure, write or read on the queue or exchange named).

    * configure: only the queues the broker names, so a trainer makes its own reply queue
      and can declare, bind, purge or delete none of the search's queues;
    * write: only the search's inbox exchange, which routes to the progress and results
      queues alone: the default exchange and ``amq.*`` (hence the dead-letter and rejected
      queues) are out of reach, and no queue can be bound (that needs write on the queue);
    * read: only the trials queue and its reply queue: results, progress, dead letters and
      refusals cannot be consumed. Reading the trials queue also lets a trainer purge it:
      RabbitMQ ties ``queue.purge`` to read, so it is no more than taking every trial.
    """
    return {
        "configure": f"^{SERVER_NAMED}$",
        "write": f"^{re.escape(names.inbox)}$",
        "read": f"^({re.escape(names.trials)}|{SERVER_NAMED})$",
    }


def uid_of(name: str) -> str | None:
    """The search uid in a vhost or user name ``mlopt-<uid>``, or None for any other name."""
    uid = name.removeprefix(_PREFIX)
    return uid if name.startswith(_PREFIX) and _UID.fullmatch(uid) else None


def in_vhost(url: str, vhost: str) -> str:
    """``url`` (credentials kept) pointing at ``vhost``."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(vhost, safe="")))


def scoped_url(endpoint: str, user: str, password: str, vhost: str) -> str:
    """``amqp(s)://user:password@host:port/vhost`` from a credential-free endpoint."""
    parts = urllib.parse.urlsplit(endpoint)
    host = parts.netloc.rpartition("@")[2]  # any credentials in the endpoint are dropped
    credentials = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    return in_vhost(urllib.parse.urlunsplit(parts._replace(netloc=f"{credentials}@{host}")), vhost)


def admin_url_for(broker_url: str) -> str:
    """The management API next to an AMQP URL: same host and credentials, port 15672."""
    parts = urllib.parse.urlsplit(broker_url)
    scheme = "https" if parts.scheme == "amqps" else "http"
    auth = f"{parts.username or 'guest'}:{parts.password or 'guest'}@"
    return f"{scheme}://{auth}{parts.hostname}:15672"


def vhost_of(broker_url: str) -> str:
    """The vhost of an AMQP URL (``/`` when it names none)."""
    path = urllib.parse.urlsplit(broker_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


@dataclass
class BrokerAdmin:
    """The RabbitMQ management API, from a URL ``http://user:pass@host:15672``."""

    url: str = field(repr=False)
    timeout: float = 10.0

    def _root_and_headers(self) -> tuple[str, dict[str, str]]:
        parts = urllib.parse.urlsplit(self.url)
        host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return f"{parts.scheme}://{host}", {"Authorization": f"Basic {token}"}

    async def _request(self, method: str, path: str, body: object = None) -> Any:
        """The answer's JSON (None when it has none); a DELETE of what is gone is done."""
        root, headers = self._root_and_headers()
        async with (
            aiohttp.ClientSession(
                headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout)
            ) as session,
            session.request(method, root + path, json=body) as response,
        ):
            if response.status >= 400 and not (method == "DELETE" and response.status == 404):
                text = (await response.text())[:300]
                raise RuntimeError(
                    f"RabbitMQ management {method} {path}: HTTP {response.status}: {text}"
                )
            if response.content_type != "application/json":
                return None
            return await response.json()

    @property
    def user(self) -> str:
        """The management API's own user (the operator's broker login)."""
        return urllib.parse.unquote(urllib.parse.urlsplit(self.url).username or "guest")

    async def ensure_identity(
        self, vhost: str, user: str, password: str, names: QueueNames | None = None
    ) -> None:
        """Create (or reset) ``vhost``, bounded (:data:`LIMITS`), and ``user`` with the
        trainers' rights on the search's queues ``names`` (:func:`trainer_rights`) and
        nothing else; the operator's own user gets every right on the vhost. Idempotent.

        Without ``names``, the user gets every right on the vhost, as before trainers
        published through the inbox exchange: the callers pass them.
        """
        quoted = urllib.parse.quote(vhost, safe="")
        name = urllib.parse.quote(user, safe="")
        await self._request("PUT", f"/api/vhosts/{quoted}", {})
        for attempt in range(3):
            try:
                await self._request("PUT", f"/api/users/{name}", {"password": password, "tags": ""})
                break
            except RuntimeError as error:
                # Another handler of the search made the user this instant (with the same
                # password, from its Secret): RabbitMQ refuses the racing PUT; again updates.
                if "user_already_exists" not in str(error) or attempt == 2:
                    raise
        for limit, value in LIMITS.items():
            await self._request("PUT", f"/api/vhost-limits/{quoted}/{limit}", {"value": value})
        rights = ALL if names is None else trainer_rights(names)
        await self._request("PUT", f"/api/permissions/{quoted}/{name}", rights)
        own = urllib.parse.quote(self.user, safe="")
        await self._request("PUT", f"/api/permissions/{quoted}/{own}", ALL)

    async def limits(self, vhost: str) -> dict[str, int]:
        """The limits set on ``vhost`` (``{}`` when none)."""
        found = await self._request(
            "GET", f"/api/vhost-limits/{urllib.parse.quote(vhost, safe='')}"
        )
        return dict(found[0]["value"]) if found else {}

    async def identities(self) -> set[str]:
        """The uids of the search identities (``mlopt-<uid>``) this operator answers for:
        the vhosts its own login was given, and the users whose vhost is gone.

        A vhost the operator's login holds no rights on was made by another operator (with
        its own login) sharing this broker: its searches are not in this one's cluster. A
        user alone reaches nothing, but its password would log in again were its vhost
        made again.
        """
        own = urllib.parse.quote(self.user, safe="")
        granted = await self._request("GET", f"/api/users/{own}/permissions")
        vhosts = await self._request("GET", "/api/vhosts?columns=name")
        users = await self._request("GET", "/api/users?columns=name")
        ours = {uid_of(p["vhost"]) for p in granted}
        present = {uid_of(v["name"]) for v in vhosts}
        alone = {uid_of(u["name"]) for u in users} - present
        return {uid for uid in ours | alone if uid is not None}

    async def delete_identity(self, vhost: str, user: str) -> None:
        """Delete the user (its connections are closed) and the vhost with its queues."""
        try:
            await self.delete_user(user)
        finally:
            await self._request("DELETE", f"/api/vhosts/{urllib.parse.quote(vhost, safe='')}")

    async def delete_user(self, user: str) -> None:
        """Delete ``user`` (its connections are closed by the broker); gone is done."""
        await self._request("DELETE", f"/api/users/{urllib.parse.quote(user, safe='')}")


async def sweep_identities(
    admin: BrokerAdmin, live_uids: Callable[[], Awaitable[set[str]]]
) -> list[str]:
    """Delete the broker identities (vhost and user) of searches that no longer exist;
    returns their uids.

    Identities are listed before the searches: one made by a search created meanwhile is
    then sure to find its search in the list.
    """
    found = await admin.identities()
    live = await live_uids()
    gone = sorted(found - live)
    for uid in gone:
        log.warning("deleting the broker identity of search %s, which no longer exists", uid)
        await admin.delete_identity(search_vhost(uid), search_user(uid))
    return gone
