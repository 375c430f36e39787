"""The operator end to end: kopf with our handlers against a real Kubernetes API server for
ArchitectureSearch (the emulator behind the routing proxy for core and apps objects, or a real
cluster: see ``cluster.py``), the machine's PostgreSQL and RabbitMQ, and real
`mloptimizer trainer` processes.

The trainers are started by the test, as the Deployment's pods would be, and the test asserts
the Deployment the operator asked for (the emulator has no Deployment controller).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import optuna
import pika
import pytest
from cluster import Cluster, ensure_namespace, run_operator
from k8s import run_kubectl
from services import RABBITMQ_URL, TrainerProcess

from mloptimizer.operator.brokeradmin import in_vhost, search_vhost
from mloptimizer.operator.config import OperatorConfig
from mloptimizer.operator.handlers import FINISHED
from mloptimizer.operator.main import shared_memo
from mloptimizer.study import records, storage_url

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def name() -> str:
    """A search name of its own (its queues live in its own vhost, deleted with it)."""
    return f"search-{uuid.uuid4().hex[:6]}"


async def start_trainer(
    cluster: Cluster,
    namespace: str,
    name: str,
    tmp_path: Path,
    worker: str,
    *extra: str,
    env: dict[str, str] | None = None,
) -> TrainerProcess:
    """A trainer as a pod of the search runs one: with the broker URL of the search's own
    Secret (its identity on its vhost), not the operator's login."""
    secret = await cluster.wait_for("secrets", namespace, f"{name}-broker", timeout=60)
    assert secret is not None
    url = base64.b64decode(secret["data"]["url"]).decode()
    assert "guest" not in url  # the operator's login never reaches a trainer
    return TrainerProcess(url, f"{namespace}.{name}", tmp_path, worker, *extra, env=env)


def search(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
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
        "workers": {"minReplicas": 0, "maxReplicas": 3, "pricePerHour": 0.3},
    }
    body.update(spec)
    return {
        "apiVersion": "mloptimizer.io/v1alpha1",
        "kind": "ArchitectureSearch",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def operator_config(dsn: str) -> OperatorConfig:
    # No orphan sweep: every test shares the broker's guest login, and one test's sweep
    # would take the broker identities of searches in other tests' clusters for orphans.
    return OperatorConfig(
        database_url=dsn,
        broker_url=RABBITMQ_URL,
        liveness_port=0,
        metrics_port=None,
        orphan_sweep_interval=0,
    )


def finished(obj: Any) -> bool:
    return obj is not None and obj.get("status", {}).get("phase") in FINISHED


async def test_apply_runs_the_search_to_succeeded_and_the_study_agrees(
    cluster: Cluster,
    postgres_dsn: str,
    name: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    trainers: list[TrainerProcess] = []
    try:
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            created = await cluster.create("archsearch", search(name))
            for i in (1, 2):
                trainers.append(await start_trainer(cluster, "default", name, tmp_path, f"t{i}"))
            deployment = await cluster.wait_for(
                "deployments", "default", f"{name}-trainer", timeout=30
            )
            assert deployment is not None
            (owner,) = deployment["metadata"]["ownerReferences"]
            assert owner["uid"] == created["metadata"]["uid"]
            assert owner["kind"] == "ArchitectureSearch"
            env = {
                e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            }
            assert env["MLOPT_BROKER_URL"]["valueFrom"]["secretKeyRef"]["name"] == f"{name}-broker"
            secret = await cluster.get("secrets", "default", f"{name}-broker")
            assert secret is not None
            password = base64.b64decode(secret["data"]["password"]).decode()

            running = await cluster.wait_for(
                "archsearch",
                "default",
                name,
                lambda o: o is not None and o.get("status", {}).get("phase") == "Running",
                timeout=60,
            )
            assert running is not None
            done = await cluster.wait_for("archsearch", "default", name, finished, timeout=300)
            assert done is not None
            scaled = await cluster.get("deployments", "default", f"{name}-trainer")
            assert scaled is not None
            listed = await run_kubectl(
                cluster.kubeconfig, "get", "archsearch", name, "-n", "default"
            )
    finally:
        for trainer in trainers:
            trainer.stop()

    status = done["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert scaled["spec"]["replicas"] == 0  # no trainers once the search ended
    study = optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
    trials = records(study)
    assert len(trials) == 4
    assert status["trials"]["complete"] == sum(t.state == "complete" for t in trials)
    assert status["best"]["number"] == study.best_trial.number
    assert status["best"]["value"] == pytest.approx(study.best_value, abs=1e-6)
    assert status["progress"] == "4/4"
    assert status["cost"]["usd"] > 0
    assert status["observedGeneration"] == created["metadata"]["generation"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Complete"]["reason"] == "MaxTrialsReached"
    assert "Delivered" not in conditions  # no spec.output destination: no final job
    assert "artifacts" not in status or status["artifacts"] == []
    events = await cluster.list("events", "default")
    reasons = {e["reason"] for e in events}
    assert {"Started", "NewBest", "Finished"} <= reasons
    # The search's broker password is in its Secret and nowhere else the operator writes.
    for where, text in (
        ("status", json.dumps(done)),
        ("events", json.dumps(events)),
        ("operator logs", caplog.text),
        ("kubectl", listed.stdout),
    ):
        assert password not in text, where
    print(listed.stdout)
    header = listed.stdout.splitlines()[0].split()
    assert header[:3] == ["NAME", "PHASE", "TRIALS"]
    assert "Succeeded" in listed.stdout
    assert "4/4" in listed.stdout


async def test_restarting_the_operator_mid_search_completes_it_telling_each_trial_once(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    trainers: list[TrainerProcess] = []
    memo_config = operator_config(postgres_dsn)
    try:
        async with run_operator(cluster, memo=shared_memo(memo_config)):
            await cluster.create(
                "archsearch", search(name, budget={"maxTrials": 6, "parallelism": 2})
            )
            for i in (1, 2):
                trainers.append(await start_trainer(cluster, "default", name, tmp_path, f"t{i}"))
            await cluster.wait_for(
                "archsearch",
                "default",
                name,
                lambda o: (
                    o is not None and o.get("status", {}).get("trials", {}).get("complete", 0) >= 1
                ),
                timeout=120,
            )
        # the operator is gone; trials in flight stay in RabbitMQ
        async with run_operator(cluster, memo=shared_memo(memo_config)):
            done = await cluster.wait_for("archsearch", "default", name, finished, timeout=300)
    finally:
        for trainer in trainers:
            trainer.stop()
    assert done is not None
    assert done["status"]["phase"] == "Succeeded"
    study = optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
    trials = records(study)
    assert len([t for t in trials if t.counted]) == 6
    assert all(t.state == "complete" for t in trials)
    assert "Resumed" in {e["reason"] for e in await cluster.list("events", "default")}


async def test_deleting_a_running_search_removes_its_queues_deployment_and_finalizer(
    cluster: Cluster, postgres_dsn: str, name: str
) -> None:
    async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
        created = await cluster.create("archsearch", search(name))
        secret = await cluster.wait_for("secrets", "default", f"{name}-broker", timeout=60)
        assert secret is not None
        trainer_url = base64.b64decode(secret["data"]["url"]).decode()
        await cluster.wait_for(
            "archsearch",
            "default",
            name,
            lambda o: o is not None and o.get("status", {}).get("phase") == "Running",
            timeout=60,
        )
        assert await cluster.get("deployments", "default", f"{name}-trainer") is not None
        # trials are in flight (sent, no trainer took them) when the search is deleted
        study = optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
        await poll(lambda: any(r.state == "running" for r in records(study)), timeout=60)
        await cluster.delete("archsearch", "default", name)
        await cluster.wait_for("archsearch", "default", name, lambda o: o is None, timeout=60)
    assert await cluster.get("deployments", "default", f"{name}-trainer") is None
    assert await cluster.get("secrets", "default", f"{name}-broker") is None
    # The study stays as history (storage.deleteStudyOnDelete is off), none left running:
    # each trial in flight is failed as interrupted, so it never counts against a search
    # created again under this name.
    left = records(
        optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
    )
    assert left
    assert all(r.state == "failed" and r.interrupted for r in left), left
    assert all("its search was deleted" in (r.error or "") for r in left)
    # The search's identity is gone, and its vhost with every queue in it.
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(trainer_url))
    vhost = search_vhost(created["metadata"]["uid"])
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(in_vhost(RABBITMQ_URL, vhost)))


async def poll(check: Any, timeout: float) -> None:
    """Poll what cannot be awaited (a process's log file)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def condition(obj: Any, type_: str) -> dict[str, Any]:
    found = [c for c in (obj or {}).get("status", {}).get("conditions", []) if c["type"] == type_]
    return found[0] if found else {}


async def test_budget_edits_apply_at_once_and_a_fixed_field_edit_is_refused(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    one: TrainerProcess | None = None
    try:
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            body = search(name, budget={"maxTrials": 2, "parallelism": 1})
            await cluster.create("archsearch", body)
            one = await start_trainer(cluster, "default", name, tmp_path, "t1")
            await cluster.wait_for(
                "archsearch",
                "default",
                name,
                lambda o: o is not None and o.get("status", {}).get("phase") == "Running",
                timeout=60,
            )
            # the search space cannot change under a running study
            await cluster.patch(
                "archsearch",
                "default",
                name,
                {"spec": {"searchSpace": {"architectures": ["inception"]}}},
            )
            refused = await cluster.wait_for(
                "archsearch",
                "default",
                name,
                lambda o: condition(o, "Degraded").get("reason") == "SpecChangeRefused",
                timeout=60,
            )
            assert "spec.searchSpace cannot change" in condition(refused, "Degraded")["message"]
            # restore it and raise maxTrials: accepted while the search runs
            await cluster.patch(
                "archsearch",
                "default",
                name,
                {"spec": {"searchSpace": {"architectures": ["cnn"]}, "budget": {"maxTrials": 4}}},
            )
            done = await cluster.wait_for("archsearch", "default", name, finished, timeout=300)
    finally:
        if one is not None:
            one.stop()
    assert done is not None
    assert done["status"]["phase"] == "Succeeded"
    assert done["status"]["progress"] == "4/4"
    assert condition(done, "Degraded")["status"] == "False"
    study = optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
    trials = records(study)
    assert len(trials) == 4
    assert {t.architecture.family for t in trials if t.architecture} == {"cnn"}


async def test_two_searches_in_two_namespaces_stay_apart(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    trainers: list[TrainerProcess] = []
    await ensure_namespace(cluster, "team-b")
    try:
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            await cluster.create("archsearch", search(name, "default"))
            await cluster.create(
                "archsearch", search(name, "team-b", budget={"maxTrials": 3, "parallelism": 1})
            )
            for ns in ("default", "team-b"):
                trainers.append(await start_trainer(cluster, ns, name, tmp_path, f"t-{ns}"))
            a = await cluster.wait_for("archsearch", "default", name, finished, timeout=300)
            b = await cluster.wait_for("archsearch", "team-b", name, finished, timeout=300)
    finally:
        for trainer in trainers:
            trainer.stop()
    assert a is not None
    assert b is not None
    assert (a["status"]["phase"], b["status"]["phase"]) == ("Succeeded", "Succeeded")
    assert (a["status"]["progress"], b["status"]["progress"]) == ("4/4", "3/3")
    for namespace, count, worker in (("default", 4, "t-default"), ("team-b", 3, "t-team-b")):
        study = optuna.load_study(
            study_name=f"{namespace}.{name}", storage=storage_url(postgres_dsn)
        )
        trials = records(study)
        assert len(trials) == count
        assert {t.attrs["worker_id"] for t in trials} == {worker}  # its own trainer only
        deployment = await cluster.get("deployments", namespace, f"{name}-trainer")
        assert deployment is not None


async def test_a_space_too_deep_for_the_data_fails_that_search_and_others_go_on(
    cluster: Cluster, postgres_dsn: str, name: str
) -> None:
    deep = {
        "architectures": ["cnn"],
        "cnn": {"blocks": {"min": 4, "max": 4}},
    }
    async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
        await cluster.create("archsearch", search(f"{name}-bad", searchSpace=deep))
        await cluster.create("archsearch", search(name))
        bad = await cluster.wait_for("archsearch", "default", f"{name}-bad", finished, timeout=60)
        good = await cluster.wait_for(
            "archsearch",
            "default",
            name,
            lambda o: o is not None and o.get("status", {}).get("phase") == "Running",
            timeout=60,
        )
        await cluster.delete("archsearch", "default", name)
        await cluster.wait_for("archsearch", "default", name, lambda o: o is None, timeout=60)
    assert bad is not None
    assert good is not None
    assert bad["status"]["phase"] == "Failed"
    assert "spec.searchSpace.cnn.blocks.min" in bad["status"]["message"]
    assert condition(bad, "Complete")["reason"] == "InvalidSpec"
    assert await cluster.get("deployments", "default", f"{name}-bad-trainer") is None
    warnings = [e for e in await cluster.list("events", "default") if e["reason"] == "InvalidSpec"]
    assert warnings


async def test_a_trainer_killed_mid_trial_loses_nothing_and_the_trial_is_told_once(
    cluster: Cluster, postgres_dsn: str, name: str, tmp_path: Path
) -> None:
    victim: TrainerProcess | None = None
    survivor: TrainerProcess | None = None
    try:
        async with run_operator(cluster, memo=shared_memo(operator_config(postgres_dsn))):
            budget = {"maxTrials": 3, "parallelism": 1}
            training = {"epochs": 20, "batchSize": 32, "mixedPrecision": "off"}
            await cluster.create("archsearch", search(name, budget=budget, training=training))
            victim = await start_trainer(cluster, "default", name, tmp_path, "victim")
            # the victim is the only trainer: it takes trial 0; kill it once it trains
            await poll(lambda: "(attempt 1)" in victim.log(), timeout=120)
            victim.process.kill()
            victim.process.wait()
            survivor = await start_trainer(cluster, "default", name, tmp_path, "survivor")
            done = await cluster.wait_for("archsearch", "default", name, finished, timeout=300)
    finally:
        if victim is not None:
            victim.stop()
        if survivor is not None:
            survivor.stop()
    assert done is not None
    assert done["status"]["phase"] == "Succeeded"
    study = optuna.load_study(study_name=f"default.{name}", storage=storage_url(postgres_dsn))
    trials = records(study)
    assert len(trials) == 3
    assert all(t.state == "complete" for t in trials)
    first = trials[0]
    assert first.attrs["worker_id"] == "survivor"
    assert first.attrs["attempt"] == 2  # redelivered by RabbitMQ, told once


async def test_what_the_admin_did_not_allow_fails_the_search_naming_the_field(
    cluster: Cluster, postgres_dsn: str, name: str
) -> None:
    config = dataclasses.replace(
        operator_config(postgres_dsn), allowed_images=("registry.example.com/ml/",)
    )
    await cluster.create(
        "secrets",
        {"metadata": {"name": f"{name}-db"}, "data": {"url": base64.b64encode(b"x").decode()}},
        "default",
    )
    allowed = {"image": "registry.example.com/ml/trainer:1"}
    cases = {
        f"{name}-secret": (
            search(
                f"{name}-secret",
                storage={"secretRef": {"name": f"{name}-db", "key": "url"}},
                workers=allowed,
            ),
            "SecretNotUsable",
            "spec.storage.secretRef: Secret default/" + f"{name}-db is not open to searches",
        ),
        f"{name}-image": (
            search(f"{name}-image", workers={"image": "docker.io/evil/miner:latest"}),
            "ImageNotAllowed",
            "spec.workers.image: 'docker.io/evil/miner:latest' is not allowed",
        ),
        f"{name}-cp": (
            search(
                f"{name}-cp",
                workers={
                    **allowed,
                    "tolerations": [
                        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}
                    ],
                },
            ),
            "PlacementNotAllowed",
            "spec.workers.tolerations[0]: tolerating 'node-role.kubernetes.io/control-plane'",
        ),
        f"{name}-pool": (
            search(
                f"{name}-pool",
                workers={
                    **allowed,
                    "gpuPool": {
                        "maxReplicas": 1,
                        "maxPricePerHour": 0.5,
                        "apiKeySecretRef": {"name": "vastai", "key": "api-key"},
                        "joinSecretRef": {"name": "k3s-join"},
                    },
                },
            ),
            "GpuPoolsDisabled",
            "spec.workers.gpuPool: GPU pools are off in this operator",
        ),
    }
    async with run_operator(cluster, memo=shared_memo(config)):
        for body, _, _ in cases.values():
            await cluster.create("archsearch", body)
        for search_name, (_, reason, message) in cases.items():
            done = await cluster.wait_for(
                "archsearch", "default", search_name, finished, timeout=60
            )
            assert done is not None
            assert done["status"]["phase"] == "Failed"
            assert condition(done, "Complete")["reason"] == reason
            assert message in done["status"]["message"], done["status"]["message"]
            deployment = await cluster.get("deployments", "default", f"{search_name}-trainer")
            assert deployment is None  # nothing was started for it
    reasons = {e["reason"] for e in await cluster.list("events", "default")}
    assert {"SecretNotUsable", "ImageNotAllowed", "PlacementNotAllowed", "GpuPoolsDisabled"} <= (
        reasons
    )
