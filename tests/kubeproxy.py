"""A real Kubernetes API server for the tests, and one endpoint in front of it and the emulator.

:func:`real_apiserver` starts ``scripts/kube-apiserver run`` (etcd and
``k8s.io/apiextensions-apiserver`` built from Debian's packages: the CRD half of
kube-apiserver, Kubernetes 0.36) and yields a :class:`RealApiServer`. That server has no
core or apps APIs and no discovery at ``/api`` and ``/apis``; :class:`RoutingProxy` gives
kopf, kubectl, helm and the ``kubernetes`` client one plain-HTTP endpoint:

* ``/apis/mloptimizer.io/...``, ``/apis/apiextensions.k8s.io/...`` and ``/openapi/...`` go
  to the real server (with the client certificate of ``system:masters``);
* everything else (Secrets, Deployments, Events, Nodes, Pods, namespaces, ...) goes to the
  emulator of ``k8s.py``;
* ``/apis`` answers both halves' API groups in one ``APIGroupList``.

It also listens over HTTPS (``tls_url``, with the real server's own certificate for 127.0.0.1
and CA ``ca_path``): what a pod's in-cluster configuration expects to find at
``KUBERNETES_SERVICE_HOST``. Bodies stream both ways unchanged, so watches work through it.
Every status patch of a custom resource is also checked against the object the server
answers with: a real server silently prunes status fields its schema does not declare, and
``pruned`` lists each field that was written but not kept (``spec.x`` paths), so that a test
can prove the operator loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "kube-apiserver"

# API groups the real server serves; the rest is the emulator's.
REAL_GROUPS = ("mloptimizer.io", "apiextensions.k8s.io")
REAL_PREFIXES = (*(f"/apis/{group}" for group in REAL_GROUPS), "/openapi")

_REQUEST_HEADERS = {"accept", "content-type", "user-agent"}
_RESPONSE_HEADERS = {"content-type", "warning", "audit-id", "cache-control"}


class RealServerUnavailable(RuntimeError):
    """The real API server could not be built or started here; the reason is the message."""


@dataclasses.dataclass(frozen=True)
class RealApiServer:
    """A running apiextensions-apiserver: its URL, admin kubeconfig and TLS client context."""

    url: str
    folder: Path

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "kubeconfig"

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.folder / "ca.crt"))
        context.load_cert_chain(self.folder / "client.crt", self.folder / "client.key")
        return context


def _last_lines(path: Path, count: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-count:])
    except OSError:
        return ""


@contextlib.contextmanager
def real_apiserver(folder: Path, start_timeout: float = 900.0) -> Iterator[RealApiServer]:
    """Build (once, cached) and run etcd + the real server on loopback while in the block.

    Raises :class:`RealServerUnavailable` with the script's own account of the step that
    failed (a download, the build, the start).
    """
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "script.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [str(SCRIPT), "run", str(folder / "server")],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # the script and its children stop together
        )
    try:
        assert process.stdout is not None
        # The script prints the URL on stdout once /readyz answers, or exits.
        try:
            line = _readline(process, start_timeout)
        except TimeoutError:
            raise RealServerUnavailable(
                f"scripts/kube-apiserver did not become ready within {start_timeout:.0f}s:\n"
                + _last_lines(log)
            ) from None
        if not line.startswith("https://"):
            raise RealServerUnavailable(
                f"scripts/kube-apiserver exited {process.wait()}:\n{_last_lines(log)}"
            )
        yield RealApiServer(line.strip(), folder / "server")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _readline(process: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of ``process`` ("" at its end), or TimeoutError."""
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.append(process.stdout.readline() if process.stdout else ""),
        daemon=True,
    )
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        raise TimeoutError
    return lines[0]


class RoutingProxy:
    """One plain-HTTP API endpoint: the real server's groups there, the rest to the emulator.

    Use::

        async with RoutingProxy(real, emulator.url) as proxy:
            proxy.url  # for kopf, kubectl, helm, the kubernetes client
    """

    def __init__(self, real: RealApiServer, emulator_url: str) -> None:
        self.real = real
        self.emulator_url = str(emulator_url).rstrip("/")
        self.url = ""
        self.tls_url = ""  # the same endpoint over HTTPS, for pods' in-cluster configuration
        self.ca_path = real.folder / "ca.crt"  # the CA of tls_url's certificate
        self._ssl = real.ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self._runner: aiohttp.web.AppRunner | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self.status_writes = 0  # status patches of custom resources checked
        self.pruned: list[str] = []  # "PLURAL/NAME: status.field" written but not kept

    async def __aenter__(self) -> RoutingProxy:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), auto_decompress=False
        )
        app = aiohttp.web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = aiohttp.web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        serving.load_cert_chain(self.real.folder / "server.crt", self.real.folder / "server.key")
        secure = aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=serving)
        await secure.start()
        self.tls_url = f"https://127.0.0.1:{self._runner.addresses[1][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._streams):  # open watches end with the proxy
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _upstream(self, path: str) -> tuple[str, ssl.SSLContext | None]:
        if path.startswith(REAL_PREFIXES):
            return self.real.url, self._ssl
        return self.emulator_url, None

    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        if request.path.rstrip("/") == "/apis" and request.method == "GET":
            return await self._groups()
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            return await self._forward(request)
        finally:
            self._streams.discard(task)

    async def _forward(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        assert self._session is not None
        base, context = self._upstream(request.path)
        headers = {k: v for k, v in request.headers.items() if k.lower() in _REQUEST_HEADERS}
        headers["Accept-Encoding"] = "identity"  # bodies pass through as they are
        body = await request.read()
        if _is_status_write(request):
            return await self._checked_status_write(request, base, context, headers, body)
        async with self._session.request(
            request.method,
            base + request.rel_url.path_qs,
            headers=headers,
            data=body or None,
            ssl=context if context is not None else True,
        ) as upstream:
            response = aiohttp.web.StreamResponse(
                status=upstream.status,
                headers={
                    k: v for k, v in upstream.headers.items() if k.lower() in _RESPONSE_HEADERS
                },
            )
            await response.prepare(request)
            with contextlib.suppress(ConnectionError):  # the client went away
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            return response

    async def _checked_status_write(
        self,
        request: aiohttp.web.Request,
        base: str,
        context: ssl.SSLContext | None,
        headers: dict[str, str],
        body: bytes,
    ) -> aiohttp.web.Response:
        """Forward a status merge patch; note every written field the stored object lacks."""
        assert self._session is not None
        async with self._session.request(
            request.method, base + request.rel_url.path_qs, headers=headers, data=body,
            ssl=context if context is not None else True,
        ) as upstream:  # fmt: skip
            answer = await upstream.read()
            status, kept = upstream.status, dict(upstream.headers)
        if status == 200:
            self.status_writes += 1
            written = json.loads(body).get("status")
            stored = json.loads(answer).get("status")
            where = "/".join(request.path.split("/")[-3:-1])
            self.pruned += [f"{where}: {p}" for p in unkept(written, stored, "status")]
        return aiohttp.web.Response(
            status=status,
            body=answer,
            headers={k: v for k, v in kept.items() if k.lower() in _RESPONSE_HEADERS},
        )

    async def _json(self, url: str, context: ssl.SSLContext | None) -> Any:
        assert self._session is not None
        async with self._session.get(url, ssl=context if context is not None else True) as found:
            found.raise_for_status()
            return json.loads(await found.read())

    async def _groups(self) -> aiohttp.web.Response:
        """Both halves' API groups: the real server's from its CRDs, the emulator's minus those."""
        crds = await self._json(
            f"{self.real.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions", self._ssl
        )
        groups: dict[str, list[str]] = {"apiextensions.k8s.io": ["v1"]}
        for crd in crds.get("items", []):
            spec = crd["spec"]
            served = [v["name"] for v in spec["versions"] if v.get("served", True)]
            groups.setdefault(spec["group"], []).extend(served)
        listed = [
            {
                "name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                "preferredVersion": {
                    "groupVersion": f"{group}/{versions[0]}",
                    "version": versions[0],
                },
            }
            for group, versions in groups.items()
        ]
        emulated = await self._json(f"{self.emulator_url}/apis", None)
        listed += [g for g in emulated.get("groups", []) if g["name"] not in groups]
        body = {"kind": "APIGroupList", "apiVersion": "v1", "groups": listed}
        return aiohttp.web.json_response(body)


def _is_status_write(request: aiohttp.web.Request) -> bool:
    merge = request.headers.get("Content-Type", "").startswith("application/merge-patch+json")
    custom = request.path.startswith("/apis/mloptimizer.io/")
    return request.method == "PATCH" and merge and custom and request.path.endswith("/status")


_ABSENT = object()


def unkept(written: Any, stored: Any, path: str) -> list[str]:
    """Paths of the leaves of a merge patch that ``stored`` does not hold as written."""
    if isinstance(written, dict):
        if not isinstance(stored, dict):
            return [path]
        found: list[str] = []
        for key, value in written.items():
            if value is not None:  # null deletes: nothing to keep
                found += unkept(value, stored.get(key, _ABSENT), f"{path}.{key}")
        return found
    return [] if written == stored else [path]
