"""The GPU pool: offers chosen under the caps, machines following the work, restarts that
leak nothing, and every dollar counted — against the Vast.ai mock and the Kubernetes
emulator (where the mock "joins" a booted VM by creating its Node), on a controlled clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import kubernetes
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from k8s import Emulator, kubernetes_configuration, start_emulator
from vastmock import API_KEY, VastMock

from mloptimizer.operator.builders import node_rent_request, trainer_labels
from mloptimizer.operator.kube import ApiPoolKube
from mloptimizer.operator.offers import Interruptions, choose_capacity, cost_per_epoch
from mloptimizer.operator.pool import (
    POOL_LABEL,
    PoolController,
    PoolState,
    Work,
    acceptable,
    choose_offers,
    instance_label,
    machine_id_of_worker,
    machines_wanted,
    offer_query,
    sweep_orphans,
    work_from_status,
)
from mloptimizer.operator.vastai import Offer, VastClient
from mloptimizer.spec import ArchitectureSearchSpec, GpuPool

NAMESPACE, NAME, UID = "default", "pool-search", "7d1c0e52-2f1b-4d7e-9a53-0b1e6a1f3c11"
HOUR = 3600.0


class Clock:
    """Epoch seconds that move only when the test says."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def gpu_pool(**fields: Any) -> GpuPool:
    return GpuPool.model_validate(
        {
            "apiKeySecretRef": {"name": "vastai", "key": "api-key"},
            "joinSecretRef": {"name": "k3s-join"},
            "maxReplicas": 3,
            "maxPricePerHour": 0.5,
            "provisionTimeout": "10m",
            "drainTimeout": "60s",
            **fields,
        }
    )


def search_body() -> dict[str, Any]:
    return {
        "apiVersion": "mloptimizer.io/v1alpha1",
        "kind": "ArchitectureSearch",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {"dataset": {"builtin": "digits"}},
    }


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with start_emulator() as found:
        found.create_object("architecturesearches", search_body(), NAMESPACE)
        yield found


@pytest.fixture
async def vast(clock: Clock, emulator: Emulator) -> AsyncIterator[VastMock]:
    loop = asyncio.get_running_loop()

    def join(instance: dict[str, Any]) -> None:
        """A booted Node-mode VM runs its onstart script: its Node appears, Ready."""
        request = instance["request"]
        if not request.get("vm"):
            return
        name = request["onstart"].split("--node-name=")[1].split()[0]
        node = {
            "metadata": {"name": name, "labels": {POOL_LABEL: UID}},
            "spec": {"taints": [{"key": POOL_LABEL, "value": UID, "effect": "NoSchedule"}]},
        }

        def create() -> None:
            emulator.create_object("nodes", node)
            ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
            emulator.patch_object("nodes", None, name, ready, subresource="status")

        loop.call_soon_threadsafe(create)

    with VastMock(clock=clock, on_running=join) as mock:
        yield mock


@pytest.fixture
async def kube(emulator: Emulator) -> AsyncIterator[ApiPoolKube]:
    api = kubernetes.client.ApiClient(kubernetes_configuration(emulator))
    yield ApiPoolKube(NAMESPACE, NAME, "mloptimizer.io/search=" + NAME, api)
    await asyncio.to_thread(api.close)


def controller(
    vast: VastMock, client: VastClient, kube: ApiPoolKube, clock: Clock, pool: GpuPool,
    state: PoolState | None = None,
) -> PoolController:  # fmt: skip
    return PoolController(
        uid=UID,
        pool=pool,
        vast=client,
        kube=kube,
        rent_request=lambda name: node_rent_request(pool, name, UID, "https://k3s:6443", "tok"),
        status=state or PoolState(),
        clock=clock,
    )


def pool_status(emulator: Emulator) -> dict[str, Any]:
    obj = emulator.fetch_object("architecturesearches", NAMESPACE, NAME)
    assert obj is not None
    return dict(obj.get("status", {}))


def events(emulator: Emulator, reason: str) -> list[dict[str, Any]]:
    """The search's Events with ``reason``."""
    return [
        e
        for e in emulator.list_objects("events", NAMESPACE)
        if e["reason"] == reason and e["involvedObject"]["name"] == NAME
    ]


async def settle(emulator: Emulator, ctl: PoolController, work: Work, passes: int = 3) -> None:
    """Reconcile a few times, letting joined Nodes land in the emulator in between."""
    for _ in range(passes):
        await ctl.reconcile(work)
        await asyncio.sleep(0)  # the mock's join callbacks run on this loop


# --- pure choices ---------------------------------------------------------------------------

offer_strategy = st.builds(
    Offer,
    id=st.integers(1, 10**6),
    machine_id=st.integers(1, 30),
    gpu_name=st.sampled_from(["RTX 4090", "RTX 3090"]),
    num_gpus=st.sampled_from([1, 2]),
    dph_total=st.floats(0.01, 3.0),
    reliability=st.floats(0.5, 1.0),
    cuda_max_good=st.sampled_from([11.8, 12.0, 12.4]),
    verified=st.booleans(),
    vms_enabled=st.booleans(),
    min_bid=st.floats(0.01, 1.0),
)


@settings(max_examples=300, deadline=None)
@given(
    offers=st.lists(offer_strategy, max_size=40),
    cap=st.floats(0.05, 2.0),
    count=st.integers(0, 8),
    capacity=st.sampled_from(["OnDemand", "Interruptible", "Auto"]),
    avoid=st.sets(st.integers(1, 30), max_size=5),
)
def test_no_offer_above_the_price_cap(
    offers: list[Offer], cap: float, count: int, capacity: str, avoid: set[int]
) -> None:
    pool = gpu_pool(
        maxPricePerHour=cap,
        capacity=capacity,
        **({"bidPricePerHour": cap / 2} if capacity == "Interruptible" else {}),
    )
    chosen = choose_offers(offers, pool, count, avoid)
    assert len(chosen) <= count
    assert all(c.offer.dph_total <= cap and c.price_per_hour <= cap for c in chosen)
    assert all(acceptable(c.offer, pool, avoid) for c in chosen)
    forced = {"OnDemand": False, "Interruptible": True}
    assert all(c.interruptible == forced[capacity] for c in chosen if capacity in forced)
    assert len({c.offer.machine_id for c in chosen}) == len(chosen)
    # the cheapest per finished epoch first: nothing left out is expected to cost less
    taken_hosts = {c.offer.machine_id for c in chosen}
    left = [
        choose_capacity(o, pool, Interruptions())
        for o in offers
        if acceptable(o, pool, avoid) and o.machine_id not in taken_hosts
    ]
    if len(chosen) == count and chosen:
        worst = max(c.usd_per_epoch for c in chosen)
        assert all(c is not None and c.usd_per_epoch >= worst for c in left)


def test_auto_rents_spot_while_it_is_cheaper_per_finished_epoch() -> None:
    offer = Offer(1, 7, "RTX 4090", 1, dph_total=0.40, reliability=0.99, cuda_max_good=12.4,
                  verified=True, vms_enabled=True, min_bid=0.24)  # fmt: skip
    pool = gpu_pool(capacity="Auto")
    epoch, restart = 0.05, 0.1  # hours: 3-minute epochs, 6 minutes to replace a machine
    calm = choose_capacity(offer, pool, Interruptions(hours=100, preemptions=1), epoch, restart)
    assert calm is not None
    assert calm.interruptible
    assert calm.price_per_hour == 0.24  # its minimum bid: no bidPricePerHour under Auto
    # spot at 0.24 with rate r costs 0.24 x (e^(r x 0.05) - 1) x (1 / r + 0.1) an epoch: it
    # loses to 0.40 x 0.05 on-demand once r > 4.76 an hour
    below = choose_capacity(offer, pool, Interruptions(1000, 4700), epoch, restart)  # 4.69/h
    above = choose_capacity(offer, pool, Interruptions(1000, 4800), epoch, restart)  # 4.79/h
    assert below is not None
    assert below.interruptible
    assert above is not None
    assert not above.interruptible
    stormy = choose_capacity(offer, pool, Interruptions(hours=1, preemptions=70), epoch, restart)
    assert stormy is not None
    assert not stormy.interruptible
    assert stormy.usd_per_epoch == pytest.approx(cost_per_epoch(0.40, 0.0, epoch, restart))
    # the prior (one in ten hours) until evidence comes; evidence outweighs it
    assert Interruptions().rate == pytest.approx(0.1)
    assert Interruptions(hours=1000, preemptions=500).rate == pytest.approx(0.5, rel=0.01)
    # Interruptible (interruptible: true) and OnDemand force the way, whatever it costs
    forced = gpu_pool(interruptible=True, bidPricePerHour=0.3)
    spot = choose_capacity(offer, forced, Interruptions(hours=1, preemptions=9), epoch, restart)
    assert spot is not None
    assert spot.interruptible
    assert spot.price_per_hour == 0.3
    never = choose_capacity(offer, gpu_pool(), Interruptions(), epoch, restart)
    assert never is not None
    assert not never.interruptible


def test_the_query_carries_every_filter() -> None:
    query = offer_query(gpu_pool(gpuName="RTX 3090", minReliability=0.99, minCudaVersion="12.2"))
    assert query["gpu_name"] == {"eq": "RTX 3090"}
    assert query["dph_total"] == {"lte": 0.5}
    assert query["reliability2"] == {"gte": 0.99}
    assert query["cuda_max_good"] == {"gte": 12.2}
    assert query["vms_enabled"] == {"eq": True}
    assert query["verified"] == {"eq": True}
    direct = offer_query(
        gpu_pool(mode="Direct", verifiedOnly=False, brokerEndpoint="amqps://b:5671/")
    )
    assert "vms_enabled" not in direct
    assert "verified" not in direct


def test_machines_follow_the_work_within_bounds() -> None:
    pool = gpu_pool(minReplicas=1, maxReplicas=3)
    assert [machines_wanted(w, pool, 2, False) for w in (0, 1, 2, 3, 5, 9)] == [1, 1, 1, 2, 3, 3]
    assert machines_wanted(9, pool, 2, True) == 0


def test_the_work_and_the_time_left_come_from_the_status() -> None:
    spec = ArchitectureSearchSpec.model_validate(
        {"dataset": {"builtin": "digits"}, "budget": {"maxTrials": 20, "timeout": "2h"}}
    )
    now = 1_800_000_000.0
    start = "2027-01-15T08:00:00Z"  # 1_800_000_000 is 2027-01-15T08:00:00Z
    assert work_from_status({}, spec, now) == Work(trials=0, remaining_hours=1.0)
    half_hour_in = {
        "phase": "Running",
        "startTime": start,
        "trials": {"running": 4, "complete": 4, "pruned": 1, "failed": 0},
    }
    work = work_from_status(half_hour_in, spec, now + 1800)
    assert work.trials == 4
    assert work.remaining_hours == pytest.approx(0.5 * 15 / 5)  # the pace so far: 1.5 h
    late = work_from_status(half_hour_in, spec, now + 6000)  # the 2 h timeout is nearer
    assert late.remaining_hours == pytest.approx((7200 - 6000) / 3600)
    assert work_from_status({"phase": "Succeeded"}, spec, now).ended
    delivering = {
        "phase": "Succeeded",
        "conditions": [{"type": "Delivered", "status": "Unknown", "reason": "Delivering"}],
    }
    assert work_from_status(delivering, spec, now) == Work(trials=1, remaining_hours=1.0)
    delivered = {
        "phase": "Succeeded",
        "conditions": [{"type": "Delivered", "status": "True", "reason": "Delivered"}],
    }
    assert work_from_status(delivered, spec, now).ended  # then the machines go


def test_worker_ids_name_their_machine() -> None:
    assert machine_id_of_worker("search-trainer-5c9f@vast-0a1b2c3d4e") == "vast-0a1b2c3d4e"
    assert machine_id_of_worker("vast-0a1b2c3d4e") == "vast-0a1b2c3d4e"
    assert machine_id_of_worker("search-trainer-5c9f@gke-node-1") is None


# --- the controller ---------------------------------------------------------------------------


async def test_scale_up_to_the_work_then_down_to_nothing(
    vast: VastMock, kube: ApiPoolKube, emulator: Emulator, clock: Clock
) -> None:
    for machine, price in enumerate([0.45, 0.2, 0.3, 0.9, 0.25], start=1):
        vast.add_offer(machine_id=machine, dph_total=price)
    vast.add_offer(machine_id=9, dph_total=0.1, vms_enabled=False)  # a container: no node
    pool = gpu_pool(maxReplicas=2)
    async with VastClient(API_KEY, url=vast.url) as client:
        ctl = controller(vast, client, kube, clock, pool)
        await ctl.reconcile(Work(trials=5))
        rented = vast.live()
        assert sorted(i["dph_total"] for i in rented) == [0.2, 0.25]  # cheapest VMs, capped
        status = pool_status(emulator)["pool"]
        assert {m["instanceId"] for m in status["machines"]} == {i["id"] for i in rented}
        assert all(m["state"] == "Provisioning" for m in status["machines"])
        assert all(i["label"].startswith(f"mlopt:{UID}:") for i in rented)

        clock.advance(vast.boot_seconds)
        await settle(emulator, ctl, Work(trials=5))
        status = pool_status(emulator)["pool"]
        assert len(events(emulator, "MachineRented")) == 2
        said = sorted(e["message"].split(", ", 1)[1] for e in events(emulator, "MachineRented"))
        assert [s.split(" (")[0] for s in said] == [
            "1x RTX 4090 at $0.200/h on-demand",
            "1x RTX 4090 at $0.250/h on-demand",
        ]
        assert len(events(emulator, "MachineReady")) == 2
        assert status["ready"] == 2
        assert status["desired"] == 2
        names = {m["name"] for m in status["machines"]}
        assert {n["metadata"]["name"] for n in emulator.list_objects("nodes")} == names

        # a trainer pod runs on each node: draining one deletes its pod (the trainer
        # requeues its trial on SIGTERM), and the machine goes once no trainer is left there
        for node in names:
            emulator.create_object(
                "pods",
                {
                    "metadata": {"name": f"t-{node}", "labels": trainer_labels(NAME)},
                    "spec": {"nodeName": node, "containers": [{"name": "t", "image": "i"}]},
                },
                NAMESPACE,
            )
        await ctl.reconcile(Work(trials=1))
        assert len(vast.live()) == 2  # one draining, not destroyed yet
        [draining] = [
            m for m in pool_status(emulator)["pool"]["machines"] if m["state"] == "Draining"
        ]
        pods = {p["spec"]["nodeName"] for p in emulator.list_objects("pods", NAMESPACE)}
        assert pods == names - {draining["name"]}
        node = emulator.fetch_object("nodes", None, draining["name"])
        assert node is not None
        assert node["spec"]["unschedulable"] is True
        await ctl.reconcile(Work(trials=1))
        assert [i["id"] for i in vast.live()] == [
            m["instanceId"] for m in pool_status(emulator)["pool"]["machines"]
            if m["state"] == "Ready"
        ]  # fmt: skip
        await ctl.reconcile(Work(trials=0, ended=True))
        assert vast.live() == []
        assert emulator.list_objects("nodes") == []
        status = pool_status(emulator)
        assert status["pool"]["burnRatePerHour"] == 0
        assert all(m["state"] == "Destroyed" for m in status["pool"]["machines"])


async def test_spend_cap_stops_scale_up_and_cost_is_price_times_time(
    vast: VastMock, kube: ApiPoolKube, emulator: Emulator, clock: Clock
) -> None:
    for machine in range(1, 6):
        vast.add_offer(machine_id=machine, dph_total=0.4)
    pool = gpu_pool(maxReplicas=5, maxSpendUSD=1.0)
    async with VastClient(API_KEY, url=vast.url) as client:
        ctl = controller(vast, client, kube, clock, pool)
        await ctl.reconcile(Work(trials=5, remaining_hours=1.0))
        assert len(vast.live()) == 2  # a third would project 0 + 1.2 $/h x 1 h > $1
        status = pool_status(emulator)
        assert "maxSpendUSD" in status["pool"]["message"]
        [blocked] = events(emulator, "PoolBlocked")
        assert blocked["type"] == "Warning"
        assert "maxSpendUSD" in blocked["message"]

        clock.advance(vast.boot_seconds)
        await settle(emulator, ctl, Work(trials=5, remaining_hours=1.0))
        assert pool_status(emulator)["pool"]["ready"] == 2
        assert len(vast.live()) == 2
        clock.advance(0.5 * HOUR - vast.boot_seconds)
        await ctl.reconcile(Work(trials=5, remaining_hours=0.4))
        # $0.40 spent; a third: 0.4 + 1.2 x 0.4 = 0.88 fits, a fourth: 0.4 + 1.6 x 0.4 does not
        assert len(vast.live()) == 3
        status = pool_status(emulator)
        assert status["cost"]["usd"] == pytest.approx(0.8 * 0.5)
        assert status["cost"]["burnRatePerHour"] == pytest.approx(1.2)

        clock.advance(0.25 * HOUR)
        await ctl.reconcile(Work(trials=0, ended=True))
        clock.advance(HOUR)  # destroyed machines cost nothing more
        await ctl.reconcile(Work(trials=0, ended=True))
        expected = 0.8 * 0.75 + 0.4 * 0.25
        assert pool_status(emulator)["cost"]["usd"] == pytest.approx(expected)
        assert pool_status(emulator)["pool"]["spentUSD"] == pytest.approx(expected)


async def test_restart_mid_provisioning_neither_leaks_nor_rents_twice(
    vast: VastMock, kube: ApiPoolKube, emulator: Emulator, clock: Clock
) -> None:
    for machine in range(1, 6):
        vast.add_offer(machine_id=machine, dph_total=0.2 + machine / 100)
    pool = gpu_pool(maxReplicas=3)
    async with VastClient(API_KEY, url=vast.url) as client:
        first = controller(vast, client, kube, clock, pool)
        await first.reconcile(Work(trials=3))
        assert len(vast.live()) == 3
        saved = pool_status(emulator)["pool"]
        # the operator dies; one rental's status patch was lost on the way
        saved["machines"] = saved["machines"][:2]
        clock.advance(30)
        second = controller(vast, client, kube, clock, pool, PoolState.from_status(saved))
        await second.reconcile(Work(trials=3))
        assert len(vast.live()) == 3
        assert sum(1 for c in vast.calls if c[0] == "PUT") == 3
        status = pool_status(emulator)["pool"]
        assert {m["instanceId"] for m in status["machines"]} == {i["id"] for i in vast.live()}

        # and a third operator, after the search was deleted, destroys all of them
        third = controller(vast, client, kube, clock, pool, PoolState.from_status(saved))
        await third.destroy_all("search deleted")
        assert vast.live() == []
        assert len(vast.destroyed) == 3


async def test_a_machine_never_ready_is_destroyed_and_its_host_avoided(
    vast: VastMock, kube: ApiPoolKube, emulator: Emulator, clock: Clock
) -> None:
    slow = vast.add_offer(machine_id=1, dph_total=0.1)
    vast.never_boot.add(1)
    vast.add_offer(machine_id=2, dph_total=0.3)
    pool = gpu_pool(maxReplicas=1, provisionTimeout="5m")
    async with VastClient(API_KEY, url=vast.url) as client:
        ctl = controller(vast, client, kube, clock, pool)
        await ctl.reconcile(Work(trials=1))
        [first] = vast.live()
        assert first["machine_id"] == 1
        clock.advance(4 * 60)
        await ctl.reconcile(Work(trials=1))
        assert [i["id"] for i in vast.live()] == [first["id"]]  # still within the timeout
        vast.add_offer(machine_id=1, dph_total=0.05)  # the slow host again, cheaper still
        clock.advance(2 * 60)
        await ctl.reconcile(Work(trials=1))
        assert first["id"] in vast.destroyed
        [second] = vast.live()
        assert second["machine_id"] == 2
        status = pool_status(emulator)["pool"]
        assert status["avoidedHosts"] == [1]
        [gone] = [m for m in status["machines"] if m["state"] == "Destroyed"]
        assert "provisionTimeout" in gone["reason"]
        assert gone["instanceId"] == first["id"]
        assert slow not in vast.offers
        [destroyed] = events(emulator, "MachineDestroyed")
        assert destroyed["type"] == "Warning"
        assert "provisionTimeout" in destroyed["message"]


async def test_taken_offers_exited_instances_and_rate_limits(
    vast: VastMock, kube: ApiPoolKube, emulator: Emulator, clock: Clock
) -> None:
    taken = vast.add_offer(machine_id=1, dph_total=0.1)
    vast.taken.add(taken)
    vast.add_offer(machine_id=2, dph_total=0.2)
    vast.add_offer(machine_id=3, dph_total=0.3)
    pool = gpu_pool(maxReplicas=1)
    async with VastClient(API_KEY, url=vast.url) as client:
        ctl = controller(vast, client, kube, clock, pool)
        await ctl.reconcile(Work(trials=1))
        [instance] = vast.live()
        assert instance["machine_id"] == 2  # the next cheapest after the taken one
        clock.advance(vast.boot_seconds)
        await settle(emulator, ctl, Work(trials=1))
        vast.set_status(instance["id"], "exited")
        await ctl.reconcile(Work(trials=1))
        assert instance["id"] in vast.destroyed
        [replacement] = vast.live()
        assert replacement["machine_id"] == 3
        [gone] = [m for m in pool_status(emulator)["pool"]["machines"] if m["state"] == "Destroyed"]
        assert gone["reason"] == "instance exited"


async def test_the_orphan_sweep_destroys_only_instances_of_searches_gone(
    vast: VastMock, clock: Clock
) -> None:
    for machine in range(1, 4):
        vast.add_offer(machine_id=machine)
    async with VastClient(API_KEY, url=vast.url) as client:
        offers = sorted(vast.offers)
        live = await client.rent(offers[0], {"image": "i", "label": instance_label("live", "a")})
        gone = await client.rent(offers[1], {"image": "i", "label": instance_label("gone", "b")})
        mine = await client.rent(offers[2], {"image": "i", "label": "my own notebook"})

        async def searches() -> set[str]:
            return {"live"}

        assert await sweep_orphans(client, searches) == [gone]
    assert {i["id"] for i in vast.live()} == {live, mine}


async def test_work_coming_back_revives_a_draining_machine_instead_of_renting(
    vast: VastMock, kube: ApiPoolKube, emulator: Emulator, clock: Clock
) -> None:
    for machine in (1, 2, 3):
        vast.add_offer(machine_id=machine, dph_total=0.2 + machine / 100)
    pool = gpu_pool(maxReplicas=2)
    async with VastClient(API_KEY, url=vast.url) as client:
        ctl = controller(vast, client, kube, clock, pool)
        await ctl.reconcile(Work(trials=2))
        clock.advance(vast.boot_seconds)
        await settle(emulator, ctl, Work(trials=2))
        names = {m["name"] for m in pool_status(emulator)["pool"]["machines"]}
        for node in names:  # a busy trainer on each node keeps its machine draining
            emulator.create_object(
                "pods",
                {
                    "metadata": {"name": f"t-{node}", "labels": trainer_labels(NAME)},
                    "spec": {"nodeName": node, "containers": [{"name": "t", "image": "i"}]},
                },
                NAMESPACE,
            )
        await ctl.reconcile(Work(trials=1))
        [draining] = [m for m in ctl.status.machines if m.state == "Draining"]
        cordoned = emulator.fetch_object("nodes", None, draining.name)
        assert cordoned is not None
        assert cordoned["spec"]["unschedulable"] is True

        await ctl.reconcile(Work(trials=2))
        assert [m.state for m in ctl.status.machines] == ["Ready", "Ready"]
        revived = emulator.fetch_object("nodes", None, draining.name)
        assert revived is not None
        assert revived["spec"]["unschedulable"] is False
        assert len([c for c in vast.calls if c[0] == "PUT"]) == 2  # nothing rented anew
        assert len(vast.live()) == 2


async def test_a_preempted_spot_machine_is_told_from_a_failed_one_and_its_rate_kept(
    vast: VastMock, kube: ApiPoolKube, emulator: Emulator, clock: Clock
) -> None:
    for machine in (1, 2, 3, 4):
        vast.add_offer(machine_id=machine, dph_total=0.4)  # min bid 0.2
    pool = gpu_pool(maxReplicas=1, capacity="Auto")
    async with VastClient(API_KEY, url=vast.url) as client:
        ctl = controller(vast, client, kube, clock, pool)
        await ctl.reconcile(Work(trials=1))
        [spot] = vast.live()
        assert spot["is_bid"]  # the prior's rate: spot at its minimum bid is cheaper
        assert spot["dph_total"] == 0.2
        clock.advance(HOUR)
        await settle(emulator, ctl, Work(trials=1))
        vast.preempt(spot["id"])  # outbid: Vast.ai stops it, we still want it running
        await ctl.reconcile(Work(trials=1))
        status = pool_status(emulator)["pool"]
        [gone] = [m for m in status["machines"] if m["state"] == "Destroyed"]
        assert gone["reason"] == "preempted (stopped)"
        assert gone["interruptible"]
        assert status["interruptions"]["RTX 4090"]["preemptions"] == 1
        assert status["interruptions"]["RTX 4090"]["hours"] == pytest.approx(1.0, abs=0.01)
        assert status["avoidedHosts"] == []  # the host did nothing wrong
        [event] = events(emulator, "MachinePreempted")
        assert "its trials go on from their last epoch" in event["message"]
        # a container that exited on its own is a failure, not a preemption
        [second] = vast.live()
        clock.advance(vast.boot_seconds)
        await settle(emulator, ctl, Work(trials=1))
        vast.set_status(second["id"], "exited")
        await ctl.reconcile(Work(trials=1))
        status = pool_status(emulator)["pool"]
        assert status["interruptions"]["RTX 4090"]["preemptions"] == 1
        reasons = [m["reason"] for m in status["machines"] if m["state"] == "Destroyed"]
        assert "instance exited" in reasons


async def test_auto_turns_to_on_demand_when_spot_machines_keep_being_taken_back(
    vast: VastMock, kube: ApiPoolKube, emulator: Emulator, clock: Clock
) -> None:
    for host in range(1, 12):
        vast.add_offer(machine_id=host, dph_total=0.4)
    pool = gpu_pool(maxReplicas=1, capacity="Auto")
    async with VastClient(API_KEY, url=vast.url) as client:
        ctl = controller(vast, client, kube, clock, pool)
        work = Work(trials=1, epoch_hours=2.0)  # 2-hour epochs: a preemption loses an hour
        kinds: list[bool] = []
        for _ in range(12):
            await ctl.reconcile(work)
            [machine] = vast.live()
            kinds.append(machine["is_bid"])
            clock.advance(600)  # taken back ten minutes in, every time
            await settle(emulator, ctl, work)
            if machine["is_bid"]:
                vast.preempt(machine["id"])
            else:
                break
        # spot first (the prior), until the rate seen makes on-demand cheaper per epoch
        assert kinds[0] is True
        assert kinds[-1] is False
        seen = pool_status(emulator)["pool"]["interruptions"]["RTX 4090"]
        assert seen["preemptions"] == kinds.count(True)
