"""A search's life in the operator, as plain functions the kopf handlers call one each.

* :func:`start_search` (create/resume): check the spec (a bad one ends the search as
  Failed, with the message), create the broker Secret and the trainer Deployment (adopted,
  so they go with it);
* :func:`update_search`: note the edited spec for the search's daemon, which applies what
  may change (:func:`mloptimizer.changes.refusal`); the Deployment template follows an
  accepted edit at once;
* :func:`serve_search`: the search's daemon, :func:`~mloptimizer.operator.daemon.run_search`
  in kopf's worker thread, stopped on deletion or operator shutdown;
* :func:`serve_pool`: for a search with ``workers.gpuPool``, its
  :func:`~mloptimizer.operator.pool.run_pool`;
* :func:`delete_search` (finalizer): rented machines are destroyed (and a Direct pool's
  broker user deleted, whatever else fails); queues, Deployment and Secrets go; the study
  stays unless ``storage.deleteStudyOnDelete``;
* :func:`sweep_forever`: the orphan sweep of Vast.ai instances whose search is gone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf
import kubernetes
import optuna
import pika
import pika.exceptions

from mloptimizer.changes import refusal
from mloptimizer.checks import space_issues
from mloptimizer.loading import SpecError, parse_search
from mloptimizer.messages import QueueNames
from mloptimizer.operator.brokeradmin import (
    BrokerAdmin,
    admin_url_for,
    in_vhost,
    scoped_url,
    search_user,
    search_vhost,
)
from mloptimizer.operator.builders import (
    BROKER_PASSWORD_KEY,
    BROKER_SECRET_KEY,
    CACHE_DIR,
    GRACE_SECONDS,
    broker_secret_name,
    build_broker_secret,
    build_trainer_deployment,
    deployment_name,
    trainer_labels,
    trainers_per_machine,
)
from mloptimizer.operator.config import OperatorConfig
from mloptimizer.operator.daemon import SearchConfig, StopFlag, resume_delivery, run_search
from mloptimizer.operator.delivery import Destination
from mloptimizer.operator.kube import ApiKube, ApiPoolKube
from mloptimizer.operator.metrics import Metrics
from mloptimizer.operator.objectstore import Bucket
from mloptimizer.operator.pool import (
    POOL_RETRIED,
    PoolController,
    PoolState,
    Stopped,
    burn_rate,
    direct_rent_request,
    machine_id_of_worker,
    node_rent_request,
    run_pool,
    spent_usd,
    sweep_orphans,
    work_from_status,
)
from mloptimizer.operator.progress import now_rfc3339, set_condition
from mloptimizer.operator.secretrefs import SecretNotUsable, read_secret, secret_or, secret_refs
from mloptimizer.operator.vastai import VastClient, VastError
from mloptimizer.spec import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    ArchitectureSearchSpec,
    GpuPool,
    SecretKeyRef,
)
from mloptimizer.study import end_open_trials, storage_url, study_name

__all__ = [
    "FINISHED",
    "Shared",
    "delete_search",
    "delivery_pending",
    "destination",
    "serve_pool",
    "serve_search",
    "start_search",
    "start_sweeper",
    "stop_sweeper",
    "update_search",
]

FINISHED = ("Succeeded", "Failed")

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)


@dataclass
class Shared:
    """What the handlers of all searches share (kopf's ``memo``)."""

    config: OperatorConfig
    metrics: Metrics | None = None
    # The spec in force per search (an edit may have been refused), and the one last asked
    # for (or why it could not be read), which the search's dispatcher follows.
    in_force: dict[Key, ArchitectureSearchSpec] = field(default_factory=dict)
    requested: dict[Key, ArchitectureSearchSpec | str] = field(default_factory=dict)
    # GPU pools: machine name -> USD/hour per search, and the Vast.ai keys seen (by search
    # uid), so deletion and the orphan sweep work even once a search's Secret is gone
    prices: dict[Key, dict[str, float]] = field(default_factory=dict)
    vast_keys: dict[str, str] = field(default_factory=dict, repr=False)
    sweeper: asyncio.Task[None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def broker_admin(self) -> BrokerAdmin:
        """The RabbitMQ management API, for the searches' broker identities."""
        return BrokerAdmin(self.config.broker_admin_url or admin_url_for(self.config.broker_url))

    def price_of(self, key: Key, worker_id: str) -> float | None:
        """USD/hour of the rented machine ``worker_id`` runs on, if it is one."""
        machine = machine_id_of_worker(worker_id)
        with self.lock:
            return self.prices.get(key, {}).get(machine) if machine else None

    def spec_in_force(self, key: Key, default: ArchitectureSearchSpec) -> ArchitectureSearchSpec:
        with self.lock:
            return self.in_force.get(key, default)


# --- the spec ---------------------------------------------------------------------------


def parse(body: Any) -> ArchitectureSearchSpec:
    """The typed spec of a resource body, or SpecError with every problem (space included)."""
    meta = body["metadata"]
    document = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": meta["name"]},
        "spec": dict(body.get("spec") or {}),
    }
    source = f"{meta.get('namespace')}/{meta['name']}"
    spec = parse_search(document, source=source).spec
    errors = space_issues(spec)[0]
    if errors:
        raise SpecError(source, errors)
    return spec


def _failed(status: Any, message: str, reason: str = "InvalidSpec") -> dict[str, Any]:
    """The status patch that ends a search whose spec cannot run, saying why."""
    conditions = list(status.get("conditions") or [])
    conditions = set_condition(conditions, "Ready", "False", reason, message)
    conditions = set_condition(conditions, "Complete", "True", reason, message)
    return {
        "phase": "Failed",
        "message": message[:4096],
        "conditions": conditions,
        "completionTime": now_rfc3339(),
    }


# --- create / resume ------------------------------------------------------------------


def _create(body: dict[str, Any], owner: Any, create: Any) -> None:
    kopf.adopt(body, owner=owner)
    try:
        create(body)
    except kubernetes.client.ApiException as error:
        if error.status != 409:  # already there: creating is idempotent
            raise


def broker_ref(name: str, spec: ArchitectureSearchSpec) -> SecretKeyRef:
    """The Secret key the trainers read the broker URL from."""
    if spec.broker.secret_ref is not None:
        return spec.broker.secret_ref
    return SecretKeyRef(name=broker_secret_name(name), key=BROKER_SECRET_KEY)


def trainer_deployment(
    body: Any, spec: ArchitectureSearchSpec, config: OperatorConfig
) -> dict[str, Any]:
    """The search's trainer Deployment as its spec asks (replicas: the minimum)."""
    meta = body["metadata"]
    pool = spec.workers.gpu_pool
    return build_trainer_deployment(
        meta["name"],
        meta["namespace"],
        spec,
        replicas=spec.workers.min_replicas,
        broker=broker_ref(meta["name"], spec),
        queue_prefix=config.queue_prefix,
        pool_uid=meta["uid"] if pool is not None and pool.mode == "Node" else None,
    )


def start_search(body: Any, status: Any, shared: Shared) -> dict[str, Any]:
    """Create (or resume) a search; returns the status patch."""
    if status.get("phase") in FINISHED:
        return {}
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    try:
        spec = parse(body)
    except SpecError as error:
        kopf.warn(body, reason="InvalidSpec", message=str(error)[:1024])
        return _failed(status, str(error))
    if spec.workers.gpu_pool is not None and not shared.config.gpu_pools:
        message = (
            "spec.workers.gpuPool: GPU pools are off in this operator, nothing is rented; "
            "remove gpuPool, or ask your admin to install with vastai.enabled=true "
            "(operator flag --gpu-pools on)"
        )
        kopf.warn(body, reason="GpuPoolsDisabled", message=message)
        return _failed(status, message, reason="GpuPoolsDisabled")
    refused = refused_by_admin(namespace, spec, shared.config)
    if refused is not None:
        reason, message = refused
        kopf.warn(body, reason=reason, message=message)
        return _failed(status, message, reason=reason)
    with shared.lock:
        shared.in_force.setdefault((namespace, name), spec)
    apps = kubernetes.client.AppsV1Api()
    if spec.broker.secret_ref is None:
        broker_identity(body, shared)
    deployment = trainer_deployment(body, spec, shared.config)
    _create(deployment, body, lambda b: apps.create_namespaced_deployment(namespace, b))
    if status.get("phase"):
        return {}
    return {"phase": "Pending", "studyName": study_name(namespace, name)}


def refused_by_admin(
    namespace: str, spec: ArchitectureSearchSpec, config: OperatorConfig
) -> tuple[str, str] | None:
    """``(reason, message)`` when the admin's settings refuse the spec, else None: a trainer
    image outside ``allowedImages``, or a Secret not opened to searches."""
    image = spec.workers.trainer_image
    if config.allowed_images and not image.startswith(config.allowed_images):
        allowed = ", ".join(config.allowed_images)
        return (
            "ImageNotAllowed",
            f"spec.workers.image: {image!r} is not allowed in this cluster; use an image "
            f"starting with one of: {allowed}",
        )
    for field_path, ref in secret_refs(spec):
        try:
            read_secret(namespace, ref)
        except SecretNotUsable as error:
            return "SecretNotUsable", f"{field_path}: {error}"
    return None


def broker_identity(body: Any, shared: Shared) -> str:
    """Make (or re-make) the search's broker vhost and user; returns the user's password.

    The password is made once and kept in the search's ``<name>-broker`` Secret with the
    trainers' URL (its user on its vhost, at the operator's broker host), so that every
    call after the first, from an operator restart too, sets the same one.
    """
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    user, vhost = search_user(uid), search_vhost(uid)
    core = kubernetes.client.CoreV1Api()
    password = secrets.token_urlsafe(24)
    url = scoped_url(shared.config.broker_url, user, password, vhost)
    # 409 (it exists) keeps the password the trainers already use
    _create(
        build_broker_secret(name, url, password),
        body,
        lambda b: core.create_namespaced_secret(namespace, b),
    )
    found = core.read_namespaced_secret(broker_secret_name(name), namespace)
    password = base64.b64decode((found.data or {})[BROKER_PASSWORD_KEY]).decode()
    asyncio.run(shared.broker_admin().ensure_identity(vhost, user, password))
    return password


# --- live edits -------------------------------------------------------------------------


def update_search(body: Any, status: Any, shared: Shared) -> None:
    """Hand an edited spec to the search's dispatcher; the Deployment follows at once when
    the edit may apply (the dispatcher refuses the rest, which shows as Degraded)."""
    if status.get("phase") in FINISHED:
        return
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    key = (namespace, name)
    try:
        spec = parse(body)
    except SpecError as error:
        with shared.lock:
            shared.requested[key] = (
                f"the new spec is invalid, the search goes on with the old: {error}"
            )
        return
    refused = refused_by_admin(namespace, spec, shared.config)
    if refused is not None:
        with shared.lock:
            shared.requested[key] = f"the edit is refused, the search goes on: {refused[1]}"
        return
    with shared.lock:
        shared.requested[key] = spec
        running = shared.in_force.get(key)
        accepted = running is None or refusal(running, spec) is None
        if accepted:
            shared.in_force[key] = spec
    if not accepted:
        return
    # the template follows the spec; replicas stay the daemon's
    template = trainer_deployment(body, spec, shared.config)["spec"]["template"]
    kubernetes.client.AppsV1Api().patch_namespaced_deployment(
        deployment_name(name), namespace, {"spec": {"template": template}}
    )


# --- the search's daemon ----------------------------------------------------------------


def destination(namespace: str, name: str, spec: ArchitectureSearchSpec) -> Destination | None:
    """Where the search's best model goes (``spec.output``), its bucket key read now."""
    output = spec.output
    folder = output.destination_path(namespace, name)
    if output.pvc is not None:
        return Destination(folder, claim=output.pvc.claim_name)
    store = output.s3
    if store is None:
        return None
    ref = store.secret_ref
    bucket = Bucket(
        endpoint=store.endpoint,
        bucket=store.bucket,
        region=store.region,
        access_key_id=read_secret(
            namespace, SecretKeyRef(name=ref.name, key=ref.access_key_id_key)
        ),
        secret_access_key=read_secret(
            namespace, SecretKeyRef(name=ref.name, key=ref.secret_access_key_key)
        ),
    )
    return Destination(folder, bucket=bucket)


def delivery_pending(status: Any) -> bool:
    """Whether the search ended with its final job not done (an operator stopped mid-job)."""
    return status.get("phase") == "Succeeded" and any(
        c.get("type") == "Delivered" and c.get("status") == "Unknown"
        for c in status.get("conditions") or []
    )


def serve_search(body: Any, status: Any, shared: Shared, stopped: StopFlag) -> None:
    """Run the search's dispatch loop until it ends or the daemon is stopped; then its
    final job (also after a restart that found it pending)."""
    if status.get("phase") in FINISHED and not delivery_pending(status):
        return
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    try:
        spec = parse(body)
    except SpecError:
        return  # start_search marks it Failed
    if (spec.workers.gpu_pool is not None and not shared.config.gpu_pools) or (
        refused_by_admin(namespace, spec, shared.config) is not None
    ):
        return  # start_search marks it Failed: nothing may run for it
    key = (namespace, name)
    spec = shared.spec_in_force(key, spec)
    config = SearchConfig(
        namespace=namespace,
        name=name,
        storage_url=secret_or(namespace, spec.storage.secret_ref, shared.config.database_url),
        broker_url=dispatcher_broker(body, spec, shared),
        queue_prefix=shared.config.queue_prefix,
        status_interval=shared.config.status_interval,
        stale_after=shared.config.trial_silence_timeout,
        uid=meta["uid"],
    )

    def latest() -> ArchitectureSearchSpec | str:
        with shared.lock:
            return shared.requested.get(key, spec)

    def where() -> Destination | None:
        return destination(namespace, name, shared.spec_in_force(key, spec))

    kube = ApiKube(body, namespace, name)
    if delivery_pending(status):
        resume_delivery(config, spec, kube, list(status.get("conditions") or []), stopped, where)
        return
    run_search(
        config,
        spec,
        kube,
        stop=stopped,
        generation=meta.get("generation"),
        latest_spec=latest,
        metrics=shared.metrics,
        price_of=lambda worker: shared.price_of(key, worker),
        destination=where,
    )


def dispatcher_broker(body: Any, spec: ArchitectureSearchSpec, shared: Shared) -> str:
    """The broker URL the search's dispatcher uses: the search's own broker Secret, or the
    operator's login on the search's vhost (made first, should the daemon come first)."""
    namespace = body["metadata"]["namespace"]
    if spec.broker.secret_ref is not None:
        return read_secret(namespace, spec.broker.secret_ref)
    broker_identity(body, shared)
    return in_vhost(shared.config.broker_url, search_vhost(body["metadata"]["uid"]))


# --- GPU pools ----------------------------------------------------------------------------


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
        controller = pool_controller(body, pool, vast, rent_request, trainers_per_machine(spec))
        await run_pool(
            controller,
            stopped=stopped,
            interval=shared.config.pool_interval,
            work=lambda: work_from_status(
                dict(body.get("status") or {}), shared.spec_in_force(key, spec), controller.clock()
            ),
            pool=lambda: shared.spec_in_force(key, spec).workers.gpu_pool,
            after_pass=after_pass,
            retried=(*POOL_RETRIED, kubernetes.client.ApiException, aiohttp.ClientError),
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


# --- deletion -----------------------------------------------------------------------------


def delete_search(body: Any, shared: Shared) -> None:
    """Destroy rented machines; delete the queues, the Deployment and the Secrets; the study
    only when asked. The pool whose machines go is the one in force (an edit of it may
    have been refused)."""
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    config = shared.config
    with shared.lock:
        running = shared.in_force.pop((namespace, name), None)
        shared.requested.pop((namespace, name), None)
    try:
        spec: ArchitectureSearchSpec | None = parse(body)
    except SpecError:
        spec = None
    in_force = running or spec
    pool = in_force.workers.gpu_pool if in_force is not None else None
    own_broker = spec is not None and spec.broker.secret_ref is not None
    try:
        if pool is not None and config.gpu_pools:
            asyncio.run(destroy_pool(body, pool, shared))  # kopf's worker thread: no loop
        if own_broker:
            _delete_queues(namespace, name, spec, config)
    finally:
        if not own_broker:
            # Whatever else failed: no broker login of a deleted search may outlive it (the
            # vhost goes with its queues).
            uid = meta["uid"]
            asyncio.run(shared.broker_admin().delete_identity(search_vhost(uid), search_user(uid)))
    apps, core = kubernetes.client.AppsV1Api(), kubernetes.client.CoreV1Api()
    with _absent_is_fine():
        apps.delete_namespaced_deployment(deployment_name(name), namespace)
    with _absent_is_fine():
        core.delete_namespaced_secret(broker_secret_name(name), namespace)
    storage = storage_url(
        secret_or(namespace, spec.storage.secret_ref if spec else None, config.database_url)
    )
    with contextlib.suppress(KeyError):  # no study: nothing ran
        if spec is not None and spec.storage.delete_study_on_delete:
            optuna.delete_study(study_name=study_name(namespace, name), storage=storage)
        else:
            # The study stays as history, with no trial left running: a search created
            # again under this name starts from finished trials only.
            study = optuna.load_study(study_name=study_name(namespace, name), storage=storage)
            end_open_trials(study, "its search was deleted")


def _delete_queues(
    namespace: str, name: str, spec: ArchitectureSearchSpec | None, config: OperatorConfig
) -> None:
    names = QueueNames(study_name(namespace, name), config.queue_prefix)
    broker = config.broker_url
    if spec is not None and spec.broker.secret_ref is not None:
        with contextlib.suppress(kopf.TemporaryError):
            broker = read_secret(namespace, spec.broker.secret_ref)
    try:
        connection = pika.BlockingConnection(pika.URLParameters(broker))
        channel = connection.channel()
        for queue in names.all:
            channel.queue_delete(queue)
        connection.close()
    except pika.exceptions.AMQPError as error:
        raise kopf.TemporaryError(
            f"broker unreachable, queues not deleted: {error!r}", delay=10
        ) from error


@contextlib.contextmanager
def _absent_is_fine() -> Any:
    try:
        yield
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise


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
    """Destroy, now and then, instances whose search is gone, with every key known."""
    while True:
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
        await asyncio.sleep(shared.config.orphan_sweep_interval)


def start_sweeper(shared: Shared) -> None:
    """Start the orphan sweep in the operator's loop (unless its interval is 0)."""
    if shared.config.gpu_pools and shared.config.orphan_sweep_interval > 0:
        shared.sweeper = asyncio.create_task(sweep_forever(shared))


async def stop_sweeper(shared: Shared) -> None:
    if shared.sweeper is not None:
        shared.sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await shared.sweeper
