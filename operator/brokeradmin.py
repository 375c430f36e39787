"""Broker credentials scoped to one search, for trainers on rented hosts (Direct mode).

A rented machine is somebody else's computer: what it holds may leak. So it gets a
RabbitMQ user of its own whose permissions cover only its search's queues (and the
server-named reply queue each trainer declares), created through the RabbitMQ management
API and deleted with the search. It never sees the database, the cluster or other searches.
"""

from __future__ import annotations

import base64
import re
import urllib.parse
from dataclasses import dataclass, field

import aiohttp

from mloptimizer.messages import QueueNames

__all__ = [
    "BrokerAdmin",
    "admin_url_for",
    "scoped_permissions",
    "scoped_url",
    "search_user",
    "vhost_of",
]


def search_user(uid: str) -> str:
    """The broker user of the search with ``uid``."""
    return f"mlopt-{uid}"


def scoped_permissions(names: QueueNames) -> dict[str, str]:
    """configure/write/read regexes: the search's queues, the trainers' own reply queue
    (server-named ``amq.gen-*``, exclusive to its connection) and publishing through the
    default exchange."""
    own = re.escape(names.base) + r"\..*"
    return {
        "configure": f"^({own}|amq\\.gen-.*)$",
        "write": f"^({own}|amq\\.default)$",
        "read": f"^({own}|amq\\.gen-.*)$",
    }


def scoped_url(endpoint: str, user: str, password: str) -> str:
    """``amqps://user:password@host:port/vhost`` from a credential-free endpoint."""
    parts = urllib.parse.urlsplit(endpoint)
    credentials = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{credentials}@{parts.netloc}"))


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

    async def ensure_user(
        self, user: str, password: str, vhost: str, permissions: dict[str, str]
    ) -> None:
        """Create (or reset) ``user`` with ``permissions`` on ``vhost`` only."""
        name = urllib.parse.quote(user, safe="")
        await self._request("PUT", f"/api/users/{name}", {"password": password, "tags": ""})
        await self._request(
            "PUT", f"/api/permissions/{urllib.parse.quote(vhost, safe='')}/{name}", permissions
        )

    async def delete_user(self, user: str) -> None:
        """Delete ``user`` (its connections are closed by the broker); gone is done."""
        await self._request("DELETE", f"/api/users/{urllib.parse.quote(user, safe='')}")
