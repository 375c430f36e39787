"""A search's GPU pool on Vast.ai: rent machines under a price cap, follow the work, and
account for every dollar.

The state is Vast.ai's, not the operator's memory: every instance carries the label
``mlopt:<search uid>:<suffix>``, and each pass starts from ``GET /instances/``; the
status keeps what the API cannot tell (when a machine was rented, its price, hosts to
avoid, the cost of machines destroyed). So an operator restarted mid-provisioning adopts
what it rented, rents nothing twice and leaks nothing; :func:`sweep_orphans` destroys what
a search that no longer exists left behind.

Pure functions choose offers, size the pool and count money; :class:`PoolController` does
one reconcile pass at a time against a :class:`VastClient` and a :class:`PoolKube`; its
loop and wiring to the operator are :mod:`~mloptimizer.operator.poolwiring`'s, the
machines' rent requests :mod:`~mloptimizer.operator.builders`'.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from mloptimizer.operator.builders import POOL_LABEL
from mloptimizer.operator.offers import (
    DEFAULT_EPOCH_HOURS,
    DEFAULT_RESTART_HOURS,
    Interruptions,
    acceptable,
    choose_offers,
    offer_query,
)
from mloptimizer.operator.vastai import Instance, OfferUnavailable, VastClient, VastError
from mloptimizer.spec import ArchitectureSearchSpec, GpuPool, parse_duration
from mloptimizer.status import PoolMachine, PoolStatus

__all__ = [
    "FAILED_STATUSES",
    "LABEL_PREFIX",
    "POOL_LABEL",
    "PoolController",
    "PoolKube",
    "Work",
    "acceptable",
    "burn_rate",
    "choose_offers",
    "instance_label",
    "machine_cost",
    "machine_id_of_worker",
    "machine_name",
    "machines_wanted",
    "offer_query",
    "parse_label",
    "spent_usd",
    "sweep_orphans",
    "work_from_status",
]

LABEL_PREFIX = "mlopt:"
FAILED_STATUSES = frozenset({"exited", "offline", "stopped", "unknown"})
LIST_GRACE = 120.0  # seconds a new rental may take to show in the instance list
KEPT_ENDED = 20  # destroyed machines listed in status; older ones are summed in retiredUSD
_WORKER = re.compile(r"vast-([0-9a-f]{10})")

log = logging.getLogger(__name__)


# --- naming ----------------------------------------------------------------------------


def instance_label(uid: str, suffix: str) -> str:
    """The label of a machine rented for the search with ``uid``."""
    return f"{LABEL_PREFIX}{uid}:{suffix}"


def parse_label(label: str) -> tuple[str, str] | None:
    """(search uid, machine suffix) of one of our labels; None for anything else."""
    if not label.startswith(LABEL_PREFIX):
        return None
    parts = label[len(LABEL_PREFIX) :].split(":")
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None


def machine_name(suffix: str) -> str:
    """Node name (Node mode) and worker id (Direct mode) of a machine."""
    return f"vast-{suffix}"


def machine_id_of_worker(worker_id: str) -> str | None:
    """The machine name inside a trainer's worker id (``pod@vast-…`` or ``vast-…``)."""
    match = _WORKER.search(worker_id)
    return machine_name(match.group(1)) if match else None


# --- state ------------------------------------------------------------------------------


@dataclass
class Machine:
    """A rented machine as the controller tracks it (``status.pool.machines[]``)."""

    name: str
    instance_id: int
    host: int
    price_per_hour: float
    state: str  # Provisioning, Ready, Draining, Destroyed
    rented_at: str
    ready_at: str | None = None
    drain_started_at: str | None = None
    ended_at: str | None = None
    reason: str = ""
    interruptible: bool = False  # rented as a spot machine (it may be taken back)


@dataclass
class PoolState:
    """``status.pool``, mutable while a pass runs; read back from the status on restart."""

    machines: list[Machine] = field(default_factory=list)
    avoided_hosts: list[int] = field(default_factory=list)
    retired_usd: float = 0.0
    desired: int = 0
    message: str = ""
    # GPU type -> spot machine-hours run and preemptions seen (ended machines only)
    interruptions: dict[str, Interruptions] = field(default_factory=dict)

    @classmethod
    def from_status(cls, data: dict[str, Any] | None) -> PoolState:
        status = PoolStatus.model_validate(data or {})
        return cls(
            machines=[Machine(**m.model_dump()) for m in status.machines],
            avoided_hosts=list(status.avoided_hosts),
            retired_usd=status.retired_usd,
            desired=status.desired,
            message=status.message,
            interruptions={
                gpu: Interruptions(seen.hours, seen.preemptions)
                for gpu, seen in status.interruptions.items()
            },
        )

    def seen(self, gpu: str, now: float) -> Interruptions:
        """Spot evidence for ``gpu``: the ended machines', plus the hours of those running."""
        kept = self.interruptions.get(gpu, Interruptions())
        running = sum(
            machine_hours(m, now)
            for m in self.machines
            if m.interruptible and m.state != "Destroyed"
        )
        return Interruptions(kept.hours + running, kept.preemptions)

    def restart_hours(self) -> float:
        """How long a machine took from rental to ready (median), or a default."""
        took = sorted(
            (_seconds(m.ready_at) or 0.0) - (_seconds(m.rented_at) or 0.0)
            for m in self.machines
            if m.ready_at is not None
        )
        return took[len(took) // 2] / 3600 if took else DEFAULT_RESTART_HOURS

    def to_status(self, now: float) -> dict[str, Any]:
        """``status.pool`` at ``now``: readiness and money are derived from the machines."""
        status = PoolStatus.model_validate(
            {
                "desired": self.desired,
                "ready": sum(m.state == "Ready" for m in self.machines),
                "machines": [PoolMachine.model_validate(vars(m)) for m in self.machines],
                "avoided_hosts": self.avoided_hosts,
                "retired_usd": self.retired_usd,
                "spent_usd": round(spent_usd(self, now), 6),
                "burn_rate_per_hour": round(burn_rate(self), 6),
                "message": self.message[:1024],
                "interruptions": {
                    gpu: {"hours": round(seen.hours, 6), "preemptions": seen.preemptions}
                    for gpu, seen in self.interruptions.items()
                },
            }
        )
        return status.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- sizing and money --------------------------------------------------------------------


def machines_wanted(work: int, pool: GpuPool, trainers_per_machine: int, ended: bool) -> int:
    """Machines for ``work`` trials (queued and running), within the pool's bounds."""
    if ended:
        return 0
    need = math.ceil(max(0, work) / max(1, trainers_per_machine))
    return max(pool.min_replicas, min(pool.max_replicas, need))


def _seconds(rfc3339: str | None) -> float | None:
    if rfc3339 is None:
        return None
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _rfc3339(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def machine_hours(machine: Machine, now: float) -> float:
    """Hours from rent to end, the end being now for a machine still rented."""
    start = _seconds(machine.rented_at) or now
    end = _seconds(machine.ended_at) or now
    return max(0.0, end - start) / 3600.0


def machine_cost(machine: Machine, now: float) -> float:
    """price x (end - rent), the end being now for a machine still rented."""
    return machine.price_per_hour * machine_hours(machine, now)


def spent_usd(status: PoolState, now: float) -> float:
    """Everything the pool has cost: machines listed, plus those retired from the list."""
    return status.retired_usd + sum(machine_cost(m, now) for m in status.machines)


def burn_rate(status: PoolState) -> float:
    """USD/hour the machines still rented bill."""
    return sum(m.price_per_hour for m in status.machines if m.state != "Destroyed")


def work_from_status(status: dict[str, Any], spec: ArchitectureSearchSpec, now: float) -> Work:
    """What the pool should serve, read from the search's status as the dispatcher wrote it.

    Trials in flight are the queued and running ones; a search that succeeded and whose
    final job runs (``Delivered`` Unknown) still needs one. The time left, for the spend cap, is
    the budget's timeout left, or the finished trials' pace extrapolated to the trials left
    (an hour before any trial has finished), whichever is shorter.
    """
    phase = status.get("phase")
    trials = status.get("trials") or {}
    delivering = any(
        c.get("type") == "Delivered" and c.get("status") == "Unknown"
        for c in status.get("conditions") or []
    )
    if phase == "Succeeded" and delivering:  # the final job needs one trainer, on a machine
        return Work(trials=1, ended=False, remaining_hours=1.0)
    if phase in ("Succeeded", "Failed"):
        return Work(trials=0, ended=True, remaining_hours=0.0)
    running = int(trials.get("running") or 0)
    finished = sum(int(trials.get(k) or 0) for k in ("complete", "pruned", "failed"))
    started = _seconds(status.get("startTime"))
    hours = 1.0
    if started is not None and finished > 0:
        left = max(0, spec.budget.max_trials - finished)
        hours = (now - started) / 3600.0 * left / finished
    if spec.budget.timeout is not None and started is not None:
        hours = min(hours, max(0.0, parse_duration(spec.budget.timeout) - (now - started)) / 3600)
    per_epoch = trials.get("secondsPerEpoch")
    epoch_hours = float(per_epoch) / 3600 if per_epoch else DEFAULT_EPOCH_HOURS
    return Work(trials=running, ended=False, remaining_hours=hours, epoch_hours=epoch_hours)


# --- the controller ----------------------------------------------------------------------


class PoolKube(Protocol):
    """The Kubernetes side of a pool."""

    async def patch_status(self, patch: dict[str, Any]) -> None:
        """Merge ``patch`` into the search's status."""

    async def node_ready(self, name: str) -> bool:
        """Node mode: whether node ``name`` has joined and is Ready."""

    async def drain_node(self, name: str) -> bool:
        """Node mode: cordon ``name`` and stop its trainers (they requeue their trials);
        True once no trainer runs there."""

    async def event(self, type_: str, reason: str, message: str) -> None:
        """Emit a Kubernetes Event on the search (type_ Normal or Warning)."""

    async def uncordon_node(self, name: str) -> None:
        """Node mode: let trainers schedule on ``name`` again (work came back)."""

    async def delete_node(self, name: str) -> None:
        """Node mode: remove the Node object of a destroyed machine."""


@dataclass
class Work:
    """What the search asks of the pool in one pass."""

    trials: int  # queued and running
    ended: bool = False
    remaining_hours: float = 1.0  # how long the search is expected to go on
    epoch_hours: float = DEFAULT_EPOCH_HOURS  # an epoch's training time, as trials took it


@dataclass
class PoolController:
    """Reconciles one search's machines on Vast.ai with its work.

    Args:
        uid: the search's ``metadata.uid`` (labels instances).
        pool: the spec's ``workers.gpuPool``.
        vast: an open :class:`VastClient`.
        kube: the Kubernetes side.
        rent_request: builds the ``PUT /asks/`` body for a machine name.
        trainers_per_machine: trainer pods (or processes) one machine runs.
        status: the pool status found on the search (state kept across restarts).
        clock: epoch seconds (a controlled clock in tests).
    """

    uid: str
    pool: GpuPool
    vast: VastClient
    kube: PoolKube
    rent_request: Callable[[str], dict[str, Any]]
    trainers_per_machine: int = 1
    status: PoolState = field(default_factory=PoolState)
    clock: Callable[[], float] = time.time

    def prices(self) -> dict[str, float]:
        """Machine name -> USD/hour, for the cost of the trials each machine ran."""
        return {m.name: m.price_per_hour for m in self.status.machines}

    async def reconcile(self, work: Work) -> PoolState:
        """One pass: observe Vast.ai, retire failed or late machines, then scale."""
        now = self.clock()
        said = self.status.message
        ours = {i.id: i for i in await self.vast.instances() if _search_of(i.label) == self.uid}
        await self._observe(ours, now)
        target = machines_wanted(work.trials, self.pool, self.trainers_per_machine, work.ended)
        live = [m for m in self.status.machines if m.state != "Destroyed"]
        working = [m for m in live if m.state != "Draining"]
        if len(working) < target:
            # Work came back: keep machines still draining rather than rent new ones.
            for machine in [m for m in live if m.state == "Draining"][: target - len(working)]:
                machine.state = "Ready" if machine.ready_at else "Provisioning"
                machine.drain_started_at = None
                if self.pool.mode == "Node":
                    await self.kube.uncordon_node(machine.name)
                working.append(machine)
        if len(working) < target:
            await self._grow(target - len(working), work, now)
        elif len(working) > target:
            self._start_draining(working, len(working) - target, now)
        await self._drain(now, force=work.ended)
        self.status.desired = target
        if self.status.message and self.status.message != said:  # once, not every pass
            await self.kube.event("Warning", "PoolBlocked", self.status.message)
        await self._publish(now)
        return self.status

    async def destroy_all(self, reason: str) -> None:
        """Destroy every instance labelled for this search (the finalizer's job)."""
        now = self.clock()
        for instance in await self.vast.instances():
            if _search_of(instance.label) == self.uid:
                await self.vast.destroy(instance.id)
        for machine in self.status.machines:
            if machine.state != "Destroyed":
                await self._ended(machine, now, reason, destroy=False)
        await self._publish(now)

    # --- passes ----------------------------------------------------------------------

    async def _observe(self, ours: dict[int, Instance], now: float) -> None:
        known = {m.instance_id: m for m in self.status.machines}
        for instance in ours.values():  # rented, but the status patch was lost
            if instance.id not in known:
                suffix = (parse_label(instance.label) or ("", "adopted"))[1]
                machine = Machine(
                    name=machine_name(suffix)[:63],
                    instance_id=instance.id,
                    host=instance.machine_id,
                    price_per_hour=instance.dph_total,
                    state="Provisioning",
                    rented_at=_rfc3339(instance.start_date or now),
                )
                self.status.machines.append(machine)
                known[instance.id] = machine
                log.info("adopted instance %d (%s)", instance.id, machine.name)
        timeout = parse_duration(self.pool.provision_timeout)
        for machine in list(self.status.machines):
            if machine.state == "Destroyed":
                continue
            current = ours.get(machine.instance_id)
            age = now - (_seconds(machine.rented_at) or now)
            if current is None:
                if age > LIST_GRACE:  # a machine just rented may not be listed yet
                    await self._ended(machine, now, "gone from Vast.ai", destroy=False)
            elif machine.interruptible and preempted(current):
                await self._preempted(machine, current, now)
            elif current.actual_status in FAILED_STATUSES:
                await self._ended(machine, now, f"instance {current.actual_status}")
            elif machine.state == "Provisioning":
                if await self._ready(machine, current):
                    machine.state = "Ready"
                    machine.ready_at = _rfc3339(now)
                    await self.kube.event(
                        "Normal", "MachineReady", f"{machine.name} ready after {age:.0f}s"
                    )
                elif age > timeout:
                    if machine.host and machine.host not in self.status.avoided_hosts:
                        self.status.avoided_hosts.append(machine.host)
                    await self._ended(
                        machine,
                        now,
                        f"not ready within provisionTimeout {self.pool.provision_timeout} "
                        f"({current.actual_status}); host {machine.host} avoided",
                    )

    async def _preempted(self, machine: Machine, instance: Instance, now: float) -> None:
        """A spot machine taken back: counted for its GPU type, its host not avoided (it
        did nothing wrong); its trainers' trials go on from their checkpoints elsewhere."""
        gpu = self.pool.gpu_name
        kept = self.status.interruptions.get(gpu, Interruptions())
        self.status.interruptions[gpu] = Interruptions(kept.hours, kept.preemptions + 1)
        await self.kube.event(
            "Warning",
            "MachinePreempted",
            f"{machine.name} (instance {instance.id}, interruptible) was taken back by Vast.ai "
            f"({instance.actual_status}); its trials go on from their last epoch",
        )
        await self._ended(machine, now, f"preempted ({instance.actual_status})")

    async def _ready(self, machine: Machine, instance: Instance) -> bool:
        if instance.actual_status != "running":
            return False
        return self.pool.mode != "Node" or await self.kube.node_ready(machine.name)

    async def _grow(self, count: int, work: Work, now: float) -> None:
        spent, burn = spent_usd(self.status, now), burn_rate(self.status)
        try:
            offers = await self.vast.search_offers(offer_query(self.pool))
        except VastError as error:
            self.status.message = f"offer search failed: {error}"
            return
        seen = self.status.seen(self.pool.gpu_name, now)
        chosen = choose_offers(offers, self.pool, len(offers), self.status.avoided_hosts, seen,
                               work.epoch_hours, self.status.restart_hours())  # fmt: skip
        rented = 0
        for choice in chosen:
            if rented == count:
                break
            offer, price = choice.offer, choice.price_per_hour
            cap = self.pool.max_spend_usd
            if cap is not None and spent + (burn + price) * work.remaining_hours > cap:
                self.status.message = (
                    f"not renting: ${spent:.2f} spent + ${burn + price:.2f}/h for "
                    f"{work.remaining_hours:.1f} h would pass maxSpendUSD ${cap:.2f}"
                )
                return
            suffix = secrets.token_hex(5)
            name = machine_name(suffix)
            request = {**self.rent_request(name), "label": instance_label(self.uid, suffix)}
            if choice.interruptible:
                request["price"] = price  # a bid: an interruptible (spot) rental
            try:
                instance_id = await self.vast.rent(offer.id, request)
            except OfferUnavailable:
                log.info("offer %d was taken; trying the next", offer.id)
                continue
            machine = Machine(
                name=name,
                instance_id=instance_id,
                host=offer.machine_id,
                price_per_hour=price,
                state="Provisioning",
                rented_at=_rfc3339(now),
                interruptible=choice.interruptible,
            )
            self.status.machines.append(machine)
            burn += price
            rented += 1
            await self._publish(now)  # the id is in status before anything else happens
            await self.kube.event(
                "Normal",
                "MachineRented",
                f"{name}: instance {instance_id} on host {offer.machine_id}, "
                f"{offer.num_gpus}x {offer.gpu_name} at ${price:.3f}/h "
                f"{'interruptible' if choice.interruptible else 'on-demand'} "
                f"(${choice.usd_per_epoch:.4f} a finished epoch expected)",
            )
        if rented < count:
            self.status.message = (
                f"{count - rented} more machine(s) wanted, no offer meets the filters "
                f"(gpuName {self.pool.gpu_name}, maxPricePerHour {self.pool.max_price_per_hour})"
            )
        else:
            self.status.message = ""

    def _start_draining(self, working: list[Machine], surplus: int, now: float) -> None:
        """Mark ``surplus`` machines to go: those not ready yet (nothing runs there) first,
        then the most recently rented."""
        order = sorted(
            working,
            key=lambda m: (m.state == "Ready", -(_seconds(m.rented_at) or 0.0), m.instance_id),
        )
        for machine in order[:surplus]:
            machine.state = "Draining"
            machine.drain_started_at = _rfc3339(now)

    async def _drain(self, now: float, *, force: bool) -> None:
        timeout = parse_duration(self.pool.drain_timeout)
        for machine in self.status.machines:
            if machine.state != "Draining":
                continue
            if machine.ready_at is None:
                await self._ended(machine, now, "not needed")
                continue
            drained = True
            if self.pool.mode == "Node":
                drained = await self.kube.drain_node(machine.name)
            started = _seconds(machine.drain_started_at) or now
            if drained or force or now - started >= timeout:
                await self._ended(machine, now, "drained: not needed")

    async def _ended(
        self, machine: Machine, now: float, reason: str, *, destroy: bool = True
    ) -> None:
        if destroy:
            await self.vast.destroy(machine.instance_id)
        machine.state = "Destroyed"
        machine.ended_at = _rfc3339(now)
        machine.reason = reason[:256]
        if machine.interruptible:  # its hours are evidence of the spot market's rate
            kept = self.status.interruptions.get(self.pool.gpu_name, Interruptions())
            self.status.interruptions[self.pool.gpu_name] = Interruptions(
                kept.hours + machine_hours(machine, now), kept.preemptions
            )
        log.info("machine %s (instance %d): %s", machine.name, machine.instance_id, reason)
        if self.pool.mode == "Node":
            await self.kube.delete_node(machine.name)
        expected = reason.startswith(("drained", "not needed", "search deleted"))
        await self.kube.event(
            "Normal" if expected else "Warning",
            "MachineDestroyed",
            f"{machine.name} (instance {machine.instance_id}, "
            f"${machine_cost(machine, now):.2f}): {reason}",
        )

    async def _publish(self, now: float) -> None:
        status = self.status
        live = [m for m in status.machines if m.state != "Destroyed"]
        ended = [m for m in status.machines if m.state == "Destroyed"]
        for old in ended[: max(0, len(ended) - KEPT_ENDED)]:
            status.retired_usd += machine_cost(old, now)
        status.machines = live + ended[-KEPT_ENDED:]
        pool = status.to_status(now)
        await self.kube.patch_status(
            {
                "pool": pool,
                "cost": {
                    "usd": round(pool["spentUSD"], 4),
                    "burnRatePerHour": round(pool["burnRatePerHour"], 4),
                },
            }
        )


def preempted(instance: Instance) -> bool:
    """Whether an interruptible instance was taken back: Vast.ai stopped it (outbid, or
    its host reclaimed) while we still want it running. A container that exited on its own
    (a crashing trainer) or a host gone offline is a failure, not a preemption."""
    return instance.actual_status == "stopped" and instance.intended_status in ("running", "")


def _search_of(label: str) -> str | None:
    parsed = parse_label(label)
    return parsed[0] if parsed else None


async def sweep_orphans(
    vast: VastClient, live_uids: Callable[[], Awaitable[set[str]]]
) -> list[int]:
    """Destroy our instances whose search no longer exists; returns their ids.

    Instances are listed before the searches: one rented by a search created meanwhile is
    then sure to find its search in the list.
    """
    instances = await vast.instances()
    live = await live_uids()
    destroyed = []
    for instance in instances:
        uid = _search_of(instance.label)
        if uid is not None and uid not in live:
            log.warning("destroying orphan instance %d (%s)", instance.id, instance.label)
            await vast.destroy(instance.id)
            destroyed.append(instance.id)
    return destroyed
