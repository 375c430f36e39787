"""The Kubernetes side of a search, over the Kubernetes API.

* :class:`ApiKube` is :class:`~mloptimizer.operator.daemon.Kube` for the search's daemon:
  its status, its trainer Deployment's replicas, its Events, its verify Jobs (synchronous:
  the daemon runs in kopf's worker thread). A Deployment under the trainers' name that does
  not name the search's uid as owner is someone else's: never scaled, never counted.
* :class:`ApiPoolKube` is :class:`~mloptimizer.operator.pool.PoolKube` for its GPU pool:
  its status and the Nodes rented VMs join as (cordon, drain, delete), each only when it
  carries the search's pool label (a Node of that name that is not its machine is left
  alone); the ``kubernetes`` client is synchronous, so each call runs in a worker thread
  and the pool's event loop (kopf's) keeps serving.

:func:`kube_outage` is the operator's hook into :func:`mloptimizer.faults.lost_service`:
which API answers mean "not now" rather than "never".
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

import kopf
import kubernetes

from mloptimizer.faults import BUSY_STATUSES
from mloptimizer.operator.builders import POOL_LABEL, deployment_name, trainer_selector
from mloptimizer.operator.claimverify import JOB_LABEL, JobEnd
from mloptimizer.operator.shared import create_owned, owned_by
from mloptimizer.spec import GROUP, PLURAL, VERSION

__all__ = ["DELETION_COST", "KUBE_PASSING", "ApiKube", "ApiPoolKube", "kube_outage"]

log = logging.getLogger(__name__)

# What a ReplicaSet weighs when it picks the pods to remove: the lowest cost goes first.
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"

# Kubernetes API answers that pass: a child object not created yet (the create handler and
# the daemon start together), a conflict, throttling, a server in trouble.
KUBE_PASSING = frozenset({404, 409, *BUSY_STATUSES})


def kube_outage(error: BaseException) -> str | None:
    """ "the Kubernetes API" when ``error`` is one of its answers that pass, else None."""
    if isinstance(error, kubernetes.client.ApiException) and error.status in KUBE_PASSING:
        return "the Kubernetes API"
    return None


class ApiKube:
    """The Kubernetes side of one search's daemon (``body`` is the search, for Events)."""

    def __init__(self, body: Any, namespace: str, name: str) -> None:
        self.body = body
        self.namespace = namespace
        self.name = name

    def patch_status(self, patch: dict[str, Any]) -> None:
        kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, PLURAL, self.name, {"status": patch}
        )

    @property
    def uid(self) -> str | None:
        return (self.body.get("metadata") or {}).get("uid")

    def _owned(self, deployment: Any) -> bool:
        refs = (deployment.metadata and deployment.metadata.owner_references) or []
        return self.uid is not None and any(ref.uid == self.uid for ref in refs)

    def scale(self, replicas: int) -> None:
        apps = kubernetes.client.AppsV1Api()
        name = deployment_name(self.name)
        # read first: the scale subresource carries no owner references
        deployment = apps.read_namespaced_deployment(name, self.namespace)
        if not self._owned(deployment):
            log.warning("Deployment %s/%s is not this search's: not scaled", self.namespace, name)
            return
        apps.patch_namespaced_deployment_scale(
            name, self.namespace, {"spec": {"replicas": replicas}}
        )

    def event(self, type_: str, reason: str, message: str) -> None:
        kopf.event(self.body, type=type_, reason=reason, message=message[:1024])

    def create_job(self, body: dict[str, Any]) -> None:
        """A verify Job, owned by the search (a Job of that name not its own: NameConflict)."""
        batch = kubernetes.client.BatchV1Api()
        name = body["metadata"]["name"]
        create_owned(
            body,
            self.body,
            lambda job: batch.create_namespaced_job(self.namespace, job),
            lambda: batch.read_namespaced_job(name, self.namespace),
        )

    def job_end(self, name: str) -> JobEnd | None:
        """How the search's Job ``name`` ended (its pod's termination message), or None while
        it runs. Only a Job the search owns and a pod that Job owns are believed."""
        job = kubernetes.client.BatchV1Api().read_namespaced_job(name, self.namespace)
        if self.uid is None or not owned_by(job, self.uid):
            return JobEnd(False, f"Job {name} is not this search's")
        status, job_uid = job.status, job.metadata and job.metadata.uid
        if status is None or not job_uid:
            return None
        done = (status.succeeded or 0) > 0
        if not done and not (status.failed or 0) > 0:
            return None
        pods = kubernetes.client.CoreV1Api().list_namespaced_pod(
            self.namespace, label_selector=f"{JOB_LABEL}={name}"
        )
        ends = [
            container.state.terminated
            for pod in pods.items
            if owned_by(pod, job_uid)
            for container in (pod.status and pod.status.container_statuses) or []
            if container.state and container.state.terminated
        ]
        if done:
            for ended in ends:
                if ended.exit_code == 0:
                    return JobEnd(True, ended.message or "")
            return JobEnd(False, "its pod is gone (no termination message)")
        reasons = [e.message or e.reason or f"exit code {e.exit_code}" for e in ends]
        reasons += [
            c.message or c.reason or "" for c in status.conditions or [] if c.type == "Failed"
        ]
        return JobEnd(False, "; ".join(r for r in reasons if r)[:500] or "failed")

    def mark_busy(self, busy: dict[str, int]) -> None:
        """Deletion costs on the search's trainer pods before a scale-down, so that the
        ReplicaSet removes idle ones first: a busy pod costs 1 + its trial's epochs done (a
        trial further on costs more to lose), an idle one 0."""
        core = kubernetes.client.CoreV1Api()
        selector = ",".join(f"{k}={v}" for k, v in trainer_selector(self.name).items())
        for pod in core.list_namespaced_pod(self.namespace, label_selector=selector).items:
            meta = pod.metadata
            if meta is None or not meta.name:
                continue
            name = meta.name
            cost = str(1 + busy[name]) if name in busy else "0"
            if (meta.annotations or {}).get(DELETION_COST) != cost:
                core.patch_namespaced_pod(
                    name, self.namespace, {"metadata": {"annotations": {DELETION_COST: cost}}}
                )

    def ready_replicas(self) -> int:
        try:
            deployment = kubernetes.client.AppsV1Api().read_namespaced_deployment_status(
                deployment_name(self.name), self.namespace
            )
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return 0
            raise
        if not self._owned(deployment):
            return 0
        return int((deployment.status and deployment.status.ready_replicas) or 0)


class ApiPoolKube:
    """The Kubernetes side of one search's pool.

    Args:
        namespace: the search's namespace.
        name: the search's name.
        trainer_selector: label selector of its trainer pods.
        api: a ``kubernetes.client.ApiClient`` (None: the default configuration).
        uid: the search's uid, which its Events refer to.
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        trainer_selector: str,
        api: Any | None = None,
        uid: str | None = None,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.uid = uid
        self.trainer_selector = trainer_selector
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.core = kubernetes.client.CoreV1Api(api)

    async def patch_status(self, patch: dict[str, Any]) -> None:
        await asyncio.to_thread(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            self.name,
            {"status": patch},
        )

    async def event(self, type_: str, reason: str, message: str) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body: Any = {
            "metadata": {"generateName": f"{self.name}."},
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ArchitectureSearch",
                "name": self.name,
                "namespace": self.namespace,
                **({"uid": self.uid} if self.uid else {}),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "mloptimizer-pool"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await asyncio.to_thread(self.core.create_namespaced_event, self.namespace, body)
        except kubernetes.client.ApiException as error:  # an Event is worth no failed pass
            log.warning("event %s not posted: %s", reason, error.reason)

    def _ours(self, node: Any) -> bool:
        """Whether a Node is one of this search's machines (its pool label names the uid)."""
        if self.uid is None:
            return True
        labels = (node.metadata and node.metadata.labels) or {}
        if labels.get(POOL_LABEL) == self.uid:
            return True
        log.warning(
            "Node %s is not a machine of this search's pool: left alone", node.metadata.name
        )
        return False

    async def _our_node(self, name: str) -> Any | None:
        """The Node ``name`` when it is this search's machine; None when absent or not ours."""
        try:
            node = await asyncio.to_thread(self.core.read_node, name)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return None
            raise
        return node if self._ours(node) else None

    async def node_ready(self, name: str) -> bool:
        node = await self._our_node(name)
        if node is None:
            return False
        conditions = (node.status and node.status.conditions) or []
        return any(c.type == "Ready" and c.status == "True" for c in conditions)

    async def drain_node(self, name: str) -> bool:
        if await self._our_node(name) is None:
            return True  # never joined, gone, or not ours: nothing of this search runs there
        try:
            await asyncio.to_thread(self.core.patch_node, name, {"spec": {"unschedulable": True}})
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return True  # never joined, or already gone: nothing runs there
            raise
        pods = await asyncio.to_thread(
            self.core.list_namespaced_pod, self.namespace, label_selector=self.trainer_selector
        )
        there = [p for p in pods.items if p.spec and p.spec.node_name == name]
        for pod in there:
            meta = pod.metadata
            if meta is not None and meta.name and meta.deletion_timestamp is None:
                # SIGTERM: the trainer requeues its trial and exits within its grace period.
                await asyncio.to_thread(self.core.delete_namespaced_pod, meta.name, self.namespace)
        return not there

    async def uncordon_node(self, name: str) -> None:
        if await self._our_node(name) is None:
            return
        try:
            await asyncio.to_thread(self.core.patch_node, name, {"spec": {"unschedulable": False}})
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise

    async def delete_node(self, name: str) -> None:
        if await self._our_node(name) is None:
            return
        try:
            await asyncio.to_thread(self.core.delete_node, name)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise
