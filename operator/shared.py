"""What the handlers of every search share: kopf's memo (:class:`Shared`), the typed spec
of a resource body, owned children and the search's broker identity.

Objects are the search's by owner uid, never by name: a child found under its name without
an owner reference to this search's uid is someone else's (another search's, a user's, an
attacker's), so it is neither adopted, patched, scaled nor deleted; the search fails with a
``NameConflict`` naming it (:class:`NameConflict`). :func:`create_owned`,
:func:`replace_owned` and :func:`delete_children` are the only ways children are written.

Both :mod:`~mloptimizer.operator.lifecycle` (a search's life) and
:mod:`~mloptimizer.operator.poolwiring` (its GPU pool) stand on these.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf
import kubernetes

from mloptimizer.checks import space_issues
from mloptimizer.loading import SpecError, parse_search
from mloptimizer.messages import QueueNames
from mloptimizer.operator.brokeradmin import (
    BrokerAdmin,
    admin_url_for,
    scoped_url,
    search_user,
    search_vhost,
)
from mloptimizer.operator.builders import (
    BROKER_PASSWORD_KEY,
    broker_secret_name,
    build_broker_secret,
    deployment_name,
    network_policy_name,
)
from mloptimizer.operator.config import OperatorConfig
from mloptimizer.operator.metrics import Metrics
from mloptimizer.operator.pool import machine_id_of_worker
from mloptimizer.spec import API_VERSION, KIND, ArchitectureSearchSpec
from mloptimizer.study import study_name

__all__ = [
    "Key",
    "NameConflict",
    "Shared",
    "broker_identity",
    "create_owned",
    "delete_children",
    "owned_by",
    "parse",
    "replace_owned",
]

Key = tuple[str, str]  # (namespace, name)

log = logging.getLogger(__name__)


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


class NameConflict(kopf.PermanentError):
    """A child's name is taken by an object this search does not own."""

    def __init__(self, kind: str, namespace: str, name: str) -> None:
        super().__init__(
            f"{kind} {namespace}/{name} exists and is not this search's (no owner reference "
            f"to its uid): the operator leaves it untouched; delete or rename that {kind}, or "
            "give the search another name"
        )


def owned_by(obj: Any, uid: str) -> bool:
    """Whether ``obj`` (a dict or a ``kubernetes`` model) names ``uid`` among its owners."""
    meta = obj.get("metadata") if isinstance(obj, dict) else obj.metadata
    if meta is None:
        return False
    refs = meta.get("ownerReferences") if isinstance(meta, dict) else meta.owner_references
    for ref in refs or []:
        ref_uid = ref.get("uid") if isinstance(ref, dict) else ref.uid
        if ref_uid == uid:
            return True
    return False


def create_owned(body: dict[str, Any], owner: Any, create: Any, read: Any) -> Any:
    """Create ``body`` as a child of ``owner``; returns the object there (``read()``).

    Idempotent for our own: a 409 is success only when the object there names the owner's
    uid; otherwise :class:`NameConflict`, and that object is left as it is.
    """
    kopf.adopt(body, owner=owner)
    try:
        create(body)
    except kubernetes.client.ApiException as error:
        if error.status != 409:
            raise
    found = read()
    if not owned_by(found, owner["metadata"]["uid"]):
        meta = body["metadata"]
        raise NameConflict(body["kind"], owner["metadata"]["namespace"], meta["name"])
    return found


def replace_owned(
    uid: str,
    read: Callable[[], Any],
    patch: Callable[[list[dict[str, Any]]], Any],
    path: str,
    value: Any,
) -> None:
    """Replace ``path`` of an object the search owns with ``value``, whole (a JSON patch,
    tested against the resourceVersion read, so the object checked is the one changed; read
    again when a scale came between). An object not there yet is left to the create
    handler; one not owned is left alone."""
    for attempt in range(3):
        try:
            found = read()
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return
            raise
        if not owned_by(found, uid):
            log.warning("%s is not this search's: left untouched", found.metadata.name)
            return
        version = found.metadata.resource_version
        try:
            patch(
                [
                    {"op": "test", "path": "/metadata/resourceVersion", "value": version},
                    {"op": "replace", "path": path, "value": value},
                ]
            )
        except kubernetes.client.ApiException as error:
            if error.status not in (409, 422) or attempt == 2:
                raise  # kopf retries the handler
            continue
        return


def delete_children(namespace: str, name: str, uid: str) -> None:
    """Delete the search's Deployment, broker Secret and NetworkPolicy: each only when it
    names this uid as its owner (a Secret the operator did not make, or another's object
    under that name, stays), with the uid read as a precondition."""
    apps, core = kubernetes.client.AppsV1Api(), kubernetes.client.CoreV1Api()
    networking = kubernetes.client.NetworkingV1Api()
    children: list[tuple[Callable[[], Any], Callable[[Any], Any]]] = [
        (
            lambda: apps.read_namespaced_deployment(deployment_name(name), namespace),
            lambda options: apps.delete_namespaced_deployment(
                deployment_name(name), namespace, body=options
            ),
        ),
        (
            lambda: core.read_namespaced_secret(broker_secret_name(name), namespace),
            lambda options: core.delete_namespaced_secret(
                broker_secret_name(name), namespace, body=options
            ),
        ),
        (
            lambda: networking.read_namespaced_network_policy(network_policy_name(name), namespace),
            lambda options: networking.delete_namespaced_network_policy(
                network_policy_name(name), namespace, body=options
            ),
        ),
    ]
    for read, delete in children:
        try:
            found = read()
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                continue
            raise
        if not owned_by(found, uid):
            log.warning("%s is not this search's: not deleted", found.metadata.name)
            continue
        preconditions = kubernetes.client.V1Preconditions(uid=found.metadata.uid)
        try:
            delete(kubernetes.client.V1DeleteOptions(preconditions=preconditions))
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise


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
    # 409 (it exists, and is ours) keeps the password the trainers already use; a Secret
    # of that name the operator did not make is never adopted (NameConflict)
    found = create_owned(
        build_broker_secret(name, url, password),
        body,
        lambda b: core.create_namespaced_secret(namespace, b),
        lambda: core.read_namespaced_secret(broker_secret_name(name), namespace),
    )
    password = base64.b64decode((found.data or {})[BROKER_PASSWORD_KEY]).decode()
    # least rights: the search's trials and its inbox exchange, nothing of its other queues
    names = QueueNames(study_name(namespace, name), shared.config.queue_prefix)
    asyncio.run(shared.broker_admin().ensure_identity(vhost, user, password, names))
    return password
