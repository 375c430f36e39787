"""Pure builders of the Kubernetes objects a search owns: the trainer Deployment, the
Secret that carries the broker URL to it and the trainers' NetworkPolicy (DNS and the broker
only); and of what its GPU pool rents on Vast.ai (a Node-mode VM that joins the cluster, a
Direct-mode trainer container). No API calls here; the handlers adopt and apply.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
import shlex
import urllib.parse
from collections.abc import Sequence
from typing import Any

from mloptimizer.messages import CHECKPOINTS_DIR
from mloptimizer.spec import ArchitectureSearchSpec, GpuPool, SecretKeyRef

__all__ = [
    "BROKER_PASSWORD_KEY",
    "BROKER_SECRET_KEY",
    "CACHE_DIR",
    "DATA_DIR",
    "DNS_RULE",
    "GRACE_SECONDS",
    "K3S_VERSION",
    "NEVER",
    "OUTPUT_DIR",
    "POOL_LABEL",
    "TRAINER_UID",
    "VM_IMAGE",
    "address_rules",
    "broker_secret_name",
    "build_broker_secret",
    "build_trainer_deployment",
    "build_trainer_policy",
    "child_name",
    "deployment_name",
    "direct_rent_request",
    "egress_admits",
    "label_value",
    "name_hash",
    "network_policy_name",
    "node_onstart",
    "node_rent_request",
    "pod_price",
    "sharing_env",
    "trainer_labels",
    "trainer_selector",
    "trainers_per_machine",
]

CACHE_DIR = "/var/cache/mloptimizer"
DATA_DIR = "/data"
OUTPUT_DIR = "/output"  # the search's output.pvc, on its own trainers only
BROKER_SECRET_KEY = "url"
BROKER_PASSWORD_KEY = "password"
# The trainer gets this long to requeue its trial after SIGTERM; the pod gets 10 s more
# before SIGKILL, so a trial is always requeued, never lost to a kill.
GRACE_SECONDS = 20
TRAINER_UID = 1000
POOL_LABEL = "mloptimizer.io/pool"  # node label and taint of machines rented for a search


def name_hash(text: str) -> str:
    """8 hex digits of the full ``text``: what tells apart two names cut or changed alike."""
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def child_name(text: str, suffix: str) -> str:
    """``text-suffix`` as a valid 63-character DNS label, unique per ``text``: the name of
    an object of search ``text``.

    A search name may hold dots and be 253 characters long: when it had to be changed
    (``a.x`` -> ``a-x``) or cut, a hash of the full name goes in, so that ``a.x`` and
    ``a-x``, or two names sharing their first 60 characters, never name the same object.
    """
    base = re.sub(r"[^a-z0-9-]", "-", text.lower()).strip("-")
    room = 63 - len(suffix) - 1
    if base == text and len(base) <= room:
        return f"{base}-{suffix}"
    tag = name_hash(text)
    return f"{base[: room - len(tag) - 1].rstrip('-')}-{tag}-{suffix}".lstrip("-")


def label_value(search: str) -> str:
    """``search`` as a label value (at most 63 characters), unique per search name."""
    if len(search) <= 63:
        return search
    return f"{search[:54].rstrip('.-')}-{name_hash(search)}"


def deployment_name(search: str) -> str:
    """The trainer Deployment of search ``search``."""
    return child_name(search, "trainer")


def broker_secret_name(search: str) -> str:
    """The Secret the operator writes when the search names no broker Secret."""
    return child_name(search, "broker")


def network_policy_name(search: str) -> str:
    """The NetworkPolicy of the search's trainer pods."""
    return child_name(search, "trainers")


def trainer_labels(search: str) -> dict[str, str]:
    """Labels of the trainer pods (and the Deployment's selector)."""
    return {
        "app.kubernetes.io/name": "mloptimizer-trainer",
        "app.kubernetes.io/instance": label_value(search),
        "app.kubernetes.io/managed-by": "mloptimizer",
        "mloptimizer.io/search": label_value(search),
    }


def build_broker_secret(search: str, url: str, password: str) -> dict[str, Any]:
    """The search's own broker identity, for its trainers: the URL of its user on its vhost
    (never the operator's login), and the password alone, which outlives operator restarts
    (trainers keep using it while they reconnect)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": broker_secret_name(search), "labels": trainer_labels(search)},
        "type": "Opaque",
        "stringData": {BROKER_SECRET_KEY: url, BROKER_PASSWORD_KEY: password},
    }


def trainers_per_machine(spec: ArchitectureSearchSpec) -> int:
    """Trainer pods one rented machine holds: its GPUs over the GPUs each trainer asks
    (Direct mode: its one container)."""
    pool = spec.workers.gpu_pool
    if pool is None or pool.mode == "Direct":
        return 1
    return max(1, pool.num_gpus // max(1, spec.workers.resources.gpu))


def pod_price(machine_price: float | None, spec: ArchitectureSearchSpec) -> float | None:
    """USD/hour of one trainer pod on a rented machine: the machine's price over the pods
    it holds (its trainer processes split that again: ``ResultMessage.gpu_share``). None:
    the worker is not on a rented machine."""
    return None if machine_price is None else machine_price / trainers_per_machine(spec)


def sharing_env(spec: ArchitectureSearchSpec) -> dict[str, str]:
    """What a trainer container needs to run ``trainersPerGpu`` processes: the setting,
    and for ``auto`` the memory a trainer of this space needs (its largest sampled model
    at ``training.batchSize``, sizing's estimate), which the pod divides its GPU by."""
    share = spec.workers.trainers_per_gpu
    if share == 1:
        return {}
    env = {"MLOPT_TRAINERS_PER_GPU": str(share)}
    if share == "auto":
        from mloptimizer.checks import sampled_needs

        need = max(sampled_needs(spec), default=2**30)  # custom models only: a guess, 1 GiB
        env["MLOPT_TRAINER_MEMORY_MB"] = str(math.ceil(need / 2**20))
    return env


def intra_op_threads(cpu: str) -> int:
    """TensorFlow's intra-op threads for a pod of ``cpu`` cores: the whole cores it may use.

    TensorFlow sizes its pools by the node's cores, not the pod's CPU limit: a 4-core pod
    on a 64-core node would run 64 threads against a 4-core quota and be throttled. On the
    cores it has, intra-op = cores with TensorFlow's own inter-op pool trained fastest
    (bench/trainer_threads.py; pinning inter-op to 1 cost 25 %).
    """
    millis = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu.rstrip("kMGTi"))
    return max(1, int(millis))


def _resources(spec: ArchitectureSearchSpec) -> dict[str, Any]:
    r = spec.workers.resources
    amounts: dict[str, Any] = {"cpu": r.cpu, "memory": r.memory}
    gpu = r.gpu or (1 if spec.workers.gpu_pool is not None else 0)  # rented for their GPUs
    if gpu:
        amounts["nvidia.com/gpu"] = str(gpu)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def build_trainer_deployment(
    search: str,
    namespace: str,
    spec: ArchitectureSearchSpec,
    *,
    replicas: int,
    broker: SecretKeyRef,
    queue_prefix: str = "mlopt",
    pool_uid: str | None = None,
) -> dict[str, Any]:
    """The Deployment of a search's trainers.

    Args:
        search: ``metadata.name`` of the ArchitectureSearch.
        namespace: its namespace.
        spec: its parsed spec.
        replicas: the trainers wanted now.
        broker: the Secret key holding the AMQP URL (the search's own or the operator's).
        queue_prefix: the broker queue prefix the operator uses.
        pool_uid: the search's uid when its GPU pool runs in Node mode: the pods then go
            to the nodes rented for it (label and taint ``mloptimizer.io/pool=<uid>``), and
            each worker id names its node, so a trial's cost uses that machine's price.
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
        {"name": "MLOPT_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "MLOPT_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "MLOPT_WORKER_ID", "value": "$(MLOPT_POD_NAME)@$(MLOPT_NODE_NAME)"},
        {"name": "MLOPT_INTRA_OP_THREADS", "value": str(intra_op_threads(workers.resources.cpu))},
        *({"name": k, "value": v} for k, v in sharing_env(spec).items()),
    ]
    volumes: list[dict[str, Any]] = [
        # bounded: a trainer image filling its node's disk gets evicted, not the node
        {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}},  # downloaded datasets
        {"name": "tmp", "emptyDir": {"sizeLimit": "2Gi"}},
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
    output = spec.output.pvc
    if output is not None:
        volumes.append(
            {"name": "output", "persistentVolumeClaim": {"claimName": output.claim_name}}
        )
        mounts.append({"name": "output", "mountPath": OUTPUT_DIR})
        folder_path = spec.output.destination_path(namespace, search)
        env.append({"name": "MLOPT_OUTPUT_DIR", "value": OUTPUT_DIR})
        # each trainer keeps its best model there: the final job reuses the best one
        env.append({"name": "MLOPT_KEEP_MODELS", "value": f"{OUTPUT_DIR}/{folder_path}/models"})
        # and each trial's epochs: a trial whose trainer died goes on from its last one
        env.append(
            {
                "name": "MLOPT_CHECKPOINT_DIR",
                "value": f"{OUTPUT_DIR}/{folder_path}/{CHECKPOINTS_DIR}",
            }
        )
    container = {
        "name": "trainer",
        "image": workers.trainer_image,
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
    selector = dict(workers.node_selector)
    tolerations = [
        t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in workers.tolerations
    ]
    if pool_uid is not None:
        selector[POOL_LABEL] = pool_uid
        tolerations.append(
            {"key": POOL_LABEL, "operator": "Equal", "value": pool_uid, "effect": "NoSchedule"}
        )
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    if selector:
        pod_spec["nodeSelector"] = selector
    if tolerations:
        pod_spec["tolerations"] = tolerations
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


# --- the trainers' NetworkPolicy ----------------------------------------------------------
# Trainers run the search author's image on a rented or shared node: nothing reaches them,
# and they reach DNS (the cluster's resolver in kube-system) and the broker only; plus, when
# the search delivers to S3, the object store on its port. Never the cloud metadata address
# (169.254.169.254, with the node's credentials), never the API server, never the rest of
# the cluster. The operator creates one per search, owned by it, in the search's namespace,
# whichever namespaces it watches. Where the broker or the object store is reached by name
# (a Service, a DNS name), a policy cannot say so: the admin's rules do (the chart's
# networkPolicy.trainerEgress and objectStorageEgress, passed as MLOPT_TRAINER_EGRESS and
# MLOPT_OBJECT_STORE_EGRESS). An address given as an IP literal becomes a rule here.

# The cluster's resolver: kube-dns / CoreDNS pods in kube-system.
DNS_RULE: dict[str, Any] = {
    "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}

# Never opened by a derived rule: private ranges (the cluster, its API server), carrier-grade
# NAT, loopback and link-local (169.254.169.254, the cloud metadata address).
NEVER = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
)
_NEVER = tuple(ipaddress.ip_network(n) for n in NEVER)

_PORTS = {"amqp": 5672, "amqps": 5671, "http": 80, "https": 443}


def trainer_selector(search: str) -> dict[str, str]:
    """Labels that pick the search's trainer pods (a subset of their labels)."""
    return {
        "app.kubernetes.io/name": "mloptimizer-trainer",
        "mloptimizer.io/search": label_value(search),
    }


def address_rules(url: str, *, public_by_name: bool) -> list[dict[str, Any]]:
    """Egress to the host and port of ``url``.

    An IP literal outside :data:`NEVER` gets its own ``/32`` (or ``/128``); a private or
    link-local literal gets nothing (the admin's rules must open it). A host name gets the
    public internet on that port when ``public_by_name`` (no private range, no metadata
    address), else nothing.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or _PORTS.get(parts.scheme, 443)
    except ValueError:
        return []
    host = parts.hostname or ""
    ports = [{"protocol": "TCP", "port": port}]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not public_by_name or not host:
            return []
        return [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": list(NEVER)}}], "ports": ports}]
    if any(address in network for network in _NEVER if network.version == address.version):
        return []
    if address.is_loopback or address.is_link_local or address.is_private:
        return []
    bits = 32 if address.version == 4 else 128
    return [{"to": [{"ipBlock": {"cidr": f"{address}/{bits}"}}], "ports": ports}]


def build_trainer_policy(
    search: str,
    spec: ArchitectureSearchSpec,
    *,
    broker_url: str | None = None,
    trainer_egress: Sequence[dict[str, Any]] = (),
    object_store_egress: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The NetworkPolicy of search ``search``'s trainers (to be adopted by the search).

    Args:
        search: ``metadata.name`` of the ArchitectureSearch.
        spec: its parsed spec (``output.s3`` opens the object store).
        broker_url: the URL its trainers log in with (the host part is all that is used).
        trainer_egress: the admin's rules for every trainer (the broker by name, ...).
        object_store_egress: the admin's rules to the object store, for S3 searches.
    """
    egress: list[dict[str, Any]] = [DNS_RULE]
    if broker_url:
        egress += address_rules(broker_url, public_by_name=False)
    egress += [dict(rule) for rule in trainer_egress]
    store = spec.output.s3
    if store is not None:
        if object_store_egress:
            egress += [dict(rule) for rule in object_store_egress]
        else:
            egress += address_rules(store.endpoint, public_by_name=True)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": network_policy_name(search),
            "labels": {
                "app.kubernetes.io/managed-by": "mloptimizer",
                "mloptimizer.io/search": label_value(search),
            },
        },
        "spec": {
            "podSelector": {"matchLabels": trainer_selector(search)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [],
            "egress": egress,
        },
    }


def egress_admits(policy: dict[str, Any], address: str, port: int) -> bool:
    """Whether a NetworkPolicy's egress rules let its pods reach ``address:port``, an
    address outside the cluster's pods (pod and namespace selectors never match it): the
    check the tests make of every rendered trainer policy."""
    spec = policy["spec"]
    if "Egress" not in spec.get("policyTypes", []):
        return True
    ip = ipaddress.ip_address(address)
    for rule in spec.get("egress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("port") in (None, port) for p in ports):
            continue
        peers = rule.get("to")
        if not peers:
            return True
        for peer in peers:
            block = peer.get("ipBlock")
            if block is None:
                continue
            if ip in ipaddress.ip_network(block["cidr"]) and not any(
                ip in ipaddress.ip_network(cut) for cut in block.get("except") or []
            ):
                return True
    return False


# --- what a GPU pool rents -----------------------------------------------------------

# The k3s agent a rented VM installs: pinned, so that what joins the cluster is what was
# tested, not whatever get.k3s.io serves that day. Keep it within a minor of the servers'.
K3S_VERSION = "v1.33.5+k3s1"


def node_onstart(name: str, uid: str) -> str:
    """The start-up script of a Node-mode VM: join the cluster as a tainted k3s agent."""
    flags = [
        "agent",
        f"--node-name={name}",
        f"--node-label={POOL_LABEL}={uid}",
        f"--node-taint={POOL_LABEL}={uid}:NoSchedule",
    ]
    return (
        "#!/bin/sh\nset -eu\n"
        "# K3S_URL and K3S_TOKEN come in the instance's environment.\n"
        "curl -sfL https://get.k3s.io | "
        f"INSTALL_K3S_VERSION={shlex.quote(K3S_VERSION)} "
        f"INSTALL_K3S_EXEC={shlex.quote(' '.join(flags))} sh -s -\n"
    )


VM_IMAGE = "docker.io/vastai/kvm:ubuntu_cli_22.04"  # Vast.ai's VM template image


def node_rent_request(
    pool: GpuPool, name: str, uid: str, server_url: str, token: str
) -> dict[str, Any]:
    """``PUT /asks/`` body of a Node-mode VM: it boots, installs k3s and joins the cluster."""
    return {
        "client_id": "me",
        "image": VM_IMAGE,
        "disk": pool.disk_gb,
        "runtype": "ssh",
        "vm": True,
        "env": {"K3S_URL": server_url, "K3S_TOKEN": token},
        "onstart": node_onstart(name, uid),
    }


def direct_rent_request(
    pool: GpuPool,
    name: str,
    *,
    image: str,
    broker_url: str,
    search: str,
    queue_prefix: str,
    grace_seconds: int,
    cache_dir: str,
    sharing: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``PUT /asks/`` body of a Direct-mode container: the trainer image itself, with the
    broker URL of a user scoped to this search and nothing else (no database, no cluster);
    ``sharing``: :func:`sharing_env`."""
    return {
        "client_id": "me",
        "image": image,
        "disk": pool.disk_gb,
        "runtype": "args",
        "args": ["trainer", "--grace-period", str(grace_seconds), "--queue-prefix", queue_prefix],
        "env": {
            "MLOPT_BROKER_URL": broker_url,
            "MLOPT_SEARCH": search,
            "MLOPT_WORKER_ID": name,
            "MLOPT_CACHE_DIR": cache_dir,
            "KERAS_HOME": cache_dir,
            **(sharing or {}),
        },
    }
