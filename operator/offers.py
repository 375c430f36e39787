"""Which offers a GPU pool rents, and how: spot or on-demand, by what one finished epoch
is expected to cost on each.

Every offer is checked against the pool's filters (:func:`acceptable`: the server's answer
is never trusted alone), then priced both ways.

An interruptible (spot) machine bills its bid, less than the offer's on-demand price, but
may be taken back at any moment. With a checkpoint every epoch, a preemption costs the
epoch in progress and the time a replacement takes to be rented, boot and load the data,
all billed. An epoch is finished once it runs ``epoch`` hours without a preemption; with
preemptions at ``rate`` an hour (Poisson), the dollars per finished epoch are::

    price x (1 + checkpoint overhead) x (e^(rate x epoch) - 1) x (1 / rate + restart)

(``price x epoch`` at rate 0), with ``rate`` the preemptions per machine-hour of that GPU
type. The rate is estimated
from what the pool has seen (:class:`Interruptions`, kept in ``status.pool``), with a
prior of one preemption in ten hours, worth 2.5 machine-hours of evidence (a Gamma-Poisson
mean). ``gpuPool.capacity: Auto`` rents each offer the cheaper way; ``Interruptible``
and ``OnDemand`` force one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from mloptimizer.operator.vastai import Offer
from mloptimizer.spec import GpuPool

__all__ = [
    "CHECKPOINT_OVERHEAD",
    "DEFAULT_EPOCH_HOURS",
    "DEFAULT_RESTART_HOURS",
    "Choice",
    "Interruptions",
    "acceptable",
    "choose_capacity",
    "choose_offers",
    "cost_per_epoch",
    "offer_query",
    "spot_bid",
]

# A checkpoint of every epoch: 0.4-0.9 % of an epoch (bench/checkpoint_overhead.py).
CHECKPOINT_OVERHEAD = 0.01
PRIOR_PREEMPTIONS = 0.25  # the prior: a quarter of a preemption ...
PRIOR_HOURS = 2.5  # ... in 2.5 machine-hours (one in ten), soon outweighed
DEFAULT_EPOCH_HOURS = 2.0 / 60  # before any epoch has been timed
DEFAULT_RESTART_HOURS = 5.0 / 60  # rent, boot, pull, load: before any machine was ready


@dataclass(frozen=True)
class Interruptions:
    """What spot machines of one GPU type have done for this search: machine-hours run
    interruptible, and how many of those machines were taken back."""

    hours: float = 0.0
    preemptions: int = 0

    @property
    def rate(self) -> float:
        """Expected preemptions per machine-hour (the prior's mean when nothing is seen)."""
        return (self.preemptions + PRIOR_PREEMPTIONS) / (self.hours + PRIOR_HOURS)


def cost_per_epoch(
    price_per_hour: float, rate: float, epoch_hours: float, restart_hours: float
) -> float:
    """Expected USD per finished epoch on a machine billing ``price_per_hour`` that is taken
    back ``rate`` times an hour (0: on-demand).

    An epoch is finished when ``epoch_hours`` pass without a preemption. Before that,
    ``e^(rate x epoch) - 1`` preemptions are expected, each costing the time the epoch had
    run (``1 / rate`` on average, all told) and a replacement's ``restart_hours``."""
    hours = epoch_hours
    if rate > 0:
        preemptions = math.expm1(rate * epoch_hours)
        hours = preemptions * (1 / rate + restart_hours)
    return price_per_hour * hours * (1 + CHECKPOINT_OVERHEAD)


def spot_bid(offer: Offer, pool: GpuPool) -> float:
    """What a spot rental of ``offer`` bids: ``bidPricePerHour``, never under the offer's
    minimum bid (under capacity ``Auto`` without a bid: the minimum bid)."""
    return max(pool.bid_price_per_hour or 0.0, offer.min_bid)


@dataclass(frozen=True)
class Choice:
    """How to rent one offer, and what a finished epoch is expected to cost that way."""

    offer: Offer
    interruptible: bool
    price_per_hour: float
    usd_per_epoch: float


def choose_capacity(
    offer: Offer,
    pool: GpuPool,
    seen: Interruptions,
    epoch_hours: float = DEFAULT_EPOCH_HOURS,
    restart_hours: float = DEFAULT_RESTART_HOURS,
) -> Choice | None:
    """The cheaper way to rent ``offer`` per finished epoch (of those ``capacity`` allows),
    or None when no allowed way fits ``maxPricePerHour``."""
    modes = {"OnDemand": (False,), "Interruptible": (True,), "Auto": (False, True)}[pool.rented_as]
    choices = []
    for spot in modes:
        price = spot_bid(offer, pool) if spot else offer.dph_total
        if price > pool.max_price_per_hour:
            continue
        rate = seen.rate if spot else 0.0
        usd = cost_per_epoch(price, rate, epoch_hours, restart_hours)
        choices.append(Choice(offer, spot, price, usd))
    return min(choices, key=lambda c: (c.usd_per_epoch, c.interruptible), default=None)


def offer_query(pool: GpuPool) -> dict[str, Any]:
    """The ``/bundles/`` filter for the pool's offers (re-checked by :func:`acceptable`)."""
    query: dict[str, Any] = {
        "gpu_name": {"eq": pool.gpu_name},
        "num_gpus": {"eq": pool.num_gpus},
        "dph_total": {"lte": pool.max_price_per_hour},
        "reliability2": {"gte": pool.min_reliability},
        "cuda_max_good": {"gte": float(pool.min_cuda_version)},
        "disk_space": {"gte": pool.disk_gb},
        "rentable": {"eq": True},
        "rented": {"eq": False},
    }
    if pool.verified_only:
        query["verified"] = {"eq": True}
    if pool.mode == "Node":
        query["vms_enabled"] = {"eq": True}
    return query


def acceptable(offer: Offer, pool: GpuPool, avoid: Iterable[int] = ()) -> bool:
    """Whether ``offer`` meets every filter, and can be rented in a way the pool allows
    within ``maxPricePerHour``."""
    return (
        offer.gpu_name == pool.gpu_name
        and offer.num_gpus == pool.num_gpus
        and offer.dph_total <= pool.max_price_per_hour
        and choose_capacity(offer, pool, Interruptions()) is not None
        and offer.reliability >= pool.min_reliability
        and offer.cuda_max_good >= float(pool.min_cuda_version)
        and (offer.verified or not pool.verified_only)
        and (offer.vms_enabled or pool.mode != "Node")
        and offer.machine_id not in set(avoid)
    )


def choose_offers(
    offers: Iterable[Offer],
    pool: GpuPool,
    count: int,
    avoid: Iterable[int] = (),
    seen: Interruptions = Interruptions(),
    epoch_hours: float = DEFAULT_EPOCH_HOURS,
    restart_hours: float = DEFAULT_RESTART_HOURS,
) -> list[Choice]:
    """Up to ``count`` acceptable offers, one per host, each rented the cheaper way, the
    lowest expected cost per finished epoch first."""
    avoided = set(avoid)
    priced = [
        choice
        for offer in offers
        if acceptable(offer, pool, avoided)
        and (choice := choose_capacity(offer, pool, seen, epoch_hours, restart_hours))
    ]
    chosen: list[Choice] = []
    hosts: set[int] = set()
    for choice in sorted(priced, key=lambda c: (c.usd_per_epoch, c.offer.id)):
        if len(chosen) == count:
            break
        if choice.offer.machine_id not in hosts:
            chosen.append(choice)
            hosts.add(choice.offer.machine_id)
    return chosen
