"""A search's life in the operator, as plain functions the kopf handlers call one each.

* :func:`start_search` (create/resume): check the spec (a bad one ends the search as
  Failed, with the message), create the broker Secret, the trainers' NetworkPolicy and the
  trainer Deployment (owned by the search's uid, so they go with it; a name taken by an
  object the search does not own fails it with ``NameConflict``, that object untouched);
* :func:`update_search`: note the edited spec for the search's daemon, which applies what
  may change (:func:`mloptimizer.changes.refusal`); the Deployment's whole pod template
  (and the NetworkPolicy) is replaced by what an accepted edit implies, at once;
* :func:`serve_search`: the search's daemon, :func:`~mloptimizer.operator.daemon.run_search`
  in kopf's worker thread, stopped on deletion or operator shutdown;
* :func:`~mloptimizer.operator.poolwiring.serve_pool`: for a search with
  ``workers.gpuPool``, its pool's loop (in :mod:`~mloptimizer.operator.poolwiring`, with
  the orphan sweep of Vast.ai instances whose search is gone);
* :func:`delete_search` (finalizer): rented machines are destroyed (and a Direct pool's
  broker user deleted, whatever else fails); queues go, and the Deployment, broker Secret
  and NetworkPolicy when they are the search's own (never an object it does not own);
  the study stays unless ``storage.deleteStudyOnDelete``.

What every handler shares (kopf's memo, the spec parse, the broker identity) is
:mod:`~mloptimizer.operator.shared`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from typing import Any

import kopf
import kubernetes
import optuna
import pika.exceptions

from mloptimizer.broker import delete_queues
from mloptimizer.changes import refusal
from mloptimizer.loading import SpecError
from mloptimizer.messages import DeliveredMessage, QueueNames
from mloptimizer.operator.brokeradmin import in_vhost, search_user, search_vhost
from mloptimizer.operator.builders import (
    BROKER_SECRET_KEY,
    POOL_LABEL,
    broker_secret_name,
    build_trainer_deployment,
    build_trainer_policy,
    deployment_name,
    network_policy_name,
    pod_price,
)
from mloptimizer.operator.claimverify import Checked, verify_claim
from mloptimizer.operator.config import OperatorConfig
from mloptimizer.operator.daemon import SearchConfig, StopFlag, resume_delivery, run_search
from mloptimizer.operator.delivery import Destination
from mloptimizer.operator.kube import ApiKube
from mloptimizer.operator.objectstore import Bucket
from mloptimizer.operator.poolwiring import destroy_pool
from mloptimizer.operator.progress import now_rfc3339, set_condition
from mloptimizer.operator.secretrefs import (
    FOR_TRAINERS,
    ClaimNotUsable,
    SecretNotUsable,
    check_claim,
    claim_refs,
    purpose_of,
    read_secret,
    secret_or,
    secret_refs,
)
from mloptimizer.operator.shared import (
    NameConflict,
    Shared,
    broker_identity,
    create_owned,
    delete_children,
    owned_by,
    parse,
    replace_owned,
)
from mloptimizer.spec import ArchitectureSearchSpec, SecretKeyRef
from mloptimizer.study import end_open_trials, storage_url, study_name

__all__ = [
    "FINISHED",
    "Shared",
    "delete_search",
    "delivery_pending",
    "destination",
    "image_allowed",
    "placement_refusal",
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
    try:
        create_children(body, spec, shared)
    except NameConflict as error:
        kopf.warn(body, reason="NameConflict", message=str(error))
        return _failed(status, str(error), reason="NameConflict")
    if status.get("phase"):
        return {}
    return {"phase": "Pending", "studyName": study_name(namespace, name)}


def create_children(body: Any, spec: ArchitectureSearchSpec, shared: Shared) -> None:
    """The broker Secret (when the operator makes the identity), the trainers'
    NetworkPolicy and the trainer Deployment, each owned by the search; NameConflict when a
    name is taken by an object it does not own."""
    namespace = body["metadata"]["namespace"]
    if spec.broker.secret_ref is None:
        broker_identity(body, shared)
    policy = trainer_policy(body, spec, shared.config)
    networking = kubernetes.client.NetworkingV1Api()
    try:
        create_owned(
            policy,
            body,
            lambda b: networking.create_namespaced_network_policy(namespace, b),
            lambda: networking.read_namespaced_network_policy(
                policy["metadata"]["name"], namespace
            ),
        )
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise
        # no networking.k8s.io API served: said, not hidden (every real cluster serves it)
        message = "NetworkPolicies are not served by this API server: trainers are not fenced"
        kopf.warn(body, reason="NetworkPolicyUnavailable", message=message)
    deployment = trainer_deployment(body, spec, shared.config)
    apps = kubernetes.client.AppsV1Api()
    create_owned(
        deployment,
        body,
        lambda b: apps.create_namespaced_deployment(namespace, b),
        lambda: apps.read_namespaced_deployment(deployment["metadata"]["name"], namespace),
    )


def trainer_policy(
    body: Any, spec: ArchitectureSearchSpec, config: OperatorConfig
) -> dict[str, Any]:
    """The NetworkPolicy of the search's trainers (the broker's address from the URL they
    get: the operator's broker, or the search's own)."""
    broker_url = config.broker_url
    if spec.broker.secret_ref is not None:
        with contextlib.suppress(kopf.TemporaryError):
            broker_url = read_secret(
                body["metadata"]["namespace"], spec.broker.secret_ref, FOR_TRAINERS
            )
    return build_trainer_policy(
        body["metadata"]["name"],
        spec,
        broker_url=broker_url,
        trainer_egress=config.trainer_egress,
        object_store_egress=config.object_store_egress,
    )


def image_allowed(image: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``image`` is one of the admin's ``prefixes``, anchored: the prefix is the
    whole repository or ends at ``/``, ``:`` or ``@`` (``registry.example.com`` admits
    ``registry.example.com/x``, never ``registry.example.com.evil.io/x``)."""
    if not prefixes:
        return True
    for prefix in prefixes:
        if not image.startswith(prefix):
            continue
        rest = image[len(prefix) :]
        if prefix.endswith(("/", ":", "@")) or not rest or rest[0] in "/:@":
            return True
    return False


# Node labels and taints no search may select or tolerate: the control plane's, and those
# of the machines rented for a search (each pool's own are added by the operator).
RESERVED_NODE_KEYS = (
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
    POOL_LABEL,
)


def placement_refusal(spec: ArchitectureSearchSpec) -> str | None:
    """Why ``workers.nodeSelector``/``tolerations`` could land trainers on a control-plane
    node or another search's rented node, or None."""
    for key in spec.workers.node_selector:
        if key in RESERVED_NODE_KEYS:
            return (
                f"spec.workers.nodeSelector: key {key!r} selects control-plane or rented "
                "nodes, where no trainer may run; remove it"
            )
    for index, toleration in enumerate(spec.workers.tolerations):
        key = toleration.key or ""
        if key in RESERVED_NODE_KEYS:
            return (
                f"spec.workers.tolerations[{index}]: tolerating {key!r} lets trainers onto "
                "control-plane or rented nodes; remove it"
            )
        if not key and toleration.operator == "Exists":
            return (
                f"spec.workers.tolerations[{index}]: an empty key with operator Exists "
                "tolerates every taint, control-plane and rented nodes included; name the "
                "taint's key"
            )
    return None


def refused_by_admin(
    namespace: str, spec: ArchitectureSearchSpec, config: OperatorConfig
) -> tuple[str, str] | None:
    """``(reason, message)`` when the admin's settings refuse the spec, else None: a trainer
    image outside ``allowedImages``, a placement on reserved nodes, or a Secret or claim not
    opened to searches for its use."""
    image = spec.workers.trainer_image
    if not image_allowed(image, config.allowed_images):
        allowed = ", ".join(config.allowed_images)
        return (
            "ImageNotAllowed",
            f"spec.workers.image: {image!r} is not allowed in this cluster; use an image "
            f"from one of: {allowed}",
        )
    placement = placement_refusal(spec)
    if placement is not None:
        return "PlacementNotAllowed", placement
    for field_path, ref in secret_refs(spec):
        try:
            read_secret(namespace, ref, purpose_of(field_path))
        except SecretNotUsable as error:
            return "SecretNotUsable", f"{field_path}: {error}"
    for field_path, claim in claim_refs(spec):
        try:
            check_claim(namespace, claim)
        except ClaimNotUsable as error:
            return "ClaimNotUsable", f"{field_path}: {error}"
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
    # The whole pod template the spec implies replaces the old (a strategic merge would
    # keep a removed nodeSelector key, toleration or GPU limit); replicas stay the daemon's.
    uid = body["metadata"]["uid"]
    apps = kubernetes.client.AppsV1Api()
    template = trainer_deployment(body, spec, shared.config)["spec"]["template"]
    replace_owned(
        uid,
        lambda: apps.read_namespaced_deployment(deployment_name(name), namespace),
        lambda ops: apps.patch_namespaced_deployment(deployment_name(name), namespace, ops),
        "/spec/template",
        template,
    )
    networking = kubernetes.client.NetworkingV1Api()
    policy = trainer_policy(body, spec, shared.config)
    with _absent_is_fine():
        replace_owned(
            uid,
            lambda: networking.read_namespaced_network_policy(network_policy_name(name), namespace),
            lambda ops: networking.patch_namespaced_network_policy(
                network_policy_name(name), namespace, ops
            ),
            "/spec",
            policy["spec"],
        )


# --- the search's daemon ----------------------------------------------------------------


def destination(
    namespace: str,
    name: str,
    spec: ArchitectureSearchSpec,
    check: Callable[[str, str, DeliveredMessage], Checked] | None = None,
) -> Destination | None:
    """Where the search's best model goes (``spec.output``), its bucket key read now;
    ``check(claim, folder, delivered)``: a claim's verify Job (none: unverified)."""
    output = spec.output
    folder = output.destination_path(namespace, name)
    if output.pvc is not None:
        claim = output.pvc.claim_name
        return Destination(
            folder,
            claim=claim,
            check_claim=None if check is None else functools.partial(check, claim, folder),
        )
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
    try:
        foreign_trainers(namespace, name, meta["uid"])
        broker_url = dispatcher_broker(body, spec, shared)
    except NameConflict:
        return  # start_search marks it Failed: a child's name is taken
    config = SearchConfig(
        namespace=namespace,
        name=name,
        storage_url=secret_or(namespace, spec.storage.secret_ref, shared.config.database_url),
        broker_url=broker_url,
        queue_prefix=shared.config.queue_prefix,
        status_interval=shared.config.status_interval,
        stale_after=shared.config.trial_silence_timeout,
        uid=meta["uid"],
    )

    def latest() -> ArchitectureSearchSpec | str:
        with shared.lock:
            return shared.requested.get(key, spec)

    kube = ApiKube(body, namespace, name)
    image = shared.config.verify_image

    def check(claim: str, folder: str, delivered: DeliveredMessage) -> Checked:
        assert image is not None
        return verify_claim(
            name, delivered, claim=claim, folder=folder, image=image, api=kube, stop=stopped
        )

    def where() -> Destination | None:
        return destination(
            namespace, name, shared.spec_in_force(key, spec), check if image else None
        )

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
        price_of=lambda worker: pod_price(shared.price_of(key, worker), spec),
        destination=where,
    )


def foreign_trainers(namespace: str, name: str, uid: str) -> None:
    """NameConflict when a Deployment under the trainers' name is not this search's (the
    daemon may start before the create handler has found that out)."""
    apps = kubernetes.client.AppsV1Api()
    with _absent_is_fine():
        found = apps.read_namespaced_deployment(deployment_name(name), namespace)
        if not owned_by(found, uid):
            raise NameConflict("Deployment", namespace, deployment_name(name))


def dispatcher_broker(body: Any, spec: ArchitectureSearchSpec, shared: Shared) -> str:
    """The broker URL the search's dispatcher uses: the search's own broker Secret, or the
    operator's login on the search's vhost (made first, should the daemon come first)."""
    namespace = body["metadata"]["namespace"]
    if spec.broker.secret_ref is not None:
        return read_secret(namespace, spec.broker.secret_ref, FOR_TRAINERS)
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
    delete_children(namespace, name, meta["uid"])
    try:
        storage = storage_url(
            secret_or(namespace, spec.storage.secret_ref if spec else None, config.database_url)
        )
    except SecretNotUsable as error:  # its study was never reachable: nothing ran there
        log.warning("%s/%s deleted; its study is left as it was: %s", namespace, name, error)
        return
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
            broker = read_secret(namespace, spec.broker.secret_ref, FOR_TRAINERS)
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
