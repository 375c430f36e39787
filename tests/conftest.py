"""Fixtures for the real parts: a fresh PostgreSQL database per test, RabbitMQ names per
test, the Kubernetes API (a real API server behind the routing proxy, or the cluster
``MLOPT_TEST_KUBECONFIG`` names), and the images built from the Dockerfiles with a kubelet
that runs pods of them (``pods.py``).

A missing PostgreSQL or RabbitMQ fails the test that needs it, with the command to start it.
A real API server that cannot be built here, or containers that cannot run, skip their tests
with the part and the reason (``realparts.py``), which fails a CI run unless allowed.

``scripts/test`` runs the suite in two phases: ``--phase parallel`` on several xdist workers,
then ``--phase alone`` for the tests marked ``alone``: they restart or reconfigure a service
every other test shares, so nothing else may run beside them. Plain ``pytest`` runs both.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml
from cluster import Cluster, ensure_crd, remove_searches
from k8s import start_emulator, write_kubeconfig
from kubeproxy import RealApiServer, RealServerUnavailable, RoutingProxy, real_apiserver
from pods import ContainersUnavailable, Images, built_images
from realparts import (  # the hooks, too: this suite is the plugin's user
    missing,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
    skip_missing_part,
)
from services import RABBITMQ_URL, Broker, ServiceUnavailable, fresh_postgres_database

CRD_FILE = Path(__file__).resolve().parent.parent / "crds" / "architecturesearch.yaml"
REAL_CLUSTER = os.environ.get("MLOPT_TEST_KUBECONFIG")
__all__ = ["pytest_runtest_logreport", "pytest_sessionfinish", "pytest_terminal_summary"]

# Test files whose every test must run alone, and why (single tests: @pytest.mark.alone).
ALONE_FILES = {
    "test_fault_drill.py": "kills and restarts RabbitMQ and PostgreSQL",
}

# Files of tests that take minutes each (measured with --durations on 2 cores), the slowest
# first: the parallel phase starts them first, so that none is left running alone at the
# end while the other workers idle.
SLOW_FILES = (
    "test_run.py",
    "test_readme.py",
    "test_delivery.py",
    "test_containers.py",
    "test_edge_example.py",
    "test_operator.py",
    "test_daemon.py",
    "test_local.py",
    "test_trainer_worker.py",
    "test_examples.py",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--phase",
        choices=("all", "parallel", "alone"),
        default="all",
        help="run every test (all), all but those marked alone (parallel), or only those",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "alone(why): restarts or reconfigures a shared service: scripts/test runs it after "
        "the parallel phase, with nothing beside it",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in ALONE_FILES:
            item.add_marker(pytest.mark.alone(ALONE_FILES[item.path.name]))
    phase = config.getoption("--phase")
    if phase == "all":
        return
    wanted = phase == "alone"
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        alone = item.get_closest_marker("alone") is not None
        (keep if alone == wanted else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    if phase == "parallel":  # the slow ones first (a stable sort: the rest keep their order)
        keep.sort(key=_slowness)
    items[:] = keep


def _slowness(item: pytest.Item) -> tuple[bool, int]:
    """Sort key: tests marked slow, then the SLOW_FILES in order, then everything else."""
    name = item.path.name
    return item.get_closest_marker("slow") is None, (
        SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)
    )


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


@pytest.fixture(scope="session")
def real_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealApiServer]:
    """The real apiextensions-apiserver of ``scripts/kube-apiserver``, one for the session."""
    if "apiserver" in missing:
        skip_missing_part("apiserver", missing["apiserver"])
    try:
        with real_apiserver(tmp_path_factory.mktemp("kube-apiserver")) as server:
            yield server
    except RealServerUnavailable as error:
        skip_missing_part("apiserver", f"no real Kubernetes API server here: {error}")


@pytest.fixture(scope="session")
def images() -> Images:
    """The operator and CPU trainer images, built from the Dockerfiles by ``scripts/images``
    (once a session; cached layers make a rebuild take seconds)."""
    if "containers" in missing:
        skip_missing_part("containers", missing["containers"])
    try:
        return built_images()
    except ContainersUnavailable as error:
        skip_missing_part("containers", str(error))


@pytest.fixture
async def cluster(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    postgres_dsn: str,  # made before, dropped after: the searches left end with their study
) -> AsyncIterator[Cluster]:
    """The Kubernetes API of an end-to-end test, with the ArchitectureSearch CRD installed.

    By default the routing proxy: the real API server (session-wide) for mloptimizer.io and
    CRDs, a fresh emulator for everything else. With ``MLOPT_TEST_KUBECONFIG`` set, that
    cluster. ``KUBECONFIG`` points at it for the operator's own client, kubectl and helm.
    The searches a test leaves are deleted as a user would (:func:`remove_searches`).
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
