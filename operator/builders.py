"""Pure builders of the Kubernetes objects a search owns: the trainer Deployment and the
Secret that carries the broker URL to it. No API calls here; the handlers adopt and apply.
"""

from __future__ import annotations

import re
from typing import Any

from mloptimizer.spec import ArchitectureSearchSpec, SecretKeyRef

__all__ = [
    "BROKER_SECRET_KEY",
    "CACHE_DIR",
    "DATA_DIR",
    "GRACE_SECONDS",
    "TRAINER_UID",
    "broker_secret_name",
    "build_broker_secret",
    "build_trainer_deployment",
    "deployment_name",
    "trainer_labels",
]

CACHE_DIR = "/var/cache/mloptimizer"
DATA_DIR = "/data"
BROKER_SECRET_KEY = "url"
# The trainer gets this long to requeue its trial after SIGTERM; the pod gets 10 s more
# before SIGKILL, so a trial is always requeued, never lost to a kill.
GRACE_SECONDS = 20
TRAINER_UID = 1000


def _dns_label(text: str, suffix: str) -> str:
    """``text-suffix`` cut to a valid 63-character DNS label."""
    base = re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")
    return f"{base[: 63 - len(suffix) - 1].rstrip('-')}-{suffix}"


def deployment_name(search: str) -> str:
    """The trainer Deployment of search ``search``."""
    return _dns_label(search, "trainer")


def broker_secret_name(search: str) -> str:
    """The Secret the operator writes when the search names no broker Secret."""
    return _dns_label(search, "broker")


def trainer_labels(search: str) -> dict[str, str]:
    """Labels of the trainer pods (and the Deployment's selector)."""
    return {
        "app.kubernetes.io/name": "mloptimizer-trainer",
        "app.kubernetes.io/instance": search[:63],
        "app.kubernetes.io/managed-by": "mloptimizer",
        "mloptimizer.io/search": search[:63],
    }


def build_broker_secret(search: str, broker_url: str) -> dict[str, Any]:
    """A Secret with the operator's broker URL, for a search that names none."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": broker_secret_name(search), "labels": trainer_labels(search)},
        "type": "Opaque",
        "stringData": {BROKER_SECRET_KEY: broker_url},
    }


def _resources(spec: ArchitectureSearchSpec) -> dict[str, Any]:
    r = spec.workers.resources
    amounts: dict[str, Any] = {"cpu": r.cpu, "memory": r.memory}
    if r.gpu:
        amounts["nvidia.com/gpu"] = str(r.gpu)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def build_trainer_deployment(
    search: str,
    namespace: str,
    spec: ArchitectureSearchSpec,
    *,
    replicas: int,
    broker: SecretKeyRef,
    queue_prefix: str = "mlopt",
) -> dict[str, Any]:
    """The Deployment of a search's trainers.

    Args:
        search: ``metadata.name`` of the ArchitectureSearch.
        namespace: its namespace.
        spec: its parsed spec.
        replicas: the trainers wanted now.
        broker: the Secret key holding the AMQP URL (the search's own or the operator's).
        queue_prefix: the broker queue prefix the operator uses.
    """
    labels = trainer_labels(search)
    workers = spec.workers
    env: list[dict[str, Any]] = [
        {
            "name": "MLOPT_BROKER_URL",
            "valueFrom": {"secretKeyRef": {"name": broker.name, "key": broker.key}},
        },
        {"name": "MLOPT_SEARCH", "value": f"{namespace}.{search}"},
        {"name": "MLOPT_CACHE_DIR", "value": CACHE_DIR},
        {"name": "KERAS_HOME", "value": CACHE_DIR},
        {"name": "MLOPT_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    folder = spec.dataset.image_folder
    if folder is not None and folder.claim_name:
        volumes.append(
            {
                "name": "data",
                "persistentVolumeClaim": {"claimName": folder.claim_name, "readOnly": True},
            }
        )
        mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": True})
        env.append({"name": "MLOPT_DATA_DIR", "value": DATA_DIR})
    container = {
        "name": "trainer",
        "image": workers.image,
        "imagePullPolicy": "IfNotPresent",
        "args": [
            "trainer",
            "--grace-period",
            str(GRACE_SECONDS),
            "--queue-prefix",
            queue_prefix,
        ],
        "env": env,
        "resources": _resources(spec),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": GRACE_SECONDS + 10,
        "automountServiceAccountToken": False,  # trainers never talk to the API
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if workers.node_selector:
        pod_spec["nodeSelector"] = dict(workers.node_selector)
    if workers.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in workers.tolerations
        ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deployment_name(search), "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            # A trainer being replaced requeues its trial; never run fewer than asked.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0}},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }
