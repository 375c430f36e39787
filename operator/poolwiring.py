"""A search's GPU pool wired to the operator: its controller built from the search, the
rented machines' requests with their secrets, the pool's loop (:func:`run_pool`) in kopf's
event loop, its destruction, and the orphan sweep (Vast.ai instances and broker identities
whose search is gone).

The pure parts (offers, sizing, money, one reconcile pass) are :mod:`~mloptimizer.operator.pool`'s;
the requests' bodies are :mod:`~mloptimizer.operator.builders`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import kopf
import kubernetes

from mloptimizer.faults import Outage, lost_service
from mloptimizer.loading import SpecError
from mloptimizer.operator.brokeradmin import (
    scoped_url,
    search_user,
    search_vhost,
    sweep_identities,
)
from mloptimizer.operator.builders import (
    CACHE_DIR,
    GRACE_SECONDS,
    direct_rent_request,
    node_rent_request,
    sharing_env,
    trainer_labels,
    trainers_per_machine,
)
from mloptimizer.operator.config import OperatorConfig
from mloptimizer.operator.kube import ApiPoolKube, kube_outage
from mloptimizer.operator.pool import (
    PoolController,
    PoolState,
    Work,
    burn_rate,
    spent_usd,
    sweep_orphans,
    work_from_status,
)
from mloptimizer.operator.secretrefs import read_secret
from mloptimizer.operator.shared import Shared, broker_identity, parse
from mloptimizer.operator.vastai import VastClient, VastError, vast_outage
from mloptimizer.spec import GROUP, PLURAL, VERSION, ArchitectureSearchSpec, GpuPool, SecretKeyRef
from mloptimizer.study import study_name

__all__ = [
    "Stopped",
    "destroy_pool",
    "pool_controller",
    "pool_rent_request",
    "run_pool",
    "serve_pool",
    "start_sweeper",
    "stop_sweeper",
    "sweep_forever",
]

log = logging.getLogger(__name__)


def pool_controller(
    body: Any,
    pool: GpuPool,
    vast: VastClient,
    rent_request: Callable[[str], dict[str, Any]],
    per_machine: int = 1,
) -> PoolController:
    """The pool controller of a search, its state read back from the search's status."""
    meta = body["metadata"]
    selector = ",".join(f"{k}={v}" for k, v in trainer_labels(meta["name"]).items())
    return PoolController(
        uid=meta["uid"],
        pool=pool,
        vast=vast,
        kube=ApiPoolKube(meta["namespace"], meta["name"], selector, uid=meta["uid"]),
        rent_request=rent_request,
        trainers_per_machine=per_machine,
        status=PoolState.from_status((body.get("status") or {}).get("pool")),
    )


async def pool_rent_request(
    body: Any, spec: ArchitectureSearchSpec, shared: Shared
) -> Callable[[str], dict[str, Any]]:
    """The ``PUT /asks/`` body builder of a search's pool, with its secrets resolved."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    pool = spec.workers.gpu_pool
    assert pool is not None
    if pool.mode == "Node":
        join = pool.join_secret_ref
        assert join is not None
        server = await asyncio.to_thread(
            read_secret, namespace, SecretKeyRef(name=join.name, key=join.server_key)
        )
        token = await asyncio.to_thread(
            read_secret, namespace, SecretKeyRef(name=join.name, key=join.token_key)
        )
        return lambda machine: node_rent_request(pool, machine, uid, server, token)
    assert pool.broker_endpoint is not None
    # The same identity as the search's in-cluster trainers: its user on its vhost only.
    password = await asyncio.to_thread(broker_identity, body, shared)
    url = scoped_url(pool.broker_endpoint, search_user(uid), password, search_vhost(uid))
    return lambda machine: direct_rent_request(
        pool,
        machine,
        image=spec.workers.trainer_image,
        broker_url=url,
        search=study_name(namespace, name),
        queue_prefix=shared.config.queue_prefix,
        grace_seconds=GRACE_SECONDS,
        cache_dir=CACHE_DIR,
        sharing=sharing_env(spec),
    )


async def serve_pool(body: Any, shared: Shared, stopped: Stopped) -> None:
    """Keep a search's rented machines in line with its work until it ends."""
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    key = (namespace, name)
    try:
        spec = shared.spec_in_force(key, parse(body))  # should an edit have been refused
    except SpecError:
        return  # start_search marks it Failed
    pool = spec.workers.gpu_pool
    if pool is None or not shared.config.gpu_pools:
        return  # without --gpu-pools, start_search failed the search: nothing is rented
    api_key = await asyncio.to_thread(read_secret, namespace, pool.api_key_secret_ref)
    with shared.lock:
        shared.vast_keys[uid] = api_key
    rent_request = await pool_rent_request(body, spec, shared)

    def after_pass(controller: PoolController) -> None:
        with shared.lock:
            shared.prices[key] = controller.prices()
        if shared.metrics is not None:
            state = controller.status
            shared.metrics.pool(
                study_name(namespace, name),
                spent_usd(state, controller.clock()),
                burn_rate(state),
                [m.state for m in state.machines],
            )

    async with VastClient(api_key, url=shared.config.vastai_url) as vast:
        per_machine = trainers_per_machine(spec) * spec.workers.processes_per_pod
        controller = pool_controller(body, pool, vast, rent_request, per_machine)
        await run_pool(
            controller,
            stopped=stopped,
            interval=shared.config.pool_interval,
            work=lambda: work_from_status(
                dict(body.get("status") or {}), shared.spec_in_force(key, spec), controller.clock()
            ),
            pool=lambda: shared.spec_in_force(key, spec).workers.gpu_pool,
            after_pass=after_pass,
            outages=(kube_outage, vast_outage),
        )


async def destroy_pool(body: Any, pool: GpuPool, shared: Shared) -> None:
    """Destroy every machine a search rented (its broker identity goes with the search)."""
    meta = body["metadata"]
    namespace, uid = meta["namespace"], meta["uid"]
    try:
        try:
            api_key = await asyncio.to_thread(read_secret, namespace, pool.api_key_secret_ref)
        except kopf.TemporaryError:
            with shared.lock:
                remembered = shared.vast_keys.get(uid)
            if remembered is None:
                kopf.warn(
                    body,
                    reason="PoolNotDestroyed",
                    message=f"Secret {pool.api_key_secret_ref.name} is gone and the operator "
                    "never saw the key: destroy the instances labelled mlopt:"
                    f"{uid}:* on Vast.ai (the orphan sweep does, given MLOPT_VASTAI_API_KEY)",
                )
                return
            api_key = remembered
        async with VastClient(api_key, url=shared.config.vastai_url) as vast:
            await pool_controller(body, pool, vast, lambda _: {}).destroy_all("search deleted")
    finally:
        with shared.lock:
            shared.prices.pop((namespace, meta["name"]), None)


# --- the pool's loop ----------------------------------------------------------------


class Stopped(Protocol):
    """kopf's ``stopped`` flag of an async daemon."""

    def __bool__(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> Awaitable[Any]: ...


async def run_pool(
    controller: PoolController,
    *,
    stopped: Stopped,
    interval: float,
    work: Callable[[], Work],
    pool: Callable[[], GpuPool | None],
    after_pass: Callable[[PoolController], None] = lambda _: None,
    outages: tuple[Outage, ...] = (vast_outage,),
) -> None:
    """Keep a search's machines in line with its work, pass after pass, until the search
    has ended and every machine it rented is destroyed (or ``stopped`` is set).

    ``pool`` gives the pool in force (its bounds and caps may be edited live), ``work`` the
    trials in flight and the time left, ``after_pass`` publishes prices and metrics. A lost
    service (:func:`~mloptimizer.faults.lost_service` with ``outages``: Vast.ai's, and the
    operator's Kubernetes API) is logged and retried on the next pass; anything else is a
    bug and raises.
    """
    while not stopped:
        controller.pool = pool() or controller.pool
        now_work = work()
        try:
            await controller.reconcile(now_work)
        except Exception as error:
            what = lost_service(error, *outages)
            if what is None:
                raise
            log.warning(
                "pool of %s: waiting for %s (%s: %s); retrying in %s s",
                controller.uid, what, type(error).__name__, error, interval,
            )  # fmt: skip
        after_pass(controller)
        if now_work.ended and all(m.state == "Destroyed" for m in controller.status.machines):
            return
        await stopped.wait(interval)


# --- the orphan sweep -------------------------------------------------------------------


async def live_search_uids(config: OperatorConfig) -> set[str]:
    """The uids of every ArchitectureSearch this operator watches."""
    api = kubernetes.client.CustomObjectsApi()
    items: list[dict[str, Any]] = []
    if config.namespaces:
        for namespace in config.namespaces:
            found = await asyncio.to_thread(
                api.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL
            )
            items.extend(found["items"])  # type: ignore[index]
    else:
        found = await asyncio.to_thread(api.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        items.extend(found["items"])  # type: ignore[index]
    return {item["metadata"]["uid"] for item in items}


async def sweep_forever(shared: Shared) -> None:
    """Now and then, destroy the Vast.ai instances (with every key known) and delete the
    broker identities whose search is gone.

    Identities are first swept one interval after the start: they are told apart by the
    operator's broker login only, and a short-lived operator sharing that login (a test's)
    would otherwise sweep at once the identities of searches in another cluster.
    """
    passes = 0
    while True:
        if shared.config.gpu_pools:
            await _sweep_instances(shared)
        if passes > 0:
            try:
                await sweep_identities(
                    shared.broker_admin(), lambda: live_search_uids(shared.config)
                )
            except (RuntimeError, aiohttp.ClientError, kubernetes.client.ApiException) as error:
                log.warning("orphan sweep of broker identities: %s", error)
        passes += 1
        await asyncio.sleep(shared.config.orphan_sweep_interval)


async def _sweep_instances(shared: Shared) -> None:
    with shared.lock:
        keys = set(shared.vast_keys.values())
    if shared.config.vastai_api_key:
        keys.add(shared.config.vastai_api_key)
    for api_key in keys:
        try:
            async with VastClient(api_key, url=shared.config.vastai_url) as vast:
                await sweep_orphans(vast, lambda: live_search_uids(shared.config))
        except (VastError, kubernetes.client.ApiException) as error:
            log.warning("orphan sweep: %s", error)


def start_sweeper(shared: Shared) -> None:
    """Start the orphan sweep in the operator's loop (unless its interval is 0)."""
    if shared.config.orphan_sweep_interval > 0:
        shared.sweeper = asyncio.create_task(sweep_forever(shared))


async def stop_sweeper(shared: Shared) -> None:
    if shared.sweeper is not None:
        shared.sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await shared.sweeper
