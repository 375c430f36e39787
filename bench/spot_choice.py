"""Spot or on-demand: the dollars to finish a search under ``capacity: Auto``, against
on-demand only and spot only, as the preemption rate varies.

A simulated search on the Vast.ai mock (tests/vastmock.py) and the operator's own
:class:`~mloptimizer.operator.pool.PoolController`, on a simulated clock. The book holds
on-demand offers at $1.00/h whose minimum bid is $0.60 (spot 40 % cheaper); the mock takes
spot machines back at random at the rate given (seeded), and a new machine takes 5
minutes to boot, billed. Each search (``--searches``) needs so many epochs of so many minutes,
trained by up to four machines; a machine trains only while it runs, keeps every epoch it
finishes (a checkpoint) and loses the one in progress when it is taken back. The pool
reconciles every simulated minute (with long epochs, every 48th of an epoch). Dollars:
what every machine billed, rent to destroy.

Run: ``python bench/spot_choice.py`` (about 15 minutes; simulated time, so it may run
beside other work; no GPU, no network). Prints, per
epoch length and rate, the dollars of each capacity (mean over ``--seeds``) and
``ratio auto/best`` (target <= 1.05), and whether Auto beats on-demand wherever spot only
does.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from vastmock import API_KEY, VastMock

from mloptimizer.operator.pool import PoolController, Work, spent_usd
from mloptimizer.operator.vastai import VastClient
from mloptimizer.spec import GpuPool

MACHINES = 4
STEP = 60.0  # seconds between the pool's passes (longer epochs: a 48th of one)
RATES = (0.0, 0.1, 0.2, 0.3, 0.5)  # preemptions per machine-hour


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class NoKube:
    """The pool's Kubernetes side, which a Direct-mode pool barely uses."""

    async def patch_status(self, patch: dict[str, Any]) -> None: ...

    async def node_ready(self, name: str) -> bool:
        return True

    async def drain_node(self, name: str) -> bool:
        return True

    async def event(self, type_: str, reason: str, message: str) -> None: ...

    async def uncordon_node(self, name: str) -> None: ...

    async def delete_node(self, name: str) -> None: ...


def pool_of(capacity: str) -> GpuPool:
    return GpuPool.model_validate(
        {
            "mode": "Direct",
            "brokerEndpoint": "amqps://broker.example.com:5671/",
            "apiKeySecretRef": {"name": "vastai", "key": "api-key"},
            "maxReplicas": MACHINES,
            "maxPricePerHour": 1.5,
            "provisionTimeout": "30m",
            "capacity": capacity,
            **({"bidPricePerHour": 0.6} if capacity == "Interruptible" else {}),
        }
    )


async def search(capacity: str, rate: float, epochs: int, epoch_hours: float, seed: int) -> float:
    """Dollars to finish ``epochs`` epochs under ``capacity`` at ``rate`` preemptions/h."""
    import random

    clock = Clock()
    step = max(STEP, epoch_hours * 3600 / 48)
    with VastMock(clock=clock, boot_seconds=300.0, preempt_rate_per_hour=rate,
                  rng=random.Random(seed)) as vast:  # fmt: skip
        hosts = itertools.count(1)

        def stock() -> None:
            """The market keeps offering: 20 machines for rent at any time."""
            while len(vast.offers) < 20:
                vast.add_offer(machine_id=next(hosts), dph_total=1.0, min_bid=0.6)

        stock()
        async with VastClient(API_KEY, url=vast.url) as client:
            pool = pool_of(capacity)
            ctl = PoolController(
                uid="bench", pool=pool, vast=client, kube=NoKube(),
                rent_request=lambda name: {"image": "trainer"}, clock=clock,
            )  # fmt: skip
            done = 0  # epochs finished
            progress: dict[int, float] = {}  # instance id -> seconds into its epoch
            for _ in range(10**6):
                left = epochs - done - sum(1 for p in progress.values() if p > 0)
                busy = epochs - done
                if busy <= 0:
                    break
                work = Work(trials=min(busy, MACHINES), remaining_hours=max(left, 1) *
                            epoch_hours / MACHINES, epoch_hours=epoch_hours)  # fmt: skip
                await ctl.reconcile(work)
                stock()
                running = {i["id"] for i in vast.live() if i["actual_status"] == "running"}
                ready = {m.instance_id for m in ctl.status.machines if m.state == "Ready"}
                for instance in list(progress):
                    if instance not in running:
                        del progress[instance]  # taken back: the epoch in progress is lost
                for instance in sorted(running & ready):
                    progress[instance] = progress.get(instance, 0.0) + step
                    if progress[instance] >= epoch_hours * 3600 and done < epochs:
                        done += 1
                        progress[instance] -= epoch_hours * 3600
                clock.now += step
            await ctl.destroy_all("search done")
            return spent_usd(ctl.status, clock.now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--searches", nargs="+", default=["120x15", "40x240"],
        help="each search as EPOCHSxMINUTES (epochs of that many minutes) [120x15 40x240]",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--rates", type=float, nargs="+", default=list(RATES),
        help="preemptions per machine-hour [0 0.1 0.2 0.3 0.5]",
    )  # fmt: skip
    args = parser.parse_args()
    worst, beaten = 0.0, True
    for shape in args.searches:
        count, minutes = (float(x) for x in shape.split("x"))
        epochs = int(count)
        print(f"{epochs} epochs of {minutes:g} min, up to {MACHINES} machines; "
              "on-demand $1.00/h, spot bid $0.60/h")  # fmt: skip
        print(f"{'rate/h':>7} {'on-demand':>10} {'spot only':>10} {'auto':>10} {'auto/best':>10}")
        for rate in args.rates:
            cost: dict[str, float] = {}
            for capacity in ("OnDemand", "Interruptible", "Auto"):
                cost[capacity] = statistics.mean(
                    asyncio.run(search(capacity, rate, epochs, minutes / 60, seed))
                    for seed in range(args.seeds)
                )
            best = min(cost["OnDemand"], cost["Interruptible"])
            ratio = cost["Auto"] / best
            worst = max(worst, ratio)
            if cost["Interruptible"] < cost["OnDemand"] and cost["Auto"] >= cost["OnDemand"]:
                beaten = False
            print(f"{rate:>7.2f} {cost['OnDemand']:>10.2f} {cost['Interruptible']:>10.2f} "
                  f"{cost['Auto']:>10.2f} {ratio:>10.3f}")  # fmt: skip
    print(
        f"ratio auto/best (worst over rates) {worst:.3f}: <= 1.05 "
        f"{'met' if worst <= 1.05 else 'NOT met'}; auto beats on-demand wherever spot "
        f"only does: {'yes' if beaten else 'NO'}"
    )


if __name__ == "__main__":
    main()
