"""One Kubernetes API for a test, over HTTP: the routing proxy in front of the real API server
and the emulator, or a real cluster.

The operator's end-to-end tests talk to the cluster only through :class:`Cluster`, so they run
unchanged against

* the routing proxy (the default): ``ArchitectureSearch`` and CRDs served by the real
  ``apiextensions-apiserver`` (``kubeproxy.py``), core and apps objects by the emulator
  (``k8s.py``), whose ``emulator`` stays reachable for what only it can do (a Node that
  "joins"); or
* a real cluster, when ``MLOPT_TEST_KUBECONFIG`` names a kubeconfig (e.g. kind's): then
  ``emulator`` is None and the tests that need it skip.

Every call is async and leaves the test's event loop free (the emulator and the proxy serve on
it). ``wait_for`` follows a watch: no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from services import RABBITMQ_URL

from mloptimizer.operator.brokeradmin import BrokerAdmin, admin_url_for, search_user, search_vhost

Body = dict[str, Any]
CRD_DIGEST = "mloptimizer.io/test-crd-digest"  # which file content a CRD was applied from

# name -> (group, version, plural, namespaced)
RESOURCES: dict[str, tuple[str, str, str, bool]] = {
    "archsearch": ("mloptimizer.io", "v1alpha1", "architecturesearches", True),
    "customresourcedefinitions": ("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                                  False),
    "deployments": ("apps", "v1", "deployments", True),
    "secrets": ("", "v1", "secrets", True),
    "configmaps": ("", "v1", "configmaps", True),
    "events": ("", "v1", "events", True),
    "pods": ("", "v1", "pods", True),
    "persistentvolumeclaims": ("", "v1", "persistentvolumeclaims", True),
    "nodes": ("", "v1", "nodes", False),
    "networkpolicies": ("networking.k8s.io", "v1", "networkpolicies", True),
    "jobs": ("batch", "v1", "jobs", True),
    "namespaces": ("", "v1", "namespaces", False),
}  # fmt: skip


class KubeError(Exception):
    """A refusal of the API server: its HTTP status and Status body."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body: dict[str, Any] = body if isinstance(body, dict) else {"message": str(body)}
        super().__init__(f"{status}: {self.body.get('message', body)}")

    @property
    def causes(self) -> list[dict[str, Any]]:
        return list((self.body.get("details") or {}).get("causes") or [])


@dataclass
class Cluster:
    """The API endpoint of a test: ``url`` (with ``ssl_context``/``token`` for a real cluster),
    ``kubeconfig`` for kubectl, helm and the operator's client, ``emulator`` when behind the
    routing proxy."""

    url: str
    kubeconfig: Path
    emulator: Any = None  # k8s.Emulator behind the proxy, None on a real cluster
    ssl_context: ssl.SSLContext | None = None
    token: str | None = None
    credentials: dict[str, Any] | None = None  # for kopf.ConnectionInfo
    proxy: Any = None  # kubeproxy.RoutingProxy in front of the emulator, None on a real cluster
    _session: aiohttp.ClientSession | None = None
    # the memo of the product's operator a test last ran here: at the end of the test, an
    # operator like it ends the searches left (remove_searches)
    operator_memo: Any = None

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path) -> Cluster:
        """A real cluster: server, certificates and token read from a kubeconfig."""
        import kubernetes.client
        import kubernetes.config

        configuration = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration
        )
        context = None
        if configuration.host.startswith("https"):
            context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            if configuration.cert_file:
                context.load_cert_chain(configuration.cert_file, configuration.key_file)
            if not configuration.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        bearer = (configuration.api_key or {}).get("authorization", "")
        token = bearer.removeprefix("Bearer ") or None
        credentials = {
            "ca_path": configuration.ssl_ca_cert,
            "certificate_path": configuration.cert_file,
            "private_key_path": configuration.key_file,
            "token": token,
            "insecure": not configuration.verify_ssl or None,
        }
        credentials = {k: v for k, v in credentials.items() if v}
        return cls(configuration.host, kubeconfig, None, context, token, credentials)

    async def __aenter__(self) -> Cluster:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(headers=headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    # --- paths ---

    @staticmethod
    def path(resource: str, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:  # fmt: skip
        group, version, plural, namespaced = RESOURCES[resource]
        path = f"/apis/{group}/{version}" if group else f"/api/{version}"
        if namespaced and namespace:
            path += f"/namespaces/{namespace}"
        path += f"/{plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call; the decoded body, or :class:`KubeError`."""
        assert self._session is not None, "use `async with cluster:`"
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        async with self._session.request(
            method, self.url.rstrip("/") + path, data=data, params=params, headers=headers,
            ssl=self.ssl_context if self.ssl_context is not None else True,
        ) as response:  # fmt: skip
            text = await response.text()
            try:
                decoded = json.loads(text) if text else None
            except ValueError:
                decoded = text
            if response.status >= 400:
                raise KubeError(response.status, decoded)
            return decoded

    # --- objects ---

    async def get(self, resource: str, namespace: str | None, name: str) -> Body | None:
        """The object, or None when it does not exist."""
        try:
            found: Body = await self.request("GET", self.path(resource, namespace, name))
        except KubeError as error:
            if error.status == 404:
                return None
            raise
        return found

    async def list(
        self, resource: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[Body]:
        params = {"labelSelector": label_selector} if label_selector else None
        listed = await self.request("GET", self.path(resource, namespace), params=params)
        return list(listed.get("items") or [])

    async def create(
        self, resource: str, body: Mapping[str, Any], namespace: str | None = None,
        *, dry_run: bool = False,
    ) -> Body:  # fmt: skip
        namespace = namespace or (body.get("metadata") or {}).get("namespace") or "default"
        params = {"dryRun": "All"} if dry_run else None
        created: Body = await self.request(
            "POST", self.path(resource, namespace), dict(body), params=params
        )
        return created

    async def patch(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        patch: Any,
        *,
        subresource: str | None = None,
        content_type: str = "application/merge-patch+json",
    ) -> Body:
        patched: Body = await self.request(
            "PATCH", self.path(resource, namespace, name, subresource), patch,
            content_type=content_type,
        )  # fmt: skip
        return patched

    async def delete(self, resource: str, namespace: str | None, name: str) -> None:
        with contextlib.suppress(KubeError):
            await self.request("DELETE", self.path(resource, namespace, name))

    async def _watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[Body]:
        assert self._session is not None
        async with self._session.get(
            self.url.rstrip("/") + path, params={**params, "watch": "true"},
            ssl=self.ssl_context if self.ssl_context is not None else True,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        ) as response:  # fmt: skip
            if response.status >= 400:
                raise KubeError(response.status, await response.text())
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)

    async def follow(
        self, resource: str, namespace: str | None, name: str
    ) -> AsyncGenerator[Body | None, None]:
        """The object now (None when absent), then again after each change, for ever.

        Lists it once, then follows a watch from that resourceVersion (listed again when the
        server ends the watch or answers an ERROR such as 410 Gone).
        """
        path = self.path(resource, namespace)
        selector = {"fieldSelector": f"metadata.name={name}"}
        while True:
            listed = await self.request("GET", path, params=selector)
            items = listed.get("items") or []
            yield items[0] if items else None
            since = {"resourceVersion": listed["metadata"]["resourceVersion"]}
            async for event in self._watch(path, {**selector, **since}):
                if event["type"] == "ERROR":
                    break
                if event["type"] == "BOOKMARK":
                    continue
                yield None if event["type"] == "DELETED" else event["object"]

    async def wait_for(
        self,
        resource: str,
        namespace: str | None,
        name: str,
        predicate: Callable[[Body | None], bool] = lambda obj: obj is not None,
        timeout: float = 10.0,
    ) -> Body | None:
        """Await until the object (None when absent) satisfies ``predicate``; return it.

        Follows the object (:meth:`follow`): no polling. ``lambda obj: obj is None`` awaits
        its removal.
        """
        last: Body | None = None
        try:
            async with (
                asyncio.timeout(timeout),
                contextlib.aclosing(self.follow(resource, namespace, name)) as changes,
            ):
                async for last in changes:
                    if predicate(last):
                        return last
        except TimeoutError:
            raise TimeoutError(
                f"{resource} {namespace}/{name} did not become as awaited within {timeout}s; "
                f"it is now: {last!r}"
            ) from None
        raise AssertionError("unreachable: follow() never ends")


async def ensure_crd(cluster: Cluster, crd: Mapping[str, Any], timeout: float = 30.0) -> Body:
    """Create the CRD, or replace it when it exists, and await its Established condition.

    Returns the CRD as the server stored it; :class:`KubeError` if the server refuses it.
    """
    name = crd["metadata"]["name"]
    current = await cluster.get("customresourcedefinitions", None, name)
    body = json.loads(json.dumps(crd))
    digest = hashlib.sha256(json.dumps(crd, sort_keys=True).encode()).hexdigest()[:16]
    body["metadata"].setdefault("annotations", {})[CRD_DIGEST] = digest
    if current is None:
        await cluster.create("customresourcedefinitions", body, None)
    elif (current["metadata"].get("annotations") or {}).get(CRD_DIGEST) != digest:
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        path = cluster.path("customresourcedefinitions", None, name)
        await cluster.request("PUT", path, body)

    def established(obj: Body | None) -> bool:
        conditions = ((obj or {}).get("status") or {}).get("conditions") or []
        return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

    found = await cluster.wait_for("customresourcedefinitions", None, name, established, timeout)
    assert found is not None
    # Established is not served yet: a real server answers 429 "storage is (re)initializing"
    # for a moment after, with a Retry-After, which is all there is to wait on.
    spec = found["spec"]
    path = f"/apis/{spec['group']}/{spec['versions'][0]['name']}/{spec['names']['plural']}"
    async with asyncio.timeout(timeout):
        while True:
            try:
                await cluster.request("GET", path, params={"limit": "1"})
                return found
            except KubeError as error:
                if error.status != 429:
                    raise
                await asyncio.sleep(0.2)


async def remove_searches(cluster: Cluster, timeout: float = 60.0) -> None:
    """Delete every ArchitectureSearch the way a user does, and let its finalizer run: an
    operator like the test's last one (its memo's config) serves the deletions, so that
    nothing a search made outlives it, its broker login above all. A search still held
    after ``timeout`` (its operator cannot finish: a service the test took away) loses its
    finalizers, as one left would block the next test, and its broker identity here."""
    searches = await cluster.list("archsearch")
    if not searches:
        return
    held = [s for s in searches if s["metadata"].get("finalizers")]
    if held and cluster.operator_memo is not None:
        from mloptimizer.operator.main import shared_memo

        memo = shared_memo(cluster.operator_memo.shared.config)
        with contextlib.suppress(TimeoutError):
            async with run_operator(cluster, memo=memo), asyncio.timeout(timeout):
                # one at a time: deletions at once on a database without Optuna's tables yet
                # race to create them, and the loser is retried only 60 s later
                for search in held:
                    await _delete_all(cluster, [search])
                    meta = search["metadata"]
                    where = ("archsearch", meta["namespace"], meta["name"])
                    await cluster.wait_for(*where, lambda o: o is None, timeout=timeout)
    for search in await cluster.list("archsearch"):
        meta = search["metadata"]
        with contextlib.suppress(KubeError):  # gone meanwhile
            if meta.get("finalizers"):
                unheld = {"metadata": {"finalizers": None}}
                await cluster.patch("archsearch", meta["namespace"], meta["name"], unheld)
                await _delete_identity(meta["uid"])
    await _delete_all(cluster, await cluster.list("archsearch"))


async def _delete_all(cluster: Cluster, searches: list[Body]) -> None:
    for search in searches:
        meta = search["metadata"]
        with contextlib.suppress(KubeError):  # gone meanwhile
            await cluster.delete("archsearch", meta["namespace"], meta["name"])


async def _delete_identity(uid: str) -> None:
    """What the finalizer would have deleted on the broker: the search's vhost and user."""
    admin = BrokerAdmin(admin_url_for(RABBITMQ_URL))  # guest: every test's administrator
    with contextlib.suppress(Exception):  # the broker may be what the test took away
        await admin.delete_identity(search_vhost(uid), search_user(uid))


async def ensure_namespace(cluster: Cluster, name: str) -> None:
    """The namespace exists (a real cluster refuses objects in one that does not)."""
    if await cluster.get("namespaces", None, name) is None:
        with contextlib.suppress(KubeError):  # created meanwhile
            await cluster.create("namespaces", {"metadata": {"name": name}}, None)


def run_operator(cluster: Cluster, **options: Any) -> contextlib.AbstractAsyncContextManager[Any]:
    """kopf with ``options`` (``memo=``, ``registry=``...) against the cluster, in its thread."""
    from k8s import run_kopf_operator

    memo = options.get("memo")
    if options.get("registry") is None and getattr(memo, "shared", None) is not None:
        cluster.operator_memo = memo  # the product's operator: remove_searches runs one like it
    return run_kopf_operator(cluster.url, credentials=cluster.credentials, **options)
