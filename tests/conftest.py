"""Fixtures for the real services: a fresh PostgreSQL database per test, RabbitMQ names
per test, and the Kubernetes API (a real API server behind the routing proxy, or the cluster
``MLOPT_TEST_KUBECONFIG`` names). A missing PostgreSQL or RabbitMQ fails the test that needs
it, with the command to start it; a real API server that cannot be built here skips its tests
with the reason (shown in pytest's summary)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from cluster import Cluster, ensure_crd, remove_searches
from k8s import start_emulator, write_kubeconfig
from kubeproxy import RealApiServer, RealServerUnavailable, RoutingProxy, real_apiserver
from services import RABBITMQ_URL, Broker, ServiceUnavailable, fresh_postgres_database

CRD_FILE = Path(__file__).resolve().parent.parent / "crds" / "architecturesearch.yaml"
REAL_CLUSTER = os.environ.get("MLOPT_TEST_KUBECONFIG")


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """DSN of an empty PostgreSQL database created for this test, dropped after it."""
    try:
        with fresh_postgres_database() as dsn:
            yield dsn
    except ServiceUnavailable as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture
def broker() -> Iterator[Broker]:
    """The machine's RabbitMQ, with queue names unique to this test and deleted after it."""
    found = Broker(RABBITMQ_URL)
    try:
        found.connect().close()
    except ServiceUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    yield found
    found.cleanup()


_unavailable: list[str] = []


@pytest.fixture(scope="session")
def real_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealApiServer]:
    """The real apiextensions-apiserver of ``scripts/kube-apiserver``, one for the session."""
    if _unavailable:
        pytest.skip(_unavailable[0])
    try:
        with real_apiserver(tmp_path_factory.mktemp("kube-apiserver")) as server:
            yield server
    except RealServerUnavailable as error:
        _unavailable.append(f"no real Kubernetes API server here: {error}")
        pytest.skip(_unavailable[0])


@pytest.fixture
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Cluster]:
    """The Kubernetes API of an end-to-end test, with the ArchitectureSearch CRD installed.

    By default the routing proxy: the real API server (session-wide) for mloptimizer.io and
    CRDs, a fresh emulator for everything else. With ``MLOPT_TEST_KUBECONFIG`` set, that
    cluster. ``KUBECONFIG`` points at it for the operator's own client, kubectl and helm.
    """
    crd = yaml.safe_load(CRD_FILE.read_text())
    if REAL_CLUSTER:
        monkeypatch.setenv("KUBECONFIG", REAL_CLUSTER)
        async with Cluster.from_kubeconfig(Path(REAL_CLUSTER)) as found:
            await ensure_crd(found, crd)
            yield found
            await remove_searches(found)
        return
    real: RealApiServer = request.getfixturevalue("real_api")
    async with (
        start_emulator(crds=()) as emulator,
        RoutingProxy(real, str(emulator.url)) as proxy,
    ):
        kubeconfig = write_kubeconfig(proxy.url, tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        async with Cluster(proxy.url, kubeconfig, emulator, proxy=proxy) as found:
            await ensure_crd(found, crd)
            yield found
            await remove_searches(found)  # the real server outlives this test
        # a real server prunes status fields its schema does not declare: none may be lost
        assert proxy.pruned == [], f"status fields written but pruned: {proxy.pruned}"
