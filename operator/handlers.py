"""kopf glue: each handler parses what kopf hands it and calls one plain function.

* create/resume: check the spec (a bad one ends the search as Failed, with the message),
  create the broker Secret and the trainer Deployment (adopted, so they go with it);
* daemon: one per search, :func:`~mloptimizer.operator.daemon.run_search` in kopf's
  thread, stopped on deletion or operator shutdown;
* gpu-pool daemon: for a search with ``workers.gpuPool``, a
  :class:`~mloptimizer.operator.pool.PoolController` pass every ``--pool-interval``;
* update: budget, parallelism, workers and training take effect at once; dataset,
  objective, sampler and search space (and a pool's mode and Secrets) cannot change under
  a running study and are refused with a Degraded condition while the search goes on with
  the old spec;
* delete (finalizer): rented machines are destroyed; queues, Deployment and Secrets go;
  the study stays unless ``storage.deleteStudyOnDelete``;
* startup: an orphan sweep of Vast.ai instances whose search is gone.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
import kubernetes
import optuna
import pika
import pika.exceptions

from mloptimizer.checks import space_issues
from mloptimizer.loading import SpecError, parse_search
from mloptimizer.messages import QueueNames
from mloptimizer.operator.brokeradmin import (
    BrokerAdmin,
    admin_url_for,
    scoped_permissions,
    scoped_url,
    search_user,
    vhost_of,
)
from mloptimizer.operator.builders import (
    BROKER_SECRET_KEY,
    CACHE_DIR,
    GRACE_SECONDS,
    broker_secret_name,
    build_broker_secret,
    build_pool_broker_secret,
    build_trainer_deployment,
    deployment_name,
    pool_broker_secret_name,
    trainer_labels,
    trainers_per_machine,
)
from mloptimizer.operator.config import OperatorConfig
from mloptimizer.operator.daemon import SearchConfig, run_search
from mloptimizer.operator.metrics import Metrics
from mloptimizer.operator.pool import (
    PoolController,
    PoolState,
    burn_rate,
    direct_rent_request,
    machine_id_of_worker,
    node_rent_request,
    spent_usd,
    sweep_orphans,
    work_from_status,
)
from mloptimizer.operator.poolkube import ApiPoolKube
from mloptimizer.operator.progress import now_rfc3339, set_condition
from mloptimizer.operator.vastai import VastClient, VastError
from mloptimizer.spec import ArchitectureSearchSpec, GpuPool, SecretKeyRef
from mloptimizer.study import fingerprint, storage_url, study_name

GROUP, VERSION, PLURAL = "mloptimizer.io", "v1alpha1", "architecturesearches"
FINISHED = ("Succeeded", "Failed")

log = logging.getLogger(__name__)


@dataclass
class Shared:
    """What the handlers of all searches share (kopf's ``memo``)."""

    config: OperatorConfig
    metrics: Metrics | None = None
    specs: dict[tuple[str, str], ArchitectureSearchSpec] = field(default_factory=dict)
    refusals: dict[tuple[str, str], str] = field(default_factory=dict)
    # GPU pools: machine name -> USD/hour per search, and the Vast.ai keys seen (by search
    # uid), so deletion and the orphan sweep work even once a search's Secret is gone
    prices: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    vast_keys: dict[str, str] = field(default_factory=dict, repr=False)
    sweeper: asyncio.Task[None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def broker_admin(self) -> BrokerAdmin:
        """The RabbitMQ management API, for Direct-mode pools' broker users."""
        return BrokerAdmin(self.config.broker_admin_url or admin_url_for(self.config.broker_url))

    def price_of(self, key: tuple[str, str], worker_id: str) -> float | None:
        """USD/hour of the rented machine ``worker_id`` runs on, if it is one."""
        machine = machine_id_of_worker(worker_id)
        with self.lock:
            return self.prices.get(key, {}).get(machine) if machine else None


def configure(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """kopf settings: state in annotations (the status schema is ours), quiet events."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="mloptimizer.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="mloptimizer.io", key="last-handled-configuration"
    )
    settings.persistence.finalizer = "mloptimizer.io/finalizer"
    settings.posting.level = logging.WARNING
    settings.peering.standalone = config.peering is None
    if config.peering:
        settings.peering.name = config.peering
    settings.watching.server_timeout = 300
    # The dispatch loop checks its stop flag every 0.2 s: wait for that, not for polling.
    settings.background.instant_exit_timeout = 0.5


def _shared(memo: Any) -> Shared:
    shared: Shared = memo.shared
    return shared


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    configure(settings, _shared(memo).config)
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        # KUBECONFIG as set now, not as it was when the kubernetes package was imported
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=os.environ.get("KUBECONFIG")
        )


# --- plain functions the handlers call --------------------------------------------------


def parse(body: Any) -> ArchitectureSearchSpec:
    """The typed spec of a resource body, or SpecError with every problem."""
    document = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ArchitectureSearch",
        "metadata": {"name": body["metadata"]["name"]},
        "spec": dict(body.get("spec") or {}),
    }
    return parse_search(
        document, source=f"{body['metadata'].get('namespace')}/{body['metadata']['name']}"
    ).spec


def read_secret(namespace: str, ref: SecretKeyRef) -> str:
    """The value of a Secret key, or kopf.PermanentError naming what is missing."""
    api = kubernetes.client.CoreV1Api()
    try:
        secret = api.read_namespaced_secret(ref.name, namespace)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            raise kopf.TemporaryError(
                f"Secret {namespace}/{ref.name} not found; create it with key {ref.key}",
                delay=30,
            ) from error
        raise
    data = secret.data or {}
    if ref.key not in data:
        raise kopf.TemporaryError(
            f"Secret {namespace}/{ref.name} has no key {ref.key!r} (keys: {sorted(data)})",
            delay=30,
        )
    return base64.b64decode(data[ref.key]).decode()


def broker_ref(name: str, spec: ArchitectureSearchSpec) -> SecretKeyRef:
    """The Secret key the trainers read the broker URL from."""
    if spec.broker.secret_ref is not None:
        return spec.broker.secret_ref
    return SecretKeyRef(name=broker_secret_name(name), key=BROKER_SECRET_KEY)


def _create(body: dict[str, Any], owner: Any, create: Any) -> None:
    kopf.adopt(body, owner=owner)
    try:
        create(body)
    except kubernetes.client.ApiException as error:
        if error.status != 409:  # already there: creating is idempotent
            raise


def pool_uid(spec: ArchitectureSearchSpec, uid: str) -> str | None:
    """The uid the trainer pods select rented nodes by: set in Node mode only."""
    pool = spec.workers.gpu_pool
    return uid if pool is not None and pool.mode == "Node" else None


def ensure_children(
    owner: Any, namespace: str, name: str, spec: ArchitectureSearchSpec, config: OperatorConfig
) -> None:
    """Create the broker Secret (when the search names none) and the trainer Deployment."""
    core, apps = kubernetes.client.CoreV1Api(), kubernetes.client.AppsV1Api()
    if spec.broker.secret_ref is None:
        secret = build_broker_secret(name, config.broker_url)
        _create(secret, owner, lambda b: core.create_namespaced_secret(namespace, b))
    deployment = build_trainer_deployment(
        name,
        namespace,
        spec,
        replicas=spec.workers.min_replicas,
        broker=broker_ref(name, spec),
        queue_prefix=config.queue_prefix,
        pool_uid=pool_uid(spec, owner["metadata"]["uid"]),
    )
    _create(deployment, owner, lambda b: apps.create_namespaced_deployment(namespace, b))


class ApiKube:
    """:class:`~mloptimizer.operator.daemon.Kube` over the Kubernetes API."""

    def __init__(self, body: Any, namespace: str, name: str) -> None:
        self.body = body
        self.namespace = namespace
        self.name = name

    def patch_status(self, patch: dict[str, Any]) -> None:
        kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, self.name, {"status": patch}
        )

    def scale(self, replicas: int) -> None:
        kubernetes.client.AppsV1Api().patch_namespaced_deployment_scale(
            deployment_name(self.name), self.namespace, {"spec": {"replicas": replicas}}
        )

    def event(self, type_: str, reason: str, message: str) -> None:
        kopf.event(self.body, type=type_, reason=reason, message=message[:1024])

    def ready_replicas(self) -> int:
        try:
            deployment = kubernetes.client.AppsV1Api().read_namespaced_deployment_status(
                deployment_name(self.name), self.namespace
            )
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return 0
            raise
        return int((deployment.status and deployment.status.ready_replicas) or 0)


def fail_search(patch: kopf.Patch, status: Any, message: str) -> None:
    """End a search whose spec cannot run, saying why."""
    conditions = list(status.get("conditions") or [])
    conditions = set_condition(conditions, "Ready", "False", "InvalidSpec", message)
    conditions = set_condition(conditions, "Complete", "True", "InvalidSpec", message)
    patch.status["phase"] = "Failed"
    patch.status["message"] = message[:4096]
    patch.status["conditions"] = conditions
    patch.status["completionTime"] = now_rfc3339()


# --- handlers -------------------------------------------------------------------------


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
def on_create(
    *,
    body: Any,
    status: Any,
    namespace: str | None,
    name: str,
    memo: Any,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    assert namespace is not None  # a namespaced resource
    if status.get("phase") in FINISHED:
        return
    shared = _shared(memo)
    try:
        spec = parse(body)
        errors = space_issues(spec)[0]
        if errors:
            raise SpecError(f"{namespace}/{name}", errors)
    except SpecError as error:
        fail_search(patch, status, str(error))
        kopf.warn(body, reason="InvalidSpec", message=str(error)[:1024])
        return
    with shared.lock:
        shared.specs[(namespace, name)] = spec
    ensure_children(body, namespace, name, spec, shared.config)
    if not status.get("phase"):
        patch.status["phase"] = "Pending"
        patch.status["studyName"] = study_name(namespace, name)


@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_update(
    *,
    old: Any,
    new: Any,
    namespace: str | None,
    name: str,
    uid: str,
    memo: Any,
    status: Any,
    **_: Any,
) -> None:
    assert namespace is not None
    if status.get("phase") in FINISHED:
        return
    shared = _shared(memo)
    key = (namespace, name)
    try:
        spec = parse({"metadata": {"name": name, "namespace": namespace}, "spec": new})
        running = shared.specs.get(key) or parse(
            {"metadata": {"name": name, "namespace": namespace}, "spec": old}
        )
    except SpecError as error:
        with shared.lock:
            shared.refusals[key] = (
                f"the new spec is invalid, the search goes on with the old: {error}"
            )
        return
    before, after = fingerprint(running), fingerprint(spec)
    changed = sorted(k for k in after if before[k] != after[k])
    pool_change = pool_shape(running) != pool_shape(spec)
    with shared.lock:
        if changed:
            shared.refusals[key] = (
                f"{', '.join('spec.' + c for c in changed)} cannot change while the study runs "
                "(its trials would not compare); the search goes on with the old values: "
                "restore them, or create a new ArchitectureSearch"
            )
            return
        if pool_change:
            shared.refusals[key] = (
                "spec.workers.gpuPool cannot be added, removed or change mode or Secrets "
                "while the search runs (its machines would be orphaned or unusable); the "
                "search goes on with the old pool: restore it, or create a new "
                "ArchitectureSearch"
            )
            return
        shared.specs[key] = spec
        shared.refusals.pop(key, None)
    apps = kubernetes.client.AppsV1Api()
    deployment = build_trainer_deployment(
        name,
        namespace,
        spec,
        replicas=spec.workers.min_replicas,
        broker=broker_ref(name, spec),
        queue_prefix=shared.config.queue_prefix,
        pool_uid=pool_uid(spec, uid),
    )
    # the template follows the spec; replicas stay the daemon's
    apps.patch_namespaced_deployment(
        deployment_name(name), namespace, {"spec": {"template": deployment["spec"]["template"]}}
    )


# Graceful first: the loop sees `stopped` within a fraction of a second and returns.
@kopf.daemon(
    GROUP,
    VERSION,
    PLURAL,
    cancellation_backoff=30.0,
    cancellation_timeout=30.0,
    cancellation_polling=1.0,
)
def search_daemon(
    *,
    stopped: kopf.DaemonStopped,
    body: Any,
    status: Any,
    meta: Any,
    namespace: str | None,
    name: str,
    memo: Any,
    **_: Any,
) -> None:
    assert namespace is not None
    if status.get("phase") in FINISHED:
        return
    shared = _shared(memo)
    try:
        spec = parse(body)
    except SpecError:
        return  # the create handler marks it Failed
    if space_issues(spec)[0]:
        return  # likewise
    with shared.lock:
        shared.specs.setdefault((namespace, name), spec)
    storage = (
        read_secret(namespace, spec.storage.secret_ref)
        if spec.storage.secret_ref
        else shared.config.database_url
    )
    broker = (
        read_secret(namespace, spec.broker.secret_ref)
        if spec.broker.secret_ref
        else shared.config.broker_url
    )
    config = SearchConfig(
        namespace=namespace,
        name=name,
        storage_url=storage,
        broker_url=broker,
        queue_prefix=shared.config.queue_prefix,
        status_interval=shared.config.status_interval,
        stale_after=shared.config.trial_silence_timeout,
    )
    key = (namespace, name)

    def latest() -> tuple[ArchitectureSearchSpec, str | None]:
        with shared.lock:
            return shared.specs.get(key, spec), shared.refusals.get(key)

    run_search(
        config,
        spec,
        ApiKube(body, namespace, name),
        stop=stopped,
        generation=meta.get("generation"),
        latest_spec=latest,
        metrics=shared.metrics,
        price_of=lambda worker: shared.price_of(key, worker),
    )


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


def pool_shape(spec: ArchitectureSearchSpec) -> tuple[Any, ...] | None:
    """What of a GPU pool cannot change under a running search (bounds and caps can)."""
    pool = spec.workers.gpu_pool
    if pool is None:
        return None
    return (pool.mode, pool.api_key_secret_ref, pool.join_secret_ref, pool.broker_endpoint)


def ensure_pool_password(owner: Any, namespace: str, name: str) -> str:
    """The Direct-mode broker password of a search: made once, kept in an owned Secret."""
    core = kubernetes.client.CoreV1Api()
    secret_name = pool_broker_secret_name(name)
    _create(
        build_pool_broker_secret(name, secrets.token_urlsafe(24)),
        owner,
        lambda b: core.create_namespaced_secret(namespace, b),
    )  # 409 (it exists) keeps the password the trainers already use
    found = core.read_namespaced_secret(secret_name, namespace)
    return base64.b64decode((found.data or {})["password"]).decode()


async def pool_rent_request(
    body: Any, namespace: str, name: str, uid: str, spec: ArchitectureSearchSpec, shared: Shared
) -> Any:
    """The ``PUT /asks/`` body builder of a search's pool, with its secrets resolved."""
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
    password = await asyncio.to_thread(ensure_pool_password, body, namespace, name)
    admin = shared.broker_admin()
    names = QueueNames(study_name(namespace, name), shared.config.queue_prefix)
    await admin.ensure_user(
        search_user(uid), password, vhost_of(pool.broker_endpoint), scoped_permissions(names)
    )
    url = scoped_url(pool.broker_endpoint, search_user(uid), password)
    return lambda machine: direct_rent_request(
        pool,
        machine,
        image=spec.workers.image,
        broker_url=url,
        search=study_name(namespace, name),
        queue_prefix=shared.config.queue_prefix,
        grace_seconds=GRACE_SECONDS,
        cache_dir=CACHE_DIR,
    )


# Not filtered with `when=`: kopf would stop the daemon on an edit removing gpuPool, which
# on_update refuses, and leave the machines running.
@kopf.daemon(GROUP, VERSION, PLURAL, id="gpu-pool", cancellation_timeout=30.0)
async def pool_daemon(
    *,
    stopped: kopf.DaemonStopped,
    body: Any,
    namespace: str | None,
    name: str,
    uid: str,
    memo: Any,
    **_: Any,
) -> None:
    """Keep a search's rented machines in line with its work until it ends."""
    assert namespace is not None
    shared = _shared(memo)
    key = (namespace, name)
    try:
        spec = parse(body)
    except SpecError:
        return  # the create handler marks it Failed
    with shared.lock:
        spec = shared.specs.get(key, spec)  # the spec in force, should an edit be refused
    pool = spec.workers.gpu_pool
    if pool is None:
        return
    api_key = await asyncio.to_thread(read_secret, namespace, pool.api_key_secret_ref)
    with shared.lock:
        shared.vast_keys[uid] = api_key
    rent_request = await pool_rent_request(body, namespace, name, uid, spec, shared)
    async with VastClient(api_key, url=shared.config.vastai_url) as vast:
        controller = pool_controller(body, pool, vast, rent_request, trainers_per_machine(spec))
        while not stopped:
            with shared.lock:
                latest = shared.specs.get(key, spec)
            controller.pool = latest.workers.gpu_pool or pool  # live edits of the bounds
            work = work_from_status(dict(body.get("status") or {}), latest, controller.clock())
            try:
                await controller.reconcile(work)
            except Exception as error:  # Vast.ai or the API down: the next pass retries
                log.warning("pool of %s/%s: %s: %s", namespace, name, type(error).__name__, error)
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
            if work.ended and not any(m.state != "Destroyed" for m in controller.status.machines):
                return
            await stopped.wait(shared.config.pool_interval)


async def destroy_pool(body: Any, namespace: str, name: str, pool: GpuPool, shared: Shared) -> None:
    """Destroy every machine a search rented, and its scoped broker user."""
    uid = body["metadata"]["uid"]
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
    if pool.mode == "Direct":
        await shared.broker_admin().delete_user(search_user(uid))
    with shared.lock:
        shared.prices.pop((namespace, name), None)


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


@kopf.on.startup()
async def start_sweeper(memo: Any, **_: Any) -> None:
    shared = _shared(memo)
    if shared.config.orphan_sweep_interval > 0:
        shared.sweeper = asyncio.create_task(sweep_forever(shared))


@kopf.on.cleanup()
async def stop_sweeper(memo: Any, **_: Any) -> None:
    shared = _shared(memo)
    if shared.sweeper is not None:
        shared.sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await shared.sweeper


@kopf.on.delete(GROUP, VERSION, PLURAL)
def on_delete(*, body: Any, namespace: str | None, name: str, memo: Any, **_: Any) -> None:
    assert namespace is not None
    shared = _shared(memo)
    with shared.lock:
        running = shared.specs.pop((namespace, name), None)
        shared.refusals.pop((namespace, name), None)
    cleanup(body, namespace, name, shared, running)


def cleanup(
    body: Any,
    namespace: str,
    name: str,
    shared: Shared,
    running: ArchitectureSearchSpec | None = None,
) -> None:
    """Destroy rented machines; delete the queues, the Deployment and the Secrets; the
    study only when asked. ``running`` is the spec in force (an edit may have been
    refused): its pool is the one whose machines go."""
    config = shared.config
    try:
        spec: ArchitectureSearchSpec | None = parse(body)
    except SpecError:
        spec = None
    in_force = running or spec
    pool = in_force.workers.gpu_pool if in_force is not None else None
    if pool is not None:
        asyncio.run(destroy_pool(body, namespace, name, pool, shared))  # kopf's worker thread
    names = QueueNames(study_name(namespace, name), config.queue_prefix)
    broker = config.broker_url
    if spec is not None and spec.broker.secret_ref is not None:
        with contextlib.suppress(kopf.TemporaryError):
            broker = read_secret(namespace, spec.broker.secret_ref)
    try:
        connection = pika.BlockingConnection(pika.URLParameters(broker))
        channel = connection.channel()
        for queue in (names.trials, names.progress, names.results, names.dead_letters):
            channel.queue_delete(queue)
        connection.close()
    except pika.exceptions.AMQPError as error:
        raise kopf.TemporaryError(
            f"broker unreachable, queues not deleted: {error!r}", delay=10
        ) from error
    apps, core = kubernetes.client.AppsV1Api(), kubernetes.client.CoreV1Api()
    try:
        apps.delete_namespaced_deployment(deployment_name(name), namespace)
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise
    for secret in (broker_secret_name(name), pool_broker_secret_name(name)):
        try:
            core.delete_namespaced_secret(secret, namespace)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise
    if spec is not None and spec.storage.delete_study_on_delete:
        storage = (
            read_secret(namespace, spec.storage.secret_ref)
            if spec.storage.secret_ref
            else config.database_url
        )
        with contextlib.suppress(KeyError):
            optuna.delete_study(
                study_name=study_name(namespace, name), storage=storage_url(storage)
            )
