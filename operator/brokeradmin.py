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
"""

from __future__ import annotations

import base64
import urllib.parse
from dataclasses import dataclass, field

import aiohttp

__all__ = [
    "ALL",
    "BrokerAdmin",
    "admin_url_for",
    "in_vhost",
    "scoped_url",
    "search_user",
    "search_vhost",
    "vhost_of",
]

# Every right, on the search's own vhost only (a vhost is the unit of isolation).
ALL = {"configure": ".*", "write": ".*", "read": ".*"}


def search_user(uid: str) -> str:
    """The broker user of the search with ``uid``."""
    return f"mlopt-{uid}"


def search_vhost(uid: str) -> str:
    """The broker vhost of the search with ``uid``."""
    return f"mlopt-{uid}"


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

    async def _request(self, method: str, path: str, body: object = None) -> int:
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
            return response.status

    @property
    def user(self) -> str:
        """The management API's own user (the operator's broker login)."""
        return urllib.parse.unquote(urllib.parse.urlsplit(self.url).username or "guest")

    async def ensure_identity(self, vhost: str, user: str, password: str) -> None:
        """Create (or reset) ``vhost`` and ``user`` with every right on it and nothing else;
        the operator's own user gets the vhost too. Idempotent."""
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
        await self._request("PUT", f"/api/permissions/{quoted}/{name}", ALL)
        own = urllib.parse.quote(self.user, safe="")
        await self._request("PUT", f"/api/permissions/{quoted}/{own}", ALL)

    async def delete_identity(self, vhost: str, user: str) -> None:
        """Delete the user (its connections are closed) and the vhost with its queues."""
        try:
            await self.delete_user(user)
        finally:
            await self._request("DELETE", f"/api/vhosts/{urllib.parse.quote(vhost, safe='')}")

    async def delete_user(self, user: str) -> None:
        """Delete ``user`` (its connections are closed by the broker); gone is done."""
        await self._request("DELETE", f"/api/users/{urllib.parse.quote(user, safe='')}")
