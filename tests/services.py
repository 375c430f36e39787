"""Access to the machine's real PostgreSQL and RabbitMQ for tests.

Both fail with a message that says what is missing and how to start it: a test that
needs a service must not pass, nor skip quietly, when the service is down.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import psycopg2
from psycopg2 import sql

POSTGRES_ADMIN_DSN = os.environ.get(
    "MLOPT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
RABBITMQ_URL = os.environ.get("MLOPT_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/%2F")

POSTGRES_HINT = (
    "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start "
    "(or set MLOPT_TEST_POSTGRES to an admin DSN)"
)
RABBITMQ_HINT = "start it with: rabbitmq-server -detached (or set MLOPT_TEST_RABBITMQ)"


class ServiceUnavailable(RuntimeError):
    """A service the tests need is not reachable."""


def _with_database(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    return f"{base}/{database}"


@contextmanager
def fresh_postgres_database(admin_dsn: str = POSTGRES_ADMIN_DSN) -> Iterator[str]:
    """Create an empty database, yield its DSN, drop it afterwards."""
    try:
        admin = psycopg2.connect(admin_dsn, connect_timeout=3)
    except psycopg2.OperationalError as error:
        detail = " ".join(str(error).split())
        raise ServiceUnavailable(
            f"PostgreSQL is not reachable at {admin_dsn}: {detail}; {POSTGRES_HINT}"
        ) from error
    admin.autocommit = True
    name = f"mlopt_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.cursor() as cursor:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        admin.close()
        yield _with_database(admin_dsn, name)
    finally:
        # A new connection: the test may have restarted PostgreSQL (the fault drill).
        admin = psycopg2.connect(admin_dsn, connect_timeout=10)
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.close()


@dataclass
class Broker:
    """The test run's RabbitMQ: a URL and unique names, cleaned up at the end."""

    url: str
    prefix: str = field(default_factory=lambda: f"mlopt-test-{uuid.uuid4().hex[:8]}")
    _queues: list[str] = field(default_factory=list)

    def name(self, what: str) -> str:
        """A queue or exchange name unique to this test, deleted at teardown."""
        unique = f"{self.prefix}.{what}.{uuid.uuid4().hex[:6]}"
        self._queues.append(unique)
        return unique

    def connect(self) -> pika.BlockingConnection:
        return connect_rabbitmq(self.url)

    def cleanup(self) -> None:
        if not self._queues:
            return
        connection = self.connect()
        try:
            channel = connection.channel()
            for queue in self._queues:
                channel.queue_delete(queue=queue)
        finally:
            connection.close()


@dataclass
class SearchIdentity:
    """A search's own broker identity (its vhost and user, as the operator makes them)."""

    uid: str
    names: Any  # mloptimizer.messages.QueueNames
    password: str = "pw"

    @property
    def vhost(self) -> str:
        from mloptimizer.operator.brokeradmin import search_vhost

        return search_vhost(self.uid)

    @property
    def trainer_url(self) -> str:
        """The trainers' login: least rights on the search's vhost."""
        from mloptimizer.operator.brokeradmin import scoped_url, search_user

        return scoped_url(RABBITMQ_URL, search_user(self.uid), self.password, self.vhost)

    @property
    def operator_url(self) -> str:
        """The operator's login on the search's vhost."""
        from mloptimizer.operator.brokeradmin import in_vhost

        return in_vhost(RABBITMQ_URL, self.vhost)


@asynccontextmanager
async def search_identity(prefix: str) -> AsyncIterator[SearchIdentity]:
    """A search named ``ns.<prefix>-<hex>`` with its broker identity made and its queues
    declared by the operator's login; both deleted afterwards."""
    from mloptimizer.broker import declare_queues
    from mloptimizer.messages import QueueNames
    from mloptimizer.operator.brokeradmin import BrokerAdmin, admin_url_for, search_user

    admin = BrokerAdmin(admin_url_for(RABBITMQ_URL))
    made = SearchIdentity(str(uuid.uuid4()), QueueNames(f"ns.{prefix}-{uuid.uuid4().hex[:8]}"))
    await admin.ensure_identity(made.vhost, search_user(made.uid), made.password, made.names)
    try:
        connection = pika.BlockingConnection(pika.URLParameters(made.operator_url))
        declare_queues(connection.channel(), made.names)
        connection.close()
        yield made
    finally:
        await admin.delete_identity(made.vhost, search_user(made.uid))


def connect_rabbitmq(url: str = RABBITMQ_URL) -> pika.BlockingConnection:
    """A blocking connection, or ServiceUnavailable naming the URL and the fix."""
    parameters = pika.URLParameters(url)
    parameters.connection_attempts = 1
    parameters.socket_timeout = 3
    try:
        return pika.BlockingConnection(parameters)
    except pika.exceptions.AMQPError as error:
        raise ServiceUnavailable(
            f"RabbitMQ is not reachable at {url}: {error!r}; {RABBITMQ_HINT}"
        ) from error


class TrainerProcess:
    """A real `mloptimizer trainer` process with its log in a file."""

    def __init__(
        self,
        url: str,
        search: str,
        workdir: Path,
        name: str,
        *extra: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        exe = shutil.which("mloptimizer", path=str(Path(sys.executable).parent))
        assert exe
        self.log_path = workdir / f"{name}.log"
        env = {**os.environ, "KERAS_HOME": str(workdir / "keras"), **(env or {})}
        self.process = subprocess.Popen(
            [
                exe,
                "trainer",
                "--broker",
                url,
                "--search",
                search,
                "--worker-id",
                name,
                "--cache-dir",
                str(workdir / "cache"),
                "--intra-op-threads",
                "2",
                "--inter-op-threads",
                "1",
                *extra,
            ],
            stdout=self.log_path.open("w"),  # its log lines go to stdout
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.name = name

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class TcpForwarder:
    """A TCP port in front of a service that a test can open, close and reopen: the service
    "goes away" (connections are cut, new ones refused) and "comes back" on the same port.

    Use::

        forwarder = TcpForwarder(5672)       # a free port, closed for now
        url = f"amqp://guest:guest@127.0.0.1:{forwarder.port}/%2F"
        forwarder.open(); ...; forwarder.close(); ...; forwarder.open()
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        import socket

        self.target = (target_host, target_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listener: Any = None
        self._sockets: list[Any] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        import socket

        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def close(self) -> None:
        """Refuse new connections and cut the open ones."""
        import contextlib
        import socket

        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self, listener: Any) -> None:
        import socket

        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: Any, sink: Any) -> None:
        import contextlib

        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(2)


def close_connection(name: str, timeout: float = 60.0) -> None:
    """Have RabbitMQ close the connection named ``name`` (as a broker restart drops it),
    waiting until the client has opened it; one connection, not the whole broker's."""
    import json
    import time

    def listed(*columns: str, json_: bool = False) -> str:
        extra = ("--formatter", "json") if json_ else ("--no-table-headers",)
        return subprocess.run(
            ["rabbitmqctl", "list_connections", *columns, *extra, "-q"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip

    deadline = time.monotonic() + timeout
    while True:
        # JSON to find it by its client's name, the table for the pid close_connection takes
        peers = {
            row["name"]
            for row in json.loads(listed("name", "client_properties", json_=True) or "[]")
            if ["connection_name", "longstr", name] in row["client_properties"]
        }
        pids = [
            line.split("\t")[0]
            for line in listed("pid", "name").splitlines()
            if line.partition("\t")[2] in peers
        ]
        assert len(pids) <= 1, f"{len(pids)} connections named {name!r}: name it uniquely"
        if pids:
            break
        assert time.monotonic() < deadline, f"no connection named {name!r}"
        time.sleep(0.2)
    for pid in pids:
        subprocess.run(
            ["rabbitmqctl", "close_connection", pid, "closed by the test"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
