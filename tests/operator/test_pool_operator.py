"""GPU pools through the whole operator: kopf with our handlers against the real API server
for ArchitectureSearch and the emulator for the rest (see ``cluster.py``), the Vast.ai mock (a
booted VM "joins" by creating its Node), the machine's PostgreSQL and RabbitMQ. No trainer
runs: the trials the dispatcher publishes wait in the queue, which is the work the pool rents
machines for.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from cluster import Cluster, run_operator
from services import RABBITMQ_URL
from test_operator import name, operator_config, search  # noqa: F401 (fixtures)
from vastmock import API_KEY, VastMock

from mloptimizer.operator.brokeradmin import (
    BrokerAdmin,
    admin_url_for,
    scoped_url,
    search_user,
    search_vhost,
)
from mloptimizer.operator.builders import POOL_LABEL
from mloptimizer.operator.config import OperatorConfig
from mloptimizer.operator.main import shared_memo
from mloptimizer.operator.pool import instance_label
from mloptimizer.operator.secretrefs import USABLE_LABEL

pytestmark = pytest.mark.services


@pytest.fixture
async def vast(cluster: Cluster) -> AsyncIterator[VastMock]:
    loop = asyncio.get_running_loop()

    def join(instance: dict[str, Any]) -> None:
        request = instance["request"]
        if not request.get("vm"):
            return
        node_name = request["onstart"].split("--node-name=")[1].split()[0]
        uid = request["onstart"].split(f"--node-label={POOL_LABEL}=")[1].split()[0]

        async def create() -> None:  # what k3s does when the VM joins
            node = {"metadata": {"name": node_name, "labels": {POOL_LABEL: uid}}}
            await cluster.create("nodes", node, None)
            ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
            await cluster.patch("nodes", None, node_name, ready, subresource="status")

        asyncio.run_coroutine_threadsafe(create(), loop)

    with VastMock(create_seconds=0.2, boot_seconds=1.0, on_running=join) as mock:
        for machine, price in enumerate([0.31, 0.22, 0.27, 0.9], start=1):
            mock.add_offer(machine_id=machine, dph_total=price)
        yield mock


@pytest.fixture
def operator_login() -> Iterator[str]:
    """A broker login for this test's operator alone (an administrator, as an operator's
    must be). The orphan sweep only deletes identities whose vhost its operator's login was
    given; with a login of its own, this test's sweep (every 0.5 s) cannot touch the
    identities of the tests beside it, which all use guest's."""
    user, password = f"mlopt-test-operator-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    management("PUT", f"/api/users/{user}", {"password": password, "tags": "administrator"})
    try:
        yield scoped_url(RABBITMQ_URL, user, password, "/")
    finally:
        management("DELETE", f"/api/users/{user}")


def config(dsn: str, vast: VastMock, login: str, **changes: Any) -> OperatorConfig:
    return dataclasses.replace(
        operator_config(dsn),
        broker_url=login,
        vastai_url=vast.url,
        pool_interval=0.2,
        orphan_sweep_interval=0.5,
        gpu_pools=True,
        **changes,
    )


def secret(secret_name: str, **data: str) -> dict[str, Any]:
    """A Secret an admin opened to searches (the operator refuses any other)."""
    return {
        "metadata": {"name": secret_name, "labels": {USABLE_LABEL: "true"}},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def pool_search(search_name: str, **pool: Any) -> dict[str, Any]:
    return search(
        search_name,
        budget={"maxTrials": 4, "parallelism": 2},
        workers={
            "maxReplicas": 2,
            "resources": {"gpu": 1, "cpu": "1", "memory": "1Gi"},
            "gpuPool": {
                k: v
                for k, v in {
                    "maxReplicas": 2,
                    "maxPricePerHour": 0.5,
                    "apiKeySecretRef": {"name": "vastai", "key": "api-key"},
                    "joinSecretRef": {"name": "k3s-join"},
                    **pool,
                }.items()
                if v is not None
            },
        },
    )


def pool_of(obj: dict[str, Any] | None) -> dict[str, Any]:
    return dict(((obj or {}).get("status") or {}).get("pool") or {})


async def test_node_pool_rents_joins_survives_a_restart_and_is_destroyed_with_the_search(
    cluster: Cluster,
    vast: VastMock,
    postgres_dsn: str,
    operator_login: str,
    name: str,  # noqa: F811
) -> None:
    await cluster.create("secrets", secret("vastai", **{"api-key": API_KEY}), "default")
    await cluster.create(
        "secrets",
        secret("k3s-join", server="https://k3s.example:6443", token="K10::join"),
        "default",
    )
    vast.boot_seconds = 4.0  # long enough to restart the operator mid-provisioning
    with vast.lock:
        orphan = {
            "id": 1,
            "machine_id": 99,
            "label": instance_label("a-search-long-gone", "0123456789"),
            "actual_status": "running",
            "dph_total": 0.2,
            "start_date": vast.clock(),
            "request": {},
            "joined": True,
            "forced": True,
        }
        vast.instances[1] = orphan
    memo = shared_memo(config(postgres_dsn, vast, operator_login, vastai_api_key=API_KEY))
    async with run_operator(cluster, memo=memo):
        created = await cluster.create("archsearch", pool_search(name))
        uid = created["metadata"]["uid"]
        await cluster.wait_for(
            "archsearch",
            "default",
            name,
            lambda o: len(pool_of(o).get("machines", [])) == 2,
            timeout=60,
        )
        await vast.wait_until(lambda: 1 in vast.destroyed, timeout=30)  # the orphan
    rents = [c for c in vast.calls if c[0] == "PUT"]
    assert len(rents) == 2
    # the operator is gone; the machines boot and join meanwhile; a new operator adopts them
    memo = shared_memo(config(postgres_dsn, vast, operator_login))
    async with run_operator(cluster, memo=memo):
        ready = await cluster.wait_for(
            "archsearch", "default", name, lambda o: pool_of(o).get("ready") == 2, timeout=60
        )
        assert len([c for c in vast.calls if c[0] == "PUT"]) == 2  # nothing rented twice
        pool = pool_of(ready)
        assert sorted(m["pricePerHour"] for m in pool["machines"]) == [0.22, 0.27]
        assert ready is not None
        assert ready["status"]["cost"]["burnRatePerHour"] == pytest.approx(0.49)
        deployment = await cluster.get("deployments", "default", f"{name}-trainer")
        assert deployment is not None
        pod = deployment["spec"]["template"]["spec"]
        assert pod["nodeSelector"][POOL_LABEL] == uid
        assert {"key": POOL_LABEL, "operator": "Equal", "value": uid, "effect": "NoSchedule"} in (
            pod["tolerations"]
        )
        request = rents[0][2]
        assert request["vm"] is True
        assert request["env"] == {"K3S_URL": "https://k3s.example:6443", "K3S_TOKEN": "K10::join"}
        assert f"--node-taint={POOL_LABEL}={uid}:NoSchedule" in request["onstart"]
        assert postgres_dsn not in json.dumps(request)

        # dropping the pool under a running search would orphan its machines: refused
        await cluster.patch("archsearch", "default", name, {"spec": {"workers": {"gpuPool": None}}})

        def refused(obj: dict[str, Any] | None) -> bool:
            conditions = ((obj or {}).get("status") or {}).get("conditions") or []
            return any(c.get("reason") == "SpecChangeRefused" for c in conditions)

        degraded = await cluster.wait_for("archsearch", "default", name, refused, timeout=30)
        assert degraded is not None
        assert "gpuPool" in next(
            c["message"] for c in degraded["status"]["conditions"] if c["type"] == "Degraded"
        )
        assert len(vast.live()) == 2

        await cluster.delete("archsearch", "default", name)
        await cluster.wait_for("archsearch", "default", name, lambda o: o is None, timeout=60)
    assert vast.live() == []
    assert await cluster.list("nodes", label_selector=POOL_LABEL) == []


async def test_direct_pool_gives_rented_trainers_a_broker_user_of_their_own(
    cluster: Cluster,
    vast: VastMock,
    postgres_dsn: str,
    operator_login: str,
    name: str,  # noqa: F811
) -> None:
    """... and no broker login outlives its search: the identity of a search deleted while
    no operator ran (or whose finalizer was removed by hand) is swept, the live one kept."""
    await cluster.create("secrets", secret("vastai", **{"api-key": API_KEY}), "default")
    orphan = str(uuid.uuid4())
    await BrokerAdmin(admin_url_for(operator_login)).ensure_identity(
        search_vhost(orphan), search_user(orphan), "its password still works"
    )
    memo = shared_memo(config(postgres_dsn, vast, operator_login))
    async with run_operator(cluster, memo=memo):
        created = await cluster.create(
            "archsearch",
            pool_search(
                name,
                mode="Direct",
                joinSecretRef=None,
                brokerEndpoint="amqps://broker.example.com:5671/",
                maxReplicas=1,
            ),
        )
        uid = created["metadata"]["uid"]
        await vast.wait_until(lambda: vast.live(), timeout=60)
        [instance] = vast.live()
        request = next(c[2] for c in vast.calls if c[0] == "PUT")
        env = request["env"]
        assert env["MLOPT_BROKER_URL"].startswith(f"amqps://mlopt-{uid}:")
        # its own user on its own vhost, the same identity as in-cluster trainers
        assert env["MLOPT_BROKER_URL"].endswith(f"@broker.example.com:5671/mlopt-{uid}")
        assert env["MLOPT_SEARCH"] == f"default.{name}"
        assert request["image"] == "ghcr.io/mloptimizer/trainer-gpu:0.1.0"  # the CUDA build
        assert request["args"][0] == "trainer"
        assert "vm" not in request
        assert postgres_dsn not in json.dumps(request)
        assert "guest" not in json.dumps(request)
        assert API_KEY not in json.dumps(request)  # the Vast.ai key stays with the operator
        assert rabbitmq_user(f"mlopt-{uid}") is not None
        deployment = await cluster.get("deployments", "default", f"{name}-trainer")
        assert deployment is not None
        assert deployment["spec"]["replicas"] == 0  # the rented containers are the trainers
        await until(lambda: rabbitmq_user(search_user(orphan)) is None, timeout=30)
        assert management("GET", f"/api/vhosts/{search_vhost(orphan)}") is None
        assert rabbitmq_user(f"mlopt-{uid}") is not None  # the live search's identity stays

        await cluster.delete("archsearch", "default", name)
        await cluster.wait_for("archsearch", "default", name, lambda o: o is None, timeout=60)
    assert instance["id"] in vast.destroyed
    assert rabbitmq_user(f"mlopt-{uid}") is None


def management(method: str, path: str, body: object = None) -> dict[str, Any] | None:
    """One call to the machine's RabbitMQ management API as guest; None when not found."""
    url = admin_url_for(RABBITMQ_URL).replace("guest:guest@", "")
    request = urllib.request.Request(
        url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={
            "Authorization": "Basic " + base64.b64encode(b"guest:guest").decode(),
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            text = response.read()
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise
    found: dict[str, Any] = json.loads(text) if text else {}
    return found


def rabbitmq_user(user: str) -> dict[str, Any] | None:
    """The user as the management API shows it, or None."""
    return management("GET", f"/api/users/{user}")


async def until(condition: Any, timeout: float) -> None:
    """Wait for ``condition()`` (a state of the broker, which has no watch), or fail."""
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(condition):
            await asyncio.sleep(0.2)
