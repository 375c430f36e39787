"""A search's life in the operator, as plain functions the kopf handlers call one each.

* :func:`start_search` (create/resume): check the spec (a bad one ends the search as
  Failed, with the message), create the broker Secret and the trainer Deployment (adopted,
  so they go with it);
* :func:`update_search`: note the edited spec for the search's daemon, which applies what
  may change (:func:`mloptimizer.changes.refusal`); the Deployment template follows an
  accepted edit at once;
* :func:`serve_search`: the search's daemon, :func:`~mloptimizer.operator.daemon.run_search`
  in kopf's worker thread, stopped on deletion or operator shutdown;
* :func:`~mloptimizer.operator.poolwiring.serve_pool`: for a search with
  ``workers.gpuPool``, its pool's loop (in :mod:`~mloptimizer.operator.poolwiring`, with
  the orphan sweep of Vast.ai instances whose search is gone);
* :func:`delete_search` (finalizer): rented machines are destroyed (and a Direct pool's
  broker user deleted, whatever else fails); queues, Deployment and Secrets go; the study
  stays unless ``storage.deleteStudyOnDelete``.

What every handler shares (kopf's memo, the spec parse, the broker identity) is
:mod:`~mloptimizer.operator.shared`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf
import kubernetes
import optuna
import pika.exceptions

from mloptimizer.broker import delete_queues
from mloptimizer.changes import refusal
from mloptimizer.loading import SpecError
from mloptimizer.messages import QueueNames
from mloptimizer.operator.brokeradmin import in_vhost, search_user, search_vhost
from mloptimizer.operator.builders import (
    BROKER_SECRET_KEY,
    broker_secret_name,
    build_trainer_deployment,
    deployment_name,
)
from mloptimizer.operator.config import OperatorConfig
from mloptimizer.operator.daemon import SearchConfig, StopFlag, resume_delivery, run_search
from mloptimizer.operator.delivery import Destination
from mloptimizer.operator.kube import ApiKube
from mloptimizer.operator.objectstore import Bucket
from mloptimizer.operator.poolwiring import destroy_pool
from mloptimizer.operator.progress import now_rfc3339, set_condition
from mloptimizer.operator.secretrefs import SecretNotUsable, read_secret, secret_or, secret_refs
from mloptimizer.operator.shared import Shared, broker_identity, create_adopted, parse
from mloptimizer.spec import ArchitectureSearchSpec, SecretKeyRef
from mloptimizer.study import end_open_trials, storage_url, study_name

__all__ = [
    "FINISHED",
    "Shared",
    "delete_search",
    "delivery_pending",
    "destination",
    "serve_search",
    "start_search",
    "update_search",
]

FINISHED = ("Succeeded", "Failed")

log = logging.getLogger(__name__)

# --- the spec ---------------------------------------------------------------------------


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
    create_adopted(deployment, body, lambda b: apps.create_namespaced_deployment(namespace, b))
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
    broker = config.broker_url
    if spec is not None and spec.broker.secret_ref is not None:
        with contextlib.suppress(kopf.TemporaryError):
            broker = read_secret(namespace, spec.broker.secret_ref)
    try:
        delete_queues(broker, QueueNames(study_name(namespace, name), config.queue_prefix))
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
